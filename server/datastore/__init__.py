"""The server's storage: one interface (:class:`Datastore`), SQLite by default, PostgreSQL for several servers."""

from tessera.server.datastore.base import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    AttestedAgent,
    Bundle,
    Datastore,
    EntryChanges,
    EntryFilter,
    JoinToken,
    Page,
    RegistrationEntry,
    Revisions,
    SelectorMatch,
    hash_join_token,
)
from tessera.server.datastore.factory import open_datastore
from tessera.server.selectors import Selector

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "AttestedAgent",
    "Bundle",
    "Datastore",
    "EntryChanges",
    "EntryFilter",
    "JoinToken",
    "Page",
    "RegistrationEntry",
    "Revisions",
    "Selector",
    "SelectorMatch",
    "hash_join_token",
    "open_datastore",
]
