/*-------------------------------------------------------------------------
 *
 * page.c
 *	  One Wodify response page, split into its records: every record becomes
 *	  its own jsonb with its id, its source timestamps and its payload hash,
 *	  in one pass of PostgreSQL's JSON parser over the body.  No SPI here.
 *
 *	  The page is parsed once, with semantic actions that build each element
 *	  of the records array as a separate jsonb value (what jsonb_in would do
 *	  for the whole page, minus building the page itself).  The payload hash
 *	  is SHA-256 of the record's jsonb binary, so it needs no re-serialising:
 *	  jsonb's binary form is canonical (keys sorted, duplicates removed), so
 *	  the same vendor record gives the same hash in every run, and a stored
 *	  payload can be re-hashed from the table (ironwod.payload_hash).  The
 *	  hash leaves out the entity's volatile fields (ironwod.entities), which
 *	  the vendor recomputes daily without any change to the record (a
 *	  client's days since the last attendance): a record that differs only
 *	  there is the version already stored, and only its last sighting moves.
 *
 *	  Poison records.  A record PostgreSQL cannot store (a \u0000 escape,
 *	  which jsonb rejects, a broken surrogate pair, invalid UTF-8, a number
 *	  numeric cannot hold, more than ironwod.max_record_bytes, no id, not an
 *	  object) must not stop the rest of its page.  The parser reports those
 *	  as error codes, never ereports, but it cannot resume after one, so a
 *	  page that fails the fast pass is parsed again: first for its structure
 *	  only, over a copy in which every \u escape is made harmless (so the
 *	  lexer finds every record's boundaries and id), then record by record
 *	  from the original bytes.  Each record either lands or carries the
 *	  reason it goes to ironwod.quarantined_records.  Numbers are checked
 *	  before numeric_in sees them, and a record's size is bounded while it
 *	  is built, so nothing here ereports because of what the vendor sent.
 *
 *-------------------------------------------------------------------------
 */
#include "ironwod.h"

#include <openssl/evp.h>

#include "common/jsonapi.h"
#include "common/md5.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/numeric.h"

typedef enum TopField
{
	TF_OTHER,
	TF_RECORDS,
	TF_PAGINATION,
	TF_HTTPCODE,
	TF_ERRORCODE,
	TF_DEVMSG
} TopField;

typedef enum PagField
{
	PF_OTHER,
	PF_PAGE,
	PF_HAS_MORE
} PagField;

typedef struct PageParse
{
	JsonLexContext *lex;
	const IwEntitySpec *spec;
	IwPage	   *page;
	bool		build;			/* build jsonb; false: structure and ids only */
	int			depth;			/* containers open */
	bool		top_is_object;
	TopField	top_field;
	PagField	pag_field;
	bool		in_records;		/* inside the records array */
	int			max_records;
	/* the record being parsed */
	IwRecord   *rec;
	bool		in_record;
	int			rec_depth;		/* depth at which the record's value starts */
	bool		rec_first;		/* nothing of the record seen yet */
	bool		rec_is_object;
	bool		skip;			/* poison already: stop building */
	bool		id_next;		/* the next scalar is the record's id */
	bool		id_tok;			/* the record's last id key had a scalar that
								 * id_from_text took: id_tok_val */
	int64		id_tok_val;
	int			id_len;			/* strlen(spec->id_field) */
	int			tok_len;		/* length of the string the next action gets,
								 * when the fast lexer knows it; else -1 */
	Size		est;			/* upper bound of the record's jsonb size */
	JsonbParseState *pstate;
	JsonbValue *root;
	MemoryContext page_cxt;
	MemoryContext rec_cxt;
} PageParse;

static EVP_MD_CTX *sha_ctx = NULL;
static EVP_MD *sha256_md = NULL;

/* Reasons a record is quarantined (ironwod.quarantined_records.reason). */
#define POISON_NUL			"nul"
#define POISON_ESCAPE		"bad_escape"
#define POISON_UTF8			"invalid_utf8"
#define POISON_NUMBER		"bad_number"
#define POISON_TOO_LARGE	"too_large"
#define POISON_NO_ID		"no_id"
#define POISON_NOT_OBJECT	"not_object"

static void
poison(PageParse *pp, const char *reason, const char *detail)
{
	if (pp->rec->fault == NULL)
	{
		pp->rec->fault = reason;
		pp->rec->detail = detail;
	}
	pp->skip = true;
}

/*
 * Could numeric_in take this JSON number token without an error?  numeric
 * holds at most about 131000 digits before the point and 16383 after it; a
 * number near or past that is poison, checked here because numeric_in would
 * ereport.  Conservative: it may refuse what numeric would just hold.
 */
static bool
number_fits_numeric(const char *s)
{
	const char *p = s;
	long		int_digits = 0;
	long		frac_digits = 0;
	long		exponent = 0;
	bool		negative_exp = false;

	if (*p == '-')
		p++;
	while (*p >= '0' && *p <= '9')
		int_digits++, p++;
	if (*p == '.')
	{
		p++;
		while (*p >= '0' && *p <= '9')
			frac_digits++, p++;
	}
	if (*p == 'e' || *p == 'E')
	{
		p++;
		if (*p == '+' || *p == '-')
			negative_exp = (*p++ == '-');
		while (*p >= '0' && *p <= '9')
		{
			if (exponent < 10000000)
				exponent = exponent * 10 + (*p - '0');
			p++;
		}
	}
	if (negative_exp)
		exponent = -exponent;
	return exponent > -100000 && exponent < 100000 &&
		int_digits + exponent <= 130000 && frac_digits - exponent <= 16000;
}

