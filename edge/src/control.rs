//! The local control channel: `courier-edge ctl` talks to a running edge over a Unix socket
//! (docs/decisions/0012 says why not quic-rpc).
//!
//! One thread off the data path accepts a connection, reads one request (a JSON object on one
//! line, at most `REQUEST_BYTES_MAX`), and writes one JSON answer. It asks the shards through
//! a bounded channel per shard, which each shard's executor reads in a task of its own, and
//! waits for their answers at most `SHARD_ANSWER_TIMEOUT`. Only the edge's user can open the
//! socket (mode 0600): whoever can may disconnect users and erase inboxes.
//!
//! Requests: `{"command":"status"}`, `{"command":"drain"}`, and with a `"user"`:
//! `connections`, `disconnect`, `purge`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use courier_core::UserId;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Bytes of a request read at most.
const REQUEST_BYTES_MAX: usize = 4096;
/// How long a client may take to send its request, and the answer to be taken.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the control thread waits for a shard (a purge waits for its commit).
pub const SHARD_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Control requests a shard holds before the control thread is told it is busy.
pub const SHARD_QUEUE_MAX: usize = 16;

/// A request from an operator, as sent on the socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Each shard's connections, queues and state.
    Status,
    /// Drain and stop the edge, as SIGTERM does.
    Drain,
    /// The user's connections on every shard.
    Connections { user: UserId },
    /// Close every connection of the user with `Disconnected`.
    Disconnect { user: UserId },
    /// Disconnect the user, then erase their inbox: messages, dedupe records and counter, with
    /// the device records reset past the erased messages (erasure on request, decision 0044).
    Purge { user: UserId },
}

/// One shard's state, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStatus {
    pub shard: u8,
    pub connections: usize,
    pub unauthenticated: usize,
    /// Sends, logins, acks, forgets and purges waiting for a commit.
    pub queued_requests: usize,
    pub draining: bool,
    pub store_recovering: bool,
}

/// One connection of a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    pub shard: u8,
    pub device: u32,
    pub peer: String,
    /// How long it has been open.
    pub open_secs: u64,
}

/// The answer to a [`Command`], as sent on the socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    Status {
        version: String,
        shards: Vec<ShardStatus>,
    },
    Draining,
    Connections {
        user: UserId,
        connections: Vec<ConnectionInfo>,
    },
    Disconnected {
        user: UserId,
        connections: usize,
    },
    Purged {
        user: UserId,
        connections_closed: usize,
    },
    Error {
        message: String,
    },
}

/// What the control thread asks a shard; the shard answers on `reply`.
#[derive(Debug)]
pub enum ShardRequest {
    Status {
        reply: flume::Sender<ShardStatus>,
    },
    Connections {
        user: UserId,
        reply: flume::Sender<Vec<ConnectionInfo>>,
    },
    Disconnect {
        user: UserId,
        reply: flume::Sender<usize>,
    },
    /// To the user's home shard: whether it would take a purge of the user now (asked before
    /// the user is disconnected, so that a refused purge logs no one out).
    CheckPurge {
        user: UserId,
        reply: flume::Sender<Result<(), String>>,
    },
    /// To the user's home shard: erase the inbox; the answer comes once the commit is done.
    Purge {
        user: UserId,
        reply: flume::Sender<Result<(), String>>,
    },
}

/// The control thread's handles to the shards.
#[derive(Debug, Clone)]
pub struct Shards {
    pub senders: Vec<flume::Sender<ShardRequest>>,
}

impl Shards {
    /// A channel per shard: the senders for the control thread, the receivers for the shards.
    pub fn new(count: u32) -> (Shards, Vec<flume::Receiver<ShardRequest>>) {
        let (senders, receivers) = (0..count).map(|_| flume::bounded(SHARD_QUEUE_MAX)).unzip();
        (Shards { senders }, receivers)
    }
}

