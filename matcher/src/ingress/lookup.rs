//! The names an Events API payload lacks and the legacy POST carries
//! (`team_domain`, `channel_name`, `user_name`), from Slack's Web API
//! (`team.info`, `conversations.info`, `users.info`) through the bot token,
//! cached: names found for [`FOUND_TTL`], failures for [`FAILED_TTL`].
//!
//! A request waits for its names at most its budget; a lookup that runs
//! longer goes on in its own task and fills the cache for the next event.
//! Slack's `429` stops all lookups until its `Retry-After` has passed.

use super::cache::{FAILED_TTL, FOUND_TTL, Lookups, within_budget};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;
use reqwest::header::RETRY_AFTER;
use serde_json::Value;
use tokio::sync::watch;
use tracing::warn;
use url::Url;

use swallow_shared::ChatEvent;
use swallow_shared::config::SlackSecrets;

/// A `429` without a usable `Retry-After` stops lookups this long.
const DEFAULT_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Kind {
    Team,
    Channel,
    User,
}

impl Kind {
    fn method(self) -> &'static str {
        match self {
            Kind::Team => "team.info",
            Kind::Channel => "conversations.info",
            Kind::User => "users.info",
        }
    }

    fn param(self) -> &'static str {
        match self {
            Kind::Team => "team",
            Kind::Channel => "channel",
            Kind::User => "user",
        }
    }

    /// The name in a method's `ok` answer.
    fn name_in(self, body: &Value) -> Option<String> {
        let nonempty = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
        match self {
            Kind::Team => nonempty(&body["team"]["domain"]),
            Kind::Channel => {
                let c = &body["channel"];
                nonempty(&c["name"]).or_else(|| (c["is_im"] == Value::Bool(true)).then(|| "directmessage".to_owned()))
            }
            // As Slack shows a person: the display name, else the full name,
            // else the account's name.
            Kind::User => {
                let u = &body["user"];
                nonempty(&u["profile"]["display_name"])
                    .or_else(|| nonempty(&u["profile"]["real_name"]))
                    .or_else(|| nonempty(&u["real_name"]))
                    .or_else(|| nonempty(&u["name"]))
            }
        }
    }
}

/// The outcome label of one lookup (`swallow_ingress_lookups_total{result}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Cached,
    Fetched,
    Failed,
    RateLimited,
}

/// Every `result` label of `swallow_ingress_lookups_total`.
pub const RESULTS: &[&str] = &["cached", "fetched", "failed", "timeout", "rate_limited"];

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Cached => "cached",
            Outcome::Fetched => "fetched",
            Outcome::Failed => "failed",
            Outcome::RateLimited => "rate_limited",
        }
    }
}

struct Shared {
    api_base: Url,
    secrets: watch::Receiver<Arc<SlackSecrets>>,
    lookups: Lookups<(Kind, String)>,
    /// No lookups before this (Slack's `Retry-After`).
    paused_until: Mutex<Option<Instant>>,
}

/// The names cache; clones share it.
#[derive(Clone)]
pub struct Names(Arc<Shared>);

impl Names {
    pub fn new(
        api_base: Url,
        secrets: watch::Receiver<Arc<SlackSecrets>>,
        client: reqwest::Client,
        lookups: IntCounterVec,
    ) -> Self {
        let lookups = Lookups::new(client, lookups);
        let paused_until = Mutex::default();
        Names(Arc::new(Shared {
            api_base,
            secrets,
            lookups,
            paused_until,
        }))
    }

    /// Fills the event's `team_domain`, `channel_name` and `user_name`,
    /// waiting at most `budget`; a name not found in time stays empty.
    pub async fn fill(&self, event: &mut ChatEvent, budget: Duration) {
        let deadline = tokio::time::Instant::now() + budget;
        let user = (event.bot_id.is_none()).then(|| event.user_id.clone());
        let (team, channel, user) = tokio::join!(
            self.name(Kind::Team, event.team_id.clone(), deadline),
            self.name(Kind::Channel, event.channel_id.clone(), deadline),
            async {
                match user {
                    Some(u) => self.name(Kind::User, u, deadline).await,
                    None => None,
                }
            },
        );
        event.team_domain = team.unwrap_or_default();
        event.channel_name = channel.unwrap_or_default();
        event.user_name = user.unwrap_or_default();
    }

