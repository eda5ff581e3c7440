//! Alerts (SPEC §7) end to end: rules over the real store with time injected into the
//! alert pass, and delivery to a real loopback receiver that verifies every signature.

use std::time::{Duration, Instant};

use cashout_recon::sim::alert_receiver::{AlertReceiver, ReceiverConfig};
use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use serde_json::Value;

use crate::helpers::*;

const WITHIN: Duration = Duration::from_secs(30);
const MIN: chrono::Duration = chrono::Duration::minutes(1);

/// The base config with `[alerts]` (passes only at start and when woken, so the test
/// drives them with its own clock) and fiserv's `stuck_after` / `silent_after`.
fn alerts_config(
    config: String,
    receiver: Option<&AlertReceiver>,
    alerts: &str,
    silent_after: &str,
) -> String {
    let config = config.replacen(
        "id = \"fiserv\"\n",
        &format!("id = \"fiserv\"\nstuck_after = \"30m\"\nsilent_after = \"{silent_after}\"\n"),
        1,
    );
    let url = receiver.map(|r| r.url()).unwrap_or("");
    format!(
        "{config}\n[alerts]\nwebhook_url = \"{url}\"\nevaluate_every = \"1h\"\nrenotify_after = \"1h\"\n{alerts}\n"
    )
}

async fn receiver(fail_first: usize, hang: bool) -> AlertReceiver {
    AlertReceiver::start(ReceiverConfig {
        secret: ALERT_SECRET.to_string(),
        fail_first,
        hang,
    })
    .await
    .expect("alert receiver starts")
}

