//! The admin API: HTTP/JSON on `mycel.sock` in the data directory (mode 0600), and on TCP
//! only when configured, with a bearer token. The CLI is its main client.
//!
//! | route | what |
//! |---|---|
//! | `GET /healthz` | the process is up |
//! | `GET /readyz` | listening on the network (503 until then) |
//! | `GET /metrics` | Prometheus text (mycel's and libp2p's metrics) |
//! | `GET /v1/id`, `/v1/status`, `/v1/peers` | JSON |
//! | `POST /v1/fetch` `{"root", "out"?}` | NDJSON progress lines until `complete` or `failed`; with `out` (an absolute path) the daemon writes a file or disk image there while fetching it, and the last line's `output` reports it |
//! | `POST /v1/members/reload` | re-read `[cluster] members` |
//! | `POST /v1/cli` `{"args"}` | run a store command of the CLI inside the daemon (which holds the store) |
//! | `/v1/topology/...` | topology files (`topology.rs` lists the routes) |

pub mod client;
mod topology;

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use crate::daemon::{Command, FetchUpdate};
use crate::datadir::{DataDir, NodeConfig};
use crate::store::Store;

#[derive(Clone)]
struct AppState {
    cmd: mpsc::Sender<Command>,
    store: Arc<Store>,
    registry: Arc<Registry>,
    dir: DataDir,
    token: Option<String>,
}

/// A running API; [`Api::shutdown`] stops it and removes the socket.
#[derive(Debug)]
pub struct Api {
    stop: Vec<oneshot::Sender<()>>,
    socket: PathBuf,
}

