//! Running one prepared command: output captured up to a cap, standard input fed, and the whole
//! process group killed at the time limit.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant as TokioInstant;

use super::command::Prepared;
use crate::reaper;

/// How long output is still read after the command ended or was killed: enough for the pipes
/// to drain, bounded because a process that left the group (`setsid`) may keep them open.
const DRAIN_GRACE: Duration = Duration::from_millis(250);

/// How long to wait for a killed command to be reaped before giving up on its status.
const REAP_GRACE: Duration = Duration::from_secs(5);

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Exit status, when it exited.
    pub exit_code: Option<i32>,
    /// Signal that ended it, when one did.
    pub signal: Option<i32>,
    /// Captured standard output (at most the cap).
    pub stdout: Vec<u8>,
    /// Captured standard error (at most the cap).
    pub stderr: Vec<u8>,
    /// Standard output went past the cap.
    pub stdout_truncated: bool,
    /// Standard error went past the cap.
    pub stderr_truncated: bool,
    /// The time limit was reached and the group killed.
    pub timed_out: bool,
    /// From start to exit.
    pub duration: Duration,
}

/// Why a command did not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The program could not be started (not found, not executable, out of processes...).
    #[error("cannot start {program:?}: {source}")]
    Spawn {
        /// `argv[0]`.
        program: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// A pipe could not be registered with the runtime.
    #[error("cannot set up the pipes of {program:?}: {source}")]
    Pipe {
        /// `argv[0]`.
        program: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
}

/// Runs `p`, keeping at most `cap` bytes of each output stream.
pub async fn run(p: Prepared, cap: usize) -> Result<Outcome, RunError> {
    let program = p.argv.first().cloned().unwrap_or_default();
    let mut cmd = Command::new(&program);
    cmd.args(p.argv.iter().skip(1))
        .env_clear()
        .envs(p.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&p.cwd)
        .stdin(if p.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let deadline = TokioInstant::now() + p.timeout;
    let mut child = reaper::start(cmd).map_err(|source| RunError::Spawn {
        program: program.clone(),
        source,
    })?;
    let pipe_err = |source| RunError::Pipe {
        program: program.clone(),
        source,
    };
    // From here on the group is killed on every path out, errors included.
    let guard = KillOnDrop(child.pid);
    let stdout = child
        .child
        .stdout
        .take()
        .map(tokio::process::ChildStdout::from_std)
        .transpose()
        .map_err(pipe_err)?;
    let stderr = child
        .child
        .stderr
        .take()
        .map(tokio::process::ChildStderr::from_std)
        .transpose()
        .map_err(pipe_err)?;
    let stdin = child
        .child
        .stdin
        .take()
        .map(tokio::process::ChildStdin::from_std)
        .transpose()
        .map_err(pipe_err)?;
    let writer = match (stdin, p.stdin) {
        (Some(mut pipe), Some(bytes)) => Some(tokio::spawn(async move {
            // A command that does not read its input closes the pipe: not an error.
            let _ = pipe.write_all(&bytes).await;
        })),
        _ => None,
    };
    let drain_until = deadline + DRAIN_GRACE;
    let out = tokio::spawn(capture(stdout, cap, drain_until));
    let err = tokio::spawn(capture(stderr, cap, drain_until));

    let (exit, timed_out) = match tokio::time::timeout_at(deadline, &mut child.exit).await {
        Ok(exit) => (exit.ok(), false),
        Err(_) => {
            reaper::kill_group(child.pid);
            let exit = tokio::time::timeout(REAP_GRACE, &mut child.exit).await;
            (exit.ok().and_then(Result::ok), true)
        }
    };
    let duration = started.elapsed();
    drop(guard);
    if let Some(w) = writer {
        w.abort();
    }
    let (stdout, stdout_truncated) = out.await.unwrap_or_default();
    let (stderr, stderr_truncated) = err.await.unwrap_or_default();
    Ok(Outcome {
        exit_code: exit.and_then(|e| e.code),
        signal: exit.and_then(|e| e.signal),
        stdout,
        stderr,
        stdout_truncated,
        stderr_truncated,
        timed_out,
        duration,
    })
}

/// Kills the group when the request ends early (client gone, handler dropped).
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        reaper::kill_group(self.0);
    }
}

