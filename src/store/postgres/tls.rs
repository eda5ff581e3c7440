//! TLS for every connection to PostgreSQL: the pool's, the `LISTEN` connection's,
//! `copy-store`'s, the scratch databases' and the tests'. [`PgTarget::parse`] reads a
//! connection string and the optional `store.ca_file` once; [`PgTarget::connect`] and
//! [`PgTarget::tls`] are what every connection then uses.
//!
//! The connection string's `sslmode`:
//!
//! - absent, `disable` or `prefer`: plaintext. `prefer` does not attempt TLS: a verified
//!   attempt would refuse the self-signed certificates servers that merely offer TLS
//!   often have, and an unverified one would protect nothing.
//! - `require`, `verify-ca`, `verify-full`: TLS or no connection, and the server's
//!   certificate is always verified — its chain against the trusted roots and its name
//!   against the host connected to (libpq's `require` would accept any certificate and
//!   `verify-ca` any name: here all three verify fully).
//!
//! The trusted roots are the public web roots (Mozilla's, from `webpki-roots`) plus the
//! certificates of `store.ca_file` and of the URL's `sslrootcert=<file>`, when given
//! (`sslrootcert=system`: the public roots alone).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The connector of every PostgreSQL connection (rustls; unused with TLS off, whose
/// connections are plaintext whatever the server offers).
pub type PgTls = MakeRustlsConnect;

/// A connection to PostgreSQL as [`PgTarget::connect`] opens it.
pub type PgConnection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    <PgTls as MakeTlsConnect<tokio_postgres::Socket>>::Stream,
>;

/// What the connection string's `sslmode` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSetting {
    /// Plaintext: `sslmode` absent (`None`), `disable` or `prefer`.
    Off { sslmode: Option<String> },
    /// TLS required, the server's certificate verified (`require`, `verify-ca`,
    /// `verify-full`); `rootcert` is the URL's `sslrootcert`, when given.
    Verified {
        sslmode: String,
        rootcert: Option<String>,
    },
}

/// Why a connection string or its CA files cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsConfigError {
    /// The connection string (never holds the password).
    Url(String),
    /// `store.ca_file`: the path and what is wrong with it.
    CaFile { path: PathBuf, reason: String },
    /// The URL's `sslrootcert`.
    RootCert { path: PathBuf, reason: String },
}

impl fmt::Display for TlsConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsConfigError::Url(reason) => f.write_str(reason),
            TlsConfigError::CaFile { path, reason } => {
                write!(f, "store.ca_file {}: {reason}", path.display())
            }
            TlsConfigError::RootCert { path, reason } => {
                write!(f, "sslrootcert {}: {reason}", path.display())
            }
        }
    }
}

impl std::error::Error for TlsConfigError {}

/// A parsed connection string and the TLS it asks for: cheap to clone.
#[derive(Clone)]
pub struct PgTarget {
    config: tokio_postgres::Config,
    tls: PgTls,
    setting: TlsSetting,
    ca_files: Vec<PathBuf>,
}

impl fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTarget")
            .field("target", &super::describe(&self.config))
            .field("tls", &self.describe_tls())
            .finish_non_exhaustive()
    }
}

impl PgTarget {
    /// Parses `url` (URL or `key=value` form) and, when it asks for TLS, loads the
    /// trusted roots: the public ones, `ca_file`'s (`store.ca_file`, already resolved)
    /// and the URL's `sslrootcert`'s. `ca_file` is read and checked whatever the
    /// `sslmode`: a wrong path is an error before it is needed.
    pub fn parse(url: &str, ca_file: Option<&Path>) -> Result<PgTarget, TlsConfigError> {
        let (config, setting) = parse_url(url)?;
        let mut extra = Vec::new();
        let mut ca_files = Vec::new();
        if let Some(path) = ca_file {
            extra.extend(load_ca_file(path).map_err(|reason| TlsConfigError::CaFile {
                path: path.to_path_buf(),
                reason,
            })?);
            ca_files.push(path.to_path_buf());
        }
        let tls = match &setting {
            TlsSetting::Off { .. } => connector(rustls::RootCertStore::empty())?,
            TlsSetting::Verified { rootcert, .. } => {
                if let Some(rootcert) = rootcert.as_deref().filter(|r| *r != "system") {
                    let path = PathBuf::from(rootcert);
                    extra.extend(load_ca_file(&path).map_err(|reason| {
                        TlsConfigError::RootCert {
                            path: path.clone(),
                            reason,
                        }
                    })?);
                    ca_files.push(path);
                }
                let mut roots = rustls::RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                };
                // Each one checked by `load_ca_file`.
                roots.add_parsable_certificates(extra);
                connector(roots)?
            }
        };
        Ok(PgTarget {
            config,
            tls,
            setting,
            ca_files,
        })
    }

    /// The connection configuration (its `ssl_mode` is `Disable` or `Require`).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The connection configuration, to change (the application name, timeouts).
    pub fn config_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.config
    }

    /// The connector every connection to this target uses.
    pub fn tls(&self) -> PgTls {
        self.tls.clone()
    }

    /// What `sslmode` asked for.
    pub fn setting(&self) -> &TlsSetting {
        &self.setting
    }

    /// Whether connections use TLS.
    pub fn uses_tls(&self) -> bool {
        matches!(self.setting, TlsSetting::Verified { .. })
    }

    /// `postgresql://host:port/dbname` (no user, no password).
    pub fn describe(&self) -> String {
        super::describe(&self.config)
    }

    /// The TLS setting in a sentence (`check-config`, logs).
    pub fn describe_tls(&self) -> String {
        describe_tls(&self.setting, &self.ca_files)
    }

    /// A connection of its own (the caller drives the returned connection).
    pub async fn connect(
        &self,
    ) -> Result<(tokio_postgres::Client, PgConnection), tokio_postgres::Error> {
        self.config.connect(self.tls()).await
    }

    /// This target on another database of the same server.
    pub fn with_dbname(&self, dbname: &str) -> PgTarget {
        let mut target = self.clone();
        target.config.dbname(dbname);
        target
    }
}

