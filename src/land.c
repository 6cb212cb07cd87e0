/*-------------------------------------------------------------------------
 *
 * land.c
 *	  The run worker's SQL side: short transactions that claim a run, ask for
 *	  the next unit of work, land one page, and finish or fail the run.  The
 *	  data logic itself lives in SQL (sql/modules/40_landing.sql); this file
 *	  only opens transactions, binds parameters and copies results out.
 *
 *	  No transaction is ever open while HTTP runs: each function here starts
 *	  and commits its own.
 *
 *-------------------------------------------------------------------------
 */
#include "ironwod.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "pgstat.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/snapmgr.h"

void
iw_txn_begin(const char *activity)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);
}

void
iw_txn_commit(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * The worker's scope for the whole session: every policy and every landing
 * function reads it, so RLS confines the worker to the run's (tenant, gym).
 */
void
iw_set_scope(const pg_uuid_t *tenant_id, const pg_uuid_t *gym_id)
{
	SetConfigOption("ironwod.tenant_id",
					DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum((pg_uuid_t *) tenant_id))),
					PGC_USERSET, PGC_S_SESSION);
	SetConfigOption("ironwod.gym_id",
					DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum((pg_uuid_t *) gym_id))),
					PGC_USERSET, PGC_S_SESSION);
}

/* Text of column col of the first result row, copied into keep; NULL if null. */
static char *
result_text(int col, MemoryContext keep)
{
	char	   *v = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, col);

	return v ? MemoryContextStrdup(keep, v) : NULL;
}

static void
run_sql(const char *sql, int nargs, Oid *types, Datum *values, const char *nulls,
		int expect)
{
	int			rc = SPI_execute_with_args(sql, nargs, types, values, nulls, false, 0);

	if (rc != expect)
		elog(ERROR, "ironwod: SPI failed (%d) running %s", rc, sql);
}

bool
iw_claim_run(int64 run_id, IwClaim *claim, MemoryContext keep)
{
	Oid			types[2] = {INT8OID, INT4OID};
	Datum		values[2] = {Int64GetDatum(run_id), Int32GetDatum(MyProcPid)};
	bool		claimed = false;

	iw_txn_begin("ironwod claim run");
	run_sql("SELECT mode, api_key_ciphertext, master_key_id FROM ironwod.claim_run($1, $2)",
			2, types, values, NULL, SPI_OK_SELECT);
	memset(claim, 0, sizeof(*claim));
	if (SPI_processed > 0)
	{
		bool		isnull;
		Datum		d;

		claimed = true;
		claim->mode = result_text(1, keep);
		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
		if (!isnull)
		{
			bytea	   *b = DatumGetByteaPP(d);
			MemoryContext old = MemoryContextSwitchTo(keep);

			claim->sealed = (bytea *) palloc(VARSIZE_ANY(b));
			memcpy(claim->sealed, b, VARSIZE_ANY(b));
			MemoryContextSwitchTo(old);
		}
		claim->master_key_id = result_text(3, keep);
	}
	iw_txn_commit();
	if (claimed)
		iw_broadcast_run_change();
	return claimed;
}

bool
iw_next_task(int64 run_id, IwTask *task, MemoryContext keep)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(run_id)};
	bool		found = false;

	iw_txn_begin("ironwod plan next task");
	run_sql("SELECT entity, window_key, url, page_size FROM ironwod.next_task($1)",
			1, types, values, NULL, SPI_OK_SELECT);
	if (SPI_processed > 0)
	{
		found = true;
		task->entity = result_text(1, keep);
		task->window_key = result_text(2, keep);
		task->url = result_text(3, keep);
		task->page_size = pg_strtoint32(SPI_getvalue(SPI_tuptable->vals[0],
													 SPI_tuptable->tupdesc, 4));
	}
	iw_txn_commit();
	return found;
}

/*
 * One page, one transaction.  The body is passed as text and cast to jsonb by
 * the SQL function's parameter, so PostgreSQL's own parser validates it; the
 * caller has already checked it is well-formed JSON.
 */
