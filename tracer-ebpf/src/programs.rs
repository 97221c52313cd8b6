use aya_ebpf::{
    EbpfContext as _,
    helpers::bpf_get_current_pid_tgid,
    macros::{map, tracepoint},
    maps::{Array, HashMap, PerCpuArray},
    programs::TracePointContext,
};
use core::ptr::read_volatile;
use tracer_common::{
    Counter, MAX_MMS, MAX_SEEDS, MAX_TASKS, MAX_TREES, MmState, NR_COUNTERS, NR_MEMBERS, Outcome,
    Seed, TASK_PENDING_EXEC, TaskState, TreeState, apply_rss_event, atomic,
    format::{RSS_STAT_CURR, RSS_STAT_MEMBER, RSS_STAT_MM_ID, RSS_STAT_SIZE},
};

/// Tracked tasks (host tid) and the tree they belong to.
#[map]
static TASKS: HashMap<u32, TaskState> = HashMap::with_max_entries(MAX_TASKS, 0);

/// Address spaces (`rss_stat` `mm_id`) bound to a tree.
#[map]
static MMS: HashMap<u32, MmState> = HashMap::with_max_entries(MAX_MMS, 0);

/// Running processes added by userspace with their RSS, until their mm is bound (see `Seed`).
#[map]
static SEEDS: HashMap<u32, Seed> = HashMap::with_max_entries(MAX_SEEDS, 0);

/// Per-tree totals, by slot.
#[map]
static TREES: Array<TreeState> = Array::with_max_entries(MAX_TREES, 0);

/// What could make a result wrong, and statistics (see `tracer_common::Counter`).
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NR_COUNTERS, 0);

// Offsets of the `sched_*` fields, set by userspace from the tracefs format files at load time. The
// zero defaults are never used: userspace always sets them (`must_exist`).
#[unsafe(no_mangle)]
static FORK_PARENT_PID_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static EXEC_PID_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static EXEC_OLD_PID_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static EXIT_PID_OFFSET: u32 = 0;

#[inline(always)]
fn count(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot, and tracepoint programs do not nest on one CPU: a plain add is enough.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
fn tree(slot: u32) -> Option<*mut TreeState> {
    let tree = TREES.get_ptr_mut(slot);
    if tree.is_none() {
        count(Counter::BadTreeSlot);
    }
    tree
}

/// Reads a `u32` field at an offset known only at load time.
#[inline(always)]
fn field_u32(ctx: &TracePointContext, offset: &'static u32) -> Option<u32> {
    let offset = unsafe { read_volatile(offset) } as usize;
    unsafe { ctx.read_at::<u32>(offset) }.ok()
}

#[tracepoint]
pub fn rss_stat(ctx: TracePointContext) -> u32 {
    let record = ctx.as_ptr() as *const u8;
    // Direct context loads (offsets verified against the format file by userspace): about half the
    // cost of one bpf_probe_read per field on this path that runs on every page fault of the host.
    let (mm_id, curr, member, size) = unsafe {
        (
            read_volatile(record.add(RSS_STAT_MM_ID) as *const u32),
            read_volatile(record.add(RSS_STAT_CURR) as *const u32),
            read_volatile(record.add(RSS_STAT_MEMBER) as *const i32) as u32 as usize,
            read_volatile(record.add(RSS_STAT_SIZE) as *const i64),
        )
    };
    if member >= NR_MEMBERS {
        return 0;
    }
    let mm = match MMS.get_ptr_mut(mm_id) {
        Some(mm) => {
            if curr != 0 && !owner_is_current(mm) {
                return 0;
            }
            mm
        }
        None => match bind_mm(mm_id, curr != 0) {
            Some(mm) => mm,
            None => return 0,
        },
    };
    let Some(tree) = tree(unsafe { (*mm).tree }) else {
        return 0;
    };
    let outcome = unsafe { apply_rss_event(mm, tree, member, size) };
    count(Counter::EventsApplied);
    if outcome.0 != 0 {
        note_outcome(outcome, mm_id);
    }
    0
}

/// For a `curr = 1` event on a bound mm: is the running process really one of ours? The owner tgid
/// answers without a lookup in the common case; otherwise a tracked task sharing the mm (vfork child,
/// or a freshly forked child whose mm was bound from its parent's context) takes ownership, and a
/// stranger means the `mm_id` was recycled or collided.
#[inline(always)]
fn owner_is_current(mm: *mut MmState) -> bool {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if unsafe { read_volatile(&(*mm).owner_tgid) } == tgid {
        return true;
    }
    match TASKS.get_ptr(pid_tgid as u32) {
        Some(task) if unsafe { (*task).tree == (*mm).tree } => {
            unsafe { (*mm).owner_tgid = tgid };
            true
        }
        _ => {
            count(Counter::ForeignMm);
            false
        }
    }
}

/// Binds an mm the first time a tracked task emits an event for it. `curr = 0` events from a tracked
/// task are how a fork child's page-table copy and an exec's new mm arrive (both before their sched
/// tracepoints); events from untracked tasks never create state.
#[inline(always)]
fn bind_mm(mm_id: u32, curr: bool) -> Option<*mut MmState> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let task = TASKS.get_ptr(pid_tgid as u32)?;
    let (tree_slot, flags) = unsafe { ((*task).tree, (*task).flags) };
    if flags & TASK_PENDING_EXEC != 0 {
        // Still the tracer's pre-exec copy (or an exec in progress): nothing of the command yet.
        return None;
    }
    let tgid = (pid_tgid >> 32) as u32;
    let mut state = MmState {
        tree: tree_slot,
        owner_tgid: if curr { tgid } else { 0 },
        ..MmState::default()
    };
    if curr {
        // A process that was running when tracking started: its RSS is already in the tree.
        if let Some(seed) = SEEDS.get_ptr(tgid) {
            let seed = unsafe { *seed };
            state.last = seed.members;
            state.rss = seed.rss();
            state.peak = state.rss;
            let _ = SEEDS.remove(tgid);
        }
    }
    // BPF_NOEXIST: if another CPU bound it first, keep its entry and use it.
    if MMS.insert(mm_id, state, 1).is_ok() {
        if let Some(tree) = tree(tree_slot) {
            unsafe { atomic::add(&raw mut (*tree).mms_bound, 1) };
        }
    }
    let mm = MMS.get_ptr_mut(mm_id);
    if mm.is_none() {
        count(Counter::MmsFull);
    }
    mm
}

