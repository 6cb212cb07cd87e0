/*-------------------------------------------------------------------------
 *
 * crypto.c
 *	  Sealed-box encryption of Wodify API keys, and key fingerprints.
 *
 * This file owns the sealed-key wire format and every use of OpenSSL's
 * public-key, KDF and AEAD primitives.  The scheme is shaped like HPKE base
 * mode (RFC 9180) but built directly from OpenSSL 3.0 EVP calls:
 *
 *	  epk, esk = X25519 keygen()
 *	  shared   = X25519(esk, recipient_pk)          (never all zero)
 *	  key      = HKDF-SHA256(ikm = shared,
 *							 salt = epk || recipient_pk,
 *							 info = "ironwod api key v1", 32 bytes)
 *	  nonce    = 12 random bytes
 *	  ct, tag  = AES-256-GCM(key, nonce, plaintext,
 *							 ad = tenant_id || gym_id || key_id)
 *
 * A sealed key is a bytea laid out as
 *
 *	  'I' 'W' 0x01 L key_id[L] epk[32] nonce[12] ciphertext[n] tag[16]
 *
 * with 1 <= L <= 64 (printable ASCII, no spaces) and 1 <= n <= 512.  The
 * associated data binds a ciphertext to its tenant, gym and master key, so a
 * value copied into another row does not open.
 *
 * Backends only ever seal (they hold public keys).  Opening needs the
 * private master key, which only run workers load (see masterkey.c).
 * Secrets (shared secrets, AES keys, plaintext) are wiped with
 * explicit_bzero as soon as they are no longer needed, and no key material
 * ever appears in an error message.
 *
 * Error handling: OpenSSL objects are not tracked by memory contexts, so
 * every function here runs its OpenSSL section without any ereport, collects
 * the failure, frees everything, and only then raises the error.  Memory
 * that could fail to allocate is allocated before the first OpenSSL object.
 *
 * IDENTIFICATION
 *	  src/crypto.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/kdf.h>
#include <openssl/params.h>
#include <openssl/rand.h>

#include "storage/lwlock.h"		/* ironwod.h uses LWLock, pg_atomic_uint32 */
#include "utils/memutils.h"

#include "ironwod.h"

/* wire format constants */
#define IW_MAGIC_0			'I'
#define IW_MAGIC_1			'W'
#define IW_SEAL_VERSION		0x01
#define IW_HEADER_LEN		4	/* magic (2), version, key id length */
#define IW_KEY_ID_MAX		64
#define IW_NONCE_LEN		12
#define IW_TAG_LEN			16
#define IW_AES_KEY_LEN		32
#define IW_PLAINTEXT_MAX	512
#define IW_UUID_LEN			UUID_LEN

/* smallest possible sealed value: one-byte key id, one-byte ciphertext */
#define IW_SEALED_MIN \
	(IW_HEADER_LEN + 1 + IW_X25519_KEYLEN + IW_NONCE_LEN + 1 + IW_TAG_LEN)

#define IW_HKDF_INFO		"ironwod api key v1"
#define IW_FP_KEY_PREFIX	"ironwod fingerprint v1"
#define IW_FP_HEX_LEN		12
#define IW_FP_TAIL_LEN		4
#define IW_FP_MIN_KEY_LEN	12

#define IW_SEALED_HINT \
	"Seal the API key with the public key returned by ironwod_public_key()."

/*
 * A parsed view of a sealed value.  All pointers point into the bytea; no
 * copies are made.
 */
typedef struct IwSealedView
{
	const uint8 *key_id;
	int			key_id_len;
	const uint8 *epk;
	const uint8 *nonce;
	const uint8 *ciphertext;
	int			ciphertext_len;
	const uint8 *tag;
} IwSealedView;

