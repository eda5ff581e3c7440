//! The daily reconciliation report (SPEC §6): business days in the reports' time zone,
//! the CSV rows and summary (pure, in [`csv`] and [`summary`]), and writing them
//! atomically beside the reports index.

pub mod csv;
pub mod summary;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use sha2::{Digest, Sha256};

use crate::store::{ReportIndexRow, Store, StoreError};
pub use summary::Summary;

/// A day is final (its report can no longer change) this long after it ends: a webhook
/// received just before midnight may still be committing at midnight.
pub const FINALITY_LAG: Duration = Duration::seconds(60);

/// One business date in a time zone, as the UTC interval `[start, end)` it covers
/// (23 or 25 hours across a daylight-saving change).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusinessDay {
    pub date: NaiveDate,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

fn local_midnight(date: NaiveDate, tz: Tz) -> DateTime<Utc> {
    let midnight = date.and_hms_opt(0, 0, 0).unwrap_or_default();
    // Where midnight does not exist (a DST jump at 00:00), the day starts at the first
    // instant that does.
    (0..=120)
        .find_map(|minutes| {
            tz.from_local_datetime(&(midnight + Duration::minutes(minutes)))
                .earliest()
        })
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| midnight.and_utc())
}

impl BusinessDay {
    /// The business date `date` in `tz`.
    pub fn of(date: NaiveDate, tz: Tz) -> BusinessDay {
        let next = date.succ_opt().unwrap_or(date);
        BusinessDay {
            date,
            start: local_midnight(date, tz),
            end: local_midnight(next, tz),
        }
    }

    /// The business date in `tz` that contains `instant`.
    pub fn containing(instant: DateTime<Utc>, tz: Tz) -> BusinessDay {
        BusinessDay::of(instant.with_timezone(&tz).date_naive(), tz)
    }

    /// Whether the day is over (and settled) at `now`: its report is final.
    pub fn is_final(&self, now: DateTime<Utc>) -> bool {
        now >= self.end + FINALITY_LAG
    }

    /// The instant the report shows the book at: the day's end, or `now` while it lasts.
    pub fn as_of(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        if self.is_final(now) {
            self.end
        } else {
            now.min(self.end)
        }
    }

    /// `YYYY-MM-DD`.
    pub fn label(&self) -> String {
        self.date.format("%Y-%m-%d").to_string()
    }
}

/// Why a report could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write report {path}: {reason}")]
    Io { path: String, reason: String },
}

fn io_error(path: &Path, err: impl std::fmt::Display) -> ReportError {
    ReportError::Io {
        path: path.display().to_string(),
        reason: err.to_string(),
    }
}

/// A report on disk.
#[derive(Clone, Debug)]
pub struct Generated {
    pub day: BusinessDay,
    pub csv_path: PathBuf,
    pub summary_path: PathBuf,
    pub summary: Summary,
}

/// Where a day's files live.
pub fn paths(dir: &Path, day: &BusinessDay) -> (PathBuf, PathBuf) {
    let label = day.label();
    (
        dir.join(format!("{label}.csv")),
        dir.join(format!("{label}.summary.json")),
    )
}

/// Bytes written through it are hashed on the way.
pub struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        Ok(written)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, synced, then
/// renamed over it.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut file = tempfile::NamedTempFile::new_in(dir).map_err(|err| io_error(path, err))?;
    file.write_all(bytes).map_err(|err| io_error(path, err))?;
    file.as_file()
        .sync_all()
        .map_err(|err| io_error(path, err))?;
    file.persist(path).map_err(|err| io_error(path, err))?;
    sync_parent(path)
}

/// Makes a rename into `path`'s folder durable.
fn sync_parent(path: &Path) -> Result<(), ReportError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|err| io_error(dir, err))
}

/// What a report's rows are streamed into: the CSV (hashed on the way) and the summary.
struct Sink {
    writer: csv::RowWriter<HashingWriter<std::io::BufWriter<std::fs::File>>>,
    builder: summary::SummaryBuilder,
}

