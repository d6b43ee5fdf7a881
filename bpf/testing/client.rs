//! Client process for the sluice-bpf integration tests (`bpf/tests/`); not part of Sluice.
//!
//! The tests need the client in another cgroup (and sometimes another network namespace)
//! than the proxy, and cgroup membership is per process, so the client is its own binary.
//! It uses only `std` and plain blocking sockets, like an unmodified application would.
//!
//! ```text
//! sluice-bpf-test-client echo  --addr VIP [--cgroup DIR] [--count N] [--concurrency C]
//!                              [--sizes 1,7,...] [--first B] [--chunk B] [--gap-us U]
//!                              [--stall-ms T] [--seed S]
//! sluice-bpf-test-client flood --addr VIP [--cgroup DIR] --total BYTES [--stall-ms T] [--seed S]
//! ```
//!
//! `echo`: each connection writes `size` pattern bytes (`first` bytes at once, then `chunk`
//! bytes every `gap-us`), shuts down its write side and checks that exactly the same bytes
//! come back. Prints one line:
//! `RESULT ok=.. stalls=.. corrupt=.. errors=.. spurious_eagain=.. peers=a,b first_error=..`
//!
//! `flood`: writes without reading until writes make no progress for `stall-ms` (or all
//! `total` bytes are written), prints `WROTE n`, waits for a line on stdin, writes the rest,
//! shuts down and prints `DONE n`.

use std::{
    collections::BTreeSet,
    io::{self, BufRead, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::PathBuf,
    process::ExitCode,
    sync::{
        Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

#[path = "pattern.rs"]
mod pattern;
use pattern::pattern;

#[derive(Clone, Debug)]
struct Args {
    mode: String,
    addr: SocketAddr,
    cgroup: Option<PathBuf>,
    count: usize,
    concurrency: usize,
    sizes: Vec<usize>,
    first: usize,
    chunk: usize,
    gap_us: u64,
    stall_ms: u64,
    total: usize,
    seed: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mode = it.next().ok_or("missing mode (echo|flood)")?;
    let mut args = Args {
        mode,
        addr: "127.0.0.1:9".parse().map_err(|e| format!("{e}"))?,
        cgroup: None,
        count: 1,
        concurrency: 1,
        sizes: vec![1024],
        first: usize::MAX,
        chunk: 64 * 1024,
        gap_us: 0,
        stall_ms: 5000,
        total: 0,
        seed: 1,
    };
    let mut have_addr = false;
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--addr" => {
                args.addr = value.parse().map_err(|e| format!("--addr {value}: {e}"))?;
                have_addr = true;
            }
            "--cgroup" => args.cgroup = Some(PathBuf::from(value)),
            "--count" => args.count = num(&value)? as usize,
            "--concurrency" => args.concurrency = num(&value)?.max(1) as usize,
            "--sizes" => {
                args.sizes = value
                    .split(',')
                    .map(|s| s.parse::<usize>().map_err(|e| format!("--sizes {s}: {e}")))
                    .collect::<Result<_, _>>()?;
            }
            "--first" => args.first = num(&value)? as usize,
            "--chunk" => args.chunk = num(&value)?.max(1) as usize,
            "--gap-us" => args.gap_us = num(&value)?,
            "--stall-ms" => args.stall_ms = num(&value)?,
            "--total" => args.total = num(&value)? as usize,
            "--seed" => args.seed = num(&value)?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if !have_addr {
        return Err("--addr is required".to_string());
    }
    if args.sizes.is_empty() {
        return Err("--sizes is empty".to_string());
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sluice-bpf-test-client: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(dir) = &args.cgroup {
        let procs = dir.join("cgroup.procs");
        if let Err(e) = std::fs::write(&procs, std::process::id().to_string()) {
            eprintln!("sluice-bpf-test-client: joining {}: {e}", procs.display());
            return ExitCode::from(2);
        }
    }
    let result = match args.mode.as_str() {
        "echo" => {
            run_echo(&args);
            Ok(())
        }
        "flood" => run_flood(&args),
        other => Err(io::Error::other(format!("unknown mode {other}"))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-bpf-test-client: {e}");
            ExitCode::FAILURE
        }
    }
}

enum Outcome {
    Ok(SocketAddr),
    Stall(String),
    Corrupt(String),
    Error(String),
}

#[derive(Default)]
struct Totals {
    ok: AtomicU64,
    stalls: AtomicU64,
    corrupt: AtomicU64,
    errors: AtomicU64,
    spurious_eagain: AtomicU64,
    peers: Mutex<BTreeSet<String>>,
    first_error: Mutex<Option<String>>,
}

fn run_echo(args: &Args) {
    let totals = Totals::default();
    let next = AtomicUsize::new(0);
    thread::scope(|s| {
        for _ in 0..args.concurrency.min(args.count.max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= args.count {
                        break;
                    }
                    let outcome = echo_one(args, i, &totals);
                    let (counter, err) = match outcome {
                        Outcome::Ok(peer) => {
                            if let Ok(mut p) = totals.peers.lock() {
                                p.insert(peer.to_string());
                            }
                            (&totals.ok, None)
                        }
                        Outcome::Stall(e) => (&totals.stalls, Some(e)),
                        Outcome::Corrupt(e) => (&totals.corrupt, Some(e)),
                        Outcome::Error(e) => (&totals.errors, Some(e)),
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    if let Some(e) = err
                        && let Ok(mut first) = totals.first_error.lock()
                        && first.is_none()
                    {
                        *first = Some(format!("conn {i}: {e}"));
                    }
                }
            });
        }
    });
    let peers = totals.peers.lock().map(|p| p.iter().cloned().collect::<Vec<_>>().join(",")).unwrap_or_default();
    let first_error = totals.first_error.lock().ok().and_then(|f| f.clone()).unwrap_or_else(|| "none".to_string());
    println!(
        "RESULT ok={} stalls={} corrupt={} errors={} spurious_eagain={} peers={} first_error={}",
        totals.ok.load(Ordering::Relaxed),
        totals.stalls.load(Ordering::Relaxed),
        totals.corrupt.load(Ordering::Relaxed),
        totals.errors.load(Ordering::Relaxed),
        totals.spurious_eagain.load(Ordering::Relaxed),
        if peers.is_empty() { "-".to_string() } else { peers },
        first_error,
    );
}

fn is_would_block(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted)
}

