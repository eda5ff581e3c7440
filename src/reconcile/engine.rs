//! The matching rules: one group of ledger entry and cash-outs in, its findings out.

use std::collections::{BTreeSet, HashSet};

use super::fees::FeeSchedule;
use super::{MismatchKind, Subject};
use crate::money::Currency;
use crate::state::CashoutStatus;

/// One expected cash-out, as the ledger has it (times in unix milliseconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerFact {
    pub external_id: String,
    pub amount_minor: i64,
    pub currency: String,
    pub provider_ref: Option<String>,
    pub created_at: i64,
    pub registered_at: i64,
}

/// One cash-out, as the provider reported it (times in unix milliseconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CashoutFact {
    pub provider_ref: String,
    pub external_id: Option<String>,
    pub status: CashoutStatus,
    pub amount_minor: Option<i64>,
    pub currency: Option<String>,
    pub fee_minor: Option<i64>,
    pub net_minor: Option<i64>,
    pub method: Option<String>,
    pub created_at: i64,
    /// A terminal state the provider reported against the book's, still unsettled.
    pub conflict_status: Option<CashoutStatus>,
}

/// What shares one matching key (SPEC §5) within one provider: the ledger entry of an
/// `external_id` (if any) and every cash-out carrying it — or one cash-out without an
/// `external_id`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MatchGroup {
    pub ledger: Option<LedgerFact>,
    pub cashouts: Vec<CashoutFact>,
    /// The cash-out the ledger entry names by `provider_ref` when that cash-out carries
    /// another `external_id` (so it is not in `cashouts`).
    pub ref_named: Option<CashoutFact>,
}

/// The settings of one provider that the rules read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderRules {
    /// Compare with the ledger (`ledger = true`): a cash-out the ledger lacks is a finding.
    pub ledger: bool,
    pub stuck_after_ms: i64,
    pub missing_grace_ms: i64,
    pub fees: FeeSchedule,
}

/// One difference, named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub kind: MismatchKind,
    pub subject: Subject,
    pub provider_ref: Option<String>,
    pub external_id: Option<String>,
    /// One sentence for people: the facts that disagree, never a payload.
    pub detail: String,
}

fn format_amount(minor: i64, currency: &str) -> String {
    match Currency::from_code(currency) {
        Ok(currency) => format!("{} {}", currency.format_minor(minor), currency.code()),
        Err(_) => format!("{minor} (minor units of {currency})"),
    }
}

/// Whether the payout may still move money: a failed, canceled, expired or reversed one
/// does not (a retry after it is no duplicate).
fn is_live(status: CashoutStatus) -> bool {
    !matches!(
        status,
        CashoutStatus::Failed
            | CashoutStatus::Canceled
            | CashoutStatus::Expired
            | CashoutStatus::Reversed
    )
}

/// Every finding of one group at `now_ms`.
pub fn examine(group: &MatchGroup, rules: &ProviderRules, now_ms: i64) -> Vec<Finding> {
    let mut findings = Vec::new();
    for cashout in &group.cashouts {
        examine_cashout(cashout, rules, now_ms, &mut findings);
    }
    let live: Vec<&CashoutFact> = group
        .cashouts
        .iter()
        .filter(|c| is_live(c.status))
        .collect();
    if live.len() > 1 {
        let refs: Vec<&str> = live.iter().map(|c| c.provider_ref.as_str()).collect();
        for cashout in &live {
            findings.push(cashout_finding(
                MismatchKind::DuplicatePayout,
                cashout,
                format!(
                    "{} cash-outs carry external_id {:?} and none failed: {}",
                    live.len(),
                    cashout.external_id.as_deref().unwrap_or(""),
                    refs.join(", ")
                ),
            ));
        }
    }
    match &group.ledger {
        None => {
            if rules.ledger {
                for cashout in &group.cashouts {
                    findings.push(cashout_finding(
                        MismatchKind::UnknownToLedger,
                        cashout,
                        format!(
                            "the provider reports cash-out {} (external_id {}) that the ledger lacks",
                            cashout.provider_ref,
                            cashout.external_id.as_deref().unwrap_or("none")
                        ),
                    ));
                }
            }
        }
        Some(entry) => examine_against_ledger(group, entry, rules, now_ms, &mut findings),
    }
    findings
}

