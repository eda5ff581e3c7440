//! Test harness: the real server on 127.0.0.1:0 with a fresh store, and a client.
//!
//! The store is a typed choice of the harness, [`TestBackend`]: a temp SQLite file, or with
//! `CASHOUT_RECON_TEST_BACKEND=postgres` a fresh database on the test PostgreSQL server
//! (one test body, two stores). Tests of the SQLite file itself are named `sqlite_only_…`
//! so that the PostgreSQL run can skip them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use actix_web::dev::ServerHandle;
use cashout_recon::app::{App, AppOptions, AppState};
use cashout_recon::config::Settings;
use cashout_recon::ingest::FetchReason;
use serde_json::Value;

use crate::test_database::TestDatabase;

/// Chooses the store of every test app: `sqlite` (the default) or `postgres`.
pub const TEST_BACKEND_ENV: &str = "CASHOUT_RECON_TEST_BACKEND";

/// The variable a postgres-mode test app's config names in `store.url_env`.
pub const TEST_APP_DATABASE_URL_ENV: &str = "CASHOUT_RECON_TEST_APP_DATABASE_URL";

/// Which store the test apps run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestBackend {
    Sqlite,
    Postgres,
}

impl TestBackend {
    /// The backend `CASHOUT_RECON_TEST_BACKEND` names (unset: SQLite); another value fails.
    pub fn from_env() -> TestBackend {
        match std::env::var(TEST_BACKEND_ENV).as_deref() {
            Err(_) | Ok("") | Ok("sqlite") => TestBackend::Sqlite,
            Ok("postgres") => TestBackend::Postgres,
            Ok(other) => {
                panic!("{TEST_BACKEND_ENV}={other:?}: expected \"sqlite\" or \"postgres\"")
            }
        }
    }
}

/// A test app's book: a temp directory (the SQLite file, reports, archives) and, on
/// PostgreSQL, a fresh database (dropped with the last clone). Clones are the same book:
/// several instances of the daemon on one PostgreSQL database.
#[derive(Clone)]
pub struct TestStore {
    pub dir: std::sync::Arc<tempfile::TempDir>,
    /// The database and the URL the app is given for it.
    database: Option<std::sync::Arc<(TestDatabase, String)>>,
}

impl TestStore {
    /// A fresh store of the backend the environment chooses.
    pub async fn new() -> TestStore {
        TestStore::of(TestBackend::from_env()).await
    }

    /// A fresh store of `backend`.
    pub async fn of(backend: TestBackend) -> TestStore {
        let dir = std::sync::Arc::new(tempfile::tempdir().expect("temp dir"));
        let database = match backend {
            TestBackend::Sqlite => None,
            TestBackend::Postgres => {
                let database = TestDatabase::create().await;
                let url = database.url().to_string();
                Some(std::sync::Arc::new((database, url)))
            }
        };
        TestStore { dir, database }
    }

    /// `database`, which the app reaches at `url` (e.g. through a relay the test controls).
    pub fn postgres_at(database: TestDatabase, url: String) -> TestStore {
        TestStore {
            dir: std::sync::Arc::new(tempfile::tempdir().expect("temp dir")),
            database: Some(std::sync::Arc::new((database, url))),
        }
    }

