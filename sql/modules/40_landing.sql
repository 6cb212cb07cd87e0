-- 40_landing: what the run worker does in SQL.  C moves bytes; these functions own
-- the data logic: claiming a run, choosing the next unit of work, landing a page,
-- and finishing or failing the run.  They run as the worker role, under its scope,
-- so RLS binds them like any other caller.

-- Wodify writes datetimes with or without a trailing Z and uses 1900-01-01 for
-- "no value"; a zone-less datetime is UTC.  Anything unparsable (another shape,
-- month 13) is NULL rather than an error: one odd field must not stop a page.
-- In C (src/wire.c) because it runs for every landed record and every transformed
-- row; the landing code calls the same parser directly.
CREATE FUNCTION ironwod.parse_ts(p text) RETURNS timestamptz
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'ironwod_parse_ts';
COMMENT ON FUNCTION ironwod.parse_ts(text) IS 'Wodify datetime text to timestamptz; sentinels and garbage become NULL, zone-less means UTC';

-- Percent-encode a query value once (wodify-api.md §5): everything but unreserved
-- characters, so |, ;, :, ' and spaces are safe inside q=.
CREATE FUNCTION ironwod.urlencode(p text) RETURNS text
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'ironwod_urlencode';
COMMENT ON FUNCTION ironwod.urlencode(text) IS 'Percent-encode a URL query value (RFC 3986 unreserved characters pass)';

CREATE FUNCTION ironwod.is_time_zone(p text) RETURNS boolean
LANGUAGE c STABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'ironwod_is_time_zone';
COMMENT ON FUNCTION ironwod.is_time_zone(text) IS 'Is this a time zone name PostgreSQL knows?';

-- The per-client change detectors as typed columns of the raw client versions,
-- so planning compares them without de-TOASTing any payload.
ALTER TABLE ironwod.wodify_raw_clients
    ADD COLUMN last_class_sign_in timestamptz
        GENERATED ALWAYS AS (ironwod.parse_ts(payload_json ->> 'last_class_sign_in')) STORED,
    ADD COLUMN total_class_sign_ins bigint
        GENERATED ALWAYS AS (CASE WHEN (payload_json ->> 'total_class_sign_ins') ~ '^\d{1,18}$'
                                  THEN (payload_json ->> 'total_class_sign_ins')::bigint END) STORED;
COMMENT ON COLUMN ironwod.wodify_raw_clients.last_class_sign_in IS 'Change detector: the version''s last_class_sign_in (NULL when absent or a sentinel)';
COMMENT ON COLUMN ironwod.wodify_raw_clients.total_class_sign_ins IS 'Change detector: the version''s total_class_sign_ins (NULL when absent or not an integer)';

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

