//! Webhook verification (SPEC §2.1, §4, §4.6) for every provider kind and generic scheme:
//! a genuine webhook is accepted and visible; tampered, forged, unsigned, stale and
//! replayed requests are refused with the right code and change nothing; exact copies
//! (sequential or 40 at once) make one event; rotated secrets still verify.
//!
//! Each sender gets its own module of tests generated from the shared checks below, so a
//! failure names the sender and the check (`schemes::stripe::tampered_body_…`).

use std::time::Duration;

use serde_json::Value;

use crate::helpers::{
    assert_accepted, assert_rejected, event_id_of, fiserv_headers, hmac_headers, now_unix,
    pismo_body, pismo_headers, simpay_body, simpay_headers, spawn_app, standard_webhooks_headers,
    stripe_headers, tupay_headers, tupay_notification, FiservBody, Headers, PismoKey, TestApp,
    FISERV_SECRET, FISERV_SECRET_PREVIOUS, HMAC_SECRET, SIMPAY_SECRET, STRIPE_SECRET, SW_SECRET,
    SW_SECRET_PREVIOUS, TUPAY_SECRET,
};

/// How long a committed webhook may take to show in the admin API on a busy machine.
const VISIBLE_WITHIN: Duration = Duration::from_secs(10);

/// One way a provider signs its webhooks, bound to the configured provider receiving it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    /// `fiserv` (kind fiserv_pix, default HMAC-SHA256 base64 scheme).
    Fiserv,
    /// `simpay` (kind simpay, HMAC-SHA512 hex over the body).
    Simpay,
    /// `tupay` (kind tupay, form `control`).
    Tupay,
    /// `pismo` with the RSA key (RS256).
    PismoRs256,
    /// `pismo` with the P-256 key (ES256).
    PismoEs256,
    /// `fiserv-sw` (kind fiserv_pix, scheme standard_webhooks).
    StandardWebhooks,
    /// `simpay-stripe` (kind simpay, scheme stripe).
    Stripe,
    /// `fiserv-hmac` (kind fiserv_pix, generic hmac scheme).
    Hmac,
}

/// Which secret (or key) signs a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    /// The first configured secret.
    Current,
    /// The second configured secret (rotation).
    Previous,
    /// A secret the daemon does not know.
    Wrong,
}

/// The report a body carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    Completed,
    Processing,
}

/// A request ready to post.
#[derive(Clone, Debug)]
pub struct SignedRequest {
    pub body: Vec<u8>,
    pub headers: Headers,
}

/// What the admin API must show after a `Report::Completed` webhook.
pub struct Expected {
    pub status: &'static str,
    pub amount: Option<&'static str>,
    pub currency: Option<&'static str>,
    pub provider_status: Option<&'static str>,
    /// Whether the event changed the stored state (a thin notification carries none).
    pub applied: bool,
}

