"""The CA rotation schedule, as pure functions of the slots' lifetimes and ``now``.

The rule (SPIRE's, which operators already know): the next authority is *prepared* when the active one
reaches half its life and is published in the trust bundle at once, so every relying party has it well
before it signs anything; it becomes *active* at 5/6 of the current authority's life; the previous one is
kept in the bundle as *old* until it expires (SVIDs it signed stay verifiable) and is then pruned. For very
long-lived authorities the lead times are capped (prepare at most 30 days, activate at most 7 days before
expiry).

Nothing here reads a clock or touches a key. The CA manager asks :func:`next_action` what is due, performs
it, asks again, and then sleeps until :func:`next_event_at`, so a test drives a whole rotation by handing
in instants.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

MAX_PREPARE_LEAD = timedelta(days=30)
MAX_ACTIVATE_LEAD = timedelta(days=7)


@dataclass(frozen=True, slots=True)
class Lifetime:
    """The validity window of an authority (certificate or JWT key): aware UTC datetimes."""

    not_before: datetime
    not_after: datetime

    def __post_init__(self) -> None:
        if self.not_before.tzinfo is None or self.not_after.tzinfo is None:
            raise ValueError("lifetimes must be timezone-aware datetimes")
        if self.not_after <= self.not_before:
            raise ValueError(f"lifetime ends ({self.not_after}) before it starts ({self.not_before})")

    @property
    def life(self) -> timedelta:
        return self.not_after - self.not_before

    def expired(self, now: datetime) -> bool:
        return now >= self.not_after


def prepare_at(lifetime: Lifetime) -> datetime:
    """When the successor of an authority with this lifetime should be prepared (half life)."""
    return lifetime.not_after - min(lifetime.life / 2, MAX_PREPARE_LEAD)


def activate_at(lifetime: Lifetime) -> datetime:
    """When the successor takes over signing (5/6 of the life)."""
    return lifetime.not_after - min(lifetime.life / 6, MAX_ACTIVATE_LEAD)


class Action(enum.Enum):
    PREPARE = "prepare"
    """Create a new authority in the prepared slot (replacing an unusable prepared one) and publish it."""
    ACTIVATE = "activate"
    """Move the prepared authority to active, and the active one to old."""
    PRUNE = "prune"
    """Drop expired old (and expired prepared) authorities from the bundle and destroy their keys."""


@dataclass(frozen=True, slots=True)
class SlotState:
    """What the schedule needs to know about one family of authorities (X.509 CAs or JWT keys).

    ``issuer_not_after`` is the end of whatever signs the next authority (an upstream CA): a successor
    could not outlive it, so preparing one that would expire no later than the active authority is pointless
    and is not scheduled (otherwise rotations would come ever faster as the upstream CA nears expiry).
    """

    active: Lifetime | None
    prepared: Lifetime | None = None
    old: tuple[Lifetime, ...] = ()
    issuer_not_after: datetime | None = None


def _successor_useful(state: SlotState, active: Lifetime) -> bool:
    return state.issuer_not_after is None or state.issuer_not_after > active.not_after


def next_action(state: SlotState, now: datetime) -> Action | None:
    """The first action due at ``now``, or None when the slots are as they should be.

    Call it again after performing the action: a server that was down for a long time may need several
    in a row (prepare, activate, prune), and each step changes what is due next.
    """
    prepared_usable = state.prepared is not None and not state.prepared.expired(now)
    active = state.active
    if active is None or active.expired(now):
        # Nothing can sign: take the prepared authority if there is one, else make one right now.
        return Action.ACTIVATE if prepared_usable else Action.PREPARE
    if now >= activate_at(active):
        if prepared_usable:
            return Action.ACTIVATE
        if _successor_useful(state, active):
            return Action.PREPARE
    if now >= prepare_at(active) and not prepared_usable and _successor_useful(state, active):
        return Action.PREPARE
    if any(old.expired(now) for old in state.old) or (state.prepared is not None and not prepared_usable):
        return Action.PRUNE
    return None


def next_event_at(state: SlotState, now: datetime) -> datetime | None:
    """The earliest instant after which :func:`next_action` may have something to do.

    Returns ``now`` if an action is already due, None if nothing will ever be due (no authority at all is
    handled by :func:`next_action` returning PREPARE, so that only happens for an empty, unused state).
    """
    if next_action(state, now) is not None:
        return now
    candidates: list[datetime] = []
    active = state.active
    if active is not None:
        candidates.append(active.not_after)
        if state.prepared is not None or _successor_useful(state, active):
            candidates.append(activate_at(active))
        if state.prepared is None and _successor_useful(state, active):
            candidates.append(prepare_at(active))
    if state.prepared is not None:
        candidates.append(state.prepared.not_after)
    candidates.extend(old.not_after for old in state.old)
    future = [t for t in candidates if t > now]
    return min(future) if future else None
