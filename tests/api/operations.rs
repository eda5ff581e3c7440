//! Operations endpoints (SPEC §2.2): liveness, readiness and Prometheus metrics.

use crate::helpers::{
    fiserv_headers, now_unix, pismo_body, pismo_headers, spawn_app, spawn_app_with, FiservBody,
    PismoKey, ADMIN_TOKEN,
};

#[tokio::test]
async fn healthz_answers_200_ok() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let response = app
        .client
        .get(format!("{}/healthz", app.address))
        .send()
        .await
        .expect("GET /healthz");

    // Assert
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.text().await.expect("body"), "ok");
    app.stop().await;
}

#[tokio::test]
async fn readyz_answers_200_when_the_store_takes_writes() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let (status, body) = app.get_with_token("/readyz", None).await;

    // Assert
    assert_eq!(status, 200, "{body}");
    app.stop().await;
}

#[tokio::test]
async fn metrics_count_rejected_webhooks_by_provider_and_reason() {
    // Arrange
    let app = spawn_app().await;
    let line = r#"cashout_recon_webhooks_rejected_total{provider="fiserv",reason="bad_signature"}"#;
    assert!(
        !app.metrics_text().await.contains(line),
        "no rejection counted before any"
    );
    let body = FiservBody::new("7400001", 3).bytes();
    let forged = fiserv_headers(
        &body,
        "/webhooks/fiserv",
        "not-the-secret",
        now_unix(),
        "req-forged",
    );

    // Act
    let (status, _) = app.post_webhook("fiserv", &forged, &body).await;
    let metrics = app.metrics_text().await;

    // Assert
    assert_eq!(status, 401);
    assert!(
        metrics.contains(&format!("{line} 1")),
        "the rejection is counted: {metrics}"
    );
    assert!(
        !metrics.contains("7400001"),
        "metrics never carry payload data"
    );
    app.stop().await;
}

#[tokio::test]
async fn status_batch_bounds_a_cycles_status_checks_of_both_kinds_together() {
    // Arrange: Pismo (no search) with its status endpoint on a mock that records each
    // request; three in-flight cash-outs due for a check and three ledger entries the
    // provider has never reported; `poll.status_batch = 2`.
    let provider_api = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("GET"))
        .respond_with(wiremock::ResponseTemplate::new(404))
        .mount(&provider_api)
        .await;
    let app = spawn_app_with(|config| {
        config.replace(
            "id = \"pismo\"\nkind = \"pismo\"\nbase_url = \"http://127.0.0.1:9\"",
            &format!(
                "id = \"pismo\"\nkind = \"pismo\"\nbase_url = \"{}\"\nstatus_path = \"/status/{{id}}\"\n\
                 status_after = \"1ms\"\nledger = true",
                provider_api.uri()
            ),
        ) + "\n[poll]\nstatus_batch = 2\nmax_retries = 0\n"
    })
    .await;
    for n in 1..=3 {
        let body = pismo_body(
            &format!("ev-batch-{n}"),
            &format!("auth-batch-{n}"),
            "PROCESSING",
            "10.00",
            "\"BRL\"",
        );
        let answer = app
            .post_webhook(
                "pismo",
                &pismo_headers(&body, PismoKey::Ec, now_unix()),
                &body,
            )
            .await;
        assert_eq!(answer.0, 200, "{}", answer.1);
    }
    for n in 1..=3 {
        let response = app
            .client
            .post(format!("{}/api/v1/ledger", app.address))
            .bearer_auth(ADMIN_TOKEN)
            .json(&serde_json::json!({
                "provider": "pismo", "external_id": format!("ord-unseen-{n}"),
                "amount": "5.00", "currency": "BRL", "provider_ref": format!("auth-unseen-{n}"),
            }))
            .send()
            .await
            .expect("POST /api/v1/ledger");
        assert!(
            response.status().is_success(),
            "{:?}",
            response.text().await
        );
    }
    tokio::time::sleep(std::time::Duration::from_millis(5)).await; // past status_after = 1ms

    // Act: one cycle.
    let (status, summary) = app
        .post_with_token("/api/v1/providers/pismo/poll", Some(ADMIN_TOKEN))
        .await;

    // Assert: two status checks in all, not two of each kind.
    assert_eq!(status, 200, "{summary}");
    let asked: std::collections::BTreeSet<String> = provider_api
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .map(|request| request.url.path().to_string())
        .collect();
    assert_eq!(asked.len(), 2, "{asked:?}");
    app.stop().await;
}
