-- 70_canonical: canonical business tables, the metric settings, and the fact and
-- cache tables the metrics compute writes (metrics.md §5).  Canonical rows are a
-- deterministic function of the raw tables: typed columns, Wodify sentinels
-- (1900-01-01, 0, "") as NULL, money as numeric, civil dates as date, instants as
-- timestamptz, the raw row they came from (raw_id) and soft-delete columns.
-- tenant_id and gym_id lead every key; RLS is applied below, as in 30_tenancy.
-- No foreign key to the connection: every row here is derived from raw rows (which
-- have one), and a per-row RI check would cost a fifth of a backfill's transform.

-- The tenancy policies of 30_tenancy for one table created after it.
CREATE FUNCTION ironwod.apply_tenant_policies(p_table regclass)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', p_table);
    EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', p_table);
    EXECUTE format($p$CREATE POLICY tenant_scope ON %s TO ironwod_app, ironwod_worker
                      USING (tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym())
                      WITH CHECK (tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym())$p$, p_table);
    EXECUTE format('CREATE POLICY admin_read ON %s FOR SELECT TO ironwod_admin USING (true)', p_table);
END
$$;
COMMENT ON FUNCTION ironwod.apply_tenant_policies(regclass) IS 'Install time: enable and force RLS on a tenant table with the tenant_scope and admin_read policies of 30_tenancy';

-- ---------------------------------------------------------------------------------
-- Canonical tables
-- ---------------------------------------------------------------------------------

CREATE TABLE ironwod.locations (
    tenant_id          uuid NOT NULL,
    gym_id             uuid NOT NULL,
    location_id        bigint NOT NULL,
    name               text,
    time_zone          text,
    customer_id        bigint,
    created_at         timestamptz,
    raw_id             bigint NOT NULL,
    source_updated_at  timestamptz,
    deleted_at         timestamptz,
    deleted_by_run     bigint,
    PRIMARY KEY (tenant_id, gym_id, location_id)
);
COMMENT ON TABLE ironwod.locations IS 'Canonical Wodify locations; time_zone is the IANA zone (the gym''s zone is that of its first location by id)';

CREATE TABLE ironwod.programs (
    tenant_id          uuid NOT NULL,
    gym_id             uuid NOT NULL,
    program_id         bigint NOT NULL,
    name               text,
    is_active          boolean,
    created_at         timestamptz,
    raw_id             bigint NOT NULL,
    source_updated_at  timestamptz,
    deleted_at         timestamptz,
    deleted_by_run     bigint,
    PRIMARY KEY (tenant_id, gym_id, program_id)
);
COMMENT ON TABLE ironwod.programs IS 'Canonical Wodify programs';

CREATE TABLE ironwod.members (
    tenant_id          uuid NOT NULL,
    gym_id             uuid NOT NULL,
    member_id          bigint NOT NULL,
    first_name         text,
    last_name          text,
    email              text,
    client_status      text,
    location_id        bigint,
    member_since       date,
    created_at         timestamptz,
    last_class_sign_in timestamptz,
    raw_id             bigint NOT NULL,
    source_updated_at  timestamptz,
    deleted_at         timestamptz,
    deleted_by_run     bigint,
    PRIMARY KEY (tenant_id, gym_id, member_id)
);
COMMENT ON TABLE ironwod.members IS 'Canonical Wodify clients (people); member_id is the Wodify client id';

