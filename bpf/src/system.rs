//! What the host offers: kernel version, capabilities, the cgroup2 hierarchy, namespace cookies.
//!
//! Everything here reads /proc or the cgroup filesystem, except [`netns_cookie`], which needs
//! one `getsockopt` call.

use std::{
    fs, io,
    os::{
        fd::{AsRawFd, BorrowedFd},
        unix::{fs::MetadataExt, net::UnixDatagram},
    },
    path::{Path, PathBuf},
};

use crate::FastPathError;

/// Oldest kernel with every helper the programs use: `bpf_get_netns_cookie` in sockops and
/// `SO_NETNS_COOKIE` arrived in 5.15/5.14; sk_msg's `msg->sk` in 5.8; cgroup bpf links in 5.7.
pub(crate) const MIN_KERNEL: (u32, u32) = (5, 15);

/// Capability bits (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// `SO_NETNS_COOKIE` from asm-generic/socket.h (same value on x86_64 and aarch64).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Checks the host before touching BPF, so that `Mode::Auto` can name the missing piece.
pub(crate) fn preflight(cgroup: &Path) -> Result<(), FastPathError> {
    let release = read("kernel release", Path::new("/proc/sys/kernel/osrelease"))?;
    match parse_kernel_version(&release) {
        Some(v) if v >= MIN_KERNEL => {}
        Some(_) => {
            return Err(FastPathError::Unsupported(format!(
                "kernel {} is older than {}.{} (needs bpf_get_netns_cookie in sockops programs)",
                release.trim(),
                MIN_KERNEL.0,
                MIN_KERNEL.1
            )));
        }
        None => {
            return Err(FastPathError::Unsupported(format!("cannot parse the kernel release {:?}", release.trim())));
        }
    }

    let status = read("process status", Path::new("/proc/self/status"))?;
    let caps = parse_cap_eff(&status)
        .ok_or_else(|| FastPathError::Unsupported("no CapEff line in /proc/self/status".to_string()))?;
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    if !(has(CAP_BPF) || has(CAP_SYS_ADMIN)) {
        return Err(FastPathError::Unsupported(
            "missing capability CAP_BPF (or CAP_SYS_ADMIN) to load BPF programs".to_string(),
        ));
    }
    if !(has(CAP_NET_ADMIN) || has(CAP_SYS_ADMIN)) {
        return Err(FastPathError::Unsupported(
            "missing capability CAP_NET_ADMIN (or CAP_SYS_ADMIN) to load sockops/sk_msg programs".to_string(),
        ));
    }

    if !is_cgroup2_dir(cgroup) {
        let hint = cgroup2_mount()
            .map(|m| format!("the cgroup2 hierarchy is mounted at {}", m.display()))
            .unwrap_or_else(|| "no cgroup2 hierarchy is mounted".to_string());
        return Err(FastPathError::Unsupported(format!("{} is not a cgroup2 directory ({hint})", cgroup.display())));
    }
    Ok(())
}

fn read(what: &'static str, path: &Path) -> Result<String, FastPathError> {
    fs::read_to_string(path).map_err(|source| FastPathError::Io { what, path: path.to_path_buf(), source })
}

/// `"6.18.44-foo"` -> `(6, 18)`.
pub(crate) fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The effective capability set from the text of /proc/self/status.
pub(crate) fn parse_cap_eff(status: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// A cgroup2 directory has `cgroup.controllers`; a cgroup v1 directory or a plain directory has
/// not.
pub(crate) fn is_cgroup2_dir(path: &Path) -> bool {
    path.join("cgroup.controllers").is_file()
}

/// The cgroup id of a cgroup2 directory: the inode number of the directory, which is what
/// `bpf_get_current_cgroup_id()` returns for tasks in it.
pub(crate) fn cgroup_id(path: &Path) -> Result<u64, FastPathError> {
    if !is_cgroup2_dir(path) {
        return Err(FastPathError::Config(format!("{} is not a cgroup2 directory", path.display())));
    }
    fs::metadata(path).map(|m| m.ino()).map_err(|source| FastPathError::Io {
        what: "cgroup directory",
        path: path.to_path_buf(),
        source,
    })
}

/// Where the cgroup2 hierarchy is mounted (and the cgroup path of the mount's root), from
/// /proc/self/mountinfo. `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid
/// ones.
fn cgroup2_mount_entry() -> Option<(PathBuf, String)> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let fields: Vec<&str> = pre.split_whitespace().collect();
        let root = unescape_mountinfo(fields.get(3)?);
        let mount_point = unescape_mountinfo(fields.get(4)?);
        Some((PathBuf::from(mount_point), root))
    })
}

