"""TLS for the listeners: load the configured certificate, or generate a self-signed one once.

What it does: builds the server-side ``ssl.SSLContext`` used for STARTTLS and implicit TLS (minimum
version from config, no compression, server cipher preference). When no certificate is configured it
creates a self-signed ECDSA P-256 certificate for the gateway's hostname in ``<state_dir>/tls/`` on
first start and reuses it afterwards.

Reads: ``tls.cert_file``/``tls.key_file`` or ``<state_dir>/tls/{cert,key}.pem``.

Security notes: the generated private key is written with mode 0600 (created atomically with
``os.open(..., 0o600)``); a self-signed certificate is for tests and demos, not customers — the log
says so at start.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.core.errors import ConfigError

log = logging.getLogger("mailward.tls")


def ensure_self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """Return (cert, key) paths in ``directory``, creating a self-signed pair if missing."""
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost")]
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    log.warning("generated a self-signed TLS certificate in %s (not for production)", directory)
    return cert_path, key_path


def server_context(cert_file: Path, key_file: Path, min_version: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except FileNotFoundError:
        raise ConfigError(str(cert_file), "tls.cert_file", "file not found") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            str(cert_file),
            "tls.cert_file",
            f"cannot load certificate/key: {exc.__class__.__name__}",
        ) from None
    return ctx
