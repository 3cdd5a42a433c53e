//! Identity (CONTRACT.md §8): who is talking, and for which vehicles it may speak.
//!
//! A credential is a random token (256 bits, shown once when made, stored only as its SHA-256)
//! bound to one vehicle id, or to a scope of vehicle ids for a gateway or a backend (exact ids
//! and `PREFIX*` patterns; `*` is every vehicle). Tokens are high-entropy, so a plain SHA-256 is
//! the right store: a slow password hash would cap the connect rate and protect nothing more.
//! A credential may also bind a tracker's IMEI to its vehicle (device protocols that identify by
//! IMEI).
//!
//! Credentials live in one file (`{data_dir}/credentials`, or `[auth] credentials_file`, which
//! several instances may share), one JSON object per line. [`Credentials::watch`] re-reads it
//! when it changes, so `fleetpipe credentials add|revoke` take effect on a running instance
//! within seconds; the CLI writes it aside and renames it, so a reader never sees half a file.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// How often a running instance looks at the credentials file.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// `[auth] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Credentials (or client certificates) required on every door.
    Token,
    /// Anyone may speak for any vehicle.
    None,
}

/// `[auth]`: who may connect.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Unset: `none` when every listener is on a loopback address, `token` otherwise.
    pub mode: Option<AuthMode>,
    /// The credentials file; unset: `{data_dir}/credentials`.
    pub credentials_file: Option<PathBuf>,
}

impl AuthConfig {
    /// The credentials file of an instance whose data directory is `data_dir`.
    pub fn file(&self, data_dir: &Path) -> PathBuf {
        self.credentials_file.clone().unwrap_or_else(|| data_dir.join("credentials"))
    }

    /// The mode in force for these listeners: as configured, else `none` when all of them are
    /// on loopback and `token` otherwise.
    pub fn effective_mode(&self, listeners: &[SocketAddr]) -> AuthMode {
        match self.mode {
            Some(mode) => mode,
            None if listeners.iter().all(|a| a.ip().is_loopback()) => AuthMode::None,
            None => AuthMode::Token,
        }
    }
}

/// Which vehicles a credential speaks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Scope {
    /// Exactly one vehicle (a vehicle's own credential).
    Vehicle { vehicle_id: String },
    /// Exact ids and `PREFIX*` patterns (`*` alone: every vehicle).
    Patterns { patterns: Vec<String> },
}

impl Scope {
    /// Whether `vehicle_id` is inside this scope.
    pub fn allows(&self, vehicle_id: &str) -> bool {
        match self {
            Scope::Vehicle { vehicle_id: own } => own == vehicle_id,
            Scope::Patterns { patterns } => patterns.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => vehicle_id.starts_with(prefix),
                None => p == vehicle_id,
            }),
        }
    }
}

/// One line of the credentials file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// The vehicle id, or the credential's name for a scoped one: the MQTT username.
    pub name: String,
    #[serde(flatten)]
    pub scope: Scope,
    /// `sha256:` and the hex SHA-256 of the token.
    pub token_sha256: String,
    /// A tracker bound to this vehicle (Teltonika's IMEI handshake).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imei: Option<String>,
    /// When it was made (RFC 3339), for `credentials list`.
    pub created: String,
}

/// Who a connection or request is, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// `[auth] mode = "none"`: anyone, for any vehicle.
    Anyone,
    /// A credential (by its name) and what it may speak for.
    Credential { name: String, scope: Scope },
    /// A vehicle authenticated by its client certificate.
    Certificate { vehicle_id: String },
}

impl Identity {
    /// Whether this identity may speak for `vehicle_id`.
    pub fn allows(&self, vehicle_id: &str) -> bool {
        match self {
            Identity::Anyone => true,
            Identity::Credential { scope, .. } => scope.allows(vehicle_id),
            Identity::Certificate { vehicle_id: own } => own == vehicle_id,
        }
    }

    /// A stable name for the identity (sessions are tied to it).
    pub fn key(&self) -> &str {
        match self {
            Identity::Anyone => "",
            Identity::Credential { name, .. } => name,
            Identity::Certificate { vehicle_id } => vehicle_id,
        }
    }
}

