"""Correlation and reports: Records, Events and SA history joined into per-packet verdicts.

Entry points: `bundle` (open a capture's pcapng, events log and key file as one input), `join`
(the streaming join: the merge by time and the (SPI, seq) index, with its parts `clearmatch`
(ESP to its cleartext), `skbs` (drops to packets by skb address) and `attribution` (counter
deltas to the packets they explain)), `diagnosis` and `causes` (a named cause with evidence and
advice for each failure), `sahistory` (which SA existed when), `summary` (per-SA and per-cause totals), `peer`
(two bundles joined by SPI and seq), `report_text` / `report_json` / `report_html` (the outputs),
`api` (the Python API; `scapy_view` hands a packet to scapy, an optional extra), `cli`
(`ipsec-capture report`).
Data path: pcapng -> Record, events log -> Event, key file -> SA; join -> verdicts -> report.
May import: ipsec_capture, capture (readers, ESP location), rules (the capture points' roles),
bpf (the events log), xfrm (SAs), decrypt (decryption). Nothing imports it but the CLI.
"""
