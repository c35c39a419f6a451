//! The node's one timer for every auction actor: when an auction should next
//! start or end, its actor is sent its `Tick`. One task and one ordered map
//! for the node instead of a sleeping task per actor, so a live auction that
//! waits for its end costs a map entry, not a task and a timer of its own.
//! Generic over the message, so that it knows nothing of the actors that use
//! it.
//!
//! An entry holds the actor and a number, not the message: the message is
//! made from the number when it fires (`make`). An auction actor's message
//! type is some 200 bytes, its tick a `u64`; with a live auction per entry,
//! the map's nodes were a few hundred bytes of every live auction.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ractor::{ActorRef, Message};
use tokio::sync::Notify;
use tokio::time::Instant;

/// An entry, to cancel it: when it fires, and a number that tells entries
/// of the same instant apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimerKey(Instant, u64);

struct Due<M: Message> {
    actor: ActorRef<M>,
    token: u64,
}

pub struct Timers<M: Message> {
    entries: Mutex<(BTreeMap<TimerKey, Due<M>>, u64)>,
    /// The message an entry's actor is sent, from the entry's token.
    make: fn(u64) -> M,
    /// Woken when an entry earlier than all others is added, and on `stop`.
    earlier: Notify,
    stopped: AtomicBool,
}

impl<M: Message> Timers<M> {
    /// The timers, and the task that fires them (until `stop`): an entry's
    /// actor is sent `make(token)`.
    pub fn start(make: fn(u64) -> M) -> Arc<Timers<M>> {
        let timers = Arc::new(Timers {
            entries: Mutex::new((BTreeMap::new(), 0)),
            make,
            earlier: Notify::new(),
            stopped: AtomicBool::new(false),
        });
        tokio::spawn(timers.clone().fire());
        timers
    }

    /// Ends the task; nothing fires any more.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner).0.clear();
        self.earlier.notify_one();
    }

    /// Sends `actor` `make(token)` at `at`.
    pub fn schedule(&self, at: Instant, actor: ActorRef<M>, token: u64) -> TimerKey {
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (map, next) = &mut *entries;
        *next += 1;
        let key = TimerKey(at, *next);
        let first = map.first_key_value().is_none_or(|(earliest, _)| key < *earliest);
        map.insert(key, Due { actor, token });
        drop(entries);
        if first {
            self.earlier.notify_one();
        }
        key
    }

    pub fn cancel(&self, key: TimerKey) {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner).0.remove(&key);
    }

    /// How many entries wait (for the tests: nothing else needs to know).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner).0.len()
    }

    /// Takes the entries due by `now`.
    fn take_due(&self, now: Instant) -> Vec<Due<M>> {
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let map = &mut entries.0;
        let later = map.split_off(&TimerKey(now, u64::MAX));
        std::mem::replace(map, later).into_values().collect()
    }

    fn earliest(&self) -> Option<Instant> {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner).0.first_key_value().map(|(key, _)| key.0)
    }

    async fn fire(self: Arc<Self>) {
        while !self.stopped.load(Ordering::Acquire) {
            for entry in self.take_due(Instant::now()) {
                let _ = entry.actor.cast((self.make)(entry.token));
            }
            let earlier = self.earlier.notified();
            tokio::pin!(earlier);
            // Registered before the map is read again: an entry added from here on wakes it.
            earlier.as_mut().enable();
            match self.earliest() {
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = &mut earlier => {}
                    }
                }
                None => earlier.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ractor::{Actor, ActorProcessingErr};
    use tokio::sync::mpsc;

    use super::*;

    struct Tick(u64);

    /// Stands in for an auction actor: reports each `Tick` it gets.
    struct Recorder(mpsc::UnboundedSender<u64>);

    impl Actor for Recorder {
        type Msg = Tick;
        type State = ();
        type Arguments = ();

        async fn pre_start(&self, _: ActorRef<Tick>, _: ()) -> Result<(), ActorProcessingErr> {
            Ok(())
        }

        async fn handle(
            &self,
            _: ActorRef<Tick>,
            Tick(generation): Tick,
            _: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            let _ = self.0.send(generation);
            Ok(())
        }
    }

    /// An entry is the actor and its token whatever the size of the message
    /// (an auction actor's is some 200 bytes): one entry per live auction.
    #[test]
    fn an_entry_does_not_hold_the_message() {
        #[allow(dead_code)]
        struct Large([u64; 32]);
        assert_eq!(std::mem::size_of::<Due<Large>>(), 16);
    }

    #[tokio::test(start_paused = true)]
    async fn ticks_come_at_their_time_in_order_and_cancelled_ones_never() {
        let (sender, mut ticks) = mpsc::unbounded_channel();
        let (actor, _) = Actor::spawn(None, Recorder(sender), ()).await.unwrap();
        let timers = Timers::start(Tick);
        let start = Instant::now();
        timers.schedule(start + Duration::from_secs(30), actor.clone(), 3);
        let cancelled = timers.schedule(start + Duration::from_secs(20), actor.clone(), 2);
        // Earlier than everything scheduled: wakes the sleeping task.
        timers.schedule(start + Duration::from_secs(10), actor.clone(), 1);
        timers.cancel(cancelled);
        assert_eq!(timers.len(), 2);

        assert_eq!(ticks.recv().await, Some(1));
        assert_eq!(Instant::now() - start, Duration::from_secs(10), "not before its time, nor later");
        assert_eq!(ticks.recv().await, Some(3));
        assert_eq!(Instant::now() - start, Duration::from_secs(30), "the cancelled one never came");
        assert_eq!(timers.len(), 0);

        timers.schedule(Instant::now() + Duration::from_secs(5), actor.clone(), 4);
        timers.stop();
        assert!(tokio::time::timeout(Duration::from_secs(60), ticks.recv()).await.is_err(), "stopped: nothing fires");
        actor.stop(None);
    }
}
