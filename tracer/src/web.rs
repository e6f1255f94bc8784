//! HTTP plumbing shared by the metrics server and the Alertmanager client:
//! the Prometheus exporter-toolkit `web.config` file (TLS and basic auth for
//! `/metrics`), rustls server and client configs (ring provider), and PEM
//! loading. The HTTP itself is hyper's.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use serde::Deserialize;
use tokio_rustls::rustls::{
    self, ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    server::{NoClientAuth, WebPkiClientVerifier},
};

/// The largest web config, CA bundle, certificate, key or secret file read.
pub const FILE_MAX: u64 = 1 << 20;

/// The exporter-toolkit `web.config` file (`--web-config-file`), as
/// node_exporter reads it. Unknown keys are errors; relative paths are
/// relative to the file's folder.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfigFile {
    #[serde(default)]
    pub tls_server_config: Option<TlsServerConfig>,
    /// user → bcrypt hash of the password.
    #[serde(default)]
    pub basic_auth_users: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsServerConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// `NoClientCert` (default), `VerifyClientCertIfGiven` or
    /// `RequireAndVerifyClientCert`.
    #[serde(default)]
    pub client_auth_type: Option<String>,
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// `TLS12` (default) or `TLS13`.
    #[serde(default)]
    pub min_version: Option<String>,
    #[serde(default)]
    pub max_version: Option<String>,
}

/// What a `web.config` file turns into: an optional TLS acceptor and the
/// basic-auth users.
#[derive(Clone)]
pub struct WebServer {
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub auth: Option<Arc<BasicAuth>>,
}

impl std::fmt::Debug for WebServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebServer")
            .field("tls", &self.tls.is_some())
            .field("auth", &self.auth.is_some())
            .finish()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a small regular file (no FIFO, no device, at most [`FILE_MAX`]).
pub fn read_small(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() || meta.len() > FILE_MAX {
        return Err(format!(
            "{}: not a regular file of at most {} KiB",
            path.display(),
            FILE_MAX >> 10
        ));
    }
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(FILE_MAX).read_to_end(&mut buf))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(buf)
}

/// A secret file's first line (a password or a bearer token).
pub fn read_secret(path: &Path) -> Result<String, String> {
    let raw = read_small(path)?;
    let text = String::from_utf8(raw).map_err(|_| format!("{}: not UTF-8", path.display()))?;
    let line = text.lines().next().unwrap_or("").to_owned();
    if line.is_empty() {
        return Err(format!("{}: empty", path.display()));
    }
    Ok(line)
}

/// Every certificate in a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let raw = read_small(path)?;
    let certs = CertificateDer::pem_slice_iter(&raw)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let raw = read_small(path)?;
    PrivateKeyDer::from_pem_slice(&raw).map_err(|e| format!("{}: {e}", path.display()))
}

fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for c in load_certs(path)? {
        store
            .add(c)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(store)
}

