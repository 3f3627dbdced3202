/* ipsec-capture kernel probes (bcc): one event shape for every probe, mirrored by
 * EVENT in kprobes.py (keep both in the same order; the lab test checks the size).
 *
 * xfrm_input  entry+return: skb is the outer ESP packet, SPI and seq read from the ESP header
 *             (the spi argument is 0 on the normal path). ret 0 is NOT "accepted": xfrm_input also
 *             returns 0 on its own drop path and when crypto goes async.
 * xfrm_output entry+return: skb is the inner packet, the SA is skb_dst(skb)->xfrm; the
 *             sequence number is the SA's oseq after the call. -EINPROGRESS is async, not an error.
 * xfrm_audit_state_*: anchors that name a cause (called whether auditing is on or not).
 * skb:kfree_skb (raw tracepoint: no trace record is built): every drop with its reason and
 *             location (user space keeps the xfrm ones).
 *
 * Two attach mechanisms, one body each, chosen by cflag (kprobes.py picks):
 *   USE_FENTRY=1  fentry/fexit (BPF trampolines; the kernel needs BTF): arguments are BTF-typed
 *                 pointers, so LOAD() of their fields is a plain load the verifier makes safe;
 *                 the return program sees the arguments and ret together.
 *   otherwise     kprobe/kretprobe: every kernel read is a bpf_probe_read_kernel call, so the
 *                 sk_buff is copied once (SKB_VIEW) and the rest read in spans.
 * Pointers that are not arguments (the SA behind skb_dst, the packet bytes, raw tracepoint
 * arguments) are untyped in both: KREAD() always goes through bpf_probe_read_kernel.
 *
 * Entry and return pair by the frame of the call (softirq: the pid is whoever ran): the stack
 * pointer at a kprobe's entry (the kretprobe sees it one slot higher), or under fentry the
 * trampoline's frame, which its fentry and fexit programs both get as ctx.
 *   xfrm_input  always runs in softirq / with BH disabled (no preemption, no migration), so its
 *               calls nest strictly on a CPU: a per-CPU stack of slots, no hash map.
 *   xfrm_output may run in process context and be preempted (and migrated, preempt=full) in
 *               the middle: a hash keyed by the frame.
 * NETNS_FILTER (cflag) keeps one namespace's events; 0 keeps all.
 */
#include <uapi/linux/ptrace.h>
#include <linux/skbuff.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <net/dst.h>
#include <net/xfrm.h>

#ifndef NETNS_FILTER
#define NETNS_FILTER 0
#endif

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

#define KREAD(dst, src) bpf_probe_read_kernel(&(dst), sizeof(dst), &(src))

#ifdef USE_FENTRY
#define LOAD(dst, src) ((dst) = (src))
#define SKB_VIEW(skb) (skb)
#else
#define LOAD(dst, src) KREAD(dst, src)
/* kprobe programs never nest on a CPU (the kernel skips one that would), so one slot serves
   them all; the raw tracepoint, which may interrupt them, never uses it */
BPF_PERCPU_ARRAY(skb_scratch, struct sk_buff, 1);
static __always_inline struct sk_buff *skb_view(struct sk_buff *skb)
{
    int zero = 0;
    struct sk_buff *copy = skb_scratch.lookup(&zero);
    if (copy && bpf_probe_read_kernel(copy, sizeof(*copy), skb) != 0)
        return NULL;
    return copy;
}
#define SKB_VIEW(skb) skb_view(skb)
#endif

BPF_PERF_OUTPUT(events);

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
BPF_PERCPU_ARRAY(in_flight, struct in_stack, 1);

struct out_call {
    struct ipsec_event e;
    u64 x;           /* the SA: its oseq is read at return */
    u32 esn;         /* XFRM_STATE_ESN set on it */
};
BPF_HASH(out_flight, u64, struct out_call, 4096);

/* drop reasons that socket, transport, neighbour or qdisc code raises, never xfrm/esp/ah code:
   set by user space from this kernel's enum; such drops (a receiver's full socket buffer: one
   per packet) never leave the kernel */
BPF_ARRAY(skip_reason, u8, 1024);

static __always_inline int wanted(u32 netns)
{
    return NETNS_FILTER == 0 || netns == 0 || netns == NETNS_FILTER;
}

/* the device's namespace and index; `dev` comes from a LOADed sk_buff field */
static __always_inline void read_dev(struct ipsec_event *e, struct net_device *dev)
{
    struct net *net = NULL;
    if (!dev)
        return;
    LOAD(e->ifindex, dev->ifindex);
    LOAD(net, dev->nd_net.net);
    if (net)
        LOAD(e->netns, net->ns.inum);
}

