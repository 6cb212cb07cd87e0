-- 50_api: the ironwod_* functions the host app calls.  Write paths are SECURITY
-- DEFINER (they touch columns the app may not read, such as the ciphertext) and
-- therefore check the scope themselves; search_path is pinned on every one.

-- The scope check plus "this gym is connected (or was)", shared by the API calls
-- that act on an existing connection.
CREATE FUNCTION ironwod.assert_connection(p_tenant_id uuid, p_gym_id uuid)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    PERFORM ironwod.assert_scope(p_tenant_id, p_gym_id);
    IF NOT EXISTS (SELECT 1 FROM ironwod.integrations_wodify_connection c
                   WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id) THEN
        RAISE EXCEPTION 'gym % of tenant % has no Wodify connection', p_gym_id, p_tenant_id
            USING ERRCODE = 'no_data_found', HINT = 'Connect it first with ironwod_connect.';
    END IF;
END
$$;
COMMENT ON FUNCTION ironwod.assert_connection(uuid, uuid) IS 'Raise 42501 unless (tenant, gym) is the current scope, and P0002 unless it has a Wodify connection';

CREATE FUNCTION ironwod.register_master_key(p_key_id text, p_public_key bytea)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_public_key IS NULL OR length(p_public_key) <> 32 THEN
        RAISE EXCEPTION 'a master public key is 32 bytes of X25519'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass the raw public key, for example decode(''<64 hex>'', ''hex'').';
    END IF;
    INSERT INTO ironwod.master_keys (key_id, public_key) VALUES (p_key_id, p_public_key);
    -- New keys seal from now on; older ones stay to open what they sealed.
    UPDATE ironwod.master_keys SET is_active = (key_id = p_key_id);
END
$$;
COMMENT ON FUNCTION ironwod.register_master_key(text, bytea) IS 'Admin: add a master public key and make it the one new API keys are sealed to';

CREATE FUNCTION @extschema@.ironwod_public_key()
RETURNS TABLE (key_id text, public_key bytea)
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT k.key_id, k.public_key FROM ironwod.master_keys k
    WHERE k.is_active ORDER BY k.created_at DESC LIMIT 1
$$;
COMMENT ON FUNCTION @extschema@.ironwod_public_key() IS 'The master public key (and its id) a host app seals API keys to before ironwod_connect(tenant, gym, bytea)';

-- Connect with a key sealed by the host app, so the plaintext never enters
-- PostgreSQL.  A worker validates it with one GET /customers/locations while we
-- wait (ironwod.validate_timeout_ms); a rejected key raises and leaves nothing
-- behind; an undecided verdict stores the connection pending with a queued validate
-- run.  Connecting a gym that is already connected replaces its key only once the
-- new key validated, so a rotation never interrupts syncing.
-- On Citus its INSERT ... SELECT of the backfill run runs through the
-- coordinator whatever it selects: run_id's default takes the coordinator's
-- sequence (one run id space for every node), which Citus evaluates there, so
-- it reads the connection row from the shard and inserts the run; once per
-- connect.
CREATE FUNCTION @extschema@.ironwod_connect(p_tenant_id uuid, p_gym_id uuid, p_sealed_key bytea)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_key_id text;
    v record;
    v_status text;
    v_old text;
    v_run bigint;
    v_validate bigint;
    -- A variable, not now() in the statement: Citus refuses non-immutable
    -- functions in ON CONFLICT DO UPDATE SET on a distributed table.
    v_now timestamptz := now();
