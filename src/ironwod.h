/*-------------------------------------------------------------------------
 *
 * ironwod.h
 *	  Declarations shared by the ironwod source files.
 *
 * Who owns what:
 *	  ironwod.c    _PG_init, GUC definitions, worker registration
 *	  shmem.c      shared memory: supervisor pid, wake at commit, run slots
 *	               (and the handoff of a run to an idle worker), validation
 *	               slots, condition variables
 *	  launcher.c   the static "ironwod launcher": waits for the database, then
 *	               starts (and restarts) the supervisor in it
 *	  dbleave.c    whether a session waits for the database to be unused
 *	               (DROP DATABASE and the like), so our idle processes leave
 *	  supervisor.c the "ironwod supervisor" background worker
 *	  run.c        the dynamic "ironwod run" and "ironwod validate" workers
 *	  http.c       libcurl wrapper: one easy handle per run, backoff
 *	  ratelimit.c  token buckets in shared memory: per connection and
 *	               cluster-wide, adapting to 429s
 *	  land.c       SPI calls that land pages and move run state
 *	  page.c       a response page split into records (jsonb, id, hash)
 *	  wire.c       Wodify's wire formats: vendor datetimes, ids, civil dates,
 *	               percent-encoding
 *	  fields.c     the transform's field readers: one field of a raw record
 *	               as a canonical column's value
 *	  crypto.c     sealed-box encryption of API keys, fingerprints
 *	  masterkey.c  loading private master keys from ironwod.master_key_command
 *	  rewrap.c     the "ironwod rewrap" worker: re-sealing API keys to the
 *	               active master key
 *	  loghook.c    emit_log_hook that scrubs API keys from the server log
 *	  plaintext.c  the ironwod.allow_plaintext_keys gate; plaintext keys kept
 *	               out of pg_stat_activity
 *	  sqlfuncs.c   SQL-callable C functions
 *	  observe.c    a connection's expected request rate, the LOG line of a
 *	               finished run
 *
 *-------------------------------------------------------------------------
 */
#ifndef IRONWOD_H
#define IRONWOD_H

#include "postgres.h"

#include "port/atomics.h"
#include "storage/condition_variable.h"
#include "storage/lwlock.h"
#include "utils/date.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

/*
 * The SQL version this library serves: default_version of ironwod.control,
 * passed in by the Makefile so the two cannot disagree.
 */
#ifndef IRONWOD_VERSION
#error "IRONWOD_VERSION must be defined by the Makefile (default_version of ironwod.control)"
#endif

/* ---- GUCs (ironwod.c) ---- */
extern char *ironwod_database_name;
extern char *ironwod_worker_role;
extern int	ironwod_max_workers;
extern int	ironwod_worker_idle_timeout_s;
extern char *ironwod_base_url;
extern char *ironwod_master_key_command;
extern int	ironwod_master_key_command_timeout_ms;
extern int	ironwod_connect_timeout_ms;
extern int	ironwod_request_timeout_ms;
extern int	ironwod_low_speed_time_s;
extern int	ironwod_max_response_bytes;
extern int	ironwod_max_retries;
extern int	ironwod_pages_per_commit;
extern double ironwod_requests_per_second;
extern int	ironwod_burst;
extern double ironwod_cluster_requests_per_second;
extern bool ironwod_allow_http;
extern int	ironwod_naptime_ms;
extern int	ironwod_validate_timeout_ms;
extern bool ironwod_enabled;
extern int	ironwod_backfill_months;
extern int	ironwod_run_retention_days;
extern int	ironwod_lookback_days;
extern int	ironwod_due_window_days;
extern double ironwod_reconcile_sanity_share;
extern int	ironwod_breaker_threshold;
extern int	ironwod_run_timeout_min;
extern int	ironwod_watchdog_timeout_s;
extern int	ironwod_max_record_bytes;
extern bool ironwod_allow_plaintext_keys;

/* ---- shared memory (shmem.c) ---- */

#define IW_MAX_RUN_SLOTS 64
#define IW_MAX_VALIDATION_SLOTS 8
#define IW_MAX_SEALED_BYTES 1024
#define IW_FINGERPRINT_LEN 20	/* 12 hex + "..." + last 4 + NUL, rounded */

