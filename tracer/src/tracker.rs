//! [`MemoryTracker`]: the library's one entry point, over whichever backend can run here.

use crate::{
    backend::{Backend, BackendKind, poll::PollTracker},
    error::{LoadError, TrackError},
    report::PeakReport,
    report::TreeSample,
    tasks::{TaskReport, TaskRules},
};
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// Which backend to use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BackendChoice {
    /// eBPF when it can load here, polling otherwise (the reason is kept, see
    /// [`MemoryTracker::fallback_reason`]).
    #[default]
    Auto,
    /// eBPF or an error saying why it cannot run.
    Ebpf,
    /// Polling, even where eBPF would work.
    Poll,
}

/// How to build a [`MemoryTracker`].
#[derive(Debug, Clone)]
pub struct TrackerOptions {
    /// Which backend.
    pub backend: BackendChoice,
    /// The polling backend's sampling interval.
    pub interval: Duration,
    /// Split runner trees into tasks by these rules (eBPF; see [`MemoryTracker::start_tracking_tasks`]).
    pub tasks: Option<TaskRules>,
}

impl Default for TrackerOptions {
    fn default() -> Self {
        TrackerOptions {
            backend: BackendChoice::Auto,
            interval: crate::backend::poll::DEFAULT_INTERVAL,
            tasks: None,
        }
    }
}

/// Tracks the peak memory of process trees: start with a pid, stop with a [`PeakReport`].
///
/// Each tracked pid's whole tree counts: the process, its threads, and every descendant it creates
/// (processes already below it when tracking starts included). Many pids can be tracked at once.
///
/// ```
/// use tracer::MemoryTracker;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut tracker = MemoryTracker::new()?; // eBPF if it can load here, polling otherwise
/// let mut task = std::process::Command::new("sh").args(["-c", "sleep 0.2"]).spawn()?;
/// tracker.start_tracking(task.id())?;
/// let so_far = tracker.peek(task.id()).expect("tracked");
/// assert!(so_far.peak_rss_bytes >= so_far.rss_bytes.max(0) as u64);
/// task.wait()?;
/// let report = tracker.stop_tracking(task.id()).expect("tracked");
/// println!("peak: {} bytes ({} backend)", report.peak_rss_bytes, report.backend);
/// # Ok(())
/// # }
/// ```
pub struct MemoryTracker {
    backend: Box<dyn Backend>,
    fallback_reason: Option<String>,
    started: HashMap<u32, Started>,
    kernel: String,
}

struct Started {
    at: Instant,
    command: Vec<String>,
}

impl MemoryTracker {
    /// A tracker with the default options: eBPF when it can load, polling every 100 ms otherwise.
    pub fn new() -> Result<MemoryTracker, LoadError> {
        MemoryTracker::with_options(TrackerOptions::default())
    }

    /// A tracker with chosen backend and interval. Fails only for [`BackendChoice::Ebpf`] when eBPF
    /// cannot run (the error says why), or when the polling backend cannot start.
    pub fn with_options(options: TrackerOptions) -> Result<MemoryTracker, LoadError> {
        let load_ebpf = || load_ebpf(options.tasks.clone());
        let poll = |fallback_reason| -> Result<MemoryTracker, LoadError> {
            let backend = PollTracker::new(options.interval, options.tasks.clone())
                .map_err(LoadError::Poll)?;
            Ok(MemoryTracker::over(Box::new(backend), fallback_reason))
        };
        match options.backend {
            BackendChoice::Poll => poll(None),
            BackendChoice::Ebpf => load_ebpf().map(|backend| MemoryTracker::over(backend, None)),
            BackendChoice::Auto => match load_ebpf() {
                Ok(backend) => Ok(MemoryTracker::over(backend, None)),
                Err(reason) => poll(Some(reason.to_string())),
            },
        }
    }

    fn over(backend: Box<dyn Backend>, fallback_reason: Option<String>) -> MemoryTracker {
        MemoryTracker {
            backend,
            fallback_reason,
            started: HashMap::new(),
            kernel: os_release(),
        }
    }

    /// The backend measuring.
    pub fn backend(&self) -> BackendKind {
        self.backend.kind()
    }

    /// Why [`BackendChoice::Auto`] fell back to polling, if it did.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    /// Starts tracking `pid` and its whole tree from now on.
    pub fn start_tracking(&mut self, pid: u32) -> Result<(), TrackError> {
        self.start_running(pid, false)
    }