BEGIN
    PERFORM ironwod.assert_scope(p_tenant_id, p_gym_id);
    IF p_sealed_key IS NULL THEN
        RAISE EXCEPTION 'sealed API key must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    v_key_id := ironwod.sealed_key_id(p_sealed_key);
    -- the share lock keeps ironwod.retire_master_key from retiring it meanwhile
    PERFORM 1 FROM ironwod.master_keys k WHERE k.key_id = v_key_id FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'API key is sealed to unknown master key "%"', v_key_id
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Seal the key to the key returned by ironwod_public_key().';
    END IF;

    SELECT c.status INTO v_old FROM ironwod.integrations_wodify_connection c
    WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id FOR UPDATE;

    SELECT * INTO v FROM ironwod.validate_sealed_key(p_tenant_id, p_gym_id, p_sealed_key);
    IF v.verdict = 'rejected' THEN
        RAISE EXCEPTION 'Wodify rejected the API key'
            USING ERRCODE = 'invalid_authorization_specification',
                  DETAIL = format('GET /customers/locations answered: %s', v.message),
                  HINT = 'Copy the key named "Wodify API" from Wodify Core > Digital Presence > Web Integrations > API Keys.';
    END IF;
    IF v.verdict = 'unopenable' THEN
        RAISE EXCEPTION 'sealed API key does not open for tenant % gym %', p_tenant_id, p_gym_id
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A sealed key is bound to the tenant, gym and master key it was sealed for.';
    END IF;
    IF v.verdict = 'keystore' THEN
        RAISE EXCEPTION 'run workers cannot open API keys: %', v.message
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Check ironwod.master_key_command; see the README.';
    END IF;
    v_status := CASE WHEN v.verdict = 'valid' THEN 'connected' ELSE 'pending' END;
    IF v_status = 'pending' AND v_old IN ('connected', 'paused') THEN
        RAISE EXCEPTION 'could not validate the new API key: %', v.message
            USING ERRCODE = 'connection_failure',
                  HINT = 'The gym stays connected with its current key; try again later.';
    END IF;

    INSERT INTO ironwod.integrations_wodify_connection AS c
        (tenant_id, gym_id, status, api_key_ciphertext, master_key_id, api_key_fingerprint, connected_at)
    VALUES (p_tenant_id, p_gym_id, v_status, p_sealed_key, v_key_id, v.fingerprint,
            CASE WHEN v_status = 'connected' THEN v_now END)
    ON CONFLICT (tenant_id, gym_id) DO UPDATE
       SET status = CASE WHEN c.status = 'paused' THEN 'paused' ELSE excluded.status END,
           api_key_ciphertext = excluded.api_key_ciphertext, master_key_id = excluded.master_key_id,
           api_key_fingerprint = excluded.api_key_fingerprint,
           next_api_key_ciphertext = NULL, next_master_key_id = NULL, next_api_key_fingerprint = NULL,
           connected_at = coalesce(excluded.connected_at, c.connected_at),
           consecutive_failures = 0, breaker_opened_at = NULL, next_retry_at = NULL,
           updated_at = v_now;

    IF NOT EXISTS (SELECT 1 FROM ironwod.sync_runs r
                   WHERE r.tenant_id = p_tenant_id AND r.gym_id = p_gym_id
                     AND r.status IN ('queued', 'running')) THEN
        IF v_status = 'connected' THEN
            -- The synchronous verdict is recorded as a finished validate run,
            -- with the attempts it took (those of the locations endpoint).
            INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, status, started_at, finished_at)
            VALUES (p_tenant_id, p_gym_id, 'validate', 'succeeded', now(), clock_timestamp())
            RETURNING run_id INTO v_validate;
            PERFORM ironwod.add_attempts(v_validate, 'locations', v.attempts);
            PERFORM ironwod.count_requests(v_validate, v_now, NULL);
            PERFORM ironwod.log_run(p_tenant_id, p_gym_id, v_validate);
            INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode)
            SELECT p_tenant_id, p_gym_id, 'backfill'
            FROM ironwod.integrations_wodify_connection c
            WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id AND c.backfill_completed_at IS NULL
            RETURNING run_id INTO v_run;
        ELSE
            INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode) VALUES (p_tenant_id, p_gym_id, 'validate')
            RETURNING run_id INTO v_run;
            RAISE WARNING 'could not validate the API key now: %', v.message
                USING HINT = 'The connection is pending; a worker will validate it. Watch ironwod_status().';
        END IF;
        IF v_run IS NOT NULL THEN
            PERFORM ironwod.note_queued_run(v_run);
        END IF;
        PERFORM ironwod.wake();
    END IF;
    RETURN v_status;
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_connect(uuid, uuid, bytea) IS 'Connect a gym with an API key sealed to ironwod_public_key(); validates it and queues the initial backfill';

