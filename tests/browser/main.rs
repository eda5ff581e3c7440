//! Browser tests of the ops console: the real daemon on port 0 driven by a real headless
//! Chromium through chromedriver (Debian's `chromium` and `chromium-driver`; `.ci/run`
//! installs them). Without chromedriver these tests fail: they never skip.
//!
//! They also take the README's screenshots (`docs/console-overview.png`,
//! `docs/console-cashout.png`) at 1280 px.

#[path = "../api/helpers.rs"]
#[allow(dead_code)]
mod helpers;
#[path = "../api/test_database.rs"]
#[allow(dead_code)]
mod test_database;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{ClientBuilder, Locator};
use helpers::{
    assert_accepted, fiserv_headers, now_unix, spawn_app_with, FiservBody, TestApp, ADMIN_TOKEN,
    FISERV_SECRET, REPORTS_TOKEN,
};
use sha2::{Digest, Sha256};

/// How long the browser may take to show what a step waits for (a busy 2-core machine).
const WITHIN: Duration = Duration::from_secs(30);

/// A headless Chromium session and the chromedriver serving it (killed on drop).
struct Browser {
    client: fantoccini::Client,
    _driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Starts chromedriver on a free loopback port and opens a headless session at 1280 px.
async fn browser() -> Browser {
    let port = free_port();
    let driver = tokio::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|err| {
            panic!(
                "chromedriver cannot be started ({err}): install Debian's chromium and \
                 chromium-driver (`apt-get install -y chromium chromium-driver`; .ci/run does)"
            )
        });
    let status = format!("http://127.0.0.1:{port}/status");
    let until = tokio::time::Instant::now() + WITHIN;
    loop {
        let ready = reqwest::get(&status)
            .await
            .ok()
            .filter(|r| r.status().is_success());
        if ready.is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "chromedriver did not answer on port {port} within {WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Two rustls providers are linked (fantoccini's aws-lc-rs, reqwest's ring): pick one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let profile = tempfile::tempdir().expect("a fresh browser profile");
    let mut options = serde_json::json!({
        "args": [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=1280,900",
            format!("--user-data-dir={}", profile.path().display()),
        ]
    });
    if Path::new("/usr/bin/chromium").exists() {
        options["binary"] = "/usr/bin/chromium".into();
    }
    let mut capabilities = serde_json::Map::new();
    capabilities.insert("goog:chromeOptions".to_string(), options);
    let client = ClientBuilder::rustls()
        .expect("a WebDriver client")
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a headless Chromium session");
    client
        .set_window_size(1280, 900)
        .await
        .expect("the window at 1280 px");
    Browser {
        client,
        _driver: driver,
        _profile: profile,
    }
}

impl Browser {
    async fn goto(&self, app: &TestApp, path: &str) {
        self.client
            .goto(&format!("{}{path}", app.address))
            .await
            .unwrap_or_else(|err| panic!("open {path}: {err}"));
    }

