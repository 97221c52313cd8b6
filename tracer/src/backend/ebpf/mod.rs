//! The eBPF backend: loads tracer's kernel programs and keeps per-tree peaks in their maps.

//!
//! - `mod.rs`: trees (runs, runners, tasks) in the kernel maps, from their start to their report;
//! - `programs`: the BPF object, tracepoint layouts, loading, statistics, detaching;
//! - `tasks`: task starts and ends from the kernel side, and their reports.

mod programs;
mod tasks;

use super::{Backend, BackendKind, ProgramStats};
use crate::{
    error::TrackError,
    kernel::Kernel,
    proc,
    report::{PeakBreakdown, TreeSample},
    tasks::{TaskReport, TaskRules},
};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, Queue, RingBuf},
};
use std::{
    collections::{HashMap as StdHashMap, VecDeque},
    time::{Duration, Instant, SystemTime},
};
use tasks::TaskInfo;
use tracer_common::{
    Counter, MAP_SEEDS, MAP_TASKS, MAP_TREES, MAX_TREES, MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES,
    MM_SWAPENTS, MmState, NO_PARENT, NR_COUNTERS, NR_MEMBERS, Seed, TASK_PENDING_EXEC,
    TREE_CHILD_TASK, TREE_PLAIN, TREE_RUNNER, TaskState, TreeState,
};

/// How long a freed tree slot waits before reuse: an event already inside a program may still write
/// to it.
const SLOT_COOLING: Duration = Duration::from_millis(200);

/// Identifies one tracked tree (a slot in the `TREES` map).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TreeId(u32);

struct ActiveTree {
    counters_at_start: [u64; NR_COUNTERS as usize],
    missed_at_start: u64,
    /// Processes given a seed when the tree started (their seeds go once their mm binds or they exit).
    seeded: Vec<u32>,
    /// Tasks registered after the tree's totals went live, so not counted in its `live_tasks`.
    late_tasks: i64,
    /// Processes of trees nested in this one that have ended already.
    nested_processes: u64,
}

/// Loaded and attached BPF programs and their maps. Each tracker has its own maps, so several tracers
/// on one host never see each other's trees.
pub struct EbpfTracker {
    // Owns the programs and their links: dropping it detaches everything.
    ebpf: Ebpf,
    tasks: HashMap<MapData, u32, TaskState>,
    mms: HashMap<MapData, u32, MmState>,
    seeds: HashMap<MapData, u32, Seed>,
    trees: Array<MapData, TreeState>,
    counters: PerCpuArray<MapData, u64>,
    active: StdHashMap<u32, ActiveTree>,
    /// Root pid → tree, for the `Backend` interface.
    roots: StdHashMap<u32, TreeId>,
    free_slots: Queue<MapData, u32>,
    /// Freed slots waiting out `SLOT_COOLING` before they go back to `free_slots`.
    cooling: VecDeque<(Instant, u32)>,
    events: RingBuf<MapData>,
    task_rules: Option<TaskRules>,
    /// Started tasks, by tree slot.
    task_info: StdHashMap<u32, TaskInfo>,
    kernel: Kernel,
}

impl EbpfTracker {
    /// The kernel this tracker runs on.
    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// Starts a tree at `pid`, a process that has not yet called `execve` (see `spawn`): its current
    /// address space (a copy of the tracer's) is not counted, everything from its exec on is, and so is
    /// every task it creates.
    pub fn track_before_exec(&mut self, pid: u32) -> Result<TreeId, TrackError> {
        self.open_before_exec(pid, TREE_PLAIN)
    }

    /// Like [`EbpfTracker::track_before_exec`], for a task runner: every process its root forks
    /// starts a task when it execs, as does every exec whose environment carries the marker; each
    /// task gets a tree of its own, nested in the runner's (which counts everything). Task starts and
    /// ends come from [`EbpfTracker::wait_task_events`]. Needs a tracker loaded with task rules.
    pub fn track_runner_before_exec(&mut self, pid: u32) -> Result<TreeId, TrackError> {
        if self.task_rules.is_none() {
            return Err(TrackError::TasksNotEnabled);
        }
        self.open_before_exec(pid, TREE_RUNNER)
    }

