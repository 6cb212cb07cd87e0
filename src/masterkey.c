/*-------------------------------------------------------------------------
 *
 * masterkey.c
 *	  Loading private master keys from ironwod.master_key_command.
 *
 * This file owns the only path by which a private master key enters a
 * PostgreSQL process.  Run workers call iw_load_master_key() with the key
 * id found in a sealed API key; it runs the superuser-only command named by
 * ironwod.master_key_command (a call to a KMS in production, "cat" of a key
 * file in development), reads its standard output and picks out that key.
 *
 * The output format is one key per line:
 *
 *	  <key id> <64 hex digits of the raw X25519 private key>
 *
 * Blank lines and lines starting with '#' are ignored.  Key ids are 1 to 64
 * printable ASCII characters without spaces, as in sealed values.
 *
 * The output is secret: it is read into one buffer that is wiped on every
 * path, stdio buffering is switched off so no copy stays in libc, and no
 * error message ever shows the output, a line of it, or the command itself
 * (which may carry a credential).
 *
 * IDENTIFICATION
 *	  src/masterkey.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "miscadmin.h"
#include "postmaster/postmaster.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"		/* ironwod.h uses LWLock, pg_atomic_uint32 */
#include "storage/pmsignal.h"

#include "ironwod.h"

/* the most output we accept from the command */
#define IW_MASTER_KEY_OUTPUT_MAX	(64 * 1024)

/* must agree with the key id rule in crypto.c */
#define IW_MASTER_KEY_ID_MAX		64

#define IW_MASTER_KEY_HEX_LEN		(2 * IW_X25519_KEYLEN)

typedef enum IwKeyLineKind
{
	IW_KEYLINE_SKIP,			/* blank line or comment */
	IW_KEYLINE_KEY,				/* a well-formed key line */
	IW_KEYLINE_MALFORMED
} IwKeyLineKind;

static int	iw_hex_value(char c);
static IwKeyLineKind iw_parse_key_line(const char *line, size_t len,
									   const char **id, size_t *id_len,
									   uint8 *key);
static size_t iw_read_command_output(char *buf, size_t bufsize);
static void iw_find_key(const char *buf, size_t len, const char *key_id,
						uint8 *private_key_out);


/*
 * iw_hex_value
 *		Value of one hexadecimal digit, or -1.
 *
 * Written out rather than using PostgreSQL's hex_decode, which raises an
 * error that quotes the offending character; here that character could be
 * part of a private key.
 */
