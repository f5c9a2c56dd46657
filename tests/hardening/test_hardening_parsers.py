"""Property tests: every parser that reads operator or network input either returns a well-formed value or
raises its own documented error, never anything else (an unexpected exception type in a servicer becomes
an UNKNOWN status or a crashed stream; in start-up code it becomes a traceback instead of one line).

Inputs are both random and structure-aware (valid values mutated one field at a time), because purely random
bytes rarely get past the first check of a parser.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import math
import os
import re
import string
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from tessera.agent.daemon import SETTINGS as AGENT_SETTINGS
from tessera.agent.daemon import AgentSettings
from tessera.sdk.bundle import JwtBundle, SpiffeBundle, X509Bundle
from tessera.sdk.config import MAX_DURATION, ConfigError, load_settings, parse_duration
from tessera.sdk.errors import BundleError, SpiffeIdError, SvidError, TesseraError, VerificationError
from tessera.sdk.jwtsvid import JwtSvid
from tessera.sdk.keys import public_keys_equal
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.svid import X509Svid, parse_der_certificates, parse_pem_certificates
from tessera.sdk.testing import TestCA
from tessera.server.ca.csr import MAX_CSR_BYTES, csr_public_key
from tessera.server.config import SETTINGS as SERVER_SETTINGS
from tessera.server.config import build_config
from tessera.server.errors import BadCsrError, SelectorError
from tessera.server.selectors import Selector, check_selector, matches, normalize

FUZZ = settings(
    max_examples=int(os.environ.get("TESSERA_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

CA = TestCA("example.org")
SVID = CA.issue_svid("/fuzz/workload")
TOKEN = CA.mint_jwt_svid("/fuzz/workload", "aud", ttl=600)

# ------------------------------------------------------------------------------------------ SPIFFE IDs

_TD_CHARS = string.ascii_lowercase + string.digits + ".-_"
_SEG_CHARS = string.ascii_letters + string.digits + ".-_"
# The SPIFFE ID grammar of SPIFFE.md (lower-case trust domain, path segments of unreserved characters).
_ID_RE = re.compile(r"^spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)*$")

trust_domains = st.text(_TD_CHARS, min_size=1, max_size=40)
segments = st.text(_SEG_CHARS, min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))


@FUZZ
@given(st.text(max_size=300))
@example("spiffe://example.org/a/../b")
@example("SPIFFE://example.org/a")
@example("spiffe://user@example.org/a")
@example("spiffe://example.org:8080/a")
@example("spiffe://[::1]/a")
@example("spiffe://example.org/a%2Fb")
@example("spiffe://example.org/a?x=1")
@example("spiffe://example.org/\x00")
@example("spiffe://exa\u0301mple.org/a")
def test_spiffe_id_parse_never_raises_anything_else(text: str) -> None:
    try:
        sid = SpiffeId.parse(text)
    except SpiffeIdError:
        return
    assert _ID_RE.match(str(sid)), str(sid)
    assert str(sid) == text  # parsing never normalizes silently: what was accepted is what was written
    assert SpiffeId.parse(str(sid)) == sid


@FUZZ
@given(trust_domains, st.lists(segments, max_size=6))
def test_spiffe_id_grammar_round_trips(td: str, segs: list[str]) -> None:
    text = "spiffe://" + td + "".join("/" + s for s in segs)
    try:
        sid = SpiffeId.parse(text)
    except SpiffeIdError:
        # Only length limits may refuse a string built from the grammar.
        assert len(text) > 2048 or len(td) > 255
        return
    assert str(sid) == text
    assert sid.member_of(TrustDomain.parse(td))
    assert sid.trust_domain.id_string == f"spiffe://{td}"


@FUZZ
@given(st.text(max_size=100))
def test_trust_domain_parse(text: str) -> None:
    try:
        td = TrustDomain.parse(text)
    except SpiffeIdError:
        return
    assert re.match(r"^[a-z0-9._-]+$", td.name), td.name


# ------------------------------------------------------------------------------------------- selectors


@FUZZ
@given(st.lists(st.text(max_size=60), max_size=8))
def test_selector_parsing(texts: list[str]) -> None:
    try:
        parsed = normalize(Selector.parse(t) for t in texts)
    except SelectorError:
        return
    assert list(parsed) == sorted(set(parsed))
    for sel in parsed:
        assert sel.type and sel.value and ":" not in sel.type
        assert Selector.parse(str(sel)) == sel  # the first colon splits type from value
        with contextlib.suppress(SelectorError):
            check_selector(sel)


@FUZZ
@given(st.text(min_size=1, max_size=3000), st.text(min_size=1, max_size=3000))
def test_check_selector_enforces_bounds(sel_type: str, value: str) -> None:
    assume(":" not in sel_type)
    sel = Selector(sel_type, value)
    try:
        check_selector(sel)
    except SelectorError:
        return
    assert len(sel_type.encode()) <= 128 and len(value.encode()) <= 2048
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in sel_type + value)


sel_strategy = st.builds(Selector, st.sampled_from(["unix", "k8s", "x"]), st.sampled_from(["uid:0", "uid:1", "a"]))


@FUZZ
@given(st.frozensets(sel_strategy, max_size=5), st.frozensets(sel_strategy, max_size=5))
def test_matching_is_non_empty_subset(required: frozenset[Selector], available: frozenset[Selector]) -> None:
    assert matches(required, available) == (bool(required) and required <= available)
    # More selectors on the caller's side never loses a match; more on the entry's side never gains one.
    if matches(required, available):
        assert matches(required, available | {Selector("extra", "1")})
    else:
        assert not matches(required | {Selector("extra", "1")}, available)


# ------------------------------------------------------------------------------------------- durations


@FUZZ
@given(st.one_of(st.text(max_size=40), st.integers(), st.floats(allow_nan=True), st.booleans()))
@example("9" * 400)
@example("1e9")
@example("99999999999999999999w")
@example("\u0663s")
@example(float("inf"))
@example(float("nan"))
def test_parse_duration_is_finite_or_refused(value: Any) -> None:
    try:
        seconds = parse_duration(value, "ttl")
    except ConfigError as exc:
        assert str(exc).startswith("ttl:")
        return
    assert math.isfinite(seconds) and seconds >= 0
    dt.timedelta(seconds=seconds)  # every accepted duration is usable as a timedelta


@FUZZ
@given(st.integers(0, 10**6), st.sampled_from(["", "s", "m", "h", "d", "w", "ms"]))
def test_parse_duration_units(number: int, unit: str) -> None:
    factor = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "ms": 0.001}[unit]
    if number * factor > MAX_DURATION:
        with pytest.raises(ConfigError, match="longer than"):
            parse_duration(f"{number}{unit}")
    else:
        assert parse_duration(f"{number}{unit}") == number * factor


# ---------------------------------------------------------------------------------------- config files

toml_values = st.one_of(
    st.text(max_size=30),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.booleans(),
    st.lists(st.text(max_size=10), max_size=3),
    st.lists(st.integers(), max_size=3),
)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string for the characters JSON escapes
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


@FUZZ
@given(st.dictionaries(st.sampled_from([s.name for s in SERVER_SETTINGS] + ["bogus"]), toml_values, max_size=8))
def test_server_config_file_is_checked_or_refused(tmp_path_factory: Any, table: dict[str, Any]) -> None:
    path = Path(tmp_path_factory.mktemp("cfg")) / "server.toml"
    lines = ["[server]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    try:
        values = load_settings("server", SERVER_SETTINGS, path, None)
        config = build_config(values)
    except ConfigError as exc:
        assert "\n" not in str(exc)  # one line for the operator
        return
    for seconds in (config.ca_ttl, config.default_x509_svid_ttl, config.agent_ttl, config.join_token_ttl):
        assert math.isfinite(seconds)
        dt.timedelta(seconds=seconds)


@FUZZ
@given(st.dictionaries(st.sampled_from([s.name for s in AGENT_SETTINGS] + ["bogus"]), toml_values, max_size=8))
def test_agent_config_file_is_checked_or_refused(tmp_path_factory: Any, table: dict[str, Any]) -> None:
    path = Path(tmp_path_factory.mktemp("cfg")) / "agent.toml"
    lines = ["[agent]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    try:
        settings = AgentSettings.from_values(load_settings("agent", AGENT_SETTINGS, path, None))
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert settings.sync_interval > 0 and math.isfinite(settings.sync_interval)
    assert settings.node.server_addresses


@FUZZ
@given(st.binary(max_size=300))
def test_config_file_bytes(tmp_path_factory: Any, data: bytes) -> None:
    path = Path(tmp_path_factory.mktemp("cfg")) / "x.toml"
    path.write_bytes(data)
    try:
        load_settings("server", SERVER_SETTINGS, path, {"trust_domain": "example.org"})
    except ConfigError as exc:
        assert "\n" not in str(exc).strip() or "TOML" in str(exc)


# ------------------------------------------------------------------------------------ bundle documents

DOCUMENT = json.loads(CA.spiffe_bundle().to_document())


def _mutate(obj: Any, path: list[Any], new: Any) -> Any:
    if not path:
        return new
    head, *rest = path
    if isinstance(obj, dict):
        copy = dict(obj)
        copy[head] = _mutate(obj.get(head), rest, new)
        return copy
    if isinstance(obj, list) and isinstance(head, int) and 0 <= head < len(obj):
        copy_list = list(obj)
        copy_list[head] = _mutate(obj[head], rest, new)
        return copy_list
    return obj


def _paths(obj: Any, prefix: list[Any]) -> list[list[Any]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, [*prefix, k])
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, [*prefix, i])
    return out


DOC_PATHS = _paths(DOCUMENT, [])
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(allow_nan=False), st.text(max_size=40)
)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c))


@FUZZ
@given(st.sampled_from(DOC_PATHS), json_values)
def test_bundle_document_field_mutations(path: list[Any], new: Any) -> None:
    document = json.dumps(_mutate(DOCUMENT, path, new)).encode()
    try:
        bundle = SpiffeBundle.from_document("example.org", document)
    except BundleError:
        return
    # Accepted: the result is usable and serializes back to a document that parses to the same bundle.
    assert SpiffeBundle.from_document("example.org", bundle.to_document()) == bundle


@FUZZ
@given(st.sampled_from(DOC_PATHS), st.binary(min_size=1, max_size=64))
def test_bundle_document_base64_garbage(path: list[Any], blob: bytes) -> None:
    document = json.dumps(_mutate(DOCUMENT, path, base64.b64encode(blob).decode())).encode()
    with contextlib.suppress(BundleError):
        SpiffeBundle.from_document("example.org", document)


@FUZZ
@given(st.binary(max_size=400))
def test_jwks_bytes(data: bytes) -> None:
    with contextlib.suppress(BundleError):
        JwtBundle.from_jwks("example.org", data)


# ----------------------------------------------------------------------------------- PEM / DER / keys

CHAIN_PEM = SVID.chain_pem()
KEY_PEM = SVID.key_pem()


@FUZZ
@given(st.integers(0, len(CHAIN_PEM) - 1), st.sampled_from(list(b"ABab01+/=\n-")))
def test_pem_chain_character_mutation(position: int, char: int) -> None:
    data = bytearray(CHAIN_PEM)
    data[position] = char
    try:
        certs = parse_pem_certificates(bytes(data))
    except SvidError:
        return
    assert all(isinstance(c, x509.Certificate) for c in certs)


@FUZZ
@given(st.integers(0, len(KEY_PEM) - 1), st.sampled_from(list(b"ABab01+/=\n-")))
def test_pem_key_character_mutation(position: int, char: int) -> None:
    data = bytearray(KEY_PEM)
    data[position] = char
    try:
        svid = X509Svid.parse_pem(CHAIN_PEM, bytes(data))
    except SvidError:
        return
    # A mutation that still parses must still be the SVID's key (the pair is checked), never another key.
    assert svid.key_der() == SVID.key_der()


@FUZZ
@given(st.binary(max_size=200), st.binary(max_size=200))
def test_pem_bundles_with_junk(prefix: bytes, suffix: bytes) -> None:
    with contextlib.suppress(BundleError, SvidError):
        X509Bundle.parse_pem("example.org", prefix + CA.x509_bundle().pem() + suffix)


@FUZZ
@given(st.lists(st.sampled_from([0, 1, 2]), min_size=0, max_size=6))
def test_der_concatenations(order: list[int]) -> None:
    parts = [SVID.cert_chain[0].public_bytes(serialization.Encoding.DER), CA.x509_bundle().der(), b"\x30\x03\x02\x01"]
    data = b"".join(parts[i] for i in order)
    try:
        certs = parse_der_certificates(data)
    except SvidError:
        assert 2 in order or not order
        return
    assert len(certs) == len(order)


# ------------------------------------------------------------------------------------------------ JWTs

JWT_BUNDLE = CA.jwt_bundle()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


HEADER, CLAIMS, SIGNATURE = TOKEN.split(".")
HEADER_OBJ = json.loads(_unb64(HEADER))
CLAIMS_OBJ = json.loads(_unb64(CLAIMS))


@FUZZ
@given(st.sampled_from([*sorted(HEADER_OBJ), "crit", "jku", "x5u"]), json_values)
@example("alg", "none")
@example("alg", "HS256")
@example("alg", "ES384")
@example("alg", "RS256")
@example("kid", "")
def test_jwt_header_mutations(name: str, value: Any) -> None:
    header = dict(HEADER_OBJ)
    header[name] = value
    token = ".".join((_b64(json.dumps(header).encode()), CLAIMS, SIGNATURE))
    try:
        svid = JwtSvid.parse_and_validate(token, JWT_BUNDLE, "aud")
    except (SvidError, VerificationError):  # malformed / does not verify
        return
    # Only a change that leaves the signed header bytes meaning the same can pass: never a changed alg/kid.
    assert svid.kid == HEADER_OBJ["kid"] and name not in ("alg", "kid")
    raise AssertionError(f"a token whose signed header changed verified: {header}")


@FUZZ
@given(st.sampled_from(sorted(CLAIMS_OBJ)), json_values)
def test_jwt_claim_mutations_never_verify(name: str, value: Any) -> None:
    assume(CLAIMS_OBJ[name] != value)
    claims = dict(CLAIMS_OBJ)
    claims[name] = value
    token = ".".join((HEADER, _b64(json.dumps(claims).encode()), SIGNATURE))
    try:
        JwtSvid.parse_and_validate(token, JWT_BUNDLE, "aud")
    except (SvidError, VerificationError):
        return
    raise AssertionError(f"a token with changed claims verified: {claims}")


@FUZZ
@given(st.integers(0, len(TOKEN) - 1), st.sampled_from(list(string.ascii_letters + string.digits + "-_.=")))
def test_jwt_character_mutations(position: int, char: str) -> None:
    token = TOKEN[:position] + char + TOKEN[position + 1 :]
    try:
        svid = JwtSvid.parse_and_validate(token, JWT_BUNDLE, "aud")
    except (SvidError, VerificationError):
        return
    # base64url's last character can carry unused bits: a token may differ in them and still be the same.
    assert svid.claims == JwtSvid.parse_and_validate(TOKEN, JWT_BUNDLE, "aud").claims


def test_jwt_signed_by_another_trust_domain_key_is_refused() -> None:
    other = TestCA("example.org")
    forged = other.mint_jwt_svid("/fuzz/workload", "aud")
    try:
        JwtSvid.parse_and_validate(forged, JWT_BUNDLE, "aud")
    except VerificationError:
        return
    raise AssertionError("a JWT-SVID signed by an unknown key verified")


# ------------------------------------------------------------------------------------------------ CSRs


def _csr(key: Any, sans: tuple[str, ...] = ()) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(s) for s in sans]), critical=False
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)


GOOD_CSR = _csr(ec.generate_private_key(ec.SECP256R1()))


@FUZZ
@given(st.binary(max_size=MAX_CSR_BYTES + 10))
def test_csr_random_bytes(data: bytes) -> None:
    try:
        csr_public_key(data)
    except BadCsrError:
        return
    raise AssertionError("random bytes parsed as a CSR")


@FUZZ
@given(st.integers(0, len(GOOD_CSR) - 1), st.integers(0, 255))
def test_csr_byte_mutations(position: int, value: int) -> None:
    assume(GOOD_CSR[position] != value)
    data = bytearray(GOOD_CSR)
    data[position] = value
    try:
        csr_public_key(bytes(data))
    except BadCsrError:
        return
    # DER has a few bytes whose change keeps the same meaning to a lenient parser; the signature still binds
    # the request info, so any accepted mutation must yield the same public key.
    assert public_keys_equal(csr_public_key(bytes(data)), csr_public_key(GOOD_CSR))


@FUZZ
@given(st.integers(0, len(GOOD_CSR)))
def test_csr_truncations_and_padding(length: int) -> None:
    for data in (GOOD_CSR[:length], GOOD_CSR + b"\x00" * length, b"   " + GOOD_CSR):
        if data == GOOD_CSR:
            continue
        try:
            csr_public_key(data)
        except BadCsrError:
            continue
        raise AssertionError(f"malformed CSR accepted ({len(data)} bytes)")


def test_csr_key_policy() -> None:
    for key in (
        ec.generate_private_key(ec.SECP521R1()),
        ec.generate_private_key(ec.SECP256K1()),
        rsa.generate_private_key(65537, 1024),
        ed25519.Ed25519PrivateKey.generate(),
    ):
        try:
            csr_public_key(_csr(key))
        except BadCsrError:
            continue
        raise AssertionError(f"{type(key).__name__} CSR accepted")
    csr_public_key(_csr(ec.generate_private_key(ec.SECP384R1())))
    csr_public_key(_csr(rsa.generate_private_key(65537, 2048)))


def test_all_parser_errors_are_tessera_errors() -> None:
    """The gRPC layers map TesseraError families to status codes; parser errors must belong to the family."""
    for error in (SpiffeIdError, SelectorError, ConfigError, BundleError, SvidError, VerificationError, BadCsrError):
        assert issubclass(error, TesseraError), error
