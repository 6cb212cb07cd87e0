-- A backfill whose worker is terminated mid-way is failed by the supervisor, and
-- the next backfill resumes: it skips completed work units and ends with exactly
-- the raw rows of an uninterrupted backfill of the same gym (tenant B's).
\set tb '''22222222-2222-2222-2222-222222222222'''
\set gb '''bbbbbbbb-0000-0000-0000-000000000001'''
\set tc '''33333333-3333-3333-3333-333333333333'''
\set gc '''cccccccc-0000-0000-0000-000000000001'''

-- Hold back the landing of memberships with a lock that outlives this session's
-- transaction (a prepared transaction), so the backfill stops at a known point
-- however fast or slow the machine is: the full lists before memberships land,
-- then the worker waits on the lock, and is killed there.
BEGIN;
-- On Citus the lock stays on the coordinator's table, where the worker's insert
-- takes its lock first: spread to the nodes it would make the transaction one
-- that Citus cannot prepare.  (Without Citus the setting is an unused placeholder.)
SET LOCAL citus.enable_ddl_propagation = off;
LOCK TABLE ironwod.wodify_raw_memberships IN SHARE MODE;
PREPARE TRANSACTION 'ironwod_test_hold_memberships';

-- The key is sealed here, outside PostgreSQL, as a host app seals it (test/seal.py).
\getenv srcdir PG_ABS_SRCDIR
SELECT key_id AS kid, encode(public_key, 'hex') AS pub FROM ironwod_public_key() \gset
SELECT api_key AS key0 FROM sim_gyms WHERE idx = 0 \gset
\set sealed_c `printf %s :'key0' | /usr/bin/python3 :'srcdir'/seal.py :tc :gc :'kid' :'pub'`

SET ROLE ironwod_test_app;
BEGIN;
SELECT ironwod_set_scope(:tc, :gc) \g /dev/null
SELECT ironwod_connect(:tc, :gc, :'sealed_c'::bytea);
COMMIT;
-- Reads after a write by an ironwod_* function go in a new transaction (on Citus
-- a transaction cannot read what another user, the functions' owner, modified).
BEGIN;
SELECT ironwod_set_scope(:tc, :gc);
SELECT last_run('backfill') AS first_run \gset
COMMIT;

RESET ROLE;

-- Wait until the run's worker waits on that lock.
BEGIN;
SELECT set_config('test.first_run', :'first_run', true) IS NOT NULL AS waiting;
DO $$
BEGIN
    FOR i IN 1..3000 LOOP
        -- Waiting on that very lock: any other wait (a relation extension, a
        -- row lock while the run is claimed) is passing and proves nothing.
        IF EXISTS (SELECT 1 FROM ironwod.worker_status() w JOIN pg_locks l ON l.pid = w.pid
                   WHERE w.run_id = current_setting('test.first_run')::bigint
                     AND NOT l.granted
                     AND l.locktype = 'relation'
                     AND l.relation = 'ironwod.wodify_raw_memberships'::regclass) THEN
            RETURN;
        END IF;
        PERFORM ironwod.wait_for_change(100);
    END LOOP;
    RAISE EXCEPTION 'the worker of run % never waited on the lock', current_setting('test.first_run');
END
$$;
SELECT status FROM ironwod.sync_runs WHERE run_id = :first_run;
SELECT bool_and(status = 'completed') AS lists_before_memberships_landed
FROM ironwod.sync_run_entities
WHERE run_id = :first_run AND entity IN ('locations', 'programs', 'clients');
COMMIT;

-- The run worker is connected as the non-superuser worker role.
SELECT a.usename, u.usesuper FROM pg_stat_activity a JOIN pg_user u ON u.usesysid = a.usesysid
WHERE a.pid = (SELECT pid FROM ironwod.worker_status() WHERE run_id = :first_run);
-- Kill it, as an operator (or the OOM killer) would.
SELECT pg_terminate_backend(pid) AS terminated FROM ironwod.worker_status() WHERE run_id = :first_run;
ROLLBACK PREPARED 'ironwod_test_hold_memberships';

SET ROLE ironwod_test_app;
BEGIN;
SELECT ironwod_set_scope(:tc, :gc);
SELECT ironwod_wait(:first_run, '5 minutes') AS first_run_status;
SELECT error_code, failed_phase FROM ironwod.sync_runs WHERE run_id = :first_run;
SELECT count(*) > 0 AS has_checkpoints FROM ironwod.backfill_checkpoints;
COMMIT;
RESET ROLE;

SET ROLE ironwod_test_app;
BEGIN;
SELECT ironwod_set_scope(:tc, :gc);
SELECT ironwod_sync(:tc, :gc, 'backfill') AS second_run \gset
COMMIT;
BEGIN;
SELECT ironwod_set_scope(:tc, :gc);
SELECT ironwod_wait(:second_run, '5 minutes') AS second_run_status;
-- The resumed run did not fetch the full lists the first run had completed.
SELECT coalesce(sum(pages), 0) AS locations_pages_refetched FROM ironwod.sync_run_entities
WHERE run_id = :second_run AND entity = 'locations';
SELECT bool_and(r.n_records = (g.expected->>r.entity)::int AND r.n_rows = r.n_records) AS all_entities_match
FROM raw_counts() r, sim_gyms g WHERE g.idx = 0;
CREATE TEMP TABLE resumed AS
    SELECT 'clients' AS e, wodify_id, payload_hash FROM ironwod.wodify_raw_clients
    UNION ALL SELECT 'memberships', wodify_id, payload_hash FROM ironwod.wodify_raw_memberships
    UNION ALL SELECT 'signins', wodify_id, payload_hash FROM ironwod.wodify_raw_class_signins
    UNION ALL SELECT 'invoices', wodify_id, payload_hash FROM ironwod.wodify_raw_invoices
    UNION ALL SELECT 'transactions', wodify_id, payload_hash FROM ironwod.wodify_raw_transactions;
COMMIT;

BEGIN;
SELECT ironwod_set_scope(:tb, :gb);
CREATE TEMP TABLE uninterrupted AS
    SELECT 'clients' AS e, wodify_id, payload_hash FROM ironwod.wodify_raw_clients
    UNION ALL SELECT 'memberships', wodify_id, payload_hash FROM ironwod.wodify_raw_memberships
    UNION ALL SELECT 'signins', wodify_id, payload_hash FROM ironwod.wodify_raw_class_signins
    UNION ALL SELECT 'invoices', wodify_id, payload_hash FROM ironwod.wodify_raw_invoices
    UNION ALL SELECT 'transactions', wodify_id, payload_hash FROM ironwod.wodify_raw_transactions;
COMMIT;
SELECT (SELECT count(*) FROM (SELECT * FROM resumed EXCEPT ALL SELECT * FROM uninterrupted) x) AS only_in_resumed,
       (SELECT count(*) FROM (SELECT * FROM uninterrupted EXCEPT ALL SELECT * FROM resumed) x) AS only_in_uninterrupted,
       (SELECT count(*) FROM resumed) > 1000 AS substantial;

-- Disconnect: queued work cancelled, ciphertext destroyed, raw history kept.
BEGIN;
SELECT ironwod_set_scope(:tc, :gc);
SELECT ironwod_disconnect(:tc, :gc);
COMMIT;
BEGIN;
SELECT ironwod_set_scope(:tc, :gc);
SELECT status, api_key_fingerprint IS NOT NULL AS fingerprint_kept FROM ironwod.integrations_wodify_connection;
SELECT try(format('SELECT ironwod_sync(%L, %L)', :tc, :gc));
SELECT count(*) > 0 AS raw_kept FROM ironwod.wodify_raw_clients;
COMMIT;
RESET ROLE;
SELECT api_key_ciphertext IS NULL AS key_destroyed FROM ironwod.integrations_wodify_connection
WHERE tenant_id = :tc AND gym_id = :gc;
