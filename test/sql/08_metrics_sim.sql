-- Metrics over the simulator gyms backfilled by tests 03-06: the worker's two steps
-- (transform_run, then refresh_metrics, each in its own transaction, as
-- ironwod_worker with the run's scope), the snapshot identity and MRR bridge on
-- every cached month, agreement with the simulator's ground truth, replay digests,
-- idempotency, and tenancy of the read API.
\set ta '''11111111-1111-1111-1111-111111111111'''
\set g1 '''aaaaaaaa-0000-0000-0000-000000000001'''
\set g2 '''aaaaaaaa-0000-0000-0000-000000000002'''
SET client_min_messages = warning;

-- What the run worker does after the last page of each run landed.
CREATE FUNCTION public.worker_step(p_tenant uuid, p_gym uuid, p_step text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    r bigint;
    n integer := 0;
BEGIN
    PERFORM ironwod_set_scope(p_tenant, p_gym);
    SET LOCAL ROLE ironwod_worker;
    -- Transform every succeeded run in order; refresh once, after the last one.
    FOR r IN SELECT run_id FROM ironwod.sync_runs
             WHERE tenant_id = p_tenant AND gym_id = p_gym AND status = 'succeeded'
               AND (p_step = 'transform' OR run_id = (SELECT max(run_id) FROM ironwod.sync_runs
                                                      WHERE tenant_id = p_tenant AND gym_id = p_gym
                                                        AND status = 'succeeded'))
             ORDER BY run_id LOOP
        IF p_step = 'transform' THEN
            PERFORM ironwod.transform_run(r);
        ELSE
            PERFORM ironwod.refresh_metrics(r);
        END IF;
        n := n + 1;
    END LOOP;
    RESET ROLE;
    RETURN n;
END $$;
-- The simulator gyms with data, and which simulator gym each one mirrors.
-- Joins, not correlated subqueries: Citus plans none over a reference table
-- (sim_gyms is one there).
CREATE TABLE public.sim_scopes AS
WITH scopes AS (
    SELECT DISTINCT r.tenant_id, r.gym_id FROM ironwod.wodify_raw_locations r
    JOIN (SELECT DISTINCT x.tenant_id, x.gym_id FROM ironwod.sync_runs x) x USING (tenant_id, gym_id)
), clients AS (
    SELECT c.tenant_id, c.gym_id, count(DISTINCT c.wodify_id) AS n
    FROM ironwod.wodify_raw_clients c GROUP BY c.tenant_id, c.gym_id
)
SELECT s.tenant_id, s.gym_id, min(g.idx) AS idx
FROM scopes s
LEFT JOIN clients n USING (tenant_id, gym_id)
LEFT JOIN sim_gyms g ON (g.expected->>'clients')::int = coalesce(n.n, 0)
GROUP BY s.tenant_id, s.gym_id;
SELECT count(*) AS gyms_with_data, count(DISTINCT idx) AS distinct_sim_gyms FROM sim_scopes;

-- Each step in a transaction block, as the worker runs it: on Citus a read opens
-- a transaction on the node, which is where SET LOCAL sends the scope, only inside
-- one.
BEGIN;
SELECT count(*) FILTER (WHERE worker_step(tenant_id, gym_id, 'transform') > 0) AS transformed FROM sim_scopes;
COMMIT;
BEGIN;
SELECT count(*) FILTER (WHERE worker_step(tenant_id, gym_id, 'refresh') > 0) AS refreshed FROM sim_scopes;
COMMIT;

-- Canonical tables hold exactly one row per raw record, including records first
-- landed by the backfill that test 05 killed.
-- Counted per gym and joined (Citus pushes a join of per-tenant groups to the
-- nodes; it plans no correlated subquery over a local table).
SELECT count(*) AS gyms, bool_and(coalesce(r1.n, 0) + coalesce(r2.n, 0) + coalesce(r3.n, 0)
                                  = coalesce(c1.n, 0) + coalesce(c2.n, 0) + coalesce(c3.n, 0)) AS one_canonical_row_per_record
FROM sim_scopes s
LEFT JOIN (SELECT tenant_id, gym_id, count(DISTINCT wodify_id) AS n FROM ironwod.wodify_raw_memberships GROUP BY 1, 2) r1 USING (tenant_id, gym_id)
LEFT JOIN (SELECT tenant_id, gym_id, count(DISTINCT wodify_id) AS n FROM ironwod.wodify_raw_class_signins GROUP BY 1, 2) r2 USING (tenant_id, gym_id)
LEFT JOIN (SELECT tenant_id, gym_id, count(DISTINCT wodify_id) AS n FROM ironwod.wodify_raw_transactions GROUP BY 1, 2) r3 USING (tenant_id, gym_id)
LEFT JOIN (SELECT tenant_id, gym_id, count(*) AS n FROM ironwod.memberships GROUP BY 1, 2) c1 USING (tenant_id, gym_id)
LEFT JOIN (SELECT tenant_id, gym_id, count(*) AS n FROM ironwod.attendance_events GROUP BY 1, 2) c2 USING (tenant_id, gym_id)
LEFT JOIN (SELECT tenant_id, gym_id, count(*) AS n FROM ironwod.transactions GROUP BY 1, 2) c3 USING (tenant_id, gym_id);

-- Every cached month of every gym and location: the snapshot identity, the MRR
-- bridge, and start = previous end.
SELECT count(*) > 100 AS many_rows,
       count(*) FILTER (WHERE new_members IS NOT NULL
                          AND members_end <> members_start + new_members + reactivated_members - churned_members) AS identity_broken,
       count(*) FILTER (WHERE mrr_new IS NOT NULL
                          AND mrr_end <> mrr_start + mrr_new + mrr_reactivation + mrr_expansion - mrr_contraction
                                         - mrr_churn - mrr_hold_out + mrr_hold_in) AS bridge_broken,
       count(*) FILTER (WHERE churned_from_start > members_start OR new_and_churned_same_month > churned_members) AS bounds_broken
FROM ironwod.gym_monthly_metrics_cache c JOIN sim_scopes USING (tenant_id, gym_id);
SELECT count(*) FILTER (WHERE c.members_start <> p.members_end OR c.mrr_start <> p.mrr_end) AS start_is_not_previous_end
FROM ironwod.gym_monthly_metrics_cache c
JOIN ironwod.gym_monthly_metrics_cache p
  ON p.tenant_id = c.tenant_id AND p.gym_id = c.gym_id AND p.location_key = c.location_key
 AND p.program_key = c.program_key AND p.month_start = (c.month_start - interval '1 month')::date
JOIN sim_scopes s ON s.tenant_id = c.tenant_id AND s.gym_id = c.gym_id;
-- Location rows never exceed the gym-wide row (people are counted once at ALL).
SELECT count(*) AS location_exceeds_all
FROM ironwod.gym_monthly_metrics_cache l
JOIN ironwod.gym_monthly_metrics_cache a USING (tenant_id, gym_id, program_key, month_start)
JOIN sim_scopes USING (tenant_id, gym_id)
WHERE l.location_key <> 'ALL' AND a.location_key = 'ALL' AND l.members_end > a.members_end;

-- The simulator's ground truth agrees with the cache (closed months, location ALL).
SELECT count(*) >= 3 * 20 AS compared_enough_months,
       count(*) FILTER (WHERE t.members_end <> c.members_end) AS members_mismatch,
       count(*) FILTER (WHERE t.new_members IS DISTINCT FROM c.new_members) AS new_mismatch,
       count(*) FILTER (WHERE t.churned_members IS DISTINCT FROM c.churned_members) AS churned_mismatch,
       count(*) FILTER (WHERE t.all_visits <> c.all_visits) AS visits_mismatch,
       count(*) FILTER (WHERE t.member_visits <> c.member_visits) AS member_visits_mismatch
FROM sim_scopes s
JOIN sim_truth t ON t.idx = s.idx
JOIN ironwod.gym_monthly_metrics_cache c
  ON c.tenant_id = s.tenant_id AND c.gym_id = s.gym_id AND c.location_key = 'ALL' AND c.program_key = 'ALL'
 AND c.month_start = t.month_start
WHERE NOT c.is_partial;

-- Program rows (metrics.md §2.5, §5.1) agree with the simulator's truth per program:
-- people with access through their memberships' programs, visits to the program's
-- classes, money where the program's memberships grant it alone; and for the gym
-- whose memberships carry no programs, visits with people and money unknown.
-- (The outer join is on the ALL row's tenant: Citus pushes an outer join between
-- two distributed tables down only when it joins their distribution columns
-- directly, not through the local sim_scopes.)
SELECT count(DISTINCT (s.idx, t.program_key)) >= 12 AS compared_programs,
       count(*) FILTER (WHERE c.month_start IS NULL) AS missing_program_rows,
       count(*) FILTER (WHERE t.members_end IS DISTINCT FROM c.members_end) AS members_mismatch,
       count(*) FILTER (WHERE t.new_members IS DISTINCT FROM c.new_members) AS new_mismatch,
       count(*) FILTER (WHERE t.churned_members IS DISTINCT FROM c.churned_members) AS churned_mismatch,
       count(*) FILTER (WHERE t.all_visits IS DISTINCT FROM c.all_visits) AS visits_mismatch,
       count(*) FILTER (WHERE t.member_visits IS DISTINCT FROM c.member_visits) AS member_visits_mismatch,
       count(*) FILTER (WHERE t.collected_gross IS DISTINCT FROM c.collected_gross) AS collected_mismatch,
       bool_or(t.members_end IS NULL) AND bool_or(t.members_end > 0) AS people_known_and_unknown,
       bool_or(t.collected_gross IS NULL AND t.members_end > 0) AND bool_or(t.collected_gross > 0) AS money_split_and_not
FROM sim_scopes s
JOIN sim_truth_programs t ON t.idx = s.idx
JOIN ironwod.gym_monthly_metrics_cache a
  ON a.tenant_id = s.tenant_id AND a.gym_id = s.gym_id AND a.location_key = 'ALL' AND a.program_key = 'ALL'
 AND a.month_start = t.month_start AND NOT a.is_partial
LEFT JOIN ironwod.gym_monthly_metrics_cache c
  ON c.tenant_id = a.tenant_id AND c.gym_id = a.gym_id AND c.location_key = 'ALL' AND c.program_key = t.program_key
 AND c.month_start = t.month_start;
-- On every program row: the snapshot identity, the MRR bridge and start = previous
-- end; people never more than the gym's (counted once at ALL, not added up: the
-- programs together hold more); visits add up to the gym's (every class has one
-- program); money at most the gym's.
SELECT count(*) > 100 AS many_program_rows,
       count(*) FILTER (WHERE p.new_members IS NOT NULL
                          AND p.members_end <> p.members_start + p.new_members + p.reactivated_members - p.churned_members) AS identity_broken,
       count(*) FILTER (WHERE p.mrr_new IS NOT NULL
                          AND p.mrr_end <> p.mrr_start + p.mrr_new + p.mrr_reactivation + p.mrr_expansion - p.mrr_contraction
                                           - p.mrr_churn - p.mrr_hold_out + p.mrr_hold_in) AS bridge_broken,
       count(*) FILTER (WHERE p.members_start <> q.members_end OR p.mrr_start <> q.mrr_end) AS start_is_not_previous_end,
       count(*) FILTER (WHERE p.members_end > a.members_end OR p.active_member_days > a.active_member_days) AS program_exceeds_all,
       count(*) FILTER (WHERE p.collected_gross > a.collected_gross OR p.mrr_end > a.mrr_end) AS money_exceeds_all
