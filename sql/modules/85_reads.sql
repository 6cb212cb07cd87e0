-- 85_reads: the read API (cache and facts only, never raw or canonical tables),
-- replay from raw, and the digest that proves a replay reproduces the live tables.

CREATE FUNCTION @extschema@.ironwod_dashboard(p_tenant_id uuid, p_gym_id uuid, p_from_month date,
                                              p_to_month date, p_location text DEFAULT 'ALL',
                                              p_program text DEFAULT 'ALL')
RETURNS SETOF ironwod.gym_monthly_metrics_cache
LANGUAGE plpgsql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_from date := date_trunc('month', p_from_month)::date;
    v_to date := date_trunc('month', p_to_month)::date;
BEGIN
    PERFORM ironwod.assert_scope(p_tenant_id, p_gym_id);
    IF p_from_month IS NULL OR p_to_month IS NULL OR p_location IS NULL THEN
        RAISE EXCEPTION 'from_month, to_month and location must not be null'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'Pass the first and last month wanted (any day of the month) and ''ALL'' or a location id.';
    END IF;
    IF p_program IS NULL THEN
        RAISE EXCEPTION 'program must not be null'
            USING ERRCODE = 'null_value_not_allowed', HINT = 'Pass ''ALL'' or a Wodify program id.';
    END IF;
    PERFORM ironwod.assert_program_key(p_tenant_id, p_gym_id, p_location, p_program);
    IF v_from > v_to THEN
        RAISE EXCEPTION 'from_month % is after to_month %', v_from, v_to
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Swap the two months.';
    END IF;
    IF v_to > v_from + interval '120 months' THEN
        RAISE EXCEPTION 'at most 121 months can be read at once'
            USING ERRCODE = 'program_limit_exceeded', HINT = 'Read a shorter range.';
    END IF;
    IF p_location <> 'ALL' AND NOT EXISTS (
            SELECT 1 FROM ironwod.gym_monthly_metrics_cache c
            WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id AND c.location_key = p_location) THEN
        RAISE EXCEPTION 'unknown location "%"', p_location
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Valid locations: ' || coalesce((
                      SELECT string_agg(DISTINCT c.location_key, ', ')
                      FROM ironwod.gym_monthly_metrics_cache c
                      WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id), 'ALL') || '.';
    END IF;
    RETURN QUERY
        SELECT c.* FROM ironwod.gym_monthly_metrics_cache c
        WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id AND c.location_key = p_location
          AND c.program_key = p_program AND c.month_start BETWEEN v_from AND v_to
        ORDER BY c.month_start;
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_dashboard(uuid, uuid, date, date, text, text) IS 'Cached monthly metrics of a gym (location ''ALL'' or a Wodify location id; program ''ALL'' or a Wodify program id, at location ALL) for months from..to; reads only gym_monthly_metrics_cache';

-- A program other than ALL names a cached program row, which exists at location
-- ALL only (metrics.md §5.1); else 22023 with the valid programs.
CREATE FUNCTION ironwod.assert_program_key(p_tenant_id uuid, p_gym_id uuid, p_location text, p_program text)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF p_program = 'ALL' THEN
        RETURN;
    END IF;
    IF p_location <> 'ALL' THEN
        RAISE EXCEPTION 'program rows exist for location ALL only'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass location ''ALL'' with a program, or program ''ALL'' with a location.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM ironwod.gym_monthly_metrics_cache c
                   WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id AND c.location_key = 'ALL'
                     AND c.program_key = p_program) THEN
        RAISE EXCEPTION 'unknown program "%"', p_program
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Valid programs: ' || coalesce((
                      SELECT string_agg(DISTINCT c.program_key, ', ')
                      FROM ironwod.gym_monthly_metrics_cache c
                      WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id), 'ALL') || '.';
    END IF;
END
$$;
COMMENT ON FUNCTION ironwod.assert_program_key(uuid, uuid, text, text) IS 'Read API: a program argument other than ALL must name a cached program row, at location ALL; else 22023 with the valid programs';

-- Metric name -> which member-month facts make up the number.
CREATE FUNCTION ironwod.explain_metrics() RETURNS text[]
LANGUAGE sql IMMUTABLE
AS $$
    SELECT ARRAY['members_start', 'members_end', 'active_members_end', 'on_hold_members_end',
                 'past_due_members_end', 'comped_members_end', 'members_pending_cancel_end',
                 'new_members', 'reactivated_members', 'churned_members', 'churned_from_start',
                 'new_and_churned_same_month', 'paying_members',
                 'mrr_new', 'mrr_reactivation', 'mrr_expansion', 'mrr_contraction', 'mrr_churn',
                 'mrr_hold_out', 'mrr_hold_in',
                 'members_zero_visits_month', 'members_no_visit_14d_end', 'members_no_visit_30d_end',
                 'members_attendance_declining_end', 'at_risk',
                 'cohort_new_members', 'cohort_retained_90d']
