//! Integration tests: the real server on port 0 with a temp SQLite file.

mod admin;
mod alerts;
mod console;
mod copy_store;
mod crash;
mod hardening;
mod helpers;
mod ledger_import;
mod operations;
mod ops_views;
mod reconciliation;
mod recovery;
mod retention;
mod schemes;
mod webhooks;
