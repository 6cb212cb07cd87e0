/*-------------------------------------------------------------------------
 *
 * run.c
 *	  The dynamic background workers that talk to Wodify.
 *
 *	  "ironwod run" executes a queued sync run of one connection: it claims
 *	  the run, opens the sealed API key, then for each unit of work that
 *	  ironwod.next_task() hands out fetches pages over HTTP (no transaction
 *	  open), checks each as it comes and lands them in batches of up to
 *	  ironwod.pages_per_commit pages of one entity, one transaction a batch
 *	  (land.c), and finally finishes or fails the run.
 *
 *	  A worker whose run finished cleanly does not exit at once: it resets
 *	  every piece of per-run state (end_run), marks its run slot idle and
 *	  waits up to ironwod.worker_idle_timeout for the supervisor to hand it
 *	  the next queued run of its database (shmem.c), so that only a worker's
 *	  first run pays a new backend's cold catalog, plpgsql and plan caches.
 *	  It never looks for runs itself: bound by RLS to one scope at a time, it
 *	  could not see other tenants' queued runs anyway.  A failed, cancelled or
 *	  errored run ends the worker, as does SIGTERM, and so does a session
 *	  waiting for the database to be unused (DROP DATABASE and the like,
 *	  dbleave.c) while the worker waits.
 *
 *	  "ironwod validate" answers ironwod_connect(): it opens a sealed key
 *	  handed over in a shared memory slot and asks Wodify once whether the key
 *	  works, without reading or writing any table, so the backend that waits
 *	  for it keeps its own transaction (and its uncommitted connection row).
 *
 *-------------------------------------------------------------------------
 */
#include "ironwod.h"

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "access/xact.h"
#include "common/jsonapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/ps_status.h"
#include "utils/timestamp.h"

/*
 * Per-run state of this file, reset by begin_run for every run the worker
 * serves: where a failure happened, and our own error code for it (else the
 * SQLSTATE).
 */
static const char *run_phase = "start";
static const char *fail_code = NULL;

/*
 * Plaintext API keys live only here, briefly, and are wiped after use.  A
 * run worker creates it for each run and deletes it after (begin_run,
 * end_run).
 */
static MemoryContext secret_ctx = NULL;

static void
init_worker(const IwRunArgs *args, const char *appname)
{
	pqsignal(SIGTERM, die);
	/* a worker that serves several runs reads the configuration between them */
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnectionByOid(args->database_oid, args->role_oid, 0);
	pgstat_report_appname(appname);
	/* parallel workers would outlive our short transactions' assumptions */
	SetConfigOption("max_parallel_workers_per_gather", "0", PGC_USERSET, PGC_S_SESSION);
	/*
	 * A page and its checkpoint commit together, so a crash can only lose
	 * the last pages' commits, and those are simply fetched again: there is
	 * no reason to wait for each commit's WAL flush.
	 */
	SetConfigOption("synchronous_commit", "off", PGC_USERSET, PGC_S_SESSION);
	secret_ctx = AllocSetContextCreate(TopMemoryContext, "ironwod secret",
									   ALLOCSET_SMALL_SIZES);
}

/* What pg_stat_activity shows for a run worker waiting for its next run. */
#define IW_IDLE_ACTIVITY "ironwod: waiting for the next run"

/*
 * A run worker serves several runs in turn, so what ps and pg_stat_activity
 * show of it follows the run it serves, and "idle" between runs.  The
 * application_name names the run only: PostgreSQL shows it to every role that
 * can connect (unlike the query), and no tenant learns another's tenant or gym
 * from ironwod (README, Security).  The process title, which only the
 * server's host shows, names them too.  Neither shows anything secret.
 */
static void
show_serving(const IwRunArgs *args)
{
	char		appname[NAMEDATALEN];
	char	   *tenant = DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(&args->tenant_id)));
	char	   *gym = DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(&args->gym_id)));
	char	   *title = psprintf("run " INT64_FORMAT " tenant %s gym %s", args->run_id, tenant, gym);

	snprintf(appname, sizeof(appname), IW_RUN_WORKER_TITLE " run " INT64_FORMAT, args->run_id);
	pgstat_report_appname(appname);
	set_ps_display(title);
	pfree(title);
	pfree(gym);
	pfree(tenant);
}

