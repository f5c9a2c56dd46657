"""`tessera-server federation ...` and `x509 revoke|revoked`: thin clients of ``TrustAdmin``.

:func:`register` is called by :mod:`tessera.server.cli` with its own parser helpers and admin-socket call, so
these commands take the same ``--socket`` / ``--output`` flags and fail the same way (one line, exit status 1).
The service's ``TaintAuthority`` / ``RevokeAuthority`` are the ``ca taint|revoke`` commands, beside the other
``ca`` commands in :mod:`tessera.server.cli`.
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tessera.proto import admin_pb2 as apb
from tessera.server.cliformat import message_to_dict
from tessera.server.errors import CliError

AdminParser = Callable[[Any, str, str, Callable[[argparse.Namespace], None]], argparse.ArgumentParser]
TrustAdminCall = Callable[[str, str, Any], Any]
"""``(socket path, method, request) -> response`` on the ``TrustAdmin`` service; raises CliError."""


def _ts(value: int) -> str:
    return dt.datetime.fromtimestamp(value, dt.UTC).isoformat() if value else "never"


def _relationship_text(r: apb.FederationRelationship) -> str:
    lines = [
        f"Trust domain      : {r.trust_domain}",
        f"Bundle endpoint   : {r.bundle_endpoint_url} ({r.profile})",
    ]
    if r.endpoint_spiffe_id:
        lines.append(f"Endpoint ID       : {r.endpoint_spiffe_id}")
    if r.has_bundle:
        lines.append(
            f"Bundle            : sequence {r.bundle_sequence}, {r.x509_authorities} X.509 and "
            f"{r.jwt_authorities} JWT authorities"
        )
    else:
        lines.append("Bundle            : none yet")
    lines.append(f"Last refresh      : {_ts(r.last_refresh)}")
    lines.append(f"Next refresh      : {_ts(r.next_refresh)}")
    if r.last_error:
        lines.append(f"Last error        : {r.last_error}")
    return "\n".join(lines)


def _revoked_text(items: Sequence[apb.RevokedX509SVID]) -> str:
    if not items:
        return "nothing revoked"
    return "\n".join(f"{r.serial}  {r.spiffe_id}  issuer {r.issuer_key_id}  expires {_ts(r.expires_at)}" for r in items)


def register(
    commands: Any,
    admin_parser: AdminParser,
    emit: Callable[[argparse.Namespace, Any, str], None],
    call: TrustAdminCall,
) -> None:
    """Adds the ``federation`` and ``x509`` commands to the ``tessera-server`` parser."""

    def relationship_request(args: argparse.Namespace) -> apb.CreateFederationRelationshipRequest:
        request = apb.CreateFederationRelationshipRequest(
            relationship=apb.FederationRelationship(
                trust_domain=args.trust_domain,
                bundle_endpoint_url=args.bundle_endpoint_url,
                profile=args.profile,
                endpoint_spiffe_id=args.endpoint_spiffe_id or "",
            )
        )
        if args.bundle_file:
            try:
                data = Path(args.bundle_file).read_bytes()
            except OSError as exc:
                raise CliError(f"--bundle-file {args.bundle_file}: {exc.strerror or exc}") from None
            fmt = args.bundle_format
            if fmt == "auto":
                fmt = "spiffe" if data.lstrip().startswith(b"{") else "pem"
            request.bundle = data
            request.bundle_format = (
                apb.BundleFormat.BUNDLE_FORMAT_SPIFFE if fmt == "spiffe" else apb.BundleFormat.BUNDLE_FORMAT_PEM
            )
        return request

    def show_one(args: argparse.Namespace, r: apb.FederationRelationship) -> None:
        emit(args, message_to_dict(r), _relationship_text(r))

    def create(args: argparse.Namespace) -> None:
        show_one(args, call(args.socket, "CreateFederationRelationship", relationship_request(args)))

    def update(args: argparse.Namespace) -> None:
        show_one(args, call(args.socket, "UpdateFederationRelationship", relationship_request(args)))

    def show(args: argparse.Namespace) -> None:
        if args.trust_domain:
            request = apb.GetFederationRelationshipRequest(trust_domain=args.trust_domain)
            show_one(args, call(args.socket, "GetFederationRelationship", request))
            return
        items = call(args.socket, "ListFederationRelationships", apb.ListFederationRelationshipsRequest())
        rels = list(items.relationships)
        text = "\n\n".join(_relationship_text(r) for r in rels) or "no federation relationships"
        emit(args, [message_to_dict(r) for r in rels], text)

    def delete(args: argparse.Namespace) -> None:
        request = apb.GetFederationRelationshipRequest(trust_domain=args.trust_domain)
        call(args.socket, "DeleteFederationRelationship", request)
        emit(args, {"deleted": args.trust_domain}, f"deleted federation relationship with {args.trust_domain}")

    def refresh(args: argparse.Namespace) -> None:
        request = apb.GetFederationRelationshipRequest(trust_domain=args.trust_domain)
        show_one(args, call(args.socket, "RefreshFederatedBundle", request))

    federation = commands.add_parser("federation", help="federation with other trust domains").add_subparsers(
        dest="sub", required=True
    )
    for name, func, text in (
        ("create", create, "federate with a foreign trust domain (fetch its bundle from its endpoint)"),
        ("update", update, "change a federation relationship"),
    ):
        p = admin_parser(federation, name, text, func)
        p.add_argument("--trust-domain", required=True, metavar="TD", help="the foreign trust domain, e.g. b.test")
        p.add_argument("--bundle-endpoint-url", required=True, metavar="URL", help="https://host:port/ of its endpoint")
        p.add_argument("--profile", choices=("https_web", "https_spiffe"), default="https_web")
        p.add_argument("--endpoint-spiffe-id", metavar="ID", help="https_spiffe: the SPIFFE ID the endpoint presents")
        p.add_argument("--bundle-file", metavar="F", help="the foreign bundle to start from (needed for https_spiffe)")
        p.add_argument("--bundle-format", choices=("auto", "pem", "spiffe"), default="auto")
    p = admin_parser(federation, "show", "show federation relationships", show)
    p.add_argument("--trust-domain", metavar="TD")
    for name, func, text in (
        ("delete", delete, "stop federating with a trust domain (its bundle is dropped)"),
        ("refresh", refresh, "fetch a foreign bundle now"),
    ):
        p = admin_parser(federation, name, text, func)
        p.add_argument("--trust-domain", required=True, metavar="TD")

    def revoke(args: argparse.Namespace) -> None:
        given = [v for v in (args.serial, args.entry_id, args.agent) if v]
        if len(given) != 1:
            raise CliError("give exactly one of --serial, --entry-id or --agent")
        request = apb.RevokeX509SVIDsRequest(cut_off=args.cut_off)
        if args.serial:
            request.serial = args.serial
        elif args.entry_id:
            request.entry_id = args.entry_id
        else:
            request.agent_id = args.agent
        response = call(args.socket, "RevokeX509SVIDs", request)
        items = list(response.revoked)
        text = _revoked_text(items) if items else "already revoked: nothing new on the CRL"
        emit(args, [message_to_dict(r) for r in items], text)

    def revoked(args: argparse.Namespace) -> None:
        items = list(call(args.socket, "ListRevokedX509SVIDs", apb.ListRevokedX509SVIDsRequest()).revoked)
        emit(args, [message_to_dict(r) for r in items], _revoked_text(items))

    x509 = commands.add_parser("x509", help="X509-SVID revocation").add_subparsers(dest="sub", required=True)
    p = admin_parser(x509, "revoke", "put X509-SVIDs on the CA's revocation list", revoke)
    p.add_argument("--serial", metavar="S", help="hex serial of one SVID")
    p.add_argument("--entry-id", metavar="ID", help="every unexpired SVID of this entry")
    p.add_argument("--agent", metavar="ID", help="the agent's own SVID and every SVID issued to it")
    p.add_argument(
        "--cut-off",
        action="store_true",
        help="delete the entry / ban the agent as well, so nothing is re-issued (default: re-issue)",
    )
    admin_parser(x509, "revoked", "list revoked X509-SVIDs still on the CRLs", revoked)


__all__ = ["register"]
