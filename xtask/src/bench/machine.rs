//! The machine and the build the results come from: the head of the report.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::cargo;

/// Busy CPU time of the whole machine and of this process with its descendants, to tell how
/// much else ran during the benchmarks.
pub struct CpuUse {
    machine: f64,
    ours: f64,
}

impl CpuUse {
    pub fn now() -> Result<CpuUse> {
        // `cpu  user nice system idle iowait irq softirq steal guest guest_nice`, in clock ticks;
        // guest time is already part of user.
        let stat = read("/proc/stat")?;
        let ticks: Vec<f64> = stat
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("cpu "))
            .context("no `cpu` line in /proc/stat")?
            .split_whitespace()
            .map(|field| field.parse().unwrap_or(0.0))
            .collect();
        let busy: f64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| ticks.get(i)).sum();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let mut ours = 0.0;
        for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
            // SAFETY: rusage is plain old data; getrusage writes into it.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: the pointer is valid for writes.
            unsafe { libc::getrusage(who, &mut usage) };
            for t in [usage.ru_utime, usage.ru_stime] {
                ours += t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            }
        }
        Ok(CpuUse {
            machine: busy / hz,
            ours,
        })
    }

    /// CPU seconds spent outside this process tree since `start`.
    pub fn others_since(&self, start: &CpuUse) -> f64 {
        ((self.machine - start.machine) - (self.ours - start.ours)).max(0.0)
    }
}

/// Other processes' CPU use below which the machine counts as quiet, in CPUs.
const QUIET_CPUS: f64 = 0.25;
/// How long one wait for quiet may last before measuring anyway.
const PATIENCE: Duration = Duration::from_secs(30);
/// How long all the waits of a run together may last, so that a busy machine delays the run by
/// minutes, not by the patience times the repetitions.
const WAIT_BUDGET: Duration = Duration::from_secs(180);
/// Time waited so far, beyond the one-second sample every wait takes.
static WAITED_MS: AtomicU64 = AtomicU64::new(0);

/// Waits until other processes (and kernel threads) use less than [`QUIET_CPUS`] over one
/// second, or [`PATIENCE`] (or what is left of [`WAIT_BUDGET`]) has passed; says so on stderr
/// when it waited.
pub fn wait_for_quiet() -> Result<()> {
    let sample = Duration::from_secs(1);
    let waited = Duration::from_millis(WAITED_MS.load(Ordering::Relaxed));
    let patience = PATIENCE.min(WAIT_BUDGET.saturating_sub(waited));
    let start = Instant::now();
    let others = loop {
        let before = CpuUse::now()?;
        std::thread::sleep(sample);
        let others = CpuUse::now()?.others_since(&before);
        if others < QUIET_CPUS || start.elapsed() >= patience {
            break others;
        }
    };
    let elapsed = start.elapsed();
    let extra = elapsed.saturating_sub(sample);
    WAITED_MS.fetch_add(extra.as_millis() as u64, Ordering::Relaxed);
    if others >= QUIET_CPUS {
        eprintln!(
            "xtask: bench: warning: other processes still use {:.0}% of a CPU after {:.0} s; \
             measuring anyway",
            others * 100.0,
            elapsed.as_secs_f64()
        );
    } else if extra > sample {
        eprintln!(
            "xtask: bench: the machine is quiet again after {:.0} s",
            elapsed.as_secs_f64()
        );
    }
    Ok(())
}

/// `elapsed` and `cpu_at_start`: since the benchmarks started (after the build).
pub fn header(quick: bool, elapsed: Duration, cpu_at_start: &CpuUse) -> Result<String> {
    let others = CpuUse::now()?.others_since(cpu_at_start);
    let kernel = read("/proc/sys/kernel/osrelease")?;
    let cpuinfo = read("/proc/cpuinfo")?;
    let cpu = cpuinfo
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == "model name").then(|| value.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = read("/proc/meminfo")?;
    let mem_gib = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or_else(
            || "? GiB".to_string(),
            |kib| format!("{:.1} GiB", kib / f64::from(1 << 20)),
        );
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .ok()
        .and_then(|text| {
            let start = text.find('[')?;
            let end = text[start..].find(']')?;
            Some(text[start + 1..start + end].to_string())
        })
        .unwrap_or_else(|| "unknown".to_string());
    let revision = Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(cargo::workspace_root())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    let run = if quick {
        "quick (`cargo xtask bench --quick`: fewer repetitions, smoke run only)"
    } else {
        "full (`cargo xtask bench`)"
    };
    Ok(format!(
        "## Results\n\n\
         - Machine: Linux {kernel}, {cpu}, {cpus} CPUs, {mem_gib} RAM; transparent huge pages: {thp}.\n\
         - tracer: revision {revision}, release build.\n\
         - Run: {run}; the benchmarks took {:.1} min. Meanwhile other processes and kernel \
         threads used {others:.0} CPU-seconds ({:.0}% of one CPU): other work on the machine \
         shows here.\n",
        elapsed.as_secs_f64() / 60.0,
        100.0 * others / elapsed.as_secs_f64(),
    ))
}

fn read(path: &str) -> Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {path}"))?
        .trim()
        .to_string())
}
