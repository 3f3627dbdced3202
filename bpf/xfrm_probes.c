/* ipsec-capture kernel probes (bcc): one event shape for every probe, mirrored by
 * EVENT in kprobes.py (keep both in the same order; the lab test checks the size).
 *
 * xfrm_input  kprobe+kretprobe: skb is the outer ESP packet, SPI and seq read from the ESP header
 *             (the spi argument is 0 on the normal path). ret 0 is NOT "accepted": xfrm_input also
 *             returns 0 on its own drop path and when crypto goes async.
 * xfrm_output kprobe+kretprobe: skb is the inner packet, the SA is skb_dst(skb)->xfrm; the
 *             sequence number is the SA's oseq after the call. -EINPROGRESS is async, not an error.
 * xfrm_audit_state_*: anchors that name a cause (called whether auditing is on or not).
 * skb:kfree_skb: every drop with its reason and location (user space keeps the xfrm ones).
 *
 * Entry and return pair by the stack pointer at entry (softirq: the pid is whoever ran).
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

BPF_PERF_OUTPUT(events);
BPF_PERCPU_ARRAY(scratch, struct ipsec_event, 1);
/* separate maps: a softirq running xfrm_input may interrupt a task inside xfrm_output */
BPF_HASH(in_flight, u64, struct ipsec_event, 4096);
BPF_HASH(out_flight, u64, struct ipsec_event, 4096);
BPF_HASH(out_state, u64, u64, 4096);
/* drop reasons that socket, transport, neighbour or qdisc code raises, never xfrm/esp/ah code:
   set by user space from this kernel's enum; such drops (a receiver's full socket buffer: one
   per packet) never leave the kernel */
BPF_ARRAY(skip_reason, u8, 1024);

static __always_inline struct ipsec_event *blank(void)
{
    int zero = 0;
    struct ipsec_event *e = scratch.lookup(&zero);
    if (e)
        __builtin_memset(e, 0, sizeof(*e));
    return e;
}

static __always_inline u32 dev_netns(struct net_device *dev)
{
    struct net *net = NULL;
    u32 inum = 0;
    if (!dev)
        return 0;
    bpf_probe_read_kernel(&net, sizeof(net), &dev->nd_net.net);
    if (net)
        bpf_probe_read_kernel(&inum, sizeof(inum), &net->ns.inum);
    return inum;
}

static __always_inline void read_skb(struct ipsec_event *e, struct sk_buff *skb)
{
    struct net_device *dev = NULL;
    unsigned char *head = NULL;
    u16 nh = 0;
    u8 vb = 0;

    e->skb = (u64)skb;
    bpf_probe_read_kernel(&e->len, sizeof(e->len), &skb->len);
    bpf_probe_read_kernel(&e->mark, sizeof(e->mark), &skb->mark);
    __be16 proto = 0;
    bpf_probe_read_kernel(&proto, sizeof(proto), &skb->protocol);
    e->protocol = bpf_ntohs(proto);
    bpf_probe_read_kernel(&dev, sizeof(dev), &skb->dev);
    if (dev) {
        bpf_probe_read_kernel(&e->ifindex, sizeof(e->ifindex), &dev->ifindex);
        e->netns = dev_netns(dev);
    }
    bpf_probe_read_kernel(&head, sizeof(head), &skb->head);
    bpf_probe_read_kernel(&nh, sizeof(nh), &skb->network_header);
    if (!head || nh == (u16)~0U)
        return;
    bpf_probe_read_kernel(&vb, 1, head + nh);
    if ((vb >> 4) == 4) {
        struct iphdr ip = {};
        bpf_probe_read_kernel(&ip, sizeof(ip), head + nh);
        e->family = AF_INET;
        e->l4proto = ip.protocol;
        __builtin_memcpy(e->saddr, &ip.saddr, 4);
        __builtin_memcpy(e->daddr, &ip.daddr, 4);
    } else if ((vb >> 4) == 6) {
        struct ipv6hdr ip6 = {};
        bpf_probe_read_kernel(&ip6, sizeof(ip6), head + nh);
        e->family = AF_INET6;
        e->l4proto = ip6.nexthdr;
        __builtin_memcpy(e->saddr, &ip6.saddr, 16);
        __builtin_memcpy(e->daddr, &ip6.daddr, 16);
    }
}

