/*-------------------------------------------------------------------------
 *
 * sqlfuncs.c
 *	  SQL-callable C functions (declared in sql/modules/05_native.sql).
 *	  None of them does HTTP or holds a private key: backends only seal to
 *	  public keys and hand sealed bytes to a validate worker.
 *
 *-------------------------------------------------------------------------
 */
#include "ironwod.h"

#include "access/htup_details.h"
#include "access/parallel.h"
#include "access/xact.h"
#include "catalog/dependency.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "nodes/plannodes.h"
#include "postmaster/bgworker.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "tcop/pquery.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/portal.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(ironwod_preloaded);
PG_FUNCTION_INFO_V1(ironwod_library_version);
PG_FUNCTION_INFO_V1(ironwod_library_drives);
PG_FUNCTION_INFO_V1(ironwod_wake);
PG_FUNCTION_INFO_V1(ironwod_wait_for_change);
PG_FUNCTION_INFO_V1(ironwod_sealed_key_id);
PG_FUNCTION_INFO_V1(ironwod_seal_key);
PG_FUNCTION_INFO_V1(ironwod_validate_sealed_key);
PG_FUNCTION_INFO_V1(ironwod_worker_status);
PG_FUNCTION_INFO_V1(ironwod_probe_master_key_command);
PG_FUNCTION_INFO_V1(ironwod_rate_limits);
PG_FUNCTION_INFO_V1(ironwod_note_queued_run);
PG_FUNCTION_INFO_V1(ironwod_run_queued_here);

static void
require_shmem(void)
{
	if (iw_shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("ironwod must be loaded via shared_preload_libraries"),
				 errhint("Add ironwod to shared_preload_libraries in postgresql.conf and restart the server.")));
}

Datum
ironwod_preloaded(PG_FUNCTION_ARGS)
{
	require_shmem();
	PG_RETURN_BOOL(true);
}

/* ironwod.library_version(): the extension version this library was built as. */
Datum
ironwod_library_version(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(IRONWOD_VERSION));
}

/* ironwod.library_drives(version): whether this library drives that SQL version. */
Datum
ironwod_library_drives(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(iw_drives_version(text_to_cstring(PG_GETARG_TEXT_PP(0))));
}

Datum
ironwod_wake(PG_FUNCTION_ARGS)
{
	require_shmem();
	iw_wake_supervisor_at_commit();
	PG_RETURN_VOID();
}

/*
 * Is the statement this backend runs exactly "SELECT ironwod_wait(...)" of
 * this extension, with constants or parameters for arguments, in a READ
 * COMMITTED transaction that has no other portal to read from later?  Then
 * the statement's snapshot, the oldest this backend holds, is never read
 * again: ironwod_wait reads the run's row with a fresh snapshot each time it
 * wakes, and nothing else in the statement reads a table.
 */
static bool
statement_is_plain_wait(void)
{
	PlannedStmt *stmt;
	TargetEntry *tle;
	FuncExpr   *call;
	ListCell   *lc;

	if (ActivePortal == NULL || list_length(ActivePortal->stmts) != 1 ||
		XactIsoLevel != XACT_READ_COMMITTED || IsInParallelMode() ||
		!ThereAreNoReadyPortals())
		return false;
	stmt = linitial_node(PlannedStmt, ActivePortal->stmts);
	if (stmt->commandType != CMD_SELECT || stmt->utilityStmt != NULL ||
		stmt->subplans != NIL || stmt->planTree == NULL ||
		!IsA(stmt->planTree, Result) || stmt->planTree->lefttree != NULL ||
		((Result *) stmt->planTree)->resconstantqual != NULL ||
		list_length(stmt->planTree->targetlist) != 1)
		return false;
	foreach(lc, stmt->rtable)
		if (lfirst_node(RangeTblEntry, lc)->rtekind != RTE_RESULT)
			return false;
	tle = linitial_node(TargetEntry, stmt->planTree->targetlist);
	if (!IsA(tle->expr, FuncExpr))
		return false;
	call = (FuncExpr *) tle->expr;
	foreach(lc, call->args)
		if (!IsA(lfirst(lc), Const) && !IsA(lfirst(lc), Param))
			return false;
	{
		char	   *name = get_func_name(call->funcid);

		if (name == NULL || strcmp(name, "ironwod_wait") != 0)
			return false;
	}
	return getExtensionOfObject(ProcedureRelationId, call->funcid) ==
		get_extension_oid("ironwod", true);
}

