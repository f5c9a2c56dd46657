from tessera.proto import node_pb2 as _node_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BundleFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUNDLE_FORMAT_PEM: _ClassVar[BundleFormat]
    BUNDLE_FORMAT_SPIFFE: _ClassVar[BundleFormat]
BUNDLE_FORMAT_PEM: BundleFormat
BUNDLE_FORMAT_SPIFFE: BundleFormat

class CreateEntryRequest(_message.Message):
    __slots__ = ("entry",)
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    entry: _node_pb2.Entry
    def __init__(self, entry: _Optional[_Union[_node_pb2.Entry, _Mapping]] = ...) -> None: ...

class CreateEntryResponse(_message.Message):
    __slots__ = ("entry",)
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    entry: _node_pb2.Entry
    def __init__(self, entry: _Optional[_Union[_node_pb2.Entry, _Mapping]] = ...) -> None: ...

class ListEntriesRequest(_message.Message):
    __slots__ = ("spiffe_id", "parent_id", "selectors", "page_size", "page_token")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    parent_id: str
    selectors: _containers.RepeatedCompositeFieldContainer[_node_pb2.Selector]
    page_size: int
    page_token: str
    def __init__(self, spiffe_id: _Optional[str] = ..., parent_id: _Optional[str] = ..., selectors: _Optional[_Iterable[_Union[_node_pb2.Selector, _Mapping]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListEntriesResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[_node_pb2.Entry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[_node_pb2.Entry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetEntryRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetEntryResponse(_message.Message):
    __slots__ = ("entry",)
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    entry: _node_pb2.Entry
    def __init__(self, entry: _Optional[_Union[_node_pb2.Entry, _Mapping]] = ...) -> None: ...

class UpdateEntryRequest(_message.Message):
    __slots__ = ("entry",)
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    entry: _node_pb2.Entry
    def __init__(self, entry: _Optional[_Union[_node_pb2.Entry, _Mapping]] = ...) -> None: ...

class UpdateEntryResponse(_message.Message):
    __slots__ = ("entry",)
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    entry: _node_pb2.Entry
    def __init__(self, entry: _Optional[_Union[_node_pb2.Entry, _Mapping]] = ...) -> None: ...

class DeleteEntryRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteEntryResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Agent(_message.Message):
    __slots__ = ("spiffe_id", "attestor", "node_selectors", "serial", "expires_at", "banned", "created_at", "updated_at", "reattestable")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    ATTESTOR_FIELD_NUMBER: _ClassVar[int]
    NODE_SELECTORS_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    BANNED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    REATTESTABLE_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    attestor: str
    node_selectors: _containers.RepeatedCompositeFieldContainer[_node_pb2.Selector]
    serial: str
    expires_at: int
    banned: bool
    created_at: int
    updated_at: int
    reattestable: bool
    def __init__(self, spiffe_id: _Optional[str] = ..., attestor: _Optional[str] = ..., node_selectors: _Optional[_Iterable[_Union[_node_pb2.Selector, _Mapping]]] = ..., serial: _Optional[str] = ..., expires_at: _Optional[int] = ..., banned: _Optional[bool] = ..., created_at: _Optional[int] = ..., updated_at: _Optional[int] = ..., reattestable: _Optional[bool] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents", "next_page_token")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[Agent]
    next_page_token: str
    def __init__(self, agents: _Optional[_Iterable[_Union[Agent, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetAgentRequest(_message.Message):
    __slots__ = ("spiffe_id",)
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    def __init__(self, spiffe_id: _Optional[str] = ...) -> None: ...

class GetAgentResponse(_message.Message):
    __slots__ = ("agent",)
    AGENT_FIELD_NUMBER: _ClassVar[int]
    agent: Agent
    def __init__(self, agent: _Optional[_Union[Agent, _Mapping]] = ...) -> None: ...

class EvictAgentRequest(_message.Message):
    __slots__ = ("spiffe_id",)
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    def __init__(self, spiffe_id: _Optional[str] = ...) -> None: ...

class EvictAgentResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BanAgentRequest(_message.Message):
    __slots__ = ("spiffe_id",)
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    def __init__(self, spiffe_id: _Optional[str] = ...) -> None: ...

class BanAgentResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CreateJoinTokenRequest(_message.Message):
    __slots__ = ("ttl", "spiffe_id")
    TTL_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    ttl: int
    spiffe_id: str
    def __init__(self, ttl: _Optional[int] = ..., spiffe_id: _Optional[str] = ...) -> None: ...

class CreateJoinTokenResponse(_message.Message):
    __slots__ = ("token", "id", "expires_at", "spiffe_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    token: str
    id: str
    expires_at: int
    spiffe_id: str
    def __init__(self, token: _Optional[str] = ..., id: _Optional[str] = ..., expires_at: _Optional[int] = ..., spiffe_id: _Optional[str] = ...) -> None: ...

class GetBundleRequest(_message.Message):
    __slots__ = ("format",)
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    format: BundleFormat
    def __init__(self, format: _Optional[_Union[BundleFormat, str]] = ...) -> None: ...

class GetBundleResponse(_message.Message):
    __slots__ = ("trust_domain", "data")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    data: bytes
    def __init__(self, trust_domain: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class FederatedBundle(_message.Message):
    __slots__ = ("trust_domain", "document", "x509_authorities", "jwt_authorities")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    X509_AUTHORITIES_FIELD_NUMBER: _ClassVar[int]
    JWT_AUTHORITIES_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    document: bytes
    x509_authorities: int
    jwt_authorities: int
    def __init__(self, trust_domain: _Optional[str] = ..., document: _Optional[bytes] = ..., x509_authorities: _Optional[int] = ..., jwt_authorities: _Optional[int] = ...) -> None: ...

class ListFederatedBundlesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListFederatedBundlesResponse(_message.Message):
    __slots__ = ("bundles",)
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    bundles: _containers.RepeatedCompositeFieldContainer[FederatedBundle]
    def __init__(self, bundles: _Optional[_Iterable[_Union[FederatedBundle, _Mapping]]] = ...) -> None: ...

class SetFederatedBundleRequest(_message.Message):
    __slots__ = ("id", "data", "format")
    ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    id: str
    data: bytes
    format: BundleFormat
    def __init__(self, id: _Optional[str] = ..., data: _Optional[bytes] = ..., format: _Optional[_Union[BundleFormat, str]] = ...) -> None: ...

class SetFederatedBundleResponse(_message.Message):
    __slots__ = ("bundle",)
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    bundle: FederatedBundle
    def __init__(self, bundle: _Optional[_Union[FederatedBundle, _Mapping]] = ...) -> None: ...

class DeleteFederatedBundleRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteFederatedBundleResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CASlot(_message.Message):
    __slots__ = ("kind", "state", "key_id", "not_before", "not_after", "key_type", "tainted")
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    KEY_TYPE_FIELD_NUMBER: _ClassVar[int]
    TAINTED_FIELD_NUMBER: _ClassVar[int]
    kind: str
    state: str
    key_id: str
    not_before: int
    not_after: int
    key_type: str
    tainted: bool
    def __init__(self, kind: _Optional[str] = ..., state: _Optional[str] = ..., key_id: _Optional[str] = ..., not_before: _Optional[int] = ..., not_after: _Optional[int] = ..., key_type: _Optional[str] = ..., tainted: _Optional[bool] = ...) -> None: ...

class GetCARequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetCAResponse(_message.Message):
    __slots__ = ("slots",)
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[CASlot]
    def __init__(self, slots: _Optional[_Iterable[_Union[CASlot, _Mapping]]] = ...) -> None: ...

class PrepareCARequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrepareCAResponse(_message.Message):
    __slots__ = ("slots",)
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[CASlot]
    def __init__(self, slots: _Optional[_Iterable[_Union[CASlot, _Mapping]]] = ...) -> None: ...

class ActivateCARequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ActivateCAResponse(_message.Message):
    __slots__ = ("slots",)
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[CASlot]
    def __init__(self, slots: _Optional[_Iterable[_Union[CASlot, _Mapping]]] = ...) -> None: ...

class FederationRelationship(_message.Message):
    __slots__ = ("trust_domain", "bundle_endpoint_url", "profile", "endpoint_spiffe_id", "last_refresh", "next_refresh", "last_error", "bundle_sequence", "x509_authorities", "jwt_authorities", "has_bundle")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ENDPOINT_URL_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_REFRESH_FIELD_NUMBER: _ClassVar[int]
    NEXT_REFRESH_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    X509_AUTHORITIES_FIELD_NUMBER: _ClassVar[int]
    JWT_AUTHORITIES_FIELD_NUMBER: _ClassVar[int]
    HAS_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    bundle_endpoint_url: str
    profile: str
    endpoint_spiffe_id: str
    last_refresh: int
    next_refresh: int
    last_error: str
    bundle_sequence: int
    x509_authorities: int
    jwt_authorities: int
    has_bundle: bool
    def __init__(self, trust_domain: _Optional[str] = ..., bundle_endpoint_url: _Optional[str] = ..., profile: _Optional[str] = ..., endpoint_spiffe_id: _Optional[str] = ..., last_refresh: _Optional[int] = ..., next_refresh: _Optional[int] = ..., last_error: _Optional[str] = ..., bundle_sequence: _Optional[int] = ..., x509_authorities: _Optional[int] = ..., jwt_authorities: _Optional[int] = ..., has_bundle: _Optional[bool] = ...) -> None: ...

class CreateFederationRelationshipRequest(_message.Message):
    __slots__ = ("relationship", "bundle", "bundle_format")
    RELATIONSHIP_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    relationship: FederationRelationship
    bundle: bytes
    bundle_format: BundleFormat
    def __init__(self, relationship: _Optional[_Union[FederationRelationship, _Mapping]] = ..., bundle: _Optional[bytes] = ..., bundle_format: _Optional[_Union[BundleFormat, str]] = ...) -> None: ...

class ListFederationRelationshipsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListFederationRelationshipsResponse(_message.Message):
    __slots__ = ("relationships",)
    RELATIONSHIPS_FIELD_NUMBER: _ClassVar[int]
    relationships: _containers.RepeatedCompositeFieldContainer[FederationRelationship]
    def __init__(self, relationships: _Optional[_Iterable[_Union[FederationRelationship, _Mapping]]] = ...) -> None: ...

class GetFederationRelationshipRequest(_message.Message):
    __slots__ = ("trust_domain",)
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    def __init__(self, trust_domain: _Optional[str] = ...) -> None: ...

class DeleteFederationRelationshipResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AuthorityRequest(_message.Message):
    __slots__ = ("kind", "key_id", "force")
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    key_id: str
    force: bool
    def __init__(self, kind: _Optional[str] = ..., key_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class AuthorityResponse(_message.Message):
    __slots__ = ("slots", "pending_svids")
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    PENDING_SVIDS_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[CASlot]
    pending_svids: int
    def __init__(self, slots: _Optional[_Iterable[_Union[CASlot, _Mapping]]] = ..., pending_svids: _Optional[int] = ...) -> None: ...

class RevokeX509SVIDsRequest(_message.Message):
    __slots__ = ("serial", "entry_id", "agent_id", "cut_off")
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CUT_OFF_FIELD_NUMBER: _ClassVar[int]
    serial: str
    entry_id: str
    agent_id: str
    cut_off: bool
    def __init__(self, serial: _Optional[str] = ..., entry_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., cut_off: _Optional[bool] = ...) -> None: ...

class RevokedX509SVID(_message.Message):
    __slots__ = ("serial", "issuer_key_id", "spiffe_id", "expires_at", "revoked_at")
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    ISSUER_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    serial: str
    issuer_key_id: str
    spiffe_id: str
    expires_at: int
    revoked_at: int
    def __init__(self, serial: _Optional[str] = ..., issuer_key_id: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., expires_at: _Optional[int] = ..., revoked_at: _Optional[int] = ...) -> None: ...

class RevokeX509SVIDsResponse(_message.Message):
    __slots__ = ("revoked",)
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    revoked: _containers.RepeatedCompositeFieldContainer[RevokedX509SVID]
    def __init__(self, revoked: _Optional[_Iterable[_Union[RevokedX509SVID, _Mapping]]] = ...) -> None: ...

class ListRevokedX509SVIDsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRevokedX509SVIDsResponse(_message.Message):
    __slots__ = ("revoked",)
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    revoked: _containers.RepeatedCompositeFieldContainer[RevokedX509SVID]
    def __init__(self, revoked: _Optional[_Iterable[_Union[RevokedX509SVID, _Mapping]]] = ...) -> None: ...
