"""SCRAM-SHA-256 (RFC 5802, RFC 7677) for both sides, as PostgreSQL speaks it.

Pure: messages in, messages out; the caller does the framing (AuthenticationSASL*, SASLResponse).
Channel binding is SCRAM-SHA-256-PLUS with tls-server-end-point (RFC 5929), the only type PostgreSQL
knows; the caller supplies the certificate hash (tls_server_end_point) and the selected mechanism.
ScramServer also recovers the client's ClientKey, which ScramClient.from_keys can replay to a server
holding the same verifier (SCRAM pass-through: the pooler never learns the password).

The PBKDF2 step is deliberately slow (about 1 ms at 4096 iterations); results are cached per
(password, salt, iterations) so a pool opening many server connections pays it once.
"""

import base64
import binascii
import functools
import hashlib
import hmac
import secrets
import stringprep
import unicodedata

from pgdoorman.auth.md5 import password_bytes
from pgdoorman.auth.secrets import MAX_ITERATIONS, SCRAM_KEY_LEN, AuthFailed, ScramVerifier, StoredSecret

MECHANISM = "SCRAM-SHA-256"
MECHANISM_PLUS = "SCRAM-SHA-256-PLUS"
CBIND_TYPE = "tls-server-end-point"  # the only channel-binding type PostgreSQL supports
DEFAULT_ITERATIONS = 4096  # PostgreSQL's default scram_iterations
SALT_LEN = 16  # as PostgreSQL
NONCE_RAW_LEN = 18  # as PostgreSQL: 18 random bytes, base64 -> 24 printable characters

_GS2_PLUS = b"p=" + CBIND_TYPE.encode() + b",,"  # no authzid: neither side supports a=

# RFC 5929 section 4.1: hash the certificate with its signature's hash, MD5 and SHA-1 upgraded to
# SHA-256. Keys are cryptography's HashAlgorithm.name, values hashlib's names. SHA-224 and SHA-3 are
# in because PostgreSQL (EVP_get_digestbynid) takes any digest OpenSSL has.
_END_POINT_HASH = {
    "md5": "sha256", "sha1": "sha256",
    "sha224": "sha224", "sha256": "sha256", "sha384": "sha384", "sha512": "sha512",
    "sha3-224": "sha3_224", "sha3-256": "sha3_256", "sha3-384": "sha3_384", "sha3-512": "sha3_512",
}


# --- channel binding (RFC 5929 tls-server-end-point) -----------------------------------------------

def tls_server_end_point(cert_der: bytes) -> bytes:
    """The tls-server-end-point channel-binding data of a DER certificate (the server's own, or
    the one a server presented). ValueError if it is undefined, as for Ed25519/Ed448 signatures
    (no hash): PostgreSQL fails there too, so do not offer or use SCRAM-SHA-256-PLUS then."""
    # Imported here: only TLS setups pay for loading cryptography.
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm

    cert = x509.load_der_x509_certificate(cert_der)  # ValueError if not a certificate
    try:
        algorithm = cert.signature_hash_algorithm  # for RSA-PSS: the PSS hash, as OpenSSL reports it
    except UnsupportedAlgorithm as exc:
        raise ValueError(f"tls-server-end-point: unknown certificate signature algorithm: {exc}") from exc
    if algorithm is None:
        raise ValueError("tls-server-end-point is undefined for a certificate whose signature uses no "
                         f"hash (signature algorithm {cert.signature_algorithm_oid.dotted_string})")
    name = _END_POINT_HASH.get(algorithm.name)
    if name is None:
        raise ValueError(f"tls-server-end-point: no digest for signature hash {algorithm.name}")
    # The bytes as given (as sent in the TLS Certificate message), not a re-encoding.
    return hashlib.new(name, cert_der).digest()


