//! The expected ledger's rows: one validation for `POST /api/v1/ledger` and `import-ledger`, the streaming CSV import, and a sample file for benchmarks.
//!
//! A ledger CSV has a header row naming its columns, in any order: `provider`,
//! `external_id`, `amount`, `currency` and, optionally, `provider_ref` and `created_at`
//! (an empty cell is an absent value). The import reads the file once, validating each
//! row and staging it in a temporary SQLite database whose UNIQUE key finds repeated and
//! conflicting rows; compares the staged entries with the store's ledger in one join;
//! and only when no row is invalid or conflicting writes the new entries, a few thousand
//! per transaction. Memory stays flat whatever the file's size.

use std::fmt;
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::StoreSettings;
use crate::money::{AmountError, Currency};
use crate::store::{ImportTarget, LedgerEntry, LedgerStaging, Staged, StoreConflict, StoreError};

/// How many bad rows an import lists (it counts them all).
pub const LISTED_BAD_ROWS: usize = 20;

/// Entries written per store transaction.
pub const WRITE_BATCH_ROWS: usize = 5_000;

/// A field of a ledger entry: a JSON key of `POST /api/v1/ledger`, a CSV column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LedgerField {
    Provider,
    ExternalId,
    Amount,
    Currency,
    ProviderRef,
    CreatedAt,
}

impl LedgerField {
    /// Every field, in the documented column order.
    pub const ALL: [LedgerField; 6] = [
        LedgerField::Provider,
        LedgerField::ExternalId,
        LedgerField::Amount,
        LedgerField::Currency,
        LedgerField::ProviderRef,
        LedgerField::CreatedAt,
    ];

    /// The field's name (JSON key and CSV column).
    pub fn name(self) -> &'static str {
        match self {
            LedgerField::Provider => "provider",
            LedgerField::ExternalId => "external_id",
            LedgerField::Amount => "amount",
            LedgerField::Currency => "currency",
            LedgerField::ProviderRef => "provider_ref",
            LedgerField::CreatedAt => "created_at",
        }
    }

    /// The field named `name` (trimmed, case-insensitive).
    pub fn from_name(name: &str) -> Option<LedgerField> {
        let name = name.trim();
        LedgerField::ALL
            .into_iter()
            .find(|field| field.name().eq_ignore_ascii_case(name))
    }

    /// Whether every entry must carry it.
    pub fn required(self) -> bool {
        !matches!(self, LedgerField::ProviderRef | LedgerField::CreatedAt)
    }

    fn index(self) -> usize {
        match self {
            LedgerField::Provider => 0,
            LedgerField::ExternalId => 1,
            LedgerField::Amount => 2,
            LedgerField::Currency => 3,
            LedgerField::ProviderRef => 4,
            LedgerField::CreatedAt => 5,
        }
    }
}

impl fmt::Display for LedgerField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A refused field value: the field and a sentence about the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: LedgerField,
    pub message: String,
}

impl FieldError {
    fn new(field: LedgerField, message: impl Into<String>) -> FieldError {
        FieldError {
            field,
            message: message.into(),
        }
    }
}

/// One ledger entry as text, before validation (a CSV row, a JSON body). An absent or
/// empty `provider_ref`/`created_at` is no value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerFields<'a> {
    pub provider: &'a str,
    pub external_id: &'a str,
    pub amount: &'a str,
    pub currency: &'a str,
    pub provider_ref: Option<&'a str>,
    pub created_at: Option<&'a str>,
}

