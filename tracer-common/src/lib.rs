//! Types and accounting shared by tracer's kernel programs (`tracer-ebpf`) and its userspace (`tracer`).
//!
//! Everything the BPF side computes lives here as plain functions over `#[repr(C)]` state, so the host
//! unit tests exercise exactly the code the kernel runs, with synthetic `kmem:rss_stat` sequences.
#![no_std]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

pub mod account;
pub mod atomic;
pub mod format;
pub mod state;

pub use account::{Outcome, apply_rss_event, apply_to_mm, apply_to_tree};
pub use state::*;
