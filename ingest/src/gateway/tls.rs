//! TLS for the gateway (rustls): the server certificate, and client certificates as a second
//! way in. A certificate signed by `client_ca` whose subject CN (or first DNS SAN) is a vehicle
//! id authenticates that vehicle; a client without one may still use a token over TLS; a
//! certificate from another CA fails the TLS handshake.

use std::path::Path;
use std::sync::Arc;

use ntex_io::IoBoxed;
use ntex_tls::rustls::PeerCertChain;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::{Error, Result};

fn tls_err(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Tls(format!("{what} {}: {e}", path.display()))
}

/// The server's TLS configuration: its certificate chain and key, and the CA that signs
/// vehicles' client certificates (optional).
pub(crate) fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| tls_err(cert, "reading the certificate", e))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| tls_err(cert, "reading the certificate", e))?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err(key, "reading the key", e))?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| tls_err(ca, "reading the client CA", e))? {
                let c = c.map_err(|e| tls_err(ca, "reading the client CA", e))?;
                roots.add(c).map_err(|e| tls_err(ca, "adding the client CA", e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| tls_err(ca, "the client CA", e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(chain, key_der).map_err(|e| tls_err(cert, "the certificate", e))?;
    Ok(Arc::new(config))
}

/// The vehicle a connection's verified client certificate names: its subject CN, else its
/// first DNS SAN. `None` without TLS or without a client certificate.
pub(crate) fn peer_vehicle(io: &IoBoxed) -> Option<String> {
    let chain = io.query::<PeerCertChain<'static>>();
    let leaf = chain.as_ref()?.0.first()?;
    vehicle_of_certificate(leaf.as_ref())
}

/// The vehicle id a certificate (DER) names.
pub(crate) fn vehicle_of_certificate(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned);
    let san = || {
        let ext = cert.subject_alternative_name().ok()??;
        ext.value.general_names.iter().find_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
    };
    cn.or_else(san).filter(|id| fleetpipe_processors::validate::vehicle_id(id).is_ok())
}
