//! PostgreSQL out of reach (issue 10): while the daemon cannot reach its database a webhook
//! is answered 503 (the provider retries) and `/readyz` 503, and both recover once it is
//! back, without a restart.
//!
//! The shared test server is never stopped: the daemon reaches its own fresh database through
//! a loopback relay the test controls. Down, the relay cuts every open connection and closes
//! each new one at once — what the daemon sees of a stopped or unreachable server.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::helpers::{
    assert_accepted, fiserv_headers, now_unix, spawn_app_in, FiservBody, TestApp, TestStore,
    FISERV_SECRET,
};
use crate::test_database::TestDatabase;

const WITHIN: Duration = Duration::from_secs(30);

/// A loopback TCP relay to the PostgreSQL server that can be cut and restored.
struct Relay {
    port: u16,
    up: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the relay");
        let port = listener.local_addr().expect("relay address").port();
        let (up, watch_up) = watch::channel(true);
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut up = watch_up.clone();
                if !*up.borrow_and_update() {
                    drop(inbound);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = up.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Relay { port, up, task }
    }

    fn cut(&self) {
        self.up.send_replace(false);
    }

    fn restore(&self) {
        self.up.send_replace(true);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The server's address in a `postgres://user:pass@host:port/db` URL.
fn server_of(url: &str) -> SocketAddr {
    let config = tokio_postgres::Config::from_str(url).expect("a connection URL");
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        other => panic!("the outage test needs a TCP test server, not {other:?}"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let host = if host == "localhost" {
        "127.0.0.1".to_string()
    } else {
        host
    };
    SocketAddr::new(host.parse().expect("an IP test server"), port)
}

/// `url` pointed at 127.0.0.1:`port` instead of its server.
fn through(url: &str, port: u16) -> String {
    let authority = url.find("://").expect("a URL-form connection string") + 3;
    let host_start = url[authority..]
        .find('@')
        .map_or(authority, |at| authority + at + 1);
    let host_end = host_start + url[host_start..].find('/').expect("a database in the URL");
    format!("{}127.0.0.1:{port}{}", &url[..host_start], &url[host_end..])
}

async fn post_fiserv(app: &TestApp, txid: &str) -> (u16, serde_json::Value, Option<String>) {
    let body = FiservBody::new(txid, 3).bytes();
    let headers = fiserv_headers(
        &body,
        "/webhooks/fiserv",
        FISERV_SECRET,
        now_unix(),
        &format!("req-{txid}"),
    );
    let mut request = app
        .client
        .post(format!("{}/webhooks/fiserv", app.address))
        .body(body);
    for (name, value) in &headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.expect("webhook request");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    let text = response.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, body, retry_after)
}

/// Polls `/readyz` until it answers `status`, or fails after [`WITHIN`]; returns its body.
async fn wait_for_readyz(app: &TestApp, status: u16) -> String {
    let until = tokio::time::Instant::now() + WITHIN;
    loop {
        let (got, body) = app.get_with_token("/readyz", None).await;
        if got == status {
            return body.as_str().unwrap_or_default().to_string();
        }
        assert!(
            tokio::time::Instant::now() < until,
            "/readyz did not answer {status} within {WITHIN:?}; last: {got} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn postgres_out_of_reach_answers_503_on_webhooks_and_readyz_and_recovers_when_back() {
    // Arrange: a daemon on a fresh database, reached through the relay.
    let database = TestDatabase::create().await;
    let relay = Relay::start(server_of(database.url())).await;
    let url = through(database.url(), relay.port);
    let app = spawn_app_in(TestStore::postgres_at(database, url), |config| config).await;
    wait_for_readyz(&app, 200).await;
    let (status, body, _) = post_fiserv(&app, "7500001").await;
    assert_accepted(&(status, body), "before the outage");

    // Act: the database goes out of reach.
    relay.cut();

    // Assert: webhooks are refused for a retry, acknowledging nothing, and /readyz says why.
    let until = tokio::time::Instant::now() + WITHIN;
    let (status, body, retry_after) = loop {
        let answer = post_fiserv(&app, "7500002").await;
        if answer.0 != 200 || tokio::time::Instant::now() >= until {
            break answer;
        }
        // A connection the relay had not cut yet may still have committed this one.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 503, "while the database is out of reach: {body}");
    assert!(
        retry_after.is_some(),
        "a 503 tells the sender when to retry"
    );
    let (status, body, _) = post_fiserv(&app, "7500003").await;
    assert_eq!(status, 503, "still out of reach: {body}");
    let reason = wait_for_readyz(&app, 503).await;
    assert!(
        reason.contains("store"),
        "/readyz names the store: {reason}"
    );

    // Act: the database is back.
    relay.restore();

    // Assert: ready again without a restart, and the refused webhook is taken on retry.
    wait_for_readyz(&app, 200).await;
    let (status, body, _) = post_fiserv(&app, "7500003").await;
    assert_accepted(&(status, body), "the sender's retry after the outage");
    let (status, cashout) = app.get_cashout("fiserv", "7500003").await;
    assert_eq!(status, 200, "{cashout}");
    app.stop().await;
}
