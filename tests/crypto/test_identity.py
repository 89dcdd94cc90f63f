"""Identity keys: file mode 0600, refusal of loose permissions, peer ids, signatures."""

from __future__ import annotations

import logging
import os
import pickle
import stat
import threading
from pathlib import Path

import pytest

from openhydra.crypto.identity import (
    Identity,
    IdentityError,
    peer_id_from_public_key,
    peer_id_matches,
    public_key_from_peer_id,
    verify_signature,
)


def test_created_with_mode_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "identity.key"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    second = Identity.load_or_create(path)
    assert second.peer_id == first.peer_id
    assert second.public_key_bytes == first.public_key_bytes
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert [p.name for p in path.parent.iterdir()] == ["identity.key"]  # no temp file left behind


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_loose_permissions_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "identity.key"
    Identity.load_or_create(path)
    os.chmod(path, mode)
    with pytest.raises(IdentityError, match=r"chmod 600") as exc:
        Identity.load_or_create(path)
    assert f"{mode:04o}" in str(exc.value)
    assert path.exists()  # refused, never silently replaced


def test_corrupt_key_file_refused_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"garbage")
    os.close(fd)
    with pytest.raises(IdentityError, match="not a PKCS#8 PEM"):
        Identity.load_or_create(path)
    assert path.read_bytes() == b"garbage"


def test_symlink_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    Identity.load_or_create(real)
    link = tmp_path / "identity.key"
    link.symlink_to(real)
    with pytest.raises(OSError):
        Identity.load_or_create(link)


def test_concurrent_creation_yields_one_key(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    results: list[str] = []
    barrier = threading.Barrier(8)

    def create() -> None:
        barrier.wait()
        results.append(Identity.load_or_create(path).peer_id)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    assert Identity.load_or_create(path).peer_id == results[0]


def test_keys_are_fresh_not_derived_from_a_seed() -> None:
    ids = {Identity.generate().peer_id for _ in range(50)}
    assert len(ids) == 50


def test_peer_id_format_and_round_trip() -> None:
    ident = Identity.generate()
    assert ident.peer_id.startswith("12D3KooW") and len(ident.peer_id) == 52
    assert public_key_from_peer_id(ident.peer_id) == ident.public_key_bytes
    assert peer_id_from_public_key(ident.public_key_bytes) == ident.peer_id
    assert peer_id_matches(ident.peer_id, ident.public_key_bytes)
    assert not peer_id_matches(ident.peer_id, Identity.generate().public_key_bytes)
    assert not peer_id_matches(ident.peer_id, b"short")
    with pytest.raises(ValueError):
        public_key_from_peer_id("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")  # sha256 (RSA) id
    with pytest.raises(ValueError):
        public_key_from_peer_id("0OIl")


def test_peer_id_matches_base58_reference() -> None:
    base58 = pytest.importorskip("base58")
    ident = Identity.generate()
    raw = base58.b58decode(ident.peer_id)
    assert raw == bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20]) + ident.public_key_bytes


def test_sign_and_verify() -> None:
    ident = Identity.generate()
    sig = ident.sign(b"announce")
    assert len(sig) == 64
    assert verify_signature(ident.public_key_bytes, sig, b"announce")
    assert ident.verify(sig, b"announce")
    assert not verify_signature(ident.public_key_bytes, sig, b"announcE")
    assert not verify_signature(Identity.generate().public_key_bytes, sig, b"announce")
    bad = bytearray(sig)
    bad[10] ^= 1
    assert not verify_signature(ident.public_key_bytes, bytes(bad), b"announce")
    assert not verify_signature(ident.public_key_bytes, sig[:63], b"announce")
    assert not verify_signature(b"\x00" * 31, sig, b"announce")


def test_key_material_never_in_repr_logs_or_pickle(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "identity.key"
    with caplog.at_level(logging.DEBUG):
        ident = Identity.load_or_create(path)
    pem_body = b"".join(path.read_bytes().splitlines()[1:-1]).decode()
    assert pem_body not in caplog.text
    assert ident.peer_id in caplog.text
    assert pem_body not in repr(ident) and "PRIVATE" not in repr(ident)
    with pytest.raises(TypeError):
        pickle.dumps(ident)