static void iw_parse_sealed(const bytea *sealed, IwSealedView *view);
static bool iw_key_id_is_valid(const uint8 *key_id, size_t len);
static int	iw_build_ad(uint8 *ad, const pg_uuid_t *tenant_id,
						const pg_uuid_t *gym_id,
						const uint8 *key_id, int key_id_len);
static const char *iw_ssl_reason(unsigned long err);
static bool iw_x25519_derive(EVP_PKEY *own, const uint8 *peer_public,
							 uint8 *shared);
static bool iw_hkdf_sha256(const uint8 *ikm, size_t ikm_len,
						   const uint8 *salt, size_t salt_len,
						   uint8 *out, size_t out_len);
static bool iw_is_header_safe(const char *plaintext, size_t len);
static void iw_report_unsafe_key(void) pg_attribute_noreturn();


/*
 * iw_ssl_reason
 *		Turn an OpenSSL error code into text for an error message.
 *
 * OpenSSL reason strings describe what failed inside the library and never
 * contain the data being processed, so they are safe to show.  The error
 * queue is cleared so a later failure does not report a stale reason.
 */
static const char *
iw_ssl_reason(unsigned long err)
{
	const char *reason;

	ERR_clear_error();
	if (err == 0)
		return _("no OpenSSL error reported");
	reason = ERR_reason_error_string(err);
	if (reason == NULL)
		return _("unknown OpenSSL error");
	return reason;
}

/*
 * iw_key_id_is_valid
 *		Is this a usable master key id?
 *
 * Key ids are written into sealed values, into the master key command's
 * output and into error messages, so they are restricted to 1 to 64
 * printable ASCII characters without spaces.  That keeps them unambiguous
 * in the line-oriented key file and harmless to print.
 */
static bool
iw_key_id_is_valid(const uint8 *key_id, size_t len)
{
	if (len < 1 || len > IW_KEY_ID_MAX)
		return false;
	for (size_t i = 0; i < len; i++)
	{
		if (key_id[i] < 0x21 || key_id[i] > 0x7e)
			return false;
	}
	return true;
}

/*
 * iw_parse_sealed
 *		Check the layout of a sealed value and point into its parts.
 *
 * Everything that reads a sealed value goes through here, so a malformed
 * value is always refused the same way, with a detail that says what is
 * wrong but never shows any of its bytes.
 */
