//! Pismo cash-out simulator (SPEC §4.5): status-change events signed as ES256 JWTs, and a bearer-protected status endpoint.

use std::path::PathBuf;

use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse};
use anyhow::Context;
use chrono::{DateTime, Utc};
use jsonwebtoken::Algorithm;
use rand::rngs::StdRng;
use rand::Rng;
use serde::Serialize;
use serde_json::value::RawValue;

use super::{
    bearer, draw_amount, flip_char, json_number, json_response, json_string, json_text,
    random_uuid, rfc3339, Cashout, Inner, KindSim, SignedRequest, Step, WebhookBody,
};
use crate::money::Currency;
use crate::providers::pismo::map_status;
use crate::providers::ParseError;
use crate::state::StatusUpdate;
use crate::verify::jwt;

/// The Pismo simulator. Every state, the first (PROCESSING) included, is an event.
pub(crate) struct PismoSim;

/// The test-only signing key (fixtures/keys, never for a real provider).
const PRIVATE_KEY_PEM: &str = include_str!("../../fixtures/keys/pismo-ec-private.pem");
/// Its public half, which the daemon is configured with.
pub(crate) const PUBLIC_KEY_PEM: &str = include_str!("../../fixtures/keys/pismo-ec-public.pem");
/// The `kid` of the simulator's key.
pub(crate) const KID: &str = "sim-ec";

const BEARER_TOKEN: &str = "BEARER_TOKEN";
const STATUS_PREFIX: &str = "/v1/cashouts/";

const PROCESSING: Step = Step::plain("PROCESSING");
const SETTLED: Step = Step::plain("SETTLED");
const CANCELLED: Step = Step::plain("CANCELLED");
const ERROR: Step = Step::plain("ERROR");

/// An event envelope.
#[derive(Serialize)]
struct Event<'a> {
    event_id: String,
    domain: &'a str,
    event_type: &'a str,
    schema_version: u32,
    org_id: &'a str,
    cid: String,
    timestamp: String,
    data: StatusChange<'a>,
}

#[derive(Serialize)]
struct StatusChange<'a> {
    account_id: u64,
    authorization_id: &'a str,
    old_status: Option<&'a str>,
    new_status: &'a str,
    amount: Box<RawValue>,
    currency: Box<RawValue>,
    idempotency_key: &'a str,
}

/// The answer of `GET /v1/cashouts/{authorization_id}`.
#[derive(Serialize)]
struct StatusAnswer<'a> {
    authorization_id: &'a str,
    status: &'a str,
    amount: Box<RawValue>,
    currency: &'a str,
    idempotency_key: &'a str,
    created_at: String,
    updated_at: String,
}

/// Writes the public key to `<temp>/cashout-recon-sim/pismo-sim-ec-public.pem` (atomically,
/// so simulators started at once never read a half-written file) and returns its absolute
/// path.
pub(crate) fn write_public_key() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join("cashout-recon-sim");
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating the key directory {}", dir.display()))?;
    let path = dir.join("pismo-sim-ec-public.pem");
    if std::fs::read_to_string(&path).is_ok_and(|pem| pem == PUBLIC_KEY_PEM) {
        return Ok(std::path::absolute(&path).unwrap_or(path));
    }
    let temporary = dir.join(format!(
        "pismo-sim-ec-public.{}.{}.tmp",
        std::process::id(),
        rand::rng().random::<u64>()
    ));
    std::fs::write(&temporary, PUBLIC_KEY_PEM)
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, &path)
        .with_context(|| format!("moving the public key to {}", path.display()))?;
    Ok(std::path::absolute(&path).unwrap_or(path))
}

/// Pismo sends the currency as an alphabetic code, or for some BRL cash-outs as the ISO
/// numeric code 986 (the daemon accepts both).
fn currency_field(cashout: &Cashout) -> Box<RawValue> {
    if cashout.currency.code() == "BRL" && cashout.account_id % 3 == 0 {
        json_number("986".to_string())
    } else {
        json_string(cashout.currency.code())
    }
}

fn status_answer(cashout: &Cashout) -> StatusAnswer<'_> {
    StatusAnswer {
        authorization_id: &cashout.provider_ref,
        status: cashout.step().status,
        amount: json_number(cashout.amount_text()),
        currency: cashout.currency.code(),
        idempotency_key: &cashout.external_id,
        created_at: rfc3339(cashout.created_at),
        updated_at: rfc3339(cashout.updated_at),
    }
}