/* the skb's IP header (outer on input, inner on output), one read for either family */
static __always_inline void read_l3(struct ipsec_event *e, struct sk_buff *s)
{
    union {
        u8 b[sizeof(struct ipv6hdr)];
        struct iphdr ip;
        struct ipv6hdr ip6;
    } h;
    unsigned char *head = s->head;
    u16 nh = s->network_header;
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

/* everything but the IP header, from an sk_buff view (SKB_VIEW) */
static __always_inline void read_skb_fields(struct ipsec_event *e, struct sk_buff *s)
{
    e->len = s->len;
    e->mark = s->mark;
    e->protocol = bpf_ntohs(s->protocol);
    read_dev(e, s->dev);
}

/* the SA's reported fields all lie in its first bytes (xs_net, id, props): one read of them */
#define SA_HEAD (offsetof(struct xfrm_state, props.saddr) + sizeof(xfrm_address_t))
static __always_inline u32 read_state(struct ipsec_event *e, struct xfrm_state *x)
{
    u64 raw[(SA_HEAD + 7) / 8];
    struct xfrm_state *c = (struct xfrm_state *)raw;
    struct net *net;
    if (bpf_probe_read_kernel(raw, sizeof(raw), x) != 0)
        return 0;
    e->spi = c->id.spi;
    __builtin_memcpy(e->sa_daddr, &c->id.daddr, 16);
    __builtin_memcpy(e->sa_saddr, &c->props.saddr, 16);
    e->mode = c->props.mode;
    e->sa_family = c->props.family;
    net = c->xs_net.net;
    if (net)
        KREAD(e->netns, net->ns.inum);
    return c->props.flags;
}

/* the sequence number last given out on this SA (ESN and big windows keep it in replay_esn) */
static __always_inline void read_oseq(struct ipsec_event *e, struct xfrm_state *x, u32 esn_flag)
{
    struct xfrm_replay_state_esn *esn = NULL;
    KREAD(esn, x->replay_esn);
    if (esn) {
        u32 v[3];   /* oseq, seq, oseq_hi: adjacent in xfrm_replay_state_esn */
        bpf_probe_read_kernel(v, sizeof(v), &esn->oseq);
        e->seq = v[0];
        if (esn_flag) {
            e->seq_hi = v[2];
            e->flags |= F_ESN;
        }
    } else {
        KREAD(e->seq, x->replay.oseq);
    }
}

/* ---- xfrm_input ---- */

/* A slot on this CPU's stack. Only a call whose return was never seen (attached or detached in
   between, a kretprobe out of instances) leaves one behind; such orphans are dropped when a
   return finds its own slot under them, and the stack starts over when full. */
static __always_inline struct in_stack *in_stack_here(void)
{
    int zero = 0;
    return in_flight.lookup(&zero);
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

static __always_inline int on_input(void *ctx, u64 frame, struct sk_buff *skb, int nexthdr,
                                    __be32 spi, int encap_type)
{
    struct in_slot *slot = in_push(frame);
    struct sk_buff *s = SKB_VIEW(skb);
    if (!slot || !s)
        return 0;
    struct ipsec_event *e = &slot->e;
    __builtin_memset(e, 0, sizeof(*e));
    read_skb_fields(e, s);
    if (!wanted(e->netns))
        return 0;
    slot->keep = 1;
    e->kind = K_XFRM_INPUT;
    e->skb = (u64)skb;
    e->encap = encap_type;
    e->spi = spi;
    read_l3(e, s);
    if (encap_type == -1) {
        e->flags |= F_RESUMED;
    } else if (nexthdr == IPPROTO_ESP) {
        /* first pass: skb->data is the ESP header (also after NAT-T's UDP header is pulled) */
        __be32 hdr[2] = {};
        bpf_probe_read_kernel(hdr, sizeof(hdr), s->data);
        e->spi = hdr[0];
        e->seq = bpf_ntohl(hdr[1]);
    }
    return 0;
}

static __always_inline int on_input_ret(void *ctx, u64 frame, int ret)
{
    struct in_slot *slot = in_pop(frame);
    if (!slot || !slot->keep)
        return 0;
    slot->e.ret = ret;
    slot->e.ts = bpf_ktime_get_ns();
    events.perf_submit(ctx, &slot->e, sizeof(slot->e));
    return 0;
}

/* ---- xfrm_output ---- */

static __always_inline int on_output(void *ctx, u64 frame, struct sk_buff *skb)
{
    struct out_call o = {};
    struct sk_buff *s = SKB_VIEW(skb);
    struct xfrm_state *x = NULL;
    if (!s)
        return 0;
    struct dst_entry *dst = (struct dst_entry *)(s->_skb_refdst & SKB_DST_PTRMASK);
    read_skb_fields(&o.e, s);
    if (dst)
        KREAD(x, dst->xfrm);
    if (x) {
        o.esn = read_state(&o.e, x) & XFRM_STATE_ESN;
        o.x = (u64)x;
    }
    if (!wanted(o.e.netns))
        return 0;
    o.e.kind = K_XFRM_OUTPUT;
    o.e.skb = (u64)skb;
    read_l3(&o.e, s);
    out_flight.update(&frame, &o);
    return 0;
}

static __always_inline int on_output_ret(void *ctx, u64 frame, int ret)
{
    struct out_call *o = out_flight.lookup(&frame);
    if (!o)
        return 0;
    if (o->x)
        read_oseq(&o->e, (struct xfrm_state *)o->x, o->esn);
    o->e.ret = ret;
    o->e.ts = bpf_ktime_get_ns();
    events.perf_submit(ctx, &o->e, sizeof(o->e));
    out_flight.delete(&frame);
    return 0;
}

/* ---- anchors ---- */

static __always_inline void anchor_skb(struct ipsec_event *e, u32 kind, struct sk_buff *skb)
{
    struct sk_buff *s = SKB_VIEW(skb);
    e->kind = kind;
    e->skb = (u64)skb;
    if (s) {
        read_skb_fields(e, s);
        read_l3(e, s);
    }
}

static __always_inline void submit_anchor(void *ctx, struct ipsec_event *e)
{
    e->ts = bpf_ktime_get_ns();
    if (wanted(e->netns))
        events.perf_submit(ctx, e, sizeof(*e));
}

/* seq of an inbound packet, stored by xfrm_input before crypto (network byte order) */
static __always_inline u32 cb_input_seq(struct sk_buff *skb)
{
    __be32 seq = 0;
    struct xfrm_skb_cb *cb = (struct xfrm_skb_cb *)skb->cb;
    bpf_probe_read_kernel(&seq, sizeof(seq), &cb->seq.input.low);
    return bpf_ntohl(seq);
}

static __always_inline int on_notfound(void *ctx, struct sk_buff *skb, u16 family, __be32 net_spi,
                                       __be32 net_seq)
{
    struct ipsec_event e = {};
    anchor_skb(&e, K_NOTFOUND, skb);
    e.sa_family = family;
    e.spi = net_spi;
    e.seq = bpf_ntohl(net_seq);
    submit_anchor(ctx, &e);
    return 0;
}

static __always_inline int on_notfound_simple(void *ctx, struct sk_buff *skb, u16 family)
{
    struct ipsec_event e = {};
    anchor_skb(&e, K_NOTFOUND, skb);
    e.sa_family = family;
    submit_anchor(ctx, &e);
    return 0;
}

static __always_inline int on_icvfail(void *ctx, struct xfrm_state *x, struct sk_buff *skb)
{
    struct ipsec_event e = {};
    anchor_skb(&e, K_ICVFAIL, skb);
    read_state(&e, x);
    e.seq = cb_input_seq(skb);
    submit_anchor(ctx, &e);
    return 0;
}

static __always_inline int on_replay(void *ctx, struct xfrm_state *x, struct sk_buff *skb, __be32 net_seq)
{
    struct ipsec_event e = {};
    anchor_skb(&e, K_REPLAY, skb);
    read_state(&e, x);
    e.seq = bpf_ntohl(net_seq);
    submit_anchor(ctx, &e);
    return 0;
}

static __always_inline int on_replay_overflow(void *ctx, struct xfrm_state *x, struct sk_buff *skb)
{
    struct ipsec_event e = {};
    anchor_skb(&e, K_REPLAY_OVERFLOW, skb);
    read_oseq(&e, x, read_state(&e, x) & XFRM_STATE_ESN);
    submit_anchor(ctx, &e);
    return 0;
}

/* ---- the attach points: fentry/fexit ... ---- */
#ifdef USE_FENTRY

KFUNC_PROBE(xfrm_input, struct sk_buff *skb, int nexthdr, __be32 spi, int encap_type)
{
    return on_input(ctx, (u64)ctx, skb, nexthdr, spi, encap_type);
}

/* the skb may be gone by now (delivered, freed): everything was read at entry */
KRETFUNC_PROBE(xfrm_input, struct sk_buff *skb, int nexthdr, __be32 spi, int encap_type, int ret)
{
    return on_input_ret(ctx, (u64)ctx, ret);
}

KFUNC_PROBE(xfrm_output, struct sock *sk, struct sk_buff *skb)
{
    return on_output(ctx, (u64)ctx, skb);
}

KRETFUNC_PROBE(xfrm_output, struct sock *sk, struct sk_buff *skb, int ret)
{
    return on_output_ret(ctx, (u64)ctx, ret);
}

KFUNC_PROBE(xfrm_audit_state_notfound, struct sk_buff *skb, u16 family, __be32 net_spi, __be32 net_seq)
{
    return on_notfound(ctx, skb, family, net_spi, net_seq);
}

KFUNC_PROBE(xfrm_audit_state_notfound_simple, struct sk_buff *skb, u16 family)
{
    return on_notfound_simple(ctx, skb, family);
}

KFUNC_PROBE(xfrm_audit_state_icvfail, struct xfrm_state *x, struct sk_buff *skb, u8 proto)
{
    return on_icvfail(ctx, x, skb);
}

KFUNC_PROBE(xfrm_audit_state_replay, struct xfrm_state *x, struct sk_buff *skb, __be32 net_seq)
{
    return on_replay(ctx, x, skb, net_seq);
}

KFUNC_PROBE(xfrm_audit_state_replay_overflow, struct xfrm_state *x, struct sk_buff *skb)
{
    return on_replay_overflow(ctx, x, skb);
}

/* ---- ... or kprobe/kretprobe ---- */
#else

int kp_xfrm_input(struct pt_regs *ctx, struct sk_buff *skb, int nexthdr, __be32 spi, int encap_type)
{
    return on_input(ctx, PT_REGS_SP(ctx), skb, nexthdr, spi, encap_type);
}

/* the return address was popped: the stack pointer is one slot above the entry's */
int kr_xfrm_input(struct pt_regs *ctx)
{
    return on_input_ret(ctx, PT_REGS_SP(ctx) - sizeof(long), (int)PT_REGS_RC(ctx));
}

int kp_xfrm_output(struct pt_regs *ctx, struct sock *sk, struct sk_buff *skb)
{
    return on_output(ctx, PT_REGS_SP(ctx), skb);
}

int kr_xfrm_output(struct pt_regs *ctx)
{
    return on_output_ret(ctx, PT_REGS_SP(ctx) - sizeof(long), (int)PT_REGS_RC(ctx));
}

int kp_notfound(struct pt_regs *ctx, struct sk_buff *skb, u16 family, __be32 net_spi, __be32 net_seq)
{
    return on_notfound(ctx, skb, family, net_spi, net_seq);
}

int kp_notfound_simple(struct pt_regs *ctx, struct sk_buff *skb, u16 family)
{
    return on_notfound_simple(ctx, skb, family);
}

int kp_icvfail(struct pt_regs *ctx, struct xfrm_state *x, struct sk_buff *skb, u8 proto)
{
    return on_icvfail(ctx, x, skb);
}

int kp_replay(struct pt_regs *ctx, struct xfrm_state *x, struct sk_buff *skb, __be32 net_seq)
{
    return on_replay(ctx, x, skb, net_seq);
}

int kp_replay_overflow(struct pt_regs *ctx, struct xfrm_state *x, struct sk_buff *skb)
{
    return on_replay_overflow(ctx, x, skb);
}

#endif

/* ---- drops: TP_PROTO(struct sk_buff *skb, void *location, enum skb_drop_reason reason) ---- */

RAW_TRACEPOINT_PROBE(kfree_skb)
{
    u32 reason = ctx->args[2];
    u8 *skip = skip_reason.lookup(&reason);
    if (skip && *skip)
        return 0;
    struct sk_buff *skb = (struct sk_buff *)ctx->args[0];
    struct net_device *dev = NULL;
    struct net *net = NULL;
    __be16 proto = 0;
    struct ipsec_event e = {};
    e.kind = K_DROP;
    e.skb = (u64)skb;
    e.location = ctx->args[1];
    e.reason = reason;
    KREAD(proto, skb->protocol);
    e.protocol = bpf_ntohs(proto);
    KREAD(e.mark, skb->mark);
    KREAD(dev, skb->dev);
    if (dev) {
        KREAD(e.ifindex, dev->ifindex);
        KREAD(net, dev->nd_net.net);
        if (net)
            KREAD(e.netns, net->ns.inum);
    }
    e.ts = bpf_ktime_get_ns();
    if (wanted(e.netns))
        events.perf_submit(ctx, &e, sizeof(e));
    return 0;
}
