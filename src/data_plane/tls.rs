//! TLS with rustls (ring provider; no OpenSSL).
//!
//! Upstream side: [`UpstreamTls`] connects to `https://` backends, verifying
//! against webpki roots or a service's `upstream_ca`, or (flagged loudly)
//! not at all.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The crypto provider used everywhere.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file; the error names the file.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect();
    let certs = certs.map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate found", path.display()));
    }
    Ok(certs)
}

/// Client-side TLS for the backends of one service. Its settings are
/// swapped when a reload re-reads `upstream_ca`; backends keep their
/// `Arc<UpstreamTls>`.
pub struct UpstreamTls {
    config: arc_swap::ArcSwap<ClientConfig>,
    ca: Option<std::path::PathBuf>,
    insecure: bool,
}

impl UpstreamTls {
    /// Verifies against `ca` (PEM bundle) if given, else the webpki roots;
    /// `insecure` turns verification off.
    pub(crate) fn new(ca: Option<&Path>, insecure: bool) -> Result<UpstreamTls, String> {
        Ok(UpstreamTls {
            config: arc_swap::ArcSwap::new(Self::client_config(ca, insecure)?),
            ca: ca.map(Path::to_path_buf),
            insecure,
        })
    }

    /// Re-reads the CA file: the settings to [`install`](Self::install)
    /// once every other file of a reload has loaded too.
    pub(crate) fn reread(&self) -> Result<Arc<ClientConfig>, String> {
        Self::client_config(self.ca.as_deref(), self.insecure)
    }

    /// New connections (and health checks) use `config` from now on.
    pub(crate) fn install(&self, config: Arc<ClientConfig>) {
        self.config.store(config);
    }

    fn client_config(ca: Option<&Path>, insecure: bool) -> Result<Arc<ClientConfig>, String> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?;
        let mut config = if insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
                .with_no_client_auth()
        } else {
            let mut roots = RootCertStore::empty();
            match ca {
                Some(path) => {
                    for cert in read_certs(path)? {
                        roots
                            .add(cert)
                            .map_err(|e| format!("{}: {e}", path.display()))?;
                    }
                }
                None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        // Backends are spoken to in HTTP/1.1.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// TLS handshake on `tcp`, with SNI (and verification) for `host`.
    pub(crate) async fn connect(
        &self,
        host: &str,
        tcp: TcpStream,
    ) -> io::Result<TlsStream<TcpStream>> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        TlsConnector::from(self.config.load_full())
            .connect(name, tcp)
            .await
    }
}

/// Accepts any server certificate (`upstream_insecure_skip_verify`).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

// ===== Server side =====

/// One loaded certificate: chain + key, and the names it serves.
#[derive(Debug)]
struct LoadedCert {
    key: Arc<rustls::sign::CertifiedKey>,
    /// Exact DNS names (lowercase).
    exact: Vec<String>,
    /// Wildcard names as suffixes (`*.example.com` → `.example.com`).
    wildcard: Vec<String>,
}

/// Chooses a certificate by SNI: exact name, then wildcard, else the first
/// certificate (also for clients that send no SNI).
#[derive(Debug)]
struct SniResolver {
    certs: Vec<LoadedCert>,
}

impl SniResolver {
    fn pick(&self, sni: Option<&str>) -> Option<&LoadedCert> {
        if let Some(name) = sni {
            let name = name.to_ascii_lowercase();
            let name = name.strip_suffix('.').unwrap_or(&name);
            if let Some(c) = self
                .certs
                .iter()
                .find(|c| c.exact.iter().any(|e| e == name))
            {
                return Some(c);
            }
            // A wildcard covers exactly one label.
            if let Some(dot) = name.find('.') {
                let suffix = &name[dot..];
                if let Some(c) = self
                    .certs
                    .iter()
                    .find(|c| c.wildcard.iter().any(|w| w == suffix))
                {
                    return Some(c);
                }
            }
        }
        self.certs.first()
    }
}

