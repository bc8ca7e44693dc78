//! JSON-RPC over HTTP to bitcoind: Basic auth from a cookie file (re-read after a 401, since
//! bitcoind rewrites it at every start) or a user and password, single and batch calls.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::DaemonError;

/// How to authenticate to bitcoind's RPC.
#[derive(Clone)]
pub enum Auth {
    /// The `.cookie` file bitcoind writes at start (`__cookie__:<secret>`).
    Cookie(PathBuf),
    /// `rpcuser` / `rpcpassword`.
    UserPass {
        /// User name.
        user: String,
        /// Password (never logged).
        password: String,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Cookie(p) => write!(f, "Cookie({})", p.display()),
            Auth::UserPass { user, .. } => write!(f, "UserPass({user}, <redacted>)"),
        }
    }
}

/// A JSON-RPC client; cheap to share between threads (one connection pool).
pub struct RpcClient {
    agent: ureq::Agent,
    url: String,
    auth: Auth,
    /// The `Authorization` header in use; cleared after a 401 so the cookie is read again.
    header: Mutex<Option<String>>,
    next_id: AtomicU64,
}

impl RpcClient {
    /// A client of the RPC server at `url` (e.g. `http://127.0.0.1:8332/`).
    pub fn new(url: &str, auth: Auth, timeout: Duration) -> RpcClient {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout(timeout)
            .max_idle_connections_per_host(16)
            .build();
        RpcClient {
            agent,
            url: url.to_owned(),
            auth,
            header: Mutex::new(None),
            next_id: AtomicU64::new(1),
        }
    }

    /// The URL calls go to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The shared HTTP agent (REST uses the same connection pool).
    pub fn agent(&self) -> &ureq::Agent {
        &self.agent
    }

    fn auth_header(&self) -> Result<String, DaemonError> {
        let mut cached = self.header.lock().expect("auth header lock");
        if let Some(h) = cached.as_ref() {
            return Ok(h.clone());
        }
        let credentials = match &self.auth {
            Auth::UserPass { user, password } => format!("{user}:{password}"),
            Auth::Cookie(path) => std::fs::read_to_string(path)
                .map_err(|source| DaemonError::Cookie {
                    path: path.clone(),
                    source,
                })?
                .trim()
                .to_owned(),
        };
        let h = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        );
        *cached = Some(h.clone());
        Ok(h)
    }

    /// Posts `body`; returns the parsed JSON reply whatever the HTTP status (bitcoind puts
    /// RPC errors in the body of a 500 or a 200 alike).
    fn post(&self, body: &Value) -> Result<Value, DaemonError> {
        let text = body.to_string();
        for attempt in 0..2 {
            let header = self.auth_header()?;
            let reply = self
                .agent
                .post(&self.url)
                .set("Authorization", &header)
                .set("Content-Type", "application/json")
                .send_string(&text);
            let response = match reply {
                Ok(r) => r,
                Err(ureq::Error::Status(401, _)) => {
                    // The cookie may have been rewritten by a restart: read it once more.
                    *self.header.lock().expect("auth header lock") = None;
                    if attempt == 0 && matches!(self.auth, Auth::Cookie(_)) {
                        continue;
                    }
                    return Err(DaemonError::Unauthorized {
                        url: self.url.clone(),
                        auth: format!("{:?}", self.auth),
                    });
                }
                Err(ureq::Error::Status(status, r)) => {
                    let body = r.into_string().unwrap_or_default();
                    return serde_json::from_str(&body).map_err(|_| DaemonError::Http {
                        url: self.url.clone(),
                        status,
                        body: body.chars().take(200).collect(),
                    });
                }
                Err(ureq::Error::Transport(t)) => {
                    return Err(DaemonError::Unreachable {
                        url: self.url.clone(),
                        detail: t.to_string(),
                    })
                }
            };
            let body = response
                .into_string()
                .map_err(|e| DaemonError::Unreachable {
                    url: self.url.clone(),
                    detail: format!("reading the reply: {e}"),
                })?;
            return serde_json::from_str(&body).map_err(|e| DaemonError::Decode {
                what: "RPC reply".into(),
                detail: e.to_string(),
            });
        }
        unreachable!("the second attempt returns")
    }

    fn request(&self, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        json!({"jsonrpc": "1.0", "id": id, "method": method, "params": params})
    }

    /// Calls `method` with positional `params`.
    pub fn call<T: DeserializeOwned>(&self, method: &str, params: Value) -> Result<T, DaemonError> {
        let reply = self.post(&self.request(method, params))?;
        result_of(method, reply)
    }

    /// Calls `method` once per entry of `params` in one round trip; results in order.
    pub fn batch<T: DeserializeOwned>(
        &self,
        method: &str,
        params: impl IntoIterator<Item = Value>,
    ) -> Result<Vec<T>, DaemonError> {
        self.batch_each(method, params)?.into_iter().collect()
    }

    /// Like [`RpcClient::batch`], with each call's own outcome (some may fail alone).
    pub fn batch_each<T: DeserializeOwned>(
        &self,
        method: &str,
        params: impl IntoIterator<Item = Value>,
    ) -> Result<Vec<Result<T, DaemonError>>, DaemonError> {
        let requests: Vec<Value> = params
            .into_iter()
            .map(|p| self.request(method, p))
            .collect();
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Value> = requests.iter().map(|r| r["id"].clone()).collect();
        let reply = self.post(&Value::Array(requests))?;
        let Value::Array(replies) = reply else {
            // A batch refused as a whole answers with one error object.
            return Err(result_of::<Value>(method, reply).err().unwrap_or_else(|| {
                DaemonError::Decode {
                    what: format!("{method} batch reply"),
                    detail: "not an array".into(),
                }
            }));
        };
        // Replies may come in any order: match them to requests by id.
        let mut by_id: std::collections::HashMap<String, Value> = replies
            .into_iter()
            .map(|r| (r["id"].to_string(), r))
            .collect();
        Ok(ids
            .iter()
            .map(|id| {
                let reply = by_id
                    .remove(&id.to_string())
                    .ok_or_else(|| DaemonError::Decode {
                        what: format!("{method} batch reply"),
                        detail: format!("no reply for id {id}"),
                    })?;
                result_of(method, reply)
            })
            .collect())
    }
}

/// The `result` of the reply body `body` to `method`, or its `error` as a typed error: the
/// one reading of an untrusted JSON-RPC answer.
pub fn reply_of<T: DeserializeOwned>(method: &str, body: &str) -> Result<T, DaemonError> {
    let reply: Value = serde_json::from_str(body).map_err(|e| DaemonError::Decode {
        what: "RPC reply".into(),
        detail: e.to_string(),
    })?;
    result_of(method, reply)
}

/// The `result` of a reply, or its `error` as a typed error.
fn result_of<T: DeserializeOwned>(method: &str, mut reply: Value) -> Result<T, DaemonError> {
    let error = reply
        .get_mut("error")
        .map(Value::take)
        .unwrap_or(Value::Null);
    if !error.is_null() {
        return Err(DaemonError::Rpc {
            method: method.to_owned(),
            code: error["code"].as_i64().unwrap_or(0),
            message: error["message"].as_str().unwrap_or("").to_owned(),
        });
    }
    let result = reply
        .get_mut("result")
        .map(Value::take)
        .unwrap_or(Value::Null);
    serde_json::from_value(result).map_err(|e| DaemonError::Decode {
        what: format!("{method} result"),
        detail: e.to_string(),
    })
}
