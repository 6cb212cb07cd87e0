/*-------------------------------------------------------------------------
 *
 * dbleave.c
 *	  Whether a session waits for ironwod's database to be unused.
 *
 *	  DROP DATABASE, ALTER DATABASE ... RENAME and ... SET TABLESPACE, and
 *	  CREATE DATABASE ... TEMPLATE of a database take a lock on the
 *	  database object (AccessExclusiveLock; ShareLock for the template) and
 *	  then wait up to 5 s for every other backend connected to it to leave
 *	  (CountOtherDBBackends), failing with "database ... is being accessed by
 *	  other users" otherwise.  Only autovacuum workers are asked to leave; a
 *	  background worker is neither signalled nor told.  ironwod's supervisor
 *	  and its idle run workers (waiting up to ironwod.worker_idle_timeout for
 *	  their next run) are connected to the database all the time, so without
 *	  this every such command failed.
 *
 *	  While such a command waits, it holds (or queues for) a lock on the
 *	  database object that conflicts with the RowExclusiveLock every backend
 *	  takes on it while connecting (InitPostgres).  No other command takes
 *	  such a lock on a database object (ALTER DATABASE ... SET, COMMENT and
 *	  SECURITY LABEL take weaker ones).  So asking the lock manager, without
 *	  waiting, whether a connecting backend would have to wait tells exactly
 *	  whether someone waits for the database to empty.  The supervisor and
 *	  idle run workers ask while they sleep, every IW_DATABASE_PROBE_MS, and
 *	  leave when the answer is yes; the launcher asks before it starts a
 *	  supervisor, and the supervisor again before it connects, keeping the
 *	  lock until it has (iw_database_hold), and once more after.  A new
 *	  backend that connects meanwhile blocks on the lock before it
 *	  advertises itself in the database, so it does not count.
 *	  A run worker in the middle of a run stays, as any busy session does.
 *
 *	  No signal could do this: CountOtherDBBackends signals autovacuum only,
 *	  and no ProcSignalBarrier tells a backend that such a command waits for
 *	  it (a process can only see it in the lock table).
 *
 *-------------------------------------------------------------------------
 */
#include "ironwod.h"

#include "catalog/pg_database.h"
#include "storage/ipc.h"
#include "storage/lmgr.h"
#include "storage/lock.h"

/* the lock iw_database_hold keeps, and whether it keeps it */
static LOCKTAG hold_tag;
static bool holding = false;
static bool hold_callback = false;

static void iw_database_release_at_exit(int code, Datum arg);

/*
 * Whether a session holds or waits for a lock on database dboid that a
 * connecting backend would wait for: DROP DATABASE and the others above,
 * waiting for the database's other sessions to leave.  Takes and at once
 * releases a session-level RowExclusiveLock on the (shared) database object
 * without waiting, so it needs no transaction and works in the launcher,
 * which has no database.  A lock held for microseconds: a DROP DATABASE
 * arriving in that instant waits for it, not for us to leave.
 */
bool
iw_database_awaited(Oid dboid)
{
	LOCKTAG		tag;

	if (!OidIsValid(dboid))
		return false;
	SET_LOCKTAG_OBJECT(tag, InvalidOid, DatabaseRelationId, dboid, 0);
	if (LockAcquire(&tag, RowExclusiveLock, true, true) == LOCKACQUIRE_NOT_AVAIL)
		return true;
	LockRelease(&tag, RowExclusiveLock, true);
	return false;
}

/*
 * Like iw_database_awaited, but keep the lock when no one waits: the
 * supervisor holds it from before it connects until it has connected
 * (iw_database_release).  InitPostgres takes the same lock and would wait for
 * a DROP DATABASE that came in between, then die FATAL of the dropped or
 * renamed database; held by us, it is granted at once (a lock we hold), and
 * such a command waits for us instead, then finds us connected and waits for
 * us to leave.  Returns false, holding nothing, when someone already waits.
 */
bool
iw_database_hold(Oid dboid)
{
	if (!OidIsValid(dboid))
		return true;
	if (!hold_callback)
	{
		before_shmem_exit(iw_database_release_at_exit, (Datum) 0);
		hold_callback = true;
	}
	SET_LOCKTAG_OBJECT(hold_tag, InvalidOid, DatabaseRelationId, dboid, 0);
	if (LockAcquire(&hold_tag, RowExclusiveLock, true, true) == LOCKACQUIRE_NOT_AVAIL)
		return false;
	holding = true;
	return true;
}

void
iw_database_release(void)
{
	if (holding)
		LockRelease(&hold_tag, RowExclusiveLock, true);
	holding = false;
}

/*
 * A FATAL while connecting: a session lock outlives nothing, so it goes
 * (unless the failed startup transaction's abort released it already).
 */
static void
iw_database_release_at_exit(int code, Datum arg)
{
	if (holding && LockHeldByMe(&hold_tag, RowExclusiveLock))
		LockRelease(&hold_tag, RowExclusiveLock, true);
	holding = false;
}

/*
 * The LOG line of a process of ours leaving its database for such a command.
 * Outside any transaction, so the name is the setting's (the supervisor's
 * database, which is its run workers' too), not a catalog lookup.
 */
void
iw_log_leaving_database(const char *who)
{
	ereport(LOG,
			(errmsg("%s leaves database \"%s\": another session waits for it to be unused",
					who, ironwod_database_name),
			 errdetail("DROP DATABASE, ALTER DATABASE RENAME or SET TABLESPACE, or CREATE DATABASE with it as the template.")));
}
