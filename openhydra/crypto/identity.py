"""Node identity: an Ed25519 key pair (RFC 8032) kept at ``~/.openhydra/identity.key`` with mode 0600.

Implements the "Identity" row of SPEC.md "Security and privacy" and DESIGN.md §5: keys are generated
per node, never derived from a shared or default seed, and never logged.

Key file format: the private key as unencrypted PKCS#8 PEM (RFC 8410), readable by
``openssl pkey -in identity.key -text``. The file is created atomically: the key is written to a
temporary file opened with ``O_CREAT | O_EXCL`` and mode 0600, fsynced, then hard-linked to the final
name (``link`` fails if the name exists, so two processes starting at once end up with one key, never
a half-written or overwritten one). A key file readable or writable by group/other, or owned by
another user, is refused (like OpenSSH does for private keys).

Peer id: the libp2p peer id of the Ed25519 public key, so ids match what the hivemind/libp2p DHT
shows for the same key. Concretely (libp2p peer-ids spec): the protobuf ``PublicKey{Type: Ed25519,
Data: <32 bytes>}`` is serialized as ``08 01 12 20 || key`` (36 bytes); since that is ≤ 42 bytes it
is wrapped in an *identity* multihash (``00 24 || ...``) and base58btc-encoded, giving the familiar
``12D3KooW...`` 52-character string. The public key can be recovered from the peer id, and
:func:`public_key_from_peer_id` does so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger(__name__)

DEFAULT_IDENTITY_PATH = Path("~/.openhydra/identity.key")
PUBLIC_KEY_LEN = 32
SIGNATURE_LEN = 64

# libp2p protobuf PublicKey header for an Ed25519 key: field 1 (KeyType) = 1, field 2 (Data) len 32.
_LIBP2P_ED25519_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])
_MULTIHASH_IDENTITY = bytes([0x00, len(_LIBP2P_ED25519_PREFIX) + PUBLIC_KEY_LEN])
_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


class IdentityError(RuntimeError):
    """The identity key file cannot be used (bad permissions, wrong owner, corrupt contents)."""


def _b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58_ALPHABET[r])
    leading_zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * leading_zeros + "".join(reversed(out))


def _b58decode(text: str) -> bytes:
    n = 0
    for c in text:
        if c not in _B58_INDEX:
            raise ValueError(f"invalid base58 character {c!r}")
        n = n * 58 + _B58_INDEX[c]
    leading_ones = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * leading_ones + body


def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id (``12D3KooW...``) of a raw 32-byte Ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_LEN:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_LEN} bytes, got {len(public_key)}")
    return _b58encode(_MULTIHASH_IDENTITY + _LIBP2P_ED25519_PREFIX + public_key)


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Inverse of :func:`peer_id_from_public_key`; raises ``ValueError`` for anything else."""
    raw = _b58decode(peer_id)
    header = _MULTIHASH_IDENTITY + _LIBP2P_ED25519_PREFIX
    if len(raw) != len(header) + PUBLIC_KEY_LEN or not raw.startswith(header):
        raise ValueError(f"not an Ed25519 libp2p peer id: {peer_id!r}")
    return raw[len(header) :]


def peer_id_matches(peer_id: str, public_key: bytes) -> bool:
    """Whether ``peer_id`` is the id of ``public_key`` (use it on every announcement)."""
    try:
        return peer_id_from_public_key(public_key) == peer_id
    except ValueError:
        return False


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Ed25519 verification; False (never an exception) for any bad key, signature or data."""
    if len(public_key) != PUBLIC_KEY_LEN or len(signature) != SIGNATURE_LEN:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    """A node's Ed25519 identity. ``repr`` shows the peer id only; the private key is never exposed."""

    __slots__ = ("_private", "peer_id", "public_key_bytes")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self.public_key_bytes: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id: str = peer_id_from_public_key(self.public_key_bytes)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path | str = DEFAULT_IDENTITY_PATH) -> Identity:
        """Load the key at ``path``, creating it (mode 0600, parent 0700) if it does not exist."""
        path = Path(path).expanduser()
        try:
            return cls._load(path)
        except FileNotFoundError:
            pass
        identity = cls.generate()
        if identity._create_file(path):
            log.info("created identity %s at %s", identity.peer_id, path)
            return identity
        return cls._load(path)  # another process created it first: use theirs

    @classmethod
    def _load(cls, path: Path) -> Identity:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IdentityError(f"identity key {path} is not a regular file")
            if st.st_mode & 0o077:
                raise IdentityError(
                    f"identity key {path} has permissions {stat.S_IMODE(st.st_mode):04o}; it must not be "
                    f"accessible by group or others. Fix it with: chmod 600 {path}"
                )
            if hasattr(os, "getuid") and st.st_uid != os.getuid():
                raise IdentityError(
                    f"identity key {path} is owned by uid {st.st_uid}, not by this user ({os.getuid()})"
                )
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(1 << 16)
        finally:
            os.close(fd)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            # exc text from cryptography describes the format problem, not the key bytes.
            raise IdentityError(f"identity key {path} is not a PKCS#8 PEM private key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"identity key {path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    def _create_file(self, path: Path) -> bool:
        """Write the key atomically; False if ``path`` appeared meanwhile (the caller loads it)."""
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            os.fchmod(fd, 0o600)  # the umask may only remove bits, but be explicit
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return True

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def verify(self, signature: bytes, data: bytes) -> bool:
        return verify_signature(self.public_key_bytes, signature, data)

    def __repr__(self) -> str:
        return f"Identity(peer_id={self.peer_id!r})"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("Identity is not picklable: the private key must stay in this process")
