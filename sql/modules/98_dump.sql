-- 98_dump: what pg_dump carries.  Tables and sequences an extension creates are
-- left out of a dump unless registered with pg_extension_config_dump, so without
-- this a restored database would have no connections, raw rows, runs, watermarks,
-- caches or master keys.  Registration happens here, near the end of the install
-- script, so it covers every table the modules before it created; tables added
-- later (a module after this one, or an upgrade script) call
-- ironwod.register_config_dump() again, and a pgTAP test fails for any ironwod
-- table or sequence that is not registered.
--
-- Rows the install script itself creates must not be dumped (CREATE EXTENSION
-- recreates them before the dump's data is restored, and a second copy would
-- collide).  The only such rows are the entity registry's.  An administrator may
-- edit a registry row (a path, a page size) to follow the live API; such an edit
-- must survive a restore, so the registry is dumped with a filter that keeps
-- exactly the rows that differ from what the install script wrote (and rows an
-- administrator added), and an insert of an entity that already exists replaces
-- it, which is how pg_restore lays the edited rows over the fresh defaults.

-- What the install script wrote, per registry row, for the dump filter.  An
-- upgrade script that changes a default row updates installed_definition with it.
ALTER TABLE ironwod.entities ADD COLUMN installed_definition jsonb;
COMMENT ON COLUMN ironwod.entities.installed_definition IS 'The row as the install script wrote it (without this column); rows that differ from it are customized and go into pg_dump';
UPDATE ironwod.entities e SET installed_definition = to_jsonb(e) - 'installed_definition';

-- pg_restore runs CREATE EXTENSION (which writes the default rows) and then COPYs
-- the dumped registry rows: each replaces its default.  No UPDATE here, so the
-- trigger stays independent of the registry's columns.
CREATE FUNCTION ironwod.entities_replace() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM ironwod.entities e WHERE e.entity = NEW.entity;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION ironwod.entities_replace() IS 'Trigger: inserting an entity that is already registered replaces it (how pg_restore restores edited registry rows over the defaults CREATE EXTENSION wrote)';
CREATE TRIGGER entities_replace BEFORE INSERT ON ironwod.entities
    FOR EACH ROW EXECUTE FUNCTION ironwod.entities_replace();

-- Register every table and sequence of schema ironwod that belongs to the
-- extension: tenant data and history in full, the registry filtered as above.
-- pg_extension_config_dump replaces an earlier registration, so calling this
-- again (from an upgrade script) is safe; outside CREATE/ALTER EXTENSION it
-- raises.
CREATE FUNCTION ironwod.register_config_dump() RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    r record;
    n integer := 0;
BEGIN
    FOR r IN
        SELECT c.oid::regclass AS rel, c.relname
        FROM pg_class c
        JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
        JOIN pg_extension x ON x.oid = d.refobjid AND x.extname = 'ironwod'
        WHERE c.relnamespace = 'ironwod'::regnamespace AND c.relkind IN ('r', 'p', 'S')
        ORDER BY c.relname
    LOOP
        PERFORM pg_catalog.pg_extension_config_dump(r.rel,
            CASE WHEN r.relname = 'entities'
                 THEN $f$WHERE (pg_catalog.to_jsonb(entities) OPERATOR(pg_catalog.-) 'installed_definition') IS DISTINCT FROM installed_definition$f$
                 ELSE '' END);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
COMMENT ON FUNCTION ironwod.register_config_dump() IS 'Install and upgrade scripts only: register every ironwod table and sequence with pg_extension_config_dump (the entity registry with a filter that keeps only edited or added rows)';
SELECT ironwod.register_config_dump();

REVOKE ALL ON FUNCTION ironwod.entities_replace(), ironwod.register_config_dump() FROM PUBLIC;