static void
iw_parse_sealed(const bytea *sealed, IwSealedView *view)
{
	const uint8 *p;
	size_t		len;
	int			key_id_len;
	size_t		fixed;

	if (sealed == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("malformed sealed API key"),
				 errdetail("The value is null."),
				 errhint(IW_SEALED_HINT)));

	/* callers pass detoasted values (PG_GETARG_BYTEA_PP); be sure of it */
	if (VARATT_IS_EXTERNAL(sealed) || VARATT_IS_COMPRESSED(sealed))
		elog(ERROR, "sealed API key was not detoasted");

	p = (const uint8 *) VARDATA_ANY(sealed);
	len = VARSIZE_ANY_EXHDR(sealed);

	if (len < IW_SEALED_MIN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("malformed sealed API key"),
				 errdetail("The value is %zu bytes long; a sealed API key is at least %d bytes.",
						   len, (int) IW_SEALED_MIN),
				 errhint(IW_SEALED_HINT)));
	if (len > IW_MAX_SEALED_BYTES)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("malformed sealed API key"),
				 errdetail("The value is %zu bytes long; a sealed API key is at most %d bytes.",
						   len, IW_MAX_SEALED_BYTES),
				 errhint(IW_SEALED_HINT)));
	if (p[0] != IW_MAGIC_0 || p[1] != IW_MAGIC_1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("malformed sealed API key"),
				 errdetail("The value does not start with the ironwod sealed key marker."),
				 errhint(IW_SEALED_HINT)));
	if (p[2] != IW_SEAL_VERSION)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("malformed sealed API key"),
				 errdetail("Sealed key format version %d is not supported; this version of ironwod reads version %d.",
						   (int) p[2], IW_SEAL_VERSION),
				 errhint(IW_SEALED_HINT)));

	key_id_len = p[3];
	if (key_id_len < 1 || key_id_len > IW_KEY_ID_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("malformed sealed API key"),
				 errdetail("The master key id length %d is outside the range 1 to %d.",
						   key_id_len, IW_KEY_ID_MAX),
				 errhint(IW_SEALED_HINT)));

	fixed = IW_HEADER_LEN + key_id_len + IW_X25519_KEYLEN + IW_NONCE_LEN +
		IW_TAG_LEN;
	if (len < fixed + 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("malformed sealed API key"),
				 errdetail("The value is too short to hold a master key id of %d bytes and a ciphertext.",
						   key_id_len),
				 errhint(IW_SEALED_HINT)));
	if (len - fixed > IW_PLAINTEXT_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("malformed sealed API key"),
				 errdetail("The ciphertext is %zu bytes long; at most %d bytes are allowed.",
						   len - fixed, IW_PLAINTEXT_MAX),
				 errhint(IW_SEALED_HINT)));
	if (!iw_key_id_is_valid(p + IW_HEADER_LEN, key_id_len))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("malformed sealed API key"),
				 errdetail("The master key id contains a character that is not printable ASCII or is a space."),
				 errhint(IW_SEALED_HINT)));

	view->key_id = p + IW_HEADER_LEN;
	view->key_id_len = key_id_len;
	view->epk = view->key_id + key_id_len;
	view->nonce = view->epk + IW_X25519_KEYLEN;
	view->ciphertext = view->nonce + IW_NONCE_LEN;
	view->ciphertext_len = (int) (len - fixed);
	view->tag = view->ciphertext + view->ciphertext_len;
}

/*
 * iw_build_ad
 *		Assemble the AEAD associated data: tenant || gym || key id.
 *
 * Binding the tenant and gym makes a ciphertext copied into another row
 * fail to open; binding the key id stops a value from being relabelled to
 * another master key.  Tenant and gym have a fixed length, so the
 * concatenation is unambiguous.  Returns the length written; the caller
 * provides room for 2 * 16 + 64 bytes.
 */
static int
iw_build_ad(uint8 *ad, const pg_uuid_t *tenant_id, const pg_uuid_t *gym_id,
			const uint8 *key_id, int key_id_len)
{
	memcpy(ad, tenant_id->data, IW_UUID_LEN);
	memcpy(ad + IW_UUID_LEN, gym_id->data, IW_UUID_LEN);
	memcpy(ad + 2 * IW_UUID_LEN, key_id, key_id_len);
	return 2 * IW_UUID_LEN + key_id_len;
}

/*
 * iw_x25519_derive
 *		X25519 between our key and a peer's raw public key.
 *
 * Returns false if OpenSSL fails or the result is all zero (the peer sent a
 * small-order point, which would make the "shared" secret public).  OpenSSL
 * 3.0 already refuses that case, but the check is cheap and keeps the
 * property independent of the library version.  Does not ereport; the
 * caller frees its own objects and reports.
 */
static bool
iw_x25519_derive(EVP_PKEY *own, const uint8 *peer_public, uint8 *shared)
{
	static const uint8 zeros[IW_X25519_KEYLEN] = {0};
	EVP_PKEY   *peer;
	EVP_PKEY_CTX *ctx = NULL;
	size_t		shared_len = IW_X25519_KEYLEN;
	bool		ok = false;

	peer = EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, NULL, peer_public,
									   IW_X25519_KEYLEN);
	if (peer == NULL)
		goto done;
	ctx = EVP_PKEY_CTX_new(own, NULL);
	if (ctx == NULL ||
		EVP_PKEY_derive_init(ctx) <= 0 ||
		EVP_PKEY_derive_set_peer(ctx, peer) <= 0 ||
		EVP_PKEY_derive(ctx, shared, &shared_len) <= 0 ||
		shared_len != IW_X25519_KEYLEN)
		goto done;
	if (CRYPTO_memcmp(shared, zeros, IW_X25519_KEYLEN) == 0)
		goto done;
	ok = true;

