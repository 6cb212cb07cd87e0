/*-------------------------------------------------------------------------
 *
 * launcher.c
 *	  The static "ironwod launcher" background worker.
 *
 *	  A background worker connects to one database for its whole life, and
 *	  a database that does not exist makes that connection FATAL; a static
 *	  supervisor connecting to ironwod.database_name would then be restarted
 *	  by the postmaster every ten seconds, each time with the same FATAL in
 *	  the log.  So the static worker connects to no database at all (it reads
 *	  only the shared catalog pg_database), waits until the database exists,
 *	  saying once what to do about it, and then starts the supervisor in it as
 *	  a dynamic worker.  When the supervisor exits (killed, crashed, its
 *	  database dropped, or leaving it for DROP DATABASE and the like,
 *	  dbleave.c) the launcher starts it again, backing off while it keeps
 *	  exiting early, and not while a session waits for the database to be
 *	  unused.  The launcher never touches a table of ours.
 *
 *-------------------------------------------------------------------------
 */
#include "ironwod.h"

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

/*
 * Backoff between supervisor starts, how long a supervisor must live to reset
 * it, and the longest pause between looks for a missing database (a lookup in
 * pg_database is cheap, and nothing wakes us when the database is created).
 */
#define IW_LAUNCH_BACKOFF_MIN_MS	1000
#define IW_LAUNCH_BACKOFF_MAX_MS	60000
#define IW_SUPERVISOR_HEALTHY_MS	60000
#define IW_DATABASE_POLL_MAX_MS		10000

void
iw_register_launcher(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 10;
	strlcpy(worker.bgw_library_name, "ironwod", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "ironwod_launcher_main", BGW_MAXLEN);
	strlcpy(worker.bgw_name, "ironwod launcher", BGW_MAXLEN);
	strlcpy(worker.bgw_type, "ironwod launcher", BGW_MAXLEN);
	RegisterBackgroundWorker(&worker);
}

/*
 * The OID of ironwod.database_name, InvalidOid when it does not exist, read
 * from the shared catalog.  A heap scan, as the autovacuum launcher does:
 * without a database, the catalog index behind get_database_oid() cannot be
 * opened until some backend has written the shared relcache init file, which
 * a fresh cluster lacks.
 */
static Oid
database_oid(void)
{
	Oid			found = InvalidOid;
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tup;

	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while (!OidIsValid(found) && HeapTupleIsValid(tup = heap_getnext(scan, ForwardScanDirection)))
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tup);

		if (strcmp(NameStr(db->datname), ironwod_database_name) == 0)
			found = db->oid;
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	iw_exit_if_postmaster_dead();
	CommitTransactionCommand();
	return found;
}

/* Register the supervisor, reporting to us; NULL when no slot was free. */
static BackgroundWorkerHandle *
start_supervisor(Oid dboid)
{
	BackgroundWorker worker;
	BackgroundWorkerHandle *handle;
	IwRunArgs	args;

	memset(&args, 0, sizeof(args));
	args.validation_slot = -1;
	/* the database we looked at, for the supervisor's look (supervisor.c) */
	args.database_oid = dboid;
	iw_prepare_dynamic_worker(&worker, "ironwod_supervisor_main", "ironwod supervisor", &args);
	if (!RegisterDynamicBackgroundWorker(&worker, &handle))
		return NULL;
	return handle;
}

/* Wait at most until 'until' (0: no timeout), or until the latch is set. */
static void
sleep_until(TimestampTz until)
{
	long		ms = -1;

	if (until != 0)
	{
		ms = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), until);
		if (ms <= 0)
			return;
	}
	(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_EXIT_ON_PM_DEATH | (ms >= 0 ? WL_TIMEOUT : 0),
					 ms, PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
}

