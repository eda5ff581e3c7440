//! The ingestion rules (SPEC §2–§3), pure: what the store loaded and what arrived in, a
//! typed plan of writes out.
//!
//! - [`admit`]: dedup and replay, from the earlier delivery holding the same dedup key or
//!   nonce (if any).
//! - [`plan_webhook`]: admission, then quarantine or [`plan_observation`].
//! - [`plan_observation`]: the state rule ([`crate::state::decide`]) applied to the stored
//!   cash-out: which row to insert or update and with what, the event's outcome, the
//!   findings to open (`status_conflict`, `missed_webhook`) and the fetches to queue.
//! - [`plan_poll`], [`plan_reprocess`], [`plan_ledger_link`]: the same for a polled
//!   observation, a reprocessed quarantined event and a ledger entry naming a cash-out.
//!
//! A plan borrows the observation it was made from; the store copies its facts (amount,
//! fee, ids, provider times) into the rows the plan names.

use crate::providers::Observation;
use crate::reconcile::MismatchKind;
use crate::state::{decide, CashoutStatus, CurrentState, Transition};

use super::{EventOutcome, FetchReason, ObservationSource, WebhookRecord};

/// An earlier delivery holding the same dedup key (an event) or nonce (a replay-cache row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriorDelivery {
    pub event_id: String,
    /// `None` for an event without a body (a poll).
    pub body_sha256: Option<String>,
}

/// The answer of claiming a signed request's nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NonceClaim {
    /// The nonce was free and is now this delivery's.
    Claimed,
    /// Another delivery holds it.
    Taken(PriorDelivery),
}

/// Whether a delivery is new.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Admit,
    /// The same delivery again: answer with the first one's id.
    Duplicate {
        event_id: String,
    },
    /// Its dedup key or nonce was used with a different body.
    Replayed,
}

/// Dedup and replay: a delivery is new unless an earlier one holds its dedup key or its
/// nonce; then it is a duplicate when the bodies agree, else a replay.
pub fn admit(prior: Option<&PriorDelivery>, body_sha256: &str) -> Admission {
    match prior {
        None => Admission::Admit,
        Some(prior) if prior.body_sha256.as_deref() == Some(body_sha256) => Admission::Duplicate {
            event_id: prior.event_id.clone(),
        },
        Some(_) => Admission::Replayed,
    }
}

/// The stored cash-out an observation is judged against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredCashout {
    pub id: i64,
    pub state: CurrentState,
}

/// What the store loaded for one observation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loaded {
    /// The cash-out with this provider ref, if stored.
    pub cashout: Option<StoredCashout>,
    /// The external id of the one ledger entry naming this provider ref, if exactly one
    /// does (loaded only when [`needs_ledger_external_id`] says so).
    pub ledger_external_id: Option<String>,
}

/// Whether the plan needs the ledger's external id for this provider ref: a new
/// cash-out whose provider does not echo the platform's id (Mannco) takes the id of the
/// ledger entry that names it, when exactly one does.
pub fn needs_ledger_external_id(cashout: Option<StoredCashout>, observation: &Observation) -> bool {
    cashout.is_none() && observation.status.is_some() && observation.external_id.is_none()
}

/// What an observation that did not move the state does to the cash-out's open conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictMark {
    /// It reports a terminal state against the book's.
    Set(CashoutStatus),
    /// It agrees with the book.
    Clear,
    Keep,
}

/// The write to the cash-out row. Facts (amount, fee, method, ids, provider times) come
/// from the plan's observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CashoutChange {
    /// A thin notification changes nothing by itself (`id`: the row, if stored).
    Nothing { id: Option<i64> },
    /// First sight: a new row.
    Insert {
        external_id: Option<String>,
        state: CurrentState,
        /// Unix ms; set when the state is `completed`.
        completed_at: Option<i64>,
        /// Counts as one webhook.
        webhook: bool,
        /// Created by a poll (`recovered_by_poll`).
        recovered: bool,
        /// Link the events that arrived before it (thin notifications) to the new row.
        link_earlier_events: bool,
    },
    /// The state changed: new state, every fact the observation brings.
    Advance {
        id: i64,
        state: CurrentState,
        completed_at: Option<i64>,
        webhook: bool,
        /// Count one more change recovered by a poll.
        recovered: bool,
    },
    /// The state stays: only facts the row lacked, and the conflict mark.
    FillIn {
        id: i64,
        webhook: bool,
        conflict: ConflictMark,
    },
}

impl CashoutChange {
    /// The row id when the row exists before the change.
    pub fn existing_id(&self) -> Option<i64> {
        match self {
            CashoutChange::Nothing { id } => *id,
            CashoutChange::Insert { .. } => None,
            CashoutChange::Advance { id, .. } | CashoutChange::FillIn { id, .. } => Some(*id),
        }
    }
}

/// A finding to open about one cash-out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FindingToOpen {
    pub kind: MismatchKind,
    /// Opened already resolved (a recovered `missed_webhook`, kept for the day's report);
    /// an open one is not opened twice.
    pub resolved: bool,
    pub detail: String,
}

/// A status fetch to queue for the observation's cash-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchToQueue {
    pub reason: FetchReason,
    /// Queue only while the provider has fewer than this many (`None`: no bound).
    pub max_pending: Option<usize>,
}

