//! `cargo xtask setup`: idempotently install what building the BPF object needs.
//!
//! Each step checks first and only installs what is missing, so re-running is cheap
//! and prints "present" for everything.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, cmd};

/// Debian packages bpf-linker's `llvm-22` feature links against.
const LLVM_PACKAGES: [&str; 3] = ["llvm-22-dev", "libpolly-22-dev", "libzstd-dev"];
/// bpf-linker's build script finds LLVM through `llvm-config` on PATH.
const LLVM_BIN_DIR: &str = "/usr/lib/llvm-22/bin";
const TRACEFS: &str = "/sys/kernel/tracing";
/// The other platforms the `tracer` crate must build for (CI checks them with `cargo check`).
pub const CROSS_TARGETS: [&str; 3] = [
    "x86_64-apple-darwin",
    "aarch64-apple-darwin",
    "x86_64-pc-windows-msvc",
];

pub fn run() -> Result<()> {
    let rustup = cmd::find_program("rustup")?.context(
        "rustup not found on PATH or in $CARGO_HOME/bin; install it from https://rustup.rs",
    )?;
    ensure_nightly(&rustup)?;
    ensure_rust_src(&rustup)?;
    ensure_bpf_linker()?;
    ensure_cross_targets(&rustup)?;
    check_tracefs();
    Ok(())
}

/// The standard libraries of `CROSS_TARGETS` for the default toolchain (`cargo check` needs them).
fn ensure_cross_targets(rustup: &Path) -> Result<()> {
    let installed = cmd::stdout(Command::new(rustup).args(["target", "list", "--installed"]))?;
    let missing: Vec<&str> = CROSS_TARGETS
        .into_iter()
        .filter(|target| !installed.lines().any(|line| line.trim() == *target))
        .collect();
    if missing.is_empty() {
        say("cross-check targets (macOS, Windows): present");
        return Ok(());
    }
    let mut add = Command::new(rustup);
    add.args(["target", "add"]).args(&missing);
    say(&format!(
        "installing cross-check targets ({})",
        cmd::display(&add)
    ));
    cmd::run(&mut add)
}

fn say(msg: &str) {
    // stderr, so `cargo xtask run -- ... > out` captures only tracer's stdout.
    eprintln!("xtask: {msg}");
}

fn ensure_nightly(rustup: &Path) -> Result<()> {
    let list = cmd::stdout(Command::new(rustup).args(["toolchain", "list"]))?;
    if list.lines().any(is_plain_nightly) {
        say("nightly toolchain: present");
        return Ok(());
    }
    let mut install = Command::new(rustup);
    install.args(["toolchain", "install", "nightly", "--profile", "minimal"]);
    say(&format!(
        "installing nightly toolchain ({})",
        cmd::display(&install)
    ));
    cmd::run(&mut install)
}

