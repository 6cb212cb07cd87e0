/*-------------------------------------------------------------------------
 *
 * http.c
 *	  libcurl wrapper used by the ironwod run and validate workers.
 *
 * This file owns:
 *	  - process-wide libcurl initialisation (once per worker, after the fork,
 *		never in _PG_init) and its cleanup in a before_shmem_exit callback
 *		that frees only what this process created;
 *	  - the one easy handle of a run, reused for every page so that the
 *		connection and the TLS session are kept alive, and its header list,
 *		which carries the API key and is wiped before it is freed;
 *	  - the transfer loop (a multi handle polled in short waits that also
 *		watch the postmaster: a worker whose postmaster died stops within a
 *		fraction of a second instead of finishing, and landing, the page);
 *	  - the curl callbacks (body, Retry-After, interrupt polling);
 *	  - the classification of every outcome into an IwHttpClass;
 *	  - retry backoff, an interruptible WaitLatch sleep.
 *
 * Pacing is not done here: every request first takes a token from
 * ratelimit.c (iw_ratelimit_acquire) and reports its status back
 * (iw_ratelimit_feedback), so all workers of a connection, and all
 * connections of the cluster, share their limits through shared memory.
 * Nor is bookkeeping: every attempt, its wait for a token and every backoff
 * are handed to observe.c's counters, which the caller writes down.
 *
 * Only workers call into this file; backends and the postmaster never do
 * HTTP (design.md section 2).
 *
 * The rule that shapes the callbacks: they run inside curl_easy_perform, so
 * they must never ereport, never palloc in a way that can throw, and never
 * CHECK_FOR_INTERRUPTS.  A longjmp through libcurl leaves the handle (and
 * its connection cache) in an undefined state.  Callbacks only record facts
 * in iw_xfer and abort through their return codes; everything that may
 * throw happens after curl_easy_perform has returned.
 *
 * Nothing here ever logs request headers, and CURLOPT_VERBOSE is never set:
 * the x-api-key header holds the plaintext API key.
 *
 * IDENTIFICATION
 *	  src/http.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>
#include <string.h>
#include <time.h>

#include <curl/curl.h>

#include "common/pg_prng.h"
#include "miscadmin.h"
#include "portability/instr_time.h"
#include "postmaster/postmaster.h"
#include "storage/pmsignal.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"		/* ironwod.h uses LWLock, atomics */
#include "utils/memutils.h"
#include "utils/wait_event.h"

#include "ironwod.h"

/*
 * Longest wait of the transfer loop between two looks at cancel, SIGTERM and
 * the postmaster.  The postmaster's death also wakes the wait at once (its
 * pipe is one of the descriptors waited on); the bound covers signals, which
 * libcurl's poll may sleep through.
 */
#define IW_HTTP_POLL_MS			100

/* Backoff bounds, in seconds (design.md section 5). */
#define IW_BACKOFF_BASE_S		0.5
#define IW_BACKOFF_MAX_S		30.0
#define IW_RETRY_AFTER_MAX_S	300.0

/* First allocation for a response body; grows by doubling. */
#define IW_BODY_INITIAL_SIZE	8192

/* Longest Retry-After value we look at (an HTTP-date is 29 characters). */
#define IW_RETRY_AFTER_BUFLEN	64

/*
 * State of the transfer in progress, written by the curl callbacks and read
 * by iw_http_get once curl_easy_perform has returned.  It is static because
 * there is at most one transfer per process at a time; the callbacks get a
 * pointer to it through CURLOPT_*DATA.
 */
typedef struct IwTransfer
{
	MemoryContext cxt;			/* caller's context: body is allocated here */
	char	   *data;			/* body so far, always NUL-terminated */
	size_t		len;			/* bytes in data, excluding the NUL */
	size_t		cap;			/* allocated size of data */
	size_t		limit;			/* largest body we accept, in bytes */
	bool		too_large;		/* write callback refused: over limit */
	bool		oom;			/* write callback refused: no memory */
	bool		interrupted;	/* xferinfo callback saw cancel/die */
	bool		orphaned;		/* the postmaster died during the transfer */
	int			sends;			/* requests sent: libcurl sends again, on a
								 * fresh connection, when a reused one died
								 * before it answered */
	double		retry_after_s;	/* parsed Retry-After, -1 when absent */
} IwTransfer;

static IwTransfer iw_xfer;

/*
 * Objects created by this process, released by iw_http_end.  The easy handle
 * is driven through a multi handle, which also keeps the connection cache, so
 * keep-alive works across the pages of a run as with curl_easy_perform.
 */