/// The longest path a Unix socket can be bound to (`sun_path` holds 108 bytes with its NUL).
const SOCKET_PATH_BYTES_MAX: usize = 107;
/// What [`start`]'s temporary name adds to the path at most: `.` and a process id (at most 7
/// digits: Linux's `pid_max` is at most 4,194,304), then `.tmp`.
const STAGING_SUFFIX_BYTES_MAX: usize = 1 + 7 + 4;

/// What [`start`] would refuse about `path`, checked before the edge opens its store (which,
/// in a cluster with takeover, claims its users' lease): a file there that is not a socket, or
/// a directory that does not exist. `data_dir` is created at start, so a socket in it passes.
pub fn check_path(path: &Path, data_dir: &Path) -> Result<(), String> {
    // A Unix socket's path holds at most 107 bytes, and `start` binds it first under a
    // temporary name up to `STAGING_SUFFIX_BYTES_MAX` longer.
    let bytes = path.as_os_str().len();
    if bytes + STAGING_SUFFIX_BYTES_MAX > SOCKET_PATH_BYTES_MAX {
        return Err(format!(
            "control.socket {} is {bytes} bytes long, and a Unix socket's path may be at most \
             {} here ({SOCKET_PATH_BYTES_MAX}, less the temporary name it is bound under \
             first); set control.socket to a shorter path",
            path.display(),
            SOCKET_PATH_BYTES_MAX - STAGING_SUFFIX_BYTES_MAX
        ));
    }
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !metadata.file_type().is_socket() {
            return Err(format!(
                "control.socket {} exists and is not a socket; choose another path",
                path.display()
            ));
        }
    }
    let directory = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !directory.is_dir() && directory != data_dir {
        return Err(format!(
            "control.socket {}: the directory {} does not exist; create it, set control.socket \
             to a path in an existing directory, or control.enabled = false",
            path.display(),
            directory.display()
        ));
    }
    // The socket is made once every shard serves: a directory the edge may not write failed
    // the start then, after `/readyz` said ready (exit 4, at every restart). Probed as the
    // start binds it, a socket under a temporary name, removed at once.
    if directory.is_dir() {
        let probe = path.with_extension(format!("{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&probe);
        UnixListener::bind(&probe)
            .and_then(|_listener| std::fs::remove_file(&probe))
            .map_err(|e| {
                format!(
                    "control.socket {}: the directory {} is not writable ({e}); give the \
                     edge's user write access, set control.socket to a writable directory, or \
                     control.enabled = false",
                    path.display(),
                    directory.display()
                )
            })?;
    }
    Ok(())
}

/// Binds `path` (replacing a stale socket file) with mode 0600 and serves requests on a thread
/// of its own.
pub fn start(path: &Path, shards: Shards) -> Result<(), String> {
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !metadata.file_type().is_socket() {
            return Err(format!(
                "control.socket {} exists and is not a socket; choose another path",
                path.display()
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "another process serves the control socket {}; is an edge already running \
                 with this data directory?",
                path.display()
            ));
        }
        std::fs::remove_file(path).map_err(|e| {
            format!(
                "cannot remove the stale control socket {}: {e}",
                path.display()
            )
        })?;
    }
    // Bound under a temporary name, restricted to 0600, then renamed into place: nobody can
    // open it by its real name before only the owner may.
    let staging = path.with_extension(format!("{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging).map_err(|e| {
        format!(
            "cannot create the control socket {}: {e}; set control.socket to a writable path, \
             or control.enabled = false",
            path.display()
        )
    })?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&staging, path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&staging);
                format!("cannot set up the control socket {}: {e}", path.display())
            })?;
    }
    let shown = path.to_path_buf();
    std::thread::Builder::new()
        .name("courier-control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => serve_one(stream, &shards),
                    Err(error) => {
                        warn!(%error, "control socket: accept failed");
                        // The error repeats at once while its cause (no file descriptors
                        // left) lasts: without a pause the loop spun a core.
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            }
        })
        .map_err(|e| format!("cannot start the control thread: {e}"))?;
    info!(socket = %shown.display(), "control socket for courier-edge ctl");
    Ok(())
}