/*
 * Sleep until a worker broadcasts a run state change, or the timeout passes.
 * ironwod_wait() re-reads the run row after each return, so a missed broadcast
 * costs at most one timeout, never correctness.
 *
 * A client waits in ironwod_wait for a whole run, and a statement's snapshot
 * holds back the xmin horizon until the statement ends: no version of a row
 * the run rewrites (a page's counters, the heartbeat, a unit done) could be
 * pruned meanwhile, and each rewrite walked all the versions before it.  So
 * when the statement is a plain "SELECT ironwod_wait(...)", whose own snapshot
 * is never read again (statement_is_plain_wait), this backend stops
 * advertising an xmin while it sleeps, as it would between statements; the
 * next snapshot ironwod_wait takes advertises its own.  Anything else keeps
 * its snapshot's xmin, as every statement does.
 */
Datum
ironwod_wait_for_change(PG_FUNCTION_ARGS)
{
	int32		timeout_ms = PG_GETARG_INT32(0);

	require_shmem();
	if (timeout_ms <= 0)
		PG_RETURN_VOID();
	if (statement_is_plain_wait())
	{
		InvalidateCatalogSnapshot();
		MyProc->xmin = InvalidTransactionId;
	}
	ConditionVariablePrepareToSleep(&iw_shared->run_cv);
	(void) ConditionVariableTimedSleep(&iw_shared->run_cv, timeout_ms, PG_WAIT_EXTENSION);
	ConditionVariableCancelSleep();
	PG_RETURN_VOID();
}

/*
 * Runs queued by the current transaction of this backend.  A run row is
 * invisible to the supervisor until the transaction that inserted it commits,
 * so ironwod_wait() on such a run could only time out; it asks here first.
 * The list belongs to one local transaction id and is ignored (and reset) as
 * soon as another transaction runs, so no end-of-transaction callback is
 * needed.  Backend-local on purpose: on Citus a row's xmin comes from a worker
 * node's transaction, so it cannot tell whether this transaction wrote it.
 */
#define IW_MAX_NOTED_RUNS 16

static LocalTransactionId noted_lxid = InvalidLocalTransactionId;
static int	noted_count = 0;
static int64 noted_runs[IW_MAX_NOTED_RUNS];

Datum
ironwod_note_queued_run(PG_FUNCTION_ARGS)
{
	if (noted_lxid != MyProc->lxid)
	{
		noted_lxid = MyProc->lxid;
		noted_count = 0;
	}
	/* a transaction queuing more runs than this is not waiting on one */
	if (noted_count < IW_MAX_NOTED_RUNS)
		noted_runs[noted_count++] = PG_GETARG_INT64(0);
	PG_RETURN_VOID();
}

Datum
ironwod_run_queued_here(PG_FUNCTION_ARGS)
{
	int64		run_id = PG_GETARG_INT64(0);
	int			i;

	if (noted_lxid != MyProc->lxid)
		PG_RETURN_BOOL(false);
	for (i = 0; i < noted_count; i++)
		if (noted_runs[i] == run_id)
			PG_RETURN_BOOL(true);
	PG_RETURN_BOOL(false);
}

Datum
ironwod_sealed_key_id(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(iw_sealed_key_id(PG_GETARG_BYTEA_PP(0))));
}

/*
 * Seal a plaintext key to the active master public key.  Used by the text
 * overload of ironwod_connect; the plaintext is wiped from our copy, though the
 * caller's argument datum is beyond our reach (hence the bytea path).  Like
 * every plaintext path it passes the ironwod.allow_plaintext_keys gate first
 * (plaintext.c), which also hides the statement from pg_stat_activity.
 */