typedef enum IwValidationState
{
	IW_VSLOT_FREE = 0,
	IW_VSLOT_PENDING,			/* claimed by a backend, worker not done */
	IW_VSLOT_DONE				/* worker wrote its verdict */
} IwValidationState;

typedef enum IwVerdict
{
	IW_VERDICT_NONE = 0,
	IW_VERDICT_VALID,			/* Wodify accepted the key */
	IW_VERDICT_REJECTED,		/* Wodify refused the key (auth error) */
	IW_VERDICT_UNAVAILABLE,		/* could not decide: network, 5xx, timeout */
	IW_VERDICT_UNOPENABLE,		/* the sealed key does not open for this gym */
	IW_VERDICT_KEYSTORE			/* no usable master key (configuration) */
} IwVerdict;

/*
 * HTTP attempts by how they ended, plus retries, waits and bytes: what a run
 * worker (or a validate worker) counted since it last wrote them down
 * (observe.c; http.c counts).  The order of the fields is the order of the
 * int8[] that ironwod.add_attempts and the page bookkeeping take.
 */
typedef enum IwAttemptOutcome
{
	IW_ATTEMPT_2XX,
	IW_ATTEMPT_429,
	IW_ATTEMPT_4XX,				/* and anything else that is no 2xx, 429 or 5xx */
	IW_ATTEMPT_5XX,
	IW_ATTEMPT_NETWORK,			/* resets, timeouts, truncated or unparsable bodies */
	IW_ATTEMPT_ENVELOPE,		/* HTTP 200 with a Wodify HTTPCode error */
	IW_ATTEMPT_OUTCOMES
} IwAttemptOutcome;

typedef struct IwAttempts
{
	int64		outcomes[IW_ATTEMPT_OUTCOMES];
	int64		retries;
	int64		bytes;			/* response bodies received */
	int64		token_wait_us;	/* waiting for rate-limit tokens */
	int64		backoff_us;		/* sleeping between retries */
} IwAttempts;

#define IW_ATTEMPT_FIELDS (IW_ATTEMPT_OUTCOMES + 4)

typedef struct IwValidationSlot
{
	IwValidationState state;
	uint32		generation;		/* bumped on every claim; a late worker of an
								 * earlier claim must not write into the slot */
	int			backend_pid;	/* owner; slot is reclaimed if it is gone */
	int			sealed_len;
	uint8		sealed[IW_MAX_SEALED_BYTES];
	/* result, written by the worker before state becomes DONE */
	IwVerdict	verdict;
	int			http_status;
	char		fingerprint[IW_FINGERPRINT_LEN];
	char		message[256];	/* sanitized; never holds the key */
	IwAttempts	attempts;		/* the validation's HTTP attempts */
} IwValidationSlot;

/*
 * A run worker's slot.  Free: pid 0.  Busy: the worker works on run_id.
 * Idle: the worker finished a run cleanly and waits (at most
 * ironwod.worker_idle_timeout) for the supervisor to hand it another one;
 * run_id is 0, so no run counts as alive through it.  Assigned: the
 * supervisor wrote the next run into args and run_id, and set the worker's
 * latch.  Every change is made under iw_shared->lock: the supervisor
 * assigns only to a slot that is still idle, and an idle worker leaves only
 * when no run was assigned to it.
 */
typedef enum IwRunSlotState
{
	IW_RSLOT_FREE = 0,
	IW_RSLOT_BUSY,
	IW_RSLOT_IDLE,
	IW_RSLOT_ASSIGNED
} IwRunSlotState;

typedef struct IwRunArgs
{
	int64		run_id;			/* 0 for validation workers */
	int			validation_slot;	/* -1 for run workers */
	uint32		validation_generation;
	Oid			database_oid;
	Oid			role_oid;
	pg_uuid_t	tenant_id;
	pg_uuid_t	gym_id;
} IwRunArgs;

typedef struct IwRunSlot
{
	int64		run_id;			/* 0 = no run (free or idle) */
	int			pid;
	IwRunSlotState state;
	Oid			role_oid;		/* the role the worker is connected as */
	IwRunArgs	args;			/* the next run, while assigned */
} IwRunSlot;