fn serve_one(mut stream: UnixStream, shards: &Shards) {
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    if let Err(message) = peer_allowed(&stream) {
        warn!(%message, "control socket: request refused");
        let answer = serde_json::to_string(&Answer::Error { message }).unwrap_or_default();
        let _ = stream.write_all(format!("{answer}\n").as_bytes());
        return;
    }
    let answer = match read_request(&mut stream) {
        Err(message) => Answer::Error { message },
        Ok(line) => match serde_json::from_str::<Command>(&line) {
            Ok(command) if client_gone(&stream) => {
                // Its request waited here behind others longer than the client waits (65 s):
                // the client reported failure and exited, and an operator may run the command
                // again (a second purge erases what came in between). Not run.
                warn!(
                    ?command,
                    "control request not run: its client gave up waiting"
                );
                return;
            }
            Ok(command) => {
                info!(?command, "control request");
                execute(command, shards)
            }
            Err(error) => Answer::Error {
                message: format!("not a request: {error}"),
            },
        },
    };
    let mut text = serde_json::to_string(&answer).unwrap_or_else(|_| "{}".into());
    text.push('\n');
    let _ = stream.write_all(text.as_bytes());
}

/// Whether the client closed its end of `stream` (not only its writing half: a client that
/// ends its request with end-of-file, as `socat` does, still waits for the answer).
fn client_gone(stream: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut poll = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: one `pollfd` that outlives the call, and a count of one; no waiting.
    let ready = unsafe { libc::poll(&raw mut poll, 1, 0) };
    ready == 1 && poll.revents & libc::POLLHUP != 0
}

/// Whether the process at the other end of `stream` may give commands: root, or the edge's
/// own user. The socket's mode (0600) says the same, but it is set just after the socket is
/// bound, and a connection made in between, under a permissive umask, would be served.
fn peer_allowed(stream: &UnixStream) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let mut credentials = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut length = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    #[allow(unsafe_code)]
    // SAFETY: `credentials` and `length` outlive the call, and `length` is their size.
    let read = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut credentials).cast(),
            &raw mut length,
        )
    };
    if read != 0 {
        return Err(format!(
            "cannot tell who is asking: {}",
            std::io::Error::last_os_error()
        ));
    }
    #[allow(unsafe_code)]
    // SAFETY: no arguments; it cannot fail.
    let own_uid = unsafe { libc::geteuid() };
    if credentials.uid == 0 || credentials.uid == own_uid {
        Ok(())
    } else {
        Err(format!(
            "user {} may not control this edge: run courier-edge ctl as the edge's user or root",
            credentials.uid
        ))
    }
}

/// One request line, read within `CLIENT_TIMEOUT` in all (a client trickling bytes cannot
/// hold the control thread) and at most `REQUEST_BYTES_MAX` bytes.
fn read_request(stream: &mut UnixStream) -> Result<String, String> {
    use crate::bounded_read::{ReadEnd, read_until};
    let (request, end) = read_until(stream, CLIENT_TIMEOUT, REQUEST_BYTES_MAX, |request| {
        request.contains(&b'\n')
    });
    match end {
        ReadEnd::Done => {}
        ReadEnd::TooLarge => {
            return Err(format!(
                "a request is one JSON line of at most {REQUEST_BYTES_MAX} bytes"
            ));
        }
        ReadEnd::TimedOut => return Err("the request did not arrive in time".into()),
        ReadEnd::Closed => {
            return Err("a request is one JSON object ending with a newline".into());
        }
        ReadEnd::Failed(error) => return Err(format!("could not read the request: {error}")),
    }
    let end = request
        .iter()
        .position(|b| *b == b'\n')
        .unwrap_or(request.len());
    String::from_utf8(request[..end].to_vec()).map_err(|_| "a request is UTF-8 JSON".into())
}