-- Convenience path: the plaintext key enters the backend, is sealed at once and
-- never stored.  Weaker than the bytea form: the key is part of the caller's
-- statement text, which PostgreSQL shows in pg_stat_activity and may store in
-- pg_stat_statements.  So it is refused unless a superuser turned
-- ironwod.allow_plaintext_keys on; either way the gate first hides the statement
-- from pg_stat_activity (before the scope check, so that a refused call leaves
-- no key on view either).  The log hook scrubs it from the log.
CREATE FUNCTION @extschema@.ironwod_connect(p_tenant_id uuid, p_gym_id uuid, p_api_key text)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM ironwod.admit_plaintext_key();
    PERFORM ironwod.assert_scope(p_tenant_id, p_gym_id);
    IF p_api_key IS NULL OR length(btrim(p_api_key)) = 0 THEN
        RAISE EXCEPTION 'API key must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN @extschema@.ironwod_connect(p_tenant_id, p_gym_id, ironwod.seal_key(p_tenant_id, p_gym_id, p_api_key));
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_connect(uuid, uuid, text) IS 'Connect a gym with a plaintext API key, sealed in the backend; refused (0A000) unless ironwod.allow_plaintext_keys is on';

CREATE FUNCTION @extschema@.ironwod_sync(p_tenant_id uuid, p_gym_id uuid, p_mode text DEFAULT 'incremental')
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_status text;
    v_run bigint;
BEGIN
    PERFORM ironwod.assert_connection(p_tenant_id, p_gym_id);
    IF p_mode IS NULL OR p_mode NOT IN ('backfill', 'incremental', 'reconcile', 'validate') THEN
        RAISE EXCEPTION 'unsupported sync mode "%"', p_mode
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use backfill, incremental, reconcile or validate.';
    END IF;
    SELECT c.status INTO v_status FROM ironwod.integrations_wodify_connection c
    WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id;
    IF v_status = 'disconnected' OR (v_status = 'error' AND NOT EXISTS (
            SELECT 1 FROM ironwod.integrations_wodify_connection c
            WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id AND c.api_key_ciphertext IS NOT NULL)) THEN
        RAISE EXCEPTION 'gym % has no usable API key (status %)', p_gym_id, v_status
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Connect it again with ironwod_connect.';
    END IF;
    IF v_status = 'paused' THEN
        RAISE EXCEPTION 'gym % is paused', p_gym_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Resume it with ironwod_resume(tenant, gym) first.';
    END IF;
    IF v_status = 'pending' AND p_mode <> 'validate' THEN
        RAISE EXCEPTION 'gym % is waiting for its API key to be validated', p_gym_id
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Sync with mode ''validate'' or wait for ironwod_status() to say connected.';
    END IF;

    -- One queued or running run per connection: a concurrent caller's insert waits
    -- on the unique index, then hands back the run that won.  If that run already
    -- finished by then, try again.
    FOR attempt IN 1..3 LOOP
        BEGIN
            INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode) VALUES (p_tenant_id, p_gym_id, p_mode)
            RETURNING run_id INTO v_run;
            PERFORM ironwod.note_queued_run(v_run);
            PERFORM ironwod.wake();
            RETURN v_run;
        EXCEPTION WHEN unique_violation THEN
            SELECT r.run_id INTO v_run FROM ironwod.sync_runs r
            WHERE r.tenant_id = p_tenant_id AND r.gym_id = p_gym_id AND r.status IN ('queued', 'running');
            IF v_run IS NOT NULL THEN
                RAISE NOTICE 'run % is already queued or running for this gym', v_run;
                RETURN v_run;
            END IF;
        END;
    END LOOP;
    RAISE EXCEPTION 'could not queue a run for gym %', p_gym_id
        USING ERRCODE = 'lock_not_available', HINT = 'Runs are being queued concurrently; try again.';
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_sync(uuid, uuid, text) IS 'Queue a run (incremental, reconcile, backfill or validate) for a gym, or return the one already queued or running';

