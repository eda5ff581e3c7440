//! The ops console over HTTP: sign-in and sign-out, the cookie's attributes, CSRF, roles,
//! redirects without a session, wrong tokens slowed down and counted.

use std::time::{Duration, Instant};

use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::redirect::Policy;

use crate::helpers::{
    assert_accepted, fiserv_headers, now_unix, spawn_app, FiservBody, TestApp, ADMIN_TOKEN,
    FISERV_SECRET, REPORTS_TOKEN,
};

/// A client that does not follow redirects and keeps the session cookie by hand.
struct Console<'a> {
    app: &'a TestApp,
    client: reqwest::Client,
    cookie: Option<String>,
}

struct Answer {
    status: u16,
    location: Option<String>,
    set_cookie: Option<String>,
    body: String,
}

impl<'a> Console<'a> {
    fn new(app: &'a TestApp) -> Console<'a> {
        Console {
            app,
            client: reqwest::Client::builder()
                .redirect(Policy::none())
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            cookie: None,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let request = match &self.cookie {
            Some(cookie) => request.header(COOKIE, format!("console_session={cookie}")),
            None => request,
        };
        let response = request.send().await.expect("console request");
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (location, set_cookie) = (header(LOCATION), header(SET_COOKIE));
        Answer {
            status: response.status().as_u16(),
            location,
            set_cookie,
            body: response.text().await.unwrap_or_default(),
        }
    }

    async fn get(&self, path: &str) -> Answer {
        self.send(self.client.get(format!("{}{path}", self.app.address)))
            .await
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> Answer {
        self.send(
            self.client
                .post(format!("{}{path}", self.app.address))
                .form(form),
        )
        .await
    }

    /// A sign-in POST of `token` as the browser sends it: the form's CSRF token, fetched
    /// with the sign-in page, and the cookie that page set.
    async fn sign_in_request(&self, token: &str) -> reqwest::RequestBuilder {
        let page = self.get("/console/sign-in").await;
        assert_eq!(page.status, 200, "{}", page.body);
        let csrf = field_value(&page.body, "csrf");
        let cookie = page
            .set_cookie
            .as_deref()
            .and_then(|c| c.split(';').next())
            .filter(|pair| pair.starts_with("console_sign_in="))
            .expect("the sign-in form's cookie")
            .to_string();
        self.client
            .post(format!("{}/console/sign-in", self.app.address))
            .header(COOKIE, cookie)
            .form(&[("csrf", csrf.as_str()), ("token", token)])
    }

    /// Signs in with `token` and keeps the session cookie; returns the answer.
    async fn sign_in(&mut self, token: &str) -> Answer {
        let answer = self.send(self.sign_in_request(token).await).await;
        if let Some(cookie) = &answer.set_cookie {
            let value = cookie
                .split(';')
                .next()
                .and_then(|pair| pair.strip_prefix("console_session="))
                .expect("the session cookie");
            self.cookie = Some(value.to_string());
        }
        answer
    }

    /// The CSRF token of the forms on `path`.
    async fn csrf(&self, path: &str) -> String {
        let page = self.get(path).await;
        assert_eq!(page.status, 200, "{path}: {}", page.body);
        field_value(&page.body, "csrf")
    }
}

/// The value of the first form field named `name` in `html`.
fn field_value(html: &str, name: &str) -> String {
    let marker = format!(r#"name="{name}" value=""#);
    let start = html.find(&marker).expect("a form with that field") + marker.len();
    let end = html[start..].find('"').expect("end of the value") + start;
    html[start..end].to_string()
}

const ADMIN_PAGES: [&str; 8] = [
    "/console",
    "/console/cashouts",
    "/console/cashouts/fiserv/CON0001",
    "/console/mismatches",
    "/console/alerts",
    "/console/quarantine",
    "/console/events/any-event",
    "/console/cashouts?stuck=1&provider=fiserv",
];

async fn one_cashout(app: &TestApp) {
    let body = FiservBody::new("CON0001", 1).bytes();
    let headers = fiserv_headers(&body, "/webhooks/fiserv", FISERV_SECRET, now_unix(), "c1");
    let answer = app.post_webhook("fiserv", &headers, &body).await;
    assert_accepted(&answer, "c1");
}

#[tokio::test]
async fn nothing_of_the_console_is_served_without_a_session_but_the_sign_in_and_its_css() {
    let app = spawn_app().await;
    let console = Console::new(&app);
    let mut paths: Vec<&str> = ADMIN_PAGES.to_vec();
    paths.extend([
        "/console/reports",
        "/console/reports/2026-01-01.csv",
        "/console/reports/2026-01-01/summary",
        "/console/alerts/1",
        "/console/no-such-page",
    ]);
    for path in paths {
        let answer = console.get(path).await;
        assert_eq!(answer.status, 303, "GET {path}");
        assert_eq!(
            answer.location.as_deref(),
            Some("/console/sign-in"),
            "GET {path}"
        );
    }
    for path in [
        "/console/events/any/reprocess",
        "/console/providers/fiserv/poll",
        "/console/reconcile",
        "/console/reports",
        "/console/sign-out",
    ] {
        let answer = console.post(path, &[("csrf", "guess")]).await;
        assert_eq!(answer.status, 303, "POST {path}");
        assert_eq!(
            answer.location.as_deref(),
            Some("/console/sign-in"),
            "POST {path}"
        );
    }
    // A made-up session id is no session either.
    let mut stranger = Console::new(&app);
    stranger.cookie = Some("0".repeat(64));
    assert_eq!(stranger.get("/console").await.status, 303);

    let sign_in = console.get("/console/sign-in").await;
    assert_eq!(sign_in.status, 200);
    assert!(sign_in.body.contains(r#"name="token""#), "{}", sign_in.body);
    let css = console.get("/console/static/console.css").await;
    assert_eq!(css.status, 200);
    assert!(css.body.contains("@media"));
    app.stop().await;
}

#[tokio::test]
async fn signing_in_sets_a_strict_http_only_expiring_cookie_and_signing_out_ends_the_session() {
    let app = spawn_app().await;
    one_cashout(&app).await;
    let mut console = Console::new(&app);

    let answer = console.sign_in(ADMIN_TOKEN).await;
    assert_eq!(answer.status, 303);
    assert_eq!(answer.location.as_deref(), Some("/console"));
    let cookie = answer.set_cookie.expect("a session cookie");
    let attributes: Vec<String> = cookie
        .split(';')
        .map(|a| a.trim().to_ascii_lowercase())
        .collect();
    let value = console.cookie.clone().expect("kept");
    assert_eq!(value.len(), 64, "32 random bytes in hex: {cookie}");
    for expected in [
        "httponly",
        "samesite=strict",
        "path=/console",
        "max-age=28800",
    ] {
        assert!(
            attributes.iter().any(|a| a == expected),
            "{expected} in {cookie}"
        );
    }
    // Plain HTTP here: not Secure (it is over TLS).
    assert!(!attributes.iter().any(|a| a == "secure"), "{cookie}");

    // Every admin page renders with the session.
    for path in ADMIN_PAGES {
        let page = console.get(path).await;
        let expected = if path.contains("any-event") { 404 } else { 200 };
        assert_eq!(page.status, expected, "GET {path}: {}", page.body);
    }
    let overview = console.get("/console").await;
    assert!(overview.body.contains("fiserv"), "{}", overview.body);
    let cashout = console.get("/console/cashouts/fiserv/CON0001").await;
    assert!(cashout.body.contains("Timeline"), "{}", cashout.body);
    assert!(cashout.body.contains("current (#0)"), "{}", cashout.body);
    assert_eq!(app.state.console.len(), 1);

    let csrf = console.csrf("/console").await;
    let out = console.post("/console/sign-out", &[("csrf", &csrf)]).await;
    assert_eq!(out.status, 303);
    assert_eq!(out.location.as_deref(), Some("/console/sign-in"));
    let removal = out.set_cookie.expect("the cookie is cleared");
    assert!(removal.starts_with("console_session=;"), "{removal}");
    assert!(app.state.console.is_empty());
    // The old cookie no longer opens anything.
    let after = console.get("/console").await;
    assert_eq!(after.status, 303);
    app.stop().await;
}

#[tokio::test]
async fn the_cookie_is_secure_when_the_console_is_reached_over_tls() {
    let app = spawn_app().await;
    let console = Console::new(&app);
    // A TLS-terminating proxy in front says so.
    let answer = console
        .send(
            console
                .sign_in_request(ADMIN_TOKEN)
                .await
                .header("x-forwarded-proto", "https"),
        )
        .await;
    assert_eq!(answer.status, 303);
    let cookie = answer.set_cookie.expect("a session cookie");
    assert!(
        cookie
            .split(';')
            .any(|a| a.trim().eq_ignore_ascii_case("secure")),
        "{cookie}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_wrong_token_is_slowed_down_and_counted_without_holding_up_other_requests() {
    let app = spawn_app().await;
    let mut console = Console::new(&app);
    let before = app.state.metrics.console_sign_in_failures.get();

    let started = Instant::now();
    let (wrong, other) = tokio::join!(
        async { console.send(console.sign_in_request("not-it").await).await },
        async {
            // Sent while the wrong token waits: answered before it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let answer = Console::new(&app).get("/console/sign-in").await;
            (answer.status, started.elapsed())
        }
    );
    let waited = started.elapsed();
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    // No session; only a fresh sign-in form's cookie.
    assert!(
        wrong
            .set_cookie
            .as_deref()
            .is_none_or(|c| c.starts_with("console_sign_in=")),
        "{:?}",
        wrong.set_cookie
    );
    assert!(wrong.body.contains("not the admin or the reports token"));
    assert!(
        waited >= Duration::from_millis(500),
        "answered after {waited:?}"
    );
    assert_eq!(other.0, 200);
    assert!(
        other.1 < waited,
        "the other request waited for the wrong token"
    );
    assert_eq!(app.state.metrics.console_sign_in_failures.get(), before + 1);
    let metrics = app.get_with_token("/metrics", None).await.1;
    assert!(
        metrics
            .as_str()
            .unwrap_or_default()
            .contains("cashout_recon_console_sign_in_failures_total 1"),
        "{metrics}"
    );

    // An empty token is wrong too; the right one still works after.
    assert_eq!(
        console.send(console.sign_in_request("").await).await.status,
        401
    );
    assert_eq!(app.state.metrics.console_sign_in_failures.get(), before + 2);
    assert_eq!(console.sign_in(ADMIN_TOKEN).await.status, 303);
    assert_eq!(console.get("/console").await.status, 200);
    app.stop().await;
}

#[tokio::test]
async fn a_post_without_the_sessions_csrf_token_is_refused_with_403_and_does_nothing() {
    let app = spawn_app().await;
    let mut console = Console::new(&app);
    console.sign_in(ADMIN_TOKEN).await;
    let csrf = console.csrf("/console").await;
    let cases: [(&str, &[(&str, &str)]); 4] = [
        ("no token", &[("date", "2026-01-01")]),
        ("a wrong token", &[("csrf", "0000"), ("date", "2026-01-01")]),
        ("an empty token", &[("csrf", ""), ("date", "2026-01-01")]),
        (
            "a made-up token",
            &[("csrf", "f00d"), ("date", "2026-01-01")],
        ),
    ];
    for (case, form) in cases {
        for path in [
            "/console/reconcile",
            "/console/reports",
            "/console/providers/fiserv/poll",
            "/console/events/any/reprocess",
            "/console/sign-out",
        ] {
            let answer = console.post(path, form).await;
            assert_eq!(
                answer.status, 403,
                "POST {path} with {case}: {}",
                answer.body
            );
        }
    }
    // Nothing happened: no report was generated, the session is still there.
    assert!(app
        .state
        .store
        .list_reports()
        .await
        .expect("reports")
        .is_empty());
    assert_eq!(console.get("/console").await.status, 200);
    // With the token, the same action runs (an unknown event is a 404 page).
    let answer = console
        .post("/console/events/any/reprocess", &[("csrf", &csrf)])
        .await;
    assert_eq!(answer.status, 404, "{}", answer.body);
    app.stop().await;
}

#[tokio::test]
async fn the_reports_role_sees_reports_only_and_is_refused_elsewhere_with_403() {
    let app = spawn_app().await;
    let mut console = Console::new(&app);
    let answer = console.sign_in(REPORTS_TOKEN).await;
    assert_eq!(answer.status, 303);
    assert_eq!(answer.location.as_deref(), Some("/console/reports"));

    for path in ADMIN_PAGES {
        let page = console.get(path).await;
        assert_eq!(page.status, 403, "GET {path}: {}", page.body);
        assert!(page.body.contains("Reports page only"), "{path}");
    }
    let reports = console.get("/console/reports").await;
    assert_eq!(reports.status, 200);
    assert!(
        !reports.body.contains("/console/quarantine"),
        "no admin link"
    );
    assert!(!reports.body.contains("Reconcile and regenerate"));
    let csrf = console.csrf("/console/reports").await;
    for path in [
        "/console/reconcile",
        "/console/providers/fiserv/poll",
        "/console/events/any/reprocess",
    ] {
        let answer = console
            .post(path, &[("csrf", &csrf), ("date", "2026-01-01")])
            .await;
        assert_eq!(answer.status, 403, "POST {path}: {}", answer.body);
    }

    // Generating and downloading a report is theirs; the CSV is the API's, byte for byte.
    let today = cashout_recon::report::BusinessDay::containing(
        chrono::Utc::now(),
        app.state.reconciler.timezone(),
    )
    .label();
    let generated = console
        .post("/console/reports", &[("csrf", &csrf), ("date", &today)])
        .await;
    assert_eq!(generated.status, 200, "{}", generated.body);
    let csv = console.get(&format!("/console/reports/{today}.csv")).await;
    assert_eq!(csv.status, 200);
    let api = app
        .client
        .get(format!("{}/api/v1/reports/{today}.csv", app.address))
        .bearer_auth(REPORTS_TOKEN)
        .send()
        .await
        .expect("API CSV");
    assert_eq!(csv.body, api.text().await.expect("CSV text"));
    app.stop().await;
}

#[tokio::test]
async fn the_overview_counts_signature_failures_and_marks_the_provider_that_needs_a_human() {
    let app = spawn_app().await;
    let mut console = Console::new(&app);
    console.sign_in(ADMIN_TOKEN).await;
    let calm = console.get("/console").await;
    assert!(!calm.body.contains(">needs a human<"), "{}", calm.body);

    // A webhook signed with a wrong secret: one signature failure this hour.
    let body = FiservBody::new("CON0009", 1).bytes();
    let headers = fiserv_headers(&body, "/webhooks/fiserv", "wrong-secret", now_unix(), "c9");
    assert_eq!(app.post_webhook("fiserv", &headers, &body).await.0, 401);
    let now = chrono::Utc::now().timestamp_millis();
    let signals = app.state.alerting.signals.snapshot("fiserv", now);
    assert_eq!(signals.rejections_last_hour, 1);

    // A quarantined webhook makes fiserv's line red (and only fiserv's).
    let bad = FiservBody::new("CON0010", 3).amount("\"12.345\"").bytes();
    let headers = fiserv_headers(&bad, "/webhooks/fiserv", FISERV_SECRET, now_unix(), "c10");
    assert_eq!(app.post_webhook("fiserv", &headers, &bad).await.0, 202);
    let overview = console.get("/console").await;
    assert_eq!(overview.status, 200);
    assert_eq!(
        overview.body.matches(">needs a human<").count(),
        1,
        "{}",
        overview.body
    );
    let red = overview
        .body
        .split("<tr class=\"alert\">")
        .nth(1)
        .expect("a red line");
    assert!(red.contains(">fiserv</a>"), "{red}");
    app.stop().await;
}

#[tokio::test]
async fn a_sign_in_without_its_forms_csrf_token_is_refused_and_not_counted() {
    let app = spawn_app().await;
    let mut console = Console::new(&app);
    let before = app.state.metrics.console_sign_in_failures.get();

    // Posted from another site: no sign-in cookie, no form token (login CSRF).
    let bare = console
        .post("/console/sign-in", &[("token", ADMIN_TOKEN)])
        .await;
    assert_eq!(bare.status, 403, "{}", bare.body);
    assert!(
        bare.set_cookie
            .as_deref()
            .is_some_and(|c| c.starts_with("console_sign_in=")),
        "a fresh form comes with its own cookie: {:?}",
        bare.set_cookie
    );
    assert!(bare.body.contains("expired or came from another site"));

    // A form token that is not the cookie's.
    let page = console.get("/console/sign-in").await;
    let cookie = page
        .set_cookie
        .as_deref()
        .and_then(|c| c.split(';').next())
        .expect("the sign-in cookie")
        .to_string();
    let forged = console
        .send(
            console
                .client
                .post(format!("{}/console/sign-in", app.address))
                .header(COOKIE, cookie)
                .form(&[("csrf", "0".repeat(64).as_str()), ("token", ADMIN_TOKEN)]),
        )
        .await;
    assert_eq!(forged.status, 403, "{}", forged.body);
    assert!(forged
        .set_cookie
        .as_deref()
        .is_none_or(|c| !c.starts_with("console_session=")));

    // Neither counts as a wrong token; the real form signs in.
    assert_eq!(app.state.metrics.console_sign_in_failures.get(), before);
    assert_eq!(console.sign_in(ADMIN_TOKEN).await.status, 303);
    assert_eq!(console.get("/console").await.status, 200);
    app.stop().await;
}

#[tokio::test]
async fn a_cashout_search_may_range_past_today_as_the_apis_list_does() {
    // Review finding: a date range ending after today answered 400 "has not begun yet"
    // on the console, while `GET /api/v1/cashouts?to=` takes it.
    let app = spawn_app().await;
    one_cashout(&app).await;
    let mut console = Console::new(&app);
    console.sign_in(ADMIN_TOKEN).await;
    // CON0001 was created on 2026-11-20 (its webhook's createdAt).
    let next_year = chrono::Utc::now().date_naive() + chrono::Days::new(365);
    let page = console
        .get(&format!("/console/cashouts?from=2026-11-20&to={next_year}"))
        .await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("CON0001"), "{}", page.body);
    let later = console
        .get(&format!("/console/cashouts?from={next_year}"))
        .await;
    assert_eq!(later.status, 200, "{}", later.body);
    assert!(!later.body.contains("CON0001"), "{}", later.body);
    let bad = console.get("/console/cashouts?to=someday").await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.body.contains("to: expected a date"), "{}", bad.body);
    app.stop().await;
}
