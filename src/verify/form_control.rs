//! Tupay's thin form-encoded notifications, proven by `control` = HMAC-SHA256(prefix ‖ external_id ‖ suffix).

use secrecy::{ExposeSecret, SecretString};

use super::hmac::{hmac_bytes, HmacAlgorithm};
use super::{constant_time_eq, InboundRequest, Secrets, Verified, VerifyError};

const CONTROL: &str = "control";
const EXTERNAL_ID: &str = "external_id";

/// The `control` value Tupay sends: uppercase hex HMAC-SHA256(secret, prefix ‖ external_id ‖ suffix).
pub fn control(secret: &[u8], prefix: &str, external_id: &str, suffix: &str) -> String {
    let mac = hmac_bytes(
        HmacAlgorithm::Sha256,
        secret,
        &[prefix.as_bytes(), external_id.as_bytes(), suffix.as_bytes()],
    );
    hex::encode_upper(mac)
}

/// The configured `control` verifier (SPEC §4.3; defaults prefix "Be4", suffix "Bo7").
pub struct FormControl {
    secrets: Vec<SecretString>,
    prefix: String,
    suffix: String,
}

impl std::fmt::Debug for FormControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FormControl")
            .field("secrets", &self.secrets.len())
            .field("prefix", &self.prefix)
            .field("suffix", &self.suffix)
            .finish()
    }
}

/// The one value of `name` in the form; a repeated field is refused so that the value
/// verified here is the value every later reader of the form sees.
fn single_field<'a>(
    fields: &'a [(String, String)],
    name: &str,
) -> Result<Option<&'a str>, VerifyError> {
    let mut values = fields
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str());
    let first = values.next();
    if values.next().is_some() {
        return Err(VerifyError::BadSignature(format!(
            "form field {name} is repeated"
        )));
    }
    Ok(first)
}

impl FormControl {
    /// Keeps the secrets and the configured prefix and suffix around `external_id`.
    pub fn new(secrets: &Secrets, prefix: String, suffix: String) -> Self {
        FormControl {
            secrets: secrets.clone(),
            prefix,
            suffix,
        }
    }