static CURLM *iw_multi = NULL;
static CURL *iw_curl = NULL;
static struct curl_slist *iw_headers = NULL;
static char iw_errbuf[CURL_ERROR_SIZE];

/* Process-wide state. */
static bool iw_curl_global_done = false;
static bool iw_exit_callback_registered = false;

static void iw_http_exit_callback(int code, Datum arg);
static struct curl_slist *iw_build_headers(const char *api_key);
static void iw_free_headers(struct curl_slist *list);
static void iw_setopt_failed(const char *option, CURLcode rc);
static size_t iw_write_callback(char *ptr, size_t size, size_t nmemb,
								void *userdata);
static size_t iw_header_callback(char *buffer, size_t size, size_t nitems,
								 void *userdata);
static int	iw_xferinfo_callback(void *clientp, curl_off_t dltotal,
								 curl_off_t dlnow, curl_off_t ultotal,
								 curl_off_t ulnow);
#if LIBCURL_VERSION_NUM >= 0x075000
static int	iw_prereq_callback(void *clientp, char *conn_primary_ip, char *conn_local_ip,
							   int conn_primary_port, int conn_local_port);
#endif
static double iw_parse_retry_after(const char *value);
static IwHttpClass iw_classify_status(long status, const char *body);
static IwHttpClass iw_classify_curl_error(CURLcode rc);
static void iw_sleep_ms(long ms);
static CURLcode iw_perform(void);

/*
 * Set one option on iw_curl; a failure tears the handle down and ERRORs, so
 * a half-configured handle (say, one without the protocol restriction) can
 * never be used.
 */
#define IW_SETOPT(option, value) \
	do { \
		CURLcode	iw_rc_ = curl_easy_setopt(iw_curl, option, value); \
		if (iw_rc_ != CURLE_OK) \
			iw_setopt_failed(#option, iw_rc_); \
	} while (0)


/*
 * iw_http_begin
 *		Prepare this process for the HTTP requests of one run.
 *
 * Why: a run fetches many pages from one host, so one easy handle is reused
 * for all of them (keep-alive, TLS session reuse), and the header list with
 * the API key is built once and kept only as long as the run needs it.
 * libcurl is initialised here, lazily, because this runs after the fork in
 * the worker; doing it in _PG_init would run it in the postmaster and in
 * every backend that loads the library.
 */
void
iw_http_begin(const char *api_key)
{
	curl_off_t	max_body;

	if (api_key == NULL || api_key[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("ironwod API key is empty")));
	/* A line break would let the key inject headers; never echo the key. */
	if (strpbrk(api_key, "\r\n") != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("ironwod API key contains a line break")));

	/* A new run starts from a clean handle and a fresh header list. */
	if (iw_curl != NULL || iw_headers != NULL)
		iw_http_end();

	/* Register cleanup before creating anything it has to clean up. */
	if (!iw_exit_callback_registered)
	{
		before_shmem_exit(iw_http_exit_callback, (Datum) 0);
		iw_exit_callback_registered = true;
	}

	if (!iw_curl_global_done)
	{
		CURLcode	rc = curl_global_init(CURL_GLOBAL_DEFAULT);

		if (rc != CURLE_OK)
			ereport(ERROR,
					(errcode(ERRCODE_SYSTEM_ERROR),
					 errmsg("could not initialize libcurl: %s",
							curl_easy_strerror(rc))));
		iw_curl_global_done = true;
	}

	iw_headers = iw_build_headers(api_key);

	iw_multi = curl_multi_init();
	iw_curl = curl_easy_init();
	if (iw_multi == NULL || iw_curl == NULL)
	{
		iw_http_end();
		ereport(ERROR,
				(errcode(ERRCODE_SYSTEM_ERROR),
				 errmsg("could not create a libcurl handle")));
	}

	/*
	 * The body cap also bounds allocations: the write callback must never
	 * ask palloc for more than MaxAllocSize (that would elog), so clamp.
	 */
	if (ironwod_max_response_bytes <= 0)
		iw_xfer.limit = 0;
	else
		iw_xfer.limit = Min((size_t) ironwod_max_response_bytes,
							(size_t) (MaxAllocSize - 1));
	max_body = (curl_off_t) iw_xfer.limit;

	iw_errbuf[0] = '\0';

	/* PostgreSQL owns SIGALRM; the threaded resolver needs no signals. */
	IW_SETOPT(CURLOPT_NOSIGNAL, 1L);
	IW_SETOPT(CURLOPT_ERRORBUFFER, iw_errbuf);
	IW_SETOPT(CURLOPT_HTTPGET, 1L);
	IW_SETOPT(CURLOPT_HTTPHEADER, iw_headers);

	IW_SETOPT(CURLOPT_CONNECTTIMEOUT_MS, (long) ironwod_connect_timeout_ms);
	IW_SETOPT(CURLOPT_TIMEOUT_MS, (long) ironwod_request_timeout_ms);
	IW_SETOPT(CURLOPT_LOW_SPEED_LIMIT, 1L);
	IW_SETOPT(CURLOPT_LOW_SPEED_TIME, (long) ironwod_low_speed_time_s);

#if LIBCURL_VERSION_NUM < 0x075500
	{
		long		protocols = CURLPROTO_HTTPS;

		if (ironwod_allow_http)
			protocols |= CURLPROTO_HTTP;
		IW_SETOPT(CURLOPT_PROTOCOLS, protocols);
		IW_SETOPT(CURLOPT_REDIR_PROTOCOLS, protocols);
	}
#else
	IW_SETOPT(CURLOPT_PROTOCOLS_STR,
			  ironwod_allow_http ? "http,https" : "https");
	IW_SETOPT(CURLOPT_REDIR_PROTOCOLS_STR,
			  ironwod_allow_http ? "http,https" : "https");
#endif
	IW_SETOPT(CURLOPT_FOLLOWLOCATION, 0L);
	IW_SETOPT(CURLOPT_SSL_VERIFYPEER, 1L);
	IW_SETOPT(CURLOPT_SSL_VERIFYHOST, 2L);
	/* "" = every encoding this libcurl can decode. */
	IW_SETOPT(CURLOPT_ACCEPT_ENCODING, "");

	/* Refuse early when Content-Length already says the body is too big. */
	if (max_body > 0)
		IW_SETOPT(CURLOPT_MAXFILESIZE_LARGE, max_body);

	IW_SETOPT(CURLOPT_WRITEFUNCTION, iw_write_callback);
	IW_SETOPT(CURLOPT_WRITEDATA, &iw_xfer);
	IW_SETOPT(CURLOPT_HEADERFUNCTION, iw_header_callback);
	IW_SETOPT(CURLOPT_HEADERDATA, &iw_xfer);
	IW_SETOPT(CURLOPT_XFERINFOFUNCTION, iw_xferinfo_callback);
	IW_SETOPT(CURLOPT_XFERINFODATA, &iw_xfer);
	IW_SETOPT(CURLOPT_NOPROGRESS, 0L);
#if LIBCURL_VERSION_NUM >= 0x075000
	IW_SETOPT(CURLOPT_PREREQFUNCTION, iw_prereq_callback);
	IW_SETOPT(CURLOPT_PREREQDATA, &iw_xfer);
#endif
}