/*
 * A JSON number token as numeric.  Most are ids and counts, plain integers of
 * up to 18 digits: int64_to_numeric gives them the very value (and bytes, so
 * the payload hash) numeric_in would, without its general parsing.
 */
static Numeric
number_value(const char *token)
{
	const char *p = token + (token[0] == '-');
	int64		v = 0;
	int			n = 0;

	for (; p[n] >= '0' && p[n] <= '9'; n++)
		if (n < 18)
			v = v * 10 + (p[n] - '0');
	if (p[n] == '\0' && n >= 1 && n <= 18)
		return int64_to_numeric(token[0] == '-' ? -v : v);
	return DatumGetNumeric(DirectFunctionCall3(numeric_in, CStringGetDatum(token),
											   ObjectIdGetDatum(InvalidOid),
											   Int32GetDatum(-1)));
}

/*
 * Add to the record's size bound; past ironwod.max_record_bytes the record is
 * poison and is no longer built.  The bound (16 bytes of header per value
 * plus its text) stays above the jsonb size, so no jsonb size limit is ever
 * reached while building.
 */
static void
grow_size(PageParse *pp, Size n)
{
	pp->est += n;
	if (pp->est > (Size) ironwod_max_record_bytes)
		poison(pp, POISON_TOO_LARGE, "the record exceeds ironwod.max_record_bytes");
}

static void
push(PageParse *pp, JsonbIteratorToken tok, JsonbValue *v)
{
	JsonbValue *res = pushJsonbValue(&pp->pstate, tok, v);

	if (pp->pstate == NULL)
		pp->root = res;
}

/* The first event of a record says whether it is an object. */
static void
record_event(PageParse *pp, bool object_start)
{
	if (pp->rec_first)
	{
		pp->rec_first = false;
		pp->rec_is_object = object_start;
		if (!object_start)
			poison(pp, POISON_NOT_OBJECT, "the record is not a JSON object");
	}
}

static void
begin_record(PageParse *pp)
{
	IwPage	   *page = pp->page;

	if (page->n_records == pp->max_records)
	{
		pp->max_records = Max(16, pp->max_records * 2);
		page->records = page->records == NULL
			? palloc(sizeof(IwRecord) * pp->max_records)
			: repalloc(page->records, sizeof(IwRecord) * pp->max_records);
	}
	pp->rec = &page->records[page->n_records++];
	memset(pp->rec, 0, sizeof(IwRecord));
	pp->rec->raw = pp->lex->token_start;
	pp->in_record = true;
	pp->rec_depth = pp->depth;
	pp->rec_first = true;
	pp->rec_is_object = false;
	pp->skip = !pp->build;
	pp->id_next = false;
	pp->id_tok = false;
	pp->est = 0;
	pp->pstate = NULL;
	pp->root = NULL;
	if (pp->build)
		MemoryContextSwitchTo(pp->rec_cxt);
}

/* Value at a path of nested object keys, as text, when it is a string. */
static JsonbValue *
string_at(JsonbContainer *c, char **path, int n, JsonbValue *buf)
{
	JsonbValue *v = NULL;

	for (int i = 0; i < n; i++)
	{
		v = getKeyJsonValueFromContainer(c, path[i], strlen(path[i]), buf);
		if (v == NULL)
			return NULL;
		if (i < n - 1)
		{
			if (v->type != jbvBinary || !JsonContainerIsObject(v->val.binary.data))
				return NULL;
			c = v->val.binary.data;
		}
	}
	return (v != NULL && v->type == jbvString) ? v : NULL;
}

static bool
ts_at(JsonbContainer *c, char **path, int n, TimestampTz *ts)
{
	JsonbValue	buf;
	JsonbValue *v = string_at(c, path, n, &buf);

	return v != NULL && iw_parse_vendor_ts(v->val.string.val, v->val.string.len, ts);
}

/* Ids are integers, sent as numbers or, by a few endpoints, as digit strings. */
static bool
id_from_text(const char *s, int len, int64 *id)
{
	int64		v = 0;

	if (len < 1 || len > 18)
		return false;
	for (int i = 0; i < len; i++)
	{
		if (s[i] < '0' || s[i] > '9')
			return false;
		v = v * 10 + (s[i] - '0');
	}
	*id = v;
	return true;
}

void
iw_payload_hash(const Jsonb *jb, uint8 *out)
{
	unsigned int len = 0;

	if (sha_ctx == NULL)
	{
		sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
		sha_ctx = EVP_MD_CTX_new();
		if (sha256_md == NULL || sha_ctx == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_SYSTEM_ERROR),
					 errmsg("could not set up SHA-256")));
	}
	if (EVP_DigestInit_ex(sha_ctx, sha256_md, NULL) != 1 ||
		EVP_DigestUpdate(sha_ctx, VARDATA(jb), VARSIZE(jb) - VARHDRSZ) != 1 ||
		EVP_DigestFinal_ex(sha_ctx, out, &len) != 1 || len != IW_PAYLOAD_HASH_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_SYSTEM_ERROR),
				 errmsg("could not compute a SHA-256 digest")));
}

/*
 * The payload hash landing stores for a record of the entity: that of its
 * jsonb without the volatile top-level keys (jsonb's own "-" operator, so
 * ironwod.payload_hash(entity, payload) recomputes it in SQL).
 */
