//! Settings: the TOML file of SPEC §8, validated at load; the only reader of the environment.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveTime;
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::providers::spec::{KindContext, KindSettings};
use crate::providers::ProviderKind;
use crate::reconcile::fees::{FeeRule, FeeSchedule};
use crate::verify::hmac::{HmacAlgorithm, HmacScheme, HmacSpec, SignatureEncoding};
use crate::verify::{standard_webhooks::StandardWebhooks, stripe::StripeSignature, Verifier};

/// The environment variable naming the config file when `--config` is absent.
pub const CONFIG_ENV: &str = "CASHOUT_RECON_CONFIG";

/// A configuration problem; the sentence names the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    fn at(key: &str, message: impl fmt::Display) -> ConfigError {
        ConfigError(format!("{key}: {message}"))
    }
}

/// Where environment values come from: the process environment, or a map in tests.
pub trait Environment {
    /// The value of `name`, when set and not empty.
    fn var(&self, name: &str) -> Option<String>;

    /// Whether `name` is set to the empty string (which counts as not set).
    fn is_set_but_empty(&self, name: &str) -> bool {
        let _ = name;
        false
    }
}

/// The process environment.
pub struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }

    fn is_set_but_empty(&self, name: &str) -> bool {
        std::env::var_os(name).is_some_and(|v| v.is_empty())
    }
}

impl Environment for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).filter(|v| !v.is_empty()).cloned()
    }

    fn is_set_but_empty(&self, name: &str) -> bool {
        self.get(name).is_some_and(String::is_empty)
    }
}

/// `path` as written when absolute, else relative to `base_dir` (the config file's
/// directory): one rule for every path in the config.
pub(crate) fn relative_to(base_dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() || base_dir.as_os_str().is_empty() {
        path.to_path_buf()
    } else {
        base_dir.join(path)
    }
}

/// The config path: `--config`, else `$CASHOUT_RECON_CONFIG`, else `./config.toml`.
pub fn config_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| ProcessEnvironment.var(CONFIG_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("config.toml"))
}

/// A duration written as text (`"90s"`, `"5m"`, `"1h"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextDuration(pub Duration);

impl<'de> Deserialize<'de> for TextDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(text.trim())
            .map(TextDuration)
            .map_err(|_| {
                de::Error::custom(format!(
                    "invalid duration {text:?} (use e.g. \"90s\", \"5m\", \"1h\")"
                ))
            })
    }
}

/// The shortest `store.retain_raw_bodies` other than `"0s"` (a guard against `"400s"`
/// meant as days).
const MIN_RETAIN_RAW_BODIES: Duration = Duration::from_secs(86_400);

fn secs(n: u64) -> TextDuration {
    TextDuration(Duration::from_secs(n))
}

// ---- The file as written (every key of SPEC §8; unknown keys are errors) ----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    server: ServerSection,
    #[serde(default)]
    store: StoreSection,
    #[serde(default)]
    admin: AdminSection,
    #[serde(default)]
    reports: ReportsSection,
    #[serde(default)]
    reconcile: ReconcileSection,
    #[serde(default)]
    alerts: AlertsSection,
    #[serde(default)]
    poll: PollSection,
    #[serde(default)]
    instances: InstancesSection,
    /// Each entry is split into its generic keys ([`ProviderSection`]) and its kind's.
    #[serde(default)]
    providers: Vec<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ServerSection {
    listen: String,
    max_body_bytes: usize,
    workers: Option<usize>,
    shutdown_timeout: TextDuration,
    read_timeout: TextDuration,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 262_144,
            workers: None,
            shutdown_timeout: secs(30),
            read_timeout: secs(10),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct StoreSection {
    backend: BackendKey,
    path: PathBuf,
    url_env: String,
    max_connections: usize,
    ca_file: PathBuf,
    busy_timeout: TextDuration,
    max_batch: usize,
    read_connections: usize,
    retain_raw_bodies: TextDuration,
    archive_dir: PathBuf,
}

/// `store.backend` (SPEC §8) as written.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum BackendKey {
    Sqlite,
    Postgres,
}

