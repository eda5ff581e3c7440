//! Structured logging: JSON lines when stdout is not a terminal, readable text when it is.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; `RUST_LOG` overrides the default `info` level.
pub fn init() {
    init_with_default("info");
}

/// Installs the global subscriber with `default` as the level unless `RUST_LOG` says
/// otherwise (commands whose output is for people, like `demo`, default to `warn`).
pub fn init_with_default(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = if std::io::stderr().is_terminal() {
        builder.try_init()
    } else {
        builder.json().flatten_event(true).try_init()
    };
    // A second init (tests, embedded use) keeps the first subscriber.
    let _ = installed;
}
