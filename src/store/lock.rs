//! The daemon's exclusive claim on a store: a `flock` on `<db>.lock` holding its pid.
//!
//! Only `serve` takes it (two daemons on one store would poll and alert twice); the
//! one-shot commands (`poll`, `reconcile`, `import-ledger`) open the store beside a
//! running daemon, SQLite's own locking ordering their writes.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Why the lock was not taken. `Display` is one sentence naming the holder.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("the store {db} is in use by another cashout-recon serve (pid {pid}); stop it first or give this one another store.path")]
    Held { db: String, pid: String },
    #[error("cannot lock the store: {path}: {reason}")]
    Io { path: String, reason: String },
}

/// Held while the daemon runs; the lock is released when this is dropped (or the process
/// ends, however it ends: the kernel drops a `flock` with its last descriptor).
#[derive(Debug)]
pub struct StoreLock {
    _file: Flock<File>,
    path: PathBuf,
}

impl StoreLock {
    /// The lock file of the database at `db_path`: `<db_path>.lock`.
    pub fn path_for(db_path: &Path) -> PathBuf {
        let mut name = db_path.as_os_str().to_owned();
        name.push(".lock");
        PathBuf::from(name)
    }

    /// Takes the exclusive lock beside `db_path` and writes this process's pid into it,
    /// or says which process holds it.
    pub fn acquire(db_path: &Path) -> Result<StoreLock, LockError> {
        let path = StoreLock::path_for(db_path);
        let io = |err: std::io::Error| LockError::Io {
            path: path.display().to_string(),
            reason: err.to_string(),
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let pid = holder.trim();
                return Err(LockError::Held {
                    db: db_path.display().to_string(),
                    pid: if pid.is_empty() {
                        "unknown".to_string()
                    } else {
                        pid.to_string()
                    },
                });
            }
            Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
        };
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)).map(|_| ()))
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .and_then(|()| file.sync_data())
            .map_err(io)?;
        Ok(StoreLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_store_is_refused_naming_the_holder_pid() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("book.db");
        let first = StoreLock::acquire(&db).expect("the first lock");
        let text = std::fs::read_to_string(first.path()).expect("lock file");
        assert_eq!(text.trim(), std::process::id().to_string());

        let second = StoreLock::acquire(&db).expect_err("the store is held");

        assert_eq!(
            second.to_string(),
            format!(
                "the store {} is in use by another cashout-recon serve (pid {}); stop it first or give this one another store.path",
                db.display(),
                std::process::id()
            )
        );
        drop(first);
        StoreLock::acquire(&db).expect("free again once the holder is gone");
    }
}
