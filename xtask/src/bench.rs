//! `cargo xtask bench`: placeholder until the benchmark harness exists.

use std::process::ExitCode;

use anyhow::Result;

pub fn run() -> Result<ExitCode> {
    eprintln!("xtask: bench: not yet implemented");
    Ok(ExitCode::FAILURE)
}
