//! Forwarding jobs between replicas (cluster mode with `[cluster] peer_listen`): a job goes to
//! the replica that owns its queue's partition (`cluster::partitions`), which queues, decides
//! and sends it and answers with its result. [`PeerForward`] is the scheduler's
//! `scheduler::Forward` on this side; [`PeerServer`] takes jobs on the other.
//!
//! - **Wire form.** The job as JSON ([`WireJob`]): caller and app by name (each replica maps
//!   them to its own configuration), the Feishu call, queue, target, lane, the deadline left,
//!   the traceparent. The result as JSON ([`WireResult`]): the delivery, or the failure as the
//!   gRPC status the owner would have given (`scheduler::PeerFailure`), re-raised here unchanged.
//! - **Trust.** Every call carries the cluster's peer secret (`x-gateway-peer`), which the
//!   first replica stores in Redis; a call without it is refused. The peer listener is for
//!   the replicas only (deploy: a NetworkPolicy).
//! - **Routing** ([`PeerForward`]'s futures): a job goes to its partition's owner of the
//!   moment; when the owner does not answer (not reachable, refused, gone mid-call, not placing
//!   it within 2 s) or is not the owner (any more), the job is queued here, and this replica's
//!   gate hands it back (`Routed::Back`) unless this replica owns the partition: then it is
//!   routed again, at most every 200 ms. Only the owner decides a chat (it keeps its window),
//!   so Feishu's limits hold either way; a send the owner may have made before it died is
//!   repeated with the same uuid, which Feishu dedupes.
//! - Dropping the wait (the caller went away) drops the peer call; the owner takes the job
//!   out of its queue unless it is being sent.

use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashMap;
use futures_util::future::BoxFuture;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use super::ReplyService;
use crate::cluster::partitions::{Partitions, partition_of};
use crate::metrics::Metrics;
use crate::proto::peer::peer_service_client::PeerServiceClient;
use crate::proto::peer::peer_service_server::PeerService;
use crate::proto::peer::queue_response::Event;
use crate::proto::peer::{
    CancelRequest, CancelResponse, QueueRequest, QueueResponse, RebalanceRequest, RebalanceResponse,
};
use crate::scheduler::{Forward, GatewayError, JobResult, JobSpec, Lane, Routed, Scheduler};
use futures_util::StreamExt;

mod order;
mod rebalance;
mod wire;

use order::{Order, Ticket};

use wire::{MOVED, from_wire, from_wire_result, moved, to_wire, to_wire_result};
pub use wire::{WireJob, WireResult};

/// The metadata key of the peer secret.
pub const PEER_HEADER: &str = "x-gateway-peer";

/// How long a replica waits to connect to a peer before it queues the job itself.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How often a peer connection is pinged, and how long a ping may go unanswered.
const KEEPALIVE: Duration = Duration::from_secs(1);

/// How long an owner has to give a forwarded job its place in line.
const QUEUED_WITHIN: Duration = Duration::from_secs(2);

/// Hops in a row a job follows the owner another replica names.
const MAX_HINT_HOPS: u32 = 3;

/// How often a job not yet in its owner's line checks that the owner is still the one.
const OWNER_RECHECK: Duration = Duration::from_millis(50);

/// A job its owner did not take stays queued here at least this long before it is routed
/// again (it goes back to its router when this replica does not own its partition either).
const STAY_AFTER_FAILURE: Duration = Duration::from_millis(200);

/// The first pause after reading the peer secret failed; it doubles up to
/// [`SECRET_RETRY_MAX`].
const SECRET_RETRY_FIRST: Duration = Duration::from_millis(100);

/// The longest pause between attempts to read the peer secret.
const SECRET_RETRY_MAX: Duration = Duration::from_secs(1);

/// Whether `req` carries the cluster's peer secret (compared in constant time).
fn authentic<T>(req: &Request<T>, secret: &str) -> bool {
    let Some(shown) = req.metadata().get(PEER_HEADER) else {
        return false;
    };
    let digest = |b: &[u8]| ring::digest::digest(&ring::digest::SHA256, b);
    let (a, b) = (digest(shown.as_bytes()), digest(secret.as_bytes()));
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The peer side: jobs other replicas forward to this one.
pub struct PeerServer {
    service: Arc<ReplyService>,
    partitions: Arc<Partitions>,
    scheduler: Scheduler,
    secret: Arc<str>,
    metrics: Arc<Metrics>,
}

impl PeerServer {
    pub fn new(
        service: Arc<ReplyService>,
        partitions: Arc<Partitions>,
        scheduler: Scheduler,
        secret: Arc<str>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            service,
            partitions,
            scheduler,
            secret,
            metrics,
        }
    }

    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if authentic(req, &self.secret) {
            return Ok(());
        }
        self.metrics.peer_job(false, "refused");
        Err(Status::unauthenticated("not a replica of this cluster"))
    }
}

