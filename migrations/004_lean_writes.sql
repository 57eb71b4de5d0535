-- Fewer index entries and key checks written per instance.
--
-- A claim or a finish changes `state`, so it can never be a HOT update: every index on
-- `instances` gets a new entry for the new row version, whatever the index is keyed on.
-- An instance's life (insert, claim, finish) wrote 14 index entries; after this file it
-- writes 5 (the primary key three times, the claim index and the running index once
-- each). Measured on PostgreSQL 18 with 2 workers draining one-step instances, the
-- server's CPU per instance fell by about a third (bench/cpu_split.py: 46 to 30 µs).

-- Listing by state or by sequence no longer has an index of its own, which every write
-- paid for. The listing walks the primary key newest first and stops at its page; the
-- states that are rare in a long history have partial indexes: running rows have
-- `instances_running_by_incarnation`, failed and cancelled ones (the dead letter) the
-- index below. Scheduled rows are mostly the newest, found early in id order.
DROP INDEX instances_by_state;
DROP INDEX instances_by_sequence;
CREATE INDEX instances_dead_letter ON instances (id) WHERE state IN ('failed', 'cancelled');

-- Most instances carry no idempotency key: only those that do need an entry. The
-- inserts name this index's predicate in their ON CONFLICT clause.
CREATE UNIQUE INDEX instances_idempotency_key ON instances (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
ALTER TABLE instances DROP CONSTRAINT instances_idempotency_key_key;

-- Outputs are written only for the rows the fenced UPDATE of the same statement has just
-- updated (and so locked), so the foreign key's check of each output row (a lookup and a
-- KEY SHARE lock of the instance, per row) proved nothing. Its cascade is kept: deleting
-- or truncating instances removes their outputs, once per statement.
ALTER TABLE step_outputs DROP CONSTRAINT step_outputs_instance_id_fkey;

CREATE FUNCTION orch8_delete_outputs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        TRUNCATE step_outputs;
    ELSE
        DELETE FROM step_outputs WHERE instance_id IN (SELECT id FROM deleted);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER instances_delete_outputs AFTER DELETE ON instances
    REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION orch8_delete_outputs();
CREATE TRIGGER instances_truncate_outputs AFTER TRUNCATE ON instances
    FOR EACH STATEMENT EXECUTE FUNCTION orch8_delete_outputs();

-- The same for an instance's sequence: the statements that create instances find the
-- sequence they name in the same statement, and a definition row is never updated or
-- deleted (a new definition is a new version). The key's check of each new instance (a
-- lookup and a KEY SHARE lock of the one sequence row that every concurrent enqueue
-- shares) was over a third of a 1,000-instance batch's time in the server. What it
-- guarded is now stated outright: definitions cannot be deleted.
ALTER TABLE instances DROP CONSTRAINT instances_sequence_name_sequence_version_fkey;

CREATE FUNCTION orch8_keep_sequences() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'sequence definitions are never deleted: instances refer to them'
        USING HINT = 'publish a new version instead';
END
$$;

CREATE TRIGGER sequences_are_kept BEFORE DELETE OR TRUNCATE ON sequences
    FOR EACH STATEMENT EXECUTE FUNCTION orch8_keep_sequences();
