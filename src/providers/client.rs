//! The outbound side of a provider: the trait the poller calls to search and fetch status.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::providers::{Observation, ParseError};

/// Why a provider call failed (after retries).
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Credentials refused (after one token refresh).
    #[error("credentials refused ({0})")]
    Unauthorized(String),
    /// Still throttled after honouring `Retry-After`.
    #[error("rate limited; retry after {0:?}")]
    RateLimited(Duration),
    /// The provider answered an error status.
    #[error("provider answered HTTP {status}")]
    Status { status: u16 },
    /// The cash-out is unknown to the provider.
    #[error("cash-out {0} is unknown to the provider")]
    NotFound(String),
    /// Timeouts or connection errors on every attempt.
    #[error("provider unreachable: {0}")]
    Unreachable(String),
    /// The answer could not be decoded or mapped.
    #[error("cannot decode the provider's answer: {0}")]
    Decode(String),
    /// An id that breaks the id rule is never sent to the provider.
    #[error("refused to ask the provider: {0}")]
    InvalidId(String),
    /// This provider has no such endpoint.
    #[error("not supported by this provider: {0}")]
    NotSupported(&'static str),
}

impl From<ParseError> for ProviderError {
    fn from(err: ParseError) -> Self {
        ProviderError::Decode(err.0)
    }
}

/// A time window of a search sweep: cash-outs changed in `[from, to)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchWindow {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// One page of a search.
#[derive(Debug)]
pub struct SearchPage {
    /// Each item decoded on its own: one bad item does not hide the others.
    pub items: Vec<Result<Observation, ParseError>>,
    /// The page to ask for next, `None` after the last page.
    pub next_page: Option<u32>,
}

/// A provider's API as the poller uses it. Implementations handle auth, signing,
/// retries with backoff, `Retry-After`, and the provider's `max_rps`.
#[async_trait]
pub trait ProviderClient: Send + Sync {
    /// The first page number of a search (providers count from 0 or 1).
    fn first_page(&self) -> u32;

    /// Whether the provider has a search (or history) endpoint.
    fn can_search(&self) -> bool;

    /// One page of cash-outs changed in `window`.
    async fn search_page(
        &self,
        window: SearchWindow,
        page: u32,
    ) -> Result<SearchPage, ProviderError>;

    /// Whether the provider can fetch one cash-out's status by id.
    fn can_fetch_status(&self) -> bool;

    /// The current state of one cash-out.
    async fn fetch_status(&self, provider_ref: &str) -> Result<Observation, ProviderError>;
}

/// The API client of one configured provider, sharing nothing with the others (its own
/// HTTP client, `max_rps` pacer and tokens). With `shared_pacing` (the PostgreSQL store
/// several instances share) its `max_rps` holds for every instance together. `None` when
/// the provider's outbound credentials are incomplete (its poller is then off) or the HTTP
/// client cannot be built.
pub fn build_client(
    settings: &crate::config::ProviderSettings,
    poll: &crate::config::PollSettings,
    metrics: &crate::metrics::Metrics,
    shared_pacing: Option<&crate::store::postgres::PgStore>,
) -> Option<std::sync::Arc<dyn ProviderClient>> {
    use crate::providers::outbound::Sender;

    if settings.missing_outbound_credentials().is_some() {
        return None;
    }
    let sender = match Sender::new(&settings.id, settings.max_rps, poll, metrics) {
        Ok(sender) => sender,
        Err(err) => {
            tracing::error!(
                provider = %settings.id,
                error = %err,
                "cannot build the provider's HTTP client"
            );
            return None;
        }
    };
    let sender = match shared_pacing {
        Some(store) => sender.pace_across_instances(store.clone()),
        None => sender,
    };
    settings.kind.spec().build_client(settings, sender)
}

#[cfg(test)]
mod build_client_tests {
    use std::time::Duration;

    use super::*;
    use crate::metrics::Metrics;
    use crate::providers::outbound::test_support::{poll, provider_settings};

    /// Kind, outbound keys, can_search, can_fetch_status, first_page.
    const PROVIDERS: [(&str, &str, bool, bool, u32); 5] = [
        (
            "fiserv_pix",
            r#"webhook_secrets_env = ["WH"]
api_key_env = "A"
api_secret_env = "B"
bearer_token_env = "C""#,
            true,
            true,
            1,
        ),
        (
            "simpay",
            r#"webhook_secrets_env = ["WH"]
client_id_env = "A"
client_secret_env = "B""#,
            false,
            true,
            1,
        ),
        (
            "tupay",
            r#"webhook_secrets_env = ["WH"]
login_env = "A"
pass_env = "B"
api_signature_env = "C""#,
            true,
            true,
            0,
        ),
        ("mannco", r#"api_key_env = "A""#, true, false, 1),
        (
            "pismo",
            r#"status_path = "/v1/x/{id}"
public_keys = [{ kid = "k1", pem_file = "fixtures/keys/pismo-ec-public.pem" }]"#,
            false,
            true,
            1,
        ),
    ];

    fn toml(kind: &str, keys: &str) -> String {
        format!(
            "[[providers]]\nid = \"p\"\nkind = \"{kind}\"\nbase_url = \"http://127.0.0.1:9\"\n{keys}\n"
        )
    }

    #[test]
    fn every_kind_builds_a_client_with_its_capabilities() {
        let env = [("WH", "wh"), ("A", "a"), ("B", "b"), ("C", "c")];
        for (kind, keys, can_search, can_fetch_status, first_page) in PROVIDERS {
            let settings = provider_settings(&toml(kind, keys), &env);
            let client = build_client(
                &settings,
                &poll(Duration::from_secs(1), 1),
                &Metrics::new(),
                None,
            )
            .unwrap_or_else(|| panic!("{kind} builds"));
            assert_eq!(client.can_search(), can_search, "{kind}");
            assert_eq!(client.can_fetch_status(), can_fetch_status, "{kind}");
            assert_eq!(client.first_page(), first_page, "{kind}");
        }
    }

    #[test]
    fn a_provider_without_outbound_credentials_has_no_client() {
        let pismo_keys =
            r#"public_keys = [{ kid = "k1", pem_file = "fixtures/keys/pismo-ec-public.pem" }]"#;
        for (kind, keys, ..) in PROVIDERS {
            // The webhook secret only: no outbound credential, and Pismo without status_path.
            let keys = if kind == "pismo" { pismo_keys } else { keys };
            let settings = provider_settings(&toml(kind, keys), &[("WH", "wh")]);
            assert!(settings.missing_outbound_credentials().is_some(), "{kind}");
            let client = build_client(
                &settings,
                &poll(Duration::from_secs(1), 1),
                &Metrics::new(),
                None,
            );
            assert!(client.is_none(), "{kind}");
        }
    }
}
