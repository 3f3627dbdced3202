"""The wire vocabulary: protocol numbers, ports, XFRM modes and time units, defined once.

Every room imports these names from here, so a number cannot drift between two definitions
(start and report once read SPIs differently). Names follow the kernel's headers.
"""

from __future__ import annotations

# <netinet/in.h> IPPROTO_*
IPPROTO_HOPOPTS = 0
IPPROTO_IPIP = 4
IPPROTO_UDP = 17
IPPROTO_IPV6 = 41
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_ESP = 50
IPPROTO_AH = 51
IPPROTO_NONE = 59
IPPROTO_DSTOPTS = 60
IPPROTO_COMP = 108

# RFC 7296 / RFC 3948: IKE's port, the NAT-T port (IKE and ESP-in-UDP), and the 4-byte non-ESP
# marker that precedes IKE on the NAT-T port.
IKE_PORT = 500
NATT_PORT = 4500
NON_ESP_MARKER = b"\x00\x00\x00\x00"

# <linux/xfrm.h> XFRM_MODE_*
XFRM_MODES = {0: "transport", 1: "tunnel", 2: "ro", 3: "in_trigger", 4: "beet"}

# Event and Record times are integer nanoseconds.
SECOND = 1_000_000_000
