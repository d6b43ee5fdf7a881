// SPDX-License-Identifier: Apache-2.0
/*
 * Sluice fast path.
 *
 *   cgroup/connect4|6      rewrite a connect() to a Service VIP into a connect() to the Sluice
 *                          listener serving it, and remember the VIP in socket-local storage.
 *   cgroup/getpeername4|6  give the VIP back to the application, so the rewrite is invisible.
 *   sockops                at ACTIVE_ESTABLISHED publish the VIP in ORIG_DST (keyed by the
 *                          connection tuple) for Sluice to read after accept(), and insert
 *                          opted-in client sockets into SOCKS; at PASSIVE_ESTABLISHED insert
 *                          Sluice's accepted end of such a connection into SOCKS.
 *   sk_msg                 redirect each message straight into the peer socket's ingress
 *                          queue, falling back to TCP for good (taint) whenever that could
 *                          reorder bytes or queue more than the credit allows.
 *
 * Design notes and the kernel behaviours behind every rule are in bpf/README.md.
 * Every program here always lets the socket operation proceed: a failure only means the
 * connection is not accelerated (or not intercepted), never that it breaks.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "sluice.h"

#define SOCK_STREAM 1
/* Deepest cgroup level checked for SPLICE_CGROUPS membership (a Kubernetes container is ~4). */
#define MAX_CGROUP_DEPTH 16

/* None of the helpers used here is GPL-only, so the project licence applies as is. */
char LICENSE[] SEC("license") = "Apache-2.0";

/* ---------------------------------------------------------------------------------------- */
/* Maps                                                                                      */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sluice_config);
} CONFIG SEC(".maps");

/* VIP:port -> proxy listener. Replaced from each configuration snapshot. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct svc_key);
	__type(value, struct svc_target);
} SERVICES SEC(".maps");

/* Sluice's listener addresses (in Sluice's netns): only their accepted sockets are spliced. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct listen_key);
	__type(value, __u32);
} LISTENERS SEC(".maps");

/* cgroup ids whose processes (and descendants) opted in to sockmap splicing. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u32);
} SPLICE_CGROUPS SEC(".maps");

/* Per-socket state; freed by the kernel with the socket. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sk_state);
} SKSTATE SEC(".maps");

/*
 * Proxy-side tuple (netns 0) -> original destination. Sluice deletes the entry after
 * accept(); the LRU bounds entries of connections that are never accepted.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, struct orig_dst);
} ORIG_DST SEC(".maps");

/* Spliced sockets, keyed by their own view of the tuple plus the client's netns cookie. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __u32); /* a socket fd from user space; aya expects 4 bytes */
} SOCKS SEC(".maps");

/*
 * Proxy-side tuple (netns 0) -> 1 while Sluice's backlog on that connection is over its bound.
 * LRU: an entry Sluice never cleared ages out (and PASSIVE_ESTABLISHED clears it for a new
 * connection with the same tuple).
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct sock_key);
	__type(value, __u32);
} PAUSED SEC(".maps");

/*
 * SOCKS key -> bytes this socket may still redirect before its peer shows activity. One entry
 * per spliced socket, never deleted: the LRU recycles entries of closed sockets, and a live
 * socket whose entry was evicted simply falls back to TCP.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __s64);
} CREDIT SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STATS_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} STATS SEC(".maps");

/* ---------------------------------------------------------------------------------------- */
/* Helpers                                                                                   */

static __always_inline void stat_add(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&STATS, &idx);

	if (v)
		*v += n;
}

static __always_inline struct sluice_config *config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&CONFIG, &zero);
}

