"""The BPF event struct and its Python mirror, tested together (no kernel needed), and the
decoder's traps: SPI byte order, ret kept as the kernel gave it, drops named by this kernel."""

from __future__ import annotations

import re
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipsec_capture.bpf.kprobes import (
    ANCHORS,
    DROP_FN,
    DROP_TRACEPOINT,
    EVENT,
    KINDS,
    PROGRAM,
    KprobeSource,
    decode,
    encode_packet_event,
    probes,
)

AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6
C_TO_STRUCT = {"u64": "Q", "s64": "q", "u32": "I", "s32": "i", "u16": "H", "u8": "B"}


def test_python_mirror_matches_the_c_struct():
    src = PROGRAM.read_text()
    body = re.search(r"struct ipsec_event \{(.*?)\n\};", src, re.S).group(1)
    fmt = "<"
    for ctype, _name, array in re.findall(r"^\s*(\w+)\s+(\w+)(?:\[(\d+)\])?;", body, re.M):
        code = C_TO_STRUCT[ctype]
        fmt += f"{array}s" if array else code
    assert fmt == EVENT.format
    kinds = dict(re.findall(r"K_(\w+) = (\d+),", src))
    assert {int(v): k.lower() for k, v in kinds.items()} == {n: k.replace("-", "_") for n, k in KINDS.items()}


def _sample(**kw) -> bytes:
    f = dict(ts=1_000, skb=0xFFFF888000001000, location=0, ret=0, kind=1, netns=4026532100, ifindex=2,
             mark=0, spi=socket.htonl(0x1000AB01), seq=7, seq_hi=0, reason=0, len=120, encap=0,
             family=socket.AF_INET, protocol=0x0800, l4proto=50, mode=0, sa_family=0, flags=0,
             saddr=socket.inet_aton("192.0.2.1") + bytes(12), daddr=socket.inet_aton("192.0.2.2") + bytes(12),
             sa_saddr=bytes(16), sa_daddr=bytes(16))
    f.update(kw)
    return EVENT.pack(*f.values())


def test_decode_input_keeps_ret_zero_and_host_order_spi():
    ev = decode(_sample(), wall_minus_mono=5_000, reasons={}, ksyms=None)
    assert (ev.source, ev.kind, ev.spi, ev.seq, ev.ret) == ("kprobe", "xfrm_input", 0x1000AB01, 7, 0)
    assert ev.time_ns == 6_000
    assert ev.tuple == {"src": "192.0.2.1", "dst": "192.0.2.2", "proto": 50}
    assert ev.netns == 4026532100 and ev.detail["ifindex"] == 2


def test_decode_output_einprogress_and_sa_tuple():
    sa_src = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    sa_dst = socket.inet_pton(socket.AF_INET6, "2001:db8::2")
    ev = decode(_sample(kind=2, ret=-115, sa_family=socket.AF_INET6, sa_saddr=sa_src, sa_daddr=sa_dst,
                        l4proto=1, mode=1, flags=2, seq_hi=3), 0, {}, None)
    assert ev.kind == "xfrm_output" and ev.ret == -115  # -EINPROGRESS: async, reported as is
    assert ev.tuple == {"src": "2001:db8::1", "dst": "2001:db8::2", "proto": 50}
    assert ev.inner == {"src": "192.0.2.1", "dst": "192.0.2.2", "proto": 1}
    assert ev.detail["mode"] == "tunnel" and ev.detail["seq_hi"] == 3


def test_decode_drop_uses_this_kernels_reason_names():
    ev = decode(_sample(kind=7, reason=18, location=0xFFFF0010), 0, {18: "XFRM_POLICY"}, None)
    assert (ev.source, ev.kind, ev.reason) == ("kfree_skb", "drop", "XFRM_POLICY")
    assert ev.detail["location"] == "0xffff0010" and ev.detail["via"] == "bpf"
    assert ev.spi is None and ev.ret is None


def test_decode_resumed_input_has_no_seq():
    ev = decode(_sample(flags=1, encap=-1, seq=0), 0, {}, None)
    assert ev.seq is None and ev.detail["resumed"] is True


