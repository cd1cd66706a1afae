//! A Matrix homeserver's Application Service API (docs/contract.md §9):
//! the transactions it pushes, their token, the conversion of an
//! `m.room.message` into a chat event, the names of rooms and members
//! (read through the client-server API with the `as_token`, cached, and
//! kept current by the state events the transactions carry), and the bot's
//! joins when it is invited.
//!
//! A serde layer of our own rather than `ruma`'s: swallow reads a dozen
//! fields of four event types, and any other event, or a malformed one,
//! must pass through as "not a message", never fail the whole transaction
//! (`ruma-events`' typed enums reject or bury what they do not model; the
//! crates would also add about a hundred thousand lines to build for it).

use super::cache::{FAILED_TTL, FOUND_TTL, Lookups, within_budget};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntCounterVec;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::watch;
use tracing::{info, warn};
use url::Url;

use swallow_shared::ChatEvent;
use swallow_shared::config::{MatrixIngress, MatrixSecrets};

/// The platform name events from Matrix carry (`"platform": "matrix"`).
pub const PLATFORM: &str = "matrix";

/// Whether the request carries the homeserver's token: `Authorization:
/// Bearer <hs_token>`, or the legacy `?access_token=` older servers send.
#[derive(Debug, PartialEq, Eq)]
pub enum Auth {
    Ok,
    /// 401 `M_MISSING_TOKEN`.
    Missing,
    /// 403 `M_FORBIDDEN`.
    Wrong,
}

pub fn check_token(hs_token: &str, header: Option<&str>, query: Option<&str>) -> Auth {
    let given = header
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .map(str::to_owned)
        .or_else(|| {
            url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .find(|(k, _)| k == "access_token")
                .map(|(_, v)| v.into_owned())
        });
    match given {
        None => Auth::Missing,
        Some(t) if constant_time_eq(t.as_bytes(), hs_token.as_bytes()) => Auth::Ok,
        Some(_) => Auth::Wrong,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A transaction: `{"events": [...]}` (other keys, e.g. ephemeral, ignored).
#[derive(Debug, Deserialize)]
pub struct Transaction {
    #[serde(default)]
    pub events: Vec<Value>,
}

/// The fields of a client event swallow reads; an event without them is skipped.
#[derive(Debug, Deserialize)]
pub struct RoomEvent {
    #[serde(rename = "type")]
    pub kind: String,
    pub event_id: String,
    pub room_id: String,
    pub sender: String,
    #[serde(default)]
    pub origin_server_ts: u64,
    #[serde(default)]
    pub state_key: Option<String>,
    #[serde(default)]
    pub content: Value,
}

/// Whether `user` is one of swallow's own: the bot or a virtual user
/// `@<localpart>_…:<server>`. Their messages never trigger.
pub fn is_own_user(user: &str, localpart: &str, server: &str) -> bool {
    let Some(local) = user
        .strip_prefix('@')
        .and_then(|u| u.strip_suffix(server)?.strip_suffix(':'))
    else {
        return false;
    };
    local == localpart || local.strip_prefix(localpart).is_some_and(|rest| rest.starts_with('_'))
}

/// `origin_server_ts` (ms) as a Slack-shaped `ts`: seconds, six decimals.
pub fn ts_of(origin_server_ts: u64) -> String {
    format!("{}.{:06}", origin_server_ts / 1000, (origin_server_ts % 1000) * 1000)
}

/// An `m.room.message` with msgtype `m.text` as the chat event swallow
/// matches, names left empty (filled next); `None` for anything else.
pub fn to_chat_event(server: &str, e: &RoomEvent) -> Option<ChatEvent> {
    if e.kind != "m.room.message" || e.content["msgtype"] != "m.text" {
        return None;
    }
    let text = e.content["body"].as_str()?;
    let relates = &e.content["m.relates_to"];
    let thread = (relates["rel_type"] == "m.thread")
        .then(|| relates["event_id"].as_str().map(str::to_owned))
        .flatten();
    Some(ChatEvent {
        team_id: server.to_owned(),
        team_domain: server.to_owned(),
        channel_id: e.room_id.clone(),
        channel_name: String::new(),
        channel_type: None,
        user_id: e.sender.clone(),
        user_name: String::new(),
        ts: ts_of(e.origin_server_ts),
        thread_ts: thread,
        text: text.to_owned(),
        bot_id: None,
        subtype: None,
        platform: Some(PLATFORM.to_owned()),
        event_id: Some(e.event_id.clone()),
        channel_alias: None,
    })
}

/// A piece of room state swallow names things by.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum State {
    /// `m.room.name` → `name`.
    Name,
    /// `m.room.canonical_alias` → `alias`.
    Alias,
    /// `m.room.join_rules` → `join_rule`.
    JoinRule,
    /// `m.room.member` of a user → `displayname`.
    Member(String),
}

impl State {
    fn of(kind: &str, state_key: &str) -> Option<State> {
        match (kind, state_key) {
            ("m.room.name", "") => Some(State::Name),
            ("m.room.canonical_alias", "") => Some(State::Alias),
            ("m.room.join_rules", "") => Some(State::JoinRule),
            ("m.room.member", user) if !user.is_empty() => Some(State::Member(user.to_owned())),
            _ => None,
        }
    }

    fn event_type(&self) -> &'static str {
        match self {
            State::Name => "m.room.name",
            State::Alias => "m.room.canonical_alias",
            State::JoinRule => "m.room.join_rules",
            State::Member(_) => "m.room.member",
        }
    }

    fn state_key(&self) -> &str {
        match self {
            State::Member(user) => user,
            _ => "",
        }
    }

    /// The value in the state event's content.
    fn value_in(&self, content: &Value) -> Option<String> {
        let field = match self {
            State::Name => "name",
            State::Alias => "alias",
            State::JoinRule => "join_rule",
            State::Member(_) => "displayname",
        };
        content[field].as_str().filter(|s| !s.is_empty()).map(str::to_owned)
    }
}