-- Waits on a condition variable the workers broadcast whenever a run changes
-- state, re-reading the row with a fresh snapshot each time: no busy polling, and
-- no sleep longer than a second.
CREATE FUNCTION @extschema@.ironwod_wait(p_run_id bigint, p_timeout interval DEFAULT '5 minutes')
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_deadline timestamptz := clock_timestamp() + p_timeout;
    v_status text;
    v_tenant uuid := ironwod.scope_tenant();
    v_gym uuid := ironwod.scope_gym();
BEGIN
    PERFORM ironwod.preloaded();
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'ironwod_wait needs READ COMMITTED isolation'
            USING ERRCODE = 'active_sql_transaction', HINT = 'A snapshot that never moves would never see the run finish.';
    END IF;
    -- The run looked up under the scope's key: on Citus that is the scope's
    -- shard, where the run id alone read every shard of every node.
    PERFORM FROM ironwod.sync_runs r WHERE r.tenant_id = v_tenant AND r.gym_id = v_gym AND r.run_id = p_run_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % does not exist in the current ironwod scope', p_run_id
            USING ERRCODE = 'no_data_found', HINT = 'Call ironwod_set_scope(tenant, gym) for the run''s gym first.';
    END IF;
    -- The supervisor cannot see a run this transaction queued before COMMIT.
    IF ironwod.run_queued_here(p_run_id) THEN
        RAISE EXCEPTION 'run % was queued by the current transaction and cannot start before it commits', p_run_id
            USING ERRCODE = 'active_sql_transaction',
                  HINT = 'COMMIT the transaction that called ironwod_sync() or ironwod_connect(), then call ironwod_wait() in a new one.';
    END IF;
    LOOP
        SELECT r.status INTO v_status FROM ironwod.sync_runs r
        WHERE r.tenant_id = v_tenant AND r.gym_id = v_gym AND r.run_id = p_run_id;
        IF v_status NOT IN ('queued', 'running') THEN
            RETURN v_status;
        END IF;
        IF clock_timestamp() >= v_deadline THEN
            RAISE EXCEPTION 'run % still % after %', p_run_id, v_status, p_timeout
                USING ERRCODE = 'query_canceled';
        END IF;
        PERFORM ironwod.wait_for_change(least(1000, greatest(1,
            (extract(epoch FROM v_deadline - clock_timestamp()) * 1000)::int)));
    END LOOP;
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_wait(bigint, interval) IS 'Block until a run of the current scope finishes and return its status; error on timeout';

CREATE FUNCTION @extschema@.ironwod_status(p_tenant_id uuid, p_gym_id uuid)
RETURNS TABLE (status text, api_key_fingerprint text, connected_at timestamptz,
               last_success_at timestamptz, last_error_at timestamptz, last_error text,
               last_error_code text, last_cursor_at timestamptz, consecutive_failures integer,
               next_retry_at timestamptz, backfill_completed_at timestamptz,
               active_run_id bigint, active_run_mode text, active_run_status text,
               last_run_id bigint, last_run_status text, entities jsonb, progress jsonb,
               not_entitled text[])
