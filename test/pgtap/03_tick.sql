-- pgTAP: what ironwod_tick() queues, without any worker (the transaction rolls
-- back, so the supervisor never sees these runs).
BEGIN;
SELECT plan(11);

-- Functions first: on Citus no function is created after a parallel write in the
-- same transaction (the UPDATE below touches every shard).
CREATE FUNCTION pg_temp.runs() RETURNS text LANGUAGE sql AS $$
    SELECT coalesce(string_agg(mode || ':' || status, ',' ORDER BY run_id), '')
    FROM ironwod.sync_runs WHERE tenant_id = 'abababab-abab-abab-abab-abababababab'
$$;

-- Only the fixture gym may be due: park every other connection.
UPDATE ironwod.integrations_wodify_connection SET next_retry_at = now() + interval '1 day';
INSERT INTO ironwod.integrations_wodify_connection
    (tenant_id, gym_id, status, api_key_ciphertext, time_zone, nightly_local_time, backfill_completed_at,
     reconcile_weekday)
VALUES ('abababab-abab-abab-abab-abababababab', 'abababab-0000-0000-0000-000000000001', 'connected', '\x00',
        'America/New_York', '00:00', now() - interval '3 days', 0);
-- No reconciliation today or yesterday, so the due run is the nightly incremental.
UPDATE ironwod.integrations_wodify_connection
   SET reconcile_weekday = (extract(dow FROM now() AT TIME ZONE 'America/New_York')::int + 3) % 7
 WHERE tenant_id = 'abababab-abab-abab-abab-abababababab';

SELECT is(ironwod_tick(), 1, 'a connected gym past its night slot gets one run');
SELECT is(pg_temp.runs(), 'incremental:queued', 'the nightly run is incremental');
SELECT is(ironwod_tick(), 0, 'a second tick queues nothing while a run is queued');
UPDATE ironwod.sync_runs SET status = 'succeeded' WHERE tenant_id = 'abababab-abab-abab-abab-abababababab';
SELECT is(ironwod_tick(), 0, 'nor after the night''s run finished');

DELETE FROM ironwod.sync_runs WHERE tenant_id = 'abababab-abab-abab-abab-abababababab';
-- The weekday of the night's slot, read first (Citus allows no CASE over now() in
-- an UPDATE).
SELECT extract(dow FROM (CASE WHEN (now() AT TIME ZONE 'America/New_York')::time
                                   >= nightly_local_time + make_interval(secs => (hashtext(gym_id::text) & 2147483647) % 3600)
                              THEN now() ELSE now() - interval '1 day' END) AT TIME ZONE 'America/New_York')::int AS slot_dow
FROM ironwod.integrations_wodify_connection WHERE tenant_id = 'abababab-abab-abab-abab-abababababab' \gset
UPDATE ironwod.integrations_wodify_connection SET reconcile_weekday = :slot_dow
 WHERE tenant_id = 'abababab-abab-abab-abab-abababababab';
SELECT ironwod_tick();
SELECT is(pg_temp.runs(), 'reconcile:queued', 'on the reconcile weekday the night''s run is the weekly reconciliation');

DELETE FROM ironwod.sync_runs WHERE tenant_id = 'abababab-abab-abab-abab-abababababab';
UPDATE ironwod.integrations_wodify_connection SET status = 'error', next_retry_at = now() + interval '1 hour'
 WHERE tenant_id = 'abababab-abab-abab-abab-abababababab';
SELECT is(ironwod_tick(), 0, 'an open breaker waits for next_retry_at');
UPDATE ironwod.integrations_wodify_connection SET next_retry_at = now() - interval '1 minute'
 WHERE tenant_id = 'abababab-abab-abab-abab-abababababab';
SELECT is(ironwod_tick(), 1, 'then the breaker retries');

DELETE FROM ironwod.sync_runs WHERE tenant_id = 'abababab-abab-abab-abab-abababababab';
UPDATE ironwod.integrations_wodify_connection SET status = 'error', next_retry_at = NULL
 WHERE tenant_id = 'abababab-abab-abab-abab-abababababab';
SELECT is(ironwod_tick(), 0, 'an auth error is never retried by the scheduler');

UPDATE ironwod.integrations_wodify_connection SET status = 'connected', backfill_completed_at = NULL
 WHERE tenant_id = 'abababab-abab-abab-abab-abababababab';
SELECT ironwod_tick();
SELECT is(pg_temp.runs(), 'backfill:queued', 'an unfinished backfill is continued');

DELETE FROM ironwod.sync_runs WHERE tenant_id = 'abababab-abab-abab-abab-abababababab';
UPDATE ironwod.integrations_wodify_connection SET status = 'disconnected', api_key_ciphertext = NULL
 WHERE tenant_id = 'abababab-abab-abab-abab-abababababab';
SELECT is(ironwod_tick(), 0, 'a disconnected gym gets nothing');

SELECT throws_ok($$SELECT ironwod_schedule()$$, '42704', 'pg_cron is not installed in this database',
                 'ironwod_schedule says clearly when pg_cron is missing');

SELECT * FROM finish();
ROLLBACK;
