//! `copy-store --to postgres`: copies every table of a SQLite book into an empty
//! PostgreSQL database in one transaction, then verifies each table's row count and a
//! SHA-256 over its canonical rows in key order, read back from PostgreSQL, before
//! committing. Any difference rolls everything back. PostgreSQL's `replay_cache` (the
//! SQLite book keeps it in memory) is filled from the events' replay nonces.
//!
//! The SQLite side is read in one read transaction (one consistent snapshot) on a
//! blocking thread and streamed in batches into `COPY … FROM STDIN (FORMAT binary)`.
//! Values are converted strictly: an integer flag must be 0 or 1, text must be UTF-8, a
//! value of the wrong kind (SQLite does not enforce column types) stops the copy naming
//! its table, row and column.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use futures_util::TryStreamExt;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use super::{from_postgres, PgStore};
use crate::store::StoreError;

/// A table of the book, its key (the copy and the checksum go in key order) and its
/// identity column (whose sequence continues after the copied ids).
#[derive(Debug, Clone, Copy)]
pub struct BookTable {
    pub name: &'static str,
    pub key: &'static [&'static str],
    pub identity: Option<&'static str>,
}

const fn table(
    name: &'static str,
    key: &'static [&'static str],
    identity: Option<&'static str>,
) -> BookTable {
    BookTable {
        name,
        key,
        identity,
    }
}

/// Every table of the SQLite book, parents before the tables that reference them.
pub const BOOK_TABLES: &[BookTable] = &[
    table("cashouts", &["id"], Some("id")),
    table("events", &["seq"], Some("seq")),
    table("status_fetch_queue", &["provider", "provider_ref"], None),
    table("mismatches", &["id"], Some("id")),
    table("alerts", &["id"], Some("id")),
    table("poll_watermarks", &["provider"], None),
    table("ledger", &["id"], Some("id")),
    table("reconcile_cursor", &["id"], None),
    table("reconcile_queue", &["cashout_id"], None),
    table("reports", &["date"], None),
    table("retention_cursor", &["id"], None),
    table("heartbeat", &["id"], None),
    table("alert_outbox", &["id"], Some("id")),
    table("alert_delivery_attempts", &["id"], Some("id")),
];

/// PostgreSQL columns that several instances need and a SQLite book does not have (left
/// at their defaults). The copied rows' `change_xid`/`queued_xid` are the copy's
/// transaction id and the copied cursor has no `horizon`: the first continuous pass on
/// PostgreSQL re-examines every copied change once (its plan is idempotent).
const INSTANCE_COLUMNS: &[(&str, &str)] = &[
    ("status_fetch_queue", "claimed_by"),
    ("status_fetch_queue", "claimed_until"),
    ("events", "change_xid"),
    ("ledger", "change_xid"),
    ("reconcile_queue", "queued_xid"),
    ("reconcile_cursor", "horizon"),
];

/// How far back from the book's newest event `copy-store` fills PostgreSQL's replay cache:
/// a week, beyond any replay window (twice the longest signature tolerance).
const REPLAY_HORIZON_MS: i64 = 7 * 24 * 3_600_000;

/// Rows sent from the SQLite reader to the copy at a time.
const BATCH_ROWS: usize = 1000;