    /// Starts tracking a running process, as a task runner if `runner`.
    fn start_running(&mut self, pid: u32, runner: bool) -> Result<(), TrackError> {
        if self.started.contains_key(&pid) {
            return Err(TrackError::AlreadyTracked(pid));
        }
        let command = crate::backend::command_line(pid);
        match runner {
            true => self.backend.start_runner(pid, false).map(drop)?,
            false => self.backend.start(pid)?,
        }
        self.started.insert(
            pid,
            Started {
                at: Instant::now(),
                command,
            },
        );
        Ok(())
    }

    /// Starts tracking a forked child before it calls `execve` (as a task runner if `runner`), where
    /// the backend can (eBPF); returns `false` when it cannot, and the caller must start tracking
    /// after the exec instead.
    #[cfg(target_os = "linux")]
    pub(crate) fn start_tracking_held(
        &mut self,
        pid: u32,
        command: Vec<String>,
        runner: bool,
    ) -> Result<bool, TrackError> {
        let registered = match runner {
            true => self.backend.start_runner(pid, true)?,
            false => self.backend.start_before_exec(pid)?,
        };
        if registered {
            self.started.insert(
                pid,
                Started {
                    at: Instant::now(),
                    command,
                },
            );
        }
        Ok(registered)
    }

    /// Starts tracking the running process `pid` as a task runner: its whole tree as with
    /// [`MemoryTracker::start_tracking`], and each task in it apart (see [`crate::tasks`]), reported
    /// by [`MemoryTracker::finished_tasks`] as it ends. Its current children become tasks at once
    /// (their use before now is unknown: their reports say so). Needs the eBPF backend and
    /// [`TrackerOptions::tasks`].
    pub fn start_tracking_tasks(&mut self, pid: u32) -> Result<(), TrackError> {
        self.start_running(pid, true)
    }

    /// Tasks of tracked runners that have ended since the last call, waiting up to `timeout` for one.
    pub fn finished_tasks(&mut self, timeout: Duration) -> Vec<TaskReport> {
        self.backend.finished_tasks(timeout)
    }

    /// The numbers of `pid`'s tree so far (`rss_bytes` now, `peak_rss_bytes` since tracking started),
    /// or `None` if it is not tracked.
    pub fn peek(&self, pid: u32) -> Option<TreeSample> {
        self.started
            .contains_key(&pid)
            .then(|| self.backend.peek(pid))
            .flatten()
    }

    /// Stops tracking `pid` and returns its tree's report, or `None` if it was not tracked.
    /// `exit_code` and `signal` are `None`: only the process's parent can know them.
    pub fn stop_tracking(&mut self, pid: u32) -> Option<PeakReport> {
        let started = self.started.remove(&pid)?;
        let sample = self.backend.stop(pid)?;
        Some(PeakReport::from_sample(
            sample,
            self.backend.kind().name(),
            started.command,
            started.at.elapsed(),
            self.kernel.clone(),
        ))
    }

    /// Kernel run statistics of the eBPF programs (empty for polling); see the benchmarks.
    pub fn program_stats(&self) -> Vec<crate::backend::ProgramStats> {
        self.backend.program_stats()
    }

    /// Pids being tracked.
    pub fn tracked(&self) -> impl Iterator<Item = u32> + '_ {
        self.started.keys().copied()
    }

    /// Entries in the eBPF backend's task and address-space maps, all trees together (`None` for
    /// polling). For diagnostics and tests: zero once every tracked tree has exited.
    pub fn kernel_map_entries(&self) -> Option<(usize, usize)> {
        self.backend.map_entries()
    }

    /// Releases the tracker so the process can exit at once: the eBPF backend's programs are
    /// detached by a background process (detaching waits for kernel RCU grace periods, ~0.3 s).
    /// Call it last, from a single-threaded process, just before exiting.
    pub fn detach_in_background(self) {
        self.backend.detach_in_background();
    }
}

#[cfg(target_os = "linux")]
fn load_ebpf(tasks: Option<TaskRules>) -> Result<Box<dyn Backend>, LoadError> {
    Ok(Box::new(crate::backend::ebpf::EbpfTracker::load_with(
        tasks,
    )?))
}

#[cfg(not(target_os = "linux"))]
fn load_ebpf(_tasks: Option<TaskRules>) -> Result<Box<dyn Backend>, LoadError> {
    Err(LoadError::NotLinux)
}

/// The OS release for reports: `uname -r` on Unix, sysinfo's OS version elsewhere.
fn os_release() -> String {
    #[cfg(unix)]
    {
        nix::sys::utsname::uname()
            .map(|uts| uts.release().to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into())
    }
    #[cfg(not(unix))]
    {
        sysinfo::System::long_os_version().unwrap_or_else(|_| "unknown".into())
    }
}