    fn open_before_exec(&mut self, pid: u32, kind: u32) -> Result<TreeId, TrackError> {
        let slot = self.alloc_slot()?;
        let tree = TreeState {
            live_tasks: 1,
            kind,
            root_pid: pid,
            parent: NO_PARENT,
            ..TreeState::default()
        };
        self.open_trees(
            &[(slot, tree)],
            Vec::new(),
            &[(pid, TASK_PENDING_EXEC, slot)],
        )?;
        Ok(TreeId(slot))
    }

    /// A tree slot from the pool shared with the kernel side (which takes task slots there).
    fn alloc_slot(&mut self) -> Result<u32, TrackError> {
        self.recycle_cooled_slots(false);
        self.free_slots
            .pop(0)
            .map_err(|_| TrackError::TooManyTrees(MAX_TREES))
    }

    /// Gives a slot back, after `SLOT_COOLING`.
    fn release_slot(&mut self, slot: u32) {
        self.cooling.push_back((Instant::now(), slot));
    }

    fn recycle_cooled_slots(&mut self, all: bool) {
        while let Some(&(freed, slot)) = self.cooling.front() {
            if !all && freed.elapsed() < SLOT_COOLING {
                break;
            }
            self.cooling.pop_front();
            // Reset before the kernel side can take it: it only sets the fields it needs.
            if self.trees.set(slot, TreeState::default(), 0).is_ok() {
                let _ = self.free_slots.push(slot, 0);
            }
        }
    }

    /// Starts a tree at the running process `pid`, with its threads and every descendant alive now.
    /// Their current RSS (from `/proc`) is the tree's starting point: what they used before is
    /// unknown.
    pub fn track_running(&mut self, pid: u32) -> Result<TreeId, TrackError> {
        Ok(self.open_running(pid, false)?.0)
    }

    /// Like [`EbpfTracker::track_running`], for a task runner (see
    /// [`EbpfTracker::track_runner_before_exec`]): each child it has now becomes a task at once, with
    /// its own descendants; returns the runner's tree and those tasks with their root pids.
    pub fn track_runner(&mut self, pid: u32) -> Result<(TreeId, Vec<(TreeId, u32)>), TrackError> {
        if self.task_rules.is_none() {
            return Err(TrackError::TasksNotEnabled);
        }
        self.open_running(pid, true)
    }

    fn open_running(
        &mut self,
        pid: u32,
        runner: bool,
    ) -> Result<(TreeId, Vec<(TreeId, u32)>), TrackError> {
        if proc::parent_of(pid).is_none() {
            return Err(TrackError::NoSuchProcess(pid));
        }
        let kind = if runner { TREE_RUNNER } else { TREE_PLAIN };
        let root = TreeState {
            kind,
            root_pid: pid,
            parent: NO_PARENT,
            ..TreeState::default()
        };
        let mut trees = vec![(self.alloc_slot()?, root)];
        // Which of `trees` each process is counted in.
        let mut owner: StdHashMap<u32, usize> = StdHashMap::from([(pid, 0)]);
        let mut seeds = Vec::new();
        let mut tasks = Vec::new();
        for process in proc::tree_of(pid) {
            let parent = proc::parent_of(process).unwrap_or(pid);
            let index = if process == pid {
                0
            } else if runner && parent == pid {
                let slot = match self.alloc_slot() {
                    Ok(slot) => slot,
                    Err(err) => {
                        trees.iter().for_each(|&(slot, _)| self.release_slot(slot));
                        return Err(err);
                    }
                };
                let task = TreeState {
                    kind: TREE_CHILD_TASK,
                    root_pid: process,
                    parent: trees[0].0,
                    ..TreeState::default()
                };
                trees.push((slot, task));
                trees.len() - 1
            } else {
                owner.get(&parent).copied().unwrap_or(0)
            };
            owner.insert(process, index);
            // rss_stat member order: file, anon, swap, shmem.
            let Some(values) =
                proc::status_bytes(process, &["RssFile", "RssAnon", "VmSwap", "RssShmem"])
            else {
                continue; // exited meanwhile, or a kernel thread
            };
            let mut seed = Seed::default();
            for (member, value) in values.into_iter().enumerate().take(NR_MEMBERS) {
                seed.members[member] = value as i64;
            }
            // The process counts in its tree and in the runner's.
            let counted_in = if index == 0 { vec![0] } else { vec![index, 0] };
            let threads = proc::threads_of(process);
            for &tree_index in &counted_in {
                let tree = &mut trees[tree_index].1;
                for member in 0..NR_MEMBERS {
                    tree.members[member] += seed.members[member];
                }
                tree.rss += seed.rss();
            }
            trees[index].1.live_tasks += threads.len() as i64;
            seeds.push((process, seed));
            let slot = trees[index].0;
            tasks.extend(threads.into_iter().map(|tid| (tid, 0, slot)));
        }
        for (_, tree) in &mut trees {
            tree.peak = tree.rss;
            tree.peak_members = tree.members;
            tree.swap_peak = tree.members[MM_SWAPENTS];
        }
        self.open_trees(&trees, seeds, &tasks)?;
        let id = TreeId(trees[0].0);
        self.register_late_descendants(id, pid, runner);
        let task_trees = trees[1..]
            .iter()
            .map(|&(slot, tree)| (TreeId(slot), tree.root_pid))
            .collect();
        Ok((id, task_trees))
    }

