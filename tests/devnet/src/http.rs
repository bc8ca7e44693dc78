//! The HTTP server: JSON-RPC on `POST /` (Basic auth) and REST under `/rest/` (no auth).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bitcoin::consensus::serialize;
use bitcoin::hex::DisplayHex;
use bitcoin::{BlockHash, Txid};
use serde_json::{json, Value};

use crate::json::{block_json, header_json, tx_json};
use crate::node::Shared;

/// Runs the server until the node is asked to stop.
pub(crate) fn serve(listener: std::net::TcpListener, shared: Arc<Shared>) {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("devnet-http")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the HTTP runtime");
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot use the RPC listener");
                return;
            }
        };
        let app = Router::new()
            .route("/", post(rpc))
            .route("/rest/{*path}", get(rest))
            .with_state(shared.clone());
        let mut graceful = shared.shutdown.subscribe();
        let mut hard = shared.shutdown.subscribe();
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = graceful.wait_for(|stop| *stop).await;
            // Let the reply to `stop` leave before connections close.
            tokio::time::sleep(Duration::from_millis(50)).await;
        });
        tokio::select! {
            result = server.into_future() => {
                if let Err(e) = result {
                    tracing::error!(error = %e, "HTTP server failed");
                }
            }
            // Idle keep-alive clients must not hold the node up forever.
            _ = async move {
                let _ = hard.wait_for(|stop| *stop).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            } => {}
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
}

use std::future::IntoFuture;

async fn rpc(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let authorized = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == shared.auth_header);
    if !authorized {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"jsonrpc\"")],
        )
            .into_response();
    }
    let worker = shared.clone();
    // Mining and validation hold the state lock for a while: keep them off the reactor.
    let (status, reply) = match tokio::task::spawn_blocking(move || {
        crate::rpc::handle_body(&worker, &body)
    })
    .await
    {
        Ok(r) => r,
        Err(_) => (
            500,
            json!({"result": null, "error": {"code": -1, "message": "internal error"}, "id": null}),
        ),
    };
    let mut text = reply.to_string();
    text.push('\n');
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json")],
        text,
    )
        .into_response()
}

/// A REST failure: status and plain-text body, as Core answers them.
struct RestError {
    status: StatusCode,
    body: String,
}

impl RestError {
    fn new(status: StatusCode, body: impl Into<String>) -> RestError {
        RestError {
            status,
            body: body.into(),
        }
    }
}

enum Format {
    Bin,
    Hex,
    Json,
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], body.into()).into_response()
}

fn reply(format: &Format, bin: Vec<u8>, hex_text: Option<String>, json_value: Value) -> Response {
    match format {
        Format::Bin => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/octet-stream")],
            bin,
        )
            .into_response(),
        Format::Hex => text(
            StatusCode::OK,
            format!(
                "{}\n",
                hex_text.unwrap_or_else(|| bin.to_lower_hex_string())
            ),
        ),
        Format::Json => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            format!("{json_value}\n"),
        )
            .into_response(),
    }
}

async fn rest(
    State(shared): State<Arc<Shared>>,
    Path(path): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    // Core without -rest registers no REST handler: its HTTP server answers 404.
    if !shared.state().rest {
        return StatusCode::NOT_FOUND.into_response();
    }
    if shared.warming_up() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service temporarily unavailable: Loading block index…\r\n",
        );
    }
    let worker = shared.clone();
    tokio::task::spawn_blocking(move || rest_sync(&worker, &path, &query))
        .await
        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))
}

fn parse_hash<T: std::str::FromStr>(s: &str) -> Result<T, RestError> {
    s.parse::<T>()
        .map_err(|_| RestError::new(StatusCode::BAD_REQUEST, format!("Invalid hash: {s}\r\n")))
}

