//! The eBPF backend: loads tracer's kernel programs and keeps per-tree peaks in their maps.

use super::{Backend, BackendKind, ProgramStats};
use crate::tasks::{LabelSource, TaskReport, TaskRules, label_of, parse_environment};
use crate::{
    error::{LoadError, TrackError},
    kernel::{self, Kernel},
    proc,
    report::{PeakBreakdown, TreeSample},
    tracefs,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, Queue, RingBuf},
    programs::TracePoint,
};
use std::{
    collections::{HashMap as StdHashMap, VecDeque},
    os::fd::{AsFd as _, AsRawFd as _},
    time::{Duration, Instant, SystemTime},
};
use tracer_common::{
    Counter, EXIT_CODE_KNOWN, EXIT_SIGNAL_KNOWN, MAP_COUNTERS, MAP_EVENTS, MAP_FREE_SLOTS, MAP_MMS,
    MAP_SEEDS, MAP_TASKS, MAP_TREES, MARKER_BYTES, MARKER_WORDS, MAX_TREES, MM_ANONPAGES,
    MM_FILEPAGES, MM_SHMEMPAGES, MM_SWAPENTS, MmState, NO_PARENT, NR_COUNTERS, NR_MEMBERS, Seed,
    TASK_PENDING_EXEC, TREE_CHILD_TASK, TREE_PLAIN, TREE_RUNNER, TaskEvent, TaskState, TreeState,
    format,
};

/// The BPF object, built from `tracer-ebpf` by build.rs.
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer.bpf.o"));

/// Programs and the tracepoints they attach to.
const PROGRAMS: [(&str, &str, &str); 4] = [
    ("rss_stat", "kmem", "rss_stat"),
    ("sched_process_fork", "sched", "sched_process_fork"),
    ("sched_process_exec", "sched", "sched_process_exec"),
    ("sched_process_exit", "sched", "sched_process_exit"),
];

/// Programs needed only to split a runner's tree into tasks: where tasks start (exec, with the
/// environment), and how their root processes end.
const TASK_PROGRAMS: [(&str, &str, &str); 4] = [
    ("sys_enter_execve", "syscalls", "sys_enter_execve"),
    ("sys_enter_execveat", "syscalls", "sys_enter_execveat"),
    ("sys_enter_exit_group", "syscalls", "sys_enter_exit_group"),
    ("signal_deliver", "signal", "signal_deliver"),
];

/// How long a freed tree slot waits before reuse: an event already inside a program may still write
/// to it.
const SLOT_COOLING: Duration = Duration::from_millis(200);

