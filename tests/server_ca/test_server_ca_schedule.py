"""The rotation schedule is pure: these tests hand it instants and lifetimes, no clock, no keys."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tessera.server.ca.schedule import (
    Action,
    Lifetime,
    SlotState,
    activate_at,
    next_action,
    next_event_at,
    prepare_at,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = timedelta(hours=24)


def life(start: datetime, length: timedelta = DAY) -> Lifetime:
    return Lifetime(start, start + length)


def test_prepare_at_half_life_and_activate_at_five_sixths() -> None:
    lt = life(T0)
    assert prepare_at(lt) == T0 + timedelta(hours=12)
    assert activate_at(lt) == T0 + timedelta(hours=20)


def test_lead_times_are_capped_for_long_lived_authorities() -> None:
    lt = life(T0, timedelta(days=365))
    assert prepare_at(lt) == lt.not_after - timedelta(days=30)
    assert activate_at(lt) == lt.not_after - timedelta(days=7)


def test_lifetime_rejects_naive_and_inverted_times() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        Lifetime(datetime(2026, 1, 1), datetime(2026, 1, 2))
    with pytest.raises(ValueError, match="before it starts"):
        Lifetime(T0, T0)


def test_empty_state_prepares_then_activates() -> None:
    assert next_action(SlotState(active=None), T0) is Action.PREPARE
    assert next_action(SlotState(active=None, prepared=life(T0)), T0) is Action.ACTIVATE


def test_full_cycle() -> None:
    a = life(T0)
    state = SlotState(active=a)
    assert next_action(state, T0) is None
    assert next_event_at(state, T0) == prepare_at(a)
    just_before = prepare_at(a) - timedelta(seconds=1)
    assert next_action(state, just_before) is None
    assert next_action(state, prepare_at(a)) is Action.PREPARE

    b = life(prepare_at(a))
    state = SlotState(active=a, prepared=b)
    assert next_action(state, prepare_at(a)) is None
    assert next_event_at(state, prepare_at(a)) == activate_at(a)
    assert next_action(state, activate_at(a)) is Action.ACTIVATE

    state = SlotState(active=b, old=(a,))
    t = activate_at(a)
    assert next_action(state, t) is None
    # With the default fractions the old CA expires exactly when its successor reaches half life: both are due.
    assert next_event_at(state, t) == a.not_after == prepare_at(b)
    assert next_action(state, a.not_after) is Action.PREPARE
    c = life(a.not_after)
    state = SlotState(active=b, prepared=c, old=(a,))
    assert next_action(state, a.not_after) is Action.PRUNE
    state = SlotState(active=b, prepared=c)
    assert next_action(state, a.not_after) is None
    assert next_event_at(state, a.not_after) == activate_at(b)


def test_old_authority_is_pruned_at_expiry() -> None:
    a = life(T0, timedelta(hours=30))
    b = life(T0 + timedelta(hours=20))
    state = SlotState(active=b, old=(a,))
    assert next_event_at(state, T0 + timedelta(hours=21)) == a.not_after
    assert next_action(state, a.not_after - timedelta(seconds=1)) is None
    assert next_action(state, a.not_after) is Action.PRUNE


def test_activation_time_without_prepared_authority_prepares_first() -> None:
    a = life(T0)
    assert next_action(SlotState(active=a), activate_at(a)) is Action.PREPARE


def test_expired_active_is_replaced_at_once() -> None:
    a = life(T0)
    late = a.not_after + timedelta(days=3)
    assert next_action(SlotState(active=a), late) is Action.PREPARE
    stale_prepared = life(T0 + timedelta(hours=12))
    assert next_action(SlotState(active=a, prepared=stale_prepared), late) is Action.PREPARE
    fresh = life(late)
    assert next_action(SlotState(active=a, prepared=fresh), late) is Action.ACTIVATE
    assert next_action(SlotState(active=fresh, old=(a,)), late) is Action.PRUNE


def test_expired_prepared_is_pruned() -> None:
    a = life(T0, timedelta(days=10))
    short = life(T0, timedelta(hours=1))
    state = SlotState(active=a, prepared=short)
    assert next_action(state, T0 + timedelta(hours=2)) is Action.PRUNE


def test_upstream_limit_stops_pointless_rotations() -> None:
    a = life(T0)
    # The upstream CA ends when the active CA does: a successor could not outlive it, so none is prepared.
    state = SlotState(active=a, issuer_not_after=a.not_after)
    assert next_action(state, prepare_at(a)) is None
    assert next_action(state, activate_at(a)) is None
    assert next_event_at(state, prepare_at(a)) == a.not_after
    # A little more upstream life is worth a successor.
    state = SlotState(active=a, issuer_not_after=a.not_after + timedelta(hours=1))
    assert next_action(state, prepare_at(a)) is Action.PREPARE


def test_next_event_is_now_when_something_is_due() -> None:
    assert next_event_at(SlotState(active=None), T0) == T0


@given(
    life_hours=st.integers(min_value=1, max_value=24 * 400),
    offset_minutes=st.integers(min_value=0, max_value=60 * 24 * 800),
)
def test_next_event_is_never_in_the_past_and_nothing_is_due_before_it(life_hours: int, offset_minutes: int) -> None:
    a = life(T0, timedelta(hours=life_hours))
    b = life(prepare_at(a), timedelta(hours=life_hours))
    now = T0 + timedelta(minutes=offset_minutes)
    for state in (SlotState(active=a), SlotState(active=a, prepared=b), SlotState(active=b, old=(a,))):
        event = next_event_at(state, now)
        if next_action(state, now) is not None:
            assert event == now
            continue
        assert event is None or event > now
        if event is not None:
            # Nothing becomes due strictly between now and the announced event.
            assert next_action(state, now + (event - now) / 2) is None


def test_simulated_rotations_keep_one_active_authority_and_bounded_bundle() -> None:
    """Drives the schedule for 10 days the way the CA manager does and checks the invariants at every step."""
    state = SlotState(active=None)
    now = T0
    activations = 0
    for _ in range(200):
        for _step in range(8):
            action = next_action(state, now)
            if action is None:
                break
            if action is Action.PREPARE:
                state = SlotState(active=state.active, prepared=life(now), old=state.old)
            elif action is Action.ACTIVATE:
                assert state.prepared is not None
                old = state.old + ((state.active,) if state.active else ())
                state = SlotState(active=state.prepared, prepared=None, old=old)
                activations += 1
            else:
                state = SlotState(
                    active=state.active,
                    prepared=state.prepared,
                    old=tuple(o for o in state.old if now < o.not_after),
                )
        assert next_action(state, now) is None
        assert state.active is not None and state.active.not_before <= now < state.active.not_after
        assert len(state.old) <= 1
        nxt = next_event_at(state, now)
        assert nxt is not None and nxt > now
        now = nxt
        if now > T0 + timedelta(days=10):
            break
    # Each CA is made at its predecessor's half life, so one takes over every 12 hours (first at T0, then
    # from 20 h on): 20 activations in 10 days.
    assert activations == 20
