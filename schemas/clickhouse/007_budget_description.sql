-- A budget's description, so a restart on an empty broker (the embedded system) gives it back.
ALTER TABLE tag_budgets ADD COLUMN IF NOT EXISTS description Nullable(String);