impl Sender {
    /// The configured provider id (`/webhooks/{id}`).
    pub fn provider(self) -> &'static str {
        match self {
            Sender::Fiserv => "fiserv",
            Sender::Simpay => "simpay",
            Sender::Tupay => "tupay",
            Sender::PismoRs256 | Sender::PismoEs256 => "pismo",
            Sender::StandardWebhooks => "fiserv-sw",
            Sender::Stripe => "simpay-stripe",
            Sender::Hmac => "fiserv-hmac",
        }
    }

    fn secret(self, key: Key) -> &'static str {
        match (self, key) {
            (Sender::Fiserv, Key::Current) => FISERV_SECRET,
            (Sender::Fiserv, Key::Previous) => FISERV_SECRET_PREVIOUS,
            (Sender::Simpay, Key::Current) => SIMPAY_SECRET,
            (Sender::Tupay, Key::Current) => TUPAY_SECRET,
            (Sender::StandardWebhooks, Key::Current) => SW_SECRET,
            (Sender::StandardWebhooks, Key::Previous) => SW_SECRET_PREVIOUS,
            // A well-formed whsec_ secret that is not configured.
            (Sender::StandardWebhooks, Key::Wrong) => "whsec_c29tZS1vdGhlci1rZXktYnl0ZXMtMDEyMzQ1",
            (Sender::Stripe, Key::Current) => STRIPE_SECRET,
            (Sender::Hmac, Key::Current) => HMAC_SECRET,
            (_, Key::Wrong) => "not-the-configured-secret",
            (sender, Key::Previous) => panic!("{sender:?} has no previous secret configured"),
            (Sender::PismoRs256 | Sender::PismoEs256, Key::Current) => {
                unreachable!("pismo signs with keys")
            }
        }
    }

    fn pismo_key(self, key: Key) -> PismoKey {
        match (self, key) {
            (Sender::PismoRs256, Key::Current) => PismoKey::Rsa,
            (Sender::PismoRs256, Key::Wrong) => PismoKey::WrongRsa,
            (Sender::PismoEs256, Key::Current) => PismoKey::Ec,
            (Sender::PismoEs256, Key::Wrong) => PismoKey::WrongEc,
            (sender, key) => panic!("{sender:?} has no {key:?} key"),
        }
    }

    /// The header (or, for Tupay, the form field) carrying the signature.
    pub fn signature_field(self) -> &'static str {
        match self {
            Sender::Fiserv => "x-hmac-signature",
            Sender::Simpay => "hmac",
            Sender::Tupay => "control",
            Sender::PismoRs256 | Sender::PismoEs256 => "x-pismo-signature",
            Sender::StandardWebhooks => "webhook-signature",
            Sender::Stripe => "stripe-signature",
            Sender::Hmac => "x-signature",
        }
    }

    /// The body reporting `report` of cash-out `reference`; `id` is the provider's event
    /// id where the body carries one (Pismo).
    fn body(self, reference: &str, report: Report, id: &str) -> Vec<u8> {
        let completed = report == Report::Completed;
        match self {
            Sender::Fiserv | Sender::StandardWebhooks | Sender::Hmac => {
                FiservBody::new(reference, if completed { 3 } else { 2 }).bytes()
            }
            Sender::Simpay | Sender::Stripe => {
                let (event, status) = if completed {
                    ("PIX_CASHOUT_SUCCESS", "SUCCESS")
                } else {
                    ("PIX_CASHOUT_CREATED", "PROCESSING")
                };
                simpay_body(event, reference, Some(status), "1234567.89")
            }
            Sender::PismoRs256 => {
                let status = if completed { "SETTLED" } else { "PROCESSING" };
                pismo_body(id, reference, status, "1234567.89", "\"BRL\"")
            }
            Sender::PismoEs256 => {
                let status = if completed { "SETTLED" } else { "PROCESSING" };
                pismo_body(id, reference, status, "15000", "\"CLP\"")
            }
            Sender::Tupay => unreachable!("tupay bodies are signed in the body"),
        }
    }

    /// A request reporting `report` of `reference`, signed with `key` at `ts`, with
    /// request id (or Pismo event id) `id`.
    pub fn request(
        self,
        reference: &str,
        report: Report,
        key: Key,
        ts: i64,
        id: &str,
    ) -> SignedRequest {
        if self == Sender::Tupay {
            let external_id = match report {
                Report::Completed => format!("ext-{reference}"),
                Report::Processing => format!("ext-{reference}-b"),
            };
            return SignedRequest {
                body: tupay_notification(reference, &external_id, self.secret(key)),
                headers: tupay_headers(),
            };
        }
        let body = self.body(reference, report, id);
        let headers = match self {
            Sender::Fiserv => fiserv_headers(&body, "/webhooks/fiserv", self.secret(key), ts, id),
            Sender::Simpay => simpay_headers(&body, self.secret(key)),
            Sender::PismoRs256 | Sender::PismoEs256 => {
                pismo_headers(&body, self.pismo_key(key), ts)
            }
            Sender::StandardWebhooks => standard_webhooks_headers(&body, self.secret(key), id, ts),
            Sender::Stripe => stripe_headers(&body, self.secret(key), ts),
            Sender::Hmac => hmac_headers(&body, self.secret(key), ts, id),
            Sender::Tupay => unreachable!(),
        };
        SignedRequest { body, headers }
    }

    /// A genuine, current request reporting `reference` completed.
    pub fn genuine(self, reference: &str) -> SignedRequest {
        self.request(
            reference,
            Report::Completed,
            Key::Current,
            now_unix(),
            &format!("req-{reference}"),
        )
    }

    /// Timeline entries one genuine report leaves: Tupay's thin notification is
    /// followed by the status fetch it triggers.
    pub fn events_per_report(self) -> usize {
        if self == Sender::Tupay {
            2
        } else {
            1
        }
    }

    /// What the admin API shows after [`Sender::genuine`].
    pub fn expected(self) -> Expected {
        let (status, amount, currency, provider_status, applied) = match self {
            Sender::Fiserv | Sender::StandardWebhooks | Sender::Hmac => (
                "completed",
                Some("1234567.89"),
                Some("BRL"),
                Some("3"),
                true,
            ),
            Sender::Simpay | Sender::Stripe => (
                "completed",
                Some("1234567.89"),
                Some("BRL"),
                Some("SUCCESS"),
                true,
            ),
            Sender::PismoRs256 => (
                "completed",
                Some("1234567.89"),
                Some("BRL"),
                Some("SETTLED"),
                true,
            ),
            Sender::PismoEs256 => (
                "completed",
                Some("15000"),
                Some("CLP"),
                Some("SETTLED"),
                true,
            ),
            // A thin notification carries no state: the daemon fetches it right after
            // (the test app's Tupay status endpoint answers 1 Completed, PEN 250.75).
            Sender::Tupay => ("completed", Some("250.75"), Some("PEN"), Some("1"), false),
        };
        Expected {
            status,
            amount,
            currency,
            provider_status,
            applied,
        }
    }

    /// `request` with its signature header (Tupay: its `control` field) removed.
    pub fn without_signature(self, request: &SignedRequest) -> SignedRequest {
        let field = self.signature_field();
        if self == Sender::Tupay {
            let fields: Vec<(String, String)> =
                serde_urlencoded::from_bytes(&request.body).expect("form body");
            let kept: Vec<(String, String)> = fields
                .into_iter()
                .filter(|(name, _)| name != field)
                .collect();
            let body = serde_urlencoded::to_string(kept)
                .expect("encode the form")
                .into_bytes();
            return SignedRequest {
                body,
                headers: request.headers.clone(),
            };
        }
        let headers = request
            .headers
            .iter()
            .filter(|(name, _)| *name != field)
            .cloned()
            .collect();
        SignedRequest {
            body: request.body.clone(),
            headers,
        }
    }
}

