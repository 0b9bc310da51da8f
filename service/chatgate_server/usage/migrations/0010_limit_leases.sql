-- 0010: the shared counters that every chatgate process leases its slices of limits from
-- (limits/leases.py, limits/buckets.py; the guarantees and their proofs: docs/LIMITS.md).
--
-- Processes share nothing but this database. Each change is ONE call of a function
-- below (one statement, one round trip, one transaction): the rows it touches are
-- locked in a fixed order (pool, then lease), so concurrent processes serialize on the
-- counter and never deadlock.

-- Budgets (tokens or spend per UTC day or month) and concurrent streams: an amount
-- that is given out once per window. `taken` counts what was granted into leases plus
-- what was spent beyond them; it only falls when a lease gives back what it did not use
-- (or expires). So granted-and-unspent + spent <= amount whenever no settlement spent
-- more than its reservation.
CREATE TABLE limit_pools (
    -- "<limit key>@<window start>", e.g. "user:acme/u-42|tokens_per_day@2026-12-04".
    pool    text        PRIMARY KEY CHECK (length(pool) <= 1024),
    -- When the window ends (the row can go a day later); NULL: never (concurrency).
    ends_at timestamptz,
    taken   bigint      NOT NULL DEFAULT 0
);
CREATE INDEX limit_pools_ends_at ON limit_pools (ends_at) WHERE ends_at IS NOT NULL;
-- The pools at zero, which the heartbeat drops (without it: a scan per process per second).
CREATE INDEX limit_pools_empty ON limit_pools (pool) WHERE taken = 0;

-- What each process holds of a pool: granted to it and not yet reported spent. A
-- process that stops renewing (killed) loses its lease at expires_at: a live process
-- reclaims it (limit_heartbeat), and the pool gets `held` back.
CREATE TABLE limit_leases (
    pool       text        NOT NULL REFERENCES limit_pools ON DELETE CASCADE,
    holder     text        NOT NULL CHECK (length(holder) <= 256),
    held       bigint      NOT NULL CHECK (held >= 0),
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (pool, holder)
);
CREATE INDEX limit_leases_expires_at ON limit_leases (expires_at);

-- Rates (requests or tokens per minute): token buckets, refilled continuously at
-- capacity/60 per second and never above capacity. A process takes a slice out and
-- spends it locally; what it does not use goes back (never above capacity). Tokens a
-- killed process held are simply gone: the bucket refills anyway.
CREATE TABLE limit_buckets (
    bucket     text             PRIMARY KEY CHECK (length(bucket) <= 1024),
    level      double precision NOT NULL,
    updated_at timestamptz      NOT NULL
);

-- Live processes, so each can size its slices (and its share while Postgres is away)
-- by how many processes share a limit.
CREATE TABLE limit_holders (
    holder  text        PRIMARY KEY CHECK (length(holder) <= 256),
    seen_at timestamptz NOT NULL
);

