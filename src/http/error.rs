//! The API error: one type mapping every failure to SPEC §2 status codes, never leaking internals.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::ingestor::ReprocessError;
use crate::store::StoreError;
use crate::verify::VerifyError;

/// An error answer: `{"error": "<sentence>", "code": "<snake_case>"}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("this token's role may not use this endpoint")]
    Forbidden,
    #[error("{0}")]
    NotFound(&'static str),
    #[error("{message}")]
    Conflict { message: String, code: &'static str },
    #[error("{0}")]
    Unprocessable(String),
    #[error("the store cannot take writes now; retry shortly")]
    Unavailable,
    #[error("the request did not arrive whole within server.read_timeout")]
    Timeout,
    #[error("internal error")]
    Internal,
    // What a webhook is answered when it is not taken (SPEC §2.1).
    #[error("unknown provider")]
    UnknownProvider,
    #[error("this provider sends no webhooks")]
    NoWebhooks,
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("cannot read the body: {0}")]
    BadBody(String),
    /// Its signature, timestamp or token does not verify.
    #[error("{0}")]
    Unverified(VerifyError),
    #[error("request id already used with a different body")]
    Replayed,
    /// The store could not commit a webhook: nothing acknowledged, the sender retries.
    #[error("the store cannot commit now; retry")]
    NotCommitted,
}

impl ApiError {
    /// The answer's `code`.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict { code, .. } => code,
            ApiError::Unprocessable(_) => "invalid",
            ApiError::Unavailable => "store_unavailable",
            ApiError::Timeout => "request_timeout",
            ApiError::Internal => "internal",
            ApiError::UnknownProvider => "unknown_provider",
            ApiError::NoWebhooks => "no_webhooks",
            ApiError::TooLarge(_) => "too_large",
            ApiError::BadBody(_) => "bad_body",
            ApiError::Unverified(err) => err.code(),
            ApiError::Replayed => "replayed",
            ApiError::NotCommitted => "store_unavailable",
        }
    }
}

impl From<ReprocessError> for ApiError {
    fn from(err: ReprocessError) -> Self {
        match err {
            ReprocessError::NoSuchEvent => ApiError::NotFound("no such event"),
            ReprocessError::NoLongerQuarantined => ApiError::NotFound("no such quarantined event"),
            ReprocessError::NotQuarantined { .. } => ApiError::Conflict {
                message: err.to_string(),
                code: "not_quarantined",
            },
            ReprocessError::UnknownProvider(_) => ApiError::Conflict {
                message: err.to_string(),
                code: "unknown_provider",
            },
            ReprocessError::Store(err) => err.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        tracing::error!(error = %err, "store error while answering an API request");
        match err {
            StoreError::Unavailable(_) | StoreError::Closed | StoreError::LeaseLost { .. } => {
                ApiError::Unavailable
            }
            StoreError::Database(_) | StoreError::Open { .. } | StoreError::ReadOnly => {
                ApiError::Internal
            }
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::UnknownProvider | ApiError::NoWebhooks => StatusCode::NOT_FOUND,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BadBody(_) => StatusCode::BAD_REQUEST,
            ApiError::Unverified(_) | ApiError::Replayed => StatusCode::UNAUTHORIZED,
            ApiError::NotCommitted => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        match self {
            ApiError::Unavailable | ApiError::NotCommitted => {
                response.insert_header((header::RETRY_AFTER, "1"));
            }
            ApiError::Unauthorized => {
                response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            ApiError::Timeout => {
                // The rest of the body may still trickle in: do not wait for it.
                response.force_close();
            }
            _ => {}
        }
        response.json(json!({ "error": self.to_string(), "code": self.code() }))
    }
}
