"""Bounded logging (tessera._daemon.ratelog): a budget per kind of message over an injected clock, the summary of
what was suppressed, and asyncio's exception handler behind the same budget."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tessera._daemon.ratelog import LogBudget, RateLimitedLog, bound_loop_exceptions


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_budget_allows_a_burst_per_interval_per_key() -> None:
    clock = Clock()
    budget = LogBudget(burst=3, interval=10, clock=clock)
    assert [budget.admit("a") for _ in range(5)] == [True, True, True, False, False]
    assert budget.admit("b")  # another kind has its own budget
    clock.now += 9.9
    assert not budget.admit("a")
    assert list(budget.closed()) == []  # still inside the interval: nothing to report yet
    clock.now += 0.1
    reports = list(budget.closed())
    assert [(r.key, r.count) for r in reports] == [("a", 3)]
    assert reports[0].seconds == pytest.approx(10)
    assert list(budget.closed()) == []  # reported once
    assert budget.admit("a")  # a new interval


def test_a_new_interval_reports_the_previous_ones_suppressed_count() -> None:
    clock = Clock()
    budget = LogBudget(burst=1, interval=5, clock=clock)
    budget.admit("k")
    for _ in range(7):
        budget.admit("k", logging.ERROR)
    clock.now += 6
    assert budget.admit("k")  # the old window is replaced ...
    reports = list(budget.closed())  # ... and its count is still reported
    assert [(r.key, r.count, r.level) for r in reports] == [("k", 7, logging.ERROR)]


def test_the_key_table_is_bounded_and_forgotten_counts_are_reported() -> None:
    clock = Clock()
    budget = LogBudget(burst=1, interval=60, clock=clock, max_keys=3)
    budget.admit("first")
    budget.admit("first")  # one suppressed
    for i in range(100):
        budget.admit(f"source-{i}")
    assert len(budget) == 3
    assert [(r.key, r.count) for r in budget.closed()] == [("first", 1)]


def test_a_clock_stepping_back_starts_a_new_window() -> None:
    clock = Clock()
    budget = LogBudget(burst=1, interval=60, clock=clock)
    assert budget.admit("k")
    assert not budget.admit("k")
    clock.now -= 100
    assert budget.admit("k")


def test_budget_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        LogBudget(burst=0)
    with pytest.raises(ValueError):
        LogBudget(interval=0)


def test_rate_limited_log_keys_by_format_string_and_summarises(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = RateLimitedLog(logging.getLogger("test.ratelog"), burst=2, interval=30, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.ratelog"):
        results = [log.warning("refused a connection from %s", f"10.0.0.{i}") for i in range(50)]
        assert results == [True, True] + [False] * 48
        assert log.info("another kind")
        clock.now += 31
        log.warning("refused a connection from %s", "10.0.0.99")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == ["refused a connection from 10.0.0.0", "refused a connection from 10.0.0.1", "another kind"]
    assert lines[3] == "suppressed 48 more log lines like 'refused a connection from %s' in the last 30s"
    assert lines[4] == "refused a connection from 10.0.0.99"
    assert len(lines) == 5
    assert caplog.records[3].levelno == logging.WARNING


def test_flush_reports_without_a_new_message(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = RateLimitedLog(logging.getLogger("test.ratelog.flush"), burst=1, interval=10, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.ratelog.flush"):
        for _ in range(4):
            log.warning("x", key="custom")
        log.flush()
        assert len(caplog.records) == 1  # the interval is not over yet
        clock.now += 10
        log.flush()
    assert caplog.records[-1].getMessage() == "suppressed 3 more log lines like 'custom' in the last 10s"


def test_disabled_levels_cost_no_budget(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.ratelog.levels")
    log = RateLimitedLog(logger, burst=1, interval=10, clock=Clock())
    with caplog.at_level(logging.WARNING, logger="test.ratelog.levels"):
        assert not log.info("quiet %s", 1)
        assert log.warning("quiet %s", 2)
    assert [r.getMessage() for r in caplog.records] == ["quiet 2"]


def test_loop_exception_handler_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        bound_loop_exceptions(loop, RateLimitedLog(logging.getLogger("test.ratelog.loop"), 3, 60, clock=clock))
        for _ in range(1000):
            loop.call_exception_handler(
                {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many open files")}
            )
        loop.call_exception_handler({"message": "another kind"})
        clock.now += 61
        loop.call_exception_handler({"message": "socket.accept() out of system resource"})

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    asyncio_lines = [r for r in caplog.records if r.name == "asyncio"]
    assert [r.getMessage().splitlines()[0] for r in asyncio_lines].count("socket.accept() out of system resource") == 4
    assert len(asyncio_lines) == 5
    summary = [r.getMessage() for r in caplog.records if r.name == "test.ratelog.loop"]
    assert summary == ["suppressed 997 more log lines like 'socket.accept() out of system resource' in the last 60s"]


def test_loop_exception_handler_chains_to_a_previous_handler() -> None:
    seen: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: seen.append(context["message"]))
        bound_loop_exceptions(loop, RateLimitedLog(logging.getLogger("test.ratelog.chain"), 2, 60, clock=Clock()))
        for _ in range(10):
            loop.call_exception_handler({"message": "boom"})

    asyncio.run(main())
    assert seen == ["boom", "boom"]
