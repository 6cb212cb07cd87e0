-- Connecting a gym: malformed, rejected and good keys, scope checks, both overloads.
\set ta '''11111111-1111-1111-1111-111111111111'''
\set tb '''22222222-2222-2222-2222-222222222222'''
\set g1 '''aaaaaaaa-0000-0000-0000-000000000001'''
\set g2 '''aaaaaaaa-0000-0000-0000-000000000002'''
-- Keys are sealed here, outside PostgreSQL, as a host app seals them
-- (test/seal.py, to ironwod_public_key()); the sealed value is never printed.
\getenv srcdir PG_ABS_SRCDIR
SELECT key_id AS kid, encode(public_key, 'hex') AS pub FROM ironwod_public_key() \gset
SELECT api_key AS key0 FROM sim_gyms WHERE idx = 0 \gset
\set other 'wdfy_sealed_for_another_gym'
\set sealed_other `printf %s :'other' | /usr/bin/python3 :'srcdir'/seal.py :ta :g2 :'kid' :'pub'`
\set sealed_good `printf %s :'key0' | /usr/bin/python3 :'srcdir'/seal.py :ta :g1 :'kid' :'pub'`

-- No scope: nothing may be done.
SELECT try(format('SELECT ironwod_connect(%L, %L, %L::bytea)', :ta, :g1, '\x00'));
SELECT try(format('SELECT ironwod_status(%L, %L)', :ta, :g1));

BEGIN;
SELECT ironwod_set_scope(:ta, :g1);
-- Another tenant than the scope is refused.
SELECT try(format('SELECT ironwod_connect(%L, %L, %L::bytea)', :tb, :g1, '\x00'));
-- Malformed sealed keys.
SELECT try(format('SELECT ironwod_connect(%L, %L, %L::bytea)', :ta, :g1, '\x00010203'));
-- A key as text is refused while ironwod.allow_plaintext_keys is off (the
-- default), and so is sealing one in the backend; the hint names the sealed path.
SHOW ironwod.allow_plaintext_keys;
SELECT try(format('SELECT ironwod_connect(%L, %L, %L::text)', :ta, :g1, 'wdfy_not_a_real_key'));
SELECT try(format('SELECT ironwod.seal_key(%L, %L, %L)', :ta, :g1, 'wdfy_not_a_real_key'));
SELECT ironwod_connect(:ta, :g1, 'wdfy_not_a_real_key'::text);
ROLLBACK;
-- Only a superuser may turn it on.
SET ROLE ironwod_test_app;
SELECT try('SET ironwod.allow_plaintext_keys = on');
RESET ROLE;
-- Turned on (by this superuser session), the text overload works again.
SET ironwod.allow_plaintext_keys = on;
BEGIN;
SELECT ironwod_set_scope(:ta, :g1);
SELECT try(format('SELECT ironwod_connect(%L, %L, %L::text)', :ta, :g1, ''));
-- A key sealed for another gym does not open here.
SELECT try(format('SELECT ironwod_connect(%L, %L, %L::bytea)', :ta, :g1, :'sealed_other'));
-- A key Wodify rejects raises and leaves nothing behind.
SELECT try(format('SELECT ironwod_connect(%L, %L, %L::text)', :ta, :g1, 'wdfy_not_a_real_key'));
SELECT count(*) AS connections_after_bad_key FROM ironwod.integrations_wodify_connection;
-- Unknown gym.
SELECT try(format('SELECT ironwod_sync(%L, %L)', :ta, :g1));
-- A good key, through the sealed bytea path: connected, backfill queued.
SELECT ironwod_connect(:ta, :g1, :'sealed_good'::bytea);
COMMIT;

BEGIN;
SELECT ironwod_set_scope(:ta, :g1);
SELECT status, api_key_fingerprint ~ '^[0-9a-f]{12}\.\.\..{4}$' AS fingerprint_shape,
       right(api_key_fingerprint, 4) = right((SELECT api_key FROM sim_gyms WHERE idx = 0), 4) AS fingerprint_tail,
       active_run_mode
FROM ironwod_status(:ta, :g1);
-- The backfill is queued or already running: the supervisor may have picked it up.
SELECT mode, CASE WHEN status IN ('queued', 'running') THEN 'active' ELSE status END AS status
FROM ironwod.sync_runs ORDER BY run_id;
-- Bad modes and repeated syncs: one queued or running run per connection.
SELECT try(format('SELECT ironwod_sync(%L, %L, %L)', :ta, :g1, 'everything'));
SET LOCAL client_min_messages = warning;
SELECT ironwod_sync(:ta, :g1, 'backfill') = (SELECT run_id FROM ironwod.sync_runs WHERE status IN ('queued', 'running')) AS same_run;
COMMIT;

-- The text overload (plaintext keys on in this session), for a second gym of the
-- same tenant.
BEGIN;
SELECT ironwod_set_scope(:ta, :g2);
SELECT ironwod_connect(:ta, :g2, (SELECT api_key FROM sim_gyms WHERE idx = 1));
COMMIT;
RESET ironwod.allow_plaintext_keys;
