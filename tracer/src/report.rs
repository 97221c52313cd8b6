//! What a measurement reports: the tree's numbers, the JSON report and the one-line human summary.

use serde::Serialize;
use std::time::Duration;

/// Resident memory at the peak moment, by kind (`rss_stat` members).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PeakBreakdown {
    pub anon_bytes: u64,
    pub file_bytes: u64,
    pub shmem_bytes: u64,
}

/// A tracked tree's numbers at one moment (or at its end).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeSample {
    /// Live file + anon + shmem RSS summed over the tree's processes.
    pub rss_bytes: i64,
    /// Highest value `rss_bytes` reached.
    pub peak_rss_bytes: u64,
    /// The split of the peak.
    pub peak_breakdown: PeakBreakdown,
    /// Highest swap use of the tree (swap entries are not resident, so not part of the peak).
    pub peak_swap_bytes: u64,
    /// Distinct processes seen (thread-group leaders: exited ones, plus those still running at stop).
    pub processes: u64,
    /// Address spaces (mms) bound to the tree: one per process, plus one per exec.
    pub address_spaces: u64,
    /// Tracked tasks (threads included) still running.
    pub still_running: u64,
    /// Address spaces of the tree still in the map when tracking stopped (removed then). Zero when the
    /// kernel side saw every teardown; non-zero with processes still running is normal.
    pub leftover_mms: u64,
    /// False when anything that can make the numbers wrong happened; see `inexact_reasons`.
    pub exact: bool,
    pub inexact_reasons: Vec<String>,
}

/// The JSON report of `tracer run` (schema in the README).
#[derive(Debug, Clone, Serialize)]
pub struct PeakReport {
    pub command: Vec<String>,
    /// The status tracer exits with: the command's exit code, or 128 + N when killed by signal N.
    pub exit_code: i32,
    /// The signal that killed the command, if any.
    pub signal: Option<i32>,
    pub duration_ms: u64,
    pub peak_rss_bytes: u64,
    pub peak_breakdown: PeakBreakdown,
    pub peak_swap_bytes: u64,
    pub processes: u64,
    pub backend: &'static str,
    pub exact: bool,
    pub inexact_reasons: Vec<String>,
    pub kernel: String,
}

impl PeakReport {
    /// `✔  make -j2 (2.5s) (peak: 256MB)`, with `✖` when the command failed or was killed.
    pub fn human_line(&self) -> String {
        let mark = if self.exit_code == 0 { '✔' } else { '✖' };
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
        let report = PeakReport {
            command: vec!["make".into(), "-j2".into()],
            exit_code: 0,
            signal: None,
            duration_ms: 2_500,
            peak_rss_bytes: 256_000_000,
            peak_breakdown: PeakBreakdown::default(),
            peak_swap_bytes: 0,
            processes: 3,
            backend: "ebpf",
            exact: true,
            inexact_reasons: vec![],
            kernel: "6.18".into(),
        };
        assert_eq!(report.human_line(), "✔  make -j2 (2.5s) (peak: 256MB)");
        let failed = PeakReport {
            exit_code: 2,
            ..report
        };
        assert!(failed.human_line().starts_with("✖  make -j2"));
    }
}