    /// Processes forked by a not-yet-registered parent while the tree was being registered are in no
    /// map: walk the tree again until no such process is found. Those found now are registered
    /// without a seed (the kernel side updates the tree's totals concurrently from here on): each of
    /// their RSS members counts from its first change on. A runner's late children still become tasks
    /// when they exec.
    fn register_late_descendants(&mut self, id: TreeId, root: u32, runner: bool) {
        for _ in 0..4 {
            let late: Vec<(u32, u32)> = proc::tree_of(root)
                .into_iter()
                .flat_map(|process| {
                    let flags = if runner && proc::parent_of(process) == Some(root) {
                        tracer_common::TASK_CHILD_OF_RUNNER
                    } else {
                        0
                    };
                    proc::threads_of(process)
                        .into_iter()
                        .map(move |tid| (tid, flags))
                })
                .filter(|(tid, _)| self.tasks.get(tid, 0).is_err())
                .collect();
            if late.is_empty() {
                return;
            }
            for (tid, flags) in late {
                let task = TaskState { tree: id.0, flags };
                if self.tasks.insert(tid, task, 0).is_ok()
                    && let Some(active) = self.active.get_mut(&id.0)
                {
                    active.late_tasks += 1;
                }
            }
        }
    }

    /// Registers trees: their totals, then the seeds, then the tasks (an mm can only bind once its
    /// task is registered, and must find its seed then).
    fn open_trees(
        &mut self,
        trees: &[(u32, TreeState)],
        seeds: Vec<(u32, Seed)>,
        tasks: &[(u32, u32, u32)],
    ) -> Result<(), TrackError> {
        let mut registered = Ok(());
        for (slot, tree) in trees {
            if registered.is_ok() {
                registered = self
                    .trees
                    .set(*slot, tree, 0)
                    .map_err(map_err(MAP_TREES, "set"));
            }
        }
        for (tgid, seed) in &seeds {
            if registered.is_ok() {
                registered = self
                    .seeds
                    .insert(tgid, seed, 0)
                    .map_err(map_err(MAP_SEEDS, "insert"));
            }
        }
        for &(tid, flags, slot) in tasks {
            if registered.is_ok() {
                let task = TaskState { tree: slot, flags };
                registered = self
                    .tasks
                    .insert(tid, task, 0)
                    .map_err(map_err(MAP_TASKS, "insert"));
            }
        }
        let seeded: Vec<u32> = seeds.iter().map(|(tgid, _)| *tgid).collect();
        for (index, &(slot, _)) in trees.iter().enumerate() {
            let mut active = self.new_active();
            if index == 0 {
                // The root tree owns the seeds' clean-up.
                active.seeded = seeded.clone();
            }
            self.active.insert(slot, active);
        }
        if let Err(err) = registered {
            for &(slot, _) in trees.iter().rev() {
                let _ = self.stop_tracking(TreeId(slot));
            }
            return Err(err);
        }
        Ok(())
    }

    /// Bookkeeping for a tree that starts now: the counters it will be judged against.
    fn new_active(&self) -> ActiveTree {
        ActiveTree {
            counters_at_start: self.counter_totals(),
            missed_at_start: self.missed_events(),
            seeded: Vec::new(),
            late_tasks: 0,
            nested_processes: 0,
        }
    }

