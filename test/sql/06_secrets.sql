-- A canary key never reaches the server log (log_statement = all, durations and
-- bind parameters are on in this cluster), nor ironwod's tables, nor other
-- sessions' pg_stat_activity.  The searches use reversed copies so that their own
-- statement text, which is logged too, cannot match.
\set td '''44444444-4444-4444-4444-444444444444'''
\set gd '''dddddddd-0000-0000-0000-000000000001'''
\set ge '''dddddddd-0000-0000-0000-000000000002'''
\set canary 'wdfy_CANARY_6f1d2c9e8b7a41d3'
\set canary_rev '3d14a7b8e9c2d1f6_YRANAC_yfdw'

-- Refused while ironwod.allow_plaintext_keys is off (the default): the error
-- must not echo it either.
SET ROLE ironwod_test_app;
BEGIN;
SELECT ironwod_set_scope(:td, :gd);
SELECT ironwod_connect(:td, :gd, :'canary');
ROLLBACK;
RESET ROLE;

-- This test is about the text path: a superuser turns it on for this session.
SET ironwod.allow_plaintext_keys = on;
SET ROLE ironwod_test_app;
BEGIN;
SELECT ironwod_set_scope(:td, :gd);
-- Rejected by Wodify (unknown to the simulator): the error must not echo it.
SELECT ironwod_connect(:td, :gd, :'canary');
ROLLBACK;

-- A real key, passed as a literal through the text overload.
SELECT api_key AS gym2key FROM sim_gyms WHERE idx = 2 \gset
BEGIN;
SELECT ironwod_set_scope(:td, :ge);
SELECT ironwod_connect(:td, :ge, :'gym2key');
COMMIT;
BEGIN;
SELECT ironwod_set_scope(:td, :ge);
SELECT ironwod_wait(last_run('backfill'),
                    '5 minutes') AS backfill;
COMMIT;
RESET ROLE;
RESET ironwod.allow_plaintext_keys;

-- A deliberate leak proves the log search can find one.
DO $$ BEGIN RAISE LOG 'leak probe %', reverse('ebOrp_kAel_tnemirepxe'); END $$;
SELECT position(reverse('ebOrp_kAel_tnemirepxe') IN pg_read_file('server.log')) > 0 AS probe_found;

SELECT position(reverse(:'canary_rev') IN pg_read_file('server.log')) AS canary_in_log;
SELECT position(g.api_key IN pg_read_file('server.log')) AS real_key_in_log FROM sim_gyms g WHERE g.idx = 2;
SELECT count(*) AS key_in_other_sessions FROM pg_stat_activity, sim_gyms g
WHERE g.idx = 2 AND pid <> pg_backend_pid() AND (position(g.api_key IN query) > 0 OR position(reverse(:'canary_rev') IN query) > 0);

-- Nothing in ironwod's own tables holds either key.
SELECT count(*) AS key_in_tables
FROM (SELECT to_jsonb(r)::text AS t FROM ironwod.sync_runs r
      UNION ALL SELECT to_jsonb(e)::text FROM ironwod.sync_events e
      UNION ALL SELECT to_jsonb(c)::text FROM ironwod.integrations_wodify_connection c
      UNION ALL SELECT to_jsonb(s)::text FROM ironwod.sync_run_entities s) x, sim_gyms g
WHERE g.idx = 2 AND (position(g.api_key IN x.t) > 0 OR position(reverse(:'canary_rev') IN x.t) > 0);
