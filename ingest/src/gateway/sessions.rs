//! Who is connected under which client id, and which persistent sessions exist.
//!
//! MQTT asks of a server, for a publisher, little session state: whether the session exists
//! (CONNACK's session present) and, for QoS 2, the packet ids in flight — fleetpipe grants at
//! most QoS 1, so existence is all. A persistent session (MQTT 3.1.1 clean session 0, MQTT 5 a
//! session expiry without clean start) is written to `{data_dir}/_fleetpipe/gateway-sessions`
//! and `fsync`ed before the CONNACK that creates it, so that after a restart — graceful or
//! `kill -9` — the client is told `session present` and resends what was not acknowledged.
//! Writes share `fsync`s (a group commit on a thread of their own), so a reconnect storm costs
//! a few syncs, not one per client.
//!
//! A client id is taken over only by the identity that holds it: the new connection replaces
//! the old one, which is told to close. A session is tied to its identity, so another identity
//! never resumes it.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::{Error, Result};

/// Why a connection is told to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kick {
    /// Its client id connected again.
    TakenOver,
    /// The instance is draining.
    Shutdown,
}

/// A connected client.
struct Connected {
    identity: String,
    conn: u64,
    kick: Option<oneshot::Sender<Kick>>,
}

/// One line of the session file: a session that exists until `expires` (unix seconds), or
/// that ended (`expires` null).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Line {
    identity: String,
    client: String,
    expires: Option<u64>,
}

/// The answer to a CONNECT.
pub(crate) enum Admit {
    /// Accepted: the connection's id, the channel that tells it to go, and whether its session
    /// existed.
    Yes { conn: u64, kick: oneshot::Receiver<Kick>, session_present: bool },
    /// The client id is connected under another identity.
    TakenByOther,
}

/// The client ids of an instance.
pub(crate) struct Sessions {
    connected: Mutex<HashMap<String, Connected>>,
    /// Persistent sessions: (identity, client id) → expiry (unix seconds).
    stored: Mutex<HashMap<(String, String), u64>>,
    next_conn: AtomicU64,
    writer: Option<std::sync::mpsc::Sender<(Line, oneshot::Sender<Result<()>>)>>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Sessions {
    /// Opens (and compacts) the session file at `path`, dropping expired sessions.
    pub(crate) fn open(path: &Path) -> Result<Arc<Sessions>> {
        let fail = |detail: String| Error::Sessions { path: path.to_path_buf(), detail };
        let mut stored = HashMap::new();
        match fs::read_to_string(path) {
            Ok(text) => {
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    // A torn last line (a crash mid-append) is simply not there.
                    let Ok(l) = serde_json::from_str::<Line>(line) else { continue };
                    match l.expires {
                        Some(t) => stored.insert((l.identity, l.client), t),
                        None => stored.remove(&(l.identity, l.client)),
                    };
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e.to_string())),
        }
        let now = now_secs();
        stored.retain(|_, expires| *expires > now);
        // Compact: the live sessions only, written aside and renamed.
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        }
        let tmp = path.with_extension("tmp");
        {
            let mut f = File::create(&tmp).map_err(|e| fail(e.to_string()))?;
            for ((identity, client), expires) in &stored {
                let line =
                    Line { identity: identity.clone(), client: client.clone(), expires: Some(*expires) };
                let text = serde_json::to_string(&line).map_err(|e| fail(e.to_string()))?;
                writeln!(f, "{text}").map_err(|e| fail(e.to_string()))?;
            }
            f.sync_all().map_err(|e| fail(e.to_string()))?;
        }
        fs::rename(&tmp, path).map_err(|e| fail(e.to_string()))?;
        let file = OpenOptions::new().append(true).open(path).map_err(|e| fail(e.to_string()))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let target = path.to_path_buf();
        std::thread::Builder::new()
            .name("gateway-sessions".into())
            .spawn(move || write_loop(file, target, rx))
            .map_err(|e| fail(e.to_string()))?;
        tracing::info!(file = %path.display(), sessions = stored.len(), "gateway sessions loaded");
        Ok(Arc::new(Sessions {
            connected: Mutex::new(HashMap::new()),
            stored: Mutex::new(stored),
            next_conn: AtomicU64::new(1),
            writer: Some(tx),
        }))
    }

    /// Sessions kept in memory only (tests of the handlers).
    #[cfg(test)]
    pub(crate) fn in_memory() -> Arc<Sessions> {
        Arc::new(Sessions {
            connected: Mutex::new(HashMap::new()),
            stored: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            writer: None,
        })
    }

    /// A CONNECT from `identity` as `client`: a session kept for `expiry_secs` (0: none, it ends
    /// with the connection), `clean` discarding any earlier one. Takes the client id over from
    /// a connection of the same identity. Returns once a new persistent session is durable.
    pub(crate) async fn admit(
        &self,
        identity: &str,
        client: &str,
        clean: bool,
        expiry_secs: u64,
    ) -> Result<Admit> {
        let (tx, rx) = oneshot::channel();
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        {
            let mut connected = lock(&self.connected);
            if let Some(old) = connected.get_mut(client) {
                if old.identity != identity {
                    return Ok(Admit::TakenByOther);
                }
                if let Some(kick) = old.kick.take() {
                    let _ = kick.send(Kick::TakenOver);
                }
            }
            connected
                .insert(client.to_owned(), Connected { identity: identity.to_owned(), conn, kick: Some(tx) });
        }
        let key = (identity.to_owned(), client.to_owned());
        let now = now_secs();
        let (existed, write) = {
            let mut stored = lock(&self.stored);
            let existed = stored.get(&key).is_some_and(|t| *t > now);
            let previous = if clean { stored.remove(&key) } else { stored.get(&key).copied() };
            let write = if expiry_secs > 0 {
                let expires = now.saturating_add(expiry_secs);
                stored.insert(key.clone(), expires);
                // On disk when new, and again when the stored expiry lags by more than a day.
                previous.is_none_or(|t| t.saturating_add(86_400) < expires).then_some(Some(expires))
            } else if previous.is_some() && clean {
                Some(None)
            } else {
                None
            };
            (existed && !clean, write)
        };
        if let Some(expires) = write {
            self.persist(Line { identity: key.0, client: key.1, expires }).await?;
        }
        Ok(Admit::Yes { conn, kick: rx, session_present: existed })
    }

    async fn persist(&self, line: Line) -> Result<()> {
        let Some(writer) = &self.writer else { return Ok(()) };
        let (tx, rx) = oneshot::channel();
        writer
            .send((line, tx))
            .map_err(|_| Error::Sessions { path: PathBuf::new(), detail: "writer stopped".into() })?;
        rx.await.unwrap_or_else(|_| {
            Err(Error::Sessions { path: PathBuf::new(), detail: "writer stopped".into() })
        })
    }

    /// The connection `conn` of `client` ended (a taken-over one no longer owns the client id).
    pub(crate) fn gone(&self, client: &str, conn: u64) {
        let mut connected = lock(&self.connected);
        if connected.get(client).is_some_and(|c| c.conn == conn) {
            connected.remove(client);
        }
    }

    /// Tells every connection to go (the drain).
    pub(crate) fn kick_all(&self) {
        for c in lock(&self.connected).values_mut() {
            if let Some(kick) = c.kick.take() {
                let _ = kick.send(Kick::Shutdown);
            }
        }
    }

    /// Connections now.
    pub(crate) fn connected(&self) -> usize {
        lock(&self.connected).len()
    }
}

