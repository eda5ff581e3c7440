//! `import-ledger` (SPEC §1, §5): the real binary against the store of a running daemon —
//! all or nothing, idempotent, errors naming line and column, the same rules as
//! `POST /api/v1/ledger`, and the book's cash-outs taking the ledger's `external_id`.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{
    assert_accepted, base_config, fiserv_headers, fixtures_dir, now_unix, spawn_sqlite_app,
    test_env, FiservBody, TestApp, ADMIN_TOKEN, FISERV_SECRET,
};

const HEADER: &str = "provider,external_id,amount,currency,provider_ref,created_at";

/// A config file for the binary naming the test app's store (key paths made absolute).
fn write_config(app: &TestApp, dir: &Path) -> PathBuf {
    let keys = format!("{}/keys/", fixtures_dir().display());
    let text =
        base_config(&app.db_path, "http://127.0.0.1:9").replace("\"keys/", &format!("\"{keys}"));
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("config written");
    path
}

/// Runs `cashout-recon import-ledger` on `csv` (the file's text) against the app's store.
async fn import(app: &TestApp, csv: &str) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(app, dir.path());
    let file = dir.path().join("ledger.csv");
    std::fs::write(&file, csv).expect("ledger written");
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_cashout-recon"))
        .arg("import-ledger")
        .arg(&file)
        .arg("--config")
        .arg(&config)
        .envs(test_env())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("import-ledger finishes within two minutes")
        .expect("import-ledger runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The ledger as stored: `(provider, external_id, amount_minor, currency, provider_ref)`.
fn ledger_rows(app: &TestApp) -> Vec<(String, String, i64, String, Option<String>)> {
    let connection = rusqlite::Connection::open_with_flags(
        &app.db_path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("store opens");
    let mut statement = connection
        .prepare(
            "SELECT provider, external_id, amount_minor, currency, provider_ref FROM ledger
             ORDER BY provider, external_id",
        )
        .expect("query");
    let rows = statement
        .query_map([], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
            ))
        })
        .expect("rows");
    rows.collect::<Result<_, _>>().expect("ledger rows")
}

async fn post_ledger(app: &TestApp, body: Value) -> (u16, Value) {
    let response = app
        .client
        .post(format!("{}/api/v1/ledger", app.address))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .expect("ledger request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn assert_exit(output: &Output, code: i32, case: &str) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "{case}: exit code; stdout: {}\nstderr: {}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

#[tokio::test]
async fn a_good_file_imports_and_importing_it_again_changes_nothing() {
    // Arrange: columns in another order, optional cells empty, one row repeated as is.
    let app = spawn_sqlite_app().await;
    let csv = "currency,amount,provider,external_id,created_at,provider_ref\n\
               BRL,12.34,fiserv,ord-1,2026-11-20T12:00:00Z,tx-1\n\
               JPY,1500,simpay,ord-2,,\n\
               KWD,1.234,mannco,ord-3,,m-3\n\
               BRL,12.34,fiserv,ord-1,2026-11-20T12:00:00Z,tx-1\n";

    // Act
    let first = import(&app, csv).await;
    let second = import(&app, csv).await;

    // Assert
    assert_exit(&first, 0, "first import");
    assert!(
        text(&first.stdout).contains("3 new, 0 already registered"),
        "first import: {}",
        text(&first.stdout)
    );
    assert_exit(&second, 0, "second import");
    assert!(
        text(&second.stdout).contains("0 new, 3 already registered"),
        "second import: {}",
        text(&second.stdout)
    );
    let expected = vec![
        (
            "fiserv".to_string(),
            "ord-1".to_string(),
            1234,
            "BRL".to_string(),
            Some("tx-1".to_string()),
        ),
        (
            "mannco".to_string(),
            "ord-3".to_string(),
            1234,
            "KWD".to_string(),
            Some("m-3".to_string()),
        ),
        (
            "simpay".to_string(),
            "ord-2".to_string(),
            1500,
            "JPY".to_string(),
            None,
        ),
    ];
    assert_eq!(ledger_rows(&app), expected);
    // The API sees the imported entry as the same one.
    let (status, body) = post_ledger(
        &app,
        json!({"provider": "fiserv", "external_id": "ord-1", "amount": "12.34", "currency": "BRL",
               "provider_ref": "tx-1", "created_at": "2026-11-20T12:00:00Z"}),
    )
    .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("unchanged")),
        "{body}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_file_with_one_bad_row_imports_nothing_exits_2_and_names_line_and_column() {
    // Arrange
    let app = spawn_sqlite_app().await;
    let csv = format!(
        "{HEADER}\n\
         fiserv,ord-1,10.00,BRL,tx-1,\n\
         fiserv,ord-2,12.345,BRL,tx-2,\n\
         fiserv,ord-3,10.00,BRL,tx-3,\n"
    );

    // Act
    let output = import(&app, &csv).await;

    // Assert
    assert_exit(&output, 2, "one bad row");
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("1 bad row of 3, nothing imported"),
        "{stderr}"
    );
    assert!(
        stderr.contains(r#"line 3, column amount: "12.345" has more decimals than BRL allows (2)"#),
        "{stderr}"
    );
    assert!(ledger_rows(&app).is_empty(), "nothing may be imported");
    app.stop().await;
}

#[tokio::test]
async fn an_in_file_conflict_imports_nothing() {
    // Arrange: ord-1 twice with different amounts.
    let app = spawn_sqlite_app().await;
    let csv = format!(
        "{HEADER}\n\
         fiserv,ord-1,10.00,BRL,tx-1,\n\
         fiserv,ord-2,11.00,BRL,tx-2,\n\
         fiserv,ord-1,10.01,BRL,tx-1,\n"
    );

    // Act
    let output = import(&app, &csv).await;

    // Assert
    assert_exit(&output, 2, "in-file conflict");
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("line 4, column amount: fiserv/ord-1 is also on line 2 with other values"),
        "{stderr}"
    );
    assert!(ledger_rows(&app).is_empty(), "nothing may be imported");
    app.stop().await;
}

