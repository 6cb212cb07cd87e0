-- pgTAP: landing and work planning, against fixture pages, without any worker.
-- Runs as the worker role under a fixture scope, so RLS applies as in a real run.
--
-- Everything inside the transaction runs as the worker: on Citus a transaction
-- cannot read placements another role wrote in it (25001), so the two fixture
-- connections, which only an owner may insert, are committed first (parked, so
-- ironwod_tick leaves them alone) and deleted at the end; the runs are the
-- worker's own rows, rolled back.  Scope changes go through ironwod_set_scope
-- (SET LOCAL reaches the Citus nodes, set_config() does not), which only the app
-- may call, so the role is reset around them; they touch no table.
INSERT INTO ironwod.integrations_wodify_connection (tenant_id, gym_id, status, api_key_ciphertext, next_retry_at)
VALUES ('99999999-9999-9999-9999-999999999999', '99999999-0000-0000-0000-000000000001', 'connected', '\x00', 'infinity'),
       ('99999999-9999-9999-9999-999999999999', '99999999-0000-0000-0000-000000000002', 'connected', '\x00', 'infinity')
ON CONFLICT DO NOTHING;
BEGIN;
SELECT plan(73);

SELECT ironwod_set_scope('99999999-9999-9999-9999-999999999999', '99999999-0000-0000-0000-000000000001');
SET LOCAL ROLE ironwod_worker;
INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, status)
VALUES ('99999999-9999-9999-9999-999999999999', '99999999-0000-0000-0000-000000000001', 'backfill', 'running');
SELECT set_config('test.run', currval('ironwod.sync_run_id_seq')::text, true);

CREATE FUNCTION pg_temp.land(p_entity text, p_key text, p_page int, p_body text)
RETURNS TABLE (outcome text, http_code int, has_more boolean, n_records int, n_new int)
LANGUAGE sql AS $$
    SELECT outcome, http_code, has_more, n_records, n_new
    FROM ironwod.land_page(current_setting('test.run')::bigint, p_entity, p_key, p_page, p_body, 1)
$$;

-- The first unit of a fresh backfill is the locations list.
SELECT results_eq($$SELECT entity, window_key, url FROM ironwod.next_task(current_setting('test.run')::bigint)$$,
                  $$VALUES ('locations', 'full', '/customers/locations?sort=id')$$, 'backfill starts with locations');
SELECT results_eq($$SELECT entity, units_total, units_done FROM ironwod.sync_run_entities$$,
                  $$VALUES ('locations', 1, 0)$$, 'only the entity that started is planned');
-- The landing checks below use the clients list's unit.
SELECT is(ironwod.plan_entity(current_setting('test.run')::bigint, 'clients'), 1, 'the clients list is one unit');

-- Error envelopes inside HTTP 200, missing records key, non-objects.
SELECT results_eq($$SELECT outcome, http_code FROM pg_temp.land('clients', 'full', 1,
                    '{"HTTPCode": 503, "ErrorCode": "E", "DeveloperMessage": "down", "UserMessage": "", "MoreInfo": ""}')$$,
                  $$VALUES ('envelope', 503)$$, 'HTTPCode envelope is an error of that code');
SELECT results_eq($$SELECT outcome FROM pg_temp.land('clients', 'full', 1, '{"data": []}')$$,
                  $$VALUES ('bad_body')$$, 'missing records key');
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
SELECT results_eq($$SELECT pages, pulled, new_versions, unchanged FROM ironwod.sync_run_entities WHERE entity = 'clients'$$,
                  $$VALUES (4, 6, 4, 2)$$, 'per-entity counters');
SELECT lives_ok($$SELECT ironwod.land_page(current_setting('test.run')::bigint, 'clients', 'full', 2,
    '{"clients": [{"id": 1003, "first_name": "Cyrus"}], "pagination": {"has_more": false}}', 1, NULL, 120)$$,
    'land a page with its request latency');