CREATE TABLE ironwod.memberships (
    tenant_id             uuid NOT NULL,
    gym_id                uuid NOT NULL,
    membership_id         bigint NOT NULL,
    member_id             bigint,
    name                  text,
    membership_type       text,
    is_deleted            boolean NOT NULL DEFAULT false,
    start_date            date,
    end_date              date,
    cancellation_requested_on date,
    does_expire           boolean,
    is_auto_renew         boolean,
    price                 numeric(12,2),
    billing_period_length integer,
    billing_period_unit   text,
    location_id           bigint,
    created_at            timestamptz,
    raw_id                bigint NOT NULL,
    source_updated_at     timestamptz,
    deleted_at            timestamptz,
    deleted_by_run        bigint,
    program_ids           bigint[],
    PRIMARY KEY (tenant_id, gym_id, membership_id)
);
COMMENT ON TABLE ironwod.memberships IS 'Canonical memberships: end_date is the last day of access (inclusive, NULL = open-ended); price and billing period from payment_plan';
COMMENT ON COLUMN ironwod.memberships.program_ids IS 'The Wodify program ids the membership gives access to (its programs field, wodify-api.md §11), sorted and distinct; NULL when the record has no programs field (programs unknown), empty when it grants none';
CREATE INDEX ON ironwod.memberships (tenant_id, gym_id, member_id);

CREATE TABLE ironwod.membership_holds (
    tenant_id          uuid NOT NULL,
    gym_id             uuid NOT NULL,
    hold_id            bigint NOT NULL,
    membership_id      bigint,
    member_id          bigint,
    hold_start_date    date,
    hold_end_date      date,
    hold_reason        text,
    raw_id             bigint NOT NULL,
    source_updated_at  timestamptz,
    deleted_at         timestamptz,
    deleted_by_run     bigint,
    PRIMARY KEY (tenant_id, gym_id, hold_id)
);
COMMENT ON TABLE ironwod.membership_holds IS 'Canonical membership holds; hold_end_date is inclusive';

CREATE TABLE ironwod.attendance_events (
    tenant_id          uuid NOT NULL,
    gym_id             uuid NOT NULL,
    signin_id          bigint NOT NULL,
    member_id          bigint,
    class_id           bigint,
    class_start_at     timestamptz,
    location_id        bigint,
    program_id         bigint,
    membership_id      bigint,
    is_drop_in         boolean,
    raw_id             bigint NOT NULL,
    source_updated_at  timestamptz,
    deleted_at         timestamptz,
    deleted_by_run     bigint,
    PRIMARY KEY (tenant_id, gym_id, signin_id)
);
COMMENT ON TABLE ironwod.attendance_events IS 'Canonical class sign-ins (one visit per person per class instance)';

CREATE TABLE ironwod.invoices (
    tenant_id          uuid NOT NULL,
    gym_id             uuid NOT NULL,
    invoice_id         bigint NOT NULL,
    invoice_number     text,
    member_id          bigint,
    membership_id      bigint,
    location_id        bigint,
    status             text,
    due_date           date,
    paid_on            date,
    amount             numeric(12,2),
    created_at         timestamptz,
    raw_id             bigint NOT NULL,
    source_updated_at  timestamptz,
    deleted_at         timestamptz,
    deleted_by_run     bigint,
    PRIMARY KEY (tenant_id, gym_id, invoice_id)
);
COMMENT ON TABLE ironwod.invoices IS 'Canonical invoices: due and paid-on civil dates, final charge, status';

CREATE TABLE ironwod.transactions (
    tenant_id          uuid NOT NULL,
    gym_id             uuid NOT NULL,
    transaction_id     bigint NOT NULL,
    invoice_id         bigint,
    member_id          bigint,
    location_id        bigint,
    processed_at       timestamptz,
    amount             numeric(12,2),
    transaction_type   text,
    payment_method     text,
    raw_id             bigint NOT NULL,
    source_updated_at  timestamptz,
    deleted_at         timestamptz,
    deleted_by_run     bigint,
    PRIMARY KEY (tenant_id, gym_id, transaction_id)
);
COMMENT ON TABLE ironwod.transactions IS 'Canonical transactions: Payment, Refund or Failed Payment at an instant';

-- ---------------------------------------------------------------------------------
-- Settings, change tracking, facts and the cache
-- ---------------------------------------------------------------------------------

