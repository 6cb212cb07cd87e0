-- 88_operations: what an operator watches.  The alerts, the latency per endpoint
-- over time and the progress of running runs, as security_invoker views (RLS
-- decides: an app session sees its own gym, ironwod_admin every tenant), and the
-- structured LOG line of every finished run.  Alert thresholds are the
-- user-settable GUCs ironwod.alert_*, read once per query.  This module comes
-- after the canonical tables and the metrics cache, which the product alerts read.

-- The attendance_drop alert counts a gym's visits of the last five weeks.
CREATE INDEX attendance_events_by_start ON ironwod.attendance_events (tenant_id, gym_id, class_start_at);

CREATE FUNCTION ironwod.connection_rate(p_tenant_id uuid, p_gym_id uuid) RETURNS double precision
LANGUAGE c STABLE STRICT AS 'MODULE_PATHNAME', 'ironwod_connection_rate';
COMMENT ON FUNCTION ironwod.connection_rate(uuid, uuid) IS 'Requests/s the connection can send now: its token bucket''s rate after 429 adaptation (the configured rate before its first run), at most its share of the cluster bucket; NULL outside the caller''s scope unless the caller is an ironwod_admin';

CREATE FUNCTION ironwod.log_line(p_line text) RETURNS void
LANGUAGE c VOLATILE STRICT AS 'MODULE_PATHNAME', 'ironwod_log_line';
COMMENT ON FUNCTION ironwod.log_line(text) IS 'Write one server LOG line holding exactly this text (no CONTEXT or STATEMENT lines)';

-- The counters of a run, as one JSON document: the LOG line of a finished run.
-- Only ids, timestamps and counts: the sanitized error text stays in the run row.
-- json rather than jsonb keeps the keys in this order, for people reading the log.
CREATE FUNCTION ironwod.run_summary(p_tenant_id uuid, p_gym_id uuid, p_run_id bigint) RETURNS json
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_entities json;
    v_out json;
BEGIN
    SELECT coalesce(json_object_agg(s.entity, json_build_object(
               'requests', s.requests, 'pages', s.pages, 'pulled', s.pulled, 'new', s.new_versions,
               'unchanged', s.unchanged, 'transformed', s.transformed, 'deleted', s.deleted,
               'quarantined', s.quarantined)
               ORDER BY s.entity), '{}')
    INTO v_entities
    FROM ironwod.sync_run_entities s
    WHERE s.tenant_id = p_tenant_id AND s.gym_id = p_gym_id AND s.run_id = p_run_id;

    SELECT json_build_object(
               'event', 'ironwod.run.finished', 'run_id', r.run_id, 'tenant_id', r.tenant_id,
               'gym_id', r.gym_id, 'mode', r.mode, 'status', r.status, 'error_code', r.error_code,
               'failed_phase', r.failed_phase, 'requested_by', r.requested_by,
               'started_at', r.started_at, 'finished_at', r.finished_at,
               'duration_s', round(extract(epoch FROM r.finished_at - r.started_at)::numeric, 3),
               'requests', r.requests, 'retries', r.retries,
               'attempts', json_build_object('2xx', r.attempts_2xx, '429', r.attempts_429,
                                              '4xx', r.attempts_4xx, '5xx', r.attempts_5xx,
                                              'network', r.attempts_network, 'envelope', r.attempts_envelope),
               'token_wait_s', round(r.token_wait_s::numeric, 3), 'backoff_s', round(r.backoff_s::numeric, 3),
               'bytes_received', r.bytes_received, 'entities', v_entities)
    INTO v_out
    FROM ironwod.sync_runs r
    WHERE r.tenant_id = p_tenant_id AND r.gym_id = p_gym_id AND r.run_id = p_run_id;
    RETURN v_out;
END
$$;
COMMENT ON FUNCTION ironwod.run_summary(uuid, uuid, bigint) IS 'A run''s ids, mode, status, timings and counters (per run and per entity) as one JSON document; no error text, no secrets';

CREATE FUNCTION ironwod.log_run(p_tenant_id uuid, p_gym_id uuid, p_run_id bigint) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_summary json := ironwod.run_summary(p_tenant_id, p_gym_id, p_run_id);
BEGIN
    IF v_summary IS NOT NULL THEN
        PERFORM ironwod.log_line(v_summary::text);
    END IF;
END
$$;
COMMENT ON FUNCTION ironwod.log_run(uuid, uuid, bigint) IS 'Write the structured LOG line of a finished run (ironwod.run_summary as one JSON line)';

