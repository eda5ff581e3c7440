//! The configurable HMAC scheme: header, algorithm, encoding and signed-bytes template set in config.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use sha2::{Digest, Sha256, Sha512};

use super::{
    check_timestamp, constant_time_eq, parse_unix_seconds, InboundRequest, RequestHeaders,
    SchemeConfigError, Secrets, Verified, VerifyError,
};

/// The hash function under the HMAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HmacAlgorithm {
    /// HMAC-SHA256 (32-byte MAC).
    Sha256,
    /// HMAC-SHA512 (64-byte MAC).
    Sha512,
}

/// How the MAC is written in the signature header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignatureEncoding {
    /// Hex digits; either case is accepted when verifying, lowercase is produced.
    Hex,
    /// Standard base64 (padding optional when verifying, produced padded).
    Base64,
}

/// What an `hmac` scheme signs and where it finds the signature.
#[derive(Clone, Debug)]
pub struct HmacSpec {
    /// The header holding the signature.
    pub header: String,
    /// The hash under the HMAC.
    pub algorithm: HmacAlgorithm,
    /// How the MAC is written in `header`.
    pub encoding: SignatureEncoding,
    /// The signed bytes: literal text plus `{body}`, `{path}` and `{header:NAME}`.
    pub template: String,
    /// A header with unix seconds that must be present and within `tolerance_secs`.
    pub timestamp_header: Option<String>,
    /// A header whose value becomes the request id (the dedup key).
    pub id_header: Option<String>,
    /// Replaces the received path in `{path}` (the public URL the provider signs).
    pub signed_url: Option<String>,
    /// Allowed clock skew for `timestamp_header`, in seconds.
    pub tolerance_secs: u64,
}

/// The Fiserv LATAM Pix webhook shape (SPEC §4.1):
/// Base64(HMAC-SHA256(secret, apikey ‖ x-timestamp ‖ body ‖ path-or-signed_url)).
pub fn fiserv_default(signed_url: Option<String>, tolerance_secs: u64) -> HmacSpec {
    HmacSpec {
        header: "x-hmac-signature".to_string(),
        algorithm: HmacAlgorithm::Sha256,
        encoding: SignatureEncoding::Base64,
        template: "{header:apikey}{header:x-timestamp}{body}{path}".to_string(),
        timestamp_header: Some("x-timestamp".to_string()),
        id_header: Some("x-request-id".to_string()),
        signed_url,
        tolerance_secs,
    }
}

/// The SimPay webhook shape (SPEC §4.2): header `hmac` = lowercase hex HMAC-SHA512(secret, body).
pub fn simpay_default() -> HmacSpec {
    HmacSpec {
        header: "hmac".to_string(),
        algorithm: HmacAlgorithm::Sha512,
        encoding: SignatureEncoding::Hex,
        template: "{body}".to_string(),
        timestamp_header: None,
        id_header: None,
        signed_url: None,
        tolerance_secs: 300,
    }
}

/// Computes HMAC(`key`, concatenation of `parts`) with `algorithm`.
pub fn hmac_bytes(algorithm: HmacAlgorithm, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    match algorithm {
        HmacAlgorithm::Sha256 => mac_over::<Hmac<Sha256>>(key, parts),
        HmacAlgorithm::Sha512 => mac_over::<Hmac<Sha512>>(key, parts),
    }
}

fn mac_over<M: Mac + hmac::digest::KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    // HMAC takes keys of any length, so this never fails; if it ever did, the empty MAC
    // matches no signature (comparisons check lengths), so verification fails closed.
    let Ok(mut mac) = <M as hmac::digest::KeyInit>::new_from_slice(key) else {
        return Vec::new();
    };
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

/// One piece of a parsed signed-bytes template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Body,
    Path,
    Header(String),
}

