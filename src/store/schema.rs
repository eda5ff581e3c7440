//! Versioned migrations of the SQLite schema, embedded in the binary.

use rusqlite_migration::{Migrations, M};

/// Every migration, oldest first. Never edit a released one: append a new one.
pub fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(V1_INGESTION),
        M::up(V2_LEDGER),
        M::up(V3_RECONCILIATION),
        M::up(V_ALERT_OUTBOX),
        M::up(V_HEARTBEAT),
        M::up(V_RETENTION),
        M::up(V_CONSOLE),
        M::up(V_REPLAY_NONCE_ON_EVENTS),
        M::up(V_CREATED_ASCENDING),
    ])
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

/// Reconciliation (SPEC §5, §6): what the book looked like after each event (point-in-time
/// reports), the facts the engine needs (fee method, net amount, an unresolved
/// conflicting report), mismatch subjects, the continuous pass's cursor and the reports
/// index.
const V3_RECONCILIATION: &str = r#"
-- When the event's effect entered the book (its arrival; a reprocessed event's reprocessing
-- time), and the cash-out as it stood right after it: a day's report reads the latest
-- snapshot before the day's end, so a closed day never changes.
ALTER TABLE events ADD COLUMN book_at INTEGER;
ALTER TABLE events ADD COLUMN after_status TEXT;
ALTER TABLE events ADD COLUMN after_provider_status TEXT;
ALTER TABLE events ADD COLUMN after_external_id TEXT;
ALTER TABLE events ADD COLUMN after_amount_minor INTEGER;
ALTER TABLE events ADD COLUMN after_currency TEXT;
ALTER TABLE events ADD COLUMN after_fee_minor INTEGER;
ALTER TABLE events ADD COLUMN after_net_minor INTEGER;
ALTER TABLE events ADD COLUMN after_created_at INTEGER;
ALTER TABLE events ADD COLUMN after_updated_at INTEGER;
ALTER TABLE events ADD COLUMN after_completed_at INTEGER;
ALTER TABLE events ADD COLUMN after_webhooks INTEGER;
ALTER TABLE events ADD COLUMN after_recovered INTEGER;
UPDATE events SET book_at = received_at;
-- Time-ordered: appends at the right edge.
CREATE INDEX events_by_book ON events (book_at, cashout_id) WHERE after_status IS NOT NULL;

ALTER TABLE cashouts ADD COLUMN method TEXT;
ALTER TABLE cashouts ADD COLUMN net_minor INTEGER;
-- A terminal state the provider reported against the book's (not applied), until a later
-- report agrees with the book again.
ALTER TABLE cashouts ADD COLUMN conflict_status TEXT;
-- When anything of the row last changed in the book.
ALTER TABLE cashouts ADD COLUMN book_changed_at INTEGER;
UPDATE cashouts SET book_changed_at = updated_at;

CREATE INDEX ledger_by_created ON ledger (created_at);
CREATE INDEX ledger_by_registered ON ledger (registered_at);

-- The subject of a mismatch: the cash-out's provider_ref, or `ext:<external_id>` for a
-- ledger entry the provider does not know.
ALTER TABLE mismatches ADD COLUMN subject TEXT;
UPDATE mismatches SET subject = COALESCE(provider_ref, 'ext:' || external_id);
DROP INDEX mismatches_open;
CREATE UNIQUE INDEX mismatches_open ON mismatches (kind, provider, subject) WHERE resolved_at IS NULL;
CREATE INDEX mismatches_by_subject ON mismatches (provider, subject);
CREATE INDEX mismatches_by_opened ON mismatches (opened_at);

-- Where the continuous pass stopped: events and ledger entries after these were not
-- examined yet.
CREATE TABLE reconcile_cursor (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    event_seq      INTEGER NOT NULL,
    ledger_id      INTEGER NOT NULL,
    passed_at      INTEGER NOT NULL
);
-- A book that existed before reconciliation starts the continuous pass from here (its
-- history is for the daily full passes); an empty one starts from the beginning.
INSERT INTO reconcile_cursor (id, event_seq, ledger_id, passed_at)
SELECT 1, COALESCE((SELECT MAX(seq) FROM events), 0), COALESCE((SELECT MAX(id) FROM ledger), 0),
       CAST(strftime('%s', 'now') AS INTEGER) * 1000
WHERE EXISTS (SELECT 1 FROM events) OR EXISTS (SELECT 1 FROM ledger);
-- Cash-outs changed outside the event log's order (a reprocessed event, a ledger link).
CREATE TABLE reconcile_queue (
    cashout_id     INTEGER PRIMARY KEY
);

CREATE TABLE reports (
    date          TEXT    PRIMARY KEY,
    final         INTEGER NOT NULL,
    rows          INTEGER NOT NULL,
    sha256        TEXT    NOT NULL,
    generated_at  INTEGER NOT NULL
);
"#;

