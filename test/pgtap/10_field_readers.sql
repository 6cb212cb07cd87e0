-- pgTAP: the mapping's field readers (src/fields.c) give what the expressions
-- they replaced give, for every kind of value a field can hold: each reader
-- against its expression, over records holding one value each (strings, numbers,
-- the sentinels, booleans, null, containers, a missing key, a record that is not
-- an object), and the same errors where the expression raises one.
BEGIN;
SELECT plan(12);

CREATE TEMP TABLE v (p jsonb);
INSERT INTO v (p)
SELECT jsonb_build_object('f', x.f)
FROM (VALUES ('"12"'::jsonb), ('12'), ('0'), ('"0"'), ('0.4'), ('1.5'), ('"1.5"'), ('-7'), ('"-7"'), ('""'),
             ('"12a"'), ('"٣"'), ('null'), ('true'), ('false'), ('"true"'), ('"t"'), ('"1"'), ('"off"'),
             ('"2025-03-01"'), ('"2025-03-01T10:00:00Z"'), ('"2025-03-01T10:00:00+02:00"'),
             ('"2025-03-01 10:00"'), ('"1900-01-01"'), ('"1900-01-01T00:00:00Z"'), ('20250301'),
             ('"Class Plan"'), ('"  "'), ('{"a": 1}'), ('[1, 2]'), ('[]'), ('{}'), ('12.50'),
             ('"12.50"'), ('"-3.25"'), ('"1e3"'), ('1e3'), ('123456789012')) AS x(f)
UNION ALL VALUES ('{"g": 1}'::jsonb), ('[1]'), ('"f"'), ('3'), ('null');

-- The expression and the reader on every record, as text (NULL as NULL).
CREATE FUNCTION pg_temp.differ(p_old text, p_new text, p_where text DEFAULT 'true') RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    EXECUTE format('SELECT count(*) FROM (SELECT p FROM v WHERE %s OFFSET 0) v WHERE (%s)::text IS DISTINCT FROM (%s)::text',
                   p_where, p_old, p_new)
        INTO n;
    RETURN n;
END $$;

SELECT is(pg_temp.differ($$ironwod.j_id(p -> 'f')$$, $$ironwod.j_id(p, 'f')$$), 0::bigint,
          'j_id(p, k) is j_id(p -> k)');
SELECT is(pg_temp.differ($$ironwod.j_num(p -> 'f')$$, $$ironwod.j_num(p, 'f')$$), 0::bigint,
          'j_num(p, k) is j_num(p -> k)');
SELECT is(pg_temp.differ($$ironwod.parse_ts(p ->> 'f')$$, $$ironwod.j_ts(p, 'f')$$), 0::bigint,
          'j_ts(p, k) is parse_ts(p ->> k)');
SELECT is(pg_temp.differ($$ironwod.j_text(p ->> 'f')$$, $$ironwod.j_text(p, 'f')$$), 0::bigint,
          'j_text(p, k) is j_text(p ->> k)');
-- the boolean cast raises on most strings: compared where it does not
SELECT is(pg_temp.differ($$ironwod.j_date(p ->> 'f')$$, $$ironwod.j_date(p, 'f')$$), 0::bigint,
          'j_date(p, k) is j_date(p ->> k)');
SELECT is(pg_temp.differ($$(p ->> 'f')::boolean$$, $$ironwod.j_bool(p, 'f')$$,
                         $$jsonb_typeof(p -> 'f') IN ('boolean', 'null') OR p -> 'f' IS NULL
                           OR p ->> 'f' IN ('true', 'false', 't', '1', 'off', '0')$$),
          0::bigint, 'j_bool(p, k) is (p ->> k)::boolean');
SELECT is((SELECT count(*) FROM v WHERE ironwod.j_id(p, 'f') IS NOT NULL), 10::bigint,
          'and they are not all NULL: ten of the values are ids');

-- the same errors
SELECT throws_ok($$SELECT ironwod.j_id('{"f": 1e30}'::jsonb, 'f')$$, '22003', 'bigint out of range',
                 'an id beyond bigint raises, as j_id(p -> k) does');
SELECT throws_ok($$SELECT ironwod.j_id('{"f": 1e30}'::jsonb -> 'f')$$, '22003', 'bigint out of range',
                 'j_id(p -> k) on it');
SELECT throws_ok($$SELECT ironwod.j_bool('{"f": "maybe"}'::jsonb, 'f')$$, '22P02', NULL,
                 'a string that is no boolean raises, as the cast does');
SELECT throws_ok($$SELECT ironwod.j_date('{"f": "2024-02-30"}'::jsonb, 'f')$$, '22008', NULL,
                 'an impossible date raises, as j_date(p ->> k) does');
SELECT throws_ok($$SELECT ironwod.j_date('{"f": "2024-02-30"}'::jsonb ->> 'f')$$, '22008', NULL,
                 'j_date(p ->> k) on it');

SELECT * FROM finish();
ROLLBACK;
