//! Fast-path counters: the per-CPU STATS array of the BPF programs, summed over CPUs.

use serde::Serialize;

/// Index of each counter in STATS; mirrors `enum sluice_stat` in `src/bpf/sluice.h`
/// (a unit test checks the two lists agree).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Counter {
    Connect4Rewrite = 0,
    Connect6Rewrite = 1,
    SkipSelfCgroup = 2,
    SkipBypass = 3,
    SkipForeignLoopback = 4,
    SkipNoStorage = 5,
    GetpeernameRewrite = 6,
    OrigRecorded = 7,
    SockhashInsertActive = 8,
    SockhashInsertPassive = 9,
    SockhashInsertFailed = 10,
    PassiveUnpaired = 11,
    MsgRedirect = 12,
    MsgRedirectBytes = 13,
    MsgPass = 14,
    MsgPassBytes = 15,
    TaintNoPeer = 16,
    TaintPaused = 17,
    TaintCredit = 18,
}

impl Counter {
    pub(crate) const ALL: [Counter; 19] = [
        Counter::Connect4Rewrite,
        Counter::Connect6Rewrite,
        Counter::SkipSelfCgroup,
        Counter::SkipBypass,
        Counter::SkipForeignLoopback,
        Counter::SkipNoStorage,
        Counter::GetpeernameRewrite,
        Counter::OrigRecorded,
        Counter::SockhashInsertActive,
        Counter::SockhashInsertPassive,
        Counter::SockhashInsertFailed,
        Counter::PassiveUnpaired,
        Counter::MsgRedirect,
        Counter::MsgRedirectBytes,
        Counter::MsgPass,
        Counter::MsgPassBytes,
        Counter::TaintNoPeer,
        Counter::TaintPaused,
        Counter::TaintCredit,
    ];

    /// The `STAT_*` name used in the C header.
    #[cfg(test)]
    fn c_name(self) -> &'static str {
        match self {
            Counter::Connect4Rewrite => "STAT_CONNECT4_REWRITE",
            Counter::Connect6Rewrite => "STAT_CONNECT6_REWRITE",
            Counter::SkipSelfCgroup => "STAT_SKIP_SELF_CGROUP",
            Counter::SkipBypass => "STAT_SKIP_BYPASS",
            Counter::SkipForeignLoopback => "STAT_SKIP_FOREIGN_LOOPBACK",
            Counter::SkipNoStorage => "STAT_SKIP_NO_STORAGE",
            Counter::GetpeernameRewrite => "STAT_GETPEERNAME_REWRITE",
            Counter::OrigRecorded => "STAT_ORIG_RECORDED",
            Counter::SockhashInsertActive => "STAT_SOCKHASH_INSERT_ACTIVE",
            Counter::SockhashInsertPassive => "STAT_SOCKHASH_INSERT_PASSIVE",
            Counter::SockhashInsertFailed => "STAT_SOCKHASH_INSERT_FAILED",
            Counter::PassiveUnpaired => "STAT_PASSIVE_UNPAIRED",
            Counter::MsgRedirect => "STAT_MSG_REDIRECT",
            Counter::MsgRedirectBytes => "STAT_MSG_REDIRECT_BYTES",
            Counter::MsgPass => "STAT_MSG_PASS",
            Counter::MsgPassBytes => "STAT_MSG_PASS_BYTES",
            Counter::TaintNoPeer => "STAT_TAINT_NO_PEER",
            Counter::TaintPaused => "STAT_TAINT_PAUSED",
            Counter::TaintCredit => "STAT_TAINT_CREDIT",
        }
    }
}

/// Counters since the programs were loaded (summed over CPUs).
///
/// Message counters count `sk_msg` verdicts: one per `sendmsg` chunk of a spliced socket.
/// Taint counters count sockets (a socket is tainted once, then stays on TCP).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// IPv4 connects to a VIP rewritten to a proxy listener.
    pub connect4_rewrites: u64,
    /// IPv6 (including v4-mapped) connects to a VIP rewritten to a proxy listener.
    pub connect6_rewrites: u64,
    /// VIP connects left alone because Sluice itself made them (cgroup id guard).
    pub skipped_self_cgroup: u64,
    /// VIP connects left alone because the socket carries the bypass flag.
    pub skipped_bypass: u64,
    /// VIP connects left alone because their loopback target is not in the caller's netns.
    pub skipped_foreign_loopback: u64,
    /// VIP connects left alone because socket storage could not be allocated.
    pub skipped_no_storage: u64,
    /// getpeername() answers rewritten back to the VIP.
    pub getpeername_rewrites: u64,
    /// Original destinations published for Sluice (one per established redirected connection).
    pub orig_dst_recorded: u64,
    /// Client sockets inserted into the SOCKHASH.
    pub sockhash_inserts_client: u64,
    /// Sluice-side accepted sockets inserted into the SOCKHASH.
    pub sockhash_inserts_proxy: u64,
    /// SOCKHASH insertions refused (key already present, or the kernel refused).
    pub sockhash_insert_failures: u64,
    /// Connections accepted on a proxy listener with no original destination recorded.
    pub passive_unpaired: u64,
    /// Messages carried by sk_msg redirect.
    pub redirected_msgs: u64,
    /// Bytes carried by sk_msg redirect.
    pub redirected_bytes: u64,
    /// Messages of spliced sockets that went through TCP.
    pub passed_msgs: u64,
    /// Bytes of spliced sockets that went through TCP.
    pub passed_bytes: u64,
    /// Sockets tainted because their peer was not in the SOCKHASH.
    pub tainted_no_peer: u64,
    /// Client sockets tainted because Sluice had paused their connection.
    pub tainted_paused: u64,
    /// Sockets tainted because they ran out of redirect credit.
    pub tainted_credit: u64,
}

