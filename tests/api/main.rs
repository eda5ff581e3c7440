//! Integration tests: the real server on port 0 with a fresh store — a temp SQLite file, or
//! with `CASHOUT_RECON_TEST_BACKEND=postgres` a fresh PostgreSQL database (see `helpers`).
//! Tests of the SQLite file itself are in `sqlite_only` or named `sqlite_only_…`: the
//! PostgreSQL run skips them (`--skip sqlite_only`).

mod admin;
mod alerts;
mod console;
mod hardening;
mod helpers;
mod instances;
mod operations;
mod ops_views;
mod postgres_outage;
mod postgres_tls;
mod process;
mod reconciliation;
mod recovery;
mod retention;
mod schemes;
mod test_database;
mod webhooks;
mod world;

/// Tests whose subject is the SQLite file: the daemon process killed and restarted on it,
/// its store lock, faults of the file, `import-ledger` writing it and `copy-store` copying it.
#[path = "."]
mod sqlite_only {
    mod copy_store;
    mod crash;
    mod ledger_import;
}