FROM ironwod.gym_monthly_metrics_cache p
JOIN sim_scopes s ON s.tenant_id = p.tenant_id AND s.gym_id = p.gym_id
JOIN ironwod.gym_monthly_metrics_cache a
  ON a.tenant_id = p.tenant_id AND a.gym_id = p.gym_id AND a.location_key = 'ALL' AND a.program_key = 'ALL'
 AND a.month_start = p.month_start
LEFT JOIN ironwod.gym_monthly_metrics_cache q
  ON q.tenant_id = p.tenant_id AND q.gym_id = p.gym_id AND q.location_key = 'ALL' AND q.program_key = p.program_key
 AND q.month_start = (p.month_start - interval '1 month')::date
WHERE p.program_key <> 'ALL';
SELECT count(*) AS gym_months, count(*) FILTER (WHERE p.members_end > a.members_end) > 0 AS programs_hold_more_people,
       count(*) FILTER (WHERE p.all_visits <> a.all_visits) AS visits_do_not_add_up
FROM (SELECT p.tenant_id, p.gym_id, p.month_start, sum(p.members_end) AS members_end, sum(p.all_visits) AS all_visits
      FROM ironwod.gym_monthly_metrics_cache p JOIN sim_scopes s ON s.tenant_id = p.tenant_id AND s.gym_id = p.gym_id
      WHERE p.program_key <> 'ALL' GROUP BY 1, 2, 3) p
