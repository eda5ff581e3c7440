//! Test harness: the real server on 127.0.0.1:0 with a temp SQLite file, and a client.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use actix_web::dev::ServerHandle;
use cashout_recon::app::{App, AppOptions, AppState};
use cashout_recon::config::Settings;
use serde_json::Value;

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const REPORTS_TOKEN: &str = "test-reports-token";

/// Webhook secrets per environment variable (the config names them).
pub const FISERV_SECRET: &str = "fiserv-webhook-secret";
pub const FISERV_SECRET_PREVIOUS: &str = "fiserv-webhook-secret-previous";
pub const SIMPAY_SECRET: &str = "simpay-webhook-secret";
pub const TUPAY_SECRET: &str = "tupay-webhook-secret";
pub const SW_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
pub const SW_SECRET_PREVIOUS: &str = "whsec_dGhlLXByZXZpb3VzLXNlY3JldC1rZXk=";
pub const STRIPE_SECRET: &str = "whsec_stripe_test_secret";
pub const HMAC_SECRET: &str = "generic-hmac-secret";

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The config every test app starts from: all five kinds plus one provider per generic scheme.
pub fn base_config(db_path: &Path) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
max_body_bytes = 65536
workers = 2
shutdown_timeout = "5s"

[store]
path = "{db}"
busy_timeout = "500ms"

[[providers]]
id = "fiserv"
kind = "fiserv_pix"
base_url = "http://127.0.0.1:9"
webhook_secrets_env = ["FISERV_WEBHOOK_SECRET", "FISERV_WEBHOOK_SECRET_PREVIOUS"]

[[providers]]
id = "simpay"
kind = "simpay"
base_url = "http://127.0.0.1:9"
webhook_secrets_env = ["SIMPAY_WEBHOOK_SECRET"]

[[providers]]
id = "tupay"
kind = "tupay"
base_url = "http://127.0.0.1:9"
webhook_secrets_env = ["TUPAY_WEBHOOK_SECRET"]

[[providers]]
id = "mannco"
kind = "mannco"
base_url = "http://127.0.0.1:9"

[[providers]]
id = "pismo"
kind = "pismo"
base_url = "http://127.0.0.1:9"
public_keys = [{{ kid = "rsa-1", pem_file = "keys/pismo-rsa-public.pem" }}, {{ kid = "ec-1", pem_file = "keys/pismo-ec-public.pem" }}]

[[providers]]
id = "fiserv-sw"
kind = "fiserv_pix"
base_url = "http://127.0.0.1:9"
webhook_secrets_env = ["SW_SECRET", "SW_SECRET_PREVIOUS"]
[providers.verify]
scheme = "standard_webhooks"
tolerance_secs = 300

[[providers]]
id = "simpay-stripe"
kind = "simpay"
base_url = "http://127.0.0.1:9"
webhook_secrets_env = ["STRIPE_SECRET"]
[providers.verify]
scheme = "stripe"

[[providers]]
id = "fiserv-hmac"
kind = "fiserv_pix"
base_url = "http://127.0.0.1:9"
webhook_secrets_env = ["HMAC_SECRET"]
[providers.verify]
scheme = "hmac"
header = "x-signature"
algorithm = "sha512"
encoding = "hex"
template = "{{header:x-ts}}.{{body}}"
timestamp_header = "x-ts"
id_header = "x-event-id"
"#,
        db = db_path.display()
    )
}

pub fn test_env() -> BTreeMap<String, String> {
    [
        ("CASHOUT_RECON_ADMIN_TOKEN", ADMIN_TOKEN),
        ("CASHOUT_RECON_REPORTS_TOKEN", REPORTS_TOKEN),
        ("FISERV_WEBHOOK_SECRET", FISERV_SECRET),
        ("FISERV_WEBHOOK_SECRET_PREVIOUS", FISERV_SECRET_PREVIOUS),
        ("SIMPAY_WEBHOOK_SECRET", SIMPAY_SECRET),
        ("TUPAY_WEBHOOK_SECRET", TUPAY_SECRET),
        ("SW_SECRET", SW_SECRET),
        ("SW_SECRET_PREVIOUS", SW_SECRET_PREVIOUS),
        ("STRIPE_SECRET", STRIPE_SECRET),
        ("HMAC_SECRET", HMAC_SECRET),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A running test app and a client for it.
pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub handle: ServerHandle,
    pub state: actix_web::web::Data<AppState>,
    pub db_path: PathBuf,
    pub _dir: tempfile::TempDir,
    join: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Starts the app on the base config.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|config| config).await
}

/// Starts the app on the base config as changed by `edit`.
pub async fn spawn_app_with(edit: impl FnOnce(String) -> String) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("test.db");
    let text = edit(base_config(&db_path));
    let settings = Settings::parse(&text, &fixtures_dir(), &test_env()).expect("test config is valid");
    let app = App::build_with(settings, AppOptions { handle_signals: false, noop_route: false })
        .await
        .expect("app builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let handle = app.handle();
    let state = app.state();
    let join = tokio::spawn(app.run_until_stopped());
    TestApp {
        address,
        client: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client"),
        handle,
        state,
        db_path,
        _dir: dir,
        join: Some(join),
    }
}

impl TestApp {
    /// Posts a webhook with the given headers and raw body.
    pub async fn post_webhook(&self, provider: &str, headers: &[(&str, String)], body: &[u8]) -> (u16, Value) {
        let mut request = self.client.post(format!("{}/webhooks/{provider}", self.address)).body(body.to_vec());
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.expect("webhook request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// GET with a bearer token; returns status and JSON (or text as a JSON string).
    pub async fn get_with_token(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut request = self.client.get(format!("{}{path}", self.address));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("GET request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// POST with a bearer token and no body.
    pub async fn post_with_token(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut request = self.client.post(format!("{}{path}", self.address));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("POST request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// `GET /api/v1/cashouts/{provider}/{ref}` as admin.
    pub async fn get_cashout(&self, provider: &str, provider_ref: &str) -> (u16, Value) {
        self.get_with_token(&format!("/api/v1/cashouts/{provider}/{provider_ref}"), Some(ADMIN_TOKEN)).await
    }

    /// Waits until `check` holds for the cash-out, or fails after `deadline`.
    pub async fn wait_for_cashout(&self, provider: &str, provider_ref: &str, deadline: Duration, check: impl Fn(&Value) -> bool) -> Value {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let (status, body) = self.get_cashout(provider, provider_ref).await;
            if status == 200 && check(&body) {
                return body;
            }
            if tokio::time::Instant::now() >= until {
                panic!("cash-out {provider}/{provider_ref} did not reach the expected state in {deadline:?}; last: {status} {body}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Stops the server gracefully and waits for the store to drain.
    pub async fn stop(mut self) {
        self.handle.stop(true).await;
        if let Some(join) = self.join.take() {
            let _ = join.await;
        }
    }
}

/// Unix seconds now.
pub fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}
