//! What a platform told us about a name, kept for a while: names found for
//! long, failures for a short time, so that a burst of events in one channel
//! makes one lookup and a platform that failed is asked again soon.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;
use reqwest::header::AUTHORIZATION;
use url::Url;

/// How long a name found is used.
pub(crate) const FOUND_TTL: Duration = Duration::from_secs(600);
/// How long a failed lookup is not tried again.
pub(crate) const FAILED_TTL: Duration = Duration::from_secs(60);
/// Each lookup's own bound, past the request's budget.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Entries kept; the cache is emptied when it grows past this.
const MAX_ENTRIES: usize = 50_000;

struct Entry {
    /// `None`: the platform has no such name (or the lookup failed).
    value: Option<String>,
    until: Instant,
}

/// Values by key, each until its time to live ends.
pub(crate) struct TtlCache<K>(Mutex<HashMap<K, Entry>>);

impl<K: Hash + Eq> Default for TtlCache<K> {
    fn default() -> Self {
        TtlCache(Mutex::default())
    }
}

impl<K: Hash + Eq> TtlCache<K> {
    /// The value kept for `key`, if any is still in force (`Some(None)`: kept
    /// as absent).
    pub(crate) fn get(&self, key: &K) -> Option<Option<String>> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key)
            .filter(|e| e.until > Instant::now())
            .map(|e| e.value.clone())
    }

    /// Keeps `value` for `key` for `ttl`.
    pub(crate) fn put(&self, key: K, value: Option<String>, ttl: Duration) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
        map.insert(
            key,
            Entry {
                value,
                until: Instant::now() + ttl,
            },
        );
    }

    /// Forgets every key `drop` says.
    pub(crate) fn forget(&self, drop: impl Fn(&K) -> bool) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| !drop(k));
    }
}

/// What a platform's lookups hold: the HTTP client, the values found and
/// the `swallow_ingress_lookups_total` counter.
pub(crate) struct Lookups<K> {
    client: reqwest::Client,
    pub(crate) cache: TtlCache<K>,
    counter: IntCounterVec,
}

impl<K: Hash + Eq> Lookups<K> {
    pub(crate) fn new(client: reqwest::Client, counter: IntCounterVec) -> Self {
        Lookups {
            client,
            cache: TtlCache::default(),
            counter,
        }
    }

    /// Counts one lookup by its outcome (the metric's `result` label).
    pub(crate) fn count(&self, outcome: &str) {
        self.counter.with_label_values(&[outcome]).inc();
    }

    /// A request to the platform as the bot, bounded by the lookup timeout.
    pub(crate) fn request(&self, method: reqwest::Method, url: Url, token: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, url)
            .timeout(LOOKUP_TIMEOUT)
            .header(AUTHORIZATION, format!("Bearer {token}"))
    }
}

/// Runs a lookup in a task of its own, so that one outlasting the request's
/// budget still fills the cache for the next event, and waits for it until
/// `deadline`: the lookup's outcome (a metric label) and value, else
/// `"failed"` (the task died) or `"timeout"`, without a value.
pub(crate) async fn within_budget<F>(deadline: tokio::time::Instant, lookup: F) -> (&'static str, Option<String>)
where
    F: std::future::Future<Output = (&'static str, Option<String>)> + Send + 'static,
{
    match tokio::time::timeout_at(deadline, tokio::spawn(lookup)).await {
        Ok(Ok(done)) => done,
        Ok(Err(_)) => ("failed", None),
        Err(_) => ("timeout", None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_kept_for_their_time_and_forgotten_on_demand() {
        let cache = TtlCache::default();
        assert_eq!(cache.get(&"a"), None);
        cache.put("a", Some("name".into()), Duration::from_secs(60));
        cache.put("b", None, Duration::from_secs(60));
        cache.put("c", Some("gone".into()), Duration::ZERO);
        assert_eq!(cache.get(&"a"), Some(Some("name".into())));
        assert_eq!(cache.get(&"b"), Some(None), "kept as absent");
        assert_eq!(cache.get(&"c"), None, "past its time");
        cache.forget(|k| *k == "a");
        assert_eq!(cache.get(&"a"), None);
    }
}