static void
record_hash(const IwEntitySpec *spec, Jsonb *jb, uint8 *out)
{
	Jsonb	   *stable;

	if (spec->n_volatile == 0)
	{
		iw_payload_hash(jb, out);
		return;
	}
	stable = DatumGetJsonbP(DirectFunctionCall2(jsonb_delete_array, JsonbPGetDatum(jb),
												spec->volatile_fields));
	iw_payload_hash(stable, out);
	if (stable != jb)
		pfree(stable);
}

/* A record was built: make it a jsonb and read its id, timestamps and hash. */
static void
finish_record(PageParse *pp, IwRecord *rec)
{
	const IwEntitySpec *spec = pp->spec;
	JsonbValue	buf;
	JsonbValue *v;
	Jsonb	   *jb;

	if (rec->fault == NULL && (!pp->rec_is_object || pp->root == NULL))
		poison(pp, POISON_NOT_OBJECT, "the record is not a JSON object");
	if (rec->fault == NULL && rec->raw_len > ironwod_max_record_bytes)
		poison(pp, POISON_TOO_LARGE, "the record exceeds ironwod.max_record_bytes");
	if (rec->fault != NULL)
		return;

	jb = JsonbValueToJsonb(pp->root);
	rec->has_id = false;

	/*
	 * The id as the lexer saw it, when the record's last id key (the one
	 * jsonb keeps) had a number or string that id_from_text took: a number
	 * token of at most 18 digits (JSON allows no leading zeros) is what
	 * numeric_out gives back for it, and a string is the jsonb's string.
	 * Otherwise (an exponent, a fraction, not a scalar) the jsonb decides.
	 */
	if (pp->id_tok)
	{
		rec->id = pp->id_tok_val;
		rec->has_id = true;
		v = NULL;
	}
	else
		v = getKeyJsonValueFromContainer(&jb->root, spec->id_field, pp->id_len, &buf);
	if (v != NULL && v->type == jbvNumeric)
	{
		char	   *t = DatumGetCString(DirectFunctionCall1(numeric_out,
															NumericGetDatum(v->val.numeric)));

		rec->has_id = id_from_text(t, strlen(t), &rec->id);
		pfree(t);
	}
	else if (v != NULL && v->type == jbvString)
		rec->has_id = id_from_text(v->val.string.val, v->val.string.len, &rec->id);
	if (!rec->has_id)
	{
		pfree(jb);
		rec->fault = POISON_NO_ID;
		rec->detail = psprintf("the record has no numeric \"%s\"", spec->id_field);
		return;
	}
	rec->payload = jb;
	record_hash(spec, jb, rec->hash);
	rec->has_updated_at = ts_at(&jb->root, spec->updated_path, spec->n_updated, &rec->updated_at) ||
		ts_at(&jb->root, spec->created_path, spec->n_created, &rec->updated_at);
	if (ts_at(&jb->root, spec->watermark_path, spec->n_watermark, &rec->watermark))
		rec->has_watermark = true;
}

static void
end_record(PageParse *pp)
{
	IwRecord   *rec = pp->rec;

	rec->raw_len = pp->lex->prev_token_terminator - rec->raw;
	pp->in_record = false;
	if (pp->build)
	{
		MemoryContextSwitchTo(pp->page_cxt);
		finish_record(pp, rec);
		MemoryContextReset(pp->rec_cxt);
	}
}

/*
 * An object's keys in jsonb's order: shorter first, then bytewise; of keys
 * given twice the last one first, which is the one jsonb keeps.  That is
 * lengthCompareJsonbPair's order, which pushJsonbValue sorts an object's keys
 * in when it ends, with qsort_arg and that comparator called through a
 * pointer: some 7 % of the worker's CPU while landing.  Sorted here with the comparison
 * inlined, the keys reach it in order, and its sort finds nothing to do but
 * check so (and note the duplicates it removes).  The order is total, so the
 * result, and the jsonb built from it, is the same.
 */
static inline int
pair_cmp(const JsonbPair *a, const JsonbPair *b)
{
	int			res;

	if (a->key.val.string.len != b->key.val.string.len)
		return a->key.val.string.len > b->key.val.string.len ? 1 : -1;
	res = memcmp(a->key.val.string.val, b->key.val.string.val, a->key.val.string.len);
	if (res != 0)
		return res;
	return a->order > b->order ? -1 : 1;
}

#define ST_SORT sort_pairs
#define ST_ELEMENT_TYPE JsonbPair
#define ST_COMPARE(a, b) pair_cmp(a, b)
#define ST_SCOPE static
#define ST_DEFINE
#include "lib/sort_template.h"

/* ---- semantic actions (PostgreSQL 15 signatures) ---- */

static void
pp_object_start(void *state)
{
	PageParse  *pp = state;

	pp->depth++;
	if (pp->in_record)
	{
		record_event(pp, pp->depth == pp->rec_depth + 1);
		pp->id_next = false;
		if (!pp->skip)
			grow_size(pp, 16);
		if (!pp->skip)
			push(pp, WJB_BEGIN_OBJECT, NULL);
	}
	else if (pp->depth == 1)
		pp->top_is_object = true;
}

static void
pp_object_end(void *state)
{
	PageParse  *pp = state;

	if (pp->in_record && !pp->skip)
	{
		JsonbValue *object = &pp->pstate->contVal;

		/* sorted here (pair_cmp), jsonb's own sort only checks it is */
		if (object->val.object.nPairs > 1)
			sort_pairs(object->val.object.pairs, object->val.object.nPairs);
		push(pp, WJB_END_OBJECT, NULL);
	}
	pp->depth--;
}

