//! The polling backend: every interval, find the tree's processes by parent pid and add up their RSS.
//!
//! Portable (Linux, macOS, Windows) through `sysinfo`, and needs no privileges. It cannot see what
//! happens between samples: a spike shorter than the interval is missed, so its results are never
//! `exact`. The OS's per-process high-water mark, read at every sample, gives a lower bound that
//! does catch such spikes for a single process (see `hwm`).
//!
//! Cost per sample. Finding the tree's processes by parent pid through sysinfo means listing every
//! process of the host (its cheapest refresh still reads each one's `/proc/PID/stat`): measured here
//! with 79 processes, 3.7 ms of CPU per sample, 42% of a CPU at a 10 ms interval. On Linux the
//! kernel's per-task child lists (`/proc/PID/task/TID/children`) give the same answer reading only
//! the tree's own processes, so that path is used there; sysinfo's full listing elsewhere. The
//! memory refresh covers only the tree's processes in both cases.

use super::{Backend, BackendKind, hwm};
use crate::{
    error::TrackError,
    report::TreeSample,
    tasks::{LabelSource, TaskReport, TaskRules, label_of, parse_environment},
};
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// The default sampling interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);

/// Samples tracked trees on a background thread.
pub struct PollTracker {
    shared: Arc<Shared>,
    sampler: Option<JoinHandle<()>>,
    interval: Duration,
    task_rules: TaskRules,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

struct State {
    system: System,
    trees: HashMap<u32, PolledTree>,
    stopping: bool,
}

#[derive(Default)]
struct PolledTree {
    /// Live members: pid → start time (a pid reused by an unrelated process has another start time).
    members: HashMap<u32, u64>,
    /// Every process ever seen in the tree.
    seen: HashSet<(u32, u64)>,
    rss: u64,
    peak: u64,
    samples: u64,
    largest_process_peak: Option<u64>,
    /// For a runner: its tasks, found by the same rules as the eBPF backend's (direct children,
    /// topmost processes carrying the marker), sampled apart.
    runner: Option<Runner>,
}

struct Runner {
    root: u32,
    marker: String,
    /// Live tasks by root pid.
    tasks: HashMap<u32, PolledTask>,
    /// Per member (pid, start time): is it a task's root?
    is_task_root: HashMap<(u32, u64), bool>,
    /// Ended tasks not yet collected by `finished_tasks`.
    finished: Vec<TaskReport>,
}

struct PolledTask {
    start: u64,
    started: SystemTime,
    label: (String, LabelSource),
    command: Vec<String>,
    peak: u64,
    largest_process_peak: Option<u64>,
    samples: u64,
}

impl PollTracker {
    /// Starts the sampler thread.
    pub fn new(
        interval: Duration,
        task_rules: Option<TaskRules>,
    ) -> Result<PollTracker, TrackError> {
        let system = System::new().map_err(|err| TrackError::Poll(err.to_string()))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                system,
                trees: HashMap::new(),
                stopping: false,
            }),
            wake: Condvar::new(),
        });
        let sampler_shared = Arc::clone(&shared);
        let sampler = std::thread::Builder::new()
            .name("tracer-poll".into())
            .spawn(move || sample_loop(&sampler_shared, interval))
            .map_err(|err| TrackError::Poll(format!("starting the sampler thread: {err}")))?;
        Ok(PollTracker {
            shared,
            sampler: Some(sampler),
            interval,
            task_rules: task_rules.unwrap_or_default(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic in the sampler leaves plain numbers behind: keep using them.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn sample(&self, tree: &PolledTree) -> TreeSample {
        TreeSample {
            rss_bytes: tree.rss as i64,
            // Never below what a single process is known to have reached.
            peak_rss_bytes: tree.peak.max(tree.largest_process_peak.unwrap_or(0)),
            processes: tree.seen.len() as u64,
            still_running: tree.members.len() as u64,
            largest_process_peak_bytes: tree.largest_process_peak,
            samples: Some(tree.samples),
            interval: Some(self.interval),
            exact: false,
            inexact_reasons: vec![format!(
                "polling every {} ms: spikes between samples are missed",
                self.interval.as_millis()
            )],
            ..TreeSample::default()
        }
    }
}

impl Backend for PollTracker {
    fn kind(&self) -> BackendKind {
        BackendKind::Poll
    }

    fn start_runner(&mut self, pid: u32, before_exec: bool) -> Result<bool, TrackError> {
        if before_exec {
            // Sampling a held child would measure tracer's own copy: start after its exec.
            return Ok(false);
        }
        self.start(pid)?;
        let mut state = self.state();
        if let Some(tree) = state.trees.get_mut(&pid) {
            tree.runner = Some(Runner {
                root: pid,
                marker: self.task_rules.marker.clone(),
                tasks: HashMap::new(),
                is_task_root: HashMap::new(),
                finished: Vec::new(),
            });
        }
        sample_trees(&mut state);
        Ok(true)
    }

    fn finished_tasks(&mut self, timeout: Duration) -> Vec<TaskReport> {
        let deadline = Instant::now() + timeout;
        loop {
            let finished: Vec<TaskReport> = self
                .state()
                .trees
                .values_mut()
                .filter_map(|tree| tree.runner.as_mut())
                .flat_map(|runner| runner.finished.drain(..))
                .collect();
            let now = Instant::now();
            if !finished.is_empty() || now >= deadline {
                return finished;
            }
            std::thread::sleep(self.interval.min(deadline - now));
        }
    }

    fn start(&mut self, pid: u32) -> Result<(), TrackError> {
        let mut state = self.state();
        let start_time =
            start_time(&mut state.system, pid).ok_or(TrackError::NoSuchProcess(pid))?;
        let mut tree = PolledTree::default();
        tree.members.insert(pid, start_time);
        state.trees.insert(pid, tree);
        // A first sample now, so that even a command shorter than the interval is measured once.
        sample_trees(&mut state);
        Ok(())
    }

    fn peek(&self, pid: u32) -> Option<TreeSample> {
        let state = self.state();
        state.trees.get(&pid).map(|tree| self.sample(tree))
    }

    fn stop(&mut self, pid: u32) -> Option<TreeSample> {
        let mut state = self.state();
        if state.trees.get(&pid)?.members.is_empty() {
            return state.trees.remove(&pid).map(|tree| self.sample(&tree));
        }
        sample_trees(&mut state);
        state.trees.remove(&pid).map(|tree| self.sample(&tree))
    }
}

impl Drop for PollTracker {
    fn drop(&mut self) {
        self.state().stopping = true;
        self.shared.wake.notify_all();
        if let Some(sampler) = self.sampler.take() {
            let _ = sampler.join();
        }
    }
}

fn sample_loop(shared: &Shared, interval: Duration) {
    let mut state = shared
        .state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut next = Instant::now() + interval;
    while !state.stopping {
        let now = Instant::now();
        if now >= next {
            sample_trees(&mut state);
            // Keep the cadence without bursts after a stall.
            next = (next + interval).max(now);
            continue;
        }
        state = shared
            .wake
            .wait_timeout(state, next - now)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .0;
    }
}

/// One sample of every tree: membership by parent pid, then RSS of the members only.
fn sample_trees(state: &mut State) {
    if state.trees.is_empty() {
        return;
    }
    let State { system, trees, .. } = state;
    for tree in trees.values_mut() {
        update_members(system, tree);
    }
    let pids: Vec<Pid> = trees
        .values()
        .flat_map(|tree| tree.members.keys().map(|&pid| Pid::from_u32(pid)))
        .collect();
    system.refresh_processes_specifics(
        ProcessesToUpdate::Some(&pids),
        false,
        ProcessRefreshKind::nothing().with_memory(),
    );
    for tree in trees.values_mut() {
        let mut rss = 0;
        for (&pid, &start) in &tree.members {
            tree.seen.insert((pid, start));
            rss += system
                .process(Pid::from_u32(pid))
                .map_or(0, |process| process.memory());
            if let Some(peak) = hwm::process_peak(pid) {
                tree.largest_process_peak = Some(tree.largest_process_peak.unwrap_or(0).max(peak));
            }
        }
        tree.rss = rss;
        tree.peak = tree.peak.max(rss);
        tree.samples += 1;
        sample_tasks(system, tree);
    }
}

/// Splits a runner's members into tasks and samples each apart; tasks whose processes are all gone
/// are finished.
fn sample_tasks(system: &System, tree: &mut PolledTree) {
    let PolledTree {
        members,
        runner: Some(runner),
        ..
    } = tree
    else {
        return;
    };
    let mut task_rss: HashMap<u32, (u64, Option<u64>)> = HashMap::new();
    for &pid in members.keys() {
        // The nearest task root among the process and its ancestors in the tree.
        let mut current = pid;
        let task = loop {
            if current == runner.root {
                break None;
            }
            let Some(&current_start) = members.get(&current) else {
                break None;
            };
            let root = *runner
                .is_task_root
                .entry((current, current_start))
                .or_insert_with(|| starts_task(system, current, runner.root, &runner.marker));
            if root {
                break Some(current);
            }
            match parent_of(system, current) {
                Some(parent) => current = parent,
                None => break None,
            }
        };
        let Some(task) = task else {
            continue;
        };
        if !runner.tasks.contains_key(&task) {
            let command = super::command_line(task);
            let label = label_of(&environment_of(task), &command, &runner.marker)
                .unwrap_or((format!("pid {task}"), LabelSource::ExecFilename));
            let start = members.get(&task).copied().unwrap_or_default();
            let polled = PolledTask {
                start,
                started: SystemTime::now(),
                label,
                command,
                peak: 0,
                largest_process_peak: None,
                samples: 0,
            };
            runner.tasks.insert(task, polled);
        }
        let entry = task_rss.entry(task).or_default();
        entry.0 += system
            .process(Pid::from_u32(pid))
            .map_or(0, |process| process.memory());
        if let Some(peak) = hwm::process_peak(pid) {
            entry.1 = Some(entry.1.unwrap_or(0).max(peak));
        }
    }
    let mut ended = Vec::new();
    for (&root, task) in runner.tasks.iter_mut() {
        match task_rss.get(&root) {
            Some(&(rss, largest)) => {
                task.peak = task.peak.max(rss);
                task.largest_process_peak = largest.max(task.largest_process_peak);
                task.samples += 1;
            }
            None if members.get(&root) != Some(&task.start) => ended.push(root),
            None => {}
        }
    }
    for root in ended {
        if let Some(task) = runner.tasks.remove(&root) {
            runner.finished.push(task_report(root, task));
        }
    }
}

fn task_report(root: u32, task: PolledTask) -> TaskReport {
    let sample = TreeSample {
        peak_rss_bytes: task.peak.max(task.largest_process_peak.unwrap_or(0)),
        largest_process_peak_bytes: task.largest_process_peak,
        samples: Some(task.samples),
        exact: false,
        inexact_reasons: vec!["polling: spikes between samples are missed".into()],
        ..TreeSample::default()
    };
    let duration = task.started.elapsed().unwrap_or_default();
    let exit = (None, None); // only the task's parent learns it
    TaskReport::new(
        root,
        task.label,
        task.command,
        task.started,
        duration,
        exit,
        sample,
        false,
    )
}

/// A direct child of the runner, or the topmost process carrying the marker.
fn starts_task(system: &System, pid: u32, runner: u32, marker: &str) -> bool {
    let parent = parent_of(system, pid);
    if parent == Some(runner) {
        return true;
    }
    let has_marker = |pid: u32| environment_of(pid).iter().any(|(key, _)| key == marker);
    has_marker(pid) && !parent.is_some_and(has_marker)
}

fn parent_of(system: &System, pid: u32) -> Option<u32> {
    #[cfg(target_os = "linux")]
    {
        let _ = system;
        crate::proc::parent_of(pid)
    }
    #[cfg(not(target_os = "linux"))]
    {
        system
            .process(Pid::from_u32(pid))?
            .parent()
            .map(|parent| parent.as_u32())
    }
}

/// A process's environment where the OS lets us read it (`/proc/PID/environ`); elsewhere tasks are
/// only the runner's direct children.
fn environment_of(pid: u32) -> Vec<(String, String)> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|raw| parse_environment(&raw))
        .unwrap_or_default()
}

