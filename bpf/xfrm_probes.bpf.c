// SPDX-License-Identifier: (MIT OR GPL-2.0)
/* ipsec-capture kernel probes, CO-RE: compiled once (clang -target bpf against a vmlinux.h that
 * bpftool made from BTF; bpf/build.py), shipped as xfrm_probes.bpf.o, loaded by libbpf (core.py),
 * which relocates every BPF_CORE_READ to the running kernel's layout. The same probes as the bcc
 * program xfrm_probes.c, with the same event shape: struct ipsec_event below is mirrored by
 * probe_event.EVENT (keep the three in the same order; tests/test_bpf_core.py checks it).
 *
 * xfrm_input  entry+return: skb is the outer ESP packet, SPI and seq read from the ESP header
 *             (the spi argument is 0 on the normal path). ret 0 is NOT "accepted": xfrm_input also
 *             returns 0 on its own drop path and when crypto goes async.
 * xfrm_output entry+return: skb is the inner packet, the SA is skb_dst(skb)->xfrm; the
 *             sequence number is the SA's oseq after the call. -EINPROGRESS is async, not an error.
 * xfrm_audit_state_*: anchors that name a cause (called whether auditing is on or not).
 * skb:kfree_skb (raw tracepoint: no trace record is built): drops, filtered here (see want_drop).
 *
 * Two program sets in one object: fentry/fexit (BPF trampolines) and kprobe/kretprobe; the loader
 * turns autoload off for the set it does not use (and for anchors this kernel lacks). Both
 * bodies are the same functions below: every kernel read is a CO-RE read.
 *
 * Entry and return pair by the frame of the call (softirq: the pid is whoever ran): the stack
 * pointer at a kprobe's entry (the kretprobe sees it one slot higher), or under fentry the
 * trampoline's frame, which its fentry and fexit programs both get as ctx.
 *   xfrm_input  always runs in softirq / with BH disabled (no preemption, no migration), so its
 *               calls nest strictly on a CPU: a per-CPU stack of slots, no hash map.
 *   xfrm_output may run in process context and be preempted (and migrated) in the middle: a
 *               hash keyed by the frame.
 *
 * Filters, all data set by the loader, so one object serves every namespace and kernel:
 *   netns_filter  the namespaces whose events leave the kernel (a map: `watch` adds and removes
 *                 namespaces while loaded); all_netns turns it off.
 *   drop_reasons  per skb_drop_reason number (this kernel's numbering, from its BTF), 1 = report;
 *   drop_ranges   sorted [start, end) text ranges of the functions whose drops we report
 *                 (xfrm_input's no-state drop is NOT_SPECIFIED: only its location tells).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "Dual MIT/GPL";

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_ESP 50
#define XFRM_STATE_ESN 128
#define SKB_DST_PTRMASK ~1UL

enum {
    K_XFRM_INPUT = 1,
    K_XFRM_OUTPUT = 2,
    K_NOTFOUND = 3,
    K_ICVFAIL = 4,
    K_REPLAY = 5,
    K_REPLAY_OVERFLOW = 6,
    K_DROP = 7,
};

#define F_RESUMED 1   /* xfrm_input called again after async crypto (encap_type -1) */
#define F_ESN 2       /* seq_hi is meaningful */

struct ipsec_event {
    u64 ts;            /* bpf_ktime_get_ns: CLOCK_MONOTONIC */
    u64 skb;
    u64 location;      /* kfree_skb caller */
    s64 ret;
    u32 kind;
    u32 netns;         /* net->ns.inum */
    u32 ifindex;
    u32 mark;
    u32 spi;           /* network byte order */
    u32 seq;           /* host byte order */
    u32 seq_hi;
    u32 reason;        /* enum skb_drop_reason */
    u32 len;
    s32 encap;         /* xfrm_input encap_type */
    u16 family;        /* of the packet header below */
    u16 protocol;      /* skb->protocol (ETH_P_*), host byte order */
    u8 l4proto;        /* the packet header's protocol / next header */
    u8 mode;           /* XFRM_MODE_* of the SA */
    u8 sa_family;
    u8 flags;
    u8 saddr[16];      /* the skb's IP header: outer on input, inner on output */
    u8 daddr[16];
    u8 sa_saddr[16];   /* the SA's addresses (outer tunnel/transport endpoints) */
    u8 sa_daddr[16];
};