static void
pp_array_start(void *state)
{
	PageParse  *pp = state;

	pp->depth++;
	if (pp->in_record)
	{
		record_event(pp, false);
		pp->id_next = false;
		if (!pp->skip)
			grow_size(pp, 16);
		if (!pp->skip)
			push(pp, WJB_BEGIN_ARRAY, NULL);
	}
	else if (pp->depth == 2 && pp->top_field == TF_RECORDS)
	{
		pp->in_records = true;
		pp->page->has_records = true;
	}
}

static void
pp_array_end(void *state)
{
	PageParse  *pp = state;

	if (pp->in_record && !pp->skip)
		push(pp, WJB_END_ARRAY, NULL);
	else if (!pp->in_record && pp->depth == 2)
		pp->in_records = false;
	pp->depth--;
}

static void
pp_field_start(void *state, char *fname, bool isnull)
{
	PageParse  *pp = state;
	int			flen = pp->tok_len >= 0 ? pp->tok_len : (int) strlen(fname);

	pp->tok_len = -1;
	if (pp->in_record)
	{
		pp->id_next = (pp->depth == pp->rec_depth + 1 && flen == pp->id_len &&
					   memcmp(fname, pp->spec->id_field, flen) == 0);
		if (pp->id_next)
			pp->id_tok = false;
		if (!pp->skip)
		{
			JsonbValue	v;

			v.type = jbvString;
			v.val.string.len = flen;
			v.val.string.val = fname;
			grow_size(pp, 16 + v.val.string.len);
			if (!pp->skip)
				push(pp, WJB_KEY, &v);
		}
		return;
	}
	if (pp->depth == 1)
	{
		pp->top_field =
			strcmp(fname, pp->spec->records_key) == 0 ? TF_RECORDS :
			strcmp(fname, "pagination") == 0 ? TF_PAGINATION :
			strcmp(fname, "HTTPCode") == 0 ? TF_HTTPCODE :
			strcmp(fname, "ErrorCode") == 0 ? TF_ERRORCODE :
			strcmp(fname, "DeveloperMessage") == 0 ? TF_DEVMSG : TF_OTHER;
		if (pp->top_field == TF_HTTPCODE)
		{
			/* an HTTPCode that is not three digits is a server error */
			pp->page->is_envelope = true;
			pp->page->http_code = 500;
		}
	}
	else if (pp->depth == 2 && pp->top_field == TF_PAGINATION)
		pp->pag_field = strcmp(fname, "page") == 0 ? PF_PAGE :
			strcmp(fname, "has_more") == 0 ? PF_HAS_MORE : PF_OTHER;
}

static void
pp_element_start(void *state, bool isnull)
{
	PageParse  *pp = state;

	if (!pp->in_record && pp->in_records && pp->depth == 2)
		begin_record(pp);
}

static void
pp_element_end(void *state, bool isnull)
{
	PageParse  *pp = state;

	if (pp->in_record && pp->depth == 2 && pp->rec_depth == 2)
		end_record(pp);
}

static void
top_scalar(PageParse *pp, char *token, JsonTokenType type)
{
	IwPage	   *page = pp->page;

	if (pp->depth == 1)
	{
		if (token == NULL)
			return;
		if (pp->top_field == TF_HTTPCODE)
			page->http_code = (strlen(token) == 3 && isdigit((unsigned char) token[0]) &&
							   isdigit((unsigned char) token[1]) &&
							   isdigit((unsigned char) token[2])) ? atoi(token) : 500;
		else if (pp->top_field == TF_ERRORCODE)
			page->error_code = MemoryContextStrdup(pp->page_cxt, token);
		else if (pp->top_field == TF_DEVMSG)
			page->developer_message = MemoryContextStrdup(pp->page_cxt, token);
	}
	else if (pp->depth == 2 && pp->top_field == TF_PAGINATION && token != NULL)
	{
		if (pp->pag_field == PF_PAGE)
		{
			bool		digits = token[0] != '\0';

			for (char *c = token; *c; c++)
				digits = digits && *c >= '0' && *c <= '9';
			page->page_number = digits ? MemoryContextStrdup(pp->page_cxt, token) : NULL;
		}
		else if (pp->pag_field == PF_HAS_MORE)
		{
			bool		b;

			page->has_more = (type != JSON_TOKEN_NULL && parse_bool(token, &b)) ? (b ? 1 : 0) : -1;
		}
	}
}

static void
pp_scalar(void *state, char *token, JsonTokenType type)
{
	PageParse  *pp = state;
	JsonbValue	v;
	int			len = pp->tok_len;

	pp->tok_len = -1;
	if (!pp->in_record)
	{
		top_scalar(pp, token, type);
		return;
	}
	if (len < 0 && token != NULL)
		len = strlen(token);
	record_event(pp, false);
	if (pp->id_next && pp->depth == pp->rec_depth + 1 && token != NULL &&
		(type == JSON_TOKEN_NUMBER || type == JSON_TOKEN_STRING))
	{
		pp->rec->has_id = id_from_text(token, len, &pp->rec->id);
		pp->id_tok = pp->rec->has_id;
		pp->id_tok_val = pp->rec->id;
	}
	pp->id_next = false;
	if (pp->skip)
		return;
	switch (type)
	{
		case JSON_TOKEN_STRING:
			v.type = jbvString;
			v.val.string.len = len;
			v.val.string.val = token;
			grow_size(pp, 16 + v.val.string.len);
			break;
		case JSON_TOKEN_NUMBER:
			if (!number_fits_numeric(token))
			{
				poison(pp, POISON_NUMBER, "the record has a number PostgreSQL's numeric cannot hold");
				return;
			}
			grow_size(pp, 16 + len);
			if (pp->skip)
				return;
			v.type = jbvNumeric;
			v.val.numeric = number_value(token);
			break;
		case JSON_TOKEN_TRUE:
		case JSON_TOKEN_FALSE:
			v.type = jbvBool;
			v.val.boolean = (type == JSON_TOKEN_TRUE);
			grow_size(pp, 16);
			break;
		default:
			v.type = jbvNull;
			grow_size(pp, 16);
			break;
	}
	if (!pp->skip)
		push(pp, pp->pstate->contVal.type == jbvArray ? WJB_ELEM : WJB_VALUE, &v);
}

