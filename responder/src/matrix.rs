//! Replies to events from a Matrix homeserver (docs/contract.md §6, §9):
//! posted through the client-server API with the application service's
//! `as_token`, as a virtual user `@<sender_localpart>_<name>:<server>` whose
//! display name is the reply's `username` (registered, named and joined to
//! the room on first use), with a transaction id derived from the delivery
//! id so that a reply sent again is shown once.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::AUTHORIZATION;
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, info};
use url::Url;

use swallow_shared::config::{MatrixIngress, MatrixSecrets};

use crate::sink::{OutboundReply, Posted};

/// Where replies to Matrix events go.
pub struct MatrixSink {
    config: MatrixIngress,
    secrets: watch::Receiver<Arc<MatrixSecrets>>,
    client: reqwest::Client,
    /// Steps already done: (user, "profile:<avatar>") and (user, room).
    done: Mutex<HashSet<(String, String)>>,
}

/// `<sender_localpart>_<name>`: the name lowercased, every character a
/// localpart may not hold replaced by `_` ("Google Bot" → `swallow_google_bot`).
pub fn virtual_localpart(sender_localpart: &str, name: &str) -> String {
    let mut out = String::with_capacity(sender_localpart.len() + 1 + name.len());
    out.push_str(sender_localpart);
    out.push('_');
    for c in name.trim().chars().flat_map(char::to_lowercase) {
        out.push(if c.is_ascii_alphanumeric() || "._=-".contains(c) {
            c
        } else {
            '_'
        });
    }
    out
}

/// The homeserver's answer, as far as a reply goes.
enum Answer {
    Ok,
    Error {
        status: u16,
        errcode: String,
        error: String,
        retry_after: Option<Duration>,
    },
    Unreachable(String),
}

impl Answer {
    fn errcode(&self) -> Option<&str> {
        match self {
            Answer::Error { errcode, .. } => Some(errcode),
            _ => None,
        }
    }

    /// What a failed step means for the reply: `M_LIMIT_EXCEEDED` (or a
    /// 429) and server errors are tried again, `retry_after_ms` honoured;
    /// `M_FORBIDDEN` and the other refusals are for good.
    fn failure(self, step: &str) -> Posted {
        match self {
            Answer::Ok => Posted::Ok,
            Answer::Unreachable(error) => Posted::Retry {
                error: format!("matrix {step}: {error}"),
                retry_after: None,
            },
            Answer::Error {
                status,
                errcode,
                error,
                retry_after,
            } => {
                let error = format!("matrix {step}: HTTP {status} {errcode}: {error}");
                let again = status == 429
                    || status >= 500
                    || matches!(errcode.as_str(), "M_LIMIT_EXCEEDED" | "M_UNKNOWN_TOKEN" | "M_UNKNOWN");
                if again {
                    Posted::Retry { error, retry_after }
                } else {
                    Posted::Rejected { error }
                }
            }
        }
    }
}

impl MatrixSink {
    pub fn new(config: MatrixIngress, secrets: watch::Receiver<Arc<MatrixSecrets>>, client: reqwest::Client) -> Self {
        MatrixSink {
            config,
            secrets,
            client,
            done: Mutex::default(),
        }
    }

    fn url(&self, segments: &[&str], as_user: Option<&str>) -> Url {
        let mut url = self.config.homeserver_url.clone();
        url.path_segments_mut()
            .expect("an http(s) URL can be a base")
            .pop_if_empty()
            .extend(["_matrix", "client", "v3"])
            .extend(segments);
        if let Some(user) = as_user {
            url.query_pairs_mut().append_pair("user_id", user);
        }
        url
    }