/// `body` with every occurrence of `from` replaced by `to` (asserting there was one).
fn replaced(body: &[u8], from: &str, to: &str) -> Vec<u8> {
    let text = String::from_utf8(body.to_vec()).expect("utf-8 body");
    assert!(text.contains(from), "the body contains {from}");
    text.replace(from, to).into_bytes()
}

async fn post(app: &TestApp, sender: Sender, request: &SignedRequest) -> (u16, Value) {
    app.post_webhook(sender.provider(), &request.headers, &request.body)
        .await
}

/// Asserts that nothing was stored for `reference` (a refused request changes nothing).
async fn assert_unknown(app: &TestApp, sender: Sender, reference: &str, case: &str) {
    let (status, body) = app.get_cashout(sender.provider(), reference).await;
    assert_eq!(
        status, 404,
        "{case}: a refused webhook must not create cash-out {reference}: {body}"
    );
}

// ---------------------------------------------------------------------------------------
// The checks, each run by every sender it applies to (see the modules at the end).
// ---------------------------------------------------------------------------------------

async fn valid_webhook_is_accepted_and_visible(sender: Sender) {
    // Arrange
    let app = spawn_app().await;
    let reference = "7100001";
    let request = sender.genuine(reference);
    let expected = sender.expected();

    // Act
    let answer = post(&app, sender, &request).await;

    // Assert
    let event_id = assert_accepted(&answer, &format!("{sender:?} genuine webhook"));
    assert_eq!(
        answer.1,
        serde_json::json!({"status": "accepted", "event_id": event_id})
    );
    let cashout = app
        .wait_for_cashout(sender.provider(), reference, VISIBLE_WITHIN, |c| {
            c["status"] == expected.status
        })
        .await;
    assert_eq!(cashout["provider"], sender.provider());
    assert_eq!(cashout["provider_ref"], reference);
    assert_eq!(
        cashout["amount"],
        expected.amount.map_or(Value::Null, Value::from),
        "amount text: {cashout}"
    );
    assert_eq!(
        cashout["currency"],
        expected.currency.map_or(Value::Null, Value::from),
        "{cashout}"
    );
    assert_eq!(
        cashout["provider_status"],
        expected.provider_status.map_or(Value::Null, Value::from),
        "{cashout}"
    );
    assert_eq!(cashout["held"], false);
    let events = cashout["events"].as_array().expect("events array");
    assert_eq!(
        events.len(),
        sender.events_per_report(),
        "events in the timeline: {cashout}"
    );
    assert_eq!(events[0]["event_id"], event_id.as_str());
    assert_eq!(events[0]["source"], "webhook");
    assert_eq!(events[0]["applied"], expected.applied, "{cashout}");
    if sender == Sender::Tupay {
        assert_eq!(events[0]["raw_status"], Value::Null, "thin: {cashout}");
        assert_eq!(events[1]["source"], "poll", "the fetch: {cashout}");
        assert_eq!(events[1]["applied"], true, "{cashout}");
        assert_eq!(events[1]["raw_status"], "1", "{cashout}");
    } else {
        assert_eq!(
            events[0]["raw_status"],
            expected.provider_status.map_or(Value::Null, Value::from)
        );
    }
    app.stop().await;
}

