/*-------------------------------------------------------------------------
 *
 * land.c
 *	  The run worker's SQL side: short transactions that claim a run, ask for
 *	  the next units of work, land a batch of pages, and finish or fail the
 *	  run.  The data logic itself lives in SQL (sql/modules/40_landing.sql);
 *	  this file opens transactions, binds parameters and copies results out.
 *
 *	  Landing is the hot path, so it is done here with statements prepared
 *	  once per process (SPI_keepplan).  Each page is parsed and checked by
 *	  page.c as soon as it is fetched, with no transaction open
 *	  (iw_check_page), and waits in a batch; up to ironwod.pages_per_commit
 *	  pages of one entity (and at most IW_BATCH_MAX_BYTES of responses) are
 *	  then landed in one transaction (iw_land_batch): their records inserted
 *	  as arrays in as few statements as the upsert limits allow, the
 *	  bookkeeping in one more (ironwod.page_statement, with the batch's
 *	  counters summed), and the units the batch completed marked done in one
 *	  call (ironwod.units_landed).  What a page costs whatever its size (a
 *	  transaction, the connection row held, the bookkeeping, a commit) is so
 *	  paid once per batch.  ironwod.land_page exposes the same code to SQL
 *	  for tests, one page at a time.
 *
 *	  No transaction is ever open while HTTP runs: each function here starts
 *	  and commits its own.
 *
 *-------------------------------------------------------------------------
 */
#include "ironwod.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "pgstat.h"
#include "storage/ipc.h"
#include "storage/pmsignal.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"

PG_FUNCTION_INFO_V1(ironwod_land_page);
PG_FUNCTION_INFO_V1(ironwod_payload_hash);
PG_FUNCTION_INFO_V1(ironwod_split_page);

static SPIPlanPtr prepare_kept(const char *sql, int nargs, Oid *types);
static Datum scope_uuid(const char *guc);
static struct IwLanding *landing_for(const char *entity, int64 run_id);
static void prepare_bookkeeping(void);

/*
 * The scope of this worker's session (run workers only; the supervisor has
 * none).  Kept as text: iw_txn_begin writes it into every transaction.
 */
static char scope_tenant[UUID_LEN * 2 + 5] = "";
static char scope_gym[UUID_LEN * 2 + 5] = "";

/* Is Citus loaded here?  Its GUCs are defined only then. */
static bool
citus_loaded(void)
{
	return GetConfigOption("citus.propagate_set_commands", true, false) != NULL;
}

/*
 * SET LOCAL both scope GUCs in the current transaction.  As a SQL statement,
 * not set_config()/SetConfigOption(): on Citus that is the only form the
 * coordinator forwards to the nodes (with citus.propagate_set_commands =
 * 'local', inside a transaction block), where the shards' RLS policies read it.
 * The values are uuids or empty, never caller text.
 */
void
iw_set_local_scope(const char *tenant, const char *gym)
{
	/* Defined only where Citus is loaded; without it SET LOCAL stays local. */
	if (citus_loaded())
		SetConfigOption("citus.propagate_set_commands", "local", PGC_USERSET, PGC_S_SESSION);
	/* One statement per call: Citus forwards the statement's whole text. */
	if (SPI_execute(psprintf("SET LOCAL ironwod.tenant_id = %s", quote_literal_cstr(tenant)),
					false, 0) != SPI_OK_UTILITY ||
		SPI_execute(psprintf("SET LOCAL ironwod.gym_id = %s", quote_literal_cstr(gym)),
					false, 0) != SPI_OK_UTILITY)
		elog(ERROR, "could not set the ironwod scope");
}

/*
 * Every transaction of a worker is a transaction block, as a client's BEGIN
 * opens: Citus forwards SET LOCAL to the nodes, and opens remote transactions
 * for reads, only inside one (IsTransactionBlock()).  A block left aborted by
 * an error that was caught without AbortOutOfAnyTransaction() is cleaned up
 * here rather than wedging every later transaction.
 */
void
iw_txn_begin(const char *activity)
{
	if (IsAbortedTransactionBlockState())
		AbortOutOfAnyTransaction();
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	BeginTransactionBlock();
	CommitTransactionCommand();
	StartTransactionCommand();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);

	/*
	 * Without Citus the session's scope (iw_set_scope) is what every
	 * statement reads, and SET LOCAL would only repeat it: two statements
	 * parsed and run per transaction, a page's transaction among them.
	 */
	if (scope_tenant[0] != '\0' && citus_loaded())
		iw_set_local_scope(scope_tenant, scope_gym);
}

/*
 * A worker whose postmaster died leaves at once, committing nothing: no one
 * will read what it lands, the restarted server recovers from the WAL it has
 * and fails the run itself, and an orphan that went on committing (from a
 * page it was fetching, or from a statement that waits on nothing
 * PostgreSQL watches) would mark a run succeeded that the next server never
 * saw finish.  WaitLatch sleeps exit the same way (WL_EXIT_ON_PM_DEATH);
 * this covers the work between them: every commit of ours (iw_txn_commit)
 * and every HTTP transfer (http.c).  proc_exit aborts the open transaction.
 */
void
iw_exit_if_postmaster_dead(void)
{
	if (!PostmasterIsAlive())
		proc_exit(1);
}

void
iw_txn_commit(void)
{
	bool		committed;

	/* the last moment at which not committing is still a choice */
	iw_exit_if_postmaster_dead();
	SPI_finish();
	PopActiveSnapshot();
	committed = EndTransactionBlock(false);
	CommitTransactionCommand();
	if (!committed)
		elog(ERROR, "ironwod: transaction block was rolled back instead of committed");
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * The worker's scope for the whole session: every policy and every landing
 * function reads it, so RLS confines the worker to the run's (tenant, gym).
 * Set for the session on this server, and again in every transaction for the
 * Citus nodes (iw_txn_begin).
 */
void
iw_set_scope(const pg_uuid_t *tenant_id, const pg_uuid_t *gym_id)
{
	strlcpy(scope_tenant,
			DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum((pg_uuid_t *) tenant_id))),
			sizeof(scope_tenant));
	strlcpy(scope_gym,
			DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum((pg_uuid_t *) gym_id))),
			sizeof(scope_gym));
	SetConfigOption("ironwod.tenant_id", scope_tenant, PGC_USERSET, PGC_S_SESSION);
	SetConfigOption("ironwod.gym_id", scope_gym, PGC_USERSET, PGC_S_SESSION);
}

/*
 * No scope: between two runs of a worker (run.c), so that a worker waiting
 * for its next run holds none, and nothing of the last run's tenant is left
 * for the next to read.
 */