def server_mechanisms(cbind_available: bool) -> list[str]:
    """The SASL mechanisms to offer, in PostgreSQL's order (the -PLUS one first)."""
    return [MECHANISM_PLUS, MECHANISM] if cbind_available else [MECHANISM]


def _check_cbind_data(cbind_data: bytes | None) -> bytes | None:
    if cbind_data is not None and not (isinstance(cbind_data, bytes) and cbind_data):
        raise ValueError("cbind_data must be non-empty bytes (the tls-server-end-point hash) or None")
    return cbind_data


# --- SASLprep (RFC 4013), following PostgreSQL's pg_saslprep -------------------------------------

def saslprep(password: str) -> bytes:
    """The bytes PostgreSQL feeds to PBKDF2 for this password.

    PostgreSQL applies SASLprep, and when that fails (prohibited characters, bidi rules, empty
    result) it falls back to the raw password bytes rather than rejecting the password. We do the
    same, or passwords that PostgreSQL accepts would fail through the pooler.
    """
    raw = password_bytes(password)
    if password.isascii():  # PostgreSQL's fast path: ASCII is left as is (controls included)
        return raw
    mapped = []
    for ch in password:
        if stringprep.in_table_c12(ch):  # non-ASCII space -> SPACE
            mapped.append(" ")
        elif not stringprep.in_table_b1(ch):  # B.1: commonly mapped to nothing
            mapped.append(ch)
    if not mapped:
        return raw
    text = unicodedata.normalize("NFKC", "".join(mapped))
    for ch in text:
        if _prohibited(ch):
            return raw
    if any(stringprep.in_table_d1(ch) for ch in text):
        # RFC 3454 section 6: RandALCat text must start and end with RandALCat and hold no LCat.
        if (any(stringprep.in_table_d2(ch) for ch in text)
                or not stringprep.in_table_d1(text[0]) or not stringprep.in_table_d1(text[-1])):
            return raw
    return password_bytes(text)


def _prohibited(ch: str) -> bool:
    return (stringprep.in_table_c12(ch) or stringprep.in_table_c21_c22(ch) or stringprep.in_table_c3(ch)
            or stringprep.in_table_c4(ch) or stringprep.in_table_c5(ch) or stringprep.in_table_c6(ch)
            or stringprep.in_table_c7(ch) or stringprep.in_table_c8(ch) or stringprep.in_table_c9(ch)
            or stringprep.in_table_a1(ch))  # unassigned code points are prohibited too


# --- key derivation --------------------------------------------------------------------------------

def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


@functools.lru_cache(maxsize=256)
def _client_server_keys(prepped: bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """(ClientKey, ServerKey) for a SASLprep'd password; cached because PBKDF2 is slow on purpose."""
    salted = hashlib.pbkdf2_hmac("sha256", prepped, salt, iterations)
    return _hmac(salted, b"Client Key"), _hmac(salted, b"Server Key")


def client_server_keys(password: str, verifier: ScramVerifier) -> tuple[bytes, bytes]:
    """(ClientKey, ServerKey) of a password under a verifier's salt and iterations: what a client
    that sent its password in clear text (hba `password`) gives SCRAM pass-through."""
    return _client_server_keys(saslprep(password), verifier.salt, verifier.iterations)


def _make_verifier(password: str, salt: bytes, iterations: int) -> ScramVerifier:
    if not salt:
        raise ValueError("SCRAM salt must not be empty")
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"SCRAM iteration count out of range: {iterations}")
    client_key, server_key = _client_server_keys(saslprep(password), salt, iterations)
    return ScramVerifier(iterations, salt, hashlib.sha256(client_key).digest(), server_key)


@functools.lru_cache(maxsize=256)
def _verifier_for_plain(password: str) -> ScramVerifier:
    """One random salt per plaintext password per process: stable across connections, and the
    PBKDF2 cost is paid once instead of on every client login."""
    return _make_verifier(password, secrets.token_bytes(SALT_LEN), DEFAULT_ITERATIONS)


