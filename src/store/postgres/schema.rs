//! Versioned migrations of the PostgreSQL schema, embedded in the binary, applied in one
//! transaction under an advisory lock so instances starting together do not race.
//!
//! Version 1 is the SQLite schema's final shape (src/store/schema.rs, every migration
//! applied): the same tables, columns, checks, unique and partial indexes, with BIGINT for
//! integers and unix-millisecond times, BOOLEAN for flags, BYTEA for raw bodies and
//! identity columns for row ids (`BY DEFAULT`, so `copy-store` keeps the SQLite ids).
//! Later versions add what several instances need.

use sha2::{Digest, Sha256};

use super::from_postgres;
use crate::store::StoreError;

/// One migration. Never edit a released one: append a new one (its checksum is checked).
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

impl Migration {
    /// SHA-256 (hex) of its SQL, recorded when applied.
    pub fn checksum(&self) -> String {
        hex::encode(Sha256::digest(self.sql.as_bytes()))
    }
}

/// Every migration, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "book",
        sql: V1_BOOK,
    },
    Migration {
        version: 2,
        name: "instances",
        sql: V2_INSTANCES,
    },
    Migration {
        version: 3,
        name: "console",
        sql: V3_CONSOLE,
    },
    Migration {
        version: 4,
        name: "reconcile_horizon",
        sql: V4_RECONCILE_HORIZON,
    },
    Migration {
        version: 5,
        name: "request_slots",
        sql: V5_REQUEST_SLOTS,
    },
    Migration {
        version: 6,
        name: "quarantined by seq",
        sql: V6_QUARANTINED_BY_SEQ,
    },
    Migration {
        version: 7,
        name: "provider_signals",
        sql: V7_PROVIDER_SIGNALS,
    },
    Migration {
        version: 8,
        name: "keys in byte order",
        sql: V8_KEYS_IN_BYTE_ORDER,
    },
    Migration {
        version: 9,
        name: "replay nonce on events",
        sql: V9_REPLAY_NONCE_ON_EVENTS,
    },
];

/// The advisory lock key serializing migrations (any instance of any version).
pub const MIGRATION_LOCK: i64 = 0x6361_7368_6f75_7401; // "cashout" in ASCII, then 1

/// Applies the migrations not applied yet, in one transaction holding
/// [`MIGRATION_LOCK`]: a second instance starting at the same time waits for the first
/// one's commit, then finds nothing left to do. Refuses a database migrated by a newer
/// binary (an unknown version) or whose applied migration differs from the embedded one.
/// Returns the versions applied by this call.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<Vec<i64>, StoreError> {
    let tx = client.transaction().await.map_err(|e| from_postgres(&e))?;
    // Another instance's migration may take longer than the session's lock_timeout.
    tx.batch_execute("SET LOCAL lock_timeout = 0")
        .await
        .map_err(|e| from_postgres(&e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| from_postgres(&e))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version     BIGINT      PRIMARY KEY,
             name        TEXT        NOT NULL,
             checksum    TEXT        NOT NULL,
             applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(|e| from_postgres(&e))?;
    let rows = tx
        .query(
            "SELECT version, checksum FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(|e| from_postgres(&e))?;
    let mut applied_before = Vec::with_capacity(rows.len());
    for row in rows {
        let version: i64 = row.try_get(0).map_err(|e| from_postgres(&e))?;
        let checksum: String = row.try_get(1).map_err(|e| from_postgres(&e))?;
        match MIGRATIONS.iter().find(|m| m.version == version) {
            None => {
                return Err(refused(format!(
                    "the database has schema version {version}, unknown to this binary (a newer one migrated it)"
                )))
            }
            Some(known) if known.checksum() != checksum => {
                return Err(refused(format!(
                    "schema version {version} ({}) was applied from different SQL than this binary's",
                    known.name
                )))
            }
            Some(_) => applied_before.push(version),
        }
    }
    let mut applied = Vec::new();
    for migration in MIGRATIONS {
        if applied_before.contains(&migration.version) {
            continue;
        }
        tx.batch_execute(migration.sql)
            .await
            .map_err(|e| from_postgres(&e))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&migration.version, &migration.name, &migration.checksum()],
        )
        .await
        .map_err(|e| from_postgres(&e))?;
        applied.push(migration.version);
    }
    tx.commit().await.map_err(|e| from_postgres(&e))?;
    if !applied.is_empty() {
        tracing::info!(versions = ?applied, "postgres: migrations applied");
    }
    Ok(applied)
}

