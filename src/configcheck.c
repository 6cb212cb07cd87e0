/*-------------------------------------------------------------------------
 *
 * configcheck.c
 *	  The C side of ironwod.check_config() (sql/modules/62_check_config.sql):
 *	  whether the server's OS user can run ironwod.master_key_command at all,
 *	  checked in the backend without running it, and, in a validate worker,
 *	  whether what the command prints matches the registered master keys.
 *	  Nothing here returns or logs a key or the command line (which may carry
 *	  a credential); only the program's path, key ids and counts.
 *
 *-------------------------------------------------------------------------
 */
#include "ironwod.h"

#include <fcntl.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include "access/htup_details.h"
#include "access/xact.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

PG_FUNCTION_INFO_V1(ironwod_key_command_access);

/*
 * The program a shell command line runs: its first word, with simple quotes
 * taken off.  NULL for a line that starts with something else (a variable
 * assignment, a subshell), which the check then leaves to the probe.
 */
static char *
iw_command_program(const char *command)
{
	const char *p = command;
	StringInfoData word;

	while (*p == ' ' || *p == '\t')
		p++;
	initStringInfo(&word);
	if (*p == '\'' || *p == '"')
	{
		char		quote = *p++;

		while (*p && *p != quote)
			appendStringInfoChar(&word, *p++);
		if (*p != quote)
			return NULL;
	}
	else
	{
		while (*p && *p != ' ' && *p != '\t' && *p != ';' && *p != '|' && *p != '&' &&
			   *p != '<' && *p != '>')
			appendStringInfoChar(&word, *p++);
	}
	if (word.len == 0 || strchr(word.data, '=') != NULL || strchr(word.data, '$') != NULL ||
		strchr(word.data, '`') != NULL || word.data[0] == '(')
		return NULL;
	return word.data;
}

/* The OS user the server runs as, for messages. */
static const char *
iw_server_os_user(void)
{
	struct passwd *pw = getpwuid(geteuid());

	return pw ? pstrdup(pw->pw_name) : psprintf("uid %d", (int) geteuid());
}

/*
 * iw_check_key_command_access
 *		Can the server's OS user run ironwod.master_key_command at all?
 *
 * Looks only at the program the command names (never runs it, never reads
 * it): that it exists, that every directory above it can be searched, that it
 * is a file the server may execute (and read, for a script).  This is what a
 * key directory made by root (devkey.sh run as root leaves a root-owned 0700
 * directory) gets wrong, and what otherwise surfaces only at the first
 * ironwod_connect.  Returns true when nothing is wrong; message and hint name
 * the cause and the fix otherwise.  The command line itself is never quoted
 * (it may carry a credential); only the program's path is.
 */