/* set before load (libbpf rodata) */
const volatile u32 all_netns = 0;        /* 1: no namespace filter */
const volatile u32 keep_all_drops = 0;   /* 1: every kfree_skb (--all-drops) */
const volatile u32 nr_ranges = 0;        /* entries used in drop_ranges */
const volatile u64 wakeup_bytes = 32 * sizeof(struct ipsec_event);

#define MAX_RANGES 1024   /* a power of two: the search below takes log2 steps */
#define RANGE_STEPS 11
#define MAX_REASONS 1024

struct text_range {
    u64 start;
    u64 end;
};

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 1 << 21);
} events SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 4096);
    __type(key, u32);
    __type(value, u8);
} netns_filter SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, MAX_REASONS);
    __type(key, u32);
    __type(value, u8);
} drop_reasons SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, MAX_RANGES);
    __type(key, u32);
    __type(value, struct text_range);
} drop_ranges SEC(".maps");

/* Per CPU, one cache line each: [0] events the ring buffer had no room for, [1] drops seen,
   [2] drops sent. A global in .bss, which libbpf maps into the loader's memory: read without a
   syscall, also after the capture has dropped root. */
#define MAX_CPUS 256
#define C_LOST 0
#define C_DROPS_SEEN 1
#define C_DROPS_SENT 2
u64 counters[MAX_CPUS][8] = {};

#define IN_DEPTH 4   /* xfrm_input nests only for ESP in ESP; more are orphans (see in_push) */
struct in_slot {
    u64 frame;
    u64 keep;        /* 0: another namespace's packet, popped without a word */
    struct ipsec_event e;
};
struct in_stack {
    u64 depth;
    struct in_slot slot[IN_DEPTH];
};
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, u32);
    __type(value, struct in_stack);
} in_flight SEC(".maps");

struct out_call {
    struct ipsec_event e;
    u64 x;           /* the SA: its oseq is read at return */
    u32 esn;         /* XFRM_STATE_ESN set on it */
};
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 4096);
    __type(key, u64);
    __type(value, struct out_call);
} out_flight SEC(".maps");

static __always_inline void count(u32 which)
{
    u32 cpu = bpf_get_smp_processor_id() & (MAX_CPUS - 1);
    __sync_fetch_and_add(&counters[cpu][which & 7], 1);
}

/* Wake the reader only once WAKEUP bytes wait (it also looks every POLL_MS): a wake-up per
   event would cost an irq_work and a cross-CPU wake-up per packet. */
static __always_inline void submit(struct ipsec_event *e)
{
    u64 flags = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) + sizeof(*e) >= wakeup_bytes
        ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
    e->ts = bpf_ktime_get_ns();
    if (bpf_ringbuf_output(&events, e, sizeof(*e), flags) != 0)
        count(C_LOST);
}

static __always_inline int wanted(u32 netns)
{
    return all_netns || (netns && bpf_map_lookup_elem(&netns_filter, &netns));
}

/* the device's namespace and index */
static __always_inline void read_dev(struct ipsec_event *e, struct net_device *dev)
{
    if (!dev)
        return;
    e->ifindex = BPF_CORE_READ(dev, ifindex);
    e->netns = BPF_CORE_READ(dev, nd_net.net, ns.inum);
}

