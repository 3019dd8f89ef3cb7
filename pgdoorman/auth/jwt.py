"""JWT logins, PgDoorman style: the configured password is "jwt-pkey-fpath:/path/public.pem" and the
client sends a signed JWT as its cleartext password.

Signature checking is PyJWT's (with cryptography); everything around it is deliberately strict and
done here: the accepted algorithms come from the key file only (never from the token), and the time
claims are checked against an injectable clock because PyJWT has none.
"""

import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

# Absolute import (Python 3): this is PyJWT, not this module.
import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from pgdoorman.auth.secrets import JWT_PREFIX, AuthFailed

MAX_TOKEN_LEN = 16 * 1024  # real tokens are well under 2 KiB; bounds the work done before the signature
MAX_KEY_FILE = 64 * 1024  # a public key or certificate PEM is a few KiB at most
MIN_RSA_BITS = 2048

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey

_EC_ALGS: dict[str, str] = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_PEM_LABEL_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_KEY_LABELS = {b"PUBLIC KEY", b"RSA PUBLIC KEY", b"CERTIFICATE"}
# The registered time claims; a JWT without exp would be a password that never expires.
_TIME_CLAIMS = ("exp", "nbf", "iat")

FileStamp = tuple[int, int, int, int]  # (st_mtime_ns, st_ctime_ns, st_size, st_ino)


def jwt_key_path(password: str) -> str | None:
    """The public key path of a "jwt-pkey-fpath:<path>" password, None for any other password."""
    if password.startswith(JWT_PREFIX) and len(password) > len(JWT_PREFIX):
        return password[len(JWT_PREFIX):]
    return None


@dataclass(frozen=True, slots=True)
class JwtKey:
    """A verification key and the algorithms it may verify, both fixed by the key file."""

    path: str
    public_key: PublicKey = field(repr=False)
    algorithms: tuple[str, ...]
    description: str  # for logs, e.g. "RSA-2048", "EC P-256", "Ed25519"

    @classmethod
    def load(cls, path: str) -> "JwtKey":
        """Read a PEM public key or X.509 certificate; ValueError (naming the file) if unusable."""
        return cls.from_pem(path, _read_key_file(path)[1])

    @classmethod
    def from_pem(cls, path: str, data: bytes) -> "JwtKey":
        """Parse PEM bytes read from path (path is only used in messages)."""
        labels = _PEM_LABEL_RE.findall(data)
        if not labels:
            raise ValueError(f"JWT key file {path}: not a PEM file")
        # Refuse rather than pick the public half: a private key has no business on the pooler.
        if any(b"PRIVATE KEY" in label for label in labels):
            raise ValueError(f"JWT key file {path}: holds a private key; configure the public key "
                             "(or a certificate) only")
        usable = [label for label in labels if label in _KEY_LABELS]
        if len(usable) != 1:
            found = ", ".join(sorted({label.decode("ascii") for label in labels}))
            raise ValueError(f"JWT key file {path}: needs exactly one PUBLIC KEY or CERTIFICATE block, "
                             f"found {len(usable)} (blocks: {found})")
        try:
            if usable[0] == b"CERTIFICATE":
                # The certificate is only a key container: its validity dates and issuer are not checked.
                loaded: object = x509.load_pem_x509_certificate(data).public_key()
            else:
                loaded = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"JWT key file {path}: cannot parse the {usable[0].decode('ascii')}: {exc}") \
                from None
        return cls._classify(path, loaded)

    @classmethod
    def _classify(cls, path: str, key: object) -> "JwtKey":
        if isinstance(key, rsa.RSAPublicKey):
            if key.key_size < MIN_RSA_BITS:
                raise ValueError(f"JWT key file {path}: RSA key is {key.key_size} bits, "
                                 f"at least {MIN_RSA_BITS} are required")
            # PS* left out on purpose: each extra algorithm widens what a token gets to choose.
            return cls(path, key, ("RS256", "RS384", "RS512"), f"RSA-{key.key_size}")
        if isinstance(key, ec.EllipticCurvePublicKey):
            alg = _EC_ALGS.get(key.curve.name)
            if alg is None:
                raise ValueError(f"JWT key file {path}: EC curve {key.curve.name} is not supported "
                                 "(use P-256, P-384 or P-521)")
            return cls(path, key, (alg,), f"EC {key.curve.name}")
        if isinstance(key, ed25519.Ed25519PublicKey):
            return cls(path, key, ("EdDSA",), "Ed25519")
        if isinstance(key, ed448.Ed448PublicKey):
            return cls(path, key, ("EdDSA",), "Ed448")
        raise ValueError(f"JWT key file {path}: {type(key).__name__} keys are not supported "
                         "(use RSA >= 2048 bits, EC P-256/P-384/P-521 or Ed25519)")