void
iw_clear_scope(void)
{
	scope_tenant[0] = '\0';
	scope_gym[0] = '\0';
	SetConfigOption("ironwod.tenant_id", "", PGC_USERSET, PGC_S_SESSION);
	SetConfigOption("ironwod.gym_id", "", PGC_USERSET, PGC_S_SESSION);
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

/*
 * The next units of the run after the one given (none: from the start), up to
 * max of them, in run order: the pending units of the entity being fetched,
 * which is the first query of ironwod.next_task.  Prepared once and run here,
 * that costs an index probe for max units; ironwod.next_task itself (a
 * PL/pgSQL call that plans the next entity) runs only when plan is set and
 * nothing is pending after the given unit.  The caller lands what it fetched
 * of the current entity before it asks to plan: planning an entity reads what
 * the run landed before (the clients whose sign-ins changed), and a batch
 * holds the pages of one entity.  Units handed out stay pending until the
 * batch that lands their last page marks them done, hence the cursor.
 *
 * Planning an entity runs the same few PL/pgSQL statements for each entity
 * of the run, and PL/pgSQL plans a statement afresh (a custom plan) for each
 * of its first five executions: that was most of planning's CPU (a full
 * list's plan, 1.2 ms, 0.25 ms with each statement planned once).  So the
 * planning transaction uses generic plans (plan_cache_mode, for that
 * transaction only), as the landing statements do, and for the same reason
 * not where Citus is loaded (prepare_kept).  The planning statements' plans
 * do not hang on their parameters' values: they read a run's, a gym's or an
 * entity's rows by key, or, for the clients, all of the gym's versions with
 * linear joins (ironwod.plan_entity).
 *
 * The units' entity is made ready for landing here (landing_for), in this
 * transaction, so that checking their pages needs none.
 */
int
iw_next_tasks(int64 run_id, const IwTask *after, bool plan, IwTask *tasks, int max,
			  MemoryContext keep)
{
	static SPIPlanPtr pending_plan = NULL;
	static SPIPlanPtr plan_plan = NULL;
	Oid			types[6] = {UUIDOID, UUIDOID, INT8OID, INT4OID, INT4OID, INT4OID};
	Datum		values[6];
	int			n = 0;

	iw_txn_begin("ironwod plan next task");
	if (pending_plan == NULL)
	{
		pending_plan = prepare_kept("SELECT u.entity, u.window_key, u.url, x.page_size, "
									"u.entity_ordinal, u.ordinal "
									"FROM ironwod.run_units u JOIN ironwod.entities x ON x.entity = u.entity "
									"WHERE u.tenant_id = $1 AND u.gym_id = $2 AND u.run_id = $3 "
									"AND u.status = 'pending' AND (u.entity_ordinal, u.ordinal) > ($4, $5) "
									"ORDER BY u.entity_ordinal, u.ordinal LIMIT $6", 6, types);
		plan_plan = prepare_kept("SELECT 1 FROM ironwod.next_task($1)", 1, types + 2);
	}
	values[0] = scope_uuid("ironwod.tenant_id");
	values[1] = scope_uuid("ironwod.gym_id");
	values[2] = Int64GetDatum(run_id);
	values[3] = Int32GetDatum(after != NULL ? after->entity_ordinal : PG_INT32_MIN);
	values[4] = Int32GetDatum(after != NULL ? after->ordinal : PG_INT32_MIN);
	values[5] = Int32GetDatum(Max(max, 1));
	if (SPI_execute_plan(pending_plan, values, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "ironwod: looking up the run's next units failed");
	if (SPI_processed == 0 && plan)
	{
		if (!citus_loaded())
			(void) set_config_option("plan_cache_mode", "force_generic_plan", PGC_USERSET, PGC_S_SESSION,
									 GUC_ACTION_LOCAL, true, 0, false);
		if (SPI_execute_plan(plan_plan, values + 2, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "ironwod: planning the run's next entity failed");
		if (SPI_processed > 0)
		{
			/*
			 * The new entity's first units: nothing before them is pending.
			 * Not read-only, so that it sees the units just planned.
			 */
			values[3] = values[4] = Int32GetDatum(PG_INT32_MIN);
			if (SPI_execute_plan(pending_plan, values, NULL, false, 0) != SPI_OK_SELECT)
				elog(ERROR, "ironwod: looking up the run's next units failed");
		}
	}
	for (uint64 r = 0; r < SPI_processed && n < Max(max, 1); r++, n++)
	{
		HeapTuple	tup = SPI_tuptable->vals[r];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *v;

		tasks[n].entity = MemoryContextStrdup(keep, SPI_getvalue(tup, desc, 1));
		tasks[n].window_key = MemoryContextStrdup(keep, SPI_getvalue(tup, desc, 2));
		tasks[n].url = MemoryContextStrdup(keep, SPI_getvalue(tup, desc, 3));
		tasks[n].page_size = pg_strtoint32(SPI_getvalue(tup, desc, 4));
		tasks[n].entity_ordinal = pg_strtoint32(SPI_getvalue(tup, desc, 5));
		v = SPI_getvalue(tup, desc, 6);
		tasks[n].ordinal = pg_strtoint32(v);
	}
	/* after the rows are copied: these run statements of their own */
	for (int i = 0; i < n; i++)
		if (i == 0 || strcmp(tasks[i].entity, tasks[i - 1].entity) != 0)
			(void) landing_for(tasks[i].entity, run_id);
	if (n > 0)
		prepare_bookkeeping();
	iw_txn_commit();
	return n;
}

/* ---- landing a page ---- */

/*
 * Per entity, what landing needs from the registry and the prepared upsert
 * into its raw table.  A run worker serves several runs of its database
 * (run.c), so the registry row is read again at the first use in every run:
 * an edit of the registry, or an ALTER EXTENSION UPDATE, is seen by the next
 * run as when each run had a process of its own.  The prepared statements
 * are kept across runs only while their text, which the registry's row
 * determines (ironwod.landing_statement), is byte for byte the same: they
 * take the tenant and the gym as parameters ($1, $2) and embed no scope, and
 * PostgreSQL's plan cache replans them when the tables or functions they
 * use change.
 */
typedef struct IwLanding
{
	IwEntitySpec spec;
	MemoryContext cxt;			/* the spec and the statements' text */
	char	   *insert_sql;
	char	   *upsert_sql;
	SPIPlanPtr	insert;			/* plain INSERT: versions never seen before */
	SPIPlanPtr	upsert;			/* INSERT ... ON CONFLICT */
	int64		run_id;			/* the run the flags below are about */
	bool		seen_versions;	/* not a backfill, or a page of this run held
								 * a stored version: land with the upsert */
	bool		has_vanished;	/* records of the entity in vanished_records */
	bool		has_quarantined;	/* records of the entity in quarantined_records */
} IwLanding;

static MemoryContext landing_cxt = NULL;
static IwLanding *landings = NULL;
static int	n_landings = 0;

/* Records per raw upsert, and the payload bytes one may carry. */
#define IW_UPSERT_MAX_ROWS	1000
#define IW_UPSERT_MAX_BYTES (8 * 1024 * 1024)

/*
 * The page's poison records as the parameters of ironwod.quarantine: ids (NULL
 * when unreadable), reasons and raw bytes.  Built while the body, which the
 * raw bytes point into, is still there; the copies are as large as the poison
 * itself, nothing more.
 */
typedef struct IwPoison
{
	int			n;
	ArrayType  *ids;
	ArrayType  *reasons;
	ArrayType  *raws;
	char		summary[256];	/* "nul 1, invalid_utf8 2": reasons, no content */
} IwPoison;

/*
 * A page fetched and checked, waiting in its batch: parsed into its own
 * memory context, which goes when the batch has landed.
 */
typedef struct IwBatchPage
{
	MemoryContext cxt;
	char	   *window_key;
	int			page_no;
	bool		has_more;		/* false: the unit's last page */
	double		latency_ms;		/* < 0: not measured */
	IwPage		page;
	IwPoison	poison;
} IwBatchPage;

/*
 * Pages of one entity landed in one transaction: at most
 * ironwod.pages_per_commit of them (1 while this library drives SQL whose
 * page_statement counts one page per call) and, past the first page, at most
 * IW_BATCH_MAX_BYTES of response bodies.  What the batch holds is its pages'
 * records as jsonb, about the size of the bodies, so the bound is on memory
 * as much as on what a crash refetches.
 */
struct IwBatch
{
	MemoryContext cxt;			/* the pages' contexts are its children */
	IwLanding  *l;				/* the pages' entity */
	IwBatchPage *pages;
	int			n;
	int			cap;
	Size		bytes;
};

#define IW_BATCH_MAX_BYTES	(8 * 1024 * 1024)

/* Does ironwod.page_statement() count a batch's pages ($12)?  Else one a call. */
static bool batch_sql = false;

static SPIPlanPtr
prepare_kept(const char *sql, int nargs, Oid *types)
{
	/*
	 * Generic plans: these statements take ids and arrays as parameters and
	 * have one good plan, so planning them again for every page is waste.
	 * Except where Citus is loaded: it plans an INSERT ... SELECT on a
	 * distributed table only with the parameters' values at hand ("could not
	 * create distributed plan"), so there every page gets a custom plan.
	 */
	int			opts = citus_loaded() ? CURSOR_OPT_CUSTOM_PLAN : CURSOR_OPT_GENERIC_PLAN;
	SPIPlanPtr	plan = SPI_prepare_cursor(sql, nargs, types, opts);

	if (plan == NULL)
		elog(ERROR, "ironwod: SPI_prepare failed (%d) for %s", SPI_result, sql);
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "ironwod: SPI_keepplan failed");
	return plan;
}

static char **
text_array_to_cstrings(Datum d, int *n)
{
	Datum	   *elems;
	bool	   *nulls;
	char	  **out;

	deconstruct_array(DatumGetArrayTypeP(d), TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, n);
	out = palloc(sizeof(char *) * Max(*n, 1));
	for (int i = 0; i < *n; i++)
		out[i] = nulls[i] ? pstrdup("") : TextDatumGetCString(elems[i]);
	return out;
}

/*
 * (Re)read the entity's registry row into l: its spec in a fresh context, and
 * its landing statements, prepared again only when their text changed.
 */
static void
read_registry(IwLanding *l, const char *entity)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1];
	Oid			upsert_types[8] = {UUIDOID, UUIDOID, INT8OID, TIMESTAMPTZOID,
	INT8ARRAYOID, JSONBARRAYOID, BYTEAARRAYOID, TIMESTAMPTZARRAYOID};
	HeapTuple	tup;
	TupleDesc	desc;
	MemoryContext cxt;
	MemoryContext old;
	IwEntitySpec spec;
	char	   *insert_sql;
	char	   *upsert_sql;
	bool		isnull;

	values[0] = CStringGetTextDatum(entity);
	run_sql("SELECT records_key, id_field, updated_at_path, created_at_path, watermark_path, page_size, "
			"ironwod.landing_statement(entity, false), ironwod.landing_statement(entity, true), "
			"volatile_fields, cardinality(volatile_fields) "
			"FROM ironwod.entities WHERE entity = $1",
			1, types, values, NULL, SPI_OK_SELECT);
	if (SPI_processed != 1)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("ironwod has no entity \"%s\"", entity)));
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;

	cxt = AllocSetContextCreate(landing_cxt, "ironwod landing entity", ALLOCSET_SMALL_SIZES);
	old = MemoryContextSwitchTo(cxt);
	memset(&spec, 0, sizeof(spec));
	spec.entity = pstrdup(entity);
	spec.records_key = SPI_getvalue(tup, desc, 1);
	spec.id_field = SPI_getvalue(tup, desc, 2);
	spec.updated_path = text_array_to_cstrings(SPI_getbinval(tup, desc, 3, &isnull), &spec.n_updated);
	spec.created_path = text_array_to_cstrings(SPI_getbinval(tup, desc, 4, &isnull), &spec.n_created);
	spec.watermark_path = text_array_to_cstrings(SPI_getbinval(tup, desc, 5, &isnull), &spec.n_watermark);
	spec.page_size = DatumGetInt32(SPI_getbinval(tup, desc, 6, &isnull));
	spec.n_volatile = DatumGetInt32(SPI_getbinval(tup, desc, 10, &isnull));
	spec.volatile_fields = spec.n_volatile > 0
		? datumCopy(SPI_getbinval(tup, desc, 9, &isnull), false, -1) : (Datum) 0;
	insert_sql = SPI_getvalue(tup, desc, 7);
	upsert_sql = SPI_getvalue(tup, desc, 8);
	MemoryContextSwitchTo(old);

	if (l->insert == NULL || strcmp(l->insert_sql, insert_sql) != 0)
	{
		if (l->insert != NULL)
			SPI_freeplan(l->insert);
		l->insert = NULL;
		l->insert = prepare_kept(insert_sql, 8, upsert_types);
	}
	if (l->upsert == NULL || strcmp(l->upsert_sql, upsert_sql) != 0)
	{
		if (l->upsert != NULL)
			SPI_freeplan(l->upsert);
		l->upsert = NULL;
		l->upsert = prepare_kept(upsert_sql, 8, upsert_types);
	}
	if (l->cxt != NULL)
		MemoryContextDelete(l->cxt);
	l->cxt = cxt;
	l->spec = spec;
	l->insert_sql = insert_sql;
	l->upsert_sql = upsert_sql;
}

