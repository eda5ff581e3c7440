//! Mannco.store cash-out simulator (SPEC §4.4): no webhooks; login and paged history in USD cents with exact fees.

use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{
    json_response, json_text, query_pairs, rfc3339, Cashout, Inner, KindSim, SignedRequest, Step,
    WebhookBody,
};
use crate::money::Currency;
use crate::providers::mannco::map_status;
use crate::providers::ParseError;
use crate::state::StatusUpdate;

/// The Mannco simulator (it notifies by email only, so it sends no webhooks).
pub(crate) struct ManncoSim;

const API_KEY: &str = "API_KEY";

const LOGIN_PATH: &str = "/user/login";
const HISTORY_PATH: &str = "/cashout/history";
const PAGE_SIZE: usize = 50;

/// The smallest cash-out Mannco accepts, in cents ($50).
const MINIMUM_CENTS: i64 = 5_000;
/// Amounts are drawn in steps of this many cents, so that 2 % and 1.5 % are whole cents.
const AMOUNT_STEP_CENTS: i64 = 200;

/// A JWT-looking header segment (`{"alg":"HS256","typ":"JWT"}`) for the issued tokens.
const JWT_HEADER: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.";

const PENDING: Step = Step::plain("pending");
const PROCESSING: Step = Step::plain("processing");
const COMPLETED: Step = Step::plain("completed");
const FAILED: Step = Step::plain("failed");

/// Payout methods and their fees in basis points (SPEC §4.4: payoneer 2 %, tipalti 1.5 %).
const METHODS: [(&str, i64); 2] = [("payoneer", 200), ("tipalti", 150)];

/// The fee in cents of `amount` cents at `basis_points`, rounded half up in integers
/// (exact for the simulator's amounts, which are multiples of 200 cents).
pub(crate) fn fee_cents(amount: i64, basis_points: i64) -> i64 {
    (amount * basis_points + 5_000) / 10_000
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HistoryItem<'a> {
    cashout_id: u64,
    amount: i64,
    fee: i64,
    net_amount: i64,
    method: &'a str,
    status: &'a str,
    created_at: String,
    updated_at: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HistoryContent<'a> {
    items: Vec<HistoryItem<'a>>,
    page: usize,
    total_pages: usize,
}

#[derive(Serialize)]
struct Envelope<T> {
    err: bool,
    success: bool,
    content: T,
}

#[derive(Serialize)]
struct TokenContent {
    token: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoginRequest {
    api_key: Option<String>,
}

fn history_item(cashout: &Cashout) -> HistoryItem<'_> {
    let fee = cashout.fee_minor.unwrap_or(0);
    HistoryItem {
        cashout_id: cashout.provider_ref.parse().unwrap_or(0),
        amount: cashout.amount_minor,
        fee,
        net_amount: cashout.amount_minor - fee,
        method: cashout.method.unwrap_or("payoneer"),
        status: cashout.step().status,
        created_at: rfc3339(cashout.created_at),
        updated_at: rfc3339(cashout.updated_at),
    }
}

fn failure(status: StatusCode, message: &'static str) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/json")
        .body(format!(
            r#"{{"err":true,"success":false,"message":"{message}"}}"#
        ))
}

impl ManncoSim {
    fn login(sim: &Inner, request: &HttpRequest, body: &[u8]) -> HttpResponse {
        if request.method() != Method::POST {
            return failure(StatusCode::METHOD_NOT_ALLOWED, "Use POST");
        }
        let Ok(login) = serde_json::from_slice::<LoginRequest>(body) else {
            return failure(StatusCode::BAD_REQUEST, "Malformed JSON");
        };
        if login.api_key.as_deref() != Some(sim.credential(API_KEY)) {
            return failure(StatusCode::UNAUTHORIZED, "Invalid API key");
        }
        json_response(
            StatusCode::OK,
            &Envelope {
                err: false,
                success: true,
                content: TokenContent {
                    token: sim.issue_token(JWT_HEADER),
                },
            },
        )
    }

