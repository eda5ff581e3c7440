//! Pismo's JWT signatures: RS256 or ES256 by a configured public key picked by `kid`, binding `iat` and `body_sha256`.

use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    check_timestamp, constant_time_eq, InboundRequest, SchemeConfigError, Verified, VerifyError,
};

/// Length of an uncompressed P-256 point (0x04 ‖ x ‖ y), the only EC key ES256 can use.
const P256_POINT_LEN: usize = 65;

/// The claims a Pismo webhook JWT carries.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// Issued-at, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<i64>,
    /// Lowercase hex SHA-256 of the raw request body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body_sha256: Option<String>,
}

/// Lowercase hex SHA-256 of `body`, as the `body_sha256` claim holds it.
fn body_digest(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// One configured public key.
struct PublicKey {
    kid: String,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// Whether an EC key holds an uncompressed P-256 point (read without `as_bytes`, which
/// panics on key kinds `from_ec_pem` never produces).
fn is_p256_point(key: &DecodingKey) -> bool {
    matches!(key.kind(), DecodingKeyKind::SecretOrDer(point) if point.len() == P256_POINT_LEN && point.first() == Some(&0x04))
}

/// Reads a PEM public key and the one algorithm it may verify (RS256 for RSA, ES256 for P-256).
fn public_key(kid: &str, pem: &str) -> Result<PublicKey, SchemeConfigError> {
    if pem.contains("PRIVATE KEY") {
        return Err(SchemeConfigError(format!(
            "public key {kid}: the PEM holds a private key; configure the public key"
        )));
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
        return Ok(PublicKey {
            kid: kid.to_string(),
            algorithm: Algorithm::RS256,
            key,
        });
    }
    match DecodingKey::from_ec_pem(pem.as_bytes()) {
        Ok(key) if is_p256_point(&key) => Ok(PublicKey {
            kid: kid.to_string(),
            algorithm: Algorithm::ES256,
            key,
        }),
        Ok(_) => Err(SchemeConfigError(format!(
            "public key {kid}: EC key is not on P-256 (ES256 needs P-256)"
        ))),
        Err(_) => Err(SchemeConfigError(format!(
            "public key {kid}: not a PEM RSA or EC public key"
        ))),
    }
}

/// Signs `body` as Pismo would: a JWT with `kid`, `iat` and `body_sha256`.
///
/// `algorithm` must be RS256 (RSA private key) or ES256 (PKCS#8 P-256 private key).
pub fn sign(
    private_pem: &str,
    kid: &str,
    algorithm: Algorithm,
    body: &[u8],
    iat: i64,
) -> Result<String, SchemeConfigError> {
    let key = match algorithm {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(private_pem.as_bytes()),
        Algorithm::ES256 => EncodingKey::from_ec_pem(private_pem.as_bytes()),
        other => {
            return Err(SchemeConfigError(format!(
                "cannot sign with {other:?}: only RS256 and ES256 are allowed"
            )))
        }
    }
    .map_err(|_| SchemeConfigError(format!("signing key {kid}: not a usable PEM private key")))?;
    let mut header = Header::new(algorithm);
    header.kid = Some(kid.to_string());
    let claims = Claims {
        iat: Some(iat),
        body_sha256: Some(body_digest(body)),
    };
    jsonwebtoken::encode(&header, &claims, &key)
        .map_err(|e| SchemeConfigError(format!("signing key {kid}: {e}")))
}

/// The configured Pismo JWT verifier.
pub struct JwtScheme {
    keys: Vec<PublicKey>,
    header: String,
    tolerance_secs: u64,
}

impl JwtScheme {
    /// The header carrying the JWT.
    pub fn signature_header(&self) -> &str {
        &self.header
    }
}

impl std::fmt::Debug for JwtScheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtScheme")
            .field(
                "kids",
                &self.keys.iter().map(|k| k.kid.as_str()).collect::<Vec<_>>(),
            )
            .field("header", &self.header)
            .field("tolerance_secs", &self.tolerance_secs)
            .finish()
    }
}