/// Validates one ledger entry: `provider` a configured provider id (`is_provider`),
/// `external_id` and `provider_ref` ids by the rule of [`crate::ids`] (non-empty,
/// printable, at most 128 characters, no `/`), `currency` an ISO 4217 code, `amount` positive decimal
/// text with at most the currency's minor digits (exact, never through floats),
/// `created_at` RFC 3339. The first refused field is the error.
pub fn parse_ledger_row(
    fields: &LedgerFields<'_>,
    is_provider: impl Fn(&str) -> bool,
) -> Result<LedgerEntry, FieldError> {
    if !is_provider(fields.provider) {
        return Err(FieldError::new(
            LedgerField::Provider,
            format!("{:?} is not a configured provider", fields.provider),
        ));
    }
    check_id(LedgerField::ExternalId, fields.external_id)?;
    let currency = Currency::from_code(fields.currency).map_err(|_| {
        FieldError::new(
            LedgerField::Currency,
            format!("{:?} is not an ISO 4217 currency code", fields.currency),
        )
    })?;
    let amount_minor = parse_amount(fields.amount, currency)?;
    let provider_ref = match fields.provider_ref.filter(|r| !r.is_empty()) {
        Some(provider_ref) => {
            check_id(LedgerField::ProviderRef, provider_ref)?;
            Some(provider_ref.to_string())
        }
        None => None,
    };
    let created_at = match fields.created_at.filter(|t| !t.is_empty()) {
        Some(text) => Some(
            DateTime::parse_from_rfc3339(text.trim())
                .map_err(|_| {
                    FieldError::new(
                        LedgerField::CreatedAt,
                        format!("{text:?} is not an RFC 3339 time"),
                    )
                })?
                .with_timezone(&Utc),
        ),
        None => None,
    };
    Ok(LedgerEntry {
        provider: fields.provider.to_string(),
        external_id: fields.external_id.to_string(),
        amount_minor,
        currency: currency.code().to_string(),
        provider_ref,
        created_at,
    })
}

/// The one id rule of [`crate::ids`] (webhooks, polls and the ledger alike); like it, the
/// message names the rule, never the value.
fn check_id(field: LedgerField, text: &str) -> Result<(), FieldError> {
    crate::ids::validate_id(field.name(), text).map_err(|err| {
        let text = err.to_string();
        let prefix = format!("{}: ", field.name());
        FieldError::new(field, text.strip_prefix(&prefix).unwrap_or(&text))
    })
}

fn parse_amount(text: &str, currency: Currency) -> Result<i64, FieldError> {
    let message = match currency.parse_minor(text) {
        Ok(minor) if minor > 0 => return Ok(minor),
        Ok(_) => format!("{text:?} is not positive"),
        Err(AmountError::TooManyDecimals {
            currency, digits, ..
        }) => format!("{text:?} has more decimals than {currency} allows ({digits})"),
        Err(AmountError::Negative(_)) => format!("{text:?} is negative"),
        Err(AmountError::Overflow(_)) => format!("{text:?} is too large"),
        Err(AmountError::NotANumber(_) | AmountError::UnknownCurrency(_)) => {
            format!("{text:?} is not a decimal number")
        }
    };
    Err(FieldError::new(LedgerField::Amount, message))
}

/// Where each field sits in a CSV row, from the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    positions: [Option<usize>; 6],
    width: usize,
}

impl Columns {
    /// Reads a header row: every column a known field, each at most once, the required
    /// ones present. The error is a sentence naming the column.
    pub fn from_header<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Columns, String> {
        let mut positions = [None; 6];
        let mut width = 0;
        for (position, name) in names.into_iter().enumerate() {
            width = position + 1;
            let name = name.trim_start_matches('\u{feff}').trim();
            let field = LedgerField::from_name(name).ok_or_else(|| {
                format!(
                    "unknown column {name:?} (the columns are {})",
                    LedgerField::ALL.map(LedgerField::name).join(", ")
                )
            })?;
            if positions[field.index()].replace(position).is_some() {
                return Err(format!("column {:?} appears twice", field.name()));
            }
        }
        if let Some(missing) = LedgerField::ALL
            .into_iter()
            .find(|field| field.required() && positions[field.index()].is_none())
        {
            return Err(format!("missing column {:?}", missing.name()));
        }
        Ok(Columns { positions, width })
    }

    /// How many columns the header has.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The fields of one record of [`Columns::width`] cells. Records are split on `\n`
    /// only (so that line numbers stay right in CRLF files): the `\r` of a CRLF ending
    /// is dropped from the last cell here.
    pub fn fields<'r>(&self, record: &'r csv::StringRecord) -> LedgerFields<'r> {
        let last = record.len().saturating_sub(1);
        let cell = |field: LedgerField| {
            self.positions[field.index()].and_then(|position| {
                let cell = record.get(position)?;
                Some(if position == last {
                    cell.strip_suffix('\r').unwrap_or(cell)
                } else {
                    cell
                })
            })
        };
        LedgerFields {
            provider: cell(LedgerField::Provider).unwrap_or_default(),
            external_id: cell(LedgerField::ExternalId).unwrap_or_default(),
            amount: cell(LedgerField::Amount).unwrap_or_default(),
            currency: cell(LedgerField::Currency).unwrap_or_default(),
            provider_ref: cell(LedgerField::ProviderRef),
            created_at: cell(LedgerField::CreatedAt),
        }
    }
}

