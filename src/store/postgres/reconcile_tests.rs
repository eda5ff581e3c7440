//! Reconciliation and report scenarios run on both stores.