fn execute(command: Command, shards: &Shards) -> Answer {
    match command {
        Command::Status => match ask_all(shards, |reply| ShardRequest::Status { reply }) {
            Ok(shards) => Answer::Status {
                version: env!("CARGO_PKG_VERSION").into(),
                shards,
            },
            Err(message) => Answer::Error { message },
        },
        Command::Drain => {
            // The same path as SIGTERM: the main thread waits for it in `sigwait`.
            #[allow(unsafe_code)]
            // SAFETY: kill only sends a signal to this process.
            let sent = unsafe { libc::kill(libc::getpid(), libc::SIGTERM) } == 0;
            if sent {
                Answer::Draining
            } else {
                Answer::Error {
                    message: "could not signal the edge to drain".into(),
                }
            }
        }
        Command::Connections { user } => {
            match ask_all(shards, |reply| ShardRequest::Connections { user, reply }) {
                Ok(per_shard) => Answer::Connections {
                    user,
                    connections: per_shard.into_iter().flatten().collect(),
                },
                Err(message) => Answer::Error { message },
            }
        }
        Command::Disconnect { user } => {
            match ask_all(shards, |reply| ShardRequest::Disconnect { user, reply }) {
                Ok(counts) => Answer::Disconnected {
                    user,
                    connections: counts.into_iter().sum(),
                },
                Err(message) => Answer::Error { message },
            }
        }
        Command::Purge { user } => {
            let home = courier_core::placement::home_shard(user, shards.senders.len() as u32);
            // Would the home shard take it? A purge refused after the disconnect below logged
            // the user out for nothing (a guest's user, with its own edge down, for good).
            let answer = match ask_one(shards, home, |reply| ShardRequest::CheckPurge {
                user,
                reply,
            }) {
                Ok(answer) => answer,
                Err(message) => return Answer::Error { message },
            };
            match answer.recv_timeout(SHARD_ANSWER_TIMEOUT) {
                Ok(Ok(())) => {}
                Ok(Err(message)) => return Answer::Error { message },
                Err(_) => {
                    return Answer::Error {
                        message: format!("shard {home} did not answer; try again"),
                    };
                }
            }
            // Every request below must find room, or the user is logged out on some shards
            // and not purged: the disconnect on every shard, then the purge on the home one.
            // This thread is the queues' only sender, so room seen here stays.
            if let Err(message) = room_for_a_purge(shards, home) {
                return Answer::Error { message };
            }
            // Disconnect first: a device still connected would go on acking with its cursor.
            let closed = match ask_all(shards, |reply| ShardRequest::Disconnect { user, reply }) {
                Ok(counts) => counts.into_iter().sum(),
                Err(message) => return Answer::Error { message },
            };
            let answer = match ask_one(shards, home, |reply| ShardRequest::Purge { user, reply }) {
                Ok(answer) => answer,
                Err(message) => return Answer::Error { message },
            };
            match answer.recv_timeout(SHARD_ANSWER_TIMEOUT) {
                Ok(Ok(())) => Answer::Purged {
                    user,
                    connections_closed: closed,
                },
                Ok(Err(message)) => Answer::Error { message },
                Err(flume::RecvTimeoutError::Disconnected) => Answer::Error {
                    message: "the edge stopped before the purge committed; run it again".into(),
                },
                Err(flume::RecvTimeoutError::Timeout) => Answer::Error {
                    message: format!(
                        "the purge did not commit within {} s (is the store failing? see the \
                         log); it stays queued and will run",
                        SHARD_ANSWER_TIMEOUT.as_secs()
                    ),
                },
            }
        }
    }
}