fn refused(reason: String) -> StoreError {
    StoreError::Open {
        path: "(PostgreSQL schema_migrations)".to_string(),
        reason,
    }
}

/// The SQLite book's final shape. Times are unix milliseconds (UTC), as in SQLite.
const V1_BOOK: &str = r#"
CREATE TABLE cashouts (
    id                   BIGINT  GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    provider             TEXT    NOT NULL,
    provider_ref         TEXT    NOT NULL,
    external_id          TEXT,
    status               TEXT    NOT NULL,
    held                 BOOLEAN NOT NULL DEFAULT FALSE,
    provider_status      TEXT,
    reason_code          TEXT,
    amount_minor         BIGINT,
    currency             TEXT,
    fee_minor            BIGINT,
    created_at           BIGINT  NOT NULL,
    provider_created_at  BIGINT,
    provider_updated_at  BIGINT,
    first_seen_at        BIGINT  NOT NULL,
    updated_at           BIGINT  NOT NULL,
    completed_at         BIGINT,
    webhook_count        BIGINT  NOT NULL DEFAULT 0,
    recovered_by_poll    BIGINT  NOT NULL DEFAULT 0,
    last_status_check_at BIGINT,
    method               TEXT,
    net_minor            BIGINT,
    -- A terminal state the provider reported against the book's (not applied), until a
    -- later report agrees with the book again.
    conflict_status      TEXT,
    -- When anything of the row last changed in the book.
    book_changed_at      BIGINT,
    UNIQUE (provider, provider_ref)
);
CREATE INDEX cashouts_by_external_id ON cashouts (provider, external_id) WHERE external_id IS NOT NULL;
CREATE INDEX cashouts_by_created ON cashouts (created_at DESC, id DESC);
CREATE INDEX cashouts_in_flight ON cashouts (provider, status, updated_at);

CREATE TABLE events (
    seq                   BIGINT  GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    event_id              TEXT    NOT NULL UNIQUE,
    cashout_id            BIGINT  REFERENCES cashouts (id),
    provider              TEXT    NOT NULL,
    source                TEXT    NOT NULL CHECK (source IN ('webhook', 'poll', 'ledger')),
    dedup_key             TEXT,
    body_sha256           TEXT,
    raw_body              BYTEA,
    headers               TEXT,
    secret_index          BIGINT,
    outcome               TEXT    NOT NULL,
    error                 TEXT,
    provider_ref          TEXT,
    raw_status            TEXT,
    reason_code           TEXT,
    status                TEXT,
    applied               BOOLEAN NOT NULL DEFAULT FALSE,
    received_at           BIGINT  NOT NULL,
    -- When the event's effect entered the book, and the cash-out right after it (a day's
    -- report reads the latest snapshot before the day's end).
    book_at               BIGINT,
    after_status          TEXT,
    after_provider_status TEXT,
    after_external_id     TEXT,
    after_amount_minor    BIGINT,
    after_currency        TEXT,
    after_fee_minor       BIGINT,
    after_net_minor       BIGINT,
    after_created_at      BIGINT,
    after_updated_at      BIGINT,
    after_completed_at    BIGINT,
    after_webhooks        BIGINT,
    after_recovered       BIGINT
);
CREATE UNIQUE INDEX events_dedup ON events (provider, dedup_key) WHERE dedup_key IS NOT NULL;
CREATE INDEX events_by_cashout ON events (cashout_id, seq);
CREATE INDEX events_unlinked ON events (provider, provider_ref) WHERE cashout_id IS NULL;
CREATE INDEX events_quarantined ON events (outcome) WHERE outcome = 'quarantined';
CREATE INDEX events_by_book ON events (book_at, cashout_id) WHERE after_status IS NOT NULL;

-- nonce = zero-padded signed timestamp ':' SHA-256 of the signature.
CREATE TABLE replay_cache (
    provider     TEXT    NOT NULL,
    nonce        TEXT    NOT NULL,
    body_sha256  TEXT    NOT NULL,
    event_id     TEXT    NOT NULL,
    seen_at      BIGINT  NOT NULL,
    PRIMARY KEY (provider, nonce)
);
CREATE INDEX replay_cache_by_age ON replay_cache (seen_at);

