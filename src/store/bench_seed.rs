//! A synthetic book for `bench-recon`: a million cash-outs of one business day with their
//! events and ledger entries, written straight into the schema (as ingestion would have
//! left them) with known injected discrepancies, and the bare SQL full join that serves
//! as the benchmark's floor.

use std::collections::BTreeSet;
use std::path::Path;

use rusqlite::{params, Connection};

use super::StoreError;
use crate::reconcile::fees::FeeRule;
use crate::reconcile::MismatchKind;

/// What to build.
#[derive(Clone, Debug)]
pub struct SeedSpec {
    /// Cash-outs (before the injected second payouts), split between the two providers.
    pub cashouts: u64,
    /// The Fiserv-like provider's id (BRL, no fee).
    pub plain_provider: String,
    /// The Mannco-like provider's id (USD, 2 % fee per its schedule).
    pub fee_provider: String,
    /// The fee rule the fee provider's cash-outs follow.
    pub fee_rule: FeeRule,
    /// The business day `[start, end)` the book falls on (unix ms); events are spread over
    /// `[start, until)`.
    pub start: i64,
    pub until: i64,
}

/// One finding the injected discrepancies must cause: kind, provider, subject.
pub type SeededFinding = (MismatchKind, String, String);

/// What was built.
#[derive(Clone, Debug, Default)]
pub struct Seeded {
    pub cashouts: u64,
    pub events: u64,
    pub ledger: u64,
    pub expected: BTreeSet<SeededFinding>,
}

fn amount_of(i: u64) -> i64 {
    // Deterministic, spread over 1.00 – 100 000.00.
    100 + ((i.wrapping_mul(2_654_435_761) >> 7) % 9_999_900) as i64
}

