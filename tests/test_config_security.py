"""Config errors of the security keys (TLS files, modes, protocols): FILE:LINE: key: what."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from tlscerts import CertAuthority

from pgdoorman.config import ConfigError, parse_config
from pgdoorman.config.tlsfiles import parse_protocols


def error(text: str, path: str = "f.toml") -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(text, path)
    return str(e.value)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    return CertAuthority(tmp_path_factory.mktemp("cfgtls"))


def test_tls_mode_needs_certificate_and_key() -> None:
    assert error('[general]\nport = 1\ntls_mode = "require"\n') == (
        "f.toml:3: general.tls_mode: tls_mode = 'require' needs tls_certificate")
    assert error('[general]\ntls_mode = "sometimes"\n') == (
        "f.toml:2: general.tls_mode: invalid value 'sometimes' (expected one of: disable, allow, prefer, "
        "require, verify-ca, verify-full)")


def test_verify_modes_need_a_ca(ca: CertAuthority) -> None:
    server = ca.issue("s", "localhost", server=True)
    text = (f'[general]\ntls_mode = "verify-ca"\ntls_certificate = "{server.cert}"\n'
            f'tls_private_key = "{server.key}"\n')
    assert error(text) == ("f.toml:2: general.tls_mode: tls_mode = 'verify-ca' needs tls_ca_file to check "
                           "client certificates against")
    assert error('[general]\nserver_tls_mode = "verify-full"\n') == (
        "f.toml:2: general.server_tls_mode: server_tls_mode = 'verify-full' needs server_tls_ca_file")


def test_broken_files_name_their_key(ca: CertAuthority, tmp_path: Path) -> None:
    server = ca.issue("s2", "localhost", server=True)
    other = ca.issue("s3", "localhost", server=True)
    missing = tmp_path / "nope.crt"
    head = '[general]\ntls_mode = "prefer"\n'
    text = f'{head}tls_certificate = "{missing}"\ntls_private_key = "{server.key}"\n'
    assert error(text) == f"f.toml:3: general.tls_certificate: no such file: {missing}"
    # a key that is not the certificate's
    text = f'{head}tls_certificate = "{server.cert}"\ntls_private_key = "{other.key}"\n'
    assert "f.toml:3: general.tls_certificate: certificate" in error(text)
    assert "cannot be used" in error(text)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert error(f'[general]\ntls_ca_file = "{junk}"\n').startswith(
        f"f.toml:2: general.tls_ca_file: {junk} holds no usable CA certificate")
    assert error(f'[general]\nserver_tls_certificate = "{server.cert}"\n') == (
        "f.toml:2: general.server_tls_certificate: needs server_tls_key too")


def test_relative_paths_are_relative_to_the_config_file(ca: CertAuthority, tmp_path: Path) -> None:
    server = ca.issue("rel", "localhost", server=True)
    config = server.cert.parent / "pgdoorman.toml"
    text = '[general]\ntls_mode = "prefer"\ntls_certificate = "rel.crt"\ntls_private_key = "rel.key"\n'
    config.write_text(text)
    general = parse_config(text, str(config)).general
    assert general.tls_certificate == str(server.cert)
    assert general.tls_private_key == str(server.key)


@pytest.mark.parametrize(("text", "expected"), [
    ("secure", (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)),
    ("tlsv1.3", (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3)),
    ("TLSv1.2", (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)),
    ("tlsv1.3, tlsv1.2", (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)),
])
def test_protocols(text: str, expected: tuple[ssl.TLSVersion, ssl.TLSVersion]) -> None:
    assert parse_protocols(text) == expected


def test_old_protocols_refused() -> None:
    assert error('[general]\ntls_protocols = "tlsv1.1"\n') == (
        "f.toml:2: general.tls_protocols: unknown TLS protocol 'tlsv1.1' (expected secure, tlsv1.2, tlsv1.3 "
        "or a comma-separated list of those)")
