-- 0001: the usage ledger. One row per request, partitioned by month, with a daily
-- roll-up that store.py maintains in the same statement as the inserts.
--
-- Applied by usage/migrate.py inside one transaction; the runner records it in
-- schema_migrations. Never edit this file once shipped: add 0002_... instead.

-- Columns are ordered widest-fixed-first (timestamps, bigints, doubles, then int,
-- then variable-length text/jsonb) so Postgres does not pad for alignment: on a table
-- that gets one row per request, a few bytes per row add up.
CREATE TABLE usage_records (
    started_at           timestamptz      NOT NULL,
    recorded_at          timestamptz      NOT NULL DEFAULT now(),
    -- Token counts: bigint, since a single request can't overflow int but sums can,
    -- and the roll-up sums these columns.
    input_tokens         bigint           NOT NULL CHECK (input_tokens >= 0),
    output_tokens        bigint           NOT NULL CHECK (output_tokens >= 0),
    cached_input_tokens  bigint           NOT NULL CHECK (cached_input_tokens >= 0),
    reasoning_tokens     bigint           NOT NULL CHECK (reasoning_tokens >= 0),
    total_tokens         bigint           NOT NULL CHECK (total_tokens >= 0),
    -- Integer micro-dollars; NULL when the model had no price (see price_version).
    cost_usd_micros      bigint,
    -- Milliseconds as double precision: the domain holds floats, and float8 round-trips
    -- them exactly.
    ttft_ms              double precision,
    duration_ms          double precision NOT NULL,
    attempts             integer          NOT NULL CHECK (attempts >= 0),
    request_id           text             NOT NULL,
    tenant               text             NOT NULL,
    caller_service       text             NOT NULL,
    user_id              text             NOT NULL,
    requested_model      text             NOT NULL,
    resolved_model       text,
    upstream_response_id text,
    usage_source         text             NOT NULL
        CHECK (usage_source IN ('reported', 'estimated')),
    estimate_encoding    text,
    price_version        text             NOT NULL,
    -- Must list every domain.Outcome value; tests insert one row per Outcome so that a
    -- new value without a migration fails the build, not a production batch.
    outcome              text             NOT NULL
        CHECK (outcome IN ('completed', 'cancelled', 'deadline_exceeded', 'upstream_error',
                           'rejected', 'shutdown', 'internal_error')),
    grpc_status          text             NOT NULL,
    -- No CHECK here: the upstream's vocabulary grows, and an unknown finish reason must
    -- not turn a whole batch into one that can never be written.
    finish_reason        text,
    trace_id             text,
    tags                 jsonb            NOT NULL DEFAULT '{}',
    -- The partition key has to be part of any unique key on a partitioned table. A
    -- record always carries the same started_at, so a replayed record hits this key
    -- and ON CONFLICT DO NOTHING drops it.
    PRIMARY KEY (request_id, started_at)
) PARTITION BY RANGE (started_at);

-- The usage service and quota checks ask "this tenant (or this user) over a window".
CREATE INDEX usage_records_tenant_started_idx ON usage_records (tenant, started_at);
CREATE INDEX usage_records_tenant_user_started_idx ON usage_records (tenant, user_id, started_at);

-- The DEFAULT partition is a safety net: a record whose month has no partition (a
-- clock far off, a replica that ran for months without creating partitions) is still
-- written instead of failing its whole batch over and over. The cost: Postgres refuses
-- to create a range's partition while the default holds rows of that range, and every
-- new partition must scan the default. chatgate_create_usage_partition below therefore
-- moves such rows out of the default as it creates their month, and partitions are
-- created months ahead so the default normally stays empty (monitor it: rows there
-- mean partition creation is lagging or a clock is wrong).
CREATE TABLE usage_records_default PARTITION OF usage_records DEFAULT;

-- Create one month's partition (UTC months) if missing; true if it was created.
-- Built as CREATE TABLE ... LIKE + ATTACH PARTITION rather than CREATE TABLE ...
-- PARTITION OF: ATTACH takes only a SHARE UPDATE EXCLUSIVE lock on the parent, so
-- inserts into other months and readers keep going while a partition is added.
CREATE FUNCTION chatgate_create_usage_partition(month date) RETURNS boolean
LANGUAGE plpgsql
-- Fail fast instead of queueing behind a long query: the writer keeps working (rows
-- of a missing month go to the default) and the next call tries again.
SET lock_timeout = '5s'
AS $fn$
DECLARE
    lo   date := date_trunc('month', month)::date;
    hi   date := (date_trunc('month', month) + interval '1 month')::date;
    part text := 'usage_records_' || to_char(month, 'YYYYMM');
    -- Explicit UTC bounds: the session time zone must not move partition edges.
    lo_ts text := to_char(lo, 'YYYY-MM-DD') || ' 00:00:00+00';
    hi_ts text := to_char(hi, 'YYYY-MM-DD') || ' 00:00:00+00';
