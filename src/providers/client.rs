//! The outbound side of a provider: the trait the poller calls to search and fetch status.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::providers::{Observation, ParseError};

/// Why a provider call failed (after retries).
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Credentials refused (after one token refresh).
    #[error("credentials refused ({0})")]
    Unauthorized(String),
    /// Still throttled after honouring `Retry-After`.
    #[error("rate limited; retry after {0:?}")]
    RateLimited(Duration),
    /// The provider answered an error status.
    #[error("provider answered HTTP {status}")]
    Status { status: u16 },
    /// The cash-out is unknown to the provider.
    #[error("cash-out {0} is unknown to the provider")]
    NotFound(String),
    /// Timeouts or connection errors on every attempt.
    #[error("provider unreachable: {0}")]
    Unreachable(String),
    /// The answer could not be decoded or mapped.
    #[error("cannot decode the provider's answer: {0}")]
    Decode(String),
    /// This provider has no such endpoint.
    #[error("not supported by this provider: {0}")]
    NotSupported(&'static str),
}

impl From<ParseError> for ProviderError {
    fn from(err: ParseError) -> Self {
        ProviderError::Decode(err.0)
    }
}

/// A time window of a search sweep: cash-outs changed in `[from, to)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchWindow {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// One page of a search.
#[derive(Debug)]
pub struct SearchPage {
    /// Each item decoded on its own: one bad item does not hide the others.
    pub items: Vec<Result<Observation, ParseError>>,
    /// The page to ask for next, `None` after the last page.
    pub next_page: Option<u32>,
}

/// A provider's API as the poller uses it. Implementations handle auth, signing,
/// retries with backoff, `Retry-After`, and the provider's `max_rps`.
#[async_trait]
pub trait ProviderClient: Send + Sync {
    /// The first page number of a search (providers count from 0 or 1).
    fn first_page(&self) -> u32;

    /// Whether the provider has a search (or history) endpoint.
    fn can_search(&self) -> bool;

    /// One page of cash-outs changed in `window`.
    async fn search_page(&self, window: SearchWindow, page: u32) -> Result<SearchPage, ProviderError>;

    /// Whether the provider can fetch one cash-out's status by id.
    fn can_fetch_status(&self) -> bool;

    /// The current state of one cash-out.
    async fn fetch_status(&self, provider_ref: &str) -> Result<Observation, ProviderError>;
}
