"""CA keys in an HSM: a :class:`~tessera.server.ca.keymanager.KeyManager` over PKCS#11 (``python-pkcs11``).

Keys are generated *on the token* (``CKA_SENSITIVE``, not ``CKA_EXTRACTABLE``), found again by their label, and
used through handles whose ``sign`` sends the digest to the device: the CA private key never exists in this
process or on disk. The handles subclass ``cryptography``'s private-key ABCs, so the certificate builders,
CRL builder and PyJWT sign with them exactly as with keys at rest, and rotation, taint and revocation work
unchanged.

Tested with Debian's SoftHSM2 (``libsofthsm2.so``); any PKCS#11 v2.20+ module that does ``CKM_ECDSA`` on P-256 /
P-384 (and ``CKM_RSA_PKCS`` for RSA CA keys) works the same. The PIN comes from a file or an environment variable
(:func:`read_pin`), never from the command line or the config file itself, and is never logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, Self, TypeVar

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.utils import Buffer

from tessera.sdk.keys import PrivateKey, PublicKey, key_kind
from tessera.server.ca.keymanager import SigningKey, check_key_kind, check_slot_id
from tessera.server.errors import KeyManagerError

log = logging.getLogger("tessera.server.ca.pkcs11")

DEFAULT_LABEL_PREFIX = "tessera-ca:"
"""Objects this key manager owns carry labels ``<prefix><slot id>``; anything else on the token is left alone."""

_CURVES = {"ec-p256": "secp256r1", "ec-p384": "secp384r1"}
_RSA_BITS = {"rsa-2048": 2048, "rsa-3072": 3072, "rsa-4096": 4096}
# DER DigestInfo prefixes (RFC 8017 9.2 note 1): CKM_RSA_PKCS signs DigestInfo || digest.
_DIGEST_INFO = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}

T = TypeVar("T")


def read_pin(spec: str, environ: dict[str, str] | None = None) -> str:
    """Resolves ``env:NAME`` or ``file:/path`` to the PIN.

    A literal PIN is refused: it would sit in shell history, ``ps`` output or a config file that is usually
    more widely readable than a secret should be. A PIN file readable by group or others is refused too.
    """
    env = os.environ if environ is None else environ
    kind, sep, where = spec.partition(":")
    if not sep or not where or kind not in ("env", "file"):
        raise KeyManagerError("pkcs11_pin: write env:VARIABLE or file:/path/to/pin (a literal PIN is not accepted)")
    if kind == "env":
        pin = env.get(where)
        if pin is None:
            raise KeyManagerError(f"pkcs11_pin: environment variable {where} is not set")
    else:
        path = Path(where)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise KeyManagerError(f"pkcs11_pin: cannot read {path}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "rb") as fh:
            if stat.S_IMODE(os.fstat(fh.fileno()).st_mode) & 0o077:
                raise KeyManagerError(f"pkcs11_pin: {path} is readable by other users; chmod 600 it")
            pin = fh.read().decode("utf-8", "replace").strip()
    if not pin:
        raise KeyManagerError(f"pkcs11_pin: {spec.split(':', 1)[0]} {where} holds an empty PIN")
    return pin


def _pkcs11() -> Any:
    try:
        import pkcs11
    except ImportError as exc:  # pragma: no cover - the dependency is declared; this is a broken install
        raise KeyManagerError(f"key_manager pkcs11 needs the python-pkcs11 package: {exc}") from None
    return pkcs11


class _Session:
    """One logged-in read/write session, shared by every handle and guarded by a lock.

    PKCS#11 sessions are not safe for concurrent use; signing is a few milliseconds on a real HSM, so one
    serialized session is simpler than a pool and fast enough for a CA. A failed operation closes the
    session so the next one logs in afresh (a restarted token or daemon recovers without a server restart).
    """

    def __init__(self, module: str, token_label: str, pin: str) -> None:
        self._p11 = _pkcs11()
        self._module = module
        self._token_label = token_label
        self._pin = pin
        self._lock = threading.RLock()
        self._session: Any = None
        try:
            self._lib = self._p11.lib(module)
        except (RuntimeError, OSError, self._p11.PKCS11Error) as exc:
            raise KeyManagerError(f"pkcs11_module: cannot load {module}: {exc}") from None

    def _open(self) -> Any:
        p11 = self._p11
        try:
            token = self._lib.get_token(token_label=self._token_label)
        except p11.NoSuchToken:
            raise KeyManagerError(
                f"pkcs11_token_label: no token labelled {self._token_label!r} in {self._module}"
            ) from None
        except p11.MultipleTokensReturned:
            raise KeyManagerError(f"pkcs11_token_label: several tokens are labelled {self._token_label!r}") from None
        try:
            return token.open(user_pin=self._pin, rw=True)
        except p11.UserAlreadyLoggedIn:
            # PKCS#11 logins are per application: another session of this process logged in already.
            return token.open(rw=True)
        except p11.PinIncorrect:
            raise KeyManagerError(f"pkcs11_pin: the PIN for token {self._token_label!r} is incorrect") from None
        except p11.PinLocked:
            raise KeyManagerError(f"pkcs11_pin: the user PIN of token {self._token_label!r} is locked") from None
        except p11.PKCS11Error as exc:
            raise KeyManagerError(
                f"cannot open a session on token {self._token_label!r}: {type(exc).__name__}"
            ) from None

    @contextmanager
    def use(self, what: str) -> Iterator[Any]:
        with self._lock:
            if self._session is None:
                self._session = self._open()
            try:
                yield self._session
            except KeyManagerError:
                raise
            except self._p11.PKCS11Error as exc:
                self._drop()
                raise KeyManagerError(
                    f"HSM {what} failed on token {self._token_label!r}: {type(exc).__name__}"
                ) from None

    def _drop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            try:
                session.close()
            except Exception:  # the session is already unusable; closing is best effort
                log.debug("closing a failed PKCS#11 session raised", exc_info=True)

    def close(self) -> None:
        with self._lock:
            self._drop()

    def run(self, what: str, action: Callable[[Any], T]) -> T:
        with self.use(what) as session:
            return action(session)


def _digest(data: bytes, algorithm: Any) -> tuple[bytes, str]:
    """The digest to send to the token and the hash's name, for plain or ``Prehashed`` input."""
    if isinstance(algorithm, utils.Prehashed):
        return data, algorithm._algorithm.name
    if not isinstance(algorithm, hashes.HashAlgorithm):
        raise TypeError(f"unsupported signature hash {algorithm!r}")
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize(), algorithm.name


