//! Measurement backends behind [`MemoryTracker`](crate::MemoryTracker): exact eBPF accounting in the
//! kernel (Linux), and polling through `sysinfo` everywhere else.

#[cfg(target_os = "linux")]
pub mod ebpf;
mod hwm;
pub mod poll;

use crate::{error::TrackError, report::TreeSample};

/// A process's command line, as its words (empty if it is gone).
pub(crate) fn command_line(pid: u32) -> Vec<String> {
    #[cfg(target_os = "linux")]
    {
        crate::proc::cmdline(pid)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let Ok(mut system) = sysinfo::System::new() else {
            return Vec::new();
        };
        let pid = sysinfo::Pid::from_u32(pid);
        system.refresh_processes_specifics(
            sysinfo::ProcessesToUpdate::Some(&[pid]),
            true,
            sysinfo::ProcessRefreshKind::nothing().with_cmd(sysinfo::UpdateKind::Always),
        );
        let words = system
            .process(pid)
            .map(|process| process.cmd().to_vec())
            .unwrap_or_default();
        words
            .iter()
            .map(|word| word.to_string_lossy().into_owned())
            .collect()
    }
}

/// Which backend measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// Kernel programs on `kmem:rss_stat` and the `sched` tracepoints: every RSS change, exact.
    Ebpf,
    /// Samples of every tree process's RSS at an interval: spikes between samples are missed.
    Poll,
}

impl BackendKind {
    /// The name used in reports and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            BackendKind::Ebpf => "ebpf",
            BackendKind::Poll => "poll",
        }
    }
}

/// Kernel-side run statistics of one program (eBPF only).
#[derive(Debug, Clone, Copy)]
pub struct ProgramStats {
    /// The program's name.
    pub name: &'static str,
    /// Runs (counted while `kernel.bpf_stats_enabled=1`).
    pub runs: u64,
    /// Total run time (counted while `kernel.bpf_stats_enabled=1`).
    pub run_time: std::time::Duration,
    /// Times the kernel skipped the program (see `recursion_misses`); always counted.
    pub missed: u64,
}

/// What a backend does for [`MemoryTracker`](crate::MemoryTracker). Trees are named by their root pid.
pub(crate) trait Backend: Send {
    fn kind(&self) -> BackendKind;

    /// Registers `pid`, a forked child that has not called `execve` yet, so that its tree is followed
    /// from its first instruction. Returns `false` when the backend cannot (then the caller starts
    /// tracking after the exec with [`Backend::start`]).
    #[cfg(target_os = "linux")]
    fn start_before_exec(&mut self, _pid: u32) -> Result<bool, TrackError> {
        Ok(false)
    }

    /// Starts following the running process `pid` and all its descendants.
    fn start(&mut self, pid: u32) -> Result<(), TrackError>;

    /// The tree's numbers so far.
    fn peek(&self, pid: u32) -> Option<TreeSample>;

    /// Ends tracking of the tree and returns its final numbers.
    fn stop(&mut self, pid: u32) -> Option<TreeSample>;

    /// Starts following `pid` as a task runner: its tree, and each task in it apart. With
    /// `before_exec` (a held child, see `start_before_exec`), returns `false` when the backend would
    /// rather start after the exec.
    fn start_runner(&mut self, pid: u32, before_exec: bool) -> Result<bool, TrackError>;

    /// Tasks that ended, waiting up to `timeout` for one.
    fn finished_tasks(&mut self, timeout: std::time::Duration) -> Vec<crate::tasks::TaskReport> {
        std::thread::sleep(timeout);
        Vec::new()
    }

    /// Releases the backend so the process can exit at once (eBPF detaches in the background).
    fn detach_in_background(self: Box<Self>) {}

    /// Kernel run statistics of the programs (eBPF only).
    fn program_stats(&self) -> Vec<ProgramStats> {
        Vec::new()
    }

    /// Entries left in kernel maps, for diagnostics (eBPF only).
    fn map_entries(&self) -> Option<(usize, usize)> {
        None
    }
}
