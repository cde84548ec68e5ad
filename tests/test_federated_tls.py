"""The throwaway keys of a deployment: the SuperLink's certificate is for 127.0.0.1 and signed by the run's CA,
each SuperNode key loads the way Flower loads it, and the folder holding them is the run's alone."""

import ipaddress
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedlm.federated.tls import make_keys


def test_keys_for_a_deployment_on_loopback(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys", nodes=2)
    ca = x509.load_pem_x509_certificate(keys.ca.read_bytes())
    server = x509.load_pem_x509_certificate(keys.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises unless the CA signed it
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for private_path in keys.node_keys:
        private = load_ssh_private_key(private_path.read_bytes(), password=None)
        public = load_ssh_public_key(private_path.with_suffix(".pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
