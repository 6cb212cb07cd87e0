/*-------------------------------------------------------------------------
 *
 * loghook.c
 *	  emit_log_hook that keeps API keys out of the server log.
 *
 * This file owns the backstop of design.md section 3 ("Logging"): an
 * emit_log_hook that scrubs the arguments of ironwod_connect,
 * ironwod_rotate_key and seal_key, and the bind parameters of statements
 * that call them, from every log record before it is written.  The primary
 * defences are elsewhere (the sealed-bytea path, logging settings pinned off
 * for the extension's roles); this hook catches what slips past them, e.g.
 * a superuser who turned log_statement = all on for the whole cluster.
 *
 * How it works: a record is "sensitive" when its message, detail,
 * detail_log, context or internalquery, or the statement being executed
 * (debug_query_string), mentions one of those names, compared
 * case-insensitively.  For a sensitive record the hook
 *	  - sets hide_stmt, so no "STATEMENT:" line (nor the query column of
 *		csvlog/jsonlog) repeats debug_query_string;
 *	  - in every text field that mentions a name, cuts the text right after
 *		the first '(' that follows the name and writes "...)" there when it
 *		fits: "SELECT ironwod_connect('t','g','secret')" becomes
 *		"SELECT ironwod_connect(...)";
 *	  - in detail, detail_log and context, cuts the text after "parameters:"
 *		(the bind parameters of extended-protocol statements, and of
 *		portals in error context) or after "parameter $N" (the context of a
 *		bind-time conversion error) and appends " <redacted>" when it fits;
 *	  - for a data exception (SQLSTATE class 22), which echoes the offending
 *		input in double quotes, cuts the message at the first '"';
 *	  - for a statement-logging LOG line ("statement: ...", "execute ...",
 *		"duration: ... statement: ...") whose own text does not mention a
 *		name (EXECUTE of a prepared statement, whose PREPARE in the detail
 *		does), cuts after the statement's "...:" label and appends
 *		" <redacted>" when it fits.
 *
 * Why in place and allocation-free: the hook runs in EVERY process that
 * emits a log record, including the postmaster, and it runs inside error
 * reporting.  An allocation there can fail (ErrorContext may be the only
 * memory left, and the postmaster must never die of an ERROR it raised
 * itself), and an ereport from inside EmitErrorReport recurses into the
 * error machinery.  Rewriting the strings in place needs no memory: the
 * fields are palloc'd copies in ErrorContext that belong to this record,
 * and every edit only shortens them (a NUL written earlier, plus at most as
 * many suffix bytes as were cut), so no write ever goes past the original
 * terminating NUL.  Cutting at '(' or after an ASCII label is safe in every
 * server encoding, because they are all ASCII-safe.
 *
 * The edits also change what the client receives for that record
 * (EmitErrorReport calls the hook before sending it); that is intended.
 *
 * IDENTIFICATION
 *	  src/loghook.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <string.h>

#include "storage/lwlock.h"		/* ironwod.h uses LWLock, atomics */
#include "tcop/tcopprot.h"
#include "utils/elog.h"

#include "ironwod.h"

/* Function names whose arguments may carry an API key. */
static const char *const iw_sensitive_names[] = {
	"ironwod_connect",
	"ironwod_rotate_key",
	"seal_key",
};

#define IW_NUM_SENSITIVE_NAMES ((int) lengthof(iw_sensitive_names))

#define IW_PARAMS_LABEL		"parameters:"
#define IW_PARAM_LABEL		"parameter $"
#define IW_ARGS_SUFFIX		"...)"
#define IW_REDACTED_SUFFIX	" <redacted>"

static emit_log_hook_type prev_emit_log_hook = NULL;
static bool iw_log_hook_installed = false;

static void iw_emit_log_hook(ErrorData *edata);
static const char *iw_find_ci(const char *haystack, size_t haylen,
							  const char *needle);
static char *iw_find_name(char *text, size_t *namelen);
static bool iw_mentions_name(const char *text);
static void iw_cut(char *cut, const char *suffix);
static void iw_scrub_field(char *text, bool scrub_params);
static void iw_scrub_statement_message(char *message);
static void iw_scrub_data_exception(char *message);

