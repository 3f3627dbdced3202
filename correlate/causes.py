"""The named causes: one stable name per reason the kernel did not accept a packet, and the tables
that map every kernel signal (xfrm_stat counter, kfree_skb drop reason, audit anchor, return code)
to one of them.

The names are part of the JSON report's schema: users grep for `no-state`, so a name never
changes meaning. Counter names and meanings: the kernel's Documentation/networking/xfrm_proc.rst.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Cause:
    name: str
    summary: str  # what it means for the user, one line
    hint: str  # what to look at next


CAUSES: dict[str, Cause] = {c.name: c for c in (
    Cause("no-state", "no SA for this SPI/destination (never installed, or deleted)",
          "compare the SPI with `ip xfrm state`; check rekey timing and which side deleted the SA"),
    Cause("icv-fail", "integrity check failed (wrong key, or the packet was altered)",
          "keys differ between the peers (rekey race, wrong PSK-derived keys) or a middlebox changed bytes"),
    Cause("replay", "sequence number outside the replay window or already seen",
          "duplicated or heavily reordered packets; check the replay window size (replay-window)"),
    Cause("policy-block", "a policy with action block discarded the packet",
          "look for `action block` policies (`ip xfrm policy`), e.g. a daemon's drop/shunt policy"),
    Cause("no-policy", "no policy allows the decrypted packet (or it arrived in clear where one is required)",
          "inbound SA fine but policy selector/template does not match: check `ip xfrm policy dir in`"),
    Cause("tmpl-mismatch", "the SA that decrypted the packet does not match the policy's template",
          "policy templates (reqid, mode, addresses) differ from the SA: check reqid on both"),
    Cause("mode-mismatch", "transformation mode error (tunnel/transport, inner family)",
          "the peers disagree on tunnel vs transport mode"),
    Cause("encap-mismatch", "SA options do not match the packet (e.g. UDP encapsulation type)",
          "NAT-T on one side only, or ports differ: check `encap espinudp` on both SAs"),
    Cause("expired", "the SA reached its hard lifetime",
          "rekey did not happen in time: check lifetimes and the IKE daemon's rekey margin"),
    Cause("mtu", "packet too big after encapsulation",
          "lower the MTU/MSS on the tunnel or allow PMTU discovery (ICMP frag-needed)"),
    Cause("mark-mismatch", "the packet's mark did not select the SA/policy that has a mark",
          "compare `mark` on the SA and policy with the marks the route/rules set"),
    Cause("seq-overflow", "outbound sequence number space exhausted",
          "the SA must be rekeyed before 2^32 packets (or enable ESN)"),
    Cause("no-sa-out", "no outbound SA yet: the kernel sent an acquire and dropped/queued the packet",
          "the IKE daemon did not (yet) negotiate the SA: check its log for the acquire"),
    Cause("state-invalid", "the SA is being deleted or is otherwise invalid",
          "a delete raced the traffic: see the SA history"),
    Cause("header-error", "malformed header",
          "truncated or corrupted packets on the path"),
    Cause("no-buffer", "the kernel ran out of buffers",
          "memory pressure on the host"),
    Cause("acquire-error", "state not fully acquired before use",
          "IKE negotiation did not finish"),
    Cause("dir-mismatch", "SA direction mismatch (an output SA used on input or the reverse)",
          "check `dir in/out` of the SAs (kernel >= 6.10)"),
    Cause("policy-error", "policy lookup/bundle error",
          "inspect the policies and routes; see the kernel log"),
    Cause("other", "another xfrm error",
          "see the counter and the drop location in the evidence"),
)}

# xfrm_stat counter -> (cause, direction). Every counter of Documentation/networking/xfrm_proc.rst.
COUNTER_CAUSES: dict[str, tuple[str, str]] = {
    "XfrmInError": ("other", "in"),
    "XfrmInBufferError": ("no-buffer", "in"),
    "XfrmInHdrError": ("header-error", "in"),
    "XfrmInNoStates": ("no-state", "in"),
    "XfrmInStateProtoError": ("icv-fail", "in"),
    "XfrmInStateModeError": ("mode-mismatch", "in"),
    "XfrmInStateSeqError": ("replay", "in"),
    "XfrmInStateExpired": ("expired", "in"),
    "XfrmInStateMismatch": ("encap-mismatch", "in"),
    "XfrmInStateInvalid": ("state-invalid", "in"),
    "XfrmInTmplMismatch": ("tmpl-mismatch", "in"),
    "XfrmInNoPols": ("no-policy", "in"),
    "XfrmInPolBlock": ("policy-block", "in"),
    "XfrmInPolError": ("policy-error", "in"),
    "XfrmAcquireError": ("acquire-error", "out"),
    "XfrmFwdHdrError": ("header-error", "in"),
    "XfrmInStateDirError": ("dir-mismatch", "in"),
    "XfrmInIptfsError": ("other", "in"),
    "XfrmOutError": ("other", "out"),
    "XfrmOutBundleGenError": ("policy-error", "out"),
    "XfrmOutBundleCheckError": ("policy-error", "out"),
    "XfrmOutNoStates": ("no-sa-out", "out"),
    "XfrmOutStateProtoError": ("other", "out"),
    "XfrmOutStateModeError": ("mode-mismatch", "out"),
    "XfrmOutStateSeqError": ("seq-overflow", "out"),
    "XfrmOutStateExpired": ("expired", "out"),
    "XfrmOutPolBlock": ("policy-block", "out"),
    "XfrmOutPolDead": ("policy-error", "out"),
    "XfrmOutPolError": ("policy-error", "out"),
    "XfrmOutStateInvalid": ("state-invalid", "out"),
    "XfrmOutStateDirError": ("dir-mismatch", "out"),
    "XfrmOutNoQueueSpace": ("no-sa-out", "out"),
}

# kprobe anchors (xfrm_audit_state_*), named by bpf/kprobes.py KINDS
ANCHOR_CAUSES: dict[str, str] = {
    "notfound": "no-state",
    "icvfail": "icv-fail",
    "replay": "replay",
    "replay-overflow": "seq-overflow",
}

# skb_drop_reason names (include/net/dropreason-core.h) -> cause
DROP_REASON_CAUSES: dict[str, str] = {
    "XFRM_POLICY": "policy-block",
    "XFRM_NO_POLICY": "no-policy",
    "XFRM_POLICY_BLOCK": "policy-block",
    "PKT_TOO_BIG": "mtu",
    "XFRM_INVALID": "state-invalid",
}

EOVERFLOW = 75  # <asm-generic/errno.h>: xfrm_output on sequence number overflow
EMSGSIZE = 90
EINPROGRESS = 115  # async crypto: not an error


def cause_for_counter(name: str) -> tuple[str, str]:
    """(cause, direction) for an xfrm_stat counter; an unknown (newer) counter is `other`,
    its direction guessed from its name."""
    found = COUNTER_CAUSES.get(name)
    if found is not None:
        return found
    return "other", "out" if name.startswith("XfrmOut") else "in"


def drop_reason_named(reason: str | None) -> bool:
    """Does this kfree_skb reason name a cause by itself (else only its location speaks)?"""
    return bool(reason) and reason in DROP_REASON_CAUSES


# Where the kernel frees packets it received (the inbound xfrm path): such a drop of the skb of a
# packet this host sent is another namespace's (a veth hands the same skb to its peer).
INBOUND_DROP_FUNCS = ("xfrm_input", "xfrm4_rcv", "xfrm6_rcv", "xfrm_rcv", "__xfrm_policy_check",
                      "esp_input", "esp6_input", "xfrm4_udp_encap_rcv", "xfrm6_udp_encap_rcv")


def cause_for_drop(reason: str | None, location: str) -> str:
    """A kfree_skb drop's cause: its reason if it names one, else where it was freed."""
    if drop_reason_named(reason):
        return DROP_REASON_CAUSES[str(reason)]
    if location.startswith("xfrm_input"):
        return "no-state"  # the unnamed drop path of xfrm_input: lookup failed (lab: +0x2de)
    if location.startswith(("xfrm_output", "xfrm4_output", "xfrm6_output")):
        return "other"
    return "other"


