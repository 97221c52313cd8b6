//! (a) A page-fault-heavy workload alone, beside a tracer that does not track it, and tracked;
//! then, once per tracer variant, tracer's own `rss_stat` program time from the kernel's BPF stats.

use anyhow::{Context, Result, bail};

use super::bpf_stats::{BpfStatsEnabled, ProgramStats};
use super::process::{self, BackgroundTracer, Bins};
use super::stats::{self, Summary, Table};

const WORKLOAD_ARGS: [&str; 5] = ["faults", "--mib", "2048", "--rounds", "3"];
const WARMUPS: usize = 1;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// The workload alone.
    None,
    /// A `tracer run -- sleep 1000` in the background; the workload runs plainly.
    Untracked,
    /// `tracer run -- workload faults ...`.
    Tracked,
}

const VARIANTS: [(Variant, &str); 3] = [
    (Variant::None, "none"),
    (Variant::Untracked, "untracked"),
    (Variant::Tracked, "tracked"),
];

/// The workload's line: `{"scenario":"faults","elapsed_ns":N,"pages":P}`.
struct Faults {
    elapsed_ns: f64,
    pages: u64,
}

/// One run of `variant`; `flags` go to tracer. Returns the workload's numbers and tracer's
/// stderr (empty for `None`).
fn run_once(bins: &Bins, variant: Variant, flags: &[&str]) -> Result<(Faults, String)> {
    let (out, tracer_stderr) = match variant {
        Variant::None => (process::output(&mut bins.workload(&WORKLOAD_ARGS))?, None),
        Variant::Untracked => {
            let background = BackgroundTracer::start(bins, flags)?;
            let out = process::output(&mut bins.workload(&WORKLOAD_ARGS))?;
            (out, Some(background.stop()?))
        }
        Variant::Tracked => {
            let mut cmd = bins.tracer_run(flags);
            cmd.arg(&bins.workload).args(WORKLOAD_ARGS);
            let out = process::output(&mut cmd)?;
            process::reap_orphans()?;
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            (out, Some(stderr))
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let faults = parse_faults(&stdout)
        .with_context(|| format!("unexpected output from `workload faults`: {stdout:?}"))?;
    Ok((faults, tracer_stderr.unwrap_or_default()))
}

fn parse_faults(stdout: &str) -> Result<Faults> {
    let line = stdout
        .lines()
        .rev()
        .find(|line| line.starts_with('{'))
        .context("no JSON line")?;
    let value: serde_json::Value = serde_json::from_str(line)?;
    if value["scenario"] != "faults" {
        bail!("not a `faults` line");
    }
    let number = |key: &str| value[key].as_u64().with_context(|| format!("no {key}"));
    Ok(Faults {
        elapsed_ns: number("elapsed_ns")? as f64,
        pages: number("pages")?,
    })
}

/// One stats run: the `rss_stat` program's numbers for `variant`.
fn program_stats(bins: &Bins, variant: Variant) -> Result<ProgramStats> {
    let (_, stderr) = run_once(bins, variant, &["--bpf-stats"])?;
    let stats = ProgramStats::parse(&stderr, "rss_stat")?;
    if stats.runs == 0 {
        bail!("tracer's rss_stat program counted no runs: are BPF stats enabled?");
    }
    Ok(stats)
}

/// The Markdown section, and the tracked variant's extra time per page fault in ns (each fault
/// is one `rss_stat` event), for estimates elsewhere.
pub fn run(bins: &Bins, reps: usize) -> Result<(String, f64)> {
    let mut pages = 0;
    let runs = stats::interleaved(
        "faults",
        &VARIANTS,
        WARMUPS,
        reps,
        true,
        |ns: &f64| stats::seconds(ns / 1e9),
        |variant| {
            let (faults, _) = run_once(bins, variant, &[])?;
            pages = faults.pages;
            Ok(faults.elapsed_ns)
        },
    )?;
    let [none, untracked, tracked] = [&runs.series[0], &runs.series[1], &runs.series[2]];

    let (untracked_stats, tracked_stats) = {
        let _enabled = BpfStatsEnabled::enable()?;
        eprintln!("xtask: bench: faults: BPF stats run, untracked");
        let untracked = program_stats(bins, Variant::Untracked)?;
        eprintln!("xtask: bench: faults: BPF stats run, tracked");
        let tracked = program_stats(bins, Variant::Tracked)?;
        (untracked, tracked)
    };

    let extra_ns = |series: &[f64]| Summary::of(&stats::paired(series, none, |v, n| v - n)).median;
    let ratio = |series: &[f64]| Summary::of(&stats::paired(series, none, |v, n| v / n)).median;
    let per_page = |ns: f64| format!("{:+.0} ns", ns / pages as f64);

    let mut times = Table::new(&[
        "variant",
        "min",
        "median",
        "max",
        "slowdown vs none",
        "extra time per page",
    ]);
    let row = |name: &str, series: &[f64], versus_none: [String; 2]| {
        let [min, median, max] = Summary::of(series).cells(|ns| stats::seconds(ns / 1e9));
        let [slowdown, extra] = versus_none;
        [name.to_string(), min, median, max, slowdown, extra]
    };
    times.row(row(
        "none: the workload alone",
        none,
        ["×1".to_string(), "—".to_string()],
    ));
    for (name, series) in [
        (
            "untracked: a `tracer run -- sleep 1000` in the background",
            untracked,
        ),
        ("tracked: `tracer run -- workload faults …`", tracked),
    ] {
        let versus_none = [stats::ratio(ratio(series)), per_page(extra_ns(series))];
        times.row(row(name, series, versus_none));
    }

    let mut programs = Table::new(&[
        "variant",
        "`rss_stat` runs",
        "runs per page",
        "ns per run",
        "missed",
        "program time",
        "share of the measured slowdown",
    ]);
    for (name, program, series) in [
        (
            "untracked (the program rejects the workload's events)",
            &untracked_stats,
            untracked,
        ),
        ("tracked", &tracked_stats, tracked),
    ] {
        let extra = extra_ns(series);
        let share = if extra > 0.0 {
            format!("{:.0}%", 100.0 * program.run_time_ns as f64 / extra)
        } else {
            "n/a (no slowdown measured)".to_string()
        };
        programs.row([
            name.to_string(),
            stats::count(program.runs),
            format!("{:.3}", program.runs as f64 / pages as f64),
            format!("{:.1}", program.ns_per_run()),
            program.missed.map_or("—".to_string(), stats::count),
            stats::millis(program.run_time_ns as f64 / 1e9),
            share,
        ]);
    }

    let section = format!(
        "### (a) Page-fault-heavy workload\n\n\
         `workload {args}`: three times, map 2 GiB of private anonymous memory (no huge pages), \
         write one byte per 4 KiB page, unmap: {pages} page faults, each one `kmem:rss_stat` event. \
         Time: the workload's own clock around the rounds (process start-up excluded). \
         N = {reps} interleaved repetitions{discarded} after {WARMUPS} warm-up.\n\n\
         {times}\n\
         Slowdown: median of the per-repetition ratios to `none`; extra time per page: median of the \
         per-repetition differences to `none`, divided by the page count.\n\n\
         tracer's own `rss_stat` program, from the kernel's BPF statistics \
         (`kernel.bpf_stats_enabled=1`, `tracer run --bpf-stats`; one extra run per variant, not \
         part of the timings above; runs count every `rss_stat` event on the host while tracer ran; \
         missed: events the kernel skipped because a BPF program was already running on that CPU):\n\n\
         {programs}\n\
         Share: program time / (median per-repetition difference to `none` above). The rest of \
         the slowdown is the kernel's tracepoint path, paid for any program attached to \
         `kmem:rss_stat`.\n",
        args = WORKLOAD_ARGS.join(" "),
        pages = stats::count(pages),
        discarded = runs.discarded_note(),
        times = times.markdown(),
        programs = programs.markdown(),
    );
    Ok((section, extra_ns(tracked) / pages as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_line() {
        let faults =
            parse_faults("{\"scenario\":\"faults\",\"elapsed_ns\":4000000000,\"pages\":1572864}\n")
                .unwrap();
        assert_eq!((faults.elapsed_ns, faults.pages), (4e9, 1_572_864));
        assert!(parse_faults("{\"scenario\":\"spike\",\"oracle_bytes\":1}").is_err());
    }
}