static IwLanding *
landing_for(const char *entity, int64 run_id)
{
	IwLanding  *l = NULL;
	bool		isnull;

	for (int i = 0; i < n_landings; i++)
		if (strcmp(landings[i].spec.entity, entity) == 0)
		{
			l = &landings[i];
			break;
		}

	if (l == NULL)
	{
		if (landing_cxt == NULL)
			landing_cxt = AllocSetContextCreate(TopMemoryContext, "ironwod landing",
												ALLOCSET_SMALL_SIZES);
		landings = landings == NULL ? MemoryContextAlloc(landing_cxt, sizeof(IwLanding))
			: repalloc(landings, sizeof(IwLanding) * (n_landings + 1));
		l = &landings[n_landings];
		memset(l, 0, sizeof(IwLanding));
		/* counted once complete: a failed read leaves no half entry behind */
		read_registry(l, entity);
		n_landings++;
	}
	else if (l->run_id != run_id && run_id != 0)
		read_registry(l, entity);	/* a new run reads the registry afresh */

	if (l->run_id != run_id && run_id != 0)
	{
		Oid			run_types[4] = {TEXTOID, UUIDOID, UUIDOID, INT8OID};
		Datum		run_values[4];

		/*
		 * A new run.  Records of the entity vanish only when a reconciliation
		 * closes it, after its last page, so whether any are vanished now
		 * holds for the rest of this run's pages of the entity.
		 *
		 * Only a backfill tries the plain INSERT first (store_batch): an
		 * incremental run re-reads the records at its watermark and a
		 * reconciliation re-reads whole windows, so their first batch nearly
		 * always holds a stored version, and the plain INSERT would write
		 * rows, fail, roll them back and be redone as the upsert (dead tuples
		 * on one node, a failed statement on a shard on Citus).  The scope is
		 * passed as values: on Citus each probe then names one shard.
		 */
		l->run_id = run_id;
		run_values[0] = CStringGetTextDatum(entity);
		run_values[1] = scope_uuid("ironwod.tenant_id");
		run_values[2] = scope_uuid("ironwod.gym_id");
		run_values[3] = Int64GetDatum(run_id);
		run_sql("SELECT EXISTS (SELECT 1 FROM ironwod.vanished_records v "
				"WHERE v.tenant_id = $2 AND v.gym_id = $3 AND v.entity = $1), "
				"EXISTS (SELECT 1 FROM ironwod.quarantined_records q "
				"WHERE q.tenant_id = $2 AND q.gym_id = $3 AND q.entity = $1), "
				"NOT EXISTS (SELECT 1 FROM ironwod.sync_runs r "
				"WHERE r.tenant_id = $2 AND r.gym_id = $3 AND r.run_id = $4 AND r.mode = 'backfill')",
				4, run_types, run_values, NULL, SPI_OK_SELECT);
		l->has_vanished = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		l->has_quarantined = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
		l->seen_versions = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3, &isnull));
	}
	return l;
}

/* The scope the session acts in, as the uuid parameters of the landing SQL. */
static Datum
scope_uuid(const char *guc)
{
	const char *v = GetConfigOption(guc, true, false);

	if (v == NULL || v[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("no ironwod scope is set")));
	return DirectFunctionCall1(uuid_in, CStringGetDatum(v));
}

/*
 * Run one of the entity's landing statements and return how many new versions
 * it stored.  The statement's result says how it counts: 1.1's plain INSERT
 * returns a row per new version, its upsert (and both statements of the 1.0
 * SQL, which this library still drives until ALTER EXTENSION ironwod UPDATE)
 * one row holding the count.
 */
static int
run_store(SPIPlanPtr plan, Datum *params, const char *nulls, const char *entity)
{
	bool		isnull;
	int			rc = SPI_execute_plan(plan, params, nulls, false, 0);
	int			n;

	if (rc == SPI_OK_INSERT_RETURNING)
		n = (int) SPI_processed;
	else if (rc == SPI_OK_SELECT && SPI_processed == 1)
		n = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	else
		elog(ERROR, "ironwod: landing the records of %s failed", entity);
	SPI_freetuptable(SPI_tuptable);
	return n;
}

/*
 * Store one batch.  A backfill lands versions never seen before, for which a
 * plain INSERT costs half of INSERT ... ON CONFLICT; so in a backfill the
 * plain one is tried first, in a subtransaction, and only if a stored version
 * makes it fail with a unique violation is the batch landed again with the
 * upsert.  After that, the entity's later pages in this run (a re-pull of
 * known data, most likely) go straight to the upsert, as every page of the
 * other runs does (landing_for).
 */
