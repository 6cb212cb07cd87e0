#!/usr/bin/env python3
"""Wodify REST API v1 simulator for the ironwod test suite.

Follows /work/shared/wodify-api.md (sections 3-11; section 11 decides modeled shapes).
Python 3.11 standard library only.

    python3 test/wodify_sim.py --port 0 --seed 42 --gyms 3 --scale small

prints "listening on PORT" once the socket is bound.  The server root plays the role of
https://api.wodify.com/v1.  Ground truth and fault injection live under /_sim/ (no key,
never throttled, never counted).  GET /_sim/stats counts every other request by endpoint
and status, and under "by_gym" by the gym of its key and how it ended (2xx, 429, 4xx, 5xx,
network, envelope, slow), which is what a client's own attempt counters must equal;
"page_cache" says how many rendered pages (and bytes) are kept for serving again.

How the model stays deterministic and "advanceable"
---------------------------------------------------
Every random decision is drawn from a random.Random seeded by a SHA-256 of the identity of
the thing being decided (gym, client, membership, invoice ...), never from global state or
hash().  A client's life is generated forward in time from its join date and never looks
at "today"; "today" only decides what is *visible* (a record exists once its creation
instant is before the cutoff = end of today UTC, and its state is the last state change
before the cutoff).  Ids are assigned by ranking records on their creation instant, so ids
of already-visible records never change when today moves forward.  Consequently
POST /_sim/advance?days=N gives exactly the model that --today +N would give, as long as
the history anchor (first day of the month 30 months before the *start-up* today) is the
same; advance keeps the start-up anchor, and --history-start pins it for a fresh start.

Driving the throttle from a test
--------------------------------
The per-key token buckets (--rate, --burst) run on their own clock, which follows the
monotonic clock until a test takes it over:

    POST /_sim/clock   {"freeze": true}              stop it; buckets no longer refill
                       {"advance_s": 1.5}            move it forward (frozen or not)
                       {"freeze": false}             run again, from the frozen reading
                       {"resume_after_throttled": N} run again by itself after N more 429s
    GET  /_sim/clock   {"frozen", "now", "resume_after_throttled"}
    POST /_sim/buckets {"api_key": K, "tokens": T}   set K's bucket (every key's without K)
    GET  /_sim/buckets the tokens of every key's bucket at the clock's reading

Posting records with a chosen time stamp (they survive /_sim/advance):

    POST   /_sim/transactions {"api_key": K, "transaction_date_time": T, "amount": A}
                              a Payment on K's newest invoice, stamped T (past or future)
                              {"api_key": K, "generated": false}  withhold K's generated
                              transactions (a gym with no payments yet); true serves them
    DELETE /_sim/transactions back to the generated transactions only (every key, or K's)

GET /_sim/client_versions?gym=N hashes every client's list record, whole and without the
fields Wodify recomputes daily (VOLATILE_CLIENT_FIELDS): the versions a client really has.

With the clock frozen, 40 concurrent requests against a burst of 20 see exactly 20
answers, however slowly the threads start.  A fault with "after": N lets N matching
requests through before it fires.

Holding a request, and rotating keys
------------------------------------
POST /_sim/holds (the fields of a fault: api_key, endpoint, after, count) adds a fault of
kind "hold": it keeps the request it catches waiting, then answers it normally, once POST
/_sim/release lets every held request go (so does DELETE /_sim/faults; "max_s", 600 by
default, bounds the wait).  POST /_sim/release {"id": N} lets go only the requests of hold
N (the id POST /_sim/holds answered), so a test can hold two runs and release them one at a
time.  GET /_sim/faults says how many are "held" right now.

    POST /_sim/keys    {"gym": I, "api_key": K}      K is one more valid key of gym I
                       {"api_key": K, "revoke": true} K is refused from now on (403)

GET /_sim/stats counts requests by key too ("by_key"), so a test can tell which key a
client used.
"""

import argparse
import bisect
import hashlib
import json
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
from datetime import date, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit
from zoneinfo import ZoneInfo

# --------------------------------------------------------------------------------------
# Constants and vocabularies
# --------------------------------------------------------------------------------------

SENT_DATE = "1900-01-01"
SENT_DT = "1900-01-01T00:00:00Z"
ONE_HOUR = timedelta(hours=1)
FAR = date(2199, 12, 31)          # "never" for planned ends; never rendered

TIME_ZONES = {
    # iana: (display name, wodify time_zone_id, cities [(city, state, state_id, zip, country, country_id)])
    "America/New_York": ("(UTC-05:00) Eastern Time (US & Canada)", 35,
                         [("Brooklyn", "NY", 33, "11201", "United States", 1),
                          ("Hoboken", "NJ", 31, "07030", "United States", 1)]),
    "America/Chicago": ("(UTC-06:00) Central Time (US & Canada)", 20,
                        [("Chicago", "IL", 14, "60607", "United States", 1),
                         ("Evanston", "IL", 14, "60201", "United States", 1)]),
    "America/Los_Angeles": ("(UTC-08:00) Pacific Time (US & Canada)", 4,
                            [("Los Angeles", "CA", 5, "90012", "United States", 1),
                             ("Pasadena", "CA", 5, "91101", "United States", 1)]),
    "Europe/London": ("(UTC+00:00) Dublin, Edinburgh, Lisbon, London", 85,
                      [("London", "", 0, "E1 6AN", "United Kingdom", 2),
                       ("Croydon", "", 0, "CR0 1NX", "United Kingdom", 2)]),
    "Australia/Sydney": ("(UTC+10:00) Canberra, Melbourne, Sydney", 160,
                         [("Sydney", "NSW", 70, "2000", "Australia", 3),
                          ("Parramatta", "NSW", 70, "2150", "Australia", 3)]),
}
TZ_NAMES = list(TIME_ZONES)

GYM_PREFIX = ["CrossFit", "Iron", "Forge", "Barbell", "Northside", "Riverside", "Summit",
              "Anvil", "Granite", "Harbor", "Foundry", "Redline"]
GYM_SUFFIX = ["Athletics", "Strength", "Fitness", "Collective", "Training Co.", "Box",
              "Performance", "Gym"]
FIRST = ["Ava", "Liam", "Mia", "Noah", "Zoe", "Ethan", "Chloe", "Lucas", "Ella", "Mason",
         "Grace", "Owen", "Ruby", "Leo", "Isla", "Jack", "Maya", "Eli", "Nora", "Sam",
         "Priya", "Diego", "Hana", "Tomas", "Aisha", "Kai", "Lena", "Omar", "Sofia", "Ben",
         "Freya", "Caleb", "Ines", "Marco", "Yuki", "Theo", "Anya", "Felix", "Rosa", "Jude"]
LAST = ["Smith", "Nguyen", "Garcia", "Johnson", "Brown", "Patel", "Kim", "Lopez", "Martin",
        "Clark", "Lewis", "Walker", "Young", "Allen", "King", "Wright", "Scott", "Green",
        "Baker", "Adams", "Nelson", "Hill", "Ramirez", "Campbell", "Mitchell", "Roberts",
        "Carter", "Phillips", "Evans", "Turner", "Torres", "Parker", "Collins", "Edwards",
        "Stewart", "Flores", "Morris", "Murphy", "Cook", "Rogers"]
PROGRAM_NAMES = ["CrossFit", "Olympic Weightlifting", "Open Gym", "Endurance", "Kids",
                 "Gymnastics", "Barbell Club", "HYROX", "Yoga", "Teens"]
PROGRAM_COLORS = ["#E53935", "#1E88E5", "#43A047", "#FB8C00", "#8E24AA", "#00ACC1",
                  "#6D4C41", "#3949AB", "#C0CA33", "#F4511E"]
HOLD_REASONS = ["Travel", "Injury", "Medical", "Financial", "Work schedule", "Other"]
LEAD_SOURCES = [(1, "Website"), (2, "Walk-in"), (3, "Referral"), (4, "Instagram"),
                (5, "Google")]
GENDERS = [(1, "Male"), (2, "Female"), (3, "Non-binary")]
SIGN_IN_SOURCES = [(1, "Front Desk"), (2, "Mobile App"), (3, "Kiosk")]
PAY_METHODS = ["Card", "ACH", "Cash", "Store Credit"]
STATUS_IDS = {"Unpaid": 2, "Paid": 4, "Partially Refunded": 5, "Refunded": 6, "Voided": 7}
CLIENT_STATUS_IDS = {"Active": 1, "Inactive": 2}
# Client fields Wodify recomputes from its clock with no edit to the record (the
# `updated` block stays): they move every day for every client.
VOLATILE_CLIENT_FIELDS = ("days_since_last_attendance", "is_at_risk", "current_weekstreak")

# Plan catalog: (key, name, type, base price, billing len, billing unit, weight, p_end per period)
# p_end is the chance that a membership ends after any given billing period, which gives
# realistic tenures (monthly plans: mean ~18 months).
PLANS = [
    ("unl", "Unlimited Monthly", "Class Plan", 175, 1, "Month(s)", 40, 0.055),
    ("3x", "3x Per Week", "Class Plan", 145, 1, "Month(s)", 25, 0.06),
    ("2x", "2x Per Week", "Class Plan", 115, 1, "Month(s)", 12, 0.07),
    ("wk", "Weekly Unlimited", "Class Plan", 45, 1, "Week(s)", 6, 0.014),
    ("6m", "6-Month Prepaid", "Class Plan", 900, 6, "Month(s)", 5, 0.3),
    ("yr", "Annual Unlimited", "Class Plan", 1800, 1, "Year(s)", 3, 0.45),
    ("pack", "10-Class Pack", "Class Pack", 180, 0, "", 6, 1.0),
]
ONRAMP = ("ramp", "On-Ramp Foundations", "Class Plan", 99, 1, "Month(s)", 0, 1.0)
COMP = ("comp", "Coach Comp", "Class Plan", 0, 1, "Month(s)", 0, 0.0)
PLAN_RATE_CAP = {"2x": 2.0, "3x": 3.0}

# Class timetable (local wall time).  Weekday index 0 = Monday.
WEEKDAY_SLOTS = [(6, 0), (7, 0), (9, 0), (12, 0), (16, 30), (17, 30), (18, 30)]
SAT_SLOTS = [(8, 0), (9, 0), (10, 0)]
SUN_SLOTS = [(9, 0)]
DOW_WEIGHT = [1.0, 1.0, 1.0, 1.0, 0.9, 0.5, 0.25]

SCALES = {  # initial cohort range, joins per month afterwards
    "small": ((16, 22), 1.0),
    "medium": ((110, 130), 6.0),
    "large": ((560, 640), 30.0),
}


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------

