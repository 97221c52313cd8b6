//! Nx end to end: `tracer run --tasks -- npx nx run-many -t build` prints one `nx run P:build` line per
//! task, each with its peak.
//!
//! Each package's build runs the workload, which sums the VmRSS of its whole task (from the topmost
//! process carrying NX_TASK_TARGET_PROJECT: Nx's task process, npm, the shell, itself) while it holds
//! its memory. `cargo xtask test` prepares the workspace (`npm install nx@24`, from
//! `tests/nx-workspace`) and names it in TRACER_NX_WORKSPACE.

mod common;
use common::{assert_matches_oracle, tracer, workload};
use serde_json::Value;
use std::{collections::HashMap, process::Command};

#[test]
fn nx_run_many_reports_each_task_in_nx_terms() {
    require_ebpf!();
    let Some(workspace) = std::env::var_os("TRACER_NX_WORKSPACE") else {
        assert!(
            std::env::var("TRACER_REQUIRE_EBPF").as_deref() != Ok("1"),
            "TRACER_NX_WORKSPACE is not set: run the tests with `cargo xtask test`"
        );
        eprintln!("nx test: SKIPPED: TRACER_NX_WORKSPACE not set (`cargo xtask test` prepares it)");
        return;
    };
    let json = std::env::temp_dir().join(format!("tracer-nx-{}.jsonl", std::process::id()));
    let output = Command::new(tracer())
        .args(["run", "--tasks", "--json"])
        .arg(&json)
        .args([
            "--",
            "npx",
            "nx",
            "run-many",
            "-t",
            "build",
            "--skip-nx-cache",
            "--output-style=static",
        ])
        .current_dir(&workspace)
        .env("NX_NO_CLOUD", "true")
        .env("NX_DAEMON", "false")
        .env("WORKLOAD", workload())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    // The workloads' oracle lines, in Nx's output, by task root pid.
    let oracles: HashMap<u64, u64> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.find("{\"scenario\"").map(|start| &line[start..]))
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .map(|oracle| {
            (
                oracle["pids"][0].as_u64().unwrap(),
                oracle["oracle_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    let text = std::fs::read_to_string(&json).unwrap();
    let _ = std::fs::remove_file(&json);
    let tasks: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|line| {
            line["kind"] == "task" && line["label"].as_str().unwrap().starts_with("nx run ")
        })
        .collect();
    let mut labels: Vec<&str> = tasks
        .iter()
        .map(|task| task["label"].as_str().unwrap())
        .collect();
    labels.sort_unstable();
    assert_eq!(
        labels,
        [
            "nx run alpha:build",
            "nx run beta:build",
            "nx run gamma:build"
        ],
        "{stderr}"
    );
    for task in &tasks {
        let label = task["label"].as_str().unwrap();
        assert!(stderr.contains(&format!("✔  {label} (")), "{stderr}");
        assert_eq!(task["exit_code"], 0);
        assert_eq!(task["exact"], true, "{task}");
        let oracle = oracles[&task["pid"].as_u64().unwrap()];
        assert_matches_oracle(label, task["peak_rss_bytes"].as_u64().unwrap(), oracle);
    }
}
