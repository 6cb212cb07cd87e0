/*-------------------------------------------------------------------------
 *
 * wire.c
 *	  Wodify's wire formats, read and written without SPI: vendor datetimes
 *	  (ironwod.parse_ts), ids and civil dates (ironwod.j_id, ironwod.j_date),
 *	  percent-encoded search values (ironwod.urlencode) and time zone names
 *	  (ironwod.is_time_zone).
 *
 *	  They run once per record, field or planned unit, so they are plain C:
 *	  the SQL versions they replace cost a regular expression and a cast per
 *	  value (j_date, whose cast is only stable, was not even inlined but ran
 *	  through the SQL function executor for every value), and a convert_to()
 *	  per byte.
 *
 *-------------------------------------------------------------------------
 */
#include "ironwod.h"

#include "fmgr.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/datetime.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "pgtime.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(ironwod_parse_ts);
PG_FUNCTION_INFO_V1(ironwod_j_id);
PG_FUNCTION_INFO_V1(ironwod_j_date);
PG_FUNCTION_INFO_V1(ironwod_urlencode);
PG_FUNCTION_INFO_V1(ironwod_is_time_zone);

static inline bool
digits(const char *s, int n)
{
	for (int i = 0; i < n; i++)
		if (s[i] < '0' || s[i] > '9')
			return false;
	return true;
}

/*
 * Is s[0..len) one of the datetime shapes Wodify sends?
 *
 *	 YYYY-MM-DD[(T| )HH:MM[:SS[.f+]]][Z|(+|-)HH[[:]MM]]
 *
 * *has_zone says whether a zone was given; a datetime without one is UTC.
 */
static bool
vendor_ts_shape(const char *s, int len, bool *has_zone)
{
	int			p = 10;

	*has_zone = false;
	if (len < 10 || !digits(s, 4) || s[4] != '-' || !digits(s + 5, 2) || s[7] != '-' ||
		!digits(s + 8, 2))
		return false;
	if (p < len && (s[p] == 'T' || s[p] == ' '))
	{
		if (p + 6 > len || !digits(s + p + 1, 2) || s[p + 3] != ':' || !digits(s + p + 4, 2))
			return false;
		p += 6;
		if (p < len && s[p] == ':')
		{
			if (p + 3 > len || !digits(s + p + 1, 2))
				return false;
			p += 3;
			if (p < len && s[p] == '.')
			{
				int			start = ++p;

				while (p < len && s[p] >= '0' && s[p] <= '9')
					p++;
				if (p == start)
					return false;
			}
		}
	}
	if (p < len && s[p] == 'Z')
	{
		*has_zone = true;
		p++;
	}
	else if (p < len && (s[p] == '+' || s[p] == '-'))
	{
		if (p + 3 > len || !digits(s + p + 1, 2))
			return false;
		*has_zone = true;
		p += 3;
		if (p < len)
		{
			if (s[p] == ':')
				p++;
			if (p + 2 > len || !digits(s + p, 2))
				return false;
			p += 2;
		}
	}
	return p == len;
}

/*
 * The shape Wodify sends nearly always, YYYY-MM-DDTHH:MM:SS[Z] (already
 * checked by vendor_ts_shape), converted without ParseDateTime and
 * DecodeDateTime: landing reads two or three per record.  Only fields in
 * their plain ranges, for which the result is the one DecodeDateTime gives;
 * anything else (a leap second, 24:00:00, year 0, a zone offset, fractions)
 * is left to the general path.
 */
