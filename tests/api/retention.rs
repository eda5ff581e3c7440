//! Raw-body retention as an operator sees it: `check-config` shows and checks its keys.

use std::path::{Path, PathBuf};
use std::process::Output;

fn config_with_store(dir: &Path, store_keys: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[store]\npath = \"book.db\"\n{store_keys}\n[reports]\ndir = \"reports\"\n\
             [[providers]]\nid = \"fiserv\"\nkind = \"fiserv_pix\"\nbase_url = \"https://provider.example\"\n\
             webhook_secrets_env = [\"RETENTION_FISERV_SECRET\"]\n"
        ),
    )
    .expect("write the config");
    path
}

fn check_config(config: &Path) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cashout-recon"))
        .args(["check-config", "--config"])
        .arg(config)
        .env("RETENTION_FISERV_SECRET", "s1")
        .output()
        .expect("run check-config")
}

#[test]
fn check_config_prints_the_retention_and_the_archive_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config_with_store(
        dir.path(),
        "retain_raw_bodies = \"90d\"\narchive_dir = \"archive\"",
    );
    let output = check_config(&config);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    let expected = format!(
        "raw bodies kept 90d  archive {}",
        dir.path().join("archive").display()
    );
    assert!(stdout.contains(&expected), "{stdout}");

    let config = config_with_store(dir.path(), "retain_raw_bodies = \"0s\"");
    let stdout = String::from_utf8_lossy(&check_config(&config).stdout).to_string();
    assert!(
        stdout.contains("raw bodies kept forever  archive none"),
        "{stdout}"
    );
}

#[test]
fn check_config_refuses_an_unusable_retention_or_archive_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("a-file"), "x").expect("write a file");
    let config = config_with_store(dir.path(), "archive_dir = \"a-file/archive\"");
    let output = check_config(&config);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("store.archive_dir: cannot create files in"),
        "{stderr}"
    );

    let config = config_with_store(dir.path(), "retain_raw_bodies = \"400s\"");
    let output = check_config(&config);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("store.retain_raw_bodies: "), "{stderr}");
}
