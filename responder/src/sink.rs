//! Where replies go (docs/contract.md §6): the `<prefix>.chat.outbound` exchange,
//! Slack's `chat.postMessage`, or an incoming-webhook URL.

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use serde::Serialize;
use url::Url;

use swallow_shared::broker::{self, MatchedReturns};

/// A reply as it is posted: the integration's identity applied, the thread
/// chosen, and marked as a bot's message so it can never trigger anything.
/// It borrows from the reply job and the integration: it lives only to be
/// serialized.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboundReply<'a> {
    pub team_id: &'a str,
    pub channel_id: &'a str,
    pub thread_ts: Option<&'a str>,
    pub text: &'a str,
    pub username: &'a str,
    pub icon_url: Option<&'a str>,
    pub icon_emoji: Option<&'a str>,
    pub attachments: Option<&'a serde_json::Value>,
    pub integration_id: &'a str,
    pub delivery_id: &'a str,
    pub in_reply_to: &'a str,
    /// The loop guard: the matcher ignores messages with a `bot_id` or
    /// `subtype = "bot_message"`.
    pub bot_id: &'static str,
    pub subtype: &'static str,
}

/// The `bot_id` swallow's replies carry.
pub const BOT_ID: &str = "swallow";

/// What posting a reply gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Posted {
    Ok,
    /// Try again (no sooner than `retry_after` when set).
    Retry {
        error: String,
        retry_after: Option<Duration>,
    },
    /// The sink refused it for good (e.g. Slack's `channel_not_found`).
    Rejected {
        error: String,
    },
}

/// The chat API's JSON body: Slack's `chat.postMessage` and incoming
/// webhooks (Slack, Mattermost, Rocket.Chat) all accept these fields.
#[derive(Serialize)]
struct ChatMessage<'a> {
    channel: &'a str,
    text: &'a str,
    username: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    icon_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    icon_emoji: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thread_ts: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attachments: Option<&'a serde_json::Value>,
}

impl OutboundReply<'_> {
    fn chat_message(&self) -> ChatMessage<'_> {
        ChatMessage {
            channel: self.channel_id,
            text: self.text,
            username: self.username,
            icon_url: self.icon_url,
            icon_emoji: self.icon_emoji,
            thread_ts: self.thread_ts,
            attachments: self.attachments,
        }
    }
}

/// Slack errors that retrying cannot fix.
const PERMANENT_SLACK_ERRORS: &[&str] = &[
    "channel_not_found",
    "not_in_channel",
    "is_archived",
    "msg_too_long",
    "no_text",
    "invalid_auth",
    "not_authed",
    "account_inactive",
    "token_revoked",
    "restricted_action",
    "invalid_blocks",
    "invalid_attachments",
];

/// A configured sink.
#[derive(Clone)]
pub enum ReplySink {
    Amqp {
        exchange: String,
    },
    Slack {
        endpoint: Url,
        /// The token in force: a reload check re-reads `slack_token_file`.
        token: tokio::sync::watch::Receiver<std::sync::Arc<str>>,
        client: reqwest::Client,
    },
    Webhook {
        url: Url,
        client: reqwest::Client,
    },
}

impl ReplySink {
    pub fn name(&self) -> &'static str {
        match self {
            ReplySink::Amqp { .. } => "amqp",
            ReplySink::Slack { .. } => "slack",
            ReplySink::Webhook { .. } => "webhook",
        }
    }

    pub async fn post(&self, reply: &OutboundReply<'_>, outbound: &MatchedReturns, timeout: Duration) -> Posted {
        match self {
            ReplySink::Amqp { exchange } => {
                let body = swallow_shared::wire::messages::to_json(reply, reply.text.len());
                let key = swallow_shared::wire::messages::channel_key(reply.team_id, reply.channel_id);
                match outbound.publish(exchange, &key, body, broker::persistent_json()).await {
                    Ok(()) => Posted::Ok,
                    Err(e) => Posted::Retry {
                        error: e.to_string(),
                        retry_after: None,
                    },
                }
            }
            ReplySink::Slack {
                endpoint,
                token,
                client,
            } => {
                let request = client
                    .post(endpoint.clone())
                    .timeout(timeout)
                    .header(AUTHORIZATION, format!("Bearer {}", &**token.borrow()))
                    .header(CONTENT_TYPE, "application/json; charset=utf-8")
                    .json(&reply.chat_message());
                http_post(request, true).await
            }
            ReplySink::Webhook { url, client } => {
                let request = client.post(url.clone()).timeout(timeout).json(&reply.chat_message());
                http_post(request, false).await
            }
        }
    }
}

async fn http_post(request: reqwest::RequestBuilder, slack_api: bool) -> Posted {
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            return Posted::Retry {
                error: format!("posting the reply: {e}"),
                retry_after: None,
            };
        }
    };
    let status = response.status();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(swallow_shared::job::retry::parse_retry_after);
    if !status.is_success() {
        return Posted::Retry {
            error: format!("HTTP {}", status.as_u16()),
            retry_after: (status.as_u16() == 429 || status.as_u16() == 503)
                .then_some(retry_after)
                .flatten(),
        };
    }
    if !slack_api {
        return Posted::Ok;
    }
    let body: serde_json::Value = match response.json().await {
        Ok(v) => v,
        Err(e) => {
            return Posted::Retry {
                error: format!("chat.postMessage answered without JSON: {e}"),
                retry_after: None,
            };
        }
    };
    if body["ok"] == serde_json::Value::Bool(true) {
        return Posted::Ok;
    }
    let error = body["error"].as_str().unwrap_or("ok:false without an error").to_owned();
    if PERMANENT_SLACK_ERRORS.contains(&error.as_str()) {
        Posted::Rejected {
            error: format!("chat.postMessage: {error}"),
        }
    } else {
        Posted::Retry {
            error: format!("chat.postMessage: {error}"),
            retry_after,
        }
    }
}