async fn exact_same_request_again_is_a_duplicate_of_the_first(sender: Sender) {
    // Arrange
    let app = spawn_app().await;
    let request = sender.genuine("7100002");
    let first = post(&app, sender, &request).await;
    let first_id = assert_accepted(&first, "first delivery");

    // Act
    let again = post(&app, sender, &request).await;

    // Assert
    assert_eq!(again.0, 200, "an exact copy is answered 200: {}", again.1);
    assert_eq!(
        again.1,
        serde_json::json!({"status": "duplicate", "event_id": first_id})
    );
    let expected = sender.expected();
    let cashout = app
        .wait_for_cashout(sender.provider(), "7100002", VISIBLE_WITHIN, |c| {
            c["status"] == expected.status
        })
        .await;
    assert_eq!(
        cashout["events"].as_array().map(Vec::len),
        Some(sender.events_per_report()),
        "a duplicate adds no event: {cashout}"
    );
    app.stop().await;
}

async fn forty_concurrent_copies_make_exactly_one_event(sender: Sender) {
    // Arrange
    let app = std::sync::Arc::new(spawn_app().await);
    let request = sender.genuine("7100003");

    // Act
    let posts: Vec<_> = (0..40)
        .map(|_| {
            let app = app.clone();
            let request = request.clone();
            tokio::spawn(async move { post(&app, sender, &request).await })
        })
        .collect();
    let mut answers = Vec::new();
    for handle in posts {
        answers.push(handle.await.expect("post task"));
    }

    // Assert
    for (status, body) in &answers {
        assert_eq!(
            *status, 200,
            "every copy is answered 200, never a 5xx: {status} {body}"
        );
    }
    let accepted = answers
        .iter()
        .filter(|(_, b)| b["status"] == "accepted")
        .count();
    let duplicates = answers
        .iter()
        .filter(|(_, b)| b["status"] == "duplicate")
        .count();
    assert_eq!(
        (accepted, duplicates),
        (1, 39),
        "one accepted and 39 duplicates: {answers:?}"
    );
    let first_id = event_id_of(&answers[0].1);
    assert!(
        answers
            .iter()
            .all(|(_, b)| b["event_id"] == first_id.as_str()),
        "one event id for all: {answers:?}"
    );
    let expected = sender.expected();
    let cashout = app
        .wait_for_cashout(sender.provider(), "7100003", VISIBLE_WITHIN, |c| {
            c["status"] == expected.status
        })
        .await;
    assert_eq!(
        cashout["events"].as_array().map(Vec::len),
        Some(sender.events_per_report()),
        "{cashout}"
    );
    if let Ok(app) = std::sync::Arc::try_unwrap(app) {
        app.stop().await;
    }
}

async fn tampered_body_is_rejected_as_bad_signature(sender: Sender) {
    // Arrange
    let app = spawn_app().await;
    let request = sender.genuine("7100004");
    // Point the signed report at another cash-out (for Tupay this changes the signed external_id).
    let tampered = SignedRequest {
        body: replaced(&request.body, "7100004", "7100005"),
        ..request
    };

    // Act
    let answer = post(&app, sender, &tampered).await;

    // Assert
    assert_rejected(
        &answer,
        "bad_signature",
        &format!("{sender:?} tampered body"),
    );
    assert_unknown(&app, sender, "7100005", "tampered").await;
    assert_unknown(&app, sender, "7100004", "tampered").await;
    app.stop().await;
}

