-- pgTAP: reconciliation soft deletes, against fixture pages, as the worker role.
-- The fixture connection is committed first (parked, so ironwod_tick leaves it
-- alone) and deleted at the end: on Citus the worker could not read placements
-- the owner wrote in the same transaction (25001).
INSERT INTO ironwod.integrations_wodify_connection (tenant_id, gym_id, status, api_key_ciphertext, next_retry_at)
VALUES ('cdcdcdcd-cdcd-cdcd-cdcd-cdcdcdcdcdcd', 'cdcdcdcd-0000-0000-0000-000000000001', 'connected', '\x00', 'infinity')
ON CONFLICT DO NOTHING;
BEGIN;
SELECT plan(13);

SELECT ironwod_set_scope('cdcdcdcd-cdcd-cdcd-cdcd-cdcdcdcdcdcd', 'cdcdcdcd-0000-0000-0000-000000000001');

-- One run at a time, each landing the roster of one entity it is given (one full page).
CREATE FUNCTION pg_temp.run_with(p_mode text, p_ids int[], p_entity text DEFAULT 'clients') RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_run bigint;
BEGIN
    UPDATE ironwod.sync_runs SET status = 'succeeded' WHERE status = 'running'
       AND tenant_id = ironwod.scope_tenant();
    INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, status, started_at)
    VALUES (ironwod.scope_tenant(), ironwod.scope_gym(), p_mode, 'running', now())
    RETURNING run_id INTO v_run;
    PERFORM ironwod.plan_entity(v_run, p_entity);
    PERFORM ironwod.land_page(v_run, p_entity, 'full', 1,
        jsonb_build_object(p_entity, (SELECT jsonb_agg(jsonb_build_object('id', i, 'name', 'n' || i)) FROM unnest(p_ids) i),
                           'pagination', jsonb_build_object('page', 1, 'has_more', false))::text, 1);
    PERFORM ironwod.transform_run(v_run);
    RETURN v_run;
END
$$;
GRANT EXECUTE ON FUNCTION pg_temp.run_with(text, int[], text) TO ironwod_worker;
SET LOCAL ROLE ironwod_worker;

SELECT lives_ok($$SELECT pg_temp.run_with('backfill', ARRAY[1, 2, 3, 4])$$, 'backfill lands four clients');
SELECT is((SELECT count(*) FROM ironwod.members WHERE deleted_at IS NULL), 4::bigint, 'four live members');

SELECT lives_ok($$SELECT pg_temp.run_with('incremental', ARRAY[1, 2, 3])$$, 'an incremental run missing one');
SELECT is((SELECT count(*) FROM ironwod.vanished_records), 0::bigint, 'incremental runs never delete');

SELECT lives_ok($$SELECT pg_temp.run_with('reconcile', ARRAY[1, 2, 3])$$, 'a reconciliation missing one');
SELECT results_eq($$SELECT m.member_id, m.deleted_at IS NOT NULL FROM ironwod.members m ORDER BY 1$$,
                  $$VALUES (1::bigint, false), (2, false), (3, false), (4, true)$$,
                  'the vanished client is soft-deleted in the canonical table');

SELECT pg_temp.run_with('reconcile', ARRAY[1]);
SELECT is((SELECT count(*) FROM ironwod.sync_events WHERE event = 'wodify.sync.reconcile.deletes_skipped'), 1::bigint,
          'a pull that saw too few records deletes nothing');

SELECT pg_temp.run_with('reconcile', ARRAY[1, 2, 3, 4]);
SELECT is((SELECT count(*) FROM ironwod.vanished_records), 0::bigint, 'seen again: no longer vanished');
SELECT is((SELECT count(*) FROM ironwod.members WHERE deleted_at IS NULL), 4::bigint, 'and restored in the canonical table');

-- A program (or location) that vanishes or comes back changes rows of every
-- month (its cache rows, the people in it): the run marks all of them dirty.
SELECT pg_temp.run_with('backfill', ARRAY[1, 2, 3, 4], 'programs');
SELECT pg_temp.run_with('reconcile', ARRAY[1, 2, 3], 'programs') AS program_gone \gset
SELECT results_eq($$SELECT p.program_id, p.deleted_at IS NOT NULL FROM ironwod.programs p ORDER BY 1$$,
                  $$VALUES (1::bigint, false), (2, false), (3, false), (4, true)$$,
                  'the vanished program is soft-deleted');
SELECT is((SELECT dirty_from FROM ironwod.metric_dirty WHERE run_id = :program_gone AND entity = 'programs'),
          date '0001-01-01', 'a vanished program recomputes every month');
SELECT pg_temp.run_with('reconcile', ARRAY[1, 2, 3, 4], 'programs') AS program_back \gset
SELECT is((SELECT dirty_from FROM ironwod.metric_dirty WHERE run_id = :program_back AND entity = 'programs'),
          date '0001-01-01', 'a program seen again recomputes every month');
SELECT is((SELECT count(*) FROM ironwod.programs WHERE deleted_at IS NULL), 4::bigint, 'and is restored');

SELECT * FROM finish();
ROLLBACK;
DELETE FROM ironwod.integrations_wodify_connection WHERE tenant_id = 'cdcdcdcd-cdcd-cdcd-cdcd-cdcdcdcdcdcd';
