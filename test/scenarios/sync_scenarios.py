#!/usr/bin/env python3
"""Scripted fault, crash and drift scenarios against the Wodify simulator.

Run by test/run-tests.sh after the SQL suites, against the same throwaway cluster
(PGHOST/PGPORT/PGUSER/PGDATABASE in the environment) and simulator (SIM_URL).
Prints TAP ("ok N - ...") and exits non-zero when any scenario fails.

Each scenario injects one kind of trouble through POST /_sim/faults, runs a sync
and checks what must hold afterwards: the run's outcome, that nothing was lost
(the gym's raw tables hold the latest version of every record a fresh backfill
sees) and nothing duplicated (one row per payload version, by constraint), and
where the watermarks are.  Waiting is done on ironwod_wait() and on observable
state, never on fixed sleeps.
"""
import json
import os
import subprocess
import sys
import time
import urllib.request

SIM = os.environ["SIM_URL"]
GYM_INDEX = 1                    # the simulator gym these scenarios use
FAULT = ("55555555-5555-5555-5555-555555555555", "55555555-0000-0000-0000-000000000001")
CRASH = ("66666666-6666-6666-6666-666666666666", "66666666-0000-0000-0000-000000000001")
FRESH = ("67676767-6767-6767-6767-676767676767", "67676767-0000-0000-0000-000000000001")
MARKS = ("68686868-6868-6868-6868-686868686868", "68686868-0000-0000-0000-000000000001")

results = []


def psql(sql):
    """Run SQL as the postgres superuser; return stdout lines (unaligned, tuples only)."""
    out = subprocess.run(["psql", "-qAtX", "-v", "ON_ERROR_STOP=1"], input=sql,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"psql failed: {out.stderr.strip()}\n{sql}")
    return [line for line in out.stdout.splitlines() if line != ""]


def scoped(gym, sql):
    """Run SQL inside a transaction scoped to (tenant, gym); return the last statement's rows."""
    t, g = gym
    return psql(f"BEGIN; SELECT ironwod_set_scope('{t}', '{g}');\n{sql};\nCOMMIT;")


def one(gym, sql):
    rows = scoped(gym, sql)
    return rows[-1] if rows else None


