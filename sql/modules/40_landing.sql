-- 40_landing: what the run worker does in SQL.  C moves bytes; these functions own
-- the data logic: claiming a run, choosing the next unit of work, landing a page,
-- and finishing or failing the run.  They run as the worker role, under its scope,
-- so RLS binds them like any other caller.

-- Wodify writes datetimes with or without a trailing Z and uses 1900-01-01 for
-- "no value"; a zone-less datetime is UTC.  Anything unparsable is NULL here rather
-- than an error: source_updated_at is bookkeeping, the payload keeps the truth.
CREATE FUNCTION ironwod.parse_ts(p text) RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN p IS NULL OR p !~ '^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}(:?\d{2})?)?$'
             OR p LIKE '1900-01-01%' THEN NULL
        WHEN p ~ '(Z|[+-]\d{2}(:?\d{2})?)$' THEN p::timestamptz
        ELSE p::timestamp AT TIME ZONE 'UTC'
    END
$$;
COMMENT ON FUNCTION ironwod.parse_ts(text) IS 'Wodify datetime text to timestamptz; sentinels and garbage become NULL, zone-less means UTC';

-- Percent-encode a query value once (wodify-api.md §5): everything but unreserved
-- characters, so |, ;, :, ' and spaces are safe inside q=.
CREATE FUNCTION ironwod.urlencode(p text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT string_agg(
        CASE WHEN b BETWEEN 48 AND 57 OR b BETWEEN 65 AND 90 OR b BETWEEN 97 AND 122
                  OR b IN (45, 46, 95, 126)
             THEN chr(b) ELSE '%' || upper(lpad(to_hex(b), 2, '0')) END, '' ORDER BY i)
    FROM (SELECT i, get_byte(convert_to(p, 'UTF8'), i) AS b
          FROM generate_series(0, octet_length(convert_to(p, 'UTF8')) - 1) AS i) s
$$;
COMMENT ON FUNCTION ironwod.urlencode(text) IS 'Percent-encode a URL query value (RFC 3986 unreserved characters pass)';

-- First day of the UTC month that opens the backfill horizon (24 months by default).
CREATE FUNCTION ironwod.backfill_since() RETURNS timestamptz
LANGUAGE sql STABLE
AS $$
    SELECT (date_trunc('month', now() AT TIME ZONE 'UTC')
            - make_interval(months => current_setting('ironwod.backfill_months')::int)) AT TIME ZONE 'UTC'
$$;
COMMENT ON FUNCTION ironwod.backfill_since() IS 'Start of the backfill horizon for financials and attendance: first of the UTC month ironwod.backfill_months ago';

CREATE FUNCTION ironwod.iso_utc(p timestamptz) RETURNS text
LANGUAGE sql STABLE STRICT
AS $$ SELECT to_char(p AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') $$;
COMMENT ON FUNCTION ironwod.iso_utc(timestamptz) IS 'Timestamp in the YYYY-MM-DDTHH:MM:SSZ form Wodify search accepts';

-- Events go to a table (for admin tooling) and to NOTIFY (for live listeners).
CREATE FUNCTION ironwod.emit_event(p_run_id bigint, p_event text, p_entity text, p_detail jsonb)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO ironwod.sync_events (tenant_id, gym_id, run_id, event, entity, detail)
    VALUES (ironwod.scope_tenant(), ironwod.scope_gym(), p_run_id, p_event, p_entity, coalesce(p_detail, '{}'));
    PERFORM pg_notify('ironwod_events', json_build_object(
        'tenant_id', ironwod.scope_tenant(), 'gym_id', ironwod.scope_gym(),
        'run_id', p_run_id, 'event', p_event, 'entity', p_entity)::text);
END
$$;
COMMENT ON FUNCTION ironwod.emit_event(bigint, text, text, jsonb) IS 'Record a wodify.sync.* event and NOTIFY ironwod_events';

-- Mark the run running before any work: a crash always leaves evidence
-- (TimescaleDB's mark-start rule).  Returns the sealed key only to the worker role.
CREATE FUNCTION ironwod.claim_run(p_run_id bigint, p_pid integer)
RETURNS TABLE (mode text, api_key_ciphertext bytea, master_key_id text)
LANGUAGE plpgsql
AS $$
DECLARE
    v_mode text;
BEGIN
    UPDATE ironwod.sync_runs r
       SET status = 'running', started_at = clock_timestamp(), heartbeat_at = clock_timestamp(),
           worker_pid = p_pid, phase = 'fetch'
     WHERE r.run_id = p_run_id AND r.status = 'queued' AND r.tenant_id = ironwod.scope_tenant() AND r.gym_id = ironwod.scope_gym()
    RETURNING r.mode INTO v_mode;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.started', NULL, jsonb_build_object('mode', v_mode));
    RETURN QUERY
        SELECT v_mode, c.api_key_ciphertext, c.master_key_id
        FROM ironwod.integrations_wodify_connection c
        WHERE c.tenant_id = ironwod.scope_tenant() AND c.gym_id = ironwod.scope_gym() AND c.status <> 'disconnected';
END
$$;
COMMENT ON FUNCTION ironwod.claim_run(bigint, integer) IS 'Worker: move a queued run to running and hand back its mode and sealed key';

-- The next unit of backfill work not yet checkpointed, in the entity order of
-- design.md §4: full lists, then per-client sign-ins (only clients whose
-- last_class_sign_in falls inside the horizon), then monthly windows newest first.
-- Returns the relative URL without page parameters; no row means the run is done.
CREATE FUNCTION ironwod.next_task(p_run_id bigint)
RETURNS TABLE (entity text, window_key text, url text, page_size integer)
LANGUAGE plpgsql
AS $$
DECLARE
    e ironwod.entities;
    v_since timestamptz := ironwod.backfill_since();
    v_key text;
    v_start timestamptz;
    v_client bigint;
BEGIN
    FOR e IN SELECT * FROM ironwod.entities WHERE enabled ORDER BY ordinal LOOP
        IF e.backfill_strategy = 'full' THEN
            IF NOT EXISTS (SELECT 1 FROM ironwod.backfill_checkpoints b
                           WHERE b.tenant_id = ironwod.scope_tenant() AND b.gym_id = ironwod.scope_gym()
                             AND b.entity = e.entity AND b.window_key = 'full') THEN
                RETURN QUERY SELECT e.entity, 'full'::text,
                    e.path || coalesce('?sort=' || ironwod.urlencode(e.sort), ''), e.page_size;
                RETURN;
            END IF;
        ELSIF e.backfill_strategy = 'per_client' THEN
            EXECUTE format($q$
                SELECT c.wodify_id
                FROM (SELECT DISTINCT ON (wodify_id) wodify_id, payload_json
                      FROM ironwod.wodify_raw_clients
                      WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym()
                      ORDER BY wodify_id, source_updated_at DESC NULLS LAST, raw_id DESC) c
                WHERE ironwod.parse_ts(c.payload_json->>'last_class_sign_in') >= $1
                  AND NOT EXISTS (SELECT 1 FROM ironwod.backfill_checkpoints b
                                  WHERE b.tenant_id = ironwod.scope_tenant() AND b.gym_id = ironwod.scope_gym()
                                    AND b.entity = %L AND b.window_key = 'client:' || c.wodify_id)
                ORDER BY c.wodify_id LIMIT 1$q$, e.entity)
            INTO v_client USING v_since;
            IF v_client IS NOT NULL THEN
                RETURN QUERY SELECT e.entity, 'client:' || v_client,
                    replace(e.path, '{client_id}', v_client::text)
                    || '?q=' || ironwod.urlencode(e.window_field || '|gte|' || ironwod.iso_utc(v_since))
                    || coalesce('&sort=' || ironwod.urlencode(e.sort), ''), e.page_size;
                RETURN;
            END IF;
        ELSE
            SELECT w INTO v_start
            FROM generate_series(date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
                                 v_since, interval '-1 month') AS w
            WHERE NOT EXISTS (SELECT 1 FROM ironwod.backfill_checkpoints b
                              WHERE b.tenant_id = ironwod.scope_tenant() AND b.gym_id = ironwod.scope_gym()
                                AND b.entity = e.entity
                                AND b.window_key = to_char(w AT TIME ZONE 'UTC', 'YYYY-MM'))
            ORDER BY w DESC LIMIT 1;
            IF v_start IS NOT NULL THEN
                v_key := to_char(v_start AT TIME ZONE 'UTC', 'YYYY-MM');
                RETURN QUERY SELECT e.entity, v_key,
                    e.path || '?q=' || ironwod.urlencode(
                        e.window_field || '|gte|' || ironwod.iso_utc(v_start) || ';'
                        || e.window_field || '|lt|'
                        || ironwod.iso_utc(((v_start AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC'))
                    || coalesce('&sort=' || ironwod.urlencode(e.sort), ''), e.page_size;
                RETURN;
            END IF;
        END IF;
    END LOOP;
END
$$;
COMMENT ON FUNCTION ironwod.next_task(bigint) IS 'Worker: next backfill unit (entity, window key, relative URL) not yet checkpointed';

-- Land one response page in one transaction.  Classifies the body first (Wodify
-- reports errors as HTTP 200 with an HTTPCode envelope), then upserts every record
-- as a payload version, bumps the run's counters and, on the last page of a unit,
-- writes its checkpoint, all atomically: a crash between pages loses nothing and
-- re-lands nothing twice.
CREATE FUNCTION ironwod.land_page(p_run_id bigint, p_entity text, p_window_key text,
                                  p_page integer, p_body jsonb, p_attempts integer)
RETURNS TABLE (outcome text, http_code integer, message text, has_more boolean,
               n_records integer, n_new integer)
LANGUAGE plpgsql
AS $$
DECLARE
    e ironwod.entities;
    v_records jsonb;
    v_has_more boolean;
    v_n integer;
    v_new integer;
    v_missing integer;
BEGIN
    PERFORM 1 FROM ironwod.sync_runs r
     WHERE r.run_id = p_run_id AND r.status = 'running' AND r.tenant_id = ironwod.scope_tenant() AND r.gym_id = ironwod.scope_gym();
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % is no longer running', p_run_id
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'It was cancelled or disconnected.';
    END IF;
    SELECT * INTO STRICT e FROM ironwod.entities x WHERE x.entity = p_entity;

    IF jsonb_typeof(p_body) <> 'object' THEN
        RETURN QUERY SELECT 'bad_body'::text, NULL::integer, 'response is not a JSON object'::text, NULL::boolean, 0, 0;
        RETURN;
    END IF;
    IF p_body ? 'HTTPCode' THEN
        RETURN QUERY SELECT 'envelope'::text,
            CASE WHEN p_body->>'HTTPCode' ~ '^\d{3}$' THEN (p_body->>'HTTPCode')::integer ELSE 500 END,
            left(coalesce(p_body->>'ErrorCode', '') || ': ' || coalesce(p_body->>'DeveloperMessage', ''), 200),
            NULL::boolean, 0, 0;
        RETURN;
    END IF;
    v_records := p_body -> e.records_key;
    IF jsonb_typeof(v_records) IS DISTINCT FROM 'array' THEN
        RETURN QUERY SELECT 'bad_body'::text, NULL::integer,
            format('response has no "%s" array', e.records_key), NULL::boolean, 0, 0;
        RETURN;
    END IF;
    -- Ids are integers, sent as numbers (or, by a few endpoints, as digit strings).
    SELECT count(*) FILTER (WHERE NOT coalesce((r ->> e.id_field) ~ '^\d{1,18}$', false))
      INTO v_missing FROM jsonb_array_elements(v_records) r;
    IF v_missing > 0 THEN
        RETURN QUERY SELECT 'bad_body'::text, NULL::integer,
            format('%s record(s) without a numeric "%s"', v_missing, e.id_field), NULL::boolean, 0, 0;
        RETURN;
    END IF;

    v_n := jsonb_array_length(v_records);
    v_has_more := coalesce((p_body #>> '{pagination,has_more}')::boolean, v_n >= e.page_size);

    EXECUTE format($ins$
        WITH recs AS (
            SELECT DISTINCT ON (wid, h) wid, h, rec
            FROM jsonb_array_elements($1) AS a(rec),
                 LATERAL (SELECT (rec ->> %L)::bigint AS wid,
                                 sha256(convert_to(rec::text, 'UTF8')) AS h) x
        ), ins AS (
            INSERT INTO ironwod.%I AS t
                (tenant_id, gym_id, wodify_id, payload_json, payload_hash, source_updated_at,
                 ingest_run_id, last_seen_run_id)
            SELECT ironwod.scope_tenant(), ironwod.scope_gym(), wid, rec, h,
                   coalesce(ironwod.parse_ts(rec #>> $2), ironwod.parse_ts(rec #>> $3)), $4, $4
            FROM recs
            ON CONFLICT (tenant_id, gym_id, wodify_id, payload_hash)
            DO UPDATE SET last_seen_run_id = excluded.last_seen_run_id, last_seen_at = now()
            RETURNING (xmax = 0) AS inserted)
        SELECT count(*) FILTER (WHERE inserted) FROM ins$ins$, e.id_field, e.raw_table)
    INTO v_new USING v_records, e.updated_at_path, e.created_at_path, p_run_id;

    INSERT INTO ironwod.sync_run_entities AS s
        (tenant_id, gym_id, run_id, entity, pages, requests, pulled, new_versions, unchanged, tasks_done)
    VALUES (ironwod.scope_tenant(), ironwod.scope_gym(), p_run_id, p_entity, 1, p_attempts,
            v_n, v_new, v_n - v_new, CASE WHEN v_has_more THEN 0 ELSE 1 END)
    ON CONFLICT (tenant_id, gym_id, run_id, entity) DO UPDATE
       SET pages = s.pages + 1, requests = s.requests + excluded.requests,
           pulled = s.pulled + excluded.pulled, new_versions = s.new_versions + excluded.new_versions,
           unchanged = s.unchanged + excluded.unchanged, tasks_done = s.tasks_done + excluded.tasks_done;

    UPDATE ironwod.sync_runs r
       SET requests = r.requests + p_attempts, retries = r.retries + p_attempts - 1,
           heartbeat_at = clock_timestamp(), phase = 'land'
     WHERE r.run_id = p_run_id AND r.tenant_id = ironwod.scope_tenant() AND r.gym_id = ironwod.scope_gym();

    IF NOT v_has_more THEN
        INSERT INTO ironwod.backfill_checkpoints
            (tenant_id, gym_id, entity, window_key, window_start, window_end, pages, records, completed_by)
        SELECT ironwod.scope_tenant(), ironwod.scope_gym(), p_entity, p_window_key,
               CASE WHEN p_window_key ~ '^\d{4}-\d{2}$' THEN (p_window_key || '-01')::timestamp AT TIME ZONE 'UTC' END,
               CASE WHEN p_window_key ~ '^\d{4}-\d{2}$' THEN ((p_window_key || '-01')::timestamp + interval '1 month') AT TIME ZONE 'UTC' END,
               p_page, 0, p_run_id
        ON CONFLICT (tenant_id, gym_id, entity, window_key) DO NOTHING;
    END IF;

    RETURN QUERY SELECT 'landed'::text, 200, NULL::text, v_has_more, v_n, v_new;
END
$$;
COMMENT ON FUNCTION ironwod.land_page(bigint, text, text, integer, jsonb, integer) IS 'Worker: classify and land one response page; checkpoint the unit on its last page';

-- A clean backfill: set each entity's watermark from the vendor's own timestamps,
-- clear the checkpoints (the next backfill pulls everything again), close the
-- breaker, and record the completion.
CREATE FUNCTION ironwod.finish_run(p_run_id bigint)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_mode text;
    e record;
    v_max timestamptz;
BEGIN
    SELECT r.mode INTO v_mode FROM ironwod.sync_runs r
     WHERE r.run_id = p_run_id AND r.status = 'running' AND r.tenant_id = ironwod.scope_tenant() AND r.gym_id = ironwod.scope_gym();
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % is no longer running', p_run_id USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF v_mode = 'backfill' THEN
        FOR e IN SELECT entity, raw_table FROM ironwod.entities WHERE enabled ORDER BY ordinal LOOP
            EXECUTE format('SELECT max(source_updated_at) FROM ironwod.%I WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym()', e.raw_table) INTO v_max;
            INSERT INTO ironwod.entity_cursors AS c (tenant_id, gym_id, entity, watermark, updated_by)
            VALUES (ironwod.scope_tenant(), ironwod.scope_gym(), e.entity, v_max, p_run_id)
            ON CONFLICT (tenant_id, gym_id, entity) DO UPDATE
               SET watermark = greatest(c.watermark, excluded.watermark), updated_by = p_run_id, updated_at = now();
        END LOOP;
        UPDATE ironwod.sync_run_entities s
           SET status = 'completed', completed_at = clock_timestamp(),
               cursor_end = (SELECT c.watermark FROM ironwod.entity_cursors c
                             WHERE c.tenant_id = ironwod.scope_tenant() AND c.gym_id = ironwod.scope_gym() AND c.entity = s.entity)
         WHERE s.tenant_id = ironwod.scope_tenant() AND s.gym_id = ironwod.scope_gym() AND s.run_id = p_run_id;
        DELETE FROM ironwod.backfill_checkpoints WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym();
    END IF;
    UPDATE ironwod.sync_runs r
       SET status = 'succeeded', finished_at = clock_timestamp(), phase = NULL,
           cursor_end = (SELECT jsonb_object_agg(c.entity, c.watermark) FROM ironwod.entity_cursors c
                         WHERE c.tenant_id = ironwod.scope_tenant() AND c.gym_id = ironwod.scope_gym())
     WHERE r.tenant_id = ironwod.scope_tenant() AND r.gym_id = ironwod.scope_gym() AND r.run_id = p_run_id;
    UPDATE ironwod.integrations_wodify_connection c
       SET status = CASE WHEN c.status IN ('pending', 'error') THEN 'connected' ELSE c.status END,
           last_success_at = clock_timestamp(), consecutive_failures = 0,
           breaker_opened_at = NULL, next_retry_at = NULL,
           last_cursor_at = (SELECT max(x.watermark) FROM ironwod.entity_cursors x
                             WHERE x.tenant_id = ironwod.scope_tenant() AND x.gym_id = ironwod.scope_gym()),
           backfill_completed_at = CASE WHEN v_mode = 'backfill' THEN clock_timestamp() ELSE c.backfill_completed_at END,
           updated_at = now()
     WHERE c.tenant_id = ironwod.scope_tenant() AND c.gym_id = ironwod.scope_gym();
    PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.completed', NULL,
        (SELECT coalesce(jsonb_object_agg(s.entity, jsonb_build_object('pulled', s.pulled, 'new', s.new_versions)), '{}')
         FROM ironwod.sync_run_entities s
         WHERE s.tenant_id = ironwod.scope_tenant() AND s.gym_id = ironwod.scope_gym() AND s.run_id = p_run_id));
END
$$;
COMMENT ON FUNCTION ironwod.finish_run(bigint) IS 'Worker: mark a run succeeded, advance watermarks, clear backfill checkpoints';

-- Verdict of a queued validate run (the path taken when ironwod_connect could not
-- get an answer in time).  A valid key connects and queues the initial backfill;
-- a rejected key leaves the connection in error with its ciphertext destroyed.
CREATE FUNCTION ironwod.finish_validate(p_run_id bigint, p_valid boolean, p_fingerprint text, p_message text)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF p_valid THEN
        UPDATE ironwod.integrations_wodify_connection
           SET api_key_fingerprint = p_fingerprint, connected_at = coalesce(connected_at, now()), updated_at = now()
         WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym();
        PERFORM ironwod.finish_run(p_run_id);
        INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode)
        SELECT c.tenant_id, c.gym_id, 'backfill'
        FROM ironwod.integrations_wodify_connection c
        WHERE c.tenant_id = ironwod.scope_tenant() AND c.gym_id = ironwod.scope_gym() AND c.backfill_completed_at IS NULL;
    ELSE
        PERFORM ironwod.fail_run(p_run_id, 'auth', p_message, 'validate');
        UPDATE ironwod.integrations_wodify_connection
           SET api_key_ciphertext = NULL, master_key_id = NULL, updated_at = now()
         WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym();
    END IF;
END
$$;
COMMENT ON FUNCTION ironwod.finish_validate(bigint, boolean, text, text) IS 'Worker: record the verdict of a queued key validation';

-- A failed run: sanitized error (the C caller never passes key material), failed
-- phase, and the connection's failure bookkeeping.  An auth error opens the breaker
-- at once.  A run no longer running (cancelled) is left as it is.
CREATE FUNCTION ironwod.fail_run(p_run_id bigint, p_code text, p_message text, p_phase text)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE ironwod.sync_runs r
       SET status = 'failed', finished_at = clock_timestamp(), error_code = p_code,
           last_error = left(p_message, 500), failed_phase = p_phase, phase = NULL
     WHERE r.tenant_id = ironwod.scope_tenant() AND r.gym_id = ironwod.scope_gym() AND r.run_id = p_run_id AND r.status IN ('running', 'queued');
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE ironwod.integrations_wodify_connection c
       SET last_error_at = clock_timestamp(), last_error = left(p_message, 500), last_error_code = p_code,
           consecutive_failures = c.consecutive_failures + 1,
           status = CASE WHEN p_code = 'auth' THEN 'error' ELSE c.status END,
           breaker_opened_at = CASE WHEN p_code = 'auth' THEN clock_timestamp() ELSE c.breaker_opened_at END,
           updated_at = now()
     WHERE c.tenant_id = ironwod.scope_tenant() AND c.gym_id = ironwod.scope_gym();
    PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.failed', NULL,
        jsonb_build_object('code', p_code, 'phase', p_phase, 'message', left(p_message, 500)));
END
$$;
COMMENT ON FUNCTION ironwod.fail_run(bigint, text, text, text) IS 'Worker or supervisor: record a failed run with a sanitized error';