static int
iw_hex_value(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/*
 * iw_parse_key_line
 *		Classify one line of the command's output and split a key line.
 *
 * Does not raise errors, so the caller decides what to report (only ever a
 * line number).  On IW_KEYLINE_KEY, *id points into the line and key holds
 * the decoded private key, which the caller must wipe.  Leading and
 * trailing blanks and a trailing CR are tolerated so that key files edited
 * on any platform work.
 */
static IwKeyLineKind
iw_parse_key_line(const char *line, size_t len, const char **id,
				  size_t *id_len, uint8 *key)
{
	size_t		i = 0;
	size_t		id_start;
	size_t		hex_start;

	if (len > 0 && line[len - 1] == '\r')
		len--;
	while (i < len && (line[i] == ' ' || line[i] == '\t'))
		i++;
	if (i == len || line[i] == '#')
		return IW_KEYLINE_SKIP;

	/* key id: printable ASCII, no spaces */
	id_start = i;
	while (i < len && (unsigned char) line[i] > 0x20 &&
		   (unsigned char) line[i] < 0x7f)
		i++;
	if (i == id_start || i - id_start > IW_MASTER_KEY_ID_MAX)
		return IW_KEYLINE_MALFORMED;
	*id = line + id_start;
	*id_len = i - id_start;

	/* at least one blank between the id and the key */
	if (i == len || (line[i] != ' ' && line[i] != '\t'))
		return IW_KEYLINE_MALFORMED;
	while (i < len && (line[i] == ' ' || line[i] == '\t'))
		i++;

	/* exactly 64 hex digits */
	hex_start = i;
	if (len - hex_start < IW_MASTER_KEY_HEX_LEN)
		return IW_KEYLINE_MALFORMED;
	for (int k = 0; k < IW_X25519_KEYLEN; k++)
	{
		int			hi = iw_hex_value(line[hex_start + 2 * k]);
		int			lo = iw_hex_value(line[hex_start + 2 * k + 1]);

		if (hi < 0 || lo < 0)
		{
			explicit_bzero(key, IW_X25519_KEYLEN);
			return IW_KEYLINE_MALFORMED;
		}
		key[k] = (uint8) ((hi << 4) | lo);
	}
	i = hex_start + IW_MASTER_KEY_HEX_LEN;

	/* nothing but blanks after the key */
	while (i < len && (line[i] == ' ' || line[i] == '\t'))
		i++;
	if (i != len)
	{
		explicit_bzero(key, IW_X25519_KEYLEN);
		return IW_KEYLINE_MALFORMED;
	}
	return IW_KEYLINE_KEY;
}

/*
 * iw_kill_command
 *		Kill the command's whole process group and reap its leader.
 *
 * Why the group: the command is usually a shell running a KMS client, and
 * killing only the shell would leave the client holding the pipe (and
 * perhaps a credential) for as long as it hangs.  The command was started
 * as the leader of its own group, so nothing else is hit.
 */
static void
iw_kill_command(pid_t pid)
{
	(void) kill(-pid, SIGKILL);
	while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
		;
}

/* Why the run fails: set before each error raised about the command itself. */
const char *iw_key_command_problem = NULL;

/*
 * iw_command_timed_out
 *		Kill the command and raise the timeout error.
 */
static void
iw_command_timed_out(pid_t pid)
{
	iw_kill_command(pid);
	iw_key_command_problem = "key_command_timeout";
	ereport(ERROR,
			(errcode(ERRCODE_SYSTEM_ERROR),
			 errmsg("ironwod.master_key_command did not finish within %d ms; its process group was killed",
					ironwod_master_key_command_timeout_ms),
			 errhint("The command must print the keys and exit without waiting for input; check the KMS it calls, or raise ironwod.master_key_command_timeout_ms.")));
}

/*
 * iw_command_wait
 *		Wait at most until the deadline for fd to be readable (fd < 0: only
 *		sleep a little), watching cancel, SIGTERM and the postmaster.
 *
 * Returns false when the deadline passed.  Whatever ends the wait early
 * kills the command first, so no path leaves it running: a cancel or die
 * request is then served here, and a dead postmaster ends the process, as
 * every other wait of a worker does.
 */
static bool
iw_command_wait(pid_t pid, int fd, TimestampTz deadline)
{
	struct pollfd pfd[2];
	long		ms = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline);
	int			nfds = 0;

	if (ms <= 0)
		return false;
	if (fd >= 0)
	{
		pfd[nfds].fd = fd;
		pfd[nfds].events = POLLIN;
		pfd[nfds].revents = 0;
		nfds++;
	}
	pfd[nfds].fd = postmaster_alive_fds[POSTMASTER_FD_WATCH];
	pfd[nfds].events = POLLIN;
	pfd[nfds].revents = 0;
	nfds++;

	/* short waits: a signal caught between two polls does not wake one */
	(void) poll(pfd, nfds, (int) Min(ms, fd >= 0 ? 100 : 10));

	if (ProcDiePending || QueryCancelPending || !PostmasterIsAlive())
	{
		if (fd >= 0)
			close(fd);
		iw_kill_command(pid);
		if (!PostmasterIsAlive())
			proc_exit(1);
		CHECK_FOR_INTERRUPTS();
		ereport(ERROR,
				(errcode(ERRCODE_QUERY_CANCELED),
				 errmsg("ironwod.master_key_command was interrupted")));
	}
	return true;
}

/*
 * iw_read_command_output
 *		Run ironwod.master_key_command and read its standard output.
 *
 * Reads at most IW_MASTER_KEY_OUTPUT_MAX bytes into buf (which must hold
 * one more byte, to detect overflow) and returns the length.
 *
 * The command runs under "/bin/sh -c" as the leader of a process group of
 * its own, and must print its keys and exit within
 * ironwod.master_key_command_timeout_ms; otherwise the group is killed and
 * the run fails with its own error code (key_command_timeout), instead of
 * holding a worker slot for as long as a KMS hangs.  No error is raised
 * while the command may still run: every path kills or reaps it first, so
 * no child or descriptor is left behind.
 */