/// Why a credential was refused (the `reason` label of `fleetpipe_auth_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No username or no password.
    Missing,
    /// No credential of that name.
    UnknownName,
    /// The token does not match.
    BadToken,
}

impl Refusal {
    pub fn code(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::UnknownName => "unknown",
            Refusal::BadToken => "bad_token",
        }
    }
}

/// `sha256:<hex>` of a token.
pub fn token_hash(token: &[u8]) -> String {
    let digest = Sha256::digest(token);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Equal without leaking where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The credentials of one file, indexed for the doors.
#[derive(Debug, Default)]
struct Index {
    by_name: HashMap<String, Credential>,
    by_hash: HashMap<String, String>,
    by_imei: HashMap<String, String>,
}

impl Index {
    fn new(list: Vec<Credential>) -> Index {
        let mut index = Index::default();
        for c in list {
            index.by_hash.insert(c.token_sha256.clone(), c.name.clone());
            if let Some(imei) = &c.imei {
                index.by_imei.insert(imei.clone(), c.name.clone());
            }
            index.by_name.insert(c.name.clone(), c);
        }
        index
    }
}

/// The credentials a running instance checks against; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Credentials {
    path: PathBuf,
    index: Arc<RwLock<Arc<Index>>>,
}

/// What identifies a version of the file on disk.
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Credentials {
    /// Loads `path` (a missing file holds no credentials).
    pub fn load(path: &Path) -> Result<Credentials> {
        let list = read_file(path)?;
        Ok(Credentials { path: path.to_path_buf(), index: Arc::new(RwLock::new(Arc::new(Index::new(list)))) })
    }

    fn current(&self) -> Arc<Index> {
        self.index.read().map(|i| Arc::clone(&i)).unwrap_or_else(|p| Arc::clone(&p.into_inner()))
    }

    /// Re-reads the file now; keeps the old credentials when it does not parse.
    pub fn reload(&self) -> Result<()> {
        let list = read_file(&self.path)?;
        let index = Arc::new(Index::new(list));
        match self.index.write() {
            Ok(mut slot) => *slot = index,
            Err(p) => *p.into_inner() = index,
        }
        Ok(())
    }

    /// Re-reads the file whenever it changes, every [`RELOAD_EVERY`], on a thread of its own
    /// (a stat a second), for as long as the process runs.
    pub fn watch(&self) {
        let creds = self.clone();
        let mut last = stamp(&self.path);
        let spawned = std::thread::Builder::new().name("credentials".into()).spawn(move || loop {
            std::thread::sleep(RELOAD_EVERY);
            let now = stamp(&creds.path);
            if now == last {
                continue;
            }
            last = now;
            match creds.reload() {
                Ok(()) => tracing::info!(file = %creds.path.display(), credentials = creds.len(), "credentials reloaded"),
                Err(e) => tracing::warn!(file = %creds.path.display(), error = %e, "credentials file not reloaded"),
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not watch the credentials file; changes need a restart");
        }
    }

    pub fn len(&self) -> usize {
        self.current().by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The identity of `name` with `token` (MQTT username and password).
    pub fn check(&self, name: Option<&str>, token: Option<&[u8]>) -> std::result::Result<Identity, Refusal> {
        let (Some(name), Some(token)) = (name, token) else { return Err(Refusal::Missing) };
        let index = self.current();
        let Some(c) = index.by_name.get(name) else { return Err(Refusal::UnknownName) };
        if same(token_hash(token).as_bytes(), c.token_sha256.as_bytes()) {
            Ok(Identity::Credential { name: c.name.clone(), scope: c.scope.clone() })
        } else {
            Err(Refusal::BadToken)
        }
    }

    /// The identity of a bearer token alone (HTTP).
    pub fn check_token(&self, token: &[u8]) -> Option<Identity> {
        let index = self.current();
        let name = index.by_hash.get(&token_hash(token))?;
        let c = index.by_name.get(name)?;
        Some(Identity::Credential { name: c.name.clone(), scope: c.scope.clone() })
    }

    /// The vehicle a tracker's IMEI is bound to.
    pub fn vehicle_of_imei(&self, imei: &str) -> Option<String> {
        let index = self.current();
        let name = index.by_imei.get(imei)?;
        match &index.by_name.get(name)?.scope {
            Scope::Vehicle { vehicle_id } => Some(vehicle_id.clone()),
            Scope::Patterns { .. } => None,
        }
    }
}

fn read_file(path: &Path) -> Result<Vec<Credential>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(Error::Credentials { path: path.to_path_buf(), detail: source.to_string() })
        }
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::Credentials {
                path: path.to_path_buf(),
                detail: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

fn write_file(path: &Path, list: &[Credential]) -> Result<()> {
    let fail = |e: std::io::Error| Error::Credentials { path: path.to_path_buf(), detail: e.to_string() };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(fail)?;
    }
    let tmp = path.with_extension("tmp");
    let mut body = Vec::new();
    for c in list {
        let line = serde_json::to_string(c)
            .map_err(|e| Error::Credentials { path: path.to_path_buf(), detail: e.to_string() })?;
        body.extend_from_slice(line.as_bytes());
        body.push(b'\n');
    }
    {
        let mut f = fs::File::create(&tmp).map_err(fail)?;
        f.write_all(&body).map_err(fail)?;
        f.sync_all().map_err(fail)?;
    }
    fs::rename(&tmp, path).map_err(fail)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(fail)?;
    }
    Ok(())
}

/// 256 random bits as 64 hex digits.
fn new_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| Error::Config(format!("no randomness for a token: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What `fleetpipe credentials add` makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewCredential {
    /// A vehicle's own credential, optionally with its tracker's IMEI.
    Vehicle { vehicle_id: String, imei: Option<String> },
    /// A scoped credential for a gateway or a backend.
    Scoped { name: String, patterns: Vec<String> },
}

/// Adds a credential to the file and returns its token (the only time it is shown). A vehicle
/// or name that already has one gets a new token (the old one stops working).
pub fn add(path: &Path, new: NewCredential, created: &str) -> Result<String> {
    let mut list = read_file(path)?;
    let token = new_token()?;
    let (name, scope, imei) = match new {
        NewCredential::Vehicle { vehicle_id, imei } => {
            crate::check_vehicle_id(&vehicle_id)?;
            if let Some(imei) = &imei {
                check_imei(imei)?;
                if let Some(other) =
                    list.iter().find(|c| c.imei.as_deref() == Some(imei) && c.name != vehicle_id)
                {
                    return Err(Error::Config(format!("IMEI {imei} is already bound to {}", other.name)));
                }
            }
            (vehicle_id.clone(), Scope::Vehicle { vehicle_id }, imei)
        }
        NewCredential::Scoped { name, patterns } => {
            if name.is_empty() || patterns.is_empty() {
                return Err(Error::Config("a scoped credential needs --name and --scope".into()));
            }
            for p in &patterns {
                let id = p.strip_suffix('*').unwrap_or(p);
                if !id.is_empty() {
                    crate::check_vehicle_id(id)?;
                }
            }
            (name, Scope::Patterns { patterns }, None)
        }
    };
    list.retain(|c| c.name != name);
    list.push(Credential {
        name,
        scope,
        token_sha256: token_hash(token.as_bytes()),
        imei,
        created: created.to_owned(),
    });
    write_file(path, &list)?;
    Ok(token)
}

/// Removes the credential named `name` (a vehicle id or a credential name); `false` if none.
pub fn revoke(path: &Path, name: &str) -> Result<bool> {
    let mut list = read_file(path)?;
    let before = list.len();
    list.retain(|c| c.name != name);
    if list.len() == before {
        return Ok(false);
    }
    write_file(path, &list)?;
    Ok(true)
}

/// Every credential of the file (tokens are never stored, so never shown).
pub fn list(path: &Path) -> Result<Vec<Credential>> {
    read_file(path)
}

/// 15 digits passing the Luhn check, as real IMEIs do.
pub fn check_imei(imei: &str) -> Result<()> {
    let digits: Option<Vec<u32>> = imei.chars().map(|c| c.to_digit(10)).collect();
    let ok = match digits {
        Some(d) if d.len() == 15 => {
            let sum: u32 = d
                .iter()
                .rev()
                .enumerate()
                .map(|(i, &x)| if i % 2 == 1 { (x * 2) / 10 + (x * 2) % 10 } else { x })
                .sum();
            sum.is_multiple_of(10)
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!("{imei:?} is not an IMEI (15 digits with a valid Luhn check digit)")))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_vehicle_credential_admits_its_token_for_its_own_vehicle_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials");
        let token =
            add(&path, NewCredential::Vehicle { vehicle_id: "VAN-1".into(), imei: None }, "t").unwrap();
        assert_eq!(token.len(), 64);
        let creds = Credentials::load(&path).unwrap();
        let id = creds.check(Some("VAN-1"), Some(token.as_bytes())).unwrap();
        assert!(id.allows("VAN-1"));
        assert!(!id.allows("VAN-2"));
        assert_eq!(creds.check(Some("VAN-1"), Some(b"wrong")), Err(Refusal::BadToken));
        assert_eq!(creds.check(Some("VAN-9"), Some(token.as_bytes())), Err(Refusal::UnknownName));
        assert_eq!(creds.check(Some("VAN-1"), None), Err(Refusal::Missing));
        assert_eq!(creds.check_token(token.as_bytes()), Some(id));
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&token), "only the hash is stored: {text}");
    }

    #[test]
    fn scopes_take_exact_ids_and_prefix_patterns() {
        let scope = Scope::Patterns { patterns: vec!["VAN-7".into(), "TRUCK-*".into()] };
        assert!(scope.allows("VAN-7") && scope.allows("TRUCK-12"));
        assert!(!scope.allows("VAN-70") && !scope.allows("CAR-1"));
        assert!(Scope::Patterns { patterns: vec!["*".into()] }.allows("anything"));
    }

    #[test]
    fn revoking_removes_the_credential_and_a_reload_forgets_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials");
        let token =
            add(&path, NewCredential::Vehicle { vehicle_id: "VAN-1".into(), imei: None }, "t").unwrap();
        let creds = Credentials::load(&path).unwrap();
        assert!(creds.check(Some("VAN-1"), Some(token.as_bytes())).is_ok());
        assert!(revoke(&path, "VAN-1").unwrap());
        assert!(!revoke(&path, "VAN-1").unwrap());
        creds.reload().unwrap();
        assert_eq!(creds.check(Some("VAN-1"), Some(token.as_bytes())), Err(Refusal::UnknownName));
    }

    #[test]
    fn an_imei_binds_a_tracker_to_its_vehicle_and_must_pass_the_luhn_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials");
        let imei = Some("356307042441013".to_string());
        add(&path, NewCredential::Vehicle { vehicle_id: "VAN-1".into(), imei: imei.clone() }, "t").unwrap();
        assert_eq!(
            Credentials::load(&path).unwrap().vehicle_of_imei("356307042441013").as_deref(),
            Some("VAN-1")
        );
        assert!(add(&path, NewCredential::Vehicle { vehicle_id: "VAN-2".into(), imei }, "t").is_err());
        assert!(check_imei("356307042441014").is_err());
        assert!(check_imei("35630704244101").is_err());
    }

    #[test]
    fn the_default_mode_is_open_on_loopback_only() {
        let cfg = AuthConfig::default();
        let lo: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:1883".parse().unwrap();
        assert_eq!(cfg.effective_mode(&[lo]), AuthMode::None);
        assert_eq!(cfg.effective_mode(&[lo, any]), AuthMode::Token);
        let open = AuthConfig { mode: Some(AuthMode::None), ..AuthConfig::default() };
        assert_eq!(open.effective_mode(&[any]), AuthMode::None);
    }
}
