-- Install ironwod and check the contract of what it creates: roles, API placement,
-- forced RLS everywhere, nothing for PUBLIC, and the supervisor at work.
CREATE EXTENSION ironwod;
-- Under make test-citus (test/citus/run.sh) the tables are distributed at once,
-- before anything lands; the output is the same either way.
\getenv distribute IRONWOD_TEST_DISTRIBUTE
\if :{?distribute}
SET client_min_messages = warning;
CALL ironwod.distribute();
RESET client_min_messages;
\endif
-- The tests act as host apps do: through LOGIN roles granted ironwod_app and
-- ironwod_admin (on Citus the coordinator reaches the nodes as the current user,
-- and the NOLOGIN group roles cannot log in there).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ironwod_test_app') THEN
        CREATE ROLE ironwod_test_app LOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ironwod_test_admin') THEN
        CREATE ROLE ironwod_test_admin LOGIN;
    END IF;
END
$$;
GRANT ironwod_app TO ironwod_test_app;
GRANT ironwod_admin TO ironwod_test_admin;
SELECT extname, extversion FROM pg_extension WHERE extname = 'ironwod';

SELECT rolname, rolcanlogin, rolsuper, rolbypassrls
FROM pg_roles WHERE rolname IN ('ironwod_app', 'ironwod_admin', 'ironwod_worker') ORDER BY 1;

-- The API lands in the schema CREATE EXTENSION targets (public); storage in ironwod.
SELECT p.oid::regprocedure AS api
FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace AND p.proname LIKE 'ironwod\_%'
ORDER BY 1::text;

-- Every table has row-level security enabled and forced.
SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity
FROM pg_class c WHERE c.relnamespace = 'ironwod'::regnamespace AND c.relkind = 'r'
  AND NOT (c.relrowsecurity AND c.relforcerowsecurity);
SELECT count(*) AS tables_with_forced_rls
FROM pg_class c WHERE c.relnamespace = 'ironwod'::regnamespace AND c.relkind = 'r'
  AND c.relrowsecurity AND c.relforcerowsecurity;

-- Nothing granted to PUBLIC: no table, sequence or function privilege (a NULL
-- proacl would mean the default EXECUTE for PUBLIC).
SELECT c.oid::regclass AS public_table
FROM pg_class c, aclexplode(c.relacl) a
WHERE c.relnamespace = 'ironwod'::regnamespace AND a.grantee = 0;
SELECT p.oid::regprocedure AS public_function
FROM pg_proc p
WHERE (p.pronamespace = 'ironwod'::regnamespace OR p.proname LIKE 'ironwod\_%')
  AND (p.proacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a WHERE a.grantee = 0));

-- SECURITY DEFINER functions all pin search_path.
SELECT p.oid::regprocedure AS definer_without_search_path
FROM pg_proc p
WHERE p.prosecdef AND (p.pronamespace = 'ironwod'::regnamespace OR p.proname LIKE 'ironwod\_%')
  AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search\_path=%');

-- The app role may not read the ciphertext column; the worker role may.
SELECT has_column_privilege('ironwod_app', 'ironwod.integrations_wodify_connection', 'api_key_ciphertext', 'SELECT') AS app_reads_ciphertext,
       has_column_privilege('ironwod_worker', 'ironwod.integrations_wodify_connection', 'api_key_ciphertext', 'SELECT') AS worker_reads_ciphertext;
-- Nor the ciphertext of a rotated key waiting for its run.
SELECT has_column_privilege('ironwod_app', 'ironwod.integrations_wodify_connection', 'next_api_key_ciphertext', 'SELECT') AS app_reads_next_ciphertext;

-- The entity registry, in sync order.
SELECT entity, path, records_key, backfill_strategy FROM ironwod.entities ORDER BY ordinal;

-- The supervisor serves this database.
SELECT count(*) AS supervisors FROM pg_stat_activity
WHERE backend_type = 'ironwod supervisor' AND datname = current_database();

-- Master key: register the development public key; the API hands it out.
SELECT ironwod.register_master_key(key_id, public_key) FROM test_dev_key;
SELECT key_id, length(public_key) AS public_key_bytes FROM ironwod_public_key();
SELECT ironwod.register_master_key('short', '\x0102'::bytea);

-- Helpers for the later tests: run a statement and report its SQLSTATE, and count
-- raw rows and distinct records per entity in the current scope.
CREATE FUNCTION public.try(p_sql text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE p_sql;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;
CREATE FUNCTION public.raw_counts(OUT entity text, OUT n_rows bigint, OUT n_records bigint)
RETURNS SETOF record
LANGUAGE plpgsql AS $$
DECLARE
    e record;
BEGIN
    FOR e IN SELECT x.entity, x.raw_table FROM ironwod.entities x ORDER BY x.ordinal LOOP
        entity := e.entity;
        EXECUTE format('SELECT count(*), count(DISTINCT wodify_id) FROM ironwod.%I
                        WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym()',
                       e.raw_table) INTO n_rows, n_records;
        RETURN NEXT;
    END LOOP;
END
$$;
-- The newest run of a mode in the current scope (RLS decides what "current" sees).
-- plpgsql, not SQL: Citus cannot plan a parameterised SQL function's body.
CREATE FUNCTION public.last_run(p_mode text) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT max(run_id) FROM ironwod.sync_runs
            WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym() AND mode = p_mode);
END
$$;
GRANT EXECUTE ON FUNCTION public.try(text), public.raw_counts(), public.last_run(text) TO ironwod_app;
GRANT SELECT ON public.sim_gyms TO ironwod_app;