    /// Waits for an element, failing after [`WITHIN`].
    async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(WITHIN)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|err| panic!("no {css} within {WITHIN:?}: {err}"))
    }

    /// Waits until the page's heading starts with `prefix` (the page a click leads to has
    /// loaded, not the one it left), failing after [`WITHIN`]; returns the heading.
    async fn heading(&self, prefix: &str) -> String {
        let until = tokio::time::Instant::now() + WITHIN;
        loop {
            let text = match self.client.find(Locator::Css("h1")).await {
                Ok(h1) => h1.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if text.starts_with(prefix) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "no heading starting with {prefix:?} within {WITHIN:?} (last: {text:?})"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn text(&self) -> String {
        self.find("body")
            .await
            .text()
            .await
            .expect("the page's text")
    }

    async fn path(&self) -> String {
        self.client
            .current_url()
            .await
            .expect("the current URL")
            .path()
            .to_string()
    }

    /// Signs in through the form with `token`.
    async fn sign_in(&self, app: &TestApp, token: &str) {
        self.goto(app, "/console").await;
        // Without a session the console sends the browser to the sign-in page.
        let field = self.find("input[name=token]").await;
        assert_eq!(self.path().await, "/console/sign-in");
        field.send_keys(token).await.expect("type the token");
        self.find("form[action='/console/sign-in'] button[type=submit]")
            .await
            .click()
            .await
            .expect("submit the sign-in");
    }

    /// Saves a PNG of the viewport to `docs/{name}`.
    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("a screenshot");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docs")
            .join(name);
        std::fs::create_dir_all(path.parent().expect("docs")).expect("docs/");
        std::fs::write(&path, png).expect("write the screenshot");
    }

    async fn close(self) {
        let _ = self.client.close().await;
    }
}

/// The base config with fiserv's cash-outs stuck after a second.
async fn app_with_quick_stuck() -> TestApp {
    spawn_app_with(|config| {
        config.replacen(
            "id = \"fiserv\"\n",
            "id = \"fiserv\"\nstuck_after = \"1s\"\n",
            1,
        )
    })
    .await
}

async fn post_fiserv(app: &TestApp, body: &[u8], request_id: &str) -> (u16, serde_json::Value) {
    let headers = fiserv_headers(
        body,
        "/webhooks/fiserv",
        FISERV_SECRET,
        now_unix(),
        request_id,
    );
    app.post_webhook("fiserv", &headers, body).await
}

#[tokio::test]
async fn admin_finds_a_stuck_cash_out_reads_its_timeline_and_reprocesses_a_quarantined_webhook() {
    // Arrange: a pending cash-out (stuck after 1 s), a completed one, a quarantined webhook.
    let app = app_with_quick_stuck().await;
    assert_accepted(
        &post_fiserv(&app, &FiservBody::new("7400101", 1).bytes(), "b1").await,
        "b1",
    );
    assert_accepted(
        &post_fiserv(&app, &FiservBody::new("7400102", 1).bytes(), "b2").await,
        "b2",
    );
    assert_accepted(
        &post_fiserv(&app, &FiservBody::new("7400102", 3).bytes(), "b3").await,
        "b3",
    );
    let quarantined = post_fiserv(
        &app,
        &FiservBody::new("7400103", 3).amount("\"12.345\"").bytes(),
        "b4",
    )
    .await;
    assert_eq!(quarantined.0, 202, "{}", quarantined.1);
    let event_id = quarantined.1["event_id"]
        .as_str()
        .expect("the quarantined event's id")
        .to_string();
    let browser = browser().await;

    // Sign in with the admin token: the overview.
    browser.sign_in(&app, ADMIN_TOKEN).await;
    browser.heading("Overview").await;
    assert_eq!(browser.path().await, "/console");

    // The stuck cash-out shows on fiserv's (red) line once it is a second old.
    let until = tokio::time::Instant::now() + WITHIN;
    let stuck = loop {
        if let Ok(link) = browser
            .client
            .find(Locator::Css("a[href*='stuck=1']"))
            .await
        {
            break link;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "no stuck cash-out on the overview within {WITHIN:?}: {}",
            browser.text().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        browser.client.refresh().await.expect("reload the overview");
    };
    assert!(browser
        .find("tr.alert")
        .await
        .text()
        .await
        .expect("row")
        .contains("fiserv"));
    browser.screenshot("console-overview.png").await;
    stuck.click().await.expect("open the stuck list");

    // The stuck list holds it; its page shows the timeline.
    browser
        .find("a[href='/console/cashouts/fiserv/7400101']")
        .await
        .click()
        .await
        .expect("open the cash-out");
    let timeline = browser.find("#timeline + .scroll table").await;
    let text = timeline.text().await.expect("the timeline");
    assert!(text.contains("webhook"), "{text}");
    assert!(text.contains("pending"), "{text}");
    assert!(text.contains("applied"), "{text}");
    assert!(
        text.contains("current (#0)"),
        "which secret matched: {text}"
    );
    let page = browser.text().await;
    assert!(page.contains("Cash-out fiserv / 7400101"), "{page}");
    browser.screenshot("console-cashout.png").await;

    // The quarantine lists the webhook with its parse error; reprocess it.
    browser
        .find("a[href='/console/quarantine']")
        .await
        .click()
        .await
        .expect("open the quarantine");
    let row = browser
        .find(&format!("a[href='/console/events/{event_id}']"))
        .await;
    assert_eq!(row.text().await.expect("event id"), event_id);
    let quarantine = browser.text().await;
    assert!(
        !quarantine.contains("12.345"),
        "no body on the list: {quarantine}"
    );

    // A forged CSRF token is refused (403) and changes nothing.
    let forged = browser
        .client
        .form(Locator::Css(&format!(
            "form[action='/console/events/{event_id}/reprocess']"
        )))
        .await
        .expect("the reprocess form");
    forged
        .set_by_name("csrf", "forged")
        .await
        .expect("forge the token");
    forged.submit().await.expect("submit the forged form");
    browser.heading("403").await;

    browser.goto(&app, "/console/quarantine").await;
    browser
        .find(&format!(
            "form[action='/console/events/{event_id}/reprocess'] button"
        ))
        .await
        .click()
        .await
        .expect("reprocess");
    let outcome = browser.heading("Reprocessed").await;
    assert_eq!(outcome, "Reprocessed: still quarantined");
    assert!(browser.text().await.contains("It still does not parse"));

    // The event page shows the body only when asked.
    browser
        .goto(&app, &format!("/console/events/{event_id}"))
        .await;
    assert!(!browser.text().await.contains("12.345"));
    browser
        .find("a[href$='?body=1']")
        .await
        .click()
        .await
        .expect("show the body");
    browser.find("pre").await;
    assert!(browser.text().await.contains("12.345"));

    // On a phone the page does not overflow sideways (wide tables scroll in their box).
    browser
        .client
        .set_window_size(400, 860)
        .await
        .expect("a phone-sized window");
    for path in ["/console", "/console/cashouts", "/console/quarantine"] {
        browser.goto(&app, path).await;
        browser.find("main h1").await;
        let fits = browser
            .client
            .execute(
                "return window.innerWidth <= 400 && document.documentElement.scrollWidth <= window.innerWidth",
                vec![],
            )
            .await
            .expect("measure the page");
        assert_eq!(
            fits,
            serde_json::Value::Bool(true),
            "{path} overflows at 400 px"
        );
    }
    browser
        .client
        .set_window_size(1280, 900)
        .await
        .expect("back to 1280 px");

    // Signing out ends the session.
    browser
        .find("form[action='/console/sign-out'] button")
        .await
        .click()
        .await
        .expect("sign out");
    browser.find("input[name=token]").await;
    browser.goto(&app, "/console/cashouts").await;
    browser.find("input[name=token]").await;
    assert_eq!(browser.path().await, "/console/sign-in");
    browser.close().await;
    app.stop().await;
}

#[tokio::test]
async fn the_reports_role_downloads_the_apis_csv_byte_for_byte_and_is_refused_elsewhere() {
    let app = app_with_quick_stuck().await;
    assert_accepted(
        &post_fiserv(&app, &FiservBody::new("7400201", 3).bytes(), "r1").await,
        "r1",
    );
    let browser = browser().await;

    // Sign in with the reports token: the Reports page, nothing else in the navigation.
    browser.sign_in(&app, REPORTS_TOKEN).await;
    browser.heading("Reports").await;
    assert_eq!(browser.path().await, "/console/reports");
    let nav = browser.find("header nav").await.text().await.expect("nav");
    assert_eq!(nav.trim(), "Reports");

    // Generate today's report with the form, then come back to the list.
    browser
        .find("form[action='/console/reports'] button")
        .await
        .click()
        .await
        .expect("generate");
    browser.heading("Report of ").await;
    browser
        .find("main a[href='/console/reports']")
        .await
        .click()
        .await
        .expect("back to the reports");
    browser.heading("Reports").await;
    let link = browser.find("a[href$='.csv']").await;
    let href = link.attr("href").await.expect("href").expect("a link");

    // The link's bytes (with the browser's session cookie) are the API's, byte for byte.
    let cookie = browser
        .client
        .get_named_cookie("console_session")
        .await
        .expect("the session cookie");
    assert!(cookie.http_only().unwrap_or(false), "HttpOnly");
    let console_csv = app
        .client
        .get(format!("{}{href}", app.address))
        .header("cookie", format!("console_session={}", cookie.value()))
        .send()
        .await
        .expect("download the CSV");
    assert_eq!(console_csv.status().as_u16(), 200);
    let console_bytes = console_csv.bytes().await.expect("CSV bytes");
    let date = href
        .trim_start_matches("/console/reports/")
        .trim_end_matches(".csv");
    let api_bytes = app
        .client
        .get(format!("{}/api/v1/reports/{date}.csv", app.address))
        .bearer_auth(REPORTS_TOKEN)
        .send()
        .await
        .expect("the API's CSV")
        .bytes()
        .await
        .expect("API bytes");
    assert_eq!(console_bytes, api_bytes);
    assert!(String::from_utf8_lossy(&console_bytes).contains("7400201"));
    // The list shows that CSV's SHA-256.
    browser.client.refresh().await.expect("reload");
    let listed = browser.find("main table").await.text().await.expect("list");
    let sha = hex::encode(Sha256::digest(&console_bytes));
    assert!(listed.contains(&sha), "{sha} in {listed}");

    // Every admin page answers the 403 page.
    for path in [
        "/console",
        "/console/cashouts",
        "/console/quarantine",
        "/console/alerts",
    ] {
        browser.goto(&app, path).await;
        browser.heading("403").await;
    }
    browser.close().await;
    app.stop().await;
}
