-- Keep the hot statements' plans whatever the statistics say.
--
-- The claim, the queue depth and the sweeps reach rows by state only through the partial
-- indexes built for them (instances_claim_order, instances_slot_waiters, ...). A plain
-- index keyed on `state` competes with them: when the statistics are stale (the table was
-- analyzed empty, or full of finished history), `state = 'scheduled'` looks like a handful
-- of rows, and the planner reads every scheduled row through that index and sorts them,
-- on every claim. So the listing index is now keyed on `state COLLATE "C"`: the listing
-- (which asks for exactly that) still uses it, but a condition written `state = ...` in
-- the database's own collation cannot. Text equality is the same under every
-- deterministic collation, so this changes which plans exist, never which rows match.
DROP INDEX instances_by_state;
CREATE INDEX instances_by_state ON instances (state COLLATE "C", id);
