"""``tessera-agent``: run the daemon, or talk to its Workload API as a workload would."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, load_der_private_key
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera.agent.daemon import SETTINGS, AgentSettings, run_agent
from tessera.agent.errors import CliError
from tessera.proto import workload_pb2 as wpb
from tessera.sdk.config import add_arguments, load_settings
from tessera.sdk.errors import TesseraError
from tessera.sdk.files import PRIVATE_DIR_MODE, ensure_owned_dir, write_atomic
from tessera.sdk.logs import setup_logging
from tessera.sdk.svid import certificates_to_pem, parse_der_certificates
from tessera.sdk.workloadapi.wire import (
    ENDPOINT_SOCKET_ENV,
    SECURITY_METADATA,
    SERVICE_NAME,
    WorkloadApiStub,
    client_socket_path,
    endpoint_to_target,
)


def _target(socket: str | None) -> str:
    address = socket or os.environ.get(ENDPOINT_SOCKET_ENV) or client_socket_path()
    try:
        return endpoint_to_target(address)
    except ValueError as exc:
        raise CliError(str(exc)) from exc


def _rpc_error(exc: grpc.RpcError, target: str) -> CliError:
    code = exc.code()
    details = exc.details()
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in (details or "").lower():
        return CliError(f"cannot reach the agent at {target}: is tessera-agent running? ({details})")
    return CliError(f"{code.name}: {details}")


def _ask(target: str, call: Callable[[Any], Any]) -> Any:
    """``call(stub)`` on a channel to the agent: one answer, or the CliError that says what went wrong."""
    with grpc.insecure_channel(target) as channel:
        try:
            return call(WorkloadApiStub(channel))
        except grpc.RpcError as exc:
            raise _rpc_error(exc, target) from None


def _first_x509(stub: Any, timeout: float) -> Any:
    call = stub.FetchX509SVID(wpb.X509SVIDRequest(), metadata=SECURITY_METADATA, timeout=timeout)
    response = next(iter(call))
    call.cancel()
    return response


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe_svid(svid: Any) -> dict[str, Any]:
    chain = parse_der_certificates(svid.x509_svid)
    leaf = chain[0]
    return {
        "spiffe_id": svid.spiffe_id,
        "hint": svid.hint,
        "serial": format(leaf.serial_number, "x"),
        "not_before": _iso(leaf.not_valid_before_utc),
        "not_after": _iso(leaf.not_valid_after_utc),
        "intermediates": len(chain) - 1,
        "bundle_authorities": len(parse_der_certificates(svid.bundle)) if svid.bundle else 0,
    }


def _print_x509(response: Any, output: str) -> None:
    described = [_describe_svid(s) for s in response.svids]
    if output == "json":
        print(json.dumps({"svids": described, "federated_bundles": sorted(response.federated_bundles)}, indent=2))
        return
    print(f"Received {len(described)} X509-SVID(s)")
    for i, d in enumerate(described):
        print()
        print(f"SPIFFE ID:       {d['spiffe_id']}{'  (default)' if i == 0 else ''}")
        print(f"Serial:          {d['serial']}")
        print(f"Valid after:     {d['not_before']}")
        print(f"Valid until:     {d['not_after']}")
        print(f"Hint:            {d['hint']}")
        print(f"Intermediates:   {d['intermediates']}")
        print(f"Bundle CAs:      {d['bundle_authorities']}")
    if response.federated_bundles:
        print()
        print("Federated bundles: " + ", ".join(sorted(response.federated_bundles)))


def _write_x509(response: Any, directory: str) -> None:
    out = Path(directory)
    for i, svid in enumerate(response.svids):
        chain = parse_der_certificates(svid.x509_svid)
        key = load_der_private_key(svid.x509_svid_key, None)
        key_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        write_atomic(str(out / f"svid.{i}.pem"), certificates_to_pem(chain), 0o644)
        write_atomic(str(out / f"svid.{i}.key"), key_pem, 0o600)
        write_atomic(str(out / f"bundle.{i}.pem"), certificates_to_pem(parse_der_certificates(svid.bundle)), 0o644)
    for i, (_, der) in enumerate(sorted(response.federated_bundles.items())):
        write_atomic(str(out / f"federated_bundle.{i}.pem"), certificates_to_pem(parse_der_certificates(der)), 0o644)
    print(f"Wrote {len(response.svids)} SVID(s) to {out}")


def cmd_fetch_x509(args: argparse.Namespace) -> int:
    target = _target(args.socket)
    if args.write:
        # Made 0700 whatever the umask, or checked to be ours and writable by us alone, before any key is
        # fetched: a directory another user controls could hand our key files to them.
        ensure_owned_dir(args.write, PRIVATE_DIR_MODE)
    response = _ask(target, lambda stub: _first_x509(stub, args.timeout))
    if args.write:
        _write_x509(response, args.write)
    _print_x509(response, args.output)
    return 0


def cmd_fetch_jwt(args: argparse.Namespace) -> int:
    target = _target(args.socket)
    request = wpb.JWTSVIDRequest(audience=args.audience, spiffe_id=args.spiffe_id or "")
    response = _ask(target, lambda stub: stub.FetchJWTSVID(request, metadata=SECURITY_METADATA, timeout=args.timeout))
    if args.output == "json":
        print(json.dumps([{"spiffe_id": s.spiffe_id, "hint": s.hint, "token": s.svid} for s in response.svids]))
        return 0
    for svid in response.svids:
        print(f"token({svid.spiffe_id}):")
        print(f"\t{svid.svid}")
    return 0


def cmd_validate_jwt(args: argparse.Namespace) -> int:
    target = _target(args.socket)
    request = wpb.ValidateJWTSVIDRequest(audience=args.audience, svid=args.svid)
    response = _ask(
        target, lambda stub: stub.ValidateJWTSVID(request, metadata=SECURITY_METADATA, timeout=args.timeout)
    )
    claims = json_format.MessageToDict(response.claims)
    print("SVID is valid.")
    print(f"SPIFFE ID : {response.spiffe_id}")
    print(f"Claims    : {json.dumps(claims, sort_keys=True)}")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    target = _target(args.socket)
    retry = 1.0
    while True:
        with grpc.insecure_channel(target) as channel:
            stub = WorkloadApiStub(channel)
            try:
                for response in stub.FetchX509SVID(wpb.X509SVIDRequest(), metadata=SECURITY_METADATA):
                    retry = 1.0
                    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                    for d in (_describe_svid(s) for s in response.svids):
                        print(f"{stamp} {d['spiffe_id']} serial={d['serial']} not_after={d['not_after']}", flush=True)
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise _rpc_error(exc, target) from None
                print(f"stream ended: {code.name}: {exc.details()}; retrying in {retry:.0f}s", file=sys.stderr)
        time.sleep(retry)
        retry = min(retry * 2, 30.0)


def cmd_healthcheck(args: argparse.Namespace) -> int:
    target = _target(args.socket)
    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            raise CliError(f"agent is not healthy: cannot reach {target}: {exc.details()}") from None
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        raise CliError("agent is not healthy: it is up but has not synced with the server yet")
    print("Agent is healthy.")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    overrides = {s.name: getattr(args, s.name, None) for s in SETTINGS}
    values = load_settings("agent", SETTINGS, args.config, overrides)
    setup_logging(values["log_level"], values["log_format"])
    settings = AgentSettings.from_values(values)
    asyncio.run(run_agent(settings))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera-agent", description="Tessera node agent (SPIFFE Workload API)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent")
    add_arguments(run, SETTINGS)
    run.set_defaults(func=cmd_run)

    def client(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--socket",
            default=None,
            help=f"Workload API socket (default: ${ENDPOINT_SOCKET_ENV}, else {client_socket_path()})",
        )
        p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the agent")

    api = sub.add_parser("api", help="call the Workload API as this process").add_subparsers(dest="api", required=True)
    fetch = api.add_parser("fetch", help="fetch SVIDs").add_subparsers(dest="kind", required=True)
    x = fetch.add_parser("x509", help="fetch this process's X509-SVIDs")
    client(x)
    x.add_argument("--write", metavar="DIR", help="write svid.N.pem, svid.N.key (0600) and bundle.N.pem to DIR")
    x.add_argument("--output", choices=("text", "json"), default="text")
    x.set_defaults(func=cmd_fetch_x509)
    j = fetch.add_parser("jwt", help="fetch JWT-SVIDs")
    client(j)
    j.add_argument("--audience", action="append", required=True, help="audience (repeatable)")
    j.add_argument("--spiffe-id", default=None, help="only this identity")
    j.add_argument("--output", choices=("text", "json"), default="text")
    j.set_defaults(func=cmd_fetch_jwt)
    validate = api.add_parser("validate", help="validate tokens").add_subparsers(dest="kind", required=True)
    v = validate.add_parser("jwt", help="validate a JWT-SVID")
    client(v)
    v.add_argument("--audience", required=True)
    v.add_argument("--svid", required=True, help="the JWT-SVID (compact JWS)")
    v.set_defaults(func=cmd_validate_jwt)
    w = api.add_parser("watch", help="print every X509-SVID update as it arrives")
    client(w)
    w.set_defaults(func=cmd_watch)

    h = sub.add_parser("healthcheck", help="exit 0 when the agent is healthy")
    client(h)
    h.set_defaults(func=cmd_healthcheck)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except KeyboardInterrupt:
        return 130
    except (TesseraError, OSError, ValueError) as exc:  # CliError, ConfigError and AgentError among them
        print(f"tessera-agent: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
