//! `tracer run`: start a command as a tracked tree, wait for it, and report its peak.

use crate::{
    MemoryTracker,
    error::{SpawnError, TrackError},
    report::PeakReport,
};
use std::ffi::OsString;
use thiserror::Error;

/// Why a command could not be run and measured.
#[derive(Debug, Error)]
pub enum RunError {
    /// The command could not be started (not found, not executable...).
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    /// Tracking could not start.
    #[error("tracking the command failed")]
    Track(#[from] TrackError),
    /// The backend returned no report for the command.
    #[error("the command's tree was not being tracked")]
    NotTracked,
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl Exit {
    /// The status a shell reports: the exit code, or 128 + N for signal N.
    pub fn status(self) -> i32 {
        match self {
            Exit::Code(code) => code,
            Exit::Signal(signal) => 128 + signal,
        }
    }
}

/// Runs `command` (program and arguments) as a tracked tree, waits for it to exit and returns its
/// report, with `exit_code` and `signal` filled in.
///
/// With eBPF the command is held between fork and exec until its pid is registered, so it is tracked
/// from its first instruction; with polling, tracking starts right after it is spawned. On Linux,
/// SIGINT, SIGTERM and SIGHUP sent to this process meanwhile are forwarded to the command (one
/// command per process at a time).
pub fn run(tracker: &mut MemoryTracker, command: &[OsString]) -> Result<PeakReport, RunError> {
    let words = words_of(command);
    let (pid, exit) = spawn_and_wait(tracker, command, words.clone())?;
    final_report(tracker, pid, words, exit)
}

fn words_of(command: &[OsString]) -> Vec<String> {
    command
        .iter()
        .map(|word| word.to_string_lossy().into_owned())
        .collect()
}

/// The tree's report with what only the parent knows: the command as given and how it ended.
fn final_report(
    tracker: &mut MemoryTracker,
    pid: u32,
    words: Vec<String>,
    exit: Exit,
) -> Result<PeakReport, RunError> {
    let mut report = tracker.stop_tracking(pid).ok_or(RunError::NotTracked)?;
    report.command = words;
    report.exit_code = Some(exit.status());
    report.signal = match exit {
        Exit::Signal(signal) => Some(signal),
        Exit::Code(_) => None,
    };
    Ok(report)
}

#[cfg(target_os = "linux")]
fn spawn_and_wait(
    tracker: &mut MemoryTracker,
    command: &[OsString],
    words: Vec<String>,
) -> Result<(u32, Exit), RunError> {
    let (pid, running) = spawn_tracked(tracker, command, words, false)?;
    Ok((pid, running.wait()?))
}

/// Forks the command held before exec, registers it (as a runner if `runner`) where the backend can
/// before the exec, else right after, and lets it run.
#[cfg(target_os = "linux")]
fn spawn_tracked(
    tracker: &mut MemoryTracker,
    command: &[OsString],
    words: Vec<String>,
    runner: bool,
) -> Result<(u32, crate::spawn::RunningChild), RunError> {
    let held = crate::spawn::spawn_held(command)?;
    let pid = held.pid();
    let before_exec = match tracker.start_tracking_held(pid, words, runner) {
        Ok(registered) => registered,
        Err(err) => {
            held.abandon();
            return Err(err.into());
        }
    };
    let running = match held.release(&command[0]) {
        Ok(running) => running,
        Err(err) => {
            tracker.stop_tracking(pid);
            return Err(err.into());
        }
    };
    if !before_exec {
        match runner {
            true => tracker.start_tracking_tasks(pid)?,
            false => tracker.start_tracking(pid)?,
        }
    }
    Ok((pid, running))
}

#[cfg(not(target_os = "linux"))]
fn spawn_and_wait(
    tracker: &mut MemoryTracker,
    command: &[OsString],
    _words: Vec<String>,
) -> Result<(u32, Exit), RunError> {
    let program = command.first().ok_or(SpawnError::Empty)?;
    let mut child = std::process::Command::new(program)
        .args(&command[1..])
        .spawn()
        .map_err(|err| {
            let name = program.to_string_lossy().into_owned();
            match err.kind() {
                std::io::ErrorKind::NotFound => SpawnError::NotFound(name),
                _ => SpawnError::NotExecutable {
                    program: name,
                    reason: err.to_string(),
                },
            }
        })?;
    let pid = child.id();
    tracker.start_tracking(pid)?;
    let status = child.wait().map_err(|source| SpawnError::Os {
        what: "waiting for the command",
        source,
    })?;
    #[cfg(unix)]
    let exit = {
        use std::os::unix::process::ExitStatusExt as _;
        status
            .signal()
            .map_or(Exit::Code(status.code().unwrap_or(1)), Exit::Signal)
    };
    #[cfg(not(unix))]
    let exit = Exit::Code(status.code().unwrap_or(1));
    Ok((pid, exit))
}

/// Like [`run`], with the command as a task runner: `on_task` gets each task's report as it ends
/// (see [`crate::tasks`]); the returned report is the whole tree's. Needs a tracker made with
/// [`TrackerOptions::tasks`](crate::TrackerOptions::tasks).
#[cfg(target_os = "linux")]
pub fn run_with_tasks(
    tracker: &mut MemoryTracker,
    command: &[OsString],
    mut on_task: impl FnMut(crate::tasks::TaskReport),
) -> Result<PeakReport, RunError> {
    use std::{sync::mpsc, time::Duration};
    let words = words_of(command);
    let (pid, running) = spawn_tracked(tracker, command, words.clone(), true)?;
    // The command is waited for on its own thread while this one reports tasks as they end.
    let (exited, exit) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = exited.send(running.wait());
    });
    let exit = loop {
        tracker
            .finished_tasks(Duration::from_millis(50))
            .into_iter()
            .for_each(&mut on_task);
        match exit.try_recv() {
            Ok(exit) => break exit?,
            Err(mpsc::TryRecvError::Empty) => continue,
            Err(mpsc::TryRecvError::Disconnected) => {
                return Err(RunError::Spawn(SpawnError::Os {
                    what: "waiting for the command",
                    source: std::io::Error::other("the waiting thread ended"),
                }));
            }
        }
    };
    // Tasks that ended with the command are reported before its whole tree.
    tracker
        .finished_tasks(Duration::from_millis(20))
        .into_iter()
        .for_each(&mut on_task);
    final_report(tracker, pid, words, exit)
}
