-- Budgets, filled in: how the window moves, where the budget came from, and ids
-- that make a re-sent alert recognisable.
ALTER TABLE tag_budgets ADD COLUMN IF NOT EXISTS window LowCardinality(String) DEFAULT 'calendar';
ALTER TABLE tag_budgets ADD COLUMN IF NOT EXISTS source LowCardinality(String) DEFAULT 'tag';
ALTER TABLE tag_budgets ADD COLUMN IF NOT EXISTS created_at DateTime64(3, 'UTC') DEFAULT updated_at;
-- event_type: 'alert' | 'soft_alert' | 'blocked' | 'unblocked' | 'deleted'
ALTER TABLE budget_events ADD COLUMN IF NOT EXISTS alert_id String DEFAULT '';
ALTER TABLE budget_events ADD COLUMN IF NOT EXISTS soft_budget_usd Nullable(Decimal(38, 12));
