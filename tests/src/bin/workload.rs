//! Ground-truth workloads for the tracer's integration tests.
//!
//! Every scenario allocates anonymous memory with `mmap`, touches one byte per page so that
//! the pages become resident, and computes an ORACLE: the sum of `VmRSS` (from
//! `/proc/PID/status`) of every live process of its tree, read while all the memory of the
//! scenario is held. Synchronisation uses pipes as real barriers (never sleeps): a child
//! writes to its "ready" pipe once it holds its memory and then blocks reading its "release"
//! pipe; the parent samples VmRSS while every child is blocked, then releases and reaps them.
//!
//! Exactly one JSON line is printed on stdout at the end:
//! `{"scenario":"...","oracle_bytes":N,"pids":[...],"detail":{...}}`.
//! (`faults`, a benchmark rather than a ground truth, prints
//! `{"scenario":"faults","elapsed_ns":N,"pages":P}` instead.)
//! Diagnostics go to stderr. Exit status 0 means success.

use std::ffi::{CStr, CString, c_char, c_void};
use std::io::Write as _;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::ExitCode;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand, ValueEnum};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags, madvise, mmap_anonymous, munmap};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, getpid, pipe2};
use serde::Serialize;
use serde_json::{Value, json};

const MIB: usize = 1 << 20;

#[derive(Parser, Debug)]
#[command(
    name = "workload",
    about = "Ground-truth memory workloads: allocate, touch, and report the summed VmRSS oracle as one JSON line"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// One process: map+touch MiB, read own VmRSS, hold, munmap, then a quiet tail.
    Spike {
        #[arg(long, default_value_t = 256)]
        mib: usize,
        /// How long to hold the memory after the oracle is read.
        #[arg(long, default_value_t = 1)]
        hold_ms: u64,
        /// Quiet period after munmap before exiting.
        #[arg(long, default_value_t = 300)]
        tail_ms: u64,
    },
    /// N forked children hold MiB each at the same time.
    Together {
        #[arg(long, default_value_t = 4)]
        children: usize,
        #[arg(long, default_value_t = 64)]
        mib: usize,
    },
    /// N forked children hold MiB each, one after the other (oracle = max over children).
    Sequential {
        #[arg(long, default_value_t = 4)]
        children: usize,
        #[arg(long, default_value_t = 100)]
        mib: usize,
    },
    /// One process, N threads; each maps its own MiB, or all touch one shared MiB region.
    Threads {
        #[arg(long, default_value_t = 4)]
        threads: usize,
        #[arg(long, default_value_t = 64)]
        mib: usize,
        /// All threads touch the SAME region (mapped once by the main thread).
        #[arg(long)]
        shared: bool,
    },
    /// A chain of `depth` descendants (child, grandchild, ...), each holding MiB.
    Nested {
        #[arg(long, default_value_t = 4)]
        depth: usize,
        #[arg(long, default_value_t = 32)]
        mib: usize,
    },
    /// N children that exec this binary's `hold` subcommand via posix_spawn or vfork+execv.
    Spawn {
        #[arg(long, default_value_t = 2)]
        children: usize,
        #[arg(long, default_value_t = 64)]
        mib: usize,
        #[arg(long, value_enum, default_value = "posix_spawn")]
        via: Via,
    },
    /// Parent maps MAP_SHARED|MAP_ANONYMOUS MiB; N forked children touch all of it too.
    SharedAnon {
        #[arg(long, default_value_t = 3)]
        children: usize,
        #[arg(long, default_value_t = 64)]
        mib: usize,
    },
    /// Benchmark: per round, map MiB of fresh private anonymous memory (no huge pages), write
    /// one byte per page, munmap. Prints `{"scenario":"faults","elapsed_ns":N,"pages":P}`, the
    /// time of the rounds only (not process start-up).
    Faults {
        #[arg(long, default_value_t = 2048)]
        mib: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Test client of `tracer serve`: sends each LINE to the socket and prints each answer line.
    #[command(hide = true)]
    Request {
        #[arg(long)]
        socket: std::path::PathBuf,
        /// Request lines, sent in order.
        #[arg(required = true)]
        lines: Vec<String>,
    },
    /// Helper: map+touch MiB; with fds, signal ready-fd and block on release-fd (prints
    /// nothing); without fds, hold for hold-ms and print the oracle line.
    #[command(hide = true)]
    Hold {
        #[arg(long, default_value_t = 64)]
        mib: usize,
        #[arg(long, requires = "release_fd")]
        ready_fd: Option<RawFd>,
        #[arg(long, requires = "ready_fd")]
        release_fd: Option<RawFd>,
        #[arg(long, default_value_t = 100)]
        hold_ms: u64,
        /// Oracle of a whole task: sum the VmRSS of the topmost ancestor whose environment has
        /// this variable, and of all its descendants, while holding (no fds).
        #[arg(long, value_name = "VAR")]
        oracle_tree_env: Option<String>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    #[value(name = "posix_spawn", alias = "posix-spawn")]
    PosixSpawn,
    #[value(name = "vfork")]
    Vfork,
}

impl Cmd {
    fn name(&self) -> &'static str {
        match self {
            Cmd::Spike { .. } => "spike",
            Cmd::Together { .. } => "together",
            Cmd::Sequential { .. } => "sequential",
            Cmd::Threads { .. } => "threads",
            Cmd::Nested { .. } => "nested",
            Cmd::Spawn { .. } => "spawn",
            Cmd::SharedAnon { .. } => "shared-anon",
            Cmd::Faults { .. } => "faults",
            Cmd::Hold { .. } => "hold",
            Cmd::Request { .. } => "request",
        }
    }
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::PosixSpawn => "posix_spawn",
            Via::Vfork => "vfork",
        }
    }
}