/// The TLS setting in a sentence, for `check-config`: `ca_files` are the extra roots.
pub fn describe_tls(setting: &TlsSetting, ca_files: &[PathBuf]) -> String {
    let files = ca_files
        .iter()
        .map(|path| path.display().to_string())
        .collect::<Vec<_>>();
    match setting {
        TlsSetting::Off { sslmode } => {
            let why = match sslmode {
                None => "no sslmode in the URL".to_string(),
                Some(mode) => format!("sslmode={mode}"),
            };
            if files.is_empty() {
                format!("TLS: off ({why})")
            } else {
                format!(
                    "TLS: off ({why}; {} unused without sslmode=require)",
                    files.join(" and ")
                )
            }
        }
        TlsSetting::Verified { sslmode, .. } => {
            let mut roots = vec!["the public roots".to_string()];
            roots.extend(files);
            format!(
                "TLS: required (sslmode={sslmode}), server certificate and host name verified \
                 against {}",
                roots.join(" and ")
            )
        }
    }
}

/// `postgresql://host:port/dbname` of a connection string (never its credentials), or
/// `None` when it does not parse.
pub fn describe_url(url: &str) -> Option<String> {
    parse_url(url)
        .ok()
        .map(|(config, _)| super::describe(&config))
}

/// The TLS setting of a connection string, its CA files unread (config validation reads
/// them with [`PgTarget::parse`]).
pub fn tls_setting(url: &str) -> Result<TlsSetting, TlsConfigError> {
    parse_url(url).map(|(_, setting)| setting)
}

/// Parses `url` after taking out `sslmode` and `sslrootcert` (tokio-postgres knows
/// neither `verify-ca`/`verify-full` nor `sslrootcert`), and sets the `ssl_mode` that
/// matches: `Disable` with TLS off, `Require` with it on.
fn parse_url(url: &str) -> Result<(tokio_postgres::Config, TlsSetting), TlsConfigError> {
    let split = split_tls_params(url).map_err(TlsConfigError::Url)?;
    // The parser's message names the bad key or value, never the password.
    let mut config = tokio_postgres::Config::from_str(&split.rest)
        .map_err(|err| TlsConfigError::Url(err.to_string()))?;
    let setting = match split.sslmode.as_deref() {
        None | Some("disable") | Some("prefer") => TlsSetting::Off {
            sslmode: split.sslmode.clone(),
        },
        Some(mode @ ("require" | "verify-ca" | "verify-full")) => TlsSetting::Verified {
            sslmode: mode.to_string(),
            rootcert: split.sslrootcert.clone(),
        },
        Some(other) => {
            return Err(TlsConfigError::Url(format!(
            "sslmode={other} is not supported (disable, prefer, require, verify-ca or verify-full)"
        )))
        }
    };
    config.ssl_mode(match setting {
        TlsSetting::Off { .. } => SslMode::Disable,
        TlsSetting::Verified { .. } => SslMode::Require,
    });
    Ok((config, setting))
}

/// A connection string without its `sslmode` and `sslrootcert`, and their values.
#[derive(Debug, PartialEq, Eq)]
struct SplitUrl {
    rest: String,
    sslmode: Option<String>,
    sslrootcert: Option<String>,
}

