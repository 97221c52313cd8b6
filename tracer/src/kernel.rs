//! Facts about the running kernel and our privileges that decide whether and how exactly eBPF works.

use crate::error::LoadError;

/// The kernel release (`uname -r`) and what it implies for `kmem:rss_stat`.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `uname -r`.
    pub release: String,
    /// (major, minor); (0, 0) when the release cannot be parsed.
    pub version: (u32, u32),
}

impl Kernel {
    /// The running kernel.
    pub fn current() -> Kernel {
        let release = nix::sys::utsname::uname()
            .map(|uts| uts.release().to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".to_string());
        let version = parse_version(&release);
        Kernel { release, version }
    }

    /// Before 6.2, `SPLIT_RSS_COUNTING` batches up to 64 page faults per thread before the mm counter
    /// (and the event) moves: peaks are then approximate.
    pub fn has_exact_rss_counters(&self) -> bool {
        self.version >= (6, 2)
    }

    /// Fetching BPF atomics (fetch_add, xchg, cmpxchg) arrived in 5.12.
    pub fn check_supported(&self) -> Result<(), LoadError> {
        if self.version < (5, 12) && self.version != (0, 0) {
            return Err(LoadError::KernelTooOld {
                kernel: self.release.clone(),
            });
        }
        Ok(())
    }
}

/// `6.18.44-fc-v1252` → (6, 18); unparsable → (0, 0).
pub fn parse_version(release: &str) -> (u32, u32) {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().ok());
    match (numbers.next().flatten(), numbers.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor),
        _ => (0, 0),
    }
}

/// This process's `/proc/self/status`.
fn own_status() -> Result<String, LoadError> {
    std::fs::read_to_string("/proc/self/status").map_err(|source| LoadError::Io {
        what: "reading /proc/self/status".to_string(),
        source,
    })
}

/// Tracepoints report host pids, while `fork()` returns pids of our own namespace: both must agree.
pub fn check_host_pid_namespace() -> Result<(), LoadError> {
    let levels = own_status()?
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))
        .map_or(1, |pids| pids.split_whitespace().count());
    if levels > 1 {
        return Err(LoadError::PidNamespace);
    }
    Ok(())
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Checks the effective capabilities before trying to load, to name what is missing.
pub fn check_privileges() -> Result<(), LoadError> {
    let effective = own_status()?
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    missing_capabilities(effective).map_or(Ok(()), |missing| Err(LoadError::Privileges { missing }))
}

/// CAP_BPF + CAP_PERFMON (5.8+) or CAP_SYS_ADMIN are needed for tracing programs.
fn missing_capabilities(effective: u64) -> Option<String> {
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return None;
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|&(cap, _)| !has(cap))
        .map(|(_, name)| name)
        .collect();
    Some(missing.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_version("6.18.44-fc-v1252"), (6, 18));
        assert_eq!(parse_version("6.1.0-28-cloud-amd64"), (6, 1));
        assert_eq!(parse_version("weird"), (0, 0));
    }

    #[test]
    fn capabilities() {
        assert_eq!(missing_capabilities(1 << CAP_SYS_ADMIN), None);
        assert_eq!(
            missing_capabilities((1 << CAP_BPF) | (1 << CAP_PERFMON)),
            None
        );
        assert_eq!(
            missing_capabilities(1 << CAP_BPF).as_deref(),
            Some("CAP_PERFMON")
        );
        assert_eq!(
            missing_capabilities(0).as_deref(),
            Some("CAP_BPF, CAP_PERFMON")
        );
    }
}
