"""Rules that live exactly as long as a `with` block, whatever ends it.

SIGTERM and SIGHUP are turned into KeyboardInterrupt while inside, so a capture has one stop path
(Ctrl-C, `kill`, a closed terminal all unwind through the same `finally`). The stop signals are
blocked while rules go in and while they come out, so a signal can never land between "installed"
and "remembered" or cut a removal short; one arriving then is delivered right after.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .manager import RuleSet, install, remove

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def installed(rs: RuleSet) -> Iterator[RuleSet]:
    main = threading.current_thread() is threading.main_thread()
    old = {}
    if main:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            old[sig] = signal.signal(sig, _interrupt)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        install(rs)  # raises before touching anything if the group is busy
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # pending stop signals fire here, inside
            yield rs
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            remove(rs)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