done:
	if (!ok)
		explicit_bzero(shared, IW_X25519_KEYLEN);
	EVP_PKEY_CTX_free(ctx);
	EVP_PKEY_free(peer);
	return ok;
}

/*
 * iw_hkdf_sha256
 *		HKDF-SHA256 extract-and-expand (RFC 5869) with the ironwod info.
 *
 * Uses the OpenSSL 3.0 EVP_KDF interface.  The salt carries both public
 * keys, as HPKE's key schedule does, so the AES key depends on the exact
 * key pair used.  Does not ereport.
 */
static bool
iw_hkdf_sha256(const uint8 *ikm, size_t ikm_len,
			   const uint8 *salt, size_t salt_len,
			   uint8 *out, size_t out_len)
{
	EVP_KDF    *kdf;
	EVP_KDF_CTX *kctx = NULL;
	OSSL_PARAM	params[5];
	bool		ok = false;

	kdf = EVP_KDF_fetch(NULL, OSSL_KDF_NAME_HKDF, NULL);
	if (kdf == NULL)
		return false;
	kctx = EVP_KDF_CTX_new(kdf);
	if (kctx == NULL)
		goto done;

	params[0] = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST,
												 (char *) "SHA256", 0);
	params[1] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY,
												  (void *) ikm, ikm_len);
	params[2] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT,
												  (void *) salt, salt_len);
	params[3] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO,
												  (void *) IW_HKDF_INFO,
												  strlen(IW_HKDF_INFO));
	params[4] = OSSL_PARAM_construct_end();

	if (EVP_KDF_derive(kctx, out, out_len, params) <= 0)
		goto done;
	ok = true;

done:
	if (!ok)
		explicit_bzero(out, out_len);
	/* EVP_KDF_CTX_free cleanses the copy of the IKM the context holds */
	EVP_KDF_CTX_free(kctx);
	EVP_KDF_free(kdf);
	return ok;
}

/*
 * iw_is_header_safe
 *		Could this API key be sent safely as an HTTP header value?
 *
 * The key ends up in a request header; a NUL would truncate it, and CR or
 * LF would let it inject headers.  Any other control character is refused
 * for the same reason.
 */
static bool
iw_is_header_safe(const char *plaintext, size_t len)
{
	for (size_t i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) plaintext[i];

		if (c < 0x20 || c == 0x7f)
			return false;
	}
	return true;
}

/*
 * iw_report_unsafe_key
 *		Raise the error for an API key that is not a safe header value.
 *
 * Shared by sealing and opening so both say the same thing.  The message
 * never shows the key or the position of the offending character.
 */
static void
iw_report_unsafe_key(void)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("API key contains a control character"),
			 errdetail("An API key is sent as an HTTP header value, so it must not contain NUL, carriage return, line feed or other control characters.")));
}

/*
 * iw_x25519_public_from_private
 *		Compute the X25519 public key that belongs to a raw private key.
 *
 * Opening needs the recipient public key for the HKDF salt, and the master
 * key command only supplies private keys, so the public half is derived
 * here rather than trusted from elsewhere.
 */
void
iw_x25519_public_from_private(const uint8 *private_key, uint8 *public_key)
{
	EVP_PKEY   *pkey;
	size_t		pub_len = IW_X25519_KEYLEN;
	unsigned long err = 0;
	bool		ok = false;

	ERR_clear_error();
	pkey = EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, NULL, private_key,
										IW_X25519_KEYLEN);
	if (pkey != NULL &&
		EVP_PKEY_get_raw_public_key(pkey, public_key, &pub_len) > 0 &&
		pub_len == IW_X25519_KEYLEN)
		ok = true;
	else
		err = ERR_peek_last_error();

	/* EVP_PKEY_free cleanses the private key it holds */
	EVP_PKEY_free(pkey);

	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not compute the public key of an X25519 private key: %s",
						iw_ssl_reason(err))));
}

