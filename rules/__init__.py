"""NFLOG rule sets: the capture points as netfilter rules, installed and removed atomically.

Entry points: `points.POINTS` (the nine named capture points), `manager.build` (a RuleSet for a
backend: `nft` as one table of our own, or `iptables` chains via iptables-restore, legacy or nft
flavour), `guard` (refuse to stack rule sets on a group in use), `owner` (which process owns a
rule set, so `rules cleanup` removes only stale ones), `cli` (`ipsec-capture rules`).
In: a group, points and filters; out: rules in the kernel, and their text for tests and --dry-run.
May import: ipsec_capture (errors, netns); `cli` also bpf.kfree_skb, so `rules cleanup` removes
the tracefs side of a killed capture too.
"""
