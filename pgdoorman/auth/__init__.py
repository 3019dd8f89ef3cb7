"""Authentication: stored secrets, MD5 and SCRAM-SHA-256 for both sides of the pooler.

Everything here is pure (no sockets, no asyncio): protocol framing belongs to the callers.
"""

from pgdoorman.auth.md5 import md5_hash, md5_salted_response, md5_verify
from pgdoorman.auth.mock import UNKNOWN, auth_key, mock_method, mock_scram, plain_salt
from pgdoorman.auth.scram import (
    MECHANISM,
    MECHANISM_PLUS,
    ScramClient,
    ScramServer,
    saslprep,
    scram_verifier,
    server_mechanisms,
    tls_server_end_point,
)
from pgdoorman.auth.secrets import AuthFailed, ScramVerifier, StoredSecret, parse_secret

__all__ = [
    "MECHANISM",
    "MECHANISM_PLUS",
    "UNKNOWN",
    "AuthFailed",
    "ScramClient",
    "ScramServer",
    "ScramVerifier",
    "StoredSecret",
    "auth_key",
    "md5_hash",
    "md5_salted_response",
    "md5_verify",
    "mock_method",
    "mock_scram",
    "parse_secret",
    "plain_salt",
    "saslprep",
    "scram_verifier",
    "server_mechanisms",
    "tls_server_end_point",
]
