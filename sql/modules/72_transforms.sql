-- 72_transforms: raw -> canonical, set-based and idempotent (design.md §4).
-- The canonical row of a record is built from its latest raw version (by
-- source_updated_at, then raw_id).  transform_run(run) rebuilds exactly the records
-- that got a new payload version in that run; transform_all() rebuilds every record
-- of the scope.  An upsert writes a row only when something in it changed, so a
-- second call, or a re-landed page, changes nothing.  Each changed record also
-- reports the earliest civil date it touched (old and new version), which the
-- metrics refresh uses to recompute backdated months (metrics.md §5.4).

-- Runs whose landed versions have been transformed.  transform_run(run) takes the
-- versions of that run and of every earlier run not yet transformed: a run that
-- failed after landing pages leaves versions that a later run only re-sees (same
-- hash, so their ingest_run_id stays the failed run's), and they must not be lost.
CREATE TABLE ironwod.transformed_runs (
    tenant_id       uuid NOT NULL,
    gym_id          uuid NOT NULL,
    run_id          bigint NOT NULL,
    transformed_by  bigint NOT NULL,
    transformed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, gym_id, run_id),
    FOREIGN KEY (tenant_id, gym_id) REFERENCES ironwod.integrations_wodify_connection
);
COMMENT ON TABLE ironwod.transformed_runs IS 'Runs whose landed raw versions transform_run has turned into canonical rows';
SELECT ironwod.apply_tenant_policies('ironwod.transformed_runs');
GRANT SELECT, INSERT ON ironwod.transformed_runs TO ironwod_worker;
GRANT SELECT ON ironwod.transformed_runs TO ironwod_app, ironwod_admin;

-- transform_run finds a run's versions by ingest_run_id.
DO $idx$
DECLARE
    t name;
BEGIN
    FOR t IN SELECT raw_table FROM ironwod.entities ORDER BY ordinal LOOP
        EXECUTE format('CREATE INDEX ON ironwod.%I (tenant_id, gym_id, ingest_run_id)', t);
    END LOOP;
END
$idx$;

-- Wodify sentinels: 1900-01-01 dates, 0 ids and "" texts mean "no value".
CREATE FUNCTION ironwod.j_date(p text) RETURNS date
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN p ~ '^\d{4}-\d{2}-\d{2}' AND left(p, 10) <> '1900-01-01'
                THEN left(p, 10)::date END
$$;
COMMENT ON FUNCTION ironwod.j_date(text) IS 'Wodify civil date text to date (first 10 characters, never through a time zone); the 1900-01-01 sentinel and garbage become NULL';

