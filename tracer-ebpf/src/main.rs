//! tracer's kernel side: per-tree live RSS and its exact peak, kept in maps on every RSS counter change.
//!
//! - `kmem:rss_stat` fires on every change of an mm's file/anon/swap/shmem counter, with the new value.
//!   It runs for every process on the host, so untracked events must leave after one failed lookup of
//!   the mm and one of the task.
//! - `sched:sched_process_fork` / `exec` / `exit` maintain the set of tracked tasks.
//!
//! See `shared/KERNEL-NOTES.md` for the kernel facts relied on (binding rules, teardown order, offsets).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

/// Host builds (`cargo clippy --workspace`) get an empty binary: the object only exists for BPF.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
