"""The IPsec lab: scenarios in network namespaces on any kernel that can do ESP, and the VM.

Entry points: `scenarios` (namespaces, veths and SAs for each scenario), `traffic` (what the
lab sends), `faults` (delete an SA, break a key, replay, block policy ...), `demo` (`./dev.sh
demo`), `vm.LabVM` (Debian's own kernel under QEMU over this machine's root, for hosts whose
kernel lacks ESP or kprobes) with `guest_agent` (the guest's command runner), `udp_encap` (a
NAT-T socket holder), `cli` (`ipsec-capture lab`).
May import: ipsec_capture (errors, netns). The product never imports it.
"""