/*
 * ---- the fast lexer ----
 *
 * PostgreSQL 15's JSON lexer appends every character of every string to a
 * StringInfo one call at a time, and its recursive descent goes through
 * lex_peek/lex_expect for each token: lexing was about 15 % of a backfill's
 * landing CPU (perf), more than the jsonb it builds.  This is the same
 * grammar and the same semantic actions, called in the same order with the
 * same arguments, over a lexer that copies a string's plain bytes at once.
 * It takes the JSON Wodify sends (escapes, \u escapes and surrogate pairs
 * included, in a UTF-8 database) and gives up on anything else: bytes below
 * 0x20 in a string, \u0000, a lone surrogate, an unknown escape, a malformed
 * number or literal, nesting deeper than FP_MAX_DEPTH, anything that is not
 * JSON.  Giving up costs a page a second parse with PostgreSQL's parser
 * (iw_parse_page), which then decides as before; so this lexer accepts
 * nothing PostgreSQL's would reject, and for what it accepts the semantic
 * actions see the tokens PostgreSQL's would hand them (de-escaped strings,
 * the number's text, "true", "false", "null"), and the record's raw bytes
 * run from its first token to the end of its last.
 */
#define FP_MAX_DEPTH 64

typedef struct FastParse
{
	PageParse  *pp;
	const char *p;
	const char *end;
	int			depth;
} FastParse;

/* What PostgreSQL's lexer counts as part of a word (JSON_ALPHANUMERIC_CHAR). */
#define FP_WORD_CHAR(c) \
	(((c) >= 'a' && (c) <= 'z') || ((c) >= 'A' && (c) <= 'Z') || \
	 ((c) >= '0' && (c) <= '9') || (c) == '_' || IS_HIGHBIT_SET(c))

static bool fp_value(FastParse *fp);

static inline void
fp_skip_space(FastParse *fp)
{
	while (fp->p < fp->end &&
		   (*fp->p == ' ' || *fp->p == '\n' || *fp->p == '\r' || *fp->p == '\t'))
		fp->p++;
}

static inline int
fp_hex4(const char *s)
{
	int			v = 0;

	for (int i = 0; i < 4; i++)
	{
		char		c = s[i];

		v <<= 4;
		if (c >= '0' && c <= '9')
			v |= c - '0';
		else if (c >= 'a' && c <= 'f')
			v |= c - 'a' + 10;
		else if (c >= 'A' && c <= 'F')
			v |= c - 'A' + 10;
		else
			return -1;
	}
	return v;
}

/*
 * The string token at fp->p (its opening quote), de-escaped into a palloc'd
 * NUL-terminated copy, as PostgreSQL's parser pstrdup's its lexer's string.
 * NULL to give up.
 */
static char *
fp_string(FastParse *fp, int *len)
{
	const char *s = fp->p + 1;
	const char *q = s;
	const char *close;
	char	   *out;
	char	   *o;

	while (q < fp->end && *q != '"' && *q != '\\' && (unsigned char) *q >= 0x20)
		q++;
	if (q >= fp->end || (unsigned char) *q < 0x20)
		return NULL;
	if (*q == '"')
	{
		out = palloc(q - s + 1);
		memcpy(out, s, q - s);
		out[q - s] = '\0';
		*len = q - s;
		fp->p = q + 1;
		return out;
	}
	/* escapes: no escape makes its bytes longer, so the token's length bounds the copy */
	close = q;
	while (close < fp->end && *close != '"')
		close += (*close == '\\') ? 2 : 1;
	if (close >= fp->end)
		return NULL;
	out = palloc(close - s + 1);
	memcpy(out, s, q - s);
	o = out + (q - s);
	while (q < close)
	{
		if ((unsigned char) *q < 0x20)
			return NULL;
		if (*q != '\\')
		{
			*o++ = *q++;
			continue;
		}
		switch (q[1])
		{
			case '"':
			case '\\':
			case '/':
				*o++ = q[1];
				break;
			case 'b':
				*o++ = '\b';
				break;
			case 'f':
				*o++ = '\f';
				break;
			case 'n':
				*o++ = '\n';
				break;
			case 'r':
				*o++ = '\r';
				break;
			case 't':
				*o++ = '\t';
				break;
			case 'u':
				{
					int			ch;

					if (close - q < 6 || (ch = fp_hex4(q + 2)) < 0)
						return NULL;
					if (ch >= 0xD800 && ch <= 0xDBFF)
					{
						int			lo;

						/* a high surrogate: its low half must follow at once */
						if (close - q < 12 || q[6] != '\\' || q[7] != 'u' ||
							(lo = fp_hex4(q + 8)) < 0xDC00 || lo > 0xDFFF)
							return NULL;
						ch = 0x10000 + ((ch & 0x3FF) << 10) + (lo & 0x3FF);
						q += 6;
					}
					else if ((ch >= 0xDC00 && ch <= 0xDFFF) || ch == 0)
						return NULL;
					unicode_to_utf8((pg_wchar) ch, (unsigned char *) o);
					o += pg_utf_mblen((unsigned char *) o);
					q += 4;
				}
				break;
			default:
				return NULL;
		}
		q += 2;
	}
	*o = '\0';
	*len = o - out;
	fp->p = close + 1;
	return out;
}

