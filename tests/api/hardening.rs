//! The findings of the hardening review (issue 9), each kept closed by a test: replay
//! under re-encoded signatures, ids that break the id rule, auth before body, the read
//! deadline, bounded rejection logs, readiness that tells the truth.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{
    assert_accepted, fiserv_headers, hmac_headers, now_unix, spawn_app, spawn_app_in,
    spawn_app_with, spawn_sqlite_app_with, tupay_headers, FiservBody, TestApp, ADMIN_TOKEN,
    FISERV_SECRET, HMAC_SECRET, TUPAY_SECRET,
};

/// `headers` with `name` set to `value` (added when absent).
fn with_header(
    headers: &[(&'static str, String)],
    name: &'static str,
    value: &str,
) -> Vec<(&'static str, String)> {
    let mut changed: Vec<(&'static str, String)> = headers
        .iter()
        .filter(|(n, _)| *n != name)
        .cloned()
        .collect();
    changed.push((name, value.to_string()));
    changed
}

fn header_of<'a>(headers: &'a [(&'static str, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} header"))
}

/// The quarantine reason stored with event `event_id`.
async fn quarantine_reason(app: &TestApp, event_id: &str) -> String {
    app.state
        .store
        .get_event(event_id.to_string())
        .await
        .expect("read the event")
        .and_then(|event| event.error)
        .expect("the quarantined event is stored with its reason")
}

async fn open_alert_texts(app: &TestApp) -> Vec<String> {
    let (status, alerts) = app
        .get_with_token("/api/v1/alerts?open=true", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(status, 200, "{alerts}");
    alerts["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|alert| alert["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn fiserv_signature_re_encoded_under_a_fresh_request_id_is_a_duplicate() {
    // Arrange: one genuine webhook, accepted.
    let app = spawn_app().await;
    let body = FiservBody::new("7300001", 3).bytes();
    let genuine = fiserv_headers(
        &body,
        "/webhooks/fiserv",
        FISERV_SECRET,
        now_unix(),
        "req-1",
    );
    let first = assert_accepted(
        &app.post_webhook("fiserv", &genuine, &body).await,
        "genuine",
    );
    let signature = header_of(&genuine, "x-hmac-signature").to_string();
    let unpadded = signature.trim_end_matches('=').to_string();
    let variants = [
        format!("sha256={signature}"),
        unpadded.clone(),
        format!("SHA256={unpadded}"),
        format!("Sha256={signature}"),
    ];

    for (n, variant) in variants.iter().enumerate() {
        // Act: the same signature written another way, under a request id never seen.
        let replay = with_header(
            &with_header(&genuine, "x-hmac-signature", variant),
            "x-request-id",
            &format!("req-replay-{n}"),
        );
        let answer = app.post_webhook("fiserv", &replay, &body).await;

        // Assert
        assert_eq!(
            answer,
            (200, json!({"status": "duplicate", "event_id": first})),
            "signature written as {variant}"
        );
    }
    let cashout = app.get_cashout("fiserv", "7300001").await.1;
    assert_eq!(
        cashout["events"].as_array().map(Vec::len),
        Some(1),
        "{cashout}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_signature_replayed_after_a_restart_is_still_a_duplicate() {
    // Arrange: one genuine webhook accepted and a quarantined one, then the daemon
    // restarted on the same store (SQLite reads its replay cache back from the events).
    let app = spawn_app().await;
    let body = FiservBody::new("7300011", 3).bytes();
    let genuine = fiserv_headers(
        &body,
        "/webhooks/fiserv",
        FISERV_SECRET,
        now_unix(),
        "req-r1",
    );
    let first = assert_accepted(
        &app.post_webhook("fiserv", &genuine, &body).await,
        "genuine",
    );
    let garbled = br#"{"txid": 7}"#.to_vec();
    let quarantined_headers = fiserv_headers(
        &garbled,
        "/webhooks/fiserv",
        FISERV_SECRET,
        now_unix(),
        "req-r2",
    );
    let (status, quarantined) = app
        .post_webhook("fiserv", &quarantined_headers, &garbled)
        .await;
    assert_eq!(
        (status, &quarantined["status"]),
        (202, &json!("quarantined")),
        "{quarantined}"
    );
    let store = app.stop_keeping_store().await;
    let app = spawn_app_in(store, |config| config).await;

    // Act: each request again under a request id never seen, and a new webhook.
    let replay = with_header(&genuine, "x-request-id", "req-after-restart");
    let again = app.post_webhook("fiserv", &replay, &body).await;
    let replay = with_header(&quarantined_headers, "x-request-id", "req-after-restart-2");
    let quarantined_again = app.post_webhook("fiserv", &replay, &garbled).await;
    let fresh_body = FiservBody::new("7300012", 3).bytes();
    let fresh = fiserv_headers(
        &fresh_body,
        "/webhooks/fiserv",
        FISERV_SECRET,
        now_unix(),
        "req-r3",
    );

    // Assert
    assert_eq!(
        again,
        (200, json!({"status": "duplicate", "event_id": first}))
    );
    assert_eq!(
        quarantined_again,
        (
            200,
            json!({"status": "duplicate", "event_id": quarantined["event_id"]})
        )
    );
    assert_accepted(
        &app.post_webhook("fiserv", &fresh, &fresh_body).await,
        "fresh",
    );
    app.stop().await;
}

#[tokio::test]
async fn hex_signature_in_another_case_under_a_fresh_event_id_is_a_duplicate() {
    // Arrange: the generic hmac scheme signs the timestamp and body, not `x-event-id`.
    let app = spawn_app().await;
    let body = FiservBody::new("7300002", 3).bytes();
    let genuine = hmac_headers(&body, HMAC_SECRET, now_unix(), "evt-1");
    let first = assert_accepted(
        &app.post_webhook("fiserv-hmac", &genuine, &body).await,
        "genuine",
    );
    let upper = header_of(&genuine, "x-signature").to_uppercase();
    let replay = with_header(
        &with_header(&genuine, "x-signature", &upper),
        "x-event-id",
        "evt-replay",
    );

    // Act
    let answer = app.post_webhook("fiserv-hmac", &replay, &body).await;

    // Assert
    assert_eq!(
        answer,
        (200, json!({"status": "duplicate", "event_id": first}))
    );
    app.stop().await;
}

#[tokio::test]
async fn empty_request_id_is_treated_as_absent() {
    // Arrange: two different webhooks, both with an empty x-request-id.
    let app = spawn_app().await;
    let one = FiservBody::new("7300003", 2).bytes();
    let two = FiservBody::new("7300004", 2).bytes();

    // Act
    let first = app
        .post_webhook(
            "fiserv",
            &fiserv_headers(&one, "/webhooks/fiserv", FISERV_SECRET, now_unix(), ""),
            &one,
        )
        .await;
    let second = app
        .post_webhook(
            "fiserv",
            &fiserv_headers(&two, "/webhooks/fiserv", FISERV_SECRET, now_unix(), ""),
            &two,
        )
        .await;

    // Assert: each is its own event (an empty id is no dedup key), not a replay.
    assert_accepted(&first, "first");
    assert_accepted(&second, "second, with another body");
    app.stop().await;
}

#[tokio::test]
async fn webhook_whose_id_breaks_the_id_rule_is_quarantined_naming_the_field_not_the_value() {
    let app = spawn_app().await;
    let long = "L".repeat(60_000);
    let cases: [(&str, &str, &str); 5] = [
        (&long, "txid: longer than 128 characters", "a 60 KB txid"),
        ("a\u{0}b", "txid: contains a control character", "NUL"),
        (
            "a\u{1b}[2J\r\nb",
            "txid: contains a control character",
            "ESC and CRLF",
        ),
        (
            "abc\u{202E}fed",
            "txid: contains a bidirectional override character",
            "RLO",
        ),
        (
            "..",
            "txid: is a dot segment or contains '/'",
            "a dot segment",
        ),
    ];
    for (n, (txid, reason, case)) in cases.iter().enumerate() {
        // Arrange
        let body = serde_json::to_vec(&json!({
            "txid": txid, "status": 3, "failReason": null, "amount": "10.00",
            "currency": "BRL", "endToEnd": null, "updatedAt": "2026-11-20T12:00:00Z"
        }))
        .expect("body");
        let headers = fiserv_headers(
            &body,
            "/webhooks/fiserv",
            FISERV_SECRET,
            now_unix(),
            &format!("req-bad-id-{n}"),
        );

        // Act
        let answer = app.post_webhook("fiserv", &headers, &body).await;

        // Assert
        assert_eq!(answer.0, 202, "{case}: {}", answer.1);
        assert_eq!(answer.1["status"], "quarantined", "{case}");
        let stored =
            quarantine_reason(&app, answer.1["event_id"].as_str().unwrap_or_default()).await;
        assert_eq!(stored, *reason, "{case}");
    }
    let texts = open_alert_texts(&app).await;
    assert!(
        texts
            .iter()
            .all(|text| text.len() < 300 && !text.contains("LLLL")),
        "no alert repeats a value: {texts:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn tupay_cashout_id_that_is_not_utf8_is_quarantined_and_never_queued() {
    // Arrange: a genuine control (it covers external_id only) with cashout_id %FF%FE.
    let app = spawn_app().await;
    let control = cashout_recon::verify::form_control::control(
        TUPAY_SECRET.as_bytes(),
        "Be4",
        "ext-ff",
        "Bo7",
    );
    let body = format!("cashout_id=%FF%FE&external_id=ext-ff&control={control}").into_bytes();

    // Act
    let answer = app.post_webhook("tupay", &tupay_headers(), &body).await;

    // Assert
    assert_eq!(answer.0, 202, "{}", answer.1);
    let queued = app
        .state
        .store
        .pending_status_fetches("tupay".into(), 1000)
        .await
        .expect("read the fetch queue");
    assert!(queued.is_empty(), "nothing queued: {queued:?}");
    app.stop().await;
}

#[tokio::test]
async fn ledger_without_a_token_and_with_a_bad_body_is_401_not_400() {
    let app = spawn_app().await;
    for (token, expected, case) in [
        (None, 401, "no token"),
        (Some("wrong"), 401, "a wrong token"),
        (
            Some(crate::helpers::REPORTS_TOKEN),
            403,
            "the reports token",
        ),
        (
            Some(ADMIN_TOKEN),
            400,
            "the admin token: now the body is read",
        ),
    ] {
        // Act
        let mut request = app
            .client
            .post(format!("{}/api/v1/ledger", app.address))
            .header("content-type", "application/json")
            .body("{not json");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("POST /api/v1/ledger");

        // Assert
        let status = response.status().as_u16();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(status, expected, "{case}: {answer}");
        assert!(answer["code"].is_string(), "{case}: {answer}");
    }
    app.stop().await;
}

/// Sends `head` on a raw connection and returns what came back (and how long it took)
/// once the server answered or closed, or after `wait`.
fn send_head_and_wait(address: &str, head: &str, wait: Duration) -> (String, Duration) {
    let authority = address.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(authority).expect("connect");
    stream.set_read_timeout(Some(wait)).expect("read timeout");
    let started = Instant::now();
    stream.write_all(head.as_bytes()).expect("send the head");
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
            Err(_) => break,
        }
    }
    (
        String::from_utf8_lossy(&answer).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn body_that_never_arrives_is_answered_408_within_the_read_timeout() {
    // Arrange: read_timeout of 1 s.
    let app = spawn_app_with(|config| {
        config.replace(
            "max_body_bytes = 65536",
            "max_body_bytes = 65536\nread_timeout = \"1s\"",
        )
    })
    .await;
    let address = app.address.clone();
    let cases = [
        (
            "POST /webhooks/fiserv HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n".to_string(),
            "webhook",
        ),
        (
            format!("POST /api/v1/ledger HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n"),
            "ledger",
        ),
    ];
    for (head, case) in cases {
        // Act
        let address = address.clone();
        let (answer, took) = tokio::task::spawn_blocking(move || {
            send_head_and_wait(&address, &head, Duration::from_secs(20))
        })
        .await
        .expect("raw request");

        // Assert: answered (and closed) long before the 20 s the client would wait.
        assert!(
            took < Duration::from_secs(8),
            "{case}: the connection was held {took:?}"
        );
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "{case}: answered 408, got {answer:?}"
        );
    }
    app.stop().await;
}

/// Polls `GET /readyz` until its status is `status`, or fails after 15 s; returns the body.
async fn wait_for_readyz(app: &TestApp, status: u16) -> String {
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let response = app
            .client
            .get(format!("{}/readyz", app.address))
            .send()
            .await
            .expect("GET /readyz");
        let got = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        if got == status {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "/readyz did not answer {status} within 15 s; last: {got} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sqlite_only_readyz_answers_503_with_the_reason_while_a_real_write_fails() {
    // Arrange: ready; then the database refuses the writes readiness makes, as a
    // read-only file or a full disk would (an empty transaction still commits then).
    let app = spawn_sqlite_app_with(|config| config).await;
    wait_for_readyz(&app, 200).await;
    let side = rusqlite::Connection::open(&app.db_path).expect("open the store file");
    side.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    side.execute_batch(
        "CREATE TRIGGER refuse_heartbeat_update BEFORE UPDATE ON heartbeat
             BEGIN SELECT RAISE(ABORT, 'attempt to write a readonly database'); END;
         CREATE TRIGGER refuse_heartbeat_insert BEFORE INSERT ON heartbeat
             BEGIN SELECT RAISE(ABORT, 'attempt to write a readonly database'); END;",
    )
    .expect("make the heartbeat write fail");

    // Act
    let reason = wait_for_readyz(&app, 503).await;

    // Assert: the reason is given; readiness comes back with the writes.
    assert!(
        reason.contains("readonly"),
        "the reason names the failure: {reason}"
    );
    side.execute_batch(
        "DROP TRIGGER refuse_heartbeat_update; DROP TRIGGER refuse_heartbeat_insert;",
    )
    .expect("let writes through again");
    assert_eq!(wait_for_readyz(&app, 200).await, "ready");
    app.stop().await;
}

#[tokio::test]
async fn ledger_entries_follow_the_id_rule() {
    let app = spawn_app().await;
    for (external_id, provider_ref, message) in [
        ("..", None, "external_id: is a dot segment or contains '/'"),
        (
            "ord\u{1b}[31m-1",
            None,
            "external_id: contains a control character",
        ),
        (
            "ord-\u{202E}1",
            None,
            "external_id: contains a bidirectional override character",
        ),
        (
            "ord-ok",
            Some("tx/../admin"),
            "provider_ref: is a dot segment or contains '/'",
        ),
    ] {
        // Act
        let mut body = json!({
            "provider": "fiserv", "external_id": external_id, "amount": "10.00", "currency": "BRL"
        });
        if let Some(provider_ref) = provider_ref {
            body["provider_ref"] = json!(provider_ref);
        }
        let response = app
            .client
            .post(format!("{}/api/v1/ledger", app.address))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .expect("POST /api/v1/ledger");

        // Assert
        let status = response.status().as_u16();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (status, answer["error"].as_str()),
            (422, Some(message)),
            "{answer}"
        );
    }
    app.stop().await;
}

/// A config for `check-config` in `dir`: one Fiserv provider, the store and reports there.
fn check_config_file(dir: &std::path::Path, reports_dir: &str) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[store]\npath = \"book.db\"\n[reports]\ndir = \"{reports_dir}\"\n\
             [[providers]]\nid = \"fiserv\"\nkind = \"fiserv_pix\"\nbase_url = \"https://provider.example\"\n\
             webhook_secrets_env = [\"HARDEN_FISERV_SECRET\", \"HARDEN_FISERV_SECRET_PREVIOUS\"]\n"
        ),
    )
    .expect("write the config");
    path
}

#[test]
fn check_config_into_a_closed_pipe_exits_quietly() {
    // Arrange
    let dir = tempfile::tempdir().expect("temp dir");
    let config = check_config_file(dir.path(), "reports");

    // Act: stdout's reader is gone before anything is written (`check-config | head -0`).
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cashout-recon"))
        .args(["check-config", "--config"])
        .arg(&config)
        .env("HARDEN_FISERV_SECRET", "s1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn check-config");
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("wait for check-config");

    // Assert
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(output.status.code(), Some(0), "{stderr}");
}

#[test]
fn check_config_tells_an_empty_token_variable_from_an_unset_one() {
    // Arrange
    let dir = tempfile::tempdir().expect("temp dir");
    let config = check_config_file(dir.path(), "reports");

    // Act: the admin token's variable set to "", the reports token's not set at all.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cashout-recon"))
        .args(["check-config", "--config"])
        .arg(&config)
        .env("HARDEN_FISERV_SECRET", "s1")
        .env("CASHOUT_RECON_ADMIN_TOKEN", "")
        .env_remove("CASHOUT_RECON_REPORTS_TOKEN")
        .output()
        .expect("run check-config");

    // Assert
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains(
            "admin token CASHOUT_RECON_ADMIN_TOKEN: SET BUT EMPTY (counts as not set: API closed)"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("reports token CASHOUT_RECON_REPORTS_TOKEN: NOT SET (API closed)"),
        "{stdout}"
    );
}

#[test]
fn check_config_refuses_a_reports_dir_it_cannot_create_files_in() {
    // Arrange: reports.dir below a regular file.
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("a-file"), "x").expect("write a file");
    let config = check_config_file(dir.path(), "a-file/reports");

    // Act
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cashout-recon"))
        .args(["check-config", "--config"])
        .arg(&config)
        .env("HARDEN_FISERV_SECRET", "s1")
        .output()
        .expect("run check-config");

    // Assert: exit 2 with a sentence naming the key.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("reports.dir: cannot create files in"),
        "{stderr}"
    );
}

#[tokio::test]
async fn api_query_errors_name_the_parameter_and_carry_a_code() {
    let app = spawn_app().await;
    for (path, message) in [
        (
            "/api/v1/cashouts?limit=abc",
            "limit: expected an integer, got \"abc\"",
        ),
        (
            "/api/v1/alerts?open=maybe",
            "open: expected true or false, got \"maybe\"",
        ),
        (
            "/api/v1/cashouts?provider=fiserv&colour=red",
            "colour: unknown parameter (known: provider, status, from, to, limit, cursor)",
        ),
        (
            "/api/v1/cashouts?status=bogus",
            "status: unknown cash-out status \"bogus\" (one of pending, processing, \
             completed, failed, canceled, expired, reversed)",
        ),
        (
            "/api/v1/cashouts?limit=0",
            "limit: expected an integer from 1 to 1000, got 0",
        ),
        (
            "/api/v1/alerts?limit=1001",
            "limit: expected an integer from 1 to 1000, got 1001",
        ),
        (
            "/api/v1/mismatches?limit=0",
            "limit: expected an integer from 1 to 1000, got 0",
        ),
    ] {
        // Act
        let (status, answer) = app.get_with_token(path, Some(ADMIN_TOKEN)).await;

        // Assert
        assert_eq!(status, 400, "{path}: {answer}");
        assert_eq!(answer["error"], message, "{path}");
        assert_eq!(answer["code"], "bad_request", "{path}");
    }
    app.stop().await;
}

/// A `--target` of the Fiserv webhook route (nothing listens there).
const FISERV_TARGET: &[&str] = &["--target", "http://127.0.0.1:9/webhooks/fiserv"];

/// Runs `simulate --provider KIND --listen LISTEN ARGS… --print-config`.
fn simulate_print_config(kind: &str, listen: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cashout-recon"))
        .args(["simulate", "--provider", kind, "--listen", listen])
        .args(args)
        .arg("--print-config")
        .output()
        .expect("run simulate --print-config")
}

#[test]
fn simulate_print_config_prints_the_block_with_the_targets_id_and_exits() {
    // Arrange: the simulator to describe is running: its port is taken.
    let running = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let listen = running.local_addr().expect("its address").to_string();

    // Act
    let output = simulate_print_config("fiserv_pix", &listen, FISERV_TARGET);

    // Assert: the block first, pointing at that port, its id from the target, and
    // nothing bound or sent.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("# Provider block"), "{stdout}");
    assert!(stdout.contains("id = \"fiserv\""), "{stdout}");
    assert!(
        stdout.contains(&format!("base_url = \"http://{listen}\"")),
        "{stdout}"
    );
    assert!(!stdout.contains("created"), "nothing was driven: {stdout}");
    assert!(!stderr.contains("simulator started"), "{stderr}");
}

#[test]
fn simulate_print_config_needs_the_port_of_the_simulator_it_describes() {
    // Act
    let output = simulate_print_config("fiserv_pix", "127.0.0.1:0", FISERV_TARGET);

    // Assert
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_ne!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("--listen 127.0.0.1:0: port 0"), "{stderr}");
}

/// `sqlite_only`: the demo runs its own daemon on its own SQLite store, whatever backend
/// the suite is run against.
#[tokio::test]
async fn sqlite_only_the_demo_converges_and_its_summary_is_not_buried_in_logs() {
    // Arrange
    let out = tempfile::tempdir().expect("temp dir");

    // Act: the first quick-start command, smaller.
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_cashout-recon"))
        .args(["demo", "--cashouts", "100", "--seed", "7", "--out"])
        .arg(out.path())
        .env_remove("RUST_LOG")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(240), run)
        .await
        .expect("the demo finishes within 240 s")
        .expect("run demo");

    // Assert: it passes, its own lines come first and no log line is among them, and the
    // summary is written.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.starts_with("cashout-recon demo: daemon on 127.0.0.1:"),
        "{stdout}"
    );
    let verdict = stdout
        .lines()
        .find(|line| line.starts_with("VERDICT:"))
        .unwrap_or_else(|| panic!("no verdict: {stdout}"));
    assert!(
        verdict.starts_with(
            "VERDICT: the daemon's book equals the simulators' ground truth (101/101 cash-outs, "
        ),
        "{verdict}"
    );
    assert!(
        verdict.contains(" poll round), ") || verdict.contains(" poll rounds), "),
        "{verdict}"
    );
    assert!(
        !stdout
            .lines()
            .any(|line| line.starts_with('{') || line.contains(" INFO ")),
        "library logs on stdout: {stdout}"
    );
    assert!(
        stderr.lines().count() < 20,
        "more than a few log lines beside the summary: {stderr}"
    );
    let summary = std::fs::read_to_string(out.path().join("summary.json")).expect("summary.json");
    assert!(
        summary.contains("VERDICT: the daemon's book equals"),
        "{summary}"
    );
}