/*
 * iw_seal
 *		Seal an API key to a master public key, bound to tenant and gym.
 *
 * This runs in ordinary backends (the text overload of ironwod_connect) and
 * needs only the public key.  The result is palloc'd in
 * CurrentMemoryContext.  The ephemeral private key lives only inside an
 * OpenSSL object and is cleansed when that object is freed.
 */
bytea *
iw_seal(const uint8 *public_key, const char *key_id,
		const pg_uuid_t *tenant_id, const pg_uuid_t *gym_id,
		const char *plaintext, size_t plaintext_len)
{
	size_t		key_id_len;
	size_t		total;
	bytea	   *result;
	uint8	   *p;
	uint8	   *epk;
	uint8	   *nonce;
	uint8	   *ct;
	uint8	   *tag;
	uint8		shared[IW_X25519_KEYLEN];
	uint8		aes_key[IW_AES_KEY_LEN];
	uint8		salt[2 * IW_X25519_KEYLEN];
	uint8		ad[2 * IW_UUID_LEN + IW_KEY_ID_MAX];
	int			ad_len;
	size_t		epk_len = IW_X25519_KEYLEN;
	int			outl;
	EVP_PKEY_CTX *kctx = NULL;
	EVP_PKEY   *eph = NULL;
	EVP_CIPHER_CTX *cctx = NULL;
	const char *failed = NULL;
	unsigned long err = 0;
	bool		bad_public_key = false;

	/* argument checks first: these are the caller's mistakes */
	if (plaintext == NULL || plaintext_len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("API key must not be empty")));
	if (plaintext_len > IW_PLAINTEXT_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("API key is too long"),
				 errdetail("The key is %zu bytes long; at most %d bytes are allowed.",
						   plaintext_len, IW_PLAINTEXT_MAX)));
	if (!iw_is_header_safe(plaintext, plaintext_len))
		iw_report_unsafe_key();

	key_id_len = key_id ? strlen(key_id) : 0;
	if (!iw_key_id_is_valid((const uint8 *) key_id, key_id_len))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid master key id"),
				 errdetail("A master key id is 1 to %d printable ASCII characters without spaces.",
						   IW_KEY_ID_MAX)));
	if (public_key == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("master public key must not be null")));

	/* allocate the result before any OpenSSL object exists */
	total = IW_HEADER_LEN + key_id_len + IW_X25519_KEYLEN + IW_NONCE_LEN +
		plaintext_len + IW_TAG_LEN;
	Assert(total <= IW_MAX_SEALED_BYTES);
	result = (bytea *) palloc(VARHDRSZ + total);
	SET_VARSIZE(result, VARHDRSZ + total);
	p = (uint8 *) VARDATA(result);
	p[0] = IW_MAGIC_0;
	p[1] = IW_MAGIC_1;
	p[2] = IW_SEAL_VERSION;
	p[3] = (uint8) key_id_len;
	memcpy(p + IW_HEADER_LEN, key_id, key_id_len);
	epk = p + IW_HEADER_LEN + key_id_len;
	nonce = epk + IW_X25519_KEYLEN;
	ct = nonce + IW_NONCE_LEN;
	tag = ct + plaintext_len;

	ad_len = iw_build_ad(ad, tenant_id, gym_id,
						 (const uint8 *) key_id, (int) key_id_len);

	ERR_clear_error();

	/* ephemeral key pair */
	kctx = EVP_PKEY_CTX_new_id(EVP_PKEY_X25519, NULL);
	if (kctx == NULL ||
		EVP_PKEY_keygen_init(kctx) <= 0 ||
		EVP_PKEY_keygen(kctx, &eph) <= 0 ||
		EVP_PKEY_get_raw_public_key(eph, epk, &epk_len) <= 0 ||
		epk_len != IW_X25519_KEYLEN)
	{
		failed = "generate an ephemeral X25519 key";
		goto cleanup;
	}

	/* shared secret; a failure here means an unusable recipient key */
	if (!iw_x25519_derive(eph, public_key, shared))
	{
		bad_public_key = true;
		goto cleanup;
	}

	/* AES key = HKDF(shared, salt = epk || recipient pk) */
	memcpy(salt, epk, IW_X25519_KEYLEN);
	memcpy(salt + IW_X25519_KEYLEN, public_key, IW_X25519_KEYLEN);
	if (!iw_hkdf_sha256(shared, sizeof(shared), salt, sizeof(salt),
						aes_key, sizeof(aes_key)))
	{
		failed = "derive the sealing key";
		goto cleanup;
	}

	if (RAND_bytes(nonce, IW_NONCE_LEN) != 1)
	{
		failed = "generate a random nonce";
		goto cleanup;
	}

	/* AES-256-GCM with the 12-byte nonce (GCM's default IV length) */
	cctx = EVP_CIPHER_CTX_new();
	if (cctx == NULL ||
		EVP_EncryptInit_ex(cctx, EVP_aes_256_gcm(), NULL, NULL, NULL) != 1 ||
		EVP_CIPHER_CTX_ctrl(cctx, EVP_CTRL_GCM_SET_IVLEN, IW_NONCE_LEN,
							NULL) != 1 ||
		EVP_EncryptInit_ex(cctx, NULL, NULL, aes_key, nonce) != 1 ||
		EVP_EncryptUpdate(cctx, NULL, &outl, ad, ad_len) != 1 ||
		EVP_EncryptUpdate(cctx, ct, &outl, (const unsigned char *) plaintext,
						  (int) plaintext_len) != 1 ||
		outl != (int) plaintext_len ||
		EVP_EncryptFinal_ex(cctx, ct + outl, &outl) != 1 ||
		outl != 0 ||
		EVP_CIPHER_CTX_ctrl(cctx, EVP_CTRL_GCM_GET_TAG, IW_TAG_LEN,
							tag) != 1)
	{
		failed = "encrypt the API key";
		goto cleanup;
	}