def sub_seed(*parts):
    """Stable 64-bit seed from any tuple of str/int parts (never Python's hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


def rng(*parts):
    return random.Random(sub_seed(*parts))


def fmt_dt(dt):
    if dt is None:
        return SENT_DT
    # isoformat is the same text as the strftime below for a naive datetime with no
    # microseconds from year 1000 on (every model instant), at a fifth of its cost:
    # rendering a page is mostly formatting its time stamps.
    if type(dt) is datetime and not dt.microsecond and dt.tzinfo is None and dt.year >= 1000:
        return dt.isoformat() + "Z"
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def fmt_d(d):
    return d.isoformat() if d is not None else SENT_DATE


def add_months(d, n, day=None):
    """d + n months, keeping the billing day `day` (clamped to month length)."""
    y, m = divmod(d.month - 1 + n, 12)
    y += d.year
    m += 1
    day = day or d.day
    last = (date(y + (m == 12), m % 12 + 1, 1) - timedelta(days=1)).day
    return date(y, m, min(day, last))


def add_period(start, k, length, unit):
    """Start of billing period k (0-based) of a plan that bills every `length` `unit`."""
    if unit == "Week(s)":
        return start + timedelta(days=7 * length * k)
    if unit == "Year(s)":
        return add_months(start, 12 * length * k)
    return add_months(start, length * k)


def month_start(d):
    return d.replace(day=1)


class Tz:
    """Local<->UTC conversion with a cache; model datetimes are naive UTC."""

    def __init__(self, name):
        self.name = name
        self.zone = ZoneInfo(name)
        self._cache = {}

    def to_utc(self, d, hh=0, mm=0, ss=0):
        key = (d, hh, mm)
        off = self._cache.get(key)
        if off is None:
            local = datetime(d.year, d.month, d.day, hh, mm, tzinfo=self.zone)
            off = local.utcoffset()
            self._cache[key] = off
        return datetime(d.year, d.month, d.day, hh, mm, ss) - off

    def to_local(self, utc_dt):
        return utc_dt.replace(tzinfo=timezone.utc).astimezone(self.zone).replace(tzinfo=None)


def poisson(r, lam):
    # Knuth; lam is small (<= ~2) so this is cheap.
    limit, k, p = pow(2.718281828459045, -lam), 0, 1.0
    while True:
        p *= r.random()
        if p <= limit:
            return k
        k += 1


def audit(prefix, by_id, by, when):
    return {prefix + "_by_id": by_id, prefix + "_by": by, prefix + "_on_datetime": fmt_dt(when)}


# --------------------------------------------------------------------------------------
# Internal model objects (plain containers; rendering turns them into API records)
# --------------------------------------------------------------------------------------

class Plan:
    __slots__ = ("key", "name", "type", "price", "bp_len", "bp_unit", "weight", "p_end")

    def __init__(self, spec, factor):
        self.key, self.name, self.type, base, self.bp_len, self.bp_unit, self.weight, \
            self.p_end = spec
        self.price = float(round(base * factor)) if base else 0.0


class Hold:
    __slots__ = ("key", "start", "end", "orig_end", "edit_at", "reason", "created", "id",
                 "membership", "by")


class Membership:
    __slots__ = ("key", "client", "plan", "start", "end", "created", "req_at", "outcome",
                 "holds", "location", "deleted_at", "renewed_by", "id", "rescinded",
                 "fixed_term", "by")


class Txn:
    __slots__ = ("key", "at", "type", "amount", "method", "invoice", "id")


class Invoice:
    __slots__ = ("key", "client", "membership", "due", "created", "amount", "events",
                 "txns", "id", "number", "product", "location", "notes_edit")


class SignIn:
    __slots__ = ("key", "client", "membership", "utc_start", "local_start", "signed_at",
                 "slot_prog", "loc", "class_id", "source", "id")


class Client:
    __slots__ = ("key", "seed", "id", "first", "last", "email", "phone", "phone2",
                 "phone_edit_at", "email2", "email_edit_at", "gender", "dob", "loc",
                 "program", "created", "join", "member_since", "rate", "pref", "method",
                 "memberships", "signins", "invoices", "lead_source", "owner", "tags",
                 "street", "emergency", "converted", "by")


# --------------------------------------------------------------------------------------
# Gym model
# --------------------------------------------------------------------------------------

class Gym:
    """One gym: static setup plus the forward-generated lives of its clients."""

    def __init__(self, seed, index, scale, anchor, today):
        self.seed, self.index, self.scale = seed, index, scale
        self.search_index = {}          # kind -> narrow()'s sorted field values
        self.anchor, self.today = anchor, today
        self.cutoff = datetime(today.year, today.month, today.day) + timedelta(days=1)
        self.backfill_since = add_months(month_start(today), -24)
        g = rng(seed, index, "gym")
        self.api_key = "wdfy_" + hashlib.sha256(f"{seed}:{index}:api-key".encode()).hexdigest()[:32]
        self.name = f"{g.choice(GYM_PREFIX)} {g.choice(GYM_SUFFIX)} {index + 1}"
        self.tz_name = g.choice(TZ_NAMES)
        self.tz = Tz(self.tz_name)
        self.customer_id = g.randint(10000, 99999)
        self.price_factor = g.uniform(0.85, 1.25)
        # id bases; real Wodify ids are global across tenants, hence the gaps later on
        self.base = {
            "client": g.randint(1_200_000, 60_000_000),
            "membership": g.randint(11_000_000, 70_000_000),
            "hold": g.randint(200_000, 4_000_000),
            "invoice": g.randint(12_000_000, 80_000_000),
            "txn": g.randint(15_000_000, 80_000_000),
            "signin": g.randint(110_000_000, 700_000_000),
            "class": g.randint(150_000_000, 700_000_000),
        }
        self._setup_static(g)
        self._generate()
        self._assign_ids()

    # ---- static setup -----------------------------------------------------------------

    def _setup_static(self, g):
        tzdisp, tzid, cities = TIME_ZONES[self.tz_name]
        nloc = 1 if g.random() < 0.6 else 2
        first_id = g.randint(1000, 60000)
        self.locations = []
        for i in range(nloc):
            city = cities[i]
            self.locations.append({
                "id": first_id + i * g.randint(3, 400),
                "name": self.name if i == 0 else f"{self.name} - {city[0]}",
                "city": city, "tz_display": tzdisp, "tz_id": tzid,
                "created": datetime.combine(self.anchor, datetime.min.time())
                - timedelta(days=g.randint(200, 2000) if i == 0 else g.randint(10, 150)),
            })
        self.employees = []
        for i in range(g.randint(3, 5)):
            fn, ln = g.choice(FIRST), g.choice(LAST)
            self.employees.append({"id": g.randint(1_000_000, 9_999_999), "first_name": fn,
                                   "last_name": ln, "title": "Owner" if i == 0 else "Coach",
                                   "email": f"{fn.lower()}.{ln.lower()}@example-gym.test"})
        self.staff = [(e["id"], f"{e['first_name']} {e['last_name']}") for e in self.employees]
        nprog = g.randint(3, 6)
        names = ["CrossFit"] + g.sample(PROGRAM_NAMES[1:], nprog - 1)
        pid = g.randint(10000, 90000)
        self.programs = []
        for i, n in enumerate(names):
            pid += g.randint(1, 900)
            created = datetime.combine(self.anchor, datetime.min.time()) - timedelta(days=g.randint(30, 900))
            edited = created + timedelta(days=g.randint(0, 400))
            self.programs.append({
                "id": pid, "name": n, "color": PROGRAM_COLORS[PROGRAM_NAMES.index(n)],
                # the first three run classes; the rest may be retired
                "is_active": i < 3 or g.random() < 0.5,
                "description": f"{n} classes at {self.name}",
                "created": created, "updated": edited})
        if all(p["is_active"] for p in self.programs) and len(self.programs) > 3:
            self.programs[-1]["is_active"] = False      # always one retired program
        active = [p for p in self.programs if p["is_active"]]
        # timetable: slot -> program (mostly the main program)
        self.timetable = {}
        for dow in range(7):
            slots = WEEKDAY_SLOTS if dow < 5 else SAT_SLOTS if dow == 5 else SUN_SLOTS
            self.timetable[dow] = [(hh, mm, 0 if (j % 3 or len(active) == 1) else
                                    self.programs.index(active[1 + (dow + j) % (len(active) - 1)]))
                                   for j, (hh, mm) in enumerate(slots)]
        self.plans = {s[0]: Plan(s, self.price_factor) for s in PLANS + [ONRAMP, COMP]}
        # The programs each plan gives access to (wodify-api.md §11, modeled): a pure
        # function of the active programs, so no random draw moves.  Unlimited plans
        # reach two programs (their revenue cannot be split), the 2x plan and the
        # pack a third one alone.  Every third gym's memberships carry no
        # `programs` field at all, as the real API may not.
        a = [self.programs.index(p) for p in active]
        second, third = a[1 % len(a)], a[2 % len(a)]
        self.plan_programs = {"unl": [a[0], second], "yr": [a[0], second], "6m": [a[0], second],
                              "comp": [a[0], second], "3x": [a[0]], "wk": [a[0]], "ramp": [a[0]],
                              "2x": [third], "pack": [third]}
        self.membership_programs = self.index % 3 != 2

    # ---- generation ---------------------------------------------------------------------

    def _generate(self):
        (lo, hi), per_month = SCALES[self.scale]
        g = rng(self.seed, self.index, "cohort")
        keys = []
        # Initial cohort: members migrated in when history starts, joining over ~45 days.
        for i in range(g.randint(lo, hi)):
            keys.append((self.anchor + timedelta(days=g.randint(0, 45)), 0, i))
        # Later joins: decided per calendar day, so adding days never changes earlier ones.
        horizon = self.today + timedelta(days=60)
        d = self.anchor
        while d <= horizon:
            n = poisson(rng(self.seed, self.index, "joins", d.toordinal()), per_month / 30.4)
            for j in range(n):
                keys.append((d, 1, j))
            d += timedelta(days=1)
        self.clients = [self._gen_client(k) for k in keys]
        self.clients = [c for c in self.clients if c.created < self.cutoff]

    def _when(self, r, d, lo=8, hi=20):
        """A random local business-hours instant on day d, as UTC."""
        return self.tz.to_utc(d, r.randint(lo, hi - 1), r.randint(0, 59), r.randint(0, 59))

    def _gen_client(self, key):
        join, cohort, n = key
        c = Client()
        c.key = (join.toordinal(), cohort, n)
        c.seed = sub_seed(self.seed, self.index, "client", c.key)
        r = random.Random(c.seed)
        c.join = join
        c.first, c.last = r.choice(FIRST), r.choice(LAST)
        c.email = f"{c.first.lower()}.{c.last.lower()}{r.randint(1, 999)}@mail.test"
        c.phone = f"555-{r.randint(100, 999)}-{r.randint(1000, 9999)}"
        c.gender = r.choice(GENDERS)
        c.dob = date(join.year - r.randint(18, 62), r.randint(1, 12), r.randint(1, 28))
        c.loc = 0 if len(self.locations) == 1 or r.random() < 0.7 else 1
        c.program = 0
        c.street = f"{r.randint(1, 999)} {r.choice(LAST)} St"
        c.emergency = (f"{r.choice(FIRST)} {c.last}", f"555-{r.randint(100, 999)}-{r.randint(1000, 9999)}")
        c.lead_source = r.choice(LEAD_SOURCES)
        c.converted = r.random() < 0.4
        c.owner = r.choice(self.staff)
        c.by = r.choice(self.staff)
        c.tags = sorted(r.sample(["Competitor", "Morning Crew", "Founding Member", "Student",
                                  "Masters", "Referral Champ"], r.randint(0, 2)))
        c.created = self._when(r, join - timedelta(days=r.randint(2, 10)))
        # a share of the initial cohort was imported with an older "member since" date
        c.member_since = join - timedelta(days=r.randint(60, 1800)) if cohort == 0 and r.random() < 0.5 else join
        c.rate = min(5.0, max(0.6, r.triangular(0.7, 4.8, 2.2)))      # visits per week
        c.pref = r.randint(0, 6)                                           # favourite slot index
        c.method = r.choices(PAY_METHODS[:3], [75, 20, 5])[0]
        c.phone2 = c.phone_edit_at = c.email2 = c.email_edit_at = None
        if r.random() < 0.3:   # late profile edit (phone change)
            c.phone2 = f"555-{r.randint(100, 999)}-{r.randint(1000, 9999)}"
            c.phone_edit_at = self._when(r, join + timedelta(days=r.randint(30, 900)))
        if r.random() < 0.1:
            c.email2 = f"{c.first.lower()}{r.randint(10, 99)}@newmail.test"
            c.email_edit_at = self._when(r, join + timedelta(days=r.randint(30, 900)))
        c.memberships, c.signins, c.invoices = [], [], []
        self._gen_memberships(c, r)
        for m in c.memberships:
            if m.deleted_at is None:
                self._gen_signins(c, m)
                self._gen_invoices(c, m)
        self._gen_trial_and_retail(c)
        return c

    def _pick_plan(self, r, first, prev):
        if first and r.random() < 0.03:
            return self.plans["comp"]
        if first and r.random() < 0.3:
            return self.plans["ramp"]
        choices = [p for p in PLANS if prev is None or p[0] != prev.key or r.random() < 0.3]
        return self.plans[r.choices([p[0] for p in choices], [p[6] for p in choices])[0]]

    def _gen_memberships(self, c, r):
        """Forward-generate the client's membership history (switches, holds, churn, returns)."""
        horizon = self.today + timedelta(days=60)
        start, created = c.join, c.created + timedelta(minutes=r.randint(5, 90))
        prev = None
        k = 0
        while start <= horizon and k < 40:
            plan = self._pick_plan(r, k == 0, prev)
            m = Membership()
            m.key, m.client, m.plan, m.start, m.created = k, c, plan, start, created
            m.location = c.loc if r.random() < 0.9 else 0
            m.by = r.choice(self.staff)
            m.holds, m.deleted_at, m.renewed_by, m.rescinded = [], None, None, False
            m.fixed_term = plan.key in ("ramp", "pack")
            if plan.key == "pack":
                length = 90
                outcome = "switch" if r.random() < 0.5 else "cancel"
            elif plan.key == "ramp":
                length = (add_months(start, 1) - start).days
                outcome = "switch" if r.random() < 0.8 else "cancel"
            else:
                periods = 1
                while periods < 2000 and r.random() > plan.p_end:
                    periods += 1
                length = (add_period(start, periods, plan.bp_len, plan.bp_unit) - start).days
                outcome = "switch" if r.random() < 0.3 else "cancel"
                if k == 0 and r.random() < 0.03:       # join and cancel within a few days
                    length, outcome, m.rescinded = r.randint(1, 3), "cancel", True
            # holds pause access and billing and push the end date out
            hold_days = 0
            if not m.fixed_term and not m.rescinded and length > 120 and r.random() < 0.3:
                h_off = r.randint(40, min(length - 60, 700))
                for hk in range(1 + (r.random() < 0.2)):
                    h = Hold()
                    h.key, h.membership = hk, m
                    h.start = start + timedelta(days=h_off)
                    span = r.randint(7, 42)
                    h.orig_end = h.start + timedelta(days=span - 1)
                    h.reason = r.choice(HOLD_REASONS)
                    h.by = r.choice(self.staff)
                    h.created = self._when(r, h.start - timedelta(days=r.randint(0, 7)))
                    h.edit_at = None
                    h.end = h.orig_end
                    if r.random() < 0.2:   # late edit: hold extended just before it ends
                        h.end = h.orig_end + timedelta(days=r.randint(7, 21))
                        h.edit_at = self._when(r, h.orig_end - timedelta(days=r.randint(1, 4)))
                    hold_days += (h.end - h.start).days + 1
                    m.holds.append(h)
                    h_off += span + r.randint(60, 200)
                    if h_off > length - 30:
                        break
            m.end = start + timedelta(days=length + hold_days - 1)
            m.outcome = outcome
            if m.fixed_term:
                m.req_at = None
            else:
                req_day = max(m.created.date(), m.end - timedelta(days=r.randint(3, 30)))
                if m.rescinded:
                    req_day = m.end
                m.req_at = max(m.created + timedelta(minutes=10), self._when(r, req_day))
            c.memberships.append(m)
            if r.random() < 0.01:     # a duplicate created by mistake and deleted soon after
                dup = Membership()
                dup.key, dup.client, dup.plan = k + 500, c, plan
                dup.start, dup.end = start, FAR
                dup.created = m.created + timedelta(minutes=1)
                dup.deleted_at = dup.created + timedelta(minutes=r.randint(10, 180))
                dup.location, dup.holds, dup.renewed_by, dup.req_at = m.location, [], None, None
                dup.outcome, dup.rescinded, dup.fixed_term, dup.by = "deleted", False, False, m.by
                c.memberships.append(dup)
            prev = plan
            k += 1
            if outcome == "switch":
                start = m.end + timedelta(days=1)
                created = (m.req_at or self._when(r, m.end - timedelta(days=r.randint(1, 10))))
                created = max(created, m.created + timedelta(minutes=1))
            elif r.random() < 0.3 and not m.rescinded:   # reactivation after a gap
                start = m.end + timedelta(days=r.randint(20, 300))
                created = self._when(r, start - timedelta(days=r.randint(0, 3)))
            else:
                break
            if m.end >= FAR - timedelta(days=400):
                break
        for a, b in zip(c.memberships, c.memberships[1:]):
            if b.plan is a.plan and a.outcome == "switch" and b.deleted_at is None:
                a.renewed_by = b.created

    def _gen_signins(self, c, m):
        """Attendance over the membership's coverage; fades in the 6 weeks before churn."""
        r = rng(c.seed, "att", m.key)
        last = min(m.end, self.today + timedelta(days=1))
        rate = min(c.rate, PLAN_RATE_CAP.get(m.plan.key, 9))
        if m.plan.key == "pack":
            rate = min(rate, 1.5)
        churning = m.outcome == "cancel"
        hold_days = set()
        for h in m.holds:
            d = h.start
            while d <= h.end:
                hold_days.add(d)
                d += timedelta(days=1)
        used = 0
        d = m.start
        while d <= last:
            dow = d.weekday()
            p = rate * DOW_WEIGHT[dow] / 5.15
            if churning:
                left = (m.end - d).days
                if left < 42:
                    p *= max(0.05, left / 42.0) ** 1.3
            if (d - m.start).days < 30:
                p *= 1.15
            x = r.random()
            if x < p and d not in hold_days:
                slots = self.timetable[dow]
                weights = [6 if j == c.pref % len(slots) else 1 for j in range(len(slots))]
                j = r.choices(range(len(slots)), weights)[0]
                self._add_signin(c, m, r, d, slots, j)
                used += 1
                if m.plan.key == "pack" and used >= 10:
                    break
            d += timedelta(days=1)

    def _add_signin(self, c, m, r, d, slots, j):
        hh, mm, prog = slots[j]
        s = SignIn()
        s.client, s.membership = c, m
        s.loc = m.location if m is not None else c.loc
        s.local_start = datetime(d.year, d.month, d.day, hh, mm)
        s.utc_start = self.tz.to_utc(d, hh, mm)
        s.source = r.choices(SIGN_IN_SOURCES, [30, 60, 10])[0]
        lead = r.randint(1, 12) if s.source[0] != 2 else r.randint(5, 600)
        s.signed_at = s.utc_start - timedelta(minutes=lead)
        s.slot_prog = prog
        day_idx = (d - self.anchor).days
        s.class_id = self.base["class"] + (day_idx * 16 + j) * 2 + s.loc
        s.key = (s.utc_start, c.key, m.key if m is not None else -1)
        c.signins.append(s)

    def _gen_trial_and_retail(self, c):
        r = rng(c.seed, "extras")
        # a free trial class before the first membership (no membership attached)
        if r.random() < 0.35:
            d = c.created.date() + timedelta(days=1)
            if d < c.join:
                dow = d.weekday()
                slots = self.timetable[dow]
                self._add_signin(c, None, r, d, slots, r.randrange(len(slots)))
        # A few non-membership purchases (drop-ins, apparel) while a member.  Every draw is
        # made before looking at the memberships, whose count depends on today.
        live = [m for m in c.memberships if m.deleted_at is None]
        for j in range(r.randint(0, 3)):
            d = c.join + timedelta(days=r.randint(0, 900))
            when = self._when(r, d)
            amount = float(r.choice([20, 25, 35, 45, 60, 90]))
            product = r.choice(["Drop-In", "T-Shirt", "Chalk Bag", "Nutrition Consult"])
            method = "Store Credit" if r.random() < 0.2 else "Card"
            pay_r = rng(c.seed, "retail", j)
            if not any(m.start <= d <= m.end for m in live):
                continue      # not a member that day (or that membership is not generated yet)
            inv = Invoice()
            inv.key, inv.client, inv.membership = (c.key, 1000 + j, 0), c, None
            inv.due, inv.created, inv.amount, inv.product = d, when, amount, product
            inv.location = c.loc
            self._settle(pay_r, inv, method, simple=True)
            c.invoices.append(inv)

    def _gen_invoices(self, c, m):
        """One invoice per billing period, at local midnight of the due date; holds shift dues."""
        plan = m.plan
        if plan.price <= 0:
            return
        last_due = self.today + timedelta(days=2)
        dues = []
        if plan.bp_len == 0:                        # class pack: paid once at sale
            dues.append(m.start)
        else:
            shift, pending, k = 0, sorted(m.holds, key=lambda h: h.start), 0
            while True:
                base = add_period(m.start, k, plan.bp_len, plan.bp_unit)
                due = base + timedelta(days=shift)
                while pending and pending[0].start <= due:
                    h = pending.pop(0)
                    shift += (h.end - h.start).days + 1
                    due = base + timedelta(days=shift)
                if due > m.end or due > last_due:
                    break
                dues.append(due)
                k += 1
        for i, due in enumerate(dues):
            r = rng(c.seed, "inv", m.key, i)
            inv = Invoice()
            inv.key, inv.client, inv.membership, inv.due = (c.key, m.key, i), c, m, due
            inv.created = self.tz.to_utc(due, 0, 0, r.randint(5, 50))
            if i == 0:
                inv.created = max(inv.created, m.created + timedelta(minutes=2))
            inv.amount = plan.price
            inv.product = plan.name
            inv.location = m.location
            if m.rescinded and i == 0:
                inv.events, inv.txns = [(inv.created, "Unpaid")], []
                inv.notes_edit = None
                if r.random() < 0.5:
                    inv.events.append((max(m.req_at, inv.created + timedelta(minutes=5)), "Voided"))
                else:
                    pay = inv.created + timedelta(minutes=r.randint(2, 30))
                    self._txn(inv, pay, "Payment", inv.amount, c.method if c.method != "Cash" else "Card")
                    inv.events.append((pay, "Paid"))
                    ref = max(m.req_at, pay + timedelta(minutes=30))
                    self._txn(inv, ref, "Refund", inv.amount, inv.txns[0].method)
                    inv.events.append((ref, "Refunded"))
            else:
                self._settle(r, inv, c.method)
            c.invoices.append(inv)

    def _txn(self, inv, at, kind, amount, method):
        t = Txn()
        t.key, t.at, t.type, t.amount, t.method, t.invoice = (inv.key, len(inv.txns)), at, kind, \
            round(amount, 2), method, inv
        inv.txns.append(t)

    def _settle(self, r, inv, method, simple=False):
        """Payment story of one invoice: status timeline plus transactions."""
        t0 = inv.created
        inv.events, inv.txns, inv.notes_edit = [(t0, "Unpaid")], [], None
        x = 1.0 if simple else r.random()
        if method == "Cash" and not simple:
            pay = self._when(r, (t0 + timedelta(days=r.randint(0, 3))).date(), 9, 19)
            pay = max(pay, t0 + timedelta(minutes=5))
            self._txn(inv, pay, "Payment", inv.amount, "Cash")
            inv.events.append((pay, "Paid"))
        elif x < 0.80 or simple:
            pay = t0 + timedelta(minutes=r.randint(1, 90))
            self._txn(inv, pay, "Payment", inv.amount, method)
            inv.events.append((pay, "Paid"))
        elif x < 0.90:                                   # failed, retried, paid
            t = t0 + timedelta(minutes=r.randint(1, 30))
            self._txn(inv, t, "Failed Payment", inv.amount, method)
            t = t + timedelta(days=r.randint(1, 4), minutes=r.randint(0, 600))
            if r.random() < 0.25:
                self._txn(inv, t, "Failed Payment", inv.amount, method)
                t = t + timedelta(days=r.randint(2, 6), minutes=r.randint(0, 600))
            self._txn(inv, t, "Payment", inv.amount, method)
            inv.events.append((t, "Paid"))
        elif x < 0.93:                                   # failed, sits unpaid, settled much later
            t = t0 + timedelta(minutes=r.randint(1, 30))
            self._txn(inv, t, "Failed Payment", inv.amount, method)
            late = t0 + timedelta(days=r.randint(20, 200), minutes=r.randint(0, 600))
            if r.random() < 0.5:
                self._txn(inv, late, "Payment", inv.amount, "Cash")
                inv.events.append((late, "Paid"))
            else:
                inv.events.append((late, "Voided"))
        else:                                            # paid, then (partly) refunded
            pay = t0 + timedelta(minutes=r.randint(1, 90))
            self._txn(inv, pay, "Payment", inv.amount, method)
            inv.events.append((pay, "Paid"))
            ref = pay + timedelta(days=r.randint(1, 25), minutes=r.randint(0, 600))
            if x < 0.965:
                self._txn(inv, ref, "Refund", inv.amount, method)
                inv.events.append((ref, "Refunded"))
            else:
                self._txn(inv, ref, "Refund", inv.amount * r.uniform(0.2, 0.6), method)
                inv.events.append((ref, "Partially Refunded"))
        if not simple and r.random() < 0.02:            # late edit that changes only notes
            inv.notes_edit = t0 + timedelta(days=r.randint(30, 400), minutes=r.randint(0, 900))

    # ---- ids ----------------------------------------------------------------------------

    def _assign_ids(self):
        """Rank every entity by its visibility instant; ids grow with gaps (other tenants)."""
        cut = self.cutoff
        clients = sorted(self.clients, key=lambda c: (c.created, c.key))
        mems, holds, invs, txns, sis = [], [], [], [], []
        for c in clients:
            for m in c.memberships:
                if m.created < cut:
                    mems.append(m)
                    holds.extend(h for h in m.holds if h.created < cut)
            for inv in c.invoices:
                if inv.created < cut:
                    invs.append(inv)
                    txns.extend(t for t in inv.txns if t.at < cut)
            sis.extend(s for s in c.signins if s.utc_start < cut)

        def number(items, kind, sort_key, gap):
            items.sort(key=sort_key)
            r = rng(self.seed, self.index, "ids", kind)
            nid = self.base[kind]
            for it in items:
                nid += 1 + r.randint(0, gap)
                it.id = nid
            return items

        self.v_clients = number(clients, "client", lambda c: (c.created, c.key), 40)
        self.v_memberships = number(mems, "membership", lambda m: (m.created, m.client.key, m.key), 60)
        self.v_holds = number(holds, "hold", lambda h: (h.created, h.membership.client.key, h.membership.key, h.key), 30)
        self.v_invoices = number(invs, "invoice", lambda i: (i.created, i.key), 30)
        for n, inv in enumerate(self.v_invoices):
            inv.number = str(1001 + n).zfill(8)
        self.v_txns = number(txns, "txn", lambda t: (t.at, t.key), 30)
        self.v_signins = number(sis, "signin", lambda s: s.key, 15)
        self.client_by_id = {c.id: c for c in self.v_clients}
        self.invoice_by_id = {i.id: i for i in self.v_invoices}
        for c in self.v_clients:
            c.signins.sort(key=lambda s: s.key)

    # ---- rendering ------------------------------------------------------------------------

    # ---- ground truth for the metrics tests ------------------------------------------------

    def truth(self, merge_gap=7, rescind_days=7):
        """Monthly members_end, new_members, churned_members, all_visits and member_visits
        (location ALL) computed from the rendered API records by metrics.md's definitions,
        independently of ironwod: qualifying = Class Plan, price > 0, not deleted; end_date
        inclusive; spells merged over gaps <= merge_gap days; spells of <= rescind_days with
        zero net collected revenue dropped; months in the gym's zone from the first full
        local month of the landed (backfill-horizon) transactions and sign-ins.

        "programs" holds the same per program (metrics.md §2.5, §5.1): the people whose
        qualifying memberships give access to it (their `programs` field), visits to its
        classes, and collected_gross from payments on invoices of its memberships when
        every membership that grants it grants it alone (else null).  Where the
        memberships carry no `programs` field the person counts are null."""
        since = datetime.combine(self.backfill_since, datetime.min.time())
        INF = date.max
        txns = [t for t in self.v_txns if t.at >= since]
        invs = {i.id for i in self.v_invoices if i.created >= since}
        sis = [s for s in self.v_signins if s.utc_start >= since]
        local = lambda dt: self.tz.to_local(dt).date()
        first = min([local(t.at) for t in txns] + [local(s.utc_start) for s in sis])
        hist = first if first.day == 1 else add_months(month_start(first), 1, 1)
        net_by_mem = {}
        for t in txns:
            inv = t.invoice
            if inv.id not in invs or inv.membership is None:
                continue
            sign = 1 if t.type == "Payment" else -1 if t.type == "Refund" else 0
            net_by_mem[inv.membership.id] = net_by_mem.get(inv.membership.id, 0) + sign * t.amount
        holds = {}
        for h in self.r_holds:
            holds.setdefault(h["membership_id"], []).append(
                (date.fromisoformat(h["hold_start_date"]), date.fromisoformat(h["hold_end_date"])))
        grants = {m["id"]: {p["program_id"] for p in m["programs"]} if "programs" in m else None
                  for m in self.r_memberships}
        today = datetime.now(timezone.utc).astimezone(self.tz.zone).date()

        def figures(program):
            """The monthly figures of the gym (program None) or of one program."""
            mems = {}
            for m in self.r_memberships:
                pp = m["payment_plan"]
                if m["membership_type"] != "Class Plan" or pp["price"] <= 0 or m["is_deleted"]:
                    continue
                if program is not None and program not in (grants[m["id"]] or ()):
                    continue
                start = date.fromisoformat(m["start_date"])
                end = INF if m["end_date"] == SENT_DATE else date.fromisoformat(m["end_date"]) + timedelta(days=1)
                if end <= start:
                    continue
                mems.setdefault(m["client_id"], []).append((start, end, m["id"]))
            spells = {}          # client -> [(start, end_excl, first)]
            mem_of = {}          # client -> [(start, end_excl, id)]
            for cid, ms in mems.items():
                ms.sort()
                mem_of[cid] = ms
                groups = []
                for st, en, mid in ms:
                    if groups and st <= (groups[-1][1] + timedelta(days=merge_gap) if groups[-1][1] != INF else INF):
                        groups[-1][1] = max(groups[-1][1], en)
                        groups[-1][2].append(mid)
                    else:
                        groups.append([st, en, [mid]])
                kept = [g for g in groups
                        if not (g[1] != INF and (g[1] - g[0]).days <= rescind_days
                                and round(sum(net_by_mem.get(i, 0) for i in g[2]), 2) == 0)]
                spells[cid] = [(g[0], g[1], k == 0) for k, g in enumerate(kept)]

            def state(cid, d):
                if not any(st <= d < en for st, en, _ in spells.get(cid, [])):
                    return None
                cov = [mid for st, en, mid in mem_of.get(cid, []) if st <= d < en]
                if not cov:
                    return "ACTIVE"
                held = [mid for mid in cov if any(a <= d <= b for a, b in holds.get(mid, []))]
                return "ON_HOLD" if len(held) == len(cov) else "ACTIVE"

            visits = {}
            seen = set()
            for s in sis:
                key = (s.client.id, s.class_id)
                if key in seen:
                    continue
                seen.add(key)
                if program is not None and self.programs[s.slot_prog]["id"] != program:
                    continue
                d = local(s.utc_start)
                mo = month_start(d)
                v = visits.setdefault(mo, [0, 0])
                v[0] += 1
                if state(s.client.id, d) == "ACTIVE":
                    v[1] += 1
            months = []
            mo = hist
            while mo <= month_start(today):
                last = add_months(mo, 1, 1) - timedelta(days=1)
                as_of = min(last, today)
                members_end = sum(1 for sp in spells.values() if any(st <= as_of < en for st, en, _ in sp))
                new = sum(1 for sp in spells.values() for st, en, f in sp if f and mo <= st <= as_of)
                churned = sum(1 for sp in spells.values() for st, en, f in sp if en != INF and mo <= en <= as_of)
                v = visits.get(mo, [0, 0])
                months.append({"month": mo.isoformat(), "members_end": members_end,
                               "new_members": None if mo == hist else new,
                               "churned_members": None if mo == hist else churned,
                               "all_visits": v[0], "member_visits": v[1]})
                mo = add_months(mo, 1, 1)
            return months

        programs = []
        for p in self.r_programs:
            pid = p["id"]
            months = figures(pid)
            if not self.membership_programs:
                for row in months:
                    row.update(members_end=None, new_members=None, churned_members=None, member_visits=None)
            single = self.membership_programs and all(
                g == {pid} for g in grants.values() if g is not None and pid in g)
            gross = {}
            for t in txns:
                m = t.invoice.membership
                if t.invoice.id in invs and m is not None and t.type == "Payment" and t.method != "Store Credit" \
                        and pid in (grants.get(m.id) or ()):
                    mo = month_start(local(t.at)).isoformat()
                    gross[mo] = gross.get(mo, 0) + t.amount
            for row in months:
                row["collected_gross"] = round(gross.get(row["month"], 0), 2) if single else None
            programs.append({"program_id": pid, "months": months})
        return {"gym": self.index, "time_zone": self.tz_name, "history_start": hist.isoformat(),
                "months": figures(None), "programs": programs}

    def loc_ref(self, i):
        loc = self.locations[i]
        return loc["id"], loc["name"]

    def render(self):
        """Build the API records visible at the cutoff."""
        self.r_locations = [self._r_location(l) for l in self.locations]
        self.r_programs = [self._r_program(p) for p in self.programs]
        self.r_employees = [dict(e, is_active=True) for e in self.employees]
        self.r_memberships = [self._r_membership(m) for m in self.v_memberships]
        self.r_holds = [self._r_hold(h) for h in self.v_holds]
        self.r_invoices = [self._r_invoice(i) for i in self.v_invoices]
        self.r_txns = self.r_txns_generated = [self._r_txn(t) for t in self.v_txns]
        self.r_clients = [self._r_client(c) for c in self.v_clients]
        self.signins_by_client = {}
        for s in self.v_signins:
            self.signins_by_client.setdefault(s.client.id, []).append(s)
        since = datetime.combine(self.backfill_since, datetime.min.time())
        self.expected = {
            "locations": len(self.r_locations), "programs": len(self.r_programs),
            "clients": len(self.r_clients), "memberships": len(self.r_memberships),
            "membership_holds": len(self.r_holds),
            "class_signins": sum(1 for s in self.v_signins if s.utc_start >= since),
            "invoices": sum(1 for i in self.v_invoices if i.created >= since),
            "transactions": sum(1 for t in self.v_txns if t.at >= since),
        }
        # a sample record per resource gives the search engine its field types
        self.sample_signin = self.r_signin(self.v_signins[0]) if self.v_signins else None

    def _r_location(self, l):
        city, state, state_id, zipc, country, country_id = l["city"]
        street = f"{100 + l['id'] % 800} Main St"
        return {
            "id": l["id"], "name": l["name"], "street_address_1": street, "street_address_2": "",
            "city": city, "state_id": state_id, "state": state, "zip_code": zipc,
            "country_id": country_id, "country": country, "province": "",
            "website": "https://example-gym.test", "phone_number": "555-010-0100",
            "email": "info@example-gym.test", "show_in_wodifind": True,
            "wodifind_name": l["name"], "wodifind_description": "", "email_signature": "",
            "enable_email_signature": False, "email_from_label": l["name"], "staff_signature": "",
            "abn_number": "", "gst_number": "", "business_type_id": 1,
            "customer_id": self.customer_id, "stripe_terminal_location_id": "",
            "time_zone_id": l["tz_id"], "time_zone": l["tz_display"], "time_zone_iana": self.tz_name,
            "formatted_address": f"{street}<br/>{city}, {state} {zipc}<br/>{country}",
            "lead_owner_id": self.staff[0][0], "lead_owner": self.staff[0][1],
            "client_owner_id": self.staff[0][0], "client_owner": self.staff[0][1],
            "created": audit("created", self.staff[0][0], self.staff[0][1], l["created"]),
            "updated": audit("updated", self.staff[0][0], self.staff[0][1], l["created"]),
        }

    def _r_program(self, p):
        return {"id": p["id"], "name": p["name"], "color": p["color"], "is_active": p["is_active"],
                "description": p["description"],
                "created": audit("created", self.staff[0][0], self.staff[0][1], p["created"]),
                "updated": audit("updated", self.staff[0][0], self.staff[0][1], p["updated"])}

    def _r_membership(self, m):
        cut, plan = self.cutoff, m.plan
        requested = m.req_at is not None and m.req_at < cut
        deleted = m.deleted_at is not None and m.deleted_at < cut
        end = m.end if (m.fixed_term or requested) and m.end < FAR else None
        touched = [m.created] + [t for t in (m.req_at, m.deleted_at, m.renewed_by)
                                 if t is not None and t < cut]
        upd = max(touched)
        upd_by = m.by if upd == m.created else self.staff[0]
        renewed = m.renewed_by is not None and m.renewed_by < cut
        loc_id, loc_name = self.loc_ref(m.location)
        is_pack = plan.key == "pack"
        term_len = 3 if is_pack else 1 if plan.key == "ramp" else plan.bp_len
        term_unit = "Month(s)" if is_pack else plan.bp_unit
        return {
            "id": m.id, "client_id": m.client.id, "client": f"{m.client.first} {m.client.last}",
            "name": plan.name, "membership_type": plan.type,
            "is_active": (not deleted) and m.start <= self.today and (end is None or end >= self.today),
            "is_deleted": deleted, "has_been_renewed": renewed,
            "does_membership_expire": m.fixed_term,
            "start_date": fmt_d(m.start), "end_date": fmt_d(end),
            "expiration_date": fmt_d(m.end if m.fixed_term else None),
            "scheduled_deactivation_date": fmt_d(end + timedelta(days=1) if end else None),
            "cancellation_requested_on": fmt_d(self.tz.to_local(m.req_at).date() if requested else None),
            "location_id": loc_id, "location": loc_name,
            **({"programs": [{"program_id": self.programs[i]["id"], "program": self.programs[i]["name"]}
                             for i in self.plan_programs[plan.key]]} if self.membership_programs else {}),
            "payment_plan": {
                "payment_plan_name": f"{plan.name} - " + (
                    "Paid in Full" if plan.bp_len == 0 else f"Every {plan.bp_len} {plan.bp_unit}"),
                "initial_commitment_length": term_len, "initial_commitment_time_unit": term_unit,
                "renewal_commitment_length": 0 if m.fixed_term else plan.bp_len,
                "renewal_commitment_time_unit": "" if m.fixed_term else plan.bp_unit,
                "is_auto_renew": not m.fixed_term,
                "price": plan.price, "billing_period_length": plan.bp_len,
                "billing_period_unit": plan.bp_unit,
            },
            "created": audit("created", m.by[0], m.by[1], m.created),
            "updated": audit("updated", upd_by[0], upd_by[1], upd),
        }

    def _r_hold(self, h):
        edited = h.edit_at is not None and h.edit_at < self.cutoff
        return {
            "id": h.id, "membership_id": h.membership.id, "client_id": h.membership.client.id,
            "hold_start_date": fmt_d(h.start), "hold_end_date": fmt_d(h.end if edited else h.orig_end),
            "hold_reason": h.reason,
            "created": audit("created", h.by[0], h.by[1], h.created),
            "updated": audit("updated", h.by[0], h.by[1], h.edit_at if edited else h.created),
        }

    def _r_invoice(self, inv, details=False):
        cut = self.cutoff
        events = [e for e in inv.events if e[0] < cut]
        upd, status = events[-1]
        if inv.notes_edit is not None and inv.notes_edit < cut:
            upd = max(upd, inv.notes_edit)
        notes = "Adjusted by front desk" if inv.notes_edit is not None and inv.notes_edit < cut else ""
        manual = bool(notes) or status == "Voided"
        paid_on = None
        if status in ("Paid", "Refunded", "Partially Refunded"):
            pays = [t.at for t in inv.txns if t.type == "Payment" and t.at < cut]
            paid_on = self.tz.to_local(pays[-1]).date() if pays else None
        loc_id, _ = self.loc_ref(inv.location)
        rec = {
            "id": inv.id, "invoice_number": inv.number, "client_id": inv.client.id,
            "invoice_header_status_id": STATUS_IDS[status], "invoice_header_status": status,
            "payment_due": fmt_d(inv.due), "paid_on_date": fmt_d(paid_on),
            "final_charge": inv.amount, "notes": notes,
            "invoice_footer": "Thank you for training with us!",
            "membership_id": inv.membership.id if inv.membership is not None else 0,
            "location_id": loc_id,
            "created": audit("created", 0, "System", inv.created),
            # billing-engine changes are by "System"; voids and note edits by the owner
            "updated": audit("updated", *(self.staff[0] if manual else (0, "System")), upd),
        }
        if details:
            rec["invoice_details"] = [{
                "product_id": sub_seed(self.seed, self.index, inv.product) % 90000 + 10000,
                "product": inv.product, "quantity": 1, "sales_price": inv.amount,
                "discount": 0.0, "tax": 0.0, "final_charge": inv.amount}]
        return rec

    def _r_txn(self, t):
        loc_id, _ = self.loc_ref(t.invoice.location)
        return {"id": t.id, "invoice_id": t.invoice.id, "client_id": t.invoice.client.id,
                "location_id": loc_id, "transaction_date_time": fmt_dt(t.at), "amount": t.amount,
                "transaction_type": t.type, "payment_method": t.method,
                "created": audit("created", 0, "System", t.at)}

    def r_signin(self, s):
        # Every sign-in a connector asks for is rendered on request (a large gym's would
        # not fit in memory pre-rendered), so this is the simulator's hottest code: each
        # value is computed once (the sign-in instant appears three times).
        c, m = s.client, s.membership
        loc_id, loc_name = self.loc_ref(s.loc)
        prog = self.programs[s.slot_prog]
        local = s.local_start
        name = f"{c.first} {c.last}"
        by_id, by = (c.id, name) if s.source[0] == 2 else self.staff[1 % len(self.staff)]
        signed = fmt_dt(s.signed_at)
        member = m is not None
        key = m.plan.key if member else None
        capped = member and key in PLAN_RATE_CAP
        pack = member and key == "pack"
        return {
            "id": s.id, "client_id": c.id, "client": name, "email": c.email,
            "gender_id": c.gender[0], "gender": c.gender[1],
            "class_id": s.class_id, "class": f"{prog['name']} {local.hour:02d}:{local.minute:02d}",
            "sign_in_date_time": signed, "sign_in_source_id": s.source[0],
            "sign_in_source": s.source[1],
            "utc_class_start_datetime": fmt_dt(s.utc_start),
            "local_class_start_datetime": fmt_dt(local),
            "utc_class_end_datetime": fmt_dt(s.utc_start + ONE_HOUR),
            "local_class_end_datetime": fmt_dt(local + ONE_HOUR),
            "program_id": prog["id"], "program": prog["name"],
            "location_id": loc_id, "location": loc_name,
            "membership_id": m.id if member else 0, "membership": m.plan.name if member else "",
            "online_membership_sale_id": 0, "is_drop_in": False, "is_auto_sign_in": s.source[0] == 3,
            "counts_towards_attendance_limits": member,
            "is_membership_enforcement_enabled": member,
            "limited_plan_enforcement_type_id": 1 if capped else 0,
            "limited_plan_enforcement_type": "Warn" if capped else "",
            "class_pack_enforcement_type_id": 2 if pack else 0,
            "class_pack_enforcement_type": "Block" if pack else "",
            "is_attended_email_sent": False,
            "created": {"created_by_id": by_id, "created_by": by, "created_on_datetime": signed},
            "updated": {"updated_by_id": by_id, "updated_by": by, "updated_on_datetime": signed},
        }

    def _status_history(self, c):
        """Active/Inactive transitions implied by membership coverage (gaps deactivate)."""
        ev = [(c.created, "Active")]
        cov_end = None
        for m in sorted((m for m in c.memberships if m.deleted_at is None), key=lambda m: m.start):
            if cov_end is not None:
                off = self.tz.to_utc(cov_end + timedelta(days=1), 0, 30)
                if off < m.created and cov_end < FAR:
                    ev += [(off, "Inactive"), (m.created, "Active")]
            cov_end = m.end if cov_end is None else max(cov_end, m.end)
        if cov_end is not None and cov_end < FAR - timedelta(days=1):
            ev.append((self.tz.to_utc(cov_end + timedelta(days=1), 0, 30), "Inactive"))
        return [e for e in ev if e[0] < self.cutoff]

    def _r_client(self, c, single=False):
        cut = self.cutoff
        hist = self._status_history(c)
        status = hist[-1][1]
        sis = [s for s in c.signins if s.utc_start < cut]
        last = sis[-1].utc_start if sis else None
        last_local = self.tz.to_local(last).date() if last else None
        phone = c.phone2 if c.phone_edit_at is not None and c.phone_edit_at < cut else c.phone
        email = c.email2 if c.email_edit_at is not None and c.email_edit_at < cut else c.email
        edits = [t for t, _ in hist] + [t for t in (c.phone_edit_at, c.email_edit_at)
                                        if t is not None and t < cut]
        upd = max(edits)
        # week streaks (weeks run Monday-Sunday)
        weeks = sorted({(self.tz.to_local(s.utc_start).date().toordinal() - 1) // 7 for s in sis})
        best = run = 0
        prev = None
        for w in weeks:
            run = run + 1 if prev is not None and w == prev + 1 else 1
            best = max(best, run)
            prev = w
        this_week = (self.today.toordinal() - 1) // 7
        current = run if weeks and weeks[-1] >= this_week - 1 else 0
        days_since = (self.today - (last_local or date(1900, 1, 1))).days
        loc_id, loc_name = self.loc_ref(c.loc)
        prog = self.programs[c.program]
        city, state, state_id, zipc, country, country_id = self.locations[c.loc]["city"]
        rec = {
            "id": c.id, "first_name": c.first, "last_name": c.last, "email": email,
            "phone_number": phone,
            "client_status_id": CLIENT_STATUS_IDS[status], "client_status": status,
            "location_id": loc_id, "location": loc_name,
            "default_program_id": prog["id"], "default_program": prog["name"],
            "date_of_birth": fmt_d(c.dob), "gender_id": c.gender[0], "gender": c.gender[1],
            "street_address_1": c.street, "street_address_2": "", "city": city,
            "state_id": state_id, "state": state, "province": "", "zipcode": zipc,
            "country_id": country_id, "country": country,
            "timezone_id": self.locations[0]["tz_id"], "timezone": self.tz_name,
            "height_measurement_1": 5 + c.key[2] % 2, "height_measurement_2": c.key[2] % 12,
            "height1_system_of_measure": "ft", "height2_system_of_measure": "in",
            "weight": float(55 + c.key[0] % 50), "weight_system_of_measure": "kg",
            "is_email_subscribed": c.key[0] % 5 != 0, "is_sms_subscribed": c.key[0] % 3 == 0,
            "tags": c.tags,
            "emergency_contact_name": c.emergency[0], "emergency_contact_phone": c.emergency[1],
            "last_attendance": fmt_dt(last), "days_since_last_attendance": days_since,
            "member_since": fmt_d(c.member_since), "last_contacted": SENT_DT,
            "is_at_risk": status == "Active" and days_since > 14,
            "retain_snooze_until_date": SENT_DATE,
            "lead_source_id": c.lead_source[0], "lead_source": c.lead_source[1],
            "referring_user_id": 0, "referring_user": "",
            "is_converted_from_lead": c.converted,
            "client_owner_id": c.owner[0], "client_owner": c.owner[1],
            "total_class_sign_ins": len(sis), "total_booking_sign_ins": 0,
            "last_class_sign_in": fmt_dt(last), "last_booking_sign_in": SENT_DT,
            "current_weekstreak": current, "highest_weekstreak": best,
            "current_weekstreak_updatedon": fmt_dt(last),
            "coach_title": "", "coach_bio": "", "is_display_coach_on_mobile_app": False,
        }
        for i in range(1, 6):
            rec[f"coach_link_{i}_icon"] = ""
            rec[f"coach_link_{i}_url"] = ""
        rec["next_class_reservation"] = SENT_DT
        rec["next_appointment_booking"] = SENT_DT
        block = audit("created", c.by[0], c.by[1], c.created)
        rec["created" if single else "created_on"] = block
        rec["updated"] = audit("updated", self.staff[0][0], self.staff[0][1], upd)
        if single:
            mems = [m for m in c.memberships if m.created < cut and m.deleted_at is None]
            overdue = any(inv.created < cut and inv.due < self.today and
                          [e for e in inv.events if e[0] < cut][-1][1] == "Unpaid"
                          for inv in c.invoices)
            rec.update({
                "billing_cc_email": "", "notes": "",
                "group": {"group_id": 0, "group_role_id": 0, "group_role": "",
                          "other_group_participants": []},
                "status_history": [{"from_status_id": CLIENT_STATUS_IDS[a[1]], "from_status": a[1],
                                    "to_status_id": CLIENT_STATUS_IDS[b[1]], "to_status": b[1],
                                    "status_change_datetime": fmt_dt(b[0])}
                                   for a, b in zip(hist, hist[1:])],
                "has_overdue_invoices": overdue,
                "has_membership": any(m.start <= self.today <= m.end for m in mems),
                "has_payment_method": c.method != "Cash", "has_store_credit": False,
                "days_since_last_attended": days_since, "is_initial_email_sent": True,
                "lead_id": 0, "member_deactivation_reason": "" if status == "Active" else "Membership ended",
                "roles": [{"id": 1, "role": "Client"}],
                "available_programs": [{"program_id": p["id"], "program": p["name"]}
                                       for p in self.programs if p["is_active"]],
                "coach_services": [], "coach_programs": [], "coach_locations": [],
            })
        return rec

    def r_client_single(self, c):
        return self._r_client(c, single=True)

    def invoice_single(self, inv):
        return self._r_invoice(inv, details=True)


# --------------------------------------------------------------------------------------
# Search / sort / paging
# --------------------------------------------------------------------------------------

DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
DT_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?Z?$")
OPS = {"lt", "lte", "gt", "gte", "eq", "neq", "between", "in", "not_in", "is_null",
       "not_null", "contains", "starts_with", "ends_with"}


class QueryError(Exception):
    pass


def field_path(sample, name):
    """Top-level field, or a leaf of a nested object (created_on_datetime ...)."""
    if name in sample and not isinstance(sample[name], (dict, list)):
        return (name,)
    for k, v in sample.items():
        if isinstance(v, dict) and name in v and not isinstance(v[name], (dict, list)):
            return (k, name)
    raise QueryError(f"Unknown or unsupported field '{name}'")


def field_type(v):
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if DATE_RE.match(v):
        return "date"
    if DT_RE.match(v):
        return "datetime"
    return "text"


def get_path(rec, path):
    v = rec[path[0]]
    return v[path[1]] if len(path) == 2 else v


def norm_dt(v):
    """Canonical comparable datetime text (YYYY-MM-DDTHH:MM:SS)."""
    v = v.rstrip("Z").split(".")[0]
    return v + "T00:00:00" if len(v) == 10 else v


def parse_literal(raw, ftype):
    raw = raw.strip()
    quoted = len(raw) >= 2 and raw[0] == "'" and raw[-1] == "'"
    if ftype == "text":
        if quoted:
            raw = raw[1:-1]
        if "'" in raw:
            raise QueryError("Unbalanced quote in value")
        return raw.casefold()
    if quoted:
        raise QueryError(f"Quoted value {raw} for a non-text field")
    if ftype == "number":
        try:
            return float(raw)
        except ValueError:
            raise QueryError(f"Invalid number '{raw}'")
    if ftype == "bool":
        if raw.lower() not in ("true", "false"):
            raise QueryError(f"Invalid boolean '{raw}'")
        return raw.lower() == "true"
    if ftype == "date":
        if not (DATE_RE.match(raw) or DT_RE.match(raw)):
            raise QueryError(f"Invalid date '{raw}'")
        try:
            date.fromisoformat(raw[:10])
        except ValueError:
            raise QueryError(f"Invalid date '{raw}'")
        return raw[:10]
    if ftype == "datetime":
        if not (DATE_RE.match(raw) or DT_RE.match(raw)):
            raise QueryError(f"Invalid datetime '{raw}'")
        try:
            datetime.fromisoformat(norm_dt(raw))
        except ValueError:
            raise QueryError(f"Invalid datetime '{raw}'")
        return norm_dt(raw)
    raise QueryError("Unsupported field type")


def value_of(rec, path, ftype):
    v = get_path(rec, path)
    if ftype == "text":
        return v.casefold()
    if ftype == "datetime":
        return norm_dt(v)
    if ftype == "number":
        return float(v)
    return v


OP_FUNCS = {
    "lt": lambda v, x, t: v < x, "lte": lambda v, x, t: v <= x,
    "gt": lambda v, x, t: v > x, "gte": lambda v, x, t: v >= x,
    "eq": lambda v, x, t: v == x, "neq": lambda v, x, t: v != x,
    "between": lambda v, x, t: x[0] <= v <= x[1],
    "in": lambda v, x, t: v in x, "not_in": lambda v, x, t: v not in x,
    # "null" means the sentinel the API uses instead of null
    "is_null": lambda v, x, t: v == SENTINELS.get(t),
    "not_null": lambda v, x, t: v != SENTINELS.get(t),
    "contains": lambda v, x, t: x in v, "starts_with": lambda v, x, t: v.startswith(x),
    "ends_with": lambda v, x, t: v.endswith(x),
}

SENTINELS = {"date": SENT_DATE, "datetime": "1900-01-01T00:00:00", "number": 0.0, "text": ""}


def compile_query(q, sample):
    """Parse `field|op|value;...` into a predicate.  sample=None -> no records to check."""
    clauses = []
    for part in q.split(";"):
        if not part.strip():
            continue
        bits = part.split("|")
        if len(bits) < 2:
            raise QueryError(f"Malformed clause '{part}'")
        field, op = bits[0].strip(), bits[1].strip().lower()
        if op not in OPS:
            raise QueryError(f"Unknown operator '{op}'")
        nargs = {"is_null": 0, "not_null": 0, "between": 2}.get(op, 1)
        args = bits[2:]
        if len(args) != nargs and not (nargs == 0 and args in ([], [""])):
            raise QueryError(f"Wrong number of values in '{part}'")
        if sample is None:
            continue
        path = field_path(sample, field)
        ftype = field_type(get_path(sample, path))
        if op in ("contains", "starts_with", "ends_with") and ftype != "text":
            raise QueryError(f"Operator {op} needs a text field")
        if op in ("in", "not_in"):
            a = args[0].strip()
            if not (a.startswith("{") and a.endswith("}")):
                raise QueryError("in/not_in need a {v1,v2} list")
            val = {parse_literal(x, ftype) for x in a[1:-1].split(",") if x.strip()}
        elif nargs == 2:
            val = (parse_literal(args[0], ftype), parse_literal(args[1], ftype))
        elif nargs == 1:
            val = parse_literal(args[0], ftype)
        else:
            val = None
        clauses.append((path, ftype, op, val))

    def pred(rec):
        for path, ftype, op, val in clauses:
            if not OP_FUNCS[op](value_of(rec, path, ftype), val, ftype):
                return False
        return True
    pred.clauses = clauses
    return pred


# Which positions of a field's sorted values a comparison keeps: (from, to) as bisect
# functions of the value, None for an open end.
RANGE_OPS = {"gte": (bisect.bisect_left, None), "gt": (bisect.bisect_right, None),
             "lt": (None, bisect.bisect_left), "lte": (None, bisect.bisect_right),
             "eq": (bisect.bisect_left, bisect.bisect_right)}


def narrow(index, coll, clauses):
    """The records of coll that can pass the range clauses (gte, gt, lt, lte, eq,
    between), in coll's order: a superset of what the predicate keeps, found by
    bisecting each field's sorted values instead of testing every record (a windowed
    search of a large gym's invoices tested all of them for every month).  index maps
    (path, ftype) to (coll, values sorted, positions in the same order), built on
    first use; the caller still applies the predicate to what this returns."""
    lo, hi, path_bounds = 0, len(coll), {}
    for path, ftype, op, val in clauses:
        if op not in RANGE_OPS and op != "between":
            continue
        ent = index.get((path, ftype))
        if ent is None or ent[0] is not coll:
            try:
                vals = sorted((value_of(r, path, ftype), i) for i, r in enumerate(coll))
                ent = (coll, [v for v, _ in vals], [i for _, i in vals])
            except TypeError:       # values that do not compare: no index
                ent = (coll, None, None)
            index[(path, ftype)] = ent
        keys = ent[1]
        if keys is None:
            continue
        a, b = path_bounds.get((path, ftype), (0, len(keys)))
        try:
            if op == "between":
                a, b = max(a, bisect.bisect_left(keys, val[0])), min(b, bisect.bisect_right(keys, val[1]))
            else:
                f, t = RANGE_OPS[op]
                if f:
                    a = max(a, f(keys, val))
                if t:
                    b = min(b, t(keys, val))
        except TypeError:
            continue
        path_bounds[(path, ftype)] = (a, b)
    if not path_bounds:
        return coll
    (path, ftype), (a, b) = min(path_bounds.items(), key=lambda x: x[1][1] - x[1][0])
    return [coll[i] for i in sorted(index[(path, ftype)][2][a:b])] if a < b else []


def sort_records(records, sort, sample):
    out = sorted(records, key=lambda r: r["id"])   # ties always broken by ascending id
    if not sort:
        return out
    desc = sort.startswith("desc_")
    name = sort[5:] if desc else sort
    if sample is None:
        return out
    path = field_path(sample, name)
    ftype = field_type(get_path(sample, path))
    out.sort(key=lambda r: value_of(r, path, ftype), reverse=desc)   # stable
    return out


# --------------------------------------------------------------------------------------
# Server state
# --------------------------------------------------------------------------------------

ROUTES = [
    ("/customers/locations", "locations"),
    ("/customers/employees", "employees"),
    ("/programs", "programs"),
    ("/programs/{id}", "program"),
    ("/clients", "clients"),
    ("/clients/search", "clients"),
    ("/clients/{id}", "client"),
    ("/clients/{id}/classes/sign-ins", "signins"),
    ("/clients/{id}/classes/sign-ins/search", "signins"),
    ("/memberships", "memberships"),
    ("/memberships/search", "memberships"),
    ("/memberships/holds", "holds"),
    ("/memberships/holds/search", "holds"),
    ("/memberships/holds/{id}", "hold"),
    ("/memberships/{id}", "membership"),
    ("/financials/invoices", "invoices"),
    ("/financials/invoices/search", "invoices"),
    ("/financials/invoices/{id}", "invoice"),
    ("/financials/transactions", "transactions"),
    ("/financials/transactions/search", "transactions"),
    ("/financials/transactions/{id}", "transaction"),
]
LIST_KEYS = {"locations": "locations", "employees": "Employees", "programs": "programs",
             "clients": "clients", "signins": "class_sign_ins", "memberships": "memberships",
             "holds": "membership_holds", "invoices": "invoices", "transactions": "transactions"}


def match_route(path):
    """Exact segments first (so /memberships/holds beats /memberships/{id})."""
    segs = [s for s in path.split("/") if s]
    best = None
    for tpl, kind in ROUTES:
        tsegs = [s for s in tpl.split("/") if s]
        if len(tsegs) != len(segs):
            continue
        ids, ok, score = [], True, 0
        for t, s in zip(tsegs, segs):
            if t == "{id}":
                ids.append(s)
            elif t != s:
                ok = False
                break
            else:
                score += 1
        if ok and (best is None or score > best[0]):
            best = (score, tpl, kind, ids)
    return (best[1], best[2], best[3]) if best else (None, None, None)


class Model:
    """All gyms for one value of today (immutable once built; swapped on advance)."""

    def __init__(self, seed, ngyms, scale, anchor, today):
        self.today = today
        self.gyms = []
        scales = scale.split(",")
        for i in range(ngyms):
            # one scale for every gym, or one per gym with the last repeated
            g = Gym(seed, i, scales[min(i, len(scales) - 1)], anchor, today)
            g.render()
            self.gyms.append(g)
        self.by_key = {g.api_key: g for g in self.gyms}


class Sim:
    def __init__(self, args):
        self.args = args
        self.seed, self.ngyms, self.scale = args.seed, args.gyms, args.scale
        self.today = date.fromisoformat(args.today) if args.today else datetime.now(timezone.utc).date()
        # History starts 30 months before the start-up today; advance keeps this anchor.
        self.anchor = (date.fromisoformat(args.history_start) if args.history_start
                       else add_months(month_start(self.today), -30))
        self.lock = threading.Lock()
        self.model = Model(self.seed, self.ngyms, self.scale, self.anchor, self.today)
        self.keys = [g.api_key for g in self.model.gyms]
        self.buckets = {}
        # The token buckets' clock (seconds).  It follows time.monotonic() until a test
        # freezes it through POST /_sim/clock; then only the test moves it, so what the
        # throttle answers no longer depends on how fast this machine happens to be.
        self.clock_frozen_at = None     # the frozen reading, or None while running
        self.clock_offset = 0.0         # running reading = monotonic() + offset
        self.resume_after_throttled = None
        self.quota_used = {}
        self.faults, self.fault_seq = [], 0
        self.hold_events, self.held = {}, 0   # hold fault id -> Event; requests held now
        self.extra_keys, self.revoked = {}, set()   # api_key -> gym index; refused keys
        self.entitlements = []          # (api_key or None, prefix)
        # Transactions a test posted (POST /_sim/transactions), per key, and the keys
        # whose generated transactions are withheld; they survive /_sim/advance.
        self.posted, self.posted_seq, self.withheld = {}, 0, set()
        # Answers are cached per generation: every change to what the vendor serves
        # (advance, a posted transaction) starts a new one, and an answer computed
        # from an older generation is never stored (a request in flight across the
        # change would otherwise cache what the vendor no longer says).
        self.generation = 0
        self.cache = {}                 # (generation, gym, kind, client, q, sort) -> list
        self.pages = {}                 # cache key + (page, size) -> rendered body bytes
        self.pages_bytes = 0
        # --no-cache serves every answer the slow, obvious way (no page cache, no
        # search index): the reference the self-test compares the fast path with.
        self.fast = not args.no_cache
        self.reset_stats()

    def reset_stats(self):
        with self.lock:
            self.stats = {"total": 0, "by_endpoint": {}, "throttled_429": 0, "quota_429": 0, "by_gym": {},
                          "by_key": {}}

    def count(self, tpl, status, kind=None, key=None, outcome=None):
        """Count one request by endpoint and status, and by the gym of its key (the index, or
        "unknown") and outcome: 2xx, 429, 4xx, 5xx, network (a reset or a truncated body),
        envelope (an HTTP 200 carrying an HTTPCode error) or slow (a delayed answer, which a
        client with a shorter timeout never sees)."""
        if outcome is None:
            s = int(status)
            outcome = ("2xx" if 200 <= s <= 299 else "429" if s == 429 else "5xx" if 500 <= s <= 599
                       else "4xx")
        gym = self.gym_for(key)
        with self.lock:
            self.stats["total"] += 1
            if key:
                self.stats["by_key"][key] = self.stats["by_key"].get(key, 0) + 1
            ep = self.stats["by_endpoint"].setdefault(tpl, {})
            ep[str(status)] = ep.get(str(status), 0) + 1
            if kind == "throttle":
                self.stats["throttled_429"] += 1
            elif kind == "quota":
                self.stats["quota_429"] += 1
            per = self.stats["by_gym"].setdefault(str(gym.index) if gym else "unknown", {})
            per[outcome] = per.get(outcome, 0) + 1

    def clock(self):
        """The bucket clock's reading; call with self.lock held."""
        if self.clock_frozen_at is not None:
            return self.clock_frozen_at
        return time.monotonic() + self.clock_offset

    def set_clock(self, freeze=None, advance_s=0.0, resume_after_throttled=None):
        """Freeze or resume the bucket clock (resuming continues from the frozen reading,
        without a jump), move it forward, and optionally let it resume by itself after
        the next N throttled answers.  Call with self.lock held."""
        if freeze is True and self.clock_frozen_at is None:
            self.clock_frozen_at = self.clock()
        elif freeze is False and self.clock_frozen_at is not None:
            self.clock_offset = self.clock_frozen_at - time.monotonic()
            self.clock_frozen_at = None
            self.resume_after_throttled = None
        if advance_s:
            if self.clock_frozen_at is not None:
                self.clock_frozen_at += advance_s
            else:
                self.clock_offset += advance_s
        if resume_after_throttled is not None:
            self.resume_after_throttled = resume_after_throttled

    def bucket_tokens(self, key, now):
        tokens, last = self.buckets.get(key, (float(self.args.burst), now))
        return min(float(self.args.burst), tokens + max(0.0, now - last) * self.args.rate)

    def admit(self, key):
        """Monthly quota, then the per-key token bucket.  Returns None or 'quota'/'throttle'."""
        with self.lock:
            month = datetime.now(timezone.utc).strftime("%Y-%m")
            used = self.quota_used.get((key, month), 0)
            if used >= self.args.quota:
                return "quota"
            now = self.clock()
            tokens = self.bucket_tokens(key, now)
            if tokens < 1.0:
                self.buckets[key] = (tokens, now)
                if self.resume_after_throttled is not None:
                    self.resume_after_throttled -= 1
                    if self.resume_after_throttled <= 0:
                        self.set_clock(freeze=False)
                return "throttle"
            self.buckets[key] = (tokens - 1.0, now)
            self.quota_used[(key, month)] = used + 1
            return None

    def gym_for(self, key):
        """The gym a key belongs to: its own, one added by POST /_sim/keys, or None."""
        if key is None or key in self.revoked:
            return None
        if key in self.extra_keys:
            return self.model.gyms[self.extra_keys[key]]
        return self.model.by_key.get(key)

    def hold(self, fault):
        """Keep a request caught by a "hold" fault until POST /_sim/release (or max_s)."""
        with self.lock:
            ev = self.hold_events.setdefault(fault["id"], threading.Event())
            self.held += 1
        try:
            ev.wait(float(fault.get("max_s", 600)))
        finally:
            with self.lock:
                self.held -= 1

    def release(self, fault_id=None):
        """Let every held request go, and every hold fault that fires later too; with an
        id, only that hold fault's."""
        with self.lock:
            for f in self.faults:
                if f["kind"] == "hold" and fault_id in (None, f["id"]):
                    self.hold_events.setdefault(f["id"], threading.Event()).set()

    def take_fault(self, key, tpl, path):
        with self.lock:
            for f in self.faults:
                if f["remaining"] <= 0:
                    continue
                if f.get("api_key") and f["api_key"] != key:
                    continue
                ep = f.get("endpoint")
                if ep and ep != tpl and not path.startswith(ep):
                    continue
                # a body rewrite is about one list: /memberships is not /memberships/holds
                if f["kind"] in BODY_FAULTS and ep and ep != tpl:
                    continue
                # "after": N lets N matching requests through first, so a test can stop
                # a run at an exact page without racing it.
                if f.get("after", 0) > 0:
                    f["after"] -= 1
                    continue
                f["remaining"] -= 1
                return dict(f)
        return None

    def entitled(self, key, path):
        with self.lock:
            return not any((k is None or k == key) and path.startswith(p) for k, p in self.entitlements)

    def advance(self, days):
        new_today = self.model.today + timedelta(days=days)
        model = Model(self.seed, self.ngyms, self.scale, self.anchor, new_today)
        with self.lock:
            self.model, self.today = model, new_today
            self.apply_posted()
        return new_today

    def apply_posted(self):
        """Serve every gym's transactions as generated (unless withheld) plus those posted
        by a test.  Call with self.lock held."""
        for g in self.model.gyms:
            posted = self.posted.get(g.api_key, [])
            g.r_txns = ([] if g.api_key in self.withheld else g.r_txns_generated) + posted
        self.generation += 1
        self.cache.clear()
        self.pages.clear()
        self.pages_bytes = 0

    def post_transaction(self, key, data):
        """A transaction the vendor records now with the time stamp the test chose (a
        payment entered late with its real date, or one dated ahead): a Payment on the
        gym's newest invoice, with an id above every generated one."""
        gym = self.model.by_key[key]
        at = datetime.fromisoformat(str(data["transaction_date_time"]).replace("Z", "+00:00"))
        at = at.astimezone(timezone.utc).replace(tzinfo=None, microsecond=0)
        inv = gym.r_invoices[-1]
        with self.lock:
            self.posted_seq += 1
            rec = {"id": 990_000_000 + self.posted_seq, "invoice_id": inv["id"], "client_id": inv["client_id"],
                   "location_id": inv["location_id"], "transaction_date_time": fmt_dt(at),
                   "amount": float(data.get("amount", 10.0)),
                   "transaction_type": data.get("transaction_type", "Payment"),
                   "payment_method": data.get("payment_method", "Card"),
                   "created": audit("created", 0, "System", at)}
            self.posted.setdefault(key, []).append(rec)
            self.apply_posted()
        return rec

    def gyms_json(self):
        m = self.model
        return {"today": m.today.isoformat(), "history_start": self.anchor.isoformat(),
                "gyms": [{"index": g.index, "name": g.name, "api_key": g.api_key,
                          "time_zone": g.tz_name,
                          "location_ids": [l["id"] for l in g.locations],
                          "backfill_since": fmt_dt(datetime.combine(g.backfill_since, datetime.min.time())),
                          "expected": g.expected} for g in m.gyms]}


# Faults that serve the normal answer with its records rewritten (poison_page).
BODY_FAULTS = ("poison", "bloat")
POISON_REASONS = ("nul", "bad_escape", "invalid_utf8", "bad_number", "too_large", "no_id", "not_object")
_UTF8_MARK, _NUMBER_MARK = "@@sim-poison-utf8@@", "@@sim-poison-number@@"


def poison_page(body, fault):
    """A list page with some records made into what PostgreSQL cannot store, or every
    record made big.  The page cache keeps the clean body; this rewrites a copy.

      {"kind": "poison", "records": [{"id": N, "reason": R}, ...], "pad_bytes": B}
          the records with these ids become poison of reason R (POISON_REASONS):
          a \\u0000 escape, a lone surrogate escape, bytes that are not UTF-8, a
          number no numeric holds, a B-byte string (too_large), no id, not an object
      {"kind": "bloat", "pad_bytes": B, "max_records": M}
          the first M records (all by default) get a B-byte string field, so a
          test can serve a page of huge records near the client's size cap

    Removing the fault (DELETE /_sim/faults) is the vendor fixing its data: the
    same records are served as they were."""
    doc = json.loads(body)
    key = next((k for k, v in doc.items() if isinstance(v, list)), None) if isinstance(doc, dict) else None
    if key is None:
        return body
    pad = int(fault.get("pad_bytes", 1024))
    if fault["kind"] == "bloat":
        limit = int(fault.get("max_records", len(doc[key])))
        # compressible on purpose: the test is about the client's memory, not its disk
        doc[key] = [dict(r, sim_pad="x" * pad) if i < limit and isinstance(r, dict) else r
                    for i, r in enumerate(doc[key])]
        return json.dumps(doc, separators=(",", ":")).encode()
    targets = {int(r["id"]): r.get("reason", "nul") for r in fault.get("records", [])}
    out = []
    for rec in doc[key]:
        reason = targets.get(rec.get("id")) if isinstance(rec, dict) else None
        if reason is not None:
            rec = dict(rec)
            if reason == "nul":
                rec["sim_note"] = "bad\x00byte"          # json.dumps writes \u0000
            elif reason == "bad_escape":
                rec["sim_note"] = "lone \ud800 surrogate"  # written as \ud800
            elif reason == "invalid_utf8":
                rec["sim_note"] = _UTF8_MARK
            elif reason == "bad_number":
                rec["sim_note"] = _NUMBER_MARK
            elif reason == "too_large":
                rec["sim_note"] = "x" * pad
            elif reason == "no_id":
                del rec["id"]
            elif reason == "not_object":
                rec = [rec["id"]]
        out.append(rec)
    doc[key] = out
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return (raw.replace(f'"{_UTF8_MARK}"'.encode(), b'"bad \xff\xfe bytes"')
               .replace(f'"{_NUMBER_MARK}"'.encode(), b"1e999999"))


def envelope_error(code, err, dev, user):
    return {"HTTPCode": code, "ErrorCode": err, "DeveloperMessage": dev, "UserMessage": user,
            "MoreInfo": ""}


GATEWAY_BODIES = {500: "Internal server error", 502: "Bad Gateway", 503: "Service Unavailable",
                  504: "Endpoint request timed out"}


class Abort(Exception):
    """Raised after a deliberate connection reset; swallowed by handle()."""


# --------------------------------------------------------------------------------------
# HTTP handler
# --------------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "WodifySim/1.0"
    sys_version = ""

    def log_message(self, *a):
        pass

    def setup(self):
        super().setup()
        # Without TCP_NODELAY a response that leaves in two segments waits for the
        # client's delayed ACK (about 40 ms on Linux) before its second segment.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self):
        try:
            super().handle()
        except (Abort, ConnectionError, BrokenPipeError):
            self.close_connection = True

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_PATCH(self):
        self.dispatch("PATCH")

    # ---- output -------------------------------------------------------------------------

    def send_json(self, status, obj, headers=None, fault=None):
        """Send obj (or a pre-rendered JSON body, as bytes) with its headers in one write."""
        body = obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()
        kind = fault["kind"] if fault else None
        if kind == "slow" and not fault.get("trickle"):
            time.sleep(float(fault.get("delay_s", 5)))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if kind != "truncate" and not (kind == "slow" and fault.get("trickle")):
            # Head and body in one write: one segment train, no wait for an ACK.
            self._headers_buffer.append(b"\r\n")
            self._headers_buffer.append(body)
            self.flush_headers()
            return
        self.end_headers()
        if kind == "truncate":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if kind == "slow" and fault.get("trickle"):
            chunks = 10
            step = max(1, len(body) // chunks + 1)
            for i in range(0, len(body), step):
                self.wfile.write(body[i:i + step])
                self.wfile.flush()
                time.sleep(float(fault.get("delay_s", 5)) / chunks)
            return

    def reset_connection(self):
        # SO_LINGER 0 turns close() into a TCP RST; the makefile objects hold references, so
        # close them first or the socket would linger open.
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()
            self.wfile.close()
            self.connection.close()
        except OSError:
            pass
        self.close_connection = True
        raise Abort()

    # ---- dispatch -----------------------------------------------------------------------

    def dispatch(self, method):
        sim = self.server.sim
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        if path == "/_sim" or path.startswith("/_sim/"):
            return self.sim_route(sim, method, path, params, body)

        tpl, kind, ids = match_route(path)
        label = tpl or "(unknown)"
        key = self.headers.get("x-api-key")
        decoded = unquote_plus(unquote(self.path))
        if any(k in self.path or k in decoded for k in sim.keys):
            sim.count(label, 400, key=key)
            return self.send_json(400, {"message": "API keys must be sent in the x-api-key header, never in the URL"})
        if tpl is None or method != "GET":
            sim.count(label, 403, key=key)
            return self.send_json(403, {"message": "Missing Authentication Token"})
        with sim.lock:
            generation = sim.generation
            gym = sim.gym_for(key)
        if gym is None or not sim.entitled(key, path):
            sim.count(label, 403, key=key)
            return self.send_json(403, {"message": "Forbidden"})
        verdict = sim.admit(key)
        if verdict:
            sim.count(label, 429, verdict, key=key)
            hdrs = {"Retry-After": str(sim.args.retry_after)} if verdict == "throttle" and sim.args.retry_after is not None else None
            return self.send_json(429, {"message": "Too Many Requests" if verdict == "throttle" else "Limit Exceeded"}, hdrs)

        fault = sim.take_fault(key, tpl, path)
        if fault:
            fk = fault["kind"]
            ra = {"Retry-After": str(fault["retry_after"])} if fault.get("retry_after") is not None else None
            if fk == "reset":
                sim.count(label, "reset", key=key, outcome="network")
                self.reset_connection()
            if fk == "status":
                st = int(fault.get("status", 500))
                sim.count(label, st, key=key)
                return self.send_json(st, {"message": GATEWAY_BODIES.get(st, "Gateway error")}, ra)
            if fk == "quota":
                sim.count(label, 429, "quota", key=key)
                return self.send_json(429, {"message": "Limit Exceeded"}, ra)
            if fk == "throttle":
                sim.count(label, 429, "throttle", key=key)
                return self.send_json(429, {"message": "Too Many Requests"}, ra)
            if fk == "envelope":
                code = int(fault.get("http_code", 500))
                sim.count(label, 200, key=key, outcome="envelope")
                return self.send_json(200, envelope_error(code, "SIMULATED_ERROR", "Injected fault",
                                                          "An error occurred."))
            if fk == "hold":
                sim.hold(fault)
            # slow / truncate / hold fall through to a normal body
        status, obj = self.api(sim, generation, gym, kind, ids, params)
        fk = fault["kind"] if fault else None
        if fk in BODY_FAULTS and status == 200 and isinstance(obj, bytes):
            obj = poison_page(obj, fault)
        sim.count(label, status, key=key,
                  outcome={"slow": "slow", "truncate": "network"}.get(fk)
                  or ("envelope" if isinstance(obj, dict) and "HTTPCode" in obj else None))
        self.send_json(status, obj, fault=fault if fault and fault["kind"] in ("slow", "truncate") else None)

    # ---- API handlers -------------------------------------------------------------------

    def api(self, sim, generation, gym, kind, ids, params):
        not_found = (200, envelope_error(404, "NOT_FOUND", "Record not found for the given id",
                                         "The requested record was not found."))
        if kind in ("client", "membership", "invoice", "transaction", "hold", "program") or kind == "signins":
            raw = ids[0]
            if not raw.isdigit():
                return 200, envelope_error(404, "INVALID_ID", f"'{raw}' is not a valid id",
                                           "The requested record was not found.")
            rid = int(raw)
        if kind == "client":
            c = gym.client_by_id.get(rid)
            return (200, gym.r_client_single(c)) if c else not_found
        if kind in ("membership", "invoice", "transaction", "hold", "program"):
            if kind == "invoice":
                inv = gym.invoice_by_id.get(rid)
                return (200, gym.invoice_single(inv)) if inv else not_found
            coll = {"membership": gym.r_memberships, "transaction": gym.r_txns,
                    "hold": gym.r_holds, "program": gym.r_programs}[kind]
            rec = next((r for r in coll if r["id"] == rid), None)
            return (200, rec) if rec else not_found
        if kind == "signins":
            c = gym.client_by_id.get(rid)
            if c is None:
                return not_found
            sample = gym.sample_signin
            loader = lambda: [gym.r_signin(s) for s in gym.signins_by_client.get(rid, [])]
        else:
            coll = {"locations": gym.r_locations, "employees": gym.r_employees,
                    "programs": gym.r_programs, "clients": gym.r_clients,
                    "memberships": gym.r_memberships, "holds": gym.r_holds,
                    "invoices": gym.r_invoices, "transactions": gym.r_txns}[kind]
            sample = coll[0] if coll else None
            loader = lambda: coll
            rid = 0
        q = params.get("q", "") if self.path.split("?")[0].rstrip("/").endswith("/search") else ""
        sort = params.get("sort", "")
        ck = (generation, gym.index, kind, rid, q, sort)
        try:
            page = max(1, int(params.get("page", 1)))
        except ValueError:
            page = 1
        try:
            size = min(100, max(1, int(params.get("page_size", 100))))
        except ValueError:
            size = 100
        # A page is rendered once: serving it again costs no JSON encoding, so the
        # simulator is not what a fast client waits for.
        pk = ck + (page, size)
        with sim.lock:
            rendered = sim.pages.get(pk) if sim.fast else None
            rows = sim.cache.get(ck) if rendered is None and sim.fast else None
        if rendered is not None:
            return 200, rendered
        if rows is None:
            try:
                rows = loader()
                if q:
                    pred = compile_query(q, sample)
                    if sim.fast and kind != "signins":
                        rows = narrow(gym.search_index.setdefault(kind, {}), rows, pred.clauses)
                    rows = [r for r in rows if pred(r)]
                elif sort and sample is not None:
                    field_path(sample, sort[5:] if sort.startswith("desc_") else sort)
                rows = sort_records(rows, sort, sample)
            except QueryError as e:
                return 200, envelope_error(400, "INVALID_SEARCH", str(e), "Invalid search criteria.")
            with sim.lock:
                if len(sim.cache) > 512:
                    sim.cache.clear()
                if sim.generation == generation:
                    sim.cache[ck] = rows
        chunk = rows[(page - 1) * size: page * size]
        rendered = json.dumps({LIST_KEYS[kind]: chunk,
                               "pagination": {"page": page, "page_size": size,
                                              "has_more": page * size < len(rows)},
                               "wodify_validation_result": ""}, separators=(",", ":")).encode()
        if not sim.fast:
            return 200, rendered
        limit = sim.args.page_cache_mb * 1048576
        with sim.lock:
            if sim.pages_bytes + len(rendered) > limit:
                sim.pages.clear()
                sim.pages_bytes = 0
            # A page larger than the whole cache (every page, with --page-cache-mb 0)
            # is not kept.
            if len(rendered) <= limit and sim.generation == generation and pk not in sim.pages:
                sim.pages[pk] = rendered
                sim.pages_bytes += len(rendered)
        return 200, rendered

    # ---- /_sim ----------------------------------------------------------------------------

    def sim_route(self, sim, method, path, params, body):
        try:
            data = json.loads(body) if body.strip() else {}
        except ValueError:
            return self.send_json(400, {"error": "body is not JSON"})
        if path == "/_sim/gyms" and method == "GET":
            return self.send_json(200, sim.gyms_json())
        if path == "/_sim/stats" and method == "GET":
            with sim.lock:
                snap = json.loads(json.dumps(sim.stats))
                snap["page_cache"] = {"pages": len(sim.pages), "bytes": sim.pages_bytes}
            return self.send_json(200, snap)
        if path == "/_sim/stats/reset" and method == "POST":
            sim.reset_stats()
            return self.send_json(200, {"ok": True})
        if path == "/_sim/faults":
            if method == "GET":
                with sim.lock:
                    return self.send_json(200, {"faults": [dict(f) for f in sim.faults], "held": sim.held})
            if method == "DELETE":
                sim.release()
                with sim.lock:
                    sim.faults.clear()
                return self.send_json(200, {"ok": True})
            if method == "POST":
                kinds = ("status", "slow", "truncate", "reset", "envelope", "quota", "throttle") + BODY_FAULTS
                if data.get("kind") not in kinds:
                    return self.send_json(400, {"error": f"kind must be one of {kinds}"})
                if data["kind"] == "poison" and (
                        not isinstance(data.get("records"), list) or not data["records"]
                        or any(not isinstance(r, dict) or not isinstance(r.get("id"), int)
                               or r.get("reason", "nul") not in POISON_REASONS for r in data["records"])):
                    return self.send_json(400, {"error": "poison needs records: [{id: int, reason: one of "
                                                         f"{POISON_REASONS}}}]"})
                with sim.lock:
                    sim.fault_seq += 1
                    f = dict(data, id=sim.fault_seq, remaining=int(data.get("count", 1)))
                    sim.faults.append(f)
                return self.send_json(200, {"id": f["id"]})
        if path == "/_sim/holds" and method == "POST":
            # a fault of kind "hold", with the other faults' fields (api_key, endpoint, after, count)
            with sim.lock:
                sim.fault_seq += 1
                f = dict(data, kind="hold", id=sim.fault_seq, remaining=int(data.get("count", 1)))
                sim.faults.append(f)
            return self.send_json(200, {"id": f["id"]})
        if path == "/_sim/release" and method == "POST":
            sim.release(data.get("id"))
            return self.send_json(200, {"ok": True})
        if path == "/_sim/keys" and method == "POST":
            key = data.get("api_key")
            if not isinstance(key, str) or not key:
                return self.send_json(400, {"error": "api_key required"})
            with sim.lock:
                if data.get("revoke"):
                    sim.revoked.add(key)
                    sim.extra_keys.pop(key, None)
                else:
                    try:
                        idx = int(data["gym"])
                        sim.model.gyms[idx]
                    except (KeyError, TypeError, ValueError, IndexError):
                        return self.send_json(400, {"error": "gym must be a gym index"})
                    sim.extra_keys[key] = idx
                    sim.revoked.discard(key)
                    if key not in sim.keys:
                        sim.keys.append(key)
            return self.send_json(200, {"ok": True})
        if path == "/_sim/entitlements" and method == "POST":
            key, prefix = data.get("api_key"), data.get("endpoint_prefix", "")
            if not prefix:
                return self.send_json(400, {"error": "endpoint_prefix required"})
            with sim.lock:
                sim.entitlements = [e for e in sim.entitlements if e != (key, prefix)]
                if not data.get("entitled", False):
                    sim.entitlements.append((key, prefix))
                ents = [{"api_key": k, "endpoint_prefix": p} for k, p in sim.entitlements]
            return self.send_json(200, {"not_entitled": ents})
        if path == "/_sim/entitlements" and method == "GET":
            with sim.lock:
                ents = [{"api_key": k, "endpoint_prefix": p} for k, p in sim.entitlements]
            return self.send_json(200, {"not_entitled": ents})
        if path == "/_sim/transactions":
            # POST {"api_key", "transaction_date_time", "amount"?, ...}: post one;
            # POST {"api_key", "generated": false|true}: withhold the gym's generated
            # transactions (or serve them again); DELETE: back to the generated ones.
            key = data.get("api_key")
            if method in ("POST", "DELETE") and key is not None and key not in sim.keys:
                return self.send_json(400, {"error": "unknown api_key"})
            if method == "DELETE":
                with sim.lock:
                    for k in ([key] if key is not None else list(sim.keys)):
                        sim.posted.pop(k, None)
                        sim.withheld.discard(k)
                    sim.apply_posted()
                return self.send_json(200, {"ok": True})
            if method == "POST" and key is not None and "generated" in data:
                with sim.lock:
                    (sim.withheld.discard if data["generated"] else sim.withheld.add)(key)
                    sim.apply_posted()
                return self.send_json(200, {"ok": True})
            if method == "POST" and key is not None:
                try:
                    rec = sim.post_transaction(key, data)
                except (KeyError, TypeError, ValueError):
                    return self.send_json(400, {"error": "transaction_date_time (ISO 8601) required"})
                return self.send_json(200, rec)
            if method == "GET":
                with sim.lock:
                    return self.send_json(200, {"posted": sim.posted, "withheld": sorted(sim.withheld)})
            return self.send_json(400, {"error": "api_key required"})
        if path == "/_sim/clock":
            if method == "POST":
                try:
                    freeze = data.get("freeze")
                    advance = float(data.get("advance_s", 0))
                    resume = data.get("resume_after_throttled")
                    if freeze not in (None, True, False) or advance < 0 or \
                            (resume is not None and (not isinstance(resume, int) or resume < 1)):
                        raise ValueError
                except (TypeError, ValueError):
                    return self.send_json(400, {"error": "freeze is a boolean, advance_s a non-negative "
                                                         "number, resume_after_throttled a positive integer"})
                with sim.lock:
                    sim.set_clock(freeze, advance, resume)
            if method in ("GET", "POST"):
                with sim.lock:
                    return self.send_json(200, {"frozen": sim.clock_frozen_at is not None, "now": sim.clock(),
                                                "resume_after_throttled": sim.resume_after_throttled})
        if path == "/_sim/buckets":
            if method == "POST":
                key = data.get("api_key")
                try:
                    tokens = float(data["tokens"])
                    if not 0 <= tokens <= sim.args.burst:
                        raise ValueError
                except (KeyError, TypeError, ValueError):
                    return self.send_json(400, {"error": f"tokens must be a number from 0 to {sim.args.burst}"})
                if key is not None and key not in sim.keys:
                    return self.send_json(400, {"error": "unknown api_key"})
                with sim.lock:
                    now = sim.clock()
                    for k in ([key] if key is not None else sim.keys):
                        sim.buckets[k] = (tokens, now)
            if method in ("GET", "POST"):
                with sim.lock:
                    now = sim.clock()
                    return self.send_json(200, {"buckets": [{"api_key": k, "tokens": sim.bucket_tokens(k, now)}
                                                            for k in sim.keys]})
        if path == "/_sim/client_versions" and method == "GET":
            # Ground truth for versioning: per client id, a hash of its list record
            # and one of the record without the fields that move with the clock.
            try:
                gym = sim.model.gyms[int(params.get("gym", 0))]
            except (TypeError, ValueError, IndexError):
                return self.send_json(400, {"error": "gym must be a gym index"})

            def digest(rec):
                return hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:16]
            return self.send_json(200, {
                "today": gym.today.isoformat(), "volatile": list(VOLATILE_CLIENT_FIELDS),
                "clients": {str(r["id"]): {"full": digest(r),
                                           "stable": digest({k: v for k, v in r.items()
                                                             if k not in VOLATILE_CLIENT_FIELDS})}
                            for r in gym.r_clients}})
        if path == "/_sim/truth" and method == "GET":
            try:
                idx = int(params.get("gym", 0))
                gym = sim.model.gyms[idx]
            except (TypeError, ValueError, IndexError):
                return self.send_json(400, {"error": "gym must be a gym index"})
            return self.send_json(200, gym.truth())
        if path == "/_sim/advance" and method == "POST":
            try:
                days = int(params.get("days", data.get("days", 1)))
                if days < 0:
                    raise ValueError
            except (TypeError, ValueError):
                return self.send_json(400, {"error": "days must be a non-negative integer"})
            new_today = sim.advance(days)
            return self.send_json(200, {"today": new_today.isoformat()})
        return self.send_json(404, {"error": f"unknown simulator route {method} {path}"})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        pass   # a client hanging up mid-response is normal in fault tests


def main(argv=None):
    ap = argparse.ArgumentParser(description="Wodify API v1 simulator")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--gyms", type=int, default=1)
    ap.add_argument("--scale", default="small",
                    help=f"one of {', '.join(sorted(SCALES))}, or a comma list: gym i gets the "
                         "i-th scale, the last one repeating")
    ap.add_argument("--rate", type=float, default=5.0)
    ap.add_argument("--burst", type=int, default=20)
    ap.add_argument("--quota", type=int, default=500000)
    ap.add_argument("--today", default=None, help="YYYY-MM-DD (default: current UTC date)")
    ap.add_argument("--retry-after", dest="retry_after", type=int, default=None)
    ap.add_argument("--page-cache-mb", dest="page_cache_mb", type=int, default=1024,
                    help="memory for rendered pages, served again without re-encoding")
    ap.add_argument("--no-cache", dest="no_cache", action="store_true",
                    help="render every answer from scratch (the reference for the fast path)")
    ap.add_argument("--history-start", dest="history_start", default=None,
                    help="YYYY-MM-DD; pins the model's first day (default: 1st of the month "
                         "30 months before --today).  Lets a fresh start reproduce an "
                         "advanced model even when advance crossed a month boundary.")
    args = ap.parse_args(argv)
    if any(x not in SCALES for x in args.scale.split(",")):
        ap.error(f"--scale: choose from {', '.join(sorted(SCALES))}")

    sim = Sim(args)
    srv = Server(("127.0.0.1", args.port), Handler)
    srv.sim = sim

    def stop(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"listening on {srv.server_address[1]}", flush=True)
    try:
        srv.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
