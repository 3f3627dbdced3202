"""ipsec-capture: make Linux IPsec visible, per packet.

The import package holds the CLI and the two shared models; the rooms (capture, rules, xfrm,
bpf, correlate) are subpackages installed from the repository's top-level folders.
"""

__version__ = "0.1.0"
