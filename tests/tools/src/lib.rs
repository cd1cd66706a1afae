//! What people run next to swallow, kept apart from the test harness so
//! that the quick start and the container image compile only this and the
//! stages: the chat side (`swallow-chat`), the seed's example handler
//! (`swallow-googlebot`) and the quick start (`swallow-quickstart`).
//! The tests use the same code through `swallow_tests::{chat, googlebot}`.

use std::time::Duration;

pub mod chat;
pub mod googlebot;

/// Polls a `/readyz` URL until it answers 200; false after `timeout`.
pub async fn wait_ready(url: &str, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if reqwest::get(url).await.is_ok_and(|r| r.status().is_success()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
