//! Discrepancies a simulator can be told to commit, so a demo or test can check that
//! reconciliation flags exactly them: a second payout of one external id, a fee off the
//! schedule, a cash-out left in flight.

use super::{canonical_state, lock, Cashout, Simulator};
use crate::state::CashoutStatus;

impl Simulator {
    /// The canonical state `cashout` will end in when its plan is exhausted.
    fn final_status(&self, cashout: &Cashout) -> CashoutStatus {
        let mut done = cashout.clone();
        done.pos = done.path.len().saturating_sub(1);
        canonical_state(self.inner.sim, &done).status
    }

    /// Among the cash-outs not yet moved, the first whose plan ends `completed`, skipping
    /// `except`. For choosing where to inject a discrepancy before a run.
    pub fn a_cashout_ending_completed(&self, except: &[String]) -> Option<String> {
        let book = lock(&self.inner.book);
        book.cashouts
            .iter()
            .filter(|c| !except.contains(&c.provider_ref))
            .find(|c| self.final_status(c) == CashoutStatus::Completed)
            .map(|c| c.provider_ref.clone())
    }

    /// Pays `provider_ref` a second time: a new cash-out with the same external id,
    /// amount and plan (so it ends in the same state). Returns the new provider ref.
    pub fn duplicate_cashout(&self, provider_ref: &str) -> Option<String> {
        let mut book = lock(&self.inner.book);
        let index = *book.by_ref.get(provider_ref)?;
        let mut copy = book.cashouts[index].clone();
        copy.pos = 0;
        copy.last_event = None;
        // Provider ids are numeric for some kinds: grow the number until it is new.
        copy.provider_ref.push('7');
        while book.by_ref.contains_key(&copy.provider_ref) {
            copy.provider_ref.push('7');
        }
        let new_ref = copy.provider_ref.clone();
        let position = book.cashouts.len();
        book.by_ref.insert(new_ref.clone(), position);
        book.cashouts.push(copy);
        Some(new_ref)
    }

    /// Charges `extra_minor` more fee on `provider_ref` than the provider's schedule says
    /// (the net amount follows, as a provider's own arithmetic would).
    pub fn overcharge_fee(&self, provider_ref: &str, extra_minor: i64) -> bool {
        let mut book = lock(&self.inner.book);
        let Some(&index) = book.by_ref.get(provider_ref) else {
            return false;
        };
        let cashout = &mut book.cashouts[index];
        cashout.fee_minor = Some(cashout.fee_minor.unwrap_or(0) + extra_minor);
        true
    }

    /// Leaves `provider_ref` in flight: its plan stops before its first terminal state.
    pub fn hold_in_flight(&self, provider_ref: &str) -> bool {
        let mut book = lock(&self.inner.book);
        let Some(&index) = book.by_ref.get(provider_ref) else {
            return false;
        };
        let cashout = &book.cashouts[index];
        let mut keep = 1;
        for end in 1..=cashout.path.len() {
            let mut prefix = cashout.clone();
            prefix.path.truncate(end);
            prefix.pos = end - 1;
            if canonical_state(self.inner.sim, &prefix)
                .status
                .is_terminal()
            {
                break;
            }
            keep = end;
        }
        let cashout = &mut book.cashouts[index];
        cashout.path.truncate(keep);
        cashout.pos = cashout.pos.min(keep - 1);
        true
    }
}
