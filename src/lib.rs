//! # feishu-reply-gateway
//!
//! A gRPC service that internal services call to reply to Feishu (Lark) messages, and to send,
//! update and recall them. It validates each call, queues it per chat (per user, per message), paces sends so Feishu's quotas (5/s per chat, 5/s per user,
//! 50/s and 1000/min per app) are never exceeded in any sliding window, keeps the
//! tenant_access_token fresh, retries what is safe to retry with the same uuid (no double
//! posts), and maps every failure to a precise gRPC status. See README.md and DESIGN notes.
//!
//! # Layout
//! In layers, top to bottom; a module uses its own layer and those below it, never above
//! (ARCHITECTURE.md; checked by `tests/architecture.rs`).
//!
//! **Entry.**
//! - `main.rs`: CLI (`serve`, `fake-feishu`, `probe`; `client.rs`: `send [--to T:ID]
//!   [--async] [--stream]`, `update`, `recall`, `job get|watch|cancel`, `inspect chat|app|caller`).
//! - [`app`]: wiring (the only place that picks local or Redis quotas, the redb or Redis job
//!   store, the Redis budget counter, the embedded fake), metrics/health port, shutdown;
//!   `app::partitions` cluster mode's partitions and peer forwarding, started and handed over.
//! - [`reload`]: live reload (SIGHUP, a watch on the config and secret directories): applies a
//!   new config to the Feishu client, budgets, dispatcher, job runner and door, in that order;
//!   refuses a broken one; `feishu_reply_config_*` metrics.
//!
//! **Api.**
//! - [`grpc`]: proto ↔ domain, authentication and admission at the door, the default uuid,
//!   the `ReplyGateway` service (`grpc::entry`: what the door takes of every call, the job it
//!   makes, the uuids derived for a caller; `grpc::message`: Send, SubmitSend, UpdateMessage,
//!   RecallMessage; `grpc::stream`: StreamReply (parts in, the driver's events out); `grpc::answer`: how a call ends, counted per operation;
//!   `grpc::jobs`: SubmitReply, GetReply, WatchReply, CancelReply,
//!   and `JobAnswers`, a job's end in the API's terms; `grpc::admin`: the `ReplyAdmin`
//!   service, InspectChat, InspectApp, InspectCaller); `grpc::door` the door's apps, callers
//!   and reloadable rules in one `Door` a reload replaces; `grpc::status` the one error → gRPC status table
//!   ([`grpc::CallError`]: the domain's error or the door's own; Feishu codes read per endpoint);
//!   [`grpc::peer`] jobs forwarded between replicas (`PeerForward`, the scheduler's `Forward`;
//!   `PeerServer` on the peer listener; per-queue order kept; `grpc::peer::wire` the JSON forms;
//!   `grpc::peer::rebalance` tells the other replicas this one joined or is leaving).
//! - [`auth`]: who is calling (bearer token hash or mTLS identity, or anonymous when allowed),
//!   with which credential (the work it submits is owned by it), which apps it may use, its
//!   admission rate buckets.
//! - [`listen`]: accepting connections within limits (per-port caps, first-bytes deadline,
//!   accept backoff) and the metrics port's HTTP/1 loop (header read timeout, lifetime).
//! - [`proto`]: the generated `feishu.reply.v1` types.
//!
//! **Backends.**
//! - [`cluster`]: the Redis quota store (Lua scripts in `cluster::scripts`: decide, which also
//!   carries the answers waiting, settle in batches, release, block, replay, heartbeat,
//!   partitions); [`cluster::gate`] the Redis gate, the scheduler's `SharedGate` in cluster
//!   mode (lines behind shared keys, failure policy and fallback table, heartbeat, state
//!   published through a `watch`; `cluster::gate::outage` its heartbeat, fallback and
//!   return to Redis); [`cluster::partitions`] the 256 target partitions and
//!   their owners (member leases with peer addresses, rendezvous hashing, claims with epochs,
//!   sends in flight per partition and hand-over once they are answered, the peer secret;
//!   `cluster::partitions::beat` the renewal with its claims and releases,
//!   `cluster::partitions::answer` reads its answer, `cluster::partitions::handover` the
//!   sends that may still count, carried from a partition's last owner to its next);
//!   `cluster::owned` the partitioned gate's split of a job's keys (its target's window kept
//!   here, the rest in Redis); `cluster::settles` the answers waiting, per slot;
//!   `cluster::budget` the budgets' counter in Redis.
//! - [`jobs`]: async reply jobs: running them through the scheduler, cancel, restart recovery;
//!   [`jobs::seam`] the job store seam (`JobStore`; `Shared` for a store the replicas share,
//!   kept by partition; `Ownership`, the partitions a replica runs, which `app` gives from
//!   `cluster::partitions`); `jobs::store` the embedded redb store with group commit (single
//!   node); `jobs::redis` the cluster store in the shared Redis (each job on its chat's
//!   partition's slot, run by the partition's owner, writes fenced by its claim's epoch,
//!   callers' counts on spread slots; its Lua scripts and key layout in
//!   `jobs::redis_scripts`; callers' counts and owners' notices, batched per slot, in `jobs::redis_batch`); `jobs::legacy` jobs of the earlier single-slot layout (read by
//!   their ids, moved into their partitions); `jobs::runner` the background work (following
//!   the partitions owned, reading their jobs and cancels, the inbox, expiry,
//!   what is left at shutdown); `jobs::record` the stored record; `jobs::spec` a stored job back
//!   into a scheduler job (its caller must still own it: a job of a caller not known yet waits
//!   in `Jobs` for a reload that names it).
//! - [`redis_conn`]: the connections to the shared Redis (standalone or Redis Cluster, TLS;
//!   one per lane: quotas, and the job store), shared by both Redis backends.
//! - [`fake_feishu`]: the fake Feishu used by `fake-feishu`, embedded `serve`, tests, benches
//!   (HTTP; inbound jitter and cold-connection delays counted at arrival; the message endpoints
//!   (reply, send, PATCH, PUT, DELETE, get) in `fake_feishu::messages`, CardKit's (create a
//!   card, put an element's text, settings) in `fake_feishu::cards`; what both fakes decide
//!   alike (counters per target and per API, edits and recalls, card entities: sequence,
//!   streaming mode and its limit, texts) in [`fake_feishu::book`], quota counters in
//!   `fake_feishu::window`);
//!   [`fake_feishu::sim`] the same Feishu in-process on tokio's clock, for virtual-time tests.
//!
//! **Domain.**
//! - [`scheduler`]: the async driver (dispatch, sends, a panicking send caught, cancelled
//!   calls, shutdown drain, its own death made visible); `scheduler::error` `GatewayError`, the
//!   domain's failures; `scheduler::handle` the handle callers use (start, submit, reply,
//!   queue, cancel, seed past sends, hold a stream's text in the caller's share, shutdown); `scheduler::admission` queue bounds (count and bytes)
//!   and deadlines at the door, and which chats are urgent (on the critical path of their
//!   app's drain) with the app slots kept for them, and updates (or card texts) a newer one
//!   supersedes;
//!   `scheduler::queue` the per-chat queue (a queue is a chat, `user:<id>` or `message:<id>`)
//!   machine as plain state (fairness, order, timers, deadlines; unit-tested without a
//!   runtime; `queue::take` jobs leaving unsent; `queue::urgent` urgent chats, and a
//!   stream's final text and close, go first);
//!   `scheduler::layout` which quotas a job counts in (`Target`: chat, user, message, card
//!   (10/s) or the app's windows only; `Lane`: a stream's typing also counts in the app
//!   windows' typing twins, which keep `final_headroom_percent` free; app keys per API;
//!   per-app lists; a reload appends changed lists, and how long an app's quotas need for a
//!   backlog);
//!   [`scheduler::inspect`] one chat's queue and the quotas holding it, one app's windows and
//!   queue; [`scheduler::reconfigure`] a reload in the dispatcher (caller shares, quota lists
//!   with their sends carried over, removed apps failing `APP_REMOVED`, removed callers and
//!   credentials rotated out failing `CALLER_REMOVED`); `scheduler::spans`
//!   the `queue_wait` and `feishu.reply` spans; `scheduler::send` a send going out (its own
//!   task, the send timeout, a panic caught, an answer with no dispatcher left);
//!   `scheduler::forward` the seam a job goes to its queue's owner through (cluster mode with
//!   peers), and `Routed`: a job handed back when this replica does not decide its chat; [`scheduler::gate`] the quota seam
//!   (`QuotaGate`: the local table, or a `SharedGate`; opaque memo, grant and answer);
//!   `scheduler::outcome` settling a send and its retries (and which keys a rate refusal
//!   counts in); [`scheduler::gone`] messages Feishu said are recalled or deleted (30 min:
//!   replies to them fail `MESSAGE_GONE` without a call).
//! - [`stream`]: streaming replies: one CardKit card typed into (create, reply with it, the
//!   newest text whenever the card's previous operation is back, streaming mode renewed before
//!   Feishu's limit, the final text and the close whatever ends the stream), every operation
//!   through the scheduler (typing in `Lane::Typing`, the end in `Lane::Final`).
//! - [`reply`]: `MsgType`, content validation (no transport types); `reply::message` a send's
//!   receiver, an update's or a recall's message.
//! - [`budget`]: calendar call budgets per app (`[apps.NAME.budget]`): every Feishu call takes
//!   one first (through `feishu::CallMeter`; across replicas through a `SharedCounter`, else
//!   in the process); spent = refused until the reset.
//! - [`chat_cache`]: bounded message_id → chat_id cache for requests without chat_id.
//!
//! **Upstream.**
//! - [`feishu`]: the `Upstream` seam (`Call`: reply, send, update, edit, recall, and CardKit's
//!   card create, element text, settings; `Api` its endpoint), reqwest client, token cache, answer classification, the `CallMeter` hook every
//!   call is charged to.
//!
//! **Foundation.**
//! - [`config`]: the only place the config file and env are read; validated [`config::Config`]
//!   (`config::args` the flags and env of `serve`; `config::error` errors that never quote the
//!   file, which may hold secrets; `config::auth` callers, `[auth]`, `[server.tls]`, credential
//!   fingerprints and what a caller owns (`Ownership`);
//!   `config::cluster` `[cluster]` as plain data; `config::file` the file format and its
//!   defaults; `config::apps` apps with their own quotas and budgets; [`config::live`] a
//!   reloaded config lined up with the running one: stable app and caller slots, restart-only
//!   settings).
//! - [`metrics`]: one `Metrics` value, `feishu_reply_*` names (`metrics::labels` their label
//!   sets, label values and the list of names; `metrics::backends` the job store's, budgets'
//!   and Redis's; `metrics::streams` the streaming replies').
//! - [`telemetry`]: logs, and OpenTelemetry traces over OTLP when `OTEL_*` asks (the W3C
//!   `traceparent` of a call continued; trace ids as metric exemplars); `telemetry::fields`
//!   the text log's field writer (caller-chosen values quoted and escaped).
//! - [`quota`]: keyed rolling windows counted by arrival bounds (a send holds its slot until
//!   its answer); pure, clock passed in, proptested against random network latencies.
//!
//! Outside `src/`: `proto/` (the gRPC contract), `tests/` (one binary per area, real servers
//! on loopback; `tests/pacing.rs` proves pacing in virtual time; `tests/examples.rs` runs the
//! README's Python caller; `scripts/test` runs the shared-Redis binaries, `partitions` and
//! `cluster_minute` among them, again on a 3-master Redis Cluster), `benches/` (criterion quota bench, load generator with its
//! scenarios in `benches/support/`, `streams` among them; figures in BENCHMARKS.md),
//! `deploy/` (image, k8s, dashboard, alerts; `deploy/check.sh`), `scripts/test` (the test
//! command), `scripts/examples/` (callers in other languages), `.ci/run` (CI), ARCHITECTURE.md (the layers and seams).
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod budget;
pub mod chat_cache;
pub mod cluster;
pub mod config;
pub mod fake_feishu;
pub mod feishu;
pub mod grpc;
pub mod jobs;
pub mod listen;
pub mod metrics;
pub mod quota;
pub mod redis_conn;
pub mod reload;
pub mod reply;
pub mod scheduler;
pub mod stream;
pub mod telemetry;

/// Generated gRPC types of `feishu.reply.v1`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("feishu.reply.v1");
    /// Encoded descriptors, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("gateway_descriptor");
    /// Between replicas only (`grpc::peer`).
    pub mod peer {
        tonic::include_proto!("feishu.reply.peer.v1");
    }
}