/*
 * iw_http_get
 *		Perform one rate-limited GET of url and describe the outcome in *resp.
 *
 * Why: the run loop needs one call that turns every HTTP and transport
 * outcome into a class it can act on (land, retry, stop, skip), without
 * throwing for any of them: retries and circuit breaking are the caller's
 * policy.  The only ERRORs are a programming error (no handle) and the
 * CHECK_FOR_INTERRUPTS after a transfer that cancel or SIGTERM cut short.
 */
void
iw_http_get(const char *url, IwHttpResponse *resp)
{
	CURLcode	rc;
	long		status = 0;
	double		total_s = 0;
	curl_off_t	received = 0;
	instr_time	waited;
	instr_time	granted;
	IwAttemptOutcome outcome;

	if (iw_curl == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("iw_http_get called without iw_http_begin")));
	Assert(url != NULL && resp != NULL);

	/* No request is sent without a token (ratelimit.c). */
	INSTR_TIME_SET_CURRENT(waited);
	iw_ratelimit_acquire();
	INSTR_TIME_SET_CURRENT(granted);
	INSTR_TIME_SUBTRACT(granted, waited);

	memset(resp, 0, sizeof(*resp));
	resp->body = NULL;
	resp->retry_after_s = -1;

	/* Fresh per-transfer state; the body goes to the caller's context. */
	iw_xfer.cxt = CurrentMemoryContext;
	iw_xfer.data = NULL;
	iw_xfer.len = 0;
	iw_xfer.cap = 0;
	iw_xfer.too_large = false;
	iw_xfer.oom = false;
	iw_xfer.interrupted = false;
	iw_xfer.orphaned = false;
	iw_xfer.sends = 0;
	iw_xfer.retry_after_s = -1;
	iw_errbuf[0] = '\0';

	rc = curl_easy_setopt(iw_curl, CURLOPT_URL, url);
	if (rc == CURLE_OK)
		rc = iw_perform();

	/*
	 * An orphan must not land what it received, nor count it: leave now,
	 * outside libcurl, so the exit callback may tear the handles down.
	 */
	if (iw_xfer.orphaned)
		iw_exit_if_postmaster_dead();

	if (curl_easy_getinfo(iw_curl, CURLINFO_RESPONSE_CODE, &status) != CURLE_OK)
		status = 0;
	if (curl_easy_getinfo(iw_curl, CURLINFO_TOTAL_TIME, &total_s) != CURLE_OK)
		total_s = 0;

	resp->status = status;
	resp->elapsed_ms = total_s * 1000.0;
	resp->retry_after_s = iw_xfer.retry_after_s;

	if (rc == CURLE_OK)
	{
		/* Hand the buffer over; it already lives in the caller's context. */
		resp->body = iw_xfer.data;
		resp->body_len = iw_xfer.len;
		resp->klass = iw_classify_status(status, resp->body);
	}
	else
	{
		/* A partial body is of no use to anybody. */
		if (iw_xfer.data != NULL)
			pfree(iw_xfer.data);

		if (rc == CURLE_ABORTED_BY_CALLBACK && iw_xfer.interrupted)
		{
			resp->klass = IW_HTTP_INTERRUPTED;
			strlcpy(resp->error, "transfer interrupted by cancel or shutdown",
					sizeof(resp->error));
		}
		else if ((rc == CURLE_WRITE_ERROR && iw_xfer.too_large) ||
				 rc == CURLE_FILESIZE_EXCEEDED)
		{
			resp->klass = IW_HTTP_TOO_LARGE;
			snprintf(resp->error, sizeof(resp->error),
					 "response body exceeds ironwod.max_response_bytes (%zu bytes)",
					 iw_xfer.limit);
		}
		else if (rc == CURLE_WRITE_ERROR && iw_xfer.oom)
		{
			resp->klass = IW_HTTP_RETRYABLE;
			strlcpy(resp->error, "out of memory while receiving the response",
					sizeof(resp->error));
		}
		else
		{
			size_t		n;

			resp->klass = iw_classify_curl_error(rc);
			/* curl's own text: never contains request or response headers */
			snprintf(resp->error, sizeof(resp->error), "%s%s%s",
					 curl_easy_strerror(rc),
					 iw_errbuf[0] != '\0' ? ": " : "",
					 iw_errbuf);
			n = strlen(resp->error);
			while (n > 0 && (resp->error[n - 1] == '\n' ||
							 resp->error[n - 1] == '\r'))
				resp->error[--n] = '\0';
		}
	}

	/* The callbacks must not see this buffer again. */
	iw_xfer.data = NULL;
	iw_xfer.len = 0;
	iw_xfer.cap = 0;
	iw_xfer.cxt = NULL;

	/* Outside libcurl again: a 429 slows the buckets, a 2xx wins rate back. */
	if (rc == CURLE_OK)
		iw_ratelimit_feedback(status, resp->retry_after_s);

	/*
	 * Every attempt is counted (observe.c), by its HTTP status when the
	 * transfer completed; a transfer that did not (reset, timeout, truncated
	 * or refused body, interrupted) is a network attempt whatever status
	 * line came first.
	 */
	if (curl_easy_getinfo(iw_curl, CURLINFO_SIZE_DOWNLOAD_T, &received) != CURLE_OK)
		received = 0;
	for (int i = 1; i < iw_xfer.sends; i++)
		iw_attempt_resent();
	if (rc != CURLE_OK)
		outcome = IW_ATTEMPT_NETWORK;
	else if (status >= 200 && status <= 299)
		outcome = IW_ATTEMPT_2XX;
	else if (status == 429)
		outcome = IW_ATTEMPT_429;
	else if (status >= 500 && status <= 599)
		outcome = IW_ATTEMPT_5XX;
	else
		outcome = IW_ATTEMPT_4XX;
	iw_attempt_counted(outcome, (int64) received, INSTR_TIME_GET_MICROSEC(granted));

	/* Now that we are outside libcurl, let cancel/die take effect. */
	if (resp->klass == IW_HTTP_INTERRUPTED)
		CHECK_FOR_INTERRUPTS();
}

