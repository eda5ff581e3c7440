//! SimPay Pix simulator (SPEC §4.2): NEW → PROCESSING → SUCCESS and its detours, HMAC-SHA512 webhooks, OAuth and status API.

use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{
    draw_amount, flip_char, json_number, json_response, json_text, query_pairs, random_uuid,
    rfc3339, Cashout, Inner, KindSim, SignedRequest, Step, WebhookBody, TOKEN_TTL_SECS,
};
use crate::money::Currency;
use crate::providers::simpay::map_status;
use crate::providers::ParseError;
use crate::state::StatusUpdate;
use crate::verify::hmac::{sign, simpay_default};
use crate::verify::{InboundRequest, RequestHeaders};

/// The SimPay simulator. The PROCESSING step is announced as a `PIX_CASHOUT_CREATED`
/// webhook with `status: "PROCESSING"` (SimPay has no event type of its own for it).
pub(crate) struct SimpaySim;

const WEBHOOK_SECRET: &str = "WEBHOOK_SECRET";
const CLIENT_ID: &str = "CLIENT_ID";
const CLIENT_SECRET: &str = "CLIENT_SECRET";

const TOKEN_PATH: &str = "/v2/oauth/token";
const STATUS_PATH: &str = "/v2/finance/status-cashout/";

const NEW: Step = Step::plain("NEW");
const PROCESSING: Step = Step::plain("PROCESSING");
const SUCCESS: Step = Step::plain("SUCCESS");
const CANCELED: Step = Step::plain("CANCELED");
const REFUND: Step = Step::with_reason("REFUND", "MD06");

/// Error codes of failed Pix transfers and their text.
const ERRORS: [(&str, &str); 4] = [
    ("DICT_KEY_NOT_FOUND", "Chave Pix inválida"),
    ("INSUFFICIENT_FUNDS", "Saldo insuficiente"),
    ("ACCOUNT_BLOCKED", "Conta de destino bloqueada"),
    ("PSP_TIMEOUT", "Instituição de destino não respondeu"),
];

/// A webhook body `{"type","data"}`.
#[derive(Serialize)]
struct Webhook<'a> {
    #[serde(rename = "type")]
    event_type: &'a str,
    data: WebhookData<'a>,
}

/// The cash-out in a webhook. `status` is left out of CANCELED and null in REFUND, as
/// SimPay sends them (the event type then decides).
#[derive(Serialize)]
struct WebhookData<'a> {
    transaction_id: Box<RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<Option<&'a str>>,
    amount: Box<RawValue>,
    fee: Box<RawValue>,
    end_to_end: Option<String>,
    key: String,
    tag: &'a str,
    payment_date: Option<String>,
    error: Option<&'a str>,
}

/// The answer of `GET /v2/finance/status-cashout/?id=` (seed 001).
#[derive(Serialize)]
struct StatusAnswer<'a> {
    worked: bool,
    id: Box<RawValue>,
    transaction_id: Box<RawValue>,
    code_transaction: Option<String>,
    status: &'a str,
    amount: Box<RawValue>,
    fee: Box<RawValue>,
    key: String,
    tag: &'a str,
    from_accout: &'a str,
    recipient_instution: Option<&'a str>,
    recipient_instution_name: Option<&'a str>,
    recipient_account_id: Option<&'a str>,
    recipient_branch_id: Option<&'a str>,
    recipient_legal_id: Option<&'a str>,
    recipient_name: Option<&'a str>,
    recipient_account_type: Option<&'a str>,
    #[serde(rename = "operationUuid")]
    operation_uuid: Option<String>,
    erro_descriptor: &'a str,
    new_erro_descriptor: &'a str,
}

#[derive(Deserialize)]
struct TokenRequest {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

#[derive(Serialize)]
struct TokenAnswer<'a> {
    access_token: String,
    token_type: &'a str,
    expires_in: i64,
}

const NOT_FOUND: &str = r#"{"worked":false,"id":null,"transaction_id":null,"status":null,"amount":0,"fee":0,"erro_descriptor":"Transação não encontrada","new_erro_descriptor":"TRANSACTION_NOT_FOUND"}"#;

fn error_text(code: &str) -> &'static str {
    ERRORS
        .iter()
        .find(|(known, _)| *known == code)
        .map_or("Erro no processamento", |(_, text)| text)
}

