//! Where the engine keeps its auth state: `<data_dir>/whatsapp/<generation>/session.db`
//! (SQLite through wa-rs's store). Nothing outside `<data_dir>/whatsapp` is touched.
//!
//! Each pairing gets a fresh generation directory. A logout removes the whole `whatsapp`
//! directory; wa-rs keeps its old store open in a background task for the life of the
//! process, and because SQLite never creates directories, that stale handle can never
//! write into the next pairing's database.

use std::io;
use std::path::{Path, PathBuf};

/// The file name of the database inside a generation directory.
pub const DB_FILE: &str = "session.db";

pub fn root(data_dir: &Path) -> PathBuf {
    data_dir.join("whatsapp")
}

/// The generation holding a database, if any (the newest if a crash left several).
pub fn current(data_dir: &Path) -> io::Result<Option<PathBuf>> {
    let root = root(data_dir);
    let entries = match std::fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in entries {
        let path = entry?.path();
        let db = path.join(DB_FILE);
        if let Ok(meta) = std::fs::metadata(&db) {
            let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            if best.as_ref().is_none_or(|(m, _)| modified > *m) {
                best = Some((modified, path));
            }
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// A new, empty generation directory.
pub fn create(data_dir: &Path) -> io::Result<PathBuf> {
    let name = format!("{:016x}", rand::random::<u64>());
    let dir = root(data_dir).join(name);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The existing generation, or a new one.
pub fn open_or_create(data_dir: &Path) -> io::Result<PathBuf> {
    match current(data_dir)? {
        Some(dir) => Ok(dir),
        None => create(data_dir),
    }
}

/// Removes every trace of the auth state.
pub fn wipe(data_dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(root(data_dir)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Whether any auth state is left (used by tests and the logout check).
pub fn is_empty(data_dir: &Path) -> bool {
    std::fs::read_dir(root(data_dir)).map_or(true, |mut d| d.next().is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_are_found_created_and_wiped() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(current(dir.path()).unwrap(), None);
        assert!(is_empty(dir.path()));
        let g = open_or_create(dir.path()).unwrap();
        assert!(g.starts_with(dir.path().join("whatsapp")));
        // A generation without a database yet is not current.
        assert_eq!(current(dir.path()).unwrap(), None);
        std::fs::write(g.join(DB_FILE), b"x").unwrap();
        assert_eq!(current(dir.path()).unwrap(), Some(g.clone()));
        assert_eq!(open_or_create(dir.path()).unwrap(), g);
        wipe(dir.path()).unwrap();
        assert!(is_empty(dir.path()));
        assert!(!dir.path().join("whatsapp").exists());
        wipe(dir.path()).unwrap();
        // Nothing else in the data dir is touched.
        std::fs::write(dir.path().join("outbox.log"), b"keep").unwrap();
        let g = create(dir.path()).unwrap();
        std::fs::write(g.join(DB_FILE), b"x").unwrap();
        wipe(dir.path()).unwrap();
        assert_eq!(std::fs::read(dir.path().join("outbox.log")).unwrap(), b"keep");
    }
}
