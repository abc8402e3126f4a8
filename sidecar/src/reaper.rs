//! Starting commands in their own process group, reaping them, and ending what they leave.
//!
//! One thread per process waits for children to exit. It reaps every child, not only the ones
//! it started: the process is a child subreaper (and often PID 1 of its container), so orphaned
//! descendants are re-parented to it and would stay zombies otherwise. A consequence is that
//! nothing else in the process may start children and wait for them.
//!
//! When a command's leader exits, its whole process group is killed before the leader is reaped:
//! while the leader is a zombie its pid (which is also the group id) cannot be reused, so the
//! signal can only reach that command's group. Processes that left the group are found by
//! [`kill_descendants`], which walks parent links (see [`crate::exec::tree`]).
//!
//! Commands inherit no descriptor of the server: the ones Rust opens are close-on-exec, and the
//! ones the process inherited are marked so before the first command starts.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use rustix::process::{DumpableBehavior, Pid, Signal, WaitId, WaitIdOptions, WaitOptions};
use tokio::sync::oneshot;

use crate::exec::tree::{self, Swept};

/// How long one sweep of orphans may take in the reaper thread.
const ORPHAN_SWEEP_BOUND: Duration = Duration::from_secs(2);

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit status, when it exited.
    pub code: Option<i32>,
    /// Signal number, when a signal ended it.
    pub signal: Option<i32>,
}

/// A started command: its pipes (in `child`) and the news of its exit.
#[derive(Debug)]
pub struct Started {
    /// Process id, also the process group id.
    pub pid: i32,
    /// The std handle, for its pipes only: never wait on it.
    pub child: Child,
    /// Resolves when the command has exited and its group has been killed.
    pub exit: oneshot::Receiver<Exit>,
}

/// A started command's pipes, for async reading and writing (absent where not piped).
#[derive(Debug)]
pub struct Pipes {
    /// Its standard input.
    pub stdin: Option<tokio::process::ChildStdin>,
    /// Its standard output.
    pub stdout: Option<tokio::process::ChildStdout>,
    /// Its standard error.
    pub stderr: Option<tokio::process::ChildStderr>,
}

impl Started {
    /// Takes the command's pipes, as Tokio pipes (this needs a Tokio runtime).
    pub fn pipes(&mut self) -> io::Result<Pipes> {
        let c = &mut self.child;
        Ok(Pipes {
            stdin: c
                .stdin
                .take()
                .map(tokio::process::ChildStdin::from_std)
                .transpose()?,
            stdout: c
                .stdout
                .take()
                .map(tokio::process::ChildStdout::from_std)
                .transpose()?,
            stderr: c
                .stderr
                .take()
                .map(tokio::process::ChildStderr::from_std)
                .transpose()?,
        })
    }
}

#[derive(Default)]
struct Table {
    waiting: HashMap<i32, oneshot::Sender<Exit>>,
    /// Bumped on every start and every reap, so that waiters see changes they slept through.
    generation: u64,
}

struct Reaper {
    table: Mutex<Table>,
    changed: Condvar,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();

/// Set by [`kill_orphans`].
static KILL_ORPHANS: AtomicBool = AtomicBool::new(false);

fn reaper() -> &'static Reaper {
    REAPER.get_or_init(|| {
        // Descriptors the process inherited without close-on-exec (from a shell, a test runner,
        // a container runtime) would otherwise reach every command. Rust's own are marked.
        close_fds::set_fds_cloexec_threadsafe(3, &[]);
        // An explicit stack size: RUST_MIN_STACK (which a command's environment may set, in the
        // runner) must not keep the thread from starting.
        let spawned = std::thread::Builder::new()
            .name("agentvm-reaper".into())
            .stack_size(256 * 1024)
            .spawn(reap_forever);
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the reaper thread; commands will not end");
        }
        Reaper {
            table: Mutex::new(Table::default()),
            changed: Condvar::new(),
        }
    })
}

fn lock(r: &Reaper) -> MutexGuard<'_, Table> {
    r.table.lock().unwrap_or_else(|p| p.into_inner())
}

fn own_pid() -> i32 {
    rustix::process::getpid().as_raw_nonzero().get()
}

/// Makes this process a child subreaper (orphaned descendants are re-parented to it rather than
/// to PID 1, so they stay in its subtree) and not dumpable. Commands run as the same user as this
/// process: without the second, they could open its `/proc/<pid>/fd` (the pipes of other
/// commands) or trace it.
pub fn become_subreaper() -> io::Result<()> {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))?;
    rustix::process::set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    Ok(())
}

/// Makes this process a subreaper that kills, with their descendants, the children it did not
/// start: orphans re-parented to it because the process that should have ended them (a runner)
/// died first. Once set, every child must be started through [`start`].
pub fn kill_orphans() -> io::Result<()> {
    KILL_ORPHANS.store(true, Ordering::Relaxed);
    become_subreaper()
}

