"""Our own ESP decoder: outer IP packet in, the inner packet and a named result out.

Why our own: Wireshark cannot tell us per packet *why* something did not decrypt, and scapy is
three orders of magnitude too slow (and wrong for short GCM ICVs). The decoder keeps one context
per SA, built once (cipher objects, packed destination, ESN tracking), and on each packet does a
struct parse, one dict lookup and the crypto.

Results (`DecryptResult.status`): ok (decrypted, ICV verified), ok-unverified (decrypted, but
nothing checked it: the SA has no integrity, or the key file has no integrity key, e.g. Wireshark's
`ANY n bit authentication [no checking]`, tcpdump's `-hmac96`, GMAC without its key), icv-fail,
no-sa, bad-padding, truncated, unsupported, not-esp. ESP carried inside ESP (a tunnel in a
tunnel) is opened layer by layer when the inner SA is known: `DecryptResult.layer`. Several SAs
may share a destination and SPI (Cilium: one SPI for every node pair, told apart by mark): each
one's ICV is tried, the one whose source matches the packet first. The decoder never raises on
packet bytes.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import cast

from cryptography.exceptions import InvalidTag

from ipsec_capture.capture.esp_header import EspHeader, esp_header, locate
from ipsec_capture.wire import IPPROTO_ESP, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_NONE
from ipsec_capture.xfrm.sa import ANY_SPI, ESN_UNKNOWN, MODE_UNKNOWN, SA

from .transforms import Transform, UnsupportedSA, transform_for

__all__ = ["DecryptResult", "EspDecoder", "EspHeader", "esp_header"]

OK = "ok"
OK_UNVERIFIED = "ok-unverified"
ICV_FAIL = "icv-fail"
NO_SA = "no-sa"
BAD_PADDING = "bad-padding"
TRUNCATED = "truncated"
UNSUPPORTED = "unsupported"
NOT_ESP = "not-esp"
STATUSES = (OK, OK_UNVERIFIED, ICV_FAIL, NO_SA, BAD_PADDING, TRUNCATED, UNSUPPORTED, NOT_ESP)
DECRYPTED = (OK, OK_UNVERIFIED)  # the statuses that come with an inner packet
MAX_LAYERS = 4  # ESP inside ESP opened at most this deep (each layer needs its own SA)

_ESP = struct.Struct("!II")
# IPv4 header without options followed by the ESP header: version/IHL, total length, flags and
# fragment offset, protocol, destination and SPI as one 64-bit key, sequence number (the decoder's
# fast path: destination and SPI are adjacent, so the dict key comes out of the unpack as it is)
IP4_ESP = struct.Struct("!BxHxxHxB6xQI")
_HEADER_IV = struct.Struct("8s8s")  # ESP header (the AEADs' associated data) and IV, as bytes
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_PAD = bytes(range(1, 256))  # RFC 4303 section 2.4: default padding is 1, 2, 3, ...
_PADS = tuple(_PAD[:n] for n in range(256))  # the padding expected for each pad length
_MASK32 = 0xFFFFFFFF
TUNNEL_HEADERS = (IPPROTO_IPIP, IPPROTO_IPV6)  # an inner IP packet: what tunnel mode carries
HEADROOM = 16  # bytes decrypt_into may write before `at` (a CBC IV block)
ROOM = 64  # bytes past a packet's length it may write after `at` (a cipher block of slack)
_DEFAULT_WINDOW = 64  # when the SA's replay state names none (esp_sa files carry no state)


@dataclass(slots=True)
class DecryptResult:
    """What became of one packet.

    `seq` is the full 64-bit sequence number for ESN SAs (high bits inferred), else the 32 bits
    on the wire. `inner` is the inner IP packet for tunnel mode, and for transport mode the outer
    packet rebuilt around the payload (protocol = next header, lengths and IPv4 checksum fixed,
    UDP encapsulation removed). `decrypt_into` leaves `inner` None and writes it into the
    caller's buffer instead; `inner_len` is its length either way (-1: there is none). `sa` is
    the SA that matched (also for failures). `layer` is the result of the ESP packet this one
    carried (a tunnel inside a tunnel), when its SA is known: then `inner_len` (and `inner`) is
    the innermost packet decrypted, each layer's own status, SPI and sequence number in its result.
    """

    status: str
    spi: int | None = None
    seq: int | None = None
    inner: bytes | None = None
    next_header: int | None = None
    sa: SA | None = None
    detail: str = ""
    inner_len: int = -1
    layer: DecryptResult | None = None

    def layers(self) -> list[DecryptResult]:
        """This result and those of the ESP layers inside it, outermost first."""
        out = [self]
        while out[-1].layer is not None:
            out.append(out[-1].layer)
        return out


@dataclass(slots=True)
class _Context:
    """Per-SA state: the prepared transform (or why there is none) and the ESN tracker."""

    sa: SA
    transform: Transform | None
    problem: str
    tunnel: bool | None  # None: mode unknown, decided per packet
    esn: bool | None  # None: unknown until a packet's ICV tells
    top: int = 0  # highest 64-bit sequence number verified so far (ESN)
    window: int = _DEFAULT_WINDOW
    dst: bytes | None = field(default=None)
    src: bytes | None = None
    lane: Lane | None = None  # the fast lane, once the SA is known to have one (see _lane)
    # the other SAs with the same (destination, SPI), told apart by their ICV (marks, see add)
    others: list[_Context] = field(default_factory=list)


# (IPv4 packet, out buffer, a view of it, at) -> inner length, or -1: "ask decrypt_into"
Lane = Callable[[bytes | memoryview, bytearray, memoryview, int], int]


def _lane(ctx: _Context) -> Lane | None:
    """The fast lane of an SA: the one case that is nearly all of a big capture (IPv4 without
    options, ESP whole, an authenticated transform, no ESN, an inner IP packet: tunnel mode)
    with every step inlined, for decrypt_to_writer's loop, where the general path's calls and
    result object cost more than the crypto. It returns the inner packet's length having
    written exactly what decrypt_into writes for such a packet, and -1 for anything else (ICV
    failure, bad padding, another next header), which decrypt_into then decides, so the lane
    changes speed, never results. None: the SA has no lane (yet: ESN undecided)."""
    t = ctx.transform
    if t is None or not t.authenticated or ctx.tunnel is False or ctx.esn is not False or ctx.others:
        return None
    overhead, block = 20 + t.overhead, t.block
    pads = _PADS
    # the lane is handed Record.payload, bytes or a view: the transforms only slice it and pass it
    # to cryptography, which takes any buffer, so bytes serve as well as the view they are typed for
    open_ = cast(Callable[[bytes | memoryview, int, None, memoryview, int], int], t.open)
    # an AEAD's own call inlined (one Python call less a packet): its decrypt_into and salt
    decrypt_into, salt = t.aead if t.aead is not None else (None, b"")
    header_iv = _HEADER_IV.unpack_from

    def lane(pkt: bytes | memoryview, buf: bytearray, out: memoryview, at: int) -> int:
        n = len(pkt) - overhead  # the ciphertext's length, and so the plaintext's
        if n < 2 or n % block:
            return -1
        if decrypt_into is not None:
            header, iv = header_iv(pkt, 20)
            try:
                decrypt_into(salt + iv, pkt[36:], header, out[at:at + n])
            except InvalidTag:
                return -1
        elif open_(pkt, 20, None, out, at) < 0:
            return -1
        pad_len = buf[at + n - 2]
        end = n - 2 - pad_len
        nh = buf[at + n - 1]
        if end < 0 or nh not in TUNNEL_HEADERS or not buf.startswith(pads[pad_len], at + end) \
                or buf[at + (9 if nh == IPPROTO_IPIP else 6)] == IPPROTO_ESP:  # ESP in ESP: layers
            return -1
        return end

    return lane


def _identity(sa: SA) -> tuple:
    """What makes an SA another one than an SA with the same (destination, SPI). With a mark known,
    as the kernel tells states apart: the same (source, mark, transform) is an update and replaces
    it (a new key included). Without one (a Wireshark table has no marks), another key is another
    SA too, kept beside it and tried by its ICV: Cilium's per-pair keys under one SPI."""
    algs = tuple((a.name, a.icv_bits, a.trunc_bits, a.key if sa.mark is None else b"")
                 if a is not None else None for a in (sa.aead, sa.enc, sa.auth))
    return (sa.src, sa.mark, algs)