$$;
COMMENT ON FUNCTION ironwod.explain_metrics() IS 'Metric names ironwod_explain can break down into members';

CREATE FUNCTION @extschema@.ironwod_explain(p_tenant_id uuid, p_gym_id uuid, p_month date, p_metric text,
                                            p_location text DEFAULT 'ALL', p_program text DEFAULT 'ALL')
RETURNS TABLE (member_id bigint, location_key text, month_start date, contribution numeric,
               state_start text, state_end text, mrr_start numeric, mrr_end numeric, movement text,
               active_days integer, visits integer, absent_active_days integer, flags text[])
LANGUAGE plpgsql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_month date := date_trunc('month', p_month)::date;
    v_sources text[];
    v_refused text;
    v_note text;
    -- the facts of a program row are those of key program:<id> (80_metrics)
    v_key text := CASE WHEN p_program = 'ALL' THEN p_location ELSE 'program:' || p_program END;
BEGIN
    PERFORM ironwod.assert_scope(p_tenant_id, p_gym_id);
    IF p_month IS NULL OR p_metric IS NULL OR p_location IS NULL THEN
        RAISE EXCEPTION 'month, metric and location must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF p_program IS NULL THEN
        RAISE EXCEPTION 'program must not be null'
            USING ERRCODE = 'null_value_not_allowed', HINT = 'Pass ''ALL'' or a Wodify program id.';
    END IF;
    PERFORM ironwod.assert_program_key(p_tenant_id, p_gym_id, p_location, p_program);
    IF NOT p_metric = ANY (ironwod.explain_metrics()) THEN
        RAISE EXCEPTION 'unknown metric "%"', p_metric
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Valid metrics: ' || array_to_string(ironwod.explain_metrics(), ', ') || '.';
    END IF;
    -- A metric the cache holds as unknown (82_unknowns) has no members to list.
    SELECT array_agg(DISTINCT d.entity) INTO v_sources FROM ironwod.metric_sources() d
    WHERE d.metric = ANY (CASE p_metric WHEN 'at_risk'
                              THEN ARRAY['members_no_visit_14d_end', 'members_attendance_declining_end']
                              ELSE ARRAY[p_metric] END);
    SELECT string_agg(n.entity, ', ' ORDER BY n.entity) INTO v_refused FROM ironwod.entity_entitlements n
    WHERE n.tenant_id = p_tenant_id AND n.gym_id = p_gym_id AND n.entity = ANY (v_sources);
    IF v_refused IS NOT NULL THEN
        RAISE EXCEPTION 'metric "%" is unknown for this gym', p_metric
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = format('It depends on %s, which the gym''s Wodify plan does not include.', v_refused),
                  HINT = 'The weekly reconciliation asks Wodify again and computes it once the plan includes it.';
    END IF;
    -- So does one a program row holds as unknown (82_unknowns, noted in config_hash).
    SELECT c.config_hash INTO v_note FROM ironwod.gym_monthly_metrics_cache c
    WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id AND c.location_key = 'ALL'
      AND c.program_key = p_program AND c.month_start = v_month AND p_program <> 'ALL';
    IF v_note LIKE '% programs unknown%'
       OR (v_note LIKE '% revenue not split%' AND p_metric = ANY (ironwod.program_revenue_metrics())) THEN
        RAISE EXCEPTION 'metric "%" is unknown for program %', p_metric, p_program
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = CASE WHEN v_note LIKE '% programs unknown%'
                                THEN 'The gym''s memberships do not say which programs they give access to.'
                                ELSE 'A membership gives access to this program and another, so its money cannot be split between them.' END;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM ironwod.gym_monthly_metrics_cache c
                   WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id
                     AND c.location_key = p_location AND c.program_key = p_program AND c.month_start = v_month) THEN
        RAISE EXCEPTION 'no cached metrics for month % at location "%"', v_month, p_location
            USING ERRCODE = 'no_data_found',
                  HINT = coalesce((SELECT format('Cached months run from %s to %s; locations: %s.',
                                                 min(c.month_start), max(c.month_start),
                                                 string_agg(DISTINCT c.location_key, ', '))
                                   FROM ironwod.gym_monthly_metrics_cache c
                                   WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id),
                                  'Nothing is cached for this gym yet: run a sync first.');
    END IF;
    RETURN QUERY
    SELECT f.member_id, f.location_key, f.month_start,
           CASE WHEN p_metric LIKE 'mrr\_%' THEN abs(f.mrr_delta)
                WHEN p_metric IN ('new_members', 'cohort_new_members') THEN f.new_events::numeric
                WHEN p_metric = 'reactivated_members' THEN f.reactivated_events::numeric
                WHEN p_metric = 'churned_members' THEN f.churn_events::numeric
                WHEN p_metric = 'new_and_churned_same_month' THEN f.new_and_churned::numeric
                ELSE 1 END,
           f.state_start, f.state_end, f.mrr_start, f.mrr_end, f.movement, f.active_days, f.visits,
           f.absent_active_days,
           array_remove(ARRAY[CASE WHEN f.is_past_due_end THEN 'past_due' END,
                              CASE WHEN f.is_pending_cancel_end THEN 'pending_cancel' END,
                              CASE WHEN f.is_no_visit_short THEN 'no_visit_14d' END,
                              CASE WHEN f.is_no_visit_long THEN 'no_visit_30d' END,
                              CASE WHEN f.is_declining THEN 'attendance_declining' END,
                              CASE WHEN f.is_zero_visits THEN 'zero_visits' END,
                              CASE WHEN f.is_comped_end THEN 'comped' END], NULL)
    FROM ironwod.member_month_fact f
    WHERE f.tenant_id = p_tenant_id AND f.gym_id = p_gym_id AND f.location_key = v_key
      AND f.month_start = v_month
      AND CASE p_metric
            WHEN 'members_start' THEN f.state_start <> 'NOT_MEMBER'
            WHEN 'members_end' THEN f.state_end <> 'NOT_MEMBER'
            WHEN 'active_members_end' THEN f.state_end = 'ACTIVE'
            WHEN 'on_hold_members_end' THEN f.state_end = 'ON_HOLD'
            WHEN 'past_due_members_end' THEN f.is_past_due_end
            WHEN 'comped_members_end' THEN f.is_comped_end
            WHEN 'members_pending_cancel_end' THEN f.is_pending_cancel_end
            WHEN 'new_members' THEN f.new_events > 0
            WHEN 'cohort_new_members' THEN f.new_events > 0
            WHEN 'cohort_retained_90d' THEN f.cohort_retained_90d
            WHEN 'reactivated_members' THEN f.reactivated_events > 0
            WHEN 'churned_members' THEN f.churn_events > 0
            WHEN 'churned_from_start' THEN f.state_start <> 'NOT_MEMBER' AND f.state_end = 'NOT_MEMBER'
            WHEN 'new_and_churned_same_month' THEN f.new_and_churned > 0
            WHEN 'paying_members' THEN f.is_paying
            WHEN 'mrr_new' THEN f.movement = 'new'
            WHEN 'mrr_reactivation' THEN f.movement = 'reactivation'
            WHEN 'mrr_expansion' THEN f.movement = 'expansion'
            WHEN 'mrr_contraction' THEN f.movement = 'contraction'
            WHEN 'mrr_churn' THEN f.movement = 'churn'
            WHEN 'mrr_hold_out' THEN f.movement = 'hold_out'
            WHEN 'mrr_hold_in' THEN f.movement = 'hold_in'
            WHEN 'members_zero_visits_month' THEN f.is_zero_visits
            WHEN 'members_no_visit_14d_end' THEN f.is_no_visit_short
            WHEN 'members_no_visit_30d_end' THEN f.is_no_visit_long
            WHEN 'members_attendance_declining_end' THEN f.is_declining
            WHEN 'at_risk' THEN f.is_no_visit_short OR f.is_declining
          END
    ORDER BY f.member_id;
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_explain(uuid, uuid, date, text, text, text) IS 'Drill-down: the members behind a cached metric of a month (who churned, who is new, who is at risk ...) at a location or a program (location_key program:<id>), from member_month_fact only; at_risk = no visit in 14 active days or attendance declining; refused (55000) for a metric that is unknown because the gym''s plan does not include its entity, or for a program because the memberships do not say their programs or its money cannot be split';