/// Whether every shard's queue takes a disconnect, and `home`'s a purge after it. (A shard
/// with room that then does not answer in time still leaves the user disconnected where the
/// others answered: `ask_all` says which.)
fn room_for_a_purge(shards: &Shards, home: u32) -> Result<(), String> {
    for (shard, sender) in shards.senders.iter().enumerate() {
        let needed = if shard == home as usize { 2 } else { 1 };
        let free = sender
            .capacity()
            .unwrap_or(usize::MAX)
            .saturating_sub(sender.len());
        if sender.is_disconnected() || free < needed {
            return Err(format!(
                "shard {shard}'s queue is full or it stopped; nothing was done, try again"
            ));
        }
    }
    Ok(())
}

/// Sends a request to `shard`; its answer comes on the receiver returned.
fn ask_one<T>(
    shards: &Shards,
    shard: u32,
    request: impl FnOnce(flume::Sender<T>) -> ShardRequest,
) -> Result<flume::Receiver<T>, String> {
    let (reply, answer) = flume::bounded(1);
    shards.senders[shard as usize]
        .try_send(request(reply))
        .map_err(|_| format!("shard {shard} is busy; try again"))?;
    Ok(answer)
}

/// Sends a request to every shard and collects the answers in shard order.
fn ask_all<T>(
    shards: &Shards,
    request: impl Fn(flume::Sender<T>) -> ShardRequest,
) -> Result<Vec<T>, String> {
    let mut answers = Vec::with_capacity(shards.senders.len());
    let mut pending = Vec::with_capacity(shards.senders.len());
    for (shard, sender) in shards.senders.iter().enumerate() {
        let (reply, answer) = flume::bounded(1);
        sender
            .try_send(request(reply))
            .map_err(|_| format!("shard {shard} is busy or stopped; try again"))?;
        pending.push((shard, answer));
    }
    // One deadline for all: waited for in turn, each wedged shard added its own timeout, past
    // the time `ctl` waits, and later requests queued behind.
    let deadline = std::time::Instant::now() + SHARD_ANSWER_TIMEOUT;
    for (shard, answer) in pending {
        answers.push(
            answer
                .recv_deadline(deadline)
                .map_err(|_| format!("shard {shard} did not answer"))?,
        );
    }
    Ok(answers)
}

