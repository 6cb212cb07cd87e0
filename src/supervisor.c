/*-------------------------------------------------------------------------
 *
 * supervisor.c
 *	  The "ironwod supervisor" background worker, started in
 *	  ironwod.database_name by the launcher (launcher.c).
 *
 *	  A level-triggered loop: each tick it reconciles what the queue says
 *	  with what is really running (runs whose worker is gone are failed,
 *	  run and validate workers that outlive the watchdog are stopped),
 *	  starts queued runs while ironwod.max_workers allows (each handed to an
 *	  idle run worker when one waits, else to a new one), and prunes old run
 *	  history.  It is the only dispatcher: a run worker never picks a run
 *	  itself.  It never does HTTP and never reads tenant data; it connects as
 *	  the bootstrap superuser, like pg_cron's launcher, only to serve the
 *	  queue.  Every tick runs under PG_TRY, so one bad row cannot crash-loop it.
 *
 *-------------------------------------------------------------------------
 */
#include "ironwod.h"

#include <sys/stat.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/acl.h"
#include "utils/guc.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/uuid.h"

#define IW_MAX_LAUNCH_ATTEMPTS 3

/*
 * Workers this supervisor started and has not yet seen exit, with the run
 * each was started for or last handed.  A handed run's launch attempt is
 * counted only when this supervisor sees its worker exit with the run still
 * queued (reap), not when it is handed: see launch().
 */
typedef struct LaunchedRun
{
	int64		run_id;
	BackgroundWorkerHandle *handle;
	bool		handed;			/* run_id was handed to this idle worker */
	pg_uuid_t	tenant_id;		/* the handed run's scope, to count it */
	pg_uuid_t	gym_id;
} LaunchedRun;

static LaunchedRun launched[IW_MAX_RUN_SLOTS];
static bool slots_exhausted_logged = false;

StaticAssertDecl(sizeof(IwRunArgs) <= BGW_EXTRALEN, "IwRunArgs must fit in bgw_extra");

/*
 * A dynamic worker of ours ("ironwod supervisor", "ironwod run", "ironwod
 * validate"): never restarted by the postmaster (a run is retried through the
 * queue, the supervisor restarted by the launcher, not by respawning),
 * reporting its exit to the registering process, with its arguments in
 * bgw_extra (never a pointer: pitfall 17).  A run worker's name is not its
 * first run's: it serves several (run.c shows which in its process title).
 */
void
iw_prepare_dynamic_worker(BackgroundWorker *worker, const char *function,
						  const char *type, const IwRunArgs *args)
{
	memset(worker, 0, sizeof(*worker));
	worker->bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker->bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker->bgw_restart_time = BGW_NEVER_RESTART;
	strlcpy(worker->bgw_library_name, "ironwod", BGW_MAXLEN);
	strlcpy(worker->bgw_function_name, function, BGW_MAXLEN);
	if (args->run_id != 0)
		strlcpy(worker->bgw_name, IW_RUN_WORKER_TITLE, BGW_MAXLEN);
	else
		strlcpy(worker->bgw_name, type, BGW_MAXLEN);
	strlcpy(worker->bgw_type, type, BGW_MAXLEN);
	worker->bgw_notify_pid = MyProcPid;
	memcpy(worker->bgw_extra, args, sizeof(*args));
}

static int
launched_count(void)
{
	int			i,
				n = 0;

	for (i = 0; i < IW_MAX_RUN_SLOTS; i++)
		if (launched[i].handle != NULL)
			n++;
	return n;
}

static bool
is_launched(int64 run_id)
{
	int			i;

	for (i = 0; i < IW_MAX_RUN_SLOTS; i++)
		if (launched[i].handle != NULL && launched[i].run_id == run_id)
			return true;
	return false;
}

/*
 * Fail a run in the name of its tenant.  The landing functions read the scope,
 * so the supervisor borrows it for this one statement (SET LOCAL, so that on
 * Citus it reaches the nodes too) and gives it back.
 */