BEGIN
    IF to_regclass(quote_ident(part)) IS NOT NULL THEN
        RETURN false;
    END IF;
    -- Block writes into the default (reads go on) so that no row of this month can
    -- land there between moving its rows out and attaching the new partition.
    LOCK TABLE usage_records_default IN EXCLUSIVE MODE;
    EXECUTE format('CREATE TABLE %I (LIKE usage_records INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   part);
    EXECUTE format('WITH moved AS (DELETE FROM usage_records_default '
                   'WHERE started_at >= %L AND started_at < %L RETURNING *) '
                   'INSERT INTO %I SELECT * FROM moved', lo_ts, hi_ts, part);
    -- ATTACH builds the partition's primary key and indexes from the parent's.
    EXECUTE format('ALTER TABLE usage_records ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   part, lo_ts, hi_ts);
    RETURN true;
END
$fn$;

-- Make sure the partitions for (this UTC month - months_behind) .. (this month +
-- months_ahead) exist; returns how many were created. Called by this migration and at
-- service start-up. The common case (all exist) takes no lock at all.
CREATE FUNCTION chatgate_ensure_usage_partitions(months_ahead integer, months_behind integer DEFAULT 0)
RETURNS integer
LANGUAGE plpgsql
SET lock_timeout = '5s'
AS $fn$
DECLARE
    first_month date := (date_trunc('month', now() AT TIME ZONE 'UTC')
                         - make_interval(months => months_behind))::date;
    created integer := 0;
    missing boolean := false;
BEGIN
    IF months_ahead < 0 OR months_behind < 0 THEN
        RAISE EXCEPTION 'months_ahead and months_behind must be >= 0';
    END IF;
    FOR i IN 0 .. months_behind + months_ahead LOOP
        IF to_regclass(quote_ident('usage_records_'
               || to_char(first_month + make_interval(months => i), 'YYYYMM'))) IS NULL THEN
            missing := true;
            EXIT;
        END IF;
    END LOOP;
    IF NOT missing THEN
        RETURN 0;
    END IF;
    -- Replicas start together: serialise creators (key: "cgpartit"), then re-check
    -- inside chatgate_create_usage_partition.
    PERFORM pg_advisory_xact_lock(7162817296190433652);
    FOR i IN 0 .. months_behind + months_ahead LOOP
        IF chatgate_create_usage_partition((first_month + make_interval(months => i))::date) THEN
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END
$fn$;

SELECT chatgate_ensure_usage_partitions(3, 1);

-- Daily roll-up for budgets and the usage service: one row per UTC day, tenant, user
-- and requested model (the name callers use; the resolved snapshot name would split one
-- model into several rows, and is NULL for requests rejected before the upstream).
-- Maintained by store.py in the same statement as the inserts, from the rows actually
-- inserted, so a replayed record is never counted twice.
CREATE TABLE usage_daily (
    day                 date   NOT NULL,
    requests            bigint NOT NULL DEFAULT 0,
    input_tokens        bigint NOT NULL DEFAULT 0,
    output_tokens       bigint NOT NULL DEFAULT 0,
    cached_input_tokens bigint NOT NULL DEFAULT 0,
    reasoning_tokens    bigint NOT NULL DEFAULT 0,
    total_tokens        bigint NOT NULL DEFAULT 0,
    -- Sum of the priced rows only; unpriced_requests says how many rows had no price,
    -- so a budget check can tell "cost 0" from "cost unknown".
    cost_usd_micros     bigint NOT NULL DEFAULT 0,
    unpriced_requests   bigint NOT NULL DEFAULT 0,
    tenant              text   NOT NULL,
    user_id             text   NOT NULL,
    model               text   NOT NULL,
    -- Key column order serves "this user over these days" directly; the index below
    -- serves "this tenant over these days".
    PRIMARY KEY (tenant, user_id, day, model)
);

CREATE INDEX usage_daily_tenant_day_idx ON usage_daily (tenant, day);
