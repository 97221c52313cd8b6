//! The kernel's BPF run statistics: switching them on for a while, and reading tracer's report
//! of them (`tracer run --bpf-stats`).

use anyhow::{Context, Result};

/// Runs and run time of one BPF program, from tracer's `--bpf-stats` lines on stderr:
/// `tracer: bpf-stats: rss_stat runs=131622 run_time_ns=20379042 ns_per_run=154.8 missed=0`.
#[derive(Debug, PartialEq, Eq)]
pub struct ProgramStats {
    pub runs: u64,
    pub run_time_ns: u64,
    /// Events the kernel did not run the program for (recursion protection), when tracer says.
    pub missed: Option<u64>,
}

impl ProgramStats {
    pub fn parse(stderr: &str, program: &str) -> Result<ProgramStats> {
        let line = stderr
            .lines()
            .find_map(|line| {
                line.strip_prefix("tracer: bpf-stats: ")?
                    .strip_prefix(program)?
                    .strip_prefix(' ')
            })
            .with_context(|| {
                format!("no `bpf-stats: {program}` line in tracer's stderr: {stderr:?}")
            })?;
        let field = |key: &str| -> Result<Option<u64>> {
            line.split_whitespace()
                .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
                .map(|value| value.parse())
                .transpose()
                .with_context(|| format!("bad {key}= in {line:?}"))
        };
        let required = |key: &str| field(key)?.with_context(|| format!("no {key}= in {line:?}"));
        Ok(ProgramStats {
            runs: required("runs")?,
            run_time_ns: required("run_time_ns")?,
            missed: field("missed")?,
        })
    }

    pub fn ns_per_run(&self) -> f64 {
        self.run_time_ns as f64 / self.runs.max(1) as f64
    }
}

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// `kernel.bpf_stats_enabled=1` until dropped, then the previous value again (on errors too;
/// not if xtask is killed).
pub struct BpfStatsEnabled {
    previous: String,
}

impl BpfStatsEnabled {
    pub fn enable() -> Result<BpfStatsEnabled> {
        let previous = std::fs::read_to_string(BPF_STATS_SYSCTL)
            .with_context(|| format!("reading {BPF_STATS_SYSCTL}"))?
            .trim()
            .to_string();
        std::fs::write(BPF_STATS_SYSCTL, "1")
            .with_context(|| format!("writing 1 to {BPF_STATS_SYSCTL}"))?;
        eprintln!("xtask: bench: kernel.bpf_stats_enabled = 1 (was {previous})");
        Ok(BpfStatsEnabled { previous })
    }
}

impl Drop for BpfStatsEnabled {
    fn drop(&mut self) {
        match std::fs::write(BPF_STATS_SYSCTL, &self.previous) {
            Ok(()) => eprintln!(
                "xtask: bench: kernel.bpf_stats_enabled = {} (restored)",
                self.previous
            ),
            Err(err) => eprintln!(
                "xtask: bench: warning: could not restore kernel.bpf_stats_enabled to {}: {err}",
                self.previous
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ProgramStats;

    #[test]
    fn program_stats_lines() {
        let stderr = "✔  workload faults (4.1s) (peak: 2.2GB)\n\
                      tracer: bpf-stats: rss_stat runs=131622 run_time_ns=20379042 ns_per_run=154.8\n\
                      tracer: bpf-stats: sched_process_fork runs=5 run_time_ns=4036 ns_per_run=807.2\n";
        assert_eq!(
            ProgramStats::parse(stderr, "rss_stat").unwrap(),
            ProgramStats {
                runs: 131_622,
                run_time_ns: 20_379_042,
                missed: None,
            }
        );
        let newer = "tracer: bpf-stats: rss_stat runs=7 run_time_ns=70 ns_per_run=10.0 missed=2\n";
        assert_eq!(
            ProgramStats::parse(newer, "rss_stat").unwrap().missed,
            Some(2)
        );
        assert_eq!(
            ProgramStats::parse(stderr, "sched_process_fork")
                .unwrap()
                .runs,
            5
        );
        assert!(ProgramStats::parse(stderr, "sched_process_exec").is_err());
    }
}
