/*-------------------------------------------------------------------------
 *
 * rewrap.c
 *	  Re-sealing every connection's API key to the active master key: the
 *	  "ironwod rewrap" worker, and ironwod.run_rewrap_worker(), which starts
 *	  it and waits for it (ironwod_rewrap(), sql/modules/55_rotation.sql).
 *
 *	  Only workers hold private keys, so a master-key rotation re-seals here.
 *	  The worker connects as ironwod.worker_role, like run workers, and takes
 *	  each connection in its own scope and transaction: with the row locked,
 *	  it opens the key (and a rotated key waiting for its run) with the master
 *	  key it is sealed to, seals the plaintext to the active master key, and
 *	  writes it back.  A run already running keeps the plaintext it opened; a
 *	  run claimed later opens the new ciphertext, and the key command prints
 *	  both master keys throughout, so no gym is ever unable to sync.
 *
 *	  Each private master key is loaded once (one run of the key command per
 *	  key id, not per connection) and wiped when the worker is done or fails.
 *	  A connection that cannot be re-sealed is logged and skipped; the caller
 *	  counts what is left.
 *
 *-------------------------------------------------------------------------
 */
#include "ironwod.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "tcop/tcopprot.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

PG_FUNCTION_INFO_V1(ironwod_run_rewrap_worker);

/* master keys loaded so far, wiped at exit */
#define IW_REWRAP_MAX_KEYS 16

typedef struct IwLoadedKey
{
	char		key_id[65];
	uint8		private_key[IW_X25519_KEYLEN];
} IwLoadedKey;

static IwLoadedKey loaded[IW_REWRAP_MAX_KEYS];
static int	n_loaded = 0;
static MemoryContext rewrap_secret_ctx = NULL;

static void
wipe_loaded_keys(int code, Datum arg)
{
	explicit_bzero(loaded, sizeof(loaded));
	n_loaded = 0;
}

/* The private half of key_id, from the key command the first time it is needed. */
static const uint8 *
private_key_for(const char *key_id)
{
	int			i;

	for (i = 0; i < n_loaded; i++)
		if (strcmp(loaded[i].key_id, key_id) == 0)
			return loaded[i].private_key;
	if (n_loaded == IW_REWRAP_MAX_KEYS)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("API keys are sealed to more than %d master keys", IW_REWRAP_MAX_KEYS)));
	iw_load_master_key(key_id, loaded[n_loaded].private_key);
	strlcpy(loaded[n_loaded].key_id, key_id, sizeof(loaded[n_loaded].key_id));
	return loaded[n_loaded++].private_key;
}

/*
 * The sealed value re-sealed to the active key, or NULL when it needs
 * nothing (absent, or already sealed to the active key).
 */
static bytea *
reseal(bytea *sealed, const pg_uuid_t *tenant, const pg_uuid_t *gym,
	   const char *active_id, const uint8 *active_public)
{
	char	   *key_id;
	char	   *plaintext;
	bytea	   *volatile result = NULL;

	if (sealed == NULL)
		return NULL;
	key_id = iw_sealed_key_id(sealed);
	if (strcmp(key_id, active_id) == 0)
		return NULL;
	plaintext = iw_open(sealed, private_key_for(key_id), tenant, gym, rewrap_secret_ctx);
	PG_TRY();
	{
		result = iw_seal(active_public, active_id, tenant, gym, plaintext, strlen(plaintext));
	}
	PG_FINALLY();
	{
		explicit_bzero(plaintext, strlen(plaintext));
		MemoryContextReset(rewrap_secret_ctx);
	}
	PG_END_TRY();
	return result;
}