void
iw_land_page(int64 run_id, const IwTask *task, int page, const char *body,
			 int attempts, const char *prev_digest, double latency_ms,
			 IwLandResult *res, MemoryContext keep)
{
	Oid			types[8] = {INT8OID, TEXTOID, TEXTOID, INT4OID, TEXTOID, INT4OID, TEXTOID, FLOAT8OID};
	Datum		values[8];
	char		nulls[8] = {' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '};
	char		label[128];
	char	   *v;

	values[0] = Int64GetDatum(run_id);
	values[1] = CStringGetTextDatum(task->entity);
	values[2] = CStringGetTextDatum(task->window_key);
	values[3] = Int32GetDatum(page);
	values[4] = CStringGetTextDatum(body);
	values[5] = Int32GetDatum(attempts);
	values[6] = prev_digest ? CStringGetTextDatum(prev_digest) : (Datum) 0;
	if (prev_digest == NULL)
		nulls[6] = 'n';
	values[7] = Float8GetDatum(latency_ms);

	snprintf(label, sizeof(label), "ironwod %s %s page %d", task->entity, task->window_key, page);
	iw_txn_begin(label);
	run_sql("SELECT outcome, http_code, message, has_more, n_records, n_new, digest "
			"FROM ironwod.land_page($1, $2, $3, $4, $5::jsonb, $6, $7, $8)",
			8, types, values, nulls, SPI_OK_SELECT);
	if (SPI_processed != 1)
		elog(ERROR, "ironwod.land_page returned %llu rows", (unsigned long long) SPI_processed);
	res->outcome = result_text(1, keep);
	v = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
	res->http_code = v ? pg_strtoint32(v) : 0;
	res->message = result_text(3, keep);
	v = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 4);
	res->has_more = (v != NULL && v[0] == 't');
	res->n_records = pg_strtoint32(SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 5));
	res->n_new = pg_strtoint32(SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 6));
	res->digest = result_text(7, keep);
	iw_txn_commit();
}

/*
 * One derived-data step of a finished pull, in its own transaction: the raw
 * pages are committed whatever happens here (design.md §2).
 */
void
iw_run_step(int64 run_id, const char *sql, const char *activity)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(run_id)};

	iw_txn_begin(activity);
	run_sql(sql, 1, types, values, NULL, SPI_OK_SELECT);
	iw_txn_commit();
}

void
iw_mark_not_entitled(int64 run_id, const char *entity)
{
	Oid			types[2] = {INT8OID, TEXTOID};
	Datum		values[2];

	values[0] = Int64GetDatum(run_id);
	values[1] = CStringGetTextDatum(entity);
	iw_txn_begin("ironwod mark not entitled");
	run_sql("SELECT ironwod.mark_not_entitled($1, $2)", 2, types, values, NULL, SPI_OK_SELECT);
	iw_txn_commit();
}

void
iw_finish_run(int64 run_id)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(run_id)};

	iw_txn_begin("ironwod finish run");
	run_sql("SELECT ironwod.finish_run($1)", 1, types, values, NULL, SPI_OK_SELECT);
	iw_txn_commit();
	iw_broadcast_run_change();
}

void
iw_finish_validate(int64 run_id, bool valid, const char *fingerprint, const char *message)
{
	Oid			types[4] = {INT8OID, BOOLOID, TEXTOID, TEXTOID};
	Datum		values[4];
	char		nulls[4] = {' ', ' ', ' ', ' '};

	values[0] = Int64GetDatum(run_id);
	values[1] = BoolGetDatum(valid);
	values[2] = fingerprint ? CStringGetTextDatum(fingerprint) : (Datum) 0;
	values[3] = message ? CStringGetTextDatum(message) : (Datum) 0;
	if (!fingerprint)
		nulls[2] = 'n';
	if (!message)
		nulls[3] = 'n';

	iw_txn_begin("ironwod finish validation");
	run_sql("SELECT ironwod.finish_validate($1, $2, $3, $4)", 4, types, values, nulls,
			SPI_OK_SELECT);
	iw_txn_commit();
	iw_broadcast_run_change();
	/* a valid key queued the backfill: have the supervisor start it now */
	iw_wake_supervisor_now();
}

void
iw_fail_run(int64 run_id, const char *code, const char *message, const char *phase)
{
	Oid			types[4] = {INT8OID, TEXTOID, TEXTOID, TEXTOID};
	Datum		values[4];

	values[0] = Int64GetDatum(run_id);
	values[1] = CStringGetTextDatum(code);
	values[2] = CStringGetTextDatum(message ? message : "unknown error");
	values[3] = CStringGetTextDatum(phase);

	iw_txn_begin("ironwod record failure");
	run_sql("SELECT ironwod.fail_run($1, $2, $3, $4)", 4, types, values, NULL, SPI_OK_SELECT);
	iw_txn_commit();
	iw_broadcast_run_change();
}