async fn wrong_secret_is_rejected_as_bad_signature(sender: Sender) {
    // Arrange
    let app = spawn_app().await;
    let request = sender.request(
        "7100006",
        Report::Completed,
        Key::Wrong,
        now_unix(),
        "req-7100006",
    );

    // Act
    let answer = post(&app, sender, &request).await;

    // Assert
    assert_rejected(
        &answer,
        "bad_signature",
        &format!("{sender:?} signed with a wrong secret"),
    );
    assert_unknown(&app, sender, "7100006", "wrong secret").await;
    app.stop().await;
}

async fn missing_signature_is_rejected_as_missing_signature(sender: Sender) {
    // Arrange
    let app = spawn_app().await;
    let request = sender.without_signature(&sender.genuine("7100007"));

    // Act
    let answer = post(&app, sender, &request).await;

    // Assert
    assert_rejected(
        &answer,
        "missing_signature",
        &format!("{sender:?} without {}", sender.signature_field()),
    );
    assert_unknown(&app, sender, "7100007", "unsigned").await;
    app.stop().await;
}

async fn stale_timestamp_is_rejected_as_stale_timestamp(sender: Sender) {
    let app = spawn_app().await;
    // Tolerance is 300 s; the margins leave room for a slow machine.
    let cases = [
        ("an hour old", -3600, "7100008"),
        ("ten minutes old", -600, "7100009"),
        ("an hour ahead", 3600, "7100010"),
    ];
    for (case, skew, reference) in cases {
        // Arrange
        let request = sender.request(
            reference,
            Report::Completed,
            Key::Current,
            now_unix() + skew,
            &format!("req-{reference}"),
        );

        // Act
        let answer = post(&app, sender, &request).await;

        // Assert
        assert_rejected(
            &answer,
            "stale_timestamp",
            &format!("{sender:?} timestamp {case}"),
        );
        assert_unknown(&app, sender, reference, case).await;
    }
    app.stop().await;
}

async fn reused_request_id_with_another_body_is_rejected_as_replayed(sender: Sender) {
    // Arrange
    let app = spawn_app().await;
    let first = sender.request(
        "7100011",
        Report::Processing,
        Key::Current,
        now_unix(),
        "evt-reused-1",
    );
    let first_id = assert_accepted(&post(&app, sender, &first).await, "first use of the id");
    // Genuinely signed, but under an id already used for another body.
    let second = sender.request(
        "7100011",
        Report::Completed,
        Key::Current,
        now_unix(),
        "evt-reused-1",
    );
    assert_ne!(first.body, second.body);

    // Act
    let answer = post(&app, sender, &second).await;

    // Assert
    assert_rejected(
        &answer,
        "replayed",
        &format!("{sender:?} request id reused with another body"),
    );
    let cashout = app.get_cashout(sender.provider(), "7100011").await.1;
    assert_eq!(
        cashout["status"], "processing",
        "the replay changed nothing: {cashout}"
    );
    let events = cashout["events"].as_array().expect("events");
    assert_eq!(events.len(), 1, "{cashout}");
    assert_eq!(events[0]["event_id"], first_id.as_str());
    app.stop().await;
}

async fn provider_retry_with_a_fresh_signature_is_a_duplicate(sender: Sender) {
    // Arrange: providers retry the same event (same id, same body) signed anew.
    let app = spawn_app().await;
    let first = sender.request(
        "7100015",
        Report::Completed,
        Key::Current,
        now_unix() - 5,
        "evt-retried",
    );
    let first_id = assert_accepted(&post(&app, sender, &first).await, "first delivery");
    let retry = sender.request(
        "7100015",
        Report::Completed,
        Key::Current,
        now_unix(),
        "evt-retried",
    );
    assert_eq!(retry.body, first.body);
    assert_ne!(
        retry.headers, first.headers,
        "the retry carries a new timestamp and signature"
    );

    // Act
    let answer = post(&app, sender, &retry).await;

    // Assert
    assert_eq!(answer.0, 200, "{}", answer.1);
    assert_eq!(
        answer.1,
        serde_json::json!({"status": "duplicate", "event_id": first_id})
    );
    let cashout = app.get_cashout(sender.provider(), "7100015").await.1;
    assert_eq!(
        cashout["events"].as_array().map(Vec::len),
        Some(1),
        "{cashout}"
    );
    app.stop().await;
}