/*
 * iw_perform
 *		Run the transfer set up on iw_curl to its end; the curl_easy_perform
 *		of a worker that must notice its postmaster dying.
 *
 * Why: curl_easy_perform returns only when the transfer ends, and its
 * progress callback may be called as rarely as once a second; a worker
 * whose postmaster was killed would go on receiving, and then landing, a
 * page nobody will ever read (and a slow server can hold it for minutes).
 * Here the transfer is driven step by step and every wait is bounded by
 * IW_HTTP_POLL_MS and woken by the postmaster's death pipe; between steps,
 * outside libcurl's frames, cancel, SIGTERM and the postmaster are checked.
 * Nothing here throws: an orphaned or interrupted transfer is reported
 * through iw_xfer and CURLE_ABORTED_BY_CALLBACK, and the caller acts on it
 * once the easy handle is out of the multi handle again.
 */
static CURLcode
iw_perform(void)
{
	CURLcode	result = CURLE_OK;
	CURLMcode	mc;
	int			running = 1;

	mc = curl_multi_add_handle(iw_multi, iw_curl);
	if (mc != CURLM_OK)
	{
		strlcpy(iw_errbuf, curl_multi_strerror(mc), sizeof(iw_errbuf));
		return CURLE_FAILED_INIT;
	}

	for (;;)
	{
		struct curl_waitfd pm;
		CURLMsg    *msg;
		int			left;

		mc = curl_multi_perform(iw_multi, &running);
		if (mc != CURLM_OK)
		{
			strlcpy(iw_errbuf, curl_multi_strerror(mc), sizeof(iw_errbuf));
			result = CURLE_FAILED_INIT;
			break;
		}
		if (running == 0)
		{
			result = CURLE_GOT_NOTHING;
			while ((msg = curl_multi_info_read(iw_multi, &left)) != NULL)
			{
				if (msg->msg == CURLMSG_DONE && msg->easy_handle == iw_curl)
					result = msg->data.result;
			}
			break;
		}
		if (!PostmasterIsAlive())
		{
			iw_xfer.orphaned = true;
			result = CURLE_ABORTED_BY_CALLBACK;
			break;
		}
		if (iw_xfer.interrupted || ProcDiePending || QueryCancelPending)
		{
			iw_xfer.interrupted = true;
			result = CURLE_ABORTED_BY_CALLBACK;
			break;
		}

		pm.fd = postmaster_alive_fds[POSTMASTER_FD_WATCH];
		pm.events = CURL_WAIT_POLLIN;
		pm.revents = 0;
		mc = curl_multi_wait(iw_multi, &pm, 1, IW_HTTP_POLL_MS, NULL);
		if (mc != CURLM_OK)
		{
			strlcpy(iw_errbuf, curl_multi_strerror(mc), sizeof(iw_errbuf));
			result = CURLE_FAILED_INIT;
			break;
		}
	}

	(void) curl_multi_remove_handle(iw_multi, iw_curl);
	return result;
}

