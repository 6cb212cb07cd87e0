/*-------------------------------------------------------------------------
 *
 * ironwod.c
 *	  Module entry point: refuses to load unless preloaded, defines every
 *	  ironwod.* GUC, installs the shared memory and log hooks, and registers
 *	  the launcher background worker.  Also the readers of the scope GUCs
 *	  (ironwod.scope_tenant() and ironwod.scope_gym()), which every RLS
 *	  policy calls.
 *
 *-------------------------------------------------------------------------
 */
#include "ironwod.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/uuid.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

char	   *ironwod_database_name = NULL;
char	   *ironwod_worker_role = NULL;
int			ironwod_max_workers = 4;
int			ironwod_worker_idle_timeout_s = 5;
char	   *ironwod_base_url = NULL;
char	   *ironwod_master_key_command = NULL;
int			ironwod_master_key_command_timeout_ms = 10000;
int			ironwod_connect_timeout_ms = 5000;
int			ironwod_request_timeout_ms = 60000;
int			ironwod_low_speed_time_s = 30;
int			ironwod_max_response_bytes = 64 * 1024 * 1024;
int			ironwod_max_retries = 5;
double		ironwod_requests_per_second = 4.5;
int			ironwod_burst = 15;
double		ironwod_cluster_requests_per_second = 50.0;
bool		ironwod_allow_http = false;
int			ironwod_naptime_ms = 30000;
int			ironwod_validate_timeout_ms = 15000;
bool		ironwod_enabled = true;
int			ironwod_backfill_months = 24;
int			ironwod_run_retention_days = 30;
int			ironwod_lookback_days = 3;
int			ironwod_due_window_days = 60;
double		ironwod_reconcile_sanity_share = 0.5;
int			ironwod_breaker_threshold = 5;
int			ironwod_run_timeout_min = 360;
int			ironwod_watchdog_timeout_s = 900;
int			ironwod_max_record_bytes = 4 * 1024 * 1024;
int			ironwod_pages_per_commit = 64;
bool		ironwod_allow_plaintext_keys = false;

/*
 * Thresholds of the ironwod.alerts view.  Only SQL reads them, so they have
 * no C variables of their own to act on; they are user-settable so that a
 * monitoring session can tune what it is shown without touching the server.
 */
static double alert_error_rate = 0.05;
static int	alert_min_requests = 20;
static int	alert_backfill_stall_s = 3600;
static double alert_cancellation_factor = 2.0;
static double alert_attendance_factor = 0.5;
static int	alert_min_events = 5;

static char *ironwod_scope_tenant = NULL;
static char *ironwod_scope_gym = NULL;

/*
 * The scope GUCs' values as uuids, parsed once when each is set (the GUC's
 * "extra", installed by assign_scope_uuid); NULL when the value is empty or
 * is not one uuid_in reads.
 */
static pg_uuid_t *scope_tenant_uuid = NULL;
static pg_uuid_t *scope_gym_uuid = NULL;

PG_FUNCTION_INFO_V1(ironwod_scope_tenant_uuid);
PG_FUNCTION_INFO_V1(ironwod_scope_gym_uuid);

static inline int
hex_digit(char c)
{
	return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10;
}

/*
 * A uuid as uuid_in reads it (PostgreSQL 15's string_to_uuid: 32 hex digits,
 * optionally in braces, a hyphen allowed after any group of four), or false.
 */
static bool
parse_uuid(const char *src, pg_uuid_t *uuid)
{
	bool		braces = false;
	int			i;

	if (src[0] == '{')
	{
		src++;
		braces = true;
	}
	for (i = 0; i < UUID_LEN; i++)
	{
		if (!isxdigit((unsigned char) src[0]) || !isxdigit((unsigned char) src[1]))
			return false;
		uuid->data[i] = (unsigned char) (hex_digit(src[0]) << 4 | hex_digit(src[1]));
		src += 2;
		if (src[0] == '-' && (i % 2) == 1 && i < UUID_LEN - 1)
			src++;
	}
	if (braces)
	{
		if (*src != '}')
			return false;
		src++;
	}
	return *src == '\0';
}

