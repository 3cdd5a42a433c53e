//! OpenTelemetry traces, on the wire: fleetpipe (the binary, exporting OTLP/HTTP because
//! `OTEL_EXPORTER_OTLP_ENDPOINT` says so) against an OTLP receiver this test runs, with frames
//! that carry a W3C `traceparent` over HTTP, MQTT 5 and Kafka.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;

/// A span as the receiver got it.
#[derive(Debug, Clone)]
struct Got {
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    service: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An OTLP/HTTP receiver (`POST /v1/traces`, protobuf) on a free port.
async fn receiver() -> (u16, Arc<Mutex<Vec<Got>>>) {
    let got: Arc<Mutex<Vec<Got>>> = Arc::default();
    let store = Arc::clone(&got);
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let store = Arc::clone(&store);
            async move {
                let Ok(req) = ExportTraceServiceRequest::decode(body) else {
                    return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
                };
                let mut out = store.lock().unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .and_then(|a| a.value.as_ref())
                        .map(|v| format!("{:?}", v.value))
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            out.push(Got {
                                name: s.name,
                                trace_id: hex(&s.trace_id),
                                span_id: hex(&s.span_id),
                                parent: hex(&s.parent_span_id),
                                service: service.clone(),
                            });
                        }
                    }
                }
                (axum::http::StatusCode::OK, ExportTraceServiceResponse::default().encode_to_vec())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, got)
}

fn spans_of(got: &Mutex<Vec<Got>>, trace_id: &str) -> Vec<Got> {
    got.lock().unwrap().iter().filter(|s| s.trace_id == trace_id).cloned().collect()
}