Datum
ironwod_seal_key(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *tenant_id = PG_GETARG_UUID_P(0);
	pg_uuid_t  *gym_id = PG_GETARG_UUID_P(1);
	text	   *key = PG_GETARG_TEXT_PP(2);
	char	   *plaintext;
	char	   *key_id;
	uint8		public_key[IW_X25519_KEYLEN];
	bytea	   *sealed;
	MemoryContext caller_ctx = CurrentMemoryContext;

	iw_admit_plaintext_key();
	require_shmem();
	SPI_connect();
	if (SPI_execute("SELECT key_id, public_key FROM ironwod.master_keys "
					"WHERE is_active ORDER BY created_at DESC LIMIT 1", true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read ironwod.master_keys");
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("no active ironwod master key"),
				 errhint("An administrator registers one with ironwod.register_master_key(key_id, public_key).")));
	{
		bool		isnull;
		bytea	   *pk = DatumGetByteaPP(SPI_getbinval(SPI_tuptable->vals[0],
													   SPI_tuptable->tupdesc, 2, &isnull));

		key_id = MemoryContextStrdup(caller_ctx, SPI_getvalue(SPI_tuptable->vals[0],
															  SPI_tuptable->tupdesc, 1));
		if (VARSIZE_ANY_EXHDR(pk) != IW_X25519_KEYLEN)
			elog(ERROR, "master key \"%s\" has a malformed public key", key_id);
		memcpy(public_key, VARDATA_ANY(pk), IW_X25519_KEYLEN);
	}
	SPI_finish();

	plaintext = text_to_cstring(key);
	PG_TRY();
	{
		sealed = iw_seal(public_key, key_id, tenant_id, gym_id, plaintext, strlen(plaintext));
	}
	PG_FINALLY();
	{
		explicit_bzero(plaintext, strlen(plaintext));
	}
	PG_END_TRY();
	PG_RETURN_BYTEA_P(sealed);
}

static const char *
verdict_name(IwVerdict v)
{
	switch (v)
	{
		case IW_VERDICT_VALID:
			return "valid";
		case IW_VERDICT_REJECTED:
			return "rejected";
		case IW_VERDICT_UNOPENABLE:
			return "unopenable";
		case IW_VERDICT_KEYSTORE:
			return "keystore";
		default:
			return "unavailable";
	}
}

/*
 * Claim a validation slot, reclaiming one whose backend is gone.  Kept out of
 * line: inlined into the caller's PG_TRY frame its loop counter would be at
 * the mercy of longjmp.
 */
static pg_noinline int
claim_validation_slot(const bytea *sealed, uint32 *generation)
{
	int			i;
	int			found = -1;

	LWLockAcquire(iw_shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < IW_MAX_VALIDATION_SLOTS; i++)
	{
		IwValidationSlot *s = &iw_shared->validations[i];

		if (s->state == IW_VSLOT_FREE ||
			(s->backend_pid != MyProcPid && BackendPidGetProc(s->backend_pid) == NULL))
		{
			s->state = IW_VSLOT_PENDING;
			s->generation++;
			s->backend_pid = MyProcPid;
			s->sealed_len = VARSIZE_ANY_EXHDR(sealed);
			memcpy(s->sealed, VARDATA_ANY(sealed), s->sealed_len);
			s->verdict = IW_VERDICT_NONE;
			s->message[0] = '\0';
			s->fingerprint[0] = '\0';
			memset(&s->attempts, 0, sizeof(s->attempts));
			*generation = s->generation;
			found = i;
			break;
		}
	}
	LWLockRelease(iw_shared->lock);
	return found;
}

static void
release_validation_slot(int i, uint32 generation)
{
	IwValidationSlot *s = &iw_shared->validations[i];

	LWLockAcquire(iw_shared->lock, LW_EXCLUSIVE);
	if (s->generation == generation)
	{
		s->state = IW_VSLOT_FREE;
		s->backend_pid = 0;
		memset(s->sealed, 0, sizeof(s->sealed));
	}
	LWLockRelease(iw_shared->lock);
}

/*
 * Start a validate worker on the claimed slot and wait for its verdict until
 * the deadline; the caller frees the slot whatever happens here.
 */
