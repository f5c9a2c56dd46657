"""`tessera-server`: run the server, or administer a running one over its admin socket.

Every admin command is a thin client of the admin API (proto/tessera/admin.proto) on the Unix socket; the
server does all validation, so the CLI and any other client get the same answers. Errors are one line on
stderr and exit status 1 (2 for usage errors, from argparse).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera._daemon.sockets import socket_owner_problem
from tessera.proto import admin_pb2 as apb
from tessera.proto import admin_pb2_grpc as agrpc
from tessera.proto import node_pb2 as npb
from tessera.sdk.config import ConfigError, add_arguments, parse_duration
from tessera.server.cliformat import message_to_dict, selector_texts
from tessera.server.config import SETTINGS, default_admin_socket
from tessera.server.errors import CliError
from tessera.server.federation import cli as federation_cli

RPC_TIMEOUT = 30.0
TRUST_ADMIN_RPC_TIMEOUT = 60.0
"""Longer: ``federation refresh`` waits for a foreign bundle endpoint."""


def _fail(message: str) -> NoReturn:
    raise CliError(message)


# ---------------------------------------------------------------------------------------------- client


def _channel(socket_path: str) -> grpc.Channel:
    """A channel to the admin socket, after checking (lstat, before a single byte is sent: admin requests carry
    join tokens and entries) that it is a socket owned by root or by the caller. Anyone else's socket at that
    path would be a stranger collecting admin traffic or answering ``bundle show`` with their own CA."""
    path = Path(socket_path).absolute()
    try:
        st = os.lstat(path)
    except PermissionError:  # the socket's directory is private to the server's user (0700)
        _fail(f"admin socket {socket_path}: permission denied (run admin commands as the server's user)")
    except FileNotFoundError:
        _fail(f"admin socket {socket_path} does not exist (is tessera-server running? use --socket PATH)")
    except OSError as exc:
        _fail(f"admin socket {socket_path}: {exc.strerror}")
    problem = socket_owner_problem(f"admin socket {socket_path}", st.st_mode, st.st_uid, os.geteuid())
    if problem:
        _fail(problem)
    return grpc.insecure_channel(f"unix:{path}")


def _call(
    socket_path: str, method: str, request: Any, stub: Any = agrpc.AdminStub, timeout: float = RPC_TIMEOUT
) -> Any:
    """One admin RPC (``stub``: the ``Admin`` service, or ``TrustAdmin``); every failure is one CliError line."""
    with _channel(socket_path) as channel:
        try:
            return getattr(stub(channel), method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            details = exc.details() or ""
            if code == grpc.StatusCode.UNIMPLEMENTED:
                _fail(f"tessera-server on {socket_path} does not offer {method}")
            # UNAVAILABLE is also the server's answer for a datastore that is down or a federated bundle that
            # could not be refreshed; only a failure to connect means the server itself is out of reach.
            unreachable = not details or ("connect" in details.lower() and "refresh" not in method.lower())
            if code == grpc.StatusCode.UNAVAILABLE and unreachable:
                _fail(f"cannot reach tessera-server on {socket_path}: {details}")
            _fail(f"{code.name.lower()}: {details}")


def _call_trust_admin(socket_path: str, method: str, request: Any) -> Any:
    return _call(socket_path, method, request, agrpc.TrustAdminStub, TRUST_ADMIN_RPC_TIMEOUT)


# -------------------------------------------------------------------------------------------- formatting


def _ts(value: int) -> str:
    if not value:
        return "never"
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _entry_text(entry: npb.Entry) -> str:
    lines = [
        f"Entry ID         : {entry.id}",
        f"SPIFFE ID        : {entry.spiffe_id}",
        f"Parent ID        : {entry.parent_id}",
        f"Revision         : {entry.revision}",
        f"X509-SVID TTL    : {entry.x509_svid_ttl or 'default'}",
        f"JWT-SVID TTL     : {entry.jwt_svid_ttl or 'default'}",
    ]
    lines += [f"Selector         : {s}" for s in selector_texts(entry.selectors)]
    lines += [f"DNS name         : {n}" for n in entry.dns_names]
    lines += [f"FederatesWith    : {td}" for td in entry.federates_with]
    if entry.hint:
        lines.append(f"Hint             : {entry.hint}")
    if entry.expires_at:
        lines.append(f"Expires at       : {_ts(entry.expires_at)}")
    for flag in ("admin", "downstream", "node"):
        if getattr(entry, flag):
            lines.append(f"{flag.capitalize():<17}: true")
    return "\n".join(lines)


def _agent_text(agent: apb.Agent) -> str:
    lines = [
        f"SPIFFE ID        : {agent.spiffe_id}",
        f"Attestor         : {agent.attestor}",
        f"Serial           : {agent.serial}",
        f"Expires at       : {_ts(agent.expires_at)}",
        f"Banned           : {str(agent.banned).lower()}",
        f"Can re-attest    : {str(agent.reattestable).lower()}",
    ]
    lines += [f"Selector         : {s}" for s in selector_texts(agent.node_selectors)]
    return "\n".join(lines)


def _slots_text(slots: Sequence[apb.CASlot]) -> str:
    rows = [
        f"{s.kind:<5} {s.state:<9} {s.key_id}  {s.key_type or '-':<9} {_ts(s.not_before)} .. {_ts(s.not_after)}"
        + ("  TAINTED" if s.tainted else "")
        for s in slots
    ]
    return "\n".join(rows) if rows else "no CA slots"


def _emit(args: argparse.Namespace, as_json: Any, text: str) -> None:
    if args.output == "json":
        print(json.dumps(as_json, indent=2, sort_keys=True))
    else:
        print(text)


# -------------------------------------------------------------------------------------------- commands


def _duration_seconds(value: str | None, flag: str) -> int | None:
    if value is None:
        return None
    try:
        return round(parse_duration(value, flag))
    except ConfigError as exc:
        _fail(str(exc))


def _parse_selector(text: str) -> npb.Selector:
    kind, sep, value = text.partition(":")
    if not sep or not kind or not value:
        _fail(f"--selector: {text!r} is not TYPE:VALUE (e.g. unix:uid:1000)")
    return npb.Selector(type=kind, value=value)


def _parse_expires_at(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        _fail(f"--expires-at: {text!r} is not an ISO 8601 date-time (e.g. 2030-01-01T00:00:00Z)")
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp())


def _apply_entry_flags(entry: npb.Entry, args: argparse.Namespace) -> None:
    if args.spiffe_id is not None:
        entry.spiffe_id = args.spiffe_id
    if args.parent_id is not None:
        entry.parent_id = args.parent_id
    if args.selector:
        del entry.selectors[:]
        entry.selectors.extend(_parse_selector(s) for s in args.selector)
    x509_ttl = _duration_seconds(args.x509_svid_ttl, "--x509-svid-ttl")
    if x509_ttl is not None:
        entry.x509_svid_ttl = x509_ttl
    jwt_ttl = _duration_seconds(args.jwt_svid_ttl, "--jwt-svid-ttl")
    if jwt_ttl is not None:
        entry.jwt_svid_ttl = jwt_ttl
    if args.dns_name:
        del entry.dns_names[:]
        entry.dns_names.extend(args.dns_name)
    if args.hint is not None:
        entry.hint = args.hint
    for flag in ("admin", "downstream", "node"):
        value = getattr(args, flag)
        if value is not None:
            setattr(entry, flag, value)
    if args.federates_with:
        del entry.federates_with[:]
        entry.federates_with.extend(args.federates_with)
    expires = _parse_expires_at(args.expires_at)
    if expires is not None:
        entry.expires_at = expires


def cmd_entry_create(args: argparse.Namespace) -> None:
    entry = npb.Entry()
    _apply_entry_flags(entry, args)
    created = _call(args.socket, "CreateEntry", apb.CreateEntryRequest(entry=entry)).entry
    _emit(args, message_to_dict(created), created.id)


def cmd_entry_update(args: argparse.Namespace) -> None:
    entry = _call(args.socket, "GetEntry", apb.GetEntryRequest(id=args.id)).entry
    _apply_entry_flags(entry, args)
    updated = _call(args.socket, "UpdateEntry", apb.UpdateEntryRequest(entry=entry)).entry
    _emit(args, message_to_dict(updated), _entry_text(updated))


def cmd_entry_delete(args: argparse.Namespace) -> None:
    _call(args.socket, "DeleteEntry", apb.DeleteEntryRequest(id=args.id))
    _emit(args, {"deleted": args.id}, f"deleted entry {args.id}")


def cmd_entry_show(args: argparse.Namespace) -> None:
    if args.id:
        entries = [_call(args.socket, "GetEntry", apb.GetEntryRequest(id=args.id)).entry]
    else:
        entries = []
        request = apb.ListEntriesRequest(
            spiffe_id=args.spiffe_id or "",
            parent_id=args.parent_id or "",
            selectors=[_parse_selector(s) for s in args.selector or ()],
        )
        while True:
            response = _call(args.socket, "ListEntries", request)
            entries.extend(response.entries)
            if not response.next_page_token:
                break
            request.page_token = response.next_page_token
    # Written entry by entry (same output as one json.dumps / one joined text): at 100,000 entries building the
    # whole document first more than doubled the command's peak memory (about 370 MB against 160 MB).
    out = sys.stdout
    if args.output == "json":
        if not entries:
            out.write("[]\n")
            return
        out.write("[\n")
        for i, e in enumerate(entries):
            item = json.dumps(message_to_dict(e), indent=2, sort_keys=True).replace("\n", "\n  ")
            out.write(("  " if i == 0 else ",\n  ") + item)
        out.write("\n]\n")
        return
    out.write(f"Found {len(entries)} entries\n")
    if not entries:
        return
    for i, e in enumerate(entries):
        out.write(("" if i == 0 else "\n\n") + _entry_text(e))
    out.write("\n")


def cmd_token_generate(args: argparse.Namespace) -> None:
    ttl = _duration_seconds(args.ttl, "--ttl") or 0
    response = _call(
        args.socket, "CreateJoinToken", apb.CreateJoinTokenRequest(ttl=ttl, spiffe_id=args.spiffe_id or "")
    )
    _emit(
        args,
        {
            "token": response.token,
            "id": response.id,
            "expires_at": response.expires_at,
            "spiffe_id": response.spiffe_id,
        },
        response.token,
    )


def _list_agents(socket_path: str) -> list[apb.Agent]:
    agents: list[apb.Agent] = []
    request = apb.ListAgentsRequest(page_size=500)
    while True:
        response = _call(socket_path, "ListAgents", request)
        agents.extend(response.agents)
        if not response.next_page_token:
            return agents
        request.page_token = response.next_page_token


def cmd_agent_list(args: argparse.Namespace) -> None:
    agents = _list_agents(args.socket)
    text = f"Found {len(agents)} attested agents" + "".join("\n\n" + _agent_text(a) for a in agents)
    _emit(args, [message_to_dict(a) for a in agents], text)


def cmd_agent_show(args: argparse.Namespace) -> None:
    agent = _call(args.socket, "GetAgent", apb.GetAgentRequest(spiffe_id=args.spiffe_id)).agent
    _emit(args, message_to_dict(agent), _agent_text(agent))


def cmd_agent_evict(args: argparse.Namespace) -> None:
    _call(args.socket, "EvictAgent", apb.EvictAgentRequest(spiffe_id=args.spiffe_id))
    _emit(args, {"evicted": args.spiffe_id}, f"evicted agent {args.spiffe_id}")


def cmd_agent_ban(args: argparse.Namespace) -> None:
    _call(args.socket, "BanAgent", apb.BanAgentRequest(spiffe_id=args.spiffe_id))
    _emit(args, {"banned": args.spiffe_id}, f"banned agent {args.spiffe_id}")


def _format(value: str) -> apb.BundleFormat:
    return apb.BundleFormat.BUNDLE_FORMAT_SPIFFE if value == "spiffe" else apb.BundleFormat.BUNDLE_FORMAT_PEM


def cmd_bundle_show(args: argparse.Namespace) -> None:
    response = _call(args.socket, "GetBundle", apb.GetBundleRequest(format=_format(args.format)))
    data = response.data.decode()
    if args.output == "json":
        payload: Any = {"trust_domain": response.trust_domain, "format": args.format, "data": data}
        print(json.dumps(payload, indent=2, sort_keys=True))
    else:
        sys.stdout.write(data if data.endswith("\n") else data + "\n")


def cmd_bundle_list(args: argparse.Namespace) -> None:
    bundles = _call(args.socket, "ListFederatedBundles", apb.ListFederatedBundlesRequest()).bundles
    as_json = [
        {
            "trust_domain": b.trust_domain,
            "x509_authorities": b.x509_authorities,
            "jwt_authorities": b.jwt_authorities,
            "document": json.loads(b.document or b"{}"),
        }
        for b in bundles
    ]
    rows = [f"spiffe://{b.trust_domain}  x509={b.x509_authorities} jwt={b.jwt_authorities}" for b in bundles]
    _emit(args, as_json, "\n".join(rows) if rows else "no federated bundles")


def cmd_bundle_set(args: argparse.Namespace) -> None:
    try:
        data = Path(args.path).read_bytes()
    except OSError as exc:
        _fail(f"--path: cannot read {args.path}: {exc.strerror}")
    response = _call(
        args.socket,
        "SetFederatedBundle",
        apb.SetFederatedBundleRequest(id=args.id, data=data, format=_format(args.format)),
    )
    b = response.bundle
    _emit(
        args,
        {"trust_domain": b.trust_domain, "x509_authorities": b.x509_authorities, "jwt_authorities": b.jwt_authorities},
        f"set bundle of spiffe://{b.trust_domain} ({b.x509_authorities} X.509, {b.jwt_authorities} JWT authorities)",
    )


def cmd_bundle_delete(args: argparse.Namespace) -> None:
    _call(args.socket, "DeleteFederatedBundle", apb.DeleteFederatedBundleRequest(id=args.id))
    _emit(args, {"deleted": args.id}, f"deleted bundle {args.id}")


def _ca(
    method: str, request: Callable[[argparse.Namespace], Any], call: Callable[[str, str, Any], Any] = _call
) -> Callable[[argparse.Namespace], None]:
    """A ``ca`` command, printing every authority afterwards (taint and revoke travel in ``TrustAdmin``)."""

    def run(args: argparse.Namespace) -> None:
        response = call(args.socket, method, request(args))
        text = _slots_text(response.slots)
        pending = getattr(response, "pending_svids", 0)
        if pending:
            text += f"\n(revoked with {pending} SVIDs not yet re-issued)"
        _emit(args, [message_to_dict(s) for s in response.slots], text)

    return run


def _authority_request(args: argparse.Namespace) -> apb.AuthorityRequest:
    return apb.AuthorityRequest(kind=args.kind, key_id=args.id, force=getattr(args, "force", False))


def cmd_healthcheck(args: argparse.Namespace) -> None:
    with _channel(args.socket) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
        except grpc.RpcError as exc:
            _fail(f"tessera-server is not healthy: {exc.code().name.lower()}: {exc.details()}")
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        _fail(f"tessera-server is not serving (status {status})")
    if args.output == "json":
        print(json.dumps({"status": "SERVING"}))
    else:
        print("tessera-server is healthy")


def cmd_run(args: argparse.Namespace) -> None:
    from tessera.server.app import main_run  # imported late: admin commands need none of the server

    raise SystemExit(main_run(args))


# ---------------------------------------------------------------------------------------------- parser


def _admin_parser(
    sub: Any, name: str, help_text: str, func: Callable[[argparse.Namespace], None]
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
    default_socket = default_admin_socket()
    parser.add_argument(
        "--socket", default=default_socket, metavar="PATH", help=f"admin socket (default {default_socket})"
    )
    parser.add_argument("--output", choices=("text", "json"), default="text", help="output format")
    parser.set_defaults(func=func)
    return parser


def _entry_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spiffe-id", help="SPIFFE ID the entry issues")
    parser.add_argument("--parent-id", help="SPIFFE ID of the agent (or node alias) the entry belongs to")
    parser.add_argument("--selector", action="append", metavar="TYPE:VALUE", help="selector (repeat; all must match)")
    parser.add_argument("--x509-svid-ttl", metavar="D", help="X509-SVID life, e.g. 1h")
    parser.add_argument("--jwt-svid-ttl", metavar="D", help="JWT-SVID life, e.g. 5m")
    parser.add_argument("--dns-name", action="append", metavar="N", help="DNS SAN (repeat)")
    parser.add_argument("--hint", help="hint shown to workloads holding several SVIDs")
    parser.add_argument("--admin", action=argparse.BooleanOptionalAction, default=None, help="admin workload")
    parser.add_argument("--downstream", action=argparse.BooleanOptionalAction, default=None, help="downstream entry")
    parser.add_argument(
        "--federates-with", action="append", metavar="TD", help="trust domain to federate with (repeat)"
    )
    parser.add_argument("--expires-at", metavar="ISO8601", help="when the entry stops issuing")
    parser.add_argument(
        "--node", action=argparse.BooleanOptionalAction, default=None, help="node alias entry (parent is the server)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera-server", description="Tessera SPIFFE server")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the server", description="Runs the server in the foreground.")
    add_arguments(run, SETTINGS)
    run.set_defaults(func=cmd_run)

    entry = commands.add_parser("entry", help="registration entries").add_subparsers(dest="sub", required=True)
    p = _admin_parser(entry, "create", "create a registration entry and print its id", cmd_entry_create)
    _entry_flags(p)
    p = _admin_parser(entry, "show", "list registration entries", cmd_entry_show)
    p.add_argument("--id")
    p.add_argument("--spiffe-id")
    p.add_argument("--parent-id")
    p.add_argument("--selector", action="append", metavar="TYPE:VALUE")
    p = _admin_parser(entry, "update", "update a registration entry", cmd_entry_update)
    p.add_argument("--id", required=True)
    _entry_flags(p)
    p = _admin_parser(entry, "delete", "delete a registration entry", cmd_entry_delete)
    p.add_argument("--id", required=True)

    token = commands.add_parser("token", help="join tokens").add_subparsers(dest="sub", required=True)
    p = _admin_parser(token, "generate", "print a one-time join token", cmd_token_generate)
    p.add_argument("--spiffe-id", help="agent ID to give the node (default derived from the token id)")
    p.add_argument("--ttl", metavar="D", help="token life (default from the server, 10m)")

    agent = commands.add_parser("agent", help="attested agents").add_subparsers(dest="sub", required=True)
    _admin_parser(agent, "list", "list attested agents", cmd_agent_list)
    for name, func, text in (
        ("show", cmd_agent_show, "show an agent"),
        ("evict", cmd_agent_evict, "forget an agent (it may attest again)"),
        ("ban", cmd_agent_ban, "refuse an agent from now on"),
    ):
        p = _admin_parser(agent, name, text, func)
        p.add_argument("--spiffe-id", required=True)

    bundle = commands.add_parser("bundle", help="trust bundles").add_subparsers(dest="sub", required=True)
    p = _admin_parser(bundle, "show", "print this trust domain's bundle", cmd_bundle_show)
    p.add_argument("--format", choices=("pem", "spiffe"), default="pem")
    _admin_parser(bundle, "list", "list federated bundles", cmd_bundle_list)
    p = _admin_parser(bundle, "set", "set a federated bundle", cmd_bundle_set)
    p.add_argument("--id", required=True, metavar="spiffe://TD")
    p.add_argument("--path", required=True, metavar="F")
    p.add_argument("--format", choices=("pem", "spiffe"), default="pem")
    p = _admin_parser(bundle, "delete", "delete a federated bundle", cmd_bundle_delete)
    p.add_argument("--id", required=True, metavar="spiffe://TD")

    ca = commands.add_parser("ca", help="the server CA").add_subparsers(dest="sub", required=True)
    _admin_parser(ca, "show", "show the CA slots", _ca("GetCA", lambda _: apb.GetCARequest()))
    _admin_parser(ca, "prepare", "prepare the next CA now", _ca("PrepareCA", lambda _: apb.PrepareCARequest()))
    _admin_parser(ca, "activate", "activate the prepared CA now", _ca("ActivateCA", lambda _: apb.ActivateCARequest()))
    for name, method, text in (
        ("taint", "TaintAuthority", "mark an old authority tainted: everything it signed is re-issued now"),
        ("revoke", "RevokeAuthority", "remove a tainted authority from the bundle"),
    ):
        p = _admin_parser(ca, name, text, _ca(method, _authority_request, _call_trust_admin))
        p.add_argument("--id", required=True, metavar="KEYID", help="key id from `ca show`")
        p.add_argument("--kind", choices=("x509", "jwt"), default="x509")
    # ca revoke only:
    p.add_argument("--force", action="store_true", help="revoke even though SVIDs it signed were not all re-issued")
    # federation ... and x509 revoke|revoked (the TrustAdmin service)
    federation_cli.register(commands, _admin_parser, _emit, _call_trust_admin)

    p = _admin_parser(commands, "healthcheck", "exit 0 when the server is healthy", cmd_healthcheck)
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CliError as exc:
        print(f"tessera-server: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
