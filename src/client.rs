//! The client commands of the binary: `send` (one reply, or with `--to` a new message; `--async`
//! a durable job; `--stream` standard input typed into a card), `update` and `recall` of a message, and `job get|watch|cancel ID`. Errors print their gRPC code, reason and details; exit code 2.

use std::process::ExitCode;
use std::time::Duration;

use feishu_reply_gateway::proto::reply_admin_client::ReplyAdminClient;
use feishu_reply_gateway::proto::reply_gateway_client::ReplyGatewayClient;
use feishu_reply_gateway::proto::{
    GetReplyRequest, InspectAppRequest, InspectCallerRequest, InspectChatRequest,
    RecallMessageRequest, ReplyJob, ReplyRequest, ReplyResponse, SendRequest, UpdateMessageRequest,
};
use tonic_types::StatusExt;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(clap::Args)]
pub struct SendArgs {
    /// Gateway address.
    #[arg(long, env = "GATEWAY_URL", default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// The message replied to.
    #[arg(long, required_unless_present = "to", conflicts_with = "to")]
    message_id: Option<String>,
    /// Send a new message instead of a reply: `chat:oc_…`, `open_id:ou_…`, `user_id:…`,
    /// `union_id:on_…` or `email:…`.
    #[arg(long)]
    to: Option<String>,
    #[command(flatten)]
    body: Body,
    #[arg(long, default_value = "")]
    app: String,
    #[arg(long, default_value = "")]
    chat_id: String,
    #[arg(long, default_value = "")]
    user_id: String,
    #[arg(long, default_value = "")]
    uuid: String,
    #[arg(long)]
    reply_in_thread: bool,
    /// Call deadline.
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
    /// Caller label for logs when the gateway takes anonymous calls (not an identity).
    #[arg(long, default_value = "feishu-reply-gateway-cli")]
    caller: String,
    /// Bearer token of a configured caller (sent as `authorization: Bearer …`).
    #[arg(long, env = "GATEWAY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Submit as a durable job (SubmitReply) and print its id instead of waiting.
    #[arg(long = "async")]
    asynchronous: bool,
    /// Stream standard input word by word into a card replied to --message-id (StreamReply),
    /// printing each event as a JSON line.
    #[arg(long, conflicts_with_all = ["asynchronous", "to", "text", "msg_type", "content"])]
    stream: bool,
    /// With --stream: the card's header.
    #[arg(long, default_value = "", requires = "stream")]
    title: String,
    /// With --async: fail the job if it is not sent within this many seconds (max 3000).
    #[arg(long, default_value_t = 0)]
    ttl_s: u32,
}

/// Which gateway the `job` and `inspect` commands talk to, and as whom.
#[derive(clap::Args)]
struct GatewayArgs {
    /// Gateway address (for `inspect chat` in cluster mode: the replica the chat's calls go to).
    #[arg(
        long,
        env = "GATEWAY_URL",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    addr: String,
    /// Bearer token of a configured caller (`inspect`: one with `admin = true`).
    #[arg(long, env = "GATEWAY_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
}

/// `job get|watch|cancel ID`.
#[derive(clap::Args)]
pub struct JobArgs {
    #[command(subcommand)]
    action: JobAction,
    #[command(flatten)]
    gateway: GatewayArgs,
}

#[derive(clap::Subcommand)]
enum JobAction {
    /// Print the job's state.
    Get { job_id: String },
    /// Print every state change until the job is final.
    Watch { job_id: String },
    /// Cancel the job if it has not been sent yet.
    Cancel { job_id: String },
}

fn authorize<T>(req: &mut tonic::Request<T>, token: Option<&str>) -> Result<(), BoxError> {
    if let Some(token) = token {
        let v = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| "the token is not a valid header value")?;
        req.metadata_mut().insert("authorization", v);
    }
    Ok(())
}

fn print_status(status: &tonic::Status) -> ExitCode {
    eprintln!("error: {:?}: {}", status.code(), status.message());
    let d = status.get_error_details();
    if let Some(info) = d.error_info() {
        eprintln!("  reason: {}", info.reason);
        let mut meta: Vec<_> = info.metadata.iter().collect();
        meta.sort();
        for (k, v) in meta {
            eprintln!("  {k}: {v}");
        }
    }
    if let Some(retry) = d.retry_info().and_then(|r| r.retry_delay) {
        eprintln!("  retry after: {retry:?}");
    }
    ExitCode::from(2)
}

