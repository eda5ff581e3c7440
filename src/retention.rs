//! Raw-body retention (`store.retain_raw_bodies`): drops the raw body and headers of
//! events older than the retention period while the event rows, their hashes and the
//! timeline stay; optionally archives what it drops first; gives the space back.
//!
//! A run has three phases, none holding the writer for more than one small batch:
//! 1. walk the due events in `seq` order from the stored cursor (reads), writing them to
//!    the archive if one is configured; the archive file is then flushed, fsynced and
//!    renamed into place (with its directory fsynced) — before any row is cleared;
//! 2. clear the walked ranges, [`BATCH_ROWS`] events per write;
//! 3. `PRAGMA incremental_vacuum`, [`VACUUM_PAGES`] pages per write.
//!
//! A crash between 1 and 2 archives the same events again in the next run's file
//! (at-least-once; `event_id` tells copies apart). A run handles at most
//! [`MAX_ROWS_PER_RUN`] events; the next run continues.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use chrono::{DateTime, SecondsFormat, Utc};
use flate2::write::GzEncoder;
use flate2::Compression;

use crate::store::{ExpiredBody, Store, StoreError};

/// Events read and cleared per batch (one read, then one write of at most this many rows).
pub const BATCH_ROWS: usize = 500;
/// Most events one run handles; the rest wait for the next run.
pub const MAX_ROWS_PER_RUN: usize = 200_000;
/// Pages given back per write (4 KiB each: 4 MiB).
pub const VACUUM_PAGES: u32 = 1_000;
/// Most vacuum writes per run (about 4 GiB).
const MAX_VACUUM_STEPS: usize = 1_000;

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("archive {path}: {source}")]
    Archive {
        path: String,
        source: std::io::Error,
    },
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RetentionRun {
    /// Events whose raw body and headers were dropped.
    pub cleared: usize,
    /// The archive written (none when nothing was due or no archive is configured).
    pub archive: Option<PathBuf>,
    /// Pages given back to the file system.
    pub pages_freed: i64,
    /// `false`: the database is not in incremental auto-vacuum mode (created before it
    /// was the default); freed pages are reused but the file does not shrink until one
    /// `VACUUM`.
    pub vacuum_available: bool,
}

/// Drops raw bodies and headers of events received before `now - retain`, archiving
/// them to `archive_dir` first when given.
pub async fn run(
    store: &Store,
    retain: Duration,
    archive_dir: Option<&Path>,
    now: DateTime<Utc>,
) -> Result<RetentionRun, RetentionError> {
    let retain = chrono::Duration::from_std(retain).unwrap_or(chrono::Duration::MAX);
    let cutoff = now
        .checked_sub_signed(retain)
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    let start = store.retention_cursor().await?;

    // 1. Walk (and archive).
    let mut archive = match archive_dir {
        Some(dir) => Some(blocking(Archive::create(dir.to_path_buf(), now)).await?),
        None => None,
    };
    let mut ranges = Vec::new();
    let mut after = start;
    let mut walked = 0;
    loop {
        let batch = store
            .expired_raw_bodies(after, cutoff, BATCH_ROWS, archive.is_some())
            .await?;
        if batch.through_seq > after {
            ranges.push((after, batch.through_seq));
            after = batch.through_seq;
        }
        walked += batch.rows.len();
        if let Some(mut open) = archive.take() {
            archive = Some(
                blocking(move || {
                    open.append(&batch.rows)?;
                    Ok(open)
                })
                .await?,
            );
        }
        if batch.done || walked.max(ranges.len() * BATCH_ROWS) >= MAX_ROWS_PER_RUN {
            break;
        }
    }
    let mut outcome = RetentionRun::default();
    if let Some(open) = archive {
        outcome.archive = blocking(move || open.finish()).await?;
    }

    // 2. Clear, one bounded write per range.
    for (after_seq, through_seq) in ranges {
        outcome.cleared += store
            .clear_raw_bodies(after_seq, through_seq, cutoff)
            .await?;
    }

    // 3. Give the space back.
    let mut free_before = store.free_pages().await?;
    outcome.vacuum_available = true;
    for _ in 0..MAX_VACUUM_STEPS {
        if free_before == 0 {
            break;
        }
        match store.incremental_vacuum(VACUUM_PAGES).await? {
            None => {
                outcome.vacuum_available = false;
                break;
            }
            Some(left) => {
                outcome.pages_freed += (free_before - left).max(0);
                if left >= free_before {
                    break;
                }
                free_before = left;
            }
        }
    }
    Ok(outcome)
}

/// Runs archive file I/O (writes, fsync) off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, RetentionError> + Send + 'static,
) -> Result<T, RetentionError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| RetentionError::Archive {
            path: String::new(),
            source: std::io::Error::other(err.to_string()),
        })?
}