static __always_inline int ip6_is_v4mapped(const __u32 ip[4])
{
	return ip[0] == 0 && ip[1] == 0 && ip[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int ip4_is_loopback(__u32 ip)
{
	return (bpf_ntohl(ip) >> 24) == 127;
}

static __always_inline int ip6_is_loopback(const __u32 ip[4])
{
	return ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == bpf_htonl(1);
}

static __always_inline void key_reverse(const struct sock_key *in, struct sock_key *out)
{
	out->local_ip[0] = in->remote_ip[0];
	out->local_ip[1] = in->remote_ip[1];
	out->local_ip[2] = in->remote_ip[2];
	out->local_ip[3] = in->remote_ip[3];
	out->remote_ip[0] = in->local_ip[0];
	out->remote_ip[1] = in->local_ip[1];
	out->remote_ip[2] = in->local_ip[2];
	out->remote_ip[3] = in->local_ip[3];
	out->local_port = in->remote_port;
	out->remote_port = in->local_port;
	out->family = in->family;
	out->_pad = 0;
	out->netns = in->netns;
}

/*
 * Fill the address part of a sock_key from raw context fields. v4-mapped IPv6 becomes AF_INET.
 * Returns 0 on success, -1 for a family we do not handle.
 */
static __always_inline int key_from_raw(struct sock_key *k, __u32 family, __u32 lip4, __u32 rip4,
					const __u32 lip6[4], const __u32 rip6[4])
{
	if (family == SLUICE_AF_INET) {
		k->local_ip[0] = lip4;
		k->remote_ip[0] = rip4;
		k->family = SLUICE_AF_INET;
		return 0;
	}
	if (family != SLUICE_AF_INET6)
		return -1;
	if (ip6_is_v4mapped(rip6)) {
		k->local_ip[0] = lip6[3];
		k->remote_ip[0] = rip6[3];
		k->family = SLUICE_AF_INET;
		return 0;
	}
	k->local_ip[0] = lip6[0];
	k->local_ip[1] = lip6[1];
	k->local_ip[2] = lip6[2];
	k->local_ip[3] = lip6[3];
	k->remote_ip[0] = rip6[0];
	k->remote_ip[1] = rip6[1];
	k->remote_ip[2] = rip6[2];
	k->remote_ip[3] = rip6[3];
	k->family = SLUICE_AF_INET6;
	return 0;
}

/*
 * The socket's own view of its tuple from a sock_ops context. remote_port is the network-order
 * port shifted into the upper half of the word (see the sock_ops ctx conversion in the
 * kernel), so bpf_ntohl() yields the port in host order; local_port is already host order.
 */
static __always_inline int skops_key(struct bpf_sock_ops *s, struct sock_key *k)
{
	__u32 lip6[4] = {}, rip6[4] = {};
	__u32 family = s->family;

	if (family == SLUICE_AF_INET6) {
		lip6[0] = s->local_ip6[0];
		lip6[1] = s->local_ip6[1];
		lip6[2] = s->local_ip6[2];
		lip6[3] = s->local_ip6[3];
		rip6[0] = s->remote_ip6[0];
		rip6[1] = s->remote_ip6[1];
		rip6[2] = s->remote_ip6[2];
		rip6[3] = s->remote_ip6[3];
	}
	if (key_from_raw(k, family, s->local_ip4, s->remote_ip4, lip6, rip6))
		return -1;
	k->local_port = s->local_port;
	k->remote_port = bpf_ntohl(s->remote_port);
	return 0;
}

/* Same as skops_key for an sk_msg context (identical field conventions). */
static __always_inline int msg_key(struct sk_msg_md *m, struct sock_key *k)
{
	__u32 lip6[4] = {}, rip6[4] = {};
	__u32 family = m->family;

	if (family == SLUICE_AF_INET6) {
		lip6[0] = m->local_ip6[0];
		lip6[1] = m->local_ip6[1];
		lip6[2] = m->local_ip6[2];
		lip6[3] = m->local_ip6[3];
		rip6[0] = m->remote_ip6[0];
		rip6[1] = m->remote_ip6[1];
		rip6[2] = m->remote_ip6[2];
		rip6[3] = m->remote_ip6[3];
	}
	if (key_from_raw(k, family, m->local_ip4, m->remote_ip4, lip6, rip6))
		return -1;
	k->local_port = m->local_port;
	k->remote_port = bpf_ntohl(m->remote_port);
	return 0;
}

/* True when the task calling connect() belongs to an opted-in cgroup or one of its descendants. */
static __always_inline int splice_wanted(void)
{
	for (int level = 0; level < MAX_CGROUP_DEPTH; level++) {
		__u64 id = bpf_get_current_ancestor_cgroup_id(level);

		if (!id)
			break;
		if (bpf_map_lookup_elem(&SPLICE_CGROUPS, &id))
			return 1;
	}
	return 0;
}

/*
 * Common part of connect4/6 once the VIP matched: loop guards, then record the redirect.
 * Returns the socket state to fill, or NULL when this connect must not be rewritten.
 */
static __always_inline struct sk_state *begin_redirect(struct bpf_sock_addr *ctx, int target_is_loopback)
{
	struct sluice_config *cfg = config();
	struct bpf_sock *sk = ctx->sk;
	struct sk_state *st;

	if (!cfg || !sk)
		return NULL;
	st = bpf_sk_storage_get(&SKSTATE, sk, 0, 0);
	if (st && (st->flags & SKF_BYPASS)) {
		stat_add(STAT_SKIP_BYPASS, 1);
		return NULL;
	}
	if (cfg->self_cgroup_id && bpf_get_current_cgroup_id() == cfg->self_cgroup_id) {
		stat_add(STAT_SKIP_SELF_CGROUP, 1);
		return NULL;
	}
	/*
	 * A loopback target only exists as Sluice's listener inside Sluice's own netns. In a pod's
	 * netns it would be the pod's loopback: leave such a connect alone rather than hand it to
	 * whatever listens there.
	 */
	if (target_is_loopback && bpf_get_netns_cookie(ctx) != cfg->netns_cookie) {
		stat_add(STAT_SKIP_FOREIGN_LOOPBACK, 1);
		return NULL;
	}
	st = bpf_sk_storage_get(&SKSTATE, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		stat_add(STAT_SKIP_NO_STORAGE, 1);
		return NULL;
	}
	st->flags = SKF_REDIRECTED | (splice_wanted() ? SKF_SPLICE : 0);
	st->pair_netns = 0;
	return st;
}

/* A socket that was redirected before and now connects elsewhere (after AF_UNSPEC) is plain again. */
static __always_inline void forget_redirect(struct bpf_sock *sk)
{
	struct sk_state *st;

	if (!sk)
		return;
	st = bpf_sk_storage_get(&SKSTATE, sk, 0, 0);
	if (st && (st->flags & SKF_REDIRECTED))
		st->flags &= ~(SKF_REDIRECTED | SKF_SPLICE);
}

/* ---------------------------------------------------------------------------------------- */
/* connect / getpeername                                                                     */

SEC("cgroup/connect4")
int sluice_connect4(struct bpf_sock_addr *ctx)
{
	struct svc_key key = {};
	struct svc_target *t;
	struct sk_state *st;
	__u32 dst = ctx->user_ip4;
	__u16 port = bpf_ntohs((__u16)ctx->user_port);

	if (ctx->type != SOCK_STREAM)
		return 1;
	key.ip[0] = dst;
	key.port = port;
	key.family = SLUICE_AF_INET;
	t = bpf_map_lookup_elem(&SERVICES, &key);
	if (!t || t->family != SLUICE_AF_INET) {
		forget_redirect(ctx->sk);
		return 1;
	}
	st = begin_redirect(ctx, ip4_is_loopback(t->ip[0]));
	if (!st)
		return 1;
	st->orig_ip[0] = dst;
	st->orig_ip[1] = 0;
	st->orig_ip[2] = 0;
	st->orig_ip[3] = 0;
	st->orig_port = port;
	st->proxy_ip[0] = t->ip[0];
	st->proxy_ip[1] = 0;
	st->proxy_ip[2] = 0;
	st->proxy_ip[3] = 0;
	st->proxy_port = t->port;

	ctx->user_ip4 = t->ip[0];
	ctx->user_port = bpf_htons(t->port);
	stat_add(STAT_CONNECT4_REWRITE, 1);
	return 1;
}

SEC("cgroup/connect6")
int sluice_connect6(struct bpf_sock_addr *ctx)
{
	struct svc_key key = {};
	struct svc_target *t;
	struct sk_state *st;
	__u32 dst[4], to[4];
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	int loopback;

	if (ctx->type != SOCK_STREAM)
		return 1;
	dst[0] = ctx->user_ip6[0];
	dst[1] = ctx->user_ip6[1];
	dst[2] = ctx->user_ip6[2];
	dst[3] = ctx->user_ip6[3];
	if (ip6_is_v4mapped(dst)) {
		key.ip[0] = dst[3];
		key.family = SLUICE_AF_INET;
	} else {
		key.ip[0] = dst[0];
		key.ip[1] = dst[1];
		key.ip[2] = dst[2];
		key.ip[3] = dst[3];
		key.family = SLUICE_AF_INET6;
	}
	key.port = port;
	t = bpf_map_lookup_elem(&SERVICES, &key);
	if (!t || t->family != key.family) {
		forget_redirect(ctx->sk);
		return 1;
	}
	if (t->family == SLUICE_AF_INET) {
		/* An IPv4 VIP reached from a dual-stack socket goes to the IPv4 listener, mapped. */
		to[0] = 0;
		to[1] = 0;
		to[2] = bpf_htonl(0x0000ffff);
		to[3] = t->ip[0];
		loopback = ip4_is_loopback(t->ip[0]);
	} else {
		to[0] = t->ip[0];
		to[1] = t->ip[1];
		to[2] = t->ip[2];
		to[3] = t->ip[3];
		loopback = ip6_is_loopback(to);
	}
	st = begin_redirect(ctx, loopback);
	if (!st)
		return 1;
	st->orig_ip[0] = dst[0];
	st->orig_ip[1] = dst[1];
	st->orig_ip[2] = dst[2];
	st->orig_ip[3] = dst[3];
	st->orig_port = port;
	st->proxy_ip[0] = to[0];
	st->proxy_ip[1] = to[1];
	st->proxy_ip[2] = to[2];
	st->proxy_ip[3] = to[3];
	st->proxy_port = t->port;

	ctx->user_ip6[0] = to[0];
	ctx->user_ip6[1] = to[1];
	ctx->user_ip6[2] = to[2];
	ctx->user_ip6[3] = to[3];
	ctx->user_port = bpf_htons(t->port);
	stat_add(STAT_CONNECT6_REWRITE, 1);
	return 1;
}

/* getpeername programs must return 1: the verifier rejects any other exit value. */
SEC("cgroup/getpeername4")
int sluice_getpeername4(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct sk_state *st;

	if (!sk)
		return 1;
	st = bpf_sk_storage_get(&SKSTATE, sk, 0, 0);
	if (!st || !(st->flags & SKF_REDIRECTED))
		return 1;
	if (ctx->user_ip4 != st->proxy_ip[0] || bpf_ntohs((__u16)ctx->user_port) != st->proxy_port)
		return 1;
	ctx->user_ip4 = st->orig_ip[0];
	ctx->user_port = bpf_htons(st->orig_port);
	stat_add(STAT_GETPEERNAME_REWRITE, 1);
	return 1;
}

SEC("cgroup/getpeername6")
int sluice_getpeername6(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct sk_state *st;

	if (!sk)
		return 1;
	st = bpf_sk_storage_get(&SKSTATE, sk, 0, 0);
	if (!st || !(st->flags & SKF_REDIRECTED))
		return 1;
	if (ctx->user_ip6[0] != st->proxy_ip[0] || ctx->user_ip6[1] != st->proxy_ip[1] ||
	    ctx->user_ip6[2] != st->proxy_ip[2] || ctx->user_ip6[3] != st->proxy_ip[3] ||
	    bpf_ntohs((__u16)ctx->user_port) != st->proxy_port)
		return 1;
	ctx->user_ip6[0] = st->orig_ip[0];
	ctx->user_ip6[1] = st->orig_ip[1];
	ctx->user_ip6[2] = st->orig_ip[2];
	ctx->user_ip6[3] = st->orig_ip[3];
	ctx->user_port = bpf_htons(st->orig_port);
	stat_add(STAT_GETPEERNAME_REWRITE, 1);
	return 1;
}

/* ---------------------------------------------------------------------------------------- */
/* sockops                                                                                   */

static __always_inline void set_credit(struct sock_key *k, struct sluice_config *cfg)
{
	__s64 credit = cfg->credit_bytes;

	bpf_map_update_elem(&CREDIT, k, &credit, BPF_ANY);
}

/*
 * Client end of a redirected connection is established. This runs before the client's ACK
 * can reach the listener, so the ORIG_DST entry exists before Sluice can accept().
 */
static __always_inline void on_active_established(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct sluice_config *cfg = config();
	struct sock_key own = {}, conn = {};
	struct orig_dst od = {};
	struct sk_state *st;
	__u64 netns;

	if (!sk || !cfg)
		return;
	st = bpf_sk_storage_get(&SKSTATE, sk, 0, 0);
	if (!st || !(st->flags & SKF_REDIRECTED))
		return;
	if (skops_key(skops, &own))
		return;
	key_reverse(&own, &conn);
	conn.netns = 0;

	/* The VIP, normalised exactly like the keys (v4-mapped -> AF_INET). */
	if (skops->family == SLUICE_AF_INET6 && !ip6_is_v4mapped(st->orig_ip)) {
		od.ip[0] = st->orig_ip[0];
		od.ip[1] = st->orig_ip[1];
		od.ip[2] = st->orig_ip[2];
		od.ip[3] = st->orig_ip[3];
		od.family = SLUICE_AF_INET6;
	} else {
		od.ip[0] = skops->family == SLUICE_AF_INET6 ? st->orig_ip[3] : st->orig_ip[0];
		od.family = SLUICE_AF_INET;
	}
	od.port = st->orig_port;
	netns = bpf_get_netns_cookie(skops);
	od.cookie = bpf_get_socket_cookie(skops);
	od.netns = netns;

	if (st->flags & SKF_SPLICE) {
		own.netns = netns;
		set_credit(&own, cfg);
		/* NOEXIST: never displace another socket that already owns this key. */
		if (bpf_sock_hash_update(skops, &SOCKS, &own, BPF_NOEXIST) == 0) {
			st->pair_netns = netns;
			od.flags |= ORIG_F_SPLICED;
			stat_add(STAT_SOCKHASH_INSERT_ACTIVE, 1);
		} else {
			stat_add(STAT_SOCKHASH_INSERT_FAILED, 1);
		}
	}
	bpf_map_update_elem(&ORIG_DST, &conn, &od, BPF_ANY);
	stat_add(STAT_ORIG_RECORDED, 1);
}

static __always_inline int listener_match(struct listen_key *lk)
{
	if (bpf_map_lookup_elem(&LISTENERS, lk))
		return 1;
	/* Wildcard listener of the same family. */
	lk->ip[0] = 0;
	lk->ip[1] = 0;
	lk->ip[2] = 0;
	lk->ip[3] = 0;
	if (bpf_map_lookup_elem(&LISTENERS, lk))
		return 1;
	/* A dual-stack [::] listener also accepts (normalised) IPv4 connections. */
	if (lk->family == SLUICE_AF_INET) {
		lk->family = SLUICE_AF_INET6;
		if (bpf_map_lookup_elem(&LISTENERS, lk))
			return 1;
	}
	return 0;
}

/*
 * Sluice's end of a connection is established and still in the accept queue. Insert it into
 * SOCKS now, before any redirected byte can arrive for it (inserting after accept() from user
 * space reorders bytes and fails for half-closed sockets). Only connections whose client end
 * was redirected *and* spliced are inserted: ORIG_DST proves the pairing and carries the
 * client's netns cookie, which both SOCKS keys of the pair share.
 */
static __always_inline void on_passive_established(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct sluice_config *cfg = config();
	struct sock_key own = {}, conn = {};
	struct listen_key lk = {};
	struct orig_dst *od;
	struct sk_state *st;

	if (!sk || !cfg)
		return;
	if (skops_key(skops, &own))
		return;
	lk.netns = bpf_get_netns_cookie(skops);
	lk.ip[0] = own.local_ip[0];
	lk.ip[1] = own.local_ip[1];
	lk.ip[2] = own.local_ip[2];
	lk.ip[3] = own.local_ip[3];
	lk.port = own.local_port;
	lk.family = own.family;
	if (!listener_match(&lk))
		return;

	conn = own;
	conn.netns = 0;
	/* A new connection never inherits a pause left behind by an earlier one with this tuple. */
	bpf_map_delete_elem(&PAUSED, &conn);
	od = bpf_map_lookup_elem(&ORIG_DST, &conn);
	if (!od) {
		stat_add(STAT_PASSIVE_UNPAIRED, 1);
		return;
	}
	if (!(od->flags & ORIG_F_SPLICED))
		return;
	st = bpf_sk_storage_get(&SKSTATE, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st)
		return;
	st->flags = SKF_PROXY_SIDE;
	st->pair_netns = od->netns;
	own.netns = od->netns;
	set_credit(&own, cfg);
	if (bpf_sock_hash_update(skops, &SOCKS, &own, BPF_NOEXIST) == 0)
		stat_add(STAT_SOCKHASH_INSERT_PASSIVE, 1);
	else
		stat_add(STAT_SOCKHASH_INSERT_FAILED, 1);
}

SEC("sockops")
int sluice_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		on_active_established(skops);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		on_passive_established(skops);
		break;
	default:
		break;
	}
	return 1;
}