/*
 * iw_install_log_hook
 *		Chain our hook in front of any emit_log_hook already installed.
 *
 * Why: other extensions (auditing, log shippers) may hook emit_log too;
 * chaining keeps them working, and because ours runs first they only ever
 * see the scrubbed record.  Idempotent, since _PG_init can be reached more
 * than once in odd loading orders.
 */
void
iw_install_log_hook(void)
{
	if (iw_log_hook_installed)
		return;
	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = iw_emit_log_hook;
	iw_log_hook_installed = true;
}

/*
 * iw_emit_log_hook
 *		The hook itself: scrub a sensitive record, then call the next hook.
 *
 * Why: see the file header.  Must not allocate and must not ereport.
 */
static void
iw_emit_log_hook(ErrorData *edata)
{
	if (edata != NULL &&
		(iw_mentions_name(edata->message) ||
		 iw_mentions_name(edata->detail) ||
		 iw_mentions_name(edata->detail_log) ||
		 iw_mentions_name(edata->context) ||
		 iw_mentions_name(edata->internalquery) ||
		 iw_mentions_name(debug_query_string)))
	{
		bool		message_named = iw_mentions_name(edata->message);

		edata->hide_stmt = true;

		iw_scrub_field(edata->message, false);
		iw_scrub_field(edata->detail, true);
		iw_scrub_field(edata->detail_log, true);
		iw_scrub_field(edata->context, true);
		iw_scrub_field(edata->internalquery, false);

		/*
		 * A statement log line of a sensitive record whose own text names no
		 * function (EXECUTE p('t','g','secret') after PREPARE p AS SELECT
		 * ironwod_connect($1,$2,$3)) still carries the arguments.  Only LOG
		 * records are statement logs; leave user-facing messages alone.
		 */
		if (!message_named && edata->message != NULL &&
			(edata->elevel == LOG || edata->elevel == LOG_SERVER_ONLY))
			iw_scrub_statement_message(edata->message);

		if (edata->message != NULL &&
			ERRCODE_TO_CATEGORY(edata->sqlerrcode) == ERRCODE_DATA_EXCEPTION)
			iw_scrub_data_exception(edata->message);
	}

	if (prev_emit_log_hook)
		prev_emit_log_hook(edata);
}

/*
 * iw_find_ci
 *		First case-insensitive occurrence of needle in haystack, or NULL.
 *
 * Why: strcasestr is not portable and the names may appear in any case in
 * SQL.  The scan is bounded by haylen (the caller's strlen) and each
 * comparison by the needle's length, and it allocates nothing.
 */
static const char *
iw_find_ci(const char *haystack, size_t haylen, const char *needle)
{
	size_t		nlen = strlen(needle);
	unsigned char first = (unsigned char) pg_tolower((unsigned char) needle[0]);
	size_t		i;

	if (nlen == 0 || haylen < nlen)
		return NULL;

	for (i = 0; i <= haylen - nlen; i++)
	{
		if ((unsigned char) pg_tolower((unsigned char) haystack[i]) == first &&
			pg_strncasecmp(haystack + i, needle, nlen) == 0)
			return haystack + i;
	}
	return NULL;
}

/*
 * iw_find_name
 *		Earliest mention of any sensitive name in text; NULL if none.
 *
 * Why: the cut has to happen after the first mention, so that no argument
 * list of any of the functions survives.
 */
static char *
iw_find_name(char *text, size_t *namelen)
{
	size_t		len;
	char	   *best = NULL;
	int			i;

	if (text == NULL)
		return NULL;

	len = strlen(text);
	for (i = 0; i < IW_NUM_SENSITIVE_NAMES; i++)
	{
		const char *hit = iw_find_ci(text, len, iw_sensitive_names[i]);

		if (hit != NULL && (best == NULL || hit < best))
		{
			best = (char *) hit;
			*namelen = strlen(iw_sensitive_names[i]);
		}
	}
	return best;
}

/*
 * iw_mentions_name
 *		Does text (possibly NULL) mention any sensitive name?
 *
 * Why: decides whether a record is sensitive at all, for read-only strings
 * such as debug_query_string as well as the record's own fields.
 */
static bool
iw_mentions_name(const char *text)
{
	size_t		len;
	int			i;

	if (text == NULL)
		return false;

	len = strlen(text);
	for (i = 0; i < IW_NUM_SENSITIVE_NAMES; i++)
	{
		if (iw_find_ci(text, len, iw_sensitive_names[i]) != NULL)
			return true;
	}
	return false;
}

