-- ironwod 1.0 -> 1.1 (ALTER EXTENSION ironwod UPDATE).  1.1 is not released yet:
-- until it is tagged, every schema change is made here as well as in
-- sql/modules/ (test/shell/upgrade.sh compares the two); once tagged, this
-- script is frozen like sql/ironwod--1.0.sql.
--
-- ironwod.check_config() gains the check "version": the installed extension
-- against the version the loaded library was built as (ironwod.library_version())
-- and whether that library drives it (ironwod.library_drives()), so the window
-- between a package upgrade and ALTER EXTENSION ironwod UPDATE is visible.
--
-- ironwod.landing_statement(): the plain INSERT a backfill lands pages with
-- returns a row per new version instead of counting them in a CTE, and both
-- statements unnest the page's arrays in the select list (no tuplestore copy
-- of the payloads).
--
-- ironwod.scope_tenant() and ironwod.scope_gym() are C functions returning the
-- uuid the scope GUC was parsed into when it was set (every RLS policy's WITH
-- CHECK calls both for each row a statement writes).
--
-- ironwod.require_scope() returns the scope or raises 42501 when none is set, the
-- check 1.0 copied into assert_scope, transform_records, compute_metrics and
-- refresh_metrics, which now call it.
--
-- Program breakdowns (issue 9, metrics.md §2.5): memberships gain program_ids,
-- the programs each one gives access to (wodify-api.md §11), mapped from the raw
-- payload by ironwod.j_ids.  The update fills it for the memberships 1.0 already
-- holds, from the raw version each canonical row was built from, so the canonical
-- rows equal what a fresh transform of the same raw rows writes (a replay).
-- The metrics gain program rows (program_key = a Wodify program id, at location
-- ALL): the refresh stages carry a key program:<id> beside ALL and the locations,
-- 82_unknowns masks what the memberships do not tell, and ironwod_dashboard and
-- ironwod_explain take a program (a new last argument, default 'ALL', so every
-- 1.0 call still works).  The definitions are metrics-v1.1: the update moves the
-- gyms on the 1.0 default there, so their next refresh recomputes every month and
-- writes the program rows; until then the cache holds what 1.0 computed,
-- labelled metrics-v1.0.
--
-- The metrics refresh runs on Citus as on one node (issue 12): every stage
-- statement on the tenant's node, with the stages' planner settings there too
-- (ironwod.stage_planner_settings).  The metrics are the same.  The run
-- workers' transforms and vanished records forward the settings of their SET
-- clauses to the nodes as well (ironwod.forward_set_clauses), and a transform's
-- INSERT ... SELECT runs on the tenant's shard as one statement.

\echo Use "ALTER EXTENSION ironwod UPDATE" to load this file. \quit

CREATE FUNCTION ironwod.library_version() RETURNS text
LANGUAGE c IMMUTABLE STRICT AS 'MODULE_PATHNAME', 'ironwod_library_version';
COMMENT ON FUNCTION ironwod.library_version() IS 'The extension version the loaded library was built as (after a package upgrade it can differ from the installed extension until ALTER EXTENSION ironwod UPDATE)';

CREATE FUNCTION ironwod.library_drives(p_version text) RETURNS boolean
LANGUAGE c IMMUTABLE STRICT AS 'MODULE_PATHNAME', 'ironwod_library_drives';
COMMENT ON FUNCTION ironwod.library_drives(text) IS 'Whether the loaded library drives the SQL of that extension version (the supervisor starts no runs at a version it does not)';

