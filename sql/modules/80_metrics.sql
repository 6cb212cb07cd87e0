-- 80_metrics: spells, member-month facts and gym_monthly_metrics_cache
-- (metrics.md §2-§5 within its v1 scope adjustments).
--
-- Pipeline of one refresh, all set-based:
--   qualifying memberships (per location key: ALL and each location id)
--   -> merged spells (gap <= merge_gap_days; rescinded spells dropped)      member_spell
--   -> daily state ACTIVE / ON_HOLD / NOT_MEMBER with MRR (a temp table; bridged gap
--      days are ACTIVE and carry the MRR of the membership that resumes coverage)
--   -> one fact row per person, location key and month                       member_month_fact
--   -> the cache, a GROUP BY over the facts plus cash and invoice figures    gym_monthly_metrics_cache
-- Months are calendar months in the gym's IANA zone; civil dates are compared as
-- dates, instants are converted to local dates first.  The current month is computed
-- to date (as_of = today) and flagged is_partial, as is any month whose end plus the
-- merge gap has not passed yet.

-- "Today" in the gym's zone.  The setting ironwod_metrics.today (a date) freezes the
-- clock for tests and for reproducing an earlier computation; unset means now().
CREATE FUNCTION ironwod.metrics_today(p_tz text) RETURNS date
LANGUAGE sql STABLE
AS $$
    SELECT coalesce(nullif(current_setting('ironwod_metrics.today', true), '')::date,
                    (now() AT TIME ZONE p_tz)::date)
$$;
COMMENT ON FUNCTION ironwod.metrics_today(text) IS 'Local date of today in the given zone, or the date in setting ironwod_metrics.today when set (frozen clock for tests and reproductions)';

CREATE FUNCTION ironwod.metric_config() RETURNS ironwod.metric_settings
LANGUAGE plpgsql
AS $$
DECLARE
    s ironwod.metric_settings;
BEGIN
    INSERT INTO ironwod.metric_settings (tenant_id, gym_id)
    SELECT ironwod.scope_tenant(), ironwod.scope_gym()
    WHERE ironwod.scope_tenant() IS NOT NULL
    ON CONFLICT (tenant_id, gym_id) DO NOTHING;
    SELECT * INTO STRICT s FROM ironwod.metric_settings x
    WHERE x.tenant_id = ironwod.scope_tenant() AND x.gym_id = ironwod.scope_gym();
    RETURN s;
END
$$;
COMMENT ON FUNCTION ironwod.metric_config() IS 'The scoped gym''s metric settings row, created with the defaults when missing';

CREATE FUNCTION ironwod.config_hash(s ironwod.metric_settings) RETURNS text
LANGUAGE sql IMMUTABLE
AS $$ SELECT md5((to_jsonb(s) - 'tenant_id' - 'gym_id')::text) $$;
COMMENT ON FUNCTION ironwod.config_hash(ironwod.metric_settings) IS 'Hash of every metric parameter of a settings row (cache column config_hash)';

-- Monthly-normalised price (metrics.md §4.7): weekly x 52/12, yearly / 12, N months / N.
CREATE FUNCTION ironwod.monthly_price(p_price numeric, p_len integer, p_unit text) RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT round(CASE
        WHEN p_unit ILIKE 'week%' THEN p_price * 52 / 12 / greatest(coalesce(p_len, 1), 1)
        WHEN p_unit ILIKE 'year%' THEN p_price / 12 / greatest(coalesce(p_len, 1), 1)
        WHEN p_unit ILIKE 'day%'  THEN p_price * 365 / 12 / greatest(coalesce(p_len, 1), 1)
        ELSE p_price / greatest(coalesce(p_len, 1), 1)
    END, 2)
$$;
COMMENT ON FUNCTION ironwod.monthly_price(numeric, integer, text) IS 'Recurring price normalised to a month (weekly x 52/12, yearly / 12, every N units / N), rounded to cents';

-- Months a membership payment is spread over (v1: its billing period, at most 12).
CREATE FUNCTION ironwod.spread_months(p_len integer, p_unit text, p_max integer) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT least(greatest(CASE
        WHEN p_unit ILIKE 'month%' THEN coalesce(p_len, 1)
        WHEN p_unit ILIKE 'year%'  THEN 12 * coalesce(p_len, 1)
        ELSE 1 END, 1), p_max)
$$;
COMMENT ON FUNCTION ironwod.spread_months(integer, text, integer) IS 'Number of months a membership payment is recognised over: its billing period in months, 1 for shorter periods, capped';

-- First full local month of synced history: the month of the earliest transaction or
-- sign-in when that falls on the 1st, else the month after.  A settings override wins.
CREATE FUNCTION ironwod.history_start(p_tz text) RETURNS date
LANGUAGE sql STABLE
AS $$
    WITH s AS (
        SELECT least(
            (SELECT min((t.processed_at AT TIME ZONE p_tz)::date) FROM ironwod.transactions t
             WHERE t.tenant_id = ironwod.scope_tenant() AND t.gym_id = ironwod.scope_gym() AND t.deleted_at IS NULL),
            (SELECT min((a.class_start_at AT TIME ZONE p_tz)::date) FROM ironwod.attendance_events a
             WHERE a.tenant_id = ironwod.scope_tenant() AND a.gym_id = ironwod.scope_gym() AND a.deleted_at IS NULL)) AS d,
            (SELECT min(m.start_date) FROM ironwod.memberships m
             WHERE m.tenant_id = ironwod.scope_tenant() AND m.gym_id = ironwod.scope_gym() AND m.deleted_at IS NULL) AS m
    )
    SELECT coalesce(
        (SELECT x.history_start_date FROM ironwod.metric_settings x
         WHERE x.tenant_id = ironwod.scope_tenant() AND x.gym_id = ironwod.scope_gym()),
        CASE WHEN s.d IS NULL THEN date_trunc('month', coalesce(s.m, ironwod.metrics_today(p_tz)))::date
             WHEN extract(day FROM s.d) = 1 THEN s.d
             ELSE (date_trunc('month', s.d) + interval '1 month')::date END)
    FROM s
$$;
COMMENT ON FUNCTION ironwod.history_start(text) IS 'history_start_date of the scoped gym: settings override, else the first full local month of synced transactions and sign-ins';