    /// The SQLite file of a SQLite store (unused on PostgreSQL).
    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("test.db")
    }

    /// `config` (whose `[store]` names the SQLite file) pointed at this store.
    pub fn configure(&self, config: &str) -> String {
        match &self.database {
            None => config.to_string(),
            Some(_) => {
                assert!(
                    config.contains("[store]\n"),
                    "the test config has no [store] table"
                );
                config.replacen(
                    "[store]\n",
                    &format!("[store]\nbackend = \"postgres\"\nurl_env = \"{TEST_APP_DATABASE_URL_ENV}\"\n"),
                    1,
                )
            }
        }
    }

    /// The variables the configured app reads: `env` and, on PostgreSQL, the database's URL.
    pub fn env(&self, mut env: BTreeMap<String, String>) -> BTreeMap<String, String> {
        if let Some(url) = self.database_url() {
            env.insert(TEST_APP_DATABASE_URL_ENV.to_string(), url.to_string());
        }
        env
    }

    /// The PostgreSQL database's URL (`None` on SQLite).
    pub fn database_url(&self) -> Option<&str> {
        self.database.as_deref().map(|(_, url)| url.as_str())
    }
}

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
/// The Standard Webhooks secret alert POSTs are signed with (`CASHOUT_RECON_ALERT_SECRET`).
pub const ALERT_SECRET: &str = "whsec_YWxlcnQtc2lnbmluZy1zZWNyZXQtZm9yLXRlc3Rz";

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The config every test app starts from: all five kinds plus one provider per generic scheme.
pub fn base_config(db_path: &Path, tupay_url: &str) -> String {
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
base_url = "{tupay_url}"
webhook_secrets_env = ["TUPAY_WEBHOOK_SECRET"]
login_env = "TUPAY_LOGIN"
pass_env = "TUPAY_PASS"
api_signature_env = "TUPAY_API_SIGNATURE"

[[providers]]
id = "mannco"
kind = "mannco"
base_url = "http://127.0.0.1:9"

[[providers]]
id = "pismo"
kind = "pismo"
base_url = "http://127.0.0.1:9"
public_keys = [{{ kid = "rsa-1", pem_file = "{keys}/pismo-rsa-public.pem" }}, {{ kid = "ec-1", pem_file = "{keys}/pismo-ec-public.pem" }}]

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
        db = db_path.display(),
        tupay_url = tupay_url,
        keys = fixtures_dir().join("keys").display(),
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
        ("CASHOUT_RECON_ALERT_SECRET", ALERT_SECRET),
        ("TUPAY_LOGIN", "tupay-login"),
        ("TUPAY_PASS", "tupay-pass"),
        ("TUPAY_API_SIGNATURE", "tupay-api-signature-key"),
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
    /// The SQLite file (SQLite-only tests read it).
    pub db_path: PathBuf,
    pub store: TestStore,
    /// Tupay's status endpoint (every cash-out is 1 Completed, PEN 250.75); held so it
    /// serves for as long as the app runs.
    pub _tupay: wiremock::MockServer,
    join: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// What the Tupay status mock answers for every cash-out.
pub const TUPAY_STATUS_AMOUNT: &str = "250.75";

/// A Tupay status endpoint (`POST /v3/cashout/status`) answering 1 Completed for any id,
/// so thin notifications are resolved end to end.
pub async fn tupay_status_mock() -> wiremock::MockServer {
    use wiremock::matchers::{method, path};
    let server = wiremock::MockServer::start().await;
    wiremock::Mock::given(method("POST"))
        .and(path("/v3/cashout/status"))
        .respond_with(wiremock::ResponseTemplate::new(200).set_body_raw(
            format!(
                r#"{{"cashout_status":1,"cashout_status_description":"Completed","rejection_code":null,"rejection_reason":null,"amount":{TUPAY_STATUS_AMOUNT},"currency":"PEN"}}"#
            ),
            "application/json",
        ))
        .mount(&server)
        .await;
    server
}

/// Starts the app on the base config.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|config| config).await
}

/// Starts the app on the base config as changed by `edit`.
pub async fn spawn_app_with(edit: impl FnOnce(String) -> String) -> TestApp {
    spawn_app_in(TestStore::new().await, edit).await
}

/// Starts the app on the base config, on a SQLite file whatever the environment chooses.
pub async fn spawn_sqlite_app() -> TestApp {
    spawn_sqlite_app_with(|config| config).await
}

/// Starts the app on the base config as changed by `edit`, on a SQLite file whatever the
/// environment chooses (tests of the file itself).
pub async fn spawn_sqlite_app_with(edit: impl FnOnce(String) -> String) -> TestApp {
    spawn_app_in(TestStore::of(TestBackend::Sqlite).await, edit).await
}