/* the skb's IP header (outer on input, inner on output), one read for either family */
static __always_inline void read_l3(struct ipsec_event *e, struct sk_buff *skb)
{
    union {
        u8 b[sizeof(struct ipv6hdr)];
        struct iphdr ip;
        struct ipv6hdr ip6;
    } h;
    unsigned char *head = BPF_CORE_READ(skb, head);
    u16 nh = BPF_CORE_READ(skb, network_header);
    if (!head || nh == (u16)~0U)
        return;
    if (bpf_probe_read_kernel(&h, sizeof(h), head + nh) != 0)
        return;
    if ((h.b[0] >> 4) == 4) {
        e->family = AF_INET;
        e->l4proto = h.ip.protocol;
        __builtin_memcpy(e->saddr, &h.ip.saddr, 4);
        __builtin_memcpy(e->daddr, &h.ip.daddr, 4);
    } else if ((h.b[0] >> 4) == 6) {
        e->family = AF_INET6;
        e->l4proto = h.ip6.nexthdr;
        __builtin_memcpy(e->saddr, &h.ip6.saddr, 16);
        __builtin_memcpy(e->daddr, &h.ip6.daddr, 16);
    }
}

static __always_inline void read_skb_fields(struct ipsec_event *e, struct sk_buff *skb)
{
    e->len = BPF_CORE_READ(skb, len);
    e->mark = BPF_CORE_READ(skb, mark);
    e->protocol = bpf_ntohs(BPF_CORE_READ(skb, protocol));
    read_dev(e, BPF_CORE_READ(skb, dev));
}

/* the SA's addresses, mode, family and namespace; returns props.flags */
static __always_inline u32 read_state(struct ipsec_event *e, struct xfrm_state *x)
{
    e->spi = BPF_CORE_READ(x, id.spi);
    bpf_core_read(e->sa_daddr, sizeof(e->sa_daddr), &x->id.daddr);
    bpf_core_read(e->sa_saddr, sizeof(e->sa_saddr), &x->props.saddr);
    e->mode = BPF_CORE_READ(x, props.mode);
    e->sa_family = BPF_CORE_READ(x, props.family);
    u32 netns = BPF_CORE_READ(x, xs_net.net, ns.inum);
    if (netns)
        e->netns = netns;
    return BPF_CORE_READ(x, props.flags);
}

/* the sequence number last given out on this SA (ESN and big windows keep it in replay_esn) */
static __always_inline void read_oseq(struct ipsec_event *e, struct xfrm_state *x, u32 esn_flag)
{
    struct xfrm_replay_state_esn *esn = BPF_CORE_READ(x, replay_esn);
    if (esn) {
        e->seq = BPF_CORE_READ(esn, oseq);
        if (esn_flag) {
            e->seq_hi = BPF_CORE_READ(esn, oseq_hi);
            e->flags |= F_ESN;
        }
    } else {
        e->seq = BPF_CORE_READ(x, replay.oseq);
    }
}

/* ---- xfrm_input ---- */

/* A slot on this CPU's stack. Only a call whose return was never seen (attached or detached in
   between, a kretprobe out of instances) leaves one behind; such orphans are dropped when a
   return finds its own slot under them, and the stack starts over when full. */
static __always_inline struct in_stack *in_stack_here(void)
{
    u32 zero = 0;
    return bpf_map_lookup_elem(&in_flight, &zero);
}

static __always_inline struct in_slot *in_push(u64 frame)
{
    struct in_stack *st = in_stack_here();
    if (!st)
        return NULL;
    u64 d = st->depth;
    if (d >= IN_DEPTH)
        d = 0;
    st->depth = d + 1;
    struct in_slot *slot = &st->slot[d & (IN_DEPTH - 1)];
    slot->frame = frame;
    slot->keep = 0;
    return slot;
}

static __always_inline struct in_slot *in_pop(u64 frame)
{
    struct in_stack *st = in_stack_here();
    if (!st)
        return NULL;
    u64 d = st->depth;
    int found = -1;
#pragma unroll
    for (int i = IN_DEPTH - 1; i >= 0; i--) {
        if (found < 0 && i < d && st->slot[i].frame == frame)
            found = i;
    }
    if (found < 0)
        return NULL;
    st->depth = found;
    return &st->slot[found & (IN_DEPTH - 1)];
}

