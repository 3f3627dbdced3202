"""The BPF event struct and its Python mirror, tested together (no kernel needed), and the
decoder's traps: SPI byte order, ret kept as the kernel gave it, drops named by this kernel."""

from __future__ import annotations

import re
import socket

import pytest
from ipsec_capture.bpf.kprobes import (
    ANCHORS,
    DROP_FN,
    DROP_TRACEPOINT,
    EVENT,
    KINDS,
    PROGRAM,
    KprobeSource,
    decode,
    probes,
)

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
