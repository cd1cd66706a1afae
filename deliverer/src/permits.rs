//! Fair queueing of the attempt permits: `[deliverer] concurrency` HTTP
//! attempts under way at once, shared so that slow or failing handlers,
//! however many, cannot keep a healthy integration waiting.
//!
//! A job that cannot have a permit at once waits in memory, in its
//! integration's line (its delivery unacknowledged, within its shard's
//! prefetch). The rules, all in the pure [`FairQueue`]:
//! - an integration never holds more than `per_integration_concurrency`
//!   permits, and never has more than that many jobs holding or waiting for
//!   one: a job past that is parked on the delay ladder;
//! - a quarter of the permits is *headroom*: an integration with an attempt
//!   under way takes another only while more than the headroom is free; an
//!   integration with nothing under way may take any free permit. A job
//!   refused by this rule waits in its line;
//! - a permit released (or headroom freed) goes to the waiting line whose
//!   integration holds the fewest permits, round-robin among equals. So an
//!   integration whose attempts finish quickly (it holds none between them)
//!   gets its next turn at the next release, ahead of every integration
//!   whose attempts hang (each holds several); a hanging integration gets a
//!   turn only when every waiting integration holds as many as it does;
//! - a shard's waiting jobs are at most half its prefetch: past that the
//!   longest line of the shard gives up its newest job to the ladder, so the
//!   other half of the prefetch always brings new jobs in (a healthy
//!   integration's among them).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// A job waiting in a line, as the queue knows it.
pub type Ticket = u64;

/// The permits and lines, without any waiting: every decision is a
/// function of the calls made, so it is tested without a runtime. `W` is
/// whatever the caller needs to wake a waiter.
#[derive(Debug)]
pub struct FairQueue<W> {
    per_integration: usize,
    headroom: usize,
    /// Waiting jobs per shard at most.
    shard_waiting: usize,
    free: usize,
    held: HashMap<String, usize>,
    lines: HashMap<String, Line<W>>,
    /// The integrations with a line, in turn order.
    turns: VecDeque<String>,
    waiting_in_shard: HashMap<u32, usize>,
    next_ticket: Ticket,
}

#[derive(Debug)]
struct Line<W> {
    shard: u32,
    waiting: VecDeque<(Ticket, W)>,
}

/// What became of a request for a permit.
#[derive(Debug, PartialEq, Eq)]
pub enum Asked<W> {
    /// A permit, now.
    Go,
    /// In line; `evicted` is another job of the shard that must leave its
    /// line for the ladder (the shard's waiting jobs were too many).
    Wait { ticket: Ticket, evicted: Option<W> },
    /// Not in memory: `per_integration_concurrency` is reached, or the job
    /// was the one that had to leave the crowded shard.
    Park(ParkWhy),
}

/// Why a job is not kept waiting in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkWhy {
    /// Its integration has `per_integration_concurrency` jobs holding or
    /// waiting for a permit.
    Busy,
    /// Its shard's waiting jobs are at their bound and its line is the
    /// longest.
    Crowded,
    /// Its shard is being given up (hand-over or shutdown).
    Stopping,
}

impl<W> FairQueue<W> {
    /// `total` permits; a shard brings up to `prefetch` jobs at once.
    pub fn new(total: usize, per_integration: usize, prefetch: usize) -> Self {
        FairQueue {
            per_integration: per_integration.max(1),
            headroom: total / 4,
            shard_waiting: (prefetch / 2).max(1),
            free: total,
            held: HashMap::new(),
            lines: HashMap::new(),
            turns: VecDeque::new(),
            waiting_in_shard: HashMap::new(),
            next_ticket: 0,
        }
    }

    fn held(&self, key: &str) -> usize {
        self.held.get(key).copied().unwrap_or(0)
    }

    fn waiting(&self, key: &str) -> usize {
        self.lines.get(key).map_or(0, |l| l.waiting.len())
    }

    /// Whether `key` may take a free permit now.
    fn eligible(&self, key: &str) -> bool {
        let held = self.held(key);
        self.free > 0 && held < self.per_integration && (held == 0 || self.free > self.headroom)
    }