# xfrm4_tunnel_check_size / xfrm6_tunnel_check_size: a packet too big for the tunnel once
# encapsulated (IPv4 only with DF) is refused and counted as XfrmOutStateModeError.
MODE_ERROR_TOO_BIG = "XfrmOutStateModeError"
_IP_DF = 0x40  # in the high byte of frag_off
_SMALLEST_TOO_BIG = 256  # no link worth a tunnel has an MTU this small once ESP is added


def too_big_for_tunnel(packet: bytes | memoryview) -> str | None:
    """Why this refused outbound packet is likely an MTU problem, or None. The kernel counts the
    tunnel size check under the mode error counter; a large DF (or any IPv6) packet it refused is
    far more often too big than of the wrong mode."""
    if len(packet) < 20:
        return None
    version = packet[0] >> 4
    length = int.from_bytes(packet[2:4], "big") if version == 4 else len(packet)
    if version == 6 and len(packet) >= 40:
        length = 40 + int.from_bytes(packet[4:6], "big")
    if length < _SMALLEST_TOO_BIG or version not in (4, 6) or (version == 4 and not packet[6] & _IP_DF):
        return None
    df = "DF set, " if version == 4 else ""
    return (f"a {length}-byte IPv{version} packet ({df}refused before encryption): the tunnel size "
            f"check counts packets too big once encapsulated as {MODE_ERROR_TOO_BIG}")


def cause_for_ret(kind: str, ret: int | None) -> str | None:
    """xfrm_output's negative return codes that name a cause (xfrm_input's 0 names nothing)."""
    if ret is None or ret >= 0 or ret == -EINPROGRESS:
        return None
    if kind == "xfrm_output" and ret == -EOVERFLOW:
        return "seq-overflow"
    if ret == -EMSGSIZE:
        return "mtu"
    return "other"
