//! The Standard Webhooks scheme (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64>`).

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use secrecy::{ExposeSecret, SecretSlice};

use super::hmac::{hmac_bytes, HmacAlgorithm};
use super::{
    check_timestamp, constant_time_eq, parse_unix_seconds, InboundRequest, SchemeConfigError,
    Secrets, Verified, VerifyError,
};

const ID_HEADER: &str = "webhook-id";
const TIMESTAMP_HEADER: &str = "webhook-timestamp";
const SIGNATURE_HEADER: &str = "webhook-signature";
const SECRET_PREFIX: &str = "whsec_";

/// Accepts base64 with or without trailing padding (secrets and signatures).
const BASE64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decodes `whsec_<base64>` (or bare base64) into the HMAC key.
fn decode_secret(secret: &str) -> Option<Vec<u8>> {
    let encoded = secret.trim();
    let encoded = encoded.strip_prefix(SECRET_PREFIX).unwrap_or(encoded);
    BASE64_LENIENT
        .decode(encoded)
        .ok()
        .filter(|key| !key.is_empty())
}

/// HMAC-SHA256 over `id.timestamp.body`, with the id and timestamp exactly as sent.
fn mac(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> Vec<u8> {
    hmac_bytes(
        HmacAlgorithm::Sha256,
        key,
        &[id.as_bytes(), b".", timestamp.as_bytes(), b".", body],
    )
}

/// Signs a message as a Standard Webhooks sender would, returning `v1,<base64>`.
pub fn sign(
    secret: &str,
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<String, SchemeConfigError> {
    let key = decode_secret(secret)
        .ok_or_else(|| SchemeConfigError("the secret is not whsec_<base64>".to_string()))?;
    let mac = mac(&key, id, &timestamp.to_string(), body);
    Ok(format!("v1,{}", STANDARD.encode(mac)))
}

/// The configured Standard Webhooks verifier.
pub struct StandardWebhooks {
    keys: Vec<SecretSlice<u8>>,
    tolerance_secs: u64,
}

impl std::fmt::Debug for StandardWebhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandardWebhooks")
            .field("keys", &self.keys.len())
            .field("tolerance_secs", &self.tolerance_secs)
            .finish()
    }
}

