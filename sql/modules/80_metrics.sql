-- 80_metrics: spells, daily states, visits, member-month facts, money and
-- gym_monthly_metrics_cache (metrics.md §2-§5 within its v1 scope adjustments).
--
-- Pipeline of one refresh, all set-based, one function per stage (see "The stages
-- of a refresh" below):
--   qualifying memberships (per key: ALL, each location id, and program:<id> for
--   each program a membership gives access to, metrics.md §2.5)            metric_memberships
--   -> merged spells (gap <= merge_gap_days; rescinded spells marked)     member_spell
--   -> daily state ACTIVE / ON_HOLD / NOT_MEMBER with MRR, as spans (bridged gap
--      days are ACTIVE and carry the MRR of the membership that resumes coverage)
--                                                                          member_state_span
--   -> visits per person, location key and month                          member_visit_month
--   -> one fact row per person, location key and month                    member_month_fact
--   -> cash, invoice and recognised-revenue figures per key and month     gym_month_money
--   -> the cache, a GROUP BY over the facts plus the money                gym_monthly_metrics_cache
-- Spells and spans are rebuilt whole (a few rows per membership); the later stages
-- from the first month to recompute on (refresh_metrics: the trailing months and
-- the months a run's changes touched).
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
    -- The scope as values: on Citus a statement comparing tenant_id with a
    -- function's result (scope_tenant() is STABLE) runs on every shard, and an
    -- INSERT ... SELECT of it goes through the coordinator.
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
BEGIN
    IF v_t IS NOT NULL THEN
        INSERT INTO ironwod.metric_settings (tenant_id, gym_id) VALUES (v_t, v_g)
        ON CONFLICT (tenant_id, gym_id) DO NOTHING;
    END IF;
    SELECT * INTO STRICT s FROM ironwod.metric_settings x
    WHERE x.tenant_id = v_t AND x.gym_id = v_g;
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
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_set date;
    v_d date;
    v_m date;
BEGIN
    SELECT x.history_start_date INTO v_set FROM ironwod.metric_settings x
    WHERE x.tenant_id = v_t AND x.gym_id = v_g;
    IF v_set IS NOT NULL THEN
        RETURN v_set;
    END IF;
    -- the local date is monotonic in the instant, so the earliest instant (an index
    -- read) gives the earliest local date
    SELECT least((SELECT (min(t.processed_at) AT TIME ZONE p_tz)::date FROM ironwod.transactions t
                  WHERE t.tenant_id = v_t AND t.gym_id = v_g AND t.deleted_at IS NULL),
                 (SELECT (min(a.class_start_at) AT TIME ZONE p_tz)::date FROM ironwod.attendance_events a
                  WHERE a.tenant_id = v_t AND a.gym_id = v_g AND a.deleted_at IS NULL))
    INTO v_d;
    SELECT min(m.start_date) INTO v_m FROM ironwod.memberships m
    WHERE m.tenant_id = v_t AND m.gym_id = v_g AND m.deleted_at IS NULL;
    RETURN CASE WHEN v_d IS NULL THEN date_trunc('month', coalesce(v_m, ironwod.metrics_today(p_tz)))::date
                WHEN extract(day FROM v_d) = 1 THEN v_d
                ELSE (date_trunc('month', v_d) + interval '1 month')::date END;
END
$$;
COMMENT ON FUNCTION ironwod.history_start(text) IS 'history_start_date of the scoped gym: settings override, else the first full local month of synced transactions and sign-ins';

-- ---------------------------------------------------------------------------------
-- The stages of a refresh.  Each one is a function of the tenant and gym (so each
-- statement names one shard on Citus), reads what the stage before it wrote to a
-- tenant table (no temp tables: Citus refuses to join them to distributed tables)
-- and does its work in a few set-based statements whose joins are equi-joins on
-- (location key, person[, month]); a range condition only ever filters the few rows
-- of one person.  That keeps a full recompute linear in records.  The stages run
-- with nested loop and merge joins off: the tables a refresh has just rewritten have
-- no current statistics and CTE row estimates are guesses, so the plans must not
-- depend on estimates, and for these bulk equi-joins a hash join on every key is
-- always the right one (a nested loop or a merge on one key is quadratic per gym).
-- work_mem stays the server's: a large gym's refresh spills a little to disk, and
-- keeps the run worker's private memory under 64 MB (make bench reports it).
--
--   metrics_spells       member_spell        §2.3 merged spells, rescinded ones marked
--   metrics_day_states   member_state_span   §2.4 daily state, as intervals of constant state
--   metrics_visits       member_visit_month  §4.13-4.15 visits per person, key and month
--   metrics_month_facts  member_month_fact   §5.3 one row per person, key and month
--   metrics_month_flags  member_month_fact   §2.4 past due, §4.1 comped, §4.17 pending cancel
--   metrics_month_money  gym_month_money     §4.8-4.9 cash, invoices and recognised revenue
--   metrics_cache_rows   gym_monthly_metrics_cache   §5.2 the GROUP BY over facts and money
--   metrics_pooled       gym_monthly_metrics_cache   §4.11-4.12 six-month ARM, LEG and LTV
--
-- On Citus each stage statement runs on the tenant's node, as one statement, and
-- two things make that so:
-- - The planner settings.  A stage's SET clauses (and compute_metrics' jit = off)
--   set them for the session that runs it, but Citus plans each statement again
--   on the node, which SET clauses never reach.  There, with the shards a refresh
--   has just rewritten not analyzed yet (the run workers' ANALYZE is skipped for
--   distributed tables), the plans had nested loops, and every big statement was
--   JIT-compiled first: a backfill's refresh took 30 times as long as on one node
--   (make bench-citus).  So each stage also sets them with SET LOCAL
--   (stage_planner_settings), which Citus forwards to the nodes.
-- - The rows an INSERT ... SELECT writes take tenant_id and gym_id from the gym's
--   metric_settings row (the one p_s was read from), not from the parameters:
--   Citus runs an INSERT ... SELECT on the shard only when the distribution column
--   it writes is a distributed table's distribution column in the SELECT; a
--   constant there makes it pull every row to the coordinator and copy it back.
--   Its CTEs belong to its SELECT (INSERT INTO t (...) WITH ... SELECT): given as
--   WITH ... INSERT, Citus 12.1 sends the shard the CTEs' tables under their
--   distributed names, which the node refuses as a nested distributed query.
-- On one node the statements compute and plan as before: the settings row is one
-- index lookup, and SET LOCAL repeats what the SET clauses did.
-- ---------------------------------------------------------------------------------

-- The planner settings of a refresh stage (above), forwarded to the Citus nodes
-- of the transaction: a stage calls this with true first and with false last.
-- SET LOCAL here lasts until the calling stage returns, whose SET clauses then
-- restore the session's own values; false puts the nodes back to their defaults
-- for the rest of the transaction.  Citus forwards SET LOCAL only while
-- citus.propagate_set_commands is 'local', which ironwod_set_scope and the run
-- workers set.  Without Citus it repeats what the SET clauses did.
CREATE FUNCTION ironwod.stage_planner_settings(p_stage boolean)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF p_stage THEN
        SET LOCAL enable_nestloop = off;
        SET LOCAL enable_mergejoin = off;
        SET LOCAL jit = off;
    ELSE
        SET LOCAL enable_nestloop = DEFAULT;
        SET LOCAL enable_mergejoin = DEFAULT;
        SET LOCAL jit = DEFAULT;
    END IF;
END
$$;
COMMENT ON FUNCTION ironwod.stage_planner_settings(boolean) IS 'Refresh stages: nested loop joins, merge joins and JIT off (true) or back to the defaults (false) with SET LOCAL, so that on Citus the nodes that plan a stage''s statements use the settings of its SET clauses too';

-- Member-qualifying (price > 0) and comped (price = 0) memberships of the types the
-- gym counts, once gym-wide (location key ALL), once under their location and once
-- under each program they give access to (key 'program:<id>', metrics.md §2.5), as
-- half-open coverage [start_date, end_excl).  The refresh stages carry the key
-- through unchanged, so program rows come out of the same set-based pass as the
-- location rows.  security_invoker: the caller's RLS.
CREATE VIEW ironwod.metric_memberships WITH (security_invoker = true) AS
SELECT m.tenant_id, m.gym_id, k.location_key, m.member_id, m.membership_id, m.start_date,
       coalesce(m.end_date + 1, 'infinity'::date) AS end_excl,
       m.price > 0 AS qualifying,
       ironwod.monthly_price(m.price, m.billing_period_length, m.billing_period_unit) AS mrr,
       m.cancellation_requested_on
FROM ironwod.memberships m
JOIN ironwod.metric_settings s ON s.tenant_id = m.tenant_id AND s.gym_id = m.gym_id
CROSS JOIN LATERAL (VALUES ('ALL'), (m.location_id::text)) AS k(location_key)
WHERE m.deleted_at IS NULL AND NOT m.is_deleted
  AND m.membership_type = ANY (s.qualifying_types) AND m.price >= 0
  AND m.member_id IS NOT NULL AND m.start_date IS NOT NULL
  AND coalesce(m.end_date + 1, 'infinity'::date) > m.start_date
  AND k.location_key IS NOT NULL
UNION ALL
SELECT m.tenant_id, m.gym_id, 'program:' || p.program_id, m.member_id, m.membership_id, m.start_date,
       coalesce(m.end_date + 1, 'infinity'::date),
       m.price > 0,
       ironwod.monthly_price(m.price, m.billing_period_length, m.billing_period_unit),
       m.cancellation_requested_on
FROM ironwod.memberships m
JOIN ironwod.metric_settings s ON s.tenant_id = m.tenant_id AND s.gym_id = m.gym_id
CROSS JOIN LATERAL unnest(m.program_ids) AS p(program_id)
WHERE m.deleted_at IS NULL AND NOT m.is_deleted
  AND m.membership_type = ANY (s.qualifying_types) AND m.price >= 0
  AND m.member_id IS NOT NULL AND m.start_date IS NOT NULL
  AND coalesce(m.end_date + 1, 'infinity'::date) > m.start_date;
COMMENT ON VIEW ironwod.metric_memberships IS 'metrics.md §2.2-2.3, §2.5: the memberships the metrics read, per key (ALL, their location, and program:<id> for each program they give access to), as half-open coverage with monthly-normalised price; qualifying = price > 0, else comped';

-- Daily state (metrics.md §2.4) in interval form: from a person's first spell to
-- today, maximal runs of days on which the covering memberships, holds and spell do
-- not change.  active_before is the number of ACTIVE days before span_start, so the
-- ACTIVE days up to any day d inside the span are active_before + (d - span_start + 1)
-- when the span is ACTIVE, else active_before.
CREATE TABLE ironwod.member_state_span (
    tenant_id            uuid NOT NULL,
    gym_id               uuid NOT NULL,
    location_key         text NOT NULL,
    member_id            bigint NOT NULL,
    span_start           date NOT NULL,
    span_end_excl        date NOT NULL,
    state                text NOT NULL CHECK (state IN ('ACTIVE', 'ON_HOLD', 'NOT_MEMBER')),
    mrr                  numeric(12,2) NOT NULL,
    spell_start          date,
    spell_end_excl       date,
    spell_no             integer,
    active_before        integer NOT NULL,
    spell_active_before  integer,
    PRIMARY KEY (tenant_id, gym_id, location_key, member_id, span_start)
);
COMMENT ON TABLE ironwod.member_state_span IS 'Daily member state (metrics.md §2.4, §5.3 member_day_state in interval form): runs of days with one state and MRR per person and location key, with the ACTIVE days before each run and before its spell';
COMMENT ON COLUMN ironwod.member_state_span.location_key IS 'The key of the row''s figures: ALL (gym-wide), a Wodify location id, or program:<id> for a Wodify program (metrics.md §2.5; the cache splits it into location_key and program_key)';

-- Visit figures per person, location key and month (metrics.md §4.13-4.15):
-- visits at the key's locations and those on ACTIVE days; and, from visits
-- anywhere (the same on every key of the person): the month's total, the recent and
-- prior decline windows, and the last visit on or before the month's as-of day.
CREATE TABLE ironwod.member_visit_month (
    tenant_id               uuid NOT NULL,
    gym_id                  uuid NOT NULL,
    location_key            text NOT NULL,
    member_id               bigint NOT NULL,
    month_start             date NOT NULL,
    visits                  integer NOT NULL,
    member_visits           integer NOT NULL,
    visits_anywhere         integer NOT NULL,
    visits_recent           integer NOT NULL,
    visits_prior            integer NOT NULL,
    last_visit              date,
    PRIMARY KEY (tenant_id, gym_id, location_key, month_start, member_id)
);
COMMENT ON TABLE ironwod.member_visit_month IS 'Visit figures per person, location key and month (metrics.md §4.13-4.15): visits, member visits, visits anywhere, decline windows, last visit';
COMMENT ON COLUMN ironwod.member_visit_month.location_key IS 'The key of the row''s figures: ALL (gym-wide), a Wodify location id, or program:<id> for a Wodify program (metrics.md §2.5; the cache splits it into location_key and program_key)';

-- Money per location key and month (metrics.md §4.8-4.9), before rounding.
CREATE TABLE ironwod.gym_month_money (
    tenant_id            uuid NOT NULL,
    gym_id               uuid NOT NULL,
    location_key         text NOT NULL,
    month_start          date NOT NULL,
    gross                numeric NOT NULL,
    refunds              numeric NOT NULL,
    failed_n             integer NOT NULL,
    failed_amount        numeric NOT NULL,
    membership_revenue   numeric NOT NULL,
    invoiced             numeric NOT NULL,
    invoiced_collected   numeric NOT NULL,
    past_due_amount      numeric NOT NULL,
    PRIMARY KEY (tenant_id, gym_id, location_key, month_start)
);
COMMENT ON TABLE ironwod.gym_month_money IS 'Cash, failed payments, invoices and recognised membership revenue per location key and month (metrics.md §4.8-4.9), unrounded; the cache rows read it';
COMMENT ON COLUMN ironwod.gym_month_money.location_key IS 'The key of the row''s figures: ALL (gym-wide), a Wodify location id, or program:<id> for a Wodify program (metrics.md §2.5; the cache splits it into location_key and program_key)';

SELECT ironwod.apply_tenant_policies(t::regclass)
FROM unnest(ARRAY['ironwod.member_state_span', 'ironwod.member_visit_month', 'ironwod.gym_month_money']) AS t;
GRANT SELECT, INSERT, UPDATE, DELETE ON ironwod.member_state_span, ironwod.member_visit_month,
    ironwod.gym_month_money TO ironwod_worker;
GRANT SELECT ON ironwod.metric_memberships TO ironwod_worker;

-- Stage 1 (metrics.md §2.3): merge each person's qualifying coverage when the gap is
-- <= merge_gap_days; a spell of <= rescind_max_days with zero net collected revenue
-- (payments - refunds on invoices of its memberships) is rescinded.
CREATE FUNCTION ironwod.metrics_spells(p_tenant uuid, p_gym uuid, p_s ironwod.metric_settings)
RETURNS integer
LANGUAGE plpgsql
SET enable_nestloop = off SET enable_mergejoin = off SET jit = off
AS $$
DECLARE
    v_n integer;
BEGIN
    PERFORM ironwod.stage_planner_settings(true);
    DELETE FROM ironwod.member_spell WHERE tenant_id = p_tenant AND gym_id = p_gym;
    INSERT INTO ironwod.member_spell
        (tenant_id, gym_id, location_key, member_id, spell_start, spell_end_excl, spell_no, is_first,
         rescinded, net_revenue, membership_ids)
    WITH o AS (
        SELECT q.location_key, q.member_id, q.membership_id, q.start_date, q.end_excl,
               max(q.end_excl) OVER (PARTITION BY q.location_key, q.member_id
                                     ORDER BY q.start_date, q.end_excl, q.membership_id
                                     ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_end
        FROM ironwod.metric_memberships q
        WHERE q.tenant_id = p_tenant AND q.gym_id = p_gym AND q.qualifying
    ), g AS (
        SELECT o.*, sum(CASE WHEN o.prev_end IS NULL OR o.start_date > o.prev_end + p_s.merge_gap_days
                             THEN 1 ELSE 0 END)
                    OVER (PARTITION BY o.location_key, o.member_id
                          ORDER BY o.start_date, o.end_excl, o.membership_id) AS grp
        FROM o
    ), net AS (
        SELECT g.location_key, g.member_id, g.grp,
               -- a searched CASE: Citus 12.1 sends a simple one (CASE x WHEN ...) in
               -- an INSERT ... SELECT it runs on the shard as CASE x WHEN NULL::boolean
               coalesce(sum(CASE WHEN t.transaction_type = 'Payment' THEN t.amount
                                 WHEN t.transaction_type = 'Refund' THEN -t.amount ELSE 0 END), 0) AS net
        FROM g
        LEFT JOIN ironwod.invoices i
               ON i.tenant_id = p_tenant AND i.gym_id = p_gym AND i.deleted_at IS NULL
              AND i.membership_id = g.membership_id
        LEFT JOIN ironwod.transactions t
               ON t.tenant_id = p_tenant AND t.gym_id = p_gym AND t.deleted_at IS NULL AND t.invoice_id = i.invoice_id
        GROUP BY g.location_key, g.member_id, g.grp
    ), r AS (
        SELECT g.location_key, g.member_id, min(g.start_date) AS s0, max(g.end_excl) AS e0,
               array_agg(g.membership_id ORDER BY g.membership_id) AS ids, n.net,
               (max(g.end_excl) <> 'infinity' AND max(g.end_excl) - min(g.start_date) <= p_s.rescind_max_days
                AND n.net = 0) AS rescinded
        FROM g JOIN net n USING (location_key, member_id, grp)
        GROUP BY g.location_key, g.member_id, g.grp, n.net
    )
    -- tenant and gym from the settings row: on Citus the INSERT then runs on the shard
    SELECT gk.tenant_id, gk.gym_id, r.location_key, r.member_id, r.s0, r.e0,
           CASE WHEN NOT r.rescinded THEN
               row_number() OVER (PARTITION BY r.location_key, r.member_id, r.rescinded ORDER BY r.s0) END,
           NOT r.rescinded AND r.s0 = min(r.s0) FILTER (WHERE NOT r.rescinded)
                                       OVER (PARTITION BY r.location_key, r.member_id),
           r.rescinded, r.net, r.ids
    FROM r, (SELECT ms.tenant_id, ms.gym_id FROM ironwod.metric_settings ms
             WHERE ms.tenant_id = p_tenant AND ms.gym_id = p_gym) gk
    -- a fresh rebuild conflicts with nothing; should Citus ever pull the rows to
    -- the coordinator, the clause makes it insert them through intermediate
    -- results rather than COPY, which RLS refuses
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    PERFORM ironwod.stage_planner_settings(false);
    RETURN v_n;
END
$$;
COMMENT ON FUNCTION ironwod.metrics_spells(uuid, uuid, ironwod.metric_settings) IS 'Refresh stage 1, metrics.md §2.3 (coverage, holds and spells): rebuild member_spell of a gym from its qualifying memberships; returns the spell count';

-- Stage 2 (metrics.md §2.4): the daily state from each person's first spell to
-- today, as spans.  The span edges are every date at which a covering membership,
-- a hold or a spell starts or ends, so within a span the state and MRR are those of
-- its first day: ACTIVE when in a spell and covered by a membership not on hold or
-- not covered at all (a bridged gap), ON_HOLD when every covering membership is on
-- hold, else NOT_MEMBER.  MRR is that of the memberships not on hold; a bridged gap
-- carries the MRR of the coverage that resumes after it (0 if that is after today).
CREATE FUNCTION ironwod.metrics_day_states(p_tenant uuid, p_gym uuid, p_today date)
RETURNS integer
LANGUAGE plpgsql
SET enable_nestloop = off SET enable_mergejoin = off SET jit = off
AS $$
DECLARE
    v_n integer;
BEGIN
    PERFORM ironwod.stage_planner_settings(true);
    DELETE FROM ironwod.member_state_span WHERE tenant_id = p_tenant AND gym_id = p_gym;
    INSERT INTO ironwod.member_state_span
        (tenant_id, gym_id, location_key, member_id, span_start, span_end_excl, state, mrr, spell_start,
         spell_end_excl, spell_no, active_before, spell_active_before)
    WITH sp AS (
        SELECT s.location_key, s.member_id, s.spell_start, s.spell_end_excl, s.spell_no
        FROM ironwod.member_spell s
        WHERE s.tenant_id = p_tenant AND s.gym_id = p_gym AND NOT s.rescinded AND s.spell_start <= p_today
    ), f AS (
        SELECT sp.location_key, sp.member_id, min(sp.spell_start) AS first_day FROM sp GROUP BY 1, 2
    ), m AS (
        SELECT q.location_key, q.member_id, q.membership_id, q.start_date,
               least(q.end_excl, p_today + 1) AS end_excl, q.mrr
        FROM ironwod.metric_memberships q JOIN f USING (location_key, member_id)
        WHERE q.tenant_id = p_tenant AND q.gym_id = p_gym AND q.qualifying AND q.start_date <= p_today
    ), h AS (
        SELECT m.location_key, m.member_id, m.membership_id, x.hold_start_date AS hs,
               least(coalesce(x.hold_end_date, p_today), p_today) + 1 AS he
        FROM ironwod.membership_holds x JOIN m ON m.membership_id = x.membership_id
        WHERE x.tenant_id = p_tenant AND x.gym_id = p_gym AND x.deleted_at IS NULL
          AND x.hold_start_date IS NOT NULL AND x.hold_start_date <= p_today
    ), edge AS (
        SELECT DISTINCT e.location_key, e.member_id, e.d
        FROM (SELECT location_key, member_id, first_day AS d FROM f
              UNION ALL SELECT location_key, member_id, p_today + 1 FROM f
              UNION ALL SELECT location_key, member_id, unnest(ARRAY[start_date, end_excl]) FROM m
              UNION ALL SELECT location_key, member_id, unnest(ARRAY[hs, he]) FROM h
              UNION ALL SELECT location_key, member_id, unnest(ARRAY[spell_start, spell_end_excl]) FROM sp) e
        JOIN f USING (location_key, member_id)
        WHERE e.d >= f.first_day AND e.d <= p_today + 1
    ), seg AS (
        SELECT x.* FROM (SELECT e.*, lead(e.d) OVER (PARTITION BY e.location_key, e.member_id ORDER BY e.d) AS d_end
                         FROM edge e) x
        WHERE x.d_end IS NOT NULL
    ), cm AS (
        SELECT s.location_key, s.member_id, s.d, m.membership_id, m.mrr, bool_or(h.hs IS NOT NULL) AS held
        FROM seg s
        JOIN m ON m.location_key = s.location_key AND m.member_id = s.member_id
              AND m.start_date <= s.d AND s.d < m.end_excl
        LEFT JOIN h ON h.location_key = m.location_key AND h.membership_id = m.membership_id
                   AND h.hs <= s.d AND s.d < h.he
        GROUP BY s.location_key, s.member_id, s.d, m.membership_id, m.mrr
    ), cov AS (
        SELECT s.location_key, s.member_id, s.d, count(cm.membership_id) AS n_cov,
               count(cm.membership_id) FILTER (WHERE NOT cm.held) AS n_act,
               coalesce(sum(cm.mrr) FILTER (WHERE NOT cm.held), 0) AS mrr
        FROM seg s LEFT JOIN cm USING (location_key, member_id, d)
        GROUP BY s.location_key, s.member_id, s.d
    ), z AS (
        SELECT s.location_key, s.member_id, s.d, s.d_end, sp.spell_start, sp.spell_end_excl, sp.spell_no, c.n_cov, c.mrr,
               CASE WHEN sp.spell_start IS NULL THEN 'NOT_MEMBER'
                    WHEN c.n_cov = 0 OR c.n_act > 0 THEN 'ACTIVE' ELSE 'ON_HOLD' END AS state,
               count(*) FILTER (WHERE c.n_cov > 0)
                   OVER (PARTITION BY s.location_key, s.member_id ORDER BY s.d DESC) AS grp
        FROM seg s JOIN cov c USING (location_key, member_id, d)
        LEFT JOIN sp ON sp.location_key = s.location_key AND sp.member_id = s.member_id
                    AND sp.spell_start <= s.d AND s.d < sp.spell_end_excl
    ), w AS (
        SELECT z.*, CASE WHEN z.state = 'NOT_MEMBER' THEN 0
                         WHEN z.n_cov = 0 THEN coalesce(max(z.mrr) FILTER (WHERE z.n_cov > 0)
                                                  OVER (PARTITION BY z.location_key, z.member_id, z.grp), 0)
                         ELSE z.mrr END AS span_mrr,
               coalesce(sum(CASE WHEN z.state = 'ACTIVE' THEN z.d_end - z.d ELSE 0 END)
                        OVER (PARTITION BY z.location_key, z.member_id ORDER BY z.d
                              ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS active_before
        FROM z
    )
    -- tenant and gym from the settings row: on Citus the INSERT then runs on the shard
    SELECT gk.tenant_id, gk.gym_id, w.location_key, w.member_id, w.d, w.d_end, w.state, w.span_mrr, w.spell_start,
           w.spell_end_excl, w.spell_no, w.active_before,
           CASE WHEN w.spell_start IS NOT NULL THEN
               min(w.active_before) OVER (PARTITION BY w.location_key, w.member_id, w.spell_start) END
    FROM w, (SELECT ms.tenant_id, ms.gym_id FROM ironwod.metric_settings ms
             WHERE ms.tenant_id = p_tenant AND ms.gym_id = p_gym) gk
    -- a fresh rebuild conflicts with nothing; should Citus ever pull the rows to
    -- the coordinator, the clause makes it insert them through intermediate
    -- results rather than COPY, which RLS refuses
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    PERFORM ironwod.stage_planner_settings(false);
    RETURN v_n;
END
$$;
COMMENT ON FUNCTION ironwod.metrics_day_states(uuid, uuid, date) IS 'Refresh stage 2, metrics.md §2.4 (daily member state): rebuild member_state_span of a gym, the ACTIVE / ON_HOLD / NOT_MEMBER state and MRR of every day from each person''s first spell to today as spans; returns the span count';

-- Stage 3 (metrics.md §4.13-4.15): visits per person, local day, class location and
-- class program (one per class instance), turned into per person, key and month: the
-- visits at the key's locations (or to its program's classes, metrics.md §2.5) and
-- those on the person's ACTIVE days there; visits
-- anywhere in the month and in the decline windows ending on the as-of day (from
-- a running count of the person's visits, read at the window edges) and the last
-- visit on or before the as-of day.  Months from p_from on; before p_open only
-- for the people p_people (NULL: everyone; see compute_metrics).  Everyone else's
-- visits are read from a few days before their first window edge (p_open less the
-- decline windows) only: the running count starts later, by the same amount at
-- every edge, and their last visit before that is one max() per person.
CREATE FUNCTION ironwod.metrics_visits(p_tenant uuid, p_gym uuid, p_s ironwod.metric_settings, p_tz text,
                                       p_from date, p_hist date, p_today date, p_open date, p_people bigint[])
RETURNS integer
LANGUAGE plpgsql
SET enable_nestloop = off SET enable_mergejoin = off SET jit = off
AS $$
DECLARE
    v_n integer;
    v_win integer := p_s.decline_recent_days + p_s.decline_prior_days;
    -- local midnight of the cut, three days early (a zone's offset moves by less)
    v_cut timestamptz := (p_open - v_win - 3)::timestamp AT TIME ZONE p_tz;
BEGIN
    PERFORM ironwod.stage_planner_settings(true);
    DELETE FROM ironwod.member_visit_month
    WHERE tenant_id = p_tenant AND gym_id = p_gym
      AND (month_start >= p_open OR month_start < p_hist OR (month_start >= p_from AND member_id = ANY (p_people)));
    INSERT INTO ironwod.member_visit_month
        (tenant_id, gym_id, location_key, member_id, month_start, visits, member_visits, visits_anywhere,
         visits_recent, visits_prior, last_visit)
    WITH vd AS (
        SELECT x.member_id, x.d, x.location_id, x.program_id, count(*)::integer AS n
        FROM (SELECT DISTINCT a.member_id, (a.class_start_at AT TIME ZONE p_tz)::date AS d, a.location_id,
                     a.program_id, coalesce(a.class_id, -a.signin_id) AS class_key
              FROM ironwod.attendance_events a
              WHERE a.tenant_id = p_tenant AND a.gym_id = p_gym AND a.deleted_at IS NULL
                AND a.member_id IS NOT NULL AND a.class_start_at IS NOT NULL
                AND (p_people IS NULL OR a.class_start_at >= v_cut OR a.member_id = ANY (p_people))) x
        GROUP BY 1, 2, 3, 4
    ), dt AS (
        SELECT vd.member_id, vd.d, sum(vd.n)::integer AS n FROM vd WHERE vd.d <= p_today GROUP BY 1, 2
        UNION ALL
        -- everyone else's last visit before the cut, counted as no visit
        SELECT a.member_id, max((a.class_start_at AT TIME ZONE p_tz)::date), 0
        FROM ironwod.attendance_events a
        WHERE p_people IS NOT NULL AND a.tenant_id = p_tenant AND a.gym_id = p_gym AND a.deleted_at IS NULL
          AND a.member_id IS NOT NULL AND a.class_start_at < v_cut AND a.member_id <> ALL (p_people)
        GROUP BY 1
    ), mo AS (
        SELECT mo::date AS month_start, least((mo + interval '1 month')::date - 1, p_today) AS as_of
        FROM generate_series(p_from, date_trunc('month', p_today), interval '1 month') AS mo
    ), vk AS (
        SELECT k.location_key, vd.member_id, date_trunc('month', vd.d)::date AS month_start,
               sum(vd.n)::integer AS visits, coalesce(sum(vd.n) FILTER (WHERE s.state = 'ACTIVE'), 0)::integer AS member_visits
        FROM vd CROSS JOIN LATERAL (VALUES ('ALL'), (vd.location_id::text), ('program:' || vd.program_id)) AS k(location_key)
        LEFT JOIN ironwod.member_state_span s
               ON s.tenant_id = p_tenant AND s.gym_id = p_gym AND s.location_key = k.location_key
              AND s.member_id = vd.member_id AND s.span_start <= vd.d AND vd.d < s.span_end_excl
        WHERE k.location_key IS NOT NULL AND vd.d >= p_from AND vd.d <= p_today
          AND (p_people IS NULL OR vd.d >= p_open OR vd.member_id = ANY (p_people))
        GROUP BY 1, 2, 3
    ), va AS (
        SELECT x.member_id, x.month_start,
               (max(x.cv) FILTER (WHERE x.k = 1) - max(x.cv) FILTER (WHERE x.k = 4))::integer AS anywhere,
               (max(x.cv) FILTER (WHERE x.k = 1) - max(x.cv) FILTER (WHERE x.k = 2))::integer AS recent,
               (max(x.cv) FILTER (WHERE x.k = 2) - max(x.cv) FILTER (WHERE x.k = 3))::integer AS prior,
               max(x.lastd) FILTER (WHERE x.k = 1) AS last_visit
        FROM (SELECT y.*, sum(y.n) OVER w AS cv, max(CASE WHEN y.k = 0 THEN y.d END) OVER w AS lastd
              FROM (SELECT dt.member_id, dt.d, 0 AS k, dt.n, NULL::date AS month_start FROM dt
                    UNION ALL
                    SELECT p.member_id, l.d, l.k, 0, mo.month_start
                    FROM (SELECT DISTINCT dt.member_id FROM dt) p CROSS JOIN mo
                    CROSS JOIN LATERAL (VALUES (1, mo.as_of), (2, mo.as_of - p_s.decline_recent_days),
                                               (3, mo.as_of - v_win), (4, mo.month_start - 1)) AS l(k, d)
                    WHERE p_people IS NULL OR mo.month_start >= p_open OR p.member_id = ANY (p_people)) y
              WINDOW w AS (PARTITION BY y.member_id ORDER BY y.d, y.k ROWS UNBOUNDED PRECEDING)) x
        WHERE x.k > 0
        GROUP BY x.member_id, x.month_start
        HAVING max(x.lastd) FILTER (WHERE x.k = 1) IS NOT NULL
    )
    -- tenant and gym from the settings row: on Citus the INSERT then runs on the shard
    SELECT gk.tenant_id, gk.gym_id, y.location_key, y.member_id, y.month_start, y.visits, y.member_visits,
           y.anywhere, y.recent, y.prior, y.last_visit
    FROM (SELECT x.location_key, x.member_id, x.month_start,
                 coalesce(max(x.visits), 0) AS visits, coalesce(max(x.member_visits), 0) AS member_visits,
                 coalesce(max(va.anywhere), 0) AS anywhere, coalesce(max(va.recent), 0) AS recent,
                 coalesce(max(va.prior), 0) AS prior, max(va.last_visit) AS last_visit
          FROM (SELECT vk.location_key, vk.member_id, vk.month_start, vk.visits, vk.member_visits FROM vk
                UNION ALL
                SELECT 'ALL', va.member_id, va.month_start, NULL, NULL FROM va) x
          LEFT JOIN va ON va.member_id = x.member_id AND va.month_start = x.month_start
          GROUP BY x.location_key, x.member_id, x.month_start) y,
         (SELECT ms.tenant_id, ms.gym_id FROM ironwod.metric_settings ms
          WHERE ms.tenant_id = p_tenant AND ms.gym_id = p_gym) gk
    -- a fresh rebuild conflicts with nothing; should Citus ever pull the rows to
    -- the coordinator, the clause makes it insert them through intermediate
    -- results rather than COPY, which RLS refuses
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    PERFORM ironwod.stage_planner_settings(false);
    RETURN v_n;
END
$$;
COMMENT ON FUNCTION ironwod.metrics_visits(uuid, uuid, ironwod.metric_settings, text, date, date, date, date, bigint[]) IS 'Refresh stage 3, metrics.md §4.13-4.15 (attendance, absence, decline): rebuild member_visit_month of a gym from the given month on (before p_open only for the given people); returns the row count';

-- Stage 4 (metrics.md §3, §4.1-4.7, §4.13-4.17, §5.3): one fact row per person,
-- location key and month from p_from on, for everyone with a state, a visit at the
-- key's locations or a comped membership in the month.  The snapshots, ACTIVE days
-- and the ACTIVE-day counts the absence and decline rules need (up to the as-of
-- day, the window edges, the last visit and the spell's start; ACTIVE days never
-- decrease, so the absence count is the later of the last two) are read from the
-- person's spans (at most a few per person), visits from member_visit_month
-- (visits anywhere from the person's ALL row).  Past due and comped: stage 4b.
-- Before p_open only for the people p_people (NULL: everyone).
CREATE FUNCTION ironwod.metrics_month_facts(p_tenant uuid, p_gym uuid, p_s ironwod.metric_settings, p_keys text[],
                                            p_from date, p_hist date, p_today date, p_open date, p_people bigint[])
RETURNS integer
LANGUAGE plpgsql
SET enable_nestloop = off SET enable_mergejoin = off SET jit = off
AS $$
DECLARE
    v_n integer;
    v_r integer := p_s.decline_recent_days;
    v_p integer := p_s.decline_recent_days + p_s.decline_prior_days;
BEGIN
    PERFORM ironwod.stage_planner_settings(true);
    DELETE FROM ironwod.member_month_fact
    WHERE tenant_id = p_tenant AND gym_id = p_gym
      AND (month_start >= p_open OR month_start < p_hist OR (month_start >= p_from AND member_id = ANY (p_people)));
    INSERT INTO ironwod.member_month_fact
        (tenant_id, gym_id, location_key, member_id, month_start, as_of, state_start, state_end,
         mrr_start, mrr_end, movement, mrr_delta, new_events, reactivated_events, churn_events,
         new_and_churned, active_days, hold_days, visits, member_visits, tenure_active_days,
         absent_active_days, is_past_due_end, is_comped_end, is_pending_cancel_end, is_zero_visits,
         is_no_visit_short, is_no_visit_long, is_declining, is_paying, cohort_retained_90d)
    WITH mo AS (
        SELECT k.location_key, mo::date AS month_start, (mo + interval '1 month')::date - 1 AS last_day,
               least((mo + interval '1 month')::date - 1, p_today) AS as_of
        FROM generate_series(p_from, date_trunc('month', p_today), interval '1 month') AS mo, unnest(p_keys) AS k(location_key)
    ), cand AS (
        SELECT DISTINCT mo.*, c.member_id
        FROM (SELECT s.location_key, s.member_id, m::date AS month_start, s.span_start AS a, s.span_end_excl AS b, true AS st
              FROM ironwod.member_state_span s,
                   generate_series(date_trunc('month', greatest(s.span_start, p_from)), s.span_end_excl, interval '1 month') m
              WHERE s.tenant_id = p_tenant AND s.gym_id = p_gym AND s.state <> 'NOT_MEMBER' AND s.span_end_excl >= p_from
              UNION ALL
              SELECT v.location_key, v.member_id, v.month_start, NULL, NULL, false FROM ironwod.member_visit_month v
              WHERE v.tenant_id = p_tenant AND v.gym_id = p_gym AND v.month_start >= p_from AND v.visits > 0
              UNION ALL
              SELECT q.location_key, q.member_id, m::date, q.start_date, q.end_excl, false
              FROM ironwod.metric_memberships q,
                   generate_series(date_trunc('month', greatest(q.start_date, p_from)),
                                   least(q.end_excl - 1, p_today), interval '1 month') m
              WHERE q.tenant_id = p_tenant AND q.gym_id = p_gym AND NOT q.qualifying AND q.end_excl > p_from) c
        JOIN mo ON mo.location_key = c.location_key AND mo.month_start = c.month_start
        WHERE (c.a IS NULL OR (c.st AND c.a <= mo.as_of AND c.b >= mo.month_start)
               OR (NOT c.st AND c.a <= mo.as_of AND mo.as_of < c.b))
          AND (p_people IS NULL OR mo.month_start >= p_open OR c.member_id = ANY (p_people))
    ), snap AS (
        SELECT c.location_key, c.month_start, c.last_day, c.as_of, c.member_id,
               coalesce(va.visits_anywhere, 0) AS visits_anywhere,
               coalesce(va.visits_recent, 0) AS visits_r, coalesce(va.visits_prior, 0) AS visits_p,
               coalesce(max(s.active_before + CASE WHEN s.state = 'ACTIVE' THEN va.last_visit - s.span_start + 1 ELSE 0 END)
                        FILTER (WHERE s.span_start <= va.last_visit AND va.last_visit < s.span_end_excl), 0) AS cum_lv,
               coalesce(max(s.state) FILTER (WHERE s.span_start <= c.month_start - 1 AND c.month_start - 1 < s.span_end_excl), 'NOT_MEMBER') AS state_start,
               coalesce(max(s.mrr) FILTER (WHERE s.span_start <= c.month_start - 1 AND c.month_start - 1 < s.span_end_excl), 0) AS mrr_start,
               coalesce(max(s.state) FILTER (WHERE s.span_start <= c.as_of AND c.as_of < s.span_end_excl), 'NOT_MEMBER') AS state_end,
               coalesce(max(s.mrr) FILTER (WHERE s.span_start <= c.as_of AND c.as_of < s.span_end_excl), 0) AS mrr_end,
               max(s.spell_end_excl) FILTER (WHERE s.span_start <= c.as_of AND c.as_of < s.span_end_excl) AS end_spell_end,
               max(s.spell_no) FILTER (WHERE s.span_start <= c.as_of AND c.as_of < s.span_end_excl) AS end_spell_no,
               coalesce(max(s.spell_active_before) FILTER (WHERE s.span_start <= c.as_of AND c.as_of < s.span_end_excl), 0) AS before_spell,
               coalesce(max(s.active_before + CASE WHEN s.state = 'ACTIVE' THEN c.as_of - s.span_start + 1 ELSE 0 END)
                        FILTER (WHERE s.span_start <= c.as_of AND c.as_of < s.span_end_excl), 0) AS cum_end,
               coalesce(max(s.active_before + CASE WHEN s.state = 'ACTIVE' THEN c.as_of - v_r - s.span_start + 1 ELSE 0 END)
                        FILTER (WHERE s.span_start <= c.as_of - v_r AND c.as_of - v_r < s.span_end_excl), 0) AS cum_r,
               coalesce(max(s.active_before + CASE WHEN s.state = 'ACTIVE' THEN c.as_of - v_p - s.span_start + 1 ELSE 0 END)
                        FILTER (WHERE s.span_start <= c.as_of - v_p AND c.as_of - v_p < s.span_end_excl), 0) AS cum_p,
               coalesce(sum(least(s.span_end_excl, c.as_of + 1) - greatest(s.span_start, c.month_start))
                        FILTER (WHERE s.state = 'ACTIVE' AND s.span_start <= c.as_of AND s.span_end_excl > c.month_start), 0) AS active_days,
               coalesce(sum(least(s.span_end_excl, c.as_of + 1) - greatest(s.span_start, c.month_start))
                        FILTER (WHERE s.state = 'ON_HOLD' AND s.span_start <= c.as_of AND s.span_end_excl > c.month_start), 0) AS hold_days
        FROM cand c
        LEFT JOIN ironwod.member_visit_month va
               ON va.tenant_id = p_tenant AND va.gym_id = p_gym AND va.location_key = 'ALL'
              AND va.member_id = c.member_id AND va.month_start = c.month_start
        LEFT JOIN ironwod.member_state_span s
               ON s.tenant_id = p_tenant AND s.gym_id = p_gym AND s.location_key = c.location_key AND s.member_id = c.member_id
        GROUP BY c.location_key, c.month_start, c.last_day, c.as_of, c.member_id,
                 va.visits_anywhere, va.visits_recent, va.visits_prior
    ), ev AS (
        SELECT c.location_key, c.month_start, c.member_id,
               count(*) FILTER (WHERE sp.spell_start BETWEEN c.month_start AND c.as_of AND sp.spell_no = 1) AS new_events,
               count(*) FILTER (WHERE sp.spell_start BETWEEN c.month_start AND c.as_of AND sp.spell_no > 1) AS react_events,
               count(*) FILTER (WHERE sp.spell_end_excl BETWEEN c.month_start AND c.as_of) AS churn_events,
               count(*) FILTER (WHERE sp.spell_start BETWEEN c.month_start AND c.as_of
                                  AND sp.spell_end_excl BETWEEN c.month_start AND c.as_of) AS new_and_churned,
               bool_or(sp.spell_end_excl > sp.spell_start + p_s.cohort_days)
                   FILTER (WHERE sp.spell_start BETWEEN c.month_start AND c.as_of AND sp.spell_no = 1) AS retained
        FROM cand c
        JOIN ironwod.member_spell sp
          ON sp.tenant_id = p_tenant AND sp.gym_id = p_gym AND sp.location_key = c.location_key
         AND sp.member_id = c.member_id AND NOT sp.rescinded
         AND (sp.spell_start BETWEEN c.month_start AND c.as_of OR sp.spell_end_excl BETWEEN c.month_start AND c.as_of)
        GROUP BY c.location_key, c.month_start, c.member_id
    ), pay AS (
        SELECT DISTINCT q.location_key, i.member_id, date_trunc('month', i.due_date)::date AS month_start
        FROM ironwod.invoices i
        JOIN ironwod.metric_memberships q
          ON q.tenant_id = p_tenant AND q.gym_id = p_gym AND q.membership_id = i.membership_id AND q.qualifying
        WHERE i.tenant_id = p_tenant AND i.gym_id = p_gym AND i.deleted_at IS NULL AND i.status IS DISTINCT FROM 'Voided'
          AND i.paid_on IS NOT NULL AND i.amount > 0 AND i.due_date >= p_from
    ), pend AS (
        SELECT q.location_key, q.member_id, q.end_excl, min(coalesce(q.cancellation_requested_on, q.start_date)) AS known_on
        FROM ironwod.metric_memberships q
        WHERE q.tenant_id = p_tenant AND q.gym_id = p_gym AND q.qualifying AND q.end_excl <> 'infinity'
        GROUP BY 1, 2, 3
    ), fl AS (
        SELECT b.*, coalesce(ev.new_events, 0) AS new_events, coalesce(ev.react_events, 0) AS react_events,
               coalesce(ev.churn_events, 0) AS churn_events, coalesce(ev.new_and_churned, 0) AS new_and_churned, ev.retained,
               coalesce(vk.visits, 0) AS visits, coalesce(vk.member_visits, 0) AS member_visits,
               CASE WHEN b.state_end = 'ACTIVE' THEN b.cum_end - greatest(b.cum_lv, b.before_spell) END AS absent_days,
               b.cum_end - b.cum_r AS e_r, b.cum_r - b.cum_p AS e_p,
               pay.member_id IS NOT NULL AS is_paying,
               b.state_end <> 'NOT_MEMBER' AND pend.known_on <= b.as_of AS is_pending_cancel
        FROM snap b
        LEFT JOIN ev USING (location_key, month_start, member_id)
        LEFT JOIN pay USING (location_key, month_start, member_id)
        LEFT JOIN pend ON pend.location_key = b.location_key AND pend.member_id = b.member_id AND pend.end_excl = b.end_spell_end
        LEFT JOIN ironwod.member_visit_month vk
               ON vk.tenant_id = p_tenant AND vk.gym_id = p_gym AND vk.location_key = b.location_key
              AND vk.member_id = b.member_id AND vk.month_start = b.month_start
    )
    -- tenant and gym from the settings row: on Citus the INSERT then runs on the shard
    SELECT gk.tenant_id, gk.gym_id, f.location_key, f.member_id, f.month_start, f.as_of, f.state_start, f.state_end,
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
           f.visits, f.member_visits, f.cum_end, f.absent_days, false, false, coalesce(f.is_pending_cancel, false),
           f.active_days = f.as_of - f.month_start + 1 AND f.visits_anywhere = 0,
           f.state_end = 'ACTIVE' AND f.absent_days >= p_s.absence_short_days,
           f.state_end = 'ACTIVE' AND f.absent_days >= p_s.absence_long_days,
           f.state_end = 'ACTIVE'
               AND f.e_p >= p_s.decline_min_exposure * p_s.decline_prior_days
               AND f.e_r >= p_s.decline_min_exposure * p_s.decline_recent_days
               AND f.visits_p / (f.e_p / 7.0) >= p_s.decline_min_weekly_rate
               AND f.visits_r / (f.e_r / 7.0) <= p_s.decline_ratio * (f.visits_p / (f.e_p / 7.0)),
           f.is_paying,
           CASE WHEN f.new_events > 0 THEN coalesce(f.retained, false) END
    FROM fl f, (SELECT ms.tenant_id, ms.gym_id FROM ironwod.metric_settings ms
                WHERE ms.tenant_id = p_tenant AND ms.gym_id = p_gym) gk
    -- a fresh rebuild conflicts with nothing; should Citus ever pull the rows to
    -- the coordinator, the clause makes it insert them through intermediate
    -- results rather than COPY, which RLS refuses
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    PERFORM ironwod.stage_planner_settings(false);
    RETURN v_n;
END
$$;
COMMENT ON FUNCTION ironwod.metrics_month_facts(uuid, uuid, ironwod.metric_settings, text[], date, date, date, date, bigint[]) IS 'Refresh stage 4, metrics.md §3 and §4.1-4.17 (month snapshot algebra and per-person metrics), §5.3 member_month_fact: rebuild the facts of a gym from the given month on (before p_open only for the given people); returns the fact count';

-- Stage 4b (metrics.md §2.4 past due, §4.1 comped): the two flags that read
-- invoices and memberships by date range, set on the few facts they hold for.
-- Past due on as_of: a member with an unpaid, non-voided invoice of a qualifying
-- membership due before it; comped: a non-member covered by a $0 membership on as_of.
-- An invoice is past due only in the months from its due date to its payment.
-- Before p_open only on the facts of the people p_people (NULL: everyone).
CREATE FUNCTION ironwod.metrics_month_flags(p_tenant uuid, p_gym uuid, p_from date, p_today date,
                                            p_open date, p_people bigint[])
RETURNS integer
LANGUAGE plpgsql
SET enable_nestloop = off SET enable_mergejoin = off SET jit = off
AS $$
DECLARE
    v_n integer;
BEGIN
    PERFORM ironwod.stage_planner_settings(true);
    UPDATE ironwod.member_month_fact f
       SET is_past_due_end = x.past_due AND f.state_end <> 'NOT_MEMBER',
           is_comped_end = x.comped AND f.state_end = 'NOT_MEMBER'
      FROM (SELECT y.location_key, y.member_id, y.month_start, bool_or(y.past_due) AS past_due, bool_or(NOT y.past_due) AS comped
            FROM (SELECT q.location_key, i.member_id, m::date AS month_start, true AS past_due
                  FROM ironwod.invoices i
                  JOIN ironwod.metric_memberships q
                    ON q.tenant_id = p_tenant AND q.gym_id = p_gym AND q.membership_id = i.membership_id AND q.qualifying,
                       generate_series(date_trunc('month', greatest(i.due_date, p_from)),
                                       least(coalesce(i.paid_on, p_today), p_today), interval '1 month') m
                  WHERE i.tenant_id = p_tenant AND i.gym_id = p_gym AND i.deleted_at IS NULL
                    AND i.status IS DISTINCT FROM 'Voided' AND i.member_id IS NOT NULL
                    AND (p_people IS NULL OR m::date >= p_open OR i.member_id = ANY (p_people))
                    AND i.due_date < least((m + interval '1 month')::date - 1, p_today)
                    AND (i.paid_on IS NULL OR i.paid_on >= least((m + interval '1 month')::date - 1, p_today))
                  UNION ALL
                  SELECT q.location_key, q.member_id, m::date, false
                  FROM ironwod.metric_memberships q,
                       generate_series(date_trunc('month', greatest(q.start_date, p_from)),
                                       least(q.end_excl - 1, p_today), interval '1 month') m
                  WHERE q.tenant_id = p_tenant AND q.gym_id = p_gym AND NOT q.qualifying AND q.end_excl > p_from
                    AND (p_people IS NULL OR m::date >= p_open OR q.member_id = ANY (p_people))
                    AND q.start_date <= least((m + interval '1 month')::date - 1, p_today)
                    AND least((m + interval '1 month')::date - 1, p_today) < q.end_excl) y
            GROUP BY 1, 2, 3) x
     WHERE f.tenant_id = p_tenant AND f.gym_id = p_gym AND f.month_start >= p_from
       AND (p_people IS NULL OR f.month_start >= p_open OR f.member_id = ANY (p_people))
       AND f.location_key = x.location_key AND f.member_id = x.member_id AND f.month_start = x.month_start
       AND ((x.past_due AND f.state_end <> 'NOT_MEMBER') OR (x.comped AND f.state_end = 'NOT_MEMBER'));
    GET DIAGNOSTICS v_n = ROW_COUNT;
    PERFORM ironwod.stage_planner_settings(false);
    RETURN v_n;
END
$$;
COMMENT ON FUNCTION ironwod.metrics_month_flags(uuid, uuid, date, date, date, bigint[]) IS 'Refresh stage 4b, metrics.md §2.4 (PAST_DUE flag) and §4.1 (comped members): set is_past_due_end and is_comped_end on the facts of a gym from the given month on; returns the rows flagged';

-- Stage 5 (metrics.md §4.8-4.9): money per location key and month from p_from on.
-- Cash by local processed date and transaction location; a failed invoice counted
-- once; membership payments spread over their billing period; invoices by due date
-- and invoice location, past due in the months from their due date to their payment.
CREATE FUNCTION ironwod.metrics_month_money(p_tenant uuid, p_gym uuid, p_s ironwod.metric_settings, p_tz text,
                                            p_keys text[], p_from date, p_hist date, p_today date)
RETURNS integer
LANGUAGE plpgsql
SET enable_nestloop = off SET enable_mergejoin = off SET jit = off
AS $$
DECLARE
    v_n integer;
BEGIN
    PERFORM ironwod.stage_planner_settings(true);
    DELETE FROM ironwod.gym_month_money
    WHERE tenant_id = p_tenant AND gym_id = p_gym AND (month_start >= p_from OR month_start < p_hist);
    INSERT INTO ironwod.gym_month_money
        (tenant_id, gym_id, location_key, month_start, gross, refunds, failed_n, failed_amount,
         membership_revenue, invoiced, invoiced_collected, past_due_amount)
    WITH mo AS (
        SELECT k.location_key, mo::date AS month_start, (mo + interval '1 month')::date - 1 AS last_day,
               least((mo + interval '1 month')::date - 1, p_today) AS as_of
        FROM generate_series(p_from, date_trunc('month', p_today), interval '1 month') AS mo, unnest(p_keys) AS k(location_key)
    ), tx AS MATERIALIZED (
        SELECT t.location_id, t.transaction_type, t.payment_method, t.amount, t.invoice_id,
               date_trunc('month', (t.processed_at AT TIME ZONE p_tz)::date)::date AS mo,
               i.membership_id, i.amount AS invoice_amount, m.billing_period_length, m.billing_period_unit,
               m.program_ids
        FROM ironwod.transactions t
        LEFT JOIN ironwod.invoices i
               ON i.tenant_id = p_tenant AND i.gym_id = p_gym AND i.invoice_id = t.invoice_id AND i.deleted_at IS NULL
        LEFT JOIN ironwod.memberships m
               ON m.tenant_id = p_tenant AND m.gym_id = p_gym AND m.membership_id = i.membership_id
        WHERE t.tenant_id = p_tenant AND t.gym_id = p_gym AND t.deleted_at IS NULL AND t.processed_at IS NOT NULL
    ), txk AS (
        -- gym-wide, at the transaction's location, and under each program of its
        -- invoice's membership (revenue follows the membership, metrics.md §2.5)
        SELECT k.location_key, tx.*
        FROM tx CROSS JOIN LATERAL (VALUES ('ALL'), (tx.location_id::text)) AS k(location_key)
        WHERE k.location_key IS NOT NULL
        UNION ALL
        SELECT 'program:' || p.program_id, tx.* FROM tx CROSS JOIN LATERAL unnest(tx.program_ids) AS p(program_id)
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
            SELECT t.location_key, (t.mo + make_interval(months => k))::date AS month_start, t.amount / n.n AS amount
            FROM txk t
            CROSS JOIN LATERAL (SELECT ironwod.spread_months(t.billing_period_length, t.billing_period_unit,
                                                             p_s.max_spread_months) AS n) n
            CROSS JOIN LATERAL generate_series(0, n.n - 1) AS k
            WHERE t.transaction_type = 'Payment' AND t.payment_method IS DISTINCT FROM 'Store Credit'
              AND t.membership_id IS NOT NULL
            UNION ALL
            SELECT t.location_key, t.mo, -t.amount FROM txk t WHERE t.transaction_type = 'Refund' AND t.membership_id IS NOT NULL
        ) x GROUP BY 1, 2
    ), iv AS MATERIALIZED (
        SELECT i.location_id, i.amount, i.due_date, i.paid_on, coalesce(c.collected, 0) AS collected, m.program_ids
        FROM ironwod.invoices i
        -- a searched CASE, as in metrics_spells (Citus)
        LEFT JOIN (SELECT t.invoice_id, sum(CASE WHEN t.transaction_type = 'Payment' THEN t.amount
                                                 WHEN t.transaction_type = 'Refund' THEN -t.amount ELSE 0 END) AS collected
                   FROM ironwod.transactions t
                   WHERE t.tenant_id = p_tenant AND t.gym_id = p_gym AND t.deleted_at IS NULL AND t.invoice_id IS NOT NULL
                   GROUP BY 1) c ON c.invoice_id = i.invoice_id
        LEFT JOIN ironwod.memberships m
               ON m.tenant_id = p_tenant AND m.gym_id = p_gym AND m.membership_id = i.membership_id
        WHERE i.tenant_id = p_tenant AND i.gym_id = p_gym AND i.deleted_at IS NULL
          AND i.status IS DISTINCT FROM 'Voided' AND i.due_date IS NOT NULL
    ), inv AS (
        SELECT k.location_key, iv.amount, iv.due_date, iv.paid_on, iv.collected
        FROM iv CROSS JOIN LATERAL (VALUES ('ALL'), (iv.location_id::text)) AS k(location_key)
        WHERE k.location_key IS NOT NULL
        UNION ALL
        SELECT 'program:' || p.program_id, iv.amount, iv.due_date, iv.paid_on, iv.collected
        FROM iv CROSS JOIN LATERAL unnest(iv.program_ids) AS p(program_id)
    ), invm AS (
        SELECT mo.location_key, mo.month_start,
               coalesce(sum(i.amount) FILTER (WHERE i.due_date BETWEEN mo.month_start AND mo.last_day), 0) AS invoiced,
               coalesce(sum(least(greatest(i.collected, 0), i.amount))
                        FILTER (WHERE i.due_date BETWEEN mo.month_start AND mo.last_day), 0) AS invoiced_collected,
               coalesce(sum(i.amount) FILTER (WHERE i.due_date <= mo.as_of
                                                AND (i.paid_on IS NULL OR i.paid_on > mo.as_of)), 0) AS past_due_amount
        FROM inv i
        CROSS JOIN LATERAL generate_series(date_trunc('month', greatest(i.due_date, p_from)),
                                           greatest(i.due_date, least(coalesce(i.paid_on, p_today), p_today)),
                                           interval '1 month') AS m
        JOIN mo ON mo.location_key = i.location_key AND mo.month_start = m::date
        GROUP BY 1, 2
    )
    -- tenant and gym from the settings row: on Citus the INSERT then runs on the shard
    SELECT gk.tenant_id, gk.gym_id, mo.location_key, mo.month_start, coalesce(cash.gross, 0), coalesce(cash.refunds, 0),
           coalesce(cash.failed_n, 0), coalesce(failed.failed_amount, 0), coalesce(recog.membership_revenue, 0),
           coalesce(invm.invoiced, 0), coalesce(invm.invoiced_collected, 0), coalesce(invm.past_due_amount, 0)
    FROM mo
    LEFT JOIN cash USING (location_key, month_start)
    LEFT JOIN failed USING (location_key, month_start)
    LEFT JOIN recog USING (location_key, month_start)
    LEFT JOIN invm USING (location_key, month_start)
    CROSS JOIN (SELECT ms.tenant_id, ms.gym_id FROM ironwod.metric_settings ms
                WHERE ms.tenant_id = p_tenant AND ms.gym_id = p_gym) gk
    -- a fresh rebuild conflicts with nothing; should Citus ever pull the rows to
    -- the coordinator, the clause makes it insert them through intermediate
    -- results rather than COPY, which RLS refuses
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    PERFORM ironwod.stage_planner_settings(false);
    RETURN v_n;
END
$$;
COMMENT ON FUNCTION ironwod.metrics_month_money(uuid, uuid, ironwod.metric_settings, text, text[], date, date, date) IS 'Refresh stage 5, metrics.md §4.8 (cash, refunds, failed payments, invoiced, past due) and §4.9 (recognised revenue): rebuild gym_month_money of a gym from the given month on; returns the row count';

-- Stage 6 (metrics.md §5.1-5.2): the cache rows from p_from on, a GROUP BY over the
-- facts (people counted once per key, never summed over locations or programs)
-- joined to the money of stage 5.  Key program:<id> is the row of location ALL and
-- program <id>.  Flows are NULL in the history-start month.
CREATE FUNCTION ironwod.metrics_cache_rows(p_tenant uuid, p_gym uuid, p_s ironwod.metric_settings, p_tz text,
                                           p_keys text[], p_from date, p_hist date, p_today date,
                                           p_watermark timestamptz, p_hash text)
RETURNS integer
LANGUAGE plpgsql
SET enable_nestloop = off SET enable_mergejoin = off SET jit = off
AS $$
DECLARE
    v_n integer;
BEGIN
    PERFORM ironwod.stage_planner_settings(true);
    DELETE FROM ironwod.gym_monthly_metrics_cache
    WHERE tenant_id = p_tenant AND gym_id = p_gym AND (month_start >= p_from OR month_start < p_hist);
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
        WHERE f.tenant_id = p_tenant AND f.gym_id = p_gym AND f.month_start >= p_from
        GROUP BY f.location_key, f.month_start
    ), c AS (
        SELECT mo.location_key, mo.month_start, mo.last_day, mo.as_of,
               (mo.as_of - mo.month_start + 1) AS period_days,
               mo.month_start = p_hist AS first_month,
               fa.*, coalesce(y.gross, 0) AS gross, coalesce(y.refunds, 0) AS refunds_amt,
               coalesce(y.failed_n, 0) AS failed_n, coalesce(y.failed_amount, 0) AS failed_amount,
               coalesce(y.membership_revenue, 0) AS membership_revenue,
               coalesce(y.invoiced, 0) AS invoiced, coalesce(y.invoiced_collected, 0) AS invoiced_collected,
               coalesce(y.past_due_amount, 0) AS past_due_amount
        FROM (SELECT k.location_key, mo::date AS month_start, (mo + interval '1 month')::date - 1 AS last_day,
                     least((mo + interval '1 month')::date - 1, p_today) AS as_of
              FROM generate_series(p_from, date_trunc('month', p_today), interval '1 month') AS mo,
                   unnest(p_keys) AS k(location_key)) mo
        LEFT JOIN fa ON fa.fa_location_key = mo.location_key AND fa.fa_month_start = mo.month_start
        LEFT JOIN ironwod.gym_month_money y
               ON y.tenant_id = p_tenant AND y.gym_id = p_gym AND y.location_key = mo.location_key
              AND y.month_start = mo.month_start
    )
    -- tenant and gym from the settings row: on Citus the INSERT then runs on the shard
    SELECT gk.tenant_id, gk.gym_id,
           CASE WHEN c.location_key LIKE 'program:%' THEN 'ALL' ELSE c.location_key END,
           CASE WHEN c.location_key LIKE 'program:%' THEN substr(c.location_key, 9) ELSE 'ALL' END,
           c.month_start, p_tz, c.period_days,
           p_today <= c.last_day + p_s.merge_gap_days, p_hist, now(), p_watermark, p_s.definitions_version, p_hash,
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
           CASE WHEN NOT c.first_month THEN c.last_day + p_s.cohort_days < p_today END
    FROM c, (SELECT ms.tenant_id, ms.gym_id FROM ironwod.metric_settings ms
             WHERE ms.tenant_id = p_tenant AND ms.gym_id = p_gym) gk
    -- a fresh rebuild conflicts with nothing; should Citus ever pull the rows to
    -- the coordinator, the clause makes it insert them through intermediate
    -- results rather than COPY, which RLS refuses
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    PERFORM ironwod.stage_planner_settings(false);
    RETURN v_n;
END
$$;
COMMENT ON FUNCTION ironwod.metrics_cache_rows(uuid, uuid, ironwod.metric_settings, text, text[], date, date, date, timestamptz, text) IS 'Refresh stage 6, metrics.md §5.2 (cache columns): rebuild the gym_monthly_metrics_cache rows of a gym from the given month on from its facts and money; returns the row count';

-- Stage 7 (metrics.md §4.11-4.12): six-month pooled ARM, LEG and LTV over the
-- cached months, written on the months from p_from on.
CREATE FUNCTION ironwod.metrics_pooled(p_tenant uuid, p_gym uuid, p_from date)
RETURNS void
LANGUAGE plpgsql
SET enable_nestloop = off SET enable_mergejoin = off SET jit = off
AS $$
BEGIN
    PERFORM ironwod.stage_planner_settings(true);
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
            WHERE y.tenant_id = p_tenant AND y.gym_id = p_gym
            WINDOW w6 AS (PARTITION BY y.location_key, y.program_key ORDER BY y.month_start
                          ROWS BETWEEN 5 PRECEDING AND CURRENT ROW)) w
     WHERE x.tenant_id = p_tenant AND x.gym_id = p_gym AND x.month_start >= p_from
       AND x.location_key = w.location_key AND x.program_key = w.program_key AND x.month_start = w.month_start;
    PERFORM ironwod.stage_planner_settings(false);
END
$$;
COMMENT ON FUNCTION ironwod.metrics_pooled(uuid, uuid, date) IS 'Refresh stage 7, metrics.md §4.11 (LEG) and §4.12 (LTV): six-month pooled arm_6m, leg_months_6m and ltv on the cache rows of a gym from the given month on';

-- What a person's closed months are computed from, besides their own canonical
-- rows: their spells, and their spans up to p_open (cut there: a span that
-- reached the day of the last refresh reaches today now).  One hash per person.
CREATE FUNCTION ironwod.metrics_person_hashes(p_tenant uuid, p_gym uuid, p_open date)
RETURNS jsonb
LANGUAGE plpgsql
AS $$
BEGIN
    RETURN (
        SELECT coalesce(jsonb_object_agg(x.member_id::text, x.h), '{}')
        FROM (SELECT y.member_id, md5(string_agg(y.r, '|' ORDER BY y.r)) AS h
              FROM (SELECT s.member_id,
                           'spell' || ROW(s.location_key, s.spell_start, s.spell_end_excl, s.spell_no, s.is_first,
                                          s.rescinded, s.net_revenue, s.membership_ids)::text AS r
                    FROM ironwod.member_spell s
                    WHERE s.tenant_id = p_tenant AND s.gym_id = p_gym
                    UNION ALL
                    SELECT p.member_id,
                           'span' || ROW(p.location_key, p.span_start, least(p.span_end_excl, p_open), p.state, p.mrr,
                                         p.spell_start, p.spell_end_excl, p.spell_no, p.active_before,
                                         p.spell_active_before)::text
                    FROM ironwod.member_state_span p
                    WHERE p.tenant_id = p_tenant AND p.gym_id = p_gym AND p.span_start < p_open) y
              GROUP BY y.member_id) x);
END
$$;
COMMENT ON FUNCTION ironwod.metrics_person_hashes(uuid, uuid, date) IS 'Refresh, metrics.md §5.4 (recompute policy): per person of a gym, a hash of their spells and of their daily-state spans before the given day (compute_metrics compares them before and after stages 1-2 to find the people whose closed months change)';

-- A refresh: spells and daily state for the whole history (both are small: a few
-- rows per membership), visits, facts, money and cache rows for months >= p_from
-- (clamped to history start), then the pooled figures.
--
-- p_people narrows the months before the one the last refresh computed to date
-- (v_open) to the people whose inputs changed (metrics.md §5.4): a closed month
-- of a person is computed from that person's memberships, holds, invoices,
-- sign-ins, spells and spans alone, and no closed day moves as the clock does.
-- Those people are p_people (the people on the canonical rows the run changed),
-- everyone whose spells or spans before v_open changed in stages 1-2 (a hold,
-- a rescinded spell, a bridged gap whose coverage resumed since), and the
-- people billed on the memberships of all of them.  From v_open on, and on a
-- NULL p_people, everyone.  Money and the cache rows are per gym: from p_from.
--
-- On Citus its own statements between the stages run on the tenant's node too,
-- which plans them with its own settings: the SET clause (jit = off) is
-- forwarded there (forward_set_clauses), and again after each stage that its
-- own statements follow, because a stage puts the nodes back to the defaults
-- as it returns (stage_planner_settings(false)).  Without that the nodes
-- planned the person hashes, the watermark and the masking with JIT on.
CREATE FUNCTION ironwod.compute_metrics(p_from date, p_people bigint[] DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
SET jit = off
AS $$
DECLARE
    v_t uuid;
    v_g uuid;
    s ironwod.metric_settings;
    v_tz text;
    v_today date;
    v_hist date;
    v_cur date;
    v_from date;
    v_keys text[];
    v_open date;
    v_people bigint[] := p_people;
    v_mids bigint[];
    v_before jsonb;
    v_after jsonb;
    v_wm timestamptz;
    v_spells integer;
    v_facts integer;
    v_rows integer;
BEGIN
    SELECT * INTO v_t, v_g FROM ironwod.require_scope();
    -- the SET clause on the Citus nodes too, which plan the statements below
    PERFORM ironwod.forward_set_clauses('ironwod.compute_metrics(date, bigint[])', true);
    s := ironwod.metric_config();
    v_tz := ironwod.gym_time_zone(v_t, v_g);
    v_today := ironwod.metrics_today(v_tz);
    v_cur := date_trunc('month', v_today)::date;
    v_hist := least(ironwod.history_start(v_tz), v_cur);
    v_from := least(greatest(date_trunc('month', coalesce(p_from, v_hist))::date, v_hist), v_cur);
    SELECT '{ALL}'::text[] || coalesce(array_agg(DISTINCT l.location_id::text), '{}') INTO v_keys
    FROM ironwod.locations l WHERE l.tenant_id = v_t AND l.gym_id = v_g AND l.deleted_at IS NULL;
    -- every program of the gym is a key too (metrics.md §5.1: location ALL x program)
    SELECT v_keys || coalesce(array_agg('program:' || p.program_id ORDER BY p.program_id), '{}') INTO v_keys
    FROM ironwod.programs p WHERE p.tenant_id = v_t AND p.gym_id = v_g AND p.deleted_at IS NULL;

    -- the first month everyone is recomputed in: the one the last refresh
    -- computed to date (its as_of is the last refresh's today)
    v_open := v_from;
    IF v_people IS NOT NULL THEN
        SELECT greatest(v_from, least(date_trunc('month', max(c.month_start + c.period_days - 1))::date, v_cur))
          INTO v_open
          FROM ironwod.gym_monthly_metrics_cache c
         WHERE c.tenant_id = v_t AND c.gym_id = v_g AND c.location_key = 'ALL' AND c.program_key = 'ALL';
        v_open := coalesce(v_open, v_from);
    END IF;
    IF v_open > v_from THEN
        v_before := ironwod.metrics_person_hashes(v_t, v_g, v_open);
    END IF;

    v_spells := ironwod.metrics_spells(v_t, v_g, s);
    PERFORM ironwod.metrics_day_states(v_t, v_g, v_today);

    IF v_open > v_from THEN
        -- the stages set the nodes back to the defaults (see above)
        PERFORM ironwod.forward_set_clauses('ironwod.compute_metrics(date, bigint[])', true);
        v_after := ironwod.metrics_person_hashes(v_t, v_g, v_open);
        SELECT array_agg(DISTINCT x.p ORDER BY x.p) INTO v_people
        FROM (SELECT unnest(v_people) AS p
              UNION ALL
              SELECT k::bigint FROM jsonb_object_keys(v_before || v_after) AS k
              WHERE v_before -> k IS DISTINCT FROM v_after -> k) x;
        -- and who is billed on their memberships (past due and paying are the
        -- invoice's person's, by the membership's location): their memberships
        -- first, then those memberships' invoices, each a read of one table by
        -- the gym's index.  As one join, on statistics that did not know the
        -- gym's rows yet (a nightly soon after the backfill; on Citus shards
        -- nobody analyzed), the planner nested a loop over the people's
        -- memberships in every invoice of the gym: 3,920 x 102 rows, 396,826
        -- removed by the join filter, 0.9 s of a medium gym's 3.1 s nightly
        -- refresh on one node and on Citus alike (auto_explain).
        v_mids := ARRAY(SELECT m.membership_id FROM ironwod.memberships m
                        WHERE m.tenant_id = v_t AND m.gym_id = v_g AND m.member_id = ANY (v_people));
        SELECT array_agg(DISTINCT x.p ORDER BY x.p) INTO v_people
        FROM (SELECT unnest(v_people) AS p
              UNION ALL
              SELECT i.member_id FROM ironwod.invoices i
              WHERE i.tenant_id = v_t AND i.gym_id = v_g AND i.member_id IS NOT NULL
                AND i.membership_id = ANY (v_mids)) x;
        v_people := coalesce(v_people, '{}');
    END IF;
    PERFORM ironwod.metrics_visits(v_t, v_g, s, v_tz, v_from, v_hist, v_today, v_open, v_people);
    v_facts := ironwod.metrics_month_facts(v_t, v_g, s, v_keys, v_from, v_hist, v_today, v_open, v_people);
    PERFORM ironwod.metrics_month_flags(v_t, v_g, v_from, v_today, v_open, v_people);
    PERFORM ironwod.metrics_month_money(v_t, v_g, s, v_tz, v_keys, v_from, v_hist, v_today);

    PERFORM ironwod.forward_set_clauses('ironwod.compute_metrics(date, bigint[])', true);
    SELECT greatest(
        (SELECT max(source_updated_at) FROM ironwod.memberships WHERE tenant_id = v_t AND gym_id = v_g),
        (SELECT max(source_updated_at) FROM ironwod.membership_holds WHERE tenant_id = v_t AND gym_id = v_g),
        (SELECT max(source_updated_at) FROM ironwod.attendance_events WHERE tenant_id = v_t AND gym_id = v_g),
        (SELECT max(source_updated_at) FROM ironwod.invoices WHERE tenant_id = v_t AND gym_id = v_g),
        (SELECT max(source_updated_at) FROM ironwod.transactions WHERE tenant_id = v_t AND gym_id = v_g))
    INTO v_wm;
    -- the hash is computed once here and passed in: the cache's INSERT calls no
    -- function of ours (on Citus one that reads a table must not run in it)
    v_rows := ironwod.metrics_cache_rows(v_t, v_g, s, v_tz, v_keys, v_from, v_hist, v_today, v_wm,
                                         ironwod.config_hash(s));
    PERFORM ironwod.metrics_pooled(v_t, v_g, v_from);
    PERFORM ironwod.forward_set_clauses('ironwod.compute_metrics(date, bigint[])', true);

    -- The newest source change is stamped on every cached month, not only on the
    -- months recomputed now: the recompute policy recomputed every month a change
    -- could touch, so each one reflects the sources up to v_wm, and a replay, which
    -- recomputes them all, stamps the same value.
    UPDATE ironwod.gym_monthly_metrics_cache x SET source_watermark = v_wm
     WHERE x.tenant_id = v_t AND x.gym_id = v_g AND x.source_watermark IS DISTINCT FROM v_wm;
    -- Unknown is NULL: metrics of entities the gym's plan does not include (82_unknowns).
    PERFORM ironwod.mask_unknown_metrics();
    PERFORM ironwod.forward_set_clauses('ironwod.compute_metrics(date, bigint[])', false);

    RETURN jsonb_build_object('from', v_from, 'to', v_cur, 'history_start', v_hist, 'time_zone', v_tz,
                              'spells', v_spells, 'facts', v_facts, 'cache_rows', v_rows)
           || CASE WHEN v_open > v_from THEN jsonb_build_object('everyone_from', v_open, 'people', cardinality(v_people))
                   ELSE '{}' END;
END
$$;
COMMENT ON FUNCTION ironwod.compute_metrics(date, bigint[]) IS 'Rebuild spells and daily states, and visits, member-month facts, money and cache rows for months from the given one (clamped to history start) to the current local month, for the current scope: the refresh stages in order; with people given, the months before the one the last refresh computed to date only for them and those whose spells or spans changed';

-- Recompute policy (metrics.md §5.4): the trailing months, plus every month a change
-- landed by the run touched (its earliest civil date, less the merge gap and the
-- cohort window that reach back from it).  The whole history when the cache is empty
-- or was built with other parameters or definitions.
CREATE FUNCTION ironwod.refresh_metrics(p_run_id bigint)
RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    -- the scope as values, so that each statement names one shard on Citus
    -- (metric_config)
    v_t uuid;
    v_g uuid;
    s ironwod.metric_settings;
    v_hash text;
    v_tz text;
    v_cur date;
    v_dirty date;
    v_unknown boolean;
    v_people bigint[];
    v_from date;
    v_full boolean;
    k record;
BEGIN
    SELECT * INTO v_t, v_g FROM ironwod.require_scope();
    s := ironwod.metric_config();
    v_hash := ironwod.config_hash(s);
    v_tz := ironwod.gym_time_zone(v_t, v_g);
    v_cur := date_trunc('month', ironwod.metrics_today(v_tz))::date;
    SELECT min(d.dirty_from), coalesce(bool_or(d.member_ids IS NULL), false) INTO v_dirty, v_unknown
    FROM ironwod.metric_dirty d
    WHERE d.tenant_id = v_t AND d.gym_id = v_g AND d.run_id = p_run_id;
    -- the people on the canonical rows the run changed (NULL: not known, everyone)
    IF NOT v_unknown THEN
        v_people := ARRAY(SELECT DISTINCT x FROM ironwod.metric_dirty d, unnest(d.member_ids) AS x
                          WHERE d.tenant_id = v_t AND d.gym_id = v_g
                            AND d.run_id = p_run_id);
    END IF;
    -- A program row's hash carries the note of its masking (82_unknowns): when what
    -- the memberships say about programs changed, every month is recomputed.
    k := ironwod.program_knowledge(v_t, v_g);
    v_full := NOT EXISTS (SELECT 1 FROM ironwod.gym_monthly_metrics_cache c
                          WHERE c.tenant_id = v_t AND c.gym_id = v_g)
              OR EXISTS (SELECT 1 FROM ironwod.gym_monthly_metrics_cache c
                         WHERE c.tenant_id = v_t AND c.gym_id = v_g
                           AND (c.config_hash <> v_hash || CASE WHEN c.program_key = 'ALL' THEN ''
                                                                WHEN NOT k.programs_known THEN ' programs unknown'
                                                                WHEN c.program_key = ANY (k.unsplit) THEN ' revenue not split'
                                                                ELSE '' END
                                OR c.definitions_version <> s.definitions_version
                                OR c.time_zone <> v_tz));
    v_from := CASE WHEN v_full THEN NULL
                   ELSE least((v_cur - make_interval(months => s.trailing_months))::date,
                              v_dirty - greatest(s.merge_gap_days, s.cohort_days + 1)) END;
    RETURN ironwod.compute_metrics(v_from, CASE WHEN NOT v_full THEN v_people END)
           || jsonb_build_object('run_id', p_run_id, 'full', v_full);
END
$$;
COMMENT ON FUNCTION ironwod.refresh_metrics(bigint) IS 'Worker, after transform_run: recompute the trailing months plus every month the run''s backdated changes touched, the months closed before the last refresh only for the people whose inputs changed (whole history on first build or a parameter change); returns the range and row counts';

CREATE FUNCTION ironwod.refresh_metrics_all()
RETURNS jsonb
LANGUAGE sql
AS $$ SELECT ironwod.compute_metrics(NULL) || jsonb_build_object('full', true) $$;
COMMENT ON FUNCTION ironwod.refresh_metrics_all() IS 'Recompute spells, facts and every cached month of the current scope from history start';

GRANT EXECUTE ON FUNCTION ironwod.metrics_today(text), ironwod.metric_config(), ironwod.stage_planner_settings(boolean), ironwod.config_hash(ironwod.metric_settings),
    ironwod.monthly_price(numeric, integer, text), ironwod.spread_months(integer, text, integer),
    ironwod.history_start(text), ironwod.compute_metrics(date, bigint[]), ironwod.refresh_metrics(bigint),
    ironwod.metrics_person_hashes(uuid, uuid, date),
    ironwod.refresh_metrics_all(),
    ironwod.metrics_spells(uuid, uuid, ironwod.metric_settings),
    ironwod.metrics_day_states(uuid, uuid, date),
    ironwod.metrics_visits(uuid, uuid, ironwod.metric_settings, text, date, date, date, date, bigint[]),
    ironwod.metrics_month_facts(uuid, uuid, ironwod.metric_settings, text[], date, date, date, date, bigint[]),
    ironwod.metrics_month_flags(uuid, uuid, date, date, date, bigint[]),
    ironwod.metrics_month_money(uuid, uuid, ironwod.metric_settings, text, text[], date, date, date),
    ironwod.metrics_cache_rows(uuid, uuid, ironwod.metric_settings, text, text[], date, date, date, timestamptz, text),
    ironwod.metrics_pooled(uuid, uuid, date)
    TO ironwod_worker;
