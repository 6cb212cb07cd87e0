-- 55_rotation: rotating a gym's API key and the master keys, without downtime.
--
-- A gym's key: ironwod_rotate_key(tenant, gym, sealed) has a worker validate the
-- new key first; the old key stays until then, and is replaced at once when no
-- run is running.  A running run opened the old key when it started and keeps
-- it to its end, so the new key waits beside it (next_api_key_ciphertext) and
-- replaces it in the transaction that ends that run; from that commit on,
-- nothing can use the old key (a run claims its key under a share lock on the
-- connection row, so no claim slips between the check and the swap).
--
-- The master keys: make ironwod.master_key_command print the new private key
-- beside the old, register the new public key (ironwod.register_master_key, it
-- becomes the one new keys are sealed to), call ironwod_rewrap() (a worker, the
-- only kind of process that holds private keys, re-seals every connection's key
-- to it), then ironwod.retire_master_key(old), which refuses while any ciphertext
-- still uses the old key, and only then drop the old key from the command.  Every
-- ciphertext stays openable by a key the command prints at every step.

-- Swap a rotated key in once no run uses the old one; by the caller that ends
-- the run (finish_run, fail_run) and by claim_run before it hands out a key.
CREATE FUNCTION ironwod.apply_rotated_key(p_now timestamptz)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
    -- the scope as values: on Citus a statement comparing tenant_id with
    -- scope_tenant() (STABLE) runs on every shard
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
BEGIN
    UPDATE ironwod.integrations_wodify_connection c
       SET api_key_ciphertext = c.next_api_key_ciphertext, master_key_id = c.next_master_key_id,
           api_key_fingerprint = c.next_api_key_fingerprint,
           next_api_key_ciphertext = NULL, next_master_key_id = NULL, next_api_key_fingerprint = NULL,
           key_rotated_at = p_now, updated_at = p_now
     WHERE c.tenant_id = v_t AND c.gym_id = v_g
       AND c.next_api_key_ciphertext IS NOT NULL AND c.status <> 'disconnected';
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO ironwod.sync_events (tenant_id, gym_id, event)
    VALUES (v_t, v_g, 'wodify.key.rotated');
    RETURN true;
END
$$;
COMMENT ON FUNCTION ironwod.apply_rotated_key(timestamptz) IS 'Worker or supervisor: replace the scope''s API key by its validated successor, once no run holds the old one';

CREATE FUNCTION @extschema@.ironwod_rotate_key(p_tenant_id uuid, p_gym_id uuid, p_sealed_key bytea)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_key_id text;
    v record;
    v_status text;
    v_now timestamptz := now();
BEGIN
    PERFORM ironwod.assert_connection(p_tenant_id, p_gym_id);
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
    SELECT c.status INTO v_status FROM ironwod.integrations_wodify_connection c
    WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id;
    IF v_status = 'disconnected' THEN
        RAISE EXCEPTION 'gym % is disconnected', p_gym_id
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Connect it again with ironwod_connect.';
    END IF;

    -- Before any lock: the validation takes up to ironwod.validate_timeout_ms,
    -- and a run starting meanwhile must not wait for it.
    SELECT * INTO v FROM ironwod.validate_sealed_key(p_tenant_id, p_gym_id, p_sealed_key);
    IF v.verdict = 'rejected' THEN
        RAISE EXCEPTION 'Wodify rejected the new API key'
            USING ERRCODE = 'invalid_authorization_specification',
                  DETAIL = format('GET /customers/locations answered: %s', v.message),
                  HINT = 'The gym keeps its current key.';
    END IF;
    IF v.verdict = 'unopenable' THEN
        RAISE EXCEPTION 'sealed API key does not open for tenant % gym %', p_tenant_id, p_gym_id
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A sealed key is bound to the tenant, gym and master key it was sealed for.';
    END IF;
    IF v.verdict = 'keystore' THEN
        RAISE EXCEPTION 'run workers cannot open API keys: %', v.message
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Check ironwod.master_key_command; see the README. The gym keeps its current key.';
    END IF;
    IF v.verdict <> 'valid' THEN
        RAISE EXCEPTION 'could not validate the new API key: %', v.message
            USING ERRCODE = 'connection_failure',
                  HINT = 'The gym keeps its current key; try again later.';
    END IF;

    -- From here the row is locked: a claim waits, then reads what we commit.
    PERFORM 1 FROM ironwod.integrations_wodify_connection c
    WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id FOR UPDATE;
    UPDATE ironwod.integrations_wodify_connection c
       SET next_api_key_ciphertext = p_sealed_key, next_master_key_id = v_key_id,
           next_api_key_fingerprint = v.fingerprint, updated_at = v_now
     WHERE c.tenant_id = p_tenant_id AND c.gym_id = p_gym_id;
    IF EXISTS (SELECT 1 FROM ironwod.sync_runs r
               WHERE r.tenant_id = p_tenant_id AND r.gym_id = p_gym_id AND r.status = 'running') THEN
        RETURN 'pending';
    END IF;
    PERFORM ironwod.apply_rotated_key(v_now);
    RETURN 'rotated';
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_rotate_key(uuid, uuid, bytea) IS 'Replace a gym''s API key by a new sealed one once a worker validated it: at once (rotated), or when the running run, which keeps the old key, ends (pending)';