    /// Trees nested in `id` that are still tracked (tasks of a runner, and tasks inside those).
    pub fn nested_trees(&self, id: TreeId) -> Vec<TreeId> {
        let mut nested = Vec::new();
        let mut frontier = vec![id.0];
        while let Some(parent) = frontier.pop() {
            for &slot in self.active.keys() {
                if self
                    .trees
                    .get(&slot, 0)
                    .is_ok_and(|tree| tree.parent == parent && slot != parent)
                {
                    nested.push(TreeId(slot));
                    frontier.push(slot);
                }
            }
        }
        nested
    }

    /// The tree's numbers so far.
    pub fn peek(&self, id: TreeId) -> Result<TreeSample, TrackError> {
        let active = self
            .active
            .get(&id.0)
            .ok_or(TrackError::UnknownTree(id.0))?;
        let tree = self
            .trees
            .get(&id.0, 0)
            .map_err(map_err(MAP_TREES, "lookup"))?;
        let mut reasons = Vec::new();
        if !self.kernel.has_exact_rss_counters() {
            reasons.push(format!(
                "kernel {} < 6.2 batches RSS counter updates per thread (SPLIT_RSS_COUNTING): \
                 the peak is approximate",
                self.kernel.release
            ));
        }
        let now = self.counter_totals();
        for counter in Counter::ALL {
            let moved = now[counter as usize] - active.counters_at_start[counter as usize];
            if moved > 0 {
                reasons.push(format!(
                    "{}: {moved} event(s) while tracking",
                    counter.name()
                ));
            }
        }
        let missed = self.missed_events() - active.missed_at_start;
        if missed > 0 {
            reasons.push(format!(
                "dropped_events: the kernel skipped our programs {missed} time(s) while tracking \
                 (another BPF program was running on that CPU)"
            ));
        }
        let mut sample = sample(&tree, reasons);
        sample.still_running = (tree.live_tasks + active.late_tasks).max(0) as u64;
        Ok(sample)
    }

    /// Ends tracking of a tree: returns its final numbers and removes every map entry it still has
    /// (tasks still running, address spaces not yet torn down), so nothing of it leaks into a later
    /// tree that gets the same slot, pid or `mm_id`.
    pub fn stop_tracking(&mut self, id: TreeId) -> Result<TreeSample, TrackError> {
        let root_exit = self.root_exit(id);
        // Trees nested in this one (tasks still running when their runner stops) go first; what
        // still runs in them is still running in this tree too.
        let mut nested_running = 0;
        for nested in self.nested_trees(id).into_iter().rev() {
            if let Ok(nested) = self.stop_tracking(nested) {
                nested_running += nested.still_running;
            }
        }
        let mut sample = self.peek(id)?;
        let slot = id.0;
        let leftover_tasks = remove_where(&mut self.tasks, |task| task.tree == slot);
        sample.processes += leftover_tasks
            .iter()
            .filter(|&&tid| proc::is_process_leader(tid))
            .count() as u64;
        sample.still_running = leftover_tasks.len() as u64 + nested_running;
        if let Some(active) = self.active.get(&slot) {
            sample.processes += active.nested_processes;
        }
        // This tree's processes are its parent's too.
        if let Ok(tree) = self.trees.get(&slot, 0)
            && let Some(parent) = self.active.get_mut(&tree.parent)
        {
            parent.nested_processes += sample.processes;
        }
        let leftover_mms = remove_where(&mut self.mms, |mm| mm.tree == slot);
        sample.leftover_mms = leftover_mms.len() as u64;
        let seeded = self
            .active
            .get(&slot)
            .is_some_and(|active| !active.seeded.is_empty());
        if sample.address_spaces == 0 && !seeded {
            // Every process has an address space: seeing none (and having read none from /proc
            // when tracking started) means nothing was measured.
            sample
                .inexact_reasons
                .push("no_events: no address space of the tree was seen".into());
            sample.exact = false;
        }
        if sample.still_running == 0 && sample.rss_bytes != 0 {
            // Every task exited, so every address space should have been torn down to zero.
            sample.inexact_reasons.push(format!(
                "unbalanced_teardown: {} bytes still counted after every process exited",
                sample.rss_bytes
            ));
            sample.exact = false;
        }
        if let Some(active) = self.active.get(&slot) {
            for tgid in &active.seeded {
                let _ = self.seeds.remove(tgid);
            }
        }
        self.active.remove(&slot);
        self.task_info.remove(&slot);
        self.release_slot(slot);
        sample.root_exit = root_exit;
        Ok(sample)
    }