class _HsmKeyMixin:
    _session: _Session
    _label: str

    def _find_private(self, session: Any) -> Any:
        p11 = self._session._p11
        try:
            return session.get_key(object_class=p11.ObjectClass.PRIVATE_KEY, label=self._label)
        except p11.NoSuchKey:
            raise KeyManagerError(f"CA key {self._label!r} is no longer on the token") from None

    def _sign_raw(self, payload: bytes, mechanism_name: str) -> bytes:
        mechanism = getattr(self._session._p11.Mechanism, mechanism_name)

        def sign(session: Any) -> bytes:
            result: bytes = self._find_private(session).sign(payload, mechanism=mechanism)
            return result

        return self._session.run("signing", sign)

    def _refuse_export(self) -> NoReturn:
        raise KeyManagerError("the CA private key lives in the HSM and cannot be exported")

    def private_numbers(self) -> NoReturn:
        self._refuse_export()

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        self._refuse_export()

    def __copy__(self) -> Self:
        return self  # a handle on a key in the HSM: a copy is the same key

    def __deepcopy__(self, memo: dict[int, object]) -> Self:
        return self


class HsmEcPrivateKey(_HsmKeyMixin, ec.EllipticCurvePrivateKey):
    """An EC private key on the token: ``sign`` hashes locally and sends the digest (``CKM_ECDSA``)."""

    def __init__(self, session: _Session, label: str, public: ec.EllipticCurvePublicKey) -> None:
        self._session, self._label, self._public = session, label, public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise TypeError("only ECDSA signatures are supported")
        digest, _ = _digest(bytes(data), signature_algorithm.algorithm)
        raw = self._sign_raw(digest, "ECDSA")
        half = len(raw) // 2
        return utils.encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise KeyManagerError("CA keys in the HSM are for signing only")

    def __repr__(self) -> str:
        return f"HsmEcPrivateKey(label={self._label!r}, curve={self._public.curve.name})"