fn rest_sync(shared: &Shared, path: &str, query: &HashMap<String, String>) -> Response {
    let Some((resource, ext)) = path.rsplit_once('.') else {
        return text(
            StatusCode::NOT_FOUND,
            "output format not found (available: json, bin, hex)\r\n",
        );
    };
    let format = match ext {
        "bin" => Format::Bin,
        "hex" => Format::Hex,
        "json" => Format::Json,
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "output format not found (available: json, bin, hex)\r\n",
            )
        }
    };
    let parts: Vec<&str> = resource.split('/').collect();
    let result = match parts.as_slice() {
        ["block", hash] => block(shared, hash, &format, 2),
        ["block", "notxdetails", hash] => block(shared, hash, &format, 1),
        ["blockhashbyheight", height] => block_hash_by_height(shared, height, &format),
        ["headers", count, hash] => headers(shared, count, hash, &format),
        ["headers", hash] => {
            let count = query.get("count").map(String::as_str).unwrap_or("5");
            headers(shared, count, hash, &format)
        }
        ["chaininfo"] => match format {
            Format::Json => Ok(reply(
                &format,
                Vec::new(),
                None,
                crate::rpc::chain_info(shared),
            )),
            _ => Err(RestError::new(
                StatusCode::NOT_FOUND,
                "output format not found (available: json)\r\n",
            )),
        },
        ["tx", txid] => tx(shared, txid, &format),
        ["mempool", "contents"] => {
            let state = shared.state();
            let ids: Vec<Value> = state
                .mempool
                .sorted()
                .iter()
                .map(|e| json!(e.txid.to_string()))
                .collect();
            Ok(reply(&Format::Json, Vec::new(), None, Value::Array(ids)))
        }
        _ => Err(RestError::new(StatusCode::NOT_FOUND, "")),
    };
    result.unwrap_or_else(|e| text(e.status, e.body))
}

fn block(
    shared: &Shared,
    hash: &str,
    format: &Format,
    verbosity: u64,
) -> Result<Response, RestError> {
    let hash: BlockHash = parse_hash(hash)?;
    let state = shared.state();
    let entry = state
        .chain
        .entry(&hash)
        .ok_or_else(|| RestError::new(StatusCode::NOT_FOUND, format!("{hash} not found\r\n")))?;
    let json_value = match format {
        Format::Json => block_json(&state.chain, entry, verbosity),
        _ => Value::Null,
    };
    Ok(reply(format, serialize(&*entry.block), None, json_value))
}

fn block_hash_by_height(
    shared: &Shared,
    height: &str,
    format: &Format,
) -> Result<Response, RestError> {
    let h: u32 = height.parse().map_err(|_| {
        RestError::new(
            StatusCode::BAD_REQUEST,
            format!("Invalid height: {height}\r\n"),
        )
    })?;
    let state = shared.state();
    let entry = state
        .chain
        .at_height(h)
        .ok_or_else(|| RestError::new(StatusCode::NOT_FOUND, "Block height out of range\r\n"))?;
    Ok(reply(
        format,
        serialize(&entry.hash),
        Some(entry.hash.to_string()),
        json!({"blockhash": entry.hash.to_string()}),
    ))
}

fn headers(
    shared: &Shared,
    count: &str,
    hash: &str,
    format: &Format,
) -> Result<Response, RestError> {
    let count: usize = count
        .parse()
        .ok()
        .filter(|c| (1..=2000).contains(c))
        .ok_or_else(|| {
            RestError::new(
                StatusCode::BAD_REQUEST,
                format!("Header count is invalid or out of acceptable range (1-2000): {count}\r\n"),
            )
        })?;
    let hash: BlockHash = parse_hash(hash)?;
    let state = shared.state();
    let chain = &state.chain;
    let mut entries = Vec::new();
    if let Some(start) = chain.entry(&hash).filter(|e| chain.is_active(&e.hash)) {
        let mut h = start.height;
        while entries.len() < count {
            match chain.at_height(h) {
                Some(e) => entries.push(e),
                None => break,
            }
            h += 1;
        }
    }
    let bin: Vec<u8> = entries
        .iter()
        .flat_map(|e| serialize(&e.block.header))
        .collect();
    let json_value = match format {
        Format::Json => Value::Array(entries.iter().map(|e| header_json(chain, e)).collect()),
        _ => Value::Null,
    };
    Ok(reply(format, bin, None, json_value))
}

fn tx(shared: &Shared, txid: &str, format: &Format) -> Result<Response, RestError> {
    let txid: Txid = parse_hash(txid)?;
    let state = shared.state();
    let tx = if let Some(e) = state.mempool.get(&txid) {
        Some((*e.tx).clone())
    } else {
        state
            .chain
            .tx_location(&txid)
            .and_then(|(h, pos)| state.chain.entry(&h).map(|e| e.block.txdata[pos].clone()))
    };
    let tx =
        tx.ok_or_else(|| RestError::new(StatusCode::NOT_FOUND, format!("{txid} not found\r\n")))?;
    Ok(reply(format, serialize(&tx), None, tx_json(&tx)))
}