LANGUAGE plpgsql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_progress jsonb;
BEGIN
    PERFORM ironwod.assert_connection(p_tenant_id, p_gym_id);
    SELECT to_jsonb(p) - 'tenant_id' - 'gym_id' INTO v_progress FROM ironwod.run_progress p
    WHERE p.tenant_id = p_tenant_id AND p.gym_id = p_gym_id;
    RETURN QUERY
    SELECT c.status, c.api_key_fingerprint, c.connected_at, c.last_success_at, c.last_error_at,
           c.last_error, c.last_error_code, c.last_cursor_at, c.consecutive_failures, c.next_retry_at,
           c.backfill_completed_at, a.run_id, a.mode, a.status, l.run_id, l.status,
           (SELECT coalesce(jsonb_object_agg(s.entity, jsonb_build_object(
                    'pulled', s.pulled, 'new', s.new_versions, 'unchanged', s.unchanged,
                    'transformed', s.transformed, 'deleted', s.deleted, 'quarantined', s.quarantined,
                    'pages', s.pages, 'requests', s.requests, 'watermark', cur.watermark)
                    ORDER BY s.entity), '{}')
            FROM ironwod.sync_run_entities s
            LEFT JOIN ironwod.entity_cursors cur
                   ON cur.tenant_id = s.tenant_id AND cur.gym_id = s.gym_id AND cur.entity = s.entity
            WHERE s.tenant_id = c.tenant_id AND s.gym_id = c.gym_id
              AND s.run_id = coalesce(a.run_id, l.run_id)),
           v_progress,
           (SELECT coalesce(array_agg(n.entity ORDER BY e.ordinal), '{}') FROM ironwod.entity_entitlements n
            JOIN ironwod.entities e ON e.entity = n.entity
            WHERE n.tenant_id = c.tenant_id AND n.gym_id = c.gym_id)
    FROM ironwod.integrations_wodify_connection c
    LEFT JOIN LATERAL (SELECT r.run_id, r.mode, r.status FROM ironwod.sync_runs r
                       WHERE r.tenant_id = c.tenant_id AND r.gym_id = c.gym_id
                         AND r.status IN ('queued', 'running')) a ON true
    LEFT JOIN LATERAL (SELECT r.run_id, r.status FROM ironwod.sync_runs r
                       WHERE r.tenant_id = c.tenant_id AND r.gym_id = c.gym_id
                         AND r.status NOT IN ('queued', 'running')
                       ORDER BY r.run_id DESC LIMIT 1) l ON true
    WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id;
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_status(uuid, uuid) IS 'Connection status, breaker state, sanitized last error, current and last run with per-entity counts, the active run''s progress (ironwod.run_progress), and the entities the gym''s plan does not include (their metrics are NULL)';

