//! TLS termination (SNI, ALPN, key formats, reload) and TLS to upstreams,
//! with certificates made at test time by rcgen.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

// ===== Certificates =====

/// A test CA that signs leaf certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            der: cert.der().clone(),
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for `names` with a fresh P-256 key: (cert PEM, key PEM, cert DER).
    fn leaf(&self, names: &[&str]) -> Leaf {
        self.leaf_with(names, KeyPair::generate().unwrap(), |_| {})
    }

    fn leaf_with(
        &self,
        names: &[&str],
        key: KeyPair,
        edit: impl FnOnce(&mut CertificateParams),
    ) -> Leaf {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        edit(&mut params);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        roots
    }
}

struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl Leaf {
    /// Writes `NAME.pem` and `NAME.key` into `dir`.
    fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, &self.cert_pem).unwrap();
        std::fs::write(&k, &self.key_pem).unwrap();
        (c, k)
    }
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

/// `[proxy]` lines for a TLS listener with these (cert, key) files.
fn tls_lines(entries: &[(PathBuf, PathBuf)]) -> String {
    let mut s = String::from("tls_listen = \"127.0.0.1:0\"\n");
    for (c, k) in entries {
        s.push_str(&format!(
            "[[proxy.tls]]\ncert = \"{}\"\nkey = \"{}\"\n",
            c.display(),
            k.display()
        ));
    }
    s
}

async fn tls_proxy(
    dir: TempDir,
    entries: &[(PathBuf, PathBuf)],
    services: &[Svc],
) -> (TestProxy, SocketAddr) {
    let text = config_text(dir.path(), &tls_lines(entries), services);
    let proxy = TestProxy::start_text(dir, &text).await;
    let addr = proxy
        .running
        .as_ref()
        .unwrap()
        .tls_addr
        .expect("tls listener");
    (proxy, addr)
}

// ===== Clients =====

/// Accepts any certificate (signatures still checked): for looking at
/// which certificate the server chose.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
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
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client config verifying against `roots` (or nothing), offering `alpn`.
fn client(
    roots: Option<RootCertStore>,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let b = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap();
    let mut c = match roots {
        Some(r) => b.with_root_certificates(r).with_no_client_auth(),
        None => b
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider())))
            .with_no_client_auth(),
    };
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

const BOTH: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Handshake with `sni` (None: no SNI, as when connecting by IP address).
async fn connect(
    addr: SocketAddr,
    sni: Option<&str>,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = match sni {
        Some(n) => ServerName::try_from(n.to_string()).unwrap(),
        None => ServerName::IpAddress(addr.ip().into()),
    };
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// The leaf certificate the server presented.
fn served(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref()
        .1
        .peer_certificates()
        .expect("peer certificates")[0]
        .clone()
        .into_owned()
}

async fn served_for(addr: SocketAddr, sni: Option<&str>) -> CertificateDer<'static> {
    let tls = connect(addr, sni, client(None, &[], BOTH)).await.unwrap();
    served(&tls)
}

type H1 = hyper::client::conn::http1::SendRequest<Body>;

