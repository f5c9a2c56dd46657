"""The CA's settings and its one convention about time, shared by the manager that rotates and the CA that signs.

- Both halves read one :class:`CaConfig`: rotation needs key kinds and CA lives, signing needs SVID lives, and
  both backdate what they sign by the same amount.
- Every instant is an aware UTC datetime, and what goes into a certificate or a token is cut to whole seconds
  (:func:`whole_seconds`), so a cap computed here is the cap a relying party reads back.
- The clock is injected (:func:`utc_now` by default): tests drive a whole rotation by handing in instants.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tessera.sdk.x509profile import DEFAULT_CA_COMMON_NAME
from tessera.server.ca.keymanager import DEFAULT_KEY_KIND, check_key_kind

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def whole_seconds(value: datetime) -> datetime:
    """Certificates and JWTs carry whole seconds; computing with the same precision keeps caps exact."""
    return value.replace(microsecond=0)


def instant(clock: Clock, now: datetime | None) -> datetime:
    """``now`` (or the clock's reading when None) as an aware UTC datetime; a naive one is refused."""
    value = clock() if now is None else now
    if value.tzinfo is None:
        raise ValueError("instants must be timezone-aware datetimes")
    return value.astimezone(UTC)


@dataclass(frozen=True)
class CaConfig:
    """CA settings. Durations are :class:`~datetime.timedelta`; defaults are SPIRE's."""

    ca_key_kind: str = DEFAULT_KEY_KIND
    ca_ttl: timedelta = timedelta(hours=24)
    jwt_key_kind: str = DEFAULT_KEY_KIND
    jwt_key_ttl: timedelta | None = None
    """Life of a JWT signing key; None = the same as ``ca_ttl``."""
    x509_svid_ttl: timedelta = timedelta(hours=1)
    """Default X509-SVID life when the request does not give one."""
    max_x509_svid_ttl: timedelta = timedelta(hours=24)
    """Longer requested X509-SVID lives are cut to this (and every SVID is cut at its CA's notAfter)."""
    jwt_svid_ttl: timedelta = timedelta(minutes=5)
    max_jwt_svid_ttl: timedelta = timedelta(hours=24)
    backdate: timedelta = timedelta(seconds=10)
    """notBefore is set this far in the past so peers with slightly slow clocks accept new certificates."""
    ca_common_name: str = DEFAULT_CA_COMMON_NAME
    bundle_refresh_hint: timedelta | None = timedelta(minutes=5)

    def __post_init__(self) -> None:
        check_key_kind(self.ca_key_kind)
        check_key_kind(self.jwt_key_kind)
        if self.ca_ttl < timedelta(minutes=1):
            raise ValueError(f"ca_ttl must be at least 1 minute, got {self.ca_ttl}")
        if self.jwt_key_ttl is not None and self.jwt_key_ttl < timedelta(minutes=1):
            raise ValueError(f"jwt_key_ttl must be at least 1 minute, got {self.jwt_key_ttl}")
        for name in ("x509_svid_ttl", "max_x509_svid_ttl", "jwt_svid_ttl", "max_jwt_svid_ttl"):
            value: timedelta = getattr(self, name)
            if value < timedelta(seconds=1):
                raise ValueError(f"{name} must be at least 1 second, got {value}")
        if self.x509_svid_ttl > self.max_x509_svid_ttl:
            raise ValueError("x509_svid_ttl must not exceed max_x509_svid_ttl")
        if self.jwt_svid_ttl > self.max_jwt_svid_ttl:
            raise ValueError("jwt_svid_ttl must not exceed max_jwt_svid_ttl")
        if not timedelta(0) <= self.backdate <= timedelta(minutes=10):
            raise ValueError(f"backdate must be between 0 and 10 minutes, got {self.backdate}")
        if self.bundle_refresh_hint is not None and self.bundle_refresh_hint < timedelta(seconds=1):
            raise ValueError("bundle_refresh_hint must be at least 1 second")

    @property
    def effective_jwt_key_ttl(self) -> timedelta:
        return self.jwt_key_ttl if self.jwt_key_ttl is not None else self.ca_ttl
