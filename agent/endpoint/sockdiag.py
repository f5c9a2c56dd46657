"""The inode of a Unix connection's other end, asked of the kernel through sock_diag (``NETLINK_SOCK_DIAG``).

- The agent holds its own end of each Workload API connection; to see who holds the *client's* end it needs
  that socket's inode, which no /proc file shows (/proc/net/unix lists sockets, not their peers). The
  kernel's ``UNIX_DIAG`` answers an exact lookup by inode with ``UDIAG_SHOW_PEER``: one request, one reply.
- ``ss -x`` asks the same; it needs no privilege. Messages are built and parsed here with ``struct`` (pure,
  unit-tested against hand-made replies); :func:`peer_inode` is the one function that talks to the kernel.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
UDIAG_SHOW_PEER = 0x4
UNIX_DIAG_PEER = 2
_ALL_STATES = 0xFFFFFFFF
_NO_COOKIE = 0xFFFFFFFF  # INET_DIAG_NOCOOKIE: look the socket up by inode alone

_NLMSGHDR = struct.Struct("=IHHII")  # nlmsg_len, nlmsg_type, nlmsg_flags, nlmsg_seq, nlmsg_pid
_UNIX_DIAG_REQ = struct.Struct("=BBHIII2I")  # family, protocol, pad, states, ino, show, cookie[2]
_UNIX_DIAG_MSG = struct.Struct("=BBBBI2I")  # family, type, state, pad, ino, cookie[2]
_NLATTR = struct.Struct("=HH")  # nla_len, nla_type
_ERRNO = struct.Struct("=i")
_U32 = struct.Struct("=I")


def _align(n: int) -> int:
    return (n + 3) & ~3


def unix_diag_request(inode: int, seq: int = 1) -> bytes:
    """A SOCK_DIAG_BY_FAMILY request for the AF_UNIX socket ``inode``, asking for its peer."""
    body = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, _ALL_STATES, inode, UDIAG_SHOW_PEER, _NO_COOKIE, _NO_COOKIE)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0) + body


def parse_unix_diag_peer(data: bytes, inode: int) -> int | None:
    """The peer inode in a reply about ``inode``; None when the socket has no peer (the other end is closed).

    Raises OSError with the kernel's errno for an error reply (ENOENT: no such socket), ValueError for a reply
    that is not about ``inode`` or is malformed.
    """
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise ValueError("malformed netlink message")
        body = offset + _NLMSGHDR.size
        end = offset + length
        if kind == NLMSG_ERROR:
            (code,) = _ERRNO.unpack_from(data, body)
            if code:
                raise OSError(-code, os.strerror(-code))
        elif kind == SOCK_DIAG_BY_FAMILY:
            if body + _UNIX_DIAG_MSG.size > end:
                raise ValueError("truncated unix_diag_msg")
            family, _type, _state, _pad, ino, _c0, _c1 = _UNIX_DIAG_MSG.unpack_from(data, body)
            if family != socket.AF_UNIX or ino != inode:
                raise ValueError(f"sock_diag answered about socket {ino}, not {inode}")
            attr = body + _UNIX_DIAG_MSG.size
            while attr + _NLATTR.size <= end:
                nla_len, nla_type = _NLATTR.unpack_from(data, attr)
                if nla_len < _NLATTR.size or attr + nla_len > end:
                    raise ValueError("malformed netlink attribute")
                if nla_type == UNIX_DIAG_PEER and nla_len >= _NLATTR.size + _U32.size:
                    (peer,) = _U32.unpack_from(data, attr + _NLATTR.size)
                    return int(peer) or None
                attr += _align(nla_len)
            return None
        elif kind == NLMSG_DONE:
            break
        offset += _align(length)
    raise ValueError("no unix_diag reply")


def peer_inode(inode: int) -> int | None:
    """The inode of the socket connected to our Unix socket ``inode`` (None: that end is closed)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2.0)
        nl.sendto(unix_diag_request(inode), (0, 0))
        data = nl.recv(8192)
    try:
        return parse_unix_diag_peer(data, inode)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None  # our own end is gone: the connection closed
        raise


__all__ = ["parse_unix_diag_peer", "peer_inode", "unix_diag_request"]
