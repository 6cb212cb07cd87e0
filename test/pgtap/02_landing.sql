-- pgTAP: landing and work planning, against fixture pages, without any worker.
-- Runs as the worker role under a fixture scope, so RLS applies as in a real run.
BEGIN;
SELECT plan(32);

INSERT INTO ironwod.integrations_wodify_connection (tenant_id, gym_id, status, api_key_ciphertext)
VALUES ('99999999-9999-9999-9999-999999999999', '99999999-0000-0000-0000-000000000001', 'connected', '\x00');
INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, status)
VALUES ('99999999-9999-9999-9999-999999999999', '99999999-0000-0000-0000-000000000001', 'backfill', 'running');
SELECT set_config('test.run', currval('ironwod.sync_run_id_seq')::text, true);
SELECT ironwod_set_scope('99999999-9999-9999-9999-999999999999', '99999999-0000-0000-0000-000000000001');
SET LOCAL ROLE ironwod_worker;

CREATE FUNCTION pg_temp.land(p_entity text, p_key text, p_page int, p_body text)
RETURNS TABLE (outcome text, http_code int, has_more boolean, n_records int, n_new int)
LANGUAGE sql AS $$
    SELECT outcome, http_code, has_more, n_records, n_new
    FROM ironwod.land_page(current_setting('test.run')::bigint, p_entity, p_key, p_page, p_body::jsonb, 1)
$$;

-- The first unit of a fresh backfill is the locations list.
SELECT results_eq($$SELECT entity, window_key, url FROM ironwod.next_task(current_setting('test.run')::bigint)$$,
                  $$VALUES ('locations', 'full', '/customers/locations?sort=id')$$, 'backfill starts with locations');

-- Error envelopes inside HTTP 200, missing records key, ids missing, non-objects.
SELECT results_eq($$SELECT outcome, http_code FROM pg_temp.land('clients', 'full', 1,
                    '{"HTTPCode": 503, "ErrorCode": "E", "DeveloperMessage": "down", "UserMessage": "", "MoreInfo": ""}')$$,
                  $$VALUES ('envelope', 503)$$, 'HTTPCode envelope is an error of that code');
SELECT results_eq($$SELECT outcome FROM pg_temp.land('clients', 'full', 1, '{"data": []}')$$,
                  $$VALUES ('bad_body')$$, 'missing records key');
SELECT results_eq($$SELECT outcome FROM pg_temp.land('clients', 'full', 1, '{"clients": [{"name": "x"}]}')$$,
                  $$VALUES ('bad_body')$$, 'record without id');
SELECT results_eq($$SELECT outcome FROM pg_temp.land('clients', 'full', 1, '[1, 2]')$$,
                  $$VALUES ('bad_body')$$, 'top-level array');
SELECT is((SELECT count(*) FROM ironwod.wodify_raw_clients), 0::bigint, 'failed pages land nothing');

-- A page with more to come: landed, no checkpoint yet.
SELECT results_eq($$SELECT outcome, has_more, n_records, n_new FROM pg_temp.land('clients', 'full', 1,
    '{"clients": [{"id": 1001, "first_name": "Ana", "updated": {"updated_on_datetime": "2025-05-01T10:00:00Z"}},
                  {"id": 1002, "first_name": "Bo", "updated": {"updated_on_datetime": "1900-01-01T00:00:00Z"},
                   "created_on": {"created_on_datetime": "2024-02-03T04:05:06Z"}}],
      "pagination": {"page": 1, "page_size": 2, "has_more": true}}')$$,
    $$VALUES ('landed', true, 2, 2)$$, 'first page lands two new versions');
SELECT is((SELECT count(*) FROM ironwod.backfill_checkpoints), 0::bigint, 'no checkpoint before the last page');
SELECT is((SELECT source_updated_at FROM ironwod.wodify_raw_clients WHERE wodify_id = 1001),
          '2025-05-01 10:00:00+00'::timestamptz, 'source_updated_at from updated block');
SELECT is((SELECT source_updated_at FROM ironwod.wodify_raw_clients WHERE wodify_id = 1002),
          '2024-02-03 04:05:06+00'::timestamptz, 'sentinel update falls back to the created block');

-- The last page: checkpoint written with it.
SELECT results_eq($$SELECT outcome, has_more, n_new FROM pg_temp.land('clients', 'full', 2,
    '{"clients": [{"id": 1003, "first_name": "Cy"}, {"id": 1003, "first_name": "Cy"}],
      "pagination": {"page": 2, "page_size": 2, "has_more": false}}')$$,
    $$VALUES ('landed', false, 1)$$, 'a duplicated record in one page lands once');
SELECT results_eq($$SELECT entity, window_key, pages FROM ironwod.backfill_checkpoints$$,
                  $$VALUES ('clients', 'full', 2)$$, 'checkpoint of the finished unit');

-- Idempotency: the same page again adds nothing; an edited record adds a version.
SELECT results_eq($$SELECT n_new FROM pg_temp.land('clients', 'full', 2,
    '{"clients": [{"id": 1003, "first_name": "Cy"}], "pagination": {"has_more": false}}')$$,
    $$VALUES (0)$$, 're-landing a page adds no version');
SELECT results_eq($$SELECT n_new FROM pg_temp.land('clients', 'full', 2,
    '{"clients": [{"id": 1003, "first_name": "Cyrus"}], "pagination": {"has_more": false}}')$$,
    $$VALUES (1)$$, 'an edited payload is a new version');
SELECT results_eq($$SELECT count(*), count(DISTINCT wodify_id) FROM ironwod.wodify_raw_clients$$,
                  $$VALUES (4::bigint, 3::bigint)$$, 'four versions of three records');
