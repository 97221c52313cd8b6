//! (e) What each backend reports against the truth, on the test workloads: eBPF, and polling every
//! 10, 100 and 1000 ms; and (f) the CPU time the poller itself burns per second of tracking.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};

use super::process::{self, Bins};
use super::stats::{self, Summary, Table};

/// The spiky workloads of the peak tests, and a steady one (held for 20 intervals of 100 ms).
const WORKLOADS: [(&str, &[&str]); 6] = [
    (
        "one 256 MiB spike held 1 ms",
        &[
            "spike",
            "--mib",
            "256",
            "--hold-ms",
            "1",
            "--tail-ms",
            "300",
        ],
    ),
    (
        "4 children × 64 MiB at once",
        &["together", "--children", "4", "--mib", "64"],
    ),
    (
        "4 children × 100 MiB in turn",
        &["sequential", "--children", "4", "--mib", "100"],
    ),
    (
        "chain of 4 descendants × 32 MiB",
        &["nested", "--depth", "4", "--mib", "32"],
    ),
    (
        "4 threads × 64 MiB",
        &["threads", "--threads", "4", "--mib", "64"],
    ),
    (
        "200 MiB held 2 s (steady)",
        &["hold", "--mib", "200", "--hold-ms", "2000"],
    ),
];

/// Backends compared: the CLI flags and a column name.
const VARIANTS: [(&[&str], &str); 4] = [
    (&["--backend", "ebpf"], "eBPF"),
    (&["--backend", "poll", "--interval", "10"], "poll 10 ms"),
    (&["--backend", "poll", "--interval", "100"], "poll 100 ms"),
    (&["--backend", "poll", "--interval", "1000"], "poll 1000 ms"),
];

const POLL_INTERVALS_MS: [u64; 3] = [10, 100, 1000];
/// How long the poller's own cost is measured for, per interval.
const TRACKED_SECONDS: u64 = 5;

pub fn run(bins: &Bins, scratch: &std::path::Path, reps: usize) -> Result<String> {
    let report_path = scratch.join("accuracy.json");
    let mut table = Table::new(&[
        "workload",
        "truth (oracle)",
        "eBPF",
        "poll 10 ms",
        "poll 100 ms",
        "poll 1000 ms",
    ]);
    for (name, args) in WORKLOADS {
        // Per variant, per repetition: (peak, that run's own oracle).
        let mut errors: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
        let mut truths = Vec::new();
        for rep in 0..reps {
            for (index, (flags, _)) in VARIANTS.iter().enumerate() {
                let (peak, oracle) = measure(bins, flags, args, &report_path)?;
                errors[index].push((peak as f64 - oracle as f64) / oracle as f64 * 100.0);
                if index == 0 {
                    truths.push(oracle as f64);
                }
                process::reap_orphans()?;
                eprintln!(
                    "xtask: bench: accuracy: {name}: rep {rep}: {:?}: peak {peak} oracle {oracle}",
                    flags
                );
            }
        }
        let mut row = vec![name.to_string(), stats::mib(Summary::of(&truths).median)];
        row.extend(errors.iter().map(|series| percent(Summary::of(series))));
        table.row(row);
    }
    let cost = poller_cost(bins, &report_path)?;
    Ok(format!(
        "### (e) Each backend against the truth\n\n\
         Each workload reads the VmRSS of all its processes while they hold their memory and prints \
         the sum: the truth. Cells: the reported peak's error against the same run's truth, median \
         (min … max) of {reps} runs each; `tracer run --backend …`. Polling's `peak_rss_bytes` is \
         never below `largest_process_peak_bytes` (the largest `VmHWM` seen), which is why it still \
         catches a single process's spike when that process outlives it by a sample.\n\n{}\n\
         ### (f) The poller's own CPU time\n\n\
         `tracer run --backend poll --interval N -- sleep {TRACKED_SECONDS}`: tracer's user + system \
         CPU time (`wait4`; `sleep` uses next to none) per second of tracking. The eBPF backend's \
         userspace sleeps while the kernel counts; its cost is in (a).\n\n{}",
        table.markdown(),
        cost
    ))
}

/// One run: the reported peak and the workload's own oracle.
fn measure(
    bins: &Bins,
    flags: &[&str],
    args: &[&str],
    report_path: &std::path::Path,
) -> Result<(u64, u64)> {
    // Not `Bins::tracer_run`: that one pins the eBPF backend.
    let mut cmd = std::process::Command::new(&bins.tracer);
    cmd.arg("run")
        .args(flags)
        .arg("--json")
        .arg(report_path)
        .arg("--")
        .arg(&bins.workload)
        .args(args)
        .stdin(Stdio::null());
    let output = process::output(&mut cmd)?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let oracle_line = stdout
        .lines()
        .rev()
        .find(|line| line.starts_with('{'))
        .context("no oracle line from the workload")?;
    let oracle: serde_json::Value = serde_json::from_str(oracle_line).context("oracle JSON")?;
    let report = process::read_report(report_path)?;
    Ok((
        report.peak_rss_bytes,
        oracle["oracle_bytes"].as_u64().context("oracle_bytes")?,
    ))
}

fn percent(summary: Summary) -> String {
    format!(
        "{:+.1}% ({:+.1} … {:+.1})",
        summary.median, summary.min, summary.max
    )
}

fn poller_cost(bins: &Bins, report_path: &std::path::Path) -> Result<String> {
    let mut table = Table::new(&["interval", "tracer CPU per second tracked", "samples taken"]);
    for interval in POLL_INTERVALS_MS {
        let mut cmd = std::process::Command::new(&bins.tracer);
        cmd.args([
            "run",
            "--backend",
            "poll",
            "--interval",
            &interval.to_string(),
            "--json",
        ])
        .arg(report_path)
        .args(["--", "sleep", &TRACKED_SECONDS.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let usage = process::measure_ok(&mut cmd)?;
        let text = std::fs::read_to_string(report_path).context("reading the poll report")?;
        let report: serde_json::Value = serde_json::from_str(&text).context("poll report")?;
        let per_second =
            usage.cpu.as_secs_f64() / Duration::from_secs(TRACKED_SECONDS).as_secs_f64();
        table.row([
            format!("{interval} ms"),
            format!(
                "{:.2} ms ({:.2}% of a CPU)",
                per_second * 1e3,
                per_second * 100.0
            ),
            report["samples"].to_string(),
        ]);
        process::reap_orphans()?;
    }
    Ok(table.markdown())
}