impl StandardWebhooks {
    /// Decodes each `whsec_<base64>` secret (bare base64 accepted); an undecodable or
    /// empty one is an error naming its position (from 0), never its value.
    pub fn new(secrets: &Secrets, tolerance_secs: u64) -> Result<Self, SchemeConfigError> {
        if secrets.is_empty() {
            return Err(SchemeConfigError(
                "at least one secret is required".to_string(),
            ));
        }
        let keys = secrets
            .iter()
            .enumerate()
            .map(|(position, secret)| {
                decode_secret(secret.expose_secret())
                    .map(SecretSlice::from)
                    .ok_or_else(|| {
                        SchemeConfigError(format!(
                            "the secret at position {position} is not whsec_<base64>"
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(StandardWebhooks {
            keys,
            tolerance_secs,
        })
    }

    /// Verifies `request` at `now_unix`: any configured secret and any `v1` entry may
    /// match; the signature is checked before the timestamp.
    pub fn verify(
        &self,
        request: &InboundRequest<'_>,
        now_unix: i64,
    ) -> Result<Verified, VerifyError> {
        let header = |name: &str| {
            request
                .headers
                .get(name)
                .ok_or_else(|| VerifyError::MissingSignature(name.to_string()))
        };
        let id = header(ID_HEADER)?;
        if id.trim().is_empty() {
            return Err(VerifyError::MissingSignature(ID_HEADER.to_string()));
        }
        let timestamp = header(TIMESTAMP_HEADER)?;
        let signatures = header(SIGNATURE_HEADER)?;

        let presented: Vec<Vec<u8>> = signatures
            .split_whitespace()
            .filter_map(|entry| entry.strip_prefix("v1,"))
            .filter_map(|encoded| BASE64_LENIENT.decode(encoded).ok())
            .collect();
        if presented.is_empty() {
            return Err(VerifyError::BadSignature(format!(
                "{SIGNATURE_HEADER} has no v1 signature"
            )));
        }

        let mut matched = None;
        for (index, key) in self.keys.iter().enumerate() {
            let expected = mac(key.expose_secret(), id, timestamp, request.body);
            let hit = presented.iter().fold(false, |hit, candidate| {
                constant_time_eq(&expected, candidate) | hit
            });
            if hit && matched.is_none() {
                matched = Some((index, expected));
            }
        }
        let Some((secret_index, replay_key)) = matched else {
            return Err(VerifyError::BadSignature(format!(
                "{SIGNATURE_HEADER} matches no configured secret"
            )));
        };

        let seconds = parse_unix_seconds(timestamp, TIMESTAMP_HEADER)?;
        check_timestamp(seconds, now_unix, self.tolerance_secs)?;
        Ok(Verified {
            secret_index,
            request_id: Some(id.to_string()),
            timestamp: Some(seconds),
            replay_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::RequestHeaders;
    use secrecy::SecretString;

    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const TS: i64 = 1_649_367_553;
    const BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;
    const EXPECTED: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";

    fn secrets(values: &[&str]) -> Secrets {
        values.iter().map(|v| SecretString::from(*v)).collect()
    }

    fn headers(signature: &str) -> RequestHeaders {
        let ts = TS.to_string();
        RequestHeaders::from([
            ("webhook-id", ID),
            ("webhook-timestamp", ts.as_str()),
            ("webhook-signature", signature),
        ])
    }

    #[test]
    fn spec_test_vector_is_reproduced_by_sign() {
        assert_eq!(sign(SECRET, ID, TS, BODY).expect("sign"), EXPECTED);
    }

    #[test]
    fn spec_test_vector_verifies() {
        let scheme = StandardWebhooks::new(&secrets(&[SECRET]), 300).expect("scheme");
        let headers = headers(EXPECTED);
        let request = InboundRequest {
            path: "/webhooks/x",
            headers: &headers,
            body: BODY,
        };
        assert_eq!(
            scheme.verify(&request, TS),
            Ok(Verified {
                secret_index: 0,
                request_id: Some(ID.to_string()),
                timestamp: Some(TS),
                replay_key: STANDARD
                    .decode(EXPECTED.trim_start_matches("v1,"))
                    .expect("base64"),
            })
        );
    }

    #[test]
    fn bare_base64_secret_is_accepted() {
        let bare = SECRET.trim_start_matches("whsec_");
        assert_eq!(sign(bare, ID, TS, BODY).expect("sign"), EXPECTED);
        let scheme = StandardWebhooks::new(&secrets(&[bare]), 300).expect("scheme");
        let headers = headers(EXPECTED);
        let request = InboundRequest {
            path: "/",
            headers: &headers,
            body: BODY,
        };
        assert!(scheme.verify(&request, TS).is_ok());
    }

    #[test]
    fn any_v1_entry_may_match_and_other_versions_are_ignored() {
        let scheme = StandardWebhooks::new(&secrets(&[SECRET]), 300).expect("scheme");
        let headers = headers(&format!("v1a,xyz v1,AAAA {EXPECTED}"));
        let request = InboundRequest {
            path: "/",
            headers: &headers,
            body: BODY,
        };
        assert!(scheme.verify(&request, TS).is_ok());
    }

    #[test]
    fn tampered_body_is_rejected() {
        let scheme = StandardWebhooks::new(&secrets(&[SECRET]), 300).expect("scheme");
        let headers = headers(EXPECTED);
        let body = br#"{"email":"evil@example.com","username":"test_user"}"#;
        let request = InboundRequest {
            path: "/",
            headers: &headers,
            body,
        };
        assert!(matches!(
            scheme.verify(&request, TS),
            Err(VerifyError::BadSignature(_))
        ));
    }

    #[test]
    fn stale_timestamp_is_rejected() {
        let scheme = StandardWebhooks::new(&secrets(&[SECRET]), 300).expect("scheme");
        let headers = headers(EXPECTED);
        let request = InboundRequest {
            path: "/",
            headers: &headers,
            body: BODY,
        };
        for now in [TS + 301, TS - 301] {
            assert_eq!(
                scheme.verify(&request, now),
                Err(VerifyError::StaleTimestamp {
                    timestamp: TS,
                    tolerance_secs: 300
                }),
                "now = {now}"
            );
        }
        assert!(scheme.verify(&request, TS + 300).is_ok());
    }

    #[test]
    fn second_secret_matching_reports_index_one() {
        let scheme = StandardWebhooks::new(
            &secrets(&["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", SECRET]),
            300,
        )
        .expect("scheme");
        let headers = headers(EXPECTED);
        let request = InboundRequest {
            path: "/",
            headers: &headers,
            body: BODY,
        };
        assert_eq!(scheme.verify(&request, TS).map(|v| v.secret_index), Ok(1));
    }

    #[test]
    fn missing_headers_are_reported_by_name() {
        let scheme = StandardWebhooks::new(&secrets(&[SECRET]), 300).expect("scheme");
        let full = headers(EXPECTED);
        for missing in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
            let mut partial = RequestHeaders::new();
            for (name, value) in full.iter().filter(|(n, _)| *n != missing) {
                partial.insert(name, value);
            }
            let request = InboundRequest {
                path: "/",
                headers: &partial,
                body: BODY,
            };
            assert_eq!(
                scheme.verify(&request, TS),
                Err(VerifyError::MissingSignature(missing.to_string())),
                "without {missing}"
            );
        }
    }

    #[test]
    fn signature_without_v1_entries_is_bad() {
        let scheme = StandardWebhooks::new(&secrets(&[SECRET]), 300).expect("scheme");
        let headers = headers("v2,abcd");
        let request = InboundRequest {
            path: "/",
            headers: &headers,
            body: BODY,
        };
        assert!(matches!(
            scheme.verify(&request, TS),
            Err(VerifyError::BadSignature(_))
        ));
    }

    #[test]
    fn undecodable_secret_names_its_position_not_its_value() {
        let error = StandardWebhooks::new(&secrets(&[SECRET, "whsec_not*base64!"]), 300)
            .expect_err("must fail");
        assert!(error.0.contains("position 1"), "{error}");
        assert!(!error.0.contains("not*base64"), "{error}");
        assert!(StandardWebhooks::new(&secrets(&[]), 300).is_err());
    }
}
