//! Tupay / D24 cashouts v3 simulator (SPEC §4.3): thin form notifications with `control`, signed status API, login and search.

use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{
    draw_amount, flip_char, json_number, json_response, json_text, query_pairs, rfc3339, Cashout,
    Inner, KindSim, SignedRequest, Step, WebhookBody,
};
use crate::money::Currency;
use crate::providers::tupay::map_status;
use crate::providers::ParseError;
use crate::state::StatusUpdate;
use crate::verify::constant_time_eq;
use crate::verify::form_control::control;
use crate::verify::hmac::{hmac_bytes, HmacAlgorithm};

/// The Tupay simulator. A notification follows every state change after creation (none
/// for the creation itself: the create call's answer carries the `cashout_id`).
pub(crate) struct TupaySim;

const WEBHOOK_SECRET: &str = "WEBHOOK_SECRET";
const LOGIN: &str = "LOGIN";
const PASS: &str = "PASS";
const API_SIGNATURE: &str = "API_SIGNATURE";

/// The default `control_prefix` and `control_suffix` the daemon uses.
const CONTROL_PREFIX: &str = "Be4";
const CONTROL_SUFFIX: &str = "Bo7";

const STATUS_PATH: &str = "/v3/cashout/status";
const LOGIN_PATH: &str = "/v1/auth/login";
const SEARCH_PATH: &str = "/v1/cashouts";
/// Items per search page.
const MAX_ROWS: usize = 50;

const PENDING: Step = Step::plain("0");
const COMPLETED: Step = Step::plain("1");
const CANCELLED: Step = Step::plain("2");
const DELIVERED: Step = Step::plain("4");
const ON_HOLD: Step = Step::plain("5");
/// Rejected after completion: the money came back.
const RETURNED: Step = Step::with_reason("3", "826");
/// Rejected because it expired.
const EXPIRED: Step = Step::with_reason("3", "809");

/// Rejection codes (D24) and their reasons; 826 and 809 have special meanings.
const REJECTIONS: [(&str, &str); 7] = [
    ("802", "Invalid beneficiary document"),
    ("804", "Invalid bank account"),
    ("807", "Beneficiary name does not match"),
    ("811", "Bank account closed"),
    ("812", "Amount over the beneficiary's limit"),
    ("809", "Cashout expired"),
    ("826", "Returned by the beneficiary bank"),
];

/// Failure codes drawn for a plain rejection.
const FAILURE_CODES: [&str; 5] = ["802", "804", "807", "811", "812"];

fn description(status: &str) -> &'static str {
    match status {
        "0" => "Pending",
        "1" => "Completed",
        "2" => "Cancelled",
        "3" => "Rejected",
        "4" => "Delivered",
        "5" => "On hold",
        _ => "Unknown",
    }
}

fn rejection_reason(code: &str) -> &'static str {
    REJECTIONS
        .iter()
        .find(|(known, _)| *known == code)
        .map_or("Rejected by the bank", |(_, reason)| reason)
}

/// The answer of `POST /v3/cashout/status`.
#[derive(Serialize)]
struct StatusAnswer<'a> {
    cashout_status: Box<RawValue>,
    cashout_status_description: &'a str,
    rejection_code: Option<&'a str>,
    rejection_reason: Option<&'a str>,
    amount: Box<RawValue>,
    currency: &'a str,
}

#[derive(Serialize)]
struct SearchItem<'a> {
    cashout_id: &'a str,
    external_id: &'a str,
    cashout_status: Box<RawValue>,
    rejection_code: Option<&'a str>,
    amount: Box<RawValue>,
    currency: &'a str,
    created_at: String,
    updated_at: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SearchAnswer<'a> {
    page: usize,
    rows: usize,
    max_rows: usize,
    data: Vec<SearchItem<'a>>,
}

