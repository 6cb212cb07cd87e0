/*-------------------------------------------------------------------------
 *
 * shmem.c
 *	  ironwod's shared memory: the supervisor's pid (never a Latch pointer),
 *	  the wake-at-commit path, the table of live run workers (busy, idle, or
 *	  handed their next run by the supervisor), and the slots through which
 *	  ironwod_connect hands a sealed key to a validate worker.
 *
 *	  Nothing process-local (CURL handles, file descriptors, pointers into a
 *	  process's memory) is ever stored here.
 *
 *-------------------------------------------------------------------------
 */
#include "ironwod.h"

#include "access/xact.h"
#include "miscadmin.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "storage/shmem.h"
#include "utils/guc.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

IwSharedState *iw_shared = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

static bool wake_at_commit = false;
static bool xact_callback_registered = false;

/* PG15 only accepts shared memory requests from this hook. */
static void
iw_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(IwSharedState)));
	RequestNamedLWLockTranche("ironwod", 1);
}

static void
iw_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	iw_shared = ShmemInitStruct("ironwod", sizeof(IwSharedState), &found);
	if (!found)
	{
		memset(iw_shared, 0, sizeof(IwSharedState));
		iw_shared->lock = &(GetNamedLWLockTranche("ironwod"))->lock;
		ConditionVariableInit(&iw_shared->run_cv);
		ConditionVariableInit(&iw_shared->validation_cv);
	}
	LWLockRelease(AddinShmemInitLock);
}

void
iw_shmem_init_hooks(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = iw_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = iw_shmem_startup;
}

/*
 * Set the supervisor's latch.  The pid is resolved to its PGPROC at the moment
 * of the wake, so a restarted supervisor is found and a dead one is skipped;
 * the naptime fallback covers the window in which no supervisor runs.
 */
void
iw_wake_supervisor_now(void)
{
	int			pid;
	PGPROC	   *proc;

	if (iw_shared == NULL)
		return;
	pid = iw_shared->supervisor_pid;
	if (pid == 0)
		return;
	proc = BackendPidGetProc(pid);
	if (proc != NULL)
		SetLatch(&proc->procLatch);
}

/*
 * Wake at COMMIT, never before: a supervisor woken earlier would look for the
 * queued row, not see it yet, and go back to sleep for a whole naptime.
 */
static void
iw_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (wake_at_commit)
				iw_wake_supervisor_now();
			wake_at_commit = false;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			wake_at_commit = false;
			break;
		default:
			break;
	}
}

void
iw_wake_supervisor_at_commit(void)
{
	if (!xact_callback_registered)
	{
		RegisterXactCallback(iw_xact_callback, NULL);
		xact_callback_registered = true;
	}
	wake_at_commit = true;
}

/* Run workers and waiters in ironwod_wait() sleep on this. */
void
iw_broadcast_run_change(void)
{
	if (iw_shared != NULL)
		ConditionVariableBroadcast(&iw_shared->run_cv);
}

static int	my_run_slot = -1;
static bool my_run_slot_callback = false;

/*
 * Free this worker's slot on every exit path, including FATAL from SIGTERM
 * (busy, idle, or assigned a run it has not claimed yet: the run stays
 * queued and the supervisor starts it again); after a crash (SIGKILL) the
 * postmaster reinitialises shared memory, so a slot never outlives its
 * process.
 */
static void
iw_run_slot_release(int code, Datum arg)
{
	if (my_run_slot < 0 || iw_shared == NULL)
		return;
	LWLockAcquire(iw_shared->lock, LW_EXCLUSIVE);
	memset(&iw_shared->runs[my_run_slot], 0, sizeof(IwRunSlot));
	LWLockRelease(iw_shared->lock);
	my_run_slot = -1;
	iw_broadcast_run_change();
}

/*
 * Announce that this process works on run_id.  Done before the run is claimed,
 * so the supervisor never sees a running run without a live slot unless its
 * worker is really gone.  A worker takes a slot once, for its first run; the
 * runs it is handed later come through the same slot
 * (iw_run_slot_wait_for_run).
 */
void
iw_run_slot_set(int64 run_id, Oid role_oid)
{
	int			i;

	LWLockAcquire(iw_shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < IW_MAX_RUN_SLOTS; i++)
	{
		IwRunSlot  *slot = &iw_shared->runs[i];

		if (slot->state == IW_RSLOT_FREE && slot->pid == 0)
		{
			memset(slot, 0, sizeof(IwRunSlot));
			slot->run_id = run_id;
			slot->pid = MyProcPid;
			slot->role_oid = role_oid;
			slot->state = IW_RSLOT_BUSY;
			my_run_slot = i;
			break;
		}
	}
	LWLockRelease(iw_shared->lock);
	if (my_run_slot < 0)
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("no free ironwod run slot for run " INT64_FORMAT, run_id)));
	if (!my_run_slot_callback)
	{
		before_shmem_exit(iw_run_slot_release, (Datum) 0);
		my_run_slot_callback = true;
	}
}

