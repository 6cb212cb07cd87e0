-- 72_transforms: raw -> canonical, set-based and idempotent (design.md §4), one
-- generic path driven by the entity registry.  Each entity has one mapping (its
-- canonical table and a jsonb -> typed column expression per column, below); the
-- canonical row of a record is built from its latest raw version
-- (latest_raw_versions).  transform_run(run) rebuilds exactly the records that got a
-- new payload version in that run; transform_all() rebuilds every record of the
-- scope.  An upsert writes a row only when something in it changed, so a second
-- call, or a re-landed page, changes nothing.  Each changed record also reports the
-- earliest civil date it touched (old and new version), which the metrics refresh
-- uses to recompute backdated months (metrics.md §5.4); a gym's first rows of an
-- entity touch every month.

-- Runs whose landed versions have been transformed (the record of which runs
-- transform_run has seen; what it reads is chosen by transform_cursors).
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

-- Per gym and entity, the raw_id up to which every raw version was landed by a
-- transformed run: transform_run reads the versions above it, a range of the raw
-- table's primary key, so landing maintains no (tenant_id, gym_id,
-- ingest_run_id) index for the transform (with four indexes on each raw table,
-- index insertion was a third of the run worker's CPU while landing).  A run's
-- versions are above the cursor when it transforms: a gym has at most one active
-- run (sync_runs_one_active), which lands its pages one transaction after the
-- other, so no raw_id below a committed one commits later.  Versions a failed
-- run landed stay above the cursor until the next run transforms them with its
-- own; a run that only re-sees a version (same hash) writes no raw row, and the
-- record, unchanged, has nothing to transform.
CREATE TABLE ironwod.transform_cursors (
    tenant_id       uuid NOT NULL,
    gym_id          uuid NOT NULL,
    entity          text NOT NULL,
    raw_id          bigint NOT NULL,
    PRIMARY KEY (tenant_id, gym_id, entity),
    FOREIGN KEY (tenant_id, gym_id) REFERENCES ironwod.integrations_wodify_connection
);
COMMENT ON TABLE ironwod.transform_cursors IS 'Per gym and entity, the raw_id up to which every raw version was landed by a transformed run (where transform_run starts reading)';
SELECT ironwod.apply_tenant_policies('ironwod.transform_cursors');
GRANT SELECT, INSERT, UPDATE ON ironwod.transform_cursors TO ironwod_worker;
GRANT SELECT ON ironwod.transform_cursors TO ironwod_app, ironwod_admin;

-- Wodify sentinels: 1900-01-01 dates, 0 ids and "" texts mean "no value".  The
-- date and id readers run for most fields of every transformed record: in C
-- (src/wire.c), where the SQL versions cost a regular expression and casts per
-- value, and j_date (its text to date cast only stable) was not even inlined.
CREATE FUNCTION ironwod.j_date(p text) RETURNS date
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'ironwod_j_date';
COMMENT ON FUNCTION ironwod.j_date(text) IS 'Wodify civil date text to date (first 10 characters, never through a time zone); the 1900-01-01 sentinel and garbage become NULL';

CREATE FUNCTION ironwod.j_id(p jsonb) RETURNS bigint
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'ironwod_j_id';
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

CREATE FUNCTION ironwod.j_plan(p jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT coalesce(p -> 'payment_plan', p -> 'payload_plan', '{}') $$;
COMMENT ON FUNCTION ironwod.j_plan(jsonb) IS 'The payment plan object of a Wodify membership (payment_plan, or the misspelt payload_plan some payloads carry)';

CREATE FUNCTION ironwod.j_ids(p jsonb, p_field text) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN jsonb_typeof(p) = 'array'
                THEN ARRAY(SELECT DISTINCT x.id
                           FROM (SELECT ironwod.j_id(e -> p_field) AS id FROM jsonb_array_elements(p) AS e) x
                           WHERE x.id IS NOT NULL ORDER BY x.id) END
$$;
COMMENT ON FUNCTION ironwod.j_ids(jsonb, text) IS 'The ids in one field of the objects of a JSON array (a membership''s programs[].program_id), sorted and distinct, sentinels left out; NULL when the value is not an array (the field is absent)';

-- The mapping's field readers (src/fields.c): one field of a record, looked up
-- once and converted where it lies.  Each is the expression in its comment, in
-- one call instead of two, without the field's value built as jsonb or text in
-- between: for a backfill's class sign-ins, the mapping's expressions cost
-- about as much as the canonical rows' index insertion before.
CREATE FUNCTION ironwod.j_id(p jsonb, p_key text) RETURNS bigint
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'ironwod_field_id';
COMMENT ON FUNCTION ironwod.j_id(jsonb, text) IS 'A record''s field as a Wodify id: ironwod.j_id(p -> p_key)';

CREATE FUNCTION ironwod.j_num(p jsonb, p_key text) RETURNS numeric
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'ironwod_field_num';
COMMENT ON FUNCTION ironwod.j_num(jsonb, text) IS 'A record''s field as a number: ironwod.j_num(p -> p_key)';

CREATE FUNCTION ironwod.j_ts(p jsonb, p_key text) RETURNS timestamptz
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'ironwod_field_ts';
COMMENT ON FUNCTION ironwod.j_ts(jsonb, text) IS 'A record''s field as a Wodify datetime: ironwod.parse_ts(p ->> p_key)';

CREATE FUNCTION ironwod.j_date(p jsonb, p_key text) RETURNS date
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'ironwod_field_date';
COMMENT ON FUNCTION ironwod.j_date(jsonb, text) IS 'A record''s field as a Wodify civil date: ironwod.j_date(p ->> p_key)';

CREATE FUNCTION ironwod.j_text(p jsonb, p_key text) RETURNS text
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'ironwod_field_text';
COMMENT ON FUNCTION ironwod.j_text(jsonb, text) IS 'A record''s field as Wodify text: ironwod.j_text(p ->> p_key)';

CREATE FUNCTION ironwod.j_bool(p jsonb, p_key text) RETURNS boolean
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'ironwod_field_bool';
COMMENT ON FUNCTION ironwod.j_bool(jsonb, text) IS 'A record''s field as a boolean: (p ->> p_key)::boolean';

-- The gym's zone: the first Wodify location by id that names a valid IANA zone, else
-- the connection's time_zone, else UTC.
CREATE FUNCTION ironwod.gym_time_zone(p_tenant_id uuid, p_gym_id uuid) RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_tz text;
BEGIN
    SELECT coalesce(
        (SELECT l.time_zone FROM ironwod.locations l
         WHERE l.tenant_id = p_tenant_id AND l.gym_id = p_gym_id
           AND l.deleted_at IS NULL AND l.time_zone IS NOT NULL
         ORDER BY l.location_id LIMIT 1),
        (SELECT c.time_zone FROM ironwod.integrations_wodify_connection c
         WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id),
        'UTC') INTO v_tz;
    BEGIN
        PERFORM now() AT TIME ZONE v_tz;
    EXCEPTION WHEN invalid_parameter_value THEN
        v_tz := 'UTC';
    END;
    RETURN v_tz;
END
$$;
COMMENT ON FUNCTION ironwod.gym_time_zone(uuid, uuid) IS 'IANA zone of a gym: its first Wodify location by id, else the connection''s time_zone, else UTC';

-- ---------------------------------------------------------------------------------
-- The mapping: one row per entity, one row per canonical column
-- ---------------------------------------------------------------------------------

-- dirty_from is SQL over o and u, the canonical row before and after a change (o
-- is all NULL for a new record), row_day over c, a canonical row; $3 is the gym's
-- zone in both.
CREATE TABLE ironwod.canonical_maps (
    entity      text PRIMARY KEY REFERENCES ironwod.entities,
    canonical   name NOT NULL UNIQUE,
    key_column  name NOT NULL,
    -- the earliest civil date a change touched (NULL: no metric depends on it)
    dirty_from  text,
    -- the earliest civil date a row affects (for soft deletes and restores);
    -- NULL: no metric depends on the row
    row_day     text
);
COMMENT ON TABLE ironwod.canonical_maps IS 'Raw -> canonical mapping per entity: canonical table, key, and the earliest civil date a change touches';

-- Expressions are SQL over p (the payload jsonb) and l (the raw row).
CREATE TABLE ironwod.canonical_columns (
    entity       text NOT NULL REFERENCES ironwod.canonical_maps,
    ord          integer NOT NULL,
    column_name  name NOT NULL,
    expr         text NOT NULL,
    PRIMARY KEY (entity, ord),
    UNIQUE (entity, column_name)
);
COMMENT ON TABLE ironwod.canonical_columns IS 'Raw -> canonical mapping per entity: the jsonb -> typed expression of each canonical column (besides tenant_id, gym_id, key, raw_id and source_updated_at)';

INSERT INTO ironwod.canonical_maps (entity, canonical, key_column, dirty_from, row_day) VALUES
    -- a new location, or one whose zone or deletion changed: everything
    ('locations', 'locations', 'location_id',
     $$CASE WHEN o.location_id IS NULL OR (o.time_zone, o.deleted_at) IS DISTINCT FROM (u.time_zone, u.deleted_at)
            THEN date '0001-01-01' END$$, $$date '0001-01-01'$$),
    -- a new program, or one deleted or back: everything (its cache rows are per month)
    ('programs', 'programs', 'program_id',
     $$CASE WHEN o.program_id IS NULL OR o.deleted_at IS DISTINCT FROM u.deleted_at THEN date '0001-01-01' END$$,
     $$date '0001-01-01'$$),
    ('clients', 'members', 'member_id', NULL, NULL),
    -- from the start when coverage, price or location moved, else from the end
    ('memberships', 'memberships', 'membership_id',
     $$CASE WHEN o.membership_id IS NULL
                 OR (o.member_id, o.start_date, o.price, o.membership_type, o.is_deleted, o.location_id,
                     o.billing_period_length, o.billing_period_unit, o.program_ids)
                    IS DISTINCT FROM
                    (u.member_id, u.start_date, u.price, u.membership_type, u.is_deleted, u.location_id,
                     u.billing_period_length, u.billing_period_unit, u.program_ids)
            THEN least(o.start_date, u.start_date)
            ELSE least(o.end_date + 1, u.end_date + 1, o.cancellation_requested_on, u.cancellation_requested_on)
       END$$, 'c.start_date'),
    ('membership_holds', 'membership_holds', 'hold_id',
     $$CASE WHEN o.hold_id IS NULL
                 OR (o.membership_id, o.hold_start_date) IS DISTINCT FROM (u.membership_id, u.hold_start_date)
            THEN least(o.hold_start_date, u.hold_start_date)
            ELSE least(o.hold_end_date, u.hold_end_date) + 1
       END$$, 'c.hold_start_date'),
    ('class_signins', 'attendance_events', 'signin_id',
     'least((o.class_start_at AT TIME ZONE $3)::date, (u.class_start_at AT TIME ZONE $3)::date)',
     '(c.class_start_at AT TIME ZONE $3)::date'),
    ('invoices', 'invoices', 'invoice_id', 'least(o.due_date, u.due_date, o.paid_on, u.paid_on)', 'c.due_date'),
    ('transactions', 'transactions', 'transaction_id',
     'least((o.processed_at AT TIME ZONE $3)::date, (u.processed_at AT TIME ZONE $3)::date)',
     '(c.processed_at AT TIME ZONE $3)::date');

INSERT INTO ironwod.canonical_columns (entity, ord, column_name, expr)
SELECT x.entity, x.ord, x.col, x.expr FROM (VALUES
    ('locations', 1, 'name', $$ironwod.j_text(p, 'name')$$),
    ('locations', 2, 'time_zone', $$ironwod.j_text(p, 'time_zone_iana')$$),
    ('locations', 3, 'customer_id', $$ironwod.j_id(p, 'customer_id')$$),
    ('locations', 4, 'created_at', $$ironwod.parse_ts(p #>> '{created,created_on_datetime}')$$),
    ('programs', 1, 'name', $$ironwod.j_text(p, 'name')$$),
    ('programs', 2, 'is_active', $$ironwod.j_bool(p, 'is_active')$$),
    ('programs', 3, 'created_at', $$ironwod.parse_ts(p #>> '{created,created_on_datetime}')$$),
    ('clients', 1, 'first_name', $$ironwod.j_text(p, 'first_name')$$),
    ('clients', 2, 'last_name', $$ironwod.j_text(p, 'last_name')$$),
    ('clients', 3, 'email', $$ironwod.j_text(p, 'email')$$),
    ('clients', 4, 'client_status', $$ironwod.j_text(p, 'client_status')$$),
    ('clients', 5, 'location_id', $$ironwod.j_id(p, 'location_id')$$),
    ('clients', 6, 'member_since', $$ironwod.j_date(p, 'member_since')$$),
    ('clients', 7, 'created_at',
     $$ironwod.parse_ts(coalesce(p #>> '{created_on,created_on_datetime}', p #>> '{created,created_on_datetime}'))$$),
    ('clients', 8, 'last_class_sign_in', $$ironwod.j_ts(p, 'last_class_sign_in')$$),
    ('memberships', 1, 'member_id', $$ironwod.j_id(p, 'client_id')$$),
    ('memberships', 2, 'name', $$ironwod.j_text(p, 'name')$$),
    ('memberships', 3, 'membership_type', $$ironwod.j_text(p, 'membership_type')$$),
    ('memberships', 4, 'is_deleted', $$coalesce(ironwod.j_bool(p, 'is_deleted'), false)$$),
    ('memberships', 5, 'start_date', $$ironwod.j_date(p, 'start_date')$$),
    ('memberships', 6, 'end_date', $$ironwod.j_date(p, 'end_date')$$),
    ('memberships', 7, 'cancellation_requested_on', $$ironwod.j_date(p, 'cancellation_requested_on')$$),
    ('memberships', 8, 'does_expire', $$ironwod.j_bool(p, 'does_membership_expire')$$),
    ('memberships', 9, 'is_auto_renew', $$ironwod.j_bool(ironwod.j_plan(p), 'is_auto_renew')$$),
    ('memberships', 10, 'price', $$ironwod.j_num(ironwod.j_plan(p), 'price')$$),
    ('memberships', 11, 'billing_period_length', $$ironwod.j_num(ironwod.j_plan(p), 'billing_period_length')::integer$$),
    ('memberships', 12, 'billing_period_unit', $$ironwod.j_text(ironwod.j_plan(p), 'billing_period_unit')$$),
    ('memberships', 13, 'location_id', $$ironwod.j_id(p, 'location_id')$$),
    ('memberships', 14, 'created_at', $$ironwod.parse_ts(p #>> '{created,created_on_datetime}')$$),
    -- Wodify's is_deleted is a soft delete: at the version's update time, by the run that landed it
    ('memberships', 15, 'deleted_at',
     $$CASE WHEN ironwod.j_bool(p, 'is_deleted') THEN coalesce(l.source_updated_at, l.ingested_at) END$$),
    ('memberships', 16, 'deleted_by_run', $$CASE WHEN ironwod.j_bool(p, 'is_deleted') THEN l.ingest_run_id END$$),
    ('memberships', 17, 'program_ids', $$ironwod.j_ids(p -> 'programs', 'program_id')$$),
    ('membership_holds', 1, 'membership_id', $$ironwod.j_id(p, 'membership_id')$$),
    ('membership_holds', 2, 'member_id', $$ironwod.j_id(p, 'client_id')$$),
    ('membership_holds', 3, 'hold_start_date', $$ironwod.j_date(p, 'hold_start_date')$$),
    ('membership_holds', 4, 'hold_end_date', $$ironwod.j_date(p, 'hold_end_date')$$),
    ('membership_holds', 5, 'hold_reason', $$ironwod.j_text(p, 'hold_reason')$$),
    ('class_signins', 1, 'member_id', $$ironwod.j_id(p, 'client_id')$$),
    ('class_signins', 2, 'class_id', $$ironwod.j_id(p, 'class_id')$$),
    ('class_signins', 3, 'class_start_at', $$ironwod.j_ts(p, 'utc_class_start_datetime')$$),
    ('class_signins', 4, 'location_id', $$ironwod.j_id(p, 'location_id')$$),
    ('class_signins', 5, 'program_id', $$ironwod.j_id(p, 'program_id')$$),
    ('class_signins', 6, 'membership_id', $$ironwod.j_id(p, 'membership_id')$$),
    ('class_signins', 7, 'is_drop_in', $$ironwod.j_bool(p, 'is_drop_in')$$),
    ('invoices', 1, 'invoice_number', $$ironwod.j_text(p, 'invoice_number')$$),
    ('invoices', 2, 'member_id', $$ironwod.j_id(p, 'client_id')$$),
    ('invoices', 3, 'membership_id', $$ironwod.j_id(p, 'membership_id')$$),
    ('invoices', 4, 'location_id', $$ironwod.j_id(p, 'location_id')$$),
    ('invoices', 5, 'status', $$ironwod.j_text(p, 'invoice_header_status')$$),
    ('invoices', 6, 'due_date', $$ironwod.j_date(p, 'payment_due')$$),
    ('invoices', 7, 'paid_on', $$ironwod.j_date(p, 'paid_on_date')$$),
    ('invoices', 8, 'amount', $$ironwod.j_num(p, 'final_charge')$$),
    ('invoices', 9, 'created_at', $$ironwod.parse_ts(p #>> '{created,created_on_datetime}')$$),
    ('transactions', 1, 'invoice_id', $$ironwod.j_id(p, 'invoice_id')$$),
    ('transactions', 2, 'member_id', $$ironwod.j_id(p, 'client_id')$$),
    ('transactions', 3, 'location_id', $$ironwod.j_id(p, 'location_id')$$),
    ('transactions', 4, 'processed_at', $$ironwod.j_ts(p, 'transaction_date_time')$$),
    ('transactions', 5, 'amount', $$ironwod.j_num(p, 'amount')$$),
    ('transactions', 6, 'transaction_type', $$ironwod.j_text(p, 'transaction_type')$$),
    ('transactions', 7, 'payment_method', $$ironwod.j_text(p, 'payment_method')$$)
) AS x(entity, ord, col, expr);

-- Install-time check: every canonical column is either common lineage or mapped.
DO $check$
DECLARE
    v_bad text;
BEGIN
    SELECT string_agg(m.canonical || '.' || a.attname, ', ') INTO v_bad
    FROM ironwod.canonical_maps m
    JOIN pg_attribute a ON a.attrelid = ('ironwod.' || quote_ident(m.canonical))::regclass
                       AND a.attnum > 0 AND NOT a.attisdropped
    WHERE a.attname NOT IN ('tenant_id', 'gym_id', 'raw_id', 'source_updated_at', 'deleted_at', 'deleted_by_run')
      AND a.attname <> m.key_column
      AND NOT EXISTS (SELECT 1 FROM ironwod.canonical_columns c
                      WHERE c.entity = m.entity AND c.column_name = a.attname);
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'canonical columns without a mapping: %', v_bad;
    END IF;
END
$check$;

-- The upsert of one entity, from its mapping: the canonical rows of the raw
-- versions $4 (raw ids), written only where they differ from the stored ones.  It
-- returns the rows written and, with change tracking, the earliest civil date the
-- changes touched, from each written row and the row it replaced, and the people
-- on them (member_id, before and after; NULL when the table names no person).
--
-- No plan of it depends on an estimate being right.  A gym's first transform in
-- a cluster whose statistics predate it is estimated at one row, and a join
-- between two row sets planned on that estimate (a nested loop over a CTE or a
-- function scan) is quadratic in the records: minutes for a medium gym.  So the
-- raw versions are read by raw id ($4) and the stored rows by key ($5, the
-- records' Wodify ids, in order, so a batch also bounds the key range), each
-- "= ANY" of one table (index probes or one scan, linear either way), and a
-- written row meets the row it replaced by a sort on the key, never by a join.
--
-- Without p_upsert the statement is a plain INSERT, for records none of which has
-- a canonical row yet (every record of a backfill): no speculative insertion,
-- which costs as much again as the insert itself, and no old rows to read, so
-- each written row meets an all-NULL o, what the upsert pairs a new record with.
--
-- With p_gym (and without p_upsert: the gym has no canonical row of the entity)
-- the statement reads no list of records but the latest version of every record
-- of the gym, where one of the runs $4 landed it (every record when $4 is NULL):
-- one pass over the gym's range of the raw table's unique (wodify_id,
-- payload_hash) index, which yields each record's versions together, and an
-- incremental sort that puts those few in version order (no full sort, no
-- array of ids to plan).  That plan holds whatever the estimates because
-- transform_records runs with enable_seqscan and enable_sort off (which leaves
-- incremental sorts allowed): on statistics that predate the gym the planner
-- chose a bitmap scan and a sort.  The runs are
-- tested on the latest versions, outside the DISTINCT ON: a condition on them
-- inside offered the planner an index on the runs (dropped in 1.1), and with it
-- a sort of every payload of the gym.  It tracks no change: a gym's first rows
-- of an entity touch every month it has and everyone on them, which
-- transform_records notes as such, and the RETURNING of every row, kept in a
-- tuplestore that spills, and the aggregates over it (a civil date in the gym's
-- zone and the people, per row) cost a sixth of a backfill's class sign-in
-- insert to compute what amounts to the same.  It returns only the rows written,
-- counted from a CTE (RETURNING 1): a bare INSERT ... SELECT of $1 and $2 with
-- DISTINCT ON Citus pulled to the coordinator and copied into the shard, which
-- row-level security refuses.  The rows take tenant_id and gym_id from the raw
-- row, as below.
CREATE FUNCTION ironwod.transform_sql(p_entity text, p_track boolean, p_upsert boolean, p_gym boolean)
RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    m ironwod.canonical_maps;
    v_raw name;
    v_col name[];
    v_expr text[];
    v_people text := 'NULL::bigint[]';
BEGIN
    IF p_gym AND (p_upsert OR p_track) THEN
        RAISE EXCEPTION 'the statement over every record of a gym is a plain insert without change tracking'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO STRICT m FROM ironwod.canonical_maps x WHERE x.entity = p_entity;
    IF p_track AND m.key_column <> 'member_id' AND EXISTS (
           SELECT 1 FROM pg_attribute a
           WHERE a.attrelid = ('ironwod.' || quote_ident(m.canonical))::regclass
             AND a.attname = 'member_id' AND a.attnum > 0 AND NOT a.attisdropped) THEN
        v_people := 'array_remove(array_agg(DISTINCT o.member_id) || array_agg(DISTINCT u.member_id), NULL)';
    END IF;
    SELECT e.raw_table INTO STRICT v_raw FROM ironwod.entities e WHERE e.entity = p_entity;
    SELECT array_agg(c.column_name ORDER BY c.ord), array_agg(c.expr ORDER BY c.ord)
      INTO v_col, v_expr FROM ironwod.canonical_columns c WHERE c.entity = p_entity;
    -- lineage; deleted_at / deleted_by_run are NULL unless the mapping says otherwise
    SELECT v_col || array_agg(x.col ORDER BY x.n), v_expr || array_agg(x.expr ORDER BY x.n)
      INTO v_col, v_expr
      FROM (VALUES (1, 'deleted_at'::name, 'NULL'), (2, 'deleted_by_run', 'NULL'),
                   (3, 'raw_id', 'l.raw_id'), (4, 'source_updated_at', 'l.source_updated_at')) x(n, col, expr)
     WHERE x.col <> ALL (v_col);
    IF p_gym THEN
        RETURN format($q$
        WITH up AS (
            INSERT INTO ironwod.%1$I AS c (tenant_id, gym_id, %3$I, %5$s)
            SELECT l.tenant_id, l.gym_id, l.wodify_id, %4$s
            FROM (SELECT DISTINCT ON (v.wodify_id) v.*
                  FROM (SELECT r.* FROM ironwod.%2$I r
                        WHERE r.tenant_id = $1 AND r.gym_id = $2
                        ORDER BY r.wodify_id, r.source_updated_at DESC NULLS LAST, r.raw_id DESC) v
                  ORDER BY v.wodify_id, v.source_updated_at DESC NULLS LAST, v.raw_id DESC) l,
                 LATERAL (SELECT l.payload_json AS p) x
            WHERE $4 IS NULL OR l.ingest_run_id = ANY ($4)
            RETURNING 1
        )
        SELECT count(*)::integer FROM up$q$,
            m.canonical, v_raw, m.key_column,
            (SELECT string_agg(e, ', ') FROM unnest(v_expr) e),
            (SELECT string_agg(quote_ident(c), ', ') FROM unnest(v_col) c));
    END IF;
    -- With change tracking, the rows as they were are read in a CTE of their own,
    -- materialized before the upsert: on Citus each CTE is a step of its own and
    -- a later step would see the upsert's rows, not the old ones.  Each written
    -- row (u) is then paired with the one it replaced (o, NULL for a new record)
    -- by lag() over the two sets sorted by key, old first.
    -- The rows take tenant_id and gym_id from the raw row (l, of the gym $1, $2),
    -- not from the parameters: Citus then runs the INSERT ... SELECT on the
    -- tenant's shard as one statement, where with constants it read the rows to
    -- the coordinator and sent them back to the shard (as the refresh stages'
    -- rows, 80_metrics).  Only the RETURNING rows come back, for the counts.
    RETURN format($q$
        WITH %8$s up AS (
            INSERT INTO ironwod.%1$I AS c (tenant_id, gym_id, %3$I, %5$s)
            SELECT l.tenant_id, l.gym_id, l.wodify_id, %4$s
            FROM %11$s
            %6$s
            RETURNING c.*
        )
        SELECT count(*)::integer, min(%7$s), %10$s
        FROM %9$s$q$,
        m.canonical, v_raw, m.key_column,
        (SELECT string_agg(e, ', ') FROM unnest(v_expr) e),
        (SELECT string_agg(quote_ident(c), ', ') FROM unnest(v_col) c),
        CASE WHEN p_upsert THEN format(
            'ON CONFLICT (tenant_id, gym_id, %I) DO UPDATE SET %s
            WHERE ROW(c.*) IS DISTINCT FROM ROW(excluded.*)',
            m.key_column, (SELECT string_agg(format('%1$I = excluded.%1$I', c), ', ') FROM unnest(v_col) c))
             ELSE '' END,
        CASE WHEN p_track THEN coalesce(m.dirty_from, 'NULL::date') ELSE 'NULL::date' END,
        CASE WHEN p_track AND p_upsert THEN format(
            'old AS MATERIALIZED (
                SELECT o.* FROM ironwod.%1$I o
                WHERE o.tenant_id = $1 AND o.gym_id = $2 AND o.%2$I = ANY ($5)
                  AND o.%2$I BETWEEN $5[1] AND $5[cardinality($5)]),',
            m.canonical, m.key_column) ELSE '' END,
        CASE WHEN p_track AND NOT p_upsert THEN format('up u, LATERAL (SELECT (NULL::ironwod.%I).*) o', m.canonical)
             WHEN p_track THEN format(
            '(SELECT y.side, y.r AS u, lag(y.r) OVER (PARTITION BY (y.r).%2$I ORDER BY y.side) AS o
              FROM (SELECT 0 AS side, o::ironwod.%1$I AS r FROM old o
                    UNION ALL SELECT 1, u::ironwod.%1$I FROM up u) y) z,
             LATERAL (SELECT (z.o).*) o, LATERAL (SELECT (z.u).*) u
            WHERE z.side = 1',
            m.canonical, m.key_column) ELSE 'up u' END,
        v_people,
        format('ironwod.%I l, LATERAL (SELECT l.payload_json AS p) x
            WHERE l.tenant_id = $1 AND l.gym_id = $2 AND l.raw_id = ANY ($4)', v_raw));
END
$$;
COMMENT ON FUNCTION ironwod.transform_sql(text, boolean, boolean, boolean) IS 'The upsert (or, for records without a canonical row, plain insert) statement of one entity built from its mapping (canonical_maps, canonical_columns), with or without change tracking, over the given raw versions, or a plain insert of every latest version of the gym without it';

CREATE FUNCTION ironwod.note_dirty(p_tenant_id uuid, p_gym_id uuid, p_run_id bigint, p_entity text,
                                   p_dirty_from date, p_changed integer, p_member_ids bigint[])
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF p_run_id IS NULL OR p_dirty_from IS NULL THEN
        RETURN;
    END IF;
    -- member_ids NULL (people not known) absorbs any list: everyone
    INSERT INTO ironwod.metric_dirty AS d (tenant_id, gym_id, run_id, entity, dirty_from, changed, member_ids)
    VALUES (p_tenant_id, p_gym_id, p_run_id, p_entity, p_dirty_from, p_changed, p_member_ids)
    ON CONFLICT (tenant_id, gym_id, run_id, entity) DO UPDATE
       SET dirty_from = least(d.dirty_from, excluded.dirty_from), changed = d.changed + excluded.changed,
           member_ids = CASE WHEN d.member_ids IS NOT NULL AND excluded.member_ids IS NOT NULL
                             THEN d.member_ids || excluded.member_ids END;
END
$$;
COMMENT ON FUNCTION ironwod.note_dirty(uuid, uuid, bigint, text, date, integer, bigint[]) IS 'Record the earliest civil date a run''s canonical changes to an entity touched, and the people on the changed rows (NULL: not known)';

-- Statistics of a raw table before transform_records reads an entity in batches
-- (a gym that already has canonical rows of it: a nightly, a reconciliation,
-- transform_all over a gym with rows): ANALYZE the table when it never was
-- analyzed, or when its rows changed by more than a fifth of the row count it
-- was last analyzed at, by its statistics or by the caller's count (the
-- records the runs landed a version of, which the statistics of this
-- transaction's own writes do not show yet).  A gym's first transform of an
-- entity (every backfill, a replay) does not call it: its one statement plans
-- nothing on an estimate (transform_sql, p_gym).  Canonical tables could be
-- named too, but transform_records no longer analyzes them (see there).  The
-- worker role does not own the tables, hence SECURITY DEFINER.  SKIP_LOCKED:
-- another worker analyzing the table right now makes it fresh anyway.
CREATE FUNCTION ironwod.analyze_if_stale(p_table name, p_changed bigint DEFAULT 0)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_distributed boolean := false;
    v_target text;
BEGIN
    -- A Citus distributed table is analyzed where its rows are, by each node's
    -- autovacuum on its shards; ANALYZE on the coordinator would run as this
    -- function's owner on placements the worker role wrote in this transaction,
    -- which Citus refuses (25001).  pg_dist_partition exists only with Citus.
    IF to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL THEN
        EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition d
                                JOIN pg_catalog.pg_class c ON c.oid = d.logicalrelid
                                WHERE c.relname = $1 AND c.relnamespace = ''ironwod''::regnamespace)'
            INTO v_distributed USING p_table;
        IF v_distributed THEN
            RETURN false;
        END IF;
    END IF;
    IF NOT EXISTS (
        SELECT 1
        FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace AND s.nspname = 'ironwod'
        LEFT JOIN pg_stat_all_tables st ON st.relid = c.oid
        WHERE c.relname = p_table
          AND (c.relname IN (SELECT e.raw_table FROM ironwod.entities e)
               OR c.relname IN (SELECT m.canonical FROM ironwod.canonical_maps m))
          AND (c.reltuples < 0
               OR greatest(coalesce(p_changed, 0), coalesce(st.n_mod_since_analyze, 0)) > 0.2 * c.reltuples)) THEN
        RETURN false;
    END IF;
    -- A raw table's rows carry their payload (1-2 KB each), and ANALYZE holds
    -- its whole sample (300 x the statistics target rows) in the caller's
    -- memory: at the default target of 100 that is 30,000 payloads, about 45 MB
    -- of the run worker's.  The statistics the transform's plans read (gym,
    -- run, id and raw id) need no such sample: a target of 10 (3,000 rows) is
    -- ample, and keeps the worker's ANALYZE under 10 MB.
    IF p_table IN (SELECT e.raw_table FROM ironwod.entities e) THEN
        v_target := current_setting('default_statistics_target');
        PERFORM set_config('default_statistics_target', '10', true);
        EXECUTE format('ANALYZE (SKIP_LOCKED) ironwod.%I', p_table);
        PERFORM set_config('default_statistics_target', v_target, true);
    ELSE
        EXECUTE format('ANALYZE (SKIP_LOCKED) ironwod.%I', p_table);
    END IF;
    RETURN true;
END
$$;
COMMENT ON FUNCTION ironwod.analyze_if_stale(name, bigint) IS 'Worker: ANALYZE an ironwod raw or canonical table that was never analyzed or whose rows changed by more than 20 % since';

-- Rebuild canonical rows from raw.  p_run_id NULL = every record of the scope (and no
-- change tracking); otherwise the records with a new version landed in that run and
-- in earlier runs not yet transformed.
--
-- In batches of 10,000 records.  EXECUTE plans with its parameters as constants,
-- so each "= ANY" array is copied into the plan, and the planner estimates its
-- selectivity element by element, several times over: one statement over the
-- 190,000 sign-ins of a large gym held 110 MB of the run worker's memory and
-- spent seconds planning.  A batch's statements plan in under 10 MB, and the
-- work stays linear in the records (each batch reads its own rows by key).
-- A gym's entity without canonical rows yet is one statement, no batches (see
-- transform_sql).
--
-- No sequential scans: every statement here names the gym, and each of its
-- tables has an index led by (tenant_id, gym_id), so reading by index costs the
-- gym's rows (or the batch's), never another gym's.  A sequential scan is only
-- ever chosen on an estimate (a table last analyzed when this gym made most of
-- it), and then reads every gym's rows once per batch.  With that choice gone
-- the plans need no fresh statistics of the canonical tables, which are not
-- analyzed here (an ANALYZE of them cost a tenth of a backfill's transform);
-- autovacuum keeps them for the metrics refresh.
--
-- No full sorts where an index gives the order: the whole-gym insert's DISTINCT
-- ON reads the unique (wodify_id, payload_hash) index in its order and sorts
-- only each record's versions (an incremental sort), but on a raw table whose
-- statistics predate the gym's rows (every backfill: the rows were landed
-- seconds ago) the planner estimates a few rows and may prefer a bitmap scan
-- of an index led by (tenant_id, gym_id) and a sort: for a medium gym's 39,897
-- sign-ins (then by the since dropped (tenant_id, gym_id, ingest_run_id)
-- index) an external merge of 54 MB, 134 ms before the first row of an 806 ms
-- statement (EXPLAIN ANALYZE).  The same statement timed both ways on the same
-- data cost the same (546 and 553 ms): this keeps the plan independent of the
-- estimate, it does not make the transform faster.  A sort nothing
-- can avoid (the upsert's lag() over old and new rows, ORDER BY of a few run
-- ids) is still planned, at the same penalty for every alternative.
--
-- On Citus the nodes plan these statements, with their own settings: the
-- function forwards its SET clauses to them (forward_set_clauses), or a shard
-- landed seconds ago could get the bitmap scan and sort there, and, at the
-- disabled cost of a scan or sort nothing avoids, a JIT compilation.
CREATE FUNCTION ironwod.transform_records(p_run_id bigint)
RETURNS jsonb
LANGUAGE plpgsql
SET jit = off
SET enable_seqscan = off
SET enable_sort = off
AS $$
DECLARE
    v_t uuid;
    v_g uuid;
    v_batch constant integer := 10000;
    v_tz text;
    v_out jsonb := '{}';
    v_runs bigint[];
    v_ids bigint[];
    v_part bigint[];
    v_raw bigint[];
    v_new_ids bigint[];
    v_from bigint;
    v_later boolean := false;
    v_to bigint;
    v_sql text;
    v_new_sql text;
    v_empty boolean;
    v_fresh boolean;
    v_n integer;
    v_bn integer;
    v_dirty date;
    v_bdirty date;
    v_people bigint[];
    v_bpeople bigint[];
    e record;
BEGIN
    SELECT * INTO v_t, v_g FROM ironwod.require_scope();
    -- the SET clauses on the Citus nodes too, which plan every statement below
    PERFORM ironwod.forward_set_clauses('ironwod.transform_records(bigint)', true);
    -- One transform (or replay) of a gym at a time: a batch of records without
    -- canonical rows is inserted without ON CONFLICT, which a concurrent writer
    -- of the same records would turn into a unique violation.  The lock is the
    -- one ironwod_replay holds while it empties and rebuilds the gym's rows.
    PERFORM pg_advisory_xact_lock(hashtextextended('ironwod.replay:' || v_t || ':' || v_g, 0));
    IF p_run_id IS NOT NULL THEN
        v_runs := ARRAY(
            SELECT x.run_id
            FROM (SELECT r.run_id FROM ironwod.sync_runs r
                  WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id <= p_run_id
                  UNION SELECT p_run_id) x
            WHERE NOT EXISTS (SELECT 1 FROM ironwod.transformed_runs d
                              WHERE d.tenant_id = v_t AND d.gym_id = v_g AND d.run_id = x.run_id)
            ORDER BY 1);
        v_later := EXISTS (SELECT 1 FROM ironwod.sync_runs r
                           WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id > p_run_id);
    END IF;
    -- In registry order: locations first, they decide the time zone.
    FOR e IN SELECT x.entity, x.raw_table, m.canonical, m.key_column, m.dirty_from FROM ironwod.entities x
             JOIN ironwod.canonical_maps m USING (entity) ORDER BY x.ordinal LOOP
        IF e.entity <> 'locations' AND v_tz IS NULL THEN
            v_tz := ironwod.gym_time_zone(v_t, v_g);
        END IF;
        EXECUTE format('SELECT NOT EXISTS (SELECT 1 FROM ironwod.%I c WHERE c.tenant_id = $1 AND c.gym_id = $2)',
                       e.canonical)
            INTO v_empty USING v_t, v_g;
        -- The runs' versions: the range above the entity's cursor (primary key
        -- order), of which those the runs landed; their Wodify ids are needed
        -- only by the batched path below (a gym without canonical rows reads
        -- every latest version).  Versions of runs already transformed are
        -- passed over, as they always were.  The cursor moves to the last
        -- version, or, when the gym has a run later than this one (a manual
        -- transform_run of an earlier run), to just below that run's first
        -- version, which it leaves to that run; only then is the range read
        -- for it, so a backfill's transform reads the raw table's last key,
        -- not its rows, to move the cursor.
        IF p_run_id IS NOT NULL THEN
            SELECT c.raw_id INTO v_from FROM ironwod.transform_cursors c
             WHERE c.tenant_id = v_t AND c.gym_id = v_g AND c.entity = e.entity;
            v_from := coalesce(v_from, 0);
            v_new_ids := NULL;
            IF NOT v_empty THEN
                EXECUTE format('SELECT array_agg(DISTINCT r.wodify_id ORDER BY r.wodify_id) FROM ironwod.%I r
                                WHERE r.tenant_id = $1 AND r.gym_id = $2 AND r.raw_id > $3 AND r.ingest_run_id = ANY ($4)',
                               e.raw_table)
                    INTO v_new_ids USING v_t, v_g, v_from, v_runs;
            END IF;
            v_to := NULL;
            IF v_later THEN
                EXECUTE format('SELECT min(r.raw_id) - 1 FROM ironwod.%I r
                                WHERE r.tenant_id = $1 AND r.gym_id = $2 AND r.raw_id > $3 AND r.ingest_run_id > $4',
                               e.raw_table)
                    INTO v_to USING v_t, v_g, v_from, p_run_id;
            END IF;
            IF v_to IS NULL THEN
                EXECUTE format('SELECT max(r.raw_id) FROM ironwod.%I r WHERE r.tenant_id = $1 AND r.gym_id = $2 AND r.raw_id > $3',
                               e.raw_table)
                    INTO v_to USING v_t, v_g, v_from;
            END IF;
            IF v_to > v_from THEN
                INSERT INTO ironwod.transform_cursors AS c (tenant_id, gym_id, entity, raw_id)
                VALUES (v_t, v_g, e.entity, v_to)
                ON CONFLICT (tenant_id, gym_id, entity) DO UPDATE SET raw_id = excluded.raw_id;
            END IF;
        END IF;
        -- A gym without rows in the canonical table (a backfill, a replay): one
        -- plain insert of every record's latest version, read in one pass over
        -- the gym's raw rows (transform_sql, p_gym).  No statistics are needed:
        -- the pass reads the gym's range of the (wodify_id, payload_hash) index whatever
        -- the estimates, and the gym's new canonical rows plan nothing here.
        -- The gym's first rows of an entity change every month for everyone a
        -- metric reads them for: noted as such (from 0001-01-01, people not
        -- known), not computed row by row.  A backfill's first refresh
        -- recomputes everything anyway; a later run that brings a gym's first
        -- rows of an entity (its first hold) makes its refresh recompute every
        -- month.
        IF v_empty THEN
            EXECUTE ironwod.transform_sql(e.entity, false, false, true) INTO v_n USING v_t, v_g, v_tz, v_runs;
            v_dirty := CASE WHEN v_n > 0 AND e.dirty_from IS NOT NULL THEN date '0001-01-01' END;
            v_people := NULL;
        ELSE
            -- v_ids: the raw ids of every record's latest version, or the Wodify
            -- ids of the records the runs landed a version of, in order: each
            -- batch is a range of keys, read by index probes, not a scan of the gym
            IF p_run_id IS NULL THEN
                PERFORM ironwod.analyze_if_stale(e.raw_table);
                v_ids := ARRAY(SELECT l.raw_id FROM ironwod.latest_raw_versions(e.entity, v_t, v_g, NULL, false) l);
            ELSE
                v_ids := v_new_ids;
                IF v_ids IS NOT NULL THEN
                    PERFORM ironwod.analyze_if_stale(e.raw_table, cardinality(v_ids));
                END IF;
            END IF;
            v_sql := ironwod.transform_sql(e.entity, p_run_id IS NOT NULL, true, false);
            v_new_sql := ironwod.transform_sql(e.entity, p_run_id IS NOT NULL, false, false);
            v_n := 0;
            v_dirty := NULL;
            v_people := '{}';
            FOR i IN 1 .. (coalesce(cardinality(v_ids), 0) + v_batch - 1) / v_batch LOOP
                v_part := v_ids[(i - 1) * v_batch + 1 : i * v_batch];
                IF p_run_id IS NULL THEN
                    v_raw := v_part;
                ELSE
                    v_raw := ARRAY(SELECT l.raw_id FROM ironwod.latest_raw_versions(e.entity, v_t, v_g, v_part, false) l);
                END IF;
                -- a batch of a run is new when none of its records (v_part, their
                -- Wodify ids in order) has a canonical row
                v_fresh := false;
                IF p_run_id IS NOT NULL THEN
                    EXECUTE format('SELECT NOT EXISTS (SELECT 1 FROM ironwod.%1$I c WHERE c.tenant_id = $1 AND c.gym_id = $2
                                    AND c.%2$I = ANY ($3) AND c.%2$I BETWEEN $3[1] AND $3[cardinality($3)])',
                                   e.canonical, e.key_column)
                        INTO v_fresh USING v_t, v_g, v_part;
                END IF;
                EXECUTE CASE WHEN v_fresh THEN v_new_sql ELSE v_sql END
                    INTO v_bn, v_bdirty, v_bpeople USING v_t, v_g, v_tz, v_raw, v_part;
                v_n := v_n + v_bn;
                v_dirty := least(v_dirty, v_bdirty);
                -- NULL (a table without people) stays NULL: everyone
                IF v_bn > 0 THEN
                    v_people := CASE WHEN v_people IS NOT NULL AND v_bpeople IS NOT NULL THEN v_people || v_bpeople END;
                END IF;
            END LOOP;
        END IF;
        IF p_run_id IS NOT NULL THEN
            PERFORM ironwod.note_dirty(v_t, v_g, p_run_id, e.entity, v_dirty, v_n, v_people);
        END IF;
        v_out := v_out || jsonb_build_object(e.entity, v_n);
    END LOOP;

    -- tenant and gym from the gym's connection row (transformed_runs' foreign
    -- key): Citus runs the INSERT ... SELECT on the tenant's shard, where with
    -- the values as constants it pulled the rows to the coordinator
    INSERT INTO ironwod.transformed_runs (tenant_id, gym_id, run_id, transformed_by)
    SELECT c.tenant_id, c.gym_id, x, p_run_id
    FROM ironwod.integrations_wodify_connection c, unnest(v_runs) AS x
    WHERE c.tenant_id = v_t AND c.gym_id = v_g
    ON CONFLICT DO NOTHING;
    PERFORM ironwod.forward_set_clauses('ironwod.transform_records(bigint)', false);
    RETURN v_out;
END
$$;
COMMENT ON FUNCTION ironwod.transform_records(bigint) IS 'Rebuild canonical rows from their latest raw version: the records with a new version in the given run, or all records of the scope when NULL; returns rows written per entity';

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
LANGUAGE plpgsql
AS $$
BEGIN
    RETURN ironwod.transform_records(NULL) || jsonb_build_object('vanished', ironwod.apply_vanished(NULL));
END
$$;
COMMENT ON FUNCTION ironwod.transform_all() IS 'Rebuild the canonical rows of every record of the current scope from raw (used by replay)';

GRANT EXECUTE ON FUNCTION ironwod.j_date(text), ironwod.j_id(jsonb), ironwod.j_num(jsonb), ironwod.j_text(text),
    ironwod.j_plan(jsonb), ironwod.j_ids(jsonb, text), ironwod.j_id(jsonb, text), ironwod.j_num(jsonb, text),
    ironwod.j_ts(jsonb, text), ironwod.j_date(jsonb, text), ironwod.j_text(jsonb, text), ironwod.j_bool(jsonb, text), ironwod.gym_time_zone(uuid, uuid), ironwod.transform_sql(text, boolean, boolean, boolean),
    ironwod.transform_records(bigint), ironwod.note_dirty(uuid, uuid, bigint, text, date, integer, bigint[]),
    ironwod.analyze_if_stale(name, bigint), ironwod.transform_run(bigint), ironwod.transform_all()
    TO ironwod_worker;
-- Global configuration like the entity registry: everyone reads it, nobody writes it.
ALTER TABLE ironwod.canonical_maps ENABLE ROW LEVEL SECURITY;
ALTER TABLE ironwod.canonical_maps FORCE ROW LEVEL SECURITY;
CREATE POLICY read_maps ON ironwod.canonical_maps FOR SELECT TO ironwod_app, ironwod_worker, ironwod_admin USING (true);
ALTER TABLE ironwod.canonical_columns ENABLE ROW LEVEL SECURITY;
ALTER TABLE ironwod.canonical_columns FORCE ROW LEVEL SECURITY;
CREATE POLICY read_columns ON ironwod.canonical_columns FOR SELECT TO ironwod_app, ironwod_worker, ironwod_admin USING (true);
GRANT SELECT ON ironwod.canonical_maps, ironwod.canonical_columns TO ironwod_worker, ironwod_app, ironwod_admin;