/// The single JSON line printed on stdout.
#[derive(Serialize, Debug)]
struct Report {
    scenario: &'static str,
    oracle_bytes: u64,
    pids: Vec<i32>,
    detail: Value,
}

/// One VmRSS reading of one process at a barrier.
#[derive(Serialize, Debug, Clone)]
struct Sample {
    pid: i32,
    role: String,
    vmrss_bytes: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let scenario = cli.cmd.name();
    match run(cli.cmd).and_then(|r| r.map_or(Ok(()), |r| emit(&r))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("workload {scenario} (pid {}): error: {e:#}", getpid());
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<Option<Report>> {
    Ok(Some(match cmd {
        Cmd::Spike {
            mib,
            hold_ms,
            tail_ms,
        } => spike(mib, hold_ms, tail_ms)?,
        Cmd::Together { children, mib } => together(children, mib)?,
        Cmd::Sequential { children, mib } => sequential(children, mib)?,
        Cmd::Threads {
            threads,
            mib,
            shared,
        } => threads_scenario(threads, mib, shared)?,
        Cmd::Nested { depth, mib } => nested(depth, mib)?,
        Cmd::Spawn { children, mib, via } => spawn(children, mib, via)?,
        Cmd::SharedAnon { children, mib } => shared_anon(children, mib)?,
        Cmd::Faults { mib, rounds } => return faults(mib, rounds),
        Cmd::Hold {
            mib,
            ready_fd,
            release_fd,
            hold_ms,
            oracle_tree_env,
        } => {
            return hold(
                mib,
                ready_fd,
                release_fd,
                hold_ms,
                oracle_tree_env.as_deref(),
            );
        }
        Cmd::Request { socket, lines } => return request(&socket, &lines).map(|()| None),
    }))
}

/// One connection to `tracer serve`: each line out, each answer printed.
fn request(socket: &std::path::Path, lines: &[String]) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let mut answers = BufReader::new(stream.try_clone().context("cloning the socket")?);
    for line in lines {
        writeln!(stream, "{line}").context("sending")?;
        let mut answer = String::new();
        answers
            .read_line(&mut answer)
            .context("reading the answer")?;
        print!("{answer}");
    }
    Ok(())
}

fn emit(report: &impl Serialize) -> Result<()> {
    let line = serde_json::to_string(report).context("serialising the report")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").context("writing the report to stdout")?;
    out.flush().context("flushing stdout")?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Memory helpers
// ---------------------------------------------------------------------------------------------

/// `VmRSS` of `pid` in bytes, from `/proc/PID/status` (the kernel reports kB).
fn vmrss_bytes(pid: i32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .with_context(|| format!("no VmRSS line in {path} (process exited or is a zombie?)"))?;
    let mut fields = line["VmRSS:".len()..].split_whitespace();
    let kb: u64 = fields
        .next()
        .with_context(|| format!("empty VmRSS line in {path}: {line:?}"))?
        .parse()
        .with_context(|| format!("bad VmRSS value in {path}: {line:?}"))?;
    let unit = fields.next();
    ensure!(
        unit == Some("kB"),
        "unexpected VmRSS unit in {path}: {line:?}"
    );
    kb.checked_mul(1024)
        .with_context(|| format!("VmRSS overflows u64 in {path}: {line:?}"))
}

fn sample(pid: Pid, role: impl Into<String>) -> Result<Sample> {
    Ok(Sample {
        pid: pid.as_raw(),
        role: role.into(),
        vmrss_bytes: vmrss_bytes(pid.as_raw())?,
    })
}

fn total(samples: &[Sample]) -> u64 {
    samples.iter().map(|s| s.vmrss_bytes).sum()
}

fn page_size() -> Result<usize> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    ensure!(ps > 0, "sysconf(_SC_PAGESIZE) failed: {}", Errno::last());
    usize::try_from(ps).context("page size does not fit usize")
}

fn mib_bytes(mib: usize) -> Result<usize> {
    ensure!(mib > 0, "--mib must be at least 1");
    mib.checked_mul(MIB)
        .with_context(|| format!("--mib {mib} overflows usize bytes"))
}

/// An anonymous mapping, unmapped on drop.
struct Region {
    ptr: NonNull<c_void>,
    len: usize,
}

// SAFETY: the region is plain memory owned by this value; concurrent accesses only go
// through atomic byte stores (`touch`), so sharing it between threads is sound.
unsafe impl Send for Region {}
// SAFETY: see above.
unsafe impl Sync for Region {}

impl Region {
    /// Map `bytes` of anonymous read/write memory: private, or shared (`MAP_SHARED`).
    fn map(bytes: usize, shared: bool) -> Result<Region> {
        let len = NonZeroUsize::new(bytes).context("cannot map 0 bytes")?;
        let flags = if shared {
            MapFlags::MAP_SHARED
        } else {
            MapFlags::MAP_PRIVATE
        };
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                flags,
            )
        }
        .with_context(|| {
            format!(
                "mmap of {bytes} bytes ({}) failed",
                if shared { "shared" } else { "private" }
            )
        })?;
        Ok(Region { ptr, len: bytes })
    }

    /// Write one byte in every page so that every page becomes resident.
    fn touch(&self) -> Result<()> {
        let ps = page_size()?;
        let base = self.ptr.as_ptr().cast::<u8>();
        let mut off = 0;
        while off < self.len {
            // SAFETY: `off < len`, so the byte is inside the mapping, which is readable and
            // writable and lives as long as `self`. Atomic stores make concurrent touches
            // (threads --shared) free of data races.
            let byte = unsafe { AtomicU8::from_ptr(base.add(off)) };
            byte.store(1, Ordering::Relaxed);
            off += ps;
        }
        Ok(())
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping created by `Region::map` and owned by us.
        if let Err(e) = unsafe { munmap(self.ptr, self.len) } {
            eprintln!("workload: munmap of {} bytes failed: {e}", self.len);
        }
    }
}