fn examine_against_ledger(
    group: &MatchGroup,
    entry: &LedgerFact,
    rules: &ProviderRules,
    now_ms: i64,
    findings: &mut Vec<Finding>,
) {
    if let Some(named) = &group.ref_named {
        findings.push(Finding {
            kind: MismatchKind::AmbiguousMatch,
            subject: Subject::Ledger(entry.external_id.clone()),
            provider_ref: entry.provider_ref.clone(),
            external_id: Some(entry.external_id.clone()),
            detail: format!(
                "ledger entry {} names cash-out {} by provider_ref, which carries external_id {}; {} other cash-out(s) carry {}",
                entry.external_id,
                named.provider_ref,
                named.external_id.as_deref().unwrap_or("none"),
                group.cashouts.len(),
                entry.external_id
            ),
        });
    }
    if group.cashouts.is_empty() && group.ref_named.is_none() {
        let due = entry.registered_at.max(entry.created_at) + rules.missing_grace_ms;
        if now_ms >= due {
            findings.push(Finding {
                kind: MismatchKind::MissingAtProvider,
                subject: Subject::Ledger(entry.external_id.clone()),
                provider_ref: entry.provider_ref.clone(),
                external_id: Some(entry.external_id.clone()),
                detail: format!(
                    "ledger entry {} ({}) is unknown to the provider",
                    entry.external_id,
                    format_amount(entry.amount_minor, &entry.currency)
                ),
            });
        }
    }
    for cashout in &group.cashouts {
        let (Some(amount), Some(currency)) = (cashout.amount_minor, cashout.currency.as_deref())
        else {
            continue;
        };
        if !currency.eq_ignore_ascii_case(&entry.currency) {
            findings.push(cashout_finding(
                MismatchKind::CurrencyMismatch,
                cashout,
                format!(
                    "ledger expects {} but the provider paid {}",
                    format_amount(entry.amount_minor, &entry.currency),
                    format_amount(amount, currency)
                ),
            ));
        } else if amount != entry.amount_minor {
            findings.push(cashout_finding(
                MismatchKind::AmountMismatch,
                cashout,
                format!(
                    "ledger expects {} but the provider paid {} (difference {})",
                    format_amount(entry.amount_minor, &entry.currency),
                    format_amount(amount, currency),
                    format_amount(amount - entry.amount_minor, currency)
                ),
            ));
        }
    }
}

/// The findings of one cash-out on its own: stuck, fee, unsettled conflict.
fn examine_cashout(
    cashout: &CashoutFact,
    rules: &ProviderRules,
    now_ms: i64,
    findings: &mut Vec<Finding>,
) {
    if !cashout.status.is_terminal() && now_ms - cashout.created_at >= rules.stuck_after_ms {
        let minutes = (now_ms - cashout.created_at) / 60_000;
        findings.push(cashout_finding(
            MismatchKind::Stuck,
            cashout,
            format!(
                "cash-out {} is still {} {} min after it was created",
                cashout.provider_ref, cashout.status, minutes
            ),
        ));
    }
    if let Some(reported) = cashout.conflict_status {
        findings.push(cashout_finding(
            MismatchKind::StatusConflict,
            cashout,
            format!(
                "the provider reported {reported} for {} which is {}; not applied",
                cashout.provider_ref, cashout.status
            ),
        ));
    }
    if let Some(detail) = fee_difference(cashout, &rules.fees) {
        findings.push(cashout_finding(MismatchKind::FeeMismatch, cashout, detail));
    }
}

