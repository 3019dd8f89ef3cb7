"""A throwaway self-signed server certificate for `--tls`, made with `cryptography` at run time.

Its own small module rather than an import of tests/tlscerts.py: bench runs from a checkout where tests/
is not a package, and must not depend on the test suite. pgbench's sslmode=require checks no certificate,
so one self-signed certificate (CN localhost, SAN localhost and 127.0.0.1) serves every target.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import tempfile
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# What the report says the handshakes use: ECDSA P-256, the common choice for new certificates
# (Let's Encrypt's default); the TLS version and cipher are whatever OpenSSL negotiates (TLS 1.3).
KEY_DESCRIPTION = "self-signed ECDSA P-256, CN localhost"


@dataclass
class ServerCert:
    directory: str
    cert_path: str
    key_path: str
    cert_pem: bytes
    key_pem: bytes

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def make_server_cert(cn: str = "localhost", hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
                     owner: str | None = None) -> ServerCert:
    """Write server.crt and server.key (mode 0600) into a new temp dir. When running as root, the dir
    and files are chowned to `owner` (PgBouncer runs as postgres and must read the key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    directory = tempfile.mkdtemp(prefix="pgdoorman-bench-tls-")
    out = ServerCert(directory, os.path.join(directory, "server.crt"), os.path.join(directory, "server.key"),
                     cert_pem, key_pem)
    for path, data in ((out.cert_path, cert_pem), (out.key_path, key_pem)):
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600)
    if owner and os.geteuid() == 0:
        for path in (directory, out.cert_path, out.key_path):
            shutil.chown(path, owner, owner)
    return out