static bool
iw_check_key_command_access(char **message, char **hint)
{
	const char *user = iw_server_os_user();
	char	   *program;
	char	   *path;
	struct stat st;

	*hint = NULL;
	if (ironwod_master_key_command == NULL || ironwod_master_key_command[0] == '\0')
	{
		*message = pstrdup("ironwod.master_key_command is not set, so no worker can open an API key");
		*hint = pstrdup("Set it in postgresql.conf to a command that prints \"<key id> <64 hex private key>\" lines (test/devkey.sh makes one for development), then reload.");
		return false;
	}
	program = iw_command_program(ironwod_master_key_command);
	if (program == NULL)
	{
		*message = pstrdup("ironwod.master_key_command does not start with a program path; only running it can tell whether it works");
		return true;
	}

	if (strchr(program, '/') == NULL)
	{
		/* a bare name: the shell searches PATH, as the server's environment has it */
		const char *env = getenv("PATH");
		char	   *dirs = pstrdup(env ? env : "");
		char	   *dir;
		char	   *save = NULL;

		path = NULL;
		for (dir = strtok_r(dirs, ":", &save); dir != NULL; dir = strtok_r(NULL, ":", &save))
		{
			char	   *candidate = psprintf("%s/%s", dir[0] ? dir : ".", program);

			if (access(candidate, X_OK) == 0 && stat(candidate, &st) == 0 && S_ISREG(st.st_mode))
			{
				path = candidate;
				break;
			}
		}
		if (path == NULL)
		{
			*message = psprintf("the program \"%s\" of ironwod.master_key_command is not in the server's PATH", program);
			*hint = pstrdup("Use an absolute path in ironwod.master_key_command.");
			return false;
		}
	}
	else
	{
		char	   *dir;
		char	   *slash;

		path = program;
		if (path[0] != '/')
		{
			*message = psprintf("ironwod.master_key_command names \"%s\", a path relative to the data directory", path);
			*hint = pstrdup("Use an absolute path.");
			return false;
		}
		/* every directory on the way must be searchable by the server */
		dir = pstrdup(path);
		for (slash = strchr(dir + 1, '/'); slash != NULL; slash = strchr(slash + 1, '/'))
		{
			*slash = '\0';
			if (stat(dir, &st) != 0)
			{
				*message = psprintf("directory \"%s\" of ironwod.master_key_command does not exist", dir);
				*hint = pstrdup("Point ironwod.master_key_command at the key command's absolute path.");
				return false;
			}
			if (access(dir, X_OK) != 0)
			{
				*message = psprintf("directory \"%s\" (owner uid %d, mode %04o) cannot be searched by the server's OS user \"%s\", so ironwod.master_key_command cannot run",
									dir, (int) st.st_uid, (int) (st.st_mode & 07777), user);
				*hint = psprintf("chown %s \"%s\" (or chmod o+x it); a directory made by test/devkey.sh as root is root's and mode 0700.",
								 user, dir);
				return false;
			}
			*slash = '/';
		}
	}

	if (stat(path, &st) != 0)
	{
		*message = psprintf("the program \"%s\" of ironwod.master_key_command does not exist", path);
		*hint = pstrdup("Point ironwod.master_key_command at the key command's absolute path.");
		return false;
	}
	if (!S_ISREG(st.st_mode))
	{
		*message = psprintf("\"%s\" of ironwod.master_key_command is not a regular file", path);
		return false;
	}
	if (access(path, X_OK) != 0)
	{
		*message = psprintf("\"%s\" (owner uid %d, mode %04o) is not executable by the server's OS user \"%s\"",
							path, (int) st.st_uid, (int) (st.st_mode & 07777), user);
		*hint = psprintf("chmod 0755 \"%s\", or chown it to %s.", path, user);
		return false;
	}
	/* a script must also be readable, or its interpreter cannot run it */
	if (access(path, R_OK) != 0)
	{
		*message = psprintf("\"%s\" (owner uid %d, mode %04o) is not readable by the server's OS user \"%s\"; a script cannot run that way",
							path, (int) st.st_uid, (int) (st.st_mode & 07777), user);
		*hint = psprintf("chown %s \"%s\" (keep it mode 0700 or 0755).", user, path);
		return false;
	}
	if (st.st_mode & (S_IWGRP | S_IWOTH))
	{
		*message = psprintf("\"%s\" (mode %04o) can be changed by other OS users, who could then make it print keys of their choosing",
							path, (int) (st.st_mode & 07777));
		*hint = psprintf("chmod go-w \"%s\".", path);
		return false;
	}
	*message = psprintf("\"%s\" can be run by the server's OS user \"%s\"", path, user);
	return true;
}

