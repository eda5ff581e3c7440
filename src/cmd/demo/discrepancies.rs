//! The discrepancies the demo's platform and providers commit on purpose, and the check
//! that reconciliation flags exactly them: no more, no fewer.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::providers::ProviderKind;
use crate::reconcile::MismatchKind;
use crate::reconciler::DayOutcome;
use crate::sim::{harness, Simulator};
use crate::state::CashoutStatus;
use crate::store::{LedgerEntry, Store, StoreError};

/// One expected finding: its kind, provider and subject (a provider ref, or
/// `ext:<external_id>` for a ledger entry).
pub type Expected = (MismatchKind, String, String);

/// What was injected, each with the finding it must cause.
#[derive(Debug, Default)]
pub struct Injected {
    pub findings: Vec<(Expected, String)>,
}

impl Injected {
    fn add(&mut self, kind: MismatchKind, provider: &str, subject: &str, what: String) {
        self.findings
            .push(((kind, provider.to_string(), subject.to_string()), what));
    }
}

fn simulator<'a>(simulators: &'a [(&str, Simulator)], kind: ProviderKind) -> Option<&'a Simulator> {
    simulators
        .iter()
        .find(|(_, s)| s.kind() == kind)
        .map(|(_, s)| s)
}

/// Registers the ledger of every simulator's cash-outs, committing on the way: an amount
/// off by 0.01 (SimPay), a currency swapped (Pismo), a ledger entry the provider never
/// received (Mannco), a provider cash-out with no ledger entry (Fiserv), a second payout
/// of one external id (Tupay), a fee off Mannco's schedule, a cash-out left in flight
/// (Fiserv). Call before the simulators run.
pub async fn inject(
    store: &Store,
    simulators: &[(&str, Simulator)],
) -> Result<Injected, StoreError> {
    let mut injected = Injected::default();
    let mut amount_off = None;
    let mut currency_swapped = None;
    let mut unregistered = None;
    if let Some(sim) = simulator(simulators, ProviderKind::FiservPix) {
        let id = harness::provider_id(ProviderKind::FiservPix);
        if let Some(provider_ref) = sim.a_cashout_ending_completed(&[]) {
            injected.add(
                MismatchKind::UnknownToLedger,
                id,
                &provider_ref,
                format!("{id} {provider_ref}: paid with no ledger entry"),
            );
            unregistered = Some(provider_ref.clone());
            if let Some(stuck) = sim.a_cashout_ending_completed(&[provider_ref]) {
                sim.hold_in_flight(&stuck);
                injected.add(
                    MismatchKind::Stuck,
                    id,
                    &stuck,
                    format!("{id} {stuck}: left in flight"),
                );
            }
        }
    }
    if let Some(sim) = simulator(simulators, ProviderKind::Simpay) {
        let id = harness::provider_id(ProviderKind::Simpay);
        if let Some(provider_ref) = sim.a_cashout_ending_completed(&[]) {
            injected.add(
                MismatchKind::AmountMismatch,
                id,
                &provider_ref,
                format!("{id} {provider_ref}: ledger amount 0.01 more than paid"),
            );
            amount_off = Some(provider_ref);
        }
    }
    if let Some(sim) = simulator(simulators, ProviderKind::Pismo) {
        let id = harness::provider_id(ProviderKind::Pismo);
        if let Some(provider_ref) = sim.a_cashout_ending_completed(&[]) {
            injected.add(
                MismatchKind::CurrencyMismatch,
                id,
                &provider_ref,
                format!("{id} {provider_ref}: ledger currency swapped"),
            );
            currency_swapped = Some(provider_ref);
        }
    }
    if let Some(sim) = simulator(simulators, ProviderKind::Tupay) {
        let id = harness::provider_id(ProviderKind::Tupay);
        if let Some(original) = sim.a_cashout_ending_completed(&[]) {
            if let Some(copy) = sim.duplicate_cashout(&original) {
                for provider_ref in [&original, &copy] {
                    injected.add(
                        MismatchKind::DuplicatePayout,
                        id,
                        provider_ref,
                        format!("{id} {original}: paid twice (again as {copy})"),
                    );
                }
            }
        }
    }
    if let Some(sim) = simulator(simulators, ProviderKind::Mannco) {
        let id = harness::provider_id(ProviderKind::Mannco);
        if let Some(provider_ref) = sim.a_cashout_ending_completed(&[]) {
            sim.overcharge_fee(&provider_ref, 7);
            injected.add(
                MismatchKind::FeeMismatch,
                id,
                &provider_ref,
                format!("{id} {provider_ref}: fee 0.07 over the schedule"),
            );
        }
        let external_id = "ext-mannco-never-sent";
        store
            .register_expected(LedgerEntry {
                provider: id.to_string(),
                external_id: external_id.to_string(),
                amount_minor: 1_234,
                currency: "USD".to_string(),
                provider_ref: None,
                created_at: None,
            })
            .await?;
        injected.add(
            MismatchKind::MissingAtProvider,
            id,
            &format!("ext:{external_id}"),
            format!("{id} {external_id}: in the ledger, never sent"),
        );
    }

    for (id, sim) in simulators {
        let mut seen_external = BTreeSet::new();
        for truth in sim.ground_truth() {
            if unregistered.as_ref() == Some(&truth.provider_ref)
                || !seen_external.insert(truth.ledger_external_id.clone())
            {
                // The unregistered one, and the second payout of an external id.
                continue;
            }
            let mut entry = LedgerEntry {
                provider: id.to_string(),
                external_id: truth.ledger_external_id.clone(),
                amount_minor: truth.amount_minor,
                currency: truth.currency.clone(),
                provider_ref: Some(truth.provider_ref.clone()),
                created_at: None,
            };
            if amount_off.as_ref() == Some(&truth.provider_ref) {
                entry.amount_minor += 1;
            }
            if currency_swapped.as_ref() == Some(&truth.provider_ref) {
                entry.currency = if truth.currency == "USD" {
                    "BRL"
                } else {
                    "USD"
                }
                .to_string();
            }
            store.register_expected(entry).await?;
        }
    }
    Ok(injected)
}

