//! Shared machinery of the fast-path integration tests: environment checks, per-test cgroups,
//! network namespaces, the client process, a tokio relay standing in for Sluice, and an echo
//! backend.
//!
//! Layout of every test: a fresh cgroup `<cgroup2>/sluice-bpf-test-<pid>-<tag>/` with children
//! `proxy/` (this test process: the relay and its listeners live there, because an accepted
//! socket belongs to its listener's cgroup and only attached cgroups run sockops) and `app/`
//! (the client process). The programs attach to the parent. Tests run one at a time (a global
//! lock) because moving the test process between cgroups affects all of its threads.

#![allow(dead_code)] // each test binary uses a different subset

use std::{
    collections::BTreeMap,
    fs,
    io::{self, BufRead, BufReader, Write},
    net::SocketAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sluice_bpf::{FastPath, FastPathConfig, FastPathError, Mode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
};

#[path = "../../testing/pattern.rs"]
mod pattern_impl;
#[allow(unused_imports)] // used by some test binaries only
pub use pattern_impl::pattern;

pub const CLIENT_BIN: &str = env!("CARGO_BIN_EXE_sluice-bpf-test-client");

/// Tests move the whole process between cgroups: one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Prints why a test is skipped, loudly, and returns `None`. Writes to the process's stderr
/// directly: libtest captures `eprintln!` of passing tests, which would hide the reason.
pub fn skip<T>(test: &str, reason: impl std::fmt::Display) -> Option<T> {
    let _ = writeln!(io::stderr().lock(), "\n*** SKIPPED {test}: {reason} ***\n");
    None
}

/// The cgroup2 mount, or a loud skip when the test cannot run here (not root, no cgroup2).
pub fn environment(test: &str) -> Option<PathBuf> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u32>().ok());
    if euid != Some(0) {
        return skip(test, format!("needs root to load BPF programs and create cgroups (euid {euid:?})"));
    }
    match sluice_bpf::cgroup2_mount() {
        Some(m) => Some(m),
        None => skip(test, "no cgroup2 hierarchy is mounted"),
    }
}

/// A per-test cgroup with `app/` and `proxy/` children; the test process lives in `proxy/`
/// until the value is dropped.
pub struct TestCgroup {
    pub base: PathBuf,
    pub app: PathBuf,
    pub proxy: PathBuf,
    extra: Vec<PathBuf>,
    original: PathBuf,
}

impl TestCgroup {
    pub fn new(mount: &Path, tag: &str) -> io::Result<Self> {
        let original = sluice_bpf::own_cgroup_dir().map_err(io::Error::other)?;
        let base = mount.join(format!("sluice-bpf-test-{}-{tag}", std::process::id()));
        fs::create_dir(&base)?;
        let cg = TestCgroup { app: base.join("app"), proxy: base.join("proxy"), base, extra: Vec::new(), original };
        fs::create_dir(&cg.app)?;
        fs::create_dir(&cg.proxy)?;
        enter(&cg.proxy)?;
        Ok(cg)
    }

    /// Another child cgroup, removed with the others.
    pub fn child(&mut self, name: &str) -> io::Result<PathBuf> {
        let dir = self.base.join(name);
        fs::create_dir(&dir)?;
        self.extra.push(dir.clone());
        Ok(dir)
    }
}