/// A forwarded job's answers: `queued`, then its result.
type QueueEvents =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<QueueResponse, Status>> + Send>>;

#[tonic::async_trait]
impl PeerService for PeerServer {
    type QueueStream = QueueEvents;

    async fn queue(&self, req: Request<QueueRequest>) -> Result<Response<QueueEvents>, Status> {
        self.check(&req)?;
        let spec = serde_json::from_slice::<WireJob>(&req.get_ref().job)
            .map_err(|e| e.to_string())
            .and_then(|w| from_wire(w, &self.service));
        let spec = match spec {
            Ok(s) => s,
            Err(e) => {
                self.metrics.peer_job(false, "refused");
                return Err(Status::failed_precondition(format!(
                    "this replica cannot take the job: {e}"
                )));
            }
        };
        self.metrics.peer_job(false, "ok");
        let api = spec.request.api();
        // In line now (submitted at once); dropped with this call when the forwarding replica
        // gives up: the job leaves the queue unless it is being sent.
        let chat = spec.chat_id.clone();
        let routes = Routes {
            partitions: self.partitions.clone(),
            clients: Arc::default(),
        };
        let result = self.scheduler.queue_routed(spec, None);
        let queued = QueueResponse {
            event: Some(Event::Queued(true)),
        };
        let answer = async move {
            let result = match result.await {
                Routed::Done(r) => to_wire_result(r, api),
                // Not this replica's (any more): its sender routes it again.
                Routed::Back(_) => moved(routes.owner_of(&chat)),
            };
            let body = serde_json::to_vec(&result).map_err(|e| Status::internal(e.to_string()))?;
            Ok(QueueResponse {
                event: Some(Event::Result(body)),
            })
        };
        let events = futures_util::stream::once(std::future::ready(Ok(queued)))
            .chain(futures_util::stream::once(answer));
        Ok(Response::new(Box::pin(events)))
    }

    async fn cancel(
        &self,
        req: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        self.check(&req)?;
        let CancelRequest { queue, uuid } = req.into_inner();
        let cancelled = self.scheduler.cancel_here(queue.into(), uuid).await;
        Ok(Response::new(CancelResponse { cancelled }))
    }

    async fn rebalance(
        &self,
        req: Request<RebalanceRequest>,
    ) -> Result<Response<RebalanceResponse>, Status> {
        self.check(&req)?;
        self.partitions.rebalance();
        Ok(Response::new(RebalanceResponse {}))
    }
}

/// This side: sends jobs of queues another replica owns there.
pub struct PeerForward {
    routes: Routes,
    service: Weak<ReplyService>,
    scheduler: Scheduler,
    /// The cluster's peer secret once read from Redis; until then jobs are queued here.
    secret: watch::Receiver<Option<Arc<str>>>,
    order: Arc<Order>,
    metrics: Arc<Metrics>,
}

/// Where a queue's jobs go, and the connections to the other replicas.
#[derive(Clone)]
struct Routes {
    partitions: Arc<Partitions>,
    clients: Arc<DashMap<String, PeerServiceClient<Channel>>>,
}

impl PeerForward {
    pub fn new(
        partitions: Arc<Partitions>,
        service: &Arc<ReplyService>,
        scheduler: Scheduler,
        secret: watch::Receiver<Option<Arc<str>>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            routes: Routes {
                partitions,
                clients: Arc::default(),
            },
            service: Arc::downgrade(service),
            scheduler,
            secret,
            order: Arc::default(),
            metrics,
        }
    }

    /// The peer secret, once read.
    fn secret(&self) -> Option<Arc<str>> {
        self.secret.borrow().clone()
    }
}

impl Routes {
    /// The owner of `queue`'s partition, when that is another replica with an address.
    fn owner_of(&self, queue: &str) -> Option<String> {
        let (id, addr) = self.partitions.preferred_at(partition_of(queue))?;
        (id != self.partitions.me() && !addr.is_empty()).then_some(addr)
    }

