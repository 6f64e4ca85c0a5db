//! Reloading: on SIGHUP, and when a file the config came from or a
//! certificate file changes.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::Shared;

/// Reloads on SIGHUP and, debounced, when a watched file changes: a config
/// path, a TLS listener's certificate or key, or a file the config's
/// DestinationRules name for upstream TLS (the set followed anew after
/// each reload, as the config may name other files).
pub(super) fn spawn_reloader(
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    watch_files: bool,
) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    if watch_files {
        *shared.files.lock().unwrap_or_else(|e| e.into_inner()) =
            FileWatch::new(&shared.config_paths, tx.clone());
        shared.follow_certificate_files(&shared.installed_files());
    }
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        // Installed before `run` says it is ready, not when a task first
        // runs: a SIGHUP in between would end the process.
        let tx = tx.clone();
        let hup = signal(SignalKind::hangup());
        if let Err(error) = &hup {
            warn!(%error, "cannot handle SIGHUP");
        }
        tokio::spawn(async move {
            let Ok(mut hup) = hup else {
                return;
            };
            while hup.recv().await.is_some() {
                info!("SIGHUP: reloading config");
                let _ = tx.try_send(());
            }
        });
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                event = rx.recv() => if event.is_none() { break },
                _ = stop.changed() => break,
            }
            // Editors write files in several steps: let them settle.
            tokio::time::sleep(Duration::from_millis(100)).await;
            while rx.try_recv().is_ok() {}
            let shared = shared.clone();
            let _ = tokio::task::spawn_blocking(move || shared.reload()).await;
        }
        // The watcher's thread ends with it, not with the last `Shared`.
        shared
            .files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    });
}

/// Watches the config paths and a set of certificate files: a change to
/// one of those, or to `..data` beside a certificate file (Kubernetes and
/// cert-manager rotate a mounted secret by swapping that link, not by
/// writing the files), reloads. Other files in those directories (an
/// access log, say) do not.
pub(super) struct FileWatch {
    watcher: notify::RecommendedWatcher,
    /// The certificate files by the directory as named (canonical) and
    /// their name, shared with the event handler.
    files: Arc<Mutex<Vec<(PathBuf, OsString)>>>,
    /// Directories watched for the config paths, for good.
    config_dirs: Vec<PathBuf>,
    /// Directories watched for the certificate files, as they were last
    /// followed.
    file_dirs: Vec<PathBuf>,
}

impl FileWatch {
    fn new(paths: &[PathBuf], tx: mpsc::Sender<()>) -> Option<FileWatch> {
        let config: Vec<PathBuf> = (paths.iter())
            .filter_map(|p| std::fs::canonicalize(p).ok())
            .collect();
        let files = Arc::new(Mutex::new(Vec::new()));
        let (relevant, named) = (config.clone(), files.clone());
        let mut watcher = notify::recommended_watcher(
            move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                if event.kind.is_access() {
                    return;
                }
                let named = named.lock().unwrap_or_else(|e| e.into_inner());
                if (event.paths.iter()).any(|changed| reloads_for(changed, &relevant, &named)) {
                    let _ = tx.try_send(());
                }
            },
        )
        .map_err(
            |error| warn!(%error, "cannot watch config or certificate files; reload with SIGHUP"),
        )
        .ok()?;
        // The directory holding a file: editors replace files by rename.
        let mut config_dirs: Vec<PathBuf> = (config.iter())
            .map(|path| match path.parent() {
                Some(dir) if !path.is_dir() => dir.to_path_buf(),
                _ => path.clone(),
            })
            .collect();
        config_dirs.sort();
        config_dirs.dedup();
        for dir in &config_dirs {
            watch(&mut watcher, dir);
        }
        Some(FileWatch {
            watcher,
            files,
            config_dirs,
            file_dirs: Vec::new(),
        })
    }

    /// Watches `files` from now on, in place of the files followed before:
    /// the directories only they needed are no longer watched. Returns
    /// whether any of `files` was not followed before.
    pub(super) fn follow(&mut self, files: &[PathBuf]) -> bool {
        use notify::Watcher;
        let mut named: Vec<(PathBuf, OsString)> = files.iter().flat_map(|f| names(f)).collect();
        named.sort();
        named.dedup();
        let mut dirs: Vec<PathBuf> = (named.iter())
            .map(|(dir, _)| dir.clone())
            .filter(|dir| !self.config_dirs.contains(dir))
            .collect();
        dirs.dedup();
        // Named before watched: an event in between finds its file.
        let mut followed = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let new = named.iter().any(|file| !followed.contains(file));
        *followed = named;
        drop(followed);
        // Every time, not only for new directories: one removed and made
        // again has lost its watch.
        for dir in &dirs {
            watch(&mut self.watcher, dir);
        }
        for dir in self.file_dirs.iter().filter(|dir| !dirs.contains(dir)) {
            let _ = self.watcher.unwatch(dir);
        }
        self.file_dirs = dirs;
        new
    }
}

