//! (b) Start-up cost: `tracer run -- true` against `true`, wall time of spawn + wait.

use std::process::{Command, Stdio};

use anyhow::Result;

use super::process::{self, Bins};
use super::stats::{self, Summary, Table};

const WARMUPS: usize = 1;
/// The target for the extra time.
const TARGET_MS: f64 = 30.0;

pub fn run(bins: &Bins, reps: usize) -> Result<String> {
    // Per run: wall time, and how long tracer's background detacher outlived it.
    let runs = stats::interleaved(
        "startup",
        &[(false, "true"), (true, "tracer run -- true")],
        WARMUPS,
        reps,
        false,
        |(wall, _): &(f64, f64)| stats::millis(*wall),
        |traced| {
            let mut cmd = if traced {
                let mut cmd = bins.tracer_run::<&str>([]);
                cmd.arg("true");
                cmd
            } else {
                Command::new("true")
            };
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let wall = process::measure_ok(&mut cmd)?.wall;
            // Outside the timed region: tracer's background detacher, until it is gone.
            let detached = process::reap_orphans()?;
            Ok((wall.as_secs_f64(), detached.as_secs_f64()))
        },
    )?;
    let plain = runs.column(0, |run| run.0);
    let traced = runs.column(1, |run| run.0);
    let detach = Summary::of(&runs.column(1, |run| run.1));
    let extra = Summary::of(&stats::paired(&traced, &plain, |t, p| t - p));

    let mut table = Table::new(&["command", "min", "median", "max"]);
    for (name, series) in [("`true`", &plain), ("`tracer run -- true`", &traced)] {
        let [min, median, max] = Summary::of(series).cells(stats::millis);
        table.row([name.to_string(), min, median, max]);
    }
    let [extra_min, extra_median, extra_max] = extra.cells(stats::millis);
    let verdict = if extra.median * 1e3 <= TARGET_MS {
        "within"
    } else {
        "over"
    };
    let [detach_min, detach_median, detach_max] = detach.cells(stats::millis);

    Ok(format!(
        "### (b) Start-up cost\n\n\
         Wall time from spawning to reaping, measured by xtask (stdio on /dev/null). \
         N = {reps} interleaved repetitions after {WARMUPS} warm-up.\n\n\
         {table}\n\
         Extra time of `tracer run` (median of per-repetition differences): **{extra_median}** \
         (min {extra_min}, max {extra_max}); {verdict} the {TARGET_MS:.0} ms target.\n\n\
         This is what a caller waits for. After tracer has exited, a background process it leaves \
         behind detaches the programs (the kernel waits for RCU grace periods when a tracepoint's \
         last perf event closes); that took {detach_median} (min {detach_min}, max {detach_max}) \
         after tracer's exit, which the benchmark waits out between runs, outside the timings.\n",
        table = table.markdown(),
    ))
}
