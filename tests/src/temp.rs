//! `TempDir`: a test's own temporary directory, removed when dropped, so a
//! test that panics leaves nothing behind either.

use std::path::{Path, PathBuf};

/// A fresh directory under the system's temporary directory, named after
/// the test; removed with everything in it when dropped. Derefs to its
/// `Path`, so `dir.join(…)` and `&dir` work where a path is asked for.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `swallow-<name>-<random>` under the temporary directory.
    pub fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("swallow-{name}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).expect("creating a temporary directory");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::TempDir;

    #[test]
    fn a_temp_dir_is_removed_when_dropped_even_by_a_panic() {
        let dir = TempDir::new("guard");
        std::fs::write(dir.join("file"), "x").unwrap();
        let path = dir.path().to_owned();
        drop(dir);
        assert!(!path.exists(), "{} left behind", path.display());

        let path = std::panic::catch_unwind(|| {
            let dir = TempDir::new("guard-panic");
            let path = dir.path().to_owned();
            std::panic::panic_any(path);
        })
        .unwrap_err()
        .downcast::<std::path::PathBuf>()
        .unwrap();
        assert!(!path.exists(), "{} left behind by a panicking test", path.display());
    }
}
