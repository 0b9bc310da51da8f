-- 0002: request fingerprints for idempotency keys, and indexes for time-window reports.
--
-- Applied by usage/migrate.py inside one transaction. Never edit once shipped.

-- When the caller supplied request_id, the row keeps a 16-byte hash of the request's
-- content (usage/admission.py). A later call with the same id and the same content is
-- the caller's retry; with other content it is a reused id, refused with
-- ALREADY_EXISTS. NULL for ids chatgate generated (unique by construction), so most
-- rows pay one null-bitmap bit for it. Nullable without a default: no table rewrite.
ALTER TABLE usage_records ADD COLUMN request_fingerprint bytea
    CHECK (octet_length(request_fingerprint) = 16);

-- Operators ask "who used what in the last hour" across all tenants (the CLI's
-- --vs-usual view); neither existing index leads with started_at. Rows arrive in
-- started_at order, which is what BRIN summarises well: a few pages per partition
-- instead of a B-tree the size of the key column.
CREATE INDEX usage_records_started_brin_idx ON usage_records USING brin (started_at);

-- The same question on the roll-up, and retention deleting old days.
CREATE INDEX usage_daily_day_idx ON usage_daily (day);