/// How the reported fee (or net amount) differs from the schedule, if it does. Cash-outs
/// that moved no money (failed, canceled, expired) are not checked.
fn fee_difference(cashout: &CashoutFact, fees: &FeeSchedule) -> Option<String> {
    if !is_live(cashout.status) && cashout.status != CashoutStatus::Reversed {
        return None;
    }
    let rule = fees.rule_for(cashout.method.as_deref())?;
    let (amount, fee) = (cashout.amount_minor?, cashout.fee_minor?);
    let currency = Currency::from_code(cashout.currency.as_deref()?).ok()?;
    let expected = rule.fee_minor(amount, currency.minor_digits())?;
    let code = currency.code();
    if fee != expected {
        return Some(format!(
            "fee {} differs from the schedule's {} ({} of {})",
            format_amount(fee, code),
            format_amount(expected, code),
            rule,
            format_amount(amount, code)
        ));
    }
    match cashout.net_minor {
        Some(net) if net != amount - fee => Some(format!(
            "net amount {} is not amount {} minus fee {}",
            format_amount(net, code),
            format_amount(amount, code),
            format_amount(fee, code)
        )),
        _ => None,
    }
}

fn cashout_finding(kind: MismatchKind, cashout: &CashoutFact, detail: String) -> Finding {
    Finding {
        kind,
        subject: Subject::Cashout(cashout.provider_ref.clone()),
        provider_ref: Some(cashout.provider_ref.clone()),
        external_id: cashout.external_id.clone(),
        detail,
    }
}

/// The subjects whose findings one examination of `group` decides: its cash-outs and its
/// ledger entry (the `ref_named` cash-out belongs to its own group).
pub fn covered_subjects(group: &MatchGroup) -> Vec<Subject> {
    let mut subjects: Vec<Subject> = group
        .cashouts
        .iter()
        .map(|c| Subject::Cashout(c.provider_ref.clone()))
        .collect();
    if let Some(entry) = &group.ledger {
        subjects.push(Subject::Ledger(entry.external_id.clone()));
    }
    subjects
}

/// A mismatch already open in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenMismatch {
    pub id: i64,
    pub kind: MismatchKind,
    /// [`Subject::key`].
    pub subject: String,
}

/// What the store must do after an examination: open the new findings, resolve the open
/// mismatches whose cause is gone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub open: Vec<Finding>,
    pub resolve: Vec<i64>,
}

impl Plan {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty() && self.resolve.is_empty()
    }

    /// Appends another plan.
    pub fn extend(&mut self, other: Plan) {
        self.open.extend(other.open);
        self.resolve.extend(other.resolve);
    }
}

/// Diffs `findings` of the `covered` subjects against the `open` mismatches of those
/// subjects: a finding not open yet is opened (once, even if found twice), an open
/// mismatch of an examined kind that was not found again is resolved. Mismatches of
/// subjects not covered are left alone.
pub fn plan(findings: Vec<Finding>, open: &[OpenMismatch], covered: &[Subject]) -> Plan {
    if open.is_empty() {
        // Nothing to resolve; open each finding once.
        let mut opened = BTreeSet::new();
        return Plan {
            open: findings
                .into_iter()
                .filter(|f| opened.insert((f.kind, f.subject.clone())))
                .collect(),
            resolve: Vec::new(),
        };
    }
    let covered: HashSet<String> = covered.iter().map(Subject::key).collect();
    let found: HashSet<(MismatchKind, String)> =
        findings.iter().map(|f| (f.kind, f.subject.key())).collect();
    let already: HashSet<(MismatchKind, &str)> =
        open.iter().map(|m| (m.kind, m.subject.as_str())).collect();
    let mut opened = BTreeSet::new();
    let open_new = findings
        .into_iter()
        .filter(|f| {
            let key = f.subject.key();
            !already.contains(&(f.kind, key.as_str())) && opened.insert((f.kind, key))
        })
        .collect();
    let resolve = open
        .iter()
        .filter(|m| {
            m.kind.is_examined()
                && covered.contains(&m.subject)
                && !found.contains(&(m.kind, m.subject.clone()))
        })
        .map(|m| m.id)
        .collect();
    Plan {
        open: open_new,
        resolve,
    }
}

#[cfg(test)]
mod tests;
