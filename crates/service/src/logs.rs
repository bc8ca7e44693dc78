//! Logging on stderr for the indexer's and the orchestrator's binaries: human-readable text,
//! or one JSON object a line (`timestamp`, `level`, `message`, fields, `target`) for log
//! pipelines. Nothing logged carries a secret: tokens are kept as hashes, passwords are
//! redacted in `Debug`, cookies are named by their path and URLs may not hold credentials.

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object a line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format {other:?}: use text or json")),
        }
    }
}

/// Starts logging to stderr in `format`, at the level `filter_var` (e.g. `INDEXER_LOG`)
/// names, `info` when unset.
pub fn init(format: LogFormat, filter_var: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env(filter_var)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        // The message at the top level, beside the level, as log pipelines expect.
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Reports the error a binary exits with: a plain `error:` line, or a JSON error event so
/// that every line on stderr stays JSON.
pub fn fatal(format: LogFormat, error: &dyn std::fmt::Display) {
    match format {
        LogFormat::Text => eprintln!("error: {error:#}"),
        LogFormat::Json => tracing::error!("{error:#}"),
    }
}