#[tokio::test]
async fn every_error_body_has_a_code_unknown_routes_included() {
    let app = spawn_app().await;
    for (path, status, code) in [
        ("/webhooks/nobody", 404, "unknown_provider"),
        ("/no/such/path", 404, "not_found"),
        ("/api/v1/no-such-endpoint", 404, "not_found"),
    ] {
        // Act
        let response = app
            .client
            .post(format!("{}{path}", app.address))
            .bearer_auth(ADMIN_TOKEN)
            .body("{}")
            .send()
            .await
            .expect("request");

        // Assert
        assert_eq!(response.status().as_u16(), status, "{path}");
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(answer["code"], code, "{path}: {answer}");
        assert!(answer["error"].is_string(), "{path}: {answer}");
    }
    app.stop().await;
}

#[test]
fn simulate_says_that_webhook_faults_do_nothing_for_a_polled_only_kind() {
    // Act: the same fault flags a script might pass to every kind.
    let output = simulate_print_config("mannco", "127.0.0.1:9", &["--loss", "30", "--reorder"]);

    // Assert: it runs, and says so on stderr for each flag.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    for flag in ["--loss", "--reorder"] {
        assert!(
            stderr.contains(&format!("note: {flag} does nothing for mannco")),
            "{stderr}"
        );
    }
}
