-- The engine's core tables: sequences, instances, step outputs, cluster nodes.
-- Forward-only: once applied anywhere, this file is never edited; changes go in a new file.

-- A workflow definition. A new definition under an existing name is the next version;
-- instances pin the version they started on, so a definition row is never updated.
CREATE TABLE sequences (
    name        text        NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$'),
    version     integer     NOT NULL CHECK (version >= 1),
    steps       jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

CREATE TABLE instances (
    id                  uuid        PRIMARY KEY,
    sequence_name       text        NOT NULL,
    sequence_version    integer     NOT NULL,
    state               text        NOT NULL DEFAULT 'scheduled'
        CHECK (state IN ('scheduled', 'running', 'completed', 'failed', 'cancelled')),
    -- 0 low, 1 normal, 2 high, 3 critical: claimed highest first.
    priority            smallint    NOT NULL DEFAULT 1 CHECK (priority BETWEEN 0 AND 3),
    next_fire_at        timestamptz NOT NULL DEFAULT now(),
    input               jsonb       NOT NULL DEFAULT '{}',
    step_index          integer     NOT NULL DEFAULT 0 CHECK (step_index >= 0),
    -- Attempts already made at the current step; reset when the instance moves on.
    attempt             integer     NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    -- True once the current step's delay_ms has been waited out.
    delay_done          boolean     NOT NULL DEFAULT false,
    concurrency_key     text,
    max_concurrency     integer     CHECK (max_concurrency >= 1),
    idempotency_key     text        UNIQUE,
    -- The claim. claim_epoch rises at every claim and every release; every write made
    -- under a claim names the epoch it holds and applies only while it is unchanged.
    claimed_by          text,
    claim_incarnation   uuid,
    claimed_slot        integer,
    claim_epoch         bigint      NOT NULL DEFAULT 0,
    claimed_at          timestamptz,
    last_error          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz,
    FOREIGN KEY (sequence_name, sequence_version) REFERENCES sequences (name, version)
);

-- The claim reads this index in order (priority DESC, next_fire_at) and stops at LIMIT;
-- it holds scheduled rows only, so finished history never slows the claim down.
CREATE INDEX instances_claim_order ON instances (priority DESC, next_fire_at)
    WHERE state = 'scheduled';
-- Releasing a dead node's or worker's claims finds them without scanning history.
CREATE INDEX instances_running_by_incarnation ON instances (claim_incarnation, claimed_slot)
    WHERE state = 'running';
CREATE INDEX instances_by_sequence ON instances (sequence_name, id);
CREATE INDEX instances_by_state ON instances (state, id);
CREATE INDEX instances_by_concurrency_key ON instances (concurrency_key, id)
    WHERE concurrency_key IS NOT NULL;

-- One recorded outcome per (instance, step): the primary key is what makes a step's
-- outcome land once even when its handler ran twice.
CREATE TABLE step_outputs (
    instance_id uuid        NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    step_id     text        NOT NULL,
    output      jsonb       NOT NULL,
    attempt     integer     NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, step_id)
);

-- A node is one supervisor and its workers. The incarnation is new at every start, so a
-- node restarted under a fixed id is never mistaken for its previous life.
CREATE TABLE cluster_nodes (
    id                  text        PRIMARY KEY,
    incarnation         uuid        NOT NULL UNIQUE,
    hostname            text        NOT NULL,
    pid                 integer     NOT NULL,
    workers             integer     NOT NULL,
    state               text        NOT NULL DEFAULT 'active'
        CHECK (state IN ('active', 'draining', 'dead')),
    started_at          timestamptz NOT NULL DEFAULT now(),
    last_heartbeat      timestamptz NOT NULL DEFAULT now(),
    drain_requested_at  timestamptz,
    -- Counters the node reports at each heartbeat (claimed, completed, ...).
    stats               jsonb       NOT NULL DEFAULT '{}'
);

-- Wake idle workers when work arrives; polling stays the source of truth.
CREATE FUNCTION orch8_notify_work() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('orch8_work', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER instances_notify_work AFTER INSERT ON instances
    FOR EACH STATEMENT EXECUTE FUNCTION orch8_notify_work();