/// Map `bytes` of private anonymous memory and touch every page.
fn map_and_touch(bytes: usize) -> Result<Region> {
    let region = Region::map(bytes, false)?;
    region.touch()?;
    Ok(region)
}

// ---------------------------------------------------------------------------------------------
// Pipe barriers and child processes
// ---------------------------------------------------------------------------------------------

fn cloexec_pipe() -> Result<(OwnedFd, OwnedFd)> {
    pipe2(OFlag::O_CLOEXEC).context("pipe2(O_CLOEXEC)")
}

fn write_all_fd(fd: BorrowedFd<'_>, mut buf: &[u8]) -> Result<()> {
    while !buf.is_empty() {
        match nix::unistd::write(fd, buf) {
            Ok(0) => bail!("write to fd {} wrote 0 bytes", fd.as_raw_fd()),
            Ok(n) => buf = &buf[n..],
            Err(Errno::EINTR) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("write to fd {}", fd.as_raw_fd()));
            }
        }
    }
    Ok(())
}

/// Read exactly `buf.len()` bytes; `Ok(false)` if EOF comes before the first byte.
fn read_exact_fd(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(fd, &mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => bail!(
                "EOF on fd {} after {got} of {} bytes",
                fd.as_raw_fd(),
                buf.len()
            ),
            Ok(n) => got += n,
            Err(Errno::EINTR) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("read from fd {}", fd.as_raw_fd()));
            }
        }
    }
    Ok(true)
}

/// Tell the parent that this process holds its memory.
fn signal_ready(ready_tx: BorrowedFd<'_>) -> Result<()> {
    write_all_fd(ready_tx, b"R").context("signalling ready")
}

/// Block until the parent releases us (one byte, or EOF if the parent went away).
fn wait_release(release_rx: BorrowedFd<'_>) -> Result<()> {
    let mut b = [0u8; 1];
    read_exact_fd(release_rx, &mut b).context("waiting for release")?;
    Ok(())
}