/*
 * iw_http_end
 *		Release the handle and wipe and free the header list.
 *
 * Why: the header list holds the plaintext API key; it must not outlive the
 * run, and its memory is zeroed before libcurl's free() so the key does not
 * linger in freed heap.  Safe to call twice, and when nothing was created.
 */
void
iw_http_end(void)
{
	/* The handle points at the header list, so release it first. */
	if (iw_curl != NULL)
	{
		if (iw_multi != NULL)
			(void) curl_multi_remove_handle(iw_multi, iw_curl);
		curl_easy_cleanup(iw_curl);
		iw_curl = NULL;
	}
	if (iw_multi != NULL)
	{
		curl_multi_cleanup(iw_multi);
		iw_multi = NULL;
	}
	if (iw_headers != NULL)
	{
		iw_free_headers(iw_headers);
		iw_headers = NULL;
	}
	iw_errbuf[0] = '\0';
}

/*
 * iw_http_backoff
 *		Sleep before retry number "attempt" (0 for the first retry).
 *
 * Why: full-jitter exponential backoff (uniform in [0, min(30 s,
 * 0.5 s * 2^attempt)]) spreads the retries of many workers instead of
 * synchronising them, and a server's Retry-After (capped at 300 s) is a
 * floor we respect so as not to be throttled harder.  The sleep is
 * interruptible like every other wait in the workers.
 */