#[inline(never)]
fn note_outcome(outcome: Outcome, mm_id: u32) {
    if outcome.has(Outcome::MM_EMPTY) {
        // Torn down: forget it now, the kernel reuses the id as soon as the mm is freed.
        let _ = MMS.remove(mm_id);
    }
    if outcome.has(Outcome::NEGATIVE_SIZE) {
        count(Counter::NegativeSize);
    }
    if outcome.has(Outcome::TREE_NEGATIVE) {
        count(Counter::TreeNegative);
    }
    if outcome.has(Outcome::PEAK_CONTENTION) {
        count(Counter::PeakContention);
    }
}

#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    let (Some(parent), Some(child)) = (
        field_u32(&ctx, &FORK_PARENT_PID_OFFSET),
        field_u32(&ctx, &FORK_CHILD_PID_OFFSET),
    ) else {
        return 0;
    };
    let Some(task) = TASKS.get_ptr(parent) else {
        return 0;
    };
    let tree_slot = unsafe { (*task).tree };
    let child_state = TaskState {
        tree: tree_slot,
        flags: 0,
    };
    if TASKS.insert(child, child_state, 0).is_err() {
        count(Counter::TasksFull);
        return 0;
    }
    if let Some(tree) = tree(tree_slot) {
        unsafe { atomic::add(&raw mut (*tree).live_tasks, 1) };
    }
    0
}

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let (Some(pid), Some(old_pid)) = (
        field_u32(&ctx, &EXEC_PID_OFFSET),
        field_u32(&ctx, &EXEC_OLD_PID_OFFSET),
    ) else {
        return 0;
    };
    if pid != old_pid {
        // A non-leader thread exec'd and took over the leader's pid: its old tid will never exit, so
        // move its entry to the pid it now has.
        let Some(task) = TASKS.get_ptr(old_pid) else {
            return 0;
        };
        let moved = unsafe { *task };
        let _ = TASKS.remove(old_pid);
        if TASKS.insert(pid, moved, 0).is_err() {
            count(Counter::TasksFull);
        }
    }
    if let Some(task) = TASKS.get_ptr_mut(pid) {
        unsafe { (*task).flags &= !TASK_PENDING_EXEC };
    }
    0
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let Some(pid) = field_u32(&ctx, &EXIT_PID_OFFSET) else {
        return 0;
    };
    let Some(task) = TASKS.get_ptr(pid) else {
        return 0;
    };
    let tree_slot = unsafe { (*task).tree };
    // Forget the tid at once so a recycled pid never inherits it. The mm's teardown events that follow
    // (curr = 0, from 6.16 on after this tracepoint) still land: the mm stays bound until it is empty.
    let _ = TASKS.remove(pid);
    if let Some(tree) = tree(tree_slot) {
        unsafe { atomic::add(&raw mut (*tree).live_tasks, -1) };
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        if tgid == pid {
            unsafe { atomic::add(&raw mut (*tree).exited_processes, 1) };
            if let Some(seed) = SEEDS.get_ptr(pid) {
                // Seeded but never bound: its teardown will come from an untracked task and not be
                // seen, so take its seed out of the tree now.
                let seed = unsafe { *seed };
                for member in 0..NR_MEMBERS {
                    unsafe { atomic::add(&raw mut (*tree).members[member], -seed.members[member]) };
                }
                unsafe { atomic::add(&raw mut (*tree).rss, -seed.rss()) };
                let _ = SEEDS.remove(pid);
            }
        }
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
