-- 30_tenancy: the scope a session acts in, and row-level security on every table.
-- The host app calls ironwod_set_scope(tenant, gym) in each transaction; RLS then
-- admits only rows of that scope, for the app and for the run workers alike.

-- SET LOCAL rather than set_config(): Citus propagates SET LOCAL to its worker
-- nodes, where the shards' RLS policies read the scope, when
-- citus.propagate_set_commands is 'local' -- set here for this transaction only, so
-- host apps need no configuration for it.  This function must not carry a SET
-- clause of its own: PostgreSQL would undo the SET LOCAL when the function returns.
CREATE FUNCTION @extschema@.ironwod_set_scope(p_tenant_id uuid, p_gym_id uuid)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF p_tenant_id IS NULL OR p_gym_id IS NULL THEN
        RAISE EXCEPTION 'tenant and gym must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF current_setting('citus.propagate_set_commands', true) IS NOT NULL THEN
        SET LOCAL citus.propagate_set_commands = 'local';
    END IF;
    EXECUTE format('SET LOCAL ironwod.tenant_id = %L', p_tenant_id);
    EXECUTE format('SET LOCAL ironwod.gym_id = %L', p_gym_id);
END
$$;
COMMENT ON FUNCTION @extschema@.ironwod_set_scope(uuid, uuid) IS 'Scope the current transaction to one (tenant, gym); every ironwod read and write is limited to it';

-- After a scoped transaction ends the GUC reads as '' rather than NULL; both mean
-- "no scope", which sees nothing.  In C (src/ironwod.c): each policy's WITH CHECK
-- calls both for every row a statement writes, and as
-- NULLIF(current_setting(guc, true), '')::uuid each call looked the setting up
-- and parsed it again; the C readers return the uuid parsed once, when the
-- setting was made.
CREATE FUNCTION ironwod.scope_tenant() RETURNS uuid
LANGUAGE c STABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'ironwod_scope_tenant_uuid';
COMMENT ON FUNCTION ironwod.scope_tenant() IS 'Tenant of the current scope, NULL when none is set';

CREATE FUNCTION ironwod.scope_gym() RETURNS uuid
LANGUAGE c STABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'ironwod_scope_gym_uuid';
COMMENT ON FUNCTION ironwod.scope_gym() IS 'Gym of the current scope, NULL when none is set';

-- A function's planner settings on the Citus nodes too.  A function's SET
-- clauses apply to the session that runs it, here the coordinator's, but Citus
-- plans each statement it sends a node again there, with the node's settings,
-- which a SET clause never reaches: only a SET LOCAL statement does, which Citus
-- forwards to the nodes of the transaction while citus.propagate_set_commands is
-- 'local' (ironwod_set_scope and the run workers set it).  So a function whose
-- SET clauses fix a plan calls this with its own signature: with true first, to
-- SET LOCAL each setting of its SET clauses to the clause's value, and with
-- false last, after its last statement, to set them back to the defaults, on the
-- nodes for the rest of the transaction (here the function's SET clauses then
-- restore the caller's values when it returns).  The settings are the
-- planner's, single values.  Where nothing is forwarded (no Citus, or
-- propagation off) it does nothing, so one node runs exactly as without it.
CREATE FUNCTION ironwod.forward_set_clauses(p_fn regprocedure, p_on boolean)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    c text;
BEGIN
    IF current_setting('citus.propagate_set_commands', true) IS DISTINCT FROM 'local' THEN
        RETURN;
    END IF;
    FOR c IN SELECT x FROM pg_catalog.pg_proc p, unnest(p.proconfig) AS x WHERE p.oid = p_fn LOOP
        -- one statement per setting: Citus forwards each statement's whole text
        EXECUTE format('SET LOCAL %I = %s', split_part(c, '=', 1),
                       CASE WHEN p_on THEN quote_literal(substr(c, strpos(c, '=') + 1)) ELSE 'DEFAULT' END);
    END LOOP;
