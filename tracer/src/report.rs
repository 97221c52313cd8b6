//! What a measurement reports: the tree's numbers, the JSON report and the one-line human summary.
//! Units: JSON carries raw bytes and milliseconds; the human line rounds, with decimal units.

use serde::Serialize;
use std::time::Duration;

/// Resident memory at the peak moment, by kind (`rss_stat` members).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PeakBreakdown {
    /// Anonymous pages (heap, stacks, private mappings).
    pub anon_bytes: u64,
    /// File-backed pages (binaries, libraries, mapped files).
    pub file_bytes: u64,
    /// Shared memory pages (tmpfs, `MAP_SHARED|MAP_ANONYMOUS`, SysV shm).
    pub shmem_bytes: u64,
}

/// A tracked tree's numbers at one moment (or at its end), as a backend measures them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeSample {
    /// Live RSS summed over the tree's processes.
    pub rss_bytes: i64,
    /// Highest value `rss_bytes` reached.
    pub peak_rss_bytes: u64,
    /// The split of the peak (eBPF only; zeros from the polling backend).
    pub peak_breakdown: PeakBreakdown,
    /// Highest swap use of the tree (swap entries are not resident, so not part of the peak).
    pub peak_swap_bytes: u64,
    /// Distinct processes seen.
    pub processes: u64,
    /// Address spaces (mms) bound to the tree: one per process, plus one per exec (eBPF only).
    pub address_spaces: u64,
    /// Tracked tasks (eBPF: threads included; polling: processes) still running.
    pub still_running: u64,
    /// Address spaces of the tree still in the kernel map when tracking stopped (removed then). Zero
    /// when the kernel side saw every teardown; non-zero with processes still running is normal.
    pub leftover_mms: u64,
    /// The largest high-water mark the OS keeps for any single process of the tree (Linux `VmHWM`,
    /// Windows peak working set): a lower bound of the tree peak even for spikes between samples.
    pub largest_process_peak_bytes: Option<u64>,
    /// Polling only: samples taken and the interval between them.
    pub samples: Option<u64>,
    /// Polling only: the sampling interval.
    pub interval: Option<Duration>,
    /// How the tree's root process ended, when the kernel side saw it (`exit_group` code, or the
    /// signal that killed it); task-tracking eBPF trackers only.
    pub root_exit: (Option<i32>, Option<i32>),
    /// False when anything that can make the numbers wrong happened; see `inexact_reasons`.
    pub exact: bool,
    /// What happened that can make the numbers wrong.
    pub inexact_reasons: Vec<String>,
}

/// The report of one tracked tree: what `tracer run` prints as JSON and what
/// [`MemoryTracker::stop_tracking`](crate::MemoryTracker::stop_tracking) returns. Schema in the README.
#[derive(Debug, Clone, Serialize)]
pub struct PeakReport {
    /// The command and its arguments (for a tracked pid: its command line when tracking started).
    pub command: Vec<String>,
    /// The command's exit status: its exit code, or 128 + N when killed by signal N. `None` when
    /// tracer is not the command's parent (library tracking of a pid), so it never learns it.
    pub exit_code: Option<i32>,
    /// The signal that killed the command, if any.
    pub signal: Option<i32>,
    /// From the start of tracking (the command's exec for `tracer run`) to its end.
    pub duration_ms: u64,
    /// Highest summed RSS of the tree.
    pub peak_rss_bytes: u64,
    /// Split of the peak by kind of memory.
    pub peak_breakdown: PeakBreakdown,
    /// Highest swap use of the tree.
    pub peak_swap_bytes: u64,
    /// Distinct processes of the tree seen.
    pub processes: u64,
    /// Tasks of the tree still running when the report was made (they are no longer followed).
    pub still_running: u64,
    /// See [`TreeSample::largest_process_peak_bytes`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub largest_process_peak_bytes: Option<u64>,
    /// `"ebpf"` or `"poll"`.
    pub backend: &'static str,
    /// Polling only: the sampling interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    /// Polling only: the number of samples taken.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<u64>,
    /// False when the numbers may be wrong (always false for polling); see `inexact_reasons`.
    pub exact: bool,
    /// Why the numbers may be wrong.
    pub inexact_reasons: Vec<String>,
    /// The OS release (`uname -r` on Linux).
    pub kernel: String,
}