CREATE FUNCTION ironwod.j_id(p jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN jsonb_typeof(p) = 'number' OR p #>> '{}' ~ '^\d+$'
                THEN nullif((p #>> '{}')::numeric, 0)::bigint END
$$;
COMMENT ON FUNCTION ironwod.j_id(jsonb) IS 'Wodify id to bigint; the 0 sentinel and non-numbers become NULL';

CREATE FUNCTION ironwod.j_num(p jsonb) RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN jsonb_typeof(p) = 'number' OR p #>> '{}' ~ '^-?\d+(\.\d+)?$'
                THEN (p #>> '{}')::numeric END
$$;
COMMENT ON FUNCTION ironwod.j_num(jsonb) IS 'JSON number (or numeric string) to numeric; anything else NULL';

CREATE FUNCTION ironwod.j_text(p text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT nullif(p, '') $$;
COMMENT ON FUNCTION ironwod.j_text(text) IS 'Wodify text; the "" sentinel becomes NULL';

-- The gym's zone: the first Wodify location by id that names a valid IANA zone, else
-- the connection's time_zone, else UTC.
CREATE FUNCTION ironwod.gym_time_zone() RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_tz text;
BEGIN
    SELECT coalesce(
        (SELECT l.time_zone FROM ironwod.locations l
         WHERE l.tenant_id = ironwod.scope_tenant() AND l.gym_id = ironwod.scope_gym()
           AND l.deleted_at IS NULL AND l.time_zone IS NOT NULL
         ORDER BY l.location_id LIMIT 1),
        (SELECT c.time_zone FROM ironwod.integrations_wodify_connection c
         WHERE c.tenant_id = ironwod.scope_tenant() AND c.gym_id = ironwod.scope_gym()),
        'UTC') INTO v_tz;
    BEGIN
        PERFORM now() AT TIME ZONE v_tz;
    EXCEPTION WHEN invalid_parameter_value THEN
        v_tz := 'UTC';
    END;
    RETURN v_tz;
END
$$;
COMMENT ON FUNCTION ironwod.gym_time_zone() IS 'IANA zone of the scoped gym: its first Wodify location by id, else the connection''s time_zone, else UTC';

-- Rebuild canonical rows from raw.  p_run_id NULL = every record of the scope (and no
-- change tracking); otherwise the records with a new version landed in that run.
CREATE FUNCTION ironwod.transform_records(p_run_id bigint)
RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_tz text;
    v_out jsonb := '{}';
    v_c integer;
    v_dirty date;
    v_runs bigint[];
BEGIN
    IF v_t IS NULL OR v_g IS NULL THEN
        RAISE EXCEPTION 'no ironwod scope is set in this transaction'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Call ironwod_set_scope(tenant, gym) in the same transaction first.';
    END IF;
    IF p_run_id IS NOT NULL THEN
        v_runs := ARRAY(
            SELECT x.run_id
            FROM (SELECT r.run_id FROM ironwod.sync_runs r
                  WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id <= p_run_id
                  UNION SELECT p_run_id) x
            WHERE NOT EXISTS (SELECT 1 FROM ironwod.transformed_runs d
                              WHERE d.tenant_id = v_t AND d.gym_id = v_g AND d.run_id = x.run_id)
            ORDER BY 1);
    END IF;

    -- locations (first: they decide the time zone)
    WITH ids AS (
        SELECT DISTINCT r.wodify_id FROM ironwod.wodify_raw_locations r
        WHERE r.tenant_id = v_t AND r.gym_id = v_g AND (p_run_id IS NULL OR r.ingest_run_id = ANY (v_runs))
    ), latest AS (
        SELECT DISTINCT ON (r.wodify_id) r.*
        FROM ironwod.wodify_raw_locations r JOIN ids USING (wodify_id)
        WHERE r.tenant_id = v_t AND r.gym_id = v_g
        ORDER BY r.wodify_id, r.source_updated_at DESC NULLS LAST, r.raw_id DESC
    ), old AS (
        SELECT c.* FROM ironwod.locations c JOIN ids ON c.location_id = ids.wodify_id
        WHERE c.tenant_id = v_t AND c.gym_id = v_g
    ), up AS (
        INSERT INTO ironwod.locations AS c
            (tenant_id, gym_id, location_id, name, time_zone, customer_id, created_at,
             raw_id, source_updated_at, deleted_at, deleted_by_run)
        SELECT v_t, v_g, l.wodify_id, ironwod.j_text(p->>'name'), ironwod.j_text(p->>'time_zone_iana'),
               ironwod.j_id(p->'customer_id'), ironwod.parse_ts(p #>> '{created,created_on_datetime}'),
               l.raw_id, l.source_updated_at, NULL, NULL
        FROM latest l, LATERAL (SELECT l.payload_json AS p) x
        ON CONFLICT (tenant_id, gym_id, location_id) DO UPDATE
           SET (name, time_zone, customer_id, created_at, raw_id, source_updated_at, deleted_at, deleted_by_run)
             = (excluded.name, excluded.time_zone, excluded.customer_id, excluded.created_at, excluded.raw_id,
                excluded.source_updated_at, excluded.deleted_at, excluded.deleted_by_run)
           WHERE ROW(c.*) IS DISTINCT FROM ROW(excluded.*)
        RETURNING c.*
    )
    SELECT count(*), min(CASE WHEN o.location_id IS NULL
                                   OR (o.time_zone, o.deleted_at) IS DISTINCT FROM (u.time_zone, u.deleted_at)
                              THEN date '0001-01-01' END)
    INTO v_c, v_dirty
    FROM up u LEFT JOIN old o ON o.location_id = u.location_id;
    PERFORM ironwod.note_dirty(p_run_id, 'locations', v_dirty, v_c);
    v_out := v_out || jsonb_build_object('locations', v_c);
    v_tz := ironwod.gym_time_zone();

    -- programs (no metric depends on them in v1)
    WITH ids AS (
        SELECT DISTINCT r.wodify_id FROM ironwod.wodify_raw_programs r
        WHERE r.tenant_id = v_t AND r.gym_id = v_g AND (p_run_id IS NULL OR r.ingest_run_id = ANY (v_runs))
    ), latest AS (
        SELECT DISTINCT ON (r.wodify_id) r.*
        FROM ironwod.wodify_raw_programs r JOIN ids USING (wodify_id)
        WHERE r.tenant_id = v_t AND r.gym_id = v_g
        ORDER BY r.wodify_id, r.source_updated_at DESC NULLS LAST, r.raw_id DESC
    ), up AS (
        INSERT INTO ironwod.programs AS c
            (tenant_id, gym_id, program_id, name, is_active, created_at,
             raw_id, source_updated_at, deleted_at, deleted_by_run)
        SELECT v_t, v_g, l.wodify_id, ironwod.j_text(p->>'name'), (p->>'is_active')::boolean,
               ironwod.parse_ts(p #>> '{created,created_on_datetime}'),
               l.raw_id, l.source_updated_at, NULL, NULL
        FROM latest l, LATERAL (SELECT l.payload_json AS p) x
        ON CONFLICT (tenant_id, gym_id, program_id) DO UPDATE
           SET (name, is_active, created_at, raw_id, source_updated_at, deleted_at, deleted_by_run)
             = (excluded.name, excluded.is_active, excluded.created_at, excluded.raw_id,
                excluded.source_updated_at, excluded.deleted_at, excluded.deleted_by_run)
           WHERE ROW(c.*) IS DISTINCT FROM ROW(excluded.*)
        RETURNING 1
    )
    SELECT count(*) INTO v_c FROM up;
    v_out := v_out || jsonb_build_object('programs', v_c);

    -- clients -> members (no metric depends on their fields in v1)
    WITH ids AS (
        SELECT DISTINCT r.wodify_id FROM ironwod.wodify_raw_clients r
        WHERE r.tenant_id = v_t AND r.gym_id = v_g AND (p_run_id IS NULL OR r.ingest_run_id = ANY (v_runs))
    ), latest AS (
        SELECT DISTINCT ON (r.wodify_id) r.*
        FROM ironwod.wodify_raw_clients r JOIN ids USING (wodify_id)
        WHERE r.tenant_id = v_t AND r.gym_id = v_g
        ORDER BY r.wodify_id, r.source_updated_at DESC NULLS LAST, r.raw_id DESC
    ), up AS (
        INSERT INTO ironwod.members AS c
            (tenant_id, gym_id, member_id, first_name, last_name, email, client_status, location_id,
             member_since, created_at, last_class_sign_in, raw_id, source_updated_at, deleted_at, deleted_by_run)
        SELECT v_t, v_g, l.wodify_id, ironwod.j_text(p->>'first_name'), ironwod.j_text(p->>'last_name'),
               ironwod.j_text(p->>'email'), ironwod.j_text(p->>'client_status'), ironwod.j_id(p->'location_id'),
               ironwod.j_date(p->>'member_since'),
               ironwod.parse_ts(coalesce(p #>> '{created_on,created_on_datetime}', p #>> '{created,created_on_datetime}')),
               ironwod.parse_ts(p->>'last_class_sign_in'),
               l.raw_id, l.source_updated_at, NULL, NULL
        FROM latest l, LATERAL (SELECT l.payload_json AS p) x
        ON CONFLICT (tenant_id, gym_id, member_id) DO UPDATE
           SET (first_name, last_name, email, client_status, location_id, member_since, created_at,
                last_class_sign_in, raw_id, source_updated_at, deleted_at, deleted_by_run)
             = (excluded.first_name, excluded.last_name, excluded.email, excluded.client_status,
                excluded.location_id, excluded.member_since, excluded.created_at, excluded.last_class_sign_in,
                excluded.raw_id, excluded.source_updated_at, excluded.deleted_at, excluded.deleted_by_run)
           WHERE ROW(c.*) IS DISTINCT FROM ROW(excluded.*)
        RETURNING 1
    )
    SELECT count(*) INTO v_c FROM up;
    v_out := v_out || jsonb_build_object('clients', v_c);

    -- memberships.  Wodify's is_deleted becomes a soft delete (deleted_at = the
    -- version's update time, deleted_by_run = the run that landed it).
    WITH ids AS (
        SELECT DISTINCT r.wodify_id FROM ironwod.wodify_raw_memberships r
        WHERE r.tenant_id = v_t AND r.gym_id = v_g AND (p_run_id IS NULL OR r.ingest_run_id = ANY (v_runs))
    ), latest AS (
        SELECT DISTINCT ON (r.wodify_id) r.*
        FROM ironwod.wodify_raw_memberships r JOIN ids USING (wodify_id)
        WHERE r.tenant_id = v_t AND r.gym_id = v_g
        ORDER BY r.wodify_id, r.source_updated_at DESC NULLS LAST, r.raw_id DESC
    ), old AS (
        SELECT c.* FROM ironwod.memberships c JOIN ids ON c.membership_id = ids.wodify_id
        WHERE c.tenant_id = v_t AND c.gym_id = v_g
    ), up AS (
        INSERT INTO ironwod.memberships AS c
            (tenant_id, gym_id, membership_id, member_id, name, membership_type, is_deleted, start_date,
             end_date, cancellation_requested_on, does_expire, is_auto_renew, price, billing_period_length,
             billing_period_unit, location_id, created_at, raw_id, source_updated_at, deleted_at, deleted_by_run)
        SELECT v_t, v_g, l.wodify_id, ironwod.j_id(p->'client_id'), ironwod.j_text(p->>'name'),
               ironwod.j_text(p->>'membership_type'), coalesce((p->>'is_deleted')::boolean, false),
               ironwod.j_date(p->>'start_date'), ironwod.j_date(p->>'end_date'),
               ironwod.j_date(p->>'cancellation_requested_on'), (p->>'does_membership_expire')::boolean,
               (pp->>'is_auto_renew')::boolean, ironwod.j_num(pp->'price'),
               ironwod.j_num(pp->'billing_period_length')::integer, ironwod.j_text(pp->>'billing_period_unit'),
               ironwod.j_id(p->'location_id'), ironwod.parse_ts(p #>> '{created,created_on_datetime}'),
               l.raw_id, l.source_updated_at,
               CASE WHEN (p->>'is_deleted')::boolean THEN coalesce(l.source_updated_at, l.ingested_at) END,
               CASE WHEN (p->>'is_deleted')::boolean THEN l.ingest_run_id END
        FROM latest l,
             LATERAL (SELECT l.payload_json AS p,
                             coalesce(l.payload_json->'payment_plan', l.payload_json->'payload_plan', '{}') AS pp) x
        ON CONFLICT (tenant_id, gym_id, membership_id) DO UPDATE
           SET (member_id, name, membership_type, is_deleted, start_date, end_date, cancellation_requested_on,
                does_expire, is_auto_renew, price, billing_period_length, billing_period_unit, location_id,
                created_at, raw_id, source_updated_at, deleted_at, deleted_by_run)
             = (excluded.member_id, excluded.name, excluded.membership_type, excluded.is_deleted,
                excluded.start_date, excluded.end_date, excluded.cancellation_requested_on, excluded.does_expire,
                excluded.is_auto_renew, excluded.price, excluded.billing_period_length,
                excluded.billing_period_unit, excluded.location_id, excluded.created_at, excluded.raw_id,
                excluded.source_updated_at, excluded.deleted_at, excluded.deleted_by_run)
           WHERE ROW(c.*) IS DISTINCT FROM ROW(excluded.*)
        RETURNING c.*
    )
    SELECT count(*), min(CASE
               WHEN o.membership_id IS NULL
                    OR (o.member_id, o.start_date, o.price, o.membership_type, o.is_deleted, o.location_id,
                        o.billing_period_length, o.billing_period_unit)
                       IS DISTINCT FROM
                       (u.member_id, u.start_date, u.price, u.membership_type, u.is_deleted, u.location_id,
                        u.billing_period_length, u.billing_period_unit)
               THEN least(o.start_date, u.start_date)
               ELSE least(o.end_date + 1, u.end_date + 1, o.cancellation_requested_on, u.cancellation_requested_on)
           END)
    INTO v_c, v_dirty
    FROM up u LEFT JOIN old o ON o.membership_id = u.membership_id;
    PERFORM ironwod.note_dirty(p_run_id, 'memberships', v_dirty, v_c);
    v_out := v_out || jsonb_build_object('memberships', v_c);

    -- membership holds
    WITH ids AS (
        SELECT DISTINCT r.wodify_id FROM ironwod.wodify_raw_membership_holds r
        WHERE r.tenant_id = v_t AND r.gym_id = v_g AND (p_run_id IS NULL OR r.ingest_run_id = ANY (v_runs))
    ), latest AS (
        SELECT DISTINCT ON (r.wodify_id) r.*
        FROM ironwod.wodify_raw_membership_holds r JOIN ids USING (wodify_id)
        WHERE r.tenant_id = v_t AND r.gym_id = v_g
        ORDER BY r.wodify_id, r.source_updated_at DESC NULLS LAST, r.raw_id DESC
    ), old AS (
        SELECT c.* FROM ironwod.membership_holds c JOIN ids ON c.hold_id = ids.wodify_id
        WHERE c.tenant_id = v_t AND c.gym_id = v_g
    ), up AS (
        INSERT INTO ironwod.membership_holds AS c
            (tenant_id, gym_id, hold_id, membership_id, member_id, hold_start_date, hold_end_date, hold_reason,
             raw_id, source_updated_at, deleted_at, deleted_by_run)
        SELECT v_t, v_g, l.wodify_id, ironwod.j_id(p->'membership_id'), ironwod.j_id(p->'client_id'),
               ironwod.j_date(p->>'hold_start_date'), ironwod.j_date(p->>'hold_end_date'),
               ironwod.j_text(p->>'hold_reason'), l.raw_id, l.source_updated_at, NULL, NULL
        FROM latest l, LATERAL (SELECT l.payload_json AS p) x
        ON CONFLICT (tenant_id, gym_id, hold_id) DO UPDATE
           SET (membership_id, member_id, hold_start_date, hold_end_date, hold_reason, raw_id,
                source_updated_at, deleted_at, deleted_by_run)
             = (excluded.membership_id, excluded.member_id, excluded.hold_start_date, excluded.hold_end_date,
                excluded.hold_reason, excluded.raw_id, excluded.source_updated_at, excluded.deleted_at,
                excluded.deleted_by_run)
           WHERE ROW(c.*) IS DISTINCT FROM ROW(excluded.*)
        RETURNING c.*
    )
    SELECT count(*), min(CASE
               WHEN o.hold_id IS NULL
                    OR (o.membership_id, o.hold_start_date) IS DISTINCT FROM (u.membership_id, u.hold_start_date)
               THEN least(o.hold_start_date, u.hold_start_date)
               ELSE least(o.hold_end_date, u.hold_end_date) + 1
           END)
    INTO v_c, v_dirty
    FROM up u LEFT JOIN old o ON o.hold_id = u.hold_id;
    PERFORM ironwod.note_dirty(p_run_id, 'membership_holds', v_dirty, v_c);
    v_out := v_out || jsonb_build_object('membership_holds', v_c);

    -- class sign-ins -> attendance events
    WITH ids AS (
        SELECT DISTINCT r.wodify_id FROM ironwod.wodify_raw_class_signins r
        WHERE r.tenant_id = v_t AND r.gym_id = v_g AND (p_run_id IS NULL OR r.ingest_run_id = ANY (v_runs))
    ), latest AS (
        SELECT DISTINCT ON (r.wodify_id) r.*
        FROM ironwod.wodify_raw_class_signins r JOIN ids USING (wodify_id)
        WHERE r.tenant_id = v_t AND r.gym_id = v_g
        ORDER BY r.wodify_id, r.source_updated_at DESC NULLS LAST, r.raw_id DESC
    ), old AS (
        SELECT c.* FROM ironwod.attendance_events c JOIN ids ON c.signin_id = ids.wodify_id
        WHERE c.tenant_id = v_t AND c.gym_id = v_g
    ), up AS (
        INSERT INTO ironwod.attendance_events AS c
            (tenant_id, gym_id, signin_id, member_id, class_id, class_start_at, location_id, program_id,
             membership_id, is_drop_in, raw_id, source_updated_at, deleted_at, deleted_by_run)
        SELECT v_t, v_g, l.wodify_id, ironwod.j_id(p->'client_id'), ironwod.j_id(p->'class_id'),
               ironwod.parse_ts(p->>'utc_class_start_datetime'), ironwod.j_id(p->'location_id'),
               ironwod.j_id(p->'program_id'), ironwod.j_id(p->'membership_id'), (p->>'is_drop_in')::boolean,
               l.raw_id, l.source_updated_at, NULL, NULL
        FROM latest l, LATERAL (SELECT l.payload_json AS p) x
        ON CONFLICT (tenant_id, gym_id, signin_id) DO UPDATE
           SET (member_id, class_id, class_start_at, location_id, program_id, membership_id, is_drop_in,
                raw_id, source_updated_at, deleted_at, deleted_by_run)
             = (excluded.member_id, excluded.class_id, excluded.class_start_at, excluded.location_id,
                excluded.program_id, excluded.membership_id, excluded.is_drop_in, excluded.raw_id,
                excluded.source_updated_at, excluded.deleted_at, excluded.deleted_by_run)
           WHERE ROW(c.*) IS DISTINCT FROM ROW(excluded.*)
        RETURNING c.*
    )
    SELECT count(*), min(least((o.class_start_at AT TIME ZONE v_tz)::date, (u.class_start_at AT TIME ZONE v_tz)::date))
    INTO v_c, v_dirty
    FROM up u LEFT JOIN old o ON o.signin_id = u.signin_id;
    PERFORM ironwod.note_dirty(p_run_id, 'class_signins', v_dirty, v_c);
    v_out := v_out || jsonb_build_object('class_signins', v_c);

    -- invoices
    WITH ids AS (
        SELECT DISTINCT r.wodify_id FROM ironwod.wodify_raw_invoices r
        WHERE r.tenant_id = v_t AND r.gym_id = v_g AND (p_run_id IS NULL OR r.ingest_run_id = ANY (v_runs))
    ), latest AS (
        SELECT DISTINCT ON (r.wodify_id) r.*
        FROM ironwod.wodify_raw_invoices r JOIN ids USING (wodify_id)
        WHERE r.tenant_id = v_t AND r.gym_id = v_g
        ORDER BY r.wodify_id, r.source_updated_at DESC NULLS LAST, r.raw_id DESC
    ), old AS (
        SELECT c.* FROM ironwod.invoices c JOIN ids ON c.invoice_id = ids.wodify_id
        WHERE c.tenant_id = v_t AND c.gym_id = v_g
    ), up AS (
        INSERT INTO ironwod.invoices AS c
            (tenant_id, gym_id, invoice_id, invoice_number, member_id, membership_id, location_id, status,
             due_date, paid_on, amount, created_at, raw_id, source_updated_at, deleted_at, deleted_by_run)
        SELECT v_t, v_g, l.wodify_id, ironwod.j_text(p->>'invoice_number'), ironwod.j_id(p->'client_id'),
               ironwod.j_id(p->'membership_id'), ironwod.j_id(p->'location_id'),
               ironwod.j_text(p->>'invoice_header_status'), ironwod.j_date(p->>'payment_due'),
               ironwod.j_date(p->>'paid_on_date'), ironwod.j_num(p->'final_charge'),
               ironwod.parse_ts(p #>> '{created,created_on_datetime}'),
               l.raw_id, l.source_updated_at, NULL, NULL
        FROM latest l, LATERAL (SELECT l.payload_json AS p) x
        ON CONFLICT (tenant_id, gym_id, invoice_id) DO UPDATE
           SET (invoice_number, member_id, membership_id, location_id, status, due_date, paid_on, amount,
                created_at, raw_id, source_updated_at, deleted_at, deleted_by_run)
             = (excluded.invoice_number, excluded.member_id, excluded.membership_id, excluded.location_id,
                excluded.status, excluded.due_date, excluded.paid_on, excluded.amount, excluded.created_at,
                excluded.raw_id, excluded.source_updated_at, excluded.deleted_at, excluded.deleted_by_run)
           WHERE ROW(c.*) IS DISTINCT FROM ROW(excluded.*)
        RETURNING c.*
    )
    SELECT count(*), min(least(o.due_date, u.due_date, o.paid_on, u.paid_on))
    INTO v_c, v_dirty
    FROM up u LEFT JOIN old o ON o.invoice_id = u.invoice_id;
    PERFORM ironwod.note_dirty(p_run_id, 'invoices', v_dirty, v_c);
    v_out := v_out || jsonb_build_object('invoices', v_c);

    -- transactions
    WITH ids AS (
        SELECT DISTINCT r.wodify_id FROM ironwod.wodify_raw_transactions r
        WHERE r.tenant_id = v_t AND r.gym_id = v_g AND (p_run_id IS NULL OR r.ingest_run_id = ANY (v_runs))
    ), latest AS (
        SELECT DISTINCT ON (r.wodify_id) r.*
        FROM ironwod.wodify_raw_transactions r JOIN ids USING (wodify_id)
        WHERE r.tenant_id = v_t AND r.gym_id = v_g
        ORDER BY r.wodify_id, r.source_updated_at DESC NULLS LAST, r.raw_id DESC
    ), old AS (
        SELECT c.* FROM ironwod.transactions c JOIN ids ON c.transaction_id = ids.wodify_id
        WHERE c.tenant_id = v_t AND c.gym_id = v_g
    ), up AS (
        INSERT INTO ironwod.transactions AS c
            (tenant_id, gym_id, transaction_id, invoice_id, member_id, location_id, processed_at, amount,
             transaction_type, payment_method, raw_id, source_updated_at, deleted_at, deleted_by_run)
        SELECT v_t, v_g, l.wodify_id, ironwod.j_id(p->'invoice_id'), ironwod.j_id(p->'client_id'),
               ironwod.j_id(p->'location_id'), ironwod.parse_ts(p->>'transaction_date_time'),
               ironwod.j_num(p->'amount'), ironwod.j_text(p->>'transaction_type'),
               ironwod.j_text(p->>'payment_method'), l.raw_id, l.source_updated_at, NULL, NULL
        FROM latest l, LATERAL (SELECT l.payload_json AS p) x
        ON CONFLICT (tenant_id, gym_id, transaction_id) DO UPDATE
           SET (invoice_id, member_id, location_id, processed_at, amount, transaction_type, payment_method,
                raw_id, source_updated_at, deleted_at, deleted_by_run)
             = (excluded.invoice_id, excluded.member_id, excluded.location_id, excluded.processed_at,
                excluded.amount, excluded.transaction_type, excluded.payment_method, excluded.raw_id,
                excluded.source_updated_at, excluded.deleted_at, excluded.deleted_by_run)
           WHERE ROW(c.*) IS DISTINCT FROM ROW(excluded.*)
        RETURNING c.*
    )
    SELECT count(*), min(least((o.processed_at AT TIME ZONE v_tz)::date, (u.processed_at AT TIME ZONE v_tz)::date))
    INTO v_c, v_dirty
    FROM up u LEFT JOIN old o ON o.transaction_id = u.transaction_id;
    PERFORM ironwod.note_dirty(p_run_id, 'transactions', v_dirty, v_c);
    v_out := v_out || jsonb_build_object('transactions', v_c);

    INSERT INTO ironwod.transformed_runs (tenant_id, gym_id, run_id, transformed_by)
    SELECT v_t, v_g, x, p_run_id FROM unnest(v_runs) AS x
    ON CONFLICT DO NOTHING;
    RETURN v_out;
END
$$;
COMMENT ON FUNCTION ironwod.transform_records(bigint) IS 'Rebuild canonical rows from their latest raw version: the records with a new version in the given run, or all records of the scope when NULL; returns rows written per entity';

CREATE FUNCTION ironwod.note_dirty(p_run_id bigint, p_entity text, p_dirty_from date, p_changed integer)
RETURNS void
LANGUAGE sql
AS $$
    INSERT INTO ironwod.metric_dirty AS d (tenant_id, gym_id, run_id, entity, dirty_from, changed)
    SELECT ironwod.scope_tenant(), ironwod.scope_gym(), p_run_id, p_entity, p_dirty_from, p_changed
    WHERE p_run_id IS NOT NULL AND p_dirty_from IS NOT NULL
    ON CONFLICT (tenant_id, gym_id, run_id, entity) DO UPDATE
       SET dirty_from = least(d.dirty_from, excluded.dirty_from), changed = d.changed + excluded.changed
$$;
COMMENT ON FUNCTION ironwod.note_dirty(bigint, text, date, integer) IS 'Record the earliest civil date a run''s canonical changes to an entity touched';

CREATE FUNCTION ironwod.transform_run(p_run_id bigint)
RETURNS jsonb
LANGUAGE plpgsql
AS $$
BEGIN
    IF p_run_id IS NULL THEN
        RAISE EXCEPTION 'run id must not be null' USING ERRCODE = 'null_value_not_allowed',
            HINT = 'Use ironwod.transform_all() to rebuild every record.';
    END IF;
    RETURN ironwod.transform_records(p_run_id)
           || jsonb_build_object('vanished', ironwod.apply_vanished(p_run_id));
END
$$;
COMMENT ON FUNCTION ironwod.transform_run(bigint) IS 'Worker, after the last page of a run landed: rebuild the canonical rows of records with a new raw version in that run (and in earlier runs not yet transformed, e.g. failed ones); idempotent; returns rows written per entity';

CREATE FUNCTION ironwod.transform_all()
RETURNS jsonb
LANGUAGE sql
AS $$ SELECT ironwod.transform_records(NULL) || jsonb_build_object('vanished', ironwod.apply_vanished(NULL)) $$;
COMMENT ON FUNCTION ironwod.transform_all() IS 'Rebuild the canonical rows of every record of the current scope from raw (used by replay)';

GRANT EXECUTE ON FUNCTION ironwod.j_date(text), ironwod.j_id(jsonb), ironwod.j_num(jsonb), ironwod.j_text(text),
    ironwod.gym_time_zone(), ironwod.transform_records(bigint), ironwod.note_dirty(bigint, text, date, integer),
    ironwod.transform_run(bigint), ironwod.transform_all()
    TO ironwod_worker;
