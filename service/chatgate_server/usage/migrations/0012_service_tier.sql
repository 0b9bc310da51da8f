-- 0012: the processing tier the upstream reports it served each call in (the chunks'
-- service_tier: "default", "flex", "priority", ...), so a bill can be checked against
-- the tier a call was served in (flex costs less, priority more). NULL when the upstream
-- did not say (Azure without priority processing, compatible servers), for calls that
-- never started, and for rows written before this migration.
--
-- Applied by usage/migrate.py inside one transaction. Never edit once shipped.
-- Nullable without a default: adding it rewrites nothing.
ALTER TABLE usage_records ADD COLUMN service_tier text;
