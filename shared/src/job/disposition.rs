//! What becomes of one delivery of a job: the typed [`Disposition`] a stage
//! decides before anything is acknowledged, why a job is parked
//! ([`ParkReason`]) or dead-lettered ([`DeadReason`]), and what was done
//! ([`Settled`]), counted once by the stage.

use std::ops::ControlFlow;
use std::time::Duration;

/// Why a job was dead-lettered: its `x-swallow-reason` header and its
/// metric label, from one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadReason {
    MaxAttempts,
    MaxAge,
    /// The handler answered 410 Gone.
    Gone,
    /// The destination's address is not allowed.
    BlockedDestination,
    UnknownIntegration,
    /// Bytes that are not a delivery job.
    InvalidJob,
    /// Bytes that are not a reply.
    InvalidReply,
    /// A message from a newer version than this build.
    UnsupportedVersion,
    /// The reply sink refused the reply for good.
    Rejected,
    /// It aged out waiting behind its URL's open circuit.
    CircuitOpen,
}

impl DeadReason {
    /// The reasons a delivery job can die of.
    pub const DELIVERY: [DeadReason; 8] = [
        DeadReason::MaxAttempts,
        DeadReason::MaxAge,
        DeadReason::CircuitOpen,
        DeadReason::Gone,
        DeadReason::BlockedDestination,
        DeadReason::UnknownIntegration,
        DeadReason::InvalidJob,
        DeadReason::UnsupportedVersion,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            DeadReason::MaxAttempts => "max_attempts",
            DeadReason::MaxAge => "max_age",
            DeadReason::Gone => "gone",
            DeadReason::BlockedDestination => "blocked_destination",
            DeadReason::UnknownIntegration => "unknown_integration",
            DeadReason::InvalidJob => "invalid_job",
            DeadReason::InvalidReply => "invalid_reply",
            DeadReason::UnsupportedVersion => "unsupported_version",
            DeadReason::Rejected => "rejected",
            DeadReason::CircuitOpen => "circuit_open",
        }
    }
}

impl std::fmt::Display for DeadReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a job went back on the delay ladder without being finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParkReason {
    /// It came back before its `not_before_ms`.
    NotDue,
    /// It reserved a rate-limit slot and waits for it.
    RateLimited,
    /// It missed its slot and reserved a new one.
    MissedSlot,
    /// Its integration has as many attempts under way as it may.
    Busy,
    /// An attempt failed; it waits for the next.
    Retry,
    /// Its URL's circuit is open: it waits, unattempted, for the next probe.
    CircuitOpen,
}

/// What becomes of one delivery of a job, decided before anything is
/// acknowledged, carried out by `lifecycle::carry_out`.
#[derive(Debug)]
pub enum Disposition<J> {
    /// Its effect happened (delivered, posted): acknowledge.
    Done,
    /// Deliberately not done (`on_limit = "drop"`): acknowledge.
    Dropped,
    /// Its effect is a message for the next stage: publish it (confirmed) to
    /// `queue`, then acknowledge.
    Forward { queue: String, body: Vec<u8> },
    /// Back on the delay ladder to its home queue for `wait` (confirmed),
    /// then acknowledge.
    Park { job: J, wait: Duration, why: ParkReason },
    /// To the dead-letter queue (confirmed), then acknowledge.
    Dead(DeadLetter<J>),
}

/// A dead letter: the job (or, when it did not parse, its bytes) and why.
#[derive(Debug)]
pub struct DeadLetter<J> {
    pub reason: DeadReason,
    /// The `x-swallow-error` header: what went wrong, in words.
    pub detail: String,
    /// The last attempt's HTTP status, when there was one.
    pub status: Option<u16>,
    pub body: Result<J, Vec<u8>>,
    /// A message to publish as well (confirmed) before the ack: the
    /// deliverer's failure notice for the channel, `(queue, body)`.
    pub notice: Option<(String, Vec<u8>)>,
}

impl<J> Disposition<J> {
    pub fn park(job: J, wait: Duration, why: ParkReason) -> Self {
        Disposition::Park { job, wait, why }
    }

    pub fn dead(job: J, reason: DeadReason, detail: impl Into<String>) -> Self {
        Disposition::dead_after(job, reason, detail, None)
    }

    /// Dead-letters a job, keeping the last attempt's HTTP status.
    pub fn dead_after(job: J, reason: DeadReason, detail: impl Into<String>, status: Option<u16>) -> Self {
        Disposition::Dead(DeadLetter {
            reason,
            detail: detail.into(),
            status,
            body: Ok(job),
            notice: None,
        })
    }

    /// What it comes to, for counting.
    pub fn settled(&self) -> Settled {
        match self {
            Disposition::Done => Settled::Done,
            Disposition::Dropped => Settled::Dropped,
            Disposition::Forward { .. } => Settled::Forwarded,
            Disposition::Park { why, .. } => Settled::Parked(*why),
            Disposition::Dead(d) => Settled::Dead(d.reason),
        }
    }
}

/// What `lifecycle::carry_out` did: a disposition without its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Done,
    Dropped,
    Forwarded,
    Parked(ParkReason),
    Dead(DeadReason),
}

/// A job that is still going, or its disposition: the type of each check
/// in a stage's `decide` (`?` stops at the first that settles the job).
pub type Step<J, T = J> = ControlFlow<Disposition<J>, T>;
