/*-------------------------------------------------------------------------
 *
 * observe.c
 *	  What ironwod tells an operator from C: the request rate a connection
 *	  can expect (for the ETA of a running run) and the structured LOG line
 *	  of a finished run.  The views built on them live in
 *	  sql/modules/88_operations.sql.
 *
 *-------------------------------------------------------------------------
 */
#include "ironwod.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/guc.h"

PG_FUNCTION_INFO_V1(ironwod_connection_rate);
PG_FUNCTION_INFO_V1(ironwod_log_line);

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