cleanup:
	if (failed)
		err = ERR_peek_last_error();
	explicit_bzero(shared, sizeof(shared));
	explicit_bzero(aes_key, sizeof(aes_key));
	/* the cipher context holds the expanded AES key; _free cleanses it */
	EVP_CIPHER_CTX_free(cctx);
	EVP_PKEY_free(eph);
	EVP_PKEY_CTX_free(kctx);

	if (bad_public_key)
	{
		pfree(result);
		ERR_clear_error();
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("master public key \"%s\" is not a usable X25519 public key",
						key_id),
				 errhint("Check the public key stored for this master key id.")));
	}
	if (failed)
	{
		pfree(result);
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg_internal("could not %s: %s", failed, iw_ssl_reason(err))));
	}

	return result;
}

/*
 * iw_sealed_key_id
 *		Return the master key id a sealed value was sealed to.
 *
 * Run workers use it to pick which private key to load, and SQL functions
 * use it to validate a sealed value supplied by the host application
 * before storing it.  The whole layout is checked, not just the id.
 */
char *
iw_sealed_key_id(const bytea *sealed)
{
	IwSealedView view;

	iw_parse_sealed(sealed, &view);
	return pnstrdup((const char *) view.key_id, view.key_id_len);
}

/*
 * iw_open
 *		Open a sealed API key with a private master key.
 *
 * Only run workers call this.  The plaintext is returned NUL-terminated in
 * secret_ctx, a context the caller wipes and deletes when the run ends.  A
 * value that fails authentication (wrong tenant, gym or master key, or a
 * damaged value) is reported as data corruption; the unauthenticated
 * output GCM produced before the tag check is wiped first.
 */