/// One run's archive: a hidden temporary file until [`Archive::finish`] renames it.
struct Archive {
    dir: PathBuf,
    temporary: PathBuf,
    path: PathBuf,
    encoder: GzEncoder<BufWriter<File>>,
    lines: usize,
}

/// One line of the archive.
#[derive(serde::Serialize)]
struct ArchiveLine<'a> {
    event_id: &'a str,
    provider: &'a str,
    received_at: String,
    /// The stored headers object, `null` when none was stored.
    headers: Option<Box<serde_json::value::RawValue>>,
    /// The raw body, standard Base64; `null` when none was stored.
    body_base64: Option<String>,
}

impl Archive {
    fn create(
        dir: PathBuf,
        now: DateTime<Utc>,
    ) -> impl FnOnce() -> Result<Archive, RetentionError> {
        move || {
            let name = format!("raw-bodies-{}.jsonl.gz", now.format("%Y%m%dT%H%M%S%.3fZ"));
            let path = dir.join(&name);
            let temporary = dir.join(format!(".{name}.tmp"));
            let fail = |source| RetentionError::Archive {
                path: temporary.display().to_string(),
                source,
            };
            std::fs::create_dir_all(&dir).map_err(fail)?;
            let file = File::options()
                .write(true)
                .create_new(true)
                .open(&temporary)
                .map_err(fail)?;
            Ok(Archive {
                dir,
                encoder: GzEncoder::new(BufWriter::new(file), Compression::default()),
                temporary,
                path,
                lines: 0,
            })
        }
    }

    fn fail(&self, source: std::io::Error) -> RetentionError {
        RetentionError::Archive {
            path: self.temporary.display().to_string(),
            source,
        }
    }

    fn append(&mut self, rows: &[ExpiredBody]) -> Result<(), RetentionError> {
        for row in rows {
            let line = ArchiveLine {
                event_id: &row.event_id,
                provider: &row.provider,
                received_at: row.received_at.to_rfc3339_opts(SecondsFormat::Millis, true),
                headers: row.headers_json.as_deref().and_then(|headers| {
                    serde_json::value::RawValue::from_string(headers.to_string()).ok()
                }),
                body_base64: row
                    .raw_body
                    .as_deref()
                    .map(|body| base64::engine::general_purpose::STANDARD.encode(body)),
            };
            serde_json::to_writer(&mut self.encoder, &line)
                .map_err(|err| self.fail(std::io::Error::other(err)))?;
            self.encoder
                .write_all(b"\n")
                .map_err(|err| self.fail(err))?;
            self.lines += 1;
        }
        Ok(())
    }

    /// Completes the file, fsyncs it, renames it into place and fsyncs the directory;
    /// an archive of nothing is removed instead (`None`).
    fn finish(self) -> Result<Option<PathBuf>, RetentionError> {
        let fail = |source| RetentionError::Archive {
            path: self.temporary.display().to_string(),
            source,
        };
        let file = self
            .encoder
            .finish()
            .and_then(|writer| writer.into_inner().map_err(|err| err.into_error()))
            .map_err(fail)?;
        if self.lines == 0 {
            drop(file);
            std::fs::remove_file(&self.temporary).map_err(fail)?;
            return Ok(None);
        }
        file.sync_all().map_err(fail)?;
        drop(file);
        std::fs::rename(&self.temporary, &self.path).map_err(fail)?;
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(fail)?;
        Ok(Some(self.path))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader};

    use flate2::read::GzDecoder;
    use rusqlite::{Connection, OpenFlags};

    use super::*;
    use crate::config::StoreSettings;
    use crate::metrics::Metrics;
    use crate::store::WebhookRecord;

    const DAY: Duration = Duration::from_secs(86_400);

    fn body(n: usize) -> Vec<u8> {
        // Incompressible-ish, so pages really hold it.
        (0..3_000)
            .map(|i| ((i * 7919 + n * 104_729) % 251) as u8)
            .collect()
    }

    fn webhook(n: usize, received_at: DateTime<Utc>) -> WebhookRecord {
        WebhookRecord {
            event_id: format!("ev-{n:03}"),
            provider: "fiserv".to_string(),
            dedup_key: format!("key-{n}"),
            nonce: None,
            body_sha256: format!("sha-{n}"),
            raw_body: body(n),
            headers_json: format!("{{\"x-request-id\":\"req-{n}\"}}"),
            secret_index: 0,
            received_at,
            parsed: Err("kept as quarantined on purpose".to_string()),
        }
    }

    fn open(dir: &Path) -> Store {
        Store::open(
            &StoreSettings {
                backend: crate::config::StoreBackend::Sqlite,
                path: dir.join("retention.db"),
                busy_timeout: Duration::from_secs(5),
                max_batch: 64,
                read_connections: 2,
                replay_window: crate::config::MIN_REPLAY_WINDOW,
            },
            Metrics::new(),
        )
        .expect("open the store")
    }

