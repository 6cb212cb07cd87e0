-- pgTAP: what an operator watches, without any worker: every alert of ironwod.alerts
-- forced and cleared, who sees which alerts, ironwod.endpoint_latency, the progress
-- of a running run and its ETA, pause and resume, the per-entity transformed
-- counts, and the structured LOG line of a finished run.
--
-- The same file runs on one node and on Citus (make test-citus), where a
-- transaction cannot read placements that another role wrote in it (25001).  So
-- the checks run in transactions of their own, each committed (pgTAP counts in
-- the session's temp tables; a ROLLBACK would lose its results), and within one
-- transaction only one role writes what another reads: the owner builds the
-- fixtures, the worker does a worker's steps, the app and the admin read.  What
-- that commits is the supervisor's to see, so:
--   - no fixture run is left 'queued' or 'running' at a commit (the supervisor
--     launches a queued run and fails a running one that has no live worker): a
--     run the worker goes on with in its next transaction is parked as
--     'succeeded' in between (pg_temp.park_run) and taken up again
--     (pg_temp.unpark_run), as its worker would hold it;
--   - the ironwod_tick checks park every other gym's connection, tick, note what
--     the tick did and roll back to a savepoint, so nothing of it is committed;
--   - the fixture tenants are deleted first (a run stopped half-way leaves them)
--     and last;
--   - times the checks compare across transactions are relative to one t0.
-- The scope is set with ironwod_set_scope (its SET LOCAL reaches the Citus
-- nodes); the alert thresholds are SET LOCAL as an operator would, in
-- transactions without a scope, where Citus sends nothing to the nodes: the view
-- reads them on the coordinator.  The app and the admin are the LOGIN roles
-- ironwod_test_app and ironwod_test_admin (Citus connects to the nodes as them).
-- (error: on Citus, creating a pg_temp function warns that it stays on this node)
SET client_min_messages = error;
\set ta 'a1a1a1a1-a1a1-a1a1-a1a1-a1a1a1a1a1a1'
\set ga 'a1a1a1a1-0000-0000-0000-000000000001'
\set tb 'b2b2b2b2-b2b2-b2b2-b2b2-b2b2b2b2b2b2'
\set gb 'b2b2b2b2-0000-0000-0000-000000000001'

-- Functions first: on Citus no function is created after a parallel write in the
-- same transaction.  The alert reads are dynamic SQL: Citus plans no statement
-- with parameters over the view's distributed tables (a SQL function's, or a
-- PL/pgSQL generic plan's).
CREATE FUNCTION pg_temp.alerts(p_tenant text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE v text;
BEGIN
    EXECUTE format('SELECT coalesce(string_agg(alert, %L ORDER BY alert), %L) FROM ironwod.alerts WHERE tenant_id = %L',
                   ',', '', p_tenant) INTO v;
    RETURN v;
END
$$;
CREATE FUNCTION pg_temp.detail(p_tenant text, p_alert text) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE v jsonb;
BEGIN
    EXECUTE format('SELECT detail FROM ironwod.alerts WHERE tenant_id = %L AND alert = %L', p_tenant, p_alert) INTO v;
    RETURN v;
END
$$;
CREATE FUNCTION pg_temp.a() RETURNS text LANGUAGE sql AS $$ SELECT pg_temp.alerts('a1a1a1a1-a1a1-a1a1-a1a1-a1a1a1a1a1a1') $$;
-- The worker's run, parked between its transactions and taken up again (as the
-- worker in the fixture gym's scope).
CREATE FUNCTION pg_temp.park_run(p_run bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE ironwod.sync_runs SET status = 'succeeded'
     WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym() AND run_id = p_run AND status = 'running';
END
$$;
CREATE FUNCTION pg_temp.unpark_run(p_run bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE ironwod.sync_runs SET status = 'running'
     WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym() AND run_id = p_run AND status = 'succeeded';
END
$$;
-- Every ironwod table's rows of the fixture tenants, referencing tables first.
CREATE FUNCTION pg_temp.forget_fixtures() RETURNS void LANGUAGE plpgsql AS $$
DECLARE t regclass;
BEGIN
    FOR t IN
        WITH RECURSIVE tabs AS (
            SELECT c.oid FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'ironwod'
            JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped
            WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
        ), deps (oid, depth) AS (
            SELECT oid, 0 FROM tabs
            UNION ALL
            SELECT f.conrelid, d.depth + 1 FROM deps d
            JOIN pg_constraint f ON f.contype = 'f' AND f.confrelid = d.oid AND f.conrelid <> d.oid
        )
        SELECT oid::regclass FROM deps WHERE oid IN (SELECT oid FROM tabs) GROUP BY oid ORDER BY max(depth) DESC, oid
    LOOP
        EXECUTE format('DELETE FROM %s WHERE tenant_id IN (%L, %L)', t,
                       'a1a1a1a1-a1a1-a1a1-a1a1-a1a1a1a1a1a1', 'b2b2b2b2-b2b2-b2b2-b2b2-b2b2b2b2b2b2');
    END LOOP;
END
$$;
SET client_min_messages = warning;
SELECT pg_temp.forget_fixtures();
REVOKE INSERT, DELETE ON ironwod.sync_runs FROM ironwod_test_app;
REVOKE USAGE ON SEQUENCE ironwod.sync_run_id_seq FROM ironwod_test_app;
SELECT now() AS t0 \gset

SELECT plan(75);

-- Two gyms of two tenants.
BEGIN;
INSERT INTO ironwod.integrations_wodify_connection
    (tenant_id, gym_id, status, api_key_ciphertext, time_zone, connected_at, last_success_at, backfill_completed_at,
     next_retry_at)
VALUES (:'ta', :'ga', 'connected', '\x00', 'UTC',
        :'t0'::timestamptz - interval '60 days', :'t0'::timestamptz - interval '1 hour',
        :'t0'::timestamptz - interval '50 days', NULL),
       (:'tb', :'gb', 'connected', '\x00', 'UTC',
        :'t0'::timestamptz - interval '60 days', :'t0'::timestamptz - interval '2 days',
        :'t0'::timestamptz - interval '50 days', :'t0'::timestamptz + interval '1 day');
SELECT is(pg_temp.a(), '', 'a healthy gym has no alert');
SELECT is(pg_temp.alerts(:'tb'), 'no_success_24h', 'a gym without a success for two days has');
COMMIT;

-- Who sees what: the app its own scope, admins every tenant.
UPDATE ironwod.integrations_wodify_connection SET last_success_at = :'t0'::timestamptz - interval '25 hours'
 WHERE tenant_id = :'ta';
BEGIN;
SELECT ironwod_set_scope(:'ta', :'ga');
SET LOCAL ROLE ironwod_test_app;
SELECT is((SELECT string_agg(DISTINCT tenant_id::text, ',') FROM ironwod.alerts),
          'a1a1a1a1-a1a1-a1a1-a1a1-a1a1a1a1a1a1', 'the app sees only its own gym''s alerts');
COMMIT;
-- (a transaction of its own: Citus sends SET LOCAL ROLE to the nodes in a scoped
-- transaction, where the app's connection may not become the admin)
BEGIN;
SET LOCAL ROLE ironwod_test_admin;
SELECT is((SELECT count(DISTINCT tenant_id) FROM ironwod.alerts
           WHERE tenant_id IN ('a1a1a1a1-a1a1-a1a1-a1a1-a1a1a1a1a1a1', 'b2b2b2b2-b2b2-b2b2-b2b2-b2b2b2b2b2b2')),
          2::bigint, 'an admin sees every tenant''s alerts');
COMMIT;

-- no_success_24h
BEGIN;
SELECT is(pg_temp.a(), 'no_success_24h', 'no_success_24h: 25 hours without a successful run');
SELECT is((SELECT since FROM ironwod.alerts WHERE tenant_id = :'ta'),
          :'t0'::timestamptz - interval '1 hour', 'no_success_24h: since the 24 hours ran out');
UPDATE ironwod.integrations_wodify_connection SET last_success_at = :'t0' WHERE tenant_id = :'ta';
SELECT is(pg_temp.a(), '', 'no_success_24h clears with a successful run');
COMMIT;

-- api_error_rate: failed attempts of the last 24 hours above ironwod.alert_error_rate.
BEGIN;
INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, status, started_at, finished_at,
                               attempts_2xx, attempts_429, attempts_5xx, attempts_network)
VALUES (:'ta', :'ga', 'incremental', 'succeeded', now() - interval '2 hours', now() - interval '1 hour', 10, 1, 3, 1);
SELECT is(pg_temp.a(), '', 'api_error_rate: 15 attempts are fewer than ironwod.alert_min_requests (20)');
SET LOCAL ironwod.alert_min_requests = 10;
SELECT is(pg_temp.a(), 'api_error_rate', 'api_error_rate: 5 of 15 attempts failed');
SELECT is(pg_temp.detail(:'ta', 'api_error_rate') - 'threshold',
          '{"failed": 5, "requests": 15, "error_rate": 0.3333,
            "attempts": {"2xx": 10, "429": 1, "4xx": 0, "5xx": 3, "network": 1, "envelope": 0}}'::jsonb,
          'api_error_rate: detail counts attempts by outcome');
INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, status, started_at, finished_at, attempts_2xx)
VALUES (:'ta', :'ga', 'incremental', 'succeeded', now() - interval '30 minutes', now() - interval '20 minutes', 200);
SELECT is(pg_temp.a(), '', 'api_error_rate clears when the share falls below 5%');
SET LOCAL ironwod.alert_error_rate = 0.02;
SELECT is(pg_temp.a(), 'api_error_rate', 'api_error_rate: the threshold is a GUC');
UPDATE ironwod.sync_runs SET finished_at = now() - interval '25 hours', started_at = now() - interval '26 hours'
 WHERE tenant_id = :'ta' AND attempts_5xx > 0;
SELECT is(pg_temp.a(), '', 'api_error_rate clears once the failures are older than 24 hours');
DELETE FROM ironwod.sync_runs WHERE tenant_id = :'ta';
COMMIT;

-- breaker_open
BEGIN;
UPDATE ironwod.integrations_wodify_connection
   SET status = 'error', consecutive_failures = 5, breaker_opened_at = now() - interval '10 minutes',
       next_retry_at = now() + interval '1 hour', last_error_code = 'retries_exhausted'
 WHERE tenant_id = :'ta';
SELECT is(pg_temp.a(), 'breaker_open', 'breaker_open: the circuit breaker is open');
SELECT is(pg_temp.detail(:'ta', 'breaker_open') ->> 'needs_new_key', 'false',
          'breaker_open: a breaker with a retry time does not need a new key');
UPDATE ironwod.integrations_wodify_connection
   SET status = 'connected', consecutive_failures = 0, breaker_opened_at = NULL, next_retry_at = NULL
 WHERE tenant_id = :'ta';
SELECT is(pg_temp.a(), '', 'breaker_open clears when the breaker closes');
COMMIT;

-- backfill_stalled: an unfinished backfill without a checkpoint or a landed page for
-- ironwod.alert_backfill_stall.
BEGIN;
UPDATE ironwod.integrations_wodify_connection SET backfill_completed_at = NULL WHERE tenant_id = :'ta';
INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, status, started_at, heartbeat_at, finished_at)
VALUES (:'ta', :'ga', 'backfill', 'failed', now() - interval '3 hours', now() - interval '2 hours', now() - interval '2 hours');
SELECT is(pg_temp.a(), 'backfill_stalled', 'backfill_stalled: no progress for two hours');
SET LOCAL ironwod.alert_backfill_stall = '3h';
SELECT is(pg_temp.a(), '', 'backfill_stalled: the stall time is a GUC');
COMMIT;
-- The branch of the view with outer joins (each unfinished backfill left-joined
-- to its checkpoints and its runs' heartbeats), read by the LOGIN roles under
-- row-level security: on Citus, with the RLS quals on every shard it reads.
BEGIN;
SELECT ironwod_set_scope(:'ta', :'ga');
SET LOCAL ROLE ironwod_test_app;
SELECT is((SELECT string_agg(alert, ',') FROM ironwod.alerts), 'backfill_stalled',
          'backfill_stalled: the app reads its gym''s alert');
COMMIT;
BEGIN;
SET LOCAL ROLE ironwod_test_admin;
SELECT is((SELECT string_agg(tenant_id || ' ' || alert, ',') FROM ironwod.alerts
           WHERE tenant_id IN ('a1a1a1a1-a1a1-a1a1-a1a1-a1a1a1a1a1a1', 'b2b2b2b2-b2b2-b2b2-b2b2-b2b2b2b2b2b2')
             AND alert = 'backfill_stalled'),
          'a1a1a1a1-a1a1-a1a1-a1a1-a1a1a1a1a1a1 backfill_stalled', 'backfill_stalled: and an admin');
COMMIT;
BEGIN;
INSERT INTO ironwod.backfill_checkpoints (tenant_id, gym_id, entity, window_key, pages, records, completed_by)
VALUES (:'ta', :'ga', 'invoices', '2025-01', 1, 0, 1);
SELECT is(pg_temp.a(), '', 'backfill_stalled clears with a new checkpoint');
DELETE FROM ironwod.backfill_checkpoints WHERE tenant_id = :'ta';
DELETE FROM ironwod.sync_runs WHERE tenant_id = :'ta';
UPDATE ironwod.integrations_wodify_connection SET backfill_completed_at = now() WHERE tenant_id = :'ta';
COMMIT;

-- not_entitled, cleared the way a worker clears it: a clean pull of the entity.
BEGIN;
INSERT INTO ironwod.entity_entitlements (tenant_id, gym_id, entity, last_checked_run)
VALUES (:'ta', :'ga', 'transactions', 0);
SELECT is(pg_temp.a(), 'not_entitled', 'not_entitled: the plan does not include an entity');
SELECT is(pg_temp.detail(:'ta', 'not_entitled'), '{"entities": ["transactions"]}',
          'not_entitled: detail names the entities');
COMMIT;
BEGIN;
SELECT ironwod_set_scope(:'ta', :'ga');
SET LOCAL ROLE ironwod_worker;
INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, status, started_at)
VALUES (:'ta', :'ga', 'reconcile', 'running', now()) RETURNING run_id AS run \gset
SELECT ironwod.close_entity(:run, 'transactions');
SELECT pg_temp.park_run(:run);
COMMIT;
BEGIN;
SELECT is(pg_temp.a(), '', 'not_entitled clears when the entity is pulled cleanly again');
DELETE FROM ironwod.sync_run_entities WHERE tenant_id = :'ta';
DELETE FROM ironwod.entity_cursors WHERE tenant_id = :'ta';
DELETE FROM ironwod.sync_runs WHERE tenant_id = :'ta';
COMMIT;

-- (the WARNINGs go to the server log; the client need not print them)
SET client_min_messages = error;
-- quarantined_records, forced the way a worker forces it: a page with a record
-- PostgreSQL cannot store lands the rest and quarantines that one, with a WARNING
-- that names the reasons and counts and nothing of the record; cleared the way a
-- worker clears it: the vendor's fixed record lands.
SELECT (pg_stat_file('server.log')).size AS log_from \gset
BEGIN;
SELECT ironwod_set_scope(:'ta', :'ga');
SET LOCAL ROLE ironwod_worker;
INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, status, started_at)
VALUES (:'ta', :'ga', 'incremental', 'running', now()) RETURNING run_id AS run \gset
SELECT ironwod.plan_entity(:run, 'programs');
SELECT results_eq(format($$SELECT outcome, n_records, n_new, n_quarantined
                    FROM ironwod.land_page(%s, 'programs', 'full', 1,
    '{"programs": [{"id": 1, "name": "CrossFit"}, {"id": 2, "name": "sekrit\u0000payload"}, {"id": 3}],
      "pagination": {"page": 1, "has_more": true}}', 1)$$, :run),
                  $$VALUES ('landed', 3, 2, 1)$$, 'quarantined_records: a NUL record is quarantined, its page lands');
SELECT pg_temp.park_run(:run);
COMMIT;
BEGIN;
SELECT is(pg_temp.a(), 'quarantined_records', 'quarantined_records: the gym has a quarantined record');
SELECT is(pg_temp.detail(:'ta', 'quarantined_records') - 'last_seen_at',
          '{"records": 1, "entities": {"programs": 1}, "reasons": {"nul": 1}}'::jsonb,
          'quarantined_records: detail counts the records by entity and reason');
CREATE TEMP TABLE warned AS
SELECT l FROM regexp_split_to_table(pg_read_file('server.log', :log_from, (pg_stat_file('server.log')).size - :log_from),
                                    E'\n') AS l;
SELECT is((SELECT count(*) FROM warned
           WHERE l LIKE '%WARNING:  ironwod run ' || :run || ': 1 record(s) of programs quarantined (nul 1)'),
          1::bigint, 'quarantined_records: one WARNING with the run, the entity and the reasons');
SELECT is((SELECT count(*) FROM warned WHERE l ~ '(WARNING|DETAIL|HINT):  ' AND l LIKE '%sekrit%'), 0::bigint,
          'quarantined_records: nothing of the record''s content in the WARNING');
COMMIT;
BEGIN;
SELECT ironwod_set_scope(:'ta', :'ga');
SET LOCAL ROLE ironwod_worker;
SELECT pg_temp.unpark_run(:run);
SELECT results_eq(format($$SELECT outcome, n_quarantined FROM ironwod.land_page(%s, 'programs', 'full', 2,
    '{"programs": [{"id": 2, "name": "fixed"}], "pagination": {"page": 2, "has_more": true}}', 1)$$, :run),
                  $$VALUES ('landed', 0)$$, 'quarantined_records: the vendor''s fixed record lands');
SELECT pg_temp.park_run(:run);
COMMIT;
BEGIN;
SELECT is(pg_temp.a(), '', 'quarantined_records clears when the fixed record lands');
SELECT results_eq(format($$SELECT pulled, new_versions, unchanged, quarantined FROM ironwod.sync_run_entities
                    WHERE tenant_id = %L AND gym_id = %L AND run_id = %s AND entity = 'programs'$$, :'ta', :'ga', :run),
                  $$VALUES (4, 3, 0, 1)$$, 'the run counts the quarantined record per entity');
DELETE FROM ironwod.sync_runs WHERE tenant_id = :'ta';
COMMIT;
SET client_min_messages = warning;

-- cancellation_spike: this month's cancellations against the trailing three-month
-- mean, from the metrics cache (rows built with every other figure zero: plain
-- INSERTs of every numeric column as 0 and every boolean as false).
BEGIN;
SELECT format('INSERT INTO ironwod.gym_monthly_metrics_cache (tenant_id, gym_id, location_key, program_key, month_start, '
              'time_zone, history_start_date, computed_at, definitions_version, config_hash, churned_members, %s) '
              'VALUES (%L, %L, ''ALL'', ''ALL'', %L, ''UTC'', ''2020-01-01'', now(), ''test'', ''test'', %s, %s)',
              z.cols, :'ta', :'ga', (date_trunc('month', now() AT TIME ZONE 'UTC') - make_interval(months => x.m))::date,
              x.c, z.vals)
FROM (SELECT string_agg(quote_ident(column_name), ', ' ORDER BY ordinal_position) AS cols,
             string_agg(CASE WHEN data_type = 'boolean' THEN 'false' ELSE '0' END, ', ' ORDER BY ordinal_position) AS vals
      FROM information_schema.columns
      WHERE table_schema = 'ironwod' AND table_name = 'gym_monthly_metrics_cache'
        AND data_type IN ('integer', 'numeric', 'bigint', 'boolean') AND column_name <> 'churned_members') z,
     (VALUES (3, 2), (2, 3), (1, 4), (0, 7)) AS x(m, c)
\gexec
SELECT is(pg_temp.a(), 'cancellation_spike', 'cancellation_spike: 7 cancellations against a trailing mean of 3');
SELECT is(pg_temp.detail(:'ta', 'cancellation_spike') - 'month',
          '{"cancellations": 7, "trailing_3_month_mean": 3.00, "factor": 2}'::jsonb,
          'cancellation_spike: detail gives the month''s count and the baseline');
SET LOCAL ironwod.alert_min_events = 8;
SELECT is(pg_temp.a(), '', 'cancellation_spike: fewer than ironwod.alert_min_events cancellations never alert');
RESET ironwod.alert_min_events;
UPDATE ironwod.gym_monthly_metrics_cache SET churned_members = 6
 WHERE tenant_id = :'ta' AND gym_id = :'ga'
   AND month_start = date_trunc('month', now() AT TIME ZONE 'UTC')::date;
SELECT is(pg_temp.a(), '', 'cancellation_spike clears at twice the mean (ironwod.alert_cancellation_factor)');
DELETE FROM ironwod.gym_monthly_metrics_cache WHERE tenant_id = :'ta';
COMMIT;

-- attendance_drop: the last 7 days' visits against the trailing four weeks' weekly
-- mean, up to the last successful sync.
BEGIN;
UPDATE ironwod.integrations_wodify_connection SET last_success_at = now() WHERE tenant_id = :'ta';
INSERT INTO ironwod.attendance_events (tenant_id, gym_id, signin_id, class_start_at, raw_id)
SELECT :'ta', :'ga', i, now() - interval '8 days' - make_interval(hours => i * 12), i
FROM generate_series(1, 40) i;                      -- 10 a week in the four weeks before
INSERT INTO ironwod.attendance_events (tenant_id, gym_id, signin_id, class_start_at, raw_id)
SELECT :'ta', :'ga', 100 + i, now() - make_interval(hours => i * 20), 100 + i
FROM generate_series(1, 4) i;                       -- 4 in the last 7 days
SELECT is(pg_temp.a(), 'attendance_drop', 'attendance_drop: 4 visits in 7 days against 10 a week');
SELECT is(pg_temp.detail(:'ta', 'attendance_drop') - 'until',
          '{"visits_last_7_days": 4, "trailing_weekly_mean": 10.00, "factor": 0.5}'::jsonb,
          'attendance_drop: detail gives the week and the baseline');
INSERT INTO ironwod.attendance_events (tenant_id, gym_id, signin_id, class_start_at, raw_id)
SELECT :'ta', :'ga', 200 + i, now() - make_interval(hours => i), 200 + i
FROM generate_series(1, 2) i;
SELECT is(pg_temp.a(), '', 'attendance_drop clears at half the weekly mean (ironwod.alert_attendance_factor)');
UPDATE ironwod.attendance_events SET deleted_at = now()
 WHERE tenant_id = :'ta' AND gym_id = :'ga' AND signin_id > 200;
SELECT is(pg_temp.a(), 'attendance_drop', 'attendance_drop: soft-deleted visits do not count');
DELETE FROM ironwod.attendance_events WHERE tenant_id = :'ta';
COMMIT;

-- A paused gym raises nothing.
BEGIN;
UPDATE ironwod.integrations_wodify_connection SET status = 'paused', last_success_at = now() - interval '3 days'
 WHERE tenant_id = :'ta';
SELECT is(pg_temp.a(), '', 'a paused gym raises no alert');
UPDATE ironwod.integrations_wodify_connection SET status = 'connected', last_success_at = now()
 WHERE tenant_id = :'ta';
COMMIT;

-- endpoint_latency: quantiles per endpoint from the per-run histograms.
SELECT is(ironwod.histogram_quantile('{0,10,0,0,0,0,0,0}', 0.5), 75::float8, 'median inside the 50-100 ms bucket');
SELECT is(ironwod.histogram_quantile('{90,0,0,0,0,0,0,10}', 0.95), 5000::float8, 'a quantile in the open bucket is its lower bound');
SELECT is(ironwod.histogram_quantile('{0,0,0,0,0,0,0,0}', 0.5), NULL, 'no samples, no quantile');
BEGIN;
INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, status, started_at, finished_at)
VALUES (:'ta', :'ga', 'incremental', 'succeeded', :'t0'::timestamptz - interval '2 hours', :'t0'::timestamptz - interval '1 hour')
RETURNING run_id AS run \gset
INSERT INTO ironwod.sync_run_entities (tenant_id, gym_id, run_id, entity, pages, attempts_2xx, attempts_5xx,
                                       latency_hist, latency_ms)
