//! tracer: the exact peak memory (RSS) of a whole process tree, measured in the kernel with eBPF.
//!
//! The kernel programs (crate `tracer-ebpf`) follow every change of every address space's RSS counters
//! (`kmem:rss_stat`) and every fork, exec and exit of the tracked tasks, and keep per tree the live sum
//! of file + anon + shmem RSS and its peak. Nothing is sampled, so short spikes are not missed and
//! per-process maxima that never coexisted are never added up.
//!
//! - [`ebpf::EbpfTracker`] loads the programs and tracks trees;
//! - [`run::run_tracked`] runs a command as a tracked tree (what `tracer run` does);
//! - [`report`] holds the numbers and their JSON/human forms.

pub mod error;
pub mod report;

#[cfg(target_os = "linux")]
pub mod ebpf;
#[cfg(target_os = "linux")]
pub mod kernel;
#[cfg(target_os = "linux")]
pub mod run;
#[cfg(target_os = "linux")]
pub mod spawn;
#[cfg(target_os = "linux")]
pub mod tracefs;