    fn take(&mut self, key: &str) {
        self.free -= 1;
        *self.held.entry(key.to_owned()).or_insert(0) += 1;
    }

    /// A job of `key` (on `shard`) asks for a permit; `waiter` wakes it if it
    /// has to wait.
    pub fn request(&mut self, key: &str, shard: u32, waiter: W) -> Asked<W> {
        if self.held(key) + self.waiting(key) >= self.per_integration {
            return Asked::Park(ParkWhy::Busy);
        }
        // Nobody eligible waits (see `dispatch`), so a job whose own line is
        // empty and that may go does not pass anyone.
        if self.waiting(key) == 0 && self.eligible(key) {
            self.take(key);
            return Asked::Go;
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let line = self.lines.entry(key.to_owned()).or_insert_with(|| Line {
            shard,
            waiting: VecDeque::new(),
        });
        if line.waiting.is_empty() {
            self.turns.push_back(key.to_owned());
        }
        line.waiting.push_back((ticket, waiter));
        let in_shard = self.waiting_in_shard.entry(shard).or_insert(0);
        *in_shard += 1;
        if *in_shard <= self.shard_waiting {
            return Asked::Wait { ticket, evicted: None };
        }
        let (evicted_ticket, evicted) = self.evict(shard);
        if evicted_ticket == ticket {
            Asked::Park(ParkWhy::Crowded)
        } else {
            Asked::Wait {
                ticket,
                evicted: Some(evicted),
            }
        }
    }

    /// The newest job of the shard's longest line (ties: the line whose
    /// integration holds the most permits) leaves its line.
    fn evict(&mut self, shard: u32) -> (Ticket, W) {
        let key = self
            .lines
            .iter()
            .filter(|(_, l)| l.shard == shard && !l.waiting.is_empty())
            .max_by_key(|(k, l)| (l.waiting.len(), self.held(k)))
            .map(|(k, _)| k.clone())
            .expect("the shard has waiting jobs");
        let line = self.lines.get_mut(&key).expect("found above");
        let evicted = line.waiting.pop_back().expect("not empty");
        self.forget_if_empty(&key, shard);
        evicted
    }

    fn forget_if_empty(&mut self, key: &str, shard: u32) {
        if let Some(n) = self.waiting_in_shard.get_mut(&shard) {
            *n -= 1;
            if *n == 0 {
                self.waiting_in_shard.remove(&shard);
            }
        }
        if self.lines.get(key).is_some_and(|l| l.waiting.is_empty()) {
            self.lines.remove(key);
            self.turns.retain(|k| k != key);
        }
    }

    /// A waiting job gives up its place (its shard stops, or its task
    /// ended); `None` if it is no longer in line (granted or evicted).
    pub fn cancel(&mut self, key: &str, ticket: Ticket) -> Option<W> {
        let line = self.lines.get_mut(key)?;
        let at = line.waiting.iter().position(|(t, _)| *t == ticket)?;
        let shard = line.shard;
        let (_, waiter) = line.waiting.remove(at).expect("found above");
        self.forget_if_empty(key, shard);
        Some(waiter)
    }

    /// One of `key`'s permits is released; returns the waiting jobs that
    /// now have one (their permits already counted), with their keys.
    pub fn release(&mut self, key: &str) -> Vec<(String, W)> {
        self.free += 1;
        if let Some(n) = self.held.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(key);
            }
        }
        self.dispatch()
    }

    /// Free permits to waiting lines: the eligible line whose integration
    /// holds the fewest goes first, the earliest in turn order among
    /// equals; a line served goes to the back of the turns.
    fn dispatch(&mut self) -> Vec<(String, W)> {
        let mut granted = Vec::new();
        while self.free > 0 {
            let Some(at) = self
                .turns
                .iter()
                .enumerate()
                .filter(|(_, k)| self.eligible(k))
                .min_by_key(|(i, k)| (self.held(k), *i))
                .map(|(i, _)| i)
            else {
                break;
            };
            let key = self.turns.remove(at).expect("found above");
            let line = self.lines.get_mut(&key).expect("a key in turn has a line");
            let (_, waiter) = line.waiting.pop_front().expect("a line in turn is not empty");
            let (shard, more) = (line.shard, !line.waiting.is_empty());
            if more {
                self.turns.push_back(key.clone());
            }
            self.forget_if_empty(&key, shard);
            self.take(&key);
            granted.push((key, waiter));
        }
        granted
    }

    /// Free permits.
    pub fn free(&self) -> usize {
        self.free
    }
}

