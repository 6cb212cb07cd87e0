-- ironwod install script, assembled from sql/modules/*.sql in file-name order.
-- 00_guard: refuse to install where the background workers cannot serve us, and
-- create the three roles the tenancy model is built on.

\echo Use "CREATE EXTENSION ironwod" to load this file. \quit

DO $guard$
BEGIN
    -- ironwod.database_name only exists when the library was preloaded (its GUCs are
    -- defined in _PG_init), so a NULL here means shared_preload_libraries lacks us.
    IF current_setting('ironwod.database_name', true) IS NULL THEN
        RAISE EXCEPTION 'ironwod must be loaded via shared_preload_libraries'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Add ironwod to shared_preload_libraries in postgresql.conf and restart the server.';
    END IF;
    -- Also what a restore under another database name meets first (pg_restore
    -- runs CREATE EXTENSION): the hint gives the whole procedure.
    IF current_setting('ironwod.database_name') <> current_database() THEN
        RAISE EXCEPTION 'ironwod can only be installed in database "%", not in "%"',
                        current_setting('ironwod.database_name'), current_database()
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'The ironwod supervisor serves the one database named by ironwod.database_name.',
                  HINT = format('To install or restore ironwod in this database, set ironwod.database_name = %L in postgresql.conf, restart the server, and run CREATE EXTENSION (or pg_restore) again.',
                                current_database());
    END IF;
END
$guard$;

-- Roles are cluster-wide and outlive the extension; create them only when missing.
-- ironwod_worker needs LOGIN on PostgreSQL 15 for background workers to connect as
-- it; it has no password, and the README shows the pg_hba.conf line that rejects it.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ironwod_app') THEN
        CREATE ROLE ironwod_app NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ironwod_admin') THEN
        CREATE ROLE ironwod_admin NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ironwod_worker') THEN
        CREATE ROLE ironwod_worker LOGIN;
    END IF;
END
$roles$;

-- Pin off the logging settings that could copy statement text or bind parameters
-- (and with them an API key) into the server log for sessions of these roles.
ALTER ROLE ironwod_app SET log_statement = 'none';
ALTER ROLE ironwod_app SET log_min_duration_statement = -1;
ALTER ROLE ironwod_app SET log_parameter_max_length = 0;
ALTER ROLE ironwod_app SET log_parameter_max_length_on_error = 0;
ALTER ROLE ironwod_worker SET log_statement = 'none';
ALTER ROLE ironwod_worker SET log_min_duration_statement = -1;
ALTER ROLE ironwod_worker SET log_parameter_max_length = 0;
ALTER ROLE ironwod_worker SET log_parameter_max_length_on_error = 0;

CREATE SCHEMA ironwod;
COMMENT ON SCHEMA ironwod IS 'ironwod storage and internal functions; the ironwod_* API lives in the schema the extension was created in';
-- 05_native: SQL declarations of the C functions in src/sqlfuncs.c.

CREATE FUNCTION ironwod.preloaded() RETURNS boolean
LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'ironwod_preloaded';
COMMENT ON FUNCTION ironwod.preloaded() IS 'True when the library was preloaded and its shared memory exists; raises 55000 otherwise';

CREATE FUNCTION ironwod.wake() RETURNS void
LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'ironwod_wake';
COMMENT ON FUNCTION ironwod.wake() IS 'Wake the supervisor when the current transaction commits';

CREATE FUNCTION ironwod.wait_for_change(p_timeout_ms integer) RETURNS void
LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'ironwod_wait_for_change';
COMMENT ON FUNCTION ironwod.wait_for_change(integer) IS 'Sleep until some run changes state or the timeout passes (at most the given milliseconds)';

CREATE FUNCTION ironwod.note_queued_run(p_run_id bigint) RETURNS void
LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'ironwod_note_queued_run';
COMMENT ON FUNCTION ironwod.note_queued_run(bigint) IS 'Remember, for the rest of this transaction, that it queued the run (ironwod_wait refuses to wait for it)';

CREATE FUNCTION ironwod.run_queued_here(p_run_id bigint) RETURNS boolean
LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'ironwod_run_queued_here';
COMMENT ON FUNCTION ironwod.run_queued_here(bigint) IS 'True when the current transaction queued the run, so it cannot start before this transaction commits';

CREATE FUNCTION ironwod.sealed_key_id(p_sealed bytea) RETURNS text
LANGUAGE c STRICT IMMUTABLE AS 'MODULE_PATHNAME', 'ironwod_sealed_key_id';
COMMENT ON FUNCTION ironwod.sealed_key_id(bytea) IS 'Master key id a sealed API key was sealed to; raises 22023 when the blob is malformed';

CREATE FUNCTION ironwod.seal_key(p_tenant_id uuid, p_gym_id uuid, p_api_key text) RETURNS bytea
LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'ironwod_seal_key';
COMMENT ON FUNCTION ironwod.seal_key(uuid, uuid, text) IS 'Seal a plaintext API key to the active master public key, bound to (tenant, gym); refused (0A000) unless ironwod.allow_plaintext_keys is on';

CREATE FUNCTION ironwod.admit_plaintext_key() RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ironwod_admit_plaintext_key';
COMMENT ON FUNCTION ironwod.admit_plaintext_key() IS 'Hide the current statement from pg_stat_activity (it passed a plaintext API key), then raise 0A000 unless ironwod.allow_plaintext_keys is on';

CREATE FUNCTION ironwod.validate_sealed_key(p_tenant_id uuid, p_gym_id uuid, p_sealed bytea,
                                            OUT verdict text, OUT http_status integer,
                                            OUT fingerprint text, OUT message text,
                                            OUT attempts bigint[])
RETURNS record
LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'ironwod_validate_sealed_key';
COMMENT ON FUNCTION ironwod.validate_sealed_key(uuid, uuid, bytea) IS 'Have a validate worker open the key and call GET /customers/locations, waiting at most ironwod.validate_timeout_ms; verdict valid, rejected, unopenable, keystore or unavailable, and the HTTP attempts it made (ironwod.add_attempts layout)';

CREATE FUNCTION ironwod.run_rewrap_worker() RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ironwod_run_rewrap_worker';
COMMENT ON FUNCTION ironwod.run_rewrap_worker() IS 'Start the rewrap worker, which re-seals every API key sealed to an older master key to the active one, and wait until it exits';

CREATE FUNCTION ironwod.worker_status(OUT run_id bigint, OUT pid integer) RETURNS SETOF record
LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'ironwod_worker_status';
COMMENT ON FUNCTION ironwod.worker_status() IS 'Run workers alive now, from shared memory';

CREATE FUNCTION ironwod.rate_limits(OUT tenant_id uuid, OUT gym_id uuid, OUT tokens double precision,
                                    OUT rate double precision, OUT paused_until timestamptz,
                                    OUT throttled_count bigint) RETURNS SETOF record
LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'ironwod_rate_limits';
COMMENT ON FUNCTION ironwod.rate_limits() IS 'Rate limiter state from shared memory: one row per connection bucket, plus the cluster-wide bucket with NULL tenant_id and gym_id; rate is requests/s after the 429 adaptation, paused_until is set while a 429 pause lasts';

CREATE FUNCTION ironwod.key_command_access(OUT ok boolean, OUT message text, OUT hint text) RETURNS record
LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'ironwod_key_command_access';
COMMENT ON FUNCTION ironwod.key_command_access() IS 'Whether the server''s OS user can run the program ironwod.master_key_command names (exists, directories searchable, executable, readable, not writable by others), without running it; message and hint name cause and fix';

CREATE FUNCTION ironwod.probe_master_key_command(OUT ok boolean, OUT message text, OUT hint text) RETURNS record
LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'ironwod_probe_master_key_command';
COMMENT ON FUNCTION ironwod.probe_master_key_command() IS 'Have a validate worker run ironwod.master_key_command and compare what it prints with the registered master keys (ids and counts only; waits at most ironwod.validate_timeout_ms)';
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
-- 30_registry: the data-driven entity registry and the raw landing tables it names.
-- Paths, records keys, id fields and cursor fields live in rows, so a difference in
-- the live Wodify API is an UPDATE, not a rebuild (wodify-api.md §11).

CREATE TABLE ironwod.entities (
    entity             text PRIMARY KEY,
    ordinal            integer NOT NULL UNIQUE,
    path               text NOT NULL,
    records_key        text NOT NULL,
    id_field           text NOT NULL DEFAULT 'id',
    raw_table          name NOT NULL UNIQUE,
    sort               text,
    backfill_strategy  text NOT NULL CHECK (backfill_strategy IN ('full', 'monthly_windows', 'per_client')),
    window_field       text,
    updated_at_path    text[] NOT NULL,
    created_at_path    text[] NOT NULL,
    -- the vendor timestamp an incremental pull continues from
    watermark_path     text[] NOT NULL,
    -- the search field an incremental pull filters on, when not window_field
    -- (invoices: their updated stamp, so later status and note edits are seen)
    incremental_field  text,
    -- a date field re-scanned for status changes (invoices: payment_due)
    due_field          text,
    page_size          integer NOT NULL DEFAULT 100 CHECK (page_size BETWEEN 1 AND 100),
    -- top-level fields the vendor recomputes from its clock without any change to
    -- the record (a client's days since the last attendance): the payload hash
    -- leaves them out, so they never make a new version, and a stored payload
    -- holds them as of the first sighting of its version
    volatile_fields    text[] NOT NULL DEFAULT '{}',
    enabled            boolean NOT NULL DEFAULT true,
    CHECK ((backfill_strategy = 'full') = (window_field IS NULL)),
    CHECK (path ~ '^/[A-Za-z0-9/_{}.-]*$')
);
COMMENT ON TABLE ironwod.entities IS 'Entity registry: endpoint, records key, id field, backfill strategy and cursor fields, in sync order';

INSERT INTO ironwod.entities
    (entity, ordinal, path, records_key, raw_table, sort, backfill_strategy, window_field,
     updated_at_path, created_at_path, watermark_path, due_field, incremental_field)
VALUES
    ('locations', 10, '/customers/locations', 'locations', 'wodify_raw_locations', 'id', 'full', NULL,
     '{updated,updated_on_datetime}', '{created,created_on_datetime}', '{updated,updated_on_datetime}', NULL, NULL),
    ('programs', 20, '/programs', 'programs', 'wodify_raw_programs', 'id', 'full', NULL,
     '{updated,updated_on_datetime}', '{created,created_on_datetime}', '{updated,updated_on_datetime}', NULL, NULL),
    ('clients', 30, '/clients', 'clients', 'wodify_raw_clients', 'id', 'full', NULL,
     '{updated,updated_on_datetime}', '{created_on,created_on_datetime}', '{updated,updated_on_datetime}', NULL, NULL),
    ('memberships', 40, '/memberships', 'memberships', 'wodify_raw_memberships', 'id', 'full', NULL,
     '{updated,updated_on_datetime}', '{created,created_on_datetime}', '{updated,updated_on_datetime}', NULL, NULL),
    ('membership_holds', 50, '/memberships/holds', 'membership_holds', 'wodify_raw_membership_holds', 'id', 'full', NULL,
     '{updated,updated_on_datetime}', '{created,created_on_datetime}', '{updated,updated_on_datetime}', NULL, NULL),
    ('class_signins', 60, '/clients/{client_id}/classes/sign-ins/search', 'class_sign_ins', 'wodify_raw_class_signins', 'id',
     'per_client', 'utc_class_start_datetime',
     '{updated,updated_on_datetime}', '{created,created_on_datetime}', '{utc_class_start_datetime}', NULL, NULL),
    ('invoices', 70, '/financials/invoices/search', 'invoices', 'wodify_raw_invoices', 'desc_created_on_datetime',
     'monthly_windows', 'created_on_datetime',
     '{updated,updated_on_datetime}', '{created,created_on_datetime}', '{updated,updated_on_datetime}', 'payment_due',
     'updated_on_datetime'),
    ('transactions', 80, '/financials/transactions/search', 'transactions', 'wodify_raw_transactions', 'transaction_date_time',
     'monthly_windows', 'transaction_date_time',
     '{updated,updated_on_datetime}', '{created,created_on_datetime}', '{transaction_date_time}', NULL, NULL);

-- Wodify's volatile fields (wodify-api.md §6.1): on a client, the days since the
-- last attendance, the at-risk flag derived from it, and the current week streak,
-- which drops to 0 when a week passes without a visit, all move every day with no
-- edit (the `updated` block does not); a membership's is_active flips on its start
-- and end dates the same way.  Real attendance still makes a new client version:
-- last_attendance, last_class_sign_in, total_class_sign_ins and highest_weekstreak
-- are not volatile.
UPDATE ironwod.entities SET volatile_fields = CASE entity
        WHEN 'clients' THEN '{days_since_last_attendance,is_at_risk,current_weekstreak}'::text[]
        WHEN 'memberships' THEN '{is_active}'::text[] END
 WHERE entity IN ('clients', 'memberships');

-- One raw table per entity, all of one shape: one row per distinct payload version
-- of a record (keyed by its hash), so re-landing a page only bumps last_seen_run_id.
-- These are the tables landing writes per record, so they have no foreign key to
-- the connection (its per-row check costs a quarter of landing a backfill): only
-- a run of the connection writes here.
DO $raw$
DECLARE
    t name;
BEGIN
    FOR t IN SELECT raw_table FROM ironwod.entities ORDER BY ordinal LOOP
        EXECUTE format($ddl$
            CREATE TABLE ironwod.%1$I (
                tenant_id          uuid NOT NULL,
                gym_id             uuid NOT NULL,
                raw_id             bigint GENERATED ALWAYS AS IDENTITY,
                wodify_id          bigint NOT NULL,
                payload_json       jsonb NOT NULL,
                payload_hash       bytea NOT NULL,
                source_updated_at  timestamptz,
                ingested_at        timestamptz NOT NULL DEFAULT now(),
                ingest_run_id      bigint NOT NULL,
                last_seen_run_id   bigint NOT NULL,
                last_seen_at       timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (tenant_id, gym_id, raw_id),
                UNIQUE (tenant_id, gym_id, wodify_id, payload_hash)
            )$ddl$, t);
        -- In the order of "latest version" (design.md §4), so DISTINCT ON needs no sort.
        EXECUTE format('CREATE INDEX ON ironwod.%I (tenant_id, gym_id, wodify_id, source_updated_at DESC NULLS LAST, raw_id DESC)', t);
        -- lz4 where PostgreSQL has it: payloads over 2 kB (clients) are compressed
        -- at several times pglz's speed.
        IF EXISTS (SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression'
                   AND 'lz4' = ANY (enumvals)) THEN
            EXECUTE format('ALTER TABLE ironwod.%I ALTER COLUMN payload_json SET COMPRESSION lz4', t);
        END IF;
        EXECUTE format('COMMENT ON TABLE ironwod.%I IS %L', t,
                       'Raw Wodify payloads, one row per distinct version of a record');
    END LOOP;
END
$raw$;
-- 30_tenancy: the scope a session acts in, and row-level security on every table.
-- The host app calls ironwod_set_scope(tenant, gym) in each transaction; RLS then
-- admits only rows of that scope, for the app and for the run workers alike.

-- SET LOCAL rather than set_config(): Citus propagates SET LOCAL to its worker
-- nodes, where the shards' RLS policies read the scope, when
-- citus.propagate_set_commands is 'local' -- set here for this transaction only, so
-- host apps need no configuration for it.  This function must not carry a SET
-- clause of its own: PostgreSQL would undo the SET LOCAL when the function returns.
CREATE FUNCTION @extschema@.ironwod_set_scope(p_tenant_id uuid, p_gym_id uuid)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF p_tenant_id IS NULL OR p_gym_id IS NULL THEN
        RAISE EXCEPTION 'tenant and gym must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF current_setting('citus.propagate_set_commands', true) IS NOT NULL THEN
        SET LOCAL citus.propagate_set_commands = 'local';
    END IF;
    EXECUTE format('SET LOCAL ironwod.tenant_id = %L', p_tenant_id);
    EXECUTE format('SET LOCAL ironwod.gym_id = %L', p_gym_id);
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_set_scope(uuid, uuid) IS 'Scope the current transaction to one (tenant, gym); every ironwod read and write is limited to it';

-- After a scoped transaction ends the GUC reads as '' rather than NULL; both mean
-- "no scope", which sees nothing.
CREATE FUNCTION ironwod.scope_tenant() RETURNS uuid
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT NULLIF(current_setting('ironwod.tenant_id', true), '')::uuid $$;
COMMENT ON FUNCTION ironwod.scope_tenant() IS 'Tenant of the current scope, NULL when none is set';

CREATE FUNCTION ironwod.scope_gym() RETURNS uuid
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT NULLIF(current_setting('ironwod.gym_id', true), '')::uuid $$;
COMMENT ON FUNCTION ironwod.scope_gym() IS 'Gym of the current scope, NULL when none is set';

-- Every function that takes (tenant, gym) calls this first: SECURITY DEFINER API
-- functions bypass RLS, so the scope check is theirs to make.
CREATE FUNCTION ironwod.assert_scope(p_tenant_id uuid, p_gym_id uuid)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    PERFORM ironwod.preloaded();
    IF p_tenant_id IS NULL OR p_gym_id IS NULL THEN
        RAISE EXCEPTION 'tenant and gym must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF ironwod.scope_tenant() IS NULL OR ironwod.scope_gym() IS NULL THEN
        RAISE EXCEPTION 'no ironwod scope is set in this transaction'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Call ironwod_set_scope(tenant, gym) in the same transaction first.';
    END IF;
    IF (p_tenant_id, p_gym_id) IS DISTINCT FROM (ironwod.scope_tenant(), ironwod.scope_gym()) THEN
        RAISE EXCEPTION 'tenant % gym % is outside the current ironwod scope', p_tenant_id, p_gym_id
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'A session can only act on the (tenant, gym) set by ironwod_set_scope().';
    END IF;
END
$$;
COMMENT ON FUNCTION ironwod.assert_scope(uuid, uuid) IS 'Raise 42501 unless (tenant, gym) is the scope of the current transaction';

-- RLS on every table, FORCED so the table owner is bound too.  The app and the
-- workers see their scope; admins read every tenant.  Superusers bypass RLS, which
-- is why the supervisor (superuser, never touches tenant data) can serve the queue.
DO $rls$
DECLARE
    t regclass;
BEGIN
    FOR t IN
        SELECT c.oid::regclass
        FROM pg_class c
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id'
        WHERE c.relnamespace = 'ironwod'::regnamespace AND c.relkind = 'r'
    LOOP
        EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', t);
        EXECUTE format($p$CREATE POLICY tenant_scope ON %s TO ironwod_app, ironwod_worker
                          USING (tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym())
                          WITH CHECK (tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym())$p$, t);
        EXECUTE format('CREATE POLICY admin_read ON %s FOR SELECT TO ironwod_admin USING (true)', t);
    END LOOP;
END
$rls$;

-- The two global configuration tables: readable by the ironwod roles, written only
-- by the extension owner and admins.
ALTER TABLE ironwod.master_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE ironwod.master_keys FORCE ROW LEVEL SECURITY;
CREATE POLICY read_keys ON ironwod.master_keys FOR SELECT TO ironwod_app, ironwod_worker, ironwod_admin USING (true);
CREATE POLICY admin_keys ON ironwod.master_keys TO ironwod_admin USING (true) WITH CHECK (true);
ALTER TABLE ironwod.entities ENABLE ROW LEVEL SECURITY;
ALTER TABLE ironwod.entities FORCE ROW LEVEL SECURITY;
CREATE POLICY read_entities ON ironwod.entities FOR SELECT TO ironwod_app, ironwod_worker, ironwod_admin USING (true);
CREATE POLICY admin_entities ON ironwod.entities FOR UPDATE TO ironwod_admin USING (true) WITH CHECK (true);
-- 40_landing: what the run worker does in SQL.  C moves bytes; these functions own
-- the data logic: claiming a run, choosing the next unit of work, landing a page,
-- and finishing or failing the run.  They run as the worker role, under its scope,
-- so RLS binds them like any other caller.

-- Wodify writes datetimes with or without a trailing Z and uses 1900-01-01 for
-- "no value"; a zone-less datetime is UTC.  Anything unparsable (another shape,
-- month 13) is NULL rather than an error: one odd field must not stop a page.
-- In C (src/wire.c) because it runs for every landed record and every transformed
-- row; the landing code calls the same parser directly.
CREATE FUNCTION ironwod.parse_ts(p text) RETURNS timestamptz
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'ironwod_parse_ts';
COMMENT ON FUNCTION ironwod.parse_ts(text) IS 'Wodify datetime text to timestamptz; sentinels and garbage become NULL, zone-less means UTC';

-- Percent-encode a query value once (wodify-api.md §5): everything but unreserved
-- characters, so |, ;, :, ' and spaces are safe inside q=.
CREATE FUNCTION ironwod.urlencode(p text) RETURNS text
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'ironwod_urlencode';
COMMENT ON FUNCTION ironwod.urlencode(text) IS 'Percent-encode a URL query value (RFC 3986 unreserved characters pass)';

CREATE FUNCTION ironwod.is_time_zone(p text) RETURNS boolean
LANGUAGE c STABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'ironwod_is_time_zone';
COMMENT ON FUNCTION ironwod.is_time_zone(text) IS 'Is this a time zone name PostgreSQL knows?';

-- The per-client change detectors as typed columns of the raw client versions,
-- so planning compares them without de-TOASTing any payload.
ALTER TABLE ironwod.wodify_raw_clients
    ADD COLUMN last_class_sign_in timestamptz
        GENERATED ALWAYS AS (ironwod.parse_ts(payload_json ->> 'last_class_sign_in')) STORED,
    ADD COLUMN total_class_sign_ins bigint
        GENERATED ALWAYS AS (CASE WHEN (payload_json ->> 'total_class_sign_ins') ~ '^\d{1,18}$'
                                  THEN (payload_json ->> 'total_class_sign_ins')::bigint END) STORED;
COMMENT ON COLUMN ironwod.wodify_raw_clients.last_class_sign_in IS 'Change detector: the version''s last_class_sign_in (NULL when absent or a sentinel)';
COMMENT ON COLUMN ironwod.wodify_raw_clients.total_class_sign_ins IS 'Change detector: the version''s total_class_sign_ins (NULL when absent or not an integer)';

-- First day of the UTC month that opens the backfill horizon (24 months by default).
CREATE FUNCTION ironwod.backfill_since() RETURNS timestamptz
LANGUAGE sql STABLE
AS $$
    SELECT (date_trunc('month', now() AT TIME ZONE 'UTC')
            - make_interval(months => current_setting('ironwod.backfill_months')::int)) AT TIME ZONE 'UTC'
$$;
COMMENT ON FUNCTION ironwod.backfill_since() IS 'Start of the backfill horizon for financials and attendance: first of the UTC month ironwod.backfill_months ago';

CREATE FUNCTION ironwod.iso_utc(p timestamptz) RETURNS text
LANGUAGE sql STABLE STRICT
AS $$ SELECT to_char(p AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') $$;
COMMENT ON FUNCTION ironwod.iso_utc(timestamptz) IS 'Timestamp in the YYYY-MM-DDTHH:MM:SSZ form Wodify search accepts';

-- Upper bounds (ms) of the API latency histogram buckets in sync_run_entities;
-- the eighth bucket holds everything slower.
CREATE FUNCTION ironwod.latency_buckets() RETURNS double precision[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT '{50,100,250,500,1000,2500,5000}'::double precision[] $$;
COMMENT ON FUNCTION ironwod.latency_buckets() IS 'Upper bounds in ms of the latency histogram buckets (the last bucket is unbounded)';

-- The current version of records of an entity: the latest by source_updated_at,
-- then raw id (design.md §4) -- what "the vendor says now".  For one gym, and for
-- the given Wodify ids only (all of the gym's records when p_ids is NULL);
-- payload_json is NULL unless p_payload (callers that need only ids skip the cost).
CREATE FUNCTION ironwod.latest_raw_versions(p_entity text, p_tenant_id uuid, p_gym_id uuid,
                                            p_ids bigint[] DEFAULT NULL, p_payload boolean DEFAULT true)
RETURNS TABLE (wodify_id bigint, raw_id bigint, payload_hash bytea, payload_json jsonb,
               ingest_run_id bigint, last_seen_run_id bigint)
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    -- A join, not "= ANY": a plan that fits both a few ids (index probes) and a
    -- whole backfill's (one scan).
    RETURN QUERY EXECUTE format(
        'SELECT DISTINCT ON (r.wodify_id) r.wodify_id, r.raw_id, r.payload_hash, %s,
                r.ingest_run_id, r.last_seen_run_id
         FROM ironwod.%I r %s
         WHERE r.tenant_id = $1 AND r.gym_id = $2
         ORDER BY r.wodify_id, r.source_updated_at DESC NULLS LAST, r.raw_id DESC',
        CASE WHEN p_payload THEN 'r.payload_json' ELSE 'NULL::jsonb' END,
        (SELECT e.raw_table FROM ironwod.entities e WHERE e.entity = p_entity),
        CASE WHEN p_ids IS NOT NULL THEN 'JOIN unnest($3) AS i(id) ON i.id = r.wodify_id' ELSE '' END)
    USING p_tenant_id, p_gym_id, p_ids;
END
$$;
COMMENT ON FUNCTION ironwod.latest_raw_versions(text, uuid, uuid, bigint[], boolean) IS 'Latest raw version of records of an entity of one gym: the given Wodify ids, or all when NULL (payload only when asked for)';

CREATE FUNCTION ironwod.latest_raw_versions(p_entity text)
RETURNS TABLE (wodify_id bigint, raw_id bigint, payload_hash bytea, payload_json jsonb,
               ingest_run_id bigint, last_seen_run_id bigint)
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN QUERY SELECT * FROM ironwod.latest_raw_versions(p_entity, ironwod.scope_tenant(), ironwod.scope_gym());
END
$$;
COMMENT ON FUNCTION ironwod.latest_raw_versions(text) IS 'Latest raw version of every record of an entity in the current scope';

-- Events go to a table (for admin tooling) and to NOTIFY (for live listeners).
-- PostgreSQL has no access control on LISTEN: any role that can connect hears
-- every notification on a channel.  So the payload is only the event's opaque
-- id; a subscriber reads the event itself from ironwod.sync_events, where
-- row-level security shows it only its own tenant's and gym's rows.
CREATE FUNCTION ironwod.emit_event(p_run_id bigint, p_event text, p_entity text, p_detail jsonb)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_event_id bigint;
BEGIN
    INSERT INTO ironwod.sync_events (tenant_id, gym_id, run_id, event, entity, detail)
    VALUES (ironwod.scope_tenant(), ironwod.scope_gym(), p_run_id, p_event, p_entity, coalesce(p_detail, '{}'))
    RETURNING event_id INTO v_event_id;
    PERFORM pg_notify('ironwod_events', v_event_id::text);
END
$$;
COMMENT ON FUNCTION ironwod.emit_event(bigint, text, text, jsonb) IS 'Record a wodify.sync.* event and NOTIFY ironwod_events with only its event_id (read the row under RLS)';

-- Mark the run running before any work: a crash always leaves evidence
-- (TimescaleDB's mark-start rule).  Returns the sealed key only to the worker role.
CREATE FUNCTION ironwod.claim_run(p_run_id bigint, p_pid integer)
RETURNS TABLE (mode text, api_key_ciphertext bytea, master_key_id text)
LANGUAGE plpgsql
AS $$
DECLARE
    -- The scope as values, so every statement routes to the tenant's shard on
    -- Citus (the FOR SHARE must).
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_mode text;
    v_now timestamptz := clock_timestamp();
BEGIN
    -- A paused gym starts nothing, even a run queued by a call that raced the pause.
    IF EXISTS (SELECT 1 FROM ironwod.integrations_wodify_connection c
               WHERE c.tenant_id = v_t AND c.gym_id = v_g
                 AND c.status = 'paused') THEN
        UPDATE ironwod.sync_runs r
           SET status = 'cancelled', finished_at = v_now, last_error = 'paused'
         WHERE r.run_id = p_run_id AND r.status = 'queued'
           AND r.tenant_id = v_t AND r.gym_id = v_g;
        IF FOUND THEN
            PERFORM ironwod.log_run(v_t, v_g, p_run_id);
        END IF;
        RETURN;
    END IF;
    UPDATE ironwod.sync_runs r
       SET status = 'running', started_at = v_now, heartbeat_at = v_now,
           worker_pid = p_pid, phase = 'fetch'
     WHERE r.run_id = p_run_id AND r.status = 'queued' AND r.tenant_id = v_t AND r.gym_id = v_g
    RETURNING r.mode INTO v_mode;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.started', NULL, jsonb_build_object('mode', v_mode));
    -- A rotated key left waiting (its run ended without swapping it in) is
    -- swapped in now, before this run takes a key.
    PERFORM ironwod.apply_rotated_key(v_now);
    -- FOR SHARE: a rotation committing meanwhile is waited for and read, so no
    -- run claimed after a rotation commits gets the old key.
    RETURN QUERY
        SELECT v_mode, c.api_key_ciphertext, c.master_key_id
        FROM ironwod.integrations_wodify_connection c
        WHERE c.tenant_id = v_t AND c.gym_id = v_g AND c.status <> 'disconnected'
        FOR SHARE;
END
$$;
COMMENT ON FUNCTION ironwod.claim_run(bigint, integer) IS 'Worker: move a queued run to running and hand back its mode and sealed key';

-- Every unit of work an entity needs in this run, in fetch order, per the table of
-- design.md §4:
--   full lists                     every mode
--   per-client sign-ins            backfill: clients active inside the horizon;
--                                  incremental: clients whose change detectors
--                                  (last_class_sign_in, total_class_sign_ins) moved
--                                  in this run, from their previous last sign-in
--                                  minus the lookback; reconcile: every client
--                                  active in the last sync_window_days
--   windowed financials            backfill: monthly windows, newest first;
--                                  incremental: from the watermark minus the
--                                  lookback, plus the due-date window; reconcile:
--                                  the last sync_window_days (by due date if any)
-- Times come from the run's start.  Called once per entity and run, by
-- plan_entity, which persists the result; linear in the entity's clients.
CREATE FUNCTION ironwod.plan_units(p_run_id bigint, p_entity text)
RETURNS TABLE (window_key text, url text)
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    e ironwod.entities;
    r ironwod.sync_runs;
    v_now timestamptz;
    v_since timestamptz := ironwod.backfill_since();
    v_lookback interval := make_interval(days => current_setting('ironwod.lookback_days')::int);
    v_window interval;
    v_from timestamptz;
    v_sort text;
    v_last_clean bigint;
BEGIN
    SELECT * INTO STRICT e FROM ironwod.entities x WHERE x.entity = p_entity;
    SELECT * INTO STRICT r FROM ironwod.sync_runs x
    WHERE x.tenant_id = v_t AND x.gym_id = v_g AND x.run_id = p_run_id;
    v_now := coalesce(r.started_at, now());
    v_sort := coalesce('&sort=' || ironwod.urlencode(e.sort), '');
    SELECT make_interval(days => c.sync_window_days) INTO STRICT v_window
    FROM ironwod.integrations_wodify_connection c
    WHERE c.tenant_id = v_t AND c.gym_id = v_g;

    IF e.backfill_strategy = 'full' THEN
        RETURN QUERY SELECT 'full'::text, e.path || coalesce('?sort=' || ironwod.urlencode(e.sort), '');

    ELSIF e.backfill_strategy = 'per_client' THEN
        -- The current version of every client, and its version as of the last
        -- clean run (the baseline the change detectors are compared with), by the
        -- version order of design.md §4.  A version landed by a failed run since
        -- then still counts as a change, so nothing is lost to a crash.  Only the
        -- typed detector columns are read, never a payload.
        SELECT coalesce(max(x.run_id), 0) INTO v_last_clean FROM ironwod.sync_runs x
        WHERE x.tenant_id = v_t AND x.gym_id = v_g
          AND x.status = 'succeeded' AND x.mode <> 'validate' AND x.run_id < p_run_id;
        RETURN QUERY
        WITH cur AS (
            SELECT DISTINCT ON (c.wodify_id) c.wodify_id, c.ingest_run_id, c.last_class_sign_in, c.total_class_sign_ins
            FROM ironwod.wodify_raw_clients c
            WHERE c.tenant_id = v_t AND c.gym_id = v_g
            ORDER BY c.wodify_id, c.source_updated_at DESC NULLS LAST, c.raw_id DESC
        ), base AS (
            SELECT DISTINCT ON (c.wodify_id) c.wodify_id, c.last_class_sign_in, c.total_class_sign_ins
            FROM ironwod.wodify_raw_clients c
            WHERE c.tenant_id = v_t AND c.gym_id = v_g AND c.ingest_run_id <= v_last_clean
              AND r.mode = 'incremental'
            ORDER BY c.wodify_id, c.source_updated_at DESC NULLS LAST, c.raw_id DESC
        ), picked AS (
            SELECT v.wodify_id,
                   CASE r.mode
                       WHEN 'backfill' THEN v_since
                       WHEN 'reconcile' THEN greatest(v_since, v_now - v_window)
                       ELSE greatest(v_since, coalesce(b.last_class_sign_in - v_lookback, v_since))
                   END AS since
            FROM cur v
            LEFT JOIN base b ON b.wodify_id = v.wodify_id
            WHERE CASE r.mode
                      WHEN 'backfill' THEN v.last_class_sign_in >= v_since
                      WHEN 'reconcile' THEN v.last_class_sign_in >= greatest(v_since, v_now - v_window)
                      ELSE v.ingest_run_id > v_last_clean
                           AND v.last_class_sign_in IS NOT NULL
                           AND (v.last_class_sign_in IS DISTINCT FROM b.last_class_sign_in
                                OR v.total_class_sign_ins IS DISTINCT FROM b.total_class_sign_ins)
                  END
        )
        SELECT 'client:' || p.wodify_id,
               replace(e.path, '{client_id}', p.wodify_id::text)
               || '?q=' || ironwod.urlencode(e.window_field || '|gte|' || ironwod.iso_utc(p.since)) || v_sort
        FROM picked p ORDER BY p.wodify_id;

    ELSIF r.mode = 'backfill' THEN
        -- The newest window is open-ended, so records stamped ahead of our
        -- clock (vendor clock skew) are not left between windows.
        RETURN QUERY
        SELECT to_char(w AT TIME ZONE 'UTC', 'YYYY-MM'),
               e.path || '?q=' || ironwod.urlencode(
                   e.window_field || '|gte|' || ironwod.iso_utc(w)
                   || CASE WHEN w < date_trunc('month', v_now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                           THEN ';' || e.window_field || '|lt|'
                                || ironwod.iso_utc(((w AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC')
                           ELSE '' END)
               || v_sort
        FROM generate_series(date_trunc('month', v_now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
                             v_since, interval '-1 month') AS w
        ORDER BY w DESC;

    ELSE
        IF r.mode = 'incremental' OR e.due_field IS NULL THEN
            IF r.mode = 'incremental' THEN
                SELECT greatest(v_since, coalesce(c.watermark - v_lookback, v_since)) INTO v_from
                FROM (SELECT NULL::int) x
                LEFT JOIN ironwod.entity_cursors c
                       ON c.tenant_id = v_t AND c.gym_id = v_g AND c.entity = e.entity;
            ELSE
                v_from := greatest(v_since, v_now - v_window);
            END IF;
            RETURN QUERY SELECT 'since'::text,
                e.path || '?q=' || ironwod.urlencode(
                    CASE WHEN r.mode = 'incremental' THEN coalesce(e.incremental_field, e.window_field)
                         ELSE e.window_field END
                    || '|gte|' || ironwod.iso_utc(v_from)) || v_sort;
        END IF;
        IF e.due_field IS NOT NULL THEN
            -- Status changes (Unpaid -> Paid) carry no timestamp we can follow:
            -- re-scan by due date.
            RETURN QUERY SELECT 'due'::text,
                e.path || '?q=' || ironwod.urlencode(e.due_field || '|gte|' || to_char(
                    (v_now AT TIME ZONE 'UTC')::date - CASE WHEN r.mode = 'incremental'
                        THEN current_setting('ironwod.due_window_days')::int
                        ELSE extract(day FROM v_window)::int END, 'YYYY-MM-DD'))
                || '&sort=id';
        END IF;
    END IF;
END
$$;
COMMENT ON FUNCTION ironwod.plan_units(bigint, text) IS 'Worker: derive the units of work (window key, relative URL) an entity needs in a run, per its mode';

-- Entities a run skips: those the gym's plan does not include, except in a
-- reconciliation, which asks again.
CREATE FUNCTION ironwod.entity_skipped(p_run_id bigint, p_entity text) RETURNS boolean
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
BEGIN
    RETURN EXISTS (
        SELECT 1 FROM ironwod.entity_entitlements n
        JOIN ironwod.sync_runs r ON r.tenant_id = n.tenant_id AND r.gym_id = n.gym_id AND r.run_id = p_run_id
        WHERE n.tenant_id = v_t AND n.gym_id = v_g AND r.tenant_id = v_t AND r.gym_id = v_g
          AND n.entity = p_entity AND (r.mode <> 'reconcile' OR n.last_checked_run = p_run_id));
END
$$;
COMMENT ON FUNCTION ironwod.entity_skipped(bigint, text) IS 'Worker: does this run skip the entity (not entitled)?';

-- The entity starts: derive its units once and persist them with the run, in
-- fetch order.  In a backfill, units the campaign already checkpointed (a
-- killed run's) are planned as skipped.  Records the plan's size and how long
-- deriving it took.  Returns the number of units left to fetch.
CREATE FUNCTION ironwod.plan_entity(p_run_id bigint, p_entity text)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_t0 timestamptz := clock_timestamp();
    v_mode text;
    v_ordinal integer;
    v_keys text[];
    v_urls text[];
    v_total integer;
    v_skipped integer;
    v_ms double precision;
BEGIN
    SELECT r.mode INTO STRICT v_mode FROM ironwod.sync_runs r
    WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id = p_run_id;
    SELECT x.ordinal INTO STRICT v_ordinal FROM ironwod.entities x WHERE x.entity = p_entity;
    SELECT coalesce(array_agg(u.window_key ORDER BY u.ord), '{}'), coalesce(array_agg(u.url ORDER BY u.ord), '{}')
    INTO v_keys, v_urls
    FROM ironwod.plan_units(p_run_id, p_entity) WITH ORDINALITY AS u(window_key, url, ord);

    -- ON CONFLICT DO NOTHING (a unit is planned once; nothing conflicts) for
    -- Citus: it runs this INSERT ... SELECT through the coordinator, and without
    -- ON CONFLICT or RETURNING it would COPY the rows into the shard, which
    -- row-level security refuses ("COPY FROM not supported with row-level
    -- security").
    INSERT INTO ironwod.run_units (tenant_id, gym_id, run_id, entity, ordinal, entity_ordinal, window_key, url, status)
    SELECT v_t, v_g, p_run_id, p_entity, u.ord, v_ordinal, u.window_key, u.url,
           CASE WHEN b.window_key IS NULL THEN 'pending' ELSE 'skipped' END
    FROM unnest(v_keys, v_urls) WITH ORDINALITY AS u(window_key, url, ord)
    LEFT JOIN ironwod.backfill_checkpoints b
           ON b.tenant_id = v_t AND b.gym_id = v_g AND b.entity = p_entity
          AND b.window_key = u.window_key AND v_mode = 'backfill'
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_total = ROW_COUNT;
    SELECT count(*) INTO v_skipped FROM ironwod.run_units u
    WHERE u.tenant_id = v_t AND u.gym_id = v_g AND u.run_id = p_run_id AND u.entity = p_entity
      AND u.status = 'skipped';
    v_ms := extract(epoch FROM clock_timestamp() - v_t0) * 1000;

    INSERT INTO ironwod.sync_run_entities AS s (tenant_id, gym_id, run_id, entity, units_total, units_skipped, plan_ms)
    VALUES (v_t, v_g, p_run_id, p_entity, v_total, v_skipped, v_ms)
    ON CONFLICT (tenant_id, gym_id, run_id, entity) DO UPDATE
       SET units_total = excluded.units_total, units_skipped = excluded.units_skipped, plan_ms = excluded.plan_ms;
    RETURN v_total - v_skipped;
END
$$;
COMMENT ON FUNCTION ironwod.plan_entity(bigint, text) IS 'Worker: derive an entity''s units of work once and persist them with the run (run_units); returns how many are left to fetch';

-- The next unit of the run, in entity order then unit order; no row means the
-- run is done.  Entities are planned one at a time, when the previous one has
-- nothing left, so the first pending unit is one index probe.
CREATE FUNCTION ironwod.next_task(p_run_id bigint)
RETURNS TABLE (entity text, window_key text, url text, page_size integer)
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    e record;
BEGIN
    RETURN QUERY
        SELECT u.entity, u.window_key, u.url, x.page_size
        FROM ironwod.run_units u JOIN ironwod.entities x ON x.entity = u.entity
        WHERE u.tenant_id = v_t AND u.gym_id = v_g AND u.run_id = p_run_id AND u.status = 'pending'
        ORDER BY u.entity_ordinal, u.ordinal LIMIT 1;
    IF FOUND THEN
        RETURN;
    END IF;
    -- Nothing pending: start the next entity not yet planned.
    FOR e IN SELECT x.entity, x.page_size FROM ironwod.entities x WHERE x.enabled ORDER BY x.ordinal LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM ironwod.sync_run_entities s
                              WHERE s.tenant_id = v_t AND s.gym_id = v_g AND s.run_id = p_run_id
                                AND s.entity = e.entity AND s.units_total IS NOT NULL);
        CONTINUE WHEN ironwod.entity_skipped(p_run_id, e.entity);
        CONTINUE WHEN ironwod.plan_entity(p_run_id, e.entity) = 0;
        RETURN QUERY
            SELECT u.entity, u.window_key, u.url, e.page_size
            FROM ironwod.run_units u
            WHERE u.tenant_id = v_t AND u.gym_id = v_g AND u.run_id = p_run_id AND u.entity = e.entity
              AND u.status = 'pending'
            ORDER BY u.entity_ordinal, u.ordinal LIMIT 1;
        RETURN;
    END LOOP;
END
$$;
COMMENT ON FUNCTION ironwod.next_task(bigint) IS 'Worker: next unit of work (entity, window key, relative URL) of the run, planning the next entity when the current one is done';

-- An entity's pull finished cleanly: record it and advance its watermark to the
-- newest vendor timestamp this run saw.  Only vendor timestamps: a pull that saw
-- no records leaves the watermark where it was, and records stamped in the
-- future never counted (src/page.c), so no watermark passes now.  Called in the
-- transaction that landed the entity's last page.  A reconciliation also
-- soft-deletes what vanished.
CREATE FUNCTION ironwod.close_entity(p_run_id bigint, p_entity text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_now timestamptz := clock_timestamp();
    e ironwod.entities;
    v_max timestamptz;
    v_watermark timestamptz;
    v_tz text;
BEGIN
    SELECT * INTO STRICT e FROM ironwod.entities x WHERE x.entity = p_entity;
    SELECT s.max_watermark INTO v_max FROM ironwod.sync_run_entities s
     WHERE s.tenant_id = v_t AND s.gym_id = v_g AND s.run_id = p_run_id AND s.entity = p_entity;
    SELECT c.watermark INTO v_watermark FROM ironwod.entity_cursors c
     WHERE c.tenant_id = v_t AND c.gym_id = v_g AND c.entity = p_entity;

    -- Values, not INSERT ... SELECT over the cursors, and the times computed
    -- first: on Citus a single-row insert with constants routes to the tenant's
    -- shard, where ON CONFLICT DO UPDATE may use no volatile function.
    INSERT INTO ironwod.sync_run_entities AS s (tenant_id, gym_id, run_id, entity, status, completed_at, cursor_start, cursor_end)
    VALUES (v_t, v_g, p_run_id, p_entity, 'completed', v_now, v_watermark, greatest(v_watermark, v_max))
    ON CONFLICT (tenant_id, gym_id, run_id, entity) DO UPDATE
       SET status = 'completed', completed_at = excluded.completed_at,
           cursor_start = excluded.cursor_start, cursor_end = excluded.cursor_end;

    IF v_max IS NOT NULL THEN
        INSERT INTO ironwod.entity_cursors AS c (tenant_id, gym_id, entity, watermark, updated_by, updated_at)
        VALUES (v_t, v_g, p_entity, v_max, p_run_id, v_now)
        ON CONFLICT (tenant_id, gym_id, entity) DO UPDATE
           SET watermark = greatest(c.watermark, excluded.watermark), updated_by = p_run_id, updated_at = excluded.updated_at;
    END IF;

    -- A full list this run fetched itself, every page of it: a quarantined record
    -- of it that was not in it any more is gone at the vendor (or fixed there into
    -- a record that landed).  This is how a record without a readable id leaves.
    IF e.backfill_strategy = 'full' AND EXISTS (
           SELECT 1 FROM ironwod.sync_run_entities s
           WHERE s.tenant_id = ironwod.scope_tenant() AND s.gym_id = ironwod.scope_gym()
             AND s.run_id = p_run_id AND s.entity = p_entity AND s.units_done > 0 AND s.units_skipped = 0) THEN
        DELETE FROM ironwod.quarantined_records q
         WHERE q.tenant_id = ironwod.scope_tenant() AND q.gym_id = ironwod.scope_gym()
           AND q.entity = p_entity AND q.last_seen_run_id <> p_run_id;
    END IF;

    -- Pulled cleanly, so the gym's plan includes it (again).
    DELETE FROM ironwod.entity_entitlements n
     WHERE n.tenant_id = ironwod.scope_tenant() AND n.gym_id = ironwod.scope_gym() AND n.entity = p_entity
       AND n.last_checked_run <> p_run_id;

    IF p_entity = 'locations' THEN
        -- The gym's time zone: the first location's (by id), when PostgreSQL knows it.
        -- Read first, then updated: on Citus an UPDATE ... FROM a function that
        -- reads distributed tables would run that function on the shard.
        SELECT x.payload_json ->> 'time_zone_iana' INTO v_tz
        FROM ironwod.latest_raw_versions('locations', v_t, v_g) x
        WHERE x.last_seen_run_id = p_run_id ORDER BY x.wodify_id LIMIT 1;
        IF ironwod.is_time_zone(v_tz) THEN
            UPDATE ironwod.integrations_wodify_connection c
               SET time_zone = v_tz, updated_at = v_now
             WHERE c.tenant_id = v_t AND c.gym_id = v_g;
        END IF;
    END IF;

    IF (SELECT mode FROM ironwod.sync_runs r
        WHERE r.tenant_id = ironwod.scope_tenant() AND r.gym_id = ironwod.scope_gym() AND r.run_id = p_run_id) = 'reconcile' THEN
        PERFORM ironwod.reconcile_deletions(p_run_id, e);
    END IF;
    -- Read first, then passed: on Citus a query on the shard (a routed SELECT
    -- with a subquery) may not call a function that writes distributed tables.
    SELECT c.watermark INTO v_watermark FROM ironwod.entity_cursors c
    WHERE c.tenant_id = v_t AND c.gym_id = v_g AND c.entity = p_entity;
    PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.entity.completed', p_entity,
        jsonb_build_object('watermark', greatest(v_max, v_watermark)));
END
$$;
COMMENT ON FUNCTION ironwod.close_entity(bigint, text) IS 'Worker: mark an entity''s clean pull complete and advance its watermark';

-- Soft-delete what vanished from a fully re-pulled reconciliation window: records
-- whose latest version lies inside the window but were not seen by this run.
-- Only when the pull looks complete: if it saw fewer than
-- ironwod.reconcile_sanity_share of the records the window held before, nothing is
-- deleted and an event says why.
CREATE FUNCTION ironwod.reconcile_deletions(p_run_id bigint, e ironwod.entities)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_pred text;
    v_from timestamptz;
    v_before bigint;
    v_seen bigint;
    v_deleted bigint;
BEGIN
    SELECT greatest(ironwod.backfill_since(), coalesce(r.started_at, now()) - make_interval(days => c.sync_window_days))
    INTO STRICT v_from
    FROM ironwod.sync_runs r
    JOIN ironwod.integrations_wodify_connection c ON c.tenant_id = r.tenant_id AND c.gym_id = r.gym_id
    WHERE r.tenant_id = ironwod.scope_tenant() AND r.gym_id = ironwod.scope_gym() AND r.run_id = p_run_id;

    v_pred := CASE
        WHEN e.backfill_strategy = 'full' THEN 'true'
        WHEN e.due_field IS NOT NULL THEN
            format('(payload_json ->> %L) ~ ''^\d{4}-\d\d-\d\d'' AND (payload_json ->> %L)::date >= %L::date',
                   e.due_field, e.due_field, (v_from AT TIME ZONE 'UTC')::date)
        ELSE format('ironwod.parse_ts(payload_json ->> %L) >= %L::timestamptz', e.window_field, v_from)
    END;

    -- v_pred reads payload_json of the record's latest version.
    EXECUTE format($q$
        SELECT count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM ironwod.vanished_records v
                                                  WHERE v.tenant_id = ironwod.scope_tenant()
                                                    AND v.gym_id = ironwod.scope_gym()
                                                    AND v.entity = $2 AND v.wodify_id = l.wodify_id)),
               (SELECT count(DISTINCT wodify_id) FROM ironwod.%1$I
                WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym() AND last_seen_run_id = $1)
        FROM ironwod.latest_raw_versions($2) l WHERE %2$s$q$, e.raw_table, v_pred)
    INTO v_before, v_seen USING p_run_id, e.entity;

    IF v_seen < v_before * current_setting('ironwod.reconcile_sanity_share')::numeric THEN
        PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.reconcile.deletes_skipped', e.entity,
            jsonb_build_object('seen', v_seen, 'previously', v_before));
        RETURN;
    END IF;

    -- Vanished: inside the window, and no version of it seen by this run.
    EXECUTE format($q$
        INSERT INTO ironwod.vanished_records (tenant_id, gym_id, entity, wodify_id, vanished_by_run)
        SELECT ironwod.scope_tenant(), ironwod.scope_gym(), $2, l.wodify_id, $1
        FROM ironwod.latest_raw_versions($2) l
        WHERE %2$s
          AND NOT EXISTS (SELECT 1 FROM ironwod.%1$I s
                          WHERE s.tenant_id = ironwod.scope_tenant() AND s.gym_id = ironwod.scope_gym()
                            AND s.wodify_id = l.wodify_id AND s.last_seen_run_id = $1)
        ON CONFLICT DO NOTHING$q$, e.raw_table, v_pred)
    USING p_run_id, e.entity;
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    UPDATE ironwod.sync_run_entities s SET deleted = v_deleted
     WHERE s.tenant_id = ironwod.scope_tenant() AND s.gym_id = ironwod.scope_gym()
       AND s.run_id = p_run_id AND s.entity = e.entity;
END
$$;
COMMENT ON FUNCTION ironwod.reconcile_deletions(bigint, ironwod.entities) IS 'Worker: soft-delete records that vanished from a complete reconciliation window';

-- Wodify answered 403 on this entity's endpoint while the key works elsewhere:
-- the gym's plan does not include it.  Recorded, and the run goes on without it.
CREATE FUNCTION ironwod.mark_not_entitled(p_run_id bigint, p_entity text)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO ironwod.entity_entitlements AS n (tenant_id, gym_id, entity, last_checked_run)
    VALUES (ironwod.scope_tenant(), ironwod.scope_gym(), p_entity, p_run_id)
    ON CONFLICT (tenant_id, gym_id, entity) DO UPDATE SET last_checked_run = p_run_id;
    UPDATE ironwod.run_units u SET status = 'not_entitled'
     WHERE u.tenant_id = ironwod.scope_tenant() AND u.gym_id = ironwod.scope_gym() AND u.run_id = p_run_id
       AND u.entity = p_entity AND u.status = 'pending';
    PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.entity.not_entitled', p_entity, '{}');
END
$$;
COMMENT ON FUNCTION ironwod.mark_not_entitled(bigint, text) IS 'Worker: record that the gym''s plan does not include an entity';

-- The HTTP attempts a worker counted (src/observe.c) arrive as one int8[]:
--   {2xx, 429, 4xx, 5xx, network, envelope, retries, bytes, token wait us, backoff us}
-- with every landed page (ironwod.page_statement), and otherwise here: when an
-- entity turns out not entitled, when a validation or the run ends.  They are
-- the entity's (its endpoint's); a run's are the sums of its entities'.
CREATE FUNCTION ironwod.add_attempts(p_run_id bigint, p_entity text, p_counters bigint[])
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
BEGIN
    IF cardinality(p_counters) IS DISTINCT FROM 10 THEN
        RAISE EXCEPTION 'attempt counters must have 10 elements, not %', cardinality(p_counters)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO ironwod.sync_run_entities AS s
        (tenant_id, gym_id, run_id, entity, attempts_2xx, attempts_429, attempts_4xx, attempts_5xx,
         attempts_network, attempts_envelope, retries, bytes_received, token_wait_s, backoff_s)
    VALUES (v_t, v_g, p_run_id, p_entity, p_counters[1], p_counters[2], p_counters[3], p_counters[4],
            p_counters[5], p_counters[6], p_counters[7], p_counters[8],
            p_counters[9] / 1e6, p_counters[10] / 1e6)
    ON CONFLICT (tenant_id, gym_id, run_id, entity) DO UPDATE
       SET attempts_2xx = s.attempts_2xx + excluded.attempts_2xx,
           attempts_429 = s.attempts_429 + excluded.attempts_429,
           attempts_4xx = s.attempts_4xx + excluded.attempts_4xx,
           attempts_5xx = s.attempts_5xx + excluded.attempts_5xx,
           attempts_network = s.attempts_network + excluded.attempts_network,
           attempts_envelope = s.attempts_envelope + excluded.attempts_envelope,
           retries = s.retries + excluded.retries,
           bytes_received = s.bytes_received + excluded.bytes_received,
           token_wait_s = s.token_wait_s + excluded.token_wait_s,
           backoff_s = s.backoff_s + excluded.backoff_s;
END
$$;
COMMENT ON FUNCTION ironwod.add_attempts(bigint, text, bigint[]) IS 'Worker: add HTTP attempt counters {2xx, 429, 4xx, 5xx, network, envelope, retries, bytes, token wait us, backoff us} to a run''s entity';

-- The run worker's peak private memory while it fetched and landed pages, and the
-- largest response body it landed (src/observe.c), written when the run ends.
CREATE FUNCTION ironwod.record_memory(p_run_id bigint, p_peak_bytes bigint, p_largest_page_bytes bigint)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE ironwod.sync_runs r
       SET peak_memory_bytes = greatest(r.peak_memory_bytes, p_peak_bytes),
           largest_page_bytes = greatest(r.largest_page_bytes, p_largest_page_bytes)
     WHERE r.tenant_id = ironwod.scope_tenant() AND r.gym_id = ironwod.scope_gym() AND r.run_id = p_run_id;
END
$$;
COMMENT ON FUNCTION ironwod.record_memory(bigint, bigint, bigint) IS 'Worker: record the run worker''s peak private memory while landing pages and the largest page it landed';

-- A run's attempt counters, summed from its entities, and its heartbeat and phase.
CREATE FUNCTION ironwod.count_requests(p_run_id bigint, p_now timestamptz, p_phase text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v record;
BEGIN
    SELECT coalesce(sum(s.attempts_2xx), 0) AS a2, coalesce(sum(s.attempts_429), 0) AS a429,
           coalesce(sum(s.attempts_4xx), 0) AS a4, coalesce(sum(s.attempts_5xx), 0) AS a5,
           coalesce(sum(s.attempts_network), 0) AS net, coalesce(sum(s.attempts_envelope), 0) AS env,
           coalesce(sum(s.retries), 0) AS retries, coalesce(sum(s.bytes_received), 0) AS bytes,
           coalesce(sum(s.token_wait_s), 0) AS token_wait, coalesce(sum(s.backoff_s), 0) AS backoff
    INTO v
    FROM ironwod.sync_run_entities s WHERE s.tenant_id = v_t AND s.gym_id = v_g AND s.run_id = p_run_id;
    UPDATE ironwod.sync_runs r
       SET attempts_2xx = v.a2, attempts_429 = v.a429, attempts_4xx = v.a4, attempts_5xx = v.a5,
           attempts_network = v.net, attempts_envelope = v.env, retries = v.retries,
           bytes_received = v.bytes, token_wait_s = v.token_wait, backoff_s = v.backoff,
           heartbeat_at = p_now, phase = coalesce(p_phase, r.phase)
     WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id = p_run_id;
END
$$;
COMMENT ON FUNCTION ironwod.count_requests(bigint, timestamptz, text) IS 'Worker: sum a run''s attempt counters (requests by outcome, retries, waits, bytes) from its entities; set its heartbeat and phase';

-- Records of a landed page that cannot be stored (src/page.c) go to quarantine,
-- in the page's transaction: one row per distinct raw element, keyed by its
-- hash, so the same poison fetched again by a later run refreshes last_seen
-- rather than piling up.  $3..$5 are parallel arrays: ids (NULL when
-- unreadable), reasons, raw bytes; p_at is the landing transaction's time.
-- Emits wodify.sync.records.quarantined with counts by reason (no record
-- content).  Returns the number of records quarantined.
CREATE FUNCTION ironwod.quarantine(p_run_id bigint, p_entity text, p_window_key text, p_ids bigint[],
                                   p_reasons text[], p_raw bytea[], p_at timestamptz)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_reasons jsonb;
BEGIN
    INSERT INTO ironwod.quarantined_records AS q
        (tenant_id, gym_id, entity, raw_hash, wodify_id, reason, raw, window_key,
         first_seen_run_id, last_seen_run_id, first_seen_at, last_seen_at)
    SELECT DISTINCT ON (sha256(r.raw))
           v_t, v_g, p_entity, sha256(r.raw), r.wodify_id, r.reason, r.raw, p_window_key,
           p_run_id, p_run_id, p_at, p_at
    FROM unnest(p_ids, p_reasons, p_raw) AS r(wodify_id, reason, raw)
    ORDER BY sha256(r.raw)
    ON CONFLICT (tenant_id, gym_id, entity, raw_hash) DO UPDATE
       SET last_seen_run_id = excluded.last_seen_run_id, last_seen_at = excluded.last_seen_at,
           window_key = excluded.window_key, times_seen = q.times_seen + 1;
    SELECT jsonb_object_agg(x.reason, x.n) INTO v_reasons
    FROM (SELECT r.reason, count(*) AS n FROM unnest(p_reasons) AS r(reason) GROUP BY r.reason) x;
    PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.records.quarantined', p_entity,
        jsonb_build_object('records', cardinality(p_reasons), 'reasons', v_reasons));
    RETURN cardinality(p_reasons);
END
$$;
COMMENT ON FUNCTION ironwod.quarantine(bigint, text, text, bigint[], text[], bytea[], timestamptz) IS 'Worker: put a landed page''s unstorable records (ids, reasons, raw bytes) into ironwod.quarantined_records, or refresh them when seen again';

-- Records that landed cleanly leave quarantine: the vendor fixed them.  The
-- worker runs this only for entities that have quarantined records.
CREATE FUNCTION ironwod.unquarantine(p_entity text, p_ids bigint[]) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    DELETE FROM ironwod.quarantined_records q
     WHERE q.tenant_id = ironwod.scope_tenant() AND q.gym_id = ironwod.scope_gym()
       AND q.entity = p_entity AND q.wodify_id = ANY (p_ids);
END
$$;
COMMENT ON FUNCTION ironwod.unquarantine(text, bigint[]) IS 'Worker: records that landed cleanly leave quarantined_records';

-- The bookkeeping of every landed page, one statement the worker prepares once
-- per run: the entity's counters (pages, attempts, records, new versions), API
-- latency histogram and newest watermark, provided the run is still running (a
-- disconnect stops it here: no row comes back).  Constant time.
-- $1 tenant, $2 gym, $3 run, $4 entity, $5 the attempt counters since the last
-- landed page (ironwod.add_attempts), $6 records, $7 new versions,
-- $8 latency ms (0 when not measured), $9 the page's newest watermark, $10 the
-- latency histogram of this page alone (ironwod.latency_buckets; all zeros when
-- not measured), added bucket by bucket: on Citus the DO UPDATE SET goes to the
-- shard as text, where a parameter it names has no value; $11 the page's records
-- quarantined (counted in pulled, not in unchanged).
CREATE FUNCTION ironwod.page_statement() RETURNS text
LANGUAGE sql IMMUTABLE
AS $s$
    SELECT $q$
        INSERT INTO ironwod.sync_run_entities AS s
            (tenant_id, gym_id, run_id, entity, pages, attempts_2xx, attempts_429, attempts_4xx,
             attempts_5xx, attempts_network, attempts_envelope, retries, bytes_received, token_wait_s,
             backoff_s, pulled, new_versions, unchanged, quarantined, latency_hist, latency_ms, max_watermark)
        SELECT $1, $2, $3, $4, 1, $5[1], $5[2], $5[3], $5[4], $5[5], $5[6], $5[7], $5[8],
               $5[9] / 1e6, $5[10] / 1e6, $6, $7, $6 - $7 - $11, $11, $10, $8, $9
        FROM ironwod.sync_runs r
        WHERE r.tenant_id = $1 AND r.gym_id = $2 AND r.run_id = $3 AND r.status = 'running'
        ON CONFLICT (tenant_id, gym_id, run_id, entity) DO UPDATE
           SET pages = s.pages + 1,
               attempts_2xx = s.attempts_2xx + excluded.attempts_2xx,
               attempts_429 = s.attempts_429 + excluded.attempts_429,
               attempts_4xx = s.attempts_4xx + excluded.attempts_4xx,
               attempts_5xx = s.attempts_5xx + excluded.attempts_5xx,
               attempts_network = s.attempts_network + excluded.attempts_network,
               attempts_envelope = s.attempts_envelope + excluded.attempts_envelope,
               retries = s.retries + excluded.retries,
               bytes_received = s.bytes_received + excluded.bytes_received,
               token_wait_s = s.token_wait_s + excluded.token_wait_s,
               backoff_s = s.backoff_s + excluded.backoff_s,
               pulled = s.pulled + excluded.pulled, new_versions = s.new_versions + excluded.new_versions,
               unchanged = s.unchanged + excluded.unchanged,
               quarantined = s.quarantined + excluded.quarantined,
               latency_hist = ARRAY[s.latency_hist[1] + excluded.latency_hist[1], s.latency_hist[2] + excluded.latency_hist[2],
                                    s.latency_hist[3] + excluded.latency_hist[3], s.latency_hist[4] + excluded.latency_hist[4],
                                    s.latency_hist[5] + excluded.latency_hist[5], s.latency_hist[6] + excluded.latency_hist[6],
                                    s.latency_hist[7] + excluded.latency_hist[7], s.latency_hist[8] + excluded.latency_hist[8]],
               latency_ms = s.latency_ms + excluded.latency_ms,
               max_watermark = greatest(s.max_watermark, excluded.max_watermark)
        RETURNING 1$q$
$s$;
COMMENT ON FUNCTION ironwod.page_statement() IS 'Worker: the prepared bookkeeping statement of every landed page (entity counters and attempts, quarantined records, latency histogram, watermark; checks the run still runs)';

-- A unit's last page landed: the unit is done (and checkpointed, in a backfill);
-- when it was the entity's last unit, the entity is closed.  Constant time:
-- nothing here looks at more than one unit.  Landing the last page of a unit
-- already done (a page landed twice) changes nothing.
CREATE FUNCTION ironwod.unit_landed(p_run_id bigint, p_entity text, p_window_key text, p_page integer)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_now timestamptz := clock_timestamp();
    v_mode text;
    v_entity_done boolean;
    v_start timestamptz;
    v_end timestamptz;
BEGIN
    UPDATE ironwod.run_units u SET status = 'done', pages = p_page, done_at = v_now
     WHERE u.tenant_id = v_t AND u.gym_id = v_g AND u.run_id = p_run_id AND u.entity = p_entity
       AND u.window_key = p_window_key AND u.status = 'pending';
    IF NOT FOUND THEN
        IF NOT EXISTS (SELECT 1 FROM ironwod.run_units u
                       WHERE u.tenant_id = v_t AND u.gym_id = v_g AND u.run_id = p_run_id
                         AND u.entity = p_entity AND u.window_key = p_window_key) THEN
            RAISE EXCEPTION 'run % did not plan unit % of %', p_run_id, p_window_key, p_entity
                USING ERRCODE = 'internal_error';
        END IF;
        RETURN;
    END IF;
    SELECT r.mode INTO v_mode FROM ironwod.sync_runs r
     WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id = p_run_id;
    IF v_mode = 'backfill' THEN
        -- The month's bounds computed here, not in a CASE of the INSERT: Citus
        -- evaluates a statement's expressions before it ships it, whatever
        -- branch a CASE would take ("full-01" is no timestamp).
        IF p_window_key ~ '^\d{4}-\d{2}$' THEN
            v_start := (p_window_key || '-01')::timestamp AT TIME ZONE 'UTC';
            v_end := ((p_window_key || '-01')::timestamp + interval '1 month') AT TIME ZONE 'UTC';
        END IF;
        INSERT INTO ironwod.backfill_checkpoints
            (tenant_id, gym_id, entity, window_key, window_start, window_end, pages, records, completed_by)
        VALUES (v_t, v_g, p_entity, p_window_key, v_start, v_end, p_page, 0, p_run_id)
        ON CONFLICT DO NOTHING;
    END IF;
    UPDATE ironwod.sync_run_entities s SET units_done = s.units_done + 1
     WHERE s.tenant_id = v_t AND s.gym_id = v_g AND s.run_id = p_run_id AND s.entity = p_entity
    RETURNING s.units_done + s.units_skipped >= s.units_total INTO v_entity_done;
    IF v_entity_done THEN
        PERFORM ironwod.close_entity(p_run_id, p_entity);
    END IF;
END
$$;
COMMENT ON FUNCTION ironwod.unit_landed(bigint, text, text, integer) IS 'Worker: a unit''s last page landed: mark the unit done, checkpoint it in a backfill, close the entity after its last unit';

-- Records seen again are no longer vanished (the worker runs this only for
-- entities that have vanished records).
CREATE FUNCTION ironwod.unvanish(p_entity text, p_ids bigint[]) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    DELETE FROM ironwod.vanished_records v
     WHERE v.tenant_id = ironwod.scope_tenant() AND v.gym_id = ironwod.scope_gym()
       AND v.entity = p_entity AND v.wodify_id = ANY (p_ids);
END
$$;
COMMENT ON FUNCTION ironwod.unvanish(text, bigint[]) IS 'Worker: records seen again leave vanished_records';

-- The statements that land a page's records in an entity's raw table, one array
-- per column; the worker prepares both once per run.  $1 tenant, $2 gym
-- (parameters, so a distributed table routes to one shard), $3 run, $4 the
-- landing transaction's time, $5..$8 ids, payloads, payload hashes,
-- source_updated_at.  Both return the number of new versions.
--   p_upsert false: a plain INSERT, for pages of versions never seen before
--                   (a backfill); a version already stored fails it with a
--                   unique violation, and the page is landed again with
--   p_upsert true:  INSERT ... ON CONFLICT, where a version seen again only
--                   bumps last_seen_run_id (twice the cost of the plain one).
CREATE FUNCTION ironwod.landing_statement(p_entity text, p_upsert boolean) RETURNS text
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN format($s$
        WITH ins AS (
            INSERT INTO ironwod.%I AS t
                (tenant_id, gym_id, wodify_id, payload_json, payload_hash, source_updated_at,
                 ingest_run_id, last_seen_run_id, ingested_at, last_seen_at)
            SELECT $1, $2, r.wodify_id, r.payload_json, r.payload_hash, r.source_updated_at, $3, $3, $4, $4
            FROM unnest($5::bigint[], $6::jsonb[], $7::bytea[], $8::timestamptz[])
                 AS r(wodify_id, payload_json, payload_hash, source_updated_at)
            %s
            RETURNING (xmax = 0) AS inserted)
        SELECT (count(*) FILTER (WHERE inserted))::integer FROM ins$s$,
        (SELECT e.raw_table FROM ironwod.entities e WHERE e.entity = p_entity),
        CASE WHEN p_upsert THEN
            'ON CONFLICT (tenant_id, gym_id, wodify_id, payload_hash)
             DO UPDATE SET last_seen_run_id = excluded.last_seen_run_id, last_seen_at = excluded.last_seen_at'
        ELSE '' END);
END
$$;
COMMENT ON FUNCTION ironwod.landing_statement(text, boolean) IS 'Worker: the prepared statements that land a page''s records in an entity''s raw table (plain insert, or upsert)';

-- Land one response page (src/land.c, src/page.c), in the caller's transaction.
-- The body is parsed once into per-record jsonb values; error envelopes (HTTP 200
-- with an HTTPCode), bodies without the records array and broken pagination (a
-- page that repeats the previous one, a page number other than the one asked
-- for, an empty page that claims more) land nothing.  Otherwise every record is
-- upserted as a payload version (payload hash: ironwod.payload_hash), records
-- that cannot be stored go to ironwod.quarantined_records (n_quarantined), and the
-- page's bookkeeping (ironwod.page_statement, and ironwod.unit_landed on a
-- unit's last page) commits with it, all atomically: a crash between
-- pages loses nothing and re-lands nothing twice.  The worker calls the same C
-- code directly; this entry point lets tests land fixture pages.
CREATE FUNCTION ironwod.land_page(p_run_id bigint, p_entity text, p_window_key text,
                                  p_page integer, p_body text, p_attempts integer,
                                  p_prev_digest text DEFAULT NULL, p_latency_ms double precision DEFAULT NULL)
RETURNS TABLE (outcome text, http_code integer, message text, has_more boolean,
               n_records integer, n_new integer, digest text, n_quarantined integer)
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ironwod_land_page';
COMMENT ON FUNCTION ironwod.land_page(bigint, text, text, integer, text, integer, text, double precision) IS 'Worker: classify, check and land one response page; checkpoint the unit and close the entity on its last page';

-- What landing makes of a page's records, without landing anything: one row per
-- element of the records array, with its id, payload, payload hash and
-- source_updated_at, or the reason it cannot be stored and its raw bytes.
CREATE FUNCTION ironwod.split_page(p_entity text, p_body text,
                                   OUT ordinal integer, OUT wodify_id bigint, OUT payload jsonb,
                                   OUT payload_hash bytea, OUT source_updated_at timestamptz,
                                   OUT fault text, OUT raw bytea)
RETURNS SETOF record
LANGUAGE c STRICT STABLE AS 'MODULE_PATHNAME', 'ironwod_split_page';
COMMENT ON FUNCTION ironwod.split_page(text, text) IS 'The records of a response page as landing sees them (id, payload, hash, or why it cannot be stored), without landing them';

-- SHA-256 of a jsonb binary (the binary form is canonical, so it is stable).
CREATE FUNCTION ironwod.payload_hash(p_payload jsonb) RETURNS bytea
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'ironwod_payload_hash';
COMMENT ON FUNCTION ironwod.payload_hash(jsonb) IS 'SHA-256 of a jsonb binary (the payload hash of an entity without volatile fields)';

-- The hash landing stores for a record of an entity, recomputed from a stored
-- payload: that of the payload without the entity's volatile fields (src/page.c
-- removes them with the same jsonb "-" operator).
CREATE FUNCTION ironwod.payload_hash(p_entity text, p_payload jsonb) RETURNS bytea
LANGUAGE sql STABLE STRICT PARALLEL SAFE
AS $$
    SELECT ironwod.payload_hash(p_payload - e.volatile_fields) FROM ironwod.entities e WHERE e.entity = p_entity
$$;
COMMENT ON FUNCTION ironwod.payload_hash(text, jsonb) IS 'Payload hash of a raw version of the entity: SHA-256 of its jsonb binary without the entity''s volatile fields';

-- A clean run: close entities that had nothing to fetch, clear the backfill
-- campaign's checkpoints after a backfill (the next one pulls everything
-- again), close the breaker, and record the completion.
CREATE FUNCTION ironwod.finish_run(p_run_id bigint)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_mode text;
    v_now timestamptz;
    v_cursor_end jsonb;
    v_last_cursor timestamptz;
    e record;
BEGIN
    SELECT r.mode INTO v_mode FROM ironwod.sync_runs r
     WHERE r.run_id = p_run_id AND r.status = 'running' AND r.tenant_id = v_t AND r.gym_id = v_g;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % is no longer running', p_run_id USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF v_mode <> 'validate' THEN
        -- The entities left open, checked one by one: Citus plans no correlated
        -- subquery over the registry (a reference table).
        FOR e IN SELECT x.entity FROM ironwod.entities x WHERE x.enabled ORDER BY x.ordinal LOOP
            -- two conditions, not one expression: Citus would push the OR, and
            -- entity_skipped's queries with it, to the shard
            CONTINUE WHEN ironwod.entity_skipped(p_run_id, e.entity);
            CONTINUE WHEN EXISTS (SELECT 1 FROM ironwod.sync_run_entities s
                           WHERE s.tenant_id = v_t AND s.gym_id = v_g AND s.run_id = p_run_id
                             AND s.entity = e.entity AND s.status = 'completed');
            PERFORM ironwod.close_entity(p_run_id, e.entity);
        END LOOP;
        IF v_mode = 'backfill' THEN
            DELETE FROM ironwod.backfill_checkpoints b
             WHERE b.tenant_id = v_t AND b.gym_id = v_g;
        END IF;
    END IF;
    -- The finish time and the cursors computed first and passed as values: on
    -- Citus an UPDATE may carry no volatile function, no non-immutable one in a
    -- CASE, and no subquery over another distributed table.
    v_now := clock_timestamp();
    PERFORM ironwod.count_requests(p_run_id, v_now, NULL);
    SELECT jsonb_object_agg(c.entity, c.watermark), max(c.watermark) INTO v_cursor_end, v_last_cursor
    FROM ironwod.entity_cursors c WHERE c.tenant_id = v_t AND c.gym_id = v_g;
    UPDATE ironwod.sync_runs r
       SET status = 'succeeded', finished_at = v_now, phase = NULL, cursor_end = v_cursor_end
     WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id = p_run_id;
    UPDATE ironwod.integrations_wodify_connection c
       SET status = CASE WHEN c.status IN ('pending', 'error') THEN 'connected' ELSE c.status END,
           last_success_at = v_now, consecutive_failures = 0,
           breaker_opened_at = NULL, next_retry_at = NULL,
           last_cursor_at = v_last_cursor,
           backfill_completed_at = CASE WHEN v_mode = 'backfill' THEN v_now ELSE c.backfill_completed_at END,
           updated_at = v_now
     WHERE c.tenant_id = v_t AND c.gym_id = v_g;
    -- the run, which held the old key, is over: a rotated key takes its place
    PERFORM ironwod.apply_rotated_key(v_now);
    PERFORM ironwod.log_run(v_t, v_g, p_run_id);
    -- Read first, then passed: on Citus a query on the shard (a routed SELECT
    -- with a subquery) may not call a function that writes distributed tables.
    SELECT coalesce(jsonb_object_agg(s.entity, jsonb_build_object('pulled', s.pulled, 'new', s.new_versions,
                                                                  'deleted', s.deleted,
                                                                  'quarantined', s.quarantined)), '{}')
    INTO v_cursor_end
    FROM ironwod.sync_run_entities s
    WHERE s.tenant_id = v_t AND s.gym_id = v_g AND s.run_id = p_run_id;
    PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.completed', NULL, v_cursor_end);
END
$$;
COMMENT ON FUNCTION ironwod.finish_run(bigint) IS 'Worker: mark a run succeeded, clear its checkpoints, close the breaker';

-- Verdict of a queued validate run (the path taken when ironwod_connect could not
-- get an answer in time).  A valid key connects and queues the initial backfill;
-- a rejected key leaves the connection in error with its ciphertext destroyed.
CREATE FUNCTION ironwod.finish_validate(p_run_id bigint, p_valid boolean, p_fingerprint text, p_message text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    -- now() as a value: Citus refuses a non-immutable function in an UPDATE's COALESCE
    v_now timestamptz := now();
BEGIN
    IF p_valid THEN
        UPDATE ironwod.integrations_wodify_connection
           SET api_key_fingerprint = p_fingerprint, connected_at = coalesce(connected_at, v_now), updated_at = v_now
         WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym();
        PERFORM ironwod.finish_run(p_run_id);
        INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode)
        SELECT c.tenant_id, c.gym_id, 'backfill'
        FROM ironwod.integrations_wodify_connection c
        WHERE c.tenant_id = ironwod.scope_tenant() AND c.gym_id = ironwod.scope_gym() AND c.backfill_completed_at IS NULL;
    ELSE
        PERFORM ironwod.fail_run(p_run_id, 'auth', p_message, 'validate');
        UPDATE ironwod.integrations_wodify_connection
           SET api_key_ciphertext = NULL, master_key_id = NULL, updated_at = v_now
         WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym();
    END IF;
END
$$;
COMMENT ON FUNCTION ironwod.finish_validate(bigint, boolean, text, text) IS 'Worker: record the verdict of a queued key validation';

-- A failed run: sanitized error (the C caller never passes key material), failed
-- phase, and the connection's circuit breaker.  An auth error opens it at once
-- (no automatic retry: the key must change), and so does a master key command
-- that hangs, fails or prints garbage (retried after 5 minutes, doubling);
-- ironwod.breaker_threshold consecutive failures open it with an exponential
-- next_retry_at.  A monthly-quota stop is no failure: the run is 'deferred' and
-- the connection waits for the next month.  A run no longer running (cancelled) is left as it is.  Watermarks are
-- untouched: only a clean pull of an entity moves its own.
CREATE FUNCTION ironwod.fail_run(p_run_id bigint, p_code text, p_message text, p_phase text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    -- The scope as values, so every statement routes to the tenant's shard on
    -- Citus (a FOR UPDATE must).
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_mode text;
    v_threshold int := current_setting('ironwod.breaker_threshold')::int;
    -- the master key command hangs, fails or prints garbage: every gym would
    -- fail the same way until an operator fixes it, so retrying on the next
    -- tick would only run it again and again
    v_keystore boolean := p_code IN ('key_command_timeout', 'key_command_failed', 'key_command_output');
    -- The failure time as a value: on Citus an UPDATE may carry no volatile
    -- function, and no non-immutable one inside a CASE or COALESCE.
    v_now timestamptz := clock_timestamp();
    v_failures integer;
    v_status text;
    v_opened timestamptz;
    v_retry timestamptz;
BEGIN
    PERFORM ironwod.count_requests(p_run_id, v_now, NULL);
    UPDATE ironwod.sync_runs r
       SET status = CASE WHEN p_code = 'quota' THEN 'deferred' ELSE 'failed' END,
           finished_at = v_now, error_code = p_code,
           last_error = left(p_message, 500), failed_phase = p_phase, phase = NULL
     WHERE r.tenant_id = v_t AND r.gym_id = v_g
       AND r.run_id = p_run_id AND r.status IN ('running', 'queued')
    RETURNING r.mode INTO v_mode;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- the run, which held the old key, is over: a rotated key takes its place
    PERFORM ironwod.apply_rotated_key(v_now);
    PERFORM ironwod.log_run(v_t, v_g, p_run_id);
    IF p_code = 'quota' THEN
        UPDATE ironwod.integrations_wodify_connection c
           SET next_retry_at = (date_trunc('month', v_now AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC',
               last_error_at = v_now, last_error = left(p_message, 500), last_error_code = p_code,
               updated_at = v_now
         WHERE c.tenant_id = v_t AND c.gym_id = v_g;
        PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.deferred', NULL,
            jsonb_build_object('code', p_code, 'message', left(p_message, 500)));
        RETURN;
    END IF;

    -- The breaker's next state computed from the locked row, then written as
    -- values: on Citus a CASE in an UPDATE may hold no non-immutable expression,
    -- and timestamptz + interval is only stable.
    SELECT c.consecutive_failures + 1, c.status, c.breaker_opened_at, c.next_retry_at
    INTO v_failures, v_status, v_opened, v_retry
    FROM ironwod.integrations_wodify_connection c
    WHERE c.tenant_id = v_t AND c.gym_id = v_g
    FOR UPDATE;
    IF p_code = 'auth' OR v_keystore OR v_failures >= v_threshold THEN
        v_status := 'error';
        v_opened := coalesce(v_opened, v_now);
        v_retry := CASE WHEN p_code = 'auth' THEN NULL
                        WHEN v_keystore
                            THEN v_now + least(interval '24 hours', interval '5 minutes' * power(2, least(v_failures - 1, 10)))
                        ELSE v_now + least(interval '24 hours', interval '1 hour' * power(2, v_failures - v_threshold)) END;
    ELSE
        v_opened := NULL;
    END IF;
    UPDATE ironwod.integrations_wodify_connection c
       SET last_error_at = v_now, last_error = left(p_message, 500), last_error_code = p_code,
           consecutive_failures = v_failures, status = v_status,
           breaker_opened_at = v_opened, next_retry_at = v_retry, updated_at = v_now
     WHERE c.tenant_id = v_t AND c.gym_id = v_g;
    PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.failed', NULL,
        jsonb_build_object('code', p_code, 'phase', p_phase, 'message', left(p_message, 500)));
END
$$;
COMMENT ON FUNCTION ironwod.fail_run(bigint, text, text, text) IS 'Worker or supervisor: record a failed (or quota-deferred) run with a sanitized error; drive the circuit breaker';
-- 50_api: the ironwod_* functions the host app calls.  Write paths are SECURITY
-- DEFINER (they touch columns the app may not read, such as the ciphertext) and
-- therefore check the scope themselves; search_path is pinned on every one.

-- The scope check plus "this gym is connected (or was)", shared by the API calls
-- that act on an existing connection.
CREATE FUNCTION ironwod.assert_connection(p_tenant_id uuid, p_gym_id uuid)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    PERFORM ironwod.assert_scope(p_tenant_id, p_gym_id);
    IF NOT EXISTS (SELECT 1 FROM ironwod.integrations_wodify_connection c
                   WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id) THEN
        RAISE EXCEPTION 'gym % of tenant % has no Wodify connection', p_gym_id, p_tenant_id
            USING ERRCODE = 'no_data_found', HINT = 'Connect it first with ironwod_connect.';
    END IF;
END
$$;
COMMENT ON FUNCTION ironwod.assert_connection(uuid, uuid) IS 'Raise 42501 unless (tenant, gym) is the current scope, and P0002 unless it has a Wodify connection';

CREATE FUNCTION ironwod.register_master_key(p_key_id text, p_public_key bytea)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_public_key IS NULL OR length(p_public_key) <> 32 THEN
        RAISE EXCEPTION 'a master public key is 32 bytes of X25519'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass the raw public key, for example decode(''<64 hex>'', ''hex'').';
    END IF;
    INSERT INTO ironwod.master_keys (key_id, public_key) VALUES (p_key_id, p_public_key);
    -- New keys seal from now on; older ones stay to open what they sealed.
    UPDATE ironwod.master_keys SET is_active = (key_id = p_key_id);
END
$$;
COMMENT ON FUNCTION ironwod.register_master_key(text, bytea) IS 'Admin: add a master public key and make it the one new API keys are sealed to';

CREATE FUNCTION @extschema@.ironwod_public_key()
RETURNS TABLE (key_id text, public_key bytea)
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT k.key_id, k.public_key FROM ironwod.master_keys k
    WHERE k.is_active ORDER BY k.created_at DESC LIMIT 1
$$;
COMMENT ON FUNCTION @extschema@.ironwod_public_key() IS 'The master public key (and its id) a host app seals API keys to before ironwod_connect(tenant, gym, bytea)';

-- Connect with a key sealed by the host app, so the plaintext never enters
-- PostgreSQL.  A worker validates it with one GET /customers/locations while we
-- wait (ironwod.validate_timeout_ms); a rejected key raises and leaves nothing
-- behind; an undecided verdict stores the connection pending with a queued validate
-- run.  Connecting a gym that is already connected replaces its key only once the
-- new key validated, so a rotation never interrupts syncing.
CREATE FUNCTION @extschema@.ironwod_connect(p_tenant_id uuid, p_gym_id uuid, p_sealed_key bytea)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_key_id text;
    v record;
    v_status text;
    v_old text;
    v_run bigint;
    v_validate bigint;
    -- A variable, not now() in the statement: Citus refuses non-immutable
    -- functions in ON CONFLICT DO UPDATE SET on a distributed table.
    v_now timestamptz := now();
BEGIN
    PERFORM ironwod.assert_scope(p_tenant_id, p_gym_id);
    IF p_sealed_key IS NULL THEN
        RAISE EXCEPTION 'sealed API key must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    v_key_id := ironwod.sealed_key_id(p_sealed_key);
    -- the share lock keeps ironwod.retire_master_key from retiring it meanwhile
    PERFORM 1 FROM ironwod.master_keys k WHERE k.key_id = v_key_id FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'API key is sealed to unknown master key "%"', v_key_id
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Seal the key to the key returned by ironwod_public_key().';
    END IF;

    SELECT c.status INTO v_old FROM ironwod.integrations_wodify_connection c
    WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id FOR UPDATE;

    SELECT * INTO v FROM ironwod.validate_sealed_key(p_tenant_id, p_gym_id, p_sealed_key);
    IF v.verdict = 'rejected' THEN
        RAISE EXCEPTION 'Wodify rejected the API key'
            USING ERRCODE = 'invalid_authorization_specification',
                  DETAIL = format('GET /customers/locations answered: %s', v.message),
                  HINT = 'Copy the key named "Wodify API" from Wodify Core > Digital Presence > Web Integrations > API Keys.';
    END IF;
    IF v.verdict = 'unopenable' THEN
        RAISE EXCEPTION 'sealed API key does not open for tenant % gym %', p_tenant_id, p_gym_id
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A sealed key is bound to the tenant, gym and master key it was sealed for.';
    END IF;
    IF v.verdict = 'keystore' THEN
        RAISE EXCEPTION 'run workers cannot open API keys: %', v.message
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Check ironwod.master_key_command; see the README.';
    END IF;
    v_status := CASE WHEN v.verdict = 'valid' THEN 'connected' ELSE 'pending' END;
    IF v_status = 'pending' AND v_old IN ('connected', 'paused') THEN
        RAISE EXCEPTION 'could not validate the new API key: %', v.message
            USING ERRCODE = 'connection_failure',
                  HINT = 'The gym stays connected with its current key; try again later.';
    END IF;

    INSERT INTO ironwod.integrations_wodify_connection AS c
        (tenant_id, gym_id, status, api_key_ciphertext, master_key_id, api_key_fingerprint, connected_at)
    VALUES (p_tenant_id, p_gym_id, v_status, p_sealed_key, v_key_id, v.fingerprint,
            CASE WHEN v_status = 'connected' THEN v_now END)
    ON CONFLICT (tenant_id, gym_id) DO UPDATE
       SET status = CASE WHEN c.status = 'paused' THEN 'paused' ELSE excluded.status END,
           api_key_ciphertext = excluded.api_key_ciphertext, master_key_id = excluded.master_key_id,
           api_key_fingerprint = excluded.api_key_fingerprint,
           next_api_key_ciphertext = NULL, next_master_key_id = NULL, next_api_key_fingerprint = NULL,
           connected_at = coalesce(excluded.connected_at, c.connected_at),
           consecutive_failures = 0, breaker_opened_at = NULL, next_retry_at = NULL,
           updated_at = v_now;

    IF NOT EXISTS (SELECT 1 FROM ironwod.sync_runs r
                   WHERE r.tenant_id = p_tenant_id AND r.gym_id = p_gym_id
                     AND r.status IN ('queued', 'running')) THEN
        IF v_status = 'connected' THEN
            -- The synchronous verdict is recorded as a finished validate run,
            -- with the attempts it took (those of the locations endpoint).
            INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, status, started_at, finished_at)
            VALUES (p_tenant_id, p_gym_id, 'validate', 'succeeded', now(), clock_timestamp())
            RETURNING run_id INTO v_validate;
            PERFORM ironwod.add_attempts(v_validate, 'locations', v.attempts);
            PERFORM ironwod.count_requests(v_validate, v_now, NULL);
            PERFORM ironwod.log_run(p_tenant_id, p_gym_id, v_validate);
            INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode)
            SELECT p_tenant_id, p_gym_id, 'backfill'
            FROM ironwod.integrations_wodify_connection c
            WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id AND c.backfill_completed_at IS NULL
            RETURNING run_id INTO v_run;
        ELSE
            INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode) VALUES (p_tenant_id, p_gym_id, 'validate')
            RETURNING run_id INTO v_run;
            RAISE WARNING 'could not validate the API key now: %', v.message
                USING HINT = 'The connection is pending; a worker will validate it. Watch ironwod_status().';
        END IF;
        IF v_run IS NOT NULL THEN
            PERFORM ironwod.note_queued_run(v_run);
        END IF;
        PERFORM ironwod.wake();
    END IF;
    RETURN v_status;
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_connect(uuid, uuid, bytea) IS 'Connect a gym with an API key sealed to ironwod_public_key(); validates it and queues the initial backfill';

-- Convenience path: the plaintext key enters the backend, is sealed at once and
-- never stored.  Weaker than the bytea form: the key is part of the caller's
-- statement text, which PostgreSQL shows in pg_stat_activity and may store in
-- pg_stat_statements.  So it is refused unless a superuser turned
-- ironwod.allow_plaintext_keys on; either way the gate first hides the statement
-- from pg_stat_activity (before the scope check, so that a refused call leaves
-- no key on view either).  The log hook scrubs it from the log.
CREATE FUNCTION @extschema@.ironwod_connect(p_tenant_id uuid, p_gym_id uuid, p_api_key text)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM ironwod.admit_plaintext_key();
    PERFORM ironwod.assert_scope(p_tenant_id, p_gym_id);
    IF p_api_key IS NULL OR length(btrim(p_api_key)) = 0 THEN
        RAISE EXCEPTION 'API key must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN @extschema@.ironwod_connect(p_tenant_id, p_gym_id, ironwod.seal_key(p_tenant_id, p_gym_id, p_api_key));
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_connect(uuid, uuid, text) IS 'Connect a gym with a plaintext API key, sealed in the backend; refused (0A000) unless ironwod.allow_plaintext_keys is on';

CREATE FUNCTION @extschema@.ironwod_sync(p_tenant_id uuid, p_gym_id uuid, p_mode text DEFAULT 'incremental')
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_status text;
    v_run bigint;
BEGIN
    PERFORM ironwod.assert_connection(p_tenant_id, p_gym_id);
    IF p_mode IS NULL OR p_mode NOT IN ('backfill', 'incremental', 'reconcile', 'validate') THEN
        RAISE EXCEPTION 'unsupported sync mode "%"', p_mode
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use backfill, incremental, reconcile or validate.';
    END IF;
    SELECT c.status INTO v_status FROM ironwod.integrations_wodify_connection c
    WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id;
    IF v_status = 'disconnected' OR (v_status = 'error' AND NOT EXISTS (
            SELECT 1 FROM ironwod.integrations_wodify_connection c
            WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id AND c.api_key_ciphertext IS NOT NULL)) THEN
        RAISE EXCEPTION 'gym % has no usable API key (status %)', p_gym_id, v_status
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Connect it again with ironwod_connect.';
    END IF;
    IF v_status = 'paused' THEN
        RAISE EXCEPTION 'gym % is paused', p_gym_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Resume it with ironwod_resume(tenant, gym) first.';
    END IF;
    IF v_status = 'pending' AND p_mode <> 'validate' THEN
        RAISE EXCEPTION 'gym % is waiting for its API key to be validated', p_gym_id
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Sync with mode ''validate'' or wait for ironwod_status() to say connected.';
    END IF;

    -- One queued or running run per connection: a concurrent caller's insert waits
    -- on the unique index, then hands back the run that won.  If that run already
    -- finished by then, try again.
    FOR attempt IN 1..3 LOOP
        BEGIN
            INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode) VALUES (p_tenant_id, p_gym_id, p_mode)
            RETURNING run_id INTO v_run;
            PERFORM ironwod.note_queued_run(v_run);
            PERFORM ironwod.wake();
            RETURN v_run;
        EXCEPTION WHEN unique_violation THEN
            SELECT r.run_id INTO v_run FROM ironwod.sync_runs r
            WHERE r.tenant_id = p_tenant_id AND r.gym_id = p_gym_id AND r.status IN ('queued', 'running');
            IF v_run IS NOT NULL THEN
                RAISE NOTICE 'run % is already queued or running for this gym', v_run;
                RETURN v_run;
            END IF;
        END;
    END LOOP;
    RAISE EXCEPTION 'could not queue a run for gym %', p_gym_id
        USING ERRCODE = 'lock_not_available', HINT = 'Runs are being queued concurrently; try again.';
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_sync(uuid, uuid, text) IS 'Queue a run (incremental, reconcile, backfill or validate) for a gym, or return the one already queued or running';

-- Waits on a condition variable the workers broadcast whenever a run changes
-- state, re-reading the row with a fresh snapshot each time: no busy polling, and
-- no sleep longer than a second.
CREATE FUNCTION @extschema@.ironwod_wait(p_run_id bigint, p_timeout interval DEFAULT '5 minutes')
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_deadline timestamptz := clock_timestamp() + p_timeout;
    v_status text;
    v_tenant uuid;
    v_gym uuid;
BEGIN
    PERFORM ironwod.preloaded();
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'ironwod_wait needs READ COMMITTED isolation'
            USING ERRCODE = 'active_sql_transaction', HINT = 'A snapshot that never moves would never see the run finish.';
    END IF;
    SELECT r.tenant_id, r.gym_id INTO v_tenant, v_gym FROM ironwod.sync_runs r WHERE r.run_id = p_run_id;
    IF NOT FOUND OR (v_tenant, v_gym) IS DISTINCT FROM (ironwod.scope_tenant(), ironwod.scope_gym()) THEN
        RAISE EXCEPTION 'run % does not exist in the current ironwod scope', p_run_id
            USING ERRCODE = 'no_data_found', HINT = 'Call ironwod_set_scope(tenant, gym) for the run''s gym first.';
    END IF;
    -- The supervisor cannot see a run this transaction queued before COMMIT.
    IF ironwod.run_queued_here(p_run_id) THEN
        RAISE EXCEPTION 'run % was queued by the current transaction and cannot start before it commits', p_run_id
            USING ERRCODE = 'active_sql_transaction',
                  HINT = 'COMMIT the transaction that called ironwod_sync() or ironwod_connect(), then call ironwod_wait() in a new one.';
    END IF;
    LOOP
        SELECT r.status INTO v_status FROM ironwod.sync_runs r
        WHERE r.tenant_id = v_tenant AND r.gym_id = v_gym AND r.run_id = p_run_id;
        IF v_status NOT IN ('queued', 'running') THEN
            RETURN v_status;
        END IF;
        IF clock_timestamp() >= v_deadline THEN
            RAISE EXCEPTION 'run % still % after %', p_run_id, v_status, p_timeout
                USING ERRCODE = 'query_canceled';
        END IF;
        PERFORM ironwod.wait_for_change(least(1000, greatest(1,
            (extract(epoch FROM v_deadline - clock_timestamp()) * 1000)::int)));
    END LOOP;
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_wait(bigint, interval) IS 'Block until a run of the current scope finishes and return its status; error on timeout';

CREATE FUNCTION @extschema@.ironwod_status(p_tenant_id uuid, p_gym_id uuid)
RETURNS TABLE (status text, api_key_fingerprint text, connected_at timestamptz,
               last_success_at timestamptz, last_error_at timestamptz, last_error text,
               last_error_code text, last_cursor_at timestamptz, consecutive_failures integer,
               next_retry_at timestamptz, backfill_completed_at timestamptz,
               active_run_id bigint, active_run_mode text, active_run_status text,
               last_run_id bigint, last_run_status text, entities jsonb, progress jsonb,
               not_entitled text[])
LANGUAGE plpgsql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_progress jsonb;
BEGIN
    PERFORM ironwod.assert_connection(p_tenant_id, p_gym_id);
    SELECT to_jsonb(p) - 'tenant_id' - 'gym_id' INTO v_progress FROM ironwod.run_progress p
    WHERE p.tenant_id = p_tenant_id AND p.gym_id = p_gym_id;
    RETURN QUERY
    SELECT c.status, c.api_key_fingerprint, c.connected_at, c.last_success_at, c.last_error_at,
           c.last_error, c.last_error_code, c.last_cursor_at, c.consecutive_failures, c.next_retry_at,
           c.backfill_completed_at, a.run_id, a.mode, a.status, l.run_id, l.status,
           (SELECT coalesce(jsonb_object_agg(s.entity, jsonb_build_object(
                    'pulled', s.pulled, 'new', s.new_versions, 'unchanged', s.unchanged,
                    'transformed', s.transformed, 'deleted', s.deleted, 'quarantined', s.quarantined,
                    'pages', s.pages, 'requests', s.requests, 'watermark', cur.watermark)
                    ORDER BY s.entity), '{}')
            FROM ironwod.sync_run_entities s
            LEFT JOIN ironwod.entity_cursors cur
                   ON cur.tenant_id = s.tenant_id AND cur.gym_id = s.gym_id AND cur.entity = s.entity
            WHERE s.tenant_id = c.tenant_id AND s.gym_id = c.gym_id
              AND s.run_id = coalesce(a.run_id, l.run_id)),
           v_progress,
           (SELECT coalesce(array_agg(n.entity ORDER BY e.ordinal), '{}') FROM ironwod.entity_entitlements n
            JOIN ironwod.entities e ON e.entity = n.entity
            WHERE n.tenant_id = c.tenant_id AND n.gym_id = c.gym_id)
    FROM ironwod.integrations_wodify_connection c
    LEFT JOIN LATERAL (SELECT r.run_id, r.mode, r.status FROM ironwod.sync_runs r
                       WHERE r.tenant_id = c.tenant_id AND r.gym_id = c.gym_id
                         AND r.status IN ('queued', 'running')) a ON true
    LEFT JOIN LATERAL (SELECT r.run_id, r.status FROM ironwod.sync_runs r
                       WHERE r.tenant_id = c.tenant_id AND r.gym_id = c.gym_id
                         AND r.status NOT IN ('queued', 'running')
                       ORDER BY r.run_id DESC LIMIT 1) l ON true
    WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id;
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_status(uuid, uuid) IS 'Connection status, breaker state, sanitized last error, current and last run with per-entity counts, the active run''s progress (ironwod.run_progress), and the entities the gym''s plan does not include (their metrics are NULL)';

-- Cancels queued work, stops a running run at its next page (the worker checks the
-- run's status in every landing transaction), and destroys the ciphertext.
-- Landed raw data stays: it is the gym's history.
CREATE FUNCTION @extschema@.ironwod_disconnect(p_tenant_id uuid, p_gym_id uuid)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- Citus refuses volatile functions in an UPDATE of a distributed table.
    v_now timestamptz := clock_timestamp();
    v_run bigint;
BEGIN
    PERFORM ironwod.assert_connection(p_tenant_id, p_gym_id);
    UPDATE ironwod.integrations_wodify_connection c
       SET status = 'disconnected', api_key_ciphertext = NULL, master_key_id = NULL,
           next_api_key_ciphertext = NULL, next_master_key_id = NULL, next_api_key_fingerprint = NULL,
           updated_at = now()
     WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id;
    UPDATE ironwod.sync_runs r
       SET status = 'cancelled', finished_at = v_now, last_error = 'disconnected', phase = NULL
     WHERE r.tenant_id = p_tenant_id AND r.gym_id = p_gym_id AND r.status IN ('queued', 'running')
    RETURNING r.run_id INTO v_run;
    IF v_run IS NOT NULL THEN
        PERFORM ironwod.log_run(p_tenant_id, p_gym_id, v_run);
    END IF;
    INSERT INTO ironwod.sync_events (tenant_id, gym_id, event) VALUES (p_tenant_id, p_gym_id, 'wodify.disconnected');
    PERFORM ironwod.wake();
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_disconnect(uuid, uuid) IS 'Disconnect a gym: cancel queued and running runs and destroy the sealed key';

-- The scheduler's heartbeat, called by pg_cron every few minutes (ironwod_schedule).
-- Queues, set-based and without HTTP or secrets:
--   * the nightly incremental run of every connected gym once its local night slot
--     (nightly_local_time in the gym's time zone, staggered over an hour by a hash
--     of the gym so thousands of gyms do not start at once) has passed with no run
--     since; on the gym's reconcile_weekday that run is the weekly reconciliation;
--   * the retry of a connection whose circuit breaker's next_retry_at has come;
--   * the continuation of an unfinished backfill.
-- The one-active-run index makes concurrent ticks (and ticks racing ironwod_sync)
-- queue at most one run per gym.  Returns the number of runs queued.
CREATE FUNCTION @extschema@.ironwod_tick()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_queued integer;
BEGIN
    PERFORM ironwod.preloaded();
    WITH candidates AS (
        SELECT c.tenant_id, c.gym_id, c.backfill_completed_at, c.reconcile_weekday,
               coalesce(c.time_zone, 'UTC') AS tz,
               c.nightly_local_time
               + make_interval(secs => ((hashtext(c.gym_id::text) & 2147483647) % 3600)) AS local_slot_time
        FROM ironwod.integrations_wodify_connection c
        WHERE c.api_key_ciphertext IS NOT NULL
          AND (c.status = 'connected' OR (c.status = 'error' AND c.next_retry_at IS NOT NULL))
          AND coalesce(c.next_retry_at, '-infinity') <= now()
    ), slots AS (
        SELECT k.*, s.slot
        FROM candidates k,
             LATERAL (SELECT (((now() AT TIME ZONE k.tz)::date + k.local_slot_time) AT TIME ZONE k.tz) AS today_slot) t,
             LATERAL (SELECT CASE WHEN t.today_slot > now() THEN t.today_slot - interval '1 day'
                                  ELSE t.today_slot END AS slot) s
    ), due AS (
        SELECT s.tenant_id, s.gym_id,
               CASE WHEN s.backfill_completed_at IS NULL THEN 'backfill'
                    WHEN extract(dow FROM s.slot AT TIME ZONE s.tz) = s.reconcile_weekday THEN 'reconcile'
                    ELSE 'incremental' END AS mode
        FROM slots s
        WHERE s.backfill_completed_at IS NULL
           OR NOT EXISTS (SELECT 1 FROM ironwod.sync_runs r
                          WHERE r.tenant_id = s.tenant_id AND r.gym_id = s.gym_id
                            AND r.mode <> 'validate' AND r.requested_at >= s.slot
                            AND r.status NOT IN ('failed', 'cancelled'))
    )
    INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, requested_by)
    SELECT d.tenant_id, d.gym_id, d.mode, 'ironwod_tick' FROM due d
    ON CONFLICT (tenant_id, gym_id) WHERE status IN ('queued', 'running') DO NOTHING;
    GET DIAGNOSTICS v_queued = ROW_COUNT;
    IF v_queued > 0 THEN
        PERFORM ironwod.wake();
    END IF;
    RETURN v_queued;
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_tick() IS 'Queue due work for every gym: nightly incremental, weekly reconciliation, breaker retries, unfinished backfills';

-- Install the single pg_cron job that calls ironwod_tick().  pg_cron stays
-- optional: ironwod never requires it, and says so clearly when it is missing.
CREATE FUNCTION @extschema@.ironwod_schedule(p_schedule text DEFAULT '*/5 * * * *')
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
        RAISE EXCEPTION 'pg_cron is not installed in this database'
            USING ERRCODE = 'undefined_object',
                  HINT = 'Preload pg_cron (cron.database_name = this database), CREATE EXTENSION pg_cron, then call ironwod_schedule() again; or call ironwod_tick() from any scheduler.';
    END IF;
    EXECUTE format('SELECT cron.schedule(%L, %L, %L)', 'ironwod-tick', p_schedule,
                   format('SELECT %I.ironwod_tick()', (SELECT n.nspname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                                                        WHERE p.proname = 'ironwod_tick' LIMIT 1)))
    INTO v_job;
    RETURN v_job;
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_schedule(text) IS 'Install (or replace) the pg_cron job ironwod-tick that calls ironwod_tick(); requires pg_cron';

-- Pause a gym: no run starts for it (ironwod_tick skips it, ironwod_sync refuses,
-- and a run queued by a racing call is cancelled when a worker claims it), the
-- queued run is cancelled and a running one stops at its next page (the worker
-- checks the run's status in every landing transaction).  The key, the
-- checkpoints of an unfinished backfill and the breaker state stay, so
-- ironwod_resume picks up where the gym left off.
CREATE FUNCTION @extschema@.ironwod_pause(p_tenant_id uuid, p_gym_id uuid)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_status text;
    v_now timestamptz := clock_timestamp();
    v_by text := session_user;
    v_run bigint;
BEGIN
    PERFORM ironwod.assert_connection(p_tenant_id, p_gym_id);
    SELECT c.status INTO v_status FROM ironwod.integrations_wodify_connection c
    WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id FOR UPDATE;
    IF v_status = 'paused' THEN
        RAISE NOTICE 'gym % is already paused', p_gym_id;
        RETURN v_status;
    END IF;
    IF v_status NOT IN ('connected', 'error') THEN
        RAISE EXCEPTION 'gym % cannot be paused while it is %', p_gym_id, v_status
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = CASE v_status WHEN 'pending' THEN 'Wait until its API key is validated (ironwod_status), or disconnect it.'
                                       ELSE 'Connect it again with ironwod_connect.' END;
    END IF;
    UPDATE ironwod.integrations_wodify_connection c
       SET status = 'paused', paused_at = v_now, paused_by = v_by, updated_at = v_now
     WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id;
    UPDATE ironwod.sync_runs r
       SET status = 'cancelled', finished_at = v_now, last_error = 'paused', phase = NULL
     WHERE r.tenant_id = p_tenant_id AND r.gym_id = p_gym_id AND r.status IN ('queued', 'running')
    RETURNING r.run_id INTO v_run;
    IF v_run IS NOT NULL THEN
        PERFORM ironwod.log_run(p_tenant_id, p_gym_id, v_run);
    END IF;
    PERFORM ironwod.emit_event(v_run, 'wodify.paused', NULL, jsonb_build_object('by', v_by, 'cancelled_run', v_run));
    PERFORM ironwod.wake();
    RETURN 'paused';
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_pause(uuid, uuid) IS 'Pause a gym: start no run for it, cancel its queued run, stop its running run at the next page; ironwod_resume undoes it';

-- Resume a paused gym: the connection goes back to what it was (connected, or in
-- error while its circuit breaker is open), and the schedule takes over again:
-- the next ironwod_tick queues the nightly run the pause skipped, or the rest of
-- an unfinished backfill.
CREATE FUNCTION @extschema@.ironwod_resume(p_tenant_id uuid, p_gym_id uuid)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_status text;
    v_now timestamptz := clock_timestamp();
BEGIN
    PERFORM ironwod.assert_connection(p_tenant_id, p_gym_id);
    SELECT c.status INTO v_status FROM ironwod.integrations_wodify_connection c
    WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id FOR UPDATE;
    IF v_status <> 'paused' THEN
        RAISE NOTICE 'gym % is not paused (status %)', p_gym_id, v_status;
        RETURN v_status;
    END IF;
    UPDATE ironwod.integrations_wodify_connection c
       SET status = CASE WHEN c.breaker_opened_at IS NOT NULL THEN 'error' ELSE 'connected' END,
           paused_at = NULL, paused_by = NULL, updated_at = v_now
     WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id
    RETURNING c.status INTO v_status;
    PERFORM ironwod.emit_event(NULL, 'wodify.resumed', NULL, jsonb_build_object('status', v_status));
    RETURN v_status;
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_resume(uuid, uuid) IS 'Resume a paused gym: restore its status (connected, or error while the breaker is open) and let ironwod_tick schedule it again';
-- 55_rotation: rotating a gym's API key and the master keys, without downtime.
--
-- A gym's key: ironwod_rotate_key(tenant, gym, sealed) has a worker validate the
-- new key first; the old key stays until then, and is replaced at once when no
-- run is running.  A running run opened the old key when it started and keeps
-- it to its end, so the new key waits beside it (next_api_key_ciphertext) and
-- replaces it in the transaction that ends that run; from that commit on,
-- nothing can use the old key (a run claims its key under a share lock on the
-- connection row, so no claim slips between the check and the swap).
--
-- The master keys: make ironwod.master_key_command print the new private key
-- beside the old, register the new public key (ironwod.register_master_key, it
-- becomes the one new keys are sealed to), call ironwod_rewrap() (a worker, the
-- only kind of process that holds private keys, re-seals every connection's key
-- to it), then ironwod.retire_master_key(old), which refuses while any ciphertext
-- still uses the old key, and only then drop the old key from the command.  Every
-- ciphertext stays openable by a key the command prints at every step.

-- Swap a rotated key in once no run uses the old one; by the caller that ends
-- the run (finish_run, fail_run) and by claim_run before it hands out a key.
CREATE FUNCTION ironwod.apply_rotated_key(p_now timestamptz)
RETURNS boolean
LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE ironwod.integrations_wodify_connection c
       SET api_key_ciphertext = c.next_api_key_ciphertext, master_key_id = c.next_master_key_id,
           api_key_fingerprint = c.next_api_key_fingerprint,
           next_api_key_ciphertext = NULL, next_master_key_id = NULL, next_api_key_fingerprint = NULL,
           key_rotated_at = p_now, updated_at = p_now
     WHERE c.tenant_id = ironwod.scope_tenant() AND c.gym_id = ironwod.scope_gym()
       AND c.next_api_key_ciphertext IS NOT NULL AND c.status <> 'disconnected';
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO ironwod.sync_events (tenant_id, gym_id, event)
    VALUES (ironwod.scope_tenant(), ironwod.scope_gym(), 'wodify.key.rotated');
    RETURN true;
END
$$;
COMMENT ON FUNCTION ironwod.apply_rotated_key(timestamptz) IS 'Worker or supervisor: replace the scope''s API key by its validated successor, once no run holds the old one';

CREATE FUNCTION @extschema@.ironwod_rotate_key(p_tenant_id uuid, p_gym_id uuid, p_sealed_key bytea)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_key_id text;
    v record;
    v_status text;
    v_now timestamptz := now();
BEGIN
    PERFORM ironwod.assert_connection(p_tenant_id, p_gym_id);
    IF p_sealed_key IS NULL THEN
        RAISE EXCEPTION 'sealed API key must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    v_key_id := ironwod.sealed_key_id(p_sealed_key);
    -- the share lock keeps ironwod.retire_master_key from retiring it meanwhile
    PERFORM 1 FROM ironwod.master_keys k WHERE k.key_id = v_key_id FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'API key is sealed to unknown master key "%"', v_key_id
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Seal the key to the key returned by ironwod_public_key().';
    END IF;
    SELECT c.status INTO v_status FROM ironwod.integrations_wodify_connection c
    WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id;
    IF v_status = 'disconnected' THEN
        RAISE EXCEPTION 'gym % is disconnected', p_gym_id
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Connect it again with ironwod_connect.';
    END IF;

    -- Before any lock: the validation takes up to ironwod.validate_timeout_ms,
    -- and a run starting meanwhile must not wait for it.
    SELECT * INTO v FROM ironwod.validate_sealed_key(p_tenant_id, p_gym_id, p_sealed_key);
    IF v.verdict = 'rejected' THEN
        RAISE EXCEPTION 'Wodify rejected the new API key'
            USING ERRCODE = 'invalid_authorization_specification',
                  DETAIL = format('GET /customers/locations answered: %s', v.message),
                  HINT = 'The gym keeps its current key.';
    END IF;
    IF v.verdict = 'unopenable' THEN
        RAISE EXCEPTION 'sealed API key does not open for tenant % gym %', p_tenant_id, p_gym_id
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A sealed key is bound to the tenant, gym and master key it was sealed for.';
    END IF;
    IF v.verdict = 'keystore' THEN
        RAISE EXCEPTION 'run workers cannot open API keys: %', v.message
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Check ironwod.master_key_command; see the README. The gym keeps its current key.';
    END IF;
    IF v.verdict <> 'valid' THEN
        RAISE EXCEPTION 'could not validate the new API key: %', v.message
            USING ERRCODE = 'connection_failure',
                  HINT = 'The gym keeps its current key; try again later.';
    END IF;

    -- From here the row is locked: a claim waits, then reads what we commit.
    PERFORM 1 FROM ironwod.integrations_wodify_connection c
    WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id FOR UPDATE;
    UPDATE ironwod.integrations_wodify_connection c
       SET next_api_key_ciphertext = p_sealed_key, next_master_key_id = v_key_id,
           next_api_key_fingerprint = v.fingerprint, updated_at = v_now
     WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id;
    IF EXISTS (SELECT 1 FROM ironwod.sync_runs r
               WHERE r.tenant_id = p_tenant_id AND r.gym_id = p_gym_id AND r.status = 'running') THEN
        RETURN 'pending';
    END IF;
    PERFORM ironwod.apply_rotated_key(v_now);
    RETURN 'rotated';
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_rotate_key(uuid, uuid, bytea) IS 'Replace a gym''s API key by a new sealed one once a worker validated it: at once (rotated), or when the running run, which keeps the old key, ends (pending)';

-- Connections whose key, or rotated key waiting for its run, is sealed to a
-- master key other than the active one: what ironwod_rewrap() has to do.  For
-- the rewrap worker, which may read only its scope: ids only.
CREATE FUNCTION ironwod.rewrap_targets()
RETURNS TABLE (tenant_id uuid, gym_id uuid)
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c.tenant_id, c.gym_id
    FROM ironwod.integrations_wodify_connection c
    LEFT JOIN ironwod.master_keys k ON k.is_active
    WHERE (c.api_key_ciphertext IS NOT NULL AND c.master_key_id IS DISTINCT FROM k.key_id)
       OR (c.next_api_key_ciphertext IS NOT NULL AND c.next_master_key_id IS DISTINCT FROM k.key_id)
    ORDER BY c.tenant_id, c.gym_id
$$;
COMMENT ON FUNCTION ironwod.rewrap_targets() IS 'Rewrap worker: (tenant, gym) of every connection with a key sealed to a master key other than the active one';

-- The rewrap worker's write, in the scope of the connection it re-sealed (NULL:
-- that key needed nothing).
CREATE FUNCTION ironwod.store_rewrapped_key(p_current bytea, p_next bytea, p_key_id text)
RETURNS void
LANGUAGE sql
AS $$
    UPDATE ironwod.integrations_wodify_connection c
       SET api_key_ciphertext = coalesce(p_current, c.api_key_ciphertext),
           master_key_id = CASE WHEN p_current IS NULL THEN c.master_key_id ELSE p_key_id END,
           next_api_key_ciphertext = coalesce(p_next, c.next_api_key_ciphertext),
           next_master_key_id = CASE WHEN p_next IS NULL THEN c.next_master_key_id ELSE p_key_id END
     WHERE c.tenant_id = ironwod.scope_tenant() AND c.gym_id = ironwod.scope_gym()
$$;
COMMENT ON FUNCTION ironwod.store_rewrapped_key(bytea, bytea, text) IS 'Rewrap worker: store the scope''s API key (and waiting rotated key) re-sealed to master key p_key_id';

CREATE FUNCTION @extschema@.ironwod_rewrap(OUT resealed integer, OUT remaining integer)
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_before integer;
BEGIN
    PERFORM ironwod.preloaded();
    IF NOT EXISTS (SELECT 1 FROM ironwod.master_keys k WHERE k.is_active) THEN
        RAISE EXCEPTION 'no master key is registered'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Register one with ironwod.register_master_key(key_id, public_key).';
    END IF;
    SELECT count(*) INTO v_before FROM ironwod.rewrap_targets();
    IF v_before > 0 THEN
        PERFORM ironwod.run_rewrap_worker();
    END IF;
    SELECT count(*) INTO remaining FROM ironwod.rewrap_targets();
    resealed := v_before - remaining;
    IF remaining > 0 THEN
        RAISE WARNING '% API keys are still sealed to an older master key', remaining
            USING HINT = 'The rewrap worker logged why; ironwod.master_key_command must print every key in use. Call ironwod_rewrap() again.';
    END IF;
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_rewrap() IS 'Admin: have a worker re-seal every connection''s API key to the active master key; returns how many were re-sealed and how many remain';

CREATE FUNCTION ironwod.retire_master_key(p_key_id text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_active boolean;
    v_uses bigint;
BEGIN
    -- FOR UPDATE waits for every connect or rotation sealing to it right now
    SELECT k.is_active INTO v_active FROM ironwod.master_keys k WHERE k.key_id = p_key_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'master key "%" is not registered', p_key_id USING ERRCODE = 'undefined_object';
    END IF;
    IF v_active THEN
        RAISE EXCEPTION 'master key "%" is the active one', p_key_id
            USING ERRCODE = 'object_in_use',
                  HINT = 'Register its successor with ironwod.register_master_key() and call ironwod_rewrap() first.';
    END IF;
    SELECT count(*) FILTER (WHERE c.api_key_ciphertext IS NOT NULL
                                  AND (c.master_key_id = p_key_id
                                       OR ironwod.sealed_key_id(c.api_key_ciphertext) = p_key_id))
         + count(*) FILTER (WHERE c.next_api_key_ciphertext IS NOT NULL
                                  AND (c.next_master_key_id = p_key_id
                                       OR ironwod.sealed_key_id(c.next_api_key_ciphertext) = p_key_id))
      INTO v_uses
      FROM ironwod.integrations_wodify_connection c;
    IF v_uses > 0 THEN
        RAISE EXCEPTION 'master key "%" still seals % API key(s)', p_key_id, v_uses
            USING ERRCODE = 'object_in_use',
                  HINT = 'Call ironwod_rewrap() to re-seal them to the active master key, then retire it.';
    END IF;
    DELETE FROM ironwod.master_keys k WHERE k.key_id = p_key_id;
END
$$;
COMMENT ON FUNCTION ironwod.retire_master_key(text) IS 'Admin: forget a master key, refused while it is the active one or any ciphertext still uses it';
-- 60_admin: views for admin tooling.  security_invoker, so RLS decides what each
-- caller sees: an app session its own gym, ironwod_admin every tenant.

CREATE VIEW ironwod.connection_health WITH (security_invoker = true) AS
SELECT c.tenant_id, c.gym_id, c.status, c.api_key_fingerprint, c.last_success_at,
       c.last_error_at, c.last_error_code, c.last_error, c.consecutive_failures, c.next_retry_at,
       (c.status IN ('connected', 'error')
        AND coalesce(c.last_success_at, c.connected_at) < now() - interval '24 hours') AS no_success_24h
FROM ironwod.integrations_wodify_connection c;
COMMENT ON VIEW ironwod.connection_health IS 'Per-connection health; no_success_24h is the "no successful sync in 24 h" alert';

CREATE VIEW ironwod.runs WITH (security_invoker = true) AS
SELECT r.tenant_id, r.gym_id, r.run_id, r.mode, r.status, r.requested_at, r.started_at, r.finished_at,
       r.finished_at - r.started_at AS duration, r.requests, r.retries, r.attempts_2xx, r.attempts_429,
       r.attempts_4xx, r.attempts_5xx, r.attempts_network, r.attempts_envelope, r.token_wait_s, r.backoff_s,
       r.bytes_received, r.error_code, r.last_error, r.failed_phase,
       (SELECT jsonb_object_agg(s.entity, jsonb_build_object('pulled', s.pulled, 'new', s.new_versions,
                                                             'unchanged', s.unchanged, 'transformed', s.transformed,
                                                             'deleted', s.deleted, 'quarantined', s.quarantined))
        FROM ironwod.sync_run_entities s
        WHERE s.tenant_id = r.tenant_id AND s.gym_id = r.gym_id AND s.run_id = r.run_id) AS entities
FROM ironwod.sync_runs r;
COMMENT ON VIEW ironwod.runs IS 'Sync runs with duration, attempts by outcome, waits, bytes and per-entity counts';

-- API latency per run and endpoint (entity): the histogram of design.md §6.
CREATE VIEW ironwod.run_latency WITH (security_invoker = true) AS
SELECT s.tenant_id, s.gym_id, s.run_id, s.entity, e.path AS endpoint, s.pages,
       round((s.latency_ms / nullif(s.pages, 0))::numeric, 1) AS mean_ms,
       (SELECT jsonb_object_agg(CASE WHEN b <= 7 THEN '<' || (ironwod.latency_buckets())[b] ELSE '>=5000' END,
                                s.latency_hist[b] ORDER BY b)
        FROM generate_series(1, 8) b) AS histogram_ms
FROM ironwod.sync_run_entities s
JOIN ironwod.entities e ON e.entity = s.entity;
COMMENT ON VIEW ironwod.run_latency IS 'API latency per run and endpoint: mean and histogram of the successful page requests';
-- 62_check_config: configuration problems found early.  ironwod.check_config()
-- returns one row per check, each failure with a message that names the cause
-- and a hint that names the fix; the supervisor runs it when it starts (and after
-- every configuration reload) and logs each failure as a WARNING.  Nothing here
-- returns or logs a secret: the master key command is run by a validate worker,
-- which reports key ids and counts only.

-- Who may log in as the worker role, according to pg_hba.conf as it is on disk
-- (pg_hba_file_rules), per channel: the first rule that applies to the role wins,
-- as in PostgreSQL itself.  The worker role has LOGIN (background workers need it
-- on PostgreSQL 15) and no password; background workers skip pg_hba, so every
-- rule that lets it in is a door nobody needs.
CREATE FUNCTION ironwod.worker_hba_problems(p_role name, p_database name)
RETURNS TABLE (channel text, line_number integer, auth_method text, address text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
    v_local_done boolean := false;
    v_host_done boolean := false;
BEGIN
    FOR r IN
        SELECT h.line_number, h.type, h.auth_method, h.address, h.netmask
        FROM pg_hba_file_rules h
        WHERE h.error IS NULL
          AND (h.user_name && ARRAY['all', p_role]::text[]
               OR EXISTS (SELECT 1 FROM unnest(h.user_name) u
                          WHERE u LIKE '+%' AND EXISTS (SELECT 1 FROM pg_roles g WHERE g.rolname = substr(u, 2))
                            AND pg_has_role(p_role, substr(u, 2), 'MEMBER')))
          AND (h.database && ARRAY['all', p_database]::text[]
               OR ('sameuser' = ANY (h.database) AND p_role = p_database)
               OR ('samerole' = ANY (h.database) AND EXISTS (SELECT 1 FROM pg_roles g WHERE g.rolname = p_database)
                   AND pg_has_role(p_role, p_database, 'MEMBER')))
        ORDER BY h.line_number
    LOOP
        IF r.type = 'local' THEN
            IF NOT v_local_done THEN
                v_local_done := true;
                IF r.auth_method <> 'reject' THEN
                    channel := 'local'; line_number := r.line_number; auth_method := r.auth_method; address := NULL;
                    RETURN NEXT;
                END IF;
            END IF;
        ELSIF NOT v_host_done THEN
            -- a reject for every address closes the network; a narrower one does not
            IF r.auth_method = 'reject' THEN
                v_host_done := r.address = 'all'
                               OR (r.address IN ('0.0.0.0', '::') AND r.netmask IN ('0.0.0.0', '::'));
            ELSE
                channel := 'host'; line_number := r.line_number; auth_method := r.auth_method;
                address := coalesce(r.address || coalesce('/' || r.netmask, ''), 'all');
                RETURN NEXT;
                -- an all-address rule that admits the role hides everything after it
                v_host_done := r.address = 'all';
            END IF;
        END IF;
    END LOOP;
END
$$;
COMMENT ON FUNCTION ironwod.worker_hba_problems(name, name) IS 'The pg_hba.conf rules (on disk) that let a role log in to a database: per channel (local, host), the rules that apply to it before a reject covers that channel';

CREATE FUNCTION ironwod.check_config()
RETURNS TABLE (check_name text, ok boolean, message text, hint text)
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_db text := current_setting('ironwod.database_name');
    v_role text := current_setting('ironwod.worker_role');
    v_cmd text := current_setting('ironwod.master_key_command');
    v_url text := current_setting('ironwod.base_url');
    v_need integer;
    v_have integer := current_setting('max_worker_processes')::integer;
    v_bad text;
    v record;
BEGIN
    check_name := 'database';
    ok := v_db = current_database();
    message := CASE WHEN ok THEN format('the supervisor serves this database (%s)', v_db)
                    ELSE format('ironwod is installed in database "%s" but ironwod.database_name is "%s", so no supervisor serves it',
                                current_database(), v_db) END;
    hint := CASE WHEN NOT ok THEN format('Set ironwod.database_name = ''%s'' in postgresql.conf and restart the server.', current_database()) END;
    RETURN NEXT;

    check_name := 'supervisor';
    ok := EXISTS (SELECT 1 FROM pg_stat_activity a
                  WHERE a.backend_type = 'ironwod supervisor' AND a.datname = current_database());
    message := CASE WHEN ok THEN 'the ironwod supervisor is running'
                    WHEN EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.backend_type = 'ironwod launcher')
                    THEN 'the ironwod launcher runs, but no supervisor serves this database'
                    ELSE 'no ironwod launcher or supervisor is running' END;
    hint := CASE WHEN NOT ok THEN 'Look for ironwod messages in the server log; the launcher says why it does not start the supervisor (a missing database, no free worker slot).' END;
    RETURN NEXT;

    -- launcher + supervisor + run workers (+ pg_cron's launcher); validate workers are brief
    v_need := 2 + current_setting('ironwod.max_workers')::integer
              + CASE WHEN current_setting('shared_preload_libraries') ~ '(^|[\s,])"?pg_cron"?($|[\s,])' THEN 1 ELSE 0 END;
    check_name := 'worker_slots';
    ok := v_have >= v_need;
    message := format('max_worker_processes is %s; ironwod with ironwod.max_workers = %s needs %s', v_have,
                      current_setting('ironwod.max_workers'), v_need);
    hint := CASE WHEN NOT ok THEN format('Raise max_worker_processes to at least %s (more for parallel query) and restart; see the README''s worker budget.', v_need + 1) END;
    RETURN NEXT;

    check_name := 'worker_role';
    SELECT r.rolname, r.rolsuper, r.rolcanlogin, a.rolpassword IS NOT NULL AS has_password INTO v
    FROM pg_roles r JOIN pg_authid a ON a.oid = r.oid WHERE r.rolname = v_role;
    ok := FOUND AND NOT v.rolsuper AND v.rolcanlogin AND NOT v.has_password;
    message := CASE WHEN NOT FOUND THEN format('ironwod.worker_role "%s" does not exist', v_role)
                    WHEN v.rolsuper THEN format('ironwod.worker_role "%s" is a superuser, so row-level security would not bind the workers', v_role)
                    WHEN NOT v.rolcanlogin THEN format('ironwod.worker_role "%s" cannot log in; background workers need LOGIN on PostgreSQL 15', v_role)
                    WHEN v.has_password THEN format('ironwod.worker_role "%s" has a password, so anyone who knows it can log in as the workers', v_role)
                    ELSE format('the run workers connect as "%s", a non-superuser bound by row-level security', v_role) END;
    hint := CASE WHEN NOT FOUND THEN 'Point ironwod.worker_role at ironwod_worker (created by the extension), or create the role.'
                 WHEN v.rolsuper THEN format('ALTER ROLE %I NOSUPERUSER, or point ironwod.worker_role at ironwod_worker.', v_role)
                 WHEN NOT v.rolcanlogin THEN format('ALTER ROLE %I LOGIN (and reject it in pg_hba.conf).', v_role)
                 WHEN v.has_password THEN format('ALTER ROLE %I PASSWORD NULL; the workers need none.', v_role) END;
    RETURN NEXT;

    check_name := 'worker_pg_hba';
    SELECT string_agg(format('line %s admits it over %s (%s%s)', p.line_number,
                             CASE p.channel WHEN 'local' THEN 'the Unix socket' ELSE 'TCP' END, p.auth_method,
                             coalesce(' from ' || p.address, '')), '; ' ORDER BY p.line_number)
    INTO v_bad FROM ironwod.worker_hba_problems(v_role, current_database()) p;
    IF v_bad IS NULL THEN
        SELECT string_agg(format('line %s: %s', h.line_number, h.error), '; ') INTO v_bad
        FROM pg_hba_file_rules h WHERE h.error IS NOT NULL;
        ok := v_bad IS NULL;
        message := coalesce('pg_hba.conf has errors: ' || v_bad,
                            format('pg_hba.conf rejects "%s" before any rule could let it log in', v_role));
        hint := CASE WHEN NOT ok THEN 'Fix those lines; the server keeps the previous pg_hba.conf until the file loads.' END;
    ELSE
        ok := false;
        message := format('pg_hba.conf admits "%s", as whom only background workers (which skip pg_hba.conf) should connect, before any line rejects it: %s', v_role, v_bad);
        hint := format('Put "local all %1$s reject" and "host all %1$s all reject" in pg_hba.conf above every other line that could match (Debian''s own lines included), then SELECT pg_reload_conf().', v_role);
    END IF;
    RETURN NEXT;

    check_name := 'base_url';
    ok := v_url ~* '^https://' OR (v_url ~* '^http://' AND current_setting('ironwod.allow_http')::boolean);
    message := format('ironwod.base_url is %s', v_url);
    hint := CASE WHEN NOT ok THEN 'Use an https:// URL (plain http:// only with ironwod.allow_http = on, for tests).' END;
    RETURN NEXT;

    check_name := 'master_key';
    ok := EXISTS (SELECT 1 FROM ironwod.master_keys k WHERE k.is_active);
    message := CASE WHEN ok THEN (SELECT format('API keys are sealed to master key "%s"', k.key_id)
                                  FROM ironwod.master_keys k WHERE k.is_active ORDER BY k.created_at DESC LIMIT 1)
                    ELSE 'no master key is registered, so no API key can be sealed' END;
    hint := CASE WHEN NOT ok THEN 'Register the public half: SELECT ironwod.register_master_key(''<key id>'', decode(''<64 hex>'', ''hex'')); see the README.' END;
    RETURN NEXT;

    check_name := 'master_key_command';
    SELECT * INTO v FROM ironwod.key_command_access();
    ok := v.ok;
    message := v.message;
    hint := v.hint;
    RETURN NEXT;

    -- Running the command needs a validate worker; without a usable command file
    -- or a registered key there is nothing to learn from it.
    IF ok THEN
        check_name := 'master_key_output';
        SELECT * INTO v FROM ironwod.probe_master_key_command();
        ok := v.ok;
        message := v.message;
        hint := v.hint;
        RETURN NEXT;
    END IF;
END
$$;
COMMENT ON FUNCTION ironwod.check_config() IS 'Admin: configuration checks (database, supervisor, worker slots, worker role and pg_hba.conf, base URL, master key, master key command file and output), each with a message naming the cause and a hint naming the fix';
REVOKE ALL ON FUNCTION ironwod.worker_hba_problems(name, name), ironwod.check_config() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ironwod.check_config() TO ironwod_admin;
-- 70_canonical: canonical business tables, the metric settings, and the fact and
-- cache tables the metrics compute writes (metrics.md §5).  Canonical rows are a
-- deterministic function of the raw tables: typed columns, Wodify sentinels
-- (1900-01-01, 0, "") as NULL, money as numeric, civil dates as date, instants as
-- timestamptz, the raw row they came from (raw_id) and soft-delete columns.
-- tenant_id and gym_id lead every key; RLS is applied below, as in 30_tenancy.
-- No foreign key to the connection: every row here is derived from raw rows (which
-- have one), and a per-row RI check would cost a fifth of a backfill's transform.

-- The tenancy policies of 30_tenancy for one table created after it.
CREATE FUNCTION ironwod.apply_tenant_policies(p_table regclass)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', p_table);
    EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', p_table);
    EXECUTE format($p$CREATE POLICY tenant_scope ON %s TO ironwod_app, ironwod_worker
                      USING (tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym())
                      WITH CHECK (tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym())$p$, p_table);
    EXECUTE format('CREATE POLICY admin_read ON %s FOR SELECT TO ironwod_admin USING (true)', p_table);
END
$$;
COMMENT ON FUNCTION ironwod.apply_tenant_policies(regclass) IS 'Install time: enable and force RLS on a tenant table with the tenant_scope and admin_read policies of 30_tenancy';

-- ---------------------------------------------------------------------------------
-- Canonical tables
-- ---------------------------------------------------------------------------------

CREATE TABLE ironwod.locations (
    tenant_id          uuid NOT NULL,
    gym_id             uuid NOT NULL,
    location_id        bigint NOT NULL,
    name               text,
    time_zone          text,
    customer_id        bigint,
    created_at         timestamptz,
    raw_id             bigint NOT NULL,
    source_updated_at  timestamptz,
    deleted_at         timestamptz,
    deleted_by_run     bigint,
    PRIMARY KEY (tenant_id, gym_id, location_id)
);
COMMENT ON TABLE ironwod.locations IS 'Canonical Wodify locations; time_zone is the IANA zone (the gym''s zone is that of its first location by id)';

CREATE TABLE ironwod.programs (
    tenant_id          uuid NOT NULL,
    gym_id             uuid NOT NULL,
    program_id         bigint NOT NULL,
    name               text,
    is_active          boolean,
    created_at         timestamptz,
    raw_id             bigint NOT NULL,
    source_updated_at  timestamptz,
    deleted_at         timestamptz,
    deleted_by_run     bigint,
    PRIMARY KEY (tenant_id, gym_id, program_id)
);
COMMENT ON TABLE ironwod.programs IS 'Canonical Wodify programs';

CREATE TABLE ironwod.members (
    tenant_id          uuid NOT NULL,
    gym_id             uuid NOT NULL,
    member_id          bigint NOT NULL,
    first_name         text,
    last_name          text,
    email              text,
    client_status      text,
    location_id        bigint,
    member_since       date,
    created_at         timestamptz,
    last_class_sign_in timestamptz,
    raw_id             bigint NOT NULL,
    source_updated_at  timestamptz,
    deleted_at         timestamptz,
    deleted_by_run     bigint,
    PRIMARY KEY (tenant_id, gym_id, member_id)
);
COMMENT ON TABLE ironwod.members IS 'Canonical Wodify clients (people); member_id is the Wodify client id';

CREATE TABLE ironwod.memberships (
    tenant_id             uuid NOT NULL,
    gym_id                uuid NOT NULL,
    membership_id         bigint NOT NULL,
    member_id             bigint,
    name                  text,
    membership_type       text,
    is_deleted            boolean NOT NULL DEFAULT false,
    start_date            date,
    end_date              date,
    cancellation_requested_on date,
    does_expire           boolean,
    is_auto_renew         boolean,
    price                 numeric(12,2),
    billing_period_length integer,
    billing_period_unit   text,
    location_id           bigint,
    created_at            timestamptz,
    raw_id                bigint NOT NULL,
    source_updated_at     timestamptz,
    deleted_at            timestamptz,
    deleted_by_run        bigint,
    PRIMARY KEY (tenant_id, gym_id, membership_id)
);
COMMENT ON TABLE ironwod.memberships IS 'Canonical memberships: end_date is the last day of access (inclusive, NULL = open-ended); price and billing period from payment_plan';
CREATE INDEX ON ironwod.memberships (tenant_id, gym_id, member_id);

CREATE TABLE ironwod.membership_holds (
    tenant_id          uuid NOT NULL,
    gym_id             uuid NOT NULL,
    hold_id            bigint NOT NULL,
    membership_id      bigint,
    member_id          bigint,
    hold_start_date    date,
    hold_end_date      date,
    hold_reason        text,
    raw_id             bigint NOT NULL,
    source_updated_at  timestamptz,
    deleted_at         timestamptz,
    deleted_by_run     bigint,
    PRIMARY KEY (tenant_id, gym_id, hold_id)
);
COMMENT ON TABLE ironwod.membership_holds IS 'Canonical membership holds; hold_end_date is inclusive';

CREATE TABLE ironwod.attendance_events (
    tenant_id          uuid NOT NULL,
    gym_id             uuid NOT NULL,
    signin_id          bigint NOT NULL,
    member_id          bigint,
    class_id           bigint,
    class_start_at     timestamptz,
    location_id        bigint,
    program_id         bigint,
    membership_id      bigint,
    is_drop_in         boolean,
    raw_id             bigint NOT NULL,
    source_updated_at  timestamptz,
    deleted_at         timestamptz,
    deleted_by_run     bigint,
    PRIMARY KEY (tenant_id, gym_id, signin_id)
);
COMMENT ON TABLE ironwod.attendance_events IS 'Canonical class sign-ins (one visit per person per class instance)';

CREATE TABLE ironwod.invoices (
    tenant_id          uuid NOT NULL,
    gym_id             uuid NOT NULL,
    invoice_id         bigint NOT NULL,
    invoice_number     text,
    member_id          bigint,
    membership_id      bigint,
    location_id        bigint,
    status             text,
    due_date           date,
    paid_on            date,
    amount             numeric(12,2),
    created_at         timestamptz,
    raw_id             bigint NOT NULL,
    source_updated_at  timestamptz,
    deleted_at         timestamptz,
    deleted_by_run     bigint,
    PRIMARY KEY (tenant_id, gym_id, invoice_id)
);
COMMENT ON TABLE ironwod.invoices IS 'Canonical invoices: due and paid-on civil dates, final charge, status';

CREATE TABLE ironwod.transactions (
    tenant_id          uuid NOT NULL,
    gym_id             uuid NOT NULL,
    transaction_id     bigint NOT NULL,
    invoice_id         bigint,
    member_id          bigint,
    location_id        bigint,
    processed_at       timestamptz,
    amount             numeric(12,2),
    transaction_type   text,
    payment_method     text,
    raw_id             bigint NOT NULL,
    source_updated_at  timestamptz,
    deleted_at         timestamptz,
    deleted_by_run     bigint,
    PRIMARY KEY (tenant_id, gym_id, transaction_id)
);
COMMENT ON TABLE ironwod.transactions IS 'Canonical transactions: Payment, Refund or Failed Payment at an instant';

-- ---------------------------------------------------------------------------------
-- Settings, change tracking, facts and the cache
-- ---------------------------------------------------------------------------------

-- One row per gym, created with the defaults on its first refresh.  Every parameter
-- goes into config_hash; changing one makes the next refresh recompute everything.
CREATE TABLE ironwod.metric_settings (
    tenant_id                uuid NOT NULL,
    gym_id                   uuid NOT NULL,
    merge_gap_days           integer NOT NULL DEFAULT 7 CHECK (merge_gap_days BETWEEN 0 AND 90),
    rescind_max_days         integer NOT NULL DEFAULT 7 CHECK (rescind_max_days BETWEEN 0 AND 90),
    absence_short_days       integer NOT NULL DEFAULT 14 CHECK (absence_short_days > 0),
    absence_long_days        integer NOT NULL DEFAULT 30 CHECK (absence_long_days > 0),
    decline_recent_days      integer NOT NULL DEFAULT 28 CHECK (decline_recent_days > 0),
    decline_prior_days       integer NOT NULL DEFAULT 56 CHECK (decline_prior_days > 0),
    decline_ratio            numeric NOT NULL DEFAULT 0.5 CHECK (decline_ratio > 0),
    decline_min_exposure     numeric NOT NULL DEFAULT 0.75 CHECK (decline_min_exposure BETWEEN 0 AND 1),
    decline_min_weekly_rate  numeric NOT NULL DEFAULT 1.0 CHECK (decline_min_weekly_rate >= 0),
    cohort_days              integer NOT NULL DEFAULT 90 CHECK (cohort_days > 0),
    trailing_months          integer NOT NULL DEFAULT 4 CHECK (trailing_months BETWEEN 1 AND 36),
    max_spread_months        integer NOT NULL DEFAULT 12 CHECK (max_spread_months BETWEEN 1 AND 36),
    qualifying_types         text[] NOT NULL DEFAULT '{Class Plan}',
    history_start_date       date,
    definitions_version      text NOT NULL DEFAULT 'metrics-v1.0',
    PRIMARY KEY (tenant_id, gym_id),
    FOREIGN KEY (tenant_id, gym_id) REFERENCES ironwod.integrations_wodify_connection,
    CHECK (history_start_date IS NULL OR extract(day FROM history_start_date) = 1)
);
COMMENT ON TABLE ironwod.metric_settings IS 'Metric parameters per gym (metrics.md v1 scope): merge gap, rescind window, absence and decline thresholds, trailing recompute window; history_start_date NULL = derived from the data';

-- The earliest civil date each run's changes touched, per entity: refresh_metrics
-- recomputes from that month on (plus the trailing window).
CREATE TABLE ironwod.metric_dirty (
    tenant_id   uuid NOT NULL,
    gym_id      uuid NOT NULL,
    run_id      bigint NOT NULL,
    entity      text NOT NULL,
    dirty_from  date NOT NULL,
    changed     integer NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, gym_id, run_id, entity)
);
COMMENT ON TABLE ironwod.metric_dirty IS 'Per run and entity: the earliest civil date a canonical change touched (the backdated-change input of the recompute policy, metrics.md §5.4)';

-- Merged coverage spells per person, gym-wide (location_key ALL) and per location.
CREATE TABLE ironwod.member_spell (
    tenant_id      uuid NOT NULL,
    gym_id         uuid NOT NULL,
    location_key   text NOT NULL,
    member_id      bigint NOT NULL,
    spell_start    date NOT NULL,
    spell_end_excl date NOT NULL,           -- 'infinity' when open-ended
    spell_no       integer,                 -- 1 = first spell; NULL when rescinded
    is_first       boolean NOT NULL,
    rescinded      boolean NOT NULL,
    net_revenue    numeric(12,2) NOT NULL,
    membership_ids bigint[] NOT NULL,
    PRIMARY KEY (tenant_id, gym_id, location_key, member_id, spell_start)
);
COMMENT ON TABLE ironwod.member_spell IS 'Merged member-qualifying coverage spells (metrics.md §2.3); rescinded spells are kept for audit but count nowhere';

-- One row per person, location key and month (metrics.md §5.3): the cache is a
-- GROUP BY over it, and drill-downs read it.
CREATE TABLE ironwod.member_month_fact (
    tenant_id            uuid NOT NULL,
    gym_id               uuid NOT NULL,
    location_key         text NOT NULL,
    member_id            bigint NOT NULL,
    month_start          date NOT NULL,
    as_of                date NOT NULL,          -- last day of the month, or today if partial
    state_start          text NOT NULL CHECK (state_start IN ('ACTIVE', 'ON_HOLD', 'NOT_MEMBER')),
    state_end            text NOT NULL CHECK (state_end IN ('ACTIVE', 'ON_HOLD', 'NOT_MEMBER')),
    mrr_start            numeric(12,2) NOT NULL,
    mrr_end              numeric(12,2) NOT NULL,
    movement             text CHECK (movement IN ('new', 'reactivation', 'churn', 'expansion',
                                                  'contraction', 'hold_out', 'hold_in')),
    mrr_delta            numeric(12,2) NOT NULL,
    new_events           integer NOT NULL,
    reactivated_events   integer NOT NULL,
    churn_events         integer NOT NULL,
    new_and_churned      integer NOT NULL,
    active_days          integer NOT NULL,
    hold_days            integer NOT NULL,
    visits               integer NOT NULL,
    member_visits        integer NOT NULL,
    tenure_active_days   integer NOT NULL,
    absent_active_days   integer,
    is_past_due_end      boolean NOT NULL,
    is_comped_end        boolean NOT NULL,
    is_pending_cancel_end boolean NOT NULL,
    is_zero_visits       boolean NOT NULL,
    is_no_visit_short    boolean NOT NULL,
    is_no_visit_long     boolean NOT NULL,
    is_declining         boolean NOT NULL,
    is_paying            boolean NOT NULL,
    cohort_retained_90d  boolean,               -- set for new_events > 0
    PRIMARY KEY (tenant_id, gym_id, location_key, month_start, member_id)
);
COMMENT ON TABLE ironwod.member_month_fact IS 'Member-month facts (metrics.md §5.3): state and MRR at both snapshots, movement, flows, visits, active days and risk flags';

CREATE TABLE ironwod.gym_monthly_metrics_cache (
    tenant_id                     uuid NOT NULL,
    gym_id                        uuid NOT NULL,
    location_key                  text NOT NULL,
    program_key                   text NOT NULL DEFAULT 'ALL',
    month_start                   date NOT NULL CHECK (extract(day FROM month_start) = 1),
    time_zone                     text NOT NULL,
    period_days                   integer NOT NULL,
    is_partial                    boolean NOT NULL,
    history_start_date            date NOT NULL,
    computed_at                   timestamptz NOT NULL,
    source_watermark              timestamptz,
    definitions_version           text NOT NULL,
    config_hash                   text NOT NULL,
    -- Metric columns are NULL where the truth is unknown: a metric that depends on
    -- an entity the gym's Wodify plan does not include (ironwod.metric_sources).
    members_start                 integer,
    members_end                   integer,
    active_members_end            integer,
    on_hold_members_end           integer,
    past_due_members_end          integer,
    comped_members_end            integer,
    members_pending_cancel_end    integer,
    new_members                   integer,
    reactivated_members           integer,
    churned_members               integer,
    churned_from_start            integer,
    new_and_churned_same_month    integer,
    net_member_change             integer,
    churn_rate                    numeric(7,5),
    retention_rate                numeric(7,5),
    net_member_growth_rate        numeric(7,5),
    active_member_days            integer,
    avg_active_members            numeric(10,2),
    paying_members                integer,
    mrr_start                     numeric(12,2),
    mrr_end                       numeric(12,2),
    mrr_new                       numeric(12,2),
    mrr_reactivation              numeric(12,2),
    mrr_expansion                 numeric(12,2),
    mrr_contraction               numeric(12,2),
    mrr_churn                     numeric(12,2),
    mrr_hold_out                  numeric(12,2),
    mrr_hold_in                   numeric(12,2),
    collected_gross               numeric(12,2),
    refunds                       numeric(12,2),
    collected_net                 numeric(12,2),
    failed_payment_invoices       integer,
    failed_payment_amount         numeric(12,2),
    invoiced_amount               numeric(12,2),
    invoiced_collected_to_date    numeric(12,2),
    past_due_amount_end           numeric(12,2),
    membership_revenue_recognised numeric(12,2),
    service_revenue_net           numeric(12,2),
    arm                           numeric(10,2),
    service_revenue_per_active_member numeric(10,2),
    arm_6m                        numeric(10,2),
    leg_months_6m                 numeric(8,2),
    ltv                           numeric(12,2),
    avg_tenure_months_end         numeric(8,2),
    member_visits                 integer,
    all_visits                    integer,
    appointment_visits            integer DEFAULT 0,
    visits_per_active_member_week numeric(6,3),
    members_zero_visits_month     integer,
    members_no_visit_14d_end      integer,
    members_no_visit_30d_end      integer,
    members_attendance_declining_end integer,
    cohort_new_members            integer,
    cohort_retained_90d           integer,
    cohort_90d_retention_rate     numeric(7,5),
    cohort_90d_is_final           boolean,
    PRIMARY KEY (tenant_id, gym_id, location_key, program_key, month_start)
);
COMMENT ON TABLE ironwod.gym_monthly_metrics_cache IS 'Monthly gym metrics (metrics.md §5.2, v1 scope): per location and ALL (distinct people), program_key ALL; flows are NULL in the history-start month; retail_revenue_net is omitted in v1 (no revenue categories)';

SELECT ironwod.apply_tenant_policies(t::regclass)
FROM unnest(ARRAY['ironwod.locations', 'ironwod.programs', 'ironwod.members', 'ironwod.memberships',
                  'ironwod.membership_holds', 'ironwod.attendance_events', 'ironwod.invoices',
                  'ironwod.transactions', 'ironwod.metric_settings', 'ironwod.metric_dirty',
                  'ironwod.member_spell', 'ironwod.member_month_fact',
                  'ironwod.gym_monthly_metrics_cache']) AS t;

-- The app and admins read their scope (RLS); only the workers write.
GRANT SELECT ON ironwod.locations, ironwod.programs, ironwod.members, ironwod.memberships,
    ironwod.membership_holds, ironwod.attendance_events, ironwod.invoices, ironwod.transactions,
    ironwod.metric_settings, ironwod.member_spell, ironwod.member_month_fact,
    ironwod.gym_monthly_metrics_cache
    TO ironwod_app, ironwod_admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON ironwod.locations, ironwod.programs, ironwod.members,
    ironwod.memberships, ironwod.membership_holds, ironwod.attendance_events, ironwod.invoices,
    ironwod.transactions, ironwod.metric_dirty, ironwod.member_spell, ironwod.member_month_fact,
    ironwod.gym_monthly_metrics_cache
    TO ironwod_worker;
GRANT SELECT, INSERT ON ironwod.metric_settings TO ironwod_worker;
GRANT UPDATE ON ironwod.metric_settings TO ironwod_admin;
CREATE POLICY admin_settings ON ironwod.metric_settings FOR UPDATE TO ironwod_admin USING (true) WITH CHECK (true);
-- 72_transforms: raw -> canonical, set-based and idempotent (design.md §4), one
-- generic path driven by the entity registry.  Each entity has one mapping (its
-- canonical table and a jsonb -> typed column expression per column, below); the
-- canonical row of a record is built from its latest raw version
-- (latest_raw_versions).  transform_run(run) rebuilds exactly the records that got a
-- new payload version in that run; transform_all() rebuilds every record of the
-- scope.  An upsert writes a row only when something in it changed, so a second
-- call, or a re-landed page, changes nothing.  Each changed record also reports the
-- earliest civil date it touched (old and new version), which the metrics refresh
-- uses to recompute backdated months (metrics.md §5.4).

-- Runs whose landed versions have been transformed.  transform_run(run) takes the
-- versions of that run and of every earlier run not yet transformed: a run that
-- failed after landing pages leaves versions that a later run only re-sees (same
-- hash, so their ingest_run_id stays the failed run's), and they must not be lost.
CREATE TABLE ironwod.transformed_runs (
    tenant_id       uuid NOT NULL,
    gym_id          uuid NOT NULL,
    run_id          bigint NOT NULL,
    transformed_by  bigint NOT NULL,
    transformed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, gym_id, run_id),
    FOREIGN KEY (tenant_id, gym_id) REFERENCES ironwod.integrations_wodify_connection
);
COMMENT ON TABLE ironwod.transformed_runs IS 'Runs whose landed raw versions transform_run has turned into canonical rows';
SELECT ironwod.apply_tenant_policies('ironwod.transformed_runs');
GRANT SELECT, INSERT ON ironwod.transformed_runs TO ironwod_worker;
GRANT SELECT ON ironwod.transformed_runs TO ironwod_app, ironwod_admin;

-- transform_run finds a run's versions by ingest_run_id.
DO $idx$
DECLARE
    t name;
BEGIN
    FOR t IN SELECT raw_table FROM ironwod.entities ORDER BY ordinal LOOP
        EXECUTE format('CREATE INDEX ON ironwod.%I (tenant_id, gym_id, ingest_run_id)', t);
    END LOOP;
END
$idx$;

-- Wodify sentinels: 1900-01-01 dates, 0 ids and "" texts mean "no value".
CREATE FUNCTION ironwod.j_date(p text) RETURNS date
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN p ~ '^\d{4}-\d{2}-\d{2}' AND left(p, 10) <> '1900-01-01'
                THEN left(p, 10)::date END
$$;
COMMENT ON FUNCTION ironwod.j_date(text) IS 'Wodify civil date text to date (first 10 characters, never through a time zone); the 1900-01-01 sentinel and garbage become NULL';

CREATE FUNCTION ironwod.j_id(p jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN jsonb_typeof(p) = 'number' OR p #>> '{}' ~ '^\d+$'
                THEN nullif((p #>> '{}')::numeric, 0)::bigint END
$$;
COMMENT ON FUNCTION ironwod.j_id(jsonb) IS 'Wodify id to bigint; the 0 sentinel and non-numbers become NULL';

CREATE FUNCTION ironwod.j_num(p jsonb) RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN jsonb_typeof(p) = 'number' OR p #>> '{}' ~ '^-?\d+(\.\d+)?$'
                THEN (p #>> '{}')::numeric END
$$;
COMMENT ON FUNCTION ironwod.j_num(jsonb) IS 'JSON number (or numeric string) to numeric; anything else NULL';

CREATE FUNCTION ironwod.j_text(p text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT nullif(p, '') $$;
COMMENT ON FUNCTION ironwod.j_text(text) IS 'Wodify text; the "" sentinel becomes NULL';

CREATE FUNCTION ironwod.j_plan(p jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT coalesce(p -> 'payment_plan', p -> 'payload_plan', '{}') $$;
COMMENT ON FUNCTION ironwod.j_plan(jsonb) IS 'The payment plan object of a Wodify membership (payment_plan, or the misspelt payload_plan some payloads carry)';

-- The gym's zone: the first Wodify location by id that names a valid IANA zone, else
-- the connection's time_zone, else UTC.
CREATE FUNCTION ironwod.gym_time_zone(p_tenant_id uuid, p_gym_id uuid) RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_tz text;
BEGIN
    SELECT coalesce(
        (SELECT l.time_zone FROM ironwod.locations l
         WHERE l.tenant_id = p_tenant_id AND l.gym_id = p_gym_id
           AND l.deleted_at IS NULL AND l.time_zone IS NOT NULL
         ORDER BY l.location_id LIMIT 1),
        (SELECT c.time_zone FROM ironwod.integrations_wodify_connection c
         WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id),
        'UTC') INTO v_tz;
    BEGIN
        PERFORM now() AT TIME ZONE v_tz;
    EXCEPTION WHEN invalid_parameter_value THEN
        v_tz := 'UTC';
    END;
    RETURN v_tz;
END
$$;
COMMENT ON FUNCTION ironwod.gym_time_zone(uuid, uuid) IS 'IANA zone of a gym: its first Wodify location by id, else the connection''s time_zone, else UTC';

-- ---------------------------------------------------------------------------------
-- The mapping: one row per entity, one row per canonical column
-- ---------------------------------------------------------------------------------

-- dirty_from is SQL over o and u, the canonical row before and after a change (o
-- is all NULL for a new record), row_day over c, a canonical row; $3 is the gym's
-- zone in both.
CREATE TABLE ironwod.canonical_maps (
    entity      text PRIMARY KEY REFERENCES ironwod.entities,
    canonical   name NOT NULL UNIQUE,
    key_column  name NOT NULL,
    -- the earliest civil date a change touched (NULL: no metric depends on it)
    dirty_from  text,
    -- the earliest civil date a row affects (for soft deletes and restores)
    row_day     text
);
COMMENT ON TABLE ironwod.canonical_maps IS 'Raw -> canonical mapping per entity: canonical table, key, and the earliest civil date a change touches';

-- Expressions are SQL over p (the payload jsonb) and l (the raw row).
CREATE TABLE ironwod.canonical_columns (
    entity       text NOT NULL REFERENCES ironwod.canonical_maps,
    ord          integer NOT NULL,
    column_name  name NOT NULL,
    expr         text NOT NULL,
    PRIMARY KEY (entity, ord),
    UNIQUE (entity, column_name)
);
COMMENT ON TABLE ironwod.canonical_columns IS 'Raw -> canonical mapping per entity: the jsonb -> typed expression of each canonical column (besides tenant_id, gym_id, key, raw_id and source_updated_at)';

INSERT INTO ironwod.canonical_maps (entity, canonical, key_column, dirty_from, row_day) VALUES
    -- a new location, or one whose zone or deletion changed: everything
    ('locations', 'locations', 'location_id',
     $$CASE WHEN o.location_id IS NULL OR (o.time_zone, o.deleted_at) IS DISTINCT FROM (u.time_zone, u.deleted_at)
            THEN date '0001-01-01' END$$, NULL),
    ('programs', 'programs', 'program_id', NULL, NULL),
    ('clients', 'members', 'member_id', NULL, NULL),
    -- from the start when coverage, price or location moved, else from the end
    ('memberships', 'memberships', 'membership_id',
     $$CASE WHEN o.membership_id IS NULL
                 OR (o.member_id, o.start_date, o.price, o.membership_type, o.is_deleted, o.location_id,
                     o.billing_period_length, o.billing_period_unit)
                    IS DISTINCT FROM
                    (u.member_id, u.start_date, u.price, u.membership_type, u.is_deleted, u.location_id,
                     u.billing_period_length, u.billing_period_unit)
            THEN least(o.start_date, u.start_date)
            ELSE least(o.end_date + 1, u.end_date + 1, o.cancellation_requested_on, u.cancellation_requested_on)
       END$$, 'c.start_date'),
    ('membership_holds', 'membership_holds', 'hold_id',
     $$CASE WHEN o.hold_id IS NULL
                 OR (o.membership_id, o.hold_start_date) IS DISTINCT FROM (u.membership_id, u.hold_start_date)
            THEN least(o.hold_start_date, u.hold_start_date)
            ELSE least(o.hold_end_date, u.hold_end_date) + 1
       END$$, 'c.hold_start_date'),
    ('class_signins', 'attendance_events', 'signin_id',
     'least((o.class_start_at AT TIME ZONE $3)::date, (u.class_start_at AT TIME ZONE $3)::date)',
     '(c.class_start_at AT TIME ZONE $3)::date'),
    ('invoices', 'invoices', 'invoice_id', 'least(o.due_date, u.due_date, o.paid_on, u.paid_on)', 'c.due_date'),
    ('transactions', 'transactions', 'transaction_id',
     'least((o.processed_at AT TIME ZONE $3)::date, (u.processed_at AT TIME ZONE $3)::date)',
     '(c.processed_at AT TIME ZONE $3)::date');

INSERT INTO ironwod.canonical_columns (entity, ord, column_name, expr)
SELECT x.entity, x.ord, x.col, x.expr FROM (VALUES
    ('locations', 1, 'name', $$ironwod.j_text(p ->> 'name')$$),
    ('locations', 2, 'time_zone', $$ironwod.j_text(p ->> 'time_zone_iana')$$),
    ('locations', 3, 'customer_id', $$ironwod.j_id(p -> 'customer_id')$$),
    ('locations', 4, 'created_at', $$ironwod.parse_ts(p #>> '{created,created_on_datetime}')$$),
    ('programs', 1, 'name', $$ironwod.j_text(p ->> 'name')$$),
    ('programs', 2, 'is_active', $$(p ->> 'is_active')::boolean$$),
    ('programs', 3, 'created_at', $$ironwod.parse_ts(p #>> '{created,created_on_datetime}')$$),
    ('clients', 1, 'first_name', $$ironwod.j_text(p ->> 'first_name')$$),
    ('clients', 2, 'last_name', $$ironwod.j_text(p ->> 'last_name')$$),
    ('clients', 3, 'email', $$ironwod.j_text(p ->> 'email')$$),
    ('clients', 4, 'client_status', $$ironwod.j_text(p ->> 'client_status')$$),
    ('clients', 5, 'location_id', $$ironwod.j_id(p -> 'location_id')$$),
    ('clients', 6, 'member_since', $$ironwod.j_date(p ->> 'member_since')$$),
    ('clients', 7, 'created_at',
     $$ironwod.parse_ts(coalesce(p #>> '{created_on,created_on_datetime}', p #>> '{created,created_on_datetime}'))$$),
    ('clients', 8, 'last_class_sign_in', $$ironwod.parse_ts(p ->> 'last_class_sign_in')$$),
    ('memberships', 1, 'member_id', $$ironwod.j_id(p -> 'client_id')$$),
    ('memberships', 2, 'name', $$ironwod.j_text(p ->> 'name')$$),
    ('memberships', 3, 'membership_type', $$ironwod.j_text(p ->> 'membership_type')$$),
    ('memberships', 4, 'is_deleted', $$coalesce((p ->> 'is_deleted')::boolean, false)$$),
    ('memberships', 5, 'start_date', $$ironwod.j_date(p ->> 'start_date')$$),
    ('memberships', 6, 'end_date', $$ironwod.j_date(p ->> 'end_date')$$),
    ('memberships', 7, 'cancellation_requested_on', $$ironwod.j_date(p ->> 'cancellation_requested_on')$$),
    ('memberships', 8, 'does_expire', $$(p ->> 'does_membership_expire')::boolean$$),
    ('memberships', 9, 'is_auto_renew', $$(ironwod.j_plan(p) ->> 'is_auto_renew')::boolean$$),
    ('memberships', 10, 'price', $$ironwod.j_num(ironwod.j_plan(p) -> 'price')$$),
    ('memberships', 11, 'billing_period_length', $$ironwod.j_num(ironwod.j_plan(p) -> 'billing_period_length')::integer$$),
    ('memberships', 12, 'billing_period_unit', $$ironwod.j_text(ironwod.j_plan(p) ->> 'billing_period_unit')$$),
    ('memberships', 13, 'location_id', $$ironwod.j_id(p -> 'location_id')$$),
    ('memberships', 14, 'created_at', $$ironwod.parse_ts(p #>> '{created,created_on_datetime}')$$),
    -- Wodify's is_deleted is a soft delete: at the version's update time, by the run that landed it
    ('memberships', 15, 'deleted_at',
     $$CASE WHEN (p ->> 'is_deleted')::boolean THEN coalesce(l.source_updated_at, l.ingested_at) END$$),
    ('memberships', 16, 'deleted_by_run', $$CASE WHEN (p ->> 'is_deleted')::boolean THEN l.ingest_run_id END$$),
    ('membership_holds', 1, 'membership_id', $$ironwod.j_id(p -> 'membership_id')$$),
    ('membership_holds', 2, 'member_id', $$ironwod.j_id(p -> 'client_id')$$),
    ('membership_holds', 3, 'hold_start_date', $$ironwod.j_date(p ->> 'hold_start_date')$$),
    ('membership_holds', 4, 'hold_end_date', $$ironwod.j_date(p ->> 'hold_end_date')$$),
    ('membership_holds', 5, 'hold_reason', $$ironwod.j_text(p ->> 'hold_reason')$$),
    ('class_signins', 1, 'member_id', $$ironwod.j_id(p -> 'client_id')$$),
    ('class_signins', 2, 'class_id', $$ironwod.j_id(p -> 'class_id')$$),
    ('class_signins', 3, 'class_start_at', $$ironwod.parse_ts(p ->> 'utc_class_start_datetime')$$),
    ('class_signins', 4, 'location_id', $$ironwod.j_id(p -> 'location_id')$$),
    ('class_signins', 5, 'program_id', $$ironwod.j_id(p -> 'program_id')$$),
    ('class_signins', 6, 'membership_id', $$ironwod.j_id(p -> 'membership_id')$$),
    ('class_signins', 7, 'is_drop_in', $$(p ->> 'is_drop_in')::boolean$$),
    ('invoices', 1, 'invoice_number', $$ironwod.j_text(p ->> 'invoice_number')$$),
    ('invoices', 2, 'member_id', $$ironwod.j_id(p -> 'client_id')$$),
    ('invoices', 3, 'membership_id', $$ironwod.j_id(p -> 'membership_id')$$),
    ('invoices', 4, 'location_id', $$ironwod.j_id(p -> 'location_id')$$),
    ('invoices', 5, 'status', $$ironwod.j_text(p ->> 'invoice_header_status')$$),
    ('invoices', 6, 'due_date', $$ironwod.j_date(p ->> 'payment_due')$$),
    ('invoices', 7, 'paid_on', $$ironwod.j_date(p ->> 'paid_on_date')$$),
    ('invoices', 8, 'amount', $$ironwod.j_num(p -> 'final_charge')$$),
    ('invoices', 9, 'created_at', $$ironwod.parse_ts(p #>> '{created,created_on_datetime}')$$),
    ('transactions', 1, 'invoice_id', $$ironwod.j_id(p -> 'invoice_id')$$),
    ('transactions', 2, 'member_id', $$ironwod.j_id(p -> 'client_id')$$),
    ('transactions', 3, 'location_id', $$ironwod.j_id(p -> 'location_id')$$),
    ('transactions', 4, 'processed_at', $$ironwod.parse_ts(p ->> 'transaction_date_time')$$),
    ('transactions', 5, 'amount', $$ironwod.j_num(p -> 'amount')$$),
    ('transactions', 6, 'transaction_type', $$ironwod.j_text(p ->> 'transaction_type')$$),
    ('transactions', 7, 'payment_method', $$ironwod.j_text(p ->> 'payment_method')$$)
) AS x(entity, ord, col, expr);

-- Install-time check: every canonical column is either common lineage or mapped.
DO $check$
DECLARE
    v_bad text;
BEGIN
    SELECT string_agg(m.canonical || '.' || a.attname, ', ') INTO v_bad
    FROM ironwod.canonical_maps m
    JOIN pg_attribute a ON a.attrelid = ('ironwod.' || quote_ident(m.canonical))::regclass
                       AND a.attnum > 0 AND NOT a.attisdropped
    WHERE a.attname NOT IN ('tenant_id', 'gym_id', 'raw_id', 'source_updated_at', 'deleted_at', 'deleted_by_run')
      AND a.attname <> m.key_column
      AND NOT EXISTS (SELECT 1 FROM ironwod.canonical_columns c
                      WHERE c.entity = m.entity AND c.column_name = a.attname);
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'canonical columns without a mapping: %', v_bad;
    END IF;
END
$check$;

-- The upsert of one entity, from its mapping: the canonical rows of the raw
-- versions $4 (raw ids), written only where they differ from the stored ones.  It
-- returns the rows written and, with change tracking, the earliest civil date the
-- changes touched (the join reads the rows as they were before the statement).
CREATE FUNCTION ironwod.transform_sql(p_entity text, p_track boolean) RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    m ironwod.canonical_maps;
    v_raw name;
    v_col name[];
    v_expr text[];
BEGIN
    SELECT * INTO STRICT m FROM ironwod.canonical_maps x WHERE x.entity = p_entity;
    SELECT e.raw_table INTO STRICT v_raw FROM ironwod.entities e WHERE e.entity = p_entity;
    SELECT array_agg(c.column_name ORDER BY c.ord), array_agg(c.expr ORDER BY c.ord)
      INTO v_col, v_expr FROM ironwod.canonical_columns c WHERE c.entity = p_entity;
    -- lineage; deleted_at / deleted_by_run are NULL unless the mapping says otherwise
    SELECT v_col || array_agg(x.col ORDER BY x.n), v_expr || array_agg(x.expr ORDER BY x.n)
      INTO v_col, v_expr
      FROM (VALUES (1, 'deleted_at'::name, 'NULL'), (2, 'deleted_by_run', 'NULL'),
                   (3, 'raw_id', 'l.raw_id'), (4, 'source_updated_at', 'l.source_updated_at')) x(n, col, expr)
     WHERE x.col <> ALL (v_col);
    -- With change tracking, the rows as they were are read in a CTE of their own,
    -- materialized before the upsert: on Citus each CTE is a step of its own and
    -- a later step would see the upsert's rows, not the old ones.  Without it,
    -- no join at all (Citus plans no outer join on a constant condition).
    RETURN format($q$
        WITH %8$s up AS (
            INSERT INTO ironwod.%1$I AS c (tenant_id, gym_id, %3$I, %5$s)
            SELECT $1, $2, l.wodify_id, %4$s
            FROM ironwod.%2$I l, LATERAL (SELECT l.payload_json AS p) x
            WHERE l.tenant_id = $1 AND l.gym_id = $2 AND l.raw_id = ANY ($4)
            ON CONFLICT (tenant_id, gym_id, %3$I) DO UPDATE SET %6$s
            WHERE ROW(c.*) IS DISTINCT FROM ROW(excluded.*)
            RETURNING c.*
        )
        SELECT count(*)::integer, min(%7$s)
        FROM up u %9$s$q$,
        m.canonical, v_raw, m.key_column,
        (SELECT string_agg(e, ', ') FROM unnest(v_expr) e),
        (SELECT string_agg(quote_ident(c), ', ') FROM unnest(v_col) c),
        (SELECT string_agg(format('%1$I = excluded.%1$I', c), ', ') FROM unnest(v_col) c),
        CASE WHEN p_track THEN coalesce(m.dirty_from, 'NULL::date') ELSE 'NULL::date' END,
        CASE WHEN p_track THEN format(
            'old AS MATERIALIZED (
                SELECT o.* FROM ironwod.%1$I o
                WHERE o.tenant_id = $1 AND o.gym_id = $2
                  AND o.%3$I IN (SELECT l.wodify_id FROM ironwod.%2$I l
                                 WHERE l.tenant_id = $1 AND l.gym_id = $2 AND l.raw_id = ANY ($4))),',
            m.canonical, v_raw, m.key_column) ELSE '' END,
        CASE WHEN p_track THEN format('LEFT JOIN old o ON o.%1$I = u.%1$I', m.key_column) ELSE '' END);
END
$$;
COMMENT ON FUNCTION ironwod.transform_sql(text, boolean) IS 'The upsert statement of one entity built from its mapping (canonical_maps, canonical_columns), with or without change tracking';

CREATE FUNCTION ironwod.note_dirty(p_tenant_id uuid, p_gym_id uuid, p_run_id bigint, p_entity text,
                                   p_dirty_from date, p_changed integer)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF p_run_id IS NULL OR p_dirty_from IS NULL THEN
        RETURN;
    END IF;
    INSERT INTO ironwod.metric_dirty AS d (tenant_id, gym_id, run_id, entity, dirty_from, changed)
    VALUES (p_tenant_id, p_gym_id, p_run_id, p_entity, p_dirty_from, p_changed)
    ON CONFLICT (tenant_id, gym_id, run_id, entity) DO UPDATE
       SET dirty_from = least(d.dirty_from, excluded.dirty_from), changed = d.changed + excluded.changed;
END
$$;
COMMENT ON FUNCTION ironwod.note_dirty(uuid, uuid, bigint, text, date, integer) IS 'Record the earliest civil date a run''s canonical changes to an entity touched';

-- Statistics before the planner sees landed or rebuilt rows: ANALYZE an ironwod
-- table that never was analyzed, or whose rows changed (by its statistics, or by
-- the caller's count of rows it just wrote) by more than a fifth of the row count
-- it was last analyzed at.  The worker role does not own the tables, hence
-- SECURITY DEFINER; only ironwod's raw and canonical tables can be named.
-- SKIP_LOCKED: another worker analyzing the table right now makes it fresh anyway.
CREATE FUNCTION ironwod.analyze_if_stale(p_table name, p_changed bigint DEFAULT 0)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_distributed boolean := false;
BEGIN
    -- A Citus distributed table is analyzed where its rows are, by each node's
    -- autovacuum on its shards; ANALYZE on the coordinator would run as this
    -- function's owner on placements the worker role wrote in this transaction,
    -- which Citus refuses (25001).  pg_dist_partition exists only with Citus.
    IF to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL THEN
        EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition d
                                JOIN pg_catalog.pg_class c ON c.oid = d.logicalrelid
                                WHERE c.relname = $1 AND c.relnamespace = ''ironwod''::regnamespace)'
            INTO v_distributed USING p_table;
        IF v_distributed THEN
            RETURN false;
        END IF;
    END IF;
    IF NOT EXISTS (
        SELECT 1
        FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace AND s.nspname = 'ironwod'
        LEFT JOIN pg_stat_all_tables st ON st.relid = c.oid
        WHERE c.relname = p_table
          AND (c.relname IN (SELECT e.raw_table FROM ironwod.entities e)
               OR c.relname IN (SELECT m.canonical FROM ironwod.canonical_maps m))
          AND (c.reltuples < 0
               OR greatest(coalesce(p_changed, 0), coalesce(st.n_mod_since_analyze, 0)) > 0.2 * c.reltuples)) THEN
        RETURN false;
    END IF;
    EXECUTE format('ANALYZE (SKIP_LOCKED) ironwod.%I', p_table);
    RETURN true;
END
$$;
COMMENT ON FUNCTION ironwod.analyze_if_stale(name, bigint) IS 'Worker: ANALYZE an ironwod raw or canonical table that was never analyzed or whose rows changed by more than 20 % since';

-- Rebuild canonical rows from raw.  p_run_id NULL = every record of the scope (and no
-- change tracking); otherwise the records with a new version landed in that run and
-- in earlier runs not yet transformed.
CREATE FUNCTION ironwod.transform_records(p_run_id bigint)
RETURNS jsonb
LANGUAGE plpgsql
SET jit = off
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_tz text;
    v_out jsonb := '{}';
    v_runs bigint[];
    v_ids bigint[];
    v_raw bigint[];
    v_n integer;
    v_dirty date;
    e record;
BEGIN
    IF v_t IS NULL OR v_g IS NULL THEN
        RAISE EXCEPTION 'no ironwod scope is set in this transaction'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Call ironwod_set_scope(tenant, gym) in the same transaction first.';
    END IF;
    IF p_run_id IS NOT NULL THEN
        v_runs := ARRAY(
            SELECT x.run_id
            FROM (SELECT r.run_id FROM ironwod.sync_runs r
                  WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id <= p_run_id
                  UNION SELECT p_run_id) x
            WHERE NOT EXISTS (SELECT 1 FROM ironwod.transformed_runs d
                              WHERE d.tenant_id = v_t AND d.gym_id = v_g AND d.run_id = x.run_id)
            ORDER BY 1);
    END IF;
    -- In registry order: locations first, they decide the time zone.
    FOR e IN SELECT x.entity, x.raw_table, m.canonical FROM ironwod.entities x
             JOIN ironwod.canonical_maps m USING (entity) ORDER BY x.ordinal LOOP
        IF e.entity <> 'locations' AND v_tz IS NULL THEN
            v_tz := ironwod.gym_time_zone(v_t, v_g);
        END IF;
        IF p_run_id IS NULL THEN
            PERFORM ironwod.analyze_if_stale(e.raw_table);
            v_raw := ARRAY(SELECT l.raw_id FROM ironwod.latest_raw_versions(e.entity, v_t, v_g, NULL, false) l);
            EXECUTE ironwod.transform_sql(e.entity, false) INTO v_n, v_dirty USING v_t, v_g, v_tz, v_raw;
        ELSE
            EXECUTE format('SELECT array_agg(DISTINCT r.wodify_id) FROM ironwod.%I r
                            WHERE r.tenant_id = $1 AND r.gym_id = $2 AND r.ingest_run_id = ANY ($3)', e.raw_table)
            INTO v_ids USING v_t, v_g, v_runs;
            v_n := 0;
            IF v_ids IS NOT NULL THEN
                PERFORM ironwod.analyze_if_stale(e.raw_table, cardinality(v_ids));
                v_raw := ARRAY(SELECT l.raw_id FROM ironwod.latest_raw_versions(e.entity, v_t, v_g, v_ids, false) l);
                EXECUTE ironwod.transform_sql(e.entity, true) INTO v_n, v_dirty USING v_t, v_g, v_tz, v_raw;
                PERFORM ironwod.note_dirty(v_t, v_g, p_run_id, e.entity, v_dirty, v_n);
            END IF;
        END IF;
        IF v_n > 0 THEN
            PERFORM ironwod.analyze_if_stale(e.canonical, v_n);
        END IF;
        v_out := v_out || jsonb_build_object(e.entity, v_n);
    END LOOP;

    INSERT INTO ironwod.transformed_runs (tenant_id, gym_id, run_id, transformed_by)
    SELECT v_t, v_g, x, p_run_id FROM unnest(v_runs) AS x
    ON CONFLICT DO NOTHING;
    RETURN v_out;
END
$$;
COMMENT ON FUNCTION ironwod.transform_records(bigint) IS 'Rebuild canonical rows from their latest raw version: the records with a new version in the given run, or all records of the scope when NULL; returns rows written per entity';

CREATE FUNCTION ironwod.transform_run(p_run_id bigint)
RETURNS jsonb
LANGUAGE plpgsql
AS $$
BEGIN
    IF p_run_id IS NULL THEN
        RAISE EXCEPTION 'run id must not be null' USING ERRCODE = 'null_value_not_allowed',
            HINT = 'Use ironwod.transform_all() to rebuild every record.';
    END IF;
    RETURN ironwod.transform_records(p_run_id)
           || jsonb_build_object('vanished', ironwod.apply_vanished(p_run_id));
END
$$;
COMMENT ON FUNCTION ironwod.transform_run(bigint) IS 'Worker, after the last page of a run landed: rebuild the canonical rows of records with a new raw version in that run (and in earlier runs not yet transformed, e.g. failed ones); idempotent; returns rows written per entity';

CREATE FUNCTION ironwod.transform_all()
RETURNS jsonb
LANGUAGE plpgsql
AS $$
BEGIN
    RETURN ironwod.transform_records(NULL) || jsonb_build_object('vanished', ironwod.apply_vanished(NULL));
END
$$;
COMMENT ON FUNCTION ironwod.transform_all() IS 'Rebuild the canonical rows of every record of the current scope from raw (used by replay)';

GRANT EXECUTE ON FUNCTION ironwod.j_date(text), ironwod.j_id(jsonb), ironwod.j_num(jsonb), ironwod.j_text(text),
    ironwod.j_plan(jsonb), ironwod.gym_time_zone(uuid, uuid), ironwod.transform_sql(text, boolean),
    ironwod.transform_records(bigint), ironwod.note_dirty(uuid, uuid, bigint, text, date, integer),
    ironwod.analyze_if_stale(name, bigint), ironwod.transform_run(bigint), ironwod.transform_all()
    TO ironwod_worker;
-- Global configuration like the entity registry: everyone reads it, nobody writes it.
ALTER TABLE ironwod.canonical_maps ENABLE ROW LEVEL SECURITY;
ALTER TABLE ironwod.canonical_maps FORCE ROW LEVEL SECURITY;
CREATE POLICY read_maps ON ironwod.canonical_maps FOR SELECT TO ironwod_app, ironwod_worker, ironwod_admin USING (true);
ALTER TABLE ironwod.canonical_columns ENABLE ROW LEVEL SECURITY;
ALTER TABLE ironwod.canonical_columns FORCE ROW LEVEL SECURITY;
CREATE POLICY read_columns ON ironwod.canonical_columns FOR SELECT TO ironwod_app, ironwod_worker, ironwod_admin USING (true);
GRANT SELECT ON ironwod.canonical_maps, ironwod.canonical_columns TO ironwod_worker, ironwod_app, ironwod_admin;
-- 74_vanished: carry reconciliation soft deletes (ironwod.vanished_records) into the
-- canonical tables, and take them back when a record is seen again.  Driven by the
-- same mapping as the transforms (canonical_maps); every change marks the months it
-- touches dirty, so refresh_metrics recomputes them.

CREATE FUNCTION ironwod.apply_vanished(p_run_id bigint)
RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    m record;
    v_tz text := ironwod.gym_time_zone(v_t, v_g);
    v_changed integer;
    v_dirty date;
    v_cand bigint[];
    v_seen_ids bigint[];
    v_seen_runs bigint[];
    v_out jsonb := '{}';
BEGIN
    FOR m IN SELECT x.* FROM ironwod.canonical_maps x JOIN ironwod.entities e USING (entity) ORDER BY e.ordinal LOOP
        -- Soft-deleted rows that may be back: their latest version, when not deleted by Wodify itself.
        EXECUTE format('SELECT array_agg(c.%2$I) FROM ironwod.%1$I c
                        WHERE c.tenant_id = $1 AND c.gym_id = $2 AND c.deleted_by_run IS NOT NULL',
                       m.canonical, m.key_column)
        INTO v_cand USING v_t, v_g;
        v_seen_ids := NULL;
        v_seen_runs := NULL;
        IF v_cand IS NOT NULL THEN
            SELECT array_agg(l.wodify_id), array_agg(l.last_seen_run_id) INTO v_seen_ids, v_seen_runs
            FROM ironwod.latest_raw_versions(m.entity, v_t, v_g, v_cand) l
            WHERE coalesce((l.payload_json ->> 'is_deleted')::boolean, false) = false;
        END IF;
        EXECUTE format($q$
            WITH gone AS (
                UPDATE ironwod.%1$I c
                   SET deleted_at = v.vanished_at, deleted_by_run = v.vanished_by_run
                  FROM ironwod.vanished_records v
                 WHERE c.tenant_id = $1 AND c.gym_id = $2
                   AND v.tenant_id = $1 AND v.gym_id = $2 AND v.entity = $4
                   AND v.wodify_id = c.%2$I AND c.deleted_at IS NULL
                RETURNING c.*
            ), back AS (
                -- Seen again after it vanished.
                UPDATE ironwod.%1$I c
                   SET deleted_at = NULL, deleted_by_run = NULL
                  FROM unnest($5::bigint[], $6::bigint[]) AS l(wodify_id, last_seen_run_id)
                 WHERE c.tenant_id = $1 AND c.gym_id = $2
                   AND l.wodify_id = c.%2$I AND c.deleted_by_run IS NOT NULL
                   AND l.last_seen_run_id > c.deleted_by_run
                   AND NOT EXISTS (SELECT 1 FROM ironwod.vanished_records v
                                   WHERE v.tenant_id = $1 AND v.gym_id = $2
                                     AND v.entity = $4 AND v.wodify_id = c.%2$I)
                RETURNING c.*
            )
            SELECT (SELECT count(*) FROM gone)::integer + (SELECT count(*) FROM back)::integer,
                   (SELECT min(%3$s) FROM (SELECT * FROM gone UNION ALL SELECT * FROM back) c)$q$,
            m.canonical, m.key_column, coalesce(m.row_day, 'NULL::date'))
        INTO v_changed, v_dirty USING v_t, v_g, v_tz, m.entity, v_seen_ids, v_seen_runs;
        IF v_changed > 0 THEN
            PERFORM ironwod.note_dirty(v_t, v_g, p_run_id, m.entity, v_dirty, v_changed);
            v_out := v_out || jsonb_build_object(m.entity, v_changed);
        END IF;
    END LOOP;
    RETURN v_out;
END
$$;
COMMENT ON FUNCTION ironwod.apply_vanished(bigint) IS 'Worker: soft-delete canonical rows of records that vanished in a reconciliation, restore those seen again; marks the touched months dirty';

GRANT EXECUTE ON FUNCTION ironwod.apply_vanished(bigint) TO ironwod_worker;
-- 80_metrics: spells, daily states, visits, member-month facts, money and
-- gym_monthly_metrics_cache (metrics.md §2-§5 within its v1 scope adjustments).
--
-- Pipeline of one refresh, all set-based, one function per stage (see "The stages
-- of a refresh" below):
--   qualifying memberships (per location key: ALL and each location id)   metric_memberships
--   -> merged spells (gap <= merge_gap_days; rescinded spells marked)     member_spell
--   -> daily state ACTIVE / ON_HOLD / NOT_MEMBER with MRR, as spans (bridged gap
--      days are ACTIVE and carry the MRR of the membership that resumes coverage)
--                                                                          member_state_span
--   -> visits per person, location key and month                          member_visit_month
--   -> one fact row per person, location key and month                    member_month_fact
--   -> cash, invoice and recognised-revenue figures per key and month     gym_month_money
--   -> the cache, a GROUP BY over the facts plus the money                gym_monthly_metrics_cache
-- Spells and spans are rebuilt whole (a few rows per membership); the later stages
-- from the first month to recompute on (refresh_metrics: the trailing months and
-- the months a run's changes touched).
-- Months are calendar months in the gym's IANA zone; civil dates are compared as
-- dates, instants are converted to local dates first.  The current month is computed
-- to date (as_of = today) and flagged is_partial, as is any month whose end plus the
-- merge gap has not passed yet.

-- "Today" in the gym's zone.  The setting ironwod_metrics.today (a date) freezes the
-- clock for tests and for reproducing an earlier computation; unset means now().
CREATE FUNCTION ironwod.metrics_today(p_tz text) RETURNS date
LANGUAGE sql STABLE
AS $$
    SELECT coalesce(nullif(current_setting('ironwod_metrics.today', true), '')::date,
                    (now() AT TIME ZONE p_tz)::date)
$$;
COMMENT ON FUNCTION ironwod.metrics_today(text) IS 'Local date of today in the given zone, or the date in setting ironwod_metrics.today when set (frozen clock for tests and reproductions)';

CREATE FUNCTION ironwod.metric_config() RETURNS ironwod.metric_settings
LANGUAGE plpgsql
AS $$
DECLARE
    s ironwod.metric_settings;
BEGIN
    INSERT INTO ironwod.metric_settings (tenant_id, gym_id)
    SELECT ironwod.scope_tenant(), ironwod.scope_gym()
    WHERE ironwod.scope_tenant() IS NOT NULL
    ON CONFLICT (tenant_id, gym_id) DO NOTHING;
    SELECT * INTO STRICT s FROM ironwod.metric_settings x
    WHERE x.tenant_id = ironwod.scope_tenant() AND x.gym_id = ironwod.scope_gym();
    RETURN s;
END
$$;
COMMENT ON FUNCTION ironwod.metric_config() IS 'The scoped gym''s metric settings row, created with the defaults when missing';

CREATE FUNCTION ironwod.config_hash(s ironwod.metric_settings) RETURNS text
LANGUAGE sql IMMUTABLE
AS $$ SELECT md5((to_jsonb(s) - 'tenant_id' - 'gym_id')::text) $$;
COMMENT ON FUNCTION ironwod.config_hash(ironwod.metric_settings) IS 'Hash of every metric parameter of a settings row (cache column config_hash)';

-- Monthly-normalised price (metrics.md §4.7): weekly x 52/12, yearly / 12, N months / N.
CREATE FUNCTION ironwod.monthly_price(p_price numeric, p_len integer, p_unit text) RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT round(CASE
        WHEN p_unit ILIKE 'week%' THEN p_price * 52 / 12 / greatest(coalesce(p_len, 1), 1)
        WHEN p_unit ILIKE 'year%' THEN p_price / 12 / greatest(coalesce(p_len, 1), 1)
        WHEN p_unit ILIKE 'day%'  THEN p_price * 365 / 12 / greatest(coalesce(p_len, 1), 1)
        ELSE p_price / greatest(coalesce(p_len, 1), 1)
    END, 2)
$$;
COMMENT ON FUNCTION ironwod.monthly_price(numeric, integer, text) IS 'Recurring price normalised to a month (weekly x 52/12, yearly / 12, every N units / N), rounded to cents';

-- Months a membership payment is spread over (v1: its billing period, at most 12).
CREATE FUNCTION ironwod.spread_months(p_len integer, p_unit text, p_max integer) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT least(greatest(CASE
        WHEN p_unit ILIKE 'month%' THEN coalesce(p_len, 1)
        WHEN p_unit ILIKE 'year%'  THEN 12 * coalesce(p_len, 1)
        ELSE 1 END, 1), p_max)
$$;
COMMENT ON FUNCTION ironwod.spread_months(integer, text, integer) IS 'Number of months a membership payment is recognised over: its billing period in months, 1 for shorter periods, capped';

-- First full local month of synced history: the month of the earliest transaction or
-- sign-in when that falls on the 1st, else the month after.  A settings override wins.
CREATE FUNCTION ironwod.history_start(p_tz text) RETURNS date
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_set date;
    v_d date;
    v_m date;
BEGIN
    SELECT x.history_start_date INTO v_set FROM ironwod.metric_settings x
    WHERE x.tenant_id = v_t AND x.gym_id = v_g;
    IF v_set IS NOT NULL THEN
        RETURN v_set;
    END IF;
    -- the local date is monotonic in the instant, so the earliest instant (an index
    -- read) gives the earliest local date
    SELECT least((SELECT (min(t.processed_at) AT TIME ZONE p_tz)::date FROM ironwod.transactions t
                  WHERE t.tenant_id = v_t AND t.gym_id = v_g AND t.deleted_at IS NULL),
                 (SELECT (min(a.class_start_at) AT TIME ZONE p_tz)::date FROM ironwod.attendance_events a
                  WHERE a.tenant_id = v_t AND a.gym_id = v_g AND a.deleted_at IS NULL))
    INTO v_d;
    SELECT min(m.start_date) INTO v_m FROM ironwod.memberships m
    WHERE m.tenant_id = v_t AND m.gym_id = v_g AND m.deleted_at IS NULL;
    RETURN CASE WHEN v_d IS NULL THEN date_trunc('month', coalesce(v_m, ironwod.metrics_today(p_tz)))::date
                WHEN extract(day FROM v_d) = 1 THEN v_d
                ELSE (date_trunc('month', v_d) + interval '1 month')::date END;
END
$$;
COMMENT ON FUNCTION ironwod.history_start(text) IS 'history_start_date of the scoped gym: settings override, else the first full local month of synced transactions and sign-ins';

-- ---------------------------------------------------------------------------------
-- The stages of a refresh.  Each one is a function of the tenant and gym (so each
-- statement names one shard on Citus), reads what the stage before it wrote to a
-- tenant table (no temp tables: Citus refuses to join them to distributed tables)
-- and does its work in a few set-based statements whose joins are equi-joins on
-- (location key, person[, month]); a range condition only ever filters the few rows
-- of one person.  That keeps a full recompute linear in records.  The stages run
-- with nested loop and merge joins off: the tables a refresh has just rewritten have
-- no current statistics and CTE row estimates are guesses, so the plans must not
-- depend on estimates, and for these bulk equi-joins a hash join on every key is
-- always the right one (a nested loop or a merge on one key is quadratic per gym).
-- work_mem stays the server's: a large gym's refresh spills a little to disk, and
-- keeps the run worker's private memory under 64 MB (make bench reports it).
--
--   metrics_spells       member_spell        §2.3 merged spells, rescinded ones marked
--   metrics_day_states   member_state_span   §2.4 daily state, as intervals of constant state
--   metrics_visits       member_visit_month  §4.13-4.15 visits per person, key and month
--   metrics_month_facts  member_month_fact   §5.3 one row per person, key and month
--   metrics_month_flags  member_month_fact   §2.4 past due, §4.1 comped, §4.17 pending cancel
--   metrics_month_money  gym_month_money     §4.8-4.9 cash, invoices and recognised revenue
--   metrics_cache_rows   gym_monthly_metrics_cache   §5.2 the GROUP BY over facts and money
--   metrics_pooled       gym_monthly_metrics_cache   §4.11-4.12 six-month ARM, LEG and LTV
-- ---------------------------------------------------------------------------------

-- Member-qualifying (price > 0) and comped (price = 0) memberships of the types the
-- gym counts, once gym-wide (location key ALL) and once under their location, as
-- half-open coverage [start_date, end_excl).  security_invoker: the caller's RLS.
CREATE VIEW ironwod.metric_memberships WITH (security_invoker = true) AS
SELECT m.tenant_id, m.gym_id, k.location_key, m.member_id, m.membership_id, m.start_date,
       coalesce(m.end_date + 1, 'infinity'::date) AS end_excl,
       m.price > 0 AS qualifying,
       ironwod.monthly_price(m.price, m.billing_period_length, m.billing_period_unit) AS mrr,
       m.cancellation_requested_on
FROM ironwod.memberships m
JOIN ironwod.metric_settings s ON s.tenant_id = m.tenant_id AND s.gym_id = m.gym_id
CROSS JOIN LATERAL (VALUES ('ALL'), (m.location_id::text)) AS k(location_key)
WHERE m.deleted_at IS NULL AND NOT m.is_deleted
  AND m.membership_type = ANY (s.qualifying_types) AND m.price >= 0
  AND m.member_id IS NOT NULL AND m.start_date IS NOT NULL
  AND coalesce(m.end_date + 1, 'infinity'::date) > m.start_date
  AND k.location_key IS NOT NULL;
COMMENT ON VIEW ironwod.metric_memberships IS 'metrics.md §2.2-2.3: the memberships the metrics read, per location key (ALL and their location), as half-open coverage with monthly-normalised price; qualifying = price > 0, else comped';

-- Daily state (metrics.md §2.4) in interval form: from a person's first spell to
-- today, maximal runs of days on which the covering memberships, holds and spell do
-- not change.  active_before is the number of ACTIVE days before span_start, so the
-- ACTIVE days up to any day d inside the span are active_before + (d - span_start + 1)
-- when the span is ACTIVE, else active_before.
CREATE TABLE ironwod.member_state_span (
    tenant_id            uuid NOT NULL,
    gym_id               uuid NOT NULL,
    location_key         text NOT NULL,
    member_id            bigint NOT NULL,
    span_start           date NOT NULL,
    span_end_excl        date NOT NULL,
    state                text NOT NULL CHECK (state IN ('ACTIVE', 'ON_HOLD', 'NOT_MEMBER')),
    mrr                  numeric(12,2) NOT NULL,
    spell_start          date,
    spell_end_excl       date,
    spell_no             integer,
    active_before        integer NOT NULL,
    spell_active_before  integer,
    PRIMARY KEY (tenant_id, gym_id, location_key, member_id, span_start)
);
COMMENT ON TABLE ironwod.member_state_span IS 'Daily member state (metrics.md §2.4, §5.3 member_day_state in interval form): runs of days with one state and MRR per person and location key, with the ACTIVE days before each run and before its spell';

-- Visit figures per person, location key and month (metrics.md §4.13-4.15):
-- visits at the key's locations and those on ACTIVE days; and, from visits
-- anywhere (the same on every key of the person): the month's total, the recent and
-- prior decline windows, and the last visit on or before the month's as-of day.
CREATE TABLE ironwod.member_visit_month (
    tenant_id               uuid NOT NULL,
    gym_id                  uuid NOT NULL,
    location_key            text NOT NULL,
    member_id               bigint NOT NULL,
    month_start             date NOT NULL,
    visits                  integer NOT NULL,
    member_visits           integer NOT NULL,
    visits_anywhere         integer NOT NULL,
    visits_recent           integer NOT NULL,
    visits_prior            integer NOT NULL,
    last_visit              date,
    PRIMARY KEY (tenant_id, gym_id, location_key, month_start, member_id)
);
COMMENT ON TABLE ironwod.member_visit_month IS 'Visit figures per person, location key and month (metrics.md §4.13-4.15): visits, member visits, visits anywhere, decline windows, last visit';

-- Money per location key and month (metrics.md §4.8-4.9), before rounding.
CREATE TABLE ironwod.gym_month_money (
    tenant_id            uuid NOT NULL,
    gym_id               uuid NOT NULL,
    location_key         text NOT NULL,
    month_start          date NOT NULL,
    gross                numeric NOT NULL,
    refunds              numeric NOT NULL,
    failed_n             integer NOT NULL,
    failed_amount        numeric NOT NULL,
    membership_revenue   numeric NOT NULL,
    invoiced             numeric NOT NULL,
    invoiced_collected   numeric NOT NULL,
    past_due_amount      numeric NOT NULL,
    PRIMARY KEY (tenant_id, gym_id, location_key, month_start)
);
COMMENT ON TABLE ironwod.gym_month_money IS 'Cash, failed payments, invoices and recognised membership revenue per location key and month (metrics.md §4.8-4.9), unrounded; the cache rows read it';

SELECT ironwod.apply_tenant_policies(t::regclass)
FROM unnest(ARRAY['ironwod.member_state_span', 'ironwod.member_visit_month', 'ironwod.gym_month_money']) AS t;
GRANT SELECT, INSERT, UPDATE, DELETE ON ironwod.member_state_span, ironwod.member_visit_month,
    ironwod.gym_month_money TO ironwod_worker;
GRANT SELECT ON ironwod.metric_memberships TO ironwod_worker;

-- Stage 1 (metrics.md §2.3): merge each person's qualifying coverage when the gap is
-- <= merge_gap_days; a spell of <= rescind_max_days with zero net collected revenue
-- (payments - refunds on invoices of its memberships) is rescinded.
CREATE FUNCTION ironwod.metrics_spells(p_tenant uuid, p_gym uuid, p_s ironwod.metric_settings)
RETURNS integer
LANGUAGE plpgsql
SET enable_nestloop = off SET enable_mergejoin = off
AS $$
DECLARE
    v_n integer;
BEGIN
    DELETE FROM ironwod.member_spell WHERE tenant_id = p_tenant AND gym_id = p_gym;
    WITH o AS (
        SELECT q.location_key, q.member_id, q.membership_id, q.start_date, q.end_excl,
               max(q.end_excl) OVER (PARTITION BY q.location_key, q.member_id
                                     ORDER BY q.start_date, q.end_excl, q.membership_id
                                     ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_end
        FROM ironwod.metric_memberships q
        WHERE q.tenant_id = p_tenant AND q.gym_id = p_gym AND q.qualifying
    ), g AS (
        SELECT o.*, sum(CASE WHEN o.prev_end IS NULL OR o.start_date > o.prev_end + p_s.merge_gap_days
                             THEN 1 ELSE 0 END)
                    OVER (PARTITION BY o.location_key, o.member_id
                          ORDER BY o.start_date, o.end_excl, o.membership_id) AS grp
        FROM o
    ), net AS (
        SELECT g.location_key, g.member_id, g.grp,
               coalesce(sum(CASE t.transaction_type WHEN 'Payment' THEN t.amount
                                                    WHEN 'Refund' THEN -t.amount ELSE 0 END), 0) AS net
        FROM g
        LEFT JOIN ironwod.invoices i
               ON i.tenant_id = p_tenant AND i.gym_id = p_gym AND i.deleted_at IS NULL
              AND i.membership_id = g.membership_id
        LEFT JOIN ironwod.transactions t
               ON t.tenant_id = p_tenant AND t.gym_id = p_gym AND t.deleted_at IS NULL AND t.invoice_id = i.invoice_id
        GROUP BY g.location_key, g.member_id, g.grp
    ), r AS (
        SELECT g.location_key, g.member_id, min(g.start_date) AS s0, max(g.end_excl) AS e0,
               array_agg(g.membership_id ORDER BY g.membership_id) AS ids, n.net,
               (max(g.end_excl) <> 'infinity' AND max(g.end_excl) - min(g.start_date) <= p_s.rescind_max_days
                AND n.net = 0) AS rescinded
        FROM g JOIN net n USING (location_key, member_id, grp)
        GROUP BY g.location_key, g.member_id, g.grp, n.net
    )
    INSERT INTO ironwod.member_spell
        (tenant_id, gym_id, location_key, member_id, spell_start, spell_end_excl, spell_no, is_first,
         rescinded, net_revenue, membership_ids)
    SELECT p_tenant, p_gym, r.location_key, r.member_id, r.s0, r.e0,
           CASE WHEN NOT r.rescinded THEN
               row_number() OVER (PARTITION BY r.location_key, r.member_id, r.rescinded ORDER BY r.s0) END,
           NOT r.rescinded AND r.s0 = min(r.s0) FILTER (WHERE NOT r.rescinded)
                                       OVER (PARTITION BY r.location_key, r.member_id),
           r.rescinded, r.net, r.ids
    FROM r
    -- a fresh rebuild conflicts with nothing; the clause makes Citus insert
    -- through intermediate results rather than COPY, which RLS refuses
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$$;
COMMENT ON FUNCTION ironwod.metrics_spells(uuid, uuid, ironwod.metric_settings) IS 'Refresh stage 1, metrics.md §2.3 (coverage, holds and spells): rebuild member_spell of a gym from its qualifying memberships; returns the spell count';

-- Stage 2 (metrics.md §2.4): the daily state from each person's first spell to
-- today, as spans.  The span edges are every date at which a covering membership,
-- a hold or a spell starts or ends, so within a span the state and MRR are those of
-- its first day: ACTIVE when in a spell and covered by a membership not on hold or
-- not covered at all (a bridged gap), ON_HOLD when every covering membership is on
-- hold, else NOT_MEMBER.  MRR is that of the memberships not on hold; a bridged gap
-- carries the MRR of the coverage that resumes after it (0 if that is after today).
CREATE FUNCTION ironwod.metrics_day_states(p_tenant uuid, p_gym uuid, p_today date)
RETURNS integer
LANGUAGE plpgsql
SET enable_nestloop = off SET enable_mergejoin = off
AS $$
DECLARE
    v_n integer;
BEGIN
    DELETE FROM ironwod.member_state_span WHERE tenant_id = p_tenant AND gym_id = p_gym;
    WITH sp AS (
        SELECT s.location_key, s.member_id, s.spell_start, s.spell_end_excl, s.spell_no
        FROM ironwod.member_spell s
        WHERE s.tenant_id = p_tenant AND s.gym_id = p_gym AND NOT s.rescinded AND s.spell_start <= p_today
    ), f AS (
        SELECT sp.location_key, sp.member_id, min(sp.spell_start) AS first_day FROM sp GROUP BY 1, 2
    ), m AS (
        SELECT q.location_key, q.member_id, q.membership_id, q.start_date,
               least(q.end_excl, p_today + 1) AS end_excl, q.mrr
        FROM ironwod.metric_memberships q JOIN f USING (location_key, member_id)
        WHERE q.tenant_id = p_tenant AND q.gym_id = p_gym AND q.qualifying AND q.start_date <= p_today
    ), h AS (
        SELECT m.location_key, m.member_id, m.membership_id, x.hold_start_date AS hs,
               least(coalesce(x.hold_end_date, p_today), p_today) + 1 AS he
        FROM ironwod.membership_holds x JOIN m ON m.membership_id = x.membership_id
        WHERE x.tenant_id = p_tenant AND x.gym_id = p_gym AND x.deleted_at IS NULL
          AND x.hold_start_date IS NOT NULL AND x.hold_start_date <= p_today
    ), edge AS (
        SELECT DISTINCT e.location_key, e.member_id, e.d
        FROM (SELECT location_key, member_id, first_day AS d FROM f
              UNION ALL SELECT location_key, member_id, p_today + 1 FROM f
              UNION ALL SELECT location_key, member_id, unnest(ARRAY[start_date, end_excl]) FROM m
              UNION ALL SELECT location_key, member_id, unnest(ARRAY[hs, he]) FROM h
              UNION ALL SELECT location_key, member_id, unnest(ARRAY[spell_start, spell_end_excl]) FROM sp) e
        JOIN f USING (location_key, member_id)
        WHERE e.d >= f.first_day AND e.d <= p_today + 1
    ), seg AS (
        SELECT x.* FROM (SELECT e.*, lead(e.d) OVER (PARTITION BY e.location_key, e.member_id ORDER BY e.d) AS d_end
                         FROM edge e) x
        WHERE x.d_end IS NOT NULL
    ), cm AS (
        SELECT s.location_key, s.member_id, s.d, m.membership_id, m.mrr, bool_or(h.hs IS NOT NULL) AS held
        FROM seg s
        JOIN m ON m.location_key = s.location_key AND m.member_id = s.member_id
              AND m.start_date <= s.d AND s.d < m.end_excl
        LEFT JOIN h ON h.location_key = m.location_key AND h.membership_id = m.membership_id
                   AND h.hs <= s.d AND s.d < h.he
        GROUP BY s.location_key, s.member_id, s.d, m.membership_id, m.mrr
    ), cov AS (
        SELECT s.location_key, s.member_id, s.d, count(cm.membership_id) AS n_cov,
               count(cm.membership_id) FILTER (WHERE NOT cm.held) AS n_act,
               coalesce(sum(cm.mrr) FILTER (WHERE NOT cm.held), 0) AS mrr
        FROM seg s LEFT JOIN cm USING (location_key, member_id, d)
        GROUP BY s.location_key, s.member_id, s.d
    ), z AS (
        SELECT s.location_key, s.member_id, s.d, s.d_end, sp.spell_start, sp.spell_end_excl, sp.spell_no, c.n_cov, c.mrr,
               CASE WHEN sp.spell_start IS NULL THEN 'NOT_MEMBER'
                    WHEN c.n_cov = 0 OR c.n_act > 0 THEN 'ACTIVE' ELSE 'ON_HOLD' END AS state,
               count(*) FILTER (WHERE c.n_cov > 0)
                   OVER (PARTITION BY s.location_key, s.member_id ORDER BY s.d DESC) AS grp
        FROM seg s JOIN cov c USING (location_key, member_id, d)
        LEFT JOIN sp ON sp.location_key = s.location_key AND sp.member_id = s.member_id
                    AND sp.spell_start <= s.d AND s.d < sp.spell_end_excl
    ), w AS (
        SELECT z.*, CASE WHEN z.state = 'NOT_MEMBER' THEN 0
                         WHEN z.n_cov = 0 THEN coalesce(max(z.mrr) FILTER (WHERE z.n_cov > 0)
                                                  OVER (PARTITION BY z.location_key, z.member_id, z.grp), 0)
                         ELSE z.mrr END AS span_mrr,
               coalesce(sum(CASE WHEN z.state = 'ACTIVE' THEN z.d_end - z.d ELSE 0 END)
                        OVER (PARTITION BY z.location_key, z.member_id ORDER BY z.d
                              ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS active_before
        FROM z
    )
    INSERT INTO ironwod.member_state_span
        (tenant_id, gym_id, location_key, member_id, span_start, span_end_excl, state, mrr, spell_start,
         spell_end_excl, spell_no, active_before, spell_active_before)
    SELECT p_tenant, p_gym, w.location_key, w.member_id, w.d, w.d_end, w.state, w.span_mrr, w.spell_start,
           w.spell_end_excl, w.spell_no, w.active_before,
           CASE WHEN w.spell_start IS NOT NULL THEN
               min(w.active_before) OVER (PARTITION BY w.location_key, w.member_id, w.spell_start) END
    FROM w
    -- a fresh rebuild conflicts with nothing; the clause makes Citus insert
    -- through intermediate results rather than COPY, which RLS refuses
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$$;
COMMENT ON FUNCTION ironwod.metrics_day_states(uuid, uuid, date) IS 'Refresh stage 2, metrics.md §2.4 (daily member state): rebuild member_state_span of a gym, the ACTIVE / ON_HOLD / NOT_MEMBER state and MRR of every day from each person''s first spell to today as spans; returns the span count';

-- Stage 3 (metrics.md §4.13-4.15): visits per person, local day and class location
-- (one per class instance), turned into per person, location key and month: the
-- visits at the key's locations and those on the person's ACTIVE days there; visits
-- anywhere in the month and in the decline windows ending on the as-of day (from
-- a running count of the person's visits, read at the window edges) and the last
-- visit on or before the as-of day.  Months from p_from on.
CREATE FUNCTION ironwod.metrics_visits(p_tenant uuid, p_gym uuid, p_s ironwod.metric_settings, p_tz text,
                                       p_from date, p_hist date, p_today date)
RETURNS integer
LANGUAGE plpgsql
SET enable_nestloop = off SET enable_mergejoin = off
AS $$
DECLARE
    v_n integer;
    v_win integer := p_s.decline_recent_days + p_s.decline_prior_days;
BEGIN
    DELETE FROM ironwod.member_visit_month
    WHERE tenant_id = p_tenant AND gym_id = p_gym AND (month_start >= p_from OR month_start < p_hist);
    WITH vd AS (
        SELECT x.member_id, x.d, x.location_id, count(*)::integer AS n
        FROM (SELECT DISTINCT a.member_id, (a.class_start_at AT TIME ZONE p_tz)::date AS d, a.location_id,
                     coalesce(a.class_id, -a.signin_id) AS class_key
              FROM ironwod.attendance_events a
              WHERE a.tenant_id = p_tenant AND a.gym_id = p_gym AND a.deleted_at IS NULL
                AND a.member_id IS NOT NULL AND a.class_start_at IS NOT NULL) x
        GROUP BY 1, 2, 3
    ), dt AS (
        SELECT vd.member_id, vd.d, sum(vd.n)::integer AS n FROM vd WHERE vd.d <= p_today GROUP BY 1, 2
    ), mo AS (
        SELECT mo::date AS month_start, least((mo + interval '1 month')::date - 1, p_today) AS as_of
        FROM generate_series(p_from, date_trunc('month', p_today), interval '1 month') AS mo
    ), vk AS (
        SELECT k.location_key, vd.member_id, date_trunc('month', vd.d)::date AS month_start,
               sum(vd.n)::integer AS visits, coalesce(sum(vd.n) FILTER (WHERE s.state = 'ACTIVE'), 0)::integer AS member_visits
        FROM vd CROSS JOIN LATERAL (VALUES ('ALL'), (vd.location_id::text)) AS k(location_key)
        LEFT JOIN ironwod.member_state_span s
               ON s.tenant_id = p_tenant AND s.gym_id = p_gym AND s.location_key = k.location_key
              AND s.member_id = vd.member_id AND s.span_start <= vd.d AND vd.d < s.span_end_excl
        WHERE k.location_key IS NOT NULL AND vd.d >= p_from AND vd.d <= p_today
        GROUP BY 1, 2, 3
    ), va AS (
        SELECT x.member_id, x.month_start,
               (max(x.cv) FILTER (WHERE x.k = 1) - max(x.cv) FILTER (WHERE x.k = 4))::integer AS anywhere,
               (max(x.cv) FILTER (WHERE x.k = 1) - max(x.cv) FILTER (WHERE x.k = 2))::integer AS recent,
               (max(x.cv) FILTER (WHERE x.k = 2) - max(x.cv) FILTER (WHERE x.k = 3))::integer AS prior,
               max(x.lastd) FILTER (WHERE x.k = 1) AS last_visit
        FROM (SELECT y.*, sum(y.n) OVER w AS cv, max(CASE WHEN y.k = 0 THEN y.d END) OVER w AS lastd
              FROM (SELECT dt.member_id, dt.d, 0 AS k, dt.n, NULL::date AS month_start FROM dt
                    UNION ALL
                    SELECT p.member_id, l.d, l.k, 0, mo.month_start
                    FROM (SELECT DISTINCT dt.member_id FROM dt) p CROSS JOIN mo
                    CROSS JOIN LATERAL (VALUES (1, mo.as_of), (2, mo.as_of - p_s.decline_recent_days),
                                               (3, mo.as_of - v_win), (4, mo.month_start - 1)) AS l(k, d)) y
              WINDOW w AS (PARTITION BY y.member_id ORDER BY y.d, y.k ROWS UNBOUNDED PRECEDING)) x
        WHERE x.k > 0
        GROUP BY x.member_id, x.month_start
        HAVING max(x.lastd) FILTER (WHERE x.k = 1) IS NOT NULL
    )
    INSERT INTO ironwod.member_visit_month
        (tenant_id, gym_id, location_key, member_id, month_start, visits, member_visits, visits_anywhere,
         visits_recent, visits_prior, last_visit)
    SELECT p_tenant, p_gym, x.location_key, x.member_id, x.month_start,
           coalesce(max(x.visits), 0), coalesce(max(x.member_visits), 0), coalesce(max(va.anywhere), 0),
           coalesce(max(va.recent), 0), coalesce(max(va.prior), 0), max(va.last_visit)
    FROM (SELECT vk.location_key, vk.member_id, vk.month_start, vk.visits, vk.member_visits FROM vk
          UNION ALL
          SELECT 'ALL', va.member_id, va.month_start, NULL, NULL FROM va) x
    LEFT JOIN va ON va.member_id = x.member_id AND va.month_start = x.month_start
    GROUP BY x.location_key, x.member_id, x.month_start
    -- a fresh rebuild conflicts with nothing; the clause makes Citus insert
    -- through intermediate results rather than COPY, which RLS refuses
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$$;
COMMENT ON FUNCTION ironwod.metrics_visits(uuid, uuid, ironwod.metric_settings, text, date, date, date) IS 'Refresh stage 3, metrics.md §4.13-4.15 (attendance, absence, decline): rebuild member_visit_month of a gym from the given month on; returns the row count';

-- Stage 4 (metrics.md §3, §4.1-4.7, §4.13-4.17, §5.3): one fact row per person,
-- location key and month from p_from on, for everyone with a state, a visit at the
-- key's locations or a comped membership in the month.  The snapshots, ACTIVE days
-- and the ACTIVE-day counts the absence and decline rules need (up to the as-of
-- day, the window edges, the last visit and the spell's start; ACTIVE days never
-- decrease, so the absence count is the later of the last two) are read from the
-- person's spans (at most a few per person), visits from member_visit_month
-- (visits anywhere from the person's ALL row).  Past due and comped: stage 4b.
CREATE FUNCTION ironwod.metrics_month_facts(p_tenant uuid, p_gym uuid, p_s ironwod.metric_settings, p_keys text[],
                                            p_from date, p_hist date, p_today date)
RETURNS integer
LANGUAGE plpgsql
SET enable_nestloop = off SET enable_mergejoin = off
AS $$
DECLARE
    v_n integer;
    v_r integer := p_s.decline_recent_days;
    v_p integer := p_s.decline_recent_days + p_s.decline_prior_days;
BEGIN
    DELETE FROM ironwod.member_month_fact
    WHERE tenant_id = p_tenant AND gym_id = p_gym AND (month_start >= p_from OR month_start < p_hist);
    WITH mo AS (
        SELECT k.location_key, mo::date AS month_start, (mo + interval '1 month')::date - 1 AS last_day,
               least((mo + interval '1 month')::date - 1, p_today) AS as_of
        FROM generate_series(p_from, date_trunc('month', p_today), interval '1 month') AS mo, unnest(p_keys) AS k(location_key)
    ), cand AS (
        SELECT DISTINCT mo.*, c.member_id
        FROM (SELECT s.location_key, s.member_id, m::date AS month_start, s.span_start AS a, s.span_end_excl AS b, true AS st
              FROM ironwod.member_state_span s,
                   generate_series(date_trunc('month', greatest(s.span_start, p_from)), s.span_end_excl, interval '1 month') m
              WHERE s.tenant_id = p_tenant AND s.gym_id = p_gym AND s.state <> 'NOT_MEMBER' AND s.span_end_excl >= p_from
              UNION ALL
              SELECT v.location_key, v.member_id, v.month_start, NULL, NULL, false FROM ironwod.member_visit_month v
              WHERE v.tenant_id = p_tenant AND v.gym_id = p_gym AND v.month_start >= p_from AND v.visits > 0
              UNION ALL
              SELECT q.location_key, q.member_id, m::date, q.start_date, q.end_excl, false
              FROM ironwod.metric_memberships q,
                   generate_series(date_trunc('month', greatest(q.start_date, p_from)),
                                   least(q.end_excl - 1, p_today), interval '1 month') m
              WHERE q.tenant_id = p_tenant AND q.gym_id = p_gym AND NOT q.qualifying AND q.end_excl > p_from) c
        JOIN mo ON mo.location_key = c.location_key AND mo.month_start = c.month_start
        WHERE c.a IS NULL OR (c.st AND c.a <= mo.as_of AND c.b >= mo.month_start)
           OR (NOT c.st AND c.a <= mo.as_of AND mo.as_of < c.b)
    ), snap AS (
        SELECT c.location_key, c.month_start, c.last_day, c.as_of, c.member_id,
               coalesce(va.visits_anywhere, 0) AS visits_anywhere,
               coalesce(va.visits_recent, 0) AS visits_r, coalesce(va.visits_prior, 0) AS visits_p,
               coalesce(max(s.active_before + CASE WHEN s.state = 'ACTIVE' THEN va.last_visit - s.span_start + 1 ELSE 0 END)
                        FILTER (WHERE s.span_start <= va.last_visit AND va.last_visit < s.span_end_excl), 0) AS cum_lv,
               coalesce(max(s.state) FILTER (WHERE s.span_start <= c.month_start - 1 AND c.month_start - 1 < s.span_end_excl), 'NOT_MEMBER') AS state_start,
               coalesce(max(s.mrr) FILTER (WHERE s.span_start <= c.month_start - 1 AND c.month_start - 1 < s.span_end_excl), 0) AS mrr_start,
               coalesce(max(s.state) FILTER (WHERE s.span_start <= c.as_of AND c.as_of < s.span_end_excl), 'NOT_MEMBER') AS state_end,
               coalesce(max(s.mrr) FILTER (WHERE s.span_start <= c.as_of AND c.as_of < s.span_end_excl), 0) AS mrr_end,
               max(s.spell_end_excl) FILTER (WHERE s.span_start <= c.as_of AND c.as_of < s.span_end_excl) AS end_spell_end,
               max(s.spell_no) FILTER (WHERE s.span_start <= c.as_of AND c.as_of < s.span_end_excl) AS end_spell_no,
               coalesce(max(s.spell_active_before) FILTER (WHERE s.span_start <= c.as_of AND c.as_of < s.span_end_excl), 0) AS before_spell,
               coalesce(max(s.active_before + CASE WHEN s.state = 'ACTIVE' THEN c.as_of - s.span_start + 1 ELSE 0 END)
                        FILTER (WHERE s.span_start <= c.as_of AND c.as_of < s.span_end_excl), 0) AS cum_end,
               coalesce(max(s.active_before + CASE WHEN s.state = 'ACTIVE' THEN c.as_of - v_r - s.span_start + 1 ELSE 0 END)
                        FILTER (WHERE s.span_start <= c.as_of - v_r AND c.as_of - v_r < s.span_end_excl), 0) AS cum_r,
               coalesce(max(s.active_before + CASE WHEN s.state = 'ACTIVE' THEN c.as_of - v_p - s.span_start + 1 ELSE 0 END)
                        FILTER (WHERE s.span_start <= c.as_of - v_p AND c.as_of - v_p < s.span_end_excl), 0) AS cum_p,
               coalesce(sum(least(s.span_end_excl, c.as_of + 1) - greatest(s.span_start, c.month_start))
                        FILTER (WHERE s.state = 'ACTIVE' AND s.span_start <= c.as_of AND s.span_end_excl > c.month_start), 0) AS active_days,
               coalesce(sum(least(s.span_end_excl, c.as_of + 1) - greatest(s.span_start, c.month_start))
                        FILTER (WHERE s.state = 'ON_HOLD' AND s.span_start <= c.as_of AND s.span_end_excl > c.month_start), 0) AS hold_days
        FROM cand c
        LEFT JOIN ironwod.member_visit_month va
               ON va.tenant_id = p_tenant AND va.gym_id = p_gym AND va.location_key = 'ALL'
              AND va.member_id = c.member_id AND va.month_start = c.month_start
        LEFT JOIN ironwod.member_state_span s
               ON s.tenant_id = p_tenant AND s.gym_id = p_gym AND s.location_key = c.location_key AND s.member_id = c.member_id
        GROUP BY c.location_key, c.month_start, c.last_day, c.as_of, c.member_id,
                 va.visits_anywhere, va.visits_recent, va.visits_prior
    ), ev AS (
        SELECT c.location_key, c.month_start, c.member_id,
               count(*) FILTER (WHERE sp.spell_start BETWEEN c.month_start AND c.as_of AND sp.spell_no = 1) AS new_events,
               count(*) FILTER (WHERE sp.spell_start BETWEEN c.month_start AND c.as_of AND sp.spell_no > 1) AS react_events,
               count(*) FILTER (WHERE sp.spell_end_excl BETWEEN c.month_start AND c.as_of) AS churn_events,
               count(*) FILTER (WHERE sp.spell_start BETWEEN c.month_start AND c.as_of
                                  AND sp.spell_end_excl BETWEEN c.month_start AND c.as_of) AS new_and_churned,
               bool_or(sp.spell_end_excl > sp.spell_start + p_s.cohort_days)
                   FILTER (WHERE sp.spell_start BETWEEN c.month_start AND c.as_of AND sp.spell_no = 1) AS retained
        FROM cand c
        JOIN ironwod.member_spell sp
          ON sp.tenant_id = p_tenant AND sp.gym_id = p_gym AND sp.location_key = c.location_key
         AND sp.member_id = c.member_id AND NOT sp.rescinded
         AND (sp.spell_start BETWEEN c.month_start AND c.as_of OR sp.spell_end_excl BETWEEN c.month_start AND c.as_of)
        GROUP BY c.location_key, c.month_start, c.member_id
    ), pay AS (
        SELECT DISTINCT q.location_key, i.member_id, date_trunc('month', i.due_date)::date AS month_start
        FROM ironwod.invoices i
        JOIN ironwod.metric_memberships q
          ON q.tenant_id = p_tenant AND q.gym_id = p_gym AND q.membership_id = i.membership_id AND q.qualifying
        WHERE i.tenant_id = p_tenant AND i.gym_id = p_gym AND i.deleted_at IS NULL AND i.status IS DISTINCT FROM 'Voided'
          AND i.paid_on IS NOT NULL AND i.amount > 0 AND i.due_date >= p_from
    ), pend AS (
        SELECT q.location_key, q.member_id, q.end_excl, min(coalesce(q.cancellation_requested_on, q.start_date)) AS known_on
        FROM ironwod.metric_memberships q
        WHERE q.tenant_id = p_tenant AND q.gym_id = p_gym AND q.qualifying AND q.end_excl <> 'infinity'
        GROUP BY 1, 2, 3
    ), fl AS (
        SELECT b.*, coalesce(ev.new_events, 0) AS new_events, coalesce(ev.react_events, 0) AS react_events,
               coalesce(ev.churn_events, 0) AS churn_events, coalesce(ev.new_and_churned, 0) AS new_and_churned, ev.retained,
               coalesce(vk.visits, 0) AS visits, coalesce(vk.member_visits, 0) AS member_visits,
               CASE WHEN b.state_end = 'ACTIVE' THEN b.cum_end - greatest(b.cum_lv, b.before_spell) END AS absent_days,
               b.cum_end - b.cum_r AS e_r, b.cum_r - b.cum_p AS e_p,
               pay.member_id IS NOT NULL AS is_paying,
               b.state_end <> 'NOT_MEMBER' AND pend.known_on <= b.as_of AS is_pending_cancel
        FROM snap b
        LEFT JOIN ev USING (location_key, month_start, member_id)
        LEFT JOIN pay USING (location_key, month_start, member_id)
        LEFT JOIN pend ON pend.location_key = b.location_key AND pend.member_id = b.member_id AND pend.end_excl = b.end_spell_end
        LEFT JOIN ironwod.member_visit_month vk
               ON vk.tenant_id = p_tenant AND vk.gym_id = p_gym AND vk.location_key = b.location_key
              AND vk.member_id = b.member_id AND vk.month_start = b.month_start
    )
    INSERT INTO ironwod.member_month_fact
        (tenant_id, gym_id, location_key, member_id, month_start, as_of, state_start, state_end,
         mrr_start, mrr_end, movement, mrr_delta, new_events, reactivated_events, churn_events,
         new_and_churned, active_days, hold_days, visits, member_visits, tenure_active_days,
         absent_active_days, is_past_due_end, is_comped_end, is_pending_cancel_end, is_zero_visits,
         is_no_visit_short, is_no_visit_long, is_declining, is_paying, cohort_retained_90d)
    SELECT p_tenant, p_gym, f.location_key, f.member_id, f.month_start, f.as_of, f.state_start, f.state_end,
           f.mrr_start, f.mrr_end,
           CASE WHEN f.state_start = 'NOT_MEMBER' AND f.state_end <> 'NOT_MEMBER'
                     THEN CASE WHEN f.end_spell_no = 1 THEN 'new' ELSE 'reactivation' END
                WHEN f.state_start <> 'NOT_MEMBER' AND f.state_end = 'NOT_MEMBER' THEN 'churn'
                WHEN f.state_start = 'ACTIVE' AND f.state_end = 'ON_HOLD' THEN 'hold_out'
                WHEN f.state_start = 'ON_HOLD' AND f.state_end = 'ACTIVE' THEN 'hold_in'
                WHEN f.state_start = 'ACTIVE' AND f.state_end = 'ACTIVE' AND f.mrr_end > f.mrr_start THEN 'expansion'
                WHEN f.state_start = 'ACTIVE' AND f.state_end = 'ACTIVE' AND f.mrr_end < f.mrr_start THEN 'contraction'
           END,
           f.mrr_end - f.mrr_start,
           f.new_events, f.react_events, f.churn_events, f.new_and_churned, f.active_days, f.hold_days,
           f.visits, f.member_visits, f.cum_end, f.absent_days, false, false, coalesce(f.is_pending_cancel, false),
           f.active_days = f.as_of - f.month_start + 1 AND f.visits_anywhere = 0,
           f.state_end = 'ACTIVE' AND f.absent_days >= p_s.absence_short_days,
           f.state_end = 'ACTIVE' AND f.absent_days >= p_s.absence_long_days,
           f.state_end = 'ACTIVE'
               AND f.e_p >= p_s.decline_min_exposure * p_s.decline_prior_days
               AND f.e_r >= p_s.decline_min_exposure * p_s.decline_recent_days
               AND f.visits_p / (f.e_p / 7.0) >= p_s.decline_min_weekly_rate
               AND f.visits_r / (f.e_r / 7.0) <= p_s.decline_ratio * (f.visits_p / (f.e_p / 7.0)),
           f.is_paying,
           CASE WHEN f.new_events > 0 THEN coalesce(f.retained, false) END
    FROM fl f
    -- a fresh rebuild conflicts with nothing; the clause makes Citus insert
    -- through intermediate results rather than COPY, which RLS refuses
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$$;
COMMENT ON FUNCTION ironwod.metrics_month_facts(uuid, uuid, ironwod.metric_settings, text[], date, date, date) IS 'Refresh stage 4, metrics.md §3 and §4.1-4.17 (month snapshot algebra and per-person metrics), §5.3 member_month_fact: rebuild the facts of a gym from the given month on; returns the fact count';

-- Stage 4b (metrics.md §2.4 past due, §4.1 comped): the two flags that read
-- invoices and memberships by date range, set on the few facts they hold for.
-- Past due on as_of: a member with an unpaid, non-voided invoice of a qualifying
-- membership due before it; comped: a non-member covered by a $0 membership on as_of.
-- An invoice is past due only in the months from its due date to its payment.
CREATE FUNCTION ironwod.metrics_month_flags(p_tenant uuid, p_gym uuid, p_from date, p_today date)
RETURNS integer
LANGUAGE plpgsql
SET enable_nestloop = off SET enable_mergejoin = off
AS $$
DECLARE
    v_n integer;
BEGIN
    UPDATE ironwod.member_month_fact f
       SET is_past_due_end = x.past_due AND f.state_end <> 'NOT_MEMBER',
           is_comped_end = x.comped AND f.state_end = 'NOT_MEMBER'
      FROM (SELECT y.location_key, y.member_id, y.month_start, bool_or(y.past_due) AS past_due, bool_or(NOT y.past_due) AS comped
            FROM (SELECT q.location_key, i.member_id, m::date AS month_start, true AS past_due
                  FROM ironwod.invoices i
                  JOIN ironwod.metric_memberships q
                    ON q.tenant_id = p_tenant AND q.gym_id = p_gym AND q.membership_id = i.membership_id AND q.qualifying,
                       generate_series(date_trunc('month', greatest(i.due_date, p_from)),
                                       least(coalesce(i.paid_on, p_today), p_today), interval '1 month') m
                  WHERE i.tenant_id = p_tenant AND i.gym_id = p_gym AND i.deleted_at IS NULL
                    AND i.status IS DISTINCT FROM 'Voided' AND i.member_id IS NOT NULL
                    AND i.due_date < least((m + interval '1 month')::date - 1, p_today)
                    AND (i.paid_on IS NULL OR i.paid_on >= least((m + interval '1 month')::date - 1, p_today))
                  UNION ALL
                  SELECT q.location_key, q.member_id, m::date, false
                  FROM ironwod.metric_memberships q,
                       generate_series(date_trunc('month', greatest(q.start_date, p_from)),
                                       least(q.end_excl - 1, p_today), interval '1 month') m
                  WHERE q.tenant_id = p_tenant AND q.gym_id = p_gym AND NOT q.qualifying AND q.end_excl > p_from
                    AND q.start_date <= least((m + interval '1 month')::date - 1, p_today)
                    AND least((m + interval '1 month')::date - 1, p_today) < q.end_excl) y
            GROUP BY 1, 2, 3) x
     WHERE f.tenant_id = p_tenant AND f.gym_id = p_gym AND f.month_start >= p_from
       AND f.location_key = x.location_key AND f.member_id = x.member_id AND f.month_start = x.month_start
       AND ((x.past_due AND f.state_end <> 'NOT_MEMBER') OR (x.comped AND f.state_end = 'NOT_MEMBER'));
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$$;
COMMENT ON FUNCTION ironwod.metrics_month_flags(uuid, uuid, date, date) IS 'Refresh stage 4b, metrics.md §2.4 (PAST_DUE flag) and §4.1 (comped members): set is_past_due_end and is_comped_end on the facts of a gym from the given month on; returns the rows flagged';

-- Stage 5 (metrics.md §4.8-4.9): money per location key and month from p_from on.
-- Cash by local processed date and transaction location; a failed invoice counted
-- once; membership payments spread over their billing period; invoices by due date
-- and invoice location, past due in the months from their due date to their payment.
CREATE FUNCTION ironwod.metrics_month_money(p_tenant uuid, p_gym uuid, p_s ironwod.metric_settings, p_tz text,
                                            p_keys text[], p_from date, p_hist date, p_today date)
RETURNS integer
LANGUAGE plpgsql
SET enable_nestloop = off SET enable_mergejoin = off
AS $$
DECLARE
    v_n integer;
BEGIN
    DELETE FROM ironwod.gym_month_money
    WHERE tenant_id = p_tenant AND gym_id = p_gym AND (month_start >= p_from OR month_start < p_hist);
    WITH mo AS (
        SELECT k.location_key, mo::date AS month_start, (mo + interval '1 month')::date - 1 AS last_day,
               least((mo + interval '1 month')::date - 1, p_today) AS as_of
        FROM generate_series(p_from, date_trunc('month', p_today), interval '1 month') AS mo, unnest(p_keys) AS k(location_key)
    ), txk AS (
        SELECT k.location_key, t.transaction_type, t.payment_method, t.amount, t.invoice_id,
               date_trunc('month', (t.processed_at AT TIME ZONE p_tz)::date)::date AS mo,
               i.membership_id, i.amount AS invoice_amount, m.billing_period_length, m.billing_period_unit
        FROM ironwod.transactions t
        LEFT JOIN ironwod.invoices i
               ON i.tenant_id = p_tenant AND i.gym_id = p_gym AND i.invoice_id = t.invoice_id AND i.deleted_at IS NULL
        LEFT JOIN ironwod.memberships m
               ON m.tenant_id = p_tenant AND m.gym_id = p_gym AND m.membership_id = i.membership_id
        CROSS JOIN LATERAL (VALUES ('ALL'), (t.location_id::text)) AS k(location_key)
        WHERE t.tenant_id = p_tenant AND t.gym_id = p_gym AND t.deleted_at IS NULL AND t.processed_at IS NOT NULL
          AND k.location_key IS NOT NULL
    ), cash AS (
        SELECT t.location_key, t.mo AS month_start,
               coalesce(sum(t.amount) FILTER (WHERE t.transaction_type = 'Payment'
                                                AND t.payment_method IS DISTINCT FROM 'Store Credit'), 0) AS gross,
               coalesce(sum(t.amount) FILTER (WHERE t.transaction_type = 'Refund'), 0) AS refunds,
               count(DISTINCT t.invoice_id) FILTER (WHERE t.transaction_type = 'Failed Payment') AS failed_n
        FROM txk t GROUP BY 1, 2
    ), failed AS (
        SELECT x.location_key, x.mo AS month_start, sum(x.invoice_amount) AS failed_amount
        FROM (SELECT DISTINCT t.location_key, t.mo, t.invoice_id, coalesce(t.invoice_amount, t.amount) AS invoice_amount
              FROM txk t WHERE t.transaction_type = 'Failed Payment') x
        GROUP BY 1, 2
    ), recog AS (
        SELECT x.location_key, x.month_start, sum(x.amount) AS membership_revenue
        FROM (
            SELECT t.location_key, (t.mo + make_interval(months => k))::date AS month_start, t.amount / n.n AS amount
            FROM txk t
            CROSS JOIN LATERAL (SELECT ironwod.spread_months(t.billing_period_length, t.billing_period_unit,
                                                             p_s.max_spread_months) AS n) n
            CROSS JOIN LATERAL generate_series(0, n.n - 1) AS k
            WHERE t.transaction_type = 'Payment' AND t.payment_method IS DISTINCT FROM 'Store Credit'
              AND t.membership_id IS NOT NULL
            UNION ALL
            SELECT t.location_key, t.mo, -t.amount FROM txk t WHERE t.transaction_type = 'Refund' AND t.membership_id IS NOT NULL
        ) x GROUP BY 1, 2
    ), inv AS (
        SELECT k.location_key, i.amount, i.due_date, i.paid_on, coalesce(c.collected, 0) AS collected
        FROM ironwod.invoices i
        LEFT JOIN (SELECT t.invoice_id, sum(CASE t.transaction_type WHEN 'Payment' THEN t.amount
                                                                    WHEN 'Refund' THEN -t.amount ELSE 0 END) AS collected
                   FROM ironwod.transactions t
                   WHERE t.tenant_id = p_tenant AND t.gym_id = p_gym AND t.deleted_at IS NULL AND t.invoice_id IS NOT NULL
                   GROUP BY 1) c ON c.invoice_id = i.invoice_id
        CROSS JOIN LATERAL (VALUES ('ALL'), (i.location_id::text)) AS k(location_key)
        WHERE i.tenant_id = p_tenant AND i.gym_id = p_gym AND i.deleted_at IS NULL AND k.location_key IS NOT NULL
          AND i.status IS DISTINCT FROM 'Voided' AND i.due_date IS NOT NULL
    ), invm AS (
        SELECT mo.location_key, mo.month_start,
               coalesce(sum(i.amount) FILTER (WHERE i.due_date BETWEEN mo.month_start AND mo.last_day), 0) AS invoiced,
               coalesce(sum(least(greatest(i.collected, 0), i.amount))
                        FILTER (WHERE i.due_date BETWEEN mo.month_start AND mo.last_day), 0) AS invoiced_collected,
               coalesce(sum(i.amount) FILTER (WHERE i.due_date <= mo.as_of
                                                AND (i.paid_on IS NULL OR i.paid_on > mo.as_of)), 0) AS past_due_amount
        FROM inv i
        CROSS JOIN LATERAL generate_series(date_trunc('month', greatest(i.due_date, p_from)),
                                           greatest(i.due_date, least(coalesce(i.paid_on, p_today), p_today)),
                                           interval '1 month') AS m
        JOIN mo ON mo.location_key = i.location_key AND mo.month_start = m::date
        GROUP BY 1, 2
    )
    INSERT INTO ironwod.gym_month_money
        (tenant_id, gym_id, location_key, month_start, gross, refunds, failed_n, failed_amount,
         membership_revenue, invoiced, invoiced_collected, past_due_amount)
    SELECT p_tenant, p_gym, mo.location_key, mo.month_start, coalesce(cash.gross, 0), coalesce(cash.refunds, 0),
           coalesce(cash.failed_n, 0), coalesce(failed.failed_amount, 0), coalesce(recog.membership_revenue, 0),
           coalesce(invm.invoiced, 0), coalesce(invm.invoiced_collected, 0), coalesce(invm.past_due_amount, 0)
    FROM mo
    LEFT JOIN cash USING (location_key, month_start)
    LEFT JOIN failed USING (location_key, month_start)
    LEFT JOIN recog USING (location_key, month_start)
    LEFT JOIN invm USING (location_key, month_start)
    -- a fresh rebuild conflicts with nothing; the clause makes Citus insert
    -- through intermediate results rather than COPY, which RLS refuses
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$$;
COMMENT ON FUNCTION ironwod.metrics_month_money(uuid, uuid, ironwod.metric_settings, text, text[], date, date, date) IS 'Refresh stage 5, metrics.md §4.8 (cash, refunds, failed payments, invoiced, past due) and §4.9 (recognised revenue): rebuild gym_month_money of a gym from the given month on; returns the row count';

-- Stage 6 (metrics.md §5.1-5.2): the cache rows from p_from on, a GROUP BY over the
-- facts (people counted once per key, never summed over locations) joined to the
-- money of stage 5.  Flows are NULL in the history-start month.
CREATE FUNCTION ironwod.metrics_cache_rows(p_tenant uuid, p_gym uuid, p_s ironwod.metric_settings, p_tz text,
                                           p_keys text[], p_from date, p_hist date, p_today date,
                                           p_watermark timestamptz, p_hash text)
RETURNS integer
LANGUAGE plpgsql
SET enable_nestloop = off SET enable_mergejoin = off
AS $$
DECLARE
    v_n integer;
BEGIN
    DELETE FROM ironwod.gym_monthly_metrics_cache
    WHERE tenant_id = p_tenant AND gym_id = p_gym AND (month_start >= p_from OR month_start < p_hist);
    WITH fa AS (
        SELECT f.location_key AS fa_location_key, f.month_start AS fa_month_start,
               count(*) FILTER (WHERE f.state_start <> 'NOT_MEMBER') AS members_start,
               count(*) FILTER (WHERE f.state_end <> 'NOT_MEMBER') AS members_end,
               count(*) FILTER (WHERE f.state_end = 'ACTIVE') AS active_end,
               count(*) FILTER (WHERE f.state_end = 'ON_HOLD') AS on_hold_end,
               count(*) FILTER (WHERE f.is_past_due_end) AS past_due_end,
               count(*) FILTER (WHERE f.is_comped_end) AS comped_end,
               count(*) FILTER (WHERE f.is_pending_cancel_end) AS pending_cancel_end,
               sum(f.new_events) AS new_members, sum(f.reactivated_events) AS reactivated,
               sum(f.churn_events) AS churned,
               count(*) FILTER (WHERE f.state_start <> 'NOT_MEMBER' AND f.state_end = 'NOT_MEMBER') AS churned_from_start,
               sum(f.new_and_churned) AS new_and_churned,
               sum(f.active_days) AS active_days,
               count(*) FILTER (WHERE f.is_paying) AS paying,
               sum(f.mrr_start) AS mrr_start, sum(f.mrr_end) AS mrr_end,
               coalesce(sum(f.mrr_delta) FILTER (WHERE f.movement = 'new'), 0) AS mrr_new,
               coalesce(sum(f.mrr_delta) FILTER (WHERE f.movement = 'reactivation'), 0) AS mrr_react,
               coalesce(sum(f.mrr_delta) FILTER (WHERE f.movement = 'expansion'), 0) AS mrr_exp,
               coalesce(-sum(f.mrr_delta) FILTER (WHERE f.movement = 'contraction'), 0) AS mrr_contr,
               coalesce(-sum(f.mrr_delta) FILTER (WHERE f.movement = 'churn'), 0) AS mrr_churn,
               coalesce(-sum(f.mrr_delta) FILTER (WHERE f.movement = 'hold_out'), 0) AS mrr_hold_out,
               coalesce(sum(f.mrr_delta) FILTER (WHERE f.movement = 'hold_in'), 0) AS mrr_hold_in,
               avg(f.tenure_active_days) FILTER (WHERE f.state_end <> 'NOT_MEMBER') AS tenure_days,
               sum(f.member_visits) AS member_visits, sum(f.visits) AS all_visits,
               count(*) FILTER (WHERE f.is_zero_visits) AS zero_visits,
               count(*) FILTER (WHERE f.is_no_visit_short) AS no_visit_short,
               count(*) FILTER (WHERE f.is_no_visit_long) AS no_visit_long,
               count(*) FILTER (WHERE f.is_declining) AS declining,
               count(*) FILTER (WHERE f.new_events > 0) AS cohort_new,
               count(*) FILTER (WHERE f.cohort_retained_90d) AS cohort_retained
        FROM ironwod.member_month_fact f
        WHERE f.tenant_id = p_tenant AND f.gym_id = p_gym AND f.month_start >= p_from
        GROUP BY f.location_key, f.month_start
    ), c AS (
        SELECT mo.location_key, mo.month_start, mo.last_day, mo.as_of,
               (mo.as_of - mo.month_start + 1) AS period_days,
               mo.month_start = p_hist AS first_month,
               fa.*, coalesce(y.gross, 0) AS gross, coalesce(y.refunds, 0) AS refunds_amt,
               coalesce(y.failed_n, 0) AS failed_n, coalesce(y.failed_amount, 0) AS failed_amount,
               coalesce(y.membership_revenue, 0) AS membership_revenue,
               coalesce(y.invoiced, 0) AS invoiced, coalesce(y.invoiced_collected, 0) AS invoiced_collected,
               coalesce(y.past_due_amount, 0) AS past_due_amount
        FROM (SELECT k.location_key, mo::date AS month_start, (mo + interval '1 month')::date - 1 AS last_day,
                     least((mo + interval '1 month')::date - 1, p_today) AS as_of
              FROM generate_series(p_from, date_trunc('month', p_today), interval '1 month') AS mo,
                   unnest(p_keys) AS k(location_key)) mo
        LEFT JOIN fa ON fa.fa_location_key = mo.location_key AND fa.fa_month_start = mo.month_start
        LEFT JOIN ironwod.gym_month_money y
               ON y.tenant_id = p_tenant AND y.gym_id = p_gym AND y.location_key = mo.location_key
              AND y.month_start = mo.month_start
    )
    INSERT INTO ironwod.gym_monthly_metrics_cache
        (tenant_id, gym_id, location_key, program_key, month_start, time_zone, period_days, is_partial,
         history_start_date, computed_at, source_watermark, definitions_version, config_hash,
         members_start, members_end, active_members_end, on_hold_members_end, past_due_members_end,
         comped_members_end, members_pending_cancel_end, new_members, reactivated_members, churned_members,
         churned_from_start, new_and_churned_same_month, net_member_change, churn_rate, retention_rate,
         net_member_growth_rate, active_member_days, avg_active_members, paying_members, mrr_start, mrr_end,
         mrr_new, mrr_reactivation, mrr_expansion, mrr_contraction, mrr_churn, mrr_hold_out, mrr_hold_in,
         collected_gross, refunds, collected_net, failed_payment_invoices, failed_payment_amount,
         invoiced_amount, invoiced_collected_to_date, past_due_amount_end, membership_revenue_recognised,
         service_revenue_net, arm, service_revenue_per_active_member, avg_tenure_months_end,
         member_visits, all_visits, visits_per_active_member_week, members_zero_visits_month,
         members_no_visit_14d_end, members_no_visit_30d_end, members_attendance_declining_end,
         cohort_new_members, cohort_retained_90d, cohort_90d_retention_rate, cohort_90d_is_final)
    SELECT p_tenant, p_gym, c.location_key, 'ALL', c.month_start, p_tz, c.period_days,
           p_today <= c.last_day + p_s.merge_gap_days, p_hist, now(), p_watermark, p_s.definitions_version, p_hash,
           coalesce(c.members_start, 0), coalesce(c.members_end, 0), coalesce(c.active_end, 0),
           coalesce(c.on_hold_end, 0), coalesce(c.past_due_end, 0), coalesce(c.comped_end, 0),
           coalesce(c.pending_cancel_end, 0),
           CASE WHEN NOT c.first_month THEN coalesce(c.new_members, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.reactivated, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.churned, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.churned_from_start, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.new_and_churned, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.members_end, 0) - coalesce(c.members_start, 0) END,
           CASE WHEN NOT c.first_month AND c.members_start > 0
                THEN round(c.churned_from_start::numeric / c.members_start, 5) END,
           CASE WHEN NOT c.first_month AND c.members_start > 0
                THEN 1 - round(c.churned_from_start::numeric / c.members_start, 5) END,
           CASE WHEN NOT c.first_month AND c.members_start > 0
                THEN round((c.members_end - c.members_start)::numeric / c.members_start, 5) END,
           coalesce(c.active_days, 0), round(coalesce(c.active_days, 0)::numeric / c.period_days, 2),
           coalesce(c.paying, 0), coalesce(c.mrr_start, 0), coalesce(c.mrr_end, 0),
           CASE WHEN NOT c.first_month THEN coalesce(c.mrr_new, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.mrr_react, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.mrr_exp, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.mrr_contr, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.mrr_churn, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.mrr_hold_out, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.mrr_hold_in, 0) END,
           c.gross, c.refunds_amt, c.gross - c.refunds_amt, c.failed_n, c.failed_amount,
           c.invoiced, c.invoiced_collected, c.past_due_amount, round(c.membership_revenue, 2),
           c.gross - c.refunds_amt,
           CASE WHEN c.active_days > 0 THEN round(c.membership_revenue / (c.active_days::numeric / c.period_days), 2) END,
           CASE WHEN c.active_days > 0 THEN round((c.gross - c.refunds_amt) / (c.active_days::numeric / c.period_days), 2) END,
           round(c.tenure_days / 30.4375, 2),
           coalesce(c.member_visits, 0), coalesce(c.all_visits, 0),
           CASE WHEN c.active_days > 0 THEN round(c.member_visits / (c.active_days / 7.0), 3) END,
           coalesce(c.zero_visits, 0), coalesce(c.no_visit_short, 0), coalesce(c.no_visit_long, 0),
           coalesce(c.declining, 0),
           CASE WHEN NOT c.first_month THEN coalesce(c.cohort_new, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.cohort_retained, 0) END,
           CASE WHEN NOT c.first_month AND c.cohort_new > 0 THEN round(c.cohort_retained::numeric / c.cohort_new, 5) END,
           CASE WHEN NOT c.first_month THEN c.last_day + p_s.cohort_days < p_today END
    FROM c
    -- a fresh rebuild conflicts with nothing; the clause makes Citus insert
    -- through intermediate results rather than COPY, which RLS refuses
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$$;
COMMENT ON FUNCTION ironwod.metrics_cache_rows(uuid, uuid, ironwod.metric_settings, text, text[], date, date, date, timestamptz, text) IS 'Refresh stage 6, metrics.md §5.2 (cache columns): rebuild the gym_monthly_metrics_cache rows of a gym from the given month on from its facts and money; returns the row count';

-- Stage 7 (metrics.md §4.11-4.12): six-month pooled ARM, LEG and LTV over the
-- cached months, written on the months from p_from on.
CREATE FUNCTION ironwod.metrics_pooled(p_tenant uuid, p_gym uuid, p_from date)
RETURNS void
LANGUAGE plpgsql
SET enable_nestloop = off SET enable_mergejoin = off
AS $$
BEGIN
    UPDATE ironwod.gym_monthly_metrics_cache x
       SET arm_6m = w.arm_6m,
           leg_months_6m = w.leg,
           ltv = round(w.arm_6m * w.leg, 2)
      FROM (SELECT y.location_key, y.program_key, y.month_start,
                   CASE WHEN sum(y.avg_active_members) OVER w6 > 0
                        THEN round(sum(y.membership_revenue_recognised) OVER w6 / sum(y.avg_active_members) OVER w6, 2)
                   END AS arm_6m,
                   CASE WHEN count(y.churned_from_start) OVER w6 >= 3 AND sum(y.churned_from_start) OVER w6 > 0
                        THEN round(sum(y.members_start) FILTER (WHERE y.churned_from_start IS NOT NULL) OVER w6::numeric
                                   / sum(y.churned_from_start) OVER w6, 2)
                   END AS leg
            FROM ironwod.gym_monthly_metrics_cache y
            WHERE y.tenant_id = p_tenant AND y.gym_id = p_gym
            WINDOW w6 AS (PARTITION BY y.location_key, y.program_key ORDER BY y.month_start
                          ROWS BETWEEN 5 PRECEDING AND CURRENT ROW)) w
     WHERE x.tenant_id = p_tenant AND x.gym_id = p_gym AND x.month_start >= p_from
       AND x.location_key = w.location_key AND x.program_key = w.program_key AND x.month_start = w.month_start;

END
$$;
COMMENT ON FUNCTION ironwod.metrics_pooled(uuid, uuid, date) IS 'Refresh stage 7, metrics.md §4.11 (LEG) and §4.12 (LTV): six-month pooled arm_6m, leg_months_6m and ltv on the cache rows of a gym from the given month on';

-- A refresh: spells and daily state for the whole history (both are small: a few
-- rows per membership), visits, facts, money and cache rows for months >= p_from
-- (clamped to history start), then the pooled figures.
CREATE FUNCTION ironwod.compute_metrics(p_from date)
RETURNS jsonb
LANGUAGE plpgsql
SET jit = off
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    s ironwod.metric_settings;
    v_tz text;
    v_today date;
    v_hist date;
    v_cur date;
    v_from date;
    v_keys text[];
    v_wm timestamptz;
    v_spells integer;
    v_facts integer;
    v_rows integer;
BEGIN
    IF v_t IS NULL OR v_g IS NULL THEN
        RAISE EXCEPTION 'no ironwod scope is set in this transaction'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Call ironwod_set_scope(tenant, gym) in the same transaction first.';
    END IF;
    s := ironwod.metric_config();
    v_tz := ironwod.gym_time_zone(v_t, v_g);
    v_today := ironwod.metrics_today(v_tz);
    v_cur := date_trunc('month', v_today)::date;
    v_hist := least(ironwod.history_start(v_tz), v_cur);
    v_from := least(greatest(date_trunc('month', coalesce(p_from, v_hist))::date, v_hist), v_cur);
    SELECT '{ALL}'::text[] || coalesce(array_agg(DISTINCT l.location_id::text), '{}') INTO v_keys
    FROM ironwod.locations l WHERE l.tenant_id = v_t AND l.gym_id = v_g AND l.deleted_at IS NULL;

    v_spells := ironwod.metrics_spells(v_t, v_g, s);
    PERFORM ironwod.metrics_day_states(v_t, v_g, v_today);
    PERFORM ironwod.metrics_visits(v_t, v_g, s, v_tz, v_from, v_hist, v_today);
    v_facts := ironwod.metrics_month_facts(v_t, v_g, s, v_keys, v_from, v_hist, v_today);
    PERFORM ironwod.metrics_month_flags(v_t, v_g, v_from, v_today);
    PERFORM ironwod.metrics_month_money(v_t, v_g, s, v_tz, v_keys, v_from, v_hist, v_today);

    SELECT greatest(
        (SELECT max(source_updated_at) FROM ironwod.memberships WHERE tenant_id = v_t AND gym_id = v_g),
        (SELECT max(source_updated_at) FROM ironwod.membership_holds WHERE tenant_id = v_t AND gym_id = v_g),
        (SELECT max(source_updated_at) FROM ironwod.attendance_events WHERE tenant_id = v_t AND gym_id = v_g),
        (SELECT max(source_updated_at) FROM ironwod.invoices WHERE tenant_id = v_t AND gym_id = v_g),
        (SELECT max(source_updated_at) FROM ironwod.transactions WHERE tenant_id = v_t AND gym_id = v_g))
    INTO v_wm;
    -- the hash is computed once here and passed in: the cache's INSERT calls no
    -- function of ours (on Citus one that reads a table must not run in it)
    v_rows := ironwod.metrics_cache_rows(v_t, v_g, s, v_tz, v_keys, v_from, v_hist, v_today, v_wm,
                                         ironwod.config_hash(s));
    PERFORM ironwod.metrics_pooled(v_t, v_g, v_from);

    -- The newest source change is stamped on every cached month, not only on the
    -- months recomputed now: the recompute policy recomputed every month a change
    -- could touch, so each one reflects the sources up to v_wm, and a replay, which
    -- recomputes them all, stamps the same value.
    UPDATE ironwod.gym_monthly_metrics_cache x SET source_watermark = v_wm
     WHERE x.tenant_id = v_t AND x.gym_id = v_g AND x.source_watermark IS DISTINCT FROM v_wm;
    -- Unknown is NULL: metrics of entities the gym's plan does not include (82_unknowns).
    PERFORM ironwod.mask_unknown_metrics();

    RETURN jsonb_build_object('from', v_from, 'to', v_cur, 'history_start', v_hist, 'time_zone', v_tz,
                              'spells', v_spells, 'facts', v_facts, 'cache_rows', v_rows);
END
$$;
COMMENT ON FUNCTION ironwod.compute_metrics(date) IS 'Rebuild spells and daily states, and visits, member-month facts, money and cache rows for months from the given one (clamped to history start) to the current local month, for the current scope: the refresh stages in order';

-- Recompute policy (metrics.md §5.4): the trailing months, plus every month a change
-- landed by the run touched (its earliest civil date, less the merge gap and the
-- cohort window that reach back from it).  The whole history when the cache is empty
-- or was built with other parameters or definitions.
CREATE FUNCTION ironwod.refresh_metrics(p_run_id bigint)
RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    s ironwod.metric_settings;
    v_tz text;
    v_cur date;
    v_dirty date;
    v_from date;
    v_full boolean;
BEGIN
    IF ironwod.scope_tenant() IS NULL OR ironwod.scope_gym() IS NULL THEN
        RAISE EXCEPTION 'no ironwod scope is set in this transaction'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Call ironwod_set_scope(tenant, gym) in the same transaction first.';
    END IF;
    s := ironwod.metric_config();
    v_tz := ironwod.gym_time_zone(ironwod.scope_tenant(), ironwod.scope_gym());
    v_cur := date_trunc('month', ironwod.metrics_today(v_tz))::date;
    SELECT min(d.dirty_from) INTO v_dirty FROM ironwod.metric_dirty d
    WHERE d.tenant_id = ironwod.scope_tenant() AND d.gym_id = ironwod.scope_gym() AND d.run_id = p_run_id;
    v_full := NOT EXISTS (SELECT 1 FROM ironwod.gym_monthly_metrics_cache c
                          WHERE c.tenant_id = ironwod.scope_tenant() AND c.gym_id = ironwod.scope_gym())
              OR EXISTS (SELECT 1 FROM ironwod.gym_monthly_metrics_cache c
                         WHERE c.tenant_id = ironwod.scope_tenant() AND c.gym_id = ironwod.scope_gym()
                           AND (c.config_hash <> ironwod.config_hash(s)
                                OR c.definitions_version <> s.definitions_version
                                OR c.time_zone <> v_tz));
    v_from := CASE WHEN v_full THEN NULL
                   ELSE least((v_cur - make_interval(months => s.trailing_months))::date,
                              v_dirty - greatest(s.merge_gap_days, s.cohort_days + 1)) END;
    RETURN ironwod.compute_metrics(v_from) || jsonb_build_object('run_id', p_run_id, 'full', v_full);
END
$$;
COMMENT ON FUNCTION ironwod.refresh_metrics(bigint) IS 'Worker, after transform_run: recompute the trailing months plus every month the run''s backdated changes touched (whole history on first build or a parameter change); returns the range and row counts';

CREATE FUNCTION ironwod.refresh_metrics_all()
RETURNS jsonb
LANGUAGE sql
AS $$ SELECT ironwod.compute_metrics(NULL) || jsonb_build_object('full', true) $$;
COMMENT ON FUNCTION ironwod.refresh_metrics_all() IS 'Recompute spells, facts and every cached month of the current scope from history start';

GRANT EXECUTE ON FUNCTION ironwod.metrics_today(text), ironwod.metric_config(), ironwod.config_hash(ironwod.metric_settings),
    ironwod.monthly_price(numeric, integer, text), ironwod.spread_months(integer, text, integer),
    ironwod.history_start(text), ironwod.compute_metrics(date), ironwod.refresh_metrics(bigint),
    ironwod.refresh_metrics_all(),
    ironwod.metrics_spells(uuid, uuid, ironwod.metric_settings),
    ironwod.metrics_day_states(uuid, uuid, date),
    ironwod.metrics_visits(uuid, uuid, ironwod.metric_settings, text, date, date, date),
    ironwod.metrics_month_facts(uuid, uuid, ironwod.metric_settings, text[], date, date, date),
    ironwod.metrics_month_flags(uuid, uuid, date, date),
    ironwod.metrics_month_money(uuid, uuid, ironwod.metric_settings, text, text[], date, date, date),
    ironwod.metrics_cache_rows(uuid, uuid, ironwod.metric_settings, text, text[], date, date, date, timestamptz, text),
    ironwod.metrics_pooled(uuid, uuid, date)
    TO ironwod_worker;
-- 82_unknowns: unknown is NULL.  A metric that depends on an entity the gym's
-- Wodify plan does not include (HTTP 403 on its endpoint, ironwod.entity_entitlements)
-- is NULL in every cached month, not the 0 that computing it from no records
-- would give.  This is the last step of every metrics computation, over the cache
-- rows only.  The masked rows name the not-entitled entities in their config_hash,
-- which then differs from the settings' hash, so every refresh while an entity is
-- refused recomputes every month (the few gyms without a part of Wodify pay that),
-- and so does the first one after a reconciliation finds the endpoint open again.

-- Which cache column depends on which entity, by metrics.md: who is a member and
-- what they pay come from memberships (§2.2, §4.1-§4.7, §4.11, §4.16, §4.17); holds
-- split ACTIVE from ON_HOLD, price MRR at 0 and leave hold days out of exposure
-- (§2.3, §2.4, §4.6, §4.7, §4.13-§4.15); visits come from class sign-ins
-- (§4.13-§4.15); past due, invoiced and paying from invoices (§4.1, §4.8, §4.10), and
-- membership revenue is payments on membership invoices (§4.9); cash from
-- transactions (§4.8-§4.12).  Columns not named (keys, time zone, period, history
-- start, versions) depend on none.
CREATE FUNCTION ironwod.metric_sources()
RETURNS TABLE (metric text, entity text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT m, v.entity
    FROM (VALUES
        ('memberships', ARRAY[
            'members_start', 'members_end', 'active_members_end', 'on_hold_members_end', 'past_due_members_end',
            'comped_members_end', 'members_pending_cancel_end', 'new_members', 'reactivated_members',
            'churned_members', 'churned_from_start', 'new_and_churned_same_month', 'net_member_change',
            'churn_rate', 'retention_rate', 'net_member_growth_rate', 'active_member_days', 'avg_active_members',
            'paying_members', 'mrr_start', 'mrr_end', 'mrr_new', 'mrr_reactivation', 'mrr_expansion',
            'mrr_contraction', 'mrr_churn', 'mrr_hold_out', 'mrr_hold_in', 'membership_revenue_recognised',
            'arm', 'service_revenue_per_active_member', 'arm_6m', 'leg_months_6m', 'ltv',
            'avg_tenure_months_end', 'member_visits', 'visits_per_active_member_week',
            'members_zero_visits_month', 'members_no_visit_14d_end', 'members_no_visit_30d_end',
            'members_attendance_declining_end', 'cohort_new_members', 'cohort_retained_90d',
            'cohort_90d_retention_rate', 'cohort_90d_is_final']),
        ('membership_holds', ARRAY[
            'active_members_end', 'on_hold_members_end', 'active_member_days', 'avg_active_members',
            'mrr_start', 'mrr_end', 'mrr_new', 'mrr_reactivation', 'mrr_expansion', 'mrr_contraction',
            'mrr_churn', 'mrr_hold_out', 'mrr_hold_in', 'arm', 'service_revenue_per_active_member', 'arm_6m',
            'ltv', 'visits_per_active_member_week', 'members_zero_visits_month', 'members_no_visit_14d_end',
            'members_no_visit_30d_end', 'members_attendance_declining_end']),
        ('class_signins', ARRAY[
            'member_visits', 'all_visits', 'appointment_visits', 'visits_per_active_member_week',
            'members_zero_visits_month', 'members_no_visit_14d_end', 'members_no_visit_30d_end',
            'members_attendance_declining_end']),
        ('invoices', ARRAY[
            'past_due_members_end', 'paying_members', 'failed_payment_amount', 'invoiced_amount',
            'invoiced_collected_to_date', 'past_due_amount_end', 'membership_revenue_recognised',
            'arm', 'arm_6m', 'ltv']),
        ('transactions', ARRAY[
            'collected_gross', 'refunds', 'collected_net', 'failed_payment_invoices', 'failed_payment_amount',
            'invoiced_collected_to_date', 'membership_revenue_recognised', 'service_revenue_net', 'arm',
            'service_revenue_per_active_member', 'arm_6m', 'ltv'])
    ) AS v(entity, metrics), unnest(v.metrics) AS m
$$;
COMMENT ON FUNCTION ironwod.metric_sources() IS 'Which gym_monthly_metrics_cache column depends on which entity (metrics.md): NULL while that entity is not entitled';

-- The final step of a metrics computation (ironwod.compute_metrics): every cached
-- month of the scoped gym gets NULL in the columns that depend on a not-entitled
-- entity, and those entities after its config_hash (the settings' hash, a space,
-- "not entitled:" and the list).  One UPDATE of constants; returns the rows it set.
CREATE FUNCTION ironwod.mask_unknown_metrics()
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_refused text[];
    v_note text;
    v_set text;
    v_rows integer;
BEGIN
    -- Two steps, so the query on the (distributed) entitlements joins nothing.
    SELECT array_agg(n.entity ORDER BY n.entity) INTO v_refused FROM ironwod.entity_entitlements n
    WHERE n.tenant_id = v_t AND n.gym_id = v_g;
    v_note := ' not entitled: ' || array_to_string(v_refused, ',');
    SELECT string_agg(format('%I = NULL', x.metric), ', ' ORDER BY x.metric) INTO v_set
    FROM (SELECT DISTINCT d.metric FROM ironwod.metric_sources() d WHERE d.entity = ANY (v_refused)) x;
    IF v_set IS NULL THEN
        RETURN 0;
    END IF;
    EXECUTE format('UPDATE ironwod.gym_monthly_metrics_cache x SET %s, config_hash = split_part(x.config_hash, '' '', 1) || $3 '
                   'WHERE x.tenant_id = $1 AND x.gym_id = $2', v_set)
        USING v_t, v_g, v_note;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    RETURN v_rows;
END
$$;
COMMENT ON FUNCTION ironwod.mask_unknown_metrics() IS 'Last step of a metrics computation: NULL (unknown) in every cached month for the metrics that depend on an entity the gym''s plan does not include, and those entities named in config_hash (so the next refresh recomputes every month)';

GRANT EXECUTE ON FUNCTION ironwod.metric_sources(), ironwod.mask_unknown_metrics() TO ironwod_worker;
GRANT EXECUTE ON FUNCTION ironwod.metric_sources() TO ironwod_app, ironwod_admin;
-- 85_reads: the read API (cache and facts only, never raw or canonical tables),
-- replay from raw, and the digest that proves a replay reproduces the live tables.

CREATE FUNCTION @extschema@.ironwod_dashboard(p_tenant_id uuid, p_gym_id uuid, p_from_month date,
                                              p_to_month date, p_location text DEFAULT 'ALL')
RETURNS SETOF ironwod.gym_monthly_metrics_cache
LANGUAGE plpgsql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_from date := date_trunc('month', p_from_month)::date;
    v_to date := date_trunc('month', p_to_month)::date;
BEGIN
    PERFORM ironwod.assert_scope(p_tenant_id, p_gym_id);
    IF p_from_month IS NULL OR p_to_month IS NULL OR p_location IS NULL THEN
        RAISE EXCEPTION 'from_month, to_month and location must not be null'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'Pass the first and last month wanted (any day of the month) and ''ALL'' or a location id.';
    END IF;
    IF v_from > v_to THEN
        RAISE EXCEPTION 'from_month % is after to_month %', v_from, v_to
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Swap the two months.';
    END IF;
    IF v_to > v_from + interval '120 months' THEN
        RAISE EXCEPTION 'at most 121 months can be read at once'
            USING ERRCODE = 'program_limit_exceeded', HINT = 'Read a shorter range.';
    END IF;
    IF p_location <> 'ALL' AND NOT EXISTS (
            SELECT 1 FROM ironwod.gym_monthly_metrics_cache c
            WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id AND c.location_key = p_location) THEN
        RAISE EXCEPTION 'unknown location "%"', p_location
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Valid locations: ' || coalesce((
                      SELECT string_agg(DISTINCT c.location_key, ', ')
                      FROM ironwod.gym_monthly_metrics_cache c
                      WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id), 'ALL') || '.';
    END IF;
    RETURN QUERY
        SELECT c.* FROM ironwod.gym_monthly_metrics_cache c
        WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id AND c.location_key = p_location
          AND c.program_key = 'ALL' AND c.month_start BETWEEN v_from AND v_to
        ORDER BY c.month_start;
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_dashboard(uuid, uuid, date, date, text) IS 'Cached monthly metrics of a gym (location ''ALL'' or a Wodify location id) for months from..to; reads only gym_monthly_metrics_cache';

-- Metric name -> which member-month facts make up the number.
CREATE FUNCTION ironwod.explain_metrics() RETURNS text[]
LANGUAGE sql IMMUTABLE
AS $$
    SELECT ARRAY['members_start', 'members_end', 'active_members_end', 'on_hold_members_end',
                 'past_due_members_end', 'comped_members_end', 'members_pending_cancel_end',
                 'new_members', 'reactivated_members', 'churned_members', 'churned_from_start',
                 'new_and_churned_same_month', 'paying_members',
                 'mrr_new', 'mrr_reactivation', 'mrr_expansion', 'mrr_contraction', 'mrr_churn',
                 'mrr_hold_out', 'mrr_hold_in',
                 'members_zero_visits_month', 'members_no_visit_14d_end', 'members_no_visit_30d_end',
                 'members_attendance_declining_end', 'at_risk',
                 'cohort_new_members', 'cohort_retained_90d']
$$;
COMMENT ON FUNCTION ironwod.explain_metrics() IS 'Metric names ironwod_explain can break down into members';

CREATE FUNCTION @extschema@.ironwod_explain(p_tenant_id uuid, p_gym_id uuid, p_month date, p_metric text,
                                            p_location text DEFAULT 'ALL')
RETURNS TABLE (member_id bigint, location_key text, month_start date, contribution numeric,
               state_start text, state_end text, mrr_start numeric, mrr_end numeric, movement text,
               active_days integer, visits integer, absent_active_days integer, flags text[])
LANGUAGE plpgsql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_month date := date_trunc('month', p_month)::date;
    v_sources text[];
    v_refused text;
BEGIN
    PERFORM ironwod.assert_scope(p_tenant_id, p_gym_id);
    IF p_month IS NULL OR p_metric IS NULL OR p_location IS NULL THEN
        RAISE EXCEPTION 'month, metric and location must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF NOT p_metric = ANY (ironwod.explain_metrics()) THEN
        RAISE EXCEPTION 'unknown metric "%"', p_metric
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Valid metrics: ' || array_to_string(ironwod.explain_metrics(), ', ') || '.';
    END IF;
    -- A metric the cache holds as unknown (82_unknowns) has no members to list.
    SELECT array_agg(DISTINCT d.entity) INTO v_sources FROM ironwod.metric_sources() d
    WHERE d.metric = ANY (CASE p_metric WHEN 'at_risk'
                              THEN ARRAY['members_no_visit_14d_end', 'members_attendance_declining_end']
                              ELSE ARRAY[p_metric] END);
    SELECT string_agg(n.entity, ', ' ORDER BY n.entity) INTO v_refused FROM ironwod.entity_entitlements n
    WHERE n.tenant_id = p_tenant_id AND n.gym_id = p_gym_id AND n.entity = ANY (v_sources);
    IF v_refused IS NOT NULL THEN
        RAISE EXCEPTION 'metric "%" is unknown for this gym', p_metric
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = format('It depends on %s, which the gym''s Wodify plan does not include.', v_refused),
                  HINT = 'The weekly reconciliation asks Wodify again and computes it once the plan includes it.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM ironwod.gym_monthly_metrics_cache c
                   WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id
                     AND c.location_key = p_location AND c.month_start = v_month) THEN
        RAISE EXCEPTION 'no cached metrics for month % at location "%"', v_month, p_location
            USING ERRCODE = 'no_data_found',
                  HINT = coalesce((SELECT format('Cached months run from %s to %s; locations: %s.',
                                                 min(c.month_start), max(c.month_start),
                                                 string_agg(DISTINCT c.location_key, ', '))
                                   FROM ironwod.gym_monthly_metrics_cache c
                                   WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id),
                                  'Nothing is cached for this gym yet: run a sync first.');
    END IF;
    RETURN QUERY
    SELECT f.member_id, f.location_key, f.month_start,
           CASE WHEN p_metric LIKE 'mrr\_%' THEN abs(f.mrr_delta)
                WHEN p_metric IN ('new_members', 'cohort_new_members') THEN f.new_events::numeric
                WHEN p_metric = 'reactivated_members' THEN f.reactivated_events::numeric
                WHEN p_metric = 'churned_members' THEN f.churn_events::numeric
                WHEN p_metric = 'new_and_churned_same_month' THEN f.new_and_churned::numeric
                ELSE 1 END,
           f.state_start, f.state_end, f.mrr_start, f.mrr_end, f.movement, f.active_days, f.visits,
           f.absent_active_days,
           array_remove(ARRAY[CASE WHEN f.is_past_due_end THEN 'past_due' END,
                              CASE WHEN f.is_pending_cancel_end THEN 'pending_cancel' END,
                              CASE WHEN f.is_no_visit_short THEN 'no_visit_14d' END,
                              CASE WHEN f.is_no_visit_long THEN 'no_visit_30d' END,
                              CASE WHEN f.is_declining THEN 'attendance_declining' END,
                              CASE WHEN f.is_zero_visits THEN 'zero_visits' END,
                              CASE WHEN f.is_comped_end THEN 'comped' END], NULL)
    FROM ironwod.member_month_fact f
    WHERE f.tenant_id = p_tenant_id AND f.gym_id = p_gym_id AND f.location_key = p_location
      AND f.month_start = v_month
      AND CASE p_metric
            WHEN 'members_start' THEN f.state_start <> 'NOT_MEMBER'
            WHEN 'members_end' THEN f.state_end <> 'NOT_MEMBER'
            WHEN 'active_members_end' THEN f.state_end = 'ACTIVE'
            WHEN 'on_hold_members_end' THEN f.state_end = 'ON_HOLD'
            WHEN 'past_due_members_end' THEN f.is_past_due_end
            WHEN 'comped_members_end' THEN f.is_comped_end
            WHEN 'members_pending_cancel_end' THEN f.is_pending_cancel_end
            WHEN 'new_members' THEN f.new_events > 0
            WHEN 'cohort_new_members' THEN f.new_events > 0
            WHEN 'cohort_retained_90d' THEN f.cohort_retained_90d
            WHEN 'reactivated_members' THEN f.reactivated_events > 0
            WHEN 'churned_members' THEN f.churn_events > 0
            WHEN 'churned_from_start' THEN f.state_start <> 'NOT_MEMBER' AND f.state_end = 'NOT_MEMBER'
            WHEN 'new_and_churned_same_month' THEN f.new_and_churned > 0
            WHEN 'paying_members' THEN f.is_paying
            WHEN 'mrr_new' THEN f.movement = 'new'
            WHEN 'mrr_reactivation' THEN f.movement = 'reactivation'
            WHEN 'mrr_expansion' THEN f.movement = 'expansion'
            WHEN 'mrr_contraction' THEN f.movement = 'contraction'
            WHEN 'mrr_churn' THEN f.movement = 'churn'
            WHEN 'mrr_hold_out' THEN f.movement = 'hold_out'
            WHEN 'mrr_hold_in' THEN f.movement = 'hold_in'
            WHEN 'members_zero_visits_month' THEN f.is_zero_visits
            WHEN 'members_no_visit_14d_end' THEN f.is_no_visit_short
            WHEN 'members_no_visit_30d_end' THEN f.is_no_visit_long
            WHEN 'members_attendance_declining_end' THEN f.is_declining
            WHEN 'at_risk' THEN f.is_no_visit_short OR f.is_declining
          END
    ORDER BY f.member_id;
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_explain(uuid, uuid, date, text, text) IS 'Drill-down: the members behind a cached metric of a month (who churned, who is new, who is at risk ...), from member_month_fact only; at_risk = no visit in 14 active days or attendance declining; refused (55000) for a metric that is unknown because the gym''s plan does not include its entity';

-- SHA-256 over a canonical rendering (jsonb text, rows in key order, computed_at left
-- out) of every derived row of one gym: the canonical tables and every metrics stage
-- (spells, state spans, visit months, facts, money, cache).
CREATE FUNCTION ironwod.digest(p_tenant_id uuid, p_gym_id uuid)
RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_parts text[] := '{}';
    v_part text;
    t record;
BEGIN
    PERFORM ironwod.assert_scope(p_tenant_id, p_gym_id);
    FOR t IN SELECT * FROM (VALUES
            (1, 'locations', 'location_id'), (2, 'programs', 'program_id'), (3, 'members', 'member_id'),
            (4, 'memberships', 'membership_id'), (5, 'membership_holds', 'hold_id'),
            (6, 'attendance_events', 'signin_id'), (7, 'invoices', 'invoice_id'),
            (8, 'transactions', 'transaction_id'),
            (9, 'member_spell', 'location_key, member_id, spell_start'),
            (10, 'member_month_fact', 'location_key, month_start, member_id'),
            (11, 'gym_monthly_metrics_cache', 'location_key, program_key, month_start'),
            (12, 'member_state_span', 'location_key, member_id, span_start'),
            (13, 'member_visit_month', 'location_key, month_start, member_id'),
            (14, 'gym_month_money', 'location_key, month_start')) AS v(n, tab, ord)
        ORDER BY n
    LOOP
        EXECUTE format($q$SELECT %L || ':' || coalesce(string_agg((to_jsonb(x) - 'computed_at')::text, E'\n' ORDER BY %s), '')
                          FROM ironwod.%I x WHERE x.tenant_id = $1 AND x.gym_id = $2$q$,
                       t.tab, t.ord, t.tab)
            INTO v_part USING p_tenant_id, p_gym_id;
        v_parts := v_parts || v_part;
    END LOOP;
    RETURN encode(sha256(convert_to(array_to_string(v_parts, E'\n--\n'), 'UTF8')), 'hex');
END
$$;
COMMENT ON FUNCTION ironwod.digest(uuid, uuid) IS 'SHA-256 hex of every derived row of a gym (canonical tables, spells, state spans, visit months, facts, money and cache) in a canonical text form (computed_at left out); equal before and after ironwod_replay';

CREATE FUNCTION @extschema@.ironwod_replay(p_tenant_id uuid, p_gym_id uuid)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM ironwod.assert_connection(p_tenant_id, p_gym_id);
    -- One replay per gym at a time; the run worker's transform/refresh also write these rows.
    PERFORM pg_advisory_xact_lock(hashtextextended('ironwod.replay:' || p_tenant_id || ':' || p_gym_id, 0));
    DELETE FROM ironwod.gym_monthly_metrics_cache WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.member_month_fact WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.member_spell WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.member_state_span WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.member_visit_month WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.gym_month_money WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.transactions WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.invoices WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.attendance_events WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.membership_holds WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.memberships WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.members WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.programs WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.locations WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    PERFORM ironwod.transform_all();
    PERFORM ironwod.refresh_metrics_all();
    RETURN ironwod.digest(p_tenant_id, p_gym_id);
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_replay(uuid, uuid) IS 'Rebuild a gym''s canonical tables, spells, facts and metric cache from its raw tables alone (no HTTP) and return their digest';

REVOKE ALL ON FUNCTION @extschema@.ironwod_dashboard(uuid, uuid, date, date, text),
    @extschema@.ironwod_explain(uuid, uuid, date, text, text),
    @extschema@.ironwod_replay(uuid, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.ironwod_dashboard(uuid, uuid, date, date, text),
    @extschema@.ironwod_explain(uuid, uuid, date, text, text),
    @extschema@.ironwod_replay(uuid, uuid)
    TO ironwod_app, ironwod_admin;
GRANT EXECUTE ON FUNCTION ironwod.digest(uuid, uuid), ironwod.explain_metrics()
    TO ironwod_app, ironwod_admin, ironwod_worker;
GRANT EXECUTE ON FUNCTION ironwod.assert_scope(uuid, uuid) TO ironwod_app, ironwod_admin, ironwod_worker;

-- The demo's monthly summary: one line per cached month and location, read from the
-- cache only (security_invoker: RLS shows the caller its own scope).
--   SELECT * FROM ironwod.metrics_summary WHERE location_key = 'ALL'
--   ORDER BY month_start DESC LIMIT 12;
CREATE VIEW ironwod.metrics_summary WITH (security_invoker = true) AS
SELECT c.tenant_id, c.gym_id, c.location_key, c.month_start, c.is_partial,
       c.members_start, c.members_end, c.new_members, c.reactivated_members, c.churned_members,
       c.churn_rate, c.mrr_end AS mrr, c.collected_gross, c.collected_net, c.arm,
       c.visits_per_active_member_week,
       c.members_no_visit_14d_end AS at_risk_no_visit_14d,
       c.members_no_visit_30d_end AS at_risk_no_visit_30d,
       c.members_attendance_declining_end AS at_risk_declining
FROM ironwod.gym_monthly_metrics_cache c
WHERE c.program_key = 'ALL';
COMMENT ON VIEW ironwod.metrics_summary IS 'Headline monthly metrics from the cache (members, new, churned, churn rate, MRR, collected, ARM, visits per member-week, at-risk counts)';
GRANT SELECT ON ironwod.metrics_summary TO ironwod_app, ironwod_admin;
-- 88_operations: what an operator watches.  The alerts, the latency per endpoint
-- over time and the progress of running runs, as security_invoker views (RLS
-- decides: an app session sees its own gym, ironwod_admin every tenant), and the
-- structured LOG line of every finished run.  Alert thresholds are the
-- user-settable GUCs ironwod.alert_*, read once per query.  This module comes
-- after the canonical tables and the metrics cache, which the product alerts read.

-- The attendance_drop alert counts a gym's visits of the last five weeks.
CREATE INDEX attendance_events_by_start ON ironwod.attendance_events (tenant_id, gym_id, class_start_at);

CREATE FUNCTION ironwod.connection_rate(p_tenant_id uuid, p_gym_id uuid) RETURNS double precision
LANGUAGE c STABLE STRICT AS 'MODULE_PATHNAME', 'ironwod_connection_rate';
COMMENT ON FUNCTION ironwod.connection_rate(uuid, uuid) IS 'Requests/s the connection can send now: its token bucket''s rate after 429 adaptation (the configured rate before its first run), at most its share of the cluster bucket; NULL outside the caller''s scope unless the caller is an ironwod_admin';

CREATE FUNCTION ironwod.log_line(p_line text) RETURNS void
LANGUAGE c VOLATILE STRICT AS 'MODULE_PATHNAME', 'ironwod_log_line';
COMMENT ON FUNCTION ironwod.log_line(text) IS 'Write one server LOG line holding exactly this text (no CONTEXT or STATEMENT lines)';

-- The counters of a run, as one JSON document: the LOG line of a finished run.
-- Only ids, timestamps and counts: the sanitized error text stays in the run row.
-- json rather than jsonb keeps the keys in this order, for people reading the log.
CREATE FUNCTION ironwod.run_summary(p_tenant_id uuid, p_gym_id uuid, p_run_id bigint) RETURNS json
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_entities json;
    v_out json;
BEGIN
    SELECT coalesce(json_object_agg(s.entity, json_build_object(
               'requests', s.requests, 'pages', s.pages, 'pulled', s.pulled, 'new', s.new_versions,
               'unchanged', s.unchanged, 'transformed', s.transformed, 'deleted', s.deleted,
               'quarantined', s.quarantined)
               ORDER BY s.entity), '{}')
    INTO v_entities
    FROM ironwod.sync_run_entities s
    WHERE s.tenant_id = p_tenant_id AND s.gym_id = p_gym_id AND s.run_id = p_run_id;

    SELECT json_build_object(
               'event', 'ironwod.run.finished', 'run_id', r.run_id, 'tenant_id', r.tenant_id,
               'gym_id', r.gym_id, 'mode', r.mode, 'status', r.status, 'error_code', r.error_code,
               'failed_phase', r.failed_phase, 'requested_by', r.requested_by,
               'started_at', r.started_at, 'finished_at', r.finished_at,
               'duration_s', round(extract(epoch FROM r.finished_at - r.started_at)::numeric, 3),
               'requests', r.requests, 'retries', r.retries,
               'attempts', json_build_object('2xx', r.attempts_2xx, '429', r.attempts_429,
                                              '4xx', r.attempts_4xx, '5xx', r.attempts_5xx,
                                              'network', r.attempts_network, 'envelope', r.attempts_envelope),
               'token_wait_s', round(r.token_wait_s::numeric, 3), 'backoff_s', round(r.backoff_s::numeric, 3),
               'bytes_received', r.bytes_received, 'entities', v_entities)
    INTO v_out
    FROM ironwod.sync_runs r
    WHERE r.tenant_id = p_tenant_id AND r.gym_id = p_gym_id AND r.run_id = p_run_id;
    RETURN v_out;
END
$$;
COMMENT ON FUNCTION ironwod.run_summary(uuid, uuid, bigint) IS 'A run''s ids, mode, status, timings and counters (per run and per entity) as one JSON document; no error text, no secrets';

CREATE FUNCTION ironwod.log_run(p_tenant_id uuid, p_gym_id uuid, p_run_id bigint) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_summary json := ironwod.run_summary(p_tenant_id, p_gym_id, p_run_id);
BEGIN
    IF v_summary IS NOT NULL THEN
        PERFORM ironwod.log_line(v_summary::text);
    END IF;
END
$$;
COMMENT ON FUNCTION ironwod.log_run(uuid, uuid, bigint) IS 'Write the structured LOG line of a finished run (ironwod.run_summary as one JSON line)';

-- The worker's transform step: ironwod.transform_run, then its rows written per
-- entity recorded as the run's transformed counts.
CREATE FUNCTION ironwod.transform_step(p_run_id bigint) RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_written jsonb := ironwod.transform_run(p_run_id);
BEGIN
    INSERT INTO ironwod.sync_run_entities AS s (tenant_id, gym_id, run_id, entity, transformed)
    SELECT v_t, v_g, p_run_id, e.entity, (v_written ->> e.entity)::integer
    FROM ironwod.entities e
    WHERE jsonb_typeof(v_written -> e.entity) = 'number' AND (v_written ->> e.entity)::integer > 0
    ON CONFLICT (tenant_id, gym_id, run_id, entity) DO UPDATE SET transformed = excluded.transformed;
    RETURN v_written;
END
$$;
COMMENT ON FUNCTION ironwod.transform_step(bigint) IS 'Worker: transform the run (ironwod.transform_run) and record the canonical rows written per entity in sync_run_entities.transformed';

-- A quantile of a latency histogram (buckets of ironwod.latency_buckets()),
-- interpolated linearly inside its bucket; a quantile in the open last bucket
-- is reported as that bucket's lower bound (5000 ms: "at least").
CREATE FUNCTION ironwod.histogram_quantile(p_hist bigint[], p_q double precision) RETURNS double precision
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    WITH b AS (
        SELECT h.i, h.n, sum(h.n) OVER (ORDER BY h.i) AS cum, sum(h.n) OVER () AS total,
               coalesce((ironwod.latency_buckets())[h.i - 1], 0) AS lo, (ironwod.latency_buckets())[h.i] AS hi
        FROM unnest(p_hist) WITH ORDINALITY AS h(n, i)
    )
    SELECT CASE WHEN b.hi IS NULL THEN b.lo
                ELSE b.lo + (b.hi - b.lo) * (p_q * b.total - (b.cum - b.n)) / b.n END
    FROM b
    WHERE b.n > 0 AND b.cum >= p_q * b.total
    ORDER BY b.i LIMIT 1
$$;
COMMENT ON FUNCTION ironwod.histogram_quantile(bigint[], double precision) IS 'Quantile q of a latency histogram in ms, interpolated inside its bucket; NULL for an empty histogram';

-- ---------------------------------------------------------------------------------
-- Alerts
-- ---------------------------------------------------------------------------------

-- One row per active alert.  Paused and disconnected gyms raise none: an operator
-- chose to stop them.  Every branch is one set-based statement over the ledgers
-- (connections, runs, checkpoints, entitlements) or the metrics (cache, canonical
-- attendance), grouped by (tenant_id, gym_id).
CREATE VIEW ironwod.alerts WITH (security_invoker = true) AS
WITH conn AS (
    SELECT c.tenant_id, c.gym_id, c.status, c.connected_at, c.last_success_at, c.last_error_code,
           c.last_error, c.consecutive_failures, c.breaker_opened_at, c.next_retry_at,
           c.backfill_completed_at, c.time_zone
    FROM ironwod.integrations_wodify_connection c
    WHERE c.status IN ('connected', 'error')
), attempts AS (
    SELECT r.tenant_id, r.gym_id, min(r.started_at) AS first_at,
           sum(r.requests) AS requests,
           sum(r.attempts_429 + r.attempts_4xx + r.attempts_5xx + r.attempts_network + r.attempts_envelope)
               AS failed,
           jsonb_build_object('2xx', sum(r.attempts_2xx), '429', sum(r.attempts_429),
                              '4xx', sum(r.attempts_4xx), '5xx', sum(r.attempts_5xx),
                              'network', sum(r.attempts_network), 'envelope', sum(r.attempts_envelope)) AS by_outcome
    FROM ironwod.sync_runs r
    WHERE r.finished_at >= now() - interval '24 hours'
       OR (r.finished_at IS NULL AND r.status = 'running')
    GROUP BY r.tenant_id, r.gym_id
), checkpoints AS (
    SELECT b.tenant_id, b.gym_id, max(b.completed_at) AS at
    FROM ironwod.backfill_checkpoints b
    GROUP BY b.tenant_id, b.gym_id
), heartbeats AS (
    SELECT r.tenant_id, r.gym_id, max(r.heartbeat_at) AS at
    FROM ironwod.sync_runs r
    WHERE r.mode = 'backfill'
    GROUP BY r.tenant_id, r.gym_id
), progress AS (
    -- The last sign of life of an unfinished backfill campaign: a checkpointed
    -- unit or a page landed by one of its runs.
    SELECT c.tenant_id, c.gym_id, greatest(c.connected_at, b.at, h.at) AS at
    FROM conn c
    LEFT JOIN checkpoints b ON b.tenant_id = c.tenant_id AND b.gym_id = c.gym_id
    LEFT JOIN heartbeats h ON h.tenant_id = c.tenant_id AND h.gym_id = c.gym_id
    WHERE c.backfill_completed_at IS NULL
), cancellations AS (
    SELECT m.tenant_id, m.gym_id, m.month_start, m.time_zone, m.churned_members,
           avg(p.churned_members) AS trailing_mean, count(p.churned_members) AS trailing_months
    FROM ironwod.gym_monthly_metrics_cache m
    JOIN conn c ON c.tenant_id = m.tenant_id AND c.gym_id = m.gym_id
    JOIN ironwod.gym_monthly_metrics_cache p
      ON p.tenant_id = m.tenant_id AND p.gym_id = m.gym_id AND p.location_key = 'ALL' AND p.program_key = 'ALL'
     AND p.month_start >= m.month_start - interval '3 months' AND p.month_start < m.month_start
    WHERE m.location_key = 'ALL' AND m.program_key = 'ALL'
      AND m.month_start = date_trunc('month', now() AT TIME ZONE m.time_zone)::date
    GROUP BY m.tenant_id, m.gym_id, m.month_start, m.time_zone, m.churned_members
), quarantine AS (
    SELECT q.tenant_id, q.gym_id, q.entity, q.reason, count(*) AS records,
           min(q.first_seen_at) AS since, max(q.last_seen_at) AS last_seen_at
    FROM ironwod.quarantined_records q
    JOIN conn c ON c.tenant_id = q.tenant_id AND c.gym_id = q.gym_id
    GROUP BY q.tenant_id, q.gym_id, q.entity, q.reason
), visits AS (
    -- Visits are only as fresh as the last successful sync, so the weeks end there.
    SELECT c.tenant_id, c.gym_id, least(now(), c.last_success_at) AS until,
           count(*) FILTER (WHERE a.class_start_at >= least(now(), c.last_success_at) - interval '7 days') AS last_7d,
           count(*) FILTER (WHERE a.class_start_at < least(now(), c.last_success_at) - interval '7 days') / 4.0 AS weekly_mean
    FROM conn c
    JOIN ironwod.attendance_events a
      ON a.tenant_id = c.tenant_id AND a.gym_id = c.gym_id AND a.deleted_at IS NULL
     AND a.class_start_at >= least(now(), c.last_success_at) - interval '35 days'
     AND a.class_start_at < least(now(), c.last_success_at)
    GROUP BY c.tenant_id, c.gym_id, c.last_success_at
)
SELECT c.tenant_id, c.gym_id, 'no_success_24h'::text AS alert, 'critical'::text AS severity,
       coalesce(c.last_success_at, c.connected_at) + interval '24 hours' AS since,
       jsonb_build_object('last_success_at', c.last_success_at, 'last_error_code', c.last_error_code,
                          'last_error', c.last_error) AS detail
FROM conn c
WHERE coalesce(c.last_success_at, c.connected_at) < now() - interval '24 hours'
UNION ALL
SELECT a.tenant_id, a.gym_id, 'api_error_rate', 'warning', a.first_at,
       jsonb_build_object('requests', a.requests, 'failed', a.failed,
                          'error_rate', round(a.failed::numeric / a.requests, 4),
                          'threshold', current_setting('ironwod.alert_error_rate')::float8,
                          'attempts', a.by_outcome)
FROM attempts a
JOIN conn c ON c.tenant_id = a.tenant_id AND c.gym_id = a.gym_id
WHERE a.requests >= current_setting('ironwod.alert_min_requests')::int
  AND a.failed > a.requests * current_setting('ironwod.alert_error_rate')::float8
UNION ALL
SELECT c.tenant_id, c.gym_id, 'breaker_open', 'critical', c.breaker_opened_at,
       jsonb_build_object('consecutive_failures', c.consecutive_failures, 'next_retry_at', c.next_retry_at,
                          'last_error_code', c.last_error_code, 'last_error', c.last_error,
                          'needs_new_key', c.next_retry_at IS NULL)
FROM conn c
WHERE c.breaker_opened_at IS NOT NULL
UNION ALL
SELECT p.tenant_id, p.gym_id, 'backfill_stalled', 'warning',
       p.at + current_setting('ironwod.alert_backfill_stall')::interval,
       jsonb_build_object('last_progress_at', p.at,
                          'stall_after', current_setting('ironwod.alert_backfill_stall'))
FROM progress p
WHERE p.at < now() - current_setting('ironwod.alert_backfill_stall')::interval
UNION ALL
SELECT n.tenant_id, n.gym_id, 'not_entitled', 'info', min(n.not_entitled_since),
       jsonb_build_object('entities', jsonb_agg(n.entity ORDER BY n.entity))
FROM ironwod.entity_entitlements n
JOIN conn c ON c.tenant_id = n.tenant_id AND c.gym_id = n.gym_id
GROUP BY n.tenant_id, n.gym_id
UNION ALL
SELECT q.tenant_id, q.gym_id, 'quarantined_records', 'warning', min(q.since),
       jsonb_build_object('records', sum(q.records), 'last_seen_at', max(q.last_seen_at),
                          'entities', (SELECT jsonb_object_agg(x.entity, x.n)
                                       FROM (SELECT y.entity, sum(y.records) AS n FROM quarantine y
                                             WHERE y.tenant_id = q.tenant_id AND y.gym_id = q.gym_id
                                             GROUP BY y.entity) x),
                          'reasons', (SELECT jsonb_object_agg(x.reason, x.n)
                                      FROM (SELECT y.reason, sum(y.records) AS n FROM quarantine y
                                            WHERE y.tenant_id = q.tenant_id AND y.gym_id = q.gym_id
                                            GROUP BY y.reason) x))
FROM quarantine q
GROUP BY q.tenant_id, q.gym_id
UNION ALL
SELECT k.tenant_id, k.gym_id, 'cancellation_spike', 'warning',
       k.month_start::timestamp AT TIME ZONE k.time_zone,
       jsonb_build_object('month', k.month_start, 'cancellations', k.churned_members,
                          'trailing_3_month_mean', round(k.trailing_mean, 2),
                          'factor', current_setting('ironwod.alert_cancellation_factor')::float8)
FROM cancellations k
WHERE k.trailing_months = 3
  AND k.churned_members >= current_setting('ironwod.alert_min_events')::int
  AND k.churned_members > k.trailing_mean * current_setting('ironwod.alert_cancellation_factor')::float8
UNION ALL
SELECT v.tenant_id, v.gym_id, 'attendance_drop', 'warning', v.until - interval '7 days',
       jsonb_build_object('visits_last_7_days', v.last_7d, 'trailing_weekly_mean', round(v.weekly_mean, 2),
                          'until', v.until,
                          'factor', current_setting('ironwod.alert_attendance_factor')::float8)
FROM visits v
WHERE v.weekly_mean >= current_setting('ironwod.alert_min_events')::int
  AND v.last_7d < v.weekly_mean * current_setting('ironwod.alert_attendance_factor')::float8;
COMMENT ON VIEW ironwod.alerts IS 'One row per active alert (tenant_id, gym_id, alert, severity, since, detail): no_success_24h, api_error_rate, breaker_open, backfill_stalled, not_entitled, quarantined_records, cancellation_spike, attendance_drop; thresholds from the ironwod.alert_* GUCs';

-- ---------------------------------------------------------------------------------
-- Latency per endpoint
-- ---------------------------------------------------------------------------------

-- p50/p95/p99 per endpoint over the last 24 hours and 7 days, from the per-run
-- histograms of the runs that finished (or are running) in the period.  Rows with
-- a NULL tenant_id and gym_id add up every gym the caller can see.
CREATE VIEW ironwod.endpoint_latency WITH (security_invoker = true) AS
WITH periods (period, span) AS (
    VALUES ('24h', interval '24 hours'), ('7d', interval '7 days')
), per_run AS (
    SELECT s.tenant_id, s.gym_id, s.entity, p.period, s.requests, 
           s.attempts_429 + s.attempts_4xx + s.attempts_5xx + s.attempts_network + s.attempts_envelope AS failed,
           s.latency_ms, s.latency_hist
    FROM ironwod.sync_run_entities s
    JOIN ironwod.sync_runs r ON r.tenant_id = s.tenant_id AND r.gym_id = s.gym_id AND r.run_id = s.run_id
    CROSS JOIN periods p
    WHERE r.finished_at >= now() - p.span OR (r.finished_at IS NULL AND r.status = 'running')
), gyms AS (
    SELECT x.tenant_id, x.gym_id, x.entity, x.period, sum(x.requests) AS requests, sum(x.failed) AS failed,
           sum(x.latency_ms) AS latency_ms,
           ARRAY[sum(x.latency_hist[1]), sum(x.latency_hist[2]), sum(x.latency_hist[3]), sum(x.latency_hist[4]),
                 sum(x.latency_hist[5]), sum(x.latency_hist[6]), sum(x.latency_hist[7]), sum(x.latency_hist[8])]::bigint[] AS hist
    FROM per_run x
    GROUP BY x.tenant_id, x.gym_id, x.entity, x.period
), everyone AS (
    SELECT NULL::uuid AS tenant_id, NULL::uuid AS gym_id, x.entity, x.period, sum(x.requests) AS requests,
           sum(x.failed) AS failed, sum(x.latency_ms) AS latency_ms,
           ARRAY[sum(x.latency_hist[1]), sum(x.latency_hist[2]), sum(x.latency_hist[3]), sum(x.latency_hist[4]),
                 sum(x.latency_hist[5]), sum(x.latency_hist[6]), sum(x.latency_hist[7]), sum(x.latency_hist[8])]::bigint[] AS hist
    FROM per_run x
    GROUP BY x.entity, x.period
)
SELECT g.tenant_id, g.gym_id, e.path AS endpoint, g.entity, g.period, g.requests::bigint AS requests,
       g.failed::bigint AS failed, g.samples,
       round((g.latency_ms / nullif(g.samples, 0))::numeric, 1) AS mean_ms,
       round(ironwod.histogram_quantile(g.hist, 0.50)::numeric, 1) AS p50_ms,
       round(ironwod.histogram_quantile(g.hist, 0.95)::numeric, 1) AS p95_ms,
       round(ironwod.histogram_quantile(g.hist, 0.99)::numeric, 1) AS p99_ms
FROM (SELECT y.*, y.hist[1] + y.hist[2] + y.hist[3] + y.hist[4] + y.hist[5] + y.hist[6] + y.hist[7] + y.hist[8]
             AS samples
      FROM (SELECT * FROM gyms UNION ALL SELECT * FROM everyone) y) g
JOIN ironwod.entities e ON e.entity = g.entity;
COMMENT ON VIEW ironwod.endpoint_latency IS 'API latency per endpoint over the last 24 h and 7 days (period 24h, 7d): attempts, failed attempts, latency samples, mean and interpolated p50/p95/p99 in ms; tenant_id and gym_id NULL = all visible gyms';

-- ---------------------------------------------------------------------------------
-- Progress of queued and running runs
-- ---------------------------------------------------------------------------------

-- Entities are planned one at a time (when the one before is done), so the units
-- of an entity not planned yet are expected: as many as the gym's last run of the
-- same mode planned, else what its strategy implies (a full list is one unit, a
-- backfill has one window per month of ironwod.backfill_months plus the current
-- one, sign-ins one unit per client this run pulled), less what a resumed backfill
-- campaign already checkpointed.  The remaining requests assume the pages per
-- unit seen so far (this run's, else that last run's, else one).  The ETA divides
-- them by the connection's token rate, or by the run's own pace when slower.
CREATE VIEW ironwod.run_progress WITH (security_invoker = true) AS
WITH active AS (
    SELECT r.tenant_id, r.gym_id, r.run_id, r.mode, r.status, r.phase, r.requested_at, r.started_at,
           r.heartbeat_at, r.requests
    FROM ironwod.sync_runs r
    WHERE r.status IN ('queued', 'running')
), previous AS (
    SELECT DISTINCT ON (a.run_id, p.entity) a.run_id, p.entity, p.units_total, p.units_done, p.pages
    FROM active a
    JOIN ironwod.sync_runs pr ON pr.tenant_id = a.tenant_id AND pr.gym_id = a.gym_id
                             AND pr.mode = a.mode AND pr.run_id < a.run_id
    JOIN ironwod.sync_run_entities p ON p.tenant_id = pr.tenant_id AND p.gym_id = pr.gym_id
                                    AND p.run_id = pr.run_id AND p.units_total IS NOT NULL
    ORDER BY a.run_id, p.entity, p.run_id DESC
), checkpointed AS (
    SELECT b.tenant_id, b.gym_id, b.entity, count(*) AS units
    FROM ironwod.backfill_checkpoints b
    JOIN active a ON a.tenant_id = b.tenant_id AND a.gym_id = b.gym_id AND a.mode = 'backfill'
    GROUP BY b.tenant_id, b.gym_id, b.entity
), per_entity AS (
    SELECT a.run_id, e.entity, e.ordinal, s.status AS entity_status,
           coalesce(s.units_done, 0) + coalesce(s.units_skipped, 0) AS units_done,
           s.units_total AS units_planned,
           coalesce(s.units_total,
                    prev.units_total,
                    CASE WHEN e.backfill_strategy = 'full' THEN 1
                         WHEN e.backfill_strategy = 'per_client' THEN cl.pulled
                         WHEN a.mode = 'backfill' THEN current_setting('ironwod.backfill_months')::int + 1
                         WHEN a.mode = 'incremental' AND e.due_field IS NOT NULL THEN 2
                         ELSE 1 END) AS units_expected,
           CASE WHEN s.units_total IS NULL THEN coalesce(ck.units, 0) ELSE 0 END AS units_checkpointed,
           coalesce(s.pulled, 0) AS pulled, coalesce(s.new_versions, 0) AS new_versions,
           coalesce(s.pages::float8 / nullif(s.units_done, 0), prev.pages::float8 / nullif(prev.units_done, 0), 1)
               AS pages_per_unit
    FROM active a
    CROSS JOIN ironwod.entities e
    LEFT JOIN ironwod.sync_run_entities s
           ON s.tenant_id = a.tenant_id AND s.gym_id = a.gym_id AND s.run_id = a.run_id AND s.entity = e.entity
    LEFT JOIN ironwod.sync_run_entities cl
           ON cl.tenant_id = a.tenant_id AND cl.gym_id = a.gym_id AND cl.run_id = a.run_id AND cl.entity = 'clients'
          AND cl.status = 'completed'
    LEFT JOIN previous prev ON prev.run_id = a.run_id AND prev.entity = e.entity
    LEFT JOIN checkpointed ck ON ck.tenant_id = a.tenant_id AND ck.gym_id = a.gym_id AND ck.entity = e.entity
    -- Entities the run skips (not entitled), as an anti-join: Citus plans no
    -- correlated subquery over the materialized "active".
    LEFT JOIN ironwod.entity_entitlements n
           ON n.tenant_id = a.tenant_id AND n.gym_id = a.gym_id AND n.entity = e.entity
          AND (a.mode <> 'reconcile' OR n.last_checked_run = a.run_id)
    WHERE e.enabled AND a.mode <> 'validate' AND n.entity IS NULL
), per_run AS (
    SELECT x.run_id,
           count(*) FILTER (WHERE x.entity_status = 'completed') AS entities_done,
           count(*) AS entities_total,
           (array_agg(x.entity ORDER BY x.ordinal) FILTER (WHERE x.entity_status IS DISTINCT FROM 'completed'))[1]
               AS current_entity,
           sum(x.units_done) AS units_done,
           -- NULL while an entity's size cannot be told yet (sign-ins before the clients)
           CASE WHEN bool_and(x.units_expected IS NOT NULL) THEN sum(x.units_expected) END AS units_total,
           bool_and(x.units_planned IS NOT NULL) AS fully_planned,
           sum(x.pulled) AS records_landed, sum(x.new_versions) AS new_versions,
           CASE WHEN bool_and(x.units_expected IS NOT NULL) THEN
               sum(CASE WHEN x.entity_status = 'completed' THEN 0
                        ELSE greatest(x.units_expected - x.units_checkpointed - x.units_done, 0) * x.pages_per_unit
                   END) END AS requests_remaining
    FROM per_entity x
    GROUP BY x.run_id
), paced AS (
    SELECT a.*, coalesce(p.entities_done, 0) AS entities_done, coalesce(p.entities_total, 0) AS entities_total,
           p.current_entity, coalesce(p.units_done, 0) AS units_done,
           CASE WHEN a.mode = 'validate' THEN 0 ELSE p.units_total END AS units_total,
           coalesce(p.fully_planned, true) AS fully_planned,
           coalesce(p.records_landed, 0) AS records_landed, coalesce(p.new_versions, 0) AS new_versions,
           CASE WHEN a.mode = 'validate' THEN greatest(1 - a.requests, 0) ELSE ceil(p.requests_remaining) END
               AS requests_remaining,
           least(ironwod.connection_rate(a.tenant_id, a.gym_id),
                 CASE WHEN a.requests >= 10 AND now() - a.started_at >= interval '1 second'
                      THEN a.requests / extract(epoch FROM now() - a.started_at)::float8 END) AS rate
    FROM active a
    LEFT JOIN per_run p ON p.run_id = a.run_id
)
SELECT x.tenant_id, x.gym_id, x.run_id, x.mode, x.status, x.phase, x.current_entity, x.requested_at,
       x.started_at, x.heartbeat_at, x.entities_done, x.entities_total, x.units_done, x.units_total,
       x.fully_planned, x.records_landed, x.new_versions, x.requests, x.requests_remaining::bigint,
       round(x.rate::numeric, 2) AS rate,
       make_interval(secs => round((x.requests_remaining / nullif(x.rate, 0))::numeric)::float8) AS eta,
       now() + make_interval(secs => (x.requests_remaining / nullif(x.rate, 0))::float8) AS eta_at
FROM paced x;
COMMENT ON VIEW ironwod.run_progress IS 'Queued and running runs: current entity, entities and units done of (expected) total, records landed, requests so far and remaining, request rate and ETA of the fetch';

GRANT SELECT ON ironwod.alerts, ironwod.endpoint_latency, ironwod.run_progress TO ironwod_app, ironwod_admin;
GRANT EXECUTE ON FUNCTION ironwod.connection_rate(uuid, uuid), ironwod.histogram_quantile(bigint[], double precision)
    TO ironwod_app, ironwod_admin, ironwod_worker;
GRANT EXECUTE ON FUNCTION ironwod.run_summary(uuid, uuid, bigint) TO ironwod_app, ironwod_admin, ironwod_worker;
GRANT EXECUTE ON FUNCTION ironwod.log_line(text), ironwod.log_run(uuid, uuid, bigint),
    ironwod.transform_step(bigint)
    TO ironwod_worker;
-- 90_privileges: every grant in one place.  Nothing is granted to PUBLIC; the app
-- never gets the ciphertext column; only the worker role may read it.

REVOKE ALL ON ALL TABLES IN SCHEMA ironwod FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA ironwod FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA ironwod FROM PUBLIC;
REVOKE ALL ON SCHEMA ironwod FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_set_scope(uuid, uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_public_key() FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_connect(uuid, uuid, bytea) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_connect(uuid, uuid, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_sync(uuid, uuid, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_wait(bigint, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_status(uuid, uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_disconnect(uuid, uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_tick() FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_schedule(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_pause(uuid, uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_resume(uuid, uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_rotate_key(uuid, uuid, bytea) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_rewrap() FROM PUBLIC;

GRANT USAGE ON SCHEMA ironwod TO ironwod_app, ironwod_admin, ironwod_worker;

-- The host app: the API, and reads of its own scope.
GRANT EXECUTE ON FUNCTION @extschema@.ironwod_set_scope(uuid, uuid), @extschema@.ironwod_public_key(),
    @extschema@.ironwod_connect(uuid, uuid, bytea), @extschema@.ironwod_connect(uuid, uuid, text),
    @extschema@.ironwod_sync(uuid, uuid, text), @extschema@.ironwod_wait(bigint, interval),
    @extschema@.ironwod_status(uuid, uuid), @extschema@.ironwod_disconnect(uuid, uuid),
    @extschema@.ironwod_pause(uuid, uuid), @extschema@.ironwod_resume(uuid, uuid),
    @extschema@.ironwod_rotate_key(uuid, uuid, bytea)
    TO ironwod_app, ironwod_admin;
GRANT EXECUTE ON FUNCTION ironwod.scope_tenant(), ironwod.scope_gym(), ironwod.preloaded(),
    ironwod.latest_raw_versions(text), ironwod.latest_raw_versions(text, uuid, uuid, bigint[], boolean),
    ironwod.latency_buckets()
    TO ironwod_app, ironwod_admin, ironwod_worker;
GRANT SELECT (tenant_id, gym_id, status, master_key_id, api_key_fingerprint, connected_at,
              last_success_at, last_error_at, last_error, last_error_code, last_cursor_at,
              sync_window_days, consecutive_failures, breaker_opened_at, next_retry_at,
              nightly_local_time, reconcile_weekday, time_zone, backfill_completed_at,
              paused_at, paused_by, created_at, updated_at,
              next_master_key_id, next_api_key_fingerprint, key_rotated_at)
    ON ironwod.integrations_wodify_connection TO ironwod_app, ironwod_admin;
GRANT SELECT ON ironwod.sync_runs, ironwod.sync_run_entities, ironwod.run_units, ironwod.backfill_checkpoints,
    ironwod.entity_cursors, ironwod.sync_events, ironwod.entities, ironwod.master_keys,
    ironwod.entity_entitlements, ironwod.vanished_records, ironwod.quarantined_records,
    ironwod.wodify_raw_locations, ironwod.wodify_raw_programs, ironwod.wodify_raw_clients,
    ironwod.wodify_raw_memberships, ironwod.wodify_raw_membership_holds,
    ironwod.wodify_raw_class_signins, ironwod.wodify_raw_invoices, ironwod.wodify_raw_transactions,
    ironwod.connection_health, ironwod.runs, ironwod.run_latency
    TO ironwod_app, ironwod_admin;

-- Operators: the registry and the master keys.
GRANT UPDATE ON ironwod.entities TO ironwod_admin;
GRANT EXECUTE ON FUNCTION ironwod.register_master_key(text, bytea), ironwod.retire_master_key(text),
    @extschema@.ironwod_rewrap(), ironwod.worker_status(),
    ironwod.rate_limits(), @extschema@.ironwod_tick(), @extschema@.ironwod_schedule(text) TO ironwod_admin;

-- The run workers: their scope's rows, the ciphertext, and the landing functions.
GRANT SELECT, UPDATE ON ironwod.integrations_wodify_connection TO ironwod_worker;
GRANT SELECT, INSERT, UPDATE ON ironwod.sync_runs, ironwod.sync_run_entities, ironwod.entity_cursors
    TO ironwod_worker;
GRANT SELECT, INSERT, DELETE ON ironwod.backfill_checkpoints TO ironwod_worker;
GRANT SELECT, INSERT, UPDATE ON ironwod.run_units TO ironwod_worker;
GRANT SELECT, INSERT ON ironwod.sync_events TO ironwod_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON ironwod.entity_entitlements TO ironwod_worker;
GRANT SELECT, INSERT, DELETE ON ironwod.vanished_records TO ironwod_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON ironwod.quarantined_records TO ironwod_worker;
GRANT SELECT ON ironwod.entities, ironwod.master_keys TO ironwod_worker;
GRANT SELECT, INSERT, UPDATE ON ironwod.wodify_raw_locations, ironwod.wodify_raw_programs,
    ironwod.wodify_raw_clients, ironwod.wodify_raw_memberships, ironwod.wodify_raw_membership_holds,
    ironwod.wodify_raw_class_signins, ironwod.wodify_raw_invoices, ironwod.wodify_raw_transactions
    TO ironwod_worker;
GRANT USAGE ON SEQUENCE ironwod.sync_run_id_seq TO ironwod_worker;
GRANT EXECUTE ON FUNCTION ironwod.parse_ts(text), ironwod.urlencode(text), ironwod.backfill_since(),
    ironwod.iso_utc(timestamptz), ironwod.emit_event(bigint, text, text, jsonb),
    ironwod.claim_run(bigint, integer), ironwod.next_task(bigint),
    ironwod.plan_units(bigint, text), ironwod.plan_entity(bigint, text), ironwod.entity_skipped(bigint, text),
    ironwod.page_statement(), ironwod.unit_landed(bigint, text, text, integer), ironwod.unvanish(text, bigint[]),
    ironwod.quarantine(bigint, text, text, bigint[], text[], bytea[], timestamptz),
    ironwod.record_memory(bigint, bigint, bigint),
    ironwod.unquarantine(text, bigint[]),
    ironwod.close_entity(bigint, text), ironwod.reconcile_deletions(bigint, ironwod.entities),
    ironwod.mark_not_entitled(bigint, text),
    ironwod.land_page(bigint, text, text, integer, text, integer, text, double precision),
    ironwod.landing_statement(text, boolean), ironwod.payload_hash(jsonb), ironwod.payload_hash(text, jsonb),
    ironwod.split_page(text, text),
    ironwod.is_time_zone(text), ironwod.count_requests(bigint, timestamptz, text), ironwod.add_attempts(bigint, text, bigint[]),
    ironwod.latency_buckets(), ironwod.finish_run(bigint),
    ironwod.finish_validate(bigint, boolean, text, text), ironwod.fail_run(bigint, text, text, text),
    ironwod.apply_rotated_key(timestamptz), ironwod.rewrap_targets(),
    ironwod.store_rewrapped_key(bytea, bytea, text)
    TO ironwod_worker;
-- 95_citus: scaling out.  On a Citus coordinator, CALL ironwod.distribute() spreads
-- every tenant table over the worker nodes by tenant_id, all in one co-location
-- group, so one tenant's rows (raw, canonical, facts, caches, runs) live on one
-- node and a statement that names the tenant runs there alone.  The tables
-- without tenant_id (the entity registry, the master public keys) become reference
-- tables, copied to every node, so joins with them stay local.  On plain
-- PostgreSQL nothing here runs: CREATE EXTENSION ironwod is the same with or
-- without Citus.
--
-- A procedure, because it works in two transactions: Citus creates the shards in
-- the first, and only once they are committed can the second reach them to give
-- them the column privileges Citus does not copy (see below).  For the same
-- reason it carries no SET clause (a procedure with one cannot commit) and
-- qualifies every name instead.

CREATE PROCEDURE ironwod.distribute()
LANGUAGE plpgsql
AS $$
DECLARE
    v_anchor regclass;
    v_next regclass;
    v_pending regclass[];
    v_had_data boolean;
    v_converted regclass[] := '{}';
    v_distributed integer := 0;
    v_reference integer := 0;
    v_failed text;
    v_messages text := pg_catalog.current_setting('client_min_messages');
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        RAISE EXCEPTION 'Citus is not installed in this database'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'ironwod.distribute() needs a Citus coordinator: preload citus, CREATE EXTENSION citus, add the worker nodes with citus_add_node(), then call it there.';
    END IF;
    IF NOT pg_catalog.citus_is_coordinator() THEN
        RAISE EXCEPTION 'this node is not a Citus coordinator with worker nodes'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Call ironwod.distribute() on the coordinator, after citus_set_coordinator_host() and citus_add_node() for each worker.';
    END IF;
    -- Citus's per-table NOTICEs (copying local data) are noise here.
    SET LOCAL client_min_messages = warning;
    -- Converting a table that a local table references makes Citus turn the
    -- whole local foreign-key graph into Citus local tables first, which fails
    -- for extension tables (their shells already exist on the nodes: "relation
    -- canonical_maps already exists").  The loop below converts referenced
    -- tables first, so nothing is left for that conversion to do.
    SET LOCAL citus.enable_local_reference_table_foreign_keys = off;

    -- Citus refuses triggers on reference tables.  The only ones (98_dump) lay
    -- restored rows over the install-time rows in a single-node pg_restore,
    -- which is not how a Citus cluster is backed up and restored.
    FOR v_next IN
        SELECT g.tgrelid::regclass FROM pg_catalog.pg_trigger g
        JOIN pg_catalog.pg_class c ON c.oid = g.tgrelid
        WHERE g.tgname = 'ironwod_restore_merge' AND c.relnamespace = 'ironwod'::regnamespace
    LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER ironwod_restore_merge ON %s', v_next);
    END LOOP;

    -- Generic over the schema: whatever tables later modules (or later versions)
    -- add are found by their columns, not listed here.  Tables with tenant_id are
    -- distributed by it, co-located with the first one Citus already distributed
    -- (a repeated call) or the first distributed here; the others become
    -- reference tables.  In foreign-key order: Citus converts a table only when
    -- every table it references is converted already (a reference table may
    -- reference only reference tables, a distributed one its group and reference
    -- tables), and the tenant-less ones first (Citus cannot create a reference
    -- table in a transaction that already wrote shards in parallel); asked to convert a table whose referenced table is still local, it
    -- turns the whole local foreign-key graph into Citus local tables and the
    -- later conversion of those fails.  One Citus call per table is the only way
    -- to convert one: a loop.
    SELECT d.logicalrelid INTO v_anchor FROM pg_catalog.pg_dist_partition d
    JOIN pg_catalog.pg_class c ON c.oid = d.logicalrelid
    WHERE c.relnamespace = 'ironwod'::regnamespace AND d.partmethod = 'h'
    ORDER BY c.relname LIMIT 1;
    LOOP
        SELECT pg_catalog.array_agg(c.oid::regclass
                                    ORDER BY EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                                                     WHERE a.attrelid = c.oid AND a.attname = 'tenant_id'
                                                       AND NOT a.attisdropped), c.relname)
        INTO v_pending FROM pg_catalog.pg_class c
        WHERE c.relnamespace = 'ironwod'::regnamespace AND c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition d WHERE d.logicalrelid = c.oid);
        EXIT WHEN v_pending IS NULL;
        -- The first pending table whose foreign keys all point at tables Citus
        -- already knows (or at itself).
        SELECT p.t INTO v_next FROM pg_catalog.unnest(v_pending) WITH ORDINALITY AS p(t, ord)
        WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint k
                          WHERE k.conrelid = p.t AND k.contype = 'f' AND k.confrelid <> p.t
                            AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition d
                                            WHERE d.logicalrelid = k.confrelid))
        ORDER BY p.ord LIMIT 1;
        IF v_next IS NULL THEN
            RAISE EXCEPTION 'cannot order the distribution of %: their foreign keys form a cycle or point outside Citus', v_pending
                USING ERRCODE = 'invalid_foreign_key';
        END IF;
        EXECUTE pg_catalog.format('SELECT EXISTS (SELECT 1 FROM %s)', v_next) INTO v_had_data;
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                       WHERE a.attrelid = v_next AND a.attname = 'tenant_id' AND NOT a.attisdropped) THEN
            PERFORM pg_catalog.create_reference_table(v_next);
            v_reference := v_reference + 1;
        ELSIF v_anchor IS NULL THEN
            PERFORM pg_catalog.create_distributed_table(v_next, 'tenant_id');
            v_anchor := v_next;
            v_distributed := v_distributed + 1;
        ELSE
            PERFORM pg_catalog.create_distributed_table(v_next, 'tenant_id', colocate_with => v_anchor::text);
            v_distributed := v_distributed + 1;
        END IF;
        IF v_had_data THEN
            v_converted := v_converted || v_next;
        END IF;
    END LOOP;

    -- Citus copied existing rows to the shards; the coordinator's local copies are
    -- dead weight now.
    PERFORM pg_catalog.truncate_local_data_after_distributing_table(t) FROM pg_catalog.unnest(v_converted) t;
    PERFORM pg_catalog.set_config('client_min_messages', v_messages, true);
    IF v_distributed + v_reference > 0 THEN
        COMMIT;
    END IF;

    -- Citus gives new shards the tables' privileges but not their column
    -- privileges (the app's SELECT on every connection column but the
    -- ciphertext), nor does it propagate a column GRANT: a query the coordinator
    -- allowed would be refused on the node.  So grant them on every placement, in
    -- every call (GRANT is idempotent): calling distribute() again after moving or
    -- splitting shards restores them.
    SELECT pg_catalog.string_agg(r.result, '; ') INTO v_failed
    FROM (SELECT c.oid::regclass AS rel, x.privilege_type AS priv, x.grantee::regrole::text AS grantee,
                 pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum) AS cols
          FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_dist_partition d ON d.logicalrelid = c.oid
          JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attacl IS NOT NULL AND NOT a.attisdropped,
               LATERAL pg_catalog.aclexplode(a.attacl) x
          WHERE c.relnamespace = 'ironwod'::regnamespace AND x.grantee <> 0
          GROUP BY 1, 2, 3) g,
         LATERAL pg_catalog.run_command_on_placements(g.rel,
             pg_catalog.format('GRANT %s (%s) ON %%s TO %I', g.priv, g.cols, g.grantee)) r
    WHERE NOT r.success;
    IF v_failed IS NOT NULL THEN
        RAISE EXCEPTION 'could not grant column privileges on the shards: %', v_failed
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Check that every worker node is reachable, then CALL ironwod.distribute() again.';
    END IF;
    RAISE NOTICE 'ironwod: % tables newly distributed by tenant_id, % newly reference tables', v_distributed, v_reference;
END
$$;
COMMENT ON PROCEDURE ironwod.distribute() IS 'Admin, on a Citus coordinator: distribute every tenant table by tenant_id (one co-location group), make the tenant-less tables reference tables, and give the shards the column privileges Citus does not copy; idempotent';
REVOKE ALL ON PROCEDURE ironwod.distribute() FROM PUBLIC;
-- 98_dump: what pg_dump carries.  Tables and sequences an extension creates are
-- left out of a dump unless registered with pg_extension_config_dump, so without
-- this a restored database would have no connections, raw rows, runs, watermarks,
-- caches or master keys.  Registration happens here, at the end of the install
-- script, so it covers every table the modules before it created; an upgrade
-- script that adds a table calls ironwod.register_config_dump() again at its
-- end, and a pgTAP test fails for any ironwod table or sequence not registered.
--
-- Rows the install script itself writes must not be dumped as they are:
-- CREATE EXTENSION writes them again before pg_restore loads the dump's data,
-- and a second copy would collide.  Such rows live in the tables without a
-- tenant: the entity registry and the raw -> canonical maps.  An administrator
-- may edit such a row (a path, a page size) to follow the live API, and the edit
-- must survive a restore.  So those tables remember what the install script
-- wrote (installed_definition), are dumped with a filter that keeps exactly the
-- rows that differ from it (or were added), and an insert of a row whose key
-- already exists updates that row instead: that is how pg_restore lays edited
-- rows over the fresh defaults.  Unedited rows are not dumped at all, so a dump
-- restored into a newer version gets that version's defaults.

-- Inserting a row whose primary key exists updates that row (every column but
-- the key) and skips the insert.  Generic over the table's columns, so columns
-- added later are carried too; an UPDATE (not DELETE + INSERT), so rows that
-- other tables reference by foreign key stay put.
CREATE FUNCTION ironwod.restore_merge() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_key text;
    v_set text;
    v_n bigint;
BEGIN
    SELECT string_agg(format('t.%1$I = ($1).%1$I', a.attname), ' AND ')
    INTO v_key
    FROM pg_constraint c
    JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
    WHERE c.conrelid = TG_RELID AND c.contype = 'p';
    SELECT string_agg(format('%1$I = ($1).%1$I', a.attname), ', ')
    INTO v_set
    FROM pg_attribute a
    WHERE a.attrelid = TG_RELID AND a.attnum > 0 AND NOT a.attisdropped
      AND a.attgenerated = '' AND a.attidentity = ''
      AND a.attnum <> ALL (SELECT unnest(c.conkey) FROM pg_constraint c
                           WHERE c.conrelid = TG_RELID AND c.contype = 'p');
    IF v_key IS NULL THEN
        RETURN NEW;
    END IF;
    IF v_set IS NULL THEN
        EXECUTE format('SELECT count(*) FROM %s t WHERE %s', TG_RELID::regclass, v_key) INTO v_n USING NEW;
    ELSE
        EXECUTE format('UPDATE %s t SET %s WHERE %s', TG_RELID::regclass, v_set, v_key) USING NEW;
        GET DIAGNOSTICS v_n = ROW_COUNT;
    END IF;
    RETURN CASE WHEN v_n > 0 THEN NULL ELSE NEW END;
END
$$;
COMMENT ON FUNCTION ironwod.restore_merge() IS 'Trigger on tables with install-time rows: an insert of an existing key updates that row instead (how pg_restore restores edited rows over the defaults CREATE EXTENSION wrote)';

-- Make a table's current rows its install-time rows: remember each as written,
-- and merge inserts of existing keys.  Install and upgrade scripts only.
CREATE FUNCTION ironwod.track_install_rows(p_table regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format('ALTER TABLE %s ADD COLUMN IF NOT EXISTS installed_definition jsonb', p_table);
    EXECUTE format('COMMENT ON COLUMN %s.installed_definition IS %L', p_table,
                   'The row as the install script wrote it (without this column); rows that differ from it are edits and go into pg_dump');
    EXECUTE format('UPDATE %s t SET installed_definition = to_jsonb(t) - ''installed_definition'' WHERE installed_definition IS NULL',
                   p_table);
    IF NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = p_table AND g.tgname = 'ironwod_restore_merge') THEN
        EXECUTE format('CREATE TRIGGER ironwod_restore_merge BEFORE INSERT ON %s FOR EACH ROW EXECUTE FUNCTION ironwod.restore_merge()',
                       p_table);
    END IF;
END
$$;
COMMENT ON FUNCTION ironwod.track_install_rows(regclass) IS 'Install and upgrade scripts only: record a table''s rows as written by the script (installed_definition) and merge restored rows over them';

-- Register every table and sequence of schema ironwod that belongs to the
-- extension: in full, except the tables with install-time rows, which are
-- dumped filtered to the rows that differ from them.  pg_extension_config_dump
-- replaces an earlier registration, so calling this again (from an upgrade
-- script) is safe; outside CREATE/ALTER EXTENSION it raises.
CREATE FUNCTION ironwod.register_config_dump() RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
    n integer := 0;
BEGIN
    FOR r IN
        SELECT c.oid::regclass AS rel, c.relname,
               EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid
                       AND a.attname = 'installed_definition' AND NOT a.attisdropped) AS filtered
        FROM pg_class c
        JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
        JOIN pg_extension x ON x.oid = d.refobjid AND x.extname = 'ironwod'
        WHERE c.relnamespace = 'ironwod'::regnamespace AND c.relkind IN ('r', 'p', 'S')
        ORDER BY c.relname
    LOOP
        -- pg_dump reads the table as "FROM ONLY ironwod.<name>", so the row is <name>.
        PERFORM pg_extension_config_dump(r.rel,
            CASE WHEN r.filtered
                 THEN format($f$WHERE (pg_catalog.to_jsonb(%1$I) OPERATOR(pg_catalog.-) 'installed_definition') IS DISTINCT FROM installed_definition$f$,
                             r.relname)
                 ELSE '' END);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
COMMENT ON FUNCTION ironwod.register_config_dump() IS 'Install and upgrade scripts only: register every ironwod table and sequence with pg_extension_config_dump (tables with install-time rows filtered to edited or added rows)';

-- The tables without a tenant that the modules before filled: their rows are
-- the install script's.
SELECT ironwod.track_install_rows(c.oid::regclass)
FROM pg_class c
WHERE c.relnamespace = 'ironwod'::regnamespace AND c.relkind = 'r'
  AND NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'tenant_id')
  AND (xpath('/row/n/text()', query_to_xml(format('SELECT count(*) > 0 AS n FROM %s', c.oid::regclass),
                                            false, true, '')))[1]::text = 'true'
ORDER BY c.relname;
SELECT ironwod.register_config_dump();

REVOKE ALL ON FUNCTION ironwod.restore_merge(), ironwod.track_install_rows(regclass),
    ironwod.register_config_dump() FROM PUBLIC;