SELECT results_eq($$SELECT latency_hist, latency_ms FROM ironwod.sync_run_entities WHERE entity = 'clients'$$,
                  $$VALUES ('{0,0,1,0,0,0,0,0}'::int[], 120::double precision)$$,
                  'a 120 ms request lands in the 100-250 ms bucket');
-- The payload hash is that of the record's jsonb: stable across runs and key order.
-- (On Citus the call runs on the shard's node, where it reads the registry.)
SELECT ok((SELECT bool_and(ironwod.payload_hash('clients', payload_json) = payload_hash) FROM ironwod.wodify_raw_clients),
          'a stored hash is the hash of the stored payload');
-- Volatile fields (ironwod.entities.volatile_fields) are left out of the hash: a
-- client whose record differs only there is the version already stored, which
-- keeps the payload first seen and only moves its last sighting.
SELECT is((SELECT payload_hash FROM ironwod.split_page('clients',
              '{"clients": [{"id": 1, "a": 2, "days_since_last_attendance": 3, "is_at_risk": false, "current_weekstreak": 4}]}')),
          (SELECT payload_hash FROM ironwod.split_page('clients',
              '{"clients": [{"id": 1, "a": 2, "days_since_last_attendance": 17, "is_at_risk": true, "current_weekstreak": 0}]}')),
          'a change of volatile fields only does not change the hash');
SELECT is((SELECT payload_hash FROM ironwod.split_page('clients', '{"clients": [{"id": 1, "a": 2, "days_since_last_attendance": 3}]}')),
          ironwod.payload_hash('{"id": 1, "a": 2}'::jsonb), 'the hash is that of the record without its volatile fields');
SELECT results_eq($$SELECT n_new FROM pg_temp.land('clients', 'full', 2,
    '{"clients": [{"id": 1003, "first_name": "Cyrus", "days_since_last_attendance": 9}], "pagination": {"has_more": false}}')$$,
    $$VALUES (0)$$, 'a record that differs only in volatile fields adds no version');
SELECT results_eq($$SELECT count(*), bool_and(NOT payload_json ? 'days_since_last_attendance') FROM ironwod.wodify_raw_clients
                    WHERE wodify_id = 1003 AND payload_json ->> 'first_name' = 'Cyrus'$$,
                  $$VALUES (1::bigint, true)$$, 'the stored payload is the first one seen of its version');
SELECT is((SELECT payload_hash FROM ironwod.split_page('clients', '{"clients": [{"id": 1, "a": 2, "b": [1, 2.50]}]}')),
          (SELECT payload_hash FROM ironwod.split_page('clients', '{"clients":[{"b":[1,2.50],"a":2,"id":1}]}')),
          'key order and spacing do not change the hash');
SELECT isnt((SELECT payload_hash FROM ironwod.split_page('clients', '{"clients": [{"id": 1, "a": 2}]}')),
            (SELECT payload_hash FROM ironwod.split_page('clients', '{"clients": [{"id": 1, "a": 3}]}')),
            'a changed value changes it');
-- Each record is exactly what PostgreSQL's own parser makes of it.
SELECT ok((SELECT bool_and(s.payload = j.r AND s.wodify_id = (j.r ->> 'id')::bigint)
           FROM ironwod.split_page('memberships', b) s
           JOIN jsonb_array_elements(b::jsonb -> 'memberships') WITH ORDINALITY AS j(r, ord) ON j.ord = s.ordinal),
          'split_page gives the records jsonb_in gives')
FROM (SELECT '{"memberships": [{"id": 7, "client": "Zoë \u00e9\"x\"", "price": 12.50, "n": -1e3, "t": true,
                                 "z": null, "nested": {"k": [1, {"a": "b"}], "e": {}}, "id2": "0012"},
                                {"id": "8", "dup": 1, "dup": 2}], "pagination": {"page": 1}}'::text AS b) x;
