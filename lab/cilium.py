"""A Cilium-style IPsec cluster: three nodes on a bridge, states and policies laid out as Cilium's
agent lays them out (pkg/datapath/linux/ipsec/ipsec_linux.go, linux_defaults), keyed by `ip xfrm`.

What is Cilium's:
- one global key (`<SPI> rfc4106(gcm(aes)) <40 hex> 128`, SPI 3 here) and a per-node-pair key:
  sha256(global key + source node IP + destination node IP + both boot IDs), cut to the key's
  length (computeNodeIPsecKey), so every pair has its own key under the SAME SPI;
- tunnel mode, ESN, replay window 1024, reqid 1, for every state (ipSecNewState);
- inbound states `src 0.0.0.0 dst <this node>` (the legacy wildcard source), one per peer, told
  apart by the mark `0xd00 | peerID<<16` / `0xffff0f00` (generateDecryptMark), output-mark
  0xd00 / 0xffffff00 (the node ID cleared after decryption);
- outbound states `src <node> dst <peer>` with mark `0xe00 | spi<<12 | peerID<<16` / `0xffffff00`
  (generateEncryptMark), output-mark 0xe00 / 0xffffff00;
- policies: out per peer (pod CIDR -> peer's pod CIDR, the outbound mark, tmpl with the SPI),
  in (any -> this node's pod CIDR, mark 0xd00/0xf00, tmpl src 0.0.0.0), fwd (priority 2975,
  optional tmpl), and the catch-all default drop: out, mark 0xe00/0xf00, priority 100, block
  (IPsecDefaultDropPolicy: where XfrmOutPolBlock comes from).
What is simplified: Cilium's BPF programs set the marks; here nft rules in each node do (mangle
output: the encrypt mark by destination pod CIDR; prerouting ahead of the raw table: the decrypt
mark by the ESP packet's source node). Pods are one address on a dummy device per node (native
routing, no VXLAN, no proxy or overlay policies), node IDs are 1..3, boot IDs random per `up`.

Faults: `rotation-race` (node 1 replaced its inbound state for node 2 by a new SPI, as a key
rotation does, while node 2 still sends on the old SPI: XfrmInNoStates on node 1 for node 2's
packets only) and `block-policy` (node 1's out policy for node 2 is gone, as between the delete
and re-add of a policy: the default drop policy blocks, XfrmOutPolBlock).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import select
import socket
import uuid
from dataclasses import dataclass, field

from ipsec_capture.errors import UserError
from ipsec_capture.netns import entered

from .scenarios import esp_supported, ip_batch, run, save_state, state_path, xfrm_stat
from .traffic import UDP_PORT, TrafficResult, payload

NODES = 3
SPI = 3
ROTATED_SPI = 4
REQID = 1
ICV_BITS = 128
REPLAY_WINDOW = 1024
MARK_DECRYPT = 0x0D00  # linux_defaults.RouteMarkDecrypt
MARK_ENCRYPT = 0x0E00  # linux_defaults.RouteMarkEncrypt
MARK_BITS = 0x0F00  # linux_defaults.IPsecMarkBitMask
MASK_IN = 0xFFFF0F00  # linux_defaults.IPsecMarkMaskIn: node ID + direction bits
MASK_OUT = 0xFFFFFF00  # linux_defaults.IPsecMarkMaskOut: node ID + SPI + direction bits
OUTPUT_MARK_MASK = 0xFFFFFF00  # linux_defaults.OutputMarkMask | IPsecMarkMaskNodeID
SPI_SHIFT = 12  # linux_defaults.IPsecXFRMMarkSPIShift
FWD_PRIORITY = 2975  # linux_defaults.IPsecFwdPriority (0x0B9F)
DROP_PRIORITY = 100  # defaultDropPriority
DEV = "eth0"


def node_ip(i: int) -> str:
    return f"10.99.0.{i}"


def pod_net(i: int) -> str:
    return f"10.200.{i}.0/24"


def pod_ip(i: int) -> str:
    return f"10.200.{i}.1"


def decrypt_mark(peer: int) -> int:
    return MARK_DECRYPT | peer << 16


def encrypt_mark(peer: int, spi: int = SPI) -> int:
    return MARK_ENCRYPT | spi << SPI_SHIFT | peer << 16


def pair_key(global_key: bytes, src: int, dst: int, boot: dict[str, str]) -> bytes:
    """Cilium's computeNodeIPsecKey: the key src uses to send to dst (and dst to receive)."""
    data = (global_key + socket.inet_aton(node_ip(src)) + socket.inet_aton(node_ip(dst))
            + boot[str(src)][:36].encode() + boot[str(dst)][:36].encode())
    return hashlib.sha256(data).digest()[:len(global_key)]


