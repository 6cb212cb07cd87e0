-- pgTAP: the refresh stages of 80_metrics on a small fixture gym (raw Wodify JSON,
-- transformed and computed with the clock frozen), for what the worked cases of
-- test 07 do not reach: the absence count of a returning member starts at the new
-- spell, the spans cover every day once, each stage names its metrics.md section,
-- and a nightly refresh recomputes the closed months only for the people who changed.
BEGIN;
SELECT plan(10);
SET LOCAL client_min_messages = warning;

CREATE FUNCTION pg_temp.raw(p_entity text, p_payload jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('INSERT INTO ironwod.%I (tenant_id, gym_id, wodify_id, payload_json, payload_hash,
                        source_updated_at, ingest_run_id, last_seen_run_id)
                    VALUES ($1, $2, $3, $4, sha256(convert_to($4::text, ''UTF8'')), $5, 1, 1)',
                   'wodify_raw_' || p_entity)
    USING 'f7000000-0000-0000-0000-000000000000'::uuid, 'f7000000-0000-0000-0000-000000000001'::uuid,
          (p_payload ->> 'id')::bigint, p_payload, '2024-01-01 00:00Z'::timestamptz;
END $$;

INSERT INTO ironwod.integrations_wodify_connection (tenant_id, gym_id, status)
VALUES ('f7000000-0000-0000-0000-000000000000', 'f7000000-0000-0000-0000-000000000001', 'disconnected');
INSERT INTO ironwod.metric_settings (tenant_id, gym_id, history_start_date)
VALUES ('f7000000-0000-0000-0000-000000000000', 'f7000000-0000-0000-0000-000000000001', '2023-07-01');
SELECT pg_temp.raw('locations', '{"id": 1001, "name": "Stages", "time_zone_iana": "America/Chicago"}');
-- Member 902: a first spell Aug - Oct 2023 with one visit on 15 Sep, then a second
-- spell from 1 Feb 2024 without visits.  Member 903: on hold 10 - 19 Apr 2024.
SELECT pg_temp.raw('memberships', jsonb_build_object('id', m.id, 'client_id', m.client, 'name', 'Plan',
           'membership_type', 'Class Plan', 'is_deleted', false, 'start_date', m.s, 'end_date', m.e,
           'cancellation_requested_on', '1900-01-01', 'location_id', 1001,
           'payment_plan', jsonb_build_object('price', 150, 'billing_period_length', 1,
                                              'billing_period_unit', 'Month(s)', 'is_auto_renew', true)))
FROM (VALUES (9021, 902, '2023-08-01', '2023-10-31'), (9022, 902, '2024-02-01', '1900-01-01'),
             (9031, 903, '2023-09-01', '1900-01-01')) AS m(id, client, s, e);
SELECT pg_temp.raw('membership_holds', '{"id": 9301, "membership_id": 9031, "client_id": 903,
                    "hold_start_date": "2024-04-10", "hold_end_date": "2024-04-19", "hold_reason": "Travel"}');
SELECT pg_temp.raw('invoices', jsonb_build_object('id', 9000 + m, 'client_id', m / 10, 'membership_id', m,
           'payment_due', '2023-09-01', 'paid_on_date', '2023-09-01', 'invoice_header_status', 'Paid',
           'final_charge', 150, 'location_id', 1001))
FROM unnest('{9021,9022,9031}'::int[]) AS m;
SELECT pg_temp.raw('transactions', jsonb_build_object('id', 8000 + m, 'invoice_id', 9000 + m, 'client_id', m / 10,
           'location_id', 1001, 'transaction_date_time', '2023-09-01T15:00:00Z', 'amount', 150,
           'transaction_type', 'Payment', 'payment_method', 'Card'))
FROM unnest('{9021,9022,9031}'::int[]) AS m;
SELECT pg_temp.raw('class_signins', '{"id": 7001, "client_id": 902, "class_id": 70010, "location_id": 1001,
                    "membership_id": 0, "utc_class_start_datetime": "2023-09-15T15:00:00Z"}');

SELECT ironwod_set_scope('f7000000-0000-0000-0000-000000000000', 'f7000000-0000-0000-0000-000000000001');
SET LOCAL ironwod_metrics.today = '2024-05-15';
SELECT ironwod.transform_all();
SELECT ironwod.refresh_metrics_all();

-- (Rows compared as text: Citus cannot return an anonymous record from a node.)
-- §4.14: ACTIVE days since max(last visit, spell start - 1): the visit of the first
-- spell does not count against the second (Feb + Mar 2024 = 60 days, not 106).
SELECT is((SELECT absent_active_days FROM ironwod.member_month_fact
           WHERE gym_id = 'f7000000-0000-0000-0000-000000000001' AND location_key = 'ALL'
             AND member_id = 902 AND month_start = '2024-03-01'),
          60, 'absence of a returning member counts from the start of the new spell');
