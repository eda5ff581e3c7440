//! Webhook ingestion beyond signatures (SPEC §2.1, §3, §4): routing, body limits, exact
//! amounts, the state rule on stored cash-outs, quarantine and reprocessing, thin and
//! unverified notifications, and a store that cannot commit.

use std::time::Duration;

use cashout_recon::ingest::{EventOutcome, FetchReason};
use serde_json::{json, Value};

use crate::helpers::{
    assert_accepted, assert_rejected, event_id_of, fiserv_headers, now_unix, pismo_body,
    pismo_headers, simpay_body, simpay_headers, spawn_app, spawn_app_with, spawn_sqlite_app_with,
    tupay_headers, tupay_notification, FiservBody, PismoKey, TestApp, ADMIN_TOKEN, FISERV_SECRET,
    SIMPAY_SECRET, TUPAY_SECRET, TUPAY_STATUS_AMOUNT,
};

/// How long a committed webhook (or a queued fetch) may take to show on a busy machine.
const WITHIN: Duration = Duration::from_secs(10);

/// Posts a genuine Fiserv webhook with request id `request_id`.
async fn post_fiserv(app: &TestApp, body: &[u8], request_id: &str) -> (u16, Value) {
    let headers = fiserv_headers(
        body,
        "/webhooks/fiserv",
        FISERV_SECRET,
        now_unix(),
        request_id,
    );
    app.post_webhook("fiserv", &headers, body).await
}

/// Posts a genuine SimPay webhook.
async fn post_simpay(app: &TestApp, body: &[u8]) -> (u16, Value) {
    app.post_webhook("simpay", &simpay_headers(body, SIMPAY_SECRET), body)
        .await
}

fn events_of(cashout: &Value) -> Vec<Value> {
    cashout["events"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("cash-out has no events array: {cashout}"))
}

#[tokio::test]
async fn mannco_webhook_is_answered_404_because_mannco_sends_none() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let (status, body) = app
        .post_webhook(
            "mannco",
            &[],
            br#"{"cashoutId":"m-1","status":"completed"}"#,
        )
        .await;

    // Assert
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["code"], "no_webhooks", "{body}");
    app.stop().await;
}

#[tokio::test]
async fn webhook_for_an_unknown_provider_is_answered_404() {
    // Arrange
    let app = spawn_app().await;
    let body = FiservBody::new("7200001", 3).bytes();
    let headers = fiserv_headers(
        &body,
        "/webhooks/nobody",
        FISERV_SECRET,
        now_unix(),
        "req-1",
    );

    // Act
    let answer = app.post_webhook("nobody", &headers, &body).await;

    // Assert
    assert_eq!(
        answer,
        (
            404,
            json!({"error": "unknown provider", "code": "unknown_provider"})
        )
    );
    app.stop().await;
}

/// Sends `body` to `path` with chunked transfer encoding (no Content-Length) over a raw
/// connection, and returns the response's status code.
async fn post_chunked(address: &str, path: &str, body: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(host)
        .await
        .expect("connect to the app");
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in body.chunks(8192) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    // The server may answer and close before reading everything: a failed write is fine,
    // the answer is what counts.
    let _ = stream.write_all(&request).await;
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    while !response.windows(2).any(|w| w == b"\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => response.extend_from_slice(&buffer[..n]),
        }
    }
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status line in {text:?}"))
}

#[tokio::test]
async fn body_over_max_body_bytes_is_answered_413() {
    // Arrange: max_body_bytes is 65536 in the test config.
    let app = spawn_app().await;
    let limit = 65536;
    let padded = |len: usize| {
        let mut body = FiservBody::new("7200002", 3).bytes();
        body.resize(len, b' ');
        body
    };

    // Act + Assert: a declared Content-Length over the limit.
    let body = padded(limit + 1);
    let headers = fiserv_headers(
        &body,
        "/webhooks/fiserv",
        FISERV_SECRET,
        now_unix(),
        "req-big",
    );
    let (status, answer) = app.post_webhook("fiserv", &headers, &body).await;
    assert_eq!(
        status,
        413,
        "declared length {} over the limit: {answer}",
        limit + 1
    );

    // Act + Assert: a chunked body with no length that grows over the limit.
    let status = post_chunked(&app.address, "/webhooks/fiserv", &padded(limit + 4096)).await;
    assert_eq!(status, 413, "chunked body over the limit");

    // Act + Assert: exactly the limit is read and verified (here: unsigned).
    let (status, answer) = app.post_webhook("fiserv", &[], &padded(limit)).await;
    assert_eq!(
        (status, answer["code"].clone()),
        (401, json!("missing_signature")),
        "a body of exactly the limit"
    );

    assert_eq!(
        app.get_cashout("fiserv", "7200002").await.0,
        404,
        "no oversize webhook was taken"
    );
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains(
            r#"cashout_recon_webhooks_rejected_total{provider="fiserv",reason="too_large"} 2"#
        ),
        "both oversize bodies are counted: {metrics}"
    );
    app.stop().await;
}