JOIN ironwod.gym_monthly_metrics_cache a
  ON a.tenant_id = p.tenant_id AND a.gym_id = p.gym_id AND a.location_key = 'ALL' AND a.program_key = 'ALL'
 AND a.month_start = p.month_start;

-- Running both steps again changes nothing.
BEGIN;
SELECT ironwod_set_scope(:ta, :g1);
SELECT ironwod.digest(:ta, :g1) AS live_digest \gset
COMMIT;
BEGIN;
SELECT worker_step(:ta, :g1, 'transform') > 0 AS transformed_again;
COMMIT;
BEGIN;
SELECT worker_step(:ta, :g1, 'refresh') > 0 AS refreshed_again;
COMMIT;
BEGIN;
SELECT ironwod_set_scope(:ta, :g1);
SELECT ironwod.digest(:ta, :g1) = :'live_digest' AS digest_unchanged;
COMMIT;

-- Replay from raw alone, as the host app: same digest as the live tables, twice.
SET ROLE ironwod_test_app;
BEGIN;
SELECT ironwod_set_scope(:ta, :g1);
SELECT ironwod_replay(:ta, :g1) = :'live_digest' AS replay_matches_live;
SELECT ironwod_replay(:ta, :g1) = :'live_digest' AS second_replay_matches;
COMMIT;