/// The event row to write. Its cash-out id is the row the change touched (known after
/// an insert); its snapshot is the cash-out after the change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewEvent<'a> {
    pub event_id: &'a str,
    pub source: ObservationSource,
    /// The webhook it came in (dedup key, body, headers), if it did.
    pub delivery: Option<&'a WebhookRecord>,
    pub outcome: EventOutcome,
    pub error: Option<&'a str>,
    pub observation: Option<&'a Observation>,
    /// The state the observation reported.
    pub status: Option<CashoutStatus>,
    /// Whether the stored state changed.
    pub applied: bool,
    /// Unix ms.
    pub received_at: i64,
}

/// What one observation does: the cash-out write, findings, fetches and the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservationPlan<'a> {
    pub observation: &'a Observation,
    pub change: CashoutChange,
    pub findings: Vec<FindingToOpen>,
    pub fetches: Vec<FetchToQueue>,
    pub event: NewEvent<'a>,
    /// `None` for a thin notification.
    pub transition: Option<Transition>,
    /// The cash-out's state after the observation.
    pub status: CashoutStatus,
    pub missed_webhook: bool,
}

impl ObservationPlan<'_> {
    /// Whether the stored state changes.
    pub fn changes_state(&self) -> bool {
        self.transition.is_some_and(Transition::is_applied)
    }
}

/// How an observation is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intake<'a> {
    pub provider: &'a str,
    pub event_id: &'a str,
    pub source: ObservationSource,
    /// Unix ms.
    pub at: i64,
    /// A state change found this way is a `missed_webhook`.
    pub counts_as_missed: bool,
    /// A poll answering a thin notification (its status fetch, or a sweep that got there
    /// first): what it finds is what that webhook announced, so it counts as a webhook
    /// (`webhooks`), not as a change recovered by polling (`recovered_by_poll`).
    pub answers_notification: bool,
    pub delivery: Option<&'a WebhookRecord>,
}

/// The state rule applied to the stored cash-out (SPEC §3); creates it on first sight.
pub fn plan_observation<'a>(
    intake: Intake<'a>,
    observation: &'a Observation,
    loaded: Loaded,
) -> ObservationPlan<'a> {
    let now = intake.at;
    let webhook = intake.source == ObservationSource::Webhook || intake.answers_notification;
    let current = loaded.cashout;
    let event = |outcome, applied| NewEvent {
        event_id: intake.event_id,
        source: intake.source,
        delivery: intake.delivery,
        outcome,
        error: None,
        observation: Some(observation),
        status: observation.status.map(|s| s.status),
        applied,
        received_at: now,
    };

    let Some(update) = observation.status else {
        // A thin notification only says "go and look". Its signature may not cover the
        // cash-out id (Tupay signs external_id only), so it changes nothing by itself:
        // the authenticated status fetch it queues creates or updates the cash-out.
        return ObservationPlan {
            observation,
            change: CashoutChange::Nothing {
                id: current.map(|c| c.id),
            },
            findings: Vec::new(),
            fetches: vec![FetchToQueue {
                reason: FetchReason::ThinNotification,
                max_pending: None,
            }],
            event: event(EventOutcome::Thin, false),
            transition: None,
            status: current
                .map(|c| c.state.status)
                .unwrap_or(CashoutStatus::Pending),
            missed_webhook: false,
        };
    };

    let decision = decide(current.map(|c| c.state), update);
    let completed_at = |state: CurrentState| {
        (state.status == CashoutStatus::Completed).then(|| {
            observation
                .updated_at
                .map(|t| t.timestamp_millis())
                .unwrap_or(now)
        })
    };
    let change = match current {
        None => CashoutChange::Insert {
            external_id: observation
                .external_id
                .clone()
                .or(loaded.ledger_external_id),
            state: decision.next,
            completed_at: completed_at(decision.next),
            webhook,
            recovered: !webhook,
            link_earlier_events: intake.source == ObservationSource::Poll,
        },
        Some(stored) if decision.transition.is_applied() => CashoutChange::Advance {
            id: stored.id,
            state: decision.next,
            completed_at: completed_at(decision.next),
            webhook,
            recovered: !webhook,
        },
        Some(stored) => CashoutChange::FillIn {
            id: stored.id,
            webhook,
            // A report that agrees with the book settles an earlier conflicting one; a
            // conflicting report is kept until then (the `status_conflict` finding).
            conflict: match decision.transition {
                Transition::Conflict { reported, .. } => ConflictMark::Set(reported),
                _ if update.status == stored.state.status => ConflictMark::Clear,
                _ => ConflictMark::Keep,
            },
        },
    };
    let raw_status = observation.raw_status.as_deref().unwrap_or("");
    let mut findings = Vec::new();
    if let Transition::Conflict { current, reported } = decision.transition {
        findings.push(FindingToOpen {
            kind: MismatchKind::StatusConflict,
            resolved: false,
            detail: format!(
                "{} reported {reported} (raw {raw_status:?}) for {} which is already {current}; not applied",
                intake.provider, observation.provider_ref
            ),
        });
    }
    let applied = decision.transition.is_applied();
    let missed = intake.counts_as_missed && applied;
    if missed {
        findings.push(FindingToOpen {
            kind: MismatchKind::MissedWebhook,
            resolved: true,
            detail: format!(
                "poll found {} (raw {raw_status:?}) that no webhook reported; recovered",
                decision.next.status
            ),
        });
    }
    let outcome = if missed {
        EventOutcome::MissedWebhook
    } else {
        EventOutcome::of(Some(decision.transition))
    };
    ObservationPlan {
        observation,
        change,
        findings,
        fetches: Vec::new(),
        event: event(outcome, applied),
        transition: Some(decision.transition),
        status: decision.next.status,
        missed_webhook: missed,
    }
}

