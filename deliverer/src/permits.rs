//! A fair share of the attempt permits: `[deliverer] concurrency` HTTP
//! attempts under way at once, shared so that slow or failing handlers,
//! however many, cannot keep a healthy integration waiting.
//!
//! Three rules, checked when a job is about to be attempted:
//! - an integration never holds more than `per_integration_concurrency`
//!   permits;
//! - an integration that already has an attempt under way takes another
//!   permit only while more than the *headroom* (a quarter of the permits)
//!   are free: the headroom is kept for integrations with nothing under way;
//! - an integration with nothing under way takes any free permit, and when
//!   none is free it waits for the next one released (at most one attempt's
//!   timeout).
//!
//! A job refused by the first two rules is parked on the delay ladder
//! (acknowledged), so it holds neither a permit nor the shard's prefetch: a
//! slow integration keeps at most `concurrency - headroom` attempts under way
//! together with all other slow ones, and uses permits that nobody else is
//! waiting for. An integration with work and no attempt under way finds a
//! free permit at once unless the headroom itself is taken by as many
//! integrations' first attempts; the circuit breakers (`circuit`) then stop
//! the failing ones within `circuit_failures` attempts each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The permits of one deliverer.
#[derive(Debug)]
pub struct AttemptPermits {
    per_integration: usize,
    headroom: usize,
    state: Mutex<PermitState>,
    released: Notify,
}

#[derive(Debug)]
struct PermitState {
    free: usize,
    held: HashMap<String, usize>,
}

/// The job's integration has its share under way: park the job and try later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// One attempt's permit; released when dropped.
#[derive(Debug)]
pub struct AttemptPermit {
    permits: Arc<AttemptPermits>,
    integration: String,
}

impl AttemptPermits {
    pub fn new(total: usize, per_integration: usize) -> Arc<Self> {
        Arc::new(AttemptPermits {
            per_integration,
            headroom: total / 4,
            state: Mutex::new(PermitState {
                free: total,
                held: HashMap::new(),
            }),
            released: Notify::new(),
        })
    }

    /// A permit for one attempt of `integration`, now or after waiting for
    /// one to be released; `Busy` if the integration must wait its turn on
    /// the ladder instead.
    pub async fn acquire(self: &Arc<Self>, integration: &str) -> Result<AttemptPermit, Busy> {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(permit) = self.try_acquire(integration)? {
                return Ok(permit);
            }
            released.await;
        }
    }

    /// `Ok(None)`: nothing free, and the integration may wait for a permit.
    fn try_acquire(self: &Arc<Self>, integration: &str) -> Result<Option<AttemptPermit>, Busy> {
        let mut state = self.state.lock().expect("permits lock");
        let held = state.held.get(integration).copied().unwrap_or(0);
        if held >= self.per_integration || (held > 0 && state.free <= self.headroom) {
            return Err(Busy);
        }
        if state.free == 0 {
            return Ok(None);
        }
        state.free -= 1;
        *state.held.entry(integration.to_owned()).or_insert(0) += 1;
        Ok(Some(AttemptPermit {
            permits: self.clone(),
            integration: integration.to_owned(),
        }))
    }

    /// Permits under way for `integration`.
    #[cfg(test)]
    fn held(&self, integration: &str) -> usize {
        let state = self.state.lock().expect("permits lock");
        state.held.get(integration).copied().unwrap_or(0)
    }
}

impl Drop for AttemptPermit {
    fn drop(&mut self) {
        let mut state = self.permits.state.lock().expect("permits lock");
        state.free += 1;
        if let Some(n) = state.held.get_mut(&self.integration) {
            *n -= 1;
            if *n == 0 {
                state.held.remove(&self.integration);
            }
        }
        drop(state);
        self.permits.released.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn take(p: &Arc<AttemptPermits>, id: &str) -> Result<AttemptPermit, Busy> {
        tokio::time::timeout(Duration::from_secs(1), p.acquire(id))
            .await
            .expect("acquire waited although a permit or a refusal was due")
    }

    #[tokio::test]
    async fn the_per_integration_cap_holds() {
        let p = AttemptPermits::new(16, 3);
        let held: Vec<_> = [take(&p, "a").await, take(&p, "a").await, take(&p, "a").await]
            .into_iter()
            .map(|r| r.expect("within the cap"))
            .collect();
        assert_eq!(take(&p, "a").await.unwrap_err(), Busy);
        assert!(take(&p, "b").await.is_ok());
        drop(held);
        assert_eq!(p.held("a"), 0);
    }

    #[tokio::test]
    async fn slow_integrations_leave_the_headroom_to_idle_ones() {
        // 8 permits, headroom 2; four slow integrations each want many.
        let p = AttemptPermits::new(8, 8);
        let mut held = Vec::new();
        for round in 0..4 {
            for id in ["s1", "s2", "s3", "s4"] {
                match take(&p, id).await {
                    Ok(permit) => held.push(permit),
                    Err(Busy) => assert!(round > 0, "a first attempt was refused"),
                }
            }
        }
        assert_eq!(held.len(), 6, "slow ones stop at total - headroom");
        // An integration with nothing under way still gets one at once, and a second
        // idle one the last.
        let healthy = take(&p, "healthy")
            .await
            .expect("the headroom is for idle integrations");
        assert_eq!(
            take(&p, "healthy").await.unwrap_err(),
            Busy,
            "a second one is no longer idle"
        );
        let other = take(&p, "other").await.expect("one permit left");
        drop((healthy, other));
    }

    #[tokio::test]
    async fn an_idle_integration_waits_for_the_next_release_when_none_is_free() {
        let p = AttemptPermits::new(2, 2);
        let a = take(&p, "a").await.unwrap();
        let b = take(&p, "b").await.unwrap();
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.acquire("c").await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "no permit was free");
        drop(a);
        let c = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("the released permit went to the waiter")
            .unwrap()
            .unwrap();
        assert_eq!(p.held("c"), 1);
        drop((b, c));
        assert_eq!(p.held("a") + p.held("b") + p.held("c"), 0);
    }
}