/// Appends session lines in groups, one `fdatasync` per group.
fn write_loop(
    mut file: File,
    path: PathBuf,
    rx: std::sync::mpsc::Receiver<(Line, oneshot::Sender<Result<()>>)>,
) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        group.extend(rx.try_iter());
        let mut body = Vec::new();
        for (line, _) in &group {
            if let Ok(text) = serde_json::to_string(line) {
                body.extend_from_slice(text.as_bytes());
                body.push(b'\n');
            }
        }
        let result = file.write_all(&body).and_then(|()| file.sync_data());
        for (_, done) in group {
            let _ = done.send(
                result
                    .as_ref()
                    .map(drop)
                    .map_err(|e| Error::Sessions { path: path.clone(), detail: e.to_string() }),
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn present(a: Admit) -> bool {
        match a {
            Admit::Yes { session_present, .. } => session_present,
            Admit::TakenByOther => panic!("refused"),
        }
    }

    #[tokio::test]
    async fn a_persistent_session_is_present_after_a_reopen_and_a_clean_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions");
        {
            let s = Sessions::open(&path).unwrap();
            assert!(!present(s.admit("VAN-1", "c1", false, 3600).await.unwrap()));
            assert!(!present(s.admit("VAN-2", "c2", true, 0).await.unwrap()));
        }
        let s = Sessions::open(&path).unwrap();
        assert!(present(s.admit("VAN-1", "c1", false, 3600).await.unwrap()));
        assert!(!present(s.admit("VAN-2", "c2", false, 3600).await.unwrap()));
        // Clean start discards it.
        assert!(!present(s.admit("VAN-1", "c1", true, 3600).await.unwrap()));
        // Another identity never resumes it.
        s.gone("c1", 3);
        assert!(!present(s.admit("VAN-9", "c1", false, 3600).await.unwrap()));
    }

    #[tokio::test]
    async fn a_client_id_is_taken_over_only_by_its_own_identity() {
        let s = Sessions::in_memory();
        let Admit::Yes { kick, conn, .. } = s.admit("VAN-1", "c1", true, 0).await.unwrap() else { panic!() };
        assert!(matches!(s.admit("VAN-2", "c1", true, 0).await.unwrap(), Admit::TakenByOther));
        let Admit::Yes { conn: second, .. } = s.admit("VAN-1", "c1", true, 0).await.unwrap() else {
            panic!()
        };
        assert_eq!(kick.await.unwrap(), Kick::TakenOver);
        // The old connection's end does not remove the new one.
        s.gone("c1", conn);
        assert_eq!(s.connected(), 1);
        s.gone("c1", second);
        assert_eq!(s.connected(), 0);
    }
}
