-- 10_schema: connection, run bookkeeping, cursors and key tables.
-- tenant_id and gym_id lead every key (design.md §3): no global unique index on a
-- vendor id, and the layout stays ready to distribute by tenant_id.

-- Public halves of the master keys API keys are sealed to.  Global configuration,
-- not tenant data: the only tables without tenant_id are this one and the entity
-- registry.
CREATE TABLE ironwod.master_keys (
    key_id      text PRIMARY KEY CHECK (key_id ~ '^[A-Za-z0-9._-]{1,64}$'),
    public_key  bytea NOT NULL CHECK (length(public_key) = 32),
    is_active   boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE ironwod.master_keys IS 'X25519 public keys API keys are sealed to; private halves come only from ironwod.master_key_command in run workers';

CREATE TABLE ironwod.integrations_wodify_connection (
    tenant_id            uuid NOT NULL,
    gym_id               uuid NOT NULL,
    status               text NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'connected', 'error', 'paused', 'disconnected')),
    api_key_ciphertext   bytea,
    master_key_id        text,
    api_key_fingerprint  text,
    -- ironwod_rotate_key: a validated successor waiting for the running run,
    -- which keeps the old key, to end (sql/modules/55_rotation.sql)
    next_api_key_ciphertext  bytea,
    next_master_key_id       text,
    next_api_key_fingerprint text,
    key_rotated_at       timestamptz,
    connected_at         timestamptz,
    last_success_at      timestamptz,
    last_error_at        timestamptz,
    last_error           text,
    last_error_code      text,
    last_cursor_at       timestamptz,
    sync_window_days     integer NOT NULL DEFAULT 60 CHECK (sync_window_days BETWEEN 1 AND 730),
    -- circuit breaker
    consecutive_failures integer NOT NULL DEFAULT 0,
    breaker_opened_at    timestamptz,
    next_retry_at        timestamptz,
    -- schedule
    nightly_local_time   time NOT NULL DEFAULT '02:00',
    reconcile_weekday    integer NOT NULL DEFAULT 0 CHECK (reconcile_weekday BETWEEN 0 AND 6),
    time_zone            text,
    backfill_completed_at timestamptz,
    -- ironwod_pause: when, and by whom; status is 'paused' meanwhile
    paused_at            timestamptz,
    paused_by            text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, gym_id),
    CHECK (status = 'disconnected' OR api_key_ciphertext IS NOT NULL OR status = 'error')
);
COMMENT ON TABLE ironwod.integrations_wodify_connection IS 'One Wodify connection per (tenant, gym): sealed key, status, circuit breaker, schedule';

CREATE SEQUENCE ironwod.sync_run_id_seq;