/// One row rewritten by readiness checks: a real write (an empty transaction commits
/// even on a full disk or a read-only file).
/// Raw-body retention: how far (by `events.seq`) raw bodies and headers have been
/// cleared, so a run starts where the last one stopped instead of scanning the log.
/// (`auto_vacuum = INCREMENTAL` cannot be set by a migration on an existing database:
/// new databases get it when the writer opens them, existing ones after a `VACUUM`.)
const V_RETENTION: &str = r#"
CREATE TABLE retention_cursor (
    id                  INTEGER PRIMARY KEY CHECK (id = 1),
    cleared_through_seq INTEGER NOT NULL
);
"#;

/// The ops console's page loads as index ranges: cash-outs by provider and state in
/// creation order (the cash-out list merges these ranges, the overview counts in-flight
/// and stuck ones), a cash-out's alerts by subject, open alerts and mismatches and
/// quarantined events by provider.
const V_CONSOLE: &str = r#"
CREATE INDEX cashouts_by_provider_status_created ON cashouts (provider, status, created_at, id);
CREATE INDEX alerts_by_subject ON alerts (subject);
CREATE INDEX alerts_open_by_provider ON alerts (provider) WHERE resolved_at IS NULL;
CREATE INDEX mismatches_open_by_provider ON mismatches (provider) WHERE resolved_at IS NULL;
CREATE INDEX events_quarantined_by_provider ON events (provider) WHERE outcome = 'quarantined';
"#;

/// The replay cache leaves its table (one insert on a random page per signed webhook) for
/// the writer's memory (see `replay_index.rs`): each event keeps the nonce it claimed, and
/// the cache is read back from the recent events at start. The entries held now move onto
/// their events.
const V_REPLAY_NONCE_ON_EVENTS: &str = r#"
ALTER TABLE events ADD COLUMN replay_nonce TEXT;
UPDATE events SET replay_nonce = r.nonce
FROM replay_cache r
WHERE events.event_id = r.event_id AND events.provider = r.provider;
DROP TABLE replay_cache;
"#;

/// `cashouts_by_created` in ascending order (SQLite reads it backwards for the newest
/// first just as fast): a new cash-out is the index's greatest key, appended at its right
/// edge, where a full page splits 100/0; at the left edge of a descending index every split
/// was 50/50, leaving its pages half empty and writing twice as many of them.
const V_CREATED_ASCENDING: &str = r#"
DROP INDEX cashouts_by_created;
CREATE INDEX cashouts_by_created ON cashouts (created_at, id);
"#;

const V_HEARTBEAT: &str = r#"
CREATE TABLE heartbeat (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    written_at    INTEGER NOT NULL
);
"#;

/// Alerts that reach ops (SPEC §7): each alert's provider and how it is delivered
/// (individual, grouped, inhibited, or a group), the persisted outbox of signed webhook
/// deliveries (one `webhook_id` per delivery, kept across retries) and every attempt.
const V_ALERT_OUTBOX: &str = r#"
ALTER TABLE alerts ADD COLUMN provider TEXT;
ALTER TABLE alerts ADD COLUMN delivery TEXT NOT NULL DEFAULT 'individual';
-- Alerts raised before this migration name their provider first in the subject.
UPDATE alerts SET provider = substr(subject, 1, instr(subject, '/') - 1) WHERE instr(subject, '/') > 1;
CREATE INDEX alerts_by_provider ON alerts (provider, id);

CREATE TABLE alert_outbox (
    id              INTEGER PRIMARY KEY,
    alert_id        INTEGER NOT NULL REFERENCES alerts (id),
    webhook_id      TEXT    NOT NULL UNIQUE,
    status          TEXT    NOT NULL CHECK (status IN ('firing', 'resolved')),
    body            TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    leased_until    INTEGER,
    delivered_at    INTEGER,
    failed_at       INTEGER,
    last_error      TEXT
);
CREATE INDEX alert_outbox_due ON alert_outbox (next_attempt_at, id)
    WHERE delivered_at IS NULL AND failed_at IS NULL;
CREATE INDEX alert_outbox_by_alert ON alert_outbox (alert_id, id);

CREATE TABLE alert_delivery_attempts (
    id            INTEGER PRIMARY KEY,
    outbox_id     INTEGER NOT NULL REFERENCES alert_outbox (id),
    attempted_at  INTEGER NOT NULL,
    http_status   INTEGER,
    error         TEXT,
    duration_ms   INTEGER NOT NULL
);
CREATE INDEX alert_delivery_attempts_by_outbox ON alert_delivery_attempts (outbox_id, id);
"#;

#[cfg(test)]
mod tests {
    #[test]
    fn migrations_are_valid() {
        assert!(super::migrations().validate().is_ok());
    }
}