static int
store_batch(IwLanding *l, Datum *params, const char *nulls)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	volatile int n = -1;

	if (!l->seen_versions)
	{
		BeginInternalSubTransaction(NULL);
		MemoryContextSwitchTo(cxt);
		PG_TRY();
		{
			n = run_store(l->insert, params, nulls, l->spec.entity);
			ReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(cxt);
			CurrentResourceOwner = owner;
		}
		PG_CATCH();
		{
			ErrorData  *edata;

			MemoryContextSwitchTo(cxt);
			edata = CopyErrorData();
			FlushErrorState();
			RollbackAndReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(cxt);
			CurrentResourceOwner = owner;
			if (edata->sqlerrcode != ERRCODE_UNIQUE_VIOLATION)
				ReThrowError(edata);
			FreeErrorData(edata);
			l->seen_versions = true;
		}
		PG_END_TRY();
	}
	if (n < 0)
		n = run_store(l->upsert, params, nulls, l->spec.entity);
	return n;
}

/* Order of a batch's records by id, then by place in the batch. */
static int
batch_record_cmp(const void *a, const void *b, void *arg)
{
	IwRecord  **recs = (IwRecord **) arg;
	int			x = *(const int *) a;
	int			y = *(const int *) b;

	if (recs[x]->id != recs[y]->id)
		return recs[x]->id < recs[y]->id ? -1 : 1;
	return x < y ? -1 : (x > y ? 1 : 0);
}

/*
 * Upsert the good records of the batch's pages into the raw table, in page
 * order, at most IW_UPSERT_MAX_ROWS rows and IW_UPSERT_MAX_BYTES of payload
 * per statement, so a page of huge records never needs a second copy of
 * itself at once.  A version that two pages of the batch carry (a record that
 * moved a page while the unit was read) is stored once, by its first page:
 * one statement may not affect a row twice (ON CONFLICT DO UPDATE), and a
 * version stored by an earlier page of the same run would only have its
 * last sighting set again.  Each statement's payloads are freed once stored.
 * Returns the number of new versions.
 *
 * The rows go in in the order of their record ids (a record's versions in
 * page order, so their raw_ids keep the order the pages gave them, which
 * breaks ties of source_updated_at for the readers of the latest version),
 * not in page order: a batch spans many units (a class sign-in unit is one
 * client's sign-ins), whose ids interleave, and inserted in page order every
 * row lands on another leaf of the (wodify_id, payload_hash) index.  In id
 * order consecutive rows share leaves that are still in the CPU's cache, and
 * the heap holds a batch's records in the order the transforms read them.
 * Measured on 50,670 rows of a medium backfill (2026-12-04, medians of 8
 * alternated runs): the INSERT 7.6 to 6.8 us of CPU a row.
 */
static int
upsert_records(IwLanding *l, int64 run_id, IwBatch *batch)
{
	Datum		params[8];
	char		nulls[8] = {' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '};
	int			total = 0;
	int			n = 0;
	IwRecord  **recs;
	Datum	   *ids;
	Datum	   *payloads;
	Datum	   *hashes;
	Datum	   *updated;
	bool	   *updated_null;
	int			n_new = 0;
	int			i = 0;

	for (int p = 0; p < batch->n; p++)
		total += batch->pages[p].page.n_records;
	recs = palloc(sizeof(IwRecord *) * Max(total, 1));
	for (int p = 0; p < batch->n; p++)
	{
		IwPage	   *page = &batch->pages[p].page;

		for (int k = 0; k < page->n_records; k++)
			if (page->records[k].fault == NULL && !page->records[k].duplicate)
				recs[n++] = &page->records[k];
	}
	if (n > 1)
	{
		int		   *order = palloc(sizeof(int) * n);
		IwRecord  **sorted = palloc(sizeof(IwRecord *) * n);
		int			kept = 0;
		int			run = 0;	/* first of the sorted records of this id */

		for (int k = 0; k < n; k++)
			order[k] = k;
		qsort_arg(order, n, sizeof(int), batch_record_cmp, recs);
		for (int k = 0; k < n; k++)
		{
			IwRecord   *r = recs[order[k]];
			bool		again = false;

			if (kept == 0 || sorted[kept - 1]->id != r->id)
				run = kept;
			else if (batch->n > 1)
			{
				/* a version an earlier page of the batch carries: its first page stores it */
				for (int j = run; j < kept && !again; j++)
					again = memcmp(sorted[j]->hash, r->hash, IW_PAYLOAD_HASH_LEN) == 0;
			}
			if (!again)
				sorted[kept++] = r;
		}
		pfree(recs);
		recs = sorted;
		n = kept;
		pfree(order);
	}

	ids = palloc(sizeof(Datum) * Max(n, 1));
	payloads = palloc(sizeof(Datum) * Max(n, 1));
	hashes = palloc(sizeof(Datum) * Max(n, 1));
	updated = palloc(sizeof(Datum) * Max(n, 1));
	updated_null = palloc(sizeof(bool) * Max(n, 1));
	params[0] = scope_uuid("ironwod.tenant_id");
	params[1] = scope_uuid("ironwod.gym_id");
	params[2] = Int64GetDatum(run_id);
	params[3] = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
	while (i < n)
	{
		int			rows = 0;
		Size		bytes = 0;
		int			first = i;
		int			dims[1];
		int			lbs[1] = {1};
		ArrayType  *a_ids,
				   *a_payloads,
				   *a_hashes,
				   *a_updated;

		for (; i < n && rows < IW_UPSERT_MAX_ROWS && bytes < IW_UPSERT_MAX_BYTES; i++)
		{
			IwRecord   *r = recs[i];
			bytea	   *h;

			h = palloc(VARHDRSZ + IW_PAYLOAD_HASH_LEN);
			SET_VARSIZE(h, VARHDRSZ + IW_PAYLOAD_HASH_LEN);
			memcpy(VARDATA(h), r->hash, IW_PAYLOAD_HASH_LEN);
			ids[rows] = Int64GetDatum(r->id);
			payloads[rows] = PointerGetDatum(r->payload);
			hashes[rows] = PointerGetDatum(h);
			updated[rows] = TimestampTzGetDatum(r->updated_at);
			updated_null[rows] = !r->has_updated_at;
			bytes += VARSIZE(r->payload);
			rows++;
		}
		dims[0] = rows;
		a_ids = construct_array(ids, rows, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE);
		a_payloads = construct_array(payloads, rows, JSONBOID, -1, false, TYPALIGN_INT);
		a_hashes = construct_array(hashes, rows, BYTEAOID, -1, false, TYPALIGN_INT);
		a_updated = construct_md_array(updated, updated_null, 1, dims, lbs, TIMESTAMPTZOID, 8,
									   FLOAT8PASSBYVAL, TYPALIGN_DOUBLE);
		/* the array holds its own copy: the records' payloads are done with */
		for (int j = first; j < i; j++)
		{
			pfree(recs[j]->payload);
			recs[j]->payload = NULL;
		}
		for (int j = 0; j < rows; j++)
			pfree(DatumGetPointer(hashes[j]));
		params[4] = PointerGetDatum(a_ids);
		params[5] = PointerGetDatum(a_payloads);
		params[6] = PointerGetDatum(a_hashes);
		params[7] = PointerGetDatum(a_updated);
		n_new += store_batch(l, params, nulls);
		pfree(a_ids);
		pfree(a_payloads);
		pfree(a_hashes);
		pfree(a_updated);
	}
	pfree(recs);
	pfree(ids);
	pfree(payloads);
	pfree(hashes);
	pfree(updated);
	pfree(updated_null);
	return n_new;
}

/* Ids of the page's good records, for what is keyed by record. */
static ArrayType *
good_ids(const IwPage *page)
{
	Datum	   *ids = palloc(sizeof(Datum) * Max(page->n_records, 1));
	int			n = 0;

	for (int i = 0; i < page->n_records; i++)
		if (page->records[i].fault == NULL && !page->records[i].duplicate)
			ids[n++] = Int64GetDatum(page->records[i].id);
	return construct_array(ids, n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE);
}