/* A number, true, false or null at fp->p, as the scalar action gets it. */
static bool
fp_scalar(FastParse *fp)
{
	const char *s = fp->p;
	const char *q = s;
	JsonTokenType type;
	char	   *token;

	if (*q == '-' || (*q >= '0' && *q <= '9'))
	{
		if (*q == '-')
			q++;
		if (q < fp->end && *q == '0')
			q++;
		else if (q < fp->end && *q >= '1' && *q <= '9')
			while (q < fp->end && *q >= '0' && *q <= '9')
				q++;
		else
			return false;
		if (q < fp->end && *q == '.')
		{
			q++;
			if (q >= fp->end || *q < '0' || *q > '9')
				return false;
			while (q < fp->end && *q >= '0' && *q <= '9')
				q++;
		}
		if (q < fp->end && (*q == 'e' || *q == 'E'))
		{
			q++;
			if (q < fp->end && (*q == '+' || *q == '-'))
				q++;
			if (q >= fp->end || *q < '0' || *q > '9')
				return false;
			while (q < fp->end && *q >= '0' && *q <= '9')
				q++;
		}
		type = JSON_TOKEN_NUMBER;
	}
	else
	{
		while (q < fp->end && FP_WORD_CHAR(*q))
			q++;
		if (q - s == 4 && memcmp(s, "true", 4) == 0)
			type = JSON_TOKEN_TRUE;
		else if (q - s == 5 && memcmp(s, "false", 5) == 0)
			type = JSON_TOKEN_FALSE;
		else if (q - s == 4 && memcmp(s, "null", 4) == 0)
			type = JSON_TOKEN_NULL;
		else
			return false;
	}
	if (q < fp->end && FP_WORD_CHAR(*q))
		return false;
	token = palloc(q - s + 1);
	memcpy(token, s, q - s);
	token[q - s] = '\0';
	fp->p = q;
	fp->pp->lex->prev_token_terminator = (char *) q;
	fp->pp->tok_len = q - s;
	pp_scalar(fp->pp, token, type);
	return true;
}

static inline bool
fp_next_is_null(FastParse *fp)
{
	return fp->end - fp->p >= 4 && memcmp(fp->p, "null", 4) == 0 &&
		(fp->end - fp->p == 4 || !FP_WORD_CHAR(fp->p[4]));
}

static bool
fp_object(FastParse *fp)
{
	pp_object_start(fp->pp);
	fp->p++;
	fp_skip_space(fp);
	if (fp->p < fp->end && *fp->p == '}')
		fp->p++;
	else
	{
		for (;;)
		{
			char	   *fname;
			int			flen;

			if (fp->p >= fp->end || *fp->p != '"' || (fname = fp_string(fp, &flen)) == NULL)
				return false;
			fp_skip_space(fp);
			if (fp->p >= fp->end || *fp->p != ':')
				return false;
			fp->p++;
			fp_skip_space(fp);
			fp->pp->tok_len = flen;
			pp_field_start(fp->pp, fname, fp_next_is_null(fp));
			if (!fp_value(fp))
				return false;
			fp_skip_space(fp);
			if (fp->p < fp->end && *fp->p == ',')
			{
				fp->p++;
				fp_skip_space(fp);
				continue;
			}
			if (fp->p < fp->end && *fp->p == '}')
			{
				fp->p++;
				break;
			}
			return false;
		}
	}
	fp->pp->lex->prev_token_terminator = (char *) fp->p;
	pp_object_end(fp->pp);
	return true;
}

static bool
fp_array(FastParse *fp)
{
	pp_array_start(fp->pp);
	fp->p++;
	fp_skip_space(fp);
	if (fp->p < fp->end && *fp->p == ']')
		fp->p++;
	else
	{
		for (;;)
		{
			bool		isnull = fp_next_is_null(fp);

			fp->pp->lex->token_start = (char *) fp->p;
			pp_element_start(fp->pp, isnull);
			if (!fp_value(fp))
				return false;
			/* the element ends with its last token (end_record's raw bytes) */
			fp->pp->lex->prev_token_terminator = (char *) fp->p;
			pp_element_end(fp->pp, isnull);
			fp_skip_space(fp);
			if (fp->p < fp->end && *fp->p == ',')
			{
				fp->p++;
				fp_skip_space(fp);
				continue;
			}
			if (fp->p < fp->end && *fp->p == ']')
			{
				fp->p++;
				break;
			}
			return false;
		}
	}
	fp->pp->lex->prev_token_terminator = (char *) fp->p;
	pp_array_end(fp->pp);
	return true;
}

static bool
fp_value(FastParse *fp)
{
	bool		ok;
	char	   *s;
	int			len;

	if (fp->p >= fp->end)
		return false;
	switch (*fp->p)
	{
		case '{':
		case '[':
			if (++fp->depth > FP_MAX_DEPTH)
				return false;
			ok = *fp->p == '{' ? fp_object(fp) : fp_array(fp);
			fp->depth--;
			return ok;
		case '"':
			if ((s = fp_string(fp, &len)) == NULL)
				return false;
			fp->pp->lex->prev_token_terminator = (char *) fp->p;
			fp->pp->tok_len = len;
			pp_scalar(fp->pp, s, JSON_TOKEN_STRING);
			return true;
		default:
			return fp_scalar(fp);
	}
}