static bool
plain_vendor_ts(const char *s, int len, TimestampTz *result)
{
	int			y,
				mo,
				d,
				h,
				mi,
				sec;

	if (!(len == 19 || (len == 20 && s[19] == 'Z')) || s[16] != ':')
		return false;
#define IW_2DIGITS(p) (((p)[0] - '0') * 10 + ((p)[1] - '0'))
	y = IW_2DIGITS(s) * 100 + IW_2DIGITS(s + 2);
	mo = IW_2DIGITS(s + 5);
	d = IW_2DIGITS(s + 8);
	h = IW_2DIGITS(s + 11);
	mi = IW_2DIGITS(s + 14);
	sec = IW_2DIGITS(s + 17);
#undef IW_2DIGITS
	if (y < 1 || mo < 1 || mo > MONTHS_PER_YEAR || d < 1 || d > day_tab[isleap(y)][mo - 1] ||
		h > 23 || mi > 59 || sec > 59)
		return false;
	*result = ((int64) (date2j(y, mo, d) - POSTGRES_EPOCH_JDATE) * SECS_PER_DAY +
			   h * SECS_PER_HOUR + mi * SECS_PER_MINUTE + sec) * USECS_PER_SEC;
	return true;
}

/*
 * A Wodify datetime as a timestamptz, or false: the sentinel 1900-01-01
 * ("no value"), any other shape, and impossible dates (month 13) are all "no
 * value" rather than errors, because one odd field must not stop a page.
 * Parsing is PostgreSQL's own (ParseDateTime, DecodeDateTime), exactly as
 * timestamptz_in does it, minus the ereport; a datetime without a zone is
 * UTC, whatever the session's TimeZone, so the result is immutable.
 */
bool
iw_parse_vendor_ts(const char *s, int len, TimestampTz *result)
{
	char		buf[MAXDATELEN + 1];
	char		workbuf[MAXDATELEN + MAXDATEFIELDS];
	char	   *field[MAXDATEFIELDS];
	int			ftype[MAXDATEFIELDS];
	int			nf;
	int			dtype;
	int			tz = 0;
	fsec_t		fsec;
	struct pg_tm tt;
	bool		has_zone;

	if (len > MAXDATELEN || !vendor_ts_shape(s, len, &has_zone))
		return false;
	if (strncmp(s, "1900-01-01", 10) == 0)
		return false;
	if (plain_vendor_ts(s, len, result))
		return IS_VALID_TIMESTAMP(*result);
	memcpy(buf, s, len);
	buf[len] = '\0';
	if (ParseDateTime(buf, workbuf, sizeof(workbuf), field, ftype, MAXDATEFIELDS, &nf) != 0)
		return false;
	if (DecodeDateTime(field, ftype, nf, &dtype, &tt, &fsec, &tz) != 0 || dtype != DTK_DATE)
		return false;
	/* without a zone the broken-down time is UTC: convert it as timestamp */
	if (tm2timestamp(&tt, fsec, has_zone ? &tz : NULL, result) != 0)
		return false;
	return IS_VALID_TIMESTAMP(*result);
}

Datum
ironwod_parse_ts(PG_FUNCTION_ARGS)
{
	text	   *t = PG_GETARG_TEXT_PP(0);
	TimestampTz ts;

	if (!iw_parse_vendor_ts(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t), &ts))
		PG_RETURN_NULL();
	PG_RETURN_TIMESTAMPTZ(ts);
}

/*
 * A Wodify id: a JSON number, or a string of ASCII digits, as bigint; false for
 * the 0 sentinel and anything else (null, true, "", "12a", an object).  A
 * fractional number rounds, and one beyond bigint is an error, as the numeric
 * to bigint cast they go through does.  Only a result of 0 is compared with the
 * sentinel: 0.4 rounds to 0 but is not it.
 */
bool
iw_wodify_id(const JsonbValue *v, int64 *id)
{
	Datum		num;

	if (v->type == jbvNumeric)
		num = NumericGetDatum(v->val.numeric);
	else if (v->type == jbvString && v->val.string.len > 0 &&
			 digits(v->val.string.val, v->val.string.len))
		num = DirectFunctionCall3(numeric_in,
								  CStringGetDatum(pnstrdup(v->val.string.val, v->val.string.len)),
								  ObjectIdGetDatum(InvalidOid), Int32GetDatum(-1));
	else
		return false;
	*id = DatumGetInt64(DirectFunctionCall1(numeric_int8, num));
	return *id != 0 ||
		!DatumGetBool(DirectFunctionCall2(numeric_eq, num, NumericGetDatum(int64_to_numeric(0))));
}

