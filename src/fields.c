/*-------------------------------------------------------------------------
 *
 * fields.c
 *	  The transform's field readers: one field of a raw record (a jsonb
 *	  object) as the typed value of a canonical column, in one call.
 *
 *	  The canonical mapping (ironwod.canonical_columns) reads most columns
 *	  of every transformed record.  Written as ironwod.j_id(p -> 'client_id')
 *	  or ironwod.parse_ts(p ->> 'utc_class_start_datetime'), each column is
 *	  two calls, and the inner one builds the field's value as a jsonb (or a
 *	  text) only for the outer one to take it apart again: for a medium
 *	  gym's class sign-ins (seven columns, 40,000 records) the expressions
 *	  cost as much as the index insertion of the canonical rows.  Each
 *	  reader here looks the key up once (getKeyJsonValueFromContainer, the
 *	  lookup -> and ->> make) and converts the value where it lies.
 *
 *	  Each gives exactly what the expression it replaces gives, errors
 *	  included: ironwod.j_id(p, k) is ironwod.j_id(p -> k),
 *	  ironwod.j_num(p, k) is ironwod.j_num(p -> k), ironwod.j_ts(p, k) is
 *	  ironwod.parse_ts(p ->> k), ironwod.j_date(p, k) is
 *	  ironwod.j_date(p ->> k), ironwod.j_text(p, k) is
 *	  ironwod.j_text(p ->> k) and ironwod.j_bool(p, k) is
 *	  (p ->> k)::boolean.  A value of a kind Wodify does not send there (a
 *	  number where text is expected, a string where a boolean is) goes
 *	  through the text ->> gives, as before.
 *
 *-------------------------------------------------------------------------
 */
#include "ironwod.h"

#include "catalog/pg_collation_d.h"
#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/fmgrprotos.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

PG_FUNCTION_INFO_V1(ironwod_field_id);
PG_FUNCTION_INFO_V1(ironwod_field_num);
PG_FUNCTION_INFO_V1(ironwod_field_ts);
PG_FUNCTION_INFO_V1(ironwod_field_date);
PG_FUNCTION_INFO_V1(ironwod_field_text);
PG_FUNCTION_INFO_V1(ironwod_field_bool);

/*
 * The field named by argument 1 of the record in argument 0, or false when the
 * record is not an object or has no such key (-> and ->> give NULL then).  A
 * nested object or array comes back as jbvBinary.
 */
static bool
record_field(FunctionCallInfo fcinfo, JsonbValue *v)
{
	Jsonb	   *jb = PG_GETARG_JSONB_P(0);
	text	   *key = PG_GETARG_TEXT_PP(1);

	if (!JB_ROOT_IS_OBJECT(jb))
		return false;
	return getKeyJsonValueFromContainer(&jb->root, VARDATA_ANY(key), VARSIZE_ANY_EXHDR(key),
										v) != NULL;
}

/*
 * The field as ->> gives it, for the values no reader converts in place: never
 * NULL here (a JSON null is handled by the callers).
 */
static text *
field_text(FunctionCallInfo fcinfo)
{
	return DatumGetTextPP(DirectFunctionCall2(jsonb_object_field_text,
											  PG_GETARG_DATUM(0), PG_GETARG_DATUM(1)));
}

Datum
ironwod_field_id(PG_FUNCTION_ARGS)
{
	JsonbValue	v;
	int64		id;

	if (!record_field(fcinfo, &v) || !iw_wodify_id(&v, &id))
		PG_RETURN_NULL();
	PG_RETURN_INT64(id);
}

/*
 * A JSON number, or a string of the shape -?\d+(\.\d+)?, as numeric; anything
 * else NULL.  The shape is tested by the same regular expression as
 * ironwod.j_num(jsonb), under the database's collation, so what \d matches
 * does not change; Wodify sends amounts as numbers, which need no test.
 */
Datum
ironwod_field_num(PG_FUNCTION_ARGS)
{
	JsonbValue	v;

	if (!record_field(fcinfo, &v))
		PG_RETURN_NULL();
	if (v.type == jbvNumeric)
		PG_RETURN_NUMERIC(DatumGetNumericCopy(NumericGetDatum(v.val.numeric)));
	if (v.type == jbvString)
	{
		text	   *t = cstring_to_text_with_len(v.val.string.val, v.val.string.len);

		if (DatumGetBool(DirectFunctionCall2Coll(textregexeq, DEFAULT_COLLATION_OID,
												 PointerGetDatum(t),
												 CStringGetTextDatum("^-?\\d+(\\.\\d+)?$"))))
			PG_RETURN_DATUM(DirectFunctionCall3(numeric_in,
												CStringGetDatum(text_to_cstring(t)),
												ObjectIdGetDatum(InvalidOid),
												Int32GetDatum(-1)));
	}
	PG_RETURN_NULL();
}

/*
 * A Wodify datetime field.  Only a string can have a datetime's shape: the
 * text ->> gives of a number, a boolean or a container never does.
 */
Datum
ironwod_field_ts(PG_FUNCTION_ARGS)
{
	JsonbValue	v;
	TimestampTz ts;

	if (!record_field(fcinfo, &v) || v.type != jbvString ||
		!iw_parse_vendor_ts(v.val.string.val, v.val.string.len, &ts))
		PG_RETURN_NULL();
	PG_RETURN_TIMESTAMPTZ(ts);
}

/* A Wodify civil date field; as for datetimes, only a string has the shape. */
Datum
ironwod_field_date(PG_FUNCTION_ARGS)
{
	JsonbValue	v;
	DateADT		d;

	if (!record_field(fcinfo, &v) || v.type != jbvString ||
		!iw_civil_date(v.val.string.val, v.val.string.len, &d))
		PG_RETURN_NULL();
	PG_RETURN_DATEADT(d);
}

/* A Wodify text field; the "" sentinel is NULL. */
Datum
ironwod_field_text(PG_FUNCTION_ARGS)
{
	JsonbValue	v;

	if (!record_field(fcinfo, &v) || v.type == jbvNull)
		PG_RETURN_NULL();
	if (v.type != jbvString)
		PG_RETURN_TEXT_P(field_text(fcinfo));
	if (v.val.string.len == 0)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text_with_len(v.val.string.val, v.val.string.len));
}

/* A boolean field; anything but a JSON boolean or null is cast from its text. */
Datum
ironwod_field_bool(PG_FUNCTION_ARGS)
{
	JsonbValue	v;

	if (!record_field(fcinfo, &v) || v.type == jbvNull)
		PG_RETURN_NULL();
	if (v.type == jbvBool)
		PG_RETURN_BOOL(v.val.boolean);
	PG_RETURN_DATUM(DirectFunctionCall1(boolin, CStringGetDatum(text_to_cstring(field_text(fcinfo)))));
}