/// Wait for `pid` and require a clean exit (status 0).
fn wait_ok(pid: Pid) -> Result<()> {
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, 0)) => return Ok(()),
            Ok(WaitStatus::Exited(_, code)) => bail!("child {pid} exited with status {code}"),
            Ok(WaitStatus::Signaled(_, sig, _)) => bail!("child {pid} was killed by {sig:?}"),
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e).with_context(|| format!("waitpid({pid})")),
        }
    }
}

/// The parent's view of a child: its pid and the parent-side pipe ends.
///
/// Dropping an unreaped `Child` (error paths) closes the release pipe, which makes the child
/// stop waiting and exit, and then reaps it, so failures leave no orphans behind.
struct Child {
    pid: Pid,
    /// Read end: the child writes here once it holds its memory.
    ready_rx: OwnedFd,
    /// Write end: the parent writes one byte here to release the child (`None` once closed).
    release_tx: Option<OwnedFd>,
    reaped: bool,
}

/// The child's side of the two pipes.
struct ChildEnds {
    ready_tx: OwnedFd,
    release_rx: OwnedFd,
}

impl Child {
    fn new(pid: Pid, ready_rx: OwnedFd, release_tx: OwnedFd) -> Child {
        Child {
            pid,
            ready_rx,
            release_tx: Some(release_tx),
            reaped: false,
        }
    }

    /// Block until the child signals ready (reads exactly `buf.len()` bytes of payload).
    fn wait_ready_payload(&mut self, buf: &mut [u8]) -> Result<()> {
        let got = read_exact_fd(self.ready_rx.as_fd(), buf)
            .with_context(|| format!("waiting for child {} to signal ready", self.pid))?;
        if !got {
            let status = match self.reap() {
                Ok(()) => "exited with status 0".to_string(),
                Err(e) => format!("{e:#}"),
            };
            bail!(
                "child {} exited before signalling ready ({status})",
                self.pid
            );
        }
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        let mut b = [0u8; 1];
        self.wait_ready_payload(&mut b)
    }

    fn release(&self) -> Result<()> {
        let fd = self
            .release_tx
            .as_ref()
            .with_context(|| format!("release pipe of child {} already closed", self.pid))?;
        write_all_fd(fd.as_fd(), b"G").with_context(|| format!("releasing child {}", self.pid))
    }

    /// Wait for the child and require a clean exit (status 0).
    fn reap(&mut self) -> Result<()> {
        self.reaped = true;
        wait_ok(self.pid)
    }

    fn parent_side_fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.ready_rx.as_raw_fd()];
        fds.extend(self.release_tx.as_ref().map(AsRawFd::as_raw_fd));
        fds
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        // EOF on the release pipe makes a waiting child exit; then reap it.
        drop(self.release_tx.take());
        if let Err(e) = wait_ok(self.pid) {
            eprintln!("workload: while cleaning up: {e:#}");
        }
    }
}

/// Fork a child that runs `body` and then `_exit`s (0 on success, 1 on error, 101 on panic);
/// it never returns into the caller's code path. `close_in_child` lists fds the child must
/// close first (other children's parent-side pipe ends), so that a child's pipe ends are held
/// only by that child and its parent, and EOF reliably reports a dead peer.
///
/// Must be called while the process is single-threaded.
fn fork_child<F>(close_in_child: &[RawFd], body: F) -> Result<Child>
where
    F: FnOnce(ChildEnds) -> Result<()>,
{
    let (ready_rx, ready_tx) = cloexec_pipe()?;
    let (release_rx, release_tx) = cloexec_pipe()?;
    // Nothing has been written to stdout yet, but make sure no buffered byte gets duplicated.
    std::io::stdout()
        .flush()
        .context("flushing stdout before fork")?;
    // SAFETY: the workload is single-threaded whenever it forks (threads are only used by the
    // `threads` scenario, which never forks), so the child may run arbitrary code.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            for &fd in close_in_child {
                // SAFETY: these fds belong to the parent's bookkeeping, which this child never
                // touches again (it `_exit`s without running their destructors).
                unsafe { libc::close(fd) };
            }
            drop(ready_rx);
            drop(release_tx);
            let ends = ChildEnds {
                ready_tx,
                release_rx,
            };
            let code = match catch_unwind(AssertUnwindSafe(|| body(ends))) {
                Ok(Ok(())) => 0,
                Ok(Err(e)) => {
                    eprintln!("workload: forked child (pid {}): error: {e:#}", getpid());
                    1
                }
                Err(_) => {
                    eprintln!("workload: forked child (pid {}): panicked", getpid());
                    101
                }
            };
            // SAFETY: `_exit` terminates the child immediately, without returning into main's
            // code path and without running atexit handlers or flushing shared stdio buffers.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(ready_tx);
            drop(release_rx);
            Ok(Child::new(child, ready_rx, release_tx))
        }
    }
}

