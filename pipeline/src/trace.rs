//! Traces across the pipeline: one span per batch per stage — a source's intake, the log
//! commit, each shard, each sink — joined to the trace of the request or message the batch came
//! from, so that one slow frame can be followed from its publisher to Postgres.
//!
//! Off unless the binary installs an OpenTelemetry exporter and calls [`enable`]: then every
//! call here is one relaxed load and a return. When on, the log commit's span is a child of the
//! first incoming context of its group (or a root, sampled by the configured sampler) and is
//! linked to the others; the shards' and sinks' spans are children of the commit's span, and
//! only of a sampled one: an unsampled group costs one span, not one per stage.

use std::sync::atomic::{AtomicBool, Ordering};

use fleetpipe_processors::trace::TraceContext;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

static ON: AtomicBool = AtomicBool::new(false);

/// Spans are made from now on (an OpenTelemetry layer is installed).
pub fn enable() {
    ON.store(true, Ordering::Relaxed);
}

pub fn is_on() -> bool {
    ON.load(Ordering::Relaxed)
}

fn span_context(c: &TraceContext) -> SpanContext {
    let flags = if c.sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
    SpanContext::new(
        TraceId::from_bytes(c.trace_id),
        SpanId::from_bytes(c.span_id),
        flags,
        true,
        TraceState::default(),
    )
}

/// The span's own context once it is sampled (`None` otherwise: nothing downstream joins it).
pub fn sampled_context(span: &tracing::Span) -> Option<TraceContext> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_sampled()).then(|| TraceContext {
        trace_id: sc.trace_id().to_bytes(),
        span_id: sc.span_id().to_bytes(),
        sampled: true,
    })
}

/// The current span's context when tracing is on and it is sampled: what a sink writes
/// into an output record (`traceparent`) so that consumers join the trace.
pub fn current() -> Option<TraceContext> {
    if !is_on() {
        return None;
    }
    sampled_context(&tracing::Span::current())
}

/// A stage's span over one batch: a child of `contexts[0]`, linked to the rest (`None` when
/// tracing is off). `root`: made even without an incoming context (the log commit, the start of
/// every trace the sampler picks); otherwise only for a batch that has one.
pub fn stage_span(
    stage: &str,
    contexts: &[TraceContext],
    frames: usize,
    root: bool,
) -> Option<tracing::Span> {
    if !is_on() || (contexts.is_empty() && !root) {
        return None;
    }
    let span =
        tracing::info_span!(target: "fleetpipe::trace", "stage", otel.name = stage, frames = frames as u64);
    if let Some((first, rest)) = contexts.split_first() {
        let parent = opentelemetry::Context::new().with_remote_span_context(span_context(first));
        let _ = span.set_parent(parent);
        for c in rest.iter().take(MAX_LINKS) {
            span.add_link(span_context(c));
        }
    }
    Some(span)
}

/// Links past this many are left out (a batch may fold thousands of traced messages).
const MAX_LINKS: usize = 128;

/// A source's intake of messages that carried a `traceparent`: a span joined to them, whose
/// context stands for the batch downstream (empty when tracing is off or none carried one).
pub fn intake(source: &'static str, incoming: &[TraceContext], frames: usize) -> Vec<TraceContext> {
    let Some(span) = stage_span(source, incoming, frames, false) else { return Vec::new() };
    sampled_context(&span).into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default_nothing_is_made() {
        let c =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").expect("valid");
        assert!(stage_span("log.commit", &[c], 1, true).is_none());
        assert!(intake("http", &[c], 1).is_empty());
    }
}
