//! OpenTelemetry traces (issue 11): a `serve` process exports OTLP/gRPC to a collector running
//! in this test (built from the opentelemetry proto types), configured only by the standard
//! `OTEL_*` environment. A call carrying a W3C `traceparent` yields one trace: the call as a
//! child of the caller's span, its queue wait, one span per Feishu attempt (a retried reply has
//! two), the token fetch, and in cluster mode the Redis decisions.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use common::{ServeProcess, connect, eventually, free_port, shared_redis, spawn_fake, text};
use feishu_reply_gateway::fake_feishu::{FakeFeishu, FakeOptions, Fault};
use feishu_reply_gateway::proto::JobState;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use parking_lot::Mutex;
use tonic::{Request, Response, Status};

/// The caller's trace and span (W3C example ids).
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// What the collector received: every span with its resource's `service.name`.
#[derive(Default, Clone)]
struct Collector(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut got = self.0.lock();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| string(kv.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                got.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Listens on a loopback port; returns the endpoint to give the gateway.
    async fn start() -> (Self, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let c = Collector::default();
        let svc = TraceServiceServer::new(c.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (c, format!("http://{addr}"))
    }

    /// The spans of the caller's trace so far.
    fn trace(&self) -> Vec<(String, Span)> {
        self.0
            .lock()
            .iter()
            .filter(|(_, s)| hex(&s.trace_id) == TRACE_ID)
            .cloned()
            .collect()
    }

    /// Waits until the caller's trace has spans named `names` (with repeats), returns them.
    async fn wait_for(&self, names: &[&str]) -> Vec<(String, Span)> {
        let mut want: HashMap<&str, usize> = HashMap::new();
        for n in names {
            *want.entry(n).or_default() += 1;
        }
        eventually("the trace's spans exported", async || {
            let spans = self.trace();
            want.iter()
                .all(|(n, k)| spans.iter().filter(|(_, s)| s.name == *n).count() >= *k)
        })
        .await;
        self.trace()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn string(v: &Value) -> Option<String> {
    match v {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        _ => None,
    }
}

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| string(kv.value.as_ref()?.value.as_ref()?))
}

fn named<'a>(spans: &'a [(String, Span)], name: &str) -> Vec<&'a Span> {
    let mut v: Vec<&Span> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == name)
        .collect();
    v.sort_by_key(|s| s.start_time_unix_nano);
    v
}

fn config_file(fake: &FakeFeishu, extra: &str) -> (PathBuf, PathBuf) {
    let dir =
        std::env::temp_dir().join(format!("gw-traces-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gateway.toml");
    std::fs::write(
        &file,
        format!(
            "[feishu]\nbase_url = \"{}\"\n[apps.default]\napp_id = \"cli_t\"\napp_secret = \"s\"\n\
             [server]\nshutdown_grace_ms = 100\n[auth]\nallow_anonymous = true\n\
             [retry]\nbase_delay_ms = 20\n{extra}",
            fake.base_url()
        ),
    )
    .unwrap();
    (file, dir)
}

fn traced<T>(msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CALLER_SPAN}-01").parse().unwrap(),
    );
    req
}

fn otel_env<'a>(endpoint: &'a str, metrics_addr: &'a str) -> [(&'a str, &'a str); 4] {
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_SERVICE_NAME", "gw-under-test"),
        // Export every 50 ms (default 5 s) so the test does not wait.
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ("GATEWAY_METRICS_ADDR", metrics_addr),
    ]
}

