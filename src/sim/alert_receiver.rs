//! A loopback alert receiver (the ops side of SPEC §7): verifies each alert POST's
//! Standard Webhooks signature, can fail its first deliveries on purpose (500) or hang,
//! and records everything it got. Used by tests and the `demo`.

use std::net::TcpListener;
use std::sync::{Arc, Mutex, MutexGuard};

use actix_web::dev::ServerHandle;
use actix_web::{web, HttpRequest, HttpResponse};
use anyhow::Context;
use secrecy::SecretString;

use crate::verify::standard_webhooks::StandardWebhooks;
use crate::verify::{InboundRequest, RequestHeaders};

/// A Standard Webhooks secret for demos and tests (not a secret of any real system).
pub const DEMO_SECRET: &str = "whsec_ZGVtby1hbGVydC1zaWduaW5nLXNlY3JldC0wMDE=";

/// How the receiver behaves.
#[derive(Clone, Debug)]
pub struct ReceiverConfig {
    /// The Standard Webhooks secret (`whsec_…`) the daemon signs with.
    pub secret: String,
    /// Answer this many first (verified) deliveries 500, to exercise retries.
    pub fail_first: usize,
    /// Never answer (a hung receiver: the daemon's request times out).
    pub hang: bool,
}

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct ReceivedAlert {
    /// The `webhook-id` header (the same on every retry of one delivery).
    pub webhook_id: String,
    /// Whether the signature verified.
    pub verified: bool,
    /// The status it answered.
    pub answered: u16,
    /// The JSON body (SPEC §7's payload), `Null` when it was not JSON.
    pub body: serde_json::Value,
}

/// What an [`AlertReceiver`] got, as `kind subject` lines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReceiverSummary {
    /// Firing notices accepted (first sends, escalations and re-sends).
    pub firing: Vec<String>,
    /// Resolutions accepted.
    pub resolved: Vec<String>,
    /// Deliveries answered 500 on purpose (`fail_first`), later retried.
    pub failed_on_purpose: usize,
    /// Requests whose Standard Webhooks signature did not verify (should be 0).
    pub bad_signatures: usize,
}

struct Inner {
    verifier: StandardWebhooks,
    config: ReceiverConfig,
    requests: Mutex<Vec<ReceivedAlert>>,
    /// Requests that arrived while hanging.
    hung: Mutex<usize>,
}

impl Inner {
    fn requests(&self) -> MutexGuard<'_, Vec<ReceivedAlert>> {
        self.requests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A running receiver.
pub struct AlertReceiver {
    inner: Arc<Inner>,
    url: String,
    handle: ServerHandle,
}

impl AlertReceiver {
    /// Starts on `127.0.0.1:0`.
    pub async fn start(config: ReceiverConfig) -> anyhow::Result<AlertReceiver> {
        let verifier = StandardWebhooks::new(&vec![SecretString::from(config.secret.clone())], 300)
            .map_err(|err| anyhow::anyhow!("alert receiver secret: {err}"))?;
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the alert receiver")?;
        let port = listener
            .local_addr()
            .context("reading the alert receiver's address")?
            .port();
        let inner = Arc::new(Inner {
            verifier,
            config,
            requests: Mutex::new(Vec::new()),
            hung: Mutex::new(0),
        });
        let data = web::Data::from(inner.clone());
        let server = actix_web::HttpServer::new(move || {
            actix_web::App::new()
                .app_data(data.clone())
                .default_service(web::to(receive))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(0)
        .listen(listener)
        .context("starting the alert receiver")?
        .run();
        let handle = server.handle();
        tokio::spawn(async move {
            if let Err(err) = server.await {
                tracing::warn!(error = %err, "alert receiver failed");
            }
        });
        Ok(AlertReceiver {
            inner,
            url: format!("http://127.0.0.1:{port}/alerts"),
            handle,
        })
    }

    /// The `[alerts]` section that points a daemon at this receiver (its secret is read
    /// from `CASHOUT_RECON_ALERT_SECRET`: add [`AlertReceiver::env_var`] to its environment).
    pub fn alerts_toml(&self) -> String {
        format!(
            "[alerts]\nwebhook_url = \"{}\"\nsigning_secret_env = \"CASHOUT_RECON_ALERT_SECRET\"\n",
            self.url
        )
    }

    /// The environment variable (name, value) holding the signing secret.
    pub fn env_var(&self) -> (String, String) {
        (
            "CASHOUT_RECON_ALERT_SECRET".to_string(),
            self.inner.config.secret.clone(),
        )
    }

    /// The URL to set as `alerts.webhook_url`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Every answered request, in arrival order.
    pub fn requests(&self) -> Vec<ReceivedAlert> {
        self.inner.requests().clone()
    }

    /// The alerts accepted (verified and answered 2xx), in arrival order.
    pub fn delivered(&self) -> Vec<ReceivedAlert> {
        self.inner
            .requests()
            .iter()
            .filter(|r| r.verified && (200..300).contains(&r.answered))
            .cloned()
            .collect()
    }

    /// What the receiver got, for a summary: alerts fired and resolved (verified and
    /// accepted), deliveries failed on purpose, and requests whose signature failed.
    pub fn summary(&self) -> ReceiverSummary {
        let requests = self.inner.requests();
        let accepted = |status: &str| {
            requests
                .iter()
                .filter(|r| r.verified && (200..300).contains(&r.answered))
                .filter(|r| r.body["status"] == status)
                .map(|r| {
                    format!(
                        "{} {}",
                        r.body["kind"].as_str().unwrap_or("?"),
                        r.body["subject"].as_str().unwrap_or("?")
                    )
                })
                .collect::<Vec<_>>()
        };
        ReceiverSummary {
            firing: accepted("firing"),
            resolved: accepted("resolved"),
            failed_on_purpose: requests
                .iter()
                .filter(|r| r.verified && r.answered == 500)
                .count(),
            bad_signatures: requests.iter().filter(|r| !r.verified).count(),
        }
    }

    /// Requests held without an answer (hang mode).
    pub fn hung(&self) -> usize {
        *self
            .inner
            .hung
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Stops the server.
    pub async fn stop(&self) {
        self.handle.stop(false).await;
    }
}

async fn receive(request: HttpRequest, body: web::Bytes, inner: web::Data<Inner>) -> HttpResponse {
    if inner.config.hang {
        *inner
            .hung
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) += 1;
        std::future::pending::<()>().await;
    }
    let mut headers = RequestHeaders::new();
    for (name, value) in request.headers() {
        if let Ok(value) = value.to_str() {
            headers.insert(name.as_str(), value);
        }
    }
    let inbound = InboundRequest {
        path: request.path(),
        headers: &headers,
        body: &body,
    };
    let verified = inner
        .verifier
        .verify(&inbound, chrono::Utc::now().timestamp())
        .is_ok();
    let webhook_id = headers.get("webhook-id").unwrap_or("").to_string();
    let parsed = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let mut requests = inner.requests();
    let verified_so_far = requests.iter().filter(|r| r.verified).count();
    let answered = if !verified {
        401
    } else if verified_so_far < inner.config.fail_first {
        500
    } else {
        200
    };
    requests.push(ReceivedAlert {
        webhook_id,
        verified,
        answered,
        body: parsed,
    });
    drop(requests);
    match answered {
        200 => HttpResponse::Ok().json(serde_json::json!({ "status": "ok" })),
        401 => HttpResponse::Unauthorized().json(serde_json::json!({ "error": "bad signature" })),
        _ => HttpResponse::InternalServerError()
            .json(serde_json::json!({ "error": "failing on purpose" })),
    }
}
