"""Refuse to start on half a data directory, instead of silently starting over.

A server's state is its CA (``<data_dir>/ca``: journal and, with the disk key manager, keys) and its datastore
(SQLite in the data dir by default). If one survives without the other (a restore of only part of a backup, a
file deleted by hand, a volume that was not mounted), starting anyway is the worst outcome:

- CA state gone: a new CA would be created and published, and every agent and workload would stop trusting the
  server (and each other) at their next bundle update;
- SQLite datastore gone: every registration entry, agent and join token is forgotten, so every agent is
  refused on its next call and must be re-attested by hand.

Both are refused with one line that says what is missing and how to recover. A first start (nothing there yet)
and a PostgreSQL datastore (shared by several servers, outside the data dir) are not affected by the second
rule; the first applies to any datastore because the record of what this server published lives in the data
dir next to the CA.
"""

from __future__ import annotations

from pathlib import Path

from tessera.server.datastore.factory import DEFAULT_SQLITE_FILE
from tessera.server.errors import ServerError

CA_JOURNAL = Path("ca") / "ca_journal.json"
PUBLISHED_RECORD = "published_authorities.json"


class InconsistentStateError(ServerError):
    """Part of the server's persistent state is missing; starting would discard the rest."""


def check_persistent_state(data_dir: Path, datastore: str) -> None:
    """Raises :class:`InconsistentStateError` when the data dir holds only part of a server's state."""
    journal = data_dir / CA_JOURNAL
    published = data_dir / PUBLISHED_RECORD
    sqlite_default = data_dir / DEFAULT_SQLITE_FILE
    if not journal.exists() and published.exists():
        raise InconsistentStateError(
            f"CA state {journal} is missing, but this server has published CA authorities before "
            f"({published}): restore {data_dir / 'ca'} from a backup (starting would create a new CA that no agent "
            f"trusts); to really start over with a new CA, remove {published} as well"
        )
    if not datastore and journal.exists() and not sqlite_default.exists():
        raise InconsistentStateError(
            f"datastore {sqlite_default} is missing, but the CA in {data_dir / 'ca'} exists: restore the database "
            "from a backup (starting would forget every entry, agent and join token); to really start over with "
            f"an empty datastore, move {data_dir} aside"
        )


__all__ = ["InconsistentStateError", "check_persistent_state"]
