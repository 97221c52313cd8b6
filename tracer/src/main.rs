mod cli;

use anyhow::Context as _;
use clap::Parser as _;
use std::{ffi::OsString, io::Write as _, path::Path, process::ExitCode, time::Duration};
use tracer::{
    BackendChoice, BackendKind, MemoryTracker, PeakReport, TrackerOptions, run::RunError,
};

/// Exit status when tracer itself fails before or around the command (like `env`, `timeout`).
const TRACER_FAILED: u8 = 125;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Run {
            json,
            backend,
            bpf_stats,
            command,
        } => run(&command, json.as_deref(), &backend, bpf_stats),
    }
}

fn run(
    command: &[OsString],
    json: Option<&Path>,
    backend: &cli::BackendArgs,
    bpf_stats: bool,
) -> ExitCode {
    // A missing command is the first thing to say, privileged or not.
    #[cfg(target_os = "linux")]
    if let Err(err) = tracer::spawn::resolve_program(&command[0]) {
        eprintln!("tracer: {err}");
        return ExitCode::from(err.exit_code() as u8);
    }
    let mut tracker = match open_tracker(backend) {
        Ok(tracker) => tracker,
        Err(err) => {
            eprintln!("tracer: error: {}", chain(&err));
            return ExitCode::from(TRACER_FAILED);
        }
    };
    let report = match tracer::run::run(&mut tracker, command) {
        Ok(report) => report,
        Err(RunError::Spawn(err)) => {
            eprintln!("tracer: {err}");
            return ExitCode::from(err.exit_code() as u8);
        }
        Err(err) => {
            eprintln!("tracer: error: {}", chain(&err));
            return ExitCode::from(TRACER_FAILED);
        }
    };
    eprintln!("{}", report.human_line());
    if !report.exact && tracker.backend() == BackendKind::Ebpf {
        eprintln!(
            "tracer: warning: the peak may be inexact: {}",
            report.inexact_reasons.join("; ")
        );
    }
    if report.still_running > 0 {
        eprintln!(
            "tracer: note: {} task(s) of the tree outlived the command; the peak covers the time until \
             it exited",
            report.still_running
        );
    }
    if bpf_stats {
        print_bpf_stats(&tracker);
    }
    if let Some(Err(err)) = json.map(|path| write_json(path, &report)) {
        eprintln!("tracer: error: {err:#}");
    }
    tracker.detach_in_background();
    ExitCode::from(report.exit_code.unwrap_or(0).clamp(0, 255) as u8)
}

/// The tracker the options ask for; says on one line why eBPF was not used when `auto` fell back.
fn open_tracker(args: &cli::BackendArgs) -> Result<MemoryTracker, tracer::error::LoadError> {
    let interval = Duration::from_millis(args.interval);
    let backend = match args.backend {
        cli::Backend::Auto => BackendChoice::Auto,
        cli::Backend::Ebpf => BackendChoice::Ebpf,
        cli::Backend::Poll => BackendChoice::Poll,
    };
    let tracker = MemoryTracker::with_options(TrackerOptions { backend, interval })?;
    if let Some(reason) = tracker.fallback_reason() {
        eprintln!(
            "tracer: eBPF unavailable ({reason}); polling every {} ms instead: spikes shorter than that \
             may be missed",
            interval.as_millis()
        );
    }
    Ok(tracker)
}

fn print_bpf_stats(tracker: &MemoryTracker) {
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

fn write_json(path: &Path, report: &PeakReport) -> anyhow::Result<()> {
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
