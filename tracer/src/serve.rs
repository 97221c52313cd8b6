//! `tracer serve`: a privileged helper that unprivileged task runners ask, over a Unix socket, to
//! track their processes.
//!
//! Protocol: one JSON object per line each way. Requests: `{"op":"start","pid":N}`,
//! `{"op":"peek","pid":N}`, `{"op":"stop","pid":N}`. Answers: start → `{"ok":true,"pid":N,
//! "backend":"ebpf"}`; peek → `{"pid":N,"rss_bytes":..,"peak_rss_bytes":..}`; stop → the
//! [`PeakReport`](crate::PeakReport); any failure → `{"error":"message"}`. A bad line gets an error
//! answer and the connection stays open.
//!
//! Authorisation uses the peer's credentials (SO_PEERCRED): root may track anything; anyone else only
//! processes whose real uid is theirs. A client that disconnects stops the trackings it started.

use crate::{MemoryTracker, error::TrackError};
use serde::Deserialize;
use serde_json::{Value, json};
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::{UnixListener, UnixStream},
    sync::{Arc, Mutex},
};

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Request {
    Start { pid: u32 },
    Peek { pid: u32 },
    Stop { pid: u32 },
}

/// Serves requests on `listener` until it fails; one thread per client.
pub fn serve(listener: UnixListener, tracker: MemoryTracker) -> std::io::Result<()> {
    let tracker = Arc::new(Mutex::new(tracker));
    for stream in listener.incoming() {
        let stream = stream?;
        let tracker = Arc::clone(&tracker);
        std::thread::spawn(move || Client::new(stream, tracker).run());
    }
    Ok(())
}

struct Client {
    stream: UnixStream,
    tracker: Arc<Mutex<MemoryTracker>>,
    /// The peer's uid (root: 0), or `None` if the kernel did not say.
    uid: Option<u32>,
    /// Pids this client started tracking and has not stopped.
    started: Vec<u32>,
}

impl Client {
    fn new(stream: UnixStream, tracker: Arc<Mutex<MemoryTracker>>) -> Client {
        let uid = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
            .ok()
            .map(|credentials| credentials.uid());
        Client {
            stream,
            tracker,
            uid,
            started: Vec::new(),
        }
    }

    fn run(mut self) {
        let Ok(reader) = self.stream.try_clone() else {
            return;
        };
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else {
                break;
            };
            if line.trim().is_empty() {
                continue;
            }
            let answer = match serde_json::from_str::<Request>(&line) {
                Ok(request) => self
                    .answer(request)
                    .unwrap_or_else(|message| json!({ "error": message })),
                Err(err) => json!({ "error": format!("bad request: {err}") }),
            };
            if writeln!(self.stream, "{answer}").is_err() {
                break;
            }
        }
        // Disconnected: what it started stops with it.
        let started = std::mem::take(&mut self.started);
        let mut tracker = self.lock();
        for pid in started {
            tracker.stop_tracking(pid);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryTracker> {
        self.tracker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn answer(&mut self, request: Request) -> Result<Value, String> {
        match request {
            Request::Start { pid } => {
                self.authorise(pid)?;
                let mut tracker = self.lock();
                tracker.start_tracking(pid).map_err(|err| err.to_string())?;
                let backend = tracker.backend().name();
                drop(tracker);
                self.started.push(pid);
                Ok(json!({ "ok": true, "pid": pid, "backend": backend }))
            }
            Request::Peek { pid } => {
                self.authorise(pid)?;
                let sample = self.lock().peek(pid).ok_or_else(|| not_tracked(pid))?;
                Ok(json!({
                    "pid": pid,
                    "rss_bytes": sample.rss_bytes.max(0),
                    "peak_rss_bytes": sample.peak_rss_bytes,
                }))
            }
            Request::Stop { pid } => {
                // Only the client that started a tracking may stop it.
                let position = self.started.iter().position(|&started| started == pid);
                let position = position.ok_or_else(|| not_tracked(pid))?;
                self.started.swap_remove(position);
                let report = self
                    .lock()
                    .stop_tracking(pid)
                    .ok_or_else(|| not_tracked(pid))?;
                serde_json::to_value(report).map_err(|err| err.to_string())
            }
        }
    }

    /// Root may track any process; anyone else only their own (real uid).
    fn authorise(&self, pid: u32) -> Result<(), String> {
        let uid = self.uid.ok_or("the peer's credentials are unknown")?;
        if uid == 0 {
            return Ok(());
        }
        match real_uid(pid) {
            Some(owner) if owner == uid => Ok(()),
            Some(_) => Err(format!(
                "pid {pid} belongs to another user: permission denied"
            )),
            None => Err(TrackError::NoSuchProcess(pid).to_string()),
        }
    }
}

fn not_tracked(pid: u32) -> String {
    format!("pid {pid} is not tracked by this connection")
}

/// The real uid of a process (first field of `Uid:` in `/proc/PID/status`).
fn real_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
