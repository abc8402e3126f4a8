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
//! A process is its whole thread group, and its leader's state alone does not say what the group
//! does. A leader that ended by itself (the `exit` system call, not `exit_group`) stays a zombie
//! that its parent cannot reap while other threads of its process run on: such a process is
//! alive, and a signal to the leader's pid still reaches all of its threads. Where the leader is
//! not running, the walk looks at every thread of the group to tell running from stopped.
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
    /// State letter of the thread-group leader (`R`, `S`, `D`, `T`, `t`, `Z`, ...).
    pub state: u8,
    /// Threads in the thread group, a zombie leader included.
    pub threads: u32,
    /// Start time in clock ticks after boot: with the pid, names the process.
    pub start: u64,
}

impl Proc {
    /// Dead, or waiting for its parent to reap it: nothing left to signal. A zombie leader with
    /// other threads still in its group is not dead.
    fn is_dead(&self) -> bool {
        Activity::of(self.state) == Activity::Dead && self.threads <= 1
    }

    /// What the process as a whole does: what its busiest thread does. Only a leader that is
    /// not running itself has its other threads looked at.
    fn activity(&self) -> Activity {
        let leader = Activity::of(self.state);
        if self.threads <= 1 || leader == Activity::Running {
            return leader;
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid)) else {
            return leader;
        };
        tasks
            .filter_map(|entry| {
                let tid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
                let path = format!("/proc/{}/task/{tid}/stat", self.pid);
                let thread = parse_stat(tid, &std::fs::read_to_string(path).ok()?)?;
                Some(Activity::of(thread.state))
            })
            .fold(leader, Activity::max)
    }
}

/// What a thread, or a whole process, does, from the least to the most active.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Activity {
    /// Exited (a zombie waiting to be reaped included).
    Dead,
    /// Stopped (or traced), so it cannot fork or reap.
    Stopped,
    /// In uninterruptible sleep: a pending SIGSTOP takes effect before it runs again, so it can
    /// be counted as stopped once signalled.
    Blocked,
    /// Anything else.
    Running,
}

impl Activity {
    fn of(state: u8) -> Self {
        match state {
            b'Z' | b'X' | b'x' => Activity::Dead,
            b'T' | b't' => Activity::Stopped,
            b'D' => Activity::Blocked,
            _ => Activity::Running,
        }
    }
}

/// Parses the text of `/proc/<pid>/stat`. The command name is in parentheses and may itself
/// hold parentheses and spaces, so the fields are counted from the last `)`.
pub fn parse_stat(pid: i32, text: &str) -> Option<Proc> {
    let (_, rest) = text.rsplit_once(')')?;
    let mut fields = rest.split_ascii_whitespace();
    // Fields 3 (state) and 4 (ppid), then 20 (num_threads) and 22 (starttime).
    let state = *fields.next()?.as_bytes().first()?;
    let ppid = fields.next()?.parse().ok()?;
    let threads = fields.nth(15)?.parse().ok()?;
    let start = fields.nth(1)?.parse().ok()?;
    Some(Proc {
        pid,
        ppid,
        state,
        threads,
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

/// Sends `signal` to `p` (to its whole thread group) if the process with its pid is still the one
/// that started at its start time and is not dead yet. Whether it was sent.
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
            match p.activity() {
                Activity::Dead | Activity::Stopped => {}
                activity => {
                    signal_same(&p, Signal::STOP);
                    running |= activity == Activity::Running;
                }
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
        assert_eq!((p.ppid, p.state, p.threads, p.start), (17, b'S', 1, 987654));
        let plain = "7 (sleep) T 3 7 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 55 0 0";
        let p = parse_stat(7, plain).unwrap();
        assert_eq!((p.ppid, p.state, p.threads, p.start), (3, b'T', 1, 55));
        assert!(p.activity() == Activity::Stopped && !p.is_dead());
        assert_eq!(parse_stat(1, "1 (init S 0"), None);
        assert_eq!(parse_stat(1, "1 (x) Z"), None);
        assert_eq!(parse_stat(1, ""), None);
    }

    #[test]
    fn a_zombie_leader_is_dead_only_once_its_threads_are_gone() {
        let alone = "9 (python3) Z 3 9 9 0 -1 0 0 0 0 0 0 0 0 0 20 0 2 0 55 0 0";
        let p = parse_stat(9, alone).unwrap();
        assert_eq!((p.state, p.threads), (b'Z', 2));
        assert!(!p.is_dead(), "its other thread runs on");
        let gone = "9 (python3) Z 3 9 9 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 55 0 0";
        assert!(parse_stat(9, gone).unwrap().is_dead());
        assert_eq!(
            Activity::of(b'Z').max(Activity::of(b'S')),
            Activity::Running
        );
        assert_eq!(
            Activity::of(b'Z').max(Activity::of(b'T')),
            Activity::Stopped
        );
        assert_eq!(
            Activity::of(b'T').max(Activity::of(b'D')),
            Activity::Blocked
        );
    }

    #[test]
    fn this_process_reads_as_running_with_its_parent() {
        let me = rustix::process::getpid().as_raw_nonzero().get();
        let p = stat(me).unwrap();
        let parent = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get());
        assert_eq!(p.ppid, parent);
        assert!(!p.is_dead() && p.activity() == Activity::Running);
        assert!(pids().any(|pid| pid == me));
    }
}
