//! The Nx workspace of the end-to-end test: `tests/nx-workspace` copied to `target/nx-e2e` with
//! `npm install` (nx@24 from the npm registry), once; later calls reuse it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::{cargo, cmd};

pub fn prepare_workspace() -> Result<PathBuf> {
    let root = cargo::workspace_root();
    let fixture = root.join("tests/nx-workspace");
    let target = root.join("target/nx-e2e");
    copy_dir(&fixture, &target)?;
    if target.join("node_modules/nx/package.json").exists() {
        eprintln!("xtask: Nx test workspace: present ({})", target.display());
        return Ok(target);
    }
    let mut install = Command::new("npm");
    install
        .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&target);
    eprintln!(
        "xtask: installing Nx for the end-to-end test ({} in {})",
        cmd::display(&install),
        target.display()
    );
    cmd::run(&mut install).context("npm install (needs Node.js and npm, and the npm registry)")?;
    Ok(target)
}

/// Copies the fixture's files over (node_modules stays).
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let destination = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &destination)?;
        } else {
            std::fs::copy(entry.path(), &destination)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}