VALUES (:'ta', :'ga', :run, 'clients', 10, 10, 2, '{0,10,0,0,0,0,0,0}', 750);
INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, status, started_at, finished_at)
VALUES (:'ta', :'ga', 'incremental', 'succeeded', :'t0'::timestamptz - interval '3 days 1 hour', :'t0'::timestamptz - interval '3 days')
RETURNING run_id AS run \gset
INSERT INTO ironwod.sync_run_entities (tenant_id, gym_id, run_id, entity, pages, attempts_2xx,
                                       latency_hist, latency_ms)
VALUES (:'ta', :'ga', :run, 'clients', 10, 10, '{0,0,0,0,10,0,0,0}', 7500);
SELECT results_eq(
    $$SELECT period, endpoint, requests, failed, samples, mean_ms, p50_ms, p95_ms, p99_ms FROM ironwod.endpoint_latency
      WHERE tenant_id = 'a1a1a1a1-a1a1-a1a1-a1a1-a1a1a1a1a1a1' ORDER BY period$$,
    $$VALUES ('24h', '/clients', 12::bigint, 2::bigint, 10::bigint, 75.0, 75.0, 97.5, 99.5),
             ('7d', '/clients', 22::bigint, 2::bigint, 20::bigint, 412.5, 100.0, 950.0, 990.0)$$,
    'endpoint_latency: 24 hours hold the recent run, 7 days both');