async fn h1(tls: TlsStream<TcpStream>) -> H1 {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

async fn h1_get(send: &mut H1, host: &str, path: &str) -> (StatusCode, String) {
    send.ready().await.unwrap();
    let req = Request::get(path)
        .header("host", host)
        .body(empty())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

// ===== Tests =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_h2_over_tls_chosen_by_alpn() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let ca = Ca::new("test ca");
    let dir = TempDir::new("tls-alpn");
    let files = ca.leaf(&["a.test"]).write(dir.path(), "a");
    let (proxy, addr) = tls_proxy(dir, &[files], &[Svc::new("web", &[&blue], &[&green])]).await;

    // ALPN h2 first: HTTP/2, verified against the CA for the name.
    let tls = connect(
        addr,
        Some("a.test"),
        client(Some(ca.roots()), &[b"h2", b"http/1.1"], BOTH),
    )
    .await
    .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let req = Request::get("https://a.test/headers")
            .body(empty())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(
            (resp.status(), resp.version()),
            (StatusCode::OK, Version::HTTP_2)
        );
        assert_eq!(resp.headers()["x-switchyard-pool"], "blue");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["headers"]["x-forwarded-proto"], "https", "{v}");
        assert_eq!(v["headers"]["host"], "a.test", "{v}");
    }

    // ALPN http/1.1 only, and no ALPN at all: HTTP/1.1, over TLS 1.2 too.
    for (alpn, versions) in [
        (&[&b"http/1.1"[..]][..], BOTH),
        (&[][..], &[&rustls::version::TLS12][..]),
    ] {
        let tls = connect(
            addr,
            Some("a.test"),
            client(Some(ca.roots()), alpn, versions),
        )
        .await
        .unwrap();
        let want_alpn = if alpn.is_empty() {
            None
        } else {
            Some(&b"http/1.1"[..])
        };
        assert_eq!(tls.get_ref().1.alpn_protocol(), want_alpn);
        let mut send = h1(tls).await;
        for _ in 0..2 {
            assert_eq!(
                h1_get(&mut send, "a.test", "/").await,
                (StatusCode::OK, "blue".to_string())
            );
        }
    }
    let metrics = proxy.admin.metrics().await;
    assert!(
        metric(
            &metrics,
            "switchyard_requests_total{code=\"2xx\",pool=\"blue\",service=\"web\"}"
        )
        .unwrap_or(0.0)
            >= 7.0,
        "{metrics}"
    );
    assert!(proxy.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_exact_then_wildcard_else_the_first_certificate() {
    let up = Upstream::start("up").await;
    let ca = Ca::new("test ca");
    let dir = TempDir::new("tls-sni");
    let default = ca.leaf(&["default.test"]);
    let exact = ca.leaf(&["a.test", "b.test"]);
    let wild = ca.leaf(&["*.wild.test"]);
    let entries = [
        default.write(dir.path(), "default"),
        exact.write(dir.path(), "exact"),
        wild.write(dir.path(), "wild"),
    ];
    let (proxy, addr) = tls_proxy(dir, &entries, &[Svc::new("web", &[&up], &[&up])]).await;

    assert_eq!(served_for(addr, Some("a.test")).await, exact.der);
    assert_eq!(
        served_for(addr, Some("B.TEST")).await,
        exact.der,
        "SNI is case-insensitive"
    );
    assert_eq!(served_for(addr, Some("x.wild.test")).await, wild.der);
    assert_eq!(
        served_for(addr, Some("deep.x.wild.test")).await,
        default.der,
        "a wildcard covers one label"
    );
    assert_eq!(served_for(addr, Some("wild.test")).await, default.der);
    assert_eq!(
        served_for(addr, Some("other.test")).await,
        default.der,
        "unknown name → first entry"
    );
    assert_eq!(
        served_for(addr, None).await,
        default.der,
        "no SNI → first entry"
    );
    // And a verifying client accepts each for its name.
    for name in ["a.test", "x.wild.test", "default.test"] {
        let tls = connect(addr, Some(name), client(Some(ca.roots()), &[], BOTH))
            .await
            .unwrap();
        let mut send = h1(tls).await;
        assert_eq!(h1_get(&mut send, name, "/").await.0, StatusCode::OK);
    }
    assert!(proxy.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_and_ec_keys_in_pkcs1_sec1_and_pkcs8() {
    let up = Upstream::start("up").await;
    let ca = Ca::new("test ca");
    let dir = TempDir::new("tls-keys");
    let mut entries = Vec::new();
    let mut leaves = Vec::new();
    for (name, pkcs8, file_form) in [
        ("rsa1", "rsa-pkcs8.key", "rsa-pkcs1.key"),
        ("rsa8", "rsa-pkcs8.key", "rsa-pkcs8.key"),
        ("ec1", "ec-pkcs8.key", "ec-sec1.key"),
    ] {
        let key = KeyPair::from_pem(&fixture(pkcs8)).unwrap();
        let host = format!("{name}.test");
        let leaf = ca.leaf_with(&[host.as_str()], key, |_| {});
        let (c, k) = leaf.write(dir.path(), name);
        std::fs::write(&k, fixture(file_form)).unwrap();
        entries.push((c, k));
        leaves.push((name, leaf));
    }
    // rcgen's own PKCS#8 P-256 key, and an Ed25519 key.
    let p256 = ca.leaf(&["ec8.test"]);
    entries.push(p256.write(dir.path(), "ec8"));
    leaves.push(("ec8", p256));
    let ed = ca.leaf_with(
        &["ed.test"],
        KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(),
        |_| {},
    );
    entries.push(ed.write(dir.path(), "ed"));
    leaves.push(("ed", ed));

    let (proxy, addr) = tls_proxy(dir, &entries, &[Svc::new("web", &[&up], &[&up])]).await;
    for (name, leaf) in &leaves {
        let host = format!("{name}.test");
        for versions in [
            &[&rustls::version::TLS13][..],
            &[&rustls::version::TLS12][..],
        ] {
            let tls = connect(addr, Some(&host), client(Some(ca.roots()), &[], versions))
                .await
                .unwrap_or_else(|e| panic!("{host} {versions:?}: {e}"));
            assert_eq!(served(&tls), leaf.der, "{host}");
            let mut send = h1(tls).await;
            assert_eq!(
                h1_get(&mut send, &host, "/").await,
                (StatusCode::OK, "up".to_string())
            );
        }
    }
    assert!(proxy.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_serves_a_new_certificate_and_keeps_open_connections() {
    let up = Upstream::start("up").await;
    let ca = Ca::new("test ca");
    let dir = TempDir::new("tls-reload");
    let old = ca.leaf(&["a.test"]);
    let (cert, key) = old.write(dir.path(), "a");
    let (proxy, addr) = tls_proxy(
        dir,
        &[(cert.clone(), key.clone())],
        &[Svc::new("web", &[&up], &[&up])],
    )
    .await;

    // An open HTTP/1.1 connection and an open h2 connection on the old certificate.
    let tls = connect(addr, Some("a.test"), client(Some(ca.roots()), &[], BOTH))
        .await
        .unwrap();
    assert_eq!(served(&tls), old.der);
    let mut open = h1(tls).await;
    assert_eq!(h1_get(&mut open, "a.test", "/").await.0, StatusCode::OK);
    let tls = connect(
        addr,
        Some("a.test"),
        client(Some(ca.roots()), &[b"h2"], BOTH),
    )
    .await
    .unwrap();
    let (mut open_h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);

    // A new certificate (and key) in the same files; reload.
    let new = ca.leaf(&["a.test"]);
    std::fs::write(&cert, &new.cert_pem).unwrap();
    std::fs::write(&key, &new.key_pem).unwrap();
    let (s, v) = proxy.admin.post("/api/v1/reload", "").await;
    assert_eq!(s, StatusCode::OK, "{v}");

    assert_eq!(
        served_for(addr, Some("a.test")).await,
        new.der,
        "new handshakes get the new certificate"
    );
    for _ in 0..3 {
        assert_eq!(
            h1_get(&mut open, "a.test", "/").await,
            (StatusCode::OK, "up".to_string()),
            "old HTTP/1.1 connection keeps working"
        );
        let resp = open_h2
            .send_request(Request::get("https://a.test/").body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::OK,
            "old h2 connection keeps working"
        );
    }

    // A broken certificate is refused, naming the file; the new one keeps serving.
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let (s, v) = proxy.admin.post("/api/v1/reload", "").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let msg = v["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains(&cert.display().to_string()), "{msg}");
    assert_eq!(served_for(addr, Some("a.test")).await, new.der);
    assert_eq!(h1_get(&mut open, "a.test", "/").await.0, StatusCode::OK);

    // A key that belongs to another certificate: refused, naming the key file.
    std::fs::write(&cert, &new.cert_pem).unwrap();
    std::fs::write(&key, ca.leaf(&["a.test"]).key_pem).unwrap();
    let (s, v) = proxy.admin.post("/api/v1/reload", "").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let msg = v["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains(&key.display().to_string()) && msg.contains("does not match"),
        "{msg}"
    );
    assert_eq!(served_for(addr, Some("a.test")).await, new.der);

    let metrics = proxy.admin.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "switchyard_config_reloads_total{result=\"error\"}"
        ),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "switchyard_config_reloads_total{result=\"ok\"}"),
        Some(1.0),
        "{metrics}"
    );
    drop(open);
    drop(open_h2);
    assert!(proxy.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_certificates_in_the_binary() {
    let up = Upstream::start("up").await;
    let ca = Ca::new("test ca");
    let dir = TempDir::new("tls-hup");
    let old = ca.leaf(&["a.test"]);
    let (cert, key) = old.write(dir.path(), "a");
    let text = config_text(
        dir.path(),
        &tls_lines(&[(cert.clone(), key.clone())]),
        &[Svc::new("web", &[&up], &[&up])],
    );
    let config = dir.join("switchyard.toml");
    std::fs::write(&config, text).unwrap();
    let p = tokio::task::spawn_blocking(move || ProxyProcess::spawn(&config, &[]))
        .await
        .unwrap()
        .unwrap();
    let ready = p.log_text();
    let tls_addr: SocketAddr = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("tls="))
        .and_then(|v| v.trim_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("no tls= in {ready}"));
    assert_eq!(served_for(tls_addr, Some("a.test")).await, old.der);

    let new = ca.leaf(&["a.test"]);
    std::fs::write(&cert, &new.cert_pem).unwrap();
    std::fs::write(&key, &new.key_pem).unwrap();
    p.signal("HUP");
    let reloaded = eventually(Duration::from_secs(10), || async {
        p.log_text().contains("config reloaded")
    })
    .await;
    assert!(reloaded, "{}", p.log_text());
    assert_eq!(served_for(tls_addr, Some("a.test")).await, new.der);

    // A bad key at SIGHUP: logged naming the file; the running certificate stays.
    std::fs::write(&key, "garbage").unwrap();
    p.signal("HUP");
    let key_name = key.display().to_string();
    let failed = eventually(Duration::from_secs(10), || async {
        p.log_text().contains("config reload failed")
    })
    .await;
    let log = p.log_text();
    assert!(failed && log.contains(&key_name), "{log}");
    assert_eq!(served_for(tls_addr, Some("a.test")).await, new.der);
}

#[test]
fn check_refuses_expired_and_mismatched_certificates_naming_the_file() {
    let ca = Ca::new("test ca");
    let dir = TempDir::new("tls-check");
    let expired = ca.leaf_with(&["old.test"], KeyPair::generate().unwrap(), |p| {
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(2001, 1, 1);
    });
    let good = ca.leaf(&["good.test"]);
    let (good_cert, _) = good.write(dir.path(), "good");
    let other_key = dir.join("other.key");
    std::fs::write(&other_key, ca.leaf(&["x.test"]).key_pem).unwrap();
    let (exp_cert, exp_key) = expired.write(dir.path(), "expired");
    let svc = Svc::addrs(
        "web",
        &["127.0.0.1:9".parse().unwrap()],
        &["127.0.0.1:9".parse().unwrap()],
    );

    let check = |entries: &[(PathBuf, PathBuf)], name: &str| {
        let path = dir.join(name);
        std::fs::write(
            &path,
            config_text(dir.path(), &tls_lines(entries), std::slice::from_ref(&svc)),
        )
        .unwrap();
        run_binary(&["check", "--config", path.to_str().unwrap()])
    };

    let (code, _, err) = check(&[(exp_cert.clone(), exp_key)], "expired.toml");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&exp_cert.display().to_string()) && err.contains("expired"),
        "{err}"
    );
    assert!(
        err.contains("expired.toml:4:"),
        "the [[proxy.tls]] line: {err}"
    );

    let (code, _, err) = check(&[(good_cert.clone(), other_key.clone())], "mismatch.toml");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&other_key.display().to_string()) && err.contains("does not match"),
        "{err}"
    );

    let missing = dir.join("missing.pem");
    let (code, _, err) = check(&[(missing.clone(), other_key.clone())], "missing.toml");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&missing.display().to_string()), "{err}");

    let (code, out, err) = check(&[(good_cert, dir.join("good.key"))], "good.toml");
    assert_eq!(code, 0, "{out}{err}");

    // `run` refuses to start on the same files.
    let path = dir.join("expired.toml");
    let started = ProxyProcess::spawn(&path, &[]);
    let err = started.err().expect("refused to start");
    assert!(
        err.contains(&exp_cert.display().to_string()) && err.contains("expired"),
        "{err}"
    );
}

