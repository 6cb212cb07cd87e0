-- 82_unknowns: unknown is NULL.  A metric that depends on an entity the gym's
-- Wodify plan does not include (HTTP 403 on its endpoint, ironwod.entity_entitlements)
-- is NULL in every cached month, not the 0 that computing it from no records
-- would give.  This is the last step of every metrics computation, over the cache
-- rows only.  The masked rows name the not-entitled entities in their config_hash,
-- which then differs from the settings' hash, so every refresh while an entity is
-- refused recomputes every month (the few gyms without a part of Wodify pay that),
-- and so does the first one after a reconciliation finds the endpoint open again.

-- Which cache column depends on which entity, by metrics.md: who is a member and
-- what they pay come from memberships (§2.2, §4.1-§4.7, §4.11, §4.16, §4.17); holds
-- split ACTIVE from ON_HOLD, price MRR at 0 and leave hold days out of exposure
-- (§2.3, §2.4, §4.6, §4.7, §4.13-§4.15); visits come from class sign-ins
-- (§4.13-§4.15); past due, invoiced and paying from invoices (§4.1, §4.8, §4.10), and
-- membership revenue is payments on membership invoices (§4.9); cash from
-- transactions (§4.8-§4.12).  Columns not named (keys, time zone, period, history
-- start, versions) depend on none.
CREATE FUNCTION ironwod.metric_sources()
RETURNS TABLE (metric text, entity text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT m, v.entity
    FROM (VALUES
        ('memberships', ARRAY[
            'members_start', 'members_end', 'active_members_end', 'on_hold_members_end', 'past_due_members_end',
            'comped_members_end', 'members_pending_cancel_end', 'new_members', 'reactivated_members',
            'churned_members', 'churned_from_start', 'new_and_churned_same_month', 'net_member_change',
            'churn_rate', 'retention_rate', 'net_member_growth_rate', 'active_member_days', 'avg_active_members',
            'paying_members', 'mrr_start', 'mrr_end', 'mrr_new', 'mrr_reactivation', 'mrr_expansion',
            'mrr_contraction', 'mrr_churn', 'mrr_hold_out', 'mrr_hold_in', 'membership_revenue_recognised',
            'arm', 'service_revenue_per_active_member', 'arm_6m', 'leg_months_6m', 'ltv',
            'avg_tenure_months_end', 'member_visits', 'visits_per_active_member_week',
            'members_zero_visits_month', 'members_no_visit_14d_end', 'members_no_visit_30d_end',
            'members_attendance_declining_end', 'cohort_new_members', 'cohort_retained_90d',
            'cohort_90d_retention_rate', 'cohort_90d_is_final']),
        ('membership_holds', ARRAY[
            'active_members_end', 'on_hold_members_end', 'active_member_days', 'avg_active_members',
            'mrr_start', 'mrr_end', 'mrr_new', 'mrr_reactivation', 'mrr_expansion', 'mrr_contraction',
            'mrr_churn', 'mrr_hold_out', 'mrr_hold_in', 'arm', 'service_revenue_per_active_member', 'arm_6m',
            'ltv', 'visits_per_active_member_week', 'members_zero_visits_month', 'members_no_visit_14d_end',
            'members_no_visit_30d_end', 'members_attendance_declining_end']),
        ('class_signins', ARRAY[
            'member_visits', 'all_visits', 'appointment_visits', 'visits_per_active_member_week',
            'members_zero_visits_month', 'members_no_visit_14d_end', 'members_no_visit_30d_end',
            'members_attendance_declining_end']),
        ('invoices', ARRAY[
            'past_due_members_end', 'paying_members', 'failed_payment_amount', 'invoiced_amount',
            'invoiced_collected_to_date', 'past_due_amount_end', 'membership_revenue_recognised',
            'arm', 'arm_6m', 'ltv']),
        ('transactions', ARRAY[
            'collected_gross', 'refunds', 'collected_net', 'failed_payment_invoices', 'failed_payment_amount',
            'invoiced_collected_to_date', 'membership_revenue_recognised', 'service_revenue_net', 'arm',
            'service_revenue_per_active_member', 'arm_6m', 'ltv'])
    ) AS v(entity, metrics), unnest(v.metrics) AS m
$$;
COMMENT ON FUNCTION ironwod.metric_sources() IS 'Which gym_monthly_metrics_cache column depends on which entity (metrics.md): NULL while that entity is not entitled';

-- Program rows (metrics.md §2.5, §5.1) are known only as far as the memberships
-- say which programs they give access to (their programs field, program_ids):
-- when a membership of the gym has no such field, who belongs to a program is
-- unknown, and so is what it earns; when a membership gives access to several
-- programs, its money cannot be split between them.  programs_known: every
-- membership of the gym (not deleted) carries the field; unsplit: the program ids
-- (as program_key) some such membership shares with another program.
CREATE FUNCTION ironwod.program_knowledge(p_tenant uuid, p_gym uuid, OUT programs_known boolean, OUT unsplit text[])
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    programs_known := NOT EXISTS (SELECT 1 FROM ironwod.memberships m
                                  WHERE m.tenant_id = p_tenant AND m.gym_id = p_gym AND m.deleted_at IS NULL
                                    AND NOT m.is_deleted AND m.program_ids IS NULL);
    SELECT coalesce(array_agg(DISTINCT p.program_id::text ORDER BY p.program_id::text), '{}') INTO unsplit
    FROM ironwod.memberships m CROSS JOIN LATERAL unnest(m.program_ids) AS p(program_id)
    WHERE m.tenant_id = p_tenant AND m.gym_id = p_gym AND m.deleted_at IS NULL AND NOT m.is_deleted
      AND cardinality(m.program_ids) > 1;
END
$$;
COMMENT ON FUNCTION ironwod.program_knowledge(uuid, uuid) IS 'metrics.md §2.5: whether every membership of a gym says which programs it gives access to (programs_known), and the program keys whose revenue cannot be split because a membership shares them with another program (unsplit)';

-- The money and MRR columns of a program row: filled only when every membership
-- giving access to the program gives access to it alone (metrics.md §5.1).
CREATE FUNCTION ironwod.program_revenue_metrics() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT ARRAY['mrr_start', 'mrr_end', 'mrr_new', 'mrr_reactivation', 'mrr_expansion', 'mrr_contraction',
                 'mrr_churn', 'mrr_hold_out', 'mrr_hold_in', 'collected_gross', 'refunds', 'collected_net',
                 'failed_payment_invoices', 'failed_payment_amount', 'invoiced_amount',
                 'invoiced_collected_to_date', 'past_due_amount_end', 'membership_revenue_recognised',
                 'service_revenue_net', 'arm', 'service_revenue_per_active_member', 'arm_6m', 'ltv']
$$;
COMMENT ON FUNCTION ironwod.program_revenue_metrics() IS 'The cache columns of a program row that are NULL when the program''s revenue cannot be split (metrics.md §5.1)';

-- The final step of a metrics computation (ironwod.compute_metrics): every cached
-- month of the scoped gym gets NULL in the columns that depend on a not-entitled
-- entity, and those entities after its config_hash (the settings' hash, a space,
-- "not entitled:" and the list).  One UPDATE of constants; returns the rows it set.
CREATE FUNCTION ironwod.mask_unknown_metrics()
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_refused text[];
    v_note text := '';
    v_set text;
    v_rows integer := 0;
    v_n integer;
    k record;
BEGIN
    -- Two steps, so the query on the (distributed) entitlements joins nothing.
    SELECT array_agg(n.entity ORDER BY n.entity) INTO v_refused FROM ironwod.entity_entitlements n
    WHERE n.tenant_id = v_t AND n.gym_id = v_g;
    SELECT string_agg(format('%I = NULL', x.metric), ', ' ORDER BY x.metric) INTO v_set
    FROM (SELECT DISTINCT d.metric FROM ironwod.metric_sources() d WHERE d.entity = ANY (v_refused)) x;
    IF v_set IS NOT NULL THEN
        v_note := ' not entitled: ' || array_to_string(v_refused, ',');
        EXECUTE format('UPDATE ironwod.gym_monthly_metrics_cache x SET %s, config_hash = split_part(x.config_hash, '' '', 1) || $3 '
                       'WHERE x.tenant_id = $1 AND x.gym_id = $2', v_set)
            USING v_t, v_g, v_note;
        GET DIAGNOSTICS v_rows = ROW_COUNT;
    END IF;
    -- Program rows: unknown people and money, or unsplit money (program_knowledge),
    -- noted after the settings' hash and the entitlement note.
    k := ironwod.program_knowledge(v_t, v_g);
    IF NOT k.programs_known THEN
        SELECT string_agg(format('%I = NULL', x.metric), ', ' ORDER BY x.metric) INTO v_set
        FROM (SELECT DISTINCT d.metric FROM ironwod.metric_sources() d
              WHERE d.entity IN ('memberships', 'invoices', 'transactions')) x;
        EXECUTE format('UPDATE ironwod.gym_monthly_metrics_cache x SET %s, config_hash = split_part(x.config_hash, '' '', 1) || $3 '
                       'WHERE x.tenant_id = $1 AND x.gym_id = $2 AND x.program_key <> ''ALL''', v_set)
            USING v_t, v_g, v_note || ' programs unknown';
        GET DIAGNOSTICS v_n = ROW_COUNT;
        v_rows := v_rows + v_n;
    ELSIF cardinality(k.unsplit) > 0 THEN
        SELECT string_agg(format('%I = NULL', x.metric), ', ' ORDER BY x.metric) INTO v_set
        FROM unnest(ironwod.program_revenue_metrics()) AS x(metric);
        EXECUTE format('UPDATE ironwod.gym_monthly_metrics_cache x SET %s, config_hash = split_part(x.config_hash, '' '', 1) || $3 '
                       'WHERE x.tenant_id = $1 AND x.gym_id = $2 AND x.program_key = ANY ($4)', v_set)
            USING v_t, v_g, v_note || ' revenue not split', k.unsplit;
        GET DIAGNOSTICS v_n = ROW_COUNT;
        v_rows := v_rows + v_n;
    END IF;
    RETURN v_rows;
END
$$;
COMMENT ON FUNCTION ironwod.mask_unknown_metrics() IS 'Last step of a metrics computation: NULL (unknown) in every cached month for the metrics that depend on an entity the gym''s plan does not include, and those entities named in config_hash (so the next refresh recomputes every month); on program rows, NULL people and money when the memberships do not say their programs, NULL money when a program''s revenue cannot be split (noted in config_hash too)';

GRANT EXECUTE ON FUNCTION ironwod.metric_sources(), ironwod.mask_unknown_metrics(), ironwod.program_knowledge(uuid, uuid),
    ironwod.program_revenue_metrics() TO ironwod_worker;
GRANT EXECUTE ON FUNCTION ironwod.metric_sources() TO ironwod_app, ironwod_admin;
