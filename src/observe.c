/*-------------------------------------------------------------------------
 *
 * observe.c
 *	  What ironwod tells an operator from C: the HTTP attempts of a worker,
 *	  counted by outcome until they are written down (with the page that
 *	  landed, or when the entity, the validation or the run ends); the
 *	  request rate a connection can expect (for the ETA of a running run);
 *	  the structured LOG line of a finished run; and the run worker's peak
 *	  private memory while it fetches and lands a page, against the largest
 *	  page it landed (sync_runs.peak_memory_bytes, largest_page_bytes).  The
 *	  views built on them live in sql/modules/88_operations.sql.
 *
 *	  The counters are plain process-local numbers: http.c bumps them outside
 *	  curl's callbacks, land.c passes them to SQL in the transaction that
 *	  records the page (or the failure), and resets them once it committed.
 *
 *-------------------------------------------------------------------------
 */
#include "ironwod.h"

#include <fcntl.h>
#include <unistd.h>

#include "fmgr.h"
#include "miscadmin.h"
#include "catalog/pg_type.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "storage/fd.h"
#include "utils/guc.h"

PG_FUNCTION_INFO_V1(ironwod_connection_rate);
PG_FUNCTION_INFO_V1(ironwod_log_line);

/* Attempts not written down yet, and the entity (endpoint) they belong to. */
IwAttempts	iw_attempts;
static char attempts_entity[NAMEDATALEN] = "";
static IwAttemptOutcome last_outcome = IW_ATTEMPT_2XX;

/*
 * From now on the attempts are the given entity's.  The run worker fetches
 * one entity at a time and writes its attempts down before it moves on (with
 * every landed page, when the entity is not entitled, when the run fails), so
 * no attempt is ever filed under the wrong endpoint.
 */
void
iw_attempts_for(const char *entity)
{
	strlcpy(attempts_entity, entity ? entity : "", sizeof(attempts_entity));
}

/* The entity of the pending attempts, NULL when none was named. */
const char *
iw_attempts_entity(void)
{
	return attempts_entity[0] ? attempts_entity : NULL;
}

/* One attempt ended (http.c): how, with how many body bytes, after what wait. */
void
iw_attempt_counted(IwAttemptOutcome outcome, int64 bytes, int64 token_wait_us)
{
	iw_attempts.outcomes[outcome]++;
	iw_attempts.bytes += Max(bytes, 0);
	iw_attempts.token_wait_us += Max(token_wait_us, 0);
	last_outcome = outcome;
}

/*
 * The last attempt's answer turned out to be something else than its HTTP
 * status said: a 200 that carries a Wodify error envelope, or a body that
 * does not parse.  Only the worker that read the body can tell.
 */
void
iw_attempt_recount(IwAttemptOutcome outcome)
{
	if (iw_attempts.outcomes[last_outcome] > 0)
	{
		iw_attempts.outcomes[last_outcome]--;
		iw_attempts.outcomes[outcome]++;
		last_outcome = outcome;
	}
}

/*
 * libcurl sent the request again on a fresh connection because the reused one
 * died before it answered (http.c): the lost send was a network attempt, and
 * the send after it a retry.
 */
void
iw_attempt_resent(void)
{
	iw_attempts.outcomes[IW_ATTEMPT_NETWORK]++;
	iw_attempts.retries++;
}

/* A retry is about to be sent, after sleeping slept_us (http.c). */
void
iw_attempt_backed_off(int64 slept_us)
{
	iw_attempts.retries++;
	iw_attempts.backoff_us += Max(slept_us, 0);
}

bool
iw_attempts_pending(void)
{
	for (int i = 0; i < IW_ATTEMPT_OUTCOMES; i++)
		if (iw_attempts.outcomes[i] != 0)
			return true;
	return iw_attempts.retries != 0 || iw_attempts.backoff_us != 0 || iw_attempts.token_wait_us != 0;
}

/* Written down (and committed): start counting afresh. */
void
iw_attempts_reset(void)
{
	memset(&iw_attempts, 0, sizeof(iw_attempts));
}

/*
 * Between two runs of one worker (run.c): nothing counted or measured for
 * the last run is left for the next (the attempts, their entity, the last
 * outcome, the memory peaks).
 */
void
iw_observe_reset(void)
{
	iw_attempts_reset();
	attempts_entity[0] = '\0';
	last_outcome = IW_ATTEMPT_2XX;
	iw_memory_run_start();
}