static void
show_idle(void)
{
	pgstat_report_appname(IW_RUN_WORKER_TITLE " idle");
	set_ps_display("idle");
}

/* Past this instant the run gives up (ironwod.run_timeout). */
static TimestampTz run_deadline = 0;

/*
 * Fetch the private master key, open the sealed API key with it, and wipe the
 * private key whatever happens.  The plaintext is returned in secret_ctx.
 */
static char *
open_api_key(const bytea *sealed, const pg_uuid_t *tenant_id, const pg_uuid_t *gym_id)
{
	uint8		private_key[IW_X25519_KEYLEN];
	char	   *key_id = iw_sealed_key_id(sealed);
	char	   *plaintext = NULL;

	PG_TRY();
	{
		iw_load_master_key(key_id, private_key);
		plaintext = iw_open(sealed, private_key, tenant_id, gym_id, secret_ctx);
	}
	PG_CATCH();
	{
		explicit_bzero(private_key, sizeof(private_key));
		/* a hanging, failing or garbage-printing command: its own code */
		if (iw_key_command_problem != NULL)
			fail_code = iw_key_command_problem;
		PG_RE_THROW();
	}
	PG_END_TRY();
	explicit_bzero(private_key, sizeof(private_key));
	return plaintext;
}

/* Hand the key to libcurl's header list and wipe our copy at once. */
static void
start_http_with_key(char *plaintext)
{
	iw_http_begin(plaintext);
	explicit_bzero(plaintext, strlen(plaintext));
	MemoryContextReset(secret_ctx);
}

/*
 * Well-formed JSON in the database encoding, checked without throwing, so a
 * truncated or garbled body becomes a retry instead of an aborted transaction.
 */
static bool
body_is_json(const IwHttpResponse *resp)
{
	JsonLexContext *lex;
	JsonParseErrorType rc;

	if (resp->body == NULL || resp->body_len == 0 || strlen(resp->body) != resp->body_len)
		return false;
	if (!pg_verify_mbstr(GetDatabaseEncoding(), resp->body, (int) resp->body_len, true))
		return false;
#if PG_VERSION_NUM >= 170000
	lex = makeJsonLexContextCstringLen(NULL, resp->body, resp->body_len,
									   GetDatabaseEncoding(), false);
#else
	lex = makeJsonLexContextCstringLen(resp->body, (int) resp->body_len,
									   GetDatabaseEncoding(), false);
#endif
	rc = pg_parse_json(lex, &nullSemAction);
	return rc == JSON_SUCCESS;
}

static char *
describe_response(const IwHttpResponse *resp)
{
	if (resp->status > 0)
		return psprintf("HTTP %ld%s%s", resp->status, resp->error[0] ? ": " : "", resp->error);
	return pstrdup(resp->error[0] ? resp->error : "no response");
}

/*
 * One GET /customers/locations: the cheapest call that proves a key works
 * (wodify-api.md §1).  A 401, or a 403 on this endpoint, is a rejected key;
 * anything else that is not a clean answer leaves the question open.
 */