-- The same for every form of JSON the fast lexer takes (page.c): each escape,
-- \u escapes and a surrogate pair, numbers of every shape, whitespace of every
-- kind, empty and nested containers, duplicate keys, escaped keys.
SELECT ok((SELECT bool_and(s.payload = j.r) AND count(*) = 4
           FROM ironwod.split_page('memberships', b) s
           JOIN jsonb_array_elements(b::jsonb -> 'memberships') WITH ORDINALITY AS j(r, ord) ON j.ord = s.ordinal),
          'split_page gives the records jsonb_in gives, escapes, numbers and whitespace included')
FROM (SELECT E'{"memberships":[{"id":1,"s":"q\\"b\\\\s\\/f\\bb\\ff\\nn\\rr\\tt","u":"\\u00e9\\u00C9\\u20ac\\ud83d\\ude00x",'
             '"":"","k\\"ey":1,"e":{},"a":[],"d":[[[]],[{}]]},\t\r\n'
             ' { "id" : 2 , "n" : [ 0, -0, 12.50, 1e3, 1E+3, -2.5e-3, 123456789012345678901234567890, 0.000 ] ,'
             '"b":[true,false,null], "dup": 1, "dup": 2 }, {"id": "3", "x": "Zo\u00eb"},\n{"id":4}\n]}  ' AS b) x;
-- A record the fast lexer finds poison keeps its raw bytes, first token to last.
SELECT results_eq($$SELECT fault, convert_from(raw, 'UTF8') COLLATE "default" FROM ironwod.split_page('memberships',
                      '{"memberships": [ {"id": 21, "n": 1e999999} ,[22, {}],  "x",{"id":23}]}') WHERE fault IS NOT NULL$$,
                  $$VALUES ('bad_number', '{"id": 21, "n": 1e999999}'), ('not_object', '[22, {}]'), ('not_object', '"x"')$$,
                  'a poison record''s raw bytes are its own, from its first token to its last');
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
SELECT is((SELECT count(*) FROM ironwod.quarantined_records), 0::bigint, 'and quarantine nothing');

-- (the WARNINGs go to the server log; the client need not print them)
SET LOCAL client_min_messages = error;
-- Poison records: what PostgreSQL cannot store goes to quarantine, byte for byte,
-- with the id when it is readable; the rest of the page lands.  (Invalid UTF-8
-- cannot be written as text; the scenarios send it over HTTP.)
SELECT results_eq($$SELECT outcome, n_records, n_new, n_quarantined, has_more
                    FROM ironwod.land_page(current_setting('test.run')::bigint, 'memberships', 'full', 1,
    '{"memberships": [{"id": 11, "note": "a\u0000b"}, {"id": 12}, {"name": "no id"}, {"id": 13, "n": "\ud800"},
                      [14], {"id": 15, "n": 1e999999}, {"id": 16}, {"id": 11, "note": "a\u0000b"}],
      "pagination": {"page": 1, "has_more": true}}', 1)$$,
                  $$VALUES ('landed', 8, 2, 6, true)$$, 'poison records are quarantined, the rest of the page lands');
SELECT results_eq($$SELECT wodify_id FROM ironwod.wodify_raw_memberships ORDER BY 1$$,
                  $$VALUES (12::bigint), (16)$$, 'the good records landed');
SELECT results_eq($$SELECT wodify_id, reason, times_seen FROM ironwod.quarantined_records ORDER BY reason$$,
                  $$VALUES (13::bigint, 'bad_escape', 1), (15, 'bad_number', 1), (NULL, 'no_id', 1),
                           (NULL, 'not_object', 1), (11, 'nul', 1)$$,
                  'one row per distinct poison element, with its id when readable');
SELECT is((SELECT convert_from(raw, 'UTF8') FROM ironwod.quarantined_records WHERE reason = 'nul'),
          '{"id": 11, "note": "a\u0000b"}', 'the raw bytes as the vendor sent them');
SELECT results_eq($$SELECT pulled, new_versions, unchanged, quarantined FROM ironwod.sync_run_entities
                    WHERE entity = 'memberships'$$,
                  $$VALUES (8, 2, 0, 6)$$, 'quarantined records are pulled, neither new nor unchanged');