    fn client(&self, addr: &str) -> Option<PeerServiceClient<Channel>> {
        if let Some(c) = self.clients.get(addr) {
            return Some(c.clone());
        }
        // A frozen or cut-off owner answers no ping: its connection is dropped within
        // KEEPALIVE + its timeout, and the jobs waiting on it go back in line here.
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        let client = PeerServiceClient::new(endpoint.connect_lazy());
        self.clients.insert(addr.to_owned(), client.clone());
        Some(client)
    }

    /// Where `queue`'s jobs go now: another replica (its address and a client), or here.
    fn target(&self, queue: &str) -> Option<(String, PeerServiceClient<Channel>)> {
        let addr = self.owner_of(queue)?;
        let client = self.client(&addr)?;
        Some((addr, client))
    }
}

/// A peer call carrying the cluster's peer secret.
fn peer_request<T>(secret: &str, body: T) -> Request<T> {
    let mut req = Request::new(body);
    if let Ok(v) = secret.parse() {
        req.metadata_mut().insert(PEER_HEADER, v);
    }
    req
}

/// One job to its owner: its place in line (then the queue's next job may go), then its
/// result. An owner that does not give the job its place within [`QUEUED_WITHIN`] (frozen:
/// its kernel accepts the connection, nobody answers) counts as unreachable.
async fn forward_one(
    client: &mut PeerServiceClient<Channel>,
    req: Request<QueueRequest>,
    ticket: &Ticket,
    still_owner: impl Fn() -> bool,
) -> Result<WireResult, String> {
    let placed = async {
        let mut events = client
            .queue(req)
            .await
            .map_err(|s| s.to_string())?
            .into_inner();
        loop {
            match events.message().await.map_err(|s| s.to_string())? {
                Some(QueueResponse {
                    event: Some(Event::Queued(_)),
                }) => return Ok((events, None)),
                Some(QueueResponse {
                    event: Some(Event::Result(body)),
                }) => return Ok((events, Some(body))),
                Some(QueueResponse { event: None }) => {}
                None => return Err("the owner ended the call without a result".to_owned()),
            }
        }
    };
    // The chat's owner may change meanwhile (the one asked froze and its lease ended): then
    // the job goes there at once instead of waiting out the timeout.
    let moved = async {
        loop {
            tokio::time::sleep(OWNER_RECHECK).await;
            if still_owner() {
                continue;
            }
            return;
        }
    };
    let (mut events, early) = tokio::select! {
        r = tokio::time::timeout(QUEUED_WITHIN, placed) => {
            r.map_err(|_| "the owner did not take the job in time".to_owned())??
        }
        () = moved => return Err("the chat's partition moved to another replica".into()),
    };
    let body = match early {
        Some(body) => body,
        None => {
            ticket.placed();
            loop {
                match events.message().await.map_err(|s| s.to_string())? {
                    Some(QueueResponse {
                        event: Some(Event::Result(body)),
                    }) => break body,
                    Some(_) => {}
                    None => return Err("the owner ended the call without a result".into()),
                }
            }
        }
    };
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

impl Forward for PeerForward {
    /// Routes `spec` until it has a result: to its partition's owner, or here when that is
    /// this replica, no owner is known, or the owner did not take it; again whenever the
    /// replica holding it does not own its partition (or no longer does).
    fn forward(&self, spec: Box<JobSpec>) -> Result<BoxFuture<'static, JobResult>, Box<JobSpec>> {
        let routes = self.routes.clone();
        let ticket = self
            .order
            .take(&spec.chat_id, routes.owner_of(&spec.chat_id));
        let (scheduler, metrics) = (self.scheduler.clone(), self.metrics.clone());
        let (secret, service) = (self.secret.clone(), self.service.clone());
        Ok(Box::pin(async move {
            let mut spec = spec;
            let mut stay_until = None;
            // Where the last replica asked sees the owner (it answered PEER_MOVED), and how
            // many hops in a row followed such a hint (views disagreeing in a circle end
            // after a few: the job then waits here like after a failure).
            let mut hint: Option<String> = None;
            let mut hops = 0;
            loop {
                // The queue's earlier jobs first (see `order`); where the chat is decided may
                // change meanwhile (an owner died, a partition moved): then in that line.
                let target = loop {
                    let hinted = hint.take();
                    let target = match &hinted {
                        Some(addr) => routes.client(addr).map(|c| (addr.clone(), c)),
                        None => routes.target(&spec.chat_id),
                    };
                    let dest = target.as_ref().map(|(addr, _)| addr.clone());
                    ticket.go_to(dest.clone());
                    ticket.turn().await;
                    if hinted.is_some() || routes.owner_of(&spec.chat_id) == dest {
                        break target;
                    }
                };
                // This replica began to stop while the job waited for its turn, or it came
                // back from a line here: it stays in the job store (async, another replica
                // takes it) or fails UNAVAILABLE (retryable with its uuid), rather than
                // going out behind the queue's earlier jobs that stopped here. (A stopping
                // replica has handed its partitions over: it sends nothing more itself.)
                if !scheduler.accepting() && spec.lane != Lane::Final {
                    let uuid = spec
                        .caller_uuid
                        .clone()
                        .unwrap_or_else(|| spec.request.uuid().to_owned());
                    return Err(GatewayError::ShuttingDown { attempts: 0, uuid });
                }
                // Written now, so the deadline it carries is what is left of it after the wait.
                // Before the peer secret is read the job is queued here, as after a failure.
                let forwarding = target.is_some();
                let key = secret.borrow().clone();
                let wire = target.zip(key).and_then(|((addr, client), key)| {
                    let service = service.upgrade()?;
                    let body = serde_json::to_vec(&to_wire(&spec, &service)).ok()?;
                    Some((addr, client, peer_request(&key, QueueRequest { job: body })))
                });
                // Queued here though another replica decides the chat (no secret yet, no
                // address known for its owner): it comes back after a pause, not at once.
                let elsewhere = || {
                    let p = partition_of(&spec.chat_id);
                    routes
                        .partitions
                        .preferred(p)
                        .is_some_and(|m| m != routes.partitions.me())
                };
                if wire.is_none() && (forwarding || elsewhere()) {
                    stay_until = Some(tokio::time::Instant::now() + STAY_AFTER_FAILURE);
                }
                if let Some((addr, mut client, req)) = wire {
                    let still_owner =
                        || routes.owner_of(&spec.chat_id).as_deref() == Some(addr.as_str());
                    let sent = forward_one(&mut client, req, &ticket, still_owner).await;
                    if !matches!(&sent, Ok(WireResult::Failed(f)) if f.reason == MOVED) {
                        hops = 0;
                    }
                    let (outcome, error) = match sent {
                        // The owner is stopping and never sent it: it goes here instead.
                        Ok(WireResult::Failed(f)) if f.reason == "SHUTTING_DOWN" => {
                            ("unreachable", "the owner is stopping".to_owned())
                        }
                        Ok(WireResult::Failed(f)) if f.reason == MOVED => {
                            // Straight to where that replica sees the owner, when it is not
                            // this one and not itself.
                            hops += 1;
                            hint = f.owner_hint.filter(|h| {
                                *h != addr
                                    && *h != routes.partitions.addr()
                                    && hops <= MAX_HINT_HOPS
                            });
                            ("moved", "that replica does not own the chat".to_owned())
                        }
                        Ok(result) => {
                            metrics.peer_job(true, "ok");
                            // The local guards (intake share) end with the job.
                            drop(spec);
                            return from_wire_result(result);
                        }
                        Err(error) => ("unreachable", error),
                    };
                    metrics.peer_job(true, outcome);
                    if hint.is_some() {
                        tracing::debug!(peer = %addr, chat_id = %spec.chat_id, "that replica does not own the chat; to the owner it names");
                        continue;
                    }
                    tracing::info!(peer = %addr, %error, chat_id = %spec.chat_id, "the replica owning this chat did not take the job; queued here");
                    // Back in line here, after the jobs of its queue forwarded before it; it
                    // goes on once this replica knows better where the chat is decided.
                    stay_until = Some(tokio::time::Instant::now() + STAY_AFTER_FAILURE);
                    ticket.go_to(None);
                    ticket.turn().await;
                } else if forwarding {
                    // Cannot be written (this replica is stopping, or the secret is not read
                    // yet): here after all.
                    ticket.go_to(None);
                    ticket.turn().await;
                }
                let result = scheduler.queue_routed(*spec, stay_until.take());
                ticket.placed();
                match result.await {
                    Routed::Done(result) => return result,
                    Routed::Back(back) => {
                        spec = back;
                        hops = 0;
                    }
                }
            }
        }))
    }

    fn cancel(&self, chat_id: &Arc<str>, uuid: &str) -> Option<BoxFuture<'static, bool>> {
        let (_, mut client) = self.routes.target(chat_id)?;
        let req = peer_request(
            &self.secret()?,
            CancelRequest {
                queue: chat_id.to_string(),
                uuid: uuid.to_owned(),
            },
        );
        let (scheduler, chat_id, uuid) = (self.scheduler.clone(), chat_id.clone(), uuid.to_owned());
        Some(Box::pin(async move {
            match client.cancel(req).await {
                Ok(r) if r.get_ref().cancelled => true,
                // Queued here after all (the owner was unreachable), or already gone.
                _ => scheduler.cancel_here(chat_id, uuid).await,
            }
        }))
    }
}

