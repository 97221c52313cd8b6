//! `tracer run` as a user meets it: exit statuses, signals, stdio, the report, clear errors.

mod common;
use common::{tracer, tracer_run};
use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

#[test]
fn exit_code_passes_through_and_failure_is_marked() {
    require_ebpf!();
    let run = tracer_run(&["sh", "-c", "exit 7"]);
    assert_eq!(run.output.status.code(), Some(7));
    assert_eq!(run.report["exit_code"], 7);
    assert_eq!(run.report["signal"], serde_json::Value::Null);
    assert!(
        run.stderr().contains("✖  sh -c 'exit 7' ("),
        "{}",
        run.stderr()
    );
    let ok = tracer_run(&["true"]);
    assert_eq!(ok.output.status.code(), Some(0));
    let line = ok.stderr();
    assert!(
        line.starts_with("✔  true (") && line.contains("(peak: "),
        "{line}"
    );
}

#[test]
fn death_by_signal_is_128_plus_n() {
    require_ebpf!();
    let run = tracer_run(&["sh", "-c", "kill -KILL $$"]);
    assert_eq!(run.output.status.code(), Some(137));
    assert_eq!(run.report["signal"], 9);
    assert_eq!(run.report["exit_code"], 137);
}

#[test]
fn report_schema() {
    require_ebpf!();
    let run = tracer_run(&["true"]);
    let report = &run.report;
    for key in [
        "command",
        "exit_code",
        "signal",
        "duration_ms",
        "peak_rss_bytes",
        "peak_breakdown",
        "peak_swap_bytes",
        "processes",
        "backend",
        "exact",
        "inexact_reasons",
        "kernel",
    ] {
        assert!(report.get(key).is_some(), "missing `{key}` in {report}");
    }
    assert_eq!(report["backend"], "ebpf");
    assert_eq!(report["command"], serde_json::json!(["true"]));
    let breakdown = &report["peak_breakdown"];
    let sum: u64 = ["anon_bytes", "file_bytes", "shmem_bytes"]
        .iter()
        .map(|key| breakdown[key].as_u64().unwrap())
        .sum();
    assert_eq!(
        sum,
        report["peak_rss_bytes"].as_u64().unwrap(),
        "breakdown of a 1-process run"
    );
    assert!(
        report["peak_rss_bytes"].as_u64().unwrap() > 100_000,
        "even `true` maps some pages"
    );
}

#[test]
fn json_to_stdout_follows_the_commands_output() {
    require_ebpf!();
    let output = Command::new(tracer())
        .args(["run", "--json", "-", "--", "echo", "hello"])
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let (first, rest) = stdout.split_once('\n').unwrap();
    assert_eq!(first, "hello");
    let report: serde_json::Value = serde_json::from_str(rest).unwrap();
    assert_eq!(report["exit_code"], 0);
}

#[test]
fn stdin_passes_through() {
    require_ebpf!();
    let mut child = Command::new(tracer())
        .args(["run", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"through\n").unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.stdout, b"through\n");
    assert!(output.status.success());
}

#[test]
fn command_not_found_is_127_and_not_executable_is_126() {
    // No privileges needed: the command is checked before anything is loaded.
    let output = Command::new(tracer())
        .args(["run", "--", "tracer-no-such-command"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(127));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("tracer-no-such-command: command not found")
    );

    let dir = std::env::temp_dir().join(format!("tracer-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let output = Command::new(tracer())
        .arg("run")
        .arg("--")
        .arg(&script)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(126));
    assert!(String::from_utf8_lossy(&output.stderr).contains("Permission denied"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts `tracer run --json FILE -- CMD`, waits until CMD runs, sends `signal` to tracer alone.
fn signal_tracer(signal: i32, command: &[&str]) -> (std::process::Output, serde_json::Value) {
    let json = std::env::temp_dir().join(format!(
        "tracer-signal-{}-{signal}.json",
        std::process::id()
    ));
    let child = Command::new(tracer())
        .arg("run")
        .arg("--json")
        .arg(&json)
        .arg("--")
        .args(command)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Wait until the command has been exec'd (tracer's child is no longer a copy of tracer).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        let exec_done = children.split_whitespace().any(|child| {
            std::fs::read_to_string(format!("/proc/{child}/comm"))
                .is_ok_and(|comm| comm.trim() == command[0])
        });
        if exec_done {
            break;
        }
        assert!(Instant::now() < deadline, "command never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    unsafe { libc::kill(pid as i32, signal) };
    let output = child.wait_with_output().unwrap();
    let report =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("report written")).unwrap();
    let _ = std::fs::remove_file(&json);
    (output, report)
}

#[test]
fn sigterm_and_sigint_sent_to_tracer_reach_the_command_and_the_report_is_still_written() {
    require_ebpf!();
    for (signal, expected) in [
        (libc::SIGTERM, 143),
        (libc::SIGINT, 130),
        (libc::SIGHUP, 129),
    ] {
        let (output, report) = signal_tracer(signal, &["sleep", "30"]);
        assert_eq!(output.status.code(), Some(expected), "signal {signal}");
        assert_eq!(report["signal"], signal);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("✖  sleep 30 ("), "{stderr}");
    }
}

/// `tracer run OPTIONS --json - -- CMD` as uid/gid 65534 without capabilities; JSON on stdout.
fn run_unprivileged(options: &[&str], command: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(tracer())
        .arg("run")
        .args(options)
        .args(["--json", "-", "--"])
        .args(command)
        .output()
        .expect("setpriv (util-linux)")
}

#[test]
fn unprivileged_user_falls_back_to_polling_and_says_why() {
    require_ebpf!(); // needs root to become someone else
    let workload = common::workload();
    let output = run_unprivileged(
        &[],
        &[
            workload.to_str().unwrap(),
            "hold",
            "--mib",
            "64",
            "--hold-ms",
            "1500",
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let fallback = stderr.lines().next().unwrap_or_default();
    assert!(
        fallback.contains("eBPF unavailable")
            && fallback.contains("CAP_BPF")
            && fallback.contains("polling every 100 ms"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let (oracle_line, report) = stdout
        .split_once('\n')
        .expect("oracle line, then the report");
    let oracle: serde_json::Value = serde_json::from_str(oracle_line).unwrap();
    let report: serde_json::Value = serde_json::from_str(report).unwrap();
    assert_eq!(report["backend"], "poll");
    assert_eq!(report["exact"], false);
    assert_eq!(report["interval_ms"], 100);
    assert!(report["samples"].as_u64().unwrap() >= 10);
    // Held for 15 intervals: polling sees it, within 2%.
    let (peak, truth) = (
        report["peak_rss_bytes"].as_u64().unwrap(),
        oracle["oracle_bytes"].as_u64().unwrap(),
    );
    assert!(
        peak.abs_diff(truth) <= truth / 50,
        "poll peak {peak} vs oracle {truth}"
    );
}

#[test]
fn unprivileged_user_asking_for_ebpf_gets_the_reason() {
    require_ebpf!(); // needs root to become someone else
    let output = run_unprivileged(&["--backend", "ebpf"], &["true"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("CAP_BPF") && stderr.contains("sudo"),
        "{stderr}"
    );
}
