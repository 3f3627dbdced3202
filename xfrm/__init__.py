"""The SA database: which IPsec SAs exist, with which keys, as the kernel or a key file says.

Entry points: `sa.SA` (the one SA model: addresses, SPI, algorithms and keys, mode, ESN, marks),
`netlink` (our NETLINK_XFRM socket: dump states/policies), `monitor` (XFRM netlink events: new,
update, delete, expire, acquire), `text` (saved `ip xfrm state` output), `esp_sa` (Wireshark's
ESP key table, 8 or 10 columns, with our `# ipsec-capture-sa` lines; strongSwan's save-keys table),
`tcpdump` (tcpdump's `-E` secrets), `keyfile.load_sas` (any key file, format detected), `keeper`
(keeps a bundle's key file current through rekeys), `verify` (tshark checks a key table),
`cli` (`ipsec-capture keys` and `sa`).
Data path: kernel / text / key file -> SA -> esp_sa (Wireshark) and the decoder's SA list.
May import: ipsec_capture (errors, netns) only.
"""