#[derive(Deserialize)]
struct StatusRequest {
    login: Option<String>,
    pass: Option<String>,
    cashout_id: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct LoginRequest {
    login: Option<String>,
    pass: Option<String>,
}

#[derive(Serialize)]
struct LoginAnswer {
    token: String,
}

const UNAUTHORIZED: &str = r#"{"code":401,"description":"Invalid credentials"}"#;

fn status_answer(cashout: &Cashout) -> StatusAnswer<'_> {
    let step = cashout.step();
    StatusAnswer {
        cashout_status: json_number(step.status.to_string()),
        cashout_status_description: description(step.status),
        rejection_code: step.reason,
        rejection_reason: step.reason.map(rejection_reason),
        amount: json_number(cashout.amount_text()),
        currency: cashout.currency.code(),
    }
}

fn search_item(cashout: &Cashout) -> SearchItem<'_> {
    let step = cashout.step();
    SearchItem {
        cashout_id: &cashout.provider_ref,
        external_id: &cashout.external_id,
        cashout_status: json_number(step.status.to_string()),
        rejection_code: step.reason,
        amount: json_number(cashout.amount_text()),
        currency: cashout.currency.code(),
        created_at: rfc3339(cashout.created_at),
        updated_at: rfc3339(cashout.updated_at),
    }
}

impl TupaySim {
    fn control_value(sim: &Inner, external_id: &str) -> String {
        control(
            sim.credential(WEBHOOK_SECRET).as_bytes(),
            CONTROL_PREFIX,
            external_id,
            CONTROL_SUFFIX,
        )
    }

    fn login_matches(sim: &Inner, login: Option<&str>, pass: Option<&str>) -> bool {
        login == Some(sim.credential(LOGIN)) && pass == Some(sim.credential(PASS))
    }

    /// `Payload-Signature` = lowercase hex HMAC-SHA256(api signature secret, exact body);
    /// either case of hex is accepted.
    fn payload_signature_matches(sim: &Inner, request: &HttpRequest, body: &[u8]) -> bool {
        let Some(presented) = request
            .headers()
            .get("payload-signature")
            .and_then(|value| value.to_str().ok())
            .and_then(|text| hex::decode(text.trim()).ok())
        else {
            return false;
        };
        let expected = hmac_bytes(
            HmacAlgorithm::Sha256,
            sim.credential(API_SIGNATURE).as_bytes(),
            &[body],
        );
        constant_time_eq(&expected, &presented)
    }