/// Reads `pipe` to its end (or `until`), keeping the first `cap` bytes. Reading goes on past the
/// cap, so that a chatty command is not blocked on a full pipe.
async fn capture(
    pipe: Option<impl AsyncRead + Unpin>,
    cap: usize,
    until: TokioInstant,
) -> (Vec<u8>, bool) {
    let Some(mut pipe) = pipe else {
        return (Vec::new(), false);
    };
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match tokio::time::timeout_at(until, pipe.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => n,
        };
        let room = cap.saturating_sub(kept.len());
        if n > room {
            truncated = true;
        }
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    (kept, truncated)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn prepared(argv: &[&str], timeout_ms: u64) -> Prepared {
        let root = std::env::temp_dir().canonicalize().unwrap();
        Prepared {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            stdin: None,
            env: super::super::command::base_env(
                &root,
                super::super::command::DEFAULT_PATH,
                "/tmp",
                &[],
            ),
            cwd: root,
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    /// Whether `pid` is still a live process (a zombie waiting for its reaper counts as dead).
    fn alive(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => {
                let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                !state.starts_with('Z')
            }
            Err(_) => false,
        }
    }

    async fn gone(pid: i32) -> bool {
        for _ in 0..100 {
            if !alive(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn exit_code_output_and_stdin() {
        let mut p = prepared(&["sh", "-c", "cat; echo oops >&2; exit 3"], 5_000);
        p.stdin = Some(b"hello".to_vec());
        let o = run(p, 1024).await.unwrap();
        assert_eq!(o.exit_code, Some(3));
        assert_eq!(o.signal, None);
        assert_eq!(o.stdout, b"hello");
        assert_eq!(o.stderr, b"oops\n");
        assert!(!o.timed_out && !o.stdout_truncated && !o.stderr_truncated);
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let p = prepared(&["sh", "-c", "sleep 30 & echo $!; sleep 30"], 300);
        let started = Instant::now();
        let o = run(p, 1024).await.unwrap();
        assert!(o.timed_out);
        assert_eq!(o.signal, Some(9));
        assert_eq!(o.exit_code, None);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        let grandchild: i32 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
        assert!(
            gone(grandchild).await,
            "grandchild {grandchild} survived the timeout"
        );
    }

    #[tokio::test]
    async fn background_processes_do_not_outlive_their_command() {
        let p = prepared(&["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"], 5_000);
        let o = run(p, 1024).await.unwrap();
        assert_eq!(o.exit_code, Some(0));
        assert!(!o.timed_out);
        let grandchild: i32 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
        assert!(
            gone(grandchild).await,
            "background {grandchild} survived its command"
        );
    }

    #[tokio::test]
    async fn output_is_capped_and_the_command_still_finishes() {
        // 1 MiB on each stream against a 1000-byte cap.
        let script = "head -c 1048576 /dev/zero; head -c 1048576 /dev/zero >&2; exit 0";
        let o = run(prepared(&["sh", "-c", script], 10_000), 1000)
            .await
            .unwrap();
        assert_eq!(o.exit_code, Some(0));
        assert_eq!((o.stdout.len(), o.stderr.len()), (1000, 1000));
        assert!(o.stdout_truncated && o.stderr_truncated);
        let exact = run(prepared(&["printf", "12345"], 1_000), 5).await.unwrap();
        assert_eq!(exact.stdout, b"12345");
        assert!(!exact.stdout_truncated);
    }

    #[tokio::test]
    async fn environment_is_only_the_allow_list() {
        let o = run(prepared(&["env"], 5_000), 64 * 1024).await.unwrap();
        let mut names: Vec<String> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split('=').next().map(str::to_owned))
            .collect();
        names.sort();
        assert_eq!(names, ["HOME", "LANG", "PATH", "TMPDIR"]);
    }

    #[tokio::test]
    async fn no_descriptor_of_the_server_is_inherited() {
        // Descriptors the server holds while the command runs: a file, a listener, a socket.
        let _file = std::fs::File::open("/proc/self/stat").unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _conn = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let o = run(prepared(&["ls", "/proc/self/fd"], 5_000), 4096)
            .await
            .unwrap();
        let fds: Vec<String> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        // 0-2 are the pipes and /dev/null; 3 is the directory `ls` itself opened.
        assert_eq!(fds, ["0", "1", "2", "3"], "{o:?}");
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let err = run(prepared(&["/nonexistent/program"], 1_000), 10)
            .await
            .unwrap_err();
        assert!(matches!(err, RunError::Spawn { .. }), "{err}");
        let _ = PathBuf::new();
    }
}