-- Fetched again: retried, still poison, refreshed rather than piled up.
SELECT results_eq($$SELECT outcome, n_quarantined FROM ironwod.land_page(current_setting('test.run')::bigint, 'memberships', 'full', 1,
    '{"memberships": [{"id": 11, "note": "a\u0000b"}, {"id": 12}, {"name": "no id"}, {"id": 13, "n": "\ud800"},
                      [14], {"id": 15, "n": 1e999999}, {"id": 16}], "pagination": {"page": 1, "has_more": true}}', 1)$$,
                  $$VALUES ('landed', 5)$$, 'the same poison fetched again');
SELECT results_eq($$SELECT count(*), sum(times_seen) FROM ironwod.quarantined_records$$,
                  $$VALUES (5::bigint, 10::bigint)$$, 'is refreshed, not duplicated');
-- The vendor fixes two: they land and leave quarantine.
SELECT results_eq($$SELECT outcome, n_new, n_quarantined FROM ironwod.land_page(current_setting('test.run')::bigint, 'memberships', 'full', 2,
    '{"memberships": [{"id": 11, "note": "ab"}, {"id": 13, "n": "x"}], "pagination": {"page": 2, "has_more": true}}', 1)$$,
                  $$VALUES ('landed', 2, 0)$$, 'fixed records land');
SELECT results_eq($$SELECT reason FROM ironwod.quarantined_records ORDER BY reason$$,
                  $$VALUES ('bad_number'), ('no_id'), ('not_object')$$, 'and leave quarantine');
-- Records without an id leave when a later complete pull of their list no longer
-- holds them (here: the rows are made an earlier run's, and the list's last page lands).
UPDATE ironwod.quarantined_records SET last_seen_run_id = 0 WHERE reason IN ('no_id', 'not_object');
SELECT is(ironwod.plan_entity(current_setting('test.run')::bigint, 'memberships'), 1, 'the memberships list is one unit');
SELECT results_eq($$SELECT outcome, has_more FROM ironwod.land_page(current_setting('test.run')::bigint, 'memberships', 'full', 3,
    '{"memberships": [{"id": 15, "n": 1e999999}], "pagination": {"page": 3, "has_more": false}}', 1)$$,
                  $$VALUES ('landed', false)$$, 'the list''s last page lands');
SELECT results_eq($$SELECT wodify_id, reason FROM ironwod.quarantined_records$$,
                  $$VALUES (15::bigint, 'bad_number')$$,
                  'a complete pull of a list clears what it no longer holds, keeps what it still does');

-- Work planning, in a second gym whose backfill campaign had checkpointed some
-- units: each entity is planned once, when it starts; checkpointed units are
-- planned as skipped.
RESET ROLE;
SELECT ironwod_set_scope('99999999-9999-9999-9999-999999999999', '99999999-0000-0000-0000-000000000002');
SET LOCAL ROLE ironwod_worker;
INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, status)
VALUES ('99999999-9999-9999-9999-999999999999', '99999999-0000-0000-0000-000000000002', 'backfill', 'running');
SELECT set_config('test.run2', currval('ironwod.sync_run_id_seq')::text, true);
CREATE FUNCTION pg_temp.land2(p_entity text, p_key text, p_body text) RETURNS text
LANGUAGE sql AS $$
    SELECT outcome FROM ironwod.land_page(current_setting('test.run2')::bigint, p_entity, p_key, 1, p_body, 1)
$$;
INSERT INTO ironwod.backfill_checkpoints (tenant_id, gym_id, entity, window_key, pages, records, completed_by)
SELECT ironwod.scope_tenant(), ironwod.scope_gym(), e, 'full', 1, 0, 1
FROM unnest(ARRAY['locations', 'programs', 'memberships', 'membership_holds']) e
ON CONFLICT DO NOTHING;  -- as in the product: Citus would COPY the rows, which RLS refuses
SELECT results_eq($$SELECT entity, window_key FROM ironwod.next_task(current_setting('test.run2')::bigint)$$,
                  $$VALUES ('clients', 'full')$$, 'checkpointed lists are skipped');
