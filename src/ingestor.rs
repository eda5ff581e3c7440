//! The ingestion use cases: a verified webhook ([`Ingestor::receive`]), a polled
//! observation ([`Ingestor::record_poll`]) and a reprocessed quarantined event
//! ([`Ingestor::reprocess`]).
//!
//! Each builds what the store takes (the webhook record with its dedup key and replay
//! nonce, the poll's kind, the re-parsed observation) and hands it to the store, which
//! loads what the rules of [`crate::ingest::plan`] need, asks them and applies the plan
//! atomically. The HTTP handlers and the poller call this, never the store's ingestion
//! operations.

use chrono::{DateTime, Utc};

use crate::ingest::plan::PollKind;
use crate::ingest::{
    body_sha256, dedup_key, replay_nonce, Applied, EventOutcome, FetchReason, IngestOutcome,
    WebhookRecord,
};
use crate::providers::registry::{ConfiguredProvider, ProviderRegistry};
use crate::providers::Observation;
use crate::store::{Store, StoreError};
use crate::verify::{InboundRequest, RequestHeaders, Verified};

/// Most status fetches of one provider that unverified webhooks may have queued at once.
const MAX_UNVERIFIED_FETCHES_QUEUED: usize = 10_000;

/// Headers never stored with an event: credentials.
const UNSTORED_HEADERS: [&str; 6] = [
    "authorization",
    "cookie",
    "apikey",
    "x-api-key",
    "proxy-authorization",
    "set-cookie",
];

/// A webhook whose signature was verified.
pub struct VerifiedWebhook<'a> {
    pub request: &'a InboundRequest<'a>,
    pub verified: Verified,
    pub received_at: DateTime<Utc>,
}

