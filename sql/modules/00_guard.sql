-- ironwod install script, assembled from sql/modules/*.sql in file-name order.
-- 00_guard: refuse to install where the background workers cannot serve us, and
-- create the three roles the tenancy model is built on.

\echo Use "CREATE EXTENSION ironwod" to load this file. \quit

DO $guard$
BEGIN
    -- ironwod.database_name only exists when the library was preloaded (its GUCs are
    -- defined in _PG_init), so a NULL here means shared_preload_libraries lacks us.
    IF current_setting('ironwod.database_name', true) IS NULL THEN
        RAISE EXCEPTION 'ironwod must be loaded via shared_preload_libraries'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Add ironwod to shared_preload_libraries in postgresql.conf and restart the server.';
    END IF;
    -- Also what a restore under another database name meets first (pg_restore
    -- runs CREATE EXTENSION): the hint gives the whole procedure.
    IF current_setting('ironwod.database_name') <> current_database() THEN
        RAISE EXCEPTION 'ironwod can only be installed in database "%", not in "%"',
                        current_setting('ironwod.database_name'), current_database()
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'The ironwod supervisor serves the one database named by ironwod.database_name.',
                  HINT = format('To install or restore ironwod in this database, set ironwod.database_name = %L in postgresql.conf, restart the server, and run CREATE EXTENSION (or pg_restore) again.',
                                current_database());
    END IF;
END
$guard$;

-- Roles are cluster-wide and outlive the extension; create them only when missing.
-- ironwod_worker needs LOGIN on PostgreSQL 15 for background workers to connect as
-- it; it has no password, and the README shows the pg_hba.conf line that rejects it.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ironwod_app') THEN
        CREATE ROLE ironwod_app NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ironwod_admin') THEN
        CREATE ROLE ironwod_admin NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ironwod_worker') THEN
        CREATE ROLE ironwod_worker LOGIN;
    END IF;
END
$roles$;

-- Pin off the logging settings that could copy statement text or bind parameters
-- (and with them an API key) into the server log for sessions of these roles.
ALTER ROLE ironwod_app SET log_statement = 'none';
ALTER ROLE ironwod_app SET log_min_duration_statement = -1;
ALTER ROLE ironwod_app SET log_parameter_max_length = 0;
ALTER ROLE ironwod_app SET log_parameter_max_length_on_error = 0;
ALTER ROLE ironwod_worker SET log_statement = 'none';
ALTER ROLE ironwod_worker SET log_min_duration_statement = -1;
ALTER ROLE ironwod_worker SET log_parameter_max_length = 0;
ALTER ROLE ironwod_worker SET log_parameter_max_length_on_error = 0;

CREATE SCHEMA ironwod;
COMMENT ON SCHEMA ironwod IS 'ironwod storage and internal functions; the ironwod_* API lives in the schema the extension was created in';
