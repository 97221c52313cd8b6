//! Starting the measured command so that it is tracked from its first instruction.
//!
//! The child is forked and held on a pipe until the tracker has registered its pid, then released to
//! `execve`. (`std::process::Command` with `pre_exec` was seen to deadlock here: spawn waits for the
//! exec that the held child cannot reach.) A second, close-on-exec pipe carries `errno` back if the
//! exec fails, so "command not found" is told apart from the command's own exit status 127.

use crate::{error::SpawnError, run::Exit};
use nix::{
    errno::Errno,
    fcntl::OFlag,
    sys::{
        signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction},
        wait::{WaitStatus, waitpid},
    },
    unistd::{ForkResult, Pid, fork, pipe2},
};
use std::{
    ffi::{CString, OsStr, OsString},
    fs::File,
    io::{Read, Write},
    os::{
        fd::AsRawFd,
        unix::{ffi::OsStrExt, fs::PermissionsExt},
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicI32, Ordering},
};

/// A forked child waiting, before `execve`, for [`HeldChild::release`].
#[derive(Debug)]
pub struct HeldChild {
    pid: Pid,
    gate: File,
    exec_error: File,
    forwarding: SignalForwarding,
}

/// Finds the program like `execvp` would, so a missing or non-executable command is reported before
/// anything is forked. Returns the path to execute.
pub fn resolve_program(program: &OsStr) -> Result<PathBuf, SpawnError> {
    let name = program.to_string_lossy().into_owned();
    if program.is_empty() {
        return Err(SpawnError::NotFound(name));
    }
    if program.as_bytes().contains(&b'/') {
        let path = PathBuf::from(program);
        return match executable(&path) {
            Some(true) => Ok(path),
            Some(false) => Err(not_executable(name, &path)),
            None => Err(SpawnError::NoSuchFile(name)),
        };
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let mut denied = None;
    for dir in std::env::split_paths(&search) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let candidate = dir.join(program);
        match executable(&candidate) {
            Some(true) => return Ok(candidate),
            Some(false) => denied = denied.or(Some(candidate)),
            None => {}
        }
    }
    match denied {
        Some(path) => Err(not_executable(name, &path)),
        None => Err(SpawnError::NotFound(name)),
    }
}

fn not_executable(program: String, path: &Path) -> SpawnError {
    let reason = if path.is_dir() {
        "Is a directory"
    } else {
        "Permission denied"
    };
    SpawnError::NotExecutable {
        program,
        reason: reason.into(),
    }
}

/// `Some(true)` for an executable file, `Some(false)` for one we may not run, `None` if absent.
fn executable(path: &Path) -> Option<bool> {
    let metadata = std::fs::metadata(path).ok()?;
    if metadata.is_dir() || metadata.permissions().mode() & 0o111 == 0 {
        return Some(false);
    }
    let c_path = CString::new(path.as_os_str().as_bytes()).ok()?;
    Some(nix::unistd::access(c_path.as_c_str(), nix::unistd::AccessFlags::X_OK).is_ok())
}

/// Forks a child that will exec `command` once released. Safe in multi-threaded processes too: the
/// child runs only async-signal-safe code (read, execv, write, _exit) on data prepared before fork.
pub fn spawn_held(command: &[OsString]) -> Result<HeldChild, SpawnError> {
    let program = command.first().ok_or(SpawnError::Empty)?;
    let path = resolve_program(program)?;
    // Everything the child needs is allocated before fork.
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| SpawnError::NotFound(program.to_string_lossy().into_owned()))?;
    let c_args: Vec<CString> = command
        .iter()
        .map(|arg| CString::new(arg.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|_| SpawnError::NotExecutable {
            program: program.to_string_lossy().into_owned(),
            reason: "argument contains a NUL byte".into(),
        })?;
    let mut argv: Vec<*const libc::c_char> = c_args.iter().map(|arg| arg.as_ptr()).collect();
    argv.push(std::ptr::null());

    let os = |what| {
        move |errno: Errno| SpawnError::Os {
            what,
            source: errno.into(),
        }
    };
    // Installed before fork, so no signal can kill tracer between the command's start and its report.
    let forwarding = SignalForwarding::install();
    let (gate_read, gate_write) = pipe2(OFlag::O_CLOEXEC).map_err(os("creating the start pipe"))?;
    let (error_read, error_write) =
        pipe2(OFlag::O_CLOEXEC).map_err(os("creating the exec-error pipe"))?;

    // SAFETY: the child only calls read, execv, write and _exit (async-signal-safe) on data prepared
    // above, then either becomes the command or exits.
    match unsafe { fork() }.map_err(os("fork"))? {
        ForkResult::Child => unsafe {
            // The forwarding handlers are tracer's, not the command's.
            for signal in SignalForwarding::SIGNALS {
                libc::signal(signal as libc::c_int, libc::SIG_DFL);
            }
            let mut byte = 0u8;
            let released = libc::read(gate_read.as_raw_fd(), (&raw mut byte).cast(), 1) == 1;
            if !released {
                // The tracer went away before releasing us: run nothing untracked.
                libc::_exit(125);
            }
            libc::execv(c_path.as_ptr(), argv.as_ptr());
            let errno = *libc::__errno_location();
            libc::write(error_write.as_raw_fd(), (&raw const errno).cast(), 4);
            libc::_exit(if errno == libc::ENOENT { 127 } else { 126 });
        },
        ForkResult::Parent { child } => {
            drop((gate_read, error_write));
            forwarding.forward_to(child);
            Ok(HeldChild {
                pid: child,
                gate: File::from(gate_write),
                exec_error: File::from(error_read),
                forwarding,
            })
        }
    }
}