/// Writes the synthetic book into the (migrated, empty) store at `path`.
pub fn seed(path: &Path, spec: &SeedSpec) -> Result<Seeded, StoreError> {
    let mut connection = Connection::open(path)?;
    connection.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF;")?;
    let tx = connection.transaction()?;
    let mut seeded = Seeded::default();
    {
        let mut cashout = tx.prepare(
            "INSERT INTO cashouts (provider, provider_ref, external_id, status, held, provider_status, amount_minor,
                                   currency, fee_minor, net_minor, method, created_at, provider_created_at, first_seen_at,
                                   updated_at, completed_at, webhook_count, recovered_by_poll, book_changed_at)
             VALUES (?1, ?2, ?3, ?4, 0, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10, ?10, ?11, ?12, ?13, 0, ?11)",
        )?;
        let mut event = tx.prepare(
            "INSERT INTO events (event_id, cashout_id, provider, source, dedup_key, outcome, provider_ref, raw_status,
                                 status, applied, received_at, book_at, after_status, after_provider_status,
                                 after_external_id, after_amount_minor, after_currency, after_fee_minor,
                                 after_net_minor, after_created_at, after_updated_at, after_completed_at,
                                 after_webhooks, after_recovered)
             VALUES (?1, ?2, ?3, 'webhook', ?1, 'applied', ?4, ?5, ?5, 1, ?6, ?6, ?5, ?5, ?7, ?8, ?9, ?10, ?11,
                     ?12, ?6, ?13, ?14, 0)",
        )?;
        let mut ledger = tx.prepare(
            "INSERT INTO ledger (provider, external_id, amount_minor, currency, provider_ref, created_at, registered_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
        )?;
        let span = (spec.until - spec.start - 10_000).max(1);
        let mut event_seq = 0u64;
        let total = spec.cashouts;
        let mut write_cashout = |provider: &str,
                                 provider_ref: &str,
                                 external_id: &str,
                                 amount: i64,
                                 currency: &str,
                                 fee: Option<i64>,
                                 method: Option<&str>,
                                 path: &[&str],
                                 created: i64|
         -> Result<(), StoreError> {
            let last = path.len() as i64 - 1;
            let updated = created + last * 1_000;
            let status = path[path.len() - 1];
            let completed = (status == "completed").then_some(updated);
            let net = fee.map(|f| amount - f);
            cashout.execute(params![
                provider,
                provider_ref,
                external_id,
                status,
                amount,
                currency,
                fee,
                net,
                method,
                created,
                updated,
                completed,
                path.len() as i64
            ])?;
            let id = tx.last_insert_rowid();
            for (step, state) in path.iter().enumerate() {
                event_seq += 1;
                let at = created + step as i64 * 1_000;
                let done = (*state == "completed").then_some(at);
                event.execute(params![
                    format!("bench-{event_seq:012}"),
                    id,
                    provider,
                    provider_ref,
                    state,
                    at,
                    external_id,
                    amount,
                    currency,
                    fee,
                    net,
                    created,
                    done,
                    step as i64 + 1
                ])?;
            }
            Ok(())
        };
        for i in 0..total {
            let fee_side = i % 2 == 1;
            let provider = if fee_side {
                &spec.fee_provider
            } else {
                &spec.plain_provider
            };
            let provider_ref = if fee_side {
                format!("{}", 10_000_000 + i)
            } else {
                format!("tx{i:09}")
            };
            let external_id = format!("ord-{i:09}");
            let amount = amount_of(i);
            let (currency, other_currency) = if fee_side {
                ("USD", "BRL")
            } else {
                ("BRL", "USD")
            };
            let created = spec.start + 5_000 + (i as i64 * span) / total as i64;
            let mut fee = fee_side.then(|| spec.fee_rule.fee_minor(amount, 2).unwrap_or(0));
            let slot = i % 2000;
            let path: &[&str] = if slot == 7 {
                &["pending", "processing"]
            } else if i % 20 == 13 {
                &["pending", "processing", "failed"]
            } else {
                &["pending", "processing", "completed"]
            };
            let mut ledger_amount = amount;
            let mut ledger_currency = currency;
            let mut registered = true;
            let finding = |kind: MismatchKind| (kind, provider.clone(), provider_ref.clone());
            match slot {
                1 | 1001 => {
                    ledger_amount += 1;
                    seeded
                        .expected
                        .insert(finding(MismatchKind::AmountMismatch));
                }
                3 => {
                    ledger_currency = other_currency;
                    seeded
                        .expected
                        .insert(finding(MismatchKind::CurrencyMismatch));
                }
                5 => {
                    registered = false;
                    seeded
                        .expected
                        .insert(finding(MismatchKind::UnknownToLedger));
                }
                7 => {
                    seeded.expected.insert(finding(MismatchKind::Stuck));
                }
                9 if fee_side => {
                    fee = fee.map(|f| f + 1);
                    seeded.expected.insert(finding(MismatchKind::FeeMismatch));
                }
                _ => {}
            }
            write_cashout(
                provider,
                &provider_ref,
                &external_id,
                amount,
                currency,
                fee,
                fee_side.then_some("payoneer"),
                path,
                created,
            )?;
            seeded.cashouts += 1;
            seeded.events += path.len() as u64;
            if i % 4000 == 11 {
                // A second payout of the same order.
                let again = format!("{}", 90_000_000 + i);
                write_cashout(
                    provider,
                    &again,
                    &external_id,
                    amount,
                    currency,
                    fee,
                    fee_side.then_some("payoneer"),
                    &["pending", "processing", "completed"],
                    created + 500,
                )?;
                seeded.cashouts += 1;
                seeded.events += 3;
                seeded
                    .expected
                    .insert(finding(MismatchKind::DuplicatePayout));
                seeded
                    .expected
                    .insert((MismatchKind::DuplicatePayout, provider.clone(), again));
            }
            if registered {
                ledger.execute(params![
                    provider,
                    external_id,
                    ledger_amount,
                    ledger_currency,
                    provider_ref,
                    created - 1_000
                ])?;
                seeded.ledger += 1;
            }
            if i % 2000 == 17 {
                // An order the provider never received.
                let missing = format!("ord-missing-{i:09}");
                ledger.execute(params![
                    provider,
                    missing,
                    amount,
                    currency,
                    Option::<String>::None,
                    created - 1_000
                ])?;
                seeded.ledger += 1;
                seeded.expected.insert((
                    MismatchKind::MissingAtProvider,
                    provider.clone(),
                    format!("ext:{missing}"),
                ));
            }
        }
    }
    tx.commit()?;
    connection.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
    Ok(seeded)
}

