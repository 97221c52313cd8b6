//! (c) tracer's own peak RSS, idle and while tracking a tree that allocates 256 MiB.

use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result};

use super::process::{self, Bins};
use super::stats::{self, Summary, Table};

/// The target for tracer's own peak RSS.
const TARGET_MIB: f64 = 15.0;

#[derive(Clone, Copy)]
enum Probe {
    /// `sh -c 'sleep 0.3; grep VmHWM /proc/$PPID/status'`: the command's parent is tracer.
    Idle,
    /// The same after `workload together --children 4 --mib 64`.
    Busy,
    /// `tracer run -- true`, `ru_maxrss` from `wait4` on tracer.
    Lifetime,
}

const IDLE_SCRIPT: &str = "sleep 0.3; grep VmHWM /proc/$PPID/status";
/// `$0` is the workload binary.
const BUSY_SCRIPT: &str =
    "\"$0\" together --children 4 --mib 64 >/dev/null && grep VmHWM /proc/$PPID/status";

/// `VmHWM:   3644 kB` in the command's stdout, in bytes.
fn parse_vmhwm(stdout: &str) -> Result<u64> {
    let kib: u64 = stdout
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .context("no `VmHWM: N kB` line")?
        .trim()
        .parse()
        .context("bad VmHWM value")?;
    Ok(kib * 1024)
}

pub fn run(bins: &Bins, scratch: &Path, reps: usize) -> Result<String> {
    let report = scratch.join("memory-busy.json");
    // Per run: tracer's peak RSS, and for `Busy` the tree's peak as tracer reported it.
    let runs = stats::interleaved(
        "memory",
        &[
            (Probe::Idle, "idle"),
            (Probe::Busy, "busy"),
            (Probe::Lifetime, "lifetime"),
        ],
        0,
        reps,
        false,
        |(bytes, _): &(f64, f64)| stats::mib(*bytes),
        |probe| {
            let (bytes, tree_peak) = match probe {
                Probe::Idle => {
                    let mut cmd = bins.tracer_run::<&str>([]);
                    cmd.args(["sh", "-c", IDLE_SCRIPT]);
                    (vmhwm_of(&mut cmd)?, 0)
                }
                Probe::Busy => {
                    let mut cmd = bins.tracer_run([Path::new("--json"), &report]);
                    cmd.args(["sh", "-c", BUSY_SCRIPT]).arg(&bins.workload);
                    let bytes = vmhwm_of(&mut cmd)?;
                    (bytes, process::read_report(&report)?.peak_rss_bytes)
                }
                Probe::Lifetime => {
                    let mut cmd = bins.tracer_run::<&str>([]);
                    cmd.arg("true").stdout(Stdio::null()).stderr(Stdio::null());
                    (process::measure_ok(&mut cmd)?.max_rss, 0)
                }
            };
            process::reap_orphans()?;
            Ok((bytes as f64, tree_peak as f64))
        },
    )?;

    let busy_tree_peak = stats::mib(Summary::of(&runs.column(1, |run| run.1)).median);
    let mut table = Table::new(&["what", "min", "median", "max"]);
    let rows = [
        "`VmHWM` of tracer while it tracks `sleep 0.3` (read by the command from \
         `/proc/$PPID/status`)"
            .to_string(),
        format!(
            "`VmHWM` of tracer after tracking `workload together --children 4 --mib 64` \
             (tree peak {busy_tree_peak})"
        ),
        "`ru_maxrss` of `tracer run -- true` over tracer's whole life (`wait4`; includes \
         the reaped `true`)"
            .to_string(),
    ];
    let mut largest: f64 = 0.0;
    for (index, name) in rows.into_iter().enumerate() {
        let summary = Summary::of(&runs.column(index, |run| run.0));
        largest = largest.max(summary.max);
        let [min, median, max] = summary.cells(stats::mib);
        table.row([name, min, median, max]);
    }
    let verdict = if largest <= TARGET_MIB * f64::from(1 << 20) {
        "within"
    } else {
        "over"
    };
    Ok(format!(
        "### (c) tracer's own memory\n\n\
         Peak resident memory of the tracer process itself (not of the command). \
         N = {reps} interleaved repetitions.\n\n\
         {table}\n\
         Largest value seen: {largest}; {verdict} the {TARGET_MIB:.0} MiB target. \
         (On Linux ≥ 6.2, `VmHWM` and `ru_maxrss` can lag the exact RSS by a few per-CPU counter \
         batches: tens of pages.)\n",
        table = table.markdown(),
        largest = stats::mib(largest),
    ))
}

/// Runs `cmd` (a tracer whose command prints tracer's VmHWM) and returns that VmHWM in bytes.
fn vmhwm_of(cmd: &mut std::process::Command) -> Result<u64> {
    let out = process::output(cmd)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    parse_vmhwm(&stdout).with_context(|| format!("unexpected output {stdout:?}"))
}

#[cfg(test)]
mod tests {
    use super::parse_vmhwm;

    #[test]
    fn vmhwm_line() {
        assert_eq!(parse_vmhwm("VmHWM:\t    3644 kB\n").unwrap(), 3644 * 1024);
        assert!(parse_vmhwm("VmRSS:\t 12 kB\n").is_err());
    }
}