void
iw_http_backoff(int attempt, double retry_after_s)
{
	double		cap_s;
	double		delay_s;
	instr_time	start;
	instr_time	elapsed_total;

	if (attempt < 0)
		attempt = 0;
	/* 0.5 * 2^6 already exceeds the 30 s cap; avoid huge exponents */
	if (attempt > 16)
		attempt = 16;

	cap_s = Min(IW_BACKOFF_MAX_S, IW_BACKOFF_BASE_S * ldexp(1.0, attempt));
	delay_s = pg_prng_double(&pg_global_prng_state) * cap_s;

	if (retry_after_s >= 0)		/* false for NaN too */
		delay_s = Max(delay_s, Min(retry_after_s, IW_RETRY_AFTER_MAX_S));

	INSTR_TIME_SET_CURRENT(start);
	for (;;)
	{
		instr_time	elapsed;
		double		remaining_s;

		INSTR_TIME_SET_CURRENT(elapsed);
		INSTR_TIME_SUBTRACT(elapsed, start);
		remaining_s = delay_s - INSTR_TIME_GET_DOUBLE(elapsed);
		if (remaining_s <= 0)
			break;
		iw_sleep_ms(Max((long) ceil(remaining_s * 1000.0), 1));
	}
	INSTR_TIME_SET_CURRENT(elapsed_total);
	INSTR_TIME_SUBTRACT(elapsed_total, start);
	iw_attempt_backed_off(INSTR_TIME_GET_MICROSEC(elapsed_total));
}

/*
 * iw_sleep_ms
 *		One interruptible wait of at most ms milliseconds.
 *
 * Why: pg_usleep ignores latches, so SIGTERM, cancel and a dead postmaster
 * would go unnoticed for the whole sleep (and a sleeping worker can block
 * DROP DATABASE).  Callers loop until their own deadline, because a latch
 * set for another reason ends the wait early.
 */