char *
iw_open(const bytea *sealed, const uint8 *private_key,
		const pg_uuid_t *tenant_id, const pg_uuid_t *gym_id,
		MemoryContext secret_ctx)
{
	IwSealedView view;
	char	   *plaintext;
	uint8		recipient_pk[IW_X25519_KEYLEN];
	size_t		pk_len = IW_X25519_KEYLEN;
	uint8		shared[IW_X25519_KEYLEN];
	uint8		aes_key[IW_AES_KEY_LEN];
	uint8		salt[2 * IW_X25519_KEYLEN];
	uint8		ad[2 * IW_UUID_LEN + IW_KEY_ID_MAX];
	int			ad_len;
	int			outl = 0;
	int			total = 0;
	EVP_PKEY   *own = NULL;
	EVP_CIPHER_CTX *cctx = NULL;
	const char *failed = NULL;
	unsigned long err = 0;
	bool		bad_epk = false;
	bool		bad_tag = false;
	bool		ok = false;

	if (private_key == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("master private key must not be null")));

	iw_parse_sealed(sealed, &view);

	/* room for the plaintext and its terminator, before any OpenSSL object */
	plaintext = MemoryContextAllocZero(secret_ctx, view.ciphertext_len + 1);

	ad_len = iw_build_ad(ad, tenant_id, gym_id, view.key_id,
						 view.key_id_len);

	ERR_clear_error();

	own = EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, NULL, private_key,
									   IW_X25519_KEYLEN);
	if (own == NULL ||
		EVP_PKEY_get_raw_public_key(own, recipient_pk, &pk_len) <= 0 ||
		pk_len != IW_X25519_KEYLEN)
	{
		failed = "load the master private key";
		goto cleanup;
	}

	if (!iw_x25519_derive(own, view.epk, shared))
	{
		bad_epk = true;
		goto cleanup;
	}

	memcpy(salt, view.epk, IW_X25519_KEYLEN);
	memcpy(salt + IW_X25519_KEYLEN, recipient_pk, IW_X25519_KEYLEN);
	if (!iw_hkdf_sha256(shared, sizeof(shared), salt, sizeof(salt),
						aes_key, sizeof(aes_key)))
	{
		failed = "derive the sealing key";
		goto cleanup;
	}

	cctx = EVP_CIPHER_CTX_new();
	if (cctx == NULL ||
		EVP_DecryptInit_ex(cctx, EVP_aes_256_gcm(), NULL, NULL, NULL) != 1 ||
		EVP_CIPHER_CTX_ctrl(cctx, EVP_CTRL_GCM_SET_IVLEN, IW_NONCE_LEN,
							NULL) != 1 ||
		EVP_DecryptInit_ex(cctx, NULL, NULL, aes_key, view.nonce) != 1 ||
		EVP_DecryptUpdate(cctx, NULL, &outl, ad, ad_len) != 1 ||
		EVP_DecryptUpdate(cctx, (unsigned char *) plaintext, &outl,
						  view.ciphertext, view.ciphertext_len) != 1 ||
		EVP_CIPHER_CTX_ctrl(cctx, EVP_CTRL_GCM_SET_TAG, IW_TAG_LEN,
							(void *) view.tag) != 1)
	{
		failed = "decrypt the API key";
		goto cleanup;
	}
	total = outl;
	if (EVP_DecryptFinal_ex(cctx, (unsigned char *) plaintext + total,
							&outl) != 1)
	{
		/* GCM reports only "tag mismatch" here */
		bad_tag = true;
		goto cleanup;
	}
	total += outl;
	if (total != view.ciphertext_len)
	{
		failed = "decrypt the API key";
		goto cleanup;
	}
	plaintext[total] = '\0';
	ok = true;

