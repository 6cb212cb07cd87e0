-- 60_admin: views for admin tooling.  security_invoker, so RLS decides what each
-- caller sees: an app session its own gym, ironwod_admin every tenant.

CREATE VIEW ironwod.connection_health WITH (security_invoker = true) AS
SELECT c.tenant_id, c.gym_id, c.status, c.api_key_fingerprint, c.last_success_at,
       c.last_error_at, c.last_error_code, c.last_error, c.consecutive_failures, c.next_retry_at,
       (c.status IN ('connected', 'error')
        AND coalesce(c.last_success_at, c.connected_at) < now() - interval '24 hours') AS no_success_24h
FROM ironwod.integrations_wodify_connection c;
COMMENT ON VIEW ironwod.connection_health IS 'Per-connection health; no_success_24h is the "no successful sync in 24 h" alert';

CREATE VIEW ironwod.runs WITH (security_invoker = true) AS
SELECT r.tenant_id, r.gym_id, r.run_id, r.mode, r.status, r.requested_at, r.started_at, r.finished_at,
       r.finished_at - r.started_at AS duration, r.requests, r.retries, r.attempts_2xx, r.attempts_429,
       r.attempts_4xx, r.attempts_5xx, r.attempts_network, r.attempts_envelope, r.token_wait_s, r.backoff_s,
       r.bytes_received, r.error_code, r.last_error, r.failed_phase,
       (SELECT jsonb_object_agg(s.entity, jsonb_build_object('pulled', s.pulled, 'new', s.new_versions,
                                                             'unchanged', s.unchanged, 'transformed', s.transformed,
                                                             'deleted', s.deleted, 'quarantined', s.quarantined))
        FROM ironwod.sync_run_entities s
        WHERE s.tenant_id = r.tenant_id AND s.gym_id = r.gym_id AND s.run_id = r.run_id) AS entities
FROM ironwod.sync_runs r;
COMMENT ON VIEW ironwod.runs IS 'Sync runs with duration, attempts by outcome, waits, bytes and per-entity counts';

-- API latency per run and endpoint (entity): the histogram of design.md §6.
CREATE VIEW ironwod.run_latency WITH (security_invoker = true) AS
SELECT s.tenant_id, s.gym_id, s.run_id, s.entity, e.path AS endpoint, s.pages,
       round((s.latency_ms / nullif(s.pages, 0))::numeric, 1) AS mean_ms,
       (SELECT jsonb_object_agg(CASE WHEN b <= 7 THEN '<' || (ironwod.latency_buckets())[b] ELSE '>=5000' END,
                                s.latency_hist[b] ORDER BY b)
        FROM generate_series(1, 8) b) AS histogram_ms
FROM ironwod.sync_run_entities s
JOIN ironwod.entities e ON e.entity = s.entity;
COMMENT ON VIEW ironwod.run_latency IS 'API latency per run and endpoint: mean and histogram of the successful page requests';