/* One connection, in its own scope and transaction. */
static bool
rewrap_one(const char *tenant_text, const char *gym_text, const char *active_id,
		   const uint8 *active_public)
{
	pg_uuid_t	tenant = *DatumGetUUIDP(DirectFunctionCall1(uuid_in, CStringGetDatum(tenant_text)));
	pg_uuid_t	gym = *DatumGetUUIDP(DirectFunctionCall1(uuid_in, CStringGetDatum(gym_text)));
	bool		isnull;
	bytea	   *current = NULL;
	bytea	   *next = NULL;
	bytea	   *new_current;
	bytea	   *new_next;
	Oid			types[3] = {BYTEAOID, BYTEAOID, TEXTOID};
	Datum		values[3];
	char		nulls[3] = {' ', ' ', ' '};
	Datum		d;
	Oid			scope_types[2] = {UUIDOID, UUIDOID};
	Datum		scope_values[2] = {UUIDPGetDatum(&tenant), UUIDPGetDatum(&gym)};

	iw_set_scope(&tenant, &gym);
	iw_txn_begin("ironwod rewrap");

	/*
	 * The scope as values: on Citus a row lock over a comparison with
	 * scope_tenant() would go to every shard, which Citus refuses.  Row-level
	 * security still restricts the read to the scope just set.
	 */
	if (SPI_execute_with_args("SELECT c.api_key_ciphertext, c.next_api_key_ciphertext "
							  "FROM ironwod.integrations_wodify_connection c "
							  "WHERE c.tenant_id = $1 AND c.gym_id = $2 "
							  "FOR UPDATE", 2, scope_types, scope_values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read the connection to re-seal");
	if (SPI_processed == 1)
	{
		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
		if (!isnull)
			current = DatumGetByteaPCopy(d);
		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
		if (!isnull)
			next = DatumGetByteaPCopy(d);
	}
	new_current = reseal(current, &tenant, &gym, active_id, active_public);
	new_next = reseal(next, &tenant, &gym, active_id, active_public);
	if (new_current != NULL || new_next != NULL)
	{
		values[0] = PointerGetDatum(new_current);
		nulls[0] = new_current ? ' ' : 'n';
		values[1] = PointerGetDatum(new_next);
		nulls[1] = new_next ? ' ' : 'n';
		values[2] = CStringGetTextDatum(active_id);
		if (SPI_execute_with_args("SELECT ironwod.store_rewrapped_key($1, $2, $3)",
								  3, types, values, nulls, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not store the re-sealed key");
	}
	iw_txn_commit();
	return new_current != NULL || new_next != NULL;
}

void
ironwod_rewrap_main(Datum main_arg)
{
	IwRunArgs	args;
	MemoryContext ctx;
	char	  **tenants;
	char	  **gyms;
	uint64		n,
				i;
	char	   *active_id;
	uint8		active_public[IW_X25519_KEYLEN];
	volatile int done = 0;
	volatile int failed = 0;

	memcpy(&args, MyBgworkerEntry->bgw_extra, sizeof(args));
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnectionByOid(args.database_oid, args.role_oid, 0);
	pgstat_report_appname("ironwod rewrap");
	before_shmem_exit(wipe_loaded_keys, (Datum) 0);
	ctx = AllocSetContextCreate(TopMemoryContext, "ironwod rewrap", ALLOCSET_DEFAULT_SIZES);
	rewrap_secret_ctx = AllocSetContextCreate(TopMemoryContext, "ironwod secret",
											  ALLOCSET_SMALL_SIZES);

	/* what to do, and the key to seal to, read once */
	iw_txn_begin("ironwod rewrap: plan");
	if (SPI_execute("SELECT k.key_id, k.public_key FROM ironwod.master_keys k WHERE k.is_active",
					true, 0) != SPI_OK_SELECT || SPI_processed != 1)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("no active master key to re-seal API keys to")));
	{
		bool		isnull;
		bytea	   *pub = DatumGetByteaPP(SPI_getbinval(SPI_tuptable->vals[0],
														SPI_tuptable->tupdesc, 2, &isnull));

		active_id = MemoryContextStrdup(ctx, SPI_getvalue(SPI_tuptable->vals[0],
														  SPI_tuptable->tupdesc, 1));
		if (VARSIZE_ANY_EXHDR(pub) != IW_X25519_KEYLEN)
			elog(ERROR, "active master public key is not %d bytes", IW_X25519_KEYLEN);
		memcpy(active_public, VARDATA_ANY(pub), IW_X25519_KEYLEN);
	}
	if (SPI_execute("SELECT tenant_id::text, gym_id::text FROM ironwod.rewrap_targets()",
					true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read what to re-seal");
	n = SPI_processed;
	tenants = MemoryContextAlloc(ctx, sizeof(char *) * Max(n, 1));
	gyms = MemoryContextAlloc(ctx, sizeof(char *) * Max(n, 1));
	for (i = 0; i < n; i++)
	{
		tenants[i] = MemoryContextStrdup(ctx, SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1));
		gyms[i] = MemoryContextStrdup(ctx, SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2));
	}
	iw_txn_commit();

	for (i = 0; i < n; i++)
	{
		MemoryContext old = MemoryContextSwitchTo(ctx);

		PG_TRY();
		{
			if (rewrap_one(tenants[i], gyms[i], active_id, active_public))
				done++;
		}
		PG_CATCH();
		{
			ErrorData  *edata;

			MemoryContextSwitchTo(ctx);
			edata = CopyErrorData();
			FlushErrorState();
			AbortOutOfAnyTransaction();
			MemoryContextReset(rewrap_secret_ctx);
			ereport(WARNING,
					(errcode(edata->sqlerrcode),
					 errmsg("could not re-seal the API key of tenant %s gym %s: %s",
							tenants[i], gyms[i], edata->message)));
			failed++;
		}
		PG_END_TRY();
		MemoryContextSwitchTo(old);
	}
	wipe_loaded_keys(0, (Datum) 0);
	ereport(LOG,
			(errmsg("ironwod rewrap: %d API key%s re-sealed to master key \"%s\", %d failed",
					done, done == 1 ? "" : "s", active_id, failed)));
	proc_exit(0);
}

/*
 * ironwod.run_rewrap_worker(): start the rewrap worker and wait until it
 * exits.  The caller (ironwod_rewrap()) counts what is left afterwards.
 */
Datum
ironwod_run_rewrap_worker(PG_FUNCTION_ARGS)
{
	BackgroundWorker worker;
	BackgroundWorkerHandle *handle;
	IwRunArgs	args;
	Oid			role_oid = get_role_oid(ironwod_worker_role, true);

	if (!OidIsValid(role_oid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("ironwod.worker_role \"%s\" does not exist", ironwod_worker_role)));
	memset(&args, 0, sizeof(args));
	args.validation_slot = -1;
	args.database_oid = MyDatabaseId;
	args.role_oid = role_oid;
	iw_prepare_dynamic_worker(&worker, "ironwod_rewrap_main", "ironwod rewrap", &args);
	if (!RegisterDynamicBackgroundWorker(&worker, &handle))
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("no background worker slot free for the ironwod rewrap worker"),
				 errhint("Try again when fewer runs are running, or raise max_worker_processes.")));
	if (WaitForBackgroundWorkerShutdown(handle) == BGWH_POSTMASTER_DIED)
		ereport(FATAL,
				(errcode(ERRCODE_ADMIN_SHUTDOWN),
				 errmsg("postmaster exited while the ironwod rewrap worker ran")));
	PG_RETURN_VOID();
}
