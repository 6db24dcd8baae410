"""The local control plane's PKI, made with ``cryptography`` (no openssl or cfssl needed).

One self-signed CA signs the apiserver's serving certificate and every client
certificate; the apiserver trusts client certificates from the same CA
(``--client-ca-file``), so identities are plain subject names: ``CN=admin,
O=system:masters`` for humans and tests, ``CN=system:kube-controller-manager`` and
``CN=system:kube-scheduler`` for the components that RBAC bootstraps roles for. The
service-account key pair signs and verifies projected tokens.

Everything is generated once per state directory and reused, so a restarted cluster keeps
its kubeconfig valid.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY: Final = dt.timedelta(days=365)
RENEW_BEFORE: Final = dt.timedelta(days=7)

CLIENTS: Final[Mapping[str, tuple[str, tuple[str, ...]]]] = {
    # file stem: (common name, organisations)
    "admin": ("admin", ("system:masters",)),
    "kube-controller-manager": ("system:kube-controller-manager", ()),
    "kube-scheduler": ("system:kube-scheduler", ()),
    "kwok": ("kwok-controller", ("system:masters",)),
    "kuberay": ("kuberay-operator", ("system:masters",)),
}
"""Client identities. kwok and KubeRay act as admins: simpler than mirroring their RBAC."""

_Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class CertPair:
    """A PEM certificate and its PEM private key on disk."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """All the files the components are pointed at."""

    directory: Path
    ca: CertPair
    apiserver: CertPair
    clients: Mapping[str, CertPair]
    sa_key: Path
    sa_pub: Path
    front_proxy_ca: CertPair
    front_proxy_client: CertPair


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    """P-256: fast to generate and accepted by every Kubernetes component."""
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: _Key) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)


def _name(cn: str, orgs: Sequence[str] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _load_key(path: Path) -> _Key:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def _fresh(pair: CertPair, issuer: x509.Certificate | None) -> bool:
    """Reusable: present, not near expiry, and signed by the current CA."""
    if not (pair.cert.exists() and pair.key.exists()):
        return False
    cert = _load_cert(pair.cert)
    if cert.not_valid_after_utc - _now() < RENEW_BEFORE:
        return False
    return issuer is None or cert.issuer == issuer.subject


def _make_ca(pair: CertPair, cn: str = "gpumesh-dev-ca") -> None:
    key = _new_key()
    name = _name(cn)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(pair.key, key)
    _write_cert(pair.cert, cert)


def _issue(
    pair: CertPair,
    ca: CertPair,
    *,
    cn: str,
    orgs: Sequence[str] = (),
    server_names: Sequence[str] = (),
    server_ips: Sequence[str] = (),
) -> None:
    """Sign a leaf: a serving cert when SANs are given, a client cert otherwise."""
    ca_cert = _load_cert(ca.cert)
    ca_key = _load_key(ca.key)
    key = _new_key()
    now = _now()
    serving = bool(server_names or server_ips)
    usage = [ExtendedKeyUsageOID.SERVER_AUTH] if serving else [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn, orgs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            ),
            critical=False,
        )
    )
    if serving:
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(pair.key, key)
    _write_cert(pair.cert, cert)


def ensure_pki(directory: Path, *, service_ip: str) -> Pki:
    """Create (or reuse) every certificate and key the control plane needs.

    ``service_ip`` is the first address of the service range: in-cluster clients reach
    the apiserver as the ``kubernetes`` Service there, so it must be a SAN.
    """
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)

    def pair(stem: str) -> CertPair:
        return CertPair(directory / f"{stem}.crt", directory / f"{stem}.key")

    ca = pair("ca")
    renewed_ca = not _fresh(ca, None)
    if renewed_ca:
        _make_ca(ca)
    ca_cert = _load_cert(ca.cert)

    apiserver = pair("apiserver")
    if renewed_ca or not _fresh(apiserver, ca_cert):
        _issue(
            apiserver,
            ca,
            cn="kube-apiserver",
            server_names=(
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster",
                "kubernetes.default.svc.cluster.local",
            ),
            server_ips=("127.0.0.1", "::1", service_ip),
        )

    clients: dict[str, CertPair] = {}
    for stem, (cn, orgs) in CLIENTS.items():
        clients[stem] = pair(stem)
        if renewed_ca or not _fresh(clients[stem], ca_cert):
            _issue(clients[stem], ca, cn=cn, orgs=orgs)

    sa_key, sa_pub = directory / "sa.key", directory / "sa.pub"
    if not (sa_key.exists() and sa_pub.exists()):
        # RSA: every token consumer supports RS256; ES256 support is less universal.
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_key(sa_key, key)
        sa_pub.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    # The aggregation layer's CA. Unused until an aggregated API appears, but without it
    # every delegating component logs a "missing requestheader-client-ca-file" error.
    fp_ca, fp_client = pair("front-proxy-ca"), pair("front-proxy-client")
    renewed_fp = not _fresh(fp_ca, None)
    if renewed_fp:
        _make_ca(fp_ca, "gpumesh-dev-front-proxy-ca")
    if renewed_fp or not _fresh(fp_client, _load_cert(fp_ca.cert)):
        _issue(fp_client, fp_ca, cn="front-proxy-client")
    return Pki(directory, ca, apiserver, clients, sa_key, sa_pub, fp_ca, fp_client)