fn echo_one(args: &Args, conn: usize, totals: &Totals) -> Outcome {
    let size = args.sizes[conn % args.sizes.len()];
    let conn_id = conn as u64;
    let stall = Duration::from_millis(args.stall_ms);
    let stream = match TcpStream::connect_timeout(&args.addr, stall) {
        Ok(s) => s,
        Err(e) => return Outcome::Error(format!("connect {}: {e}", args.addr)),
    };
    let peer = match stream.peer_addr() {
        Ok(p) => p,
        Err(e) => return Outcome::Error(format!("getpeername: {e}")),
    };
    let writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => return Outcome::Error(format!("clone: {e}")),
    };
    // Short timeouts: a blocking read on a spliced socket may return EAGAIN early (a kernel
    // behaviour, see bpf/README.md), so timeouts and early EAGAINs are told apart by the clock.
    if let Err(e) = stream.set_read_timeout(Some(Duration::from_millis(100))) {
        return Outcome::Error(format!("SO_RCVTIMEO: {e}"));
    }
    if let Err(e) = writer.set_write_timeout(Some(Duration::from_millis(100))) {
        return Outcome::Error(format!("SO_SNDTIMEO: {e}"));
    }
    thread::scope(|s| {
        let write = s.spawn(|| write_pattern(writer, args, conn_id, size, stall));
        let read = read_echo(&stream, args, conn_id, size, stall, totals);
        let write = write.join().unwrap_or_else(|_| Err("writer thread panicked".to_string()));
        match (read, write) {
            (Outcome::Ok(_), Ok(())) => Outcome::Ok(peer),
            (Outcome::Ok(_), Err(e)) => Outcome::Error(e),
            (other, _) => other,
        }
    })
}

