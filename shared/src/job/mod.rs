//! The one life of a job that is retried (the deliverer's delivery jobs, the
//! responder's replies): [`lifecycle`] opens and settles it, [`disposition`]
//! names what becomes of it, [`retry`] and [`pacing`] decide when it goes
//! again, and [`park`] puts it on the delay ladder until then. A job that
//! ended dead can be moved back into line by [`replay`].

pub mod disposition;
pub mod lifecycle;
pub mod pacing;
pub mod park;
pub mod replay;
pub mod retry;