@dataclass(slots=True)
class ClusterState:
    prefix: str
    global_key: str  # hex, 16-byte AES key + 4-byte salt
    boot_ids: dict[str, str]
    scenario: str = "cilium"
    faults: list[str] = field(default_factory=list)
    rotated: dict[str, int] = field(default_factory=dict)  # "recv>send" -> SPI the receiver now expects

    def netns(self, i: int) -> str:
        return f"{self.prefix}-n{i}"

    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}-br"

    def key(self, src: int, dst: int) -> str:
        return pair_key(bytes.fromhex(self.global_key), src, dst, self.boot_ids).hex()

    def save(self) -> None:
        save_state(self.prefix, self)

    @classmethod
    def load(cls, prefix: str) -> ClusterState:
        try:
            return cls(**json.loads(state_path(prefix).read_text()))
        except FileNotFoundError:
            raise UserError(f"no lab is up with prefix {prefix!r}: run `ipsec-capture lab up` "
                            f"first") from None


def is_cluster(prefix: str) -> bool:
    try:
        return json.loads(state_path(prefix).read_text()).get("scenario") == "cilium"
    except (FileNotFoundError, ValueError):
        return False


def state_in(c: ClusterState, node: int, peer: int, spi: int = SPI, verb: str = "add") -> str:
    return (f"xfrm state {verb} src 0.0.0.0 dst {node_ip(node)} proto esp spi {spi:#x} reqid "
            f"{REQID} mode tunnel "
            f"replay-window {REPLAY_WINDOW} flag esn mark {decrypt_mark(peer):#x} mask {MASK_IN:#x} "
            f"output-mark {MARK_DECRYPT:#x} mask {OUTPUT_MARK_MASK:#x} "
            f"aead rfc4106(gcm(aes)) 0x{c.key(peer, node)} {ICV_BITS}")


def state_out(c: ClusterState, node: int, peer: int) -> str:
    return (f"xfrm state add src {node_ip(node)} dst {node_ip(peer)} proto esp spi {SPI:#x} reqid {REQID} "
            f"mode tunnel replay-window {REPLAY_WINDOW} flag esn mark {encrypt_mark(peer):#x} mask "
            f"{MASK_OUT:#x} "
            f"output-mark {MARK_ENCRYPT:#x} mask {OUTPUT_MARK_MASK:#x} "
            f"aead rfc4106(gcm(aes)) 0x{c.key(node, peer)} {ICV_BITS}")


def policy_out(node: int, peer: int, verb: str = "add") -> str:
    return (f"xfrm policy {verb} src {pod_net(node)} dst {pod_net(peer)} dir out "
            f"mark {encrypt_mark(peer):#x} mask {MASK_OUT:#x} tmpl src {node_ip(node)} dst {node_ip(peer)} "
            f"proto esp spi {SPI:#x} reqid {REQID} mode tunnel")


def node_lines(c: ClusterState, node: int) -> list[str]:
    peers = [p for p in range(1, NODES + 1) if p != node]
    lines = [state_in(c, node, p) for p in peers] + [state_out(c, node, p) for p in peers]
    lines += [policy_out(node, p) for p in peers]
    lines += [f"xfrm policy add src 0.0.0.0/0 dst {pod_net(node)} dir in mark {MARK_DECRYPT:#x} mask "
              f"{MARK_BITS:#x} tmpl src 0.0.0.0 dst {node_ip(node)} proto esp reqid {REQID} mode tunnel",
              f"xfrm policy add src 0.0.0.0/0 dst {pod_net(node)} dir fwd priority {FWD_PRIORITY} "
              f"tmpl src 0.0.0.0 dst {node_ip(node)} proto esp reqid {REQID} mode tunnel level use",
              f"xfrm policy add src 0.0.0.0/0 dst 0.0.0.0/0 dir out priority {DROP_PRIORITY} "
              f"mark {MARK_ENCRYPT:#x} mask {MARK_BITS:#x} action block"]
    return lines