/// The platform registers the cash-out its ledger lacked (the `unknown_to_ledger` one),
/// with the provider's id, so that break is fixed.
pub async fn register_unknown(
    store: &Store,
    injected: &Injected,
    simulators: &[(&str, Simulator)],
) -> Result<(), StoreError> {
    for ((kind, provider, subject), _) in &injected.findings {
        if *kind != MismatchKind::UnknownToLedger {
            continue;
        }
        let Some((_, sim)) = simulators.iter().find(|(id, _)| id == provider) else {
            continue;
        };
        if let Some(truth) = sim
            .ground_truth()
            .into_iter()
            .find(|t| &t.provider_ref == subject)
        {
            store
                .register_expected(LedgerEntry {
                    provider: provider.clone(),
                    external_id: truth.ledger_external_id,
                    amount_minor: truth.amount_minor,
                    currency: truth.currency,
                    provider_ref: Some(truth.provider_ref),
                    created_at: None,
                })
                .await?;
        }
    }
    Ok(())
}

/// What reconciliation must flag once the providers settled: the injected findings, and
/// `stuck` for any cash-out whose provider really left it in flight.
pub fn expected(injected: &Injected, simulators: &[(&str, Simulator)]) -> BTreeSet<Expected> {
    let mut expected: BTreeSet<Expected> =
        injected.findings.iter().map(|(e, _)| e.clone()).collect();
    for (id, sim) in simulators {
        for truth in sim.ground_truth() {
            if !truth.status.is_terminal() && truth.status != CashoutStatus::Reversed {
                expected.insert((MismatchKind::Stuck, id.to_string(), truth.provider_ref));
            }
        }
    }
    expected
}

/// Every open mismatch of an examined kind (a `missed_webhook` is a recovery, not a
/// break).
pub async fn flagged(store: &Store) -> Result<BTreeSet<Expected>, StoreError> {
    store.open_findings().await
}

/// How the flagged findings compare with the expected ones.
#[derive(Debug, Default)]
pub struct Check {
    pub per_kind: BTreeMap<&'static str, (usize, usize)>,
    pub unexpected: Vec<String>,
    pub missed: Vec<String>,
    expected: usize,
}

fn describe((kind, provider, subject): &Expected) -> String {
    format!("{kind} {provider}/{subject}")
}

impl Check {
    /// Compares `flagged` with `expected`.
    pub fn of(expected: &BTreeSet<Expected>, flagged: &BTreeSet<Expected>) -> Check {
        let mut per_kind: BTreeMap<&'static str, (usize, usize)> = BTreeMap::new();
        for (kind, _, _) in expected {
            per_kind.entry(kind.as_str()).or_default().0 += 1;
        }
        for (kind, _, _) in flagged {
            per_kind.entry(kind.as_str()).or_default().1 += 1;
        }
        Check {
            per_kind,
            unexpected: flagged.difference(expected).map(describe).collect(),
            missed: expected.difference(flagged).map(describe).collect(),
            expected: expected.len(),
        }
    }

    /// Flagged exactly what was expected.
    pub fn is_exact(&self) -> bool {
        self.unexpected.is_empty() && self.missed.is_empty()
    }

    /// How many findings were expected.
    pub fn expected_count(&self) -> usize {
        self.expected
    }

    /// The reconciliation part of the demo's summary.
    pub fn render(&self, day: &DayOutcome) -> String {
        let summary = &day.report.summary;
        let mut text = format!(
            "\nreconciliation of {} ({}): {} rows — matched {}, open {}, mismatch {}\n{:<22} {:>8} {:>8}\n",
            summary.date,
            if summary.is_final { "final" } else { "provisional" },
            summary.rows,
            summary.match_counts.get("matched").copied().unwrap_or(0),
            summary.match_counts.get("open").copied().unwrap_or(0),
            summary.match_counts.get("mismatch").copied().unwrap_or(0),
            "mismatch kind",
            "injected",
            "flagged"
        );
        for (kind, (injected, flagged)) in &self.per_kind {
            let _ = writeln!(text, "{kind:<22} {injected:>8} {flagged:>8}");
        }
        let _ = writeln!(
            text,
            "report: {}\nsummary: {}",
            day.report.csv_path.display(),
            day.report.summary_path.display()
        );
        text
    }
}
