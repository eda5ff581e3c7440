//! The HTTP surface: route table of webhooks, operations and the admin API (SPEC §2).

pub mod admin;
pub mod error;
pub mod health;
pub mod webhooks;

use actix_web::web;

pub use error::ApiError;

/// Registers every route.
pub fn routes(config: &mut web::ServiceConfig) {
    config
        .service(health::healthz)
        .service(health::readyz)
        .service(health::metrics)
        .service(webhooks::receive)
        .service(
            web::scope("/api/v1")
                .service(admin::list_cashouts)
                .service(admin::get_cashout)
                .service(admin::reprocess_event)
                .service(admin::list_mismatches)
                .service(admin::list_alerts),
        );
}