/*
 * The scope GUCs must hold a uuid or nothing: RLS policies compare rows with
 * them, and a malformed value would otherwise surface as a cast error deep
 * inside a query.  A valid value is parsed here, once, into the setting's
 * extra: the policies read it for every row a scoped statement writes.
 */
static bool
check_scope_uuid(char **newval, void **extra, GucSource source)
{
	const char *s = *newval;
	int			i;
	int			digits = 0;
	pg_uuid_t	uuid;

	if (s == NULL || s[0] == '\0')
		return true;
	for (i = 0; s[i] != '\0'; i++)
	{
		if (isxdigit((unsigned char) s[i]))
			digits++;
		else if (s[i] != '-' && s[i] != '{' && s[i] != '}')
			break;
	}
	if (s[i] == '\0' && digits == 32)
	{
		/*
		 * A value with its digits in a shape uuid_in refuses ("{" without
		 * "}") is let through without an extra, as it always was: the scope
		 * readers raise uuid_in's error for it.
		 */
		if (parse_uuid(s, &uuid))
		{
			/* a GUC's extra is malloc'd (PostgreSQL 15's guc.c frees it) */
			*extra = malloc(sizeof(pg_uuid_t));
			if (*extra == NULL)
			{
				GUC_check_errcode(ERRCODE_OUT_OF_MEMORY);
				GUC_check_errmsg("out of memory");
				return false;
			}
			memcpy(*extra, &uuid, sizeof(pg_uuid_t));
		}
		return true;
	}
	GUC_check_errcode(ERRCODE_INVALID_TEXT_REPRESENTATION);
	GUC_check_errmsg("invalid ironwod scope value \"%s\"", s);
	GUC_check_errhint("Use ironwod_set_scope(tenant uuid, gym uuid).");
	return false;
}

/* The GUC machinery installs (and on rollback restores) a value and its extra together. */
static void
assign_scope_tenant(const char *newval, void *extra)
{
	scope_tenant_uuid = (pg_uuid_t *) extra;
}

static void
assign_scope_gym(const char *newval, void *extra)
{
	scope_gym_uuid = (pg_uuid_t *) extra;
}

/*
 * ironwod.scope_tenant() and ironwod.scope_gym(): the scope GUC as a uuid,
 * NULL when it is empty (no scope).  They were
 * NULLIF(current_setting(guc, true), '')::uuid, a GUC lookup and a uuid_in
 * (sixteen strtoul calls) per call, and every RLS policy's WITH CHECK calls
 * both for each row a statement writes: a fifth of a large backfill's class
 * sign-in insert.  Now each returns the value parsed when the GUC was set.
 */
static Datum
scope_value(const char *value, const pg_uuid_t *parsed, FunctionCallInfo fcinfo)
{
	pg_uuid_t  *result;

	if (value == NULL || value[0] == '\0')
		PG_RETURN_NULL();
	if (parsed == NULL)
		return DirectFunctionCall1(uuid_in, CStringGetDatum(value));
	result = (pg_uuid_t *) palloc(sizeof(pg_uuid_t));
	memcpy(result, parsed, sizeof(pg_uuid_t));
	PG_RETURN_UUID_P(result);
}

Datum
ironwod_scope_tenant_uuid(PG_FUNCTION_ARGS)
{
	return scope_value(ironwod_scope_tenant, scope_tenant_uuid, fcinfo);
}

Datum
ironwod_scope_gym_uuid(PG_FUNCTION_ARGS)
{
	return scope_value(ironwod_scope_gym, scope_gym_uuid, fcinfo);
}