-- Recompute spells (all of them), and facts and cache rows for months >= p_from.
CREATE FUNCTION ironwod.compute_metrics(p_from date)
RETURNS jsonb
LANGUAGE plpgsql
SET jit = off
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    s ironwod.metric_settings;
    v_hash text;
    v_tz text;
    v_today date;
    v_hist date;
    v_cur date;
    v_from date;
    v_wm timestamptz;
    v_spells integer;
    v_facts integer;
    v_rows integer;
BEGIN
    IF v_t IS NULL OR v_g IS NULL THEN
        RAISE EXCEPTION 'no ironwod scope is set in this transaction'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Call ironwod_set_scope(tenant, gym) in the same transaction first.';
    END IF;
    s := ironwod.metric_config();
    v_hash := ironwod.config_hash(s);
    v_tz := ironwod.gym_time_zone(v_t, v_g);
    v_today := ironwod.metrics_today(v_tz);
    v_cur := date_trunc('month', v_today)::date;
    v_hist := least(ironwod.history_start(v_tz), v_cur);
    v_from := least(greatest(date_trunc('month', coalesce(p_from, v_hist))::date, v_hist), v_cur);

    -- Member-qualifying (price > 0) and comped (price = 0) memberships, once gym-wide
    -- (ALL) and once under their location.
    IF to_regclass('pg_temp.iw_m') IS NOT NULL THEN DROP TABLE pg_temp.iw_m; END IF;
    CREATE TEMP TABLE iw_m ON COMMIT DROP AS
    SELECT k.location_key, m.member_id, m.membership_id, m.start_date,
           coalesce(m.end_date + 1, 'infinity'::date) AS end_excl,
           m.price > 0 AS qualifying,
           ironwod.monthly_price(m.price, m.billing_period_length, m.billing_period_unit) AS mrr,
           m.cancellation_requested_on
    FROM ironwod.memberships m
    CROSS JOIN LATERAL (VALUES ('ALL'), (m.location_id::text)) AS k(location_key)
    WHERE m.tenant_id = v_t AND m.gym_id = v_g AND m.deleted_at IS NULL AND NOT m.is_deleted
      AND m.membership_type = ANY (s.qualifying_types) AND m.price >= 0
      AND m.member_id IS NOT NULL AND m.start_date IS NOT NULL
      AND coalesce(m.end_date + 1, 'infinity'::date) > m.start_date
      AND k.location_key IS NOT NULL;

    -- Spells: merge each person's coverage when the gap is <= merge_gap_days; a spell
    -- of <= rescind_max_days with zero net collected revenue is rescinded.
    DELETE FROM ironwod.member_spell WHERE tenant_id = v_t AND gym_id = v_g;
    WITH o AS (
        SELECT q.*, max(q.end_excl) OVER (PARTITION BY q.location_key, q.member_id
                                          ORDER BY q.start_date, q.end_excl, q.membership_id
                                          ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_end
        FROM pg_temp.iw_m q WHERE q.qualifying
    ), g AS (
        SELECT o.*, sum(CASE WHEN o.prev_end IS NULL OR o.start_date > o.prev_end + s.merge_gap_days
                             THEN 1 ELSE 0 END)
                    OVER (PARTITION BY o.location_key, o.member_id
                          ORDER BY o.start_date, o.end_excl, o.membership_id) AS grp
        FROM o
    ), sp AS (
        SELECT g.location_key, g.member_id, min(g.start_date) AS s0, max(g.end_excl) AS e0,
               array_agg(g.membership_id ORDER BY g.membership_id) AS ids
        FROM g GROUP BY g.location_key, g.member_id, g.grp
    ), rev AS (
        SELECT sp.location_key, sp.member_id, sp.s0,
               coalesce(sum(CASE t.transaction_type WHEN 'Payment' THEN t.amount
                                                    WHEN 'Refund' THEN -t.amount ELSE 0 END), 0) AS net
        FROM sp
        LEFT JOIN ironwod.invoices i
               ON i.tenant_id = v_t AND i.gym_id = v_g AND i.deleted_at IS NULL AND i.membership_id = ANY (sp.ids)
        LEFT JOIN ironwod.transactions t
               ON t.tenant_id = v_t AND t.gym_id = v_g AND t.deleted_at IS NULL AND t.invoice_id = i.invoice_id
        GROUP BY sp.location_key, sp.member_id, sp.s0
    ), r AS (
        SELECT sp.*, rev.net,
               (sp.e0 <> 'infinity' AND sp.e0 - sp.s0 <= s.rescind_max_days AND rev.net = 0) AS rescinded
        FROM sp JOIN rev USING (location_key, member_id, s0)
    )
    INSERT INTO ironwod.member_spell
        (tenant_id, gym_id, location_key, member_id, spell_start, spell_end_excl, spell_no, is_first,
         rescinded, net_revenue, membership_ids)
    SELECT v_t, v_g, r.location_key, r.member_id, r.s0, r.e0,
           CASE WHEN NOT r.rescinded THEN
               row_number() OVER (PARTITION BY r.location_key, r.member_id, r.rescinded ORDER BY r.s0) END,
           NOT r.rescinded AND r.s0 = min(r.s0) FILTER (WHERE NOT r.rescinded)
                                       OVER (PARTITION BY r.location_key, r.member_id),
           r.rescinded, r.net, r.ids
    FROM r;
    GET DIAGNOSTICS v_spells = ROW_COUNT;
    RAISE DEBUG 'ironwod metrics: % done at %', 'spells', clock_timestamp();

    -- Daily state from each person's first spell to today.
    IF to_regclass('pg_temp.iw_d') IS NOT NULL THEN DROP TABLE pg_temp.iw_d; END IF;
    CREATE TEMP TABLE iw_d ON COMMIT DROP AS
    WITH md AS (
        SELECT m.location_key, m.member_id, m.membership_id, m.start_date + i AS d, m.mrr
        FROM pg_temp.iw_m m,
             generate_series(0, least(m.end_excl - 1, v_today) - m.start_date) AS i
        WHERE m.qualifying AND m.start_date <= v_today
    ), hd AS (
        SELECT DISTINCT h.membership_id, h.hold_start_date + i AS d
        FROM ironwod.membership_holds h,
             generate_series(0, least(coalesce(h.hold_end_date, v_today), v_today) - h.hold_start_date) AS i
        WHERE h.tenant_id = v_t AND h.gym_id = v_g AND h.deleted_at IS NULL
          AND h.hold_start_date IS NOT NULL AND h.hold_start_date <= v_today
    ), cov AS (
        SELECT md.location_key, md.member_id, md.d, count(*) AS n_cov,
               count(*) FILTER (WHERE hd.membership_id IS NULL) AS n_act,
               coalesce(sum(md.mrr) FILTER (WHERE hd.membership_id IS NULL), 0) AS mrr
        FROM md LEFT JOIN hd ON hd.membership_id = md.membership_id AND hd.d = md.d
        GROUP BY md.location_key, md.member_id, md.d
    ), f AS (
        SELECT sp.location_key, sp.member_id, min(sp.spell_start) AS first_day
        FROM ironwod.member_spell sp
        WHERE sp.tenant_id = v_t AND sp.gym_id = v_g AND NOT sp.rescinded AND sp.spell_start <= v_today
        GROUP BY sp.location_key, sp.member_id
    ), x AS (
        SELECT f.location_key, f.member_id, f.first_day + i AS d
        FROM f, generate_series(0, v_today - f.first_day) AS i
    ), y AS (
        SELECT x.location_key, x.member_id, x.d, sp.spell_start, sp.spell_end_excl, sp.spell_no,
               cov.n_cov, cov.n_act, cov.mrr,
               count(cov.n_cov) OVER (PARTITION BY x.location_key, x.member_id ORDER BY x.d DESC) AS grp
        FROM x
        LEFT JOIN ironwod.member_spell sp
               ON sp.tenant_id = v_t AND sp.gym_id = v_g AND sp.location_key = x.location_key
              AND sp.member_id = x.member_id AND NOT sp.rescinded
              AND x.d >= sp.spell_start AND x.d < sp.spell_end_excl
        LEFT JOIN cov ON cov.location_key = x.location_key AND cov.member_id = x.member_id AND cov.d = x.d
    ), z AS (
        SELECT y.*,
               CASE WHEN y.spell_start IS NULL THEN 'NOT_MEMBER'
                    WHEN coalesce(y.n_cov, 0) = 0 OR y.n_act > 0 THEN 'ACTIVE'
                    ELSE 'ON_HOLD' END AS state,
               max(y.mrr) FILTER (WHERE y.n_cov IS NOT NULL)
                   OVER (PARTITION BY y.location_key, y.member_id, y.grp) AS resume_mrr
        FROM y
    )
    SELECT z.location_key, z.member_id, z.d, z.state, z.spell_start, z.spell_end_excl, z.spell_no,
           CASE WHEN z.state = 'NOT_MEMBER' THEN 0
                WHEN z.n_cov IS NULL THEN coalesce(z.resume_mrr, 0)
                ELSE z.mrr END::numeric(12,2) AS mrr,
           count(*) FILTER (WHERE z.state = 'ACTIVE')
               OVER (PARTITION BY z.location_key, z.member_id ORDER BY z.d)::integer AS cum_active
    FROM z;
    ALTER TABLE pg_temp.iw_d ADD PRIMARY KEY (location_key, member_id, d);
    RAISE DEBUG 'ironwod metrics: % done at %', 'days', clock_timestamp();
    ANALYZE pg_temp.iw_d;

    -- Visits per person, local day and class location (one per class instance).
    IF to_regclass('pg_temp.iw_v') IS NOT NULL THEN DROP TABLE pg_temp.iw_v; END IF;
    CREATE TEMP TABLE iw_v ON COMMIT DROP AS
    SELECT a.member_id, (a.class_start_at AT TIME ZONE v_tz)::date AS d, a.location_id,
           count(DISTINCT coalesce(a.class_id, -a.signin_id))::integer AS n
    FROM ironwod.attendance_events a
    WHERE a.tenant_id = v_t AND a.gym_id = v_g AND a.deleted_at IS NULL
      AND a.member_id IS NOT NULL AND a.class_start_at IS NOT NULL
    GROUP BY 1, 2, 3;
    CREATE INDEX ON pg_temp.iw_v (member_id, d);
    ANALYZE pg_temp.iw_v;

    -- Location keys and months to (re)compute.
    IF to_regclass('pg_temp.iw_months') IS NOT NULL THEN DROP TABLE pg_temp.iw_months; END IF;
    CREATE TEMP TABLE iw_months ON COMMIT DROP AS
    SELECT k.location_key, mo::date AS month_start, (mo + interval '1 month')::date - 1 AS last_day,
           least((mo + interval '1 month')::date - 1, v_today) AS as_of
    FROM generate_series(v_from, v_cur, interval '1 month') AS mo,
         (SELECT 'ALL'::text AS location_key
          UNION SELECT l.location_id::text FROM ironwod.locations l
                WHERE l.tenant_id = v_t AND l.gym_id = v_g AND l.deleted_at IS NULL) k;

    -- Facts.
    DELETE FROM ironwod.member_month_fact
    WHERE tenant_id = v_t AND gym_id = v_g AND (month_start >= v_from OR month_start < v_hist);
    WITH cand AS (
        SELECT DISTINCT mo.location_key, mo.month_start, mo.last_day, mo.as_of, c.member_id
        FROM pg_temp.iw_months mo
        JOIN LATERAL (
            SELECT d.member_id FROM pg_temp.iw_d d
            WHERE d.location_key = mo.location_key AND d.d BETWEEN mo.month_start - 1 AND mo.as_of
              AND d.state <> 'NOT_MEMBER'
            UNION
            SELECT v.member_id FROM pg_temp.iw_v v
            WHERE v.d BETWEEN mo.month_start AND mo.as_of
              AND (mo.location_key = 'ALL' OR v.location_id::text = mo.location_key)
            UNION
            SELECT m.member_id FROM pg_temp.iw_m m
            WHERE m.location_key = mo.location_key AND NOT m.qualifying
              AND mo.as_of >= m.start_date AND mo.as_of < m.end_excl
        ) c ON true
    ), base AS (
        SELECT c.*,
               coalesce(d0.state, 'NOT_MEMBER') AS state_start, coalesce(d0.mrr, 0) AS mrr_start,
               coalesce(d1.state, 'NOT_MEMBER') AS state_end, coalesce(d1.mrr, 0) AS mrr_end,
               d1.spell_start AS end_spell_start, d1.spell_end_excl AS end_spell_end, d1.spell_no AS end_spell_no,
               coalesce(d1.cum_active, 0) AS cum_end
        FROM cand c
        LEFT JOIN pg_temp.iw_d d0 ON d0.location_key = c.location_key AND d0.member_id = c.member_id
                                 AND d0.d = c.month_start - 1
        LEFT JOIN pg_temp.iw_d d1 ON d1.location_key = c.location_key AND d1.member_id = c.member_id
                                 AND d1.d = c.as_of
    ), ev AS (
        SELECT b.location_key, b.month_start, b.member_id,
               count(*) FILTER (WHERE sp.spell_start BETWEEN b.month_start AND b.as_of AND sp.spell_no = 1) AS new_events,
               count(*) FILTER (WHERE sp.spell_start BETWEEN b.month_start AND b.as_of AND sp.spell_no > 1) AS react_events,
               count(*) FILTER (WHERE sp.spell_end_excl BETWEEN b.month_start AND b.as_of) AS churn_events,
               count(*) FILTER (WHERE sp.spell_start BETWEEN b.month_start AND b.as_of
                                  AND sp.spell_end_excl BETWEEN b.month_start AND b.as_of) AS new_and_churned,
               bool_or(sp.spell_end_excl > sp.spell_start + s.cohort_days)
                   FILTER (WHERE sp.spell_start BETWEEN b.month_start AND b.as_of AND sp.spell_no = 1) AS retained
        FROM base b
        JOIN ironwod.member_spell sp
          ON sp.tenant_id = v_t AND sp.gym_id = v_g AND sp.location_key = b.location_key
         AND sp.member_id = b.member_id AND NOT sp.rescinded
         AND (sp.spell_start BETWEEN b.month_start AND b.as_of OR sp.spell_end_excl BETWEEN b.month_start AND b.as_of)
        GROUP BY b.location_key, b.month_start, b.member_id
    ), days AS (
        SELECT b.location_key, b.month_start, b.member_id,
               count(*) FILTER (WHERE d.state = 'ACTIVE') AS active_days,
               count(*) FILTER (WHERE d.state = 'ON_HOLD') AS hold_days
        FROM base b
        JOIN pg_temp.iw_d d ON d.location_key = b.location_key AND d.member_id = b.member_id
                           AND d.d BETWEEN b.month_start AND b.as_of
        GROUP BY b.location_key, b.month_start, b.member_id
    ), vis AS (
        SELECT b.location_key, b.month_start, b.member_id,
               coalesce(sum(v.n) FILTER (WHERE v.d >= b.month_start
                                           AND (b.location_key = 'ALL' OR v.location_id::text = b.location_key)), 0) AS visits,
               coalesce(sum(v.n) FILTER (WHERE v.d >= b.month_start
                                           AND (b.location_key = 'ALL' OR v.location_id::text = b.location_key)
                                           AND d.state = 'ACTIVE'), 0) AS member_visits,
               coalesce(sum(v.n) FILTER (WHERE v.d >= b.month_start), 0) AS visits_anywhere,
               coalesce(sum(v.n) FILTER (WHERE v.d > b.as_of - s.decline_recent_days), 0) AS visits_r,
               coalesce(sum(v.n) FILTER (WHERE v.d > b.as_of - s.decline_recent_days - s.decline_prior_days
                                           AND v.d <= b.as_of - s.decline_recent_days), 0) AS visits_p
        FROM base b
        JOIN pg_temp.iw_v v ON v.member_id = b.member_id AND v.d <= b.as_of
                           AND v.d > least(b.month_start - 1, b.as_of - s.decline_recent_days - s.decline_prior_days)
        LEFT JOIN pg_temp.iw_d d ON d.location_key = b.location_key AND d.member_id = b.member_id AND d.d = v.d
        GROUP BY b.location_key, b.month_start, b.member_id
    ), fl AS (
        SELECT b.*, coalesce(ev.new_events, 0) AS new_events, coalesce(ev.react_events, 0) AS react_events,
               coalesce(ev.churn_events, 0) AS churn_events, coalesce(ev.new_and_churned, 0) AS new_and_churned,
               ev.retained, coalesce(days.active_days, 0) AS active_days, coalesce(days.hold_days, 0) AS hold_days,
               coalesce(vis.visits, 0) AS visits, coalesce(vis.member_visits, 0) AS member_visits,
               coalesce(vis.visits_anywhere, 0) AS visits_anywhere,
               coalesce(vis.visits_r, 0) AS visits_r, coalesce(vis.visits_p, 0) AS visits_p,
               CASE WHEN b.state_end = 'ACTIVE' THEN
                   b.cum_end - coalesce((SELECT d.cum_active FROM pg_temp.iw_d d
                                         WHERE d.location_key = b.location_key AND d.member_id = b.member_id
                                           AND d.d = greatest(lv.last_visit, b.end_spell_start - 1)), 0)
               END AS absent_days,
               b.cum_end - coalesce((SELECT d.cum_active FROM pg_temp.iw_d d
                                     WHERE d.location_key = b.location_key AND d.member_id = b.member_id
                                       AND d.d = b.as_of - s.decline_recent_days), 0) AS e_r,
               coalesce((SELECT d.cum_active FROM pg_temp.iw_d d
                         WHERE d.location_key = b.location_key AND d.member_id = b.member_id
                           AND d.d = b.as_of - s.decline_recent_days), 0)
               - coalesce((SELECT d.cum_active FROM pg_temp.iw_d d
                           WHERE d.location_key = b.location_key AND d.member_id = b.member_id
                             AND d.d = b.as_of - s.decline_recent_days - s.decline_prior_days), 0) AS e_p
        FROM base b
        LEFT JOIN ev USING (location_key, month_start, member_id)
        LEFT JOIN days USING (location_key, month_start, member_id)
        LEFT JOIN vis USING (location_key, month_start, member_id)
        LEFT JOIN LATERAL (SELECT max(v2.d) AS last_visit FROM pg_temp.iw_v v2
                           WHERE v2.member_id = b.member_id AND v2.d <= b.as_of) lv ON true
    )
    INSERT INTO ironwod.member_month_fact
        (tenant_id, gym_id, location_key, member_id, month_start, as_of, state_start, state_end,
         mrr_start, mrr_end, movement, mrr_delta, new_events, reactivated_events, churn_events,
         new_and_churned, active_days, hold_days, visits, member_visits, tenure_active_days,
         absent_active_days, is_past_due_end, is_comped_end, is_pending_cancel_end, is_zero_visits,
         is_no_visit_short, is_no_visit_long, is_declining, is_paying, cohort_retained_90d)
    SELECT v_t, v_g, f.location_key, f.member_id, f.month_start, f.as_of, f.state_start, f.state_end,
           f.mrr_start, f.mrr_end,
           CASE WHEN f.state_start = 'NOT_MEMBER' AND f.state_end <> 'NOT_MEMBER'
                     THEN CASE WHEN f.end_spell_no = 1 THEN 'new' ELSE 'reactivation' END
                WHEN f.state_start <> 'NOT_MEMBER' AND f.state_end = 'NOT_MEMBER' THEN 'churn'
                WHEN f.state_start = 'ACTIVE' AND f.state_end = 'ON_HOLD' THEN 'hold_out'
                WHEN f.state_start = 'ON_HOLD' AND f.state_end = 'ACTIVE' THEN 'hold_in'
                WHEN f.state_start = 'ACTIVE' AND f.state_end = 'ACTIVE' AND f.mrr_end > f.mrr_start THEN 'expansion'
                WHEN f.state_start = 'ACTIVE' AND f.state_end = 'ACTIVE' AND f.mrr_end < f.mrr_start THEN 'contraction'
           END,
           f.mrr_end - f.mrr_start,
           f.new_events, f.react_events, f.churn_events, f.new_and_churned, f.active_days, f.hold_days,
           f.visits, f.member_visits, f.cum_end, f.absent_days,
           -- past due on as_of: an unpaid, non-voided invoice of a qualifying membership due before it
           f.state_end <> 'NOT_MEMBER' AND EXISTS (
               SELECT 1 FROM ironwod.invoices i JOIN pg_temp.iw_m m
                 ON m.membership_id = i.membership_id AND m.location_key = f.location_key AND m.qualifying
               WHERE i.tenant_id = v_t AND i.gym_id = v_g AND i.deleted_at IS NULL
                 AND i.member_id = f.member_id AND i.status IS DISTINCT FROM 'Voided'
                 AND i.due_date < f.as_of AND (i.paid_on IS NULL OR i.paid_on >= f.as_of)),
           f.state_end = 'NOT_MEMBER' AND EXISTS (
               SELECT 1 FROM pg_temp.iw_m m
               WHERE m.location_key = f.location_key AND m.member_id = f.member_id AND NOT m.qualifying
                 AND f.as_of >= m.start_date AND f.as_of < m.end_excl),
           -- pending cancel: the spell's end is known on as_of (requested by then, or fixed term)
           f.state_end <> 'NOT_MEMBER' AND f.end_spell_end <> 'infinity' AND EXISTS (
               SELECT 1 FROM pg_temp.iw_m m
               WHERE m.location_key = f.location_key AND m.member_id = f.member_id AND m.qualifying
                 AND m.end_excl = f.end_spell_end
                 AND coalesce(m.cancellation_requested_on, m.start_date) <= f.as_of),
           f.active_days = f.as_of - f.month_start + 1 AND f.visits_anywhere = 0,
           f.state_end = 'ACTIVE' AND f.absent_days >= s.absence_short_days,
           f.state_end = 'ACTIVE' AND f.absent_days >= s.absence_long_days,
           f.state_end = 'ACTIVE'
               AND f.e_p >= s.decline_min_exposure * s.decline_prior_days
               AND f.e_r >= s.decline_min_exposure * s.decline_recent_days
               AND f.visits_p / (f.e_p / 7.0) >= s.decline_min_weekly_rate
               AND f.visits_r / (f.e_r / 7.0) <= s.decline_ratio * (f.visits_p / (f.e_p / 7.0)),
           EXISTS (
               SELECT 1 FROM ironwod.invoices i JOIN pg_temp.iw_m m
                 ON m.membership_id = i.membership_id AND m.location_key = f.location_key AND m.qualifying
               WHERE i.tenant_id = v_t AND i.gym_id = v_g AND i.deleted_at IS NULL
                 AND i.member_id = f.member_id AND i.status IS DISTINCT FROM 'Voided'
                 AND i.paid_on IS NOT NULL AND i.amount > 0
                 AND i.due_date BETWEEN f.month_start AND f.last_day),
           CASE WHEN f.new_events > 0 THEN coalesce(f.retained, false) END
    FROM fl f;
    GET DIAGNOSTICS v_facts = ROW_COUNT;
    RAISE DEBUG 'ironwod metrics: % done at %', 'facts', clock_timestamp();

    -- Cache: the facts grouped, plus cash (by local processed date and transaction
    -- location) and invoices (by due date and invoice location).
    SELECT greatest(
        (SELECT max(source_updated_at) FROM ironwod.memberships WHERE tenant_id = v_t AND gym_id = v_g),
        (SELECT max(source_updated_at) FROM ironwod.membership_holds WHERE tenant_id = v_t AND gym_id = v_g),
        (SELECT max(source_updated_at) FROM ironwod.attendance_events WHERE tenant_id = v_t AND gym_id = v_g),
        (SELECT max(source_updated_at) FROM ironwod.invoices WHERE tenant_id = v_t AND gym_id = v_g),
        (SELECT max(source_updated_at) FROM ironwod.transactions WHERE tenant_id = v_t AND gym_id = v_g))
    INTO v_wm;

    DELETE FROM ironwod.gym_monthly_metrics_cache
    WHERE tenant_id = v_t AND gym_id = v_g AND (month_start >= v_from OR month_start < v_hist);
    WITH fa AS (
        SELECT f.location_key AS fa_location_key, f.month_start AS fa_month_start,
               count(*) FILTER (WHERE f.state_start <> 'NOT_MEMBER') AS members_start,
               count(*) FILTER (WHERE f.state_end <> 'NOT_MEMBER') AS members_end,
               count(*) FILTER (WHERE f.state_end = 'ACTIVE') AS active_end,
               count(*) FILTER (WHERE f.state_end = 'ON_HOLD') AS on_hold_end,
               count(*) FILTER (WHERE f.is_past_due_end) AS past_due_end,
               count(*) FILTER (WHERE f.is_comped_end) AS comped_end,
               count(*) FILTER (WHERE f.is_pending_cancel_end) AS pending_cancel_end,
               sum(f.new_events) AS new_members, sum(f.reactivated_events) AS reactivated,
               sum(f.churn_events) AS churned,
               count(*) FILTER (WHERE f.state_start <> 'NOT_MEMBER' AND f.state_end = 'NOT_MEMBER') AS churned_from_start,
               sum(f.new_and_churned) AS new_and_churned,
               sum(f.active_days) AS active_days,
               count(*) FILTER (WHERE f.is_paying) AS paying,
               sum(f.mrr_start) AS mrr_start, sum(f.mrr_end) AS mrr_end,
               coalesce(sum(f.mrr_delta) FILTER (WHERE f.movement = 'new'), 0) AS mrr_new,
               coalesce(sum(f.mrr_delta) FILTER (WHERE f.movement = 'reactivation'), 0) AS mrr_react,
               coalesce(sum(f.mrr_delta) FILTER (WHERE f.movement = 'expansion'), 0) AS mrr_exp,
               coalesce(-sum(f.mrr_delta) FILTER (WHERE f.movement = 'contraction'), 0) AS mrr_contr,
               coalesce(-sum(f.mrr_delta) FILTER (WHERE f.movement = 'churn'), 0) AS mrr_churn,
               coalesce(-sum(f.mrr_delta) FILTER (WHERE f.movement = 'hold_out'), 0) AS mrr_hold_out,
               coalesce(sum(f.mrr_delta) FILTER (WHERE f.movement = 'hold_in'), 0) AS mrr_hold_in,
               avg(f.tenure_active_days) FILTER (WHERE f.state_end <> 'NOT_MEMBER') AS tenure_days,
               sum(f.member_visits) AS member_visits, sum(f.visits) AS all_visits,
               count(*) FILTER (WHERE f.is_zero_visits) AS zero_visits,
               count(*) FILTER (WHERE f.is_no_visit_short) AS no_visit_short,
               count(*) FILTER (WHERE f.is_no_visit_long) AS no_visit_long,
               count(*) FILTER (WHERE f.is_declining) AS declining,
               count(*) FILTER (WHERE f.new_events > 0) AS cohort_new,
               count(*) FILTER (WHERE f.cohort_retained_90d) AS cohort_retained
        FROM ironwod.member_month_fact f
        WHERE f.tenant_id = v_t AND f.gym_id = v_g AND f.month_start >= v_from
        GROUP BY f.location_key, f.month_start
    ), tx AS (
        SELECT t.*, (t.processed_at AT TIME ZONE v_tz)::date AS d,
               date_trunc('month', (t.processed_at AT TIME ZONE v_tz)::date)::date AS mo,
               i.membership_id, i.amount AS invoice_amount, m.billing_period_length, m.billing_period_unit
        FROM ironwod.transactions t
        LEFT JOIN ironwod.invoices i
               ON i.tenant_id = v_t AND i.gym_id = v_g AND i.invoice_id = t.invoice_id AND i.deleted_at IS NULL
        LEFT JOIN ironwod.memberships m
               ON m.tenant_id = v_t AND m.gym_id = v_g AND m.membership_id = i.membership_id
        WHERE t.tenant_id = v_t AND t.gym_id = v_g AND t.deleted_at IS NULL AND t.processed_at IS NOT NULL
    ), txk AS (
        SELECT k.location_key, tx.* FROM tx
        CROSS JOIN LATERAL (VALUES ('ALL'), (tx.location_id::text)) AS k(location_key)
        WHERE k.location_key IS NOT NULL
    ), cash AS (
        SELECT t.location_key, t.mo AS month_start,
               coalesce(sum(t.amount) FILTER (WHERE t.transaction_type = 'Payment'
                                                AND t.payment_method IS DISTINCT FROM 'Store Credit'), 0) AS gross,
               coalesce(sum(t.amount) FILTER (WHERE t.transaction_type = 'Refund'), 0) AS refunds,
               count(DISTINCT t.invoice_id) FILTER (WHERE t.transaction_type = 'Failed Payment') AS failed_n
        FROM txk t GROUP BY 1, 2
    ), failed AS (
        SELECT x.location_key, x.mo AS month_start, sum(x.invoice_amount) AS failed_amount
        FROM (SELECT DISTINCT t.location_key, t.mo, t.invoice_id, coalesce(t.invoice_amount, t.amount) AS invoice_amount
              FROM txk t WHERE t.transaction_type = 'Failed Payment') x
        GROUP BY 1, 2
    ), recog AS (
        SELECT x.location_key, x.month_start, sum(x.amount) AS membership_revenue
        FROM (
            SELECT t.location_key, (t.mo + make_interval(months => k))::date AS month_start,
                   t.amount / n.n AS amount
            FROM txk t
            CROSS JOIN LATERAL (SELECT ironwod.spread_months(t.billing_period_length, t.billing_period_unit,
                                                             s.max_spread_months) AS n) n
            CROSS JOIN LATERAL generate_series(0, n.n - 1) AS k
            WHERE t.transaction_type = 'Payment' AND t.payment_method IS DISTINCT FROM 'Store Credit'
              AND t.membership_id IS NOT NULL
            UNION ALL
            SELECT t.location_key, t.mo, -t.amount
            FROM txk t WHERE t.transaction_type = 'Refund' AND t.membership_id IS NOT NULL
        ) x GROUP BY 1, 2
    ), inv AS (
        SELECT k.location_key, i.*,
               coalesce((SELECT sum(CASE t.transaction_type WHEN 'Payment' THEN t.amount
                                                            WHEN 'Refund' THEN -t.amount ELSE 0 END)
                         FROM ironwod.transactions t
                         WHERE t.tenant_id = v_t AND t.gym_id = v_g AND t.deleted_at IS NULL
                           AND t.invoice_id = i.invoice_id), 0) AS collected
        FROM ironwod.invoices i
        CROSS JOIN LATERAL (VALUES ('ALL'), (i.location_id::text)) AS k(location_key)
        WHERE i.tenant_id = v_t AND i.gym_id = v_g AND i.deleted_at IS NULL AND k.location_key IS NOT NULL
          AND i.status IS DISTINCT FROM 'Voided'
    ), invm AS (
        SELECT mo.location_key, mo.month_start,
               coalesce(sum(i.amount) FILTER (WHERE i.due_date BETWEEN mo.month_start AND mo.last_day), 0) AS invoiced,
               coalesce(sum(least(greatest(i.collected, 0), i.amount))
                        FILTER (WHERE i.due_date BETWEEN mo.month_start AND mo.last_day), 0) AS invoiced_collected,
               coalesce(sum(i.amount) FILTER (WHERE i.due_date <= mo.as_of
                                                AND (i.paid_on IS NULL OR i.paid_on > mo.as_of)), 0) AS past_due_amount
        FROM pg_temp.iw_months mo
        JOIN inv i ON i.location_key = mo.location_key AND i.due_date <= mo.last_day
        GROUP BY 1, 2
    ), c AS (
        SELECT mo.location_key, mo.month_start, mo.last_day, mo.as_of,
               (mo.as_of - mo.month_start + 1) AS period_days,
               mo.month_start = v_hist AS first_month,
               fa.*, coalesce(cash.gross, 0) AS gross, coalesce(cash.refunds, 0) AS refunds_amt,
               coalesce(cash.failed_n, 0) AS failed_n, coalesce(failed.failed_amount, 0) AS failed_amount,
               coalesce(recog.membership_revenue, 0) AS membership_revenue,
               coalesce(invm.invoiced, 0) AS invoiced, coalesce(invm.invoiced_collected, 0) AS invoiced_collected,
               coalesce(invm.past_due_amount, 0) AS past_due_amount
        FROM pg_temp.iw_months mo
        LEFT JOIN fa ON fa.fa_location_key = mo.location_key AND fa.fa_month_start = mo.month_start
        LEFT JOIN cash ON cash.location_key = mo.location_key AND cash.month_start = mo.month_start
        LEFT JOIN failed ON failed.location_key = mo.location_key AND failed.month_start = mo.month_start
        LEFT JOIN recog ON recog.location_key = mo.location_key AND recog.month_start = mo.month_start
        LEFT JOIN invm ON invm.location_key = mo.location_key AND invm.month_start = mo.month_start
    )
    INSERT INTO ironwod.gym_monthly_metrics_cache
        (tenant_id, gym_id, location_key, program_key, month_start, time_zone, period_days, is_partial,
         history_start_date, computed_at, source_watermark, definitions_version, config_hash,
         members_start, members_end, active_members_end, on_hold_members_end, past_due_members_end,
         comped_members_end, members_pending_cancel_end, new_members, reactivated_members, churned_members,
         churned_from_start, new_and_churned_same_month, net_member_change, churn_rate, retention_rate,
         net_member_growth_rate, active_member_days, avg_active_members, paying_members, mrr_start, mrr_end,
         mrr_new, mrr_reactivation, mrr_expansion, mrr_contraction, mrr_churn, mrr_hold_out, mrr_hold_in,
         collected_gross, refunds, collected_net, failed_payment_invoices, failed_payment_amount,
         invoiced_amount, invoiced_collected_to_date, past_due_amount_end, membership_revenue_recognised,
         service_revenue_net, arm, service_revenue_per_active_member, avg_tenure_months_end,
         member_visits, all_visits, visits_per_active_member_week, members_zero_visits_month,
         members_no_visit_14d_end, members_no_visit_30d_end, members_attendance_declining_end,
         cohort_new_members, cohort_retained_90d, cohort_90d_retention_rate, cohort_90d_is_final)
    SELECT v_t, v_g, c.location_key, 'ALL', c.month_start, v_tz, c.period_days,
           v_today <= c.last_day + s.merge_gap_days, v_hist, now(), v_wm, s.definitions_version, v_hash,
           coalesce(c.members_start, 0), coalesce(c.members_end, 0), coalesce(c.active_end, 0),
           coalesce(c.on_hold_end, 0), coalesce(c.past_due_end, 0), coalesce(c.comped_end, 0),
           coalesce(c.pending_cancel_end, 0),
           CASE WHEN NOT c.first_month THEN coalesce(c.new_members, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.reactivated, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.churned, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.churned_from_start, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.new_and_churned, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.members_end, 0) - coalesce(c.members_start, 0) END,
           CASE WHEN NOT c.first_month AND c.members_start > 0
                THEN round(c.churned_from_start::numeric / c.members_start, 5) END,
           CASE WHEN NOT c.first_month AND c.members_start > 0
                THEN 1 - round(c.churned_from_start::numeric / c.members_start, 5) END,
           CASE WHEN NOT c.first_month AND c.members_start > 0
                THEN round((c.members_end - c.members_start)::numeric / c.members_start, 5) END,
           coalesce(c.active_days, 0), round(coalesce(c.active_days, 0)::numeric / c.period_days, 2),
           coalesce(c.paying, 0), coalesce(c.mrr_start, 0), coalesce(c.mrr_end, 0),
           CASE WHEN NOT c.first_month THEN coalesce(c.mrr_new, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.mrr_react, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.mrr_exp, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.mrr_contr, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.mrr_churn, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.mrr_hold_out, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.mrr_hold_in, 0) END,
           c.gross, c.refunds_amt, c.gross - c.refunds_amt, c.failed_n, c.failed_amount,
           c.invoiced, c.invoiced_collected, c.past_due_amount, round(c.membership_revenue, 2),
           c.gross - c.refunds_amt,
           CASE WHEN c.active_days > 0 THEN round(c.membership_revenue / (c.active_days::numeric / c.period_days), 2) END,
           CASE WHEN c.active_days > 0 THEN round((c.gross - c.refunds_amt) / (c.active_days::numeric / c.period_days), 2) END,
           round(c.tenure_days / 30.4375, 2),
           coalesce(c.member_visits, 0), coalesce(c.all_visits, 0),
           CASE WHEN c.active_days > 0 THEN round(c.member_visits / (c.active_days / 7.0), 3) END,
           coalesce(c.zero_visits, 0), coalesce(c.no_visit_short, 0), coalesce(c.no_visit_long, 0),
           coalesce(c.declining, 0),
           CASE WHEN NOT c.first_month THEN coalesce(c.cohort_new, 0) END,
           CASE WHEN NOT c.first_month THEN coalesce(c.cohort_retained, 0) END,
           CASE WHEN NOT c.first_month AND c.cohort_new > 0 THEN round(c.cohort_retained::numeric / c.cohort_new, 5) END,
           CASE WHEN NOT c.first_month THEN c.last_day + s.cohort_days < v_today END
    FROM c;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    RAISE DEBUG 'ironwod metrics: % done at %', 'cache', clock_timestamp();

    -- Six-month pooled figures (metrics.md §4.11-4.12) over the cached months.
    UPDATE ironwod.gym_monthly_metrics_cache x
       SET arm_6m = w.arm_6m,
           leg_months_6m = w.leg,
           ltv = round(w.arm_6m * w.leg, 2)
      FROM (SELECT y.location_key, y.program_key, y.month_start,
                   CASE WHEN sum(y.avg_active_members) OVER w6 > 0
                        THEN round(sum(y.membership_revenue_recognised) OVER w6 / sum(y.avg_active_members) OVER w6, 2)
                   END AS arm_6m,
                   CASE WHEN count(y.churned_from_start) OVER w6 >= 3 AND sum(y.churned_from_start) OVER w6 > 0
                        THEN round(sum(y.members_start) FILTER (WHERE y.churned_from_start IS NOT NULL) OVER w6::numeric
                                   / sum(y.churned_from_start) OVER w6, 2)
                   END AS leg
            FROM ironwod.gym_monthly_metrics_cache y
            WHERE y.tenant_id = v_t AND y.gym_id = v_g
            WINDOW w6 AS (PARTITION BY y.location_key, y.program_key ORDER BY y.month_start
                          ROWS BETWEEN 5 PRECEDING AND CURRENT ROW)) w
     WHERE x.tenant_id = v_t AND x.gym_id = v_g AND x.month_start >= v_from
       AND x.location_key = w.location_key AND x.program_key = w.program_key AND x.month_start = w.month_start;

    -- The newest source change is stamped on every cached month, not only on the
    -- months recomputed now: the recompute policy recomputed every month a change
    -- could touch, so each one reflects the sources up to v_wm, and a replay, which
    -- recomputes them all, stamps the same value.
    UPDATE ironwod.gym_monthly_metrics_cache x SET source_watermark = v_wm
     WHERE x.tenant_id = v_t AND x.gym_id = v_g AND x.source_watermark IS DISTINCT FROM v_wm;

    RETURN jsonb_build_object('from', v_from, 'to', v_cur, 'history_start', v_hist, 'time_zone', v_tz,
                              'spells', v_spells, 'facts', v_facts, 'cache_rows', v_rows);
END
$$;
COMMENT ON FUNCTION ironwod.compute_metrics(date) IS 'Rebuild spells, and member-month facts and cache rows for months from the given one (clamped to history start) to the current local month, for the current scope';

-- Recompute policy (metrics.md §5.4): the trailing months, plus every month a change
-- landed by the run touched (its earliest civil date, less the merge gap and the
-- cohort window that reach back from it).  The whole history when the cache is empty
-- or was built with other parameters or definitions.
CREATE FUNCTION ironwod.refresh_metrics(p_run_id bigint)
RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    s ironwod.metric_settings;
    v_tz text;
    v_cur date;
    v_dirty date;
    v_from date;
    v_full boolean;
BEGIN
    IF ironwod.scope_tenant() IS NULL OR ironwod.scope_gym() IS NULL THEN
        RAISE EXCEPTION 'no ironwod scope is set in this transaction'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Call ironwod_set_scope(tenant, gym) in the same transaction first.';
    END IF;
    s := ironwod.metric_config();
    v_tz := ironwod.gym_time_zone(ironwod.scope_tenant(), ironwod.scope_gym());
    v_cur := date_trunc('month', ironwod.metrics_today(v_tz))::date;
    SELECT min(d.dirty_from) INTO v_dirty FROM ironwod.metric_dirty d
    WHERE d.tenant_id = ironwod.scope_tenant() AND d.gym_id = ironwod.scope_gym() AND d.run_id = p_run_id;
    v_full := NOT EXISTS (SELECT 1 FROM ironwod.gym_monthly_metrics_cache c
                          WHERE c.tenant_id = ironwod.scope_tenant() AND c.gym_id = ironwod.scope_gym())
              OR EXISTS (SELECT 1 FROM ironwod.gym_monthly_metrics_cache c
                         WHERE c.tenant_id = ironwod.scope_tenant() AND c.gym_id = ironwod.scope_gym()
                           AND (c.config_hash <> ironwod.config_hash(s)
                                OR c.definitions_version <> s.definitions_version
                                OR c.time_zone <> v_tz));
    v_from := CASE WHEN v_full THEN NULL
                   ELSE least((v_cur - make_interval(months => s.trailing_months))::date,
                              v_dirty - greatest(s.merge_gap_days, s.cohort_days + 1)) END;
    RETURN ironwod.compute_metrics(v_from) || jsonb_build_object('run_id', p_run_id, 'full', v_full);
END
$$;
COMMENT ON FUNCTION ironwod.refresh_metrics(bigint) IS 'Worker, after transform_run: recompute the trailing months plus every month the run''s backdated changes touched (whole history on first build or a parameter change); returns the range and row counts';

CREATE FUNCTION ironwod.refresh_metrics_all()
RETURNS jsonb
LANGUAGE sql
AS $$ SELECT ironwod.compute_metrics(NULL) || jsonb_build_object('full', true) $$;
COMMENT ON FUNCTION ironwod.refresh_metrics_all() IS 'Recompute spells, facts and every cached month of the current scope from history start';

GRANT EXECUTE ON FUNCTION ironwod.metrics_today(text), ironwod.metric_config(), ironwod.config_hash(ironwod.metric_settings),
    ironwod.monthly_price(numeric, integer, text), ironwod.spread_months(integer, text, integer),
    ironwod.history_start(text), ironwod.compute_metrics(date), ironwod.refresh_metrics(bigint),
    ironwod.refresh_metrics_all()
    TO ironwod_worker;
