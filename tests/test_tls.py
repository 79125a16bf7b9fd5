"""Endpoints behind a private CA: the variables the pipeline sets (``CAL_POSE_CA_CONFIG_MAP``) make the
S3 client and MLflow's client trust the bundle, and nothing else does; ``cal-pose pipeline`` commands
hand the bundle to kfp's client, which reads no such variable itself.

A throwaway CA signs a certificate for 127.0.0.1; an HTTPS server on loopback answers KFP's health
check and 404 to everything else, which each client reports as "not there" only once the TLS
handshake has succeeded.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cal_core import storage
from pipelines import client
from pipelines.cal_pipeline import CA_ENV
from tests import http_stub


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
                 ca: bool) -> x509.Certificate:
    """A certificate for ``subject`` (a CA, or a server on 127.0.0.1) signed by ``issuer`` (None: self-signed)."""
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                      content_commitment=False, key_encipherment=False,
                                                      data_encipherment=False, key_agreement=False,
                                                      encipher_only=False, decipher_only=False), critical=True)
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                        critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(``https://127.0.0.1:<port>``, path of the CA bundle that signed its certificate)."""
    folder = tmp_path_factory.mktemp("tls")
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("cal-pose test CA", ca_key, None, ca=True)
    server_cert = _certificate("127.0.0.1", server_key, ("cal-pose test CA", ca_key), ca=False)
    bundle, chain, key = folder / "ca.crt", folder / "server.crt", folder / "server.key"
    bundle.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    chain.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain, key)
    with http_stub.serve(context) as (url, _):
        yield url, bundle


def _trust(monkeypatch: pytest.MonkeyPatch, bundle: Path | None) -> None:
    """Set (or clear) the variables the pipeline sets on every task when it mounts a CA bundle."""
    for name in CA_ENV:
        if bundle is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(bundle))


def test_s3_client_trusts_the_mounted_ca_bundle(https_server: tuple[str, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    url, bundle = https_server
    monkeypatch.setenv("S3_ENDPOINT_URL", url)
    monkeypatch.setenv("CAL_POSE_S3_RETRIES", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "tls-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "tls-test-secret")
    _trust(monkeypatch, None)
    with pytest.raises(storage.StorageError, match="CERTIFICATE_VERIFY_FAILED"):
        storage.exists("s3://bucket/key")
    _trust(monkeypatch, bundle)
    assert storage.exists("s3://bucket/key") is False  # the handshake passed; the server says 404


def test_mlflow_client_trusts_the_mounted_ca_bundle(https_server: tuple[str, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.utils.rest_utils import MlflowHostCreds, http_request

    url, bundle = https_server
    creds = MlflowHostCreds(url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # requests would send loopback through an HTTPS_PROXY
    _trust(monkeypatch, None)
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        http_request(creds, "/api/2.0/mlflow/experiments/get-by-name", "GET", max_retries=0, timeout=10)
    _trust(monkeypatch, bundle)
    response = http_request(creds, "/api/2.0/mlflow/experiments/get-by-name", "GET", max_retries=0, timeout=10)
    assert response.status_code == 404


def test_kfp_client_trusts_the_ca_bundle_from_the_environment(https_server: tuple[str, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    url, bundle = https_server
    for name in client.KFP_CA_SOURCES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(client.TOKEN_ENV, raising=False)
    monkeypatch.setenv(client.SA_TOKEN_PATH_ENV, str(bundle.parent / "no-token"))
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        client.connect(url)
    for name in client.KFP_CA_SOURCES:  # each variable alone is enough
        monkeypatch.setenv(name, str(bundle))
        assert client.connect(url).get_kfp_healthz().multi_user is False
        monkeypatch.delenv(name)
