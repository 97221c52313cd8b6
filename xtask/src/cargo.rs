//! Running cargo for the workspace with the environment the BPF build needs.

use std::env;
use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd;

/// The BPF crate only builds for bpfel-unknown-none (tracer's build.rs builds it
/// with nightly), so host-side `--workspace` commands leave it out, as
/// `default-members` does.
const HOST_EXCLUDES: [&str; 2] = ["--exclude", "tracer-ebpf"];

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest dir has a parent")
}

/// A cargo command for the workspace: the same cargo that runs xtask, with
/// `$CARGO_HOME/bin` first on PATH so tracer's build.rs finds bpf-linker.
pub fn command() -> Result<Command> {
    let program = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root())
        .env("PATH", cmd::path_with_prefix(&cmd::cargo_bin_dir()?)?);
    Ok(cmd)
}

fn say_running(cmd: &Command) {
    eprintln!("xtask: running {}", cmd::display(cmd));
}

pub fn build(release: bool) -> Result<()> {
    let mut cmd = command()?;
    cmd.args(["build", "--workspace"]).args(HOST_EXCLUDES);
    if release {
        cmd.arg("--release");
    }
    say_running(&cmd);
    cmd::run(&mut cmd)
}

/// Builds and runs tracer; returns the exit code to pass through.
pub fn run_tracer(release: bool, args: &[OsString]) -> Result<i32> {
    let mut cmd = command()?;
    cmd.args(["run", "--package", "tracer", "--bin", "tracer"]);
    if release {
        cmd.arg("--release");
    }
    cmd.arg("--").args(args);
    say_running(&cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run `{}`", cmd::display(&cmd)))?;
    // Like system(3): Ctrl-C goes to the whole foreground group, so let tracer
    // handle it and report its own status instead of xtask dying first. Set only
    // after spawning, so the child keeps the default dispositions.
    // SAFETY: installing SIG_IGN touches no Rust state.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{}`", cmd::display(&cmd)))?;
    Ok(cmd::exit_code(status))
}

/// fmt check, clippy, build the binaries, then test; stops at the first failure.
pub fn test(extra_args: &[OsString]) -> Result<()> {
    let mut fmt = command()?;
    fmt.args(["fmt", "--all", "--", "--check"]);
    let mut clippy = command()?;
    clippy
        .args(["clippy", "--workspace"])
        .args(HOST_EXCLUDES)
        .args(["--all-targets", "--", "-D", "warnings"]);
    // The integration tests expect tracer and workload side by side in target/debug.
    let mut bins = command()?;
    bins.args(["build", "--workspace"])
        .args(HOST_EXCLUDES)
        .arg("--bins");
    let nx_workspace = crate::nx::prepare_workspace()?;
    let mut tests = command()?;
    tests
        .args(["test", "--workspace"])
        .args(HOST_EXCLUDES)
        .args(extra_args)
        .env("TRACER_NX_WORKSPACE", &nx_workspace);
    // The BPF programs, linted as what they are: a nightly build for the BPF target.
    let mut bpf_clippy = Command::new("rustup");
    bpf_clippy
        .current_dir(workspace_root())
        .env("PATH", cmd::path_with_prefix(&cmd::cargo_bin_dir()?)?)
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--package",
            "tracer-ebpf",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--target-dir", "target/bpf-clippy", "--", "-D", "warnings"])
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-cpu=v3");
    // The stable toolchain of this xtask must not leak into the nightly one.
    for key in ["RUSTUP_TOOLCHAIN", "CARGO", "RUSTC", "RUSTFLAGS"] {
        bpf_clippy.env_remove(key);
    }
    // The library builds for macOS and Windows too (polling backend there).
    let mut cross = command()?;
    cross.args(["check", "--package", "tracer"]);
    for target in crate::setup::CROSS_TARGETS {
        cross.args(["--target", target]);
    }
    // The Node.js client against a real `tracer serve`.
    let target = workspace_root().join("target/debug");
    let mut node = Command::new("node");
    node.current_dir(workspace_root().join("integrations/node"))
        .args(["--test", "test/"])
        .env("TRACER_BIN", target.join("tracer"))
        .env("WORKLOAD_BIN", target.join("workload"))
        .env("TRACER_NX_WORKSPACE", &nx_workspace);

    let mut steps = [
        ("format check", fmt),
        ("clippy", clippy),
        ("clippy of the BPF programs", bpf_clippy),
        ("build binaries", bins),
        ("tests", tests),
        ("cross-platform check", cross),
        ("node client tests", node),
    ];
    let total = steps.len();
    for (i, (name, cmd)) in steps.iter_mut().enumerate() {
        eprintln!(
            "xtask: test step {}/{total} ({name}): {}",
            i + 1,
            cmd::display(cmd)
        );
        cmd::run(cmd).with_context(|| format!("test step `{name}` failed"))?;
    }
    eprintln!("xtask: all test steps passed");
    Ok(())
}
