//! Reconciliation and the daily report: findings opened and resolved by the passes,
//! point-in-time CSVs compared byte for byte with golden files, the reports API and roles.

use std::time::Duration;

use cashout_recon::money::{Currency, Money};
use cashout_recon::providers::Observation;
use cashout_recon::state::{CashoutStatus, StatusUpdate};
use cashout_recon::store::LedgerEntry;
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;

use crate::helpers::*;

fn at(text: &str) -> DateTime<Utc> {
    text.parse().expect("RFC 3339 test time")
}

fn date(text: &str) -> NaiveDate {
    text.parse().expect("test date")
}

/// A provider report of one cash-out, as a poll would bring it.
fn report(provider_ref: &str, status: CashoutStatus, amount: &str, currency: &str) -> Observation {
    let currency = Currency::from_code(currency).expect("currency");
    let mut observation = Observation::new(provider_ref);
    observation.status = Some(StatusUpdate::to(status));
    observation.raw_status = Some(status.as_str().to_string());
    observation.amount = Some(Money::parse(amount, currency).expect("amount"));
    observation
}

fn expected(provider: &str, external_id: &str, amount_minor: i64, currency: &str) -> LedgerEntry {
    LedgerEntry {
        provider: provider.to_string(),
        external_id: external_id.to_string(),
        amount_minor,
        currency: currency.to_string(),
        provider_ref: None,
        created_at: None,
    }
}