-- One row per gym, created with the defaults on its first refresh.  Every parameter
-- goes into config_hash; changing one makes the next refresh recompute everything.
CREATE TABLE ironwod.metric_settings (
    tenant_id                uuid NOT NULL,
    gym_id                   uuid NOT NULL,
    merge_gap_days           integer NOT NULL DEFAULT 7 CHECK (merge_gap_days BETWEEN 0 AND 90),
    rescind_max_days         integer NOT NULL DEFAULT 7 CHECK (rescind_max_days BETWEEN 0 AND 90),
    absence_short_days       integer NOT NULL DEFAULT 14 CHECK (absence_short_days > 0),
    absence_long_days        integer NOT NULL DEFAULT 30 CHECK (absence_long_days > 0),
    decline_recent_days      integer NOT NULL DEFAULT 28 CHECK (decline_recent_days > 0),
    decline_prior_days       integer NOT NULL DEFAULT 56 CHECK (decline_prior_days > 0),
    decline_ratio            numeric NOT NULL DEFAULT 0.5 CHECK (decline_ratio > 0),
    decline_min_exposure     numeric NOT NULL DEFAULT 0.75 CHECK (decline_min_exposure BETWEEN 0 AND 1),
    decline_min_weekly_rate  numeric NOT NULL DEFAULT 1.0 CHECK (decline_min_weekly_rate >= 0),
    cohort_days              integer NOT NULL DEFAULT 90 CHECK (cohort_days > 0),
    trailing_months          integer NOT NULL DEFAULT 4 CHECK (trailing_months BETWEEN 1 AND 36),
    max_spread_months        integer NOT NULL DEFAULT 12 CHECK (max_spread_months BETWEEN 1 AND 36),
    qualifying_types         text[] NOT NULL DEFAULT '{Class Plan}',
    history_start_date       date,
    definitions_version      text NOT NULL DEFAULT 'metrics-v1.1',
    PRIMARY KEY (tenant_id, gym_id),
    FOREIGN KEY (tenant_id, gym_id) REFERENCES ironwod.integrations_wodify_connection,
    CHECK (history_start_date IS NULL OR extract(day FROM history_start_date) = 1)
);
COMMENT ON TABLE ironwod.metric_settings IS 'Metric parameters per gym (metrics.md v1 scope): merge gap, rescind window, absence and decline thresholds, trailing recompute window; history_start_date NULL = derived from the data';

-- The earliest civil date each run's changes touched, per entity: refresh_metrics
-- recomputes from that month on (plus the trailing window).
CREATE TABLE ironwod.metric_dirty (
    tenant_id   uuid NOT NULL,
    gym_id      uuid NOT NULL,
    run_id      bigint NOT NULL,
    entity      text NOT NULL,
    dirty_from  date NOT NULL,
    changed     integer NOT NULL DEFAULT 0,
    -- the people on the changed rows; NULL: not known (everyone)
    member_ids  bigint[],
    PRIMARY KEY (tenant_id, gym_id, run_id, entity)
);
COMMENT ON TABLE ironwod.metric_dirty IS 'Per run and entity: the earliest civil date a canonical change touched and the people on the changed rows (the inputs of the recompute policy, metrics.md §5.4)';

-- Merged coverage spells per person, gym-wide (location_key ALL), per location and
-- per program (program:<id>).
CREATE TABLE ironwod.member_spell (
    tenant_id      uuid NOT NULL,
    gym_id         uuid NOT NULL,
    location_key   text NOT NULL,
    member_id      bigint NOT NULL,
    spell_start    date NOT NULL,
    spell_end_excl date NOT NULL,           -- 'infinity' when open-ended
    spell_no       integer,                 -- 1 = first spell; NULL when rescinded
    is_first       boolean NOT NULL,
    rescinded      boolean NOT NULL,
    net_revenue    numeric(12,2) NOT NULL,
    membership_ids bigint[] NOT NULL,
    PRIMARY KEY (tenant_id, gym_id, location_key, member_id, spell_start)
);
COMMENT ON TABLE ironwod.member_spell IS 'Merged member-qualifying coverage spells (metrics.md §2.3); rescinded spells are kept for audit but count nowhere';
COMMENT ON COLUMN ironwod.member_spell.location_key IS 'The key of the row''s figures: ALL (gym-wide), a Wodify location id, or program:<id> for a Wodify program (metrics.md §2.5; the cache splits it into location_key and program_key)';

