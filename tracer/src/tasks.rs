//! The tasks of a task runner (Nx, make, a CI script): each one's own peak, reported as it ends.
//!
//! A task is a process the runner starts, with everything it starts in turn. By default every
//! direct child of the runner that execs is one; a process whose environment carries the marker
//! variable (`NX_TASK_TARGET_PROJECT` unless told otherwise) starts one too, even deeper down (the
//! topmost such process: no marker task nests in another). Tasks nest in the runner's tree, whose
//! peak counts everything.

use crate::report::{PeakBreakdown, TreeSample, format_bytes, format_duration, shell_words};
use serde::Serialize;
use std::time::Duration;

/// The marker Nx puts in every task process's environment (checked with Nx 24).
pub const NX_MARKER: &str = "NX_TASK_TARGET_PROJECT";

/// How tasks are recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRules {
    /// The environment variable marking a task's topmost process. With [`NX_MARKER`] (the default),
    /// tasks are labelled `nx run PROJECT:TARGET`; with another, by the variable's value.
    pub marker: String,
}

impl Default for TaskRules {
    fn default() -> Self {
        TaskRules {
            marker: NX_MARKER.to_string(),
        }
    }
}

/// Where a task's label came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelSource {
    /// The marker in its environment (`nx run P:T`, or the marker's value).
    Environment,
    /// Its command line.
    CommandLine,
    /// It was gone before its command line could be read: the file it exec'd.
    ExecFilename,
}

/// One finished task: a JSON line of `--json`, and the line printed when it ends.
#[derive(Debug, Clone, Serialize)]
pub struct TaskReport {
    /// The task's topmost process.
    pub pid: u32,
    /// `nx run myapp:build`, the marker's value, or the command line.
    pub label: String,
    /// Where the label came from.
    pub label_source: LabelSource,
    /// The command line of the task's topmost process (empty if it was gone before it was read).
    pub command: Vec<String>,
    /// When the task started (its exec), in milliseconds since the Unix epoch.
    pub start: u64,
    /// From its exec to the exit of its last process.
    pub duration_ms: u64,
    /// The exit status of its topmost process, when it called `exit_group`.
    pub exit_code: Option<i32>,
    /// The signal that killed its topmost process, if one did.
    pub signal: Option<i32>,
    /// Highest summed RSS of the task's processes.
    pub peak_rss_bytes: u64,
    /// Split of that peak.
    pub peak_breakdown: PeakBreakdown,
    /// False when the numbers may be wrong; see `inexact_reasons`.
    pub exact: bool,
    /// Why the numbers may be wrong.
    pub inexact_reasons: Vec<String>,
}

impl TaskReport {
    /// Builds a task's report from its tree's final sample.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        pid: u32,
        label: (String, LabelSource),
        command: Vec<String>,
        start: std::time::SystemTime,
        duration: Duration,
        exit: (Option<i32>, Option<i32>),
        sample: TreeSample,
        started_before_tracking: bool,
    ) -> TaskReport {
        let mut inexact_reasons = sample.inexact_reasons;
        if started_before_tracking {
            inexact_reasons.push(
                "started_before_attach: its memory use before tracking started is unknown".into(),
            );
        }
        TaskReport {
            pid,
            label: label.0,
            label_source: label.1,
            command,
            start: start
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_millis() as u64),
            duration_ms: duration.as_millis() as u64,
            exit_code: exit.0,
            signal: exit.1,
            peak_rss_bytes: sample.peak_rss_bytes,
            peak_breakdown: sample.peak_breakdown,
            exact: inexact_reasons.is_empty(),
            inexact_reasons,
        }
    }

    /// `✔  nx run a:build (0.8s) (peak: 67MB)`; `✖` when it failed or was killed; `•` when how it
    /// ended is unknown (the polling backend cannot see it).
    pub fn human_line(&self) -> String {
        let mark = match (self.exit_code, self.signal) {
            (Some(0), None) => '✔',
            (None, None) => '•',
            _ => '✖',
        };
        format!(
            "{mark}  {} ({}) (peak: {})",
            self.label,
            format_duration(Duration::from_millis(self.duration_ms)),
            format_bytes(self.peak_rss_bytes)
        )
    }
}

/// A task's label from its environment (the marker) or else its command line.
pub(crate) fn label_of(
    environment: &[(String, String)],
    command: &[String],
    marker: &str,
) -> Option<(String, LabelSource)> {
    let var = |name: &str| {
        environment
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    };
    if marker == NX_MARKER {
        if let (Some(project), Some(target)) = (var(NX_MARKER), var("NX_TASK_TARGET_TARGET")) {
            return Some((
                format!("nx run {project}:{target}"),
                LabelSource::Environment,
            ));
        }
    } else if let Some(value) = var(marker) {
        return Some((value, LabelSource::Environment));
    }
    (!command.is_empty()).then(|| (shell_words(command), LabelSource::CommandLine))
}

/// `KEY=value` strings (NUL-separated, as in `/proc/PID/environ`) as pairs.
pub(crate) fn parse_environment(raw: &[u8]) -> Vec<(String, String)> {
    raw.split(|&byte| byte == 0)
        .filter_map(|entry| {
            let entry = String::from_utf8_lossy(entry);
            let (key, value) = entry.split_once('=')?;
            Some((key.to_string(), value.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nx_tasks_are_labelled_in_nx_terms() {
        let env = parse_environment(
            b"PATH=/bin\0NX_TASK_TARGET_PROJECT=myapp\0NX_TASK_TARGET_TARGET=build\0",
        );
        let command = vec!["node".to_string(), "run.js".to_string()];
        assert_eq!(
            label_of(&env, &command, NX_MARKER),
            Some(("nx run myapp:build".to_string(), LabelSource::Environment))
        );
        let other = parse_environment(b"TURBO_TASK=web#build\0");
        assert_eq!(
            label_of(&other, &command, "TURBO_TASK").unwrap().0,
            "web#build"
        );
        assert_eq!(
            label_of(&[], &command, NX_MARKER).unwrap(),
            ("node run.js".to_string(), LabelSource::CommandLine)
        );
        assert_eq!(label_of(&[], &[], NX_MARKER), None);
    }

    #[test]
    fn task_line_in_the_seed_style() {
        let sample = TreeSample {
            peak_rss_bytes: 67_000_000,
            ..TreeSample::default()
        };
        let report = TaskReport::new(
            1,
            ("nx run a:build".into(), LabelSource::Environment),
            vec![],
            std::time::SystemTime::now(),
            Duration::from_millis(800),
            (Some(0), None),
            sample,
            false,
        );
        assert_eq!(report.human_line(), "✔  nx run a:build (0.8s) (peak: 67MB)");
        assert!(report.exact);
    }
}
