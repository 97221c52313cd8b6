//! `#[repr(C)]` values of the BPF maps and the constants both sides agree on.
//!
//! All counters are `i64` bytes so they can be updated with 64-bit BPF atomics; they are naturally
//! aligned because every field is 8 bytes wide (or a pair of `u32`s).

/// `kmem:rss_stat` `member` values (`enum { MM_FILEPAGES, MM_ANONPAGES, MM_SWAPENTS, MM_SHMEMPAGES }`).
pub const MM_FILEPAGES: usize = 0;
pub const MM_ANONPAGES: usize = 1;
pub const MM_SWAPENTS: usize = 2;
pub const MM_SHMEMPAGES: usize = 3;
/// Number of `rss_stat` members.
pub const NR_MEMBERS: usize = 4;

/// Map names, as the BPF object exports them.
pub const MAP_TASKS: &str = "TASKS";
pub const MAP_MMS: &str = "MMS";
pub const MAP_TREES: &str = "TREES";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const MAP_SEEDS: &str = "SEEDS";
pub const MAP_FREE_SLOTS: &str = "FREE_SLOTS";
pub const MAP_EVENTS: &str = "EVENTS";
/// Size of the task-event ring buffer.
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Capacity of the maps. Tasks and mms are preallocated hash maps: a full map is counted
/// ([`Counter::TasksFull`], [`Counter::MmsFull`]) and makes the affected result inexact.
pub const MAX_TASKS: u32 = 65_536;
pub const MAX_MMS: u32 = 65_536;
/// Trees are slots of an array map (an array lookup is inlined by the verifier: cheaper than a hash
/// lookup on the `rss_stat` hot path). Userspace owns slot allocation.
pub const MAX_TREES: u32 = 1_024;
/// Processes already running when tracking starts, waiting for their mm to be bound.
pub const MAX_SEEDS: u32 = 8_192;

/// Value of `TASKS` (key: host tid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskState {
    /// Slot in `TREES` of the tree this task belongs to.
    pub tree: u32,
    /// `TASK_*` flags.
    pub flags: u32,
}

/// The task was registered by userspace before its `execve`: its current address space is a copy of
/// the tracer's and must not be counted. Binding starts at its `sched_process_exec`.
pub const TASK_PENDING_EXEC: u32 = 1;
/// Forked by a thread of a runner: its next `execve` starts a task (a tree of its own, nested in the
/// runner's).
pub const TASK_CHILD_OF_RUNNER: u32 = 1 << 1;
/// Started a task at `execve`: announce it to userspace when the exec has succeeded.
pub const TASK_ANNOUNCE_AT_EXEC: u32 = 1 << 2;

/// `TreeState::parent` of a tree nested in none.
pub const NO_PARENT: u32 = u32::MAX;
/// Ancestors a tree can have: a runner's direct-child task, and a marker task inside one (marker
/// tasks never nest in marker tasks, and only a runner's own children start child tasks). Kept tight:
/// the verifier walks the ancestor loop of the `rss_stat` program once per level.
pub const MAX_TREE_DEPTH: usize = 2;

/// `TreeState::kind`.
pub const TREE_PLAIN: u32 = 0;
/// Its root's children start tasks when they exec; processes whose environment carries the marker do.
pub const TREE_RUNNER: u32 = 1;
/// A task started by a runner's child exec.
pub const TREE_CHILD_TASK: u32 = 2;
/// A task started by an exec whose environment carries the marker (no task nests inside it).
pub const TREE_MARKER_TASK: u32 = 3;

/// `TreeState::exit_flags`.
pub const EXIT_CODE_KNOWN: u32 = 1;
pub const EXIT_SIGNAL_KNOWN: u32 = 1 << 1;

/// Kinds of [`TaskEvent`].
pub const EVENT_TASK_STARTED: u32 = 1;
pub const EVENT_TASK_ENDED: u32 = 2;

/// A task's start (after its exec succeeded) or end (its last task exited), sent to userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskEvent {
    pub kind: u32,
    /// The task's tree slot.
    pub slot: u32,
    /// The tree it nests in.
    pub parent: u32,
    /// The task's root process.
    pub pid: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub time_ns: u64,
    /// The exec'd file (start events), NUL-padded: the label when the process is gone before
    /// userspace can read its command line.
    pub filename: [u8; 64],
}

/// Longest environment marker (`NAME=`) the exec handler compares.
pub const MARKER_BYTES: usize = 64;
/// The marker as 64-bit words.
pub const MARKER_WORDS: usize = MARKER_BYTES / 8;
/// Environment entries the exec handler looks at.
pub const MAX_ENV_ENTRIES: u32 = 256;

