//! Reading `/proc` (Linux): process trees, RSS of a process, thread lists.

use std::{collections::HashMap, fs};

/// Every process's parent, from `/proc/*/stat`.
pub fn parents() -> HashMap<u32, u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return HashMap::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, parent_of(pid)?)))
        .collect()
}

/// The parent pid from `/proc/PID/stat` (after the command name, which may hold spaces and parens).
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// When a process started (clock ticks since boot): tells a process from a later one with its pid.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // Fields after the command name start at field 3; starttime is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Direct children of a process (from each thread's `children` list; needs CONFIG_PROC_CHILDREN).
/// `None` when the kernel has no such file.
pub fn children_of(pid: u32) -> Option<Vec<u32>> {
    let mut children = Vec::new();
    for tid in threads_of(pid) {
        let list = match fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")) {
            Ok(list) => list,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && tid == pid => {
                return if fs::metadata(format!("/proc/{pid}")).is_ok() {
                    None
                } else {
                    Some(children)
                };
            }
            Err(_) => continue, // the thread exited meanwhile
        };
        children.extend(
            list.split_whitespace()
                .filter_map(|child| child.parse::<u32>().ok()),
        );
    }
    Some(children)
}

/// `root` and all its descendants alive now, parents before children.
pub fn tree_of(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (pid, parent) in parents() {
        children.entry(parent).or_default().push(pid);
    }
    let mut tree = vec![root];
    let mut next = 0;
    while next < tree.len() {
        if let Some(kids) = children.get(&tree[next]) {
            tree.extend(kids);
        }
        next += 1;
    }
    tree
}

/// Thread ids of a process.
pub fn threads_of(pid: u32) -> Vec<u32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Fields of `/proc/PID/status` in bytes (the file gives kB), by name, e.g. `VmHWM`, `RssAnon`.
pub fn status_bytes(pid: u32, fields: &[&str]) -> Option<Vec<u64>> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    fields
        .iter()
        .map(|field| {
            status.lines().find_map(|line| {
                let value = line.strip_prefix(field)?.strip_prefix(':')?;
                let kb: u64 = value.trim().trim_end_matches("kB").trim().parse().ok()?;
                Some(kb * 1024)
            })
        })
        .collect()
}

/// Whether `tid` is a thread-group leader (a process, not one of its other threads).
pub fn is_process_leader(tid: u32) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{tid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Tgid:"))
        .and_then(|tgid| tgid.trim().parse::<u32>().ok())
        == Some(tid)
}

/// The command line of a process, as its words.
pub fn cmdline(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|bytes| {
            bytes
                .split(|&byte| byte == 0)
                .filter(|word| !word.is_empty())
                .map(|word| String::from_utf8_lossy(word).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process() {
        let me = std::process::id();
        let parent = std::os::unix::process::parent_id();
        assert!(children_of(parent).unwrap().contains(&me));
        assert_eq!(parent_of(me), Some(std::os::unix::process::parent_id()));
        assert!(tree_of(std::os::unix::process::parent_id()).contains(&me));
        assert!(threads_of(me).contains(&me));
        assert!(start_time(me).unwrap() >= start_time(parent).unwrap());
        assert!(start_time(me).unwrap() >= start_time(parent).unwrap());
        let rss = status_bytes(me, &["VmRSS", "VmHWM"]).unwrap();
        assert!(rss[0] > 0 && rss[1] >= rss[0]);
        assert!(!cmdline(me).is_empty());
    }
}