COMMIT;
BEGIN;
SELECT ironwod_set_scope(:'ta', :'ga');
SET LOCAL ROLE ironwod_test_app;
SELECT results_eq(
    $$SELECT period, samples, p50_ms FROM ironwod.endpoint_latency WHERE tenant_id IS NULL AND entity = 'clients' ORDER BY period$$,
    $$VALUES ('24h', 10::bigint, 75.0), ('7d', 20::bigint, 100.0)$$,
    'endpoint_latency: the all-gyms rows add up what the caller may see');
COMMIT;
DELETE FROM ironwod.sync_run_entities WHERE tenant_id = :'ta';
DELETE FROM ironwod.sync_runs WHERE tenant_id = :'ta';

-- run_progress: a backfill whose first three entities are done and whose fourth is
-- under way, 100 seconds and 50 requests in.  (The run is gone at the commit.)
BEGIN;
SELECT ironwod_set_scope(:'ta', :'ga');
INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, status, phase, started_at, heartbeat_at, attempts_2xx)
VALUES (:'ta', :'ga', 'backfill', 'running', 'land', now() - interval '100 seconds', now(), 50)
RETURNING run_id AS run \gset
INSERT INTO ironwod.sync_run_entities (tenant_id, gym_id, run_id, entity, status, units_total, units_done, pages, pulled)
SELECT :'ta', :'ga', :run, e, s, t, d, p, n
FROM (VALUES ('locations', 'completed', 1, 1, 1, 2), ('programs', 'completed', 1, 1, 1, 5),
             ('clients', 'completed', 1, 1, 4, 300), ('memberships', 'running', 1, 0, 2, 200)) AS x(e, s, t, d, p, n)