impl Api {
    /// Stops the listeners and removes the socket file.
    pub async fn shutdown(self) {
        for s in self.stop {
            let _ = s.send(());
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Starts the API listeners.
///
/// # Errors
/// If the socket (or TCP address) cannot be bound, or another daemon already serves it.
pub async fn serve(
    dir: &DataDir,
    config: &NodeConfig,
    cmd: mpsc::Sender<Command>,
    store: Arc<Store>,
    registry: Arc<Registry>,
) -> Result<Api, String> {
    let socket = dir.socket_path();
    if socket.exists() {
        if tokio::net::UnixStream::connect(&socket).await.is_ok() {
            return Err(format!("{}: another mycel daemon is running", socket.display()));
        }
        std::fs::remove_file(&socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(&socket)
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("{}: {e}", socket.display()))?;
    }
    let state = AppState { cmd, store, registry, dir: dir.clone(), token: None };
    let mut stop = Vec::new();
    let (tx, rx) = oneshot::channel::<()>();
    stop.push(tx);
    let app = router(state.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
    });
    if !config.api.tcp.is_empty() {
        let tcp = tokio::net::TcpListener::bind(&config.api.tcp)
            .await
            .map_err(|e| format!("[api] tcp {}: {e}", config.api.tcp))?;
        let state = AppState { token: Some(config.api.token.clone()), ..state };
        let app = router(state.clone()).layer(middleware::from_fn_with_state(state, require_token));
        let (tx, rx) = oneshot::channel::<()>();
        stop.push(tx);
        tokio::spawn(async move {
            let _ = axum::serve(tcp, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
    }
    Ok(Api { stop, socket })
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/id", get(id))
        .route("/v1/status", get(status))
        .route("/v1/peers", get(peers))
        .route("/v1/fetch", post(fetch))
        .route("/v1/members/reload", post(reload))
        .route("/v1/cli", post(cli))
        .route("/v1/cluster", get(cluster_view))
        .route("/v1/cluster/init", post(cluster_init))
        .route("/v1/cluster/tokens", post(token_create))
        .route("/v1/cluster/tokens/revoke", post(token_revoke))
        .route("/v1/cluster/members/remove", post(member_remove))
        .route("/v1/cluster/members/role", post(member_role))
        .route("/v1/cluster/leader/transfer", post(leader_transfer))
        .route("/v1/pins", get(pins_list))
        .route("/v1/pins/rm", post(pin_rm))
        .route("/v1/grants", post(grant_add))
        .route("/v1/grants/rm", post(grant_rm))
        .route(
            "/v1/pins:batch",
            // 100,000 pins in one request are ~10 MB of JSON.
            post(pins_batch).layer(axum::extract::DefaultBodyLimit::max(64 << 20)),
        )
        .merge(topology::routes())
        .with_state(state)
}

async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let expected = state.token.as_deref().map(|t| format!("Bearer {t}"));
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match (expected, given) {
        (Some(e), Some(g)) if constant_time_eq(e.as_bytes(), g.as_bytes()) => next.run(req).await,
        _ => (StatusCode::UNAUTHORIZED, "bearer token required\n").into_response(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unavailable() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "daemon loop unavailable\n").into_response()
}

async fn ask<T>(state: &AppState, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    state.cmd.send(make(tx)).await.ok()?;
    rx.await.ok()
}

async fn readyz(State(state): State<AppState>) -> Response {
    match ask(&state, Command::Id).await {
        Some(id) if !id.listen_addrs.is_empty() => "ready\n".into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "not listening yet\n").into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &state.registry).is_err() {
        return (StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed\n").into_response();
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
        .into_response()
}

async fn id(State(state): State<AppState>) -> Response {
    match ask(&state, Command::Id).await {
        Some(id) => axum::Json(id).into_response(),
        None => unavailable(),
    }
}

async fn status(State(state): State<AppState>) -> Response {
    match ask(&state, Command::Status).await {
        Some(v) => axum::Json(v).into_response(),
        None => unavailable(),
    }
}

async fn peers(State(state): State<AppState>) -> Response {
    match ask(&state, Command::Peers).await {
        Some(v) => axum::Json(v).into_response(),
        None => unavailable(),
    }
}

async fn reload(State(state): State<AppState>) -> Response {
    match ask(&state, Command::ReloadMembers).await {
        Some(Ok(n)) => axum::Json(serde_json::json!({"members": n})).into_response(),
        Some(Err(e)) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
        None => unavailable(),
    }
}

#[derive(Deserialize)]
struct FetchBody {
    root: String,
    #[serde(default)]
    out: Option<String>,
}

async fn fetch(State(state): State<AppState>, axum::Json(body): axum::Json<FetchBody>) -> Response {
    let root = match body.root.parse::<mycel_chunker::Cid>() {
        Ok(r) => r,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("{:?}: {e}\n", body.root)).into_response();
        }
    };
    let out = body.out.map(PathBuf::from);
    if let Some(out) = out.as_ref().filter(|o| !o.is_absolute()) {
        let why = format!("out {:?} is not an absolute path\n", out.display().to_string());
        return (StatusCode::BAD_REQUEST, why).into_response();
    }
    let (tx, rx) = mpsc::channel::<FetchUpdate>(64);
    if state.cmd.send(Command::Fetch { root, updates: tx, out }).await.is_err() {
        return unavailable();
    }
    let stream = futures::stream::unfold((rx, false), |(mut rx, done)| async move {
        if done {
            return None;
        }
        let update = rx.recv().await?;
        let finished = update.state != "fetching";
        let mut line = serde_json::to_vec(&update).expect("update serialises");
        line.push(b'\n');
        Some((Ok::<Bytes, std::convert::Infallible>(Bytes::from(line)), (rx, finished)))
    });
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"))],
        Body::from_stream(stream),
    )
        .into_response()
}

#[derive(Deserialize)]
struct CliBody {
    args: Vec<String>,
}

/// Exit code header of `/v1/cli` answers.
pub const EXIT_HEADER: &str = "x-mycel-exit";
/// Error message header of `/v1/cli` answers (percent-free ASCII).
pub const ERROR_HEADER: &str = "x-mycel-error";

async fn cli(State(state): State<AppState>, axum::Json(body): axum::Json<CliBody>) -> Response {
    let store = state.store.clone();
    let dir = state.dir.clone();
    let is_add = body.args.iter().any(|a| a == "add");
    let out =
        tokio::task::spawn_blocking(move || crate::cli::run_in_daemon(body.args, dir, store)).await;
    let Ok((code, stdout, error)) = out else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "command panicked\n").into_response();
    };
    if is_add && code == 0 {
        let _ = state.cmd.send(Command::Announce).await;
    }
    let mut resp = Response::new(Body::from(stdout));
    resp.headers_mut().insert(EXIT_HEADER, HeaderValue::from(u16::from(code)));
    let safe: String = error
        .chars()
        .map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' })
        .take(2000)
        .collect();
    if let Ok(v) = HeaderValue::from_str(&safe) {
        resp.headers_mut().insert(ERROR_HEADER, v);
    }
    resp
}

fn bad(msg: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, format!("{}\n", msg.into())).into_response()
}

async fn cluster_view(State(state): State<AppState>) -> Response {
    match ask(&state, Command::ClusterView).await {
        Some(v) => axum::Json(v).into_response(),
        None => unavailable(),
    }
}

async fn cluster_init(State(state): State<AppState>) -> Response {
    match ask(&state, Command::ClusterInit).await {
        Some(Ok(id)) => axum::Json(serde_json::json!({"cluster_id": id})).into_response(),
        Some(Err(e)) => bad(e),
        None => unavailable(),
    }
}

