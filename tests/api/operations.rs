//! Operations endpoints (SPEC §2.2): liveness, readiness and Prometheus metrics.

use crate::helpers::{fiserv_headers, now_unix, spawn_app, FiservBody};

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