ON CONFLICT DO NOTHING;  -- an INSERT ... SELECT, not the COPY Citus would make of it
SELECT results_eq(
    $$SELECT current_entity, entities_done, entities_total, units_done, units_total, fully_planned,
             records_landed, requests, requests_remaining, rate, eta
      FROM ironwod.run_progress WHERE tenant_id = 'a1a1a1a1-a1a1-a1a1-a1a1-a1a1a1a1a1a1'$$,
    format($$VALUES ('memberships', 3::bigint, 8::bigint, 3::bigint, %s::bigint, false, 507::bigint, 50, %s::bigint,
                     0.50, make_interval(secs => %s))$$,
           4 + 1 + 300 + 2 * (current_setting('ironwod.backfill_months')::int + 1),
           1 + 1 + 300 + 2 * (current_setting('ironwod.backfill_months')::int + 1),
           2 * (1 + 1 + 300 + 2 * (current_setting('ironwod.backfill_months')::int + 1))),
    'run_progress: units expected from the strategies, sign-ins one per client, ETA at the run''s own pace');
-- Once sign-ins are planned (120 of the 300 clients), they count as planned.
INSERT INTO ironwod.sync_run_entities (tenant_id, gym_id, run_id, entity, status, units_total)
VALUES (:'ta', :'ga', :run, 'class_signins', 'running', 120);
SELECT is((SELECT units_total FROM ironwod.run_progress WHERE tenant_id = :'ta'),
          (4 + 1 + 120 + 2 * (current_setting('ironwod.backfill_months')::int + 1))::bigint,
          'run_progress: a planned entity counts its planned units');
