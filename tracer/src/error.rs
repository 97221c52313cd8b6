//! Library errors.

use thiserror::Error;

/// Why the eBPF backend could not start.
#[derive(Debug, Error)]
pub enum LoadError {
    #[error("not supported on this OS: the eBPF backend needs Linux")]
    NotLinux,
    #[error(
        "missing privileges: loading BPF programs needs root, or CAP_BPF and CAP_PERFMON \
         (missing: {missing}); run with sudo"
    )]
    Privileges { missing: String },
    #[error(
        "tracer runs in a nested PID namespace (a container?): the kernel reports host pids, so it \
         must run in the host PID namespace (e.g. `docker run --pid=host`)"
    )]
    PidNamespace,
    #[error("tracefs is not available: {0}")]
    NoTracefs(String),
    #[error("tracepoint {event} not found (kernel {kernel}); kmem:rss_stat needs Linux >= 5.5")]
    MissingTracepointOnKernel { event: String, kernel: String },
    #[error("tracepoint {event} not found")]
    MissingTracepoint { event: String },
    #[error("unexpected layout of tracepoint {event}: {detail}; refusing to load")]
    FormatMismatch { event: String, detail: String },
    #[error("kernel {kernel} is too old: tracer's BPF atomics need Linux >= 5.12")]
    KernelTooOld { kernel: String },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[cfg(target_os = "linux")]
    #[error("loading the BPF object failed")]
    Object(#[source] aya::EbpfError),
    #[cfg(target_os = "linux")]
    #[error("loading or attaching BPF program `{program}` failed")]
    Program {
        program: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("BPF map `{0}` missing from the object")]
    MissingMap(&'static str),
    #[cfg(target_os = "linux")]
    #[error("BPF map `{name}` has an unexpected type")]
    MapType {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Errors of a tracking session once the backend is loaded.
#[derive(Debug, Error)]
pub enum TrackError {
    #[error("cannot track more than {0} trees at once")]
    TooManyTrees(u32),
    #[error("tree {0} is not being tracked")]
    UnknownTree(u32),
    #[cfg(target_os = "linux")]
    #[error("BPF map `{map}`: {action} failed")]
    Map {
        map: &'static str,
        action: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Why a command could not be started.
#[derive(Debug, Error)]
pub enum SpawnError {
    #[error("{0}: command not found")]
    NotFound(String),
    #[error("{0}: No such file or directory")]
    NoSuchFile(String),
    #[error("{program}: {reason}")]
    NotExecutable { program: String, reason: String },
    #[error("empty command")]
    Empty,
    #[error("{what}")]
    Os {
        what: &'static str,
        #[source]
        source: nix::Error,
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