#[derive(Deserialize)]
struct TokenBody {
    role: String,
    #[serde(default)]
    zone: String,
    ttl_s: u64,
    uses: u32,
}

async fn token_create(
    State(state): State<AppState>,
    axum::Json(b): axum::Json<TokenBody>,
) -> Response {
    let Some(role) = mycel_consensus::command::Role::parse(&b.role) else {
        return bad("unknown role");
    };
    let (tx, rx) = oneshot::channel();
    let cmd =
        Command::TokenCreate { role, zone: b.zone, ttl_s: b.ttl_s, uses: b.uses.max(1), reply: tx };
    if state.cmd.send(cmd).await.is_err() {
        return unavailable();
    }
    match tokio::time::timeout(std::time::Duration::from_secs(30), rx).await {
        Ok(Ok(Ok(v))) => axum::Json(v).into_response(),
        Ok(Ok(Err(e))) => bad(e),
        Ok(Err(_)) => unavailable(),
        Err(_) => (StatusCode::GATEWAY_TIMEOUT, "no quorum answered within 30 s\n").into_response(),
    }
}

async fn propose(state: &AppState, commands: Vec<mycel_consensus::command::Command>) -> Response {
    let (tx, rx) = oneshot::channel();
    if state.cmd.send(Command::Propose(commands, tx)).await.is_err() {
        return unavailable();
    }
    match tokio::time::timeout(std::time::Duration::from_secs(30), rx).await {
        Ok(Ok(Ok((index, mycel_consensus::state::Outcome::Applied)))) => {
            axum::Json(serde_json::json!({"applied": true, "index": index})).into_response()
        }
        Ok(Ok(Ok((_, mycel_consensus::state::Outcome::Rejected(why))))) => {
            bad(format!("rejected: {why}"))
        }
        Ok(Ok(Err(e))) => bad(e),
        _ => (StatusCode::GATEWAY_TIMEOUT, "no quorum answered within 30 s\n").into_response(),
    }
}

#[derive(Deserialize)]
struct IdBody {
    id: String,
}

async fn token_revoke(
    State(state): State<AppState>,
    axum::Json(b): axum::Json<IdBody>,
) -> Response {
    let (tx, rx) = oneshot::channel();
    if state.cmd.send(Command::TokenRevoke(b.id, tx)).await.is_err() {
        return unavailable();
    }
    match tokio::time::timeout(std::time::Duration::from_secs(30), rx).await {
        Ok(Ok(Ok((index, mycel_consensus::state::Outcome::Applied)))) => {
            axum::Json(serde_json::json!({"revoked": true, "index": index})).into_response()
        }
        Ok(Ok(Ok((_, mycel_consensus::state::Outcome::Rejected(why))))) => bad(why),
        Ok(Ok(Err(e))) => bad(e),
        Ok(Err(_)) => unavailable(),
        Err(_) => (StatusCode::GATEWAY_TIMEOUT, "no quorum answered within 30 s\n").into_response(),
    }
}

#[derive(Deserialize)]
struct PeerBody {
    peer: String,
    #[serde(default)]
    role: String,
}

async fn member_remove(
    State(state): State<AppState>,
    axum::Json(b): axum::Json<PeerBody>,
) -> Response {
    let Ok(peer) = crate::net::parse_peer(&b.peer) else { return bad("bad PeerId") };
    propose(&state, vec![mycel_consensus::command::Command::RemoveMember { peer: peer.to_bytes() }])
        .await
}

async fn member_role(
    State(state): State<AppState>,
    axum::Json(b): axum::Json<PeerBody>,
) -> Response {
    let Ok(peer) = crate::net::parse_peer(&b.peer) else { return bad("bad PeerId") };
    let Some(role) = mycel_consensus::command::Role::parse(&b.role) else {
        return bad("unknown role");
    };
    propose(
        &state,
        vec![mycel_consensus::command::Command::SetRole { peer: peer.to_bytes(), role }],
    )
    .await
}

#[derive(Deserialize)]
struct TransferBody {
    id: u64,
}

async fn leader_transfer(
    State(state): State<AppState>,
    axum::Json(b): axum::Json<TransferBody>,
) -> Response {
    match ask(&state, |tx| Command::LeaderTransfer(b.id, tx)).await {
        Some(Ok(to)) => axum::Json(serde_json::json!({"transferring_to": to})).into_response(),
        Some(Err(e)) => bad(e),
        None => unavailable(),
    }
}