// ===== TLS to upstreams =====

/// An HTTPS upstream: answers `secure` (and `/healthz`), records the SNI names it saw.
struct TlsUpstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    health_hits: Arc<AtomicUsize>,
    sni: Arc<Mutex<Vec<Option<String>>>>,
}

async fn tls_upstream(cert_pem: &str, key_pem: &str) -> TlsUpstream {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = TlsUpstream {
        addr: listener.local_addr().unwrap(),
        hits: Arc::new(AtomicUsize::new(0)),
        health_hits: Arc::new(AtomicUsize::new(0)),
        sni: Arc::new(Mutex::new(Vec::new())),
    };
    let (hits, health, sni) = (
        Arc::clone(&up.hits),
        Arc::clone(&up.health_hits),
        Arc::clone(&up.sni),
    );
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let (hits, health, sni) = (Arc::clone(&hits), Arc::clone(&health), Arc::clone(&sni));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                sni.lock()
                    .unwrap()
                    .push(tls.get_ref().1.server_name().map(str::to_string));
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (hits, health) = (Arc::clone(&hits), Arc::clone(&health));
                    async move {
                        if req.uri().path() == "/healthz" {
                            health.fetch_add(1, Ordering::SeqCst);
                        } else {
                            hits.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok::<_, Infallible>(hyper::Response::new(full("secure")))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    up
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_verified_with_upstream_ca_and_health_checked() {
    let ca = Ca::new("internal ca");
    let leaf = ca.leaf(&["localhost"]);
    let up = tls_upstream(&leaf.cert_pem, &leaf.key_pem).await;
    // Signed by a CA the proxy is not told about.
    let rogue = Ca::new("rogue ca").leaf(&["localhost"]);
    let bad = tls_upstream(&rogue.cert_pem, &rogue.key_pem).await;

    let dir = TempDir::new("tls-upstream");
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let health = "[service.health]\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"1s\"\nunhealthy_after = 2\nhealthy_after = 1\n";
    let https = |a: SocketAddr| format!("\"https://localhost:{}\"", a.port());
    let svc = |name: &str, prefix: &str, blue: String, green: String, checked: bool| {
        format!(
            "[[service]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nupstream_ca = \"{}\"\n\
             [service.blue]\nbackends = [{blue}]\n[service.green]\nbackends = [{green}]\n{}\n",
            ca_file.display(),
            if checked { health } else { "" }
        )
    };
    let mut text = config_text(dir.path(), "", &[]);
    text.push_str(&svc("secure", "/", https(up.addr), https(up.addr), true));
    // Three attempts, three backends, every one refused at the handshake.
    let by_ip = format!("\"https://127.0.0.1:{}\"", bad.addr.port());
    text.push_str(&svc(
        "rogue",
        "/rogue",
        format!("{}, {by_ip}", https(bad.addr)),
        https(bad.addr),
        false,
    ));
    text.push_str(&svc(
        "rogue-checked",
        "/rogue-checked",
        https(bad.addr),
        https(bad.addr),
        true,
    ));
    let proxy = TestProxy::start_text(dir, &text).await;

    for _ in 0..3 {
        let (status, _, body) = proxy.get("/").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "secure"));
    }
    assert_eq!(up.hits.load(Ordering::SeqCst), 3);
    assert!(
        up.sni
            .lock()
            .unwrap()
            .iter()
            .all(|s| s.as_deref() == Some("localhost")),
        "{:?}",
        up.sni.lock().unwrap()
    );
    // Health checks reach the https backend over TLS.
    assert!(
        eventually(Duration::from_secs(5), || async {
            up.health_hits.load(Ordering::SeqCst) >= 3
        })
        .await
    );
    let view = proxy.admin.service("secure").await;
    assert_eq!(
        view["pools"]["blue"]["backends"][0]["healthy"], true,
        "{view}"
    );

    // The rogue certificate is refused: 502, counted as a TLS error, and
    // nothing reaches that backend; health checks to it fail too.
    let (status, _, _) = proxy.get("/rogue").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(bad.hits.load(Ordering::SeqCst), 0);
    let metrics = proxy.admin.metrics().await;
    let tls_errors: f64 = ["blue", "green"]
        .iter()
        .filter_map(|p| metric(&metrics, &format!("switchyard_upstream_errors_total{{kind=\"tls\",pool=\"{p}\",service=\"rogue\"}}")))
        .sum();
    assert!(tls_errors >= 1.0, "{metrics}");
    let unhealthy = eventually(Duration::from_secs(5), || async {
        proxy.admin.service("rogue-checked").await["pools"]["blue"]["backends"][0]["healthy"]
            == false
    })
    .await;
    assert!(unhealthy);
    assert_eq!(bad.health_hits.load(Ordering::SeqCst), 0);

    // Reload re-reads upstream_ca: a broken CA file is refused, naming it,
    // and the running settings keep serving.
    std::fs::write(&ca_file, "garbage").unwrap();
    let (s, v) = proxy.admin.post("/api/v1/reload", "").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&ca_file.display().to_string()),
        "{v}"
    );
    assert_eq!(proxy.get("/").await.0, StatusCode::OK);
    assert!(proxy.shutdown().await);
}