SELECT is((SELECT (progress ->> 'units_done')::int FROM ironwod_status(:'ta', :'ga')),
          3, 'ironwod_status shows the active run''s progress');
DELETE FROM ironwod.sync_run_entities WHERE tenant_id = :'ta';
DELETE FROM ironwod.sync_runs WHERE tenant_id = :'ta';
COMMIT;
-- The app's own view of a running run: the app writes the run itself, reads, and
-- deletes it in one transaction (so no other role's writes are in it, and no
-- running run is committed), with INSERT and DELETE granted for this check only.
GRANT INSERT, DELETE ON ironwod.sync_runs TO ironwod_test_app;
GRANT USAGE ON SEQUENCE ironwod.sync_run_id_seq TO ironwod_test_app;
BEGIN;
SELECT ironwod_set_scope(:'ta', :'ga');
SET LOCAL ROLE ironwod_test_app;
INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, status, phase, started_at, heartbeat_at, attempts_2xx)
VALUES (:'ta', :'ga', 'backfill', 'running', 'land', now() - interval '100 seconds', now(), 50);
SELECT is((SELECT count(*) FROM ironwod.run_progress), 1::bigint, 'the app sees its own run''s progress');
SELECT ok(ironwod.connection_rate(:'ta', :'ga') > 0, 'the app may ask its own connection''s rate');
SELECT is(ironwod.connection_rate(:'tb', :'gb'), NULL, 'but not another tenant''s');
DELETE FROM ironwod.sync_runs WHERE tenant_id = :'ta';
COMMIT;
REVOKE INSERT, DELETE ON ironwod.sync_runs FROM ironwod_test_app;
REVOKE USAGE ON SEQUENCE ironwod.sync_run_id_seq FROM ironwod_test_app;

