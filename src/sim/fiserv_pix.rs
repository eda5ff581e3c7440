//! Fiserv LATAM Pix simulator (SPEC §4.1): states 0–5 with fail reasons, HMAC-signed webhooks, search and status API.

use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, RngCore};
use secrecy::SecretString;
use serde::Serialize;
use serde_json::value::RawValue;

use super::{
    draw_amount, flip_char, json_number, json_response, json_string, parse_time, query_pairs,
    random_uuid, request_headers, rfc3339, Cashout, Inner, KindSim, SignedRequest, Step,
    WebhookBody,
};
use crate::money::Currency;
use crate::providers::fiserv_pix::map_status;
use crate::providers::ParseError;
use crate::state::StatusUpdate;
use crate::verify::hmac::{fiserv_default, sign, HmacScheme};
use crate::verify::InboundRequest;

/// The Fiserv Pix simulator.
pub(crate) struct FiservPixSim;

const WEBHOOK_SECRET: &str = "WEBHOOK_SECRET";
const API_KEY: &str = "API_KEY";
const API_SECRET: &str = "API_SECRET";
const BEARER_TOKEN: &str = "BEARER_TOKEN";

const SEARCH_PATH: &str = "/v2/apm/pix/cashout";
/// Tolerance of `x-timestamp` on API requests.
const TOLERANCE_SECS: u64 = 300;
const DEFAULT_PAGE_SIZE: usize = 50;
const MAX_PAGE_SIZE: usize = 200;

const CREATED: Step = Step::plain("0");
const REQUESTED: Step = Step::plain("1");
const AUTHORIZED: Step = Step::plain("2");
const CONFIRMED: Step = Step::plain("3");
const EXPIRED: Step = Step::plain("5");
/// Fail reasons 0–7 (seed 002).
const FAIL_REASONS: [&str; 8] = ["0", "1", "2", "3", "4", "5", "6", "7"];

/// One cash-out as Fiserv writes it: webhook body, search item and status answer alike.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PixCashoutItem<'a> {
    txid: &'a str,
    status: Box<RawValue>,
    fail_reason: Option<Box<RawValue>>,
    amount: Box<RawValue>,
    currency: &'a str,
    end_to_end: Option<String>,
    confirmation_key: Option<String>,
    created_at: String,
    updated_at: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SearchAnswer<'a> {
    items: Vec<PixCashoutItem<'a>>,
    page: usize,
    total_pages: usize,
}

#[derive(Serialize)]
struct ErrorAnswer<'a> {
    code: &'a str,
    message: String,
}

fn item(cashout: &Cashout) -> PixCashoutItem<'_> {
    let step = cashout.step();
    let reached = |status: &str| {
        cashout.path[..=cashout.pos]
            .iter()
            .any(|s| s.status == status)
    };
    let amount_text = cashout.amount_text();
    PixCashoutItem {
        txid: &cashout.provider_ref,
        status: json_number(step.status.to_string()),
        fail_reason: step.reason.map(|reason| json_number(reason.to_string())),
        amount: if cashout.amount_as_text {
            json_string(&amount_text)
        } else {
            json_number(amount_text)
        },
        currency: cashout.currency.code(),
        end_to_end: reached(CONFIRMED.status).then(|| end_to_end(cashout)),
        confirmation_key: reached(REQUESTED.status).then(|| {
            cashout
                .provider_ref
                .chars()
                .take(8)
                .collect::<String>()
                .to_uppercase()
        }),
        created_at: rfc3339(cashout.created_at),
        updated_at: rfc3339(cashout.updated_at),
    }
}

/// A Pix end-to-end id: `E` + ISPB + yyyyMMddHHmm + 11 characters.
fn end_to_end(cashout: &Cashout) -> String {
    let tail: String = cashout.provider_ref.chars().take(11).collect();
    format!("E18236120{}{tail}", cashout.created_at.format("%Y%m%d%H%M"))
}

fn error(status: StatusCode, message: impl Into<String>) -> HttpResponse {
    json_response(
        status,
        &ErrorAnswer {
            code: status.as_str(),
            message: message.into(),
        },
    )
}

