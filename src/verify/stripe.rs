//! The Stripe scheme: `Stripe-Signature: t=…,v1=…`, hex HMAC-SHA256 over `t.body`.

use secrecy::{ExposeSecret, SecretString};

use super::hmac::{hmac_bytes, HmacAlgorithm};
use super::{
    check_timestamp, constant_time_eq, parse_unix_seconds, InboundRequest, Secrets, Verified,
    VerifyError,
};

const HEADER: &str = "Stripe-Signature";

/// HMAC-SHA256 keyed with the secret string as-is, over `t.body` with `t` as sent.
fn mac(secret: &str, timestamp: &str, body: &[u8]) -> Vec<u8> {
    hmac_bytes(
        HmacAlgorithm::Sha256,
        secret.as_bytes(),
        &[timestamp.as_bytes(), b".", body],
    )
}

/// Signs as Stripe would, returning the full header value `t=<ts>,v1=<hex>`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let timestamp = timestamp.to_string();
    let mac = mac(secret, &timestamp, body);
    format!("t={timestamp},v1={}", hex::encode(mac))
}

/// The configured Stripe-style verifier.
pub struct StripeSignature {
    secrets: Vec<SecretString>,
    tolerance_secs: u64,
}

impl std::fmt::Debug for StripeSignature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeSignature")
            .field("secrets", &self.secrets.len())
            .field("tolerance_secs", &self.tolerance_secs)
            .finish()
    }
}

impl StripeSignature {
    /// Keeps the secrets as configured (each used as-is as the HMAC key).
    pub fn new(secrets: &Secrets, tolerance_secs: u64) -> Self {
        StripeSignature {
            secrets: secrets.clone(),
            tolerance_secs,
        }
    }

    /// Verifies `request` at `now_unix`: any secret and any `v1` may match; the signature
    /// is checked before the timestamp.
    pub fn verify(
        &self,
        request: &InboundRequest<'_>,
        now_unix: i64,
    ) -> Result<Verified, VerifyError> {
        let value = request
            .headers
            .get(HEADER)
            .ok_or_else(|| VerifyError::MissingSignature(HEADER.to_string()))?;

        let mut timestamp = None;
        let mut presented = Vec::new();
        for item in value.split(',') {
            match item.trim().split_once('=') {
                Some(("t", t)) if timestamp.is_none() => timestamp = Some(t.trim()),
                Some(("v1", signature)) => {
                    if let Ok(bytes) = hex::decode(signature.trim()) {
                        presented.push(bytes);
                    }
                }
                _ => {}
            }
        }
        let Some(timestamp) = timestamp else {
            return Err(VerifyError::BadSignature(format!("{HEADER} has no t=")));
        };
        if presented.is_empty() {
            return Err(VerifyError::BadSignature(format!(
                "{HEADER} has no v1 signature"
            )));
        }

        let mut matched = None;
        for (index, secret) in self.secrets.iter().enumerate() {
            let expected = mac(secret.expose_secret(), timestamp, request.body);
            let hit = presented.iter().fold(false, |hit, candidate| {
                constant_time_eq(&expected, candidate) | hit
            });
            if hit && matched.is_none() {
                matched = Some((index, expected));
            }
        }
        let Some((secret_index, replay_key)) = matched else {
            return Err(VerifyError::BadSignature(format!(
                "{HEADER} matches no configured secret"
            )));
        };

        let seconds = parse_unix_seconds(timestamp, HEADER)?;
        check_timestamp(seconds, now_unix, self.tolerance_secs)?;
        Ok(Verified {
            secret_index,
            request_id: None,
            timestamp: Some(seconds),
            replay_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::RequestHeaders;

    const NOW: i64 = 1_700_000_000;
    const BODY: &[u8] = br#"{"id":"evt_1","type":"payout.paid"}"#;

    fn scheme(values: &[&str]) -> StripeSignature {
        let secrets: Secrets = values.iter().map(|v| SecretString::from(*v)).collect();
        StripeSignature::new(&secrets, 300)
    }

    fn verify(
        scheme: &StripeSignature,
        header: &str,
        body: &[u8],
        now: i64,
    ) -> Result<Verified, VerifyError> {
        let headers = RequestHeaders::from([("stripe-signature", header)]);
        scheme.verify(
            &InboundRequest {
                path: "/",
                headers: &headers,
                body,
            },
            now,
        )
    }

    #[test]
    fn signed_request_is_verified_with_its_timestamp() {
        let header = sign("whsec_test", NOW, BODY);
        assert_eq!(
            verify(&scheme(&["whsec_test"]), &header, BODY, NOW),
            Ok(Verified {
                secret_index: 0,
                request_id: None,
                timestamp: Some(NOW),
                replay_key: mac("whsec_test", &NOW.to_string(), BODY),
            })
        );
    }

    #[test]
    fn sign_matches_a_known_value() {
        // printf '%s' '1700000000.{"id":"evt_1","type":"payout.paid"}' | openssl dgst -sha256 -hmac whsec_test
        assert_eq!(
            sign("whsec_test", NOW, BODY),
            "t=1700000000,v1=f56d5893757d99f35cb723a106cb246cc4684a597907ead82e1d1c4ee7fa4f27"
        );
    }

    #[test]
    fn any_v1_may_match_and_unknown_items_are_ignored() {
        let good = sign("k", NOW, BODY);
        let v1 = good.split_once(",v1=").map(|(_, v)| v).expect("v1");
        let header = format!("t={NOW},v0=abc,v1={},v1={v1}", "00".repeat(32));
        assert!(verify(&scheme(&["k"]), &header, BODY, NOW).is_ok());
    }

    #[test]
    fn tampered_body_is_rejected() {
        let header = sign("k", NOW, BODY);
        let result = verify(&scheme(&["k"]), &header, b"{\"id\":\"evt_2\"}", NOW);
        assert!(matches!(result, Err(VerifyError::BadSignature(_))));
    }

    #[test]
    fn stale_timestamp_is_rejected() {
        let header = sign("k", NOW - 1_000, BODY);
        assert_eq!(
            verify(&scheme(&["k"]), &header, BODY, NOW),
            Err(VerifyError::StaleTimestamp {
                timestamp: NOW - 1_000,
                tolerance_secs: 300
            })
        );
    }

    #[test]
    fn rotated_secret_reports_its_position() {
        let header = sign("new", NOW, BODY);
        assert_eq!(
            verify(&scheme(&["old", "new"]), &header, BODY, NOW).map(|v| v.secret_index),
            Ok(1)
        );
    }

    #[test]
    fn missing_header_is_missing_signature() {
        let headers = RequestHeaders::new();
        let result = scheme(&["k"]).verify(
            &InboundRequest {
                path: "/",
                headers: &headers,
                body: BODY,
            },
            NOW,
        );
        assert_eq!(
            result,
            Err(VerifyError::MissingSignature(
                "Stripe-Signature".to_string()
            ))
        );
    }

    #[test]
    fn malformed_headers_are_bad_signatures() {
        let cases = [
            ("v1=abcd", "no timestamp"),
            ("t=1700000000", "no v1"),
            ("t=1700000000,v1=zz", "v1 not hex"),
            ("garbage", "no key=value"),
        ];
        for (header, case) in cases {
            assert!(
                matches!(
                    verify(&scheme(&["k"]), header, BODY, NOW),
                    Err(VerifyError::BadSignature(_))
                ),
                "{case}"
            );
        }
    }
}
