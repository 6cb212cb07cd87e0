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
    v_note text;
    v_set text;
    v_rows integer;
BEGIN
    -- Two steps, so the query on the (distributed) entitlements joins nothing.
    SELECT array_agg(n.entity ORDER BY n.entity) INTO v_refused FROM ironwod.entity_entitlements n
    WHERE n.tenant_id = v_t AND n.gym_id = v_g;
    v_note := ' not entitled: ' || array_to_string(v_refused, ',');
    SELECT string_agg(format('%I = NULL', x.metric), ', ' ORDER BY x.metric) INTO v_set
    FROM (SELECT DISTINCT d.metric FROM ironwod.metric_sources() d WHERE d.entity = ANY (v_refused)) x;
    IF v_set IS NULL THEN
        RETURN 0;
    END IF;
    EXECUTE format('UPDATE ironwod.gym_monthly_metrics_cache x SET %s, config_hash = split_part(x.config_hash, '' '', 1) || $3 '
                   'WHERE x.tenant_id = $1 AND x.gym_id = $2', v_set)
        USING v_t, v_g, v_note;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    RETURN v_rows;
END
$$;
COMMENT ON FUNCTION ironwod.mask_unknown_metrics() IS 'Last step of a metrics computation: NULL (unknown) in every cached month for the metrics that depend on an entity the gym''s plan does not include, and those entities named in config_hash (so the next refresh recomputes every month)';

GRANT EXECUTE ON FUNCTION ironwod.metric_sources(), ironwod.mask_unknown_metrics() TO ironwod_worker;
GRANT EXECUTE ON FUNCTION ironwod.metric_sources() TO ironwod_app, ironwod_admin;
