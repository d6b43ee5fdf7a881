/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Shared layout of the Sluice fast-path maps.
 *
 * Every struct here has a byte-for-byte mirror in `bpf/src/abi.rs`. The layouts are explicit
 * (no implicit padding) because user space hashes keys as raw bytes: a stray padding byte
 * would make two equal keys differ. Sizes are pinned by _Static_assert here and by const
 * assertions on the Rust side; aya also checks key/value sizes when it opens each map.
 *
 * Conventions:
 *   - IPv4 addresses live in ip[0], network byte order; the other words are zero.
 *   - IPv6 addresses are four network-order words.
 *   - A v4-mapped IPv6 address (::ffff:a.b.c.d) is always normalised to AF_INET before it
 *     becomes part of a key, so a dual-stack socket and an IPv4 socket agree on keys.
 *   - Ports are in host byte order.
 */
#ifndef SLUICE_H
#define SLUICE_H

#include <linux/types.h>

#define SLUICE_AF_INET 2
#define SLUICE_AF_INET6 10

/* CONFIG[0]: written once by user space before any program is attached. */
struct sluice_config {
	__u64 self_cgroup_id; /* cgroup id of Sluice itself: its connects are never rewritten */
	__u64 netns_cookie;   /* network namespace of Sluice's listeners */
	__s64 credit_bytes;   /* redirect credit per direction, see sluice_msg */
};
_Static_assert(sizeof(struct sluice_config) == 24, "sluice_config layout");

/* SERVICES key: a Service VIP:port. */
struct svc_key {
	__u32 ip[4];
	__u16 port;
	__u16 family;
};
_Static_assert(sizeof(struct svc_key) == 20, "svc_key layout");

/* SERVICES value: the proxy listener the VIP is rewritten to (same family as the VIP). */
struct svc_target {
	__u32 ip[4];
	__u16 port;
	__u16 family;
};
_Static_assert(sizeof(struct svc_target) == 20, "svc_target layout");

/* LISTENERS key: a proxy listener address in a given network namespace. ip all-zero = wildcard. */
struct listen_key {
	__u64 netns;
	__u32 ip[4];
	__u16 port;
	__u16 family;
	__u32 _pad;
};
_Static_assert(sizeof(struct listen_key) == 32, "listen_key layout");

/*
 * A TCP connection seen from one of its ends ("local" is the socket's own address).
 *
 * netns is 0 in the tuple-keyed maps that user space looks up (ORIG_DST, PAUSED): user space
 * only knows the accepted socket's (peer, local) pair. In SOCKS and CREDIT it is the netns
 * cookie of the *client* end of the pair, so that identical tuples in two namespaces never
 * address each other's sockets.
 */
struct sock_key {
	__u32 local_ip[4];
	__u32 remote_ip[4];
	__u32 local_port;
	__u32 remote_port;
	__u32 family;
	__u32 _pad;
	__u64 netns;
};
_Static_assert(sizeof(struct sock_key) == 56, "sock_key layout");

/* ORIG_DST value: what the client asked for, recorded at ACTIVE_ESTABLISHED. */
struct orig_dst {
	__u32 ip[4];
	__u64 cookie; /* socket cookie of the client socket */
	__u64 netns;  /* netns cookie of the client socket */
	__u16 port;
	__u16 family;
	__u32 flags; /* ORIG_F_* */
};
_Static_assert(sizeof(struct orig_dst) == 40, "orig_dst layout");

#define ORIG_F_SPLICED 1u /* the client socket entered SOCKS */

/* SKSTATE value: per-socket state in socket-local storage. */
struct sk_state {
	__u32 orig_ip[4];  /* destination as the application passed it to connect() */
	__u32 proxy_ip[4]; /* destination after the rewrite, in the socket's own form */
	__u64 pair_netns;  /* netns field of this socket's SOCKS/CREDIT keys */
	__u16 orig_port;
	__u16 proxy_port;
	__u32 flags; /* SKF_* */
};
_Static_assert(sizeof(struct sk_state) == 48, "sk_state layout");

#define SKF_REDIRECTED 1u /* connect() was rewritten to a proxy listener */
#define SKF_TAINTED 2u    /* a message of this socket went through TCP: never redirect again */
#define SKF_BYPASS 4u     /* set by Sluice on its own upstream sockets: never rewrite */
#define SKF_SPLICE 8u     /* client socket opted in to sockmap splicing */
#define SKF_PROXY_SIDE 16u /* accepted socket of a proxy listener, spliced */

/* STATS indices (per-CPU u64 counters). Mirrored by `Counter` in bpf/src/stats.rs. */
enum sluice_stat {
	STAT_CONNECT4_REWRITE = 0,
	STAT_CONNECT6_REWRITE = 1,
	STAT_SKIP_SELF_CGROUP = 2,
	STAT_SKIP_BYPASS = 3,
	STAT_SKIP_FOREIGN_LOOPBACK = 4,
	STAT_SKIP_NO_STORAGE = 5,
	STAT_GETPEERNAME_REWRITE = 6,
	STAT_ORIG_RECORDED = 7,
	STAT_SOCKHASH_INSERT_ACTIVE = 8,
	STAT_SOCKHASH_INSERT_PASSIVE = 9,
	STAT_SOCKHASH_INSERT_FAILED = 10,
	STAT_PASSIVE_UNPAIRED = 11,
	STAT_MSG_REDIRECT = 12,
	STAT_MSG_REDIRECT_BYTES = 13,
	STAT_MSG_PASS = 14,
	STAT_MSG_PASS_BYTES = 15,
	STAT_TAINT_NO_PEER = 16,
	STAT_TAINT_PAUSED = 17,
	STAT_TAINT_CREDIT = 18,
	STAT__COUNT = 19,
};

#define STATS_SLOTS 32

#endif /* SLUICE_H */