-- Cancels queued work, stops a running run at its next page (the worker checks the
-- run's status in every landing transaction), and destroys the ciphertext.
-- Landed raw data stays: it is the gym's history.
CREATE FUNCTION @extschema@.ironwod_disconnect(p_tenant_id uuid, p_gym_id uuid)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- Citus refuses volatile functions in an UPDATE of a distributed table.
    v_now timestamptz := clock_timestamp();
    v_run bigint;
BEGIN
    PERFORM ironwod.assert_connection(p_tenant_id, p_gym_id);
    UPDATE ironwod.integrations_wodify_connection c
       SET status = 'disconnected', api_key_ciphertext = NULL, master_key_id = NULL,
           next_api_key_ciphertext = NULL, next_master_key_id = NULL, next_api_key_fingerprint = NULL,
           updated_at = now()
     WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id;
    UPDATE ironwod.sync_runs r
       SET status = 'cancelled', finished_at = v_now, last_error = 'disconnected', phase = NULL
     WHERE r.tenant_id = p_tenant_id AND r.gym_id = p_gym_id AND r.status IN ('queued', 'running')
    RETURNING r.run_id INTO v_run;
    IF v_run IS NOT NULL THEN
        PERFORM ironwod.log_run(p_tenant_id, p_gym_id, v_run);
    END IF;
    -- recorded and notified like every other event (the scope is the gym's)
    PERFORM ironwod.emit_event(NULL, 'wodify.disconnected', NULL, jsonb_build_object('cancelled_run', v_run));
    PERFORM ironwod.wake();
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_disconnect(uuid, uuid) IS 'Disconnect a gym: cancel queued and running runs, destroy the sealed key, and emit event wodify.disconnected (NOTIFY ironwod_events)';

-- The scheduler's heartbeat, called by pg_cron every few minutes (ironwod_schedule).
-- Queues, set-based and without HTTP or secrets:
--   * the nightly incremental run of every connected gym once its local night slot
--     (nightly_local_time in the gym's time zone, staggered over an hour by a hash
--     of the gym so thousands of gyms do not start at once) has passed with no run
--     since; on the gym's reconcile_weekday that run is the weekly reconciliation;
--   * the retry of a connection whose circuit breaker's next_retry_at has come;
--   * the continuation of an unfinished backfill.
-- The one-active-run index makes concurrent ticks (and ticks racing ironwod_sync)
-- queue at most one run per gym.  Returns the number of runs queued.
CREATE FUNCTION @extschema@.ironwod_tick()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_queued integer;
BEGIN
    PERFORM ironwod.preloaded();
    WITH candidates AS (
        SELECT c.tenant_id, c.gym_id, c.backfill_completed_at, c.reconcile_weekday,
               coalesce(c.time_zone, 'UTC') AS tz,
               c.nightly_local_time
               + make_interval(secs => ((hashtext(c.gym_id::text) & 2147483647) % 3600)) AS local_slot_time
        FROM ironwod.integrations_wodify_connection c
        WHERE c.api_key_ciphertext IS NOT NULL
          AND (c.status = 'connected' OR (c.status = 'error' AND c.next_retry_at IS NOT NULL))
          AND coalesce(c.next_retry_at, '-infinity') <= now()
    ), slots AS (
        SELECT k.*, s.slot
        FROM candidates k,
             LATERAL (SELECT (((now() AT TIME ZONE k.tz)::date + k.local_slot_time) AT TIME ZONE k.tz) AS today_slot) t,
             LATERAL (SELECT CASE WHEN t.today_slot > now() THEN t.today_slot - interval '1 day'
                                  ELSE t.today_slot END AS slot) s
    ), latest AS (
        -- Each gym's latest run that counts, joined below rather than probed by a
        -- correlated NOT EXISTS: Citus plans no correlated subquery over a
        -- distributed table next to a CTE (0A000); grouped by tenant, this one
        -- runs on every shard at once.  A slot is at most a day old, so older
        -- runs never decide anything.
        SELECT r.tenant_id, r.gym_id, max(r.requested_at) AS requested_at
        FROM ironwod.sync_runs r
        WHERE r.mode <> 'validate' AND r.status NOT IN ('failed', 'cancelled')
          AND r.requested_at >= now() - interval '2 days'
        GROUP BY r.tenant_id, r.gym_id
    ), due AS (
        SELECT s.tenant_id, s.gym_id,
               CASE WHEN s.backfill_completed_at IS NULL THEN 'backfill'
                    WHEN extract(dow FROM s.slot AT TIME ZONE s.tz) = s.reconcile_weekday THEN 'reconcile'
                    ELSE 'incremental' END AS mode
        FROM slots s
        LEFT JOIN latest l ON l.tenant_id = s.tenant_id AND l.gym_id = s.gym_id
        WHERE s.backfill_completed_at IS NULL OR l.requested_at IS NULL OR l.requested_at < s.slot
    )
    INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode, requested_by)
    SELECT d.tenant_id, d.gym_id, d.mode, 'ironwod_tick' FROM due d
    ON CONFLICT (tenant_id, gym_id) WHERE status IN ('queued', 'running') DO NOTHING;
    GET DIAGNOSTICS v_queued = ROW_COUNT;
    IF v_queued > 0 THEN
        PERFORM ironwod.wake();
    END IF;
    RETURN v_queued;
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_tick() IS 'Queue due work for every gym: nightly incremental, weekly reconciliation, breaker retries, unfinished backfills';

-- Install the single pg_cron job that calls ironwod_tick().  pg_cron stays
-- optional: ironwod never requires it, and says so clearly when it is missing.
CREATE FUNCTION @extschema@.ironwod_schedule(p_schedule text DEFAULT '*/5 * * * *')
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
        RAISE EXCEPTION 'pg_cron is not installed in this database'
            USING ERRCODE = 'undefined_object',
                  HINT = 'Preload pg_cron (cron.database_name = this database), CREATE EXTENSION pg_cron, then call ironwod_schedule() again; or call ironwod_tick() from any scheduler.';
    END IF;
    EXECUTE format('SELECT cron.schedule(%L, %L, %L)', 'ironwod-tick', p_schedule,
                   format('SELECT %I.ironwod_tick()', (SELECT n.nspname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                                                        WHERE p.proname = 'ironwod_tick' LIMIT 1)))
    INTO v_job;
    RETURN v_job;
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_schedule(text) IS 'Install (or replace) the pg_cron job ironwod-tick that calls ironwod_tick(); requires pg_cron';

-- Pause a gym: no run starts for it (ironwod_tick skips it, ironwod_sync refuses,
-- and a run queued by a racing call is cancelled when a worker claims it), the
-- queued run is cancelled and a running one stops at its next page (the worker
-- checks the run's status in every landing transaction).  The key, the
-- checkpoints of an unfinished backfill and the breaker state stay, so
-- ironwod_resume picks up where the gym left off.
CREATE FUNCTION @extschema@.ironwod_pause(p_tenant_id uuid, p_gym_id uuid)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_status text;
    v_now timestamptz := clock_timestamp();
    v_by text := session_user;
    v_run bigint;
BEGIN
    PERFORM ironwod.assert_connection(p_tenant_id, p_gym_id);
    SELECT c.status INTO v_status FROM ironwod.integrations_wodify_connection c
    WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id FOR UPDATE;
    IF v_status = 'paused' THEN
        RAISE NOTICE 'gym % is already paused', p_gym_id;
        RETURN v_status;
    END IF;
    IF v_status NOT IN ('connected', 'error') THEN
        RAISE EXCEPTION 'gym % cannot be paused while it is %', p_gym_id, v_status
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = CASE v_status WHEN 'pending' THEN 'Wait until its API key is validated (ironwod_status), or disconnect it.'
                                       ELSE 'Connect it again with ironwod_connect.' END;
    END IF;
    UPDATE ironwod.integrations_wodify_connection c
       SET status = 'paused', paused_at = v_now, paused_by = v_by, updated_at = v_now
     WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id;
    UPDATE ironwod.sync_runs r
       SET status = 'cancelled', finished_at = v_now, last_error = 'paused', phase = NULL
     WHERE r.tenant_id = p_tenant_id AND r.gym_id = p_gym_id AND r.status IN ('queued', 'running')
    RETURNING r.run_id INTO v_run;
    IF v_run IS NOT NULL THEN
        PERFORM ironwod.log_run(p_tenant_id, p_gym_id, v_run);
    END IF;
    PERFORM ironwod.emit_event(v_run, 'wodify.paused', NULL, jsonb_build_object('by', v_by, 'cancelled_run', v_run));
    PERFORM ironwod.wake();
    RETURN 'paused';
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_pause(uuid, uuid) IS 'Pause a gym: start no run for it, cancel its queued run, stop its running run at the next page; ironwod_resume undoes it';

-- Resume a paused gym: the connection goes back to what it was (connected, or in
-- error while its circuit breaker is open), and the schedule takes over again:
-- the next ironwod_tick queues the nightly run the pause skipped, or the rest of
-- an unfinished backfill.
CREATE FUNCTION @extschema@.ironwod_resume(p_tenant_id uuid, p_gym_id uuid)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_status text;
    v_now timestamptz := clock_timestamp();
BEGIN
    PERFORM ironwod.assert_connection(p_tenant_id, p_gym_id);
    SELECT c.status INTO v_status FROM ironwod.integrations_wodify_connection c
    WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id FOR UPDATE;
    IF v_status <> 'paused' THEN
        RAISE NOTICE 'gym % is not paused (status %)', p_gym_id, v_status;
        RETURN v_status;
    END IF;
    UPDATE ironwod.integrations_wodify_connection c
       SET status = CASE WHEN c.breaker_opened_at IS NOT NULL THEN 'error' ELSE 'connected' END,
           paused_at = NULL, paused_by = NULL, updated_at = v_now
     WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id
    RETURNING c.status INTO v_status;
    PERFORM ironwod.emit_event(NULL, 'wodify.resumed', NULL, jsonb_build_object('status', v_status));
    RETURN v_status;
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_resume(uuid, uuid) IS 'Resume a paused gym: restore its status (connected, or error while the breaker is open) and let ironwod_tick schedule it again';
