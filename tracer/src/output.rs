//! Where the JSON reports go, and error text.

use anyhow::Context as _;
use serde::Serialize;
use std::{
    fs::File,
    io::{BufWriter, Write},
    path::Path,
};

/// The `--json` destination. A single run writes one pretty-printed object; with tasks, one compact
/// object per line (each task as it ends, then the whole tree), each with a `kind` field.
pub struct JsonSink {
    out: Option<Box<dyn Write>>,
    lines: bool,
}

#[derive(Serialize)]
struct Line<'a, T: Serialize> {
    kind: &'a str,
    #[serde(flatten)]
    report: &'a T,
}

impl JsonSink {
    /// `path` `-` is stdout; `None` writes nothing.
    pub fn open(path: Option<&Path>, lines: bool) -> anyhow::Result<JsonSink> {
        let out: Option<Box<dyn Write>> = match path {
            None => None,
            Some(path) if path == Path::new("-") => Some(Box::new(std::io::stdout())),
            Some(path) => {
                let file =
                    File::create(path).with_context(|| format!("creating {}", path.display()))?;
                Some(Box::new(BufWriter::new(file)))
            }
        };
        Ok(JsonSink { out, lines })
    }

    /// Writes one report; a write error is reported on stderr and does not stop tracking.
    pub fn write<T: Serialize>(&mut self, kind: &str, report: &T) {
        let Some(out) = self.out.as_mut() else {
            return;
        };
        let text = if self.lines {
            serde_json::to_string(&Line { kind, report })
        } else {
            serde_json::to_string_pretty(report)
        };
        let written = text
            .map_err(std::io::Error::from)
            .and_then(|text| writeln!(out, "{text}"))
            .and_then(|()| out.flush());
        if let Err(err) = written {
            eprintln!("tracer: error: writing the JSON report: {err}");
        }
    }
}

/// An error and its sources on one line.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Creates the server socket, mode 0660, owned by `group` if given. A stale socket left by an earlier
/// server is replaced; any other file there is an error.
#[cfg(target_os = "linux")]
pub fn bind_socket(
    path: &Path,
    group: Option<&str>,
) -> anyhow::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        anyhow::ensure!(
            metadata.file_type().is_socket(),
            "{} exists and is not a socket",
            path.display()
        );
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("creating the socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod 0660 {}", path.display()))?;
    if let Some(name) = group {
        let group = nix::unistd::Group::from_name(name)
            .with_context(|| format!("looking up group {name}"))?
            .with_context(|| format!("no group named {name}"))?;
        nix::unistd::chown(path, None, Some(group.gid))
            .with_context(|| format!("chgrp {name} {}", path.display()))?;
    }
    Ok(listener)
}