/// `store.url_env`'s default: the variable holding the PostgreSQL connection string.
pub const DEFAULT_POSTGRES_URL_ENV: &str = "CASHOUT_RECON_DATABASE_URL";

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            backend: BackendKey::Sqlite,
            path: "cashout-recon.db".into(),
            url_env: DEFAULT_POSTGRES_URL_ENV.into(),
            max_connections: 16,
            ca_file: PathBuf::new(),
            busy_timeout: secs(5),
            max_batch: 512,
            read_connections: 4,
            retain_raw_bodies: secs(400 * 86_400),
            archive_dir: PathBuf::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct AdminSection {
    admin_token_env: String,
    reports_token_env: String,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            admin_token_env: "CASHOUT_RECON_ADMIN_TOKEN".into(),
            reports_token_env: "CASHOUT_RECON_REPORTS_TOKEN".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ReportsSection {
    dir: PathBuf,
    timezone: String,
    daily_at: String,
}

impl Default for ReportsSection {
    fn default() -> Self {
        ReportsSection {
            dir: "reports".into(),
            timezone: "UTC".into(),
            daily_at: "00:30".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ReconcileSection {
    missing_grace: TextDuration,
    every: TextDuration,
}

impl Default for ReconcileSection {
    fn default() -> Self {
        ReconcileSection {
            missing_grace: secs(3600),
            every: secs(60),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct AlertsSection {
    webhook_url: String,
    signing_secret_env: String,
    renotify_after: TextDuration,
    group_over: usize,
    signature_failures_per_minute: u32,
    poll_failing_cycles: u32,
    delivery_timeout: TextDuration,
    evaluate_every: TextDuration,
}

impl Default for AlertsSection {
    fn default() -> Self {
        AlertsSection {
            webhook_url: String::new(),
            signing_secret_env: "CASHOUT_RECON_ALERT_SECRET".into(),
            renotify_after: secs(3600),
            group_over: 20,
            signature_failures_per_minute: 20,
            poll_failing_cycles: 3,
            delivery_timeout: secs(10),
            evaluate_every: secs(15),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct InstancesSection {
    lease_ttl: TextDuration,
    renew_every: TextDuration,
}

impl Default for InstancesSection {
    fn default() -> Self {
        InstancesSection {
            lease_ttl: secs(30),
            renew_every: secs(10),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct PollSection {
    overlap: TextDuration,
    status_batch: usize,
    initial_lookback: TextDuration,
    request_timeout: TextDuration,
    max_retries: u32,
    unverified_fetches_per_minute: u32,
    recheck_completed_for: TextDuration,
    recheck_completed_every: TextDuration,
}

impl Default for PollSection {
    fn default() -> Self {
        PollSection {
            overlap: secs(600),
            status_batch: 200,
            initial_lookback: secs(86_400),
            request_timeout: secs(10),
            max_retries: 3,
            unverified_fetches_per_minute: 60,
            recheck_completed_for: secs(72 * 3600),
            recheck_completed_every: secs(3600),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderSection {
    id: String,
    kind: ProviderKind,
    base_url: String,
    #[serde(default)]
    webhook_secrets_env: Vec<String>,
    #[serde(default = "default_poll_every")]
    poll_every: TextDuration,
    #[serde(default = "default_status_after")]
    status_after: TextDuration,
    #[serde(default = "default_stuck_after")]
    stuck_after: TextDuration,
    #[serde(default = "default_silent_after")]
    silent_after: TextDuration,
    #[serde(default = "default_max_rps")]
    max_rps: u32,
    #[serde(default)]
    ledger: bool,
    verify: Option<VerifySection>,
    // Path overrides (any kind).
    search_path: Option<String>,
    status_path: Option<String>,
    login_path: Option<String>,
    token_path: Option<String>,
    // Any kind may have a fee schedule (SPEC §5).
    fees: Option<BTreeMap<String, String>>,
}

/// The keys of [`ProviderSection`]: every kind's; the rest belong to one kind or another.
const GENERIC_PROVIDER_KEYS: [&str; 16] = [
    "id",
    "kind",
    "base_url",
    "webhook_secrets_env",
    "poll_every",
    "status_after",
    "stuck_after",
    "silent_after",
    "max_rps",
    "ledger",
    "verify",
    "search_path",
    "status_path",
    "login_path",
    "token_path",
    "fees",
];

/// Splits the `index`th `[[providers]]` table into its generic keys, read, and its kind's
/// keys, left for the kind; a key of no kind at all is refused here.
fn split_provider(
    index: usize,
    table: toml::Table,
) -> Result<(ProviderSection, toml::Table), ConfigError> {
    let mut generic = toml::Table::new();
    let mut kind_keys = toml::Table::new();
    for (name, value) in table {
        if GENERIC_PROVIDER_KEYS.contains(&name.as_str()) {
            generic.insert(name, value);
        } else if ProviderKind::ALL
            .into_iter()
            .any(|kind| kind.spec().config_keys().contains(&name.as_str()))
        {
            kind_keys.insert(name, value);
        } else {
            let expected: Vec<String> = known_provider_keys()
                .iter()
                .map(|key| format!("`{key}`"))
                .collect();
            return Err(ConfigError::at(
                &format!("providers[{index}].{name}"),
                format!(
                    "unknown field `{name}`, expected one of {}",
                    expected.join(", ")
                ),
            ));
        }
    }
    let section = deserialize_at(&format!("providers[{index}]"), generic)?;
    Ok((section, kind_keys))
}

/// Deserializes `table`, the table at `at` (`providers[0]`); an error names the key under
/// it (`providers[0].poll_every: …`), or `at` itself for a missing key.
pub(crate) fn deserialize_at<T: de::DeserializeOwned>(
    at: &str,
    table: toml::Table,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|err| {
        let path = err.path().to_string();
        // `message()`: Display would end with "in `<key>`" again.
        let message = err.into_inner().message().to_string();
        if path == "." {
            ConfigError::at(at, message)
        } else {
            ConfigError::at(&format!("{at}.{path}"), message)
        }
    })
}

/// Every key a `[[providers]]` entry may have: the generic ones, then each kind's in
/// registry order.
fn known_provider_keys() -> Vec<&'static str> {
    let mut keys = GENERIC_PROVIDER_KEYS.to_vec();
    for kind in ProviderKind::ALL {
        for key in kind.spec().config_keys() {
            if !keys.contains(key) {
                keys.push(key);
            }
        }
    }
    keys
}

fn default_poll_every() -> TextDuration {
    secs(300)
}
fn default_status_after() -> TextDuration {
    secs(600)
}
fn default_stuck_after() -> TextDuration {
    secs(1800)
}
fn default_silent_after() -> TextDuration {
    secs(3600)
}
fn default_max_rps() -> u32 {
    10
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifySection {
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    tolerance_secs: Option<u64>,
    header: Option<String>,
    algorithm: Option<HmacAlgorithm>,
    encoding: Option<SignatureEncoding>,
    template: Option<String>,
    timestamp_header: Option<String>,
    id_header: Option<String>,
}

/// `[instances]`, checked: a lease is renewed well before it lapses.
fn instance_settings(section: &InstancesSection) -> Result<InstanceSettings, ConfigError> {
    let (lease_ttl, renew_every) = (section.lease_ttl.0, section.renew_every.0);
    if lease_ttl < Duration::from_secs(1) {
        return Err(ConfigError::at(
            "instances.lease_ttl",
            "must be at least 1s",
        ));
    }
    if renew_every.is_zero() || renew_every * 2 > lease_ttl {
        return Err(ConfigError::at(
            "instances.renew_every",
            "must be more than 0s and at most half of instances.lease_ttl",
        ));
    }
    Ok(InstanceSettings {
        lease_ttl,
        renew_every,
    })
}

// ---- Validated settings ----

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub server: ServerSettings,
    pub store: StoreSettings,
    /// Raw-body retention (keys of `[store]`).
    pub retention: RetentionSettings,
    pub admin: AdminSettings,
    pub reports: ReportsSettings,
    pub reconcile: ReconcileSettings,
    pub alerts: AlertSettings,
    pub poll: PollSettings,
    pub instances: InstanceSettings,
    pub providers: Vec<ProviderSettings>,
    /// `store.url_env`: the variable holding the PostgreSQL connection URL (the store's
    /// with `backend = "postgres"`; `copy-store --to postgres`'s target with either).
    pub postgres_url_env: String,
    /// `store.ca_file`, resolved: a PEM file of CA certificates trusted (besides the
    /// public roots) by the TLS connections to PostgreSQL (`sslmode=require`), with
    /// either backend (`copy-store --to postgres` reads it too).
    pub postgres_ca_file: Option<PathBuf>,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: String,
    pub max_body_bytes: usize,
    pub workers: Option<usize>,
    pub shutdown_timeout: Duration,
    /// A request (headers and body) must arrive whole within this, else 408 and the
    /// connection is closed.
    pub read_timeout: Duration,
}

/// `[store]`.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// `store.backend`: which database holds the book.
    pub backend: StoreBackend,
    /// The SQLite file (`backend = "sqlite"` only).
    pub path: PathBuf,
    /// How long a write waits on a lock (and, on PostgreSQL, for a pooled connection)
    /// before the request is answered 503.
    pub busy_timeout: Duration,
    /// Most writes committed in one transaction (group commit).
    pub max_batch: usize,
    pub read_connections: usize,
    /// How long a signed request's nonce is remembered against replays: twice the longest
    /// provider tolerance, at least [`MIN_REPLAY_WINDOW`] (see [`replay_window`]).
    pub replay_window: Duration,
}

/// The shortest replay window, whatever the tolerances.
pub const MIN_REPLAY_WINDOW: Duration = Duration::from_secs(600);

/// The replay window for providers whose longest signature tolerance is
/// `max_tolerance_secs`: a nonce must outlive every timestamp still accepted.
pub fn replay_window(max_tolerance_secs: Option<u64>) -> Duration {
    Duration::from_secs(max_tolerance_secs.unwrap_or(300).saturating_mul(2)).max(MIN_REPLAY_WINDOW)
}

/// `store.backend` (SPEC §8): the embedded SQLite file, or a PostgreSQL database that
/// several instances may share.
#[derive(Debug, Clone)]
pub enum StoreBackend {
    /// The SQLite file at `store.path`, locked by one `serve` at a time.
    Sqlite,
    /// The PostgreSQL database whose URL the variable `store.url_env` names.
    Postgres(PostgresSettings),
}

impl StoreBackend {
    /// Whether the book is the SQLite file (locked by one `serve` at a time).
    pub fn is_sqlite(&self) -> bool {
        matches!(self, StoreBackend::Sqlite)
    }
}

/// How the PostgreSQL store connects (`backend = "postgres"`).
#[derive(Debug, Clone)]
pub struct PostgresSettings {
    /// The connection string (it may hold the password: never logged; see
    /// [`PostgresSettings::describe`]).
    pub url: SecretString,
    /// `store.url_env`: the variable it was read from.
    pub url_env: String,
    /// `store.max_connections`: most connections the pool opens.
    pub max_connections: usize,
    /// `store.ca_file`, resolved (see [`Settings::postgres_ca_file`]).
    pub ca_file: Option<PathBuf>,
}

impl PostgresSettings {
    /// The connection string parsed, with its TLS connector (`sslmode`, the public roots
    /// and `store.ca_file`): what every connection of the store uses.
    pub fn target(&self) -> Result<crate::store::postgres::PgTarget, crate::store::StoreError> {
        crate::store::postgres::parse_target(self.url.expose_secret(), self.ca_file.as_deref())
    }

    /// The TLS setting in a sentence (for `check-config`), e.g. `TLS: off (sslmode=prefer)`.
    pub fn describe_tls(&self) -> String {
        match self.target() {
            Ok(target) => target.describe_tls(),
            Err(err) => format!("TLS: {err}"),
        }
    }

    /// Where the store points, without credentials (`postgresql://host:port/db`).
    pub fn describe(&self) -> String {
        crate::store::postgres::tls::describe_url(self.url.expose_secret())
            .unwrap_or_else(|| format!("the PostgreSQL database of ${}", self.url_env))
    }
}

/// `store.retain_raw_bodies` and `store.archive_dir` (see [`crate::retention`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionSettings {
    /// Raw bodies and headers of events older than this are dropped (the events, their
    /// hashes and the timeline stay); `None` (`"0s"`): kept forever.
    pub retain_raw_bodies: Option<Duration>,
    /// Where what retention drops is archived first (gzip JSON lines); `None`: no archive.
    pub archive_dir: Option<PathBuf>,
}

/// `[admin]`: the bearer tokens of the two roles, when their variables are set.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub admin_token_env: String,
    pub reports_token_env: String,
    pub admin_token: Option<SecretString>,
    pub reports_token: Option<SecretString>,
    /// The token variables set to the empty string (which counts as not set).
    pub set_but_empty: Vec<String>,
}

/// `[reports]`.
#[derive(Debug, Clone)]
pub struct ReportsSettings {
    pub dir: PathBuf,
    pub timezone: chrono_tz::Tz,
    pub daily_at: NaiveTime,
}

/// `[reconcile]`.
#[derive(Debug, Clone)]
pub struct ReconcileSettings {
    /// A ledger entry the provider does not know is `missing_at_provider` after this.
    pub missing_grace: Duration,
    /// The continuous pass re-examines what changed this often.
    pub every: Duration,
}

/// `[instances]`: the job leases of several instances on one store (see
/// [`crate::leases`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceSettings {
    /// A job's lease lapses this long after its holder's last renewal: how long a killed
    /// instance's jobs wait before another instance takes them over.
    pub lease_ttl: Duration,
    /// A running job renews its lease this often (less than `lease_ttl`).
    pub renew_every: Duration,
}

impl Default for InstanceSettings {
    fn default() -> Self {
        InstanceSettings {
            lease_ttl: Duration::from_secs(30),
            renew_every: Duration::from_secs(10),
        }
    }
}

/// `[alerts]`.
#[derive(Debug, Clone)]
pub struct AlertSettings {
    /// Where alerts are POSTed; `None`: the log only.
    pub webhook_url: Option<Url>,
    pub signing_secret_env: String,
    /// The Standard Webhooks secret (`whsec_…`); required when `webhook_url` is set.
    pub signing_secret: Option<SecretString>,
    /// An open alert is delivered again after this.
    pub renotify_after: Duration,
    /// More open subjects of one kind and provider than this: one grouped alert.
    pub group_over: usize,
    pub signature_failures_per_minute: u32,
    /// Consecutive failed poll cycles that raise `poll_failing`.
    pub poll_failing_cycles: u32,
    /// Timeout of one delivery attempt to `webhook_url`.
    pub delivery_timeout: Duration,
    /// How often the alert rules are evaluated (also after the events that trigger them).
    pub evaluate_every: Duration,
}

impl AlertSettings {
    /// The sink as `check-config` shows it: the URL with its path masked (Slack and
    /// PagerDuty URLs carry credentials there), or "log only".
    pub fn describe(&self) -> Vec<String> {
        let Some(url) = &self.webhook_url else {
            return vec!["alerts: log only (alerts.webhook_url is empty)".to_string()];
        };
        let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
        if let Some(port) = url.port() {
            shown.push_str(&format!(":{port}"));
        }
        if url.path() != "/" || url.query().is_some() {
            shown.push_str("/***");
        }
        vec![
            format!("alerts: log and POST {shown} (Standard Webhooks)"),
            format!(
                "  signing secret: {} = {}",
                self.signing_secret_env,
                match &self.signing_secret {
                    Some(secret) => masked(secret),
                    None => "(not set)".to_string(),
                }
            ),
        ]
    }
}

/// `[poll]`.
#[derive(Debug, Clone)]
pub struct PollSettings {
    /// Every search sweep re-reads this much before its watermark (SPEC §5).
    pub overlap: Duration,
    /// Most status checks in one cycle.
    pub status_batch: usize,
    /// How far back the first sweep of a provider reads.
    pub initial_lookback: Duration,
    pub request_timeout: Duration,
    pub max_retries: u32,
    /// Status fetches caused by unverified webhooks, per provider per minute.
    pub unverified_fetches_per_minute: u32,
    /// Providers without search: completed cash-outs are asked about again for this long
    /// after completion (a reversal may follow)...
    pub recheck_completed_for: Duration,
    /// ...at most once per this interval each.
    pub recheck_completed_every: Duration,
}

/// A secret read from a named environment variable.
#[derive(Debug, Clone)]
pub struct NamedSecret {
    pub env: String,
    pub value: SecretString,
    /// Its variable's position in the key that lists it (`webhook_secrets_env`), whether
    /// or not the variables before it are set: what an event records as the secret that
    /// verified it.
    pub position: usize,
}

/// An environment variable named by a `*_env` key that gives no value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsetVar {
    /// The variable's name.
    pub env: String,
    /// Set, but to the empty string (counted as not set).
    pub set_but_empty: bool,
    /// One of `webhook_secrets_env` (an unused rotation slot when another is set).
    pub webhook_secret: bool,
}

/// Which verification scheme a provider's webhooks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemeChoice {
    KindDefault,
    StandardWebhooks,
    Stripe,
    Hmac,
}

/// `[providers.verify]`.
#[derive(Debug, Clone)]
pub struct VerifySettings {
    pub scheme: SchemeChoice,
    pub tolerance_secs: u64,
    pub header: Option<String>,
    pub algorithm: Option<HmacAlgorithm>,
    pub encoding: Option<SignatureEncoding>,
    pub template: Option<String>,
    pub timestamp_header: Option<String>,
    pub id_header: Option<String>,
}

/// One `[[providers]]` entry.
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    pub id: String,
    pub kind: ProviderKind,
    pub base_url: Url,
    pub webhook_secrets: Vec<NamedSecret>,
    /// Environment variables the config names that give no value (unset, or set to the
    /// empty string), for `check-config`.
    pub unset_env: Vec<UnsetVar>,
    pub poll_every: Duration,
    pub status_after: Duration,
    pub stuck_after: Duration,
    pub silent_after: Duration,
    pub max_rps: u32,
    pub ledger: bool,
    pub verify: VerifySettings,
    pub search_path: Option<String>,
    pub status_path: Option<String>,
    pub login_path: Option<String>,
    pub token_path: Option<String>,
    /// Fee schedule per payout method (`default` for the rest); empty: no fee check.
    pub fees: FeeSchedule,
    /// A webhook header carrying a static secret (the kind's, e.g. SimPay
    /// `token_header`): checked by the verifier, never stored.
    pub token_header: Option<String>,
    /// The kind's own keys, validated (see [`ProviderSettings::kind_settings`]).
    pub kind_settings: Arc<dyn KindSettings>,
}

impl Settings {
    /// Reads and validates the file at `path` with the process environment.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            ConfigError(format!("cannot read config file {}: {err}", path.display()))
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Settings::parse(&text, base, &ProcessEnvironment)
            .map_err(|err| ConfigError(format!("{}: {err}", path.display())))
    }

    /// Parses and validates config text; relative key files resolve against `base_dir`.
    pub fn parse(
        text: &str,
        base_dir: &Path,
        env: &dyn Environment,
    ) -> Result<Settings, ConfigError> {
        let table: toml::Table = text.parse().map_err(|err: toml::de::Error| {
            ConfigError(format!("not valid TOML: {}", err.message()))
        })?;
        let mut file: ConfigFile = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|err| {
                let path = err.path().to_string();
                let inner = err.into_inner();
                // `message()`: Display would end with "in `<key>`" again.
                if path == "." {
                    ConfigError(inner.message().to_string())
                } else {
                    ConfigError::at(&path, inner.message())
                }
            })?;
        let providers = std::mem::take(&mut file.providers)
            .into_iter()
            .enumerate()
            .map(|(index, table)| split_provider(index, table))
            .collect::<Result<Vec<_>, _>>()?;
        Settings::validate(file, providers, base_dir, env)
    }

    fn validate(
        file: ConfigFile,
        provider_sections: Vec<(ProviderSection, toml::Table)>,
        base_dir: &Path,
        env: &dyn Environment,
    ) -> Result<Settings, ConfigError> {
        let server = &file.server;
        if server.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::at(
                "server.listen",
                format!("{:?} is not an address like 127.0.0.1:8080", server.listen),
            ));
        }
        if server.max_body_bytes == 0 {
            return Err(ConfigError::at(
                "server.max_body_bytes",
                "must be greater than 0",
            ));
        }
        if server.read_timeout.0.is_zero() {
            return Err(ConfigError::at(
                "server.read_timeout",
                "must be greater than 0",
            ));
        }
        if server.workers == Some(0) {
            return Err(ConfigError::at("server.workers", "must be at least 1"));
        }
        if file.store.url_env.trim().is_empty() {
            return Err(ConfigError::at(
                "store.url_env",
                "must name an environment variable",
            ));
        }
        if file.store.max_connections == 0 {
            return Err(ConfigError::at(
                "store.max_connections",
                "must be greater than 0",
            ));
        }
        let ca_file = Some(&file.store.ca_file)
            .filter(|path| !path.as_os_str().is_empty())
            .map(|path| relative_to(base_dir, path));
        if let Some(path) = &ca_file {
            if let Err(reason) = crate::store::postgres::tls::check_ca_file(path) {
                return Err(ConfigError::at(
                    "store.ca_file",
                    format!("{}: {reason}", path.display()),
                ));
            }
        }
        let backend = match file.store.backend {
            BackendKey::Sqlite => StoreBackend::Sqlite,
            BackendKey::Postgres => {
                let url = env
                    .var(&file.store.url_env)
                    .filter(|url| !url.trim().is_empty())
                    .ok_or_else(|| {
                        ConfigError::at(
                            "store.url_env",
                            format!(
                                "{} is not set (backend = \"postgres\" reads the database's \
                                 connection URL from it)",
                                file.store.url_env
                            ),
                        )
                    })?;
                // The parser's message names the bad part, never the password.
                match crate::store::postgres::PgTarget::parse(&url, ca_file.as_deref()) {
                    Ok(_) => {}
                    Err(crate::store::postgres::TlsConfigError::CaFile { path, reason }) => {
                        return Err(ConfigError::at(
                            "store.ca_file",
                            format!("{}: {reason}", path.display()),
                        ));
                    }
                    Err(err) => {
                        return Err(ConfigError::at(
                            "store.url_env",
                            format!(
                                "{} is not a PostgreSQL connection string: {err}",
                                file.store.url_env
                            ),
                        ));
                    }
                }
                StoreBackend::Postgres(PostgresSettings {
                    url: SecretString::from(url),
                    url_env: file.store.url_env.clone(),
                    max_connections: file.store.max_connections,
                    ca_file: ca_file.clone(),
                })
            }
        };
        if file.store.max_batch == 0 {
            return Err(ConfigError::at("store.max_batch", "must be greater than 0"));
        }
        let retain = file.store.retain_raw_bodies.0;
        if !retain.is_zero() && retain < MIN_RETAIN_RAW_BODIES {
            return Err(ConfigError::at(
                "store.retain_raw_bodies",
                "must be \"0s\" (keep raw bodies forever) or at least \"1d\"",
            ));
        }
        if retain.is_zero() && !file.store.archive_dir.as_os_str().is_empty() {
            return Err(ConfigError::at(
                "store.archive_dir",
                "nothing would be archived: store.retain_raw_bodies = \"0s\" keeps raw bodies forever",
            ));
        }
        if file.store.read_connections == 0 {
            return Err(ConfigError::at(
                "store.read_connections",
                "must be greater than 0",
            ));
        }
        let timezone: chrono_tz::Tz = file.reports.timezone.parse().map_err(|_| {
            ConfigError::at(
                "reports.timezone",
                format!("{:?} is not an IANA time zone", file.reports.timezone),
            )
        })?;
        let daily_at =
            NaiveTime::parse_from_str(&file.reports.daily_at, "%H:%M").map_err(|_| {
                ConfigError::at(
                    "reports.daily_at",
                    format!("{:?} is not a time like 00:30", file.reports.daily_at),
                )
            })?;
        let webhook_url = match file.alerts.webhook_url.trim() {
            "" => None,
            url => Some(parse_url("alerts.webhook_url", url)?),
        };
        let signing_secret = env
            .var(&file.alerts.signing_secret_env)
            .map(SecretString::from);
        if webhook_url.is_some() {
            let key = "alerts.signing_secret_env";
            let Some(secret) = &signing_secret else {
                return Err(ConfigError::at(
                    key,
                    format!(
                        "{} is not set (required when alerts.webhook_url is set)",
                        file.alerts.signing_secret_env
                    ),
                ));
            };
            if crate::verify::standard_webhooks::sign(secret.expose_secret(), "msg", 0, b"")
                .is_err()
            {
                return Err(ConfigError::at(
                    key,
                    format!(
                        "the value of {} is not a Standard Webhooks secret (whsec_<base64>)",
                        file.alerts.signing_secret_env
                    ),
                ));
            }
        }
        if file.alerts.poll_failing_cycles == 0 {
            return Err(ConfigError::at(
                "alerts.poll_failing_cycles",
                "must be at least 1",
            ));
        }
        if file.alerts.delivery_timeout.0.is_zero() || file.alerts.evaluate_every.0.is_zero() {
            return Err(ConfigError::at(
                "alerts.delivery_timeout",
                "alerts.delivery_timeout and alerts.evaluate_every must be greater than 0",
            ));
        }
        let mut providers: Vec<ProviderSettings> = Vec::new();
        for (index, (section, kind_keys)) in provider_sections.into_iter().enumerate() {
            let provider = validate_provider(index, section, kind_keys, base_dir, env)?;
            if providers.iter().any(|p| p.id == provider.id) {
                return Err(ConfigError::at(
                    &format!("providers[{index}].id"),
                    format!("{:?} is used twice", provider.id),
                ));
            }
            providers.push(provider);
        }
        Ok(Settings {
            server: ServerSettings {
                listen: file.server.listen,
                max_body_bytes: file.server.max_body_bytes,
                workers: file.server.workers,
                shutdown_timeout: file.server.shutdown_timeout.0,
                read_timeout: file.server.read_timeout.0,
            },
            store: StoreSettings {
                backend,
                path: relative_to(base_dir, &file.store.path),
                busy_timeout: file.store.busy_timeout.0,
                max_batch: file.store.max_batch,
                read_connections: file.store.read_connections,
                replay_window: replay_window(
                    providers.iter().map(|p| p.verify.tolerance_secs).max(),
                ),
            },
            retention: RetentionSettings {
                retain_raw_bodies: Some(file.store.retain_raw_bodies.0)
                    .filter(|retain| !retain.is_zero()),
                archive_dir: Some(&file.store.archive_dir)
                    .filter(|dir| !dir.as_os_str().is_empty())
                    .map(|dir| relative_to(base_dir, dir)),
            },
            admin: AdminSettings {
                admin_token: env.var(&file.admin.admin_token_env).map(SecretString::from),
                reports_token: env
                    .var(&file.admin.reports_token_env)
                    .map(SecretString::from),
                set_but_empty: [&file.admin.admin_token_env, &file.admin.reports_token_env]
                    .into_iter()
                    .filter(|name| env.is_set_but_empty(name))
                    .cloned()
                    .collect(),
                admin_token_env: file.admin.admin_token_env,
                reports_token_env: file.admin.reports_token_env,
            },
            reports: ReportsSettings {
                dir: relative_to(base_dir, &file.reports.dir),
                timezone,
                daily_at,
            },
            reconcile: ReconcileSettings {
                missing_grace: file.reconcile.missing_grace.0,
                every: if file.reconcile.every.0.is_zero() {
                    return Err(ConfigError::at("reconcile.every", "must be more than 0s"));
                } else {
                    file.reconcile.every.0
                },
            },
            alerts: AlertSettings {
                webhook_url,
                signing_secret_env: file.alerts.signing_secret_env,
                signing_secret,
                renotify_after: file.alerts.renotify_after.0,
                group_over: file.alerts.group_over,
                signature_failures_per_minute: file.alerts.signature_failures_per_minute,
                poll_failing_cycles: file.alerts.poll_failing_cycles,
                delivery_timeout: file.alerts.delivery_timeout.0,
                evaluate_every: file.alerts.evaluate_every.0,
            },
            poll: PollSettings {
                overlap: file.poll.overlap.0,
                status_batch: file.poll.status_batch.max(1),
                initial_lookback: file.poll.initial_lookback.0,
                request_timeout: file.poll.request_timeout.0,
                max_retries: file.poll.max_retries,
                unverified_fetches_per_minute: file.poll.unverified_fetches_per_minute,
                recheck_completed_for: file.poll.recheck_completed_for.0,
                recheck_completed_every: file.poll.recheck_completed_every.0,
            },
            instances: instance_settings(&file.instances)?,
            providers,
            postgres_url_env: file.store.url_env,
            postgres_ca_file: ca_file,
        })
    }

    /// The provider with this id.
    pub fn provider(&self, id: &str) -> Option<&ProviderSettings> {
        self.providers.iter().find(|p| p.id == id)
    }
}

pub(crate) fn parse_url(key: &str, text: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(text)
        .map_err(|err| ConfigError::at(key, format!("{text:?} is not a URL ({err})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::at(
            key,
            format!("{text:?} must be an http or https URL"),
        ));
    }
    Ok(url)
}

fn validate_provider(
    index: usize,
    section: ProviderSection,
    kind_keys: toml::Table,
    base_dir: &Path,
    env: &dyn Environment,
) -> Result<ProviderSettings, ConfigError> {
    let key = |name: &str| format!("providers[{index}].{name}");
    let kind = section.kind;
    let spec = kind.spec();
    if section.id.is_empty()
        || !section
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ConfigError::at(
            &key("id"),
            format!("{:?} must be letters, digits, '-' or '_'", section.id),
        ));
    }
    let base_url = parse_url(&key("base_url"), &section.base_url)?;
    if section.max_rps == 0 {
        return Err(ConfigError::at(&key("max_rps"), "must be at least 1"));
    }
    if section.poll_every.0.is_zero() {
        return Err(ConfigError::at(
            &key("poll_every"),
            "must be longer than 0s",
        ));
    }

    // Kind-specific keys given to another kind are mistakes worth stopping on.
    for name in kind_keys.keys() {
        if !spec.config_keys().contains(&name.as_str()) {
            return Err(ConfigError::at(
                &key(name),
                format!("is not a key of kind {kind}"),
            ));
        }
    }

    let webhook_secrets: Vec<NamedSecret> = section
        .webhook_secrets_env
        .iter()
        .enumerate()
        .filter_map(|(position, var)| {
            env.var(var).map(|value| NamedSecret {
                env: var.clone(),
                value: SecretString::from(value),
                position,
            })
        })
        .collect();

    if !spec.adapter().sends_webhooks() && section.verify.is_some() {
        return Err(ConfigError::at(
            &key("verify"),
            format!("{kind} sends no webhooks, so there is nothing to verify"),
        ));
    }
    let verify = match section.verify {
        None => VerifySettings {
            scheme: SchemeChoice::KindDefault,
            tolerance_secs: 300,
            header: None,
            algorithm: None,
            encoding: None,
            template: None,
            timestamp_header: None,
            id_header: None,
        },
        Some(v) => {
            let scheme = match v.scheme.as_deref().unwrap_or("kind default") {
                "kind default" | "default" => SchemeChoice::KindDefault,
                "standard_webhooks" => SchemeChoice::StandardWebhooks,
                "stripe" => SchemeChoice::Stripe,
                "hmac" => SchemeChoice::Hmac,
                other => {
                    return Err(ConfigError::at(
                        &key("verify.scheme"),
                        format!(
                        "{other:?} is not one of \"kind default\", standard_webhooks, stripe, hmac"
                    ),
                    ))
                }
            };
            if scheme == SchemeChoice::Hmac {
                for (name, given) in [
                    ("header", v.header.is_some()),
                    ("template", v.template.is_some()),
                ] {
                    if !given {
                        return Err(ConfigError::at(
                            &key(&format!("verify.{name}")),
                            "is required with scheme \"hmac\"",
                        ));
                    }
                }
            } else {
                // Read by the hmac scheme only: beside another one it would do nothing.
                for (name, given) in [
                    ("header", v.header.is_some()),
                    ("algorithm", v.algorithm.is_some()),
                    ("encoding", v.encoding.is_some()),
                    ("template", v.template.is_some()),
                    ("timestamp_header", v.timestamp_header.is_some()),
                    ("id_header", v.id_header.is_some()),
                ] {
                    if given {
                        return Err(ConfigError::at(
                            &key(&format!("verify.{name}")),
                            format!(
                                "is read only with scheme \"hmac\", not {:?}",
                                v.scheme.as_deref().unwrap_or("kind default")
                            ),
                        ));
                    }
                }
            }
            VerifySettings {
                scheme,
                tolerance_secs: v.tolerance_secs.unwrap_or(300),
                header: v.header,
                algorithm: v.algorithm,
                encoding: v.encoding,
                template: v.template,
                timestamp_header: v.timestamp_header,
                id_header: v.id_header,
            }
        }
    };

    if spec.requires_webhook_secrets(verify.scheme) {
        if section.webhook_secrets_env.is_empty() {
            return Err(ConfigError::at(
                &key("webhook_secrets_env"),
                format!("is required for kind {kind}"),
            ));
        }
        if webhook_secrets.is_empty() {
            return Err(ConfigError::at(
                &key("webhook_secrets_env"),
                format!(
                    "none of the environment variables {} is set{}",
                    section.webhook_secrets_env.join(", "),
                    match section
                        .webhook_secrets_env
                        .iter()
                        .find(|name| env.is_set_but_empty(name))
                    {
                        Some(name) => format!(" ({name} is set but empty)"),
                        None => String::new(),
                    }
                ),
            ));
        }
    }

    // Keys of the kind's own verification, replaced by a `[providers.verify]` scheme.
    for name in spec.keys_unread_with(verify.scheme) {
        if kind_keys.contains_key(*name) {
            return Err(ConfigError::at(
                &key(name),
                format!(
                    "belongs to kind {kind}'s own webhook verification, which \
                     [providers.verify] scheme replaces here: it would not be checked"
                ),
            ));
        }
    }
    if !spec.requires_webhook_secrets(verify.scheme) && !section.webhook_secrets_env.is_empty() {
        return Err(ConfigError::at(
            &key("webhook_secrets_env"),
            if spec.adapter().sends_webhooks() {
                format!(
                    "kind {kind}'s own scheme verifies without a shared secret, so none \
                     would be read (a [providers.verify] scheme reads them)"
                )
            } else {
                format!("{kind} sends no webhooks, so no secret would be read")
            },
        ));
    }

    let mut cx = KindContext {
        index,
        kind,
        base_dir,
        env,
        scheme: verify.scheme,
        credential_env: Vec::new(),
    };
    let kind_settings = spec.settings(kind_keys, &mut cx)?;

    // Any provider may have a schedule (SPEC §5); a kind may have a default one.
    let fee_texts = section.fees.or_else(|| {
        let defaults = spec.default_fees();
        (!defaults.is_empty()).then(|| {
            defaults
                .iter()
                .map(|(method, rule)| (method.to_string(), rule.to_string()))
                .collect()
        })
    });
    let mut fee_rules = BTreeMap::new();
    for (method, text) in fee_texts.unwrap_or_default() {
        let rule: FeeRule = text
            .parse()
            .map_err(|err| ConfigError::at(&key(&format!("fees.{method}")), err))?;
        fee_rules.insert(method, rule);
    }
    let fees = FeeSchedule::new(fee_rules);

    for (name, path) in [
        ("search_path", &section.search_path),
        ("status_path", &section.status_path),
        ("login_path", &section.login_path),
        ("token_path", &section.token_path),
    ] {
        if let Some(path) = path {
            if !spec.path_overrides().contains(&name) {
                return Err(ConfigError::at(
                    &key(name),
                    format!(
                        "kind {kind} calls no endpoint of that name (its paths: {})",
                        spec.path_overrides().join(", ")
                    ),
                ));
            }
            if !path.starts_with('/') {
                return Err(ConfigError::at(
                    &key(name),
                    format!("{path:?} must start with '/'"),
                ));
            }
        }
    }

    let unset_env = section
        .webhook_secrets_env
        .iter()
        .map(|name| (name, true))
        .chain(cx.credential_env.iter().map(|name| (name, false)))
        .filter(|(name, _)| env.var(name).is_none())
        .map(|(name, webhook_secret)| UnsetVar {
            env: name.clone(),
            set_but_empty: env.is_set_but_empty(name),
            webhook_secret,
        })
        .collect();
    let settings = ProviderSettings {
        id: section.id,
        kind,
        base_url,
        webhook_secrets,
        unset_env,
        poll_every: section.poll_every.0,
        status_after: section.status_after.0,
        stuck_after: section.stuck_after.0,
        silent_after: section.silent_after.0,
        max_rps: section.max_rps,
        ledger: section.ledger,
        verify,
        search_path: section.search_path,
        status_path: section.status_path,
        login_path: section.login_path,
        token_path: section.token_path,
        fees,
        token_header: kind_settings.token_header().map(str::to_string),
        kind_settings,
    };
    settings
        .build_verifier()
        .map_err(|err| ConfigError::at(&key("verify"), err))?;
    Ok(settings)
}

impl ProviderSettings {
    fn secret_values(&self) -> Vec<SecretString> {
        self.webhook_secrets
            .iter()
            .map(|s| s.value.clone())
            .collect()
    }

    /// The kind's own settings as its type `T`; `None` if they are another kind's.
    pub fn kind_settings<T: KindSettings>(&self) -> Option<&T> {
        self.kind_settings.as_any().downcast_ref::<T>()
    }

    /// Builds the webhook verifier: the kind's default scheme or the `[providers.verify]`
    /// override. `None` for a provider that sends no webhooks.
    pub fn build_verifier(&self) -> Result<Option<Verifier>, String> {
        let tolerance = self.verify.tolerance_secs;
        let secrets = self.secret_values();
        let verifier = match self.verify.scheme {
            SchemeChoice::StandardWebhooks => Verifier::StandardWebhooks(
                StandardWebhooks::new(&secrets, tolerance).map_err(|e| e.0)?,
            ),
            SchemeChoice::Stripe => Verifier::Stripe(StripeSignature::new(&secrets, tolerance)),
            SchemeChoice::Hmac => {
                let spec = HmacSpec {
                    header: self.verify.header.clone().unwrap_or_default(),
                    algorithm: self.verify.algorithm.unwrap_or(HmacAlgorithm::Sha256),
                    encoding: self.verify.encoding.unwrap_or(SignatureEncoding::Hex),
                    template: self.verify.template.clone().unwrap_or_default(),
                    timestamp_header: self.verify.timestamp_header.clone(),
                    id_header: self.verify.id_header.clone(),
                    signed_url: self.kind_settings.signed_url().map(str::to_string),
                    tolerance_secs: tolerance,
                };
                Verifier::Hmac(HmacScheme::new(spec, &secrets, None).map_err(|e| e.0)?)
            }
            SchemeChoice::KindDefault => {
                return self.kind_settings.default_verifier(&secrets, tolerance)
            }
        };
        Ok(Some(verifier))
    }

    /// Why this provider's `fees` schedule checks nothing, when it does not: its kind
    /// reports no fee to compare (SPEC §5 lets any provider have a schedule).
    pub fn fees_note(&self) -> Option<String> {
        (!self.fees.is_empty() && !self.kind.spec().reports_fees()).then(|| {
            format!(
                "kind {} reports no fee, so this schedule checks nothing",
                self.kind
            )
        })
    }

    /// Lines describing this provider for `check-config`, secrets masked.
    pub fn describe(&self) -> Vec<String> {
        let mask = |s: Option<&NamedSecret>| match s {
            Some(s) => format!("{} = {}", s.env, masked(&s.value)),
            None => "(not set)".to_string(),
        };
        let mut lines = vec![format!(
            "provider {} (kind {}) base_url {}",
            self.id, self.kind, self.base_url
        )];
        let scheme = match self.build_verifier() {
            Ok(Some(v)) => v.scheme_name().to_string(),
            Ok(None) => "none (no webhooks)".to_string(),
            Err(err) => format!("invalid: {err}"),
        };
        lines.push(format!(
            "  webhook: POST /webhooks/{}  scheme {scheme}  tolerance {}s",
            self.id, self.verify.tolerance_secs
        ));
        for secret in &self.webhook_secrets {
            lines.push(format!(
                "  webhook secret #{}: {} = {}",
                secret.position,
                secret.env,
                masked(&secret.value)
            ));
        }
        lines.extend(self.kind_settings.describe_keys());
        for (name, value) in self.kind_settings.credentials() {
            lines.push(format!("  {name}: {}", mask(value)));
        }
        for unset in &self.unset_env {
            let state = if unset.set_but_empty {
                "set but empty (counts as not set)"
            } else {
                "not set"
            };
            let note = if unset.webhook_secret && !self.webhook_secrets.is_empty() {
                " (a rotation slot: fine when no secret is being rotated)"
            } else {
                ""
            };
            lines.push(format!("  variable {}: {state}{note}", unset.env));
        }
        lines.push(format!(
            "  poll every {}  status after {}  stuck after {}  max {} req/s  ledger {}",
            humantime::format_duration(self.poll_every),
            humantime::format_duration(self.status_after),
            humantime::format_duration(self.stuck_after),
            self.max_rps,
            if self.ledger { "on" } else { "off" }
        ));
        if let Some(note) = self.fees_note() {
            lines.push(format!("  fees: {note}"));
        }
        match self.missing_outbound_credentials() {
            None => lines.push("  poller: on".to_string()),
            Some(missing) => lines.push(format!("  poller: off ({missing} gives no value)")),
        }
        for endpoint in self.endpoints() {
            lines.push(format!("  endpoint: {endpoint}"));
        }
        lines
    }

    /// The provider API endpoints the poller calls (path overrides applied).
    pub fn endpoints(&self) -> Vec<String> {
        self.kind_settings.endpoints(self)
    }

    /// What outbound credential is missing, if any: without it the poller is off.
    pub fn missing_outbound_credentials(&self) -> Option<&'static str> {
        self.kind_settings.missing_outbound_credentials(self)
    }

    /// `base_url` without its trailing `/`, for endpoint lines.
    pub fn base_text(&self) -> &str {
        self.base_url.as_str().trim_end_matches('/')
    }
}

