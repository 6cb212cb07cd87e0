-- 74_vanished: carry reconciliation soft deletes (ironwod.vanished_records) into the
-- canonical tables, and take them back when a record is seen again.  Every change
-- marks the months it touches dirty, so refresh_metrics recomputes them.

CREATE FUNCTION ironwod.apply_vanished(p_run_id bigint)
RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    m record;
    v_tz text := ironwod.gym_time_zone();
    v_changed integer;
    v_dirty date;
    v_out jsonb := '{}';
BEGIN
    -- entity -> canonical table, its key, and the civil date a change affects
    FOR m IN
        SELECT * FROM (VALUES
            ('locations', 'locations', 'location_id', 'NULL::date'),
            ('programs', 'programs', 'program_id', 'NULL::date'),
            ('clients', 'members', 'member_id', 'NULL::date'),
            ('memberships', 'memberships', 'membership_id', 'c.start_date'),
            ('membership_holds', 'membership_holds', 'hold_id', 'c.hold_start_date'),
            ('class_signins', 'attendance_events', 'signin_id', '(c.class_start_at AT TIME ZONE $2)::date'),
            ('invoices', 'invoices', 'invoice_id', 'c.due_date'),
            ('transactions', 'transactions', 'transaction_id', '(c.processed_at AT TIME ZONE $2)::date')
        ) AS x(entity, tbl, key, day)
    LOOP
        EXECUTE format($q$
            WITH gone AS (
                UPDATE ironwod.%1$I c
                   SET deleted_at = v.vanished_at, deleted_by_run = v.vanished_by_run
                  FROM ironwod.vanished_records v
                 WHERE c.tenant_id = ironwod.scope_tenant() AND c.gym_id = ironwod.scope_gym()
                   AND v.tenant_id = c.tenant_id AND v.gym_id = c.gym_id AND v.entity = $3
                   AND v.wodify_id = c.%2$I AND c.deleted_at IS NULL
                RETURNING %3$s AS day
            ), back AS (
                -- Seen again after it vanished (and not deleted by Wodify itself).
                UPDATE ironwod.%1$I c
                   SET deleted_at = NULL, deleted_by_run = NULL
                  FROM ironwod.latest_raw_versions($3) l
                 WHERE c.tenant_id = ironwod.scope_tenant() AND c.gym_id = ironwod.scope_gym()
                   AND l.wodify_id = c.%2$I AND c.deleted_by_run IS NOT NULL
                   AND l.last_seen_run_id > c.deleted_by_run
                   AND coalesce((l.payload_json ->> 'is_deleted')::boolean, false) = false
                   AND NOT EXISTS (SELECT 1 FROM ironwod.vanished_records v
                                   WHERE v.tenant_id = c.tenant_id AND v.gym_id = c.gym_id
                                     AND v.entity = $3 AND v.wodify_id = c.%2$I)
                RETURNING %3$s AS day
            )
            SELECT (SELECT count(*) FROM gone) + (SELECT count(*) FROM back),
                   least((SELECT min(day) FROM gone), (SELECT min(day) FROM back))$q$,
            m.tbl, m.key, m.day)
        INTO v_changed, v_dirty USING p_run_id, v_tz, m.entity;
        IF v_changed > 0 THEN
            PERFORM ironwod.note_dirty(p_run_id, m.entity, v_dirty, v_changed);
            v_out := v_out || jsonb_build_object(m.entity, v_changed);
        END IF;
    END LOOP;
    RETURN v_out;
END
$$;
COMMENT ON FUNCTION ironwod.apply_vanished(bigint) IS 'Worker: soft-delete canonical rows of records that vanished in a reconciliation, restore those seen again; marks the touched months dirty';

GRANT EXECUTE ON FUNCTION ironwod.apply_vanished(bigint) TO ironwod_worker;