    fn history(sim: &Inner, request: &HttpRequest) -> HttpResponse {
        if request.method() != Method::GET {
            return failure(StatusCode::METHOD_NOT_ALLOWED, "Use GET");
        }
        if !sim.bearer_is_valid(request) {
            return failure(StatusCode::UNAUTHORIZED, "Invalid or expired token");
        }
        let query = query_pairs(request);
        let page = match query.get("page") {
            Some(text) => match text.trim().parse::<usize>() {
                Ok(page) if page >= 1 => page,
                _ => return failure(StatusCode::BAD_REQUEST, "page is an integer from 1"),
            },
            None => 1,
        };
        sim.with_cashouts(|cashouts| {
            let mut newest_first: Vec<&Cashout> = cashouts.iter().collect();
            newest_first.sort_by(|a, b| {
                let key = |c: &Cashout| (c.updated_at, c.provider_ref.parse::<u64>().unwrap_or(0));
                key(b).cmp(&key(a))
            });
            let total_pages = newest_first.len().div_ceil(PAGE_SIZE).max(1);
            let items = newest_first
                .into_iter()
                .skip((page - 1) * PAGE_SIZE)
                .take(PAGE_SIZE)
                .map(history_item)
                .collect();
            json_response(
                StatusCode::OK,
                &Envelope {
                    err: false,
                    success: true,
                    content: HistoryContent {
                        items,
                        page,
                        total_pages,
                    },
                },
            )
        })
    }
}

impl KindSim for ManncoSim {
    fn credentials(&self) -> &'static [&'static str] {
        &[API_KEY]
    }

    fn currencies(&self) -> &'static [&'static str] {
        &["USD"]
    }

    fn toml_lines(&self, env_prefix: &str, _sim: &Inner) -> String {
        format!(
            "api_key_env = \"{env_prefix}_{API_KEY}\"\n\
             fees = {{ payoneer = \"2%\", tipalti = \"1.5%\" }}\n"
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
        let cashout_id = 4_500 + number * 8 + rng.random_range(0..8u64);
        let steps = match rng.random_range(0..10u32) {
            0..=7 => rng.random_range(0..=500i64),
            _ => rng.random_range(500..=50_000i64),
        };
        let amount = MINIMUM_CENTS + AMOUNT_STEP_CENTS * steps;
        let (method, basis_points) = METHODS[usize::from(rng.random_range(0..10u8) >= 6)];
        let path = match rng.random_range(0..100u32) {
            0..=69 => vec![PENDING, PROCESSING, COMPLETED],
            70..=84 => vec![PENDING, PROCESSING, FAILED],
            _ => vec![PENDING, FAILED],
        };
        let mut cashout = Cashout::new(
            cashout_id.to_string(),
            external_id,
            amount,
            currencies[0],
            path,
            now,
        );
        cashout.method = Some(method);
        cashout.fee_minor = Some(fee_cents(amount, basis_points));
        cashout
    }

    fn update(&self, step: &Step) -> Result<StatusUpdate, ParseError> {
        map_status(step.status)
    }

    fn echoes_external_id(&self) -> bool {
        false
    }

    fn creation_webhook(&self) -> bool {
        false
    }

    fn webhook(&self, _cashout: &Cashout, _sim: &Inner, _rng: &mut StdRng) -> Option<WebhookBody> {
        None
    }

    fn sign(
        &self,
        event: &WebhookBody,
        _sim: &Inner,
        _now_unix: i64,
        _tamper: bool,
    ) -> anyhow::Result<SignedRequest> {
        Ok(SignedRequest {
            headers: Vec::new(),
            body: event.body.clone(),
        })
    }

    fn handle(&self, sim: &Inner, request: &HttpRequest, body: &[u8]) -> HttpResponse {
        match request.path() {
            LOGIN_PATH => Self::login(sim, request, body),
            HISTORY_PATH => Self::history(sim, request),
            _ => json_text(
                StatusCode::NOT_FOUND,
                r#"{"err":true,"success":false,"message":"Not found"}"#,
            ),
        }
    }
}