static size_t
iw_read_command_output(char *buf, size_t bufsize)
{
	int			fds[2];
	pid_t		pid;
	size_t		used = 0;
	int			status = 0;
	TimestampTz deadline;

	iw_key_command_problem = "key_command_failed";
	if (pipe(fds) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_SYSTEM_ERROR),
				 errmsg("could not run ironwod.master_key_command: %m")));

	fflush(NULL);
	pid = fork();
	if (pid < 0)
	{
		int			save_errno = errno;

		close(fds[0]);
		close(fds[1]);
		errno = save_errno;
		ereport(ERROR,
				(errcode(ERRCODE_SYSTEM_ERROR),
				 errmsg("could not run ironwod.master_key_command: %m")));
	}
	if (pid == 0)
	{
		/* the child: its own process group, stdout into the pipe */
		(void) setpgid(0, 0);
		close(fds[0]);
		if (fds[1] != STDOUT_FILENO)
		{
			if (dup2(fds[1], STDOUT_FILENO) < 0)
				_exit(127);
			close(fds[1]);
		}
		/* PostgreSQL ignores SIGPIPE; a command cut off must terminate */
		pqsignal(SIGPIPE, SIG_DFL);
		execl("/bin/sh", "sh", "-c", ironwod_master_key_command, (char *) NULL);
		_exit(127);
	}

	/* both sides set the group, so it exists whichever runs first */
	(void) setpgid(pid, pid);
	close(fds[1]);
	/* never block in read: the waits below watch the deadline and signals */
	(void) fcntl(fds[0], F_SETFL, O_NONBLOCK);
	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
										   ironwod_master_key_command_timeout_ms);

	/* read to end of file, the output cap, or the deadline */
	for (;;)
	{
		ssize_t		n;

		if (used >= bufsize)
			break;
		n = read(fds[0], buf + used, bufsize - used);
		if (n > 0)
		{
			used += n;
			continue;
		}
		if (n == 0)
			break;
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN && errno != EWOULDBLOCK)
		{
			int			save_errno = errno;

			close(fds[0]);
			iw_kill_command(pid);
			errno = save_errno;
			ereport(ERROR,
					(errcode(ERRCODE_SYSTEM_ERROR),
					 errmsg("could not read the output of ironwod.master_key_command: %m")));
		}
		/* nothing to read yet */
		if (!iw_command_wait(pid, fds[0], deadline))
		{
			close(fds[0]);
			iw_command_timed_out(pid);
		}
	}
	close(fds[0]);

	if (used > IW_MASTER_KEY_OUTPUT_MAX)
	{
		iw_kill_command(pid);
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("ironwod.master_key_command printed more than %d bytes",
						IW_MASTER_KEY_OUTPUT_MAX),
				 errhint("The command should print only lines of the form \"<key id> <64 hex digits>\".")));
	}

	/* the output is complete; the command must now exit, also in time */
	for (;;)
	{
		pid_t		r = waitpid(pid, &status, WNOHANG);

		if (r == pid)
			break;
		if (r < 0 && errno != EINTR)
		{
			iw_kill_command(pid);
			ereport(ERROR,
					(errcode(ERRCODE_SYSTEM_ERROR),
					 errmsg("could not wait for ironwod.master_key_command: %m")));
		}
		if (!iw_command_wait(pid, -1, deadline))
			iw_command_timed_out(pid);
	}
	if (status != 0)
		ereport(ERROR,
				(errcode(ERRCODE_SYSTEM_ERROR),
				 errmsg("ironwod.master_key_command failed: %s",
						wait_result_to_str(status)),
				 errhint("Look for the command's own messages on its standard error, which goes to the server log.")));

	iw_key_command_problem = "key_command_output";
	return used;
}

/*
 * iw_find_key
 *		Validate the whole output and copy out the key named key_id.
 *
 * Every line is checked, not just the one we need, so a damaged key file
 * is noticed at once instead of the day its broken line is needed.  The
 * same id listed twice with different keys is refused as ambiguous.
 */
static void
iw_find_key(const char *buf, size_t len, const char *key_id,
			uint8 *private_key_out)
{
	size_t		want_len = strlen(key_id);
	size_t		pos = 0;
	int			lineno = 0;
	bool		found = false;
	uint8		key[IW_X25519_KEYLEN];
	uint8		match[IW_X25519_KEYLEN];

	while (pos < len)
	{
		const char *line = buf + pos;
		const char *nl = memchr(line, '\n', len - pos);
		size_t		line_len = nl ? (size_t) (nl - line) : len - pos;
		const char *id = NULL;
		size_t		id_len = 0;
		IwKeyLineKind kind;

		lineno++;
		pos += line_len + (nl ? 1 : 0);

		kind = iw_parse_key_line(line, line_len, &id, &id_len, key);
		if (kind == IW_KEYLINE_SKIP)
			continue;
		if (kind == IW_KEYLINE_MALFORMED)
		{
			explicit_bzero(key, sizeof(key));
			explicit_bzero(match, sizeof(match));
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("line %d of the output of ironwod.master_key_command is malformed",
							lineno),
					 errhint("Each line must be \"<key id> <64 hex digits>\", blank, or a comment starting with \"#\".")));
		}

		if (id_len == want_len && memcmp(id, key_id, id_len) == 0)
		{
			if (found && memcmp(match, key, sizeof(key)) != 0)
			{
				explicit_bzero(key, sizeof(key));
				explicit_bzero(match, sizeof(match));
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("master key \"%s\" is listed more than once with different values by ironwod.master_key_command",
								key_id),
						 errdetail("The second listing is on line %d.", lineno)));
			}
			memcpy(match, key, sizeof(key));
			found = true;
		}
		explicit_bzero(key, sizeof(key));
	}

	if (!found)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("master key \"%s\" is not available from ironwod.master_key_command",
						key_id),
				 errhint("The sealed API key was sealed to this master key id; make the command print that key, or rotate the API key to a current master key.")));

	memcpy(private_key_out, match, sizeof(match));
	explicit_bzero(match, sizeof(match));
}

