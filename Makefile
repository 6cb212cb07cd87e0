# ironwod: PGXS build.
#
#   make               build the shared library and assemble the install script
#   make install       install into the PostgreSQL found by PG_CONFIG
#   make test          the whole suite: simulator + throwaway cluster + pg_regress + pgTAP
#   make installcheck  after make install: pg_regress + isolation against the installed PostgreSQL
#   make demo          throwaway cluster, simulator, one demo gym connected and backfilled
#   make bench         issue 7's table: parse limit, set-based peer, landing, planning, transform,
#                      refresh per scale with growth exponents, nightly, concurrent gyms (not in make test)
#   make test-citus    the suite on a three-node Citus cluster (builds Citus from ../shared/vendor)
#   make bench-citus   issue 12's scale-out table: N gyms' backfills, nightly runs and dashboard
#                      reads on one node and on a coordinator + 2 workers, side by side
#
# Released install and upgrade scripts (sql/ironwod--1.0.sql, sql/ironwod--1.0--1.1.sql,
# ...) are committed and never edited.  The install script of the current version
# (default_version in ironwod.control) is assembled from the readable modules in
# sql/modules/ in file-name order; an upgrade test proves that upgrading from 1.0
# through the committed scripts gives the same schema as that fresh install.

EXTENSION = ironwod
MODULE_big = ironwod
OBJS = src/ironwod.o src/shmem.o src/launcher.o src/supervisor.o src/run.o src/http.o \
       src/ratelimit.o src/land.o src/crypto.o src/masterkey.o src/loghook.o \
       src/sqlfuncs.o src/configcheck.o src/wire.o src/fields.o src/page.o src/observe.o \
       src/rewrap.o src/plaintext.o src/dbleave.o

EXTVERSION = $(shell sed -n "s/^default_version = '\(.*\)'/\1/p" ironwod.control)
DATA_built = sql/ironwod--$(EXTVERSION).sql
DATA = $(filter-out $(DATA_built),$(wildcard sql/ironwod--*.sql))
SQL_MODULES = $(sort $(wildcard sql/modules/*.sql))

PG_CONFIG ?= pg_config
PG_CPPFLAGS = $(shell curl-config --cflags) -DIRONWOD_VERSION='"$(EXTVERSION)"'
SHLIB_LINK = $(shell curl-config --libs) -lcrypto
EXTRA_CLEAN = results regression.diffs regression.out tmp_check log

# pg_regress inputs live in test/sql, expected output in the top-level expected/
# (pg_regress looks in the output directory's expected/ first).  The suites need
# a server configured for them (the simulator's URL, a development master key,
# every logging option on), which no existing server is, so PGXS's installcheck
# is replaced by ours below.
REGRESS = 01_install 02_connect 03_backfill 04_tenancy 05_resume 06_secrets \
          07_metrics_cases 08_metrics_sim
REGRESS_OPTS = --inputdir=test --use-existing
# Isolation specs live in test/specs, expected output in expected/ as well.
ISOLATION = concurrent_sync
ISOLATION_OPTS = --inputdir=test --outputdir=. --use-existing

NO_INSTALLCHECK = 1

PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# The suite runs in the database the supervisor serves (ironwod.database_name).
CONTRIB_TESTDB = postgres
ISOLATION_TESTDB = postgres

# PGXS does not track header dependencies: every object depends on the shared header,
# and on the control file, whose default_version the library is built to serve.
$(OBJS): src/ironwod.h ironwod.control

$(DATA_built): $(SQL_MODULES)
	cat $(SQL_MODULES) > $@

# `make installcheck`, after `make install`: the pg_regress and isolation suites
# against the installed PostgreSQL (PG_CONFIG), on a throwaway server of their own
# with the Wodify simulator and fixtures they need (test/installcheck.sh).
# installcheck-running is the PGXS recipe itself, against the server that script
# (or test/run-tests.sh) started: PGHOST/PGPORT.
installcheck:
	PG_CONFIG=$(PG_CONFIG) bash test/installcheck.sh

installcheck-running:
ifneq ($(strip $(REGRESS)),)
	$(pg_regress_installcheck) $(REGRESS_OPTS) $(REGRESS)
endif
ifneq ($(strip $(ISOLATION)),)
	$(pg_isolation_regress_installcheck) $(ISOLATION_OPTS) $(ISOLATION)
endif

.PHONY: test test-citus demo bench bench-citus installcheck installcheck-running
test:
	bash test/run-tests.sh

test-citus:
	bash test/citus/run.sh

demo:
	bash test/demo.sh

bench:
	bash test/bench.sh

bench-citus:
	bash test/citus/bench.sh