/// What to do with one verified webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookPlan<'a> {
    Duplicate {
        event_id: String,
    },
    Replayed,
    /// Keep the raw bytes as a quarantined event; the state is untouched.
    Quarantine {
        event: NewEvent<'a>,
        reason: &'a str,
    },
    Apply(ObservationPlan<'a>),
}

/// What the store loaded for a webhook, in the order it loads it: the event holding its
/// dedup key; when there is none, the claim of its nonce (when it has one); when
/// admitted and parsed, what [`plan_observation`] needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookLoaded {
    pub prior: Option<PriorDelivery>,
    pub nonce: Option<NonceClaim>,
    pub observation: Loaded,
}

impl WebhookLoaded {
    /// Admission from what was loaded so far (the store loads no cash-out for a
    /// delivery that is not admitted).
    pub fn admission(&self, body_sha256: &str) -> Admission {
        match (&self.prior, &self.nonce) {
            (Some(prior), _) | (None, Some(NonceClaim::Taken(prior))) => {
                admit(Some(prior), body_sha256)
            }
            _ => Admission::Admit,
        }
    }
}

/// Dedup, replay check, then quarantine or the state rule.
pub fn plan_webhook(record: &WebhookRecord, loaded: WebhookLoaded) -> WebhookPlan<'_> {
    match loaded.admission(&record.body_sha256) {
        Admission::Admit => {}
        Admission::Duplicate { event_id } => return WebhookPlan::Duplicate { event_id },
        Admission::Replayed => return WebhookPlan::Replayed,
    }
    let received_at = record.received_at.timestamp_millis();
    match &record.parsed {
        Err(reason) => WebhookPlan::Quarantine {
            event: NewEvent {
                event_id: &record.event_id,
                source: ObservationSource::Webhook,
                delivery: Some(record),
                outcome: EventOutcome::Quarantined,
                error: Some(reason),
                observation: None,
                status: None,
                applied: false,
                received_at,
            },
            reason,
        },
        Ok(observation) => WebhookPlan::Apply(plan_observation(
            Intake {
                provider: &record.provider,
                event_id: &record.event_id,
                source: ObservationSource::Webhook,
                at: received_at,
                counts_as_missed: false,
                answers_notification: false,
                delivery: Some(record),
            },
            observation,
            loaded.observation,
        )),
    }
}

/// How a polled observation was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollKind {
    /// A search sweep item.
    Sweep,
    /// The answer to a status fetch (a queued fetch or a status check).
    StatusFetch,
}

/// What a polled observation does beyond [`plan_observation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollPlan<'a> {
    pub apply: ObservationPlan<'a>,
    /// Drop the cash-out's queued status fetch.
    pub complete_fetch: bool,
    /// Record that the cash-out's status was just checked.
    pub mark_checked: bool,
    /// What the event keeps of its cash-out's after-snapshot.
    pub snapshot: PolledSnapshot,
}

/// Whether a polled event's after-snapshot counts as a change of the book (SPEC §6: a
/// day's report lists the cash-outs created, changed or flagged that day).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolledSnapshot {
    /// The poll changed the cash-out (or judged it a conflict): keep the snapshot.
    Keep,
    /// The poll found the same state or an older one (a sweep's overlap, a recheck): drop
    /// the snapshot when it equals the cash-out's latest earlier one, so the event stays
    /// on the timeline but the point-in-time read finds that earlier, identical snapshot
    /// and the day's report does not list the cash-out for it. A webhook reporting a state
    /// needs no such rule: it counts one more webhook, so its snapshot always differs.
    DropIfUnchanged,
}

/// How a polled observation is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollIntake<'a> {
    pub provider: &'a str,
    pub event_id: &'a str,
    pub kind: PollKind,
    /// A state change it finds is a `missed_webhook` (the provider sends webhooks)...
    pub counts_as_missed: bool,
    /// ...unless a thin notification had asked for this cash-out's status; the
    /// observation then answers that fetch.
    pub thin_fetch_pending: bool,
    /// Unix ms.
    pub at: i64,
}

/// A polled observation: the state rule, a `missed_webhook` when it finds a change no
/// webhook reported, and the fetch queue and status-check bookkeeping.
pub fn plan_poll<'a>(
    intake: PollIntake<'a>,
    observation: &'a Observation,
    loaded: Loaded,
) -> PollPlan<'a> {
    let apply = plan_observation(
        Intake {
            provider: intake.provider,
            event_id: intake.event_id,
            source: ObservationSource::Poll,
            at: intake.at,
            counts_as_missed: intake.counts_as_missed && !intake.thin_fetch_pending,
            answers_notification: intake.thin_fetch_pending,
            delivery: None,
        },
        observation,
        loaded,
    );
    let (complete_fetch, mark_checked) = match intake.kind {
        PollKind::Sweep => (
            intake.thin_fetch_pending && observation.status.is_some(),
            false,
        ),
        PollKind::StatusFetch => (true, true),
    };
    let snapshot = match apply.event.outcome {
        EventOutcome::Unchanged | EventOutcome::OutOfOrder => PolledSnapshot::DropIfUnchanged,
        _ => PolledSnapshot::Keep,
    };
    PollPlan {
        apply,
        complete_fetch,
        mark_checked,
        snapshot,
    }
}

