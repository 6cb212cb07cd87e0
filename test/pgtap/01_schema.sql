-- pgTAP: the schema contract of the brief and design.md §3, and the small SQL
-- helpers the worker relies on.
BEGIN;
SELECT plan(62);

SELECT has_schema('ironwod');
SELECT has_table('ironwod', t, 'table ironwod.' || t)
FROM unnest(ARRAY['integrations_wodify_connection', 'entities', 'master_keys', 'sync_runs',
                  'sync_run_entities', 'sync_events', 'backfill_checkpoints', 'entity_cursors',
                  'wodify_raw_locations', 'wodify_raw_programs', 'wodify_raw_clients',
                  'wodify_raw_memberships', 'wodify_raw_membership_holds', 'wodify_raw_class_signins',
                  'wodify_raw_invoices', 'wodify_raw_transactions', 'quarantined_records']) AS t;

-- The connection record carries every field the brief lists.
SELECT has_column('ironwod', 'integrations_wodify_connection', c, 'connection.' || c)
FROM unnest(ARRAY['tenant_id', 'gym_id', 'status', 'api_key_ciphertext', 'api_key_fingerprint',
                  'connected_at', 'last_success_at', 'last_error_at', 'last_cursor_at',
                  'sync_window_days', 'consecutive_failures', 'next_retry_at']) AS c;
SELECT col_is_pk('ironwod', 'integrations_wodify_connection', ARRAY['tenant_id', 'gym_id']::name[], 'connection key is (tenant_id, gym_id)');
SELECT col_default_is('ironwod', 'integrations_wodify_connection', 'sync_window_days', '60'::text, 'sync window defaults to 60 days');

-- Raw tables: the brief's columns, one shape for all.
SELECT bag_eq(
    $$SELECT table_name::text, column_name::text FROM information_schema.columns
      WHERE table_schema = 'ironwod' AND table_name LIKE 'wodify\_raw\_%'
        AND column_name IN ('tenant_id', 'gym_id', 'wodify_id', 'payload_json', 'payload_hash',
                            'source_updated_at', 'ingested_at', 'ingest_run_id', 'last_seen_run_id')$$,
    $$SELECT raw_table::text, c FROM ironwod.entities,
             unnest(ARRAY['tenant_id', 'gym_id', 'wodify_id', 'payload_json', 'payload_hash',
                          'source_updated_at', 'ingested_at', 'ingest_run_id', 'last_seen_run_id']) c$$,
    'every raw table has the landing contract columns');

-- tenant_id, gym_id lead every primary and unique key of tenant tables.
SELECT is_empty(
    $$SELECT i.indexrelid::regclass::text
      FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
      WHERE c.relnamespace = 'ironwod'::regnamespace AND (i.indisunique OR i.indisprimary)
        AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'tenant_id')
        AND (SELECT array_agg(a.attname ORDER BY k.ord) FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
             WHERE k.ord <= 2) IS DISTINCT FROM ARRAY['tenant_id', 'gym_id']::name[]$$,
    'every unique key of a tenant table leads with (tenant_id, gym_id)');

-- Nothing for PUBLIC.
SELECT table_privs_are('ironwod', t, 'public', ARRAY[]::text[], 'no PUBLIC privilege on ' || t)
FROM unnest(ARRAY['integrations_wodify_connection', 'sync_runs', 'wodify_raw_clients', 'master_keys']) t;
SELECT function_privs_are('public', 'ironwod_connect', ARRAY['uuid', 'uuid', 'text'], 'public', ARRAY[]::text[]);
SELECT function_privs_are('public', 'ironwod_connect', ARRAY['uuid', 'uuid', 'text'], 'ironwod_app', ARRAY['EXECUTE']);
SELECT function_privs_are('ironwod', 'seal_key', ARRAY['uuid', 'uuid', 'text'], 'ironwod_app', ARRAY[]::text[]);
SELECT function_privs_are('ironwod', 'land_page', ARRAY['bigint', 'text', 'text', 'integer', 'text', 'integer', 'text', 'double precision'],
                          'ironwod_app', ARRAY[]::text[]);

