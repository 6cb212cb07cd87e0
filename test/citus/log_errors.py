#!/usr/bin/env python3
"""The ERROR lines of the Citus cluster's server logs, by kind (test/citus/run.sh).

    log_errors.py NODE=server.log...

A worker node logs an ERROR for every statement of the coordinator's that failed
on it, and most of them are what the suites ask for: a test that checks an
error, a constraint that turns a race into a clean refusal.  Each line is
normalized (shard ids, uuids, numbers and literals out) with the first words of
the statement the log names for it, and counted per kind and node.  A kind is
expected when it matches one of EXPECTED below, which says why it happens; any
other kind is printed as UNEXPECTED and makes the exit status 1.
"""
import re
import sys

# (message regex, statement regex, why).  The statement is the STATEMENT line
# the server logs after the ERROR (its first words, normalized), or, when the log
# names none (ironwod's log hook leaves out statements that carry a key), the
# first line of its CONTEXT; '' when neither.
EXPECTED = [
    # The product's own, on the worker nodes.
    (r'^duplicate key value violates unique constraint "wodify_raw_\w+_N"$',
     r'^INSERT INTO ironwod\.wodify_raw_\w+_N AS t ',
     'a backfill lands a batch with the plain INSERT first and, when a stored version fails '
     'it (a page landed again: a retried or repeated backfill), lands it again with the upsert '
     '(src/land.c, store_batch); on one node the caught error is never logged, on Citus the '
     'shard logs it.  Other runs land with the upsert from their first page'),
    (r'^duplicate key value violates unique constraint "sync_runs_one_active_N"$',
     r'^INSERT INTO ironwod\.sync_runs_N ',
     'ironwod_sync while the gym has a run queued or running: the unique index refuses the '
     'second and ironwod_sync hands back the active one (50_api)'),
    # What the suites provoke on purpose, on the coordinator.
    (r'^a master public key is N bytes of X25519$', r'^SELECT ironwod\.register_master_key\(',
     'pg_regress 01_install: register_master_key refuses a short key'),
    (r'^plaintext API keys are disabled$', r'admit_plaintext_key\(\)',
     'pg_regress 02_connect, 06_secrets: a text key with ironwod.allow_plaintext_keys off'),
    (r'^Wodify rejected the API key$', r'function public\.ironwod_connect\(',
     'pg_regress 02_connect: ironwod_connect with a key the simulator answers 403'),
    (r'^metric "\w+" is unknown for this gym$', r'^SELECT count\(\*\) FROM ironwod_explain\(',
     'scenarios: ironwod_explain of a metric whose entity the plan does not include'),
    (r'^gym UUID is paused$', r'^SELECT ironwod_sync\(',
     'scenarios: ironwod_sync on a paused gym'),
    (r'^canceling statement due to user request$', r'ironwod_wait\(',
     'scenarios: the waiters of the xmin check are cancelled once sampled asleep'),
    (r'^this node is not a Citus coordinator with worker nodes$', r'^CALL ironwod\.distribute\(\)$',
     'test/citus/checks.sql: ironwod.distribute() on each worker node (run_command_on_workers)'),
    (r'^invalid input syntax for type boolean: "maybe"$', r'',
     'test/pgtap/11_transform_survivors: a sign-in whose latest version holds garbage in '
     'is_drop_in fails the transform, on the tenant\'s node'),
]

PREFIX = re.compile(r'^\S+ \S+ UTC \[\d+\] ')


def normalize(text):
    text = re.sub(r'_\d{6}\b', '_N', text)                       # shard ids
    text = re.sub(r'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}', 'UUID', text)
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r'\b\d+\b', 'N', text)
    return re.sub(r'\s+', ' ', text).strip()


def kinds(path):
    """Yield (message, statement) for every ERROR of the log."""
    lines = open(path, errors='replace').read().split('\n')
    for i, line in enumerate(lines):
        body = PREFIX.sub('', line)
        if not body.startswith('ERROR:  '):
            continue
        message = normalize(body[len('ERROR:  '):])
        statement = ''
        context = ''
        # the entry's own DETAIL/HINT/CONTEXT/STATEMENT lines follow, each with the prefix
        for follow in lines[i + 1:i + 40]:
            fbody = PREFIX.sub('', follow)
            if fbody.startswith('STATEMENT:  '):
                statement = ' '.join(normalize(fbody[len('STATEMENT:  '):]).split()[:6])
                break
            if fbody.startswith('CONTEXT:  ') and not context:
                context = normalize(fbody[len('CONTEXT:  '):])
            if PREFIX.match(follow) and not re.match(r'(DETAIL|HINT|CONTEXT|QUERY|LOCATION): ', fbody):
                break
        yield message, statement or context


def main():
    counts = {}
    for arg in sys.argv[1:]:
        node, path = arg.split('=', 1)
        for kind in kinds(path):
            counts.setdefault(kind, {}).setdefault(node, 0)
            counts[kind][node] += 1
    unexpected = 0
    nodes = [a.split('=', 1)[0] for a in sys.argv[1:]]
    total = {n: sum(c.get(n, 0) for c in counts.values()) for n in nodes}
    print('# ERROR lines: ' + ', '.join(f'{n} {total[n]}' for n in nodes))
    for (message, statement), per in sorted(counts.items(), key=lambda kv: -sum(kv[1].values())):
        why = next((w for m, s, w in EXPECTED if re.search(m, message) and re.search(s, statement)), None)
        if why is None:
            unexpected += 1
        where = ' '.join(f'{n}={per[n]}' for n in nodes if n in per)
        print(f'# {"expected" if why else "UNEXPECTED"}: {sum(per.values())} ({where}) {message}'
              + (f' [{statement}]' if statement else '') + (f': {why}' if why else ''))
    return 1 if unexpected else 0


if __name__ == '__main__':
    sys.exit(main())
