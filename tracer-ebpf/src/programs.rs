use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes,
        bpf_probe_read_user, bpf_probe_read_user_str_bytes,
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, Queue, RingBuf},
    programs::TracePointContext,
};
use core::ptr::read_volatile;
use tracer_common::{
    Counter, EVENT_TASK_ENDED, EVENT_TASK_STARTED, EVENTS_BYTES, EXIT_CODE_KNOWN,
    EXIT_SIGNAL_KNOWN, MARKER_BYTES, MARKER_WORDS, MAX_ENV_ENTRIES, MAX_MMS, MAX_SEEDS, MAX_TASKS,
    MAX_TREE_DEPTH, MAX_TREES, MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES, MmState, NO_PARENT,
    NR_COUNTERS, NR_MEMBERS, Outcome, Seed, TASK_ANNOUNCE_AT_EXEC, TASK_CHILD_OF_RUNNER,
    TASK_PENDING_EXEC, TREE_CHILD_TASK, TREE_MARKER_TASK, TREE_RUNNER, TaskEvent, TaskState,
    TreeState, apply_rss_event, apply_to_tree, atomic,
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

/// Free tree slots, filled by userspace; tasks take theirs here at exec.
#[map]
static FREE_SLOTS: Queue<u32> = Queue::with_max_entries(MAX_TREES, 0);

/// Task starts and ends, for userspace.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// What could make a result wrong, and statistics (see `tracer_common::Counter`).
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NR_COUNTERS, 0);

// Offsets of tracepoint fields, set by userspace from the tracefs format files at load time. The
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
static EXEC_FILENAME_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static EXIT_PID_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static EXECVE_ENVP_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static EXECVEAT_ENVP_OFFSET: u32 = 0;
/// The tracepoint id of `syscalls:sys_enter_execveat` (`common_type` of its records).
#[unsafe(no_mangle)]
static EXECVEAT_EVENT_ID: u32 = 0;
#[unsafe(no_mangle)]
static EXIT_GROUP_CODE_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SIGNAL_SIG_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SIGNAL_HANDLER_OFFSET: u32 = 0;
/// `NAME=` of the environment variable that marks a task's topmost process, as little-endian words
/// zero-padded, with the mask of its bytes; length 0: no marker.
#[unsafe(no_mangle)]
static TASK_MARKER: [u64; MARKER_WORDS] = [0; MARKER_WORDS];
#[unsafe(no_mangle)]
static TASK_MARKER_MASK: [u64; MARKER_WORDS] = [0; MARKER_WORDS];
#[unsafe(no_mangle)]
static TASK_MARKER_LEN: u32 = 0;

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
fn field<T>(ctx: &TracePointContext, offset: &'static u32) -> Option<T> {
    let offset = unsafe { read_volatile(offset) } as usize;
    unsafe { ctx.read_at::<T>(offset) }.ok()
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
    let (mut outcome, delta) = unsafe { apply_rss_event(mm, tree, member, size) };
    if delta != 0 {
        // A task's tree nests in its runner's: the runner counts it too.
        let mut parent = unsafe { (*tree).parent };
        for _ in 0..MAX_TREE_DEPTH {
            if parent == NO_PARENT {
                break;
            }
            let Some(ancestor) = TREES.get_ptr_mut(parent) else {
                break;
            };
            outcome.0 |= unsafe { apply_to_tree(ancestor, member, delta) }.0;
            parent = unsafe { (*ancestor).parent };
        }
    }
    if outcome.0 & !Outcome::NEW_PEAK != 0 {
        note_outcome(outcome, mm_id);
    }
    0
}

