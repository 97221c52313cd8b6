//! `tracer run`: start a command as a tracked tree, wait for it, and report its peak.

use crate::{
    ebpf::EbpfTracker,
    error::{SpawnError, TrackError},
    report::{PeakReport, TreeSample},
    spawn::{self, Exit},
};
use std::{
    ffi::OsString,
    time::{Duration, Instant},
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("tracking the command failed")]
    Track(#[from] TrackError),
}

/// How a tracked command went.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub command: Vec<OsString>,
    pub exit: Exit,
    pub duration: Duration,
    pub sample: TreeSample,
}

/// Runs `command` (program and arguments) as a tracked tree and waits for it to exit. Signals that
/// tracer receives meanwhile are forwarded (see [`spawn::RunningChild::wait`]); forwarding goes to one
/// command per process, so run one command at a time when relying on it.
pub fn run_tracked(
    tracker: &mut EbpfTracker,
    command: &[OsString],
) -> Result<RunOutcome, RunError> {
    let held = spawn::spawn_held(command)?;
    let tree = match tracker.track_before_exec(held.pid()) {
        Ok(tree) => tree,
        Err(err) => {
            held.abandon();
            return Err(err.into());
        }
    };
    let start = Instant::now();
    let running = match held.release(&command[0]) {
        Ok(running) => running,
        Err(err) => {
            let _ = tracker.stop_tracking(tree);
            return Err(err.into());
        }
    };
    let waited = running.wait();
    let duration = start.elapsed();
    let sample = tracker.stop_tracking(tree)?;
    Ok(RunOutcome {
        command: command.to_vec(),
        exit: waited?,
        duration,
        sample,
    })
}

impl RunOutcome {
    /// The JSON/human report of this run.
    pub fn report(&self, kernel: &str) -> PeakReport {
        let sample = &self.sample;
        PeakReport {
            command: self
                .command
                .iter()
                .map(|arg| arg.to_string_lossy().into_owned())
                .collect(),
            exit_code: self.exit.status(),
            signal: match self.exit {
                Exit::Signal(signal) => Some(signal),
                Exit::Code(_) => None,
            },
            duration_ms: self.duration.as_millis() as u64,
            peak_rss_bytes: sample.peak_rss_bytes,
            peak_breakdown: sample.peak_breakdown,
            peak_swap_bytes: sample.peak_swap_bytes,
            processes: sample.processes,
            backend: "ebpf",
            exact: sample.exact,
            inexact_reasons: sample.inexact_reasons.clone(),
            kernel: kernel.to_string(),
        }
    }
}
