//! Starting commands in their own process group and reaping them.
//!
//! One thread per process waits for children to exit. It reaps every child, not only the ones
//! it started: the exec server is often PID 1 of its container, where the descendants of killed
//! commands are re-parented to it and would stay zombies otherwise. A consequence is that
//! nothing else in the process may start children and wait for them.
//!
//! When a command's leader exits, its whole process group is killed before the leader is reaped:
//! while the leader is a zombie its pid (which is also the group id) cannot be reused, so the
//! signal can only reach that command's group. Background processes never outlive their command.
//!
//! Commands inherit no descriptor of the server: the ones Rust opens are close-on-exec, and the
//! ones the process inherited are marked so before the first command starts.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use rustix::process::{Pid, Signal, WaitId, WaitIdOptions, WaitOptions};
use tokio::sync::oneshot;

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

#[derive(Default)]
struct Table {
    waiting: HashMap<i32, oneshot::Sender<Exit>>,
    /// Bumped on every start, so that the reaper thread sees starts it slept through.
    generation: u64,
}

struct Reaper {
    table: Mutex<Table>,
    started: Condvar,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();

fn reaper() -> &'static Reaper {
    REAPER.get_or_init(|| {
        // Descriptors the process inherited without close-on-exec (from a shell, a test runner,
        // a container runtime) would otherwise reach every command. Rust's own are marked.
        close_fds::set_fds_cloexec_threadsafe(3, &[]);
        let spawned = std::thread::Builder::new()
            .name("agentvm-reaper".into())
            .spawn(reap_forever);
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the reaper thread; commands will not end");
        }
        Reaper {
            table: Mutex::new(Table::default()),
            started: Condvar::new(),
        }
    })
}

fn lock(r: &Reaper) -> MutexGuard<'_, Table> {
    r.table.lock().unwrap_or_else(|p| p.into_inner())
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
    r.started.notify_all();
    Ok(Started { pid, child, exit })
}

/// Sends SIGKILL to the process group of a started command. A group already gone is not an
/// error.
pub fn kill_group(pid: i32) {
    if let Some(pid) = Pid::from_raw(pid) {
        let _ = rustix::process::kill_process_group(pid, Signal::KILL);
    }
}

/// Kills the groups of all commands still running (at shutdown).
pub fn kill_all() {
    let Some(r) = REAPER.get() else { return };
    let table = lock(r);
    for pid in table.waiting.keys() {
        kill_group(*pid);
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
                // re-parented to us (PID 1 of a container) after a start.
                let table = lock(r);
                drop(
                    r.started
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
    // `wait` is waitpid(-1): any child. (`waitpid(None)` would be the caller's group only.)
    while let Ok(Some((pid, status))) = rustix::process::wait(WaitOptions::NOHANG) {
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
}
