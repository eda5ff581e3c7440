//! The HTTP surface: route table of webhooks, operations and the admin API (SPEC §2).

pub mod admin;
pub mod error;
pub mod gate;
pub mod health;
pub mod query;
pub mod reconciliation;
pub mod webhooks;

use actix_web::error::JsonPayloadError;
use actix_web::middleware::from_fn;
use actix_web::web;

pub use error::ApiError;

use crate::metrics::Metrics;
use crate::providers::registry::ProviderRegistry;

/// Registers every route; each configured provider's webhook path is a route of its own.
pub fn routes(config: &mut web::ServiceConfig, providers: &ProviderRegistry, metrics: &Metrics) {
    config
        .service(health::healthz)
        .service(health::readyz)
        .service(health::metrics)
        .configure(|config| webhooks::routes(config, providers, metrics))
        .configure(crate::console::routes)
        .service(
            web::scope("/api/v1")
                // The token is checked before any extractor reads the body.
                .wrap(from_fn(gate::require_token))
                // A malformed query is a JSON 400 like every other API error (SPEC §2.3).
                .app_data(
                    web::QueryConfig::default()
                        .error_handler(|err, _| ApiError::BadRequest(err.to_string()).into()),
                )
                .app_data(
                    web::JsonConfig::default()
                        .limit(64 * 1024)
                        .error_handler(|err, _| json_error(err).into()),
                )
                .service(admin::list_cashouts)
                .service(admin::get_cashout)
                .service(admin::reprocess_event)
                .service(admin::poll_provider)
                .service(admin::register_ledger)
                .service(reconciliation::list_mismatches)
                .service(reconciliation::reconcile)
                .service(reconciliation::list_reports)
                .service(reconciliation::report_summary)
                .service(reconciliation::report_csv)
                .service(admin::list_alerts)
                .service(admin::get_alert),
        )
        .default_service(web::to(unknown_route));
}

/// Any other path: a JSON 404 with a code, like every other error.
async fn unknown_route() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such endpoint"))
}

/// The API error for a JSON body that could not be read or decoded.
fn json_error(err: JsonPayloadError) -> ApiError {
    match &err {
        JsonPayloadError::Payload(payload) if gate::is_deadline(payload) => ApiError::Timeout,
        JsonPayloadError::ContentType => ApiError::BadRequest(
            "body: expected a JSON body sent with Content-Type: application/json".to_string(),
        ),
        _ => ApiError::BadRequest(err.to_string()),
    }
}