/// Why the copy stopped (nothing was committed).
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("cannot read the SQLite book {path}: {reason}")]
    Sqlite { path: PathBuf, reason: String },
    #[error("the PostgreSQL database is not empty: table {table} has rows (copy-store fills an empty database only)")]
    NotEmpty { table: &'static str },
    #[error("table {table}: {reason}")]
    Schema { table: &'static str, reason: String },
    #[error("table {table}, row {key}: column {column}: {reason}")]
    Value {
        table: &'static str,
        key: String,
        column: String,
        reason: String,
    },
    #[error("table {table}: the copy differs from the SQLite book: {sqlite_rows} rows (sha256 {sqlite_sha256}) read, {postgres_rows} rows (sha256 {postgres_sha256}) in PostgreSQL; nothing was committed")]
    Verification {
        table: &'static str,
        sqlite_rows: u64,
        sqlite_sha256: String,
        postgres_rows: u64,
        postgres_sha256: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One copied and verified table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopiedTable {
    pub table: &'static str,
    pub rows: u64,
    /// SHA-256 (hex) of its canonical rows in key order (equal on both sides).
    pub sha256: String,
}

/// A column's kind in PostgreSQL (the types the book's schema uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Bool,
    Text,
    Bytes,
}

impl Kind {
    fn from_data_type(data_type: &str) -> Option<Kind> {
        match data_type {
            "bigint" => Some(Kind::Int),
            "boolean" => Some(Kind::Bool),
            "text" => Some(Kind::Text),
            "bytea" => Some(Kind::Bytes),
            _ => None,
        }
    }

    fn pg_type(self) -> Type {
        match self {
            Kind::Int => Type::INT8,
            Kind::Bool => Type::BOOL,
            Kind::Text => Type::TEXT,
            Kind::Bytes => Type::BYTEA,
        }
    }
}

/// One value, typed for PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cell {
    Int(Option<i64>),
    Bool(Option<bool>),
    Text(Option<String>),
    Bytes(Option<Vec<u8>>),
}

impl Cell {
    fn sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Cell::Int(v) => v,
            Cell::Bool(v) => v,
            Cell::Text(v) => v,
            Cell::Bytes(v) => v,
        }
    }

    /// The canonical encoding hashed on both sides: a tag, then the value (integers and
    /// flags alike as 8 big-endian bytes, text and bytes length-prefixed).
    fn hash_into(&self, hasher: &mut Sha256) {
        let int = |hasher: &mut Sha256, v: i64| {
            hasher.update([1u8]);
            hasher.update(v.to_be_bytes());
        };
        let bytes = |hasher: &mut Sha256, tag: u8, v: &[u8]| {
            hasher.update([tag]);
            hasher.update((v.len() as u64).to_be_bytes());
            hasher.update(v);
        };
        match self {
            Cell::Int(None) | Cell::Bool(None) | Cell::Text(None) | Cell::Bytes(None) => {
                hasher.update([0u8])
            }
            Cell::Int(Some(v)) => int(hasher, *v),
            Cell::Bool(Some(v)) => int(hasher, i64::from(*v)),
            Cell::Text(Some(v)) => bytes(hasher, 3, v.as_bytes()),
            Cell::Bytes(Some(v)) => bytes(hasher, 4, v),
        }
    }
}

/// Row count and SHA-256 of a table's canonical rows.
#[derive(Default)]
struct TableHash {
    rows: u64,
    sha: Sha256,
}

impl TableHash {
    fn add(&mut self, row: &[Cell]) {
        self.rows += 1;
        for cell in row {
            cell.hash_into(&mut self.sha);
        }
    }

    fn finish(self) -> (u64, String) {
        (self.rows, hex::encode(self.sha.finalize()))
    }
}

/// A table's plan: the columns both sides share, with their PostgreSQL kinds.
#[derive(Debug, Clone)]
struct Plan {
    table: BookTable,
    columns: Vec<(String, Kind)>,
}