/// The cgroup2 mount point, if any.
pub fn cgroup2_mount() -> Option<PathBuf> {
    cgroup2_mount_entry().map(|(mount, _)| mount)
}

/// The cgroup2 directory of the calling process, from /proc/self/cgroup and the mount table.
pub fn own_cgroup_dir() -> Result<PathBuf, FastPathError> {
    let text = read("own cgroup", Path::new("/proc/self/cgroup"))?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::")).ok_or_else(|| {
        FastPathError::Unsupported(
            "the process is in no cgroup2 hierarchy (no \"0::\" line in /proc/self/cgroup)".to_string(),
        )
    })?;
    let (mount, root) = cgroup2_mount_entry()
        .ok_or_else(|| FastPathError::Unsupported("no cgroup2 hierarchy is mounted".to_string()))?;
    let inside = rel.strip_prefix(root.as_str()).unwrap_or(rel);
    Ok(mount.join(inside.trim_start_matches('/')))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` (three octal digits).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .map(|d| d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0')));
        match octal.and_then(|v| u8::try_from(v).ok()) {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cookie of the network namespace of the calling thread (`SO_NETNS_COOKIE`), which the
/// BPF programs compare with `bpf_get_netns_cookie()`.
pub(crate) fn netns_cookie() -> Result<u64, FastPathError> {
    // A unix socket needs no network configuration: it works in a namespace whose loopback
    // is still down, and it belongs to the caller's network namespace like any socket.
    let sock = UnixDatagram::unbound().map_err(|source| FastPathError::Io {
        what: "socket for SO_NETNS_COOKIE",
        path: PathBuf::new(),
        source,
    })?;
    getsockopt_u64(sock_fd(&sock), libc::SOL_SOCKET, SO_NETNS_COOKIE).map_err(|source| {
        FastPathError::Unsupported(format!("getsockopt(SO_NETNS_COOKIE) failed (needs Linux 5.14): {source}"))
    })
}

fn sock_fd(sock: &UnixDatagram) -> BorrowedFd<'_> {
    use std::os::fd::AsFd;
    sock.as_fd()
}

/// Reads a `u64` socket option.
fn getsockopt_u64(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `fd` is a live descriptor for the duration of the borrow; `value` and `len` are
    // valid, writable, and `len` holds the size of `value`, so the kernel writes at most that
    // many bytes into it.
    let rc =
        unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&raw mut value).cast::<libc::c_void>(), &raw mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != size_of::<u64>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("socket option returned {len} bytes, expected 8"),
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v669\n"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.15.0"), Some((5, 15)));
        assert_eq!(parse_kernel_version("5.4"), Some((5, 4)));
        assert!(parse_kernel_version("5.4") < Some(MIN_KERNEL));
        assert!(parse_kernel_version("10.1") > Some(MIN_KERNEL));
        assert_eq!(parse_kernel_version("linux"), None);
    }

    #[test]
    fn cap_eff_parses() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }

    #[test]
    fn mountinfo_escapes_decode() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape_mountinfo(r"/trailing\"), r"/trailing\");
    }

    #[test]
    fn netns_cookie_is_stable_within_a_namespace() {
        let a = netns_cookie().expect("SO_NETNS_COOKIE (Linux >= 5.14)");
        let b = netns_cookie().expect("SO_NETNS_COOKIE (Linux >= 5.14)");
        assert_ne!(a, 0);
        assert_eq!(a, b);
    }
}