/*
 * The counters as the int8[] SQL takes (ironwod.add_attempts): the outcomes
 * in IwAttemptOutcome order, then retries, bytes, token wait and backoff in
 * microseconds.
 */
Datum
iw_attempts_datum(const IwAttempts *a)
{
	Datum		d[IW_ATTEMPT_FIELDS];
	int			n = 0;

	for (int i = 0; i < IW_ATTEMPT_OUTCOMES; i++)
		d[n++] = Int64GetDatum(a->outcomes[i]);
	d[n++] = Int64GetDatum(a->retries);
	d[n++] = Int64GetDatum(a->bytes);
	d[n++] = Int64GetDatum(a->token_wait_us);
	d[n++] = Int64GetDatum(a->backoff_us);
	return PointerGetDatum(construct_array(d, n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
}

/*
 * Worker memory per page.  Linux keeps no peak of a process's private
 * (anonymous) memory, only of its whole resident set (VmHWM), which also
 * counts the file and shared pages it touched: shared buffers above all.  So
 * before each page's request the high-water mark is reset to the current
 * resident set (writing 5 to /proc/self/clear_refs), and the file and shared
 * pages resident then are noted.  Those only grow while the page is fetched
 * and landed, so after it, VmHWM less them bounds the private memory at the
 * peak from above: what the page cost, on top of what the worker already
 * held.  Where /proc cannot be read nothing is recorded.
 */
static int64 mem_shared_at_reset = -1;
static int64 mem_peak = 0;
static int64 mem_largest_page = 0;

/*
 * /proc/self/status and /proc/self/clear_refs, opened once per process and
 * read again from the start for every page: opening them and reading the
 * status through stdio and sscanf twice a page was 3 % of a backfill's
 * landing CPU (perf).  -1 until opened, -2 if they cannot be.
 */
static int	status_fd = -1;
static int	clear_refs_fd = -1;

static bool
open_memory_files(void)
{
	if (status_fd == -1)
	{
		ReserveExternalFD();
		ReserveExternalFD();
		status_fd = BasicOpenFile("/proc/self/status", O_RDONLY);
		clear_refs_fd = status_fd < 0 ? -1 : BasicOpenFile("/proc/self/clear_refs", O_WRONLY);
		if (status_fd < 0 || clear_refs_fd < 0)
		{
			if (status_fd >= 0)
				close(status_fd);
			if (clear_refs_fd >= 0)
				close(clear_refs_fd);
			ReleaseExternalFD();
			ReleaseExternalFD();
			status_fd = clear_refs_fd = -2;
		}
	}
	return status_fd >= 0;
}

/* The kB figure after "name" in the status text, or -1. */
static int64
status_kb(const char *text, const char *name)
{
	const char *p = strstr(text, name);
	char	   *end;
	long long	kb;

	if (p == NULL)
		return -1;
	kb = strtoll(p + strlen(name), &end, 10);
	return end == p + strlen(name) ? -1 : (int64) kb;
}

/* VmHWM and RssFile + RssShmem of this process, in bytes; false if unknown. */
static bool
read_memory_status(int64 *hwm, int64 *shared)
{
	char		text[8192];
	size_t		len = 0;
	ssize_t		n;
	int64		vm_hwm,
				rss_file,
				rss_shmem;

	*hwm = 0;
	*shared = 0;
	if (!open_memory_files())
		return false;
	while (len < sizeof(text) - 1 &&
		   (n = pread(status_fd, text + len, sizeof(text) - 1 - len, len)) > 0)
		len += n;
	text[len] = '\0';
	vm_hwm = status_kb(text, "\nVmHWM:");
	rss_file = status_kb(text, "\nRssFile:");
	rss_shmem = status_kb(text, "\nRssShmem:");
	if (vm_hwm < 0 || rss_file < 0 || rss_shmem < 0)
		return false;
	*hwm = vm_hwm * 1024;
	*shared = (rss_file + rss_shmem) * 1024;
	return true;
}

/* A run starts: nothing measured yet. */
void
iw_memory_run_start(void)
{
	mem_peak = 0;
	mem_largest_page = 0;
	mem_shared_at_reset = -1;
}

/* A page's request is about to be sent. */
void
iw_memory_page_start(void)
{
	int64		hwm;
	int64		shared;

	mem_shared_at_reset = -1;
	if (!open_memory_files())
		return;
	if (write(clear_refs_fd, "5", 1) == 1 && read_memory_status(&hwm, &shared))
		mem_shared_at_reset = shared;
}

/* A page of body_len bytes was fetched and landed (or refused). */
void
iw_memory_page_end(int64 body_len)
{
	int64		hwm;
	int64		shared;

	if (mem_shared_at_reset < 0 || !read_memory_status(&hwm, &shared))
		return;
	mem_peak = Max(mem_peak, hwm - mem_shared_at_reset);
	mem_largest_page = Max(mem_largest_page, body_len);
	mem_shared_at_reset = -1;
}

/* The run's figures so far: 0 when nothing was measured. */
int64
iw_memory_peak(void)
{
	return mem_peak;
}

int64
iw_memory_largest_page(void)
{
	return mem_largest_page;
}

/* Is (tenant, gym) the scope of this transaction? */
static bool
in_scope(const pg_uuid_t *tenant, const pg_uuid_t *gym)
{
	const char *t = GetConfigOption("ironwod.tenant_id", true, false);
	const char *g = GetConfigOption("ironwod.gym_id", true, false);

	if (t == NULL || g == NULL || t[0] == '\0' || g[0] == '\0')
		return false;
	return DatumGetBool(DirectFunctionCall2(uuid_eq, UUIDPGetDatum((pg_uuid_t *) tenant),
											DirectFunctionCall1(uuid_in, CStringGetDatum(t)))) &&
		DatumGetBool(DirectFunctionCall2(uuid_eq, UUIDPGetDatum((pg_uuid_t *) gym),
										 DirectFunctionCall1(uuid_in, CStringGetDatum(g))));
}

/*
 * Requests per second the connection (tenant, gym) can send now: its
 * bucket's rate after 429 adaptation, or the configured rate when no worker
 * has bound a bucket for it yet, and never more than its share of the
 * cluster-wide bucket among the connections sending now.  NULL unless the
 * connection is the caller's scope or the caller is an ironwod_admin: other
 * tenants' buckets are nobody else's business.
 */
Datum
ironwod_connection_rate(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *tenant = PG_GETARG_UUID_P(0);
	pg_uuid_t  *gym = PG_GETARG_UUID_P(1);
	Oid			admin = get_role_oid("ironwod_admin", true);
	int			max = iw_ratelimit_max_rows();
	IwRateLimitInfo *rows;
	double		rate = ironwod_requests_per_second;
	double		cluster = ironwod_cluster_requests_per_second;
	int			senders = 0;
	bool		mine = false;
	int			n;
	int			i;

	if (!in_scope(tenant, gym) &&
		!(OidIsValid(admin) && has_privs_of_role(GetUserId(), admin)))
		PG_RETURN_NULL();

	rows = palloc(sizeof(IwRateLimitInfo) * max);
	n = iw_ratelimit_snapshot(rows, max);
	for (i = 0; i < n; i++)
	{
		if (rows[i].is_cluster)
		{
			cluster = rows[i].rate;
			continue;
		}
		if (rows[i].refcount > 0)
			senders++;
		if (memcmp(&rows[i].tenant_id, tenant, sizeof(pg_uuid_t)) == 0 &&
			memcmp(&rows[i].gym_id, gym, sizeof(pg_uuid_t)) == 0)
		{
			rate = rows[i].rate;
			mine = rows[i].refcount > 0;
		}
	}
	pfree(rows);
	/* this connection shares the cluster with the others sending now */
	if (!mine)
		senders++;
	PG_RETURN_FLOAT8(Min(rate, cluster / senders));
}

/*
 * One LOG line holding exactly the given text, without the CONTEXT and
 * STATEMENT lines a RAISE from PL/pgSQL would add, so a log shipper can
 * parse it as one JSON document.  The caller (ironwod.log_run) builds the
 * text from run counters only; nothing secret is ever passed here.
 */
Datum
ironwod_log_line(PG_FUNCTION_ARGS)
{
	char	   *line = text_to_cstring(PG_GETARG_TEXT_PP(0));

	ereport(LOG,
			(errmsg_internal("%s", line),
			 errhidestmt(true),
			 errhidecontext(true)));
	PG_RETURN_VOID();
}
