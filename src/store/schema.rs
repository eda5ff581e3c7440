//! Versioned migrations of the SQLite schema, embedded in the binary.

use rusqlite::Transaction;
use rusqlite_migration::{HookResult, Migrations, M};

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
        M::up_with_hook("", source_check_without_in_list),
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

/// `events.source`'s check as written in V1.
const SOURCE_CHECK_IN_LIST: &str = "CHECK (source IN ('webhook', 'poll', 'ledger'))";
/// The same rule without an `IN` list.
const SOURCE_CHECK_COMPARISONS: &str =
    "CHECK (source = 'webhook' OR source = 'poll' OR source = 'ledger')";

/// Rewrites `events.source`'s check from an `IN` list to comparisons. SQLite checks
/// `x IN (three or more constants)` by building a temporary B-tree of the constants on
/// every execution of the statement: once per event insert, about 4 % of the writer's
/// time under load. The rule is unchanged, and so is every row: this is the kind of change
/// SQLite's documentation allows through `writable_schema` (ALTER TABLE, "making other
/// kinds of table schema changes"): the table's text in `sqlite_schema` is rewritten and
/// the schema version bumped in one transaction, so every connection reloads it.
/// (SQLite's procedure also ends with an `integrity_check`: the tests run it; at start-up
/// it would read the whole book.)
fn source_check_without_in_list(tx: &Transaction) -> HookResult {
    let version: i64 = tx.query_row("PRAGMA schema_version", [], |row| row.get(0))?;
    tx.pragma_update(None, "writable_schema", true)?;
    let rewritten = tx.execute(
        "UPDATE sqlite_schema SET sql = replace(sql, ?1, ?2)
         WHERE type = 'table' AND name = 'events' AND instr(sql, ?1) > 0",
        [SOURCE_CHECK_IN_LIST, SOURCE_CHECK_COMPARISONS],
    )?;
    if rewritten > 0 {
        tx.pragma_update(None, "schema_version", version + 1)?;
    }
    // Off, and this connection's parsed schema reloaded (it is the writer's).
    tx.execute_batch("PRAGMA writable_schema = RESET")?;
    Ok(())
}

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
    use rusqlite::Connection;

    #[test]
    fn migrations_are_valid() {
        assert!(super::migrations().validate().is_ok());
    }

    fn migrated() -> Connection {
        let mut connection = Connection::open_in_memory().expect("open");
        super::migrations()
            .to_latest(&mut connection)
            .expect("migrate");
        connection
    }

    fn insert_event(
        connection: &Connection,
        event_id: &str,
        source: &str,
    ) -> rusqlite::Result<usize> {
        connection.execute(
            "INSERT INTO events (event_id, provider, source, outcome, received_at)
             VALUES (?1, 'fiserv', ?2, 'accepted', 1)",
            [event_id, source],
        )
    }

    #[test]
    fn an_event_insert_builds_no_temporary_b_tree_and_still_checks_its_source() {
        let connection = migrated();
        let opcodes = connection
            .prepare(
                "EXPLAIN INSERT INTO events (event_id, provider, source, outcome, received_at)
                 VALUES ('e', 'fiserv', 'webhook', 'accepted', 1)",
            )
            .expect("explain")
            .query_map([], |row| row.get::<_, String>(1))
            .expect("opcodes")
            .collect::<Result<Vec<_>, _>>()
            .expect("rows");
        assert!(
            !opcodes.iter().any(|op| op == "OpenEphemeral"),
            "{opcodes:?}"
        );
        for (index, source) in ["webhook", "poll", "ledger"].into_iter().enumerate() {
            insert_event(&connection, &format!("e{index}"), source).expect(source);
        }
        let refused = insert_event(&connection, "e9", "email").expect_err("unknown source");
        assert!(
            refused.to_string().contains("CHECK constraint failed"),
            "{refused}"
        );
        let check: String = connection
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .expect("integrity_check");
        assert_eq!(check, "ok");
    }

    #[test]
    fn a_book_migrated_before_the_rewrite_keeps_its_events_and_gets_the_new_check() {
        let mut connection = Connection::open_in_memory().expect("open");
        let before = super::migrations();
        before.to_version(&mut connection, 9).expect("to version 9");
        insert_event(&connection, "old", "poll").expect("old event");
        super::migrations()
            .to_latest(&mut connection)
            .expect("migrate");
        let sql: String = connection
            .query_row(
                "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'events'",
                [],
                |row| row.get(0),
            )
            .expect("events sql");
        assert!(sql.contains(super::SOURCE_CHECK_COMPARISONS), "{sql}");
        assert!(!sql.contains(super::SOURCE_CHECK_IN_LIST), "{sql}");
        let kept: String = connection
            .query_row(
                "SELECT source FROM events WHERE event_id = 'old'",
                [],
                |row| row.get(0),
            )
            .expect("old event");
        assert_eq!(kept, "poll");
        assert!(insert_event(&connection, "bad", "email").is_err());
    }
}