impl PeakReport {
    /// A report from a backend's final sample.
    pub fn from_sample(
        sample: TreeSample,
        backend: &'static str,
        command: Vec<String>,
        duration: Duration,
        kernel: String,
    ) -> PeakReport {
        PeakReport {
            command,
            exit_code: match sample.root_exit {
                (Some(code), _) => Some(code),
                (None, Some(signal)) => Some(128 + signal),
                (None, None) => None,
            },
            signal: sample.root_exit.1,
            duration_ms: duration.as_millis() as u64,
            peak_rss_bytes: sample.peak_rss_bytes,
            peak_breakdown: sample.peak_breakdown,
            peak_swap_bytes: sample.peak_swap_bytes,
            processes: sample.processes,
            still_running: sample.still_running,
            largest_process_peak_bytes: sample.largest_process_peak_bytes,
            backend,
            interval_ms: sample.interval.map(|interval| interval.as_millis() as u64),
            samples: sample.samples,
            exact: sample.exact,
            inexact_reasons: sample.inexact_reasons,
            kernel,
        }
    }

    /// `✔  make -j2 (2.5s) (peak: 256MB)`, with `✖` when the command failed or was killed.
    pub fn human_line(&self) -> String {
        let mark = if self.exit_code.unwrap_or(0) == 0 {
            '✔'
        } else {
            '✖'
        };
        format!(
            "{mark}  {} ({}) (peak: {})",
            shell_words(&self.command),
            format_duration(Duration::from_millis(self.duration_ms)),
            format_bytes(self.peak_rss_bytes)
        )
    }
}

/// The command as a shell would need it typed: `sh -c 'exit 3'`.
pub fn shell_words(words: &[String]) -> String {
    let quote = |word: &String| {
        let plain = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
        if !word.is_empty() && word.chars().all(plain) {
            word.clone()
        } else {
            format!("'{}'", word.replace('\'', r"'\''"))
        }
    };
    words.iter().map(quote).collect::<Vec<_>>().join(" ")
}

/// Seconds with one decimal: `2.5s`, `0.0s`.
pub fn format_duration(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}

/// Decimal units, so the label is literally true: `812kB`, `256MB`, `1.2GB`.
pub fn format_bytes(bytes: u64) -> String {
    const KB: f64 = 1e3;
    const MB: f64 = 1e6;
    const GB: f64 = 1e9;
    let value = bytes as f64;
    if value >= GB {
        format!("{:.1}GB", value / GB)
    } else if value >= MB {
        format!("{:.0}MB", value / MB)
    } else {
        format!("{:.0}kB", value / KB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_labels_are_decimal() {
        assert_eq!(format_bytes(256_000_000), "256MB");
        assert_eq!(format_bytes(268_435_456), "268MB");
        assert_eq!(format_bytes(1_250_000_000), "1.2GB");
        assert_eq!(format_bytes(999_000), "999kB");
        assert_eq!(format_bytes(4_096), "4kB");
    }

    #[test]
    fn commands_are_shown_quoted() {
        let words = ["sh", "-c", "exit 3", "it's", ""].map(String::from);
        assert_eq!(shell_words(&words), r"sh -c 'exit 3' 'it'\''s' ''");
    }

    #[test]
    fn human_line_in_the_seed_style() {
        let sample = TreeSample {
            peak_rss_bytes: 256_000_000,
            ..TreeSample::default()
        };
        let command = vec!["make".into(), "-j2".into()];
        let duration = Duration::from_millis(2_500);
        let mut report = PeakReport::from_sample(sample, "ebpf", command, duration, "6.18".into());
        report.exit_code = Some(0);
        assert_eq!(report.human_line(), "✔  make -j2 (2.5s) (peak: 256MB)");
        let failed = PeakReport {
            exit_code: Some(2),
            ..report
        };
        assert!(failed.human_line().starts_with("✖  make -j2"));
    }
}
