"""The one factory for every ``ssl.SSLContext`` Tessera builds (the SDK's contexts, the node API's front, the
bundle endpoint and the federation client), so the TLS choices are made once, here.

* One floor (as urllib3's single factory decides it for every context that library makes): TLS 1.2 at
  least, and a server never resumes a session: a resumed session skips certificate verification, so a CA
  removed from the bundle could come back through a ticket. No hostname check unless asked (a SPIFFE ID, not
  a host name, names the peer); ALPN only where the caller names its protocols.
* ``load_cert_chain`` reads files only: the chain and key go through an anonymous memory file
  (``memfd_create`` + ``/proc/self/fd/N``) or, without memfd or ``/proc``, a 0600 file in a private
  temporary directory removed at once, so a key never lands on a persistent disk.
* A context leaves here complete and is never changed again: reconfiguring a context that serves
  connections crashed CPython under concurrent handshakes. To rotate, build a new one and let
  :func:`switching_server_context` (one fixed front whose ``sni_callback`` runs on every handshake, SNI or
  not) hand each new connection the current one.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tessera.sdk.keys import PrivateKey, private_key_to_pem

log = logging.getLogger(__name__)

C = TypeVar("C", bound=ssl.SSLContext)


def harden(ctx: C) -> C:
    """The TLS floor of every context Tessera builds: TLS 1.2 at least, and a server never resumes a session.

    With no tickets, every connection is checked against the current bundles and authorizer. (Measured with
    CPython's server contexts: ``OP_NO_TICKET`` plus ``num_tickets = 0`` leaves no resumption at all, TLS 1.2
    session IDs included.) Returns ``ctx``, changed in place: call it before the context serves anything.
    """
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ctx.protocol == ssl.PROTOCOL_TLS_SERVER:
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    return ctx


def load_chain_and_key(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """Loads a PEM chain (leaf first) and its unencrypted PEM key from memory into a context not yet in use."""
    data = chain_pem + key_pem
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        fd = memfd_create("tessera-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        except (FileNotFoundError, PermissionError):
            pass  # no usable /proc: fall back to a private temp file
        finally:
            os.close(fd)
    with tempfile.TemporaryDirectory(prefix="tessera-tls-") as tmp:
        path = os.path.join(tmp, "chain.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        try:
            ctx.load_cert_chain(path)
        finally:
            os.unlink(path)


def _pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def build_context(
    server_side: bool,
    *,
    chain: Sequence[x509.Certificate] = (),
    key: PrivateKey | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
    roots: Sequence[x509.Certificate] = (),
    root_files: Sequence[str | Path] = (),
    system_roots: bool = False,
    verify_mode: ssl.VerifyMode = ssl.CERT_REQUIRED,
    check_hostname: bool = False,
    strict: bool = False,
    alpn: Sequence[str] = (),
    context_class: type[C] = ssl.SSLContext,  # type: ignore[assignment]
) -> C:
    """A new, complete context of ``context_class`` with the floor of :func:`harden`.

    Identity: ``chain`` (leaf first) and ``key`` from memory, or ``cert_file``/``key_file`` (e.g. a Web PKI
    certificate an ACME client renews), or none (a front, or a client without a certificate). Trust:
    ``roots`` from memory, ``root_files``, and the system's roots with ``system_roots``. ``strict`` adds
    ``VERIFY_X509_STRICT`` (RFC 5280 rules, as Python 3.13's default contexts do). ``ssl.SSLError`` or
    ``OSError`` when the identity or roots cannot be loaded.
    """
    ctx = harden(context_class(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = check_hostname
    ctx.verify_mode = verify_mode
    if strict:
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if chain:
        if key is None:
            raise ValueError("a certificate chain needs its private key")
        load_chain_and_key(ctx, _pem(chain), private_key_to_pem(key))
    elif cert_file is not None:
        ctx.load_cert_chain(str(cert_file), None if key_file is None else str(key_file))
    if system_roots:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH if not server_side else ssl.Purpose.CLIENT_AUTH)
    for path in root_files:
        ctx.load_verify_locations(cafile=str(path))
    if roots:
        ctx.load_verify_locations(cadata=_pem(roots).decode("ascii"))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def switching_server_context(
    current: Callable[[], ssl.SSLContext],
    *,
    verify_mode: ssl.VerifyMode = ssl.CERT_REQUIRED,
    strict: bool = False,
    context_class: type[C] = ssl.SSLContext,  # type: ignore[assignment]
) -> C:
    """The fixed server context to listen with: each handshake switches to ``current()``, so a new identity
    or trust bundle reaches new connections without touching a context in use.

    The front's own verify mode and flags are the ones OpenSSL applies (give the same as the contexts it
    switches to); certificate, key and trust store come from ``current()``. When ``current()`` fails the
    handshake ends with an internal-error alert, and the failure is logged.
    """
    front = build_context(True, verify_mode=verify_mode, strict=strict, context_class=context_class)

    def switch(tls: ssl.SSLSocket | ssl.SSLObject, _server_name: str | None, _front: ssl.SSLContext) -> int | None:
        try:
            tls.context = current()
        except Exception:
            log.exception("no usable TLS identity for an incoming connection")
            return int(ssl.AlertDescription.ALERT_DESCRIPTION_INTERNAL_ERROR)
        return None

    front.sni_callback = switch
    return front


__all__ = ["build_context", "harden", "load_chain_and_key", "switching_server_context"]
