//! What a request passes before its handler runs: the read deadline (every route) and,
//! under `/api/v1`, the bearer token, so that no body is read for a stranger.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, ResponseError};
use futures_util::Stream;

use super::admin::{authorize, Role};
use super::ApiError;
use crate::app::AppState;

/// The message of the I/O error a body read fails with once the deadline has passed.
const DEADLINE_PASSED: &str = "the request body did not arrive within server.read_timeout";

/// Whether a payload error is the read deadline passing.
pub fn is_deadline(err: &PayloadError) -> bool {
    matches!(err, PayloadError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut)
}

/// A request body that fails with a `TimedOut` error once its deadline has passed.
struct DeadlinePayload {
    inner: Payload,
    deadline: Pin<Box<tokio::time::Sleep>>,
    expired: bool,
}

impl Stream for DeadlinePayload {
    type Item = Result<web::Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(None);
        }
        if let Poll::Ready(item) = Pin::new(&mut this.inner).poll_next(cx) {
            return Poll::Ready(item);
        }
        match this.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.expired = true;
                Poll::Ready(Some(Err(PayloadError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    DEADLINE_PASSED,
                )))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Bounds the body read of every request by `server.read_timeout`, counted from when the
/// request's head was read (actix's `client_request_timeout` bounds the head itself).
pub async fn read_deadline(
    mut request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let timeout = request
        .app_data::<web::Data<AppState>>()
        .map_or(Duration::from_secs(10), |state| {
            state.settings.server.read_timeout
        });
    let inner = request.take_payload();
    let bounded = DeadlinePayload {
        inner,
        deadline: Box::pin(tokio::time::sleep(timeout)),
        expired: false,
    };
    let boxed: Pin<Box<dyn Stream<Item = Result<web::Bytes, PayloadError>>>> = Box::pin(bounded);
    request.set_payload(Payload::from(boxed));
    next.call(request).await
}

/// The role a path under `/api/v1` needs: reports for `/api/v1/reports…`, else admin.
fn role_for(path: &str) -> Role {
    if path.starts_with("/api/v1/reports") {
        Role::Reports
    } else {
        Role::Admin
    }
}

/// Checks the bearer token (401/403) before any extractor reads the body (SPEC §2.3).
pub async fn require_token(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let refused = match request.app_data::<web::Data<AppState>>() {
        Some(state) => authorize(request.request(), state, role_for(request.path())).err(),
        None => Some(ApiError::Internal),
    };
    match refused {
        Some(err) => {
            let response = err.error_response();
            Ok(request.into_response(response).map_into_right_body())
        }
        None => Ok(next.call(request).await?.map_into_left_body()),
    }
}