/// Moves the whole test process into `dir`.
pub fn enter(dir: &Path) -> io::Result<()> {
    fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = enter(&self.original) {
            eprintln!("warning: moving back to {}: {e}", self.original.display());
        }
        let dirs: Vec<PathBuf> =
            self.extra.iter().cloned().chain([self.app.clone(), self.proxy.clone(), self.base.clone()]).collect();
        for dir in dirs {
            // A client that just exited may take a moment to leave its cgroup.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() > deadline => {
                        eprintln!("warning: removing {}: {e}", dir.display());
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

/// Starts the fast path attached to `cg.base`, with `splice` opted in. Skips loudly when the
/// host lacks a capability or kernel feature; any other failure (e.g. the verifier rejecting
/// a program) fails the test.
pub fn start_fastpath(
    test: &str,
    cg: &TestCgroup,
    splice: &[&Path],
    pause_threshold_bytes: usize,
) -> Option<Arc<FastPath>> {
    let cfg = FastPathConfig {
        mode: Mode::On,
        cgroup: cg.base.clone(),
        splice_cgroups: splice.iter().map(|p| p.to_path_buf()).collect(),
        pause_threshold_bytes,
    };
    match FastPath::start(cfg) {
        Ok(Some(fp)) => Some(Arc::new(fp)),
        Ok(None) => panic!("Mode::On returned no fast path"),
        Err(FastPathError::Unsupported(reason)) => skip(test, reason),
        Err(e) => panic!("starting the fast path: {e}"),
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

// ---------------------------------------------------------------------------------------------
// Client process

/// Summary line of `sluice-bpf-test-client echo`.
#[derive(Debug, Default, Clone)]
pub struct EchoResult {
    pub ok: u64,
    pub stalls: u64,
    pub corrupt: u64,
    pub errors: u64,
    pub spurious_eagain: u64,
    pub peers: Vec<String>,
    pub first_error: String,
    pub stderr: String,
}

impl EchoResult {
    fn parse(stdout: &str, stderr: &str) -> Option<Self> {
        let line = stdout.lines().find(|l| l.starts_with("RESULT "))?;
        let (head, first_error) = line.split_once(" first_error=")?;
        let mut r =
            EchoResult { first_error: first_error.to_string(), stderr: stderr.to_string(), ..Default::default() };
        for kv in head.trim_start_matches("RESULT ").split(' ') {
            let (k, v) = kv.split_once('=')?;
            match k {
                "ok" => r.ok = v.parse().ok()?,
                "stalls" => r.stalls = v.parse().ok()?,
                "corrupt" => r.corrupt = v.parse().ok()?,
                "errors" => r.errors = v.parse().ok()?,
                "spurious_eagain" => r.spurious_eagain = v.parse().ok()?,
                "peers" if v != "-" => r.peers = v.split(',').map(str::to_string).collect(),
                _ => {}
            }
        }
        Some(r)
    }

    /// Asserts every connection succeeded.
    pub fn assert_all_ok(&self, expected: u64, what: &str) {
        assert_eq!(
            (self.ok, self.stalls, self.corrupt, self.errors),
            (expected, 0, 0, 0),
            "{what}: ok/stalls/corrupt/errors; first error: {}; stderr: {}",
            self.first_error,
            self.stderr
        );
    }
}

/// How the client process is started.
pub enum Launch<'a> {
    /// In cgroup `dir`, in this network namespace.
    Cgroup(&'a Path),
    /// In cgroup `dir`, inside the named network namespace (`ip netns exec`).
    CgroupNetns(&'a Path, &'a str),
}

fn client_command(launch: &Launch<'_>, mode: &str, args: &[String]) -> Command {
    match launch {
        Launch::Cgroup(dir) => {
            let mut c = Command::new(CLIENT_BIN);
            c.arg(mode).args(args).arg("--cgroup").arg(dir);
            c
        }
        Launch::CgroupNetns(dir, netns) => {
            // Join the cgroup first: `ip netns exec` remounts /sys, hiding the cgroup tree.
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
                .arg(dir)
                .args(["ip", "netns", "exec", netns, CLIENT_BIN, mode])
                .args(args);
            c
        }
    }
}

/// Runs `sluice-bpf-test-client echo` to completion (killed after `deadline`).
pub fn run_echo_client(launch: Launch<'_>, args: &[String], deadline: Duration) -> EchoResult {
    let mut cmd = client_command(&launch, "echo", args);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawning the test client");
    let output = wait_with_deadline(child, deadline);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    EchoResult::parse(&stdout, &stderr).unwrap_or_else(|| {
        panic!("client printed no RESULT (status {:?}); stdout: {stdout}; stderr: {stderr}", output.status)
    })
}

fn wait_with_deadline(mut child: Child, deadline: Duration) -> std::process::Output {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() > deadline => {
                let _ = child.kill();
                let out = child.wait_with_output();
                panic!("test client ran over {deadline:?}: {out:?}");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for the test client: {e}"),
        }
    }
    child.wait_with_output().expect("collecting client output")
}

/// A running `sluice-bpf-test-client flood`.
pub struct FloodClient {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl FloodClient {
    pub fn spawn(dir: &Path, addr: SocketAddr, total: usize) -> Self {
        let args = vec![
            "--addr".to_string(),
            addr.to_string(),
            "--total".to_string(),
            total.to_string(),
            "--stall-ms".to_string(),
            "300".to_string(),
        ];
        let mut child = client_command(&Launch::Cgroup(dir), "flood", &args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning the flood client");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        FloodClient { child, stdout }
    }

    /// Blocks until the client prints `<word> n`.
    pub fn expect(&mut self, word: &str) -> usize {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("reading the flood client");
        line.trim()
            .strip_prefix(word)
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("flood client said {line:?}, expected {word} <n>"))
    }

    pub fn resume(&mut self) {
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        stdin.write_all(b"go\n").expect("resuming the flood client");
        stdin.flush().expect("resuming the flood client");
    }

    pub fn wait(mut self) {
        let status = self.child.wait().expect("waiting for the flood client");
        assert!(status.success(), "flood client failed: {status}");
    }
}

pub fn s(v: impl ToString) -> String {
    v.to_string()
}

// ---------------------------------------------------------------------------------------------
// Relay (stands in for Sluice), backend, and "direct" listeners on VIPs

/// What the relay saw.
#[derive(Default)]
pub struct RelayLog {
    pub accepted: AtomicU64,
    /// Connections that already had bytes waiting when accept() returned.
    pub queued_at_accept: AtomicU64,
    pub errors: AtomicU64,
    /// Original destination of each accepted connection, by address ("none" when absent).
    pub orig: Mutex<BTreeMap<String, u64>>,
    pub first_error: Mutex<Option<String>>,
}

impl RelayLog {
    pub fn orig_counts(&self) -> BTreeMap<String, u64> {
        self.orig.lock().expect("relay log").clone()
    }

    fn error(&self, e: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().expect("relay log");
        if first.is_none() {
            *first = Some(e);
        }
    }
}

/// How the relay behaves.
#[derive(Clone, Copy, Debug)]
pub struct RelayOpts {
    /// Sleep before every accept(), so that clients write before they are accepted.
    pub accept_delay: Duration,
    /// Mark upstream sockets with the bypass flag (as Sluice does).
    pub bypass: bool,
}

impl Default for RelayOpts {
    fn default() -> Self {
        RelayOpts { accept_delay: Duration::ZERO, bypass: true }
    }
}

/// Accepts on `listener`, looks up each connection's original destination, connects to
/// `upstream`, and copies both ways with 64 KiB buffers (Sluice writes large buffers).
pub fn spawn_relay(fp: Arc<FastPath>, listener: TcpListener, upstream: SocketAddr, opts: RelayOpts) -> Arc<RelayLog> {
    let log = Arc::new(RelayLog::default());
    let log2 = log.clone();
    tokio::spawn(async move {
        loop {
            if !opts.accept_delay.is_zero() {
                tokio::time::sleep(opts.accept_delay).await;
            }
            let (mut down, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    log2.error(format!("accept: {e}"));
                    continue;
                }
            };
            log2.accepted.fetch_add(1, Ordering::Relaxed);
            let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
            if matches!(socket2::SockRef::from(&down).peek(&mut probe), Ok(n) if n > 0) {
                log2.queued_at_accept.fetch_add(1, Ordering::Relaxed);
            }
            let local = match down.local_addr() {
                Ok(l) => l,
                Err(e) => {
                    log2.error(format!("local_addr: {e}"));
                    continue;
                }
            };
            let orig = fp.original_dst(peer, local);
            *log2
                .orig
                .lock()
                .expect("relay log")
                .entry(orig.map_or_else(|| "none".to_string(), |o| o.to_string()))
                .or_default() += 1;
            let fp = fp.clone();
            let log3 = log2.clone();
            tokio::spawn(async move {
                let result = async {
                    let mut up = if opts.bypass {
                        connect_bypassed(&fp, upstream).await?
                    } else {
                        TcpStream::connect(upstream).await?
                    };
                    tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, 65536, 65536).await
                }
                .await;
                if let Err(e) = result {
                    log3.error(format!("relay {peer}: {e}"));
                }
            });
        }
    });
    log
}

/// An upstream connection as Sluice makes it: a fresh socket marked with the bypass flag.
pub async fn connect_bypassed(fp: &FastPath, to: SocketAddr) -> io::Result<TcpStream> {
    let sock = if to.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    fp.bypass(sock.as_fd()).map_err(io::Error::other)?;
    sock.connect(to).await
}

/// An echo server; returns its address.
pub async fn spawn_echo_backend(bind: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind(bind).await.expect("binding the echo backend");
    let addr = listener.local_addr().expect("echo backend address");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let mut buf = vec![0u8; 65536];
                loop {
                    match r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A listener on a VIP address itself: it receives the connects that were *not* redirected.
pub struct Direct {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicU64>,
}

/// Binds `ip:port`, falling back to `ip:0` when the port is taken.
pub async fn spawn_direct(ip: &str, port: u16) -> Direct {
    let ip: std::net::IpAddr = ip.parse().expect("VIP address");
    let listener = match TcpListener::bind((ip, port)).await {
        Ok(l) => l,
        Err(_) => TcpListener::bind((ip, 0)).await.expect("binding a VIP listener"),
    };
    let addr = listener.local_addr().expect("VIP listener address");
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
            drop(s);
        }
    });
    Direct { addr, accepted }
}

/// Waits until `cond` holds (polling), up to `limit`.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

// ---------------------------------------------------------------------------------------------
// Network namespaces ("node" and "pod" of the pod-emulation test)

/// Two network namespaces joined by a veth pair with link-local /30 addresses and no route
/// anywhere else. Removed on drop.
pub struct NetnsPair {
    pub node: String,
    pub pod: String,
    pub node_ip: &'static str,
    pub pod_ip: &'static str,
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())))
    }
}

