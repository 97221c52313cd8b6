//! The library API (`MemoryTracker`): several trees in one tracker, tracking a process that is already
//! running, and nothing left in the kernel maps afterwards.

mod common;
use common::{assert_matches_oracle, workload};
use std::{
    ffi::OsString,
    process::{Command, Stdio},
    time::Duration,
};
use tracer::{BackendChoice, BackendKind, MemoryTracker, TrackerOptions};

fn ebpf_tracker() -> MemoryTracker {
    let options = TrackerOptions {
        backend: BackendChoice::Ebpf,
        ..TrackerOptions::default()
    };
    let tracker = MemoryTracker::with_options(options).expect("loading the eBPF backend");
    assert_eq!(tracker.backend(), BackendKind::Ebpf);
    tracker
}

fn oracle_of(stdout: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(stdout);
    let line = text
        .lines()
        .rev()
        .find(|line| line.starts_with('{'))
        .expect("oracle line");
    let oracle: serde_json::Value = serde_json::from_str(line).expect("oracle JSON");
    oracle["oracle_bytes"].as_u64().expect("oracle_bytes")
}

#[test]
fn tracked_pid_tree_is_exact_and_leaves_no_map_entries() {
    require_ebpf!();
    let mut tracker = ebpf_tracker();
    assert_eq!(tracker.kernel_map_entries(), Some((0, 0)), "fresh maps");
    assert_eq!(
        tracker.program_stats().len(),
        4,
        "kernel program info readable"
    );

    // The shell is tracked while running; it forks `sleep`, then execs the workload, which forks 3
    // children holding 96 MiB each.
    let script = format!(
        "sleep 0.3; exec {} together --children 3 --mib 96",
        workload().display()
    );
    let child = Command::new("sh")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    tracker.start_tracking(pid).expect("start_tracking");
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    // Before any clean-up by stop_tracking: the kernel side forgot every task and address space of
    // the tree by itself as each exited and was torn down.
    assert_eq!(
        tracker.kernel_map_entries(),
        Some((0, 0)),
        "entries of an exited tree remain"
    );
    let report = tracker.stop_tracking(pid).expect("report");
    assert!(report.exact, "{:?}", report.inexact_reasons);
    assert_eq!(report.backend, "ebpf");
    assert_eq!(report.exit_code, None, "not the parent: unknown");
    assert_eq!(
        report.processes, 5,
        "sh (exec'd into the workload), sleep, and 3 children"
    );
    assert_matches_oracle(
        "3 x 96 MiB under a tracked pid",
        report.peak_rss_bytes,
        oracle_of(&output.stdout),
    );
    assert!(tracker.stop_tracking(pid).is_none(), "stopped already");
}

#[test]
fn runs_in_one_tracker_are_independent() {
    require_ebpf!();
    let mut tracker = ebpf_tracker();
    let oracle_file =
        std::env::temp_dir().join(format!("tracer-lib-oracle-{}", std::process::id()));
    let mut run = |args: &str| {
        let script = format!(
            "exec {} {args} > {}",
            workload().display(),
            oracle_file.display()
        );
        let command: Vec<OsString> = ["sh", "-c", &script].iter().map(OsString::from).collect();
        let report = tracer::run::run(&mut tracker, &command).expect("run");
        let oracle = oracle_of(&std::fs::read(&oracle_file).expect("oracle file"));
        (report, oracle)
    };
    let (big, big_oracle) = run("together --children 2 --mib 128");
    assert_eq!(big.exit_code, Some(0));
    assert!(big.exact, "{:?}", big.inexact_reasons);
    assert_matches_oracle("first run, 2 x 128 MiB", big.peak_rss_bytes, big_oracle);
    // A smaller second run in the same tracker gets a clean slate: its own peak, not the first's.
    let (small, small_oracle) = run("hold --mib 48 --hold-ms 50");
    assert!(small.exact, "{:?}", small.inexact_reasons);
    assert_matches_oracle("second run, 48 MiB", small.peak_rss_bytes, small_oracle);
    assert_eq!(small.processes, 1);
    assert_eq!(tracker.kernel_map_entries(), Some((0, 0)));
    let _ = std::fs::remove_file(&oracle_file);
}

#[test]
fn memory_held_before_tracking_starts_is_counted_once() {
    require_ebpf!();
    let mut tracker = ebpf_tracker();
    // The workload maps and touches 120 MiB at once, then holds it: start tracking while it holds.
    let child = Command::new(workload())
        .args(["hold", "--mib", "120", "--hold-ms", "1200"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let pid = child.id();
    tracker.start_tracking(pid).expect("start_tracking");
    let now = tracker.peek(pid).expect("peek");
    assert!(
        now.rss_bytes > 120 << 20,
        "seeded with the running process's RSS: {now:?}"
    );
    assert!(now.peak_rss_bytes as i64 >= now.rss_bytes);
    let output = child.wait_with_output().unwrap();
    let report = tracker.stop_tracking(pid).expect("report");
    assert!(report.exact, "{:?}", report.inexact_reasons);
    // Not twice: the first events of the bound mm move the tree by the change since the seed only.
    assert_matches_oracle(
        "120 MiB held when tracking started",
        report.peak_rss_bytes,
        oracle_of(&output.stdout),
    );
    assert_eq!(tracker.kernel_map_entries(), Some((0, 0)));
}

#[test]
fn descendants_left_running_are_removed_from_the_maps() {
    require_ebpf!();
    let mut tracker = ebpf_tracker();
    // The shell exits at once, leaving a background sleep (and its address space) behind.
    let command: Vec<OsString> = ["sh", "-c", "sleep 2 & exit 0"]
        .iter()
        .map(OsString::from)
        .collect();
    let report = tracer::run::run(&mut tracker, &command).expect("run");
    assert_eq!(report.still_running, 1, "the background sleep");
    assert_eq!(
        tracker.kernel_map_entries(),
        Some((0, 0)),
        "stop_tracking removes what is left"
    );
}

#[test]
fn many_pids_tracked_at_once_with_polling() {
    let options = TrackerOptions {
        backend: BackendChoice::Poll,
        interval: Duration::from_millis(20),
        tasks: None,
    };
    let mut tracker = MemoryTracker::with_options(options).expect("polling tracker");
    assert_eq!(tracker.backend(), BackendKind::Poll);
    let mut children: Vec<_> = [40, 80]
        .into_iter()
        .map(|mib| {
            let args = ["hold", "--mib", &mib.to_string(), "--hold-ms", "600"].map(String::from);
            let child = Command::new(workload())
                .args(args)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            tracker.start_tracking(child.id()).expect("start_tracking");
            (mib, child)
        })
        .collect();
    assert_eq!(tracker.tracked().count(), 2);
    for (mib, child) in children.drain(..) {
        let pid = child.id();
        let output = child.wait_with_output().unwrap();
        let report = tracker.stop_tracking(pid).expect("report");
        assert_eq!(report.backend, "poll");
        assert!(!report.exact);
        assert!(report.samples.unwrap() >= 10, "{report:?}");
        // Held for 30 intervals: polling sees it (within 2%).
        let oracle = oracle_of(&output.stdout);
        let diff = report.peak_rss_bytes.abs_diff(oracle);
        assert!(
            diff <= oracle / 50,
            "{mib} MiB: poll peak {} vs oracle {oracle}",
            report.peak_rss_bytes
        );
    }
}