/// A bad row of a ledger file: its line, the column when one is to blame, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    pub line: u64,
    pub column: Option<LedgerField>,
    pub message: String,
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.column {
            Some(column) => write!(f, "line {}, column {column}: {}", self.line, self.message),
            None => write!(f, "line {}: {}", self.line, self.message),
        }
    }
}

/// Why a ledger file was refused as a whole: nothing was imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub path: PathBuf,
    /// Data rows read.
    pub rows: u64,
    /// Bad rows (invalid or conflicting), all counted.
    pub bad_rows: u64,
    /// The first [`LISTED_BAD_ROWS`] of them, by line.
    pub first: Vec<RowError>,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = if self.bad_rows == 1 { "" } else { "s" };
        write!(
            f,
            "{}: {} bad row{plural} of {}, nothing imported",
            self.path.display(),
            self.bad_rows,
            self.rows
        )?;
        for error in &self.first {
            write!(f, "\n  {error}")?;
        }
        let unlisted = self.bad_rows.saturating_sub(self.first.len() as u64);
        if unlisted > 0 {
            write!(f, "\n  … and {unlisted} more")?;
        }
        Ok(())
    }
}

/// Why an import did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file cannot be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The header row is not a ledger header.
    #[error("{path}: line 1: {message}")]
    Header { path: PathBuf, message: String },
    /// Invalid or conflicting rows: nothing was imported.
    #[error("{0}")]
    Rejected(Rejection),
    /// Reading the file failed midway.
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: csv::Error },
    /// Between the check and their batch, someone registered other values under some
    /// of the file's keys; those were left as registered, the rest was imported.
    #[error("{path}: {created} entries imported, but {} were meanwhile registered by someone else with other values and were left as they are (lines {})", .lines.len(), lines_text(.lines))]
    Raced {
        path: PathBuf,
        created: u64,
        lines: Vec<u64>,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn lines_text(lines: &[u64]) -> String {
    let mut text: Vec<String> = lines
        .iter()
        .take(LISTED_BAD_ROWS)
        .map(u64::to_string)
        .collect();
    if lines.len() > LISTED_BAD_ROWS {
        text.push("…".to_string());
    }
    text.join(", ")
}

impl ImportError {
    /// Whether the file is to blame (exit 2) rather than the run (exit 1).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            ImportError::Open { .. } | ImportError::Header { .. } | ImportError::Rejected(_)
        )
    }
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportSummary {
    /// Data rows read.
    pub rows: u64,
    /// Distinct `(provider, external_id)` entries in the file.
    pub entries: u64,
    /// Entries registered by this import.
    pub created: u64,
    /// Entries that were already registered with the same values.
    pub already_registered: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl fmt::Display for ImportSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} new, {} already registered ({} rows, {} distinct entries) in {:.1} s",
            self.created,
            self.already_registered,
            self.rows,
            self.entries,
            self.elapsed.as_secs_f64()
        )
    }
}

/// The bad rows found so far: all counted, the first few kept.
#[derive(Default)]
struct BadRows {
    first: Vec<RowError>,
    count: u64,
}

impl BadRows {
    fn push(&mut self, error: RowError) {
        self.count += 1;
        if self.first.len() < LISTED_BAD_ROWS {
            self.first.push(error);
        }
    }
}

