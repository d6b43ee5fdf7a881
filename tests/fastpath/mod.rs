//! Machinery of the fast-path end-to-end tests: per-test cgroups and network namespaces, the
//! real `sluice` binary started inside them with `--fast-path on`, and client or backend
//! processes placed in a given cgroup and namespace.
//!
//! Layout of every test: a fresh cgroup `<cgroup2>/sluice-e2e-fp-<pid>-<tag>/` with children
//! `proxy/` (Sluice: an accepted socket belongs to its listener's cgroup, and only sockets of
//! an attached cgroup run the sockops program that splices them) and `app/` (the client, an
//! opted-in splice cgroup). Sluice attaches the programs to the parent. The test process
//! itself stays where it is, outside the attached cgroup: its own connects are never touched.
//!
//! Client and backend processes are this test binary started again on its
//! `fastpath_child` entry point, with a role in an environment variable (see [`child`]).
//! Sluice's fast-path counters come from its log: every configuration reload logs the fast
//! path's status at debug level, so [`SluiceProc::fast_path_status`] rewrites a config file and
//! waits for the next status line.

#![allow(dead_code)] // each test uses a different subset

pub mod child;

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Environment variable that turns this test binary into a client or backend process.
pub const CHILD_ENV: &str = "SLUICE_E2E_FASTPATH_CHILD";
/// Header the route adds; the backend reports it back as `x-seen-route`.
pub const ROUTE_HEADER: &str = "x-fastpath-route";
pub const ROUTE_VALUE: &str = "through-the-router";

/// The tests start processes, cgroups and namespaces and measure byte counts: one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Prints why a test is skipped, loudly, straight to stderr (libtest captures `eprintln!` of
/// passing tests, which would hide the reason). Returns `None` for `let ... else`.
pub fn skip<T>(test: &str, reason: impl std::fmt::Display) -> Option<T> {
    let _ = writeln!(io::stderr().lock(), "\n*** SKIPPED {test}: {reason} ***\n");
    None
}

/// The cgroup2 mount, or a loud skip when the test cannot run here.
pub fn environment(test: &str, netns: bool) -> Option<PathBuf> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u32>().ok());
    if euid != Some(0) {
        return skip(test, format!("needs root to load BPF programs and create cgroups (euid {euid:?})"));
    }
    let Some(mount) = sluice_bpf::cgroup2_mount() else {
        return skip(test, "no cgroup2 hierarchy is mounted");
    };
    let mut tools = vec!["sh"];
    if netns {
        tools.extend(["ip", "nsenter"]);
    }
    for tool in tools {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            return skip(test, format!("the `{tool}` command is not installed"));
        }
    }
    Some(mount)
}

// ---------------------------------------------------------------------------------------------
// cgroups

/// A per-test cgroup with `proxy/` and `app/` children. On drop, whatever still runs in them
/// (only processes the test started) is killed and the directories are removed.
pub struct TestCgroup {
    pub base: PathBuf,
    pub proxy: PathBuf,
    pub app: PathBuf,
}