cleanup:
	if (failed)
		err = ERR_peek_last_error();
	explicit_bzero(shared, sizeof(shared));
	explicit_bzero(aes_key, sizeof(aes_key));
	EVP_CIPHER_CTX_free(cctx);
	EVP_PKEY_free(own);

	if (!ok)
	{
		/* GCM writes unauthenticated plaintext before the tag check */
		explicit_bzero(plaintext, view.ciphertext_len + 1);
		pfree(plaintext);
		if (!failed)
			ERR_clear_error();
	}

	if (bad_epk || bad_tag)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("sealed API key does not open for this tenant and gym"),
				 bad_epk ?
				 errdetail("The ephemeral public key in the sealed value is not usable.") : 0,
				 errhint("A sealed API key is bound to the tenant, the gym and the master key it was sealed for; seal it again with ironwod_public_key() for this tenant and gym.")));
	if (failed)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg_internal("could not %s: %s", failed, iw_ssl_reason(err))));

	/* authentic, but it must also be a safe header value */
	if (!iw_is_header_safe(plaintext, total))
	{
		explicit_bzero(plaintext, view.ciphertext_len + 1);
		pfree(plaintext);
		iw_report_unsafe_key();
	}

	return plaintext;
}

/*
 * iw_fingerprint
 *		Short, non-reversible label of an API key for support and the UI.
 *
 * HMAC-SHA256 keyed by a fixed prefix, the tenant and the gym, so the same
 * key used by two tenants yields unrelated fingerprints and the
 * fingerprint column cannot be used to link tenants.  The first 12 hex
 * digits are followed by "..." and the key's last 4 characters (or
 * "****" for keys shorter than 12 characters, where 4 characters would
 * give away too much).  Any tail character that is not printable ASCII is
 * shown as '*', so the result is always safe to display.
 */
void
iw_fingerprint(const char *plaintext, const pg_uuid_t *tenant_id,
			   const pg_uuid_t *gym_id, char *out)
{
	static const char hex[] = "0123456789abcdef";
	uint8		hkey[sizeof(IW_FP_KEY_PREFIX) - 1 + 2 * IW_UUID_LEN];
	uint8		digest[EVP_MAX_MD_SIZE];
	unsigned int digest_len = 0;
	size_t		prefix_len = sizeof(IW_FP_KEY_PREFIX) - 1;
	size_t		len = strlen(plaintext);
	unsigned long err;
	char	   *o = out;

	memcpy(hkey, IW_FP_KEY_PREFIX, prefix_len);
	memcpy(hkey + prefix_len, tenant_id->data, IW_UUID_LEN);
	memcpy(hkey + prefix_len + IW_UUID_LEN, gym_id->data, IW_UUID_LEN);

	ERR_clear_error();
	if (HMAC(EVP_sha256(), hkey, (int) sizeof(hkey),
			 (const unsigned char *) plaintext, len,
			 digest, &digest_len) == NULL ||
		digest_len * 2 < IW_FP_HEX_LEN)
	{
		err = ERR_peek_last_error();
		explicit_bzero(digest, sizeof(digest));
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not compute the API key fingerprint: %s",
						iw_ssl_reason(err))));
	}

	for (int i = 0; i < IW_FP_HEX_LEN / 2; i++)
	{
		*o++ = hex[digest[i] >> 4];
		*o++ = hex[digest[i] & 0x0f];
	}
	explicit_bzero(digest, sizeof(digest));

	*o++ = '.';
	*o++ = '.';
	*o++ = '.';
	for (int i = 0; i < IW_FP_TAIL_LEN; i++)
	{
		unsigned char c = '*';

		if (len >= IW_FP_MIN_KEY_LEN)
		{
			c = (unsigned char) plaintext[len - IW_FP_TAIL_LEN + i];
			if (c < 0x21 || c > 0x7e)
				c = '*';
		}
		*o++ = (char) c;
	}
	*o = '\0';
	Assert(o - out < IW_FINGERPRINT_LEN);
}
