#!/usr/bin/env bash
# Release metadata a packager (PGXN, Debian) reads, checked without a server:
#  - META.json parses, its license is the PostgreSQL License, its version agrees
#    with ironwod.control, and every provides.*.file is a committed file;
#  - README.md carries the license text and a changelog;
#  - the top level holds only the fixed layout of design.md §1 (plus dotfiles);
#  - released scripts are never edited: each is pinned below by its SHA-256 (a
#    release adds its upgrade script here when it is tagged); the upgrade script
#    to the unreleased default version is the only other committed script, and
#    the default version's install script is not committed (it is assembled from
#    sql/modules/).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
python3 - <<'PY'
import json, os, re, subprocess, sys

problems = []
meta = json.load(open("META.json"))
if meta.get("license") != "postgresql":
    problems.append(f"META.json license is {meta.get('license')!r}, not 'postgresql'")
control = open("ironwod.control").read()
m = re.search(r"^default_version\s*=\s*'([^']+)'", control, re.M)
want = (m.group(1) + ".0") if m and m.group(1).count(".") == 1 else (m.group(1) if m else None)
if meta.get("version") != want:
    problems.append(f"META.json version {meta.get('version')} does not match ironwod.control's {want}")

in_git = os.path.isdir(".git") or os.path.isfile(".git")
tracked = set()
if in_git:
    tracked = set(subprocess.run(["git", "ls-files"], capture_output=True, text=True, check=True).stdout.split())
for name, p in meta.get("provides", {}).items():
    for key in ("file", "docfile"):
        f = p.get(key)
        if f is None:
            continue
        if not os.path.isfile(f):
            problems.append(f"provides.{name}.{key} names {f}, which does not exist")
        elif in_git and f not in tracked:
            problems.append(f"provides.{name}.{key} names {f}, which is not committed (it is built)")
    if p.get("version") != meta.get("version"):
        problems.append(f"provides.{name}.version differs from the distribution version")

readme = open("README.md").read()
lic = re.search(r"^## License\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
if not lic or "PostgreSQL License" not in lic.group(1) or \
        "Permission to use, copy, modify, and distribute this software" not in lic.group(1) or \
        'ON AN "AS IS" BASIS' not in lic.group(1):
    problems.append("README.md has no License section with the PostgreSQL License text")
if not re.search(r"^## Changelog\n+### \d+\.\d+", readme, re.M):
    problems.append("README.md has no Changelog section with a version heading")

allowed = {"Makefile", "src", "sql", "expected", "test", "ironwod.control", "META.json", "README.md"}
if in_git:
    top = {f.split("/")[0] for f in tracked}
    extra = sorted(t for t in top - allowed if not t.startswith("."))
    if extra:
        problems.append(f"top level holds {extra}, outside the fixed layout")

RELEASED = {
    "sql/ironwod--1.0.sql": "c22c5b43260fa9f0be83c5fd49ab2ca0ed69e5a824b620612243b6a7d0066d38",
}
import glob, hashlib
built = f"sql/ironwod--{m.group(1)}.sql" if m else None   # the default version's, assembled
for f in sorted(glob.glob("sql/ironwod--*.sql")):
    if f == built:
        continue
    if f not in RELEASED:
        if not (m and f.endswith(f"--{m.group(1)}.sql") and f.count("--") == 2):
            problems.append(f"{f} is neither a pinned released script nor the upgrade script to "
                            f"the default version")
    elif hashlib.sha256(open(f, "rb").read()).hexdigest() != RELEASED[f]:
        problems.append(f"{f} was edited after its release; ship the change as a new upgrade script")
for f in RELEASED:
    if not os.path.isfile(f):
        problems.append(f"released script {f} is missing")
if built in tracked:
    problems.append(f"{built}, the default version's install script, is committed; it is assembled from sql/modules/")

for p in problems:
    print("FAIL:", p, file=sys.stderr)
sys.exit(1 if problems else 0)
PY
