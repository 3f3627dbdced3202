"""IPsec scenarios in two network namespaces: real `ip xfrm` SAs and policies, both ways.

A lab is two hosts, `<prefix>-left` and `<prefix>-right`, joined by one veth pair, with manually
keyed SAs as strongSwan/Libreswan would install them (replay window, reqids, fwd policies in
tunnel mode). Keys and SPIs are random per `up` and recorded in a state file, so `traffic`,
`fault`, `down` and the demo know what is running, and tests can check keys read back from the
kernel against what was installed.

With a daemon (`up(..., daemon="strongswan"|"libreswan")`, daemons.py) the same two hosts get
their SAs from IKEv2 instead: the state file then names the children, and `l2r`/`r2l` are the
first child's SAs as the kernel holds them (read back after every change), so the manual faults
work on a daemon lab too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ipsec_capture.errors import UserError
from ipsec_capture.wire import NATT_PORT
from ipsec_capture.xfrm.sa import SA

from . import daemons

STATE_DIR = Path("/run/ipsec-capture-lab")
DEV = "lab0"  # the veth end's name inside each namespace
REPLAY_WINDOW = 32  # what strongSwan installs by default
ESN_REPLAY_WINDOW = 128


@dataclass(frozen=True, slots=True)
class Scenario:
    """What a lab looks like; addressing and keys come from LabState."""

    name: str
    summary: str
    family: int = 4
    mode: str = "transport"
    # "gcm": rfc4106(gcm(aes)) 128-bit key, ICV 16; "cbc-sha256": cbc(aes) + hmac(sha256) trunc 128
    cipher: str = "gcm"  # "chacha": rfc7539esp(chacha20,poly1305) (daemon labs)
    natt: bool = False
    esn: bool = False


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("gcm", "ESP transport, AES-GCM-128 with a 16-byte ICV, IPv4"),
    Scenario("cbc-tunnel", "ESP tunnel, AES-CBC-128 + HMAC-SHA256-128, subnets 10.1.0.0/24 <-> 10.2.0.0/24",
             mode="tunnel", cipher="cbc-sha256"),
    Scenario("natt", "ESP in UDP 4500 (NAT-T encap espinudp), transport, AES-GCM-128", natt=True),
    Scenario("ipv6", "ESP transport over IPv6, AES-GCM-128", family=6),
    Scenario("esn", "ESP transport, AES-GCM-128, extended sequence numbers, replay window 128", esn=True),
)}


def scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise UserError(f"unknown lab scenario {name!r}; choose one of: {', '.join(SCENARIOS)}") from None


@dataclass(slots=True)
class SAKeys:
    """One direction's SA: SPI and hex keys (enc holds GCM's 4-byte salt at the end)."""

    spi: int
    reqid: int
    enc_key: str
    auth_key: str = ""


@dataclass(slots=True)
class LabState:
    scenario: str
    prefix: str
    left: str
    right: str
    left_addr: str  # outer (SA) addresses
    right_addr: str
    left_host: str  # traffic endpoints: the outer address in transport mode, inner in tunnel mode
    right_host: str
    left_net: str  # policy selectors
    right_net: str
    l2r: SAKeys
    r2l: SAKeys
    encap_pid: int = 0
    created: float = 0.0
    faults: list[str] = field(default_factory=list)
    daemon: str = ""  # "strongswan" / "libreswan": SAs from IKE (daemons.py); "" = `ip xfrm` keyed
    children: list[str] = field(default_factory=list)  # the daemon's children (daemons.CHILDREN)
    pids: dict[str, int] = field(default_factory=dict)  # side -> daemon pid

    @property
    def spec(self) -> Scenario:
        if self.daemon:
            return child_scenario(self.children[0])
        return scenario(self.scenario)

    def netns(self, side: str) -> str:
        return self.left if side == "left" else self.right

    def save(self) -> None:
        save_state(self.prefix, self)

    @classmethod
    def load(cls, prefix: str) -> LabState:
        path = state_path(prefix)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"no lab is up with prefix {prefix!r}: "
                            "run `ipsec-capture lab up` first") from None
        raw["l2r"] = SAKeys(**raw["l2r"])
        raw["r2l"] = SAKeys(**raw["r2l"])
        return cls(**raw)


def child_scenario(name: str) -> Scenario:
    """A daemon child as the Scenario of its first SA pair (what the manual faults need to know)."""
    from .daemons import CHILDREN

    c = CHILDREN[name]
    cipher = {"rfc4106(gcm(aes))": "gcm", "cbc(aes)": "cbc-sha256"}.get(c.kernel_enc, "chacha")
    return Scenario(c.name, c.summary, family=c.family, mode=c.mode, cipher=cipher, natt=c.natt, esn=c.esn)


def save_state(prefix: str, state: Any) -> None:
    """A lab's state (a dataclass) as JSON in STATE_DIR, mode 0600 from the first byte (it holds
    keys), replaced atomically."""
    STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_path(prefix)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(state), f, indent=1)
    tmp.rename(path)


def state_path(prefix: str) -> Path:
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,11}", prefix):
        raise UserError(f"bad lab prefix {prefix!r}: use up to 12 lower-case letters, digits or '-'")
    return STATE_DIR / f"{prefix}.json"


def run(*argv: str, netns: str | None = None, input: str | None = None, check: bool = True
        ) -> subprocess.CompletedProcess[str]:
    full = (["ip", "netns", "exec", netns] if netns else []) + list(argv)
    proc = subprocess.run(full, input=input, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise UserError(f"`{' '.join(full)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def ip_batch(netns: str, lines: list[str]) -> None:
    """Many `ip` commands in one exec (each exec costs ~0.1 s under TCG)."""
    run("ip", "-n", netns, "-batch", "-", input="\n".join(lines) + "\n")


def esp_supported() -> tuple[bool, str]:
    """Can this kernel add an ESP SA? Tried in a throwaway namespace; (ok, kernel's answer)."""
    ns = f"ipsec-capture-probe-{os.getpid()}"
    run("ip", "netns", "add", ns)
    try:
        proc = run("ip", "-n", ns, "xfrm", "state", "add", "src", "192.0.2.1", "dst", "192.0.2.2",
                   "proto", "esp", "spi", "0x100", "mode", "transport",
                   "aead", "rfc4106(gcm(aes))", "0x" + "00" * 20, "128", check=False)
        return proc.returncode == 0, proc.stderr.strip()
    finally:
        run("ip", "netns", "del", ns, check=False)


def new_state(spec: Scenario, prefix: str) -> LabState:
    if spec.family == 6:
        left_addr, right_addr, plen = "2001:db8:100::1", "2001:db8:100::2", 128
    else:
        left_addr, right_addr, plen = "198.51.100.1", "198.51.100.2", 32
    if spec.mode == "tunnel":
        left_host, right_host = "10.1.0.1", "10.2.0.1"
        left_net, right_net = "10.1.0.0/24", "10.2.0.0/24"
    else:
        left_host, right_host = left_addr, right_addr
        left_net, right_net = f"{left_addr}/{plen}", f"{right_addr}/{plen}"
    spis: set[int] = set()
    while len(spis) < 2:
        spis.add(0x1000 + secrets.randbelow(0xFFFF0000))
    spi_l2r, spi_r2l = sorted(spis)

    def keys(spi: int, reqid: int) -> SAKeys:
        if spec.cipher == "gcm":
            return SAKeys(spi, reqid, secrets.token_hex(20))  # 16-byte key + 4-byte salt
        return SAKeys(spi, reqid, secrets.token_hex(16), secrets.token_hex(32))

    return LabState(scenario=spec.name, prefix=prefix, left=f"{prefix}-left", right=f"{prefix}-right",
                    left_addr=left_addr, right_addr=right_addr, left_host=left_host, right_host=right_host,
                    left_net=left_net, right_net=right_net, l2r=keys(spi_l2r, 1), r2l=keys(spi_r2l, 2),
                    created=time.time())


def sa_line(state: LabState, direction: str, verb: str = "add", enc_key: str | None = None) -> str:
    """The `xfrm state add` line (for `ip -batch`) of one direction ("l2r" or "r2l")."""
    spec = state.spec
    sa = state.l2r if direction == "l2r" else state.r2l
    src, dst = ((state.left_addr, state.right_addr) if direction == "l2r"
                else (state.right_addr, state.left_addr))
    key = enc_key or sa.enc_key
    line = (f"xfrm state {verb} src {src} dst {dst} proto esp spi {sa.spi:#010x} reqid {sa.reqid} "
            f"mode {spec.mode} ")
    if spec.cipher == "gcm":
        line += f"aead rfc4106(gcm(aes)) 0x{key} 128"
    elif spec.cipher == "chacha":
        line += f"aead rfc7539esp(chacha20,poly1305) 0x{key} 128"
    else:
        line += f"enc cbc(aes) 0x{key} auth-trunc hmac(sha256) 0x{sa.auth_key} 128"
    line += f" replay-window {ESN_REPLAY_WINDOW if spec.esn else REPLAY_WINDOW}"
    if spec.esn:
        line += " flag esn"
    if spec.natt:
        line += f" encap espinudp {NATT_PORT} {NATT_PORT} 0.0.0.0"
    return line


def policy_lines(state: LabState, side: str, action: str = "") -> list[str]:
    """out/in (and fwd in tunnel mode) policies of one side, as strongSwan installs them."""
    mode = state.spec.mode
    me, peer = ((state.left_addr, state.right_addr) if side == "left"
                else (state.right_addr, state.left_addr))
    my_net, peer_net = ((state.left_net, state.right_net) if side == "left"
                        else (state.right_net, state.left_net))
    out_sa, in_sa = (state.l2r, state.r2l) if side == "left" else (state.r2l, state.l2r)
    dirs = [("out", my_net, peer_net, me, peer, out_sa.reqid),
            ("in", peer_net, my_net, peer, me, in_sa.reqid)]
    if mode == "tunnel":
        dirs.append(("fwd", peer_net, my_net, peer, me, in_sa.reqid))
    return [f"xfrm policy add src {s} dst {d} dir {dr} tmpl src {ts} dst {td} proto esp reqid {r} mode {mode}"
            for dr, s, d, ts, td, r in dirs]


def mac_of(netns: str) -> str:
    return json.loads(run("ip", "-j", "-n", netns, "link", "show", DEV).stdout)[0]["address"]


def up(name: str, prefix: str = "lab", daemon: str = "", connect: bool = True) -> LabState:
    """Build the namespaces, link, addresses, SAs and policies of scenario `name` (with `daemon`,
    the daemon scenario `name`'s children, negotiated by that IKE daemon; unless `connect` is
    false: then the daemons wait for `connect()`, e.g. until a capture has started)."""
    spec = child_scenario(daemons.children_of(name)[0].name) if daemon else scenario(name)
    if daemon:
        daemons.daemon(daemon)  # an unknown daemon is refused before anything is built
    if state_path(prefix).exists():
        raise UserError(f"a lab with prefix {prefix!r} is already up: run `ipsec-capture lab down` first")
    ok, why = esp_supported()
    if not ok:
        raise UserError(f"this kernel cannot do ESP ({why or 'ip xfrm state add failed'}); the kernel "
                        f"lab VM can (a lab lives as long as the VM's command): ipsec-capture lab vm -- "
                        f"bash -c 'ipsec-capture lab up --scenario {name} && ipsec-capture lab traffic', "
                        f"or ./dev.sh demo for a whole capture")
    state = new_state(spec, prefix)
    if daemon:
        first = daemons.children_of(name)[0]
        state.scenario, state.daemon = name, daemon
        state.children = [c.name for c in daemons.children_of(name)]
        state.left_host, state.right_host = first.left_host, first.right_host
        state.left_net, state.right_net = first.ts("left"), first.ts("right")
    try:
        if daemon:
            build_daemon_lab(state, connect)
        else:
            build(state)
    except BaseException:
        teardown(state.prefix, state, keep_logs=True)  # the error names the daemons' logs
        raise
    state.save()
    return state


def build_daemon_lab(state: LabState, connect_now: bool = True) -> None:
    """Both hosts with every child's addresses and routes, then the daemons negotiate the SAs."""
    children = [daemons.CHILDREN[c] for c in state.children]
    for ns in (state.left, state.right):
        run("ip", "netns", "add", ns)
    run("ip", "link", "add", DEV, "netns", state.left, "type", "veth",
        "peer", "name", DEV, "netns", state.right)
    for side in ("left", "right"):
        v4, v6 = ((daemons.LEFT_V4, daemons.LEFT_V6) if side == "left"
                  else (daemons.RIGHT_V4, daemons.RIGHT_V6))
        lines = ["link set lo up", f"addr add {v4}/24 dev {DEV}", f"addr add {v6}/64 dev {DEV} nodad",
                 f"link set {DEV} up", "link add inner0 type dummy", "link set inner0 up"]
        for c in children:
            me, peer = (c.left_addr, c.right_addr) if side == "left" else (c.right_addr, c.left_addr)
            if me not in (v4, v6):
                lines.append(f"addr add {me}/24 dev {DEV}")
            if c.mode == "tunnel":
                host, peer_net = ((c.left_host, c.right_net) if side == "left"
                                  else (c.right_host, c.left_net))
                lines += [f"addr add {host}/24 dev inner0", f"route add {peer_net} via {peer} src {host}"]
        ip_batch(state.netns(side), lines)
    # keep neighbour discovery out of the IPv6 transport policies' way
    for side, peer_side in (("left", "right"), ("right", "left")):
        peer6 = daemons.RIGHT_V6 if side == "left" else daemons.LEFT_V6
        run("ip", "-n", state.netns(side), "neigh", "replace", peer6, "lladdr",
            mac_of(state.netns(peer_side)), "dev", DEV, "nud", "permanent")
    d = daemons.daemon(state.daemon)
    d.prepare(state.prefix, children)
    for side in ("left", "right"):
        state.pids[side] = d.start(state.prefix, side, state.netns(side))
    state.save()  # from here on `lab down` can stop the daemons even if initiating fails
    if connect_now:
        connect(state)


def connect(state: LabState) -> None:
    """The left daemon initiates every child (IKE_SA_INIT, IKE_AUTH, CREATE_CHILD_SA)."""
    if not state.daemon:
        raise UserError(f"lab {state.prefix} has no IKE daemon: its SAs are up since `lab up`")
    daemons.daemon(state.daemon).initiate(state.prefix, [daemons.CHILDREN[c] for c in state.children])
    refresh_keys(state)
    state.save()


def child_sas(netns: str, child: str) -> list[SA]:
    """The kernel's SAs of one daemon child in `netns`, newest first (both directions)."""
    from ipsec_capture.xfrm.text import parse_states

    c = daemons.CHILDREN[child]
    family = 10 if c.family == 6 else 2
    sas = [sa for sa in parse_states(run("ip", "-s", "-n", netns, "xfrm", "state").stdout)
           if sa.mode == c.mode and sa.family == family and (sa.encap is not None) == c.natt
           and (alg := sa.aead or sa.enc) is not None and alg.name == c.kernel_enc]
    return sorted(sas, key=lambda sa: sa.lifetime_cur.get("add_time", 0), reverse=True)


def refresh_keys(state: LabState) -> None:
    """`l2r`/`r2l` := the first child's current SAs, as the left host's kernel holds them."""
    sas = child_sas(state.left, state.children[0])
    for direction, src in (("l2r", state.left_addr), ("r2l", state.right_addr)):
        sa = next((s for s in sas if s.src == src), None)
        if sa is None:
            raise UserError(f"lab: {state.daemon} installed no {state.children[0]} SA from {src} "
                            f"in {state.left}")
        alg = sa.aead or sa.enc
        assert alg is not None
        keys = SAKeys(sa.spi, sa.reqid, alg.key.hex(), sa.auth.key.hex() if sa.auth else "")
        setattr(state, direction, keys)


def build(state: LabState) -> None:
    spec = state.spec
    v6 = spec.family == 6
    plen = 64 if v6 else 24
    for ns in (state.left, state.right):
        run("ip", "netns", "add", ns)
    run("ip", "link", "add", DEV, "netns", state.left, "type", "veth",
        "peer", "name", DEV, "netns", state.right)
    for side in ("left", "right"):
        ns = state.netns(side)
        addr = state.left_addr if side == "left" else state.right_addr
        lines = ["link set lo up", f"addr add {addr}/{plen} dev {DEV}" + (" nodad" if v6 else ""),
                 f"link set {DEV} up"]
        if spec.mode == "tunnel":
            host, net = ((state.left_host, state.right_net) if side == "left"
                         else (state.right_host, state.left_net))
            peer = state.right_addr if side == "left" else state.left_addr
            lines += ["link add inner0 type dummy", f"addr add {host}/24 dev inner0", "link set inner0 up",
                      f"route add {net} via {peer} src {host}"]
        ip_batch(ns, lines)
    if v6:  # keep neighbour discovery out of the transport policies' way
        for side, peer_side in (("left", "right"), ("right", "left")):
            peer_addr = state.right_addr if side == "left" else state.left_addr
            run("ip", "-n", state.netns(side), "neigh", "replace", peer_addr, "lladdr",
                mac_of(state.netns(peer_side)), "dev", DEV, "nud", "permanent")
    for side in ("left", "right"):
        ip_batch(state.netns(side),
                 [sa_line(state, "l2r"), sa_line(state, "r2l"), *policy_lines(state, side)])
    if spec.natt:
        state.encap_pid = start_encap_holder(state)


def start_encap_holder(state: LabState) -> int:
    """NAT-T needs a UDP_ENCAP socket on 4500 in each namespace, or ESP-in-UDP is just UDP."""
    proc = subprocess.Popen([sys.executable, "-m", "ipsec_capture.lab.udp_encap", state.left, state.right],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if line.strip() != "ready":
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        raise UserError(f"cannot open the NAT-T UDP encapsulation sockets: {err.strip() or 'no ready line'}")
    return proc.pid


def teardown(prefix: str, state: LabState | None = None, keep_logs: bool = False) -> list[str]:
    """Remove the lab's namespaces, daemons, helper process and state file; what was removed
    (`keep_logs`: not the daemons' directories, which a failed `up` points the user to)."""
    removed = []
    if state is None:
        with contextlib.suppress(UserError):
            state = LabState.load(prefix)
    if state is not None:
        for side, pid in state.pids.items():
            if daemons.alive(pid):
                daemons.stop_process(pid)
                removed.append(f"{state.daemon} ({side}) pid {pid}")
    if not keep_logs and daemons.remove_dirs(prefix):
        removed.append(f"{daemons.DAEMON_DIR / prefix}")
    if state is not None and state.encap_pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.encap_pid, signal.SIGTERM)
            removed.append(f"encap helper pid {state.encap_pid}")
    for ns in (f"{prefix}-left", f"{prefix}-right"):
        if os.path.exists(f"/run/netns/{ns}"):
            run("ip", "netns", "del", ns, check=False)
            removed.append(f"netns {ns}")
    path = state_path(prefix)
    if path.exists():
        path.unlink()
        removed.append(str(path))
    return removed


_LIFETIME_RE = re.compile(r"spi (0x[0-9a-f]+).*?lifetime current:\s*(\d+)\(bytes\), (\d+)\(packets\)", re.S)


def parse_sa_packets(text: str) -> dict[int, int]:
    """Packets per SPI in `ip -s xfrm state` output (the kernel's own ESP counters)."""
    return {int(spi, 16): int(pkts) for spi, _, pkts in _LIFETIME_RE.findall(text)}


def sa_packets(netns: str) -> dict[int, int]:
    return parse_sa_packets(run("ip", "-s", "-n", netns, "xfrm", "state").stdout)


def xfrm_stat(netns: str) -> dict[str, int]:
    """/proc/net/xfrm_stat of a namespace (the counters are per netns)."""
    from ipsec_capture.netns import entered

    with entered(netns), open("/proc/thread-self/net/xfrm_stat") as f:
        return {k: int(v) for k, v in (line.split() for line in f if line.strip())}