/// What userspace knows of a started task until it ends.
struct TaskInfo {
    pid: u32,
    label: Option<(String, LabelSource)>,
    command: Vec<String>,
    start: SystemTime,
    started_before_tracking: bool,
}

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
    /// Checks privileges and tracepoint layouts, then loads and attaches the programs.
    pub fn load() -> Result<EbpfTracker, LoadError> {
        EbpfTracker::load_with(None)
    }

    /// Like [`EbpfTracker::load`]; with `task_rules`, also the programs that split runner trees into
    /// tasks (see [`EbpfTracker::track_runner`]).
    pub fn load_with(task_rules: Option<TaskRules>) -> Result<EbpfTracker, LoadError> {
        let kernel = Kernel::current();
        kernel::check_privileges()?;
        kernel::check_host_pid_namespace()?;
        kernel.check_supported()?;
        let tracefs = tracefs::root()?;
        let rss_stat = tracefs::format(&tracefs, "kmem", "rss_stat").map_err(|err| match err {
            LoadError::MissingTracepoint { event } => LoadError::MissingTracepointOnKernel {
                event,
                kernel: kernel.release.clone(),
            },
            other => other,
        })?;
        for (field, offset, size) in format::RSS_STAT_FIELDS {
            let found = rss_stat.offset(field, size)?;
            if found != offset {
                return Err(LoadError::FormatMismatch {
                    event: "kmem:rss_stat".into(),
                    detail: format!(
                        "field `{field}` at offset {found}, the program reads {offset}"
                    ),
                });
            }
        }
        let fork = tracefs::format(&tracefs, "sched", "sched_process_fork")?;
        let exec = tracefs::format(&tracefs, "sched", "sched_process_exec")?;
        let exit = tracefs::format(&tracefs, "sched", "sched_process_exit")?;
        let offsets = [
            (
                format::GLOBAL_FORK_PARENT_PID,
                fork.offset("parent_pid", 4)?,
            ),
            (format::GLOBAL_FORK_CHILD_PID, fork.offset("child_pid", 4)?),
            (format::GLOBAL_EXEC_PID, exec.offset("pid", 4)?),
            (format::GLOBAL_EXEC_OLD_PID, exec.offset("old_pid", 4)?),
            (format::GLOBAL_EXIT_PID, exit.offset("pid", 4)?),
        ]
        .map(|(name, offset)| (name, offset as u32));
        let task_offsets = match &task_rules {
            Some(_) => task_offsets(&tracefs, &exec)?,
            None => [0; 6],
        };
        let (marker, marker_mask, marker_len) = match &task_rules {
            Some(rules) => marker_words(&rules.marker)?,
            None => ([0; MARKER_WORDS], [0; MARKER_WORDS], 0),
        };

        let mut loader = loader_without_kernel_btf();
        for (name, offset) in &offsets {
            loader.override_global(name, offset, true);
        }
        for (name, offset) in TASK_GLOBALS.iter().zip(&task_offsets) {
            loader.override_global(name, offset, true);
        }
        loader.override_global(format::GLOBAL_TASK_MARKER, &marker, true);
        loader.override_global(format::GLOBAL_TASK_MARKER_MASK, &marker_mask, true);
        loader.override_global(format::GLOBAL_TASK_MARKER_LEN, &marker_len, true);
        let mut ebpf = loader.load(BPF_OBJECT).map_err(LoadError::Object)?;
        for (program, category, name) in PROGRAMS {
            attach(&mut ebpf, program, category, name)?;
        }
        if task_rules.is_some() {
            for (program, category, name) in TASK_PROGRAMS {
                attach(&mut ebpf, program, category, name)?;
            }
        }
        let tasks =
            HashMap::try_from(take_map(&mut ebpf, MAP_TASKS)?).map_err(map_type(MAP_TASKS))?;
        let mms = HashMap::try_from(take_map(&mut ebpf, MAP_MMS)?).map_err(map_type(MAP_MMS))?;
        let seeds =
            HashMap::try_from(take_map(&mut ebpf, MAP_SEEDS)?).map_err(map_type(MAP_SEEDS))?;
        let trees =
            Array::try_from(take_map(&mut ebpf, MAP_TREES)?).map_err(map_type(MAP_TREES))?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, MAP_COUNTERS)?)
            .map_err(map_type(MAP_COUNTERS))?;
        let mut free_slots = Queue::try_from(take_map(&mut ebpf, MAP_FREE_SLOTS)?)
            .map_err(map_type(MAP_FREE_SLOTS))?;
        for slot in 0..MAX_TREES {
            free_slots.push(slot, 0).map_err(map_type(MAP_FREE_SLOTS))?;
        }
        let events =
            RingBuf::try_from(take_map(&mut ebpf, MAP_EVENTS)?).map_err(map_type(MAP_EVENTS))?;
        Ok(EbpfTracker {
            ebpf,
            tasks,
            mms,
            seeds,
            trees,
            counters,
            active: StdHashMap::new(),
            roots: StdHashMap::new(),
            free_slots,
            cooling: VecDeque::new(),
            events,
            task_rules,
            task_info: StdHashMap::new(),
            kernel,
        })
    }

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
        let counters_at_start = self.counter_totals();
        let missed_at_start = self.missed_events();
        let seeded: Vec<u32> = seeds.iter().map(|(tgid, _)| *tgid).collect();
        for (index, &(slot, _)) in trees.iter().enumerate() {
            let active = ActiveTree {
                counters_at_start,
                missed_at_start,
                // The root tree owns the seeds' clean-up.
                seeded: if index == 0 {
                    seeded.clone()
                } else {
                    Vec::new()
                },
                late_tasks: 0,
                nested_processes: 0,
            };
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

    /// Reads a task's label and command line from `/proc` now (its exec has just happened).
    fn task_info_now(
        &self,
        pid: u32,
        exec_filename: Option<String>,
        start: SystemTime,
        started_before_tracking: bool,
    ) -> TaskInfo {
        let command = proc::cmdline(pid);
        let environment = std::fs::read(format!("/proc/{pid}/environ"))
            .map(|raw| parse_environment(&raw))
            .unwrap_or_default();
        let marker = self
            .task_rules
            .as_ref()
            .map_or(crate::tasks::NX_MARKER, |rules| &rules.marker);
        let label = label_of(&environment, &command, marker).or_else(|| {
            exec_filename
                .filter(|name| !name.is_empty())
                .map(|name| (name, LabelSource::ExecFilename))
        });
        TaskInfo {
            pid,
            label,
            command,
            start,
            started_before_tracking,
        }
    }

    /// Waits up to `timeout` for task starts and ends (see [`EbpfTracker::track_runner`]).
    pub fn wait_task_events(&mut self, timeout: Duration) -> Vec<TaskEvent> {
        let mut events = self.drain_task_events();
        if events.is_empty() {
            let mut poll = libc::pollfd {
                fd: self.events.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe {
                libc::poll(
                    &mut poll,
                    1,
                    timeout.as_millis().min(i32::MAX as u128) as i32,
                )
            };
            events = self.drain_task_events();
        }
        for event in &events {
            if event.kind == tracer_common::EVENT_TASK_STARTED {
                let counters_at_start = self.counter_totals();
                let missed_at_start = self.missed_events();
                let active = ActiveTree {
                    counters_at_start,
                    missed_at_start,
                    seeded: Vec::new(),
                    late_tasks: 0,
                    nested_processes: 0,
                };
                self.active.entry(event.slot).or_insert(active);
            }
        }
        events
    }

    fn drain_task_events(&mut self) -> Vec<TaskEvent> {
        let mut events = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() >= std::mem::size_of::<TaskEvent>() {
                // SAFETY: the kernel side writes whole `TaskEvent`s; read unaligned from the ring.
                events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<TaskEvent>()) });
            }
        }
        events
    }

    /// How a tree's root process ended, as far as the kernel side saw: `(exit code, signal)`.
    pub fn root_exit(&self, id: TreeId) -> (Option<i32>, Option<i32>) {
        let Ok(tree) = self.trees.get(&id.0, 0) else {
            return (None, None);
        };
        if tree.exit_flags & EXIT_CODE_KNOWN != 0 {
            (Some(tree.exit_code), None)
        } else if tree.exit_flags & EXIT_SIGNAL_KNOWN != 0 {
            (None, Some(tree.signal))
        } else {
            (None, None)
        }
    }

    /// Ends a task's tree once its last task exited: waits (up to 100 ms) for the teardown of its
    /// address spaces to reach the kernel side, then reports it like [`EbpfTracker::stop_tracking`].
    pub fn finish_task(&mut self, id: TreeId) -> Result<TreeSample, TrackError> {
        let deadline = Instant::now() + Duration::from_millis(100);
        while Instant::now() < deadline && self.trees.get(&id.0, 0).is_ok_and(|tree| tree.rss > 0) {
            std::thread::sleep(Duration::from_millis(1));
        }
        if !self.active.contains_key(&id.0) {
            // Started and ended before its start event was read, or never announced.
            self.active.insert(
                id.0,
                ActiveTree {
                    counters_at_start: self.counter_totals(),
                    missed_at_start: self.missed_events(),
                    seeded: Vec::new(),
                    late_tasks: 0,
                    nested_processes: 0,
                },
            );
        }
        self.stop_tracking(id)
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
        for counter in Counter::ALL.into_iter().filter(|c| c.makes_inexact()) {
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

    /// Events the kernel did not deliver to our programs: a tracepoint program is skipped when a BPF
    /// program already runs on that CPU, and counted in `bpf_prog_info.recursion_misses` (>= 5.12).
    fn missed_events(&self) -> u64 {
        self.program_stats().iter().map(|stats| stats.missed).sum()
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
        let leftover_tasks: Vec<u32> = self
            .tasks
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, task)| task.tree == slot)
            .map(|(tid, _)| tid)
            .collect();
        for tid in &leftover_tasks {
            // A task may exit (and remove itself) between the scan and here.
            let _ = self.tasks.remove(tid);
        }
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
        let leftover_mms: Vec<u32> = self
            .mms
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, mm)| mm.tree == slot)
            .map(|(mm_id, _)| mm_id)
            .collect();
        for mm_id in &leftover_mms {
            let _ = self.mms.remove(mm_id);
        }
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

    /// Detaches the programs in a background process, so the caller can exit at once.
    ///
    /// Closing a tracepoint's last perf event waits for RCU grace periods in the kernel
    /// (`tracepoint_synchronize_unregister`): about 80 ms per program here, 300+ ms in all, which would
    /// otherwise sit between the command's end and tracer's exit. A forked child inherits the
    /// descriptors, waits until this process has exited (EOF on a pipe), then closes them; it holds no
    /// stdio, so a caller reading tracer's output is not kept waiting. Call it last, just before exit,
    /// from a single-threaded process.
    pub fn detach_in_background(self) {
        let Ok((parent_alive, parent_gone)) = nix::unistd::pipe() else {
            return drop(self);
        };
        // SAFETY: the process is single-threaded (documented requirement); the child only closes fds,
        // reads a pipe, and exits.
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Child) => {
                drop(parent_gone);
                if let Ok(null) = std::fs::File::options()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
                {
                    for fd in 0..=2 {
                        unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd) };
                    }
                }
                let mut byte = [0u8; 1];
                let _ = nix::unistd::read(&parent_alive, &mut byte);
                drop(self);
                unsafe { libc::_exit(0) };
            }
            Ok(nix::unistd::ForkResult::Parent { .. }) => {
                drop(parent_alive);
                // Our copies close when we exit; the child's are then the last ones.
                std::mem::forget(parent_gone);
                std::mem::forget(self);
            }
            Err(_) => drop(self),
        }
    }

    /// Per program: runs and total run time so far (counted by the kernel only while
    /// `sysctl kernel.bpf_stats_enabled=1`, otherwise zeros) and skipped runs (always counted). Used by the benchmarks to tell this
    /// program's share of the per-event cost from the tracepoint's own.
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        PROGRAMS
            .iter()
            .filter_map(|&(name, _, _)| {
                let info = program_info(self.ebpf.program(name)?.fd().ok()?.as_fd())?;
                Some(ProgramStats {
                    name,
                    runs: info.run_cnt,
                    run_time: std::time::Duration::from_nanos(info.run_time_ns),
                    missed: info.recursion_misses,
                })
            })
            .collect()
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

