//! The stream `<prefix>.log`: its declaration and retention arguments.

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection};
use tracing::warn;

pub use crate::config::DeliveryLogConfig;

impl DeliveryLogConfig {
    /// Segment size of the stream: retention removes whole segments, so a
    /// segment is an eighth of `max_bytes` (at least 4 KiB, at most
    /// RabbitMQ's default of 500 MB).
    pub(crate) fn segment_bytes(&self) -> u64 {
        (self.max_bytes / 8).clamp(4096, 500_000_000)
    }

    /// The stream's queue arguments.
    pub(crate) fn stream_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        let text = |s: String| AMQPValue::LongString(LongString::from(s));
        args.insert("x-queue-type".into(), text("stream".into()));
        args.insert("x-max-age".into(), text(format!("{}s", self.max_age.as_secs().max(1))));
        args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(self.max_bytes.min(i64::MAX as u64) as i64),
        );
        args.insert(
            "x-stream-max-segment-size-bytes".into(),
            AMQPValue::LongLongInt(self.segment_bytes() as i64),
        );
        args
    }
}

/// Declares the log stream with the configured retention. A stream that
/// exists with other arguments is used as it is, with a warning.
pub(crate) async fn declare_stream(
    connection: &Connection,
    stream: &str,
    config: &DeliveryLogConfig,
) -> Result<(), lapin::Error> {
    let channel = connection.create_channel().await?;
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    match channel
        .queue_declare(stream.into(), options, config.stream_arguments())
        .await
    {
        Ok(_) => {
            let _ = channel.close(200, "declared".into()).await;
            Ok(())
        }
        Err(error) => {
            // The broker closed the channel; see whether the stream is there.
            stream_exists(connection, stream).await?;
            warn!(
                stream,
                %error,
                "delivery log: the stream exists with other retention arguments; keeping them (see README: changing the log's retention)"
            );
            Ok(())
        }
    }
}

/// Succeeds when `stream` exists (a passive declare on a channel of its own).
pub async fn stream_exists(connection: &Connection, stream: &str) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    channel
        .queue_declare(stream.into(), passive, FieldTable::default())
        .await?;
    Ok(channel)
}