static void
fail_lost_run(const char *tenant, const char *gym, int64 run_id, const char *code,
			  const char *why)
{
	Oid			types[4] = {INT8OID, TEXTOID, TEXTOID, TEXTOID};
	Datum		values[4];

	values[0] = Int64GetDatum(run_id);
	values[1] = CStringGetTextDatum(code);
	values[2] = CStringGetTextDatum(why);
	values[3] = CStringGetTextDatum("supervise");
	iw_set_local_scope(tenant, gym);
	if (SPI_execute_with_args("SELECT ironwod.fail_run($1, $2, $3, $4)",
							  4, types, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not record the failure of run " INT64_FORMAT, run_id);
	iw_set_local_scope("", "");
	ereport(LOG, (errmsg("ironwod run " INT64_FORMAT " failed: %s", run_id, why)));
}

/*
 * Count one launch attempt of a run (IW_MAX_LAUNCH_ATTEMPTS), only while it
 * is still queued when only_queued: a handed run its worker took and ran is
 * not counted when that worker exits later.
 */
static void
count_launch_attempt(int64 run_id, const pg_uuid_t *tenant_id, const pg_uuid_t *gym_id,
					 bool only_queued)
{
	Oid			argtypes[3] = {INT8OID, UUIDOID, UUIDOID};
	Datum		argvalues[3];

	argvalues[0] = Int64GetDatum(run_id);
	argvalues[1] = UUIDPGetDatum(tenant_id);
	argvalues[2] = UUIDPGetDatum(gym_id);
	SPI_execute_with_args(only_queued ?
						  "UPDATE ironwod.sync_runs SET launch_attempts = launch_attempts + 1 "
						  "WHERE tenant_id = $2 AND gym_id = $3 AND run_id = $1 AND status = 'queued'" :
						  "UPDATE ironwod.sync_runs SET launch_attempts = launch_attempts + 1 "
						  "WHERE tenant_id = $2 AND gym_id = $3 AND run_id = $1",
						  3, argtypes, argvalues, NULL, false, 0);
}

/*
 * Reap: forget workers that exited, and fail every running run that has no
 * live worker (crash, kill, server restart).  A run that is still queued after
 * its worker exited had a worker that died before claiming it; after a few
 * such launches it is failed instead of retried forever.
 */
static void
reap(void)
{
	int			i;
	uint64		n;

	for (i = 0; i < IW_MAX_RUN_SLOTS; i++)
	{
		pid_t		pid;

		if (launched[i].handle == NULL)
			continue;
		if (GetBackgroundWorkerPid(launched[i].handle, &pid) == BGWH_STOPPED)
		{
			if (launched[i].handed)
				count_launch_attempt(launched[i].run_id, &launched[i].tenant_id,
									 &launched[i].gym_id, true);
			pfree(launched[i].handle);
			memset(&launched[i], 0, sizeof(LaunchedRun));
		}
	}

	{
		Oid			argtypes[1] = {INT4OID};
		Datum		argvalues[1] = {Int32GetDatum(ironwod_watchdog_timeout_s)};

		if (SPI_execute_with_args("SELECT tenant_id::text, gym_id::text, run_id, status, launch_attempts, "
								  " status = 'running' AND heartbeat_at < now() - make_interval(secs => $1) "
								  "FROM ironwod.sync_runs WHERE status IN ('queued', 'running') "
								  "ORDER BY requested_at", 1, argtypes, argvalues, NULL,
								  false, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not read the ironwod run queue");
	}
	n = SPI_processed;
	if (n == 0)
		return;
	{
		SPITupleTable *tt = SPI_tuptable;
		uint64		r;

		for (r = 0; r < n; r++)
		{
			HeapTuple	tup = tt->vals[r];
			char	   *tenant = SPI_getvalue(tup, tt->tupdesc, 1);
			char	   *gym = SPI_getvalue(tup, tt->tupdesc, 2);
			int64		run_id = pg_strtoint64(SPI_getvalue(tup, tt->tupdesc, 3));
			char	   *status = SPI_getvalue(tup, tt->tupdesc, 4);
			int			attempts = pg_strtoint32(SPI_getvalue(tup, tt->tupdesc, 5));
			char	   *stalled = SPI_getvalue(tup, tt->tupdesc, 6);
			int			pid = iw_run_slot_pid(run_id);

			if (pid != 0 && stalled != NULL && stalled[0] == 't')
			{
				/*
				 * The watchdog: a live worker that made no progress for
				 * ironwod.watchdog_timeout.  Record the failure first, so the
				 * worker's own bookkeeping on its way out finds nothing to do.
				 */
				fail_lost_run(tenant, gym, run_id, "watchdog", psprintf("no progress for %d s; stopped by the watchdog",
															 ironwod_watchdog_timeout_s));
				kill(pid, SIGTERM);
				continue;
			}
			if (is_launched(run_id) || pid != 0)
				continue;
			if (strcmp(status, "running") == 0)
				fail_lost_run(tenant, gym, run_id, "worker_lost",
							  "worker exited without finishing the run (killed, crashed, or server restarted)");
			else if (attempts >= IW_MAX_LAUNCH_ATTEMPTS)
				fail_lost_run(tenant, gym, run_id, "worker_lost",
							  "run worker could not start; check ironwod.worker_role and the server log");
		}
	}
}

/*
 * The watchdog of validate workers: one alive for longer than
 * ironwod.watchdog_timeout is stopped.  A validation is one key load and a
 * few requests, each under its own timeout, and the backend that asked for
 * it stops it when its own wait runs out; this catches the worker whose
 * asker is gone (terminated, crashed mid-wait) and anything that outlives
 * every timeout, so no validate worker holds a worker slot for good.
 */
static void
stop_stale_validations(void)
{
	Oid			argtypes[1] = {INT4OID};
	Datum		argvalues[1] = {Int32GetDatum(ironwod_watchdog_timeout_s)};
	uint64		r;

	if (SPI_execute_with_args("SELECT pid FROM pg_catalog.pg_stat_activity "
							  "WHERE backend_type = 'ironwod validate' "
							  "AND backend_start < now() - make_interval(secs => $1)",
							  1, argtypes, argvalues, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read the ironwod validate workers");
	for (r = 0; r < SPI_processed; r++)
	{
		int			pid = pg_strtoint32(SPI_getvalue(SPI_tuptable->vals[r],
													 SPI_tuptable->tupdesc, 1));

		ereport(LOG,
				(errmsg("ironwod validate worker %d stopped by the watchdog: running for more than %d s",
						pid, ironwod_watchdog_timeout_s)));
		(void) kill(pid, SIGTERM);
	}
}

/* The launched[] entry of the live worker pid, or -1. */
static int
launched_index_of(int pid)
{
	for (int i = 0; i < IW_MAX_RUN_SLOTS; i++)
	{
		pid_t		p;

		if (launched[i].handle != NULL &&
			GetBackgroundWorkerPid(launched[i].handle, &p) == BGWH_STARTED && p == pid)
			return i;
	}
	return -1;
}

/*
 * Start queued runs while ironwod.max_workers and worker slots allow: each
 * goes to an idle worker of ours (one that finished a run cleanly and waits,
 * run.c) when there is one, else to a new worker.  The queue's order, the
 * per-run checks and the count of workers are the same either way: an idle
 * worker counts against ironwod.max_workers like a busy one (it holds a
 * worker slot), and a handoff never makes more runs run at once than
 * ironwod.max_workers.  Only idle workers this supervisor started (their
 * exit is reaped through launched[]) and connected as the role runs use now
 * are handed runs; others time out and exit.
 */
static void
launch(void)
{
	Oid			role_oid;
	int			limit = Min(ironwod_max_workers, IW_MAX_RUN_SLOTS);
	int			idle_slot[IW_MAX_RUN_SLOTS];
	int			idle_pid[IW_MAX_RUN_SLOTS];
	Oid			idle_role[IW_MAX_RUN_SLOTS];
	int			idle_launched[IW_MAX_RUN_SLOTS];
	int			n_idle_listed;
	int			n_idle = 0;
	int			next_idle = 0;
	int			busy;
	int			new_workers;
	SPITupleTable *tt;
	uint64		n,
				r;

	if (!ironwod_enabled)
		return;
	role_oid = get_role_oid(ironwod_worker_role, true);
	if (!OidIsValid(role_oid))
	{
		ereport(WARNING,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("ironwod.worker_role \"%s\" does not exist", ironwod_worker_role),
				 errhint("Create the role or point ironwod.worker_role at an existing non-superuser role.")));
		return;
	}
	if (superuser_arg(role_oid))
	{
		ereport(WARNING,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("ironwod.worker_role \"%s\" is a superuser; run workers will not start",
						ironwod_worker_role),
				 errhint("Run workers must be bound by row-level security; use a non-superuser role.")));
		return;
	}

	/* our idle workers of the current role, in slot order */
	n_idle_listed = iw_run_slot_idle_list(idle_slot, idle_pid, idle_role, IW_MAX_RUN_SLOTS);
	for (int i = 0; i < n_idle_listed; i++)
	{
		int			li = launched_index_of(idle_pid[i]);

		if (li < 0 || idle_role[i] != role_oid)
			continue;
		idle_slot[n_idle] = idle_slot[i];
		idle_pid[n_idle] = idle_pid[i];
		idle_launched[n_idle] = li;
		n_idle++;
	}
	busy = launched_count() - n_idle;
	new_workers = limit - launched_count();
	if (busy >= limit)
		return;

	if (SPI_execute("SELECT tenant_id::text, gym_id::text, run_id FROM ironwod.sync_runs "
					"WHERE status = 'queued' ORDER BY requested_at, run_id LIMIT 100",
					false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read the ironwod run queue");
	tt = SPI_tuptable;
	n = SPI_processed;
	for (r = 0; r < n && busy < limit; r++)
	{
		HeapTuple	tup = tt->vals[r];
		int64		run_id = pg_strtoint64(SPI_getvalue(tup, tt->tupdesc, 3));
		BackgroundWorker worker;
		BackgroundWorkerHandle *handle;
		IwRunArgs	args;
		int			i;
		bool		handed = false;

		if (is_launched(run_id) || iw_run_slot_alive(run_id))
			continue;

		memset(&args, 0, sizeof(args));
		args.run_id = run_id;
		args.validation_slot = -1;
		args.database_oid = MyDatabaseId;
		args.role_oid = role_oid;
		args.tenant_id = *DatumGetUUIDP(DirectFunctionCall1(uuid_in,
															CStringGetDatum(SPI_getvalue(tup, tt->tupdesc, 1))));
		args.gym_id = *DatumGetUUIDP(DirectFunctionCall1(uuid_in,
														 CStringGetDatum(SPI_getvalue(tup, tt->tupdesc, 2))));

		/*
		 * An idle worker first.  The assignment re-checks under the lock that
		 * the slot is still idle (the worker may be timing out right now); if
		 * not, the next idle worker, else a new one.
		 */
		while (!handed && next_idle < n_idle)
		{
			int			k = next_idle++;

			if (iw_run_slot_assign(idle_slot[k], idle_pid[k], &args))
			{
				LaunchedRun *l = &launched[idle_launched[k]];

				l->run_id = run_id;
				l->handed = true;
				l->tenant_id = args.tenant_id;
				l->gym_id = args.gym_id;
				handed = true;
			}
		}
		if (!handed)
		{
			if (new_workers <= 0)
				break;
			iw_prepare_dynamic_worker(&worker, "ironwod_run_main", "ironwod run", &args);

			/* the handle must outlive this tick's memory context */
			{
				MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);
				bool		ok = RegisterDynamicBackgroundWorker(&worker, &handle);

				MemoryContextSwitchTo(old);
				if (!ok)
				{
					if (!slots_exhausted_logged)
						ereport(WARNING,
								(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
								 errmsg("no background worker slot free for ironwod run " INT64_FORMAT, run_id),
								 errhint("Runs stay queued; raise max_worker_processes (see the README's worker budget).")));
					slots_exhausted_logged = true;
					return;
				}
			}
			slots_exhausted_logged = false;
			for (i = 0; i < IW_MAX_RUN_SLOTS; i++)
			{
				if (launched[i].handle == NULL)
				{
					memset(&launched[i], 0, sizeof(LaunchedRun));
					launched[i].run_id = run_id;
					launched[i].handle = handle;
					break;
				}
			}
			new_workers--;

			/*
			 * A new worker's launch counts now: one that cannot connect or
			 * dies before claiming the run is retried at most
			 * IW_MAX_LAUNCH_ATTEMPTS times, even across supervisor restarts.
			 * A handed run counts only if reap sees its worker exit with the
			 * run still queued (killed, or a run that kills workers): an idle
			 * worker that leaves with it for DROP DATABASE or the like
			 * (shmem.c) did not start it, and this supervisor, leaving for
			 * the same command, never reaps that exit.
			 */
			count_launch_attempt(run_id, &args.tenant_id, &args.gym_id, false);
		}
		busy++;
	}
}

/*
 * Keep run history bounded (pg_cron #416): a small batch per tick, chosen by key
 * rather than by ctid (Citus cannot plan a distributed DELETE on ctid), with the
 * cutoff computed here so the statement carries no volatile function.
 */
static void
prune(void)
{
	Oid			argtypes[1] = {TIMESTAMPTZOID};
	Datum		argvalues[1];

	argvalues[0] = TimestampTzGetDatum(GetCurrentTimestamp() -
									   (TimestampTz) ironwod_run_retention_days * USECS_PER_DAY);
	SPI_execute_with_args("DELETE FROM ironwod.sync_runs r USING ("
						  " SELECT tenant_id, gym_id, run_id FROM ironwod.sync_runs"
						  " WHERE finished_at < $1 AND status NOT IN ('queued', 'running')"
						  " ORDER BY finished_at LIMIT 1000) old"
						  " WHERE r.tenant_id = old.tenant_id AND r.gym_id = old.gym_id"
						  " AND r.run_id = old.run_id",
						  1, argtypes, argvalues, NULL, false, 0);
}

/*
 * On a Citus worker node the library is loaded (preloaded, like everywhere) but
 * ironwod's tables are shards and shells of the coordinator's: the queue is
 * served by the coordinator's supervisor alone.  A node is a worker when Citus
 * is installed and its local group is not the coordinator's (0).  Checked every
 * tick, level-triggered: a node becomes a worker when citus_add_node() reaches
 * it, long after this process started, and stops being one when removed.
 */
static bool
citus_worker_node(void)
{
	static bool logged = false;
	bool		worker = false;

	if (OidIsValid(get_extension_oid("citus", true)) &&
		SPI_execute("SELECT groupid <> 0 FROM pg_catalog.pg_dist_local_group", true, 1) == SPI_OK_SELECT &&
		SPI_processed == 1)
	{
		char	   *v = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);

		worker = (v != NULL && v[0] == 't');
	}
	if (worker != logged)
		ereport(LOG,
				(errmsg(worker ? "ironwod supervisor idles: this node is a Citus worker; the coordinator serves the queue"
						: "ironwod supervisor serves the queue: this node is no Citus worker")));
	logged = worker;
	return worker;
}

/*
 * The SQL versions this library drives: its own (default_version) and the
 * older ones whose schema it still works with, so that after a package
 * upgrade and restart gyms keep syncing until ALTER EXTENSION ironwod UPDATE.
 * A release whose C code needs its own SQL drops the older entries.
 */
static const char *const served_versions[] = {"1.0", IRONWOD_VERSION};

/* Whether this library drives the SQL of the given extension version. */
bool
iw_drives_version(const char *version)
{
	for (size_t i = 0; i < lengthof(served_versions); i++)
		if (strcmp(version, served_versions[i]) == 0)
			return true;
	return false;
}

/*
 * The extension may not exist yet, may be mid-upgrade, or may have been
 * dropped: check by OID and version, not by schema name (pg_net #264).  At a
 * version this library does not drive, nothing runs, and the supervisor says
 * so once per version it finds.
 */
static bool
extension_ready(void)
{
	static char *warned_version = NULL;
	char	   *installed;

	if (!OidIsValid(get_extension_oid("ironwod", true)))
		return false;
	if (SPI_execute("SELECT extversion FROM pg_extension WHERE extname = 'ironwod'",
					true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		return false;
	installed = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	if (iw_drives_version(installed))
		return true;
	if (warned_version == NULL || strcmp(warned_version, installed) != 0)
	{
		ereport(WARNING,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("ironwod supervisor idles: the extension is at version %s, which this library (version %s) does not drive",
						installed, IRONWOD_VERSION),
				 errhint("Run ALTER EXTENSION ironwod UPDATE in database \"%s\", or install the ironwod package of version %s and restart the server.",
						 ironwod_database_name, installed)));
		if (warned_version != NULL)
			pfree(warned_version);
		warned_version = MemoryContextStrdup(TopMemoryContext, installed);
	}
	return false;
}

/*
 * What the configuration checks depend on that a reload can change: the
 * settings they read and pg_hba.conf.  The checks run again only when this
 * changes, so a reload that touches nothing of ours costs nothing.
 */
static char *
config_fingerprint(void)
{
	struct stat st;
	long		hba_mtime = 0;

	if (HbaFileName != NULL && stat(HbaFileName, &st) == 0)
		hba_mtime = (long) st.st_mtime;
	return psprintf("%s|%s|%s|%d|%d|%d|%ld", ironwod_master_key_command, ironwod_worker_role,
					ironwod_base_url, (int) ironwod_allow_http, ironwod_max_workers,
					max_worker_processes, hba_mtime);
}

/*
 * Configuration problems found early: when the supervisor starts, and after a
 * reload that changed what the checks read, every failing row of
 * ironwod.check_config() becomes a WARNING with its hint (never a secret: the
 * checks report paths, ids and counts only).
 */
static void
check_config_if_changed(void)
{
	static char *checked = NULL;
	char	   *now = config_fingerprint();
	uint64		i;
	int			failed = 0;

	if (checked != NULL && strcmp(checked, now) == 0)
		return;
	/* remembered first: a check that raises is not retried every tick */
	if (checked != NULL)
		pfree(checked);
	checked = MemoryContextStrdup(TopMemoryContext, now);

	if (SPI_execute("SELECT check_name, message, hint FROM ironwod.check_config() WHERE NOT ok",
					false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not run ironwod.check_config()");
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *hint = SPI_getvalue(tup, desc, 3);

		ereport(WARNING,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("ironwod configuration problem (%s): %s",
						SPI_getvalue(tup, desc, 1), SPI_getvalue(tup, desc, 2)),
				 hint ? errhint("%s", hint) : 0));
		failed++;
	}
	if (failed == 0)
		ereport(LOG, (errmsg("ironwod configuration checks passed (ironwod.check_config())")));
}

static void
supervise_tick(void)
{
	iw_txn_begin("ironwod supervisor tick");
	if (!citus_worker_node() && extension_ready())
	{
		reap();
		stop_stale_validations();
		launch();
		prune();
	}
	iw_txn_commit();
}

/* In a transaction of its own: the checks may wait for a validate worker. */
static void
check_tick(void)
{
	iw_txn_begin("ironwod supervisor configuration checks");
	if (!citus_worker_node() && extension_ready())
		check_config_if_changed();
	iw_txn_commit();
}

/* Leave for a session waiting for the database; the launcher starts us again. */
static void supervisor_leave(void) pg_attribute_noreturn();

static void
supervisor_leave(void)
{
	iw_log_leaving_database("ironwod supervisor");
	iw_shared->supervisor_left = true;
	proc_exit(0);
}

/*
 * Sleep until the latch is set or ironwod.naptime has passed.  The supervisor
 * is a session connected to the database all the time, so DROP DATABASE (and
 * ALTER DATABASE RENAME or SET TABLESPACE, CREATE DATABASE ... TEMPLATE)
 * would wait for it for 5 s and then fail.  So the sleep looks every
 * IW_DATABASE_PROBE_MS, and once more before a tick, whether a session waits
 * for the database to be unused (dbleave.c), and then exits: the launcher
 * starts a supervisor again once the database is free, if it still exists.
 * Exiting between ticks loses nothing: the queue and the runs are in tables,
 * and a new supervisor reconciles them (reap).
 */
static void
supervisor_sleep(void)
{
	TimestampTz until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													ironwod_naptime_ms);

	for (;;)
	{
		long		ms = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), until);
		int			rc = 0;

		if (ms > 0)
			rc = WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						   Min(ms, IW_DATABASE_PROBE_MS), PG_WAIT_EXTENSION);
		if (rc & WL_LATCH_SET)
			ResetLatch(MyLatch);
		if (iw_database_awaited(MyDatabaseId))
			supervisor_leave();
		if (ms <= 0 || (rc & WL_LATCH_SET))
			return;
	}
}

void
ironwod_supervisor_main(Datum main_arg)
{
	MemoryContext tick_ctx;
	IwRunArgs	args;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	/*
	 * The launcher looked whether a session waits for the database to be
	 * unused (dbleave.c) before it started us; one may have come since.
	 * Look again, and hold the database's lock until we are connected, so
	 * that one coming later waits for us (then finds us connected and we
	 * leave at the look below) instead of making the connection FATAL.
	 */
	memcpy(&args, MyBgworkerEntry->bgw_extra, sizeof(args));
	if (!iw_database_hold(args.database_oid))
		supervisor_leave();
	BackgroundWorkerInitializeConnection(ironwod_database_name, NULL, 0);
	iw_database_release();
	if (iw_database_awaited(MyDatabaseId))
		supervisor_leave();
	pgstat_report_appname("ironwod supervisor");
	iw_shared->supervisor_pid = MyProcPid;
	tick_ctx = AllocSetContextCreate(TopMemoryContext, "ironwod supervisor tick",
									 ALLOCSET_DEFAULT_SIZES);
	ereport(LOG, (errmsg("ironwod supervisor started for database \"%s\"", ironwod_database_name)));

	for (;;)
	{
		MemoryContext old;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		old = MemoryContextSwitchTo(tick_ctx);
		PG_TRY();
		{
			supervise_tick();
			check_tick();
		}
		PG_CATCH();
		{
			MemoryContextSwitchTo(tick_ctx);
			EmitErrorReport();
			FlushErrorState();
			AbortOutOfAnyTransaction();
		}
		PG_END_TRY();
		MemoryContextSwitchTo(old);
		MemoryContextReset(tick_ctx);

		supervisor_sleep();
	}
}