-- Report what a holder spent since its last call, give back `back` unused, and ask for
-- up to `want` more; returns the holder's lease afterwards, what it was granted now, and
-- what the pool has left to grant.
CREATE FUNCTION limit_pool_sync(
    p_pool text, p_ends_at timestamptz, p_holder text, p_amount bigint,
    p_spent bigint, p_back bigint, p_want bigint, p_ttl_s double precision
) RETURNS TABLE (held bigint, granted bigint, remaining bigint, expires_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_taken bigint;
    v_held  bigint;
    v_over  bigint;
    v_back  bigint;
    v_grant bigint;
    v_exp   timestamptz := clock_timestamp() + make_interval(secs => p_ttl_s);
BEGIN
    -- Made, or locked as it is (a pool at zero may be deleted by a heartbeat meanwhile:
    -- then it is made anew, which is the same pool).
    INSERT INTO limit_pools AS p (pool, ends_at) VALUES (p_pool, p_ends_at)
        ON CONFLICT (pool) DO UPDATE SET ends_at = EXCLUDED.ends_at
        RETURNING p.taken INTO v_taken;
    SELECT l.held INTO v_held FROM limit_leases l
        WHERE l.pool = p_pool AND l.holder = p_holder FOR UPDATE;
    -- No lease (never had one, or it expired and was reclaimed): everything spent is new.
    v_held := coalesce(v_held, 0);
    v_over := greatest(0, p_spent - v_held);
    v_back := least(greatest(p_back, 0), greatest(0, v_held - p_spent));
    v_taken := v_taken + v_over - v_back;
    v_grant := least(greatest(p_want, 0), greatest(0, p_amount - v_taken));
    v_taken := v_taken + v_grant;
    v_held := greatest(0, v_held - p_spent) - v_back + v_grant;
    UPDATE limit_pools p SET taken = v_taken WHERE p.pool = p_pool;
    IF v_held > 0 THEN
        INSERT INTO limit_leases AS l (pool, holder, held, expires_at)
            VALUES (p_pool, p_holder, v_held, v_exp)
            ON CONFLICT (pool, holder) DO UPDATE SET held = v_held, expires_at = v_exp;
    ELSE
        DELETE FROM limit_leases l WHERE l.pool = p_pool AND l.holder = p_holder;
    END IF;
    RETURN QUERY SELECT v_held, v_grant, greatest(0, p_amount - v_taken), v_exp;
END
$$;

-- Refill a bucket to now and take up to `want` whole tokens, after putting `back` in
-- (negative `back`: a settlement used more than it reserved; the debt is refilled first).
CREATE FUNCTION limit_bucket_take(
    p_bucket text, p_capacity double precision, p_per_s double precision,
    p_want bigint, p_back double precision
) RETURNS TABLE (granted bigint, level double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_level double precision;
    v_at    timestamptz;
    v_now   timestamptz;
    v_grant bigint;
BEGIN
    INSERT INTO limit_buckets (bucket, level, updated_at) VALUES (p_bucket, p_capacity, clock_timestamp())
        ON CONFLICT DO NOTHING;
    SELECT b.level, b.updated_at INTO v_level, v_at FROM limit_buckets b
        WHERE b.bucket = p_bucket FOR UPDATE;
    -- Read the clock after the lock: holders of the lock see it move forward only.
    v_now := greatest(clock_timestamp(), v_at);
    v_level := least(p_capacity, v_level + p_per_s * extract(epoch FROM v_now - v_at) + p_back);
    v_grant := least(greatest(p_want, 0), greatest(0, floor(v_level)))::bigint;
    v_level := v_level - v_grant;
    UPDATE limit_buckets b SET level = v_level, updated_at = v_now WHERE b.bucket = p_bucket;
    RETURN QUERY SELECT v_grant, v_level;
END
$$;

-- Once a second from every process: say it is alive, reclaim the leases of holders
-- that stopped renewing, drop pools no longer needed; returns the live holders.
CREATE FUNCTION limit_heartbeat(p_holder text, p_live_s double precision)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    r record;
    v_held bigint;
    v_live integer;
BEGIN
    INSERT INTO limit_holders (holder, seen_at) VALUES (p_holder, clock_timestamp())
        ON CONFLICT (holder) DO UPDATE SET seen_at = EXCLUDED.seen_at;
    FOR r IN SELECT l.pool, l.holder FROM limit_leases l
             WHERE l.expires_at < clock_timestamp() ORDER BY l.pool LIMIT 1000 LOOP
        -- Pool first, as limit_pool_sync locks; a pool busy now is reclaimed next time.
        PERFORM 1 FROM limit_pools p WHERE p.pool = r.pool FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        DELETE FROM limit_leases l WHERE l.pool = r.pool AND l.holder = r.holder
            AND l.expires_at < clock_timestamp() RETURNING l.held INTO v_held;
        CONTINUE WHEN NOT FOUND;
        UPDATE limit_pools p SET taken = p.taken - v_held WHERE p.pool = r.pool;
    END LOOP;
    -- Windows long over; and pools at zero (nothing granted, nothing spent: no lease can
    -- exist), which would otherwise pile up, one concurrency pool per user ever seen.
    DELETE FROM limit_pools p WHERE p.ends_at < clock_timestamp() - interval '2 days';
    DELETE FROM limit_pools p WHERE p.taken = 0;
    DELETE FROM limit_buckets b WHERE b.updated_at < clock_timestamp() - interval '1 day';
    DELETE FROM limit_holders h WHERE h.seen_at < clock_timestamp() - interval '1 hour';
    SELECT count(*) INTO v_live FROM limit_holders h
        WHERE h.seen_at > clock_timestamp() - make_interval(secs => p_live_s);
    RETURN v_live;
END
$$;
