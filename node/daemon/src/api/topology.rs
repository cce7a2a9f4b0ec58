//! Admin API routes for topology files (`mycel topology ...`).
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/topology` | every name, and this node's watches |
//! | `GET /v1/topology/view?name=N` | one name: versions, states, observed counts, schema, canary |
//! | `GET /v1/topology/status?name=N` | each subscribed router's applied version and drift |
//! | `POST /v1/topology/propose` `{name, root, source, base?, force}` | sign and stage a stored topology object |
//! | `POST /v1/topology/activate` `{name, version}` | activate (or roll back to) a version |
//! | `POST /v1/topology/schema` `{name, schema}` | set (empty: remove) the JSON Schema |
//! | `POST /v1/topology/canary` `{name, subjects, fail_pct_max}` | canary routers (none: off) |
//! | `POST /v1/topology/policy` `{name?, share}` | the activation share |
//! | `POST /v1/topology/watch` `{name, out, format?, exec?, hook_timeout_ms?}` | watch on this node |
//! | `POST /v1/topology/unwatch` `{name}` | stop a run-time watch |
//!
//! Rejections by the quorum answer 400 with `rejected: REASON`, the reason starting with
//! its marker (`stale base:`, `unauthorised:`, ...), which the CLI maps to exit codes.

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use mycel_chunker::Cid;
use mycel_consensus::command::Command as CCommand;
use mycel_consensus::state::Outcome;
use mycel_consensus::topology as rules;
use serde::Deserialize;
use tokio::sync::oneshot;

use super::{AppState, ask, bad, unavailable};
use crate::daemon::Command;
use crate::daemon::topology::Request;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/topology", get(list))
        .route("/v1/topology/view", get(view))
        .route("/v1/topology/status", get(status))
        .route("/v1/topology/propose", post(propose))
        .route("/v1/topology/activate", post(activate))
        .route("/v1/topology/schema", post(schema))
        .route("/v1/topology/canary", post(canary))
        .route("/v1/topology/policy", post(policy))
        .route("/v1/topology/watch", post(watch))
        .route("/v1/topology/unwatch", post(unwatch))
}

#[derive(Deserialize)]
struct NameQuery {
    name: String,
}

async fn view_of(state: &AppState, name: Option<String>) -> Option<serde_json::Value> {
    ask(state, |reply| Command::Topology(Request::View { name, reply })).await
}

async fn list(State(state): State<AppState>) -> Response {
    match view_of(&state, None).await {
        Some(v) => axum::Json(v).into_response(),
        None => unavailable(),
    }
}

async fn view(State(state): State<AppState>, Query(q): Query<NameQuery>) -> Response {
    if let Err(e) = rules::validate_name(&q.name) {
        return bad(e);
    }
    match view_of(&state, Some(q.name)).await {
        Some(v) => axum::Json(v).into_response(),
        None => unavailable(),
    }
}

async fn status(State(state): State<AppState>, Query(q): Query<NameQuery>) -> Response {
    if let Err(e) = rules::validate_name(&q.name) {
        return bad(e);
    }
    let name = q.name;
    match ask(&state, |reply| Command::Topology(Request::Status { name, reply })).await {
        Some(v) => axum::Json(v).into_response(),
        None => unavailable(),
    }
}

/// Proposes `commands`; the applied index, or the error response.
async fn propose_index(state: &AppState, commands: Vec<CCommand>) -> Result<u64, Response> {
    let (tx, rx) = oneshot::channel();
    if state.cmd.send(Command::Propose(commands, tx)).await.is_err() {
        return Err(unavailable());
    }
    match tokio::time::timeout(std::time::Duration::from_secs(30), rx).await {
        Ok(Ok(Ok((index, Outcome::Applied)))) => Ok(index),
        Ok(Ok(Ok((_, Outcome::Rejected(why))))) => Err(bad(format!("rejected: {why}"))),
        Ok(Ok(Err(e))) => Err(bad(e)),
        Ok(Err(_)) => Err(unavailable()),
        Err(_) => {
            Err((StatusCode::GATEWAY_TIMEOUT, "no quorum answered within 30 s\n").into_response())
        }
    }
}

async fn applied(state: &AppState, commands: Vec<CCommand>) -> Response {
    match propose_index(state, commands).await {
        Ok(index) => {
            axum::Json(serde_json::json!({"applied": true, "index": index})).into_response()
        }
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct ProposeBody {
    name: String,
    root: String,
    source: String,
    #[serde(default)]
    base: Option<u64>,
    #[serde(default)]
    force: bool,
}

async fn propose(
    State(state): State<AppState>,
    axum::Json(b): axum::Json<ProposeBody>,
) -> Response {
    if let Err(e) = rules::validate_name(&b.name) {
        return bad(format!("{} {e}", rules::Refusal::Invalid.marker()));
    }
    let (Ok(root), Ok(source)) = (b.root.parse::<Cid>(), b.source.parse::<Cid>()) else {
        return bad(format!("bad CID in {:?} or {:?}", b.root, b.source));
    };
    let store = state.store.clone();
    let dir = state.dir.clone();
    let name = b.name.clone();
    let base_given = b.base;
    let force = b.force;
    // The base: the latest version this node knows unless given.
    let base = match base_given {
        Some(n) => n,
        None => match view_of(&state, Some(name.clone())).await {
            Some(v) => v["latest"].as_u64().unwrap_or(0),
            None => return unavailable(),
        },
    };
    let built = tokio::task::spawn_blocking(move || -> Result<CCommand, String> {
        let r = crate::restore::root(&store, &root).map_err(|e| format!("{root}: {e}"))?;
        if r.kind != mycel_chunker::manifest::Kind::Topology {
            return Err(format!("{root} is a {}, not a topology file", r.kind));
        }
        let canonical = crate::restore::read_object(&store, &root).map_err(|e| e.to_string())?;
        let key = dir.identity().map_err(|e| e.to_string())?;
        let config = dir.config().map_err(|e| e.to_string())?.chunker.config();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        crate::topology::stage_command(
            &key, &name, base, force, canonical, &source, &config, now_ms,
        )
        .map_err(|e| e.to_string())
    })
    .await;
    let command = match built {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return bad(format!("{} {e}", rules::Refusal::Invalid.marker())),
        Err(_) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "building the proposal failed\n")
                .into_response();
        }
    };
    let index = match propose_index(&state, vec![command]).await {
        Ok(i) => i,
        Err(r) => return r,
    };
    // The version this entry staged, once this node has applied it (a member follows the
    // committed state a moment behind the leader).
    let mut version = None;
    for _ in 0..50 {
        version = view_of(&state, Some(b.name.clone())).await.and_then(|v| {
            v["versions"]
                .as_array()?
                .iter()
                .find(|x| x["staged_index"].as_u64() == Some(index))
                .and_then(|x| x["version"].as_u64())
        });
        if version.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    axum::Json(serde_json::json!({
        "applied": true, "index": index, "name": b.name, "version": version, "base": base,
        "cid": root.to_string(), "source_cid": source.to_string(),
    }))
    .into_response()
}

#[derive(Deserialize)]
struct ActivateBody {
    name: String,
    version: u64,
}

async fn activate(
    State(state): State<AppState>,
    axum::Json(b): axum::Json<ActivateBody>,
) -> Response {
    applied(
        &state,
        vec![CCommand::ActivateTopology { name: b.name, version: b.version, canary: false }],
    )
    .await
}

#[derive(Deserialize)]
struct SchemaBody {
    name: String,
    schema: String,
}

async fn schema(State(state): State<AppState>, axum::Json(b): axum::Json<SchemaBody>) -> Response {
    if b.schema.trim().is_empty() {
        return applied(
            &state,
            vec![CCommand::SetTopologySchema { name: b.name, schema: Vec::new() }],
        )
        .await;
    }
    // Checked here too, so a bad schema costs no log entry.
    if let Err(e) = rules::Schema::compile(b.schema.as_bytes()) {
        return bad(format!("rejected: {e}"));
    }
    applied(
        &state,
        vec![CCommand::SetTopologySchema { name: b.name, schema: b.schema.into_bytes() }],
    )
    .await
}

#[derive(Deserialize)]
struct CanaryBody {
    name: String,
    #[serde(default)]
    subjects: Vec<String>,
    #[serde(default)]
    fail_pct_max: u32,
}

async fn canary(State(state): State<AppState>, axum::Json(b): axum::Json<CanaryBody>) -> Response {
    applied(
        &state,
        vec![CCommand::SetTopologyCanary {
            name: b.name,
            subjects: b.subjects,
            fail_pct_max: b.fail_pct_max,
        }],
    )
    .await
}

#[derive(Deserialize)]
struct PolicyBody {
    #[serde(default)]
    name: Option<String>,
    share: String,
}

async fn policy(State(state): State<AppState>, axum::Json(b): axum::Json<PolicyBody>) -> Response {
    if let Err(e) = mycel_policy::topology::Share::parse(&b.share) {
        return bad(format!("{} {e}", rules::Refusal::Invalid.marker()));
    }
    let key = match &b.name {
        Some(n) => {
            if let Err(e) = rules::validate_name(n) {
                return bad(format!("{} {e}", rules::Refusal::Invalid.marker()));
            }
            format!("{}.{n}", mycel_policy::topology::ACTIVATE_SHARE_POLICY)
        }
        None => mycel_policy::topology::ACTIVATE_SHARE_POLICY.to_owned(),
    };
    match propose_index(
        &state,
        vec![CCommand::SetPolicy { key: key.clone(), value: b.share.clone() }],
    )
    .await
    {
        Ok(index) => axum::Json(serde_json::json!({"applied": true, "index": index, "key": key,
            "value": b.share}))
        .into_response(),
        Err(r) => r,
    }
}

async fn watch(
    State(state): State<AppState>,
    axum::Json(config): axum::Json<crate::topology::WatchConfig>,
) -> Response {
    match ask(&state, |reply| Command::Topology(Request::Watch { config, reply })).await {
        Some(Ok(v)) => axum::Json(v).into_response(),
        Some(Err(e)) => bad(e),
        None => unavailable(),
    }
}

async fn unwatch(State(state): State<AppState>, axum::Json(q): axum::Json<NameQuery>) -> Response {
    let name = q.name;
    match ask(&state, |reply| Command::Topology(Request::Unwatch { name, reply })).await {
        Some(Ok(v)) => axum::Json(v).into_response(),
        Some(Err(e)) => bad(e),
        None => unavailable(),
    }
}