/// Child body: map+touch, signal ready, block until released, unmap.
fn hold_in_child(bytes: usize, ends: ChildEnds) -> Result<()> {
    let region = map_and_touch(bytes)?;
    signal_ready(ends.ready_tx.as_fd())?;
    wait_release(ends.release_rx.as_fd())?;
    drop(region);
    Ok(())
}

/// Wait for all children to hold, sample parent + children VmRSS, release and reap them all.
fn barrier_sample_release(mut kids: Vec<Child>, child_role: &str) -> Result<Vec<Sample>> {
    for k in &mut kids {
        k.wait_ready()?;
    }
    let mut samples = vec![sample(getpid(), "parent")?];
    for (i, k) in kids.iter().enumerate() {
        samples.push(sample(k.pid, format!("{child_role}{i}"))?);
    }
    for k in &kids {
        k.release()?;
    }
    for k in &mut kids {
        k.reap()?;
    }
    Ok(samples)
}

fn pids_of(samples: &[Sample]) -> Vec<i32> {
    samples.iter().map(|s| s.pid).collect()
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

fn spike(mib: usize, hold_ms: u64, tail_ms: u64) -> Result<Report> {
    let bytes = mib_bytes(mib)?;
    let region = map_and_touch(bytes)?;
    let s = sample(getpid(), "self")?;
    std::thread::sleep(Duration::from_millis(hold_ms));
    drop(region);
    let after = vmrss_bytes(getpid().as_raw())?;
    std::thread::sleep(Duration::from_millis(tail_ms));
    Ok(Report {
        scenario: "spike",
        oracle_bytes: s.vmrss_bytes,
        pids: vec![s.pid],
        detail: json!({
            "mib": mib,
            "hold_ms": hold_ms,
            "tail_ms": tail_ms,
            "vmrss_after_munmap_bytes": after,
            "processes": [s],
        }),
    })
}

fn together(children: usize, mib: usize) -> Result<Report> {
    ensure!(children >= 1, "--children must be at least 1");
    let bytes = mib_bytes(mib)?;
    let mut kids: Vec<Child> = Vec::with_capacity(children);
    for _ in 0..children {
        let close: Vec<RawFd> = kids.iter().flat_map(Child::parent_side_fds).collect();
        kids.push(fork_child(&close, |ends| hold_in_child(bytes, ends))?);
    }
    let samples = barrier_sample_release(kids, "child")?;
    Ok(Report {
        scenario: "together",
        oracle_bytes: total(&samples),
        pids: pids_of(&samples),
        detail: json!({
            "mib": mib,
            "children": children,
            "processes": samples,
        }),
    })
}

fn sequential(children: usize, mib: usize) -> Result<Report> {
    ensure!(children >= 1, "--children must be at least 1");
    let bytes = mib_bytes(mib)?;
    let me = getpid();
    let mut pids = vec![me.as_raw()];
    let mut moments = Vec::with_capacity(children);
    let mut oracle = 0u64;
    for i in 0..children {
        let mut kid = fork_child(&[], |ends| hold_in_child(bytes, ends))?;
        kid.wait_ready()?;
        let parent = sample(me, "parent")?;
        let child = sample(kid.pid, format!("child{i}"))?;
        kid.release()?;
        kid.reap()?;
        let sum = parent.vmrss_bytes + child.vmrss_bytes;
        oracle = oracle.max(sum);
        pids.push(kid.pid.as_raw());
        moments.push(json!({
            "child_index": i,
            "sum_bytes": sum,
            "processes": [parent, child],
        }));
    }
    Ok(Report {
        scenario: "sequential",
        oracle_bytes: oracle,
        pids,
        detail: json!({
            "mib": mib,
            "children": children,
            "moments": moments,
        }),
    })
}

fn threads_scenario(threads: usize, mib: usize, shared: bool) -> Result<Report> {
    ensure!(threads >= 1, "--threads must be at least 1");
    let bytes = mib_bytes(mib)?;
    let ready = Arc::new(Barrier::new(threads + 1));
    let release = Arc::new(Barrier::new(threads + 1));
    let shared_region = if shared {
        Some(Arc::new(Region::map(bytes, false)?))
    } else {
        None
    };
    let mut handles = Vec::with_capacity(threads);
    for i in 0..threads {
        let ready = Arc::clone(&ready);
        let release = Arc::clone(&release);
        let shared_region = shared_region.clone();
        // If spawning fails, main returns an error and the process exit ends the threads
        // already blocked on the barrier.
        let h = std::thread::Builder::new()
            .name(format!("workload-{i}"))
            .spawn(move || -> Result<()> {
                // Every thread reaches both barriers even on failure, so main never deadlocks;
                // the error is reported after the join.
                let held = match &shared_region {
                    Some(r) => r.touch().map(|()| None),
                    None => map_and_touch(bytes).map(Some),
                };
                ready.wait();
                release.wait();
                drop(held?);
                Ok(())
            })
            .with_context(|| format!("spawning thread {i}"))?;
        handles.push(h);
    }
    ready.wait();
    let sampled = sample(getpid(), "self");
    release.wait();
    for (i, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(r) => r.with_context(|| format!("thread {i}"))?,
            Err(_) => bail!("thread {i} panicked"),
        }
    }
    drop(shared_region);
    let s = sampled?;
    Ok(Report {
        scenario: "threads",
        oracle_bytes: s.vmrss_bytes,
        pids: vec![s.pid],
        detail: json!({
            "mib": mib,
            "threads": threads,
            "shared": shared,
            "processes": [s],
        }),
    })
}