void
ironwod_launcher_main(Datum main_arg)
{
	BackgroundWorkerHandle *supervisor = NULL;
	TimestampTz supervisor_started = 0;
	TimestampTz next_attempt = 0;
	int			backoff_ms = IW_LAUNCH_BACKOFF_MIN_MS;
	bool		missing_reported = false;
	bool		no_slot_reported = false;
	bool		awaited_reported = false;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	/* no database: only shared catalogs, so a missing database cannot fail us */
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	pgstat_report_appname("ironwod launcher");

	for (;;)
	{
		TimestampTz now;
		Oid			dboid;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		now = GetCurrentTimestamp();

		if (supervisor != NULL)
		{
			pid_t		pid;

			if (GetBackgroundWorkerPid(supervisor, &pid) == BGWH_STOPPED)
			{
				pfree(supervisor);
				supervisor = NULL;
				/*
				 * One that kept running was fine, and so was one that left
				 * for DROP DATABASE or the like: start the next one soon (not
				 * while the command waits; see below).
				 */
				if (TimestampDifferenceExceeds(supervisor_started, now, IW_SUPERVISOR_HEALTHY_MS) ||
					iw_shared->supervisor_left)
					backoff_ms = IW_LAUNCH_BACKOFF_MIN_MS;
				iw_shared->supervisor_left = false;
				next_attempt = TimestampTzPlusMilliseconds(now, backoff_ms);
				backoff_ms = Min(backoff_ms * 2, IW_LAUNCH_BACKOFF_MAX_MS);
				continue;
			}
			/* the postmaster sets our latch (bgw_notify_pid) when it stops */
			sleep_until(0);
			continue;
		}

		if (now < next_attempt)
		{
			sleep_until(next_attempt);
			continue;
		}

		dboid = database_oid();
		if (!OidIsValid(dboid))
		{
			if (!missing_reported)
				ereport(WARNING,
						(errcode(ERRCODE_UNDEFINED_DATABASE),
						 errmsg("database \"%s\" named by ironwod.database_name does not exist; the ironwod supervisor waits for it",
								ironwod_database_name),
						 errhint("Create it (CREATE DATABASE %s) and CREATE EXTENSION ironwod there, or set ironwod.database_name to the database that has the extension and restart the server.",
								 quote_identifier(ironwod_database_name))));
			missing_reported = true;
			awaited_reported = false;
			next_attempt = TimestampTzPlusMilliseconds(now, Min(backoff_ms, IW_DATABASE_POLL_MAX_MS));
			backoff_ms = Min(backoff_ms * 2, IW_LAUNCH_BACKOFF_MAX_MS);
			continue;
		}
		else if (iw_database_awaited(dboid))
		{
			/*
			 * DROP DATABASE or the like waits for the database to be unused:
			 * a supervisor would wait for the lock, then fail if the database
			 * is gone.  Look again soon; once the command is over the
			 * database is either free or gone (then the branch above).
			 */
			if (!awaited_reported)
				ereport(LOG,
						(errmsg("ironwod launcher holds the supervisor back: another session waits for database \"%s\" to be unused",
								ironwod_database_name)));
			awaited_reported = true;
			next_attempt = TimestampTzPlusMilliseconds(now, IW_DATABASE_PROBE_MS);
			continue;
		}
		else if ((supervisor = start_supervisor(dboid)) == NULL)
		{
			if (!no_slot_reported)
				ereport(WARNING,
						(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
						 errmsg("no background worker slot free for the ironwod supervisor"),
						 errhint("Raise max_worker_processes (see the README's worker budget).")));
			no_slot_reported = true;
		}
		else
		{
			if (missing_reported)
			{
				ereport(LOG,
						(errmsg("database \"%s\" exists now; starting the ironwod supervisor",
								ironwod_database_name)));
				backoff_ms = IW_LAUNCH_BACKOFF_MIN_MS;
			}
			missing_reported = no_slot_reported = awaited_reported = false;
			supervisor_started = now;
			continue;
		}
		next_attempt = TimestampTzPlusMilliseconds(now, backoff_ms);
		backoff_ms = Min(backoff_ms * 2, IW_LAUNCH_BACKOFF_MAX_MS);
	}
}
