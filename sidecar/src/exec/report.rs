//! The runner's report: how one command ended, as one line that starts with [`MARKER`] and holds
//! JSON, the output base64-encoded. The exec server reads it from the runner's standard output,
//! the dispatcher from the log of the Job's pod.

use serde::{Deserialize, Serialize};

/// What a report line starts with (the version follows the slash).
pub const MARKER: &str = "agentvm-exec-report/1 ";

/// How one command ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Report {
    /// The command ran (and ended, or was killed).
    Ran(Outcome),
    /// The command could not be started.
    NotStarted {
        /// Why, in short.
        reason: NotStarted,
        /// The system's message.
        message: String,
    },
}

/// Why a command could not be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotStarted {
    /// The program does not exist.
    NotFound,
    /// The program (or its standard input) may not be used.
    PermissionDenied,
    /// Anything else: too many processes, an argument list too long, ...
    Other,
}

impl NotStarted {
    /// The kind of `error`.
    pub fn of(error: &std::io::Error) -> Self {
        match error.kind() {
            std::io::ErrorKind::NotFound => NotStarted::NotFound,
            std::io::ErrorKind::PermissionDenied => NotStarted::PermissionDenied,
            _ => NotStarted::Other,
        }
    }

    /// Back to an I/O error kind.
    pub fn kind(self) -> std::io::ErrorKind {
        match self {
            NotStarted::NotFound => std::io::ErrorKind::NotFound,
            NotStarted::PermissionDenied => std::io::ErrorKind::PermissionDenied,
            NotStarted::Other => std::io::ErrorKind::Other,
        }
    }
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// Exit status, when it exited.
    pub exit_code: Option<i32>,
    /// Signal that ended it, when one did.
    pub signal: Option<i32>,
    /// Captured standard output (at most the cap).
    #[serde(with = "base64_bytes")]
    pub stdout: Vec<u8>,
    /// Captured standard error (at most the cap).
    #[serde(with = "base64_bytes")]
    pub stderr: Vec<u8>,
    /// Standard output went past the cap.
    pub stdout_truncated: bool,
    /// Standard error went past the cap.
    pub stderr_truncated: bool,
    /// The time limit was reached and everything the command started was killed.
    pub timed_out: bool,
    /// From start to exit, in milliseconds.
    pub duration_ms: u64,
}

/// Why no report could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// No line starts with the marker.
    #[error("no report line")]
    Missing,
    /// The last report line does not parse.
    #[error("unreadable report line: {0}")]
    Invalid(#[source] serde_json::Error),
}

impl Report {
    /// The report line, newline included.
    pub fn line(&self) -> String {
        // Serialising plain fields and byte strings cannot fail.
        let json = serde_json::to_string(self).unwrap_or_else(|e| {
            let message = format!("cannot write the report: {e}");
            serde_json::json!({"not_started": {"reason": "other", "message": message}}).to_string()
        });
        format!("{MARKER}{json}\n")
    }

    /// The last report line in `text` (a runner's output or a container log, where the runner
    /// writes it last).
    pub fn find(text: &[u8]) -> Result<Report, ReportError> {
        let line = text
            .split(|b| *b == b'\n')
            .rev()
            .find_map(|line| line.strip_prefix(MARKER.as_bytes()))
            .ok_or(ReportError::Missing)?;
        serde_json::from_slice(line).map_err(ReportError::Invalid)
    }

    /// The runner's exit status, after the conventions of `timeout(1)` and shells: the
    /// command's own status, 128 + the signal that ended it, 124 at the time limit, 127 for a
    /// program not found and 126 for one that could not be started otherwise.
    pub fn exit_status(&self) -> u8 {
        match self {
            Report::Ran(o) if o.timed_out => 124,
            Report::Ran(o) => match (o.exit_code, o.signal) {
                (Some(code), _) => (code & 0xff) as u8,
                (None, Some(signal)) => 128u8.saturating_add((signal & 0x7f) as u8),
                (None, None) => RUNNER_FAILED,
            },
            Report::NotStarted {
                reason: NotStarted::NotFound,
                ..
            } => 127,
            Report::NotStarted { .. } => 126,
        }
    }
}

/// The runner's exit status when it could not run the command for a reason of its own.
pub const RUNNER_FAILED: u8 = 125;

/// The longest report line for output capped at `cap` bytes per stream: both streams in base64,
/// plus room for the other fields.
pub fn max_line_bytes(cap: usize) -> usize {
    let encoded = cap.div_ceil(3).saturating_mul(4);
    MARKER
        .len()
        .saturating_add(encoded.saturating_mul(2))
        .saturating_add(1024)
}

mod base64_bytes {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn ran() -> Outcome {
        Outcome {
            exit_code: Some(3),
            signal: None,
            stdout: b"out\n\x00\xff".to_vec(),
            stderr: b"err\n".to_vec(),
            stdout_truncated: true,
            stderr_truncated: false,
            timed_out: false,
            duration_ms: 12,
        }
    }

    #[test]
    fn a_report_survives_its_line_and_the_last_one_counts() {
        let report = Report::Ran(ran());
        let line = report.line();
        assert!(line.starts_with(MARKER) && line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1, "one line");
        assert_eq!(Report::find(line.as_bytes()).unwrap(), report);
        // Anything before it (the runner's own warnings), and an earlier report, are ignored.
        let earlier = Report::NotStarted {
            reason: NotStarted::Other,
            message: "x".into(),
        };
        let log = format!("warning: something\n{}{line}", earlier.line());
        assert_eq!(Report::find(log.as_bytes()).unwrap(), report);
    }

    #[test]
    fn missing_or_broken_reports_are_errors() {
        assert!(matches!(
            Report::find(b"plain log\n"),
            Err(ReportError::Missing)
        ));
        let cut = &Report::Ran(ran()).line()[..40];
        assert!(matches!(
            Report::find(cut.as_bytes()),
            Err(ReportError::Invalid(_))
        ));
        let fields = r#""exit_code":0,"signal":null,"stdout":"!!","stderr":"",
            "stdout_truncated":false,"stderr_truncated":false,"timed_out":false,"duration_ms":1"#;
        let bad_base64 = format!("{MARKER}{{\"ran\":{{{fields}}}}}").replace('\n', "");
        assert!(matches!(
            Report::find(bad_base64.as_bytes()),
            Err(ReportError::Invalid(_))
        ));
    }

    #[test]
    fn exit_statuses_follow_timeout_and_the_shell() {
        let status = |o: Outcome| Report::Ran(o).exit_status();
        assert_eq!(status(ran()), 3);
        assert_eq!(
            status(Outcome {
                exit_code: None,
                signal: Some(15),
                ..ran()
            }),
            143
        );
        assert_eq!(
            status(Outcome {
                timed_out: true,
                ..ran()
            }),
            124
        );
        let not_found = Report::NotStarted {
            reason: NotStarted::NotFound,
            message: String::new(),
        };
        assert_eq!(not_found.exit_status(), 127);
    }

    #[test]
    fn the_longest_line_bounds_full_output() {
        let cap = 1000;
        let full = Report::Ran(Outcome {
            exit_code: Some(i32::MIN),
            signal: Some(i32::MAX),
            stdout: vec![0xff; cap],
            stderr: vec![0xff; cap],
            stdout_truncated: true,
            stderr_truncated: true,
            timed_out: true,
            duration_ms: u64::MAX,
        });
        assert!(full.line().len() <= max_line_bytes(cap));
    }
}
