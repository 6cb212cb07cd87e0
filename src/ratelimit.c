/*-------------------------------------------------------------------------
 *
 * ratelimit.c
 *	  Request rate limiting shared by every ironwod process.
 *
 * This file owns:
 *	  - a fixed table in shared memory of token buckets, one per connection
 *		(tenant_id, gym_id), so that every run and validate worker of the
 *		same connection draws from ONE bucket (rate
 *		ironwod.requests_per_second, capacity ironwod.burst);
 *	  - one cluster-wide bucket (rate ironwod.cluster_requests_per_second)
 *		that caps all connections together;
 *	  - the adaptation: a 429 halves the rate factor of the connection and
 *		of the cluster (floor IW_RL_MIN_FACTOR), drains the connection's
 *		tokens and pauses its refill for Retry-After (or a default pause);
 *		every IW_RL_RECOVER_EVERY successes raise a factor by 5% up to 1;
 *	  - the interruptible wait for a token (WaitLatch, never pg_usleep);
 *	  - its own LWLock tranche "ironwod_ratelimit" and its own shared
 *		memory request, made from shmem_request_hook as PG15 demands.
 *
 * The invariant: no request leaves a worker without one token from its
 * connection's bucket and one from the cluster bucket, taken together under
 * the lock so that neither is consumed while the other refuses.
 *
 * Known limitation: buckets are keyed by connection, not by API key.  Two
 * tenants that connect the same Wodify gym with the same key have two
 * buckets, so together they may exceed Wodify's per-key limit; the 429
 * feedback then slows both down.  (The key fingerprint is tenant-keyed, so
 * it cannot identify a key across tenants.)
 *
 * Everything in shared memory is plain data: uuids, doubles, timestamps and
 * counters; no pointer of any process is ever stored here.
 *
 * IDENTIFICATION
 *	  src/ratelimit.c
 *
 *-------------------------------------------------------------------------
 */
#include "ironwod.h"

#include <math.h>

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

/*
 * Room for every process that can be bound at once (each run worker holds a
 * run slot, each validate worker a validation slot) plus idle buckets kept
 * so that a connection's next run inherits its backoff state.
 */
#define IW_RL_MAX_BUCKETS		(2 * (IW_MAX_RUN_SLOTS + IW_MAX_VALIDATION_SLOTS))

/* Adaptation (design.md section 5): halve on 429, +5% per 20 successes. */
#define IW_RL_MIN_FACTOR		0.1
#define IW_RL_RECOVER_EVERY		20
#define IW_RL_RECOVER_STEP		1.05

/* Pause after a 429 without Retry-After, and the longest pause we honour. */
#define IW_RL_DEFAULT_PAUSE_S	1.0
#define IW_RL_MAX_PAUSE_S		300.0

/*
 * Tokens a connection keeps in reserve, expressed as time at its rate.  The
 * server counts a request when it arrives, we count it when we send it; a
 * request that travels a little slower than the one before it would
 * otherwise find the server's bucket a fraction of a token short.  10 ms of
 * headroom absorbs that jitter at a negligible cost in burst.
 */
#define IW_RL_JITTER_S			0.010

typedef struct IwBucket
{
	double		tokens;			/* available now, <= capacity */
	TimestampTz last_refill;	/* tokens are current as of this instant; in
								 * the future while a 429 pause lasts */
	double		factor;			/* adaptive multiplier of the rate, (0, 1] */
	int			successes;		/* 2xx since the factor last changed */
	int64		throttled;		/* 429s seen */
} IwBucket;

typedef struct IwRateSlot
{
	bool		used;			/* holds the state of (tenant_id, gym_id) */
	int			refcount;		/* processes bound to it now */
	pg_uuid_t	tenant_id;
	pg_uuid_t	gym_id;
	TimestampTz last_used;		/* for LRU eviction of idle slots */
	double		rate;			/* effective rate at the last acquire */
	IwBucket	b;
} IwRateSlot;

typedef struct IwRateState
{
	LWLock	   *lock;
	IwBucket	cluster;
	double		cluster_rate;	/* effective rate at the last acquire */
	IwRateSlot	slots[IW_RL_MAX_BUCKETS];
} IwRateState;

static IwRateState *iw_rl = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* This process's binding: a shared slot, or the private fallback bucket. */
static int	my_slot = -1;
static IwBucket my_private_bucket;
static bool my_private_ready = false;
static bool my_exit_registered = false;

static void iw_ratelimit_shmem_request(void);
static void iw_ratelimit_shmem_startup(void);
static void iw_ratelimit_unbind(int code, Datum arg);
static void bucket_reset(IwBucket *b, double capacity, TimestampTz now);
static void bucket_refill(IwBucket *b, double rate, double capacity,
						  TimestampTz now);