impl NetnsPair {
    pub fn create() -> io::Result<Self> {
        let id = std::process::id();
        let pair = NetnsPair {
            node: format!("sbt{id}node"),
            pod: format!("sbt{id}pod"),
            node_ip: "169.254.77.1",
            pod_ip: "169.254.77.2",
        };
        ip(&["netns", "add", &pair.node])?;
        ip(&["netns", "add", &pair.pod])?;
        let (vn, vp) = (format!("sbn{id}"), format!("sbp{id}"));
        ip(&["-n", &pair.node, "link", "add", &vn, "type", "veth", "peer", "name", &vp, "netns", &pair.pod])?;
        ip(&["-n", &pair.node, "addr", "add", "169.254.77.1/30", "dev", &vn])?;
        ip(&["-n", &pair.pod, "addr", "add", "169.254.77.2/30", "dev", &vp])?;
        for (ns, dev) in [(&pair.node, &vn), (&pair.pod, &vp)] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(pair)
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.node] {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("warning: {e}");
            }
        }
    }
}

/// Moves the calling thread into the named network namespace. Threads it spawns afterwards
/// (e.g. a tokio runtime's workers) inherit it.
pub fn enter_netns(name: &str) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = fs::File::open(Path::new("/var/run/netns").join(name))?;
    let fd = file.as_fd();
    // SAFETY: `fd` is an open namespace file for the duration of the call; setns only changes
    // the calling thread's network namespace and touches no memory of ours.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// `net.ipv4.tcp_wmem[2]`: the largest send buffer TCP autotuning gives a socket.
pub fn tcp_wmem_max() -> usize {
    fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2).and_then(|v| v.parse().ok()))
        .unwrap_or(4 << 20)
}