static void
collect_poison(const IwPage *page, IwPoison *p)
{
	Datum	   *ids = palloc(sizeof(Datum) * page->n_faulty);
	bool	   *id_nulls = palloc(sizeof(bool) * page->n_faulty);
	Datum	   *reasons = palloc(sizeof(Datum) * page->n_faulty);
	Datum	   *raws = palloc(sizeof(Datum) * page->n_faulty);
	const char **faults = palloc(sizeof(char *) * page->n_faulty);
	int			dims[1];
	int			lbs[1] = {1};
	int			n = 0;

	memset(p, 0, sizeof(*p));
	for (int i = 0; i < page->n_records; i++)
	{
		const IwRecord *r = &page->records[i];
		bytea	   *raw;

		if (r->fault == NULL)
			continue;
		raw = palloc(VARHDRSZ + r->raw_len);
		SET_VARSIZE(raw, VARHDRSZ + r->raw_len);
		memcpy(VARDATA(raw), r->raw, r->raw_len);
		ids[n] = Int64GetDatum(r->id);
		id_nulls[n] = !r->has_id;
		reasons[n] = CStringGetTextDatum(r->fault);
		faults[n] = r->fault;
		raws[n] = PointerGetDatum(raw);
		n++;
	}
	dims[0] = n;
	p->n = n;
	p->ids = construct_md_array(ids, id_nulls, 1, dims, lbs, INT8OID, 8, FLOAT8PASSBYVAL,
								TYPALIGN_DOUBLE);
	p->reasons = construct_array(reasons, n, TEXTOID, -1, false, TYPALIGN_INT);
	p->raws = construct_array(raws, n, BYTEAOID, -1, false, TYPALIGN_INT);
	/* reasons with their counts, in order of first appearance */
	for (int i = 0; i < n; i++)
	{
		int			count = 0;
		bool		seen = false;

		for (int j = 0; j < i && !seen; j++)
			seen = strcmp(faults[j], faults[i]) == 0;
		if (seen)
			continue;
		for (int j = i; j < n; j++)
			count += strcmp(faults[j], faults[i]) == 0;
		snprintf(p->summary + strlen(p->summary), sizeof(p->summary) - strlen(p->summary),
				 "%s%s %d", p->summary[0] ? ", " : "", faults[i], count);
	}
	for (int i = 0; i < n; i++)
		pfree(DatumGetPointer(raws[i]));
	pfree(ids);
	pfree(id_nulls);
	pfree(reasons);
	pfree(raws);
	pfree(faults);
}

#define IW_LATENCY_BUCKETS 8
static double latency_bounds[IW_LATENCY_BUCKETS - 1];
static SPIPlanPtr counts_plan = NULL;
static SPIPlanPtr unit_plan = NULL;
static SPIPlanPtr units_plan = NULL;
static SPIPlanPtr unvanish_plan = NULL;
static SPIPlanPtr quarantine_plan = NULL;
static SPIPlanPtr unquarantine_plan = NULL;
static SPIPlanPtr beat_plan = NULL;
static char *counts_sql = NULL; /* page_statement()'s text counts_plan was prepared from */
static bool bookkeeping_ready = false;	/* checked in this run */
static int64 beat_run = 0;
static TimestampTz beat_at = 0;

/*
 * Hold the gym's connection row FOR SHARE for the rest of the batch's
 * transaction, before anything is written.  ironwod_pause and
 * ironwod_disconnect lock that row before they cancel the run, so they wait
 * for a batch in flight to commit (its landing, never its fetching: the
 * pages are fetched with no transaction open), or the batch waits for them
 * and then finds its run cancelled (batch_bookkeeping) and rolls back.
 * Without it, a page
 * whose run check saw the run running could commit after the cancel, and
 * after a later run of the gym had moved the transform cursor past its
 * versions (they were numbered before that run's): never transformed.  The
 * row, not the run's: closing the locations entity updates the connection
 * in the same transaction, and pause locks the connection before the run,
 * so taking the run's row first would order the two locks the other way
 * round.
 */
static void
hold_connection(void)
{
	static SPIPlanPtr hold_plan = NULL;
	Datum		values[2];

	if (hold_plan == NULL)
	{
		Oid			types[2] = {UUIDOID, UUIDOID};

		hold_plan = prepare_kept("SELECT 1 FROM ironwod.integrations_wodify_connection c "
								 "WHERE c.tenant_id = $1 AND c.gym_id = $2 FOR SHARE",
								 2, types);
	}
	values[0] = scope_uuid("ironwod.tenant_id");
	values[1] = scope_uuid("ironwod.gym_id");
	if (SPI_execute_plan(hold_plan, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "ironwod: could not lock the gym's connection");
	SPI_freetuptable(SPI_tuptable);
}

/*
 * Prepare the bookkeeping statements, in a transaction with SPI connected,
 * at the first batch of every run: the worker may serve several runs
 * (run.c), and ALTER EXTENSION UPDATE between two of them changes what
 * page_statement() returns.  The statements are prepared again only when
 * its text changed; none embeds a tenant or a gym (they are parameters).
 * Whether page_statement counts a batch's pages (1.1's SQL) decides how
 * many pages a batch may hold.
 */
static void
prepare_bookkeeping(void)
{
	Oid			types[12] = {UUIDOID, UUIDOID, INT8OID, TEXTOID, INT8ARRAYOID, INT4OID, INT4OID,
	FLOAT8OID, TIMESTAMPTZOID, INT4ARRAYOID, INT4OID, INT4OID};
	Oid			quarantine_types[7] = {INT8OID, TEXTOID, TEXTOID, INT8ARRAYOID, TEXTARRAYOID,
	BYTEAARRAYOID, TIMESTAMPTZOID};
	Datum	   *bounds;
	bool	   *bnulls;
	int			nb;
	bool		isnull;
	char	   *statement;
	Oid			unit_types[4] = {INT8OID, TEXTOID, TEXTOID, INT4OID};
	Oid			units_types[4] = {INT8OID, TEXTOID, TEXTARRAYOID, INT4ARRAYOID};
	Oid			unvanish_types[2] = {TEXTOID, INT8ARRAYOID};
	Oid			beat_types[2] = {INT8OID, TIMESTAMPTZOID};
	SPIPlanPtr *plans[] = {&counts_plan, &unit_plan, &units_plan, &unvanish_plan, &quarantine_plan,
	&unquarantine_plan, &beat_plan};

	if (bookkeeping_ready)
		return;
	run_sql("SELECT ironwod.page_statement(), ironwod.latency_buckets()", 0, NULL, NULL, NULL,
			SPI_OK_SELECT);
	deconstruct_array(DatumGetArrayTypeP(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc,
													   2, &isnull)),
					  FLOAT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE, &bounds, &bnulls, &nb);
	if (nb != IW_LATENCY_BUCKETS - 1)
		elog(ERROR, "ironwod.latency_buckets() must have %d bounds", IW_LATENCY_BUCKETS - 1);
	for (int i = 0; i < nb; i++)
		latency_bounds[i] = DatumGetFloat8(bounds[i]);
	statement = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	if (counts_plan != NULL && counts_sql != NULL && strcmp(counts_sql, statement) == 0)
	{
		bookkeeping_ready = true;
		return;
	}
	for (int i = 0; i < (int) lengthof(plans); i++)
	{
		if (*plans[i] != NULL)
			SPI_freeplan(*plans[i]);
		*plans[i] = NULL;
	}
	if (counts_sql != NULL)
		pfree(counts_sql);
	counts_sql = NULL;
	/* 1.0's statement counts one page a call and has no $12, which is then unused */
	batch_sql = strstr(statement, "$12") != NULL;
	counts_plan = prepare_kept(statement, 12, types);
	/* 1.1 has only the batch's call, 1.0 only the unit's */
	if (batch_sql)
		units_plan = prepare_kept("SELECT ironwod.units_landed($1, $2, $3, $4)", 4, units_types);
	else
		unit_plan = prepare_kept("SELECT ironwod.unit_landed($1, $2, $3, $4)", 4, unit_types);
	unvanish_plan = prepare_kept("SELECT ironwod.unvanish($1, $2)", 2, unvanish_types);
	unquarantine_plan = prepare_kept("SELECT ironwod.unquarantine($1, $2)", 2, unvanish_types);
	quarantine_plan = prepare_kept("SELECT ironwod.quarantine($1, $2, $3, $4, $5, $6, $7)", 7,
								   quarantine_types);
	beat_plan = prepare_kept("SELECT ironwod.count_requests($1, $2, 'land')", 2, beat_types);
	counts_sql = MemoryContextStrdup(TopMemoryContext, statement);
	bookkeeping_ready = true;
}

/*
 * Between two runs of one worker (run.c): forget everything this file holds
 * about the run that ended.  The scope goes (iw_clear_scope, by the caller);
 * each entity's registry row, and the bookkeeping statements' text, are read
 * again at their first use in the next run (read_registry,
 * prepare_bookkeeping), and its run-dependent flags with them; the
 * heartbeat's pace starts afresh.  What stays is what depends on no run:
 * prepared statements whose text is unchanged, and the page check's
 * resource owner, which holds nothing between pages.
 */