-- The worker's transform step: ironwod.transform_run, then its rows written per
-- entity recorded as the run's transformed counts.  The rows' tenant, gym and
-- run come from the run's row, and the entities are read from the registry
-- first: Citus runs the INSERT ... SELECT on the tenant's shard only when the
-- tenant it writes is read from a distributed table and nothing in it is a
-- reference table (joined to one, it planned a task for every shard); with
-- the values as constants it pulled the rows to the coordinator.
CREATE FUNCTION ironwod.transform_step(p_run_id bigint) RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_written jsonb := ironwod.transform_run(p_run_id);
    v_entities text[];
BEGIN
    v_entities := ARRAY(SELECT e.entity FROM ironwod.entities e
                        WHERE jsonb_typeof(v_written -> e.entity) = 'number'
                          AND (v_written ->> e.entity)::integer > 0);
    INSERT INTO ironwod.sync_run_entities AS s (tenant_id, gym_id, run_id, entity, transformed)
    SELECT r.tenant_id, r.gym_id, r.run_id, x.entity, (v_written ->> x.entity)::integer
    FROM ironwod.sync_runs r, unnest(v_entities) AS x(entity)
    WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id = p_run_id
    ON CONFLICT (tenant_id, gym_id, run_id, entity) DO UPDATE SET transformed = excluded.transformed;
    RETURN v_written;
END
$$;
COMMENT ON FUNCTION ironwod.transform_step(bigint) IS 'Worker: transform the run (ironwod.transform_run) and record the canonical rows written per entity in sync_run_entities.transformed';

-- A quantile of a latency histogram (buckets of ironwod.latency_buckets()),
-- interpolated linearly inside its bucket; a quantile in the open last bucket
-- is reported as that bucket's lower bound (5000 ms: "at least").
CREATE FUNCTION ironwod.histogram_quantile(p_hist bigint[], p_q double precision) RETURNS double precision
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    WITH b AS (
        SELECT h.i, h.n, sum(h.n) OVER (ORDER BY h.i) AS cum, sum(h.n) OVER () AS total,
               coalesce((ironwod.latency_buckets())[h.i - 1], 0) AS lo, (ironwod.latency_buckets())[h.i] AS hi
        FROM unnest(p_hist) WITH ORDINALITY AS h(n, i)
    )
    SELECT CASE WHEN b.hi IS NULL THEN b.lo
                ELSE b.lo + (b.hi - b.lo) * (p_q * b.total - (b.cum - b.n)) / b.n END
    FROM b
    WHERE b.n > 0 AND b.cum >= p_q * b.total
    ORDER BY b.i LIMIT 1
$$;
COMMENT ON FUNCTION ironwod.histogram_quantile(bigint[], double precision) IS 'Quantile q of a latency histogram in ms, interpolated inside its bucket; NULL for an empty histogram';

-- ---------------------------------------------------------------------------------
-- Alerts
-- ---------------------------------------------------------------------------------