/// Starts `cmd` as the leader of a new process group. The command's stdio must be set by the
/// caller.
pub fn start(mut cmd: Command) -> io::Result<Started> {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    let r = reaper();
    // Held across the spawn: std waits for a child whose exec failed, and the reaper must not
    // take that child from it; and the reaper must find every pid it reaps in the table.
    let mut table = lock(r);
    let child = cmd.spawn()?;
    let pid = i32::try_from(child.id()).map_err(io::Error::other)?;
    let (tx, exit) = oneshot::channel();
    table.waiting.insert(pid, tx);
    table.generation = table.generation.wrapping_add(1);
    drop(table);
    r.changed.notify_all();
    Ok(Started { pid, child, exit })
}

/// Sends SIGKILL to the process group of a started command. A group already gone is not an
/// error.
pub fn kill_group(pid: i32) {
    if let Some(pid) = Pid::from_raw(pid) {
        let _ = rustix::process::kill_process_group(pid, Signal::KILL);
    }
}

/// Sends `signal` to a started command, unless it has been reaped already (its pid may then
/// belong to another process).
pub fn signal(pid: i32, signal: Signal) {
    let Some(r) = REAPER.get() else { return };
    let table = lock(r);
    if table.waiting.contains_key(&pid) {
        if let Some(p) = Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(p, signal);
        }
    }
}

/// Stops and kills every descendant of this process, the commands it started included, in
/// whatever group or session they are (see [`tree`]). No child is reaped meanwhile.
pub fn kill_descendants(bound: Duration) -> Swept {
    let r = reaper();
    let _table = lock(r);
    tree::kill_tree(own_pid(), |_| false, bound)
}

/// Sends SIGTERM to every command still running and waits up to `wait` for them to be reaped (at
/// shutdown: a runner told to stop ends everything its command started).
pub fn end_all(wait: Duration) {
    let Some(r) = REAPER.get() else { return };
    let mut table = lock(r);
    for pid in table.waiting.keys() {
        if let Some(p) = Pid::from_raw(*pid) {
            let _ = rustix::process::kill_process(p, Signal::TERM);
        }
    }
    let until = Instant::now() + wait;
    while !table.waiting.is_empty() {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        table = match r.changed.wait_timeout(table, left) {
            Ok((t, _)) => t,
            Err(p) => p.into_inner().0,
        };
    }
}

fn reap_forever() {
    loop {
        let Some(r) = REAPER.get() else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        let generation = lock(r).generation;
        // Sleeps until some child is a zombie, without reaping it.
        match rustix::process::waitid(WaitId::All, WaitIdOptions::EXITED | WaitIdOptions::NOWAIT) {
            Ok(_) => reap_zombies(r),
            Err(rustix::io::Errno::CHILD) => {
                // No child at all: sleep until the next start. The timeout catches orphans
                // re-parented to us after a start.
                let table = lock(r);
                drop(
                    r.changed
                        .wait_timeout_while(table, Duration::from_secs(1), |t| {
                            t.generation == generation
                        }),
                );
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                tracing::warn!(error = %e, "waitid failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn reap_zombies(r: &Reaper) {
    let mut table = lock(r);
    // Our leaders that have exited but are not reaped yet: kill what is left of their groups
    // while their pids are still reserved.
    for pid in table.waiting.keys() {
        let Some(p) = Pid::from_raw(*pid) else {
            continue;
        };
        let opts = WaitIdOptions::EXITED | WaitIdOptions::NOWAIT | WaitIdOptions::NOHANG;
        if let Ok(Some(_)) = rustix::process::waitid(WaitId::Pid(p), opts) {
            kill_group(*pid);
        }
    }
    if KILL_ORPHANS.load(Ordering::Relaxed) {
        // Children we did not start came from a runner that died: its orphans are ours now.
        let swept = tree::kill_tree(
            own_pid(),
            |pid| table.waiting.contains_key(&pid),
            ORPHAN_SWEEP_BOUND,
        );
        if swept.killed > 0 || !swept.complete {
            tracing::warn!(
                killed = swept.killed,
                complete = swept.complete,
                "killed processes left by a runner that died"
            );
        }
    }
    // `wait` is waitpid(-1): any child. (`waitpid(None)` would be the caller's group only.)
    let mut reaped = false;
    while let Ok(Some((pid, status))) = rustix::process::wait(WaitOptions::NOHANG) {
        reaped = true;
        let pid = pid.as_raw_nonzero().get();
        if let Some(tx) = table.waiting.remove(&pid) {
            // A leader that exited between the scan above and here.
            kill_group(pid);
            let _ = tx.send(Exit {
                code: status.exit_status(),
                signal: status.terminating_signal(),
            });
        }
    }
    if reaped {
        table.generation = table.generation.wrapping_add(1);
        drop(table);
        r.changed.notify_all();
    }
}