/*
 * The body through the fast lexer and the semantic actions.  False when it
 * gave up (see above): then what the actions built is to be thrown away.
 */
static bool
fast_parse(PageParse *pp, char *text, int len)
{
	FastParse	fp;
	bool		ok;

	if (GetDatabaseEncoding() != PG_UTF8)
		return false;
	/* the actions read a record's bounds from these two fields only */
	pp->lex = palloc0(sizeof(JsonLexContext));
	fp.pp = pp;
	fp.p = text;
	fp.end = text + len;
	fp.depth = 0;
	fp_skip_space(&fp);
	ok = fp_value(&fp);
	if (ok)
	{
		fp_skip_space(&fp);
		ok = fp.p == fp.end;
	}
	MemoryContextSwitchTo(pp->page_cxt);
	return ok;
}

static JsonParseErrorType
run_parser(PageParse *pp, char *text, int len, bool need_escapes)
{
	JsonSemAction sem = {
		.semstate = pp,
		.object_start = pp_object_start,
		.object_end = pp_object_end,
		.array_start = pp_array_start,
		.array_end = pp_array_end,
		.object_field_start = pp_field_start,
		.array_element_start = pp_element_start,
		.array_element_end = pp_element_end,
		.scalar = pp_scalar,
	};
	JsonParseErrorType rc;

#if PG_VERSION_NUM >= 170000
	pp->lex = makeJsonLexContextCstringLen(NULL, text, len, GetDatabaseEncoding(), need_escapes);
#else
	pp->lex = makeJsonLexContextCstringLen(text, len, GetDatabaseEncoding(), need_escapes);
#endif
	rc = pg_parse_json(pp->lex, &sem);
	/* a record the parser gave up in the middle of: back to the page's context */
	MemoryContextSwitchTo(pp->page_cxt);
	return rc;
}

static const char *
parse_error_reason(JsonParseErrorType rc)
{
	return rc == JSON_UNICODE_CODE_POINT_ZERO ? POISON_NUL : POISON_ESCAPE;
}

/*
 * The slow path: a record on its own, from the original bytes.  Called once
 * the structure pass has found its boundaries and, when readable, its id.
 */
static void
parse_one_record(PageParse *pp, IwRecord *rec)
{
	JsonParseErrorType rc;
	bool		had_id = rec->has_id;
	int64		id = rec->id;

	/* the structure pass judged nothing but the shape */
	rec->fault = NULL;
	rec->detail = NULL;
	if (!pg_verify_mbstr(GetDatabaseEncoding(), rec->raw, rec->raw_len, true))
	{
		rec->fault = POISON_UTF8;
		rec->detail = "the record is not valid UTF-8";
		return;
	}
	if (rec->raw_len > ironwod_max_record_bytes)
	{
		rec->fault = POISON_TOO_LARGE;
		rec->detail = "the record exceeds ironwod.max_record_bytes";
		return;
	}
	pp->rec = rec;
	pp->in_record = true;
	pp->depth = 0;
	pp->rec_depth = 0;
	pp->rec_first = true;
	pp->rec_is_object = false;
	pp->skip = false;
	pp->id_next = false;
	pp->id_tok = false;
	pp->est = 0;
	pp->pstate = NULL;
	pp->root = NULL;
	MemoryContextSwitchTo(pp->rec_cxt);
	rc = run_parser(pp, rec->raw, rec->raw_len, true);
	if (rc != JSON_SUCCESS)
	{
		if (rec->fault == NULL)
		{
			rec->fault = parse_error_reason(rc);
			rec->detail = rc == JSON_UNICODE_CODE_POINT_ZERO
				? "the record contains \\u0000, which jsonb cannot store"
				: "the record has an invalid Unicode escape";
		}
	}
	else
		finish_record(pp, rec);
	MemoryContextReset(pp->rec_cxt);
	pp->in_record = false;
	/* the id the structure pass read stays the record's id in quarantine */
	if (rec->fault != NULL && !rec->has_id && had_id)
	{
		rec->has_id = true;
		rec->id = id;
	}
}

/* Every \uXXXX made \u0041, same length: the lexer then fails on nothing but syntax. */
static char *
defuse_escapes(const char *body, size_t len)
{
	char	   *copy = palloc(len + 1);

	memcpy(copy, body, len);
	copy[len] = '\0';
	for (size_t i = 0; i + 1 < len; i++)
	{
		if (copy[i] != '\\')
			continue;
		if (copy[i + 1] == 'u' && i + 5 < len &&
			isxdigit((unsigned char) copy[i + 2]) && isxdigit((unsigned char) copy[i + 3]) &&
			isxdigit((unsigned char) copy[i + 4]) && isxdigit((unsigned char) copy[i + 5]))
		{
			memcpy(copy + i + 2, "0041", 4);
			i += 5;
		}
		else
			i++;
	}
	return copy;
}

static void
reset_page(IwPage *page)
{
	memset(page, 0, sizeof(IwPage));
	page->has_more = -1;
}

static void
init_parse(PageParse *pp, const IwEntitySpec *spec, IwPage *page, bool build)
{
	memset(pp, 0, sizeof(PageParse));
	pp->spec = spec;
	pp->page = page;
	pp->build = build;
	pp->id_len = strlen(spec->id_field);
	pp->tok_len = -1;
	pp->page_cxt = CurrentMemoryContext;
	pp->rec_cxt = AllocSetContextCreate(CurrentMemoryContext, "ironwod record",
										ALLOCSET_DEFAULT_SIZES);
}

