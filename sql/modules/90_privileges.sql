-- 90_privileges: every grant in one place.  Nothing is granted to PUBLIC; the app
-- never gets the ciphertext column; only the worker role may read it.

REVOKE ALL ON ALL TABLES IN SCHEMA ironwod FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA ironwod FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA ironwod FROM PUBLIC;
REVOKE ALL ON SCHEMA ironwod FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_set_scope(uuid, uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_public_key() FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_connect(uuid, uuid, bytea) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_connect(uuid, uuid, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_sync(uuid, uuid, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_wait(bigint, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_status(uuid, uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_disconnect(uuid, uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_tick() FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_schedule(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_pause(uuid, uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_resume(uuid, uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_rotate_key(uuid, uuid, bytea) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.ironwod_rewrap() FROM PUBLIC;

GRANT USAGE ON SCHEMA ironwod TO ironwod_app, ironwod_admin, ironwod_worker;

-- The host app: the API, and reads of its own scope.
GRANT EXECUTE ON FUNCTION @extschema@.ironwod_set_scope(uuid, uuid), @extschema@.ironwod_public_key(),
    @extschema@.ironwod_connect(uuid, uuid, bytea), @extschema@.ironwod_connect(uuid, uuid, text),
    @extschema@.ironwod_sync(uuid, uuid, text), @extschema@.ironwod_wait(bigint, interval),
    @extschema@.ironwod_status(uuid, uuid), @extschema@.ironwod_disconnect(uuid, uuid),
    @extschema@.ironwod_pause(uuid, uuid), @extschema@.ironwod_resume(uuid, uuid),
    @extschema@.ironwod_rotate_key(uuid, uuid, bytea)
    TO ironwod_app, ironwod_admin;
GRANT EXECUTE ON FUNCTION ironwod.scope_tenant(), ironwod.scope_gym(), ironwod.require_scope(), ironwod.preloaded(),
    ironwod.latest_raw_versions(text), ironwod.latest_raw_versions(text, uuid, uuid, bigint[], boolean),
    ironwod.latency_buckets()
    TO ironwod_app, ironwod_admin, ironwod_worker;
GRANT SELECT (tenant_id, gym_id, status, master_key_id, api_key_fingerprint, connected_at,
              last_success_at, last_error_at, last_error, last_error_code, last_cursor_at,
              sync_window_days, consecutive_failures, breaker_opened_at, next_retry_at,
              nightly_local_time, reconcile_weekday, time_zone, backfill_completed_at,
              paused_at, paused_by, created_at, updated_at,
              next_master_key_id, next_api_key_fingerprint, key_rotated_at)
    ON ironwod.integrations_wodify_connection TO ironwod_app, ironwod_admin;
GRANT SELECT ON ironwod.sync_runs, ironwod.sync_run_entities, ironwod.run_units, ironwod.backfill_checkpoints,
    ironwod.entity_cursors, ironwod.sync_events, ironwod.entities, ironwod.master_keys,
    ironwod.entity_entitlements, ironwod.vanished_records, ironwod.quarantined_records,
    ironwod.wodify_raw_locations, ironwod.wodify_raw_programs, ironwod.wodify_raw_clients,
    ironwod.wodify_raw_memberships, ironwod.wodify_raw_membership_holds,
    ironwod.wodify_raw_class_signins, ironwod.wodify_raw_invoices, ironwod.wodify_raw_transactions,
    ironwod.connection_health, ironwod.runs, ironwod.run_latency
    TO ironwod_app, ironwod_admin;

-- Operators: the registry and the master keys.
GRANT UPDATE ON ironwod.entities TO ironwod_admin;
GRANT EXECUTE ON FUNCTION ironwod.register_master_key(text, bytea), ironwod.retire_master_key(text),
    @extschema@.ironwod_rewrap(), ironwod.worker_status(),
    ironwod.rate_limits(), @extschema@.ironwod_tick(), @extschema@.ironwod_schedule(text) TO ironwod_admin;

-- The run workers: their scope's rows, the ciphertext, and the landing functions.
GRANT SELECT, UPDATE ON ironwod.integrations_wodify_connection TO ironwod_worker;
GRANT SELECT, INSERT, UPDATE ON ironwod.sync_runs, ironwod.sync_run_entities, ironwod.entity_cursors
    TO ironwod_worker;
GRANT SELECT, INSERT, DELETE ON ironwod.backfill_checkpoints TO ironwod_worker;
GRANT SELECT, INSERT, UPDATE ON ironwod.run_units TO ironwod_worker;
GRANT SELECT, INSERT ON ironwod.sync_events TO ironwod_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON ironwod.entity_entitlements TO ironwod_worker;
GRANT SELECT, INSERT, DELETE ON ironwod.vanished_records TO ironwod_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON ironwod.quarantined_records TO ironwod_worker;
GRANT SELECT ON ironwod.entities, ironwod.master_keys TO ironwod_worker;
GRANT SELECT, INSERT, UPDATE ON ironwod.wodify_raw_locations, ironwod.wodify_raw_programs,
    ironwod.wodify_raw_clients, ironwod.wodify_raw_memberships, ironwod.wodify_raw_membership_holds,
    ironwod.wodify_raw_class_signins, ironwod.wodify_raw_invoices, ironwod.wodify_raw_transactions
    TO ironwod_worker;
GRANT USAGE ON SEQUENCE ironwod.sync_run_id_seq TO ironwod_worker;
GRANT EXECUTE ON FUNCTION ironwod.parse_ts(text), ironwod.urlencode(text), ironwod.backfill_since(),
    ironwod.iso_utc(timestamptz), ironwod.emit_event(bigint, text, text, jsonb),
    ironwod.claim_run(bigint, integer), ironwod.next_task(bigint),
    ironwod.plan_entity(bigint, text), ironwod.skipped_entities(bigint),
    ironwod.page_statement(), ironwod.units_landed(bigint, text, text[], integer[]),
    ironwod.unvanish(text, bigint[]),
    ironwod.quarantine(bigint, text, text, bigint[], text[], bytea[], timestamptz),
    ironwod.record_memory(bigint, bigint, bigint),
    ironwod.unquarantine(text, bigint[]),
    ironwod.close_entity(bigint, text), ironwod.reconcile_deletions(bigint, ironwod.entities),
    ironwod.mark_not_entitled(bigint, text),
    ironwod.land_page(bigint, text, text, integer, text, integer, text, double precision),
    ironwod.landing_statement(text, boolean), ironwod.payload_hash(jsonb), ironwod.payload_hash(text, jsonb),
    ironwod.split_page(text, text),
    ironwod.is_time_zone(text), ironwod.count_requests(bigint, timestamptz, text), ironwod.add_attempts(bigint, text, bigint[]),
    ironwod.latency_buckets(), ironwod.finish_run(bigint),
    ironwod.finish_validate(bigint, boolean, text, text), ironwod.fail_run(bigint, text, text, text),
    ironwod.apply_rotated_key(timestamptz), ironwod.rewrap_targets(),
    ironwod.store_rewrapped_key(bytea, bytea, text)
    TO ironwod_worker;