CREATE TABLE status_fetch_queue (
    provider        TEXT    NOT NULL,
    provider_ref    TEXT    NOT NULL,
    reason          TEXT    NOT NULL,
    requested_at    BIGINT  NOT NULL,
    attempts        BIGINT  NOT NULL DEFAULT 0,
    next_attempt_at BIGINT  NOT NULL,
    PRIMARY KEY (provider, provider_ref)
);

-- subject: the cash-out's provider_ref, or `ext:<external_id>` for a ledger entry the
-- provider does not know.
CREATE TABLE mismatches (
    id            BIGINT  GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    kind          TEXT    NOT NULL,
    provider      TEXT    NOT NULL,
    provider_ref  TEXT,
    external_id   TEXT,
    detail        TEXT    NOT NULL,
    opened_at     BIGINT  NOT NULL,
    resolved_at   BIGINT,
    subject       TEXT
);
CREATE UNIQUE INDEX mismatches_open ON mismatches (kind, provider, subject) WHERE resolved_at IS NULL;
CREATE INDEX mismatches_by_subject ON mismatches (provider, subject);
CREATE INDEX mismatches_by_opened ON mismatches (opened_at);

CREATE TABLE alerts (
    id            BIGINT  GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    kind          TEXT    NOT NULL,
    subject       TEXT    NOT NULL,
    severity      TEXT    NOT NULL,
    text          TEXT    NOT NULL,
    opened_at     BIGINT  NOT NULL,
    last_sent_at  BIGINT,
    resolved_at   BIGINT,
    provider      TEXT,
    delivery      TEXT    NOT NULL DEFAULT 'individual'
);
CREATE UNIQUE INDEX alerts_open ON alerts (kind, subject) WHERE resolved_at IS NULL;
CREATE INDEX alerts_by_provider ON alerts (provider, id);

CREATE TABLE poll_watermarks (
    provider      TEXT    PRIMARY KEY,
    watermark     BIGINT  NOT NULL,
    updated_at    BIGINT  NOT NULL
);

CREATE TABLE ledger (
    id            BIGINT  GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    provider      TEXT    NOT NULL,
    external_id   TEXT    NOT NULL,
    amount_minor  BIGINT  NOT NULL,
    currency      TEXT    NOT NULL,
    provider_ref  TEXT,
    created_at    BIGINT  NOT NULL,
    registered_at BIGINT  NOT NULL,
    UNIQUE (provider, external_id)
);
CREATE INDEX ledger_by_ref ON ledger (provider, provider_ref);
CREATE INDEX ledger_by_created ON ledger (created_at);
CREATE INDEX ledger_by_registered ON ledger (registered_at);

-- Where the continuous pass stopped. (SQLite's migration seeds it for a book that
-- existed before reconciliation; a new PostgreSQL database is empty, and `copy-store`
-- copies the row.)
CREATE TABLE reconcile_cursor (
    id             BIGINT  PRIMARY KEY CHECK (id = 1),
    event_seq      BIGINT  NOT NULL,
    ledger_id      BIGINT  NOT NULL,
    passed_at      BIGINT  NOT NULL
);
CREATE TABLE reconcile_queue (
    cashout_id     BIGINT  PRIMARY KEY
);

CREATE TABLE reports (
    date          TEXT    PRIMARY KEY,
    final         BOOLEAN NOT NULL,
    rows          BIGINT  NOT NULL,
    sha256        TEXT    NOT NULL,
    generated_at  BIGINT  NOT NULL
);

CREATE TABLE retention_cursor (
    id                  BIGINT  PRIMARY KEY CHECK (id = 1),
    cleared_through_seq BIGINT  NOT NULL
);

CREATE TABLE heartbeat (
    id            BIGINT  PRIMARY KEY CHECK (id = 1),
    written_at    BIGINT  NOT NULL
);

CREATE TABLE alert_outbox (
    id              BIGINT  GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    alert_id        BIGINT  NOT NULL REFERENCES alerts (id),
    webhook_id      TEXT    NOT NULL UNIQUE,
    status          TEXT    NOT NULL CHECK (status IN ('firing', 'resolved')),
    body            TEXT    NOT NULL,
    created_at      BIGINT  NOT NULL,
    attempts        BIGINT  NOT NULL DEFAULT 0,
    next_attempt_at BIGINT  NOT NULL,
    leased_until    BIGINT,
    delivered_at    BIGINT,
    failed_at       BIGINT,
    last_error      TEXT
);
CREATE INDEX alert_outbox_due ON alert_outbox (next_attempt_at, id)
    WHERE delivered_at IS NULL AND failed_at IS NULL;
