"""ipsec-capture: make Linux IPsec visible, per packet.

This package is thin: the CLI dispatcher (`cli`), the two shared models every room speaks
(`models.Record`: one packet at one capture point; `models.Event`: one kernel fact), the bundle's
file names (`bundle`), `errors.UserError`, `netns` and the one SPI syntax of every command (`spi`).
The rooms are subpackages installed from the repository's top-level folders: capture, rules, xfrm,
decrypt, bpf, correlate, lab. Each room's docstring says what it holds and what it may import; the
data paths are NFLOG -> Record -> pcapng / decrypt / report and kernel sources -> Event -> events
log -> join.
"""

__version__ = "0.1.0"