def _packed(addr: str) -> bytes | None:
    try:
        return ipaddress.ip_address(addr.split("/")[0]).packed
    except ValueError:
        return None  # wildcard ("*", "any") or garbage: found by SPI only


def _keys(sa: SA) -> tuple[bytes, ...]:
    return tuple(a.key for a in (sa.aead, sa.enc, sa.auth) if a is not None)


class EspDecoder:
    """Decrypts ESP packets with a set of SAs, looked up by (destination, SPI) and, because NAT
    may rewrite addresses, by SPI alone when the pair is unknown. Several SAs may share one
    (destination, SPI) with other keys (Cilium: one SPI for every node pair, the inbound states
    `src 0.0.0.0` told apart only by a mark the packet does not carry in its bytes): then each
    is tried until one verifies."""

    __slots__ = ("_any", "_by_dst", "_by_spi", "_by_v4", "_scratch", "_scratch_view")

    def __init__(self, sas: Iterable[SA] = ()) -> None:
        # (destination, SPI) -> its SA, the first of several (ctx.others) when they share the pair
        self._by_dst: dict[tuple[bytes | None, int], _Context] = {}
        self._by_spi: dict[int, list[_Context]] = {}
        self._by_v4: dict[int, _Context] = {}  # the IPv4 entries of _by_dst, keyed dst << 32 | SPI
        self._any: list[_Context] = []  # keys for every SPI (ANY_SPI), tried when no SA matches
        self._scratch = bytearray(0)  # where decrypt() lets decrypt_into write
        self._scratch_view = memoryview(self._scratch)
        for sa in sas:
            self.add(sa)

    def add(self, sa: SA) -> None:
        """Add an SA; builds its ciphers now. It replaces an SA with the same (destination, SPI)
        and the same identity (source, mark, transform: an update), else it joins it (several
        SAs on one destination and SPI, told apart by their ICV). An SA we cannot decrypt still
        matches, so its packets say `unsupported` and why, not `no-sa`."""
        try:
            transform, problem = transform_for(sa), ""
        except UnsupportedSA as err:
            transform, problem = None, str(err)
        if sa.mode not in ("transport", "tunnel", MODE_UNKNOWN):
            transform, problem = None, f"mode {sa.mode} is not supported"
        replay = sa.replay
        top = max((replay.seq_hi << 32) | replay.seq, (replay.oseq_hi << 32) | replay.oseq)
        ctx = _Context(sa=sa, transform=transform, problem=problem, tunnel=_tunnel_mode(sa.mode),
                       esn=None if ESN_UNKNOWN in sa.flags else sa.esn, top=top,
                       window=replay.window or _DEFAULT_WINDOW, dst=_packed(sa.dst), src=_packed(sa.src))
        if sa.spi == ANY_SPI:
            ident = _identity(sa)
            self._any = [c for c in self._any if _identity(c.sa) != ident] + [ctx]
            return
        key = (ctx.dst, sa.spi)
        first = self._by_dst.get(key)
        group = [ctx] if first is None else [first, *first.others]
        replaced: _Context | None = None
        if first is not None:
            ident = _identity(sa)
            for i, c in enumerate(group):
                if _identity(c.sa) == ident:
                    replaced, group[i] = c, ctx
                    break
            else:
                group.append(ctx)
        for c in group:
            c.others = []
        group[0].others = group[1:]
        for c in group:
            c.lane = _lane(c)
        self._by_dst[key] = group[0]
        if ctx.dst is not None and len(ctx.dst) == 4:
            self._by_v4[int.from_bytes(ctx.dst, "big") << 32 | sa.spi] = group[0]
        same_spi = self._by_spi.setdefault(sa.spi, [])
        if replaced is not None:
            same_spi[same_spi.index(replaced)] = ctx
        else:
            same_spi.append(ctx)

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_spi.values()) + len(self._any)

    def lane(self, dst_spi: int) -> Lane | None:
        """The fast lane (see _lane) of the SA for IPv4 destination and SPI as one 64-bit number
        (dst << 32 | spi, as the header has them side by side), if it has one."""
        ctx = self._by_v4.get(dst_spi)
        return ctx.lane if ctx is not None else None

    def decrypt(self, packet: bytes | memoryview) -> DecryptResult:
        """Decrypt one outer IP packet; the result holds the inner packet as bytes. Never raises
        on packet contents."""
        need = HEADROOM + len(packet) + ROOM
        if need > len(self._scratch):
            self._scratch = bytearray(max(need, 2 * len(self._scratch)))
            self._scratch_view = memoryview(self._scratch)
        result = self.decrypt_into(packet, self._scratch, self._scratch_view, HEADROOM)
        if result.inner_len >= 0:
            result.inner = bytes(self._scratch_view[HEADROOM:HEADROOM + result.inner_len])
        return result

    def decrypt_into(self, packet: bytes | memoryview, buf: bytearray, out: memoryview, at: int
                     ) -> DecryptResult:
        """Decrypt one outer IP packet, writing the inner packet (when there is one) at
        `buf[at:at + result.inner_len]`; `out` is a view of `buf`. The pcapng writer hands out the
        place where the packet's bytes go, so a decrypted packet is written once, in place. `buf`
        needs HEADROOM bytes before `at` and len(packet) + ROOM from `at` on; bytes there
        beyond the inner packet may be overwritten. Never raises on packet contents."""
        try:
            pkt = packet if type(packet) is memoryview else memoryview(packet)
            n = len(pkt)
            result: DecryptResult | None = None
            if n >= 28:
                # Nearly every packet: IPv4 without options, ESP, a known (destination, SPI),
                # captured whole. One unpack reads all of it; anything else takes the general parse.
                first, length, frag, proto, dst_spi, seq_lo = IP4_ESP.unpack_from(pkt)
                if first == 0x45 and proto == IPPROTO_ESP and not frag & 0x3FFF and length == n:
                    ctx = self._by_v4.get(dst_spi)
                    if ctx is not None:
                        spi = dst_spi & 0xFFFFFFFF
                        if ctx.others:
                            result = self._open_group(ctx, bytes(pkt[12:16]), pkt, spi, seq_lo, 20, 20, 9,
                                                      buf, out, at)
                        else:
                            result = self._open(ctx, pkt, spi, seq_lo, 20, 20, 9, buf, out, at)
            if result is None:
                result = self._decrypt(pkt, buf, out, at)
            k = result.inner_len
            if k >= 20 and result.status in DECRYPTED and \
                    buf[at + (9 if buf[at] >> 4 == 4 else 6)] == IPPROTO_ESP:
                return self._inner_layer(result, buf, out, at, 1)
            return result
        except Exception as err:  # a decoder bug must not stop a whole file
            return DecryptResult(UNSUPPORTED, detail=f"decoder error: {type(err).__name__}: {err}")

    def _inner_layer(self, result: DecryptResult, buf: bytearray, out: memoryview, at: int,
                     depth: int) -> DecryptResult:
        """The decrypted packet is ESP again (a tunnel in a tunnel): open it with its own SA, if
        it has one we know, into the same place. Its result becomes `result.layer`; the packet
        left at `at` is the innermost one decrypted (the ESP packet itself when its layer fails)."""
        inner = bytes(out[at:at + result.inner_len])
        sub = self._decrypt(memoryview(inner), buf, out, at)
        if sub.status in (NOT_ESP, NO_SA):
            out[at:at + len(inner)] = inner  # a failed attempt may have written there
            return result
        result.layer = sub
        if sub.inner_len < 0:
            out[at:at + len(inner)] = inner
            return result
        k = sub.inner_len
        result.inner_len = k
        if depth < MAX_LAYERS and k >= 20 and sub.status in DECRYPTED and \
                buf[at + (9 if buf[at] >> 4 == 4 else 6)] == IPPROTO_ESP:
            self._inner_layer(sub, buf, out, at, depth + 1)
            result.inner_len = sub.inner_len
        return result

    def _decrypt(self, pkt: memoryview, buf: bytearray, out: memoryview, at: int) -> DecryptResult:
        """Any packet: the general parse (IPv6, options, NAT-T, fragments, unknown or NAT'ed
        destinations, truncation)."""
        found = locate(pkt)
        if found is None:
            return DecryptResult(NOT_ESP)
        _family, dst_start, dst_end, pos, header_len, proto_at, length = found
        spi, seq_lo = _ESP.unpack_from(pkt, pos)
        if spi == 0:
            return DecryptResult(NOT_ESP, detail="SPI 0 is reserved")
        ctx = self._by_dst.get((bytes(pkt[dst_start:dst_end]), spi))
        if ctx is None:
            return self._decrypt_by_spi(pkt, spi, seq_lo, pos, header_len, proto_at, length, buf, out, at)
        if ctx.others:
            alen = dst_end - dst_start
            src = bytes(pkt[dst_start - alen:dst_start])
            if length != len(pkt) and len(pkt) > length >= pos:
                pkt = pkt[:length]
            if length > len(pkt):
                return DecryptResult(TRUNCATED, spi, seq_lo, sa=ctx.sa,
                                     detail=f"captured {len(pkt)} of {length} bytes")
            return self._open_group(ctx, src, pkt, spi, seq_lo, pos, header_len, proto_at, buf, out, at)
        # the usual case: one SA for (destination, SPI), the packet captured whole
        if length != len(pkt):
            if length > len(pkt):
                return DecryptResult(TRUNCATED, spi, seq_lo, sa=ctx.sa,
                                     detail=f"captured {len(pkt)} of {length} bytes")
            if length >= pos:
                pkt = pkt[:length]  # drop link-layer padding after the IP packet
        return self._open(ctx, pkt, spi, seq_lo, pos, header_len, proto_at, buf, out, at)

    def _decrypt_by_spi(self, pkt: memoryview, spi: int, seq_lo: int, pos: int, header_len: int,
                        proto_at: int, length: int, buf: bytearray, out: memoryview, at: int,
                        candidates: list[_Context] | None = None) -> DecryptResult:
        """No SA for (destination, SPI): NAT may have rewritten the address, so every SA with the
        SPI is tried until one verifies."""
        candidates = self._by_spi.get(spi) or self._any
        if not candidates:
            return DecryptResult(NO_SA, spi, seq_lo, detail=f"no SA for SPI 0x{spi:08x}")
        if length > len(pkt):
            return DecryptResult(TRUNCATED, spi, seq_lo, sa=candidates[0].sa,
                                 detail=f"captured {len(pkt)} of {length} bytes")
        if length >= pos:
            pkt = pkt[:length]  # drop link-layer padding after the IP packet
        result: DecryptResult | None = None
        for c in candidates:
            result = self._open(c, pkt, spi, seq_lo, pos, header_len, proto_at, buf, out, at)
            if result.status != ICV_FAIL:
                return result
        assert result is not None
        return result

    def _open_group(self, ctx: _Context, src: bytes, pkt: memoryview, spi: int, seq_lo: int, pos: int,
                    header_len: int, proto_at: int, buf: bytearray, out: memoryview, at: int
                    ) -> DecryptResult:
        """Several SAs on this (destination, SPI): those from the packet's source first, then the
        rest, until one's ICV verifies."""
        group = [ctx, *ctx.others]
        group.sort(key=lambda c: c.src != src and c.src is not None)
        result: DecryptResult | None = None
        for c in group:
            result = self._open(c, pkt, spi, seq_lo, pos, header_len, proto_at, buf, out, at)
            if result.status != ICV_FAIL:
                return result
        assert result is not None
        return result

    def _open(self, ctx: _Context, pkt: memoryview, spi: int, seq_lo: int, pos: int,
              header_len: int, proto_at: int, buf: bytearray, out: memoryview, at: int) -> DecryptResult:
        t = ctx.transform
        if t is None:
            return DecryptResult(UNSUPPORTED, spi, seq_lo, sa=ctx.sa, detail=ctx.problem)
        body = len(pkt) - pos - t.overhead
        if body < 2:
            return DecryptResult(TRUNCATED, spi, seq_lo, sa=ctx.sa,
                                 detail=f"ESP of {len(pkt) - pos} bytes cannot hold header, IV, trailer "
                                        "and ICV")
        if body % t.block:
            return DecryptResult(BAD_PADDING, spi, seq_lo, sa=ctx.sa,
                                 detail=f"ciphertext of {body} bytes is not a multiple of {t.block}")
        # the plaintext goes where the inner packet starts: at `at` in tunnel mode, after the
        # outer header in transport mode (moved there afterwards when the mode was unknown)
        tunnel = ctx.tunnel
        dest = at + header_len if tunnel is False else at
        esn = ctx.esn
        if esn:
            n, seq = self._open_esn(ctx, t, pkt, pos, seq_lo, out, dest)
        else:
            n, seq = t.open(pkt, pos, None, out, dest), seq_lo
            if esn is None and t.authenticated:
                # the key file did not say (8-column esp_sa): the ICV tells which one the SA uses
                if n < 0:
                    n, seq = self._open_esn(ctx, t, pkt, pos, seq_lo, out, dest)
                    if n >= 0:
                        ctx.esn = True
                else:
                    ctx.esn = False
                    ctx.lane = _lane(ctx)
        if n < 0:
            return DecryptResult(ICV_FAIL, spi, seq, sa=ctx.sa, detail="ICV mismatch: wrong key or tampered")
        pad_len, next_header = buf[dest + n - 2], buf[dest + n - 1]
        end = n - 2 - pad_len  # the payload's length
        if end < 0:
            return DecryptResult(BAD_PADDING, spi, seq, next_header=next_header, sa=ctx.sa,
                                 detail=f"pad length {pad_len} exceeds the {n}-byte payload")
        status, detail = OK if t.authenticated else OK_UNVERIFIED, ""
        if not buf.startswith(_PADS[pad_len], dest + end):
            status, detail = BAD_PADDING, "padding bytes are not 1, 2, 3, ... (wrong key without integrity?)"
        if next_header == IPPROTO_NONE:
            return DecryptResult(status, spi, seq, None, next_header, ctx.sa, detail or "dummy packet (TFC)")
        # Tunnel: the payload is the inner packet. Transport: put the outer header back around it.
        # Mode unknown (esp_sa): an inner IP packet means tunnel, as Wireshark decides too.
        if tunnel is None:
            tunnel = next_header in TUNNEL_HEADERS
            if not tunnel:
                out[at + header_len:at + header_len + end] = out[at:at + end]  # memmove
        if tunnel:
            return DecryptResult(status, spi, seq, None, next_header, ctx.sa, detail, end)
        out[at:at + header_len] = _transport_header(pkt, header_len, proto_at, next_header, end)
        return DecryptResult(status, spi, seq, None, next_header, ctx.sa, detail, header_len + end)

    @staticmethod
    def _open_esn(ctx: _Context, t: Transform, pkt: memoryview, pos: int, seq_lo: int,
                  out: memoryview, at: int) -> tuple[int, int]:
        """Infer the high 32 bits (RFC 4303 Appendix A2.2), verify, and follow the SA forward.
        If the ICV fails with the inferred value, the neighbours are tried (a replay state taken
        at another moment than the capture), so a rollover is found either way."""
        top_hi, top_lo = ctx.top >> 32, ctx.top & _MASK32
        w = ctx.window
        bottom = (top_lo - w + 1) & _MASK32
        if top_lo >= w - 1:  # window within one 2^32 subspace
            hi = top_hi if seq_lo >= bottom else top_hi + 1
        else:  # window spans two subspaces
            hi = top_hi - 1 if seq_lo >= bottom else top_hi
        hi = min(max(hi, 0), _MASK32)
        tries = (hi, hi + 1, hi - 1) if t.authenticated else (hi,)
        for h in tries:
            if not 0 <= h <= _MASK32:
                continue
            n = t.open(pkt, pos, _U32.pack(h), out, at)
            if n >= 0:
                seq = (h << 32) | seq_lo
                if seq > ctx.top:
                    ctx.top = seq
                return n, seq
        return -1, (hi << 32) | seq_lo


def _tunnel_mode(mode: str) -> bool | None:
    return None if mode == MODE_UNKNOWN else mode == "tunnel"


def _transport_header(pkt: memoryview, header_len: int, proto_at: int, next_header: int,
                      payload_len: int) -> bytearray:
    """The outer header as it was before ESP, for a payload of `payload_len` bytes: IP header
    (+ IPv6 extension headers), protocol set to the next header, lengths fixed, IPv4 checksum
    recomputed, UDP encapsulation dropped."""
    head = bytearray(pkt[:header_len])
    head[proto_at] = next_header
    if head[0] >> 4 == 4:
        _U16.pack_into(head, 2, header_len + payload_len)
        head[10:12] = b"\x00\x00"
        _U16.pack_into(head, 10, _ip_checksum(head))
    else:
        _U16.pack_into(head, 4, header_len - 40 + payload_len)
    return head


def _ip_checksum(header: bytes | bytearray) -> int:
    """RFC 1071 one's-complement sum over the header (its checksum field zeroed)."""
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
