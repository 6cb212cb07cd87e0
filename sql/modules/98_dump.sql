-- 98_dump: what pg_dump carries.  Tables and sequences an extension creates are
-- left out of a dump unless registered with pg_extension_config_dump, so without
-- this a restored database would have no connections, raw rows, runs, watermarks,
-- caches or master keys.  Registration happens here, at the end of the install
-- script, so it covers every table the modules before it created; an upgrade
-- script that adds a table calls ironwod.register_config_dump() again at its
-- end, and a pgTAP test fails for any ironwod table or sequence not registered.
--
-- Rows the install script itself writes must not be dumped as they are:
-- CREATE EXTENSION writes them again before pg_restore loads the dump's data,
-- and a second copy would collide.  Such rows live in the tables without a
-- tenant: the entity registry and the raw -> canonical maps.  An administrator
-- may edit such a row (a path, a page size) to follow the live API, and the edit
-- must survive a restore.  So those tables remember what the install script
-- wrote (installed_definition), are dumped with a filter that keeps exactly the
-- rows that differ from it (or were added), and an insert of a row whose key
-- already exists updates that row instead: that is how pg_restore lays edited
-- rows over the fresh defaults.  Unedited rows are not dumped at all, so a dump
-- restored into a newer version gets that version's defaults.

-- Inserting a row whose primary key exists updates that row (every column but
-- the key) and skips the insert.  Generic over the table's columns, so columns
-- added later are carried too; an UPDATE (not DELETE + INSERT), so rows that
-- other tables reference by foreign key stay put.
CREATE FUNCTION ironwod.restore_merge() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_key text;
    v_set text;
    v_n bigint;
BEGIN
    SELECT string_agg(format('t.%1$I = ($1).%1$I', a.attname), ' AND ')
    INTO v_key
    FROM pg_constraint c
    JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
    WHERE c.conrelid = TG_RELID AND c.contype = 'p';
    SELECT string_agg(format('%1$I = ($1).%1$I', a.attname), ', ')
    INTO v_set
    FROM pg_attribute a
    WHERE a.attrelid = TG_RELID AND a.attnum > 0 AND NOT a.attisdropped
      AND a.attgenerated = '' AND a.attidentity = ''
      AND a.attnum <> ALL (SELECT unnest(c.conkey) FROM pg_constraint c
                           WHERE c.conrelid = TG_RELID AND c.contype = 'p');
    IF v_key IS NULL THEN
        RETURN NEW;
    END IF;
    IF v_set IS NULL THEN
        EXECUTE format('SELECT count(*) FROM %s t WHERE %s', TG_RELID::regclass, v_key) INTO v_n USING NEW;
    ELSE
        EXECUTE format('UPDATE %s t SET %s WHERE %s', TG_RELID::regclass, v_set, v_key) USING NEW;
        GET DIAGNOSTICS v_n = ROW_COUNT;
    END IF;
    RETURN CASE WHEN v_n > 0 THEN NULL ELSE NEW END;
END
$$;
COMMENT ON FUNCTION ironwod.restore_merge() IS 'Trigger on tables with install-time rows: an insert of an existing key updates that row instead (how pg_restore restores edited rows over the defaults CREATE EXTENSION wrote)';

-- Make a table's current rows its install-time rows: remember each as written,
-- and merge inserts of existing keys.  Install and upgrade scripts only.
CREATE FUNCTION ironwod.track_install_rows(p_table regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format('ALTER TABLE %s ADD COLUMN IF NOT EXISTS installed_definition jsonb', p_table);
    EXECUTE format('COMMENT ON COLUMN %s.installed_definition IS %L', p_table,
                   'The row as the install script wrote it (without this column); rows that differ from it are edits and go into pg_dump');
    EXECUTE format('UPDATE %s t SET installed_definition = to_jsonb(t) - ''installed_definition'' WHERE installed_definition IS NULL',
                   p_table);
    IF NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = p_table AND g.tgname = 'ironwod_restore_merge') THEN
        EXECUTE format('CREATE TRIGGER ironwod_restore_merge BEFORE INSERT ON %s FOR EACH ROW EXECUTE FUNCTION ironwod.restore_merge()',
                       p_table);
    END IF;
END
$$;
COMMENT ON FUNCTION ironwod.track_install_rows(regclass) IS 'Install and upgrade scripts only: record a table''s rows as written by the script (installed_definition) and merge restored rows over them';

-- Register every table and sequence of schema ironwod that belongs to the
-- extension: in full, except the tables with install-time rows, which are
-- dumped filtered to the rows that differ from them.  pg_extension_config_dump
-- replaces an earlier registration, so calling this again (from an upgrade
-- script) is safe; outside CREATE/ALTER EXTENSION it raises.
CREATE FUNCTION ironwod.register_config_dump() RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
    n integer := 0;
BEGIN
    FOR r IN
        SELECT c.oid::regclass AS rel, c.relname,
               EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid
                       AND a.attname = 'installed_definition' AND NOT a.attisdropped) AS filtered
        FROM pg_class c
        JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
        JOIN pg_extension x ON x.oid = d.refobjid AND x.extname = 'ironwod'
        WHERE c.relnamespace = 'ironwod'::regnamespace AND c.relkind IN ('r', 'p', 'S')
        ORDER BY c.relname
    LOOP
        -- pg_dump reads the table as "FROM ONLY ironwod.<name>", so the row is <name>.
        PERFORM pg_extension_config_dump(r.rel,
            CASE WHEN r.filtered
                 THEN format($f$WHERE (pg_catalog.to_jsonb(%1$I) OPERATOR(pg_catalog.-) 'installed_definition') IS DISTINCT FROM installed_definition$f$,
                             r.relname)
                 ELSE '' END);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
COMMENT ON FUNCTION ironwod.register_config_dump() IS 'Install and upgrade scripts only: register every ironwod table and sequence with pg_extension_config_dump (tables with install-time rows filtered to edited or added rows)';

-- The tables without a tenant that the modules before filled: their rows are
-- the install script's.
SELECT ironwod.track_install_rows(c.oid::regclass)
FROM pg_class c
WHERE c.relnamespace = 'ironwod'::regnamespace AND c.relkind = 'r'
  AND NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'tenant_id')
  AND (xpath('/row/n/text()', query_to_xml(format('SELECT count(*) > 0 AS n FROM %s', c.oid::regclass),
                                            false, true, '')))[1]::text = 'true'
ORDER BY c.relname;
SELECT ironwod.register_config_dump();

REVOKE ALL ON FUNCTION ironwod.restore_merge(), ironwod.track_install_rows(regclass),
    ironwod.register_config_dump() FROM PUBLIC;
