//! Robustness of every verifier against arbitrary and mutated requests: no panic, bounded
//! time, and rejection reasons that stay short and free of control characters (they are
//! logged and answered).

use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use secrecy::SecretString;

use super::hmac::{fiserv_default, simpay_default, HmacScheme};
use super::{
    form_control, jwt, standard_webhooks, stripe, InboundRequest, RequestHeaders, Secrets, Verifier,
};

const NOW: i64 = 1_700_000_000;
const CASES: usize = 600;
const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const BODY: &[u8] = br#"{"txid":"tx-1","status":3,"amount":"12.34","currency":"BRL"}"#;

fn secrets() -> Secrets {
    vec![SecretString::from(SECRET)]
}

fn verifiers() -> Vec<(Verifier, &'static str)> {
    let keys = vec![
        (
            "rsa-1".to_string(),
            include_str!("../../fixtures/keys/pismo-rsa-public.pem").to_string(),
        ),
        (
            "ec-1".to_string(),
            include_str!("../../fixtures/keys/pismo-ec-public.pem").to_string(),
        ),
    ];
    vec![
        (
            Verifier::StandardWebhooks(
                standard_webhooks::StandardWebhooks::new(&secrets(), 300).expect("scheme"),
            ),
            "webhook-signature",
        ),
        (
            Verifier::Stripe(stripe::StripeSignature::new(&secrets(), 300)),
            "stripe-signature",
        ),
        (
            Verifier::Hmac(
                HmacScheme::new(fiserv_default(None, 300), &secrets(), None).expect("scheme"),
            ),
            "x-hmac-signature",
        ),
        (
            Verifier::Hmac(HmacScheme::new(simpay_default(), &secrets(), None).expect("scheme")),
            "hmac",
        ),
        (
            Verifier::FormControl(form_control::FormControl::new(
                &secrets(),
                "Be4".to_string(),
                "Bo7".to_string(),
            )),
            "control",
        ),
        (
            Verifier::Jwt(
                jwt::JwtScheme::new(keys, "x-pismo-signature".to_string(), 300).expect("scheme"),
            ),
            "x-pismo-signature",
        ),
    ]
}

/// Genuine header values to start from (each scheme ignores the others').
fn genuine_headers() -> Vec<(String, String)> {
    let ts = NOW.to_string();
    let jwt_token = jwt::sign(
        include_str!("../../fixtures/keys/pismo-ec-private.pem"),
        "ec-1",
        Algorithm::ES256,
        BODY,
        NOW,
    )
    .expect("sign");
    vec![
        ("webhook-id".into(), "msg_1".into()),
        ("webhook-timestamp".into(), ts.clone()),
        (
            "webhook-signature".into(),
            standard_webhooks::sign(SECRET, "msg_1", NOW, BODY).expect("sign"),
        ),
        ("stripe-signature".into(), stripe::sign(SECRET, NOW, BODY)),
        ("apikey".into(), "key-1".into()),
        ("x-timestamp".into(), ts),
        ("x-request-id".into(), "req-1".into()),
        ("x-hmac-signature".into(), "c2lnbmF0dXJl".into()),
        ("hmac".into(), "00ff".into()),
        ("x-pismo-signature".into(), jwt_token),
    ]
}

const ODD: &[&str] = &[
    "",
    " ",
    ",",
    "=",
    "v1,",
    "t=",
    "sha256=",
    "SHA512=",
    "..",
    "\u{202E}",
    "é",
    "%00",
    "==",
    "eyJ",
    ".",
    "v1=zz",
    "99999999999999999999",
    "-1",
];

fn mutate(rng: &mut StdRng, value: &str) -> String {
    let mut text = value.to_string();
    for _ in 0..rng.random_range(1..4) {
        let at = rng.random_range(0..=text.len());
        let at = (0..=at)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        match rng.random_range(0..4) {
            0 => text.truncate(at),
            1 => text.insert_str(at, ODD[rng.random_range(0..ODD.len())]),
            2 => {
                let run = ODD[rng.random_range(0..ODD.len())].repeat(rng.random_range(1..2_000));
                text.insert_str(at, &run);
            }
            _ => text = text.to_uppercase(),
        }
    }
    text
}

#[test]
fn every_verifier_takes_arbitrary_requests_without_panic_with_short_clean_reasons() {
    let mut rng = StdRng::seed_from_u64(7);
    let verifiers = verifiers();
    let genuine = genuine_headers();
    let form = format!(
        "external_id=co-1&control={}&cashout_id=1",
        form_control::control(SECRET.as_bytes(), "Be4", "co-1", "Bo7")
    );
    let started = Instant::now();
    let mut verified = 0;
    for _ in 0..CASES {
        let mut headers = RequestHeaders::new();
        for (name, value) in &genuine {
            if rng.random_bool(0.1) {
                continue;
            }
            let value = if rng.random_bool(0.4) {
                mutate(&mut rng, value)
            } else {
                value.clone()
            };
            headers.insert(name, &value);
        }
        let body: Vec<u8> = match rng.random_range(0..4) {
            0 => BODY.to_vec(),
            1 => form.clone().into_bytes(),
            2 => mutate(&mut rng, &form).into_bytes(),
            _ => (0..rng.random_range(0..512))
                .map(|_| rng.random())
                .collect(),
        };
        let request = InboundRequest {
            path: "/webhooks/x",
            headers: &headers,
            body: &body,
        };
        for (verifier, _) in &verifiers {
            match verifier.verify(&request, NOW) {
                Ok(_) => verified += 1,
                Err(err) => {
                    let text = err.to_string();
                    assert!(
                        text.chars().count() <= 200,
                        "a {}-character reason",
                        text.len()
                    );
                    assert!(!text.chars().any(char::is_control), "{text:?}");
                }
            }
        }
    }
    assert!(verified > 0, "some genuine requests survive the mutations");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{CASES} requests took {:?}",
        started.elapsed()
    );
}
