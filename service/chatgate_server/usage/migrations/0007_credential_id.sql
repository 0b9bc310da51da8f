-- 0007: which credential spent each row (auth/, migration 0006): the credential's public
-- id, never its secret, so a leaked or misused token can be traced to its calls and
-- revoked. NULL for rows written with CHATGATE_AUTH=off or before this migration.
--
-- Applied by usage/migrate.py inside one transaction. Never edit once shipped.
-- Nullable without a default: adding it rewrites nothing.
ALTER TABLE usage_records ADD COLUMN credential_id text;