/// Waits until the trace holds every stage named, and returns its spans by name.
async fn trace_with(got: &Arc<Mutex<Vec<Got>>>, trace_id: &str, stages: &[&str]) -> BTreeMap<String, Got> {
    let got = Arc::clone(got);
    let (trace_id, stages): (String, Vec<String>) =
        (trace_id.to_owned(), stages.iter().map(|s| s.to_string()).collect());
    wait_for(&format!("trace {trace_id} with {stages:?}"), Duration::from_secs(30), move || {
        let spans = spans_of(&got, &trace_id);
        let by_name: BTreeMap<String, Got> = spans.into_iter().map(|s| (s.name.clone(), s)).collect();
        stages.iter().all(|s| by_name.contains_key(s)).then_some(by_name)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_with_a_traceparent_is_followed_from_http_mqtt5_and_kafka_through_the_log_shards_and_sinks() {
    let (otlp, got) = receiver().await;
    let kafka = Tansu::start();
    let topic = format!("traced-{}", unique());
    kafka_client(&["create", &kafka.brokers(), &topic, "1"]);
    kafka_client(&["create", &kafka.brokers(), &format!("{topic}-clean"), "1"]);
    let dir = tempfile::tempdir().unwrap();
    let (http, gw) = (free_port(), free_port());
    let config = dir.path().join("fleetpipe.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[http]\naddr = \"127.0.0.1:{http}\"\n[gateway]\nlisten = \"127.0.0.1:{gw}\"\n\
             [parquet]\nroll_secs = 0.3\n[kafka]\nbrokers = \"{}\"\ntopic = \"{topic}\"\ngroup = \"traced-{}\"\n\
             clean_topic = \"{topic}-clean\"\ndlq_topic = \"\"\nevents_topic = \"\"\n",
            dir.path().display(),
            kafka.brokers(),
            unique()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_fleetpipe"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{otlp}"))
        .env("OTEL_SERVICE_NAME", "fleetpipe-under-test")
        // Nothing without a sampled parent: only the traces this test starts are recorded.
        .env("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
        .env("OTEL_TRACES_SAMPLER_ARG", "0")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let running = Fleetpipe::adopt(child, http).await;

    // HTTP: the traceparent header.
    let (t_http, s_http) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let frame = r#"{"vehicle_id":"TR-HTTP","kind":"location","ts":"2026-11-25T21:00:00.250Z","seq":1,"lat":56.1,"lon":10.2}"#;
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{http}/v1/frames"))
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{t_http}-{s_http}-01"))
        .body(frame)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Not sampled by its publisher: nothing of it is recorded.
    let t_unsampled = "11111111111111111111111111111111";
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{http}/v1/frames"))
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{t_unsampled}-2222222222222222-00"))
        .body(frame.replace("TR-HTTP", "TR-QUIET"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // MQTT 5: a user property.
    let (t_mqtt, s_mqtt) = ("5bf92f3577b34da6a3ce929d0e0e4736", "10f067aa0ba902b7");
    let mut o = rumqttc::v5::MqttOptions::new(format!("traced-{}", unique()), "127.0.0.1", gw);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
    let acked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&acked);
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_)) = ev {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
        user_properties: vec![("traceparent".into(), format!("00-{t_mqtt}-{s_mqtt}-01"))],
        ..Default::default()
    };
    client
        .publish_with_properties(
            "vehicles/TR-MQTT/location",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            frame.replace("TR-HTTP", "TR-MQTT"),
            props,
        )
        .await
        .unwrap();
    let a = Arc::clone(&acked);
    wait_for("the MQTT 5 PUBACK", Duration::from_secs(10), move || {
        a.load(std::sync::atomic::Ordering::SeqCst).then_some(())
    })
    .await;

    // Kafka: a record header.
    let (t_kafka, s_kafka) = ("6bf92f3577b34da6a3ce929d0e0e4736", "20f067aa0ba902b7");
    let record = dir.path().join("record.json");
    std::fs::write(&record, frame.replace("TR-HTTP", "TR-KAFKA")).unwrap();
    kafka_client(&[
        "produce-raw",
        &kafka.brokers(),
        &topic,
        "TR-KAFKA",
        record.to_str().unwrap(),
        &format!("00-{t_kafka}-{s_kafka}-01"),
    ]);

    for (source, trace_id, publisher_span) in
        [("http", t_http, s_http), ("mqtt", t_mqtt, s_mqtt), ("kafka", t_kafka, s_kafka)]
    {
        let spans =
            trace_with(&got, trace_id, &[source, "log.commit", "shard", "sink.parquet", "sink.kafka"]).await;
        let intake = &spans[source];
        assert_eq!(
            intake.parent, publisher_span,
            "{source}: the intake is the publisher's child: {spans:#?}"
        );
        assert_eq!(spans["log.commit"].parent, intake.span_id, "{source}: {spans:#?}");
        assert_eq!(spans["shard"].parent, spans["log.commit"].span_id, "{source}: {spans:#?}");
        assert_eq!(spans["sink.parquet"].parent, spans["log.commit"].span_id, "{source}: {spans:#?}");
        assert!(intake.service.contains("fleetpipe-under-test"), "OTEL_SERVICE_NAME honoured: {intake:?}");
        assert_eq!(spans["sink.kafka"].parent, spans["log.commit"].span_id, "{source}: {spans:#?}");
    }
    // Every frame was stored (none rejected), and the clean output carries each traced frame's
    // trace on, as the Kafka sink's span; the untraced one has no header.
    let clean = kafka_records(&kafka.brokers(), &format!("{topic}-clean"), 4, 30);
    for (vehicle, trace_id) in [("TR-HTTP", t_http), ("TR-MQTT", t_mqtt), ("TR-KAFKA", t_kafka)] {
        let record = clean
            .iter()
            .find(|r| r["key"] == vehicle)
            .unwrap_or_else(|| panic!("{vehicle} in the clean topic: {clean:#?}"));
        let tp = record["headers"]["traceparent"].as_str().unwrap_or_else(|| panic!("{record}"));
        let sink_span = spans_of(&got, trace_id).into_iter().find(|s| s.name == "sink.kafka").unwrap();
        assert_eq!(tp, format!("00-{trace_id}-{}-01", sink_span.span_id), "{record}");
    }
    let quiet = clean.iter().find(|r| r["key"] == "TR-QUIET").expect("the unsampled frame is output too");
    assert!(quiet["headers"].get("traceparent").is_none(), "not traced: {quiet}");
    let status = tokio::task::spawn_blocking(move || running.sigterm()).await.unwrap();
    assert!(status.success(), "{status:?}");
    // Everything is flushed at exit: still nothing of the unsampled request.
    assert!(spans_of(&got, t_unsampled).is_empty(), "{:#?}", spans_of(&got, t_unsampled));
    let roots = got.lock().unwrap().iter().filter(|s| s.parent.is_empty()).count();
    assert_eq!(roots, 0, "sampling ratio 0: no root spans of fleetpipe's own");
}
