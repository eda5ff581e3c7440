//! The ingestion core, pure: the records an observation arrives in, the typed names the
//! store keeps (sources, outcomes, fetch reasons) and, in [`plan`], the rules that turn
//! what was loaded and what arrived into a plan of writes.
//!
//! Nothing here reads the clock, the store or the network. The use-case layer
//! ([`crate::ingestor`]) builds the records and calls the store, which loads what a plan
//! needs, asks [`plan`] and applies the answer with narrow atomic operations.

pub mod plan;

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::providers::Observation;
use crate::state::{CashoutStatus, Transition};

/// A verified webhook, ready to be committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRecord {
    /// Generated before the write; returned to the provider when accepted.
    pub event_id: String,
    pub provider: String,
    /// The provider's event id, else the SHA-256 of the body.
    pub dedup_key: String,
    /// The signed request id, when the scheme has one (replay cache key).
    pub nonce: Option<String>,
    pub body_sha256: String,
    pub raw_body: Vec<u8>,
    /// The headers that matter, as a JSON object (credentials excluded).
    pub headers_json: String,
    /// Which configured secret (or key) verified it.
    pub secret_index: usize,
    pub received_at: DateTime<Utc>,
    /// The observation, or why the payload could not be parsed (quarantine).
    pub parsed: Result<Observation, String>,
}

/// The hex SHA-256 of a body (the event's `body_sha256`).
pub fn body_sha256(body: &[u8]) -> String {
    format!("{:x}", Sha256::digest(body))
}

/// The dedup key of a webhook: the signed request id, else the provider's event id in
/// the body, else the body's hash.
pub fn dedup_key(
    request_id: Option<String>,
    body_event_id: impl FnOnce() -> Option<String>,
    body_sha256: &str,
) -> String {
    request_id
        .or_else(body_event_id)
        .unwrap_or_else(|| body_sha256.to_string())
}

/// The replay-cache nonce of a signed request: the verified MAC (decoded bytes, never the
/// header text), so the same signed request again, re-encoded or under a new unsigned
/// request id, is a duplicate. Keyed by the signed timestamp first (zero-padded to 12
/// digits), so the cache grows in time order. Stored: this format never changes.
pub fn replay_nonce(signed_at: Option<i64>, replay_key: &[u8]) -> String {
    let signed_at = signed_at.unwrap_or(0).max(0);
    format!(
        "{signed_at:012}:{}",
        hex::encode(Sha256::digest(replay_key))
    )
}

/// How a webhook was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestOutcome {
    /// New and committed; `applied` says what it did to the cash-out.
    Accepted { event_id: String, applied: Applied },
    /// Seen before (same dedup key, same body): the first one's id.
    Duplicate { event_id: String },
    /// Its request id was already used with a different body.
    Replayed,
    /// Verified but not parseable: raw bytes kept, state untouched.
    Quarantined { event_id: String, reason: String },
}

/// What applying one observation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// `None` for a thin notification (no state to judge).
    pub transition: Option<Transition>,
    /// The cash-out's state after the observation.
    pub status: CashoutStatus,
    /// A status fetch was queued (thin notification).
    pub status_fetch_queued: bool,
    /// The event id written to the timeline.
    pub event_id: String,
    /// A poll found this state change that no webhook reported.
    pub missed_webhook: bool,
    /// The cash-out's row id (`None` while a thin notification's fetch is pending).
    pub cashout_id: Option<i64>,
}

impl Applied {
    /// Whether the stored state changed.
    pub fn changed_state(&self) -> bool {
        self.transition.is_some_and(Transition::is_applied)
    }
}

/// A stored name that is not one of an enum's (a store written by a newer version).
#[derive(Debug, thiserror::Error)]
#[error("unknown {what} {name:?}")]
pub struct UnknownName {
    pub what: &'static str,
    pub name: String,
}