-- Reads.  Scoped to gym 1, the app sees its own cache and facts only.
BEGIN;
SELECT ironwod_set_scope(:ta, :g1);
SELECT count(*) AS other_gym_cache_rows FROM ironwod.gym_monthly_metrics_cache WHERE gym_id <> :g1;
SELECT count(*) AS other_gym_fact_rows FROM ironwod.member_month_fact WHERE gym_id <> :g1;
SELECT count(*) AS other_gym_summary_rows FROM ironwod.metrics_summary WHERE gym_id <> :g1;
SELECT max(month_start) AS last_month FROM ironwod.gym_monthly_metrics_cache \gset
SELECT count(*) = 12 AS twelve_months
FROM ironwod_dashboard(:ta, :g1, (:'last_month'::date - interval '11 months')::date, :'last_month');
-- The demo's last-12-months query.
SELECT count(*) = 12 AS summary_rows, bool_and(members_end >= 0 AND mrr >= 0) AS sane
FROM (SELECT * FROM ironwod.metrics_summary WHERE location_key = 'ALL' ORDER BY month_start DESC LIMIT 12) s;
-- A drill-down lists exactly the people behind each count.
SELECT bool_and(e.n = c.churned_from_start) AS churned_from_start_explained,
       bool_and(e2.n = c.members_end) AS members_end_explained
FROM ironwod_dashboard(:ta, :g1, (:'last_month'::date - interval '11 months')::date, :'last_month') c,
     LATERAL (SELECT count(*) AS n FROM ironwod_explain(:ta, :g1, c.month_start, 'churned_from_start')) e,
     LATERAL (SELECT count(*) AS n FROM ironwod_explain(:ta, :g1, c.month_start, 'members_end')) e2;
-- Another gym's cache or drill-down is refused, as are bad arguments.
SELECT try(format('SELECT * FROM ironwod_dashboard(%L, %L, %L, %L)', :ta, :g2, '2025-01-01', '2025-12-01')) AS other_gym_dashboard;
SELECT try(format('SELECT * FROM ironwod_explain(%L, %L, %L, %L)', :ta, :g2, '2025-01-01', 'churned_members')) AS other_gym_explain;
SELECT try(format('SELECT * FROM ironwod_replay(%L, %L)', :ta, :g2)) AS other_gym_replay;
SELECT try(format('SELECT * FROM ironwod_explain(%L, %L, %L, %L)', :ta, :g1, '2025-01-01', 'happiness')) AS unknown_metric;
SELECT try(format('SELECT * FROM ironwod_explain(%L, %L, %L, %L)', :ta, :g1, '1999-01-01', 'churned_members')) ~ '^P0002' AS month_not_cached;
SELECT try(format('SELECT * FROM ironwod_dashboard(%L, %L, %L, %L)', :ta, :g1, '2025-06-01', '2025-01-01')) AS reversed_range;
SELECT try(format('SELECT * FROM ironwod_dashboard(%L, %L, NULL, %L)', :ta, :g1, '2025-01-01')) AS null_month;
SELECT try(format('SELECT * FROM ironwod_dashboard(%L, %L, %L, %L, %L)', :ta, :g1, '2025-01-01', '2025-02-01', 'nowhere')) ~ '^22023' AS unknown_location;
-- A program's dashboard and drill-downs: its twelve months, the people behind its counts.
SELECT min(program_key) AS program FROM ironwod.gym_monthly_metrics_cache
WHERE program_key <> 'ALL' AND members_end > 0 \gset
SELECT count(*) = 12 AS twelve_program_months, bool_and(program_key = :'program') AS that_program
FROM ironwod_dashboard(:ta, :g1, (:'last_month'::date - interval '11 months')::date, :'last_month', 'ALL', :'program');
SELECT bool_and(e.n = c.members_end) AS program_members_end_explained,
       bool_and(e2.n = c.new_members OR c.new_members IS NULL) AS program_new_members_explained
FROM ironwod_dashboard(:ta, :g1, (:'last_month'::date - interval '11 months')::date, :'last_month', 'ALL', :'program') c,
     LATERAL (SELECT count(*) AS n FROM ironwod_explain(:ta, :g1, c.month_start, 'members_end', 'ALL', :'program')) e,
     LATERAL (SELECT count(*) AS n FROM ironwod_explain(:ta, :g1, c.month_start, 'new_members', 'ALL', :'program')) e2;
COMMIT;
-- The app cannot call the worker's functions, nor write the cache.
SELECT try('SELECT ironwod.refresh_metrics_all()') AS app_refresh;
SELECT try(format('DELETE FROM ironwod.gym_monthly_metrics_cache WHERE gym_id = %L', :g1)) AS app_delete;
RESET ROLE;
RESET client_min_messages;