class HsmRsaPrivateKey(_HsmKeyMixin, rsa.RSAPrivateKey):
    """An RSA private key on the token: PKCS#1 v1.5 signatures over a DigestInfo (``CKM_RSA_PKCS``)."""

    def __init__(self, session: _Session, label: str, public: rsa.RSAPublicKey) -> None:
        self._session, self._label, self._public = session, label, public

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    def sign(
        self,
        data: bytes,
        padding_: padding.AsymmetricPadding,
        algorithm: utils.Prehashed | hashes.HashAlgorithm | utils.NoDigestInfo,
    ) -> bytes:
        if not isinstance(padding_, padding.PKCS1v15):
            raise TypeError("only PKCS#1 v1.5 signatures are supported by the HSM key manager")
        if isinstance(algorithm, utils.NoDigestInfo):
            raise TypeError("signing without a DigestInfo is not supported by the HSM key manager")
        digest, name = _digest(bytes(data), algorithm)
        prefix = _DIGEST_INFO.get(name)
        if prefix is None:
            raise TypeError(f"unsupported signature hash {name}")
        return self._sign_raw(prefix + digest, "RSA_PKCS")

    def decrypt(self, ciphertext: bytes, padding_: padding.AsymmetricPadding) -> bytes:
        raise KeyManagerError("CA keys in the HSM are for signing only")

    def __repr__(self) -> str:
        return f"HsmRsaPrivateKey(label={self._label!r}, bits={self._public.key_size})"


class HsmSigningKey:
    """A CA key handle for the CA manager (:class:`~tessera.server.ca.keymanager.SigningKey`)."""

    def __init__(self, slot_id: str, kind: str, signer: HsmEcPrivateKey | HsmRsaPrivateKey) -> None:
        self._slot_id, self._kind, self._signer = slot_id, kind, signer

    @property
    def slot_id(self) -> str:
        return self._slot_id

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def public_key(self) -> PublicKey:
        return self._signer.public_key()

    @property
    def signer(self) -> PrivateKey:  # an HSM-backed subclass of the cryptography ABC
        return self._signer

    def __repr__(self) -> str:
        return f"HsmSigningKey(slot_id={self._slot_id!r}, kind={self._kind!r})"