CREATE TABLE ironwod.sync_runs (
    tenant_id        uuid NOT NULL,
    gym_id           uuid NOT NULL,
    run_id           bigint NOT NULL DEFAULT nextval('ironwod.sync_run_id_seq'),
    mode             text NOT NULL CHECK (mode IN ('validate', 'backfill', 'incremental', 'reconcile')),
    -- deferred: stopped by Wodify's monthly quota; retried next month, not a failure
    status           text NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'deferred')),
    requested_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    requested_by     text NOT NULL DEFAULT session_user,
    started_at       timestamptz,
    finished_at      timestamptz,
    heartbeat_at     timestamptz,
    worker_pid       integer,
    launch_attempts  integer NOT NULL DEFAULT 0,
    phase            text,
    -- every HTTP attempt of the run, by how it ended: the sums of its entities'
    -- (ironwod.count_requests); requests is their sum, retries the attempts
    -- that followed a backoff
    attempts_2xx     integer NOT NULL DEFAULT 0,
    attempts_429     integer NOT NULL DEFAULT 0,
    attempts_4xx     integer NOT NULL DEFAULT 0,
    attempts_5xx     integer NOT NULL DEFAULT 0,
    attempts_network integer NOT NULL DEFAULT 0,    -- resets, timeouts, truncated or unparsable bodies
    attempts_envelope integer NOT NULL DEFAULT 0,   -- HTTP 200 carrying a Wodify HTTPCode error
    requests         integer NOT NULL GENERATED ALWAYS AS
                     (attempts_2xx + attempts_429 + attempts_4xx + attempts_5xx + attempts_network
                      + attempts_envelope) STORED,
    retries          integer NOT NULL DEFAULT 0,
    token_wait_s     double precision NOT NULL DEFAULT 0,
    backoff_s        double precision NOT NULL DEFAULT 0,
    bytes_received   bigint NOT NULL DEFAULT 0,
    -- the worker's private memory at its peak while fetching and landing a page
    -- (an upper bound, src/observe.c), and the largest response body it landed
    peak_memory_bytes  bigint,
    largest_page_bytes bigint,
    cursor_start     jsonb,
    cursor_end       jsonb,
    error_code       text,
    last_error       text,
    failed_phase     text,
    PRIMARY KEY (tenant_id, gym_id, run_id),
    FOREIGN KEY (tenant_id, gym_id) REFERENCES ironwod.integrations_wodify_connection
);
COMMENT ON TABLE ironwod.sync_runs IS 'One row per sync run (ingest_run_id = run_id); the queue the supervisor serves';
-- At most one queued or running run per connection: ticks and concurrent calls
-- cannot pile up work (pg_cron's one-pending-run rule).
CREATE UNIQUE INDEX sync_runs_one_active ON ironwod.sync_runs (tenant_id, gym_id)
    WHERE status IN ('queued', 'running');
CREATE INDEX sync_runs_by_id ON ironwod.sync_runs (run_id);
CREATE INDEX sync_runs_active ON ironwod.sync_runs (requested_at) WHERE status IN ('queued', 'running');
CREATE INDEX sync_runs_finished ON ironwod.sync_runs (finished_at);

CREATE TABLE ironwod.sync_run_entities (
    tenant_id     uuid NOT NULL,
    gym_id        uuid NOT NULL,
    run_id        bigint NOT NULL,
    entity        text NOT NULL,
    status        text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'completed')),
    -- the entity's units of work (ironwod.run_units): planned once when the
    -- entity starts (NULL until then), done by this run, and skipped because
    -- an earlier run of the backfill campaign had checkpointed them
    units_total   integer,
    units_done    integer NOT NULL DEFAULT 0,
    units_skipped integer NOT NULL DEFAULT 0,
    plan_ms       double precision,
    pages         integer NOT NULL DEFAULT 0,
    -- every HTTP attempt to the entity's endpoint, by how it ended (a run's
    -- key validation counts as locations'); requests is their sum, retries the
    -- attempts that followed a backoff
    attempts_2xx      integer NOT NULL DEFAULT 0,
    attempts_429      integer NOT NULL DEFAULT 0,
    attempts_4xx      integer NOT NULL DEFAULT 0,
    attempts_5xx      integer NOT NULL DEFAULT 0,
    attempts_network  integer NOT NULL DEFAULT 0,   -- resets, timeouts, truncated or unparsable bodies
    attempts_envelope integer NOT NULL DEFAULT 0,   -- HTTP 200 carrying a Wodify HTTPCode error
    requests      integer NOT NULL GENERATED ALWAYS AS
                  (attempts_2xx + attempts_429 + attempts_4xx + attempts_5xx + attempts_network
                   + attempts_envelope) STORED,
    retries       integer NOT NULL DEFAULT 0,
    token_wait_s      double precision NOT NULL DEFAULT 0,
    backoff_s         double precision NOT NULL DEFAULT 0,
    bytes_received    bigint NOT NULL DEFAULT 0,
    pulled        integer NOT NULL DEFAULT 0,
    new_versions  integer NOT NULL DEFAULT 0,
    unchanged     integer NOT NULL DEFAULT 0,
    -- canonical rows the run's transform wrote for the entity (changed rows only)
    transformed   integer NOT NULL DEFAULT 0,
    deleted       integer NOT NULL DEFAULT 0,
    -- records of the entity's pages that could not be stored and went to
    -- ironwod.quarantined_records instead (counted in pulled, not in unchanged)
    quarantined   integer NOT NULL DEFAULT 0,
    -- API latency of the pages' successful requests: counts per bucket with upper
    -- bounds 50, 100, 250, 500, 1000, 2500, 5000 ms and above (ironwod.latency_buckets())
    latency_hist  integer[] NOT NULL DEFAULT '{0,0,0,0,0,0,0,0}',
    latency_ms    double precision NOT NULL DEFAULT 0,
    -- newest vendor timestamp (entities.watermark_path) of the records this run
    -- landed: the entity's next watermark when its pull completes
    max_watermark timestamptz,
    cursor_start  timestamptz,
    cursor_end    timestamptz,
    started_at    timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz,
    PRIMARY KEY (tenant_id, gym_id, run_id, entity),
    FOREIGN KEY (tenant_id, gym_id, run_id) REFERENCES ironwod.sync_runs ON DELETE CASCADE
);
COMMENT ON TABLE ironwod.sync_run_entities IS 'Per-run, per-entity counts: pulled, new payload versions, unchanged, transformed, deleted, quarantined';