def scram_verifier(password: str, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS) -> str:
    """A verifier in PostgreSQL's format, "SCRAM-SHA-256$<iter>:<salt>$<storedkey>:<serverkey>"."""
    return str(_make_verifier(password, secrets.token_bytes(SALT_LEN) if salt is None else salt, iterations))


# --- message helpers --------------------------------------------------------------------------------

def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _b64decode(data: bytes, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error as exc:
        raise AuthFailed(f"SCRAM {what} is not valid base64") from exc


def _new_nonce() -> bytes:
    return _b64(secrets.token_bytes(NONCE_RAW_LEN))


def _printable(value: bytes) -> bool:
    """RFC 5802 "printable": %x21-7E except ",". Nonces must be made of these."""
    return bool(value) and all(0x21 <= c <= 0x7E and c != 0x2C for c in value)


def _check_nonce_arg(nonce: str | None) -> bytes:
    if nonce is None:
        return _new_nonce()
    raw = nonce.encode("utf-8")
    if not _printable(raw):
        raise ValueError("SCRAM nonce must be non-empty printable ASCII without ','")
    return raw


def _attrs(message: bytes, what: str) -> list[tuple[bytes, bytes]]:
    """Split "a=v,b=w,..." into (name, value) pairs; names are single ASCII letters."""
    if b"\0" in message:
        raise AuthFailed(f"SCRAM {what} contains a NUL byte")
    pairs = []
    for part in message.split(b","):
        if len(part) < 2 or part[1:2] != b"=" or not part[:1].isalpha():
            raise AuthFailed(f"malformed attribute in SCRAM {what}: {part[:32]!r}")
        pairs.append((part[:1], part[2:]))
    return pairs


def _expect(pairs: list[tuple[bytes, bytes]], index: int, name: bytes, what: str) -> bytes:
    if len(pairs) <= index or pairs[index][0] != name:
        raise AuthFailed(f"SCRAM {what}: expected attribute {name.decode()}= at position {index + 1}")
    return pairs[index][1]


def _reject_mandatory_extension(pairs: list[tuple[bytes, bytes]], what: str) -> None:
    if pairs and pairs[0][0] == b"m":
        raise AuthFailed(f"SCRAM {what} requires an unsupported extension (m=)")


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


# --- server side: the pooler verifying a client ----------------------------------------------------

_EXPECT_FIRST, _EXPECT_FINAL, _DONE, _FAILED = range(4)
_MOCK_KEY = secrets.token_bytes(32)  # per process; salts for "doomed" exchanges


class ScramServer:
    """Verifies a connecting client. Usage: handle_client_first(SASLInitialResponse payload) ->
    AuthenticationSASLContinue payload; handle_client_final(SASLResponse payload) ->
    AuthenticationSASLFinal payload. Every failure raises AuthFailed; the object is then spent.

    A secret that cannot do SCRAM ("md5", "trust") gets a mock exchange that always fails at the
    proof, like PostgreSQL does, so a client cannot tell a missing verifier from a wrong password.

    Channel binding: cbind_data is this server's tls_server_end_point() hash when the client came
    over TLS and binding is possible (then offer server_mechanisms(True)); the mechanism the client
    named in SASLInitialResponse goes to mechanism= or select_mechanism() before the client-first.
    The gs2 flag is checked against both as PostgreSQL's auth-scram.c does.
    """

    def __init__(self, secret: StoredSecret, *, nonce: str | None = None, salt: bytes | None = None,
                 iterations: int = DEFAULT_ITERATIONS, mock_salt: bytes | None = None,
                 cbind_data: bytes | None = None, mechanism: str = MECHANISM) -> None:
        """nonce (server part) is for tests; salt and iterations need a plain secret; mock_salt is
        the salt a doomed exchange shows (auth/mock.py). A mechanism the client may not use here
        (unknown, or -PLUS without cbind_data) raises AuthFailed."""
        self._doomed = False
        if secret.kind == "scram" and secret.scram is not None:
            if salt is not None or iterations != DEFAULT_ITERATIONS:
                raise ValueError("salt/iterations come from the stored SCRAM verifier")
            self._verifier = secret.scram
        elif secret.kind == "plain" and secret.plain is not None:
            if salt is None and iterations == DEFAULT_ITERATIONS:
                self._verifier = _verifier_for_plain(secret.plain)
            else:
                salt = secrets.token_bytes(SALT_LEN) if salt is None else salt
                self._verifier = _make_verifier(secret.plain, salt, iterations)
        else:
            self._doomed = True
            if mock_salt is None:
                mock_salt = _hmac(_MOCK_KEY, (secret.md5 or secret.kind).encode())[:SALT_LEN]
            self._verifier = ScramVerifier(DEFAULT_ITERATIONS, mock_salt, bytes(32), bytes(32))
        self._server_nonce = _check_nonce_arg(nonce)
        self._cbind_data = _check_cbind_data(cbind_data)
        self._state = _EXPECT_FIRST
        self._plus = False
        self.select_mechanism(mechanism)
        self._cbind_echo = b""  # the exact c= value the client-final must carry
        self._nonce = b""
        self._auth_prefix = b""  # client-first-bare "," server-first ","
        self._client_key = b""

    @property
    def mechanism(self) -> str:
        return MECHANISM_PLUS if self._plus else MECHANISM

    @property
    def salt(self) -> bytes:
        """The verifier's salt (what server-first shows); pass-through needs the same on the server."""
        return self._verifier.salt

    @property
    def iterations(self) -> int:
        return self._verifier.iterations

    @property
    def server_key(self) -> bytes:
        """The verifier's ServerKey: what ScramClient.from_keys checks the real server's signature with."""
        return self._verifier.server_key

    @property
    def client_key(self) -> bytes:
        """The client's ClientKey, recovered from its proof (ClientProof XOR ClientSignature) and
        checked against StoredKey. Only after a successful handle_client_final: RuntimeError before."""
        if self._state != _DONE:
            raise RuntimeError("ClientKey is known only after a successful SCRAM exchange")
        return self._client_key

    def select_mechanism(self, mechanism: str) -> None:
        """The mechanism the client chose in SASLInitialResponse; before handle_client_first."""
        if self._state != _EXPECT_FIRST:
            raise RuntimeError("the SASL mechanism must be selected before the client-first-message")
        if mechanism == MECHANISM_PLUS:
            if self._cbind_data is None:  # we never offered it here
                raise AuthFailed("client selected SCRAM-SHA-256-PLUS, which this connection does not offer "
                                 "(no TLS or no usable server certificate hash)")
            self._plus = True
        elif mechanism == MECHANISM:
            self._plus = False
        else:
            raise AuthFailed(f"client selected an unsupported SASL mechanism: {mechanism[:32]!r}")

    def handle_client_first(self, data: bytes) -> bytes:
        """client-first-message -> server-first-message."""
        if self._state != _EXPECT_FIRST:
            raise AuthFailed("unexpected SCRAM client-first-message")
        self._state = _FAILED
        data = bytes(data)
        flag, sep, rest = data.partition(b",")
        if not sep:
            raise AuthFailed("malformed SCRAM client-first-message: no gs2 header")
        self._check_cbind_flag(flag)
        authzid, sep, bare = rest.partition(b",")
        if not sep:
            raise AuthFailed("malformed SCRAM client-first-message: truncated gs2 header")
        if authzid:
            raise AuthFailed("SCRAM authorization identity (a=) is not supported")
        pairs = _attrs(bare, "client-first-message")
        _reject_mandatory_extension(pairs, "client-first-message")
        # The user name (n=) is ignored, as PostgreSQL does: the startup packet's user counts.
        _expect(pairs, 0, b"n", "client-first-message")
        client_nonce = _expect(pairs, 1, b"r", "client-first-message")
        if not _printable(client_nonce):
            raise AuthFailed("SCRAM client nonce is empty or not printable")
        # Further attributes are optional extensions, ignored (RFC 5802 section 5.1).
        # c= is base64(gs2 header + cbind data); the header is flag ",," since authzid is empty.
        cbind_input = flag + b",,"
        if self._plus:
            assert self._cbind_data is not None  # select_mechanism saw to it
            cbind_input += self._cbind_data
        self._cbind_echo = _b64(cbind_input)
        self._nonce = client_nonce + self._server_nonce
        v = self._verifier
        server_first = b"r=%s,s=%s,i=%d" % (self._nonce, _b64(v.salt), v.iterations)
        self._auth_prefix = bare + b"," + server_first + b","
        self._state = _EXPECT_FINAL
        return server_first

    def _check_cbind_flag(self, flag: bytes) -> None:
        """The gs2 cbind flag against the selected mechanism, in auth-scram.c's order."""
        if flag.startswith(b"p="):
            if not self._plus:
                raise AuthFailed("client requires SCRAM channel binding (gs2 flag p=) but selected "
                                 "SCRAM-SHA-256 without channel binding")
            if flag[2:] != CBIND_TYPE.encode():
                raise AuthFailed(f"unsupported SCRAM channel-binding type {flag[2:34]!r} "
                                 f"(only {CBIND_TYPE})")
        elif flag in (b"n", b"y"):
            if self._plus:
                raise AuthFailed(f"client selected SCRAM-SHA-256-PLUS, but its gs2 flag {flag.decode()!r} "
                                 "carries no channel binding")
            if flag == b"y" and self._cbind_data is not None:
                # The client can bind and believes we cannot, yet we offered -PLUS: someone in the
                # middle removed it from the list (RFC 5802 section 6).
                raise AuthFailed("SCRAM channel binding downgrade: client supports channel binding "
                                 "(gs2 flag y) and thinks the server does not, but this server does")
        else:
            raise AuthFailed(f"malformed SCRAM gs2 channel-binding flag: {flag[:16]!r}")

    def handle_client_final(self, data: bytes) -> bytes:
        """client-final-message -> server-final-message ("v=<signature>"); AuthFailed on a bad proof."""
        if self._state != _EXPECT_FINAL:
            raise AuthFailed("unexpected SCRAM client-final-message")
        self._state = _FAILED
        data = bytes(data)
        pairs = _attrs(data, "client-final-message")
        if _expect(pairs, 0, b"c", "client-final-message") != self._cbind_echo:
            if self._plus:
                raise AuthFailed("SCRAM channel-binding check failed: c= is not the gs2 header plus this "
                                 "server's certificate hash (different TLS endpoint, or a man in the middle)")
            raise AuthFailed("SCRAM channel-binding echo does not match the gs2 header")
        if _expect(pairs, 1, b"r", "client-final-message") != self._nonce:
            raise AuthFailed("SCRAM nonce mismatch")
        # Extensions may sit between r= and p=; the proof must come last.
        names = [name for name, _ in pairs]
        if b"p" not in names[2:] or names.index(b"p", 2) != len(pairs) - 1:
            raise AuthFailed("SCRAM client-final-message must end with the proof (p=)")
        proof = _b64decode(pairs[-1][1], "client proof")
        if len(proof) != len(self._verifier.stored_key):
            raise AuthFailed("SCRAM client proof has the wrong length")
        without_proof = data[: len(data) - len(pairs[-1][1]) - 3]  # drop ",p=<proof>"
        auth_message = self._auth_prefix + without_proof
        v = self._verifier
        # ClientKey = ClientProof XOR ClientSignature; the proof holds iff H(ClientKey) == StoredKey.
        client_key = _xor(proof, _hmac(v.stored_key, auth_message))
        ok = hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key)
        if self._doomed or not ok:
            raise AuthFailed("SCRAM proof does not match (wrong password)")
        self._client_key = client_key
        self._state = _DONE
        return b"v=" + _b64(_hmac(v.server_key, auth_message))