static IwVerdict
validate_key(int *http_status, char *message, size_t message_len)
{
	char	   *url = psprintf("%s/customers/locations?page=1&page_size=100", ironwod_base_url);
	int			max_attempts = Min(ironwod_max_retries, 2);
	int			attempt;

	for (attempt = 0;; attempt++)
	{
		IwHttpResponse resp;
		bool		retry = false;

		iw_http_get(url, &resp);
		*http_status = (int) resp.status;
		switch (resp.klass)
		{
			case IW_HTTP_OK:
				if (body_is_json(&resp))
				{
					Jsonb	   *jb = DatumGetJsonbP(DirectFunctionCall1(jsonb_in,
																	   CStringGetDatum(resp.body)));
					JsonbValue *code = getKeyJsonValueFromContainer(&jb->root, "HTTPCode", 8, NULL);
					JsonbValue *locs = getKeyJsonValueFromContainer(&jb->root, "locations", 9, NULL);

					if (code != NULL && code->type == jbvNumeric)
					{
						int			c = DatumGetInt32(DirectFunctionCall1(numeric_int4,
																		  NumericGetDatum(code->val.numeric)));

						iw_attempt_recount(IW_ATTEMPT_ENVELOPE);
						*http_status = c;
						if (c == 401 || c == 403)
						{
							snprintf(message, message_len, "error envelope with HTTPCode %d", c);
							return IW_VERDICT_REJECTED;
						}
						retry = (c == 429 || c >= 500);
						if (c == 429)
							iw_ratelimit_feedback(429, -1);
						snprintf(message, message_len, "error envelope with HTTPCode %d", c);
					}
					else if (locs != NULL && locs->type == jbvBinary &&
							 JsonContainerIsArray(locs->val.binary.data))
					{
						snprintf(message, message_len, "ok");
						return IW_VERDICT_VALID;
					}
					else
					{
						snprintf(message, message_len, "response has no \"locations\" array");
						return IW_VERDICT_UNAVAILABLE;
					}
				}
				else
				{
					iw_attempt_recount(IW_ATTEMPT_NETWORK);
					retry = true;
					snprintf(message, message_len, "response body is not valid JSON");
				}
				break;
			case IW_HTTP_AUTH:
				snprintf(message, message_len, "%s", describe_response(&resp));
				return IW_VERDICT_REJECTED;
			case IW_HTTP_RETRYABLE:
				retry = true;
				snprintf(message, message_len, "%s", describe_response(&resp));
				break;
			case IW_HTTP_UNKNOWN_ROUTE:
				snprintf(message, message_len,
						 "Wodify has no route /customers/locations (check ironwod.base_url)");
				return IW_VERDICT_UNAVAILABLE;
			default:
				snprintf(message, message_len, "%s", describe_response(&resp));
				return IW_VERDICT_UNAVAILABLE;
		}
		if (!retry || attempt >= max_attempts)
			return IW_VERDICT_UNAVAILABLE;
		iw_http_backoff(attempt, resp.retry_after_s);
	}
}

/*
 * A run that is about to fail lands the pages it fetched and checked first,
 * as it would have had they been committed one by one: a failure is not a
 * crash, and what is good is kept.
 */
static void
land_before_failing(IwBatch *batch, int64 run_id)
{
	const char *phase = run_phase;

	run_phase = "land";
	iw_land_batch(batch, run_id);
	run_phase = phase;
}

/*
 * Fetch every page of one unit of work.  Each page is retried on 429, 5xx,
 * transport errors, error envelopes of those codes and unparsable bodies, with
 * full-jitter backoff; anything else fails the run.  Each page is checked as
 * it comes (its pagination, against the previous page) and joins the batch,
 * which lands when it is full; the unit's checkpoint is written with the
 * batch that holds its last page.
 *
 * A 403 on any endpoint but the first (locations, which proved the key works in
 * this very run) means the gym's plan does not include the entity: it is marked
 * not entitled and the run goes on without it.  Returns false in that case.
 */