-- The units of work of a run, planned once per entity when the entity starts
-- (ironwod.plan_entity) and consumed in ordinal order: a month of invoices, one
-- client's sign-ins, a full list.  A unit is done in the transaction that lands
-- its last page.  Units a backfill campaign had already checkpointed are planned
-- as 'skipped', so the counts of a resumed backfill stay complete.
CREATE TABLE ironwod.run_units (
    tenant_id      uuid NOT NULL,
    gym_id         uuid NOT NULL,
    run_id         bigint NOT NULL,
    entity         text NOT NULL,
    ordinal        integer NOT NULL,
    entity_ordinal integer NOT NULL,
    window_key     text NOT NULL,
    url            text NOT NULL,
    -- skipped: checkpointed by an earlier run of the backfill campaign;
    -- not_entitled: Wodify refused the entity (403) while this run fetched it
    status         text NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'done', 'skipped', 'not_entitled')),
    pages          integer NOT NULL DEFAULT 0,
    done_at        timestamptz,
    PRIMARY KEY (tenant_id, gym_id, run_id, entity, ordinal),
    UNIQUE (tenant_id, gym_id, run_id, entity, window_key),
    FOREIGN KEY (tenant_id, gym_id, run_id) REFERENCES ironwod.sync_runs ON DELETE CASCADE
);
COMMENT ON TABLE ironwod.run_units IS 'Units of work of a run (window key, relative URL), planned once per entity and consumed in order';
-- The next unit of a run is one probe of this index, however many are done.
CREATE INDEX run_units_pending ON ironwod.run_units (tenant_id, gym_id, run_id, entity_ordinal, ordinal)
    WHERE status = 'pending';

-- Completed work units of the backfill campaign ([window_start, window_end)
-- months, one client's sign-ins, or a full list): a restarted backfill skips
-- them, and a backfill that finishes clears them so the next one pulls
-- everything again.  Incremental and reconciliation runs are not resumed (the
-- next one plans afresh), so they keep no checkpoints.
CREATE TABLE ironwod.backfill_checkpoints (
    tenant_id      uuid NOT NULL,
    gym_id         uuid NOT NULL,
    entity         text NOT NULL,
    window_key     text NOT NULL,
    window_start   timestamptz,
    window_end     timestamptz,
    pages          integer NOT NULL,
    records        integer NOT NULL,
    completed_by   bigint NOT NULL,
    completed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, gym_id, entity, window_key),
    FOREIGN KEY (tenant_id, gym_id) REFERENCES ironwod.integrations_wodify_connection
);
COMMENT ON TABLE ironwod.backfill_checkpoints IS 'Backfill work units already landed; makes a killed backfill resumable';

CREATE TABLE ironwod.entity_cursors (
    tenant_id    uuid NOT NULL,
    gym_id       uuid NOT NULL,
    entity       text NOT NULL,
    watermark    timestamptz,
    updated_by   bigint NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, gym_id, entity),
    FOREIGN KEY (tenant_id, gym_id) REFERENCES ironwod.integrations_wodify_connection
);
COMMENT ON TABLE ironwod.entity_cursors IS 'Per-entity watermark: the newest vendor timestamp landed by a clean pull';