/*
 * iw_load_master_key
 *		Fetch one private master key by id from the master key command.
 *
 * Called by run workers once per run, before they open the connection's
 * sealed API key.  The key is written to private_key_out (32 bytes); the
 * caller wipes it when done.  The command's output is wiped before this
 * function returns or raises any error.
 */
void
iw_load_master_key(const char *key_id, uint8 *private_key_out)
{
	char	   *buf;

	iw_key_command_problem = "key_command_failed";
	if (ironwod_master_key_command == NULL ||
		ironwod_master_key_command[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("ironwod.master_key_command is not set"),
				 errhint("Set it in postgresql.conf to a command that prints the master keys; see the README.")));
	if (key_id == NULL || key_id[0] == '\0')
		elog(ERROR, "no master key id given");

	/* one spare byte tells us the command printed too much */
	buf = palloc(IW_MASTER_KEY_OUTPUT_MAX + 1);

	PG_TRY();
	{
		size_t		len;

		len = iw_read_command_output(buf, IW_MASTER_KEY_OUTPUT_MAX + 1);
		iw_find_key(buf, len, key_id, private_key_out);
		/* what fails from here on is no fault of the command */
		iw_key_command_problem = NULL;
	}
	PG_FINALLY();
	{
		explicit_bzero(buf, IW_MASTER_KEY_OUTPUT_MAX + 1);
		pfree(buf);
	}
	PG_END_TRY();
}

/* Derive a key line's public half; the private key is wiped on every path. */
static void
iw_describe_key(uint8 *key, const char *id, size_t id_len, IwKeyInfo *out)
{
	PG_TRY();
	{
		iw_x25519_public_from_private(key, out->public_key);
	}
	PG_FINALLY();
	{
		explicit_bzero(key, IW_X25519_KEYLEN);
	}
	PG_END_TRY();
	memcpy(out->key_id, id, id_len);
	out->key_id[id_len] = '\0';
}

/* Validate every line, as iw_find_key does, and describe each key line. */
static int
iw_inventory_lines(const char *buf, size_t len, IwKeyInfo *keys, int max_keys)
{
	size_t		pos = 0;
	int			lineno = 0;
	int			n = 0;
	uint8		key[IW_X25519_KEYLEN];

	while (pos < len)
	{
		const char *line = buf + pos;
		const char *nl = memchr(line, '\n', len - pos);
		size_t		line_len = nl ? (size_t) (nl - line) : len - pos;
		const char *id = NULL;
		size_t		id_len = 0;
		IwKeyLineKind kind;

		lineno++;
		pos += line_len + (nl ? 1 : 0);
		kind = iw_parse_key_line(line, line_len, &id, &id_len, key);
		if (kind == IW_KEYLINE_SKIP)
			continue;
		if (kind == IW_KEYLINE_MALFORMED)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("line %d of the output of ironwod.master_key_command is malformed",
							lineno),
					 errhint("Each line must be \"<key id> <64 hex digits>\", blank, or a comment starting with \"#\".")));
		if (n < max_keys)
			iw_describe_key(key, id, id_len, &keys[n]);
		explicit_bzero(key, sizeof(key));
		n++;
	}
	return n;
}

/*
 * iw_master_key_inventory
 *		Run the master key command and describe what it prints, keeping no key.
 *
 * For the configuration checks: the whole output is validated as loading
 * does (same errors, same wiping), and for each key line its id and public
 * half are returned, the public half derived from the private key, which is
 * wiped at once.  Returns the number of keys printed (at most max_keys are
 * described).
 */
int
iw_master_key_inventory(IwKeyInfo *keys, int max_keys)
{
	char	   *buf;
	volatile int n = 0;

	if (ironwod_master_key_command == NULL ||
		ironwod_master_key_command[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("ironwod.master_key_command is not set")));

	buf = palloc(IW_MASTER_KEY_OUTPUT_MAX + 1);
	PG_TRY();
	{
		size_t		len = iw_read_command_output(buf, IW_MASTER_KEY_OUTPUT_MAX + 1);

		n = iw_inventory_lines(buf, len, keys, max_keys);
	}
	PG_FINALLY();
	{
		explicit_bzero(buf, IW_MASTER_KEY_OUTPUT_MAX + 1);
		pfree(buf);
	}
	PG_END_TRY();
	return n;
}