CREATE INDEX alert_outbox_by_alert ON alert_outbox (alert_id, id);

CREATE TABLE alert_delivery_attempts (
    id            BIGINT  GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    outbox_id     BIGINT  NOT NULL REFERENCES alert_outbox (id),
    attempted_at  BIGINT  NOT NULL,
    http_status   BIGINT,
    error         TEXT,
    duration_ms   BIGINT  NOT NULL
);
CREATE INDEX alert_delivery_attempts_by_outbox ON alert_delivery_attempts (outbox_id, id);
"#;

/// Several instances on one database: named leases with fencing tokens (a job held by
/// one instance at a time, taken over when its holder stops renewing), and claims on the
/// status-fetch queue's rows (one claimer per row, retaken after `claimed_until`).
/// Lease and claim times are the server's clock (`now()`), so instances' clocks may differ.
const V2_INSTANCES: &str = r#"
CREATE TABLE leases (
    name        TEXT        PRIMARY KEY,
    holder      TEXT        NOT NULL,
    -- Incremented on every takeover, never reset (a released lease keeps its row).
    token       BIGINT      NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL
);

ALTER TABLE status_fetch_queue ADD COLUMN claimed_by TEXT;
ALTER TABLE status_fetch_queue ADD COLUMN claimed_until TIMESTAMPTZ;
CREATE INDEX status_fetch_queue_due ON status_fetch_queue (provider, next_attempt_at, requested_at);
"#;

/// The ops console's indexes (SQLite's `V_CONSOLE`): page loads read index ranges only.
const V3_CONSOLE: &str = r#"
CREATE INDEX cashouts_by_provider_status_created ON cashouts (provider, status, created_at, id);
CREATE INDEX alerts_by_subject ON alerts (subject);
CREATE INDEX alerts_open_by_provider ON alerts (provider) WHERE resolved_at IS NULL;
CREATE INDEX mismatches_open_by_provider ON mismatches (provider) WHERE resolved_at IS NULL;
CREATE INDEX events_quarantined_by_provider ON events (provider) WHERE outcome = 'quarantined';
"#;

/// The continuous pass follows changes by transaction id, not by row id (see
/// [`super::reconcile`]): every row it follows records the id of the transaction that
/// wrote it, the cursor is a transaction-id horizon, and a queued cash-out is one row per
/// queueing (no primary key: a cash-out queued again while a pass runs keeps its newer row
/// when the pass drops the ones it examined). Rows existing before this migration carry its
/// transaction's id.
const V4_RECONCILE_HORIZON: &str = r#"
ALTER TABLE events ADD COLUMN change_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX events_by_change_xid ON events (change_xid);
ALTER TABLE ledger ADD COLUMN change_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX ledger_by_change_xid ON ledger (change_xid);
ALTER TABLE reconcile_queue DROP CONSTRAINT reconcile_queue_pkey;
ALTER TABLE reconcile_queue ADD COLUMN queued_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX reconcile_queue_by_xid ON reconcile_queue (queued_xid);
-- NULL: no pass on PostgreSQL yet (the first one reads every change).
ALTER TABLE reconcile_cursor ADD COLUMN horizon xid8;
"#;

/// The console's quarantined-events page, newest first below a `seq`: the quarantined
/// events' own ordered range. (SQLite's `events_quarantined (outcome)` is ordered by rowid
/// = `seq` within the key; a PostgreSQL b-tree is not, so the page would sort them all.)
const V6_QUARANTINED_BY_SEQ: &str = r#"
CREATE INDEX events_quarantined_by_seq ON events (seq) WHERE outcome = 'quarantined';
"#;

/// `max_rps` across instances: each provider's next free request slot, reserved by one
/// atomic `UPDATE` (see [`super::rate`]). Server time, so instances' clocks may differ.
const V5_REQUEST_SLOTS: &str = r#"
CREATE TABLE provider_request_slots (
    provider     TEXT        PRIMARY KEY,
    next_slot_at TIMESTAMPTZ NOT NULL
);
"#;

