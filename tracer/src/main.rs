mod cli;
mod output;

use clap::Parser as _;
use output::JsonSink;
use std::{
    ffi::OsString,
    path::Path,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};
use tracer::{
    BackendChoice, BackendKind, MemoryTracker, PeakReport, TrackerOptions, run::RunError,
    tasks::TaskRules,
};

/// Exit status when tracer itself fails before or around the command (like `env`, `timeout`).
const TRACER_FAILED: u8 = 125;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Run {
            json,
            backend,
            tasks,
            bpf_stats,
            command,
        } => run(&command, json.as_deref(), &backend, &tasks, bpf_stats),
        cli::Command::Attach {
            pid,
            json,
            task_env,
            backend,
        } => attach(pid, json.as_deref(), task_env, &backend),
        cli::Command::Serve {
            socket,
            group,
            backend,
        } => serve(&socket, group.as_deref(), &backend),
    }
}

fn run(
    command: &[OsString],
    json: Option<&Path>,
    backend: &cli::BackendArgs,
    tasks: &cli::TaskArgs,
    bpf_stats: bool,
) -> ExitCode {
    // A missing command is the first thing to say, privileged or not.
    #[cfg(target_os = "linux")]
    if let Err(err) = tracer::spawn::resolve_program(&command[0]) {
        eprintln!("tracer: {err}");
        return ExitCode::from(err.exit_code() as u8);
    }
    let task_rules = (tasks.tasks || tasks.task_env.is_some()).then(|| task_rules(&tasks.task_env));
    let mut tracker = match open_tracker(backend, task_rules.clone()) {
        Ok(tracker) => tracker,
        Err(err) => return fail(&err),
    };
    let mut sink = match JsonSink::open(json, task_rules.is_some()) {
        Ok(sink) => sink,
        Err(err) => return fail(err.as_ref()),
    };
    let result = match task_rules {
        Some(_) => run_tasks(&mut tracker, command, &mut sink),
        None => tracer::run::run(&mut tracker, command),
    };
    let report = match result {
        Ok(report) => report,
        Err(RunError::Spawn(err)) => {
            eprintln!("tracer: {err}");
            return ExitCode::from(err.exit_code() as u8);
        }
        Err(err) => return fail(&err),
    };
    finish(&report, &tracker, &mut sink, "run");
    if bpf_stats {
        print_bpf_stats(&tracker);
    }
    tracker.detach_in_background();
    ExitCode::from(report.exit_code.unwrap_or(0).clamp(0, 255) as u8)
}

#[cfg(target_os = "linux")]
fn run_tasks(
    tracker: &mut MemoryTracker,
    command: &[OsString],
    sink: &mut JsonSink,
) -> Result<PeakReport, RunError> {
    tracer::run::run_with_tasks(tracker, command, |task| {
        eprintln!("{}", task.human_line());
        sink.write("task", &task);
    })
}

#[cfg(not(target_os = "linux"))]
fn run_tasks(
    _tracker: &mut MemoryTracker,
    _command: &[OsString],
    _sink: &mut JsonSink,
) -> Result<PeakReport, RunError> {
    Err(RunError::Track(tracer::error::TrackError::TasksNotEnabled))
}

/// Set by SIGINT/SIGTERM while attached.
static STOP: AtomicBool = AtomicBool::new(false);

#[cfg(unix)]
extern "C" fn request_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn attach(
    pid: u32,
    json: Option<&Path>,
    task_env: Option<String>,
    backend: &cli::BackendArgs,
) -> ExitCode {
    let mut tracker = match open_tracker(backend, Some(task_rules(&task_env))) {
        Ok(tracker) => tracker,
        Err(err) => return fail(&err),
    };
    let mut sink = match JsonSink::open(json, true) {
        Ok(sink) => sink,
        Err(err) => return fail(err.as_ref()),
    };
    if let Err(err) = tracker.start_tracking_tasks(pid) {
        return fail(&err);
    }
    #[cfg(unix)]
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores an atomic.
        unsafe { libc::signal(signal, request_stop as *const () as libc::sighandler_t) };
    }
    while !STOP.load(Ordering::SeqCst) && process_alive(pid) {
        for task in tracker.finished_tasks(Duration::from_millis(100)) {
            eprintln!("{}", task.human_line());
            sink.write("task", &task);
        }
    }
    for task in tracker.finished_tasks(Duration::from_millis(20)) {
        eprintln!("{}", task.human_line());
        sink.write("task", &task);
    }
    match tracker.stop_tracking(pid) {
        Some(mut report) => {
            // The runner ran before the attach: its peak covers the time since.
            report.exact = false;
            report.inexact_reasons.push(
                "attached_while_running: memory use before the attach is unknown".to_string(),
            );
            finish(&report, &tracker, &mut sink, "attach")
        }
        None => eprintln!("tracer: error: {pid} was not tracked"),
    }
    tracker.detach_in_background();
    ExitCode::SUCCESS
}

#[cfg(target_os = "linux")]
fn serve(socket: &Path, group: Option<&str>, backend: &cli::BackendArgs) -> ExitCode {
    let tracker = match open_tracker(backend, None) {
        Ok(tracker) => tracker,
        Err(err) => return fail(&err),
    };
    let listener = match output::bind_socket(socket, group) {
        Ok(listener) => listener,
        Err(err) => return fail(err.as_ref()),
    };
    eprintln!(
        "tracer: serving on {} ({} backend)",
        socket.display(),
        tracker.backend().name()
    );
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores an atomic.
        unsafe { libc::signal(signal, request_stop as *const () as libc::sighandler_t) };
    }
    let server = std::thread::spawn(move || tracer::serve::serve(listener, tracker));
    while !STOP.load(Ordering::SeqCst) && !server.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_file(socket);
    if server.is_finished()
        && let Ok(Err(err)) = server.join()
    {
        return fail(&err);
    }
    ExitCode::SUCCESS
}

#[cfg(not(target_os = "linux"))]
fn serve(_socket: &Path, _group: Option<&str>, _backend: &cli::BackendArgs) -> ExitCode {
    fail(&tracer::error::LoadError::NotLinux)
}

/// Whether `pid` still runs (a zombie has exited: only its parent has not reaped it yet).
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            != Some("Z")
    })
}

/// The whole tree's line, warnings, and its JSON.
fn finish(report: &PeakReport, tracker: &MemoryTracker, sink: &mut JsonSink, kind: &str) {
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
    sink.write(kind, report);
}

fn task_rules(task_env: &Option<String>) -> TaskRules {
    task_env
        .clone()
        .map(|marker| TaskRules { marker })
        .unwrap_or_default()
}

/// The tracker the options ask for; says on one line why eBPF was not used when `auto` fell back.
fn open_tracker(
    args: &cli::BackendArgs,
    tasks: Option<TaskRules>,
) -> Result<MemoryTracker, tracer::error::LoadError> {
    let interval = Duration::from_millis(args.interval);
    let backend = match args.backend {
        cli::Backend::Auto => BackendChoice::Auto,
        cli::Backend::Ebpf => BackendChoice::Ebpf,
        cli::Backend::Poll => BackendChoice::Poll,
    };
    let tracker = MemoryTracker::with_options(TrackerOptions {
        backend,
        interval,
        tasks,
    })?;
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

/// Reports a failure of tracer itself.
fn fail(err: &(dyn std::error::Error + 'static)) -> ExitCode {
    eprintln!("tracer: error: {}", output::chain(err));
    ExitCode::from(TRACER_FAILED)
}
