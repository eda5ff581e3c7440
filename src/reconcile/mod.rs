//! Reconciliation (SPEC §5), pure: ledger entries and provider facts in, findings out.
//!
//! The store groups what it loads by matching key ([`MatchGroup`]: one ledger entry and
//! the cash-outs carrying its `external_id`, or cash-outs the ledger lacks), [`examine`]
//! names every difference as a [`Finding`], and [`plan`] turns the findings and the
//! mismatches already open into what to open and what to resolve. Nothing here reads the
//! clock, the store or the configuration file.

mod engine;
pub mod fees;

pub use engine::{
    covered_subjects, examine, plan, CashoutFact, Finding, LedgerFact, MatchGroup, OpenMismatch,
    Plan, ProviderRules,
};

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// The kinds of difference (SPEC §5), plus `ambiguous_match`: a ledger entry whose
/// `external_id` and `provider_ref` point at two different cash-outs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MismatchKind {
    MissingAtProvider,
    UnknownToLedger,
    AmountMismatch,
    CurrencyMismatch,
    FeeMismatch,
    StatusConflict,
    MissedWebhook,
    DuplicatePayout,
    Stuck,
    AmbiguousMatch,
}

impl MismatchKind {
    /// Every kind.
    pub const ALL: [MismatchKind; 10] = [
        MismatchKind::MissingAtProvider,
        MismatchKind::UnknownToLedger,
        MismatchKind::AmountMismatch,
        MismatchKind::CurrencyMismatch,
        MismatchKind::FeeMismatch,
        MismatchKind::StatusConflict,
        MismatchKind::MissedWebhook,
        MismatchKind::DuplicatePayout,
        MismatchKind::Stuck,
        MismatchKind::AmbiguousMatch,
    ];

    /// The wire name (API, CSV, store).
    pub fn as_str(self) -> &'static str {
        match self {
            MismatchKind::MissingAtProvider => "missing_at_provider",
            MismatchKind::UnknownToLedger => "unknown_to_ledger",
            MismatchKind::AmountMismatch => "amount_mismatch",
            MismatchKind::CurrencyMismatch => "currency_mismatch",
            MismatchKind::FeeMismatch => "fee_mismatch",
            MismatchKind::StatusConflict => "status_conflict",
            MismatchKind::MissedWebhook => "missed_webhook",
            MismatchKind::DuplicatePayout => "duplicate_payout",
            MismatchKind::Stuck => "stuck",
            MismatchKind::AmbiguousMatch => "ambiguous_match",
        }
    }

    /// Whether reconciliation passes open and resolve this kind. A `missed_webhook` is a
    /// recovered event, recorded (and resolved at once) by the poll that found it.
    pub fn is_examined(self) -> bool {
        self != MismatchKind::MissedWebhook
    }
}

impl fmt::Display for MismatchKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A mismatch kind name that does not exist.
#[derive(Debug, thiserror::Error)]
#[error("unknown mismatch kind {0:?} (one of missing_at_provider, unknown_to_ledger, amount_mismatch, currency_mismatch, fee_mismatch, status_conflict, missed_webhook, duplicate_payout, stuck, ambiguous_match)")]
pub struct UnknownKind(pub String);

impl FromStr for MismatchKind {
    type Err = UnknownKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MismatchKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| UnknownKind(s.to_string()))
    }
}

/// What a mismatch is about: a provider's cash-out, or a ledger entry no cash-out
/// answers. Stored as one text key per provider.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    /// By its `provider_ref`.
    Cashout(String),
    /// By its `external_id` (stored as `ext:<external_id>`).
    Ledger(String),
}

impl Subject {
    /// The stored key.
    pub fn key(&self) -> String {
        match self {
            Subject::Cashout(provider_ref) => provider_ref.clone(),
            Subject::Ledger(external_id) => format!("ext:{external_id}"),
        }
    }
}