static void
define_gucs(void)
{
	DefineCustomStringVariable("ironwod.database_name",
							   "Database the ironwod supervisor serves.",
							   "The extension can only be created in this database.",
							   &ironwod_database_name, "postgres",
							   PGC_POSTMASTER, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);
	DefineCustomStringVariable("ironwod.worker_role",
							   "Non-superuser role the run workers connect as.",
							   "Row-level security binds the workers like any other role.",
							   &ironwod_worker_role, "ironwod_worker",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.max_workers",
							"Maximum number of concurrent run workers.",
							"Each takes a max_worker_processes slot.",
							&ironwod_max_workers, 4, 1, IW_MAX_RUN_SLOTS,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.worker_idle_timeout",
							"How long a run worker that finished a run waits for the supervisor to hand it another.",
							"A worker serving several runs pays a new backend's cold caches once; 0 = exit after every run.",
							&ironwod_worker_idle_timeout_s, 5, 0, 3600,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomStringVariable("ironwod.base_url",
							   "Base URL of the Wodify API.",
							   "Only superusers can change it, so no SQL caller can pick a URL.",
							   &ironwod_base_url, "https://api.wodify.com/v1",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);
	DefineCustomStringVariable("ironwod.master_key_command",
							   "Command that prints the private master keys (\"key_id hex\" lines).",
							   "Run only by run workers, which alone can open sealed API keys.",
							   &ironwod_master_key_command, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.master_key_command_timeout_ms",
							"Time ironwod.master_key_command has to print the keys and exit.",
							"Past it the command's process group is killed and the run fails (key_command_timeout).",
							&ironwod_master_key_command_timeout_ms, 10000, 100, 3600000,
							PGC_SIGHUP, GUC_UNIT_MS | GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.connect_timeout_ms",
							"Timeout for establishing a connection to Wodify.",
							NULL, &ironwod_connect_timeout_ms, 5000, 100, 600000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.request_timeout_ms",
							"Total timeout of one HTTP request.",
							NULL, &ironwod_request_timeout_ms, 60000, 100, 3600000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.low_speed_time",
							"Abort a transfer slower than 1 byte/s for this many seconds.",
							NULL, &ironwod_low_speed_time_s, 30, 1, 3600,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.max_response_bytes",
							"Largest response body accepted.",
							NULL, &ironwod_max_response_bytes, 64 * 1024 * 1024,
							1024, 512 * 1024 * 1024,
							PGC_SIGHUP, GUC_UNIT_BYTE, NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.max_record_bytes",
							"Largest single record landed; a larger one is quarantined.",
							NULL, &ironwod_max_record_bytes, 4 * 1024 * 1024,
							1024, 64 * 1024 * 1024,
							PGC_SIGHUP, GUC_UNIT_BYTE, NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.pages_per_commit",
							"Pages a run worker lands in one transaction.",
							"The pages are fetched with no transaction open, then landed and committed together (at most 8 MB of responses); a crash refetches at most this many pages.  1 commits every page on its own.",
							&ironwod_pages_per_commit, 64, 1, 1000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.max_retries",
							"Retries of one request on 429, 5xx and transport errors.",
							NULL, &ironwod_max_retries, 5, 0, 100,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomRealVariable("ironwod.requests_per_second",
							 "Request rate of one connection (tenant, gym), shared by its workers.",
							 "Below Wodify's documented 5 requests per second; halved on every 429 and won back slowly.",
							 &ironwod_requests_per_second, 4.5, 0.01, 10000.0,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.burst",
							"Request burst of one connection (tenant, gym).",
							"Below Wodify's documented burst of 20.",
							&ironwod_burst, 15, 1, 10000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomRealVariable("ironwod.cluster_requests_per_second",
							 "Request rate of all ironwod workers of the cluster together.",
							 "Halved on every 429 (down to a tenth) and won back slowly.",
							 &ironwod_cluster_requests_per_second, 50.0, 0.1, 100000.0,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("ironwod.allow_http",
							 "Allow plain http:// base URLs (tests only).",
							 NULL, &ironwod_allow_http, false,
							 PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.naptime",
							"Fallback wake-up interval of the supervisor.",
							"The supervisor is also woken at commit by every call that queues work.",
							&ironwod_naptime_ms, 30000, 100, 3600000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.validate_timeout_ms",
							"How long ironwod_connect waits for the key's verdict.",
							NULL, &ironwod_validate_timeout_ms, 15000, 100, 600000,
							PGC_SUSET, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomBoolVariable("ironwod.allow_plaintext_keys",
							 "Accept API keys as text (ironwod_connect(tenant, gym, text), ironwod.seal_key).",
							 "Off: those calls are refused, because PostgreSQL keeps a key passed as text in pg_stat_activity and pg_stat_statements. Only a superuser can change it.",
							 &ironwod_allow_plaintext_keys, false,
							 PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("ironwod.enabled",
							 "Start queued runs; off pauses ironwod without stopping the server.",
							 NULL, &ironwod_enabled, true,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.backfill_months",
							"Months of financials and attendance a backfill pulls.",
							NULL, &ironwod_backfill_months, 24, 1, 240,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.run_retention_days",
							"Days finished runs are kept before the supervisor prunes them.",
							NULL, &ironwod_run_retention_days, 30, 1, 3650,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.lookback_days",
							"Days an incremental pull reaches back before its watermark.",
							"Catches vendor delays and late edits.",
							&ironwod_lookback_days, 3, 0, 365,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.due_window_days",
							"Days of invoice due dates every incremental run re-scans for status changes.",
							NULL, &ironwod_due_window_days, 60, 0, 730,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomRealVariable("ironwod.reconcile_sanity_share",
							 "Share of a window's previous records a reconciliation must see before it deletes any.",
							 "Below it, a pull is taken as incomplete and nothing is soft-deleted.",
							 &ironwod_reconcile_sanity_share, 0.5, 0.0, 1.0,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.breaker_threshold",
							"Consecutive failed runs that open a connection's circuit breaker.",
							NULL, &ironwod_breaker_threshold, 5, 1, 1000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.run_timeout",
							"Deadline of one run.",
							NULL, &ironwod_run_timeout_min, 360, 1, 10080,
							PGC_SIGHUP, GUC_UNIT_MIN, NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.watchdog_timeout",
							"A running run without progress for this long is stopped by the supervisor.",
							NULL, &ironwod_watchdog_timeout_s, 900, 10, 86400,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomRealVariable("ironwod.alert_error_rate",
							 "Share of failed HTTP attempts over 24 hours that raises the api_error_rate alert.",
							 NULL, &alert_error_rate, 0.05, 0.0, 1.0,
							 PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.alert_min_requests",
							"Fewest HTTP attempts in 24 hours for which api_error_rate is judged.",
							NULL, &alert_min_requests, 20, 1, 1000000,
							PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.alert_backfill_stall",
							"An unfinished backfill without progress for this long raises backfill_stalled.",
							NULL, &alert_backfill_stall_s, 3600, 60, 30 * 86400,
							PGC_USERSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomRealVariable("ironwod.alert_cancellation_factor",
							 "This month's cancellations above this multiple of the trailing three-month mean raise cancellation_spike.",
							 NULL, &alert_cancellation_factor, 2.0, 1.0, 100.0,
							 PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomRealVariable("ironwod.alert_attendance_factor",
							 "The last 7 days' visits below this share of the trailing four-week weekly mean raise attendance_drop.",
							 NULL, &alert_attendance_factor, 0.5, 0.0, 1.0,
							 PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("ironwod.alert_min_events",
							"Fewest events the product alerts judge: this month's cancellations, the baseline's weekly visits.",
							"Keeps small gyms from alerting on noise.",
							&alert_min_events, 5, 0, 1000000,
							PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("ironwod.tenant_id",
							   "Tenant of the current scope; set it with ironwod_set_scope().",
							   NULL, &ironwod_scope_tenant, "",
							   PGC_USERSET, 0, check_scope_uuid, assign_scope_tenant, NULL);
	DefineCustomStringVariable("ironwod.gym_id",
							   "Gym of the current scope; set it with ironwod_set_scope().",
							   NULL, &ironwod_scope_gym, "",
							   PGC_USERSET, 0, check_scope_uuid, assign_scope_gym, NULL);
	MarkGUCPrefixReserved("ironwod");
}

/*
 * Everything ironwod does depends on shared memory and the supervisor, which
 * exist only when the library is preloaded; a late load would half-work, so it
 * is refused outright (pg_cron and pg_net do the same).
 */
void
_PG_init(void)
{
	if (IsBinaryUpgrade)
		return;
	if (!process_shared_preload_libraries_in_progress)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("ironwod must be loaded via shared_preload_libraries"),
				 errhint("Add ironwod to shared_preload_libraries in postgresql.conf and restart the server.")));

	define_gucs();
	iw_shmem_init_hooks();
	iw_ratelimit_init_hooks();
	iw_install_log_hook();
	iw_register_launcher();
}