fn split_tls_params(url: &str) -> Result<SplitUrl, String> {
    let mut split = SplitUrl {
        rest: String::new(),
        sslmode: None,
        sslrootcert: None,
    };
    let mut take = |key: &str, value: String| match key {
        "sslmode" => {
            split.sslmode = Some(value);
            true
        }
        "sslrootcert" => {
            split.sslrootcert = Some(value);
            true
        }
        _ => false,
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            split.rest = url.to_string();
            return Ok(split);
        };
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                let decode = |s: &str| {
                    percent_encoding::percent_decode_str(s)
                        .decode_utf8_lossy()
                        .into_owned()
                };
                !take(&decode(key), decode(value))
            })
            .collect();
        if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else {
        let mut kept = Vec::new();
        for (span, key, value) in key_value_pairs(url)? {
            if !take(&key, value) {
                kept.push(&url[span]);
            }
        }
        kept.join(" ")
    };
    split.rest = rest;
    Ok(split)
}

/// The `key = value` pairs of a key-value connection string: each one's span in `text`,
/// its key and its value (unquoted, unescaped), as tokio-postgres reads them.
fn key_value_pairs(text: &str) -> Result<Vec<(std::ops::Range<usize>, String, String)>, String> {
    let bytes = text.as_bytes();
    let mut pairs = Vec::new();
    let mut at = 0;
    let skip_space = |mut at: usize| {
        while at < bytes.len() && bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        at
    };
    loop {
        at = skip_space(at);
        if at == bytes.len() {
            return Ok(pairs);
        }
        let start = at;
        while at < bytes.len() && bytes[at] != b'=' && !bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        let key = text[start..at].to_string();
        at = skip_space(at);
        if bytes.get(at) != Some(&b'=') {
            return Err(format!(
                "invalid connection string: expected `=` after `{key}`"
            ));
        }
        at = skip_space(at + 1);
        let mut value = String::new();
        if bytes.get(at) == Some(&b'\'') {
            at += 1;
            loop {
                match bytes.get(at) {
                    None => return Err("invalid connection string: unterminated quote".into()),
                    Some(b'\'') => {
                        at += 1;
                        break;
                    }
                    Some(b'\\') if at + 1 < bytes.len() => {
                        let c = text[at + 1..].chars().next().unwrap_or_default();
                        value.push(c);
                        at += 1 + c.len_utf8();
                    }
                    Some(_) => {
                        let c = text[at..].chars().next().unwrap_or_default();
                        value.push(c);
                        at += c.len_utf8();
                    }
                }
            }
        } else {
            while at < bytes.len() && !bytes[at].is_ascii_whitespace() {
                if bytes[at] == b'\\' && at + 1 < bytes.len() {
                    at += 1;
                }
                let c = text[at..].chars().next().unwrap_or_default();
                value.push(c);
                at += c.len_utf8();
            }
        }
        pairs.push((start..at, key, value));
    }
}

/// Whether `path` is a readable PEM file of at least one CA certificate rustls accepts
/// (`store.ca_file`'s check): `Err` says what is wrong.
pub fn check_ca_file(path: &Path) -> Result<(), String> {
    load_ca_file(path).map(drop)
}

/// The certificates of a CA file, each one checked as a trust anchor.
fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = read_certificates(path)?;
    let mut roots = rustls::RootCertStore::empty();
    for (index, certificate) in certificates.iter().enumerate() {
        roots.add(certificate.clone()).map_err(|err| {
            format!(
                "certificate {} is not a CA certificate rustls accepts: {err}",
                index + 1
            )
        })?;
    }
    Ok(certificates)
}

/// The certificates of a PEM file (at least one).
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|err| format!("cannot read it: {err}"))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("not a PEM certificate file: {err}"))?;
    if certificates.is_empty() {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_string());
    }
    Ok(certificates)
}

/// A rustls connector trusting `roots`, on ring (the provider reqwest builds: named here
/// so that no process-wide default is needed).
fn connector(roots: rustls::RootCertStore) -> Result<PgTls, TlsConfigError> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|err| TlsConfigError::Url(format!("the TLS library refused its defaults: {err}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// Why a connection failed in its TLS handshake, in a sentence, or `None` when it did not.
pub fn tls_failure(err: &tokio_postgres::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = source {
        if let Some(rustls_err) = cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .or_else(|| cause.downcast_ref::<rustls::Error>())
        {
            return Some(describe_rustls(rustls_err));
        }
        source = cause.source();
    }
    let text = err.to_string();
    if text.contains("TLS") {
        return Some(match std::error::Error::source(err) {
            Some(source) => format!("{text}: {source}"),
            None => text,
        });
    }
    None
}

fn describe_rustls(err: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    let what = match err {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
            "the server's certificate is not trusted: no trusted root (the public roots, \
             store.ca_file, sslrootcert) signed it"
        }
        rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ) => "the server's certificate is not valid for the host name connected to",
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the server's certificate has expired"
        }
        rustls::Error::InvalidCertificate(_) => "the server's certificate was refused",
        _ => "the TLS handshake failed",
    };
    format!("{what} ({err})")
}
