"""Per-round keys: X25519 agreement through HKDF, advertisements signed with the agent's certificate
key and verified against the federation CA, and AES-GCM-SIV encryption of shares between agents."""

from __future__ import annotations

import datetime as dt
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from common.pki import spiffe_ids_of
from common.revocation import RevocationList

RAW = serialization.Encoding.Raw
RAW_PUBLIC = serialization.PublicFormat.Raw
COMMITMENT_BYTES = 32
"""A self-mask seed commitment: SHA-256 of the seed, its round and owner."""


class RosterError(PermissionDenied):
    """A key advertisement that does not verify: the agent refuses the round."""


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def derive(secret: bytes, purpose: str, round_id: int, *parties: str) -> bytes:
    """32 bytes from ``secret`` for one purpose, round and (ordered) pair of parties."""
    info = b"cloudfed-secagg-v1" + _lp(purpose.encode()) + struct.pack(">Q", round_id)
    for party in parties:
        info += _lp(party.encode())
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def seed_commitment(seed: bytes, round_id: int, agent_id: str) -> bytes:
    """A binding, hiding commitment to a self-mask seed (128 random bits) for one round and agent:
    the aggregator checks the seed it reconstructs from shares against it."""
    payload = b"cloudfed-secagg-self-seed-v1" + struct.pack(">Q", round_id) + _lp(agent_id.encode())
    return hashlib.sha256(payload + seed).digest()


@dataclass(frozen=True)
class KeyPair:
    """An ephemeral X25519 key pair."""

    private: x25519.X25519PrivateKey
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh key pair."""
        private = x25519.X25519PrivateKey.generate()
        return cls(private, private.public_key().public_bytes(RAW, RAW_PUBLIC))

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        """Rebuild from the 32 raw private bytes (as recovered from Shamir shares)."""
        private = x25519.X25519PrivateKey.from_private_bytes(raw)
        return cls(private, private.public_key().public_bytes(RAW, RAW_PUBLIC))

    def private_bytes(self) -> bytes:
        """The 32 raw private bytes (to be secret-shared)."""
        return self.private.private_bytes(RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())

    def agree(self, peer_public: bytes) -> bytes:
        """The raw X25519 shared secret with a peer."""
        return self.private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))


@dataclass(frozen=True)
class Advertisement:
    """An agent's two public keys for one round, signed with its certificate's key."""

    round_id: int
    agent_id: str
    cipher_public: bytes  # c_pk: encrypts shares between agents
    mask_public: bytes  # s_pk: pairwise mask agreement
    certificate_pem: bytes
    signature: bytes
    seed_commitment: bytes = b""
    """``seed_commitment`` of the agent's self-mask seed this round."""

    def signed_bytes(self) -> bytes:
        """What the signature covers: round, identity, both keys, the seed commitment."""
        return signed_payload(
            self.round_id, self.agent_id, self.cipher_public, self.mask_public, self.seed_commitment
        )


def signed_payload(
    round_id: int, agent_id: str, cipher_public: bytes, mask_public: bytes, commitment: bytes
) -> bytes:
    """Canonical bytes of an advertisement."""
    return (
        b"cloudfed-secagg-advertisement-v2"
        + struct.pack(">Q", round_id)
        + _lp(agent_id.encode())
        + _lp(cipher_public)
        + _lp(mask_public)
        + _lp(commitment)
    )


def sign_advertisement(
    round_id: int,
    agent_id: str,
    cipher: KeyPair,
    mask: KeyPair,
    certificate_pem: bytes,
    signing_key: ec.EllipticCurvePrivateKey,
    commitment: bytes = b"",
) -> Advertisement:
    """Sign both public keys and the self-mask seed ``commitment`` with the agent's certificate key
    (ECDSA, SHA-256), as raw r || s."""
    payload = signed_payload(round_id, agent_id, cipher.public, mask.public, commitment)
    r, s = decode_dss_signature(signing_key.sign(payload, ec.ECDSA(hashes.SHA256())))
    size = _scalar_bytes(signing_key.curve)
    signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    return Advertisement(
        round_id, agent_id, cipher.public, mask.public, certificate_pem, signature, commitment
    )


def _scalar_bytes(curve: ec.EllipticCurve) -> int:
    """Bytes of one ECDSA signature half (r or s) on ``curve``: 32 on P-256."""
    return (curve.key_size + 7) // 8