/// Parses a template; unknown placeholders and unbalanced braces are errors.
fn parse_template(template: &str) -> Result<Vec<Segment>, SchemeConfigError> {
    let mut segments = Vec::new();
    let mut literal = String::new();
    let mut chars = template.char_indices();
    while let Some((start, c)) = chars.next() {
        match c {
            '{' => {
                let mut name = String::new();
                let mut closed = false;
                for (_, inner) in chars.by_ref() {
                    match inner {
                        '}' => {
                            closed = true;
                            break;
                        }
                        '{' => {
                            return Err(SchemeConfigError(format!(
                                "template has a '{{' inside a placeholder at byte {start}"
                            )))
                        }
                        other => name.push(other),
                    }
                }
                if !closed {
                    return Err(SchemeConfigError(format!(
                        "template has an unclosed '{{' at byte {start}"
                    )));
                }
                if !literal.is_empty() {
                    segments.push(Segment::Literal(std::mem::take(&mut literal)));
                }
                segments.push(placeholder(&name)?);
            }
            '}' => {
                return Err(SchemeConfigError(format!(
                    "template has an unmatched '}}' at byte {start}"
                )))
            }
            other => literal.push(other),
        }
    }
    if !literal.is_empty() {
        segments.push(Segment::Literal(literal));
    }
    Ok(segments)
}

fn placeholder(name: &str) -> Result<Segment, SchemeConfigError> {
    match name {
        "body" => Ok(Segment::Body),
        "path" => Ok(Segment::Path),
        _ => match name.strip_prefix("header:") {
            Some(header) if !header.trim().is_empty() => Ok(Segment::Header(header.trim().to_string())),
            Some(_) => Err(SchemeConfigError(
                "template placeholder {header:} names no header".to_string(),
            )),
            None => Err(SchemeConfigError(format!(
                "template has an unknown placeholder {{{name}}} (known: {{body}}, {{path}}, {{header:NAME}})"
            ))),
        },
    }
}

/// Borrows the bytes each template segment stands for in `request`.
fn signed_parts<'a>(
    segments: &'a [Segment],
    request: &InboundRequest<'a>,
    signed_url: Option<&'a str>,
) -> Result<Vec<&'a [u8]>, VerifyError> {
    segments
        .iter()
        .map(|segment| match segment {
            Segment::Literal(text) => Ok(text.as_bytes()),
            Segment::Body => Ok(request.body),
            Segment::Path => Ok(signed_url.unwrap_or(request.path).as_bytes()),
            Segment::Header(name) => required_header(request.headers, name).map(str::as_bytes),
        })
        .collect()
}

fn required_header<'a>(headers: &'a RequestHeaders, name: &str) -> Result<&'a str, VerifyError> {
    headers
        .get(name)
        .ok_or_else(|| VerifyError::MissingSignature(name.to_string()))
}

/// Accepts base64 with or without trailing padding.
const BASE64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Strips an optional `sha256=` / `sha512=` label (any case) from a signature value.
fn strip_algorithm_prefix(value: &str) -> &str {
    for prefix in ["sha256=", "sha512="] {
        if let (Some(head), Some(rest)) = (value.get(..prefix.len()), value.get(prefix.len()..)) {
            if head.eq_ignore_ascii_case(prefix) {
                return rest;
            }
        }
    }
    value
}

/// Decodes a signature header value per `encoding`, after an optional `sha256=`/`sha512=`.
fn decode_signature(
    value: &str,
    encoding: SignatureEncoding,
    header: &str,
) -> Result<Vec<u8>, VerifyError> {
    let value = strip_algorithm_prefix(value.trim());
    match encoding {
        SignatureEncoding::Hex => hex::decode(value)
            .map_err(|_| VerifyError::BadSignature(format!("{header} is not hex"))),
        SignatureEncoding::Base64 => BASE64_LENIENT
            .decode(value)
            .map_err(|_| VerifyError::BadSignature(format!("{header} is not base64"))),
    }
}

fn encode_signature(mac: &[u8], encoding: SignatureEncoding) -> String {
    match encoding {
        SignatureEncoding::Hex => hex::encode(mac),
        SignatureEncoding::Base64 => STANDARD.encode(mac),
    }
}

/// Signs `request` as `spec` describes, returning the signature header value.
///
/// Used by simulators and tests; the header values the template names must be present.
pub fn sign(
    spec: &HmacSpec,
    secret: &[u8],
    request: &InboundRequest<'_>,
) -> Result<String, VerifyError> {
    let segments = parse_template(&spec.template)
        .map_err(|e| VerifyError::BadSignature(format!("cannot sign: {e}")))?;
    let parts = signed_parts(&segments, request, spec.signed_url.as_deref())?;
    let mac = hmac_bytes(spec.algorithm, secret, &parts);
    Ok(encode_signature(&mac, spec.encoding))
}

