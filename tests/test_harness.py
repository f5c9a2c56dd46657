"""The test harness itself: children under other ids are never forked from a process with gRPC threads."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent
FORKING_KEYWORDS = {"user", "group", "extra_groups", "preexec_fn"}


def test_no_test_changes_ids_through_subprocess_keywords() -> None:
    """``subprocess``'s ``user=``/``group=``/``extra_groups=``/``preexec_fn=`` make CPython fork() rather than
    vfork(); gRPC's fork handlers then run in the child, which crashed about one run in ten while the test held
    open streams (SIGBUS, SIGSEGV, a failed check in ev_epoll1). ``support.procs.as_user`` changes the ids after
    exec instead."""
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                used = FORKING_KEYWORDS & {k.arg for k in node.keywords if k.arg}
                if used:
                    offenders.append(f"{path.relative_to(TESTS)}:{node.lineno} {sorted(used)}")
    assert not offenders, "use support.procs.as_user instead of: " + ", ".join(offenders)
