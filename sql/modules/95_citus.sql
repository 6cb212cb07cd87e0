-- 95_citus: scaling out.  On a Citus coordinator, CALL ironwod.distribute() spreads
-- every tenant table over the worker nodes by tenant_id, all in one co-location
-- group, so one tenant's rows (raw, canonical, facts, caches, runs) live on one
-- node and a statement that names the tenant runs there alone.  The tables
-- without tenant_id (the entity registry, the master public keys) become reference
-- tables, copied to every node, so joins with them stay local.  On plain
-- PostgreSQL nothing here runs: CREATE EXTENSION ironwod is the same with or
-- without Citus.
--
-- A procedure, because it works in two transactions: Citus creates the shards in
-- the first, and only once they are committed can the second reach them to give
-- them the column privileges Citus does not copy (see below).  For the same
-- reason it carries no SET clause (a procedure with one cannot commit) and
-- qualifies every name instead.

CREATE PROCEDURE ironwod.distribute()
LANGUAGE plpgsql
AS $$
DECLARE
    v_anchor regclass;
    v_next regclass;
    v_pending regclass[];
    v_had_data boolean;
    v_converted regclass[] := '{}';
    v_distributed integer := 0;
    v_reference integer := 0;
    v_failed text;
    v_messages text := pg_catalog.current_setting('client_min_messages');
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        RAISE EXCEPTION 'Citus is not installed in this database'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'ironwod.distribute() needs a Citus coordinator: preload citus, CREATE EXTENSION citus, add the worker nodes with citus_add_node(), then call it there.';
    END IF;
    IF NOT pg_catalog.citus_is_coordinator() THEN
        RAISE EXCEPTION 'this node is not a Citus coordinator with worker nodes'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Call ironwod.distribute() on the coordinator, after citus_set_coordinator_host() and citus_add_node() for each worker.';
    END IF;
    -- Citus's per-table NOTICEs (copying local data) are noise here.
    SET LOCAL client_min_messages = warning;
    -- Converting a table that a local table references makes Citus turn the
    -- whole local foreign-key graph into Citus local tables first, which fails
    -- for extension tables (their shells already exist on the nodes: "relation
    -- canonical_maps already exists").  The loop below converts referenced
    -- tables first, so nothing is left for that conversion to do.
    SET LOCAL citus.enable_local_reference_table_foreign_keys = off;

    -- Citus refuses triggers on reference tables.  The only ones (98_dump) lay
    -- restored rows over the install-time rows in a single-node pg_restore,
    -- which is not how a Citus cluster is backed up and restored.
    FOR v_next IN
        SELECT g.tgrelid::regclass FROM pg_catalog.pg_trigger g
        JOIN pg_catalog.pg_class c ON c.oid = g.tgrelid
        WHERE g.tgname = 'ironwod_restore_merge' AND c.relnamespace = 'ironwod'::regnamespace
    LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER ironwod_restore_merge ON %s', v_next);
    END LOOP;

    -- Generic over the schema: whatever tables later modules (or later versions)
    -- add are found by their columns, not listed here.  Tables with tenant_id are
    -- distributed by it, co-located with the first one Citus already distributed
    -- (a repeated call) or the first distributed here; the others become
    -- reference tables.  In foreign-key order: Citus converts a table only when
    -- every table it references is converted already (a reference table may
    -- reference only reference tables, a distributed one its group and reference
    -- tables), and the tenant-less ones first (Citus cannot create a reference
    -- table in a transaction that already wrote shards in parallel); asked to convert a table whose referenced table is still local, it
    -- turns the whole local foreign-key graph into Citus local tables and the
    -- later conversion of those fails.  One Citus call per table is the only way
    -- to convert one: a loop.
    SELECT d.logicalrelid INTO v_anchor FROM pg_catalog.pg_dist_partition d
    JOIN pg_catalog.pg_class c ON c.oid = d.logicalrelid
    WHERE c.relnamespace = 'ironwod'::regnamespace AND d.partmethod = 'h'
    ORDER BY c.relname LIMIT 1;
    LOOP
        SELECT pg_catalog.array_agg(c.oid::regclass
                                    ORDER BY EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                                                     WHERE a.attrelid = c.oid AND a.attname = 'tenant_id'
                                                       AND NOT a.attisdropped), c.relname)
        INTO v_pending FROM pg_catalog.pg_class c
        WHERE c.relnamespace = 'ironwod'::regnamespace AND c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition d WHERE d.logicalrelid = c.oid);
        EXIT WHEN v_pending IS NULL;
        -- The first pending table whose foreign keys all point at tables Citus
        -- already knows (or at itself).
        SELECT p.t INTO v_next FROM pg_catalog.unnest(v_pending) WITH ORDINALITY AS p(t, ord)
        WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint k
                          WHERE k.conrelid = p.t AND k.contype = 'f' AND k.confrelid <> p.t
                            AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition d
                                            WHERE d.logicalrelid = k.confrelid))
        ORDER BY p.ord LIMIT 1;
        IF v_next IS NULL THEN
            RAISE EXCEPTION 'cannot order the distribution of %: their foreign keys form a cycle or point outside Citus', v_pending
                USING ERRCODE = 'invalid_foreign_key';
        END IF;
        EXECUTE pg_catalog.format('SELECT EXISTS (SELECT 1 FROM %s)', v_next) INTO v_had_data;
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                       WHERE a.attrelid = v_next AND a.attname = 'tenant_id' AND NOT a.attisdropped) THEN
            PERFORM pg_catalog.create_reference_table(v_next);
            v_reference := v_reference + 1;
        ELSIF v_anchor IS NULL THEN
            PERFORM pg_catalog.create_distributed_table(v_next, 'tenant_id');
            v_anchor := v_next;
            v_distributed := v_distributed + 1;
        ELSE
            PERFORM pg_catalog.create_distributed_table(v_next, 'tenant_id', colocate_with => v_anchor::text);
            v_distributed := v_distributed + 1;
        END IF;
        IF v_had_data THEN
            v_converted := v_converted || v_next;
        END IF;
    END LOOP;

    -- Citus copied existing rows to the shards; the coordinator's local copies are
    -- dead weight now.
    PERFORM pg_catalog.truncate_local_data_after_distributing_table(t) FROM pg_catalog.unnest(v_converted) t;
    PERFORM pg_catalog.set_config('client_min_messages', v_messages, true);
    IF v_distributed + v_reference > 0 THEN
        COMMIT;
    END IF;

    -- Citus gives new shards the tables' privileges but not their column
    -- privileges (the app's SELECT on every connection column but the
    -- ciphertext), nor does it propagate a column GRANT: a query the coordinator
    -- allowed would be refused on the node.  So grant them on every placement, in
    -- every call (GRANT is idempotent): calling distribute() again after moving or
    -- splitting shards restores them.
    SELECT pg_catalog.string_agg(r.result, '; ') INTO v_failed
    FROM (SELECT c.oid::regclass AS rel, x.privilege_type AS priv, x.grantee::regrole::text AS grantee,
                 pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum) AS cols
          FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_dist_partition d ON d.logicalrelid = c.oid
          JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attacl IS NOT NULL AND NOT a.attisdropped,
               LATERAL pg_catalog.aclexplode(a.attacl) x
          WHERE c.relnamespace = 'ironwod'::regnamespace AND x.grantee <> 0
          GROUP BY 1, 2, 3) g,
         LATERAL pg_catalog.run_command_on_placements(g.rel,
             pg_catalog.format('GRANT %s (%s) ON %%s TO %I', g.priv, g.cols, g.grantee)) r
    WHERE NOT r.success;
    IF v_failed IS NOT NULL THEN
        RAISE EXCEPTION 'could not grant column privileges on the shards: %', v_failed
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Check that every worker node is reachable, then CALL ironwod.distribute() again.';
    END IF;
    RAISE NOTICE 'ironwod: % tables newly distributed by tenant_id, % newly reference tables', v_distributed, v_reference;
END
$$;
COMMENT ON PROCEDURE ironwod.distribute() IS 'Admin, on a Citus coordinator: distribute every tenant table by tenant_id (one co-location group), make the tenant-less tables reference tables, and give the shards the column privileges Citus does not copy; idempotent';
REVOKE ALL ON PROCEDURE ironwod.distribute() FROM PUBLIC;
