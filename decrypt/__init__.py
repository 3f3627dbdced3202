"""ESP decryption: captured ESP packets and SAs in, inner packets with a named result out.

Entry points: `decoder.EspDecoder` (one packet: `decrypt()` / `decrypt_into()`, results ok,
ok-unverified, icv-fail, no-sa, bad-padding, truncated, unsupported; ESP inside ESP layer by
layer), `pipeline.decrypt_records` /
`decrypt_to_writer` (a stream of Records, counted per SA), `parallel.decrypt_parallel` (the
same on several cores, byte for byte), `cli` (`ipsec-capture decrypt`).
Data path: pcap/pcapng -> Record -> `capture.esp_header.locate` (SPI, seq, offsets) -> the SA's
transform (`transforms`, on `cryptography`) -> inner packet -> pcapng with a comment per packet.
May import: ipsec_capture (models, errors, bundle, wire), xfrm (the SA model and key files), capture
(the pcap/pcapng reader and writer, ESP location). Nothing imports it but correlate and the CLI.
"""
