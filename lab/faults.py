"""Faults on demand in a running lab, each with the /proc/net/xfrm_stat counter it must move.

A fault is a reproduction: break one thing the way it breaks on real gateways, send a little
traffic into it, and read the kernel's per-namespace error counter before and after. The counter
and the namespace where it moves are part of the definition, so tests and the diagnosis know
what to expect. On a daemon lab two more are the daemon's own doing: `rekey` (new SPIs for every
child, or one; no counter, the result counts the new SPIs) and `restart-peer` (the right daemon
dies with its kernel state, as in a reboot, and comes back empty; the left still sends on its old
SAs, then re-establishes every child).
"""

from __future__ import annotations

import secrets
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from ipsec_capture.errors import UserError
from ipsec_capture.netns import entered
from ipsec_capture.wire import IPPROTO_ESP, NATT_PORT

from . import daemons, traffic
from .scenarios import DEV, LabState, child_sas, ip_batch, refresh_keys, run, sa_line, xfrm_stat

ETH_P_ALL = 0x0003  # <linux/if_ether.h>
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
PACKET_OUTGOING = 4  # <linux/if_packet.h>
IP_DF = 0x4000
MTU_SMALL = 1200

_ETH = struct.Struct("!6s6sH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")


@dataclass(frozen=True, slots=True)
class Fault:
    name: str
    counter: str  # the /proc/net/xfrm_stat counter that must rise
    side: str  # "left" or "right": the namespace whose counter moves
    summary: str
    inject: Callable[[LabState], str]  # breaks it and sends traffic; returns what it did
    tunnel_only: bool = False
    daemon_only: bool = False


@dataclass(slots=True)
class FaultResult:
    fault: str
    counter: str
    netns: str
    before: int
    after: int
    detail: str

    @property
    def moved(self) -> bool:
        return self.after > self.before

    def line(self) -> str:
        return (f"fault {self.fault}: {self.detail}; {self.counter} in {self.netns}: "
                f"{self.before} -> {self.after} ({self.after - self.before:+d})")


def _send_l2r(state: LabState, count: int = 3) -> traffic.TrafficResult:
    return traffic.udp_echo(state, "left", count, wait=0.5)


def _delete_sa(state: LabState) -> str:
    sa = state.l2r
    ip_batch(state.right, [f"xfrm state delete src {state.left_addr} dst {state.right_addr} "
                           f"proto esp spi {sa.spi:#010x}"])
    return f"deleted SA {sa.spi:#010x} in {state.right}; " + _send_l2r(state).line()


