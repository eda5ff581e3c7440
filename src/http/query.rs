//! `ApiQuery<T>`: a query-string extractor whose errors name the parameter, the rule and
//! what was sent (`limit: expected an integer, got "abc"`); unknown parameters are named.

use std::future::{ready, Ready};

use actix_web::{dev::Payload, FromRequest, HttpRequest};
use serde::de::DeserializeOwned;

use super::ApiError;

/// The decoded query string of a request, or a 400 naming the parameter at fault.
pub struct ApiQuery<T>(pub T);

impl<T> ApiQuery<T> {
    /// The decoded query.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> std::ops::Deref for ApiQuery<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Decodes `query` into `T`; the error names the parameter and what was wrong with it.
pub fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let deserializer =
        serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let parameter = err.path().to_string();
        let inner = err.inner().to_string();
        if let Some(rest) = inner.strip_prefix("unknown field `") {
            let (name, expected) = rest.split_once('`').unwrap_or((rest, ""));
            let known = expected
                .trim_start_matches(", expected one of ")
                .trim_start_matches(", expected ")
                .replace('`', "");
            return ApiError::BadRequest(format!("{name}: unknown parameter (known: {known})"));
        }
        let sent = form_urlencoded::parse(query.as_bytes())
            .find(|(name, _)| *name == parameter)
            .map(|(_, value)| value.chars().take(64).collect::<String>());
        let rule = if inner.contains("invalid digit") || inner.contains("number too large") {
            "expected an integer".to_string()
        } else if inner.contains("`true` or `false`") {
            "expected true or false".to_string()
        } else {
            inner
        };
        ApiError::BadRequest(match sent {
            Some(sent) => format!("{parameter}: {rule}, got {sent:?}"),
            None => format!("{parameter}: {rule}"),
        })
    })
}

impl<T: DeserializeOwned> FromRequest for ApiQuery<T> {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(parse_query(request.query_string()).map(ApiQuery))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Query {
        limit: Option<usize>,
        open: Option<bool>,
        provider: Option<String>,
    }

    #[test]
    fn errors_name_the_parameter_the_rule_and_what_was_sent() {
        let cases = [
            ("limit=abc", "limit: expected an integer, got \"abc\""),
            ("limit=-1", "limit: expected an integer, got \"-1\""),
            ("open=maybe", "open: expected true or false, got \"maybe\""),
            (
                "provider=x&kind=y",
                "kind: unknown parameter (known: limit, open, provider)",
            ),
        ];
        for (query, message) in cases {
            let err = parse_query::<Query>(query).expect_err(query);
            assert_eq!(err.to_string(), message, "{query}");
        }
        assert_eq!(
            parse_query::<Query>("limit=5").expect("valid").limit,
            Some(5)
        );
    }
}