/// A static token header compared in constant time (SimPay's optional `token_header`).
struct StaticToken {
    header: String,
    expected: SecretString,
}

/// The configured `hmac` scheme, ready to verify requests.
pub struct HmacScheme {
    spec: HmacSpec,
    segments: Vec<Segment>,
    secrets: Vec<SecretSlice<u8>>,
    static_token: Option<StaticToken>,
}

impl HmacScheme {
    /// The header carrying the signature.
    pub fn signature_header(&self) -> &str {
        &self.spec.header
    }

    /// Whether requests carry a signed timestamp (so an exact replay is detectable).
    pub fn has_timestamp(&self) -> bool {
        self.spec.timestamp_header.is_some()
    }
}

impl std::fmt::Debug for HmacScheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HmacScheme")
            .field("spec", &self.spec)
            .field("secrets", &self.secrets.len())
            .field(
                "static_token_header",
                &self.static_token.as_ref().map(|t| t.header.as_str()),
            )
            .finish()
    }
}

impl HmacScheme {
    /// Builds the scheme; fails when the template is malformed or lacks `{body}`, a header
    /// name is empty, or no (or an empty) secret is configured. `static_token` is
    /// (header name, expected value).
    pub fn new(
        spec: HmacSpec,
        secrets: &Secrets,
        static_token: Option<(String, SecretString)>,
    ) -> Result<Self, SchemeConfigError> {
        if spec.header.trim().is_empty() {
            return Err(SchemeConfigError(
                "the signature header name is empty".to_string(),
            ));
        }
        if secrets.is_empty() {
            return Err(SchemeConfigError(
                "at least one secret is required".to_string(),
            ));
        }
        if let Some(position) = secrets.iter().position(|s| s.expose_secret().is_empty()) {
            return Err(SchemeConfigError(format!(
                "the secret at position {position} is empty"
            )));
        }
        let segments = parse_template(&spec.template)?;
        // A template without the body would let one signature vouch for any payload.
        if !segments.contains(&Segment::Body) {
            return Err(SchemeConfigError(
                "template must include {body}".to_string(),
            ));
        }
        let static_token = match static_token {
            Some((header, _)) if header.trim().is_empty() => {
                return Err(SchemeConfigError(
                    "the token header name is empty".to_string(),
                ))
            }
            Some((header, expected)) if expected.expose_secret().is_empty() => {
                return Err(SchemeConfigError(format!(
                    "the expected value of token header {header} is empty"
                )))
            }
            Some((header, expected)) => Some(StaticToken { header, expected }),
            None => None,
        };
        let secrets = secrets
            .iter()
            .map(|s| SecretSlice::from(s.expose_secret().as_bytes().to_vec()))
            .collect();
        Ok(HmacScheme {
            spec,
            segments,
            secrets,
            static_token,
        })
    }

