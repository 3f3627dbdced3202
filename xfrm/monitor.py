"""The kernel's XFRM multicast notifications as Events (`ip xfrm monitor`, but structured).

One NETLINK_XFRM socket bound to the groups XFRMNLGRP_ACQUIRE / EXPIRE / SA / POLICY / REPORT /
MAPPING. Every message becomes an Event with source "xfrm_monitor" and kind sa-new, sa-update,
sa-delete, expire, acquire, policy-new, policy-update, policy-delete, mapping or report; SA
details ride in detail["sa"] as SA.to_dict(keys=False): the events log must never hold keys.
Consumers that need keys (keeper.py) use `read_raw()` to get the decoded SA objects.

Two ways to use it: `events()` blocks in its own thread and ends when `close()` is called from
another; or put `fileno()` into your select loop and call `read()` when it is readable.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from ipsec_capture.models import Event
from ipsec_capture.netns import netns_inode

from . import netlink as nl
from .sa import SA, Policy

# <linux/xfrm.h> enum xfrm_nlgroups
XFRMNLGRP_ACQUIRE = 1
XFRMNLGRP_EXPIRE = 2
XFRMNLGRP_SA = 3
XFRMNLGRP_POLICY = 4
XFRMNLGRP_REPORT = 6
XFRMNLGRP_MAPPING = 8
GROUPS = (XFRMNLGRP_ACQUIRE, XFRMNLGRP_EXPIRE, XFRMNLGRP_SA, XFRMNLGRP_POLICY, XFRMNLGRP_REPORT,
          XFRMNLGRP_MAPPING)

# struct xfrm_user_acquire: id, saddr, sel, policy, aalgos, ealgos, calgos, seq (sizeof 280)
ACQUIRE_POLICY_OFFSET = nl.XFRM_ID.size + 16 + nl.XFRM_SELECTOR.size  # 96
ACQUIRE_TAIL = struct.Struct("=4I")
# struct xfrm_user_mapping: id (xfrm_usersa_id), reqid, old_saddr, new_saddr, old_sport, new_sport
MAPPING_TAIL = struct.Struct("=I16s16sHH")
XFRM_USERPOLICY_ID_LEN = nl.XFRM_SELECTOR.size + nl.XFRM_USERPOLICY_ID_TAIL.size  # 64

SA_KINDS = {nl.XFRM_MSG_NEWSA: "sa-new", nl.XFRM_MSG_UPDSA: "sa-update", nl.XFRM_MSG_DELSA: "sa-delete"}
POLICY_KINDS = {nl.XFRM_MSG_NEWPOLICY: "policy-new", nl.XFRM_MSG_UPDPOLICY: "policy-update",
                nl.XFRM_MSG_DELPOLICY: "policy-delete"}


@dataclass(slots=True)
class Notification:
    """One decoded message: the Event, plus the SA/policy with keys for in-process consumers."""

    event: Event
    sa: SA | None = None
    policy: Policy | None = None


def _sa_event(kind: str, sa: SA, ns: int | None, now: int, **detail: Any) -> Event:
    return Event(time_ns=now, source="xfrm_monitor", kind=kind, netns=ns, spi=sa.spi,
                 tuple={"src": sa.src, "dst": sa.dst, "proto": sa.proto},
                 detail={"sa": sa.to_dict(keys=False), **detail})


def decode_notification(mtype: int, msg: memoryview, ns: int | None = None,
                        now: int | None = None) -> Notification | None:
    """An XFRM notification (nlmsghdr included) as a Notification; None for types we skip."""
    now = time.time_ns() if now is None else now
    body = msg[nl.NLMSGHDR.size:]
    if mtype in (nl.XFRM_MSG_NEWSA, nl.XFRM_MSG_UPDSA):
        sa = nl.decode_usersa(body[:nl.XFRM_USERSA_INFO_LEN], nl.parse_attrs(body, nl.XFRM_USERSA_INFO_LEN))
        return Notification(_sa_event(SA_KINDS[mtype], sa, ns, now), sa=sa)
    if mtype == nl.XFRM_MSG_DELSA:
        # xfrm_usersa_id header; the full usersa_info rides in XFRMA_SA, other attrs at top level
        attrs = nl.parse_attrs(body, nl.XFRM_USERSA_ID.size)
        if nl.XFRMA_SA not in attrs:
            return None
        sa = nl.decode_usersa(attrs[nl.XFRMA_SA], attrs)
        return Notification(_sa_event("sa-delete", sa, ns, now), sa=sa)
    if mtype == nl.XFRM_MSG_EXPIRE:
        sa = nl.decode_usersa(body[:nl.XFRM_USERSA_INFO_LEN],
                              nl.parse_attrs(body, nl.XFRM_USERSA_INFO_LEN + 8))
        hard = bool(body[nl.XFRM_USERSA_INFO_LEN])
        return Notification(_sa_event("expire", sa, ns, now, hard=hard), sa=sa)
    if mtype in POLICY_KINDS:
        if mtype == nl.XFRM_MSG_DELPOLICY:
            attrs = nl.parse_attrs(body, XFRM_USERPOLICY_ID_LEN)
            if nl.XFRMA_POLICY not in attrs:
                return None
            pol = nl.decode_userpolicy(attrs[nl.XFRMA_POLICY], attrs)
        else:
            pol = nl.decode_userpolicy(body[:nl.XFRM_USERPOLICY_INFO_LEN],
                                       nl.parse_attrs(body, nl.XFRM_USERPOLICY_INFO_LEN))
        ev = Event(time_ns=now, source="xfrm_monitor", kind=POLICY_KINDS[mtype], netns=ns,
                   detail={"policy": pol.to_dict()})
        return Notification(ev, policy=pol)
    if mtype == nl.XFRM_MSG_POLEXPIRE:
        pol = nl.decode_userpolicy(body[:nl.XFRM_USERPOLICY_INFO_LEN],
                                   nl.parse_attrs(body, nl.XFRM_USERPOLICY_INFO_LEN + 8))
        hard = bool(body[nl.XFRM_USERPOLICY_INFO_LEN])
        ev = Event(time_ns=now, source="xfrm_monitor", kind="expire", netns=ns,
                   detail={"policy": pol.to_dict(), "hard": hard})
        return Notification(ev, policy=pol)
    if mtype == nl.XFRM_MSG_ACQUIRE:
        daddr, _spi, proto = nl.XFRM_ID.unpack_from(body, 0)
        saddr = bytes(body[nl.XFRM_ID.size:nl.XFRM_ID.size + 16])
        attrs = nl.parse_attrs(body, ACQUIRE_POLICY_OFFSET + nl.XFRM_USERPOLICY_INFO_LEN + ACQUIRE_TAIL.size)
        pol_end = ACQUIRE_POLICY_OFFSET + nl.XFRM_USERPOLICY_INFO_LEN
        pol = nl.decode_userpolicy(body[ACQUIRE_POLICY_OFFSET:pol_end], attrs)
        family = pol.selector.family or nl.AF_INET
        if pol.templates:
            family = pol.templates[0].family or family
        sel = nl.decode_selector(body, nl.XFRM_ID.size + 16, family)
        acq_seq = ACQUIRE_TAIL.unpack_from(body, ACQUIRE_POLICY_OFFSET + nl.XFRM_USERPOLICY_INFO_LEN)[3]
        src, dst = nl.addr_to_str(saddr, family), nl.addr_to_str(daddr, family)
        ev = Event(time_ns=now, source="xfrm_monitor", kind="acquire", netns=ns,
                   tuple={"src": src, "dst": dst, "proto": proto},
                   detail={"selector": None if sel is None else asdict(sel), "policy": pol.to_dict(),
                           "acquire_seq": acq_seq})
        return Notification(ev, policy=pol)
    if mtype == nl.XFRM_MSG_MAPPING:
        daddr, spi, family, proto = nl.XFRM_USERSA_ID.unpack_from(body, 0)
        reqid, old, new, old_port, new_port = MAPPING_TAIL.unpack_from(body, nl.XFRM_USERSA_ID.size)
        ev = Event(time_ns=now, source="xfrm_monitor", kind="mapping", netns=ns, spi=socket.ntohl(spi),
                   tuple={"dst": nl.addr_to_str(daddr, family), "proto": proto},
                   detail={"reqid": reqid, "old_src": nl.addr_to_str(old, family),
                           "new_src": nl.addr_to_str(new, family), "old_sport": socket.ntohs(old_port),
                           "new_sport": socket.ntohs(new_port)})
        return Notification(ev)
    if mtype == nl.XFRM_MSG_REPORT:
        proto = body[0]
        sel = nl.decode_selector(body, 4, nl.AF_INET)
        ev = Event(time_ns=now, source="xfrm_monitor", kind="report", netns=ns,
                   detail={"proto": proto, "selector": None if sel is None else asdict(sel)})
        return Notification(ev)
    return None


class XfrmMonitor:
    """Subscribed XFRM notifications of one namespace (opened at construction: root needed)."""

    def __init__(self, netns: str | None = None) -> None:
        groups = 0
        for g in GROUPS:
            groups |= 1 << (g - 1)
        self.netns = netns
        self._ns = netns_inode(netns)
        self._sock = nl.open_socket(netns, groups)
        self._sock.setblocking(False)
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False
        self._iterating = False
        self.lost = 0  # ENOBUFS: the kernel dropped notifications for us

    def fileno(self) -> int:
        return self._sock.fileno()

    def read_raw(self) -> list[Notification]:
        """Whatever is queued now, decoded (never blocks). Lost messages become an Event."""
        out: list[Notification] = []
        while True:
            try:
                data = self._sock.recv(1 << 20)
            except BlockingIOError:
                return out
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise
                self.lost += 1
                out.append(Notification(Event(time_ns=time.time_ns(), source="xfrm_monitor",
                                              kind="overrun", netns=self._ns, reason="ENOBUFS",
                                              detail={"lost_batches": self.lost})))
                continue
            for mtype, _flags, msg in nl.iter_messages(data):
                try:
                    note = decode_notification(mtype, msg, self._ns)
                except (struct.error, ValueError, IndexError) as err:
                    note = Notification(Event(time_ns=time.time_ns(), source="xfrm_monitor",
                                              kind="undecodable", netns=self._ns, reason=str(err),
                                              detail={"type": mtype}))
                if note is not None:
                    out.append(note)

    def read(self) -> list[Event]:
        return [n.event for n in self.read_raw()]

    def notifications(self, timeout: float | None = None) -> Iterator[Notification]:
        """Blocking stream until close(); with `timeout`, also ends after that long idle."""
        self._iterating = True
        try:
            while not self._closed:
                ready, _, _ = select.select([self._sock.fileno(), self._wake_r], [], [], timeout)
                if not ready or self._closed:
                    return
                yield from self.read_raw()
        finally:
            self._iterating = False
            if self._closed:
                self._release()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        for note in self.notifications(timeout):
            yield note.event

    def close(self) -> None:
        """Ends a blocked events() in another thread, then releases the socket."""
        if self._closed:
            return
        self._closed = True
        os.write(self._wake_w, b"x")
        if not self._iterating:  # else the iterating thread releases when it wakes up
            self._release()

    def _release(self) -> None:
        if self._sock.fileno() >= 0:
            self._sock.close()
            os.close(self._wake_w)
            os.close(self._wake_r)

    def __enter__(self) -> XfrmMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