fn response_json(r: &ReplyResponse) -> serde_json::Value {
    serde_json::json!({
        "message_id": r.message_id, "root_id": r.root_id, "parent_id": r.parent_id,
        "thread_id": r.thread_id, "chat_id": r.chat_id, "msg_type": r.msg_type,
        "create_time": r.create_time, "uuid": r.uuid, "attempts": r.attempts,
        "queued_ms": r.queued_ms,
    })
}

fn job_json(j: &ReplyJob) -> serde_json::Value {
    serde_json::json!({
        "job_id": j.job_id,
        "state": j.state().as_str_name(),
        "result": j.result.as_ref().map(response_json),
        "error": j.error.as_ref().map(|e| serde_json::json!({
            "code": format!("{:?}", tonic::Code::from(e.code)),
            "message": e.message,
        })),
        "attempts": j.attempts,
        "created_ms": j.created_ms,
        "updated_ms": j.updated_ms,
    })
}

/// The message type and content of `--text`, or of `--msg-type` and `--content`.
fn body(b: &Body) -> Result<(String, String), BoxError> {
    match (b.text.clone(), b.msg_type.clone(), b.content.clone()) {
        (Some(text), _, _) => Ok((
            "text".to_owned(),
            serde_json::json!({ "text": text }).to_string(),
        )),
        (None, Some(t), Some(c)) => Ok((t, c)),
        _ => Err("give --text, or both --msg-type and --content".into()),
    }
}

/// Answers a call: its response as JSON, or its status (exit code 2).
fn print_answer<T>(
    r: Result<tonic::Response<T>, tonic::Status>,
    json: impl FnOnce(T) -> serde_json::Value,
) -> Result<ExitCode, BoxError> {
    match r {
        Ok(resp) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&json(resp.into_inner()))?
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(status) => Ok(print_status(&status)),
    }
}

fn submitted(r: feishu_reply_gateway::proto::SubmitReplyResponse) -> serde_json::Value {
    serde_json::json!({ "job_id": r.job_id, "duplicate": r.duplicate })
}

/// A connection to the gateway at `addr`.
async fn connect(addr: &str) -> Result<ReplyGatewayClient<tonic::transport::Channel>, BoxError> {
    Ok(ReplyGatewayClient::connect(addr.to_owned())
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?)
}

/// `msg` as `send` sends it: its deadline, the caller label, the token.
fn call<T>(msg: T, args: &SendArgs) -> Result<tonic::Request<T>, BoxError> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(Duration::from_millis(args.timeout_ms));
    if let Ok(v) = args.caller.parse() {
        req.metadata_mut().insert("x-caller", v);
    }
    authorize(&mut req, args.token.as_deref())?;
    Ok(req)
}

/// `send --to TYPE:ID`: a new message.
async fn send_new(
    args: SendArgs,
    to: &str,
    msg_type: String,
    content: String,
) -> Result<ExitCode, BoxError> {
    let (kind, id) = to
        .split_once(':')
        .ok_or("--to is TYPE:ID, e.g. chat:oc_… or open_id:ou_…")?;
    let receive_id_type = match kind {
        "chat" => "chat_id",
        other => other,
    };
    let mut client = connect(&args.addr).await?;
    let msg = SendRequest {
        app: args.app.clone(),
        receive_id_type: receive_id_type.to_owned(),
        receive_id: id.to_owned(),
        msg_type,
        content,
        uuid: args.uuid.clone(),
        ttl_s: args.ttl_s,
    };
    let req = call(msg, &args)?;
    if args.asynchronous {
        return print_answer(client.submit_send(req).await, submitted);
    }
    print_answer(client.send(req).await, |r| response_json(&r))
}

