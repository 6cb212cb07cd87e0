/*-------------------------------------------------------------------------
 *
 * shmem.c
 *	  ironwod's shared memory: the supervisor's pid (never a Latch pointer),
 *	  the wake-at-commit path, the table of live run workers, and the slots
 *	  through which ironwod_connect hands a sealed key to a validate worker.
 *
 *	  Nothing process-local (CURL handles, file descriptors, pointers into a
 *	  process's memory) is ever stored here.
 *
 *-------------------------------------------------------------------------
 */
#include "ironwod.h"

#include "access/xact.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "storage/shmem.h"

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

/*
 * Free this worker's slot on every exit path, including FATAL from SIGTERM;
 * after a crash (SIGKILL) the postmaster reinitialises shared memory, so a
 * slot never outlives its process.
 */
static void
iw_run_slot_release(int code, Datum arg)
{
	if (my_run_slot < 0 || iw_shared == NULL)
		return;
	LWLockAcquire(iw_shared->lock, LW_EXCLUSIVE);
	iw_shared->runs[my_run_slot].run_id = 0;
	iw_shared->runs[my_run_slot].pid = 0;
	LWLockRelease(iw_shared->lock);
	my_run_slot = -1;
	iw_broadcast_run_change();
}

/*
 * Announce that this process works on run_id.  Done before the run is claimed,
 * so the supervisor never sees a running run without a live slot unless its
 * worker is really gone.
 */
void
iw_run_slot_set(int64 run_id)
{
	int			i;

	LWLockAcquire(iw_shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < IW_MAX_RUN_SLOTS; i++)
	{
		if (iw_shared->runs[i].run_id == 0)
		{
			iw_shared->runs[i].run_id = run_id;
			iw_shared->runs[i].pid = MyProcPid;
			my_run_slot = i;
			break;
		}
	}
	LWLockRelease(iw_shared->lock);
	if (my_run_slot < 0)
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("no free ironwod run slot for run " INT64_FORMAT, run_id)));
	before_shmem_exit(iw_run_slot_release, (Datum) 0);
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