static bool
fetch_unit(int64 run_id, const IwTask *task, IwBatch *batch, MemoryContext page_ctx)
{
	int			page;
	char		prev_digest[64] = "";

	iw_attempts_for(task->entity);
	for (page = 1;; page++)
	{
		IwLandResult res;
		int			attempt;

		for (attempt = 0;; attempt++)
		{
			IwHttpResponse resp;
			MemoryContext old;
			char	   *url;
			char	   *problem = NULL;
			bool		retry = false;

			CHECK_FOR_INTERRUPTS();
			if (GetCurrentTimestamp() > run_deadline)
			{
				fail_code = "deadline";
				land_before_failing(batch, run_id);
				ereport(ERROR,
						(errcode(ERRCODE_QUERY_CANCELED),
						 errmsg("run exceeded ironwod.run_timeout (%d min) while fetching %s",
								ironwod_run_timeout_min, task->entity)));
			}
			MemoryContextReset(page_ctx);
			old = MemoryContextSwitchTo(page_ctx);
			url = psprintf("%s%s%spage=%d&page_size=%d", ironwod_base_url, task->url,
						   strchr(task->url, '?') ? "&" : "?", page, task->page_size);
			run_phase = "fetch";
			pgstat_report_activity(STATE_RUNNING, psprintf("ironwod fetch %s %s page %d",
														   task->entity, task->window_key, page));
			iw_memory_page_start();
			iw_http_get(url, &resp);

			switch (resp.klass)
			{
				case IW_HTTP_OK:
					run_phase = "land";
					/* keeps the page in the batch, or says why not; frees the body once parsed */
					iw_check_page(batch, run_id, task, page, resp.body, resp.body_len,
								  prev_digest[0] ? prev_digest : NULL, resp.elapsed_ms,
								  &res, page_ctx);
					resp.body = NULL;
					if (strcmp(res.outcome, "landed") == 0 && iw_batch_full(batch))
						iw_land_batch(batch, run_id);
					iw_memory_page_end((int64) resp.body_len);
					MemoryContextSwitchTo(page_ctx);
					if (strcmp(res.outcome, "landed") == 0)
						break;
					if (strcmp(res.outcome, "not_json") == 0)
					{
						iw_attempt_recount(IW_ATTEMPT_NETWORK);
						retry = true;
						problem = psprintf("response to %s is not valid JSON", task->entity);
					}
					else if (strcmp(res.outcome, "envelope") == 0)
					{
						iw_attempt_recount(IW_ATTEMPT_ENVELOPE);
						problem = psprintf("Wodify error envelope HTTPCode %d on %s: %s",
										   res.http_code, task->entity,
										   res.message ? res.message : "");
						if (res.http_code == 401 || res.http_code == 403)
							fail_code = "auth";
						/* A throttle in a 200 envelope is still a throttle. */
						if (res.http_code == 429)
							iw_ratelimit_feedback(429, -1);
						retry = (res.http_code == 429 || res.http_code >= 500);
					}
					else if (strcmp(res.outcome, "pagination") == 0)
					{
						fail_code = "pagination";
						problem = psprintf("broken pagination: %s", res.message);
					}
					else
					{
						retry = true;
						problem = psprintf("unexpected response for %s: %s", task->entity,
										   res.message ? res.message : "");
					}
					break;
				case IW_HTTP_RETRYABLE:
					if (resp.status == 429 && resp.body != NULL &&
						strstr(resp.body, "Limit Exceeded") != NULL)
					{
						/* the monthly quota: retrying only burns what is left */
						fail_code = "quota";
						problem = psprintf("Wodify's monthly request quota is exhausted (on %s)",
										   task->entity);
						break;
					}
					retry = true;
					problem = psprintf("%s on %s", describe_response(&resp), task->entity);
					break;
				case IW_HTTP_AUTH:
					if (resp.status == 403 && strcmp(task->entity, "locations") != 0)
					{
						MemoryContextSwitchTo(old);
						ereport(LOG,
								(errmsg("ironwod run " INT64_FORMAT ": Wodify refuses %s (HTTP 403); the gym's plan does not include it",
										run_id, task->entity)));
						/* the pages before it land first, as they would have one by one */
						iw_land_batch(batch, run_id);
						iw_mark_not_entitled(run_id, task->entity);
						return false;
					}
					fail_code = "auth";
					problem = psprintf("Wodify refused the API key (%s) on %s",
									   describe_response(&resp), task->entity);
					break;
				case IW_HTTP_UNKNOWN_ROUTE:
					fail_code = "unknown_route";
					problem = psprintf("Wodify has no route for %s (HTTP 403 Missing Authentication Token)",
									   task->entity);
					break;
				case IW_HTTP_TOO_LARGE:
					fail_code = "too_large";
					problem = psprintf("response for %s exceeds ironwod.max_response_bytes",
									   task->entity);
					break;
				case IW_HTTP_INTERRUPTED:
					CHECK_FOR_INTERRUPTS();
					problem = pstrdup("transfer interrupted");
					break;
				case IW_HTTP_CLIENT_ERROR:
					fail_code = "http";
					problem = psprintf("%s on %s", describe_response(&resp), task->entity);
					break;
			}
			MemoryContextSwitchTo(old);
			if (problem == NULL)
				break;			/* landed */
			if (retry && attempt < ironwod_max_retries)
			{
				ereport(LOG,
						(errmsg("ironwod run " INT64_FORMAT ": %s; retrying", run_id, problem)));
				iw_http_backoff(attempt, resp.retry_after_s);
				continue;
			}
			if (fail_code == NULL)
				fail_code = retry ? "retries_exhausted" : "http";
			land_before_failing(batch, run_id);
			ereport(ERROR,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("%s", problem),
					 retry ? errdetail("Gave up after %d attempts.", attempt + 1) : 0));
		}

		if (!res.has_more)
			return true;
		strlcpy(prev_digest, res.digest ? res.digest : "", sizeof(prev_digest));
	}
}