-- Helpers.
SELECT is(ironwod.parse_ts('1900-01-01T00:00:00Z'), NULL, 'sentinel datetime is NULL');
SELECT is(ironwod.parse_ts('1900-01-01'), NULL, 'sentinel date is NULL');
SELECT is(ironwod.parse_ts(''), NULL, 'empty string is NULL');
SELECT is(ironwod.parse_ts('not a date'), NULL, 'garbage is NULL');
SELECT is(ironwod.parse_ts('2025-03-01T10:00:00Z'), '2025-03-01 10:00:00+00'::timestamptz, 'Z datetime');
SELECT is(ironwod.parse_ts('2025-03-01T10:00:00'), '2025-03-01 10:00:00+00'::timestamptz, 'zone-less datetime is UTC');
SELECT is(ironwod.parse_ts('2025-03-01T10:00:00+02:00'), '2025-03-01 08:00:00+00'::timestamptz, 'offset datetime');
SELECT is(ironwod.urlencode('created_on_datetime|gte|2025-01-01T00:00:00Z;x|eq|''a b'''),
          'created_on_datetime%7Cgte%7C2025-01-01T00%3A00%3A00Z%3Bx%7Ceq%7C%27a%20b%27', 'q values are percent-encoded once');
SELECT is(ironwod.iso_utc('2025-01-01 00:00:00+00'), '2025-01-01T00:00:00Z', 'search datetime literal');
SELECT is(ironwod.backfill_since(),
          (date_trunc('month', now() AT TIME ZONE 'UTC') - interval '24 months') AT TIME ZONE 'UTC',
          'backfill horizon is 24 whole UTC months');

SELECT throws_ok($$SELECT ironwod_set_scope(NULL, NULL)$$, '22004', 'tenant and gym must not be null');
SELECT throws_ok($$SET ironwod.tenant_id = 'not-a-uuid'$$, '22P02');

-- The scope readers (C, the value parsed when it is set) give what
-- NULLIF(current_setting(guc, true), '')::uuid gave: every form uuid_in reads, the
-- value a rolled-back subtransaction restores, NULL without a scope, and uuid_in's
-- error for digits in a shape it refuses.
SELECT set_config('ironwod.tenant_id', '{B0B0B0B0-0000-4000-8000-00000000000A}', true),
       set_config('ironwod.gym_id', 'b0b0b0b000004000800000000000000b', true);
SELECT is(ironwod.scope_tenant(), 'b0b0b0b0-0000-4000-8000-00000000000a'::uuid, 'scope_tenant() reads a braced, upper-case uuid');
SELECT is(ironwod.scope_gym(), 'b0b0b0b0-0000-4000-8000-00000000000b'::uuid, 'scope_gym() reads a uuid without hyphens');
SAVEPOINT scope;
SELECT ironwod_set_scope('b0b0b0b0-0000-4000-8000-0000000000c1', 'b0b0b0b0-0000-4000-8000-0000000000c2');
SELECT is(ARRAY[ironwod.scope_tenant(), ironwod.scope_gym()],
          '{b0b0b0b0-0000-4000-8000-0000000000c1,b0b0b0b0-0000-4000-8000-0000000000c2}'::uuid[],
          'the scope readers follow ironwod_set_scope');
ROLLBACK TO SAVEPOINT scope;
SELECT is(ARRAY[ironwod.scope_tenant(), ironwod.scope_gym()],
          '{b0b0b0b0-0000-4000-8000-00000000000a,b0b0b0b0-0000-4000-8000-00000000000b}'::uuid[],
          'a rolled-back scope gives the one before back');
SELECT set_config('ironwod.tenant_id', '', true);
SELECT is(ironwod.scope_tenant(), NULL, 'no scope: scope_tenant() is NULL');
SELECT set_config('ironwod.gym_id', '{b0b0b0b0-0000-4000-8000-00000000000b', true);
SELECT throws_ok($$SELECT ironwod.scope_gym()$$, '22P02', 'invalid input syntax for type uuid: "{b0b0b0b0-0000-4000-8000-00000000000b"',
                 'digits in a shape uuid_in refuses: its error, as before');
SELECT set_config('ironwod.gym_id', '', true);

-- ironwod.distribute() is for admins only; without Citus it says what is missing,
-- and on the Citus coordinator of make test-citus, where everything is distributed
-- already, it runs inside this transaction: it converts nothing, so it has nothing
-- to commit.
SELECT function_privs_are('ironwod', 'distribute', ARRAY[]::text[], 'ironwod_admin', ARRAY[]::text[]);
SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')
    THEN lives_ok($$CALL ironwod.distribute()$$, 'ironwod.distribute() again converts nothing')
    ELSE throws_ok($$CALL ironwod.distribute()$$, '55000', 'Citus is not installed in this database',
                   'ironwod.distribute() without Citus raises 55000')
END;

SELECT * FROM finish();
ROLLBACK;
