//! Unit tests of the matching rules: one per finding kind, the ambiguous match, the plan.

use std::collections::BTreeMap;

use super::*;
use crate::reconcile::fees::FeeRule;

const MINUTE: i64 = 60_000;
const NOW: i64 = 1_800_000_000_000;

fn rules() -> ProviderRules {
    ProviderRules {
        ledger: true,
        stuck_after_ms: 30 * MINUTE,
        missing_grace_ms: 60 * MINUTE,
        fees: FeeSchedule::default(),
    }
}

fn ledger(external_id: &str, amount_minor: i64) -> LedgerFact {
    LedgerFact {
        external_id: external_id.to_string(),
        amount_minor,
        currency: "BRL".to_string(),
        provider_ref: None,
        created_at: NOW - 120 * MINUTE,
        registered_at: NOW - 120 * MINUTE,
    }
}

fn cashout(provider_ref: &str, external_id: &str, status: CashoutStatus) -> CashoutFact {
    CashoutFact {
        provider_ref: provider_ref.to_string(),
        external_id: Some(external_id.to_string()),
        status,
        amount_minor: Some(10_000),
        currency: Some("BRL".to_string()),
        fee_minor: None,
        net_minor: None,
        method: None,
        created_at: NOW - 5 * MINUTE,
        conflict_status: None,
    }
}

fn kinds(findings: &[Finding]) -> Vec<(MismatchKind, String)> {
    let mut kinds: Vec<_> = findings.iter().map(|f| (f.kind, f.subject.key())).collect();
    kinds.sort();
    kinds
}

fn group(ledger_entry: Option<LedgerFact>, cashouts: Vec<CashoutFact>) -> MatchGroup {
    MatchGroup {
        ledger: ledger_entry,
        cashouts,
        ref_named: None,
    }
}

#[test]
fn a_matching_pair_has_no_finding() {
    let g = group(
        Some(ledger("ord-1", 10_000)),
        vec![cashout("tx-1", "ord-1", CashoutStatus::Completed)],
    );
    assert_eq!(examine(&g, &rules(), NOW), vec![]);
}

#[test]
fn a_ledger_entry_unknown_to_the_provider_is_missing_only_after_the_grace() {
    let mut entry = ledger("ord-1", 10_000);
    entry.registered_at = NOW - 59 * MINUTE;
    entry.created_at = NOW - 59 * MINUTE;
    let g = group(Some(entry.clone()), vec![]);
    assert_eq!(examine(&g, &rules(), NOW), vec![], "inside the grace");
    let findings = examine(&g, &rules(), NOW + MINUTE);
    assert_eq!(
        kinds(&findings),
        vec![(MismatchKind::MissingAtProvider, "ext:ord-1".to_string())]
    );
    assert!(findings[0].detail.contains("100.00 BRL"), "{findings:?}");
}

#[test]
fn a_cash_out_the_ledger_lacks_is_unknown_only_in_ledger_mode() {
    let g = group(
        None,
        vec![cashout("tx-9", "ord-9", CashoutStatus::Completed)],
    );
    assert_eq!(
        kinds(&examine(&g, &rules(), NOW)),
        vec![(MismatchKind::UnknownToLedger, "tx-9".to_string())]
    );
    let no_ledger = ProviderRules {
        ledger: false,
        ..rules()
    };
    assert_eq!(examine(&g, &no_ledger, NOW), vec![]);
}

#[test]
fn amounts_and_currencies_that_disagree_are_named() {
    let mut cents_off = cashout("tx-1", "ord-1", CashoutStatus::Completed);
    cents_off.amount_minor = Some(10_001);
    let findings = examine(
        &group(Some(ledger("ord-1", 10_000)), vec![cents_off]),
        &rules(),
        NOW,
    );
    assert_eq!(
        kinds(&findings),
        vec![(MismatchKind::AmountMismatch, "tx-1".to_string())]
    );
    assert!(
        findings[0].detail.contains("difference 0.01 BRL"),
        "{}",
        findings[0].detail
    );

    let mut other_currency = cashout("tx-1", "ord-1", CashoutStatus::Completed);
    other_currency.currency = Some("USD".to_string());
    assert_eq!(
        kinds(&examine(
            &group(Some(ledger("ord-1", 10_000)), vec![other_currency]),
            &rules(),
            NOW
        )),
        vec![(MismatchKind::CurrencyMismatch, "tx-1".to_string())],
        "a currency mismatch is not also an amount mismatch"
    );
}

