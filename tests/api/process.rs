//! Real `cashout-recon serve` processes for the tests that kill them (`kill -9`): spawned
//! on a config file, waited for until healthy, killed and reaped on drop; and the load of
//! signed Fiserv webhooks that runs until the kill, recording every acknowledgement.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::helpers::FISERV_SECRET;

/// The `apikey` header every test webhook carries (part of the signed bytes).
pub const API_KEY: &str = "crash-test-api-key";
/// The provider the load's webhooks go to (`fiserv`, secret in `FISERV_WEBHOOK_SECRET`).
pub const WEBHOOK_PATH: &str = "/webhooks/fiserv";

/// A spawned `cashout-recon serve`; killed (SIGKILL) and reaped on drop, so a failing
/// test never leaks the process.
pub struct Daemon {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Daemon {
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// SIGKILL (`Child::kill` on unix), then reap.
    pub fn kill_9(&mut self) -> ExitStatus {
        self.child.kill().expect("SIGKILL the daemon");
        self.child.wait().expect("reap the killed daemon")
    }

    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A port that was free a moment ago (bound to port 0, read, released).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local address").port()
}

pub enum Startup {
    Healthy,
    Exited(ExitStatus),
    TimedOut,
}

/// Polls `GET /healthz` until 200 `ok`, the child exits, or the deadline passes.
pub async fn wait_until_healthy(
    daemon: &mut Daemon,
    client: &reqwest::Client,
    deadline: Duration,
) -> Startup {
    let until = Instant::now() + deadline;
    loop {
        if let Ok(Some(status)) = daemon.child.try_wait() {
            return Startup::Exited(status);
        }
        let answer = client
            .get(daemon.url("/healthz"))
            .timeout(Duration::from_secs(1))
            .send()
            .await;
        if let Ok(response) = answer {
            if response.status().as_u16() == 200
                && response.text().await.unwrap_or_default() == "ok"
            {
                return Startup::Healthy;
            }
        }
        if Instant::now() >= until {
            return Startup::TimedOut;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Spawns `cashout-recon serve --config <config>` with `env` (and `RUST_LOG=warn`), its
/// stderr in `log`.
pub fn spawn_serve(config: &Path, env: &[(String, String)], port: u16, log: PathBuf) -> Daemon {
    let stderr = File::create(&log).expect("create the daemon log");
    let child = Command::new(env!("CARGO_BIN_EXE_cashout-recon"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr))
        .spawn()
        .expect("spawn cashout-recon serve");
    Daemon { child, port, log }
}

/// Writes a config with `write_config(port)` and serves it, healthy within 30 s. A port
/// taken between the probe and the daemon's bind makes the daemon exit; then another port
/// is tried.
pub async fn start_serving(
    dir: &Path,
    port: Option<u16>,
    env: &[(String, String)],
    client: &reqwest::Client,
    write_config: impl Fn(u16) -> PathBuf,
) -> Daemon {
    let mut port = port.unwrap_or_else(free_port);
    for attempt in 1..=5 {
        let config = write_config(port);
        let log = dir.join(format!("daemon-{port}-{attempt}.log"));
        let mut daemon = spawn_serve(&config, env, port, log);
        match wait_until_healthy(&mut daemon, client, Duration::from_secs(30)).await {
            Startup::Healthy => return daemon,
            Startup::Exited(status) => {
                eprintln!("daemon on port {port} exited at start ({status}); retrying on another port:\n{}", daemon.log_tail());
                port = free_port();
            }
            Startup::TimedOut => panic!(
                "daemon on port {port} not healthy within 30 s:\n{}",
                daemon.log_tail()
            ),
        }
    }
    panic!("the daemon could not start on any of 5 ports");
}

/// `GET /metrics` of a daemon, as text.
pub async fn metrics_text(daemon: &Daemon, client: &reqwest::Client) -> String {
    let response = client
        .get(daemon.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(response.status().as_u16(), 200, "/metrics answers 200");
    response.text().await.expect("metrics text")
}

/// The value of the sample `name{labels}` in a Prometheus text exposition (`labels` as
/// written, e.g. `job="poll:fiserv"`); `None` when absent.
pub fn metric_value(text: &str, name: &str, labels: &str) -> Option<f64> {
    let key = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&key))
        .and_then(|value| value.trim().parse().ok())
}

/// Base64(HMAC-SHA256(secret, apikey ‖ x-timestamp ‖ body ‖ path)), computed here
/// independently of the crate's signer.
pub fn fiserv_signature(timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(FISERV_SECRET.as_bytes()).expect("HMAC key");
    mac.update(API_KEY.as_bytes());
    mac.update(timestamp.as_bytes());
    mac.update(body);
    mac.update(WEBHOOK_PATH.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// A signed "Requested" webhook for a new cash-out `txid`; the request id is unique too.
pub fn signed_webhook(
    client: &reqwest::Client,
    base: &str,
    txid: &str,
    cents: u64,
) -> reqwest::RequestBuilder {
    let now = chrono::Utc::now();
    let body = serde_json::json!({
        "txid": txid,
        "status": 1,
        "failReason": null,
        "amount": format!("{}.{:02}", cents / 100, cents % 100),
        "currency": "BRL",
        "endToEnd": null,
        "confirmationKey": null,
        "createdAt": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "updatedAt": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    })
    .to_string();
    let timestamp = now.timestamp().to_string();
    let signature = fiserv_signature(&timestamp, body.as_bytes());
    client
        .post(format!("{base}{WEBHOOK_PATH}"))
        .header("content-type", "application/json")
        .header("apikey", API_KEY)
        .header("x-timestamp", timestamp)
        .header("x-request-id", format!("req-{txid}"))
        .header("x-hmac-signature", signature)
        .body(body)
}

/// One webhook answered 2xx: what must be in the store afterwards.
#[derive(Clone, Debug)]
pub struct Acknowledged {
    pub event_id: String,
    pub txid: String,
}

/// What the senders share.
pub struct Load {
    pub acknowledged: Mutex<Vec<Acknowledged>>,
    /// Answers that were not `200 accepted` while the daemon was alive.
    pub unexpected: Mutex<Vec<String>>,
    pub started: AtomicUsize,
    pub finished: AtomicUsize,
    /// Set at the kill: transport errors are expected from then on, the senders stop.
    pub killed: AtomicBool,
    /// Notified at the `kill_after`th acknowledgement.
    pub threshold: Notify,
    kill_after: usize,
}

impl Load {
    /// A load whose `threshold` is notified at the `kill_after`th acknowledgement.
    pub fn new(kill_after: usize) -> Load {
        Load {
            acknowledged: Mutex::default(),
            unexpected: Mutex::default(),
            started: AtomicUsize::default(),
            finished: AtomicUsize::default(),
            killed: AtomicBool::default(),
            threshold: Notify::new(),
            kill_after,
        }
    }
}

pub async fn send_until_killed(
    load: Arc<Load>,
    client: reqwest::Client,
    base: String,
    sender: usize,
) {
    for seq in 0u64.. {
        if load.killed.load(Ordering::SeqCst) {
            return;
        }
        let txid = format!("crash-{sender}-{seq}");
        load.started.fetch_add(1, Ordering::SeqCst);
        let answer = signed_webhook(&client, &base, &txid, 1_000 + seq)
            .send()
            .await;
        let answer = match answer {
            Ok(response) => {
                let status = response.status().as_u16();
                response.text().await.map(|text| (status, text))
            }
            Err(err) => Err(err),
        };
        load.finished.fetch_add(1, Ordering::SeqCst);
        match answer {
            Ok((status, text)) => {
                let body: Value =
                    serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
                let event_id = body["event_id"].as_str();
                match (status, body["status"].as_str(), event_id) {
                    (200, Some("accepted"), Some(event_id)) => {
                        let count = {
                            let mut acknowledged = load.acknowledged.lock().expect("ack list");
                            acknowledged.push(Acknowledged {
                                event_id: event_id.to_string(),
                                txid,
                            });
                            acknowledged.len()
                        };
                        if count == load.kill_after {
                            load.threshold.notify_one();
                        }
                    }
                    _ => load
                        .unexpected
                        .lock()
                        .expect("list")
                        .push(format!("{txid}: {status} {text}")),
                }
            }
            // Connections reset by the kill are expected; before it, nothing may fail.
            Err(err) if !load.killed.load(Ordering::SeqCst) => {
                load.unexpected
                    .lock()
                    .expect("list")
                    .push(format!("{txid}: transport error {err}"));
            }
            Err(_) => return,
        }
    }
}