/*
 * After a run that finished cleanly: mark this worker's slot idle, wake the
 * supervisor, and wait at most ironwod.worker_idle_timeout (as of now: a
 * reload during the wait applies to it) for it to hand over another run of
 * this database (iw_run_slot_assign).  Returns true with the run's arguments
 * in *args, the slot busy with it; false when no run came in time, the slot
 * then freed under the same lock hold that saw it still idle, so a run is
 * never assigned to a worker on its way out.  SIGTERM during the wait ends
 * the worker (iw_run_slot_release frees the slot, even when a run was just
 * assigned: it is still queued, and the supervisor starts it again).
 *
 * An idle worker is a session connected to the database, so DROP DATABASE
 * (and ALTER DATABASE RENAME, CREATE DATABASE ... TEMPLATE) would wait for
 * it and then fail.  So the wait looks every IW_DATABASE_PROBE_MS whether a
 * session waits for the database to be unused (dbleave.c), and then returns
 * false at once, its slot freed, even when a run was just assigned: that run
 * is still queued (the supervisor, which leaves too, starts it again
 * wherever the database still exists).
 */
bool
iw_run_slot_wait_for_run(IwRunArgs *args)
{
	IwRunSlot  *slot;
	TimestampTz idle_since;

	if (my_run_slot < 0 || ironwod_worker_idle_timeout_s <= 0)
		return false;
	slot = &iw_shared->runs[my_run_slot];
	LWLockAcquire(iw_shared->lock, LW_EXCLUSIVE);
	slot->run_id = 0;
	memset(&slot->args, 0, sizeof(slot->args));
	slot->state = IW_RSLOT_IDLE;
	LWLockRelease(iw_shared->lock);
	iw_wake_supervisor_now();

	idle_since = GetCurrentTimestamp();
	for (;;)
	{
		long		remaining;

		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		/* a reload may shorten (or lengthen) the wait already begun */
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		if (iw_database_awaited(MyDatabaseId))
		{
			iw_run_slot_release(0, (Datum) 0);
			iw_log_leaving_database("idle ironwod run worker");
			return false;
		}
		LWLockAcquire(iw_shared->lock, LW_EXCLUSIVE);
		if (slot->state == IW_RSLOT_ASSIGNED)
		{
			*args = slot->args;
			memset(&slot->args, 0, sizeof(slot->args));
			slot->state = IW_RSLOT_BUSY;
			LWLockRelease(iw_shared->lock);
			return true;
		}
		remaining = TimestampDifferenceMilliseconds(GetCurrentTimestamp(),
													TimestampTzPlusMilliseconds(idle_since,
																				(int64) ironwod_worker_idle_timeout_s * 1000));
		if (remaining <= 0)
		{
			memset(slot, 0, sizeof(IwRunSlot));
			my_run_slot = -1;
			LWLockRelease(iw_shared->lock);
			return false;
		}
		LWLockRelease(iw_shared->lock);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Min(remaining, IW_DATABASE_PROBE_MS), PG_WAIT_EXTENSION);
	}
}

/*
 * The supervisor's handoff: give run args to the idle worker pid in slot i,
 * if that slot is still its and still idle, and set its latch.  False when
 * the worker left meanwhile (or took its way out): the caller starts a new
 * worker instead.  The run is alive (iw_run_slot_pid) from here on.
 */
bool
iw_run_slot_assign(int i, int pid, const IwRunArgs *args)
{
	IwRunSlot  *slot = &iw_shared->runs[i];
	bool		assigned = false;

	LWLockAcquire(iw_shared->lock, LW_EXCLUSIVE);
	if (slot->state == IW_RSLOT_IDLE && slot->pid == pid)
	{
		slot->args = *args;
		slot->run_id = args->run_id;
		slot->state = IW_RSLOT_ASSIGNED;
		assigned = true;
	}
	LWLockRelease(iw_shared->lock);
	if (assigned)
	{
		PGPROC	   *proc = BackendPidGetProc(pid);

		if (proc != NULL)
			SetLatch(&proc->procLatch);
	}
	return assigned;
}

/* The idle workers now: their slots, pids and roles; returns how many. */
int
iw_run_slot_idle_list(int *slots, int *pids, Oid *roles, int max)
{
	int			n = 0;

	LWLockAcquire(iw_shared->lock, LW_SHARED);
	for (int i = 0; i < IW_MAX_RUN_SLOTS && n < max; i++)
	{
		if (iw_shared->runs[i].state != IW_RSLOT_IDLE)
			continue;
		slots[n] = i;
		pids[n] = iw_shared->runs[i].pid;
		roles[n] = iw_shared->runs[i].role_oid;
		n++;
	}
	LWLockRelease(iw_shared->lock);
	return n;
}

/* Pid of the live worker of run_id, or 0 when none holds a slot for it. */
int
iw_run_slot_pid(int64 run_id)
{
	int			i;
	int			pid = 0;

	LWLockAcquire(iw_shared->lock, LW_SHARED);
	for (i = 0; i < IW_MAX_RUN_SLOTS; i++)
	{
		if (iw_shared->runs[i].run_id == run_id)
		{
			pid = iw_shared->runs[i].pid;
			break;
		}
	}
	LWLockRelease(iw_shared->lock);
	return pid;
}

bool
iw_run_slot_alive(int64 run_id)
{
	return iw_run_slot_pid(run_id) != 0;
}
