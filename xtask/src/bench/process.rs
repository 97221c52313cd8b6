//! Running tracer and the workload for the benchmarks, and cleaning up after tracer.

use std::ffi::OsStr;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// The release binaries under test.
pub struct Bins {
    pub tracer: PathBuf,
    pub workload: PathBuf,
}

impl Bins {
    /// `tracer run --backend ebpf FLAGS... --`, with stdin from /dev/null; append the command.
    /// The backend is explicit so that a failure to load the programs is an error, not a
    /// silent fallback to polling.
    pub fn tracer_run<I: AsRef<OsStr>>(&self, flags: impl IntoIterator<Item = I>) -> Command {
        let mut cmd = Command::new(&self.tracer);
        cmd.args(["run", "--backend", "ebpf"])
            .args(flags)
            .arg("--")
            .stdin(Stdio::null());
        cmd
    }

    /// `workload ARGS...`, with stdin from /dev/null.
    pub fn workload(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.workload);
        cmd.args(args).stdin(Stdio::null());
        cmd
    }
}

/// Makes this process the reaper of its orphaned descendants: tracer leaves a child behind that
/// detaches the BPF programs after tracer has exited, and [`reap_orphans`] waits for it.
pub fn become_subreaper() -> Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer argument and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error()).context("prctl(PR_SET_CHILD_SUBREAPER)");
    }
    Ok(())
}

/// How long [`reap_orphans`] waits before giving up.
const ORPHAN_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until this process has no child left and returns how long that took. After a tracer run
/// that is tracer's background detacher, which closes the programs' last descriptors (the kernel
/// waits for RCU grace periods there, ~0.3 s); waiting keeps its programs from still being
/// attached while the next measurement runs. Call it only while no [`Child`] is pending: it reaps
/// whatever child exits.
pub fn reap_orphans() -> Result<Duration> {
    let start = Instant::now();
    loop {
        // SAFETY: waitpid with a null status pointer writes nothing.
        let pid = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        match pid {
            0 if start.elapsed() > ORPHAN_TIMEOUT => bail!(
                "children still running {} s after a benchmark run",
                ORPHAN_TIMEOUT.as_secs()
            ),
            0 => std::thread::sleep(Duration::from_millis(1)),
            -1 => {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::ECHILD) => return Ok(start.elapsed()),
                    Some(libc::EINTR) => {}
                    _ => return Err(err).context("waitpid(-1)"),
                }
            }
            _ => {}
        }
    }
}

/// Runs `cmd` to completion, capturing stdout and stderr; failing to start or a non-zero exit is
/// an error that quotes stderr.
pub fn output(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run `{}`", cmd::display(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            cmd::display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// What [`measure`] saw of one run.
pub struct Measured {
    pub status: ExitStatus,
    /// From spawning to reaping.
    pub wall: Duration,
    /// User + system CPU time of the process and of every descendant it waited for (for tracer:
    /// the whole command tree, and tracer).
    pub cpu: Duration,
    /// `ru_maxrss` in bytes: the largest RSS of the process itself or of one waited-for child.
    pub max_rss: u64,
}

/// Spawns `cmd` (stdio as the caller set it), waits for it with `wait4` and returns its status,
/// wall time and resource usage.
pub fn measure(cmd: &mut Command) -> Result<Measured> {
    let start = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot run `{}`", cmd::display(cmd)))?;
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    let mut status = 0;
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: both pointers are valid for writes for the duration of the call.
        let got = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if got == pid {
            break;
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err).context("wait4");
        }
    }
    let wall = start.elapsed();
    // Reaped above; `Child` has no destructor that would wait again.
    drop(child);
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.try_into().unwrap_or(0))
            + Duration::from_micros(t.tv_usec.try_into().unwrap_or(0))
    };
    Ok(Measured {
        status: ExitStatus::from_raw(status),
        wall,
        cpu: time(usage.ru_utime) + time(usage.ru_stime),
        max_rss: u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024,
    })
}