static __always_inline int on_input(u64 frame, struct sk_buff *skb, int nexthdr, __be32 spi,
                                    int encap_type)
{
    struct in_slot *slot = in_push(frame);
    if (!slot)
        return 0;
    struct ipsec_event *e = &slot->e;
    __builtin_memset(e, 0, sizeof(*e));
    read_skb_fields(e, skb);
    if (!wanted(e->netns))
        return 0;
    slot->keep = 1;
    e->kind = K_XFRM_INPUT;
    e->skb = (u64)skb;
    e->encap = encap_type;
    e->spi = spi;
    read_l3(e, skb);
    if (encap_type == -1) {
        e->flags |= F_RESUMED;
    } else if (nexthdr == IPPROTO_ESP) {
        /* first pass: skb->data is the ESP header (also after NAT-T's UDP header is pulled) */
        __be32 hdr[2] = {};
        bpf_probe_read_kernel(hdr, sizeof(hdr), BPF_CORE_READ(skb, data));
        e->spi = hdr[0];
        e->seq = bpf_ntohl(hdr[1]);
    }
    return 0;
}

static __always_inline int on_input_ret(u64 frame, int ret)
{
    struct in_slot *slot = in_pop(frame);
    if (!slot || !slot->keep)
        return 0;
    slot->e.ret = ret;
    submit(&slot->e);
    return 0;
}

/* ---- xfrm_output ---- */

static __always_inline int on_output(u64 frame, struct sk_buff *skb)
{
    struct out_call o = {};
    struct dst_entry *dst = (struct dst_entry *)(BPF_CORE_READ(skb, _skb_refdst) & SKB_DST_PTRMASK);
    struct xfrm_state *x = NULL;
    read_skb_fields(&o.e, skb);
    if (dst)
        x = BPF_CORE_READ(dst, xfrm);
    if (x) {
        o.esn = read_state(&o.e, x) & XFRM_STATE_ESN;
        o.x = (u64)x;
    }
    if (!wanted(o.e.netns))
        return 0;
    o.e.kind = K_XFRM_OUTPUT;
    o.e.skb = (u64)skb;
    read_l3(&o.e, skb);
    bpf_map_update_elem(&out_flight, &frame, &o, BPF_ANY);
    return 0;
}

static __always_inline int on_output_ret(u64 frame, int ret)
{
    struct out_call *o = bpf_map_lookup_elem(&out_flight, &frame);
    if (!o)
        return 0;
    if (o->x)
        read_oseq(&o->e, (struct xfrm_state *)o->x, o->esn);
    o->e.ret = ret;
    submit(&o->e);
    bpf_map_delete_elem(&out_flight, &frame);
    return 0;
}

/* ---- anchors ---- */

static __always_inline void anchor_skb(struct ipsec_event *e, u32 kind, struct sk_buff *skb)
{
    e->kind = kind;
    e->skb = (u64)skb;
    if (skb) {
        read_skb_fields(e, skb);
        read_l3(e, skb);
    }
}

static __always_inline void submit_anchor(struct ipsec_event *e)
{
    if (wanted(e->netns))
        submit(e);
}

/* seq of an inbound packet, stored by xfrm_input before crypto (network byte order) */
static __always_inline u32 cb_input_seq(struct sk_buff *skb)
{
    struct xfrm_skb_cb *cb = (void *)skb + bpf_core_field_offset(struct sk_buff, cb);
    return bpf_ntohl(BPF_CORE_READ(cb, seq.input.low));
}

static __always_inline int on_notfound(struct sk_buff *skb, u16 family, __be32 net_spi, __be32 net_seq)
{
    struct ipsec_event e = {};
    anchor_skb(&e, K_NOTFOUND, skb);
    e.sa_family = family;
    e.spi = net_spi;
    e.seq = bpf_ntohl(net_seq);
    submit_anchor(&e);
    return 0;
}

