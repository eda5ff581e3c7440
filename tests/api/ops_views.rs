//! The ops views `cashouts` and `cashout` (real binary) on a store the running app fills.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use crate::helpers::{
    assert_accepted, base_config, fiserv_headers, now_unix, simpay_body, simpay_headers, spawn_app,
    FiservBody, TestApp, FISERV_SECRET, FISERV_SECRET_PREVIOUS, SIMPAY_SECRET,
};

/// How long one run of the binary may take on a busy machine.
const RUN_WITHIN: Duration = Duration::from_secs(60);

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// A config file for the binary and the variables it reads (on PostgreSQL, the URL's).
struct CliConfig {
    path: PathBuf,
    env: BTreeMap<String, String>,
}

/// Runs `cashout-recon ARGS --config CONFIG` (no secrets in its environment but the store's
/// URL: not needed).
async fn run_cli(config: &CliConfig, args: &[&str]) -> Run {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_cashout-recon"));
    command
        .args(args)
        .arg("--config")
        .arg(&config.path)
        .envs(&config.env)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(RUN_WITHIN, command.output())
        .await
        .unwrap_or_else(|_| panic!("cashout-recon {args:?} did not finish within {RUN_WITHIN:?}"))
        .expect("run cashout-recon");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The app's own config text, written beside its store for the binary.
fn write_config(app: &TestApp) -> CliConfig {
    let path = app.store.dir.path().join("ops.toml");
    let text = app
        .store
        .configure(&base_config(&app.db_path, &app._tupay.uri()));
    std::fs::write(&path, text).expect("write the config");
    CliConfig {
        path,
        env: app.store.env(BTreeMap::new()),
    }
}

async fn post_fiserv(app: &TestApp, body: &[u8], secret: &str, request_id: &str) {
    let headers = fiserv_headers(body, "/webhooks/fiserv", secret, now_unix(), request_id);
    let answer = app.post_webhook("fiserv", &headers, body).await;
    assert_accepted(&answer, request_id);
}

/// Two Fiserv cash-outs (one requested then completed, the second secret verifying the
/// completion; one only requested) and one SimPay cash-out.
async fn fill(app: &TestApp) {
    post_fiserv(
        app,
        &FiservBody::new("OPS0001", 1).bytes(),
        FISERV_SECRET,
        "r1",
    )
    .await;
    post_fiserv(
        app,
        &FiservBody::new("OPS0001", 3).bytes(),
        FISERV_SECRET_PREVIOUS,
        "r2",
    )
    .await;
    post_fiserv(
        app,
        &FiservBody::new("OPS0002", 1).bytes(),
        FISERV_SECRET,
        "r3",
    )
    .await;
    let body = simpay_body("PIX_CASHOUT_SUCCESS", "880011", Some("SUCCESS"), "12.50");
    let answer = app
        .post_webhook("simpay", &simpay_headers(&body, SIMPAY_SECRET), &body)
        .await;
    assert_accepted(&answer, "simpay");
}

#[tokio::test]
async fn cashouts_lists_the_store_while_the_daemon_runs_and_filters_it() {
    // Arrange
    let app = spawn_app().await;
    fill(&app).await;
    let config = write_config(&app);

    // Act
    let all = run_cli(&config, &["cashouts"]).await;
    let completed = run_cli(
        &config,
        &["cashouts", "--provider", "fiserv", "--status", "completed"],
    )
    .await;
    let limited = run_cli(&config, &["cashouts", "--limit", "1"]).await;

    // Assert
    assert_eq!(all.code, 0, "stderr: {}", all.stderr);
    let header = all.stdout.lines().next().unwrap_or_default();
    for column in [
        "PROVIDER",
        "REF",
        "EXTERNAL ID",
        "STATUS",
        "AMOUNT",
        "FEE",
        "CREATED",
        "UPDATED",
        "WEBHOOKS",
    ] {
        assert!(header.contains(column), "header lacks {column}: {header}");
    }
    for needle in [
        "OPS0001",
        "OPS0002",
        "880011",
        "1234567.89 BRL",
        "completed",
    ] {
        assert!(
            all.stdout.contains(needle),
            "{needle} missing:\n{}",
            all.stdout
        );
    }
    assert!(
        all.stdout.contains("T") && all.stdout.contains("Z  "),
        "times are RFC 3339 UTC:\n{}",
        all.stdout
    );
    assert_eq!(completed.code, 0, "stderr: {}", completed.stderr);
    assert!(completed.stdout.contains("OPS0001"), "{}", completed.stdout);
    assert!(
        !completed.stdout.contains("OPS0002"),
        "{}",
        completed.stdout
    );
    assert!(!completed.stdout.contains("880011"), "{}", completed.stdout);
    assert_eq!(limited.code, 0, "stderr: {}", limited.stderr);
    assert_eq!(
        limited.stdout.lines().filter(|l| l.contains("BRL")).count(),
        1,
        "{}",
        limited.stdout
    );
    assert!(limited.stdout.contains("--limit"), "{}", limited.stdout);
    // The daemon was never disturbed: it still takes webhooks.
    post_fiserv(
        &app,
        &FiservBody::new("OPS0003", 1).bytes(),
        FISERV_SECRET,
        "r4",
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn cashout_prints_the_timeline_with_source_status_outcome_and_secret() {
    // Arrange
    let app = spawn_app().await;
    fill(&app).await;
    let config = write_config(&app);

    // Act
    let run = run_cli(&config, &["cashout", "fiserv", "OPS0001"]).await;

    // Assert
    assert_eq!(run.code, 0, "stderr: {}", run.stderr);
    let out = &run.stdout;
    for needle in [
        "ref:",
        "OPS0001",
        "completed",
        "1234567.89 BRL",
        "webhooks:",
        "timeline (2 events",
        "RECEIVED",
        "SOURCE",
        "RAW STATUS",
        "APPLIED",
        "OUTCOME",
        "SECRET",
    ] {
        assert!(out.contains(needle), "{needle} missing:\n{out}");
    }
    let timeline: Vec<&str> = out.lines().filter(|l| l.contains("  webhook  ")).collect();
    assert_eq!(timeline.len(), 2, "{out}");
    assert!(timeline[0].contains("#0"), "first secret matched: {out}");
    assert!(
        timeline[1].contains("#1"),
        "the previous secret matched: {out}"
    );
    assert!(
        timeline[1].contains("completed") && timeline[1].contains("yes"),
        "{out}"
    );
    app.stop().await;
}

#[tokio::test]
async fn ops_views_refuse_unknown_names_with_2_and_a_missing_cashout_with_1() {
    // Arrange
    let app = spawn_app().await;
    fill(&app).await;
    let config = write_config(&app);

    // Act
    let provider = run_cli(&config, &["cashouts", "--provider", "nobody"]).await;
    let status = run_cli(&config, &["cashouts", "--status", "done"]).await;
    let one_provider = run_cli(&config, &["cashout", "nobody", "X"]).await;
    let missing = run_cli(&config, &["cashout", "fiserv", "NOPE404"]).await;

    // Assert
    assert_eq!(provider.code, 2, "{}", provider.stderr);
    assert!(
        provider.stderr.contains("\"nobody\""),
        "{}",
        provider.stderr
    );
    assert_eq!(status.code, 2, "{}", status.stderr);
    assert!(status.stderr.contains("\"done\""), "{}", status.stderr);
    assert_eq!(one_provider.code, 2, "{}", one_provider.stderr);
    assert!(
        one_provider.stderr.contains("\"nobody\""),
        "{}",
        one_provider.stderr
    );
    assert_eq!(missing.code, 1, "{}", missing.stderr);
    assert!(
        missing
            .stderr
            .contains("no cash-out NOPE404 of provider fiserv"),
        "{}",
        missing.stderr
    );
    app.stop().await;
}

#[tokio::test]
async fn sqlite_only_ops_views_on_a_missing_store_fail_without_creating_it() {
    // Arrange
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("absent.db");
    let config = CliConfig {
        path: dir.path().join("ops.toml"),
        env: BTreeMap::new(),
    };
    std::fs::write(&config.path, base_config(&db, "http://127.0.0.1:9")).expect("write the config");

    // Act
    let run = run_cli(&config, &["cashouts"]).await;

    // Assert
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("absent.db"), "{}", run.stderr);
    assert!(!db.exists(), "a read-only view must not create the store");
}
