//! `tracer serve`: authorisation from the peer's credentials, many clients at once.

mod common;
use common::{tracer, workload};
use serde_json::Value;
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A running `tracer serve` whose socket the group `nogroup` (gid 65534) may use.
struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    fn start(name: &str) -> Server {
        let dir = std::env::temp_dir().join(format!("tracer-serve-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // The directory must let the unprivileged client reach the socket.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let socket = dir.join("tracer.sock");
        let child = Command::new(tracer())
            .args(["serve", "--group", "nogroup", "--socket"])
            .arg(&socket)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "tracer serve did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child, socket }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        if let Some(dir) = self.socket.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Sends `lines` on one connection as uid/gid 65534 (nobody/nogroup), returns the answers.
fn request_as_nobody(socket: &Path, lines: &[String]) -> Vec<Value> {
    let mut command = Command::new("setpriv");
    command
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(workload());
    request(command, socket, lines)
}

/// Runs `workload request` (as `command` says) on one connection, returns the answers.
fn request(mut command: Command, socket: &Path, lines: &[String]) -> Vec<Value> {
    let output = command
        .args(["request", "--socket"])
        .arg(socket)
        .args(lines)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn line(op: &str, pid: u32) -> String {
    serde_json::json!({ "op": op, "pid": pid }).to_string()
}

#[test]
fn a_client_may_track_only_its_own_processes() {
    require_ebpf!();
    let server = Server::start("auth");
    let socket_mode = std::fs::metadata(&server.socket).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&socket_mode.permissions()) & 0o777,
        0o660
    );
    // A root-owned process: refused. One of nobody's own: tracked.
    let mut theirs = Command::new("sleep").arg("2").spawn().unwrap();
    let mut own = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sleep",
            "2",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let answers = request_as_nobody(
        &server.socket,
        &[
            line("start", theirs.id()),
            line("start", own.id()),
            line("peek", own.id()),
            line("stop", own.id()),
        ],
    );
    assert!(
        answers[0]["error"]
            .as_str()
            .unwrap()
            .contains("another user"),
        "{answers:?}"
    );
    assert_eq!(answers[1]["ok"], true, "{answers:?}");
    assert!(
        answers[2]["peak_rss_bytes"].as_u64().unwrap() > 0,
        "{answers:?}"
    );
    assert_eq!(answers[3]["backend"], "ebpf", "{answers:?}");
    let _ = (theirs.kill(), own.kill(), theirs.wait(), own.wait());
}

#[test]
fn a_bad_line_gets_an_error_and_the_connection_goes_on() {
    require_ebpf!();
    let server = Server::start("bad-line");
    let mut held = Command::new(workload())
        .args(["hold", "--mib", "32", "--hold-ms", "300"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = held.id();
    let answers = request_as_root(
        &server.socket,
        &[
            "not json".into(),
            r#"{"op":"fly","pid":1}"#.into(),
            line("start", pid),
        ],
    );
    assert!(
        answers[0]["error"]
            .as_str()
            .unwrap()
            .contains("bad request")
    );
    assert!(
        answers[1]["error"]
            .as_str()
            .unwrap()
            .contains("bad request")
    );
    assert_eq!(answers[2]["ok"], true);
    let _ = held.wait();
}

fn request_as_root(socket: &Path, lines: &[String]) -> Vec<Value> {
    request(Command::new(workload()), socket, lines)
}

#[test]
fn a_hundred_concurrent_clients() {
    require_ebpf!();
    let server = Server::start("hundred");
    let socket = server.socket.clone();
    // Each client tracks its own workload holding a size of its own, from start to stop.
    let clients: Vec<_> = (0..100)
        .map(|index| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mib = 4 + index % 8;
                let held = Command::new(workload())
                    .args(["hold", "--mib", &mib.to_string(), "--hold-ms", "400"])
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                let pid = held.id();
                let started = request_as_root(&socket, &[line("start", pid)]);
                assert!(held.wait_with_output().unwrap().status.success());
                (started, pid)
            })
        })
        .collect();
    for client in clients {
        let (started, pid) = client.join().unwrap();
        // Each `request` process disconnected after its start: the server stopped its tracking.
        assert_eq!(started[0]["ok"], true, "{started:?}");
        let again = request_as_root(&socket, &[line("stop", pid)]);
        assert!(
            again[0]["error"].is_string(),
            "a disconnected client's tracking is stopped"
        );
    }
    // And 100 connections held open at once, each tracking and stopping its own process.
    let mut held: Vec<_> = (0..100)
        .map(|_| {
            Command::new(workload())
                .args(["hold", "--mib", "4", "--hold-ms", "20000"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let clients: Vec<_> = held
        .iter()
        .map(|child| {
            let (socket, pid) = (socket.clone(), child.id());
            std::thread::spawn(move || {
                request_as_root(
                    &socket,
                    &[line("start", pid), line("peek", pid), line("stop", pid)],
                )
            })
        })
        .collect();
    for client in clients {
        let answers = client.join().unwrap();
        assert_eq!(answers[0]["ok"], true, "{answers:?}");
        assert!(
            answers[1]["rss_bytes"].as_u64().unwrap() > 4 << 20,
            "{answers:?}"
        );
        assert!(
            answers[2]["peak_rss_bytes"].as_u64().unwrap() >= 4 << 20,
            "{answers:?}"
        );
    }
    for child in &mut held {
        let _ = (child.kill(), child.wait());
    }
}
