"""Always-on watching: a service that keeps the kernel event sources and counters running,
exports them as Prometheus metrics per SA and cause, prints one JSON line per incident, and (with
--ring) keeps a flight recorder that writes a normal bundle around each incident.

Entry points: `service` (`Watch`: sources, SA dumps, the ESP tap, signals, the `ready` line),
`state` (`WatchState`: per-SA numbers, cause attribution, lifecycle, incidents; no I/O),
`exporter` (the prometheus-client collector in a registry of its own, and its HTTP server),
`recorder` (the flight recorder: a bounded ring of packets per capture point, bundles on
incidents), `cli` (`ipsec-capture watch`).
Data path: kernel sources -> Event, SA dumps -> SA, NFLOG -> Record; -> WatchState -> /metrics and
incident lines on stdout; Records -> ring -> bundle (pcapng, events log, esp_sa) on an incident.
May import: ipsec_capture (models, errors, netns, bundle), bpf (sources, events log), xfrm (SA
dumps, monitor, key files), capture (NFLOG reader, pcapng writer), rules (the NFLOG rules),
correlate (cause names only), decrypt (ESP header location). Nothing imports it but the CLI.
"""