struct Shared {
    config: MatrixIngress,
    secrets: watch::Receiver<Arc<MatrixSecrets>>,
    /// Room state by room and kind (state events in transactions update
    /// it sooner than its time to live); `None`: no such state or field.
    lookups: Lookups<(String, State)>,
    /// Rooms the bot was invited to as a direct chat.
    direct: Mutex<HashSet<String>>,
}

/// The Matrix side: room names cached, the bot's memberships. Clones share it.
#[derive(Clone)]
pub struct Matrix(Arc<Shared>);

impl Matrix {
    pub fn new(
        config: MatrixIngress,
        secrets: watch::Receiver<Arc<MatrixSecrets>>,
        client: reqwest::Client,
        lookups: IntCounterVec,
    ) -> Self {
        let lookups = Lookups::new(client, lookups);
        let direct = Mutex::default();
        Matrix(Arc::new(Shared {
            config,
            secrets,
            lookups,
            direct,
        }))
    }

    pub fn config(&self) -> &MatrixIngress {
        &self.0.config
    }

    pub fn hs_token(&self) -> String {
        self.0.secrets.borrow().hs_token.clone()
    }

    /// Whether the message is one of swallow's own users'.
    pub fn is_own(&self, user: &str) -> bool {
        let c = &self.0.config;
        is_own_user(user, &c.sender_localpart, &c.server_name)
    }

    /// Notes a state event (names change, the bot invited or removed).
    pub fn observe_state(&self, e: &RoomEvent) {
        let Some(state_key) = e.state_key.as_deref() else {
            return;
        };
        if let Some(state) = State::of(&e.kind, state_key) {
            let value = state.value_in(&e.content);
            self.0.lookups.cache.put((e.room_id.clone(), state), value, FOUND_TTL);
        }
        if e.kind != "m.room.member" || state_key != self.0.config.bot_user_id() {
            return;
        }
        match e.content["membership"].as_str() {
            Some("invite") => {
                if e.content["is_direct"] == Value::Bool(true) {
                    self.0
                        .direct
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(e.room_id.clone());
                }
                info!(room = %e.room_id, inviter = %e.sender, "matrix: invited; joining");
                let me = self.clone();
                let room = e.room_id.clone();
                tokio::spawn(async move { me.room_call("join", &room, None).await });
            }
            Some("leave") | Some("ban") if e.sender != self.0.config.bot_user_id() => {
                info!(room = %e.room_id, by = %e.sender, "matrix: removed from the room; forgetting it");
                self.forget_room(&e.room_id);
                let me = self.clone();
                let room = e.room_id.clone();
                tokio::spawn(async move { me.room_call("forget", &room, Some("rooms")).await });
            }
            _ => {}
        }
    }

