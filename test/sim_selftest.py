#!/usr/bin/env python3
"""Self-check for test/wodify_sim.py (standard library only).

    python3 test/sim_selftest.py            # exits non-zero on any failure

Starts simulators on free ports, backfills every gym the way the ironwod connector does,
compares landed counts with /_sim/gyms "expected", and exercises errors, throttling,
quota, faults, entitlements, advance and determinism.
"""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import date, datetime, timedelta

HERE = os.path.dirname(os.path.abspath(__file__))
SIM = os.path.join(HERE, "wodify_sim.py")
TODAY = "2026-11-10"
PASSED, FAILED = [], []


def check(name, cond, detail=""):
    (PASSED if cond else FAILED).append(name)
    if not cond:
        print(f"FAIL {name} {detail}", flush=True)


class Sim:
    def __init__(self, *extra):
        args = [sys.executable, SIM, "--port", "0", "--seed", "42", "--gyms", "3",
                "--scale", "small", "--today", TODAY, *extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        assert line.startswith("listening on "), line
        self.port = int(line.split()[-1])
        self.base = f"http://127.0.0.1:{self.port}"
        self.gyms = self.sim("GET", "/_sim/gyms")

    def raw(self, method, path, key=None, body=None, headers=None):
        """Returns (status, headers, body bytes); connection errors raise."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        h = dict(headers or {})
        if key:
            h["x-api-key"] = key
        data = json.dumps(body).encode() if body is not None else None
        if data:
            h["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        out = resp.read()
        conn.close()
        return resp.status, dict(resp.getheaders()), out

    def get(self, path, key):
        st, hd, b = self.raw("GET", path, key)
        return st, json.loads(b), hd

    def sim(self, method, path, body=None):
        st, _, b = self.raw(method, path, body=body)
        assert st == 200, (path, st, b)
        return json.loads(b)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=120)   # a bound for a stuck simulator, not a pace
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = -9
        err = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return rc, err


def q(expr):
    return urllib.parse.quote(expr, safe="")


def month_windows(since, today):
    """Half-open UTC month windows [A, B) from since to the month after today."""
    d = since
    end = date(today.year + (today.month == 12), today.month % 12 + 1, 1)
    out = []
    while d < end:
        nxt = date(d.year + (d.month == 12), d.month % 12 + 1, 1)
        out.append((d, nxt))
        d = nxt
    return out


def z(d):
    return d.strftime("%Y-%m-%dT00:00:00Z")


def walk_nulls(obj, where, problems):
    if obj is None:
        problems.append(where)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            walk_nulls(v, f"{where}.{k}", problems)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            walk_nulls(v, f"{where}[{i}]", problems)


def backfill(sim, gym):
    """Pull everything the connector's backfill pulls; returns (records by entity, requests)."""
    key = gym["api_key"]
    n = [0]
    land = {}

    def pages(path, rkey, sep="?"):
        rows, page = [], 1
        while True:
            st, body, _ = sim.get(f"{path}{sep}page={page}&page_size=100", key)
            n[0] += 1
            assert st == 200 and rkey in body and "HTTPCode" not in body, (path, st, body)
            assert body["pagination"]["page"] == page
            rows += body[rkey]
            if not body["pagination"]["has_more"]:
                return rows
            page += 1

    land["locations"] = pages("/customers/locations", "locations")
    land["programs"] = pages("/programs", "programs")
    land["clients"] = pages("/clients?sort=id", "clients", "&")
    land["memberships"] = pages("/memberships?sort=id", "memberships", "&")
    land["membership_holds"] = pages("/memberships/holds?sort=id", "membership_holds", "&")
    since_s = gym["backfill_since"]
    sis = []
    for c in land["clients"]:
        if c["last_class_sign_in"] >= since_s:
            sis += pages(f"/clients/{c['id']}/classes/sign-ins/search?q="
                         + q(f"utc_class_start_datetime|gte|{since_s}") + "&sort=id", "class_sign_ins", "&")
    land["class_signins"] = sis
    since = date.fromisoformat(since_s[:10])
    today = date.fromisoformat(TODAY)
    invs, txns = [], []
    for a, b in reversed(month_windows(since, today)):      # newest window first
        invs += pages("/financials/invoices/search?q=" + q(f"created_on_datetime|gte|{z(a)};created_on_datetime|lt|{z(b)}")
                      + "&sort=desc_created_on_datetime", "invoices", "&")
    for a, b in reversed(month_windows(since, today)):
        txns += pages("/financials/transactions/search?q=" + q(f"transaction_date_time|gte|{z(a)};transaction_date_time|lt|{z(b)}")
                      + "&sort=transaction_date_time", "transactions", "&")
    land["invoices"], land["transactions"] = invs, txns
    due = (today - timedelta(days=60)).isoformat()
    land["due_window"] = pages("/financials/invoices/search?q=" + q(f"payment_due|gte|{due}") + "&sort=id", "invoices", "&")
    return land, n[0]


def test_backfill(sim):
    total_requests = 0
    t0 = time.time()
    for gym in sim.gyms["gyms"]:
        land, nreq = backfill(sim, gym)
        total_requests += nreq
        exp = gym["expected"]
        for ent in exp:
            ids = [r["id"] for r in land[ent]]
            check(f"gym{gym['index']} {ent} count", len(set(ids)) == exp[ent] == len(ids),
                  f"landed {len(ids)} unique {len(set(ids))} expected {exp[ent]}")
        check(f"gym{gym['index']} requests < 200", nreq < 200, f"{nreq}")
        problems = []
        for ent, rows in land.items():
            walk_nulls(rows, ent, problems)
            if rows:
                keysets = {tuple(sorted(r)) for r in rows}
                check(f"gym{gym['index']} {ent} uniform keys", len(keysets) == 1)
        check(f"gym{gym['index']} no nulls", not problems, str(problems[:3]))
        # id magnitudes (wodify-api.md §3)
        digits = lambda rows: {len(str(r["id"])) for r in rows}
        check("client ids 7-8 digits", digits(land["clients"]) <= {7, 8}, str(digits(land["clients"])))
        check("membership ids 8 digits", digits(land["memberships"]) == {8})
        check("invoice ids 8 digits", digits(land["invoices"]) == {8})
        check("sign-in ids 9 digits", digits(land["class_signins"]) == {9})
        check("location ids 4-5 digits", digits(land["locations"]) <= {4, 5})
        check("program ids 5 digits", digits(land["programs"]) == {5})
        # time zone on the first location by id
        first = min(land["locations"], key=lambda l: l["id"])
        check("first location time zone", first["time_zone_iana"] == gym["time_zone"])
        check("location_ids", sorted(gym["location_ids"]) == sorted(l["id"] for l in land["locations"]))
        # invoice window order: desc by created, ties by id
        # detectors consistent with sign-ins
        by_client = {}
        for s in land["class_signins"]:
            by_client.setdefault(s["client_id"], []).append(s)
        bad = 0
        for c in land["clients"]:
            got = by_client.get(c["id"], [])
            if got and max(s["utc_class_start_datetime"] for s in got) != c["last_class_sign_in"]:
                bad += 1
        check(f"gym{gym['index']} last_class_sign_in matches", bad == 0, f"{bad} mismatches")
        # total_class_sign_ins vs full history for a few clients
        for c in land["clients"][:6]:
            st, body, _ = sim.get(f"/clients/{c['id']}/classes/sign-ins?sort=id&page_size=100", gym["api_key"])
            rows = body["class_sign_ins"]
            page = 1
            while body["pagination"]["has_more"]:
                page += 1
                st, body, _ = sim.get(f"/clients/{c['id']}/classes/sign-ins?sort=id&page={page}", gym["api_key"])
                rows += body["class_sign_ins"]
            check("total_class_sign_ins consistent", len(rows) == c["total_class_sign_ins"]
                  and all(r["client_id"] == c["id"] for r in rows))
        # realism: vocabularies and stories appear
        statuses = {i["invoice_header_status"] for i in land["invoices"]}
        types = {t["transaction_type"] for t in land["transactions"]}
        check(f"gym{gym['index']} invoice statuses", statuses >= {"Paid", "Unpaid", "Voided", "Refunded"}
              or statuses >= {"Paid", "Voided", "Refunded"}, str(statuses))
        check(f"gym{gym['index']} transaction types", types == {"Payment", "Failed Payment", "Refund"}, str(types))
        check("client statuses", {c["client_status"] for c in land["clients"]} == {"Active", "Inactive"})
        check("cancellations", any(m["cancellation_requested_on"] != "1900-01-01" for m in land["memberships"]))
        check("open-ended memberships", any(m["end_date"] == "1900-01-01" for m in land["memberships"]))
        mems = {}
        for m in land["memberships"]:
            mems.setdefault(m["client_id"], []).append(m)
        switches = reacts = 0
        for ms in mems.values():
            ms.sort(key=lambda m: m["start_date"])
            for a, b in zip(ms, ms[1:]):
                if a["end_date"] == "1900-01-01":
                    continue
                gap = (date.fromisoformat(b["start_date"]) - date.fromisoformat(a["end_date"])).days
                switches += gap == 1
                reacts += gap > 7
        check("plan switches", switches > 0)
        check("reactivations", reacts > 0 or gym["index"] > 0)
        late_inv = sum(1 for i in land["invoices"] if i["updated"]["updated_on_datetime"][:10] >
                       (datetime.fromisoformat(i["created"]["created_on_datetime"][:19]) + timedelta(days=15)).date().isoformat())
        check(f"gym{gym['index']} late invoice edits", late_inv > 0)
        late_cli = sum(1 for c in land["clients"] if c["updated"]["updated_on_datetime"] > c["created_on"]["created_on_datetime"])
        check("late client edits", late_cli > 0)
        for i in land["invoices"]:
            if i["membership_id"]:
                check_member = any(m["id"] == i["membership_id"] for m in land["memberships"])
                if not check_member:
                    check("invoice membership exists", False, str(i["id"]))
                    break
        check("holds reference memberships", all(any(m["id"] == h["membership_id"] for m in land["memberships"])
                                                  for h in land["membership_holds"]))
        check("due window query", all(i["payment_due"] >= (date.fromisoformat(TODAY) - timedelta(days=60)).isoformat()
                                      for i in land["due_window"]) and land["due_window"])
    el = time.time() - t0
    print(f"backfill of {len(sim.gyms['gyms'])} gyms: {total_requests} requests ({el:.1f}s, unthrottled)")
    return total_requests


def test_errors(sim):
    g = sim.gyms["gyms"][0]
    key = g["api_key"]
    st, b, _ = sim.get("/nope", key)
    check("unknown route 403", st == 403 and b == {"message": "Missing Authentication Token"})
    st, b, _ = sim.get("/clients/1/signins", key)
    check("non-route 403", st == 403)
    st, b, _ = sim.get("/clients", None)
    check("missing key 403", st == 403 and b == {"message": "Forbidden"})
    st, b, _ = sim.get("/clients", "wdfy_wrong")
    check("wrong key 403", st == 403 and b == {"message": "Forbidden"})
    st, _, _ = sim.raw("GET", "/clients", headers={"X-API-KEY": key})
    check("header name case-insensitive", st == 200)
    st, b, _ = sim.get(f"/clients?api_key={key}", key)
    check("key in URL 400", st == 400)
    st, b, _ = sim.get("/clients/signins", key)
    check("bad id envelope", st == 200 and b.get("HTTPCode") == 404 and "MoreInfo" in b)
    st, b, _ = sim.get("/clients/123", key)
    check("unknown id envelope", st == 200 and b.get("HTTPCode") == 404)
    st, b, _ = sim.get("/clients?sort=id", key)
    cid = b["clients"][0]["id"]
    st, one, _ = sim.get(f"/clients/{cid}", key)
    check("single client bare object", st == 200 and one["id"] == cid and "created" in one and "status_history" in one)
    st, b, _ = sim.get("/clients/search?q=" + q("nosuchfield|eq|1"), key)
    check("unknown field 400 envelope", st == 200 and b.get("HTTPCode") == 400)
    st, b, _ = sim.get("/clients/search?q=" + q("id|zz|1"), key)
    check("bad op 400 envelope", st == 200 and b.get("HTTPCode") == 400)
    st, b, _ = sim.get("/financials/invoices/search?q=" + q("created_on_datetime|gte|'2025-01-01'"), key)
    check("quoted datetime rejected", st == 200 and b.get("HTTPCode") == 400)
    st, b, _ = sim.get("/clients/search?q=" + q("client_status|eq|'Active';") + "&sort=desc_id", key)
    ids = [c["id"] for c in b["clients"]]
    check("trailing ; and desc sort", st == 200 and ids == sorted(ids, reverse=True)
          and all(c["client_status"] == "Active" for c in b["clients"]))
    st, b, _ = sim.get("/clients/search?q=" + q("client_status|in|{'Active','Inactive'};first_name|starts_with|'a'"), key)
    check("in + starts_with", st == 200 and all(c["first_name"].lower().startswith("a") for c in b["clients"]))
    st, b, _ = sim.get("/memberships/search?q=" + q("start_date|between|2025-01-01|2025-06-30;end_date|not_null"), key)
    check("between + not_null", st == 200 and all("2025-01-01" <= m["start_date"] <= "2025-06-30"
                                                  and m["end_date"] != "1900-01-01" for m in b["memberships"]))
    st, b, _ = sim.get("/memberships/search?q=" + q("payment_plan|eq|1"), key)
    check("object field rejected", b.get("HTTPCode") == 400)
    st, b, _ = sim.get("/memberships/search?q=" + q("price|gte|100") + "&sort=desc_price&page_size=500", key)
    check("nested leaf search + page_size cap", st == 200 and b["pagination"]["page_size"] == 100
          and all(m["payment_plan"]["price"] >= 100 for m in b["memberships"]))
    st, b, _ = sim.get("/financials/invoices?sort=desc_created_on_datetime&page_size=5", key)
    cs = [i["created"]["created_on_datetime"] for i in b["invoices"]]
    check("desc created sort", len(cs) == 5 and cs == sorted(cs, reverse=True))
    st, b, _ = sim.get("/customers/employees", key)
    check("Employees key", st == 200 and b["Employees"] and "pagination" in b)
    st, b, _ = sim.get("/programs?page=1&page_size=1", key)
    check("validation alt call", st == 200 and len(b["programs"]) == 1 and b["pagination"]["has_more"])
    st, b, _ = sim.get("/clients?status=Active&limit=3", key)
    check("unknown params ignored", st == 200 and len(b["clients"]) == g["expected"]["clients"])


def wait_held(sim, n):
    """Whether the simulator holds n requests, polled until it does (the 60 s bound is
    for a broken simulator, not a pace)."""
    deadline = time.time() + 60
    while sim.sim("GET", "/_sim/faults")["held"] != n and time.time() < deadline:
        time.sleep(0.01)
    return sim.sim("GET", "/_sim/faults")["held"] == n


def test_faults_and_stats(sim):
    g = sim.gyms["gyms"][1]
    key = g["api_key"]
    sim.sim("POST", "/_sim/stats/reset")
    fid = sim.sim("POST", "/_sim/faults", {"endpoint": "/programs", "kind": "status", "status": 503, "count": 2})["id"]
    codes = [sim.raw("GET", "/programs", key)[0] for _ in range(3)]
    check("status fault x2", codes == [503, 503, 200], str(codes))
    lst = sim.sim("GET", "/_sim/faults")["faults"]
    check("faults listed", any(f["id"] == fid and f["remaining"] == 0 for f in lst))
    sim.sim("POST", "/_sim/faults", {"api_key": key, "endpoint": "/clients", "kind": "throttle", "retry_after": 7})
    st, hd, b = sim.raw("GET", "/clients", key)
    check("throttle fault + Retry-After", st == 429 and hd.get("Retry-After") == "7"
          and json.loads(b) == {"message": "Too Many Requests"})
    sim.sim("POST", "/_sim/faults", {"endpoint": "/clients", "kind": "quota"})
    st, hd, b = sim.raw("GET", "/clients", key)
    check("quota fault", st == 429 and json.loads(b) == {"message": "Limit Exceeded"})
    sim.sim("POST", "/_sim/faults", {"endpoint": "/memberships", "kind": "envelope", "http_code": 500})
    st, hd, b = sim.raw("GET", "/memberships", key)
    check("envelope fault", st == 200 and json.loads(b)["HTTPCode"] == 500)
    sim.sim("POST", "/_sim/faults", {"endpoint": "/memberships", "kind": "slow", "delay_s": 0.5})
    t = time.time()
    st, hd, b = sim.raw("GET", "/memberships", key)
    check("slow fault", st == 200 and time.time() - t >= 0.45 and "memberships" in json.loads(b))
    sim.sim("POST", "/_sim/faults", {"endpoint": "/memberships", "kind": "slow", "delay_s": 0.3, "trickle": True})
    st, hd, b = sim.raw("GET", "/memberships", key)
    check("trickle fault", st == 200 and "memberships" in json.loads(b))
    sim.sim("POST", "/_sim/faults", {"endpoint": "/memberships", "kind": "truncate"})
    try:
        sim.raw("GET", "/memberships", key)
        check("truncate fault", False, "no error")
    except http.client.IncompleteRead:
        check("truncate fault", True)
    sim.sim("POST", "/_sim/faults", {"endpoint": "/memberships", "kind": "reset"})
    try:
        sim.raw("GET", "/memberships", key)
        check("reset fault", False, "no error")
    except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
        check("reset fault", True)
    st, _, _ = sim.raw("GET", "/memberships", key)
    check("served after faults", st == 200)
    sim.sim("POST", "/_sim/faults", {"endpoint": "/programs", "kind": "status", "status": 500, "count": 5})
    sim.sim("DELETE", "/_sim/faults")
    check("faults cleared", sim.raw("GET", "/programs", key)[0] == 200 and not sim.sim("GET", "/_sim/faults")["faults"])
    # Poison: chosen records rewritten into what PostgreSQL cannot store, the rest as served.
    clean = sim.raw("GET", "/memberships", key)[2]
    ids = [m["id"] for m in json.loads(clean)["memberships"][:3]]
    bad = sim.raw("POST", "/_sim/faults", body={"endpoint": "/memberships", "kind": "poison", "records": [{"x": 1}]})
    check("poison fault needs ids", bad[0] == 400 and not sim.sim("GET", "/_sim/faults")["faults"])
    sim.sim("POST", "/_sim/faults", {"endpoint": "/memberships", "kind": "poison", "count": 1,
                                     "records": [{"id": ids[0], "reason": "nul"}, {"id": ids[1], "reason": "invalid_utf8"},
                                                 {"id": ids[2], "reason": "no_id"}]})
    holds = sim.raw("GET", "/memberships/holds", key)[2]
    body = sim.raw("GET", "/memberships", key)[2]
    recs = json.loads(body.decode("utf-8", "replace"))["memberships"]
    check("poison fault", b"\\u0000" in body and b"\xff\xfe" in body and "id" not in recs[2]
          and recs[3:] == json.loads(clean)["memberships"][3:] and b"sim_note" not in holds, body[:300])
    check("poison fault gone: the vendor's fix", sim.raw("GET", "/memberships", key)[2] == clean)
    sim.sim("POST", "/_sim/faults", {"endpoint": "/memberships", "kind": "bloat", "pad_bytes": 100000, "max_records": 3})
    recs = json.loads(sim.raw("GET", "/memberships", key)[2])["memberships"]
    check("bloat fault", [len(r.get("sim_pad", "")) for r in recs[:4]] == [100000, 100000, 100000, 0])
    sim.sim("DELETE", "/_sim/faults")
    sim.sim("POST", "/_sim/entitlements", {"api_key": key, "endpoint_prefix": "/financials/transactions", "entitled": False})
    st, hd, b = sim.raw("GET", "/financials/transactions/search?q=" + q("transaction_date_time|gte|2026-01-01T00:00:00Z"), key)
    other = sim.raw("GET", "/financials/transactions", sim.gyms["gyms"][0]["api_key"])[0]
    check("entitlement 403 only for that key", st == 403 and json.loads(b) == {"message": "Forbidden"} and other == 200)
    sim.sim("POST", "/_sim/entitlements", {"api_key": key, "endpoint_prefix": "/financials/transactions", "entitled": True})
    check("entitlement restored", sim.raw("GET", "/financials/transactions", key)[0] == 200)
    stats = sim.sim("GET", "/_sim/stats")
    check("stats by endpoint", stats["by_endpoint"]["/programs"].get("503") == 2
          and stats["by_endpoint"]["/clients"].get("429") == 2 and stats["throttled_429"] == 1
          and stats["quota_429"] == 1 and stats["total"] >= 15, json.dumps(stats))
    sim.sim("POST", "/_sim/stats/reset")
    check("stats reset", sim.sim("GET", "/_sim/stats")["total"] == 0)
    # a held request is answered, normally, only once released
    sim.sim("POST", "/_sim/holds", {"api_key": key, "endpoint": "/programs"})
    out = {}
    t = threading.Thread(target=lambda: out.update(st=sim.raw("GET", "/programs", key)[0]))
    t.start()
    held = wait_held(sim, 1) and t.is_alive()
    sim.sim("POST", "/_sim/release")
    t.join(60)
    check("hold fault: held until released, then answered", held and out.get("st") == 200
          and sim.sim("GET", "/_sim/faults")["held"] == 0, str(out))
    sim.sim("DELETE", "/_sim/faults")
    # two holds, released one at a time by id
    first = sim.sim("POST", "/_sim/holds", {"api_key": key, "endpoint": "/programs"})["id"]
    second = sim.sim("POST", "/_sim/holds", {"api_key": key, "endpoint": "/programs"})["id"]
    outs = [{}, {}]
    threads = [threading.Thread(target=lambda o=o: o.update(st=sim.raw("GET", "/programs", key)[0])) for o in outs]
    threads[0].start()
    wait_held(sim, 1)
    threads[1].start()
    both = wait_held(sim, 2)
    sim.sim("POST", "/_sim/release", {"id": first})
    threads[0].join(60)
    one_left = sim.sim("GET", "/_sim/faults")["held"] == 1 and threads[1].is_alive() and outs[0].get("st") == 200
    sim.sim("POST", "/_sim/release", {"id": second})
    threads[1].join(60)
    check("hold faults released by id: only that hold's request goes", both and one_left
          and outs[1].get("st") == 200 and sim.sim("GET", "/_sim/faults")["held"] == 0, str(outs))
    sim.sim("DELETE", "/_sim/faults")
    # a second key for a gym, counted by key, and revoked
    extra = "wdfy_selftest_second_key_000001"
    sim.sim("POST", "/_sim/keys", {"gym": 1, "api_key": extra})
    st, _, b = sim.raw("GET", "/customers/locations", extra)
    mine = sim.raw("GET", "/customers/locations", key)[2]
    by_key = sim.sim("GET", "/_sim/stats")["by_key"]
    sim.sim("POST", "/_sim/keys", {"api_key": extra, "revoke": True})
    check("extra key: the gym's data, counted by key, then refused",
          st == 200 and b == mine and by_key.get(extra) == 1
          and sim.raw("GET", "/customers/locations", extra)[0] == 403, json.dumps(by_key))
    sim.sim("POST", "/_sim/stats/reset")


def test_throttle():
    """Exact throttle counts: the test owns the bucket clock, so how fast this machine
    starts threads or answers requests changes nothing."""
    s = Sim("--retry-after", "3")
    key = s.gyms["gyms"][0]["api_key"]
    codes, hdrs = [], []
    lock = threading.Lock()

    def hit():
        st, hd, b = s.raw("GET", "/customers/locations", key)
        with lock:
            codes.append(st)
            hdrs.append((st, hd.get("Retry-After"), b))
    clock = s.sim("POST", "/_sim/clock", {"freeze": True})
    check("clock frozen", clock["frozen"] is True, json.dumps(clock))
    ts = [threading.Thread(target=hit) for _ in range(40)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    n429 = codes.count(429)
    check("burst throttled", codes.count(200) == 20 and n429 == 20, str(sorted(codes)))
    check("throttle body + Retry-After", all(json.loads(b) == {"message": "Too Many Requests"} and ra == "3"
                                              for st, ra, b in hdrs if st == 429))
    other = s.raw("GET", "/customers/locations", s.gyms["gyms"][1]["api_key"])[0]
    check("bucket is per key", other == 200)
    one = lambda: s.raw("GET", "/customers/locations", key)[0]
    check("frozen bucket never refills", [one() for _ in range(3)] == [429] * 3)
    s.sim("POST", "/_sim/clock", {"advance_s": 1.0})
    got = [one() for _ in range(6)]
    check("one second refills exactly --rate tokens", got == [200] * 5 + [429], str(got))
    s.sim("POST", "/_sim/clock", {"advance_s": 3600})
    got = [one() for _ in range(21)]
    check("refill stops at --burst", got == [200] * 20 + [429], str(got))
    b = s.sim("POST", "/_sim/buckets", {"api_key": key, "tokens": 2})
    mine = [x["tokens"] for x in b["buckets"] if x["api_key"] == key]
    got = [one() for _ in range(3)]
    check("bucket set by the test", mine == [2.0] and got == [200, 200, 429], f"{mine} {got}")
    s.sim("POST", "/_sim/buckets", {"api_key": key, "tokens": 0})
    s.sim("POST", "/_sim/clock", {"resume_after_throttled": 2})
    got = [one() for _ in range(2)]
    clock = s.sim("GET", "/_sim/clock")
    check("clock resumes after N throttled answers", got == [429, 429] and clock["frozen"] is False,
          f"{got} {json.dumps(clock)}")
    s.sim("POST", "/_sim/clock", {"freeze": True})
    s.sim("POST", "/_sim/buckets", {"tokens": 1})
    got = [one(), one(), s.raw("GET", "/customers/locations", s.gyms["gyms"][1]["api_key"])[0]]
    check("every key's bucket set at once", got == [200, 429, 200], str(got))
    bad = [s.raw("POST", "/_sim/clock", body=b)[0] for b in ({"advance_s": -1}, {"freeze": "yes"},
                                                            {"resume_after_throttled": 0})]
    bad.append(s.raw("POST", "/_sim/buckets", body={"tokens": 21})[0])
    check("clock and bucket controls validate their input", bad == [400] * 4, str(bad))
    s.sim("POST", "/_sim/clock", {"freeze": False})
    check("_sim never throttled", all(s.raw("GET", "/_sim/gyms")[0] == 200 for _ in range(30)))
    st = s.sim("GET", "/_sim/stats")
    throttled = n429 + 3 + 1 + 1 + 1 + 2 + 1
    check("throttle stats", st["throttled_429"] == throttled, f"want {throttled}: {json.dumps(st)}")
    rc, err = s.stop()
    check("SIGTERM clean exit", rc == 0 and not err.strip(), f"rc={rc} err={err[-300:]}")

    s = Sim()
    key = s.gyms["gyms"][0]["api_key"]
    s.sim("POST", "/_sim/faults", {"api_key": key, "kind": "status", "status": 503, "after": 2, "count": 1})
    got = [s.raw("GET", "/programs", key)[0] for _ in range(4)]
    check("fault fires after N matching requests", got == [200, 200, 503, 200], str(got))
    s.stop()

    s = Sim("--quota", "3")
    key = s.gyms["gyms"][0]["api_key"]
    res = [s.raw("GET", "/programs", key) for _ in range(5)]
    check("monthly quota", [r[0] for r in res] == [200, 200, 200, 429, 429]
          and json.loads(res[3][2]) == {"message": "Limit Exceeded"} and "Retry-After" not in res[3][1])
    s.stop()


def dump_all(sim):
    """Every list payload of every gym, as raw bytes (for byte-for-byte comparisons)."""
    out = []
    for g in sim.gyms["gyms"]:
        key = g["api_key"]
        for path in ("/customers/locations", "/programs", "/customers/employees", "/clients?sort=id",
                     "/memberships?sort=id", "/memberships/holds?sort=id", "/financials/invoices?sort=id",
                     "/financials/transactions?sort=id"):
            page = 1
            while True:
                st, _, b = sim.raw("GET", f"{path}{'&' if '?' in path else '?'}page={page}", key)
                out.append(b)
                if not json.loads(b)["pagination"]["has_more"]:
                    break
                page += 1
        st, _, b = sim.raw("GET", "/clients?sort=id&page_size=5", key)
        for c in json.loads(b)["clients"]:
            out.append(sim.raw("GET", f"/clients/{c['id']}/classes/sign-ins?sort=id&page=1", key)[2])
            out.append(sim.raw("GET", f"/clients/{c['id']}", key)[2])
    return out


def every_answer(sim, full=True):
    """(path, status, body bytes) of every request a connector backfill of every gym
    makes (of the first only, unless full), of dump_all's, and of searches at the edges
    of the search engine: every comparison at a record's own value (where a range
    lookup one position off shows), two-sided windows, sorts both ways, small pages,
    errors; on the first gym's every searchable kind (full) or two gyms' transactions
    and invoices."""
    out = []

    def fetch(path, key):
        st, _, b = sim.raw("GET", path, key)
        out.append((path, st, b))
        return b

    def walk(path, key):
        """Up to four pages of a search, seven records each unless path says otherwise."""
        page = 1
        while True:
            b = fetch(f"{path}&page={page}" + ("" if "page_size" in path else "&page_size=7"), key)
            doc = json.loads(b)
            if "pagination" not in doc or not doc["pagination"]["has_more"] or page >= 4:
                return doc
            page += 1
    orig = sim.raw

    def raw(method, path, key=None, body=None, headers=None):
        r = orig(method, path, key, body, headers)
        if method == "GET" and not path.startswith("/_sim"):
            out.append((path, r[0], r[2]))
        return r
    sim.raw = raw
    try:
        for g in sim.gyms["gyms"][:None if full else 1]:
            backfill(sim, g)
        dump_all(sim)
    finally:
        sim.raw = orig
    for g in sim.gyms["gyms"][:1 if full else 2]:
        key = g["api_key"]
        for path, field in (("/financials/transactions/search", "transaction_date_time"),
                            ("/financials/invoices/search", "created_on_datetime"),
                            ("/financials/invoices/search", "payment_due"),
                            ("/financials/invoices/search", "final_charge"),
                            ("/financials/transactions/search", "amount"),
                            ("/memberships/search", "start_date"),
                            ("/memberships/search", "end_date"),
                            ("/clients/search", "last_class_sign_in"),
                            ("/clients/search", "client_status"),
                            ("/memberships/holds/search", "hold_start_date"))[:None if full else 2]:
            recs = json.loads(fetch(path.replace("/search", "") + "?sort=id&page_size=100", key))
            recs = next(v for k, v in recs.items() if isinstance(v, list))
            if not recs:
                continue
            def val(r):
                v = r.get(field)
                return v if v is not None else next(x[field] for x in r.values() if isinstance(x, dict) and field in x)
            vals = sorted({str(val(r)) for r in recs})
            for v in (vals[0], vals[len(vals) // 2], vals[-1]):
                for op in ("gte", "gt", "lt", "lte", "eq", "neq"):
                    walk(f"{path}?q={q(f'{field}|{op}|{v}')}&sort=id", key)
                walk(f"{path}?q={q(f'{field}|between|{vals[0]}|{v}')}&sort=desc_{field}", key)
                walk(f"{path}?q={q(f'{field}|gte|{v};{field}|lt|{vals[-1]}')}&sort={field}&page_size=7", key)
                walk(f"{path}?q={q(f'{field}|lte|{v};id|gt|0')}", key)
        walk(f"/financials/invoices/search?q={q('final_charge|gt|abc')}", key)
        walk(f"/financials/invoices/search?q={q('nope|gte|1')}", key)
        walk(f"/clients/search?q={q('first_name|starts_with|A')}&sort=desc_last_name", key)
    return out


def test_fast_path_bytes():
    """The simulator's caches and search index change no byte of any answer: a fresh
    simulator answers everything twice (the second time from its caches) and the same
    seed under --no-cache, which renders every answer from scratch, must answer the
    same bytes; again after posted transactions and after /_sim/advance, which must
    drop what was cached.  With --page-cache-mb 0 no rendered page is kept, and the
    answers are the same."""
    fast = Sim("--rate", "100000", "--burst", "100000")
    ref = Sim("--rate", "100000", "--burst", "100000", "--no-cache")
    nopages = Sim("--rate", "100000", "--burst", "100000", "--page-cache-mb", "0")
    try:
        want = every_answer(ref, True)
        got = every_answer(nopages, True)
        kept = nopages.sim("GET", "/_sim/stats")["page_cache"]
        check("--page-cache-mb 0 keeps no page and changes no byte",
              got == want and kept["pages"] == 0 and kept["bytes"] == 0,
              f"{kept}, {sum(w != x for w, x in zip(want, got))} answers differ")
        for step in ("fresh", "posted", "advanced"):
            if step == "posted":
                for s in (fast, ref):
                    for i, g in enumerate(s.gyms["gyms"]):
                        s.sim("POST", "/_sim/transactions", {"api_key": g["api_key"], "amount": 12.5 + i,
                                                             "transaction_date_time": "2026-09-30T23:59:59Z"})
                    s.sim("POST", "/_sim/transactions", {"api_key": s.gyms["gyms"][1]["api_key"], "generated": False})
            if step == "advanced":
                for s in (fast, ref):
                    s.sim("POST", "/_sim/advance?days=3")
                    s.gyms = s.sim("GET", "/_sim/gyms")
            want = every_answer(ref, step == "fresh")
            for rnd in ("cold", "cached"):
                got = every_answer(fast, step == "fresh")
                bad = [w[0] for w, x in zip(want, got) if w != x]
                check(f"fast path bytes = --no-cache ({step}, {rnd})", len(got) == len(want) and not bad,
                      f"{len(bad)} of {len(want)} answers differ, first {bad[:2]}")
        kept = fast.sim("GET", "/_sim/stats")["page_cache"]
        check("the page cache keeps rendered pages", kept["pages"] > 0 and kept["bytes"] > 0, str(kept))
    finally:
        fast.stop()
        ref.stop()
        nopages.stop()


def test_determinism_and_advance(a):
    global TODAY
    b = Sim("--rate", "100000", "--burst", "100000")
    check("same /_sim/gyms", a.raw("GET", "/_sim/gyms")[2] == b.raw("GET", "/_sim/gyms")[2])
    da, db = dump_all(a), dump_all(b)
    check("identical bytes across runs", da == db, f"{sum(x != y for x, y in zip(da, db))} differ")
    b.stop()
    # advance 5 days == starting 5 days later
    before = {g["index"]: g["expected"] for g in a.gyms["gyms"]}
    key0 = a.gyms["gyms"][0]["api_key"]
    old_invoices = json.loads(a.raw("GET", "/financials/invoices?sort=id&page_size=100", key0)[2])["invoices"]
    res = a.sim("POST", "/_sim/advance?days=5")
    later = (date.fromisoformat(TODAY) + timedelta(days=5)).isoformat()
    check("advance returns new today", res["today"] == later, str(res))
    after = a.sim("GET", "/_sim/gyms")
    grew = all(after["gyms"][i]["expected"]["class_signins"] > before[i]["class_signins"] for i in before)
    check("advance grows the model", grew and after["today"] == later)
    new_invoices = {i["id"]: i for i in json.loads(a.raw("GET", "/financials/invoices?sort=id&page_size=100", key0)[2])["invoices"]}
    check("old ids stable after advance", all(i["id"] in new_invoices and
                                              new_invoices[i["id"]]["created"] == i["created"] for i in old_invoices))
    saved, TODAY = TODAY, later
    c = Sim("--rate", "100000", "--burst", "100000")
    TODAY = saved
    a.gyms = after
    check("advance == fresh --today+5 (/_sim/gyms)", a.raw("GET", "/_sim/gyms")[2] == c.raw("GET", "/_sim/gyms")[2])
    da, dc = dump_all(a), dump_all(c)
    check("advance == fresh --today+5 (payloads)", da == dc, f"{sum(x != y for x, y in zip(da, dc))} differ")
    c.stop()
    # across a month boundary the fresh start needs the pinned history start
    res = a.sim("POST", "/_sim/advance?days=25")
    later = (date.fromisoformat(TODAY) + timedelta(days=30)).isoformat()
    hist = a.sim("GET", "/_sim/gyms")
    a.gyms = hist
    saved, TODAY = TODAY, later
    c = Sim("--rate", "100000", "--burst", "100000", "--history-start", hist["history_start"])
    TODAY = saved
    check("advance across month == fresh with --history-start",
          res["today"] == later and dump_all(a) == dump_all(c)
          and a.raw("GET", "/_sim/gyms")[2] == c.raw("GET", "/_sim/gyms")[2])
    c.stop()


def main():
    t0 = time.time()
    a = Sim("--rate", "100000", "--burst", "100000")
    try:
        reqs = test_backfill(a)
        test_errors(a)
        test_faults_and_stats(a)
        test_throttle()
        test_fast_path_bytes()
        test_determinism_and_advance(a)
    finally:
        rc, err = a.stop()
    check("main sim stderr quiet", not err.strip(), err[-500:])
    print(f"{len(PASSED)} passed, {len(FAILED)} failed ({time.time() - t0:.1f}s; small 3-gym backfill = {reqs} requests)")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