/// Starts forwarding: jobs are routed from now on; the cluster's peer secret is read in the
/// background, retrying (a Redis that does not answer must not hold up serving; until then
/// jobs are queued here and routed again every 200 ms), then jobs go to their owners and
/// `listener` serves the other replicas. Each time this replica joins (its first lease, or
/// one after a lost lease), the others are told to rebalance at once.
pub fn start(
    listener: tokio::net::TcpListener,
    partitions: Arc<Partitions>,
    service: Arc<ReplyService>,
    scheduler: Scheduler,
    metrics: Arc<Metrics>,
) -> Peers {
    // Routing starts now, so no job is queued without a router (one queued here for a chat
    // another replica decides would wait for that replica to leave); jobs are written to
    // peers once the secret is known.
    let (known, secret_rx) = watch::channel(None);
    scheduler.set_forward(Arc::new(PeerForward::new(
        partitions.clone(),
        &service,
        scheduler.clone(),
        secret_rx.clone(),
        metrics.clone(),
    )));
    let mut joined = partitions.joined();
    let (parts, mut secret) = (partitions.clone(), secret_rx.clone());
    let kept = partitions.clone();
    let joins = tokio::spawn(async move {
        loop {
            if joined.wait_for(|j| *j).await.is_err() {
                return;
            }
            let Ok(key) = secret.wait_for(Option::is_some).await.map(|k| k.clone()) else {
                return;
            };
            rebalance::rebalance_others(parts.peer_addrs(), key.expect("waited for")).await;
            if joined.wait_for(|j| !*j).await.is_err() {
                return;
            }
        }
    });
    let serve = tokio::spawn(async move {
        let mut pause = SECRET_RETRY_FIRST;
        let secret: Arc<str> = loop {
            match partitions.peer_secret().await {
                Ok(s) => break s.into(),
                Err(e) => {
                    tracing::warn!(error = %e, "reading the peer secret failed; jobs of other replicas' chats wait here until it is read");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(SECRET_RETRY_MAX);
                }
            }
        };
        known.send_replace(Some(secret.clone()));
        let server = PeerServer::new(service, partitions.clone(), scheduler, secret, metrics);
        let served = tonic::transport::Server::builder()
            .add_service(
                crate::proto::peer::peer_service_server::PeerServiceServer::new(server)
                    .max_decoding_message_size(4 * 1024 * 1024),
            )
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the peer listener failed: jobs forwarded here fail over to their senders");
        }
    });
    Peers {
        serve,
        joins,
        secret: secret_rx,
        partitions: kept,
    }
}

/// Forwarding as [`start`] began it: the peer listener, and telling the others of changes.
pub struct Peers {
    serve: tokio::task::JoinHandle<()>,
    joins: tokio::task::JoinHandle<()>,
    secret: watch::Receiver<Option<Arc<str>>>,
    partitions: Arc<Partitions>,
}

impl Peers {
    /// This replica left (`Partitions::leave`): the others are told to claim its partitions
    /// now.
    pub async fn left(&self) {
        self.joins.abort();
        let key = self.secret.borrow().clone();
        if let Some(key) = key {
            rebalance::rebalance_others(self.partitions.peer_addrs(), key).await;
        }
    }

    /// Drained: the peer listener stops.
    pub fn stop(self) {
        self.joins.abort();
        self.serve.abort();
    }
}