def test_probe_tables_name_the_programs_the_c_file_defines():
    """Both mechanisms' tables against xfrm_probes.c: a renamed function would otherwise only fail
    in the lab, after a 90 s compile. Entries come before their returns (attach order)."""
    src = PROGRAM.read_text()
    fentry_half, kprobe_half = src.split("/* ---- ... or kprobe/kretprobe ---- */")
    for p in probes("fentry"):
        macro = "KFUNC_PROBE" if p.kind == "fentry" else "KRETFUNC_PROBE"
        assert re.search(rf"^{macro}\({p.target},", fentry_half, re.M), p
        assert p.fn == f"{'kfunc' if p.kind == 'fentry' else 'kretfunc'}__{p.target}"
    for p in probes("kprobe"):
        assert re.search(rf"^int {p.fn}\(struct pt_regs \*ctx", kprobe_half, re.M), p
    for mech, ret in (("fentry", "fexit"), ("kprobe", "kretprobe")):
        labels = [p.label for p in probes(mech)]
        for fn in ("xfrm_input", "xfrm_output"):
            assert labels.index(f"{mech}:{fn}") < labels.index(f"{ret}:{fn}")
        assert {p.target for p in probes(mech) if not p.required} == set(ANCHORS)
    assert re.search(rf"^RAW_TRACEPOINT_PROBE\({DROP_TRACEPOINT}\)", src, re.M)
    assert f"raw_tracepoint__{DROP_TRACEPOINT}" == DROP_FN


def test_unknown_mechanism_is_refused():
    with pytest.raises(ValueError, match="mechanism"):
        KprobeSource(0, mechanism="uprobe")


def test_bench_empty_programs_define_every_probe_of_the_product():
    """bench.kprobes --empty must put its no-op programs at the product's points under the
    product's names (the consumer attaches and toggles them through the same Probe table)."""
    from bench.kprobes import empty_program

    for mech in ("fentry", "kprobe"):
        text = empty_program(mech)
        for p in probes(mech):
            if p.kind == "fentry":
                assert f"KFUNC_PROBE({p.target})" in text
            elif p.kind == "fexit":
                assert f"KRETFUNC_PROBE({p.target})" in text
            else:
                assert f"int {p.fn}(struct pt_regs *ctx)" in text
        assert f"RAW_TRACEPOINT_PROBE({DROP_TRACEPOINT})" in text
        assert "KFUNC_PROBE" not in text if mech == "kprobe" else "pt_regs *ctx" not in text


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from([1, 2]), family=st.sampled_from([0, AF_INET, AF_INET6, 7]),
       sa_family=st.sampled_from([0, AF_INET, AF_INET6]), flags=st.integers(0, 3),
       netns=st.sampled_from([0, 4026531840]), spi=st.sampled_from([0, 0x01020304]),
       mode=st.integers(0, 9), ret=st.sampled_from([0, -22, -115, 1]),
       nums=st.lists(st.integers(0, 2**32 - 1), min_size=7, max_size=7),
       addrs=st.lists(st.binary(min_size=16, max_size=16), min_size=4, max_size=4),
       zero_sa_dst=st.booleans())
def test_packet_events_encode_to_the_line_decode_gives(kind, family, sa_family, flags, netns, spi, mode,
                                                       ret, nums, addrs, zero_sa_dst) -> None:
    """The per-packet fast path writes exactly Event.to_json() of the full decode."""
    ifindex, mark, seq, seq_hi, length, encap, l4 = nums
    if zero_sa_dst:
        addrs[3] = bytes(16)
    raw = EVENT.pack(123456789, 0xFFFF888812345678, 0, ret, kind, netns, ifindex, mark, spi, seq, seq_hi,
                     0, length, encap - 2**31, family, 0x0800, l4 & 0xFF, mode, sa_family, flags, *addrs)
    fast = encode_packet_event(raw, 1_700_000_000_000_000_000)
    assert fast is not None and fast.kind == KINDS[kind]
    assert fast.to_json() == decode(raw, 1_700_000_000_000_000_000, {}, None).to_json()


def test_other_kinds_take_the_full_decode() -> None:
    for kind in (3, 4, 5, 6, 7):
        raw = EVENT.pack(1, 2, 3, 0, kind, *[0] * 9, AF_INET, 0, 50, 0, 0, 0, *[bytes(16)] * 4)
        assert encode_packet_event(raw, 0) is None
