//! (d) A real build, untraced against traced: `cargo build --offline --release -j2` of a small
//! program that depends on tokio, serde, serde_json, regex and clap, from a fresh target dir.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::bpf_stats::{BpfStatsEnabled, ProgramStats};
use super::process::{self, Bins, Report};
use super::stats::{self, Summary, Table};
use crate::cmd;

const MANIFEST: &str = r#"# Written by `cargo xtask bench`: the real-build benchmark.
[package]
name = "bench-realbuild"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
tokio = { version = "1", features = ["full"] }
serde = { version = "1", features = ["derive"] }
serde_json = "1"
regex = "1"
clap = { version = "4", features = ["derive"] }

# Not part of the tracer workspace this directory sits in.
[workspace]
"#;

const MAIN_RS: &str = r#"use clap::Parser;
use serde::{Deserialize, Serialize};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "a+b")]
    pattern: String,
}

#[derive(Serialize, Deserialize)]
struct Item {
    name: String,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let re = regex::Regex::new(&args.pattern).expect("pattern");
    let text = serde_json::to_string(&Item { name: "aab".into() }).expect("json");
    let found = tokio::spawn(async move { re.is_match(&text) }).await.expect("task");
    println!("{found}");
}
"#;

/// The direct dependencies, with the features the manifest asks for.
const DIRECT: [(&str, &str); 5] = [
    ("tokio", " (features `full`)"),
    ("serde", " (`derive`)"),
    ("serde_json", ""),
    ("regex", ""),
    ("clap", " (`derive`)"),
];
const BUILD_ARGS: [&str; 4] = ["build", "--offline", "--release", "-j2"];
/// The issue's target for the overhead.
const TARGET_PERCENT: f64 = 3.0;

pub fn skipped_section() -> String {
    "### (d) A real build\n\n\
     Skipped: `--quick` leaves the real build out (seven release builds of tokio, serde, regex \
     and clap). Run `cargo xtask bench`, or `cargo xtask bench --quick --only build` for one \
     repetition.\n"
        .to_string()
}

/// One measured build.
struct Build {
    wall: f64,
    cpu: f64,
    /// Traced builds: tracer's report.
    report: Option<Report>,
}

