-- What only a Citus cluster can show, after the suites ran on it (test/citus/run.sh).
-- Runs on the coordinator as the superuser; prints "ok - ..." / "not ok - ..." lines.
\set QUIET on
\pset tuples_only on
\pset format unaligned
SET client_min_messages = error;

CREATE FUNCTION pg_temp.check(p_ok boolean, p_what text, p_detail text DEFAULT NULL) RETURNS text
LANGUAGE sql AS $$
    SELECT CASE WHEN coalesce(p_ok, false) THEN 'ok - ' ELSE 'not ok - ' END || p_what
           || CASE WHEN coalesce(p_ok, false) OR p_detail IS NULL THEN '' ELSE E'\n#   ' || p_detail END
$$;

-- Every ironwod table is known to Citus: tenant tables hash-distributed by tenant_id
-- in one co-location group, the tenant-less ones reference tables.
SELECT pg_temp.check(count(*) FILTER (WHERE d.logicalrelid IS NULL) = 0
                     AND count(*) FILTER (WHERE a.attname IS NOT NULL) > 0
                     AND bool_and(CASE WHEN a.attname IS NOT NULL
                                       THEN d.partmethod = 'h' AND column_to_column_name(d.logicalrelid, d.partkey) = 'tenant_id'
                                       ELSE d.partmethod = 'n' END)
                     AND count(DISTINCT d.colocationid) FILTER (WHERE a.attname IS NOT NULL) = 1,
                     'every tenant table is distributed by tenant_id in one co-location group, the others are reference tables',
                     string_agg(c.relname || ':' || coalesce(d.partmethod::text, 'local'), ', '))
FROM pg_class c
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped
LEFT JOIN pg_dist_partition d ON d.logicalrelid = c.oid
WHERE c.relnamespace = 'ironwod'::regnamespace AND c.relkind IN ('r', 'p') AND NOT c.relispartition;

-- distribute() again converts nothing, and restores the shards' column privileges.
CREATE TEMP TABLE dist_before AS SELECT logicalrelid, partmethod, colocationid FROM pg_dist_partition;
SELECT pg_temp.check(count(*) > 0, 'a column privilege revoked on a shard, for the next check', string_agg(result, '; '))
FROM run_command_on_placements('ironwod.integrations_wodify_connection', 'REVOKE SELECT (status) ON %s FROM ironwod_app')
WHERE success;
CALL ironwod.distribute();
SELECT pg_temp.check(NOT EXISTS (SELECT logicalrelid, partmethod, colocationid FROM pg_dist_partition
                                 EXCEPT SELECT * FROM dist_before)
                     AND (SELECT count(*) FROM pg_dist_partition) = (SELECT count(*) FROM dist_before),
                     'ironwod.distribute() again converts nothing');
SELECT pg_temp.check(bool_and(success AND result = 't'),
                     'ironwod.distribute() again restores the column privileges on every shard',
                     string_agg(result, '; '))
FROM run_command_on_placements('ironwod.integrations_wodify_connection',
                               $$SELECT has_column_privilege('ironwod_app', '%1$s', 'status', 'SELECT')
                                        AND NOT has_column_privilege('ironwod_app', '%1$s', 'api_key_ciphertext', 'SELECT')$$);

-- On a worker node it refuses, with its SQLSTATE.
SELECT pg_temp.check(bool_and(NOT success AND result LIKE '%is not a Citus coordinator%'),
                     'ironwod.distribute() on a worker node raises "not a Citus coordinator"',
                     string_agg(result, '; '))
FROM run_command_on_workers('CALL ironwod.distribute()');

-- Row-level security is enabled and forced on every shard (and reference-table
-- placement), with the coordinator's policies.
CREATE TEMP TABLE shard_rls AS
SELECT d.logicalrelid::text AS table_name, p.shardid, p.nodeport, p.success, p.result
FROM pg_dist_partition d
JOIN pg_class c ON c.oid = d.logicalrelid AND c.relnamespace = 'ironwod'::regnamespace,
     LATERAL run_command_on_placements(d.logicalrelid,
         $$SELECT relrowsecurity AND relforcerowsecurity AND
                  (SELECT count(*) FROM pg_policy WHERE polrelid = '%1$s'::regclass) > 0
           FROM pg_class WHERE oid = '%1$s'::regclass$$) p;
SELECT pg_temp.check(count(*) > 0 AND bool_and(success AND result = 't'),
                     format('RLS enabled, forced and with policies on all %s shard placements', count(*)),
                     string_agg(table_name || '/' || shardid || '@' || nodeport || ': ' || result, ', ')
                         FILTER (WHERE NOT (success AND result = 't')))