-- One row per person, location key and month (metrics.md §5.3): the cache is a
-- GROUP BY over it, and drill-downs read it.
CREATE TABLE ironwod.member_month_fact (
    tenant_id            uuid NOT NULL,
    gym_id               uuid NOT NULL,
    location_key         text NOT NULL,
    member_id            bigint NOT NULL,
    month_start          date NOT NULL,
    as_of                date NOT NULL,          -- last day of the month, or today if partial
    state_start          text NOT NULL CHECK (state_start IN ('ACTIVE', 'ON_HOLD', 'NOT_MEMBER')),
    state_end            text NOT NULL CHECK (state_end IN ('ACTIVE', 'ON_HOLD', 'NOT_MEMBER')),
    mrr_start            numeric(12,2) NOT NULL,
    mrr_end              numeric(12,2) NOT NULL,
    movement             text CHECK (movement IN ('new', 'reactivation', 'churn', 'expansion',
                                                  'contraction', 'hold_out', 'hold_in')),
    mrr_delta            numeric(12,2) NOT NULL,
    new_events           integer NOT NULL,
    reactivated_events   integer NOT NULL,
    churn_events         integer NOT NULL,
    new_and_churned      integer NOT NULL,
    active_days          integer NOT NULL,
    hold_days            integer NOT NULL,
    visits               integer NOT NULL,
    member_visits        integer NOT NULL,
    tenure_active_days   integer NOT NULL,
    absent_active_days   integer,
    is_past_due_end      boolean NOT NULL,
    is_comped_end        boolean NOT NULL,
    is_pending_cancel_end boolean NOT NULL,
    is_zero_visits       boolean NOT NULL,
    is_no_visit_short    boolean NOT NULL,
    is_no_visit_long     boolean NOT NULL,
    is_declining         boolean NOT NULL,
    is_paying            boolean NOT NULL,
    cohort_retained_90d  boolean,               -- set for new_events > 0
    PRIMARY KEY (tenant_id, gym_id, location_key, month_start, member_id)
);
COMMENT ON TABLE ironwod.member_month_fact IS 'Member-month facts (metrics.md §5.3): state and MRR at both snapshots, movement, flows, visits, active days and risk flags';
COMMENT ON COLUMN ironwod.member_month_fact.location_key IS 'The key of the row''s figures: ALL (gym-wide), a Wodify location id, or program:<id> for a Wodify program (metrics.md §2.5; the cache splits it into location_key and program_key)';