impl TestApp {
    /// POST a JSON body with a bearer token.
    async fn post_json(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut request = self
            .client
            .post(format!("{}{path}", self.address))
            .json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("POST request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Waits until a mismatch of `kind` about `subject` is open (or resolved).
    async fn wait_for_mismatch(
        &self,
        kind: &str,
        subject: &str,
        open: bool,
        deadline: Duration,
    ) -> Value {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let (_, page) = self
                .get_with_token(
                    &format!("/api/v1/mismatches?kind={kind}&open={open}"),
                    Some(ADMIN_TOKEN),
                )
                .await;
            if let Some(found) = page["items"]
                .as_array()
                .and_then(|items| items.iter().find(|m| m["subject"] == subject))
            {
                return found.clone();
            }
            assert!(
                tokio::time::Instant::now() < until,
                "no {kind} mismatch of {subject} with open={open} within {deadline:?}: {page}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn observe(&self, provider: &str, observation: Observation, when: &str) {
        self.state
            .store
            .apply_polled(provider.to_string(), observation, false, at(when))
            .await
            .expect("observation applied");
    }

    async fn expect(&self, entry: LedgerEntry, when: &str) {
        self.state
            .store
            .register_expected_at(entry, at(when))
            .await
            .expect("ledger entry registered");
    }

    async fn pass_at(&self, when: &str) {
        self.state
            .reconciler
            .continuous_pass(at(when))
            .await
            .expect("continuous pass");
    }

    /// The day's CSV and summary as generated at `now`.
    async fn report_of(&self, day: &str, now: &str) -> (String, Value) {
        let (csv, summary) = self.report_text_of(day, now).await;
        (
            csv,
            serde_json::from_str(&summary).expect("summary is JSON"),
        )
    }

    /// The day's CSV and summary files' text as generated at `now`.
    async fn report_text_of(&self, day: &str, now: &str) -> (String, String) {
        let (csv, summary) = self
            .state
            .reconciler
            .report_files(date(day), at(now))
            .await
            .expect("report");
        (
            std::fs::read_to_string(csv).expect("CSV readable"),
            std::fs::read_to_string(summary).expect("summary readable"),
        )
    }
}

/// Fiserv and Mannco in ledger mode.
fn ledger_mode(config: String) -> String {
    config
        .replace("id = \"fiserv\"\n", "id = \"fiserv\"\nledger = true\n")
        .replace("id = \"mannco\"\n", "id = \"mannco\"\nledger = true\n")
}

/// A reports dir and a time zone for the app, Fiserv and Mannco in ledger mode, and
/// passes run by the test alone (`every` is an hour).
fn with_reports(dir: &std::path::Path, timezone: &str) -> impl FnOnce(String) -> String {
    let dir = dir.display().to_string();
    let timezone = timezone.to_string();
    move |config| {
        format!(
            "{}\n[reports]\ndir = \"{dir}\"\ntimezone = \"{timezone}\"\n\n[reconcile]\nmissing_grace = \"1h\"\nevery = \"1h\"\n",
            ledger_mode(config)
        )
    }
}

/// The book of 2026-11-20 (UTC): a match, a cent off, a cash-out the ledger lacks, a
/// ledger entry the provider never saw, a wrong Mannco fee, a formula in an id; then a
/// reversal three days later.
async fn book_of_the_20th(app: &TestApp) {
    let mut ord1 = expected("fiserv", "ord-1", 10_000, "BRL");
    ord1.provider_ref = Some("tx-1".to_string());
    ord1.created_at = Some(at("2026-11-20T08:50:00Z"));
    app.expect(ord1, "2026-11-20T09:00:00Z").await;
    let mut ord2 = expected("fiserv", "ord-2", 5_000, "BRL");
    ord2.provider_ref = Some("tx-2".to_string());
    ord2.created_at = Some(at("2026-11-20T08:51:00Z"));
    app.expect(ord2, "2026-11-20T09:00:00Z").await;
    let mut ord3 = expected("fiserv", "ord-3", 1_000, "BRL");
    ord3.created_at = Some(at("2026-11-20T08:52:00Z"));
    app.expect(ord3, "2026-11-20T09:00:00Z").await;
    let mut ordm = expected("mannco", "=ord-m1", 10_000, "USD");
    ordm.provider_ref = Some("4567".to_string());
    ordm.created_at = Some(at("2026-11-20T08:53:00Z"));
    app.expect(ordm, "2026-11-20T09:00:00Z").await;

    let mut tx1 = report("tx-1", CashoutStatus::Completed, "100.00", "BRL");
    tx1.created_at = Some(at("2026-11-20T09:55:00Z"));
    tx1.updated_at = Some(at("2026-11-20T10:00:00Z"));
    app.observe("fiserv", tx1, "2026-11-20T10:00:00Z").await;
    let mut tx2 = report("tx-2", CashoutStatus::Completed, "50.01", "BRL");
    tx2.created_at = Some(at("2026-11-20T09:56:00Z"));
    app.observe("fiserv", tx2, "2026-11-20T10:05:00Z").await;
    let mut tx9 = report("tx-9", CashoutStatus::Processing, "20.00", "BRL");
    tx9.created_at = Some(at("2026-11-20T09:57:00Z"));
    app.observe("fiserv", tx9, "2026-11-20T10:10:00Z").await;
    let mut m1 = report("4567", CashoutStatus::Completed, "100.00", "USD");
    m1.fee_minor = Some(150);
    m1.net_minor = Some(9_850);
    m1.method = Some("payoneer".to_string());
    m1.created_at = Some(at("2026-11-20T09:58:00Z"));
    app.observe("mannco", m1, "2026-11-20T10:15:00Z").await;
    app.pass_at("2026-11-20T11:00:00Z").await;

    // Three days later the provider reverses tx-1 and tx-9 completes.
    let mut reversal = report("tx-1", CashoutStatus::Reversed, "100.00", "BRL");
    reversal.updated_at = Some(at("2026-11-23T12:00:00Z"));
    app.observe("fiserv", reversal, "2026-11-23T12:00:00Z")
        .await;
    let tx9_done = report("tx-9", CashoutStatus::Completed, "20.00", "BRL");
    app.observe("fiserv", tx9_done, "2026-11-23T12:01:00Z")
        .await;
    app.pass_at("2026-11-23T12:05:00Z").await;
}

fn golden(name: &str, actual: &str) {
    let path = fixtures_dir().join("reports").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("golden file {}: {err}", path.display()));
    assert_eq!(actual, want, "{name} differs from its golden file");
}

#[tokio::test]
async fn a_closed_day_reads_the_book_as_it_stood_and_never_changes() {
    let reports = tempfile::tempdir().unwrap();
    let app = spawn_app_with(with_reports(reports.path(), "UTC")).await;
    book_of_the_20th(&app).await;
    let later = "2026-11-30T12:00:00Z";

    let (day, summary) = app.report_text_of("2026-11-20", later).await;
    golden("2026-11-20.csv", &day);
    golden("2026-11-20.summary.json", &summary);
    let tx1_on_20th = day.lines().find(|l| l.contains(",tx-1,")).unwrap();
    assert!(tx1_on_20th.contains(",completed,"), "{tx1_on_20th}");

    let (day3, _) = app.report_of("2026-11-23", later).await;
    let tx1_on_23rd = day3.lines().find(|l| l.contains(",tx-1,")).unwrap();
    assert!(tx1_on_23rd.contains(",reversed,"), "{tx1_on_23rd}");
    let tx9_on_23rd = day3.lines().find(|l| l.contains(",tx-9,")).unwrap();
    assert!(
        tx9_on_23rd.ends_with(",matched,") || tx9_on_23rd.contains(",mismatch,unknown_to_ledger"),
        "{tx9_on_23rd}"
    );
    // Unresolved breaks are carried forward: the 21st changed nothing, yet lists them.
    let (day1, _) = app.report_of("2026-11-21", later).await;
    assert!(
        day1.contains(",tx-2,"),
        "amount break carried forward:\n{day1}"
    );
    assert!(
        day1.contains(",ord-3,"),
        "missing entry carried forward:\n{day1}"
    );
    assert!(
        !day1.contains(",tx-1,"),
        "a matched cash-out is not:\n{day1}"
    );

    // Regenerating the closed day after later changes gives the same bytes.
    std::fs::remove_dir_all(reports.path()).unwrap();
    let (again, _) = app.report_of("2026-11-20", "2026-12-30T00:00:00Z").await;
    assert_eq!(again, day, "a closed day is byte-identical forever");
    app.stop().await;
}

#[tokio::test]
async fn a_change_late_in_the_local_day_belongs_to_that_local_date() {
    let reports = tempfile::tempdir().unwrap();
    let app = spawn_app_with(with_reports(reports.path(), "America/Sao_Paulo")).await;
    // 23:30 in São Paulo on the 20th is 02:30 UTC on the 21st.
    let late = report("tx-late", CashoutStatus::Completed, "1.00", "BRL");
    app.observe("fiserv", late, "2026-11-21T02:30:00Z").await;
    let later = "2026-11-30T12:00:00Z";
    let (twentieth, summary) = app.report_of("2026-11-20", later).await;
    assert!(twentieth.contains(",tx-late,"), "{twentieth}");
    assert_eq!(summary["timezone"], "America/Sao_Paulo");
    let (twenty_first, _) = app.report_of("2026-11-21", later).await;
    assert!(!twenty_first.contains(",tx-late,"), "{twenty_first}");
    app.stop().await;
}

#[tokio::test]
async fn the_csv_loads_in_a_csv_reader_with_typed_columns_and_the_summary_adds_up() {
    let reports = tempfile::tempdir().unwrap();
    let app = spawn_app_with(with_reports(reports.path(), "UTC")).await;
    book_of_the_20th(&app).await;
    let (csv, summary) = app.report_of("2026-11-20", "2026-11-30T00:00:00Z").await;

    let mut reader = csv::Reader::from_reader(csv.as_bytes());
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(
        header.join(","),
        "report_date,provider,provider_ref,external_id,currency,expected_amount,provider_amount,fee,net_amount,status,provider_status,created_at,updated_at,completed_at,webhooks,recovered_by_poll,match,mismatches"
    );
    let mut rows = 0;
    let mut sums: std::collections::BTreeMap<(String, String), [rust_decimal::Decimal; 4]> =
        Default::default();
    for record in reader.records() {
        let record = record.expect("a well-formed CSV record");
        rows += 1;
        assert_eq!(&record[0], "2026-11-20");
        let decimal = |i: usize| -> rust_decimal::Decimal {
            if record[i].is_empty() {
                rust_decimal::Decimal::ZERO
            } else {
                record[i]
                    .parse()
                    .unwrap_or_else(|_| panic!("column {i} is a decimal: {:?}", &record[i]))
            }
        };
        for column in [11, 12, 13] {
            if !record[column].is_empty() {
                DateTime::parse_from_rfc3339(&record[column]).expect("RFC 3339 time");
                assert!(record[column].ends_with('Z'), "UTC: {}", &record[column]);
            }
        }
        record[14].parse::<u64>().expect("webhooks is a count");
        record[15]
            .parse::<u64>()
            .expect("recovered_by_poll is a count");
        assert!(["matched", "open", "mismatch"].contains(&&record[16]));
        assert_eq!(record[16] == *"mismatch", !record[17].is_empty());
        let entry = sums
            .entry((record[1].to_string(), record[4].to_string()))
            .or_default();
        for (slot, column) in [5, 6, 7, 8].into_iter().enumerate() {
            entry[slot] += decimal(column);
        }
    }
    assert_eq!(summary["rows"], rows);
    for totals in summary["totals"].as_array().unwrap() {
        let key = (
            totals["provider"].as_str().unwrap().to_string(),
            totals["currency"].as_str().unwrap().to_string(),
        );
        let column_sums = sums[&key];
        for (slot, name) in ["expected_amount", "provider_amount", "fees", "net_amount"]
            .into_iter()
            .enumerate()
        {
            let total: rust_decimal::Decimal = totals[name].as_str().unwrap().parse().unwrap();
            assert_eq!(total, column_sums[slot], "{name} of {key:?}");
        }
    }
    // The formula in the Mannco entry's external id is escaped.
    assert!(csv.contains(",'=ord-m1,"), "{csv}");
    app.stop().await;
}

#[tokio::test]
async fn a_mismatch_opens_within_one_pass_of_its_webhook_and_resolves_when_fixed() {
    let reports = tempfile::tempdir().unwrap();
    let app = spawn_app_with(move |config| {
        format!(
            "{}\n[reports]\ndir = \"{}\"\n\n[reconcile]\nevery = \"200ms\"\n",
            ledger_mode(config),
            reports.path().display()
        )
    })
    .await;
    let body = FiservBody::new("tx-unknown", 3).amount("\"12.34\"").bytes();
    let headers = fiserv_headers(&body, "/webhooks/fiserv", FISERV_SECRET, now_unix(), "r-1");
    assert_accepted(&app.post_webhook("fiserv", &headers, &body).await, "first");

    let open = app
        .wait_for_mismatch(
            "unknown_to_ledger",
            "tx-unknown",
            true,
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(open["provider"], "fiserv");

    // The platform registers it (by provider_ref): the cause is gone.
    let (status, _) = app
        .post_json(
            "/api/v1/ledger",
            Some(ADMIN_TOKEN),
            serde_json::json!({"provider": "fiserv", "external_id": "ord-77", "amount": "12.34",
                               "currency": "BRL", "provider_ref": "tx-unknown"}),
        )
        .await;
    assert_eq!(status, 200);
    let resolved = app
        .wait_for_mismatch(
            "unknown_to_ledger",
            "tx-unknown",
            false,
            Duration::from_secs(10),
        )
        .await;
    assert!(resolved["resolved_at"].is_string(), "{resolved}");
    let cashout = app.get_cashout("fiserv", "tx-unknown").await.1;
    assert_eq!(
        cashout["external_id"], "ord-77",
        "it shows the ledger's external_id"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_reports_role_reads_reports_only_and_admin_reads_everything() {
    let reports = tempfile::tempdir().unwrap();
    let app = spawn_app_with(with_reports(reports.path(), "UTC")).await;
    let today = Utc::now().format("%Y-%m-%d").to_string();

    let (status, _) = app
        .post_with_token(
            &format!("/api/v1/reconcile?date={today}"),
            Some(REPORTS_TOKEN),
        )
        .await;
    assert_eq!(status, 403, "reports token on an admin endpoint");
    let (status, _) = app
        .get_with_token("/api/v1/mismatches", Some(REPORTS_TOKEN))
        .await;
    assert_eq!(status, 403);
    let (status, summary) = app
        .post_with_token(
            &format!("/api/v1/reconcile?date={today}"),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(summary["final"], false, "today is provisional");
    assert_eq!(summary["date"], today.as_str());

    for token in [REPORTS_TOKEN, ADMIN_TOKEN] {
        let (status, list) = app.get_with_token("/api/v1/reports", Some(token)).await;
        assert_eq!(status, 200);
        assert_eq!(list["items"][0]["date"], today.as_str(), "{list}");
        let (status, csv) = app
            .get_with_token(&format!("/api/v1/reports/{today}.csv"), Some(token))
            .await;
        assert_eq!(status, 200);
        assert!(csv.as_str().unwrap().starts_with("report_date,provider,"));
        let (status, summary) = app
            .get_with_token(&format!("/api/v1/reports/{today}/summary"), Some(token))
            .await;
        assert_eq!(status, 200);
        assert_eq!(summary["date"], today.as_str());
    }
    let (status, _) = app.get_with_token("/api/v1/reports", None).await;
    assert_eq!(status, 401);
    // A day generated on first request when absent.
    let (status, csv) = app
        .get_with_token("/api/v1/reports/2026-01-02.csv", Some(REPORTS_TOKEN))
        .await;
    assert_eq!(status, 200);
    assert_eq!(csv.as_str().unwrap().lines().count(), 1, "header only");
    app.stop().await;
}

#[tokio::test]
async fn bad_reconciliation_parameters_are_400s_naming_the_parameter() {
    let app = spawn_app().await;
    for (path, names) in [
        ("/api/v1/mismatches?kind=missing", "kind"),
        ("/api/v1/mismatches?open=maybe", "open"),
        ("/api/v1/mismatches?limit=abc", "limit"),
        ("/api/v1/mismatches?date=20-11-2026", "date"),
        ("/api/v1/mismatches?cursor=zzz", "cursor"),
        ("/api/v1/mismatches?colour=red", "colour"),
    ] {
        let (status, body) = app.get_with_token(path, Some(ADMIN_TOKEN)).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(names),
            "{path}: {body}"
        );
        assert!(body["code"].is_string(), "{path}: {body}");
    }
    let (status, body) = app
        .post_with_token("/api/v1/reconcile?date=2999-01-01", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(status, 400, "{body}");
    app.stop().await;
}

#[tokio::test]
async fn mismatches_filter_by_date_kind_and_open_and_paginate() {
    let reports = tempfile::tempdir().unwrap();
    let app = spawn_app_with(with_reports(reports.path(), "UTC")).await;
    book_of_the_20th(&app).await;
    let (status, page) = app
        .get_with_token(
            "/api/v1/mismatches?date=2026-11-20&open=true",
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 200, "{page}");
    let kinds: std::collections::BTreeSet<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        vec![
            "amount_mismatch",
            "fee_mismatch",
            "missing_at_provider",
            "unknown_to_ledger"
        ],
        "{page}"
    );
    let (_, resolved) = app
        .get_with_token(
            "/api/v1/mismatches?kind=unknown_to_ledger&open=false",
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(
        resolved["items"].as_array().unwrap().len(),
        0,
        "tx-9 never had a ledger entry: still open"
    );
    let (_, stuck) = app
        .get_with_token(
            "/api/v1/mismatches?kind=stuck&open=false",
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(
        stuck["items"][0]["subject"], "tx-9",
        "resolved once it completed: {stuck}"
    );
    let mut seen = Vec::new();
    let mut path = "/api/v1/mismatches?limit=2".to_string();
    loop {
        let (_, page) = app.get_with_token(&path, Some(ADMIN_TOKEN)).await;
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_i64().unwrap()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/api/v1/mismatches?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    sorted.dedup();
    assert_eq!(seen, sorted, "newest first, each once");
    assert_eq!(seen.len(), 5, "{seen:?}");
    app.stop().await;
}

#[tokio::test]
async fn the_reconcile_command_writes_the_days_files_and_refuses_a_bad_date() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[store]\npath = \"book.db\"\n\n[reports]\ndir = \"reports\"\n\n\
         [[providers]]\nid = \"mannco\"\nkind = \"mannco\"\nbase_url = \"http://127.0.0.1:9\"\nledger = true\n",
    )
    .unwrap();
    let run = |date: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cashout-recon"))
            .args(["reconcile", "--date", date, "--config"])
            .arg(&config)
            .output()
            .expect("the binary runs")
    };
    let done = run("2026-11-20");
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(stdout.contains("reconciled 2026-11-20"), "{stdout}");
    let csv = std::fs::read_to_string(dir.path().join("reports/2026-11-20.csv")).unwrap();
    assert!(
        csv.starts_with("report_date,provider,provider_ref,"),
        "{csv}"
    );
    let summary: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("reports/2026-11-20.summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["final"], true);

    let refused = run("20/11/2026");
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--date"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[tokio::test]
async fn rows_follow_the_csvs_own_created_at_column_within_one_second() {
    // Review finding: rows were sorted on the millisecond created_at while the column
    // shows whole seconds, so a reader sorting by (provider, created_at, provider_ref)
    // saw them out of order. Within one second: the ledger-only row (empty ref) first,
    // then the cash-outs by provider_ref.
    let reports = tempfile::tempdir().unwrap();
    let app = spawn_app_with(with_reports(reports.path(), "UTC")).await;
    let mut missing = expected("fiserv", "ord-missing", 1_000, "BRL");
    missing.created_at = Some(at("2026-11-20T10:00:00.500Z"));
    app.expect(missing, "2026-11-20T09:00:00Z").await;
    let mut late = report("tx-a", CashoutStatus::Completed, "10.00", "BRL");
    late.created_at = Some(at("2026-11-20T10:00:00.900Z"));
    app.observe("fiserv", late, "2026-11-20T10:01:00Z").await;
    let mut early = report("tx-b", CashoutStatus::Completed, "10.00", "BRL");
    early.created_at = Some(at("2026-11-20T10:00:00.100Z"));
    app.observe("fiserv", early, "2026-11-20T10:02:00Z").await;
    app.pass_at("2026-11-20T12:00:00Z").await;

    let (csv, _) = app.report_of("2026-11-20", "2026-11-30T00:00:00Z").await;
    let mut reader = csv::Reader::from_reader(csv.as_bytes());
    let keys: Vec<(String, String, String)> = reader
        .records()
        .map(|record| {
            let record = record.expect("a CSV record");
            (
                record[1].to_string(),
                record[11].to_string(),
                record[2].to_string(),
            )
        })
        .collect();
    let refs: Vec<&str> = keys.iter().map(|k| k.2.as_str()).collect();
    assert_eq!(refs, ["", "tx-a", "tx-b"], "{csv}");
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "ordered by its own columns:\n{csv}");
    app.stop().await;
}

#[tokio::test]
async fn a_poll_that_changes_nothing_does_not_put_a_cash_out_in_that_days_report() {
    // Review finding: every polled observation kept a snapshot of its cash-out, so a
    // sweep's overlap or a recheck of a completed cash-out the next day listed it in that
    // day's CSV although nothing of it changed (SPEC §6: created, changed or flagged).
    let reports = tempfile::tempdir().unwrap();
    let app = spawn_app_with(with_reports(reports.path(), "UTC")).await;
    let mut entry = expected("fiserv", "ord-1", 10_000, "BRL");
    entry.provider_ref = Some("tx-1".to_string());
    app.expect(entry, "2026-11-20T09:00:00Z").await;
    let mut done = report("tx-1", CashoutStatus::Completed, "100.00", "BRL");
    done.created_at = Some(at("2026-11-20T09:55:00Z"));
    done.updated_at = Some(at("2026-11-20T10:00:00Z"));
    app.observe("fiserv", done.clone(), "2026-11-20T10:00:00Z")
        .await;
    app.pass_at("2026-11-20T11:00:00Z").await;
    // The next day's sweep (its overlap) and a recheck read it again, unchanged.
    app.observe("fiserv", done.clone(), "2026-11-21T00:05:00Z")
        .await;
    app.observe("fiserv", done, "2026-11-21T01:00:00Z").await;
    app.pass_at("2026-11-21T02:00:00Z").await;

    let (day, _) = app.report_of("2026-11-20", "2026-11-30T00:00:00Z").await;
    assert!(day.contains(",tx-1,"), "{day}");
    let (next, _) = app.report_of("2026-11-21", "2026-11-30T00:00:00Z").await;
    assert!(
        !next.contains(",tx-1,"),
        "nothing changed on the 21st:\n{next}"
    );
    // The timeline still shows the polls.
    let (_, cashout) = app.get_cashout("fiserv", "tx-1").await;
    let polls = cashout["events"].as_array().map_or(0, |events| {
        events.iter().filter(|e| e["source"] == "poll").count()
    });
    assert_eq!(polls, 3, "{cashout}");

    // A poll that does change something (the fee, learned on the 22nd) still counts.
    let mut with_fee = report("tx-1", CashoutStatus::Completed, "100.00", "BRL");
    with_fee.fee_minor = Some(50);
    app.observe("fiserv", with_fee, "2026-11-22T10:00:00Z")
        .await;
    let (third, _) = app.report_of("2026-11-22", "2026-11-30T00:00:00Z").await;
    assert!(
        third.contains(",tx-1,"),
        "the fee changed on the 22nd:\n{third}"
    );
    app.stop().await;
}