/// A masked Pix key, as SimPay echoes it.
fn pix_key(cashout: &Cashout) -> String {
    let digits: String = cashout.provider_ref.chars().rev().take(2).collect();
    format!("144******{digits}")
}

fn reached_success(cashout: &Cashout) -> bool {
    cashout.path[..=cashout.pos]
        .iter()
        .any(|step| step.status == SUCCESS.status)
}

fn end_to_end(cashout: &Cashout) -> Option<String> {
    reached_success(cashout).then(|| {
        format!(
            "E18236120{}s{:0>10}",
            cashout.created_at.format("%Y%m%d%H%M"),
            cashout.provider_ref
        )
    })
}

fn fee_number(cashout: &Cashout) -> Box<RawValue> {
    json_number(
        cashout
            .currency
            .format_minor(cashout.fee_minor.unwrap_or(0)),
    )
}

fn status_answer(cashout: &Cashout) -> StatusAnswer<'_> {
    let step = cashout.step();
    let paid = reached_success(cashout);
    let (erro_descriptor, new_erro_descriptor) = match step.reason {
        Some(code) => (error_text(code), code),
        None => ("", ""),
    };
    StatusAnswer {
        worked: true,
        id: json_number(cashout.provider_ref.clone()),
        transaction_id: json_number(cashout.provider_ref.clone()),
        code_transaction: paid.then(|| format!("sim-{}", cashout.provider_ref)),
        status: step.status,
        amount: json_number(cashout.amount_text()),
        fee: fee_number(cashout),
        key: pix_key(cashout),
        tag: &cashout.external_id,
        from_accout: "900002",
        recipient_instution: paid.then_some("18236120"),
        recipient_instution_name: paid.then_some("NU PAGAMENTOS S.A."),
        recipient_account_id: paid.then_some("8765432"),
        recipient_branch_id: paid.then_some("0001"),
        recipient_legal_id: paid.then_some("***.456.789-**"),
        recipient_name: paid.then_some("Ana Souza"),
        recipient_account_type: paid.then_some("CACC"),
        operation_uuid: end_to_end(cashout),
        erro_descriptor,
        new_erro_descriptor,
    }
}