/// What to do with a quarantined event given a new parse result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReprocessPlan<'a> {
    /// No quarantined event has this id.
    NotQuarantined,
    /// It still does not parse: keep it quarantined with the new reason.
    StillQuarantined { reason: &'a str },
    /// It parses now: apply it as the webhook it was, rewrite the event in place (its
    /// outcome, observation and snapshot; its book time becomes now) and queue its
    /// cash-out for reconciliation.
    Apply(ObservationPlan<'a>),
}

/// Re-runs a quarantined event (`provider`: its provider when it is quarantined).
pub fn plan_reprocess<'a>(
    provider: Option<&'a str>,
    event_id: &'a str,
    parsed: &'a Result<Observation, String>,
    at: i64,
    loaded: Loaded,
) -> ReprocessPlan<'a> {
    let Some(provider) = provider else {
        return ReprocessPlan::NotQuarantined;
    };
    match parsed {
        Err(reason) => ReprocessPlan::StillQuarantined { reason },
        Ok(observation) => ReprocessPlan::Apply(plan_observation(
            Intake {
                provider,
                event_id,
                source: ObservationSource::Webhook,
                at,
                counts_as_missed: false,
                answers_notification: false,
                delivery: None,
            },
            observation,
            loaded,
        )),
    }
}

/// The timeline event of a ledger entry that gave a cash-out (which had none) its
/// external id. `observation` carries the provider ref and that external id.
pub fn plan_ledger_link<'a>(
    event_id: &'a str,
    observation: &'a Observation,
    at: i64,
) -> NewEvent<'a> {
    NewEvent {
        event_id,
        source: ObservationSource::Ledger,
        delivery: None,
        outcome: EventOutcome::LedgerLinked,
        error: None,
        observation: Some(observation),
        status: None,
        applied: false,
        received_at: at,
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::state::StatusUpdate;

    const AT: i64 = 1_700_000_000_000;

    fn observation(status: Option<CashoutStatus>) -> Observation {
        let mut observation = Observation::new("ref-1");
        observation.status = status.map(StatusUpdate::to);
        observation.raw_status = status.map(|s| s.as_str().to_uppercase());
        observation
    }

    fn stored(status: CashoutStatus) -> Loaded {
        Loaded {
            cashout: Some(StoredCashout {
                id: 7,
                state: CurrentState {
                    status,
                    held: false,
                },
            }),
            ledger_external_id: None,
        }
    }

    fn intake(source: ObservationSource, counts_as_missed: bool) -> Intake<'static> {
        Intake {
            provider: "fiserv",
            event_id: "ev-1",
            source,
            at: AT,
            counts_as_missed,
            answers_notification: false,
            delivery: None,
        }
    }

    fn record(parsed: Result<Observation, String>) -> WebhookRecord {
        WebhookRecord {
            event_id: "ev-new".into(),
            provider: "fiserv".into(),
            dedup_key: "key".into(),
            nonce: Some("nonce".into()),
            body_sha256: "sha-a".into(),
            raw_body: b"{}".to_vec(),
            headers_json: "{}".into(),
            secret_index: 0,
            received_at: Utc.timestamp_millis_opt(AT).single().unwrap_or_default(),
            parsed,
        }
    }

    fn prior(sha: &str) -> PriorDelivery {
        PriorDelivery {
            event_id: "ev-old".into(),
            body_sha256: Some(sha.into()),
        }
    }

    #[test]
    fn admission_is_by_dedup_key_then_nonce() {
        assert_eq!(admit(None, "sha-a"), Admission::Admit);
        assert_eq!(
            admit(Some(&prior("sha-a")), "sha-a"),
            Admission::Duplicate {
                event_id: "ev-old".into()
            }
        );
        assert_eq!(admit(Some(&prior("sha-b")), "sha-a"), Admission::Replayed);
        let bodiless = PriorDelivery {
            event_id: "ev-old".into(),
            body_sha256: None,
        };
        assert_eq!(admit(Some(&bodiless), "sha-a"), Admission::Replayed);

        let by_nonce = WebhookLoaded {
            nonce: Some(NonceClaim::Taken(prior("sha-a"))),
            ..WebhookLoaded::default()
        };
        assert!(matches!(
            by_nonce.admission("sha-a"),
            Admission::Duplicate { .. }
        ));
        assert_eq!(by_nonce.admission("sha-b"), Admission::Replayed);
        let claimed = WebhookLoaded {
            nonce: Some(NonceClaim::Claimed),
            ..WebhookLoaded::default()
        };
        assert_eq!(claimed.admission("sha-a"), Admission::Admit);
    }

    #[test]
    fn a_webhook_is_a_duplicate_a_replay_a_quarantine_or_applied() {
        let ok = record(Ok(observation(Some(CashoutStatus::Processing))));
        let duplicate = plan_webhook(
            &ok,
            WebhookLoaded {
                prior: Some(prior("sha-a")),
                ..WebhookLoaded::default()
            },
        );
        assert_eq!(
            duplicate,
            WebhookPlan::Duplicate {
                event_id: "ev-old".into()
            }
        );
        let replayed = plan_webhook(
            &ok,
            WebhookLoaded {
                nonce: Some(NonceClaim::Taken(prior("sha-b"))),
                ..WebhookLoaded::default()
            },
        );
        assert_eq!(replayed, WebhookPlan::Replayed);

        let broken = record(Err("amount: not a decimal number".into()));
        let WebhookPlan::Quarantine { event, reason } =
            plan_webhook(&broken, WebhookLoaded::default())
        else {
            panic!("expected a quarantine");
        };
        assert_eq!(reason, "amount: not a decimal number");
        assert_eq!(event.outcome, EventOutcome::Quarantined);
        assert_eq!(event.error, Some("amount: not a decimal number"));
        assert_eq!(event.received_at, AT);
        assert!(event.delivery.is_some() && event.observation.is_none() && !event.applied);

        let WebhookPlan::Apply(plan) = plan_webhook(&ok, WebhookLoaded::default()) else {
            panic!("expected an apply");
        };
        assert_eq!(plan.event.outcome, EventOutcome::Applied);
        assert_eq!(plan.event.event_id, "ev-new");
        assert_eq!(plan.event.source, ObservationSource::Webhook);
        assert!(plan.event.delivery.is_some());
        assert!(matches!(
            plan.change,
            CashoutChange::Insert {
                webhook: true,
                recovered: false,
                link_earlier_events: false,
                ..
            }
        ));
    }

    #[test]
    fn a_thin_notification_queues_a_fetch_and_changes_nothing() {
        let thin = observation(None);
        let plan = plan_observation(
            intake(ObservationSource::Webhook, false),
            &thin,
            Loaded::default(),
        );
        assert_eq!(plan.change, CashoutChange::Nothing { id: None });
        assert_eq!(plan.status, CashoutStatus::Pending);
        assert_eq!(plan.event.outcome, EventOutcome::Thin);
        assert_eq!(
            plan.fetches,
            vec![FetchToQueue {
                reason: FetchReason::ThinNotification,
                max_pending: None
            }]
        );
        assert!(plan.findings.is_empty() && plan.transition.is_none());

        let known = plan_observation(
            intake(ObservationSource::Poll, true),
            &thin,
            stored(CashoutStatus::Processing),
        );
        assert_eq!(known.change, CashoutChange::Nothing { id: Some(7) });
        assert_eq!(known.status, CashoutStatus::Processing);
        assert!(!known.missed_webhook);
    }

    #[test]
    fn a_first_report_inserts_the_cash_out() {
        let mut completed = observation(Some(CashoutStatus::Completed));
        let plan = plan_observation(
            intake(ObservationSource::Poll, false),
            &completed,
            Loaded {
                cashout: None,
                ledger_external_id: Some("ext-ledger".into()),
            },
        );
        assert_eq!(
            plan.change,
            CashoutChange::Insert {
                external_id: Some("ext-ledger".into()),
                state: CurrentState {
                    status: CashoutStatus::Completed,
                    held: false
                },
                completed_at: Some(AT),
                webhook: false,
                recovered: true,
                link_earlier_events: true,
            }
        );
        // The provider's own id and update time win.
        completed.external_id = Some("ext-own".into());
        completed.updated_at = Utc.timestamp_millis_opt(AT - 5).single();
        let plan = plan_observation(
            intake(ObservationSource::Webhook, false),
            &completed,
            Loaded {
                cashout: None,
                ledger_external_id: Some("ext-ledger".into()),
            },
        );
        let CashoutChange::Insert {
            external_id,
            completed_at,
            ..
        } = plan.change
        else {
            panic!("expected an insert");
        };
        assert_eq!(external_id.as_deref(), Some("ext-own"));
        assert_eq!(completed_at, Some(AT - 5));
    }

    #[test]
    fn the_ledger_id_is_needed_only_for_a_new_cash_out_without_one() {
        let mut seen = observation(Some(CashoutStatus::Pending));
        assert!(needs_ledger_external_id(None, &seen));
        assert!(!needs_ledger_external_id(
            stored(CashoutStatus::Pending).cashout,
            &seen
        ));
        seen.external_id = Some("ext".into());
        assert!(!needs_ledger_external_id(None, &seen));
        assert!(!needs_ledger_external_id(None, &observation(None)));
    }

    #[test]
    fn an_advance_updates_the_state() {
        let seen_plan = observation(Some(CashoutStatus::Completed));
        let plan = plan_observation(
            intake(ObservationSource::Poll, false),
            &seen_plan,
            stored(CashoutStatus::Processing),
        );
        assert_eq!(
            plan.change,
            CashoutChange::Advance {
                id: 7,
                state: CurrentState {
                    status: CashoutStatus::Completed,
                    held: false
                },
                completed_at: Some(AT),
                webhook: false,
                recovered: true,
            }
        );
        assert_eq!(plan.event.outcome, EventOutcome::Applied);
        assert!(plan.event.applied && plan.changes_state());
        assert!(plan.findings.is_empty());
    }

    #[test]
    fn a_report_that_does_not_move_the_state_fills_in_facts() {
        let seen_same = observation(Some(CashoutStatus::Processing));
        let same = plan_observation(
            intake(ObservationSource::Webhook, false),
            &seen_same,
            stored(CashoutStatus::Processing),
        );
        assert_eq!(
            same.change,
            CashoutChange::FillIn {
                id: 7,
                webhook: true,
                conflict: ConflictMark::Clear
            }
        );
        assert_eq!(same.event.outcome, EventOutcome::Unchanged);

        let seen_late = observation(Some(CashoutStatus::Pending));
        let late = plan_observation(
            intake(ObservationSource::Webhook, false),
            &seen_late,
            stored(CashoutStatus::Completed),
        );
        assert_eq!(
            late.change,
            CashoutChange::FillIn {
                id: 7,
                webhook: true,
                conflict: ConflictMark::Keep
            }
        );
        assert_eq!(late.event.outcome, EventOutcome::OutOfOrder);
        assert!(!late.event.applied);
    }

    #[test]
    fn a_contradicting_terminal_report_opens_a_status_conflict() {
        let seen_plan = observation(Some(CashoutStatus::Failed));
        let plan = plan_observation(
            intake(ObservationSource::Webhook, false),
            &seen_plan,
            stored(CashoutStatus::Completed),
        );
        assert_eq!(
            plan.change,
            CashoutChange::FillIn {
                id: 7,
                webhook: true,
                conflict: ConflictMark::Set(CashoutStatus::Failed)
            }
        );
        assert_eq!(plan.event.outcome, EventOutcome::Conflict);
        assert_eq!(
            plan.findings,
            vec![FindingToOpen {
                kind: MismatchKind::StatusConflict,
                resolved: false,
                detail: "fiserv reported failed (raw \"FAILED\") for ref-1 which is already completed; not applied".into(),
            }]
        );
    }

    #[test]
    fn a_poll_that_finds_a_change_records_a_missed_webhook() {
        let completed = observation(Some(CashoutStatus::Completed));
        let polled = |thin_fetch_pending, kind| {
            plan_poll(
                PollIntake {
                    provider: "fiserv",
                    event_id: "ev-poll",
                    kind,
                    counts_as_missed: true,
                    thin_fetch_pending,
                    at: AT,
                },
                &completed,
                stored(CashoutStatus::Processing),
            )
        };
        let plan = polled(false, PollKind::Sweep);
        assert!(plan.apply.missed_webhook);
        assert_eq!(plan.apply.event.outcome, EventOutcome::MissedWebhook);
        assert_eq!(plan.apply.event.source, ObservationSource::Poll);
        assert_eq!(
            plan.apply.findings,
            vec![FindingToOpen {
                kind: MismatchKind::MissedWebhook,
                resolved: true,
                detail:
                    "poll found completed (raw \"COMPLETED\") that no webhook reported; recovered"
                        .into(),
            }]
        );
        assert!(!plan.complete_fetch && !plan.mark_checked);

        // A thin notification asked for it: the fetch answers it, nothing was missed.
        let plan = polled(true, PollKind::Sweep);
        assert!(!plan.apply.missed_webhook && plan.apply.findings.is_empty());
        assert_eq!(plan.apply.event.outcome, EventOutcome::Applied);
        assert!(plan.complete_fetch && !plan.mark_checked);

        let plan = polled(false, PollKind::StatusFetch);
        assert!(plan.complete_fetch && plan.mark_checked);
        assert_eq!(plan.snapshot, PolledSnapshot::Keep);

        // Nothing changed: nothing missed.
        let unchanged = plan_poll(
            PollIntake {
                provider: "fiserv",
                event_id: "ev-poll",
                kind: PollKind::Sweep,
                counts_as_missed: true,
                thin_fetch_pending: false,
                at: AT,
            },
            &completed,
            stored(CashoutStatus::Completed),
        );
        assert!(!unchanged.apply.missed_webhook);
        assert_eq!(unchanged.apply.event.outcome, EventOutcome::Unchanged);
        // ...and no change of the book unless its snapshot differs from the last one.
        assert_eq!(unchanged.snapshot, PolledSnapshot::DropIfUnchanged);
    }

    #[test]
    fn a_fetch_answering_a_thin_notification_counts_as_its_webhook_not_as_a_recovery() {
        let completed = observation(Some(CashoutStatus::Completed));
        let fetch = |thin_fetch_pending, loaded| {
            plan_poll(
                PollIntake {
                    provider: "tupay",
                    event_id: "ev-fetch",
                    kind: PollKind::StatusFetch,
                    counts_as_missed: true,
                    thin_fetch_pending,
                    at: AT,
                },
                &completed,
                loaded,
            )
            .apply
            .change
        };
        // (inserts, webhook, recovered) of a change that inserts or advances.
        let counted = |change: CashoutChange| match change {
            CashoutChange::Insert {
                webhook, recovered, ..
            } => Some((true, webhook, recovered)),
            CashoutChange::Advance {
                webhook, recovered, ..
            } => Some((false, webhook, recovered)),
            _ => None,
        };
        let processing = || stored(CashoutStatus::Processing);
        // Asked for by a notification: one webhook, nothing recovered.
        assert_eq!(
            counted(fetch(true, Loaded::default())),
            Some((true, true, false))
        );
        assert_eq!(
            counted(fetch(true, processing())),
            Some((false, true, false))
        );
        // No notification asked: the poll recovered it.
        assert_eq!(
            counted(fetch(false, Loaded::default())),
            Some((true, false, true))
        );
        assert_eq!(
            counted(fetch(false, processing())),
            Some((false, false, true))
        );
    }

    #[test]
    fn reprocessing_applies_a_quarantined_event_that_now_parses() {
        let parsed = Ok(observation(Some(CashoutStatus::Processing)));
        assert_eq!(
            plan_reprocess(None, "ev-q", &parsed, AT, Loaded::default()),
            ReprocessPlan::NotQuarantined
        );
        let failed = Err("still broken".to_string());
        assert_eq!(
            plan_reprocess(Some("fiserv"), "ev-q", &failed, AT, Loaded::default()),
            ReprocessPlan::StillQuarantined {
                reason: "still broken"
            }
        );
        let ReprocessPlan::Apply(plan) =
            plan_reprocess(Some("fiserv"), "ev-q", &parsed, AT, Loaded::default())
        else {
            panic!("expected an apply");
        };
        assert_eq!(plan.event.event_id, "ev-q");
        assert_eq!(plan.event.outcome, EventOutcome::Applied);
        assert!(matches!(
            plan.change,
            CashoutChange::Insert { webhook: true, .. }
        ));
    }

    #[test]
    fn a_ledger_link_is_a_ledger_event() {
        let mut linked = Observation::new("ref-1");
        linked.external_id = Some("ext".into());
        let event = plan_ledger_link("ev-l", &linked, AT);
        assert_eq!(event.outcome, EventOutcome::LedgerLinked);
        assert_eq!(event.source, ObservationSource::Ledger);
        assert!(!event.applied && event.status.is_none() && event.delivery.is_none());
    }

    /// The rule as the store applied it before it became a plan (`store/ingest.rs`
    /// `apply` and `record_poll`), transcribed: (outcome, write, conflict mark, finding
    /// kinds, fetch queued).
    fn reference(
        current: Option<CurrentState>,
        update: Option<StatusUpdate>,
        poll: bool,
        counts_as_missed: bool,
    ) -> (
        &'static str,
        &'static str,
        Option<ConflictMark>,
        Vec<MismatchKind>,
        bool,
    ) {
        let Some(update) = update else {
            return ("thin", "none", None, vec![], true);
        };
        let decision = decide(current, update);
        let (write, mark) = match current {
            None => ("insert", None),
            Some(_) if decision.transition.is_applied() => ("update", None),
            Some(state) => (
                "fill_in",
                Some(match decision.transition {
                    Transition::Conflict { reported, .. } => ConflictMark::Set(reported),
                    _ if update.status == state.status => ConflictMark::Clear,
                    _ => ConflictMark::Keep,
                }),
            ),
        };
        let mut kinds = Vec::new();
        if matches!(decision.transition, Transition::Conflict { .. }) {
            kinds.push(MismatchKind::StatusConflict);
        }
        let missed = poll && counts_as_missed && decision.transition.is_applied();
        if missed {
            kinds.push(MismatchKind::MissedWebhook);
        }
        let outcome = if missed {
            "missed_webhook"
        } else {
            match decision.transition {
                Transition::Created | Transition::Advanced { .. } | Transition::HoldChanged => {
                    "applied"
                }
                Transition::Unchanged => "unchanged",
                Transition::OutOfOrder => "out_of_order",
                Transition::Conflict { .. } => "conflict",
            }
        };
        (outcome, write, mark, kinds, false)
    }

    #[test]
    fn the_plan_agrees_with_the_rule_it_replaced_on_every_input() {
        let mut currents = vec![None];
        for status in CashoutStatus::ALL {
            for held in [false, true] {
                currents.push(Some(CurrentState { status, held }));
            }
        }
        let mut updates = vec![None];
        for status in CashoutStatus::ALL {
            for held in [false, true] {
                for reverses_completed in [false, true] {
                    updates.push(Some(StatusUpdate {
                        status,
                        held,
                        reverses_completed,
                    }));
                }
            }
        }
        let mut checked = 0;
        for current in &currents {
            for update in &updates {
                for poll in [false, true] {
                    for counts_as_missed in [false, true] {
                        let mut seen = Observation::new("ref-1");
                        seen.status = *update;
                        let loaded = Loaded {
                            cashout: current.map(|state| StoredCashout { id: 1, state }),
                            ledger_external_id: None,
                        };
                        let source = if poll {
                            ObservationSource::Poll
                        } else {
                            ObservationSource::Webhook
                        };
                        let plan = plan_observation(
                            Intake {
                                provider: "p",
                                event_id: "e",
                                source,
                                at: AT,
                                counts_as_missed: poll && counts_as_missed,
                                answers_notification: false,
                                delivery: None,
                            },
                            &seen,
                            loaded,
                        );
                        let (write, mark) = match &plan.change {
                            CashoutChange::Nothing { .. } => ("none", None),
                            CashoutChange::Insert { .. } => ("insert", None),
                            CashoutChange::Advance { .. } => ("update", None),
                            CashoutChange::FillIn { conflict, .. } => ("fill_in", Some(*conflict)),
                        };
                        let kinds: Vec<_> = plan.findings.iter().map(|f| f.kind).collect();
                        assert_eq!(
                            (
                                plan.event.outcome.as_str(),
                                write,
                                mark,
                                kinds,
                                !plan.fetches.is_empty()
                            ),
                            reference(*current, *update, poll, counts_as_missed),
                            "current {current:?}, update {update:?}, poll {poll}, missed {counts_as_missed}"
                        );
                        if let Some(update) = update {
                            let decision = decide(*current, *update);
                            assert_eq!(plan.status, decision.next.status);
                            assert_eq!(plan.event.applied, decision.transition.is_applied());
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 15 * 29 * 4);
    }

    mod sequences {
        use proptest::prelude::*;

        use super::*;

        /// One observation of a sequence: its state (`None`: thin) and whether a poll
        /// found it.
        fn step() -> impl Strategy<Value = (Option<StatusUpdate>, bool)> {
            let update = (
                proptest::sample::select(CashoutStatus::ALL.to_vec()),
                any::<bool>(),
                any::<bool>(),
            )
                .prop_map(|(status, held, reverses_completed)| StatusUpdate {
                    status,
                    held,
                    reverses_completed,
                });
            (proptest::option::of(update), any::<bool>())
        }

        /// The book one cash-out's row would hold, written only as plans say.
        #[derive(Default)]
        struct Book {
            row: Option<StoredCashout>,
            webhooks: u32,
            recovered: u32,
            conflict: Option<CashoutStatus>,
            open_conflicts: u32,
            missed: u32,
            fetches: u32,
        }

        impl Book {
            fn apply(&mut self, plan: &ObservationPlan<'_>) {
                match &plan.change {
                    CashoutChange::Nothing { id } => assert_eq!(*id, self.row.map(|r| r.id)),
                    CashoutChange::Insert {
                        state,
                        webhook,
                        recovered,
                        ..
                    } => {
                        assert!(self.row.is_none());
                        self.row = Some(StoredCashout {
                            id: 1,
                            state: *state,
                        });
                        self.webhooks += u32::from(*webhook);
                        self.recovered += u32::from(*recovered);
                    }
                    CashoutChange::Advance {
                        id,
                        state,
                        webhook,
                        recovered,
                        ..
                    } => {
                        assert_eq!(Some(*id), self.row.map(|r| r.id));
                        self.row = Some(StoredCashout {
                            id: *id,
                            state: *state,
                        });
                        self.webhooks += u32::from(*webhook);
                        self.recovered += u32::from(*recovered);
                        self.conflict = None;
                    }
                    CashoutChange::FillIn {
                        id,
                        webhook,
                        conflict,
                    } => {
                        assert_eq!(Some(*id), self.row.map(|r| r.id));
                        self.webhooks += u32::from(*webhook);
                        match conflict {
                            ConflictMark::Set(reported) => self.conflict = Some(*reported),
                            ConflictMark::Clear => self.conflict = None,
                            ConflictMark::Keep => {}
                        }
                    }
                }
                for finding in &plan.findings {
                    match finding.kind {
                        MismatchKind::StatusConflict => self.open_conflicts += 1,
                        MismatchKind::MissedWebhook => self.missed += 1,
                        other => panic!("ingestion opened {other}"),
                    }
                }
                self.fetches += plan.fetches.len() as u32;
            }
        }

        proptest! {
            #[test]
            fn a_book_written_by_plans_holds_what_the_state_rule_says(
                steps in proptest::collection::vec(step(), 1..24),
            ) {
                let observations: Vec<Observation> = steps
                    .iter()
                    .map(|(update, _)| {
                        let mut observation = Observation::new("ref-1");
                        observation.status = *update;
                        observation
                    })
                    .collect();
                let mut book = Book::default();
                let mut state: Option<CurrentState> = None;
                let (mut webhooks, mut polls_changing, mut conflicts, mut thin) = (0, 0, 0, 0);
                for ((update, polled), observation) in steps.iter().zip(&observations) {
                    let source = if *polled { ObservationSource::Poll } else { ObservationSource::Webhook };
                    let plan = plan_observation(
                        Intake {
                            provider: "p",
                            event_id: "e",
                            source,
                            at: AT,
                            counts_as_missed: *polled,
                            answers_notification: false,
                            delivery: None,
                        },
                        observation,
                        Loaded { cashout: book.row, ledger_external_id: None },
                    );
                    book.apply(&plan);
                    // The rule itself, folded over the reports.
                    match update {
                        None => thin += 1,
                        Some(update) => {
                            let decision = decide(state, *update);
                            state = Some(decision.next);
                            webhooks += u32::from(!polled);
                            polls_changing += u32::from(*polled && decision.transition.is_applied());
                            conflicts += u32::from(matches!(decision.transition, Transition::Conflict { .. }));
                        }
                    }
                    prop_assert_eq!(book.row.map(|r| r.state), state);
                    prop_assert_eq!(plan.status, state.map_or(CashoutStatus::Pending, |s| s.status));
                }
                prop_assert_eq!(book.webhooks, webhooks);
                prop_assert_eq!(book.missed, polls_changing);
                prop_assert_eq!(book.open_conflicts, conflicts);
                prop_assert_eq!(book.fetches, thin);
                // A poll that creates the cash-out is recovered, as is each change it finds.
                prop_assert_eq!(book.recovered, polls_changing);
                if book.conflict.is_some() {
                    prop_assert!(conflicts > 0);
                }
            }
        }
    }
}