/// `fault_cost_ns`: what tracking added per `rss_stat` event in the fault benchmark, if it ran.
pub fn run(bins: &Bins, dir: &Path, reps: usize, fault_cost_ns: Option<f64>) -> Result<String> {
    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("creating {}", dir.display()))?;
    for (path, text) in [("Cargo.toml", MANIFEST), ("src/main.rs", MAIN_RS)] {
        let path = dir.join(path);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let cargo = cargo_program()?;
    let log = dir.join("build.log");
    let report = dir.join("tracer-report.json");
    let traced_flags = [OsStr::new("--json"), report.as_os_str()];

    eprintln!("xtask: bench: build: cargo fetch in {}", dir.display());
    let mut fetch = Command::new(&cargo);
    fetch
        .arg("fetch")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd::run(&mut fetch)?;

    eprintln!("xtask: bench: build: warm-up build (traced with --bpf-stats, not timed)");
    let (warmup, program) = {
        let _enabled = BpfStatsEnabled::enable()?;
        let flags = [OsStr::new("--bpf-stats")].into_iter().chain(traced_flags);
        let warmup = build(
            bins,
            &cargo,
            dir,
            &log,
            Some(&flags.collect::<Vec<_>>()),
            &report,
        )?;
        let tracer_output =
            std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
        (warmup, ProgramStats::parse(&tracer_output, "rss_stat")?)
    };
    let sources = Sources::scan(&dir.join("target"))?;

    let runs = stats::interleaved(
        "build",
        &[(false, "untraced"), (true, "traced")],
        0,
        reps,
        true,
        |build: &Build| stats::seconds(build.wall),
        |traced| {
            let flags = traced.then_some(&traced_flags[..]);
            build(bins, &cargo, dir, &log, flags, &report)
        },
    )?;
    let wall = [runs.column(0, |b| b.wall), runs.column(1, |b| b.wall)];
    let cpu = [runs.column(0, |b| b.cpu), runs.column(1, |b| b.cpu)];
    let ratios =
        |series: &[Vec<f64>; 2]| Summary::of(&stats::paired(&series[1], &series[0], |t, u| t / u));
    let wall_ratio = ratios(&wall);
    let cpu_ratio = ratios(&cpu);

    let mut table = Table::new(&["variant", "min", "median", "max", "vs untraced"]);
    let command = format!("cargo {}", BUILD_ARGS.join(" "));
    for (what, series, ratio) in [
        ("wall time", &wall, wall_ratio),
        ("CPU time (user + sys, whole tree)", &cpu, cpu_ratio),
    ] {
        for (variant, series, versus) in [
            (format!("untraced `{command}`"), &series[0], "—".to_string()),
            (
                format!("traced `tracer run -- {command}`"),
                &series[1],
                stats::percent_change(ratio.median),
            ),
        ] {
            let [min, median, max] = Summary::of(series).cells(stats::seconds);
            table.row([format!("{what}: {variant}"), min, median, max, versus]);
        }
    }
    let overhead = (wall_ratio.median - 1.0) * 100.0;
    let verdict = if overhead <= TARGET_PERCENT {
        "within"
    } else {
        "over"
    };

    let reports: Vec<&Report> = runs.series[1]
        .iter()
        .filter_map(|b| b.report.as_ref())
        .chain(&warmup.report)
        .collect();
    let peaks: Vec<f64> = reports.iter().map(|r| r.peak_rss_bytes as f64).collect();
    let [peak_min, peak_median, peak_max] = Summary::of(&peaks).cells(stats::mib);
    let exact = if reports.iter().all(|r| r.exact) {
        "exact in every run"
    } else {
        "reported as inexact in at least one run"
    };

    // What the events cost, from the counts of the warm-up and the per-event costs measured
    // elsewhere: noise-free, unlike the timings.
    let untraced_cpu = Summary::of(&cpu[0]).median;
    let program_share = 100.0 * program.run_time_ns as f64 / 1e9 / untraced_cpu;
    let estimate = match fault_cost_ns.filter(|&cost| cost > 0.0) {
        Some(cost) => format!(
            " With the {cost:.0} ns that tracking added per event in (a) (program and kernel \
             tracepoint path), these events would cost {:.2} s, **{:.1}%** of the build's CPU \
             time: the overhead to expect from them.",
            program.runs as f64 * cost / 1e9,
            100.0 * program.runs as f64 * cost / 1e9 / untraced_cpu,
        ),
        None => " (With the fault benchmark, which measures the whole cost of an event, this \
                  would also estimate the kernel's part.)"
            .to_string(),
    };

    Ok(format!(
        "### (d) A real build\n\n\
         A Cargo project (`target/bench/realbuild`) depending on {direct}: {crates} crates from \
         crates.io, whose sources hold {total} `.rs` files; rustc reads {compiled} of them (per \
         its dep-info files). Each measured build is `{command}` from a fresh target directory \
         (removed, and the disk writes flushed, before the clock starts); wall time from spawn to \
         reaping, CPU time from `wait4`. `cargo fetch` ran once before, and an untimed traced \
         build warmed the caches. N = {reps} interleaved repetitions{discarded}.\n\n\
         {table}\n\
         Overhead of tracing the build, wall time (median of per-repetition ratios): \
         **{overhead:+.1}%** (per repetition: {wall_min} to {wall_max}); {verdict} the \
         {TARGET_PERCENT:.0}% target. CPU time: {cpu_median} ({cpu_min} to {cpu_max}).\n\n\
         Peak RSS of the whole build tree (cargo, rustc, build scripts, linkers) as tracer \
         reported it: median **{peak_median}** (min {peak_min}, max {peak_max}; {peak_n} traced \
         builds), {exact}.\n\n\
         Event count (the warm-up build, with `--bpf-stats`; every `rss_stat` event on the host \
         while it ran): tracer's `rss_stat` program ran {events} times ({per_cpu_second} per \
         CPU-second of the build), {ns_per_run:.0} ns per run, {program_ms:.0} ms in all: \
         {program_share:.2}% of the build's CPU time.{estimate}\n",
        direct = sources.direct_deps(),
        crates = sources.crates.len(),
        total = stats::count(sources.total as u64),
        compiled = stats::count(sources.compiled as u64),
        discarded = runs.discarded_note(),
        table = table.markdown(),
        wall_min = stats::percent_change(wall_ratio.min),
        wall_max = stats::percent_change(wall_ratio.max),
        cpu_median = stats::percent_change(cpu_ratio.median),
        cpu_min = stats::percent_change(cpu_ratio.min),
        cpu_max = stats::percent_change(cpu_ratio.max),
        peak_n = peaks.len(),
        events = stats::count(program.runs),
        per_cpu_second = stats::count((program.runs as f64 / untraced_cpu) as u64),
        ns_per_run = program.ns_per_run(),
        program_ms = program.run_time_ns as f64 / 1e6,
    ))
}

/// The cargo that runs xtask (`$CARGO`), else the one on PATH.
fn cargo_program() -> Result<OsString> {
    if let Some(cargo) = std::env::var_os("CARGO") {
        return Ok(cargo);
    }
    Ok(cmd::find_program("cargo")?
        .context("cargo not found")?
        .into_os_string())
}