    async fn name(&self, kind: Kind, id: String, deadline: tokio::time::Instant) -> Option<String> {
        if let Some(name) = self.0.lookups.cache.get(&(kind, id.clone())) {
            self.count(if name.is_some() {
                Outcome::Cached
            } else {
                Outcome::Failed
            });
            return name;
        }
        if self.paused() {
            self.count(Outcome::RateLimited);
            return None;
        }
        let me = self.clone();
        let lookup = async move {
            let (outcome, name) = me.fetch(kind, id).await;
            (outcome.as_str(), name)
        };
        let (outcome, name) = within_budget(deadline, lookup).await;
        self.0.lookups.count(outcome);
        name
    }

    fn count(&self, outcome: Outcome) {
        self.0.lookups.count(outcome.as_str());
    }

    fn paused(&self) -> bool {
        let mut paused = self.0.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        match *paused {
            Some(until) if until > Instant::now() => true,
            Some(_) => {
                *paused = None;
                false
            }
            None => false,
        }
    }

    /// One Web API call, its result cached.
    async fn fetch(&self, kind: Kind, id: String) -> (Outcome, Option<String>) {
        let result = self.call(kind, &id).await;
        let (outcome, name, ttl) = match result {
            Ok(name) => (Outcome::Fetched, Some(name), FOUND_TTL),
            Err(Failure::RateLimited) => return (Outcome::RateLimited, None),
            Err(Failure::Other(error)) => {
                warn!(method = kind.method(), %error, "Slack name lookup failed; published without the name");
                (Outcome::Failed, None, FAILED_TTL)
            }
        };
        self.0.lookups.cache.put((kind, id), name.clone(), ttl);
        (outcome, name)
    }

    async fn call(&self, kind: Kind, id: &str) -> Result<String, Failure> {
        let mut url = self.0.api_base.clone();
        url.path_segments_mut()
            .map_err(|_| Failure::Other("api_base cannot be a base".into()))?
            .pop_if_empty()
            .push(kind.method());
        url.query_pairs_mut().append_pair(kind.param(), id);
        let token = self.0.secrets.borrow().bot_token.clone();
        let response = self
            .0
            .lookups
            .request(reqwest::Method::GET, url, &token)
            .send()
            .await
            .map_err(|e| Failure::Other(format!("{}: {e}", kind.method())))?;
        if response.status().as_u16() == 429 {
            let wait = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(swallow_shared::job::retry::parse_retry_after)
                .unwrap_or(DEFAULT_BACKOFF);
            *self.0.paused_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + wait);
            warn!(
                method = kind.method(),
                wait_s = wait.as_secs_f64(),
                "Slack rate-limited name lookups; none until then"
            );
            return Err(Failure::RateLimited);
        }
        if !response.status().is_success() {
            return Err(Failure::Other(format!(
                "{}: HTTP {}",
                kind.method(),
                response.status().as_u16()
            )));
        }
        let body: Value = response
            .json()
            .await
            .map_err(|e| Failure::Other(format!("{}: not JSON: {e}", kind.method())))?;
        if body["ok"] != Value::Bool(true) {
            let error = body["error"].as_str().unwrap_or("ok:false without an error");
            return Err(Failure::Other(format!("{}: {error}", kind.method())));
        }
        kind.name_in(&body)
            .ok_or_else(|| Failure::Other(format!("{}: no name in the answer", kind.method())))
    }
}

enum Failure {
    RateLimited,
    Other(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_as_slack_shows_them() {
        let user = serde_json::json!({"ok": true, "user": {"name": "steve", "real_name": "Steve R",
            "profile": {"display_name": "", "real_name": "Steve Roberts"}}});
        assert_eq!(Kind::User.name_in(&user).as_deref(), Some("Steve Roberts"));
        let user = serde_json::json!({"ok": true, "user": {"name": "steve",
            "profile": {"display_name": "Steve", "real_name": "Steve Roberts"}}});
        assert_eq!(Kind::User.name_in(&user).as_deref(), Some("Steve"));
        let im = serde_json::json!({"ok": true, "channel": {"id": "D1", "is_im": true}});
        assert_eq!(Kind::Channel.name_in(&im).as_deref(), Some("directmessage"));
        let team = serde_json::json!({"ok": true, "team": {"domain": "example"}});
        assert_eq!(Kind::Team.name_in(&team).as_deref(), Some("example"));
    }
}