/* ---------------------------------------------------------------------------------------- */
/* sk_msg                                                                                    */

/*
 * Send this message, and every later one of this socket, through TCP. All bytes redirected
 * so far precede all TCP bytes, and the receiver (tcp_bpf_recvmsg) drains its redirected
 * ingress queue before its TCP receive queue, so the stream stays in order.
 */
static __always_inline int taint(struct sk_state *st, __u32 reason, __u64 size)
{
	st->flags |= SKF_TAINTED;
	stat_add(reason, 1);
	stat_add(STAT_MSG_PASS, 1);
	stat_add(STAT_MSG_PASS_BYTES, size);
	return SK_PASS;
}

/*
 * Redirect a message into the peer's ingress queue. The redirect path has no flow control
 * (the receiver is charged against global TCP memory, not its receive buffer, and the sender
 * never blocks), so each socket holds a credit: redirecting spends it, the peer redirecting
 * anything back refills it (in request/response traffic the peer answers only after reading),
 * and a message larger than the remaining credit taints the socket. Sluice can also pause a
 * client explicitly (PAUSED) when its own backlog grows. Either way the sender continues over
 * TCP, which has flow control.
 */
SEC("sk_msg")
int sluice_msg(struct sk_msg_md *msg)
{
	struct bpf_sock *sk = msg->sk;
	struct sluice_config *cfg = config();
	struct sock_key own = {}, peer = {}, conn = {};
	struct sk_state *st;
	__s64 *credit, *peer_credit;
	__u64 size = msg->size;

	if (!sk || !cfg)
		return SK_PASS;
	st = bpf_sk_storage_get(&SKSTATE, sk, 0, 0);
	if (!st)
		return SK_PASS;
	if (st->flags & SKF_TAINTED) {
		stat_add(STAT_MSG_PASS, 1);
		stat_add(STAT_MSG_PASS_BYTES, size);
		return SK_PASS;
	}
	if (msg_key(msg, &own))
		return taint(st, STAT_TAINT_NO_PEER, size);
	own.netns = st->pair_netns;
	key_reverse(&own, &peer);

	if (!(st->flags & SKF_PROXY_SIDE)) {
		conn = peer;
		conn.netns = 0;
		if (bpf_map_lookup_elem(&PAUSED, &conn))
			return taint(st, STAT_TAINT_PAUSED, size);
	}
	credit = bpf_map_lookup_elem(&CREDIT, &own);
	if (!credit || *credit < (__s64)size)
		return taint(st, STAT_TAINT_CREDIT, size);
	if (bpf_msg_redirect_hash(msg, &SOCKS, &peer, BPF_F_INGRESS) != SK_PASS)
		return taint(st, STAT_TAINT_NO_PEER, size);

	__sync_fetch_and_add(credit, -(__s64)size);
	peer_credit = bpf_map_lookup_elem(&CREDIT, &peer);
	if (peer_credit)
		*peer_credit = cfg->credit_bytes;
	stat_add(STAT_MSG_REDIRECT, 1);
	stat_add(STAT_MSG_REDIRECT_BYTES, size);
	return SK_PASS;
}