/// Imports the ledger CSV at `path` into the store of `store` (see the module doc).
/// `is_provider` says which provider ids are configured. Nothing is written unless
/// every row is valid and agrees with the file's other rows and the store.
pub fn import_ledger_csv(
    path: &Path,
    store: &StoreSettings,
    is_provider: impl Fn(&str) -> bool,
    progress: &mut Progress,
) -> Result<ImportSummary, ImportError> {
    let started = Instant::now();
    let file = File::open(path).map_err(|source| ImportError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    // Split on `\n` alone: with the default CRLF terminator the csv crate numbers the
    // lines of a CRLF file one too low. Cell counts are checked here, blank lines skipped.
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .terminator(csv::Terminator::Any(b'\n'))
        .flexible(true)
        .buffer_capacity(1 << 20)
        .from_reader(file);
    let read_error = |source: csv::Error| ImportError::Read {
        path: path.to_path_buf(),
        source,
    };
    let header_error = |message: String| ImportError::Header {
        path: path.to_path_buf(),
        message,
    };
    let columns = match reader.headers() {
        Ok(header) => Columns::from_header(header.iter()).map_err(header_error)?,
        Err(err) => match err.kind() {
            csv::ErrorKind::Utf8 { .. } => {
                return Err(header_error("the header is not UTF-8".to_string()))
            }
            _ => return Err(read_error(err)),
        },
    };
    let target = ImportTarget::open(store)?;
    let mut staging = LedgerStaging::create()?;
    let mut bad = BadRows::default();
    let mut rows = 0u64;
    let mut record = csv::StringRecord::new();
    progress.start("reading", size);
    loop {
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let line = record.position().map_or(rows + 2, |p| p.line());
                if record.len() != columns.width() {
                    if record.len() == 1 && record.get(0).is_some_and(|c| c.trim().is_empty()) {
                        continue;
                    }
                    rows += 1;
                    bad.push(RowError {
                        line,
                        column: None,
                        message: format!(
                            "{} cells, but the header has {} columns",
                            record.len(),
                            columns.width()
                        ),
                    });
                    continue;
                }
                rows += 1;
                match parse_ledger_row(&columns.fields(&record), &is_provider) {
                    Ok(entry) => {
                        if let Staged::Conflict {
                            first_line,
                            first,
                            fields,
                        } = staging.add(line, &entry)?
                        {
                            bad.push(in_file_conflict(line, &entry, first_line, &first, &fields));
                        }
                    }
                    Err(err) => bad.push(RowError {
                        line,
                        column: Some(err.field),
                        message: err.message,
                    }),
                }
            }
            Err(err) => {
                rows += 1;
                match row_error(&err) {
                    Some(error) => bad.push(error),
                    None => return Err(read_error(err)),
                }
            }
        }
        if rows % 4096 == 0 {
            progress.update(reader.position().byte(), rows);
        }
    }
    progress.update(size, rows);
    progress.finish();
    progress.start("checking against the store", 0);
    let comparison = staging.compare_with_store(&target, LISTED_BAD_ROWS)?;
    progress.finish();
    if bad.count > 0 || comparison.conflicts > 0 {
        let mut first = bad.first;
        first.extend(comparison.first_conflicts.iter().map(store_conflict));
        first.sort_by_key(|error| error.line);
        first.truncate(LISTED_BAD_ROWS);
        return Err(ImportError::Rejected(Rejection {
            path: path.to_path_buf(),
            rows,
            bad_rows: bad.count + comparison.conflicts,
            first,
        }));
    }
    let entries = staging.staged();
    let mut summary = ImportSummary {
        rows,
        entries,
        created: 0,
        already_registered: comparison.already_registered,
        elapsed: Duration::ZERO,
    };
    if comparison.already_registered < entries {
        progress.start("writing", entries);
        let outcome = staging.write_to_store(&target, WRITE_BATCH_ROWS, Utc::now(), |done| {
            progress.update(done, done)
        })?;
        progress.finish();
        summary.created = outcome.created;
        summary.already_registered = outcome.unchanged;
        if !outcome.conflicting_meanwhile.is_empty() {
            return Err(ImportError::Raced {
                path: path.to_path_buf(),
                created: outcome.created,
                lines: outcome.conflicting_meanwhile,
            });
        }
    }
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// The row error of a record the CSV reader refused (not UTF-8), `None` when the file
/// itself cannot be read further.
fn row_error(err: &csv::Error) -> Option<RowError> {
    match err.kind() {
        csv::ErrorKind::Utf8 { pos, err } => Some(RowError {
            line: pos.as_ref().map_or(0, |p| p.line()),
            column: None,
            message: format!("field {} is not UTF-8", err.field() + 1),
        }),
        _ => None,
    }
}

fn amount_text(minor: i64, currency: &str) -> String {
    match Currency::from_code(currency) {
        Ok(currency) => format!("{} {currency}", currency.format_minor(minor)),
        Err(_) => format!("{minor} minor units of {currency}"),
    }
}