-- Pause and resume.  The app pauses its own gym: the running run is cancelled (its
-- worker stops at the next page), ticks skip it, ironwod_sync refuses.  (The
-- owner's fixture run and the app's calls share a transaction: the API functions
-- are SECURITY DEFINER, so their statements run as the owner.  The role is SET
-- for the session, not LOCAL: Citus would send a SET LOCAL ROLE to the owner's
-- open connections to the nodes, which those statements use.)
BEGIN;
SELECT ironwod_set_scope(:'ta', :'ga');
UPDATE ironwod.integrations_wodify_connection SET backfill_completed_at = NULL WHERE tenant_id = :'ta';
INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, status, phase, started_at, heartbeat_at, attempts_2xx)
VALUES (:'ta', :'ga', 'backfill', 'running', 'land', now() - interval '100 seconds', now(), 50)
RETURNING run_id AS run \gset
SET ROLE ironwod_test_app;
SELECT is(ironwod_pause(:'ta', :'ga'), 'paused', 'ironwod_pause pauses the gym');
SELECT is(ironwod_pause(:'ta', :'ga'), 'paused', 'pausing twice is harmless');
SELECT throws_ok($$SELECT ironwod_sync('a1a1a1a1-a1a1-a1a1-a1a1-a1a1a1a1a1a1', 'a1a1a1a1-0000-0000-0000-000000000001')$$,
                 '55000', 'gym a1a1a1a1-0000-0000-0000-000000000001 is paused', 'ironwod_sync refuses a paused gym');