fn write_pattern(mut w: TcpStream, args: &Args, conn: u64, size: usize, stall: Duration) -> Result<(), String> {
    let mut offset = 0usize;
    let mut buf = Vec::new();
    let mut step = args.first.min(size);
    while offset < size {
        let len = step.min(size - offset);
        buf.clear();
        buf.extend((offset..offset + len).map(|o| pattern(args.seed, conn, o as u64)));
        let mut sent = 0;
        let mut last = Instant::now();
        while sent < len {
            match w.write(&buf[sent..]) {
                Ok(0) => return Err(format!("write returned 0 at {}", offset + sent)),
                Ok(n) => {
                    sent += n;
                    last = Instant::now();
                }
                Err(e) if is_would_block(&e) && last.elapsed() < stall => {}
                Err(e) => return Err(format!("write at {}: {e}", offset + sent)),
            }
        }
        offset += len;
        step = args.chunk;
        if args.gap_us > 0 && offset < size {
            thread::sleep(Duration::from_micros(args.gap_us));
        }
    }
    w.shutdown(Shutdown::Write).map_err(|e| format!("shutdown: {e}"))
}

fn read_echo(mut r: &TcpStream, args: &Args, conn: u64, size: usize, stall: Duration, totals: &Totals) -> Outcome {
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0usize;
    let mut last = Instant::now();
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                for (i, b) in buf[..n].iter().enumerate() {
                    let off = got + i;
                    if off >= size || *b != pattern(args.seed, conn, off as u64) {
                        return Outcome::Corrupt(format!(
                            "byte {off} of {size} differs (reordered, lost or extra bytes)"
                        ));
                    }
                }
                got += n;
                last = Instant::now();
            }
            Err(e) if is_would_block(&e) => {
                if last.elapsed() >= stall {
                    return Outcome::Stall(format!("no data for {stall:?} after {got} of {size} bytes"));
                }
                // Before the timeout: the kernel woke the reader without data.
                if last.elapsed() < Duration::from_millis(95) {
                    totals.spurious_eagain.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => return Outcome::Error(format!("read after {got} bytes: {e}")),
        }
    }
    if got != size {
        return Outcome::Corrupt(format!("echo ended after {got} of {size} bytes"));
    }
    Outcome::Ok(args.addr)
}

fn run_flood(args: &Args) -> io::Result<()> {
    let mut s = TcpStream::connect(args.addr)?;
    s.set_nonblocking(true)?;
    let stall = Duration::from_millis(args.stall_ms);
    let mut buf = vec![0u8; 64 * 1024];
    let mut written = 0usize;
    let mut last = Instant::now();
    let fill = |buf: &mut Vec<u8>, from: usize, len: usize| {
        buf.clear();
        buf.extend((from..from + len).map(|o| pattern(args.seed, 0, o as u64)));
    };
    // Phase 1: write without anyone reading, until the kernel stops taking bytes.
    while written < args.total && last.elapsed() < stall {
        let len = (64 * 1024).min(args.total - written);
        fill(&mut buf, written, len);
        match s.write(&buf[..len]) {
            Ok(n) => {
                written += n;
                last = Instant::now();
            }
            Err(e) if is_would_block(&e) => thread::sleep(Duration::from_millis(1)),
            Err(e) => return Err(e),
        }
    }
    println!("WROTE {written}");
    io::stdout().flush()?;
    let mut line = String::new();
    io::stdin().lock().read_line(&mut line)?;
    // Phase 2: the reader is back; write the rest with blocking writes.
    s.set_nonblocking(false)?;
    while written < args.total {
        let len = (64 * 1024).min(args.total - written);
        fill(&mut buf, written, len);
        match s.write(&buf[..len]) {
            Ok(n) => written += n,
            Err(e) if is_would_block(&e) => thread::sleep(Duration::from_millis(1)),
            Err(e) => return Err(e),
        }
    }
    s.shutdown(Shutdown::Write)?;
    println!("DONE {written}");
    io::stdout().flush()?;
    Ok(())
}