impl JwtScheme {
    /// Builds the verifier from (kid, PEM public key) pairs; each key is RSA (RS256) or
    /// P-256 (ES256). A bad PEM, a repeated or empty kid, or no key at all is an error.
    pub fn new(
        keys: Vec<(String, String)>,
        header: String,
        tolerance_secs: u64,
    ) -> Result<Self, SchemeConfigError> {
        if keys.is_empty() {
            return Err(SchemeConfigError(
                "at least one public key is required".to_string(),
            ));
        }
        if header.trim().is_empty() {
            return Err(SchemeConfigError(
                "the signature header name is empty".to_string(),
            ));
        }
        let mut parsed: Vec<PublicKey> = Vec::with_capacity(keys.len());
        for (position, (kid, pem)) in keys.iter().enumerate() {
            if kid.is_empty() {
                return Err(SchemeConfigError(format!(
                    "public key at position {position} has an empty kid"
                )));
            }
            if parsed.iter().any(|k| &k.kid == kid) {
                return Err(SchemeConfigError(format!(
                    "public key kid {kid} is configured twice"
                )));
            }
            parsed.push(public_key(kid, pem)?);
        }
        Ok(JwtScheme {
            keys: parsed,
            header,
            tolerance_secs,
        })
    }

    /// Verifies `request` at `now_unix`: algorithm and key by `kid`, the JWT signature,
    /// `body_sha256` against the raw body, then `iat` within tolerance.
    pub fn verify(
        &self,
        request: &InboundRequest<'_>,
        now_unix: i64,
    ) -> Result<Verified, VerifyError> {
        let token = request
            .headers
            .get(&self.header)
            .ok_or_else(|| VerifyError::MissingSignature(self.header.clone()))?
            .trim();
        let bad = |why: &str| VerifyError::BadSignature(format!("{}: {why}", self.header));

        // `alg: none` and unknown algorithms fail here: jsonwebtoken has no such variant.
        let jwt_header =
            jsonwebtoken::decode_header(token).map_err(|_| bad("malformed JWT or algorithm"))?;
        if !matches!(jwt_header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(bad("algorithm not allowed"));
        }
        let kid = jwt_header
            .kid
            .as_deref()
            .ok_or_else(|| bad("JWT has no kid"))?;
        let (secret_index, key) = self
            .keys
            .iter()
            .enumerate()
            .find(|(_, k)| k.kid == kid)
            .ok_or_else(|| bad("unknown kid"))?;
        // The key, not the token, decides the algorithm (no RSA/EC/HMAC confusion).
        if jwt_header.alg != key.algorithm || key.key.family() != key.algorithm.family() {
            return Err(bad("algorithm does not match the key of this kid"));
        }

        let mut validation = Validation::new(key.algorithm);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &validation)
            .map_err(|_| bad("JWT signature or claims invalid"))?;