/// [`measure`], where anything but a zero exit status is an error.
pub fn measure_ok(cmd: &mut Command) -> Result<Measured> {
    let measured = measure(cmd)?;
    if !measured.status.success() {
        bail!("`{}` failed ({})", cmd::display(cmd), measured.status);
    }
    Ok(measured)
}

/// The fields of a `tracer run --json FILE` report that the benchmarks use.
pub struct Report {
    pub peak_rss_bytes: u64,
    pub exact: bool,
}

pub fn read_report(path: &Path) -> Result<Report> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let field = |key: &str| {
        value
            .get(key)
            .with_context(|| format!("no {key} in {}", path.display()))
    };
    Ok(Report {
        peak_rss_bytes: field("peak_rss_bytes")?
            .as_u64()
            .context("peak_rss_bytes is not a count")?,
        exact: field("exact")?
            .as_bool()
            .context("exact is not a boolean")?,
    })
}

/// A `tracer run -- sleep 1000` in the background: the programs are attached and see every
/// `rss_stat` event on the host, but only `sleep` is in its tree.
pub struct BackgroundTracer {
    child: Option<Child>,
}

/// `sleep` dies of the SIGTERM tracer forwards, and tracer exits as the shell would say it.
const KILLED_BY_SIGTERM: i32 = 128 + libc::SIGTERM;
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

impl BackgroundTracer {
    /// Starts it and returns once `sleep` runs: tracer attaches its programs before it starts
    /// the command, so from then on they are live.
    pub fn start(bins: &Bins, flags: &[&str]) -> Result<BackgroundTracer> {
        let mut cmd = bins.tracer_run(flags);
        cmd.args(["sleep", "1000"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot run `{}`", cmd::display(&cmd)))?;
        let mut tracer = BackgroundTracer { child: Some(child) };
        tracer.wait_for_command("sleep")?;
        Ok(tracer)
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("a running background tracer")
    }

    fn wait_for_command(&mut self, comm: &str) -> Result<()> {
        let pid = self.child().id();
        let start = Instant::now();
        loop {
            if self.child().try_wait()?.is_some() {
                let detail = match self.stop_now() {
                    Ok(stderr) => stderr,
                    Err(err) => format!("{err:#}"),
                };
                bail!(
                    "the background tracer exited before starting `{comm}`: {}",
                    detail.trim()
                );
            }
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .with_context(|| format!("reading the children of tracer (pid {pid})"))?;
            let running = children.split_whitespace().any(|kid| {
                std::fs::read_to_string(format!("/proc/{kid}/comm"))
                    .is_ok_and(|name| name.trim_end() == comm)
            });
            if running {
                return Ok(());
            }
            if start.elapsed() > ATTACH_TIMEOUT {
                bail!(
                    "the background tracer did not start `{comm}` within {} s",
                    ATTACH_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGTERM to tracer (it forwards it to `sleep`, then reports and exits); returns tracer's
    /// stderr once it and its background detacher are gone.
    pub fn stop(mut self) -> Result<String> {
        let stderr = self.stop_now()?;
        reap_orphans()?;
        Ok(stderr)
    }

    fn stop_now(&mut self) -> Result<String> {
        let Some(child) = self.child.take() else {
            return Ok(String::new());
        };
        let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let out = child
            .wait_with_output()
            .context("waiting for the background tracer")?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if cmd::exit_code(out.status) != KILLED_BY_SIGTERM {
            bail!(
                "the background tracer exited with {} instead of {KILLED_BY_SIGTERM}: {}",
                out.status,
                stderr.trim()
            );
        }
        Ok(stderr)
    }
}

impl Drop for BackgroundTracer {
    fn drop(&mut self) {
        // Error paths: never leave a tracer (and its attached programs) running.
        if let Err(err) = self.stop_now() {
            eprintln!("xtask: bench: stopping the background tracer: {err:#}");
        }
    }
}