    fn status(sim: &Inner, request: &HttpRequest, body: &[u8]) -> HttpResponse {
        if request.method() != Method::POST {
            return json_text(StatusCode::METHOD_NOT_ALLOWED, r#"{"code":405}"#);
        }
        if !Self::payload_signature_matches(sim, request, body) {
            return json_text(
                StatusCode::UNAUTHORIZED,
                r#"{"code":401,"description":"Invalid Payload-Signature"}"#,
            );
        }
        let Ok(status_request) = serde_json::from_slice::<StatusRequest>(body) else {
            return json_text(
                StatusCode::BAD_REQUEST,
                r#"{"code":400,"description":"Malformed JSON"}"#,
            );
        };
        if !Self::login_matches(
            sim,
            status_request.login.as_deref(),
            status_request.pass.as_deref(),
        ) {
            return json_text(StatusCode::UNAUTHORIZED, UNAUTHORIZED);
        }
        let cashout_id = match status_request.cashout_id {
            Some(serde_json::Value::String(id)) => id,
            Some(serde_json::Value::Number(id)) => id.to_string(),
            _ => {
                return json_text(
                    StatusCode::BAD_REQUEST,
                    r#"{"code":400,"description":"cashout_id is required"}"#,
                )
            }
        };
        sim.with_cashout(&cashout_id, |cashout| {
            json_response(StatusCode::OK, &status_answer(cashout))
        })
        .unwrap_or_else(|| {
            json_text(
                StatusCode::NOT_FOUND,
                r#"{"code":404,"description":"Cashout not found"}"#,
            )
        })
    }

    fn login(sim: &Inner, request: &HttpRequest, body: &[u8]) -> HttpResponse {
        if request.method() != Method::POST {
            return json_text(StatusCode::METHOD_NOT_ALLOWED, r#"{"code":405}"#);
        }
        let Ok(login) = serde_json::from_slice::<LoginRequest>(body) else {
            return json_text(
                StatusCode::BAD_REQUEST,
                r#"{"code":400,"description":"Malformed JSON"}"#,
            );
        };
        if !Self::login_matches(sim, login.login.as_deref(), login.pass.as_deref()) {
            return json_text(StatusCode::UNAUTHORIZED, UNAUTHORIZED);
        }
        json_response(
            StatusCode::OK,
            &LoginAnswer {
                token: sim.issue_token("tupay-"),
            },
        )
    }

    fn search(sim: &Inner, request: &HttpRequest) -> HttpResponse {
        if request.method() != Method::GET {
            return json_text(StatusCode::METHOD_NOT_ALLOWED, r#"{"code":405}"#);
        }
        if !sim.bearer_is_valid(request) {
            return json_text(
                StatusCode::UNAUTHORIZED,
                r#"{"code":401,"description":"Invalid or expired token"}"#,
            );
        }
        let query = query_pairs(request);
        let seconds = |name: &str| {
            query
                .get(name)
                .and_then(|text| text.trim().parse::<i64>().ok())
                .and_then(|secs| DateTime::from_timestamp(secs, 0))
        };
        let (Some(from), Some(to)) = (seconds("from"), seconds("to")) else {
            return json_text(
                StatusCode::BAD_REQUEST,
                r#"{"code":400,"description":"from and to are required unix seconds"}"#,
            );
        };
        let page = match query.get("page") {
            Some(text) => match text.trim().parse::<usize>() {
                Ok(page) => page,
                Err(_) => {
                    return json_text(
                        StatusCode::BAD_REQUEST,
                        r#"{"code":400,"description":"page is an integer from 0"}"#,
                    )
                }
            },
            None => 0,
        };
        sim.with_cashouts(|cashouts| {
            let mut matching: Vec<&Cashout> = cashouts
                .iter()
                .filter(|c| from <= c.updated_at && c.updated_at < to)
                .collect();
            matching.sort_by(|a, b| {
                (a.updated_at, &a.provider_ref).cmp(&(b.updated_at, &b.provider_ref))
            });
            let rows = matching.len();
            let data = matching
                .into_iter()
                .skip(page.saturating_mul(MAX_ROWS))
                .take(MAX_ROWS)
                .map(search_item)
                .collect();
            json_response(
                StatusCode::OK,
                &SearchAnswer {
                    page,
                    rows,
                    max_rows: MAX_ROWS,
                    data,
                },
            )
        })
    }
}

impl KindSim for TupaySim {
    fn credentials(&self) -> &'static [&'static str] {
        &[WEBHOOK_SECRET, LOGIN, PASS, API_SIGNATURE]
    }

    fn currencies(&self) -> &'static [&'static str] {
        &["PEN", "CLP", "MXN", "COP"]
    }

    fn toml_lines(&self, env_prefix: &str, _sim: &Inner) -> String {
        format!(
            "webhook_secrets_env = [\"{env_prefix}_{WEBHOOK_SECRET}\"]\n\
             login_env = \"{env_prefix}_{LOGIN}\"\n\
             pass_env = \"{env_prefix}_{PASS}\"\n\
             api_signature_env = \"{env_prefix}_{API_SIGNATURE}\"\n"
        )
    }

    fn new_cashout(
        &self,
        rng: &mut StdRng,
        number: u64,
        external_id: String,
        now: DateTime<Utc>,
        currencies: &[Currency],
    ) -> Cashout {
        let cashout_id = 8_405_000 + number * 16 + rng.random_range(0..16u64);
        let currency = match rng.random_range(0..100u32) {
            0..=49 => currencies[0],
            50..=69 => currencies[1 % currencies.len()],
            70..=84 => currencies[2 % currencies.len()],
            _ => currencies[3 % currencies.len()],
        };
        let amount = draw_amount(rng, currency);
        let choice = rng.random_range(0..100u32);
        let failure =
            Step::with_reason("3", FAILURE_CODES[rng.random_range(0..FAILURE_CODES.len())]);
        let path = match choice {
            0..=54 => vec![PENDING, DELIVERED, COMPLETED],
            55..=64 => vec![PENDING, ON_HOLD, DELIVERED, COMPLETED],
            65..=72 => vec![PENDING, CANCELLED],
            73..=84 => vec![PENDING, DELIVERED, failure],
            85..=91 => vec![PENDING, EXPIRED],
            _ => vec![PENDING, DELIVERED, COMPLETED, RETURNED],
        };
        Cashout::new(
            cashout_id.to_string(),
            external_id,
            amount,
            currency,
            path,
            now,
        )
    }

    fn update(&self, step: &Step) -> Result<StatusUpdate, ParseError> {
        let code = step
            .status
            .parse::<i64>()
            .map_err(|_| ParseError(format!("tupay status {:?}", step.status)))?;
        map_status(code, step.reason)
    }

    fn echoes_external_id(&self) -> bool {
        true
    }

    fn creation_webhook(&self) -> bool {
        false
    }

    /// The thin notification, fields in the order Tupay sends them. `status_reason` names the
    /// new state (or the rejection reason), which also keeps the bodies of two changes of one
    /// cash-out in the same second apart (the daemon deduplicates on the body's hash).
    fn webhook(&self, cashout: &Cashout, sim: &Inner, _rng: &mut StdRng) -> Option<WebhookBody> {
        let step = cashout.step();
        let status_reason = match step.reason {
            Some(code) => format!("{code} {}", rejection_reason(code)),
            None => description(step.status).to_string(),
        };
        let bank_reference = match step.status {
            "1" | "4" => format!("SIM-{}", cashout.provider_ref),
            _ => String::new(),
        };
        let fields = [
            (
                "date",
                cashout.updated_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            ),
            ("bank_reference_id", bank_reference),
            ("comments", String::new()),
            ("external_id", cashout.external_id.clone()),
            ("control", Self::control_value(sim, &cashout.external_id)),
            ("cashout_id", cashout.provider_ref.clone()),
            ("status_reason", status_reason),
        ];
        let body = serde_urlencoded::to_string(fields).ok()?;
        Some(WebhookBody {
            event_id: format!("{}-{}", cashout.provider_ref, cashout.pos),
            content_type: "application/x-www-form-urlencoded",
            body: body.into_bytes(),
        })
    }

    /// `control` is in the body, so a tampered notification carries a corrupted `control`.
    fn sign(
        &self,
        event: &WebhookBody,
        _sim: &Inner,
        _now_unix: i64,
        tamper: bool,
    ) -> anyhow::Result<SignedRequest> {
        if !tamper {
            return Ok(SignedRequest {
                headers: Vec::new(),
                body: event.body.clone(),
            });
        }
        let body = String::from_utf8_lossy(&event.body).into_owned();
        let fields: Vec<(String, String)> = serde_urlencoded::from_str(&body)?;
        let tampered: Vec<(String, String)> = fields
            .into_iter()
            .map(|(name, value)| {
                if name == "control" {
                    let flipped = flip_char(&value, 0);
                    (name, flipped)
                } else {
                    (name, value)
                }
            })
            .collect();
        Ok(SignedRequest {
            headers: Vec::new(),
            body: serde_urlencoded::to_string(tampered)?.into_bytes(),
        })
    }

    fn handle(&self, sim: &Inner, request: &HttpRequest, body: &[u8]) -> HttpResponse {
        match request.path() {
            STATUS_PATH => Self::status(sim, request, body),
            LOGIN_PATH => Self::login(sim, request, body),
            SEARCH_PATH => Self::search(sim, request),
            _ => json_text(
                StatusCode::NOT_FOUND,
                r#"{"code":404,"description":"Not found"}"#,
            ),
        }
    }
}