typedef struct IwSharedState
{
	LWLock	   *lock;
	int			supervisor_pid;
	bool		supervisor_left;	/* it exited for DROP DATABASE or the like
									 * (dbleave.c): no crash to back off from */
	ConditionVariable run_cv;	/* broadcast whenever a run changes state */
	ConditionVariable validation_cv;	/* broadcast when a verdict is written */
	IwRunSlot	runs[IW_MAX_RUN_SLOTS];
	IwValidationSlot validations[IW_MAX_VALIDATION_SLOTS];
} IwSharedState;

extern IwSharedState *iw_shared;

extern void iw_shmem_init_hooks(void);
extern void iw_wake_supervisor_at_commit(void);
extern void iw_wake_supervisor_now(void);
extern void iw_run_slot_set(int64 run_id, Oid role_oid);
extern bool iw_run_slot_wait_for_run(IwRunArgs *args);
extern bool iw_run_slot_assign(int slot, int pid, const IwRunArgs *args);
extern int	iw_run_slot_idle_list(int *slots, int *pids, Oid *roles, int max);
extern bool iw_run_slot_alive(int64 run_id);
extern int	iw_run_slot_pid(int64 run_id);
extern void iw_broadcast_run_change(void);

/* ---- leaving the database for DROP DATABASE and the like (dbleave.c) ---- */

/*
 * How often a sleeping supervisor or idle run worker looks whether a session
 * waits for its database to be unused: a tenth of the 5 s PostgreSQL waits.
 */
#define IW_DATABASE_PROBE_MS 500

extern bool iw_database_awaited(Oid dboid);
extern bool iw_database_hold(Oid dboid);
extern void iw_database_release(void);
extern void iw_log_leaving_database(const char *who);

/* ---- background workers ---- */

extern PGDLLEXPORT void ironwod_supervisor_main(Datum main_arg);
extern bool iw_drives_version(const char *version);
extern PGDLLEXPORT void ironwod_run_main(Datum main_arg);
extern PGDLLEXPORT void ironwod_validate_main(Datum main_arg);
extern PGDLLEXPORT void ironwod_rewrap_main(Datum main_arg);
extern PGDLLEXPORT void ironwod_launcher_main(Datum main_arg);
extern void iw_register_launcher(void);
struct BackgroundWorker;
/*
 * A run worker's name, the fixed part of its process title: it serves several
 * runs in turn, so the name names none; run.c appends the run it serves, or
 * "idle" (and reports the same as its application_name).
 */
#define IW_RUN_WORKER_TITLE "ironwod run worker:"
extern void iw_prepare_dynamic_worker(struct BackgroundWorker *worker, const char *function,
									  const char *type, const IwRunArgs *args);

/* ---- HTTP (http.c) ---- */

typedef enum IwHttpClass
{
	IW_HTTP_OK,					/* 2xx, body complete */
	IW_HTTP_RETRYABLE,			/* 429, 5xx, timeout, reset, truncated */
	IW_HTTP_AUTH,				/* 401, or 403 "Forbidden" */
	IW_HTTP_UNKNOWN_ROUTE,		/* 403 "Missing Authentication Token" */
	IW_HTTP_CLIENT_ERROR,		/* other 4xx */
	IW_HTTP_TOO_LARGE,			/* body exceeded ironwod.max_response_bytes */
	IW_HTTP_INTERRUPTED			/* cancel or SIGTERM during the transfer */
} IwHttpClass;

typedef struct IwHttpResponse
{
	IwHttpClass klass;
	long		status;			/* HTTP status, 0 when no response */
	char	   *body;			/* NUL-terminated, palloc'd in the caller's
								 * context; NULL when no body */
	size_t		body_len;
	double		retry_after_s;	/* from Retry-After, -1 when absent */
	double		elapsed_ms;
	char		error[256];		/* transport error text, never headers */
} IwHttpResponse;

extern void iw_http_begin(const char *api_key);
extern void iw_http_get(const char *url, IwHttpResponse *resp);
extern void iw_http_end(void);
extern void iw_http_backoff(int attempt, double retry_after_s);

/* ---- rate limiting (ratelimit.c) ---- */

/* One row of ironwod.rate_limits(), copied out of shared memory. */
typedef struct IwRateLimitInfo
{
	bool		is_cluster;		/* the cluster-wide bucket (no tenant/gym) */
	pg_uuid_t	tenant_id;
	pg_uuid_t	gym_id;
	double		tokens;			/* as of the snapshot */
	double		rate;			/* effective requests/s, adaptive factor
								 * applied */
	TimestampTz paused_until;	/* 0 when not paused by a 429 */
	int64		throttled_count;	/* 429s seen */
	int			refcount;		/* workers bound now */
} IwRateLimitInfo;