#[derive(Deserialize)]
struct PinBody {
    root: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default = "one")]
    replicas_min: u32,
    #[serde(default = "one")]
    replicas_max: u32,
    #[serde(default)]
    zones: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    preposition: Vec<String>,
    #[serde(default)]
    deadline_ms: u64,
}

fn one() -> u32 {
    1
}

/// Bulk pins: one proposal per 10,000.
async fn pins_batch(
    State(state): State<AppState>,
    axum::Json(pins): axum::Json<Vec<PinBody>>,
) -> Response {
    let mut applied = 0usize;
    for chunk in pins.chunks(10_000) {
        let mut commands = Vec::with_capacity(chunk.len());
        for p in chunk {
            let Ok(root) = p.root.parse::<mycel_chunker::Cid>() else {
                return bad(format!("bad CID {:?}", p.root));
            };
            let namespace = if p.namespace.is_empty() {
                mycel_policy::access::DEFAULT_NAMESPACE.to_string()
            } else {
                p.namespace.clone()
            };
            if let Err(e) = mycel_policy::access::validate_namespace(&namespace) {
                return bad(e);
            }
            if p.replicas_min == 0 || p.replicas_min > p.replicas_max || p.replicas_max > 1000 {
                return bad(format!(
                    "replicas {}..{}: need 1 <= MIN <= MAX <= 1000",
                    p.replicas_min, p.replicas_max
                ));
            }
            commands.push(mycel_consensus::command::Command::AddPin(
                mycel_consensus::command::Pin {
                    root: root.to_bytes().to_vec(),
                    name: p.name.clone(),
                    namespace,
                    replicas_min: p.replicas_min,
                    replicas_max: p.replicas_max,
                    zones: p.zones.clone(),
                    tags: p.tags.clone(),
                    preposition: p.preposition.clone(),
                    deadline_ms: p.deadline_ms,
                },
            ));
        }
        let resp = propose(&state, commands).await;
        if !resp.status().is_success() {
            return resp;
        }
        applied += chunk.len();
    }
    axum::Json(serde_json::json!({"pinned": applied})).into_response()
}

#[derive(Deserialize)]
struct RootBody {
    root: String,
}

async fn pin_rm(State(state): State<AppState>, axum::Json(b): axum::Json<RootBody>) -> Response {
    let Ok(root) = b.root.parse::<mycel_chunker::Cid>() else {
        return bad(format!("bad CID {:?}", b.root));
    };
    propose(
        &state,
        vec![mycel_consensus::command::Command::RemovePin { root: root.to_bytes().to_vec() }],
    )
    .await
}

#[derive(Deserialize)]
struct PinsQuery {
    #[serde(default)]
    root: Option<String>,
}

async fn pins_list(
    State(state): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<PinsQuery>,
) -> Response {
    let only = match q.root.as_deref().map(str::parse::<mycel_chunker::Cid>) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => return bad(format!("bad CID: {e}")),
    };
    match ask(&state, |tx| Command::Pins(only, tx)).await {
        Some(v) if v.get("error").is_some() => {
            (StatusCode::NOT_FOUND, format!("{}\n", v["error"].as_str().unwrap_or_default()))
                .into_response()
        }
        Some(v) => axum::Json(v).into_response(),
        None => unavailable(),
    }
}

#[derive(Deserialize)]
struct GrantBody {
    subject: String,
    permission: String,
    namespace: String,
}

async fn grant_change(state: &AppState, b: GrantBody, add: bool) -> Response {
    // A member named by PeerId is checked here, so a typo is an error rather than a grant
    // that matches nobody.
    if let Some(p) = b.subject.strip_prefix("member:")
        && crate::net::parse_peer(p).is_err()
    {
        return bad(format!("bad PeerId in {:?}", b.subject));
    }
    if let Err(e) = mycel_policy::access::validate_grant(&b.subject, &b.permission, &b.namespace) {
        return bad(e);
    }
    let g = mycel_consensus::command::Grant {
        subject: b.subject,
        permission: b.permission,
        namespace: b.namespace,
    };
    let c = if add {
        mycel_consensus::command::Command::AddGrant(g)
    } else {
        mycel_consensus::command::Command::RemoveGrant(g)
    };
    propose(state, vec![c]).await
}

async fn grant_add(
    State(state): State<AppState>,
    axum::Json(b): axum::Json<GrantBody>,
) -> Response {
    grant_change(&state, b, true).await
}

async fn grant_rm(State(state): State<AppState>, axum::Json(b): axum::Json<GrantBody>) -> Response {
    grant_change(&state, b, false).await
}
