"""The IPsec lab: scenarios in network namespaces on any kernel that can do ESP, and the VM.

Entry points: `scenarios` (namespaces, veths and SAs for each scenario), `daemons` (labs keyed
by real IKEv2: the children, the daemon life cycle) with `strongswan` (charon + swanctl) and
`libreswan` (pluto from its unpacked package), `cilium` (three nodes laid out as Cilium's agent
lays out states, policies and marks), `traffic` (what the lab sends), `faults` (delete an SA,
break a key, replay, block policy, the daemon's rekey, a peer restart ...), `demo` (`./dev.sh
demo`), `vm.LabVM` (Debian's own kernel under QEMU over this machine's root, for hosts whose
kernel lacks ESP or kprobes) with `guest_agent` (the guest's command runner), `udp_encap` (a
NAT-T socket holder), `cli` (`ipsec-capture lab`).
May import: ipsec_capture (errors, netns), xfrm.sa / xfrm.text (a daemon lab reads back the SAs
the daemons installed). The product never imports it.
"""