    fn pragma(path: &Path, name: &str) -> i64 {
        let connection =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).expect("open");
        connection
            .query_row(&format!("PRAGMA {name}"), [], |row| row.get(0))
            .expect("pragma")
    }

    fn read_archive(path: &Path) -> Vec<serde_json::Value> {
        let file = File::open(path).expect("archive");
        BufReader::new(GzDecoder::new(file))
            .lines()
            .map(|line| serde_json::from_str(&line.expect("line")).expect("json"))
            .collect()
    }

    #[tokio::test]
    async fn old_bodies_are_archived_then_dropped_and_the_space_given_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let archive_dir = dir.path().join("archive");
        let store = open(dir.path());
        let db = dir.path().join("retention.db");
        assert_eq!(pragma(&db, "auto_vacuum"), 2, "a new store is INCREMENTAL");
        let now = Utc::now();
        let old = 0..1_200;
        let new = 1_200..1_260;
        for n in old.clone() {
            // 500 to 401 days old.
            let age = chrono::Duration::days(500 - (n as i64 % 100));
            store
                .ingest_webhook(webhook(n, now - age))
                .await
                .expect("ingest");
        }
        for n in new.clone() {
            let age = chrono::Duration::days(399);
            store
                .ingest_webhook(webhook(n, now - age))
                .await
                .expect("ingest");
        }
        let pages_before = pragma(&db, "page_count");

        let run = super::run(&store, 400 * DAY, Some(&archive_dir), now)
            .await
            .expect("retention");
        assert_eq!(run.cleared, old.len());
        assert!(run.vacuum_available);
        assert!(run.pages_freed > 0, "{run:?}");
        let pages_after = pragma(&db, "page_count");
        assert!(
            pages_after < pages_before / 2,
            "the file shrinks: {pages_before} -> {pages_after} pages"
        );
        assert_eq!(pragma(&db, "freelist_count"), 0);

        // Old events stay, without body and headers; newer ones keep theirs.
        for n in [0, 599, 1_199] {
            let event = store
                .get_event(format!("ev-{n:03}"))
                .await
                .expect("read")
                .expect("the event stays");
            assert_eq!(event.outcome, crate::ingest::EventOutcome::Quarantined);
            assert_eq!((event.raw_body, event.headers_json), (None, None));
        }
        for n in new.clone() {
            let event = store
                .get_event(format!("ev-{n:03}"))
                .await
                .expect("read")
                .expect("event");
            assert_eq!(event.raw_body, Some(body(n)));
        }

        // The archive holds exactly what was dropped.
        let archive = run.archive.expect("an archive");
        assert_eq!(archive.parent(), Some(archive_dir.as_path()));
        let lines = read_archive(&archive);
        let archived: BTreeMap<String, serde_json::Value> = lines
            .into_iter()
            .map(|line| (line["event_id"].as_str().expect("id").to_string(), line))
            .collect();
        assert_eq!(archived.len(), old.len());
        for n in old.clone() {
            let line = &archived[&format!("ev-{n:03}")];
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(line["body_base64"].as_str().expect("body"))
                .expect("base64");
            assert_eq!(decoded, body(n));
            assert_eq!(line["headers"]["x-request-id"], format!("req-{n}"));
            assert_eq!(line["provider"], "fiserv");
        }

        // A second run finds nothing and writes no archive.
        let again = super::run(&store, 400 * DAY, Some(&archive_dir), now)
            .await
            .expect("retention");
        assert_eq!((again.cleared, again.archive), (0, None));
        assert_eq!(std::fs::read_dir(&archive_dir).expect("dir").count(), 1);

        // A day later the cut-off passes the next events.
        let later = super::run(&store, 400 * DAY, None, now + chrono::Duration::days(2))
            .await
            .expect("retention");
        assert_eq!(later.cleared, new.len());
        store.close().await;
    }

    #[tokio::test]
    async fn without_incremental_auto_vacuum_bodies_are_still_dropped() {
        let dir = tempfile::tempdir().expect("temp dir");
        // A store created before auto_vacuum was set: no auto-vacuum.
        Connection::open(dir.path().join("retention.db"))
            .and_then(|c| c.execute_batch("PRAGMA auto_vacuum = NONE; CREATE TABLE early (x);"))
            .expect("an old database");
        let store = open(dir.path());
        let now = Utc::now();
        for n in 0..50 {
            store
                .ingest_webhook(webhook(n, now - chrono::Duration::days(401)))
                .await
                .expect("ingest");
        }
        let run = super::run(&store, 400 * DAY, None, now)
            .await
            .expect("retention");
        assert_eq!(run.cleared, 50);
        assert!(!run.vacuum_available);
        assert_eq!(run.pages_freed, 0);
        store.close().await;
    }
}