class Pkcs11KeyManager:
    """CA keys on a PKCS#11 token, one key pair per slot, labelled ``<label_prefix><slot_id>``."""

    def __init__(self, module: str, token_label: str, pin: str, label_prefix: str = DEFAULT_LABEL_PREFIX) -> None:
        self._session = _Session(module, token_label, pin)
        self._prefix = label_prefix
        # Log in now: a wrong PIN or a missing token stops start-up instead of the first rotation.
        self._session.run("login", lambda session: None)
        log.info("CA keys are kept on PKCS#11 token %r (%s)", token_label, module)

    def close(self) -> None:
        self._session.close()

    def _label(self, slot_id: str) -> str:
        return self._prefix + check_slot_id(slot_id)

    def _destroy(self, session: Any, label: str) -> None:
        for obj in list(session.get_objects({self._session._p11.Attribute.LABEL: label})):
            obj.destroy()

    def generate(self, slot_id: str, kind: str) -> SigningKey:
        check_key_kind(kind)
        label = self._label(slot_id)
        p11 = self._session._p11
        ident = hashlib.sha256(label.encode()).digest()[:16]
        private_template = {
            p11.Attribute.SENSITIVE: True,
            p11.Attribute.EXTRACTABLE: False,
            p11.Attribute.PRIVATE: True,
            p11.Attribute.SIGN: True,
            p11.Attribute.DECRYPT: False,
            p11.Attribute.DERIVE: False,
            p11.Attribute.UNWRAP: False,
        }

        def create(session: Any) -> Any:
            self._destroy(session, label)
            if kind in _CURVES:
                from pkcs11.util.ec import encode_named_curve_parameters

                params = session.create_domain_parameters(
                    p11.KeyType.EC, {p11.Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVES[kind])}, local=True
                )
                pub, _ = params.generate_keypair(store=True, label=label, id=ident, private_template=private_template)
            elif kind in _RSA_BITS:
                pub, _ = session.generate_keypair(
                    p11.KeyType.RSA, _RSA_BITS[kind], store=True, label=label, id=ident,
                    private_template=private_template,
                )  # fmt: skip
            else:
                raise KeyManagerError(f"key kind {kind} is not supported by the PKCS#11 key manager")
            return pub

        public = self._session.run(f"key generation for {slot_id}", create)
        return self._handle(slot_id, label, public)

    def _public_key(self, pub: Any) -> PublicKey:
        p11 = self._session._p11
        if pub.key_type == p11.KeyType.EC:
            from pkcs11.util.ec import encode_ec_public_key

            der = encode_ec_public_key(pub)
        elif pub.key_type == p11.KeyType.RSA:
            from pkcs11.util.rsa import encode_rsa_public_key

            der = encode_rsa_public_key(pub)
        else:
            raise KeyManagerError(f"CA key {pub.label!r} on the token has an unsupported type {pub.key_type}")
        key = serialization.load_der_public_key(der)
        if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise KeyManagerError(f"CA key {pub.label!r} on the token has an unsupported type")
        return key

    def _handle(self, slot_id: str, label: str, pub: Any) -> SigningKey:
        public = self._public_key(pub)
        signer: HsmEcPrivateKey | HsmRsaPrivateKey
        if isinstance(public, ec.EllipticCurvePublicKey):
            signer = HsmEcPrivateKey(self._session, label, public)
        else:
            assert isinstance(public, rsa.RSAPublicKey)
            signer = HsmRsaPrivateKey(self._session, label, public)
        return HsmSigningKey(slot_id, key_kind(public), signer)

    def load(self, slot_id: str) -> SigningKey | None:
        label = self._label(slot_id)
        p11 = self._session._p11

        def find(session: Any) -> Any:
            try:
                session.get_key(object_class=p11.ObjectClass.PRIVATE_KEY, label=label)
                return session.get_key(object_class=p11.ObjectClass.PUBLIC_KEY, label=label)
            except p11.NoSuchKey:
                return None
            except p11.MultipleObjectsReturned:
                raise KeyManagerError(f"several keys on the token are labelled {label!r}") from None

        pub = self._session.run(f"loading {slot_id}", find)
        return None if pub is None else self._handle(slot_id, label, pub)

    def delete(self, slot_id: str) -> None:
        label = self._label(slot_id)
        self._session.run(f"deleting {slot_id}", lambda session: self._destroy(session, label))

    def slot_ids(self) -> list[str]:
        p11 = self._session._p11

        def labels(session: Any) -> list[str]:
            found = session.get_objects({p11.Attribute.CLASS: p11.ObjectClass.PRIVATE_KEY})
            return [obj.label for obj in found if isinstance(obj.label, str)]

        slots = []
        for label in self._session.run("listing keys", labels):
            if label.startswith(self._prefix):
                slot = label[len(self._prefix) :]
                try:
                    slots.append(check_slot_id(slot))
                except KeyManagerError:
                    continue
        return sorted(set(slots))


__all__ = [
    "DEFAULT_LABEL_PREFIX",
    "HsmEcPrivateKey",
    "HsmRsaPrivateKey",
    "HsmSigningKey",
    "Pkcs11KeyManager",
    "read_pin",
]
