"""`ipsec-capture decrypt`: decrypt the ESP in any capture with saved keys, offline, no root.

Works on our own bundles (keys default to the capture's `.esp_sa` companion) and on anyone's
pcap/pcapng; the output is a pcapng Wireshark opens without any key setup, each ESP packet
commented with its SPI, sequence number and result.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ipsec_capture.bundle import Bundle
from ipsec_capture.capture.pcapng import PcapngWriter
from ipsec_capture.errors import UserError

from .decoder import EspDecoder
from .pipeline import DecryptSummary, decrypt_to_writer

PROGRESS_EVERY = 50_000  # packets between progress lines on stderr


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "decrypt",
        help="decrypt ESP in a capture file with saved keys",
        description=(
            "Decrypt the ESP packets of a pcap/pcapng with our own decoder and write a pcapng where "
            "each ESP packet is replaced by what it carried (tunnel: the inner packet; transport: "
            "the packet rebuilt without ESP) and every other packet is kept as it was. Each ESP "
            "packet gets a comment naming its SPI, sequence number and result (ok: decrypted, ICV "
            "verified; ok-unverified: decrypted but nothing checked it, as for an SA without "
            "integrity or a key file without the integrity key; icv-fail, no-sa, bad-padding, "
            "truncated, unsupported); ESP inside ESP is opened layer by layer, each layer named. "
            "A summary per SA follows. Wrong keys show up as icv-fail counts. No root needed."
        ),
        epilog=("KEYS is an esp_sa table (8 or 10 columns: ours from `ipsec-capture keys`/`start`, "
                "Wireshark's, or strongSwan's save-keys esp_sa), saved `ip xfrm state` output, or "
                "tcpdump -E secrets (`SPI@DST ALGO:0xKEY`, comma or line separated, `file NAME`); "
                "the format is detected. Example: ipsec-capture decrypt out.pcapng -w clear.pcapng"),
    )
    p.add_argument("input", metavar="IN", nargs="+",
                   help="capture to read (pcap or pcapng); the parts of a rotated capture (start -C/-G, "
                        "or a quoted glob of them) are read as one and written as one OUT")
    p.add_argument("--keys", metavar="KEYS",
                   help="key file (default: IN's companion .esp_sa, as `start` writes it)")
    p.add_argument("-w", "--write", metavar="OUT", required=True, help="pcapng to write")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("-j", "--jobs", type=int, default=0, metavar="N",
                   help="processes that decrypt (default 0: one per core, up to 4, for files of 32 MiB "
                        "and more; else 1). The output is the same whatever N is")
    p.set_defaults(func=run)


def point_namer(writer: PcapngWriter) -> Callable[..., object]:
    """What gives each capture point its interface (described) before its first packet;
    `new_point(point, False)` only numbers it (its IDB is written in another part of OUT)."""
    interfaces: dict[str, int] = {}

    def new_point(point: str, emit: bool = True) -> None:
        point = point or "decrypt"
        if point not in interfaces:
            interfaces[point] = writer.interface(point, f"{point} (ipsec-capture decrypt)", emit)

    return new_point


def _keys_path(args: argparse.Namespace) -> Path:
    if args.keys:
        return Path(args.keys)
    companion = Bundle.for_capture(args.input).keys
    if not companion.exists():
        raise UserError(f"no --keys given and {companion} does not exist: pass --keys FILE "
                        "(an esp_sa table, `ip xfrm state` output or tcpdump -E secrets)")
    return companion


def _parts(args: argparse.Namespace) -> list[str]:
    """IN as parts: one capture, or the parts of one rotated set (capture/rotate.py)."""
    from ipsec_capture.capture.rotate import expand

    captures = expand(args.input)
    if len(captures) != 1:
        raise UserError(f"decrypt reads one capture (or one rotated set), not {len(captures)}: "
                        "run it once per capture")
    return captures[0]


def _load_keys(args: argparse.Namespace, parts: list[str]) -> list:
    """--keys, or the union of every part's key file (each part's table knows its SAs so far)."""
    from ipsec_capture.xfrm.keyfile import load_sas

    if args.keys or len(parts) == 1:
        return load_sas(_keys_path(args))
    from ipsec_capture.xfrm.keeper import state_id

    sas: dict = {}
    files = [k for k in (Bundle.for_capture(part).keys for part in parts) if k.exists()]
    if not files:
        raise UserError(f"no --keys given and no part of {parts[0]} .. {parts[-1]} has a key file")
    for keys in files:
        for sa in load_sas(keys):
            sas[state_id(sa)] = sa
    return list(sas.values())


def run(args: argparse.Namespace) -> int:
    parts = _parts(args)
    args.input = parts[0]
    for part in parts:
        if not Path(part).is_file():
            raise UserError(f"cannot read {part}: no such file")
        if Path(args.write).resolve() == Path(part).resolve():
            raise UserError("OUT must differ from IN: decrypt writes a new file")
    sas = _load_keys(args, parts)
    if not sas:  # a capture during which no SA existed writes such a table: still a bundle of ours
        print(f"decrypt: {_keys_path(args)} holds no SAs (no keys were known): every ESP packet is "
              "written as it came, counted no-sa", file=sys.stderr)
    from ipsec_capture.capture.pcapread import read_records

    from .parallel import auto_jobs, decrypt_parallel
    if args.jobs < 0:
        raise UserError(f"--jobs {args.jobs}: give a number of processes, or 0 for automatic")
    decoder = EspDecoder(sas)
    summary = DecryptSummary()
    started = time.monotonic()
    jobs = 1 if len(parts) > 1 else args.jobs or auto_jobs(args.input)

    def progress(packets: int, ok: int) -> None:
        rate = packets / max(time.monotonic() - started, 1e-9)
        print(f"decrypt: {packets} packets ({rate:,.0f}/s), ok {ok}", file=sys.stderr, flush=True)

    try:
        if jobs > 1:
            summary = decrypt_parallel(args.input, decoder, args.write, jobs, point_namer,
                                       progress=None if args.quiet else progress, every=PROGRESS_EVERY)
        else:
            def tick(s: DecryptSummary) -> None:
                progress(s.packets, s.totals().get("ok", 0))

            with PcapngWriter(args.write, linktype="raw", names_from_comments=True) as writer:
                # each record is written (or copied by the writer) before the next is read: borrow
                records = (rec for part in parts for rec in read_records(part, borrow=True))
                decrypt_to_writer(records, decoder, summary, writer,
                                  point_namer(writer),
                                  None if args.quiet else tick, PROGRESS_EVERY)
    except OSError as err:
        raise UserError(f"cannot write {args.write}: {err.strerror or err}") from None
    if args.json:
        print(summary.to_json())
    else:
        print(summary.format_text())
    return 0
