//! Liveness, readiness and metrics endpoints (SPEC §2.2).

use actix_web::{get, web, HttpResponse};

use crate::app::AppState;

/// 200 `ok` while the process runs.
#[get("/healthz")]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok")
}

/// Why the daemon is not ready (store does not take writes, scheduler stopped), if not.
async fn not_ready(state: &AppState) -> Option<String> {
    if let Some(reason) = state.scheduler_heartbeat.problem() {
        return Some(reason);
    }
    state.store.readiness().await.err()
}

/// 200 when the store accepts writes and the scheduler runs, else 503 with the reason.
#[get("/readyz")]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    match not_ready(&state).await {
        None => HttpResponse::Ok().content_type("text/plain").body("ready"),
        Some(reason) => HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body(reason),
    }
}

/// Prometheus text format; `cashout_recon_ready` is judged as `/readyz` judges it.
#[get("/metrics")]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let ready = not_ready(&state).await.is_none();
    state.metrics.ready.set(i64::from(ready));
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}
