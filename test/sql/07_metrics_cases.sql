-- The worked cases of metrics.md §6, each in its own fake gym (America/Chicago,
-- monthly billing), built from raw Wodify JSON inserted directly into the raw
-- tables (as superuser, no worker), then transformed and computed with the clock
-- frozen (setting ironwod_metrics.today).  Every expected number is the one §6 gives.
SET client_min_messages = warning;

CREATE FUNCTION public.fx_gym_id(p_case int) RETURNS uuid
LANGUAGE sql IMMUTABLE AS $$ SELECT ('f0000000-0000-0000-0000-' || lpad(p_case::text, 12, '0'))::uuid $$;
CREATE FUNCTION public.fx_tenant() RETURNS uuid
LANGUAGE sql IMMUTABLE AS $$ SELECT 'f0000000-0000-0000-0000-000000000000'::uuid $$;

-- Land one raw record of an entity for a case's gym.
CREATE FUNCTION public.fx_raw(p_case int, p_entity text, p_payload jsonb, p_run bigint DEFAULT 1,
                              p_updated timestamptz DEFAULT '2024-01-01 00:00Z') RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('INSERT INTO ironwod.%I (tenant_id, gym_id, wodify_id, payload_json, payload_hash,
                        source_updated_at, ingest_run_id, last_seen_run_id)
                    VALUES ($1, $2, $3, $4, sha256(convert_to($4::text, ''UTF8'')), $5, $6, $6)',
                   'wodify_raw_' || p_entity)
    USING fx_tenant(), fx_gym_id(p_case), (p_payload->>'id')::bigint, p_payload, p_updated, p_run;
END $$;

