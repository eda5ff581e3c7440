//! Canonical cash-out states and the transition rule (SPEC §3), pure and total.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The one state machine every provider's states map into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CashoutStatus {
    Pending,
    Processing,
    Completed,
    Failed,
    Canceled,
    Expired,
    Reversed,
}

impl CashoutStatus {
    /// All states, in rank order.
    pub const ALL: [CashoutStatus; 7] = [
        CashoutStatus::Pending,
        CashoutStatus::Processing,
        CashoutStatus::Completed,
        CashoutStatus::Failed,
        CashoutStatus::Canceled,
        CashoutStatus::Expired,
        CashoutStatus::Reversed,
    ];

    /// Rank: a lower-ranked update never overrides a higher-ranked state.
    pub fn rank(self) -> u8 {
        match self {
            CashoutStatus::Pending => 0,
            CashoutStatus::Processing => 1,
            CashoutStatus::Completed
            | CashoutStatus::Failed
            | CashoutStatus::Canceled
            | CashoutStatus::Expired => 2,
            CashoutStatus::Reversed => 3,
        }
    }

    /// Terminal states: the provider will not move them on (but for `completed → reversed`).
    pub fn is_terminal(self) -> bool {
        self.rank() >= 2
    }

    /// The wire name used in the API, the store and the CSV.
    pub fn as_str(self) -> &'static str {
        match self {
            CashoutStatus::Pending => "pending",
            CashoutStatus::Processing => "processing",
            CashoutStatus::Completed => "completed",
            CashoutStatus::Failed => "failed",
            CashoutStatus::Canceled => "canceled",
            CashoutStatus::Expired => "expired",
            CashoutStatus::Reversed => "reversed",
        }
    }
}

impl fmt::Display for CashoutStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state name that is not canonical.
#[derive(Debug, thiserror::Error)]
#[error("unknown cash-out status {0:?}")]
pub struct UnknownStatus(pub String);

impl FromStr for CashoutStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CashoutStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

/// What one provider report says about a cash-out's state, already mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusUpdate {
    pub status: CashoutStatus,
    /// The provider put a pending cash-out on hold.
    pub held: bool,
    /// The provider's state means "reversed" when it follows `completed`
    /// (Fiserv 4 after 3, Tupay 3 Rejected after 1 Completed).
    pub reverses_completed: bool,
}

impl StatusUpdate {
    /// A plain update to `status`.
    pub fn to(status: CashoutStatus) -> StatusUpdate {
        StatusUpdate {
            status,
            held: false,
            reverses_completed: false,
        }
    }
}

/// The stored state of a cash-out that an update is judged against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CurrentState {
    pub status: CashoutStatus,
    pub held: bool,
}

/// How an update relates to the current state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// First report of this cash-out.
    Created,
    /// Moved to a higher rank (or `completed → reversed`).
    Advanced { from: CashoutStatus },
    /// Same state, but the hold flag changed.
    HoldChanged,
    /// Same state again: nothing to change.
    Unchanged,
    /// Lower rank than the current state: recorded, not applied (out-of-order delivery).
    OutOfOrder,
    /// A terminal state contradicted by another terminal state: recorded, not applied,
    /// raised as a `status_conflict`.
    Conflict {
        current: CashoutStatus,
        reported: CashoutStatus,
    },
}

impl Transition {
    /// Whether the stored state changes.
    pub fn is_applied(self) -> bool {
        matches!(
            self,
            Transition::Created | Transition::Advanced { .. } | Transition::HoldChanged
        )
    }
}

/// The outcome of the rule: the transition and the state to store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub transition: Transition,
    /// The state after the update (the current one when not applied).
    pub next: CurrentState,
}

