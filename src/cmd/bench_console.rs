//! `bench-console`: the ops console's page render times with a million cash-outs. Seeds
//! the `bench-recon` book (plus quarantined webhooks), reconciles its day (mismatches, a
//! report) and runs an alert pass, starts the daemon on loopback, signs in, and times
//! each page over N requests (min / median / p99, loopback round trip included).

use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use clap::Args;

use super::bench_recon::BenchBook;
use super::CommandError;
use crate::app::{App, AppOptions};
use crate::store::bench_seed;

/// Arguments of `bench-console`.
#[derive(Args, Debug, Clone)]
pub struct BenchConsoleArgs {
    /// Cash-outs in the store (split between two providers).
    #[arg(long, default_value_t = 1_000_000)]
    pub cashouts: u64,
    /// Timed requests per page (after one warm-up request).
    #[arg(long, default_value_t = 50)]
    pub requests: usize,
    /// Quarantined webhooks in the store.
    #[arg(long, default_value_t = 2_000)]
    pub quarantined: u64,
}

const TOKEN: &str = "bench-console-admin-token";

/// The timings of one page.
struct Timed {
    page: String,
    bytes: usize,
    min: Duration,
    median: Duration,
    p99: Duration,
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Runs the benchmark and prints one line per page.
pub async fn run(args: BenchConsoleArgs) -> Result<(), CommandError> {
    if args.cashouts < 4000 || args.requests == 0 {
        return Err(CommandError::Config(
            "--cashouts must be at least 4000 and --requests at least 1".into(),
        ));
    }
    let work = tempfile::tempdir().context("creating a temporary directory")?;
    let book = BenchBook::create(
        work.path(),
        "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 2\n\n",
        &[("CASHOUT_RECON_ADMIN_TOKEN", TOKEN)],
    )
    .await?;
    let (now, day, db) = (book.now, book.day, book.db.clone());
    println!(
        "bench-console: seeding {} cash-outs (3 events each), their ledger and {} quarantined webhooks…",
        args.cashouts, args.quarantined
    );
    let seeding = Instant::now();
    let spec = book.seed_spec(args.cashouts);
    let settings = book.settings;
    let seed_db = db.clone();
    let quarantined = args.quarantined;
    let at = now.timestamp_millis() - 60_000;
    let seeded = tokio::task::spawn_blocking(move || {
        let seeded = bench_seed::seed(&seed_db, &spec)?;
        bench_seed::seed_quarantined(&seed_db, "fiserv", quarantined, at)?;
        Ok::<_, crate::store::StoreError>(seeded)
    })
    .await
    .context("seeding task")?
    .context("seeding the store")?;
    println!(
        "seeded in {:.1}s: {} cash-outs, {} events",
        seeding.elapsed().as_secs_f64(),
        seeded.cashouts,
        seeded.events
    );

    let app = App::build_with(
        settings,
        AppOptions {
            handle_signals: false,
            noop_route: false,
            background_jobs: false,
        },
    )
    .await
    .context("starting the daemon")?;
    let state = app.state();
    let handle = app.handle();
    let base = format!("http://127.0.0.1:{}", app.port());
    let server = tokio::spawn(app.run_until_stopped());

    let preparing = Instant::now();
    let outcome = state
        .reconciler
        .reconcile_day_now(day.date)
        .await
        .context("reconciling the day")?;
    state
        .alerting
        .run_pass(&state, Utc::now())
        .await
        .context("an alert pass")?;
    println!(
        "reconciled the day ({} mismatches opened, report of {} rows) and ran an alert pass in {:.1}s",
        outcome.pass.opened,
        outcome.report.summary.rows,
        preparing.elapsed().as_secs_f64()
    );

    // A cash-out of the plain provider (even numbers) in the middle of the book.
    let middle = (args.cashouts / 2) & !1;
    let result = time_pages(&base, &day.label(), middle, args.requests).await;
    handle.stop(true).await;
    let _ = server.await;
    let timed = result?;
    println!(
        "\n{:<58} {:>8} {:>9} {:>9} {:>9}",
        "page", "bytes", "min ms", "median ms", "p99 ms"
    );
    for t in &timed {
        println!(
            "{:<58} {:>8} {:>9.2} {:>9.2} {:>9.2}",
            t.page,
            t.bytes,
            ms(t.min),
            ms(t.median),
            ms(t.p99)
        );
    }
    let slowest = timed.iter().map(|t| t.p99).max().unwrap_or_default();
    println!(
        "\n{} cash-outs, {} requests per page: slowest p99 {:.2} ms (goal < 100 ms)",
        seeded.cashouts,
        args.requests,
        ms(slowest)
    );
    let pages: Vec<serde_json::Value> = timed
        .iter()
        .map(|t| {
            serde_json::json!({
                "page": t.page,
                "bytes": t.bytes,
                "min_ms": ms(t.min),
                "median_ms": ms(t.median),
                "p99_ms": ms(t.p99),
            })
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "cashouts": seeded.cashouts,
            "requests": args.requests,
            "pages": pages,
        })
    );
    Ok(())
}