    fn forget_room(&self, room: &str) {
        self.0.direct.lock().unwrap_or_else(|p| p.into_inner()).remove(room);
        self.0.lookups.cache.forget(|(r, _)| r == room);
    }

    /// `POST /_matrix/client/v3/join/{room}` or `/rooms/{room}/forget`, as the bot.
    async fn room_call(&self, what: &str, room: &str, under: Option<&str>) {
        let mut url = self.0.config.homeserver_url.clone();
        {
            let Ok(mut path) = url.path_segments_mut() else { return };
            path.pop_if_empty().extend(["_matrix", "client", "v3"]);
            match under {
                Some(prefix) => path.extend([prefix, room, what]),
                None => path.extend([what, room]),
            };
        }
        let token = self.0.secrets.borrow().as_token.clone();
        let result = self
            .0
            .lookups
            .request(reqwest::Method::POST, url, &token)
            .json(&serde_json::json!({}))
            .send()
            .await;
        match result {
            Ok(r) if r.status().is_success() => info!(room, "matrix: {what} done"),
            Ok(r) => {
                let status = r.status().as_u16();
                let body = r.text().await.unwrap_or_default();
                warn!(room, status, %body, "matrix: {what} refused");
            }
            Err(error) => warn!(room, %error, "matrix: {what} failed"),
        }
    }

    /// Fills `channel_name` (the room's name, else its canonical alias),
    /// `channel_alias`, `channel_type` and `user_name` (the sender's display
    /// name in the room), waiting at most `budget`.
    pub async fn fill(&self, event: &mut ChatEvent, budget: Duration) {
        let deadline = tokio::time::Instant::now() + budget;
        let room = event.channel_id.clone();
        let (name, alias, rule, user) = tokio::join!(
            self.state(&room, State::Name, deadline),
            self.state(&room, State::Alias, deadline),
            self.state(&room, State::JoinRule, deadline),
            self.state(&room, State::Member(event.user_id.clone()), deadline),
        );
        event.channel_name = name.or_else(|| alias.clone()).unwrap_or_default();
        event.channel_alias = alias;
        let direct = self.0.direct.lock().unwrap_or_else(|p| p.into_inner()).contains(&room);
        let kind = match rule.as_deref() {
            _ if direct => "im",
            Some("public") => "public",
            _ => "private",
        };
        event.channel_type = Some(kind.to_owned());
        event.user_name = user.unwrap_or_default();
    }

    async fn state(&self, room: &str, state: State, deadline: tokio::time::Instant) -> Option<String> {
        let key = (room.to_owned(), state);
        if let Some(value) = self.0.lookups.cache.get(&key) {
            self.count("cached");
            return value;
        }
        let me = self.clone();
        let lookup = async move {
            let got = me.fetch(&key.0, &key.1).await;
            let (value, ttl, outcome) = match got {
                Ok(value) => (value, FOUND_TTL, "fetched"),
                Err(error) => {
                    warn!(room = %key.0, state = key.1.event_type(), %error, "matrix name lookup failed; published without it");
                    (None, FAILED_TTL, "failed")
                }
            };
            me.0.lookups.cache.put(key, value.clone(), ttl);
            (outcome, value)
        };
        let (outcome, value) = within_budget(deadline, lookup).await;
        self.count(outcome);
        value
    }

    fn count(&self, outcome: &str) {
        self.0.lookups.count(outcome);
    }

    /// `GET /_matrix/client/v3/rooms/{room}/state/{type}/{state_key}`; a
    /// 404 is "no such state", not a failure.
    async fn fetch(&self, room: &str, state: &State) -> Result<Option<String>, String> {
        let url = state_url(
            &self.0.config.homeserver_url,
            room,
            state.event_type(),
            state.state_key(),
        )?;
        let token = self.0.secrets.borrow().as_token.clone();
        let response = self
            .0
            .lookups
            .request(reqwest::Method::GET, url, &token)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        if status == 404 {
            return Ok(None);
        }
        if !response.status().is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(format!("HTTP {status}: {body}"));
        }
        let content: Value = response.json().await.map_err(|e| format!("not JSON: {e}"))?;
        Ok(state.value_in(&content))
    }
}

fn state_url(base: &Url, room: &str, kind: &str, state_key: &str) -> Result<Url, String> {
    let mut url = base.clone();
    url.path_segments_mut()
        .map_err(|_| "homeserver_url cannot be a base".to_owned())?
        .pop_if_empty()
        .extend(["_matrix", "client", "v3", "rooms", room, "state", kind, state_key]);
    Ok(url)
}