static __always_inline void read_state(struct ipsec_event *e, struct xfrm_state *x)
{
    struct net *net = NULL;
    bpf_probe_read_kernel(&e->spi, sizeof(e->spi), &x->id.spi);
    bpf_probe_read_kernel(e->sa_daddr, 16, &x->id.daddr);
    bpf_probe_read_kernel(e->sa_saddr, 16, &x->props.saddr);
    bpf_probe_read_kernel(&e->mode, sizeof(e->mode), &x->props.mode);
    u16 fam = 0;
    bpf_probe_read_kernel(&fam, sizeof(fam), &x->props.family);
    e->sa_family = fam;
    bpf_probe_read_kernel(&net, sizeof(net), &x->xs_net.net);
    if (net)
        bpf_probe_read_kernel(&e->netns, sizeof(e->netns), &net->ns.inum);
}

/* the sequence number last given out on this SA (ESN and big windows keep it in replay_esn) */
static __always_inline void read_oseq(struct ipsec_event *e, struct xfrm_state *x)
{
    struct xfrm_replay_state_esn *esn = NULL;
    u32 xflags = 0;
    bpf_probe_read_kernel(&esn, sizeof(esn), &x->replay_esn);
    if (esn) {
        bpf_probe_read_kernel(&e->seq, sizeof(e->seq), &esn->oseq);
        bpf_probe_read_kernel(&xflags, sizeof(xflags), &x->props.flags);
        if (xflags & XFRM_STATE_ESN) {
            bpf_probe_read_kernel(&e->seq_hi, sizeof(e->seq_hi), &esn->oseq_hi);
            e->flags |= F_ESN;
        }
    } else {
        bpf_probe_read_kernel(&e->seq, sizeof(e->seq), &x->replay.oseq);
    }
}

static __always_inline int wanted(struct ipsec_event *e)
{
    return NETNS_FILTER == 0 || e->netns == 0 || e->netns == NETNS_FILTER;
}

/* ---- xfrm_input ---- */

int kp_xfrm_input(struct pt_regs *ctx, struct sk_buff *skb, int nexthdr, __be32 spi, int encap_type)
{
    u64 sp = PT_REGS_SP(ctx);
    struct ipsec_event *e = blank();
    if (!e)
        return 0;
    e->kind = K_XFRM_INPUT;
    e->encap = encap_type;
    e->spi = spi;
    read_skb(e, skb);
    if (encap_type == -1) {
        e->flags |= F_RESUMED;
    } else if (nexthdr == IPPROTO_ESP) {
        /* first pass: skb->data is the ESP header (also after NAT-T's UDP header is pulled) */
        unsigned char *data = NULL;
        __be32 hdr[2] = {};
        bpf_probe_read_kernel(&data, sizeof(data), &skb->data);
        bpf_probe_read_kernel(hdr, sizeof(hdr), data);
        e->spi = hdr[0];
        e->seq = bpf_ntohl(hdr[1]);
    }
    if (!wanted(e))
        return 0;
    in_flight.update(&sp, e);
    return 0;
}

/* the return address was popped: the stack pointer is one slot above the entry's */
int kr_xfrm_input(struct pt_regs *ctx)
{
    u64 sp = PT_REGS_SP(ctx) - sizeof(long);
    struct ipsec_event *e = in_flight.lookup(&sp);
    if (!e)
        return 0;
    e->ret = (s64)(int)PT_REGS_RC(ctx);
    e->ts = bpf_ktime_get_ns();
    events.perf_submit(ctx, e, sizeof(*e));
    in_flight.delete(&sp);
    return 0;
}

/* ---- xfrm_output ---- */

int kp_xfrm_output(struct pt_regs *ctx, struct sock *sk, struct sk_buff *skb)
{
    u64 sp = PT_REGS_SP(ctx);
    unsigned long refdst = 0;
    struct xfrm_state *x = NULL;
    struct ipsec_event *e = blank();
    if (!e)
        return 0;
    e->kind = K_XFRM_OUTPUT;
    read_skb(e, skb);
    bpf_probe_read_kernel(&refdst, sizeof(refdst), &skb->_skb_refdst);
    struct dst_entry *dst = (struct dst_entry *)(refdst & SKB_DST_PTRMASK);
    if (dst)
        bpf_probe_read_kernel(&x, sizeof(x), &dst->xfrm);
    if (x) {
        read_state(e, x);
        u64 xp = (u64)x;
        out_state.update(&sp, &xp);
    }
    if (!wanted(e)) {
        out_state.delete(&sp);
        return 0;
    }
    out_flight.update(&sp, e);
    return 0;
}