fn field_value(entry: &LedgerEntry, field: &str) -> String {
    match field {
        "amount" => amount_text(entry.amount_minor, &entry.currency),
        "currency" => entry.currency.clone(),
        "provider_ref" => entry
            .provider_ref
            .as_deref()
            .map_or_else(|| "none".to_string(), |r| format!("{r:?}")),
        "created_at" => entry.created_at.map_or_else(
            || "none".to_string(),
            |t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        ),
        _ => String::new(),
    }
}

fn first_column(fields: &[&'static str]) -> Option<LedgerField> {
    fields.first().and_then(|name| LedgerField::from_name(name))
}

fn comparison_text(
    entry: &LedgerEntry,
    other: &LedgerEntry,
    other_label: &str,
    fields: &[&'static str],
) -> String {
    fields
        .iter()
        .map(|field| {
            format!(
                "{field} {} here, {} {other_label}",
                field_value(entry, field),
                field_value(other, field)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn in_file_conflict(
    line: u64,
    entry: &LedgerEntry,
    first_line: u64,
    first: &LedgerEntry,
    fields: &[&'static str],
) -> RowError {
    RowError {
        line,
        column: first_column(fields),
        message: format!(
            "{}/{} is also on line {first_line} with other values ({})",
            entry.provider,
            entry.external_id,
            comparison_text(entry, first, &format!("on line {first_line}"), fields)
        ),
    }
}

fn store_conflict(conflict: &StoreConflict) -> RowError {
    RowError {
        line: conflict.line,
        column: first_column(&conflict.fields),
        message: format!(
            "{}/{} is already registered with other values ({})",
            conflict.entry.provider,
            conflict.entry.external_id,
            comparison_text(
                &conflict.entry,
                &conflict.registered,
                "registered",
                &conflict.fields
            )
        ),
    }
}

/// Progress of a long import on stderr: a bar on a terminal, else a plain line at every
/// tenth of a phase or every few seconds, whichever comes first.
pub struct Progress {
    display: Display,
    label: &'static str,
    total: u64,
    next_tenth: u64,
    last_line: Instant,
    phase_started: Instant,
}

enum Display {
    Bar(Option<indicatif::ProgressBar>),
    Lines,
    Quiet,
}

/// Longest silence between two plain progress lines.
const LINE_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    /// A bar when stderr is a terminal, plain lines otherwise.
    pub fn on_stderr() -> Progress {
        let display = if std::io::stderr().is_terminal() {
            Display::Bar(None)
        } else {
            Display::Lines
        };
        Progress::with(display)
    }

    /// No output (tests, benchmarks).
    pub fn quiet() -> Progress {
        Progress::with(Display::Quiet)
    }

    fn with(display: Display) -> Progress {
        Progress {
            display,
            label: "",
            total: 0,
            next_tenth: 1,
            last_line: Instant::now(),
            phase_started: Instant::now(),
        }
    }

    /// Starts a phase of `total` units (0: unknown, a spinner or one line).
    pub fn start(&mut self, label: &'static str, total: u64) {
        self.label = label;
        self.total = total;
        self.next_tenth = 1;
        self.last_line = Instant::now();
        self.phase_started = Instant::now();
        match &mut self.display {
            Display::Bar(bar) => {
                let new = if total > 0 {
                    indicatif::ProgressBar::new(total)
                } else {
                    indicatif::ProgressBar::new_spinner()
                };
                let style = if total > 0 {
                    indicatif::ProgressStyle::with_template(
                        "{prefix:>28} [{bar:40}] {percent:>3}% {msg} ({elapsed})",
                    )
                } else {
                    indicatif::ProgressStyle::with_template("{prefix:>28} {spinner} ({elapsed})")
                };
                if let Ok(style) = style {
                    new.set_style(style.progress_chars("=> "));
                }
                new.set_prefix(label);
                new.enable_steady_tick(Duration::from_millis(200));
                *bar = Some(new);
            }
            Display::Lines => eprintln!("import-ledger: {label}…"),
            Display::Quiet => {}
        }
    }

    /// `done` of the phase's total units, `rows` rows handled.
    pub fn update(&mut self, done: u64, rows: u64) {
        match &mut self.display {
            Display::Bar(Some(bar)) => {
                bar.set_position(done);
                bar.set_message(format!("{rows} rows"));
            }
            Display::Lines if self.total > 0 => {
                let tenths = done.saturating_mul(10) / self.total;
                if tenths >= self.next_tenth || self.last_line.elapsed() >= LINE_EVERY {
                    self.next_tenth = tenths + 1;
                    self.last_line = Instant::now();
                    eprintln!(
                        "import-ledger: {} {}% ({rows} rows)",
                        self.label,
                        done.saturating_mul(100) / self.total
                    );
                }
            }
            Display::Bar(None) | Display::Lines | Display::Quiet => {}
        }
    }

    /// Ends the phase.
    pub fn finish(&mut self) {
        match &mut self.display {
            Display::Bar(bar) => {
                if let Some(bar) = bar.take() {
                    bar.finish();
                }
            }
            Display::Lines => eprintln!(
                "import-ledger: {} done in {:.1} s",
                self.label,
                self.phase_started.elapsed().as_secs_f64()
            ),
            Display::Quiet => {}
        }
    }
}

/// Writes a valid ledger CSV of `rows` rows (header included) for benchmarks: entries
/// spread round-robin over `providers`, ids `ext-{seed}-{n}` / `ref-{seed}-{n}`
/// (`n` from 1), BRL amounts from 1.00 to 10 000.00, `created_at` through 2026-11-20
/// UTC. The same arguments give the same bytes.
pub fn write_sample_ledger_csv(
    path: &Path,
    rows: u64,
    providers: &[&str],
    seed: u64,
) -> std::io::Result<()> {
    if providers.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a sample ledger needs at least one provider",
        ));
    }
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut rng = StdRng::seed_from_u64(seed);
    let day_start = 1_795_132_800; // 2026-11-20T00:00:00Z
    writeln!(
        out,
        "provider,external_id,amount,currency,provider_ref,created_at"
    )?;
    for n in 1..=rows {
        let provider = providers[(n as usize - 1) % providers.len()];
        let cents: u64 = rng.random_range(100..=1_000_000);
        let second = day_start + (n * 86_400 / rows.max(1)).min(86_399) as i64;
        let created_at = DateTime::<Utc>::from_timestamp(second, 0)
            .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
            .to_rfc3339_opts(SecondsFormat::Secs, true);
        writeln!(
            out,
            "{provider},ext-{seed}-{n},{}.{:02},BRL,ref-{seed}-{n},{created_at}",
            cents / 100,
            cents % 100
        )?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::MAX_ID_CHARS;

    fn configured(provider: &str) -> bool {
        matches!(provider, "fiserv" | "tupay")
    }

    fn good() -> LedgerFields<'static> {
        LedgerFields {
            provider: "fiserv",
            external_id: "ord-1",
            amount: "12.34",
            currency: "BRL",
            provider_ref: Some("tx-1"),
            created_at: Some("2026-11-20T12:00:00-03:00"),
        }
    }

    #[test]
    fn a_good_row_becomes_an_entry_in_minor_units() {
        let entry = parse_ledger_row(&good(), configured).unwrap();
        assert_eq!(entry.amount_minor, 1234);
        assert_eq!(entry.currency, "BRL");
        assert_eq!(entry.provider_ref.as_deref(), Some("tx-1"));
        assert_eq!(
            entry.created_at.unwrap().to_rfc3339(),
            "2026-11-20T15:00:00+00:00"
        );
        let bare = LedgerFields {
            provider_ref: Some(""),
            created_at: None,
            currency: "jpy",
            amount: "1500",
            ..good()
        };
        let entry = parse_ledger_row(&bare, configured).unwrap();
        assert_eq!((entry.amount_minor, entry.currency.as_str()), (1500, "JPY"));
        assert_eq!((entry.provider_ref, entry.created_at), (None, None));
        let kwd = LedgerFields {
            currency: "KWD",
            amount: "1.234",
            ..good()
        };
        assert_eq!(
            parse_ledger_row(&kwd, configured).unwrap().amount_minor,
            1234
        );
    }

    #[test]
    fn invalid_rows_name_the_field_and_the_value() {
        let long = "x".repeat(MAX_ID_CHARS + 1);
        let cases: Vec<(&str, LedgerFields, LedgerField, &str)> = vec![
            (
                "unknown currency",
                LedgerFields {
                    currency: "ZZZ",
                    ..good()
                },
                LedgerField::Currency,
                "\"ZZZ\" is not an ISO 4217 currency code",
            ),
            (
                "no minor unit (gold)",
                LedgerFields {
                    currency: "XAU",
                    ..good()
                },
                LedgerField::Currency,
                "\"XAU\" is not an ISO 4217 currency code",
            ),
            (
                "decimals in JPY",
                LedgerFields {
                    currency: "JPY",
                    amount: "1.5",
                    ..good()
                },
                LedgerField::Amount,
                "\"1.5\" has more decimals than JPY allows (0)",
            ),
            (
                "three decimals in BRL",
                LedgerFields {
                    amount: "12.345",
                    ..good()
                },
                LedgerField::Amount,
                "\"12.345\" has more decimals than BRL allows (2)",
            ),
            (
                "four decimals in KWD",
                LedgerFields {
                    currency: "KWD",
                    amount: "1.2345",
                    ..good()
                },
                LedgerField::Amount,
                "\"1.2345\" has more decimals than KWD allows (3)",
            ),
            (
                "negative",
                LedgerFields {
                    amount: "-5.00",
                    ..good()
                },
                LedgerField::Amount,
                "\"-5.00\" is negative",
            ),
            (
                "zero",
                LedgerFields {
                    amount: "0.00",
                    ..good()
                },
                LedgerField::Amount,
                "\"0.00\" is not positive",
            ),
            (
                "not a number",
                LedgerFields {
                    amount: "12,34",
                    ..good()
                },
                LedgerField::Amount,
                "\"12,34\" is not a decimal number",
            ),
            (
                "empty amount",
                LedgerFields {
                    amount: "",
                    ..good()
                },
                LedgerField::Amount,
                "\"\" is not a decimal number",
            ),
            (
                "too large",
                LedgerFields {
                    amount: "99999999999999999999",
                    ..good()
                },
                LedgerField::Amount,
                "\"99999999999999999999\" is too large",
            ),
            (
                "bad created_at",
                LedgerFields {
                    created_at: Some("2026-11-20 12:00"),
                    ..good()
                },
                LedgerField::CreatedAt,
                "\"2026-11-20 12:00\" is not an RFC 3339 time",
            ),
            (
                "empty external_id",
                LedgerFields {
                    external_id: "",
                    ..good()
                },
                LedgerField::ExternalId,
                "empty",
            ),
            (
                "blank external_id",
                LedgerFields {
                    external_id: "   ",
                    ..good()
                },
                LedgerField::ExternalId,
                "empty",
            ),
            (
                "control character in external_id",
                LedgerFields {
                    external_id: "ord\u{7}1",
                    ..good()
                },
                LedgerField::ExternalId,
                "contains a control character",
            ),
            (
                "newline in provider_ref",
                LedgerFields {
                    provider_ref: Some("tx\n1"),
                    ..good()
                },
                LedgerField::ProviderRef,
                "contains a control character",
            ),
            (
                "external_id too long",
                LedgerFields {
                    external_id: &long,
                    ..good()
                },
                LedgerField::ExternalId,
                "longer than 128 characters",
            ),
            (
                "a slash in provider_ref",
                LedgerFields {
                    provider_ref: Some("../admin"),
                    ..good()
                },
                LedgerField::ProviderRef,
                "is a dot segment or contains '/'",
            ),
            (
                "unknown provider",
                LedgerFields {
                    provider: "paypal",
                    ..good()
                },
                LedgerField::Provider,
                "\"paypal\" is not a configured provider",
            ),
        ];
        for (why, fields, field, message) in cases {
            assert_eq!(
                parse_ledger_row(&fields, configured),
                Err(FieldError {
                    field,
                    message: message.to_string()
                }),
                "{why}"
            );
        }
    }

    #[test]
    fn an_id_of_exactly_the_limit_is_accepted() {
        let id = "é".repeat(MAX_ID_CHARS);
        let fields = LedgerFields {
            external_id: &id,
            ..good()
        };
        assert!(parse_ledger_row(&fields, configured).is_ok());
    }

    #[test]
    fn headers_map_columns_in_any_order() {
        let columns =
            Columns::from_header(["currency", "Amount", " external_id", "provider"]).unwrap();
        let record = csv::StringRecord::from(vec!["BRL", "1.00", "ord-1", "fiserv"]);
        let fields = columns.fields(&record);
        assert_eq!(
            fields,
            LedgerFields {
                provider: "fiserv",
                external_id: "ord-1",
                amount: "1.00",
                currency: "BRL",
                provider_ref: None,
                created_at: None,
            }
        );
    }

    #[test]
    fn bad_headers_name_the_column() {
        let cases: [(&[&str], &str, &str); 3] = [
            (
                &["provider", "external_id", "amount", "currency", "memo"],
                "unknown column \"memo\"",
                "unknown column",
            ),
            (
                &["provider", "external_id", "currency"],
                "missing column \"amount\"",
                "missing required column",
            ),
            (
                &["provider", "external_id", "amount", "currency", "amount"],
                "column \"amount\" appears twice",
                "repeated column",
            ),
        ];
        for (header, expected, why) in cases {
            let error = Columns::from_header(header.iter().copied()).unwrap_err();
            assert!(error.starts_with(expected), "{why}: {error}");
        }
    }

    #[test]
    fn rejections_list_the_first_rows_and_count_the_rest() {
        let rejection = Rejection {
            path: PathBuf::from("ledger.csv"),
            rows: 100,
            bad_rows: 25,
            first: vec![RowError {
                line: 17,
                column: Some(LedgerField::Amount),
                message: "\"12.345\" has more decimals than BRL allows (2)".to_string(),
            }],
        };
        assert_eq!(
            rejection.to_string(),
            "ledger.csv: 25 bad rows of 100, nothing imported\n  line 17, column amount: \"12.345\" has more decimals than BRL allows (2)\n  … and 24 more"
        );
    }

    #[test]
    fn the_sample_ledger_is_valid_and_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.csv"), dir.path().join("b.csv"));
        write_sample_ledger_csv(&a, 50, &["fiserv", "tupay"], 7).unwrap();
        write_sample_ledger_csv(&b, 50, &["fiserv", "tupay"], 7).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let mut reader = csv::Reader::from_path(&a).unwrap();
        let columns = Columns::from_header(reader.headers().unwrap().iter()).unwrap();
        let mut count = 0;
        for record in reader.records() {
            let record = record.unwrap();
            parse_ledger_row(&columns.fields(&record), configured).unwrap();
            count += 1;
        }
        assert_eq!(count, 50);
    }

    fn store_in(dir: &Path) -> StoreSettings {
        StoreSettings {
            backend: crate::config::StoreBackend::Sqlite,
            path: dir.join("store.db"),
            busy_timeout: Duration::from_millis(500),
            max_batch: 64,
            read_connections: 1,
            replay_window: crate::config::MIN_REPLAY_WINDOW,
        }
    }

    #[test]
    fn crlf_files_are_numbered_by_their_real_lines_and_blank_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ledger.csv");
        std::fs::write(
            &file,
            "provider,external_id,amount,currency,provider_ref\r\n\
             fiserv,ord-1,1.00,BRL,tx-1\r\n\
             \r\n\
             fiserv,ord-2,1.001,BRL,tx-2\r\n\
             fiserv,ord-3\r\n",
        )
        .unwrap();

        let result = import_ledger_csv(
            &file,
            &store_in(dir.path()),
            configured,
            &mut Progress::quiet(),
        );

        let Err(ImportError::Rejected(rejection)) = result else {
            panic!("the file must be refused: {result:?}");
        };
        let lines: Vec<String> = rejection.first.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "line 4, column amount: \"1.001\" has more decimals than BRL allows (2)",
                "line 5: 2 cells, but the header has 5 columns",
            ]
        );
        assert_eq!((rejection.rows, rejection.bad_rows), (3, 2));
    }

    #[test]
    fn the_carriage_return_of_a_crlf_line_is_not_part_of_the_last_cell() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ledger.csv");
        std::fs::write(
            &file,
            "provider,external_id,amount,currency,provider_ref\r\nfiserv,ord-1,1.00,BRL,tx-1\r\n",
        )
        .unwrap();
        let store = store_in(dir.path());

        let first = import_ledger_csv(&file, &store, configured, &mut Progress::quiet()).unwrap();
        let again = import_ledger_csv(&file, &store, configured, &mut Progress::quiet()).unwrap();

        assert_eq!((first.created, first.already_registered), (1, 0));
        assert_eq!((again.created, again.already_registered), (0, 1));
        let provider_ref: String = rusqlite::Connection::open(&store.path)
            .unwrap()
            .query_row("SELECT provider_ref FROM ledger", [], |row| row.get(0))
            .unwrap();
        assert_eq!(provider_ref, "tx-1");
    }
}