SELECT throws_ok($$SELECT ironwod_pause('b2b2b2b2-b2b2-b2b2-b2b2-b2b2b2b2b2b2', 'b2b2b2b2-0000-0000-0000-000000000001')$$,
                 '42501', NULL, 'the app cannot pause another tenant''s gym');
RESET ROLE;
SELECT results_eq(format($$SELECT status, last_error, finished_at IS NOT NULL FROM ironwod.sync_runs
                           WHERE tenant_id = %L AND gym_id = %L AND run_id = %s$$, :'ta', :'ga', :run),
                  $$VALUES ('cancelled', 'paused', true)$$, 'the running run is cancelled');
COMMIT;
BEGIN;
SELECT ironwod_set_scope(:'ta', :'ga');
SET LOCAL ROLE ironwod_worker;
SELECT throws_ok(format($$SELECT * FROM ironwod.land_page(%s, 'memberships', 'full', 3, '{"memberships": []}', 1)$$, :run),
                 '55000', NULL, 'its worker stops at the next page');
COMMIT;
-- Every other gym's connection parked for the tick, and the parking undone.
BEGIN;
SELECT ironwod_set_scope(:'ta', :'ga');
SAVEPOINT tick;
UPDATE ironwod.integrations_wodify_connection SET next_retry_at = :'t0'::timestamptz + interval '1 day'
 WHERE tenant_id <> :'ta';
SELECT ironwod_tick() AS ticked \gset
ROLLBACK TO SAVEPOINT tick;
SELECT is(:ticked, 0, 'ironwod_tick skips a paused gym');
COMMIT;
-- A run queued by a call that raced the pause is cancelled when a worker claims it.
BEGIN;
SELECT ironwod_set_scope(:'ta', :'ga');
SET LOCAL ROLE ironwod_worker;
INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode) VALUES (:'ta', :'ga', 'backfill') RETURNING run_id AS run \gset
SELECT is_empty(format($$SELECT * FROM ironwod.claim_run(%s, 1)$$, :run),
                'a worker does not start a paused gym''s run');
COMMIT;
BEGIN;
SELECT ironwod_set_scope(:'ta', :'ga');
-- (These subqueries name no tenant: Citus would send a statement that names one
-- whole to its shard, pgTAP's is() with it.)
SELECT is((SELECT status FROM ironwod.sync_runs WHERE run_id = :run), 'cancelled',
          'it cancels it instead');
SET ROLE ironwod_test_app;
SELECT is(ironwod_resume(:'ta', :'ga'), 'connected', 'ironwod_resume restores the connection');
RESET ROLE;
SELECT is((SELECT paused_at FROM ironwod.integrations_wodify_connection WHERE gym_id = :'ga'), NULL,
          'and clears the pause');
SAVEPOINT tick;
UPDATE ironwod.integrations_wodify_connection SET next_retry_at = :'t0'::timestamptz + interval '1 day'
 WHERE tenant_id <> :'ta';
SELECT ironwod_tick() AS ticked \gset
SELECT coalesce(string_agg(mode, ','), '') AS queued FROM ironwod.sync_runs
 WHERE tenant_id = :'ta' AND gym_id = :'ga' AND status = 'queued' \gset
ROLLBACK TO SAVEPOINT tick;
SELECT is(:ticked, 1, 'the schedule takes over again');
SELECT is(:'queued'::text, 'backfill', 'with the rest of the unfinished backfill');
UPDATE ironwod.integrations_wodify_connection SET breaker_opened_at = now(), status = 'error'
 WHERE tenant_id = :'ta';
SELECT ironwod_pause(:'ta', :'ga');
SELECT is(ironwod_resume(:'ta', :'ga'), 'error', 'a gym paused with its breaker open resumes in error');
UPDATE ironwod.integrations_wodify_connection SET status = 'pending', breaker_opened_at = NULL
 WHERE tenant_id = :'ta';
SELECT throws_ok($$SELECT ironwod_pause('a1a1a1a1-a1a1-a1a1-a1a1-a1a1a1a1a1a1', 'a1a1a1a1-0000-0000-0000-000000000001')$$,
                 '55000', NULL, 'a gym whose key is not validated yet cannot be paused');
UPDATE ironwod.integrations_wodify_connection SET status = 'connected', backfill_completed_at = now()
 WHERE tenant_id = :'ta';
COMMIT;

-- transformed per entity, and the LOG line of a finished run.
BEGIN;
SELECT ironwod_set_scope(:'ta', :'ga');
SET LOCAL ROLE ironwod_worker;
INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, status, started_at)
VALUES (:'ta', :'ga', 'incremental', 'running', now() - interval '5 seconds') RETURNING run_id AS run \gset
SELECT ironwod.plan_entity(:run, 'locations');
SELECT outcome FROM ironwod.land_page(:run, 'locations', 'full', 1,
    '{"locations": [{"id": 1, "name": "Main", "time_zone_iana": "UTC"}, {"id": 2, "name": "Annex"}],
      "pagination": {"page": 1, "page_size": 100, "has_more": false}}', 1);