/// One build from a fresh target dir; traced (with `tracer_flags`, which write tracer's JSON
/// report to `report`) when they are given. cargo's and tracer's output goes to `log`.
fn build(
    bins: &Bins,
    cargo: &OsString,
    dir: &Path,
    log: &Path,
    tracer_flags: Option<&[&OsStr]>,
    report: &Path,
) -> Result<Build> {
    let target = dir.join("target");
    if target.exists() {
        std::fs::remove_dir_all(&target)
            .with_context(|| format!("removing {}", target.display()))?;
    }
    // The previous build's writes must not be written back during this one.
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let mut cmd = match tracer_flags {
        Some(flags) => {
            let mut cmd = bins.tracer_run(flags);
            cmd.arg(cargo);
            cmd
        }
        None => Command::new(cargo),
    };
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.args(BUILD_ARGS)
        .current_dir(dir)
        // Always this directory's target, always compiled from scratch.
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_BUILD_RUSTC_WRAPPER")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let measured = process::measure(&mut cmd)?;
    process::reap_orphans()?;
    if !measured.status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        bail!(
            "`{}` failed ({}); end of {}:\n{}",
            cmd::display(&cmd),
            measured.status,
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let report = match tracer_flags {
        Some(_) => Some(process::read_report(report)?),
        None => None,
    };
    Ok(Build {
        wall: measured.wall.as_secs_f64(),
        cpu: measured.cpu.as_secs_f64(),
        report,
    })
}

/// What the build compiled from crates.io, from rustc's dep-info (`.d`) files.
struct Sources {
    /// `$CARGO_HOME/registry/src/<index>/<name>-<version>` of every crate rustc read files from.
    crates: BTreeSet<PathBuf>,
    /// Distinct `.rs` files of those crates that rustc read.
    compiled: usize,
    /// `.rs` files in those crates' directories (tests, examples and benches included).
    total: usize,
}

impl Sources {
    fn scan(target: &Path) -> Result<Sources> {
        let registry = cmd::cargo_home()?.join("registry").join("src");
        let release = target.join("release");
        // Libraries and proc macros in deps/, build scripts in build/<crate>-<hash>/.
        let mut dep_infos = files_with_extension(&release.join("deps"), "d")?;
        let build_dir = release.join("build");
        let listing = std::fs::read_dir(&build_dir)
            .with_context(|| format!("listing {}", build_dir.display()))?;
        for dir in listing {
            let dir = dir?.path();
            if dir.is_dir() {
                dep_infos.extend(files_with_extension(&dir, "d")?);
            }
        }
        let mut compiled = BTreeSet::new();
        for dep_info in dep_infos {
            let text = std::fs::read_to_string(&dep_info)
                .with_context(|| format!("reading {}", dep_info.display()))?;
            compiled.extend(
                text.split_whitespace()
                    .map(|token| Path::new(token.trim_end_matches(':')))
                    .filter(|path| {
                        path.extension().is_some_and(|ext| ext == "rs")
                            && path.starts_with(&registry)
                    })
                    .map(Path::to_path_buf),
            );
        }
        let crates: BTreeSet<PathBuf> = compiled
            .iter()
            .filter_map(|file| {
                let mut parts = file.strip_prefix(&registry).ok()?.components();
                Some(registry.join(parts.next()?).join(parts.next()?))
            })
            .collect();
        let mut total = 0;
        for dir in &crates {
            total += count_rs_files(dir)?;
        }
        Ok(Sources {
            compiled: compiled.len(),
            crates,
            total,
        })
    }

    /// `tokio 1.54.1 (features `full`), serde 1.0.229 (`derive`), ...`
    fn direct_deps(&self) -> String {
        DIRECT
            .iter()
            .map(|(name, features)| {
                let versions: Vec<&str> = self
                    .crates
                    .iter()
                    .filter_map(|dir| {
                        let version = dir.file_name()?.to_str()?.strip_prefix(name)?;
                        let version = version.strip_prefix('-')?;
                        version
                            .starts_with(|c: char| c.is_ascii_digit())
                            .then_some(version)
                    })
                    .collect();
                format!("{name} {}{features}", versions.join("/"))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn files_with_extension(dir: &Path, extension: &str) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() && path.extension().is_some_and(|ext| ext == extension) {
            files.push(path);
        }
    }
    Ok(files)
}

fn count_rs_files(dir: &Path) -> Result<usize> {
    let mut count = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            count += count_rs_files(&path)?;
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            count += 1;
        }
    }
    Ok(count)
}
