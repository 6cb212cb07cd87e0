/*-------------------------------------------------------------------------
 *
 * plaintext.c
 *	  The plaintext-key path: the ironwod.allow_plaintext_keys gate, and
 *	  hiding a statement that passed a plaintext API key from
 *	  pg_stat_activity.
 *
 * A key passed as text (ironwod_connect(tenant, gym, text), ironwod.seal_key)
 * is part of a statement's text, and PostgreSQL keeps statement text in
 * places ironwod does not control: pg_stat_activity.query (readable by the
 * caller's role, superusers and pg_read_all_stats / pg_monitor members)
 * from the moment the statement starts, and pg_stat_statements, which
 * stores utility statements (DO blocks, EXECUTE of a prepared statement)
 * verbatim.  The sealed bytea path carries no plaintext at all, so the text
 * path is refused unless a superuser turns ironwod.allow_plaintext_keys on.
 *
 * Either way, as soon as ironwod sees a plaintext key it replaces this
 * backend's pg_stat_activity text.  Without that, the key would stay on
 * view for the whole validation wait (up to ironwod.validate_timeout_ms),
 * and, after the call (even a refused one), for as long as the session sits
 * idle: PostgreSQL shows an idle session's last statement.  What this
 * cannot hide is the short time between the statement's start and the
 * call, and what pg_stat_statements stores once the statement succeeds;
 * the README's Security section says so.
 *
 * IDENTIFICATION
 *	  src/plaintext.c
 *
 *-------------------------------------------------------------------------
 */
#include "ironwod.h"

#include "fmgr.h"
#include "pgstat.h"
#include "utils/backend_status.h"

PG_FUNCTION_INFO_V1(ironwod_admit_plaintext_key);

/* What pg_stat_activity shows instead of a statement that carried a key. */
#define IW_HIDDEN_ACTIVITY \
	"-- statement text hidden by ironwod: it passed a plaintext API key"

/*
 * iw_admit_plaintext_key
 *		Hide the current statement from pg_stat_activity, then refuse the
 *		plaintext key unless ironwod.allow_plaintext_keys is on.
 *
 * Why hide first: a refused statement stays in pg_stat_activity as the idle
 * session's last query, key included, just like an admitted one.
 * pgstat_report_activity is what PostgreSQL itself calls at each statement
 * start; the state stays "active" and the statement's start time is kept.
 */
void
iw_admit_plaintext_key(void)
{
	pgstat_report_activity(STATE_RUNNING, IW_HIDDEN_ACTIVITY);

	if (!ironwod_allow_plaintext_keys)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("plaintext API keys are disabled"),
				 errdetail("A key passed as text is part of the statement, which PostgreSQL shows in pg_stat_activity and may store in pg_stat_statements; ironwod.allow_plaintext_keys is off."),
				 errhint("Seal the key to ironwod_public_key() in the application and call ironwod_connect(tenant, gym, sealed bytea).")));
}

/*
 * ironwod.admit_plaintext_key(): the gate, as the first step of the text
 * overload of ironwod_connect (before the scope check, so that even a call
 * refused for its scope leaves no key on view).
 */
Datum
ironwod_admit_plaintext_key(PG_FUNCTION_ARGS)
{
	iw_admit_plaintext_key();
	PG_RETURN_VOID();
}