SELECT ironwod.transform_step(:run);
SELECT pg_temp.park_run(:run);
COMMIT;
SELECT is((SELECT transformed FROM ironwod.sync_run_entities WHERE run_id = :run AND entity = 'locations'), 2,
          'transform_step records the canonical rows written per entity');
-- The failing page's attempts are written down with the failure: a 503 and two
-- resets, two retries, 1.5 s waiting for tokens and 2.5 s of backoff.
BEGIN;
SELECT ironwod_set_scope(:'ta', :'ga');
SET LOCAL ROLE ironwod_worker;
SELECT pg_temp.unpark_run(:run);
SELECT throws_ok(format($$SELECT ironwod.add_attempts(%s, 'clients', '{1,2}')$$, :run),
                 '22023', NULL, 'attempt counters come in one fixed layout');
SELECT ironwod.add_attempts(:run, 'clients', '{0,0,0,1,2,0,2,100,1500000,2500000}');
SELECT pg_temp.park_run(:run);
COMMIT;
SELECT results_eq(format($$SELECT requests, attempts_5xx, attempts_network, retries, token_wait_s, backoff_s
                           FROM ironwod.sync_run_entities
                           WHERE tenant_id = %L AND gym_id = %L AND run_id = %s AND entity = 'clients'$$, :'ta', :'ga', :run),
                  $$VALUES (3, 1, 2, 2, 1.5::float8, 2.5::float8)$$,
                  'an entity''s requests are the sum of its attempts by outcome');
SELECT (pg_stat_file('server.log')).size AS log_from \gset
BEGIN;
SELECT ironwod_set_scope(:'ta', :'ga');
SET LOCAL ROLE ironwod_worker;
SELECT pg_temp.unpark_run(:run);
SELECT ironwod.fail_run(:run, 'http', 'HTTP 503 on clients', 'fetch');
COMMIT;
BEGIN;
SELECT results_eq(format($$SELECT requests, attempts_2xx, attempts_5xx, attempts_network, retries, bytes_received
                           FROM ironwod.sync_runs WHERE tenant_id = %L AND gym_id = %L AND run_id = %s$$, :'ta', :'ga', :run),
                  $$VALUES (4, 1, 1, 2, 2, 100::bigint)$$,
                  'a run''s counters are the sums of its entities''');
CREATE TEMP TABLE logged AS
SELECT substring(l FROM 'LOG:  (\{.*\})$')::jsonb AS j, l
FROM regexp_split_to_table(pg_read_file('server.log', :log_from, (pg_stat_file('server.log')).size - :log_from),
                           E'\n') AS l
WHERE l ~ '\] LOG:  \{' AND l LIKE '%"ironwod.run.finished"%';
SELECT is((SELECT count(*) FROM logged), 1::bigint, 'a finished run writes one LOG line');
SELECT is((SELECT j - 'started_at' - 'finished_at' - 'duration_s' - 'requested_by' FROM logged),
          jsonb_build_object('event', 'ironwod.run.finished', 'run_id', :run,
                             'tenant_id', 'a1a1a1a1-a1a1-a1a1-a1a1-a1a1a1a1a1a1',
                             'gym_id', 'a1a1a1a1-0000-0000-0000-000000000001', 'mode', 'incremental',
                             'status', 'failed', 'error_code', 'http', 'failed_phase', 'fetch',
                             'requests', 4, 'retries', 2,
                             'attempts', '{"2xx": 1, "429": 0, "4xx": 0, "5xx": 1, "network": 2, "envelope": 0}'::jsonb,
                             'token_wait_s', 1.5, 'backoff_s', 2.5, 'bytes_received', 100,
                             'entities', '{"clients": {"requests": 3, "pages": 0, "pulled": 0, "new": 0,
                                                       "unchanged": 0, "transformed": 0, "deleted": 0,
                                                       "quarantined": 0},
                                           "locations": {"requests": 1, "pages": 1, "pulled": 2, "new": 2,
                                           "unchanged": 0, "transformed": 2, "deleted": 0,
                                           "quarantined": 0}}'::jsonb),
          'the LOG line is JSON with ids, mode, status and counts, and no error text');
SELECT ok((SELECT (j ->> 'duration_s')::numeric >= 5 FROM logged), 'and the run''s duration');
SELECT is_empty(format($$SELECT 1 FROM regexp_split_to_table(pg_read_file('server.log', %s,
                        (pg_stat_file('server.log')).size - %s), E'\n') l
                  WHERE l ~ 'CONTEXT: .*log_(run|line)'$$, :log_from, :log_from),
                'with no CONTEXT lines of its own');
COMMIT;

SELECT * FROM finish();
SELECT pg_temp.forget_fixtures();
