//! What crosses the broker: the chat events platforms publish
//! ([`event`]) and the versioned jobs between the stages ([`messages`]).
//! Nothing here knows of the broker or the configuration.

pub mod event;
pub mod messages;

pub use event::ChatEvent;
pub use messages::{DeliveryJob, HandlerAnswer, ReplyJob, RetryState, now_millis};
