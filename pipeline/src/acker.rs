//! `[pipeline] ack = "sinks"`: acknowledgements that wait for every durable sink.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use fleetpipe_processors::Lsn;

use crate::entry::{Completion, NotDurable};

/// Acknowledges each entry once every durable sink holds it, in log order. An entry a stopped
/// sink can no longer store is answered as not durable.
pub(crate) fn ack_when_stored(
    rx: Receiver<(Lsn, Completion)>,
    sinks: Vec<(Arc<AtomicU64>, Arc<AtomicBool>)>,
) {
    let stored = || sinks.iter().map(|(d, _)| d.load(Ordering::Acquire)).min().unwrap_or(Lsn::MAX);
    let mut pending: VecDeque<(Lsn, Completion)> = VecDeque::new();
    let mut open = true;
    while open || !pending.is_empty() {
        match rx.recv_timeout(Duration::from_millis(1)) {
            Ok(item) => {
                pending.push_back(item);
                pending.extend(rx.try_iter());
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => open = false,
        }
        let durable = stored();
        while pending.front().is_some_and(|(lsn, _)| *lsn <= durable) {
            if let Some((lsn, done)) = pending.pop_front() {
                done(Ok(lsn));
            }
        }
        if !pending.is_empty() && sinks.iter().any(|(_, alive)| !alive.load(Ordering::Acquire)) {
            // Re-read: a sink that closed normally made everything durable before it ended.
            let durable = stored();
            for (lsn, done) in pending.drain(..) {
                if lsn <= durable {
                    done(Ok(lsn));
                } else {
                    done(Err(NotDurable::Log("a sink stopped before storing the entry".into())));
                }
            }
        }
    }
}