impl Plan {
    fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `ORDER BY` of the key; text in byte order (SQLite's BINARY collation).
    fn order_by(&self, postgres: bool) -> String {
        self.table
            .key
            .iter()
            .map(|key| {
                let text = self
                    .columns
                    .iter()
                    .any(|(name, kind)| name == key && *kind == Kind::Text);
                if postgres && text {
                    format!("{key} COLLATE \"C\"")
                } else {
                    (*key).to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What the SQLite reader sends.
enum Message {
    Rows(usize, Vec<Vec<Cell>>),
    Done(usize, u64, String),
    Failed(CopyError),
}

/// Copies the SQLite book at `sqlite_path` into `postgres` (migrated here; it must hold no
/// book rows), verifies every table, and commits. The caller holds the SQLite store's
/// lock, so no daemon writes to the book meanwhile.
pub async fn copy_sqlite_book(
    sqlite_path: &Path,
    postgres: &PgStore,
) -> Result<Vec<CopiedTable>, CopyError> {
    if !sqlite_path.is_file() {
        return Err(CopyError::Sqlite {
            path: sqlite_path.to_path_buf(),
            reason: "no such file".to_string(),
        });
    }
    postgres.migrate().await?;
    let mut client = postgres.client().await?;
    let tx = client.transaction().await.map_err(|e| from_postgres(&e))?;

    // Each table's PostgreSQL columns, with their kind when the copy can fill them.
    let mut pg_kinds: Vec<HashMap<String, Option<Kind>>> = Vec::with_capacity(BOOK_TABLES.len());
    for table in BOOK_TABLES {
        let not_empty: bool = tx
            .query_one(
                &format!("SELECT EXISTS (SELECT 1 FROM {})", table.name),
                &[],
            )
            .await
            .map_err(|e| from_postgres(&e))?
            .get(0);
        if not_empty {
            return Err(CopyError::NotEmpty { table: table.name });
        }
        let mut kinds = HashMap::new();
        for row in tx
            .query(
                "SELECT column_name::TEXT, data_type::TEXT FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = $1",
                &[&table.name],
            )
            .await
            .map_err(|e| from_postgres(&e))?
        {
            let name: String = row.get(0);
            let data_type: String = row.get(1);
            kinds.insert(name, Kind::from_data_type(&data_type));
        }
        pg_kinds.push(kinds);
    }

    let (sender, mut receiver) = mpsc::channel::<Message>(4);
    let path = sqlite_path.to_path_buf();
    let reader = tokio::task::spawn_blocking(move || read_book(&path, pg_kinds, sender));
    // The reader returns its plans (the columns each table copies), then streams rows.
    let plans = match reader.await {
        Ok(Ok(plans)) => plans,
        Ok(Err(err)) => return Err(err),
        Err(err) => {
            return Err(CopyError::Sqlite {
                path: sqlite_path.to_path_buf(),
                reason: format!("the reader stopped: {err}"),
            })
        }
    };
    let mut read: Vec<Option<(u64, String)>> = vec![None; plans.len()];
    let mut writers: Vec<Option<Pin<Box<BinaryCopyInWriter>>>> =
        (0..plans.len()).map(|_| None).collect();
    while let Some(message) = receiver.recv().await {
        match message {
            Message::Failed(err) => return Err(err),
            Message::Rows(index, rows) => {
                if writers[index].is_none() {
                    let plan = &plans[index];
                    let sink = tx
                        .copy_in(&format!(
                            "COPY {} ({}) FROM STDIN (FORMAT binary)",
                            plan.table.name,
                            plan.column_list()
                        ))
                        .await
                        .map_err(|e| from_postgres(&e))?;
                    let types: Vec<Type> = plan.columns.iter().map(|(_, k)| k.pg_type()).collect();
                    writers[index] = Some(Box::pin(BinaryCopyInWriter::new(sink, &types)));
                }
                if let Some(writer) = writers[index].as_mut() {
                    for row in &rows {
                        let values: Vec<&(dyn ToSql + Sync)> = row.iter().map(Cell::sql).collect();
                        writer
                            .as_mut()
                            .write(&values)
                            .await
                            .map_err(|e| from_postgres(&e))?;
                    }
                }
            }
            Message::Done(index, rows, sha256) => {
                if let Some(mut writer) = writers[index].take() {
                    writer
                        .as_mut()
                        .finish()
                        .await
                        .map_err(|e| from_postgres(&e))?;
                }
                read[index] = Some((rows, sha256));
            }
        }
    }

    let mut copied = Vec::with_capacity(plans.len());
    for (plan, read) in plans.iter().zip(read) {
        let Some((sqlite_rows, sqlite_sha256)) = read else {
            return Err(CopyError::Sqlite {
                path: sqlite_path.to_path_buf(),
                reason: format!("the reader stopped before table {}", plan.table.name),
            });
        };
        if let Some(identity) = plan.table.identity {
            tx.execute(
                &format!(
                    "SELECT setval(pg_get_serial_sequence('{0}', '{1}'), COALESCE(MAX({1}), 0) + 1, false) FROM {0}",
                    plan.table.name, identity
                ),
                &[],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        }
        let (postgres_rows, postgres_sha256) = hash_postgres_table(&tx, plan).await?;
        if (postgres_rows, &postgres_sha256) != (sqlite_rows, &sqlite_sha256) {
            return Err(CopyError::Verification {
                table: plan.table.name,
                sqlite_rows,
                sqlite_sha256,
                postgres_rows,
                postgres_sha256,
            });
        }
        copied.push(CopiedTable {
            table: plan.table.name,
            rows: sqlite_rows,
            sha256: sqlite_sha256,
        });
    }
    // The SQLite book keeps its replay cache in memory and each nonce on its event:
    // PostgreSQL's shared cache is filled from the nonces of the book's last
    // [`REPLAY_HORIZON_MS`] (older ones are past any replay window; the daemons prune the
    // rest by age as usual).
    tx.execute(
        "INSERT INTO replay_cache (provider, nonce, body_sha256, event_id, seen_at)
         SELECT provider, replay_nonce, body_sha256, event_id, received_at FROM events
         WHERE replay_nonce IS NOT NULL AND body_sha256 IS NOT NULL
           AND received_at >= (SELECT MAX(received_at) FROM events) - $1
         ON CONFLICT (provider, nonce) DO NOTHING",
        &[&REPLAY_HORIZON_MS],
    )
    .await
    .map_err(|e| from_postgres(&e))?;
    tx.commit().await.map_err(|e| from_postgres(&e))?;
    Ok(copied)
}

/// Row count and checksum of a table as PostgreSQL holds it, streamed in key order.
async fn hash_postgres_table(
    tx: &tokio_postgres::Transaction<'_>,
    plan: &Plan,
) -> Result<(u64, String), CopyError> {
    let sql = format!(
        "SELECT {} FROM {} ORDER BY {}",
        plan.column_list(),
        plan.table.name,
        plan.order_by(true)
    );
    let stream = tx
        .query_raw(&sql, std::iter::empty::<&(dyn ToSql + Sync)>())
        .await
        .map_err(|e| from_postgres(&e))?;
    futures_util::pin_mut!(stream);
    let mut hash = TableHash::default();
    let mut cells = Vec::with_capacity(plan.columns.len());
    while let Some(row) = stream.try_next().await.map_err(|e| from_postgres(&e))? {
        cells.clear();
        for (index, (_, kind)) in plan.columns.iter().enumerate() {
            let cell = match kind {
                Kind::Int => row.try_get(index).map(Cell::Int),
                Kind::Bool => row.try_get(index).map(Cell::Bool),
                Kind::Text => row.try_get(index).map(Cell::Text),
                Kind::Bytes => row.try_get(index).map(Cell::Bytes),
            }
            .map_err(|e| from_postgres(&e))?;
            cells.push(cell);
        }
        hash.add(&cells);
    }
    Ok(hash.finish())
}

/// Plans every table against SQLite's columns, then (on its own thread, in one read
/// transaction) streams each table's rows in key order, with its count and checksum.
/// Returns the plans as soon as they are made; the rows follow on `sender`.
fn read_book(
    path: &Path,
    pg_kinds: Vec<HashMap<String, Option<Kind>>>,
    sender: mpsc::Sender<Message>,
) -> Result<Vec<Plan>, CopyError> {
    let sqlite_error = |err: rusqlite::Error| CopyError::Sqlite {
        path: path.to_path_buf(),
        reason: err.to_string(),
    };
    let connection = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sqlite_error)?;
    let mut plans = Vec::with_capacity(BOOK_TABLES.len());
    for (table, kinds) in BOOK_TABLES.iter().zip(&pg_kinds) {
        let columns: Vec<String> = connection
            .prepare(&format!(
                "SELECT name FROM pragma_table_info('{}')",
                table.name
            ))
            .and_then(|mut statement| {
                statement
                    .query_map([], |row| row.get(0))?
                    .collect::<Result<_, _>>()
            })
            .map_err(sqlite_error)?;
        if columns.is_empty() {
            return Err(CopyError::Schema {
                table: table.name,
                reason: "missing in the SQLite book (migrate it first: start `serve` once with this binary)".to_string(),
            });
        }
        let mut planned = Vec::with_capacity(columns.len());
        for column in &columns {
            let kind = match kinds.get(column) {
                Some(Some(kind)) => *kind,
                Some(None) => {
                    return Err(CopyError::Schema {
                        table: table.name,
                        reason: format!(
                            "column {column} has a PostgreSQL type the copy does not handle"
                        ),
                    })
                }
                None => {
                    return Err(CopyError::Schema {
                        table: table.name,
                        reason: format!(
                            "column {column} of the SQLite book has no PostgreSQL counterpart"
                        ),
                    })
                }
            };
            planned.push((column.clone(), kind));
        }
        // A book from an older binary lacks columns its migrations would fill in.
        let mut missing: Vec<&String> = kinds
            .keys()
            .filter(|name| {
                !columns.contains(name) && !INSTANCE_COLUMNS.contains(&(table.name, name.as_str()))
            })
            .collect();
        missing.sort();
        if !missing.is_empty() {
            return Err(CopyError::Schema {
                table: table.name,
                reason: format!(
                    "the SQLite book lacks {missing:?} (an older schema: start `serve` once with this binary to migrate it)"
                ),
            });
        }
        plans.push(Plan {
            table: *table,
            columns: planned,
        });
    }
    let streamed = plans.clone();
    std::thread::spawn(move || {
        if let Err(err) = stream_book(&connection, &streamed, &sender) {
            let _ = sender.blocking_send(Message::Failed(err));
        }
    });
    Ok(plans)
}

fn stream_book(
    connection: &Connection,
    plans: &[Plan],
    sender: &mpsc::Sender<Message>,
) -> Result<(), CopyError> {
    let sqlite_error = |err: rusqlite::Error| CopyError::Sqlite {
        path: connection.path().map(PathBuf::from).unwrap_or_default(),
        reason: err.to_string(),
    };
    // One read transaction: every table from the same snapshot.
    connection
        .execute_batch("BEGIN DEFERRED")
        .map_err(sqlite_error)?;
    for (index, plan) in plans.iter().enumerate() {
        let mut statement = connection
            .prepare(&format!(
                "SELECT {} FROM {} ORDER BY {}",
                plan.column_list(),
                plan.table.name,
                plan.order_by(false)
            ))
            .map_err(sqlite_error)?;
        let key_indexes: Vec<usize> = plan
            .table
            .key
            .iter()
            .filter_map(|key| plan.columns.iter().position(|(name, _)| name == key))
            .collect();
        let mut rows = statement.query([]).map_err(sqlite_error)?;
        let mut hash = TableHash::default();
        let mut batch = Vec::with_capacity(BATCH_ROWS);
        while let Some(row) = rows.next().map_err(sqlite_error)? {
            let mut cells = Vec::with_capacity(plan.columns.len());
            for (column, (name, kind)) in plan.columns.iter().enumerate() {
                let value = row.get_ref(column).map_err(sqlite_error)?;
                let cell = convert(value, *kind).map_err(|reason| CopyError::Value {
                    table: plan.table.name,
                    key: key_indexes
                        .iter()
                        .map(|&i| match row.get_ref(i) {
                            Ok(ValueRef::Integer(v)) => v.to_string(),
                            Ok(ValueRef::Text(t)) => format!("{:?}", String::from_utf8_lossy(t)),
                            _ => "?".to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join("/"),
                    column: name.clone(),
                    reason,
                })?;
                cells.push(cell);
            }
            hash.add(&cells);
            batch.push(cells);
            if batch.len() == BATCH_ROWS {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH_ROWS));
                if sender.blocking_send(Message::Rows(index, full)).is_err() {
                    return Ok(()); // the copy stopped; it reports why
                }
            }
        }
        if !batch.is_empty() && sender.blocking_send(Message::Rows(index, batch)).is_err() {
            return Ok(());
        }
        let (rows, sha256) = hash.finish();
        if sender
            .blocking_send(Message::Done(index, rows, sha256))
            .is_err()
        {
            return Ok(());
        }
    }
    connection.execute_batch("COMMIT").map_err(sqlite_error)?;
    Ok(())
}

/// A SQLite value as the PostgreSQL column's kind, refusing anything lossy.
fn convert(value: ValueRef<'_>, kind: Kind) -> Result<Cell, String> {
    Ok(match (kind, value) {
        (Kind::Int, ValueRef::Null) => Cell::Int(None),
        (Kind::Bool, ValueRef::Null) => Cell::Bool(None),
        (Kind::Text, ValueRef::Null) => Cell::Text(None),
        (Kind::Bytes, ValueRef::Null) => Cell::Bytes(None),
        (Kind::Int, ValueRef::Integer(v)) => Cell::Int(Some(v)),
        (Kind::Bool, ValueRef::Integer(0)) => Cell::Bool(Some(false)),
        (Kind::Bool, ValueRef::Integer(1)) => Cell::Bool(Some(true)),
        (Kind::Text, ValueRef::Text(bytes)) => Cell::Text(Some(
            String::from_utf8(bytes.to_vec()).map_err(|_| "text that is not UTF-8".to_string())?,
        )),
        (Kind::Bytes, ValueRef::Blob(bytes) | ValueRef::Text(bytes)) => {
            Cell::Bytes(Some(bytes.to_vec()))
        }
        (kind, value) => {
            return Err(format!(
                "expected {kind:?}, found SQLite {:?}",
                value.data_type()
            ))
        }
    })
}