/// The alert signals each instance keeps in memory, published about once a second (see
/// [`super::signals`]): one row per instance and provider, kept when the instance stops
/// (its last webhook stays a fact); `published_at` is the server's clock.
const V7_PROVIDER_SIGNALS: &str = r#"
CREATE TABLE provider_signals (
    instance                  TEXT        NOT NULL,
    provider                  TEXT        NOT NULL,
    last_webhook_at           BIGINT,
    last_poll_at              BIGINT,
    last_poll_ok_at           BIGINT,
    consecutive_poll_failures BIGINT,
    last_poll_error           TEXT,
    rejections_last_minute    BIGINT,
    rejections_last_hour      BIGINT      NOT NULL,
    published_at              TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (instance, provider)
);
"#;

/// The text columns the book's indexes hold are compared byte by byte (`COLLATE "C"`),
/// whatever the database's default collation: the order SQLite's `BINARY` and Rust give
/// and the queries' `COLLATE "C"` already asked for, and index look-ups that compare
/// bytes instead of calling the locale's collation. Under `bench-ingest` on a `C.UTF-8`
/// database, one instance went from 11.8k to 13k webhooks/s. Equality is unchanged (every
/// collation here is deterministic), so no key, unique or not, changes meaning; the
/// indexes on these columns are rebuilt.
/// The SQLite book keeps each signed webhook's replay nonce on its event (its replay cache
/// lives in the writer's memory). PostgreSQL keeps the shared `replay_cache` table that
/// several instances claim in, so it leaves this column empty: it is here so that both
/// books hold the same columns, and `copy-store` fills `replay_cache` from a copied
/// book's nonces.
const V9_REPLAY_NONCE_ON_EVENTS: &str = r#"
ALTER TABLE events ADD COLUMN replay_nonce TEXT COLLATE "C";
"#;

const V8_KEYS_IN_BYTE_ORDER: &str = r#"
ALTER TABLE cashouts
    ALTER COLUMN provider TYPE TEXT COLLATE "C",
    ALTER COLUMN provider_ref TYPE TEXT COLLATE "C",
    ALTER COLUMN external_id TYPE TEXT COLLATE "C",
    ALTER COLUMN status TYPE TEXT COLLATE "C";
ALTER TABLE events
    ALTER COLUMN event_id TYPE TEXT COLLATE "C",
    ALTER COLUMN provider TYPE TEXT COLLATE "C",
    ALTER COLUMN dedup_key TYPE TEXT COLLATE "C",
    ALTER COLUMN provider_ref TYPE TEXT COLLATE "C",
    ALTER COLUMN outcome TYPE TEXT COLLATE "C";
ALTER TABLE replay_cache
    ALTER COLUMN provider TYPE TEXT COLLATE "C",
    ALTER COLUMN nonce TYPE TEXT COLLATE "C";
ALTER TABLE ledger
    ALTER COLUMN provider TYPE TEXT COLLATE "C",
    ALTER COLUMN external_id TYPE TEXT COLLATE "C",
    ALTER COLUMN provider_ref TYPE TEXT COLLATE "C";
ALTER TABLE status_fetch_queue
    ALTER COLUMN provider TYPE TEXT COLLATE "C",
    ALTER COLUMN provider_ref TYPE TEXT COLLATE "C";
ALTER TABLE mismatches
    ALTER COLUMN kind TYPE TEXT COLLATE "C",
    ALTER COLUMN provider TYPE TEXT COLLATE "C",
    ALTER COLUMN subject TYPE TEXT COLLATE "C";
ALTER TABLE alerts
    ALTER COLUMN kind TYPE TEXT COLLATE "C",
    ALTER COLUMN subject TYPE TEXT COLLATE "C",
    ALTER COLUMN provider TYPE TEXT COLLATE "C";
ALTER TABLE alert_outbox ALTER COLUMN webhook_id TYPE TEXT COLLATE "C";
ALTER TABLE reports ALTER COLUMN date TYPE TEXT COLLATE "C";
ALTER TABLE leases ALTER COLUMN name TYPE TEXT COLLATE "C";
ALTER TABLE poll_watermarks ALTER COLUMN provider TYPE TEXT COLLATE "C";
ALTER TABLE provider_request_slots ALTER COLUMN provider TYPE TEXT COLLATE "C";
ALTER TABLE provider_signals
    ALTER COLUMN instance TYPE TEXT COLLATE "C",
    ALTER COLUMN provider TYPE TEXT COLLATE "C";
"#;
