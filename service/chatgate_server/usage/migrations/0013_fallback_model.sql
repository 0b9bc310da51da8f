-- 0013: the route's fallback model when it served the call (chatgate.toml routes'
-- ``fallback``): the call asked for requested_model, every deployment of it failed before
-- the first event, and the fallback answered. NULL when the model asked for served the
-- call (or no attempt was made), and for rows written before this migration.
-- (0010 and 0011 belong to the limits work, 0012 to the request-contract work.)
--
-- Applied by usage/migrate.py inside one transaction. Never edit once shipped.
-- Nullable without a default: adding it rewrites nothing.
ALTER TABLE usage_records ADD COLUMN fallback_model text;