fn versions(
    min: Option<&str>,
    max: Option<&str>,
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, String> {
    let rank = |v: Option<&str>, default: u8| match v {
        None | Some("") => Ok(default),
        Some("TLS12") => Ok(12),
        Some("TLS13") => Ok(13),
        Some(other) => Err(format!(
            "TLS version {other:?} is not supported (TLS12 or TLS13)"
        )),
    };
    let (lo, hi) = (rank(min, 12)?, rank(max, 13)?);
    let v: Vec<_> = [(12, &rustls::version::TLS12), (13, &rustls::version::TLS13)]
        .into_iter()
        .filter(|(n, _)| (lo..=hi).contains(n))
        .map(|(_, v)| v)
        .collect();
    if v.is_empty() {
        return Err("min_version is above max_version".into());
    }
    Ok(v)
}

impl WebConfigFile {
    /// Reads and checks a `web.config` file, loading what it names.
    pub fn load(path: &Path) -> Result<WebServer, String> {
        let raw = read_small(path)?;
        let file: Self = serde_yaml_ng::from_slice(&raw)
            .map_err(|e| format!("web config {}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        file.build(base)
            .map_err(|e| format!("web config {}: {e}", path.display()))
    }

    fn build(self, base: &Path) -> Result<WebServer, String> {
        let tls = match self.tls_server_config {
            None => None,
            Some(t) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                t.server_config(base)?,
            ))),
        };
        let auth = if self.basic_auth_users.is_empty() {
            None
        } else {
            for (user, hash) in &self.basic_auth_users {
                if user.contains(':') {
                    return Err(format!("basic_auth_users: user {user:?} has a ':'"));
                }
                // A plain password here would make every scrape fail.
                if !hash.starts_with("$2") {
                    return Err(format!(
                        "basic_auth_users: {user}'s password is not a bcrypt hash \
                         (htpasswd -nBC 10 \"\" | tr -d ':')"
                    ));
                }
            }
            Some(Arc::new(BasicAuth::new(self.basic_auth_users)))
        };
        Ok(WebServer { tls, auth })
    }
}

impl TlsServerConfig {
    fn server_config(&self, base: &Path) -> Result<ServerConfig, String> {
        let at = |p: &Path| base.join(p);
        if self.cert_file.as_os_str().is_empty() || self.key_file.as_os_str().is_empty() {
            return Err("tls_server_config: cert_file and key_file are both required".into());
        }
        let certs = load_certs(&at(&self.cert_file))?;
        let key = load_key(&at(&self.key_file))?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&versions(
                self.min_version.as_deref(),
                self.max_version.as_deref(),
            )?)
            .map_err(|e| e.to_string())?;
        let ca = |what: &str| {
            self.client_ca_file
                .as_ref()
                .map(|p| roots(&at(p)))
                .transpose()?
                .ok_or_else(|| format!("client_auth_type {what} needs client_ca_file"))
        };
        let verifier = match self.client_auth_type.as_deref().unwrap_or("NoClientCert") {
            "NoClientCert" | "" => Arc::new(NoClientAuth) as Arc<_>,
            "VerifyClientCertIfGiven" => WebPkiClientVerifier::builder_with_provider(
                Arc::new(ca("VerifyClientCertIfGiven")?),
                provider(),
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| e.to_string())?,
            "RequireAndVerifyClientCert" => WebPkiClientVerifier::builder_with_provider(
                Arc::new(ca("RequireAndVerifyClientCert")?),
                provider(),
            )
            .build()
            .map_err(|e| e.to_string())?,
            other => {
                return Err(format!(
                    "client_auth_type {other:?} is not supported (NoClientCert, \
                     VerifyClientCertIfGiven, RequireAndVerifyClientCert)"
                ));
            }
        };
        let mut cfg = builder
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| format!("tls_server_config: {e}"))?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(cfg)
    }
}

/// Basic-auth users with bcrypt hashes. A checked (user, password) pair is
/// remembered by its SHA-256, so a scrape every 15 s costs one bcrypt, not
/// one per scrape; bcrypt runs one at a time, off the async threads, and an
/// unknown user costs the same as a wrong password.
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    good: Mutex<HashSet<[u8; 32]>>,
    one_at_a_time: tokio::sync::Semaphore,
}

// An unknown user is checked against a made-up hash of the same cost: the
// same time as a wrong password, so user names can't be guessed from answer
// times.
static DUMMY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    bcrypt::hash("not a password", bcrypt::DEFAULT_COST).unwrap_or_default()
});

/// At most this many remembered (user, password) pairs.
const AUTH_CACHE_MAX: usize = 64;

impl BasicAuth {
    pub fn new(users: BTreeMap<String, String>) -> Self {
        Self {
            users,
            good: Mutex::new(HashSet::new()),
            one_at_a_time: tokio::sync::Semaphore::new(1),
        }
    }