static int
record_cmp(const void *a, const void *b)
{
	const IwRecord *x = *(IwRecord *const *) a;
	const IwRecord *y = *(IwRecord *const *) b;
	int			c;

	if (x->id != y->id)
		return x->id < y->id ? -1 : 1;
	c = memcmp(x->hash, y->hash, IW_PAYLOAD_HASH_LEN);
	if (c != 0)
		return c;
	return x < y ? -1 : (x > y ? 1 : 0);
}

/*
 * What the page says beyond its records: duplicates (the same version twice
 * in one page lands once), the newest watermark, the digest of its ids that
 * spots a page repeating the previous one.
 *
 * The watermark is the newest vendor timestamp that is not in the future.  A
 * record stamped later than now (a class scheduled ahead, a vendor clock
 * running fast) is landed like any other but does not count: counting it
 * would move the watermark past records the vendor has yet to post, and
 * clamping it to our clock would put our time where only the vendor's
 * belongs.  It counts once a later pull sees it no longer in the future.
 */
static void
summarise(IwPage *page)
{
	TimestampTz now = GetCurrentTimestamp();
	IwRecord  **good = palloc(sizeof(IwRecord *) * Max(page->n_records, 1));
	int			n_good = 0;
	StringInfoData ids;
	const char *errstr = NULL;

	initStringInfo(&ids);
	for (int i = 0; i < page->n_records; i++)
	{
		IwRecord   *r = &page->records[i];

		if (r->has_id)
		{
			appendStringInfo(&ids, "%s" INT64_FORMAT, page->has_digest ? "," : "", r->id);
			page->has_digest = true;
		}
		if (r->fault != NULL)
		{
			page->n_faulty++;
			continue;
		}
		good[n_good++] = r;
		if (r->has_watermark && r->watermark <= now &&
			(!page->has_watermark || r->watermark > page->watermark))
		{
			page->watermark = r->watermark;
			page->has_watermark = true;
		}
	}
	if (page->has_digest && !pg_md5_hash(ids.data, ids.len, page->digest, &errstr))
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not compute an MD5 digest: %s", errstr)));
	pfree(ids.data);

	qsort(good, n_good, sizeof(IwRecord *), record_cmp);
	for (int i = 1; i < n_good; i++)
		if (good[i]->id == good[i - 1]->id &&
			memcmp(good[i]->hash, good[i - 1]->hash, IW_PAYLOAD_HASH_LEN) == 0)
			good[i]->duplicate = true;
	pfree(good);
}

/*
 * Split a response body into its records (see the file header).  Everything
 * is allocated in the caller's context; records point into body for their
 * raw bytes, so body must outlive the page.
 */
void
iw_parse_page(char *body, size_t len, const IwEntitySpec *spec, IwPage *page)
{
	PageParse	pp;
	JsonParseErrorType rc = JSON_INVALID_TOKEN;
	char	   *copy;

	reset_page(page);
	/* a NUL byte is never JSON; the lexer works on lengths, so say it here */
	if (len == 0 || len > (size_t) PG_INT32_MAX || memchr(body, '\0', len) != NULL)
	{
		page->outcome = IW_PAGE_NOT_JSON;
		return;
	}

	/*
	 * The fast path: one pass builds every record, with the fast lexer, or
	 * with PostgreSQL's where that one gives up.  What the fast one built
	 * until then stays in the caller's context until the page is done.
	 */
	init_parse(&pp, spec, page, true);
	if (pg_verify_mbstr(GetDatabaseEncoding(), body, (int) len, true))
	{
		if (fast_parse(&pp, body, (int) len))
			rc = JSON_SUCCESS;
		else
		{
			MemoryContextDelete(pp.rec_cxt);
			reset_page(page);
			init_parse(&pp, spec, page, true);
			rc = run_parser(&pp, body, (int) len, true);
		}
	}
	if (rc != JSON_SUCCESS)
	{
		/* Something in the page is poison, or the page is not JSON at all. */
		MemoryContextDelete(pp.rec_cxt);
		reset_page(page);
		init_parse(&pp, spec, page, false);
		copy = defuse_escapes(body, len);
		rc = run_parser(&pp, copy, (int) len, true);
		if (rc != JSON_SUCCESS)
		{
			reset_page(page);
			page->outcome = IW_PAGE_NOT_JSON;
			MemoryContextDelete(pp.rec_cxt);
			pfree(copy);
			return;
		}
		pp.build = true;
		for (int i = 0; i < page->n_records; i++)
		{
			IwRecord   *rec = &page->records[i];

			rec->raw = body + (rec->raw - copy);
			parse_one_record(&pp, rec);
		}
		pfree(copy);
		/* what the envelope said may hold the bytes that made us come here */
		if (page->error_code &&
			!pg_verify_mbstr(GetDatabaseEncoding(), page->error_code, strlen(page->error_code), true))
			page->error_code = NULL;
		if (page->developer_message &&
			!pg_verify_mbstr(GetDatabaseEncoding(), page->developer_message,
							 strlen(page->developer_message), true))
			page->developer_message = NULL;
	}
	MemoryContextDelete(pp.rec_cxt);

	if (!pp.top_is_object)
		page->outcome = IW_PAGE_NOT_OBJECT;
	else if (page->is_envelope)
		page->outcome = IW_PAGE_ENVELOPE;
	else if (!page->has_records)
		page->outcome = IW_PAGE_NO_RECORDS;
	else
	{
		page->outcome = IW_PAGE_RECORDS;
		summarise(page);
	}
}