SELECT results_eq($$SELECT entity, status FROM ironwod.run_units ORDER BY entity_ordinal$$,
                  $$VALUES ('locations', 'skipped'), ('programs', 'skipped'), ('clients', 'pending')$$,
                  'skipped units are planned too, so the counts stay complete');
SELECT results_eq($$SELECT entity, units_total, units_skipped FROM ironwod.sync_run_entities ORDER BY entity$$,
                  $$VALUES ('clients', 1, 0), ('locations', 1, 1), ('programs', 1, 1)$$, 'units per entity');
-- Asking again hands out the same unit: nothing is re-planned.
SELECT results_eq($$SELECT entity, window_key FROM ironwod.next_task(current_setting('test.run2')::bigint)$$,
                  $$VALUES ('clients', 'full')$$, 'the next unit is stable until it lands');
-- Clients: one with a recent sign-in, one without.
SELECT is(pg_temp.land2('clients', 'full',
    format('{"clients": [{"id": 1004, "last_class_sign_in": "%s", "total_class_sign_ins": 12},
                         {"id": 1005, "last_class_sign_in": "2001-01-01T00:00:00Z"}],
            "pagination": {"has_more": false}}', ironwod.iso_utc(now() - interval '3 days'))),
    'landed', 'land the client list');
SELECT results_eq($$SELECT wodify_id, total_class_sign_ins, last_class_sign_in > now() - interval '4 days'
                    FROM ironwod.wodify_raw_clients ORDER BY wodify_id$$,
                  $$VALUES (1004::bigint, 12::bigint, true), (1005, NULL, false)$$,
                  'the change detectors are typed columns of the raw version');
SELECT results_eq($$SELECT status, completed_at IS NOT NULL FROM ironwod.sync_run_entities WHERE entity = 'clients'$$,
                  $$VALUES ('completed', true)$$, 'the entity closes with its last unit');
SELECT results_eq($$SELECT entity, window_key FROM ironwod.next_task(current_setting('test.run2')::bigint)$$,
                  $$VALUES ('class_signins', 'client:1004')$$, 'a client with a recent sign-in gets its own sign-in unit');
SELECT is((SELECT count(*) FROM ironwod.run_units WHERE entity = 'class_signins'), 1::bigint,
          'only clients active inside the horizon');
SELECT is(pg_temp.land2('class_signins', 'client:1004', '{"class_sign_ins": [], "pagination": {"has_more": false}}'),
          'landed', 'land the client''s sign-ins');