#[tokio::test]
async fn a_conflict_with_an_entry_registered_through_the_api_imports_nothing() {
    // Arrange
    let app = spawn_sqlite_app().await;
    let (status, body) = post_ledger(
        &app,
        json!({"provider": "fiserv", "external_id": "ord-9", "amount": "10.00", "currency": "BRL"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let csv = format!(
        "{HEADER}\n\
         fiserv,ord-8,5.00,BRL,,\n\
         fiserv,ord-9,12.00,BRL,,\n"
    );

    // Act
    let output = import(&app, &csv).await;

    // Assert
    assert_exit(&output, 2, "conflict with the store");
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("line 3, column amount: fiserv/ord-9 is already registered with other values (amount 12.00 BRL here, 10.00 BRL registered)"),
        "{stderr}"
    );
    let rows = ledger_rows(&app);
    assert_eq!(rows.len(), 1, "only the API's entry: {rows:?}");
    assert_eq!(rows[0].2, 1000);
    app.stop().await;
}

#[tokio::test]
async fn an_imported_entry_gives_the_known_cash_out_its_external_id() {
    // Arrange: the book knows Fiserv cash-out 7400001 from a webhook, without an external_id.
    let app = spawn_sqlite_app().await;
    let body = FiservBody::new("7400001", 3).bytes();
    let headers = fiserv_headers(
        &body,
        "/webhooks/fiserv",
        FISERV_SECRET,
        now_unix(),
        "req-7400001",
    );
    assert_accepted(
        &app.post_webhook("fiserv", &headers, &body).await,
        "fiserv webhook",
    );
    let before = app
        .wait_for_cashout("fiserv", "7400001", Duration::from_secs(10), |_| true)
        .await;
    assert_eq!(before["external_id"], Value::Null);
    let csv = format!("{HEADER}\nfiserv,ord-link-1,1234567.89,BRL,7400001,\n");

    // Act
    let output = import(&app, &csv).await;

    // Assert
    assert_exit(&output, 0, "linking import");
    let (status, after) = app.get_cashout("fiserv", "7400001").await;
    assert_eq!(status, 200);
    assert_eq!(after["external_id"], "ord-link-1", "{after}");
    app.stop().await;
}

#[tokio::test]
async fn the_api_refuses_what_the_import_refuses_naming_the_field() {
    // Arrange
    let app = spawn_sqlite_app().await;
    let base =
        json!({"provider": "fiserv", "external_id": "ord-1", "amount": "10.00", "currency": "BRL"});
    let with = |changes: &[(&str, Value)]| {
        let mut body = base.clone();
        for (key, value) in changes {
            body[*key] = value.clone();
        }
        body
    };
    let cases = [
        (
            with(&[("amount", json!("12.345"))]),
            r#"amount: "12.345" has more decimals than BRL allows (2)"#,
            "three decimals in BRL",
        ),
        (
            with(&[("amount", json!(1.5)), ("currency", json!("JPY"))]),
            r#"amount: "1.5" has more decimals than JPY allows (0)"#,
            "decimals in JPY, amount as a JSON number",
        ),
        (
            with(&[("currency", json!("ZZZ"))]),
            r#"currency: "ZZZ" is not an ISO 4217 currency code"#,
            "unknown currency",
        ),
        (
            with(&[("external_id", json!("ord\u{1}"))]),
            "external_id: contains a control character",
            "control character",
        ),
        (
            with(&[("provider", json!("paypal"))]),
            r#"provider: "paypal" is not a configured provider"#,
            "unknown provider",
        ),
        (
            with(&[("amount", json!("-1"))]),
            r#"amount: "-1" is negative"#,
            "negative",
        ),
    ];

    for (body, message, why) in cases {
        // Act
        let (status, answer) = post_ledger(&app, body).await;

        // Assert
        assert_eq!(status, 422, "{why}: {answer}");
        assert_eq!(answer["error"], message, "{why}");
    }
    assert!(ledger_rows(&app).is_empty());
    app.stop().await;
}