-- One row per active alert.  Paused and disconnected gyms raise none: an operator
-- chose to stop them.  Every branch is one set-based statement over the ledgers
-- (connections, runs, checkpoints, entitlements) or the metrics (cache, canonical
-- attendance), grouped by (tenant_id, gym_id).  The thresholds are read once, in
-- a MATERIALIZED CTE: on Citus that runs on the coordinator, in the caller's
-- session, where current_setting() in the branches would run on the nodes and
-- read their settings (a SET in the caller's session never reaches them).
CREATE VIEW ironwod.alerts WITH (security_invoker = true) AS
WITH thresholds AS MATERIALIZED (
    SELECT current_setting('ironwod.alert_error_rate')::float8 AS error_rate,
           current_setting('ironwod.alert_min_requests')::int AS min_requests,
           current_setting('ironwod.alert_backfill_stall') AS backfill_stall,
           current_setting('ironwod.alert_min_events')::int AS min_events,
           current_setting('ironwod.alert_cancellation_factor')::float8 AS cancellation_factor,
           current_setting('ironwod.alert_attendance_factor')::float8 AS attendance_factor
), conn AS (
    SELECT c.tenant_id, c.gym_id, c.status, c.connected_at, c.last_success_at, c.last_error_code,
           c.last_error, c.consecutive_failures, c.breaker_opened_at, c.next_retry_at,
           c.backfill_completed_at, c.time_zone
    FROM ironwod.integrations_wodify_connection c
    WHERE c.status IN ('connected', 'error')
), attempts AS (
    SELECT r.tenant_id, r.gym_id, min(r.started_at) AS first_at,
           sum(r.requests) AS requests,
           sum(r.attempts_429 + r.attempts_4xx + r.attempts_5xx + r.attempts_network + r.attempts_envelope)
               AS failed,
           jsonb_build_object('2xx', sum(r.attempts_2xx), '429', sum(r.attempts_429),
                              '4xx', sum(r.attempts_4xx), '5xx', sum(r.attempts_5xx),
                              'network', sum(r.attempts_network), 'envelope', sum(r.attempts_envelope)) AS by_outcome
    FROM ironwod.sync_runs r
    WHERE r.finished_at >= now() - interval '24 hours'
       OR (r.finished_at IS NULL AND r.status = 'running')
    GROUP BY r.tenant_id, r.gym_id
), checkpoints AS (
    SELECT b.tenant_id, b.gym_id, max(b.completed_at) AS at
    FROM ironwod.backfill_checkpoints b
    GROUP BY b.tenant_id, b.gym_id
), heartbeats AS (
    SELECT r.tenant_id, r.gym_id, max(r.heartbeat_at) AS at
    FROM ironwod.sync_runs r
    WHERE r.mode = 'backfill'
    GROUP BY r.tenant_id, r.gym_id
), progress AS (
    -- The last sign of life of an unfinished backfill campaign: a checkpointed
    -- unit or a page landed by one of its runs.
    SELECT c.tenant_id, c.gym_id, greatest(c.connected_at, b.at, h.at) AS at
    FROM conn c
    LEFT JOIN checkpoints b ON b.tenant_id = c.tenant_id AND b.gym_id = c.gym_id
    LEFT JOIN heartbeats h ON h.tenant_id = c.tenant_id AND h.gym_id = c.gym_id
    WHERE c.backfill_completed_at IS NULL
), cancellations AS (
    SELECT m.tenant_id, m.gym_id, m.month_start, m.time_zone, m.churned_members,
           avg(p.churned_members) AS trailing_mean, count(p.churned_members) AS trailing_months
    FROM ironwod.gym_monthly_metrics_cache m
    JOIN conn c ON c.tenant_id = m.tenant_id AND c.gym_id = m.gym_id
    JOIN ironwod.gym_monthly_metrics_cache p
      ON p.tenant_id = m.tenant_id AND p.gym_id = m.gym_id AND p.location_key = 'ALL' AND p.program_key = 'ALL'
     AND p.month_start >= m.month_start - interval '3 months' AND p.month_start < m.month_start
    WHERE m.location_key = 'ALL' AND m.program_key = 'ALL'
      AND m.month_start = date_trunc('month', now() AT TIME ZONE m.time_zone)::date
    GROUP BY m.tenant_id, m.gym_id, m.month_start, m.time_zone, m.churned_members
), quarantine AS (
    SELECT q.tenant_id, q.gym_id, q.entity, q.reason, count(*) AS records,
           min(q.first_seen_at) AS since, max(q.last_seen_at) AS last_seen_at
    FROM ironwod.quarantined_records q
    JOIN conn c ON c.tenant_id = q.tenant_id AND c.gym_id = q.gym_id
    GROUP BY q.tenant_id, q.gym_id, q.entity, q.reason
), visits AS (
    -- Visits are only as fresh as the last successful sync, so the weeks end there.
    SELECT c.tenant_id, c.gym_id, least(now(), c.last_success_at) AS until,
           count(*) FILTER (WHERE a.class_start_at >= least(now(), c.last_success_at) - interval '7 days') AS last_7d,
           count(*) FILTER (WHERE a.class_start_at < least(now(), c.last_success_at) - interval '7 days') / 4.0 AS weekly_mean
    FROM conn c
    JOIN ironwod.attendance_events a
      ON a.tenant_id = c.tenant_id AND a.gym_id = c.gym_id AND a.deleted_at IS NULL
     AND a.class_start_at >= least(now(), c.last_success_at) - interval '35 days'
     AND a.class_start_at < least(now(), c.last_success_at)
    GROUP BY c.tenant_id, c.gym_id, c.last_success_at
)
SELECT c.tenant_id, c.gym_id, 'no_success_24h'::text AS alert, 'critical'::text AS severity,
       coalesce(c.last_success_at, c.connected_at) + interval '24 hours' AS since,
       jsonb_build_object('last_success_at', c.last_success_at, 'last_error_code', c.last_error_code,
                          'last_error', c.last_error) AS detail
FROM conn c
WHERE coalesce(c.last_success_at, c.connected_at) < now() - interval '24 hours'
UNION ALL
SELECT a.tenant_id, a.gym_id, 'api_error_rate', 'warning', a.first_at,
       jsonb_build_object('requests', a.requests, 'failed', a.failed,
                          'error_rate', round(a.failed::numeric / a.requests, 4),
                          'threshold', t.error_rate,
                          'attempts', a.by_outcome)
FROM attempts a
JOIN conn c ON c.tenant_id = a.tenant_id AND c.gym_id = a.gym_id
CROSS JOIN thresholds t
WHERE a.requests >= t.min_requests
  AND a.failed > a.requests * t.error_rate
UNION ALL
SELECT c.tenant_id, c.gym_id, 'breaker_open', 'critical', c.breaker_opened_at,
       jsonb_build_object('consecutive_failures', c.consecutive_failures, 'next_retry_at', c.next_retry_at,
                          'last_error_code', c.last_error_code, 'last_error', c.last_error,
                          'needs_new_key', c.next_retry_at IS NULL)
FROM conn c
WHERE c.breaker_opened_at IS NOT NULL
UNION ALL
SELECT p.tenant_id, p.gym_id, 'backfill_stalled', 'warning',
       p.at + t.backfill_stall::interval,
       jsonb_build_object('last_progress_at', p.at,
                          'stall_after', t.backfill_stall)
FROM progress p
CROSS JOIN thresholds t
WHERE p.at < now() - t.backfill_stall::interval
UNION ALL
SELECT n.tenant_id, n.gym_id, 'not_entitled', 'info', min(n.not_entitled_since),
       jsonb_build_object('entities', jsonb_agg(n.entity ORDER BY n.entity))
FROM ironwod.entity_entitlements n
JOIN conn c ON c.tenant_id = n.tenant_id AND c.gym_id = n.gym_id
GROUP BY n.tenant_id, n.gym_id
UNION ALL
SELECT q.tenant_id, q.gym_id, 'quarantined_records', 'warning', min(q.since),
       jsonb_build_object('records', sum(q.records), 'last_seen_at', max(q.last_seen_at),
                          'entities', (SELECT jsonb_object_agg(x.entity, x.n)
                                       FROM (SELECT y.entity, sum(y.records) AS n FROM quarantine y
                                             WHERE y.tenant_id = q.tenant_id AND y.gym_id = q.gym_id
                                             GROUP BY y.entity) x),
                          'reasons', (SELECT jsonb_object_agg(x.reason, x.n)
                                      FROM (SELECT y.reason, sum(y.records) AS n FROM quarantine y
                                            WHERE y.tenant_id = q.tenant_id AND y.gym_id = q.gym_id
                                            GROUP BY y.reason) x))
FROM quarantine q
GROUP BY q.tenant_id, q.gym_id
UNION ALL
SELECT k.tenant_id, k.gym_id, 'cancellation_spike', 'warning',
       k.month_start::timestamp AT TIME ZONE k.time_zone,
       jsonb_build_object('month', k.month_start, 'cancellations', k.churned_members,
                          'trailing_3_month_mean', round(k.trailing_mean, 2),
                          'factor', t.cancellation_factor)
FROM cancellations k
CROSS JOIN thresholds t
WHERE k.trailing_months = 3
  AND k.churned_members >= t.min_events
  AND k.churned_members > k.trailing_mean * t.cancellation_factor
UNION ALL
SELECT v.tenant_id, v.gym_id, 'attendance_drop', 'warning', v.until - interval '7 days',
       jsonb_build_object('visits_last_7_days', v.last_7d, 'trailing_weekly_mean', round(v.weekly_mean, 2),
                          'until', v.until,
                          'factor', t.attendance_factor)
FROM visits v
CROSS JOIN thresholds t
WHERE v.weekly_mean >= t.min_events
  AND v.last_7d < v.weekly_mean * t.attendance_factor;
COMMENT ON VIEW ironwod.alerts IS 'One row per active alert (tenant_id, gym_id, alert, severity, since, detail): no_success_24h, api_error_rate, breaker_open, backfill_stalled, not_entitled, quarantined_records, cancellation_spike, attendance_drop; thresholds from the ironwod.alert_* GUCs';

-- ---------------------------------------------------------------------------------
-- Latency per endpoint
-- ---------------------------------------------------------------------------------

-- p50/p95/p99 per endpoint over the last 24 hours and 7 days, from the per-run
-- histograms of the runs that finished (or are running) in the period.  Rows with
-- a NULL tenant_id and gym_id add up every gym the caller can see.
CREATE VIEW ironwod.endpoint_latency WITH (security_invoker = true) AS
WITH periods (period, span) AS (
    VALUES ('24h', interval '24 hours'), ('7d', interval '7 days')
), per_run AS (
    SELECT s.tenant_id, s.gym_id, s.entity, p.period, s.requests, 
           s.attempts_429 + s.attempts_4xx + s.attempts_5xx + s.attempts_network + s.attempts_envelope AS failed,
           s.latency_ms, s.latency_hist
    FROM ironwod.sync_run_entities s
    JOIN ironwod.sync_runs r ON r.tenant_id = s.tenant_id AND r.gym_id = s.gym_id AND r.run_id = s.run_id
    CROSS JOIN periods p
    WHERE r.finished_at >= now() - p.span OR (r.finished_at IS NULL AND r.status = 'running')
), gyms AS (
    SELECT x.tenant_id, x.gym_id, x.entity, x.period, sum(x.requests) AS requests, sum(x.failed) AS failed,
           sum(x.latency_ms) AS latency_ms,
           ARRAY[sum(x.latency_hist[1]), sum(x.latency_hist[2]), sum(x.latency_hist[3]), sum(x.latency_hist[4]),
                 sum(x.latency_hist[5]), sum(x.latency_hist[6]), sum(x.latency_hist[7]), sum(x.latency_hist[8])]::bigint[] AS hist
    FROM per_run x
    GROUP BY x.tenant_id, x.gym_id, x.entity, x.period
), everyone AS (
    SELECT NULL::uuid AS tenant_id, NULL::uuid AS gym_id, x.entity, x.period, sum(x.requests) AS requests,
           sum(x.failed) AS failed, sum(x.latency_ms) AS latency_ms,
           ARRAY[sum(x.latency_hist[1]), sum(x.latency_hist[2]), sum(x.latency_hist[3]), sum(x.latency_hist[4]),
                 sum(x.latency_hist[5]), sum(x.latency_hist[6]), sum(x.latency_hist[7]), sum(x.latency_hist[8])]::bigint[] AS hist
    FROM per_run x
    GROUP BY x.entity, x.period
)
SELECT g.tenant_id, g.gym_id, e.path AS endpoint, g.entity, g.period, g.requests::bigint AS requests,
       g.failed::bigint AS failed, g.samples,
       round((g.latency_ms / nullif(g.samples, 0))::numeric, 1) AS mean_ms,
       round(ironwod.histogram_quantile(g.hist, 0.50)::numeric, 1) AS p50_ms,
       round(ironwod.histogram_quantile(g.hist, 0.95)::numeric, 1) AS p95_ms,
       round(ironwod.histogram_quantile(g.hist, 0.99)::numeric, 1) AS p99_ms
FROM (SELECT y.*, y.hist[1] + y.hist[2] + y.hist[3] + y.hist[4] + y.hist[5] + y.hist[6] + y.hist[7] + y.hist[8]
             AS samples
      FROM (SELECT * FROM gyms UNION ALL SELECT * FROM everyone) y) g
JOIN ironwod.entities e ON e.entity = g.entity;
COMMENT ON VIEW ironwod.endpoint_latency IS 'API latency per endpoint over the last 24 h and 7 days (period 24h, 7d): attempts, failed attempts, latency samples, mean and interpolated p50/p95/p99 in ms; tenant_id and gym_id NULL = all visible gyms';

-- ---------------------------------------------------------------------------------
-- Progress of queued and running runs
-- ---------------------------------------------------------------------------------

-- Entities are planned one at a time (when the one before is done), so the units
-- of an entity not planned yet are expected: as many as the gym's last run of the
-- same mode planned, else what its strategy implies (a full list is one unit, a
-- backfill has one window per month of ironwod.backfill_months plus the current
-- one, sign-ins one unit per client this run pulled), less what a resumed backfill
-- campaign already checkpointed.  The remaining requests assume the pages per
-- unit seen so far (this run's, else that last run's, else one).  The ETA divides
-- them by the connection's token rate, or by the run's own pace when slower.
--
-- Every table is read in a MATERIALIZED CTE of its own, without outer joins, and
-- the outer joins of per_entity and paced join only those: on Citus, with the
-- caller's row-level security quals, an outer join over distributed tables is
-- refused ("outer joins and pseudoconstant quals") or, beside the entities
-- reference table, crashes Citus 12.1's planner; over the CTEs' intermediate
-- results it runs on the coordinator.  The CTEs hold only the active runs' rows.
CREATE VIEW ironwod.run_progress WITH (security_invoker = true) AS
WITH active AS MATERIALIZED (
    SELECT r.tenant_id, r.gym_id, r.run_id, r.mode, r.status, r.phase, r.requested_at, r.started_at,
           r.heartbeat_at, r.requests
    FROM ironwod.sync_runs r
    WHERE r.status IN ('queued', 'running')
), run_entities AS MATERIALIZED (
    SELECT s.tenant_id, s.gym_id, s.run_id, s.entity, s.status, s.units_total, s.units_done, s.units_skipped,
           s.pulled, s.new_versions, s.pages
    FROM ironwod.sync_run_entities s
    JOIN active a ON a.tenant_id = s.tenant_id AND a.gym_id = s.gym_id AND a.run_id = s.run_id
), registry AS MATERIALIZED (
    SELECT e.entity, e.ordinal, e.backfill_strategy, e.due_field
    FROM ironwod.entities e
    WHERE e.enabled
), entitlements AS MATERIALIZED (
    SELECT n.tenant_id, n.gym_id, n.entity, n.last_checked_run
    FROM ironwod.entity_entitlements n
    WHERE (n.tenant_id, n.gym_id) IN (SELECT a.tenant_id, a.gym_id FROM active a)
), previous AS MATERIALIZED (
    SELECT DISTINCT ON (a.run_id, p.entity) a.run_id, p.entity, p.units_total, p.units_done, p.pages
    FROM active a
    JOIN ironwod.sync_runs pr ON pr.tenant_id = a.tenant_id AND pr.gym_id = a.gym_id
                             AND pr.mode = a.mode AND pr.run_id < a.run_id
    JOIN ironwod.sync_run_entities p ON p.tenant_id = pr.tenant_id AND p.gym_id = pr.gym_id
                                    AND p.run_id = pr.run_id AND p.units_total IS NOT NULL
    ORDER BY a.run_id, p.entity, p.run_id DESC
), checkpointed AS MATERIALIZED (
    SELECT b.tenant_id, b.gym_id, b.entity, count(*) AS units
    FROM ironwod.backfill_checkpoints b
    JOIN active a ON a.tenant_id = b.tenant_id AND a.gym_id = b.gym_id AND a.mode = 'backfill'
    GROUP BY b.tenant_id, b.gym_id, b.entity
), per_entity AS (
    SELECT a.run_id, e.entity, e.ordinal, s.status AS entity_status,
           coalesce(s.units_done, 0) + coalesce(s.units_skipped, 0) AS units_done,
           s.units_total AS units_planned,
           coalesce(s.units_total,
                    prev.units_total,
                    CASE WHEN e.backfill_strategy = 'full' THEN 1
                         WHEN e.backfill_strategy = 'per_client' THEN cl.pulled
                         WHEN a.mode = 'backfill' THEN current_setting('ironwod.backfill_months')::int + 1
                         WHEN a.mode = 'incremental' AND e.due_field IS NOT NULL THEN 2
                         ELSE 1 END) AS units_expected,
           CASE WHEN s.units_total IS NULL THEN coalesce(ck.units, 0) ELSE 0 END AS units_checkpointed,
           coalesce(s.pulled, 0) AS pulled, coalesce(s.new_versions, 0) AS new_versions,
           coalesce(s.pages::float8 / nullif(s.units_done, 0), prev.pages::float8 / nullif(prev.units_done, 0), 1)
               AS pages_per_unit
    FROM active a
    CROSS JOIN registry e
    LEFT JOIN run_entities s
           ON s.tenant_id = a.tenant_id AND s.gym_id = a.gym_id AND s.run_id = a.run_id AND s.entity = e.entity
    LEFT JOIN run_entities cl
           ON cl.tenant_id = a.tenant_id AND cl.gym_id = a.gym_id AND cl.run_id = a.run_id AND cl.entity = 'clients'
          AND cl.status = 'completed'
    LEFT JOIN previous prev ON prev.run_id = a.run_id AND prev.entity = e.entity
    LEFT JOIN checkpointed ck ON ck.tenant_id = a.tenant_id AND ck.gym_id = a.gym_id AND ck.entity = e.entity
    -- Entities the run skips (not entitled), as an anti-join: Citus plans no
    -- correlated subquery over the materialized "active".
    LEFT JOIN entitlements n
           ON n.tenant_id = a.tenant_id AND n.gym_id = a.gym_id AND n.entity = e.entity
          AND (a.mode <> 'reconcile' OR n.last_checked_run = a.run_id)
    WHERE a.mode <> 'validate' AND n.entity IS NULL
), per_run AS (
    SELECT x.run_id,
           count(*) FILTER (WHERE x.entity_status = 'completed') AS entities_done,
           count(*) AS entities_total,
           (array_agg(x.entity ORDER BY x.ordinal) FILTER (WHERE x.entity_status IS DISTINCT FROM 'completed'))[1]
               AS current_entity,
           sum(x.units_done) AS units_done,
           -- NULL while an entity's size cannot be told yet (sign-ins before the clients)
           CASE WHEN bool_and(x.units_expected IS NOT NULL) THEN sum(x.units_expected) END AS units_total,
           bool_and(x.units_planned IS NOT NULL) AS fully_planned,
           sum(x.pulled) AS records_landed, sum(x.new_versions) AS new_versions,
           CASE WHEN bool_and(x.units_expected IS NOT NULL) THEN
               sum(CASE WHEN x.entity_status = 'completed' THEN 0
                        ELSE greatest(x.units_expected - x.units_checkpointed - x.units_done, 0) * x.pages_per_unit
                   END) END AS requests_remaining
    FROM per_entity x
    GROUP BY x.run_id
), paced AS (
    SELECT a.*, coalesce(p.entities_done, 0) AS entities_done, coalesce(p.entities_total, 0) AS entities_total,
           p.current_entity, coalesce(p.units_done, 0) AS units_done,
           CASE WHEN a.mode = 'validate' THEN 0 ELSE p.units_total END AS units_total,
           coalesce(p.fully_planned, true) AS fully_planned,
           coalesce(p.records_landed, 0) AS records_landed, coalesce(p.new_versions, 0) AS new_versions,
           CASE WHEN a.mode = 'validate' THEN greatest(1 - a.requests, 0) ELSE ceil(p.requests_remaining) END
               AS requests_remaining,
           least(ironwod.connection_rate(a.tenant_id, a.gym_id),
                 CASE WHEN a.requests >= 10 AND now() - a.started_at >= interval '1 second'
                      THEN a.requests / extract(epoch FROM now() - a.started_at)::float8 END) AS rate
    FROM active a
    LEFT JOIN per_run p ON p.run_id = a.run_id
)
SELECT x.tenant_id, x.gym_id, x.run_id, x.mode, x.status, x.phase, x.current_entity, x.requested_at,
       x.started_at, x.heartbeat_at, x.entities_done, x.entities_total, x.units_done, x.units_total,
       x.fully_planned, x.records_landed, x.new_versions, x.requests, x.requests_remaining::bigint,
       round(x.rate::numeric, 2) AS rate,
       make_interval(secs => round((x.requests_remaining / nullif(x.rate, 0))::numeric)::float8) AS eta,
       now() + make_interval(secs => (x.requests_remaining / nullif(x.rate, 0))::float8) AS eta_at
FROM paced x;
COMMENT ON VIEW ironwod.run_progress IS 'Queued and running runs: current entity, entities and units done of (expected) total, records landed, requests so far and remaining, request rate and ETA of the fetch';

GRANT SELECT ON ironwod.alerts, ironwod.endpoint_latency, ironwod.run_progress TO ironwod_app, ironwod_admin;
GRANT EXECUTE ON FUNCTION ironwod.connection_rate(uuid, uuid), ironwod.histogram_quantile(bigint[], double precision)
    TO ironwod_app, ironwod_admin, ironwod_worker;
GRANT EXECUTE ON FUNCTION ironwod.run_summary(uuid, uuid, bigint) TO ironwod_app, ironwod_admin, ironwod_worker;
GRANT EXECUTE ON FUNCTION ironwod.log_line(text), ironwod.log_run(uuid, uuid, bigint),
    ironwod.transform_step(bigint)
    TO ironwod_worker;