    /// Entries in the task and mm maps belonging to any tree (for tests and diagnostics).
    pub fn map_entries(&self) -> (usize, usize) {
        (self.tasks.keys().count(), self.mms.keys().count())
    }

    /// Sum over CPUs of every counter.
    fn counter_totals(&self) -> [u64; NR_COUNTERS as usize] {
        let mut totals = [0; NR_COUNTERS as usize];
        for (index, total) in totals.iter_mut().enumerate() {
            if let Ok(values) = self.counters.get(&(index as u32), 0) {
                *total = values.iter().sum();
            }
        }
        totals
    }
}

/// Removes the entries whose value matches, returns their keys. The kernel side may remove one
/// itself between the scan and the removal (a task exits, an mm is torn down): that is fine.
fn remove_where<V: aya::Pod>(
    map: &mut HashMap<MapData, u32, V>,
    matches: impl Fn(&V) -> bool,
) -> Vec<u32> {
    let keys: Vec<u32> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, value)| matches(value))
        .map(|(key, _)| key)
        .collect();
    for key in &keys {
        let _ = map.remove(key);
    }
    keys
}

fn sample(tree: &TreeState, inexact_reasons: Vec<String>) -> TreeSample {
    let bytes = |value: i64| value.max(0) as u64;
    TreeSample {
        rss_bytes: tree.rss,
        peak_rss_bytes: bytes(tree.peak),
        peak_breakdown: PeakBreakdown {
            anon_bytes: bytes(tree.peak_members[MM_ANONPAGES]),
            file_bytes: bytes(tree.peak_members[MM_FILEPAGES]),
            shmem_bytes: bytes(tree.peak_members[MM_SHMEMPAGES]),
        },
        peak_swap_bytes: bytes(tree.swap_peak),
        processes: bytes(tree.exited_processes),
        address_spaces: bytes(tree.mms_bound),
        still_running: bytes(tree.live_tasks),
        exact: inexact_reasons.is_empty(),
        inexact_reasons,
        ..TreeSample::default()
    }
}

fn map_err(
    map: &'static str,
    action: &'static str,
) -> impl FnOnce(aya::maps::MapError) -> TrackError {
    move |source| TrackError::Map {
        map,
        action,
        source,
    }
}

impl Backend for EbpfTracker {
    fn kind(&self) -> BackendKind {
        BackendKind::Ebpf
    }

    fn start_before_exec(&mut self, pid: u32) -> Result<bool, TrackError> {
        let tree = self.track_before_exec(pid)?;
        self.roots.insert(pid, tree);
        Ok(true)
    }

    fn start(&mut self, pid: u32) -> Result<(), TrackError> {
        let tree = self.track_running(pid)?;
        self.roots.insert(pid, tree);
        Ok(())
    }

    fn peek(&self, pid: u32) -> Option<TreeSample> {
        self.peek(*self.roots.get(&pid)?).ok()
    }

    fn stop(&mut self, pid: u32) -> Option<TreeSample> {
        let tree = self.roots.remove(&pid)?;
        match self.stop_tracking(tree) {
            Ok(sample) => Some(sample),
            // The numbers cannot be read back: say so rather than report zeros as exact.
            Err(err) => Some(TreeSample {
                exact: false,
                inexact_reasons: vec![format!("reading the kernel maps failed: {err}")],
                ..TreeSample::default()
            }),
        }
    }

    fn start_runner(&mut self, pid: u32, before_exec: bool) -> Result<bool, TrackError> {
        if before_exec {
            let tree = self.track_runner_before_exec(pid)?;
            self.roots.insert(pid, tree);
            return Ok(true);
        }
        let (tree, tasks) = self.track_runner(pid)?;
        self.roots.insert(pid, tree);
        for (task, task_pid) in tasks {
            let info = self.task_info_now(task_pid, None, SystemTime::now(), true);
            self.task_info.insert(task.0, info);
        }
        Ok(true)
    }

    fn finished_tasks(&mut self, timeout: Duration) -> Vec<TaskReport> {
        self.collect_finished_tasks(timeout)
    }

    fn detach_in_background(self: Box<Self>) {
        EbpfTracker::detach_in_background(*self);
    }

    fn map_entries(&self) -> Option<(usize, usize)> {
        Some(self.map_entries())
    }

    fn program_stats(&self) -> Vec<ProgramStats> {
        self.program_stats()
    }
}