impl HeldChild {
    /// The child's pid (host namespace when tracer runs in the host namespace).
    pub fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// Lets the child exec. Returns once the exec has succeeded, or the exec's error (the child is
    /// reaped then).
    pub fn release(mut self, program: &OsStr) -> Result<RunningChild, SpawnError> {
        let _ = self.gate.write_all(&[1]);
        let mut errno = [0u8; 4];
        // EOF (0 bytes) means the close-on-exec write end closed: the exec succeeded.
        if self.exec_error.read_exact(&mut errno).is_ok() {
            let _ = waitpid(self.pid, None);
            let errno = Errno::from_raw(i32::from_ne_bytes(errno));
            let program = program.to_string_lossy().into_owned();
            return Err(match errno {
                Errno::ENOENT => SpawnError::NotFound(program),
                errno => SpawnError::NotExecutable {
                    program,
                    reason: errno.desc().to_string(),
                },
            });
        }
        Ok(RunningChild {
            pid: self.pid,
            _forwarding: self.forwarding,
        })
    }

    /// Kills and reaps the held child (when tracking could not start).
    pub fn abandon(self) {
        // Closing the gate without a byte makes the child exit before exec.
        let HeldChild {
            pid,
            gate,
            exec_error,
            forwarding,
        } = self;
        drop((gate, exec_error));
        let _ = waitpid(pid, None);
        drop(forwarding);
    }
}

/// A running command.
#[derive(Debug)]
pub struct RunningChild {
    pid: Pid,
    _forwarding: SignalForwarding,
}

/// The child signals are forwarded to; 0 while it is not forked yet.
static FORWARD_TO: AtomicI32 = AtomicI32::new(0);
/// A signal that arrived before there was a child to forward it to.
static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    // A terminal's Ctrl-C / hangup reaches the whole foreground process group, the command included
    // (si_code SI_KERNEL): forwarding it would deliver it twice. Signals sent to tracer alone (kill,
    // CI cancellation) are passed on.
    if !info.is_null() && unsafe { (*info).si_code } == libc::SI_KERNEL {
        return;
    }
    match FORWARD_TO.load(Ordering::SeqCst) {
        0 => PENDING.store(signal, Ordering::SeqCst),
        pid => unsafe {
            libc::kill(pid, signal);
        },
    }
}

/// While alive, SIGINT, SIGTERM and SIGHUP do not kill tracer (it must still report): they are
/// forwarded to the command. Dropping it restores the previous dispositions.
#[derive(Debug)]
struct SignalForwarding {
    previous: Vec<(Signal, SigAction)>,
}

impl SignalForwarding {
    const SIGNALS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

    fn install() -> SignalForwarding {
        FORWARD_TO.store(0, Ordering::SeqCst);
        PENDING.store(0, Ordering::SeqCst);
        let action = SigAction::new(
            SigHandler::SigAction(forward_signal),
            SaFlags::SA_RESTART | SaFlags::SA_SIGINFO,
            SigSet::empty(),
        );
        let previous = Self::SIGNALS
            .into_iter()
            // SAFETY: the handler only touches atomics and calls kill (async-signal-safe).
            .filter_map(|signal| {
                unsafe { sigaction(signal, &action) }
                    .ok()
                    .map(|old| (signal, old))
            })
            .collect();
        SignalForwarding { previous }
    }

    fn forward_to(&self, child: Pid) {
        FORWARD_TO.store(child.as_raw(), Ordering::SeqCst);
        let pending = PENDING.swap(0, Ordering::SeqCst);
        if pending != 0 {
            unsafe { libc::kill(child.as_raw(), pending) };
        }
    }
}

impl Drop for SignalForwarding {
    fn drop(&mut self) {
        FORWARD_TO.store(0, Ordering::SeqCst);
        for (signal, old) in &self.previous {
            // SAFETY: restores the disposition saved at install.
            let _ = unsafe { sigaction(*signal, old) };
        }
    }
}

impl RunningChild {
    /// The command's pid.
    pub fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// Waits for the command to end; signals meanwhile are forwarded to it.
    ///
    /// (Its `ru_maxrss` is not used as a lower bound of the tree's peak: it includes the image the
    /// command exec'd from, here a copy of tracer.)
    pub fn wait(self) -> Result<Exit, SpawnError> {
        loop {
            match waitpid(self.pid, None) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(Exit::Code(code)),
                Ok(WaitStatus::Signaled(_, signal, _)) => return Ok(Exit::Signal(signal as i32)),
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(errno) => {
                    return Err(SpawnError::Os {
                        what: "waiting for the command",
                        source: errno.into(),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_like_a_shell() {
        assert!(resolve_program(OsStr::new("sh")).is_ok());
        assert!(matches!(
            resolve_program(OsStr::new("tracer-no-such-command")),
            Err(SpawnError::NotFound(_))
        ));
        let plain_file = std::env::temp_dir().join(format!("tracer-spawn-{}", std::process::id()));
        std::fs::write(&plain_file, "data").unwrap();
        std::fs::set_permissions(&plain_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let not_exec = resolve_program(plain_file.as_os_str()).unwrap_err();
        std::fs::remove_file(&plain_file).unwrap();
        assert_eq!(not_exec.exit_code(), 126);
        assert_eq!(
            resolve_program(OsStr::new("/tmp")).unwrap_err().exit_code(),
            126
        );
        assert_eq!(
            resolve_program(OsStr::new("/nonexistent/x"))
                .unwrap_err()
                .exit_code(),
            127
        );
    }
}