impl TestCgroup {
    pub fn new(mount: &Path, tag: &str) -> io::Result<TestCgroup> {
        let base = mount.join(format!("sluice-e2e-fp-{}-{tag}", std::process::id()));
        if base.exists() {
            // Left over by an earlier run of this very process id: start clean.
            drop(TestCgroup { proxy: base.join("proxy"), app: base.join("app"), base: base.clone() });
        }
        fs::create_dir(&base)?;
        let cg = TestCgroup { proxy: base.join("proxy"), app: base.join("app"), base };
        fs::create_dir(&cg.proxy)?;
        fs::create_dir(&cg.app)?;
        Ok(cg)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for dir in [&self.app, &self.proxy, &self.base] {
            if !dir.exists() {
                continue;
            }
            // cgroup.kill (5.14+) kills every process of the cgroup and its descendants: here
            // only the Sluice and client processes this test placed there.
            let _ = fs::write(dir.join("cgroup.kill"), "1");
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() > deadline => {
                        eprintln!("warning: cannot remove {}: {e}", dir.display());
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

/// "node" and "pod" network namespaces joined by a veth pair with link-local /30 addresses and
/// no other route. Removed on drop (which also removes the veth pair).
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
    pub fn create() -> io::Result<NetnsPair> {
        let id = std::process::id();
        let pair = NetnsPair {
            node: format!("sfp{id}node"),
            pod: format!("sfp{id}pod"),
            node_ip: "169.254.78.1",
            pod_ip: "169.254.78.2",
        };
        // Constructed first, so that a failure half-way still removes what was made.
        let _ = ip(&["netns", "del", &pair.node]);
        let _ = ip(&["netns", "del", &pair.pod]);
        ip(&["netns", "add", &pair.node])?;
        ip(&["netns", "add", &pair.pod])?;
        ip(&[
            "-n",
            &pair.node,
            "link",
            "add",
            "veth-node",
            "type",
            "veth",
            "peer",
            "name",
            "veth-pod",
            "netns",
            &pair.pod,
        ])?;
        ip(&["-n", &pair.node, "addr", "add", &format!("{}/30", pair.node_ip), "dev", "veth-node"])?;
        ip(&["-n", &pair.pod, "addr", "add", &format!("{}/30", pair.pod_ip), "dev", "veth-pod"])?;
        for (ns, dev) in [(&pair.node, "veth-node"), (&pair.pod, "veth-pod")] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(pair)
    }

    pub fn path(name: &str) -> PathBuf {
        Path::new("/var/run/netns").join(name)
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

// ---------------------------------------------------------------------------------------------
// Placing processes

/// Where a process runs: a cgroup directory, optionally a named network namespace.
#[derive(Clone, Copy)]
pub struct Place<'a> {
    pub cgroup: Option<&'a Path>,
    pub netns: Option<&'a str>,
}

impl<'a> Place<'a> {
    pub fn cgroup(dir: &'a Path) -> Self {
        Place { cgroup: Some(dir), netns: None }
    }

    pub fn in_netns(self, netns: &'a str) -> Self {
        Place { netns: Some(netns), ..self }
    }
}

/// `program args...` started in `place`: a shell joins the cgroup and execs (`nsenter` for the
/// network namespace, which keeps the mount namespace: `ip netns exec` would remount /sys and
/// hide the cgroup tree Sluice needs). The pid of the returned child ends up being the
/// program's own.
pub fn command_in(place: Place<'_>, program: &Path) -> Command {
    let mut argv: Vec<std::ffi::OsString> = Vec::new();
    if let Some(ns) = place.netns {
        argv.push("nsenter".into());
        argv.push(format!("--net={}", NetnsPair::path(ns).display()).into());
    }
    argv.push(program.into());
    match place.cgroup {
        Some(dir) => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#).arg(dir).args(argv);
            c
        }
        None => {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
    }
}

/// A child process that is killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// This test binary, on its child entry point, with `spec` as its role.
fn child_command(place: Place<'_>, spec: &Value) -> Command {
    let exe = std::env::current_exe().expect("path of the test binary");
    let mut c = command_in(place, &exe);
    c.args(["fastpath_child", "--exact", "--ignored", "--nocapture", "--test-threads=1", "-q"])
        .env(CHILD_ENV, spec.to_string());
    c
}

/// Runs a client role to completion (killed after `deadline`) and returns its result.
pub fn run_client(place: Place<'_>, spec: Value, deadline: Duration) -> Value {
    let mut cmd = child_command(place, &spec);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = Proc(cmd.spawn().expect("spawning the client process"));
    let start = Instant::now();
    loop {
        match child.0.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() > deadline => {
                let _ = child.0.kill();
                let (out, err) = drain(&mut child.0);
                panic!("client {spec} ran over {deadline:?}; stdout: {out}; stderr: {err}");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for the client: {e}"),
        }
    }
    let (out, err) = drain(&mut child.0);
    out.lines()
        .find_map(|l| l.strip_prefix(child::RESULT_PREFIX))
        .and_then(|json| serde_json::from_str(json).ok())
        .unwrap_or_else(|| panic!("client {spec} printed no result; stdout: {out}; stderr: {err}"))
}

fn drain(child: &mut Child) -> (String, String) {
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    (out, err)
}

/// An echo backend process (see [`child`]) listening on `bind` inside `place`.
pub struct BackendProc {
    pub addr: SocketAddr,
    _proc: Proc,
}

impl BackendProc {
    pub fn start(place: Place<'_>, bind: &str) -> BackendProc {
        let spec = serde_json::json!({"role": "backend", "bind": bind});
        let mut cmd = child_command(place, &spec);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut proc = Proc(cmd.spawn().expect("spawning the backend process"));
        let stdout = proc.0.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix(child::LISTENING_PREFIX) {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(20)).expect("the backend process did not start listening");
        BackendProc { addr: addr.parse().expect("backend address"), _proc: proc }
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// What the CEC and the Services describe.
pub struct Layout<'a> {
    /// The frontend Service's cluster IP and port (the VIP clients connect to).
    pub vip: SocketAddr,
    /// An explicit listener address; `None` lets Sluice allocate a loopback port.
    pub listener: Option<SocketAddr>,
    /// The endpoint of the backend Service the route goes to.
    pub backend: SocketAddr,
    /// `metadata.name` of the CEC (listener `default/<name>/<name>`).
    pub name: &'a str,
}

impl Layout<'_> {
    pub fn listener_name(&self) -> String {
        format!("default/{0}/{0}", self.name)
    }

    pub fn files(&self) -> Vec<(&'static str, String)> {
        let address = match self.listener {
            Some(a) => {
                format!("      address: {{socket_address: {{address: \"{}\", port_value: {}}}}}\n", a.ip(), a.port())
            }
            None => String::new(),
        };
        let name = self.name;
        let cec = format!(
            r#"apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {{name: {name}, namespace: default}}
spec:
  services: [{{name: web, namespace: default}}]
  backendServices: [{{name: web-backend, namespace: default}}]
  resources:
    - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
      name: {name}
{address}      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: {name}
                rds: {{route_config_name: {name}}}
                http_filters: [{{name: envoy.filters.http.router}}]
    - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
      name: {name}
      virtual_hosts:
        - name: {name}
          domains: ["*"]
          routes:
            - match: {{prefix: /}}
              route: {{cluster: default/web-backend}}
              request_headers_to_add:
                - header: {{key: {ROUTE_HEADER}, value: {ROUTE_VALUE}}}
    - {{"@type": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: default/web-backend, type: EDS, connect_timeout: 2s}}
"#
        );
        let services = format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: {vip_ip}
  clusterIPs: ["{vip_ip}"]
  ports: [{{name: http, port: {vip_port}, protocol: TCP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web-backend, namespace: default}}
spec:
  clusterIP: None
  ports: [{{name: http, port: {be_port}, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-backend-1
  namespace: default
  labels: {{kubernetes.io/service-name: web-backend}}
addressType: IPv4
endpoints: [{{addresses: ["{be_ip}"], conditions: {{ready: true}}}}]
ports: [{{name: http, port: {be_port}, protocol: TCP}}]
"#,
            vip_ip = self.vip.ip(),
            vip_port = self.vip.port(),
            be_ip = self.backend.ip(),
            be_port = self.backend.port(),
        );
        vec![("cec.yaml", cec), ("services.yaml", services)]
    }
}

// ---------------------------------------------------------------------------------------------
// Sluice

/// How Sluice is started.
pub struct SluiceOpts<'a> {
    pub cgroup: &'a TestCgroup,
    /// Network namespace to run in (the pod test's "node").
    pub netns: Option<&'a str>,
    /// `SLUICE_FAST_PATH_NODE_ADDRESS`.
    pub node_address: Option<&'a str>,
}

/// A running `sluice run --fast-path on`, in the test cgroup's `proxy/` child, with `app/` as
/// its splice cgroup. Killed on drop.
pub struct SluiceProc {
    proc: Proc,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
    /// Reachable only when Sluice runs in the test's own network namespace.
    pub admin: SocketAddr,
}

/// Why Sluice could not start.
pub enum StartError {
    /// The host lacks what the fast path needs (the message says what): skip.
    Unsupported(String),
}

impl SluiceProc {
    pub fn start(files: &[(&str, String)], opts: SluiceOpts<'_>) -> Result<SluiceProc, StartError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config");
        fs::create_dir(&config).expect("config dir");
        for (name, content) in files {
            fs::write(config.join(name), content).expect("write config");
        }
        let log = dir.path().join("sluice.log");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("admin address");
        let lo = crate::common::proxy_port_block(20);
        let place = Place { cgroup: Some(&opts.cgroup.proxy), netns: opts.netns };
        let mut cmd = command_in(place, Path::new(env!("CARGO_BIN_EXE_sluice")));
        cmd.args(["run", "--config"])
            .arg(&config)
            .args(["--workers", "1", "--no-health-metrics", "--admin-address", &admin.to_string()])
            .args(["--proxy-port-range", &format!("{lo}-{}", lo + 19)])
            .args(["--fast-path", "on", "--fast-path-cgroup"])
            .arg(&opts.cgroup.base)
            .args(["--log-format", "json"])
            // The tests read the fast path's status and "configuration applied" from the log,
            // whatever else SLUICE_TEST_LOG asks for.
            .env(
                "SLUICE_LOG",
                format!(
                    "{},sluice::config=info,sluice_proxy::fastpath=debug,sluice_bpf=info",
                    std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "warn".into())
                ),
            )
            .env("SLUICE_FAST_PATH_SPLICE_CGROUPS", &opts.cgroup.app)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(fs::File::create(&log).expect("log file")));
        match opts.node_address {
            Some(a) => cmd.env("SLUICE_FAST_PATH_NODE_ADDRESS", a),
            None => cmd.env_remove("SLUICE_FAST_PATH_NODE_ADDRESS"),
        };
        let proc = Proc(cmd.spawn().expect("spawn sluice"));
        let s = SluiceProc { proc, dir, log, admin };
        s.wait_configured()?;
        Ok(s)
    }

    pub fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    /// Waits for the first configuration to be applied (which installs the Service table).
    fn wait_configured(&self) -> Result<(), StartError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if !self.logged("configuration applied").is_empty() {
                return Ok(());
            }
            self.check_alive()?;
            assert!(Instant::now() < deadline, "sluice applied no configuration within 20 s:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn check_alive(&self) -> Result<(), StartError> {
        // `try_wait` needs `&mut`; /proc tells whether the process is gone (or a zombie).
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next().unwrap_or('?')).unwrap_or('X');
        if state != 'Z' && state != 'X' {
            return Ok(());
        }
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        if let Some(pos) = text.find("eBPF fast path unavailable: ") {
            let reason = text[pos..].lines().next().unwrap_or("").trim_end_matches(['"', '}']).to_string();
            return Err(StartError::Unsupported(reason));
        }
        panic!("sluice exited during start-up:\n{}", self.log_tail());
    }

    /// Waits until Sluice listens on `port` in its own network namespace.
    pub fn wait_listening(&self, port: u16) {
        let exe = fs::canonicalize(env!("CARGO_BIN_EXE_sluice")).expect("sluice binary");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Until the shell has exec'd Sluice, /proc/<pid>/net shows the shell's namespace.
            let is_sluice = fs::read_link(format!("/proc/{}/exe", self.pid())).is_ok_and(|p| p == exe);
            if is_sluice && listening_ports(self.pid()).contains(&port) {
                return;
            }
            assert!(Instant::now() < deadline, "sluice does not listen on port {port}:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The first IPv4 address of a listener, from the admin API (same namespace only), once
    /// Sluice listens on it.
    pub fn listener(&self, name: &str) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok((200, body)) = crate::common::blocking_get(self.admin, "/listeners")
                && let Ok(v) = serde_json::from_str::<Value>(&body)
                && let Some(addr) = v.as_array().into_iter().flatten().find(|l| l["name"] == name).and_then(|l| {
                    l["addresses"]
                        .as_array()
                        .and_then(|a| a.iter().filter_map(Value::as_str).find(|x| !x.starts_with('[')))
                })
            {
                let addr: SocketAddr = addr.parse().expect("listener address");
                self.wait_listening(addr.port());
                return addr;
            }
            assert!(Instant::now() < deadline, "listener {name} not found:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_lines(&self) -> Vec<String> {
        fs::read_to_string(&self.log).unwrap_or_default().lines().map(str::to_string).collect()
    }

    pub fn log_tail(&self) -> String {
        let lines = self.log_lines();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The fast path's status (counters, SOCKHASH size, pending original destinations):
    /// rewrites a config file unchanged, which makes Sluice reload and log it.
    pub fn fast_path_status(&self) -> Value {
        let seen = self.status_lines().len();
        let file = self.config_dir().join("services.yaml");
        let content = fs::read(&file).expect("read services.yaml");
        let tmp = self.config_dir().join(".services.yaml.tmp");
        fs::write(&tmp, content).expect("write");
        fs::rename(&tmp, &file).expect("rename");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.status_lines().into_iter().nth(seen) {
                return s;
            }
            assert!(Instant::now() < deadline, "no fast path status after a reload:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn status_lines(&self) -> Vec<Value> {
        self.log_lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["fields"]["message"] == "fast path status")
            .filter_map(|v| v["fields"]["status"].as_str().and_then(|s| serde_json::from_str(s).ok()))
            .collect()
    }

    /// Log lines whose message is `message`, as their `fields` objects.
    pub fn logged(&self, message: &str) -> Vec<Value> {
        self.log_lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["fields"]["message"] == message)
            .map(|v| v["fields"].clone())
            .collect()
    }

    /// SIGTERM, then waits for the exit; returns the counters Sluice logs on the way out.
    pub fn stop(mut self) -> Value {
        let status = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("kill -TERM");
        assert!(status.success(), "kill -TERM {}", self.pid());
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.proc.0.try_wait().ok().flatten().is_none() {
            assert!(Instant::now() < deadline, "sluice did not stop on SIGTERM:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(20));
        }
        let line = self.logged("eBPF fast path counters at shutdown").pop();
        line.and_then(|f| f["stats"].as_str().and_then(|s| serde_json::from_str(s).ok()))
            .unwrap_or_else(|| panic!("no shutdown counters in the log:\n{}", self.log_tail()))
    }
}

/// Ports in LISTEN state in the network namespace of process `pid` (IPv4 and IPv6).
fn listening_ports(pid: u32) -> Vec<u16> {
    let mut out = Vec::new();
    for file in ["tcp", "tcp6"] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 3
                && cols[3] == "0A"
                && let Some(port) = cols[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok())
            {
                out.push(port);
            }
        }
    }
    out
}

pub fn free_port() -> u16 {
    crate::common::free_port()
}

/// Counter `name` of a status (`status["stats"][name]`) or of shutdown counters.
pub fn counter(v: &Value, name: &str) -> u64 {
    let stats = if v.get("stats").is_some() { &v["stats"] } else { v };
    stats[name].as_u64().unwrap_or_else(|| panic!("no counter {name} in {v}"))
}

/// `after - before` for counter `name`.
pub fn delta(before: &Value, after: &Value, name: &str) -> u64 {
    counter(after, name) - counter(before, name)
}

/// Polls `f` until it returns `Some`, up to `limit`.
pub fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