/*
 * One run, to its end.  Returns true when the run finished cleanly (finished,
 * which raises unless the run was still running, or its key validated):
 * only then may the worker serve another.  A run no longer queued when
 * claimed, or whose key Wodify rejected, returns false, and the worker
 * exits, as before; every other outcome is an ERROR (record_failure).
 */
static bool
execute_run(const IwRunArgs *args, MemoryContext run_ctx)
{
	IwClaim		claim;
	IwTask	   *queue;
	int			queue_len = 0;
	int			queue_pos = 0;
	int			queue_max = Max(ironwod_pages_per_commit, 1);
	IwTask		cursor;
	bool		started = false;
	IwBatch    *batch;
	MemoryContext task_ctx;
	MemoryContext page_ctx;
	char		fingerprint[IW_FINGERPRINT_LEN];
	char	   *plaintext;

	run_phase = "claim";
	iw_memory_run_start();
	run_deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
											   (int64) ironwod_run_timeout_min * 60 * 1000);
	if (!iw_claim_run(args->run_id, &claim, run_ctx))
	{
		ereport(LOG,
				(errmsg("ironwod run " INT64_FORMAT " is no longer queued", args->run_id)));
		return false;
	}
	if (claim.sealed == NULL)
	{
		fail_code = "no_key";
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("the connection has no API key"),
				 errhint("Connect the gym again with ironwod_connect.")));
	}

	run_phase = "open_key";
	plaintext = open_api_key(claim.sealed, &args->tenant_id, &args->gym_id);
	iw_fingerprint(plaintext, &args->tenant_id, &args->gym_id, fingerprint);
	start_http_with_key(plaintext);

	if (strcmp(claim.mode, "validate") == 0)
	{
		char		message[256];
		int			status = 0;
		IwVerdict	verdict;

		run_phase = "validate";
		/* the validation's attempts are the locations endpoint's */
		iw_attempts_for("locations");
		verdict = validate_key(&status, message, sizeof(message));
		if (verdict == IW_VERDICT_UNAVAILABLE)
		{
			fail_code = "unavailable";
			ereport(ERROR,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("could not validate the API key: %s", message)));
		}
		iw_finish_validate(args->run_id, verdict == IW_VERDICT_VALID, fingerprint,
						   verdict == IW_VERDICT_VALID ? NULL :
						   psprintf("Wodify rejected the API key (HTTP %d)", status));
		/* a rejected key fails the validation run: the worker exits */
		return verdict == IW_VERDICT_VALID;
	}

	task_ctx = AllocSetContextCreate(run_ctx, "ironwod task", ALLOCSET_DEFAULT_SIZES);
	page_ctx = AllocSetContextCreate(run_ctx, "ironwod page", ALLOCSET_DEFAULT_SIZES);
	batch = iw_batch_create(run_ctx);
	queue = MemoryContextAlloc(run_ctx, sizeof(IwTask) * queue_max);
	memset(&cursor, 0, sizeof(cursor));

	/*
	 * Units are handed out a few at a time, after the last one handed out:
	 * a batch spans the units of an entity (most of a gym's class sign-in
	 * units are one or two pages), and the units of the batch stay pending
	 * until it lands.  When the entity has no unit left, what was fetched of
	 * it lands before the next entity is planned.
	 */
	for (;;)
	{
		IwTask	   *task;

		if (queue_pos == queue_len)
		{
			MemoryContextReset(task_ctx);
			run_phase = "plan";
			queue_len = queue_pos = 0;
			if (iw_batch_pages(batch) > 0)
			{
				queue_len = iw_next_tasks(args->run_id, started ? &cursor : NULL, false,
										  queue, queue_max, task_ctx);
				if (queue_len == 0)
				{
					run_phase = "land";
					iw_memory_page_start();
					iw_land_batch(batch, args->run_id);
					iw_memory_page_end(0);
					run_phase = "plan";
				}
			}
			if (queue_len == 0)
				queue_len = iw_next_tasks(args->run_id, started ? &cursor : NULL, true,
										  queue, queue_max, task_ctx);
			if (queue_len == 0)
				break;
		}
		task = &queue[queue_pos++];
		cursor.entity_ordinal = task->entity_ordinal;
		cursor.ordinal = task->ordinal;
		started = true;
		/* not entitled: the entity's units queued are no longer pending */
		if (!fetch_unit(args->run_id, task, batch, page_ctx))
			queue_pos = queue_len;
	}
	run_phase = "transform";
	iw_run_step(args->run_id, "SELECT ironwod.transform_step($1)", "ironwod transform");
	run_phase = "refresh";
	iw_run_step(args->run_id, "SELECT ironwod.refresh_metrics($1)", "ironwod refresh metrics");
	run_phase = "finish";
	iw_finish_run(args->run_id);
	return true;
}

