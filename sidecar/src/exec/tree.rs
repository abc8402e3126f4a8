//! Finding and ending every process a command left behind, whatever group or session it moved
//! to.
//!
//! Process groups and sessions belong to the command (`setsid`, `setpgid`), so they cannot tell
//! which processes are its own. Parent links can, in a process that is a child subreaper: a
//! descendant whose parent dies is re-parented to the nearest subreaper above it, so it never
//! leaves the subreaper's subtree. The walk reads the parent link of every process in `/proc`.
//!
//! Every process found is stopped first (SIGSTOP), so that nothing forks or reaps while the walk
//! goes on; passes repeat until one finds nothing new and nothing still running, and only then is
//! everything found killed (SIGKILL). Kills repeat until a walk finds nothing alive.
//!
//! A process is named by its pid and its start time, read again just before each signal: a pid
//! that an unrelated process took over in between is not signalled. The walk's own bookkeeping
//! knows parents by pid, so a process of another request could only be taken for one of ours if
//! a parent's pid were reused within one walk (milliseconds): the whole pid space would have to be
//! used up in that time.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

/// One process as `/proc/<pid>/stat` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proc {
    /// Process id.
    pub pid: i32,
    /// Parent's process id.
    pub ppid: i32,
    /// State letter (`R`, `S`, `D`, `T`, `t`, `Z`, ...).
    pub state: u8,
    /// Start time in clock ticks after boot: with the pid, names the process.
    pub start: u64,
}

impl Proc {
    /// Dead, or waiting for its parent to reap it: nothing left to signal.
    fn is_dead(&self) -> bool {
        matches!(self.state, b'Z' | b'X' | b'x')
    }

    /// Stopped (or traced), so it cannot fork or reap.
    fn is_stopped(&self) -> bool {
        matches!(self.state, b'T' | b't')
    }

    /// In uninterruptible sleep: a pending SIGSTOP takes effect before it runs again, so it can
    /// be counted as stopped once signalled.
    fn is_blocked(&self) -> bool {
        self.state == b'D'
    }
}

/// Parses the text of `/proc/<pid>/stat`. The command name is in parentheses and may itself
/// hold parentheses and spaces, so the fields are counted from the last `)`.
pub fn parse_stat(pid: i32, text: &str) -> Option<Proc> {
    let (_, rest) = text.rsplit_once(')')?;
    let mut fields = rest.split_ascii_whitespace();
    // Fields 3 (state) and 4 (ppid), then 22 (starttime).
    let state = *fields.next()?.as_bytes().first()?;
    let ppid = fields.next()?.parse().ok()?;
    let start = fields.nth(17)?.parse().ok()?;
    Some(Proc {
        pid,
        ppid,
        state,
        start,
    })
}

/// The process `pid` now, if there is one.
pub fn stat(pid: i32) -> Option<Proc> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(pid, &text)
}

/// The process ids in `/proc`, read as the walk goes (the kernel lists them in increasing
/// order, so children forked during a pass are usually still ahead of it).
fn pids() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
}

/// Sends `signal` to `p` if the process with its pid is still the one that started at its start
/// time and is not dead yet. Whether it was sent.
fn signal_same(p: &Proc, signal: Signal) -> bool {
    let Some(now) = stat(p.pid) else {
        return false;
    };
    if now.start != p.start || now.is_dead() {
        return false;
    }
    let Some(pid) = Pid::from_raw(p.pid) else {
        return false;
    };
    rustix::process::kill_process(pid, signal).is_ok()
}

/// What [`kill_tree`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Swept {
    /// Processes killed.
    pub killed: usize,
    /// Nothing is left alive (false: the time bound ran out first).
    pub complete: bool,
}

/// Stops, then kills, every descendant of `root` (a child subreaper), leaving out the children
/// of `root` for which `spare` holds, and their own descendants. Gives up after `bound`.
///
/// The caller must keep `root` from reaping its children during the walk: a child's pid is then
/// reserved for it, so the children are always signalled exactly.
pub fn kill_tree(root: i32, spare: impl Fn(i32) -> bool, bound: Duration) -> Swept {
    let until = Instant::now() + bound;
    let mut killed = HashSet::new();
    loop {
        let members = freeze(root, &spare, until);
        let mut signalled = false;
        for p in members.values() {
            if signal_same(p, Signal::KILL) {
                signalled = true;
                killed.insert((p.pid, p.start));
            }
        }
        if !signalled {
            return Swept {
                killed: killed.len(),
                complete: true,
            };
        }
        if Instant::now() >= until {
            return Swept {
                killed: killed.len(),
                complete: false,
            };
        }
        // Killed processes take a moment to die; their children come back to `root`.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Stops every descendant of `root` (but the spared subtrees) and returns them, once a pass finds
/// no new process and none running (or `until` has passed).
fn freeze(root: i32, spare: &impl Fn(i32) -> bool, until: Instant) -> HashMap<i32, Proc> {
    let mut members: HashMap<i32, Proc> = HashMap::new();
    loop {
        let mut grew = false;
        let mut running = false;
        for pid in pids() {
            if pid == root {
                continue;
            }
            let Some(p) = stat(pid) else {
                continue;
            };
            let ours = if p.ppid == root {
                !spare(p.pid)
            } else {
                members.contains_key(&p.ppid)
            };
            if !ours {
                continue;
            }
            if members
                .insert(p.pid, p)
                .is_none_or(|old| old.start != p.start)
            {
                grew = true;
            }
            if !p.is_dead() && !p.is_stopped() {
                signal_same(&p, Signal::STOP);
                running |= !p.is_blocked();
            }
        }
        if (!grew && !running) || Instant::now() >= until {
            return members;
        }
        if !grew {
            // Only waiting for stop signals to land.
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let text = "4242 (a) b) R 1 (c) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 200 18446744073709551615";
        let p = parse_stat(4242, text).unwrap();
        assert_eq!((p.ppid, p.state, p.start), (17, b'S', 987654));
        let plain = "7 (sleep) T 3 7 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 55 0 0";
        let p = parse_stat(7, plain).unwrap();
        assert_eq!((p.ppid, p.state, p.start), (3, b'T', 55));
        assert!(p.is_stopped() && !p.is_dead());
        assert_eq!(parse_stat(1, "1 (init S 0"), None);
        assert_eq!(parse_stat(1, "1 (x) Z"), None);
        assert_eq!(parse_stat(1, ""), None);
    }

    #[test]
    fn this_process_reads_as_running_with_its_parent() {
        let me = rustix::process::getpid().as_raw_nonzero().get();
        let p = stat(me).unwrap();
        let parent = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get());
        assert_eq!(p.ppid, parent);
        assert!(!p.is_dead() && !p.is_stopped());
        assert!(pids().any(|pid| pid == me));
    }
}
