//! tracefs: finding (or mounting) it and reading tracepoint format files.
//!
//! Field offsets of `sched_*` events change between kernels, so they are always read from the format
//! files at start-up, never assumed.

use crate::error::LoadError;
use std::{collections::HashMap, fs, path::PathBuf};

/// Where tracefs is usually found.
const TRACEFS_DIRS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// A parsed `format` file: field name → (offset, size), and the event's id.
#[derive(Debug, Clone)]
pub struct Format {
    event: String,
    id: usize,
    fields: HashMap<String, (usize, usize)>,
}

impl Format {
    /// Parses the text of a tracepoint `format` file.
    pub fn parse(event: &str, text: &str) -> Format {
        let mut fields = HashMap::new();
        for line in text.lines() {
            let Some(rest) = line.trim().strip_prefix("field:") else {
                continue;
            };
            let mut parts = rest.split(';').map(str::trim);
            let declaration = parts.next().unwrap_or_default();
            let value = |key: &str, parts: &[&str]| {
                parts
                    .iter()
                    .find_map(|part| part.strip_prefix(key)?.parse::<usize>().ok())
            };
            let rest: Vec<&str> = parts.collect();
            let (Some(offset), Some(size)) = (value("offset:", &rest), value("size:", &rest))
            else {
                continue;
            };
            // `unsigned int mm_id`, `char comm[16]`, `__data_loc char[] filename`: the name is the
            // last word, without an array suffix.
            let name = declaration.rsplit(' ').next().unwrap_or_default();
            let name = name.split('[').next().unwrap_or_default();
            fields.insert(name.to_string(), (offset, size));
        }
        let id = text
            .lines()
            .find_map(|line| line.strip_prefix("ID:"))
            .and_then(|id| id.trim().parse().ok())
            .unwrap_or(0);
        Format {
            event: event.to_string(),
            id,
            fields,
        }
    }

    /// The event's id (`common_type` of its records).
    pub fn id(&self) -> usize {
        self.id
    }

    /// Offset of `field`, checking it has the expected size.
    pub fn offset(&self, field: &str, size: usize) -> Result<usize, LoadError> {
        match self.fields.get(field) {
            Some(&(offset, found)) if found == size => Ok(offset),
            Some(&(_, found)) => Err(LoadError::FormatMismatch {
                event: self.event.clone(),
                detail: format!("field `{field}` has size {found}, expected {size}"),
            }),
            None => Err(LoadError::FormatMismatch {
                event: self.event.clone(),
                detail: format!("no field `{field}`"),
            }),
        }
    }
}

/// The tracefs mount, mounting it at /sys/kernel/tracing when it is not mounted yet (needs root).
pub fn root() -> Result<PathBuf, LoadError> {
    if let Some(dir) = mounted() {
        return Ok(dir);
    }
    let target = TRACEFS_DIRS[0];
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "tracefs", target])
        .status();
    match (status, mounted()) {
        (_, Some(dir)) => Ok(dir),
        (Ok(status), None) => Err(LoadError::NoTracefs(format!(
            "`mount -t tracefs tracefs {target}` failed ({status})"
        ))),
        (Err(err), None) => Err(LoadError::NoTracefs(format!("cannot run mount: {err}"))),
    }
}

fn mounted() -> Option<PathBuf> {
    TRACEFS_DIRS
        .iter()
        .map(PathBuf::from)
        .find(|dir| dir.join("events").is_dir())
}

/// Reads and parses `events/CATEGORY/NAME/format`.
pub fn format(root: &std::path::Path, category: &str, name: &str) -> Result<Format, LoadError> {
    let path = root.join("events").join(category).join(name).join("format");
    let event = format!("{category}:{name}");
    match fs::read_to_string(&path) {
        Ok(text) => Ok(Format::parse(&event, &text)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            Err(LoadError::MissingTracepoint { event })
        }
        Err(err) => Err(LoadError::Io {
            what: format!("reading {}", path.display()),
            source: err,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORK_6_18: &str = "name: sched_process_fork
ID: 366
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;
\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;
\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;
";

    #[test]
    fn parses_data_loc_and_plain_fields() {
        let format = Format::parse("sched:sched_process_fork", FORK_6_18);
        assert_eq!(format.offset("parent_pid", 4).unwrap(), 12);
        assert_eq!(format.offset("child_pid", 4).unwrap(), 20);
        assert_eq!(format.offset("parent_comm", 4).unwrap(), 8);
        assert_eq!(format.id(), 366);
    }

    #[test]
    fn parses_array_fields_and_rejects_wrong_sizes() {
        let format = Format::parse(
            "sched:sched_process_exit",
            "\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;",
        );
        assert_eq!(format.offset("comm", 16).unwrap(), 8);
        assert_eq!(format.offset("pid", 4).unwrap(), 24);
        assert!(format.offset("pid", 8).is_err());
        assert!(format.offset("prio", 4).is_err());
    }
}