FROM shard_rls;

-- Each tenant's rows physically live on one node: read every placement of every
-- distributed table on its node, and count the nodes each tenant appears on.
CREATE TEMP TABLE tenant_nodes AS
SELECT t.tenant_id, d.logicalrelid::text AS table_name, p.nodeport
FROM pg_dist_partition d
JOIN pg_class c ON c.oid = d.logicalrelid AND c.relnamespace = 'ironwod'::regnamespace,
     LATERAL run_command_on_placements(d.logicalrelid,
         $$SELECT coalesce(string_agg(DISTINCT tenant_id::text, ','), '') FROM %s$$) p,
     LATERAL unnest(string_to_array(nullif(p.result, ''), ',')) AS t(tenant_id)
WHERE d.partmethod = 'h';
SELECT pg_temp.check(count(*) >= 3 AND bool_and(n_nodes = 1),
                     format('each of %s tenants has all its rows, in every table, on one node', count(*)),
                     string_agg(tenant_id || ' on ' || n_nodes || ' nodes', ', ') FILTER (WHERE n_nodes <> 1))
FROM (SELECT tenant_id, count(DISTINCT nodeport) AS n_nodes FROM tenant_nodes GROUP BY tenant_id) x;
SELECT pg_temp.check(count(DISTINCT nodeport) = 2,
                     'the tenants are spread over both worker nodes',
                     string_agg(DISTINCT nodeport::text, ', '))
FROM tenant_nodes;