impl Stats {
    /// Builds the struct from counter values indexed like [`Counter`].
    pub(crate) fn from_fn(mut value: impl FnMut(Counter) -> u64) -> Self {
        Stats {
            connect4_rewrites: value(Counter::Connect4Rewrite),
            connect6_rewrites: value(Counter::Connect6Rewrite),
            skipped_self_cgroup: value(Counter::SkipSelfCgroup),
            skipped_bypass: value(Counter::SkipBypass),
            skipped_foreign_loopback: value(Counter::SkipForeignLoopback),
            skipped_no_storage: value(Counter::SkipNoStorage),
            getpeername_rewrites: value(Counter::GetpeernameRewrite),
            orig_dst_recorded: value(Counter::OrigRecorded),
            sockhash_inserts_client: value(Counter::SockhashInsertActive),
            sockhash_inserts_proxy: value(Counter::SockhashInsertPassive),
            sockhash_insert_failures: value(Counter::SockhashInsertFailed),
            passive_unpaired: value(Counter::PassiveUnpaired),
            redirected_msgs: value(Counter::MsgRedirect),
            redirected_bytes: value(Counter::MsgRedirectBytes),
            passed_msgs: value(Counter::MsgPass),
            passed_bytes: value(Counter::MsgPassBytes),
            tainted_no_peer: value(Counter::TaintNoPeer),
            tainted_paused: value(Counter::TaintPaused),
            tainted_credit: value(Counter::TaintCredit),
        }
    }

    /// All sockets that fell back to TCP, whatever the reason.
    pub fn tainted_sockets(&self) -> u64 {
        self.tainted_no_peer + self.tainted_paused + self.tainted_credit
    }

    /// Counter-wise difference `self - earlier` (saturating), for measuring one interval.
    pub fn since(&self, earlier: &Stats) -> Stats {
        let now = self.values();
        let then = earlier.values();
        Stats::from_fn(|c| now[c as usize].saturating_sub(then[c as usize]))
    }

    fn values(&self) -> [u64; Counter::ALL.len()] {
        let mut out = [0u64; Counter::ALL.len()];
        let fields = [
            self.connect4_rewrites,
            self.connect6_rewrites,
            self.skipped_self_cgroup,
            self.skipped_bypass,
            self.skipped_foreign_loopback,
            self.skipped_no_storage,
            self.getpeername_rewrites,
            self.orig_dst_recorded,
            self.sockhash_inserts_client,
            self.sockhash_inserts_proxy,
            self.sockhash_insert_failures,
            self.passive_unpaired,
            self.redirected_msgs,
            self.redirected_bytes,
            self.passed_msgs,
            self.passed_bytes,
            self.tainted_no_peer,
            self.tainted_paused,
            self.tainted_credit,
        ];
        out.copy_from_slice(&fields);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Rust indices must match `enum sluice_stat` in the header the object was built from.
    #[test]
    fn counters_match_the_c_header() {
        let header = include_str!("bpf/sluice.h");
        for counter in Counter::ALL {
            let needle = format!("{} = {},", counter.c_name(), counter as u32);
            assert!(header.contains(&needle), "sluice.h lacks `{needle}`");
        }
        let count = format!("STAT__COUNT = {},", Counter::ALL.len());
        assert!(header.contains(&count), "sluice.h lacks `{count}`");
    }

    #[test]
    fn from_fn_and_values_agree() {
        let stats = Stats::from_fn(|c| c as u64 * 10 + 1);
        for c in Counter::ALL {
            assert_eq!(stats.values()[c as usize], c as u64 * 10 + 1, "{c:?}");
        }
        let diff = stats.since(&Stats::from_fn(|_| 1));
        assert_eq!(diff.connect6_rewrites, 10);
        assert_eq!(diff.connect4_rewrites, 0);
        assert_eq!(stats.tainted_sockets(), 161 + 171 + 181);
    }
}