/*
 * Record why the run failed, in a fresh transaction, then exit.  Interrupts are
 * held so a second SIGTERM cannot cut the bookkeeping short; if even that
 * fails, the supervisor's reaper marks the run failed.  A run stopped by
 * ironwod_disconnect is already 'cancelled', which fail_run leaves alone.
 */
static void
record_failure(int64 run_id, MemoryContext ctx)
{
	ErrorData  *edata;
	char		code[32];

	HOLD_INTERRUPTS();
	MemoryContextSwitchTo(ctx);
	edata = CopyErrorData();
	FlushErrorState();
	AbortOutOfAnyTransaction();

	ereport(LOG,
			(errmsg("ironwod run " INT64_FORMAT " failed in phase %s: %s", run_id, run_phase,
					edata->message)));
	strlcpy(code, fail_code ? fail_code : unpack_sql_state(edata->sqlerrcode), sizeof(code));
	PG_TRY();
	{
		iw_fail_run(run_id, code, edata->message, run_phase);
	}
	PG_CATCH();
	{
		EmitErrorReport();
		FlushErrorState();
		AbortOutOfAnyTransaction();
	}
	PG_END_TRY();
	RESUME_INTERRUPTS();
}

/*
 * Set up everything one run needs, from nothing: end_run left no state of
 * the previous run, and the resets are repeated here so that a worker's
 * first run and its later ones start alike.  The scope binds RLS to the
 * run's (tenant, gym); the rate limit binding to its connection's bucket;
 * the process title and application_name to the run; the contexts are new.
 */
static MemoryContext
begin_run(const IwRunArgs *args)
{
	run_phase = "start";
	fail_code = NULL;
	run_deadline = 0;
	iw_key_command_problem = NULL;
	iw_observe_reset();
	iw_land_reset();
	if (secret_ctx == NULL)
		secret_ctx = AllocSetContextCreate(TopMemoryContext, "ironwod secret",
										   ALLOCSET_SMALL_SIZES);
	iw_set_scope(&args->tenant_id, &args->gym_id);
	/* Every worker of this connection shares one bucket from here on. */
	iw_ratelimit_bind(&args->tenant_id, &args->gym_id);
	show_serving(args);
	return AllocSetContextCreate(TopMemoryContext, "ironwod run", ALLOCSET_DEFAULT_SIZES);
}