    async fn call(&self, method: reqwest::Method, url: Url, body: &Value, timeout: Duration) -> Answer {
        let token = self.secrets.borrow().as_token.clone();
        let sent = self
            .client
            .request(method, url)
            .timeout(timeout)
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .json(body)
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => return Answer::Unreachable(e.to_string()),
        };
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Answer::Ok;
        }
        let body: Value = response.json().await.unwrap_or(Value::Null);
        Answer::Error {
            status,
            errcode: body["errcode"].as_str().unwrap_or("").to_owned(),
            error: body["error"].as_str().unwrap_or("").to_owned(),
            retry_after: body["retry_after_ms"].as_u64().map(Duration::from_millis),
        }
    }

    fn is_done(&self, user: &str, what: &str) -> bool {
        let done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        done.contains(&(user.to_owned(), what.to_owned()))
    }

    fn mark(&self, user: &str, what: &str, done: bool) {
        let mut set = self.done.lock().unwrap_or_else(|p| p.into_inner());
        if done {
            set.insert((user.to_owned(), what.to_owned()));
        } else {
            set.remove(&(user.to_owned(), what.to_owned()));
        }
    }

    /// Registers the virtual user and gives it its name (and avatar).
    async fn profile(
        &self,
        user: &str,
        localpart: &str,
        reply: &OutboundReply<'_>,
        timeout: Duration,
    ) -> Result<(), Posted> {
        let avatar = reply.icon_url.filter(|u| u.starts_with("mxc://"));
        let key = format!("profile:{}", avatar.unwrap_or(""));
        if self.is_done(user, &key) {
            return Ok(());
        }
        let register = json!({"type": "m.login.application_service", "username": localpart});
        let answer = self
            .call(reqwest::Method::POST, self.url(&["register"], None), &register, timeout)
            .await;
        if !matches!(answer, Answer::Ok) && answer.errcode() != Some("M_USER_IN_USE") {
            return Err(answer.failure("register"));
        }
        let name = json!({"displayname": reply.username});
        let url = self.url(&["profile", user, "displayname"], Some(user));
        if let failed @ (Answer::Error { .. } | Answer::Unreachable(_)) =
            self.call(reqwest::Method::PUT, url, &name, timeout).await
        {
            return Err(failed.failure("displayname"));
        }
        if let Some(avatar) = avatar {
            let url = self.url(&["profile", user, "avatar_url"], Some(user));
            let body = json!({"avatar_url": avatar});
            if let failed @ (Answer::Error { .. } | Answer::Unreachable(_)) =
                self.call(reqwest::Method::PUT, url, &body, timeout).await
            {
                return Err(failed.failure("avatar_url"));
            }
        }
        info!(user, name = reply.username, "matrix: virtual user ready");
        self.mark(user, &key, true);
        Ok(())
    }

    /// Joins the virtual user to the room: directly (a public room), else
    /// invited by the bot first.
    async fn join(&self, user: &str, room: &str, timeout: Duration) -> Result<(), Posted> {
        if self.is_done(user, room) {
            return Ok(());
        }
        let empty = json!({});
        let join_url = self.url(&["join", room], Some(user));
        let mut answer = self
            .call(reqwest::Method::POST, join_url.clone(), &empty, timeout)
            .await;
        if answer.errcode() == Some("M_FORBIDDEN") {
            debug!(user, room, "matrix: the bot invites the virtual user");
            let invite = self
                .call(
                    reqwest::Method::POST,
                    self.url(&["rooms", room, "invite"], None),
                    &json!({"user_id": user}),
                    timeout,
                )
                .await;
            if let failed @ (Answer::Error { .. } | Answer::Unreachable(_)) = invite {
                return Err(failed.failure("invite"));
            }
            answer = self.call(reqwest::Method::POST, join_url, &empty, timeout).await;
        }
        match answer {
            Answer::Ok => {
                self.mark(user, room, true);
                Ok(())
            }
            failed => Err(failed.failure("join")),
        }
    }

    pub async fn post(&self, reply: &OutboundReply<'_>, timeout: Duration) -> Posted {
        let localpart = virtual_localpart(&self.config.sender_localpart, reply.username);
        let user = format!("@{localpart}:{}", self.config.server_name);
        let room = reply.channel_id;
        if let Err(failed) = self.profile(&user, &localpart, reply, timeout).await {
            return failed;
        }
        let mut content = json!({"msgtype": "m.text", "body": reply.text});
        if let Some(root) = reply.thread_ts.filter(|t| t.starts_with('$')) {
            content["m.relates_to"] = json!({
                "rel_type": "m.thread",
                "event_id": root,
                "is_falling_back": true,
                "m.in_reply_to": {"event_id": reply.in_reply_to},
            });
        }
        // The same delivery, sent again, is the same transaction: shown once.
        let txn = format!("swallow-{}", reply.delivery_id);
        let url = self.url(&["rooms", room, "send", "m.room.message", &txn], Some(&user));
        for first in [true, false] {
            if let Err(failed) = self.join(&user, room, timeout).await {
                return failed;
            }
            match self.call(reqwest::Method::PUT, url.clone(), &content, timeout).await {
                Answer::Ok => return Posted::Ok,
                // Perhaps removed from the room since: join again, once.
                forbidden if first && forbidden.errcode() == Some("M_FORBIDDEN") => self.mark(&user, room, false),
                failed => return failed.failure("send"),
            }
        }
        unreachable!("the second pass returns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_users_are_named_after_the_reply() {
        assert_eq!(virtual_localpart("swallow", "Google Bot"), "swallow_google_bot");
        assert_eq!(
            virtual_localpart("swallow", "Tim the Enchanter!"),
            "swallow_tim_the_enchanter_"
        );
        assert_eq!(virtual_localpart("s", "Élan"), "s__lan");
    }

    #[test]
    fn errors_retry_or_not() {
        let error = |status, errcode: &str, retry_after| Answer::Error {
            status,
            errcode: errcode.into(),
            error: "x".into(),
            retry_after,
        };
        let wait = Some(Duration::from_millis(1500));
        assert_eq!(
            error(429, "M_LIMIT_EXCEEDED", wait).failure("send"),
            Posted::Retry {
                error: "matrix send: HTTP 429 M_LIMIT_EXCEEDED: x".into(),
                retry_after: wait
            }
        );
        assert!(matches!(
            error(403, "M_FORBIDDEN", None).failure("send"),
            Posted::Rejected { .. }
        ));
        assert!(matches!(error(502, "", None).failure("send"), Posted::Retry { .. }));
    }
}
