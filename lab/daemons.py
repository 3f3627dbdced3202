"""Labs keyed by a real IKE daemon: the children both daemons negotiate, and what they share.

A daemon lab is the two-namespace lab of scenarios.py whose SAs come from IKEv2 (PSK) between
two daemons, one per namespace, each with its own config and runtime directory under
DAEMON_DIR/<prefix>/<side>/. The SPIs, keys, replay windows, ESN flags, reqids and policies
are the daemon's own, so the product meets what users run (rekeys with new SPIs, NAT-T
sockets, priorities), not what we typed in.

The left side initiates; every child is one path of traffic (its endpoints, and subnets in
tunnel mode) so `lab traffic` can exercise each child both ways. strongswan.py and
libreswan.py render the configs and drive the processes; this module knows the children and
the common life cycle.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ipsec_capture.errors import UserError

DAEMON_DIR = Path("/var/lib/ipsec-capture-lab")  # not under /run: the daemons get a private /run
PSK = "ipsec-capture lab pre-shared key"  # a lab secret, not a secret: both ends are ours
LEFT_V4, RIGHT_V4 = "198.51.100.1", "198.51.100.2"
LEFT_V6, RIGHT_V6 = "2001:db8:100::1", "2001:db8:100::2"
# The NAT-T child's IKE SA has addresses of its own: a Libreswan 4.10 responder with two conns
# between the same addresses matches IKE_SA_INIT to either and keeps that one's encapsulation
# after IKE_AUTH switched conns (seen: the GCM transport SA installed with espinudp on port 500).
NATT_V4 = ("198.51.100.3", "198.51.100.4")


@dataclass(frozen=True, slots=True)
class Child:
    """One CHILD_SA both ways: how it is negotiated and the traffic path it protects."""

    name: str
    ike: str  # the IKE connection (strongSwan groups children by it; Libreswan: one IKE SA each)
    summary: str
    mode: str  # "transport" or "tunnel"
    family: int  # of the outer (IKE and SA) addresses
    strongswan_esp: str  # swanctl esp_proposals
    libreswan_esp: str  # ipsec.conf esp=
    kernel_enc: str  # the kernel's algorithm name for the SA (ip xfrm state shows it)
    esn: bool = False
    natt: bool = False  # forced into UDP encapsulation (strongSwan encap=yes, Libreswan encapsulation=yes)
    left_net: str = ""  # tunnel mode: the subnets behind each side (the first address is the host)
    right_net: str = ""
    addrs: tuple[str, str] | tuple[()] = ()  # outer addresses of its own (default: the hosts' first ones)

    @property
    def left_addr(self) -> str:
        return self.addrs[0] if self.addrs else LEFT_V6 if self.family == 6 else LEFT_V4

    @property
    def right_addr(self) -> str:
        return self.addrs[1] if self.addrs else RIGHT_V6 if self.family == 6 else RIGHT_V4

    @property
    def left_host(self) -> str:
        """Where this child's traffic starts on the left (the inner host in tunnel mode)."""
        return self.left_net.split("/")[0][:-1] + "1" if self.mode == "tunnel" else self.left_addr

    @property
    def right_host(self) -> str:
        return self.right_net.split("/")[0][:-1] + "1" if self.mode == "tunnel" else self.right_addr

    def ts(self, side: str) -> str:
        """The traffic selector of one side: its subnet (tunnel) or its address (transport)."""
        if self.mode == "tunnel":
            return self.left_net if side == "left" else self.right_net
        plen = 128 if self.family == 6 else 32
        return f"{self.left_addr if side == 'left' else self.right_addr}/{plen}"


