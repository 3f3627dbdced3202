"""Least privilege for `start`, as tcpdump -Z: the process that parses packets is not root and
holds no capabilities.

Why a split, not capset in one process: capabilities are per thread (capset and PR_SET_KEEPCAPS
change only the calling thread, so the companions' threads would keep root's), and what must
happen at the end needs more than a capability or two: removing rules inside a namespace (setns:
CAP_SYS_ADMIN, nft/iptables-restore and their lock file), rmdir of our tracefs instance, umount
of a private tracefs. So once the rules are in and the NFLOG socket and the pcapng are open, and
before any companion thread exists, `start` forks:
  - the reader (child) drops to the user at once: setgroups, setresgid, setresuid (every
    capability goes with uid 0, nothing is kept: reading a bound socket and writing an open file
    need none), PR_SET_NO_NEW_PRIVS, a parent-death signal; then it runs the read/write loop and
    sends its statistics (or its one-line error) back through a pipe;
  - the parent stays root and does only what needs root: the companions (kernel event sources
    and the key keeper: the kernel's input, not packets from the network), signal forwarding,
    and the rules' removal however the reader ends, kill -9 included.
Standard library only (os.setresuid, ctypes prctl): no dependency is worth it for three calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pwd
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ipsec_capture.errors import UserError

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
CAP_SYS_ADMIN = 21  # <linux/capability.h>
DEFAULT_USER = "nobody"
EXIT_READER_DIED = 70  # EX_SOFTWARE: the reader process died without a word (a signal, a bug)


@dataclass(frozen=True, slots=True)
class Target:
    """The user the reader becomes."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def default_user() -> str:
    """The sudo caller when there is one (they own the files anyway), else `nobody`."""
    sudo_uid = os.environ.get("SUDO_UID", "")
    if sudo_uid.isdigit() and int(sudo_uid) != 0:
        with contextlib.suppress(KeyError):
            return pwd.getpwuid(int(sudo_uid)).pw_name
    return DEFAULT_USER


def resolve(user: str | None, drop: bool) -> Target | None:
    """Whom the reader runs as; None: it stays root (--no-drop, --user root, or not root)."""
    if not drop or os.geteuid() != 0:
        return None
    name = user or default_user()
    try:
        entry = pwd.getpwnam(name) if not name.isdigit() else pwd.getpwuid(int(name))
    except KeyError:
        raise UserError(f"--user {name}: no such user (give an existing user, or --no-drop to "
                        "stay root)") from None
    if entry.pw_uid == 0:
        return None
    groups = tuple(sorted({entry.pw_gid, *(g.gr_gid for g in _groups_of(entry.pw_name))}))
    return Target(entry.pw_name, entry.pw_uid, entry.pw_gid, groups)


def _groups_of(name: str) -> list[Any]:
    import grp

    return [g for g in grp.getgrall() if name in g.gr_mem]


def file_owner() -> tuple[int, int] | None:
    """(uid, gid) of the user who ran sudo: the bundle is theirs, not root's. None without sudo."""
    uid, gid = os.environ.get("SUDO_UID", ""), os.environ.get("SUDO_GID", "")
    if uid.isdigit() and gid.isdigit() and int(uid) != 0:
        return int(uid), int(gid)
    return None


def give(path: str | os.PathLike[str], owner: tuple[int, int] | None) -> None:
    """Hand a file we created (mode 0600) to the invoking user; best effort (a file system
    without owners, such as vfat, keeps root's)."""
    if owner is not None:
        with contextlib.suppress(OSError):
            os.chown(path, *owner)


def _prctl(option: int, arg: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def proc_status(pid: int | str = "self") -> dict[str, str]:
    """/proc/PID/status as a dict (Uid, Gid, CapEff, ...): what the kernel says a process is."""
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def drop_to(target: Target) -> None:
    """Become `target` for good, in this (single-threaded, freshly forked) process; then check
    with the kernel that no uid 0 and no capability is left."""
    os.setgroups(list(target.groups))
    os.setresgid(target.gid, target.gid, target.gid)
    os.setresuid(target.uid, target.uid, target.uid)  # permitted and effective caps are cleared
    _prctl(PR_SET_NO_NEW_PRIVS, 1)  # no setuid binary can give them back
    status = proc_status()
    if any(u == "0" for u in status["Uid"].split()) or int(status["CapEff"], 16) or int(status["CapPrm"], 16):
        raise RuntimeError(f"privileges still held after the drop: Uid {status['Uid']}, "
                           f"CapEff {status['CapEff']}")


class Reader:
    """The forked reader: `run` (the capture loop) in a child that dropped to `target`; the parent
    waits for it with `wait` and gets what `run` returned, or the child's UserError again."""

    def __init__(self, target: Target, run: Callable[[], dict[str, Any]]) -> None:
        self.target = target
        parent = os.getpid()
        rfd, wfd = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the reader: never returns
            os.close(rfd)
            _child(target, run, wfd, parent)
        os.close(wfd)
        self.pid = pid
        self._rfd = rfd
        self._status: int | None = None

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def poll(self) -> bool:
        """True once the reader has ended."""
        if self._status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._status = status
        return self._status is not None

    def end(self) -> None:
        """However the parent leaves (a companion failed to start, a bug): no reader outlives it."""
        if not self.poll():
            self.signal(signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self._status = 0

    def wait(self, stop_signal: Callable[[], int | None], tick: float = 0.05) -> dict[str, Any]:
        """Block until the reader ends, passing on the stop signal this process got (once
        `stop_signal()` names one: the reader's summary says what stopped it); its result, or
        its UserError raised here (the reader died: a UserError saying how)."""
        forwarded = False
        try:
            while not self.poll():
                signum = None if forwarded else stop_signal()
                if signum is not None:
                    self.signal(signum)
                    forwarded = True
                time.sleep(tick)
        except BaseException:
            self.end()  # never leave a reader running without its rules' keeper
            raise
        with os.fdopen(self._rfd, "rb") as f:
            raw = f.read()
        status = self._status or 0
        try:
            msg = json.loads(raw) if raw else None
        except ValueError:
            msg = None
        if msg is None:
            how = (f"killed by {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
                   else f"exit status {os.waitstatus_to_exitcode(status)}")
            err = UserError(f"the capture's reader process ({self.pid}, user {self.target.name}) died "
                            f"({how}); rules removed; the file is complete up to its last whole block")
            err.exit_code = EXIT_READER_DIED
            raise err
        if "error" in msg:
            err = UserError(msg["error"])
            err.exit_code = msg.get("exit_code", 2)
            raise err
        return msg["result"]


def _child(target: Target, run: Callable[[], dict[str, Any]], wfd: int, parent: int) -> None:
    code = 0
    try:
        drop_to(target)
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # after the drop: a credential change clears it
        if os.getppid() != parent:  # the parent died before we asked
            os.kill(os.getpid(), signal.SIGTERM)
        msg: dict[str, Any] = {"result": run()}
    except UserError as err:
        msg = {"error": str(err), "exit_code": err.exit_code}
    except BaseException as err:  # a bug: its traceback on stderr, one line to the parent
        traceback.print_exc()
        msg = {"error": f"the capture's reader process failed: {err!r}", "exit_code": EXIT_READER_DIED}
        code = EXIT_READER_DIED
    try:
        data = json.dumps(msg).encode()
        while data:
            data = data[os.write(wfd, data):]
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)  # not the parent's cleanup (its rules, its finally blocks): only ours