def sim(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(SIM + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        raw = r.read()
        return json.loads(raw) if raw else None


def api_key():
    return next(g["api_key"] for g in sim("GET", "/_sim/gyms")["gyms"] if g["index"] == GYM_INDEX)


def fault(**kw):
    kw.setdefault("api_key", api_key())
    sim("POST", "/_sim/faults", kw)


def check(ok, description, detail=""):
    results.append(ok)
    print(f"{'ok' if ok else 'not ok'} {len(results)} - {description}")
    if not ok and detail:
        for line in str(detail).splitlines():
            print(f"#   {line}")


def sealed(gym):
    """The scenarios' key sealed to ironwod_public_key() outside PostgreSQL, as a host
    app seals it (test/seal.py), as a bytea literal: no statement carries the key."""
    kid, pub = psql("SELECT key_id || ' ' || encode(public_key, 'hex') FROM ironwod_public_key()")[0].split()
    out = subprocess.run(["/usr/bin/python3", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "seal.py"),
                          gym[0], gym[1], kid, pub], input=api_key(), capture_output=True, text=True, check=True)
    return "'" + out.stdout.strip() + "'::bytea"


def connect(gym):
    one(gym, f"SELECT ironwod_connect('{gym[0]}', '{gym[1]}', {sealed(gym)})")
    return wait(gym, one(gym, "SELECT last_run('backfill')"))


def sync(gym, mode):
    run = one(gym, f"SELECT ironwod_sync('{gym[0]}', '{gym[1]}', '{mode}')")
    return run, wait(gym, run)


def wait(gym, run):
    return one(gym, f"SELECT ironwod_wait({run}, '5 minutes')")


_set_values = {}


def set_guc(name, value):
    """Change a server setting (None: reset it) and wait until this backend sees the
    change, so the postmaster, which forks the workers, has reloaded before we go on."""
    if value is None:
        psql(f"ALTER SYSTEM RESET {name}")
    else:
        psql(f"ALTER SYSTEM SET {name} = '{value}'")
    psql("SELECT pg_reload_conf()")
    deadline = time.time() + 120          # a bound for a broken reload, not a pace
    while time.time() < deadline:
        now = psql(f"SELECT setting FROM pg_settings WHERE name = '{name}'")[0]
        if (value is None and now != _set_values.get(name)) or (value is not None and now == str(value)):
            _set_values[name] = None if value is None else str(value)
            return
        time.sleep(0.02)
    raise RuntimeError(f"{name} did not change to {value}")


def latest_versions(gym):
    """Latest payload version of every record, per entity, as a set of text rows."""
    # Both sides read first and anti-joined: Citus plans no correlated subquery over
    # a distributed table next to the entities (a reference table there).
    rows = scoped(gym, """
        WITH x AS MATERIALIZED (
            SELECT e.entity, l.wodify_id, l.payload_hash
            FROM ironwod.entities e,
                 LATERAL ironwod.latest_raw_versions(e.entity, ironwod.scope_tenant(), ironwod.scope_gym(), NULL, false) l
        ), v AS MATERIALIZED (
            SELECT v.entity, v.wodify_id FROM ironwod.vanished_records v
            WHERE v.tenant_id = ironwod.scope_tenant() AND v.gym_id = ironwod.scope_gym()
        )
        SELECT x.entity || ':' || x.wodify_id || ':' || encode(x.payload_hash, 'hex')
        FROM x LEFT JOIN v USING (entity, wodify_id) WHERE v.wodify_id IS NULL""")
    return set(rows)


CANONICAL = ("locations", "programs", "members", "memberships", "membership_holds", "attendance_events",
             "invoices", "transactions")


def canonical_rows(gym):
    """Every canonical row, without the columns that name the tenant or a raw/run id."""
    union = " UNION ALL ".join(
        f"SELECT '{t}:' || (to_jsonb(x) - 'tenant_id' - 'gym_id' - 'raw_id' - 'deleted_by_run')::text "
        f"FROM ironwod.{t} x" for t in CANONICAL)
    return set(scoped(gym, union))


def same_canonical(gym, reference, what):
    mine = canonical_rows(gym)
    missing, extra = reference - mine, mine - reference
    check(not missing and not extra, what,
          f"{len(missing)} missing, {len(extra)} extra; e.g. {sorted(missing)[:2]} {sorted(extra)[:2]}")


def same_data(gym, reference, what):
    mine = latest_versions(gym)
    missing, extra = reference - mine, mine - reference
    check(not missing and not extra, what,
          f"{len(missing)} missing, {len(extra)} extra; e.g. {sorted(missing)[:3]} {sorted(extra)[:3]}")


def watermarks(gym):
    return scoped(gym, "SELECT entity || '=' || coalesce(watermark::text, '') FROM ironwod.entity_cursors "
                       "WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym() ORDER BY 1")


def status(gym):
    return one(gym, f"SELECT status || ',' || consecutive_failures || ',' || coalesce(last_error_code, '') "
                    f"FROM ironwod_status('{gym[0]}', '{gym[1]}')")


OUTCOMES = ("2xx", "429", "4xx", "5xx", "network", "envelope")
COUNTERS = ", ".join(f"attempts_{o}" for o in OUTCOMES)


def sim_outcomes():
    """What the simulator answered the scenarios' key so far, by outcome."""
    return dict(sim("GET", "/_sim/stats")["by_gym"].get(str(GYM_INDEX), {}))


def counted_exactly(gym, run, before, what, slow_as="network"):
    """The run's attempt counters equal the simulator's own count of its answers to the
    key since `before`, outcome by outcome, and the run's are the sums of its entities'.
    A slow answer is a network attempt when it outlasts the request timeout (as in the
    fault scenarios), else a 2xx."""
    after = sim_outcomes()
    want = [after.get(o, 0) - before.get(o, 0) for o in OUTCOMES]
    want[OUTCOMES.index(slow_as)] += after.get("slow", 0) - before.get("slow", 0)
    mine = one(gym, f"SELECT {COUNTERS}, requests FROM ironwod.sync_runs WHERE run_id = {run}")
    sums = one(gym, f"SELECT {', '.join(f'sum(attempts_{o})' for o in OUTCOMES)}, sum(requests) "
                    f"FROM ironwod.sync_run_entities WHERE run_id = {run}")
    expected = "|".join(str(n) for n in want + [sum(want)])
    check(mine == expected and sums == expected, f"{what}: every attempt counted by outcome, as the simulator saw it",
          f"simulator {dict(zip(OUTCOMES, want))}, run {mine}, entities {sums}")


def counted_sync(gym, mode, what):
    before = sim_outcomes()
    run, outcome = sync(gym, mode)
    counted_exactly(gym, run, before, what)
    return run, outcome


def fault_scenarios():
    check(connect(FAULT) == "succeeded", "fault gym: initial backfill succeeds")
    reference = latest_versions(FAULT)
    set_guc("ironwod.max_retries", 4)

    cases = [
        ("429 storm without Retry-After", dict(kind="throttle", endpoint="/clients", count=3)),
        ("429 storm with Retry-After: 1", dict(kind="throttle", endpoint="/memberships", count=2, retry_after=1)),
        ("429 with an HTTP-date Retry-After", dict(kind="throttle", endpoint="/programs", count=1,
                                                   retry_after=time.strftime("%a, %d %b %Y %H:%M:%S GMT",
                                                                             time.gmtime(time.time() + 1)))),
        ("5xx burst", dict(kind="status", status=503, endpoint="/memberships/holds", count=3)),
        ("502 then 504", dict(kind="status", status=502, endpoint="/customers/locations", count=1)),
        ("truncated JSON bodies", dict(kind="truncate", endpoint="/financials/invoices/search", count=2)),
        ("error envelopes inside HTTP 200", dict(kind="envelope", http_code=500, endpoint="/programs", count=2)),
        ("connection resets", dict(kind="reset", endpoint="/financials/transactions/search", count=2)),
    ]
    for name, spec in cases:
        sim("DELETE", "/_sim/faults")
        fault(**spec)
        run, outcome = counted_sync(FAULT, "incremental", name)
        retries = one(FAULT, f"SELECT retries FROM ironwod.sync_runs WHERE run_id = {run}")
        check(outcome == "succeeded" and int(retries) >= 1, f"{name}: retried and succeeded",
              f"outcome {outcome}, retries {retries}")
        same_data(FAULT, reference, f"{name}: nothing lost, nothing duplicated")

    # A slow body past the request timeout is a retryable timeout.  The fault's
    # delay is far past the timeout and the timeout far past a normal answer, so a
    # busy machine cannot turn one into the other.
    sim("DELETE", "/_sim/faults")
    set_guc("ironwod.request_timeout_ms", 3000)
    fault(kind="slow", delay_s=600, endpoint="/clients", count=2)
    run, outcome = counted_sync(FAULT, "incremental", "slow bodies")
    set_guc("ironwod.request_timeout_ms", None)
    check(outcome == "succeeded", "slow bodies past the timeout: retried and succeeded", outcome)
    same_data(FAULT, reference, "slow bodies: nothing lost")

    # Retries exhausted: the run fails cleanly, watermarks stay, the breaker counts.
    sim("DELETE", "/_sim/faults")
    before = watermarks(FAULT)
    fault(kind="status", status=500, endpoint="/financials/transactions/search", count=100)
    run, outcome = counted_sync(FAULT, "incremental", "persistent 5xx")
    code = one(FAULT, f"SELECT error_code FROM ironwod.sync_runs WHERE run_id = {run}")
    check(outcome == "failed" and code == "retries_exhausted", "persistent 5xx: run fails after max_retries",
          f"{outcome} {code}")
    check(watermarks(FAULT) == before, "failed run leaves every watermark where it was",
          f"{before} -> {watermarks(FAULT)}")
    check(status(FAULT) == "connected,1,retries_exhausted", "failure counted, breaker still closed", status(FAULT))

    # The breaker opens after ironwod.breaker_threshold consecutive failures.
    set_guc("ironwod.breaker_threshold", 2)
    run, outcome = counted_sync(FAULT, "incremental", "breaker opening")
    row = one(FAULT, f"SELECT status, consecutive_failures, next_retry_at > now() "
                     f"FROM ironwod_status('{FAULT[0]}', '{FAULT[1]}')")
    check(row == "error|2|t", "breaker opens with next_retry_at after consecutive failures", row)
    sim("DELETE", "/_sim/faults")
    run, outcome = counted_sync(FAULT, "incremental", "breaker closing")
    check(outcome == "succeeded" and status(FAULT) == "connected,0,retries_exhausted",
          "a successful run closes the breaker", f"{outcome} {status(FAULT)}")
    set_guc("ironwod.breaker_threshold", None)

    # The monthly quota defers the run instead of failing it.
    before = watermarks(FAULT)
    fault(kind="quota", endpoint="/memberships", count=1)
    run, outcome = counted_sync(FAULT, "incremental", "quota 429")
    row = one(FAULT, f"SELECT status, consecutive_failures, "
                     f"next_retry_at = date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 month' "
                     f"FROM ironwod_status('{FAULT[0]}', '{FAULT[1]}')")
    check(outcome == "deferred" and row == "connected|0|t", "quota 429: run deferred to next month, not failed",
          f"{outcome} {row}")
    check(watermarks(FAULT) == before, "deferred run leaves watermarks where they were")
    psql(f"UPDATE ironwod.integrations_wodify_connection SET next_retry_at = NULL WHERE tenant_id = '{FAULT[0]}'")

    # An endpoint the gym's plan does not include: skipped, visible, retried by reconciliation.
    sim("POST", "/_sim/entitlements", {"api_key": api_key(), "endpoint_prefix": "/financials/transactions",
                                       "entitled": False})
    run, outcome = counted_sync(FAULT, "incremental", "403 on one endpoint")
    skipped = scoped(FAULT, "SELECT entity FROM ironwod.entity_entitlements")
    check(outcome == "succeeded" and skipped == ["transactions"],
          "403 on one endpoint: entity marked not entitled, run succeeds", f"{outcome} {skipped}")
    refused = one(FAULT, f"SELECT attempts_4xx || '/' || requests FROM ironwod.sync_run_entities "
                         f"WHERE run_id = {run} AND entity = 'transactions'")
    check(refused == "1/1", "the refused 403 is counted under the entity it refused", refused)
    unknown_scenario(FAULT, "transactions", True)
    run, outcome = counted_sync(FAULT, "incremental", "skipped entity")
    pulled = one(FAULT, f"SELECT count(*) FROM ironwod.sync_run_entities WHERE run_id = {run} "
                        f"AND entity = 'transactions' AND pages > 0")
    check(outcome == "succeeded" and pulled == "0", "incremental runs skip a not-entitled entity")
    sim("POST", "/_sim/entitlements", {"api_key": api_key(), "endpoint_prefix": "/financials/transactions",
                                       "entitled": True})
    run, outcome = counted_sync(FAULT, "reconcile", "reconciliation")
    skipped = scoped(FAULT, "SELECT entity FROM ironwod.entity_entitlements")
    check(outcome == "succeeded" and skipped == [], "reconciliation retries it and clears the mark",
          f"{outcome} {skipped}")
    unknown_scenario(FAULT, "transactions", False)
    # Holds, which metrics a drill-down explains depend on.
    sim("POST", "/_sim/entitlements", {"api_key": api_key(), "endpoint_prefix": "/memberships/holds",
                                       "entitled": False})
    run, outcome = counted_sync(FAULT, "incremental", "403 on holds")
    unknown_scenario(FAULT, "membership_holds", True)
    sim("POST", "/_sim/entitlements", {"api_key": api_key(), "endpoint_prefix": "/memberships/holds",
                                       "entitled": True})
    run, outcome = counted_sync(FAULT, "reconcile", "holds entitled again")
    unknown_scenario(FAULT, "membership_holds", False)

    # A run that makes no progress is stopped by the supervisor's watchdog.  Every
    # request hangs (each is cut off after low_speed_time and retried), so without
    # the watchdog the run would end as retries_exhausted minutes later.
    set_guc("ironwod.watchdog_timeout", 10)
    fault(kind="slow", delay_s=600, endpoint="/customers/locations", count=100)
    run, outcome = sync(FAULT, "incremental")
    code = one(FAULT, f"SELECT error_code FROM ironwod.sync_runs WHERE run_id = {run}")
    check(outcome == "failed" and code == "watchdog", "a stalled run is stopped by the watchdog", f"{outcome} {code}")
    set_guc("ironwod.watchdog_timeout", None)
    sim("DELETE", "/_sim/faults")

    # Auth errors open the breaker at once, without retries.
    fault(kind="status", status=401, endpoint="/clients", count=1)
    run, outcome = counted_sync(FAULT, "incremental", "401")
    row = one(FAULT, f"SELECT r.retries, c.status, c.next_retry_at IS NULL FROM ironwod.sync_runs r, "
                     f"ironwod_status('{FAULT[0]}', '{FAULT[1]}') c WHERE r.run_id = {run}")
    check(outcome == "failed" and row == "0|error|t", "401: no retry, connection in error at once", f"{outcome} {row}")
    sim("DELETE", "/_sim/faults")
    # The key's validation is counted too, each of its attempts.
    fault(kind="status", status=503, endpoint="/customers/locations", count=1)
    before = sim_outcomes()
    check(connect_again(FAULT) == "connected", "reconnecting with a working key clears the error")
    counted_exactly(FAULT, one(FAULT, "SELECT max(run_id) FROM ironwod.sync_runs WHERE mode = 'validate'"),
                    before, "key validation after a 503")
    set_guc("ironwod.max_retries", None)
    same_data(FAULT, reference, "after every fault: the raw tables still equal the vendor's data")


UNKNOWN_CASES = {
    # entity: (columns that depend on it, the first three never NULL when known; columns
    # that do not depend on it; a drill-down of one that does)
    "transactions": (("collected_net", "collected_gross", "refunds", "arm", "ltv", "membership_revenue_recognised"),
                     ("members_end", "mrr_end", "all_visits", "invoiced_amount", "on_hold_members_end"), None),
    "membership_holds": (("on_hold_members_end", "active_members_end", "mrr_end", "mrr_hold_out", "arm"),
                         ("members_end", "new_members", "all_visits", "collected_net", "invoiced_amount"),
                         "on_hold_members_end"),
}


def unknown_scenario(gym, entity, refused):
    """Unknown is NULL: while the gym's plan refuses an entity, every cached month has
    NULL in the metrics that depend on it (by ironwod.metric_sources) and the others
    keep their values; ironwod_status, ironwod_dashboard and ironwod_explain say so.
    Once the entity is entitled again, every month has its values back."""
    t, g = gym
    unknown_cols, kept_cols, drill = UNKNOWN_CASES[entity]
    scope = "c.tenant_id = ironwod.scope_tenant() AND c.gym_id = ironwod.scope_gym()"
    listed = one(gym, f"SELECT coalesce(nullif(array_to_string(not_entitled, ','), ''), 'none') "
                      f"FROM ironwod_status('{t}', '{g}')")
    # flows are NULL in the first month and ratios without members, by definition
    first = f"(SELECT min(month_start) FROM ironwod.gym_monthly_metrics_cache c WHERE {scope})"
    row = one(gym, f"""
        SELECT count(*) || ',' || count(*) FILTER (WHERE {' AND '.join(f'{c} IS NULL' for c in unknown_cols)})
               || ',' || count(*) FILTER (WHERE {' AND '.join(f'{c} IS NOT NULL' for c in unknown_cols[:3])})
               || ',' || count(*) FILTER (WHERE {' AND '.join(f'{c} IS NOT NULL' for c in kept_cols)})
        FROM ironwod.gym_monthly_metrics_cache c WHERE {scope} AND c.month_start > {first}
          AND c.avg_active_members IS DISTINCT FROM 0
          -- program rows have NULLs of their own (unsplit money, programs unknown)
          AND c.program_key = 'ALL'""")
    n, unknown, known, others = (int(x) for x in row.split(","))
    col = unknown_cols[0]
    board = one(gym, f"""
        SELECT count(*) || ',' || count({col}) || ',' || count(members_end)
        FROM ironwod_dashboard('{t}', '{g}', (SELECT min(month_start) FROM ironwod.gym_monthly_metrics_cache c
                                              WHERE {scope}),
                               (SELECT max(month_start) FROM ironwod.gym_monthly_metrics_cache c WHERE {scope}))""")
    bn, bcol, bmembers = (int(x) for x in board.split(","))
    month = one(gym, f"SELECT max(month_start) FROM ironwod.gym_monthly_metrics_cache c WHERE {scope}")
    explained = "n/a"
    if drill:
        try:
            explained = one(gym, f"SELECT count(*) FROM ironwod_explain('{t}', '{g}', '{month}', '{drill}')")
        except RuntimeError as e:
            explained = "refused" if "is unknown for this gym" in str(e) else str(e)[:200]
    if refused:
        check(listed == entity and n > 0 and unknown == n and others == n and bn > 0 and bcol == 0
              and bmembers == bn and explained in ("n/a", "refused"),
              f"{entity} not entitled: its metrics are NULL (unknown) in every cached month, the others are not; "
              f"ironwod_status lists it" + (f", ironwod_explain refuses {drill}" if drill else ""),
              f"status lists '{listed}'; {n} rows, {unknown} with the {entity} metrics NULL, {others} with the rest; "
              f"dashboard {bn} rows, {bcol} with {col}, {bmembers} with members_end; explain: {explained}")
    else:
        check(listed == "none" and n > 0 and known == n and others == n and bcol == bn
              and (drill is None or explained.isdigit()),
              f"{entity} entitled again: every cached month has its {entity} metrics back",
              f"status lists '{listed}'; {n} rows, {known} with the {entity} metrics, {others} with the rest; "
              f"dashboard {bn} rows, {bcol} with {col}; explain: {explained}")


def until(cond, deadline, alive=lambda: True):
    """Wait on a condition: True once cond() holds, False when the deadline (a bound
    for a broken run, not a pace) passes or alive() stops holding first."""
    while time.time() < deadline and alive():
        if cond():
            return True
        time.sleep(0.05)          # the poll interval; nothing asserts on elapsed time
    return False


def reconcile_held():
    """Start a reconcile of the fault gym whose third request the simulator holds for
    a few seconds; return the run and the scenario's deadline once it is held."""
    sim("DELETE", "/_sim/faults")
    fault(kind="slow", delay_s=5, after=2, count=1)
    run = one(FAULT, f"SELECT ironwod_sync('{FAULT[0]}', '{FAULT[1]}', 'reconcile')")
    deadline = time.time() + 300          # a bound for a broken run, not a pace
    until(fault_fired, deadline)
    return run, deadline


def worker_gone(run, deadline):
    """Wait until the run's worker has exited; True when it has."""
    return until(lambda: not psql(f"SELECT 1 FROM ironwod.worker_status() WHERE run_id = {run}"), deadline)

def pause_scenario(reference):
    """ironwod_pause stops a running run at its next page, and nothing lands after the
    pause; ironwod_sync refuses the paused gym; ironwod_resume lets it sync again.  The
    simulator holds the run's third request for a few seconds, so the pause finds the
    run running; however slow the machine, no page may land once the pause committed."""
    before = sim_outcomes()
    run, deadline = reconcile_held()
    paused = one(FAULT, f"SELECT ironwod_pause('{FAULT[0]}', '{FAULT[1]}')")
    pages = one(FAULT, f"SELECT coalesce(sum(pages), 0) FROM ironwod.sync_run_entities WHERE run_id = {run}")
    gone = worker_gone(run, deadline)
    row = one(FAULT, f"SELECT status || ',' || last_error || ',' || (SELECT coalesce(sum(pages), 0) "
                     f"FROM ironwod.sync_run_entities WHERE run_id = {run}) FROM ironwod.sync_runs WHERE run_id = {run}")
    check(paused == "paused" and row == f"cancelled,paused,{pages}" and gone,
          "pause: the running run is cancelled, its worker stops at the next page, nothing lands after",
          f"{paused} {row} (pages at the pause: {pages}) worker gone: {gone}")
    counted_exactly(FAULT, run, before, "a paused run", slow_as="2xx")
    try:
        refused = f"queued run {one(FAULT, f'SELECT ironwod_sync({FAULT[0]!r}, {FAULT[1]!r})')}"
    except RuntimeError as e:
        refused = "refused" if "is paused" in str(e) else str(e)
    status_paused = status(FAULT)
    resumed = one(FAULT, f"SELECT ironwod_resume('{FAULT[0]}', '{FAULT[1]}')")
    run, outcome = counted_sync(FAULT, "incremental", "after resume")
    check(refused == "refused" and status_paused.startswith("paused,") and resumed == "connected"
          and outcome == "succeeded", "a paused gym refuses ironwod_sync; resumed, it syncs again",
          f"{refused} {status_paused} {resumed} {outcome}")
    same_data(FAULT, reference, "pause and resume: nothing lost, nothing duplicated")


class PageHeld:
    """The worker of a held reconcile (reconcile_held) stopped inside a page's
    transaction: a session of ours locks the run's pending units, so the worker waits
    in the transaction of a batch that completes a unit (units_landed), after it took
    the gym's connection row (hold_connection), until release().  held says whether it
    got there."""

    def __init__(self, run, deadline):
        self.deadline = deadline
        # An error when no unit is left pending: psql stops, and held says so.  The
        # scope as values, so that on Citus the FOR UPDATE routes to one shard.
        self.locker = subprocess.Popen(["psql", "-qAtX", "-v", "ON_ERROR_STOP=1"], stdin=subprocess.PIPE,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                                       env=dict(os.environ, PGAPPNAME="iw_unit_locker"))
        self.locker.stdin.write(f"BEGIN; DO $$BEGIN PERFORM FROM ironwod.run_units u WHERE u.tenant_id = '{FAULT[0]}' "
                                f"AND u.gym_id = '{FAULT[1]}' AND u.run_id = {run} AND u.status = 'pending' FOR UPDATE; "
                                f"IF NOT FOUND THEN RAISE 'no unit of run {run} is pending'; END IF; END$$;\n")
        self.locker.stdin.flush()
        # Who waits on whom: on Citus the row locks are taken on the nodes, where the
        # coordinator's pg_blocking_pids does not look; citus_lock_waits names each
        # side by its global pid, node id * 10^10 + the pid of the coordinator session
        # that sent it (all nodes of the suite run on one machine, so pids are unique).
        self.citus = psql("SELECT count(*) FROM pg_extension WHERE extname = 'citus'")[0] == "1"
        self.held = until(lambda: self.blocks("iw_unit_locker"), deadline, alive=lambda: self.locker.poll() is None)

    @staticmethod
    def pid_of(app):
        return f"(SELECT pid FROM pg_stat_activity WHERE application_name = '{app}')"

    def blocks(self, app):
        """Some session waits on a lock the session named app holds."""
        if self.citus:
            return psql(f"SELECT 1 FROM citus_lock_waits WHERE blocking_gpid % 10000000000 = {self.pid_of(app)}")
        return psql(f"SELECT 1 FROM pg_stat_activity WHERE {self.pid_of(app)} = ANY (pg_blocking_pids(pid))")

    def waiting(self, app, proc):
        """The session named app (run by proc) is seen waiting on a lock."""
        if self.citus:
            cond = lambda: psql(f"SELECT 1 FROM citus_lock_waits WHERE waiting_gpid % 10000000000 = {self.pid_of(app)}")
        else:
            cond = lambda: psql(f"SELECT 1 WHERE cardinality(pg_blocking_pids({self.pid_of(app)})) > 0")
        return self.held and until(cond, self.deadline, alive=lambda: proc.poll() is None)

    def release(self):
        if self.locker.poll() is None:
            self.locker.stdin.write("COMMIT;\n")
            self.locker.stdin.close()
        self.locker.wait(timeout=120)


def scoped_psql(app, sql):
    """psql running sql in the fault gym's scope, as the session named app; its output
    (errors included) is read once it ends."""
    proc = subprocess.Popen(["psql", "-qAtX", "-v", "ON_ERROR_STOP=1"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PGAPPNAME=app))
    proc.stdin.write(f"BEGIN; SELECT ironwod_set_scope('{FAULT[0]}', '{FAULT[1]}');\n{sql}\nCOMMIT;\n")
    proc.stdin.close()
    return proc


def pause_in_flight_scenario(reference):
    """A page in flight when ironwod_pause comes lands before the run is cancelled, or
    not at all: the pause waits for it.  (A page that committed after the cancel would
    carry versions numbered below those of the next run, whose transform moves the
    gym's cursor past them: never transformed.)  The worker is held inside a page
    (PageHeld) until the pause is seen waiting for it; then the units are let go."""
    run, deadline = reconcile_held()
    page = PageHeld(run, deadline)
    pauser = scoped_psql("iw_pauser", f"SELECT ironwod_pause('{FAULT[0]}', '{FAULT[1]}');")
    # the pause waits for the page, or (the bug) is done before the page commits
    paused_waiting = page.waiting("iw_pauser", pauser)
    page.release()
    pauser.wait(timeout=300)
    paused = ([line for line in pauser.stdout.read().splitlines() if line] or [""])[-1]
    pages = one(FAULT, f"SELECT coalesce(sum(pages), 0) FROM ironwod.sync_run_entities WHERE run_id = {run}")
    worker_gone(run, deadline)
    row = one(FAULT, f"SELECT status || ',' || last_error || ',' || (SELECT coalesce(sum(pages), 0) "
                     f"FROM ironwod.sync_run_entities WHERE run_id = {run}) FROM ironwod.sync_runs WHERE run_id = {run}")
    check(page.held and paused_waiting and paused == "paused" and row == f"cancelled,paused,{pages}",
          "pause while a page is in its transaction: the pause waits for it, and nothing lands after the pause",
          f"worker held in a page: {page.held}, pause seen waiting: {paused_waiting}, pause: {paused}, "
          f"run {row} (pages when the pause returned: {pages})")
    resumed = one(FAULT, f"SELECT ironwod_resume('{FAULT[0]}', '{FAULT[1]}')")
    run, outcome = counted_sync(FAULT, "incremental", "after a pause in a page")
    check(resumed == "connected" and outcome == "succeeded", "resumed after a pause in a page, the gym syncs again",
          f"{resumed} {outcome}")
    same_data(FAULT, reference, "pause in a page and resume: nothing lost, nothing duplicated")


def watchdog_in_flight_scenario(reference):
    """The watchdog failing a run whose page is in its transaction waits for the page,
    and neither deadlocks: fail_run takes the gym's connection row before the run's, as
    the page does (it holds the connection, then writes the run's heartbeat).  Taking
    the run first, fail_run waited for the connection while the page's heartbeat
    waited for the run, until the deadlock detector aborted one.  The worker is held
    inside a page (PageHeld) whose request the simulator held for seconds, so the page
    writes its heartbeat (about once a second) after the hold; fail_run is the
    supervisor's own statement (fail_lost_run)."""
    log_from = int(psql("SELECT (pg_stat_file('server.log')).size")[0])
    run, deadline = reconcile_held()
    page = PageHeld(run, deadline)
    watchdog = scoped_psql("iw_watchdog", f"SELECT ironwod.fail_run({run}, 'watchdog', "
                                          f"'no progress; stopped by the watchdog', 'supervise');")
    waited = page.waiting("iw_watchdog", watchdog)
    page.release()
    watchdog.wait(timeout=300)
    said = watchdog.stdout.read().strip()
    worker_gone(run, deadline)
    row = one(FAULT, f"SELECT status || ',' || error_code FROM ironwod.sync_runs WHERE run_id = {run}")
    deadlocks = [l for l in server_log_since(log_from).splitlines() if "deadlock detected" in l]
    check(page.held and waited and watchdog.returncode == 0 and "ERROR" not in said and not deadlocks
          and row == "failed,watchdog",
          "the watchdog fails a run while its page is in a transaction: it waits for the page, no deadlock",
          f"worker held in a page: {page.held}, watchdog seen waiting: {waited}, its output: {said!r}, "
          f"run {row}, deadlocks in the log: {deadlocks}")
    run, outcome = counted_sync(FAULT, "incremental", "after the watchdog")
    check(outcome == "succeeded", "after the watchdog failed a run in a page, the gym syncs again", outcome)
    same_data(FAULT, reference, "watchdog in a page: nothing lost, nothing duplicated")

def server_log_since(offset):
    """The server log from byte offset on, as text (bytes that are not UTF-8 replaced)."""
    size = int(psql("SELECT (pg_stat_file('server.log')).size")[0])
    if size <= offset:
        return ""
    data = psql(f"SELECT encode(pg_read_binary_file('server.log', {offset}, {size - offset}), 'hex')")[0]
    return bytes.fromhex(data).decode("utf-8", "replace")


def poison_scenario():
    """Wodify serves two records PostgreSQL cannot store (a \\u0000 escape, invalid
    UTF-8) in the memberships list: they are quarantined, the rest of the page lands, the
    run succeeds with the count, one WARNING without their content, and the alert.  Fetched
    again they stay quarantined, once.  Fixed at the vendor, the next run lands them and
    quarantine and alert clear."""
    sim("DELETE", "/_sim/faults")
    nul_id, utf8_id = (int(x) for x in scoped(
        FAULT, "SELECT wodify_id FROM ironwod.wodify_raw_memberships WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym() "
        "GROUP BY wodify_id ORDER BY wodify_id LIMIT 2"))
    total = int(one(FAULT, "SELECT count(DISTINCT wodify_id) FROM ironwod.wodify_raw_memberships "
                            "WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym()"))
    fault(kind="poison", endpoint="/memberships", count=1000,
          records=[{"id": nul_id, "reason": "nul"}, {"id": utf8_id, "reason": "invalid_utf8"}])
    log_from = int(psql("SELECT (pg_stat_file('server.log')).size")[0])
    run, outcome = counted_sync(FAULT, "incremental", "poison records")
    counts = one(FAULT, f"SELECT quarantined || '/' || pulled FROM ironwod.sync_run_entities "
                        f"WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym() AND run_id = {run} AND entity = 'memberships'")
    landed = one(FAULT, f"SELECT count(DISTINCT wodify_id) FROM ironwod.wodify_raw_memberships "
                        f"WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym() AND last_seen_run_id = {run}")
    check(outcome == "succeeded" and counts == f"2/{total}" and landed == str(total - 2),
          "poison records: the run succeeds, 2 records quarantined, the rest of their page lands",
          f"{outcome}, quarantined/pulled {counts}, landed {landed} of {total}")
    held = scoped(FAULT, "SELECT wodify_id || ':' || reason || ':' || times_seen || ':' "
                         "|| (position(convert_to('\\u0000', 'UTF8') IN raw) > 0) || ':' "
                         "|| (position('\\xff'::bytea IN raw) > 0) "
                         "FROM ironwod.quarantined_records WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym() ORDER BY wodify_id")
    want = sorted([f"{nul_id}:nul:1:true:false", f"{utf8_id}:invalid_utf8:1:false:true"],
                  key=lambda r: int(r.split(":")[0]))
    check(held == want, "poison records: quarantined with their id, reason and raw bytes", f"{held} != {want}")
    alert = one(FAULT, "SELECT (detail ->> 'records') || ',' || (detail -> 'reasons' = "
                       "'{\"nul\": 1, \"invalid_utf8\": 1}'::jsonb) FROM ironwod.alerts "
                       "WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym() AND alert = 'quarantined_records'")
    check(alert == "2,true", "poison records: the quarantined_records alert is raised", alert)
    log = server_log_since(log_from)
    warned = [l for l in log.splitlines() if f"WARNING:  ironwod run {run}: " in l]
    check(len(warned) == 1 and "2 record(s) of memberships quarantined (" in warned[0]
          and "nul 1" in warned[0] and "invalid_utf8 1" in warned[0] and "sim_note" not in log,
          "poison records: one WARNING with the counts, nothing of the records in the log", warned)

    run, outcome = counted_sync(FAULT, "incremental", "poison records again")
    again = one(FAULT, "SELECT count(*) || '/' || min(times_seen) || '/' || max(last_seen_run_id) "
                       "FROM ironwod.quarantined_records WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym()")
    check(outcome == "succeeded" and again == f"2/2/{run}",
          "poison records fetched again: retried, still quarantined, not duplicated", f"{outcome} {again}")

    sim("DELETE", "/_sim/faults")             # the vendor fixes its records
    run, outcome = counted_sync(FAULT, "incremental", "poison records fixed")
    left = one(FAULT, "SELECT count(*) FROM ironwod.quarantined_records WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym()")
    fixed = one(FAULT, f"SELECT count(DISTINCT wodify_id) FROM ironwod.wodify_raw_memberships "
                       f"WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym() AND wodify_id IN ({nul_id}, {utf8_id}) "
                       f"AND last_seen_run_id = {run}")
    alert = one(FAULT, "SELECT count(*) FROM ironwod.alerts WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym() "
                       "AND alert = 'quarantined_records'")
    counts = one(FAULT, f"SELECT quarantined FROM ironwod.sync_run_entities "
                        f"WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym() AND run_id = {run} AND entity = 'memberships'")
    check(outcome == "succeeded" and left == "0" and fixed == "2" and alert == "0" and counts == "0",
          "fixed at the vendor: the next run lands them, quarantine and alert clear",
          f"{outcome}, left {left}, landed {fixed}, alerts {alert}, quarantined {counts}")


def connect_again(gym):
    return one(gym, f"SELECT ironwod_connect('{gym[0]}', '{gym[1]}', {sealed(gym)})")


def fault_fired():
    return all(f["remaining"] == 0 for f in sim("GET", "/_sim/faults")["faults"])


def waiters_xmin(run):
    """While the run is held in a request: a client in a plain SELECT ironwod_wait(...)
    holds back no xmin horizon while it sleeps (the worker's rewritten rows can be
    pruned), and one whose statement also reads a table keeps its snapshot's xmin."""
    t, g = CRASH
    plain = f"BEGIN; SELECT ironwod_set_scope('{t}', '{g}'); SELECT ironwod_wait({run}, '5 minutes'); COMMIT;"
    # The scanning waiter reads a catalog table, not an ironwod one: on Citus a
    # statement over a distributed table would be sent to a shard, where ironwod_wait
    # cannot read distributed tables.
    scan = (f"BEGIN; SELECT ironwod_set_scope('{t}', '{g}'); SELECT ironwod_wait({run}, '5 minutes') "
            f"FROM pg_catalog.pg_database d WHERE d.datname = current_database(); COMMIT;")
    procs = [subprocess.Popen(["psql", "-qAtX", "-c", sql], env=dict(os.environ, PGAPPNAME=name),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name, sql in (("iw_wait_plain", plain), ("iw_wait_scan", scan))]
    # samples of both asleep in the wait (wait_event Extension); the bound is for a
    # broken server, not a pace
    plain_free, scan_held, samples = False, True, 0
    deadline = time.time() + 120
    while time.time() < deadline and samples < 40:
        rows = dict(line.split("|") for line in psql(
            "SELECT application_name, coalesce(backend_xmin::text, '') FROM pg_stat_activity "
            "WHERE application_name IN ('iw_wait_plain', 'iw_wait_scan') AND wait_event_type = 'Extension'"))
        if len(rows) == 2:
            samples += 1
            plain_free = plain_free or rows["iw_wait_plain"] == ""
            scan_held = scan_held and rows["iw_wait_scan"] != ""
            if plain_free and samples >= 5:
                break
        time.sleep(0.05)
    psql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
         "WHERE application_name IN ('iw_wait_plain', 'iw_wait_scan')")
    for p in procs:
        p.wait(timeout=120)
    check(samples >= 5 and plain_free and scan_held,
          "a client waiting in SELECT ironwod_wait(...) holds back no xmin while it sleeps; "
          "one whose statement reads a table keeps its snapshot's",
          f"samples {samples}, plain waiter without xmin {plain_free}, scanning waiter with xmin {scan_held}")


def crash_run(k):
    """Start a backfill of the crash gym, kill its worker while the simulator holds
    request k+1, and return (killed, pages the run had committed by then, per entity
    "entity:pages:status", the killed run's outcome)."""
    sim("DELETE", "/_sim/faults")
    fault(kind="slow", delay_s=900, after=k, count=1)
    run = one(CRASH, f"SELECT ironwod_sync('{CRASH[0]}', '{CRASH[1]}', 'backfill')")
    killed, pages, entities = False, None, []
    deadline = time.time() + 600          # a bound for a broken run, not a pace

    def active():
        return one(CRASH, f"SELECT status FROM ironwod.sync_runs WHERE run_id = {run}") in ("running", "queued")

    # held at request k+1, or (a broken run) over before it got there
    if until(fault_fired, deadline, alive=active):
        # what landed (committed) before request k+1 was sent
        pages = int(one(CRASH, f"SELECT coalesce(sum(pages), 0) FROM ironwod.sync_run_entities "
                               f"WHERE run_id = {run}"))
        entities = scoped(CRASH, f"SELECT entity || ':' || pages || ':' || status FROM ironwod.sync_run_entities "
                                 f"WHERE run_id = {run} ORDER BY entity")
        entities = [e for e in entities if e.count(":") == 2]
        if k == 1:
            waiters_xmin(run)
        killed = psql(f"SELECT pg_terminate_backend(pid) FROM ironwod.worker_status() "
                      f"WHERE run_id = {run}") == ["t"]
    return killed, pages, entities, wait(CRASH, run)


def whole_batches(entities, n):
    """Every entity of a killed run either completed (its last batch, however short,
    landed with its last unit) or holds whole batches of n pages: the pages of the
    batch being fetched when the worker died landed together or not at all."""
    for e in entities:
        _, pages, state = e.split(":")
        if state != "completed" and int(pages) % n != 0:
            return False
    return True


def crash_scenarios(reference, reference_canonical):
    """Kill the run worker after k fetched pages for ten values of k; every retry ends
    with the same raw and canonical contents as an uninterrupted backfill.  The
    simulator holds the run's request k+1 (a slow fault that lets k requests through),
    so the worker is stopped at exactly k pages however fast the machine is.  Pages
    land ironwod.pages_per_commit at a time, so what the killed run committed is whole
    batches: fewer than a batch's pages short of k, and every entity it did not finish
    a multiple of the batch.  With pages_per_commit = 1 it is exactly k pages."""
    check(connect(CRASH) == "succeeded", "crash gym: initial backfill succeeds")
    # The held request must outlast the kill, not time out and be retried.
    set_guc("ironwod.request_timeout_ms", 600000)
    set_guc("ironwod.low_speed_time", 600)
    n = int(psql("SELECT setting FROM pg_settings WHERE name = 'ironwod.pages_per_commit'")[0])
    for k in (1, 2, 4, 7, 11, 17, 26, 40, 61, 93):
        killed, pages, entities, first = crash_run(k)
        sim("DELETE", "/_sim/faults")
        retry_run, outcome = sync(CRASH, "backfill")
        check(killed and pages is not None and k - n < pages <= k and whole_batches(entities, n)
              and first == "failed" and outcome == "succeeded",
              f"worker killed after {k} pages ({n} a commit): whole batches landed, run failed, retry succeeded",
              f"{killed} {pages} {entities} {first} {outcome}")
        same_data(CRASH, reference, f"killed after {k} pages: raw equals an uninterrupted backfill")
        same_canonical(CRASH, reference_canonical, f"killed after {k} pages: canonical tables equal too")
    # One page a commit, as before batches: exactly the k pages fetched landed.
    set_guc("ironwod.pages_per_commit", 1)
    for k in (3, 50):
        killed, pages, entities, first = crash_run(k)
        sim("DELETE", "/_sim/faults")
        retry_run, outcome = sync(CRASH, "backfill")
        check(killed and pages == k and first == "failed" and outcome == "succeeded",
              f"pages_per_commit = 1, worker killed after {k} pages: all {k} landed, retry succeeded",
              f"{killed} {pages} {entities} {first} {outcome}")
        same_data(CRASH, reference, f"one page a commit, killed after {k} pages: raw equals an uninterrupted backfill")
    set_guc("ironwod.pages_per_commit", None)
    set_guc("ironwod.request_timeout_ms", None)
    set_guc("ironwod.low_speed_time", None)


def iso(t):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def watermark_scenario():
    """Watermarks hold vendor timestamps only.  The gym has no transactions yet at the
    vendor (the simulator withholds the generated ones), so a pull sees none and the
    transactions watermark must stay empty, not become our clock: a payment the vendor
    then posts with an older date (entered late) must still land.  A payment older than
    the watermark but inside the lookback lands too, and one dated ahead lands without
    moving the watermark past now."""
    key = api_key()
    lookback = int(psql("SELECT current_setting('ironwod.lookback_days')")[0])

    def mark():
        return one(MARKS, "SELECT coalesce((SELECT watermark::text FROM ironwod.entity_cursors WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym() "
                          "AND entity = 'transactions'), 'none')")

    def landed(rec):
        return one(MARKS, f"SELECT count(*) FROM ironwod.wodify_raw_transactions WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym() AND wodify_id = {rec['id']}") == "1"

    def stamp(rec):
        return one(MARKS, f"SELECT '{rec['transaction_date_time']}'::timestamptz::text")

    sim("POST", "/_sim/transactions", {"api_key": key, "generated": False})
    try:
        check(connect(MARKS) == "succeeded" and mark() == "none",
              "a backfill that sees no transactions leaves the transactions watermark empty", mark())
        run, outcome = sync(MARKS, "incremental")
        seen = one(MARKS, f"SELECT coalesce(sum(pulled), 0) FROM ironwod.sync_run_entities "
                          f"WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym() AND run_id = {run} AND entity = 'transactions'")
        check(outcome == "succeeded" and seen == "0" and mark() == "none",
              "an incremental that sees no transactions leaves the watermark where it was (not our clock)",
              f"{outcome}, pulled {seen}, watermark {mark()}")
        # Dated before our clock minus the lookback: lost if the empty pull had moved
        # the watermark to our clock.
        late = sim("POST", "/_sim/transactions", {"api_key": key, "amount": 41.0,
                                                   "transaction_date_time": iso(time.time() - (lookback + 2) * 86400)})
        run, outcome = sync(MARKS, "incremental")
        check(outcome == "succeeded" and landed(late) and mark() == stamp(late),
              "a transaction posted later with an older date lands; the watermark is its vendor time",
              f"{outcome}, landed {landed(late)}, watermark {mark()}, want {stamp(late)}")
        # Older than the watermark, inside the lookback (entered late with its real date).
        older = sim("POST", "/_sim/transactions", {"api_key": key, "amount": 42.0,
                                                    "transaction_date_time": iso(time.time() - (lookback + 2) * 86400
                                                                                 - lookback * 43200)})
        run, outcome = sync(MARKS, "incremental")
        check(outcome == "succeeded" and landed(older) and mark() == stamp(late),
              "a transaction dated before the watermark, inside the lookback, lands; the watermark stays",
              f"{outcome}, landed {landed(older)}, watermark {mark()}, want {stamp(late)}")
        before = mark()
        ahead = sim("POST", "/_sim/transactions", {"api_key": key, "amount": 44.0,
                                                    "transaction_date_time": iso(time.time() + 2 * 86400)})
        run, outcome = sync(MARKS, "incremental")
        past_now = one(MARKS, "SELECT count(*) FROM ironwod.entity_cursors WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym() AND watermark > now()")
        check(outcome == "succeeded" and landed(ahead) and mark() == before and past_now == "0",
              "a future-dated transaction lands but does not move the watermark (none is past now)",
              f"{outcome}, landed {landed(ahead)}, watermark {before} -> {mark()}, past now: {past_now}")
    finally:
        sim("DELETE", "/_sim/transactions")


def drift_scenario():
    """30 simulated days of vendor activity with a nightly incremental run (and the
    weekly reconciliation on every 7th day): the raw tables end equal to a fresh
    full backfill of the same gym, so the incremental path misses nothing.  The days
    bring late edits (invoices paid or voided after they were due, holds extended,
    cancellations requested, profile edits) and, on day 20, a payment entered with a
    date two days back; the metrics cache the worker refreshed after every run then
    equals, byte for byte, the one ironwod_replay rebuilds from raw in one pass.
    Clients get a new raw version only on the days their record really changed,
    by the simulator's ground truth, although every client's record moves daily."""
    before_drift = int(one(FAULT, "SELECT coalesce(max(run_id), 0) FROM ironwod.sync_runs "
                                  "WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym()"))
    prev = client_versions()
    real_changes, moved_daily = {}, []
    for day in range(1, 31):
        sim("POST", f"/_sim/advance?days=1")
        now = client_versions()
        for cid, v in now.items():
            if cid not in prev or prev[cid]["stable"] != v["stable"]:
                real_changes[cid] = real_changes.get(cid, 0) + 1
        moved_daily.append(sum(1 for cid, v in now.items() if cid in prev and prev[cid]["full"] != v["full"])
                           / max(1, sum(1 for cid in now if cid in prev)))
        prev = now
        if day == 20:
            sim("POST", "/_sim/transactions", {"api_key": api_key(), "amount": 55.0,
                                               "transaction_date_time": iso(time.time() - 2 * 86400)})
        mode = "reconcile" if day % 7 == 0 else "incremental"
        run, outcome = sync(FAULT, mode)
        if outcome != "succeeded":
            check(False, f"day {day}: {mode} run succeeds", outcome)
            return
    check(True, "30 days of nightly incremental runs and weekly reconciliations succeed")
    edited = {e: int(one(FAULT, f"SELECT count(*) FROM (SELECT wodify_id FROM ironwod.wodify_raw_{e} "
                                 f"WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym() "
                                 f"GROUP BY 1 HAVING count(*) > 1) x"))
              for e in ("invoices", "memberships", "membership_holds")}
    check(sum(edited.values()) > 0, "the 30 days brought late edits (records with several versions)", edited)
    versions = dict(r.split("|") for r in scoped(FAULT, f"""
        SELECT wodify_id || '|' || count(*) FROM ironwod.wodify_raw_clients
        WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym() AND ingest_run_id > {before_drift}
        GROUP BY wodify_id"""))
    versions = {k: int(v) for k, v in versions.items()}
    check(min(moved_daily) >= 0.9, "every day the vendor's record of (nearly) every client moved (volatile fields)",
          f"share of clients whose record changed, per day: {[round(x, 2) for x in moved_daily]}")
    check(versions == real_changes,
          "30 days add client versions only for the clients and days whose non-volatile fields changed",
          f"{sum(versions.values())} new versions for {len(versions)} clients, the simulator's truth "
          f"{sum(real_changes.values())} for {len(real_changes)}; differing: "
          f"{ {k: (versions.get(k), real_changes.get(k)) for k in set(versions) | set(real_changes) if versions.get(k) != real_changes.get(k)} }")
    replay_scenario(FAULT)
    check(connect(FRESH) == "succeeded", "fresh backfill of the same gym after 30 days")
    same_data(FAULT, latest_versions(FRESH), "incremental path missed nothing: raw equals a fresh backfill")
    same_canonical(FAULT, canonical_rows(FRESH), "and the canonical tables equal those of the fresh backfill")
    new_runs = one(FAULT, "SELECT count(*) FROM ironwod.sync_runs WHERE mode IN ('incremental', 'reconcile')")
    check(int(new_runs) >= 30, "every day had its own run", new_runs)


DERIVED = CANONICAL + ("member_spell", "member_month_fact", "gym_monthly_metrics_cache", "member_state_span",
                       "member_visit_month", "gym_month_money")


def derived_rows(gym):
    """Every row the digest covers, per table, as ironwod.digest renders it."""
    rows = scoped(gym, " UNION ALL ".join(
        f"SELECT '{t}' || chr(9) || (to_jsonb(x) - 'computed_at')::text FROM ironwod.{t} x "
        f"WHERE x.tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym()" for t in DERIVED))
    out = {t: set() for t in DERIVED}
    for r in rows:
        t, _, rest = r.partition("\t")
        out[t].add(rest)
    return out


def first_difference(a, b, tables):
    """The columns that differ in the first differing row pair of the first table."""
    for t in tables:
        x = [json.loads(r) for r in sorted(a[t] - b[t])][:1]
        y = [json.loads(r) for r in sorted(b[t] - a[t])][:1]
        if x and y:
            return {t: {k: (x[0].get(k), y[0].get(k)) for k in x[0] if x[0].get(k) != y[0].get(k)}}
        return {t: x or y}
    return {}


def client_versions():
    """The simulator's truth: per client id, hashes of its record, whole and without the
    fields Wodify recomputes daily."""
    return sim("GET", f"/_sim/client_versions?gym={GYM_INDEX}")["clients"]


def replay_scenario(gym):
    """The live canonical tables, spells, facts and cache, built run by run, equal what
    ironwod_replay rebuilds from raw alone, byte for byte (their digest); and the digest
    sees a change of a single derived value."""
    t, g = gym
    live, live_parts = one(gym, f"SELECT ironwod.digest('{t}', '{g}')"), derived_rows(gym)
    replayed = one(gym, f"SELECT ironwod_replay('{t}', '{g}')")
    replay_parts = derived_rows(gym)
    differ = {k: (len(live_parts[k] - replay_parts[k]), len(replay_parts[k] - live_parts[k]))
              for k in live_parts if live_parts[k] != replay_parts[k]}
    check(live == replayed and not differ, "after 30 days of runs, the live digest equals ironwod_replay's",
          f"live {live}, replay {replayed}; rows only live / only replayed, by table: {differ}; "
          f"e.g. {first_difference(live_parts, replay_parts, differ)}")
    row = one(gym, "SELECT location_key || '|' || month_start FROM ironwod.gym_monthly_metrics_cache "
                   "WHERE tenant_id = ironwod.scope_tenant() AND gym_id = ironwod.scope_gym() AND location_key = 'ALL' AND program_key = 'ALL' ORDER BY month_start DESC LIMIT 1")
    loc, month = row.split("|")
    tampered = one(gym, f"UPDATE ironwod.gym_monthly_metrics_cache SET members_end = members_end + 1 "
                        f"WHERE tenant_id = '{t}' AND gym_id = '{g}' AND location_key = '{loc}' "
                        f"AND program_key = 'ALL' AND month_start = '{month}';\n"
                        f"SELECT ironwod.digest('{t}', '{g}')")
    again = one(gym, f"SELECT ironwod_replay('{t}', '{g}')")
    check(tampered != replayed and again == replayed,
          "one derived value changed in one cache row changes the digest; a replay restores it",
          f"tampered {tampered}, replay {replayed}, again {again}")


MB = 1048576


def memory_scenario():
    """A page of 40 records of 1 MB (about 40 MB, under ironwod.max_response_bytes):
    the run worker's private memory peaks at no more than three times the page plus a
    constant (the worker's own baseline: caches, plans, libcurl).  The worker measures
    it itself around every page (sync_runs.peak_memory_bytes, an upper bound: VmHWM
    less the file and shared pages it held when the page's request went out), so the
    figure does not depend on sampling the worker at the right moment."""
    sim("DELETE", "/_sim/faults")
    fault(kind="bloat", endpoint="/memberships", pad_bytes=MB, max_records=40, count=1)
    run, outcome = sync(FRESH, "incremental")
    row = one(FRESH, f"SELECT coalesce(peak_memory_bytes, 0) || ',' || coalesce(largest_page_bytes, 0) "
                     f"FROM ironwod.sync_runs WHERE tenant_id = ironwod.scope_tenant() "
                     f"AND gym_id = ironwod.scope_gym() AND run_id = {run}")
    peak, page = (int(x) for x in row.split(","))
    # On a Citus coordinator the worker also holds the landing statement as Citus
    # deparses it for the node, the page's records inlined as text, and libpq's
    # copy of it on its way out: two more pages (README, Scaling out with Citus).
    factor = 5 if psql("SELECT count(*) FROM pg_extension WHERE extname = 'citus'")[0] == "1" else 3
    print(f"# worker peak private memory {peak / MB:.1f} MB for a largest page of {page / MB:.1f} MB")
    check(outcome == "succeeded" and page >= 40 * MB and 0 < peak <= factor * page + MEMORY_CONSTANT,
          f"a page of 40 records of 1 MB: the worker's private memory peaks at most at {factor}x the page "
          f"plus {MEMORY_CONSTANT // MB} MB", f"{outcome}, peak {peak}, page {page}")
    sim("DELETE", "/_sim/faults")


# What a run worker holds besides the page: catalog and plan caches, libcurl, OpenSSL.
# A worker that served runs before this one (ironwod.worker_idle_timeout) keeps their
# caches, the transforms' and metrics' compiled functions and plans among them: at the
# 40 MB page its peak went from 90 MB (a new worker) to 122 MB (117 MB once end_run
# trims the heap), so the constant is 48 MB, not the 32 MB of a new worker.
MEMORY_CONSTANT = 48 * MB


def main():
    watermark_scenario()
    fault_scenarios()
    pause_scenario(latest_versions(FAULT))
    pause_in_flight_scenario(latest_versions(FAULT))
    watchdog_in_flight_scenario(latest_versions(FAULT))
    reference = latest_versions(FAULT)
    poison_scenario()
    same_data(FAULT, reference, "poison records: nothing lost, nothing duplicated")
    crash_scenarios(latest_versions(FAULT), canonical_rows(FAULT))
    drift_scenario()
    memory_scenario()
    failed = results.count(False)
    print(f"1..{len(results)}")
    print(f"# {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