def check_posted_advertisement(adv: Advertisement, ca_pem: bytes) -> None:
    """At the aggregator, on AdvertiseKeys: InvalidArgument unless ``adv`` verifies as every peer
    will verify it, so that one bad advertisement is refused alone instead of making every
    honest agent refuse the roster (and the round)."""
    try:
        cas = tuple(x509.load_pem_x509_certificates(ca_pem))
    except ValueError as exc:
        raise FailedPrecondition(f"the federation CA does not load: {exc}") from exc
    try:
        verify_advertisement(adv, cas, adv.round_id, dt.datetime.now(dt.UTC))
    except RosterError as exc:
        raise InvalidArgument(f"key advertisement refused: {exc}") from exc


def verify_advertisement(
    adv: Advertisement,
    cas: Sequence[x509.Certificate],
    round_id: int,
    now: dt.datetime,
    revocations: RevocationList | None = None,
) -> None:
    """Raise RosterError unless ``adv`` is for this round, from a valid certificate issued by one of
    ``cas`` (the federation's CA bundle) and not listed in ``revocations``, whose one SPIFFE id is
    the advertised identity, and signed by that certificate's key."""
    who = adv.agent_id or "<no id>"
    if adv.round_id != round_id:
        raise RosterError(f"advertisement of {who} is for round {adv.round_id}, not {round_id}")
    if len(adv.cipher_public) != 32 or len(adv.mask_public) != 32:
        raise RosterError(f"advertisement of {who} carries malformed public keys")
    if len(adv.seed_commitment) != COMMITMENT_BYTES:
        raise RosterError(f"advertisement of {who} carries no {COMMITMENT_BYTES}-byte seed commitment")
    try:
        cert = x509.load_pem_x509_certificate(adv.certificate_pem)
    except ValueError as exc:
        raise RosterError(f"certificate of {who} does not load: {exc}") from exc
    if not any(_issued_by(cert, ca) for ca in cas):
        raise RosterError(f"certificate of {who} is not issued by the federation CA")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise RosterError(f"certificate of {who} is not valid now")
    revoked = revocations.lookup(cert) if revocations is not None else None
    if revoked is not None:
        raise RosterError(f"certificate of {who} is revoked: {revoked.describe()}")
    if spiffe_ids_of(cert) != [adv.agent_id]:
        raise RosterError(f"certificate of {who} names {spiffe_ids_of(cert)}, not the advertised identity")
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise RosterError(f"certificate of {who} does not hold an EC key")
    size = _scalar_bytes(public_key.curve)
    if len(adv.signature) != 2 * size:
        raise RosterError(f"signature on the advertisement of {who} is not {2 * size} bytes (raw r || s)")
    der = encode_dss_signature(
        int.from_bytes(adv.signature[:size], "big"), int.from_bytes(adv.signature[size:], "big")
    )
    try:
        public_key.verify(der, adv.signed_bytes(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise RosterError(f"signature on the advertisement of {who} does not verify") from exc


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


_SEAL_NONCE = bytes(12)
"""Sealing keys are derived for one round and pair of agents, and AES-GCM-SIV resists nonce reuse
(RFC 8452: a repeated nonce discloses only whether two plaintexts under one key are equal), so the
nonce is fixed and not sent: 12 bytes less a share."""


def _cipher(key: bytes) -> AESGCMSIV:
    try:
        return AESGCMSIV(key)
    except UnsupportedAlgorithm as exc:  # cryptography built against OpenSSL < 3.2
        raise FailedPrecondition(
            "secure aggregation needs AES-GCM-SIV, which this cryptography build's OpenSSL lacks "
            "(3.2 or newer has it; the cryptography wheels on PyPI ship one)"
        ) from exc


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM-SIV ciphertext and tag (the nonce is fixed)."""
    return _cipher(key).encrypt(_SEAL_NONCE, plaintext, aad)


def open_sealed(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """Inverse of ``seal``; RosterError if the ciphertext was tampered with or misrouted."""
    try:
        return _cipher(key).decrypt(_SEAL_NONCE, sealed, aad)
    except (InvalidTag, ValueError) as exc:
        raise RosterError("an encrypted share does not authenticate") from exc
