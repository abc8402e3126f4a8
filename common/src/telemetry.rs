//! Tracing set-up shared by every agentvm binary.

use std::str::FromStr;

use tracing_subscriber::EnvFilter;

/// How log records are written to standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per record.
    #[default]
    Text,
    /// One JSON object per record, for log pipelines.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format {other:?} (expected text or json)"
            )),
        }
    }
}

/// The logging flags every agentvm binary takes (`--log-format`, `--log-level`).
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format: text or json.
    #[arg(
        long,
        global = true,
        env = "AGENTVM_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Log filter, RUST_LOG syntax.
    #[arg(long, global = true, env = "AGENTVM_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

impl LogArgs {
    /// Installs the subscriber these flags describe.
    pub fn init(&self) -> Result<(), String> {
        init(self.log_format, &self.log_level)
    }
}

/// Installs the global tracing subscriber. `filter` uses the `RUST_LOG` syntax
/// (for example `info,agentvm_webhook=debug`). Calling it twice is harmless: the second call
/// keeps the first subscriber.
pub fn init(format: LogFormat, filter: &str) -> Result<(), String> {
    let filter =
        EnvFilter::try_new(filter).map_err(|e| format!("bad log filter {filter:?}: {e}"))?;
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    // An already installed subscriber (tests, a second call) is not an error worth stopping for.
    let _ = result;
    Ok(())
}
