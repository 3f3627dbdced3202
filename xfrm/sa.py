"""One SA / policy model for every source (kernel netlink, `ip xfrm` text) and every consumer
(esp_sa writer, ESP decoder, SA snapshots in the events log, the lab).

Algorithm names are the kernel's (`rfc4106(gcm(aes))`, `cbc(aes)`, `hmac(sha256)`): translating
them is the job of each consumer (Wireshark names in esp_sa.py, `cryptography` in esp.py).
Addresses are strings as `ipaddress` prints them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ipsec_capture.wire import IPPROTO_ESP, NATT_PORT, XFRM_MODES

# <linux/udp.h>
UDP_ENCAP_ESPINUDP_NON_IKE = 1
UDP_ENCAP_ESPINUDP = 2
MODES = XFRM_MODES
MODE_UNKNOWN = ""  # a source that does not say (Wireshark's esp_sa table)
ESN_UNKNOWN = "esn-unknown"  # in SA.flags: a source that cannot say (an 8-column esp_sa table)
# SA.auth name for an ICV of `trunc_bits` whose algorithm or key the source does not give (Wireshark's
# `ANY n bit authentication [no checking]`, tcpdump's `-hmac96`): skipped, never checked
AUTH_UNCHECKED = "unchecked"
NULL_AUTH = ("digest_null", "null", "")  # no integrity at all: no ICV on the wire
ANY_SPI = 0  # SA.spi of a key that applies to every SPI (tcpdump's `-E ALGO:KEY` without SPI@DST)
# <linux/xfrm.h> XFRM_STATE_* flags
STATE_FLAGS = {
    1: "noecn", 2: "decap-dscp", 4: "nopmtudisc", 8: "wildrecv", 16: "icmp", 32: "af-unspec",
    64: "align4", 128: "esn",
}


@dataclass(slots=True)
class Algorithm:
    """A transform: kernel crypto name, key (for AEAD incl. the 4-byte salt), ICV/truncation."""

    name: str
    key: bytes = b""
    icv_bits: int | None = None  # AEAD (XFRMA_ALG_AEAD alg_icv_len)
    trunc_bits: int | None = None  # auth (XFRMA_ALG_AUTH_TRUNC alg_trunc_len)

    @property
    def key_bits(self) -> int:
        return len(self.key) * 8


@dataclass(slots=True)
class Selector:
    src: str = "0.0.0.0/0"
    dst: str = "0.0.0.0/0"
    proto: int = 0
    sport: int = 0
    dport: int = 0
    ifindex: int = 0
    family: int = 0


@dataclass(slots=True)
class Encap:
    """UDP encapsulation (NAT-T): type 2 is ESP-in-UDP (RFC 3948)."""

    type: int = UDP_ENCAP_ESPINUDP
    sport: int = NATT_PORT
    dport: int = NATT_PORT
    oa: str | None = None


@dataclass(slots=True)
class Replay:
    """Replay state: 32-bit (`seq`, `oseq`, `bitmap`) or ESN (plus `seq_hi`, `oseq_hi`)."""

    seq: int = 0  # highest inbound sequence number seen (low 32 bits)
    oseq: int = 0  # last outbound sequence number used (low 32 bits)
    seq_hi: int = 0
    oseq_hi: int = 0
    bitmap: int = 0
    window: int = 0  # replay window size in packets
    esn: bool = False  # extended sequence numbers in use (XFRM_STATE_ESN)
    # the kernel keeps this state as xfrm_replay_state_esn (XFRMA_REPLAY_ESN_VAL): strongSwan uses
    # it for ESN and for windows > 32 without ESN, so it does not imply `esn`
    extended: bool = False


@dataclass(slots=True)
class SA:
    src: str
    dst: str
    spi: int
    proto: int = IPPROTO_ESP
    mode: str = "transport"
    family: int = 0  # AF_INET / AF_INET6 of the outer addresses
    reqid: int = 0
    flags: list[str] = field(default_factory=list)
    aead: Algorithm | None = None
    enc: Algorithm | None = None
    auth: Algorithm | None = None
    comp: Algorithm | None = None
    encap: Encap | None = None
    selector: Selector | None = None
    replay: Replay = field(default_factory=Replay)
    mark: tuple[int, int] | None = None  # (value, mask)
    output_mark: tuple[int, int] | None = None
    if_id: int | None = None
    offload: dict[str, Any] | None = None
    direction: str | None = None  # "in" / "out" (XFRMA_SA_DIR, kernel >= 6.10)
    lifetime_cfg: dict[str, int] = field(default_factory=dict)
    lifetime_cur: dict[str, int] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def esn(self) -> bool:
        return self.replay.esn or "esn" in self.flags

    @property
    def key_id(self) -> tuple[str, int, int]:
        """What identifies an SA in the kernel: (daddr, SPI, proto)."""
        return (self.dst, self.spi, self.proto)

    def to_dict(self, keys: bool = False) -> dict[str, Any]:
        """JSON-ready; keys are dropped unless asked for (events logs must not leak them)."""
        d = asdict(self)
        for name in ("aead", "enc", "auth", "comp"):
            alg = d.get(name)
            if alg is not None:
                alg["key"] = alg["key"].hex() if keys else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SA:
        d = dict(d)
        for name in ("aead", "enc", "auth", "comp"):
            if d.get(name) is not None:
                alg = dict(d[name])
                alg["key"] = bytes.fromhex(alg["key"]) if alg.get("key") else b""
                d[name] = Algorithm(**alg)
        if d.get("encap") is not None:
            d["encap"] = Encap(**d["encap"])
        if d.get("selector") is not None:
            d["selector"] = Selector(**d["selector"])
        d["replay"] = Replay(**d.get("replay") or {})
        for name in ("mark", "output_mark"):
            if d.get(name) is not None:
                d[name] = tuple(d[name])
        return cls(**d)


@dataclass(slots=True)
class Template:
    """One `tmpl` line of a policy: which SA the policy needs."""

    src: str
    dst: str
    spi: int = 0
    proto: int = IPPROTO_ESP
    mode: str = "transport"
    reqid: int = 0
    level: str = "required"  # required / use
    family: int = 0


@dataclass(slots=True)
class Policy:
    selector: Selector
    direction: str  # in / out / fwd
    action: str = "allow"  # allow / block
    priority: int = 0
    index: int = 0
    templates: list[Template] = field(default_factory=list)
    mark: tuple[int, int] | None = None
    if_id: int | None = None
    lifetime_cfg: dict[str, int] = field(default_factory=dict)
    lifetime_cur: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
