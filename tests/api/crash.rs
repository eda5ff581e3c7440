//! Crash safety (SPEC §2.1): every webhook answered 2xx survives a `kill -9` of the real binary.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;
use sha2::Sha256;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::helpers::{ADMIN_TOKEN, FISERV_SECRET};

/// Concurrent senders during the load.
const SENDERS: usize = 16;
/// Acknowledged webhooks after which the daemon is killed (requests still in flight).
const KILL_AFTER_ACKS: usize = 300;
/// The `apikey` header every test webhook carries (part of the signed bytes).
const API_KEY: &str = "crash-test-api-key";
const WEBHOOK_PATH: &str = "/webhooks/fiserv";

/// A spawned `cashout-recon serve`; killed (SIGKILL) and reaped on drop, so a failing
/// test never leaks the process.
struct Daemon {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Daemon {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// SIGKILL (`Child::kill` on unix), then reap.
    fn kill_9(&mut self) -> ExitStatus {
        self.child.kill().expect("SIGKILL the daemon");
        self.child.wait().expect("reap the killed daemon")
    }

    fn log_tail(&self) -> String {
        log_tail(&self.log)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A port that was free a moment ago (bound to port 0, read, released).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local address").port()
}

fn write_config(dir: &Path, port: u16) -> PathBuf {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
workers = 2
shutdown_timeout = "5s"

[store]
path = "{db}"

[reports]
dir = "{reports}"

[[providers]]
id = "fiserv"
kind = "fiserv_pix"
base_url = "http://127.0.0.1:9"
webhook_secrets_env = ["FISERV_WEBHOOK_SECRET"]
"#,
        db = dir.join("crash.db").display(),
        reports = dir.join("reports").display(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write the config");
    path
}

enum Startup {
    Healthy,
    Exited(ExitStatus),
    TimedOut,
}

/// Polls `GET /healthz` until 200 `ok`, the child exits, or the deadline passes.
async fn wait_until_healthy(
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

/// Spawns the real binary on the config in `dir` (writing it with `port`, or a fresh free
/// port) and waits for health. A port taken between the probe and the daemon's bind makes
/// the daemon exit; then another port is tried.
async fn start_daemon(dir: &Path, port: Option<u16>, client: &reqwest::Client) -> Daemon {
    let mut port = port.unwrap_or_else(free_port);
    for attempt in 1..=5 {
        let config = write_config(dir, port);
        let log = dir.join(format!("daemon-{port}-{attempt}.log"));
        let stderr = File::create(&log).expect("create the daemon log");
        let child = Command::new(env!("CARGO_BIN_EXE_cashout-recon"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("FISERV_WEBHOOK_SECRET", FISERV_SECRET)
            .env("CASHOUT_RECON_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn cashout-recon serve");
        let mut daemon = Daemon { child, port, log };
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

/// Base64(HMAC-SHA256(secret, apikey ‖ x-timestamp ‖ body ‖ path)), computed here
/// independently of the crate's signer.
fn fiserv_signature(timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(FISERV_SECRET.as_bytes()).expect("HMAC key");
    mac.update(API_KEY.as_bytes());
    mac.update(timestamp.as_bytes());
    mac.update(body);
    mac.update(WEBHOOK_PATH.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// A signed "Requested" webhook for a new cash-out `txid`; the request id is unique too.
fn signed_webhook(
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
struct Acknowledged {
    event_id: String,
    txid: String,
}

/// What the senders share.
#[derive(Default)]
struct Load {
    acknowledged: Mutex<Vec<Acknowledged>>,
    /// Answers that were not `200 accepted` while the daemon was alive.
    unexpected: Mutex<Vec<String>>,
    started: AtomicUsize,
    finished: AtomicUsize,
    killed: AtomicBool,
    threshold: Notify,
}

async fn send_until_killed(load: Arc<Load>, client: reqwest::Client, base: String, sender: usize) {
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
                        if count == KILL_AFTER_ACKS {
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

fn stored_ids(db: &Path, sql: &str) -> BTreeSet<String> {
    let connection = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the store read-only");
    let mut statement = connection.prepare(sql).expect("prepare");
    let ids = statement
        .query_map([], |row| row.get::<_, String>(0))
        .expect("query")
        .collect::<Result<BTreeSet<_>, _>>()
        .expect("rows");
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_webhook_answered_2xx_survives_kill_9_and_restart() {
    // Arrange: the real binary on a temp store.
    let started_at = std::time::Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("crash.db");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(SENDERS)
        .build()
        .expect("client");
    let mut daemon = start_daemon(dir.path(), None, &client).await;

    // Act: concurrent signed webhooks; SIGKILL right after the 300th acknowledgement.
    let load = Arc::new(Load::default());
    let senders: Vec<_> = (0..SENDERS)
        .map(|sender| {
            tokio::spawn(send_until_killed(
                load.clone(),
                client.clone(),
                daemon.url(""),
                sender,
            ))
        })
        .collect();
    if tokio::time::timeout(Duration::from_secs(60), load.threshold.notified())
        .await
        .is_err()
    {
        panic!(
            "only {} webhooks acknowledged in 60 s; unexpected answers: {:?}\n{}",
            load.acknowledged.lock().expect("ack list").len(),
            load.unexpected.lock().expect("list"),
            daemon.log_tail()
        );
    }
    load.killed.store(true, Ordering::SeqCst);
    let in_flight = load.started.load(Ordering::SeqCst) - load.finished.load(Ordering::SeqCst);
    let acknowledged_at_kill = load.acknowledged.lock().expect("ack list").len();
    let exit = daemon.kill_9();
    for sender in senders {
        tokio::time::timeout(Duration::from_secs(30), sender)
            .await
            .expect("senders stop once the daemon is gone")
            .expect("sender task");
    }
    let acknowledged = load.acknowledged.lock().expect("ack list").clone();
    let unexpected = load.unexpected.lock().expect("list").clone();
    assert!(
        unexpected.is_empty(),
        "answers other than 200 accepted before the kill: {unexpected:?}"
    );
    assert!(
        in_flight > 0,
        "the kill should land while requests are in flight"
    );
    let port = daemon.port;
    drop(daemon);

    // Restart on the same config and store.
    let daemon = start_daemon(dir.path(), Some(port), &client).await;

    // Assert: every acknowledged event and its cash-out is in the store.
    let events = stored_ids(&db, "SELECT event_id FROM events");
    let cashouts = stored_ids(
        &db,
        "SELECT provider_ref FROM cashouts WHERE provider = 'fiserv'",
    );
    let lost_events: Vec<&Acknowledged> = acknowledged
        .iter()
        .filter(|a| !events.contains(&a.event_id))
        .collect();
    let lost_cashouts: Vec<&Acknowledged> = acknowledged
        .iter()
        .filter(|a| !cashouts.contains(&a.txid))
        .collect();
    assert!(
        lost_events.is_empty(),
        "{} of {} acknowledged events lost after kill -9, e.g. {:?}",
        lost_events.len(),
        acknowledged.len(),
        &lost_events[..lost_events.len().min(5)]
    );
    assert!(
        lost_cashouts.is_empty(),
        "{} of {} acknowledged cash-outs lost after kill -9, e.g. {:?}",
        lost_cashouts.len(),
        acknowledged.len(),
        &lost_cashouts[..lost_cashouts.len().min(5)]
    );
    // The restarted daemon serves them too (the last acknowledged are the likeliest lost).
    for ack in acknowledged.iter().rev().take(5) {
        let response = client
            .get(daemon.url(&format!("/api/v1/cashouts/fiserv/{}", ack.txid)))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("GET cash-out");
        assert_eq!(
            response.status().as_u16(),
            200,
            "cash-out {} after restart",
            ack.txid
        );
        let body: Value = response.json().await.expect("cash-out JSON");
        let timeline: Vec<&str> = body["events"]
            .as_array()
            .map(|events| {
                events
                    .iter()
                    .filter_map(|e| e["event_id"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            timeline.contains(&ack.event_id.as_str()),
            "event {} missing from {body}",
            ack.event_id
        );
    }

    // And it accepts new webhooks.
    let response = signed_webhook(&client, &daemon.url(""), "crash-after-restart", 4_242)
        .send()
        .await
        .expect("webhook after restart");
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("webhook answer JSON");
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("accepted")),
        "webhook after restart: {body}"
    );

    eprintln!(
        "crash test: {} acknowledged ({acknowledged_at_kill} at the kill, {in_flight} in flight), daemon {exit}, \
         {} events stored, all present after restart; {:.1} s",
        acknowledged.len(),
        events.len(),
        started_at.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_webhooks_and_exits_cleanly() {
    // Arrange: the real binary with webhooks in flight.
    let dir = tempfile::tempdir().expect("temp dir");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let mut daemon = start_daemon(dir.path(), None, &client).await;
    let base = daemon.url("");
    let mut acknowledged = BTreeSet::new();
    for n in 0..10 {
        let txid = format!("before-{n}");
        let answer = signed_webhook(&client, &base, &txid, 500 + n)
            .send()
            .await
            .expect("webhook before SIGTERM");
        assert_eq!(answer.status().as_u16(), 200, "accepted before SIGTERM");
        acknowledged.insert(txid);
    }
    let senders: Vec<_> = (0..20)
        .map(|n| {
            let txid = format!("term-{n}");
            let request = signed_webhook(&client, &base, &txid, 1_000 + n);
            tokio::spawn(async move { (txid, request.send().await.map(|r| r.status().as_u16())) })
        })
        .collect();

    // Act: SIGTERM while they are being answered.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("send SIGTERM");
    for sender in senders {
        if let Ok((txid, Ok(status))) = sender.await {
            if (200..300).contains(&status) {
                acknowledged.insert(txid);
            }
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = daemon.child.try_wait().expect("poll the daemon") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not exit within 20 s of SIGTERM:\n{}",
            daemon.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // Assert: a clean exit, and every acknowledged webhook is in the store.
    assert!(
        status.success(),
        "exit after SIGTERM: {status}\n{}",
        daemon.log_tail()
    );
    let stored = stored_ids(
        &dir.path().join("crash.db"),
        "SELECT provider_ref FROM events",
    );
    assert!(acknowledged.len() >= 10, "{acknowledged:?}");
    let lost: Vec<_> = acknowledged.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
}
