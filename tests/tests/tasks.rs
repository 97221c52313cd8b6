//! Task runners: each task's own peak, reported as it ends (`tracer run --tasks`, `tracer attach`).
//!
//! GNU make runs recipes of known sizes, two at a time (overlapping); each recipe `exec`s the
//! workload, so the task's root process is the workload itself and its oracle is the task's truth.

mod common;
use common::{assert_matches_oracle, tracer, workload};
use serde_json::Value;
use std::{
    collections::HashMap,
    process::{Command, Stdio},
};

/// A Makefile whose targets hold `sizes` MiB each (target `fail` exits 2 after holding 8 MiB), after
/// an optional first step that only sleeps (so an attach can happen before the tasks start).
fn makefile(
    dir: &std::path::Path,
    sizes: &[u64],
    fail: bool,
    sleep_first: bool,
) -> std::path::PathBuf {
    let workload = workload();
    let names: Vec<String> = sizes.iter().map(|mib| format!("hold{mib}")).collect();
    let mut text = format!(
        "all: {}{}\n",
        names.join(" "),
        if fail { " fail" } else { "" }
    );
    let first = if sleep_first { "first" } else { "" };
    if sleep_first {
        text.push_str("first:\n\tsleep 1\n");
    }
    for (name, mib) in names.iter().zip(sizes) {
        text.push_str(&format!(
            "{name}: {first}\n\texec {} hold --mib {mib} --hold-ms 300\n",
            workload.display()
        ));
    }
    if fail {
        text.push_str(&format!(
            "fail: {first}\n\t{} hold --mib 8 --hold-ms 50 > /dev/null; exit 2\n",
            workload.display()
        ));
    }
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("Makefile");
    std::fs::write(&path, text).unwrap();
    path
}

