"""Packet capture: NFLOG messages from the kernel to Records, Records to pcapng, live status.

Entry points: `start.run_start` (the `Capture` loop) behind `ipsec-capture start` (rules in, sockets
open, sources attached, `ready`, capture until a signal, summary), `nflog.NflogReader` (the
NETLINK_NETFILTER socket), `nflog_tlv` (NFLOG TLVs -> Record, one learned shape per message layout),
`pcapng` (our block writer, one interface per capture point, a comment per packet), `pcapread`
(anyone's pcap/pcapng -> Records), `filters` (the user-space --host/--spi filter), `status` (the
live line).
Data path: nflog socket -> Record -> pcapng (and, through the bundle, decrypt and report).
May import: ipsec_capture (models, errors, bundle, netns); rules (to install the capture points),
bpf (the kernel event sources) and xfrm (the key keeper), lazily, from `start` and `cli` only.
"""
