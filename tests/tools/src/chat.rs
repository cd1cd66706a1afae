//! The chat side of swallow, for people and tests: publish a chat message as
//! a chat platform would, and watch replies arriving on
//! `<prefix>.chat.outbound`.

use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use lapin::{BasicProperties, Connection};

use swallow_shared::wire::messages::channel_key;
use swallow_shared::{Topology, broker};

/// A Slack-style `ts` for now: seconds and microseconds.
pub fn ts_now() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:06}", d.as_secs(), d.subsec_micros())
}

/// The fields of a chat message to publish.
pub struct Say<'a> {
    pub team_id: &'a str,
    pub channel_id: &'a str,
    pub channel_name: &'a str,
    pub user_name: &'a str,
    pub text: &'a str,
    pub thread_ts: Option<&'a str>,
}

/// Publishes a chat event (persistent, confirmed); returns it.
pub async fn say(connection: &Connection, topology: &Topology, say: &Say<'_>) -> anyhow::Result<serde_json::Value> {
    // Tolerating work queues an earlier version declared (as the stages do).
    topology.declare_on(connection).await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(Default::default()).await?;
    let event = serde_json::json!({
        "team_id": say.team_id, "team_domain": "example",
        "channel_id": say.channel_id, "channel_name": say.channel_name, "channel_type": "public",
        "user_id": format!("U{}", say.user_name.to_uppercase()), "user_name": say.user_name,
        "ts": ts_now(), "thread_ts": say.thread_ts, "text": say.text,
    });
    let confirm = channel
        .basic_publish(
            topology.events_exchange().as_str().into(),
            channel_key(say.team_id, say.channel_id).as_str().into(),
            Default::default(),
            &serde_json::to_vec(&event)?,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into()),
        )
        .await?
        .await?;
    anyhow::ensure!(confirm.is_ack(), "the broker did not confirm the message");
    let _ = channel.close(200, "".into()).await;
    Ok(event)
}

/// Replies as they arrive on `<prefix>.chat.outbound` (a private queue bound with `#`).
pub async fn listen(
    connection: &Connection,
    topology: &Topology,
) -> anyhow::Result<impl futures_util::Stream<Item = serde_json::Value> + use<>> {
    topology.declare_on(connection).await?;
    let channel = connection.create_channel().await?;
    let consumer = broker::subscribe(&channel, &topology.chat_outbound_exchange(), "#").await?;
    Ok(consumer.filter_map(move |d| {
        let _keep = &channel;
        let v = d.ok().and_then(|d| serde_json::from_slice(&d.data).ok());
        async move { v }
    }))
}

/// Chat events as they are published to `<prefix>.events` (a private
/// queue bound with `#`): where `listen` learns the channels' names.
pub async fn events(
    connection: &Connection,
    topology: &Topology,
) -> anyhow::Result<impl futures_util::Stream<Item = serde_json::Value> + use<>> {
    let channel = connection.create_channel().await?;
    let consumer = broker::subscribe(&channel, &topology.events_exchange(), "#").await?;
    Ok(consumer.filter_map(move |d| {
        let _keep = &channel;
        let v = d.ok().and_then(|d| serde_json::from_slice(&d.data).ok());
        async move { v }
    }))
}

/// The channels' names, by id, as the events seen so far gave them.
#[derive(Debug, Default)]
pub struct ChannelNames(std::collections::HashMap<String, String>);

impl ChannelNames {
    /// Notes the channel name an event carries.
    pub fn learn(&mut self, event: &serde_json::Value) {
        if let (Some(id), Some(name)) = (event["channel_id"].as_str(), event["channel_name"].as_str())
            && !name.is_empty()
        {
            self.0.insert(id.to_owned(), name.to_owned());
        }
    }

    /// One line for a reply, its channel shown by name when an event gave
    /// it (`#test googlebot: African or European?`), else by id.
    pub fn show(&self, reply: &serde_json::Value) -> String {
        let id = reply["channel_id"].as_str().unwrap_or("?");
        show_reply_channel(reply, self.0.get(id).map_or(id, String::as_str))
    }
}

/// One line for a reply: `#C2147483705 googlebot: African or European?`.
pub fn show_reply(reply: &serde_json::Value) -> String {
    show_reply_channel(reply, reply["channel_id"].as_str().unwrap_or("?"))
}

/// A reply in the channel `say` spoke in, shown by that channel's name as
/// the message was (`#test googlebot: …`); in another channel, by its id.
pub fn show_reply_in(reply: &serde_json::Value, say: &Say) -> String {
    let id = reply["channel_id"].as_str().unwrap_or("?");
    show_reply_channel(reply, if id == say.channel_id { say.channel_name } else { id })
}

fn show_reply_channel(reply: &serde_json::Value, channel: &str) -> String {
    let thread = reply["thread_ts"]
        .as_str()
        .map(|t| format!(" (thread {t})"))
        .unwrap_or_default();
    format!(
        "#{channel}{thread} {}: {}",
        reply["username"].as_str().unwrap_or("?"),
        reply["text"].as_str().unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_shown_in_the_channel_as_the_message_was() {
        let say = Say {
            team_id: "T0001",
            channel_id: "C2147483705",
            channel_name: "test",
            user_name: "Steve",
            text: "googlebot: hi",
            thread_ts: None,
        };
        let reply =
            serde_json::json!({"channel_id": "C2147483705", "username": "googlebot", "text": "African or European?"});
        assert_eq!(show_reply_in(&reply, &say), "#test googlebot: African or European?");
        assert_eq!(show_reply(&reply), "#C2147483705 googlebot: African or European?");
        let mut names = ChannelNames::default();
        assert_eq!(names.show(&reply), "#C2147483705 googlebot: African or European?");
        names.learn(&serde_json::json!({"channel_id": "C2147483705", "channel_name": "test"}));
        assert_eq!(names.show(&reply), "#test googlebot: African or European?");
        let elsewhere = serde_json::json!({"channel_id": "C9", "username": "googlebot", "text": "hi"});
        assert_eq!(show_reply_in(&elsewhere, &say), "#C9 googlebot: hi");
    }
}
