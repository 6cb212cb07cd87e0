-- pgTAP: pg_dump carries every ironwod table and sequence.  A table or sequence
-- that is not registered with pg_extension_config_dump would silently be missing
-- from every backup; this fails for any that a later module or upgrade forgets.
BEGIN;
SELECT plan(6);

CREATE TEMP VIEW ironwod_relations AS
    SELECT c.oid, c.relname, c.relkind
    FROM pg_class c
    JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
    JOIN pg_extension x ON x.oid = d.refobjid AND x.extname = 'ironwod'
    WHERE c.relnamespace = 'ironwod'::regnamespace AND c.relkind IN ('r', 'p', 'S');
CREATE TEMP VIEW registered AS
    SELECT unnest(extconfig) AS oid, unnest(extcondition) AS condition
    FROM pg_extension WHERE extname = 'ironwod';

SELECT is((SELECT string_agg(relname, ', ' ORDER BY relname) FROM ironwod_relations r
           WHERE r.relkind <> 'S' AND r.oid NOT IN (SELECT oid FROM registered)),
          NULL, 'every ironwod table is registered with pg_extension_config_dump');
SELECT is((SELECT string_agg(relname, ', ' ORDER BY relname) FROM ironwod_relations r
           WHERE r.relkind = 'S' AND r.oid NOT IN (SELECT oid FROM registered)),
          NULL, 'every ironwod sequence (identity ones included) is registered');
SELECT is((SELECT string_agg(r.oid::regclass::text, ', ' ORDER BY 1) FROM registered g
           JOIN pg_class r ON r.oid = g.oid
           WHERE (g.condition <> '') <> EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = r.oid
                                                AND a.attname = 'installed_definition')
              OR (g.condition <> '' AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = r.oid
                                                AND a.attname = 'tenant_id'))),
          NULL, 'tenant tables are dumped in full; only tables with install-time rows are filtered');
SELECT cmp_ok((SELECT count(*) FROM ironwod_relations WHERE relkind = 'r'), '>=', 30::bigint,
              'the check sees the tables (it is not vacuous)');

-- The registry filter keeps exactly the rows that differ from the install script's.
CREATE TEMP TABLE dumped_before AS
    SELECT entity FROM ironwod.entities WHERE
    (to_jsonb(entities) - 'installed_definition') IS DISTINCT FROM installed_definition;
UPDATE ironwod.entities SET page_size = page_size - 1 WHERE entity = 'clients';
SELECT is((SELECT string_agg(e.entity, ',') FROM ironwod.entities e
           WHERE (to_jsonb(e) - 'installed_definition') IS DISTINCT FROM e.installed_definition
             AND e.entity NOT IN (SELECT entity FROM dumped_before)),
          'clients', 'an edited registry row is dumped; the unedited ones are not');

SELECT ok((SELECT count(*) FROM registered WHERE condition <> '') >= 1
          AND 'ironwod.entities'::regclass IN (SELECT oid FROM registered WHERE condition <> ''),
          'the entity registry is one of the filtered tables');

SELECT * FROM finish();
ROLLBACK;
