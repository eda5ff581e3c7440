//! Driving the daemon against simulators: provider ids, the daemon's config, ledger
//! registration, and judging the daemon's book against the simulators' ground truth.
//! Shared by `demo`, `bench-recovery` and the end-to-end tests.

use std::collections::BTreeMap;
use std::path::Path;

use crate::providers::ProviderKind;
use crate::sim::{Simulator, Truth};
use crate::store::{CashoutFilter, CashoutRow, LedgerEntry, Store, StoreError};

/// The `[[providers]]` id the harness gives a simulator of `kind`.
pub fn provider_id(kind: ProviderKind) -> &'static str {
    kind.spec()
        .simulator()
        .and_then(|sim| sim.provider_id())
        .unwrap_or(kind.as_str())
}

/// A daemon config for `simulators` listening on `port` with its store at `db`:
/// `[server]`, `[store]`, `poll_settings` (the body of a `[poll]` section) and one
/// `[[providers]]` block per simulator, plus the environment those blocks name.
/// `poll_every` overrides the simulators' 1 s scheduled cycles when given.
pub fn daemon_config(
    simulators: &[(&str, Simulator)],
    port: u16,
    db: &Path,
    poll_settings: &str,
    poll_every: Option<&str>,
) -> (String, BTreeMap<String, String>) {
    let mut config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nworkers = 2\nshutdown_timeout = \"5s\"\n\n\
         [store]\npath = \"{}\"\n\n[poll]\n{poll_settings}\n\n",
        db.display()
    );
    let mut env = BTreeMap::new();
    for (id, simulator) in simulators {
        let prefix = format!("SIM_{}", id.to_ascii_uppercase());
        let mut block = simulator.provider_toml(id, &prefix);
        if let Some(every) = poll_every {
            block = block.replace("poll_every = \"1s\"", &format!("poll_every = \"{every}\""));
        }
        config.push_str(&block);
        config.push('\n');
        env.extend(simulator.env_vars(&prefix));
    }
    (config, env)
}

/// Registers every cash-out of `simulator` in the expected ledger, as the platform would
/// before paying (with the provider's id, which the platform gets from the create call).
pub async fn register_ledger(
    store: &Store,
    id: &str,
    simulator: &Simulator,
) -> Result<(), StoreError> {
    for truth in simulator.ground_truth() {
        let entry = LedgerEntry {
            provider: id.to_string(),
            external_id: truth.ledger_external_id.clone(),
            amount_minor: truth.amount_minor,
            currency: truth.currency.clone(),
            provider_ref: Some(truth.provider_ref.clone()),
            created_at: None,
        };
        store.register_expected(entry).await?;
    }
    Ok(())
}

/// Every cash-out of `provider` in the daemon's book, by provider ref.
pub async fn book_of(
    store: &Store,
    provider: &str,
) -> Result<BTreeMap<String, CashoutRow>, StoreError> {
    let mut book = BTreeMap::new();
    let mut after = None;
    loop {
        let filter = CashoutFilter {
            provider: Some(provider.to_string()),
            limit: 1000,
            after,
            ..CashoutFilter::default()
        };
        let page = store.list_cashouts(filter).await?;
        for row in page.items {
            book.insert(row.provider_ref.clone(), row);
        }
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(book),
        }
    }
}

/// How the book of one provider compares with its simulator's truth.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Comparison {
    /// Cash-outs whose state, hold, amount and currency all agree.
    pub matching: usize,
    /// One sentence per disagreement (missing, extra or different).
    pub differences: Vec<String>,
}

/// Compares the book of `provider` with `truth`.
pub async fn compare(
    store: &Store,
    provider: &str,
    truth: &[Truth],
) -> Result<Comparison, StoreError> {
    let mut book = book_of(store, provider).await?;
    let mut comparison = Comparison::default();
    for expected in truth {
        match book.remove(&expected.provider_ref) {
            None => comparison.differences.push(format!(
                "{} is missing from the book",
                expected.provider_ref
            )),
            Some(row) => match difference(expected, &row) {
                None => comparison.matching += 1,
                Some(text) => comparison.differences.push(text),
            },
        }
    }
    comparison.differences.extend(
        book.keys()
            .map(|extra| format!("{extra} is in the book but unknown to the provider")),
    );
    Ok(comparison)
}

/// What differs between the truth and the stored cash-out, if anything.
pub fn difference(expected: &Truth, row: &CashoutRow) -> Option<String> {
    let mut problems = Vec::new();
    if row.status != expected.status {
        problems.push(format!("status {} (truth {})", row.status, expected.status));
    }
    if row.held != expected.held {
        problems.push(format!("held {} (truth {})", row.held, expected.held));
    }
    if row.amount_minor != Some(expected.amount_minor) {
        problems.push(format!(
            "amount {:?} minor units (truth {})",
            row.amount_minor, expected.amount_minor
        ));
    }
    if row.currency.as_deref() != Some(expected.currency.as_str()) {
        problems.push(format!(
            "currency {:?} (truth {})",
            row.currency, expected.currency
        ));
    }
    (!problems.is_empty()).then(|| format!("{}: {}", expected.provider_ref, problems.join(", ")))
}

/// Runs every simulator to its final states concurrently, then flushes held webhooks.
pub async fn run_all_to_completion(simulators: &[(&str, Simulator)]) {
    let runs: Vec<_> = simulators
        .iter()
        .map(|(_, simulator)| {
            let simulator = simulator.clone();
            tokio::spawn(async move { simulator.run_to_completion().await })
        })
        .collect();
    for run in runs {
        if let Err(err) = run.await {
            tracing::error!(error = %err, "a simulator run panicked");
        }
    }
    for (_, simulator) in simulators {
        simulator.flush().await;
    }
}
