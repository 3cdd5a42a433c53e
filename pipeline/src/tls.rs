//! TLS toward the services fleetpipe connects to (an MQTT broker, Postgres, Redis): one way to
//! turn a section's `tls_ca`, `tls_cert` and `tls_key` into a rustls client configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A section's TLS files (PEM): the CA that signs the server's certificate (else the system's
/// roots), and a client certificate with its key for mutual TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// The section the files come from, for errors (`[postgres]`).
    pub section: &'static str,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A client certificate chain and its key, PEM.
pub type ClientPem = (Vec<u8>, Vec<u8>);

/// Why a TLS configuration could not be built; each names the section and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{section} {what} {path}: {detail}")]
    File { section: &'static str, what: &'static str, path: PathBuf, detail: String },
    #[error("{section} no system CA certificates found; set tls_ca")]
    NoRoots { section: &'static str },
    #[error("{section} tls_cert and tls_key go together")]
    HalfPair { section: &'static str },
    #[error("{section} {0}", section = .1)]
    Rustls(String, &'static str),
}

impl TlsFiles {
    /// Whether any file is set (TLS asked for by configuration).
    pub fn any(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    fn err(&self, what: &'static str, path: &Path, e: &dyn std::fmt::Display) -> TlsError {
        TlsError::File { section: self.section, what, path: path.to_owned(), detail: e.to_string() }
    }

    /// The CA certificates as PEM bytes, if `ca` is set.
    pub fn ca_pem(&self) -> Result<Option<Vec<u8>>, TlsError> {
        self.ca.as_ref().map(|p| std::fs::read(p).map_err(|e| self.err("reading the CA", p, &e))).transpose()
    }

    /// The client certificate chain and key as PEM bytes, if both are set.
    pub fn client_pem(&self) -> Result<Option<ClientPem>, TlsError> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let c =
                    std::fs::read(cert).map_err(|e| self.err("reading the client certificate", cert, &e))?;
                let k = std::fs::read(key).map_err(|e| self.err("reading the client key", key, &e))?;
                Ok(Some((c, k)))
            }
            (None, None) => Ok(None),
            _ => Err(TlsError::HalfPair { section: self.section }),
        }
    }

    /// The rustls client configuration: roots from `ca` (else the system's), and the client
    /// certificate when one is set. Uses the ring provider.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca {
            Some(ca) => {
                for c in CertificateDer::pem_file_iter(ca).map_err(|e| self.err("reading the CA", ca, &e))? {
                    let c = c.map_err(|e| self.err("reading the CA", ca, &e))?;
                    roots.add(c).map_err(|e| self.err("adding the CA", ca, &e))?;
                }
            }
            None => {
                for c in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(c);
                }
                if roots.is_empty() {
                    return Err(TlsError::NoRoots { section: self.section });
                }
            }
        }
        let builder =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsError::Rustls(e.to_string(), self.section))?
                .with_root_certificates(roots);
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| self.err("reading the client certificate", cert, &e))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| self.err("reading the client certificate", cert, &e))?;
                let key_der = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| self.err("reading the client key", key, &e))?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| self.err("using the client certificate", cert, &e))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(TlsError::HalfPair { section: self.section }),
        };
        Ok(Arc::new(config))
    }
}

/// Installs ring as the process's default rustls provider (for libraries that build their own
/// configuration, such as the Redis client); a no-op when one is installed.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_names_the_section_and_the_path() {
        let files =
            TlsFiles { section: "[postgres]", ca: Some("/nonexistent/ca.pem".into()), ..TlsFiles::default() };
        let e = files.client_config().unwrap_err().to_string();
        assert!(e.starts_with("[postgres] reading the CA /nonexistent/ca.pem: "), "{e}");
    }

    #[test]
    fn a_certificate_without_its_key_is_refused() {
        let files = TlsFiles { section: "[redis]", cert: Some("/x.pem".into()), ..TlsFiles::default() };
        assert_eq!(files.client_pem().unwrap_err().to_string(), "[redis] tls_cert and tls_key go together");
        assert!(files.any());
        assert!(!TlsFiles::default().any());
    }
}