/*
 * After a run that finished cleanly, before the worker waits for the next:
 * drop every piece of per-run state, so that nothing of this run's tenant,
 * gym or key reaches the next run (a multi-tenant boundary).
 *	- the HTTP handles: the easy handle, the multi handle with its connection
 *	  and TLS session cache, and the header list holding the key (wiped);
 *	  the next run starts them anew with its own key (start_http_with_key);
 *	- the secret context: the plaintext key in it was wiped when it was
 *	  handed to libcurl; the context goes too, and is created anew;
 *	- the scope (ironwod.tenant_id and ironwod.gym_id, and land.c's copy
 *	  that every transaction sets on Citus): none while idle;
 *	- the rate limit binding: the connection's bucket is left;
 *	- land.c's per-run caches: each entity's registry row and run flags, the
 *	  bookkeeping statements' check, the heartbeat pace (iw_land_reset);
 *	- observe.c's attempt counters, their entity and the memory peaks;
 *	- this file's statics (run_phase, fail_code, run_deadline) and the key
 *	  command's problem, set again for the next run (begin_run);
 *	- the run's memory context, with the claim (its sealed key), the task
 *	  queue and the batch;
 *	- the run named in the process title and application_name: "idle" until
 *	  the next run (show_serving, show_idle).
 * The run slot is handed over by the supervisor with the next run (shmem.c).
 * The log hook keeps no per-run secret (it scrubs by function name), so it
 * has nothing to reset.
 */
static void
end_run(MemoryContext run_ctx)
{
	iw_http_end();
	if (secret_ctx != NULL)
		MemoryContextDelete(secret_ctx);
	secret_ctx = NULL;
	iw_clear_scope();
	iw_ratelimit_unbind_now();
	iw_land_reset();
	iw_observe_reset();
	run_phase = "start";
	fail_code = NULL;
	run_deadline = 0;
	iw_key_command_problem = NULL;
	MemoryContextSwitchTo(TopMemoryContext);
	MemoryContextDelete(run_ctx);
#ifdef __GLIBC__

	/*
	 * The run's pages and batches were freed, but glibc keeps freed heap
	 * resident (a big page raises its mmap threshold, so later big blocks
	 * come from the heap, and only the heap's top is ever given back).  A
	 * worker waiting for its next run would carry the last run's peak into
	 * it: 32 MB more private memory at a 40 MB page (the memory scenario).
	 */
	malloc_trim(0);
#endif

	/*
	 * The run's statistics (its function timings among them) are flushed
	 * now, as an exiting worker's are, not a second or a run later; then
	 * pg_stat_activity tells that this worker waits (the benches wait for
	 * it, test/cluster.sh).
	 */
	pgstat_report_stat(true);
	pgstat_report_activity(STATE_IDLE, IW_IDLE_ACTIVITY);
	show_idle();
}

void
ironwod_run_main(Datum main_arg)
{
	IwRunArgs	args;

	memcpy(&args, MyBgworkerEntry->bgw_extra, sizeof(args));
	init_worker(&args, "ironwod run");
	iw_run_slot_set(args.run_id, args.role_oid);

	for (;;)
	{
		MemoryContext run_ctx = begin_run(&args);
		volatile bool finished = false;

		PG_TRY();
		{
			finished = execute_run(&args, run_ctx);
		}
		PG_CATCH();
		{
			record_failure(args.run_id, run_ctx);
		}
		PG_END_TRY();

		/* a failed, cancelled or errored run ends the worker, as it always did */
		if (!finished)
			break;
		end_run(run_ctx);
		if (!iw_run_slot_wait_for_run(&args))
			break;
		/* the configuration as of the run's start, as a new worker would read it */
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		/* the supervisor hands over runs of its own database and role only */
		if (args.database_oid != MyDatabaseId || args.role_oid != GetAuthenticatedUserId())
		{
			ereport(LOG,
					(errmsg("ironwod run worker %d exits: run " INT64_FORMAT " was handed over for another database or role",
							MyProcPid, args.run_id)));
			break;
		}
		{
			char		activity[64];

			snprintf(activity, sizeof(activity), "ironwod run " INT64_FORMAT, args.run_id);
			pgstat_report_activity(STATE_RUNNING, activity);
		}
	}

	iw_http_end();
	proc_exit(0);
}