/// The registration file the homeserver loads (`app_service_config_files`).
pub fn registration_yaml(config: &MatrixIngress, secrets: &MatrixSecrets, url: &Url) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("a string serializes");
    let localpart = &config.sender_localpart;
    let users = format!(
        "@{}_.*:{}",
        swallow_shared::topology::regex_escape(localpart),
        swallow_shared::topology::regex_escape(&config.server_name)
    );
    format!(
        "# swallow as an application service: give this file to the homeserver\n\
         # (Synapse: app_service_config_files) and restart it.\n\
         id: {id}\n\
         url: {url}\n\
         as_token: {as_token}\n\
         hs_token: {hs_token}\n\
         sender_localpart: {localpart}\n\
         rate_limited: false\n\
         namespaces:\n  users:\n    - exclusive: true\n      regex: {users}\n  aliases: []\n  rooms: []\n",
        id = q(localpart),
        url = q(url.as_str().trim_end_matches('/')),
        as_token = q(&secrets.as_token),
        hs_token = q(&secrets.hs_token),
        localpart = q(localpart),
        users = q(&users),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(json: Value) -> RoomEvent {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn tokens() {
        assert_eq!(check_token("h", Some("Bearer h"), None), Auth::Ok);
        assert_eq!(check_token("h", None, Some("access_token=h")), Auth::Ok);
        assert_eq!(check_token("h", Some("Bearer x"), None), Auth::Wrong);
        assert_eq!(check_token("h", None, None), Auth::Missing);
        assert_eq!(check_token("h", Some("Basic h"), None), Auth::Missing);
    }

    #[test]
    fn own_users() {
        for (user, own) in [
            ("@swallow:example.org", true),
            ("@swallow_google_bot:example.org", true),
            ("@swallowed:example.org", false),
            ("@swallow:other.org", false),
            ("@alice:example.org", false),
        ] {
            assert_eq!(is_own_user(user, "swallow", "example.org"), own, "{user}");
        }
    }

    #[test]
    fn text_messages_become_chat_events() {
        let e = event(serde_json::json!({
            "type": "m.room.message", "event_id": "$abc", "room_id": "!r:example.org",
            "sender": "@alice:example.org", "origin_server_ts": 1_355_517_523_005u64,
            "content": {"msgtype": "m.text", "body": "googlebot: hi",
                        "m.relates_to": {"rel_type": "m.thread", "event_id": "$root"}}
        }));
        let c = to_chat_event("example.org", &e).unwrap();
        assert_eq!(c.ts, "1355517523.005000");
        assert_eq!(
            swallow_shared::wire::event::ts_to_millis(&c.ts),
            Some(1_355_517_523_005)
        );
        assert_eq!(c.thread_ts.as_deref(), Some("$root"));
        assert_eq!(c.event_id.as_deref(), Some("$abc"));
        assert_eq!(
            (c.team_id.as_str(), c.channel_id.as_str()),
            ("example.org", "!r:example.org")
        );
        assert_eq!(c.platform.as_deref(), Some("matrix"));
        for content in [
            serde_json::json!({"msgtype": "m.notice", "body": "x"}),
            serde_json::json!({"msgtype": "m.text"}),
        ] {
            let e = event(serde_json::json!({"type": "m.room.message", "event_id": "$x",
                "room_id": "!r:e", "sender": "@a:e", "content": content}));
            assert!(to_chat_event("e", &e).is_none());
        }
    }

    #[test]
    fn the_registration_file() {
        let config = swallow_shared::Config::parse(
            "[ingress.matrix]\nhomeserver_url = \"http://127.0.0.1:8008\"\nserver_name = \"example.org\"\nas_token = \"a\"\nhs_token = \"h\"\n",
            None,
        )
        .unwrap();
        let m = config.ingress.unwrap().matrix.unwrap();
        let yaml = registration_yaml(&m, &m.secrets, &"http://10.0.0.1:9110/".parse().unwrap());
        assert!(yaml.contains("url: \"http://10.0.0.1:9110\"\n"), "{yaml}");
        assert!(yaml.contains("regex: \"@swallow_.*:example\\\\.org\""), "{yaml}");
        assert!(yaml.contains("rate_limited: false") && yaml.contains("exclusive: true"));
    }
}
