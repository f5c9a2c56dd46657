"""The CA's file I/O: private directories and atomic 0600 writes, from the SDK's one implementation.

The CA's keys and journal must never be seen half-written (a crash mid-write would otherwise leave a server
that cannot restart, or one that silently rotates its CA), nor be readable by anyone but the server's user.
"""

from __future__ import annotations

from tessera.sdk.files import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, ensure_private_dir, fsync_dir, write_private_file

__all__ = ["PRIVATE_DIR_MODE", "PRIVATE_FILE_MODE", "ensure_private_dir", "fsync_dir", "write_private_file"]