impl KindSim for PismoSim {
    fn key_file(&self) -> anyhow::Result<Option<PathBuf>> {
        write_public_key().map(Some)
    }

    fn credentials(&self) -> &'static [&'static str] {
        &[BEARER_TOKEN]
    }

    fn currencies(&self) -> &'static [&'static str] {
        &["BRL", "CLP", "MXN"]
    }

    fn toml_lines(&self, env_prefix: &str, sim: &Inner) -> String {
        let pem_file = sim
            .key_file()
            .map(|path| path.display().to_string())
            .unwrap_or_default();
        let pem_file = toml::Value::String(pem_file).to_string();
        format!(
            "public_keys = [{{ kid = \"{KID}\", pem_file = {pem_file} }}]\n\
             status_path = \"{STATUS_PREFIX}{{id}}\"\n\
             bearer_token_env = \"{env_prefix}_{BEARER_TOKEN}\"\n"
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
        let authorization_id = 918_273_000 + number * 16 + rng.random_range(0..16u64);
        let currency = match rng.random_range(0..10u32) {
            0..=6 => currencies[0],
            7 | 8 => currencies[1 % currencies.len()],
            _ => currencies[2 % currencies.len()],
        };
        let amount = draw_amount(rng, currency);
        let path = match rng.random_range(0..100u32) {
            0..=74 => vec![PROCESSING, SETTLED],
            75..=84 => vec![PROCESSING, CANCELLED],
            _ => vec![PROCESSING, ERROR],
        };
        let mut cashout = Cashout::new(
            authorization_id.to_string(),
            external_id,
            amount,
            currency,
            path,
            now,
        );
        cashout.account_id = 102_345_000 + rng.random_range(0..1_000u64);
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
        let event_id = random_uuid(rng);
        let event = Event {
            event_id: event_id.clone(),
            domain: "integrated-payments",
            event_type: "cashout-status-change",
            schema_version: 1,
            org_id: "TN-cashout-recon-sim",
            cid: random_uuid(rng),
            timestamp: rfc3339(cashout.updated_at),
            data: StatusChange {
                account_id: cashout.account_id,
                authorization_id: &cashout.provider_ref,
                old_status: cashout.previous_step().map(|step| step.status),
                new_status: cashout.step().status,
                amount: json_number(cashout.amount_text()),
                currency: currency_field(cashout),
                idempotency_key: &cashout.external_id,
            },
        };
        let body = serde_json::to_vec(&event).ok()?;
        Some(WebhookBody {
            event_id,
            content_type: "application/json",
            body,
        })
    }

    fn sign(
        &self,
        event: &WebhookBody,
        _sim: &Inner,
        now_unix: i64,
        tamper: bool,
    ) -> anyhow::Result<SignedRequest> {
        let token = jwt::sign(
            PRIVATE_KEY_PEM,
            KID,
            Algorithm::ES256,
            &event.body,
            now_unix,
        )
        .map_err(|err| anyhow::anyhow!("signing a pismo event: {err}"))?;
        let token = match (tamper, token.rfind('.')) {
            (true, Some(dot)) => flip_char(&token, dot + 1),
            _ => token,
        };
        Ok(SignedRequest {
            headers: vec![("x-pismo-signature".to_string(), token)],
            body: event.body.clone(),
        })
    }

    fn handle(&self, sim: &Inner, request: &HttpRequest, _body: &[u8]) -> HttpResponse {
        let Some(authorization_id) = request
            .path()
            .strip_prefix(STATUS_PREFIX)
            .filter(|id| !id.is_empty() && !id.contains('/'))
        else {
            return json_text(StatusCode::NOT_FOUND, r#"{"message":"Not found"}"#);
        };
        if request.method() != Method::GET {
            return json_text(StatusCode::METHOD_NOT_ALLOWED, r#"{"message":"Use GET"}"#);
        }
        if bearer(request) != Some(sim.credential(BEARER_TOKEN)) {
            return json_text(StatusCode::UNAUTHORIZED, r#"{"message":"Unauthorized"}"#);
        }
        sim.with_cashout(authorization_id, |cashout| {
            json_response(StatusCode::OK, &status_answer(cashout))
        })
        .unwrap_or_else(|| json_text(StatusCode::NOT_FOUND, r#"{"message":"Cash-out not found"}"#))
    }
}
