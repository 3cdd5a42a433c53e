//! The source contract, and the set of running sources.
//!
//! A source pushes entries into the intake until shutdown and is told when each is durable (the
//! [`crate::Completion`] of its submission); only then does it acknowledge. On shutdown it stops
//! taking input, waits until what it submitted is durable and acknowledged, and returns: what it
//! had received but not submitted stays unacknowledged, for the sender to deliver again.
//!
//! Adding a source is one file in `ingest/` (a type that implements [`Source`]) plus one line in
//! the binary's wiring: `sources.spawn(MySource::new(...))`.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fleetpipe_processors::validate::Rules;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::entry::Intake;
use crate::{Error, Result};

/// Whether one source is connected and subscribed (or listening). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Ready(Arc<AtomicBool>);

impl Ready {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The instance's readiness (CONTRACT.md §4): every source ready and not draining.
#[derive(Debug, Default)]
pub struct Readiness {
    sources: Mutex<Vec<Ready>>,
    draining: AtomicBool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Acquire)
            && self.sources.lock().unwrap_or_else(PoisonError::into_inner).iter().all(Ready::get)
    }

    fn add(&self) -> Ready {
        let ready = Ready::default();
        self.sources.lock().unwrap_or_else(PoisonError::into_inner).push(ready.clone());
        ready
    }
}

/// On while the write-ahead log cannot be written (a full or failing disk): sources that can
/// refuse at once (HTTP: 503 with `Retry-After`) do, instead of queueing. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Pushback(Arc<AtomicBool>);

impl Pushback {
    pub fn set(&self, on: bool) {
        self.0.store(on, Ordering::Release);
    }

    pub fn is_on(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Resolves when the instance starts its drain.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// What a running source is given.
pub struct SourceContext {
    /// Where entries go; a full intake is the pushback.
    pub intake: Intake,
    /// The contract's configurable limits, for decoding.
    pub rules: Arc<Rules>,
    /// Set it once connected and subscribed (or listening), clear it while not.
    pub ready: Ready,
    /// Resolves when the drain starts.
    pub shutdown: Shutdown,
    /// The instance's readiness, for a source that answers probes (HTTP `/ready`).
    pub readiness: Arc<Readiness>,
    /// On while the log cannot be written.
    pub pushback: Pushback,
}

/// A source of frames (MQTT, Kafka, HTTP, ...).
pub trait Source: Send + 'static {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Short name, for logs.
    fn name(&self) -> &'static str;
    /// Its `source` label in `fleetpipe_frames_received_total` (the name, unless several
    /// sources share a label).
    fn counted_as(&self) -> &'static str {
        self.name()
    }
    /// How long the drain waits for the source to return before giving up on it (`None`:
    /// as long as it takes — a source that holds unacknowledged input must finish).
    fn drain_grace(&self) -> Option<Duration> {
        None
    }
    /// Runs until `ctx.shutdown` resolves, then drains (see the module header).
    fn run(self, ctx: SourceContext) -> impl Future<Output = std::result::Result<(), Self::Error>> + Send;
}

struct Running {
    name: &'static str,
    grace: Option<Duration>,
    task: JoinHandle<std::result::Result<(), crate::sink::BoxError>>,
}

/// The sources of an instance, started one by one and stopped together.
pub struct Sources {
    intake: Intake,
    rules: Arc<Rules>,
    pushback: Pushback,
    readiness: Arc<Readiness>,
    stop: watch::Sender<bool>,
    running: Vec<Running>,
}

impl Sources {
    pub fn new(intake: Intake, rules: Arc<Rules>, pushback: Pushback) -> Sources {
        Sources {
            intake,
            rules,
            pushback,
            readiness: Arc::new(Readiness::default()),
            stop: watch::channel(false).0,
            running: Vec::new(),
        }
    }

    /// Starts `source` on the runtime.
    pub fn spawn<S: Source>(&mut self, source: S) {
        let name = source.name();
        // Its received counter is there, at 0, before its first frame.
        crate::count_received(source.counted_as(), 0);
        let grace = source.drain_grace();
        let ctx = SourceContext {
            intake: self.intake.clone(),
            rules: Arc::clone(&self.rules),
            ready: self.readiness.add(),
            shutdown: Shutdown(self.stop.subscribe()),
            readiness: Arc::clone(&self.readiness),
            pushback: self.pushback.clone(),
        };
        let task = tokio::spawn(async move { source.run(ctx).await.map_err(Into::into) });
        self.running.push(Running { name, grace, task });
    }

    /// Whether every source is ready and the instance is not draining.
    pub fn readiness(&self) -> Arc<Readiness> {
        Arc::clone(&self.readiness)
    }

    /// Starts the drain: readiness goes false, every source is told to stop; returns once each
    /// has returned (or its drain grace ran out). The intake closes when the last one lets go.
    pub async fn stop(self) -> Result<()> {
        let Sources { intake, readiness, stop, running, .. } = self;
        readiness.draining.store(true, Ordering::Release);
        drop(intake);
        let _ = stop.send(true);
        let mut first_error = None;
        for r in running {
            let outcome = match r.grace {
                Some(grace) => match tokio::time::timeout(grace, r.task).await {
                    Ok(joined) => joined,
                    Err(_) => {
                        tracing::warn!(source = r.name, "source still busy after its drain grace period");
                        continue;
                    }
                },
                None => r.task.await,
            };
            let result = match outcome {
                Ok(result) => result,
                Err(e) => Err(e.to_string().into()),
            };
            if let Err(e) = result {
                tracing::error!(source = r.name, error = %e, "source failed");
                first_error.get_or_insert(Error::Source { source_name: r.name, error: e });
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
