//! tracer: the peak memory (RSS) of a whole process tree — exact, measured in the kernel with eBPF on
//! Linux; sampled with `sysinfo` where eBPF cannot run.
//!
//! The kernel programs (crate `tracer-ebpf`) follow every change of every address space's RSS counters
//! (`kmem:rss_stat`) and every fork, exec and exit of the tracked tasks, and keep per tree the live sum
//! of file + anon + shmem RSS and its peak. Nothing is sampled, so short spikes are not missed and
//! per-process maxima that never coexisted are never added up.
//!
//! - [`MemoryTracker`] tracks trees by root pid: `start_tracking`, `peek`, `stop_tracking`;
//! - [`run::run`] runs a command as a tracked tree (what `tracer run` does);
//! - [`report`] holds the numbers and their JSON and human forms.
#![warn(missing_docs)]

pub mod backend;
pub mod error;
pub mod report;
pub mod run;
pub mod tasks;
mod tracker;

#[cfg(target_os = "linux")]
pub mod kernel;
#[cfg(target_os = "linux")]
mod proc;
#[cfg(target_os = "linux")]
pub mod serve;
#[cfg(target_os = "linux")]
pub mod spawn;
#[cfg(target_os = "linux")]
pub mod tracefs;

pub use backend::BackendKind;
pub use report::{PeakReport, TreeSample};
pub use tracker::{BackendChoice, MemoryTracker, TrackerOptions};
