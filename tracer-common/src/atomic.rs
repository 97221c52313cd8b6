//! The three atomic operations the accounting needs, on raw pointers into BPF map values.
//!
//! The `bpfel-unknown-none` target has no `core::sync::atomic` read-modify-write operations, so the BPF
//! build uses the compiler intrinsics directly (they lower to BPF `atomic_fetch_add`, `xchg` and
//! `cmpxchg`, which need `-C target-cpu=v3` and kernel >= 5.12). SeqCst everywhere: a Relaxed fetch_add was
//! seen to compile to a non-fetching add. The host build uses the std atomics, so unit tests run the same
//! logic.

/// Attempts a compare-and-swap max gets before giving up (an unbounded loop is rejected by the verifier).
pub const CAS_MAX_TRIES: u32 = 16;

/// Result of [`fetch_max`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaxOutcome {
    /// The stored value was already at least as large.
    NotHigher,
    /// This call raised the stored value.
    Raised,
    /// Other CPUs kept changing the value for [`CAS_MAX_TRIES`] attempts; the maximum may be low.
    Exhausted,
}

#[cfg(target_arch = "bpf")]
mod imp {
    use core::intrinsics::{AtomicOrdering::SeqCst, atomic_cxchg, atomic_xadd, atomic_xchg};

    #[inline(always)]
    pub unsafe fn fetch_add(p: *mut i64, v: i64) -> i64 {
        unsafe { atomic_xadd::<i64, i64, { SeqCst }>(p, v) }
    }
    #[inline(always)]
    pub unsafe fn swap(p: *mut i64, v: i64) -> i64 {
        unsafe { atomic_xchg::<i64, { SeqCst }>(p, v) }
    }
    #[inline(always)]
    pub unsafe fn compare_exchange(p: *mut i64, old: i64, new: i64) -> (i64, bool) {
        unsafe { atomic_cxchg::<i64, { SeqCst }, { SeqCst }>(p, old, new) }
    }
}

#[cfg(not(target_arch = "bpf"))]
mod imp {
    use core::sync::atomic::{AtomicI64, Ordering::SeqCst};

    #[inline(always)]
    pub unsafe fn fetch_add(p: *mut i64, v: i64) -> i64 {
        unsafe { AtomicI64::from_ptr(p) }.fetch_add(v, SeqCst)
    }
    #[inline(always)]
    pub unsafe fn swap(p: *mut i64, v: i64) -> i64 {
        unsafe { AtomicI64::from_ptr(p) }.swap(v, SeqCst)
    }
    #[inline(always)]
    pub unsafe fn compare_exchange(p: *mut i64, old: i64, new: i64) -> (i64, bool) {
        match unsafe { AtomicI64::from_ptr(p) }.compare_exchange(old, new, SeqCst, SeqCst) {
            Ok(prev) => (prev, true),
            Err(prev) => (prev, false),
        }
    }
}

/// Adds `v` to `*p` and returns the new value.
///
/// # Safety
/// `p` must be valid, 8-byte aligned and only accessed atomically by others.
#[inline(always)]
pub unsafe fn add(p: *mut i64, v: i64) -> i64 {
    unsafe { imp::fetch_add(p, v) + v }
}

/// Stores `v` and returns the previous value.
///
/// # Safety
/// As for [`add`].
#[inline(always)]
pub unsafe fn swap(p: *mut i64, v: i64) -> i64 {
    unsafe { imp::swap(p, v) }
}

/// A plain load. `read_volatile` rather than an atomic load: a relaxed atomic load crashed LLVM's BPF
/// backend with `target-cpu=v3`, and an aligned 8-byte load is single-copy atomic on BPF anyway.
///
/// # Safety
/// `p` must be valid and aligned.
#[inline(always)]
pub unsafe fn load(p: *const i64) -> i64 {
    unsafe { core::ptr::read_volatile(p) }
}

/// Raises `*p` to `v` if `v` is larger, with a bounded compare-and-swap loop.
///
/// # Safety
/// As for [`add`].
#[inline(always)]
pub unsafe fn fetch_max(p: *mut i64, v: i64) -> MaxOutcome {
    let mut current = unsafe { load(p) };
    for _ in 0..CAS_MAX_TRIES {
        if v <= current {
            return MaxOutcome::NotHigher;
        }
        let (previous, stored) = unsafe { imp::compare_exchange(p, current, v) };
        if stored {
            return MaxOutcome::Raised;
        }
        current = previous;
    }
    if v <= current {
        MaxOutcome::NotHigher
    } else {
        MaxOutcome::Exhausted
    }
}