    /// Verifies a form-encoded notification; it carries no id and no timestamp.
    pub fn verify(
        &self,
        request: &InboundRequest<'_>,
        _now_unix: i64,
    ) -> Result<Verified, VerifyError> {
        let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(request.body)
            .map_err(|_| VerifyError::BadSignature("body is not form-encoded".to_string()))?;
        let control_value = single_field(&fields, CONTROL)?
            .ok_or_else(|| VerifyError::MissingSignature(CONTROL.to_string()))?;
        let external_id = single_field(&fields, EXTERNAL_ID)?
            .ok_or_else(|| VerifyError::BadSignature(format!("form has no {EXTERNAL_ID}")))?;
        let presented = hex::decode(control_value.trim())
            .map_err(|_| VerifyError::BadSignature(format!("{CONTROL} is not hex")))?;

        let mut matched = None;
        for (index, secret) in self.secrets.iter().enumerate() {
            let expected = hmac_bytes(
                HmacAlgorithm::Sha256,
                secret.expose_secret().as_bytes(),
                &[
                    self.prefix.as_bytes(),
                    external_id.as_bytes(),
                    self.suffix.as_bytes(),
                ],
            );
            if constant_time_eq(&expected, &presented) && matched.is_none() {
                matched = Some((index, expected));
            }
        }
        match matched {
            Some((secret_index, replay_key)) => Ok(Verified {
                secret_index,
                request_id: None,
                timestamp: None,
                replay_key,
            }),
            None => Err(VerifyError::BadSignature(format!(
                "{CONTROL} matches no configured secret"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::RequestHeaders;

    fn scheme(values: &[&str]) -> FormControl {
        let secrets: Secrets = values.iter().map(|v| SecretString::from(*v)).collect();
        FormControl::new(&secrets, "Be4".to_string(), "Bo7".to_string())
    }

    fn form(external_id: &str, control: Option<&str>) -> Vec<u8> {
        let mut fields = vec![
            ("date", "2024-05-01 10:00:00"),
            ("bank_reference_id", "BR-1"),
            ("comments", "ok & done"),
            ("external_id", external_id),
            ("cashout_id", "998877"),
            ("status_reason", ""),
        ];
        if let Some(control) = control {
            fields.push(("control", control));
        }
        serde_urlencoded::to_string(fields)
            .expect("form")
            .into_bytes()
    }

    fn verify(scheme: &FormControl, body: &[u8]) -> Result<Verified, VerifyError> {
        let headers = RequestHeaders::from([("content-type", "application/x-www-form-urlencoded")]);
        scheme.verify(
            &InboundRequest {
                path: "/webhooks/tupay",
                headers: &headers,
                body,
            },
            0,
        )
    }

    #[test]
    fn control_is_uppercase_hex_of_prefix_external_id_suffix() {
        // printf 'Be4co-123Bo7' | openssl dgst -sha256 -hmac tupay-secret
        let value = control(b"tupay-secret", "Be4", "co-123", "Bo7");
        assert_eq!(
            value,
            "BF9A4B0DCA6D7606EC5E64E8C8E0BB72FA7E0F9191DB9C69A6CFF64F916BF400"
        );
        assert_eq!(value.len(), 64);
        assert_eq!(value, value.to_uppercase());
    }

    #[test]
    fn genuine_notification_is_verified_without_id_or_timestamp() {
        let value = control(b"s", "Be4", "co-123", "Bo7");
        let body = form("co-123", Some(&value));
        assert_eq!(
            verify(&scheme(&["s"]), &body),
            Ok(Verified {
                secret_index: 0,
                request_id: None,
                timestamp: None,
                replay_key: hex::decode(&value).expect("hex"),
            })
        );
    }

    #[test]
    fn lowercase_control_is_accepted() {
        let body = form(
            "co-123",
            Some(&control(b"s", "Be4", "co-123", "Bo7").to_lowercase()),
        );
        assert!(verify(&scheme(&["s"]), &body).is_ok());
    }

    #[test]
    fn rotated_secret_reports_its_position() {
        let body = form("co-123", Some(&control(b"new", "Be4", "co-123", "Bo7")));
        assert_eq!(
            verify(&scheme(&["old", "new"]), &body).map(|v| v.secret_index),
            Ok(1)
        );
    }

    #[test]
    fn missing_control_is_missing_signature() {
        let body = form("co-123", None);
        assert_eq!(
            verify(&scheme(&["s"]), &body),
            Err(VerifyError::MissingSignature("control".to_string()))
        );
    }

    #[test]
    fn invalid_notifications_are_bad_signatures() {
        let good = control(b"s", "Be4", "co-123", "Bo7");
        let repeated = format!("external_id=co-123&control={good}&external_id=co-999");
        let cases: [(&str, Vec<u8>); 5] = [
            (
                "control for another external_id",
                form("co-999", Some(&good)),
            ),
            (
                "control from another secret",
                form("co-123", Some(&control(b"x", "Be4", "co-123", "Bo7"))),
            ),
            ("control not hex", form("co-123", Some("XYZ"))),
            (
                "external_id missing",
                format!("control={good}").into_bytes(),
            ),
            ("external_id repeated", repeated.into_bytes()),
        ];
        for (case, body) in cases {
            assert!(
                matches!(
                    verify(&scheme(&["s"]), &body),
                    Err(VerifyError::BadSignature(_))
                ),
                "{case}"
            );
        }
    }

    #[test]
    fn other_prefix_and_suffix_are_honoured() {
        let secrets: Secrets = vec![SecretString::from("s")];
        let custom = FormControl::new(&secrets, "P".to_string(), "S".to_string());
        let body = form("co-1", Some(&control(b"s", "P", "co-1", "S")));
        assert!(verify(&custom, &body).is_ok());
        assert!(verify(&scheme(&["s"]), &body).is_err());
    }
}
