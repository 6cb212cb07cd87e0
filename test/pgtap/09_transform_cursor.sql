-- pgTAP: transform_run finds the raw versions to transform above the gym's
-- per-entity cursor (ironwod.transform_cursors), as the worker role: versions
-- of a run that failed before its transform are taken by the next run, a manual
-- transform_run of an earlier run leaves a later run's versions for that run,
-- and a new version of a record moves its canonical row.  The fixture
-- connection is committed first (parked, so ironwod_tick leaves it alone) and
-- deleted at the end, as in 04_reconcile.
INSERT INTO ironwod.integrations_wodify_connection (tenant_id, gym_id, status, api_key_ciphertext, next_retry_at)
VALUES ('c0c0c0c0-c0c0-c0c0-c0c0-c0c0c0c0c0c0', 'c0c0c0c0-0000-0000-0000-000000000001', 'connected', '\x00', 'infinity')
ON CONFLICT DO NOTHING;
BEGIN;
SELECT plan(10);

SELECT ironwod_set_scope('c0c0c0c0-c0c0-c0c0-c0c0-c0c0c0c0c0c0', 'c0c0c0c0-0000-0000-0000-000000000001');

-- A run of the gym that lands one full page of clients (id, name) and ends with
-- the given status, without transforming: the test calls transform_run itself.
CREATE FUNCTION pg_temp.land(p_clients jsonb, p_status text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_run bigint;
    v_t uuid := ironwod.scope_tenant();
    v_now timestamptz := now();  -- Citus refuses now() in an UPDATE of a distributed table
BEGIN
    INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, status, started_at)
    VALUES (v_t, ironwod.scope_gym(), 'incremental', 'running', v_now)
    RETURNING run_id INTO v_run;
    PERFORM ironwod.plan_entity(v_run, 'clients');
    PERFORM ironwod.land_page(v_run, 'clients', 'full', 1,
        jsonb_build_object('clients', (SELECT jsonb_agg(jsonb_build_object('id', c.key::int, 'first_name', c.value))
                                       FROM jsonb_each_text(p_clients) c),
                           'pagination', jsonb_build_object('page', 1, 'has_more', false))::text, 1);
    UPDATE ironwod.sync_runs SET status = p_status, finished_at = v_now
     WHERE tenant_id = v_t AND run_id = v_run;
    RETURN v_run;
END
$$;
CREATE FUNCTION pg_temp.names() RETURNS text
LANGUAGE sql AS $$
    SELECT string_agg(m.member_id || '=' || coalesce(m.first_name, '?'), ',' ORDER BY m.member_id)
    FROM ironwod.members m
$$;
GRANT EXECUTE ON FUNCTION pg_temp.land(jsonb, text), pg_temp.names() TO ironwod_worker;
SET LOCAL ROLE ironwod_worker;

-- A run that failed after landing its page: its versions wait above the cursor.
SELECT pg_temp.land('{"1": "ann", "2": "bob"}', 'failed') AS failed_run \gset
SELECT pg_temp.land('{"3": "cy"}', 'succeeded') AS next_run \gset
SELECT lives_ok('SELECT ironwod.transform_run(' || :next_run || ')', 'the next run transforms');
SELECT is(pg_temp.names(), '1=ann,2=bob,3=cy', 'with its own versions, those of the failed run before it');
SELECT is((SELECT count(*) FROM ironwod.transformed_runs WHERE run_id IN (:failed_run, :next_run)), 2::bigint,
          'both runs are recorded as transformed');

-- Two runs landed, the earlier transformed by hand first.
SELECT pg_temp.land('{"4": "dee"}', 'succeeded') AS run_c \gset
SELECT pg_temp.land('{"5": "eve", "1": "ann2"}', 'succeeded') AS run_d \gset
SELECT lives_ok('SELECT ironwod.transform_run(' || :run_c || ')', 'a manual transform of the earlier run');
SELECT is(pg_temp.names(), '1=ann,2=bob,3=cy,4=dee', 'takes its versions and none of the later run');
SELECT lives_ok('SELECT ironwod.transform_run(' || :run_d || ')', 'then the later run transforms');
SELECT is(pg_temp.names(), '1=ann2,2=bob,3=cy,4=dee,5=eve', 'and finds its versions above the cursor: a new record and a new version');

-- Transforming again reads nothing new and changes nothing.
SELECT lives_ok('SELECT ironwod.transform_run(' || :run_d || ')', 'a second transform of the same run');
SELECT is(pg_temp.names(), '1=ann2,2=bob,3=cy,4=dee,5=eve', 'is idempotent');
SELECT is((SELECT c.raw_id FROM ironwod.transform_cursors c WHERE c.entity = 'clients'),
          (SELECT max(r.raw_id) FROM ironwod.wodify_raw_clients r),
          'the cursor ends at the last version landed');

SELECT * FROM finish();
ROLLBACK;
DELETE FROM ironwod.integrations_wodify_connection WHERE tenant_id = 'c0c0c0c0-c0c0-c0c0-c0c0-c0c0c0c0c0c0';
