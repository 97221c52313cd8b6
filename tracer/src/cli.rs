//! Command-line options.

use clap::{Parser, Subcommand, ValueEnum};
use std::{ffi::OsString, path::PathBuf};

/// Exact peak memory (RSS) of a whole process tree, measured in the kernel with eBPF.
#[derive(Debug, Parser)]
#[command(name = "tracer", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run CMD as a tracked process tree and report the peak of its summed RSS.
    ///
    /// Prints one line on stderr when CMD ends (`✔  CMD (2.5s) (peak: 256MB)`) and exits with CMD's
    /// status (128+N if it was killed by signal N; 127 not found; 126 not executable; 125 when tracer
    /// itself could not run it).
    Run {
        /// Also write the JSON report to FILE (`-` for stdout).
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        #[command(flatten)]
        backend: BackendArgs,
        #[command(flatten)]
        tasks: TaskArgs,
        /// Print the BPF programs' run counts and times on stderr at the end (needs
        /// `sysctl kernel.bpf_stats_enabled=1`; for benchmarks).
        #[arg(long, hide = true)]
        bpf_stats: bool,
        /// The command and its arguments.
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        command: Vec<OsString>,
    },
    /// Serve tracking to unprivileged clients (task runners on CI) over a Unix socket.
    ///
    /// One JSON object per line: {"op":"start","pid":N}, {"op":"peek","pid":N}, {"op":"stop","pid":N}
    /// (answered with the report). Non-root clients may track only their own processes.
    Serve {
        /// Where to create the socket (mode 0660).
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// The group that may connect (the socket's group); default: tracer's own.
        #[arg(long, value_name = "NAME")]
        group: Option<String>,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Track a running task runner (make, Nx, a CI script) and every task it starts: one line per
    /// task as it ends, then the whole tree's peak when PID exits or on Ctrl-C (exit status 0).
    ///
    /// Processes already under PID are counted from now on (their earlier use is unknown, and their
    /// reports say so); new ones from their first instruction.
    Attach {
        /// The runner's pid.
        pid: u32,
        /// Also write one JSON object per line to FILE (`-` for stdout): each task, then the runner.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// The environment variable that marks a task's topmost process (default: Nx's).
        #[arg(long, value_name = "VAR")]
        task_env: Option<String>,
        #[command(flatten)]
        backend: BackendArgs,
    },
}

/// Task splitting, shared by `run --tasks` and `attach`.
#[derive(Debug, clap::Args)]
pub struct TaskArgs {
    /// Treat CMD as a task runner: report each task's peak as it ends, one line each (and one JSON
    /// object per line with --json), then the whole tree's.
    #[arg(long)]
    pub tasks: bool,
    /// The environment variable that marks a task's topmost process (default: Nx's
    /// NX_TASK_TARGET_PROJECT; tasks are then labelled `nx run PROJECT:TARGET`, otherwise by the
    /// variable's value). Direct children of the runner are tasks too.
    #[arg(long, value_name = "VAR")]
    pub task_env: Option<String>,
}

/// Backend selection, shared by the subcommands.
#[derive(Debug, clap::Args)]
pub struct BackendArgs {
    /// `ebpf`: exact, in-kernel (Linux, root or CAP_BPF+CAP_PERFMON); `poll`: samples every
    /// --interval; `auto`: eBPF when it can load, else poll (and say why).
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
    /// Sampling interval of the polling backend, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub interval: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Backend {
    Auto,
    Ebpf,
    Poll,
}