impl rustls::server::ResolvesServerCert for SniResolver {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.pick(hello.server_name()).map(|c| Arc::clone(&c.key))
    }
}

/// Loads one `[[proxy.tls]]` entry, checking that the key matches the
/// certificate and that the certificate is currently valid. Errors name the
/// file at fault.
fn load_cert(entry: &crate::config::TlsCertConfig) -> Result<LoadedCert, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    let chain = read_certs(&entry.cert)?;
    let key = PrivateKeyDer::from_pem_file(&entry.key)
        .map_err(|e| format!("{}: {e}", entry.key.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("{}: unsupported private key: {e}", entry.key.display()))?;
    let certified = rustls::sign::CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        // `Unknown`: the provider cannot tell; the handshake would show it.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(format!(
                "{}: private key does not match certificate {}",
                entry.key.display(),
                entry.cert.display()
            ))
        }
        Err(e) => return Err(format!("{}: {e}", entry.cert.display())),
    }
    let leaf = certified
        .cert
        .first()
        .ok_or_else(|| format!("{}: no certificate", entry.cert.display()))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("{}: cannot parse certificate: {e}", entry.cert.display()))?;
    let validity = parsed.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > validity.not_after {
        return Err(format!(
            "{}: certificate expired on {}",
            entry.cert.display(),
            validity.not_after
        ));
    }
    if now < validity.not_before {
        return Err(format!(
            "{}: certificate not valid before {}",
            entry.cert.display(),
            validity.not_before
        ));
    }
    let mut exact = Vec::new();
    let mut wildcard = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(n) = name {
                let n = n.to_ascii_lowercase();
                match n.strip_prefix('*') {
                    Some(suffix) if suffix.starts_with('.') => wildcard.push(suffix.to_string()),
                    _ => exact.push(n),
                }
            }
        }
    }
    if exact.is_empty() && wildcard.is_empty() {
        // Old-style certificate: fall back to the subject CN.
        for cn in parsed.subject().iter_common_name() {
            if let Ok(n) = cn.as_str() {
                let n = n.to_ascii_lowercase();
                match n.strip_prefix('*') {
                    Some(suffix) if suffix.starts_with('.') => wildcard.push(suffix.to_string()),
                    _ => exact.push(n),
                }
            }
        }
    }
    Ok(LoadedCert {
        key: Arc::new(certified),
        exact,
        wildcard,
    })
}

/// Builds a rustls server config from `[[proxy.tls]]`: TLS 1.2 and 1.3,
/// ALPN `h2` and `http/1.1`, certificate by SNI. Each problem comes with the
/// config line of its `[[proxy.tls]]` entry (0: none).
pub(crate) fn server_config(
    entries: &[crate::config::TlsCertConfig],
) -> Result<Arc<rustls::ServerConfig>, Vec<(usize, String)>> {
    let mut certs = Vec::new();
    let mut errors = Vec::new();
    for e in entries {
        match load_cert(e) {
            Ok(c) => certs.push(c),
            Err(msg) => errors.push((e.line, msg)),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    if certs.is_empty() {
        return Err(vec![(0, "no [[proxy.tls]] certificate configured".into())]);
    }
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| vec![(0, e.to_string())])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { certs }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS listener's acceptor; its config is swapped on reload so new
/// handshakes use new certificates while open connections keep theirs.
pub(crate) struct ServerTls {
    config: arc_swap::ArcSwap<rustls::ServerConfig>,
}

impl ServerTls {
    /// An acceptor using `config`.
    pub(crate) fn new(config: Arc<rustls::ServerConfig>) -> ServerTls {
        ServerTls {
            config: arc_swap::ArcSwap::new(config),
        }
    }

    /// Replaces the config for new handshakes.
    pub(crate) fn replace(&self, config: Arc<rustls::ServerConfig>) {
        self.config.store(config);
    }

    /// Runs the handshake on `tcp`.
    pub(crate) async fn accept(
        &self,
        tcp: TcpStream,
    ) -> io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.load_full());
        acceptor.accept(tcp).await
    }
}