-- Connections whose key, or rotated key waiting for its run, is sealed to a
-- master key other than the active one: what ironwod_rewrap() has to do.  For
-- the rewrap worker, which may read only its scope: ids only.
CREATE FUNCTION ironwod.rewrap_targets()
RETURNS TABLE (tenant_id uuid, gym_id uuid)
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c.tenant_id, c.gym_id
    FROM ironwod.integrations_wodify_connection c
    LEFT JOIN ironwod.master_keys k ON k.is_active
    WHERE (c.api_key_ciphertext IS NOT NULL AND c.master_key_id IS DISTINCT FROM k.key_id)
       OR (c.next_api_key_ciphertext IS NOT NULL AND c.next_master_key_id IS DISTINCT FROM k.key_id)
    ORDER BY c.tenant_id, c.gym_id
$$;
COMMENT ON FUNCTION ironwod.rewrap_targets() IS 'Rewrap worker: (tenant, gym) of every connection with a key sealed to a master key other than the active one';

-- The rewrap worker's write, in the scope of the connection it re-sealed (NULL:
-- that key needed nothing).
CREATE FUNCTION ironwod.store_rewrapped_key(p_current bytea, p_next bytea, p_key_id text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    -- the scope as values, in plpgsql: on Citus a statement comparing tenant_id
    -- with scope_tenant() (STABLE) runs on every shard
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
BEGIN
    UPDATE ironwod.integrations_wodify_connection c
       SET api_key_ciphertext = coalesce(p_current, c.api_key_ciphertext),
           master_key_id = CASE WHEN p_current IS NULL THEN c.master_key_id ELSE p_key_id END,
           next_api_key_ciphertext = coalesce(p_next, c.next_api_key_ciphertext),
           next_master_key_id = CASE WHEN p_next IS NULL THEN c.next_master_key_id ELSE p_key_id END
     WHERE c.tenant_id = v_t AND c.gym_id = v_g;
END
$$;
COMMENT ON FUNCTION ironwod.store_rewrapped_key(bytea, bytea, text) IS 'Rewrap worker: store the scope''s API key (and waiting rotated key) re-sealed to master key p_key_id';

CREATE FUNCTION @extschema@.ironwod_rewrap(OUT resealed integer, OUT remaining integer)
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_before integer;
BEGIN
    PERFORM ironwod.preloaded();
    IF NOT EXISTS (SELECT 1 FROM ironwod.master_keys k WHERE k.is_active) THEN
        RAISE EXCEPTION 'no master key is registered'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Register one with ironwod.register_master_key(key_id, public_key).';
    END IF;
    SELECT count(*) INTO v_before FROM ironwod.rewrap_targets();
    IF v_before > 0 THEN
        PERFORM ironwod.run_rewrap_worker();
    END IF;
    SELECT count(*) INTO remaining FROM ironwod.rewrap_targets();
    resealed := v_before - remaining;
    IF remaining > 0 THEN
        RAISE WARNING '% API keys are still sealed to an older master key', remaining
            USING HINT = 'The rewrap worker logged why; ironwod.master_key_command must print every key in use. Call ironwod_rewrap() again.';
    END IF;
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_rewrap() IS 'Admin: have a worker re-seal every connection''s API key to the active master key; returns how many were re-sealed and how many remain';

CREATE FUNCTION ironwod.retire_master_key(p_key_id text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_active boolean;
    v_uses bigint;
BEGIN
    -- FOR UPDATE waits for every connect or rotation sealing to it right now
    SELECT k.is_active INTO v_active FROM ironwod.master_keys k WHERE k.key_id = p_key_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'master key "%" is not registered', p_key_id USING ERRCODE = 'undefined_object';
    END IF;
    IF v_active THEN
        RAISE EXCEPTION 'master key "%" is the active one', p_key_id
            USING ERRCODE = 'object_in_use',
                  HINT = 'Register its successor with ironwod.register_master_key() and call ironwod_rewrap() first.';
    END IF;
    SELECT count(*) FILTER (WHERE c.api_key_ciphertext IS NOT NULL
                                  AND (c.master_key_id = p_key_id
                                       OR ironwod.sealed_key_id(c.api_key_ciphertext) = p_key_id))
         + count(*) FILTER (WHERE c.next_api_key_ciphertext IS NOT NULL
                                  AND (c.next_master_key_id = p_key_id
                                       OR ironwod.sealed_key_id(c.next_api_key_ciphertext) = p_key_id))
      INTO v_uses
      FROM ironwod.integrations_wodify_connection c;
    IF v_uses > 0 THEN
        RAISE EXCEPTION 'master key "%" still seals % API key(s)', p_key_id, v_uses
            USING ERRCODE = 'object_in_use',
                  HINT = 'Call ironwod_rewrap() to re-seal them to the active master key, then retire it.';
    END IF;
    DELETE FROM ironwod.master_keys k WHERE k.key_id = p_key_id;
END
$$;
COMMENT ON FUNCTION ironwod.retire_master_key(text) IS 'Admin: forget a master key, refused while it is the active one or any ciphertext still uses it';