/// Declares a closed set of stored names: `as_str`, `Display`, `FromStr` and `ALL`.
macro_rules! stored_names {
    ($(#[$meta:meta])* $name:ident, $what:literal { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The name stored in the column.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $name::ALL
                    .iter()
                    .copied()
                    .find(|value| value.as_str() == s)
                    .ok_or_else(|| UnknownName { what: $what, name: s.to_string() })
            }
        }
    };
}

stored_names! {
    /// Where an observation came from (the event's `source`).
    ObservationSource, "event source" {
        Webhook => "webhook",
        Poll => "poll",
        /// A ledger registration that named the cash-out (it took the ledger's external_id).
        Ledger => "ledger",
    }
}

stored_names! {
    /// What an event did (the event's `outcome`).
    EventOutcome, "event outcome" {
        /// It changed the stored state (created, advanced, hold changed).
        Applied => "applied",
        /// The same state again.
        Unchanged => "unchanged",
        /// A lower-ranked state than the stored one: recorded, not applied.
        OutOfOrder => "out_of_order",
        /// A terminal state contradicting the stored terminal state: recorded, not applied.
        Conflict => "conflict",
        /// A thin notification: a status fetch decides.
        Thin => "thin",
        /// Verified but not parseable: raw bytes kept, state untouched.
        Quarantined => "quarantined",
        /// A poll found a state change no webhook reported (recovered).
        MissedWebhook => "missed_webhook",
        /// A ledger registration gave the cash-out its external id.
        LedgerLinked => "ledger_linked",
    }
}

stored_names! {
    /// Why a status fetch was queued (the fetch queue's `reason`).
    FetchReason, "fetch reason" {
        /// A thin notification said "go and look".
        ThinNotification => "thin_notification",
        /// A webhook failed verification but named a cash-out.
        UnverifiedWebhook => "unverified_webhook",
    }
}

impl EventOutcome {
    /// The outcome of a judged observation (`None`: thin, nothing judged).
    pub fn of(transition: Option<Transition>) -> EventOutcome {
        match transition {
            None => EventOutcome::Thin,
            Some(Transition::Created | Transition::Advanced { .. } | Transition::HoldChanged) => {
                EventOutcome::Applied
            }
            Some(Transition::Unchanged) => EventOutcome::Unchanged,
            Some(Transition::OutOfOrder) => EventOutcome::OutOfOrder,
            Some(Transition::Conflict { .. }) => EventOutcome::Conflict,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_names_round_trip() {
        for outcome in EventOutcome::ALL {
            assert_eq!(
                outcome.as_str().parse::<EventOutcome>().ok(),
                Some(*outcome)
            );
        }
        for source in ObservationSource::ALL {
            assert_eq!(
                source.as_str().parse::<ObservationSource>().ok(),
                Some(*source)
            );
        }
        for reason in FetchReason::ALL {
            assert_eq!(reason.as_str().parse::<FetchReason>().ok(), Some(*reason));
        }
        assert!("accepted".parse::<EventOutcome>().is_err());
    }

    #[test]
    fn the_replay_nonce_format_is_pinned() {
        // Stored in `replay_cache`: a change would let a replay of an old request through.
        assert_eq!(
            replay_nonce(Some(1_700_000_000), b"mac"),
            format!("001700000000:{}", hex::encode(Sha256::digest(b"mac")))
        );
        assert!(replay_nonce(None, b"mac").starts_with("000000000000:"));
        assert!(replay_nonce(Some(-5), b"mac").starts_with("000000000000:"));
    }

    #[test]
    fn the_dedup_key_prefers_the_signed_request_id() {
        let sha = body_sha256(b"{}");
        assert_eq!(
            dedup_key(Some("req".into()), || Some("ev".into()), &sha),
            "req"
        );
        assert_eq!(dedup_key(None, || Some("ev".into()), &sha), "ev");
        assert_eq!(dedup_key(None, || None, &sha), sha);
    }
}
