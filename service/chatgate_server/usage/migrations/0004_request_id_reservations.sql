-- 0004: caller-supplied request ids are reserved here before a call is served, so that
-- every process (workers of one server, replicas) sees an id the moment it is taken.
--
-- Applied by usage/migrate.py inside one transaction. Never edit once shipped.
--
-- Why a table of its own rather than usage_records: a call's usage row is written only
-- when the call ends (and then after the ledger's batch linger), so two processes
-- admitting the same id at the same time both found nothing there. One row per id,
-- claimed with INSERT ... ON CONFLICT, is decided by the primary key at once
-- (usage/reservations.py has the statements and the rules).
--
-- Keyed by request_id alone, like usage_records (whose rows are keyed by request_id
-- whatever the tenant): an id must mean one request across tenants too, or two tenants
-- could still make two rows for one id. The fingerprint (usage/admission.py) covers
-- the tenant, so another tenant's use of an id is "a different request".
--
-- Rows are small (an id, 16 bytes of fingerprint, a timestamp, a flag) and live for
-- CHATGATE_REQUEST_ID_WINDOW_HOURS: an expired row is taken over by the next insert of
-- its id, and `chatgate usage-retention` deletes the rest.
CREATE TABLE request_id_reservations (
    reserved_at timestamptz NOT NULL DEFAULT now(),
    -- true: the call that reserved the id ended without sending the caller anything,
    -- so a retry with the same content may take the id over (another content may not).
    released    boolean     NOT NULL DEFAULT false,
    request_id  text        NOT NULL PRIMARY KEY,
    fingerprint bytea       NOT NULL CHECK (octet_length(fingerprint) = 16)
);

-- No index on reserved_at: it would cost every reservation a second index insert,
-- while retention's DELETE by age runs rarely and may scan the table.
