-- pgTAP: a transform maps only the version of each record it keeps, the latest
-- by source_updated_at (NULL oldest), then raw id (latest_raw_versions): an
-- older version whose mapping would raise must not stop the transform.  Wodify
-- sends a record again when it changes, and an older version may hold what the
-- mapping rejects: the date and datetime readers turn garbage into NULL, but a
-- boolean field holding anything but a boolean raises (j_bool casts its text),
-- as an integer column given a number out of range would.  Both paths are
-- shown: a gym's first transform of an entity (the whole-gym insert,
-- transform_sql's p_gym) and a later one over the records a run landed (the
-- batched upsert).
BEGIN;
SELECT plan(8);
SET LOCAL client_min_messages = warning;

INSERT INTO ironwod.integrations_wodify_connection (tenant_id, gym_id, status)
VALUES ('f9000000-0000-0000-0000-000000000000', 'f9000000-0000-0000-0000-000000000001', 'disconnected');
SELECT ironwod_set_scope('f9000000-0000-0000-0000-000000000000', 'f9000000-0000-0000-0000-000000000001');

SELECT throws_ok($$SELECT ironwod.j_bool('{"is_drop_in": "maybe"}'::jsonb, 'is_drop_in')$$, '22P02', NULL,
                 'a boolean field holding garbage raises: mapping such a version fails');

-- Versions of sign-ins, inserted in this order (raw ids ascending), each good
-- one is_drop_in true, each bad one "maybe":
--   1: bad, then good with a later update time
--   2: good, then bad with an earlier update time (a higher raw id that is older)
--   3: good, then bad with no update time (NULL is the oldest)
--   4: bad, then good with the same update time (the higher raw id is later)
CREATE FUNCTION pg_temp.version(p_id bigint, p_good boolean, p_updated timestamptz, p_run bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ironwod.wodify_raw_class_signins (tenant_id, gym_id, wodify_id, payload_json, payload_hash,
                                                  source_updated_at, ingest_run_id, last_seen_run_id)
    SELECT 'f9000000-0000-0000-0000-000000000000', 'f9000000-0000-0000-0000-000000000001', p_id, x.p,
           sha256(convert_to(format('%s|%s|%s', x.p, p_updated, p_run), 'UTF8')), p_updated, p_run, p_run
    FROM (SELECT jsonb_build_object('id', p_id, 'client_id', 7, 'class_id', 70,
                                    'utc_class_start_datetime', '2024-03-01T06:00:00Z', 'location_id', 1001,
                                    'program_id', 11, 'membership_id', 0,
                                    'is_drop_in', CASE WHEN p_good THEN to_jsonb(true) ELSE to_jsonb('maybe'::text) END)
                 AS p) x;
END
$$;
SELECT pg_temp.version(1, false, '2024-03-01 07:00Z', 1);
SELECT pg_temp.version(1, true, '2024-03-02 07:00Z', 1);
SELECT pg_temp.version(2, true, '2024-03-02 07:00Z', 1);
SELECT pg_temp.version(2, false, '2024-03-01 07:00Z', 1);
SELECT pg_temp.version(3, true, '2024-03-02 07:00Z', 1);
SELECT pg_temp.version(3, false, NULL, 1);
SELECT pg_temp.version(4, false, '2024-03-02 07:00Z', 1);
SELECT pg_temp.version(4, true, '2024-03-02 07:00Z', 1);

-- The canonical rows, each with whether it came from the good version.
CREATE FUNCTION pg_temp.rows() RETURNS text
LANGUAGE sql AS $$
    SELECT string_agg(a.signin_id || '=' || coalesce(a.is_drop_in::text, '?')
                      || CASE WHEN r.payload_json ->> 'is_drop_in' = 'true' THEN '' ELSE '(bad)' END,
                      ',' ORDER BY a.signin_id)
    FROM ironwod.attendance_events a
    JOIN ironwod.wodify_raw_class_signins r ON r.tenant_id = a.tenant_id AND r.gym_id = a.gym_id
                                           AND r.raw_id = a.raw_id
    WHERE a.tenant_id = 'f9000000-0000-0000-0000-000000000000' AND a.gym_id = 'f9000000-0000-0000-0000-000000000001'
$$;

-- (read first: on Citus a test function around a read of a distributed table
-- runs on a worker node, where pgTAP has no plan)
SELECT count(*) AS before FROM ironwod.attendance_events
WHERE tenant_id = 'f9000000-0000-0000-0000-000000000000' AND gym_id = 'f9000000-0000-0000-0000-000000000001' \gset
SELECT is(:before::bigint, 0::bigint, 'the gym has no sign-ins yet: its first transform is the whole-gym insert');
SELECT lives_ok('SELECT ironwod.transform_records(1)',
                'the gym''s first transform succeeds although older versions would not map');
SELECT is(pg_temp.rows(), '1=true,2=true,3=true,4=true',
          'and each record is its latest version: by update time, NULL oldest, then raw id');

-- A later run: an older bad version of 1 and a new record 5; the records have
-- canonical rows now, so this is the batched upsert over the run's records.
SELECT pg_temp.version(1, false, '2024-02-01 07:00Z', 2);
SELECT pg_temp.version(5, true, '2024-03-02 07:00Z', 2);
SELECT lives_ok('SELECT ironwod.transform_records(2)',
                'a later transform over the run''s records succeeds too');
SELECT is(pg_temp.rows(), '1=true,2=true,3=true,4=true,5=true',
          'keeping the latest version of 1 and adding 5');

-- And where the latest version is the bad one, the transform does fail: the
-- test above is not passing because nothing is mapped.
SELECT pg_temp.version(5, false, '2024-03-03 07:00Z', 3);
SELECT throws_ok('SELECT ironwod.transform_records(3)', '22P02', NULL,
                 'a latest version that cannot be mapped fails the transform');
SELECT is(pg_temp.rows(), '1=true,2=true,3=true,4=true,5=true', 'nothing of it is written');

SELECT * FROM finish();
ROLLBACK;