impl FiservPixSim {
    /// Checks the daemon's request signing (SPEC §4.1): `apikey`, `x-timestamp` within
    /// ±300 s, `x-request-id`, `x-hmac-signature` over apikey ‖ timestamp ‖ body ‖
    /// path-and-query as received, and the bearer token.
    fn authenticate(sim: &Inner, request: &HttpRequest, body: &[u8]) -> Result<(), String> {
        let headers = request_headers(request);
        if headers.get("apikey") != Some(sim.credential(API_KEY)) {
            return Err("apikey is missing or unknown".to_string());
        }
        if headers
            .get("x-request-id")
            .is_none_or(|id| id.trim().is_empty())
        {
            return Err("x-request-id is missing".to_string());
        }
        let path = request
            .uri()
            .path_and_query()
            .map_or_else(|| request.path(), |pq| pq.as_str());
        let secrets = vec![SecretString::from(sim.credential(API_SECRET).to_string())];
        let scheme = HmacScheme::new(fiserv_default(None, TOLERANCE_SECS), &secrets, None)
            .map_err(|err| format!("simulator misconfigured: {err}"))?;
        let inbound = InboundRequest {
            path,
            headers: &headers,
            body,
        };
        scheme
            .verify(&inbound, Utc::now().timestamp())
            .map_err(|err| err.to_string())?;
        let expected = format!("Bearer {}", sim.credential(BEARER_TOKEN));
        if headers.get("authorization") != Some(expected.as_str()) {
            return Err("bearer token is missing or unknown".to_string());
        }
        Ok(())
    }

    fn search(sim: &Inner, request: &HttpRequest) -> HttpResponse {
        let query = query_pairs(request);
        let time = |name: &str| query.get(name).and_then(|text| parse_time(text));
        let (Some(from), Some(to)) = (time("from"), time("to")) else {
            return error(
                StatusCode::BAD_REQUEST,
                "from and to are required RFC 3339 times",
            );
        };
        let number = |name: &str, default: usize| match query.get(name) {
            Some(text) => text.trim().parse::<usize>().ok(),
            None => Some(default),
        };
        let (Some(page), Some(page_size)) =
            (number("page", 1), number("pageSize", DEFAULT_PAGE_SIZE))
        else {
            return error(StatusCode::BAD_REQUEST, "page and pageSize are integers");
        };
        if page == 0 || page_size == 0 {
            return error(
                StatusCode::BAD_REQUEST,
                "page counts from 1; pageSize from 1",
            );
        }
        let page_size = page_size.min(MAX_PAGE_SIZE);
        sim.with_cashouts(|cashouts| {
            let mut matching: Vec<&Cashout> = cashouts
                .iter()
                .filter(|c| in_window(c.updated_at, from, to))
                .collect();
            matching.sort_by(|a, b| {
                (a.updated_at, &a.provider_ref).cmp(&(b.updated_at, &b.provider_ref))
            });
            let total_pages = matching.len().div_ceil(page_size).max(1);
            let items = matching
                .into_iter()
                .skip((page - 1) * page_size)
                .take(page_size)
                .map(item)
                .collect();
            json_response(
                StatusCode::OK,
                &SearchAnswer {
                    items,
                    page,
                    total_pages,
                },
            )
        })
    }

    fn status(sim: &Inner, txid: &str) -> HttpResponse {
        sim.with_cashout(txid, |cashout| {
            json_response(StatusCode::OK, &item(cashout))
        })
        .unwrap_or_else(|| error(StatusCode::NOT_FOUND, "cashout not found"))
    }
}

fn in_window(time: DateTime<Utc>, from: DateTime<Utc>, to: DateTime<Utc>) -> bool {
    from <= time && time < to
}

