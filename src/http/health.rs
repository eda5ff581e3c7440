//! Liveness, readiness and metrics endpoints (SPEC §2.2).

use std::time::Duration;

use actix_web::{get, web, HttpResponse};

use crate::app::AppState;

/// 200 `ok` while the process runs.
#[get("/healthz")]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok")
}

/// 200 when the store accepts writes and the scheduler runs, else 503 with the reason.
#[get("/readyz")]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    if let Some(reason) = state.scheduler_heartbeat.problem() {
        return HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body(reason);
    }
    match tokio::time::timeout(Duration::from_secs(2), state.store.check_writable()).await {
        Ok(Ok(())) => HttpResponse::Ok().content_type("text/plain").body("ready"),
        Ok(Err(err)) => HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body(format!("store does not accept writes: {err}")),
        Err(_) => HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body("store did not answer a write within 2 s"),
    }
}

/// Prometheus text format.
#[get("/metrics")]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}
