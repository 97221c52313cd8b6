//! The polling backend: every interval, find the tree's processes by parent pid and add up their RSS.
//!
//! Portable (Linux, macOS, Windows) through `sysinfo`, and needs no privileges. It cannot see what
//! happens between samples: a spike shorter than the interval is missed, so its results are never
//! `exact`. The OS's per-process high-water mark, read at every sample, gives a lower bound that
//! does catch such spikes for a single process (see `hwm`).
//!
//! Cost per sample: one listing of all processes (pid and parent only, the cheapest refresh sysinfo
//! offers; it has no per-process child list) and a memory refresh of the tree's processes only.

use super::{Backend, BackendKind, hwm};
use crate::{error::TrackError, report::TreeSample};
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::{Duration, Instant},
};
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// The default sampling interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);

/// Samples tracked trees on a background thread.
pub struct PollTracker {
    shared: Arc<Shared>,
    sampler: Option<JoinHandle<()>>,
    interval: Duration,
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
}

impl PollTracker {
    /// Starts the sampler thread.
    pub fn new(interval: Duration) -> Result<PollTracker, TrackError> {
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

    fn start(&mut self, pid: u32) -> Result<(), TrackError> {
        let mut state = self.state();
        state.system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[Pid::from_u32(pid)]),
            true,
            ProcessRefreshKind::nothing(),
        );
        let start_time = state
            .system
            .process(Pid::from_u32(pid))
            .map(|process| process.start_time())
            .ok_or(TrackError::NoSuchProcess(pid))?;
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
    system.refresh_processes_specifics(ProcessesToUpdate::All, true, ProcessRefreshKind::nothing());
    let mut children: HashMap<Pid, Vec<Pid>> = HashMap::new();
    for (pid, process) in system.processes() {
        if let Some(parent) = process.parent() {
            children.entry(parent).or_default().push(*pid);
        }
    }
    let alive = |pid: u32, start: u64| {
        system
            .process(Pid::from_u32(pid))
            .is_some_and(|process| process.start_time() == start)
    };
    for tree in trees.values_mut() {
        // Members stay members while alive, even once reparented (orphans of the tree).
        tree.members.retain(|&pid, &mut start| alive(pid, start));
        let mut queue: Vec<Pid> = tree.members.keys().map(|&pid| Pid::from_u32(pid)).collect();
        while let Some(pid) = queue.pop() {
            for &child in children.get(&pid).into_iter().flatten() {
                if let Some(process) = system.process(child)
                    && tree
                        .members
                        .insert(child.as_u32(), process.start_time())
                        .is_none()
                {
                    queue.push(child);
                }
            }
        }
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
    }
}
