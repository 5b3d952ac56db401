//! Logging: `tracing` to stderr, filtered by `RUST_LOG` (default `info`).
//! Stderr keeps stdout clean for the JSON that `audit digest` prints.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A second init (tests) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        // When stderr is gone (a closed pipe), a log line is lost; reporting
        // that with eprintln! would panic the task that logged instead.
        .log_internal_errors(false)
        .try_init();
}
