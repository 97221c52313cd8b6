//! Library errors. Each message names what is wrong and, where one exists, what to do about it.

use thiserror::Error;

/// Why a backend could not start.
#[derive(Debug, Error)]
pub enum LoadError {
    /// eBPF was asked for on another OS.
    #[error("not supported on this OS: the eBPF backend needs Linux")]
    NotLinux,
    /// Neither root nor the needed capabilities.
    #[error(
        "missing privileges: loading BPF programs needs root, or CAP_BPF and CAP_PERFMON \
         (missing: {missing}); run with sudo"
    )]
    Privileges {
        /// The capabilities lacking.
        missing: String,
    },
    /// Running in a nested PID namespace, where our pids are not the kernel's.
    #[error(
        "tracer runs in a nested PID namespace (a container?): the kernel reports host pids, so it \
         must run in the host PID namespace (e.g. `docker run --pid=host`)"
    )]
    PidNamespace,
    /// tracefs is neither mounted nor mountable.
    #[error("tracefs is not available: {0}")]
    NoTracefs(String),
    /// `kmem:rss_stat` does not exist on this kernel.
    #[error("tracepoint {event} not found (kernel {kernel}); kmem:rss_stat needs Linux >= 5.5")]
    MissingTracepointOnKernel {
        /// `category:name`.
        event: String,
        /// `uname -r`.
        kernel: String,
    },
    /// A needed tracepoint does not exist.
    #[error("tracepoint {event} not found")]
    MissingTracepoint {
        /// `category:name`.
        event: String,
    },
    /// A tracepoint's record layout is not what the programs read.
    #[error("unexpected layout of tracepoint {event}: {detail}; refusing to load")]
    FormatMismatch {
        /// `category:name`.
        event: String,
        /// Which field differs, and how.
        detail: String,
    },
    /// The kernel lacks BPF atomics.
    #[error("kernel {kernel} is too old: tracer's BPF atomics need Linux >= 5.12")]
    KernelTooOld {
        /// `uname -r`.
        kernel: String,
    },
    /// Reading a system file failed.
    #[error("{what}")]
    Io {
        /// What was being read.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused the BPF object (maps or globals).
    #[cfg(target_os = "linux")]
    #[error("loading the BPF object failed")]
    Object(#[source] aya::EbpfError),
    /// The verifier or the attach refused a program.
    #[cfg(target_os = "linux")]
    #[error("loading or attaching BPF program `{program}` failed")]
    Program {
        /// The program's name.
        program: String,
        /// What aya reported.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A task marker that cannot be an environment variable name (or is over 63 bytes).
    #[error("`{0}` cannot be a task marker: give an environment variable name of at most 62 bytes")]
    BadTaskMarker(String),
    /// The polling backend could not start.
    #[error("the polling backend could not start")]
    Poll(#[source] TrackError),
    /// The embedded object lacks a map (a build problem).
    #[error("BPF map `{0}` missing from the object")]
    MissingMap(&'static str),
    /// A map of the object has another type than expected (a build problem).
    #[cfg(target_os = "linux")]
    #[error("BPF map `{name}` has an unexpected type")]
    MapType {
        /// The map's name.
        name: &'static str,
        /// What aya reported.
        #[source]
        source: aya::maps::MapError,
    },
}

/// Errors of tracking once a backend runs.
#[derive(Debug, Error)]
pub enum TrackError {
    /// Every tree slot is in use.
    #[error("cannot track more than {0} trees at once")]
    TooManyTrees(u32),
    /// A tree id that is not (or no longer) tracked.
    #[error("tree {0} is not being tracked")]
    UnknownTree(u32),
    /// The pid does not exist.
    #[error("no process with pid {0}")]
    NoSuchProcess(u32),
    /// The pid is tracked already.
    #[error("pid {0} is already tracked")]
    AlreadyTracked(u32),
    /// Task tracking was asked of a tracker loaded without it.
    #[error("this tracker was not started with task tracking")]
    TasksNotEnabled,
    /// The polling backend failed.
    #[error("polling backend: {0}")]
    Poll(String),
    /// A kernel map operation failed (full map, or a kernel error).
    #[cfg(target_os = "linux")]
    #[error("BPF map `{map}`: {action} failed")]
    Map {
        /// The map's name.
        map: &'static str,
        /// What was being done.
        action: &'static str,
        /// What aya reported.
        #[source]
        source: aya::maps::MapError,
    },
}

/// Why a command could not be started.
#[derive(Debug, Error)]
pub enum SpawnError {
    /// Not found in PATH.
    #[error("{0}: command not found")]
    NotFound(String),
    /// A path that does not exist.
    #[error("{0}: No such file or directory")]
    NoSuchFile(String),
    /// Found, but cannot be executed.
    #[error("{program}: {reason}")]
    NotExecutable {
        /// The command as given.
        program: String,
        /// Why (permission, directory, format...).
        reason: String,
    },
    /// No command at all.
    #[error("empty command")]
    Empty,
    /// A system call around starting or waiting for the command failed.
    #[error("{what}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl SpawnError {
    /// The exit status a shell gives for this failure: 127 not found, 126 found but not runnable.
    pub fn exit_code(&self) -> i32 {
        match self {
            SpawnError::NotFound(_) | SpawnError::NoSuchFile(_) | SpawnError::Empty => 127,
            SpawnError::NotExecutable { .. } | SpawnError::Os { .. } => 126,
        }
    }
}
