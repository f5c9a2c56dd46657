"""Fixtures of the hardening tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.procs import short_dir


@pytest.fixture
def root() -> Iterator[Path]:
    """A short, world-searchable directory for one test's daemons and sockets, removed afterwards."""
    path = short_dir("thard-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