async fn previous_secret_still_verifies_and_is_recorded(sender: Sender) {
    // Arrange
    let app = spawn_app().await;
    let request = sender.request(
        "7100012",
        Report::Completed,
        Key::Previous,
        now_unix(),
        "req-7100012",
    );

    // Act
    let answer = post(&app, sender, &request).await;

    // Assert
    let event_id = assert_accepted(
        &answer,
        &format!("{sender:?} signed with the previous secret"),
    );
    app.wait_for_cashout(sender.provider(), "7100012", VISIBLE_WITHIN, |c| {
        c["status"] == "completed"
    })
    .await;
    let event = app
        .state
        .store
        .get_event(event_id)
        .await
        .expect("read the event")
        .expect("the event is stored");
    assert_eq!(
        event.secret_index,
        Some(1),
        "the event records that the second secret matched"
    );
    app.stop().await;
}

/// Generates one `#[tokio::test]` per named check, each calling it with `SENDER`.
macro_rules! checks {
    ($($check:ident),+ $(,)?) => {
        $(
            #[tokio::test]
            async fn $check() {
                super::$check(SENDER).await;
            }
        )+
    };
}

/// The checks every sender with a signed timestamp passes.
macro_rules! timestamped_checks {
    () => {
        checks!(
            stale_timestamp_is_rejected_as_stale_timestamp,
            provider_retry_with_a_fresh_signature_is_a_duplicate
        );
    };
}

/// The checks every sender passes.
macro_rules! common_checks {
    () => {
        checks!(
            valid_webhook_is_accepted_and_visible,
            exact_same_request_again_is_a_duplicate_of_the_first,
            forty_concurrent_copies_make_exactly_one_event,
            tampered_body_is_rejected_as_bad_signature,
            wrong_secret_is_rejected_as_bad_signature,
            missing_signature_is_rejected_as_missing_signature,
        );
    };
}

mod fiserv_pix {
    const SENDER: super::Sender = super::Sender::Fiserv;
    common_checks!();
    timestamped_checks!();
    checks!(
        reused_request_id_with_another_body_is_rejected_as_replayed,
        previous_secret_still_verifies_and_is_recorded,
    );
}

mod simpay {
    const SENDER: super::Sender = super::Sender::Simpay;
    common_checks!();
}

mod tupay {
    const SENDER: super::Sender = super::Sender::Tupay;
    common_checks!();
}

mod pismo_rs256 {
    const SENDER: super::Sender = super::Sender::PismoRs256;
    common_checks!();
    timestamped_checks!();
    checks!(reused_request_id_with_another_body_is_rejected_as_replayed);
}

mod pismo_es256 {
    const SENDER: super::Sender = super::Sender::PismoEs256;
    common_checks!();
    timestamped_checks!();
    checks!(reused_request_id_with_another_body_is_rejected_as_replayed);
}

mod standard_webhooks {
    const SENDER: super::Sender = super::Sender::StandardWebhooks;
    common_checks!();
    timestamped_checks!();
    checks!(
        reused_request_id_with_another_body_is_rejected_as_replayed,
        previous_secret_still_verifies_and_is_recorded,
    );
}

mod stripe {
    const SENDER: super::Sender = super::Sender::Stripe;
    common_checks!();
    timestamped_checks!();
}

mod hmac {
    const SENDER: super::Sender = super::Sender::Hmac;
    common_checks!();
    timestamped_checks!();
    checks!(reused_request_id_with_another_body_is_rejected_as_replayed);
}