-- Upper bounds (ms) of the API latency histogram buckets in sync_run_entities;
-- the eighth bucket holds everything slower.
CREATE FUNCTION ironwod.latency_buckets() RETURNS double precision[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT '{50,100,250,500,1000,2500,5000}'::double precision[] $$;
COMMENT ON FUNCTION ironwod.latency_buckets() IS 'Upper bounds in ms of the latency histogram buckets (the last bucket is unbounded)';

-- The current version of records of an entity: the latest by source_updated_at,
-- then raw id (design.md §4) -- what "the vendor says now".  For one gym, and for
-- the given Wodify ids only (all of the gym's records when p_ids is NULL);
-- payload_json is NULL unless p_payload (callers that need only ids skip the cost).
CREATE FUNCTION ironwod.latest_raw_versions(p_entity text, p_tenant_id uuid, p_gym_id uuid,
                                            p_ids bigint[] DEFAULT NULL, p_payload boolean DEFAULT true)
RETURNS TABLE (wodify_id bigint, raw_id bigint, payload_hash bytea, payload_json jsonb,
               ingest_run_id bigint, last_seen_run_id bigint)
LANGUAGE plpgsql STABLE
SET enable_sort = off
AS $$
DECLARE
    v_lo bigint;
    v_hi bigint;
BEGIN
    -- Read in the order of the raw table's unique (wodify_id, payload_hash)
    -- index, each record's few versions put in version order by an incremental
    -- sort: linear in the rows whatever the estimates.  The sort is the
    -- subquery's ORDER BY because PostgreSQL 15 plans DISTINCT over a full sort
    -- only; without enable_sort = off, on statistics that predate the gym, the
    -- planner may sort the whole gym's versions (payloads included) instead.
    -- "= ANY", not a join with unnest($3): index probes for a few ids, one scan
    -- for a whole backfill's, linear either way.  A join is planned on the raw
    -- table's estimate for the gym, which is one row while its statistics predate
    -- the gym, and a nested loop over the unnest on that estimate is quadratic.
    -- The ids' range bounds the scan too (the transform asks in batches of ids).
    IF p_ids IS NOT NULL THEN
        SELECT min(i), max(i) INTO v_lo, v_hi FROM unnest(p_ids) AS i;
    END IF;
    RETURN QUERY EXECUTE format(
        'SELECT DISTINCT ON (v.wodify_id) v.wodify_id, v.raw_id, v.payload_hash, v.payload_json,
                v.ingest_run_id, v.last_seen_run_id
         FROM (SELECT r.wodify_id, r.raw_id, r.payload_hash, %s AS payload_json, r.ingest_run_id,
                      r.last_seen_run_id, r.source_updated_at
               FROM ironwod.%I r
               WHERE r.tenant_id = $1 AND r.gym_id = $2 %s
               ORDER BY r.wodify_id, r.source_updated_at DESC NULLS LAST, r.raw_id DESC) v
         ORDER BY v.wodify_id, v.source_updated_at DESC NULLS LAST, v.raw_id DESC',
        CASE WHEN p_payload THEN 'r.payload_json' ELSE 'NULL::jsonb' END,
        (SELECT e.raw_table FROM ironwod.entities e WHERE e.entity = p_entity),
        CASE WHEN p_ids IS NOT NULL THEN 'AND r.wodify_id = ANY ($3) AND r.wodify_id BETWEEN $4 AND $5' ELSE '' END)
    USING p_tenant_id, p_gym_id, p_ids, v_lo, v_hi;
END
$$;
COMMENT ON FUNCTION ironwod.latest_raw_versions(text, uuid, uuid, bigint[], boolean) IS 'Latest raw version of records of an entity of one gym: the given Wodify ids, or all when NULL (payload only when asked for)';

CREATE FUNCTION ironwod.latest_raw_versions(p_entity text)
RETURNS TABLE (wodify_id bigint, raw_id bigint, payload_hash bytea, payload_json jsonb,
               ingest_run_id bigint, last_seen_run_id bigint)
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN QUERY SELECT * FROM ironwod.latest_raw_versions(p_entity, ironwod.scope_tenant(), ironwod.scope_gym());
END
$$;
COMMENT ON FUNCTION ironwod.latest_raw_versions(text) IS 'Latest raw version of every record of an entity in the current scope';

-- Events go to a table (for admin tooling) and to NOTIFY (for live listeners).
-- PostgreSQL has no access control on LISTEN: any role that can connect hears
-- every notification on a channel.  So the payload is only the event's opaque
-- id; a subscriber reads the event itself from ironwod.sync_events, where
-- row-level security shows it only its own tenant's and gym's rows.
CREATE FUNCTION ironwod.emit_event(p_run_id bigint, p_event text, p_entity text, p_detail jsonb)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_event_id bigint;
BEGIN
    INSERT INTO ironwod.sync_events (tenant_id, gym_id, run_id, event, entity, detail)
    VALUES (ironwod.scope_tenant(), ironwod.scope_gym(), p_run_id, p_event, p_entity, coalesce(p_detail, '{}'))
    RETURNING event_id INTO v_event_id;
    PERFORM pg_notify('ironwod_events', v_event_id::text);
END
$$;
COMMENT ON FUNCTION ironwod.emit_event(bigint, text, text, jsonb) IS 'Record a wodify.sync.* event and NOTIFY ironwod_events with only its event_id (read the row under RLS)';

-- Mark the run running before any work: a crash always leaves evidence
-- (TimescaleDB's mark-start rule).  Returns the sealed key only to the worker role.
CREATE FUNCTION ironwod.claim_run(p_run_id bigint, p_pid integer)
RETURNS TABLE (mode text, api_key_ciphertext bytea, master_key_id text)
LANGUAGE plpgsql
AS $$
DECLARE
    -- The scope as values, so every statement routes to the tenant's shard on
    -- Citus (the FOR SHARE must).
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_mode text;
    v_now timestamptz := clock_timestamp();
BEGIN
    -- Lock order: the gym's connection row, then its run.  The page's
    -- transaction (hold_connection, src/land.c) and ironwod_pause take them in
    -- this order, so a path that took the run first (its UPDATE) and then the
    -- connection could deadlock with them.  NO KEY UPDATE, as the UPDATEs of
    -- the connection take: a run queued meanwhile (its foreign key) is not held up.
    PERFORM 1 FROM ironwod.integrations_wodify_connection c
     WHERE c.tenant_id = v_t AND c.gym_id = v_g FOR NO KEY UPDATE;
    -- A paused gym starts nothing, even a run queued by a call that raced the pause.
    IF EXISTS (SELECT 1 FROM ironwod.integrations_wodify_connection c
               WHERE c.tenant_id = v_t AND c.gym_id = v_g
                 AND c.status = 'paused') THEN
        UPDATE ironwod.sync_runs r
           SET status = 'cancelled', finished_at = v_now, last_error = 'paused'
         WHERE r.run_id = p_run_id AND r.status = 'queued'
           AND r.tenant_id = v_t AND r.gym_id = v_g;
        IF FOUND THEN
            PERFORM ironwod.log_run(v_t, v_g, p_run_id);
        END IF;
        RETURN;
    END IF;
    UPDATE ironwod.sync_runs r
       SET status = 'running', started_at = v_now, heartbeat_at = v_now,
           worker_pid = p_pid, phase = 'fetch'
     WHERE r.run_id = p_run_id AND r.status = 'queued' AND r.tenant_id = v_t AND r.gym_id = v_g
    RETURNING r.mode INTO v_mode;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.started', NULL, jsonb_build_object('mode', v_mode));
    -- A rotated key left waiting (its run ended without swapping it in) is
    -- swapped in now, before this run takes a key.
    PERFORM ironwod.apply_rotated_key(v_now);
    -- The row is locked since the start, so a rotation that committed
    -- meanwhile was waited for and is read here: no run claimed after a
    -- rotation commits gets the old key.
    RETURN QUERY
        SELECT v_mode, c.api_key_ciphertext, c.master_key_id
        FROM ironwod.integrations_wodify_connection c
        WHERE c.tenant_id = v_t AND c.gym_id = v_g AND c.status <> 'disconnected'
        FOR SHARE;
END
$$;
COMMENT ON FUNCTION ironwod.claim_run(bigint, integer) IS 'Worker: move a queued run to running and hand back its mode and sealed key';

-- Entities a run skips: those the gym's plan does not include, except in a
-- reconciliation, which asks again.  As an array, which callers match against
-- the registry: Citus plans no correlated subquery over the registry (a
-- reference table).
CREATE FUNCTION ironwod.skipped_entities(p_run_id bigint) RETURNS text[]
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
BEGIN
    RETURN ARRAY(
        SELECT n.entity FROM ironwod.entity_entitlements n
        JOIN ironwod.sync_runs r ON r.tenant_id = n.tenant_id AND r.gym_id = n.gym_id AND r.run_id = p_run_id
        WHERE n.tenant_id = v_t AND n.gym_id = v_g AND r.tenant_id = v_t AND r.gym_id = v_g
          AND (r.mode <> 'reconcile' OR n.last_checked_run = p_run_id));
END
$$;
COMMENT ON FUNCTION ironwod.skipped_entities(bigint) IS 'Worker: the entities this run skips (not entitled)';

-- The entity starts: derive its units of work once and persist them with the
-- run (run_units), in fetch order, per the table of design.md §4:
--   full lists                     every mode
--   per-client sign-ins            backfill: clients active inside the horizon;
--                                  incremental: clients whose change detectors
--                                  (last_class_sign_in, total_class_sign_ins) moved
--                                  in this run, from their previous last sign-in
--                                  minus the lookback; reconcile: every client
--                                  active in the last sync_window_days
--   windowed financials            backfill: monthly windows, newest first;
--                                  incremental: from the watermark minus the
--                                  lookback, plus the due-date window; reconcile:
--                                  the last sync_window_days (by due date if any)
-- Times come from the run's start.  In a backfill, units the campaign already
-- checkpointed (a killed run's) are planned as skipped.  Records the plan's
-- size and how long planning took; returns the number of units left to fetch.
-- Linear in the entity's clients.
--
-- Few statements: planning is mostly the planner's, not the executor's (a full
-- list took 15 statements and 2 ms of CPU, of which executing them was under
-- 0.2 ms), and a worker plans a statement again for each entity.  So what the
-- units depend on is read in one statement, and units that need no query (a
-- full list, an incremental's since and due windows) are expressions.
--
-- No nested loops in the per-client statement: it joins each client's current
-- version with its version as of the last clean run, two DISTINCT ON subqueries
-- over the raw clients that the planner, on a raw table whose statistics predate
-- the gym (rows=1), joined by a nested loop that re-read the baseline once per
-- changed client (a medium gym's nightly: 60 x 177 rows, 10,577 removed by the
-- join filter, 10 ms of the entity's plan; quadratic in clients).  Hash or
-- merge, the join is linear whatever the estimate.  And no JIT for it: with
-- nested loops off, a join only a nested loop can do is costed as disabled,
-- and that cost alone once made the JIT compile a one-row lookup (254 ms).
-- SET LOCAL around that one statement rather than SET clauses on a function:
-- Citus forwards SET LOCAL to the node that plans the statement, where SET
-- clauses never reach.
CREATE FUNCTION ironwod.plan_entity(p_run_id bigint, p_entity text)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_t0 timestamptz := clock_timestamp();
    v_since timestamptz := ironwod.backfill_since();
    v_lookback interval := make_interval(days => current_setting('ironwod.lookback_days')::int);
    x record;
    v_sort text;
    v_from timestamptz;
    v_last_clean bigint;
    v_nestloop text;
    v_jit text;
    v_keys text[];
    v_urls text[];
    v_done text[] := '{}';
    v_total integer;
    v_skipped integer := 0;
    v_ms double precision;
BEGIN
    -- The registry row, the run, the connection's window and the entity's
    -- watermark: a row of a reference table and rows of the tenant's shard.
    SELECT e.ordinal, e.path, e.sort, e.backfill_strategy, e.window_field, e.incremental_field, e.due_field,
           r.mode, coalesce(r.started_at, now()) AS started, make_interval(days => c.sync_window_days) AS win,
           (SELECT k.watermark FROM ironwod.entity_cursors k
            WHERE k.tenant_id = v_t AND k.gym_id = v_g AND k.entity = p_entity) AS watermark
    INTO STRICT x
    FROM ironwod.entities e, ironwod.sync_runs r, ironwod.integrations_wodify_connection c
    WHERE e.entity = p_entity AND r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id = p_run_id
      AND c.tenant_id = v_t AND c.gym_id = v_g;
    v_sort := coalesce('&sort=' || ironwod.urlencode(x.sort), '');

    IF x.backfill_strategy = 'full' THEN
        v_keys := ARRAY['full'];
        v_urls := ARRAY[x.path || coalesce('?sort=' || ironwod.urlencode(x.sort), '')];

    ELSIF x.backfill_strategy = 'per_client' THEN
        -- The current version of every client, and its version as of the last
        -- clean run (the baseline the change detectors are compared with), by the
        -- version order of design.md §4.  A version landed by a failed run since
        -- then still counts as a change, so nothing is lost to a crash.  Only the
        -- typed detector columns are read, never a payload.
        SELECT coalesce(max(r.run_id), 0) INTO v_last_clean FROM ironwod.sync_runs r
        WHERE r.tenant_id = v_t AND r.gym_id = v_g
          AND r.status = 'succeeded' AND r.mode <> 'validate' AND r.run_id < p_run_id;
        v_nestloop := current_setting('enable_nestloop');
        v_jit := current_setting('jit');
        SET LOCAL enable_nestloop = off;
        SET LOCAL jit = off;
        WITH cur AS (
            SELECT DISTINCT ON (c.wodify_id) c.wodify_id, c.ingest_run_id, c.last_class_sign_in, c.total_class_sign_ins
            FROM ironwod.wodify_raw_clients c
            WHERE c.tenant_id = v_t AND c.gym_id = v_g
            ORDER BY c.wodify_id, c.source_updated_at DESC NULLS LAST, c.raw_id DESC
        ), base AS (
            SELECT DISTINCT ON (c.wodify_id) c.wodify_id, c.last_class_sign_in, c.total_class_sign_ins
            FROM ironwod.wodify_raw_clients c
            WHERE c.tenant_id = v_t AND c.gym_id = v_g AND c.ingest_run_id <= v_last_clean
              AND x.mode = 'incremental'
            ORDER BY c.wodify_id, c.source_updated_at DESC NULLS LAST, c.raw_id DESC
        ), picked AS (
            SELECT v.wodify_id,
                   CASE x.mode
                       WHEN 'backfill' THEN v_since
                       WHEN 'reconcile' THEN greatest(v_since, x.started - x.win)
                       ELSE greatest(v_since, coalesce(b.last_class_sign_in - v_lookback, v_since))
                   END AS since
            FROM cur v
            LEFT JOIN base b ON b.wodify_id = v.wodify_id
            WHERE CASE x.mode
                      WHEN 'backfill' THEN v.last_class_sign_in >= v_since
                      WHEN 'reconcile' THEN v.last_class_sign_in >= greatest(v_since, x.started - x.win)
                      ELSE v.ingest_run_id > v_last_clean
                           AND v.last_class_sign_in IS NOT NULL
                           AND (v.last_class_sign_in IS DISTINCT FROM b.last_class_sign_in
                                OR v.total_class_sign_ins IS DISTINCT FROM b.total_class_sign_ins)
                  END
        )
        SELECT coalesce(array_agg('client:' || p.wodify_id ORDER BY p.wodify_id), '{}'),
               coalesce(array_agg(replace(x.path, '{client_id}', p.wodify_id::text)
                                  || '?q=' || ironwod.urlencode(x.window_field || '|gte|' || ironwod.iso_utc(p.since))
                                  || v_sort ORDER BY p.wodify_id), '{}')
        INTO v_keys, v_urls
        FROM picked p;
        -- back to the caller's settings, on the node too
        EXECUTE format('SET LOCAL enable_nestloop = %s', v_nestloop);
        EXECUTE format('SET LOCAL jit = %s', v_jit);

    ELSIF x.mode = 'backfill' THEN
        -- The newest window is open-ended, so records stamped ahead of our
        -- clock (vendor clock skew) are not left between windows.
        SELECT array_agg(to_char(w AT TIME ZONE 'UTC', 'YYYY-MM') ORDER BY w DESC),
               array_agg(x.path || '?q=' || ironwod.urlencode(
                   x.window_field || '|gte|' || ironwod.iso_utc(w)
                   || CASE WHEN w < date_trunc('month', x.started AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                           THEN ';' || x.window_field || '|lt|'
                                || ironwod.iso_utc(((w AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC')
                           ELSE '' END)
                   || v_sort ORDER BY w DESC)
        INTO v_keys, v_urls
        FROM generate_series(date_trunc('month', x.started AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
                             v_since, interval '-1 month') AS w;

    ELSE
        v_keys := '{}';
        v_urls := '{}';
        IF x.mode = 'incremental' OR x.due_field IS NULL THEN
            IF x.mode = 'incremental' THEN
                v_from := greatest(v_since, coalesce(x.watermark - v_lookback, v_since));
            ELSE
                v_from := greatest(v_since, x.started - x.win);
            END IF;
            v_keys := v_keys || 'since'::text;
            v_urls := v_urls || (x.path || '?q=' || ironwod.urlencode(
                          CASE WHEN x.mode = 'incremental' THEN coalesce(x.incremental_field, x.window_field)
                               ELSE x.window_field END
                          || '|gte|' || ironwod.iso_utc(v_from)) || v_sort);
        END IF;
        IF x.due_field IS NOT NULL THEN
            -- Status changes (Unpaid -> Paid) carry no timestamp we can follow:
            -- re-scan by due date.
            v_keys := v_keys || 'due'::text;
            v_urls := v_urls || (x.path || '?q=' || ironwod.urlencode(x.due_field || '|gte|' || to_char(
                          (x.started AT TIME ZONE 'UTC')::date - CASE WHEN x.mode = 'incremental'
                              THEN current_setting('ironwod.due_window_days')::int
                              ELSE extract(day FROM x.win)::int END, 'YYYY-MM-DD'))
                          || '&sort=id');
        END IF;
    END IF;

    -- The windows the campaign already checkpointed, read into an array first
    -- and joined as one: Citus plans an outer join from a function (unnest) to
    -- a distributed table by planning the table as a subquery, and with the
    -- constant-false join clause of a run that is not a backfill that plan
    -- crashed the PostgreSQL planner (Citus 12.1.12, from
    -- RecursivelyPlanRecurringTupleOuterJoinWalker: SIGSEGV in
    -- deconstruct_jointree, the run worker lost).  Two arrays join like the
    -- table did (a hash join, linear in the units).
    IF x.mode = 'backfill' THEN
        SELECT coalesce(array_agg(b.window_key), '{}') INTO v_done
        FROM ironwod.backfill_checkpoints b
        WHERE b.tenant_id = v_t AND b.gym_id = v_g AND b.entity = p_entity;
    END IF;

    -- The units' tenant, gym and run come from the run's row (as in
    -- page_statement): Citus then runs this INSERT ... SELECT on the tenant's
    -- shard, where with the values as constants it pulled the rows to the
    -- coordinator and copied them back.  On one node the row is one probe of
    -- the primary key.  ON CONFLICT DO NOTHING (a unit is planned once; nothing
    -- conflicts) stays for a Citus that would run it through the coordinator:
    -- without ON CONFLICT or RETURNING it COPYs the rows into the shard, which
    -- row-level security refuses ("COPY FROM not supported with row-level
    -- security").
    INSERT INTO ironwod.run_units (tenant_id, gym_id, run_id, entity, ordinal, entity_ordinal, window_key, url, status)
    SELECT r.tenant_id, r.gym_id, r.run_id, p_entity, u.ord, x.ordinal, u.window_key, u.url,
           CASE WHEN d.window_key IS NULL THEN 'pending' ELSE 'skipped' END
    FROM ironwod.sync_runs r,
         unnest(v_keys, v_urls) WITH ORDINALITY AS u(window_key, url, ord)
         LEFT JOIN unnest(v_done) AS d(window_key) ON d.window_key = u.window_key
    WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id = p_run_id
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_total = ROW_COUNT;
    IF cardinality(v_done) > 0 THEN
        SELECT count(*) INTO v_skipped FROM ironwod.run_units u
        WHERE u.tenant_id = v_t AND u.gym_id = v_g AND u.run_id = p_run_id AND u.entity = p_entity
          AND u.status = 'skipped';
    END IF;
    v_ms := extract(epoch FROM clock_timestamp() - v_t0) * 1000;

    INSERT INTO ironwod.sync_run_entities AS s (tenant_id, gym_id, run_id, entity, units_total, units_skipped, plan_ms)
    VALUES (v_t, v_g, p_run_id, p_entity, v_total, v_skipped, v_ms)
    ON CONFLICT (tenant_id, gym_id, run_id, entity) DO UPDATE
       SET units_total = excluded.units_total, units_skipped = excluded.units_skipped, plan_ms = excluded.plan_ms;
    RETURN v_total - v_skipped;
END
$$;
COMMENT ON FUNCTION ironwod.plan_entity(bigint, text) IS 'Worker: derive an entity''s units of work once and persist them with the run (run_units); returns how many are left to fetch';

-- The next unit of the run, in entity order then unit order; no row means the
-- run is done.  Entities are planned one at a time, when the previous one has
-- nothing left, so the first pending unit is one index probe.
CREATE FUNCTION ironwod.next_task(p_run_id bigint)
RETURNS TABLE (entity text, window_key text, url text, page_size integer)
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_planned text[];
    v_skipped text[];
    e record;
BEGIN
    RETURN QUERY
        SELECT u.entity, u.window_key, u.url, x.page_size
        FROM ironwod.run_units u JOIN ironwod.entities x ON x.entity = u.entity
        WHERE u.tenant_id = v_t AND u.gym_id = v_g AND u.run_id = p_run_id AND u.status = 'pending'
        ORDER BY u.entity_ordinal, u.ordinal LIMIT 1;
    IF FOUND THEN
        RETURN;
    END IF;
    -- Nothing pending: start the next entity neither planned nor skipped.  The
    -- entities the run planned and skips are read first and matched against the
    -- registry as arrays (Citus plans no correlated subquery over the registry,
    -- a reference table): two statements, where asking about each entity in
    -- turn took a statement per entity passed and made a run's planning
    -- quadratic in its entities.
    v_planned := ARRAY(SELECT s.entity FROM ironwod.sync_run_entities s
                       WHERE s.tenant_id = v_t AND s.gym_id = v_g AND s.run_id = p_run_id
                         AND s.units_total IS NOT NULL);
    v_skipped := ironwod.skipped_entities(p_run_id);
    FOR e IN SELECT x.entity, x.page_size FROM ironwod.entities x
             WHERE x.enabled AND x.entity <> ALL (v_planned) AND x.entity <> ALL (v_skipped)
             ORDER BY x.ordinal LOOP
        CONTINUE WHEN ironwod.plan_entity(p_run_id, e.entity) = 0;
        RETURN QUERY
            SELECT u.entity, u.window_key, u.url, e.page_size
            FROM ironwod.run_units u
            WHERE u.tenant_id = v_t AND u.gym_id = v_g AND u.run_id = p_run_id AND u.entity = e.entity
              AND u.status = 'pending'
            ORDER BY u.entity_ordinal, u.ordinal LIMIT 1;
        RETURN;
    END LOOP;
END
$$;
COMMENT ON FUNCTION ironwod.next_task(bigint) IS 'Worker: next unit of work (entity, window key, relative URL) of the run, planning the next entity when the current one is done';

-- An entity's pull finished cleanly: record it and advance its watermark to the
-- newest vendor timestamp this run saw.  Only vendor timestamps: a pull that saw
-- no records leaves the watermark where it was, and records stamped in the
-- future never counted (src/page.c), so no watermark passes now.  Called in the
-- transaction that landed the entity's last page.  A reconciliation also
-- soft-deletes what vanished.
CREATE FUNCTION ironwod.close_entity(p_run_id bigint, p_entity text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_now timestamptz := clock_timestamp();
    e ironwod.entities;
    v_max timestamptz;
    v_watermark timestamptz;
    v_tz text;
BEGIN
    SELECT * INTO STRICT e FROM ironwod.entities x WHERE x.entity = p_entity;
    SELECT s.max_watermark INTO v_max FROM ironwod.sync_run_entities s
     WHERE s.tenant_id = v_t AND s.gym_id = v_g AND s.run_id = p_run_id AND s.entity = p_entity;
    SELECT c.watermark INTO v_watermark FROM ironwod.entity_cursors c
     WHERE c.tenant_id = v_t AND c.gym_id = v_g AND c.entity = p_entity;

    -- Values, not INSERT ... SELECT over the cursors, and the times computed
    -- first: on Citus a single-row insert with constants routes to the tenant's
    -- shard, where ON CONFLICT DO UPDATE may use no volatile function.
    INSERT INTO ironwod.sync_run_entities AS s (tenant_id, gym_id, run_id, entity, status, completed_at, cursor_start, cursor_end)
    VALUES (v_t, v_g, p_run_id, p_entity, 'completed', v_now, v_watermark, greatest(v_watermark, v_max))
    ON CONFLICT (tenant_id, gym_id, run_id, entity) DO UPDATE
       SET status = 'completed', completed_at = excluded.completed_at,
           cursor_start = excluded.cursor_start, cursor_end = excluded.cursor_end;

    IF v_max IS NOT NULL THEN
        INSERT INTO ironwod.entity_cursors AS c (tenant_id, gym_id, entity, watermark, updated_by, updated_at)
        VALUES (v_t, v_g, p_entity, v_max, p_run_id, v_now)
        ON CONFLICT (tenant_id, gym_id, entity) DO UPDATE
           SET watermark = greatest(c.watermark, excluded.watermark), updated_by = p_run_id, updated_at = excluded.updated_at;
    END IF;

    -- A full list this run fetched itself, every page of it: a quarantined record
    -- of it that was not in it any more is gone at the vendor (or fixed there into
    -- a record that landed).  This is how a record without a readable id leaves.
    IF e.backfill_strategy = 'full' AND EXISTS (
           SELECT 1 FROM ironwod.sync_run_entities s
           WHERE s.tenant_id = v_t AND s.gym_id = v_g
             AND s.run_id = p_run_id AND s.entity = p_entity AND s.units_done > 0 AND s.units_skipped = 0) THEN
        DELETE FROM ironwod.quarantined_records q
         WHERE q.tenant_id = v_t AND q.gym_id = v_g
           AND q.entity = p_entity AND q.last_seen_run_id <> p_run_id;
    END IF;

    -- Pulled cleanly, so the gym's plan includes it (again).
    DELETE FROM ironwod.entity_entitlements n
     WHERE n.tenant_id = v_t AND n.gym_id = v_g AND n.entity = p_entity
       AND n.last_checked_run <> p_run_id;

    IF p_entity = 'locations' THEN
        -- The gym's time zone: the first location's (by id), when PostgreSQL knows it.
        -- Read first, then updated: on Citus an UPDATE ... FROM a function that
        -- reads distributed tables would run that function on the shard.
        SELECT x.payload_json ->> 'time_zone_iana' INTO v_tz
        FROM ironwod.latest_raw_versions('locations', v_t, v_g) x
        WHERE x.last_seen_run_id = p_run_id ORDER BY x.wodify_id LIMIT 1;
        IF ironwod.is_time_zone(v_tz) THEN
            UPDATE ironwod.integrations_wodify_connection c
               SET time_zone = v_tz, updated_at = v_now
             WHERE c.tenant_id = v_t AND c.gym_id = v_g;
        END IF;
    END IF;

    IF (SELECT mode FROM ironwod.sync_runs r
        WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id = p_run_id) = 'reconcile' THEN
        PERFORM ironwod.reconcile_deletions(p_run_id, e);
    END IF;
    -- Read first, then passed: on Citus a query on the shard (a routed SELECT
    -- with a subquery) may not call a function that writes distributed tables.
    SELECT c.watermark INTO v_watermark FROM ironwod.entity_cursors c
    WHERE c.tenant_id = v_t AND c.gym_id = v_g AND c.entity = p_entity;
    PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.entity.completed', p_entity,
        jsonb_build_object('watermark', greatest(v_max, v_watermark)));
END
$$;
COMMENT ON FUNCTION ironwod.close_entity(bigint, text) IS 'Worker: mark an entity''s clean pull complete and advance its watermark';

-- Soft-delete what vanished from a fully re-pulled reconciliation window: records
-- whose latest version lies inside the window but were not seen by this run.
-- Only when the pull looks complete: if it saw fewer than
-- ironwod.reconcile_sanity_share of the records the window held before, nothing is
-- deleted and an event says why.
CREATE FUNCTION ironwod.reconcile_deletions(p_run_id bigint, e ironwod.entities)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_pred text;
    v_from timestamptz;
    v_vanished bigint[];
    v_seen_ids bigint[];
    v_before bigint;
    v_seen bigint;
    v_deleted bigint;
BEGIN
    SELECT greatest(ironwod.backfill_since(), coalesce(r.started_at, now()) - make_interval(days => c.sync_window_days))
    INTO STRICT v_from
    FROM ironwod.sync_runs r
    JOIN ironwod.integrations_wodify_connection c ON c.tenant_id = r.tenant_id AND c.gym_id = r.gym_id
    WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id = p_run_id;

    v_pred := CASE
        WHEN e.backfill_strategy = 'full' THEN 'true'
        WHEN e.due_field IS NOT NULL THEN
            format('(payload_json ->> %L) ~ ''^\d{4}-\d\d-\d\d'' AND (payload_json ->> %L)::date >= %L::date',
                   e.due_field, e.due_field, (v_from AT TIME ZONE 'UTC')::date)
        ELSE format('ironwod.parse_ts(payload_json ->> %L) >= %L::timestamptz', e.window_field, v_from)
    END;

    -- The records already vanished and those this run saw, read first (each one
    -- statement on the gym's shard), then joined as arrays with the latest
    -- versions: on Citus a correlated subquery over a distributed table next to
    -- a set-returning function is refused (0A000), and an outer join from a
    -- function to a distributed table is planned as a subquery (see
    -- plan_entity).  Hash joins, linear in the gym's records.
    SELECT coalesce(array_agg(v.wodify_id), '{}') INTO v_vanished
    FROM ironwod.vanished_records v
    WHERE v.tenant_id = v_t AND v.gym_id = v_g AND v.entity = e.entity;
    EXECUTE format('SELECT coalesce(array_agg(DISTINCT r.wodify_id), ''{}'') FROM ironwod.%I r
                    WHERE r.tenant_id = $1 AND r.gym_id = $2 AND r.last_seen_run_id = $3', e.raw_table)
    INTO v_seen_ids USING v_t, v_g, p_run_id;
    v_seen := cardinality(v_seen_ids);

    -- v_pred reads payload_json of the record's latest version.
    EXECUTE format($q$
        SELECT count(*)
        FROM ironwod.latest_raw_versions($1, $2, $3) l
        LEFT JOIN unnest($4::bigint[]) AS v(wodify_id) ON v.wodify_id = l.wodify_id
        WHERE v.wodify_id IS NULL AND %s$q$, v_pred)
    INTO v_before USING e.entity, v_t, v_g, v_vanished;

    IF v_seen < v_before * current_setting('ironwod.reconcile_sanity_share')::numeric THEN
        PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.reconcile.deletes_skipped', e.entity,
            jsonb_build_object('seen', v_seen, 'previously', v_before));
        RETURN;
    END IF;

    -- Vanished: inside the window, and no version of it seen by this run.
    EXECUTE format($q$
        INSERT INTO ironwod.vanished_records (tenant_id, gym_id, entity, wodify_id, vanished_by_run)
        SELECT $2, $3, $1, l.wodify_id, $5
        FROM ironwod.latest_raw_versions($1, $2, $3) l
        LEFT JOIN unnest($4::bigint[]) AS s(wodify_id) ON s.wodify_id = l.wodify_id
        WHERE s.wodify_id IS NULL AND %s
        ON CONFLICT DO NOTHING$q$, v_pred)
    USING e.entity, v_t, v_g, v_seen_ids, p_run_id;
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    UPDATE ironwod.sync_run_entities s SET deleted = v_deleted
     WHERE s.tenant_id = v_t AND s.gym_id = v_g
       AND s.run_id = p_run_id AND s.entity = e.entity;
END
$$;
COMMENT ON FUNCTION ironwod.reconcile_deletions(bigint, ironwod.entities) IS 'Worker: soft-delete records that vanished from a complete reconciliation window';

-- Wodify answered 403 on this entity's endpoint while the key works elsewhere:
-- the gym's plan does not include it.  Recorded, and the run goes on without it.
CREATE FUNCTION ironwod.mark_not_entitled(p_run_id bigint, p_entity text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    -- the scope as values: on Citus a statement comparing tenant_id with
    -- scope_tenant() (STABLE) runs on every shard
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
BEGIN
    INSERT INTO ironwod.entity_entitlements AS n (tenant_id, gym_id, entity, last_checked_run)
    VALUES (v_t, v_g, p_entity, p_run_id)
    ON CONFLICT (tenant_id, gym_id, entity) DO UPDATE SET last_checked_run = p_run_id;
    UPDATE ironwod.run_units u SET status = 'not_entitled'
     WHERE u.tenant_id = v_t AND u.gym_id = v_g AND u.run_id = p_run_id
       AND u.entity = p_entity AND u.status = 'pending';
    PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.entity.not_entitled', p_entity, '{}');
END
$$;
COMMENT ON FUNCTION ironwod.mark_not_entitled(bigint, text) IS 'Worker: record that the gym''s plan does not include an entity';

-- The HTTP attempts a worker counted (src/observe.c) arrive as one int8[]:
--   {2xx, 429, 4xx, 5xx, network, envelope, retries, bytes, token wait us, backoff us}
-- with every landed page (ironwod.page_statement), and otherwise here: when an
-- entity turns out not entitled, when a validation or the run ends.  They are
-- the entity's (its endpoint's); a run's are the sums of its entities'.
CREATE FUNCTION ironwod.add_attempts(p_run_id bigint, p_entity text, p_counters bigint[])
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
BEGIN
    IF cardinality(p_counters) IS DISTINCT FROM 10 THEN
        RAISE EXCEPTION 'attempt counters must have 10 elements, not %', cardinality(p_counters)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO ironwod.sync_run_entities AS s
        (tenant_id, gym_id, run_id, entity, attempts_2xx, attempts_429, attempts_4xx, attempts_5xx,
         attempts_network, attempts_envelope, retries, bytes_received, token_wait_s, backoff_s)
    VALUES (v_t, v_g, p_run_id, p_entity, p_counters[1], p_counters[2], p_counters[3], p_counters[4],
            p_counters[5], p_counters[6], p_counters[7], p_counters[8],
            p_counters[9] / 1e6, p_counters[10] / 1e6)
    ON CONFLICT (tenant_id, gym_id, run_id, entity) DO UPDATE
       SET attempts_2xx = s.attempts_2xx + excluded.attempts_2xx,
           attempts_429 = s.attempts_429 + excluded.attempts_429,
           attempts_4xx = s.attempts_4xx + excluded.attempts_4xx,
           attempts_5xx = s.attempts_5xx + excluded.attempts_5xx,
           attempts_network = s.attempts_network + excluded.attempts_network,
           attempts_envelope = s.attempts_envelope + excluded.attempts_envelope,
           retries = s.retries + excluded.retries,
           bytes_received = s.bytes_received + excluded.bytes_received,
           token_wait_s = s.token_wait_s + excluded.token_wait_s,
           backoff_s = s.backoff_s + excluded.backoff_s;
END
$$;
COMMENT ON FUNCTION ironwod.add_attempts(bigint, text, bigint[]) IS 'Worker: add HTTP attempt counters {2xx, 429, 4xx, 5xx, network, envelope, retries, bytes, token wait us, backoff us} to a run''s entity';

-- The run worker's peak private memory while it fetched and landed pages, and the
-- largest response body it landed (src/observe.c), written when the run ends.
CREATE FUNCTION ironwod.record_memory(p_run_id bigint, p_peak_bytes bigint, p_largest_page_bytes bigint)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    -- the scope as values: on Citus a statement comparing tenant_id with
    -- scope_tenant() (STABLE) runs on every shard
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
BEGIN
    UPDATE ironwod.sync_runs r
       SET peak_memory_bytes = greatest(r.peak_memory_bytes, p_peak_bytes),
           largest_page_bytes = greatest(r.largest_page_bytes, p_largest_page_bytes)
     WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id = p_run_id;
END
$$;
COMMENT ON FUNCTION ironwod.record_memory(bigint, bigint, bigint) IS 'Worker: record the run worker''s peak private memory while landing pages and the largest page it landed';

-- A run's attempt counters, summed from its entities, and its heartbeat and phase.
CREATE FUNCTION ironwod.count_requests(p_run_id bigint, p_now timestamptz, p_phase text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v record;
BEGIN
    SELECT coalesce(sum(s.attempts_2xx), 0) AS a2, coalesce(sum(s.attempts_429), 0) AS a429,
           coalesce(sum(s.attempts_4xx), 0) AS a4, coalesce(sum(s.attempts_5xx), 0) AS a5,
           coalesce(sum(s.attempts_network), 0) AS net, coalesce(sum(s.attempts_envelope), 0) AS env,
           coalesce(sum(s.retries), 0) AS retries, coalesce(sum(s.bytes_received), 0) AS bytes,
           coalesce(sum(s.token_wait_s), 0) AS token_wait, coalesce(sum(s.backoff_s), 0) AS backoff
    INTO v
    FROM ironwod.sync_run_entities s WHERE s.tenant_id = v_t AND s.gym_id = v_g AND s.run_id = p_run_id;
    UPDATE ironwod.sync_runs r
       SET attempts_2xx = v.a2, attempts_429 = v.a429, attempts_4xx = v.a4, attempts_5xx = v.a5,
           attempts_network = v.net, attempts_envelope = v.env, retries = v.retries,
           bytes_received = v.bytes, token_wait_s = v.token_wait, backoff_s = v.backoff,
           heartbeat_at = p_now, phase = coalesce(p_phase, r.phase)
     WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id = p_run_id;
END
$$;
COMMENT ON FUNCTION ironwod.count_requests(bigint, timestamptz, text) IS 'Worker: sum a run''s attempt counters (requests by outcome, retries, waits, bytes) from its entities; set its heartbeat and phase';

-- Records of a landed page that cannot be stored (src/page.c) go to quarantine,
-- in the page's transaction: one row per distinct raw element, keyed by its
-- hash, so the same poison fetched again by a later run refreshes last_seen
-- rather than piling up.  $3..$5 are parallel arrays: ids (NULL when
-- unreadable), reasons, raw bytes; p_at is the landing transaction's time.
-- Emits wodify.sync.records.quarantined with counts by reason (no record
-- content).  Returns the number of records quarantined.
CREATE FUNCTION ironwod.quarantine(p_run_id bigint, p_entity text, p_window_key text, p_ids bigint[],
                                   p_reasons text[], p_raw bytea[], p_at timestamptz)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_reasons jsonb;
BEGIN
    INSERT INTO ironwod.quarantined_records AS q
        (tenant_id, gym_id, entity, raw_hash, wodify_id, reason, raw, window_key,
         first_seen_run_id, last_seen_run_id, first_seen_at, last_seen_at)
    SELECT DISTINCT ON (sha256(r.raw))
           v_t, v_g, p_entity, sha256(r.raw), r.wodify_id, r.reason, r.raw, p_window_key,
           p_run_id, p_run_id, p_at, p_at
    FROM unnest(p_ids, p_reasons, p_raw) AS r(wodify_id, reason, raw)
    ORDER BY sha256(r.raw)
    ON CONFLICT (tenant_id, gym_id, entity, raw_hash) DO UPDATE
       SET last_seen_run_id = excluded.last_seen_run_id, last_seen_at = excluded.last_seen_at,
           window_key = excluded.window_key, times_seen = q.times_seen + 1;
    SELECT jsonb_object_agg(x.reason, x.n) INTO v_reasons
    FROM (SELECT r.reason, count(*) AS n FROM unnest(p_reasons) AS r(reason) GROUP BY r.reason) x;
    PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.records.quarantined', p_entity,
        jsonb_build_object('records', cardinality(p_reasons), 'reasons', v_reasons));
    RETURN cardinality(p_reasons);
END
$$;
COMMENT ON FUNCTION ironwod.quarantine(bigint, text, text, bigint[], text[], bytea[], timestamptz) IS 'Worker: put a landed page''s unstorable records (ids, reasons, raw bytes) into ironwod.quarantined_records, or refresh them when seen again';

-- Records that landed cleanly leave quarantine: the vendor fixed them.  The
-- worker runs this only for entities that have quarantined records.
CREATE FUNCTION ironwod.unquarantine(p_entity text, p_ids bigint[]) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    -- the scope as values: on Citus a statement comparing tenant_id with
    -- scope_tenant() (STABLE) runs on every shard
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
BEGIN
    DELETE FROM ironwod.quarantined_records q
     WHERE q.tenant_id = v_t AND q.gym_id = v_g
       AND q.entity = p_entity AND q.wodify_id = ANY (p_ids);
END
$$;
COMMENT ON FUNCTION ironwod.unquarantine(text, bigint[]) IS 'Worker: records that landed cleanly leave quarantined_records';

-- The bookkeeping of every landed batch of pages (ironwod.pages_per_commit
-- pages of one entity, committed together), one statement the worker prepares
-- once per run: the entity's counters (pages, attempts, records, new versions),
-- API latency histogram and newest watermark, provided the run is still running
-- (a disconnect stops it here: no row comes back).  Constant time.
-- $1 tenant, $2 gym, $3 run, $4 entity, $5 the attempt counters since the last
-- landed batch (ironwod.add_attempts), $6 records, $7 new versions,
-- $8 latency ms (0 when not measured), $9 the batch's newest watermark, $10 the
-- latency histogram of the batch's pages (ironwod.latency_buckets; all zeros when
-- not measured), added bucket by bucket: on Citus the DO UPDATE SET goes to the
-- shard as text, where a parameter it names has no value; $11 the batch's records
-- quarantined (counted in pulled, not in unchanged); $12 its pages.  The row's tenant, gym and
-- run come from the run's row, not from $1-$3: Citus then runs the INSERT ...
-- SELECT on the tenant's shard, where with constants it read the run's row to
-- the coordinator and wrote it back (13.7 ms a page, against 0.15 on one node).
CREATE FUNCTION ironwod.page_statement() RETURNS text
LANGUAGE sql IMMUTABLE
AS $s$
    SELECT $q$
        INSERT INTO ironwod.sync_run_entities AS s
            (tenant_id, gym_id, run_id, entity, pages, attempts_2xx, attempts_429, attempts_4xx,
             attempts_5xx, attempts_network, attempts_envelope, retries, bytes_received, token_wait_s,
             backoff_s, pulled, new_versions, unchanged, quarantined, latency_hist, latency_ms, max_watermark)
        SELECT r.tenant_id, r.gym_id, r.run_id, $4, $12, $5[1], $5[2], $5[3], $5[4], $5[5], $5[6], $5[7], $5[8],
               $5[9] / 1e6, $5[10] / 1e6, $6, $7, $6 - $7 - $11, $11, $10, $8, $9
        FROM ironwod.sync_runs r
        WHERE r.tenant_id = $1 AND r.gym_id = $2 AND r.run_id = $3 AND r.status = 'running'
        ON CONFLICT (tenant_id, gym_id, run_id, entity) DO UPDATE
           SET pages = s.pages + excluded.pages,
               attempts_2xx = s.attempts_2xx + excluded.attempts_2xx,
               attempts_429 = s.attempts_429 + excluded.attempts_429,
               attempts_4xx = s.attempts_4xx + excluded.attempts_4xx,
               attempts_5xx = s.attempts_5xx + excluded.attempts_5xx,
               attempts_network = s.attempts_network + excluded.attempts_network,
               attempts_envelope = s.attempts_envelope + excluded.attempts_envelope,
               retries = s.retries + excluded.retries,
               bytes_received = s.bytes_received + excluded.bytes_received,
               token_wait_s = s.token_wait_s + excluded.token_wait_s,
               backoff_s = s.backoff_s + excluded.backoff_s,
               pulled = s.pulled + excluded.pulled, new_versions = s.new_versions + excluded.new_versions,
               unchanged = s.unchanged + excluded.unchanged,
               quarantined = s.quarantined + excluded.quarantined,
               latency_hist = ARRAY[s.latency_hist[1] + excluded.latency_hist[1], s.latency_hist[2] + excluded.latency_hist[2],
                                    s.latency_hist[3] + excluded.latency_hist[3], s.latency_hist[4] + excluded.latency_hist[4],
                                    s.latency_hist[5] + excluded.latency_hist[5], s.latency_hist[6] + excluded.latency_hist[6],
                                    s.latency_hist[7] + excluded.latency_hist[7], s.latency_hist[8] + excluded.latency_hist[8]],
               latency_ms = s.latency_ms + excluded.latency_ms,
               max_watermark = greatest(s.max_watermark, excluded.max_watermark)
        RETURNING 1$q$
$s$;
COMMENT ON FUNCTION ironwod.page_statement() IS 'Worker: the prepared bookkeeping statement of every landed batch of pages (entity counters and attempts, quarantined records, latency histogram, watermark; checks the run still runs)';

-- The units of one entity whose last pages a batch landed (src/land.c), in one
-- call: each is marked done (and checkpointed, in a backfill), and the entity is
-- closed when the batch held its last unit.  p_window_keys and
-- p_pages are parallel arrays (a unit's key, its pages; a batch completes at most
-- ironwod.pages_per_commit units).  Units already done (a page landed twice)
-- change nothing.  The units are found by their key, with = ANY over the unique
-- index, and their status is read, not tested in a WHERE: there,
-- status = 'pending' made the partial run_units_pending index usable on its
-- (tenant, gym, run) prefix, and a generic plan chose it, reading every pending
-- unit of the run for each unit done (quadratic in units).  Constant time per
-- unit.
CREATE FUNCTION ironwod.units_landed(p_run_id bigint, p_entity text, p_window_keys text[], p_pages integer[])
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_now timestamptz := clock_timestamp();
    v_found integer;
    v_keys text[];
    v_pages integer[];
    v_starts timestamptz[];
    v_ends timestamptz[];
    v_entity_done boolean;
BEGIN
    SELECT count(*)::integer,
           coalesce(array_agg(u.window_key ORDER BY u.ordinal) FILTER (WHERE u.status = 'pending'), '{}'),
           coalesce(array_agg(p_pages[array_position(p_window_keys, u.window_key)] ORDER BY u.ordinal)
                    FILTER (WHERE u.status = 'pending'), '{}')
      INTO v_found, v_keys, v_pages
      FROM ironwod.run_units u
     WHERE u.tenant_id = v_t AND u.gym_id = v_g AND u.run_id = p_run_id AND u.entity = p_entity
       AND u.window_key = ANY (p_window_keys);
    IF v_found <> cardinality(p_window_keys) THEN
        RAISE EXCEPTION 'run % did not plan every unit of % in %', p_run_id, p_entity, p_window_keys
            USING ERRCODE = 'internal_error';
    END IF;
    IF cardinality(v_keys) = 0 THEN
        RETURN;
    END IF;
    -- No function in FROM: Citus routes an UPDATE of one shard's rows whatever its
    -- expressions, as long as none is volatile (array_position is immutable).
    UPDATE ironwod.run_units u
       SET status = 'done', pages = v_pages[array_position(v_keys, u.window_key)], done_at = v_now
     WHERE u.tenant_id = v_t AND u.gym_id = v_g AND u.run_id = p_run_id AND u.entity = p_entity
       AND u.window_key = ANY (v_keys);
    IF (SELECT r.mode FROM ironwod.sync_runs r
        WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id = p_run_id) = 'backfill' THEN
        -- A month's bounds from its key, computed here rather than in the INSERT
        -- (Citus evaluates a statement's expressions before it ships it,
        -- whatever branch a CASE would take: "full-01" is no timestamp); the arrays are unnested side by side in the select list, as
        -- the landing statements do.
        SELECT array_agg(CASE WHEN k.window_key ~ '^\d{4}-\d{2}$'
                              THEN (k.window_key || '-01')::timestamp AT TIME ZONE 'UTC' END ORDER BY k.ord),
               array_agg(CASE WHEN k.window_key ~ '^\d{4}-\d{2}$'
                              THEN ((k.window_key || '-01')::timestamp + interval '1 month') AT TIME ZONE 'UTC' END
                         ORDER BY k.ord)
          INTO v_starts, v_ends
          FROM unnest(v_keys) WITH ORDINALITY AS k(window_key, ord);
        INSERT INTO ironwod.backfill_checkpoints
            (tenant_id, gym_id, entity, window_key, window_start, window_end, pages, records, completed_by)
        SELECT v_t, v_g, p_entity, unnest(v_keys), unnest(v_starts), unnest(v_ends), unnest(v_pages), 0, p_run_id
        ON CONFLICT DO NOTHING;
    END IF;
    UPDATE ironwod.sync_run_entities s SET units_done = s.units_done + cardinality(v_keys)
     WHERE s.tenant_id = v_t AND s.gym_id = v_g AND s.run_id = p_run_id AND s.entity = p_entity
    RETURNING s.units_done + s.units_skipped >= s.units_total INTO v_entity_done;
    IF v_entity_done THEN
        PERFORM ironwod.close_entity(p_run_id, p_entity);
    END IF;
END
$$;
COMMENT ON FUNCTION ironwod.units_landed(bigint, text, text[], integer[]) IS 'Worker: the units of an entity whose last pages a batch landed: mark them done, checkpoint them in a backfill, close the entity after its last unit';

-- Records seen again are no longer vanished (the worker runs this only for
-- entities that have vanished records).
CREATE FUNCTION ironwod.unvanish(p_entity text, p_ids bigint[]) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    -- the scope as values: on Citus a statement comparing tenant_id with
    -- scope_tenant() (STABLE) runs on every shard
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
BEGIN
    DELETE FROM ironwod.vanished_records v
     WHERE v.tenant_id = v_t AND v.gym_id = v_g
       AND v.entity = p_entity AND v.wodify_id = ANY (p_ids);
END
$$;
COMMENT ON FUNCTION ironwod.unvanish(text, bigint[]) IS 'Worker: records seen again leave vanished_records';

-- The statements that land a page's records in an entity's raw table, one array
-- per column; the worker prepares both once per run.  $1 tenant, $2 gym
-- (parameters, so a distributed table routes to one shard), $3 run, $4 the
-- landing transaction's time, $5..$8 ids, payloads, payload hashes,
-- source_updated_at.
-- The arrays are unnested in the select list, side by side (they are equally
-- long): a set-returning function in FROM would first copy every payload into
-- a tuplestore.
-- On Citus these INSERT ... SELECTs run through the coordinator whatever they
-- select from, unlike the bookkeeping's: raw_id is an identity, whose values
-- Citus takes on the coordinator (one sequence, so a gym's raw_ids keep rising
-- wherever its shard lives, which the transform cursors rely on).  So Citus
-- sends the page's rows to the shard as an intermediate result and inserts
-- them from it there: two round trips, with the rows sent once, in binary.
--   p_upsert false: a plain INSERT, for pages of versions never seen before
--                   (a backfill); every row it returns is a new version, so
--                   the worker counts them as they come (no CTE, no count).
--                   RETURNING stays for Citus: an INSERT ... SELECT without it
--                   or ON CONFLICT is COPYed into the shard, which row-level
--                   security refuses.  A version already stored fails it with
--                   a unique violation, and the page is landed again with
--   p_upsert true:  INSERT ... ON CONFLICT, where a version seen again only
--                   bumps last_seen_run_id (twice the cost of the plain one);
--                   it returns the number of new versions.
CREATE FUNCTION ironwod.landing_statement(p_entity text, p_upsert boolean) RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_insert text := format($s$
            INSERT INTO ironwod.%I AS t
                (tenant_id, gym_id, wodify_id, payload_json, payload_hash, source_updated_at,
                 ingest_run_id, last_seen_run_id, ingested_at, last_seen_at)
            SELECT $1, $2, unnest($5::bigint[]), unnest($6::jsonb[]), unnest($7::bytea[]),
                   unnest($8::timestamptz[]), $3, $3, $4, $4$s$,
        (SELECT e.raw_table FROM ironwod.entities e WHERE e.entity = p_entity));
BEGIN
    IF NOT p_upsert THEN
        RETURN v_insert || ' RETURNING 1';
    END IF;
    RETURN format($s$
        WITH ins AS (%s
            ON CONFLICT (tenant_id, gym_id, wodify_id, payload_hash)
            DO UPDATE SET last_seen_run_id = excluded.last_seen_run_id, last_seen_at = excluded.last_seen_at
            RETURNING (xmax = 0) AS inserted)
        SELECT (count(*) FILTER (WHERE inserted))::integer FROM ins$s$, v_insert);
END
$$;
COMMENT ON FUNCTION ironwod.landing_statement(text, boolean) IS 'Worker: the prepared statements that land a page''s records in an entity''s raw table (plain insert, or upsert)';

-- Land one response page (src/land.c, src/page.c), in the caller's transaction.
-- The body is parsed once into per-record jsonb values; error envelopes (HTTP 200
-- with an HTTPCode), bodies without the records array and broken pagination (a
-- page that repeats the previous one, a page number other than the one asked
-- for, an empty page that claims more) land nothing.  Otherwise every record is
-- upserted as a payload version (payload hash: ironwod.payload_hash), records
-- that cannot be stored go to ironwod.quarantined_records (n_quarantined), and the
-- page's bookkeeping (ironwod.page_statement, and ironwod.units_landed on a
-- unit's last page) commits with it, all atomically: a crash between
-- pages loses nothing and re-lands nothing twice.  The worker calls the same C
-- code directly; this entry point lets tests land fixture pages.
CREATE FUNCTION ironwod.land_page(p_run_id bigint, p_entity text, p_window_key text,
                                  p_page integer, p_body text, p_attempts integer,
                                  p_prev_digest text DEFAULT NULL, p_latency_ms double precision DEFAULT NULL)
RETURNS TABLE (outcome text, http_code integer, message text, has_more boolean,
               n_records integer, n_new integer, digest text, n_quarantined integer)
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'ironwod_land_page';
COMMENT ON FUNCTION ironwod.land_page(bigint, text, text, integer, text, integer, text, double precision) IS 'Worker: classify, check and land one response page; checkpoint the unit and close the entity on its last page';

-- What landing makes of a page's records, without landing anything: one row per
-- element of the records array, with its id, payload, payload hash and
-- source_updated_at, or the reason it cannot be stored and its raw bytes.
CREATE FUNCTION ironwod.split_page(p_entity text, p_body text,
                                   OUT ordinal integer, OUT wodify_id bigint, OUT payload jsonb,
                                   OUT payload_hash bytea, OUT source_updated_at timestamptz,
                                   OUT fault text, OUT raw bytea)
RETURNS SETOF record
LANGUAGE c STRICT STABLE AS 'MODULE_PATHNAME', 'ironwod_split_page';
COMMENT ON FUNCTION ironwod.split_page(text, text) IS 'The records of a response page as landing sees them (id, payload, hash, or why it cannot be stored), without landing them';

-- SHA-256 of a jsonb binary (the binary form is canonical, so it is stable).
CREATE FUNCTION ironwod.payload_hash(p_payload jsonb) RETURNS bytea
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'ironwod_payload_hash';
COMMENT ON FUNCTION ironwod.payload_hash(jsonb) IS 'SHA-256 of a jsonb binary (the payload hash of an entity without volatile fields)';

-- The hash landing stores for a record of an entity, recomputed from a stored
-- payload: that of the payload without the entity's volatile fields (src/page.c
-- removes them with the same jsonb "-" operator).
--
-- On Citus a call over a tenant table's rows runs on the shard's node, inside
-- the task Citus sent there, and Citus refuses any query of a Citus table in
-- such a task ("cannot execute a distributed query from a query on a shard"),
-- a reference table's too.  The registry is a reference table, with a placement
-- on every node: this function's one read of it is Citus's local execution on
-- the node's own placement, in the task's transaction (a registry change made
-- earlier in the transaction is seen: Citus sends the task over the connection
-- that made it).  So the function allows nested execution for its own statement,
-- which reads no distributed table.  The list stays the registry's (an UPDATE
-- changes it; no other copy exists on the node), so it is read, not passed in.
-- Without Citus the setting is an unused placeholder.
CREATE FUNCTION ironwod.payload_hash(p_entity text, p_payload jsonb) RETURNS bytea
LANGUAGE sql STABLE STRICT PARALLEL SAFE
SET citus.allow_nested_distributed_execution = on
AS $$
    SELECT ironwod.payload_hash(p_payload - e.volatile_fields) FROM ironwod.entities e WHERE e.entity = p_entity
$$;
COMMENT ON FUNCTION ironwod.payload_hash(text, jsonb) IS 'Payload hash of a raw version of the entity: SHA-256 of its jsonb binary without the entity''s volatile fields';

-- A clean run: close entities that had nothing to fetch, clear the backfill
-- campaign's checkpoints after a backfill (the next one pulls everything
-- again), close the breaker, and record the completion.
CREATE FUNCTION ironwod.finish_run(p_run_id bigint)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_mode text;
    v_now timestamptz;
    v_cursor_end jsonb;
    v_last_cursor timestamptz;
    v_skipped text[];
    e record;
BEGIN
    -- Lock order: the gym's connection row, then its run.  The page's
    -- transaction (hold_connection, src/land.c) and ironwod_pause take them in
    -- this order, so a path that took the run first (its UPDATE) and then the
    -- connection could deadlock with them.  NO KEY UPDATE, as the UPDATEs of
    -- the connection take: a run queued meanwhile (its foreign key) is not held up.
    PERFORM 1 FROM ironwod.integrations_wodify_connection c
     WHERE c.tenant_id = v_t AND c.gym_id = v_g FOR NO KEY UPDATE;
    SELECT r.mode INTO v_mode FROM ironwod.sync_runs r
     WHERE r.run_id = p_run_id AND r.status = 'running' AND r.tenant_id = v_t AND r.gym_id = v_g;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % is no longer running', p_run_id USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF v_mode <> 'validate' THEN
        -- The entities left open, checked one by one: Citus plans no correlated
        -- subquery over the registry (a reference table).
        v_skipped := ironwod.skipped_entities(p_run_id);
        FOR e IN SELECT x.entity FROM ironwod.entities x
                 WHERE x.enabled AND x.entity <> ALL (v_skipped) ORDER BY x.ordinal LOOP
            CONTINUE WHEN EXISTS (SELECT 1 FROM ironwod.sync_run_entities s
                           WHERE s.tenant_id = v_t AND s.gym_id = v_g AND s.run_id = p_run_id
                             AND s.entity = e.entity AND s.status = 'completed');
            PERFORM ironwod.close_entity(p_run_id, e.entity);
        END LOOP;
        IF v_mode = 'backfill' THEN
            DELETE FROM ironwod.backfill_checkpoints b
             WHERE b.tenant_id = v_t AND b.gym_id = v_g;
        END IF;
    END IF;
    -- The finish time and the cursors computed first and passed as values: on
    -- Citus an UPDATE may carry no volatile function, no non-immutable one in a
    -- CASE, and no subquery over another distributed table.
    v_now := clock_timestamp();
    PERFORM ironwod.count_requests(p_run_id, v_now, NULL);
    SELECT jsonb_object_agg(c.entity, c.watermark), max(c.watermark) INTO v_cursor_end, v_last_cursor
    FROM ironwod.entity_cursors c WHERE c.tenant_id = v_t AND c.gym_id = v_g;
    UPDATE ironwod.sync_runs r
       SET status = 'succeeded', finished_at = v_now, phase = NULL, cursor_end = v_cursor_end
     WHERE r.tenant_id = v_t AND r.gym_id = v_g AND r.run_id = p_run_id;
    UPDATE ironwod.integrations_wodify_connection c
       SET status = CASE WHEN c.status IN ('pending', 'error') THEN 'connected' ELSE c.status END,
           last_success_at = v_now, consecutive_failures = 0,
           breaker_opened_at = NULL, next_retry_at = NULL,
           last_cursor_at = v_last_cursor,
           backfill_completed_at = CASE WHEN v_mode = 'backfill' THEN v_now ELSE c.backfill_completed_at END,
           updated_at = v_now
     WHERE c.tenant_id = v_t AND c.gym_id = v_g;
    -- the run, which held the old key, is over: a rotated key takes its place
    PERFORM ironwod.apply_rotated_key(v_now);
    PERFORM ironwod.log_run(v_t, v_g, p_run_id);
    -- Read first, then passed: on Citus a query on the shard (a routed SELECT
    -- with a subquery) may not call a function that writes distributed tables.
    SELECT coalesce(jsonb_object_agg(s.entity, jsonb_build_object('pulled', s.pulled, 'new', s.new_versions,
                                                                  'deleted', s.deleted,
                                                                  'quarantined', s.quarantined)), '{}')
    INTO v_cursor_end
    FROM ironwod.sync_run_entities s
    WHERE s.tenant_id = v_t AND s.gym_id = v_g AND s.run_id = p_run_id;
    PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.completed', NULL, v_cursor_end);
END
$$;
COMMENT ON FUNCTION ironwod.finish_run(bigint) IS 'Worker: mark a run succeeded, clear its checkpoints, close the breaker';

-- Verdict of a queued validate run (the path taken when ironwod_connect could not
-- get an answer in time).  A valid key connects and queues the initial backfill;
-- a rejected key leaves the connection in error with its ciphertext destroyed.
CREATE FUNCTION ironwod.finish_validate(p_run_id bigint, p_valid boolean, p_fingerprint text, p_message text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    -- now() as a value: Citus refuses a non-immutable function in an UPDATE's COALESCE
    v_now timestamptz := now();
    -- the scope as values: on Citus a statement comparing tenant_id with
    -- scope_tenant() (STABLE) runs on every shard
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
BEGIN
    IF p_valid THEN
        UPDATE ironwod.integrations_wodify_connection
           SET api_key_fingerprint = p_fingerprint, connected_at = coalesce(connected_at, v_now), updated_at = v_now
         WHERE tenant_id = v_t AND gym_id = v_g;
        PERFORM ironwod.finish_run(p_run_id);
        INSERT INTO ironwod.sync_runs (tenant_id, gym_id, mode)
        SELECT c.tenant_id, c.gym_id, 'backfill'
        FROM ironwod.integrations_wodify_connection c
        WHERE c.tenant_id = v_t AND c.gym_id = v_g AND c.backfill_completed_at IS NULL;
    ELSE
        PERFORM ironwod.fail_run(p_run_id, 'auth', p_message, 'validate');
        UPDATE ironwod.integrations_wodify_connection
           SET api_key_ciphertext = NULL, master_key_id = NULL, updated_at = v_now
         WHERE tenant_id = v_t AND gym_id = v_g;
    END IF;
END
$$;
COMMENT ON FUNCTION ironwod.finish_validate(bigint, boolean, text, text) IS 'Worker: record the verdict of a queued key validation';

-- A failed run: sanitized error (the C caller never passes key material), failed
-- phase, and the connection's circuit breaker.  An auth error opens it at once
-- (no automatic retry: the key must change), and so does a master key command
-- that hangs, fails or prints garbage (retried after 5 minutes, doubling);
-- ironwod.breaker_threshold consecutive failures open it with an exponential
-- next_retry_at.  A monthly-quota stop is no failure: the run is 'deferred' and
-- the connection waits for the next month.  A run no longer running (cancelled) is left as it is.  Watermarks are
-- untouched: only a clean pull of an entity moves its own.
CREATE FUNCTION ironwod.fail_run(p_run_id bigint, p_code text, p_message text, p_phase text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    -- The scope as values, so every statement routes to the tenant's shard on
    -- Citus (a FOR UPDATE must).
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    v_mode text;
    v_threshold int := current_setting('ironwod.breaker_threshold')::int;
    -- the master key command hangs, fails or prints garbage: every gym would
    -- fail the same way until an operator fixes it, so retrying on the next
    -- tick would only run it again and again
    v_keystore boolean := p_code IN ('key_command_timeout', 'key_command_failed', 'key_command_output');
    -- The failure time as a value: on Citus an UPDATE may carry no volatile
    -- function, and no non-immutable one inside a CASE or COALESCE.
    v_now timestamptz := clock_timestamp();
    v_failures integer;
    v_status text;
    v_opened timestamptz;
    v_retry timestamptz;
BEGIN
    -- Lock order: the gym's connection row, then its run.  The page's
    -- transaction (hold_connection, src/land.c) and ironwod_pause (and the watchdog's
    -- page in flight) take them in this order, so a path that took the run first (its UPDATE) and then the
    -- connection could deadlock with them.  NO KEY UPDATE, as the UPDATEs of
    -- the connection take: a run queued meanwhile (its foreign key) is not held up.
    PERFORM 1 FROM ironwod.integrations_wodify_connection c
     WHERE c.tenant_id = v_t AND c.gym_id = v_g FOR NO KEY UPDATE;
    PERFORM ironwod.count_requests(p_run_id, v_now, NULL);
    UPDATE ironwod.sync_runs r
       SET status = CASE WHEN p_code = 'quota' THEN 'deferred' ELSE 'failed' END,
           finished_at = v_now, error_code = p_code,
           last_error = left(p_message, 500), failed_phase = p_phase, phase = NULL
     WHERE r.tenant_id = v_t AND r.gym_id = v_g
       AND r.run_id = p_run_id AND r.status IN ('running', 'queued')
    RETURNING r.mode INTO v_mode;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- the run, which held the old key, is over: a rotated key takes its place
    PERFORM ironwod.apply_rotated_key(v_now);
    PERFORM ironwod.log_run(v_t, v_g, p_run_id);
    IF p_code = 'quota' THEN
        UPDATE ironwod.integrations_wodify_connection c
           SET next_retry_at = (date_trunc('month', v_now AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC',
               last_error_at = v_now, last_error = left(p_message, 500), last_error_code = p_code,
               updated_at = v_now
         WHERE c.tenant_id = v_t AND c.gym_id = v_g;
        PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.deferred', NULL,
            jsonb_build_object('code', p_code, 'message', left(p_message, 500)));
        RETURN;
    END IF;

    -- The breaker's next state computed from the row locked above, then
    -- written as values: on Citus a CASE in an UPDATE may hold no
    -- non-immutable expression, and timestamptz + interval is only stable.
    SELECT c.consecutive_failures + 1, c.status, c.breaker_opened_at, c.next_retry_at
    INTO v_failures, v_status, v_opened, v_retry
    FROM ironwod.integrations_wodify_connection c
    WHERE c.tenant_id = v_t AND c.gym_id = v_g;
    IF p_code = 'auth' OR v_keystore OR v_failures >= v_threshold THEN
        v_status := 'error';
        v_opened := coalesce(v_opened, v_now);
        v_retry := CASE WHEN p_code = 'auth' THEN NULL
                        WHEN v_keystore
                            THEN v_now + least(interval '24 hours', interval '5 minutes' * power(2, least(v_failures - 1, 10)))
                        ELSE v_now + least(interval '24 hours', interval '1 hour' * power(2, v_failures - v_threshold)) END;
    ELSE
        v_opened := NULL;
    END IF;
    UPDATE ironwod.integrations_wodify_connection c
       SET last_error_at = v_now, last_error = left(p_message, 500), last_error_code = p_code,
           consecutive_failures = v_failures, status = v_status,
           breaker_opened_at = v_opened, next_retry_at = v_retry, updated_at = v_now
     WHERE c.tenant_id = v_t AND c.gym_id = v_g;
    PERFORM ironwod.emit_event(p_run_id, 'wodify.sync.failed', NULL,
        jsonb_build_object('code', p_code, 'phase', p_phase, 'message', left(p_message, 500)));
END
$$;
COMMENT ON FUNCTION ironwod.fail_run(bigint, text, text, text) IS 'Worker or supervisor: record a failed (or quota-deferred) run with a sanitized error; drive the circuit breaker';