/// The workloads' oracle lines, by pid.
fn oracles(stdout: &str) -> HashMap<u64, u64> {
    stdout
        .lines()
        .filter(|line| line.starts_with('{'))
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .map(|oracle| {
            (
                oracle["pids"][0].as_u64().unwrap(),
                oracle["oracle_bytes"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn json_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("no JSON lines at {}: {err}", path.display()))
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON line"))
        .collect()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("tracer-{name}-{}", std::process::id()))
}

#[test]
fn run_tasks_reports_every_make_recipe_with_its_own_peak() {
    require_ebpf!();
    let dir = temp_dir("make-run");
    let sizes = [40, 120, 64, 200];
    let makefile = makefile(&dir, &sizes, true, false);
    let json = dir.join("tasks.jsonl");
    let output = Command::new(tracer())
        .args(["run", "--tasks", "--json"])
        .arg(&json)
        .args(["--", "make", "-s", "-j2", "-f"])
        .arg(&makefile)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "make's status passes through: {stderr}"
    );
    let lines = json_lines(&json);
    let tasks: Vec<&Value> = lines.iter().filter(|line| line["kind"] == "task").collect();
    let oracles = oracles(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(tasks.len(), sizes.len() + 1, "{stderr}");
    for task in &tasks {
        let pid = task["pid"].as_u64().unwrap();
        let label = task["label"].as_str().unwrap();
        let peak = task["peak_rss_bytes"].as_u64().unwrap();
        // The label is the command line read when the task started: racy for a recipe that
        // execs at once, so tasks are told apart by pid and exit status.
        if task["exit_code"] == 2 {
            assert!(stderr.contains(&format!("✖  {label} (")), "{stderr}");
            continue;
        }
        assert_eq!(task["exit_code"], 0, "{task}");
        assert_eq!(task["exact"], true, "{task}");
        assert!(stderr.contains(&format!("✔  {label} (")), "{stderr}");
        let oracle = oracles
            .get(&pid)
            .unwrap_or_else(|| panic!("no oracle for task {pid}: {label}"));
        assert_matches_oracle(label, peak, *oracle);
    }
    let run = lines.last().unwrap();
    assert_eq!(run["kind"], "run");
    assert_eq!(run["exit_code"], 2);
    // Two recipes at a time: the whole tree's peak is above any single task's, below all of them.
    let largest = tasks
        .iter()
        .map(|task| task["peak_rss_bytes"].as_u64().unwrap())
        .max()
        .unwrap();
    let sum: u64 = tasks
        .iter()
        .map(|task| task["peak_rss_bytes"].as_u64().unwrap())
        .sum();
    let whole = run["peak_rss_bytes"].as_u64().unwrap();
    assert!(
        whole > largest && whole < sum,
        "whole {whole}, largest task {largest}, sum {sum}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn attach_to_make_reports_every_task_then_the_whole_tree() {
    require_ebpf!();
    let dir = temp_dir("make-attach");
    let sizes = [48, 96, 150];
    let makefile = makefile(&dir, &sizes, false, true);
    let mut make = Command::new("make")
        .args(["-s", "-j2", "-f"])
        .arg(&makefile)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let json = dir.join("attach.jsonl");
    // make's first step sleeps a second: tracer attaches before any holding recipe starts.
    let attach = Command::new(tracer())
        .arg("attach")
        .arg(make.id().to_string())
        .arg("--json")
        .arg(&json)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let make_out = std::io::read_to_string(make.stdout.take().unwrap()).unwrap();
    assert!(make.wait().unwrap().success());
    let attach = attach.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&attach.stderr);
    assert!(
        attach.status.success(),
        "attach exits 0 when the runner exits: {stderr}"
    );
    let lines = json_lines(&json);
    let oracles = oracles(&make_out);
    // Tasks are told apart by pid: the holding recipes are those with an oracle (the other is the
    // first step's `sleep`).
    let holding: Vec<&Value> = lines
        .iter()
        .filter(|line| {
            line["kind"] == "task" && oracles.contains_key(&line["pid"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(holding.len(), sizes.len(), "{stderr}");
    for task in holding {
        let pid = task["pid"].as_u64().unwrap();
        let label = task["label"].as_str().unwrap();
        assert_eq!(task["exact"], true, "started after the attach: {task}");
        assert_matches_oracle(
            label,
            task["peak_rss_bytes"].as_u64().unwrap(),
            oracles[&pid],
        );
    }
    let runner = lines.last().unwrap();
    assert_eq!(runner["kind"], "attach");
    assert!(
        stderr
            .lines()
            .any(|line| line.starts_with("✔  make -s -j2 -f ")),
        "{stderr}"
    );
    // The runner ran before the attach: its report says what it cannot know.
    assert_eq!(runner["exact"], false);
    assert!(
        runner["inexact_reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("attached_while_running")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tasks_with_the_polling_backend() {
    // No privileges needed; held for 15+ intervals, so polling sees each task's memory.
    let dir = temp_dir("make-poll");
    let sizes = [40, 80];
    let makefile = makefile(&dir, &sizes, false, false);
    let json = dir.join("tasks.jsonl");
    let output = Command::new(tracer())
        .args([
            "run",
            "--tasks",
            "--backend",
            "poll",
            "--interval",
            "20",
            "--json",
        ])
        .arg(&json)
        .args(["--", "make", "-s", "-j2", "-f"])
        .arg(&makefile)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let oracles = oracles(&String::from_utf8_lossy(&output.stdout));
    let lines = json_lines(&json);
    let tasks: Vec<&Value> = lines.iter().filter(|line| line["kind"] == "task").collect();
    assert_eq!(tasks.len(), sizes.len(), "{stderr}");
    for task in tasks {
        let label = task["label"].as_str().unwrap();
        assert_eq!(task["exact"], false);
        assert_eq!(task["exit_code"], Value::Null, "polling cannot know it");
        assert!(stderr.contains(&format!("•  {label} (")), "{stderr}");
        let peak = task["peak_rss_bytes"].as_u64().unwrap();
        let oracle = oracles[&task["pid"].as_u64().unwrap()];
        assert!(
            peak.abs_diff(oracle) <= oracle / 50,
            "{label}: poll {peak} vs oracle {oracle} (2%)"
        );
    }
    assert_eq!(lines.last().unwrap()["backend"], "poll");
    let _ = std::fs::remove_dir_all(&dir);
}
