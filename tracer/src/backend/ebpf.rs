//! The eBPF backend: loads tracer's kernel programs and keeps per-tree peaks in their maps.

use super::{Backend, BackendKind, ProgramStats};
use crate::{
    error::{LoadError, TrackError},
    kernel::{self, Kernel},
    proc,
    report::{PeakBreakdown, TreeSample},
    tracefs,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::TracePoint,
};
use std::{collections::HashMap as StdHashMap, os::fd::AsFd as _};
use tracer_common::{
    Counter, MAP_COUNTERS, MAP_MMS, MAP_SEEDS, MAP_TASKS, MAP_TREES, MAX_TREES, MM_ANONPAGES,
    MM_FILEPAGES, MM_SHMEMPAGES, MM_SWAPENTS, MmState, NR_COUNTERS, NR_MEMBERS, Seed,
    TASK_PENDING_EXEC, TaskState, TreeState, format,
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
    next_slots: Vec<u32>,
    kernel: Kernel,
}

impl EbpfTracker {
    /// Checks privileges and tracepoint layouts, then loads and attaches the programs.
    pub fn load() -> Result<EbpfTracker, LoadError> {
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

        let mut loader = loader_without_kernel_btf();
        for (name, offset) in &offsets {
            loader.override_global(name, offset, true);
        }
        let mut ebpf = loader.load(BPF_OBJECT).map_err(LoadError::Object)?;
        for (program, category, name) in PROGRAMS {
            attach(&mut ebpf, program, category, name)?;
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
        Ok(EbpfTracker {
            ebpf,
            tasks,
            mms,
            seeds,
            trees,
            counters,
            active: StdHashMap::new(),
            roots: StdHashMap::new(),
            next_slots: (0..MAX_TREES).rev().collect(),
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
        let tree = TreeState {
            live_tasks: 1,
            ..TreeState::default()
        };
        self.open_tree(tree, Vec::new(), &[(pid, TASK_PENDING_EXEC)])
    }

    /// Starts a tree at the running process `pid`, with its threads and every descendant alive now.
    /// Their current RSS (from `/proc`) is the tree's starting point: what they used before is
    /// unknown. A process forked during this very call may be missed.
    pub fn track_running(&mut self, pid: u32) -> Result<TreeId, TrackError> {
        if proc::parent_of(pid).is_none() {
            return Err(TrackError::NoSuchProcess(pid));
        }
        let mut tree = TreeState::default();
        let mut seeds = Vec::new();
        let mut tasks = Vec::new();
        for process in proc::tree_of(pid) {
            // rss_stat member order: file, anon, swap, shmem.
            let Some(values) =
                proc::status_bytes(process, &["RssFile", "RssAnon", "VmSwap", "RssShmem"])
            else {
                continue; // exited meanwhile, or a kernel thread
            };
            let mut seed = Seed::default();
            for (member, value) in values.into_iter().enumerate().take(NR_MEMBERS) {
                seed.members[member] = value as i64;
                tree.members[member] += value as i64;
            }
            tree.rss += seed.rss();
            seeds.push((process, seed));
            let threads = proc::threads_of(process);
            tree.live_tasks += threads.len() as i64;
            tasks.extend(threads.into_iter().map(|tid| (tid, 0)));
        }
        tree.peak = tree.rss;
        tree.peak_members = tree.members;
        tree.swap_peak = tree.members[MM_SWAPENTS];
        let id = self.open_tree(tree, seeds, &tasks)?;
        self.register_late_descendants(id, pid);
        Ok(id)
    }

    /// Processes forked by a not-yet-registered parent while the tree was being registered are in no
    /// map: walk the tree again until no such process is found. Those found now are registered
    /// without a seed (the kernel side updates the tree's totals concurrently from here on): each of
    /// their RSS members counts from its first change on.
    fn register_late_descendants(&mut self, id: TreeId, root: u32) {
        for _ in 0..4 {
            let late: Vec<u32> = proc::tree_of(root)
                .into_iter()
                .flat_map(proc::threads_of)
                .filter(|tid| self.tasks.get(tid, 0).is_err())
                .collect();
            if late.is_empty() {
                return;
            }
            for tid in late {
                let task = TaskState {
                    tree: id.0,
                    flags: 0,
                };
                if self.tasks.insert(tid, task, 0).is_ok()
                    && let Some(active) = self.active.get_mut(&id.0)
                {
                    active.late_tasks += 1;
                }
            }
        }
    }

    /// Registers a tree: its totals, then the seeds, then the tasks (an mm can only bind once its
    /// task is registered, and must find its seed then).
    fn open_tree(
        &mut self,
        tree: TreeState,
        seeds: Vec<(u32, Seed)>,
        tasks: &[(u32, u32)],
    ) -> Result<TreeId, TrackError> {
        let slot = self
            .next_slots
            .pop()
            .ok_or(TrackError::TooManyTrees(MAX_TREES))?;
        let mut registered = self
            .trees
            .set(slot, tree, 0)
            .map_err(map_err(MAP_TREES, "reset"));
        for (tgid, seed) in &seeds {
            if registered.is_ok() {
                registered = self
                    .seeds
                    .insert(tgid, seed, 0)
                    .map_err(map_err(MAP_SEEDS, "insert"));
            }
        }
        for &(tid, flags) in tasks {
            if registered.is_ok() {
                let task = TaskState { tree: slot, flags };
                registered = self
                    .tasks
                    .insert(tid, task, 0)
                    .map_err(map_err(MAP_TASKS, "insert"));
            }
        }
        let active = ActiveTree {
            counters_at_start: self.counter_totals(),
            missed_at_start: self.missed_events(),
            seeded: seeds.into_iter().map(|(tgid, _)| tgid).collect(),
            late_tasks: 0,
        };
        self.active.insert(slot, active);
        if let Err(err) = registered {
            let _ = self.stop_tracking(TreeId(slot));
            return Err(err);
        }
        Ok(TreeId(slot))
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
        sample.still_running = leftover_tasks.len() as u64;
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
        if sample.address_spaces == 0 {
            // Every process has an address space: seeing none means nothing was measured.
            sample
                .inexact_reasons
                .push("no_events: no address space of the tree was seen".into());
            sample.exact = false;
        }
        if leftover_tasks.is_empty() && sample.rss_bytes != 0 {
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
        self.trees
            .set(slot, TreeState::default(), 0)
            .map_err(map_err(MAP_TREES, "reset"))?;
        self.active.remove(&slot);
        self.next_slots.push(slot);
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