impl SimpaySim {
    fn token(sim: &Inner, request: &HttpRequest, body: &[u8]) -> HttpResponse {
        if request.method() != Method::POST {
            return json_text(StatusCode::METHOD_NOT_ALLOWED, r#"{"error":"use POST"}"#);
        }
        let Ok(form) = serde_urlencoded::from_bytes::<TokenRequest>(body) else {
            return json_text(StatusCode::BAD_REQUEST, r#"{"error":"invalid_request"}"#);
        };
        if form.grant_type.as_deref() != Some("client_credentials") {
            return json_text(
                StatusCode::BAD_REQUEST,
                r#"{"error":"unsupported_grant_type"}"#,
            );
        }
        let id_ok = form.client_id.as_deref() == Some(sim.credential(CLIENT_ID));
        let secret_ok = form.client_secret.as_deref() == Some(sim.credential(CLIENT_SECRET));
        if !(id_ok && secret_ok) {
            return json_text(StatusCode::UNAUTHORIZED, r#"{"error":"invalid_client"}"#);
        }
        json_response(
            StatusCode::OK,
            &TokenAnswer {
                access_token: sim.issue_token("simpay-"),
                token_type: "Bearer",
                expires_in: TOKEN_TTL_SECS,
            },
        )
    }

    fn status(sim: &Inner, request: &HttpRequest) -> HttpResponse {
        if request.method() != Method::GET {
            return json_text(StatusCode::METHOD_NOT_ALLOWED, r#"{"worked":false}"#);
        }
        if !sim.bearer_is_valid(request) {
            return json_text(
                StatusCode::UNAUTHORIZED,
                r#"{"worked":false,"message":"Token inválido ou expirado"}"#,
            );
        }
        let query = query_pairs(request);
        let Some(id) = query.get("id").map(|id| id.trim().to_string()) else {
            return json_text(
                StatusCode::BAD_REQUEST,
                r#"{"worked":false,"erro_descriptor":"id é obrigatório"}"#,
            );
        };
        sim.with_cashout(&id, |cashout| {
            json_response(StatusCode::OK, &status_answer(cashout))
        })
        .unwrap_or_else(|| json_text(StatusCode::NOT_FOUND, NOT_FOUND))
    }
}

impl KindSim for SimpaySim {
    fn credentials(&self) -> &'static [&'static str] {
        &[WEBHOOK_SECRET, CLIENT_ID, CLIENT_SECRET]
    }

    fn currencies(&self) -> &'static [&'static str] {
        &["BRL"]
    }

    fn toml_lines(&self, env_prefix: &str, _sim: &Inner) -> String {
        format!(
            "webhook_secrets_env = [\"{env_prefix}_{WEBHOOK_SECRET}\"]\n\
             client_id_env = \"{env_prefix}_{CLIENT_ID}\"\n\
             client_secret_env = \"{env_prefix}_{CLIENT_SECRET}\"\n"
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
        let transaction_id = 78_200_000 + number * 16 + rng.random_range(0..16u64);
        let currency = currencies[0];
        let amount = draw_amount(rng, currency);
        let fee = match rng.random_range(0..10u32) {
            0..=4 => 0,
            5..=7 => 199,
            _ => (amount / 100).max(1),
        };
        let choice = rng.random_range(0..100u32);
        let (error_code, _) = ERRORS[rng.random_range(0..ERRORS.len())];
        let path = match choice {
            0..=64 => vec![NEW, PROCESSING, SUCCESS],
            65..=69 => vec![NEW, PROCESSING, SUCCESS, REFUND],
            70..=79 => vec![NEW, CANCELED],
            80..=84 => vec![NEW, PROCESSING, CANCELED],
            _ => vec![NEW, PROCESSING, Step::with_reason("ERROR", error_code)],
        };
        let mut cashout = Cashout::new(
            transaction_id.to_string(),
            external_id,
            amount,
            currency,
            path,
            now,
        );
        cashout.fee_minor = Some(fee);
        cashout
    }

    fn update(&self, step: &Step) -> Result<StatusUpdate, ParseError> {
        map_status(step.status)
    }

    fn echoes_external_id(&self) -> bool {
        true
    }

    fn creation_webhook(&self) -> bool {
        true
    }

    fn webhook(&self, cashout: &Cashout, _sim: &Inner, rng: &mut StdRng) -> Option<WebhookBody> {
        let step = cashout.step();
        let (event_type, status) = match step.status {
            "NEW" => ("PIX_CASHOUT_CREATED", Some(Some("NEW"))),
            "PROCESSING" => ("PIX_CASHOUT_CREATED", Some(Some("PROCESSING"))),
            "SUCCESS" => ("PIX_CASHOUT_SUCCESS", Some(Some("SUCCESS"))),
            "ERROR" => ("PIX_CASHOUT_ERROR", Some(Some("ERROR"))),
            "REFUND" => ("PIX_CASHOUT_REFUND", Some(None)),
            "CANCELED" => ("PIX_CASHOUT_CANCELED", None),
            _ => return None,
        };
        let paid = reached_success(cashout);
        let webhook = Webhook {
            event_type,
            data: WebhookData {
                transaction_id: json_number(cashout.provider_ref.clone()),
                status,
                amount: json_number(cashout.amount_text()),
                fee: fee_number(cashout),
                end_to_end: end_to_end(cashout),
                key: pix_key(cashout),
                tag: &cashout.external_id,
                payment_date: paid.then(|| rfc3339(cashout.updated_at)),
                error: step.reason,
            },
        };
        let body = serde_json::to_vec(&webhook).ok()?;
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
        _now_unix: i64,
        tamper: bool,
    ) -> anyhow::Result<SignedRequest> {
        let headers = RequestHeaders::new();
        let inbound = InboundRequest {
            path: sim.target_path(),
            headers: &headers,
            body: &event.body,
        };
        let signature = sign(
            &simpay_default(),
            sim.credential(WEBHOOK_SECRET).as_bytes(),
            &inbound,
        )
        .map_err(|err| anyhow::anyhow!("signing a simpay webhook: {err}"))?;
        let signature = if tamper {
            flip_char(&signature, 0)
        } else {
            signature
        };
        Ok(SignedRequest {
            headers: vec![("hmac".to_string(), signature)],
            body: event.body.clone(),
        })
    }

    fn handle(&self, sim: &Inner, request: &HttpRequest, body: &[u8]) -> HttpResponse {
        match request.path() {
            TOKEN_PATH => Self::token(sim, request, body),
            "/v2/finance/status-cashout" | STATUS_PATH => Self::status(sim, request),
            _ => json_text(
                StatusCode::NOT_FOUND,
                r#"{"worked":false,"message":"not found"}"#,
            ),
        }
    }
}