static __always_inline int on_notfound_simple(struct sk_buff *skb, u16 family)
{
    struct ipsec_event e = {};
    anchor_skb(&e, K_NOTFOUND, skb);
    e.sa_family = family;
    submit_anchor(&e);
    return 0;
}

static __always_inline int on_icvfail(struct xfrm_state *x, struct sk_buff *skb)
{
    struct ipsec_event e = {};
    anchor_skb(&e, K_ICVFAIL, skb);
    read_state(&e, x);
    e.seq = cb_input_seq(skb);
    submit_anchor(&e);
    return 0;
}

static __always_inline int on_replay(struct xfrm_state *x, struct sk_buff *skb, __be32 net_seq)
{
    struct ipsec_event e = {};
    anchor_skb(&e, K_REPLAY, skb);
    read_state(&e, x);
    e.seq = bpf_ntohl(net_seq);
    submit_anchor(&e);
    return 0;
}

static __always_inline int on_replay_overflow(struct xfrm_state *x, struct sk_buff *skb)
{
    struct ipsec_event e = {};
    anchor_skb(&e, K_REPLAY_OVERFLOW, skb);
    read_oseq(&e, x, read_state(&e, x) & XFRM_STATE_ESN);
    submit_anchor(&e);
    return 0;
}

/* ---- the attach points: fentry/fexit ... ---- */

SEC("fentry/xfrm_input")
int BPF_PROG(fentry_xfrm_input, struct sk_buff *skb, int nexthdr, __be32 spi, int encap_type)
{
    return on_input((u64)ctx, skb, nexthdr, spi, encap_type);
}

/* the skb may be gone by now (delivered, freed): everything was read at entry */
SEC("fexit/xfrm_input")
int BPF_PROG(fexit_xfrm_input, struct sk_buff *skb, int nexthdr, __be32 spi, int encap_type, int ret)
{
    return on_input_ret((u64)ctx, ret);
}

SEC("fentry/xfrm_output")
int BPF_PROG(fentry_xfrm_output, struct sock *sk, struct sk_buff *skb)
{
    return on_output((u64)ctx, skb);
}

SEC("fexit/xfrm_output")
int BPF_PROG(fexit_xfrm_output, struct sock *sk, struct sk_buff *skb, int ret)
{
    return on_output_ret((u64)ctx, ret);
}

SEC("fentry/xfrm_audit_state_notfound")
int BPF_PROG(fentry_notfound, struct sk_buff *skb, u16 family, __be32 net_spi, __be32 net_seq)
{
    return on_notfound(skb, family, net_spi, net_seq);
}

SEC("fentry/xfrm_audit_state_notfound_simple")
int BPF_PROG(fentry_notfound_simple, struct sk_buff *skb, u16 family)
{
    return on_notfound_simple(skb, family);
}

SEC("fentry/xfrm_audit_state_icvfail")
int BPF_PROG(fentry_icvfail, struct xfrm_state *x, struct sk_buff *skb, u8 proto)
{
    return on_icvfail(x, skb);
}

SEC("fentry/xfrm_audit_state_replay")
int BPF_PROG(fentry_replay, struct xfrm_state *x, struct sk_buff *skb, __be32 net_seq)
{
    return on_replay(x, skb, net_seq);
}

SEC("fentry/xfrm_audit_state_replay_overflow")
int BPF_PROG(fentry_replay_overflow, struct xfrm_state *x, struct sk_buff *skb)
{
    return on_replay_overflow(x, skb);
}

/* ---- ... or kprobe/kretprobe ---- */

SEC("kprobe/xfrm_input")
int BPF_KPROBE(kprobe_xfrm_input, struct sk_buff *skb, int nexthdr, __be32 spi, int encap_type)
{
    return on_input(PT_REGS_SP(ctx), skb, nexthdr, spi, encap_type);
}