-- SHA-256 over a canonical rendering (jsonb text, rows in key order, computed_at left
-- out) of every derived row of one gym: the canonical tables and every metrics stage
-- (spells, state spans, visit months, facts, money, cache).
CREATE FUNCTION ironwod.digest(p_tenant_id uuid, p_gym_id uuid)
RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_parts text[] := '{}';
    v_part text;
    t record;
BEGIN
    PERFORM ironwod.assert_scope(p_tenant_id, p_gym_id);
    FOR t IN SELECT * FROM (VALUES
            (1, 'locations', 'location_id'), (2, 'programs', 'program_id'), (3, 'members', 'member_id'),
            (4, 'memberships', 'membership_id'), (5, 'membership_holds', 'hold_id'),
            (6, 'attendance_events', 'signin_id'), (7, 'invoices', 'invoice_id'),
            (8, 'transactions', 'transaction_id'),
            (9, 'member_spell', 'location_key, member_id, spell_start'),
            (10, 'member_month_fact', 'location_key, month_start, member_id'),
            (11, 'gym_monthly_metrics_cache', 'location_key, program_key, month_start'),
            (12, 'member_state_span', 'location_key, member_id, span_start'),
            (13, 'member_visit_month', 'location_key, month_start, member_id'),
            (14, 'gym_month_money', 'location_key, month_start')) AS v(n, tab, ord)
        ORDER BY n
    LOOP
        EXECUTE format($q$SELECT %L || ':' || coalesce(string_agg((to_jsonb(x) - 'computed_at')::text, E'\n' ORDER BY %s), '')
                          FROM ironwod.%I x WHERE x.tenant_id = $1 AND x.gym_id = $2$q$,
                       t.tab, t.ord, t.tab)
            INTO v_part USING p_tenant_id, p_gym_id;
        v_parts := v_parts || v_part;
    END LOOP;
    RETURN encode(sha256(convert_to(array_to_string(v_parts, E'\n--\n'), 'UTF8')), 'hex');
