-- The initial backfill lands exactly the simulator's records for every entity, and
-- a second backfill adds no raw rows.
\set ta '''11111111-1111-1111-1111-111111111111'''
\set g1 '''aaaaaaaa-0000-0000-0000-000000000001'''
\set g2 '''aaaaaaaa-0000-0000-0000-000000000002'''
-- As the host app would: row-level security scopes every read below.
SET ROLE ironwod_test_app;

BEGIN;
SELECT ironwod_set_scope(:ta, :g1);
SELECT ironwod_wait(last_run('backfill'),
                    '5 minutes') AS backfill;
COMMIT;

BEGIN;
SELECT ironwod_set_scope(:ta, :g1);
SELECT r.entity, r.n_rows = r.n_records AS one_version_each,
       r.n_records = (g.expected->>r.entity)::int AS matches_simulator, r.n_records > 0 AS nonempty
FROM raw_counts() r, sim_gyms g WHERE g.idx = 0;
SELECT status, last_success_at IS NOT NULL AS succeeded_once, backfill_completed_at IS NOT NULL AS backfilled,
       last_cursor_at IS NOT NULL AS has_watermark
FROM ironwod_status(:ta, :g1);
-- Every entity has a watermark taken from the vendor's timestamps.
SELECT entity, watermark IS NOT NULL AS has_watermark FROM ironwod.entity_cursors ORDER BY entity;
-- A finished backfill clears its checkpoints.
SELECT count(*) AS checkpoints_left FROM ironwod.backfill_checkpoints;
-- Events of the run.
SELECT event, count(*) FROM ironwod.sync_events GROUP BY event ORDER BY event;
CREATE TEMP TABLE before_rerun AS SELECT * FROM raw_counts();
SET LOCAL client_min_messages = warning;
SELECT ironwod_sync(:ta, :g1, 'backfill') AS rerun \gset
COMMIT;

BEGIN;
SELECT ironwod_set_scope(:ta, :g1);
SELECT ironwod_wait(:rerun, '5 minutes') AS rerun_status;
SELECT r.entity, r.n_rows = b.n_rows AS no_new_rows
FROM raw_counts() r JOIN before_rerun b USING (entity) ORDER BY r.entity;
SELECT sum(new_versions) AS new_versions, sum(pulled) > 0 AS pulled_again
FROM ironwod.sync_run_entities WHERE run_id = :rerun;
COMMIT;

-- The second gym (text overload) also completes with the simulator's counts.
BEGIN;
SELECT ironwod_set_scope(:ta, :g2);
SELECT ironwod_wait(last_run('backfill'),
                    '5 minutes') AS backfill;
SELECT bool_and(r.n_records = (g.expected->>r.entity)::int) AS all_entities_match
FROM raw_counts() r, sim_gyms g WHERE g.idx = 1;
COMMIT;

-- ironwod_wait in the transaction that queued the run fails at once (the run
-- cannot start before that transaction commits) and says to commit first.
BEGIN;
SELECT ironwod_set_scope(:ta, :g1) \g /dev/null
SELECT ironwod_sync(:ta, :g1, 'incremental') AS queued \gset
-- The run id as ironwod_sync returned it: on Citus this transaction may not read
-- the runs table (last_run) after the function's owner wrote it.
SELECT set_config('test.queued', :'queued', true) \g /dev/null
DO $$
DECLARE
    v_hint text;
BEGIN
    PERFORM ironwod_wait(current_setting('test.queued')::bigint, '3 seconds');
    RAISE NOTICE 'ironwod_wait returned';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_hint = PG_EXCEPTION_HINT;
    RAISE NOTICE '%: % (hint: %)', SQLSTATE, regexp_replace(SQLERRM, 'run \d+', 'run N'), v_hint;
END
$$;
ROLLBACK;
RESET ROLE;