/// Shows that a secret is set without showing it.
pub fn masked(secret: &SecretString) -> String {
    if secret.expose_secret().is_empty() {
        "(empty)".to_string()
    } else {
        "****** (set)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const MINIMAL: &str = r#"
[[providers]]
id = "fiserv"
kind = "fiserv_pix"
base_url = "https://provider.example"
webhook_secrets_env = ["FISERV_WEBHOOK_SECRET", "FISERV_WEBHOOK_SECRET_PREVIOUS"]
"#;

    fn parse(text: &str, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::parse(text, Path::new("."), &env(vars))
    }

    #[test]
    fn a_minimal_config_gets_the_documented_defaults() {
        let settings = parse(MINIMAL, &[("FISERV_WEBHOOK_SECRET", "s1")]).unwrap();
        assert_eq!(settings.server.listen, "127.0.0.1:8080");
        assert_eq!(settings.server.max_body_bytes, 262_144);
        let provider = &settings.providers[0];
        assert_eq!(
            provider.webhook_secrets.len(),
            1,
            "unset previous secret is skipped"
        );
        assert_eq!(provider.poll_every, Duration::from_secs(300));
        assert_eq!(provider.missing_outbound_credentials(), Some("api_key_env"));
    }

    #[test]
    fn store_backend_and_url_env_are_the_specs_keys() {
        // Review finding: SPEC §8 fixes `store.backend` and `store.url_env`; both were
        // refused as unknown keys, `backend = "sqlite"` (SPEC's own example) included.
        let vars = [("FISERV_WEBHOOK_SECRET", "s1")];
        let defaults = parse(MINIMAL, &vars).unwrap();
        assert_eq!(defaults.postgres_url_env, "CASHOUT_RECON_DATABASE_URL");
        let set = parse(
            &format!("[store]\nbackend = \"sqlite\"\nurl_env = \"BOOK_URL\"\n{MINIMAL}"),
            &vars,
        )
        .unwrap();
        assert_eq!(set.postgres_url_env, "BOOK_URL");
        for (store, key) in [
            ("backend = \"mysql\"", "store.backend"),
            ("url_env = \"\"", "store.url_env: must name"),
            ("max_connections = 0", "store.max_connections"),
        ] {
            let err = parse(&format!("[store]\n{store}\n{MINIMAL}"), &vars)
                .err()
                .unwrap_or_else(|| panic!("{store} accepted"));
            assert!(err.to_string().starts_with(key), "{store}: {err}");
        }
    }

    #[test]
    fn store_ca_file_is_resolved_against_the_config_directory_and_checked() {
        let vars = [
            ("FISERV_WEBHOOK_SECRET", "s1"),
            (
                "BOOK_URL",
                "postgres://book:s3cret-pw@db.internal/book?sslmode=require",
            ),
        ];
        let postgres = "[store]\nbackend = \"postgres\"\nurl_env = \"BOOK_URL\"\n";
        // Missing: an error naming the key and the resolved path, with either backend
        // (copy-store --to postgres reads it beside a SQLite book).
        for backend in [postgres, "[store]\n"] {
            let err = Settings::parse(
                &format!("{backend}ca_file = \"certs/missing-ca.pem\"\n{MINIMAL}"),
                Path::new("/etc/cashout-recon"),
                &env(&vars),
            )
            .expect_err("a missing CA file refused")
            .to_string();
            assert!(
                err.starts_with("store.ca_file: /etc/cashout-recon/certs/missing-ca.pem: "),
                "{err}"
            );
            assert!(!err.contains("s3cret-pw"), "{err}");
        }
        // Present: resolved, and check-config's sentence names it.
        let dir = tempfile::tempdir().expect("a directory");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, TEST_CA_PEM).expect("written");
        let settings = Settings::parse(
            &format!("{postgres}ca_file = \"ca.pem\"\n{MINIMAL}"),
            dir.path(),
            &env(&vars),
        )
        .expect("valid");
        assert_eq!(settings.postgres_ca_file.as_deref(), Some(ca.as_path()));
        let StoreBackend::Postgres(pg) = &settings.store.backend else {
            panic!("not postgres");
        };
        assert_eq!(
            pg.describe_tls(),
            format!(
                "TLS: required (sslmode=require), server certificate and host name verified \
                 against the public roots and {}",
                ca.display()
            )
        );
        // A URL tokio-postgres alone would refuse (verify-full) is accepted.
        let vars = [
            ("FISERV_WEBHOOK_SECRET", "s1"),
            (
                "BOOK_URL",
                "postgres://b:p@db.internal/book?sslmode=verify-full",
            ),
        ];
        let settings = parse(&format!("{postgres}{MINIMAL}"), &vars).expect("valid");
        let StoreBackend::Postgres(pg) = &settings.store.backend else {
            panic!("not postgres");
        };
        assert_eq!(pg.describe(), "postgresql://db.internal:5432/book");
        assert!(pg
            .describe_tls()
            .starts_with("TLS: required (sslmode=verify-full)"));
    }

    /// A self-signed CA certificate (for the config's checks only).
    const TEST_CA_PEM: &str = include_str!("../fixtures/tls/test-ca.pem");

    #[test]
    fn backend_postgres_reads_its_url_from_the_variable_url_env_names() {
        let postgres =
            "[store]\nbackend = \"postgres\"\nurl_env = \"BOOK_URL\"\nmax_connections = 8\n";
        let url = "postgres://book:s3cret-pw@db.internal:6432/book";
        let settings = parse(
            &format!("{postgres}{MINIMAL}"),
            &[("FISERV_WEBHOOK_SECRET", "s1"), ("BOOK_URL", url)],
        )
        .unwrap();
        let StoreBackend::Postgres(pg) = &settings.store.backend else {
            panic!("not postgres: {:?}", settings.store.backend);
        };
        assert_eq!(pg.url.expose_secret(), url);
        assert_eq!(pg.url_env, "BOOK_URL");
        assert_eq!(pg.max_connections, 8);
        assert_eq!(pg.describe(), "postgresql://db.internal:6432/book");
        assert!(
            !format!("{settings:?}").contains("s3cret-pw"),
            "Debug hides the password"
        );
        assert!(parse(MINIMAL, &[("FISERV_WEBHOOK_SECRET", "s1")])
            .unwrap()
            .store
            .backend
            .is_sqlite());

        // Absent, empty or not a connection string: an error naming the key and the variable.
        for (value, says) in [
            (None, "BOOK_URL is not set"),
            (Some(""), "BOOK_URL is not set"),
            (
                Some("postgres://x:y@h:notaport/db"),
                "BOOK_URL is not a PostgreSQL connection string",
            ),
        ] {
            let mut vars = vec![("FISERV_WEBHOOK_SECRET", "s1")];
            if let Some(value) = value {
                vars.push(("BOOK_URL", value));
            }
            let err = parse(&format!("{postgres}{MINIMAL}"), &vars)
                .err()
                .unwrap_or_else(|| panic!("{value:?} accepted"))
                .to_string();
            assert!(err.starts_with("store.url_env: "), "{err}");
            assert!(err.contains(says), "{err}");
            assert!(!err.contains("s3cret") && !err.contains(":y@"), "{err}");
        }
    }

    #[test]
    fn keys_that_would_do_nothing_are_refused_naming_the_key() {
        let vars = [
            ("FISERV_WEBHOOK_SECRET", "s1"),
            ("SIMPAY_WEBHOOK_SECRET", "s2"),
            ("SIMPAY_TOKEN", "t"),
        ];
        let simpay = "[[providers]]\nid = \"simpay\"\nkind = \"simpay\"\n\
                      base_url = \"https://provider.example\"\n\
                      webhook_secrets_env = [\"SIMPAY_WEBHOOK_SECRET\"]\n";
        let cases: Vec<(String, &str, &str)> = vec![
            // The static token is part of SimPay's own scheme: another scheme skips it.
            (
                format!(
                    "{simpay}token_header = \"x-simpay-token\"\ntoken_env = \"SIMPAY_TOKEN\"\n\
                     [providers.verify]\nscheme = \"stripe\"\n"
                ),
                "providers[0].token_header",
                "would not be checked",
            ),
            (
                format!(
                    "{MINIMAL}signed_url = \"https://recon.example/webhooks/fiserv\"\n\
                     [providers.verify]\nscheme = \"standard_webhooks\"\n"
                ),
                "providers[0].signed_url",
                "would not be checked",
            ),
            // hmac-only keys beside another scheme.
            (
                format!(
                    "{MINIMAL}[providers.verify]\nscheme = \"standard_webhooks\"\n\
                     header = \"x-signature\"\n"
                ),
                "providers[0].verify.header",
                "only with scheme \"hmac\"",
            ),
            // A path the kind never calls.
            (
                format!("{MINIMAL}login_path = \"/login\"\n"),
                "providers[0].login_path",
                "its paths: search_path, status_path",
            ),
            // Secrets nothing reads.
            (
                "[[providers]]\nid = \"mannco\"\nkind = \"mannco\"\n\
                 base_url = \"https://provider.example\"\n\
                 webhook_secrets_env = [\"FISERV_WEBHOOK_SECRET\"]\n"
                    .to_string(),
                "providers[0].webhook_secrets_env",
                "no secret would be read",
            ),
        ];
        for (text, key, reason) in cases {
            let err = parse(&text, &vars).expect_err(&text).to_string();
            assert!(err.starts_with(&format!("{key}: ")), "{key}: {err}");
            assert!(err.contains(reason), "{key}: {err}");
        }
        // The same keys where they are read are fine.
        let hmac_with_signed_url = format!(
            "{MINIMAL}signed_url = \"https://recon.example/webhooks/fiserv\"\n\
             [providers.verify]\nscheme = \"hmac\"\nheader = \"x-sig\"\ntemplate = \"{{body}}\"\n"
        );
        parse(&hmac_with_signed_url, &vars).expect("signed_url feeds hmac's {path}");
        parse(&format!("{MINIMAL}status_path = \"/s/{{id}}\"\n"), &vars).expect("a fiserv path");
    }

    #[test]
    fn a_fee_schedule_on_a_kind_that_reports_no_fee_says_it_checks_nothing() {
        let vars = [("FISERV_WEBHOOK_SECRET", "s1")];
        let settings = parse(&format!("{MINIMAL}fees = {{ default = \"1%\" }}\n"), &vars)
            .expect("SPEC §5: any provider may have a schedule");
        let lines = settings.providers[0].describe().join("\n");
        assert!(
            lines.contains("fees: kind fiserv_pix reports no fee, so this schedule checks nothing"),
            "{lines}"
        );
        let plain = parse(MINIMAL, &vars).expect("no schedule");
        assert_eq!(plain.providers[0].fees_note(), None);
    }

    #[test]
    fn an_archive_dir_beside_raw_bodies_kept_forever_is_refused() {
        let text =
            format!("[store]\nretain_raw_bodies = \"0s\"\narchive_dir = \"archive\"\n{MINIMAL}");
        let err = parse(&text, &[("FISERV_WEBHOOK_SECRET", "s1")]).expect_err("archive of nothing");
        assert!(
            err.to_string()
                .starts_with("store.archive_dir: nothing would be archived"),
            "{err}"
        );
    }

    #[test]
    fn zero_http_workers_are_refused_naming_the_key() {
        let err = parse("[server]\nworkers = 0\n", &[]).expect_err("workers = 0");
        assert_eq!(err.to_string(), "server.workers: must be at least 1");
    }

    #[test]
    fn bad_configs_name_the_key() {
        let vars = [("FISERV_WEBHOOK_SECRET", "s1")];
        let cases: Vec<(String, &str)> = vec![
            (format!("{MINIMAL}\nbogus = 1"), "providers[0].bogus"),
            (
                "[server]\nlisten = \"nowhere\"".to_string(),
                "server.listen",
            ),
            ("[serverx]\nlisten = 1".to_string(), "serverx"),
            (
                MINIMAL.replace("poll_every", "x").replace(
                    "base_url = \"https://provider.example\"",
                    "base_url = \"https://provider.example\"\npoll_every = \"soon\"",
                ),
                "providers[0].poll_every",
            ),
            (MINIMAL.replace("fiserv_pix", "paypal"), "providers[0].kind"),
            (
                MINIMAL.replace("https://provider.example", "not a url"),
                "providers[0].base_url",
            ),
            (
                format!("{MINIMAL}fees = {{ payoneer = \"two\" }}\n"),
                "providers[0].fees.payoneer",
            ),
            ("[reconcile]\nevery = \"0s\"".to_string(), "reconcile.every"),
            (
                "[instances]\nlease_ttl = \"10s\"\nrenew_every = \"6s\"".to_string(),
                "instances.renew_every",
            ),
            (
                "[instances]\nlease_ttl = \"0s\"".to_string(),
                "instances.lease_ttl",
            ),
            (
                "[reports]\ntimezone = \"Mars/Olympus\"".to_string(),
                "reports.timezone",
            ),
            (
                "[[providers]]\nkind = \"simpay\"\nbase_url = \"https://x.example\"".to_string(),
                "id",
            ),
        ];
        for (text, key) in cases {
            let err = parse(&text, &vars).expect_err(key).to_string();
            assert!(err.contains(key), "error {err:?} should name {key}");
        }
    }

    #[test]
    fn kind_keys_are_read_by_their_kind_and_refused_by_the_others() {
        let vars = [("FISERV_WEBHOOK_SECRET", "s1"), ("KEY", "k")];
        let text =
            format!("{MINIMAL}api_key_env = \"KEY\"\nsigned_url = \"https://r.example/w\"\n");
        let settings = parse(&text, &vars).unwrap();
        let own = settings.providers[0]
            .kind_settings::<crate::providers::fiserv_pix::FiservPixSettings>()
            .expect("fiserv_pix settings");
        assert_eq!(own.api_key.as_ref().map(|s| s.env.as_str()), Some("KEY"));
        assert_eq!(own.signed_url.as_deref(), Some("https://r.example/w"));
        assert!(settings.providers[0]
            .kind_settings::<crate::providers::mannco::ManncoSettings>()
            .is_none());
        for (line, key) in [
            ("client_id_env = \"X\"", "providers[0].client_id_env"),
            ("public_keys = []", "providers[0].public_keys"),
            ("control_prefix = \"x\"", "providers[0].control_prefix"),
        ] {
            let err = parse(&format!("{MINIMAL}{line}\n"), &vars)
                .unwrap_err()
                .to_string();
            assert_eq!(err, format!("{key}: is not a key of kind fiserv_pix"));
        }
        let err = parse(&format!("{MINIMAL}api_key_env = 5\n"), &vars)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "providers[0].api_key_env: invalid type: integer `5`, expected a string"
        );
        let err = parse(&format!("{MINIMAL}bogus = 1\n"), &vars)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("providers[0].bogus: unknown field `bogus`, expected one of `id`, "),
            "{err}"
        );
        for key in known_provider_keys() {
            assert!(err.contains(&format!("`{key}`")), "{key} listed: {err}");
        }
    }

    #[test]
    fn the_generic_key_list_is_the_generic_sections_fields() {
        let mut table = toml::Table::new();
        table.insert("zz_not_a_key".to_string(), toml::Value::Integer(1));
        let err = deserialize_at::<ProviderSection>("p", table)
            .err()
            .expect("an unknown key")
            .to_string();
        let (_, listed) = err.split_once("expected one of ").expect(&err);
        let mut fields: Vec<&str> = listed.split(", ").map(|f| f.trim_matches('`')).collect();
        let mut generic = GENERIC_PROVIDER_KEYS.to_vec();
        fields.sort_unstable();
        generic.sort_unstable();
        assert_eq!(fields, generic);
    }

    #[test]
    fn kind_names_are_the_config_names() {
        for kind in ProviderKind::ALL {
            let parsed: ProviderKind =
                serde_json::from_value(serde_json::json!(kind.as_str())).unwrap();
            assert_eq!(parsed, kind);
            assert_eq!(kind.as_str().parse::<ProviderKind>(), Ok(kind));
            for key in kind.spec().config_keys() {
                assert!(
                    !GENERIC_PROVIDER_KEYS.contains(key),
                    "{kind} claims the generic key {key}"
                );
            }
        }
    }

    #[test]
    fn mannco_has_a_default_fee_schedule_and_no_verifier() {
        let text =
            "[[providers]]\nid = \"m\"\nkind = \"mannco\"\nbase_url = \"https://m.example\"\n";
        let settings = parse(text, &[]).unwrap();
        let provider = &settings.providers[0];
        let rule = provider.fees.rule_for(Some("payoneer")).unwrap();
        assert_eq!(rule.fee_minor(10_000, 2), Some(200));
        assert!(provider.build_verifier().unwrap().is_none());
        let err = parse(
            &format!("{text}[providers.verify]\nscheme = \"stripe\"\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "providers[0].verify: mannco sends no webhooks, so there is nothing to verify"
        );
    }

    #[test]
    fn the_alert_sink_needs_a_standard_webhooks_secret_and_is_shown_masked() {
        let sink = "[alerts]\nwebhook_url = \"https://hooks.slack.com/services/T0/B0/XYZ\"\n";
        let cases = [
            (vec![], "CASHOUT_RECON_ALERT_SECRET is not set"),
            (
                vec![("CASHOUT_RECON_ALERT_SECRET", "plain words")],
                "not a Standard Webhooks secret",
            ),
        ];
        for (vars, message) in cases {
            let err = parse(sink, &vars).expect_err(message).to_string();
            assert!(
                err.contains("alerts.signing_secret_env") && err.contains(message),
                "{err}"
            );
        }
        let settings = parse(
            sink,
            &[(
                "CASHOUT_RECON_ALERT_SECRET",
                "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
            )],
        )
        .unwrap();
        let lines = settings.alerts.describe().join("\n");
        assert!(
            lines.contains("POST https://hooks.slack.com/***"),
            "the URL's credentials are masked: {lines}"
        );
        assert!(!lines.contains("XYZ") && !lines.contains("C2FV"), "{lines}");
        assert!(
            lines.contains("CASHOUT_RECON_ALERT_SECRET = ****** (set)"),
            "{lines}"
        );
        assert_eq!(settings.alerts.group_over, 20);
        let log_only = parse("", &[]).unwrap().alerts.describe();
        assert_eq!(log_only, ["alerts: log only (alerts.webhook_url is empty)"]);
        let err = parse("[alerts]\npoll_failing_cycles = 0", &[])
            .expect_err("zero cycles")
            .to_string();
        assert!(err.contains("alerts.poll_failing_cycles"), "{err}");
    }

    #[test]
    fn a_provider_needs_one_set_webhook_secret() {
        let err = parse(MINIMAL, &[]).unwrap_err().to_string();
        assert!(err.contains("providers[0].webhook_secrets_env"), "{err}");
        assert!(err.contains("FISERV_WEBHOOK_SECRET"), "{err}");
    }

    #[test]
    fn any_provider_may_have_a_fee_schedule_and_mannco_has_a_default() {
        let settings = parse(
            &format!("{MINIMAL}fees = {{ default = \"1.5% + 0.30\" }}\n"),
            &[("FISERV_WEBHOOK_SECRET", "s")],
        )
        .unwrap();
        let rule = settings.providers[0].fees.rule_for(Some("pix")).unwrap();
        assert_eq!(rule.fee_minor(10_000, 2), Some(180));
        let err = parse(
            &format!("{MINIMAL}fees = {{ default = \"2% + 3%\" }}\n"),
            &[("FISERV_WEBHOOK_SECRET", "s")],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("providers[0].fees.default"), "{err}");
    }

    #[test]
    fn config_errors_name_the_key_once_without_a_trailer() {
        let text = MINIMAL.replace(
            "base_url = \"https://provider.example\"",
            "base_url = \"https://provider.example\"\npoll_every = \"soon\"",
        );
        let err = parse(&text, &[("FISERV_WEBHOOK_SECRET", "s1")])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("providers[0].poll_every: "), "{err}");
        assert!(
            !err.contains(" in `"),
            "no trailer naming the key again: {err}"
        );
    }

    #[test]
    fn raw_body_retention_defaults_to_400_days_and_0s_keeps_forever() {
        let secret = [("FISERV_WEBHOOK_SECRET", "s1")];
        let settings = parse(MINIMAL, &secret).unwrap();
        assert_eq!(
            settings.retention.retain_raw_bodies,
            Some(Duration::from_secs(400 * 86_400))
        );
        assert_eq!(settings.retention.archive_dir, None);
        let text = format!("[store]\nretain_raw_bodies = \"0s\"\n{MINIMAL}");
        assert_eq!(
            parse(&text, &secret).unwrap().retention.retain_raw_bodies,
            None
        );
        let text =
            format!("[store]\nretain_raw_bodies = \"90d\"\narchive_dir = \"archive\"\n{MINIMAL}");
        let settings = Settings::parse(&text, Path::new("/etc/cr"), &env(&secret)).unwrap();
        assert_eq!(
            settings.retention.retain_raw_bodies,
            Some(Duration::from_secs(90 * 86_400))
        );
        assert_eq!(
            settings.retention.archive_dir.as_deref(),
            Some(Path::new("/etc/cr/archive"))
        );
        for bad in ["400s", "soon"] {
            let text = format!("[store]\nretain_raw_bodies = \"{bad}\"\n{MINIMAL}");
            let err = parse(&text, &secret).unwrap_err().to_string();
            assert!(err.starts_with("store.retain_raw_bodies: "), "{err}");
        }
    }

    #[test]
    fn relative_store_and_reports_paths_are_relative_to_the_config_directory() {
        let text = format!("[store]\npath = \"data/book.db\"\n[reports]\ndir = \"out\"\n{MINIMAL}");
        let settings = Settings::parse(
            &text,
            Path::new("/etc/cashout-recon"),
            &env(&[("FISERV_WEBHOOK_SECRET", "s1")]),
        )
        .unwrap();
        assert_eq!(
            settings.store.path,
            Path::new("/etc/cashout-recon/data/book.db")
        );
        assert_eq!(settings.reports.dir, Path::new("/etc/cashout-recon/out"));
        let absolute = text.replace("data/book.db", "/var/lib/book.db");
        let settings = Settings::parse(
            &absolute,
            Path::new("/etc/cashout-recon"),
            &env(&[("FISERV_WEBHOOK_SECRET", "s1")]),
        )
        .unwrap();
        assert_eq!(settings.store.path, Path::new("/var/lib/book.db"));
    }

    #[test]
    fn unset_rotation_and_set_but_empty_variables_are_described() {
        let settings = parse(
            &format!("{MINIMAL}api_key_env = \"FISERV_API_KEY\"\n"),
            &[("FISERV_WEBHOOK_SECRET", "s1"), ("FISERV_API_KEY", "")],
        )
        .unwrap();
        let text = settings.providers[0].describe().join("\n");
        assert!(
            text.contains("variable FISERV_WEBHOOK_SECRET_PREVIOUS: not set (a rotation slot"),
            "{text}"
        );
        assert!(
            text.contains("variable FISERV_API_KEY: set but empty (counts as not set)"),
            "{text}"
        );
        let err = parse(MINIMAL, &[("FISERV_WEBHOOK_SECRET", "")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("FISERV_WEBHOOK_SECRET is set but empty"),
            "{err}"
        );
    }

    #[test]
    fn secrets_are_masked_in_descriptions() {
        let settings = parse(MINIMAL, &[("FISERV_WEBHOOK_SECRET", "super-secret-value")]).unwrap();
        let text = settings.providers[0].describe().join("\n");
        assert!(!text.contains("super-secret-value"));
        assert!(text.contains("FISERV_WEBHOOK_SECRET"));
    }
}
