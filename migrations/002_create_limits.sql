-- Concurrency keys (slots held as rows) and per-handler rate limits (a sliding window).

------------------------------------------------------------------------------------------
-- Concurrency keys
--
-- A key has slots 1..N (N: the largest max_concurrency any of its instances has carried).
-- A running keyed instance holds exactly one slot, numbered at most its own
-- max_concurrency; the claim takes a slot and sets `running` in one statement, and the
-- triggers below give the slot back whatever statement moves the instance out of
-- `running` (finish, fail, retry, wait, release, cancel, a stale-node sweep, a delete).
-- Two claims can never hold one slot (a row lock, then a row value), so the count of
-- running instances of a key can never pass its slot count, across any number of nodes.
------------------------------------------------------------------------------------------

-- A due keyed instance the claim found no slot for: it leaves the claim index (so it
-- neither blocks other work nor is scanned again every tick) until a freed slot wakes it.
ALTER TABLE instances ADD COLUMN waiting_for_slot boolean NOT NULL DEFAULT false;

-- The claim's index now holds only instances that can be claimed: waiting ones are out.
DROP INDEX instances_claim_order;
CREATE INDEX instances_claim_order ON instances (priority DESC, next_fire_at)
    WHERE state = 'scheduled' AND NOT waiting_for_slot;
-- A claim that finds a key full parks the key's other due instances too, through this
-- index (keyed rows only) rather than batch after batch through the claim index.
CREATE INDEX instances_ready_by_key ON instances (concurrency_key)
    WHERE state = 'scheduled' AND NOT waiting_for_slot AND concurrency_key IS NOT NULL;
-- A freed slot wakes its key's next waiter: highest priority, then oldest due.
CREATE INDEX instances_slot_waiters ON instances (concurrency_key, priority DESC, next_fire_at)
    WHERE state = 'scheduled' AND waiting_for_slot;

CREATE TABLE concurrency_slots (
    concurrency_key text    NOT NULL,
    slot            integer NOT NULL CHECK (slot >= 1),
    -- The running instance holding this slot; NULL while it is free. UNIQUE: an instance
    -- holds at most one slot, and freeing finds its slot by this index.
    instance_id     uuid    UNIQUE,
    PRIMARY KEY (concurrency_key, slot)
);

-- Wake the waiter of `key` that comes first (priority, then next_fire_at) among those
-- allowed to hold slot `usable_slot` (0: any). It goes back to the claim index and the
-- workers are told. SKIP LOCKED: a waiter being cancelled is passed over, not waited on.
CREATE FUNCTION orch8_wake_slot_waiter(key text, usable_slot integer) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE instances SET waiting_for_slot = false
    WHERE id = (
        SELECT id FROM instances
        WHERE concurrency_key = key AND state = 'scheduled' AND waiting_for_slot
          AND coalesce(max_concurrency, 1) >= usable_slot
        ORDER BY priority DESC, next_fire_at
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    );
    IF FOUND THEN
        PERFORM pg_notify('orch8_work', '');
    END IF;
END
$$;

-- Give back the slot of an instance leaving `running`, then wake one waiter.
--
-- Locking: the UPDATE touches only this instance's own slot row, so two transactions
-- freeing slots never wait on each other (no deadlock, however a group commit orders its
-- rows). It does wait for a claim holding that row locked; claims never wait on anything,
-- so that wait is short. The claim parks waiters only after locking every slot row of the
-- key, so once this UPDATE has the row, the wake (a new statement, hence a new snapshot
-- under READ COMMITTED) sees every waiter that claim parked: no wake-up is lost.
CREATE FUNCTION orch8_free_concurrency_slot() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    freed integer;
BEGIN
    UPDATE concurrency_slots SET instance_id = NULL WHERE instance_id = OLD.id
    RETURNING slot INTO freed;
    IF freed IS NOT NULL THEN
        PERFORM orch8_wake_slot_waiter(OLD.concurrency_key, freed);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER instances_free_concurrency_slot AFTER UPDATE OF state ON instances
    FOR EACH ROW
    WHEN (OLD.state = 'running' AND NEW.state <> 'running' AND OLD.concurrency_key IS NOT NULL)
    EXECUTE FUNCTION orch8_free_concurrency_slot();

CREATE TRIGGER instances_free_concurrency_slot_on_delete AFTER DELETE ON instances
    FOR EACH ROW
    WHEN (OLD.state = 'running' AND OLD.concurrency_key IS NOT NULL)
    EXECUTE FUNCTION orch8_free_concurrency_slot();