/// When `pid` started, in the unit `update_members` compares (tells a pid's reuse apart).
fn start_time(system: &mut System, pid: u32) -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let _ = system;
        crate::proc::start_time(pid)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let sysinfo_pid = Pid::from_u32(pid);
        system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[sysinfo_pid]),
            true,
            ProcessRefreshKind::nothing(),
        );
        system
            .process(sysinfo_pid)
            .map(|process| process.start_time())
    }
}

/// Linux: follow the kernel's child lists from the tree's known members; fall back to sysinfo's full
/// listing when the kernel lacks them.
#[cfg(target_os = "linux")]
fn update_members(system: &mut System, tree: &mut PolledTree) {
    use crate::proc;
    tree.members
        .retain(|&pid, &mut start| proc::start_time(pid) == Some(start));
    let mut queue: Vec<u32> = tree.members.keys().copied().collect();
    while let Some(pid) = queue.pop() {
        let Some(children) = proc::children_of(pid) else {
            return update_members_by_listing(system, tree);
        };
        for child in children {
            if let Some(start) = proc::start_time(child)
                && tree.members.insert(child, start).is_none()
            {
                queue.push(child);
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn update_members(system: &mut System, tree: &mut PolledTree) {
    update_members_by_listing(system, tree);
}

/// Lists every process with its parent (sysinfo), then walks down from the tree's known members.
/// Members stay members while alive, even once reparented (orphans of the tree). Start times are
/// sysinfo's here, which is what the other platforms store too.
fn update_members_by_listing(system: &mut System, tree: &mut PolledTree) {
    system.refresh_processes_specifics(ProcessesToUpdate::All, true, ProcessRefreshKind::nothing());
    let mut children: HashMap<Pid, Vec<Pid>> = HashMap::new();
    for (pid, process) in system.processes() {
        if let Some(parent) = process.parent() {
            children.entry(parent).or_default().push(*pid);
        }
    }
    let start_of = |pid: u32| start_time_listed(system, pid);
    tree.members
        .retain(|&pid, &mut start| start_of(pid) == Some(start));
    let mut queue: Vec<Pid> = tree.members.keys().map(|&pid| Pid::from_u32(pid)).collect();
    while let Some(pid) = queue.pop() {
        for &child in children.get(&pid).into_iter().flatten() {
            if let Some(start) = start_time_listed(system, child.as_u32())
                && tree.members.insert(child.as_u32(), start).is_none()
            {
                queue.push(child);
            }
        }
    }
}

/// A listed process's start time, in the same unit as [`start_time`].
fn start_time_listed(system: &System, pid: u32) -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let _ = system;
        crate::proc::start_time(pid)
    }
    #[cfg(not(target_os = "linux"))]
    {
        system
            .process(Pid::from_u32(pid))
            .map(|process| process.start_time())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Both ways of finding a tree's processes (Linux child lists, and the full listing the other
    /// platforms use) find the same descendants, grandchildren included.
    #[test]
    fn members_are_found_by_parent_pid() {
        let mut child = Command::new("sh")
            .args(["-c", "sleep 2 & (sleep 2; true) & wait"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let root = child.id();
        let mut system = System::new().unwrap();
        let mut found = Vec::new();
        for listing in [false, true] {
            let mut tree = PolledTree::default();
            tree.members
                .insert(root, start_time(&mut system, root).unwrap());
            if listing {
                update_members_by_listing(&mut system, &mut tree);
            } else {
                update_members(&mut system, &mut tree);
            }
            let mut members: Vec<u32> = tree.members.keys().copied().collect();
            members.sort_unstable();
            found.push(members);
        }
        let _ = child.kill();
        let _ = child.wait();
        // sh, sleep, the subshell and its sleep.
        assert_eq!(found[0].len(), 4, "{found:?}");
        assert_eq!(found[0], found[1]);
    }
}