/// Sends `command` to the edge serving `socket` and returns its answer.
pub fn request(socket: &Path, command: &Command) -> Result<Answer, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach the edge's control socket {}: {e}; is the edge running, with this \
             config (--config) and control.enabled?",
            socket.display()
        )
    })?;
    // A purge waits for a disconnect on every shard, then for its commit.
    let _ = stream.set_read_timeout(Some(2 * SHARD_ANSWER_TIMEOUT + CLIENT_TIMEOUT));
    let mut text = serde_json::to_string(command).map_err(|e| e.to_string())?;
    text.push('\n');
    stream
        .write_all(text.as_bytes())
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(|e| {
        format!(
            "no answer from the edge: {e} (a request the edge had not started is dropped \
                 now; one it had started, such as a purge waiting for its commit, goes on: see \
                 its log)"
        )
    })?;
    serde_json::from_str(&line).map_err(|e| format!("an answer that does not parse ({e}): {line}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request whose client closed before the edge read it is not run: its client waited
    /// behind other requests longer than it waits (65 s), reported failure and exited, and an
    /// operator may have run the command again. Before, it ran all the same. A client that
    /// only ended its writing half (end-of-file after the request, as `socat` sends) still
    /// waits for the answer, and its request runs.
    #[test]
    fn a_request_whose_client_has_gone_is_not_run() {
        let (shards, receivers) = Shards::new(1);
        let request = serde_json::to_string(&Command::Disconnect { user: 9 }).expect("json") + "\n";
        let (mut client, server) = UnixStream::pair().expect("a socket pair");
        client.write_all(request.as_bytes()).expect("request");
        drop(client);
        serve_one(server, &shards);
        assert!(
            receivers[0].try_recv().is_err(),
            "a request of a client that is gone was run"
        );

        let (mut client, server) = UnixStream::pair().expect("a socket pair");
        client.write_all(request.as_bytes()).expect("request");
        client
            .shutdown(std::net::Shutdown::Write)
            .expect("end of the request");
        let receiver = receivers[0].clone();
        let shard = std::thread::spawn(move || {
            match receiver.recv_timeout(std::time::Duration::from_secs(10)) {
                Ok(ShardRequest::Disconnect { user: 9, reply }) => reply.send(1).is_ok(),
                _ => false,
            }
        });
        serve_one(server, &shards);
        assert!(shard.join().expect("shard"), "the request was run");
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut client, &mut answer).expect("answer");
        assert_eq!(
            serde_json::from_str::<Answer>(answer.trim()).expect("an answer"),
            Answer::Disconnected {
                user: 9,
                connections: 1
            }
        );
    }

    /// A purge that a busy shard could not take logs no one out: every shard's queue is
    /// checked for room first. Before, the disconnects went to the shards in turn, and one
    /// with a full queue stopped the purge after the shards before it had closed the user's
    /// connections (with the code that tells the SDK to stop).
    #[test]
    fn a_purge_a_busy_shard_cannot_take_logs_no_one_out() {
        let (shards, receivers) = Shards::new(2);
        let user = (1..)
            .find(|user| courier_core::placement::home_shard(*user, 2) == 0)
            .expect("a user homed on shard 0");
        // Shard 1's queue is full (wedged behind earlier requests).
        for _ in 0..SHARD_QUEUE_MAX {
            let (reply, _answer) = flume::bounded(1);
            shards.senders[1]
                .try_send(ShardRequest::Disconnect { user: 1, reply })
                .expect("room");
        }
        // The home shard takes the purge's check.
        let home = receivers[0].clone();
        let checker = std::thread::spawn(move || {
            match home.recv_timeout(std::time::Duration::from_secs(10)) {
                Ok(ShardRequest::CheckPurge { reply, .. }) => reply.send(Ok(())).is_ok(),
                _ => false,
            }
        });
        let answer = execute(Command::Purge { user }, &shards);
        assert!(checker.join().expect("checker"), "the check was asked");
        assert!(
            matches!(&answer, Answer::Error { message } if message.contains("shard 1's queue is full")),
            "{answer:?}"
        );
        assert!(
            receivers[0].try_recv().is_err(),
            "shard 0 was told to disconnect the user"
        );
    }

    /// A connection from another user is refused, one from the edge's own user served: what
    /// the socket's mode says, checked again for connections made before it was set. The
    /// other user is `nobody` (65534), through `setpriv`, which needs root (as CI has).
    #[test]
    fn only_the_edges_user_or_root_may_give_commands() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("control.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
                .expect("open the directory to all");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))
                .expect("open the socket to all");
        }
        let own = UnixStream::connect(&path).expect("connect as this user");
        let (served, _) = listener.accept().expect("accept");
        assert_eq!(peer_allowed(&served), Ok(()));
        drop(own);

        let connect = format!(
            "import socket, time; s = socket.socket(socket.AF_UNIX); s.connect({:?}); \
             time.sleep(2)",
            path.display().to_string()
        );
        // The distribution's python3: one under root's home cannot be run as nobody.
        let mut other = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
            ])
            .arg(&connect)
            .spawn()
            .expect("run python3 as nobody (needs root and setpriv)");
        listener.set_nonblocking(true).expect("nonblocking");
        let mut accepted = None;
        for _ in 0..100 {
            match listener.accept() {
                Ok((stream, _)) => {
                    accepted = Some(stream);
                    break;
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Ok(Some(status)) = other.try_wait() {
                        panic!("the connection as nobody failed: {status}");
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(error) => panic!("accept: {error}"),
            }
        }
        let refused = accepted.expect("a connection as nobody within 10 s");
        let verdict = peer_allowed(&refused);
        let _ = other.kill();
        let _ = other.wait();
        let message = verdict.expect_err("another user is refused");
        assert!(message.contains("user 65534 may not control"), "{message}");
    }
}