-- A woken waiter that ends without being claimed (cancelled) passes the wake-up on, so a
-- free slot is never left idle with waiters parked behind it.
CREATE FUNCTION orch8_pass_slot_wake() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM orch8_wake_slot_waiter(OLD.concurrency_key, 0);
    RETURN NULL;
END
$$;

CREATE TRIGGER instances_pass_slot_wake AFTER UPDATE OF state ON instances
    FOR EACH ROW
    WHEN (OLD.state = 'scheduled' AND NEW.state IN ('completed', 'failed', 'cancelled')
          AND OLD.concurrency_key IS NOT NULL AND NOT OLD.waiting_for_slot)
    EXECUTE FUNCTION orch8_pass_slot_wake();

CREATE TRIGGER instances_pass_slot_wake_on_delete AFTER DELETE ON instances
    FOR EACH ROW
    WHEN (OLD.state = 'scheduled' AND OLD.concurrency_key IS NOT NULL
          AND NOT OLD.waiting_for_slot)
    EXECUTE FUNCTION orch8_pass_slot_wake();

-- A key's slots exist before any claim needs them: created with its first instance, and
-- extended when an instance carries a larger max_concurrency (new slots wake waiters).
-- Slots are always added as a whole range, so the top one existing means all do.
CREATE FUNCTION orch8_add_concurrency_slots() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    top integer := coalesce(NEW.max_concurrency, 1);
    added integer;
BEGIN
    IF EXISTS (SELECT 1 FROM concurrency_slots
               WHERE concurrency_key = NEW.concurrency_key AND slot = top) THEN
        RETURN NULL;
    END IF;
    FOR added IN
        INSERT INTO concurrency_slots (concurrency_key, slot)
        SELECT NEW.concurrency_key, g FROM generate_series(1, top) AS g
        ON CONFLICT DO NOTHING
        RETURNING slot
    LOOP
        PERFORM orch8_wake_slot_waiter(NEW.concurrency_key, added);
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER instances_add_concurrency_slots AFTER INSERT ON instances
    FOR EACH ROW WHEN (NEW.concurrency_key IS NOT NULL)
    EXECUTE FUNCTION orch8_add_concurrency_slots();

-- The invariant, enforced: a keyed instance is running only while it holds a slot. Only
-- the claim statement sets `running`, and it takes the slot in the same statement.
CREATE FUNCTION orch8_check_concurrency_slot() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM concurrency_slots WHERE instance_id = NEW.id) THEN
        RAISE EXCEPTION 'instance % of concurrency key % is running without a slot',
            NEW.id, NEW.concurrency_key
            USING HINT = 'keyed instances are started by the claim statement only';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER instances_check_concurrency_slot AFTER UPDATE OF state ON instances
    FOR EACH ROW
    WHEN (NEW.state = 'running' AND OLD.state <> 'running' AND NEW.concurrency_key IS NOT NULL)
    EXECUTE FUNCTION orch8_check_concurrency_slot();

------------------------------------------------------------------------------------------
-- Rate limits: at most max_calls handler calls in any window_ms, across the cluster.
--
-- A limit of N calls has N slot rows holding the time each was last used. A call may take
-- a slot only if that use is at least a window old, and then stamps it with now(): each
-- slot is used at most once per window, so any window holds at most N calls. This is a
-- sliding window (no fixed boundaries, so no 2x burst across one).
------------------------------------------------------------------------------------------

CREATE TABLE rate_limits (
    handler     text        PRIMARY KEY CHECK (handler ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$'),
    max_calls   integer     NOT NULL CHECK (max_calls BETWEEN 1 AND 100000),
    window_ms   integer     NOT NULL CHECK (window_ms BETWEEN 10 AND 86400000),
    -- Where the next deferred call is booked: deferred steps are spread one call interval
    -- (window / max_calls) apart instead of all waking at the same instant.
    next_wake   timestamptz NOT NULL DEFAULT 'epoch',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE rate_limit_slots (
    handler     text        NOT NULL REFERENCES rate_limits (handler) ON DELETE CASCADE,
    slot        integer     NOT NULL CHECK (slot >= 0),
    last_call   timestamptz NOT NULL DEFAULT 'epoch',
    PRIMARY KEY (handler, slot)
);

-- A call takes the least recently used slot.
CREATE INDEX rate_limit_slots_oldest ON rate_limit_slots (handler, last_call);
