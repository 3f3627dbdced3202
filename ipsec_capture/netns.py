"""Network namespaces by name (the `ip netns` convention, /run/netns/NAME).

Sockets belong to the namespace they were created in, so a reader for `--netns NAME` enters the
namespace just long enough to open its sockets and then returns; commands (nft, iptables-restore)
run through `ip netns exec`.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

from ipsec_capture.errors import UserError

CLONE_NEWNET = 0x40000000  # <linux/sched.h>
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(name: str | None) -> str:
    """Path of a named namespace, or of our own for None."""
    if name is None:
        return "/proc/self/ns/net"
    if "/" in name or name in (".", ".."):
        raise UserError(f"bad network namespace name {name!r}: give a name as `ip netns list` shows it")
    path = os.path.join(NETNS_RUN_DIR, name)
    if not os.path.exists(path):
        raise UserError(f"network namespace {name!r} does not exist (see `ip netns list`)")
    return path


def netns_inode(name: str | None = None) -> int:
    """The namespace's inode number: the id the kernel and BPF (net->ns.inum) use."""
    return os.stat(netns_path(name)).st_ino


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise UserError(f"cannot enter network namespace: {os.strerror(err)} (are you root?)")


@contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the body in namespace `name` (this thread only); None means stay where we are."""
    if name is None:
        yield
        return
    target = os.open(netns_path(name), os.O_RDONLY)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def exec_prefix(name: str | None) -> list[str]:
    """argv prefix that runs a command inside the namespace."""
    if name is None:
        return []
    netns_path(name)
    return ["ip", "netns", "exec", name]