/// Why a quarantined event could not be reprocessed.
#[derive(Debug, thiserror::Error)]
pub enum ReprocessError {
    #[error("no such event")]
    NoSuchEvent,
    /// Reprocessed (or gone) between the look-up and the write.
    #[error("no such quarantined event")]
    NoLongerQuarantined,
    #[error("event {event_id} is {outcome}, not quarantined")]
    NotQuarantined {
        event_id: String,
        outcome: EventOutcome,
    },
    #[error("provider {0} is no longer configured")]
    UnknownProvider(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What reprocessing did, and for which provider.
#[derive(Debug, Clone)]
pub struct Reprocessed {
    pub provider: String,
    pub outcome: IngestOutcome,
}

/// The ingestion use cases over one store; cheap to clone.
#[derive(Clone)]
pub struct Ingestor {
    store: Store,
}

impl Ingestor {
    pub fn new(store: Store) -> Ingestor {
        Ingestor { store }
    }

    /// Commits one verified webhook: dedup, replay check, quarantine or the state rule,
    /// event log; answered after the commit.
    pub async fn receive(
        &self,
        provider: &ConfiguredProvider,
        webhook: VerifiedWebhook<'_>,
    ) -> Result<IngestOutcome, StoreError> {
        let record = webhook_record(provider, webhook);
        self.store.ingest_webhook(record).await
    }

    /// Applies a polled observation: a search sweep's item or a fetched status.
    /// `counts_as_missed`: a state change found this way is a `missed_webhook` (the
    /// provider sends webhooks).
    pub async fn record_poll(
        &self,
        provider: &str,
        observation: Observation,
        kind: PollKind,
        counts_as_missed: bool,
        at: DateTime<Utc>,
    ) -> Result<Applied, StoreError> {
        let provider = provider.to_string();
        match kind {
            PollKind::Sweep => {
                self.store
                    .apply_polled(provider, observation, counts_as_missed, at)
                    .await
            }
            PollKind::StatusFetch => {
                self.store
                    .record_fetched_status(provider, observation, counts_as_missed, at)
                    .await
            }
        }
    }

    /// Queues a status fetch of the cash-out an unverified webhook named (its caller
    /// rate-limits them), so a genuine webhook signed with a rotated secret is still
    /// resolved by polling. `false`: already queued, the queue is full, or the id breaks
    /// the id rule.
    pub async fn fetch_unverified(
        &self,
        provider: &str,
        provider_ref: String,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        self.store
            .request_status_fetch(
                provider.to_string(),
                provider_ref,
                FetchReason::UnverifiedWebhook,
                MAX_UNVERIFIED_FETCHES_QUEUED,
                at,
            )
            .await
    }

    /// Re-parses a quarantined event with its provider's current mapping and applies it
    /// (or keeps it quarantined with the new reason).
    pub async fn reprocess(
        &self,
        providers: &ProviderRegistry,
        event_id: String,
        at: DateTime<Utc>,
    ) -> Result<Reprocessed, ReprocessError> {
        let event = self
            .store
            .get_event(event_id)
            .await?
            .ok_or(ReprocessError::NoSuchEvent)?;
        if event.outcome != EventOutcome::Quarantined {
            return Err(ReprocessError::NotQuarantined {
                event_id: event.event_id,
                outcome: event.outcome,
            });
        }
        let provider = providers
            .get(&event.provider)
            .ok_or_else(|| ReprocessError::UnknownProvider(event.provider.clone()))?;
        let mut headers = RequestHeaders::new();
        if let Some(stored) = event.headers_json.as_deref().and_then(|h| {
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(h).ok()
        }) {
            for (name, value) in stored {
                if let Some(value) = value.as_str() {
                    headers.insert(&name, value);
                }
            }
        }
        let body = event.raw_body.unwrap_or_default();
        let inbound = InboundRequest {
            path: "",
            headers: &headers,
            body: &body,
        };
        let parsed = provider.parse_webhook(&inbound).map_err(|err| err.0);
        let outcome = self
            .store
            .reprocess_event(event.event_id, parsed, at)
            .await?
            .ok_or(ReprocessError::NoLongerQuarantined)?;
        Ok(Reprocessed {
            provider: event.provider,
            outcome,
        })
    }
}

/// The record the store commits: a fresh event id, the dedup key, the replay nonce
/// (when the scheme signs a timestamp), the body, the headers that may be kept and the
/// parse result.
fn webhook_record(provider: &ConfiguredProvider, webhook: VerifiedWebhook<'_>) -> WebhookRecord {
    let VerifiedWebhook {
        request,
        verified,
        received_at,
    } = webhook;
    let body_sha256 = body_sha256(request.body);
    let dedup_key = dedup_key(
        verified.request_id.clone(),
        || provider.adapter.body_event_id(request),
        &body_sha256,
    );
    let nonce = provider
        .verifier
        .as_ref()
        .is_some_and(|verifier| verifier.has_replay_window())
        .then(|| replay_nonce(verified.timestamp, &verified.replay_key));
    WebhookRecord {
        event_id: uuid::Uuid::now_v7().to_string(),
        provider: provider.id().to_string(),
        dedup_key,
        nonce,
        body_sha256,
        raw_body: request.body.to_vec(),
        headers_json: stored_headers(request.headers, provider),
        secret_index: provider.secret_position(verified.secret_index),
        received_at,
        parsed: provider.parse_webhook(request).map_err(|err| err.0),
    }
}

/// The request's headers as a JSON object, without credentials (nor the provider's
/// token header): names in order, a repeated name with its last value.
fn stored_headers(headers: &RequestHeaders, provider: &ConfiguredProvider) -> String {
    let token_header = provider.settings.token_header.as_deref();
    let mut kept: Vec<(&str, &str)> = headers
        .iter()
        .filter(|(name, _)| {
            !UNSTORED_HEADERS.contains(name)
                && !token_header.is_some_and(|token| token.eq_ignore_ascii_case(name))
        })
        .collect();
    // A stable sort keeps a repeated name's values in arrival order; the last one stays.
    kept.sort_by(|a, b| a.0.cmp(b.0));
    kept.dedup_by(|later, earlier| {
        let same = later.0 == earlier.0;
        if same {
            *earlier = *later;
        }
        same
    });
    serde_json::to_string(&HeaderObject(&kept)).unwrap_or_else(|_| "{}".to_string())
}

/// Serializes (name, value) pairs as one JSON object without building a map first.
struct HeaderObject<'a>(&'a [(&'a str, &'a str)]);

impl serde::Serialize for HeaderObject<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::config::Settings;

