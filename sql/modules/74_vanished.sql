-- 74_vanished: carry reconciliation soft deletes (ironwod.vanished_records) into the
-- canonical tables, and take them back when a record is seen again.  Driven by the
-- same mapping as the transforms (canonical_maps); every change marks the months it
-- touches dirty, so refresh_metrics recomputes them.

-- The soft-deleted rows of a gym, which every run looks at (they may be back), by
-- index: few of a gym's rows are, and without it each run read all of them.
DO $idx$
DECLARE
    t name;
BEGIN
    FOR t IN SELECT canonical FROM ironwod.canonical_maps ORDER BY canonical LOOP
        EXECUTE format('CREATE INDEX %I ON ironwod.%I (tenant_id, gym_id) WHERE deleted_by_run IS NOT NULL',
                       t || '_soft_deleted', t);
    END LOOP;
END
$idx$;

-- No sequential scans (as in transform_records): every statement names the gym and
-- reads by an index led by tenant and gym, whatever the estimates of a gym the
-- statistics do not know yet; on Citus on the nodes too (forward_set_clauses).
CREATE FUNCTION ironwod.apply_vanished(p_run_id bigint)
RETURNS jsonb
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    v_t uuid := ironwod.scope_tenant();
    v_g uuid := ironwod.scope_gym();
    m record;
    v_tz text := ironwod.gym_time_zone(v_t, v_g);
    v_changed integer;
    v_dirty date;
    v_people bigint[];
    v_cand bigint[];
    v_seen_ids bigint[];
    v_seen_runs bigint[];
    v_out jsonb := '{}';
BEGIN
    -- the SET clause on the Citus nodes too, which plan every statement below
    PERFORM ironwod.forward_set_clauses('ironwod.apply_vanished(bigint)', true);
    FOR m IN SELECT x.* FROM ironwod.canonical_maps x JOIN ironwod.entities e USING (entity) ORDER BY e.ordinal LOOP
        -- Soft-deleted rows that may be back: their latest version, when not deleted by Wodify itself.
        EXECUTE format('SELECT array_agg(c.%2$I) FROM ironwod.%1$I c
                        WHERE c.tenant_id = $1 AND c.gym_id = $2 AND c.deleted_by_run IS NOT NULL',
                       m.canonical, m.key_column)
        INTO v_cand USING v_t, v_g;
        -- Nothing vanished and nothing to restore (every backfill, most runs):
        -- nothing to write, and no statement to plan and run.
        IF v_cand IS NULL AND NOT EXISTS (SELECT 1 FROM ironwod.vanished_records v
                                          WHERE v.tenant_id = v_t AND v.gym_id = v_g AND v.entity = m.entity) THEN
            CONTINUE;
        END IF;
        v_seen_ids := NULL;
        v_seen_runs := NULL;
        IF v_cand IS NOT NULL THEN
            SELECT array_agg(l.wodify_id), array_agg(l.last_seen_run_id) INTO v_seen_ids, v_seen_runs
            FROM ironwod.latest_raw_versions(m.entity, v_t, v_g, v_cand) l
            WHERE coalesce((l.payload_json ->> 'is_deleted')::boolean, false) = false;
        END IF;
        EXECUTE format($q$
            WITH gone AS (
                UPDATE ironwod.%1$I c
                   SET deleted_at = v.vanished_at, deleted_by_run = v.vanished_by_run
                  FROM ironwod.vanished_records v
                 WHERE c.tenant_id = $1 AND c.gym_id = $2
                   AND v.tenant_id = $1 AND v.gym_id = $2 AND v.entity = $4
                   AND v.wodify_id = c.%2$I AND c.deleted_at IS NULL
                RETURNING c.*
            ), back AS (
                -- Seen again after it vanished.
                UPDATE ironwod.%1$I c
                   SET deleted_at = NULL, deleted_by_run = NULL
                  FROM unnest($5::bigint[], $6::bigint[]) AS l(wodify_id, last_seen_run_id)
                 WHERE c.tenant_id = $1 AND c.gym_id = $2
                   AND l.wodify_id = c.%2$I AND c.deleted_by_run IS NOT NULL
                   AND l.last_seen_run_id > c.deleted_by_run
                   AND NOT EXISTS (SELECT 1 FROM ironwod.vanished_records v
                                   WHERE v.tenant_id = $1 AND v.gym_id = $2
                                     AND v.entity = $4 AND v.wodify_id = c.%2$I)
                RETURNING c.*
            )
            SELECT (SELECT count(*) FROM gone)::integer + (SELECT count(*) FROM back)::integer,
                   (SELECT min(%3$s) FROM (SELECT * FROM gone UNION ALL SELECT * FROM back) c),
                   %4$s$q$,
            m.canonical, m.key_column, coalesce(m.row_day, 'NULL::date'),
            -- the people on the rows (NULL when the table names none: everyone)
            CASE WHEN m.key_column <> 'member_id' AND EXISTS (
                     SELECT 1 FROM pg_attribute a
                     WHERE a.attrelid = ('ironwod.' || quote_ident(m.canonical))::regclass
                       AND a.attname = 'member_id' AND a.attnum > 0 AND NOT a.attisdropped)
                 THEN '(SELECT array_remove(array_agg(DISTINCT c.member_id), NULL)
                        FROM (SELECT * FROM gone UNION ALL SELECT * FROM back) c)'
                 ELSE 'NULL::bigint[]' END)
        INTO v_changed, v_dirty, v_people USING v_t, v_g, v_tz, m.entity, v_seen_ids, v_seen_runs;
        IF v_changed > 0 THEN
            PERFORM ironwod.note_dirty(v_t, v_g, p_run_id, m.entity, v_dirty, v_changed, v_people);
            v_out := v_out || jsonb_build_object(m.entity, v_changed);
        END IF;
    END LOOP;
    PERFORM ironwod.forward_set_clauses('ironwod.apply_vanished(bigint)', false);
    RETURN v_out;
END
$$;
COMMENT ON FUNCTION ironwod.apply_vanished(bigint) IS 'Worker: soft-delete canonical rows of records that vanished in a reconciliation, restore those seen again; marks the touched months dirty';

GRANT EXECUTE ON FUNCTION ironwod.apply_vanished(bigint) TO ironwod_worker;