END
$$;
COMMENT ON FUNCTION ironwod.forward_set_clauses(regprocedure, boolean) IS 'Citus: SET LOCAL the settings of the given function''s SET clauses (true) or back to their defaults (false), so that the nodes that plan its statements use them too; nothing without Citus';
GRANT EXECUTE ON FUNCTION ironwod.forward_set_clauses(regprocedure, boolean) TO ironwod_worker;

-- The scope of the current transaction, or 42501 when none is set: the one copy
-- of that refusal, for the functions that act on the scope (assert_scope, the
-- transforms, the metrics refresh), once per call.  Not for row-level security
-- or any per-row path: the policies call the C readers above, and a plpgsql call
-- per row would cost more than the row.
CREATE FUNCTION ironwod.require_scope(OUT tenant_id uuid, OUT gym_id uuid)
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    tenant_id := ironwod.scope_tenant();
    gym_id := ironwod.scope_gym();
    IF tenant_id IS NULL OR gym_id IS NULL THEN
        RAISE EXCEPTION 'no ironwod scope is set in this transaction'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Call ironwod_set_scope(tenant, gym) in the same transaction first.';
    END IF;
END
$$;
COMMENT ON FUNCTION ironwod.require_scope() IS 'The (tenant, gym) of the current transaction''s scope; raises 42501 when none is set';

-- Every function that takes (tenant, gym) calls this first: SECURITY DEFINER API
-- functions bypass RLS, so the scope check is theirs to make.
CREATE FUNCTION ironwod.assert_scope(p_tenant_id uuid, p_gym_id uuid)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_t uuid;
    v_g uuid;
BEGIN
    PERFORM ironwod.preloaded();
    IF p_tenant_id IS NULL OR p_gym_id IS NULL THEN
        RAISE EXCEPTION 'tenant and gym must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT * INTO v_t, v_g FROM ironwod.require_scope();
    IF (p_tenant_id, p_gym_id) IS DISTINCT FROM (v_t, v_g) THEN
        RAISE EXCEPTION 'tenant % gym % is outside the current ironwod scope', p_tenant_id, p_gym_id
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'A session can only act on the (tenant, gym) set by ironwod_set_scope().';
    END IF;
END
$$;
COMMENT ON FUNCTION ironwod.assert_scope(uuid, uuid) IS 'Raise 42501 unless (tenant, gym) is the scope of the current transaction';

-- RLS on every table, FORCED so the table owner is bound too.  The app and the
-- workers see their scope; admins read every tenant.  Superusers bypass RLS, which
-- is why the supervisor (superuser, never touches tenant data) can serve the queue.
DO $rls$
DECLARE
    t regclass;
BEGIN
    FOR t IN
        SELECT c.oid::regclass
        FROM pg_class c
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id'
        WHERE c.relnamespace = 'ironwod'::regnamespace AND c.relkind = 'r'
    LOOP
        EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', t);
        EXECUTE format($p$CREATE POLICY tenant_scope ON %s TO ironwod_app, ironwod_worker
                          USING (tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym())
                          WITH CHECK (tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym())$p$, t);
        EXECUTE format('CREATE POLICY admin_read ON %s FOR SELECT TO ironwod_admin USING (true)', t);
    END LOOP;
END
$rls$;

-- The two global configuration tables: readable by the ironwod roles, written only
-- by the extension owner and admins.
ALTER TABLE ironwod.master_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE ironwod.master_keys FORCE ROW LEVEL SECURITY;
CREATE POLICY read_keys ON ironwod.master_keys FOR SELECT TO ironwod_app, ironwod_worker, ironwod_admin USING (true);
CREATE POLICY admin_keys ON ironwod.master_keys TO ironwod_admin USING (true) WITH CHECK (true);
ALTER TABLE ironwod.entities ENABLE ROW LEVEL SECURITY;
ALTER TABLE ironwod.entities FORCE ROW LEVEL SECURITY;
CREATE POLICY read_entities ON ironwod.entities FOR SELECT TO ironwod_app, ironwod_worker, ironwod_admin USING (true);
CREATE POLICY admin_entities ON ironwod.entities FOR UPDATE TO ironwod_admin USING (true) WITH CHECK (true);