    fn fiserv() -> Arc<ConfiguredProvider> {
        let text = r#"
[store]
path = "unused.db"

[reports]
dir = "unused-reports"

[[providers]]
id = "fiserv"
kind = "fiserv_pix"
base_url = "http://127.0.0.1:9"
webhook_secrets_env = ["TEST_FISERV_SECRET"]
"#;
        let env: BTreeMap<String, String> =
            [("TEST_FISERV_SECRET".to_string(), "secret".to_string())]
                .into_iter()
                .collect();
        let settings = Settings::parse(text, Path::new("."), &env).expect("settings");
        let registry = ProviderRegistry::build(&settings).expect("registry");
        registry.get("fiserv").expect("fiserv").clone()
    }

    #[test]
    fn an_event_records_its_secrets_position_in_the_configured_list() {
        let text = r#"
[store]
path = "unused.db"

[reports]
dir = "unused-reports"

[[providers]]
id = "fiserv"
kind = "fiserv_pix"
base_url = "http://127.0.0.1:9"
webhook_secrets_env = ["TEST_FISERV_SECRET", "TEST_FISERV_SECRET_PREVIOUS"]
"#;
        // Only the rotation slot is set: the one secret the verifier has is position 1.
        let env: BTreeMap<String, String> = [(
            "TEST_FISERV_SECRET_PREVIOUS".to_string(),
            "previous".to_string(),
        )]
        .into_iter()
        .collect();
        let settings = Settings::parse(text, Path::new("."), &env).expect("settings");
        let registry = ProviderRegistry::build(&settings).expect("registry");
        let provider = registry.get("fiserv").expect("fiserv");
        assert_eq!(provider.secret_position(0), 1);
        assert!(provider
            .settings
            .describe()
            .iter()
            .any(|line| line.contains("webhook secret #1: TEST_FISERV_SECRET_PREVIOUS")));
        // Both set: positions are the indexes.
        assert_eq!(fiserv().secret_position(0), 0);
    }

    fn verified(request_id: Option<&str>) -> Verified {
        Verified {
            secret_index: 1,
            request_id: request_id.map(str::to_string),
            timestamp: Some(1_700_000_000),
            replay_key: b"the-mac".to_vec(),
        }
    }

    #[test]
    fn the_record_keeps_the_stored_dedup_key_nonce_and_headers() {
        let provider = fiserv();
        let mut headers = RequestHeaders::new();
        headers.insert("Authorization", "Bearer secret");
        headers.insert("x-api-key", "k");
        headers.insert("content-type", "application/json");
        let body = br#"{"not":"a fiserv webhook"}"#;
        let request = InboundRequest {
            path: "/webhooks/fiserv",
            headers: &headers,
            body,
        };
        let received_at = Utc::now();
        let record = webhook_record(
            &provider,
            VerifiedWebhook {
                request: &request,
                verified: verified(Some("req-1")),
                received_at,
            },
        );
        assert_eq!(record.provider, "fiserv");
        assert_eq!(record.dedup_key, "req-1");
        assert_eq!(record.body_sha256, body_sha256(body));
        assert_eq!(record.secret_index, 1);
        assert_eq!(record.received_at, received_at);
        assert_eq!(record.raw_body, body.to_vec());
        let has_window = provider
            .verifier
            .as_ref()
            .is_some_and(|verifier| verifier.has_replay_window());
        assert!(has_window, "Fiserv signs a timestamp");
        assert_eq!(
            record.nonce,
            Some(replay_nonce(Some(1_700_000_000), b"the-mac"))
        );
        let kept: serde_json::Value =
            serde_json::from_str(&record.headers_json).expect("headers JSON");
        assert_eq!(
            kept,
            serde_json::json!({ "content-type": "application/json" })
        );
        assert!(record.parsed.is_err(), "not a Fiserv payload: quarantined");

        // Names in order; a repeated name keeps its last value, as a JSON map of them would.
        let mut repeated = RequestHeaders::new();
        repeated.insert("X-B", "first");
        repeated.insert("x-a", "a");
        repeated.insert("x-b", "second");
        repeated.insert("Cookie", "c");
        assert_eq!(
            stored_headers(&repeated, &provider),
            r#"{"x-a":"a","x-b":"second"}"#
        );

        // Without a signed request id (nor an event id in the body): the body's hash.
        let record = webhook_record(
            &provider,
            VerifiedWebhook {
                request: &request,
                verified: verified(None),
                received_at,
            },
        );
        assert_eq!(record.dedup_key, body_sha256(body));
    }
}