extern void iw_ratelimit_init_hooks(void);
extern void iw_ratelimit_bind(const pg_uuid_t *tenant, const pg_uuid_t *gym);
extern void iw_ratelimit_acquire(void);
extern void iw_ratelimit_feedback(long http_status, double retry_after_s);
extern int	iw_ratelimit_snapshot(IwRateLimitInfo *out, int max);
extern int	iw_ratelimit_max_rows(void);
extern void iw_ratelimit_unbind_now(void);

/* ---- crypto (crypto.c, masterkey.c) ---- */

#define IW_X25519_KEYLEN 32

extern bytea *iw_seal(const uint8 *public_key, const char *key_id,
					  const pg_uuid_t *tenant_id, const pg_uuid_t *gym_id,
					  const char *plaintext, size_t plaintext_len);
extern char *iw_open(const bytea *sealed, const uint8 *private_key,
					 const pg_uuid_t *tenant_id, const pg_uuid_t *gym_id,
					 MemoryContext secret_ctx);
extern char *iw_sealed_key_id(const bytea *sealed);
extern void iw_fingerprint(const char *plaintext, const pg_uuid_t *tenant_id,
						   const pg_uuid_t *gym_id, char *out);
extern void iw_x25519_public_from_private(const uint8 *private_key,
										  uint8 *public_key);
extern void iw_load_master_key(const char *key_id, uint8 *private_key_out);
extern const char *iw_key_command_problem;

/* what the master key command prints, without the private keys */
typedef struct IwKeyInfo
{
	char		key_id[65];
	uint8		public_key[IW_X25519_KEYLEN];
} IwKeyInfo;

extern int	iw_master_key_inventory(IwKeyInfo *keys, int max_keys);

/* ---- configuration checks (configcheck.c) ---- */
extern IwVerdict iw_check_master_keys(char *message, size_t len);

/* ---- landing and run state over SPI (land.c) ---- */

typedef struct IwClaim
{
	char	   *mode;
	bytea	   *sealed;			/* NULL when the connection lost its key */
	char	   *master_key_id;
} IwClaim;

typedef struct IwTask
{
	char	   *entity;
	char	   *window_key;
	char	   *url;			/* relative to ironwod.base_url, no page args */
	int			page_size;
	int			entity_ordinal; /* the unit's place in the run (run_units) */
	int			ordinal;
} IwTask;

typedef struct IwLandResult
{
	char	   *outcome;		/* landed, envelope, bad_body, not_json or
								 * pagination */
	int			http_code;		/* HTTPCode of an error envelope */
	char	   *message;
	bool		has_more;
	int			n_records;
	int			n_new;
	int			n_quarantined;	/* records that went to quarantined_records */
	char	   *digest;			/* of the page's ids, to spot a repeated page */
} IwLandResult;

extern void iw_txn_begin(const char *activity);
extern void iw_txn_commit(void);
extern void iw_exit_if_postmaster_dead(void);
extern void iw_set_scope(const pg_uuid_t *tenant_id, const pg_uuid_t *gym_id);
extern void iw_set_local_scope(const char *tenant, const char *gym);
extern void iw_clear_scope(void);
extern void iw_land_reset(void);
extern bool iw_claim_run(int64 run_id, IwClaim *claim, MemoryContext keep);
extern int	iw_next_tasks(int64 run_id, const IwTask *after, bool plan, IwTask *tasks,
						  int max, MemoryContext keep);

/* Pages fetched, checked and waiting to be landed together (land.c). */
typedef struct IwBatch IwBatch;

extern IwBatch *iw_batch_create(MemoryContext parent);
extern void iw_check_page(IwBatch *batch, int64 run_id, const IwTask *task, int page,
						  char *body, size_t body_len, const char *prev_digest,
						  double latency_ms, IwLandResult *res, MemoryContext keep);
