-- pgTAP: the plan of a gym's first transform of an entity does not depend on the
-- raw table's statistics.  A backfill transforms rows landed seconds before, which
-- the statistics have not seen: the planner estimates the gym at a row or two,
-- and with sorts allowed it reads the gym by a bitmap scan and sorts every
-- payload for DISTINCT ON (for a medium gym's sign-ins an external sort of
-- 54 MB) instead of reading the (wodify_id, payload_hash) index in its order
-- and sorting each record's few versions.  The
-- statement is planned here under transform_records' own settings (proconfig),
-- on 20,000 sign-ins of a gym the statistics have never seen, and run as the
-- transform of the run (1) that landed them.
--
-- On Citus the nodes plan the statement, which the function's SET clauses never
-- reach: ironwod.forward_set_clauses SET LOCALs them where Citus forwards SET
-- LOCAL (citus.propagate_set_commands = 'local'), and does nothing elsewhere
-- (test/citus/checks.sql shows a node reading them).
--
-- The statement's text is built first, outside the transaction: building it
-- reads the registry, on Citus reference tables read by local execution, after
-- which Citus refuses, in the same transaction, to EXPLAIN the statement's task
-- on the coordinator over a connection to itself ("cannot switch local
-- execution status").
SELECT ironwod.transform_sql('class_signins', false, false, true) AS gym_sql \gset
BEGIN;
SELECT plan(8);
SET LOCAL client_min_messages = warning;

INSERT INTO ironwod.integrations_wodify_connection (tenant_id, gym_id, status)
VALUES ('f8000000-0000-0000-0000-000000000000', 'f8000000-0000-0000-0000-000000000001', 'disconnected');
INSERT INTO ironwod.wodify_raw_class_signins (tenant_id, gym_id, wodify_id, payload_json, payload_hash,
                                              source_updated_at, ingest_run_id, last_seen_run_id)
SELECT 'f8000000-0000-0000-0000-000000000000', 'f8000000-0000-0000-0000-000000000001', i, p,
       sha256(convert_to(p::text, 'UTF8')), '2024-01-01 00:00Z'::timestamptz + i * interval '1 minute', 1, 1
FROM generate_series(1, 20000) AS i,
     LATERAL (SELECT jsonb_build_object('id', i, 'client_id', 1 + i % 300, 'class_id', 1 + i % 700,
                                        'utc_class_start_datetime', '2024-01-01T06:00:00Z', 'location_id', 1001,
                                        'program_id', 11, 'membership_id', 0, 'is_drop_in', false) AS p) x;

SELECT set_config(split_part(c, '=', 1), substr(c, strpos(c, '=') + 1), true)
FROM pg_proc p, unnest(p.proconfig) AS c
WHERE p.oid = 'ironwod.transform_records(bigint)'::regprocedure;
-- and on Citus on the node that plans the statement, as transform_records does
SELECT ironwod_set_scope('f8000000-0000-0000-0000-000000000000', 'f8000000-0000-0000-0000-000000000001');
SELECT ironwod.forward_set_clauses('ironwod.transform_records(bigint)', true);

-- The plan of p_sql (EXPLAIN, FORMAT JSON) with the test gym's parameters.
CREATE FUNCTION pg_temp.plan_json(p_sql text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_plan jsonb;
BEGIN
    EXECUTE 'EXPLAIN (FORMAT JSON) ' || p_sql INTO v_plan
    USING 'f8000000-0000-0000-0000-000000000000'::uuid, 'f8000000-0000-0000-0000-000000000001'::uuid,
          'UTC'::text, NULL::bigint[];
    RETURN v_plan;
END $$;
CREATE FUNCTION pg_temp.plan_nodes(p_sql text) RETURNS text[]
LANGUAGE sql AS $$
    SELECT ARRAY(SELECT jsonb_path_query(pg_temp.plan_json(p_sql), 'strict $.**."Node Type"') #>> '{}')
$$;
-- The presorted keys of the plan's incremental sort (NULL without one).
CREATE FUNCTION pg_temp.presorted(p_sql text) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT jsonb_path_query_first(pg_temp.plan_json(p_sql),
                                  'strict $.** ? (@."Node Type" == "Incremental Sort")."Presorted Key"')
$$;

CREATE FUNCTION pg_temp.planner_settings() RETURNS text LANGUAGE sql AS $$
    SELECT current_setting('enable_seqscan') || ',' || current_setting('enable_sort') || ',' || current_setting('jit')
$$;

SELECT ok(NOT pg_temp.plan_nodes(:'gym_sql') && '{Sort}',
          'the whole-gym insert sorts no gym''s worth of versions, whatever the estimate');
SELECT is(pg_temp.presorted(:'gym_sql'), '["r.wodify_id"]'::jsonb,
          'it sorts only each record''s versions: an incremental sort of the index''s order of Wodify ids');
SELECT ok(NOT pg_temp.plan_nodes(:'gym_sql') && '{"Bitmap Heap Scan"}',
          'it reads the gym by the (wodify_id, payload_hash) index, not by a bitmap');

SELECT ironwod_set_scope('f8000000-0000-0000-0000-000000000000', 'f8000000-0000-0000-0000-000000000001');
SELECT is((ironwod.transform_records(1) ->> 'class_signins')::integer, 20000, 'and the transform writes every sign-in');
-- The gym's first sign-ins touch every month for everyone: noted as such, not
-- computed from each row (transform_records).
-- (read first: on Citus a test function around a read of a distributed table
-- runs on a worker node, where pgTAP has no plan)
SELECT (d.dirty_from, d.changed, d.member_ids)::text AS noted FROM ironwod.metric_dirty d
WHERE d.run_id = 1 AND d.entity = 'class_signins' \gset
SELECT is(:'noted', ROW(date '0001-01-01', 20000, NULL::bigint[])::text,
          'the gym''s first rows of an entity are noted as changing every month, people not known');

SET LOCAL enable_seqscan = on;
SET LOCAL enable_sort = on;
SET LOCAL jit = on;
SET LOCAL citus.propagate_set_commands = 'none';
SELECT ironwod.forward_set_clauses('ironwod.transform_records(bigint)', true);
SELECT is(pg_temp.planner_settings(), 'on,on,on',
          'forward_set_clauses sets nothing where SET LOCAL is not forwarded (one node: no change)');
SET LOCAL citus.propagate_set_commands = 'local';
SELECT ironwod.forward_set_clauses('ironwod.transform_records(bigint)', true);
SELECT is(pg_temp.planner_settings(), 'off,off,off',
          'where Citus forwards SET LOCAL it sets transform_records'' SET clauses for the transaction');
SELECT ironwod.forward_set_clauses('ironwod.transform_records(bigint)', false);
SELECT is(pg_temp.planner_settings(),
          (SELECT string_agg(reset_val, ',' ORDER BY name) FROM pg_settings
           WHERE name IN ('enable_seqscan', 'enable_sort', 'jit')),
          'and with false sets them back to their defaults');

SELECT * FROM finish();
ROLLBACK;