CHILDREN: dict[str, Child] = {c.name: c for c in (
    Child("gcm", "main", "transport, AES-GCM-128 (ICV 16), IPv4", "transport", 4,
          "aes128gcm16", "aes_gcm128-null", "rfc4106(gcm(aes))"),
    Child("cbc-esn", "main", "tunnel 10.1.0.0/24 <-> 10.2.0.0/24, AES-256-CBC + HMAC-SHA-256-128, ESN",
          "tunnel", 4, "aes256-sha256-esn", "aes256-sha2_256", "cbc(aes)", esn=True,
          left_net="10.1.0.0/24", right_net="10.2.0.0/24"),
    Child("chacha", "main", "tunnel 10.5.0.0/24 <-> 10.6.0.0/24, ChaCha20-Poly1305", "tunnel", 4,
          "chacha20poly1305", "chacha20_poly1305-null", "rfc7539esp(chacha20,poly1305)",
          left_net="10.5.0.0/24", right_net="10.6.0.0/24"),
    Child("ipv6", "v6", "transport over IPv6 (IKE over IPv6 too), AES-GCM-128", "transport", 6,
          "aes128gcm16", "aes_gcm128-null", "rfc4106(gcm(aes))"),
    Child("natt", "natt", "tunnel 10.3.0.0/24 <-> 10.4.0.0/24 forced into UDP 4500 (NAT-T), AES-GCM-128",
          "tunnel", 4, "aes128gcm16", "aes_gcm128-null", "rfc4106(gcm(aes))", natt=True,
          left_net="10.3.0.0/24", right_net="10.4.0.0/24", addrs=NATT_V4),
)}

# `lab up --daemon D --scenario S`: which children S negotiates ("ike": all of them)
DAEMON_SCENARIOS: dict[str, tuple[str, ...]] = {"ike": tuple(CHILDREN), **{c: (c,) for c in CHILDREN}}


def children_of(scenario: str) -> list[Child]:
    try:
        return [CHILDREN[c] for c in DAEMON_SCENARIOS[scenario]]
    except KeyError:
        raise UserError(f"scenario {scenario!r} has no IKE daemon version; with --daemon choose one of: "
                        f"{', '.join(DAEMON_SCENARIOS)}") from None


class Daemon(Protocol):
    """What scenarios.py and faults.py need from one daemon implementation (both sides)."""

    name: str

    def prepare(self, prefix: str, children: list[Child]) -> None:
        """Write both sides' configs (no process yet)."""

    def start(self, prefix: str, side: str, netns: str) -> int:
        """Start the side's daemon in its namespace; its pid once it answers its control socket."""

    def initiate(self, prefix: str, children: list[Child]) -> None:
        """From the left: bring every child up; UserError with the daemon's words if one fails."""

    def rekey(self, prefix: str, child: Child) -> None:
        """The daemon's own CHILD_SA rekey, from the left."""

    def terminate(self, prefix: str, children: list[Child]) -> None:
        """The left forgets its IKE SAs (and their children) without waiting for the peer."""


def side_dir(prefix: str, side: str) -> Path:
    return DAEMON_DIR / prefix / side


def daemon(name: str) -> Daemon:
    if name == "strongswan":
        from .strongswan import StrongSwan

        return StrongSwan()
    if name == "libreswan":
        from .libreswan import Libreswan

        return Libreswan()
    raise UserError(f"unknown IKE daemon {name!r}; choose strongswan or libreswan")


def remove_dirs(prefix: str) -> bool:
    path = DAEMON_DIR / prefix
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
        return True
    return False


def alive(pid: int) -> bool:
    """A live process (a zombie is not: orphans of a gone `lab up` may wait for a busy init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_process(pid: int, hard: bool = False) -> None:
    """SIGTERM (the daemon removes its SAs and policies) and wait, SIGKILL after 15 s or if `hard`
    (a crash: the kernel keeps whatever the daemon had installed)."""
    if not pid or not alive(pid):
        return
    os.kill(pid, signal.SIGKILL if hard else signal.SIGTERM)
    deadline = time.monotonic() + 15
    while alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline += 15
        time.sleep(0.1)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0, every: float = 0.2) -> None:
    """Poll `check()` until true; UserError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise UserError(f"lab: {what} did not happen within {timeout:.0f} s")
