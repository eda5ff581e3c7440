//! The ops console under `/console`: server-rendered pages over the admin API's use cases,
//! behind a sign-in with the API's tokens and roles, a session cookie and CSRF-checked forms.
//!
//! Only the sign-in page and the stylesheet answer without a session; every other path
//! redirects to the sign-in. The reports role sees Reports only (403 elsewhere).

mod actions;
mod layout;
pub mod session;
mod views;

use std::future::{ready, Ready};
use std::time::Instant;

use actix_web::http::{header, StatusCode};
use actix_web::{dev::Payload, web, FromRequest, HttpRequest, HttpResponse, ResponseError};
use maud::html;

pub use session::{Session, Sessions};

use crate::app::AppState;
use crate::http::admin::Role;
use crate::http::ApiError;
use crate::store::StoreError;

/// Registers the console's routes under `/console`.
pub fn routes(config: &mut web::ServiceConfig) {
    config.service(
        web::scope("/console")
            .route("", web::get().to(views::overview))
            .route("/", web::get().to(views::overview))
            .route("/static/console.css", web::get().to(views::stylesheet))
            .route("/sign-in", web::get().to(actions::sign_in_page))
            .route("/sign-in", web::post().to(actions::sign_in))
            .route("/sign-out", web::post().to(actions::sign_out))
            .route("/cashouts", web::get().to(views::cashouts))
            .route(
                "/cashouts/{provider}/{provider_ref}",
                web::get().to(views::cashout),
            )
            .route("/mismatches", web::get().to(views::mismatches))
            .route("/alerts", web::get().to(views::alerts))
            .route("/alerts/{id}", web::get().to(views::alert))
            .route("/reports", web::get().to(views::reports))
            .route("/reports", web::post().to(actions::generate_report))
            .route("/reports/{date}.csv", web::get().to(views::report_csv))
            .route(
                "/reports/{date}/summary",
                web::get().to(views::report_summary),
            )
            .route("/quarantine", web::get().to(views::quarantine))
            .route("/events/{event_id}", web::get().to(views::event))
            .route(
                "/events/{event_id}/reprocess",
                web::post().to(actions::reprocess),
            )
            .route("/providers/{provider}/poll", web::post().to(actions::poll))
            .route("/reconcile", web::post().to(actions::reconcile))
            .default_service(web::to(views::unknown)),
    );
}

/// Why a console request was not served: rendered as an HTML page (or a redirect).
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// No live session: to the sign-in page.
    #[error("sign in first")]
    SignIn,
    /// A POST without the session's CSRF token.
    #[error("this form is stale or was not sent by the console; reload the page and retry")]
    Csrf,
    /// What the API would answer (403 for the reports role, 404, 409, 503…).
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl From<StoreError> for ConsoleError {
    fn from(err: StoreError) -> Self {
        ConsoleError::Api(err.into())
    }
}

impl ResponseError for ConsoleError {
    fn status_code(&self) -> StatusCode {
        match self {
            ConsoleError::SignIn => StatusCode::SEE_OTHER,
            ConsoleError::Csrf => StatusCode::FORBIDDEN,
            ConsoleError::Api(err) => err.status_code(),
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ConsoleError::SignIn = self {
            return HttpResponse::SeeOther()
                .insert_header((header::LOCATION, "/console/sign-in"))
                .insert_header((header::CACHE_CONTROL, "no-store"))
                .finish();
        }
        let status = self.status_code();
        let title = match self {
            ConsoleError::Api(ApiError::Forbidden) => "Not allowed for your role".to_string(),
            _ => status.canonical_reason().unwrap_or("Error").to_string(),
        };
        let sentence = match self {
            ConsoleError::Api(ApiError::Forbidden) => {
                "The reports token opens the Reports page only.".to_string()
            }
            ConsoleError::Api(ApiError::Internal) => {
                "Something went wrong on the server; the log has the details.".to_string()
            }
            other => other.to_string(),
        };
        let body = layout::bare_page(
            &title,
            html! {
                h1 { (status.as_u16()) " · " (title) }
                p { (sentence) }
                p { a href="/console" { "Back to the console" } }
            },
        );
        html_response(status, body)
    }
}

/// An HTML answer that no cache keeps and no frame embeds.
pub(crate) fn html_response(status: StatusCode, body: maud::Markup) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header(("x-frame-options", "DENY"))
        .insert_header(("x-content-type-options", "nosniff"))
        .insert_header((
            "content-security-policy",
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ))
        .body(body.into_string())
}

/// A request's live session (the extractor every console handler but the sign-in takes).
pub struct Signed {
    /// The session id (the cookie's value).
    pub id: String,
    pub session: Session,
}

impl Signed {
    /// Refuses the reports role (403 page) where the page or action is admin only.
    pub fn require_admin(&self) -> Result<(), ConsoleError> {
        match self.session.role {
            Role::Admin => Ok(()),
            Role::Reports => Err(ConsoleError::Api(ApiError::Forbidden)),
        }
    }

    /// Checks the CSRF token of a POSTed form (before anything else is read from it).
    pub fn check_csrf(&self, form: &Form) -> Result<(), ConsoleError> {
        if session::csrf_matches(&self.session, form.get("csrf")) {
            Ok(())
        } else {
            Err(ConsoleError::Csrf)
        }
    }
}

fn state_of(request: &HttpRequest) -> Result<&web::Data<AppState>, ConsoleError> {
    request
        .app_data::<web::Data<AppState>>()
        .ok_or(ConsoleError::Api(ApiError::Internal))
}

impl FromRequest for Signed {
    type Error = ConsoleError;
    type Future = Ready<Result<Signed, ConsoleError>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready((|| {
            let state = state_of(request)?;
            let id = request
                .cookie(session::COOKIE)
                .map(|c| c.value().to_string())
                .filter(|v| !v.is_empty())
                .ok_or(ConsoleError::SignIn)?;
            let session = state
                .console
                .get(&id, Instant::now())
                .ok_or(ConsoleError::SignIn)?;
            Ok(Signed { id, session })
        })())
    }
}

/// A POSTed urlencoded form (read as bytes, so a form without its CSRF token is refused
/// with 403 whatever else it lacks).
pub struct Form(Vec<(String, String)>);

impl Form {
    /// Decodes an `application/x-www-form-urlencoded` body.
    pub fn parse(body: &[u8]) -> Form {
        Form(
            form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}
