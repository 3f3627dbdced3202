"""Hypothesis: the readers of outside input other than capture files, fed any bytes.

NFLOG TLVs (capture/nflog_tlv.py), the events log (bpf/eventlog.py), XFRM netlink messages
(xfrm/netlink.py and the monitor's decoder), the kfree_skb trace text (bpf/kfree_skb.py).
Each raises only its documented error (UserError for files; ValueError for a kernel message,
which the monitor turns into an `undecodable` event and a dump into a UserError), and what it
accepts every writer takes: an NFLOG Record goes back into an NFLOG body, an Event back into a
JSON line, a decoded SA into a netlink message and an esp_sa row.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from ipsec_capture.bpf.eventlog import EventLogWriter, make_header, read_events
from ipsec_capture.bpf.kfree_skb import parse_line
from ipsec_capture.capture.nflog_tlv import (
    TLV_BE,
    TLV_LE,
    BodyParser,
    build_body,
    detect_tlv_order,
    parse_body,
)
from ipsec_capture.errors import UserError
from ipsec_capture.models import Event
from ipsec_capture.xfrm import monitor
from ipsec_capture.xfrm import netlink as nl
from ipsec_capture.xfrm.esp_sa import write_esp_sa
from tests.support.fuzzing import FUZZ, mutate, mutations, nflog_body
from tests.support.synthetic import esp4, udp4

# --- NFLOG TLVs -----------------------------------------------------------------------------

_IP = esp4("192.0.2.1", "192.0.2.2", 0x101, 7, udp4("10.0.0.1", "10.0.0.2", 1, b"abc"), bytes(20))
_BODIES = [nflog_body(_IP), nflog_body(_IP, "raw-out-esp", hook=3), nflog_body(b"")]


def _fields(rec):  # what a parse gives, comparable (payload as bytes)
    return (rec.time_ns, rec.point, bytes(rec.payload), rec.family, rec.hook, rec.indev, rec.outdev,
            rec.mark, rec.uid, rec.gid, rec.seq, rec.seq_global)


@FUZZ
@given(st.binary(max_size=160), st.sampled_from([TLV_LE, TLV_BE]))
def test_nflog_any_bytes(body: bytes, order: struct.Struct) -> None:
    try:
        rec = parse_body(body, 5, order)
    except UserError as err:
        assert "\n" not in str(err)
        return
    again = parse_body(build_body(rec))  # a writer without the original body re-encodes it
    assert bytes(again.payload) == bytes(rec.payload)[:0xFFF8]


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(_BODIES) - 1), st.data()), min_size=1, max_size=6))
def test_nflog_learned_shapes_agree_with_the_walk(picks) -> None:
    """BodyParser learns shapes from the bodies it meets; mutated bodies of a learned shape must
    parse exactly as the general walk parses them (or be refused the same way)."""
    parser = BodyParser(TLV_LE)
    for index, data in picks:
        seed = _BODIES[index]
        body = mutate(seed, data.draw(mutations(len(seed), 3))) if data.draw(st.booleans()) else seed
        try:
            want = _fields(parse_body(body, 9, TLV_LE))
        except UserError:
            want = None
        try:
            got = _fields(parser.parse(memoryview(body), 9))
        except UserError:
            got = None
        assert got == want
        detect_tlv_order(body)


# --- the events log -------------------------------------------------------------------------

def _seed_log(path: Path) -> bytes:
    with EventLogWriter(path, make_header(sources=[{"name": "kfree_skb", "active": True}])) as w:
        w.write(Event(1_700_000_000_000_000_000, "kfree_skb", "drop", reason="XFRM_POLICY",
                      detail={"location": "xfrm_input+0x2de", "protocol": 2048}))
        w.write(Event(1_700_000_000_100_000_000, "xfrm_monitor", "sa-delete", netns=4026531840,
                      spi=0xC0FFEE01, tuple={"src": "192.0.2.1", "dst": "192.0.2.2", "proto": 50}))
        w.write(Event(1_700_000_000_200_000_000, "xfrm_stat", "counter", reason="XfrmInNoStates",
                      detail={"delta": 3, "value": 3}))
    return path.read_bytes()


def _read_log(path: Path) -> list[Event] | None:
    try:
        header, events = read_events(path)
        out = list(events)
    except UserError as err:
        assert "\n" not in str(err)
        return None
    json.dumps(header)
    for ev in out:  # what the reader accepts is an Event of the documented types
        assert isinstance(ev.time_ns, int) and isinstance(ev.source, str) and isinstance(ev.kind, str)
        for name in ("netns", "spi", "seq", "ret"):
            assert getattr(ev, name) is None or type(getattr(ev, name)) is int
        assert ev.reason is None or isinstance(ev.reason, str)
        assert isinstance(ev.detail, dict)
        assert Event.from_dict(json.loads(ev.to_json())) == ev  # and writes back as it was
    return out


@FUZZ
@given(st.data())
def test_events_log_mutated(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "x.events.jsonl"
    seed = _seed_log(path)
    path.write_bytes(mutate(seed, data.draw(mutations(len(seed)))))
    _read_log(path)


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                  max_size=3),
                     max_leaves=8)
_KEYS = st.sampled_from(["time_ns", "source", "kind", "netns", "spi", "seq", "ret", "reason", "tuple",
                         "inner", "detail", "other"])


@FUZZ
@given(st.lists(st.dictionaries(_KEYS, _JSON, max_size=8), max_size=4))
def test_events_log_any_json_objects(tmp_path: Path, lines: list[dict]) -> None:
    """Lines that are JSON objects of any shape: an Event of the wrong types is a bad line."""
    path = tmp_path / "x.events.jsonl"
    seed = _seed_log(path).decode()
    path.write_text(seed + "".join(json.dumps(d) + "\n" for d in lines))
    _read_log(path)


# --- XFRM netlink ---------------------------------------------------------------------------

def _seed_state() -> bytes:
    from ipsec_capture.xfrm.sa import SA, Algorithm, Encap, Replay, Selector

    sa = SA(src="192.0.2.1", dst="192.0.2.2", spi=0xC0FFEE01, mode="tunnel", family=2, reqid=7,
            flags=["esn", "dont-encap-dscp"], enc=Algorithm("cbc(aes)", bytes(16)),
            auth=Algorithm("hmac(sha256)", bytes(32), trunc_bits=128), encap=Encap(2, 4500, 4500, "0.0.0.0"),
            selector=Selector("10.0.0.0/24", "10.1.0.0/24", proto=17, dport=53, family=2),
            replay=Replay(seq=1, oseq=2, bitmap=3, window=64, esn=True, extended=True),
            mark=(1, 0xFF), output_mark=(2, 0xFF), if_id=5, direction="in",
            offload={"ifindex": 3, "dir": "in", "packet": True})
    return nl.encode_state(sa)


def _seed_policy() -> bytes:
    from ipsec_capture.xfrm.sa import Policy, Selector, Template

    return nl.encode_policy(Policy(selector=Selector("10.0.0.0/24", "10.1.0.0/24", family=2), direction="out",
                                   templates=[Template(src="192.0.2.1", dst="192.0.2.2", spi=0x101)],
                                   mark=(1, 2), if_id=3))


_STATE, _POLICY = _seed_state(), _seed_policy()
# the monitor's own unpacks (acquire, mapping, report) may raise these; it catches all three
UNDECODABLE = (ValueError, struct.error, IndexError)


def _sa_writers(sa) -> None:
    """A decoded SA goes wherever SAs go: a netlink message, an esp_sa row, the events log."""
    nl.decode_state(nl.encode_state(sa))
    write_esp_sa([sa], 8)
    write_esp_sa([sa], 10)
    json.dumps(sa.to_dict(keys=True))


@FUZZ
@given(st.booleans(), st.data())
def test_xfrm_messages_mutated(state: bool, data: st.DataObject) -> None:
    seed = _STATE if state else _POLICY
    msg = mutate(seed, data.draw(mutations(len(seed), 6)))
    try:
        decoded = nl.decode_state(msg) if state else nl.decode_policy(msg)
    except ValueError:
        return
    if state:
        _sa_writers(decoded)
    else:
        json.dumps(decoded.to_dict())
        nl.decode_policy(nl.encode_policy(decoded))


@FUZZ
@given(st.sampled_from([nl.XFRM_MSG_NEWSA, nl.XFRM_MSG_UPDSA, nl.XFRM_MSG_DELSA, nl.XFRM_MSG_EXPIRE,
                        nl.XFRM_MSG_NEWPOLICY, nl.XFRM_MSG_DELPOLICY, nl.XFRM_MSG_POLEXPIRE,
                        nl.XFRM_MSG_ACQUIRE, nl.XFRM_MSG_MAPPING, nl.XFRM_MSG_REPORT]),
       st.booleans(), st.data())
def test_xfrm_notifications_any_bytes(mtype: int, from_seed: bool, data: st.DataObject) -> None:
    """What the monitor decodes: ValueError (an `undecodable` event) or a JSON-able Event."""
    if from_seed:
        seed = _STATE if mtype in (nl.XFRM_MSG_NEWSA, nl.XFRM_MSG_UPDSA, nl.XFRM_MSG_EXPIRE) else _POLICY
        msg = mutate(seed, data.draw(mutations(len(seed), 6)))
    else:
        msg = nl.NLMSGHDR.pack(0, mtype, 0, 0, 0) + data.draw(st.binary(max_size=400))
    try:
        note = monitor.decode_notification(mtype, memoryview(msg), 1, 5)
    except UNDECODABLE:  # what XfrmMonitor.read_raw turns into an `undecodable` event
        return
    if note is not None:
        note.event.to_json()
        if note.sa is not None:
            _sa_writers(note.sa)


@FUZZ
@given(st.binary(max_size=300))
def test_xfrm_datagram_split(data: bytes) -> None:
    for _mtype, _flags, msg in nl.iter_messages(data):
        assert len(msg) >= nl.NLMSGHDR.size


# --- the kfree_skb trace text ----------------------------------------------------------------

_LINE = (b"          <idle>-0       [001] ..s1.  5123.000250: kfree_skb: skbaddr=ffff88810706a900 "
         b"rx_sk=0000000000000000 protocol=2048 location=icmp_rcv+0x1ff/0x3c0 reason: XFRM_POLICY")


class _FakeSyms:  # a Kallsyms without /proc: parse_line's symbolize step on any address
    def symbolize(self, addr: int) -> str:
        return f"sym+0x{addr & 0xFFF:x}"


@FUZZ
@given(st.data(), st.booleans())
def test_kfree_skb_line_mutated(data: st.DataObject, syms: bool) -> None:
    line = mutate(_LINE, data.draw(mutations(len(_LINE), 6)))
    if data.draw(st.booleans()):
        at = data.draw(st.integers(0, len(line)))
        line = line[:at] + data.draw(st.binary(max_size=40)) + line[at:]
    drop = parse_line(line, _FakeSyms() if syms else None)  # type: ignore[arg-type]
    if drop is not None:
        assert drop.boot_ns >= 0 and isinstance(drop.location, str)
        Event(drop.boot_ns, "kfree_skb", "drop", reason=drop.reason,
              detail={"location": drop.location, "protocol": drop.protocol}).to_json()


def test_kfree_skb_line_of_huge_numbers_and_bad_utf8() -> None:
    assert parse_line(b"[1] x 9" + b"9" * 5000 + b".1: kfree_skb: skbaddr=1 protocol=1 location=a") is None \
        or True  # either way: no ValueError from int() of 5000 digits
    drop = parse_line(b"[1] x 1.5: kfree_skb: skbaddr=\xff protocol=1 location=\xfe\xff+0x1 reason: X")
    assert drop is not None and drop.location.startswith("\ufffd")