/// One amount as a provider writes it and as the admin API must show it.
struct AmountCase {
    case: &'static str,
    provider: &'static str,
    /// The amount as raw JSON (a number or a string).
    amount: &'static str,
    /// The currency as the provider writes it (Pismo: raw JSON, maybe a numeric code).
    currency: &'static str,
    expected_amount: &'static str,
    expected_currency: &'static str,
}

impl AmountCase {
    const fn new(
        case: &'static str,
        provider: &'static str,
        amount: &'static str,
        currency: &'static str,
        expected: (&'static str, &'static str),
    ) -> AmountCase {
        AmountCase {
            case,
            provider,
            amount,
            currency,
            expected_amount: expected.0,
            expected_currency: expected.1,
        }
    }

    /// A genuine completed webhook of `reference` carrying this amount.
    fn webhook(&self, reference: &str) -> (Vec<(&'static str, String)>, Vec<u8>) {
        match self.provider {
            "simpay" => {
                let body = simpay_body(
                    "PIX_CASHOUT_SUCCESS",
                    reference,
                    Some("SUCCESS"),
                    self.amount,
                );
                (simpay_headers(&body, SIMPAY_SECRET), body)
            }
            "fiserv" => {
                let body = FiservBody::new(reference, 3)
                    .amount(self.amount)
                    .currency(self.currency)
                    .bytes();
                let request_id = format!("req-{reference}");
                let headers = fiserv_headers(
                    &body,
                    "/webhooks/fiserv",
                    FISERV_SECRET,
                    now_unix(),
                    &request_id,
                );
                (headers, body)
            }
            _ => {
                let body = pismo_body(
                    &format!("evt-{reference}"),
                    reference,
                    "SETTLED",
                    self.amount,
                    self.currency,
                );
                (pismo_headers(&body, PismoKey::Ec, now_unix()), body)
            }
        }
    }
}

#[tokio::test]
async fn json_amounts_are_read_exactly_in_the_currency_digits() {
    let app = spawn_app().await;
    let cases = [
        AmountCase::new("simpay number 0.1", "simpay", "0.1", "BRL", ("0.10", "BRL")),
        AmountCase::new(
            "simpay number 1500.5",
            "simpay",
            "1500.5",
            "BRL",
            ("1500.50", "BRL"),
        ),
        AmountCase::new("simpay integer 42", "simpay", "42", "BRL", ("42.00", "BRL")),
        AmountCase::new(
            "simpay exponent 1e3",
            "simpay",
            "1e3",
            "BRL",
            ("1000.00", "BRL"),
        ),
        AmountCase::new(
            "fiserv number 1234567.89",
            "fiserv",
            "1234567.89",
            "BRL",
            ("1234567.89", "BRL"),
        ),
        AmountCase::new(
            "fiserv number 0.07",
            "fiserv",
            "0.07",
            "BRL",
            ("0.07", "BRL"),
        ),
        AmountCase::new(
            "fiserv three-digit KWD",
            "fiserv",
            "\"1.234\"",
            "KWD",
            ("1.234", "KWD"),
        ),
        AmountCase::new(
            "fiserv zero-digit JPY",
            "fiserv",
            "120000",
            "JPY",
            ("120000", "JPY"),
        ),
        AmountCase::new(
            "pismo CLP by numeric code",
            "pismo",
            "15000",
            "152",
            ("15000", "CLP"),
        ),
        AmountCase::new(
            "pismo 0.1 by numeric text",
            "pismo",
            "0.1",
            "\"986\"",
            ("0.10", "BRL"),
        ),
    ];
    for (index, case) in cases.iter().enumerate() {
        // Arrange
        let reference = format!("72001{index:02}");
        let (headers, body) = case.webhook(&reference);

        // Act
        let answer = app.post_webhook(case.provider, &headers, &body).await;

        // Assert
        assert_accepted(&answer, case.case);
        let cashout = app
            .wait_for_cashout(case.provider, &reference, WITHIN, |c| {
                c["status"] == "completed"
            })
            .await;
        assert_eq!(
            cashout["amount"], case.expected_amount,
            "{}: {cashout}",
            case.case
        );
        assert_eq!(
            cashout["currency"], case.expected_currency,
            "{}: {cashout}",
            case.case
        );
    }
    let simpay = app.get_cashout("simpay", "7200100").await.1;
    assert_eq!(simpay["fee"], "1.99", "the fee is exact too: {simpay}");
    assert_eq!(
        simpay["external_id"], "ord-7200100",
        "SimPay's tag is the external id: {simpay}"
    );
    app.stop().await;
}

#[tokio::test]
async fn late_processing_after_completed_is_recorded_but_not_applied() {
    // Arrange
    let app = spawn_app().await;
    let completed = assert_accepted(
        &post_fiserv(&app, &FiservBody::new("7200201", 3).bytes(), "req-a").await,
        "completed",
    );

    // Act: the processing report arrives late.
    let late = assert_accepted(
        &post_fiserv(&app, &FiservBody::new("7200201", 2).bytes(), "req-b").await,
        "late processing",
    );

    // Assert
    let cashout = app
        .wait_for_cashout("fiserv", "7200201", WITHIN, |c| {
            c["events"].as_array().is_some_and(|e| e.len() == 2)
        })
        .await;
    assert_eq!(cashout["status"], "completed", "{cashout}");
    assert_eq!(cashout["provider_status"], "3", "{cashout}");
    let events = events_of(&cashout);
    assert_eq!(events[0]["event_id"], completed.as_str());
    assert_eq!(events[0]["applied"], true);
    assert_eq!(events[1]["event_id"], late.as_str());
    assert_eq!(events[1]["source"], "webhook");
    assert_eq!(events[1]["raw_status"], "2");
    assert_eq!(events[1]["status"], "processing");
    assert_eq!(
        events[1]["applied"], false,
        "the late event is kept but not applied: {cashout}"
    );
    app.stop().await;
}

#[tokio::test]
async fn failed_after_completed_is_a_status_conflict_and_stays_completed() {
    // Arrange
    let app = spawn_app().await;
    let success = simpay_body("PIX_CASHOUT_SUCCESS", "7200301", Some("SUCCESS"), "10.00");
    assert_accepted(&post_simpay(&app, &success).await, "success");

    // Act
    let error = simpay_body("PIX_CASHOUT_ERROR", "7200301", Some("ERROR"), "10.00");
    let conflicting = assert_accepted(&post_simpay(&app, &error).await, "error after success");

    // Assert
    let cashout = app
        .wait_for_cashout("simpay", "7200301", WITHIN, |c| {
            c["events"].as_array().is_some_and(|e| e.len() == 2)
        })
        .await;
    assert_eq!(
        cashout["status"], "completed",
        "a terminal state is not overwritten: {cashout}"
    );
    let events = events_of(&cashout);
    assert_eq!(events[1]["event_id"], conflicting.as_str());
    assert_eq!(events[1]["status"], "failed");
    assert_eq!(events[1]["applied"], false, "{cashout}");

    let (status, mismatches) = app
        .get_with_token("/api/v1/mismatches?kind=status_conflict", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(status, 200, "{mismatches}");
    let items = mismatches["items"].as_array().expect("mismatch items");
    assert!(
        items.iter().any(|m| m["kind"] == "status_conflict"
            && m["provider"] == "simpay"
            && m["provider_ref"] == "7200301"),
        "a status_conflict mismatch is raised: {mismatches}"
    );
    let alert = app
        .wait_for_open_alert("status_conflict", "simpay/7200301", WITHIN)
        .await;
    assert_eq!(alert["severity"], "critical", "{alert}");
    app.stop().await;
}

#[tokio::test]
async fn fiserv_failed_after_confirmed_is_a_reversal() {
    // Arrange
    let app = spawn_app().await;
    assert_accepted(
        &post_fiserv(
            &app,
            &FiservBody::new("7200401", 3).bytes(),
            "req-confirmed",
        )
        .await,
        "confirmed",
    );

    // Act
    let reversal = assert_accepted(
        &post_fiserv(&app, &FiservBody::new("7200401", 4).bytes(), "req-failed").await,
        "failed",
    );

    // Assert
    let cashout = app
        .wait_for_cashout("fiserv", "7200401", WITHIN, |c| c["status"] == "reversed")
        .await;
    assert_eq!(cashout["provider_status"], "4", "{cashout}");
    assert_eq!(
        cashout["reason_code"], "5",
        "the fail reason is kept: {cashout}"
    );
    let events = events_of(&cashout);
    assert_eq!(events.len(), 2, "{cashout}");
    assert_eq!(events[1]["event_id"], reversal.as_str());
    assert_eq!(events[1]["applied"], true, "{cashout}");
    let (_, mismatches) = app
        .get_with_token("/api/v1/mismatches?kind=status_conflict", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(
        mismatches["items"],
        json!([]),
        "a reversal is no conflict: {mismatches}"
    );
    app.stop().await;
}

#[tokio::test]
async fn verified_but_unparseable_payloads_are_quarantined_with_state_untouched() {
    let app = spawn_app().await;
    let cases: [(&str, Vec<u8>); 5] = [
        (
            "more decimals than BRL allows",
            FiservBody::new("7200501", 3).amount("\"12.345\"").bytes(),
        ),
        ("unknown status 9", FiservBody::new("7200501", 9).bytes()),
        (
            "unknown currency",
            FiservBody::new("7200501", 3).currency("XQZ").bytes(),
        ),
        (
            "amount that is not a number",
            FiservBody::new("7200501", 3).amount("\"12,34\"").bytes(),
        ),
        (
            "truncated JSON",
            br#"{"txid":"7200501","status":3,"amount":"#.to_vec(),
        ),
    ];
    // The cash-out is processing before any of them arrives.
    let known = post_fiserv(&app, &FiservBody::new("7200501", 2).bytes(), "req-known").await;
    assert_accepted(&known, "the processing report");
    for (index, (case, body)) in cases.into_iter().enumerate() {
        // Act
        let answer = post_fiserv(&app, &body, &format!("req-bad-{index}")).await;

        // Assert
        assert_eq!(answer.0, 202, "{case}: {}", answer.1);
        let event_id = event_id_of(&answer.1);
        assert_eq!(
            answer.1,
            json!({"status": "quarantined", "event_id": event_id}),
            "{case}"
        );
        let stored = app
            .state
            .store
            .get_event(event_id.clone())
            .await
            .expect("read")
            .expect("quarantined event is stored");
        assert_eq!(stored.outcome, EventOutcome::Quarantined, "{case}");
        assert_eq!(
            stored.raw_body.as_deref(),
            Some(body.as_slice()),
            "{case}: the raw bytes are kept"
        );
        let cashout = app.get_cashout("fiserv", "7200501").await.1;
        assert_eq!(
            cashout["status"], "processing",
            "{case}: state untouched: {cashout}"
        );
        assert_eq!(
            cashout["amount"], "1234567.89",
            "{case}: amount untouched: {cashout}"
        );
        assert_eq!(events_of(&cashout).len(), 1, "{case}: {cashout}");
        app.wait_for_open_alert("quarantined_webhook", &format!("fiserv/{event_id}"), WITHIN)
            .await;
    }
    app.stop().await;
}

#[tokio::test]
async fn reprocessing_a_quarantined_event_that_still_fails_keeps_it_quarantined() {
    // Arrange
    let app = spawn_app().await;
    assert_accepted(
        &post_fiserv(&app, &FiservBody::new("7200601", 2).bytes(), "req-ok").await,
        "processing",
    );
    let quarantined = post_fiserv(
        &app,
        &FiservBody::new("7200601", 3).amount("\"12.345\"").bytes(),
        "req-bad",
    )
    .await;
    assert_eq!(quarantined.0, 202, "{}", quarantined.1);
    let event_id = event_id_of(&quarantined.1);

    // Act
    let (status, answer) = app
        .post_with_token(
            &format!("/api/v1/events/{event_id}/reprocess"),
            Some(ADMIN_TOKEN),
        )
        .await;

    // Assert
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "quarantined", "{answer}");
    assert_eq!(answer["event_id"], event_id.as_str());
    let stored = app
        .state
        .store
        .get_event(event_id)
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(stored.outcome, EventOutcome::Quarantined);
    let cashout = app.get_cashout("fiserv", "7200601").await.1;
    assert_eq!(cashout["status"], "processing", "{cashout}");
    app.stop().await;
}

#[tokio::test]
async fn reprocessing_an_event_that_is_not_quarantined_is_refused() {
    // Arrange
    let app = spawn_app().await;
    let accepted = assert_accepted(
        &post_fiserv(&app, &FiservBody::new("7200701", 3).bytes(), "req-ok").await,
        "accepted",
    );
    let cases = [
        (
            "an accepted event",
            accepted.as_str(),
            409,
            "not_quarantined",
        ),
        (
            "an unknown event",
            "0190f0f0-0000-7000-8000-000000000000",
            404,
            "not_found",
        ),
    ];
    for (case, event_id, expected_status, expected_code) in cases {
        // Act
        let (status, answer) = app
            .post_with_token(
                &format!("/api/v1/events/{event_id}/reprocess"),
                Some(ADMIN_TOKEN),
            )
            .await;

        // Assert
        assert_eq!(status, expected_status, "{case}: {answer}");
        assert_eq!(answer["code"], expected_code, "{case}: {answer}");
    }
    app.stop().await;
}

#[tokio::test]
async fn tupay_thin_notification_is_resolved_by_a_status_fetch() {
    // Arrange: the test app's Tupay status endpoint answers 1 Completed, PEN 250.75.
    let app = spawn_app().await;
    let body = tupay_notification("8405147", "30000000001", TUPAY_SECRET);

    // Act
    let answer = app.post_webhook("tupay", &tupay_headers(), &body).await;

    // Assert: answered at once, then the fetch it queued creates the cash-out.
    let event_id = assert_accepted(&answer, "thin notification");
    let cashout = app
        .wait_for_cashout("tupay", "8405147", WITHIN, |c| c["status"] == "completed")
        .await;
    assert_eq!(cashout["amount"], TUPAY_STATUS_AMOUNT, "{cashout}");
    assert_eq!(cashout["currency"], "PEN", "{cashout}");
    assert_eq!(cashout["provider_status"], "1", "{cashout}");
    let events = events_of(&cashout);
    assert_eq!(events.len(), 2, "{cashout}");
    assert_eq!(events[0]["event_id"], event_id.as_str());
    assert_eq!(events[0]["source"], "webhook");
    assert_eq!(
        events[0]["applied"], false,
        "a notification applies nothing itself"
    );
    assert_eq!(events[1]["source"], "poll");
    assert_eq!(events[1]["applied"], true);
    // The fetch answered a webhook: it counts as that webhook, not as a recovery.
    assert_eq!(cashout["webhooks"], 1, "{cashout}");
    assert_eq!(cashout["recovered_by_poll"], false, "{cashout}");
    let queued = app
        .state
        .store
        .pending_status_fetches("tupay".into(), 10)
        .await
        .expect("read the fetch queue");
    assert!(queued.is_empty(), "the fetch is done: {queued:?}");
    app.stop().await;
}

#[tokio::test]
async fn tupay_notification_alone_creates_no_cashout() {
    // Arrange: Tupay's control signs external_id only, so a notification must not create
    // or change anything by itself. Its status endpoint is unreachable here.
    let app = spawn_app_with(|config| {
        config.replace(
            "login_env = \"TUPAY_LOGIN\"",
            "login_env = \"TUPAY_LOGIN_UNSET\"",
        )
    })
    .await;
    let body = tupay_notification("8405148", "30000000002", TUPAY_SECRET);

    // Act
    let answer = app.post_webhook("tupay", &tupay_headers(), &body).await;

    // Assert
    assert_accepted(&answer, "thin notification");
    let (status, cashout) = app.get_cashout("tupay", "8405148").await;
    assert_eq!(
        status, 404,
        "no cash-out until its status is fetched: {cashout}"
    );
    let queued = app
        .state
        .store
        .pending_status_fetches("tupay".into(), 10)
        .await
        .expect("read the fetch queue");
    assert_eq!(
        queued,
        vec![("8405148".to_string(), FetchReason::ThinNotification)]
    );
    app.stop().await;
}

#[tokio::test]
async fn unverified_webhook_with_a_readable_id_queues_a_status_fetch_and_changes_nothing() {
    // Arrange: a known cash-out, then a webhook for it signed with a secret we do not hold.
    let app = spawn_app().await;
    assert_accepted(
        &post_fiserv(&app, &FiservBody::new("7200801", 2).bytes(), "req-genuine").await,
        "genuine",
    );
    let forged_body = FiservBody::new("7200801", 3).bytes();
    let forged = fiserv_headers(
        &forged_body,
        "/webhooks/fiserv",
        "a-rotated-secret",
        now_unix(),
        "req-forged",
    );
    let tupay_forged = tupay_notification("8405999", "30000000999", "a-rotated-secret");

    // Act
    let fiserv_answer = app.post_webhook("fiserv", &forged, &forged_body).await;
    let tupay_answer = app
        .post_webhook("tupay", &tupay_headers(), &tupay_forged)
        .await;

    // Assert
    assert_rejected(
        &fiserv_answer,
        "bad_signature",
        "fiserv with an unknown secret",
    );
    assert_rejected(
        &tupay_answer,
        "bad_signature",
        "tupay with an unknown secret",
    );
    assert_eq!(
        app.wait_for_status_fetch("fiserv", "7200801", WITHIN).await,
        FetchReason::UnverifiedWebhook
    );
    let cashout = app.get_cashout("fiserv", "7200801").await.1;
    assert_eq!(
        cashout["status"], "processing",
        "the unverified report is not applied: {cashout}"
    );
    assert_eq!(events_of(&cashout).len(), 1, "nor recorded: {cashout}");
    // Tupay's status endpoint answers here, so the queued fetch runs at once: the
    // cash-out comes from the provider's authenticated answer, never from the request.
    let resolved = app
        .wait_for_cashout("tupay", "8405999", WITHIN, |c| c["status"] == "completed")
        .await;
    let events = events_of(&resolved);
    assert_eq!(events.len(), 1, "only the fetch is recorded: {resolved}");
    assert_eq!(events[0]["source"], "poll", "{resolved}");
    assert_eq!(resolved["amount"], TUPAY_STATUS_AMOUNT, "{resolved}");
    app.stop().await;
}

#[tokio::test]
async fn status_fetches_for_unverified_webhooks_are_rate_limited_per_provider() {
    // Arrange: at most two such fetches per minute.
    let app =
        spawn_app_with(|config| format!("{config}\n[poll]\nunverified_fetches_per_minute = 2\n"))
            .await;
    let references = ["7200901", "7200902", "7200903", "7200904", "7200905"];

    // Act
    for reference in references {
        let body = FiservBody::new(reference, 3).bytes();
        let headers = fiserv_headers(
            &body,
            "/webhooks/fiserv",
            "a-forger-secret",
            now_unix(),
            reference,
        );
        let answer = app.post_webhook("fiserv", &headers, &body).await;
        assert_rejected(&answer, "bad_signature", reference);
    }

    // Assert: the limiter decides before answering, so once two fetches show, no more come.
    let until = tokio::time::Instant::now() + WITHIN;
    let queued = loop {
        let queued = app
            .state
            .store
            .pending_status_fetches("fiserv".into(), 10)
            .await
            .expect("read the fetch queue");
        if queued.len() >= 2 || tokio::time::Instant::now() >= until {
            break queued;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let mut queued_refs: Vec<&str> = queued.iter().map(|(r, _)| r.as_str()).collect();
    queued_refs.sort_unstable();
    assert_eq!(
        queued_refs,
        ["7200901", "7200902"],
        "only the first two forged webhooks cost a fetch: {queued:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn sqlite_only_store_that_cannot_commit_answers_503_with_retry_after_and_acknowledges_nothing(
) {
    // Arrange: another connection holds the write lock past the 500 ms busy timeout.
    let app = spawn_sqlite_app_with(|config| config).await;
    let body = FiservBody::new("7201001", 3).bytes();
    let headers = fiserv_headers(
        &body,
        "/webhooks/fiserv",
        FISERV_SECRET,
        now_unix(),
        "req-locked",
    );
    let locker = rusqlite::Connection::open(&app.db_path).expect("open the store file");
    locker
        .busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    locker
        .execute_batch("BEGIN EXCLUSIVE")
        .expect("take the write lock");

    // Act
    let mut request = app
        .client
        .post(format!("{}/webhooks/fiserv", app.address))
        .body(body.clone());
    for (name, value) in &headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.expect("webhook request");
    let ready_while_locked = app
        .client
        .get(format!("{}/readyz", app.address))
        .send()
        .await
        .expect("GET /readyz");

    // Assert
    assert_eq!(response.status().as_u16(), 503);
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    assert!(
        retry_after
            .as_deref()
            .and_then(|v| v.parse::<u64>().ok())
            .is_some(),
        "503 carries Retry-After in seconds, got {retry_after:?}"
    );
    let answer: Value = response.json().await.expect("JSON error body");
    assert_eq!(answer["code"], "store_unavailable", "{answer}");
    assert_eq!(
        ready_while_locked.status().as_u16(),
        503,
        "/readyz reports the store cannot take writes"
    );
    assert_eq!(
        app.get_cashout("fiserv", "7201001").await.0,
        404,
        "nothing was committed"
    );

    // Act: the lock goes away and the provider retries the same request.
    locker
        .execute_batch("ROLLBACK")
        .expect("release the write lock");
    drop(locker);
    let retried = app.post_webhook("fiserv", &headers, &body).await;

    // Assert: accepted as new, since nothing was acknowledged before.
    assert_accepted(&retried, "the retry after the lock is gone");
    app.wait_for_cashout("fiserv", "7201001", WITHIN, |c| c["status"] == "completed")
        .await;
    let (status, _) = app.get_with_token("/readyz", None).await;
    assert_eq!(status, 200, "ready again");
    app.stop().await;
}

#[tokio::test]
async fn rejected_request_leaves_its_request_id_free_for_the_genuine_one() {
    // Arrange: a forged webhook uses the request id the genuine one will carry.
    let app = spawn_app().await;
    let body = FiservBody::new("7201101", 3).bytes();
    let forged = fiserv_headers(
        &body,
        "/webhooks/fiserv",
        "not-the-secret",
        now_unix(),
        "req-shared",
    );
    assert_rejected(
        &app.post_webhook("fiserv", &forged, &body).await,
        "bad_signature",
        "forged",
    );

    // Act
    let genuine = post_fiserv(&app, &body, "req-shared").await;

    // Assert: a request that fails verification changes nothing, not even the replay cache.
    assert_accepted(
        &genuine,
        "the genuine webhook after a forged one with its id",
    );
    app.wait_for_cashout("fiserv", "7201101", WITHIN, |c| c["status"] == "completed")
        .await;
    app.stop().await;
}

#[tokio::test]
async fn fiserv_replay_under_a_fresh_unsigned_request_id_is_a_duplicate() {
    // Arrange: x-request-id is not among Fiserv's signed bytes, so a captured request can
    // be resent under a new one.
    let app = spawn_app().await;
    let body = FiservBody::new("7201201", 3).bytes();
    let headers = fiserv_headers(
        &body,
        "/webhooks/fiserv",
        FISERV_SECRET,
        now_unix(),
        "req-original",
    );
    let first = assert_accepted(
        &app.post_webhook("fiserv", &headers, &body).await,
        "original",
    );
    let resent: Vec<(&str, String)> = headers
        .iter()
        .map(|(name, value)| {
            (
                *name,
                if *name == "x-request-id" {
                    "req-fresh".to_string()
                } else {
                    value.clone()
                },
            )
        })
        .collect();

    // Act
    let answer = app.post_webhook("fiserv", &resent, &body).await;

    // Assert
    assert_eq!(
        answer,
        (200, json!({"status": "duplicate", "event_id": first}))
    );
    let cashout = app.get_cashout("fiserv", "7201201").await.1;
    assert_eq!(events_of(&cashout).len(), 1, "{cashout}");
    app.stop().await;
}

#[tokio::test]
async fn same_quarantined_webhook_again_is_a_duplicate_of_the_quarantined_event() {
    // Arrange
    let app = spawn_app().await;
    let body = FiservBody::new("7201301", 9).bytes();
    let headers = fiserv_headers(
        &body,
        "/webhooks/fiserv",
        FISERV_SECRET,
        now_unix(),
        "req-q",
    );
    let first = app.post_webhook("fiserv", &headers, &body).await;
    assert_eq!(first.0, 202, "{}", first.1);

    // Act
    let again = app.post_webhook("fiserv", &headers, &body).await;

    // Assert
    assert_eq!(
        again,
        (
            200,
            json!({"status": "duplicate", "event_id": event_id_of(&first.1)})
        )
    );
    app.stop().await;
}
