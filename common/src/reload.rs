//! Hot reloading of anything loaded from files (policies, certificates, configuration).
//!
//! Files are polled by fingerprint (path, size, modification time) rather than watched with
//! inotify: Kubernetes updates ConfigMap and Secret mounts by swapping a symlink, which pollers see
//! reliably and inotify watches on the old target miss.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// A value that a background task may replace while readers keep using the one they hold.
#[derive(Debug)]
pub struct Reloadable<T> {
    current: RwLock<Arc<T>>,
}

impl<T> Reloadable<T> {
    /// Wraps the first good value.
    pub fn new(value: T) -> Self {
        Self {
            current: RwLock::new(Arc::new(value)),
        }
    }

    /// The value in force now.
    pub fn get(&self) -> Arc<T> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Puts a new value in force.
    pub fn set(&self, value: T) {
        let value = Arc::new(value);
        match self.current.write() {
            Ok(mut guard) => *guard = value,
            Err(poisoned) => *poisoned.into_inner() = value,
        }
    }
}

/// A fingerprint of files and folders (recursively): changes when any file is added, removed,
/// resized or touched. Unreadable entries count as absent.
pub fn fingerprint(paths: &[PathBuf]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for p in paths {
        hash_path(p, &mut hasher);
    }
    hasher.finish()
}

fn hash_path(path: &Path, hasher: &mut impl Hasher) {
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    path.hash(hasher);
    if meta.is_dir() {
        let Ok(entries) = std::fs::read_dir(path) else {
            return;
        };
        let mut children: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        children.sort();
        for child in children {
            hash_path(&child, hasher);
        }
    } else {
        meta.len().hash(hasher);
        if let Ok(modified) = meta.modified() {
            modified.hash(hasher);
        }
    }
}

/// What a watch reports after each reload attempt.
#[derive(Debug)]
pub enum ReloadEvent<'a, E> {
    /// The new version is in force.
    Reloaded,
    /// The new version was rejected; the last good one stays.
    Rejected(&'a E),
}

/// Polls `paths` every `interval`; when their fingerprint changes, calls `load` and puts the
/// result in force, or keeps the last good value when it fails. `report` hears about each
/// attempt (for logs and metrics). The task runs until the runtime stops.
pub fn spawn_watch<T, E, L, R>(
    target: Arc<Reloadable<T>>,
    paths: Vec<PathBuf>,
    interval: Duration,
    load: L,
    report: R,
) -> tokio::task::JoinHandle<()>
where
    T: Send + Sync + 'static,
    E: Send + 'static,
    L: Fn() -> Result<T, E> + Send + 'static,
    R: Fn(ReloadEvent<'_, E>) + Send + 'static,
{
    // Taken now, not in the task, so that a change right after the caller's first load is seen.
    let mut last = fingerprint(&paths);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let now = fingerprint(&paths);
            if now == last {
                continue;
            }
            last = now;
            match load() {
                Ok(value) => {
                    target.set(value);
                    report(ReloadEvent::Reloaded);
                }
                Err(e) => report(ReloadEvent::Rejected(&e)),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn reloads_good_versions_and_keeps_the_last_good_one() {
        let dir = std::env::temp_dir().join(format!("agentvm-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("value");
        std::fs::write(&file, "1").unwrap();
        let target = Arc::new(Reloadable::new(1u32));
        let events = Arc::new(Mutex::new(Vec::new()));
        let (f, ev) = (file.clone(), events.clone());
        let task = spawn_watch(
            target.clone(),
            vec![dir.clone()],
            Duration::from_millis(20),
            move || std::fs::read_to_string(&f).unwrap().trim().parse::<u32>(),
            move |e| ev.lock().unwrap().push(matches!(e, ReloadEvent::Reloaded)),
        );
        std::fs::write(&file, "22").unwrap();
        wait_for(|| *target.get() == 22).await;
        std::fs::write(&file, "not a number").unwrap();
        wait_for(|| events.lock().unwrap().len() == 2).await;
        assert_eq!(
            *target.get(),
            22,
            "a bad version must not replace the good one"
        );
        assert_eq!(*events.lock().unwrap(), vec![true, false]);
        task.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    async fn wait_for(cond: impl Fn() -> bool) {
        for _ in 0..200 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached");
    }
}
