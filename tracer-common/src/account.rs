//! The accounting step: apply one `kmem:rss_stat` event to its mm and its tree.
//!
//! `size` is the member's new absolute value for the whole mm (an exact all-CPU sum on kernels >= 6.2),
//! so each mm remembers the last value per member and the tree moves by the difference. Swapping the
//! last value atomically makes concurrent events of one mm (threads on several CPUs) telescope: whatever
//! order they land in, the tree ends at the sum of the mms' final values.

use crate::atomic::{self, MaxOutcome};
use crate::state::{MM_SWAPENTS, MmState, NR_MEMBERS, TreeState};

/// What [`apply_rss_event`] noticed, as bit flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome(pub u32);

impl Outcome {
    /// `size` was negative and was clamped to 0.
    pub const NEGATIVE_SIZE: u32 = 1;
    /// The tree total went below zero.
    pub const TREE_NEGATIVE: u32 = 1 << 1;
    /// The peak update gave up under contention.
    pub const PEAK_CONTENTION: u32 = 1 << 2;
    /// Every member of the mm is now zero: it has been torn down and its entry must be forgotten, so a
    /// recycled `mm_id` never inherits it.
    pub const MM_EMPTY: u32 = 1 << 3;
    /// This event raised the tree's peak.
    pub const NEW_PEAK: u32 = 1 << 4;

    pub const fn has(self, flag: u32) -> bool {
        self.0 & flag != 0
    }
}

/// Applies `rss_stat(member, size)` to `mm` and to the tree `mm` belongs to. Returns what happened
/// and the change of the member (to be applied to the tree's ancestors too, see [`apply_to_tree`]).
///
/// `member` must be below [`NR_MEMBERS`] (the caller checks it, so the verifier sees the bound).
///
/// # Safety
/// `mm` and `tree` must be valid, aligned, and only accessed atomically by others (they point into BPF
/// map values shared by all CPUs).
#[inline(always)]
pub unsafe fn apply_rss_event(
    mm: *mut MmState,
    tree: *mut TreeState,
    member: usize,
    size: i64,
) -> (Outcome, i64) {
    let (mm_outcome, delta) = unsafe { apply_to_mm(mm, member, size) };
    let tree_outcome = unsafe { apply_to_tree(tree, member, delta) };
    (Outcome(mm_outcome.0 | tree_outcome.0), delta)
}

/// The mm half: remember the new absolute `size` and return by how much the member moved.
///
/// # Safety
/// As for [`apply_rss_event`].
#[inline(always)]
pub unsafe fn apply_to_mm(mm: *mut MmState, member: usize, size: i64) -> (Outcome, i64) {
    let mut flags = 0;
    let size = if size < 0 {
        flags |= Outcome::NEGATIVE_SIZE;
        0
    } else {
        size
    };
    let delta;
    unsafe {
        let previous = atomic::swap(&raw mut (*mm).last[member], size);
        delta = size - previous;
        if delta != 0 && member != MM_SWAPENTS {
            let mm_rss = atomic::add(&raw mut (*mm).rss, delta);
            atomic::fetch_max(&raw mut (*mm).peak, mm_rss);
        }
        if size == 0 && mm_is_empty(mm) {
            flags |= Outcome::MM_EMPTY;
        }
    }
    (Outcome(flags), delta)
}

/// The tree half: move `member` of `tree` by `delta`, keeping its peak (and the breakdown at the peak).
/// Also used for a tree's ancestors: a task's tree nests in its runner's, which counts it too.
///
/// # Safety
/// As for [`apply_rss_event`].
#[inline(always)]
pub unsafe fn apply_to_tree(tree: *mut TreeState, member: usize, delta: i64) -> Outcome {
    let mut flags = 0;
    if delta == 0 {
        return Outcome(flags);
    }
    unsafe {
        let member_total = atomic::add(&raw mut (*tree).members[member], delta);
        if member == MM_SWAPENTS {
            atomic::fetch_max(&raw mut (*tree).swap_peak, member_total);
            return Outcome(flags);
        }
        let tree_rss = atomic::add(&raw mut (*tree).rss, delta);
        if tree_rss < 0 {
            flags |= Outcome::TREE_NEGATIVE;
        }
        match atomic::fetch_max(&raw mut (*tree).peak, tree_rss) {
            MaxOutcome::Raised => {
                flags |= Outcome::NEW_PEAK;
                snapshot_members(tree);
            }
            MaxOutcome::Exhausted => flags |= Outcome::PEAK_CONTENTION,
            MaxOutcome::NotHigher => {}
        }
    }
    Outcome(flags)
}

/// Copies the live member totals next to the peak. Another CPU may move a member between the peak
/// update and this copy, so the breakdown is exact up to concurrent skew (a few pages), while
/// `peak` itself is exact.
#[inline(always)]
unsafe fn snapshot_members(tree: *mut TreeState) {
    for member in 0..NR_MEMBERS {
        unsafe {
            let value = atomic::load(&raw const (*tree).members[member]);
            core::ptr::write_volatile(&raw mut (*tree).peak_members[member], value);
        }
    }
}