impl KindSim for FiservPixSim {
    fn provider_id(&self) -> Option<&'static str> {
        Some("fiserv")
    }

    fn credentials(&self) -> &'static [&'static str] {
        &[WEBHOOK_SECRET, API_KEY, API_SECRET, BEARER_TOKEN]
    }

    fn currencies(&self) -> &'static [&'static str] {
        &["BRL"]
    }

    fn toml_lines(&self, env_prefix: &str, _sim: &Inner) -> String {
        format!(
            "webhook_secrets_env = [\"{env_prefix}_{WEBHOOK_SECRET}\"]\n\
             api_key_env = \"{env_prefix}_{API_KEY}\"\n\
             api_secret_env = \"{env_prefix}_{API_SECRET}\"\n\
             bearer_token_env = \"{env_prefix}_{BEARER_TOKEN}\"\n"
        )
    }

    fn new_cashout(
        &self,
        rng: &mut StdRng,
        _number: u64,
        external_id: String,
        now: DateTime<Utc>,
        currencies: &[Currency],
    ) -> Cashout {
        let mut txid = [0u8; 16];
        rng.fill_bytes(&mut txid);
        let currency = currencies[0];
        let amount = draw_amount(rng, currency);
        let choice = rng.random_range(0..100u32);
        let fail = Step::with_reason("4", FAIL_REASONS[rng.random_range(0..FAIL_REASONS.len())]);
        let path = match choice {
            0..=59 => vec![CREATED, REQUESTED, AUTHORIZED, CONFIRMED],
            60..=64 => vec![CREATED, REQUESTED, AUTHORIZED, CONFIRMED, fail],
            65..=71 => vec![CREATED, fail],
            72..=79 => vec![CREATED, REQUESTED, fail],
            80..=89 => vec![CREATED, REQUESTED, AUTHORIZED, fail],
            _ => vec![CREATED, REQUESTED, EXPIRED],
        };
        let mut cashout = Cashout::new(hex::encode(txid), external_id, amount, currency, path, now);
        cashout.amount_as_text = rng.random_bool(0.5);
        cashout
    }

    fn update(&self, step: &Step) -> Result<StatusUpdate, ParseError> {
        let code = step
            .status
            .parse::<i64>()
            .map_err(|_| ParseError(format!("fiserv status {:?}", step.status)))?;
        map_status(code)
    }

    fn echoes_external_id(&self) -> bool {
        false
    }

    fn creation_webhook(&self) -> bool {
        true
    }

    fn webhook(&self, cashout: &Cashout, _sim: &Inner, rng: &mut StdRng) -> Option<WebhookBody> {
        let body = serde_json::to_vec(&item(cashout)).ok()?;
        Some(WebhookBody {
            event_id: random_uuid(rng),
            content_type: "application/json",
            body,
        })
    }

    fn sign(
        &self,
        event: &WebhookBody,
        sim: &Inner,
        now_unix: i64,
        tamper: bool,
    ) -> anyhow::Result<SignedRequest> {
        let mut headers = vec![
            ("apikey".to_string(), sim.credential(API_KEY).to_string()),
            ("x-timestamp".to_string(), now_unix.to_string()),
            ("x-request-id".to_string(), event.event_id.clone()),
        ];
        let mut request_headers = crate::verify::RequestHeaders::new();
        for (name, value) in &headers {
            request_headers.insert(name, value);
        }
        let inbound = InboundRequest {
            path: sim.target_path(),
            headers: &request_headers,
            body: &event.body,
        };
        let signature = sign(
            &fiserv_default(None, TOLERANCE_SECS),
            sim.credential(WEBHOOK_SECRET).as_bytes(),
            &inbound,
        )
        .map_err(|err| anyhow::anyhow!("signing a fiserv webhook: {err}"))?;
        let signature = if tamper {
            flip_char(&signature, 0)
        } else {
            signature
        };
        headers.push(("x-hmac-signature".to_string(), signature));
        Ok(SignedRequest {
            headers,
            body: event.body.clone(),
        })
    }

    fn handle(&self, sim: &Inner, request: &HttpRequest, body: &[u8]) -> HttpResponse {
        let path = request.path();
        let txid = path
            .strip_prefix(SEARCH_PATH)
            .and_then(|rest| rest.strip_prefix('/'))
            .filter(|txid| !txid.is_empty() && !txid.contains('/'));
        let known = path == SEARCH_PATH || txid.is_some();
        if !known {
            return error(StatusCode::NOT_FOUND, "no such endpoint");
        }
        if request.method() != Method::GET {
            return error(StatusCode::METHOD_NOT_ALLOWED, "use GET");
        }
        if let Err(why) = Self::authenticate(sim, request, body) {
            return error(StatusCode::UNAUTHORIZED, format!("unauthorized: {why}"));
        }
        match txid {
            Some(txid) => Self::status(sim, txid),
            None => Self::search(sim, request),
        }
    }
}
