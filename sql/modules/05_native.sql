-- 05_native: SQL declarations of the C functions in src/sqlfuncs.c.

CREATE FUNCTION ironwod.preloaded() RETURNS boolean
LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'ironwod_preloaded';
COMMENT ON FUNCTION ironwod.preloaded() IS 'True when the library was preloaded and its shared memory exists; raises 55000 otherwise';

CREATE FUNCTION ironwod.library_version() RETURNS text
LANGUAGE c IMMUTABLE STRICT AS 'MODULE_PATHNAME', 'ironwod_library_version';
COMMENT ON FUNCTION ironwod.library_version() IS 'The extension version the loaded library was built as (after a package upgrade it can differ from the installed extension until ALTER EXTENSION ironwod UPDATE)';

CREATE FUNCTION ironwod.library_drives(p_version text) RETURNS boolean
LANGUAGE c IMMUTABLE STRICT AS 'MODULE_PATHNAME', 'ironwod_library_drives';
COMMENT ON FUNCTION ironwod.library_drives(text) IS 'Whether the loaded library drives the SQL of that extension version (the supervisor starts no runs at a version it does not)';

CREATE FUNCTION ironwod.wake() RETURNS void
LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'ironwod_wake';
COMMENT ON FUNCTION ironwod.wake() IS 'Wake the supervisor when the current transaction commits';

CREATE FUNCTION ironwod.wait_for_change(p_timeout_ms integer) RETURNS void
LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'ironwod_wait_for_change';
COMMENT ON FUNCTION ironwod.wait_for_change(integer) IS 'Sleep until some run changes state or the timeout passes (at most the given milliseconds)';

CREATE FUNCTION ironwod.note_queued_run(p_run_id bigint) RETURNS void
LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'ironwod_note_queued_run';
COMMENT ON FUNCTION ironwod.note_queued_run(bigint) IS 'Remember, for the rest of this transaction, that it queued the run (ironwod_wait refuses to wait for it)';

CREATE FUNCTION ironwod.run_queued_here(p_run_id bigint) RETURNS boolean
LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'ironwod_run_queued_here';
COMMENT ON FUNCTION ironwod.run_queued_here(bigint) IS 'True when the current transaction queued the run, so it cannot start before this transaction commits';

CREATE FUNCTION ironwod.sealed_key_id(p_sealed bytea) RETURNS text
LANGUAGE c STRICT IMMUTABLE AS 'MODULE_PATHNAME', 'ironwod_sealed_key_id';
COMMENT ON FUNCTION ironwod.sealed_key_id(bytea) IS 'Master key id a sealed API key was sealed to; raises 22023 when the blob is malformed';

CREATE FUNCTION ironwod.seal_key(p_tenant_id uuid, p_gym_id uuid, p_api_key text) RETURNS bytea
LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'ironwod_seal_key';
COMMENT ON FUNCTION ironwod.seal_key(uuid, uuid, text) IS 'Seal a plaintext API key to the active master public key, bound to (tenant, gym); refused (0A000) unless ironwod.allow_plaintext_keys is on';

CREATE FUNCTION ironwod.admit_plaintext_key() RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ironwod_admit_plaintext_key';
COMMENT ON FUNCTION ironwod.admit_plaintext_key() IS 'Hide the current statement from pg_stat_activity (it passed a plaintext API key), then raise 0A000 unless ironwod.allow_plaintext_keys is on';

CREATE FUNCTION ironwod.validate_sealed_key(p_tenant_id uuid, p_gym_id uuid, p_sealed bytea,
                                            OUT verdict text, OUT http_status integer,
                                            OUT fingerprint text, OUT message text,
                                            OUT attempts bigint[])
RETURNS record
LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'ironwod_validate_sealed_key';
COMMENT ON FUNCTION ironwod.validate_sealed_key(uuid, uuid, bytea) IS 'Have a validate worker open the key and call GET /customers/locations, waiting at most ironwod.validate_timeout_ms; verdict valid, rejected, unopenable, keystore or unavailable, and the HTTP attempts it made (ironwod.add_attempts layout)';

CREATE FUNCTION ironwod.run_rewrap_worker() RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ironwod_run_rewrap_worker';
COMMENT ON FUNCTION ironwod.run_rewrap_worker() IS 'Start the rewrap worker, which re-seals every API key sealed to an older master key to the active one, and wait until it exits';

CREATE FUNCTION ironwod.worker_status(OUT run_id bigint, OUT pid integer) RETURNS SETOF record
LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'ironwod_worker_status';
COMMENT ON FUNCTION ironwod.worker_status() IS 'Run workers alive now, from shared memory';

CREATE FUNCTION ironwod.rate_limits(OUT tenant_id uuid, OUT gym_id uuid, OUT tokens double precision,
                                    OUT rate double precision, OUT paused_until timestamptz,
                                    OUT throttled_count bigint) RETURNS SETOF record
LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'ironwod_rate_limits';
COMMENT ON FUNCTION ironwod.rate_limits() IS 'Rate limiter state from shared memory: one row per connection bucket, plus the cluster-wide bucket with NULL tenant_id and gym_id; rate is requests/s after the 429 adaptation, paused_until is set while a 429 pause lasts';

CREATE FUNCTION ironwod.key_command_access(OUT ok boolean, OUT message text, OUT hint text) RETURNS record
LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'ironwod_key_command_access';
COMMENT ON FUNCTION ironwod.key_command_access() IS 'Whether the server''s OS user can run the program ironwod.master_key_command names (exists, directories searchable, executable, readable, not writable by others), without running it; message and hint name cause and fix';

CREATE FUNCTION ironwod.probe_master_key_command(OUT ok boolean, OUT message text, OUT hint text) RETURNS record
LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'ironwod_probe_master_key_command';
COMMENT ON FUNCTION ironwod.probe_master_key_command() IS 'Have a validate worker run ironwod.master_key_command and compare what it prints with the registered master keys (ids and counts only; waits at most ironwod.validate_timeout_ms)';