        let claimed = data
            .claims
            .body_sha256
            .ok_or_else(|| bad("JWT has no body_sha256"))?;
        if !constant_time_eq(claimed.as_bytes(), body_digest(request.body).as_bytes()) {
            return Err(bad("body_sha256 does not match the body"));
        }
        let iat = data.claims.iat.ok_or_else(|| bad("JWT has no iat"))?;
        check_timestamp(iat, now_unix, self.tolerance_secs)?;
        // The signed part (header.claims) names the request: re-encoding the signature
        // (or an ECDSA `s` flipped to `n - s`) leaves it unchanged.
        let signed_part = token.rsplit_once('.').map_or(token, |(signed, _)| signed);
        Ok(Verified {
            secret_index,
            request_id: None,
            timestamp: Some(iat),
            replay_key: Sha256::digest(signed_part.as_bytes()).to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::RequestHeaders;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;

    const RSA_PRIVATE: &str = include_str!("../../fixtures/keys/pismo-rsa-private.pem");
    const RSA_PUBLIC: &str = include_str!("../../fixtures/keys/pismo-rsa-public.pem");
    const EC_PRIVATE: &str = include_str!("../../fixtures/keys/pismo-ec-private.pem");
    const EC_PUBLIC: &str = include_str!("../../fixtures/keys/pismo-ec-public.pem");
    const OTHER_EC_PRIVATE: &str = include_str!("../../fixtures/keys/other-ec-private.pem");
    const HEADER: &str = "x-pismo-signature";
    const NOW: i64 = 1_700_000_000;
    const BODY: &[u8] = br#"{"event_id":"ev-1","domain":"payments","event_type":"cashout","data":{"new_status":"SETTLED"}}"#;

    fn scheme() -> JwtScheme {
        JwtScheme::new(
            vec![
                ("rsa1".to_string(), RSA_PUBLIC.to_string()),
                ("ec1".to_string(), EC_PUBLIC.to_string()),
            ],
            HEADER.to_string(),
            300,
        )
        .expect("scheme")
    }

    fn verify(token: &str, body: &[u8], now: i64) -> Result<Verified, VerifyError> {
        let headers = RequestHeaders::from([(HEADER, token)]);
        scheme().verify(
            &InboundRequest {
                path: "/webhooks/pismo",
                headers: &headers,
                body,
            },
            now,
        )
    }

    /// A token with an arbitrary header and claims and the given signature part.
    fn raw_token(header: &str, claims: &str, signature: &str) -> String {
        format!(
            "{}.{}.{signature}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        )
    }

    fn claims_json(body: &[u8], iat: i64) -> String {
        format!(r#"{{"iat":{iat},"body_sha256":"{}"}}"#, body_digest(body))
    }

    fn signed_part_digest(token: &str) -> Vec<u8> {
        let (signed, _) = token.rsplit_once('.').expect("a JWT");
        Sha256::digest(signed.as_bytes()).to_vec()
    }

    #[test]
    fn rs256_token_is_accepted_for_the_rsa_kid() {
        let token = sign(RSA_PRIVATE, "rsa1", Algorithm::RS256, BODY, NOW).expect("sign");
        assert_eq!(
            verify(&token, BODY, NOW + 5),
            Ok(Verified {
                secret_index: 0,
                request_id: None,
                timestamp: Some(NOW),
                replay_key: signed_part_digest(&token),
            })
        );
    }

    #[test]
    fn es256_token_is_accepted_for_the_ec_kid() {
        let token = sign(EC_PRIVATE, "ec1", Algorithm::ES256, BODY, NOW).expect("sign");
        assert_eq!(
            verify(&token, BODY, NOW - 5),
            Ok(Verified {
                secret_index: 1,
                request_id: None,
                timestamp: Some(NOW),
                replay_key: signed_part_digest(&token),
            })
        );
    }

    #[test]
    fn alg_none_token_is_rejected() {
        let claims = claims_json(BODY, NOW);
        for header in [
            r#"{"alg":"none","kid":"rsa1"}"#,
            r#"{"alg":"None","kid":"rsa1"}"#,
        ] {
            for signature in ["", "AAAA"] {
                let token = raw_token(header, &claims, signature);
                assert!(
                    matches!(verify(&token, BODY, NOW), Err(VerifyError::BadSignature(_))),
                    "{header} with signature {signature:?}"
                );
            }
        }
    }

    #[test]
    fn hs256_token_keyed_with_the_public_key_is_rejected() {
        let claims = Claims {
            iat: Some(NOW),
            body_sha256: Some(body_digest(BODY)),
        };
        for (kid, public) in [("rsa1", RSA_PUBLIC), ("ec1", EC_PUBLIC)] {
            let mut header = Header::new(Algorithm::HS256);
            header.kid = Some(kid.to_string());
            let token = jsonwebtoken::encode(
                &header,
                &claims,
                &EncodingKey::from_secret(public.as_bytes()),
            )
            .expect("encode");
            assert!(
                matches!(verify(&token, BODY, NOW), Err(VerifyError::BadSignature(_))),
                "HS256 with kid {kid}"
            );
        }
    }

    #[test]
    fn unknown_or_missing_kid_is_rejected() {
        let token = sign(RSA_PRIVATE, "rsa9", Algorithm::RS256, BODY, NOW).expect("sign");
        assert!(matches!(
            verify(&token, BODY, NOW),
            Err(VerifyError::BadSignature(_))
        ));

        let key = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).expect("key");
        let claims = Claims {
            iat: Some(NOW),
            body_sha256: Some(body_digest(BODY)),
        };
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &key).expect("encode");
        assert!(matches!(
            verify(&token, BODY, NOW),
            Err(VerifyError::BadSignature(_))
        ));
    }

    #[test]
    fn tampered_body_is_rejected() {
        let token = sign(EC_PRIVATE, "ec1", Algorithm::ES256, BODY, NOW).expect("sign");
        let tampered = br#"{"event_id":"ev-1","domain":"payments","event_type":"cashout","data":{"new_status":"ERROR"}}"#;
        assert!(matches!(
            verify(&token, tampered, NOW),
            Err(VerifyError::BadSignature(_))
        ));
    }

    #[test]
    fn tampered_claims_are_rejected() {
        let token = sign(RSA_PRIVATE, "rsa1", Algorithm::RS256, b"other body", NOW).expect("sign");
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged_claims = URL_SAFE_NO_PAD.encode(claims_json(BODY, NOW));
        parts[1] = &forged_claims;
        assert!(matches!(
            verify(&parts.join("."), BODY, NOW),
            Err(VerifyError::BadSignature(_))
        ));
    }

    #[test]
    fn stale_iat_is_rejected() {
        let token = sign(RSA_PRIVATE, "rsa1", Algorithm::RS256, BODY, NOW - 301).expect("sign");
        assert_eq!(
            verify(&token, BODY, NOW),
            Err(VerifyError::StaleTimestamp {
                timestamp: NOW - 301,
                tolerance_secs: 300
            })
        );
        let future = sign(RSA_PRIVATE, "rsa1", Algorithm::RS256, BODY, NOW + 301).expect("sign");
        assert!(matches!(
            verify(&future, BODY, NOW),
            Err(VerifyError::StaleTimestamp { .. })
        ));
    }

    #[test]
    fn missing_iat_or_body_hash_is_rejected() {
        let key = EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).expect("key");
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("ec1".to_string());
        let cases = [
            (
                "no iat",
                Claims {
                    iat: None,
                    body_sha256: Some(body_digest(BODY)),
                },
            ),
            (
                "no body_sha256",
                Claims {
                    iat: Some(NOW),
                    body_sha256: None,
                },
            ),
        ];
        for (case, claims) in cases {
            let token = jsonwebtoken::encode(&header, &claims, &key).expect("encode");
            assert!(
                matches!(verify(&token, BODY, NOW), Err(VerifyError::BadSignature(_))),
                "{case}"
            );
        }
    }

    #[test]
    fn token_signed_by_another_key_is_rejected() {
        let cases = [
            (
                "unrelated EC key under kid ec1",
                sign(OTHER_EC_PRIVATE, "ec1", Algorithm::ES256, BODY, NOW),
            ),
            (
                "EC key under the RSA kid",
                sign(EC_PRIVATE, "rsa1", Algorithm::ES256, BODY, NOW),
            ),
            (
                "RSA key under the EC kid",
                sign(RSA_PRIVATE, "ec1", Algorithm::RS256, BODY, NOW),
            ),
        ];
        for (case, token) in cases {
            let token = token.expect("sign");
            assert!(
                matches!(verify(&token, BODY, NOW), Err(VerifyError::BadSignature(_))),
                "{case}"
            );
        }
    }

    #[test]
    fn missing_header_and_garbage_token_are_reported() {
        let headers = RequestHeaders::new();
        let request = InboundRequest {
            path: "/",
            headers: &headers,
            body: BODY,
        };
        assert_eq!(
            scheme().verify(&request, NOW),
            Err(VerifyError::MissingSignature(HEADER.to_string()))
        );
        assert!(matches!(
            verify("not-a-jwt", BODY, NOW),
            Err(VerifyError::BadSignature(_))
        ));
    }

    const P384_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEzIWtRyDPS+2XOOYG/h53lsgSPh9sj3/j
DWIZCiPE4sMUziVaB+Ijprj4lTW/SqViOYbZhezawRWDlvcLPqRLG1tcNo9m0u+i
JLYkozFCeWwYJ91dVjTq3NG2TkZGYZPd
-----END PUBLIC KEY-----
";
    const ED25519_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEA/TOE791E5bugYTRHAzagIiOJz2o6amjoZWcRfznFDeU=
-----END PUBLIC KEY-----
";

    #[test]
    fn bad_pem_is_a_config_error_naming_the_kid() {
        let cases = [
            (
                "garbage",
                "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".to_string(),
            ),
            ("private", EC_PRIVATE.to_string()),
            ("empty", String::new()),
            ("p384", P384_PUBLIC.to_string()),
            ("ed25519", ED25519_PUBLIC.to_string()),
        ];
        for (kid, pem) in cases {
            let error = JwtScheme::new(vec![(kid.to_string(), pem)], HEADER.to_string(), 300)
                .expect_err("must fail");
            assert!(error.0.contains(kid), "{kid}: {error}");
        }
        assert!(JwtScheme::new(vec![], HEADER.to_string(), 300).is_err());
    }

    #[test]
    fn sign_refuses_other_algorithms() {
        assert!(sign(RSA_PRIVATE, "rsa1", Algorithm::HS256, BODY, NOW).is_err());
        assert!(sign(RSA_PRIVATE, "rsa1", Algorithm::PS256, BODY, NOW).is_err());
    }
}