Datum
ironwod_j_id(PG_FUNCTION_ARGS)
{
	Jsonb	   *jb = PG_GETARG_JSONB_P(0);
	JsonbValue	v;
	int64		id;

	if (!JsonbExtractScalar(&jb->root, &v) || !iw_wodify_id(&v, &id))
		PG_RETURN_NULL();
	PG_RETURN_INT64(id);
}

/*
 * A Wodify civil date: the first 10 characters of YYYY-MM-DD[...] as a date,
 * never through a time zone; false for the 1900-01-01 sentinel and any other
 * shape.  A well-shaped impossible date (2024-02-30) is date_in's error, as the
 * text to date cast it goes through gives.
 */
bool
iw_civil_date(const char *s, int len, DateADT *result)
{
	char		day[11];

	if (len < 10 || !digits(s, 4) || s[4] != '-' || !digits(s + 5, 2) ||
		s[7] != '-' || !digits(s + 8, 2) || memcmp(s, "1900-01-01", 10) == 0)
		return false;
	memcpy(day, s, 10);
	day[10] = '\0';
	*result = DatumGetDateADT(DirectFunctionCall1(date_in, CStringGetDatum(day)));
	return true;
}

Datum
ironwod_j_date(PG_FUNCTION_ARGS)
{
	text	   *t = PG_GETARG_TEXT_PP(0);
	DateADT		d;

	if (!iw_civil_date(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t), &d))
		PG_RETURN_NULL();
	PG_RETURN_DATEADT(d);
}

/*
 * Percent-encode a search value (wodify-api.md §5): everything but RFC 3986's
 * unreserved characters, over the value's UTF-8 bytes.
 */
Datum
ironwod_urlencode(PG_FUNCTION_ARGS)
{
	static const char hex[] = "0123456789ABCDEF";
	text	   *t = PG_GETARG_TEXT_PP(0);
	int			len = VARSIZE_ANY_EXHDR(t);
	const unsigned char *s;
	StringInfoData out;

	s = (const unsigned char *) pg_server_to_any(VARDATA_ANY(t), len, PG_UTF8);
	if ((const char *) s != VARDATA_ANY(t))
		len = strlen((const char *) s);
	initStringInfo(&out);
	enlargeStringInfo(&out, len * 3);
	for (int i = 0; i < len; i++)
	{
		unsigned char c = s[i];

		if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
			c == '-' || c == '.' || c == '_' || c == '~')
			out.data[out.len++] = (char) c;
		else
		{
			out.data[out.len++] = '%';
			out.data[out.len++] = hex[c >> 4];
			out.data[out.len++] = hex[c & 0xF];
		}
	}
	out.data[out.len] = '\0';
	PG_RETURN_TEXT_P(cstring_to_text_with_len(out.data, out.len));
}

/*
 * Is this a time zone PostgreSQL knows by name (a location's time_zone_iana)?
 * pg_tzset loads and caches the zone, where scanning pg_timezone_names would
 * read the whole time zone database.  POSIX rule strings ("EST5" and the
 * like) are not names, so only name-shaped strings are looked up.
 */
Datum
ironwod_is_time_zone(PG_FUNCTION_ARGS)
{
	char	   *name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	bool		shaped = isalpha((unsigned char) name[0]);

	for (char *c = name; *c && shaped; c++)
		shaped = isalnum((unsigned char) *c) || *c == '/' || *c == '_' || *c == '-' || *c == '+';
	PG_RETURN_BOOL(shaped && strlen(name) < TZ_STRLEN_MAX && pg_tzset(name) != NULL);
}