/// Matches `nightly-<host>` (what `+nightly` resolves to), not dated `nightly-2025-01-01-<host>`.
fn is_plain_nightly(line: &str) -> bool {
    let name = line.split_whitespace().next().unwrap_or("");
    name == "nightly"
        || name
            .strip_prefix("nightly-")
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

fn ensure_rust_src(rustup: &Path) -> Result<()> {
    let installed = cmd::stdout(Command::new(rustup).args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    // rust-src is target-independent, so it is listed without a target suffix.
    let present = installed
        .lines()
        .any(|l| l.split_whitespace().next() == Some("rust-src"));
    if present {
        say("rust-src for nightly: present");
        return Ok(());
    }
    let mut add = Command::new(rustup);
    add.args(["component", "add", "rust-src", "--toolchain", "nightly"]);
    say(&format!(
        "installing rust-src for nightly ({})",
        cmd::display(&add)
    ));
    cmd::run(&mut add)
}

enum Linker {
    Ok {
        path: PathBuf,
        version: String,
    },
    Missing,
    /// Installed but `--version` fails (e.g. its LLVM shared library is gone).
    Broken {
        path: PathBuf,
        reason: String,
    },
}

fn probe_bpf_linker() -> Result<Linker> {
    let Some(path) = cmd::find_program("bpf-linker")? else {
        return Ok(Linker::Missing);
    };
    let linker = match Command::new(&path).arg("--version").output() {
        Ok(out) if out.status.success() => Linker::Ok {
            version: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            path,
        },
        Ok(out) => Linker::Broken {
            reason: format!(
                "`bpf-linker --version` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            path,
        },
        Err(e) => Linker::Broken {
            reason: format!("cannot run it: {e}"),
            path,
        },
    };
    Ok(linker)
}

fn ensure_bpf_linker() -> Result<()> {
    let force = match probe_bpf_linker()? {
        Linker::Ok { path, version } => {
            say(&format!(
                "bpf-linker: present ({version}, {})",
                path.display()
            ));
            return Ok(());
        }
        Linker::Missing => {
            say("bpf-linker: missing");
            false
        }
        Linker::Broken { path, reason } => {
            say(&format!(
                "bpf-linker: {} is not runnable: {reason}",
                path.display()
            ));
            // `cargo install` skips a crate it thinks is already installed.
            true
        }
    };

    ensure_llvm_packages()?;

    let mut install = cargo::command()?;
    install.args([
        "install",
        "bpf-linker",
        "--no-default-features",
        "--features",
        "llvm-22",
    ]);
    if force {
        install.arg("--force");
    }
    let llvm_path = cmd::path_with_prefix(Path::new(LLVM_BIN_DIR))?;
    install.env("PATH", llvm_path);
    say(&format!(
        "installing bpf-linker (PATH={LLVM_BIN_DIR}:$PATH {})",
        cmd::display(&install)
    ));
    cmd::run(&mut install)?;

    match probe_bpf_linker()? {
        Linker::Ok { path, version } => {
            say(&format!(
                "bpf-linker: installed ({version}, {})",
                path.display()
            ));
            Ok(())
        }
        Linker::Missing => bail!(
            "`cargo install bpf-linker` succeeded but bpf-linker is not in $CARGO_HOME/bin or on PATH"
        ),
        Linker::Broken { path, reason } => bail!(
            "bpf-linker was installed but {} is not runnable: {reason}",
            path.display()
        ),
    }
}

fn ensure_llvm_packages() -> Result<()> {
    let missing = missing_packages()?;
    if missing.is_empty() {
        say("LLVM 22 dev packages: present");
        return Ok(());
    }
    let missing = missing.join(" ");
    if !cmd::is_root() {
        bail!(
            "building bpf-linker needs these packages, which are not installed: {missing}\n\
             run: sudo apt-get update && sudo apt-get install -y {missing}\n\
             then run `cargo xtask setup` again"
        );
    }

    let mut update = Command::new("apt-get");
    update.arg("update");
    say(&format!(
        "installing LLVM 22 dev packages ({})",
        cmd::display(&update)
    ));
    cmd::run(&mut update)?;

    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y"])
        .args(LLVM_PACKAGES)
        // Never stop at a debconf prompt.
        .env("DEBIAN_FRONTEND", "noninteractive");
    say(&format!(
        "installing LLVM 22 dev packages ({})",
        cmd::display(&install)
    ));
    cmd::run(&mut install)
}

/// The subset of `LLVM_PACKAGES` that dpkg does not report as `install ok installed`.
fn missing_packages() -> Result<Vec<&'static str>> {
    // `${Package}` labels each line: dpkg sorts its output and silently drops
    // packages it has never heard of (exiting 1), so a non-zero exit is expected.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(LLVM_PACKAGES)
        .output()
        .context(
            "cannot run dpkg-query to check for LLVM 22 dev packages; on a non-Debian system \
             install LLVM 22 and bpf-linker (`cargo install bpf-linker`) yourself",
        )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let installed = |pkg: &str| {
        stdout.lines().any(|line| {
            line.split_once(' ')
                .is_some_and(|(name, status)| name == pkg && status == "install ok installed")
        })
    };
    Ok(LLVM_PACKAGES
        .into_iter()
        .filter(|pkg| !installed(pkg))
        .collect())
}

/// Never fails: tracer reports a missing tracefs itself, with more context.
fn check_tracefs() {
    if Path::new(TRACEFS).join("events").exists() {
        say(&format!("tracefs: mounted at {TRACEFS}"));
        return;
    }
    let mut mount = Command::new("mount");
    mount.args(["-t", "tracefs", "tracefs", TRACEFS]);
    if !cmd::is_root() {
        say(&format!(
            "note: tracefs is not mounted at {TRACEFS} (as root: {}); tracer needs it at run time",
            cmd::display(&mount)
        ));
        return;
    }
    say(&format!("mounting tracefs ({})", cmd::display(&mount)));
    if let Err(err) = cmd::run(&mut mount) {
        say(&format!(
            "warning: could not mount tracefs, continuing: {err:#}"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::is_plain_nightly;

    #[test]
    fn nightly_detection() {
        assert!(is_plain_nightly("nightly-x86_64-unknown-linux-gnu"));
        assert!(is_plain_nightly(
            "nightly-x86_64-unknown-linux-gnu (active, default)"
        ));
        assert!(is_plain_nightly("nightly"));
        assert!(!is_plain_nightly(
            "nightly-2025-01-01-x86_64-unknown-linux-gnu"
        ));
        assert!(!is_plain_nightly("stable-x86_64-unknown-linux-gnu"));
        assert!(!is_plain_nightly("1.95.0-x86_64-unknown-linux-gnu"));
        assert!(!is_plain_nightly(""));
    }
}