CREATE TABLE ironwod.gym_monthly_metrics_cache (
    tenant_id                     uuid NOT NULL,
    gym_id                        uuid NOT NULL,
    location_key                  text NOT NULL,
    program_key                   text NOT NULL DEFAULT 'ALL',
    month_start                   date NOT NULL CHECK (extract(day FROM month_start) = 1),
    time_zone                     text NOT NULL,
    period_days                   integer NOT NULL,
    is_partial                    boolean NOT NULL,
    history_start_date            date NOT NULL,
    computed_at                   timestamptz NOT NULL,
    source_watermark              timestamptz,
    definitions_version           text NOT NULL,
    config_hash                   text NOT NULL,
    -- Metric columns are NULL where the truth is unknown: a metric that depends on
    -- an entity the gym's Wodify plan does not include (ironwod.metric_sources).
    members_start                 integer,
    members_end                   integer,
    active_members_end            integer,
    on_hold_members_end           integer,
    past_due_members_end          integer,
    comped_members_end            integer,
    members_pending_cancel_end    integer,
    new_members                   integer,
    reactivated_members           integer,
    churned_members               integer,
    churned_from_start            integer,
    new_and_churned_same_month    integer,
    net_member_change             integer,
    churn_rate                    numeric(7,5),
    retention_rate                numeric(7,5),
    net_member_growth_rate        numeric(7,5),
    active_member_days            integer,
    avg_active_members            numeric(10,2),
    paying_members                integer,
    mrr_start                     numeric(12,2),
    mrr_end                       numeric(12,2),
    mrr_new                       numeric(12,2),
    mrr_reactivation              numeric(12,2),
    mrr_expansion                 numeric(12,2),
    mrr_contraction               numeric(12,2),
    mrr_churn                     numeric(12,2),
    mrr_hold_out                  numeric(12,2),
    mrr_hold_in                   numeric(12,2),
    collected_gross               numeric(12,2),
    refunds                       numeric(12,2),
    collected_net                 numeric(12,2),
    failed_payment_invoices       integer,
    failed_payment_amount         numeric(12,2),
    invoiced_amount               numeric(12,2),
    invoiced_collected_to_date    numeric(12,2),
    past_due_amount_end           numeric(12,2),
    membership_revenue_recognised numeric(12,2),
    service_revenue_net           numeric(12,2),
    arm                           numeric(10,2),
    service_revenue_per_active_member numeric(10,2),
    arm_6m                        numeric(10,2),
    leg_months_6m                 numeric(8,2),
    ltv                           numeric(12,2),
    avg_tenure_months_end         numeric(8,2),
    member_visits                 integer,
    all_visits                    integer,
    appointment_visits            integer DEFAULT 0,
    visits_per_active_member_week numeric(6,3),
    members_zero_visits_month     integer,
    members_no_visit_14d_end      integer,
    members_no_visit_30d_end      integer,
    members_attendance_declining_end integer,
    cohort_new_members            integer,
    cohort_retained_90d           integer,
    cohort_90d_retention_rate     numeric(7,5),
    cohort_90d_is_final           boolean,
    PRIMARY KEY (tenant_id, gym_id, location_key, program_key, month_start)
);
COMMENT ON TABLE ironwod.gym_monthly_metrics_cache IS 'Monthly gym metrics (metrics.md §5.2, v1 scope): per location and ALL (distinct people) with program_key ALL, and per program (program_key = Wodify program id) at location ALL (people with access to it, visits to its classes; NULL where the memberships do not say their programs, money NULL where it cannot be split); flows are NULL in the history-start month; retail_revenue_net is omitted in v1 (no revenue categories)';

SELECT ironwod.apply_tenant_policies(t::regclass)
FROM unnest(ARRAY['ironwod.locations', 'ironwod.programs', 'ironwod.members', 'ironwod.memberships',
                  'ironwod.membership_holds', 'ironwod.attendance_events', 'ironwod.invoices',
                  'ironwod.transactions', 'ironwod.metric_settings', 'ironwod.metric_dirty',
                  'ironwod.member_spell', 'ironwod.member_month_fact',
                  'ironwod.gym_monthly_metrics_cache']) AS t;

-- The app and admins read their scope (RLS); only the workers write.
GRANT SELECT ON ironwod.locations, ironwod.programs, ironwod.members, ironwod.memberships,
    ironwod.membership_holds, ironwod.attendance_events, ironwod.invoices, ironwod.transactions,
    ironwod.metric_settings, ironwod.member_spell, ironwod.member_month_fact,
    ironwod.gym_monthly_metrics_cache
    TO ironwod_app, ironwod_admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON ironwod.locations, ironwod.programs, ironwod.members,
    ironwod.memberships, ironwod.membership_holds, ironwod.attendance_events, ironwod.invoices,
    ironwod.transactions, ironwod.metric_dirty, ironwod.member_spell, ironwod.member_month_fact,
    ironwod.gym_monthly_metrics_cache
    TO ironwod_worker;
GRANT SELECT, INSERT ON ironwod.metric_settings TO ironwod_worker;
GRANT UPDATE ON ironwod.metric_settings TO ironwod_admin;
CREATE POLICY admin_settings ON ironwod.metric_settings FOR UPDATE TO ironwod_admin USING (true) WITH CHECK (true);
