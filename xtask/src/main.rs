//! Developer tasks for the tracer workspace: `cargo xtask <command>`.

mod bench;
mod cargo;
mod cmd;
mod nx;
mod setup;

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Development tasks for tracer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install (if missing) everything needed to build the BPF object.
    Setup,
    /// Run setup, then build the workspace.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Run setup, then build and run tracer; its exit code becomes ours.
    Run {
        /// Build and run with the release profile.
        #[arg(long)]
        release: bool,
        /// Arguments for tracer (after `--`).
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Run setup, then fmt check, clippy, build the binaries and run the tests.
    Test {
        /// Extra arguments for `cargo test` (after `--`; use a second `--` for libtest flags).
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Run setup, build release binaries and run the benchmarks (needs root); writes
    /// target/bench/results.md.
    Bench(bench::Options),
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            // `{:#}` prints the whole context chain on one line.
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Setup => setup::run()?,
        Command::Build { release } => {
            setup::run()?;
            cargo::build(release)?;
        }
        Command::Run { release, args } => {
            setup::run()?;
            let code = cargo::run_tracer(release, &args)?;
            // Pass tracer's exact status through (ExitCode only carries a u8).
            std::process::exit(code);
        }
        Command::Test { args } => {
            setup::run()?;
            cargo::test(&args)?;
        }
        Command::Bench(options) => {
            setup::run()?;
            bench::run(&options)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