/// Globals of the task programs, in the order `task_offsets` returns their values.
const TASK_GLOBALS: [&str; 6] = [
    format::GLOBAL_EXEC_FILENAME,
    format::GLOBAL_EXECVE_ENVP,
    format::GLOBAL_EXECVEAT_ENVP,
    format::GLOBAL_EXIT_GROUP_CODE,
    format::GLOBAL_SIGNAL_SIG,
    format::GLOBAL_SIGNAL_HANDLER,
];

/// Field offsets the task programs read, from the format files.
fn task_offsets(tracefs: &std::path::Path, exec: &tracefs::Format) -> Result<[u32; 6], LoadError> {
    let execve = tracefs::format(tracefs, "syscalls", "sys_enter_execve")?;
    let execveat = tracefs::format(tracefs, "syscalls", "sys_enter_execveat")?;
    let exit_group = tracefs::format(tracefs, "syscalls", "sys_enter_exit_group")?;
    let signal = tracefs::format(tracefs, "signal", "signal_deliver")?;
    Ok([
        exec.offset("filename", 4)?,
        execve.offset("envp", 8)?,
        execveat.offset("envp", 8)?,
        exit_group.offset("error_code", 8)?,
        signal.offset("sig", 4)?,
        signal.offset("sa_handler", 8)?,
    ]
    .map(|offset| offset as u32))
}