static void
iw_sleep_ms(long ms)
{
	(void) WaitLatch(MyLatch,
					 WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					 ms, PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
	CHECK_FOR_INTERRUPTS();
}

/*
 * iw_http_exit_callback
 *		before_shmem_exit callback: release this process's libcurl objects.
 *
 * Why: a worker can exit through FATAL or proc_exit at any point of a run;
 * this makes sure the key is wiped and libcurl is shut down even then.  It
 * only touches objects this process created (pg_net #276).
 */
static void
iw_http_exit_callback(int code, Datum arg)
{
	iw_http_end();
	if (iw_curl_global_done)
	{
		curl_global_cleanup();
		iw_curl_global_done = false;
	}
}

/*
 * iw_build_headers
 *		Build the request header list: API key, Accept, User-Agent.
 *
 * Why: built once per run and shared by every page.  The key is copied
 * into a buffer of exactly the right size (psprintf could leave a partial
 * copy in a buffer it frees while growing), handed to libcurl, which keeps
 * its own copy, and our buffer is wiped at once.
 */
static struct curl_slist *
iw_build_headers(const char *api_key)
{
	static const char prefix[] = "x-api-key: ";
	size_t		keylen = strlen(api_key);
	size_t		linelen = sizeof(prefix) + keylen;	/* includes the NUL */
	char	   *line;
	struct curl_slist *list;
	struct curl_slist *tmp;

	line = palloc(linelen);
	memcpy(line, prefix, sizeof(prefix) - 1);
	memcpy(line + sizeof(prefix) - 1, api_key, keylen + 1);
	list = curl_slist_append(NULL, line);
	explicit_bzero(line, linelen);
	pfree(line);
	if (list == NULL)
		goto oom;

	tmp = curl_slist_append(list, "Accept: application/json");
	if (tmp == NULL)
		goto oom;
	list = tmp;

	tmp = curl_slist_append(list, "User-Agent: ironwod/" IRONWOD_VERSION);
	if (tmp == NULL)
		goto oom;
	list = tmp;

	return list;

oom:
	iw_free_headers(list);
	ereport(ERROR,
			(errcode(ERRCODE_OUT_OF_MEMORY),
			 errmsg("out of memory"),
			 errdetail("Could not build the HTTP request headers.")));
	return NULL;				/* keep compiler quiet */
}

/*
 * iw_free_headers
 *		Zero every header string, then free the list.
 *
 * Why: curl_slist_free_all just calls free(), which would leave the API key
 * readable in freed heap (and in a core dump).
 */
static void
iw_free_headers(struct curl_slist *list)
{
	struct curl_slist *node;

	for (node = list; node != NULL; node = node->next)
	{
		if (node->data != NULL)
			explicit_bzero(node->data, strlen(node->data));
	}
	curl_slist_free_all(list);
}

/*
 * iw_setopt_failed
 *		Report a failed curl_easy_setopt after discarding the handle.
 *
 * Why: every option we set is either a safety property (timeouts,
 * protocols, TLS verification) or needed for correctness; a handle missing
 * one of them must not be used for a request.
 */
static void
iw_setopt_failed(const char *option, CURLcode rc)
{
	iw_http_end();
	ereport(ERROR,
			(errcode(ERRCODE_SYSTEM_ERROR),
			 errmsg("could not set libcurl option %s: %s",
					option, curl_easy_strerror(rc))));
}

/*
 * iw_write_callback
 *		CURLOPT_WRITEFUNCTION: append received body bytes to iw_xfer.
 *
 * Why: a StringInfo would ERROR (longjmp through libcurl) on a huge body or
 * out of memory.  Instead the buffer is grown with MCXT_ALLOC_NO_OOM in the
 * caller's context (PG15 has no repalloc_extended, hence allocate + copy +
 * pfree), and any refusal -- over ironwod.max_response_bytes, or no memory
 * -- is a flag plus a short return count, which libcurl turns into
 * CURLE_WRITE_ERROR for iw_http_get to classify.
 */
static size_t
iw_write_callback(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	IwTransfer *x = (IwTransfer *) userdata;
	size_t		n;
	size_t		need;

	if (nmemb != 0 && size > SIZE_MAX / nmemb)
	{
		x->too_large = true;
		return 0;
	}
	n = size * nmemb;
	if (n == 0)
		return 0;

	/* invariant: x->len <= x->limit */
	if (n > x->limit - x->len)
	{
		x->too_large = true;
		return 0;
	}

	need = x->len + n + 1;		/* <= limit + 1 <= MaxAllocSize */
	if (need > x->cap)
	{
		size_t		newcap = (x->cap > 0) ? x->cap : IW_BODY_INITIAL_SIZE;
		char	   *newbuf;

		while (newcap < need)
			newcap *= 2;
		if (newcap > x->limit + 1)
			newcap = x->limit + 1;

		newbuf = MemoryContextAllocExtended(x->cxt, newcap, MCXT_ALLOC_NO_OOM);
		if (newbuf == NULL)
		{
			x->oom = true;
			return 0;
		}
		if (x->data != NULL)
		{
			memcpy(newbuf, x->data, x->len);
			pfree(x->data);
		}
		x->data = newbuf;
		x->cap = newcap;
	}

	memcpy(x->data + x->len, ptr, n);
	x->len += n;
	x->data[x->len] = '\0';
	return n;
}

/*
 * iw_header_callback
 *		CURLOPT_HEADERFUNCTION: remember Retry-After, ignore everything else.
 *
 * Why: the only header the retry policy needs is Retry-After.  No other
 * header is stored anywhere, so none can reach a log or a run row.  The
 * value is copied into a fixed stack buffer: no allocation, nothing that
 * can throw.
 */
static size_t
iw_header_callback(char *buffer, size_t size, size_t nitems, void *userdata)
{
	static const char name[] = "Retry-After:";
	const size_t namelen = sizeof(name) - 1;
	IwTransfer *x = (IwTransfer *) userdata;
	size_t		n = size * nitems;

	/* A new status line (e.g. after "100 Continue") starts a new header set */
	if (n >= 5 && strncmp(buffer, "HTTP/", 5) == 0)
	{
		x->retry_after_s = -1;
		return n;
	}

	if (n > namelen && pg_strncasecmp(buffer, name, namelen) == 0)
	{
		char		value[IW_RETRY_AFTER_BUFLEN];
		size_t		i = namelen;
		size_t		j = 0;

		while (i < n && (buffer[i] == ' ' || buffer[i] == '\t'))
			i++;
		while (i < n && j < sizeof(value) - 1 &&
			   buffer[i] != '\r' && buffer[i] != '\n')
			value[j++] = buffer[i++];
		while (j > 0 && (value[j - 1] == ' ' || value[j - 1] == '\t'))
			j--;
		value[j] = '\0';

		x->retry_after_s = iw_parse_retry_after(value);
	}

	return n;
}

/*
 * iw_parse_retry_after
 *		Seconds to wait according to a Retry-After value, -1 if unparsable.
 *
 * Why: RFC 9110 allows delay-seconds or an HTTP-date; a date in the past
 * means "now" (0).  Called from the header callback, so it allocates
 * nothing (curl_getdate only parses).
 */
static double
iw_parse_retry_after(const char *value)
{
	const char *p;
	double		seconds = 0;
	time_t		when;
	double		diff;

	if (value[0] == '\0')
		return -1;

	for (p = value; *p >= '0' && *p <= '9'; p++)
	{
		/* saturate: the backoff caps it at IW_RETRY_AFTER_MAX_S anyway */
		if (seconds < 1e9)
			seconds = seconds * 10 + (*p - '0');
	}
	if (*p == '\0')
		return seconds;

	when = curl_getdate(value, NULL);
	if (when == (time_t) -1)
		return -1;
	diff = difftime(when, time(NULL));
	return (diff > 0) ? diff : 0;
}

#if LIBCURL_VERSION_NUM >= 0x075000
/*
 * iw_prereq_callback
 *		CURLOPT_PREREQFUNCTION: a request is about to be sent.
 *
 * Why: libcurl sends a request again by itself, on a new connection, when
 * the kept-alive connection it reused turns out to be dead; the server saw
 * both, so both are attempts.  Only counts: nothing here can fail.
 */
static int
iw_prereq_callback(void *clientp, char *conn_primary_ip, char *conn_local_ip,
				   int conn_primary_port, int conn_local_port)
{
	((IwTransfer *) clientp)->sends++;
	return CURL_PREREQFUNC_OK;
}
#endif

/*
 * iw_xferinfo_callback
 *		CURLOPT_XFERINFOFUNCTION: abort the transfer on cancel or SIGTERM.
 *
 * Why: libcurl calls this at least once a second, even while connecting or
 * waiting for a stalled server, so a pending cancel or die request stops
 * the transfer promptly instead of after the full request timeout.  It
 * only reads the flags set by the signal handlers; CHECK_FOR_INTERRUPTS
 * runs in iw_http_get once curl_easy_perform has returned.
 */
static int
iw_xferinfo_callback(void *clientp, curl_off_t dltotal, curl_off_t dlnow,
					 curl_off_t ultotal, curl_off_t ulnow)
{
	IwTransfer *x = (IwTransfer *) clientp;

	if (ProcDiePending || QueryCancelPending)
	{
		x->interrupted = true;
		return 1;				/* CURLE_ABORTED_BY_CALLBACK */
	}
	/* a flag read, cheap; the exit itself waits until libcurl has returned */
	if (!PostmasterIsAlive())
	{
		x->orphaned = true;
		return 1;
	}
	return 0;
}

/*
 * iw_classify_status
 *		Class of a completed transfer, from its HTTP status.
 *
 * Why: one place encodes the retry policy of design.md section 5.  We
 * never follow redirects, so a 3xx is a client error (misconfigured base
 * URL), not something to retry.
 */
static IwHttpClass
iw_classify_status(long status, const char *body)
{
	if (status >= 200 && status <= 299)
		return IW_HTTP_OK;
	if (status == 429 || (status >= 500 && status <= 599))
		return IW_HTTP_RETRYABLE;
	if (status == 401)
		return IW_HTTP_AUTH;
	if (status == 403)
	{
		/* API Gateway's answer for a route that does not exist */
		if (body != NULL && strstr(body, "Missing Authentication Token") != NULL)
			return IW_HTTP_UNKNOWN_ROUTE;
		return IW_HTTP_AUTH;
	}
	/* other 4xx, 3xx, and anything that is not a final HTTP status */
	return IW_HTTP_CLIENT_ERROR;
}

/*
 * iw_classify_curl_error
 *		Class of a transfer that libcurl failed (other than our own aborts).
 *
 * Why: timeouts, DNS and connect failures, resets and truncated bodies are
 * transient and worth a retry with backoff.  The few codes that can only
 * come from our own configuration (a base URL with a refused scheme, or a
 * malformed one) would fail identically on every retry, so they are client
 * errors.
 */
static IwHttpClass
iw_classify_curl_error(CURLcode rc)
{
	switch (rc)
	{
		case CURLE_UNSUPPORTED_PROTOCOL:
		case CURLE_URL_MALFORMAT:
		case CURLE_NOT_BUILT_IN:
			return IW_HTTP_CLIENT_ERROR;
		case CURLE_OPERATION_TIMEDOUT:
		case CURLE_COULDNT_RESOLVE_HOST:
		case CURLE_COULDNT_RESOLVE_PROXY:
		case CURLE_COULDNT_CONNECT:
		case CURLE_PARTIAL_FILE:
		case CURLE_RECV_ERROR:
		case CURLE_SEND_ERROR:
		case CURLE_GOT_NOTHING:
		default:
			return IW_HTTP_RETRYABLE;
	}
}