#[test]
fn two_live_cash_outs_of_one_external_id_are_a_duplicate_payout_on_each() {
    let g = group(
        Some(ledger("ord-1", 10_000)),
        vec![
            cashout("tx-1", "ord-1", CashoutStatus::Completed),
            cashout("tx-2", "ord-1", CashoutStatus::Processing),
        ],
    );
    assert_eq!(
        kinds(&examine(&g, &rules(), NOW)),
        vec![
            (MismatchKind::DuplicatePayout, "tx-1".to_string()),
            (MismatchKind::DuplicatePayout, "tx-2".to_string()),
        ]
    );
}

#[test]
fn a_retry_after_a_failure_is_not_a_duplicate() {
    for dead in [
        CashoutStatus::Failed,
        CashoutStatus::Canceled,
        CashoutStatus::Expired,
        CashoutStatus::Reversed,
    ] {
        let g = group(
            Some(ledger("ord-1", 10_000)),
            vec![
                cashout("tx-1", "ord-1", dead),
                cashout("tx-2", "ord-1", CashoutStatus::Completed),
            ],
        );
        assert_eq!(examine(&g, &rules(), NOW), vec![], "after {dead}");
    }
}

#[test]
fn duplicates_are_found_without_a_ledger_entry_too() {
    let g = group(
        None,
        vec![
            cashout("tx-1", "ord-1", CashoutStatus::Completed),
            cashout("tx-2", "ord-1", CashoutStatus::Completed),
        ],
    );
    let no_ledger = ProviderRules {
        ledger: false,
        ..rules()
    };
    assert_eq!(examine(&g, &no_ledger, NOW).len(), 2);
}

#[test]
fn a_ledger_entry_whose_ids_point_at_two_cash_outs_is_ambiguous_not_silently_matched() {
    let mut entry = ledger("ord-1", 10_000);
    entry.provider_ref = Some("tx-7".to_string());
    let g = MatchGroup {
        ledger: Some(entry),
        cashouts: vec![cashout("tx-1", "ord-1", CashoutStatus::Completed)],
        ref_named: Some(cashout("tx-7", "ord-7", CashoutStatus::Completed)),
    };
    assert_eq!(
        kinds(&examine(&g, &rules(), NOW)),
        vec![(MismatchKind::AmbiguousMatch, "ext:ord-1".to_string())]
    );
    // Named only by provider_ref, it is not missing either.
    let g = MatchGroup {
        ledger: g.ledger.clone(),
        cashouts: vec![],
        ref_named: g.ref_named.clone(),
    };
    assert_eq!(
        kinds(&examine(&g, &rules(), NOW)),
        vec![(MismatchKind::AmbiguousMatch, "ext:ord-1".to_string())]
    );
}

#[test]
fn a_cash_out_not_terminal_after_stuck_after_is_stuck() {
    let mut young = cashout("tx-1", "ord-1", CashoutStatus::Processing);
    young.created_at = NOW - 29 * MINUTE;
    let mut old = cashout("tx-2", "ord-2", CashoutStatus::Pending);
    old.created_at = NOW - 30 * MINUTE;
    let mut done = cashout("tx-3", "ord-3", CashoutStatus::Completed);
    done.created_at = NOW - 300 * MINUTE;
    let no_ledger = ProviderRules {
        ledger: false,
        ..rules()
    };
    assert_eq!(examine(&group(None, vec![young]), &no_ledger, NOW), vec![]);
    assert_eq!(examine(&group(None, vec![done]), &no_ledger, NOW), vec![]);
    assert_eq!(
        kinds(&examine(&group(None, vec![old]), &no_ledger, NOW)),
        vec![(MismatchKind::Stuck, "tx-2".to_string())]
    );
}

#[test]
fn an_unsettled_conflicting_report_is_a_status_conflict() {
    let mut conflicted = cashout("tx-1", "ord-1", CashoutStatus::Completed);
    conflicted.conflict_status = Some(CashoutStatus::Failed);
    let findings = examine(
        &group(Some(ledger("ord-1", 10_000)), vec![conflicted]),
        &rules(),
        NOW,
    );
    assert_eq!(
        kinds(&findings),
        vec![(MismatchKind::StatusConflict, "tx-1".to_string())]
    );
}