void
iw_land_reset(void)
{
	for (int i = 0; i < n_landings; i++)
	{
		landings[i].run_id = 0;
		landings[i].seen_versions = false;
		landings[i].has_vanished = false;
		landings[i].has_quarantined = false;
	}
	bookkeeping_ready = false;
	beat_run = 0;
	beat_at = 0;
}

/*
 * The batch's bookkeeping, in its transaction: the entity's counters summed
 * over the batch's pages (which also prove the run is still running), then,
 * page by page in fetch order, vanished and quarantined records seen again
 * cleanly and the page's poison records, then the completion of the units
 * whose last page the batch holds, and about once a second the run's
 * heartbeat and request counts.  Two statements per batch in the common case.
 */
static void
batch_bookkeeping(IwLanding *l, int64 run_id, IwBatch *batch, int n_new,
				  const IwAttempts *attempts)
{
	Datum		values[12];
	char		nulls[12] = {' ', ' ', ' ', ' ', ' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '};
	TimestampTz now = GetCurrentTimestamp();
	Datum		hist[IW_LATENCY_BUCKETS];
	int			counts[IW_LATENCY_BUCKETS] = {0};
	int			records = 0;
	int			quarantined = 0;
	double		latency = 0;
	bool		has_watermark = false;
	TimestampTz watermark = 0;
	Datum	   *unit_keys = palloc(sizeof(Datum) * batch->n);
	Datum	   *unit_pages = palloc(sizeof(Datum) * batch->n);
	int			n_units = 0;

	prepare_bookkeeping();
	for (int p = 0; p < batch->n; p++)
	{
		IwBatchPage *bp = &batch->pages[p];
		int			bucket = 0;

		records += bp->page.n_records;
		quarantined += bp->poison.n;
		latency += Max(bp->latency_ms, 0);
		if (bp->page.has_watermark && (!has_watermark || bp->page.watermark > watermark))
		{
			watermark = bp->page.watermark;
			has_watermark = true;
		}
		/* width_bucket over the bounds: bucket k (1-based) holds [bound k-1, bound k) */
		while (bucket < IW_LATENCY_BUCKETS - 1 && bp->latency_ms >= latency_bounds[bucket])
			bucket++;
		if (bp->latency_ms >= 0)
			counts[bucket]++;
	}
	values[0] = scope_uuid("ironwod.tenant_id");
	values[1] = scope_uuid("ironwod.gym_id");
	values[2] = Int64GetDatum(run_id);
	values[3] = CStringGetTextDatum(l->spec.entity);
	values[4] = iw_attempts_datum(attempts);
	values[5] = Int32GetDatum(records);
	values[6] = Int32GetDatum(n_new);
	values[7] = Float8GetDatum(latency);
	values[8] = TimestampTzGetDatum(watermark);
	if (!has_watermark)
		nulls[8] = 'n';
	for (int i = 0; i < IW_LATENCY_BUCKETS; i++)
		hist[i] = Int32GetDatum(counts[i]);
	values[9] = PointerGetDatum(construct_array(hist, IW_LATENCY_BUCKETS, INT4OID, 4, true,
												TYPALIGN_INT));
	values[10] = Int32GetDatum(quarantined);
	values[11] = Int32GetDatum(batch->n);
	if (SPI_execute_plan(counts_plan, values, nulls, false, 0) != SPI_OK_INSERT_RETURNING)
		elog(ERROR, "ironwod: page bookkeeping failed");
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("run " INT64_FORMAT " is no longer running", run_id),
				 errhint("It was cancelled or disconnected.")));

	for (int p = 0; p < batch->n; p++)
	{
		IwBatchPage *bp = &batch->pages[p];
		ArrayType  *ids = NULL;

		if (l->has_vanished)
		{
			values[0] = CStringGetTextDatum(l->spec.entity);
			values[1] = PointerGetDatum(ids = good_ids(&bp->page));
			if (SPI_execute_plan(unvanish_plan, values, NULL, false, 0) != SPI_OK_SELECT)
				elog(ERROR, "ironwod: unvanish failed");
		}
		/*
		 * A record the vendor fixed lands cleanly and leaves quarantine, before
		 * this page's own poison goes in (which may carry the same id).
		 */
		if (l->has_quarantined)
		{
			values[0] = CStringGetTextDatum(l->spec.entity);
			values[1] = PointerGetDatum(ids != NULL ? ids : good_ids(&bp->page));
			if (SPI_execute_plan(unquarantine_plan, values, NULL, false, 0) != SPI_OK_SELECT)
				elog(ERROR, "ironwod: unquarantine failed");
		}
		if (bp->poison.n > 0)
		{
			values[0] = Int64GetDatum(run_id);
			values[1] = CStringGetTextDatum(l->spec.entity);
			values[2] = CStringGetTextDatum(bp->window_key);
			values[3] = PointerGetDatum(bp->poison.ids);
			values[4] = PointerGetDatum(bp->poison.reasons);
			values[5] = PointerGetDatum(bp->poison.raws);
			values[6] = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
			if (SPI_execute_plan(quarantine_plan, values, NULL, false, 0) != SPI_OK_SELECT)
				elog(ERROR, "ironwod: quarantine failed");
			l->has_quarantined = true;
		}
		if (!bp->has_more)
		{
			unit_keys[n_units] = CStringGetTextDatum(bp->window_key);
			unit_pages[n_units] = Int32GetDatum(bp->page_no);
			n_units++;
		}
	}
	if (n_units > 0 && batch_sql)
	{
		values[0] = Int64GetDatum(run_id);
		values[1] = CStringGetTextDatum(l->spec.entity);
		values[2] = PointerGetDatum(construct_array(unit_keys, n_units, TEXTOID, -1, false,
													TYPALIGN_INT));
		values[3] = PointerGetDatum(construct_array(unit_pages, n_units, INT4OID, 4, true,
													TYPALIGN_INT));
		if (SPI_execute_plan(units_plan, values, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "ironwod: unit bookkeeping failed");
	}
	else
		for (int u = 0; u < n_units; u++)
		{
			values[0] = Int64GetDatum(run_id);
			values[1] = CStringGetTextDatum(l->spec.entity);
			values[2] = unit_keys[u];
			values[3] = unit_pages[u];
			if (SPI_execute_plan(unit_plan, values, NULL, false, 0) != SPI_OK_SELECT)
				elog(ERROR, "ironwod: unit bookkeeping failed");
		}
	if (beat_run != run_id || now - beat_at >= USECS_PER_SEC)
	{
		values[0] = Int64GetDatum(run_id);
		values[1] = TimestampTzGetDatum(now);
		if (SPI_execute_plan(beat_plan, values, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "ironwod: heartbeat failed");
		beat_run = run_id;
		beat_at = now;
	}
	pfree(unit_keys);
	pfree(unit_pages);
}

static void
set_result(IwLandResult *res, MemoryContext keep, const char *outcome, int http_code,
		   const char *message, const IwPage *page)
{
	res->outcome = MemoryContextStrdup(keep, outcome);
	res->http_code = http_code;
	res->message = message ? MemoryContextStrdup(keep, message) : NULL;
	res->digest = page != NULL && page->has_digest ? MemoryContextStrdup(keep, page->digest) : NULL;
}

/* A batch, empty, whose pages will live in a child context of parent. */
IwBatch *
iw_batch_create(MemoryContext parent)
{
	IwBatch    *b = MemoryContextAllocZero(parent, sizeof(IwBatch));

	b->cxt = AllocSetContextCreate(parent, "ironwod batch", ALLOCSET_DEFAULT_SIZES);
	b->cap = 16;
	b->pages = MemoryContextAllocZero(parent, sizeof(IwBatchPage) * b->cap);
	return b;
}

static void
batch_reset(IwBatch *b)
{
	MemoryContextReset(b->cxt);	/* and the pages' contexts with it */
	b->n = 0;
	b->bytes = 0;
	b->l = NULL;
}

int
iw_batch_pages(const IwBatch *b)
{
	return b->n;
}

/* Time to land: as many pages as a commit may take, or as many bytes. */
bool
iw_batch_full(const IwBatch *b)
{
	int			limit = batch_sql ? Max(ironwod_pages_per_commit, 1) : 1;

	return b->n >= limit || b->bytes >= IW_BATCH_MAX_BYTES;
}

/*
 * Classify and check one page, and keep it in the batch if it is to land:
 * the body is parsed once (page.c), into the page's own memory context, and
 * the pagination invariants are checked.  Needs no transaction: the entity's
 * spec was read when its units were handed out (iw_next_tasks).  A page that
 * is not to land leaves nothing behind, and res says why; a page kept says
 * "landed" (it will be, with its batch, or the run fails) with its
 * has_more and digest.  When body_owned, the body is freed as soon as it is
 * parsed.
 */
static void
check_page_into(IwBatch *batch, IwLanding *l, const IwTask *task, int page_no, char *body,
				size_t body_len, bool body_owned, const char *prev_digest, double latency_ms,
				IwLandResult *res, MemoryContext keep)
{
	IwBatchPage *bp;
	IwPage	   *page;
	MemoryContext cxt;
	MemoryContext old;
	bool		has_more;
	char	   *msg;
	const char *outcome = NULL;
	int			http_code = 0;

	if (batch->n > 0 && batch->l != l)
		elog(ERROR, "ironwod: a batch of %s pages cannot take a page of %s",
			 batch->l->spec.entity, l->spec.entity);
	if (batch->n == batch->cap)
	{
		batch->cap *= 2;
		batch->pages = repalloc(batch->pages, sizeof(IwBatchPage) * batch->cap);
	}
	bp = &batch->pages[batch->n];
	memset(bp, 0, sizeof(*bp));
	page = &bp->page;
	memset(res, 0, sizeof(*res));
	cxt = AllocSetContextCreate(batch->cxt, "ironwod page", ALLOCSET_DEFAULT_SIZES);
	old = MemoryContextSwitchTo(cxt);

	iw_parse_page(body, body_len, &l->spec, page);
	res->n_records = page->n_records;
	msg = NULL;
	switch (page->outcome)
	{
		case IW_PAGE_NOT_JSON:
			outcome = "not_json";
			msg = "response body is not valid JSON";
			break;
		case IW_PAGE_NOT_OBJECT:
			outcome = "bad_body";
			msg = "response is not a JSON object";
			break;
		case IW_PAGE_ENVELOPE:
			msg = psprintf("%s: %s", page->error_code ? page->error_code : "",
						   page->developer_message ? page->developer_message : "");
			msg[pg_mbcharcliplen(msg, strlen(msg), 200)] = '\0';
			outcome = "envelope";
			http_code = page->http_code;
			res->n_records = 0;
			break;
		case IW_PAGE_NO_RECORDS:
			outcome = "bad_body";
			msg = psprintf("response has no \"%s\" array", l->spec.records_key);
			res->n_records = 0;
			break;
		case IW_PAGE_RECORDS:
			break;
	}
	if (outcome != NULL)
	{
		MemoryContextSwitchTo(old);
		set_result(res, keep, outcome, http_code, msg, NULL);
		MemoryContextDelete(cxt);
		return;
	}
	/* poison keeps its bytes; then the body is done with */
	if (page->n_faulty > 0)
		collect_poison(page, &bp->poison);
	if (body_owned)
		pfree(body);

	has_more = page->has_more >= 0 ? page->has_more == 1 : page->n_records >= l->spec.page_size;
	if (page->n_records > 0 && page->has_digest && prev_digest != NULL &&
		strcmp(page->digest, prev_digest) == 0)
		msg = psprintf("page %d of %s repeats page %d", page_no, task->entity, page_no - 1);
	else if (page->page_number != NULL &&
			 (strlen(page->page_number) > 9 || atoi(page->page_number) != page_no))
		msg = psprintf("asked for page %d of %s, got page %s", page_no, task->entity,
					   page->page_number);
	else if (page->n_records == 0 && has_more)
		msg = psprintf("page %d of %s is empty but claims more", page_no, task->entity);
	if (msg != NULL)
	{
		MemoryContextSwitchTo(old);
		set_result(res, keep, "pagination", 0, msg, page);
		MemoryContextDelete(cxt);
		return;
	}

	bp->cxt = cxt;
	bp->window_key = pstrdup(task->window_key);
	bp->page_no = page_no;
	bp->has_more = has_more;
	bp->latency_ms = latency_ms;
	MemoryContextSwitchTo(old);
	batch->l = l;
	batch->n++;
	batch->bytes += body_len;
	set_result(res, keep, "landed", 200, NULL, page);
	res->has_more = has_more;
	res->n_quarantined = bp->poison.n;
}

static ResourceOwner check_owner = NULL;

/* The worker's check of a fetched page (check_page_into), outside any transaction. */
void
iw_check_page(IwBatch *batch, int64 run_id, const IwTask *task, int page, char *body,
			  size_t body_len, const char *prev_digest, double latency_ms, IwLandResult *res,
			  MemoryContext keep)
{
	IwLanding  *l = NULL;
	ResourceOwner saved;

	for (int i = 0; i < n_landings; i++)
		if (strcmp(landings[i].spec.entity, task->entity) == 0 && landings[i].run_id == run_id)
			l = &landings[i];
	if (l == NULL)
		elog(ERROR, "ironwod: %s was not made ready for landing", task->entity);

	/*
	 * No transaction, so no resource owner, is open here, and the page's
	 * digest (an MD5 through PostgreSQL's cryptohash) needs one: a resource
	 * owner of the worker's own stands in.  Everything it tracks is released
	 * by the parser itself; after an error the run ends.
	 */
	if (check_owner == NULL)
		check_owner = ResourceOwnerCreate(NULL, "ironwod page check");
	saved = CurrentResourceOwner;
	CurrentResourceOwner = check_owner;
	check_page_into(batch, l, task, page, body, body_len, true, prev_digest, latency_ms, res, keep);
	CurrentResourceOwner = saved;
}

/*
 * Land the batch's pages in the caller's transaction with SPI connected: the
 * gym's connection held, the good records upserted with the entity's
 * prepared statements, the poison ones quarantined, and batch_bookkeeping
 * does the rest (the units' checkpoints among it).  Returns the new versions.
 */
static int
land_batch_in_txn(IwBatch *batch, int64 run_id, const IwAttempts *attempts)
{
	IwLanding  *l = batch->l;
	int			n_new;

	if (batch->n == 0)
		return 0;
	hold_connection();
	n_new = upsert_records(l, run_id, batch);
	batch_bookkeeping(l, run_id, batch, n_new, attempts);

	/*
	 * Said once per page, with reasons and counts only: a record's content
	 * may be anything the vendor sent, and stays in the table.
	 */
	for (int p = 0; p < batch->n; p++)
		if (batch->pages[p].poison.n > 0)
			ereport(WARNING,
					(errcode(ERRCODE_WARNING),
					 errmsg("ironwod run " INT64_FORMAT ": %d record(s) of %s quarantined (%s)",
							run_id, batch->pages[p].poison.n, l->spec.entity,
							batch->pages[p].poison.summary),
					 errdetail("The rest of the page landed; PostgreSQL cannot store these records as Wodify sent them."),
					 errhint("See ironwod.quarantined_records; every run that fetches them again retries them.")));
	return n_new;
}

/*
 * The batch's pages, one transaction (the worker's path), then an empty
 * batch.  It writes down the attempts counted since the last batch
 * (observe.c) with its bookkeeping: its pages' own, and those of the answers
 * before them that were retried.
 */
void
iw_land_batch(IwBatch *batch, int64 run_id)
{
	char		label[128];

	if (batch->n == 0)
		return;
	snprintf(label, sizeof(label), "ironwod %s: landing %d page(s)", batch->l->spec.entity,
			 batch->n);
	iw_txn_begin(label);
	(void) land_batch_in_txn(batch, run_id, &iw_attempts);
	iw_txn_commit();
	iw_attempts_reset();
	batch_reset(batch);
}

/*
 * ironwod.land_page(run, entity, window_key, page, body text, attempts
 * [, prev_digest, latency_ms]): the worker's landing of one page (a batch of
 * one), callable from SQL so tests can land fixture pages without a worker.
 * It runs in the caller's transaction.
 */
Datum
ironwod_land_page(PG_FUNCTION_ARGS)
{
	IwTask		task;
	IwLandResult res;
	IwAttempts	attempts;
	IwBatch    *batch;
	IwLanding  *l;
	text	   *body;
	TupleDesc	desc;
	Datum		values[8];
	bool		nulls[8] = {false, false, false, false, false, false, false, false};
	MemoryContext caller = CurrentMemoryContext;

	for (int i = 0; i < 6; i++)
		if (PG_ARGISNULL(i))
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("ironwod.land_page: only prev_digest and latency_ms may be NULL")));
	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "ironwod.land_page must return a row");
	task.entity = text_to_cstring(PG_GETARG_TEXT_PP(1));
	task.window_key = text_to_cstring(PG_GETARG_TEXT_PP(2));
	task.url = NULL;
	task.page_size = 0;
	body = PG_GETARG_TEXT_PP(4);

	/* a fixture page was fetched by "attempts" answers, all of them 2xx */
	memset(&attempts, 0, sizeof(attempts));
	attempts.outcomes[IW_ATTEMPT_2XX] = PG_GETARG_INT32(5);
	attempts.retries = Max(PG_GETARG_INT32(5) - 1, 0);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	l = landing_for(task.entity, PG_GETARG_INT64(0));
	prepare_bookkeeping();
	batch = iw_batch_create(CurrentMemoryContext);
	check_page_into(batch, l, &task, PG_GETARG_INT32(3), VARDATA_ANY(body),
					VARSIZE_ANY_EXHDR(body), false,
					PG_ARGISNULL(6) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(6)),
					PG_ARGISNULL(7) ? -1 : PG_GETARG_FLOAT8(7), &res, caller);
	if (strcmp(res.outcome, "landed") == 0)
		res.n_new = land_batch_in_txn(batch, PG_GETARG_INT64(0), &attempts);
	SPI_finish();

	values[0] = CStringGetTextDatum(res.outcome);
	values[1] = Int32GetDatum(res.http_code);
	nulls[1] = (strcmp(res.outcome, "landed") != 0 && strcmp(res.outcome, "envelope") != 0);
	values[2] = res.message ? CStringGetTextDatum(res.message) : (Datum) 0;
	nulls[2] = res.message == NULL;
	values[3] = BoolGetDatum(res.has_more);
	nulls[3] = strcmp(res.outcome, "landed") != 0;
	values[4] = Int32GetDatum(strcmp(res.outcome, "landed") == 0 ? res.n_records : 0);
	values[5] = Int32GetDatum(res.n_new);
	values[6] = res.digest ? CStringGetTextDatum(res.digest) : (Datum) 0;
	nulls[6] = res.digest == NULL;
	values[7] = Int32GetDatum(res.n_quarantined);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(desc, values, nulls)));
}

