-- Two tenants cannot see or act on each other's connections, runs or raw rows, as
-- ironwod_app; the app never reads ciphertext.  Tenant B connects the same Wodify
-- gym as tenant A's first gym, with the same key: data stays per tenant.
\set ta '''11111111-1111-1111-1111-111111111111'''
\set tb '''22222222-2222-2222-2222-222222222222'''
\set g1 '''aaaaaaaa-0000-0000-0000-000000000001'''
\set gb '''bbbbbbbb-0000-0000-0000-000000000001'''

-- The key is sealed here, outside PostgreSQL, as a host app seals it (test/seal.py).
\getenv srcdir PG_ABS_SRCDIR
SELECT key_id AS kid, encode(public_key, 'hex') AS pub FROM ironwod_public_key() \gset
SELECT api_key AS key0 FROM sim_gyms WHERE idx = 0 \gset
\set sealed_b `printf %s :'key0' | /usr/bin/python3 :'srcdir'/seal.py :tb :gb :'kid' :'pub'`

SET ROLE ironwod_test_app;
BEGIN;
SELECT ironwod_set_scope(:tb, :gb);
SELECT ironwod_connect(:tb, :gb, :'sealed_b'::bytea);
COMMIT;
BEGIN;
SELECT ironwod_set_scope(:tb, :gb);
SELECT ironwod_wait(last_run('backfill'),
                    '5 minutes') AS tenant_b_backfill;
SELECT bool_and(r.n_records = (g.expected->>r.entity)::int) AS all_entities_match
FROM raw_counts() r, sim_gyms g WHERE g.idx = 0;
COMMIT;

-- Scoped to tenant B, tenant A is invisible and untouchable.
BEGIN;
SELECT ironwod_set_scope(:tb, :gb);
SELECT count(DISTINCT tenant_id) AS tenants_visible, bool_and(tenant_id = :tb) AS only_own
FROM ironwod.wodify_raw_clients;
SELECT count(*) AS other_tenant_connections FROM ironwod.integrations_wodify_connection WHERE tenant_id <> :tb;
SELECT count(*) AS other_tenant_runs FROM ironwod.sync_runs WHERE tenant_id <> :tb;
SELECT count(*) AS other_tenant_events FROM ironwod.sync_events WHERE tenant_id <> :tb;
SELECT try(format('SELECT ironwod_status(%L, %L)', :ta, :g1));
SELECT try(format('SELECT ironwod_sync(%L, %L)', :ta, :g1));
SELECT try(format('SELECT ironwod_disconnect(%L, %L)', :ta, :g1));
SELECT try(format('SELECT ironwod_connect(%L, %L, %L::bytea)', :ta, :g1, :'sealed_b'));
SELECT regexp_replace(try(format('SELECT ironwod_wait(%s, %L)', (SELECT min(run_id) FROM ironwod.sync_runs) - 1, '1 second')),
                      'run \d+', 'run N') AS other_tenants_run;
-- Writes through the tables are refused outright.
SELECT try(format('UPDATE ironwod.integrations_wodify_connection SET status = %L', 'paused'));
SELECT try(format('DELETE FROM ironwod.wodify_raw_clients'));
-- Ciphertext is not readable by the app role, not even its own.
SELECT try('SELECT api_key_ciphertext FROM ironwod.integrations_wodify_connection');
SELECT try('SELECT * FROM ironwod.integrations_wodify_connection');
SELECT status, api_key_fingerprint IS NOT NULL AS has_fingerprint FROM ironwod.integrations_wodify_connection;
COMMIT;

-- Without a scope the app sees nothing at all.
SELECT count(*) AS raw_rows_without_scope FROM ironwod.wodify_raw_clients;
SELECT count(*) AS connections_without_scope FROM ironwod.integrations_wodify_connection;
RESET ROLE;

-- The admin role reads every tenant (health view), and still not the ciphertext.
SET ROLE ironwod_test_admin;
SELECT count(DISTINCT tenant_id) AS tenants_for_admin FROM ironwod.connection_health;
SELECT try('SELECT api_key_ciphertext FROM ironwod.integrations_wodify_connection');
RESET ROLE;
