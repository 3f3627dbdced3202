"""The CO-RE object on this host: built from its source, shipped, loaded by our libbpf binding.

This host's kernel has BTF but no kprobes and refuses tracing programs, so what loads here is
the object's skb:kfree_skb tracepoint program; the per-packet probes are proven in the lab VM on
6.1 and 6.12 (tests/lab/test_lab_bpf.py). Here: the object is its source's build, it runs with
no compiler on PATH, its kernel-side filters (namespace as data, drop reasons named from BTF,
drop locations) keep everything else in the kernel, and it keeps reading after root is dropped.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipsec_capture.bpf import build, libbpf
from ipsec_capture.bpf.core import OBJECT, CoreSource, core_probes, drop_ranges, reason_names
from ipsec_capture.bpf.eventlog import clock_offsets
from ipsec_capture.bpf.kallsyms import Kallsyms
from ipsec_capture.bpf.kfree_skb import EVENT_DIR, Tracefs
from ipsec_capture.bpf.kfree_skb import reason_names as tracefs_reason_names
from ipsec_capture.bpf.kprobes import PROGRAM
from ipsec_capture.bpf.probe_event import EVENT, KINDS
from ipsec_capture.models import EncodedEvent, Event
from ipsec_capture.netns import netns_inode
from tests.conftest import requires_root
from tests.support.bundles import send_udp

CORE_C = build.SOURCE
C_TO_STRUCT = {"u64": "Q", "s64": "q", "u32": "I", "s32": "i", "u16": "H", "u8": "B"}
TOOLCHAIN = re.compile(r"^(clang|llc|llvm|opt|bpftool|cc|gcc|ld)")


def _struct_fields(src: str) -> list[tuple[str, str, str]]:
    body = re.search(r"struct ipsec_event \{(.*?)\n\};", src, re.S).group(1)
    return re.findall(r"^\s*(\w+)\s+(\w+)(?:\[(\d+)\])?;", body, re.M)


def test_both_programs_and_the_python_mirror_share_one_event_shape():
    core, bcc = _struct_fields(CORE_C.read_text()), _struct_fields(PROGRAM.read_text())
    assert core == bcc
    assert "<" + "".join(f"{n}s" if n else C_TO_STRUCT[t] for t, _, n in core) == EVENT.format
    kinds = dict(re.findall(r"K_(\w+) = (\d+),", CORE_C.read_text()))
    assert {int(v): k.lower() for k, v in kinds.items()} == {n: k.replace("-", "_") for n, k in KINDS.items()}


def test_the_object_defines_the_programs_the_loader_attaches():
    """Opened (no root, nothing loaded): both program sets and the tracepoint, each in the
    section libbpf attaches by (fentry/xfrm_input ...), as core_probes names them."""
    obj = libbpf.BpfObject(OBJECT)
    try:
        sections = {name: prog.section for name, prog in obj.programs.items()}
        for mech in ("fentry", "kprobe"):
            for p in core_probes(mech):
                assert sections.pop(p.fn) == f"{p.kind}/{p.target}", p
        assert sections == {"kfree_skb": "raw_tp/kfree_skb"}
        assert set(obj.btf.section_vars(".rodata")) == {"all_netns", "keep_all_drops", "nr_ranges",
                                                        "wakeup_bytes"}
        for name in ("events", "netns_filter", "drop_reasons", "drop_ranges", ".bss"):
            obj.map(name)
    finally:
        obj.close()


def test_the_shipped_object_is_its_sources_build():
    """The manifest dev.sh wrote names this source, and a rebuild from the same BTF gives the
    same bytes (the object depends on no build path: DWARF dropped, source compiled by name)."""
    manifest = build.Manifest.load()
    assert manifest.source_sha256 == build.sha256(CORE_C), "xfrm_probes.bpf.c changed: run ./dev.sh setup"
    assert manifest.object_sha256 == build.sha256(OBJECT)
    assert manifest.clang.startswith("Debian clang version 14") and "-target" in manifest.cflags
    assert build.check() == []


def test_vmlinux_h_is_generated_not_committed():
    tracked = subprocess.run(["git", "ls-files", "bpf"], capture_output=True, text=True,
                             cwd=CORE_C.parents[1]).stdout.split()
    assert "bpf/xfrm_probes.bpf.c" in tracked
    assert not [f for f in tracked if f.endswith(("vmlinux.h", ".o"))], tracked


def _path_without_toolchain(tmp: Path) -> str:
    """A PATH with every tool of this machine but a compiler, linker, llvm or bpftool."""
    out = tmp / "bin"
    out.mkdir()
    for d in os.environ.get("PATH", "").split(":"):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if not TOOLCHAIN.match(name) and not (out / name).exists():
                (out / name).symlink_to(os.path.join(d, name))
    return str(out)


@requires_root
def test_the_product_runs_without_clang_or_kernel_headers(tmp_path):
    path = _path_without_toolchain(tmp_path)
    env = {**os.environ, "PATH": path}
    assert shutil.which("clang", path=path) is None and shutil.which("bpftool", path=path) is None
    assert not os.path.isdir(f"/lib/modules/{os.uname().release}/build")  # no headers on this host either
    r = subprocess.run([sys.executable, "-m", "ipsec_capture", "sources", "--json"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = {s["name"]: s for s in json.loads(r.stdout)["sources"]}
    assert got["tracepoint"]["active"] and got["tracepoint"]["via"] == "core", got
    out = tmp_path / "e.events.jsonl"
    r = subprocess.run([sys.executable, "-m", "ipsec_capture", "events", "-w", str(out), "--duration", "0.5"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "tracepoint on (CO-RE tracepoint" in r.stderr, r.stderr
    header = json.loads(out.read_text().splitlines()[0])
    assert {s["name"]: s.get("via") for s in header["sources"] if s["active"]}["tracepoint"] == "core"


@requires_root
def test_sources_says_what_this_host_allows():
    r = subprocess.run([sys.executable, "-m", "ipsec_capture", "sources"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    assert "each source was attached and detached again" in r.stdout.splitlines()[0]
    if not os.path.isdir("/sys/bus/event_source/devices/kprobe"):
        kprobe = lines["kprobe"]
        assert " off " in kprobe and "CO-RE: fentry:" in kprobe and "bcc:" in kprobe
    assert "via core" in lines["tracepoint"] or "via core" in lines["kprobe"]


@requires_root
def test_drop_reasons_are_named_from_btf_as_the_tracepoint_names_them():
    with libbpf.Btf.vmlinux() as btf:
        from_btf = reason_names(btf)
    tracefs = Tracefs()
    try:
        from_format = tracefs_reason_names(tracefs.read(os.path.join(EVENT_DIR, "format")))
    finally:
        tracefs.close()
    # every name the tracepoint prints, with the number this kernel gives it
    assert "NOT_SPECIFIED" in from_btf.values() and "XFRM_POLICY" in from_btf.values()
    assert from_format and from_format.items() <= from_btf.items()


@requires_root
def test_drop_ranges_cover_xfrm_code_and_not_the_rest():
    ksyms = Kallsyms()
    ranges = drop_ranges(ksyms)
    inside = [lambda a, r=r: r[0] <= a < r[1] for r in ranges]

    def covered(name: str) -> bool:
        addr = ksyms.address(name)
        assert addr is not None, name
        return any(f(addr) for f in inside)

    assert covered("xfrm_input") and covered("xfrm_lookup")
    assert not covered("__udp4_lib_rcv") and not covered("tcp_v4_rcv")
    assert all(a < b for a, b in ranges) and all(r1[1] <= r2[0] for r1, r2 in itertools.pairwise(ranges))
    few = drop_ranges(ksyms, limit=10)  # merged, still covering everything
    assert len(few) <= 10 and all(any(s <= a and b <= e for s, e in few) for a, b in ranges)


def _core(netns: list[int] | None, keep_all: bool = False) -> tuple[CoreSource, list[Event | EncodedEvent]]:
    src = CoreSource(clock_offsets()["wall_minus_mono_ns"], netns=netns, keep_all_drops=keep_all,
                     mechanism="none")
    got: list[Event | EncodedEvent] = []
    src.start(got.append)
    return src, got


def _block_icmp(p, host: str, src: str, dst: str) -> None:
    """An inbound block policy for ICMP: its drops have reason XFRM_POLICY."""
    p.run(host, "ip", "xfrm", "policy", "add", "src", src, "dst", dst, "proto", "icmp", "dir", "in",
          "action", "block")


def _settle(src: CoreSource) -> None:
    time.sleep(0.3)
    src.poll()


@requires_root
def test_only_ipsec_drops_of_the_namespace_leave_the_kernel(netns_pair):
    """b blocks ICMP from a by policy (XFRM_POLICY drops) and has no socket on UDP 9 (NO_SOCKET:
    background); a blocks ICMP from b. Watching b: only b's policy drops come out; the closed
    port's drops and a's are counted in the kernel and go no further."""
    p = netns_pair
    ino_a, ino_b = netns_inode(p.a), netns_inode(p.b)
    _block_icmp(p, "b", p.a4, p.b4)
    _block_icmp(p, "a", p.b4, p.a4)
    src, got = _core([ino_b])
    try:
        assert src.name == "kfree_skb" and src.attached == ["raw_tracepoint:kfree_skb"]
        send_udp(p, "a", p.b4, 30)
        p.run("a", "ping", "-c", "3", "-i", "0.2", "-W", "1", p.b4, check=False)
        p.run("b", "ping", "-c", "3", "-i", "0.2", "-W", "1", p.a4, check=False)
        _settle(src)
    finally:
        src.stop()
    events = [Event.from_dict(json.loads(e.to_json())) for e in got]
    assert len(events) == 3 and src.drops_sent == 3, events
    assert all(e.source == "kfree_skb" and e.reason == "XFRM_POLICY" and e.netns == ino_b for e in events)
    assert all(e.detail["via"] == "bpf" and "+0x" in e.detail["location"] for e in events)  # symbolized
    assert src.drops_seen - src.drops_sent >= 30 + 3  # the closed port's and a's: stopped in the kernel
    assert ino_a not in {e.netns for e in events}


@requires_root
def test_one_loaded_object_serves_the_namespaces_it_is_given(netns_pair):
    """keep_all_drops: every drop reason, still only of the namespaces in the map; add_netns
    and remove_netns change that while the object stays loaded (what `watch` needs)."""
    p = netns_pair
    ino_a, ino_b = netns_inode(p.a), netns_inode(p.b)
    src, got = _core([ino_b], keep_all=True)

    def closed_port() -> list[int | None]:  # the namespaces of the NO_SOCKET drops so far
        return [e.netns for e in (Event.from_dict(json.loads(x.to_json())) for x in got)
                if e.reason == "NO_SOCKET"]

    try:
        send_udp(p, "a", p.b4, 5)  # dropped in b
        send_udp(p, "b", p.a4, 5)  # dropped in a: not watched yet
        _settle(src)
        first = closed_port()
        src.add_netns(ino_a)
        send_udp(p, "b", p.a4, 4)
        _settle(src)
        second = closed_port()
        src.remove_netns(ino_b)
        send_udp(p, "a", p.b4, 6)  # b no longer watched
        send_udp(p, "b", p.a4, 2)
        _settle(src)
        third = closed_port()
    finally:
        src.stop()
    assert first == [ino_b] * 5
    assert second == first + [ino_a] * 4
    assert third == second + [ino_a] * 2
    assert src.netns == [ino_a]


_DROP_ROOT = """
import json, os, sys
from ipsec_capture.bpf.core import CoreSource
from ipsec_capture.netns import netns_inode
src = CoreSource(0, netns=[netns_inode(sys.argv[1])], mechanism="none")
got = []
src.start(got.append)
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
print("dropped", flush=True)
sys.stdin.readline()
import time; time.sleep(0.3); src.poll(); src.stop()
print(json.dumps({"uid": os.getuid(), "reasons": [json.loads(e.to_json()).get("reason") for e in got],
                  "sent": src.drops_sent}))
"""


@requires_root
def test_the_ring_buffer_keeps_working_after_root_is_dropped(netns_pair):
    """`start` drops root once its probes are attached: reading the ring buffer, the kernel's
    counters (mapped memory) and detaching need no privilege."""
    p = netns_pair
    _block_icmp(p, "b", p.a4, p.b4)
    proc = subprocess.Popen([sys.executable, "-c", _DROP_ROOT, p.b], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "dropped", proc.stderr.read()
        p.run("a", "ping", "-c", "2", "-i", "0.2", "-W", "1", p.b4, check=False)
        out, err = proc.communicate("go\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result == {"uid": 65534, "reasons": ["XFRM_POLICY", "XFRM_POLICY"], "sent": 2}


def test_unknown_mechanism_is_refused():
    with pytest.raises(ValueError, match="mechanism"):
        CoreSource(0, mechanism="uprobe")
