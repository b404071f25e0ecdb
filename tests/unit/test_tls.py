"""Tests for sidecar.tls's bundle: files and the Workload API build material the same way.

Real certificates from ``sidecar.pki``; the messages about files are the ones users already know.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from support import CertFactory, MemoryLink, client_context

from sidecar import pki
from sidecar.config import TLSFiles
from sidecar.errors import CertificateError
from sidecar.tls import Origin, PemBundle, TrustBundle, load_material, read_files


def files_of(ca: CertFactory, name: str = "orders") -> TLSFiles:
    leaf = ca.leaf(name)
    return TLSFiles(cert=leaf.cert, key=leaf.key, ca=ca.ca_file)


def test_files_become_a_bundle_of_their_bytes(ca: CertFactory) -> None:
    files = files_of(ca)
    bundle = read_files(files)
    assert bundle.chain == files.cert.read_bytes() and bundle.key == files.key.read_bytes()
    assert bundle.trust == (TrustBundle(None, files.ca.read_bytes()),) and bundle.crl is None
    assert bundle.origin.source == "files" and bundle.trust_domains == ()
    assert "PRIVATE KEY" not in repr(bundle)  # the key stays out of logs and reprs


def test_material_hands_over_the_very_bytes_it_was_built_from(ca: CertFactory) -> None:
    files = files_of(ca)
    material = load_material(read_files(files))
    assert material.bundle == read_files(files)
    again = load_material(pickle.loads(pickle.dumps(material.bundle)))  # how a worker rebuilds it
    assert again.identity == material.identity and again.source == "files"


def test_a_combined_cert_and_key_file_is_read_once(ca: CertFactory, tmp_path: Path) -> None:
    leaf = ca.leaf("orders")
    both = tmp_path / "both.pem"
    both.write_bytes(leaf.cert.read_bytes() + leaf.key.read_bytes())
    material = load_material(read_files(TLSFiles(cert=both, key=both, ca=ca.ca_file)))
    assert material.identity.serial == format(leaf.serial, "x")
    assert material.bundle.chain == material.bundle.key == both.read_bytes()


def test_messages_about_files_name_the_files(ca: CertFactory, rogue_ca: CertFactory, tmp_path: Path) -> None:
    leaf, other = ca.leaf("orders"), ca.leaf("other")
    mismatched = TLSFiles(cert=leaf.cert, key=other.key, ca=ca.ca_file)
    with pytest.raises(CertificateError) as info:
        load_material(read_files(mismatched))
    assert str(info.value) == f"key file '{other.key}' does not match certificate '{leaf.cert}'"

    stray = rogue_ca.leaf("stray")
    with pytest.raises(CertificateError) as info:
        load_material(read_files(TLSFiles(cert=stray.cert, key=stray.key, ca=ca.ca_file)))
    assert str(info.value) == (
        f"certificate '{stray.cert}': certificate '{stray.issued.cert.subject.rfc4514_string()}' "
        f"is not issued by any CA in the bundle '{ca.ca_file}'"
    )

    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a certificate")
    with pytest.raises(CertificateError) as info:
        load_material(read_files(TLSFiles(cert=leaf.cert, key=leaf.key, ca=garbage)))
    assert str(info.value).startswith(f"CA bundle file '{garbage}': not a valid PEM certificate")
    with pytest.raises(CertificateError) as info:
        read_files(TLSFiles(cert=leaf.cert, key=leaf.key, ca=ca.ca_file, crl=tmp_path / "absent.pem"))
    assert str(info.value) == f"reading CRL file '{tmp_path / 'absent.pem'}': No such file or directory"
    expired = ca.expired("old")
    with pytest.raises(CertificateError) as info:
        load_material(read_files(TLSFiles(cert=expired.cert, key=expired.key, ca=ca.ca_file)))
    assert str(info.value).startswith(f"certificate '{expired.cert}' expired at ")


def _workload_bundle(leaf: pki.Issued, *trust: TrustBundle) -> PemBundle:
    spiffe_id = "spiffe://mesh.local/orders"
    origin = Origin.workload_api("unix:///run/agent.sock", spiffe_id, [t.trust_domain or "" for t in trust])
    return PemBundle(chain=leaf.cert_pem(), key=leaf.key_pem(), trust=trust, origin=origin)


def test_workload_api_messages_name_the_svid_and_the_socket(ca: CertFactory) -> None:
    leaf = pki.issue(ca.ca, spiffe_ids=["spiffe://mesh.local/orders"])
    stray = pki.issue(ca.ca, spiffe_ids=["spiffe://mesh.local/orders"])
    own = TrustBundle("mesh.local", ca.ca.cert_pem())
    bad_key = PemBundle(
        chain=leaf.cert_pem(), key=stray.key_pem(), trust=(own,), origin=_workload_bundle(leaf, own).origin
    )
    with pytest.raises(CertificateError) as info:
        load_material(bad_key)
    assert str(info.value) == (
        "X.509-SVID key 'spiffe://mesh.local/orders' from unix:///run/agent.sock does not match "
        "certificate 'spiffe://mesh.local/orders' from unix:///run/agent.sock"
    )
    with pytest.raises(CertificateError, match="holds no certificate"):
        load_material(_workload_bundle(leaf))  # no trust bundle at all


def test_every_trust_bundle_is_trusted_and_remembered_by_trust_domain(ca: CertFactory, tmp_path: Path) -> None:
    partner = CertFactory(tmp_path, ca=pki.new_ca("partner", trust_domain="partner.org"), name="partner")
    leaf = pki.issue(ca.ca, spiffe_ids=["spiffe://mesh.local/orders"])
    material = load_material(
        _workload_bundle(
            leaf, TrustBundle("mesh.local", ca.ca.cert_pem()), TrustBundle("partner.org", partner.ca.cert_pem())
        )
    )
    assert material.source == "workload_api" and material.trust_domains == ("mesh.local", "partner.org")
    assert material.trust is not None and material.vet is not None
    assert load_material(read_files(files_of(ca))).vet is None  # files: one bundle, no trust domains
    peer = partner.leaf("billing", spiffe="spiffe://partner.org/billing")
    MemoryLink(client_context(peer, ca.ca_file), material.server_ctx).handshake()