/// Signs in and times every page.
async fn time_pages(
    base: &str,
    date: &str,
    middle: u64,
    requests: usize,
) -> Result<Vec<Timed>, CommandError> {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .context("an HTTP client")?;
    // The sign-in form first: its CSRF token and the cookie holding it.
    let form = client
        .get(format!("{base}/console/sign-in"))
        .send()
        .await
        .context("the sign-in form")?;
    let form_cookie = form
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_string)
        .context("no cookie with the sign-in form")?;
    let page = form.text().await.context("the sign-in form")?;
    let marker = r#"name="csrf" value=""#;
    let csrf = page
        .split_once(marker)
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(value, _)| value.to_string())
        .context("no CSRF token in the sign-in form")?;
    let signed = client
        .post(format!("{base}/console/sign-in"))
        .header(reqwest::header::COOKIE, form_cookie)
        .form(&[("csrf", csrf.as_str()), ("token", TOKEN)])
        .send()
        .await
        .context("signing in")?;
    let cookie = signed
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_string)
        .context("no session cookie after signing in")?;
    let pages = [
        "/console".to_string(),
        "/console/cashouts".to_string(),
        // 1 in 4000 of the book; a combination nothing matches.
        "/console/cashouts?provider=mannco&status=processing".to_string(),
        "/console/cashouts?provider=fiserv&status=canceled".to_string(),
        format!("/console/cashouts?from={date}&to={date}&status=failed"),
        format!("/console/cashouts?id=ord-{middle:09}"),
        "/console/cashouts?provider=mannco&stuck=1".to_string(),
        format!("/console/cashouts/fiserv/tx{middle:09}"),
        "/console/mismatches".to_string(),
        "/console/mismatches?resolved=1".to_string(),
        "/console/alerts".to_string(),
        "/console/reports".to_string(),
        "/console/quarantine".to_string(),
        "/console/events/bench-quarantined-000000007?body=1".to_string(),
    ];
    let mut timed = Vec::with_capacity(pages.len());
    for page in pages {
        let mut samples = Vec::with_capacity(requests);
        let mut bytes = 0;
        for i in 0..=requests {
            let started = Instant::now();
            let response = client
                .get(format!("{base}{page}"))
                .header(reqwest::header::COOKIE, &cookie)
                .send()
                .await
                .with_context(|| format!("GET {page}"))?;
            let status = response.status();
            let body = response.bytes().await.context("reading a page")?;
            let elapsed = started.elapsed();
            if !status.is_success() {
                return Err(CommandError::Runtime(anyhow::anyhow!(
                    "GET {page} answered {status}"
                )));
            }
            bytes = body.len();
            if i > 0 {
                samples.push(elapsed);
            }
        }
        samples.sort();
        let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
        timed.push(Timed {
            page,
            bytes,
            min: samples[0],
            median: at(0.5),
            p99: at(0.99),
        });
    }
    Ok(timed)
}
