mod cli;

use anyhow::Context as _;
use clap::Parser as _;
use std::{io::Write as _, path::Path, process::ExitCode};

/// Exit status when tracer itself fails before or around the command (like `env`, `timeout`).
const TRACER_FAILED: u8 = 125;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Run {
            json,
            bpf_stats,
            command,
        } => run(&command, json.as_deref(), bpf_stats),
    }
}

#[cfg(target_os = "linux")]
fn run(command: &[std::ffi::OsString], json: Option<&Path>, bpf_stats: bool) -> ExitCode {
    use tracer::{ebpf::EbpfTracker, run::RunError, spawn};

    // A missing command is the first thing to say, privileged or not.
    if let Err(err) = spawn::resolve_program(&command[0]) {
        eprintln!("tracer: {err}");
        return ExitCode::from(err.exit_code() as u8);
    }
    let mut tracker = match EbpfTracker::load() {
        Ok(tracker) => tracker,
        Err(err) => {
            eprintln!("tracer: error: {}", chain(&err));
            return ExitCode::from(TRACER_FAILED);
        }
    };
    let outcome = match tracer::run::run_tracked(&mut tracker, command) {
        Ok(outcome) => outcome,
        Err(RunError::Spawn(err)) => {
            eprintln!("tracer: {err}");
            return ExitCode::from(err.exit_code() as u8);
        }
        Err(err) => {
            eprintln!("tracer: error: {}", chain(&err));
            return ExitCode::from(TRACER_FAILED);
        }
    };
    let report = outcome.report(&tracker.kernel().release);
    eprintln!("{}", report.human_line());
    if !report.exact {
        eprintln!(
            "tracer: warning: the peak may be inexact: {}",
            report.inexact_reasons.join("; ")
        );
    }
    if outcome.sample.still_running > 0 {
        eprintln!(
            "tracer: note: {} task(s) of the tree outlived the command; the peak covers the time until \
             it exited",
            outcome.sample.still_running
        );
    }
    if let Some(Err(err)) = json.map(|path| write_json(path, &report)) {
        eprintln!("tracer: error: {err:#}");
    }
    if bpf_stats {
        for stats in tracker.program_stats() {
            let per_run = stats.run_time.as_nanos() as f64 / stats.runs.max(1) as f64;
            eprintln!(
                "tracer: bpf-stats: {} runs={} run_time_ns={} ns_per_run={per_run:.1} missed={}",
                stats.name,
                stats.runs,
                stats.run_time.as_nanos(),
                stats.missed
            );
        }
    }
    tracker.detach_in_background();
    ExitCode::from(report.exit_code.clamp(0, 255) as u8)
}

#[cfg(not(target_os = "linux"))]
fn run(_command: &[std::ffi::OsString], _json: Option<&Path>, _bpf_stats: bool) -> ExitCode {
    eprintln!("tracer: error: {}", tracer::error::LoadError::NotLinux);
    ExitCode::from(TRACER_FAILED)
}

fn write_json(path: &Path, report: &tracer::report::PeakReport) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(report).context("serialising the report")?;
    text.push('\n');
    if path == Path::new("-") {
        std::io::stdout()
            .write_all(text.as_bytes())
            .context("writing the report to stdout")
    } else {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }
}

/// An error and its sources on one line.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}