static void
await_verdict(int slot, uint32 generation, const pg_uuid_t *tenant_id,
			  const pg_uuid_t *gym_id, int32 timeout_ms, IwVerdict *verdict,
			  int *http_status, char *fingerprint, char *message, IwAttempts *attempts)
{
	BackgroundWorker worker;
	BackgroundWorkerHandle *handle;
	IwRunArgs	args;
	IwValidationSlot *s = &iw_shared->validations[slot];
	Oid			role_oid = get_role_oid(ironwod_worker_role, true);
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), timeout_ms);

	if (!OidIsValid(role_oid))
	{
		snprintf(message, 256, "ironwod.worker_role \"%s\" does not exist", ironwod_worker_role);
		return;
	}

	memset(&args, 0, sizeof(args));
	args.validation_slot = slot;
	args.validation_generation = generation;
	args.database_oid = MyDatabaseId;
	args.role_oid = role_oid;
	args.tenant_id = *tenant_id;
	args.gym_id = *gym_id;

	iw_prepare_dynamic_worker(&worker, "ironwod_validate_main", "ironwod validate", &args);

	if (!RegisterDynamicBackgroundWorker(&worker, &handle))
	{
		snprintf(message, 256, "no background worker slot free for validation");
		return;
	}

	ConditionVariablePrepareToSleep(&iw_shared->validation_cv);
	for (;;)
	{
		long		remaining;
		bool		done;
		bool		stopped;
		pid_t		pid;

		/* read "stopped" first: a verdict published before exit is then seen */
		stopped = (GetBackgroundWorkerPid(handle, &pid) == BGWH_STOPPED);
		LWLockAcquire(iw_shared->lock, LW_SHARED);
		done = (s->generation == generation && s->state == IW_VSLOT_DONE);
		if (done)
		{
			*verdict = s->verdict;
			*http_status = s->http_status;
			strlcpy(fingerprint, s->fingerprint, IW_FINGERPRINT_LEN);
			strlcpy(message, s->message, 256);
			if (attempts != NULL)
				*attempts = s->attempts;
		}
		LWLockRelease(iw_shared->lock);
		if (done)
			break;
		if (stopped)
		{
			snprintf(message, 256, "validation worker exited without a verdict");
			break;
		}
		remaining = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline);
		if (remaining <= 0)
		{
			snprintf(message, 256, "no verdict within %d ms", timeout_ms);
			TerminateBackgroundWorker(handle);
			break;
		}
		(void) ConditionVariableTimedSleep(&iw_shared->validation_cv,
										   Min(remaining, 1000), PG_WAIT_EXTENSION);
	}
	ConditionVariableCancelSleep();
}

/*
 * Hand a sealed key (or none: the master key check) to a validate worker in a
 * shared memory slot and wait for its verdict until the timeout; message is
 * 256 bytes.  The HTTP attempts the worker made go to *attempts, unless NULL.
 */
static void
ask_validate_worker(const bytea *sealed, const pg_uuid_t *tenant_id, const pg_uuid_t *gym_id,
					int32 timeout_ms, IwVerdict *verdict, int *http_status,
					char *fingerprint, char *message, IwAttempts *attempts)
{
	uint32		generation;
	int			slot = claim_validation_slot(sealed, &generation);

	if (slot < 0)
	{
		snprintf(message, 256, "all %d validation slots are busy", IW_MAX_VALIDATION_SLOTS);
		return;
	}
	PG_TRY();
	{
		await_verdict(slot, generation, tenant_id, gym_id, timeout_ms, verdict,
					  http_status, fingerprint, message, attempts);
	}
	PG_CATCH();
	{
		release_validation_slot(slot, generation);
		PG_RE_THROW();
	}
	PG_END_TRY();
	release_validation_slot(slot, generation);
}

/*
 * Ask a validate worker whether Wodify accepts the key, and wait for the
 * verdict at most ironwod.validate_timeout_ms.  The worker gets the sealed bytes through shared
 * memory because the connection row that holds them is not committed yet.
 */
Datum
ironwod_validate_sealed_key(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *tenant_id = PG_GETARG_UUID_P(0);
	pg_uuid_t  *gym_id = PG_GETARG_UUID_P(1);
	bytea	   *sealed = PG_GETARG_BYTEA_PP(2);
	int32		timeout_ms = ironwod_validate_timeout_ms;
	TupleDesc	tupdesc;
	Datum		values[5];
	bool		nulls[5] = {false, false, false, false, false};
	IwAttempts	attempts;
	IwVerdict	verdict = IW_VERDICT_UNAVAILABLE;
	int			http_status = 0;
	char		fingerprint[IW_FINGERPRINT_LEN] = "";
	char		message[256] = "";

	require_shmem();
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	if (VARSIZE_ANY_EXHDR(sealed) > IW_MAX_SEALED_BYTES)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("sealed API key is larger than %d bytes", IW_MAX_SEALED_BYTES)));

	memset(&attempts, 0, sizeof(attempts));
	ask_validate_worker(sealed, tenant_id, gym_id, timeout_ms, &verdict, &http_status,
						fingerprint, message, &attempts);

	values[0] = CStringGetTextDatum(verdict_name(verdict));
	values[1] = Int32GetDatum(http_status);
	nulls[1] = (http_status == 0);
	values[2] = CStringGetTextDatum(fingerprint);
	nulls[2] = (fingerprint[0] == '\0');
	values[3] = CStringGetTextDatum(message);
	values[4] = iw_attempts_datum(&attempts);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/*
 * ironwod.check_config()'s look at what the master key command prints: a
 * validate worker (the only kind of process that may hold private keys) runs
 * it and reports key ids and counts, or why it failed.  A command that hangs
 * shows up as no verdict in time.
 */
