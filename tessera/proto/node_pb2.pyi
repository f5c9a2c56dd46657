from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Selector(_message.Message):
    __slots__ = ("type", "value")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    type: str
    value: str
    def __init__(self, type: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("id", "spiffe_id", "parent_id", "selectors", "x509_svid_ttl", "jwt_svid_ttl", "dns_names", "hint", "admin", "downstream", "federates_with", "expires_at", "revision", "created_at", "node")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    X509_SVID_TTL_FIELD_NUMBER: _ClassVar[int]
    JWT_SVID_TTL_FIELD_NUMBER: _ClassVar[int]
    DNS_NAMES_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_FIELD_NUMBER: _ClassVar[int]
    FEDERATES_WITH_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    id: str
    spiffe_id: str
    parent_id: str
    selectors: _containers.RepeatedCompositeFieldContainer[Selector]
    x509_svid_ttl: int
    jwt_svid_ttl: int
    dns_names: _containers.RepeatedScalarFieldContainer[str]
    hint: str
    admin: bool
    downstream: bool
    federates_with: _containers.RepeatedScalarFieldContainer[str]
    expires_at: int
    revision: int
    created_at: int
    node: bool
    def __init__(self, id: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., parent_id: _Optional[str] = ..., selectors: _Optional[_Iterable[_Union[Selector, _Mapping]]] = ..., x509_svid_ttl: _Optional[int] = ..., jwt_svid_ttl: _Optional[int] = ..., dns_names: _Optional[_Iterable[str]] = ..., hint: _Optional[str] = ..., admin: _Optional[bool] = ..., downstream: _Optional[bool] = ..., federates_with: _Optional[_Iterable[str]] = ..., expires_at: _Optional[int] = ..., revision: _Optional[int] = ..., created_at: _Optional[int] = ..., node: _Optional[bool] = ...) -> None: ...

class AttestParams(_message.Message):
    __slots__ = ("attestor", "payload", "csr")
    ATTESTOR_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    attestor: str
    payload: bytes
    csr: bytes
    def __init__(self, attestor: _Optional[str] = ..., payload: _Optional[bytes] = ..., csr: _Optional[bytes] = ...) -> None: ...

class AttestRequest(_message.Message):
    __slots__ = ("params", "challenge_response")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    params: AttestParams
    challenge_response: bytes
    def __init__(self, params: _Optional[_Union[AttestParams, _Mapping]] = ..., challenge_response: _Optional[bytes] = ...) -> None: ...

class AgentSvid(_message.Message):
    __slots__ = ("spiffe_id", "cert_chain", "expires_at")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    cert_chain: bytes
    expires_at: int
    def __init__(self, spiffe_id: _Optional[str] = ..., cert_chain: _Optional[bytes] = ..., expires_at: _Optional[int] = ...) -> None: ...

class AttestResult(_message.Message):
    __slots__ = ("svid", "node_selectors", "trust_bundle", "reattestable")
    SVID_FIELD_NUMBER: _ClassVar[int]
    NODE_SELECTORS_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    REATTESTABLE_FIELD_NUMBER: _ClassVar[int]
    svid: AgentSvid
    node_selectors: _containers.RepeatedCompositeFieldContainer[Selector]
    trust_bundle: bytes
    reattestable: bool
    def __init__(self, svid: _Optional[_Union[AgentSvid, _Mapping]] = ..., node_selectors: _Optional[_Iterable[_Union[Selector, _Mapping]]] = ..., trust_bundle: _Optional[bytes] = ..., reattestable: _Optional[bool] = ...) -> None: ...

class AttestResponse(_message.Message):
    __slots__ = ("challenge", "result")
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    challenge: bytes
    result: AttestResult
    def __init__(self, challenge: _Optional[bytes] = ..., result: _Optional[_Union[AttestResult, _Mapping]] = ...) -> None: ...

class RenewAgentRequest(_message.Message):
    __slots__ = ("csr",)
    CSR_FIELD_NUMBER: _ClassVar[int]
    csr: bytes
    def __init__(self, csr: _Optional[bytes] = ...) -> None: ...

class RenewAgentResponse(_message.Message):
    __slots__ = ("svid",)
    SVID_FIELD_NUMBER: _ClassVar[int]
    svid: AgentSvid
    def __init__(self, svid: _Optional[_Union[AgentSvid, _Mapping]] = ...) -> None: ...

class SyncRequest(_message.Message):
    __slots__ = ("entries_revision", "bundles_revision", "page_token")
    ENTRIES_REVISION_FIELD_NUMBER: _ClassVar[int]
    BUNDLES_REVISION_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries_revision: int
    bundles_revision: int
    page_token: str
    def __init__(self, entries_revision: _Optional[int] = ..., bundles_revision: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class SyncResponse(_message.Message):
    __slots__ = ("full", "entries", "removed_entry_ids", "entries_revision", "next_page_token", "bundles", "bundles_revision", "crls", "tainted_authorities", "renew_agent_svid")
    class BundlesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    FULL_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    REMOVED_ENTRY_IDS_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_REVISION_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    BUNDLES_REVISION_FIELD_NUMBER: _ClassVar[int]
    CRLS_FIELD_NUMBER: _ClassVar[int]
    TAINTED_AUTHORITIES_FIELD_NUMBER: _ClassVar[int]
    RENEW_AGENT_SVID_FIELD_NUMBER: _ClassVar[int]
    full: bool
    entries: _containers.RepeatedCompositeFieldContainer[Entry]
    removed_entry_ids: _containers.RepeatedScalarFieldContainer[str]
    entries_revision: int
    next_page_token: str
    bundles: _containers.ScalarMap[str, bytes]
    bundles_revision: int
    crls: _containers.RepeatedScalarFieldContainer[bytes]
    tainted_authorities: _containers.RepeatedScalarFieldContainer[str]
    renew_agent_svid: bool
    def __init__(self, full: _Optional[bool] = ..., entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ..., removed_entry_ids: _Optional[_Iterable[str]] = ..., entries_revision: _Optional[int] = ..., next_page_token: _Optional[str] = ..., bundles: _Optional[_Mapping[str, bytes]] = ..., bundles_revision: _Optional[int] = ..., crls: _Optional[_Iterable[bytes]] = ..., tainted_authorities: _Optional[_Iterable[str]] = ..., renew_agent_svid: _Optional[bool] = ...) -> None: ...

class X509SignRequest(_message.Message):
    __slots__ = ("entry_id", "csr")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    csr: bytes
    def __init__(self, entry_id: _Optional[str] = ..., csr: _Optional[bytes] = ...) -> None: ...

class BatchSignX509SVIDRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[X509SignRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[X509SignRequest, _Mapping]]] = ...) -> None: ...

class X509SignResult(_message.Message):
    __slots__ = ("entry_id", "cert_chain", "expires_at")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    cert_chain: bytes
    expires_at: int
    def __init__(self, entry_id: _Optional[str] = ..., cert_chain: _Optional[bytes] = ..., expires_at: _Optional[int] = ...) -> None: ...

class BatchSignX509SVIDResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[X509SignResult]
    def __init__(self, results: _Optional[_Iterable[_Union[X509SignResult, _Mapping]]] = ...) -> None: ...

class MintJWTSVIDRequest(_message.Message):
    __slots__ = ("entry_id", "audience")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    audience: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, entry_id: _Optional[str] = ..., audience: _Optional[_Iterable[str]] = ...) -> None: ...

class MintJWTSVIDResponse(_message.Message):
    __slots__ = ("token", "expires_at")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_at: int
    def __init__(self, token: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...