#[inline(always)]
unsafe fn mm_is_empty(mm: *const MmState) -> bool {
    let mut all_zero = true;
    for member in 0..NR_MEMBERS {
        all_zero &= unsafe { atomic::load(&raw const (*mm).last[member]) } == 0;
    }
    all_zero
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::state::{MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES};
    use std::vec::Vec;

    const MIB: i64 = 1 << 20;

    /// A tree with some mms, fed synthetic events.
    struct Sim {
        tree: TreeState,
        mms: Vec<MmState>,
    }

    impl Sim {
        fn new(mms: usize) -> Self {
            Sim {
                tree: TreeState::default(),
                mms: std::vec![MmState::default(); mms],
            }
        }
        fn event(&mut self, mm: usize, member: usize, size: i64) -> Outcome {
            unsafe { apply_rss_event(&mut self.mms[mm], &mut self.tree, member, size).0 }
        }
    }

    #[test]
    fn absolute_sizes_become_deltas() {
        let mut sim = Sim::new(1);
        sim.event(0, MM_ANONPAGES, 10 * MIB);
        sim.event(0, MM_ANONPAGES, 30 * MIB);
        sim.event(0, MM_FILEPAGES, 5 * MIB);
        sim.event(0, MM_ANONPAGES, 20 * MIB);
        assert_eq!(sim.tree.rss, 25 * MIB);
        assert_eq!(sim.tree.peak, 35 * MIB);
        assert_eq!(sim.mms[0].peak, 35 * MIB);
        assert_eq!(sim.tree.members[MM_ANONPAGES], 20 * MIB);
    }

    #[test]
    fn spike_is_kept_after_free() {
        let mut sim = Sim::new(1);
        sim.event(0, MM_FILEPAGES, 2 * MIB);
        sim.event(0, MM_ANONPAGES, 256 * MIB);
        sim.event(0, MM_ANONPAGES, MIB);
        assert_eq!(sim.tree.peak, 258 * MIB);
        assert_eq!(sim.tree.peak_members[MM_ANONPAGES], 256 * MIB);
        assert_eq!(sim.tree.peak_members[MM_FILEPAGES], 2 * MIB);
        assert_eq!(sim.tree.rss, 3 * MIB);
    }

    #[test]
    fn tree_peak_is_the_sum_at_one_moment_not_the_sum_of_maxima() {
        // Two processes peak at different times: the tree peak is not 100 + 100.
        let mut sim = Sim::new(2);
        sim.event(0, MM_ANONPAGES, 100 * MIB);
        sim.event(0, MM_ANONPAGES, 0);
        sim.event(1, MM_ANONPAGES, 100 * MIB);
        sim.event(1, MM_ANONPAGES, 10 * MIB);
        assert_eq!(sim.tree.peak, 100 * MIB);
        assert_eq!(sim.mms[0].peak, 100 * MIB);
        assert_eq!(sim.mms[1].peak, 100 * MIB);
        // Now both hold at once.
        sim.event(0, MM_ANONPAGES, 100 * MIB);
        assert_eq!(sim.tree.peak, 110 * MIB);
    }

    #[test]
    fn swap_is_kept_apart_from_rss() {
        let mut sim = Sim::new(1);
        sim.event(0, MM_ANONPAGES, 50 * MIB);
        sim.event(0, MM_ANONPAGES, 30 * MIB);
        sim.event(0, MM_SWAPENTS, 20 * MIB);
        assert_eq!(sim.tree.rss, 30 * MIB);
        assert_eq!(sim.tree.peak, 50 * MIB);
        assert_eq!(sim.tree.swap_peak, 20 * MIB);
    }

    #[test]
    fn shmem_counts_in_rss() {
        let mut sim = Sim::new(1);
        sim.event(0, MM_SHMEMPAGES, 8 * MIB);
        sim.event(0, MM_ANONPAGES, 8 * MIB);
        assert_eq!(sim.tree.peak, 16 * MIB);
        assert_eq!(sim.tree.peak_members[MM_SHMEMPAGES], 8 * MIB);
    }

    #[test]
    fn teardown_returns_to_zero_and_marks_mm_empty() {
        let mut sim = Sim::new(1);
        sim.event(0, MM_ANONPAGES, 4 * MIB);
        sim.event(0, MM_FILEPAGES, 3 * MIB);
        assert!(!sim.event(0, MM_ANONPAGES, 0).has(Outcome::MM_EMPTY));
        let last = sim.event(0, MM_FILEPAGES, 0);
        assert!(last.has(Outcome::MM_EMPTY));
        assert_eq!(sim.tree.rss, 0);
        assert_eq!(sim.tree.peak, 7 * MIB);
    }

    #[test]
    fn member_first_seen_late_contributes_its_whole_value() {
        // An mm bound after it already had pages (e.g. bound after exec): its first event for a member
        // brings that member's full value, so the tree catches up at once.
        let mut sim = Sim::new(1);
        sim.event(0, MM_ANONPAGES, 12 * MIB);
        assert_eq!(sim.tree.rss, 12 * MIB);
    }

    #[test]
    fn negative_size_is_clamped_and_flagged() {
        let mut sim = Sim::new(1);
        sim.event(0, MM_ANONPAGES, MIB);
        let outcome = sim.event(0, MM_ANONPAGES, -4096);
        assert!(outcome.has(Outcome::NEGATIVE_SIZE));
        assert_eq!(sim.tree.rss, 0);
    }

    #[test]
    fn unseen_frees_drive_tree_negative_and_are_flagged() {
        let mut sim = Sim::new(2);
        sim.event(0, MM_ANONPAGES, MIB);
        // mm 1 was bound at 0 but the kernel counter was higher: can only happen after lost events.
        sim.tree.rss = 0;
        let outcome = sim.event(1, MM_ANONPAGES, 0);
        assert!(!outcome.has(Outcome::TREE_NEGATIVE), "no change, no flag");
        sim.mms[1].last[MM_ANONPAGES] = 2 * MIB;
        assert!(sim.event(1, MM_ANONPAGES, 0).has(Outcome::TREE_NEGATIVE));
    }

    #[test]
    fn repeated_size_changes_nothing() {
        let mut sim = Sim::new(1);
        sim.event(0, MM_ANONPAGES, MIB);
        let before = sim.tree;
        let outcome = sim.event(0, MM_ANONPAGES, MIB);
        assert_eq!(sim.tree, before);
        assert!(!outcome.has(Outcome::NEW_PEAK));
    }

    #[test]
    fn concurrent_threads_of_one_mm_telescope_to_the_final_value() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicI64, Ordering};
        // Four "CPUs" apply interleaved events of one mm whose counter goes 0 -> 64 MiB in pages; events
        // land in any order, yet the tree ends at the last size each thread wrote for the member.
        let mut sim = Sim::new(1);
        let mm_ptr = &mut sim.mms[0] as *mut MmState as usize;
        let tree_ptr = &mut sim.tree as *mut TreeState as usize;
        let counter = Arc::new(AtomicI64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || {
                    for _ in 0..4096 {
                        let size = counter.fetch_add(4096, Ordering::SeqCst) + 4096;
                        unsafe {
                            apply_rss_event(
                                mm_ptr as *mut MmState,
                                tree_ptr as *mut TreeState,
                                MM_ANONPAGES,
                                size,
                            );
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let last = sim.mms[0].last[MM_ANONPAGES];
        assert_eq!(sim.tree.rss, last, "tree total equals the last size stored");
        assert!(sim.tree.peak >= last && sim.tree.peak <= 64 * MIB);
        assert!(
            64 * MIB - last < 4 * 4096,
            "out-of-order tail is a few pages at most"
        );
    }
}

#[cfg(test)]
mod nesting_tests {
    use super::*;
    use crate::state::MM_ANONPAGES;

    const MIB: i64 = 1 << 20;

    #[test]
    fn a_task_tree_and_its_runner_each_keep_their_own_peak() {
        // Two tasks of one runner peak at different times: each task's peak is its own, the runner's
        // is the sum at its highest moment, with the runner's own memory included.
        let (mut runner, mut task_a, mut task_b) = (
            TreeState::default(),
            TreeState::default(),
            TreeState::default(),
        );
        let (mut runner_mm, mut mm_a, mut mm_b) =
            (MmState::default(), MmState::default(), MmState::default());
        let event = |mm: &mut MmState,
                     tree: Option<&mut TreeState>,
                     runner: &mut TreeState,
                     size: i64| unsafe {
            let (_, delta) = apply_to_mm(mm, MM_ANONPAGES, size);
            if let Some(tree) = tree {
                apply_to_tree(tree, MM_ANONPAGES, delta);
            }
            apply_to_tree(runner, MM_ANONPAGES, delta);
        };
        event(&mut runner_mm, None, &mut runner, 10 * MIB);
        event(&mut mm_a, Some(&mut task_a), &mut runner, 100 * MIB);
        event(&mut mm_b, Some(&mut task_b), &mut runner, 50 * MIB);
        event(&mut mm_a, Some(&mut task_a), &mut runner, 0);
        event(&mut mm_b, Some(&mut task_b), &mut runner, 120 * MIB);
        assert_eq!(task_a.peak, 100 * MIB);
        assert_eq!(task_b.peak, 120 * MIB);
        assert_eq!(runner.peak, 160 * MIB, "10 + 100 + 50 at one moment");
        assert_eq!(runner.rss, 130 * MIB);
    }
}