/// Generates the report of `day` as the book stands at [`BusinessDay::as_of`]`(now)`:
/// the CSV and its summary written atomically into `dir`, and the index updated.
pub async fn generate(
    store: &Store,
    dir: &Path,
    day: BusinessDay,
    timezone: Tz,
    now: DateTime<Utc>,
) -> Result<Generated, ReportError> {
    std::fs::create_dir_all(dir).map_err(|err| io_error(dir, err))?;
    let (csv_path, summary_path) = paths(dir, &day);
    let is_final = day.is_final(now);
    let as_of = day.as_of(now);
    let temp = tempfile::NamedTempFile::new_in(dir).map_err(|err| io_error(&csv_path, err))?;
    let file = temp.reopen().map_err(|err| io_error(&csv_path, err))?;
    let hashing = HashingWriter {
        inner: std::io::BufWriter::with_capacity(1 << 16, file),
        hasher: Sha256::new(),
    };
    let label = day.label();
    let sink = Arc::new(Mutex::new(Sink {
        writer: csv::RowWriter::new(hashing, &label).map_err(|err| io_error(&csv_path, err))?,
        builder: summary::SummaryBuilder::new(as_of),
    }));
    let shared = sink.clone();
    store
        .report_rows(day.start, as_of, move |row| {
            let mut sink = shared
                .lock()
                .map_err(|_| StoreError::Database("report sink poisoned".to_string()))?;
            sink.builder.add(&row);
            sink.writer
                .write(&row)
                .map_err(|err| StoreError::Database(format!("writing the report: {err}")))
        })
        .await?;
    let Sink { writer, builder } = Arc::try_unwrap(sink)
        .map_err(|_| io_error(&csv_path, "report sink still shared"))?
        .into_inner()
        .map_err(|_| io_error(&csv_path, "report sink poisoned"))?;
    let hashing = writer.finish().map_err(|err| io_error(&csv_path, err))?;
    let HashingWriter { inner, hasher } = hashing;
    let file = inner
        .into_inner()
        .map_err(|err| io_error(&csv_path, err.error()))?;
    file.sync_all().map_err(|err| io_error(&csv_path, err))?;
    temp.persist(&csv_path)
        .map_err(|err| io_error(&csv_path, err))?;
    sync_parent(&csv_path)?;
    let sha256 = hex::encode(hasher.finalize());
    let summary = builder.finish(&label, timezone, is_final, sha256.clone());
    let mut json =
        serde_json::to_vec_pretty(&summary).map_err(|err| io_error(&summary_path, err))?;
    json.push(b'\n');
    write_atomically(&summary_path, &json)?;
    store
        .record_report(ReportIndexRow {
            date: label,
            is_final,
            rows: summary.rows as i64,
            sha256,
            generated_at: now.timestamp_millis(),
        })
        .await?;
    Ok(Generated {
        day,
        csv_path,
        summary_path,
        summary,
    })
}

/// The report of `day`, generating it unless it is final and already on disk (a final
/// day never changes, so its files are served as they are).
pub async fn ensure(
    store: &Store,
    dir: &Path,
    day: BusinessDay,
    timezone: Tz,
    now: DateTime<Utc>,
) -> Result<(PathBuf, PathBuf), ReportError> {
    let (csv_path, summary_path) = paths(dir, &day);
    if day.is_final(now) && csv_path.is_file() && summary_path.is_file() {
        let indexed = store.get_report(day.label()).await?;
        if indexed.is_some_and(|row| row.is_final) {
            return Ok((csv_path, summary_path));
        }
    }
    let generated = generate(store, dir, day, timezone, now).await?;
    Ok((generated.csv_path, generated.summary_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sao_paulo_day_is_its_utc_interval() {
        let tz: Tz = "America/Sao_Paulo".parse().unwrap();
        let day = BusinessDay::of(NaiveDate::from_ymd_opt(2026, 11, 20).unwrap(), tz);
        assert_eq!(day.start.to_rfc3339(), "2026-11-20T03:00:00+00:00");
        assert_eq!(day.end.to_rfc3339(), "2026-11-21T03:00:00+00:00");
        // 23:30 São Paulo time on the 20th is 02:30 UTC on the 21st: still the 20th.
        let late = "2026-11-21T02:30:00Z".parse::<DateTime<Utc>>().unwrap();
        assert_eq!(BusinessDay::containing(late, tz).date, day.date);
    }

    #[test]
    fn a_day_is_final_only_after_it_ended_and_settled() {
        let day = BusinessDay::of(NaiveDate::from_ymd_opt(2026, 11, 20).unwrap(), Tz::UTC);
        let noon = "2026-11-20T12:00:00Z".parse::<DateTime<Utc>>().unwrap();
        assert!(!day.is_final(noon));
        assert_eq!(day.as_of(noon), noon);
        assert!(!day.is_final(day.end));
        assert!(day.is_final(day.end + FINALITY_LAG));
        assert_eq!(day.as_of(day.end + Duration::days(30)), day.end);
    }

    #[test]
    fn a_daylight_saving_day_has_its_real_length() {
        let tz: Tz = "America/New_York".parse().unwrap();
        let spring = BusinessDay::of(NaiveDate::from_ymd_opt(2026, 3, 8).unwrap(), tz);
        assert_eq!((spring.end - spring.start).num_hours(), 23);
        let autumn = BusinessDay::of(NaiveDate::from_ymd_opt(2026, 11, 1).unwrap(), tz);
        assert_eq!((autumn.end - autumn.start).num_hours(), 25);
    }
}