/// The deliverer's permits: a [`FairQueue`] whose waiters are tasks.
#[derive(Debug)]
pub struct AttemptPermits {
    queue: Mutex<FairQueue<oneshot::Sender<Turn>>>,
}

/// What a waiting job is told.
#[derive(Debug)]
enum Turn {
    Go,
    Leave,
}

/// One attempt's permit; released when dropped.
#[derive(Debug)]
pub struct AttemptPermit {
    permits: Arc<AttemptPermits>,
    integration: String,
}

impl AttemptPermits {
    pub fn new(total: usize, per_integration: usize, prefetch: usize) -> Arc<Self> {
        Arc::new(AttemptPermits {
            queue: Mutex::new(FairQueue::new(total, per_integration, prefetch)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FairQueue<oneshot::Sender<Turn>>> {
        self.queue.lock().expect("permits lock")
    }

    /// A permit for one attempt of `integration` (on `shard`), now or once
    /// its turn comes; `Err` when the job must wait on the ladder instead,
    /// or `stop` (the shard's) is cancelled while it waits.
    pub async fn acquire(
        self: &Arc<Self>,
        integration: &str,
        shard: u32,
        stop: &CancellationToken,
    ) -> Result<AttemptPermit, ParkWhy> {
        let (tx, rx) = oneshot::channel();
        let asked = self.lock().request(integration, shard, tx);
        let ticket = match asked {
            Asked::Go => return Ok(self.permit(integration)),
            Asked::Park(why) => return Err(why),
            Asked::Wait { ticket, evicted } => {
                if let Some(evicted) = evicted {
                    let _ = evicted.send(Turn::Leave);
                }
                ticket
            }
        };
        let mut waiting = Waiting {
            permits: self,
            integration,
            ticket,
            rx: Some(rx),
        };
        tokio::select! {
            turn = waiting.rx.as_mut().expect("set above") => {
                waiting.rx = None;
                match turn {
                    Ok(Turn::Go) => Ok(self.permit(integration)),
                    // The sender is only dropped with the queue.
                    Ok(Turn::Leave) | Err(_) => Err(ParkWhy::Crowded),
                }
            }
            _ = stop.cancelled() => Err(ParkWhy::Stopping),
        }
    }

    fn permit(self: &Arc<Self>, integration: &str) -> AttemptPermit {
        AttemptPermit {
            permits: self.clone(),
            integration: integration.to_owned(),
        }
    }

    /// Releases a permit of `key` and wakes the jobs whose turn it is; a
    /// job that stopped waiting meanwhile gives its permit straight back.
    fn release(&self, key: &str) {
        let mut queue = self.lock();
        let mut granted = queue.release(key);
        while let Some((key, waiter)) = granted.pop() {
            if waiter.send(Turn::Go).is_err() {
                granted.extend(queue.release(&key));
            }
        }
    }

    /// Free permits (for tests and metrics).
    pub fn free(&self) -> usize {
        self.lock().free()
    }
}

/// A job in line; leaving (dropped before its turn) takes it out of the
/// line, and a turn that came meanwhile is given back.
struct Waiting<'a> {
    permits: &'a Arc<AttemptPermits>,
    integration: &'a str,
    ticket: Ticket,
    rx: Option<oneshot::Receiver<Turn>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        let mut queue = self.permits.lock();
        if queue.cancel(self.integration, self.ticket).is_some() {
            return;
        }
        // Granted or evicted, under the lock, before this took it.
        if let Ok(Turn::Go) = rx.try_recv() {
            drop(queue);
            self.permits.release(self.integration);
        }
    }
}

impl Drop for AttemptPermit {
    fn drop(&mut self) {
        self.permits.release(&self.integration);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn go<W: std::fmt::Debug>(a: Asked<W>) {
        assert!(matches!(a, Asked::Go), "expected a permit now, got {a:?}");
    }

    fn waits<W: std::fmt::Debug>(a: Asked<W>) -> Ticket {
        match a {
            Asked::Wait { ticket, evicted: None } => ticket,
            other => panic!("expected to wait, got {other:?}"),
        }
    }

    fn keys(granted: Vec<(String, &'static str)>) -> Vec<&'static str> {
        granted.into_iter().map(|(_, w)| w).collect()
    }

    #[test]
    fn the_per_integration_cap_counts_jobs_held_and_waiting() {
        let mut q = FairQueue::new(4, 3, 100);
        go(q.request("a", 0, "a1"));
        go(q.request("a", 0, "a2"));
        go(q.request("a", 0, "a3"));
        assert_eq!(q.request("a", 0, "a4"), Asked::Park(ParkWhy::Busy));
        go(q.request("b", 0, "b1"));
        // All four held; b waits, then its cap counts the waiting one.
        let mut q = FairQueue::new(2, 2, 100);
        go(q.request("x", 0, "x1"));
        go(q.request("b", 0, "b1"));
        waits(q.request("b", 0, "b2"));
        assert_eq!(q.request("b", 0, "b3"), Asked::Park(ParkWhy::Busy));
    }

    #[test]
    fn the_headroom_is_for_integrations_with_nothing_under_way() {
        // 8 permits, headroom 2.
        let mut q = FairQueue::new(8, 8, 100);
        for i in 0..6 {
            go(q.request("slow", 0, "s"));
            assert_eq!(q.free(), 8 - i - 1);
        }
        let s = waits(q.request("slow", 0, "s7"));
        go(q.request("healthy", 1, "h1"));
        let h2 = waits(q.request("healthy", 1, "h2"));
        go(q.request("other", 2, "o1"));
        assert_eq!(q.free(), 0);
        // Nobody eligible waits while permits are free; a release goes to
        // the line holding the fewest: healthy's, once its attempt ends.
        assert_eq!(keys(q.release("healthy")), vec!["h2"]);
        assert!(q.cancel("healthy", h2).is_none(), "granted, no longer in line");
        assert!(q.cancel("slow", s).is_some(), "slow still waits");
    }

    /// The scenario behind this design: hanging integrations hold most
    /// permits and wait for more; a healthy one with several jobs at once
    /// gets each next turn as soon as its previous attempt ends, never
    /// behind them.
    #[test]
    fn a_quick_integration_gets_every_next_turn_before_hanging_ones() {
        let mut q = FairQueue::new(16, 16, 1000);
        let mut hanging_waiting = 0;
        for round in 0..4 {
            for h in ["h1", "h2", "h3", "h4"] {
                match q.request(h, 0, "hang") {
                    Asked::Go => {}
                    Asked::Wait { .. } => hanging_waiting += 1,
                    Asked::Park(why) => panic!("round {round}: {h} parked ({why:?})"),
                }
            }
        }
        assert!(hanging_waiting > 0);
        // The healthy integration's burst of five.
        go(q.request("ok", 1, "ok"));
        for _ in 0..4 {
            waits(q.request("ok", 1, "ok"));
        }
        for n in 0..4 {
            assert_eq!(keys(q.release("ok")), vec!["ok"], "turn {n} after its attempt ended");
        }
        // Its last attempt ends: the headroom stays free for integrations
        // with nothing under way; the hanging ones wait for their own.
        assert!(q.release("ok").is_empty());
        assert_eq!(q.free(), 4);
    }

    #[test]
    fn releases_go_round_robin_among_lines_holding_as_many() {
        let mut q = FairQueue::new(2, 10, 100);
        go(q.request("a", 0, "a1"));
        go(q.request("b", 0, "b1"));
        waits(q.request("a", 0, "a2"));
        waits(q.request("a", 0, "a3"));
        waits(q.request("b", 0, "b2"));
        waits(q.request("c", 0, "c1"));
        // Fewest held first, turn order among equals: a (first in turn, none
        // held once a1 ended), then c before a (a went last), then b, which
        // holds one, only when it is alone in line.
        assert_eq!(keys(q.release("a")), vec!["a2"]);
        assert_eq!(keys(q.release("a")), vec!["c1"]);
        assert_eq!(keys(q.release("c")), vec!["a3"]);
        assert_eq!(keys(q.release("a")), vec!["b2"]);
        assert!(q.release("b").is_empty());
        assert!(q.release("b").is_empty());
        assert_eq!(q.free(), 2);
    }

    #[test]
    fn a_crowded_shard_sends_its_longest_lines_newest_job_to_the_ladder() {
        // Prefetch 8: at most 4 waiting per shard. All permits held.
        let mut q = FairQueue::new(1, 10, 8);
        go(q.request("x", 9, "x"));
        waits(q.request("long", 0, "l1"));
        waits(q.request("long", 0, "l2"));
        waits(q.request("long", 0, "l3"));
        waits(q.request("short", 0, "s1"));
        match q.request("short", 0, "s2") {
            Asked::Wait {
                evicted: Some("l3"), ..
            } => {}
            other => panic!("expected l3 evicted, got {other:?}"),
        }
        // Another shard is not crowded by this one.
        waits(q.request("elsewhere", 1, "e1"));
        // The longest line is now the newcomer's own: it parks itself.
        assert_eq!(q.request("short", 0, "s3"), Asked::Park(ParkWhy::Crowded));
    }

    #[test]
    fn cancelled_waiters_leave_their_line() {
        let mut q = FairQueue::new(1, 10, 100);
        go(q.request("a", 0, "a1"));
        let b = waits(q.request("b", 0, "b1"));
        waits(q.request("c", 0, "c1"));
        assert_eq!(q.cancel("b", b), Some("b1"));
        assert_eq!(q.cancel("b", b), None);
        assert_eq!(keys(q.release("a")), vec!["c1"]);
    }

    async fn take(p: &Arc<AttemptPermits>, id: &str, stop: &CancellationToken) -> Result<AttemptPermit, ParkWhy> {
        tokio::time::timeout(Duration::from_secs(1), p.acquire(id, 0, stop))
            .await
            .expect("acquire waited although a permit or a refusal was due")
    }

    #[tokio::test]
    async fn a_waiting_job_gets_the_released_permit() {
        let p = AttemptPermits::new(2, 2, 100);
        let stop = CancellationToken::new();
        let a = take(&p, "a", &stop).await.unwrap();
        let b = take(&p, "b", &stop).await.unwrap();
        let waiter = {
            let (p, stop) = (p.clone(), stop.clone());
            tokio::spawn(async move { p.acquire("c", 0, &stop).await.map(|_held| ()) })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "no permit was free");
        drop(a);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("the released permit went to the waiter")
            .unwrap()
            .unwrap();
        drop(b);
        assert_eq!(p.free(), 2, "every permit back, the waiter's too");
    }

    #[tokio::test]
    async fn a_stopping_shard_sends_its_waiting_jobs_away_and_loses_no_permit() {
        let p = AttemptPermits::new(1, 4, 100);
        let stop = CancellationToken::new();
        let held = take(&p, "a", &stop).await.unwrap();
        let waiter = {
            let (p, stop) = (p.clone(), stop.clone());
            tokio::spawn(async move { p.acquire("b", 0, &stop).await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        stop.cancel();
        let left = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(left, Err(ParkWhy::Stopping));
        drop(held);
        assert_eq!(p.free(), 1);
        // A waiter dropped just as its turn came gives the permit back.
        let stop = CancellationToken::new();
        let held = take(&p, "a", &stop).await.unwrap();
        let mut waiting = Box::pin(p.acquire("b", 0, &stop));
        assert!(futures_util::poll!(waiting.as_mut()).is_pending());
        drop(held); // granted to b, not yet polled
        drop(waiting);
        assert_eq!(p.free(), 1, "the turn given to a job that left came back");
    }
}