/// Waits for the pass the scheduler runs at start, so every later pass is the test's.
async fn wait_for_start_pass(app: &TestApp) {
    let until = Instant::now() + WITHIN;
    while app.state.alerting.passes_completed() == 0 {
        assert!(Instant::now() < until, "no alert pass ran at start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn pass_at(app: &TestApp, at: DateTime<Utc>) -> cashout_recon::alert::runner::PassSummary {
    app.state
        .alerting
        .run_pass(&app.state, at)
        .await
        .expect("alert pass")
}

async fn wait_for_requests(
    receiver: &AlertReceiver,
    n: usize,
) -> Vec<cashout_recon::sim::alert_receiver::ReceivedAlert> {
    let until = Instant::now() + WITHIN;
    loop {
        let requests = receiver.requests();
        if requests.len() >= n {
            return requests;
        }
        assert!(
            Instant::now() < until,
            "the receiver got {} of {n} requests: {requests:?}",
            requests.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ago(minutes: i64) -> String {
    minutes_before(Utc::now(), minutes)
}

/// `minutes` before `now`, as a provider's RFC 3339 time (whole seconds).
fn minutes_before(now: DateTime<Utc>, minutes: i64) -> String {
    (now - MIN * minutes as i32).to_rfc3339_opts(SecondsFormat::Secs, true)
}

async fn post_fiserv(app: &TestApp, txid: &str, status: u8, created_at: &str) {
    let body = FiservBody::new(txid, status).created_at(created_at).bytes();
    let headers = fiserv_headers(
        &body,
        "/webhooks/fiserv",
        FISERV_SECRET,
        now_unix(),
        &format!("req-{txid}-{status}"),
    );
    assert_accepted(
        &app.post_webhook("fiserv", &headers, &body).await,
        &format!("fiserv {txid} status {status}"),
    );
}

async fn outbox_is_drained(app: &TestApp) {
    let until = Instant::now() + WITHIN;
    loop {
        let (pending, failed) = app.state.store.alert_outbox_counts().await.expect("counts");
        if pending == 0 {
            assert_eq!(failed, 0, "no delivery was given up");
            return;
        }
        assert!(Instant::now() < until, "{pending} deliveries still pending");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn texts(requests: &[cashout_recon::sim::alert_receiver::ReceivedAlert]) -> Vec<String> {
    requests
        .iter()
        .map(|r| r.body["text"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test]
async fn a_stuck_cash_out_warns_escalates_is_resent_and_its_resolution_is_delivered() {
    // Arrange
    let receiver = receiver(0, false).await;
    let app = spawn_app_with(|c| alerts_config(c, Some(&receiver), "", "48h")).await;
    wait_for_start_pass(&app).await;
    // The passes' clock is fixed before the webhook (a busy machine may take seconds to
    // answer it), in whole seconds like the provider's times, so the ages in the texts
    // are exact.
    let now = Utc::now().trunc_subsecs(0);
    post_fiserv(&app, "7300101", 1, &minutes_before(now, 31)).await;

    // Act + Assert: raised once, as a warning.
    assert_eq!(pass_at(&app, now).await.notices, 1);
    let alert = app
        .wait_for_open_alert("stuck", "fiserv/7300101", WITHIN)
        .await;
    assert_eq!(alert["severity"], "warning", "{alert}");
    assert_eq!(alert["provider"], "fiserv", "{alert}");
    assert_eq!(pass_at(&app, now + MIN).await.notices, 0, "not sent twice");

    // Critical at twice stuck_after, re-sent after renotify_after.
    assert_eq!(pass_at(&app, now + MIN * 30).await.notices, 1, "escalated");
    assert_eq!(pass_at(&app, now + MIN * 60).await.notices, 0);
    assert_eq!(pass_at(&app, now + MIN * 90).await.notices, 1, "re-sent");

    // Resolved when the cash-out completes; the resolution is delivered.
    post_fiserv(&app, "7300101", 3, &ago(31)).await;
    let resolved = pass_at(&app, now + MIN * 91).await;
    assert_eq!((resolved.resolved, resolved.notices), (1, 1));
    assert!(app.open_alerts().await.iter().all(|a| a["kind"] != "stuck"));

    let requests = wait_for_requests(&receiver, 4).await;
    outbox_is_drained(&app).await;
    assert!(
        requests.iter().all(|r| r.verified && r.answered == 200),
        "{requests:?}"
    );
    let texts = texts(&requests);
    assert!(
        texts[0].starts_with("[WARNING] stuck: fiserv/7300101 pending for 31m (stuck_after 30m)"),
        "{texts:?}"
    );
    assert!(
        texts[1].starts_with("[CRITICAL] stuck: fiserv/7300101 pending for 1h"),
        "{texts:?}"
    );
    assert!(
        texts[2].starts_with("[CRITICAL] stuck: fiserv/7300101 pending for 2h"),
        "{texts:?}"
    );
    assert!(
        texts[3].starts_with("[RESOLVED] stuck: fiserv/7300101"),
        "{texts:?}"
    );
    let statuses: Vec<&str> = requests
        .iter()
        .map(|r| r.body["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(statuses, ["firing", "firing", "firing", "resolved"]);
    let first: &Value = &requests[0].body;
    for request in &requests {
        assert_eq!(
            request.body["id"], first["id"],
            "one id for the alert's life"
        );
        for key in [
            "id",
            "kind",
            "severity",
            "status",
            "subject",
            "provider",
            "text",
            "opened_at",
            "resolved_at",
        ] {
            assert!(request.body.get(key).is_some(), "{key} in {}", request.body);
        }
    }
    assert!(requests[3].body["resolved_at"].is_string());
    let mut ids: Vec<&str> = requests.iter().map(|r| r.webhook_id.as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 4, "one webhook-id per delivery");
    app.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn an_open_alert_survives_a_restart_without_being_sent_again() {
    // Arrange
    let receiver = receiver(0, false).await;
    let edit = |c: String| alerts_config(c, Some(&receiver), "", "48h");
    let app = spawn_app_with(edit).await;
    wait_for_start_pass(&app).await;
    post_fiserv(&app, "7300201", 2, &ago(45)).await;
    assert_eq!(pass_at(&app, Utc::now()).await.notices, 1);
    let before = app
        .wait_for_open_alert("stuck", "fiserv/7300201", WITHIN)
        .await;
    wait_for_requests(&receiver, 1).await;
    outbox_is_drained(&app).await;

    // Act
    let dir = app.stop_keeping_store().await;
    let app = spawn_app_in(dir, edit).await;
    wait_for_start_pass(&app).await;
    let after_restart = pass_at(&app, Utc::now() + MIN * 5).await;

    // Assert
    assert_eq!(after_restart.notices, 0, "{after_restart:?}");
    let after = app
        .wait_for_open_alert("stuck", "fiserv/7300201", WITHIN)
        .await;
    assert_eq!(after["id"], before["id"], "the same alert, still open");
    outbox_is_drained(&app).await;
    assert_eq!(receiver.requests().len(), 1, "{:?}", receiver.requests());
    app.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn stuck_cash_outs_behind_a_silent_provider_are_one_message() {
    // Arrange
    let receiver = receiver(0, false).await;
    let app = spawn_app_with(|c| alerts_config(c, Some(&receiver), "", "1h")).await;
    wait_for_start_pass(&app).await;
    for txid in ["7300301", "7300302", "7300303"] {
        post_fiserv(&app, txid, 1, &ago(20)).await;
    }

    // Act: two hours without a webhook from fiserv.
    let summary = pass_at(&app, Utc::now() + MIN * 120).await;

    // Assert
    assert_eq!(summary.notices, 1, "{summary:?}");
    let requests = wait_for_requests(&receiver, 1).await;
    outbox_is_drained(&app).await;
    assert_eq!(requests.len(), 1, "{requests:?}");
    let text = requests[0].body["text"].as_str().unwrap_or("");
    assert!(
        text.starts_with("[CRITICAL] provider_silent: fiserv: no webhook for 2h"),
        "{text}"
    );
    assert!(
        text.contains("3 stuck cash-outs of fiserv are folded into this alert"),
        "{text}"
    );
    let open = app.open_alerts().await;
    let inhibited: Vec<&Value> = open.iter().filter(|a| a["kind"] == "stuck").collect();
    assert_eq!(inhibited.len(), 3, "each stays listed: {open:?}");
    assert!(
        inhibited.iter().all(|a| a["delivery"] == "inhibited"),
        "{open:?}"
    );

    // A webhook arrives: the provider speaks again; its cash-outs are stuck on their own.
    post_fiserv(&app, "7300301", 3, &ago(20)).await;
    let summary = pass_at(&app, Utc::now() + MIN * 30).await;
    assert_eq!(
        summary.resolved, 2,
        "provider_silent and the completed cash-out: {summary:?}"
    );
    let requests = wait_for_requests(&receiver, 4).await;
    let texts = texts(&requests);
    assert!(
        texts[1].starts_with("[RESOLVED] provider_silent: fiserv"),
        "{texts:?}"
    );
    assert!(
        texts[2..]
            .iter()
            .all(|t| t.starts_with("[WARNING] stuck: fiserv/73003")),
        "{texts:?}"
    );
    app.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn past_group_over_the_subjects_of_one_kind_and_provider_are_one_grouped_alert() {
    // Arrange
    let receiver = receiver(0, false).await;
    let app = spawn_app_with(|c| alerts_config(c, Some(&receiver), "group_over = 2", "48h")).await;
    wait_for_start_pass(&app).await;
    for txid in ["7300401", "7300402", "7300403"] {
        post_fiserv(&app, txid, 1, &ago(35)).await;
    }

    // Act
    let summary = pass_at(&app, Utc::now()).await;

    // Assert
    assert_eq!((summary.opened, summary.notices), (4, 1), "{summary:?}");
    let requests = wait_for_requests(&receiver, 1).await;
    outbox_is_drained(&app).await;
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].body["subject"], "provider:fiserv");
    let text = requests[0].body["text"].as_str().unwrap_or("");
    assert!(
        text.starts_with("[WARNING] stuck: 3 open stuck alerts at fiserv"),
        "{text}"
    );
    let open = app.open_alerts().await;
    assert_eq!(
        open.iter().filter(|a| a["delivery"] == "grouped").count(),
        3,
        "{open:?}"
    );
    app.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn signature_failures_over_the_threshold_raise_an_alert_that_resolves_when_they_stop() {
    // Arrange
    let app =
        spawn_app_with(|c| alerts_config(c, None, "signature_failures_per_minute = 5", "48h"))
            .await;
    wait_for_start_pass(&app).await;
    let body = simpay_body("PIX_CASHOUT_SUCCESS", "7300501", Some("SUCCESS"), "10.00");

    // Act: six forged webhooks in a minute wake the alert pass.
    for _ in 0..6 {
        let answer = app
            .post_webhook("simpay", &simpay_headers(&body, "not-the-secret"), &body)
            .await;
        assert_rejected(&answer, "bad_signature", "forged");
    }

    // Assert
    let alert = app
        .wait_for_open_alert("signature_failures", "simpay", WITHIN)
        .await;
    assert_eq!(alert["severity"], "critical");
    assert!(
        alert["text"]
            .as_str()
            .unwrap_or("")
            .contains("6 webhooks rejected in the last minute"),
        "{alert}"
    );
    let later = pass_at(&app, Utc::now() + MIN * 2).await;
    assert_eq!(later.resolved, 1, "{later:?}");
    let (_, resolved) = app
        .get_with_token(
            &format!("/api/v1/alerts/{}", alert["id"]),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(resolved["status"], "resolved", "{resolved}");
    app.stop().await;
}

#[tokio::test]
async fn poll_failing_after_consecutive_failed_cycles_resolves_after_a_good_one() {
    // Arrange: Tupay's search API answers 404 (its mock serves only status fetches).
    let app = spawn_app_with(|c| alerts_config(c, None, "poll_failing_cycles = 2", "48h")).await;
    wait_for_start_pass(&app).await;

    // Act
    for _ in 0..2 {
        let (status, summary) = app
            .post_with_token("/api/v1/providers/tupay/poll", Some(ADMIN_TOKEN))
            .await;
        assert_eq!(status, 200, "{summary}");
        assert_eq!(summary["fetched"], 0, "{summary}");
    }
    pass_at(&app, Utc::now()).await;

    // Assert
    let alert = app
        .wait_for_open_alert("poll_failing", "tupay", WITHIN)
        .await;
    assert!(
        alert["text"]
            .as_str()
            .unwrap_or("")
            .contains("2 consecutive poll cycles failed"),
        "{alert}"
    );

    // The search API comes back: one good cycle resolves it.
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, ResponseTemplate};
    Mock::given(method("POST"))
        .and(path("/v1/auth/login"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({"token": "t"})))
        .mount(&app._tupay)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/cashouts"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(
                serde_json::json!({"page": 0, "rows": 0, "maxRows": 100, "data": []}),
            ),
        )
        .mount(&app._tupay)
        .await;
    let (status, summary) = app
        .post_with_token("/api/v1/providers/tupay/poll", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(
        (status, &summary["errors"]),
        (200, &Value::from(0)),
        "{summary}"
    );
    assert_eq!(pass_at(&app, Utc::now()).await.resolved, 1);
    assert!(app
        .open_alerts()
        .await
        .iter()
        .all(|a| a["kind"] != "poll_failing"));
    app.stop().await;
}

#[tokio::test]
async fn the_alert_list_filters_paginates_and_names_an_unknown_kind() {
    // Arrange
    let app = spawn_app_with(|c| alerts_config(c, None, "", "48h")).await;
    wait_for_start_pass(&app).await;
    for (txid, age) in [("7300601", 42), ("7300602", 41), ("7300603", 40)] {
        post_fiserv(&app, txid, 1, &ago(age)).await;
    }
    pass_at(&app, Utc::now()).await;

    // Act
    let (status, first) = app
        .get_with_token(
            "/api/v1/alerts?kind=stuck&provider=fiserv&open=true&limit=2",
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 200, "{first}");
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_string();
    let (_, second) = app
        .get_with_token(
            &format!("/api/v1/alerts?kind=stuck&provider=fiserv&open=true&limit=2&cursor={cursor}"),
            Some(ADMIN_TOKEN),
        )
        .await;
    let (bad, error) = app
        .get_with_token("/api/v1/alerts?kind=stuk", Some(ADMIN_TOKEN))
        .await;
    let (forbidden, _) = app
        .get_with_token("/api/v1/alerts", Some(REPORTS_TOKEN))
        .await;
    let (missing, _) = app
        .get_with_token("/api/v1/alerts/999999", Some(ADMIN_TOKEN))
        .await;

    // Assert
    let subjects = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["subject"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        subjects(&first),
        ["fiserv/7300603", "fiserv/7300602"],
        "newest first"
    );
    assert_eq!(subjects(&second), ["fiserv/7300601"]);
    assert_eq!(second["next_cursor"], Value::Null);
    assert_eq!(bad, 400, "{error}");
    assert!(
        error["error"].as_str().unwrap_or("").contains("\"stuk\""),
        "{error}"
    );
    assert_eq!(forbidden, 403);
    assert_eq!(missing, 404);
    app.stop().await;
}

#[tokio::test]
async fn a_receiver_answering_500_then_200_gets_the_alert_once_with_one_webhook_id() {
    // Arrange
    let receiver = receiver(1, false).await;
    let app = spawn_app_with(|c| alerts_config(c, Some(&receiver), "", "48h")).await;
    wait_for_start_pass(&app).await;
    post_fiserv(&app, "7300701", 1, &ago(31)).await;

    // Act
    assert_eq!(pass_at(&app, Utc::now()).await.notices, 1);
    let requests = wait_for_requests(&receiver, 2).await;
    outbox_is_drained(&app).await;

    // Assert
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(
        requests
            .iter()
            .map(|r| (r.verified, r.answered))
            .collect::<Vec<_>>(),
        [(true, 500), (true, 200)]
    );
    assert_eq!(
        requests[0].webhook_id, requests[1].webhook_id,
        "a retry keeps its webhook-id"
    );
    assert!(requests[0].webhook_id.starts_with("msg_"));
    assert_eq!(receiver.delivered().len(), 1, "delivered exactly once");
    assert!(receiver.alerts_toml().contains(receiver.url()));
    assert_eq!(receiver.env_var().1, ALERT_SECRET);
    let summary = receiver.summary();
    assert_eq!(summary.firing, ["stuck fiserv/7300701"]);
    assert_eq!((summary.failed_on_purpose, summary.bad_signatures), (1, 0));
    let alert_id = &requests[1].body["id"];
    let (status, alert) = app
        .get_with_token(&format!("/api/v1/alerts/{alert_id}"), Some(ADMIN_TOKEN))
        .await;
    assert_eq!(status, 200, "{alert}");
    let delivery = &alert["deliveries"][0];
    assert_eq!(delivery["state"], "delivered", "{alert}");
    assert_eq!(delivery["webhook_id"], requests[0].webhook_id.as_str());
    let codes: Vec<&Value> = delivery["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["http_status"])
        .collect();
    assert_eq!(codes, [&Value::from(500), &Value::from(200)], "{alert}");
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("cashout_recon_alert_deliveries_total{result=\"failed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cashout_recon_alert_deliveries_total{result=\"delivered\"} 1"),
        "{metrics}"
    );
    app.stop().await;
    receiver.stop().await;
}

/// Answer times of `n` genuine Fiserv webhooks sent one after the other.
async fn webhook_latencies(app: &TestApp, prefix: &str, n: usize) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let body = FiservBody::new(&format!("{prefix}{i}"), 2).bytes();
        let headers = fiserv_headers(
            &body,
            "/webhooks/fiserv",
            FISERV_SECRET,
            now_unix(),
            &format!("req-{prefix}{i}"),
        );
        let started = Instant::now();
        let answer = app.post_webhook("fiserv", &headers, &body).await;
        latencies.push(started.elapsed());
        assert_accepted(&answer, "latency probe");
    }
    latencies.sort();
    latencies
}

fn p99(sorted: &[Duration]) -> Duration {
    sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)]
}

#[tokio::test]
async fn a_hung_receiver_does_not_delay_webhook_acknowledgements() {
    // Arrange: a receiver that never answers, and a minute-long delivery timeout.
    let receiver = receiver(0, true).await;
    let app =
        spawn_app_with(|c| alerts_config(c, Some(&receiver), "delivery_timeout = \"60s\"", "48h"))
            .await;
    wait_for_start_pass(&app).await;
    let without = webhook_latencies(&app, "74000", 200).await;

    // Act: an alert whose delivery hangs.
    post_fiserv(&app, "7300801", 1, &ago(31)).await;
    pass_at(&app, Utc::now()).await;
    let until = Instant::now() + WITHIN;
    while receiver.hung() == 0 {
        assert!(
            Instant::now() < until,
            "the delivery never reached the receiver"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let with = webhook_latencies(&app, "74001", 200).await;

    // Assert
    println!(
        "webhook p99 without a hung alert receiver: {:?}; with one: {:?}",
        p99(&without),
        p99(&with)
    );
    assert_eq!(receiver.hung(), 1, "the delivery is still hanging");
    assert!(
        p99(&with) < Duration::from_secs(2),
        "p99 {:?} with a hung receiver",
        p99(&with)
    );
    app.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn sqlite_only_mismatch_alerts_are_open_exactly_while_their_mismatch_is() {
    // Arrange: mismatches as the reconciliation engine opens them (the subject is the
    // provider_ref, or `ext:<external_id>` for a ledger entry).
    let receiver = receiver(0, false).await;
    let app = spawn_sqlite_app_with(|c| alerts_config(c, Some(&receiver), "", "48h")).await;
    wait_for_start_pass(&app).await;
    let cases = [
        (
            "duplicate_payout",
            Some("tx-d"),
            "ord-d",
            "critical",
            "simpay/tx-d",
        ),
        (
            "unknown_to_ledger",
            Some("tx-u"),
            "ord-u",
            "warning",
            "simpay/tx-u",
        ),
        (
            "amount_mismatch",
            None,
            "ord-a",
            "critical",
            "simpay/ext:ord-a",
        ),
        (
            "status_conflict",
            Some("tx-s"),
            "ord-s",
            "critical",
            "simpay/tx-s",
        ),
    ];
    let db = rusqlite::Connection::open(&app.db_path).expect("open the store file");
    let now = Utc::now().timestamp_millis();
    for (kind, provider_ref, external_id, _, _) in cases {
        db.execute(
            "INSERT INTO mismatches (kind, provider, provider_ref, external_id, detail, opened_at)
             VALUES (?1, 'simpay', ?2, ?3, 'ledger says 10.00, provider 12.00', ?4)",
            rusqlite::params![kind, provider_ref, external_id, now],
        )
        .expect("insert a mismatch");
    }
    db.execute(
        "INSERT INTO mismatches (kind, provider, provider_ref, external_id, detail, opened_at)
         VALUES ('fee_mismatch', 'simpay', 'tx-f', NULL, 'no alert for this kind', ?1)",
        rusqlite::params![now],
    )
    .expect("insert a mismatch");

    // Act
    let opened = pass_at(&app, Utc::now()).await;
    let again = pass_at(&app, Utc::now() + MIN).await;

    // Assert
    assert_eq!((opened.opened, opened.notices), (4, 4), "{opened:?}");
    assert_eq!(again.notices, 0);
    for (kind, _, _, severity, subject) in cases {
        let alert = app.wait_for_open_alert(kind, subject, WITHIN).await;
        assert_eq!(alert["severity"], severity, "{kind}: {alert}");
    }

    // The engine resolves the mismatches: the alerts resolve, each resolution delivered.
    db.execute(
        "UPDATE mismatches SET resolved_at = ?1 WHERE resolved_at IS NULL",
        rusqlite::params![now + 1],
    )
    .expect("resolve the mismatches");
    let resolved = pass_at(&app, Utc::now() + MIN * 2).await;
    assert_eq!(
        (resolved.resolved, resolved.notices),
        (4, 4),
        "{resolved:?}"
    );
    let requests = wait_for_requests(&receiver, 8).await;
    outbox_is_drained(&app).await;
    assert_eq!(
        requests
            .iter()
            .filter(|r| r.body["status"] == "resolved")
            .count(),
        4,
        "{requests:?}"
    );
    assert!(app.open_alerts().await.is_empty());
    app.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn a_resolution_waits_for_the_retries_of_its_firing_notice() {
    // Arrange: the first delivery fails, so the firing notice is retried later.
    let receiver = receiver(1, false).await;
    let app = spawn_app_with(|c| alerts_config(c, Some(&receiver), "", "48h")).await;
    wait_for_start_pass(&app).await;
    post_fiserv(&app, "7300901", 1, &ago(31)).await;
    assert_eq!(pass_at(&app, Utc::now()).await.notices, 1);
    wait_for_requests(&receiver, 1).await;

    // Act: resolved while the firing notice waits for its retry.
    post_fiserv(&app, "7300901", 3, &ago(31)).await;
    assert_eq!(pass_at(&app, Utc::now()).await.resolved, 1);
    wait_for_requests(&receiver, 3).await;
    outbox_is_drained(&app).await;

    // Assert
    let statuses: Vec<(u16, String)> = receiver
        .requests()
        .iter()
        .map(|r| {
            (
                r.answered,
                r.body["status"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        [
            (500, "firing".to_string()),
            (200, "firing".to_string()),
            (200, "resolved".to_string())
        ]
    );
    app.stop().await;
    receiver.stop().await;
}