/// For a `curr = 1` event on a bound mm: is the running process one of ours? The owner tgid answers
/// without a lookup in the common case; otherwise any tracked task sharing the mm (a vfork child, a
/// freshly forked child whose mm was bound from its parent's context) takes ownership, and a stranger
/// means the `mm_id` was recycled or collided.
#[inline(always)]
fn owner_is_current(mm: *mut MmState) -> bool {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if unsafe { read_volatile(&(*mm).owner_tgid) } == tgid {
        return true;
    }
    if TASKS.get_ptr(pid_tgid as u32).is_some() {
        unsafe { (*mm).owner_tgid = tgid };
        true
    } else {
        count(Counter::ForeignMm);
        false
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
    if MMS.insert(mm_id, state, 1).is_ok()
        && let Some(tree) = tree(tree_slot)
    {
        unsafe { atomic::add(&raw mut (*tree).mms_bound, 1) };
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

/// Takes `members` out of a tree and every tree it nests in (a removal never raises a peak, so no
/// peak update: that keeps the exit program small for the verifier).
#[inline(always)]
fn subtract_from_tree_chain(slot: u32, members: &[i64; NR_MEMBERS]) {
    let rss = members[MM_FILEPAGES] + members[MM_ANONPAGES] + members[MM_SHMEMPAGES];
    let mut slot = slot;
    for _ in 0..=MAX_TREE_DEPTH {
        let Some(tree) = TREES.get_ptr_mut(slot) else {
            break;
        };
        for (member, &value) in members.iter().enumerate() {
            unsafe { atomic::add(&raw mut (*tree).members[member], -value) };
        }
        unsafe { atomic::add(&raw mut (*tree).rss, -rss) };
        slot = unsafe { (*tree).parent };
        if slot == NO_PARENT {
            break;
        }
    }
}

#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    let (Some(parent), Some(child)) = (
        field::<u32>(&ctx, &FORK_PARENT_PID_OFFSET),
        field::<u32>(&ctx, &FORK_CHILD_PID_OFFSET),
    ) else {
        return 0;
    };
    let Some(task) = TASKS.get_ptr(parent) else {
        return 0;
    };
    let tree_slot = unsafe { (*task).tree };
    let Some(tree) = tree(tree_slot) else {
        return 0;
    };
    // Any thread of a runner's root process forks the runner's tasks (the child may be a thread of
    // the runner too: it only matters if it execs, which a runner's thread does not).
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let runner_child = unsafe { (*tree).kind == TREE_RUNNER && (*tree).root_pid == tgid };
    let flags = if runner_child {
        TASK_CHILD_OF_RUNNER
    } else {
        0
    };
    let child_state = TaskState {
        tree: tree_slot,
        flags,
    };
    if TASKS.insert(child, child_state, 0).is_err() {
        count(Counter::TasksFull);
        return 0;
    }
    unsafe { atomic::add(&raw mut (*tree).live_tasks, 1) };
    0
}

/// Attached to both `sys_enter_execve` and `sys_enter_execveat`, whose records put `envp` at
/// different offsets: the record's event id tells which (one program, verified once).
#[tracepoint]
pub fn sys_enter_execve(ctx: TracePointContext) -> u32 {
    let event = unsafe { ctx.read_at::<u16>(0) }.unwrap_or(0);
    let envp_offset = if u32::from(event) == unsafe { read_volatile(&EXECVEAT_EVENT_ID) } {
        &EXECVEAT_ENVP_OFFSET
    } else {
        &EXECVE_ENVP_OFFSET
    };
    if let Some(envp) = field::<u64>(&ctx, envp_offset) {
        on_execve(envp);
    }
    0
}

/// A tracked task calls execve: does a task start here? Yes for a runner's direct child, and for a
/// process whose new environment carries the marker (unless it is inside a marker task already). The
/// task gets a tree of its own, nested in the current one, before the new mm exists, so everything
/// of the new program lands in it.
#[inline(always)]
fn on_execve(envp: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let Some(task) = TASKS.get_ptr_mut(tid) else {
        return;
    };
    let (current_slot, flags) = unsafe { ((*task).tree, (*task).flags) };
    let Some(current) = TREES.get_ptr(current_slot) else {
        return;
    };
    let current_kind = unsafe { (*current).kind };
    let kind = if flags & TASK_CHILD_OF_RUNNER != 0 {
        TREE_CHILD_TASK
    } else if (current_kind == TREE_RUNNER || current_kind == TREE_CHILD_TASK)
        && env_has_marker(envp)
    {
        TREE_MARKER_TASK
    } else {
        return;
    };
    let Ok(Some(slot)) = FREE_SLOTS.pop() else {
        count(Counter::NoTaskSlot);
        return;
    };
    let Some(new_tree) = TREES.get_ptr_mut(slot) else {
        return;
    };
    // The slot was reset by userspace before it was queued; only this CPU owns it now.
    unsafe {
        (*new_tree).parent = current_slot;
        (*new_tree).kind = kind;
        (*new_tree).root_pid = (pid_tgid >> 32) as u32;
        (*new_tree).live_tasks = 1;
        atomic::add(&raw mut (*(current as *mut TreeState)).live_tasks, -1);
        (*task).tree = slot;
        (*task).flags = (flags & !TASK_CHILD_OF_RUNNER) | TASK_ANNOUNCE_AT_EXEC;
    }
}

/// Whether one of the first `MAX_ENV_ENTRIES` strings of `envp` starts with `TASK_MARKER`.
///
/// Compared a word at a time under a byte mask, with no data-dependent branch inside an entry: the
/// verifier walks every iteration of the outer loop, and a byte loop inside made it take a second.
#[inline(always)]
fn env_has_marker(envp: u64) -> bool {
    if unsafe { read_volatile(&TASK_MARKER_LEN) } == 0 || envp == 0 {
        return false;
    }
    let mut words = [0u64; MARKER_WORDS];
    for index in 0..MAX_ENV_ENTRIES as u64 {
        let Ok(entry) = (unsafe { bpf_probe_read_user((envp + index * 8) as *const u64) }) else {
            return false;
        };
        if entry == 0 {
            return false;
        }
        // A string shorter than the marker ends in a NUL where the marker has none, so bytes left
        // from an earlier entry after it never make a match.
        let buffer = unsafe { &mut *(&raw mut words).cast::<[u8; MARKER_BYTES]>() };
        if unsafe { bpf_probe_read_user_str_bytes(entry as *const u8, buffer) }.is_err() {
            continue;
        }
        let mut differs = 0u64;
        for word in 0..MARKER_WORDS {
            let (marker, mask) = unsafe {
                (
                    read_volatile(&TASK_MARKER[word]),
                    read_volatile(&TASK_MARKER_MASK[word]),
                )
            };
            differs |= (words[word] & mask) ^ marker;
        }
        if differs == 0 {
            return true;
        }
    }
    false
}

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let (Some(pid), Some(old_pid)) = (
        field::<u32>(&ctx, &EXEC_PID_OFFSET),
        field::<u32>(&ctx, &EXEC_OLD_PID_OFFSET),
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
    let Some(task) = TASKS.get_ptr_mut(pid) else {
        return 0;
    };
    let flags = unsafe { (*task).flags };
    unsafe { (*task).flags = flags & !(TASK_PENDING_EXEC | TASK_ANNOUNCE_AT_EXEC) };
    if flags & TASK_ANNOUNCE_AT_EXEC != 0 {
        let slot = unsafe { (*task).tree };
        announce_start(&ctx, slot, pid);
    }
    0
}

fn announce_start(ctx: &TracePointContext, slot: u32, pid: u32) {
    let Some(tree) = TREES.get_ptr(slot) else {
        return;
    };
    let Some(mut entry) = EVENTS.reserve::<TaskEvent>(0) else {
        count(Counter::EventsLost);
        return;
    };
    let event = entry.as_mut_ptr();
    unsafe {
        (*event).kind = EVENT_TASK_STARTED;
        (*event).slot = slot;
        (*event).parent = (*tree).parent;
        (*event).pid = pid;
        (*event).time_ns = bpf_ktime_get_ns();
        (*event).filename = [0; 64];
        // `__data_loc`: offset in the low 16 bits, length in the high 16 bits.
        if let Some(location) = field::<u32>(ctx, &EXEC_FILENAME_OFFSET) {
            let start = ctx.as_ptr().cast::<u8>().add((location & 0xffff) as usize);
            let _ = bpf_probe_read_kernel_str_bytes(start, &mut (*event).filename);
        }
    }
    entry.submit(0);
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let Some(pid) = field::<u32>(&ctx, &EXIT_PID_OFFSET) else {
        return 0;
    };
    let Some(task) = TASKS.get_ptr(pid) else {
        return 0;
    };
    let tree_slot = unsafe { (*task).tree };
    // Forget the tid at once so a recycled pid never inherits it. The mm's teardown events that follow
    // (curr = 0, from 6.16 on after this tracepoint) still land: the mm stays bound until it is empty.
    let _ = TASKS.remove(pid);
    let Some(tree) = tree(tree_slot) else {
        return 0;
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tgid == pid {
        unsafe { atomic::add(&raw mut (*tree).exited_processes, 1) };
        if let Some(seed) = SEEDS.get_ptr(pid) {
            // Seeded but never bound: its teardown will come from an untracked task and not be
            // seen, so take its seed out of its trees now.
            let seed = unsafe { *seed };
            subtract_from_tree_chain(tree_slot, &seed.members);
            let _ = SEEDS.remove(pid);
        }
    }
    let live = unsafe { atomic::add(&raw mut (*tree).live_tasks, -1) };
    let kind = unsafe { (*tree).kind };
    if live == 0 && (kind == TREE_CHILD_TASK || kind == TREE_MARKER_TASK) {
        announce_end(tree_slot, pid, unsafe { (*tree).parent });
    }
    0
}

fn announce_end(slot: u32, pid: u32, parent: u32) {
    let event = TaskEvent {
        kind: EVENT_TASK_ENDED,
        slot,
        parent,
        pid,
        time_ns: unsafe { bpf_ktime_get_ns() },
        filename: [0; 64],
    };
    if EVENTS.output::<TaskEvent>(&event, 0).is_err() {
        count(Counter::EventsLost);
    }
}

/// The root process of a tree calls `exit_group(code)`: remember how it ended.
#[tracepoint]
pub fn sys_enter_exit_group(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(task) = TASKS.get_ptr(pid_tgid as u32) else {
        return 0;
    };
    let Some(tree) = TREES.get_ptr_mut(unsafe { (*task).tree }) else {
        return 0;
    };
    if unsafe { (*tree).root_pid } != (pid_tgid >> 32) as u32 {
        return 0;
    }
    if let Some(code) = field::<u64>(&ctx, &EXIT_GROUP_CODE_OFFSET) {
        unsafe {
            (*tree).exit_code = (code & 0xff) as i32;
            (*tree).exit_flags |= EXIT_CODE_KNOWN;
        }
    }
    0
}

/// A signal whose default action ends the process is delivered, unhandled, to a tree's root process:
/// remember it (what killed it, when no `exit_group` follows).
#[tracepoint]
pub fn signal_deliver(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(task) = TASKS.get_ptr(pid_tgid as u32) else {
        return 0;
    };
    let (Some(signal), Some(handler)) = (
        field::<i32>(&ctx, &SIGNAL_SIG_OFFSET),
        field::<u64>(&ctx, &SIGNAL_HANDLER_OFFSET),
    ) else {
        return 0;
    };
    // SIG_DFL, and not one of the signals whose default is to ignore or stop (CHLD, CONT, STOP,
    // TSTP, TTIN, TTOU, URG, WINCH).
    const NOT_FATAL: u64 = (1 << 17)
        | (1 << 18)
        | (1 << 19)
        | (1 << 20)
        | (1 << 21)
        | (1 << 22)
        | (1 << 23)
        | (1 << 28);
    if handler != 0 || !(1..64).contains(&signal) || NOT_FATAL & (1 << signal) != 0 {
        return 0;
    }
    let Some(tree) = TREES.get_ptr_mut(unsafe { (*task).tree }) else {
        return 0;
    };
    if unsafe { (*tree).root_pid } == (pid_tgid >> 32) as u32 {
        unsafe {
            (*tree).signal = signal;
            (*tree).exit_flags |= EXIT_SIGNAL_KNOWN;
        }
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