fn mannco_rules() -> ProviderRules {
    ProviderRules {
        fees: FeeSchedule::new(BTreeMap::from([
            ("payoneer".to_string(), "2%".parse::<FeeRule>().unwrap()),
            ("tipalti".to_string(), "1.5%".parse::<FeeRule>().unwrap()),
        ])),
        ledger: false,
        ..rules()
    }
}

fn mannco(method: &str, amount: i64, fee: i64, net: Option<i64>) -> CashoutFact {
    CashoutFact {
        method: Some(method.to_string()),
        amount_minor: Some(amount),
        fee_minor: Some(fee),
        net_minor: net,
        currency: Some("USD".to_string()),
        ..cashout("m-1", "ord-1", CashoutStatus::Completed)
    }
}

#[test]
fn fees_are_checked_against_the_method_rule_and_the_net_amount() {
    let cases = [
        (
            mannco("payoneer", 10_000, 200, Some(9_800)),
            None,
            "2% right",
        ),
        (mannco("tipalti", 10_000, 150, None), None, "1.5% right"),
        (
            mannco("payoneer", 10_000, 150, Some(9_850)),
            Some("fee 1.50 USD differs from the schedule's 2.00 USD"),
            "tipalti's rate on payoneer",
        ),
        (
            mannco("payoneer", 10_000, 200, Some(9_700)),
            Some("net amount 97.00 USD is not amount 100.00 USD minus fee 2.00 USD"),
            "net off",
        ),
        (
            mannco("wire", 10_000, 999, None),
            None,
            "no rule for the method",
        ),
    ];
    for (fact, expected, why) in cases {
        let findings = examine(&group(None, vec![fact]), &mannco_rules(), NOW);
        match expected {
            None => assert_eq!(findings, vec![], "{why}"),
            Some(text) => {
                assert_eq!(findings.len(), 1, "{why}");
                assert_eq!(findings[0].kind, MismatchKind::FeeMismatch, "{why}");
                assert!(
                    findings[0].detail.contains(text),
                    "{why}: {}",
                    findings[0].detail
                );
            }
        }
    }
    let mut failed = mannco("payoneer", 10_000, 0, None);
    failed.status = CashoutStatus::Failed;
    assert_eq!(
        examine(&group(None, vec![failed]), &mannco_rules(), NOW),
        vec![],
        "a failed payout moved no money"
    );
}

#[test]
fn the_plan_opens_new_findings_once_and_resolves_what_is_gone() {
    let subject = Subject::Cashout("tx-1".to_string());
    let finding = |kind| Finding {
        kind,
        subject: subject.clone(),
        provider_ref: Some("tx-1".to_string()),
        external_id: None,
        detail: String::new(),
    };
    let open = vec![
        OpenMismatch {
            id: 1,
            kind: MismatchKind::Stuck,
            subject: "tx-1".to_string(),
        },
        OpenMismatch {
            id: 2,
            kind: MismatchKind::AmountMismatch,
            subject: "tx-1".to_string(),
        },
        OpenMismatch {
            id: 3,
            kind: MismatchKind::Stuck,
            subject: "tx-other".to_string(),
        },
    ];
    let plan = plan(
        vec![
            finding(MismatchKind::AmountMismatch),
            finding(MismatchKind::FeeMismatch),
            finding(MismatchKind::FeeMismatch),
        ],
        &open,
        std::slice::from_ref(&subject),
    );
    assert_eq!(
        plan.open.iter().map(|f| f.kind).collect::<Vec<_>>(),
        vec![MismatchKind::FeeMismatch],
        "already open and found twice are opened once"
    );
    assert_eq!(
        plan.resolve,
        vec![1],
        "stuck is gone; another subject is untouched"
    );
}

#[test]
fn a_missed_webhook_is_never_resolved_by_a_pass() {
    let open = vec![OpenMismatch {
        id: 9,
        kind: MismatchKind::MissedWebhook,
        subject: "tx-1".to_string(),
    }];
    let plan = plan(vec![], &open, &[Subject::Cashout("tx-1".to_string())]);
    assert!(plan.is_empty());
}