#[tokio::test]
async fn pismo_events_record_which_public_key_verified_them() {
    // Arrange: rsa-1 is configured first, ec-1 second.
    let app = spawn_app().await;
    let cases = [
        (Sender::PismoRs256, "7100013", 0),
        (Sender::PismoEs256, "7100014", 1),
    ];
    for (sender, reference, position) in cases {
        let request = sender.genuine(reference);

        // Act
        let event_id = assert_accepted(&post(&app, sender, &request).await, &format!("{sender:?}"));

        // Assert
        let event = app
            .state
            .store
            .get_event(event_id)
            .await
            .expect("read")
            .expect("stored");
        assert_eq!(
            event.secret_index,
            Some(position),
            "{sender:?} is verified by key #{position}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn standard_webhooks_spec_test_vector_is_reproduced_by_the_signing_helper() {
    // The SPEC §4.6 vector, so the helper every standard_webhooks test uses is trustworthy.
    let body = br#"{"email":"test@example.com","username":"test_user"}"#;
    let headers = standard_webhooks_headers(
        body,
        crate::helpers::SW_SECRET,
        "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
        1649367553,
    );
    let signature = headers
        .iter()
        .find(|(name, _)| *name == "webhook-signature")
        .map(|(_, v)| v.as_str());
    assert_eq!(
        signature,
        Some("v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=")
    );
}

/// A JWT with the given header and claims, signed by `sign` over `header.claims`.
fn handmade_jwt(header: &Value, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = sign(signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

#[tokio::test]
async fn pismo_tokens_with_a_disallowed_algorithm_or_key_are_rejected() {
    use ::hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};

    let app = spawn_app().await;
    let body = pismo_body("evt-alg", "7100020", "SETTLED", "1.00", "\"BRL\"");
    let claims =
        serde_json::json!({"iat": now_unix(), "body_sha256": hex::encode(Sha256::digest(&body))});
    let rsa_public =
        std::fs::read(crate::helpers::fixtures_dir().join("keys/pismo-rsa-public.pem"))
            .expect("public key");
    let hs256_with_public_key = |input: &[u8]| {
        let mut mac = Hmac::<Sha256>::new_from_slice(&rsa_public).expect("hmac key");
        mac.update(input);
        mac.finalize().into_bytes().to_vec()
    };
    let valid_rs256 = pismo_headers(&body, PismoKey::Rsa, now_unix())[1].1.clone();
    let es256_under_rsa_kid = {
        let pem = std::fs::read_to_string(
            crate::helpers::fixtures_dir().join("keys/pismo-ec-private.pem"),
        )
        .expect("key");
        cashout_recon::verify::jwt::sign(
            &pem,
            "rsa-1",
            jsonwebtoken::Algorithm::ES256,
            &body,
            now_unix(),
        )
        .expect("sign")
    };
    let unknown_kid = {
        let pem = std::fs::read_to_string(
            crate::helpers::fixtures_dir().join("keys/pismo-rsa-private.pem"),
        )
        .expect("key");
        cashout_recon::verify::jwt::sign(
            &pem,
            "rsa-9",
            jsonwebtoken::Algorithm::RS256,
            &body,
            now_unix(),
        )
        .expect("sign")
    };
    let cases: [(&str, String); 6] = [
        (
            "alg none",
            handmade_jwt(
                &serde_json::json!({"alg": "none", "kid": "rsa-1"}),
                &claims,
                |_| Vec::new(),
            ),
        ),
        (
            "HS256 keyed with the RSA public key",
            handmade_jwt(
                &serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}),
                &claims,
                hs256_with_public_key,
            ),
        ),
        ("ES256 under the RSA key's kid", es256_under_rsa_kid),
        ("an unknown kid", unknown_kid),
        (
            "a truncated token",
            valid_rs256[..valid_rs256.len() - 10].to_string(),
        ),
        ("not a JWT", "definitely-not-a-jwt".to_string()),
    ];
    for (case, token) in cases {
        // Arrange
        let headers = vec![
            ("content-type", "application/json".to_string()),
            ("x-pismo-signature", token),
        ];

        // Act
        let answer = app.post_webhook("pismo", &headers, &body).await;

        // Assert
        assert_rejected(&answer, "bad_signature", case);
    }
    assert_unknown(&app, Sender::PismoRs256, "7100020", "disallowed tokens").await;
    app.stop().await;
}

#[tokio::test]
async fn every_signed_header_is_required() {
    let app = spawn_app().await;
    // (sender, header left out): each is part of the signed bytes or the signature itself.
    let cases = [
        (Sender::Fiserv, "apikey"),
        (Sender::Fiserv, "x-timestamp"),
        (Sender::Fiserv, "x-hmac-signature"),
        (Sender::StandardWebhooks, "webhook-id"),
        (Sender::StandardWebhooks, "webhook-timestamp"),
        (Sender::StandardWebhooks, "webhook-signature"),
        (Sender::Hmac, "x-ts"),
        (Sender::Hmac, "x-signature"),
    ];
    for (index, (sender, missing)) in cases.into_iter().enumerate() {
        // Arrange
        let reference = format!("71001{index:02}");
        let genuine = sender.genuine(&reference);
        let headers: crate::helpers::Headers = genuine
            .headers
            .iter()
            .filter(|(name, _)| *name != missing)
            .cloned()
            .collect();

        // Act
        let answer = app
            .post_webhook(sender.provider(), &headers, &genuine.body)
            .await;

        // Assert
        assert_rejected(
            &answer,
            "missing_signature",
            &format!("{sender:?} without {missing}"),
        );
        assert_unknown(&app, sender, &reference, missing).await;
    }
    app.stop().await;
}