/// Judges `update` against `current` (SPEC §3).
pub fn decide(current: Option<CurrentState>, update: StatusUpdate) -> Decision {
    let held_for = |status: CashoutStatus| status == CashoutStatus::Pending && update.held;
    let Some(current) = current else {
        let status = update.status;
        return Decision {
            transition: Transition::Created,
            next: CurrentState {
                status,
                held: held_for(status),
            },
        };
    };
    let keep = |transition| Decision {
        transition,
        next: current,
    };
    let reported = if current.status == CashoutStatus::Completed && update.reverses_completed {
        CashoutStatus::Reversed
    } else {
        update.status
    };
    if reported == current.status {
        let held = held_for(reported);
        return if held == current.held {
            keep(Transition::Unchanged)
        } else {
            Decision {
                transition: Transition::HoldChanged,
                next: CurrentState {
                    status: reported,
                    held,
                },
            }
        };
    }
    if current.status.is_terminal() {
        let is_reversal =
            current.status == CashoutStatus::Completed && reported == CashoutStatus::Reversed;
        if is_reversal {
            return Decision {
                transition: Transition::Advanced {
                    from: current.status,
                },
                next: CurrentState {
                    status: reported,
                    held: false,
                },
            };
        }
        if reported.rank() < current.status.rank()
            || (current.status == CashoutStatus::Reversed && reported == CashoutStatus::Completed)
        {
            return keep(Transition::OutOfOrder);
        }
        return keep(Transition::Conflict {
            current: current.status,
            reported,
        });
    }
    if reported.rank() < current.status.rank() {
        return keep(Transition::OutOfOrder);
    }
    Decision {
        transition: Transition::Advanced {
            from: current.status,
        },
        next: CurrentState {
            status: reported,
            held: held_for(reported),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::CashoutStatus::*;
    use super::*;

    fn at(status: CashoutStatus) -> Option<CurrentState> {
        Some(CurrentState {
            status,
            held: false,
        })
    }

    #[test]
    fn forward_moves_are_applied() {
        let d = decide(at(Pending), StatusUpdate::to(Processing));
        assert_eq!(d.transition, Transition::Advanced { from: Pending });
        assert_eq!(d.next.status, Processing);
        let d = decide(at(Pending), StatusUpdate::to(Completed));
        assert_eq!(
            d.next.status, Completed,
            "a skipped intermediate state is fine"
        );
        let d = decide(None, StatusUpdate::to(Failed));
        assert_eq!(d.transition, Transition::Created);
    }

    #[test]
    fn out_of_order_updates_are_recorded_but_not_applied() {
        for (current, late) in [
            (Processing, Pending),
            (Completed, Processing),
            (Reversed, Completed),
            (Failed, Pending),
        ] {
            let d = decide(at(current), StatusUpdate::to(late));
            assert_eq!(
                d.transition,
                Transition::OutOfOrder,
                "{late} after {current}"
            );
            assert_eq!(d.next.status, current);
        }
    }

    #[test]
    fn completed_to_reversed_is_the_only_exit_from_a_terminal_state() {
        let d = decide(at(Completed), StatusUpdate::to(Reversed));
        assert_eq!(d.next.status, Reversed);
        for (current, reported) in [
            (Completed, Failed),
            (Failed, Completed),
            (Canceled, Expired),
            (Expired, Reversed),
            (Failed, Reversed),
        ] {
            let d = decide(at(current), StatusUpdate::to(reported));
            assert_eq!(
                d.transition,
                Transition::Conflict { current, reported },
                "{current} then {reported}"
            );
            assert_eq!(d.next.status, current);
        }
    }

    #[test]
    fn a_failure_after_completion_is_a_reversal_when_the_provider_says_so() {
        let update = StatusUpdate {
            status: Failed,
            held: false,
            reverses_completed: true,
        };
        assert_eq!(decide(at(Completed), update).next.status, Reversed);
        assert_eq!(decide(at(Processing), update).next.status, Failed);
        assert_eq!(
            decide(at(Reversed), update).transition,
            Transition::OutOfOrder
        );
    }

    #[test]
    fn hold_is_a_flag_on_pending() {
        let hold = StatusUpdate {
            status: Pending,
            held: true,
            reverses_completed: false,
        };
        let d = decide(at(Pending), hold);
        assert_eq!(d.transition, Transition::HoldChanged);
        assert!(d.next.held);
        let d = decide(Some(d.next), StatusUpdate::to(Pending));
        assert_eq!(d.transition, Transition::HoldChanged);
        assert!(!d.next.held);
        let d = decide(at(Processing), hold);
        assert_eq!(d.transition, Transition::OutOfOrder);
        assert!(decide(None, hold).next.held);
    }

    #[test]
    fn names_round_trip() {
        for status in CashoutStatus::ALL {
            assert_eq!(status.as_str().parse::<CashoutStatus>().unwrap(), status);
        }
    }
}

#[cfg(test)]
mod proptests {
    //! Property tests of the rule's invariants over every (state, update) pair.

    use proptest::prelude::*;

    use super::*;

    fn status() -> impl Strategy<Value = CashoutStatus> {
        proptest::sample::select(CashoutStatus::ALL.to_vec())
    }

    fn current() -> impl Strategy<Value = Option<CurrentState>> {
        proptest::option::of(
            (status(), any::<bool>()).prop_map(|(status, held)| CurrentState { status, held }),
        )
    }

    fn update() -> impl Strategy<Value = StatusUpdate> {
        (status(), any::<bool>(), any::<bool>()).prop_map(|(status, held, reverses_completed)| {
            StatusUpdate {
                status,
                held,
                reverses_completed,
            }
        })
    }

    proptest! {
        #[test]
        fn rank_never_decreases(current in current(), update in update()) {
            let decision = decide(current, update);
            if let Some(current) = current {
                prop_assert!(decision.next.status.rank() >= current.status.rank(), "{decision:?}");
            }
        }

        #[test]
        fn the_only_exit_from_a_terminal_state_is_completed_to_reversed(
            current in current(),
            update in update(),
        ) {
            let decision = decide(current, update);
            if let Some(current) = current.filter(|c| c.status.is_terminal()) {
                if decision.next.status != current.status {
                    prop_assert_eq!(current.status, CashoutStatus::Completed);
                    prop_assert_eq!(decision.next.status, CashoutStatus::Reversed);
                }
            }
        }

        #[test]
        fn a_decision_not_applied_keeps_the_state_and_a_conflict_is_never_applied(
            current in current(),
            update in update(),
        ) {
            let decision = decide(current, update);
            if let Transition::Conflict { current: said, .. } = decision.transition {
                prop_assert_eq!(Some(decision.next), current);
                prop_assert_eq!(Some(said), current.map(|c| c.status));
            }
            if !decision.transition.is_applied() {
                prop_assert_eq!(Some(decision.next), current);
            }
            if decision.transition == Transition::Created {
                prop_assert!(current.is_none());
            }
        }

        #[test]
        fn only_a_pending_cashout_is_held(current in current(), update in update()) {
            let decision = decide(current, update);
            if decision.next.held && decision.transition.is_applied() {
                prop_assert_eq!(decision.next.status, CashoutStatus::Pending);
            }
        }

        #[test]
        fn deciding_the_same_update_twice_changes_nothing_the_second_time(
            current in current(),
            update in update(),
        ) {
            let first = decide(current, update);
            let second = decide(Some(first.next), update);
            prop_assert!(!second.transition.is_applied() || matches!(second.transition, Transition::Advanced { from: CashoutStatus::Completed }), "{first:?} then {second:?}");
        }
    }
}
