-- 0008: which upstream deployment served each row (chatgate.toml's deployment name,
-- "openai" for the one deployment made from the environment): the deployment of the
-- call's last attempt. NULL for rows of calls refused before any attempt, and for rows
-- written before this migration.
--
-- Applied by usage/migrate.py inside one transaction. Never edit once shipped.
-- Nullable without a default: adding it rewrites nothing.
ALTER TABLE usage_records ADD COLUMN deployment text;