/// Every span of the trace has a fixed name: no chat or message id in it.
fn assert_names_carry_no_ids(spans: &[(String, Span)]) {
    for (service, s) in spans {
        assert_eq!(service, "gw-under-test");
        assert!(
            !s.name.contains("oc_") && !s.name.contains("om_"),
            "span name {:?}",
            s.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_reply_is_one_trace_under_the_caller_s_span() {
    let (collector, endpoint) = Collector::start().await;
    let fake = spawn_fake(FakeOptions::default()).await;
    // The first attempt is turned away with 230020 (retryable): two attempts.
    fake.push_fault(Fault {
        message_id: Some("om_t1_in_traced".into()),
        http: 400,
        code: 230020,
        msg: "rate limited".into(),
        times: 1,
        ..Fault::default()
    });
    let (file, _dir) = config_file(&fake, "");
    let (port, mport) = (free_port(), free_port());
    let maddr = format!("127.0.0.1:{mport}");
    let _gw = ServeProcess::start_with(&file, port, &otel_env(&endpoint, &maddr));
    let mut c = connect(port).await;
    c.reply(traced(text("om_t1_in_traced", "oc_traced", "hi")))
        .await
        .expect("delivered on the second attempt");
    assert_eq!(fake.received().len(), 2);

    let spans = collector
        .wait_for(&[
            "Reply",
            "queue_wait",
            "queue_wait",
            "feishu.reply",
            "feishu.reply",
            "feishu.token",
        ])
        .await;
    assert_names_carry_no_ids(&spans);
    let [call] = named(&spans, "Reply")[..] else {
        panic!("one Reply span: {spans:?}")
    };
    // The call continues the caller's trace: its parent is the caller's span.
    assert_eq!(hex(&call.parent_span_id), CALLER_SPAN);
    assert_eq!(attr(call, "chat_id").as_deref(), Some("oc_traced"));
    let call_id = hex(&call.span_id);
    // Waits and attempts are the call's children; the retry waited again.
    let waits = named(&spans, "queue_wait");
    assert_eq!(waits.len(), 2, "{waits:?}");
    let attempts = named(&spans, "feishu.reply");
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    for s in waits.iter().chain(&attempts) {
        assert_eq!(hex(&s.parent_span_id), call_id, "{s:?}");
    }
    assert_eq!(attr(attempts[0], "attempt").as_deref(), Some("1"));
    assert_eq!(attr(attempts[0], "feishu.code").as_deref(), Some("230020"));
    assert_eq!(attr(attempts[0], "http.status").as_deref(), Some("400"));
    assert_eq!(attr(attempts[0], "outcome").as_deref(), Some("retryable"));
    assert_eq!(attr(attempts[1], "attempt").as_deref(), Some("2"));
    assert_eq!(attr(attempts[1], "feishu.code").as_deref(), Some("0"));
    assert!(
        attr(attempts[1], "feishu.log_id").is_some_and(|l| !l.is_empty()),
        "{:?}",
        attempts[1]
    );
    // The second wait began after the first attempt ended.
    assert!(waits[1].start_time_unix_nano >= attempts[0].end_time_unix_nano);
    // The token was fetched for the first attempt, inside it.
    let [token] = named(&spans, "feishu.token")[..] else {
        panic!("one token fetch: {spans:?}")
    };
    assert_eq!(hex(&token.parent_span_id), hex(&attempts[0].span_id));
    assert_eq!(attr(token, "outcome").as_deref(), Some("ok"));
    // The latency and queue wait histograms carry the trace as exemplars (Grafana's links
    // from a panel to the trace).
    let text = common::metrics_text(mport).await;
    let exemplar = format!("# {{trace_id=\"{TRACE_ID}\"}}");
    for histogram in [
        "feishu_reply_upstream_latency_seconds_bucket",
        "feishu_reply_queue_wait_seconds_bucket",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(histogram) && l.contains(&exemplar)),
            "{histogram} has no exemplar of the trace:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_job_in_cluster_mode_continues_the_submit_s_trace() {
    let (collector, endpoint) = Collector::start().await;
    let (url, _redis) = shared_redis();
    let fake = spawn_fake(FakeOptions::default()).await;
    let prefix = format!("traces{}{}", std::process::id(), free_port());
    let (file, _dir) = config_file(&fake, &common::cluster_section(&url, &prefix));
    let port = free_port();
    let maddr = format!("127.0.0.1:{}", free_port());
    let _gw = ServeProcess::start_with(&file, port, &otel_env(&endpoint, &maddr));
    let mut c = connect(port).await;
    let id = c
        .submit_reply(traced(text("om_j1_in_job", "oc_job", "hi")))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    eventually("the job delivered", async || {
        common::get_job(&mut c, &id).await.state() == JobState::Delivered
    })
    .await;

    let spans = collector
        .wait_for(&[
            "SubmitReply",
            "reply_job",
            "queue_wait",
            "feishu.reply",
            "redis.decide",
        ])
        .await;
    assert_names_carry_no_ids(&spans);
    let [submit] = named(&spans, "SubmitReply")[..] else {
        panic!("one SubmitReply span: {spans:?}")
    };
    assert_eq!(hex(&submit.parent_span_id), CALLER_SPAN);
    // The job outlives the call: its own span, a child of the submit's.
    let [job] = named(&spans, "reply_job")[..] else {
        panic!("one reply_job span: {spans:?}")
    };
    assert_eq!(hex(&job.parent_span_id), hex(&submit.span_id));
    let job_id = hex(&job.span_id);
    for name in ["queue_wait", "feishu.reply", "redis.decide"] {
        for s in named(&spans, name) {
            assert_eq!(hex(&s.parent_span_id), job_id, "{name}: {s:?}");
        }
    }
    let decisions = named(&spans, "redis.decide");
    assert!(
        decisions
            .iter()
            .any(|d| attr(d, "granted").as_deref() == Some("true")),
        "{decisions:?}"
    );
}
