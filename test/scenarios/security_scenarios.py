#!/usr/bin/python3
"""What a hostile tenant or a curious monitoring role can see (issue 8, items 1, 2 and 8).

Run by test/run-tests.sh after the SQL suites, against the same throwaway cluster
(PGHOST/PGPORT/PGUSER/PGDATABASE) and simulator (SIM_URL).  Prints TAP and exits
non-zero when a check fails.  Uses Debian's python3-psycopg (the extended protocol
with bind parameters, which psql 15 cannot send) and python3-cryptography (sealing
a key as a host app does, test/seal.py), hence /usr/bin/python3.

1. NOTIFY ironwod_events: a role with nothing but CONNECT and tenant A's app role
   LISTEN while tenants A and B sync.  Both hear every event, and each payload is
   only the event's id: no tenant, gym, run or entity.  A's app, reading
   ironwod.sync_events by those ids under its scope, gets its own events and none
   of B's; the CONNECT-only role cannot read the table at all.  B's disconnect,
   an event outside any run, is heard the same way.
2. The canary key (a real simulator key) in no statistics view: ironwod_connect
   through every documented call path (simple protocol, extended protocol with
   bind parameters, PREPARE/EXECUTE, inside DO, inside a function), sealed to
   ironwod_public_key() outside PostgreSQL, and as text.  During each call the
   simulator holds the validation request until a second connection has sampled
   pg_stat_activity (every backend) 20 times with the caller inside the wait (POST
   /_sim/holds, then /_sim/release), so the
   wait is sampled however fast the machine is.  pg_stat_statements tracks
   everything (track = all, utility statements on).
     - sealed: the key is nowhere, during the wait or after;
     - text with ironwod.allow_plaintext_keys off (the default): refused with
       0A000 and a hint naming the sealed path, and the idle session's
       pg_stat_activity no longer shows the statement; nothing in
       pg_stat_statements;
     - text with it on: connected; pg_stat_activity clean during the wait and
       after; pg_stat_statements holds the key exactly where the README says
       PostgreSQL stores it verbatim (the DO block), nowhere else.
   A plaintext key is in the statement text from the statement's start until
   ironwod_connect hides it; the text paths are checked from there on.
3. pg_hba.conf: a local login as ironwod_worker is rejected (the README's lines,
   which test/cluster.sh writes), while another role without a password gets in.
4. A run worker serves several runs (ironwod.worker_idle_timeout): with
   ironwod.max_workers = 1 and a linger, the backfills of two gyms of two tenants,
   queued one after the other, are claimed by one worker pid (sync_runs.worker_pid).
   Every row each run wrote carries its own tenant and gym; the second gym's
   canonical rows equal those of the same simulator gym backfilled by a worker of
   its own (nothing of the first run leaks into the second); neither key is in
   the server log.  A kill of the reused worker in a later run is reaped as today
   (failed, worker_lost), and the gym syncs again.  With
   ironwod.worker_idle_timeout = 0 every run has a process of its own.  Each of the
   worker's runs is held at a request (/_sim/holds, released by id) until its
   worker shows that run: application_name, read by the CONNECT-only role, is
   "ironwod run worker: run N" (no tenant or gym: every role reads it), and the
   process title adds the run's tenant and gym; after the run it shows idle.
"""
import os
import re
import sys
import threading
import time
import urllib.request
import json
import uuid

import psycopg
from psycopg import errors

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from seal import seal  # noqa: E402  (test/seal.py)

SIM = os.environ["SIM_URL"]
A = (uuid.UUID("a8a8a8a8-a8a8-a8a8-a8a8-a8a8a8a8a8a8"), uuid.UUID("a8a8a8a8-0000-0000-0000-000000000001"))
B = (uuid.UUID("b9b9b9b9-b9b9-b9b9-b9b9-b9b9b9b9b9b9"), uuid.UUID("b9b9b9b9-0000-0000-0000-000000000001"))
C = (uuid.UUID("c7c7c7c7-c7c7-c7c7-c7c7-c7c7c7c7c7c7"), uuid.UUID("c7c7c7c7-0000-0000-0000-000000000001"))
NOBODY, APP = "iw_sec_nobody", "iw_sec_app"
WAIT_SAMPLES = 20
results = []


