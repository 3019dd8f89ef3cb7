"""TLS settings checked at load time: protocol lists, and certificate, key and CA files that the ssl
module can actually use, so a reload with a broken file is refused before any worker takes it."""

from __future__ import annotations

import os
import ssl

_VERSIONS = {"tlsv1.2": ssl.TLSVersion.TLSv1_2, "tlsv1.3": ssl.TLSVersion.TLSv1_3}


def parse_protocols(text: str) -> tuple[ssl.TLSVersion, ssl.TLSVersion]:
    """"secure" or a comma list of tlsv1.2/tlsv1.3 -> (minimum, maximum) version. Nothing older than
    TLS 1.2 is offered: 1.0 and 1.1 are deprecated (RFC 8996)."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names == ["secure"] or names == ["all"]:
        return ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
    if not names:
        raise ValueError("must name at least one protocol")
    unknown = [n for n in names if n not in _VERSIONS]
    if unknown:
        raise ValueError(f"unknown TLS protocol {unknown[0]!r} (expected secure, tlsv1.2, tlsv1.3 or a "
                         "comma-separated list of those)")
    versions = sorted(_VERSIONS[n] for n in names)
    return versions[0], versions[-1]


def resolve(path: str, config_path: str) -> str:
    """A relative path is relative to the config file's directory (the file may be read from
    anywhere); "<config>" texts have none, so theirs stay relative to the working directory."""
    if not path or os.path.isabs(path) or not os.path.isfile(config_path):
        return path
    return os.path.join(os.path.dirname(os.path.abspath(config_path)), path)


def check_pair(certificate: str, key: str) -> None:
    """ValueError saying what is wrong if the pair cannot serve TLS (unreadable, not PEM, mismatch)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for path in (certificate, key):  # load_cert_chain's errors do not say which file is missing
        if not os.path.exists(path):
            raise ValueError(f"no such file: {path}")
    try:
        context.load_cert_chain(certificate, key)
    except PermissionError as exc:
        raise ValueError(f"cannot read {exc.filename}: permission denied") from None
    except ssl.SSLError as exc:
        why = exc.reason or exc
        raise ValueError(f"certificate {certificate} and key {key} cannot be used: {why}") from None
    except OSError as exc:
        raise ValueError(f"cannot read {certificate} / {key}: {exc.strerror or exc}") from None


def check_ca(path: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=path)
    except FileNotFoundError:
        raise ValueError(f"no such file: {path}") from None
    except ssl.SSLError as exc:
        raise ValueError(f"{path} holds no usable CA certificate: {exc.reason or exc}") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