-- A tenant-scoped dashboard read is routed to one shard: the statement
-- ironwod_dashboard runs, planned by Citus.
CREATE FUNCTION pg_temp.plan_tasks(p_sql text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    line text;
    tasks text := '';
BEGIN
    FOR line IN EXECUTE 'EXPLAIN ' || p_sql LOOP
        IF line ~ 'Task Count:' THEN
            tasks := tasks || trim(line);
        END IF;
    END LOOP;
    RETURN tasks;
END
$$;
SELECT pg_temp.check(tasks = 'Task Count: 1', 'a tenant-scoped dashboard read touches one shard (EXPLAIN)', tasks)
FROM pg_temp.plan_tasks($$
    SELECT c.* FROM ironwod.gym_monthly_metrics_cache c
    WHERE c.tenant_id = '11111111-1111-1111-1111-111111111111' AND c.gym_id = 'aaaaaaaa-0000-0000-0000-000000000001'
      AND c.location_key = 'ALL' AND c.program_key = 'ALL'
      AND c.month_start BETWEEN date '2024-01-01' AND date '2024-12-01'
    ORDER BY c.month_start$$) AS tasks;

-- A function's SET clauses do not reach the nodes that plan its statements;
-- ironwod.forward_set_clauses does (transform_records and apply_vanished call
-- it): a statement routed to the tenant's shard reads the settings there.
CREATE FUNCTION pg_temp.node_settings() RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v text;
BEGIN
    EXECUTE $q$SELECT current_setting('enable_seqscan') || ',' || current_setting('enable_sort') || ','
                      || current_setting('jit')
               FROM ironwod.gym_monthly_metrics_cache
               WHERE tenant_id = '11111111-1111-1111-1111-111111111111'
                 AND gym_id = 'aaaaaaaa-0000-0000-0000-000000000001' LIMIT 1$q$ INTO v;
    RETURN v;
END
$$;
CREATE FUNCTION pg_temp.node_settings_in_set_clause() RETURNS text
LANGUAGE plpgsql SET enable_seqscan = off SET enable_sort = off SET jit = off
AS $$ BEGIN RETURN pg_temp.node_settings(); END $$;
BEGIN;
SELECT ironwod_set_scope('11111111-1111-1111-1111-111111111111', 'aaaaaaaa-0000-0000-0000-000000000001') \g /dev/null
SELECT pg_temp.node_settings_in_set_clause() AS in_clause \gset
SELECT ironwod.forward_set_clauses('ironwod.transform_records(bigint)', true) \g /dev/null
SELECT pg_temp.node_settings() AS forwarded \gset
SELECT ironwod.forward_set_clauses('ironwod.transform_records(bigint)', false) \g /dev/null
SELECT pg_temp.node_settings() AS reset \gset
COMMIT;
SELECT pg_temp.check(:'in_clause' = 'on,on,on', 'a SET clause does not reach the node (enable_seqscan, enable_sort, jit there)',
                     :'in_clause');
SELECT pg_temp.check(:'forwarded' = 'off,off,off' AND :'reset' = 'on,on,on',
                     'forward_set_clauses sets transform_records'' SET clauses on the tenant''s node, and back',
                     :'forwarded' || ' then ' || :'reset');

-- compute_metrics runs its own statements between the stages on the tenant's
-- node with its SET clause (jit = off), forwarded (forward_set_clauses), and
-- the stages' with theirs: a probe on the cache's shard placements (a
-- statement trigger writing to a table of each worker node's own) records the
-- settings every UPDATE of the cache ran with there, the stages' (the pooled
-- figures) and compute_metrics' own (the watermark, the masking of unknowns).
-- Without the forwarding its own ran with the defaults the last stage left.
SELECT count(*) FILTER (WHERE NOT success) AS probe_failures FROM run_command_on_workers($cmd$
    SET citus.enable_ddl_propagation TO off;
    CREATE TABLE public.node_settings_probe (jit text, nestloop text);
    GRANT INSERT ON public.node_settings_probe TO PUBLIC;
    CREATE FUNCTION public.node_settings_probe() RETURNS trigger LANGUAGE plpgsql AS $f$
    BEGIN
        INSERT INTO public.node_settings_probe VALUES (current_setting('jit'), current_setting('enable_nestloop'));
        RETURN NULL;
    END $f$$cmd$) \gset
SELECT count(*) FILTER (WHERE NOT success) + :probe_failures AS probe_failures
FROM run_command_on_placements('ironwod.gym_monthly_metrics_cache',
    'CREATE TRIGGER node_settings_probe AFTER UPDATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION public.node_settings_probe()') \gset
BEGIN;
SELECT ironwod_set_scope('11111111-1111-1111-1111-111111111111', 'aaaaaaaa-0000-0000-0000-000000000001') \g /dev/null
SELECT ironwod.refresh_metrics_all() \g /dev/null
COMMIT;
SELECT coalesce(string_agg(result, ',' ORDER BY result), '') AS probed FROM run_command_on_workers(
    $$SELECT coalesce(string_agg(DISTINCT jit || '/' || nestloop, ','), '') FROM public.node_settings_probe$$)
WHERE result <> '' \gset
SELECT count(*) FILTER (WHERE NOT success) + :probe_failures AS probe_failures
FROM run_command_on_placements('ironwod.gym_monthly_metrics_cache', 'DROP TRIGGER node_settings_probe ON %s') \gset
SELECT count(*) FILTER (WHERE NOT success) + :probe_failures AS probe_failures FROM run_command_on_workers($cmd$
    SET citus.enable_ddl_propagation TO off;
    DROP FUNCTION public.node_settings_probe();
    DROP TABLE public.node_settings_probe$cmd$) \gset
SELECT pg_temp.check(:probe_failures = 0 AND :'probed' = 'off/off,off/on',
                     'compute_metrics runs its own statements on the tenant''s node with its SET clause (jit off), its stages with theirs (nested loops off too)',
                     'the cache''s UPDATEs there ran with jit/enable_nestloop = ' || :'probed' || '; probe failures: ' || :probe_failures);

-- ironwod.payload_hash(entity, payload) over every raw row of every tenant: Citus
-- runs it on the shards' nodes, where it reads the registry (a reference table)
-- from the node's own placement; every hash a run stored is the recomputed one
-- (07_metrics_cases writes its raw fixtures without a run, with hashes of its own).
CREATE FUNCTION pg_temp.raw_hashes() RETURNS TABLE (entity text, n bigint, same bigint)
LANGUAGE plpgsql AS $$
DECLARE
    e record;
BEGIN
    FOR e IN SELECT x.entity, x.raw_table FROM ironwod.entities x ORDER BY x.ordinal LOOP
        entity := e.entity;
        EXECUTE format('SELECT count(*), count(*) FILTER (WHERE ironwod.payload_hash(%L, r.payload_json) = r.payload_hash)
                        FROM ironwod.%I r
                        JOIN ironwod.sync_runs s
                          ON s.tenant_id = r.tenant_id AND s.gym_id = r.gym_id AND s.run_id = r.ingest_run_id',
                       e.entity, e.raw_table) INTO n, same;
        RETURN NEXT;
    END LOOP;
END
$$;
SELECT pg_temp.check(sum(n) > 1000 AND bool_and(n = same) AND count(*) FILTER (WHERE n > 0) >= 6,
                     format('ironwod.payload_hash(entity, payload) runs on the shards: %s raw rows, every stored hash recomputed',
                            sum(n)),
                     string_agg(entity || ': ' || same || ' of ' || n, ', '))
FROM pg_temp.raw_hashes();