/*
 * ironwod.split_page(entity, body): what landing makes of a page's records,
 * one row per element of the records array, without landing anything: the
 * record's id, payload, payload hash and source_updated_at, or why it cannot
 * be stored and its raw bytes.  For tests and for measuring the parser.
 */
Datum
ironwod_split_page(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	text	   *body = PG_GETARG_TEXT_PP(1);
	IwLanding  *l;
	IwPage		page;

	InitMaterializedSRF(fcinfo, 0);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	l = landing_for(text_to_cstring(PG_GETARG_TEXT_PP(0)), 0);
	SPI_finish();
	iw_parse_page(VARDATA_ANY(body), VARSIZE_ANY_EXHDR(body), &l->spec, &page);
	if (page.outcome != IW_PAGE_RECORDS)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("the body is not a page of %s records", l->spec.entity)));
	for (int i = 0; i < page.n_records; i++)
	{
		IwRecord   *r = &page.records[i];
		Datum		values[7];
		bool		nulls[7] = {false, false, false, false, false, false, false};

		values[0] = Int32GetDatum(i + 1);
		values[1] = Int64GetDatum(r->id);
		nulls[1] = !r->has_id;
		values[2] = PointerGetDatum(r->payload);
		nulls[2] = r->payload == NULL;
		if (r->payload != NULL)
		{
			bytea	   *h = palloc(VARHDRSZ + IW_PAYLOAD_HASH_LEN);

			SET_VARSIZE(h, VARHDRSZ + IW_PAYLOAD_HASH_LEN);
			memcpy(VARDATA(h), r->hash, IW_PAYLOAD_HASH_LEN);
			values[3] = PointerGetDatum(h);
		}
		nulls[3] = r->payload == NULL;
		values[4] = TimestampTzGetDatum(r->updated_at);
		nulls[4] = r->payload == NULL || !r->has_updated_at;
		values[5] = r->fault ? CStringGetTextDatum(r->fault) : (Datum) 0;
		nulls[5] = r->fault == NULL;
		if (r->fault != NULL)
		{
			bytea	   *raw = palloc(VARHDRSZ + r->raw_len);

			SET_VARSIZE(raw, VARHDRSZ + r->raw_len);
			memcpy(VARDATA(raw), r->raw, r->raw_len);
			values[6] = PointerGetDatum(raw);
		}
		nulls[6] = r->fault == NULL;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/* ironwod.payload_hash(jsonb): the payload hash landing stores, from a stored payload. */
Datum
ironwod_payload_hash(PG_FUNCTION_ARGS)
{
	Jsonb	   *jb = PG_GETARG_JSONB_P(0);
	bytea	   *out = palloc(VARHDRSZ + IW_PAYLOAD_HASH_LEN);

	SET_VARSIZE(out, VARHDRSZ + IW_PAYLOAD_HASH_LEN);
	iw_payload_hash(jb, (uint8 *) VARDATA(out));
	PG_RETURN_BYTEA_P(out);
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

/*
 * Write the attempts counted since the last landed page down, in the
 * caller's transaction, under the entity they were made for (sync_run_entities;
 * the run's own counters are their sum).  The caller resets the counters once
 * its transaction committed.
 */
static void
write_attempts(int64 run_id)
{
	Oid			types[3] = {INT8OID, TEXTOID, INT8ARRAYOID};
	Datum		values[3];

	if (!iw_attempts_pending() || iw_attempts_entity() == NULL)
		return;
	values[0] = Int64GetDatum(run_id);
	values[1] = CStringGetTextDatum(iw_attempts_entity());
	values[2] = iw_attempts_datum(&iw_attempts);
	run_sql("SELECT ironwod.add_attempts($1, $2, $3)", 3, types, values, NULL, SPI_OK_SELECT);
}

void
iw_mark_not_entitled(int64 run_id, const char *entity)
{
	Oid			types[2] = {INT8OID, TEXTOID};
	Datum		values[2];

	values[0] = Int64GetDatum(run_id);
	values[1] = CStringGetTextDatum(entity);
	iw_txn_begin("ironwod mark not entitled");
	write_attempts(run_id);
	run_sql("SELECT ironwod.mark_not_entitled($1, $2)", 2, types, values, NULL, SPI_OK_SELECT);
	iw_txn_commit();
	iw_attempts_reset();
}

/*
 * The worker's peak memory while landing pages, and the largest page, in the
 * caller's transaction (observe.c measures them).
 */
static void
write_memory(int64 run_id)
{
	Oid			types[3] = {INT8OID, INT8OID, INT8OID};
	Datum		values[3];

	if (iw_memory_peak() <= 0)
		return;
	values[0] = Int64GetDatum(run_id);
	values[1] = Int64GetDatum(iw_memory_peak());
	values[2] = Int64GetDatum(iw_memory_largest_page());
	run_sql("SELECT ironwod.record_memory($1, $2, $3)", 3, types, values, NULL, SPI_OK_SELECT);
}

void
iw_finish_run(int64 run_id)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(run_id)};

	iw_txn_begin("ironwod finish run");
	write_attempts(run_id);
	write_memory(run_id);
	run_sql("SELECT ironwod.finish_run($1)", 1, types, values, NULL, SPI_OK_SELECT);
	iw_txn_commit();
	iw_attempts_reset();
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
	write_attempts(run_id);
	run_sql("SELECT ironwod.finish_validate($1, $2, $3, $4)", 4, types, values, nulls,
			SPI_OK_SELECT);
	iw_txn_commit();
	iw_attempts_reset();
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
	write_attempts(run_id);
	write_memory(run_id);
	run_sql("SELECT ironwod.fail_run($1, $2, $3, $4)", 4, types, values, NULL, SPI_OK_SELECT);
	iw_txn_commit();
	iw_attempts_reset();
	iw_broadcast_run_change();
}
