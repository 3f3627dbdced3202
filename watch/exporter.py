"""The Prometheus side of `watch`: one custom collector over WatchState in a registry of its own
(never the client's global one, so nothing else in the process leaks into our endpoint), served
by prometheus-client's own HTTP server.

A collector that builds its families at scrape time (rather than Counter objects updated per
event) is what keeps the labels bounded: an SA forgotten by the state is simply absent from the
next scrape, with no `remove()` bookkeeping that could be missed.

Metric names (all `ipsec_capture_*`):
  sa_packets_total / sa_bytes_total {netns,spi,src,dst,direction,algorithm}: the kernel's per-SA
      counters (xfrm_lifetime_cur): packets and bytes the SA accepted (in) or protected (out);
  sa_failed_packets_total {..., cause}: packets lost on this SA, by correlate's cause name;
  sa_installed {...}: 1 while the kernel has the SA, 0 until it is forgotten;
  xfrm_stat_total {netns,counter,cause,direction}: /proc/net/xfrm_stat as the kernel counts it;
  unattributed_failed_packets_total {netns,cause}: drops no SA could be named for;
  sa_lifecycle_total {netns,src,dst,event}: new, rekey, delete, expire-soft, expire-hard;
  incidents_total {netns,cause}; lost_total {netns,what}: our own losses;
  source_up {netns,source}: 1 when the kernel event source is attached;
  ready: 1 once every source is attached (the `ready` line; a readiness probe greps for it);
  recorder_bundles_total, recorder_skipped_total (rate limit), recorder_ring_bytes,
  recorder_ring_packets, recorder_ring_evicted_total, recorder_ring_limit_bytes (with --ring).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ipsec_capture.correlate.causes import cause_for_counter
from ipsec_capture.errors import UserError

from .state import WatchState

PREFIX = "ipsec_capture_"
SA_LABELS = ["netns", "spi", "src", "dst", "direction", "algorithm"]


class WatchCollector(Collector):
    def __init__(self, state: WatchState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        s = self.state
        packets = CounterMetricFamily(PREFIX + "sa_packets", "Packets the SA accepted (in) or "
                                      "protected (out): the kernel's per-SA counter", labels=SA_LABELS)
        nbytes = CounterMetricFamily(PREFIX + "sa_bytes", "Bytes the SA accepted (in) or protected "
                                     "(out): the kernel's per-SA counter", labels=SA_LABELS)
        failed = CounterMetricFamily(PREFIX + "sa_failed_packets", "Packets lost on this SA by "
                                     "cause (replay/icv-fail: the kernel's per-SA stats; no-state: "
                                     "ESP for a missing SA confirmed by XfrmInNoStates)",
                                     labels=[*SA_LABELS, "cause"])
        installed = GaugeMetricFamily(PREFIX + "sa_installed", "1 while the kernel has this SA, 0 "
                                      "once gone (the series is dropped after --forget seconds)",
                                      labels=SA_LABELS)
        xstat = CounterMetricFamily(PREFIX + "xfrm_stat", "/proc/net/xfrm_stat counter of the "
                                    "namespace, with the cause it stands for",
                                    labels=["netns", "counter", "cause", "direction"])
        unattr = CounterMetricFamily(PREFIX + "unattributed_failed_packets", "Drops counted by "
                                     "xfrm_stat that no SA could be named for", labels=["netns", "cause"])
        life = CounterMetricFamily(PREFIX + "sa_lifecycle", "SA lifecycle events from the XFRM "
                                   "monitor", labels=["netns", "src", "dst", "event"])
        incidents = CounterMetricFamily(PREFIX + "incidents", "Incidents started (first drop of a "
                                        "cause on an SA)", labels=["netns", "cause"])
        lost = CounterMetricFamily(PREFIX + "lost", "What watch itself lost (kernel buffers full, "
                                   "NFLOG sequence gaps)", labels=["netns", "what"])
        up = GaugeMetricFamily(PREFIX + "source_up", "1 when the kernel event source is attached",
                               labels=["netns", "source"])
        ready = GaugeMetricFamily(PREFIX + "ready", "1 once every source is attached (the ready line)")
        ready.add_metric([], 1 if s.ready else 0)
        with s.lock:
            for e in s.sas.values():
                labels = list(e.labels())
                if e.installed or e.packets:
                    packets.add_metric(labels, e.packets)
                    nbytes.add_metric(labels, e.bytes)
                installed.add_metric(labels, 1 if e.installed else 0)
                for cause, n in sorted(e.failed.items()):
                    if n or cause != "no-state":
                        failed.add_metric([*labels, cause], n)
            for netns, counters in s.xfrm_stat.items():
                for name, value in sorted(counters.items()):
                    cause, direction = cause_for_counter(name)
                    xstat.add_metric([netns, name, cause, direction], value)
            for (netns, cause), n in s.unattributed.items():
                unattr.add_metric([netns, cause], n)
            for (netns, src, dst, event), n in s.lifecycle.items():
                life.add_metric([netns, src, dst, event], n)
            for (netns, cause), n in s.incidents_total.items():
                incidents.add_metric([netns, cause], n)
            for (netns, what), n in s.lost.items():
                lost.add_metric([netns, what], n)
            for (netns, source), active in s.source_up.items():
                up.add_metric([netns, source], 1 if active else 0)
            rec = dict(s.recorder)
        yield from (packets, nbytes, failed, installed, xstat, unattr, life, incidents, lost, up, ready)
        if rec:
            yield from _recorder_families(rec)


def _recorder_families(rec: dict[str, int]) -> Iterator[Metric]:
    helps = {"bundles": "Incident bundles the flight recorder wrote",
             "skipped": "Incidents that got no bundle (rate limit --min-gap)",
             "ring_evicted": "Packets that left the ring to make room"}
    for key, text in helps.items():
        fam = CounterMetricFamily(PREFIX + "recorder_" + key, text)
        fam.add_metric([], rec.get(key, 0))
        yield fam
    gauges = {"ring_bytes": "Bytes of packets in the ring now", "ring_packets": "Packets in the ring now",
              "ring_limit_bytes": "The ring's bound (--ring)"}
    for key, text in gauges.items():
        g = GaugeMetricFamily(PREFIX + "recorder_" + key, text)
        g.add_metric([], rec.get(key, 0))
        yield g


def parse_listen(text: str) -> tuple[str, int]:
    """`ADDR:PORT`, `[V6]:PORT` or `:PORT` (all addresses) -> (addr, port)."""
    addr, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"--listen {text!r}: give ADDR:PORT, e.g. 127.0.0.1:9477 or :9477")
    addr = addr.strip("[]") or "0.0.0.0"
    return addr, int(port)


def serve(state: WatchState, listen: str) -> tuple[CollectorRegistry, Any, tuple[str, int]]:
    """Register the collector in a fresh registry and listen; returns (registry, server, bound)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WatchCollector(state))
    addr, port = parse_listen(listen)
    try:
        server, _thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as err:
        raise UserError(f"cannot listen on {listen}: {err.strerror} (another exporter on that port? "
                        f"use --listen ADDR:PORT)") from err
    host, bound = server.server_address[:2]
    return registry, server, (str(host), int(bound))