-- A gym with location 1001 (and 1002) in America/Chicago, history from July 2023.
CREATE FUNCTION public.fx_gym(p_case int, p_two_locations boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ironwod.integrations_wodify_connection (tenant_id, gym_id, status)
    VALUES (fx_tenant(), fx_gym_id(p_case), 'disconnected');
    INSERT INTO ironwod.metric_settings (tenant_id, gym_id, history_start_date)
    VALUES (fx_tenant(), fx_gym_id(p_case), '2023-07-01');
    PERFORM fx_raw(p_case, 'locations', jsonb_build_object('id', l, 'name', 'Case ' || p_case || ' ' || l,
                   'time_zone_iana', 'America/Chicago'))
    FROM unnest(CASE WHEN p_two_locations THEN '{1001,1002}'::int[] ELSE '{1001}' END) AS l;
END $$;

CREATE FUNCTION public.fx_mem(p_case int, p_id bigint, p_client bigint, p_start date, p_end date, p_price numeric,
                              p_unit text DEFAULT 'Month(s)', p_len int DEFAULT 1, p_loc bigint DEFAULT 1001,
                              p_cancel_requested date DEFAULT NULL, p_run bigint DEFAULT 1) RETURNS void
LANGUAGE sql AS $$
    SELECT fx_raw(p_case, 'memberships', jsonb_build_object(
        'id', p_id, 'client_id', p_client, 'name', 'Plan ' || p_id, 'membership_type', 'Class Plan',
        'is_deleted', false, 'start_date', p_start, 'end_date', coalesce(p_end, '1900-01-01'),
        'cancellation_requested_on', coalesce(p_cancel_requested, '1900-01-01'), 'location_id', p_loc,
        'payment_plan', jsonb_build_object('price', p_price, 'billing_period_length', p_len,
                                           'billing_period_unit', p_unit, 'is_auto_renew', true)), p_run)
$$;
CREATE FUNCTION public.fx_hold(p_case int, p_id bigint, p_membership bigint, p_client bigint, p_start date, p_end date)
RETURNS void LANGUAGE sql AS $$
    SELECT fx_raw(p_case, 'membership_holds', jsonb_build_object('id', p_id, 'membership_id', p_membership,
        'client_id', p_client, 'hold_start_date', p_start, 'hold_end_date', p_end, 'hold_reason', 'Travel'))
$$;
CREATE FUNCTION public.fx_inv(p_case int, p_id bigint, p_client bigint, p_membership bigint, p_due date,
                              p_paid_on date, p_status text, p_amount numeric, p_loc bigint DEFAULT 1001)
RETURNS void LANGUAGE sql AS $$
    SELECT fx_raw(p_case, 'invoices', jsonb_build_object('id', p_id, 'client_id', p_client,
        'membership_id', coalesce(p_membership, 0), 'payment_due', p_due,
        'paid_on_date', coalesce(p_paid_on, '1900-01-01'), 'invoice_header_status', p_status,
        'final_charge', p_amount, 'location_id', p_loc))
$$;
-- p_at is a Chicago wall-clock time; the payload carries it as UTC, like Wodify.
CREATE FUNCTION public.fx_txn(p_case int, p_id bigint, p_invoice bigint, p_client bigint, p_at timestamp,
                              p_amount numeric, p_type text DEFAULT 'Payment', p_loc bigint DEFAULT 1001)
RETURNS void LANGUAGE sql AS $$
    SELECT fx_raw(p_case, 'transactions', jsonb_build_object('id', p_id, 'invoice_id', p_invoice,
        'client_id', p_client, 'location_id', p_loc,
        'transaction_date_time', to_char((p_at AT TIME ZONE 'America/Chicago') AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
        'amount', p_amount, 'transaction_type', p_type, 'payment_method', 'Card'))
$$;
CREATE FUNCTION public.fx_signin(p_case int, p_id bigint, p_client bigint, p_at timestamp, p_loc bigint DEFAULT 1001)
RETURNS void LANGUAGE sql AS $$
    SELECT fx_raw(p_case, 'class_signins', jsonb_build_object('id', p_id, 'client_id', p_client,
        'class_id', p_id * 10, 'location_id', p_loc, 'membership_id', 0,
        'utc_class_start_datetime', to_char((p_at AT TIME ZONE 'America/Chicago') AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')))
$$;
-- Transform and compute a case's gym from raw, with today frozen.
CREATE FUNCTION public.fx_build(p_case int, p_today date DEFAULT '2025-12-15') RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ironwod_set_scope(fx_tenant(), fx_gym_id(p_case));
    EXECUTE format('SET LOCAL ironwod_metrics.today = %L', p_today);
    PERFORM ironwod.transform_all();
    PERFORM ironwod.refresh_metrics_all();
END $$;
-- A case's cached row for a month.
CREATE FUNCTION public.fx_month(p_case int, p_month date, p_location text DEFAULT 'ALL')
RETURNS SETOF ironwod.gym_monthly_metrics_cache
LANGUAGE sql AS $$
    SELECT * FROM ironwod.gym_monthly_metrics_cache
    WHERE tenant_id = fx_tenant() AND gym_id = fx_gym_id(p_case) AND location_key = p_location AND month_start = p_month
$$;

-- Fixtures.  Client ids are 100 + case; every paid plan has its invoice paid, so no
-- short spell is taken for a rescinded one by accident.
BEGIN;
-- 1  Joins 1 Feb.
SELECT fx_gym(1), fx_mem(1, 11, 101, '2024-02-01', NULL, 150);
-- 2  Cancels on 10 Jan, last covered day 31 Jan.
SELECT fx_gym(2), fx_mem(2, 21, 102, '2023-10-01', '2024-01-31', 150, p_cancel_requested => '2024-01-10');
-- 3  Joins 5 Mar, cancelled effective 20 Mar (last day 19 Mar), paid $150.
SELECT fx_gym(3), fx_mem(3, 31, 103, '2024-03-05', '2024-03-19', 150, p_cancel_requested => '2024-03-12'),
       fx_inv(3, 301, 103, 31, '2024-03-05', '2024-03-05', 'Paid', 150),
       fx_txn(3, 3001, 301, 103, '2024-03-05 09:00', 150);
-- 4  Joins and is cancelled the same day, full refund.
SELECT fx_gym(4), fx_mem(4, 41, 104, '2024-04-10', '2024-04-10', 150, p_cancel_requested => '2024-04-10'),
       fx_inv(4, 401, 104, 41, '2024-04-10', '2024-04-10', 'Refunded', 150),
       fx_txn(4, 4001, 401, 104, '2024-04-10 09:00', 150),
       fx_txn(4, 4002, 401, 104, '2024-04-10 17:00', 150, 'Refund');
-- 5  Unlimited ($175) -> 3x/week ($145) on 15 Apr.
SELECT fx_gym(5), fx_mem(5, 51, 105, '2024-01-01', '2024-04-14', 175, p_cancel_requested => '2024-04-01'),
       fx_mem(5, 52, 105, '2024-04-15', NULL, 145);
-- 6  Lapses 1 May, re-signs 5 May (4-day gap).
SELECT fx_gym(6), fx_mem(6, 61, 106, '2024-01-01', '2024-04-30', 150, p_cancel_requested => '2024-04-20'),
       fx_mem(6, 62, 106, '2024-05-05', NULL, 150);
-- 7  Lapses 1 May, re-signs 20 May (19-day gap), same price.
SELECT fx_gym(7), fx_mem(7, 71, 107, '2024-01-01', '2024-04-30', 150, p_cancel_requested => '2024-04-20'),
       fx_mem(7, 72, 107, '2024-05-20', NULL, 150);
-- 8  Hold 20 Jun - 10 Jul (inclusive); last visit 19 Jun.
SELECT fx_gym(8), fx_mem(8, 81, 108, '2024-01-01', NULL, 150), fx_hold(8, 801, 81, 108, '2024-06-20', '2024-07-10'),
       fx_signin(8, 8001, 108, '2024-06-19 18:00');
-- 9  CrossFit ($150) + Oly ($60); Oly dropped after 15 Aug.
SELECT fx_gym(9), fx_mem(9, 91, 109, '2024-01-01', NULL, 150),
       fx_mem(9, 92, 109, '2024-01-01', '2024-08-15', 60, p_cancel_requested => '2024-08-01');
-- 10 Card fails 1 Aug (twice), paid 12 Aug.
SELECT fx_gym(10), fx_mem(10, 101, 110, '2024-01-01', NULL, 150),
       fx_inv(10, 1001, 110, 101, '2024-08-01', '2024-08-12', 'Paid', 150),
       fx_txn(10, 10001, 1001, 110, '2024-08-01 00:10', 150, 'Failed Payment'),
       fx_txn(10, 10002, 1001, 110, '2024-08-05 00:10', 150, 'Failed Payment'),
       fx_txn(10, 10003, 1001, 110, '2024-08-12 10:00', 150);
-- 11 Card fails 1 Aug, still unpaid at 31 Aug, membership still active.
SELECT fx_gym(11), fx_mem(11, 111, 111, '2024-01-01', NULL, 150),
       fx_inv(11, 1101, 111, 111, '2024-08-01', NULL, 'Unpaid', 150),
       fx_txn(11, 11001, 1101, 111, '2024-08-01 00:10', 150, 'Failed Payment');
-- 12 12-month paid-in-full $1,800 paid 3 Sep.
SELECT fx_gym(12), fx_mem(12, 121, 112, '2024-09-03', NULL, 1800, 'Year(s)', 1),
       fx_inv(12, 1201, 112, 121, '2024-09-03', '2024-09-03', 'Paid', 1800),
       fx_txn(12, 12001, 1201, 112, '2024-09-03 10:00', 1800);
-- 13 Refund on 2 Oct of a September payment ($50 of $150).
SELECT fx_gym(13), fx_mem(13, 131, 113, '2024-01-01', NULL, 150),
       fx_inv(13, 1301, 113, 131, '2024-09-01', '2024-09-01', 'Partially Refunded', 150),
       fx_txn(13, 13001, 1301, 113, '2024-09-01 09:00', 150),
       fx_txn(13, 13002, 1301, 113, '2024-10-02 09:00', 50, 'Refund');
-- 14 Transaction at 2024-11-30 23:30 Chicago (2024-12-01 05:30 UTC).
SELECT fx_gym(14), fx_inv(14, 1401, 114, NULL, '2024-11-30', '2024-11-30', 'Paid', 99),
       fx_txn(14, 14001, 1401, 114, '2024-11-30 23:30', 99);
-- 15 Moves from location 1001 to 1002 on 1 Nov.
SELECT fx_gym(15, true), fx_mem(15, 151, 115, '2024-01-01', '2024-10-31', 150, p_loc => 1001, p_cancel_requested => '2024-10-15'),
       fx_mem(15, 152, 115, '2024-11-01', NULL, 150, p_loc => 1002);
-- 16 New member joined 1 Dec, never attended.
SELECT fx_gym(16), fx_mem(16, 161, 116, '2024-12-01', NULL, 150);
-- 17 Plan ended 31 Dec; the run on 2 Jan sees only that.
SELECT fx_gym(17), fx_mem(17, 171, 117, '2024-06-01', '2024-12-31', 150, p_cancel_requested => '2024-12-10');
COMMIT;

BEGIN;
SELECT fx_build(n) FROM generate_series(1, 16) AS n;
SELECT fx_build(17, '2025-01-02');
COMMIT;
-- Raw to canonical: sentinels are NULL, money numeric, UTC instants kept as instants.
SELECT membership_id, start_date, end_date, cancellation_requested_on, price, billing_period_unit
FROM ironwod.memberships WHERE gym_id = fx_gym_id(1);
SELECT invoice_id, membership_id, paid_on, status, amount FROM ironwod.invoices WHERE gym_id = fx_gym_id(11);
SELECT transaction_id, processed_at AT TIME ZONE 'UTC' AS processed_utc FROM ironwod.transactions WHERE gym_id = fx_gym_id(14);

-- 1  new in Feb; not in members_start(Feb); in members_end(Feb).
SELECT month_start, members_start, members_end, new_members, churned_members FROM fx_month(1, '2024-02-01');
-- 2  in members_end(Jan) and pending cancel in Jan (not yet in Dec); churned in Feb; Feb churn rate 1/1.
SELECT month_start, members_end, members_pending_cancel_end, churned_members, churned_from_start, churn_rate
FROM fx_month(2, '2023-12-01') UNION ALL SELECT month_start, members_end, members_pending_cancel_end, churned_members, churned_from_start, churn_rate
FROM fx_month(2, '2024-01-01') UNION ALL SELECT month_start, members_end, members_pending_cancel_end, churned_members, churned_from_start, churn_rate
FROM fx_month(2, '2024-02-01');
-- 3  new +1, churned +1, new_and_churned +1 in Mar; not in the churn-rate numerator.
SELECT new_members, churned_members, new_and_churned_same_month, churned_from_start, members_end FROM fx_month(3, '2024-03-01');
-- 4  rescinded: in no count; the cash shows in gross and refunds (net 0).
SELECT month_start, members_end, new_members, churned_members, active_member_days, collected_gross, refunds, collected_net
FROM fx_month(4, '2024-04-01') UNION ALL SELECT month_start, members_end, new_members, churned_members, active_member_days, collected_gross, refunds, collected_net
FROM fx_month(4, '2024-05-01');
SELECT rescinded, spell_no FROM ironwod.member_spell WHERE gym_id = fx_gym_id(4) AND location_key = 'ALL';
-- 5  no churn, no new; contraction of 30 in Apr.
SELECT new_members, reactivated_members, churned_members, members_end, mrr_start, mrr_end, mrr_contraction FROM fx_month(5, '2024-04-01');
-- 6  merged: no churn or reactivation; a member (ACTIVE) on every May day.
SELECT churned_members, reactivated_members, members_end, active_member_days, period_days FROM fx_month(6, '2024-05-01');
-- 7  churned +1 and reactivated +1 in May, not in churned_from_start; no MRR churn or reactivation.
SELECT churned_members, reactivated_members, churned_from_start, members_end, mrr_churn, mrr_reactivation, mrr_expansion, mrr_contraction
FROM fx_month(7, '2024-05-01');
-- 8  on hold at 30 Jun: member and on hold; hold-out in Jun, hold-in in Jul; hold days are not
--    active days and do not count towards absence (21 active days since the last visit).
SELECT month_start, members_end, on_hold_members_end, churned_members, mrr_hold_out, mrr_hold_in, active_member_days,
       members_no_visit_14d_end, members_no_visit_30d_end
FROM fx_month(8, '2024-06-01') UNION ALL SELECT month_start, members_end, on_hold_members_end, churned_members, mrr_hold_out, mrr_hold_in, active_member_days,
       members_no_visit_14d_end, members_no_visit_30d_end
FROM fx_month(8, '2024-07-01');
-- 9  still a member; contraction of the Oly price.
SELECT members_end, churned_members, mrr_start, mrr_end, mrr_contraction FROM fx_month(9, '2024-08-01');
-- 10 member all month; one failed invoice however many retries; collected in Aug; not past due at month end.
SELECT members_end, failed_payment_invoices, failed_payment_amount, collected_gross, past_due_members_end FROM fx_month(10, '2024-08-01');
-- 11 past due at month end (member and amount); not churned.
SELECT members_end, churned_members, past_due_members_end, past_due_amount_end FROM fx_month(11, '2024-08-01');
-- 12 collected $1,800 in Sep; $150 recognised each month Sep 2024 - Aug 2025, none in Sep 2025; MRR $150.
SELECT collected_gross, membership_revenue_recognised, mrr_end FROM fx_month(12, '2024-09-01');
SELECT count(*) AS months_with_150, min(month_start), max(month_start)
FROM ironwod.gym_monthly_metrics_cache
WHERE gym_id = fx_gym_id(12) AND location_key = 'ALL' AND membership_revenue_recognised = 150;
SELECT membership_revenue_recognised FROM fx_month(12, '2025-09-01');
-- 13 refund counted in Oct; Sep unchanged; MRR unchanged.
SELECT month_start, collected_gross, refunds, collected_net, mrr_end
FROM fx_month(13, '2024-09-01') UNION ALL SELECT month_start, collected_gross, refunds, collected_net, mrr_end FROM fx_month(13, '2024-10-01');
-- 14 bucketed in November.
SELECT month_start, collected_gross FROM fx_month(14, '2024-11-01') UNION ALL SELECT month_start, collected_gross FROM fx_month(14, '2024-12-01');
-- 15 location 1001: churned in Nov; location 1002: new in Nov; ALL: no flow.
SELECT location_key, members_start, members_end, new_members, reactivated_members, churned_members
FROM fx_month(15, '2024-11-01', '1001') UNION ALL SELECT location_key, members_start, members_end, new_members, reactivated_members, churned_members
FROM fx_month(15, '2024-11-01', '1002') UNION ALL SELECT location_key, members_start, members_end, new_members, reactivated_members, churned_members
FROM fx_month(15, '2024-11-01', 'ALL');
-- 16 31 active days without a visit: in both absence counters.
SELECT new_members, members_no_visit_14d_end, members_no_visit_30d_end FROM fx_month(16, '2024-12-01');
BEGIN;
SELECT ironwod_set_scope(fx_tenant(), fx_gym_id(16));
SELECT member_id, absent_active_days, flags FROM ironwod_explain(fx_tenant(), fx_gym_id(16), '2024-12-01', 'at_risk');
COMMIT;
-- 17 The 2 Jan run shows a provisional churn in January.
SELECT month_start, is_partial, members_end, churned_members FROM fx_month(17, '2024-12-01')
UNION ALL SELECT month_start, is_partial, members_end, churned_members FROM fx_month(17, '2025-01-01');
SELECT members_pending_cancel_end FROM fx_month(17, '2024-12-01');
-- The rows as jsonb, not as the temp table's row type: on Citus the join below
-- runs on the nodes, which do not know that type.
CREATE TEMP TABLE case17_before AS
SELECT c.tenant_id, c.gym_id, c.location_key, c.program_key, c.month_start, to_jsonb(c) - 'computed_at' AS j
FROM ironwod.gym_monthly_metrics_cache c WHERE c.gym_id = fx_gym_id(17) AND c.month_start < '2024-12-01';
-- The re-sign-up on 4 Jan lands in run 2; the 5 Jan run merges the spells: no churn,
-- January still provisional.
BEGIN;
SELECT fx_mem(17, 172, 117, '2025-01-04', NULL, 150, p_run => 2);
SELECT ironwod_set_scope(fx_tenant(), fx_gym_id(17));
SET LOCAL ironwod_metrics.today = '2025-01-05';
SELECT ironwod.transform_run(2) -> 'memberships' AS transformed;
SELECT r->'from' AS recompute_from, r->'full' AS full_rebuild FROM ironwod.refresh_metrics(2) AS r;
SELECT month_start, is_partial, members_end, churned_members, reactivated_members FROM fx_month(17, '2025-01-01');
-- December (not yet closed on 5 Jan: its end + 7 days has not passed) keeps its
-- member; its pending cancellation is gone, since the spell no longer ends.  Closed
-- months are unchanged.
SELECT month_start, is_partial, members_end, members_pending_cancel_end FROM fx_month(17, '2024-12-01');
SELECT count(*) AS closed_months, bool_and(b.j = (to_jsonb(c) - 'computed_at')) AS closed_unchanged
FROM case17_before b JOIN ironwod.gym_monthly_metrics_cache c USING (tenant_id, gym_id, location_key, program_key, month_start);
-- Idempotent: a second transform and refresh of the same run change nothing.
SELECT ironwod.transform_run(2) AS second_transform;
SELECT ironwod.digest(fx_tenant(), fx_gym_id(17)) AS d1 \gset
SELECT ironwod.refresh_metrics(2) ->> 'cache_rows' IS NOT NULL AS refreshed_again;
SELECT ironwod.digest(fx_tenant(), fx_gym_id(17)) = :'d1' AS digest_unchanged;
COMMIT;

-- 18 Program rows (metrics.md §2.5, §5.1).  Programs 501 CrossFit, 502 Oly, 503 Yoga.
--    Client 118 has a plan giving access to 501 and 502 from Jan, and adds a 503
--    plan on 1 Mar; client 218 has a 503 plan Jan - Mar.  In Feb 118 visits an Oly
--    class, 218 a CrossFit class.  19: a gym whose memberships say nothing of
--    programs, with one class of its program 601.
CREATE FUNCTION public.fx_mem_programs(p_case int, p_id bigint, p_client bigint, p_start date, p_end date,
                                       p_price numeric, p_programs bigint[]) RETURNS void
LANGUAGE sql AS $$
    SELECT fx_raw(p_case, 'memberships', jsonb_build_object(
        'id', p_id, 'client_id', p_client, 'name', 'Plan ' || p_id, 'membership_type', 'Class Plan',
        'is_deleted', false, 'start_date', p_start, 'end_date', coalesce(p_end, '1900-01-01'),
        'cancellation_requested_on', '1900-01-01', 'location_id', 1001,
        'programs', (SELECT jsonb_agg(jsonb_build_object('program_id', x, 'program', 'Program ' || x)) FROM unnest(p_programs) x),
        'payment_plan', jsonb_build_object('price', p_price, 'billing_period_length', 1,
                                           'billing_period_unit', 'Month(s)', 'is_auto_renew', true)))
$$;
CREATE FUNCTION public.fx_class(p_case int, p_id bigint, p_client bigint, p_at timestamp, p_program bigint) RETURNS void
LANGUAGE sql AS $$
    SELECT fx_raw(p_case, 'class_signins', jsonb_build_object('id', p_id, 'client_id', p_client,
        'class_id', p_id * 10, 'location_id', 1001, 'membership_id', 0, 'program_id', p_program,
        'utc_class_start_datetime', to_char((p_at AT TIME ZONE 'America/Chicago') AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')))
$$;
BEGIN;
SELECT fx_gym(18);
SELECT fx_raw(18, 'programs', jsonb_build_object('id', p, 'name', 'Program ' || p, 'is_active', true))
FROM unnest('{501,502,503}'::bigint[]) p;
SELECT fx_mem_programs(18, 181, 118, '2024-01-01', NULL, 175, '{501,502}'),
       fx_mem_programs(18, 182, 218, '2024-01-01', '2024-03-31', 80, '{503}'),
       fx_mem_programs(18, 183, 118, '2024-03-01', NULL, 80, '{503}'),
       fx_inv(18, 1811, 118, 181, '2024-02-01', '2024-02-01', 'Paid', 175),
       fx_txn(18, 18001, 1811, 118, '2024-02-01 09:00', 175),
       fx_inv(18, 1821, 218, 182, '2024-02-01', '2024-02-01', 'Paid', 80),
       fx_txn(18, 18002, 1821, 218, '2024-02-01 09:30', 80),
       fx_class(18, 18101, 118, '2024-02-10 09:00', 502),
       fx_class(18, 18102, 218, '2024-02-12 18:00', 501);
SELECT fx_gym(19), fx_raw(19, 'programs', '{"id": 601, "name": "CrossFit", "is_active": true}'),
       fx_mem(19, 191, 119, '2024-01-01', NULL, 150), fx_class(19, 19101, 119, '2024-02-10 09:00', 601);
COMMIT;
BEGIN;
SELECT fx_build(18), fx_build(19);
COMMIT;
SELECT program_ids FROM ironwod.memberships WHERE gym_id = fx_gym_id(18) ORDER BY membership_id;
-- One row per program at location ALL, besides the ALL rows.
SELECT location_key, program_key, count(*) AS months FROM ironwod.gym_monthly_metrics_cache
WHERE gym_id = fx_gym_id(18) GROUP BY 1, 2 ORDER BY 1, 2;
-- Feb: 118 counts in 501 and 502, 218 in 503, each person once at ALL (counts do not
-- add up); visits follow the class's program (218's CrossFit visit is not a member
-- visit there); 503's money is its plan's alone, 501's and 502's cannot be split.
SELECT program_key, members_end, active_members_end, all_visits, member_visits, mrr_end, collected_gross,
       membership_revenue_recognised, arm
FROM ironwod.gym_monthly_metrics_cache
WHERE gym_id = fx_gym_id(18) AND location_key = 'ALL' AND month_start = '2024-02-01' ORDER BY program_key;
-- Mar: 118 is new at 503 (a first spell there) while the gym sees no flow; Apr: 218 churns at 503 and ALL.
SELECT month_start, program_key, members_start, members_end, new_members, churned_members, mrr_new, mrr_churn
FROM ironwod.gym_monthly_metrics_cache
WHERE gym_id = fx_gym_id(18) AND location_key = 'ALL' AND month_start IN ('2024-03-01', '2024-04-01')
  AND program_key IN ('ALL', '503')
ORDER BY 1, 2;
-- Without programs on the memberships: the program row has its visits, and people and money unknown.
SELECT program_key, members_end, new_members, member_visits, all_visits, mrr_end, collected_gross
FROM ironwod.gym_monthly_metrics_cache
WHERE gym_id = fx_gym_id(19) AND location_key = 'ALL' AND month_start = '2024-02-01' ORDER BY program_key;
-- The snapshot identity and the MRR bridge hold on every program row of every case.
SELECT count(*) > 0 AS program_rows,
       count(*) FILTER (WHERE new_members IS NOT NULL
                          AND members_end <> members_start + new_members + reactivated_members - churned_members) AS identity_broken,
       count(*) FILTER (WHERE mrr_new IS NOT NULL
                          AND mrr_end <> mrr_start + mrr_new + mrr_reactivation + mrr_expansion - mrr_contraction
                                         - mrr_churn - mrr_hold_out + mrr_hold_in) AS bridge_broken
FROM ironwod.gym_monthly_metrics_cache WHERE tenant_id = fx_tenant() AND program_key <> 'ALL';
-- Reads take a program: the dashboard, and a drill-down of the program's facts.
BEGIN;
SELECT ironwod_set_scope(fx_tenant(), fx_gym_id(18));
SELECT month_start, program_key, members_end FROM ironwod_dashboard(fx_tenant(), fx_gym_id(18), '2024-02-01', '2024-04-01', 'ALL', '503');
SELECT member_id, location_key, state_start, state_end FROM ironwod_explain(fx_tenant(), fx_gym_id(18), '2024-03-01', 'new_members', 'ALL', '503');
SELECT count(*) AS members_end_502 FROM ironwod_explain(fx_tenant(), fx_gym_id(18), '2024-02-01', 'members_end', p_program => '502');
SELECT try(format('SELECT * FROM ironwod_explain(%L, %L, %L, %L, %L, %L)', fx_tenant(), fx_gym_id(18), '2024-03-01', 'mrr_new', 'ALL', '501')) AS unsplit_mrr;
SELECT try(format('SELECT * FROM ironwod_dashboard(%L, %L, %L, %L, %L, %L)', fx_tenant(), fx_gym_id(18), '2024-02-01', '2024-03-01', 'ALL', '999')) AS unknown_program;
SELECT try(format('SELECT * FROM ironwod_dashboard(%L, %L, %L, %L, %L, %L)', fx_tenant(), fx_gym_id(18), '2024-02-01', '2024-03-01', '1001', '501')) AS program_at_a_location;
COMMIT;
BEGIN;
SELECT ironwod_set_scope(fx_tenant(), fx_gym_id(19));
SELECT try(format('SELECT * FROM ironwod_explain(%L, %L, %L, %L, %L, %L)', fx_tenant(), fx_gym_id(19), '2024-02-01', 'members_end', 'ALL', '601')) AS programs_unknown;
COMMIT;
RESET client_min_messages;