    /// Whether an `Authorization` header value lets the request in.
    pub async fn allows(&self, header: Option<&[u8]>) -> bool {
        use base64::Engine as _;
        let Some(encoded) = header.and_then(|h| h.strip_prefix(b"Basic ")) else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim_ascii())
        else {
            return false;
        };
        let Some(colon) = decoded.iter().position(|&b| b == b':') else {
            return false;
        };
        let (user, pass) = (&decoded[..colon], &decoded[colon + 1..]);
        let key = {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            ctx.update(&(user.len() as u64).to_le_bytes());
            ctx.update(user);
            ctx.update(pass);
            let mut k = [0u8; 32];
            k.copy_from_slice(ctx.finish().as_ref());
            k
        };
        if self
            .good
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&key)
        {
            return true;
        }
        let Ok(_turn) = self.one_at_a_time.acquire().await else {
            return false;
        };
        let user = String::from_utf8_lossy(user).into_owned();
        let hash = self.users.get(&user).cloned();
        let known = hash.is_some();
        let pass = pass.to_vec();
        let ok = tokio::task::spawn_blocking(move || {
            bcrypt::verify(&pass, hash.as_deref().unwrap_or(&DUMMY)).unwrap_or(false)
        })
        .await
        .unwrap_or(false)
            && known;
        if ok {
            let mut good = self
                .good
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if good.len() >= AUTH_CACHE_MAX {
                good.clear();
            }
            good.insert(key);
        }
        ok
    }
}

/// A TLS client config for `https://` Alertmanager URLs: the CA file's
/// certificates, or the system's trust store when there is none.
pub fn client_tls(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let store = if let Some(p) = ca_file {
        roots(p)?
    } else {
        let mut store = RootCertStore::empty();
        for c in rustls_native_certs::load_native_certs().certs {
            let _ = store.add(c);
        }
        if store.is_empty() {
            return Err(
                "no CA file given and no system CA certificates found (set ca_file)".into(),
            );
        }
        store
    };
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(yaml: &str) -> Result<WebServer, String> {
        let f: WebConfigFile = serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
        f.build(Path::new("/nonexistent"))
    }

    #[test]
    fn web_config_errors_are_specific() {
        let e = build("tls_server_config:\n  cert_file: a\n").unwrap_err();
        assert!(e.contains("key_file"), "{e}");
        let e = build("basic_auth_users:\n  alice: hunter2\n").unwrap_err();
        assert!(e.contains("not a bcrypt hash"), "{e}");
        let e = build("basic_auth_user:\n  alice: x\n").unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
        let e = build("tls_server_config:\n  cert_file: a\n  key_file: b\n").unwrap_err();
        assert!(e.contains("/nonexistent/a"), "{e}");
        assert!(build("{}").unwrap().tls.is_none());
    }

    #[test]
    fn tls_versions() {
        assert_eq!(versions(None, None).unwrap().len(), 2);
        assert_eq!(versions(Some("TLS13"), None).unwrap().len(), 1);
        assert!(versions(Some("TLS13"), Some("TLS12")).is_err());
        assert!(versions(Some("TLS10"), None).unwrap_err().contains("TLS10"));
    }

    #[tokio::test]
    async fn basic_auth_checks_bcrypt_and_remembers() {
        use base64::Engine as _;
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = BasicAuth::new([("alice".to_owned(), hash)].into());
        let h = |u: &str, p: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        };
        assert!(auth.allows(Some(h("alice", "s3cret").as_bytes())).await);
        assert!(auth.allows(Some(h("alice", "s3cret").as_bytes())).await);
        assert!(!auth.allows(Some(h("alice", "wrong").as_bytes())).await);
        assert!(!auth.allows(Some(h("bob", "s3cret").as_bytes())).await);
        assert!(!auth.allows(Some(b"Bearer x")).await);
        assert!(!auth.allows(None).await);
        assert!(!auth.allows(Some(b"Basic !!!")).await);
    }
}