/// One level of the `nested` chain (level 1 = child of the top process, ..., level `depth`).
/// Sends up `depth - level + 1` pids (its own first, then those received from below).
fn nested_level(level: usize, depth: usize, bytes: usize, ends: ChildEnds) -> Result<()> {
    // Fork the next level before mapping, so it does not inherit (COW-share and count in its
    // own RSS) the pages this level is about to touch. The next level must not keep our
    // pipe ends to our parent.
    let mut below = if level < depth {
        let close = [ends.ready_tx.as_raw_fd(), ends.release_rx.as_raw_fd()];
        Some(fork_child(&close, |e| {
            nested_level(level + 1, depth, bytes, e)
        })?)
    } else {
        None
    };
    let region = map_and_touch(bytes)?;
    let mut msg = getpid().as_raw().to_le_bytes().to_vec();
    if let Some(kid) = &mut below {
        let mut from_below = vec![0u8; 4 * (depth - level)];
        kid.wait_ready_payload(&mut from_below)?;
        msg.extend_from_slice(&from_below);
    }
    write_all_fd(ends.ready_tx.as_fd(), &msg).context("sending pids up the chain")?;
    wait_release(ends.release_rx.as_fd())?;
    if let Some(kid) = &mut below {
        kid.release()?;
        kid.reap()?;
    }
    drop(region);
    Ok(())
}