/// `NAME=` as the exec program compares it: little-endian words, zero-padded, and their byte mask.
type Marker = ([u64; MARKER_WORDS], [u64; MARKER_WORDS], u32);

fn marker_words(name: &str) -> Result<Marker, LoadError> {
    let marker = format!("{name}=");
    if name.is_empty() || name.contains('=') || name.contains('\0') || marker.len() > MARKER_BYTES {
        return Err(LoadError::BadTaskMarker(name.to_string()));
    }
    let (mut words, mut masks) = ([0u64; MARKER_WORDS], [0u64; MARKER_WORDS]);
    for (index, byte) in marker.bytes().enumerate() {
        words[index / 8] |= u64::from(byte) << (8 * (index % 8));
        masks[index / 8] |= 0xff << (8 * (index % 8));
    }
    Ok((words, masks, marker.len() as u32))
}

/// The wall-clock time of a `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) timestamp.
fn wall_time_of(monotonic_ns: u64) -> SystemTime {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|now| now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
        .unwrap_or(monotonic_ns);
    SystemTime::now() - Duration::from_nanos(now.saturating_sub(monotonic_ns))
}

/// `BPF_OBJ_GET_INFO_BY_FD` for a program (aya 0.14 does not expose `recursion_misses`).
fn program_info(fd: std::os::fd::BorrowedFd<'_>) -> Option<aya_obj::generated::bpf_prog_info> {
    use std::os::fd::AsRawFd as _;
    // The `info` member of `union bpf_attr`; the kernel accepts a shorter attr.
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // SAFETY: plain integers; all-zero is a valid value.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: (&raw mut info) as u64,
    };
    // SAFETY: attr points at a valid buffer of `info_len` bytes for the kernel to fill.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            aya_obj::generated::bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_int,
            &raw mut attr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    (ret == 0).then_some(info)
}