REVOKE ALL ON FUNCTION ironwod.library_version(), ironwod.library_drives(text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION ironwod.check_config()
RETURNS TABLE (check_name text, ok boolean, message text, hint text)
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_db text := current_setting('ironwod.database_name');
    v_role text := current_setting('ironwod.worker_role');
    v_cmd text := current_setting('ironwod.master_key_command');
    v_url text := current_setting('ironwod.base_url');
    v_need integer;
    v_have integer := current_setting('max_worker_processes')::integer;
    v_bad text;
    v_ext text;
    v record;
BEGIN
    check_name := 'database';
    ok := v_db = current_database();
    message := CASE WHEN ok THEN format('the supervisor serves this database (%s)', v_db)
                    ELSE format('ironwod is installed in database "%s" but ironwod.database_name is "%s", so no supervisor serves it',
                                current_database(), v_db) END;
    hint := CASE WHEN NOT ok THEN format('Set ironwod.database_name = ''%s'' in postgresql.conf and restart the server.', current_database()) END;
    RETURN NEXT;

    check_name := 'supervisor';
    ok := EXISTS (SELECT 1 FROM pg_stat_activity a
                  WHERE a.backend_type = 'ironwod supervisor' AND a.datname = current_database());
    message := CASE WHEN ok THEN 'the ironwod supervisor is running'
                    WHEN EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.backend_type = 'ironwod launcher')
                    THEN 'the ironwod launcher runs, but no supervisor serves this database'
                    ELSE 'no ironwod launcher or supervisor is running' END;
    hint := CASE WHEN NOT ok THEN 'Look for ironwod messages in the server log; the launcher says why it does not start the supervisor (a missing database, no free worker slot).' END;
    RETURN NEXT;

    check_name := 'version';
    SELECT e.extversion INTO v_ext FROM pg_extension e WHERE e.extname = 'ironwod';
    ok := v_ext = ironwod.library_version();
    message := CASE WHEN ok THEN format('the extension and the loaded library are both version %s', v_ext)
                    WHEN ironwod.library_drives(v_ext)
                    THEN format('the extension is at version %s and the loaded library at %s, which still drives it', v_ext, ironwod.library_version())
                    ELSE format('the extension is at version %s, which the loaded library (version %s) does not drive, so no run starts', v_ext, ironwod.library_version()) END;
    hint := CASE WHEN NOT ok THEN format('Run ALTER EXTENSION ironwod UPDATE in this database, or install the ironwod package of version %s and restart the server.', v_ext) END;
    RETURN NEXT;

    -- launcher + supervisor + run workers (+ pg_cron's launcher); validate workers are brief
    v_need := 2 + current_setting('ironwod.max_workers')::integer
              + CASE WHEN current_setting('shared_preload_libraries') ~ '(^|[\s,])"?pg_cron"?($|[\s,])' THEN 1 ELSE 0 END;
    check_name := 'worker_slots';
    ok := v_have >= v_need;
    message := format('max_worker_processes is %s; ironwod with ironwod.max_workers = %s needs %s', v_have,
                      current_setting('ironwod.max_workers'), v_need);
    hint := CASE WHEN NOT ok THEN format('Raise max_worker_processes to at least %s (more for parallel query) and restart; see the README''s worker budget.', v_need + 1) END;
    RETURN NEXT;

    check_name := 'worker_role';
    SELECT r.rolname, r.rolsuper, r.rolcanlogin, a.rolpassword IS NOT NULL AS has_password INTO v
    FROM pg_roles r JOIN pg_authid a ON a.oid = r.oid WHERE r.rolname = v_role;
    ok := FOUND AND NOT v.rolsuper AND v.rolcanlogin AND NOT v.has_password;
    message := CASE WHEN NOT FOUND THEN format('ironwod.worker_role "%s" does not exist', v_role)
                    WHEN v.rolsuper THEN format('ironwod.worker_role "%s" is a superuser, so row-level security would not bind the workers', v_role)
                    WHEN NOT v.rolcanlogin THEN format('ironwod.worker_role "%s" cannot log in; background workers need LOGIN on PostgreSQL 15', v_role)
                    WHEN v.has_password THEN format('ironwod.worker_role "%s" has a password, so anyone who knows it can log in as the workers', v_role)
                    ELSE format('the run workers connect as "%s", a non-superuser bound by row-level security', v_role) END;
    hint := CASE WHEN NOT FOUND THEN 'Point ironwod.worker_role at ironwod_worker (created by the extension), or create the role.'
                 WHEN v.rolsuper THEN format('ALTER ROLE %I NOSUPERUSER, or point ironwod.worker_role at ironwod_worker.', v_role)
                 WHEN NOT v.rolcanlogin THEN format('ALTER ROLE %I LOGIN (and reject it in pg_hba.conf).', v_role)
                 WHEN v.has_password THEN format('ALTER ROLE %I PASSWORD NULL; the workers need none.', v_role) END;
    RETURN NEXT;

    check_name := 'worker_pg_hba';
    SELECT string_agg(format('line %s admits it over %s (%s%s)', p.line_number,
                             CASE p.channel WHEN 'local' THEN 'the Unix socket' ELSE 'TCP' END, p.auth_method,
                             coalesce(' from ' || p.address, '')), '; ' ORDER BY p.line_number)
    INTO v_bad FROM ironwod.worker_hba_problems(v_role, current_database()) p;
    IF v_bad IS NULL THEN
        SELECT string_agg(format('line %s: %s', h.line_number, h.error), '; ') INTO v_bad
        FROM pg_hba_file_rules h WHERE h.error IS NOT NULL;
        ok := v_bad IS NULL;
        message := coalesce('pg_hba.conf has errors: ' || v_bad,
                            format('pg_hba.conf rejects "%s" before any rule could let it log in', v_role));
        hint := CASE WHEN NOT ok THEN 'Fix those lines; the server keeps the previous pg_hba.conf until the file loads.' END;
    ELSE
        ok := false;
        message := format('pg_hba.conf admits "%s", as whom only background workers (which skip pg_hba.conf) should connect, before any line rejects it: %s', v_role, v_bad);
        hint := format('Put "local all %1$s reject" and "host all %1$s all reject" in pg_hba.conf above every other line that could match (Debian''s own lines included), then SELECT pg_reload_conf().', v_role);
    END IF;
    RETURN NEXT;

    check_name := 'base_url';
    ok := v_url ~* '^https://' OR (v_url ~* '^http://' AND current_setting('ironwod.allow_http')::boolean);
    message := format('ironwod.base_url is %s', v_url);
    hint := CASE WHEN NOT ok THEN 'Use an https:// URL (plain http:// only with ironwod.allow_http = on, for tests).' END;
    RETURN NEXT;

    check_name := 'master_key';
    ok := EXISTS (SELECT 1 FROM ironwod.master_keys k WHERE k.is_active);
    message := CASE WHEN ok THEN (SELECT format('API keys are sealed to master key "%s"', k.key_id)
                                  FROM ironwod.master_keys k WHERE k.is_active ORDER BY k.created_at DESC LIMIT 1)
                    ELSE 'no master key is registered, so no API key can be sealed' END;
    hint := CASE WHEN NOT ok THEN 'Register the public half: SELECT ironwod.register_master_key(''<key id>'', decode(''<64 hex>'', ''hex'')); see the README.' END;
    RETURN NEXT;

    check_name := 'master_key_command';
    SELECT * INTO v FROM ironwod.key_command_access();
    ok := v.ok;
    message := v.message;
    hint := v.hint;
    RETURN NEXT;

    -- Running the command needs a validate worker; without a usable command file
    -- or a registered key there is nothing to learn from it.
    IF ok THEN
        check_name := 'master_key_output';
        SELECT * INTO v FROM ironwod.probe_master_key_command();
        ok := v.ok;
        message := v.message;
        hint := v.hint;
        RETURN NEXT;
    END IF;
END
$$;
COMMENT ON FUNCTION ironwod.check_config() IS 'Admin: configuration checks (database, supervisor, extension and library version, worker slots, worker role and pg_hba.conf, base URL, master key, master key command file and output), each with a message naming the cause and a hint naming the fix';

-- ---- the transform's id and date readers in C (src/wire.c) --------------------

CREATE OR REPLACE FUNCTION ironwod.j_date(p text) RETURNS date
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'ironwod_j_date';
CREATE OR REPLACE FUNCTION ironwod.j_id(p jsonb) RETURNS bigint
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'ironwod_j_id';

-- ---- program breakdowns: membership programs ---------------------------------

CREATE FUNCTION ironwod.j_ids(p jsonb, p_field text) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN jsonb_typeof(p) = 'array'
                THEN ARRAY(SELECT DISTINCT x.id
                           FROM (SELECT ironwod.j_id(e -> p_field) AS id FROM jsonb_array_elements(p) AS e) x
                           WHERE x.id IS NOT NULL ORDER BY x.id) END
$$;
COMMENT ON FUNCTION ironwod.j_ids(jsonb, text) IS 'The ids in one field of the objects of a JSON array (a membership''s programs[].program_id), sorted and distinct, sentinels left out; NULL when the value is not an array (the field is absent)';
REVOKE ALL ON FUNCTION ironwod.j_ids(jsonb, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ironwod.j_ids(jsonb, text) TO ironwod_worker;

ALTER TABLE ironwod.memberships ADD COLUMN program_ids bigint[];
COMMENT ON COLUMN ironwod.memberships.program_ids IS 'The Wodify program ids the membership gives access to (its programs field, wodify-api.md §11), sorted and distinct; NULL when the record has no programs field (programs unknown), empty when it grants none';

-- The mapping, and a change of programs recomputes the membership's months from
-- its start.  An administrator's edit of the memberships map row is kept (it
-- differs from its installed_definition); the new rows become install-time rows.
INSERT INTO ironwod.canonical_columns (entity, ord, column_name, expr)
VALUES ('memberships', 17, 'program_ids', $$ironwod.j_ids(p -> 'programs', 'program_id')$$);
UPDATE ironwod.canonical_maps m
   SET dirty_from = $$CASE WHEN o.membership_id IS NULL
                 OR (o.member_id, o.start_date, o.price, o.membership_type, o.is_deleted, o.location_id,
                     o.billing_period_length, o.billing_period_unit, o.program_ids)
                    IS DISTINCT FROM
                    (u.member_id, u.start_date, u.price, u.membership_type, u.is_deleted, u.location_id,
                     u.billing_period_length, u.billing_period_unit, u.program_ids)
            THEN least(o.start_date, u.start_date)
            ELSE least(o.end_date + 1, u.end_date + 1, o.cancellation_requested_on, u.cancellation_requested_on)
       END$$,
       installed_definition = NULL
 WHERE m.entity = 'memberships' AND (to_jsonb(m) - 'installed_definition') = m.installed_definition;
SELECT ironwod.track_install_rows('ironwod.canonical_maps');
SELECT ironwod.track_install_rows('ironwod.canonical_columns');

-- The memberships 1.0 transformed: program_ids from the raw version each row was
-- built from (the superuser running the update is not bound by row-level security).
UPDATE ironwod.memberships m
   SET program_ids = ironwod.j_ids(r.payload_json -> 'programs', 'program_id')
  FROM ironwod.wodify_raw_memberships r
 WHERE r.tenant_id = m.tenant_id AND r.gym_id = m.gym_id AND r.raw_id = m.raw_id
   AND jsonb_typeof(r.payload_json -> 'programs') = 'array';

-- reconcile_deletions reads the vanished records and the records the run saw
-- first and joins them as arrays with the latest versions (on Citus, the
-- correlated subqueries next to latest_raw_versions() were refused: every
-- reconciliation failed).
CREATE OR REPLACE FUNCTION ironwod.reconcile_deletions(p_run_id bigint, e ironwod.entities)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_pred text;
    v_from timestamptz;
    v_vanished bigint[];
    v_seen_ids bigint[];
    v_before bigint;
    v_seen bigint;
    v_deleted bigint;
BEGIN
    SELECT greatest(ironwod.backfill_since(), coalesce(r.started_at, now()) - make_interval(days => c.sync_window_days))
    INTO STRICT v_from
    FROM ironwod.sync_runs r
    JOIN ironwod.integrations_wodify_connection c ON c.tenant_id = r.tenant_id AND c.gym_id = r.gym_id
    WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id = p_run_id;

    v_pred := CASE
        WHEN e.backfill_strategy = 'full' THEN 'true'
        WHEN e.due_field IS NOT NULL THEN
            format('(payload_json ->> %L) ~ ''^\d{4}-\d\d-\d\d'' AND (payload_json ->> %L)::date >= %L::date',
                   e.due_field, e.due_field, (v_from AT TIME ZONE 'UTC')::date)
        ELSE format('ironwod.parse_ts(payload_json ->> %L) >= %L::timestamptz', e.window_field, v_from)
    END;

    -- The records already vanished and those this run saw, read first (each one
    -- statement on the gym's shard), then joined as arrays with the latest
    -- versions: on Citus a correlated subquery over a distributed table next to
    -- a set-returning function is refused (0A000), and an outer join from a
    -- function to a distributed table is planned as a subquery (see
    -- plan_entity).  Hash joins, linear in the gym's records.
    SELECT coalesce(array_agg(v.wodify_id), '{}') INTO v_vanished
    FROM ironwod.vanished_records v
    WHERE v.tenant_id = v_t AND v.gym_id = v_g AND v.entity = e.entity;
    EXECUTE format('SELECT coalesce(array_agg(DISTINCT r.wodify_id), ''{}'') FROM ironwod.%I r
                    WHERE r.tenant_id = $1 AND r.gym_id = $2 AND r.last_seen_run_id = $3', e.raw_table)
    INTO v_seen_ids USING v_t, v_g, p_run_id;
    v_seen := cardinality(v_seen_ids);

    -- v_pred reads payload_json of the record's latest version.
    EXECUTE format($q$
        SELECT count(*)
        FROM ironwod.latest_raw_versions($1, $2, $3) l
        LEFT JOIN unnest($4::bigint[]) AS v(wodify_id) ON v.wodify_id = l.wodify_id
        WHERE v.wodify_id IS NULL AND %s$q$, v_pred)
    INTO v_before USING e.entity, v_t, v_g, v_vanished;

    IF v_seen < v_before * current_setting('ironwod.reconcile_sanity_share')::numeric THEN
        PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.reconcile.deletes_skipped', e.entity,
            jsonb_build_object('seen', v_seen, 'previously', v_before));
        RETURN;
    END IF;

    -- Vanished: inside the window, and no version of it seen by this run.
    EXECUTE format($q$
        INSERT INTO ironwod.vanished_records (tenant_id, gym_id, entity, wodify_id, vanished_by_run)
        SELECT $2, $3, $1, l.wodify_id, $5
        FROM ironwod.latest_raw_versions($1, $2, $3) l
        LEFT JOIN unnest($4::bigint[]) AS s(wodify_id) ON s.wodify_id = l.wodify_id
        WHERE s.wodify_id IS NULL AND %s
        ON CONFLICT DO NOTHING$q$, v_pred)
    USING e.entity, v_t, v_g, v_seen_ids, p_run_id;
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    UPDATE ironwod.sync_run_entities s SET deleted = v_deleted
     WHERE s.tenant_id = v_t AND s.gym_id = v_g
       AND s.run_id = p_run_id AND s.entity = e.entity;
END
$$;
COMMENT ON FUNCTION ironwod.reconcile_deletions(bigint, ironwod.entities) IS 'Worker: soft-delete records that vanished from a complete reconciliation window';

-- ironwod_tick joins each gym's latest run instead of probing with a correlated
-- NOT EXISTS (on Citus, refused next to a CTE: the tick queued nothing).
CREATE OR REPLACE FUNCTION @extschema@.ironwod_tick()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_queued integer;
BEGIN
    PERFORM ironwod.preloaded();
    WITH candidates AS (
        SELECT c.tenant_id, c.gym_id, c.backfill_completed_at, c.reconcile_weekday,
               coalesce(c.time_zone, 'UTC') AS tz,
               c.nightly_local_time
               + make_interval(secs => ((hashtext(c.gym_id::text) & 2147483647) % 3600)) AS local_slot_time
        FROM ironwod.integrations_wodify_connection c
        WHERE c.api_key_ciphertext IS NOT NULL
          AND (c.status = 'connected' OR (c.status = 'error' AND c.next_retry_at IS NOT NULL))
          AND coalesce(c.next_retry_at, '-infinity') <= now()
    ), slots AS (
        SELECT k.*, s.slot
        FROM candidates k,
             LATERAL (SELECT (((now() AT TIME ZONE k.tz)::date + k.local_slot_time) AT TIME ZONE k.tz) AS today_slot) t,
             LATERAL (SELECT CASE WHEN t.today_slot > now() THEN t.today_slot - interval '1 day'
                                  ELSE t.today_slot END AS slot) s
    ), latest AS (
        -- Each gym's latest run that counts, joined below rather than probed by a
        -- correlated NOT EXISTS: Citus plans no correlated subquery over a
        -- distributed table next to a CTE (0A000); grouped by tenant, this one
        -- runs on every shard at once.  A slot is at most a day old, so older
        -- runs never decide anything.
        SELECT r.tenant_id, r.gym_id, max(r.requested_at) AS requested_at
        FROM ironwod.sync_runs r
        WHERE r.mode <> 'validate' AND r.status NOT IN ('failed', 'cancelled')
          AND r.requested_at >= now() - interval '2 days'
        GROUP BY r.tenant_id, r.gym_id
    ), due AS (
        SELECT s.tenant_id, s.gym_id,
               CASE WHEN s.backfill_completed_at IS NULL THEN 'backfill'
                    WHEN extract(dow FROM s.slot AT TIME ZONE s.tz) = s.reconcile_weekday THEN 'reconcile'
                    ELSE 'incremental' END AS mode
        FROM slots s
        LEFT JOIN latest l ON l.tenant_id = s.tenant_id AND l.gym_id = s.gym_id
        WHERE s.backfill_completed_at IS NULL OR l.requested_at IS NULL OR l.requested_at < s.slot
    )
    INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, requested_by)
    SELECT d.tenant_id, d.gym_id, d.mode, 'ironwod_tick' FROM due d
    ON CONFLICT (tenant_id, gym_id) WHERE status IN ('queued', 'running') DO NOTHING;
    GET DIAGNOSTICS v_queued = ROW_COUNT;
    IF v_queued > 0 THEN
        PERFORM ironwod.wake();
    END IF;
    RETURN v_queued;
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_tick() IS 'Queue due work for every gym: nightly incremental, weekly reconciliation, breaker retries, unfinished backfills';

-- The statements that land a page's records in an entity's raw table, one array
-- per column; the worker prepares both once per run.  $1 tenant, $2 gym
-- (parameters, so a distributed table routes to one shard), $3 run, $4 the
-- landing transaction's time, $5..$8 ids, payloads, payload hashes,
-- source_updated_at.
-- The arrays are unnested in the select list, side by side (they are equally
-- long): a set-returning function in FROM would first copy every payload into
-- a tuplestore.
--   p_upsert false: a plain INSERT, for pages of versions never seen before
--                   (a backfill); every row it returns is a new version, so
--                   the worker counts them as they come (no CTE, no count).
--                   RETURNING stays for Citus: an INSERT ... SELECT without it
--                   or ON CONFLICT is COPYed into the shard, which row-level
--                   security refuses.  A version already stored fails it with
--                   a unique violation, and the page is landed again with
--   p_upsert true:  INSERT ... ON CONFLICT, where a version seen again only
--                   bumps last_seen_run_id (twice the cost of the plain one);
--                   it returns the number of new versions.
CREATE OR REPLACE FUNCTION ironwod.landing_statement(p_entity text, p_upsert boolean) RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_insert text := format($s$
            INSERT INTO ironwod.%I AS t
                (tenant_id, gym_id, wodify_id, payload_json, payload_hash, source_updated_at,
                 ingest_run_id, last_seen_run_id, ingested_at, last_seen_at)
            SELECT $1, $2, unnest($5::bigint[]), unnest($6::jsonb[]), unnest($7::bytea[]),
                   unnest($8::timestamptz[]), $3, $3, $4, $4$s$,
        (SELECT e.raw_table FROM ironwod.entities e WHERE e.entity = p_entity));
BEGIN
    IF NOT p_upsert THEN
        RETURN v_insert || ' RETURNING 1';
    END IF;
    RETURN format($s$
        WITH ins AS (%s
            ON CONFLICT (tenant_id, gym_id, wodify_id, payload_hash)
            DO UPDATE SET last_seen_run_id = excluded.last_seen_run_id, last_seen_at = excluded.last_seen_at
            RETURNING (xmax = 0) AS inserted)
        SELECT (count(*) FILTER (WHERE inserted))::integer FROM ins$s$, v_insert);
END
$$;
COMMENT ON FUNCTION ironwod.landing_statement(text, boolean) IS 'Worker: the prepared statements that land a page''s records in an entity''s raw table (plain insert, or upsert)';

-- Transforms whose plans do not depend on estimates (issue 7): the raw versions
-- of a run's records read by "= ANY" of their Wodify ids, not a join with
-- unnest (a nested loop over it, planned on a one-row estimate for a gym the
-- statistics predate, was quadratic); the stored rows read by key, a written row
-- paired with the row it replaced by a sort, not a join; the run worker's
-- ANALYZE of a raw table at statistics target 10, so its sample of payloads
-- stays under 10 MB of the worker's memory; a run's records transformed in
-- batches of 10,000 keys, so no plan holds a large "= ANY" array (one over a
-- large gym's 190,000 sign-ins held 110 MB).
CREATE OR REPLACE FUNCTION ironwod.latest_raw_versions(p_entity text, p_tenant_id uuid, p_gym_id uuid,
                                            p_ids bigint[] DEFAULT NULL, p_payload boolean DEFAULT true)
RETURNS TABLE (wodify_id bigint, raw_id bigint, payload_hash bytea, payload_json jsonb,
               ingest_run_id bigint, last_seen_run_id bigint)
LANGUAGE plpgsql STABLE
SET enable_sort = off
AS $$
DECLARE
    v_lo bigint;
    v_hi bigint;
BEGIN
    -- Read in the order of the raw table's unique (wodify_id, payload_hash)
    -- index, each record's few versions put in version order by an incremental
    -- sort: linear in the rows whatever the estimates.  The sort is the
    -- subquery's ORDER BY because PostgreSQL 15 plans DISTINCT over a full sort
    -- only; without enable_sort = off, on statistics that predate the gym, the
    -- planner may sort the whole gym's versions (payloads included) instead.
    -- "= ANY", not a join with unnest($3): index probes for a few ids, one scan
    -- for a whole backfill's, linear either way.  A join is planned on the raw
    -- table's estimate for the gym, which is one row while its statistics predate
    -- the gym, and a nested loop over the unnest on that estimate is quadratic.
    -- The ids' range bounds the scan too (the transform asks in batches of ids).
    IF p_ids IS NOT NULL THEN
        SELECT min(i), max(i) INTO v_lo, v_hi FROM unnest(p_ids) AS i;
    END IF;
    RETURN QUERY EXECUTE format(
        'SELECT DISTINCT ON (v.wodify_id) v.wodify_id, v.raw_id, v.payload_hash, v.payload_json,
                v.ingest_run_id, v.last_seen_run_id
         FROM (SELECT r.wodify_id, r.raw_id, r.payload_hash, %s AS payload_json, r.ingest_run_id,
                      r.last_seen_run_id, r.source_updated_at
               FROM ironwod.%I r
               WHERE r.tenant_id = $1 AND r.gym_id = $2 %s
               ORDER BY r.wodify_id, r.source_updated_at DESC NULLS LAST, r.raw_id DESC) v
         ORDER BY v.wodify_id, v.source_updated_at DESC NULLS LAST, v.raw_id DESC',
        CASE WHEN p_payload THEN 'r.payload_json' ELSE 'NULL::jsonb' END,
        (SELECT e.raw_table FROM ironwod.entities e WHERE e.entity = p_entity),
        CASE WHEN p_ids IS NOT NULL THEN 'AND r.wodify_id = ANY ($3) AND r.wodify_id BETWEEN $4 AND $5' ELSE '' END)
    USING p_tenant_id, p_gym_id, p_ids, v_lo, v_hi;
END
$$;

-- transform_sql gained p_upsert (a plain INSERT for records without a canonical row)
-- and p_gym (every latest version of a gym without canonical rows, no list of ids).
DROP FUNCTION ironwod.transform_sql(text, boolean);
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
REVOKE ALL ON FUNCTION ironwod.transform_sql(text, boolean, boolean, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ironwod.transform_sql(text, boolean, boolean, boolean) TO ironwod_worker;

CREATE OR REPLACE FUNCTION ironwod.analyze_if_stale(p_table name, p_changed bigint DEFAULT 0)
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

-- The nightly refresh narrowed to the people who changed (issue 7, metrics.md
-- §5.4): metric_dirty records the people on the canonical rows a run changed;
-- compute_metrics recomputes the months before the one the last refresh computed
-- to date only for them, for everyone whose spells or spans changed, and for
-- those billed on their memberships.  The stages take the first month to
-- recompute for everyone and the people.
ALTER TABLE ironwod.metric_dirty ADD COLUMN member_ids bigint[];
COMMENT ON TABLE ironwod.metric_dirty IS 'Per run and entity: the earliest civil date a canonical change touched and the people on the changed rows (the inputs of the recompute policy, metrics.md §5.4)';
DROP FUNCTION ironwod.note_dirty(uuid, uuid, bigint, text, date, integer);
DROP FUNCTION ironwod.compute_metrics(date);
DROP FUNCTION ironwod.metrics_visits(uuid, uuid, ironwod.metric_settings, text, date, date, date);
DROP FUNCTION ironwod.metrics_month_facts(uuid, uuid, ironwod.metric_settings, text[], date, date, date);
DROP FUNCTION ironwod.metrics_month_flags(uuid, uuid, date, date);
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
-- The soft-deleted rows of a gym, which every run looks at, by index (74_vanished).
DO $idx$
DECLARE
    t name;
BEGIN
    FOR t IN SELECT canonical FROM ironwod.canonical_maps ORDER BY canonical LOOP
        EXECUTE format('CREATE INDEX %I ON ironwod.%I (tenant_id, gym_id) WHERE deleted_by_run IS NOT NULL',
                       t || '_soft_deleted', t);
    END LOOP;
END
$idx$;
CREATE OR REPLACE FUNCTION ironwod.apply_vanished(p_run_id bigint)
RETURNS jsonb
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    m record;
    v_tz text := ironwod.gym_time_zone(v_t, v_g);
    v_changed integer;
    v_dirty date;
    v_people bigint[];
    v_cand bigint[];
    v_seen_ids bigint[];
    v_seen_runs bigint[];
    v_out jsonb := '{}';
BEGIN
    -- the SET clause on the Citus nodes too, which plan every statement below
    PERFORM ironwod.forward_set_clauses('ironwod.apply_vanished(bigint)', true);
    FOR m IN SELECT x.* FROM ironwod.canonical_maps x JOIN ironwod.entities e USING (entity) ORDER BY e.ordinal LOOP
        -- Soft-deleted rows that may be back: their latest version, when not deleted by Wodify itself.
        EXECUTE format('SELECT array_agg(c.%2$I) FROM ironwod.%1$I c
                        WHERE c.tenant_id = $1 AND c.gym_id = $2 AND c.deleted_by_run IS NOT NULL',
                       m.canonical, m.key_column)
        INTO v_cand USING v_t, v_g;
        -- Nothing vanished and nothing to restore (every backfill, most runs):
        -- nothing to write, and no statement to plan and run.
        IF v_cand IS NULL AND NOT EXISTS (SELECT 1 FROM ironwod.vanished_records v
                                          WHERE v.tenant_id = v_t AND v.gym_id = v_g AND v.entity = m.entity) THEN
            CONTINUE;
        END IF;
        v_seen_ids := NULL;
        v_seen_runs := NULL;
        IF v_cand IS NOT NULL THEN
            SELECT array_agg(l.wodify_id), array_agg(l.last_seen_run_id) INTO v_seen_ids, v_seen_runs
            FROM ironwod.latest_raw_versions(m.entity, v_t, v_g, v_cand) l
            WHERE coalesce((l.payload_json ->> 'is_deleted')::boolean, false) = false;
        END IF;
        EXECUTE format($q$
            WITH gone AS (
                UPDATE ironwod.%1$I c
                   SET deleted_at = v.vanished_at, deleted_by_run = v.vanished_by_run
                  FROM ironwod.vanished_records v
                 WHERE c.tenant_id = $1 AND c.gym_id = $2
                   AND v.tenant_id = $1 AND v.gym_id = $2 AND v.entity = $4
                   AND v.wodify_id = c.%2$I AND c.deleted_at IS NULL
                RETURNING c.*
            ), back AS (
                -- Seen again after it vanished.
                UPDATE ironwod.%1$I c
                   SET deleted_at = NULL, deleted_by_run = NULL
                  FROM unnest($5::bigint[], $6::bigint[]) AS l(wodify_id, last_seen_run_id)
                 WHERE c.tenant_id = $1 AND c.gym_id = $2
                   AND l.wodify_id = c.%2$I AND c.deleted_by_run IS NOT NULL
                   AND l.last_seen_run_id > c.deleted_by_run
                   AND NOT EXISTS (SELECT 1 FROM ironwod.vanished_records v
                                   WHERE v.tenant_id = $1 AND v.gym_id = $2
                                     AND v.entity = $4 AND v.wodify_id = c.%2$I)
                RETURNING c.*
            )
            SELECT (SELECT count(*) FROM gone)::integer + (SELECT count(*) FROM back)::integer,
                   (SELECT min(%3$s) FROM (SELECT * FROM gone UNION ALL SELECT * FROM back) c),
                   %4$s$q$,
            m.canonical, m.key_column, coalesce(m.row_day, 'NULL::date'),
            -- the people on the rows (NULL when the table names none: everyone)
            CASE WHEN m.key_column <> 'member_id' AND EXISTS (
                     SELECT 1 FROM pg_attribute a
                     WHERE a.attrelid = ('ironwod.' || quote_ident(m.canonical))::regclass
                       AND a.attname = 'member_id' AND a.attnum > 0 AND NOT a.attisdropped)
                 THEN '(SELECT array_remove(array_agg(DISTINCT c.member_id), NULL)
                        FROM (SELECT * FROM gone UNION ALL SELECT * FROM back) c)'
                 ELSE 'NULL::bigint[]' END)
        INTO v_changed, v_dirty, v_people USING v_t, v_g, v_tz, m.entity, v_seen_ids, v_seen_runs;
        IF v_changed > 0 THEN
            PERFORM ironwod.note_dirty(v_t, v_g, p_run_id, m.entity, v_dirty, v_changed, v_people);
            v_out := v_out || jsonb_build_object(m.entity, v_changed);
        END IF;
    END LOOP;
    PERFORM ironwod.forward_set_clauses('ironwod.apply_vanished(bigint)', false);
    RETURN v_out;
END
$$;

-- ---- program breakdowns: program rows in the metrics ---------------------------

-- A new program, or one deleted or back, recomputes every month.
UPDATE ironwod.canonical_maps m
   SET dirty_from = $$CASE WHEN o.program_id IS NULL OR o.deleted_at IS DISTINCT FROM u.deleted_at THEN date '0001-01-01' END$$,
       installed_definition = NULL
 WHERE m.entity = 'programs' AND (to_jsonb(m) - 'installed_definition') = m.installed_definition;
SELECT ironwod.track_install_rows('ironwod.canonical_maps');

-- A location or program that a reconciliation soft-deletes or restores recomputes
-- every month too (1.0 noted nothing: its stale cache rows stayed until a full
-- recompute).
UPDATE ironwod.canonical_maps m
   SET row_day = $$date '0001-01-01'$$,
       installed_definition = NULL
 WHERE m.entity IN ('locations', 'programs') AND (to_jsonb(m) - 'installed_definition') = m.installed_definition;
SELECT ironwod.track_install_rows('ironwod.canonical_maps');

ALTER TABLE ironwod.metric_settings ALTER COLUMN definitions_version SET DEFAULT 'metrics-v1.1';
UPDATE ironwod.metric_settings SET definitions_version = 'metrics-v1.1' WHERE definitions_version = 'metrics-v1.0';
COMMENT ON TABLE ironwod.gym_monthly_metrics_cache IS 'Monthly gym metrics (metrics.md §5.2, v1 scope): per location and ALL (distinct people) with program_key ALL, and per program (program_key = Wodify program id) at location ALL (people with access to it, visits to its classes; NULL where the memberships do not say their programs, money NULL where it cannot be split); flows are NULL in the history-start month; retail_revenue_net is omitted in v1 (no revenue categories)';

CREATE OR REPLACE VIEW ironwod.metric_memberships WITH (security_invoker = true) AS
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

CREATE OR REPLACE FUNCTION ironwod.metrics_visits(p_tenant uuid, p_gym uuid, p_s ironwod.metric_settings, p_tz text,
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

CREATE OR REPLACE FUNCTION ironwod.metrics_month_money(p_tenant uuid, p_gym uuid, p_s ironwod.metric_settings, p_tz text,
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

CREATE OR REPLACE FUNCTION ironwod.metrics_cache_rows(p_tenant uuid, p_gym uuid, p_s ironwod.metric_settings, p_tz text,
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

CREATE OR REPLACE FUNCTION ironwod.refresh_metrics(p_run_id bigint)
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
-- The refresh stages with their new signatures (narrowed refresh) are the worker's.
-- (compute_metrics(date, bigint[]) is granted after its definition, below.)
GRANT EXECUTE ON FUNCTION ironwod.note_dirty(uuid, uuid, bigint, text, date, integer, bigint[]),
    ironwod.metrics_visits(uuid, uuid, ironwod.metric_settings, text, date, date, date, date, bigint[]),
    ironwod.metrics_month_facts(uuid, uuid, ironwod.metric_settings, text[], date, date, date, date, bigint[]),
    ironwod.metrics_month_flags(uuid, uuid, date, date, date, bigint[]),
    ironwod.metrics_person_hashes(uuid, uuid, date)
    TO ironwod_worker;
REVOKE ALL ON FUNCTION ironwod.note_dirty(uuid, uuid, bigint, text, date, integer, bigint[]),
    ironwod.metrics_visits(uuid, uuid, ironwod.metric_settings, text, date, date, date, date, bigint[]),
    ironwod.metrics_month_facts(uuid, uuid, ironwod.metric_settings, text[], date, date, date, date, bigint[]),
    ironwod.metrics_month_flags(uuid, uuid, date, date, date, bigint[]),
    ironwod.metrics_person_hashes(uuid, uuid, date)
    FROM PUBLIC;

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

CREATE OR REPLACE FUNCTION ironwod.mask_unknown_metrics()
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


REVOKE ALL ON FUNCTION ironwod.program_knowledge(uuid, uuid), ironwod.program_revenue_metrics() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ironwod.program_knowledge(uuid, uuid), ironwod.program_revenue_metrics() TO ironwod_worker;

-- The read API takes a program: the 1.0 signatures go, calls with their
-- arguments resolve to the new ones through the default.
DROP FUNCTION @extschema@.ironwod_dashboard(uuid, uuid, date, date, text);
DROP FUNCTION @extschema@.ironwod_explain(uuid, uuid, date, text, text);

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


REVOKE ALL ON FUNCTION @extschema@.ironwod_dashboard(uuid, uuid, date, date, text, text),
    @extschema@.ironwod_explain(uuid, uuid, date, text, text, text), ironwod.assert_program_key(uuid, uuid, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.ironwod_dashboard(uuid, uuid, date, date, text, text),
    @extschema@.ironwod_explain(uuid, uuid, date, text, text, text)
    TO ironwod_app, ironwod_admin;

-- The stage tables' location_key also holds program:<id> since program rows.
COMMENT ON COLUMN ironwod.member_spell.location_key IS 'The key of the row''s figures: ALL (gym-wide), a Wodify location id, or program:<id> for a Wodify program (metrics.md §2.5; the cache splits it into location_key and program_key)';
COMMENT ON COLUMN ironwod.member_month_fact.location_key IS 'The key of the row''s figures: ALL (gym-wide), a Wodify location id, or program:<id> for a Wodify program (metrics.md §2.5; the cache splits it into location_key and program_key)';
COMMENT ON COLUMN ironwod.member_state_span.location_key IS 'The key of the row''s figures: ALL (gym-wide), a Wodify location id, or program:<id> for a Wodify program (metrics.md §2.5; the cache splits it into location_key and program_key)';
COMMENT ON COLUMN ironwod.member_visit_month.location_key IS 'The key of the row''s figures: ALL (gym-wide), a Wodify location id, or program:<id> for a Wodify program (metrics.md §2.5; the cache splits it into location_key and program_key)';
COMMENT ON COLUMN ironwod.gym_month_money.location_key IS 'The key of the row''s figures: ALL (gym-wide), a Wodify location id, or program:<id> for a Wodify program (metrics.md §2.5; the cache splits it into location_key and program_key)';

-- ironwod_disconnect emits wodify.disconnected through emit_event, so listeners
-- of ironwod_events hear it (1.0 only inserted the row).
CREATE OR REPLACE FUNCTION @extschema@.ironwod_disconnect(p_tenant_id uuid, p_gym_id uuid)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- Citus refuses volatile functions in an UPDATE of a distributed table.
    v_now timestamptz := clock_timestamp();
    v_run bigint;
BEGIN
    PERFORM ironwod.assert_connection(p_tenant_id, p_gym_id);
    UPDATE ironwod.integrations_wodify_connection c
       SET status = 'disconnected', api_key_ciphertext = NULL, master_key_id = NULL,
           next_api_key_ciphertext = NULL, next_master_key_id = NULL, next_api_key_fingerprint = NULL,
           updated_at = now()
     WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id;
    UPDATE ironwod.sync_runs r
       SET status = 'cancelled', finished_at = v_now, last_error = 'disconnected', phase = NULL
     WHERE r.tenant_id = p_tenant_id AND r.gym_id = p_gym_id AND r.status IN ('queued', 'running')
    RETURNING r.run_id INTO v_run;
    IF v_run IS NOT NULL THEN
        PERFORM ironwod.log_run(p_tenant_id, p_gym_id, v_run);
    END IF;
    -- recorded and notified like every other event (the scope is the gym's)
    PERFORM ironwod.emit_event(NULL, 'wodify.disconnected', NULL, jsonb_build_object('cancelled_run', v_run));
    PERFORM ironwod.wake();
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_disconnect(uuid, uuid) IS 'Disconnect a gym: cancel queued and running runs, destroy the sealed key, and emit event wodify.disconnected (NOTIFY ironwod_events)';

-- ironwod.payload_hash(entity, payload) works on Citus over a tenant table's rows
-- too: it reads the registry, a reference table, on the shard's node, where Citus
-- allows that only with citus.allow_nested_distributed_execution (see 40_landing).
ALTER FUNCTION ironwod.payload_hash(text, jsonb) SET citus.allow_nested_distributed_execution = on;

-- ironwod.run_progress reads each table in a MATERIALIZED CTE of its own and
-- outer-joins only those (on Citus, an app or admin reading the view crashed the
-- coordinator: Citus 12.1's planner, planning the outer joins over the
-- distributed tables under row-level security, next to the entities reference
-- table).
CREATE OR REPLACE VIEW ironwod.run_progress WITH (security_invoker = true) AS
WITH active AS MATERIALIZED (
    SELECT r.tenant_id, r.gym_id, r.run_id, r.mode, r.status, r.phase, r.requested_at, r.started_at,
           r.heartbeat_at, r.requests
    FROM ironwod.sync_runs r
    WHERE r.status IN ('queued', 'running')
), run_entities AS MATERIALIZED (
    SELECT s.tenant_id, s.gym_id, s.run_id, s.entity, s.status, s.units_total, s.units_done, s.units_skipped,
           s.pulled, s.new_versions, s.pages
    FROM ironwod.sync_run_entities s
    JOIN active a ON a.tenant_id = s.tenant_id AND a.gym_id = s.gym_id AND a.run_id = s.run_id
), registry AS MATERIALIZED (
    SELECT e.entity, e.ordinal, e.backfill_strategy, e.due_field
    FROM ironwod.entities e
    WHERE e.enabled
), entitlements AS MATERIALIZED (
    SELECT n.tenant_id, n.gym_id, n.entity, n.last_checked_run
    FROM ironwod.entity_entitlements n
    WHERE (n.tenant_id, n.gym_id) IN (SELECT a.tenant_id, a.gym_id FROM active a)
), previous AS MATERIALIZED (
    SELECT DISTINCT ON (a.run_id, p.entity) a.run_id, p.entity, p.units_total, p.units_done, p.pages
    FROM active a
    JOIN ironwod.sync_runs pr ON pr.tenant_id = a.tenant_id AND pr.gym_id = a.gym_id
                             AND pr.mode = a.mode AND pr.run_id < a.run_id
    JOIN ironwod.sync_run_entities p ON p.tenant_id = pr.tenant_id AND p.gym_id = pr.gym_id
                                    AND p.run_id = pr.run_id AND p.units_total IS NOT NULL
    ORDER BY a.run_id, p.entity, p.run_id DESC
), checkpointed AS MATERIALIZED (
    SELECT b.tenant_id, b.gym_id, b.entity, count(*) AS units
    FROM ironwod.backfill_checkpoints b
    JOIN active a ON a.tenant_id = b.tenant_id AND a.gym_id = b.gym_id AND a.mode = 'backfill'
    GROUP BY b.tenant_id, b.gym_id, b.entity
), per_entity AS (
    SELECT a.run_id, e.entity, e.ordinal, s.status AS entity_status,
           coalesce(s.units_done, 0) + coalesce(s.units_skipped, 0) AS units_done,
           s.units_total AS units_planned,
           coalesce(s.units_total,
                    prev.units_total,
                    CASE WHEN e.backfill_strategy = 'full' THEN 1
                         WHEN e.backfill_strategy = 'per_client' THEN cl.pulled
                         WHEN a.mode = 'backfill' THEN current_setting('ironwod.backfill_months')::int + 1
                         WHEN a.mode = 'incremental' AND e.due_field IS NOT NULL THEN 2
                         ELSE 1 END) AS units_expected,
           CASE WHEN s.units_total IS NULL THEN coalesce(ck.units, 0) ELSE 0 END AS units_checkpointed,
           coalesce(s.pulled, 0) AS pulled, coalesce(s.new_versions, 0) AS new_versions,
           coalesce(s.pages::float8 / nullif(s.units_done, 0), prev.pages::float8 / nullif(prev.units_done, 0), 1)
               AS pages_per_unit
    FROM active a
    CROSS JOIN registry e
    LEFT JOIN run_entities s
           ON s.tenant_id = a.tenant_id AND s.gym_id = a.gym_id AND s.run_id = a.run_id AND s.entity = e.entity
    LEFT JOIN run_entities cl
           ON cl.tenant_id = a.tenant_id AND cl.gym_id = a.gym_id AND cl.run_id = a.run_id AND cl.entity = 'clients'
          AND cl.status = 'completed'
    LEFT JOIN previous prev ON prev.run_id = a.run_id AND prev.entity = e.entity
    LEFT JOIN checkpointed ck ON ck.tenant_id = a.tenant_id AND ck.gym_id = a.gym_id AND ck.entity = e.entity
    -- Entities the run skips (not entitled), as an anti-join: Citus plans no
    -- correlated subquery over the materialized "active".
    LEFT JOIN entitlements n
           ON n.tenant_id = a.tenant_id AND n.gym_id = a.gym_id AND n.entity = e.entity
          AND (a.mode <> 'reconcile' OR n.last_checked_run = a.run_id)
    WHERE a.mode <> 'validate' AND n.entity IS NULL
), per_run AS (
    SELECT x.run_id,
           count(*) FILTER (WHERE x.entity_status = 'completed') AS entities_done,
           count(*) AS entities_total,
           (array_agg(x.entity ORDER BY x.ordinal) FILTER (WHERE x.entity_status IS DISTINCT FROM 'completed'))[1]
               AS current_entity,
           sum(x.units_done) AS units_done,
           -- NULL while an entity's size cannot be told yet (sign-ins before the clients)
           CASE WHEN bool_and(x.units_expected IS NOT NULL) THEN sum(x.units_expected) END AS units_total,
           bool_and(x.units_planned IS NOT NULL) AS fully_planned,
           sum(x.pulled) AS records_landed, sum(x.new_versions) AS new_versions,
           CASE WHEN bool_and(x.units_expected IS NOT NULL) THEN
               sum(CASE WHEN x.entity_status = 'completed' THEN 0
                        ELSE greatest(x.units_expected - x.units_checkpointed - x.units_done, 0) * x.pages_per_unit
                   END) END AS requests_remaining
    FROM per_entity x
    GROUP BY x.run_id
), paced AS (
    SELECT a.*, coalesce(p.entities_done, 0) AS entities_done, coalesce(p.entities_total, 0) AS entities_total,
           p.current_entity, coalesce(p.units_done, 0) AS units_done,
           CASE WHEN a.mode = 'validate' THEN 0 ELSE p.units_total END AS units_total,
           coalesce(p.fully_planned, true) AS fully_planned,
           coalesce(p.records_landed, 0) AS records_landed, coalesce(p.new_versions, 0) AS new_versions,
           CASE WHEN a.mode = 'validate' THEN greatest(1 - a.requests, 0) ELSE ceil(p.requests_remaining) END
               AS requests_remaining,
           least(ironwod.connection_rate(a.tenant_id, a.gym_id),
                 CASE WHEN a.requests >= 10 AND now() - a.started_at >= interval '1 second'
                      THEN a.requests / extract(epoch FROM now() - a.started_at)::float8 END) AS rate
    FROM active a
    LEFT JOIN per_run p ON p.run_id = a.run_id
)
SELECT x.tenant_id, x.gym_id, x.run_id, x.mode, x.status, x.phase, x.current_entity, x.requested_at,
       x.started_at, x.heartbeat_at, x.entities_done, x.entities_total, x.units_done, x.units_total,
       x.fully_planned, x.records_landed, x.new_versions, x.requests, x.requests_remaining::bigint,
       round(x.rate::numeric, 2) AS rate,
       make_interval(secs => round((x.requests_remaining / nullif(x.rate, 0))::numeric)::float8) AS eta,
       now() + make_interval(secs => (x.requests_remaining / nullif(x.rate, 0))::float8) AS eta_at
FROM paced x;
COMMENT ON VIEW ironwod.run_progress IS 'Queued and running runs: current entity, entities and units done of (expected) total, records landed, requests so far and remaining, request rate and ETA of the fetch';
-- The metrics refresh on Citus (issue 12): each stage statement runs on the
-- tenant's node as one statement.  The stages forward their planner settings to
-- the nodes with SET LOCAL (ironwod.stage_planner_settings; JIT off there too),
-- their INSERT ... SELECTs write tenant_id and gym_id from the gym's settings row
-- (so Citus runs them on the shard instead of pulling the rows through the
-- coordinator) with the CTEs inside the SELECT, and metric_config and
-- refresh_metrics compare tenant_id with values, not with scope_tenant() (which
-- made Citus read every shard).  See 80_metrics.
-- A function's planner settings on the Citus nodes too.  A function's SET
-- clauses apply to the session that runs it, here the coordinator's, but Citus
-- plans each statement it sends a node again there, with the node's settings,
-- which a SET clause never reaches: only a SET LOCAL statement does, which Citus
-- forwards to the nodes of the transaction while citus.propagate_set_commands is
-- 'local' (ironwod_set_scope and the run workers set it).  So a function whose
-- SET clauses fix a plan calls this with its own signature: with true first, to
-- SET LOCAL each setting of its SET clauses to the clause's value, and with
-- false last, after its last statement, to set them back to the defaults, on the
-- nodes for the rest of the transaction (here the function's SET clauses then
-- restore the caller's values when it returns).  The settings are the
-- planner's, single values.  Where nothing is forwarded (no Citus, or
-- propagation off) it does nothing, so one node runs exactly as without it.
CREATE FUNCTION ironwod.forward_set_clauses(p_fn regprocedure, p_on boolean)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    c text;
BEGIN
    IF current_setting('citus.propagate_set_commands', true) IS DISTINCT FROM 'local' THEN
        RETURN;
    END IF;
    FOR c IN SELECT x FROM pg_catalog.pg_proc p, unnest(p.proconfig) AS x WHERE p.oid = p_fn LOOP
        -- one statement per setting: Citus forwards each statement's whole text
        EXECUTE format('SET LOCAL %I = %s', split_part(c, '=', 1),
                       CASE WHEN p_on THEN quote_literal(substr(c, strpos(c, '=') + 1)) ELSE 'DEFAULT' END);
    END LOOP;
END
$$;
COMMENT ON FUNCTION ironwod.forward_set_clauses(regprocedure, boolean) IS 'Citus: SET LOCAL the settings of the given function''s SET clauses (true) or back to their defaults (false), so that the nodes that plan its statements use them too; nothing without Citus';
REVOKE ALL ON FUNCTION ironwod.forward_set_clauses(regprocedure, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ironwod.forward_set_clauses(regprocedure, boolean) TO ironwod_worker;

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
REVOKE ALL ON FUNCTION ironwod.stage_planner_settings(boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ironwod.stage_planner_settings(boolean) TO ironwod_worker;

CREATE OR REPLACE FUNCTION ironwod.metric_config() RETURNS ironwod.metric_settings
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

CREATE OR REPLACE FUNCTION ironwod.metrics_spells(p_tenant uuid, p_gym uuid, p_s ironwod.metric_settings)
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

CREATE OR REPLACE FUNCTION ironwod.metrics_day_states(p_tenant uuid, p_gym uuid, p_today date)
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

CREATE OR REPLACE FUNCTION ironwod.metrics_pooled(p_tenant uuid, p_gym uuid, p_from date)
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

-- ironwod.alerts reads its thresholds (the ironwod.alert_* settings) once, in a
-- MATERIALIZED CTE: on Citus the branches ran on the worker nodes and read the
-- nodes' settings, so a threshold SET in the caller's session was ignored.
CREATE OR REPLACE VIEW ironwod.alerts WITH (security_invoker = true) AS
WITH thresholds AS MATERIALIZED (
    SELECT current_setting('ironwod.alert_error_rate')::float8 AS error_rate,
           current_setting('ironwod.alert_min_requests')::int AS min_requests,
           current_setting('ironwod.alert_backfill_stall') AS backfill_stall,
           current_setting('ironwod.alert_min_events')::int AS min_events,
           current_setting('ironwod.alert_cancellation_factor')::float8 AS cancellation_factor,
           current_setting('ironwod.alert_attendance_factor')::float8 AS attendance_factor
), conn AS (
    SELECT c.tenant_id, c.gym_id, c.status, c.connected_at, c.last_success_at, c.last_error_code,
           c.last_error, c.consecutive_failures, c.breaker_opened_at, c.next_retry_at,
           c.backfill_completed_at, c.time_zone
    FROM ironwod.integrations_wodify_connection c
    WHERE c.status IN ('connected', 'error')
), attempts AS (
    SELECT r.tenant_id, r.gym_id, min(r.started_at) AS first_at,
           sum(r.requests) AS requests,
           sum(r.attempts_429 + r.attempts_4xx + r.attempts_5xx + r.attempts_network + r.attempts_envelope)
               AS failed,
           jsonb_build_object('2xx', sum(r.attempts_2xx), '429', sum(r.attempts_429),
                              '4xx', sum(r.attempts_4xx), '5xx', sum(r.attempts_5xx),
                              'network', sum(r.attempts_network), 'envelope', sum(r.attempts_envelope)) AS by_outcome
    FROM ironwod.sync_runs r
    WHERE r.finished_at >= now() - interval '24 hours'
       OR (r.finished_at IS NULL AND r.status = 'running')
    GROUP BY r.tenant_id, r.gym_id
), checkpoints AS (
    SELECT b.tenant_id, b.gym_id, max(b.completed_at) AS at
    FROM ironwod.backfill_checkpoints b
    GROUP BY b.tenant_id, b.gym_id
), heartbeats AS (
    SELECT r.tenant_id, r.gym_id, max(r.heartbeat_at) AS at
    FROM ironwod.sync_runs r
    WHERE r.mode = 'backfill'
    GROUP BY r.tenant_id, r.gym_id
), progress AS (
    -- The last sign of life of an unfinished backfill campaign: a checkpointed
    -- unit or a page landed by one of its runs.
    SELECT c.tenant_id, c.gym_id, greatest(c.connected_at, b.at, h.at) AS at
    FROM conn c
    LEFT JOIN checkpoints b ON b.tenant_id = c.tenant_id AND b.gym_id = c.gym_id
    LEFT JOIN heartbeats h ON h.tenant_id = c.tenant_id AND h.gym_id = c.gym_id
    WHERE c.backfill_completed_at IS NULL
), cancellations AS (
    SELECT m.tenant_id, m.gym_id, m.month_start, m.time_zone, m.churned_members,
           avg(p.churned_members) AS trailing_mean, count(p.churned_members) AS trailing_months
    FROM ironwod.gym_monthly_metrics_cache m
    JOIN conn c ON c.tenant_id = m.tenant_id AND c.gym_id = m.gym_id
    JOIN ironwod.gym_monthly_metrics_cache p
      ON p.tenant_id = m.tenant_id AND p.gym_id = m.gym_id AND p.location_key = 'ALL' AND p.program_key = 'ALL'
     AND p.month_start >= m.month_start - interval '3 months' AND p.month_start < m.month_start
    WHERE m.location_key = 'ALL' AND m.program_key = 'ALL'
      AND m.month_start = date_trunc('month', now() AT TIME ZONE m.time_zone)::date
    GROUP BY m.tenant_id, m.gym_id, m.month_start, m.time_zone, m.churned_members
), quarantine AS (
    SELECT q.tenant_id, q.gym_id, q.entity, q.reason, count(*) AS records,
           min(q.first_seen_at) AS since, max(q.last_seen_at) AS last_seen_at
    FROM ironwod.quarantined_records q
    JOIN conn c ON c.tenant_id = q.tenant_id AND c.gym_id = q.gym_id
    GROUP BY q.tenant_id, q.gym_id, q.entity, q.reason
), visits AS (
    -- Visits are only as fresh as the last successful sync, so the weeks end there.
    SELECT c.tenant_id, c.gym_id, least(now(), c.last_success_at) AS until,
           count(*) FILTER (WHERE a.class_start_at >= least(now(), c.last_success_at) - interval '7 days') AS last_7d,
           count(*) FILTER (WHERE a.class_start_at < least(now(), c.last_success_at) - interval '7 days') / 4.0 AS weekly_mean
    FROM conn c
    JOIN ironwod.attendance_events a
      ON a.tenant_id = c.tenant_id AND a.gym_id = c.gym_id AND a.deleted_at IS NULL
     AND a.class_start_at >= least(now(), c.last_success_at) - interval '35 days'
     AND a.class_start_at < least(now(), c.last_success_at)
    GROUP BY c.tenant_id, c.gym_id, c.last_success_at
)
SELECT c.tenant_id, c.gym_id, 'no_success_24h'::text AS alert, 'critical'::text AS severity,
       coalesce(c.last_success_at, c.connected_at) + interval '24 hours' AS since,
       jsonb_build_object('last_success_at', c.last_success_at, 'last_error_code', c.last_error_code,
                          'last_error', c.last_error) AS detail
FROM conn c
WHERE coalesce(c.last_success_at, c.connected_at) < now() - interval '24 hours'
UNION ALL
SELECT a.tenant_id, a.gym_id, 'api_error_rate', 'warning', a.first_at,
       jsonb_build_object('requests', a.requests, 'failed', a.failed,
                          'error_rate', round(a.failed::numeric / a.requests, 4),
                          'threshold', t.error_rate,
                          'attempts', a.by_outcome)
FROM attempts a
JOIN conn c ON c.tenant_id = a.tenant_id AND c.gym_id = a.gym_id
CROSS JOIN thresholds t
WHERE a.requests >= t.min_requests
  AND a.failed > a.requests * t.error_rate
UNION ALL
SELECT c.tenant_id, c.gym_id, 'breaker_open', 'critical', c.breaker_opened_at,
       jsonb_build_object('consecutive_failures', c.consecutive_failures, 'next_retry_at', c.next_retry_at,
                          'last_error_code', c.last_error_code, 'last_error', c.last_error,
                          'needs_new_key', c.next_retry_at IS NULL)
FROM conn c
WHERE c.breaker_opened_at IS NOT NULL
UNION ALL
SELECT p.tenant_id, p.gym_id, 'backfill_stalled', 'warning',
       p.at + t.backfill_stall::interval,
       jsonb_build_object('last_progress_at', p.at,
                          'stall_after', t.backfill_stall)
FROM progress p
CROSS JOIN thresholds t
WHERE p.at < now() - t.backfill_stall::interval
UNION ALL
SELECT n.tenant_id, n.gym_id, 'not_entitled', 'info', min(n.not_entitled_since),
       jsonb_build_object('entities', jsonb_agg(n.entity ORDER BY n.entity))
FROM ironwod.entity_entitlements n
JOIN conn c ON c.tenant_id = n.tenant_id AND c.gym_id = n.gym_id
GROUP BY n.tenant_id, n.gym_id
UNION ALL
SELECT q.tenant_id, q.gym_id, 'quarantined_records', 'warning', min(q.since),
       jsonb_build_object('records', sum(q.records), 'last_seen_at', max(q.last_seen_at),
                          'entities', (SELECT jsonb_object_agg(x.entity, x.n)
                                       FROM (SELECT y.entity, sum(y.records) AS n FROM quarantine y
                                             WHERE y.tenant_id = q.tenant_id AND y.gym_id = q.gym_id
                                             GROUP BY y.entity) x),
                          'reasons', (SELECT jsonb_object_agg(x.reason, x.n)
                                      FROM (SELECT y.reason, sum(y.records) AS n FROM quarantine y
                                            WHERE y.tenant_id = q.tenant_id AND y.gym_id = q.gym_id
                                            GROUP BY y.reason) x))
FROM quarantine q
GROUP BY q.tenant_id, q.gym_id
UNION ALL
SELECT k.tenant_id, k.gym_id, 'cancellation_spike', 'warning',
       k.month_start::timestamp AT TIME ZONE k.time_zone,
       jsonb_build_object('month', k.month_start, 'cancellations', k.churned_members,
                          'trailing_3_month_mean', round(k.trailing_mean, 2),
                          'factor', t.cancellation_factor)
FROM cancellations k
CROSS JOIN thresholds t
WHERE k.trailing_months = 3
  AND k.churned_members >= t.min_events
  AND k.churned_members > k.trailing_mean * t.cancellation_factor
UNION ALL
SELECT v.tenant_id, v.gym_id, 'attendance_drop', 'warning', v.until - interval '7 days',
       jsonb_build_object('visits_last_7_days', v.last_7d, 'trailing_weekly_mean', round(v.weekly_mean, 2),
                          'until', v.until,
                          'factor', t.attendance_factor)
FROM visits v
CROSS JOIN thresholds t
WHERE v.weekly_mean >= t.min_events
  AND v.last_7d < v.weekly_mean * t.attendance_factor;
COMMENT ON VIEW ironwod.alerts IS 'One row per active alert (tenant_id, gym_id, alert, severity, since, detail): no_success_24h, api_error_rate, breaker_open, backfill_stalled, not_entitled, quarantined_records, cancellation_spike, attendance_drop; thresholds from the ironwod.alert_* GUCs';

-- transform_run reads a run's new versions above a per-gym, per-entity raw_id
-- cursor (ironwod.transform_cursors) through the primary key, so the raw
-- tables' (tenant_id, gym_id, ingest_run_id) index, which cost every landed row
-- an insertion, goes.  No cursor row yet means 0: a gym's first transform
-- after the upgrade reads its raw rows once and keeps those of untransformed runs.
CREATE TABLE ironwod.transform_cursors (
    tenant_id  uuid NOT NULL,
    gym_id     uuid NOT NULL,
    entity     text NOT NULL,
    raw_id     bigint NOT NULL,
    PRIMARY KEY (tenant_id, gym_id, entity),
    FOREIGN KEY (tenant_id, gym_id) REFERENCES ironwod.integrations_wodify_connection
);
COMMENT ON TABLE ironwod.transform_cursors IS 'Per gym and entity, the raw_id up to which every raw version was landed by a transformed run (where transform_run starts reading)';
SELECT ironwod.apply_tenant_policies('ironwod.transform_cursors');
REVOKE ALL ON ironwod.transform_cursors FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE ON ironwod.transform_cursors TO ironwod_worker;
GRANT SELECT ON ironwod.transform_cursors TO ironwod_app, ironwod_admin;
SELECT ironwod.register_config_dump();

-- Two of the raw tables' 1.0 indexes go, found by their columns (their names are
-- PostgreSQL's): (tenant_id, gym_id, ingest_run_id), since the transforms read a
-- run's new versions above transform_cursors by the primary key; and the "latest
-- version" index (tenant_id, gym_id, wodify_id, source_updated_at DESC NULLS LAST,
-- raw_id DESC), since its readers take each record's versions from the
-- (wodify_id, payload_hash) unique constraint and order those few by an
-- incremental sort.  Each cost landing an index insertion per row.
DO $idx$
DECLARE
    i regclass;
BEGIN
    FOR i IN SELECT x.indexrelid::regclass
             FROM ironwod.entities e
             JOIN pg_index x ON x.indrelid = ('ironwod.' || quote_ident(e.raw_table))::regclass
             WHERE (SELECT array_agg(a.attname::text ORDER BY k.n)
                    FROM unnest(x.indkey) WITH ORDINALITY k(attnum, n)
                    JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum)
                   IN (ARRAY['tenant_id', 'gym_id', 'ingest_run_id'],
                       ARRAY['tenant_id', 'gym_id', 'wodify_id', 'source_updated_at', 'raw_id']) LOOP
        EXECUTE format('DROP INDEX %s', i);
    END LOOP;
END
$idx$;

-- plan_units: linear joins whatever the raw clients' statistics say, without JIT
ALTER FUNCTION ironwod.plan_units(bigint, text) SET enable_nestloop = off SET jit = off;

-- Worker SQL that compared tenant_id with ironwod.scope_tenant() and
-- ironwod.scope_gym() (STABLE), which on Citus runs on every shard, reads the
-- scope once into values and compares with those, so each statement names the
-- tenant's shard (issue 12): close_entity, mark_not_entitled, record_memory,
-- unquarantine, unvanish, finish_validate, apply_rotated_key, and
-- store_rewrapped_key (now plpgsql).  Row-level security still restricts every
-- statement to the scope.

CREATE OR REPLACE FUNCTION ironwod.close_entity(p_run_id bigint, p_entity text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_now timestamptz := clock_timestamp();
    e ironwod.entities;
    v_max timestamptz;
    v_watermark timestamptz;
    v_tz text;
BEGIN
    SELECT * INTO STRICT e FROM ironwod.entities x WHERE x.entity = p_entity;
    SELECT s.max_watermark INTO v_max FROM ironwod.sync_run_entities s
     WHERE s.tenant_id = v_t AND s.gym_id = v_g AND s.run_id = p_run_id AND s.entity = p_entity;
    SELECT c.watermark INTO v_watermark FROM ironwod.entity_cursors c
     WHERE c.tenant_id = v_t AND c.gym_id = v_g AND c.entity = p_entity;

    -- Values, not INSERT ... SELECT over the cursors, and the times computed
    -- first: on Citus a single-row insert with constants routes to the tenant's
    -- shard, where ON CONFLICT DO UPDATE may use no volatile function.
    INSERT INTO ironwod.sync_run_entities AS s (tenant_id, gym_id, run_id, entity, status, completed_at, cursor_start, cursor_end)
    VALUES (v_t, v_g, p_run_id, p_entity, 'completed', v_now, v_watermark, greatest(v_watermark, v_max))
    ON CONFLICT (tenant_id, gym_id, run_id, entity) DO UPDATE
       SET status = 'completed', completed_at = excluded.completed_at,
           cursor_start = excluded.cursor_start, cursor_end = excluded.cursor_end;

    IF v_max IS NOT NULL THEN
        INSERT INTO ironwod.entity_cursors AS c (tenant_id, gym_id, entity, watermark, updated_by, updated_at)
        VALUES (v_t, v_g, p_entity, v_max, p_run_id, v_now)
        ON CONFLICT (tenant_id, gym_id, entity) DO UPDATE
           SET watermark = greatest(c.watermark, excluded.watermark), updated_by = p_run_id, updated_at = excluded.updated_at;
    END IF;

    -- A full list this run fetched itself, every page of it: a quarantined record
    -- of it that was not in it any more is gone at the vendor (or fixed there into
    -- a record that landed).  This is how a record without a readable id leaves.
    IF e.backfill_strategy = 'full' AND EXISTS (
           SELECT 1 FROM ironwod.sync_run_entities s
           WHERE s.tenant_id = v_t AND s.gym_id = v_g
             AND s.run_id = p_run_id AND s.entity = p_entity AND s.units_done > 0 AND s.units_skipped = 0) THEN
        DELETE FROM ironwod.quarantined_records q
         WHERE q.tenant_id = v_t AND q.gym_id = v_g
           AND q.entity = p_entity AND q.last_seen_run_id <> p_run_id;
    END IF;

    -- Pulled cleanly, so the gym's plan includes it (again).
    DELETE FROM ironwod.entity_entitlements n
     WHERE n.tenant_id = v_t AND n.gym_id = v_g AND n.entity = p_entity
       AND n.last_checked_run <> p_run_id;

    IF p_entity = 'locations' THEN
        -- The gym's time zone: the first location's (by id), when PostgreSQL knows it.
        -- Read first, then updated: on Citus an UPDATE ... FROM a function that
        -- reads distributed tables would run that function on the shard.
        SELECT x.payload_json ->> 'time_zone_iana' INTO v_tz
        FROM ironwod.latest_raw_versions('locations', v_t, v_g) x
        WHERE x.last_seen_run_id = p_run_id ORDER BY x.wodify_id LIMIT 1;
        IF ironwod.is_time_zone(v_tz) THEN
            UPDATE ironwod.integrations_wodify_connection c
               SET time_zone = v_tz, updated_at = v_now
             WHERE c.tenant_id = v_t AND c.gym_id = v_g;
        END IF;
    END IF;

    IF (SELECT mode FROM ironwod.sync_runs r
        WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id = p_run_id) = 'reconcile' THEN
        PERFORM ironwod.reconcile_deletions(p_run_id, e);
    END IF;
    -- Read first, then passed: on Citus a query on the shard (a routed SELECT
    -- with a subquery) may not call a function that writes distributed tables.
    SELECT c.watermark INTO v_watermark FROM ironwod.entity_cursors c
    WHERE c.tenant_id = v_t AND c.gym_id = v_g AND c.entity = p_entity;
    PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.entity.completed', p_entity,
        jsonb_build_object('watermark', greatest(v_max, v_watermark)));
END
$$;

CREATE OR REPLACE FUNCTION ironwod.mark_not_entitled(p_run_id bigint, p_entity text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    -- the scope as values: on Citus a statement comparing tenant_id with
    -- scope_tenant() (STABLE) runs on every shard
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
BEGIN
    INSERT INTO ironwod.entity_entitlements AS n (tenant_id, gym_id, entity, last_checked_run)
    VALUES (v_t, v_g, p_entity, p_run_id)
    ON CONFLICT (tenant_id, gym_id, entity) DO UPDATE SET last_checked_run = p_run_id;
    UPDATE ironwod.run_units u SET status = 'not_entitled'
     WHERE u.tenant_id = v_t AND u.gym_id = v_g AND u.run_id = p_run_id
       AND u.entity = p_entity AND u.status = 'pending';
    PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.entity.not_entitled', p_entity, '{}');
END
$$;

CREATE OR REPLACE FUNCTION ironwod.record_memory(p_run_id bigint, p_peak_bytes bigint, p_largest_page_bytes bigint)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    -- the scope as values: on Citus a statement comparing tenant_id with
    -- scope_tenant() (STABLE) runs on every shard
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
BEGIN
    UPDATE ironwod.sync_runs r
       SET peak_memory_bytes = greatest(r.peak_memory_bytes, p_peak_bytes),
           largest_page_bytes = greatest(r.largest_page_bytes, p_largest_page_bytes)
     WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id = p_run_id;
END
$$;

CREATE OR REPLACE FUNCTION ironwod.unquarantine(p_entity text, p_ids bigint[]) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    -- the scope as values: on Citus a statement comparing tenant_id with
    -- scope_tenant() (STABLE) runs on every shard
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
BEGIN
    DELETE FROM ironwod.quarantined_records q
     WHERE q.tenant_id = v_t AND q.gym_id = v_g
       AND q.entity = p_entity AND q.wodify_id = ANY (p_ids);
END
$$;

CREATE OR REPLACE FUNCTION ironwod.unvanish(p_entity text, p_ids bigint[]) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    -- the scope as values: on Citus a statement comparing tenant_id with
    -- scope_tenant() (STABLE) runs on every shard
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
BEGIN
    DELETE FROM ironwod.vanished_records v
     WHERE v.tenant_id = v_t AND v.gym_id = v_g
       AND v.entity = p_entity AND v.wodify_id = ANY (p_ids);
END
$$;

CREATE OR REPLACE FUNCTION ironwod.finish_validate(p_run_id bigint, p_valid boolean, p_fingerprint text, p_message text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    -- now() as a value: Citus refuses a non-immutable function in an UPDATE's COALESCE
    v_now timestamptz := now();
    -- the scope as values: on Citus a statement comparing tenant_id with
    -- scope_tenant() (STABLE) runs on every shard
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
BEGIN
    IF p_valid THEN
        UPDATE ironwod.integrations_wodify_connection
           SET api_key_fingerprint = p_fingerprint, connected_at = coalesce(connected_at, v_now), updated_at = v_now
         WHERE tenant_id = v_t AND gym_id = v_g;
        PERFORM ironwod.finish_run(p_run_id);
        INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode)
        SELECT c.tenant_id, c.gym_id, 'backfill'
        FROM ironwod.integrations_wodify_connection c
        WHERE c.tenant_id = v_t AND c.gym_id = v_g AND c.backfill_completed_at IS NULL;
    ELSE
        PERFORM ironwod.fail_run(p_run_id, 'auth', p_message, 'validate');
        UPDATE ironwod.integrations_wodify_connection
           SET api_key_ciphertext = NULL, master_key_id = NULL, updated_at = v_now
         WHERE tenant_id = v_t AND gym_id = v_g;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION ironwod.apply_rotated_key(p_now timestamptz)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
    -- the scope as values: on Citus a statement comparing tenant_id with
    -- scope_tenant() (STABLE) runs on every shard
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
BEGIN
    UPDATE ironwod.integrations_wodify_connection c
       SET api_key_ciphertext = c.next_api_key_ciphertext, master_key_id = c.next_master_key_id,
           api_key_fingerprint = c.next_api_key_fingerprint,
           next_api_key_ciphertext = NULL, next_master_key_id = NULL, next_api_key_fingerprint = NULL,
           key_rotated_at = p_now, updated_at = p_now
     WHERE c.tenant_id = v_t AND c.gym_id = v_g
       AND c.next_api_key_ciphertext IS NOT NULL AND c.status <> 'disconnected';
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO ironwod.sync_events (tenant_id, gym_id, event)
    VALUES (v_t, v_g, 'wodify.key.rotated');
    RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION ironwod.store_rewrapped_key(p_current bytea, p_next bytea, p_key_id text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    -- the scope as values, in plpgsql: on Citus a statement comparing tenant_id
    -- with scope_tenant() (STABLE) runs on every shard
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
BEGIN
    UPDATE ironwod.integrations_wodify_connection c
       SET api_key_ciphertext = coalesce(p_current, c.api_key_ciphertext),
           master_key_id = CASE WHEN p_current IS NULL THEN c.master_key_id ELSE p_key_id END,
           next_api_key_ciphertext = coalesce(p_next, c.next_api_key_ciphertext),
           next_master_key_id = CASE WHEN p_next IS NULL THEN c.next_master_key_id ELSE p_key_id END
     WHERE c.tenant_id = v_t AND c.gym_id = v_g;
END
$$;

-- ironwod_wait looks the run up under the scope's key (on Citus one shard, where
-- the run id alone read every shard of every node).
CREATE OR REPLACE FUNCTION @extschema@.ironwod_wait(p_run_id bigint, p_timeout interval DEFAULT '5 minutes')
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_deadline timestamptz := clock_timestamp() + p_timeout;
    v_status text;
    v_tenant uuid := ironwod.scope_tenant();
    v_gym uuid := ironwod.scope_gym();
BEGIN
    PERFORM ironwod.preloaded();
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'ironwod_wait needs READ COMMITTED isolation'
            USING ERRCODE = 'active_sql_transaction', HINT = 'A snapshot that never moves would never see the run finish.';
    END IF;
    -- The run looked up under the scope's key: on Citus that is the scope's
    -- shard, where the run id alone read every shard of every node.
    PERFORM FROM ironwod.sync_runs r WHERE r.tenant_id = v_tenant AND r.gym_id = v_gym AND r.run_id = p_run_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % does not exist in the current ironwod scope', p_run_id
            USING ERRCODE = 'no_data_found', HINT = 'Call ironwod_set_scope(tenant, gym) for the run''s gym first.';
    END IF;
    -- The supervisor cannot see a run this transaction queued before COMMIT.
    IF ironwod.run_queued_here(p_run_id) THEN
        RAISE EXCEPTION 'run % was queued by the current transaction and cannot start before it commits', p_run_id
            USING ERRCODE = 'active_sql_transaction',
                  HINT = 'COMMIT the transaction that called ironwod_sync() or ironwod_connect(), then call ironwod_wait() in a new one.';
    END IF;
    LOOP
        SELECT r.status INTO v_status FROM ironwod.sync_runs r
        WHERE r.tenant_id = v_tenant AND r.gym_id = v_gym AND r.run_id = p_run_id;
        IF v_status NOT IN ('queued', 'running') THEN
            RETURN v_status;
        END IF;
        IF clock_timestamp() >= v_deadline THEN
            RAISE EXCEPTION 'run % still % after %', p_run_id, v_status, p_timeout
                USING ERRCODE = 'query_canceled';
        END IF;
        PERFORM ironwod.wait_for_change(least(1000, greatest(1,
            (extract(epoch FROM v_deadline - clock_timestamp()) * 1000)::int)));
    END LOOP;
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_wait(bigint, interval) IS 'Block until a run of the current scope finishes and return its status; error on timeout';

-- The bookkeeping of every landed batch of pages (ironwod.pages_per_commit
-- pages of one entity, committed together), one statement the worker prepares
-- once per run: the entity's counters (pages, attempts, records, new versions),
-- API latency histogram and newest watermark, provided the run is still running
-- (a disconnect stops it here: no row comes back).  Constant time.
-- $1 tenant, $2 gym, $3 run, $4 entity, $5 the attempt counters since the last
-- landed batch (ironwod.add_attempts), $6 records, $7 new versions,
-- $8 latency ms (0 when not measured), $9 the batch's newest watermark, $10 the
-- latency histogram of the batch's pages (ironwod.latency_buckets; all zeros when
-- not measured), added bucket by bucket: on Citus the DO UPDATE SET goes to the
-- shard as text, where a parameter it names has no value; $11 the batch's records
-- quarantined (counted in pulled, not in unchanged); $12 its pages.  The row's tenant, gym and
-- run come from the run's row, not from $1-$3: Citus then runs the INSERT ...
-- SELECT on the tenant's shard, where with constants it read the run's row to
-- the coordinator and wrote it back (13.7 ms a page, against 0.15 on one node).
CREATE OR REPLACE FUNCTION ironwod.page_statement() RETURNS text
LANGUAGE sql IMMUTABLE
AS $s$
    SELECT $q$
        INSERT INTO ironwod.sync_run_entities AS s
            (tenant_id, gym_id, run_id, entity, pages, attempts_2xx, attempts_429, attempts_4xx,
             attempts_5xx, attempts_network, attempts_envelope, retries, bytes_received, token_wait_s,
             backoff_s, pulled, new_versions, unchanged, quarantined, latency_hist, latency_ms, max_watermark)
        SELECT r.tenant_id, r.gym_id, r.run_id, $4, $12, $5[1], $5[2], $5[3], $5[4], $5[5], $5[6], $5[7], $5[8],
               $5[9] / 1e6, $5[10] / 1e6, $6, $7, $6 - $7 - $11, $11, $10, $8, $9
        FROM ironwod.sync_runs r
        WHERE r.tenant_id = $1 AND r.gym_id = $2 AND r.run_id = $3 AND r.status = 'running'
        ON CONFLICT (tenant_id, gym_id, run_id, entity) DO UPDATE
           SET pages = s.pages + excluded.pages,
               attempts_2xx = s.attempts_2xx + excluded.attempts_2xx,
               attempts_429 = s.attempts_429 + excluded.attempts_429,
               attempts_4xx = s.attempts_4xx + excluded.attempts_4xx,
               attempts_5xx = s.attempts_5xx + excluded.attempts_5xx,
               attempts_network = s.attempts_network + excluded.attempts_network,
               attempts_envelope = s.attempts_envelope + excluded.attempts_envelope,
               retries = s.retries + excluded.retries,
               bytes_received = s.bytes_received + excluded.bytes_received,
               token_wait_s = s.token_wait_s + excluded.token_wait_s,
               backoff_s = s.backoff_s + excluded.backoff_s,
               pulled = s.pulled + excluded.pulled, new_versions = s.new_versions + excluded.new_versions,
               unchanged = s.unchanged + excluded.unchanged,
               quarantined = s.quarantined + excluded.quarantined,
               latency_hist = ARRAY[s.latency_hist[1] + excluded.latency_hist[1], s.latency_hist[2] + excluded.latency_hist[2],
                                    s.latency_hist[3] + excluded.latency_hist[3], s.latency_hist[4] + excluded.latency_hist[4],
                                    s.latency_hist[5] + excluded.latency_hist[5], s.latency_hist[6] + excluded.latency_hist[6],
                                    s.latency_hist[7] + excluded.latency_hist[7], s.latency_hist[8] + excluded.latency_hist[8]],
               latency_ms = s.latency_ms + excluded.latency_ms,
               max_watermark = greatest(s.max_watermark, excluded.max_watermark)
        RETURNING 1$q$
$s$;
COMMENT ON FUNCTION ironwod.page_statement() IS 'Worker: the prepared bookkeeping statement of every landed batch of pages (entity counters and attempts, quarantined records, latency histogram, watermark; checks the run still runs)';

-- Planning (issue 7): a worker plans each entity with a few statements.
-- plan_entity derives the units itself (plan_units is gone), reading what they
-- depend on in one statement and building the units that need no query as
-- expressions; the per-client statement runs with enable_nestloop and jit off
-- by SET LOCAL (forwarded by Citus to the node that plans it) instead of SET
-- clauses.  next_task and finish_run match the registry against the run's
-- planned and skipped entities as arrays (skipped_entities replaces
-- entity_skipped, one statement per run instead of one per entity).
CREATE FUNCTION ironwod.skipped_entities(p_run_id bigint) RETURNS text[]
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
BEGIN
    RETURN ARRAY(
        SELECT n.entity FROM ironwod.entity_entitlements n
        JOIN ironwod.sync_runs r ON r.tenant_id = n.tenant_id AND r.gym_id = n.gym_id AND r.run_id = p_run_id
        WHERE n.tenant_id = v_t AND n.gym_id = v_g AND r.tenant_id = v_t AND r.gym_id = v_g
          AND (r.mode <> 'reconcile' OR n.last_checked_run = p_run_id));
END
$$;
COMMENT ON FUNCTION ironwod.skipped_entities(bigint) IS 'Worker: the entities this run skips (not entitled)';
REVOKE ALL ON FUNCTION ironwod.skipped_entities(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ironwod.skipped_entities(bigint) TO ironwod_worker;

CREATE OR REPLACE FUNCTION ironwod.next_task(p_run_id bigint)
RETURNS TABLE (entity text, window_key text, url text, page_size integer)
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_planned text[];
    v_skipped text[];
    e record;
BEGIN
    RETURN QUERY
        SELECT u.entity, u.window_key, u.url, x.page_size
        FROM ironwod.run_units u JOIN ironwod.entities x ON x.entity = u.entity
        WHERE u.tenant_id = v_t AND u.gym_id = v_g AND u.run_id = p_run_id AND u.status = 'pending'
        ORDER BY u.entity_ordinal, u.ordinal LIMIT 1;
    IF FOUND THEN
        RETURN;
    END IF;
    -- Nothing pending: start the next entity neither planned nor skipped.  The
    -- entities the run planned and skips are read first and matched against the
    -- registry as arrays (Citus plans no correlated subquery over the registry,
    -- a reference table): two statements, where asking about each entity in
    -- turn took a statement per entity passed and made a run's planning
    -- quadratic in its entities.
    v_planned := ARRAY(SELECT s.entity FROM ironwod.sync_run_entities s
                       WHERE s.tenant_id = v_t AND s.gym_id = v_g AND s.run_id = p_run_id
                         AND s.units_total IS NOT NULL);
    v_skipped := ironwod.skipped_entities(p_run_id);
    FOR e IN SELECT x.entity, x.page_size FROM ironwod.entities x
             WHERE x.enabled AND x.entity <> ALL (v_planned) AND x.entity <> ALL (v_skipped)
             ORDER BY x.ordinal LOOP
        CONTINUE WHEN ironwod.plan_entity(p_run_id, e.entity) = 0;
        RETURN QUERY
            SELECT u.entity, u.window_key, u.url, e.page_size
            FROM ironwod.run_units u
            WHERE u.tenant_id = v_t AND u.gym_id = v_g AND u.run_id = p_run_id AND u.entity = e.entity
              AND u.status = 'pending'
            ORDER BY u.entity_ordinal, u.ordinal LIMIT 1;
        RETURN;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION ironwod.finish_run(p_run_id bigint)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_mode text;
    v_now timestamptz;
    v_cursor_end jsonb;
    v_last_cursor timestamptz;
    v_skipped text[];
    e record;
BEGIN
    -- Lock order: the gym's connection row, then its run.  The page's
    -- transaction (hold_connection, src/land.c) and ironwod_pause take them in
    -- this order, so a path that took the run first (its UPDATE) and then the
    -- connection could deadlock with them.  NO KEY UPDATE, as the UPDATEs of
    -- the connection take: a run queued meanwhile (its foreign key) is not held up.
    PERFORM 1 FROM ironwod.integrations_wodify_connection c
     WHERE c.tenant_id = v_t AND c.gym_id = v_g FOR NO KEY UPDATE;
    SELECT r.mode INTO v_mode FROM ironwod.sync_runs r
     WHERE r.run_id = p_run_id AND r.status = 'running' AND r.tenant_id = v_t AND r.gym_id = v_g;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % is no longer running', p_run_id USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF v_mode <> 'validate' THEN
        -- The entities left open, checked one by one: Citus plans no correlated
        -- subquery over the registry (a reference table).
        v_skipped := ironwod.skipped_entities(p_run_id);
        FOR e IN SELECT x.entity FROM ironwod.entities x
                 WHERE x.enabled AND x.entity <> ALL (v_skipped) ORDER BY x.ordinal LOOP
            CONTINUE WHEN EXISTS (SELECT 1 FROM ironwod.sync_run_entities s
                           WHERE s.tenant_id = v_t AND s.gym_id = v_g AND s.run_id = p_run_id
                             AND s.entity = e.entity AND s.status = 'completed');
            PERFORM ironwod.close_entity(p_run_id, e.entity);
        END LOOP;
        IF v_mode = 'backfill' THEN
            DELETE FROM ironwod.backfill_checkpoints b
             WHERE b.tenant_id = v_t AND b.gym_id = v_g;
        END IF;
    END IF;
    -- The finish time and the cursors computed first and passed as values: on
    -- Citus an UPDATE may carry no volatile function, no non-immutable one in a
    -- CASE, and no subquery over another distributed table.
    v_now := clock_timestamp();
    PERFORM ironwod.count_requests(p_run_id, v_now, NULL);
    SELECT jsonb_object_agg(c.entity, c.watermark), max(c.watermark) INTO v_cursor_end, v_last_cursor
    FROM ironwod.entity_cursors c WHERE c.tenant_id = v_t AND c.gym_id = v_g;
    UPDATE ironwod.sync_runs r
       SET status = 'succeeded', finished_at = v_now, phase = NULL, cursor_end = v_cursor_end
     WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id = p_run_id;
    UPDATE ironwod.integrations_wodify_connection c
       SET status = CASE WHEN c.status IN ('pending', 'error') THEN 'connected' ELSE c.status END,
           last_success_at = v_now, consecutive_failures = 0,
           breaker_opened_at = NULL, next_retry_at = NULL,
           last_cursor_at = v_last_cursor,
           backfill_completed_at = CASE WHEN v_mode = 'backfill' THEN v_now ELSE c.backfill_completed_at END,
           updated_at = v_now
     WHERE c.tenant_id = v_t AND c.gym_id = v_g;
    -- the run, which held the old key, is over: a rotated key takes its place
    PERFORM ironwod.apply_rotated_key(v_now);
    PERFORM ironwod.log_run(v_t, v_g, p_run_id);
    -- Read first, then passed: on Citus a query on the shard (a routed SELECT
    -- with a subquery) may not call a function that writes distributed tables.
    SELECT coalesce(jsonb_object_agg(s.entity, jsonb_build_object('pulled', s.pulled, 'new', s.new_versions,
                                                                  'deleted', s.deleted,
                                                                  'quarantined', s.quarantined)), '{}')
    INTO v_cursor_end
    FROM ironwod.sync_run_entities s
    WHERE s.tenant_id = v_t AND s.gym_id = v_g AND s.run_id = p_run_id;
    PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.completed', NULL, v_cursor_end);
END
$$;

DROP FUNCTION ironwod.plan_units(bigint, text);
DROP FUNCTION ironwod.entity_skipped(bigint, text);

-- ---- the transform: the mapping's field readers (src/fields.c) -------------------

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
REVOKE ALL ON FUNCTION ironwod.j_id(jsonb, text), ironwod.j_num(jsonb, text), ironwod.j_ts(jsonb, text),
    ironwod.j_date(jsonb, text), ironwod.j_text(jsonb, text), ironwod.j_bool(jsonb, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ironwod.j_id(jsonb, text), ironwod.j_num(jsonb, text), ironwod.j_ts(jsonb, text),
    ironwod.j_date(jsonb, text), ironwod.j_text(jsonb, text), ironwod.j_bool(jsonb, text) TO ironwod_worker;

-- The mapping reads its columns with them.  An administrator's edit of a column
-- is kept (the row differs from its installed_definition); the new rows become
-- install-time rows.
UPDATE ironwod.canonical_columns c
   SET expr = n.expr, installed_definition = NULL
  FROM (VALUES
    ('class_signins', 1, $$ironwod.j_id(p, 'client_id')$$),
    ('class_signins', 2, $$ironwod.j_id(p, 'class_id')$$),
    ('class_signins', 3, $$ironwod.j_ts(p, 'utc_class_start_datetime')$$),
    ('class_signins', 4, $$ironwod.j_id(p, 'location_id')$$),
    ('class_signins', 5, $$ironwod.j_id(p, 'program_id')$$),
    ('class_signins', 6, $$ironwod.j_id(p, 'membership_id')$$),
    ('class_signins', 7, $$ironwod.j_bool(p, 'is_drop_in')$$),
    ('clients', 1, $$ironwod.j_text(p, 'first_name')$$),
    ('clients', 2, $$ironwod.j_text(p, 'last_name')$$),
    ('clients', 3, $$ironwod.j_text(p, 'email')$$),
    ('clients', 4, $$ironwod.j_text(p, 'client_status')$$),
    ('clients', 5, $$ironwod.j_id(p, 'location_id')$$),
    ('clients', 6, $$ironwod.j_date(p, 'member_since')$$),
    ('clients', 8, $$ironwod.j_ts(p, 'last_class_sign_in')$$),
    ('invoices', 1, $$ironwod.j_text(p, 'invoice_number')$$),
    ('invoices', 2, $$ironwod.j_id(p, 'client_id')$$),
    ('invoices', 3, $$ironwod.j_id(p, 'membership_id')$$),
    ('invoices', 4, $$ironwod.j_id(p, 'location_id')$$),
    ('invoices', 5, $$ironwod.j_text(p, 'invoice_header_status')$$),
    ('invoices', 6, $$ironwod.j_date(p, 'payment_due')$$),
    ('invoices', 7, $$ironwod.j_date(p, 'paid_on_date')$$),
    ('invoices', 8, $$ironwod.j_num(p, 'final_charge')$$),
    ('locations', 1, $$ironwod.j_text(p, 'name')$$),
    ('locations', 2, $$ironwod.j_text(p, 'time_zone_iana')$$),
    ('locations', 3, $$ironwod.j_id(p, 'customer_id')$$),
    ('membership_holds', 1, $$ironwod.j_id(p, 'membership_id')$$),
    ('membership_holds', 2, $$ironwod.j_id(p, 'client_id')$$),
    ('membership_holds', 3, $$ironwod.j_date(p, 'hold_start_date')$$),
    ('membership_holds', 4, $$ironwod.j_date(p, 'hold_end_date')$$),
    ('membership_holds', 5, $$ironwod.j_text(p, 'hold_reason')$$),
    ('memberships', 1, $$ironwod.j_id(p, 'client_id')$$),
    ('memberships', 2, $$ironwod.j_text(p, 'name')$$),
    ('memberships', 3, $$ironwod.j_text(p, 'membership_type')$$),
    ('memberships', 4, $$coalesce(ironwod.j_bool(p, 'is_deleted'), false)$$),
    ('memberships', 5, $$ironwod.j_date(p, 'start_date')$$),
    ('memberships', 6, $$ironwod.j_date(p, 'end_date')$$),
    ('memberships', 7, $$ironwod.j_date(p, 'cancellation_requested_on')$$),
    ('memberships', 8, $$ironwod.j_bool(p, 'does_membership_expire')$$),
    ('memberships', 9, $$ironwod.j_bool(ironwod.j_plan(p), 'is_auto_renew')$$),
    ('memberships', 10, $$ironwod.j_num(ironwod.j_plan(p), 'price')$$),
    ('memberships', 11, $$ironwod.j_num(ironwod.j_plan(p), 'billing_period_length')::integer$$),
    ('memberships', 12, $$ironwod.j_text(ironwod.j_plan(p), 'billing_period_unit')$$),
    ('memberships', 13, $$ironwod.j_id(p, 'location_id')$$),
    ('memberships', 15, $$CASE WHEN ironwod.j_bool(p, 'is_deleted') THEN coalesce(l.source_updated_at, l.ingested_at) END$$),
    ('memberships', 16, $$CASE WHEN ironwod.j_bool(p, 'is_deleted') THEN l.ingest_run_id END$$),
    ('programs', 1, $$ironwod.j_text(p, 'name')$$),
    ('programs', 2, $$ironwod.j_bool(p, 'is_active')$$),
    ('transactions', 1, $$ironwod.j_id(p, 'invoice_id')$$),
    ('transactions', 2, $$ironwod.j_id(p, 'client_id')$$),
    ('transactions', 3, $$ironwod.j_id(p, 'location_id')$$),
    ('transactions', 4, $$ironwod.j_ts(p, 'transaction_date_time')$$),
    ('transactions', 5, $$ironwod.j_num(p, 'amount')$$),
    ('transactions', 6, $$ironwod.j_text(p, 'transaction_type')$$),
    ('transactions', 7, $$ironwod.j_text(p, 'payment_method')$$)
  ) AS n(entity, ord, expr)
 WHERE c.entity = n.entity AND c.ord = n.ord
   AND (to_jsonb(c) - 'installed_definition') = c.installed_definition;
SELECT ironwod.track_install_rows('ironwod.canonical_columns');

-- ---- the scope readers in C (src/ironwod.c) -----------------------------------
-- Every RLS policy's WITH CHECK calls both for each row a statement writes; the C
-- readers return the uuid the scope GUC was parsed into when it was set.

CREATE OR REPLACE FUNCTION ironwod.scope_tenant() RETURNS uuid
LANGUAGE c STABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'ironwod_scope_tenant_uuid';
CREATE OR REPLACE FUNCTION ironwod.scope_gym() RETURNS uuid
LANGUAGE c STABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'ironwod_scope_gym_uuid';

-- ---- the one refusal of a missing scope --------------------------------------
-- 1.0 copied the check "no ironwod scope is set in this transaction" into
-- assert_scope, transform_records, compute_metrics and refresh_metrics; they
-- call this instead (once per call: never RLS or a per-row path, which keep the
-- C readers above).  Same SQLSTATE (42501), message and hint.

CREATE FUNCTION ironwod.require_scope(OUT tenant_id uuid, OUT gym_id uuid)
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    tenant_id := ironwod.scope_tenant();
    gym_id := ironwod.scope_gym();
    IF tenant_id IS NULL OR gym_id IS NULL THEN
        RAISE EXCEPTION 'no ironwod scope is set in this transaction'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Call ironwod_set_scope(tenant, gym) in the same transaction first.';
    END IF;
END
$$;
COMMENT ON FUNCTION ironwod.require_scope() IS 'The (tenant, gym) of the current transaction''s scope; raises 42501 when none is set';
REVOKE ALL ON FUNCTION ironwod.require_scope() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ironwod.require_scope() TO ironwod_app, ironwod_admin, ironwod_worker;

CREATE OR REPLACE FUNCTION ironwod.assert_scope(p_tenant_id uuid, p_gym_id uuid)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_t uuid;
    v_g uuid;
BEGIN
    PERFORM ironwod.preloaded();
    IF p_tenant_id IS NULL OR p_gym_id IS NULL THEN
        RAISE EXCEPTION 'tenant and gym must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT * INTO v_t, v_g FROM ironwod.require_scope();
    IF (p_tenant_id, p_gym_id) IS DISTINCT FROM (v_t, v_g) THEN
        RAISE EXCEPTION 'tenant % gym % is outside the current ironwod scope', p_tenant_id, p_gym_id
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'A session can only act on the (tenant, gym) set by ironwod_set_scope().';
    END IF;
END
$$;

-- claim_run and fail_run lock the connection before the run, the order every
-- other path takes (a pause, a page in flight), so the two cannot deadlock.
CREATE OR REPLACE FUNCTION ironwod.claim_run(p_run_id bigint, p_pid integer)
RETURNS TABLE (mode text, api_key_ciphertext bytea, master_key_id text)
LANGUAGE plpgsql
AS $$
DECLARE
    -- The scope as values, so every statement routes to the tenant's shard on
    -- Citus (the FOR SHARE must).
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_mode text;
    v_now timestamptz := clock_timestamp();
BEGIN
    -- Lock order: the gym's connection row, then its run.  The page's
    -- transaction (hold_connection, src/land.c) and ironwod_pause take them in
    -- this order, so a path that took the run first (its UPDATE) and then the
    -- connection could deadlock with them.  NO KEY UPDATE, as the UPDATEs of
    -- the connection take: a run queued meanwhile (its foreign key) is not held up.
    PERFORM 1 FROM ironwod.integrations_wodify_connection c
     WHERE c.tenant_id = v_t AND c.gym_id = v_g FOR NO KEY UPDATE;
    -- A paused gym starts nothing, even a run queued by a call that raced the pause.
    IF EXISTS (SELECT 1 FROM ironwod.integrations_wodify_connection c
               WHERE c.tenant_id = v_t AND c.gym_id = v_g
                 AND c.status = 'paused') THEN
        UPDATE ironwod.sync_runs r
           SET status = 'cancelled', finished_at = v_now, last_error = 'paused'
         WHERE r.run_id = p_run_id AND r.status = 'queued'
           AND r.tenant_id = v_t AND r.gym_id = v_g;
        IF FOUND THEN
            PERFORM ironwod.log_run(v_t, v_g, p_run_id);
        END IF;
        RETURN;
    END IF;
    UPDATE ironwod.sync_runs r
       SET status = 'running', started_at = v_now, heartbeat_at = v_now,
           worker_pid = p_pid, phase = 'fetch'
     WHERE r.run_id = p_run_id AND r.status = 'queued' AND r.tenant_id = v_t AND r.gym_id = v_g
    RETURNING r.mode INTO v_mode;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.started', NULL, jsonb_build_object('mode', v_mode));
    -- A rotated key left waiting (its run ended without swapping it in) is
    -- swapped in now, before this run takes a key.
    PERFORM ironwod.apply_rotated_key(v_now);
    -- The row is locked since the start, so a rotation that committed
    -- meanwhile was waited for and is read here: no run claimed after a
    -- rotation commits gets the old key.
    RETURN QUERY
        SELECT v_mode, c.api_key_ciphertext, c.master_key_id
        FROM ironwod.integrations_wodify_connection c
        WHERE c.tenant_id = v_t AND c.gym_id = v_g AND c.status <> 'disconnected'
        FOR SHARE;
END
$$;

CREATE OR REPLACE FUNCTION ironwod.fail_run(p_run_id bigint, p_code text, p_message text, p_phase text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    -- The scope as values, so every statement routes to the tenant's shard on
    -- Citus (a FOR UPDATE must).
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_mode text;
    v_threshold int := current_setting('ironwod.breaker_threshold')::int;
    -- the master key command hangs, fails or prints garbage: every gym would
    -- fail the same way until an operator fixes it, so retrying on the next
    -- tick would only run it again and again
    v_keystore boolean := p_code IN ('key_command_timeout', 'key_command_failed', 'key_command_output');
    -- The failure time as a value: on Citus an UPDATE may carry no volatile
    -- function, and no non-immutable one inside a CASE or COALESCE.
    v_now timestamptz := clock_timestamp();
    v_failures integer;
    v_status text;
    v_opened timestamptz;
    v_retry timestamptz;
BEGIN
    -- Lock order: the gym's connection row, then its run.  The page's
    -- transaction (hold_connection, src/land.c) and ironwod_pause (and the watchdog's
    -- page in flight) take them in this order, so a path that took the run first (its UPDATE) and then the
    -- connection could deadlock with them.  NO KEY UPDATE, as the UPDATEs of
    -- the connection take: a run queued meanwhile (its foreign key) is not held up.
    PERFORM 1 FROM ironwod.integrations_wodify_connection c
     WHERE c.tenant_id = v_t AND c.gym_id = v_g FOR NO KEY UPDATE;
    PERFORM ironwod.count_requests(p_run_id, v_now, NULL);
    UPDATE ironwod.sync_runs r
       SET status = CASE WHEN p_code = 'quota' THEN 'deferred' ELSE 'failed' END,
           finished_at = v_now, error_code = p_code,
           last_error = left(p_message, 500), failed_phase = p_phase, phase = NULL
     WHERE r.tenant_id = v_t AND r.gym_id = v_g
       AND r.run_id = p_run_id AND r.status IN ('running', 'queued')
    RETURNING r.mode INTO v_mode;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- the run, which held the old key, is over: a rotated key takes its place
    PERFORM ironwod.apply_rotated_key(v_now);
    PERFORM ironwod.log_run(v_t, v_g, p_run_id);
    IF p_code = 'quota' THEN
        UPDATE ironwod.integrations_wodify_connection c
           SET next_retry_at = (date_trunc('month', v_now AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC',
               last_error_at = v_now, last_error = left(p_message, 500), last_error_code = p_code,
               updated_at = v_now
         WHERE c.tenant_id = v_t AND c.gym_id = v_g;
        PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.deferred', NULL,
            jsonb_build_object('code', p_code, 'message', left(p_message, 500)));
        RETURN;
    END IF;

    -- The breaker's next state computed from the row locked above, then
    -- written as values: on Citus a CASE in an UPDATE may hold no
    -- non-immutable expression, and timestamptz + interval is only stable.
    SELECT c.consecutive_failures + 1, c.status, c.breaker_opened_at, c.next_retry_at
    INTO v_failures, v_status, v_opened, v_retry
    FROM ironwod.integrations_wodify_connection c
    WHERE c.tenant_id = v_t AND c.gym_id = v_g;
    IF p_code = 'auth' OR v_keystore OR v_failures >= v_threshold THEN
        v_status := 'error';
        v_opened := coalesce(v_opened, v_now);
        v_retry := CASE WHEN p_code = 'auth' THEN NULL
                        WHEN v_keystore
                            THEN v_now + least(interval '24 hours', interval '5 minutes' * power(2, least(v_failures - 1, 10)))
                        ELSE v_now + least(interval '24 hours', interval '1 hour' * power(2, v_failures - v_threshold)) END;
    ELSE
        v_opened := NULL;
    END IF;
    UPDATE ironwod.integrations_wodify_connection c
       SET last_error_at = v_now, last_error = left(p_message, 500), last_error_code = p_code,
           consecutive_failures = v_failures, status = v_status,
           breaker_opened_at = v_opened, next_retry_at = v_retry, updated_at = v_now
     WHERE c.tenant_id = v_t AND c.gym_id = v_g;
    PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.failed', NULL,
        jsonb_build_object('code', p_code, 'phase', p_phase, 'message', left(p_message, 500)));
END
$$;

-- ---- Citus: statements routed to the tenant's shard --------------------------
-- compute_metrics forwards its SET clause (jit = off) to the Citus nodes for its
-- own statements between the stages, which the stages leave at the defaults;
-- plan_entity, transform_records and transform_step take the tenant and gym
-- their INSERT ... SELECTs write from a row of the gym (the run's, the
-- connection's), so Citus runs them on the shard instead of through the
-- coordinator.  Nothing changes on one node.  plan_entity, transform_records and
-- compute_metrics are defined here only, in their final form, with the changes
-- described above (planning, transforms in batches, narrowed refresh).

CREATE OR REPLACE FUNCTION ironwod.plan_entity(p_run_id bigint, p_entity text)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_t0 timestamptz := clock_timestamp();
    v_since timestamptz := ironwod.backfill_since();
    v_lookback interval := make_interval(days => current_setting('ironwod.lookback_days')::int);
    x record;
    v_sort text;
    v_from timestamptz;
    v_last_clean bigint;
    v_nestloop text;
    v_jit text;
    v_keys text[];
    v_urls text[];
    v_done text[] := '{}';
    v_total integer;
    v_skipped integer := 0;
    v_ms double precision;
BEGIN
    -- The registry row, the run, the connection's window and the entity's
    -- watermark: a row of a reference table and rows of the tenant's shard.
    SELECT e.ordinal, e.path, e.sort, e.backfill_strategy, e.window_field, e.incremental_field, e.due_field,
           r.mode, coalesce(r.started_at, now()) AS started, make_interval(days => c.sync_window_days) AS win,
           (SELECT k.watermark FROM ironwod.entity_cursors k
            WHERE k.tenant_id = v_t AND k.gym_id = v_g AND k.entity = p_entity) AS watermark
    INTO STRICT x
    FROM ironwod.entities e, ironwod.sync_runs r, ironwod.integrations_wodify_connection c
    WHERE e.entity = p_entity AND r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id = p_run_id
      AND c.tenant_id = v_t AND c.gym_id = v_g;
    v_sort := coalesce('&sort=' || ironwod.urlencode(x.sort), '');

    IF x.backfill_strategy = 'full' THEN
        v_keys := ARRAY['full'];
        v_urls := ARRAY[x.path || coalesce('?sort=' || ironwod.urlencode(x.sort), '')];

    ELSIF x.backfill_strategy = 'per_client' THEN
        -- The current version of every client, and its version as of the last
        -- clean run (the baseline the change detectors are compared with), by the
        -- version order of design.md §4.  A version landed by a failed run since
        -- then still counts as a change, so nothing is lost to a crash.  Only the
        -- typed detector columns are read, never a payload.
        SELECT coalesce(max(r.run_id), 0) INTO v_last_clean FROM ironwod.sync_runs r
        WHERE r.tenant_id = v_t AND r.gym_id = v_g
          AND r.status = 'succeeded' AND r.mode <> 'validate' AND r.run_id < p_run_id;
        v_nestloop := current_setting('enable_nestloop');
        v_jit := current_setting('jit');
        SET LOCAL enable_nestloop = off;
        SET LOCAL jit = off;
        WITH cur AS (
            SELECT DISTINCT ON (c.wodify_id) c.wodify_id, c.ingest_run_id, c.last_class_sign_in, c.total_class_sign_ins
            FROM ironwod.wodify_raw_clients c
            WHERE c.tenant_id = v_t AND c.gym_id = v_g
            ORDER BY c.wodify_id, c.source_updated_at DESC NULLS LAST, c.raw_id DESC
        ), base AS (
            SELECT DISTINCT ON (c.wodify_id) c.wodify_id, c.last_class_sign_in, c.total_class_sign_ins
            FROM ironwod.wodify_raw_clients c
            WHERE c.tenant_id = v_t AND c.gym_id = v_g AND c.ingest_run_id <= v_last_clean
              AND x.mode = 'incremental'
            ORDER BY c.wodify_id, c.source_updated_at DESC NULLS LAST, c.raw_id DESC
        ), picked AS (
            SELECT v.wodify_id,
                   CASE x.mode
                       WHEN 'backfill' THEN v_since
                       WHEN 'reconcile' THEN greatest(v_since, x.started - x.win)
                       ELSE greatest(v_since, coalesce(b.last_class_sign_in - v_lookback, v_since))
                   END AS since
            FROM cur v
            LEFT JOIN base b ON b.wodify_id = v.wodify_id
            WHERE CASE x.mode
                      WHEN 'backfill' THEN v.last_class_sign_in >= v_since
                      WHEN 'reconcile' THEN v.last_class_sign_in >= greatest(v_since, x.started - x.win)
                      ELSE v.ingest_run_id > v_last_clean
                           AND v.last_class_sign_in IS NOT NULL
                           AND (v.last_class_sign_in IS DISTINCT FROM b.last_class_sign_in
                                OR v.total_class_sign_ins IS DISTINCT FROM b.total_class_sign_ins)
                  END
        )
        SELECT coalesce(array_agg('client:' || p.wodify_id ORDER BY p.wodify_id), '{}'),
               coalesce(array_agg(replace(x.path, '{client_id}', p.wodify_id::text)
                                  || '?q=' || ironwod.urlencode(x.window_field || '|gte|' || ironwod.iso_utc(p.since))
                                  || v_sort ORDER BY p.wodify_id), '{}')
        INTO v_keys, v_urls
        FROM picked p;
        -- back to the caller's settings, on the node too
        EXECUTE format('SET LOCAL enable_nestloop = %s', v_nestloop);
        EXECUTE format('SET LOCAL jit = %s', v_jit);

    ELSIF x.mode = 'backfill' THEN
        -- The newest window is open-ended, so records stamped ahead of our
        -- clock (vendor clock skew) are not left between windows.
        SELECT array_agg(to_char(w AT TIME ZONE 'UTC', 'YYYY-MM') ORDER BY w DESC),
               array_agg(x.path || '?q=' || ironwod.urlencode(
                   x.window_field || '|gte|' || ironwod.iso_utc(w)
                   || CASE WHEN w < date_trunc('month', x.started AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                           THEN ';' || x.window_field || '|lt|'
                                || ironwod.iso_utc(((w AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC')
                           ELSE '' END)
                   || v_sort ORDER BY w DESC)
        INTO v_keys, v_urls
        FROM generate_series(date_trunc('month', x.started AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
                             v_since, interval '-1 month') AS w;

    ELSE
        v_keys := '{}';
        v_urls := '{}';
        IF x.mode = 'incremental' OR x.due_field IS NULL THEN
            IF x.mode = 'incremental' THEN
                v_from := greatest(v_since, coalesce(x.watermark - v_lookback, v_since));
            ELSE
                v_from := greatest(v_since, x.started - x.win);
            END IF;
            v_keys := v_keys || 'since'::text;
            v_urls := v_urls || (x.path || '?q=' || ironwod.urlencode(
                          CASE WHEN x.mode = 'incremental' THEN coalesce(x.incremental_field, x.window_field)
                               ELSE x.window_field END
                          || '|gte|' || ironwod.iso_utc(v_from)) || v_sort);
        END IF;
        IF x.due_field IS NOT NULL THEN
            -- Status changes (Unpaid -> Paid) carry no timestamp we can follow:
            -- re-scan by due date.
            v_keys := v_keys || 'due'::text;
            v_urls := v_urls || (x.path || '?q=' || ironwod.urlencode(x.due_field || '|gte|' || to_char(
                          (x.started AT TIME ZONE 'UTC')::date - CASE WHEN x.mode = 'incremental'
                              THEN current_setting('ironwod.due_window_days')::int
                              ELSE extract(day FROM x.win)::int END, 'YYYY-MM-DD'))
                          || '&sort=id');
        END IF;
    END IF;

    -- The windows the campaign already checkpointed, read into an array first
    -- and joined as one: Citus plans an outer join from a function (unnest) to
    -- a distributed table by planning the table as a subquery, and with the
    -- constant-false join clause of a run that is not a backfill that plan
    -- crashed the PostgreSQL planner (Citus 12.1.12, from
    -- RecursivelyPlanRecurringTupleOuterJoinWalker: SIGSEGV in
    -- deconstruct_jointree, the run worker lost).  Two arrays join like the
    -- table did (a hash join, linear in the units).
    IF x.mode = 'backfill' THEN
        SELECT coalesce(array_agg(b.window_key), '{}') INTO v_done
        FROM ironwod.backfill_checkpoints b
        WHERE b.tenant_id = v_t AND b.gym_id = v_g AND b.entity = p_entity;
    END IF;

    -- The units' tenant, gym and run come from the run's row (as in
    -- page_statement): Citus then runs this INSERT ... SELECT on the tenant's
    -- shard, where with the values as constants it pulled the rows to the
    -- coordinator and copied them back.  On one node the row is one probe of
    -- the primary key.  ON CONFLICT DO NOTHING (a unit is planned once; nothing
    -- conflicts) stays for a Citus that would run it through the coordinator:
    -- without ON CONFLICT or RETURNING it COPYs the rows into the shard, which
    -- row-level security refuses ("COPY FROM not supported with row-level
    -- security").
    INSERT INTO ironwod.run_units (tenant_id, gym_id, run_id, entity, ordinal, entity_ordinal, window_key, url, status)
    SELECT r.tenant_id, r.gym_id, r.run_id, p_entity, u.ord, x.ordinal, u.window_key, u.url,
           CASE WHEN d.window_key IS NULL THEN 'pending' ELSE 'skipped' END
    FROM ironwod.sync_runs r,
         unnest(v_keys, v_urls) WITH ORDINALITY AS u(window_key, url, ord)
         LEFT JOIN unnest(v_done) AS d(window_key) ON d.window_key = u.window_key
    WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id = p_run_id
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_total = ROW_COUNT;
    IF cardinality(v_done) > 0 THEN
        SELECT count(*) INTO v_skipped FROM ironwod.run_units u
        WHERE u.tenant_id = v_t AND u.gym_id = v_g AND u.run_id = p_run_id AND u.entity = p_entity
          AND u.status = 'skipped';
    END IF;
    v_ms := extract(epoch FROM clock_timestamp() - v_t0) * 1000;

    INSERT INTO ironwod.sync_run_entities AS s (tenant_id, gym_id, run_id, entity, units_total, units_skipped, plan_ms)
    VALUES (v_t, v_g, p_run_id, p_entity, v_total, v_skipped, v_ms)
    ON CONFLICT (tenant_id, gym_id, run_id, entity) DO UPDATE
       SET units_total = excluded.units_total, units_skipped = excluded.units_skipped, plan_ms = excluded.plan_ms;
    RETURN v_total - v_skipped;
END
$$;
COMMENT ON FUNCTION ironwod.plan_entity(bigint, text) IS 'Worker: derive an entity''s units of work once and persist them with the run (run_units); returns how many are left to fetch';


CREATE OR REPLACE FUNCTION ironwod.transform_records(p_run_id bigint)
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


CREATE OR REPLACE FUNCTION ironwod.transform_step(p_run_id bigint) RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_written jsonb := ironwod.transform_run(p_run_id);
    v_entities text[];
BEGIN
    v_entities := ARRAY(SELECT e.entity FROM ironwod.entities e
                        WHERE jsonb_typeof(v_written -> e.entity) = 'number'
                          AND (v_written ->> e.entity)::integer > 0);
    INSERT INTO ironwod.sync_run_entities AS s (tenant_id, gym_id, run_id, entity, transformed)
    SELECT r.tenant_id, r.gym_id, r.run_id, x.entity, (v_written ->> x.entity)::integer
    FROM ironwod.sync_runs r, unnest(v_entities) AS x(entity)
    WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id = p_run_id
    ON CONFLICT (tenant_id, gym_id, run_id, entity) DO UPDATE SET transformed = excluded.transformed;
    RETURN v_written;
END
$$;


CREATE OR REPLACE FUNCTION ironwod.compute_metrics(p_from date, p_people bigint[] DEFAULT NULL)
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
GRANT EXECUTE ON FUNCTION ironwod.compute_metrics(date, bigint[]) TO ironwod_worker;
REVOKE ALL ON FUNCTION ironwod.compute_metrics(date, bigint[]) FROM PUBLIC;


-- ---- landing several pages per transaction (ironwod.pages_per_commit) ----------

-- The units of one entity whose last pages a batch landed (src/land.c), in one
-- call: each is marked done (and checkpointed, in a backfill), and the entity is
-- closed when the batch held its last unit.  p_window_keys and
-- p_pages are parallel arrays (a unit's key, its pages; a batch completes at most
-- ironwod.pages_per_commit units).  Units already done (a page landed twice)
-- change nothing.  The units are found by their key, with = ANY over the unique
-- index, and their status is read, not tested in a WHERE: there,
-- status = 'pending' made the partial run_units_pending index usable on its
-- (tenant, gym, run) prefix, and a generic plan chose it, reading every pending
-- unit of the run for each unit done (quadratic in units).  Constant time per
-- unit.
CREATE FUNCTION ironwod.units_landed(p_run_id bigint, p_entity text, p_window_keys text[], p_pages integer[])
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_now timestamptz := clock_timestamp();
    v_found integer;
    v_keys text[];
    v_pages integer[];
    v_starts timestamptz[];
    v_ends timestamptz[];
    v_entity_done boolean;
BEGIN
    SELECT count(*)::integer,
           coalesce(array_agg(u.window_key ORDER BY u.ordinal) FILTER (WHERE u.status = 'pending'), '{}'),
           coalesce(array_agg(p_pages[array_position(p_window_keys, u.window_key)] ORDER BY u.ordinal)
                    FILTER (WHERE u.status = 'pending'), '{}')
      INTO v_found, v_keys, v_pages
      FROM ironwod.run_units u
     WHERE u.tenant_id = v_t AND u.gym_id = v_g AND u.run_id = p_run_id AND u.entity = p_entity
       AND u.window_key = ANY (p_window_keys);
    IF v_found <> cardinality(p_window_keys) THEN
        RAISE EXCEPTION 'run % did not plan every unit of % in %', p_run_id, p_entity, p_window_keys
            USING ERRCODE = 'internal_error';
    END IF;
    IF cardinality(v_keys) = 0 THEN
        RETURN;
    END IF;
    -- No function in FROM: Citus routes an UPDATE of one shard's rows whatever its
    -- expressions, as long as none is volatile (array_position is immutable).
    UPDATE ironwod.run_units u
       SET status = 'done', pages = v_pages[array_position(v_keys, u.window_key)], done_at = v_now
     WHERE u.tenant_id = v_t AND u.gym_id = v_g AND u.run_id = p_run_id AND u.entity = p_entity
       AND u.window_key = ANY (v_keys);
    IF (SELECT r.mode FROM ironwod.sync_runs r
        WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id = p_run_id) = 'backfill' THEN
        -- A month's bounds from its key, computed here rather than in the INSERT
        -- (Citus evaluates a statement's expressions before it ships it,
        -- whatever branch a CASE would take: "full-01" is no timestamp); the arrays are unnested side by side in the select list, as
        -- the landing statements do.
        SELECT array_agg(CASE WHEN k.window_key ~ '^\d{4}-\d{2}$'
                              THEN (k.window_key || '-01')::timestamp AT TIME ZONE 'UTC' END ORDER BY k.ord),
               array_agg(CASE WHEN k.window_key ~ '^\d{4}-\d{2}$'
                              THEN ((k.window_key || '-01')::timestamp + interval '1 month') AT TIME ZONE 'UTC' END
                         ORDER BY k.ord)
          INTO v_starts, v_ends
          FROM unnest(v_keys) WITH ORDINALITY AS k(window_key, ord);
        INSERT INTO ironwod.backfill_checkpoints
            (tenant_id, gym_id, entity, window_key, window_start, window_end, pages, records, completed_by)
        SELECT v_t, v_g, p_entity, unnest(v_keys), unnest(v_starts), unnest(v_ends), unnest(v_pages), 0, p_run_id
        ON CONFLICT DO NOTHING;
    END IF;
    UPDATE ironwod.sync_run_entities s SET units_done = s.units_done + cardinality(v_keys)
     WHERE s.tenant_id = v_t AND s.gym_id = v_g AND s.run_id = p_run_id AND s.entity = p_entity
    RETURNING s.units_done + s.units_skipped >= s.units_total INTO v_entity_done;
    IF v_entity_done THEN
        PERFORM ironwod.close_entity(p_run_id, p_entity);
    END IF;
END
$$;
COMMENT ON FUNCTION ironwod.units_landed(bigint, text, text[], integer[]) IS 'Worker: the units of an entity whose last pages a batch landed: mark them done, checkpoint them in a backfill, close the entity after its last unit';
REVOKE ALL ON FUNCTION ironwod.units_landed(bigint, text, text[], integer[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ironwod.units_landed(bigint, text, text[], integer[]) TO ironwod_worker;

-- A batch's units are marked done in one call (units_landed); the library calls
-- unit_landed only on 1.0's schema, so 1.1 has none.
DROP FUNCTION ironwod.unit_landed(bigint, text, text, integer);