/// Adds `count` quarantined webhooks of `provider` received at `at` (unix ms), each with
/// its parse error and a small body (for `bench-console`'s quarantine page).
pub fn seed_quarantined(
    path: &Path,
    provider: &str,
    count: u64,
    at: i64,
) -> Result<u64, StoreError> {
    let mut connection = Connection::open(path)?;
    let tx = connection.transaction()?;
    {
        let mut event = tx.prepare(
            "INSERT INTO events (event_id, provider, source, dedup_key, body_sha256, raw_body, headers,
                                 secret_index, outcome, error, provider_ref, received_at, book_at)
             VALUES (?1, ?2, 'webhook', ?1, ?3, ?4, '{}', 0, 'quarantined',
                     'amount: \"12.345\" has more decimals than BRL allows', ?5, ?6, ?6)",
        )?;
        for i in 0..count {
            let body = format!("{{\"txid\":\"q{i:09}\",\"amount\":\"12.345\"}}");
            event.execute(params![
                format!("bench-quarantined-{i:09}"),
                provider,
                format!("{:064x}", i),
                body.as_bytes(),
                format!("q{i:09}"),
                at + i as i64,
            ])?;
        }
    }
    tx.commit()?;
    Ok(count)
}

/// The floor: a bare SQL full join of ledger and cash-outs (ledger entries with their
/// cash-outs by external id, then cash-outs no entry names) written as CSV to `out`.
/// Returns the rows written.
pub fn export_full_join(path: &Path, out: &Path) -> Result<u64, StoreError> {
    let connection = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let file = std::fs::File::create(out)
        .map_err(|err| StoreError::Database(format!("creating {}: {err}", out.display())))?;
    let mut writer = csv::Writer::from_writer(std::io::BufWriter::with_capacity(1 << 16, file));
    let mut statement = connection.prepare(
        "SELECT l.provider, l.external_id, l.amount_minor, l.currency, c.provider_ref, c.status, c.amount_minor,
                c.currency, c.fee_minor
         FROM ledger l LEFT JOIN cashouts c ON c.provider = l.provider AND c.external_id = l.external_id
         UNION ALL
         SELECT c.provider, c.external_id, NULL, NULL, c.provider_ref, c.status, c.amount_minor, c.currency, c.fee_minor
         FROM cashouts c
         WHERE NOT EXISTS (SELECT 1 FROM ledger l WHERE l.provider = c.provider AND l.external_id = c.external_id)",
    )?;
    let mut rows = statement.query([])?;
    let mut count = 0;
    let text = |v: Option<String>| v.unwrap_or_default();
    let number = |v: Option<i64>| v.map(|n| n.to_string()).unwrap_or_default();
    while let Some(row) = rows.next()? {
        let record = [
            text(row.get(0)?),
            text(row.get(1)?),
            number(row.get(2)?),
            text(row.get(3)?),
            text(row.get(4)?),
            text(row.get(5)?),
            number(row.get(6)?),
            text(row.get(7)?),
            number(row.get(8)?),
        ];
        writer
            .write_record(&record)
            .map_err(|err| StoreError::Database(format!("writing {}: {err}", out.display())))?;
        count += 1;
    }
    writer
        .flush()
        .map_err(|err| StoreError::Database(format!("writing {}: {err}", out.display())))?;
    Ok(count)
}
