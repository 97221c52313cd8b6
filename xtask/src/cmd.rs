//! Helpers for finding and running external programs.

use std::env;
use std::ffi::{OsStr, OsString};
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use anyhow::{Context, Result, bail};

/// `$CARGO_HOME`, defaulting to `~/.cargo` like rustup and cargo do.
pub fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    let home = env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("neither CARGO_HOME nor HOME is set; cannot locate cargo's bin directory")?;
    Ok(Path::new(&home).join(".cargo"))
}

/// Where `cargo install` puts binaries (bpf-linker ends up here).
pub fn cargo_bin_dir() -> Result<PathBuf> {
    Ok(cargo_home()?.join("bin"))
}

/// `$PATH` with `dir` in front, for child processes.
pub fn path_with_prefix(dir: &Path) -> Result<OsString> {
    let rest = env::var_os("PATH").unwrap_or_default();
    let dirs = std::iter::once(dir.to_path_buf()).chain(env::split_paths(&rest));
    env::join_paths(dirs).with_context(|| format!("cannot prepend {} to PATH", dir.display()))
}

/// Finds an executable in `$CARGO_HOME/bin`, then on `$PATH`: the same order the
/// children see, since cargo child processes get `$CARGO_HOME/bin` prepended.
pub fn find_program(name: &str) -> Result<Option<PathBuf>> {
    let path = env::var_os("PATH").unwrap_or_default();
    let found = std::iter::once(cargo_bin_dir()?)
        .chain(env::split_paths(&path))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate));
    Ok(found)
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Shell-like rendering of a command, for logs and error messages.
pub fn display(cmd: &Command) -> String {
    // Only the program's file name: the full path of a rustup-managed cargo is noise.
    let program = Path::new(cmd.get_program())
        .file_name()
        .unwrap_or(cmd.get_program());
    std::iter::once(program)
        .chain(cmd.get_args())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

fn quote(arg: &OsStr) -> String {
    let s = arg.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:+,@%".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` with inherited stdio and returns its status (failure is not an error).
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status().map_err(|e| spawn_error(cmd, e))
}

/// Runs `cmd` with inherited stdio; a non-zero exit is an error.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout; a non-zero exit is an error.
pub fn stdout(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().map_err(|e| spawn_error(cmd, e))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", display(cmd)))
}

fn spawn_error(cmd: &Command, err: std::io::Error) -> anyhow::Error {
    let hint = if err.kind() == ErrorKind::NotFound {
        " (program not found)"
    } else {
        ""
    };
    anyhow::Error::new(err).context(format!("cannot run `{}`{hint}", display(cmd)))
}

/// Shell convention: the exit code, or 128+N if the process was killed by signal N.
pub fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
