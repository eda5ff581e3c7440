//! What a provider kind supplies: `KindSpec`, the one entry through which the config,
//! the poller, `check-config` and the simulator reach a kind, and [`KindSettings`], its
//! own part of a `[[providers]]` entry.
//!
//! A kind is one module (`src/providers/<kind>.rs`) and one line of the registry
//! (`provider_kinds!` in `providers/mod.rs`); nothing else matches on the kind.

use std::any::Any;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use reqwest::Url;
use secrecy::SecretString;
use serde::de::DeserializeOwned;

use super::client::ProviderClient;
use super::outbound::Sender;
use super::{ProviderAdapter, ProviderKind};
use crate::config::{ConfigError, Environment, NamedSecret, ProviderSettings, SchemeChoice};
use crate::verify::Verifier;

/// One provider kind: its adapter, its config keys and settings, its outbound client and
/// its simulator.
pub(crate) trait KindSpec: Send + Sync {
    /// The inbound side: parsing and mapping of its webhooks.
    fn adapter(&self) -> &'static dyn ProviderAdapter;

    /// The wire names of the provider's cash-out id and of the platform's id it echoes
    /// (SPEC §4), for error messages.
    fn id_fields(&self) -> (&'static str, &'static str);

    /// The keys of a `[[providers]]` entry that only this kind accepts (SPEC §8); the
    /// generic ones (`id`, `kind`, `base_url`, …) are the config's.
    fn config_keys(&self) -> &'static [&'static str];

    /// Which of the generic path overrides (`search_path`, `status_path`, `login_path`,
    /// `token_path`) its client calls; the others are refused for this kind.
    fn path_overrides(&self) -> &'static [&'static str];

    /// Of [`KindSpec::config_keys`], those that a `[providers.verify]` `scheme` leaves
    /// unread (they belong to the kind's own verification): refused beside it.
    fn keys_unread_with(&self, scheme: SchemeChoice) -> &'static [&'static str] {
        let _ = scheme;
        &[]
    }

    /// Whether its cash-outs carry a fee: a `fees` schedule checks nothing otherwise.
    fn reports_fees(&self) -> bool {
        false
    }

    /// Whether `webhook_secrets_env` must name a set variable with this verify scheme.
    fn requires_webhook_secrets(&self, scheme: SchemeChoice) -> bool {
        let _ = scheme;
        self.adapter().sends_webhooks()
    }

    /// Reads and validates this kind's keys (only those of [`KindSpec::config_keys`]
    /// that were given); errors name the key through `cx`.
    fn settings(
        &self,
        keys: toml::Table,
        cx: &mut KindContext<'_>,
    ) -> Result<Arc<dyn KindSettings>, ConfigError>;

    /// The fee schedule (method, rule) used when the entry has no `fees` key.
    fn default_fees(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }

    /// The API client of a configured provider of this kind; `None` when its outbound
    /// credentials are incomplete.
    fn build_client(
        &self,
        settings: &ProviderSettings,
        sender: Sender,
    ) -> Option<Arc<dyn ProviderClient>>;

    /// The kind's simulator (`src/sim/<kind>.rs`), when it has one: `simulate`, `demo`
    /// and the end-to-end tests play only kinds that do.
    fn simulator(&self) -> Option<&'static dyn crate::sim::KindSim> {
        None
    }
}

/// A kind's validated part of a `[[providers]]` entry. Each kind has its own type; its
/// client reads it back with [`ProviderSettings::kind_settings`].
pub trait KindSettings: fmt::Debug + Send + Sync + 'static {
    /// For [`ProviderSettings::kind_settings`].
    fn as_any(&self) -> &dyn Any;

    /// The verifier of the kind's default scheme (`verify.scheme` absent or "kind
    /// default"); `None` for a kind that sends no webhooks.
    fn default_verifier(
        &self,
        secrets: &[SecretString],
        tolerance_secs: u64,
    ) -> Result<Option<Verifier>, String>;

    /// The URL the provider signs when a proxy rewrites the path (Fiserv `signed_url`),
    /// used by the `hmac` scheme too.
    fn signed_url(&self) -> Option<&str> {
        None
    }

    /// A webhook header carrying a static secret (SimPay `token_header`): checked, never
    /// stored.
    fn token_header(&self) -> Option<&str> {
        None
    }

    /// Lines after the webhook secrets in `check-config` (Pismo's public keys).
    fn describe_keys(&self) -> Vec<String> {
        Vec::new()
    }

    /// The outbound credentials, labelled, in `check-config` order.
    fn credentials(&self) -> Vec<(&'static str, Option<&NamedSecret>)>;

    /// The key whose credential is missing, if any: without it the poller is off.
    fn missing_outbound_credentials(&self, provider: &ProviderSettings) -> Option<&'static str>;

    /// The provider API endpoints the poller calls (path overrides applied).
    fn endpoints(&self, provider: &ProviderSettings) -> Vec<String>;
}

/// What a kind needs to validate its keys: where errors point, the environment, and the
/// entry's generic settings already validated.
pub struct KindContext<'a> {
    pub(crate) index: usize,
    pub(crate) kind: ProviderKind,
    pub(crate) base_dir: &'a Path,
    pub(crate) env: &'a dyn Environment,
    /// The entry's verify scheme.
    pub scheme: SchemeChoice,
    /// Variables named by the kind's `*_env` keys, in the order read.
    pub(crate) credential_env: Vec<String>,
}

impl KindContext<'_> {
    /// The key's full name, `providers[N].name`.
    pub fn key(&self, name: &str) -> String {
        format!("providers[{}].{name}", self.index)
    }

    /// An error naming `providers[N].name`.
    pub fn error(&self, name: &str, message: impl fmt::Display) -> ConfigError {
        ConfigError(format!("{}: {message}", self.key(name)))
    }

    /// The kind being validated.
    pub fn kind(&self) -> ProviderKind {
        self.kind
    }

    /// Deserializes the kind's keys into its own (`deny_unknown_fields`) type; an error
    /// names the key as the rest of the config does (`providers[N].key: …`).
    pub fn parse<T: DeserializeOwned>(&self, keys: toml::Table) -> Result<T, ConfigError> {
        crate::config::deserialize_at(&format!("providers[{}]", self.index), keys)
    }

    /// The secret in the variable a `*_env` key names, when set and not empty; the name
    /// is remembered for `check-config`'s list of unset variables.
    pub fn secret(&mut self, env_name: &Option<String>) -> Option<NamedSecret> {
        let var = env_name.as_ref()?;
        self.credential_env.push(var.clone());
        self.env.var(var).map(|value| NamedSecret {
            env: var.clone(),
            value: SecretString::from(value),
            position: 0,
        })
    }

    /// An http(s) URL key.
    pub fn url(&self, name: &str, text: &str) -> Result<Url, ConfigError> {
        crate::config::parse_url(&self.key(name), text)
    }

    /// A path key: as written when absolute, else relative to the config file's directory.
    pub fn path(&self, path: &Path) -> PathBuf {
        crate::config::relative_to(self.base_dir, path)
    }
}
