-- 0009: the limits operators (and the abuse detector) set: what may be spent, by whom.
-- Only the definitions; the shared counters that leases draw from are limits/' own.
--
-- A limit applies to one subject: a tenant, a caller (a service of a tenant) or an end
-- user within a tenant; subject '*' with scope 'user' is the tenant's default for each
-- of its users. model '' applies to every model, else to that requested model only.
-- Amounts are integers: requests, tokens, micro-dollars or streams, by kind.
--
-- Several sources may limit the same thing: 'operator' (chatgate limits set) and
-- 'detector' (the abuse detector tightening a limit for a while). The effective limit
-- is the smallest unexpired amount among them, so a tightening never loosens anything
-- and, when it expires, the operator's limit is back without anyone restoring it.

CREATE TABLE limits (
    scope      text        NOT NULL CHECK (scope IN ('tenant', 'caller', 'user')),
    tenant     text        NOT NULL CHECK (length(tenant) BETWEEN 1 AND 128),
    -- '' for scope tenant; the caller's name; the user id, or '*' (each user's default).
    subject    text        NOT NULL CHECK (length(subject) <= 256),
    model      text        NOT NULL DEFAULT '' CHECK (length(model) <= 256),
    kind       text        NOT NULL CHECK (kind IN (
                   'requests_per_minute', 'tokens_per_minute', 'tokens_per_day',
                   'spend_per_day', 'spend_per_month', 'concurrent_streams')),
    source     text        NOT NULL DEFAULT 'operator' CHECK (source IN ('operator', 'detector')),
    amount     bigint      NOT NULL CHECK (amount >= 0),
    -- NULL: until cleared.
    expires_at timestamptz,
    reason     text        NOT NULL DEFAULT '' CHECK (length(reason) <= 1024),
    set_by     text        NOT NULL DEFAULT '' CHECK (length(set_by) <= 256),
    set_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, scope, subject, model, kind, source),
    CHECK ((scope = 'tenant') = (subject = ''))
);

-- Every replica polls this one row and reloads its limit table when the number moves
-- (as with callers: cheap, and right through a transaction-mode pooler).
CREATE TABLE limit_table_version (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    version bigint  NOT NULL
);
INSERT INTO limit_table_version VALUES (true, 0);

CREATE FUNCTION bump_limit_table_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE limit_table_version SET version = version + 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER limits_changed AFTER INSERT OR UPDATE OR DELETE ON limits
    FOR EACH STATEMENT EXECUTE FUNCTION bump_limit_table_version();
