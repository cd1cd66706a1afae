//! A backstop for a test that hangs: every bound in these helpers should
//! make a stuck wait fail with a message, but a wait that escapes them would
//! otherwise hold the whole run until CI kills it, saying nothing. Each
//! `TestStack` and handler server registers the test that made it (libtest
//! names its thread after the test); a thread of the test binary's own fails
//! the binary, naming the test, once one has run longer than
//! `SWALLOW_TEST_LIMIT_SECS` (default 20 minutes; the longest test takes a
//! few).

use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

static RUNNING: Mutex<Vec<(u64, String, Instant)>> = Mutex::new(Vec::new());
static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static WATCH: Once = Once::new();

/// Held while a test runs; unregisters it when dropped.
pub struct Running(u64);

/// Registers the calling test (by its thread's name) with the watchdog.
pub fn running() -> Running {
    WATCH.call_once(|| {
        let limit = std::env::var("SWALLOW_TEST_LIMIT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(Duration::from_secs(20 * 60), Duration::from_secs);
        std::thread::spawn(move || watch(limit));
    });
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = std::thread::current().name().unwrap_or("?").to_owned();
    lock().push((id, name, Instant::now()));
    Running(id)
}

impl Drop for Running {
    fn drop(&mut self) {
        lock().retain(|(id, ..)| *id != self.0);
    }
}

fn lock() -> std::sync::MutexGuard<'static, Vec<(u64, String, Instant)>> {
    RUNNING.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn watch(limit: Duration) {
    loop {
        std::thread::sleep(Duration::from_secs(5));
        let stuck: Vec<String> = lock()
            .iter()
            .filter(|(.., since)| since.elapsed() > limit)
            .map(|(_, name, since)| format!("{name} ({:.0?})", since.elapsed()))
            .collect();
        if !stuck.is_empty() {
            eprintln!(
                "swallow tests: watchdog: running longer than {limit:?} (SWALLOW_TEST_LIMIT_SECS), \
                 so stopping this test binary: {}",
                stuck.join(", ")
            );
            std::process::exit(101);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    /// Not run on its own: the test below runs it in a child process.
    #[tokio::test]
    #[ignore = "run by a_test_that_hangs_fails_its_binary_naming_it"]
    async fn hangs() {
        let _handler = crate::handler::HandlerServer::start(|_, _| crate::handler::Answer::status(200)).await;
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    }

    #[test]
    fn a_test_that_hangs_fails_its_binary_naming_it() {
        let started = std::time::Instant::now();
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "watchdog::tests::hangs", "--nocapture"])
            .env("SWALLOW_TEST_LIMIT_SECS", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(101), "{stderr}");
        assert!(
            stderr.contains("watchdog: running longer than 1s") && stderr.contains("watchdog::tests::hangs ("),
            "{stderr}"
        );
        assert!(
            started.elapsed().as_secs() < 30,
            "the watchdog took {:?}",
            started.elapsed()
        );
    }
}
