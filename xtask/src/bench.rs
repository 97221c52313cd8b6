//! `cargo xtask bench`: what tracer costs, measured with interleaved repetitions.
//!
//! Every benchmark runs each of its variants once per repetition, in an order rotated by one
//! from repetition to repetition, so that drift (thermal, host noise, page cache) touches all
//! variants alike; results are min / median / max over the repetitions, and ratios are medians
//! of per-repetition ratios. The Markdown report goes to stdout and to
//! `target/bench/results.md`; progress goes to stderr. docs/BENCHMARKS.md explains each number.

mod accuracy;
mod bpf_stats;
mod faults;
mod machine;
mod memory;
mod process;
mod realbuild;
mod startup;
mod stats;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

use crate::{cargo, cmd};

#[derive(Args)]
pub struct Options {
    /// Fewer repetitions, for a smoke run of about two minutes; skips the real build
    /// unless `--only build` asks for it.
    #[arg(long)]
    quick: bool,
    /// Run only these benchmarks (comma-separated or repeated).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Bench>,
}

#[derive(ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
enum Bench {
    /// (a) a page-fault-heavy workload: none / untracked / tracked.
    Faults,
    /// (b) `tracer run -- true` against `true`.
    Startup,
    /// (c) tracer's own peak RSS.
    Memory,
    /// (d) a real cargo build, traced against untraced.
    Build,
    /// (e) each backend's peak against the truth, (f) the poller's own CPU time.
    Accuracy,
}

/// Repetition counts (measured repetitions; warm-ups come on top).
struct Plan {
    faults: usize,
    startup: usize,
    memory: usize,
    /// `None`: skipped.
    build: Option<usize>,
    accuracy: usize,
}

impl Plan {
    fn new(options: &Options) -> Plan {
        if options.quick {
            let build_asked = options.only.contains(&Bench::Build);
            Plan {
                faults: 2,
                startup: 10,
                memory: 1,
                build: build_asked.then_some(1),
                accuracy: 1,
            }
        } else {
            Plan {
                faults: 15,
                startup: 40,
                memory: 3,
                build: Some(6),
                accuracy: 3,
            }
        }
    }
}

pub fn run(options: &Options) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "the benchmarks load BPF programs and write sysctls: run `cargo xtask bench` as root"
        );
    }
    eprintln!(
        "xtask: bench: building release binaries (cargo build --release --workspace --exclude tracer-ebpf)"
    );
    cargo::build(true)?;
    let target = target_dir();
    let bins = process::Bins {
        tracer: target.join("release/tracer"),
        workload: target.join("release/workload"),
    };
    for bin in [&bins.tracer, &bins.workload] {
        if !bin.is_file() {
            bail!("{} is missing after the release build", bin.display());
        }
    }
    process::become_subreaper()?;

    let started = Instant::now();
    let cpu_at_start = machine::CpuUse::now()?;
    let plan = Plan::new(options);
    let selected = |bench| options.only.is_empty() || options.only.contains(&bench);
    let bench_dir = target.join("bench");
    std::fs::create_dir_all(&bench_dir)
        .with_context(|| format!("creating {}", bench_dir.display()))?;

    let mut sections = Vec::new();
    let mut fault_cost_ns = None;
    if selected(Bench::Faults) {
        let (section, cost) = faults::run(&bins, plan.faults)?;
        sections.push(section);
        fault_cost_ns = Some(cost);
    }
    if selected(Bench::Startup) {
        sections.push(startup::run(&bins, plan.startup)?);
    }
    if selected(Bench::Memory) {
        sections.push(memory::run(&bins, &bench_dir, plan.memory)?);
    }
    if selected(Bench::Build) {
        sections.push(match plan.build {
            Some(reps) => realbuild::run(&bins, &bench_dir.join("realbuild"), reps, fault_cost_ns)?,
            None => realbuild::skipped_section(),
        });
    }

    if selected(Bench::Accuracy) {
        sections.push(accuracy::run(&bins, &bench_dir, plan.accuracy)?);
    }

    let mut report = machine::header(options.quick, started.elapsed(), &cpu_at_start)?;
    for section in sections {
        report.push('\n');
        report.push_str(&section);
    }
    print!("{report}");
    let path = bench_dir.join("results.md");
    std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "xtask: bench: benchmarks done in {:.0} s; results in {}",
        started.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(())
}

/// Where cargo put the release binaries: `$CARGO_TARGET_DIR` (relative to the workspace root,
/// where xtask runs cargo), else `target/` in the workspace.
fn target_dir() -> PathBuf {
    let root = cargo::workspace_root();
    match std::env::var_os("CARGO_TARGET_DIR").filter(|dir| !dir.is_empty()) {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}
