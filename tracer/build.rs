//! Builds the BPF object (`tracer-ebpf`) from source with nightly and embeds it in the binary.
//!
//! aya-build 0.2 would do this, but it replaces `CARGO_ENCODED_RUSTFLAGS` wholesale, and the object
//! needs `-C target-cpu=v3`: with the generic CPU the BPF backend emits non-fetching atomics and the
//! verifier rejects the accounting ("Invalid usage of the XADD return value").

use anyhow::{Context as _, bail};
use std::{env, path::PathBuf, process::Command};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=TRACER_SKIP_EBPF_BUILD");
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return Ok(());
    }
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .context("tracer crate has no parent dir")?;
    for dir in [
        "tracer-ebpf/src",
        "tracer-ebpf/Cargo.toml",
        "tracer-common/src",
        "tracer-common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let target_dir = out_dir.join("ebpf-target");

    let rustflags = [
        "-Ctarget-cpu=v3".to_string(),
        "-Cdebuginfo=0".to_string(),
        // Keep the object independent of where the workspace sits.
        format!("--remap-path-prefix={}=.", workspace.display()),
    ]
    .join("\x1f");

    let mut cargo = Command::new("rustup");
    cargo
        .args(["run", "nightly", "cargo", "build", "--quiet", "--release"])
        .args(["--package", "tracer-ebpf", "--bin", "tracer-ebpf"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(workspace)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    // The outer (stable) build's settings must not leak into the nightly BPF build.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO",
        "RUSTUP_TOOLCHAIN",
    ] {
        cargo.env_remove(key);
    }
    let status = cargo.status().with_context(
        || "running `rustup run nightly cargo build` for the BPF object (is rustup installed?)",
    )?;
    if !status.success() {
        bail!(
            "building the BPF object failed ({status}; compiler output above). It needs the nightly \
             toolchain with rust-src and bpf-linker on PATH: `cargo xtask setup` installs them"
        );
    }
    let object = target_dir.join("bpfel-unknown-none/release/tracer-ebpf");
    std::fs::copy(&object, out_dir.join("tracer.bpf.o"))
        .with_context(|| format!("copying {}", object.display()))?;
    Ok(())
}