/* the return address was popped: the stack pointer is one slot above the entry's */
SEC("kretprobe/xfrm_input")
int BPF_KRETPROBE(kretprobe_xfrm_input, int ret)
{
    return on_input_ret(PT_REGS_SP(ctx) - sizeof(long), ret);
}

SEC("kprobe/xfrm_output")
int BPF_KPROBE(kprobe_xfrm_output, struct sock *sk, struct sk_buff *skb)
{
    return on_output(PT_REGS_SP(ctx), skb);
}

SEC("kretprobe/xfrm_output")
int BPF_KRETPROBE(kretprobe_xfrm_output, int ret)
{
    return on_output_ret(PT_REGS_SP(ctx) - sizeof(long), ret);
}

SEC("kprobe/xfrm_audit_state_notfound")
int BPF_KPROBE(kprobe_notfound, struct sk_buff *skb, u16 family, __be32 net_spi, __be32 net_seq)
{
    return on_notfound(skb, family, net_spi, net_seq);
}

SEC("kprobe/xfrm_audit_state_notfound_simple")
int BPF_KPROBE(kprobe_notfound_simple, struct sk_buff *skb, u16 family)
{
    return on_notfound_simple(skb, family);
}

SEC("kprobe/xfrm_audit_state_icvfail")
int BPF_KPROBE(kprobe_icvfail, struct xfrm_state *x, struct sk_buff *skb, u8 proto)
{
    return on_icvfail(x, skb);
}

SEC("kprobe/xfrm_audit_state_replay")
int BPF_KPROBE(kprobe_replay, struct xfrm_state *x, struct sk_buff *skb, __be32 net_seq)
{
    return on_replay(x, skb, net_seq);
}

SEC("kprobe/xfrm_audit_state_replay_overflow")
int BPF_KPROBE(kprobe_replay_overflow, struct xfrm_state *x, struct sk_buff *skb)
{
    return on_replay_overflow(x, skb);
}

/* ---- drops: TP_PROTO(struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...) ---- */

/* location inside one of drop_ranges: a binary search over the sorted ranges */
static __always_inline int in_ranges(u64 loc)
{
    u32 lo = 0, hi = nr_ranges;
    for (int i = 0; i < RANGE_STEPS; i++) {
        if (lo >= hi)
            break;
        u32 mid = (lo + hi) / 2;
        struct text_range *r = bpf_map_lookup_elem(&drop_ranges, &mid);
        if (!r)
            break;
        if (loc < r->start)
            hi = mid;
        else if (loc >= r->end)
            lo = mid + 1;
        else
            return 1;
    }
    return 0;
}

static __always_inline int want_drop(u32 reason, u64 location)
{
    if (keep_all_drops)
        return 1;
    u8 *keep = bpf_map_lookup_elem(&drop_reasons, &reason);
    return (keep && *keep) || in_ranges(location);
}

SEC("raw_tp/kfree_skb")
int BPF_PROG(kfree_skb, struct sk_buff *skb, void *location, int reason)
{
    count(C_DROPS_SEEN);
    if (!want_drop(reason, (u64)location))
        return 0;
    struct ipsec_event e = {};
    e.kind = K_DROP;
    e.skb = (u64)skb;
    e.location = (u64)location;
    e.reason = reason;
    e.protocol = bpf_ntohs(BPF_CORE_READ(skb, protocol));
    e.mark = BPF_CORE_READ(skb, mark);
    read_dev(&e, BPF_CORE_READ(skb, dev));
    if (!e.netns) /* no device (a socket's own skb): the socket's namespace */
        e.netns = BPF_CORE_READ(skb, sk, __sk_common.skc_net.net, ns.inum);
    /* an IPsec drop no namespace can be told for is everyone's business */
    if (e.netns && !wanted(e.netns))
        return 0;
    count(C_DROPS_SENT);
    submit(&e);
    return 0;
}