fn nested(depth: usize, mib: usize) -> Result<Report> {
    ensure!(depth >= 1, "--depth must be at least 1");
    let bytes = mib_bytes(mib)?;
    let mut kid = fork_child(&[], |e| nested_level(1, depth, bytes, e))?;
    let mut buf = vec![0u8; 4 * depth];
    kid.wait_ready_payload(&mut buf)?;
    let chain: Vec<Pid> = buf
        .chunks_exact(4)
        .map(|c| Pid::from_raw(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    ensure!(
        chain.first() == Some(&kid.pid),
        "pid chain {chain:?} does not start with the direct child {}",
        kid.pid
    );
    let sampled = (|| -> Result<Vec<Sample>> {
        let mut samples = vec![sample(getpid(), "top")?];
        for (i, pid) in chain.iter().enumerate() {
            samples.push(sample(*pid, format!("level{}", i + 1))?);
        }
        Ok(samples)
    })();
    kid.release()?;
    kid.reap()?;
    let samples = sampled?;
    Ok(Report {
        scenario: "nested",
        oracle_bytes: total(&samples),
        pids: pids_of(&samples),
        detail: json!({
            "mib": mib,
            "depth": depth,
            "processes": samples,
        }),
    })
}

fn clear_cloexec(fd: BorrowedFd<'_>) -> Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))
        .with_context(|| format!("clearing FD_CLOEXEC on fd {}", fd.as_raw_fd()))?;
    Ok(())
}

fn spawn_posix(path: &CStr, argv: &[*mut c_char]) -> Result<Pid> {
    let mut pid: libc::pid_t = 0;
    // SAFETY: `path` and the NULL-terminated `argv` point to live C strings for the duration of
    // the call; `environ` is the process environment (the process is single-threaded here).
    let rc = unsafe {
        libc::posix_spawn(
            &mut pid,
            path.as_ptr(),
            std::ptr::null(),
            std::ptr::null(),
            argv.as_ptr(),
            libc::environ,
        )
    };
    if rc != 0 {
        return Err(Errno::from_raw(rc)).with_context(|| format!("posix_spawn({path:?})"));
    }
    Ok(Pid::from_raw(pid))
}

/// vfork + execv. Every argument is built by the caller before vfork; the child only calls
/// the async-signal-safe `execv` and `_exit(127)`.
#[inline(never)]
fn spawn_vfork(path: &CStr, argv: &[*mut c_char]) -> Result<Pid> {
    let path_ptr = path.as_ptr();
    let argv_ptr = argv.as_ptr().cast::<*const c_char>();
    // SAFETY: the child shares our memory until it execs; it touches nothing but the
    // pre-built pointers and only calls execv and _exit.
    #[allow(deprecated)]
    let pid = unsafe { libc::vfork() };
    if pid == 0 {
        // SAFETY: see above; on exec failure the child exits without returning.
        unsafe {
            libc::execv(path_ptr, argv_ptr);
            libc::_exit(127);
        }
    }
    if pid < 0 {
        return Err(Errno::last()).context("vfork");
    }
    Ok(Pid::from_raw(pid))
}

fn spawn(children: usize, mib: usize, via: Via) -> Result<Report> {
    ensure!(children >= 1, "--children must be at least 1");
    mib_bytes(mib)?;
    let exe = CString::new("/proc/self/exe").context("exe path")?;
    let mut kids: Vec<Child> = Vec::with_capacity(children);
    for i in 0..children {
        // Parent-side ends stay CLOEXEC (not inherited); the child's ends are made inheritable
        // and closed in the parent right after the spawn, so later children never get them.
        let (ready_rx, ready_tx) = cloexec_pipe()?;
        let (release_rx, release_tx) = cloexec_pipe()?;
        clear_cloexec(ready_tx.as_fd())?;
        clear_cloexec(release_rx.as_fd())?;
        let args = [
            "workload".to_string(),
            "hold".to_string(),
            "--mib".to_string(),
            mib.to_string(),
            "--ready-fd".to_string(),
            ready_tx.as_raw_fd().to_string(),
            "--release-fd".to_string(),
            release_rx.as_raw_fd().to_string(),
        ];
        let cargs = args
            .iter()
            .map(|a| CString::new(a.as_str()))
            .collect::<Result<Vec<_>, _>>()
            .context("building argv")?;
        let mut argv: Vec<*mut c_char> = cargs.iter().map(|c| c.as_ptr().cast_mut()).collect();
        argv.push(std::ptr::null_mut());
        let pid = match via {
            Via::PosixSpawn => spawn_posix(&exe, &argv),
            Via::Vfork => spawn_vfork(&exe, &argv),
        }
        .with_context(|| format!("starting child {i} via {}", via.name()))?;
        drop(ready_tx);
        drop(release_rx);
        kids.push(Child::new(pid, ready_rx, release_tx));
    }
    let samples = barrier_sample_release(kids, "child")?;
    Ok(Report {
        scenario: "spawn",
        oracle_bytes: total(&samples),
        pids: pids_of(&samples),
        detail: json!({
            "mib": mib,
            "children": children,
            "via": via.name(),
            "processes": samples,
        }),
    })
}

fn shared_anon(children: usize, mib: usize) -> Result<Report> {
    ensure!(children >= 1, "--children must be at least 1");
    let bytes = mib_bytes(mib)?;
    let region = Region::map(bytes, true)?;
    region.touch()?;
    let mut kids: Vec<Child> = Vec::with_capacity(children);
    for _ in 0..children {
        let close: Vec<RawFd> = kids.iter().flat_map(Child::parent_side_fds).collect();
        kids.push(fork_child(&close, |ends| {
            region.touch()?;
            signal_ready(ends.ready_tx.as_fd())?;
            wait_release(ends.release_rx.as_fd())
        })?);
    }
    let samples = barrier_sample_release(kids, "child")?;
    drop(region);
    Ok(Report {
        scenario: "shared-anon",
        oracle_bytes: total(&samples),
        pids: pids_of(&samples),
        detail: json!({
            "mib": mib,
            "children": children,
            "processes": samples,
        }),
    })
}

/// The line `faults` prints (a benchmark result, not an oracle report).
#[derive(Serialize, Debug)]
struct FaultsReport {
    scenario: &'static str,
    elapsed_ns: u64,
    pages: u64,
}

fn faults(mib: usize, rounds: usize) -> Result<Option<Report>> {
    ensure!(rounds >= 1, "--rounds must be at least 1");
    let bytes = mib_bytes(mib)?;
    let pages_per_round = bytes.div_ceil(page_size()?);
    let start = Instant::now();
    for _ in 0..rounds {
        let region = Region::map(bytes, false)?;
        // One fault (and one `rss_stat` event) per 4 KiB page even where THP is "always".
        // SAFETY: the range is exactly the mapping `region` owns; the advice changes no contents.
        unsafe { madvise(region.ptr, region.len, MmapAdvise::MADV_NOHUGEPAGE) }
            .context("madvise(MADV_NOHUGEPAGE)")?;
        region.touch()?;
        drop(region);
    }
    let elapsed = start.elapsed();
    emit(&FaultsReport {
        scenario: "faults",
        elapsed_ns: u64::try_from(elapsed.as_nanos()).context("elapsed time overflows u64")?,
        pages: pages_per_round
            .checked_mul(rounds)
            .and_then(|p| u64::try_from(p).ok())
            .context("page count overflows")?,
    })?;
    Ok(None)
}

/// Take ownership of an inherited fd given by number, checking that it is open.
fn take_fd(fd: RawFd, what: &str) -> Result<OwnedFd> {
    ensure!(fd > 2, "--{what} {fd} must not be a standard stream");
    // SAFETY: the fd is only borrowed for the F_GETFD probe below.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    fcntl(borrowed, FcntlArg::F_GETFD)
        .with_context(|| format!("--{what} {fd} is not an open fd (was it inherited?)"))?;
    // Do not leak it into anything we might exec.
    fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .with_context(|| format!("setting FD_CLOEXEC on --{what} {fd}"))?;
    // SAFETY: the fd is open and was handed to us for our exclusive use by the parent.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn hold(
    mib: usize,
    ready_fd: Option<RawFd>,
    release_fd: Option<RawFd>,
    hold_ms: u64,
    oracle_tree_env: Option<&str>,
) -> Result<Option<Report>> {
    let bytes = mib_bytes(mib)?;
    match (ready_fd, release_fd) {
        (Some(r), Some(w)) => {
            let ready = take_fd(r, "ready-fd")?;
            let release = take_fd(w, "release-fd")?;
            let region = map_and_touch(bytes)?;
            signal_ready(ready.as_fd())?;
            wait_release(release.as_fd())?;
            drop(region);
            Ok(None)
        }
        (None, None) => {
            let region = map_and_touch(bytes)?;
            let samples = match oracle_tree_env {
                None => vec![sample(getpid(), "self")?],
                Some(var) => task_tree_samples(var)?,
            };
            std::thread::sleep(Duration::from_millis(hold_ms));
            drop(region);
            Ok(Some(Report {
                scenario: "hold",
                oracle_bytes: samples.iter().map(|s| s.vmrss_bytes).sum(),
                pids: pids_of(&samples),
                detail: json!({
                    "mib": mib,
                    "hold_ms": hold_ms,
                    "processes": samples,
                }),
            }))
        }
        _ => bail!("--ready-fd and --release-fd must be given together"),
    }
}

/// VmRSS of every process of the task this process runs in: the topmost ancestor whose environment
/// carries `var` (the task's root, listed first), and all of its descendants.
fn task_tree_samples(var: &str) -> Result<Vec<Sample>> {
    let parent_of = |pid: i32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let has_var = |pid: i32| {
        let prefix = format!("{var}=");
        std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
            env.split(|&b| b == 0)
                .any(|entry| entry.starts_with(prefix.as_bytes()))
        })
    };
    let mut root = getpid().as_raw();
    while let Some(parent) = parent_of(root).filter(|&parent| parent > 1 && has_var(parent)) {
        root = parent;
    }
    let mut children: std::collections::HashMap<i32, Vec<i32>> = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc")
        .context("listing /proc")?
        .flatten()
    {
        if let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
            && let Some(parent) = parent_of(pid)
        {
            children.entry(parent).or_default().push(pid);
        }
    }
    let mut tree = vec![root];
    let mut next = 0;
    while next < tree.len() {
        tree.extend(children.get(&tree[next]).into_iter().flatten());
        next += 1;
    }
    tree.into_iter()
        .enumerate()
        .map(|(index, pid)| {
            sample(
                Pid::from_raw(pid),
                if index == 0 { "task-root" } else { "task" },
            )
        })
        .collect()
}
