"""Kernel event sources: what the kernel did with each packet, as Events.

Entry points: `sources` (the source registry, `--kernel-events auto` picks what this kernel
allows), `kprobes` (bcc programs on xfrm_input/xfrm_output, the audit anchors and kfree_skb;
fentry/fexit or kprobes; `xfrm_probes.c` is their C), `kfree_skb` (the skb:kfree_skb tracepoint
through a tracefs instance of our own), `xfrm_stat` (/proc/net/xfrm_stat deltas), `kallsyms`
(drop locations by symbol), `eventlog` (the `.events.jsonl` writer and reader), `capture_events`
(every source of one capture, started and stopped together), `cli` (`ipsec-capture events`).
Data path: kernel sources -> Event -> events log -> (correlate's) join.
May import: ipsec_capture (models, errors, netns), xfrm (the monitor and SA dump as sources).
"""