def mark_rules(node: int) -> str:
    """What Cilium's BPF does to skb->mark, as nft rules: encrypt mark by destination pod CIDR on
    the way out, decrypt mark by the source node of an inbound ESP packet (prerouting at -350,
    before the raw table and a capture's rules there: Cilium marks at tc ingress, before netfilter)."""
    peers = [p for p in range(1, NODES + 1) if p != node]
    out = "\n".join(f"    ip daddr {pod_net(p)} meta mark set {encrypt_mark(p):#x}" for p in peers)
    pre = "\n".join(f"    ip saddr {node_ip(p)} meta l4proto esp meta mark set "
                    f"{decrypt_mark(p):#x}" for p in peers)
    return (f"table ip cilium_lab {{\n  chain output {{\n    type route hook output priority "
            f"mangle;\n{out}\n  }}\n"
            f"  chain prerouting {{\n    type filter hook prerouting priority -350;\n{pre}\n  }}\n}}\n")


def up(prefix: str) -> ClusterState:
    if state_path(prefix).exists():
        raise UserError(f"a lab with prefix {prefix!r} is already up: run `ipsec-capture lab down` first")
    ok, why = esp_supported()
    if not ok:
        raise UserError(f"this kernel cannot do ESP ({why or 'ip xfrm state add failed'}); the kernel lab VM "
                        "can: ipsec-capture lab vm -- bash -c 'ipsec-capture lab up --scenario cilium && "
                        "ipsec-capture lab traffic'")
    c = ClusterState(prefix, secrets.token_hex(20), {str(i): str(uuid.uuid4()) for i in range(1, NODES + 1)})
    try:
        build(c)
    except BaseException:
        teardown(prefix)
        raise
    c.save()
    return c


def build(c: ClusterState) -> None:
    run("ip", "netns", "add", c.bridge_ns)
    ip_batch(c.bridge_ns, ["link set lo up", "link add br0 type bridge", "link set br0 up"])
    for i in range(1, NODES + 1):
        ns = c.netns(i)
        run("ip", "netns", "add", ns)
        run("ip", "link", "add", DEV, "netns", ns, "type", "veth", "peer", "name", f"n{i}",
            "netns", c.bridge_ns)
        ip_batch(c.bridge_ns, [f"link set n{i} master br0", f"link set n{i} up"])
        ip_batch(ns, ["link set lo up", f"addr add {node_ip(i)}/24 dev {DEV}", f"link set {DEV} up",
                      "link add pods type dummy", f"addr add {pod_ip(i)}/24 dev pods", "link set pods up",
                      *[f"route add {pod_net(p)} via {node_ip(p)} src {pod_ip(i)}"
                        for p in range(1, NODES + 1) if p != i]])
        run("nft", "-f", "-", netns=ns, input=mark_rules(i))
        ip_batch(ns, node_lines(c, i))


def teardown(prefix: str) -> list[str]:
    removed = []
    for ns in [f"{prefix}-n{i}" for i in range(1, NODES + 1)] + [f"{prefix}-br"]:
        if os.path.exists(f"/run/netns/{ns}"):
            run("ip", "netns", "del", ns, check=False)
            removed.append(f"netns {ns}")
    path = state_path(prefix)
    if path.exists():
        path.unlink()
        removed.append(str(path))
    return removed