int kr_xfrm_output(struct pt_regs *ctx)
{
    u64 sp = PT_REGS_SP(ctx) - sizeof(long);
    struct ipsec_event *e = out_flight.lookup(&sp);
    if (!e)
        return 0;
    u64 *xp = out_state.lookup(&sp);
    if (xp) {
        read_oseq(e, (struct xfrm_state *)*xp);
        out_state.delete(&sp);
    }
    e->ret = (s64)(int)PT_REGS_RC(ctx);
    e->ts = bpf_ktime_get_ns();
    events.perf_submit(ctx, e, sizeof(*e));
    out_flight.delete(&sp);
    return 0;
}

/* ---- anchors ---- */

static __always_inline void submit_anchor(struct pt_regs *ctx, struct ipsec_event *e)
{
    e->ts = bpf_ktime_get_ns();
    if (wanted(e))
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

int kp_notfound(struct pt_regs *ctx, struct sk_buff *skb, u16 family, __be32 net_spi, __be32 net_seq)
{
    struct ipsec_event *e = blank();
    if (!e)
        return 0;
    e->kind = K_NOTFOUND;
    read_skb(e, skb);
    e->sa_family = family;
    e->spi = net_spi;
    e->seq = bpf_ntohl(net_seq);
    submit_anchor(ctx, e);
    return 0;
}

int kp_notfound_simple(struct pt_regs *ctx, struct sk_buff *skb, u16 family)
{
    struct ipsec_event *e = blank();
    if (!e)
        return 0;
    e->kind = K_NOTFOUND;
    read_skb(e, skb);
    e->sa_family = family;
    submit_anchor(ctx, e);
    return 0;
}

int kp_icvfail(struct pt_regs *ctx, struct xfrm_state *x, struct sk_buff *skb, u8 proto)
{
    struct ipsec_event *e = blank();
    if (!e)
        return 0;
    e->kind = K_ICVFAIL;
    read_skb(e, skb);
    read_state(e, x);
    e->seq = cb_input_seq(skb);
    submit_anchor(ctx, e);
    return 0;
}

int kp_replay(struct pt_regs *ctx, struct xfrm_state *x, struct sk_buff *skb, __be32 net_seq)
{
    struct ipsec_event *e = blank();
    if (!e)
        return 0;
    e->kind = K_REPLAY;
    read_skb(e, skb);
    read_state(e, x);
    e->seq = bpf_ntohl(net_seq);
    submit_anchor(ctx, e);
    return 0;
}

int kp_replay_overflow(struct pt_regs *ctx, struct xfrm_state *x, struct sk_buff *skb)
{
    struct ipsec_event *e = blank();
    if (!e)
        return 0;
    e->kind = K_REPLAY_OVERFLOW;
    read_skb(e, skb);
    read_state(e, x);
    read_oseq(e, x);
    submit_anchor(ctx, e);
    return 0;
}

/* ---- drops ---- */

TRACEPOINT_PROBE(skb, kfree_skb)
{
    u32 reason = args->reason;
    u8 *skip = skip_reason.lookup(&reason);
    if (skip && *skip)
        return 0;
    struct ipsec_event *e = blank();
    struct net_device *dev = NULL;
    if (!e)
        return 0;
    struct sk_buff *skb = (struct sk_buff *)args->skbaddr;
    e->kind = K_DROP;
    e->skb = (u64)skb;
    e->location = (u64)args->location;
    e->reason = args->reason;
    e->protocol = args->protocol;
    bpf_probe_read_kernel(&dev, sizeof(dev), &skb->dev);
    if (dev) {
        bpf_probe_read_kernel(&e->ifindex, sizeof(e->ifindex), &dev->ifindex);
        e->netns = dev_netns(dev);
    }
    bpf_probe_read_kernel(&e->mark, sizeof(e->mark), &skb->mark);
    e->ts = bpf_ktime_get_ns();
    if (wanted(e))
        events.perf_submit(args, e, sizeof(*e));
    return 0;
}