Datum
ironwod_key_command_access(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[3];
	bool		nulls[3] = {false, false, false};
	char	   *message;
	char	   *hint;
	bool		ok;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	ok = iw_check_key_command_access(&message, &hint);
	values[0] = BoolGetDatum(ok);
	values[1] = CStringGetTextDatum(message);
	if (hint)
		values[2] = CStringGetTextDatum(hint);
	else
		nulls[2] = true;
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

#define IW_MAX_INVENTORY 32

/*
 * Compare what the command prints with ironwod.master_keys: every registered
 * key must be printed, with the private half of the registered public key.
 * Only ids and counts go into the message.
 */
static IwVerdict
compare_with_registered(const IwKeyInfo *keys, int n, char *message, size_t len)
{
	StringInfoData problems;
	StringInfoData ids;
	uint64		r;
	uint64		registered;
	int			i;

	initStringInfo(&problems);
	initStringInfo(&ids);
	for (i = 0; i < Min(n, IW_MAX_INVENTORY); i++)
		appendStringInfo(&ids, "%s%s", i ? ", " : "", keys[i].key_id);

	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	SPI_connect();
	if (SPI_execute("SELECT key_id, public_key, is_active FROM ironwod.master_keys ORDER BY created_at",
					true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read ironwod.master_keys");
	registered = SPI_processed;
	for (r = 0; r < registered; r++)
	{
		HeapTuple	tup = SPI_tuptable->vals[r];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *id = SPI_getvalue(tup, desc, 1);
		bool		isnull;
		bytea	   *pub = DatumGetByteaPP(SPI_getbinval(tup, desc, 2, &isnull));
		bool		active = DatumGetBool(SPI_getbinval(tup, desc, 3, &isnull));
		const IwKeyInfo *found = NULL;

		for (i = 0; i < Min(n, IW_MAX_INVENTORY); i++)
			if (strcmp(keys[i].key_id, id) == 0)
				found = &keys[i];
		if (found == NULL)
			appendStringInfo(&problems, "%sregistered key \"%s\"%s is not printed",
							 problems.len ? "; " : "", id, active ? " (the active one)" : "");
		else if (VARSIZE_ANY_EXHDR(pub) != IW_X25519_KEYLEN ||
				 memcmp(VARDATA_ANY(pub), found->public_key, IW_X25519_KEYLEN) != 0)
			appendStringInfo(&problems, "%skey \"%s\" is not the private half of the registered public key",
							 problems.len ? "; " : "", id);
	}
	SPI_finish();
	PopActiveSnapshot();
	iw_exit_if_postmaster_dead();
	CommitTransactionCommand();

	if (problems.len > 0)
	{
		snprintf(message, len, "the command prints %d key%s (%s), but %s", n, n == 1 ? "" : "s",
				 ids.data, problems.data);
		return IW_VERDICT_KEYSTORE;
	}
	if (n == 0)
	{
		snprintf(message, len, "the command prints no key");
		return IW_VERDICT_KEYSTORE;
	}
	snprintf(message, len, "the command prints %d key%s (%s)%s", n, n == 1 ? "" : "s", ids.data,
			 registered > 0 ? "; every registered master key is among them and matches" :
			 "; no master key is registered yet");
	return IW_VERDICT_VALID;
}

/*
 * iw_check_master_keys
 *		In a validate worker: run the master key command and check its output.
 *
 * Returns IW_VERDICT_VALID when the command runs, prints only well-formed
 * lines and every registered master key matches; IW_VERDICT_KEYSTORE with
 * the reason otherwise (the command's own error: not runnable, failed, timed
 * out, malformed line ...).  Private keys exist only inside
 * iw_master_key_inventory() and are wiped there.
 */
IwVerdict
iw_check_master_keys(char *message, size_t len)
{
	IwKeyInfo  *keys = palloc0(sizeof(IwKeyInfo) * IW_MAX_INVENTORY);
	MemoryContext ctx = CurrentMemoryContext;
	volatile IwVerdict verdict = IW_VERDICT_KEYSTORE;

	PG_TRY();
	{
		int			n = iw_master_key_inventory(keys, IW_MAX_INVENTORY);

		verdict = compare_with_registered(keys, n, message, len);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(ctx);
		edata = CopyErrorData();
		FlushErrorState();
		AbortOutOfAnyTransaction();
		strlcpy(message, edata->message, len);
		verdict = IW_VERDICT_KEYSTORE;
	}
	PG_END_TRY();
	return verdict;
}
