-- 0003: why a row's cost is what it is.
--
-- Applied by usage/migrate.py inside one transaction. Never edit once shipped.

-- 'priced': tokens × the price row named by price_version; 'not_charged': the upstream
-- refused the call or failed before producing anything (or it never reached the
-- upstream), so the cost is 0 while the token columns may keep the prompt estimate;
-- 'price_unknown': no price row matched the model, so the cost is NULL (never a guess).
-- NULL for rows written before this migration. Nullable without a default: no rewrite.
-- Must list every domain.CostBasis value.
ALTER TABLE usage_records ADD COLUMN cost_basis text
    CHECK (cost_basis IN ('priced', 'not_charged', 'price_unknown'));