/// An `EbpfLoader` that does not relocate against kernel BTF: the object has no CO-RE relocations.
///
/// aya 0.14's `EbpfLoader::new()` always reads and parses `/sys/kernel/btf/vmlinux` (5 MB here),
/// which costs about 25 ms and 10 MB of tracer's RSS before `.btf(None)` can discard it. So the loader
/// is created in a helper thread that has its own filesystem context (`unshare(CLONE_FS)`) chrooted
/// into an empty directory, where that read fails at once; nothing else runs there, and the rest of
/// the process never sees the chroot. Without CAP_SYS_CHROOT it falls back to the plain constructor.
fn loader_without_kernel_btf() -> EbpfLoader<'static> {
    let empty = nix::unistd::mkdtemp(&std::env::temp_dir().join("tracer-loader-XXXXXX")).ok();
    let blind = empty.as_ref().and_then(|empty| {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)
                        .and_then(|()| nix::unistd::chroot(empty))
                        .and_then(|()| nix::unistd::chdir("/"))
                        .ok()
                        .map(|()| EbpfLoader::new())
                })
                .join()
                .ok()
                .flatten()
        })
    });
    if let Some(empty) = empty {
        let _ = std::fs::remove_dir(empty);
    }
    // Fallback: the default loader, which parses kernel BTF.
    let mut loader = blind.unwrap_or_default();
    loader.btf(None);
    loader
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

fn attach(ebpf: &mut Ebpf, program: &str, category: &str, name: &str) -> Result<(), LoadError> {
    let error = |source| LoadError::Program {
        program: program.to_string(),
        source,
    };
    let tracepoint: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| LoadError::Program {
            program: program.to_string(),
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(error)?;
    tracepoint.load().map_err(error)?;
    tracepoint.attach(category, name).map_err(error)?;
    Ok(())
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, LoadError> {
    ebpf.take_map(name).ok_or(LoadError::MissingMap(name))
}

fn map_type(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> LoadError {
    move |source| LoadError::MapType { name, source }
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
        let mut finished = Vec::new();
        for event in self.wait_task_events(timeout) {
            let start = wall_time_of(event.time_ns);
            if event.kind == tracer_common::EVENT_TASK_STARTED {
                let filename = String::from_utf8_lossy(&event.filename)
                    .trim_end_matches('\0')
                    .to_string();
                let info = self.task_info_now(event.pid, Some(filename), start, false);
                self.task_info.insert(event.slot, info);
                continue;
            }
            let id = TreeId(event.slot);
            let exit = self.root_exit(id);
            let info = self.task_info.remove(&event.slot).unwrap_or_else(|| {
                // Ended before its start was read, or its exec never succeeded.
                let label = (format!("pid {}", event.pid), LabelSource::ExecFilename);
                TaskInfo {
                    pid: event.pid,
                    label: Some(label),
                    command: Vec::new(),
                    start,
                    started_before_tracking: false,
                }
            });
            let sample = self.finish_task(id).unwrap_or_else(|err| TreeSample {
                exact: false,
                inexact_reasons: vec![format!("reading the kernel maps failed: {err}")],
                ..TreeSample::default()
            });
            let duration = wall_time_of(event.time_ns)
                .duration_since(info.start)
                .unwrap_or_default();
            let label = info
                .label
                .unwrap_or((format!("pid {}", info.pid), LabelSource::ExecFilename));
            finished.push(TaskReport::new(
                info.pid,
                label,
                info.command,
                info.start,
                duration,
                exit,
                sample,
                info.started_before_tracking,
            ));
        }
        finished
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
