"""`ipsec-capture keys` (Wireshark key files) and `ipsec-capture sa` (list SAs and policies)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from ipsec_capture.errors import UserError, require_root

from .esp_sa import (
    columns_for,
    install_profile,
    tshark_args,
    warnings_for,
    write_esp_sa,
    write_private,
)
from .keyfile import load_sas
from .sa import SA, Policy

PROTO_NAMES = {50: "esp", 51: "ah", 108: "comp"}


def register(subparsers: argparse._SubParsersAction) -> None:
    keys = subparsers.add_parser(
        "keys", help="write Wireshark's esp_sa key table from the kernel or from saved text",
        description=(
            "Write the SAs' keys as Wireshark's esp_sa table, so Wireshark decrypts ESP with no "
            "dialog. Keys come from the kernel (XFRM netlink, needs root) or from a file saved "
            "with `ip xfrm state` / a previous esp_sa. The file is created with mode 0600."),
        epilog=("Examples: `ipsec-capture keys -w out.esp_sa`; `ipsec-capture keys --profile ipsec` "
                "then `wireshark -C ipsec -r out.pcapng`; `ipsec-capture keys --from-text "
                "states.txt --tshark-args`; `ipsec-capture keys -w k.esp_sa --verify out.pcapng`."))
    keys.add_argument("--from-text", metavar="FILE",
                      help="read SAs from a key file instead of the kernel: saved `ip [-s] xfrm state` "
                           "output, an esp_sa table (ours, Wireshark's, strongSwan save-keys') or "
                           "tcpdump -E secrets; the format is detected")
    keys.add_argument("--netns", metavar="NAME", help="read the SAs of this network namespace")
    keys.add_argument("-w", "--write", metavar="OUT", help="write the esp_sa table to OUT (mode 0600)")
    keys.add_argument("--wireshark-format", default="auto", choices=("8", "10", "auto"),
                      help="8 columns (Wireshark 4.0/4.1), 10 (>= 4.2: SN, ESN high bits) or auto "
                           "(ask the installed tshark; default)")
    keys.add_argument("--wildcard", default="auto", choices=("auto", "all", "none"),
                      help="write `*` addresses for NAT-T SAs (auto), for all SAs, or never")
    keys.add_argument("--profile", metavar="NAME",
                      help="install the table into Wireshark profile NAME and enable ESP decryption "
                           "there (use with `wireshark -C NAME`)")
    keys.add_argument("--tshark-args", action="store_true",
                      help="print `-o uat:esp_sa:...` arguments for tshark/wireshark (contains keys)")
    keys.add_argument("--verify", metavar="CAPTURE",
                      help="run tshark on CAPTURE with the table and report, per SPI, how many ESP "
                           "packets decrypt with a good ICV")
    keys.set_defaults(func=cmd_keys)

    sa = subparsers.add_parser(
        "sa", help="list the kernel's SAs and policies (keys hidden)",
        description="List IPsec SAs and policies readably or as JSON. Keys are hidden unless "
                    "--show-keys is given.")
    sa.add_argument("--netns", metavar="NAME", help="list the namespace NAME")
    sa.add_argument("--from-text", metavar="FILE",
                    help="list SAs from a key file (`ip xfrm state` output, esp_sa, tcpdump -E secrets)")
    sa.add_argument("--json", action="store_true", help="JSON: {\"states\": [...], \"policies\": [...]}")
    sa.add_argument("--show-keys", action="store_true", help="include keys (careful: they decrypt traffic)")
    sa.add_argument("--no-policies", action="store_true", help="only SAs")
    sa.set_defaults(func=cmd_sa)


def _sas(args: argparse.Namespace) -> list[SA]:
    if args.from_text:
        return load_sas(args.from_text)
    require_root("reading SAs with keys from the kernel")
    from .netlink import dump_states

    return dump_states(args.netns)


def cmd_keys(args: argparse.Namespace) -> int:
    if not (args.write or args.profile or args.tshark_args or args.verify):
        raise UserError("say where the keys go: -w OUT.esp_sa, --profile NAME, --tshark-args or "
                        "--verify CAPTURE")
    columns = columns_for(args.wireshark_format)
    sas = _sas(args)
    esp = [s for s in sas if s.proto == 50]
    for line in warnings_for(esp, columns):
        print(f"ipsec-capture: warning: {line}", file=sys.stderr)
    text = write_esp_sa(esp, columns, args.wildcard)
    if args.write:
        write_private(args.write, text)
        print(f"wrote {len(esp)} ESP SAs ({columns} columns) to {args.write}", file=sys.stderr)
    if args.profile:
        pdir = install_profile(args.profile, text)
        print(f"installed into Wireshark profile {args.profile} ({pdir}); open captures with "
              f"`wireshark -C {args.profile} -r FILE`", file=sys.stderr)
    if args.tshark_args:
        print(" ".join(shlex.quote(a) for a in tshark_args(esp, columns, args.wildcard)))
    if args.verify:
        from .verify import format_results, verify_capture

        results = verify_capture(args.verify, esp, columns)
        print(format_results(results))
        if results and not any(r.icv_good for r in results.values()):
            return 1
    if not esp:
        print("ipsec-capture: warning: no ESP SAs found", file=sys.stderr)
    return 0


def _alg_text(name: str, alg: Any, show_keys: bool) -> str:
    bits = f"/{alg.icv_bits}" if alg.icv_bits else (f"/{alg.trunc_bits}" if alg.trunc_bits else "")
    key = f" 0x{alg.key.hex()}" if show_keys and alg.key else f" ({alg.key_bits}-bit key)"
    return f"{name} {alg.name}{bits}{key}"


def format_sa(sa: SA, show_keys: bool = False) -> str:
    proto = PROTO_NAMES.get(sa.proto, str(sa.proto))
    head = f"{proto} spi 0x{sa.spi:08x} {sa.src} -> {sa.dst} {sa.mode} reqid {sa.reqid}"
    if sa.direction:
        head += f" dir {sa.direction}"
    parts = []
    for label in ("aead", "enc", "auth", "comp"):
        alg = getattr(sa, label)
        if alg is not None:
            parts.append(_alg_text(label, alg, show_keys))
    r = sa.replay
    replay = f"replay window {r.window} seq {r.seq} oseq {r.oseq}"
    if sa.esn:
        replay += f" esn seq-hi {r.seq_hi} oseq-hi {r.oseq_hi}"
    parts.append(replay)
    if sa.encap:
        parts.append(f"natt udp {sa.encap.sport}->{sa.encap.dport}")
    for label, value in (("mark", sa.mark), ("output-mark", sa.output_mark)):
        if value is not None:
            parts.append(f"{label} 0x{value[0]:x}/0x{value[1]:x}")
    if sa.if_id is not None:
        parts.append(f"if_id {sa.if_id}")
    if sa.selector:
        parts.append(f"sel {sa.selector.src} -> {sa.selector.dst}")
    if sa.lifetime_cur.get("packets") or sa.lifetime_cur.get("bytes"):
        parts.append(f"{sa.lifetime_cur.get('packets', 0)} pkts {sa.lifetime_cur.get('bytes', 0)} bytes")
    if sa.flags:
        parts.append("flags " + ",".join(sa.flags))
    return head + "\n    " + "\n    ".join(parts)


def format_policy(pol: Policy) -> str:
    s = pol.selector
    head = f"policy {pol.direction} {s.src} -> {s.dst}"
    if s.proto:
        head += f" proto {s.proto}"
    head += f" {pol.action} priority {pol.priority}"
    if pol.mark is not None:
        head += f" mark 0x{pol.mark[0]:x}/0x{pol.mark[1]:x}"
    if pol.if_id is not None:
        head += f" if_id {pol.if_id}"
    lines = [head]
    for t in pol.templates:
        proto = PROTO_NAMES.get(t.proto, str(t.proto))
        spi = f" spi 0x{t.spi:08x}" if t.spi else ""
        lines.append(f"    tmpl {proto}{spi} {t.src} -> {t.dst} {t.mode} reqid {t.reqid} {t.level}")
    return "\n".join(lines)


def cmd_sa(args: argparse.Namespace) -> int:
    sas = _sas(args)
    policies: list[Policy] = []
    if not args.from_text and not args.no_policies:
        from .netlink import dump_policies

        policies = dump_policies(args.netns)
    if args.json:
        doc = {"states": [s.to_dict(keys=args.show_keys) for s in sas],
               "policies": [p.to_dict() for p in policies]}
        json.dump(doc, sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    for sa in sas:
        print(format_sa(sa, args.show_keys))
    for pol in policies:
        print(format_policy(pol))
    if not sas and not policies:
        print("no SAs or policies", file=sys.stderr)
    return 0