/// `send --stream`: standard input, a word at a time, into one card.
async fn send_stream(args: SendArgs) -> Result<ExitCode, BoxError> {
    use feishu_reply_gateway::proto::stream_reply_event::Event;
    use feishu_reply_gateway::proto::stream_reply_request::Part;
    use feishu_reply_gateway::proto::{StreamFinish, StreamReplyRequest, StreamStart};
    // A one-shot CLI read before any call is made: blocking is fine here.
    let input = std::io::read_to_string(std::io::stdin())?;
    let part = |p| StreamReplyRequest { part: Some(p) };
    let mut parts = vec![part(Part::Start(StreamStart {
        app: args.app.clone(),
        message_id: args.message_id.clone().unwrap_or_default(),
        chat_id: args.chat_id.clone(),
        uuid: args.uuid.clone(),
        title: args.title.clone(),
        reply_in_thread: args.reply_in_thread,
    }))];
    parts.extend(
        input
            .split_inclusive(char::is_whitespace)
            .map(|w| part(Part::Append(w.to_owned()))),
    );
    parts.push(part(Part::Finish(StreamFinish { text: None })));
    let mut client = connect(&args.addr).await?;
    let req = call(futures_util::stream::iter(parts), &args)?;
    let mut events = match client.stream_reply(req).await {
        Ok(r) => r.into_inner(),
        Err(status) => return Ok(print_status(&status)),
    };
    loop {
        let line = match events.message().await {
            Ok(Some(e)) => match e.event {
                Some(Event::Started(s)) => serde_json::json!({
                    "started": { "message_id": s.message_id, "card_id": s.card_id }
                }),
                Some(Event::Finished(f)) => serde_json::json!({
                    "finished": {
                        "message_id": f.message_id, "card_ids": f.card_ids,
                        "updates_sent": f.updates_sent, "final_chars": f.final_chars,
                    }
                }),
                None => continue,
            },
            Ok(None) => return Ok(ExitCode::SUCCESS),
            Err(status) => return Ok(print_status(&status)),
        };
        println!("{line}");
    }
}

pub async fn send(args: SendArgs) -> Result<ExitCode, BoxError> {
    if args.stream {
        return send_stream(args).await;
    }
    let (msg_type, content) = body(&args.body)?;
    if let Some(to) = args.to.clone() {
        return send_new(args, &to, msg_type, content).await;
    }
    let mut client = connect(&args.addr).await?;
    let msg = ReplyRequest {
        app: args.app.clone(),
        message_id: args.message_id.clone().unwrap_or_default(),
        msg_type,
        content,
        reply_in_thread: args.reply_in_thread,
        uuid: args.uuid.clone(),
        chat_id: args.chat_id.clone(),
        user_id: args.user_id.clone(),
        ttl_s: args.ttl_s,
    };
    let req = call(msg, &args)?;
    if args.asynchronous {
        return print_answer(client.submit_reply(req).await, submitted);
    }
    print_answer(client.reply(req).await, |r| response_json(&r))
}

/// A message's type and content (`update`: interactive, text or post; not for `recall`).
#[derive(clap::Args)]
struct Body {
    /// Shorthand for --msg-type text --content '{"text": TEXT}'.
    #[arg(long, conflicts_with_all = ["msg_type", "content"])]
    text: Option<String>,
    #[arg(long)]
    msg_type: Option<String>,
    /// Content JSON string.
    #[arg(long)]
    content: Option<String>,
}

/// `update` and `recall`: one message of the app.
#[derive(clap::Args)]
pub struct UpdateArgs {
    #[arg(long)]
    message_id: String,
    #[command(flatten)]
    body: Body,
    #[arg(long, default_value = "")]
    app: String,
    /// The message's chat (counted there when `[quotas] updates_count_in_chat`).
    #[arg(long, default_value = "")]
    chat_id: String,
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
    #[command(flatten)]
    gateway: GatewayArgs,
}

