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
-- Program breakdowns (issue 9, metrics.md §2.5): memberships gain program_ids,
-- the programs each one gives access to (wodify-api.md §11), mapped from the raw
-- payload by ironwod.j_ids.  The update fills it for the memberships 1.0 already
-- holds, from the raw version each canonical row was built from, so the canonical
-- rows equal what a fresh transform of the same raw rows writes (a replay).

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
-- plan_entity reads the checkpointed windows into an array before it plans the
-- units (on Citus, the outer join from the units to backfill_checkpoints crashed
-- the planner in every run that was not a backfill).
CREATE OR REPLACE FUNCTION ironwod.plan_entity(p_run_id bigint, p_entity text)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_t0 timestamptz := clock_timestamp();
    v_mode text;
    v_ordinal integer;
    v_keys text[];
    v_urls text[];
    v_done text[];
    v_total integer;
    v_skipped integer;
    v_ms double precision;
BEGIN
    SELECT r.mode INTO STRICT v_mode FROM ironwod.sync_runs r
    WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id = p_run_id;
    SELECT x.ordinal INTO STRICT v_ordinal FROM ironwod.entities x WHERE x.entity = p_entity;
    SELECT coalesce(array_agg(u.window_key ORDER BY u.ord), '{}'), coalesce(array_agg(u.url ORDER BY u.ord), '{}')
    INTO v_keys, v_urls
    FROM ironwod.plan_units(p_run_id, p_entity) WITH ORDINALITY AS u(window_key, url, ord);
    -- The windows the campaign already checkpointed, read into an array first
    -- and joined as one: Citus plans an outer join from a function (unnest) to
    -- a distributed table by planning the table as a subquery, and with the
    -- constant-false join clause of a run that is not a backfill that plan
    -- crashed the PostgreSQL planner (Citus 12.1.12, from
    -- RecursivelyPlanRecurringTupleOuterJoinWalker: SIGSEGV in
    -- deconstruct_jointree, the run worker lost).  Two arrays join like the
    -- table did (a hash join, linear in the units).
    SELECT coalesce(array_agg(b.window_key), '{}') INTO v_done
    FROM ironwod.backfill_checkpoints b
    WHERE b.tenant_id = v_t AND b.gym_id = v_g AND b.entity = p_entity AND v_mode = 'backfill';

    -- ON CONFLICT DO NOTHING (a unit is planned once; nothing conflicts) for
    -- Citus: it runs this INSERT ... SELECT through the coordinator, and without
    -- ON CONFLICT or RETURNING it would COPY the rows into the shard, which
    -- row-level security refuses ("COPY FROM not supported with row-level
    -- security").
    INSERT INTO ironwod.run_units (tenant_id, gym_id, run_id, entity, ordinal, entity_ordinal, window_key, url, status)
    SELECT v_t, v_g, p_run_id, p_entity, u.ord, v_ordinal, u.window_key, u.url,
           CASE WHEN d.window_key IS NULL THEN 'pending' ELSE 'skipped' END
    FROM unnest(v_keys, v_urls) WITH ORDINALITY AS u(window_key, url, ord)
    LEFT JOIN unnest(v_done) AS d(window_key) ON d.window_key = u.window_key
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_total = ROW_COUNT;
    SELECT count(*) INTO v_skipped FROM ironwod.run_units u
    WHERE u.tenant_id = v_t AND u.gym_id = v_g AND u.run_id = p_run_id AND u.entity = p_entity
      AND u.status = 'skipped';
    v_ms := extract(epoch FROM clock_timestamp() - v_t0) * 1000;

    INSERT INTO ironwod.sync_run_entities AS s (tenant_id, gym_id, run_id, entity, units_total, units_skipped, plan_ms)
    VALUES (v_t, v_g, p_run_id, p_entity, v_total, v_skipped, v_ms)
    ON CONFLICT (tenant_id, gym_id, run_id, entity) DO UPDATE
       SET units_total = excluded.units_total, units_skipped = excluded.units_skipped, plan_ms = excluded.plan_ms;
    RETURN v_total - v_skipped;
END
$$;
COMMENT ON FUNCTION ironwod.plan_entity(bigint, text) IS 'Worker: derive an entity''s units of work once and persist them with the run (run_units); returns how many are left to fetch';
