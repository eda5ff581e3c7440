//! Versioned migrations of the SQLite schema, embedded in the binary.

use rusqlite_migration::{Migrations, M};

/// Every migration, oldest first. Never edit a released one: append a new one.
pub fn migrations() -> Migrations<'static> {
    Migrations::new(vec![M::up(V1_INGESTION), M::up(V2_LEDGER)])
}

/// Cash-outs, the append-only event log, the replay cache, the status-fetch queue,
/// mismatches, alerts and poll watermarks. Times are unix milliseconds (UTC).
const V1_INGESTION: &str = r#"
CREATE TABLE cashouts (
    id                   INTEGER PRIMARY KEY,
    provider             TEXT    NOT NULL,
    provider_ref         TEXT    NOT NULL,
    external_id          TEXT,
    status               TEXT    NOT NULL,
    held                 INTEGER NOT NULL DEFAULT 0,
    provider_status      TEXT,
    reason_code          TEXT,
    amount_minor         INTEGER,
    currency             TEXT,
    fee_minor            INTEGER,
    created_at           INTEGER NOT NULL,
    provider_created_at  INTEGER,
    provider_updated_at  INTEGER,
    first_seen_at        INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL,
    completed_at         INTEGER,
    webhook_count        INTEGER NOT NULL DEFAULT 0,
    recovered_by_poll    INTEGER NOT NULL DEFAULT 0,
    last_status_check_at INTEGER,
    UNIQUE (provider, provider_ref)
);
CREATE INDEX cashouts_by_external_id ON cashouts (provider, external_id) WHERE external_id IS NOT NULL;
CREATE INDEX cashouts_by_created ON cashouts (created_at DESC, id DESC);
CREATE INDEX cashouts_in_flight ON cashouts (provider, status, updated_at);

CREATE TABLE events (
    seq           INTEGER PRIMARY KEY,
    event_id      TEXT    NOT NULL UNIQUE,
    cashout_id    INTEGER REFERENCES cashouts (id),
    provider      TEXT    NOT NULL,
    source        TEXT    NOT NULL CHECK (source IN ('webhook', 'poll', 'ledger')),
    dedup_key     TEXT,
    body_sha256   TEXT,
    raw_body      BLOB,
    headers       TEXT,
    secret_index  INTEGER,
    outcome       TEXT    NOT NULL,
    error         TEXT,
    provider_ref  TEXT,
    raw_status    TEXT,
    reason_code   TEXT,
    status        TEXT,
    applied       INTEGER NOT NULL DEFAULT 0,
    received_at   INTEGER NOT NULL
);
CREATE UNIQUE INDEX events_dedup ON events (provider, dedup_key) WHERE dedup_key IS NOT NULL;
-- The timeline. Keyed by the cash-out's integer id, so new cash-outs append at the
-- index's right edge instead of dirtying a random page per event.
CREATE INDEX events_by_cashout ON events (cashout_id, seq);
-- Events not yet linked to a cash-out (a thin notification before its status fetch).
CREATE INDEX events_unlinked ON events (provider, provider_ref) WHERE cashout_id IS NULL;
CREATE INDEX events_quarantined ON events (outcome) WHERE outcome = 'quarantined';

-- nonce = zero-padded signed timestamp ':' SHA-256 of the signature: time-ordered, so
-- inserts append and pruning by age is a range delete.
CREATE TABLE replay_cache (
    provider     TEXT    NOT NULL,
    nonce        TEXT    NOT NULL,
    body_sha256  TEXT    NOT NULL,
    event_id     TEXT    NOT NULL,
    seen_at      INTEGER NOT NULL,
    PRIMARY KEY (provider, nonce)
) WITHOUT ROWID;
CREATE INDEX replay_cache_by_age ON replay_cache (seen_at);

CREATE TABLE status_fetch_queue (
    provider        TEXT    NOT NULL,
    provider_ref    TEXT    NOT NULL,
    reason          TEXT    NOT NULL,
    requested_at    INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    PRIMARY KEY (provider, provider_ref)
) WITHOUT ROWID;

CREATE TABLE mismatches (
    id            INTEGER PRIMARY KEY,
    kind          TEXT    NOT NULL,
    provider      TEXT    NOT NULL,
    provider_ref  TEXT,
    external_id   TEXT,
    detail        TEXT    NOT NULL,
    opened_at     INTEGER NOT NULL,
    resolved_at   INTEGER
);
CREATE UNIQUE INDEX mismatches_open ON mismatches (kind, provider, provider_ref) WHERE resolved_at IS NULL;

CREATE TABLE alerts (
    id            INTEGER PRIMARY KEY,
    kind          TEXT    NOT NULL,
    subject       TEXT    NOT NULL,
    severity      TEXT    NOT NULL,
    text          TEXT    NOT NULL,
    opened_at     INTEGER NOT NULL,
    last_sent_at  INTEGER,
    resolved_at   INTEGER
);
CREATE UNIQUE INDEX alerts_open ON alerts (kind, subject) WHERE resolved_at IS NULL;

CREATE TABLE poll_watermarks (
    provider      TEXT    PRIMARY KEY,
    watermark     INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
"#;

/// The platform's expected cash-outs (SPEC §5): what it meant to pay, through whom.
const V2_LEDGER: &str = r#"
CREATE TABLE ledger (
    id            INTEGER PRIMARY KEY,
    provider      TEXT    NOT NULL,
    external_id   TEXT    NOT NULL,
    amount_minor  INTEGER NOT NULL,
    currency      TEXT    NOT NULL,
    provider_ref  TEXT,
    created_at    INTEGER NOT NULL,
    registered_at INTEGER NOT NULL,
    UNIQUE (provider, external_id)
);
CREATE INDEX ledger_by_ref ON ledger (provider, provider_ref);
"#;

#[cfg(test)]
mod tests {
    #[test]
    fn migrations_are_valid() {
        assert!(super::migrations().validate().is_ok());
    }
}