END
$$;
COMMENT ON FUNCTION ironwod.digest(uuid, uuid) IS 'SHA-256 hex of every derived row of a gym (canonical tables, spells, state spans, visit months, facts, money and cache) in a canonical text form (computed_at left out); equal before and after ironwod_replay';

CREATE FUNCTION @extschema@.ironwod_replay(p_tenant_id uuid, p_gym_id uuid)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM ironwod.assert_connection(p_tenant_id, p_gym_id);
    -- One replay per gym at a time; the run worker's transform/refresh also write these rows.
    PERFORM pg_advisory_xact_lock(hashtextextended('ironwod.replay:' || p_tenant_id || ':' || p_gym_id, 0));
    DELETE FROM ironwod.gym_monthly_metrics_cache WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.member_month_fact WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.member_spell WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.member_state_span WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.member_visit_month WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.gym_month_money WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.transactions WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.invoices WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.attendance_events WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.membership_holds WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.memberships WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.members WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.programs WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    DELETE FROM ironwod.locations WHERE tenant_id = p_tenant_id AND gym_id = p_gym_id;
    PERFORM ironwod.transform_all();
    PERFORM ironwod.refresh_metrics_all();
    RETURN ironwod.digest(p_tenant_id, p_gym_id);
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_replay(uuid, uuid) IS 'Rebuild a gym''s canonical tables, spells, facts and metric cache from its raw tables alone (no HTTP) and return their digest';

REVOKE ALL ON FUNCTION @extschema@.ironwod_dashboard(uuid, uuid, date, date, text, text),
    @extschema@.ironwod_explain(uuid, uuid, date, text, text, text),
    @extschema@.ironwod_replay(uuid, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.ironwod_dashboard(uuid, uuid, date, date, text, text),
    @extschema@.ironwod_explain(uuid, uuid, date, text, text, text),
    @extschema@.ironwod_replay(uuid, uuid)
    TO ironwod_app, ironwod_admin;
GRANT EXECUTE ON FUNCTION ironwod.digest(uuid, uuid), ironwod.explain_metrics()
    TO ironwod_app, ironwod_admin, ironwod_worker;
GRANT EXECUTE ON FUNCTION ironwod.assert_scope(uuid, uuid) TO ironwod_app, ironwod_admin, ironwod_worker;

-- The demo's monthly summary: one line per cached month and location, read from the
-- cache only (security_invoker: RLS shows the caller its own scope).
--   SELECT * FROM ironwod.metrics_summary WHERE location_key = 'ALL'
--   ORDER BY month_start DESC LIMIT 12;
CREATE VIEW ironwod.metrics_summary WITH (security_invoker = true) AS
SELECT c.tenant_id, c.gym_id, c.location_key, c.month_start, c.is_partial,
       c.members_start, c.members_end, c.new_members, c.reactivated_members, c.churned_members,
       c.churn_rate, c.mrr_end AS mrr, c.collected_gross, c.collected_net, c.arm,
       c.visits_per_active_member_week,
       c.members_no_visit_14d_end AS at_risk_no_visit_14d,
       c.members_no_visit_30d_end AS at_risk_no_visit_30d,
       c.members_attendance_declining_end AS at_risk_declining
FROM ironwod.gym_monthly_metrics_cache c
WHERE c.program_key = 'ALL';
COMMENT ON VIEW ironwod.metrics_summary IS 'Headline monthly metrics from the cache (members, new, churned, churn rate, MRR, collected, ARM, visits per member-week, at-risk counts)';
GRANT SELECT ON ironwod.metrics_summary TO ironwod_app, ironwod_admin;