def check(ok, description, detail=""):
    results.append(bool(ok))
    print(f"{'ok' if ok else 'not ok'} {len(results)} - {description}", flush=True)
    if not ok and detail:
        for line in str(detail).splitlines():
            print(f"#   {line}")


def sim(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(SIM + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        raw = r.read()
        return json.loads(raw) if raw else None


def sim_key(index):
    return next(g["api_key"] for g in sim("GET", "/_sim/gyms")["gyms"] if g["index"] == index)


def su():
    return psycopg.connect(autocommit=True)


def rows(sql, params=None):
    with su() as c:
        return c.execute(sql, params).fetchall()


def sealed(gym, api_key):
    """The key sealed to ironwod_public_key() here, as the host app would."""
    key_id, public_key = rows("SELECT key_id, public_key FROM ironwod_public_key()")[0]
    return seal(str(gym[0]), str(gym[1]), key_id, bytes(public_key), api_key)


def wait_until(what, cond, bound_s=120):
    """Poll cond until true; the bound is for a broken run, not a pace."""
    deadline = time.time() + bound_s
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def setup_roles():
    with su() as c:
        c.execute(f"""DO $$ BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{NOBODY}') THEN CREATE ROLE {NOBODY} LOGIN; END IF;
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP}') THEN CREATE ROLE {APP} LOGIN; END IF;
        END $$""")
        c.execute(f"GRANT ironwod_app TO {APP}")
        # the app waits for a held validation as long as the test holds it
        c.execute(f"ALTER ROLE {APP} SET ironwod.validate_timeout_ms = 300000")
        c.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")


# ---- 1. NOTIFY --------------------------------------------------------------------------

def connect_and_sync(gym, api_key):
    """Connect (sealed) and wait for a run: the initial backfill, or (connected
    before, when the script runs again on the same cluster) an incremental one."""
    with su() as c:
        with c.transaction():
            c.execute("SELECT ironwod_set_scope(%s, %s)", gym)
            status = c.execute("SELECT ironwod_connect(%s, %s, %s)", (*gym, sealed(gym, api_key))).fetchone()[0]
        with c.transaction():
            c.execute("SELECT ironwod_set_scope(%s, %s)", gym)
            run = c.execute("SELECT ironwod_sync(%s, %s)", gym).fetchone()[0]
        with c.transaction():
            c.execute("SELECT ironwod_set_scope(%s, %s)", gym)
            outcome = c.execute("SELECT ironwod_wait(%s, '10 minutes')", (run,)).fetchone()[0]
    return status, outcome


def notify_scenario():
    heard = {NOBODY: [], APP: []}
    listeners = {}
    for role in heard:
        conn = psycopg.connect(user=role, autocommit=True)
        conn.add_notify_handler(lambda n, role=role: heard[role].append(n.payload))
        conn.execute("LISTEN ironwod_events")
        listeners[role] = conn
    start = rows("SELECT coalesce(max(event_id), 0) FROM ironwod.sync_events")[0][0]

    outcomes = {}
    threads = [threading.Thread(target=lambda g=g, k=k: outcomes.__setitem__(g, connect_and_sync(g, k)))
               for g, k in ((A, sim_key(1)), (B, sim_key(2)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check(outcomes.get(A) == ("connected", "succeeded") and outcomes.get(B) == ("connected", "succeeded"),
          "tenants A and B connect (sealed keys) and sync while two roles listen", outcomes)

    def events(gym):
        return {r[0] for r in rows("SELECT event_id FROM ironwod.sync_events WHERE tenant_id = %s AND gym_id = %s "
                                   "AND event_id > %s", (*gym, start))}
    ev_a, ev_b = events(A), events(B)
    b_runs = {r[0] for r in rows("SELECT run_id FROM ironwod.sync_runs WHERE tenant_id = %s AND gym_id = %s", B)}
    entities = {r[0] for r in rows("SELECT entity FROM ironwod.entities")}

    for role, conn in listeners.items():
        # notifications reach a client with its next exchange: poll until every
        # event of both tenants has arrived
        def all_heard():
            conn.execute("SELECT 1")
            return {int(p) for p in heard[role] if p.isdigit()} >= ev_a | ev_b
        try:
            wait_until(f"{role} to hear every event", all_heard, 60)
            got_all = True
        except RuntimeError:
            got_all = False
        payloads = heard[role]
        check(got_all and ev_a and ev_b,
              f"{role} hears all {len(ev_b)} of B's events (and A's) as they happen",
              f"heard {len(payloads)}: {payloads[:5]}")
        bad = [p for p in payloads if not re.fullmatch(r"[0-9]+", p)]
        leaks = [p for p in payloads
                 if str(B[0]) in p or str(B[1]) in p or any(e in p for e in entities)
                 or any(f'"run_id" : {r}' in p or f'"run_id": {r}' in p for r in b_runs)]
        check(payloads and not bad and not leaks,
              f"{role}: every payload is only an event id (no tenant, gym, run or entity)",
              f"not an id: {bad[:3]}  naming B: {leaks[:3]}")

    app = listeners[APP]
    with app.transaction():
        app.execute("SELECT ironwod_set_scope(%s, %s)", A)
        heard_ids = sorted({int(p) for p in heard[APP] if p.isdigit()})
        seen = {r[0] for r in app.execute("SELECT event_id FROM ironwod.sync_events WHERE event_id = ANY(%s)",
                                          (heard_ids,)).fetchall()}
        b_rows = app.execute("SELECT count(*) FROM ironwod.sync_events WHERE tenant_id = %s", (B[0],)).fetchone()[0]
    check(seen >= ev_a and not (seen & ev_b) and b_rows == 0,
          "A's app reads its own events by the ids it heard, and none of B's rows",
          f"own {len(seen & ev_a)}/{len(ev_a)}, B's {len(seen & ev_b)}, B rows {b_rows}")

    nobody = listeners[NOBODY]
    try:
        nobody.execute("SELECT count(*) FROM ironwod.sync_events")
        denied = False
    except errors.InsufficientPrivilege:
        denied = True
    check(denied, "the CONNECT-only role cannot read ironwod.sync_events")

    # Events outside a run are notified too: B disconnects while both listen.
    with su() as c:
        with c.transaction():
            c.execute("SELECT ironwod_set_scope(%s, %s)", B)
            c.execute("SELECT ironwod_disconnect(%s, %s)", B)
    gone = rows("SELECT max(event_id) FROM ironwod.sync_events WHERE tenant_id = %s AND gym_id = %s "
                "AND event = 'wodify.disconnected'", B)[0][0]
    for role, conn in listeners.items():
        def heard_gone():
            conn.execute("SELECT 1")
            return str(gone) in heard[role]
        try:
            wait_until(f"{role} to hear B's disconnect", heard_gone, 60)
            ok = True
        except RuntimeError:
            ok = False
        check(gone is not None and ok, f"{role} hears B's disconnect (event {gone}) as an event id")
    for conn in listeners.values():
        conn.close()


# ---- 2. the key in statistics views -------------------------------------------------------

def hold_validation(api_key):
    sim("POST", "/_sim/holds", {"api_key": api_key, "endpoint": "/customers/locations", "max_s": 300})


def request_held():
    return sim("GET", "/_sim/faults")["held"] > 0


def sampled_call(conn, call, api_key, held):
    """Run call(conn) in a thread; sample every backend's pg_stat_activity from a
    second connection until it returns.  With held, the validation request is held
    until WAIT_SAMPLES samples caught the caller inside the wait, then released.
    Returns the result (or exception), the samples taken in the wait, how many of
    those and of the one taken after the call showed the key, and how many samples
    showed it at all (those before the call reached ironwod_connect included)."""
    pid = conn.info.backend_pid
    out = {}

    def run():
        try:
            out["result"] = call(conn)
        except Exception as e:  # noqa: BLE001 - the caller inspects it
            out["result"] = e
    if held:
        hold_validation(api_key)
    t = threading.Thread(target=run)
    in_wait = shown = shown_any = 0
    released = not held
    with su() as s:
        t.start()
        while t.is_alive():
            sample = s.execute("SELECT pid, query, state, wait_event_type FROM pg_stat_activity").fetchall()
            waiting = any(p == pid and state == "active" and wtype == "Extension" for p, _, state, wtype in sample)
            showing = any(query and api_key in query for _, query, _, _ in sample)
            in_wait += waiting
            shown += waiting and showing
            shown_any += showing
            if not released and in_wait >= WAIT_SAMPLES and request_held():
                sim("POST", "/_sim/release", {})
                released = True
        t.join()
        if not released:
            sim("POST", "/_sim/release", {})
        # and afterwards: an idle (or aborted) session shows its last statement
        last = s.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]
        if api_key in (last or ""):
            shown += 1
            shown_any += 1
    sim("DELETE", "/_sim/faults")
    return out.get("result"), in_wait, shown, shown_any


def stored_statements(api_key):
    return [r[0] for r in rows("SELECT query FROM pg_stat_statements WHERE position(%s IN query) > 0", (api_key,))]


def literal(value):
    """A SQL literal: '...' for text, '\\x..'::bytea for bytes."""
    if isinstance(value, bytes):
        return "'\\x" + value.hex() + "'::bytea"
    return "'" + value.replace("'", "''") + "'"


def call_paths(key):
    """The documented ways a host app calls ironwod_connect, each given the key
    value (sealed bytes or plaintext text); each returns the call's result."""
    t, g = (str(x) for x in C)
    typ = "bytea" if isinstance(key, bytes) else "text"
    fn = f"public.iw_sec_connect_{typ}"

    def simple(conn):
        # psycopg sends a statement without parameters as a simple Query message
        conn.execute(f"SELECT ironwod_set_scope('{t}', '{g}')")
        return conn.execute(f"SELECT ironwod_connect('{t}', '{g}', {literal(key)})").fetchone()[0]

    def extended(conn):
        conn.execute("SELECT ironwod_set_scope(%s, %s)", C)
        return conn.execute("SELECT ironwod_connect(%s, %s, %s)", (*C, key)).fetchone()[0]

    def prepared(conn):
        conn.execute(f"SELECT ironwod_set_scope('{t}', '{g}')")
        # (never deallocated: the session ends with the path, and a statement after
        # the EXECUTE would stand in for it in pg_stat_activity)
        conn.execute(f"PREPARE iw_sec_p(uuid, uuid, {typ}) AS SELECT ironwod_connect($1, $2, $3)")
        return conn.execute(f"EXECUTE iw_sec_p('{t}', '{g}', {literal(key)})").fetchone()[0]

    def do_block(conn):
        conn.execute(f"DO $$ BEGIN PERFORM ironwod_set_scope('{t}', '{g}'); "
                     f"PERFORM ironwod_connect('{t}', '{g}', {literal(key)}); END $$")
        return "connected"

    def function(conn):
        return conn.execute(f"SELECT {fn}('{t}', '{g}', {literal(key)})").fetchone()[0]

    return [("simple protocol", simple), ("extended protocol, bind parameters", extended),
            ("PREPARE/EXECUTE", prepared), ("inside DO", do_block), ("inside a function", function)]


def stats_scenario():
    canary = sim_key(0)
    with su() as c:
        for typ in ("bytea", "text"):
            c.execute(f"""CREATE OR REPLACE FUNCTION public.iw_sec_connect_{typ}(t uuid, g uuid, k {typ})
                          RETURNS text LANGUAGE plpgsql AS $$
                          BEGIN PERFORM ironwod_set_scope(t, g); RETURN ironwod_connect(t, g, k); END $$""")
            c.execute(f"GRANT EXECUTE ON FUNCTION public.iw_sec_connect_{typ}(uuid, uuid, {typ}) TO {APP}")
        # Only validations may reach the simulator with the canary key (they take the
        # held request): the backfills the connects queue wait.
        c.execute("ALTER SYSTEM SET ironwod.enabled = off")
        c.execute("SELECT pg_reload_conf()")
    wait_until("ironwod.enabled off", lambda: rows("SELECT current_setting('ironwod.enabled')")[0][0] == "off")

    def each(key, plaintext_on, expect_ok):
        with su() as c:
            c.execute(f"ALTER ROLE {APP} {'SET ironwod.allow_plaintext_keys = on' if plaintext_on else 'RESET ironwod.allow_plaintext_keys'}")
        for name, call in call_paths(key):
            rows("SELECT pg_stat_statements_reset()")
            with psycopg.connect(user=APP, autocommit=not expect_ok) as conn:
                result, in_wait, shown, shown_any = sampled_call(conn, call, canary, held=expect_ok)
                if expect_ok and not isinstance(result, Exception):
                    conn.commit()
            yield name, result, in_wait, shown, shown_any, stored_statements(canary)

    for name, result, in_wait, _, shown_any, stored in each(sealed(C, canary), False, True):
        check(result == "connected" and in_wait >= WAIT_SAMPLES and shown_any == 0 and not stored,
              f"sealed key, {name}: connected; in no pg_stat_activity row before, during the wait "
              f"({in_wait} samples) or after, nor in pg_stat_statements",
              f"{result!r} in_wait={in_wait} shown={shown_any} stored={stored}")

    # A plaintext key is in the statement text from the statement's start until
    # ironwod_connect hides it (README, Security): the text paths are checked from
    # the gate on, during the wait and after.
    for name, result, in_wait, shown, _, stored in each(canary, False, False):
        refused = (isinstance(result, errors.FeatureNotSupported)
                   and "ironwod_connect(tenant, gym, sealed bytea)" in (result.diag.message_hint or ""))
        check(refused and shown == 0 and not stored,
              f"text key, plaintext off, {name}: refused (0A000, hint names the sealed path); the idle "
              f"session's pg_stat_activity hides the statement; nothing in pg_stat_statements",
              f"{result!r} shown={shown} stored={stored}")

    # pg_stat_statements stores a DO block's text as it came; an EXECUTE it charges
    # to the PREPARE (whose text has only $n), and other statements it normalizes.
    verbatim = {"inside DO": "DO"}
    for name, result, in_wait, shown, _, stored in each(canary, True, True):
        want = verbatim.get(name)
        as_documented = (all(q.lstrip().upper().startswith(want) for q in stored) and len(stored) == 1
                         if want else not stored)
        check(result == "connected" and in_wait >= WAIT_SAMPLES and shown == 0 and as_documented,
              f"text key, plaintext on, {name}: connected; in no pg_stat_activity row during the wait "
              f"({in_wait} samples) or after; pg_stat_statements "
              + (f"stores it only in the {want} statement, as documented" if want else "does not have it"),
              f"{result!r} in_wait={in_wait} shown={shown} stored={stored}")

    with su() as c:
        c.execute(f"ALTER ROLE {APP} RESET ironwod.allow_plaintext_keys")
        with c.transaction():
            c.execute("SELECT ironwod_set_scope(%s, %s)", C)
            c.execute("SELECT ironwod_disconnect(%s, %s)", C)
        c.execute("ALTER SYSTEM RESET ironwod.enabled")
        c.execute("SELECT pg_reload_conf()")
        for typ in ("bytea", "text"):
            c.execute(f"DROP FUNCTION public.iw_sec_connect_{typ}(uuid, uuid, {typ})")
    wait_until("ironwod.enabled on", lambda: rows("SELECT current_setting('ironwod.enabled')")[0][0] == "on")


# ---- 3. pg_hba.conf ------------------------------------------------------------------------

def hba_scenario():
    try:
        psycopg.connect(user="ironwod_worker").close()
        worker = "logged in"
    except psycopg.OperationalError as e:
        worker = str(e)
    try:
        psycopg.connect(user=NOBODY).close()
        other = "logged in"
    except psycopg.OperationalError as e:
        other = str(e)
    check('pg_hba.conf rejects connection for host "[local]", user "ironwod_worker"' in worker
          and other == "logged in",
          "a local login as ironwod_worker is rejected by pg_hba.conf; another role without a password logs in",
          f"ironwod_worker: {worker}\n{NOBODY}: {other}")


# ---- 4. a run worker that serves several runs ----------------------------------------------

D = (uuid.UUID("d4d4d4d4-d4d4-d4d4-d4d4-d4d4d4d4d4d4"), uuid.UUID("d4d4d4d4-0000-0000-0000-000000000001"))
E = (uuid.UUID("e5e5e5e5-e5e5-e5e5-e5e5-e5e5e5e5e5e5"), uuid.UUID("e5e5e5e5-0000-0000-0000-000000000001"))
F = (uuid.UUID("f6f6f6f6-f6f6-f6f6-f6f6-f6f6f6f6f6f6"), uuid.UUID("f6f6f6f6-0000-0000-0000-000000000001"))
CANONICAL = ("locations", "programs", "members", "memberships", "membership_holds", "attendance_events",
             "invoices", "transactions")


def set_gucs(**settings):
    """ALTER SYSTEM each setting (None: reset), reload, and wait until a new session
    sees them all, so the postmaster (and, through SIGHUP, every worker) has them."""
    with su() as c:
        for name, value in settings.items():
            name = "ironwod." + name
            if value is None:
                c.execute(f"ALTER SYSTEM RESET {name}")
            else:
                c.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        c.execute("SELECT pg_reload_conf()")

    def seen():
        with su() as c:
            for name, value in settings.items():
                now = c.execute("SELECT setting, boot_val FROM pg_settings WHERE name = %s",
                                ("ironwod." + name,)).fetchone()
                if now[0] != (now[1] if value is None else str(value)):
                    return False
        return True
    wait_until(f"settings {settings}", seen)


def run_workers():
    return rows("SELECT pid FROM pg_stat_activity WHERE backend_type = 'ironwod run'")


def scoped_one(gym, sql, params=None):
    with su() as c:
        with c.transaction():
            c.execute("SELECT ironwod_set_scope(%s, %s)", gym)
            return c.execute(sql, params).fetchone()


def connect_gym(gym, api_key):
    """Connect (sealed) and return the backfill's run id without waiting for it."""
    scoped_one(gym, "SELECT ironwod_connect(%s, %s, %s)", (*gym, sealed(gym, api_key)))
    return scoped_one(gym, "SELECT run_id FROM ironwod.sync_runs WHERE tenant_id = %s AND gym_id = %s "
                           "AND mode = 'backfill' ORDER BY run_id DESC LIMIT 1", gym)[0]


def sync_gym(gym):
    return scoped_one(gym, "SELECT ironwod_sync(%s, %s)", gym)[0]


def wait_run(gym, run):
    return scoped_one(gym, "SELECT ironwod_wait(%s, '10 minutes')", (run,))[0]


def run_row(run):
    return rows("SELECT status, worker_pid, coalesce(error_code, '') FROM ironwod.sync_runs WHERE run_id = %s",
                (run,))[0]


def foreign_rows(gym, run):
    """Rows that run wrote (as the superuser, past RLS) naming another tenant or gym:
    raw versions it stored or saw, its units, entity counters and events."""
    raw = [r[0] for r in rows("SELECT raw_table FROM ironwod.entities ORDER BY ordinal")]
    parts = [f"SELECT '{t}', tenant_id, gym_id FROM ironwod.{t} WHERE ingest_run_id = %(run)s "
             f"OR last_seen_run_id = %(run)s" for t in raw]
    parts += [f"SELECT '{t}', tenant_id, gym_id FROM ironwod.{t} WHERE run_id = %(run)s"
              for t in ("run_units", "sync_run_entities", "sync_events", "sync_runs")]
    sql = (f"SELECT x.t, count(*) FILTER (WHERE (x.tenant_id, x.gym_id) <> (%(t)s, %(g)s)), count(*) "
           f"FROM ({' UNION ALL '.join(parts)}) x(t, tenant_id, gym_id) GROUP BY x.t")
    found = rows(sql, {"run": run, "t": gym[0], "g": gym[1]})
    return sum(r[1] for r in found), sum(r[2] for r in found)


def canonical_rows(gym):
    """Every canonical row of the gym, without the columns naming the tenant or a raw/run id."""
    union = " UNION ALL ".join(
        f"SELECT '{t}:' || (to_jsonb(x) - 'tenant_id' - 'gym_id' - 'raw_id' - 'deleted_by_run')::text "
        f"FROM ironwod.{t} x WHERE x.tenant_id = %(t)s AND x.gym_id = %(g)s" for t in CANONICAL)
    return {r[0] for r in rows(union, {"t": gym[0], "g": gym[1]})}


def server_log_from():
    return rows("SELECT (pg_stat_file('server.log')).size")[0][0]


def server_log_since(offset):
    size = server_log_from()
    if size <= offset:
        return ""
    data = rows("SELECT pg_read_binary_file('server.log', %s, %s)", (offset, size - offset))[0][0]
    return bytes(data).decode("utf-8", "replace")


def hold_run(api_key):
    """Hold the next request of a run for this key at /programs, a list every run pulls
    and the key's validation does not; returns the hold's id, to release it alone."""
    return sim("POST", "/_sim/holds", {"api_key": api_key, "endpoint": "/programs", "max_s": 300})["id"]


def release(hold):
    sim("POST", "/_sim/release", {"id": hold})


def process_title(pid):
    """The worker's process title (ps): the server runs on this host."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode("utf-8", "replace").rstrip()
    except OSError:
        return None


def worker_shows(pid, app, title):
    """Wait until run worker pid shows app as its application_name, read by the role with
    nothing but CONNECT (PostgreSQL shows every role the column), and title in ps.  The
    bound is for a broken worker, not a pace."""
    seen = {}
    with psycopg.connect(user=NOBODY, autocommit=True) as nobody:
        def shows():
            got = nobody.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s",
                                 (pid,)).fetchone()
            seen.update(app=got and got[0], title=process_title(pid))
            # "postgres: " (and cluster_name, if set) before the worker's own title
            return seen["app"] == app and (seen["title"] or "").endswith(": " + title)
        try:
            wait_until(f"worker {pid} to show {app!r}", shows, 60)
            return True, seen
        except RuntimeError:
            return False, seen


def serving(run, gym, hold, name):
    """Check that the worker serving run, held at hold, shows that run: application_name
    the run only (no tenant or gym: any role reads it), the process title the run, its
    tenant and gym.  Then release the hold."""
    ok, seen = False, {}
    try:
        wait_until(f"run {name} to be held", lambda: run_row(run)[1] and request_held())
        ok, seen = worker_shows(run_row(run)[1], f"ironwod run worker: run {run}",
                                f"ironwod run worker: run {run} tenant {gym[0]} gym {gym[1]}")
    except RuntimeError as e:
        seen = {"error": str(e)}
    finally:
        release(hold)
    check(ok, f"while run {name} is held, its worker shows it: application_name the run only, "
              f"the process title the run, tenant and gym", seen)


def idle(pid, after):
    ok, seen = worker_shows(pid, "ironwod run worker: idle", "ironwod run worker: idle")
    check(ok, f"after {after}, its worker shows idle (application_name and process title)", seen)


def reuse_scenario():
    key_d, key_e = sim_key(1), sim_key(2)
    log_from = server_log_from()

    # One process per run: no worker lingers, so each of F's runs has its own.
    set_gucs(max_workers=1, worker_idle_timeout=0)
    wait_until("no run worker alive", lambda: not run_workers())
    f_backfill = connect_gym(F, key_e)
    f_first = wait_run(F, f_backfill)
    f_inc = sync_gym(F)
    f_second = wait_run(F, f_inc)
    pid_fb, pid_fi = run_row(f_backfill)[1], run_row(f_inc)[1]
    check(f_first == "succeeded" and f_second == "succeeded" and pid_fb and pid_fi and pid_fb != pid_fi,
          "ironwod.worker_idle_timeout = 0: a backfill and the incremental after it are served by two processes",
          f"{f_first} {f_second}, pids {pid_fb} {pid_fi}")
    reference = canonical_rows(F)

    # One worker, lingering: D's backfill, then E's (queued after D's), by one pid.
    # Each run is held at a request until its worker was seen serving it; E's hold is
    # set before D's is released, and released alone.
    set_gucs(max_workers=1, worker_idle_timeout=600)
    wait_until("no run worker alive", lambda: not run_workers())
    hold_d = hold_run(key_d)
    d_run = connect_gym(D, key_d)
    e_run = connect_gym(E, key_e)
    hold_e = hold_run(key_e)
    try:
        serving(d_run, D, hold_d, "D (backfill, the worker's first run)")
        serving(e_run, E, hold_e, "E (backfill, the same worker's next run)")
    finally:
        sim("POST", "/_sim/release")
    d_out, e_out = wait_run(D, d_run), wait_run(E, e_run)
    d_row, e_row = run_row(d_run), run_row(e_run)
    check(d_out == "succeeded" and e_out == "succeeded" and d_row[1] and d_row[1] == e_row[1],
          "max_workers = 1 with a linger: two tenants' backfills, queued one after the other, "
          "are served by one worker pid",
          f"D {d_out} pid {d_row[1]}, E {e_out} pid {e_row[1]}")
    idle(d_row[1], "E's backfill")
    for gym, run, name in ((D, d_run, "D"), (E, e_run, "E")):
        foreign, total = foreign_rows(gym, run)
        check(total > 0 and foreign == 0,
              f"every row run {name} wrote carries its own tenant and gym", f"{foreign} of {total} rows name another")
    mine = canonical_rows(E)
    check(mine and mine == reference,
          "the second run of the worker sees none of the first's data: E's canonical rows equal "
          "a fresh worker's backfill of the same gym",
          f"{len(reference - mine)} missing, {len(mine - reference)} extra")
    hold_d = hold_run(key_d)
    d_inc = sync_gym(D)
    try:
        serving(d_inc, D, hold_d, "D (incremental, the same worker's third run)")
    finally:
        sim("POST", "/_sim/release")
    d_inc_out = wait_run(D, d_inc)
    check(d_inc_out == "succeeded" and run_row(d_inc)[1] == d_row[1],
          "the same worker serves D's incremental run after E's backfill",
          f"{d_inc_out} pid {run_row(d_inc)[1]} (worker {d_row[1]})")
    idle(d_row[1], "D's incremental run")

    # A kill of the reused worker in a later run: reaped as today.
    worker = d_row[1]
    sim("POST", "/_sim/holds", {"api_key": key_e, "endpoint": "/customers/locations", "max_s": 300})
    try:
        e_inc = sync_gym(E)
        wait_until("E's incremental to be held", request_held)
        running = rows("SELECT pid FROM ironwod.worker_status() WHERE run_id = %s", (e_inc,))
        killed = rows("SELECT pg_terminate_backend(%s)", (worker,))[0][0] if running == [(worker,)] else False
        e_killed = wait_run(E, e_inc)
    finally:
        sim("POST", "/_sim/release")
    status, _, code = run_row(e_inc)
    check(killed and e_killed == "failed" and code == "worker_lost",
          "a kill of the reused worker during a later run: the run is failed (worker_lost), as for a new worker",
          f"worker {worker}, in the run {running}, killed {killed}: {e_killed} {code}")
    e_again = sync_gym(E)
    e_again_out = wait_run(E, e_again)
    check(e_again_out == "succeeded" and run_row(e_again)[1] != worker,
          "after the kill the gym syncs again, in a new worker", f"{e_again_out} pid {run_row(e_again)[1]}")

    log = server_log_since(log_from)
    check(log and key_d not in log and key_e not in log, "neither tenant's key is in the server log",
          "a key is in the log")
    set_gucs(max_workers=None, worker_idle_timeout=None)
    for gym in (D, E, F):
        with su() as c:
            with c.transaction():
                c.execute("SELECT ironwod_set_scope(%s, %s)", gym)
                c.execute("SELECT ironwod_disconnect(%s, %s)", gym)


def main():
    setup_roles()
    hba_scenario()
    notify_scenario()
    stats_scenario()
    reuse_scenario()
    failed = results.count(False)
    print(f"1..{len(results)}")
    print(f"# {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