/*
 * iw_cut
 *		End the string at cut, writing suffix there only if it fits.
 *
 * Why: the single place that edits a field, and the place that guarantees
 * a field never grows: suffix is written only when it is no longer than
 * the text it replaces, so the new NUL lands at or before the old one.
 */
static void
iw_cut(char *cut, const char *suffix)
{
	size_t		room = strlen(cut);
	size_t		slen = strlen(suffix);

	if (slen <= room)
	{
		memcpy(cut, suffix, slen);
		cut[slen] = '\0';
	}
	else
		cut[0] = '\0';
}

/*
 * iw_scrub_field
 *		Remove function arguments (and, if asked, bind parameters) from text.
 *
 * Why: the arguments of ironwod_connect and friends may be a plaintext key,
 * and so may the bind parameters of a statement that calls them.  When a
 * name is followed by no '(' at all, the text is cut right after the name:
 * failing closed costs a little context, failing open costs a key.
 */
static void
iw_scrub_field(char *text, bool scrub_params)
{
	char	   *hit;
	size_t		namelen = 0;

	if (text == NULL)
		return;

	hit = iw_find_name(text, &namelen);
	if (hit != NULL)
	{
		char	   *after = hit + namelen;
		char	   *paren = strchr(after, '(');

		if (paren != NULL)
			iw_cut(paren + 1, IW_ARGS_SUFFIX);
		else
			iw_cut(after, "");
	}

	if (scrub_params)
	{
		char	   *label;

		/* "parameters: $1 = 'a', $2 = 'b'" (statement logs, portal context) */
		label = (char *) iw_find_ci(text, strlen(text), IW_PARAMS_LABEL);
		if (label != NULL)
			iw_cut(label + strlen(IW_PARAMS_LABEL), IW_REDACTED_SUFFIX);

		/* "unnamed portal parameter $3 = 'a'" (bind-time conversion errors) */
		label = (char *) iw_find_ci(text, strlen(text), IW_PARAM_LABEL);
		if (label != NULL)
		{
			label += strlen(IW_PARAM_LABEL);
			while (*label >= '0' && *label <= '9')
				label++;
			iw_cut(label, IW_REDACTED_SUFFIX);
		}
	}
}

/*
 * iw_scrub_data_exception
 *		Cut a data-exception message at the first quoted value.
 *
 * Why: class 22 errors echo the offending input ("invalid input syntax for
 * type uuid: "..."", "value "..." is out of range"); in a sensitive
 * record that input may be the key, passed in the wrong argument position
 * or as a bind parameter of the wrong type.  These messages quote the value
 * with double quotes, so everything from the first one on goes.
 */
static void
iw_scrub_data_exception(char *message)
{
	char	   *quote = strchr(message, '"');

	if (quote != NULL)
		iw_cut(quote, "<redacted>");
}

/*
 * iw_scrub_statement_message
 *		Cut the SQL text out of a statement-logging message.
 *
 * Why: for EXECUTE of a prepared statement the logged text is
 * "EXECUTE p('t','g','secret')": no function name to anchor on, yet the
 * record is sensitive (its detail shows the PREPARE).  The message formats
 * are PostgreSQL's own (postgres.c):
 *		"statement: %s", "execute %s: %s", "parse %s: %s", "bind %s: %s",
 *		and each of them after "duration: %s ms  ".
 * The text is cut after the label's colon.  A bare "duration: %s ms" has
 * no statement text and is left alone.
 */
static void
iw_scrub_statement_message(char *message)
{
	char	   *p = message;
	char	   *colon;

	if (strncmp(p, "duration:", 9) == 0)
	{
		p = strstr(p, " ms  ");
		if (p == NULL)
			return;
		p += 5;
	}

	if (strncmp(p, "statement:", 10) != 0 &&
		strncmp(p, "execute ", 8) != 0 &&
		strncmp(p, "parse ", 6) != 0 &&
		strncmp(p, "bind ", 5) != 0)
		return;

	colon = strchr(p, ':');
	if (colon != NULL)
		iw_cut(colon + 1, IW_REDACTED_SUFFIX);
}