SELECT is((SELECT window_key FROM ironwod.next_task(current_setting('test.run2')::bigint)),
          to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM'), 'then invoices, newest window first');
SELECT matches((SELECT url FROM ironwod.next_task(current_setting('test.run2')::bigint)),
               '^/financials/invoices/search\?q=created_on_datetime%7Cgte%7C\d{4}-\d\d-01T00%3A00%3A00Z&sort=desc_created_on_datetime$',
               'the newest window is open-ended');
SELECT matches((SELECT url FROM ironwod.run_units WHERE entity = 'invoices' AND ordinal = 2),
               '^/financials/invoices/search\?q=created_on_datetime%7Cgte%7C\d{4}-\d\d-01T00%3A00%3A00Z%3Bcreated_on_datetime%7Clt%7C\d{4}-\d\d-01T00%3A00%3A00Z&sort=desc_created_on_datetime$',
               'older windows are URL-encoded q with a half-open month');
SELECT is((SELECT count(*) FROM ironwod.run_units WHERE entity = 'invoices'), 25::bigint,
          '24 months plus the current one');
-- Units are consumed in order: landing the first window hands out the second.
SELECT is(pg_temp.land2('invoices', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM'),
                        '{"invoices": [{"id": 7}], "pagination": {"has_more": false}}'), 'landed', 'land the newest window');
SELECT is((SELECT window_key FROM ironwod.next_task(current_setting('test.run2')::bigint)),
          to_char((now() AT TIME ZONE 'UTC') - interval '1 month', 'YYYY-MM'), 'the next window');
SELECT results_eq($$SELECT units_total, units_done, status FROM ironwod.sync_run_entities WHERE entity = 'invoices'$$,
                  $$VALUES (25, 1, 'running')$$, 'one of 25 invoice units done; the entity is still open');
-- A 403 on an entity's endpoint: its units are not entitled, and the run moves on.
SELECT lives_ok($$SELECT ironwod.mark_not_entitled(current_setting('test.run2')::bigint, 'invoices')$$, 'invoices not entitled');
SELECT is((SELECT count(*) FROM ironwod.run_units WHERE entity = 'invoices' AND status = 'not_entitled'), 24::bigint,
          'its pending units are marked');
SELECT is((SELECT entity FROM ironwod.next_task(current_setting('test.run2')::bigint)), 'transactions',
          'the run goes on with the next entity');

-- An incremental run plans sign-ins only for clients whose detectors moved since
-- the last clean run, from their previous last sign-in minus the lookback.
UPDATE ironwod.sync_runs SET status = 'succeeded'
 WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym() AND run_id = current_setting('test.run2')::bigint;
INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, status)
VALUES ('99999999-9999-9999-9999-999999999999', '99999999-0000-0000-0000-000000000002', 'incremental', 'running');
SELECT set_config('test.run2', currval('ironwod.sync_run_id_seq')::text, true);
SELECT is(ironwod.plan_entity(current_setting('test.run2')::bigint, 'clients'), 1, 'plan the client list');
SELECT is(pg_temp.land2('clients', 'full',
    format('{"clients": [{"id": 1004, "last_class_sign_in": "%s", "total_class_sign_ins": 13},
                         {"id": 1005, "last_class_sign_in": "2001-01-01T00:00:00Z", "note": "edited"}],
            "pagination": {"has_more": false}}', ironwod.iso_utc(now() - interval '1 day'))),
    'landed', 'land changed versions of both clients');
SELECT is(ironwod.plan_entity(current_setting('test.run2')::bigint, 'class_signins'), 1,
          'a new version whose detectors did not move plans nothing');
-- The run as a psql variable: Citus sends this subquery to the shard, where the
-- transaction's test.run2 is not set.
SELECT current_setting('test.run2') AS run2 \gset
SELECT matches((SELECT url FROM ironwod.run_units WHERE entity = 'class_signins' AND run_id = :run2),
               '^/clients/1004/classes/sign-ins/search\?q=utc_class_start_datetime%7Cgte%7C'
               || ironwod.urlencode(ironwod.iso_utc((SELECT last_class_sign_in FROM ironwod.wodify_raw_clients
                                                     WHERE wodify_id = 1004 AND total_class_sign_ins = 12)
                                                    - interval '3 days')),
               'from the previous last sign-in minus the lookback');

-- A cancelled run cannot land anything more.
RESET ROLE;
SELECT ironwod_set_scope('99999999-9999-9999-9999-999999999999', '99999999-0000-0000-0000-000000000001');
SET LOCAL ROLE ironwod_worker;
UPDATE ironwod.sync_runs SET status = 'cancelled'
 WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym() AND run_id = current_setting('test.run')::bigint;
SELECT throws_ok($$SELECT * FROM pg_temp.land('clients', 'full', 1, '{"clients": []}')$$, '55000');
-- Another tenant's scope sees none of this.
RESET ROLE;
SELECT ironwod_set_scope('88888888-8888-8888-8888-888888888888', '88888888-0000-0000-0000-000000000001');
SET LOCAL ROLE ironwod_worker;
SELECT is((SELECT count(*) FROM ironwod.wodify_raw_clients), 0::bigint, 'other scope sees no raw rows');

SELECT * FROM finish();
ROLLBACK;
DELETE FROM ironwod.integrations_wodify_connection WHERE tenant_id = '99999999-9999-9999-9999-999999999999';
