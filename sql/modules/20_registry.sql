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
        -- No index in the order of "latest version" (design.md §4): the unique
        -- constraint hands DISTINCT ON (wodify_id) each record's versions
        -- together, and an incremental sort puts those few in version order,
        -- which costs the readers less than a third index cost landing (one
        -- more insertion per landed row: a tenth of a backfill's landing CPU).
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