Datum
ironwod_probe_master_key_command(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[3];
	bool		nulls[3] = {false, false, false};
	bytea	   *none = palloc(VARHDRSZ);
	pg_uuid_t	nobody;
	IwVerdict	verdict = IW_VERDICT_UNAVAILABLE;
	int			http_status = 0;
	char		fingerprint[IW_FINGERPRINT_LEN] = "";
	char		message[256] = "";
	int32		timeout_ms = ironwod_validate_timeout_ms;
	const char *hint = NULL;

	require_shmem();
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	SET_VARSIZE(none, VARHDRSZ);
	memset(&nobody, 0, sizeof(nobody));
	ask_validate_worker(none, &nobody, &nobody, timeout_ms, &verdict, &http_status,
						fingerprint, message, NULL);
	if (verdict == IW_VERDICT_KEYSTORE)
		hint = "Run the command as the server's OS user (for example sudo -u postgres <command>): it must print one \"<key id> <64 hex private key>\" line per master key, including every registered one, and exit 0; what it writes to standard error is in the server log.";
	else if (verdict != IW_VERDICT_VALID)
	{
		if (strncmp(message, "no verdict within", 17) == 0)
		{
			snprintf(message, sizeof(message),
					 "ironwod.master_key_command did not finish within %d ms: it hangs, or waits for input",
					 timeout_ms);
			hint = "The command must print the keys and exit without waiting for anything; check the KMS it calls.";
		}
		else
			hint = "See the server log.";
	}
	values[0] = BoolGetDatum(verdict == IW_VERDICT_VALID);
	values[1] = CStringGetTextDatum(message);
	values[2] = hint ? CStringGetTextDatum(hint) : (Datum) 0;
	nulls[2] = (hint == NULL);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

Datum
ironwod_worker_status(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int			i;

	require_shmem();
	InitMaterializedSRF(fcinfo, 0);
	LWLockAcquire(iw_shared->lock, LW_SHARED);
	for (i = 0; i < IW_MAX_RUN_SLOTS; i++)
	{
		Datum		values[2];
		bool		nulls[2] = {false, false};

		if (iw_shared->runs[i].run_id == 0)
			continue;
		values[0] = Int64GetDatum(iw_shared->runs[i].run_id);
		values[1] = Int32GetDatum(iw_shared->runs[i].pid);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	LWLockRelease(iw_shared->lock);
	PG_RETURN_VOID();
}

/*
 * The rate limiter's state: the cluster-wide bucket (tenant and gym NULL)
 * and one row per connection bucket.  The rows are copied out of shared
 * memory first, so no tuple is built under the rate limiter's lock.
 */
Datum
ironwod_rate_limits(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int			max = iw_ratelimit_max_rows();
	IwRateLimitInfo *rows;
	int			n;
	int			i;

	require_shmem();
	InitMaterializedSRF(fcinfo, 0);
	rows = palloc(sizeof(IwRateLimitInfo) * max);
	n = iw_ratelimit_snapshot(rows, max);
	for (i = 0; i < n; i++)
	{
		Datum		values[6];
		bool		nulls[6] = {false, false, false, false, false, false};
		pg_uuid_t  *tenant = palloc(sizeof(pg_uuid_t));
		pg_uuid_t  *gym = palloc(sizeof(pg_uuid_t));

		*tenant = rows[i].tenant_id;
		*gym = rows[i].gym_id;
		values[0] = UUIDPGetDatum(tenant);
		values[1] = UUIDPGetDatum(gym);
		nulls[0] = nulls[1] = rows[i].is_cluster;
		values[2] = Float8GetDatum(rows[i].tokens);
		values[3] = Float8GetDatum(rows[i].rate);
		values[4] = TimestampTzGetDatum(rows[i].paused_until);
		nulls[4] = (rows[i].paused_until == 0);
		values[5] = Int64GetDatum(rows[i].throttled_count);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	pfree(rows);
	PG_RETURN_VOID();
}