SELECT is((SELECT (reactivated_events, tenure_active_days)::text FROM ironwod.member_month_fact
           WHERE gym_id = 'f7000000-0000-0000-0000-000000000001' AND location_key = 'ALL'
             AND member_id = 902 AND month_start = '2024-02-01'),
          (1, 92 + 29)::text, 'the second spell is a reactivation; tenure counts both spells'' ACTIVE days');
-- §2.4: hold days are ON_HOLD, not ACTIVE, and are no exposure.
SELECT is((SELECT (active_days, hold_days, state_end)::text FROM ironwod.member_month_fact
           WHERE gym_id = 'f7000000-0000-0000-0000-000000000001' AND location_key = 'ALL'
             AND member_id = 903 AND month_start = '2024-04-01'),
          (20, 10, 'ACTIVE'::text)::text, 'ten hold days in April: 20 ACTIVE days, 10 ON_HOLD');
-- The spans of a person cover each day from the first spell to today exactly once.
SELECT is((SELECT count(*) FROM (
               SELECT s.location_key, s.member_id
               FROM ironwod.member_state_span s
               WHERE s.gym_id = 'f7000000-0000-0000-0000-000000000001'
               GROUP BY 1, 2
               HAVING sum(s.span_end_excl - s.span_start) <> '2024-05-16'::date - min(s.span_start)
                   OR max(s.span_end_excl) <> '2024-05-16'
                   OR count(*) <> count(DISTINCT s.span_start)) x),
          0::bigint, 'spans tile each person''s days from the first spell to today');
SELECT is((SELECT count(*) FROM ironwod.member_state_span s
           WHERE s.gym_id = 'f7000000-0000-0000-0000-000000000001' AND s.location_key = 'ALL' AND s.member_id = 902
             AND s.state = 'NOT_MEMBER' AND s.span_start = '2023-11-01' AND s.span_end_excl = '2024-02-01'),
          1::bigint, 'the gap between the spells is one NOT_MEMBER span');
-- Each stage is a function whose comment names the metrics.md section it implements.
SELECT is((SELECT count(*) FROM pg_proc p
           WHERE p.pronamespace = 'ironwod'::regnamespace AND p.proname LIKE 'metrics\_%'
             AND p.proname <> 'metrics_today' AND coalesce(obj_description(p.oid, 'pg_proc'), '') !~ 'metrics\.md §'),
          0::bigint, 'every refresh stage names its metrics.md section');
SELECT cmp_ok((SELECT count(*) FROM pg_proc p
               WHERE p.pronamespace = 'ironwod'::regnamespace AND p.proname LIKE 'metrics\_%'
                 AND p.proname <> 'metrics_today'),
              '>=', 7::bigint, 'the refresh runs as named stages');

-- §5.4, narrowed: a day later, run 9 changes member 902's current price.  The
-- refresh recomputes from November 2023 (the change, less the cohort window), May
-- for everyone (the month the last refresh computed to date), the months before
-- it only for 902: its facts are 902's from November on and everyone's in May.
INSERT INTO ironwod.sync_runs (tenant_id, gym_id, run_id, mode, status)
VALUES ('f7000000-0000-0000-0000-000000000000', 'f7000000-0000-0000-0000-000000000001', 9, 'incremental', 'succeeded');
INSERT INTO ironwod.wodify_raw_memberships (tenant_id, gym_id, wodify_id, payload_json, payload_hash,
                                            source_updated_at, ingest_run_id, last_seen_run_id)
SELECT tenant_id, gym_id, wodify_id, p, sha256(convert_to(p::text, 'UTF8')), '2024-05-16 00:00Z', 9, 9
FROM ironwod.wodify_raw_memberships, LATERAL (SELECT jsonb_set(payload_json, '{payment_plan,price}', '160') AS p) x
WHERE gym_id = 'f7000000-0000-0000-0000-000000000001' AND wodify_id = 9022;
SET LOCAL ironwod_metrics.today = '2024-05-16';
SELECT ironwod.transform_run(9);
CREATE TEMP TABLE narrowed AS SELECT ironwod.refresh_metrics(9) AS r;
SELECT is((SELECT (r ->> 'from', r ->> 'everyone_from', r ->> 'people') FROM narrowed),
          ('2023-11-01'::text, '2024-05-01'::text, '1'::text), 'the nightly refresh: closed months for the one person who changed');
SELECT is((SELECT (r ->> 'facts')::bigint FROM narrowed),
          (SELECT count(*) FROM ironwod.member_month_fact
           WHERE gym_id = 'f7000000-0000-0000-0000-000000000001'
             AND (month_start >= '2024-05-01' OR (member_id = 902 AND month_start >= '2023-11-01'))),
          'it writes the facts of that person and of the open month only');
SELECT ironwod.digest('f7000000-0000-0000-0000-000000000000', 'f7000000-0000-0000-0000-000000000001') AS live \gset
SELECT ironwod.refresh_metrics_all();
SELECT is(ironwod.digest('f7000000-0000-0000-0000-000000000000', 'f7000000-0000-0000-0000-000000000001'), :'live',
          'and its cache, facts and visits equal a full recompute''s');

SELECT * FROM finish();
ROLLBACK;