SELECT results_eq($$SELECT pages, pulled, new_versions, unchanged FROM ironwod.sync_run_entities$$,
                  $$VALUES (4, 6, 4, 2)$$, 'per-entity counters');
SELECT lives_ok($$SELECT ironwod.land_page(current_setting('test.run')::bigint, 'clients', 'full', 2,
    '{"clients": [{"id": 1003, "first_name": "Cyrus"}], "pagination": {"has_more": false}}', 1, NULL, 120)$$,
    'land a page with its request latency');
SELECT results_eq($$SELECT latency_hist, latency_ms FROM ironwod.sync_run_entities$$,
                  $$VALUES ('{0,0,1,0,0,0,0,0}'::int[], 120::double precision)$$,
                  'a 120 ms request lands in the 100-250 ms bucket');
-- has_more is inferred from a full page when pagination is missing.
SELECT results_eq($$SELECT has_more FROM pg_temp.land('programs', 'full', 1,
    (SELECT '{"programs": [' || string_agg(format('{"id": %s}', i), ',') || ']}' FROM generate_series(1, 100) i))$$,
    $$VALUES (true)$$, 'a full page without pagination has more');

-- Pagination invariants: nothing lands from a page that breaks them.
SELECT results_eq($$SELECT outcome FROM ironwod.land_page(current_setting('test.run')::bigint, 'memberships', 'full', 2,
    '{"memberships": [{"id": 1}, {"id": 2}], "pagination": {"page": 2, "has_more": true}}', 1, md5('1,2'))$$,
    $$VALUES ('pagination')$$, 'a page repeating the previous one');
SELECT results_eq($$SELECT outcome FROM ironwod.land_page(current_setting('test.run')::bigint, 'memberships', 'full', 3,
    '{"memberships": [{"id": 5}], "pagination": {"page": 7, "has_more": false}}', 1)$$,
    $$VALUES ('pagination')$$, 'a page other than the one asked for');
SELECT results_eq($$SELECT outcome FROM ironwod.land_page(current_setting('test.run')::bigint, 'memberships', 'full', 1,
    '{"memberships": [], "pagination": {"page": 1, "has_more": true}}', 1)$$,
    $$VALUES ('pagination')$$, 'an empty page that claims more');
SELECT is((SELECT count(*) FROM ironwod.wodify_raw_memberships), 0::bigint, 'broken pages land nothing');

-- Work planning skips completed units, then reaches the monthly windows, newest first.
INSERT INTO ironwod.backfill_checkpoints (tenant_id, gym_id, run_scope, entity, window_key, pages, records, completed_by)
SELECT ironwod.scope_tenant(), ironwod.scope_gym(), 'backfill', e, 'full', 1, 0, current_setting('test.run')::bigint
FROM unnest(ARRAY['locations', 'programs', 'memberships', 'membership_holds']) e;
SELECT results_eq($$SELECT entity FROM ironwod.next_task(current_setting('test.run')::bigint)$$,
                  $$VALUES ('invoices')$$, 'no client has recent sign-ins: straight to invoices');
SELECT is((SELECT window_key FROM ironwod.next_task(current_setting('test.run')::bigint)),
          to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM'), 'newest window first');
SELECT matches((SELECT url FROM ironwod.next_task(current_setting('test.run')::bigint)),
               '^/financials/invoices/search\?q=created_on_datetime%7Cgte%7C\d{4}-\d\d-01T00%3A00%3A00Z&sort=desc_created_on_datetime$',
               'the newest window is open-ended');
SELECT matches((SELECT url FROM ironwod.plan_units(current_setting('test.run')::bigint, 'invoices') OFFSET 1 LIMIT 1),
               '^/financials/invoices/search\?q=created_on_datetime%7Cgte%7C\d{4}-\d\d-01T00%3A00%3A00Z%3Bcreated_on_datetime%7Clt%7C\d{4}-\d\d-01T00%3A00%3A00Z&sort=desc_created_on_datetime$',
               'older windows are URL-encoded q with a half-open month');
SELECT is((SELECT count(*) FROM ironwod.plan_units(current_setting('test.run')::bigint, 'invoices')), 25::bigint,
          '24 months plus the current one');

-- A client with a recent sign-in gets its own sign-in unit.
SELECT lives_ok($$SELECT pg_temp.land('clients', 'full', 1,
    format('{"clients": [{"id": 1004, "last_class_sign_in": "%s"}], "pagination": {"has_more": false}}',
           ironwod.iso_utc(now() - interval '3 days')))$$, 'land a recent attendee');
SELECT results_eq($$SELECT entity, window_key FROM ironwod.next_task(current_setting('test.run')::bigint)$$,
                  $$VALUES ('class_signins', 'client:1004')$$, 'per-client sign-in unit');

-- A cancelled run cannot land anything more.
RESET ROLE;
UPDATE ironwod.sync_runs SET status = 'cancelled' WHERE run_id = current_setting('test.run')::bigint;
SET LOCAL ROLE ironwod_worker;
SELECT throws_ok($$SELECT * FROM pg_temp.land('clients', 'full', 1, '{"clients": []}')$$, '55000');
-- Another tenant's scope sees none of this.
SELECT set_config('ironwod.tenant_id', '88888888-8888-8888-8888-888888888888', true),
       set_config('ironwod.gym_id', '88888888-0000-0000-0000-000000000001', true);
SELECT is((SELECT count(*) FROM ironwod.wodify_raw_clients), 0::bigint, 'other scope sees no raw rows');

SELECT * FROM finish();
ROLLBACK;