# --- client side: the pooler logging in to PostgreSQL ----------------------------------------------

class ScramClient:
    """Authenticates to a server. client_first() -> SASLInitialResponse payload (send it under the
    name in .mechanism); handle_server_first(AuthenticationSASLContinue payload) -> SASLResponse
    payload; verify_server_final(AuthenticationSASLFinal payload) checks the server knew the password
    too.

    cbind_data is the tls_server_end_point() hash of the certificate the server presented (None
    without TLS). With mechanism SCRAM-SHA-256-PLUS it is bound into the proof; with plain
    SCRAM-SHA-256 its presence makes the gs2 flag "y" (we could bind, the server did not offer it),
    which lets a binding-capable server detect a downgrade. Pick the mechanism with choose_mechanism.
    """

    def __init__(self, password: str, *, nonce: str | None = None, username: str = "",
                 cbind_data: bytes | None = None, mechanism: str = MECHANISM) -> None:
        """nonce is for tests. username defaults to "" like libpq: PostgreSQL ignores it."""
        self._password = saslprep(password)
        self._client_nonce = _check_nonce_arg(nonce)
        # saslname escaping (RFC 5802 section 5.1): "=" -> "=3D", "," -> "=2C".
        self._username = password_bytes(username).replace(b"=", b"=3D").replace(b",", b"=2C")
        self._cbind_data = _check_cbind_data(cbind_data)
        if mechanism == MECHANISM_PLUS:
            if cbind_data is None:
                raise ValueError("SCRAM-SHA-256-PLUS needs cbind_data (the server certificate hash)")
            self._gs2_header = _GS2_PLUS
            self._cbind_input = _GS2_PLUS + cbind_data
        elif mechanism == MECHANISM:
            self._gs2_header = b"n,," if cbind_data is None else b"y,,"
            self._cbind_input = self._gs2_header
        else:
            raise ValueError(f"unsupported SCRAM mechanism {mechanism!r}")
        self._mechanism = mechanism
        # Pass-through (from_keys): known (ClientKey, ServerKey) and the (salt, iterations) they
        # belong to, instead of deriving keys from the password.
        self._keys: tuple[bytes, bytes] | None = None
        self._pinned: tuple[bytes, int] | None = None
        self._state = _EXPECT_FIRST
        self._bare = b""
        self._server_signature = b""

    @classmethod
    def from_keys(cls, client_key: bytes, server_key: bytes, *, salt: bytes, iterations: int,
                  username: str = "", nonce: str | None = None, cbind_data: bytes | None = None,
                  mechanism: str = MECHANISM) -> "ScramClient":
        """A client that proves with a known ClientKey instead of a password (SCRAM pass-through:
        the ClientKey a ScramServer recovered from the pooler's client). The keys only work for the
        verifier they came from, so the server must show the same salt and iteration count; the
        server's signature is checked with server_key."""
        if len(client_key) != SCRAM_KEY_LEN or len(server_key) != SCRAM_KEY_LEN:
            raise ValueError(f"SCRAM keys must be {SCRAM_KEY_LEN} bytes")
        if not salt:
            raise ValueError("SCRAM salt must not be empty")
        if not 1 <= iterations <= MAX_ITERATIONS:
            raise ValueError(f"SCRAM iteration count out of range: {iterations}")
        client = cls("", nonce=nonce, username=username, cbind_data=cbind_data, mechanism=mechanism)
        client._keys = (bytes(client_key), bytes(server_key))
        client._pinned = (bytes(salt), iterations)
        return client

    @staticmethod
    def choose_mechanism(offered: list[str], cbind_data: bytes | None, require_binding: bool) -> str:
        """The mechanism to answer AuthenticationSASL with, as libpq chooses: -PLUS when offered and
        we can bind, else SCRAM-SHA-256. AuthFailed when binding is required and impossible (the
        caller must also refuse non-SASL authentication then, as libpq's channel_binding=require)."""
        if MECHANISM_PLUS in offered and cbind_data is not None:
            return MECHANISM_PLUS
        if require_binding:
            if cbind_data is None:
                raise AuthFailed("channel binding is required, but the server connection does not use "
                                 "TLS with a certificate that supports channel binding")
            raise AuthFailed("channel binding is required, but server did not offer an authentication "
                             "method that supports channel binding")
        if MECHANISM in offered:
            return MECHANISM
        raise AuthFailed("server offers no supported SASL mechanism")

    @property
    def mechanism(self) -> str:
        return self._mechanism

    def client_first(self) -> bytes:
        """client-first-message: gs2 header ("p=tls-server-end-point", "y" or "n"), no authzid."""
        self._bare = b"n=%s,r=%s" % (self._username, self._client_nonce)
        return self._gs2_header + self._bare

    def handle_server_first(self, data: bytes) -> bytes:
        """server-first-message -> client-final-message carrying the proof."""
        if self._state != _EXPECT_FIRST or not self._bare:
            raise AuthFailed("unexpected SCRAM server-first-message")
        self._state = _FAILED
        data = bytes(data)
        pairs = _attrs(data, "server-first-message")
        _reject_mandatory_extension(pairs, "server-first-message")
        nonce = _expect(pairs, 0, b"r", "server-first-message")
        if (len(nonce) <= len(self._client_nonce) or not nonce.startswith(self._client_nonce)
                or not _printable(nonce)):
            raise AuthFailed("SCRAM server nonce does not extend the client nonce")
        salt = _b64decode(_expect(pairs, 1, b"s", "server-first-message"), "salt")
        if not salt:
            raise AuthFailed("SCRAM salt is empty")
        iter_text = _expect(pairs, 2, b"i", "server-first-message")
        # Length check first: int() of a huge digit string is slow (and refused past 4300 digits).
        if not (iter_text.isdigit() and len(iter_text) <= 10 and 1 <= int(iter_text) <= MAX_ITERATIONS):
            raise AuthFailed(f"SCRAM iteration count is invalid: {iter_text[:16]!r}")
        iterations = int(iter_text)
        if self._keys is None:
            client_key, server_key = _client_server_keys(self._password, salt, iterations)
        else:
            if self._pinned != (salt, iterations):
                raise AuthFailed("server's SCRAM verifier has a different salt or iteration count than "
                                 "the pooler's; pass-through needs the same verifier")
            client_key, server_key = self._keys
        without_proof = b"c=" + _b64(self._cbind_input) + b",r=" + nonce
        auth_message = self._bare + b"," + data + b"," + without_proof
        proof = _xor(client_key, _hmac(hashlib.sha256(client_key).digest(), auth_message))
        self._server_signature = _hmac(server_key, auth_message)
        self._state = _EXPECT_FINAL
        return without_proof + b",p=" + _b64(proof)

    def verify_server_final(self, data: bytes) -> None:
        """Check "v=<ServerSignature>"; AuthFailed on "e=<error>" or a wrong signature."""
        if self._state != _EXPECT_FINAL:
            raise AuthFailed("unexpected SCRAM server-final-message")
        self._state = _FAILED
        pairs = _attrs(bytes(data), "server-final-message")
        name, value = pairs[0]
        if name == b"e":
            raise AuthFailed(f"server reported SCRAM error: {value[:64].decode('ascii', 'replace')}")
        signature = _b64decode(_expect(pairs, 0, b"v", "server-final-message"), "server signature")
        if not hmac.compare_digest(signature, self._server_signature):
            raise AuthFailed("SCRAM server signature does not match: the server does not know the password")
        self._state = _DONE