/// `update` (`recall` false) or `recall` a message.
pub async fn update(args: UpdateArgs, recall: bool) -> Result<ExitCode, BoxError> {
    let mut client = connect(&args.gateway.addr).await?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let token = args.gateway.token.clone();
    if recall {
        let mut req = tonic::Request::new(RecallMessageRequest {
            app: args.app,
            message_id: args.message_id,
            chat_id: args.chat_id,
        });
        req.set_timeout(timeout);
        authorize(&mut req, token.as_deref())?;
        return print_answer(
            client.recall_message(req).await,
            |r| serde_json::json!({ "attempts": r.attempts }),
        );
    }
    let (msg_type, content) = body(&args.body)?;
    let mut req = tonic::Request::new(UpdateMessageRequest {
        app: args.app,
        message_id: args.message_id,
        msg_type,
        content,
        chat_id: args.chat_id,
    });
    req.set_timeout(timeout);
    authorize(&mut req, token.as_deref())?;
    print_answer(
        client.update_message(req).await,
        |r| serde_json::json!({ "superseded": r.superseded, "attempts": r.attempts, "queued_ms": r.queued_ms }),
    )
}

pub async fn job(args: JobArgs) -> Result<ExitCode, BoxError> {
    let mut client = connect(&args.gateway.addr).await?;
    let id = match &args.action {
        JobAction::Get { job_id } | JobAction::Watch { job_id } | JobAction::Cancel { job_id } => {
            job_id.clone()
        }
    };
    let mut req = tonic::Request::new(GetReplyRequest { job_id: id });
    authorize(&mut req, args.gateway.token.as_deref())?;
    let print = |j: &ReplyJob| -> Result<(), BoxError> {
        println!("{}", serde_json::to_string(&job_json(j))?);
        Ok(())
    };
    let result = match args.action {
        JobAction::Get { .. } => client.get_reply(req).await.map(|r| print(&r.into_inner())),
        JobAction::Cancel { .. } => client
            .cancel_reply(req)
            .await
            .map(|r| print(&r.into_inner())),
        JobAction::Watch { .. } => match client.watch_reply(req).await {
            Err(s) => Err(s),
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(j)) => print(&j)?,
                        Ok(None) => break Ok(Ok(())),
                        Err(s) => break Err(s),
                    }
                }
            }
        },
    };
    match result {
        Ok(printed) => printed.map(|()| ExitCode::SUCCESS),
        Err(status) => Ok(print_status(&status)),
    }
}

/// `inspect chat ID`.
#[derive(clap::Args)]
pub struct InspectArgs {
    #[command(subcommand)]
    what: InspectWhat,
    #[command(flatten)]
    gateway: GatewayArgs,
}

#[derive(clap::Subcommand)]
enum InspectWhat {
    /// A chat's queue and the quotas that hold it.
    Chat { chat_id: String },
    /// An app's quota windows, call budget and queued replies (by configured name).
    App { name: String },
    /// A caller's rate, queue share and how much of it is used (by configured name).
    Caller { name: String },
}

pub async fn inspect(args: InspectArgs) -> Result<ExitCode, BoxError> {
    let mut client = ReplyAdminClient::connect(args.gateway.addr.clone())
        .await
        .map_err(|e| format!("connecting to {}: {e}", args.gateway.addr))?;
    let token = args.gateway.token.as_deref();
    let answer = match args.what {
        InspectWhat::Chat { chat_id } => {
            let mut req = tonic::Request::new(InspectChatRequest {
                chat_id: chat_id.clone(),
            });
            authorize(&mut req, token)?;
            req.metadata_mut().insert(
                "x-chat-id",
                chat_id
                    .parse()
                    .map_err(|_| "the chat id is not a valid header value")?,
            );
            client
                .inspect_chat(req)
                .await
                .map(|r| serde_json::to_value(r.into_inner()))
        }
        InspectWhat::App { name } => {
            let mut req = tonic::Request::new(InspectAppRequest { app: name });
            authorize(&mut req, token)?;
            client
                .inspect_app(req)
                .await
                .map(|r| serde_json::to_value(r.into_inner()))
        }
        InspectWhat::Caller { name } => {
            let mut req = tonic::Request::new(InspectCallerRequest { caller: name });
            authorize(&mut req, token)?;
            client
                .inspect_caller(req)
                .await
                .map(|r| serde_json::to_value(r.into_inner()))
        }
    };
    match answer {
        Ok(out) => {
            println!("{}", serde_json::to_string_pretty(&out?)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(status) => Ok(print_status(&status)),
    }
}