def udp_echo(c: ClusterState, src: int, dst: int, count: int, first: int = 0,
             wait: float = 1.0) -> TrafficResult:
    """Pod on `src` to pod on `dst` and back; payloads say `n<src>-n<dst>`, so a capture can tell
    each pair's packets apart."""
    with entered(c.netns(dst)):
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with entered(c.netns(src)):
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    child = f"n{src}-n{dst}"
    try:
        server.bind((pod_ip(dst), UDP_PORT))
        client.bind((pod_ip(src), 0))
        sent = received = 0
        for i in range(first, first + count):
            data = payload(child, f"n{src}", i)
            try:
                client.sendto(data, (pod_ip(dst), UDP_PORT))
            except OSError:
                continue  # EPERM from the block policy: not sent
            sent += 1
            if select.select([server], [], [], wait)[0]:
                echo, peer = server.recvfrom(65535)
                server.sendto(echo, peer)
                if select.select([client], [], [], wait)[0] and client.recv(65535) == data:
                    received += 1
        return TrafficResult("udp", f"n{src}", f"n{dst}", sent, received, child)
    finally:
        server.close()
        client.close()


def exchange(c: ClusterState, count: int = 5, first: int = 0) -> list[TrafficResult]:
    nodes = range(1, NODES + 1)
    return [udp_echo(c, s, d, count, first) for s in nodes for d in nodes if s != d]


@dataclass(slots=True)
class ClusterFault:
    name: str
    counter: str
    node: int
    summary: str


FAULTS: dict[str, ClusterFault] = {f.name: f for f in (
    ClusterFault("rotation-race", "XfrmInNoStates", 1,
                 f"node 1 replaced its inbound state for node 2 (SPI {SPI} -> {ROTATED_SPI}); node 2 still "
                 f"sends SPI {SPI}"),
    ClusterFault("block-policy", "XfrmOutPolBlock", 1,
                 "node 1's out policy for node 2 is gone: the default drop policy (priority 100) blocks"),
)}


def inject(c: ClusterState, name: str, count: int = 3) -> dict:
    f = FAULTS.get(name)
    if f is None:
        raise UserError(f"fault {name!r} does not apply to the cilium lab; choose one of: "
                        f"{', '.join(FAULTS)}")
    ns = c.netns(f.node)
    before = xfrm_stat(ns).get(f.counter, 0)
    if name == "rotation-race":
        ip_batch(ns, [f"xfrm state delete src 0.0.0.0 dst {node_ip(1)} proto esp spi {SPI:#x} "
                      f"mark {decrypt_mark(2):#x} mask {MASK_IN:#x}", state_in(c, 1, 2, spi=ROTATED_SPI)])
        c.rotated["1>2"] = ROTATED_SPI
        results = [udp_echo(c, 2, 1, count, first=1000), udp_echo(c, 3, 1, count, first=1000)]
        detail = (f"node 1's inbound state for node 2 is SPI {ROTATED_SPI:#x} now; node 2 still sends "
                  f"{SPI:#x}; " + "; ".join(r.line() for r in results))
    else:
        ip_batch(ns, [f"xfrm policy delete src {pod_net(1)} dst {pod_net(2)} dir out "
                      f"mark {encrypt_mark(2):#x} mask {MASK_OUT:#x}"])
        results = [udp_echo(c, 1, 2, count, first=2000)]
        detail = "node 1's out policy for node 2 deleted; " + results[0].line()
    after = xfrm_stat(ns).get(f.counter, 0)
    c.faults.append(name)
    c.save()
    return {"fault": name, "counter": f.counter, "netns": ns, "before": before, "after": after,
            "detail": detail, "moved": after > before}


def sa_packets(c: ClusterState) -> dict[str, dict[str, int]]:
    """Per node: its states (src>dst, SPI, mark) and their packet counters (`ip -s xfrm state`)."""
    out = {}
    for i in range(1, NODES + 1):
        text = run("ip", "-s", "-n", c.netns(i), "xfrm", "state").stdout
        rows = {}
        for block in re.split(r"^(?=src )", text, flags=re.M):
            head = re.match(r"src (\S+) dst (\S+)\s+proto esp spi (0x[0-9a-f]+)", block)
            pkts = re.search(r"(\d+)\(packets\)\n", block)
            if head and pkts:
                mark = re.search(r"\bmark (0x[0-9a-f]+)", block)
                rows[f"{head[1]}>{head[2]} spi {head[3]} mark {mark[1] if mark else '-'}"] = int(pkts[1])
        out[c.netns(i)] = rows
    return out