def _wrong_key(state: LabState) -> str:
    sa = state.l2r
    bad = secrets.token_hex(len(sa.enc_key) // 2)
    ip_batch(state.right, [f"xfrm state delete src {state.left_addr} dst {state.right_addr} "
                           f"proto esp spi {sa.spi:#010x}", sa_line(state, "l2r", enc_key=bad)])
    return f"re-keyed SA {sa.spi:#010x} in {state.right} with a wrong key; " + _send_l2r(state).line()


def _block_policy(state: LabState) -> str:
    ip_batch(state.left, [f"xfrm policy update src {state.left_net} dst {state.right_net} dir out "
                          "action block"])
    return f"out policy in {state.left} set to block; " + _send_l2r(state).line()


def _is_esp(frame: bytes) -> bool:
    """Ethernet frame carrying ESP (or ESP in UDP 4500 with a non-zero SPI, i.e. not a keepalive)."""
    if len(frame) < 14 + 40:
        return False
    (ethertype,) = struct.unpack_from("!H", frame, 12)
    if ethertype == ETH_P_IPV6:
        return frame[14 + 6] == IPPROTO_ESP
    if ethertype != ETH_P_IP:
        return False
    proto, ihl = frame[14 + 9], (frame[14] & 0x0F) * 4
    if proto == IPPROTO_ESP:
        return True
    if proto == socket.IPPROTO_UDP:
        _, dport, _, _ = _UDP.unpack_from(frame, 14 + ihl)
        return dport == NATT_PORT and frame[14 + ihl + 8:14 + ihl + 12] != b"\0\0\0\0"
    return False


def _replay(state: LabState) -> str:
    """Capture one ESP frame as the right host receives it, then send it again from the left."""
    with entered(state.right):
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    with entered(state.left):
        inj = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        cap.bind((DEV, 0))
        inj.bind((DEV, 0))
        _send_l2r(state, 1)
        frame = b""
        deadline = time.monotonic() + 3
        while not frame and time.monotonic() < deadline:
            if not select.select([cap], [], [], 0.2)[0]:
                continue
            data, addr = cap.recvfrom(65535)
            if addr[2] != PACKET_OUTGOING and _is_esp(data):
                frame = data
        if not frame:
            raise UserError("replay: no ESP packet seen on the right host; is the lab passing traffic?")
        for _ in range(3):
            inj.send(frame)
        time.sleep(0.3)  # let the receiver's softirq process them before the counters are read
    finally:
        cap.close()
        inj.close()
    return f"captured one ESP packet ({len(frame)} B) in {state.right} and re-sent it 3 times"


def _ipv4_udp_df(src: str, dst: str, total: int) -> bytes:
    """An IPv4/UDP datagram of `total` bytes with DF set (checksum filled in by the kernel)."""
    payload = b"\xa5" * (total - 28)
    udp = _UDP.pack(40000, traffic.UDP_PORT, 8 + len(payload), 0) + payload
    return _IPV4.pack(0x45, 0, total, 0, IP_DF, 64, socket.IPPROTO_UDP, 0,
                      socket.inet_aton(src), socket.inet_aton(dst)) + udp


def _mtu(state: LabState) -> str:
    """DF packets that fit the link MTU but not once ESP is added: the tunnel refuses them.

    Sockets size their datagrams by the IPsec path MTU (EMSGSIZE before xfrm), so the packet
    comes from a raw IP_HDRINCL socket, like a forwarded packet would: it fits the device check
    and fails xfrm's own tunnel size check.
    """
    run("ip", "-n", state.left, "link", "set", DEV, "mtu", str(MTU_SMALL))
    with entered(state.left):
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    errors = 0
    try:
        for _ in range(3):
            try:
                raw.sendto(_ipv4_udp_df(state.left_host, state.right_host, MTU_SMALL), (state.right_host, 0))
            except OSError:
                errors += 1  # EMSGSIZE is the expected answer to the sender
    finally:
        raw.close()
    return (f"MTU of {DEV} in {state.left} set to {MTU_SMALL}; "
            f"sent 3 DF packets of {MTU_SMALL} B ({errors} refused)")


def _spis(state: LabState, children: list[str]) -> set[int]:
    return {sa.spi for c in children for ns in (state.left, state.right) for sa in child_sas(ns, c)}


def _rekey(state: LabState, children: list[str]) -> str:
    """The daemon's own CHILD_SA rekey from the left, child by child; waits for the new SAs."""
    d = daemons.daemon(state.daemon)
    done = []
    for c in children:
        before = _spis(state, [c])
        d.rekey(state.prefix, daemons.CHILDREN[c])
        def installed(c: str = c, before: set[int] = before) -> bool:
            return len(_spis(state, [c]) - before) >= 2

        daemons.wait_for(installed, f"{c}'s rekey installing new SAs on both sides")
        done.append(f"{c} {' '.join(f'{s:#010x}' for s in sorted(_spis(state, [c]) - before))}")
    refresh_keys(state)
    return f"{state.daemon} rekeyed {len(children)} children (new SPIs: {'; '.join(done)})"


def _restart_peer(state: LabState) -> str:
    """The right daemon crashes with its kernel state (a reboot), restarts empty; the left, unaware,
    sends on its SAs (the right drops them: no state), then re-establishes every child."""
    d = daemons.daemon(state.daemon)
    daemons.stop_process(state.pids.get("right", 0), hard=True)
    ip_batch(state.right, ["xfrm state flush", "xfrm policy flush"])
    state.pids["right"] = d.start(state.prefix, "right", state.right)
    state.save()
    stale = _send_l2r(state).line()
    children = [daemons.CHILDREN[c] for c in state.children]
    d.terminate(state.prefix, children)
    d.initiate(state.prefix, children)
    refresh_keys(state)
    return (f"{state.daemon} in {state.right} killed, its SAs flushed, restarted "
            f"(pid {state.pids['right']}); on the left's old SA: {stale}; "
            f"re-established {len(children)} children")


FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("delete-sa", "XfrmInNoStates", "right", "the receiver's inbound SA is gone", _delete_sa),
    Fault("wrong-key", "XfrmInStateProtoError", "right",
          "the receiver's inbound SA has another key (ICV fails)", _wrong_key),
    Fault("replay", "XfrmInStateSeqError", "right",
          "an old ESP packet is sent again (replay window)", _replay),
    Fault("block-policy", "XfrmOutPolBlock", "left",
          "the sender's out policy is action block", _block_policy),
    Fault("mtu", "XfrmOutStateModeError", "left", "DF + small MTU: the packet does not fit once encapsulated",
          _mtu, tunnel_only=True),
    Fault("rekey", "", "left", "the daemon rekeys (new SPIs, new keys; no error counter)",
          lambda state: _rekey(state, state.children), daemon_only=True),
    Fault("restart-peer", "XfrmInNoStates", "right",
          "the right daemon restarts without its SAs while the left still uses them", _restart_peer,
          daemon_only=True),
)}


def fault(name: str) -> Fault:
    try:
        return FAULTS[name]
    except KeyError:
        raise UserError(f"unknown fault {name!r}; choose one of: {', '.join(FAULTS)}") from None


def inject(state: LabState, name: str, child: str | None = None) -> FaultResult:
    """Break the lab as `name` says, send traffic into it, report the counter's before/after
    (for `rekey`, which moves no counter: 0 and the number of new SPIs)."""
    f = fault(name)
    if f.tunnel_only and state.spec.mode != "tunnel":
        raise UserError(f"fault {name} needs a tunnel-mode lab (transport mode has no xfrm size check): "
                        "lab up --scenario cbc-tunnel")
    if f.daemon_only and not state.daemon:
        raise UserError(f"fault {name} is an IKE daemon's doing: lab up --daemon strongswan (or libreswan)")
    if child is not None and (name != "rekey" or child not in state.children):
        raise UserError("--child goes with `rekey` and one of this lab's children: "
                        f"{', '.join(state.children)}")
    netns = state.netns(f.side)
    if not f.counter:
        children = [child] if child else state.children
        before_spis = _spis(state, children)
        detail = f.inject(state) if child is None else _rekey(state, children)
        result = FaultResult(name, "new SPIs", netns, 0, len(_spis(state, children) - before_spis), detail)
    else:
        before = xfrm_stat(netns).get(f.counter, 0)
        detail = f.inject(state)
        result = FaultResult(name, f.counter, netns, before, xfrm_stat(netns).get(f.counter, 0), detail)
    state.faults.append(name)
    state.save()
    return result
