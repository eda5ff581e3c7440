//! Webhook signature schemes: each proves a request genuine over its exact raw bytes.
//!
//! Every scheme compares in constant time (`subtle`), accepts any of several secrets
//! (rotation) and reports which one matched. Replay of a request id with another body is
//! judged by the store, which remembers ids across restarts; schemes only check
//! signatures and timestamp tolerance.

pub mod form_control;
pub mod hmac;
pub mod jwt;
pub mod standard_webhooks;
pub mod stripe;

#[cfg(test)]
mod robustness;

use secrecy::SecretString;

/// Header names and values of one request; names compared case-insensitively.
#[derive(Clone, Debug, Default)]
pub struct RequestHeaders {
    entries: Vec<(String, String)>,
}

impl RequestHeaders {
    /// An empty set.
    pub fn new() -> RequestHeaders {
        RequestHeaders::default()
    }

    /// Adds a header (the name is stored lowercased).
    pub fn insert(&mut self, name: &str, value: &str) {
        self.entries
            .push((name.to_ascii_lowercase(), value.to_string()));
    }

    /// The first value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// All (name, value) pairs, names lowercased.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }
}

impl<const N: usize> From<[(&str, &str); N]> for RequestHeaders {
    fn from(pairs: [(&str, &str); N]) -> Self {
        let mut headers = RequestHeaders::new();
        for (name, value) in pairs {
            headers.insert(name, value);
        }
        headers
    }
}

/// One inbound webhook request as received: nothing parsed yet.
#[derive(Clone, Copy, Debug)]
pub struct InboundRequest<'a> {
    /// The request path as received, with `?query` when there was one.
    pub path: &'a str,
    pub headers: &'a RequestHeaders,
    pub body: &'a [u8],
}

/// What a successful verification establishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// Position of the configured secret (or public key) that matched.
    pub secret_index: usize,
    /// The request id when the scheme has one (`webhook-id`, `x-request-id`): the
    /// dedup key; an empty header counts as absent. (Fiserv's `x-request-id` is not
    /// covered by its signature; replays are caught by [`Verified::replay_key`] instead.)
    pub request_id: Option<String>,
    /// The signed timestamp (unix seconds) when the scheme has one.
    pub timestamp: Option<i64>,
    /// What identifies this signed request whatever its encoding: the MAC that matched,
    /// as bytes (so `sha256=`, padding or hex case cannot make it new), or for a JWT its
    /// signed header and claims (ECDSA signatures are malleable, the signed part is not).
    pub replay_key: Vec<u8>,
}

/// Why a request is not accepted as genuine. `Display` never contains secrets or the body.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("missing {0}")]
    MissingSignature(String),
    #[error("signature does not match: {0}")]
    BadSignature(String),
    #[error("timestamp {timestamp} is outside the tolerance of {tolerance_secs} s")]
    StaleTimestamp { timestamp: i64, tolerance_secs: u64 },
}

impl VerifyError {
    /// The SPEC §2.1 error code (also the `reason` label of the rejection metric).
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::MissingSignature(_) => "missing_signature",
            VerifyError::BadSignature(_) => "bad_signature",
            VerifyError::StaleTimestamp { .. } => "stale_timestamp",
        }
    }
}

/// A scheme that cannot be built from its configuration; the text names what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SchemeConfigError(pub String);

/// Checks a signed unix timestamp against `now` with a symmetric tolerance.
pub fn check_timestamp(
    timestamp: i64,
    now_unix: i64,
    tolerance_secs: u64,
) -> Result<(), VerifyError> {
    let skew = now_unix.abs_diff(timestamp);
    if skew > tolerance_secs {
        return Err(VerifyError::StaleTimestamp {
            timestamp,
            tolerance_secs,
        });
    }
    Ok(())
}

/// Parses a header holding unix seconds; a malformed value is a bad signature.
pub fn parse_unix_seconds(value: &str, header: &str) -> Result<i64, VerifyError> {
    value
        .trim()
        .parse::<i64>()
        .map_err(|_| VerifyError::BadSignature(format!("{header} is not unix seconds")))
}

/// Compares two byte strings in constant time (for equal lengths).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// A configured verification scheme, ready to check requests.
pub enum Verifier {
    StandardWebhooks(standard_webhooks::StandardWebhooks),
    Stripe(stripe::StripeSignature),
    Hmac(hmac::HmacScheme),
    FormControl(form_control::FormControl),
    Jwt(jwt::JwtScheme),
}

impl Verifier {
    /// Verifies `request` at time `now_unix` (unix seconds).
    pub fn verify(
        &self,
        request: &InboundRequest<'_>,
        now_unix: i64,
    ) -> Result<Verified, VerifyError> {
        match self {
            Verifier::StandardWebhooks(scheme) => scheme.verify(request, now_unix),
            Verifier::Stripe(scheme) => scheme.verify(request, now_unix),
            Verifier::Hmac(scheme) => scheme.verify(request, now_unix),
            Verifier::FormControl(scheme) => scheme.verify(request, now_unix),
            Verifier::Jwt(scheme) => scheme.verify(request, now_unix),
        }
    }

    /// Whether the scheme signs a timestamp, so that [`Verified::replay_key`] names one
    /// request inside a bounded window (the replay cache). Without one (SimPay's body
    /// HMAC, Tupay's `control`) the body hash already identifies a replay.
    pub fn has_replay_window(&self) -> bool {
        match self {
            Verifier::StandardWebhooks(_) | Verifier::Stripe(_) | Verifier::Jwt(_) => true,
            Verifier::Hmac(scheme) => scheme.has_timestamp(),
            Verifier::FormControl(_) => false,
        }
    }

    /// A short name for logs and `check-config`.
    pub fn scheme_name(&self) -> &'static str {
        match self {
            Verifier::StandardWebhooks(_) => "standard_webhooks",
            Verifier::Stripe(_) => "stripe",
            Verifier::Hmac(_) => "hmac",
            Verifier::FormControl(_) => "form_control",
            Verifier::Jwt(_) => "jwt",
        }
    }
}

/// Secrets as configured (one per environment variable, in configured order).
pub type Secrets = Vec<SecretString>;