/// Value of `MMS` (key: `rss_stat` `mm_id`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmState {
    /// Slot in `TREES` of the tree this address space is counted in.
    pub tree: u32,
    /// tgid of the process last seen running on this mm (`curr = 1`), 0 if none yet. Lets the hot path
    /// tell its own process from a stranger whose mm got the same (recycled or colliding) `mm_id`
    /// without a second map lookup.
    pub owner_tgid: u32,
    /// Last `size` seen for each member, in bytes (`rss_stat` reports absolute values, not deltas).
    pub last: [i64; NR_MEMBERS],
    /// file + anon + shmem of this mm.
    pub rss: i64,
    /// Peak of `rss`.
    pub peak: i64,
}

/// Value of `SEEDS` (key: tgid): the `rss_stat` members of a process that was already running when
/// tracking started, read by userspace from `/proc/PID/status` and already added to its tree. Its mm
/// id is unknown to userspace, so the mm's state starts from these values when the process itself
/// first emits an event for its own mm (`curr = 1`); the first event then moves the tree by the
/// change since the seed was read, not by the whole value again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seed {
    pub members: [i64; NR_MEMBERS],
}

impl Seed {
    /// file + anon + shmem.
    pub const fn rss(&self) -> i64 {
        self.members[MM_FILEPAGES] + self.members[MM_ANONPAGES] + self.members[MM_SHMEMPAGES]
    }
}

/// Value of `TREES` (index: slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeState {
    /// Live total of file + anon + shmem over every mm of the tree, in bytes.
    pub rss: i64,
    /// Peak of `rss`.
    pub peak: i64,
    /// Live value of each member summed over the tree.
    pub members: [i64; NR_MEMBERS],
    /// `members` as read right after the event that set `peak`.
    pub peak_members: [i64; NR_MEMBERS],
    /// Peak of `members[MM_SWAPENTS]` (swap is not resident, so it is reported apart).
    pub swap_peak: i64,
    /// Tracked tasks (threads included) alive now.
    pub live_tasks: i64,
    /// Processes (thread-group leaders) of the tree that have exited.
    pub exited_processes: i64,
    /// Address spaces bound to the tree so far.
    pub mms_bound: i64,
    /// Slot of the tree this one nests in (its runner), or [`NO_PARENT`].
    pub parent: u32,
    /// `TREE_*`.
    pub kind: u32,
    /// The tree's root process (tgid).
    pub root_pid: u32,
    /// `EXIT_*` flags: what is known of how the root process ended.
    pub exit_flags: u32,
    /// The root process's `exit_group` status (with `EXIT_CODE_KNOWN`).
    pub exit_code: i32,
    /// The default-fatal signal last delivered to the root process (with `EXIT_SIGNAL_KNOWN`).
    pub signal: i32,
}

/// Indices of the per-CPU `COUNTERS` array: things that can make a result wrong. (How many events
/// the programs handled, the kernel counts itself: see `tracer run --bpf-stats`.)
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// An mm could not be bound because `MMS` was full: its memory is missing from its tree.
    MmsFull = 0,
    /// A forked task could not be tracked because `TASKS` was full.
    TasksFull = 1,
    /// `rss_stat` reported a negative size (kernels with split RSS counting); clamped to 0.
    NegativeSize = 2,
    /// A tree total went below zero: it saw frees of memory it never saw allocated.
    TreeNegative = 3,
    /// A running process that is not tracked emitted `curr = 1` on a bound `mm_id` (id recycled after a
    /// missed teardown, or a hash collision); its event was ignored.
    ForeignMm = 4,
    /// The peak compare-and-swap loop gave up under contention; a peak may be a few pages low.
    PeakContention = 5,
    /// A map entry pointed at a tree slot outside `TREES`.
    BadTreeSlot = 6,
    /// A task could not get a tree (no free slot): it stays counted in its runner's tree only.
    NoTaskSlot = 7,
    /// The task-event ring buffer was full: a task start or end was not reported.
    EventsLost = 8,
}

/// Number of `COUNTERS` entries.
pub const NR_COUNTERS: u32 = 9;

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; NR_COUNTERS as usize] = [
        Counter::MmsFull,
        Counter::TasksFull,
        Counter::NegativeSize,
        Counter::TreeNegative,
        Counter::ForeignMm,
        Counter::PeakContention,
        Counter::BadTreeSlot,
        Counter::NoTaskSlot,
        Counter::EventsLost,
    ];

    /// Stable machine name used in reports (`inexact_reasons`).
    pub const fn name(self) -> &'static str {
        match self {
            Counter::MmsFull => "mm_map_full",
            Counter::TasksFull => "task_map_full",
            Counter::NegativeSize => "negative_rss_size",
            Counter::TreeNegative => "tree_total_negative",
            Counter::ForeignMm => "foreign_mm_id",
            Counter::PeakContention => "peak_update_contention",
            Counter::BadTreeSlot => "bad_tree_slot",
            Counter::NoTaskSlot => "no_task_slot",
            Counter::EventsLost => "task_events_lost",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers with no padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::TaskState {}
    unsafe impl aya::Pod for super::MmState {}
    unsafe impl aya::Pod for super::TreeState {}
    unsafe impl aya::Pod for super::Seed {}
    unsafe impl aya::Pod for super::TaskEvent {}
}
