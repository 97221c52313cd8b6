//! Tasks of a runner on the kernel side's terms: task starts and ends from the ring buffer, their
//! labels read from `/proc` as they start, their reports as they end.

use super::{EbpfTracker, TreeId, proc};
use crate::{
    error::TrackError,
    report::TreeSample,
    tasks::{LabelSource, TaskReport, label_of, parse_environment},
};
use std::{
    os::fd::AsRawFd as _,
    time::{Duration, Instant, SystemTime},
};
use tracer_common::{EXIT_CODE_KNOWN, EXIT_SIGNAL_KNOWN, TaskEvent};

/// What userspace knows of a started task until it ends.
pub(super) struct TaskInfo {
    pub(super) pid: u32,
    label: Option<(String, LabelSource)>,
    command: Vec<String>,
    start: SystemTime,
    started_before_tracking: bool,
}

/// The wall-clock time of a `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) timestamp.
fn wall_time_of(monotonic_ns: u64) -> SystemTime {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|now| now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
        .unwrap_or(monotonic_ns);
    SystemTime::now() - Duration::from_nanos(now.saturating_sub(monotonic_ns))
}

impl EbpfTracker {
    /// Reads a task's label and command line from `/proc` now (its exec has just happened).
    pub(super) fn task_info_now(
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
                let active = self.new_active();
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
            let active = self.new_active();
            self.active.insert(id.0, active);
        }
        self.stop_tracking(id)
    }

    /// Task ends since the last call (waiting up to `timeout` for events), as reports.
    pub(super) fn collect_finished_tasks(&mut self, timeout: Duration) -> Vec<TaskReport> {
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
}