def _read_key_file(path: str) -> tuple[FileStamp, bytes]:
    """Read the file with the stamp taken *before* reading, from the same open file: if it is
    rewritten meanwhile, the stored stamp is stale and the next lookup re-reads it."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise ValueError(f"JWT key file {path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE:
        raise ValueError(f"JWT key file {path}: larger than {MAX_KEY_FILE} bytes, not a public key")
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino), data


class JwtKeyCache:
    """Keys by configured path, re-read when the file's (mtime_ns, size, inode) changes.

    Fails closed: when a file that loaded before becomes unreadable or invalid, get() raises
    ValueError and forgets the old key instead of serving it, so rotating or revoking a key by
    editing (or deleting) the file takes effect on the next login. os.stat follows symlinks, so
    atomic symlink swaps (Kubernetes secret volumes) are seen too. One stat per login is a local
    syscall, cheap enough for the event loop. Not thread-safe (one asyncio loop uses it).
    """

    def __init__(self) -> None:
        self._keys: dict[str, tuple[FileStamp, JwtKey]] = {}

    def get(self, path: str) -> JwtKey:
        cached = self._keys.get(path)
        try:
            st = os.stat(path)
        except OSError as exc:
            self._keys.pop(path, None)
            raise ValueError(f"JWT key file {path}: cannot read: {exc.strerror or exc}") from None
        if cached is not None and cached[0] == (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino):
            return cached[1]
        self._keys.pop(path, None)
        stamp, data = _read_key_file(path)
        key = JwtKey.from_pem(path, data)
        self._keys[path] = (stamp, key)
        return key

    def reload(self) -> dict[str, str]:
        """Re-read every cached file now (config RELOAD); returns {path: error} for files that
        failed, which are dropped so their logins are refused until the file is fixed."""
        errors: dict[str, str] = {}
        for path in list(self._keys):
            self._keys.pop(path)
            try:
                self.get(path)
            except ValueError as exc:
                errors[path] = str(exc)
        return errors

    def clear(self) -> None:
        self._keys.clear()

    def __len__(self) -> int:
        return len(self._keys)


def _short(value: object, limit: int = 64) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def verify_jwt(token: str, key: JwtKey, *, user: str, claim: str = "sub", leeway: float = 30.0,
               now: float | None = None, audience: str | None = None) -> dict[str, Any]:
    """Verify a JWT sent as a password for user; returns its claims, raises AuthFailed otherwise.

    `claim` must be a string equal to `user` exactly (no case folding). `exp` is required; exp, nbf
    and iat are checked against `now` (default: time.time()) with `leeway` seconds. With no
    `audience`, a token carrying an `aud` claim is refused (it was minted for some other service);
    with one, `aud` must contain it.
    """
    if not (math.isfinite(leeway) and leeway >= 0):
        raise ValueError(f"JWT leeway must be a non-negative number of seconds, not {leeway!r}")
    if len(token) > MAX_TOKEN_LEN:
        raise AuthFailed(f"JWT is {len(token)} characters long, more than {MAX_TOKEN_LEN}")
    if not token.isascii() or token.count(".") != 2:
        raise AuthFailed("JWT is not three dot-separated base64url parts")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise AuthFailed(f"JWT header is malformed: {exc}") from None

    # Checked here, before PyJWT sees the token, so algorithm confusion (alg none, or HS256 keyed
    # with the public key's bytes) is refused by name and does not depend on PyJWT's key checks.
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise AuthFailed("JWT header has no 'alg'")
    if alg.lower() == "none":
        raise AuthFailed("JWT is unsigned (alg 'none')")
    if alg.upper().startswith("HS"):
        raise AuthFailed(f"JWT algorithm {_short(alg)} is symmetric; only public-key signatures are accepted")
    if alg not in key.algorithms:
        raise AuthFailed(f"JWT algorithm {_short(alg)} does not match the key {key.path} "
                         f"({key.description} allows {', '.join(key.algorithms)})")
    if "crit" in header:
        raise AuthFailed("JWT header has critical extensions ('crit'), none are supported")

    try:
        claims = jwt.decode(
            token, key.public_key, algorithms=list(key.algorithms), audience=audience,
            # Time claims are ours (injectable clock, finite-number checks); sub may not be the claim used.
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_sub": False},
        )
    except jwt.InvalidSignatureError:
        raise AuthFailed(f"JWT signature does not match the key {key.path}") from None
    except jwt.InvalidAudienceError as exc:
        what = "JWT has an 'aud' claim but no audience is configured" if audience is None else (
            f"JWT audience is not {audience!r} ({exc})")
        raise AuthFailed(what) from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthFailed(f"JWT has no {exc.claim!r} claim") from None
    except jwt.PyJWTError as exc:
        raise AuthFailed(f"JWT refused: {exc}") from None

    _check_times(claims, time.time() if now is None else now, leeway)

    value = claims.get(claim)
    if value is None:
        raise AuthFailed(f"JWT has no claim {claim!r}")
    if not isinstance(value, str):
        raise AuthFailed(f"JWT claim {claim!r} is not a string: {_short(value)}")
    if value != user:
        raise AuthFailed(f"JWT claim {claim!r} is {_short(value)}, not the user {user!r}")
    return claims


def _check_times(claims: dict[str, Any], now: float, leeway: float) -> None:
    times: dict[str, float] = {}
    for name in _TIME_CLAIMS:
        if name not in claims:
            continue
        v = claims[name]
        # bool is an int; json.loads also accepts NaN/Infinity (exp=Infinity would never expire),
        # and an int too big for a float overflows.
        try:
            t = float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan
        except OverflowError:
            t = math.nan
        if not math.isfinite(t):
            raise AuthFailed(f"JWT claim {name!r} is not a finite number: {_short(v)}")
        times[name] = t
    if "exp" not in times:
        raise AuthFailed("JWT has no 'exp' claim (tokens must expire)")
    # RFC 7519: valid only *before* exp, hence >=.
    if now >= times["exp"] + leeway:
        raise AuthFailed(f"JWT expired {now - times['exp']:.0f}s ago (leeway {leeway:g}s)")
    if "nbf" in times and times["nbf"] > now + leeway:
        raise AuthFailed(f"JWT not valid yet: nbf is {times['nbf'] - now:.0f}s in the future")
    if "iat" in times and times["iat"] > now + leeway:
        raise AuthFailed(f"JWT issued in the future: iat is {times['iat'] - now:.0f}s ahead")