CREATE TABLE ironwod.sync_events (
    tenant_id   uuid NOT NULL,
    gym_id      uuid NOT NULL,
    event_id    bigint GENERATED ALWAYS AS IDENTITY,
    run_id      bigint,
    event       text NOT NULL,
    entity      text,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    detail      jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (tenant_id, gym_id, event_id)
);
COMMENT ON TABLE ironwod.sync_events IS 'Structured events wodify.sync.*; NOTIFY ironwod_events carries only their event_id';

-- Entities Wodify refuses (403) for this connection while others work: the gym's
-- plan does not include them.  Skipped by incremental runs, retried by the weekly
-- reconciliation.
CREATE TABLE ironwod.entity_entitlements (
    tenant_id          uuid NOT NULL,
    gym_id             uuid NOT NULL,
    entity             text NOT NULL,
    not_entitled_since timestamptz NOT NULL DEFAULT now(),
    last_checked_run   bigint NOT NULL,
    PRIMARY KEY (tenant_id, gym_id, entity),
    FOREIGN KEY (tenant_id, gym_id) REFERENCES ironwod.integrations_wodify_connection
);
COMMENT ON TABLE ironwod.entity_entitlements IS 'Entities the gym''s Wodify plan does not include (403 on that endpoint only)';

-- Records that vanished from a fully re-pulled reconciliation window.  Raw rows
-- stay as they were (what the vendor once said); canonical rows are soft-deleted
-- from this table.  A record seen again is removed from it.
CREATE TABLE ironwod.vanished_records (
    tenant_id        uuid NOT NULL,
    gym_id           uuid NOT NULL,
    entity           text NOT NULL,
    wodify_id        bigint NOT NULL,
    vanished_by_run  bigint NOT NULL,
    vanished_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, gym_id, entity, wodify_id),
    FOREIGN KEY (tenant_id, gym_id) REFERENCES ironwod.integrations_wodify_connection
);
COMMENT ON TABLE ironwod.vanished_records IS 'Records absent from a complete reconciliation pull of their window (soft deletes)';

-- Poison records: elements of a page's records array PostgreSQL cannot store (a
-- \u0000 escape, a broken surrogate, invalid UTF-8, a number numeric cannot hold,
-- over ironwod.max_record_bytes, no numeric id, not an object; src/page.c).  The
-- rest of the page lands; the record waits here, byte for byte, keyed by the
-- hash of its bytes (it may have no readable id).  A later run that fetches it
-- again only refreshes last_seen; it leaves when its id lands cleanly (the
-- vendor fixed it), or, without an id, when a later complete pull of its full
-- list no longer contains it.
CREATE TABLE ironwod.quarantined_records (
    tenant_id         uuid NOT NULL,
    gym_id            uuid NOT NULL,
    entity            text NOT NULL,
    raw_hash          bytea NOT NULL,    -- SHA-256 of raw
    wodify_id         bigint,            -- NULL when the record has no readable id
    reason            text NOT NULL
                      CHECK (reason IN ('nul', 'bad_escape', 'invalid_utf8', 'bad_number', 'too_large',
                                        'no_id', 'not_object')),
    raw               bytea NOT NULL,    -- the element's bytes as the vendor sent them
    window_key        text NOT NULL,     -- the unit of work whose page held it
    first_seen_run_id bigint NOT NULL,
    last_seen_run_id  bigint NOT NULL,
    first_seen_at     timestamptz NOT NULL,
    last_seen_at      timestamptz NOT NULL,
    times_seen        integer NOT NULL DEFAULT 1,
    PRIMARY KEY (tenant_id, gym_id, entity, raw_hash),
    FOREIGN KEY (tenant_id, gym_id) REFERENCES ironwod.integrations_wodify_connection
);
COMMENT ON TABLE ironwod.quarantined_records IS 'Records a page held that PostgreSQL cannot store: raw bytes, reason, id if readable; retried by every run that fetches them again';
CREATE INDEX quarantined_records_by_id ON ironwod.quarantined_records (tenant_id, gym_id, entity, wodify_id);