/// Starts the app on `store` (an existing one, for restarts).
pub async fn spawn_app_in(store: TestStore, edit: impl FnOnce(String) -> String) -> TestApp {
    let db_path = store.db_path();
    let tupay = tupay_status_mock().await;
    let text = store.configure(&edit(base_config(&db_path, &tupay.uri())));
    let settings =
        // Relative paths (the default reports.dir) land in the temp dir.
        Settings::parse(&text, store.dir.path(), &store.env(test_env())).expect("test config is valid");
    let app = App::build_with(
        settings,
        AppOptions {
            handle_signals: false,
            noop_route: false,
            background_jobs: true,
        },
    )
    .await
    .expect("app builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let handle = app.handle();
    let state = app.state();
    let join = tokio::spawn(app.run_until_stopped());
    TestApp {
        address,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client"),
        handle,
        state,
        db_path,
        store,
        _tupay: tupay,
        join: Some(join),
    }
}

impl TestApp {
    /// Posts a webhook with the given headers and raw body.
    pub async fn post_webhook(
        &self,
        provider: &str,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> (u16, Value) {
        let mut request = self
            .client
            .post(format!("{}/webhooks/{provider}", self.address))
            .body(body.to_vec());
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.expect("webhook request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
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
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
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
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// `GET /api/v1/cashouts/{provider}/{ref}` as admin.
    pub async fn get_cashout(&self, provider: &str, provider_ref: &str) -> (u16, Value) {
        self.get_with_token(
            &format!("/api/v1/cashouts/{provider}/{provider_ref}"),
            Some(ADMIN_TOKEN),
        )
        .await
    }

    /// Waits until `check` holds for the cash-out, or fails after `deadline`.
    pub async fn wait_for_cashout(
        &self,
        provider: &str,
        provider_ref: &str,
        deadline: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
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

    /// Stops like [`TestApp::stop`] and hands back its store (restarts).
    pub async fn stop_keeping_store(mut self) -> TestStore {
        self.handle.stop(true).await;
        if let Some(join) = self.join.take() {
            let _ = join.await;
        }
        self.store
    }

    /// Open alerts (`GET /api/v1/alerts?open=true`), newest first.
    pub async fn open_alerts(&self) -> Vec<Value> {
        let (status, body) = self
            .get_with_token("/api/v1/alerts?open=true&limit=1000", Some(ADMIN_TOKEN))
            .await;
        assert_eq!(status, 200, "{body}");
        body["items"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until an open alert of `kind` and `subject` is listed, or fails after `deadline`.
    pub async fn wait_for_open_alert(
        &self,
        kind: &str,
        subject: &str,
        deadline: Duration,
    ) -> Value {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let alerts = self.open_alerts().await;
            if let Some(alert) = alerts
                .iter()
                .find(|a| a["kind"] == kind && a["subject"] == subject)
            {
                return alert.clone();
            }
            if tokio::time::Instant::now() >= until {
                panic!("no open {kind} alert for {subject} within {deadline:?}; open: {alerts:?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Unix seconds now.
pub fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

// ---------------------------------------------------------------------------------------
// Signed webhook requests, one helper per provider kind and generic scheme. Each returns
// the headers a genuine sender would add (or, for Tupay, the signed form body).
// ---------------------------------------------------------------------------------------

/// The `apikey` header of test Fiserv webhooks (part of the signed bytes).
pub const FISERV_API_KEY: &str = "fiserv-test-api-key";

/// Headers (name, value) to send with a webhook.
pub type Headers = Vec<(&'static str, String)>;

/// Fiserv (SPEC §4.1): `x-hmac-signature` = Base64(HMAC-SHA256(secret, apikey ‖ x-timestamp ‖ body ‖ path)).
pub fn fiserv_headers(body: &[u8], path: &str, secret: &str, ts: i64, request_id: &str) -> Headers {
    use cashout_recon::verify::hmac::{fiserv_default, sign};
    use cashout_recon::verify::{InboundRequest, RequestHeaders};
    let ts = ts.to_string();
    let headers = RequestHeaders::from([
        ("apikey", FISERV_API_KEY),
        ("x-timestamp", ts.as_str()),
        ("x-request-id", request_id),
    ]);
    let request = InboundRequest {
        path,
        headers: &headers,
        body,
    };
    let signature = sign(&fiserv_default(None, 300), secret.as_bytes(), &request)
        .expect("sign a fiserv webhook");
    vec![
        ("content-type", "application/json".to_string()),
        ("apikey", FISERV_API_KEY.to_string()),
        ("x-timestamp", ts),
        ("x-request-id", request_id.to_string()),
        ("x-hmac-signature", signature),
    ]
}

/// SimPay (SPEC §4.2): `hmac` = lowercase hex HMAC-SHA512(secret, body).
pub fn simpay_headers(body: &[u8], secret: &str) -> Headers {
    use cashout_recon::verify::hmac::{sign, simpay_default};
    use cashout_recon::verify::{InboundRequest, RequestHeaders};
    let headers = RequestHeaders::new();
    let request = InboundRequest {
        path: "/webhooks/simpay",
        headers: &headers,
        body,
    };
    let signature =
        sign(&simpay_default(), secret.as_bytes(), &request).expect("sign a simpay webhook");
    vec![
        ("content-type", "application/json".to_string()),
        ("hmac", signature),
    ]
}

/// The content type of Tupay notifications.
pub fn tupay_headers() -> Headers {
    vec![(
        "content-type",
        "application/x-www-form-urlencoded".to_string(),
    )]
}

/// A Tupay thin notification (SPEC §4.3) whose `control` is signed with `secret`
/// (uppercase hex HMAC-SHA256(secret, "Be4" ‖ external_id ‖ "Bo7")).
pub fn tupay_notification(cashout_id: &str, external_id: &str, secret: &str) -> Vec<u8> {
    let control =
        cashout_recon::verify::form_control::control(secret.as_bytes(), "Be4", external_id, "Bo7");
    serde_urlencoded::to_string([
        ("date", "2026-11-20 12:05:31"),
        ("bank_reference_id", "BCP-000981234"),
        ("comments", "Retiro semanal"),
        ("external_id", external_id),
        ("control", control.as_str()),
        ("cashout_id", cashout_id),
        ("status_reason", ""),
    ])
    .expect("encode a tupay notification")
    .into_bytes()
}

/// A key Pismo signs its webhook JWTs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PismoKey {
    /// The RSA key configured as kid `rsa-1` (RS256).
    Rsa,
    /// The P-256 key configured as kid `ec-1` (ES256).
    Ec,
    /// An unrelated RSA key presented under kid `rsa-1`.
    WrongRsa,
    /// An unrelated P-256 key presented under kid `ec-1`.
    WrongEc,
}

impl PismoKey {
    fn parts(self) -> (&'static str, &'static str, jsonwebtoken::Algorithm) {
        use jsonwebtoken::Algorithm::{ES256, RS256};
        match self {
            PismoKey::Rsa => ("pismo-rsa-private.pem", "rsa-1", RS256),
            PismoKey::Ec => ("pismo-ec-private.pem", "ec-1", ES256),
            PismoKey::WrongRsa => ("other-rsa-private.pem", "rsa-1", RS256),
            PismoKey::WrongEc => ("other-ec-private.pem", "ec-1", ES256),
        }
    }
}

/// Pismo (SPEC §4.5): `x-pismo-signature` = JWT with `kid`, `iat` and `body_sha256`.
pub fn pismo_headers(body: &[u8], key: PismoKey, iat: i64) -> Headers {
    let (file, kid, algorithm) = key.parts();
    let pem =
        std::fs::read_to_string(fixtures_dir().join("keys").join(file)).expect("read a test key");
    let token = cashout_recon::verify::jwt::sign(&pem, kid, algorithm, body, iat)
        .expect("sign a pismo webhook");
    vec![
        ("content-type", "application/json".to_string()),
        ("x-pismo-signature", token),
    ]
}

/// Standard Webhooks (SPEC §4.6): `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64>`.
pub fn standard_webhooks_headers(body: &[u8], secret: &str, id: &str, ts: i64) -> Headers {
    let signature = cashout_recon::verify::standard_webhooks::sign(secret, id, ts, body)
        .expect("sign a standard webhook");
    vec![
        ("content-type", "application/json".to_string()),
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", signature),
    ]
}

/// Stripe (SPEC §4.6): `Stripe-Signature: t=…,v1=<hex HMAC-SHA256(secret, t.body)>`.
pub fn stripe_headers(body: &[u8], secret: &str, ts: i64) -> Headers {
    vec![
        ("content-type", "application/json".to_string()),
        (
            "stripe-signature",
            cashout_recon::verify::stripe::sign(secret, ts, body),
        ),
    ]
}

/// The generic `hmac` scheme of provider `fiserv-hmac`: `x-signature` = hex
/// HMAC-SHA512(secret, x-ts "." body), request id in `x-event-id`.
pub fn hmac_headers(body: &[u8], secret: &str, ts: i64, event_id: &str) -> Headers {
    use cashout_recon::verify::hmac::{sign, HmacAlgorithm, HmacSpec, SignatureEncoding};
    use cashout_recon::verify::{InboundRequest, RequestHeaders};
    let spec = HmacSpec {
        header: "x-signature".to_string(),
        algorithm: HmacAlgorithm::Sha512,
        encoding: SignatureEncoding::Hex,
        template: "{header:x-ts}.{body}".to_string(),
        timestamp_header: Some("x-ts".to_string()),
        id_header: Some("x-event-id".to_string()),
        signed_url: None,
        tolerance_secs: 300,
    };
    let ts = ts.to_string();
    let headers = RequestHeaders::from([("x-ts", ts.as_str())]);
    let request = InboundRequest {
        path: "/webhooks/fiserv-hmac",
        headers: &headers,
        body,
    };
    let signature = sign(&spec, secret.as_bytes(), &request).expect("sign a generic hmac webhook");
    vec![
        ("content-type", "application/json".to_string()),
        ("x-ts", ts),
        ("x-event-id", event_id.to_string()),
        ("x-signature", signature),
    ]
}

// ---------------------------------------------------------------------------------------
// Webhook bodies, exactly as the providers write them (amounts as raw JSON text).
// ---------------------------------------------------------------------------------------

/// A Fiserv Pix webhook body (SPEC §4.1).
#[derive(Clone, Debug)]
pub struct FiservBody {
    pub txid: String,
    pub status: String,
    /// Raw JSON: `"1234567.89"` (a string) or `1234567.89` (a number).
    pub amount: String,
    pub currency: String,
    pub created_at: String,
}

impl FiservBody {
    /// Status `status` (raw JSON) of `txid`, amount "1234567.89" BRL.
    pub fn new(txid: &str, status: u8) -> FiservBody {
        FiservBody {
            txid: txid.to_string(),
            status: status.to_string(),
            amount: "\"1234567.89\"".to_string(),
            currency: "BRL".to_string(),
            created_at: "2026-11-20T12:00:00Z".to_string(),
        }
    }

    pub fn amount(mut self, raw_json: &str) -> FiservBody {
        self.amount = raw_json.to_string();
        self
    }

    pub fn currency(mut self, code: &str) -> FiservBody {
        self.currency = code.to_string();
        self
    }

    pub fn created_at(mut self, rfc3339: &str) -> FiservBody {
        self.created_at = rfc3339.to_string();
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let FiservBody {
            txid,
            status,
            amount,
            currency,
            created_at,
        } = self;
        let fail_reason = if status == "4" { "5" } else { "null" };
        let minute = status.chars().rfind(char::is_ascii_digit).unwrap_or('0');
        format!(
            r#"{{"txid":"{txid}","status":{status},"failReason":{fail_reason},"amount":{amount},"currency":"{currency}","endToEnd":null,"confirmationKey":null,"createdAt":"{created_at}","updatedAt":"2026-11-20T12:1{minute}:00Z"}}"#
        )
        .into_bytes()
    }
}

/// A SimPay webhook body (SPEC §4.2): `event_type` like `PIX_CASHOUT_SUCCESS`, `status`
/// like `SUCCESS` (or `None` for a null status), amount as raw JSON.
pub fn simpay_body(
    event_type: &str,
    transaction_id: &str,
    status: Option<&str>,
    amount: &str,
) -> Vec<u8> {
    let status = status.map_or_else(|| "null".to_string(), |s| format!("\"{s}\""));
    format!(
        r#"{{"type":"{event_type}","data":{{"transaction_id":{transaction_id},"status":{status},"amount":{amount},"fee":1.99,"end_to_end":null,"key":"144******47","tag":"ord-{transaction_id}","payment_date":null,"error":null}}}}"#
    )
    .into_bytes()
}

/// A Pismo event body (SPEC §4.5); `amount` and `currency` as raw JSON.
pub fn pismo_body(
    event_id: &str,
    authorization_id: &str,
    new_status: &str,
    amount: &str,
    currency: &str,
) -> Vec<u8> {
    format!(
        r#"{{"event_id":"{event_id}","domain":"integrated-payments","event_type":"cashout-status-change","schema_version":1,"org_id":"TN-test","cid":"cid-{event_id}","timestamp":"2026-11-20T12:03:10.482Z","data":{{"account_id":102345678,"authorization_id":"{authorization_id}","old_status":null,"new_status":"{new_status}","amount":{amount},"currency":{currency},"idempotency_key":"idem-{authorization_id}"}}}}"#
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------------------
// Small assertions and waits shared by the test modules.
// ---------------------------------------------------------------------------------------

/// The `event_id` of an answer, asserting it is a non-empty string.
pub fn event_id_of(answer: &Value) -> String {
    answer["event_id"]
        .as_str()
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| panic!("answer has no event_id: {answer}"))
        .to_string()
}

/// Asserts a 401 with the given SPEC §2.1 code.
#[track_caller]
pub fn assert_rejected(answer: &(u16, Value), code: &str, case: &str) {
    assert_eq!(
        answer.0, 401,
        "{case}: expected 401 {code}, got {} {}",
        answer.0, answer.1
    );
    assert_eq!(
        answer.1["code"], code,
        "{case}: expected code {code}, got {}",
        answer.1
    );
    assert!(
        answer.1["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{case}: a rejection says why: {}",
        answer.1
    );
}

/// Asserts `200 {"status":"accepted","event_id":…}` and returns the event id.
#[track_caller]
pub fn assert_accepted(answer: &(u16, Value), case: &str) -> String {
    assert_eq!(
        answer.0, 200,
        "{case}: expected 200 accepted, got {} {}",
        answer.0, answer.1
    );
    assert_eq!(answer.1["status"], "accepted", "{case}: {}", answer.1);
    event_id_of(&answer.1)
}

impl TestApp {
    /// Waits until `provider` has a queued status fetch for `provider_ref`, or fails after
    /// `deadline`; returns the queued reason.
    pub async fn wait_for_status_fetch(
        &self,
        provider: &str,
        provider_ref: &str,
        deadline: Duration,
    ) -> FetchReason {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let queued = self
                .state
                .store
                .pending_status_fetches(provider.into(), 1000)
                .await
                .expect("read the fetch queue");
            if let Some((_, reason)) = queued.iter().find(|(r, _)| r == provider_ref) {
                return *reason;
            }
            if tokio::time::Instant::now() >= until {
                panic!("no status fetch of {provider}/{provider_ref} was queued in {deadline:?}; queue: {queued:?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `GET /metrics` as text.
    pub async fn metrics_text(&self) -> String {
        let response = self
            .client
            .get(format!("{}/metrics", self.address))
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(response.status().as_u16(), 200, "/metrics answers 200");
        response.text().await.expect("metrics text")
    }
}
