-- 0011: blocks (who may not call at all, until when, and why) with their audit, and the
-- abuse detector's findings, per-tenant policy and inputs (limits/blocks*.py,
-- limits/anomaly*.py).

-- One row per blocked subject: a tenant, a caller (a service of a tenant) or an end user
-- within a tenant. A new block of the same subject replaces the row (the audit keeps
-- both). Rows past expires_at no longer apply; they are left for the audit's sake and
-- removed by the next block or unblock of that subject.
CREATE TABLE blocks (
    scope      text        NOT NULL CHECK (scope IN ('tenant', 'caller', 'user')),
    tenant     text        NOT NULL CHECK (length(tenant) BETWEEN 1 AND 128),
    -- '' for scope tenant; the caller's name; the user id.
    subject    text        NOT NULL CHECK (length(subject) <= 256),
    source     text        NOT NULL CHECK (source IN ('operator', 'detector')),
    reason     text        NOT NULL DEFAULT '' CHECK (length(reason) <= 1024),
    blocked_by text        NOT NULL DEFAULT '' CHECK (length(blocked_by) <= 256),
    blocked_at timestamptz NOT NULL DEFAULT now(),
    -- NULL: until unblocked.
    expires_at timestamptz,
    PRIMARY KEY (tenant, scope, subject),
    CHECK ((scope = 'tenant') = (subject = ''))
);

-- Every block and unblock: who, why, when, until when, and whether an operator or the
-- detector did it.
CREATE TABLE block_audit (
    id         bigserial   PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    action     text        NOT NULL CHECK (action IN ('block', 'unblock')),
    scope      text        NOT NULL,
    tenant     text        NOT NULL,
    subject    text        NOT NULL,
    source     text        NOT NULL CHECK (source IN ('operator', 'detector')),
    actor      text        NOT NULL,
    reason     text        NOT NULL,
    expires_at timestamptz
);
CREATE INDEX block_audit_subject_idx ON block_audit (tenant, scope, subject, at);

-- Append-only in the database itself, not just by convention: a block cannot be made to
-- look as if it never happened.
CREATE FUNCTION block_audit_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'block_audit is append-only';
END
$$;
CREATE TRIGGER block_audit_append_only BEFORE UPDATE OR DELETE ON block_audit
    FOR EACH STATEMENT EXECUTE FUNCTION block_audit_is_append_only();

-- Every process polls this one row and reloads its block table when the number moves
-- (as with callers and limits: cheap, and right through a transaction-mode pooler).
CREATE TABLE block_table_version (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    version bigint  NOT NULL
);
INSERT INTO block_table_version VALUES (true, 0);

CREATE FUNCTION bump_block_table_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE block_table_version SET version = version + 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER blocks_changed AFTER INSERT OR UPDATE OR DELETE ON blocks
    FOR EACH STATEMENT EXECUTE FUNCTION bump_block_table_version();

-- What the detector may do about a tenant's findings (chatgate anomalies policy). No
-- row: flag only.
CREATE TABLE anomaly_policies (
    tenant      text        PRIMARY KEY CHECK (length(tenant) BETWEEN 1 AND 128),
    escalate    text        NOT NULL CHECK (escalate IN ('flag', 'tighten', 'block')),
    tighten_for interval    NOT NULL CHECK (tighten_for > interval '0'),
    block_for   interval    NOT NULL CHECK (block_for > interval '0'),
    set_by      text        NOT NULL DEFAULT '',
    set_at      timestamptz NOT NULL DEFAULT now()
);

-- The detector's findings, one row each, with what it did about them.
CREATE TABLE anomalies (
    id          bigserial        PRIMARY KEY,
    found_at    timestamptz      NOT NULL,
    tenant      text             NOT NULL,
    scope       text             NOT NULL CHECK (scope IN ('tenant', 'caller', 'user')),
    subject     text             NOT NULL,
    rule        text             NOT NULL CHECK (rule IN ('usage_spike', 'refusal_burst', 'user_fanout')),
    -- What was measured (tokens, spend_usd_micros, refusals, new_users), how much, what
    -- is usual for the subject and the threshold it crossed.
    measure     text             NOT NULL,
    observed    bigint           NOT NULL,
    usual       double precision NOT NULL,
    threshold   double precision NOT NULL,
    detail      text             NOT NULL,
    action      text             NOT NULL CHECK (action IN ('flag', 'tighten', 'block')),
    action_detail text           NOT NULL DEFAULT '',
    acted_until timestamptz
);
CREATE INDEX anomalies_found_idx ON anomalies (found_at);
CREATE INDEX anomalies_subject_idx ON anomalies (tenant, scope, subject, found_at);

-- Calls refused at the edge without a usage row (invalid, a taken request id...), as
-- counted by each process per minute and flushed in the background: never a write per
-- call. The detector adds them to the rejected rows when it looks for refusal bursts.
CREATE TABLE refusal_counts (
    minute timestamptz NOT NULL,
    tenant text        NOT NULL,
    caller text        NOT NULL,
    reason text        NOT NULL,
    calls  bigint      NOT NULL CHECK (calls >= 0),
    PRIMARY KEY (minute, tenant, caller, reason)
);

-- When the detector last ran, so that of several processes one run per interval acts.
CREATE TABLE anomaly_detector_state (
    one         boolean PRIMARY KEY DEFAULT true CHECK (one),
    last_run_at timestamptz
);
INSERT INTO anomaly_detector_state VALUES (true, NULL);

-- The detector reads the last hour of usage_records across tenants every interval: a
-- BRIN index on started_at (rows arrive in roughly that order) finds that hour in a few
-- pages, where the btree indexes, led by tenant, would not help. It is tiny to build and
-- to keep.
CREATE INDEX usage_records_started_brin ON usage_records USING brin (started_at);
