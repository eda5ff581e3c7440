//! Property tests (proptest) of every verifier against arbitrary and mutated requests: no
//! panic, bounded time per request, and rejection reasons that stay short and free of
//! control characters (they are logged and answered).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;
use proptest::prelude::*;
use proptest::sample::Index;
use secrecy::SecretString;

use super::hmac::{fiserv_default, simpay_default, HmacScheme};
use super::{
    form_control, jwt, standard_webhooks, stripe, InboundRequest, RequestHeaders, Secrets, Verifier,
};

const NOW: i64 = 1_700_000_000;
/// Requests tried (each against every verifier).
const CASES: u32 = 400;
/// Most time one verifier may take on one request. Release builds take well under a
/// millisecond; the ceiling is for a debug build (RSA/ECDSA in unoptimised code) on a busy
/// 2-core machine, and still catches anything super-linear in the 4 KB inputs tried.
const PER_REQUEST: Duration = Duration::from_millis(if cfg!(debug_assertions) { 400 } else { 50 });
/// Longest rejection reason.
const MAX_REASON_CHARS: usize = 200;
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

/// One edit of a header value or body.
#[derive(Debug, Clone)]
enum Edit {
    Truncate(Index),
    Insert(Index, Index),
    /// A long run of one odd piece: deep or huge values.
    Run(Index, Index, usize),
    Uppercase,
    /// Arbitrary text (any Unicode) at a position.
    Text(Index, String),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<Index>().prop_map(Edit::Truncate),
        (any::<Index>(), any::<Index>()).prop_map(|(at, odd)| Edit::Insert(at, odd)),
        (any::<Index>(), any::<Index>(), 1usize..2_000)
            .prop_map(|(at, odd, n)| Edit::Run(at, odd, n)),
        Just(Edit::Uppercase),
        (any::<Index>(), ".{0,40}").prop_map(|(at, text)| Edit::Text(at, text)),
    ]
}

fn apply(value: &str, edits: &[Edit]) -> String {
    let mut text = value.to_string();
    let boundary = |text: &str, at: &Index| {
        let at = at.index(text.len() + 1);
        (0..=at)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0)
    };
    for edit in edits {
        match edit {
            Edit::Truncate(at) => {
                let at = boundary(&text, at);
                text.truncate(at);
            }
            Edit::Insert(at, odd) => {
                let at = boundary(&text, at);
                text.insert_str(at, ODD[odd.index(ODD.len())]);
            }
            Edit::Run(at, odd, n) => {
                let at = boundary(&text, at);
                text.insert_str(at, &ODD[odd.index(ODD.len())].repeat(*n));
            }
            Edit::Uppercase => text = text.to_uppercase(),
            Edit::Text(at, piece) => {
                let at = boundary(&text, at);
                text.insert_str(at, piece);
            }
        }
    }
    text
}

/// What happens to one genuine header.
#[derive(Debug, Clone)]
enum HeaderPlan {
    Keep,
    Drop,
    Mutate(Vec<Edit>),
}

fn header_plan() -> impl Strategy<Value = HeaderPlan> {
    prop_oneof![
        5 => Just(HeaderPlan::Keep),
        1 => Just(HeaderPlan::Drop),
        4 => prop::collection::vec(edit(), 1..4).prop_map(HeaderPlan::Mutate),
    ]
}

/// The body: a genuine JSON or form body, a mutated form, or arbitrary bytes.
#[derive(Debug, Clone)]
enum BodyPlan {
    Json,
    Form,
    MutatedForm(Vec<Edit>),
    Bytes(Vec<u8>),
}

fn body_plan() -> impl Strategy<Value = BodyPlan> {
    prop_oneof![
        Just(BodyPlan::Json),
        Just(BodyPlan::Form),
        prop::collection::vec(edit(), 1..4).prop_map(BodyPlan::MutatedForm),
        prop::collection::vec(any::<u8>(), 0..512).prop_map(BodyPlan::Bytes),
    ]
}

/// The verifiers with their signature headers, the genuine headers and the genuine form body.
type Shared = (Vec<(Verifier, &'static str)>, Vec<(String, String)>, String);

/// Built once: key parsing is not what is measured.
fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let form = format!(
            "external_id=co-1&control={}&cashout_id=1",
            form_control::control(SECRET.as_bytes(), "Be4", "co-1", "Bo7")
        );
        (verifiers(), genuine_headers(), form)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn every_verifier_takes_arbitrary_requests_without_panic_in_bounded_time_with_short_clean_reasons(
        plans in prop::collection::vec(header_plan(), 10),
        extra in prop::collection::vec(("[a-zA-Z-]{1,24}", ".{0,200}"), 0..4),
        body in body_plan(),
    ) {
        let (verifiers, genuine, form) = shared();
        let mut headers = RequestHeaders::new();
        for ((name, value), plan) in genuine.iter().zip(&plans) {
            match plan {
                HeaderPlan::Keep => headers.insert(name, value),
                HeaderPlan::Drop => {}
                HeaderPlan::Mutate(edits) => headers.insert(name, &apply(value, edits)),
            }
        }
        for (name, value) in &extra {
            headers.insert(name, value);
        }
        let body: Vec<u8> = match body {
            BodyPlan::Json => BODY.to_vec(),
            BodyPlan::Form => form.clone().into_bytes(),
            BodyPlan::MutatedForm(edits) => apply(form, &edits).into_bytes(),
            BodyPlan::Bytes(bytes) => bytes,
        };
        let request = InboundRequest {
            path: "/webhooks/x",
            headers: &headers,
            body: &body,
        };
        for (verifier, header) in verifiers {
            let started = Instant::now();
            let result = verifier.verify(&request, NOW);
            let took = started.elapsed();
            prop_assert!(took < PER_REQUEST, "{header}: {took:?}");
            if let Err(err) = result {
                let text = err.to_string();
                prop_assert!(
                    text.chars().count() <= MAX_REASON_CHARS,
                    "{header}: a {}-character reason",
                    text.chars().count()
                );
                prop_assert!(!text.chars().any(char::is_control), "{header}: {text:?}");
            }
        }
    }
}

#[test]
fn the_genuine_requests_the_properties_mutate_do_verify() {
    // Without this the property above could pass on requests no verifier ever accepts.
    let (verifiers, genuine, form) = shared();
    let mut headers = RequestHeaders::new();
    for (name, value) in genuine {
        headers.insert(name, value);
    }
    let mut verified = 0;
    for body in [BODY.to_vec(), form.clone().into_bytes()] {
        let request = InboundRequest {
            path: "/webhooks/x",
            headers: &headers,
            body: &body,
        };
        verified += verifiers
            .iter()
            .filter(|(verifier, _)| verifier.verify(&request, NOW).is_ok())
            .count();
    }
    assert!(verified >= 3, "only {verified} genuine requests verified");
}
