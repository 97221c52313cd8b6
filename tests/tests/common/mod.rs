#![allow(dead_code)] // each test file uses its own part of the harness
//! Shared helpers for tracer's integration tests: finding the binaries, running the ground-truth
//! `workload` under `tracer run`, and comparing tracer's peak with the workload's own oracle.

use serde_json::Value;
use std::{
    path::PathBuf,
    process::{Command, Output},
};

/// Tolerance of a peak against its oracle: max(1%, 1 MiB). The oracle is the summed VmRSS read while
/// the workload holds its memory (exact counter sums on >= 6.2); tracer's peak may exceed it by what
/// the processes touch around that moment (the parent reading /proc, a pipe write, stack growth), a
/// few pages, and by skew between CPUs of a few pages. 1 MiB covers that for small trees; 1% covers
/// per-process runtime noise (allocator arenas, page tables are not RSS) in big ones.
pub fn tolerance(oracle: u64) -> u64 {
    (oracle / 100).max(1 << 20)
}

/// Asserts `|peak - oracle| <= tolerance(oracle)`.
pub fn assert_matches_oracle(what: &str, peak: u64, oracle: u64) {
    let tolerance = tolerance(oracle);
    let diff = peak.abs_diff(oracle);
    assert!(
        diff <= tolerance,
        "{what}: tracer peak {peak} B vs oracle {oracle} B: off by {diff} B ({:+.2}%), tolerance {tolerance} B",
        (peak as f64 - oracle as f64) / oracle as f64 * 100.0
    );
}

/// Path of the `workload` binary.
pub fn workload() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_workload"))
}

/// Path of the `tracer` binary, built next to `workload` (`cargo xtask test` builds both).
pub fn tracer() -> PathBuf {
    let path = workload().with_file_name("tracer");
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo xtask test` does: cargo build --workspace)",
        path.display()
    );
    path
}

/// Whether this process can run the eBPF backend. Without it a test skips, unless
/// `TRACER_REQUIRE_EBPF=1`, which turns the skip into a failure (CI sets it).
pub fn ebpf_available(test: &str) -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var("TRACER_REQUIRE_EBPF").as_deref() == Ok("1") {
        panic!(
            "{test}: eBPF is required (TRACER_REQUIRE_EBPF=1) but this test does not run as root"
        );
    }
    eprintln!("{test}: SKIPPED: needs root for eBPF (set TRACER_REQUIRE_EBPF=1 to fail instead)");
    false
}

/// Returns from the test when eBPF cannot run here (a failure instead with TRACER_REQUIRE_EBPF=1).
#[macro_export]
macro_rules! require_ebpf {
    () => {
        if !common::ebpf_available(module_path!()) {
            return;
        }
    };
}

/// One `tracer run --json` of a command: tracer's report, the command's stdout, the raw output.
pub struct Traced {
    pub report: Value,
    pub stdout: String,
    pub output: Output,
}

impl Traced {
    pub fn peak(&self) -> u64 {
        self.report["peak_rss_bytes"]
            .as_u64()
            .expect("peak_rss_bytes in report")
    }

    /// The workload's oracle line (the last JSON line it printed).
    pub fn oracle(&self) -> Value {
        let line = self.stdout.lines().rev().find(|line| line.starts_with('{'));
        serde_json::from_str(line.unwrap_or_else(|| panic!("no oracle line in {:?}", self.stdout)))
            .expect("oracle JSON")
    }

    pub fn oracle_bytes(&self) -> u64 {
        self.oracle()["oracle_bytes"]
            .as_u64()
            .expect("oracle_bytes")
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// Asserts the run succeeded, was exact and that its peak matches the workload's oracle.
    pub fn assert_exact_peak(&self, what: &str) {
        assert!(
            self.output.status.success(),
            "{what}: tracer failed: {}",
            self.stderr()
        );
        assert_eq!(
            self.report["exact"], true,
            "{what}: inexact: {}",
            self.report["inexact_reasons"]
        );
        assert_matches_oracle(what, self.peak(), self.oracle_bytes());
    }
}

/// Runs `tracer run --json FILE -- args...` and parses the report.
pub fn tracer_run(args: &[&str]) -> Traced {
    tracer_run_with(&[], args)
}

/// Runs `tracer run OPTIONS --json FILE -- args...` and parses the report.
pub fn tracer_run_with(options: &[&str], args: &[&str]) -> Traced {
    let dir = std::env::temp_dir().join(format!("tracer-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json = dir.join(format!("report-{}.json", unique()));
    let output = Command::new(tracer())
        .arg("run")
        .args(options)
        .arg("--json")
        .arg(&json)
        .arg("--")
        .args(args)
        .output()
        .expect("running tracer");
    let text = std::fs::read_to_string(&json).unwrap_or_else(|err| {
        panic!(
            "no report from `tracer run -- {}` ({err}); stderr: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let _ = std::fs::remove_file(&json);
    Traced {
        report: serde_json::from_str(&text).expect("report JSON"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        output,
    }
}

/// `tracer run` of the workload binary with `args`.
pub fn trace_workload(args: &[&str]) -> Traced {
    trace_workload_with(&[], args)
}

/// `tracer run OPTIONS` of the workload binary with `args`.
pub fn trace_workload_with(options: &[&str], args: &[&str]) -> Traced {
    let workload = workload();
    let mut all = vec![workload.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    tracer_run_with(options, &all)
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::SeqCst)
}