extern bool iw_batch_full(const IwBatch *batch);
extern int	iw_batch_pages(const IwBatch *batch);
extern void iw_land_batch(IwBatch *batch, int64 run_id);
extern void iw_mark_not_entitled(int64 run_id, const char *entity);
extern void iw_run_step(int64 run_id, const char *sql, const char *activity);
extern void iw_finish_run(int64 run_id);
extern void iw_finish_validate(int64 run_id, bool valid, const char *fingerprint,
							   const char *message);
extern void iw_fail_run(int64 run_id, const char *code, const char *message,
						const char *phase);

/* ---- Wodify wire formats (wire.c) ---- */
extern bool iw_parse_vendor_ts(const char *s, int len, TimestampTz *result);
extern bool iw_wodify_id(const JsonbValue *v, int64 *id);
extern bool iw_civil_date(const char *s, int len, DateADT *result);

/* ---- response pages (page.c) ---- */

#define IW_PAYLOAD_HASH_LEN 32	/* SHA-256 */

/* What landing needs to know about an entity, from ironwod.entities. */
typedef struct IwEntitySpec
{
	char	   *entity;
	char	   *records_key;
	char	   *id_field;
	char	  **updated_path;
	int			n_updated;
	char	  **created_path;
	int			n_created;
	char	  **watermark_path;
	int			n_watermark;
	int			page_size;
	/* top-level keys the payload hash leaves out (text[]), when n_volatile > 0 */
	Datum		volatile_fields;
	int			n_volatile;
} IwEntitySpec;

/* One element of a page's records array. */
typedef struct IwRecord
{
	const char *fault;			/* NULL, or why it cannot be stored */
	const char *detail;
	bool		has_id;
	int64		id;
	Jsonb	   *payload;		/* good records only */
	uint8		hash[IW_PAYLOAD_HASH_LEN];
	bool		has_updated_at;
	TimestampTz updated_at;		/* source_updated_at */
	bool		has_watermark;
	TimestampTz watermark;
	bool		duplicate;		/* the same version earlier in the page */
	char	   *raw;			/* the record's bytes in the body */
	int			raw_len;
} IwRecord;

typedef enum IwPageOutcome
{
	IW_PAGE_RECORDS,			/* an object with the records array */
	IW_PAGE_NOT_JSON,			/* not JSON at all: worth a retry */
	IW_PAGE_NOT_OBJECT,
	IW_PAGE_ENVELOPE,			/* Wodify's HTTPCode error envelope */
	IW_PAGE_NO_RECORDS
} IwPageOutcome;

typedef struct IwPage
{
	IwPageOutcome outcome;
	bool		is_envelope;
	int			http_code;		/* of the envelope */
	char	   *error_code;
	char	   *developer_message;
	bool		has_records;
	int			has_more;		/* pagination.has_more: -1 absent, 0, 1 */
	char	   *page_number;	/* pagination.page when it is all digits */
	int			n_records;
	IwRecord   *records;
	int			n_faulty;
	bool		has_watermark;	/* newest watermark of the good records */
	TimestampTz watermark;
	bool		has_digest;		/* md5 of the ids in page order */
	char		digest[33];
} IwPage;

extern void iw_parse_page(char *body, size_t len, const IwEntitySpec *spec, IwPage *page);
extern void iw_payload_hash(const Jsonb *jb, uint8 *out);

/* ---- attempt counters (observe.c) ---- */
extern IwAttempts iw_attempts;
extern void iw_attempts_for(const char *entity);
extern const char *iw_attempts_entity(void);
extern void iw_attempt_counted(IwAttemptOutcome outcome, int64 bytes, int64 token_wait_us);
extern void iw_attempt_recount(IwAttemptOutcome outcome);
extern void iw_attempt_resent(void);
extern void iw_attempt_backed_off(int64 slept_us);
extern bool iw_attempts_pending(void);
extern void iw_attempts_reset(void);
extern void iw_observe_reset(void);
extern Datum iw_attempts_datum(const IwAttempts *a);
extern void iw_memory_run_start(void);
extern void iw_memory_page_start(void);
extern void iw_memory_page_end(int64 body_len);
extern int64 iw_memory_peak(void);
extern int64 iw_memory_largest_page(void);

/* ---- log hook (loghook.c) ---- */
extern void iw_install_log_hook(void);

/* ---- plaintext keys (plaintext.c) ---- */
extern void iw_admit_plaintext_key(void);

#endif							/* IRONWOD_H */