static void bucket_on_429(IwBucket *b, TimestampTz now, double pause_s);
static void bucket_on_success(IwBucket *b);
static double conn_rate(const IwBucket *b);
static double conn_capacity(void);
static double cluster_rate(const IwBucket *b);

static Size
iw_ratelimit_shmem_size(void)
{
	return MAXALIGN(sizeof(IwRateState));
}

/* PG15 only accepts shared memory and LWLock requests from this hook. */
static void
iw_ratelimit_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(iw_ratelimit_shmem_size());
	RequestNamedLWLockTranche("ironwod_ratelimit", 1);
}

static void
iw_ratelimit_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	iw_rl = ShmemInitStruct("ironwod_ratelimit", iw_ratelimit_shmem_size(),
							&found);
	if (!found)
	{
		memset(iw_rl, 0, sizeof(IwRateState));
		iw_rl->lock = &(GetNamedLWLockTranche("ironwod_ratelimit"))->lock;
		/* The cluster bucket starts full, like every connection bucket. */
		iw_rl->cluster.factor = 1.0;
		iw_rl->cluster.tokens = Max(ironwod_cluster_requests_per_second, 1.0);
		iw_rl->cluster.last_refill = GetCurrentTimestamp();
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * iw_ratelimit_init_hooks
 *		Chain the shared memory hooks; called from _PG_init.
 */
void
iw_ratelimit_init_hooks(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = iw_ratelimit_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = iw_ratelimit_shmem_startup;
}

/* ---- bucket arithmetic: pure, no allocation, safe under the lock ---- */

static double
conn_capacity(void)
{
	return (double) Max(ironwod_burst, 1);
}

static double
conn_rate(const IwBucket *b)
{
	return ironwod_requests_per_second * b->factor;
}

static double
cluster_rate(const IwBucket *b)
{
	return ironwod_cluster_requests_per_second * b->factor;
}

static void
bucket_reset(IwBucket *b, double capacity, TimestampTz now)
{
	b->tokens = capacity;
	b->last_refill = now;
	b->factor = 1.0;
	b->successes = 0;
	b->throttled = 0;
}

/*
 * Bring b->tokens up to date at "now".  While a 429 pause lasts,
 * last_refill lies in the future and nothing accrues.  A wall clock that
 * jumped backwards past the pause would stall the bucket, so a pause longer
 * than the longest we ever set is cut back to now.
 */
static void
bucket_refill(IwBucket *b, double rate, double capacity, TimestampTz now)
{
	double		elapsed_s;

	if (b->last_refill > now)
	{
		if ((double) (b->last_refill - now) / USECS_PER_SEC <= IW_RL_MAX_PAUSE_S)
			return;				/* paused */
		b->last_refill = now;
	}
	elapsed_s = (double) (now - b->last_refill) / USECS_PER_SEC;
	b->tokens += elapsed_s * rate;
	/* Also applies when ironwod.burst was lowered by a reload. */
	if (b->tokens > capacity)
		b->tokens = capacity;
	b->last_refill = now;
}

static void
bucket_on_429(IwBucket *b, TimestampTz now, double pause_s)
{
	b->throttled++;
	b->successes = 0;
	b->factor = Max(b->factor / 2.0, IW_RL_MIN_FACTOR);
	if (pause_s > 0)
	{
		TimestampTz until = now + (TimestampTz) (pause_s * USECS_PER_SEC);

		b->tokens = 0;
		if (until > b->last_refill)
			b->last_refill = until;
	}
}

static void
bucket_on_success(IwBucket *b)
{
	if (b->factor >= 1.0)
		return;
	if (++b->successes >= IW_RL_RECOVER_EVERY)
	{
		b->factor = Min(b->factor * IW_RL_RECOVER_STEP, 1.0);
		b->successes = 0;
	}
}

/*
 * iw_ratelimit_bind
 *		Attach this process to the bucket of connection (tenant, gym).
 *
 * Why: the run and validate workers of one connection must share a bucket,
 * and a connection's next run should inherit a backoff that is still in
 * force, so an idle bucket is kept until its slot is needed.  When no slot
 * is free the least recently used idle one is evicted; when every slot is
 * in use (cannot happen with the table sized above, but cheap to survive)
 * the process paces itself with a private bucket and logs it.
 */
void
iw_ratelimit_bind(const pg_uuid_t *tenant, const pg_uuid_t *gym)
{
	TimestampTz now = GetCurrentTimestamp();
	int			found = -1;
	int			empty = -1;
	int			lru = -1;
	int			i;

	if (my_slot >= 0 || iw_rl == NULL)
		return;

	if (!my_exit_registered)
	{
		before_shmem_exit(iw_ratelimit_unbind, (Datum) 0);
		my_exit_registered = true;
	}

	LWLockAcquire(iw_rl->lock, LW_EXCLUSIVE);
	for (i = 0; i < IW_RL_MAX_BUCKETS; i++)
	{
		IwRateSlot *s = &iw_rl->slots[i];

		if (!s->used)
		{
			if (empty < 0)
				empty = i;
			continue;
		}
		if (memcmp(&s->tenant_id, tenant, sizeof(pg_uuid_t)) == 0 &&
			memcmp(&s->gym_id, gym, sizeof(pg_uuid_t)) == 0)
		{
			found = i;
			break;
		}
		if (s->refcount == 0 &&
			(lru < 0 || s->last_used < iw_rl->slots[lru].last_used))
			lru = i;
	}
	if (found < 0)
	{
		found = (empty >= 0) ? empty : lru;
		if (found >= 0)
		{
			IwRateSlot *s = &iw_rl->slots[found];

			s->used = true;
			s->refcount = 0;
			s->tenant_id = *tenant;
			s->gym_id = *gym;
			s->rate = ironwod_requests_per_second;
			bucket_reset(&s->b, conn_capacity(), now);
		}
	}
	if (found >= 0)
	{
		iw_rl->slots[found].refcount++;
		iw_rl->slots[found].last_used = now;
		my_slot = found;
	}
	LWLockRelease(iw_rl->lock);

	if (found < 0)
		ereport(LOG,
				(errmsg("ironwod: all %d rate limit slots are in use; this worker paces itself alone",
						IW_RL_MAX_BUCKETS)));
}

/* before_shmem_exit: the slot becomes idle (evictable), its state stays. */
static void
iw_ratelimit_unbind(int code, Datum arg)
{
	if (my_slot < 0 || iw_rl == NULL)
		return;
	LWLockAcquire(iw_rl->lock, LW_EXCLUSIVE);
	if (iw_rl->slots[my_slot].refcount > 0)
		iw_rl->slots[my_slot].refcount--;
	LWLockRelease(iw_rl->lock);
	my_slot = -1;
}

/*
 * Between two runs of one worker (run.c): leave the connection's bucket, as
 * an exiting worker does, so that the next run binds to its own
 * connection's (iw_ratelimit_bind binds once), and forget the private
 * fallback bucket, which paced the last run's connection.
 */
void
iw_ratelimit_unbind_now(void)
{
	iw_ratelimit_unbind(0, (Datum) 0);
	my_private_ready = false;
	memset(&my_private_bucket, 0, sizeof(my_private_bucket));
}

/*
 * The bucket of this process's connection: its shared slot, else the
 * private fallback (initialised full on first use).
 */
static IwBucket *
my_bucket(TimestampTz now)
{
	if (my_slot >= 0)
		return &iw_rl->slots[my_slot].b;
	if (!my_private_ready)
	{
		bucket_reset(&my_private_bucket, conn_capacity(), now);
		my_private_ready = true;
	}
	return &my_private_bucket;
}

/*
 * iw_ratelimit_acquire
 *		Block until both the connection and the cluster bucket grant a token,
 *		then take one from each.
 *
 * Why: this is the only door to the network (iw_http_get calls it before
 * every request).  The wait is computed from the larger deficit, or the
 * remaining 429 pause, and slept with WaitLatch so that SIGTERM, cancel and
 * postmaster death end it at once.  The lock is held only for arithmetic.
 */
void
iw_ratelimit_acquire(void)
{
	for (;;)
	{
		TimestampTz now = GetCurrentTimestamp();
		double		wait_s = 0;
		double		cap = conn_capacity();
		double		reserve;
		double		rate;
		double		crate;
		double		ccap;
		IwBucket   *b;
		long		wait_ms;

		if (iw_rl != NULL)
			LWLockAcquire(iw_rl->lock, LW_EXCLUSIVE);

		b = my_bucket(now);
		rate = conn_rate(b);
		bucket_refill(b, rate, cap, now);
		reserve = Min(rate * IW_RL_JITTER_S, cap - 1.0);

		if (b->last_refill > now)
			wait_s = (double) (b->last_refill - now) / USECS_PER_SEC;
		else if (b->tokens < 1.0 + reserve)
			wait_s = (1.0 + reserve - b->tokens) / rate;

		if (iw_rl != NULL)
		{
			IwBucket   *c = &iw_rl->cluster;

			crate = cluster_rate(c);
			ccap = Max(crate, 1.0);
			bucket_refill(c, crate, ccap, now);
			if (c->tokens < 1.0)
				wait_s = Max(wait_s, (1.0 - c->tokens) / crate);
			iw_rl->cluster_rate = crate;
			if (wait_s <= 0)
				c->tokens -= 1.0;
			if (my_slot >= 0)
			{
				iw_rl->slots[my_slot].rate = rate;
				iw_rl->slots[my_slot].last_used = now;
			}
		}
		if (wait_s <= 0)
			b->tokens -= 1.0;

		if (iw_rl != NULL)
			LWLockRelease(iw_rl->lock);

		if (wait_s <= 0)
			return;

		/* Round up: waking a hair early would only cost another round. */
		wait_ms = (long) ceil(Min(wait_s, IW_RL_MAX_PAUSE_S) * 1000.0);
		(void) WaitLatch(MyLatch,
						 WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Max(wait_ms, 1), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

/*
 * iw_ratelimit_feedback
 *		Adapt the buckets to the outcome of one request.
 *
 * Why: the configured rates are guesses; the server's 429 is the truth.  A
 * 429 halves the connection's and the cluster's rate factor, empties the
 * connection's bucket and stops its refill for Retry-After seconds (or
 * IW_RL_DEFAULT_PAUSE_S), so no worker of that connection sends anything
 * during the pause.  Successes win the rate back slowly.  Other statuses
 * (5xx, transport errors) say nothing about our rate and are ignored.
 */
void
iw_ratelimit_feedback(long http_status, double retry_after_s)
{
	TimestampTz now;
	IwBucket   *b;

	if (http_status != 429 && !(http_status >= 200 && http_status <= 299))
		return;

	now = GetCurrentTimestamp();
	if (iw_rl != NULL)
		LWLockAcquire(iw_rl->lock, LW_EXCLUSIVE);
	b = my_bucket(now);
	if (http_status == 429)
	{
		double		pause_s = IW_RL_DEFAULT_PAUSE_S;

		if (retry_after_s >= 0)	/* false for NaN too */
			pause_s = Min(retry_after_s, IW_RL_MAX_PAUSE_S);
		/* Bring the tokens up to date first, so the pause starts now. */
		bucket_refill(b, conn_rate(b), conn_capacity(), now);
		bucket_on_429(b, now, pause_s);
		if (iw_rl != NULL)
			bucket_on_429(&iw_rl->cluster, now, 0);
	}
	else
	{
		bucket_on_success(b);
		if (iw_rl != NULL)
			bucket_on_success(&iw_rl->cluster);
	}
	if (iw_rl != NULL)
		LWLockRelease(iw_rl->lock);
}

/*
 * iw_ratelimit_snapshot
 *		Copy the state of the cluster bucket (first) and every used
 *		connection bucket into out[], at most max entries; returns the count.
 *
 * Why: ironwod.rate_limits() must not hold the lock while it builds
 * tuples (which allocates), so it copies under the lock into a caller
 * array allocated beforehand.  Tokens are shown as of now, without
 * changing the shared state.
 */
int
iw_ratelimit_snapshot(IwRateLimitInfo *out, int max)
{
	TimestampTz now = GetCurrentTimestamp();
	int			n = 0;
	int			i;

	if (iw_rl == NULL || max <= 0)
		return 0;

	LWLockAcquire(iw_rl->lock, LW_SHARED);
	{
		IwBucket	c = iw_rl->cluster;
		double		crate = cluster_rate(&c);

		bucket_refill(&c, crate, Max(crate, 1.0), now);
		memset(&out[n], 0, sizeof(IwRateLimitInfo));
		out[n].is_cluster = true;
		out[n].tokens = c.tokens;
		out[n].rate = crate;
		out[n].paused_until = 0;
		out[n].throttled_count = c.throttled;
		out[n].refcount = 0;
		n++;
	}
	for (i = 0; i < IW_RL_MAX_BUCKETS && n < max; i++)
	{
		IwRateSlot *s = &iw_rl->slots[i];
		IwBucket	b;

		if (!s->used)
			continue;
		b = s->b;
		bucket_refill(&b, conn_rate(&b), conn_capacity(), now);
		out[n].is_cluster = false;
		out[n].tenant_id = s->tenant_id;
		out[n].gym_id = s->gym_id;
		out[n].tokens = b.tokens;
		out[n].rate = conn_rate(&b);
		out[n].paused_until = (b.last_refill > now) ? b.last_refill : 0;
		out[n].throttled_count = b.throttled;
		out[n].refcount = s->refcount;
		n++;
	}
	LWLockRelease(iw_rl->lock);
	return n;
}

/* Upper bound on the rows of iw_ratelimit_snapshot. */
int
iw_ratelimit_max_rows(void)
{
	return IW_RL_MAX_BUCKETS + 1;
}
