//! The library API: several runs in one tracker, and nothing left in the kernel maps afterwards.

mod common;
use common::{assert_matches_oracle, ebpf_available, workload};
use std::ffi::OsString;
use tracer::{ebpf::EbpfTracker, run::run_tracked, spawn::Exit};

/// Runs the workload through the library; its oracle goes to a file (`exec` keeps the shell out of
/// the tree). Returns the outcome and the oracle.
fn run_workload(tracker: &mut EbpfTracker, args: &str) -> (tracer::run::RunOutcome, u64) {
    let oracle_file =
        std::env::temp_dir().join(format!("tracer-lib-oracle-{}", std::process::id()));
    let script = format!(
        "exec {} {args} > {}",
        workload().display(),
        oracle_file.display()
    );
    let command: Vec<OsString> = ["sh", "-c", &script].iter().map(OsString::from).collect();
    let outcome = run_tracked(tracker, &command).expect("run_tracked");
    let text = std::fs::read_to_string(&oracle_file).expect("oracle file");
    let _ = std::fs::remove_file(&oracle_file);
    let oracle: serde_json::Value = serde_json::from_str(text.trim()).expect("oracle JSON");
    (
        outcome,
        oracle["oracle_bytes"].as_u64().expect("oracle_bytes"),
    )
}

#[test]
fn runs_in_one_tracker_are_independent_and_leave_no_map_entries() {
    if !ebpf_available(module_path!()) {
        return;
    }
    let mut tracker = EbpfTracker::load().expect("loading the eBPF backend");
    assert_eq!(tracker.map_entries(), (0, 0), "fresh maps");
    // The kernel's program info (run and miss counters) is readable for all four programs.
    assert_eq!(tracker.program_stats().len(), 4);

    let (big, big_oracle) = run_workload(&mut tracker, "together --children 3 --mib 96");
    assert_eq!(big.exit, Exit::Code(0));
    assert!(big.sample.exact, "{:?}", big.sample.inexact_reasons);
    assert_matches_oracle(
        "first run, 3 x 96 MiB",
        big.sample.peak_rss_bytes,
        big_oracle,
    );
    // The kernel side forgot every task and every address space of the tree by itself, as each exited
    // and was torn down; stop_tracking had nothing to clean.
    assert_eq!(big.sample.still_running, 0);
    assert_eq!(
        big.sample.leftover_mms, 0,
        "an mm of an exited tree stayed in the map"
    );
    assert_eq!(
        big.sample.rss_bytes, 0,
        "the tree total returns exactly to 0"
    );
    assert_eq!(tracker.map_entries(), (0, 0));

    // A smaller second run in the same tracker gets a clean slate: its own peak, not the first's.
    let (small, small_oracle) = run_workload(&mut tracker, "hold --mib 48 --hold-ms 50");
    assert!(small.sample.exact, "{:?}", small.sample.inexact_reasons);
    assert_matches_oracle(
        "second run, 48 MiB",
        small.sample.peak_rss_bytes,
        small_oracle,
    );
    assert_eq!(small.sample.processes, 1);
    assert_eq!(tracker.map_entries(), (0, 0));
}

#[test]
fn descendants_left_running_are_removed_from_the_maps() {
    if !ebpf_available(module_path!()) {
        return;
    }
    let mut tracker = EbpfTracker::load().expect("loading the eBPF backend");
    // The shell exits at once, leaving a background sleep (and its address space) behind.
    let command: Vec<OsString> = ["sh", "-c", "sleep 2 & exit 0"]
        .iter()
        .map(OsString::from)
        .collect();
    let outcome = run_tracked(&mut tracker, &command).expect("run_tracked");
    assert_eq!(outcome.sample.still_running, 1, "the background sleep");
    assert!(outcome.sample.leftover_mms >= 1);
    assert_eq!(
        tracker.map_entries(),
        (0, 0),
        "stop_tracking removes what is left"
    );
}