/* Publish a verdict, unless the slot was reclaimed for another request. */
static void
publish_verdict(const IwRunArgs *args, IwVerdict verdict, int http_status,
				const char *fingerprint, const char *message)
{
	IwValidationSlot *slot = &iw_shared->validations[args->validation_slot];

	LWLockAcquire(iw_shared->lock, LW_EXCLUSIVE);
	if (slot->generation == args->validation_generation && slot->state == IW_VSLOT_PENDING)
	{
		slot->verdict = verdict;
		slot->http_status = http_status;
		strlcpy(slot->fingerprint, fingerprint ? fingerprint : "", sizeof(slot->fingerprint));
		strlcpy(slot->message, message ? message : "", sizeof(slot->message));
		slot->attempts = iw_attempts;
		slot->state = IW_VSLOT_DONE;
	}
	LWLockRelease(iw_shared->lock);
	ConditionVariableBroadcast(&iw_shared->validation_cv);
}

void
ironwod_validate_main(Datum main_arg)
{
	IwRunArgs	args;
	IwValidationSlot *slot;
	bytea	   *sealed;
	char		fingerprint[IW_FINGERPRINT_LEN] = "";
	char		message[256] = "";
	int			http_status = 0;
	IwVerdict	verdict = IW_VERDICT_UNAVAILABLE;
	MemoryContext ctx;

	memcpy(&args, MyBgworkerEntry->bgw_extra, sizeof(args));
	init_worker(&args, "ironwod validate");
	ctx = AllocSetContextCreate(TopMemoryContext, "ironwod validate", ALLOCSET_DEFAULT_SIZES);
	MemoryContextSwitchTo(ctx);

	slot = &iw_shared->validations[args.validation_slot];
	LWLockAcquire(iw_shared->lock, LW_SHARED);
	if (slot->generation != args.validation_generation || slot->state != IW_VSLOT_PENDING)
	{
		LWLockRelease(iw_shared->lock);
		proc_exit(0);
	}
	sealed = (bytea *) palloc(VARHDRSZ + slot->sealed_len);
	SET_VARSIZE(sealed, VARHDRSZ + slot->sealed_len);
	memcpy(VARDATA(sealed), slot->sealed, slot->sealed_len);
	LWLockRelease(iw_shared->lock);

	/* no sealed key: ironwod.check_config() asks about the master key command */
	if (VARSIZE(sealed) == VARHDRSZ)
	{
		verdict = iw_check_master_keys(message, sizeof(message));
		publish_verdict(&args, verdict, 0, NULL, message);
		proc_exit(0);
	}
	iw_ratelimit_bind(&args.tenant_id, &args.gym_id);

	PG_TRY();
	{
		char	   *plaintext = open_api_key(sealed, &args.tenant_id, &args.gym_id);

		iw_fingerprint(plaintext, &args.tenant_id, &args.gym_id, fingerprint);
		start_http_with_key(plaintext);
		verdict = validate_key(&http_status, message, sizeof(message));
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(ctx);
		edata = CopyErrorData();
		FlushErrorState();
		AbortOutOfAnyTransaction();
		MemoryContextReset(secret_ctx);
		if (edata->sqlerrcode == ERRCODE_DATA_CORRUPTED ||
			edata->sqlerrcode == ERRCODE_INVALID_PARAMETER_VALUE)
			verdict = IW_VERDICT_UNOPENABLE;
		else
			verdict = IW_VERDICT_KEYSTORE;
		strlcpy(message, edata->message, sizeof(message));
	}
	PG_END_TRY();

	publish_verdict(&args, verdict, http_status, fingerprint, message);
	iw_http_end();
	proc_exit(0);
}
