"""Throwaway TLS and SuperNode-authentication material for a deployment on loopback.

A CA made for this one run signs the SuperLink's certificate for 127.0.0.1, so every SuperNode and the `flwr` CLI
verify the SuperLink they talk to; each SuperNode gets a P-384 key pair whose public half the SuperLink registers,
so only those nodes may join. Nothing here outlives the run's folder, and no key leaves it.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedlm import atomic
from fedlm.net import LOOPBACK

VALID_FOR = datetime.timedelta(days=2)


@dataclass(frozen=True)
class DeploymentKeys:
    ca: Path  # the CA certificate every client verifies the SuperLink with
    server_cert: Path
    server_key: Path
    node_keys: list[Path]  # each SuperNode's private key (OpenSSH), its public key beside it as `.pub`


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_keys(folder: Path, nodes: int) -> DeploymentKeys:
    """Write a CA, the SuperLink's certificate for 127.0.0.1 and `nodes` SuperNode key pairs into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)  # the private keys inside are the run's own
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedlm throwaway CA"))
        .issuer_name(_name("fedlm throwaway CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALID_FOR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(LOOPBACK))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALID_FOR)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    keys = DeploymentKeys(folder / "ca.pem", folder / "superlink.pem", folder / "superlink.key", [])
    atomic.write_bytes(keys.ca, ca_cert.public_bytes(serialization.Encoding.PEM))
    atomic.write_bytes(keys.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    atomic.write_bytes(keys.server_key, _pem_key(server_key))
    for index in range(nodes):
        node_key = ec.generate_private_key(ec.SECP384R1())
        path = folder / f"supernode-{index}"
        private = node_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        atomic.write_bytes(path, private)
        public = node_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        atomic.write_bytes(path.with_suffix(".pub"), public)
        keys.node_keys.append(path)
    return keys
