-- pgTAP: reconciliation soft deletes, against fixture pages, as the worker role.
-- The fixture connection is committed first (parked, so ironwod_tick leaves it
-- alone) and deleted at the end: on Citus the worker could not read placements
-- the owner wrote in the same transaction (25001).
INSERT INTO ironwod.integrations_wodify_connection (tenant_id, gym_id, status, api_key_ciphertext, next_retry_at)
VALUES ('cdcdcdcd-cdcd-cdcd-cdcd-cdcdcdcdcdcd', 'cdcdcdcd-0000-0000-0000-000000000001', 'connected', '\x00', 'infinity')
ON CONFLICT DO NOTHING;
BEGIN;
SELECT plan(9);

SELECT ironwod_set_scope('cdcdcdcd-cdcd-cdcd-cdcd-cdcdcdcdcdcd', 'cdcdcdcd-0000-0000-0000-000000000001');

-- One run at a time, each landing the clients roster it is given (one full page).
CREATE FUNCTION pg_temp.run_with(p_mode text, p_ids int[]) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_run bigint;
BEGIN
    UPDATE ironwod.sync_runs SET status = 'succeeded' WHERE status = 'running'
       AND tenant_id = ironwod.scope_tenant();
    INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, status, started_at)
    VALUES (ironwod.scope_tenant(), ironwod.scope_gym(), p_mode, 'running', now())
    RETURNING run_id INTO v_run;
    PERFORM ironwod.plan_entity(v_run, 'clients');
    PERFORM ironwod.land_page(v_run, 'clients', 'full', 1,
        jsonb_build_object('clients', (SELECT jsonb_agg(jsonb_build_object('id', i, 'first_name', 'n' || i)) FROM unnest(p_ids) i),
                           'pagination', jsonb_build_object('page', 1, 'has_more', false))::text, 1);
    PERFORM ironwod.transform_run(v_run);
    RETURN v_run;
END
$$;
GRANT EXECUTE ON FUNCTION pg_temp.run_with(text, int[]) TO ironwod_worker;
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

SELECT * FROM finish();
ROLLBACK;
DELETE FROM ironwod.integrations_wodify_connection WHERE tenant_id = 'cdcdcdcd-cdcd-cdcd-cdcd-cdcdcdcdcdcd';