    /// Verifies `request` at `now_unix`: the static token (if configured), then the
    /// signature against every secret, then the timestamp.
    pub fn verify(
        &self,
        request: &InboundRequest<'_>,
        now_unix: i64,
    ) -> Result<Verified, VerifyError> {
        let signature = required_header(request.headers, &self.spec.header)?;
        if let Some(token) = &self.static_token {
            let presented = required_header(request.headers, &token.header)?;
            // Hash both sides so the comparison time does not depend on the token's length.
            let presented = Sha256::digest(presented.as_bytes());
            let expected = Sha256::digest(token.expected.expose_secret().as_bytes());
            if !constant_time_eq(&presented, &expected) {
                return Err(VerifyError::BadSignature(format!(
                    "{} does not match",
                    token.header
                )));
            }
        }
        let timestamp = match &self.spec.timestamp_header {
            Some(name) => Some((name.as_str(), required_header(request.headers, name)?)),
            None => None,
        };
        let parts = signed_parts(&self.segments, request, self.spec.signed_url.as_deref())?;
        let presented = decode_signature(signature, self.spec.encoding, &self.spec.header)?;

        let mut matched = None;
        for (index, secret) in self.secrets.iter().enumerate() {
            let expected = hmac_bytes(self.spec.algorithm, secret.expose_secret(), &parts);
            if constant_time_eq(&expected, &presented) && matched.is_none() {
                matched = Some((index, expected));
            }
        }
        let Some((secret_index, replay_key)) = matched else {
            return Err(VerifyError::BadSignature(format!(
                "{} matches no configured secret",
                self.spec.header
            )));
        };

        let timestamp = match timestamp {
            Some((name, value)) => {
                let seconds = parse_unix_seconds(value, name)?;
                check_timestamp(seconds, now_unix, self.spec.tolerance_secs)?;
                Some(seconds)
            }
            None => None,
        };
        let request_id = self
            .spec
            .id_header
            .as_deref()
            .and_then(|name| request.headers.get(name))
            .map(str::trim)
            .filter(|id| !id.is_empty())
            .map(str::to_string);
        Ok(Verified {
            secret_index,
            request_id,
            timestamp,
            replay_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000;
    const FISERV_BODY: &[u8] = br#"{"txid":"tx-1","status":3,"amount":"12.34","currency":"BRL"}"#;

    fn secrets(values: &[&str]) -> Secrets {
        values.iter().map(|v| SecretString::from(*v)).collect()
    }

    fn fiserv_headers(secret: &[u8], timestamp: i64, path: &str, body: &[u8]) -> RequestHeaders {
        let ts = timestamp.to_string();
        let mut headers = RequestHeaders::from([
            ("apikey", "key-123"),
            ("x-timestamp", ts.as_str()),
            ("x-request-id", "req-42"),
        ]);
        let request = InboundRequest {
            path,
            headers: &headers,
            body,
        };
        let signature = sign(&fiserv_default(None, 300), secret, &request).expect("sign");
        headers.insert("x-hmac-signature", &signature);
        headers
    }

    #[test]
    fn fiserv_shaped_request_is_verified_with_its_request_id_and_timestamp() {
        // Arrange
        let scheme = HmacScheme::new(
            fiserv_default(None, 300),
            &secrets(&["fiserv-secret"]),
            None,
        )
        .expect("scheme");
        let headers = fiserv_headers(b"fiserv-secret", NOW, "/webhooks/fiserv", FISERV_BODY);
        let request = InboundRequest {
            path: "/webhooks/fiserv",
            headers: &headers,
            body: FISERV_BODY,
        };

        // Act
        let verified = scheme.verify(&request, NOW + 10).expect("verified");

        // Assert
        assert_eq!(
            verified,
            Verified {
                secret_index: 0,
                request_id: Some("req-42".to_string()),
                timestamp: Some(NOW),
                replay_key: BASE64_LENIENT
                    .decode(headers.get("x-hmac-signature").expect("signed"))
                    .expect("base64"),
            }
        );
    }

    #[test]
    fn every_encoding_of_one_fiserv_signature_is_one_replay_key() {
        // Arrange: one genuine signature, written the ways a replayer could rewrite it.
        let scheme = HmacScheme::new(
            fiserv_default(None, 300),
            &secrets(&["fiserv-secret"]),
            None,
        )
        .expect("scheme");
        let genuine = fiserv_headers(b"fiserv-secret", NOW, "/webhooks/fiserv", FISERV_BODY);
        let signature = genuine.get("x-hmac-signature").expect("signed").to_string();
        let unpadded = signature.trim_end_matches('=').to_string();
        let variants = [
            signature.clone(),
            format!("sha256={signature}"),
            format!("SHA256={unpadded}"),
            unpadded.clone(),
            format!(" {unpadded} "),
        ];

        // Act
        let keys: Vec<Vec<u8>> = variants
            .iter()
            .enumerate()
            .map(|(n, variant)| {
                let mut headers = RequestHeaders::new();
                for (name, value) in genuine.iter() {
                    match name {
                        "x-hmac-signature" => headers.insert(name, variant),
                        "x-request-id" => headers.insert(name, &format!("fresh-{n}")),
                        _ => headers.insert(name, value),
                    }
                }
                let request = InboundRequest {
                    path: "/webhooks/fiserv",
                    headers: &headers,
                    body: FISERV_BODY,
                };
                scheme.verify(&request, NOW).expect(variant).replay_key
            })
            .collect();

        // Assert
        assert!(keys.iter().all(|key| key == &keys[0]), "{keys:?}");
        assert_eq!(keys[0].len(), 32, "the decoded MAC, not header text");
    }

    #[test]
    fn empty_request_id_header_counts_as_absent() {
        let scheme = HmacScheme::new(
            fiserv_default(None, 300),
            &secrets(&["fiserv-secret"]),
            None,
        )
        .expect("scheme");
        let genuine = fiserv_headers(b"fiserv-secret", NOW, "/webhooks/fiserv", FISERV_BODY);
        let header = |name: &str| genuine.get(name).expect(name).to_string();
        let headers = RequestHeaders::from([
            ("apikey", header("apikey").as_str()),
            ("x-timestamp", header("x-timestamp").as_str()),
            ("x-request-id", "  "),
            ("x-hmac-signature", header("x-hmac-signature").as_str()),
        ]);
        let request = InboundRequest {
            path: "/webhooks/fiserv",
            headers: &headers,
            body: FISERV_BODY,
        };
        assert_eq!(
            scheme.verify(&request, NOW).expect("verified").request_id,
            None
        );
    }

    #[test]
    fn fiserv_signature_matches_openssl() {
        // printf '%s' 'key-1231700000000<body>/webhooks/fiserv' \
        //   | openssl dgst -sha256 -hmac fiserv-secret -binary | base64
        let headers = fiserv_headers(b"fiserv-secret", NOW, "/webhooks/fiserv", FISERV_BODY);
        assert_eq!(
            headers.get("x-hmac-signature"),
            Some("xLSCHvNGdWcjgaK5yGifsf6U72snup9KWx1zlMYKDDU=")
        );
    }

    #[test]
    fn fiserv_signed_url_replaces_the_received_path() {
        let url = "https://recon.example.com/webhooks/fiserv";
        let spec = fiserv_default(Some(url.to_string()), 300);
        let scheme = HmacScheme::new(spec, &secrets(&["k"]), None).expect("scheme");
        // Signed by the provider over the public URL, received behind a proxy at another path.
        let headers = fiserv_headers(b"k", NOW, url, FISERV_BODY);
        let request = InboundRequest {
            path: "/internal/fiserv",
            headers: &headers,
            body: FISERV_BODY,
        };
        assert_eq!(scheme.verify(&request, NOW).map(|v| v.secret_index), Ok(0));

        let plain =
            HmacScheme::new(fiserv_default(None, 300), &secrets(&["k"]), None).expect("scheme");
        assert!(matches!(
            plain.verify(&request, NOW),
            Err(VerifyError::BadSignature(_))
        ));
    }

    #[test]
    fn tampered_fiserv_body_path_or_header_is_rejected() {
        let scheme =
            HmacScheme::new(fiserv_default(None, 300), &secrets(&["k"]), None).expect("scheme");
        let headers = fiserv_headers(b"k", NOW, "/webhooks/fiserv", FISERV_BODY);
        let mut tampered_headers = RequestHeaders::new();
        for (name, value) in headers.iter() {
            tampered_headers.insert(name, if name == "apikey" { "key-999" } else { value });
        }
        let cases: [(&str, InboundRequest<'_>); 3] = [
            (
                "body changed",
                InboundRequest {
                    path: "/webhooks/fiserv",
                    headers: &headers,
                    body: b"{\"txid\":\"tx-2\"}",
                },
            ),
            (
                "path changed",
                InboundRequest {
                    path: "/webhooks/other",
                    headers: &headers,
                    body: FISERV_BODY,
                },
            ),
            (
                "apikey changed",
                InboundRequest {
                    path: "/webhooks/fiserv",
                    headers: &tampered_headers,
                    body: FISERV_BODY,
                },
            ),
        ];
        for (case, request) in cases {
            assert!(
                matches!(
                    scheme.verify(&request, NOW),
                    Err(VerifyError::BadSignature(_))
                ),
                "{case} must be a bad signature"
            );
        }
    }

    #[test]
    fn stale_fiserv_timestamp_is_rejected_after_a_valid_signature() {
        let scheme =
            HmacScheme::new(fiserv_default(None, 300), &secrets(&["k"]), None).expect("scheme");
        let headers = fiserv_headers(b"k", NOW - 301, "/w", FISERV_BODY);
        let request = InboundRequest {
            path: "/w",
            headers: &headers,
            body: FISERV_BODY,
        };
        assert_eq!(
            scheme.verify(&request, NOW),
            Err(VerifyError::StaleTimestamp {
                timestamp: NOW - 301,
                tolerance_secs: 300
            })
        );
        // A forged stale request is a bad signature, not a stale one.
        let forged = fiserv_headers(b"wrong", NOW - 301, "/w", FISERV_BODY);
        let request = InboundRequest {
            path: "/w",
            headers: &forged,
            body: FISERV_BODY,
        };
        assert!(matches!(
            scheme.verify(&request, NOW),
            Err(VerifyError::BadSignature(_))
        ));
    }

    #[test]
    fn missing_fiserv_headers_are_reported_by_name() {
        let scheme =
            HmacScheme::new(fiserv_default(None, 300), &secrets(&["k"]), None).expect("scheme");
        let full = fiserv_headers(b"k", NOW, "/w", FISERV_BODY);
        for missing in ["x-hmac-signature", "apikey", "x-timestamp"] {
            let mut headers = RequestHeaders::new();
            for (name, value) in full.iter().filter(|(n, _)| *n != missing) {
                headers.insert(name, value);
            }
            let request = InboundRequest {
                path: "/w",
                headers: &headers,
                body: FISERV_BODY,
            };
            assert_eq!(
                scheme.verify(&request, NOW),
                Err(VerifyError::MissingSignature(missing.to_string())),
                "without {missing}"
            );
        }
    }

    #[test]
    fn simpay_shaped_request_is_verified_with_lowercase_or_uppercase_hex() {
        let scheme =
            HmacScheme::new(simpay_default(), &secrets(&["simpay-secret"]), None).expect("scheme");
        let body = br#"{"type":"PIX_CASHOUT_SUCCESS","data":{"transaction_id":7}}"#;
        // printf '%s' '<body>' | openssl dgst -sha512 -hmac simpay-secret
        let lower = "c993af8f35c04b0acdd9b99c562911338070316e0383d2563c49c57ea22db3f6\
                     7baa7862d0860bd1027f7b71aa06b2d6c65ee5f087739c573d0d62e15d6fbf45"
            .to_string();
        for value in [
            lower.clone(),
            lower.to_uppercase(),
            format!("sha512={lower}"),
        ] {
            let headers = RequestHeaders::from([("hmac", value.as_str())]);
            let request = InboundRequest {
                path: "/webhooks/simpay",
                headers: &headers,
                body,
            };
            assert_eq!(
                scheme.verify(&request, NOW),
                Ok(Verified {
                    secret_index: 0,
                    request_id: None,
                    timestamp: None,
                    replay_key: hex::decode(&lower).expect("hex"),
                }),
                "signature written as {value}"
            );
        }
    }

    #[test]
    fn simpay_tampered_body_and_non_hex_signature_are_rejected() {
        let scheme = HmacScheme::new(simpay_default(), &secrets(&["s"]), None).expect("scheme");
        let headers_for = |body: &[u8]| {
            let probe = RequestHeaders::new();
            let request = InboundRequest {
                path: "/",
                headers: &probe,
                body,
            };
            RequestHeaders::from([(
                "hmac",
                sign(&simpay_default(), b"s", &request)
                    .expect("sign")
                    .as_str(),
            )])
        };
        let headers = headers_for(b"{\"a\":1}");
        let request = InboundRequest {
            path: "/",
            headers: &headers,
            body: b"{\"a\":2}",
        };
        assert!(matches!(
            scheme.verify(&request, NOW),
            Err(VerifyError::BadSignature(_))
        ));

        let headers = RequestHeaders::from([("hmac", "not-hex")]);
        let request = InboundRequest {
            path: "/",
            headers: &headers,
            body: b"{}",
        };
        assert!(matches!(
            scheme.verify(&request, NOW),
            Err(VerifyError::BadSignature(_))
        ));
    }

    #[test]
    fn rotated_secret_reports_its_position() {
        let scheme =
            HmacScheme::new(simpay_default(), &secrets(&["old", "new"]), None).expect("scheme");
        let probe = RequestHeaders::new();
        let body = b"{}";
        let signature = sign(
            &simpay_default(),
            b"new",
            &InboundRequest {
                path: "/",
                headers: &probe,
                body,
            },
        )
        .expect("sign");
        let headers = RequestHeaders::from([("hmac", signature.as_str())]);
        let request = InboundRequest {
            path: "/",
            headers: &headers,
            body,
        };
        assert_eq!(scheme.verify(&request, NOW).map(|v| v.secret_index), Ok(1));
    }

    #[test]
    fn simpay_static_token_is_required_and_compared() {
        let token = Some(("x-simpay-token".to_string(), SecretString::from("tok-1")));
        let scheme = HmacScheme::new(simpay_default(), &secrets(&["s"]), token).expect("scheme");
        let probe = RequestHeaders::new();
        let body = b"{}";
        let signature = sign(
            &simpay_default(),
            b"s",
            &InboundRequest {
                path: "/",
                headers: &probe,
                body,
            },
        )
        .expect("sign");

        let cases: [(&str, Option<&str>, Result<usize, &str>); 3] = [
            ("right token", Some("tok-1"), Ok(0)),
            ("wrong token", Some("tok-2"), Err("bad_signature")),
            ("no token", None, Err("missing_signature")),
        ];
        for (case, token, expected) in cases {
            let mut headers = RequestHeaders::from([("hmac", signature.as_str())]);
            if let Some(token) = token {
                headers.insert("x-simpay-token", token);
            }
            let request = InboundRequest {
                path: "/",
                headers: &headers,
                body,
            };
            let outcome = scheme
                .verify(&request, NOW)
                .map(|v| v.secret_index)
                .map_err(|e| e.code());
            assert_eq!(outcome, expected, "{case}");
        }
    }

    #[test]
    fn template_errors_are_reported_at_construction() {
        let cases = [
            ("{body", "unclosed"),
            ("body}", "unmatched"),
            ("{bo{dy}", "inside a placeholder"),
            ("{query}", "unknown placeholder"),
            ("{header:}", "names no header"),
            ("", "must include {body}"),
            ("{header:apikey}{path}", "must include {body}"),
        ];
        for (template, expected) in cases {
            let spec = HmacSpec {
                template: template.to_string(),
                ..simpay_default()
            };
            match HmacScheme::new(spec, &secrets(&["s"]), None) {
                Err(SchemeConfigError(message)) => {
                    assert!(message.contains(expected), "{template}: got {message}")
                }
                Ok(_) => panic!("{template} must be rejected"),
            }
        }
    }

    #[test]
    fn template_with_literals_signs_the_literal_bytes() {
        let spec = HmacSpec {
            template: "v0:{header:ts}:{body}".to_string(),
            ..simpay_default()
        };
        let segments = parse_template(&spec.template).expect("template");
        assert_eq!(
            segments,
            vec![
                Segment::Literal("v0:".to_string()),
                Segment::Header("ts".to_string()),
                Segment::Literal(":".to_string()),
                Segment::Body,
            ]
        );
        let headers = RequestHeaders::from([("ts", "5")]);
        let request = InboundRequest {
            path: "/",
            headers: &headers,
            body: b"B",
        };
        let signature = sign(&spec, b"k", &request).expect("sign");
        assert_eq!(
            signature,
            hex::encode(hmac_bytes(HmacAlgorithm::Sha512, b"k", &[b"v0:5:B"]))
        );
    }

    #[test]
    fn empty_secret_list_and_empty_secret_are_config_errors_without_values() {
        assert!(HmacScheme::new(simpay_default(), &secrets(&[]), None).is_err());
        match HmacScheme::new(simpay_default(), &secrets(&["a", ""]), None) {
            Err(SchemeConfigError(message)) => assert!(message.contains("position 1")),
            Ok(_) => panic!("an empty secret must be rejected"),
        }
    }

    #[test]
    fn empty_static_token_is_a_config_error() {
        let token = Some(("x-token".to_string(), SecretString::from("")));
        assert!(HmacScheme::new(simpay_default(), &secrets(&["s"]), token).is_err());
    }

    #[test]
    fn algorithm_and_encoding_deserialize_from_snake_case() {
        #[derive(serde::Deserialize)]
        struct Both {
            algorithm: HmacAlgorithm,
            encoding: SignatureEncoding,
        }
        let both: Both =
            serde_urlencoded::from_str("algorithm=sha512&encoding=base64").expect("deserialize");
        assert_eq!(both.algorithm, HmacAlgorithm::Sha512);
        assert_eq!(both.encoding, SignatureEncoding::Base64);
    }
}