/// What to watch for `file`: its name in the directory the path names,
/// not the one a symlinked file lives in (a mounted secret's files are
/// links into a directory that is replaced); and the name of every
/// symbolic link among the directories above it, in its own directory
/// (`ln -sfn v2 certs` swaps them all at once). A directory not made yet
/// is watched for in the nearest one above it that exists.
fn names(file: &Path) -> Vec<(PathBuf, OsString)> {
    let in_dir = |path: &Path| {
        let mut name = path.file_name()?;
        let mut dir = path.parent();
        loop {
            let named = dir.filter(|d| !d.as_os_str().is_empty());
            let named = named.unwrap_or(Path::new("."));
            if let Ok(canonical) = std::fs::canonicalize(named) {
                return Some((canonical, name.to_os_string()));
            }
            name = named.file_name()?;
            dir = named.parent();
        }
    };
    let links = (file.ancestors().skip(1)).filter(|dir| {
        dir.symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
    });
    (std::iter::once(file).chain(links))
        .filter_map(in_dir)
        .collect()
}

fn watch(watcher: &mut notify::RecommendedWatcher, dir: &Path) {
    use notify::{RecursiveMode, Watcher};
    if let Err(error) = watcher.watch(dir, RecursiveMode::NonRecursive) {
        warn!(path = %dir.display(), %error, "cannot watch this directory for changes; reload with SIGHUP");
    }
}

/// Whether a change to `changed` calls for a reload: it is under a config
/// path, or it is a certificate file (by its directory as named and its
/// name) or the `..data` link beside one.
fn reloads_for(changed: &Path, config: &[PathBuf], certificates: &[(PathBuf, OsString)]) -> bool {
    if (config.iter()).any(|watched| changed.starts_with(watched)) {
        return true;
    }
    let (Some(dir), Some(name)) = (changed.parent(), changed.file_name()) else {
        return false;
    };
    (certificates.iter()).any(|(d, n)| d == dir && (n == name || name == "..data"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_config_paths_and_certificate_files_reload() {
        let config = [PathBuf::from("/etc/umbra"), PathBuf::from("/srv/app.yaml")];
        let certificates = [(PathBuf::from("/etc/tls"), "tls.crt".into())];
        let reloads = |path: &str| reloads_for(Path::new(path), &config, &certificates);
        assert!(reloads("/etc/umbra/routes.yaml"));
        assert!(reloads("/srv/app.yaml"));
        assert!(reloads("/etc/tls/tls.crt"));
        assert!(reloads("/etc/tls/..data"), "a mounted secret's rotation");
        assert!(
            !reloads("/etc/tls/access.log"),
            "another file beside the certificate"
        );
        assert!(
            !reloads("/srv/access.log"),
            "another file beside the config"
        );
        assert!(!reloads("/elsewhere/tls.crt"));
    }
}
