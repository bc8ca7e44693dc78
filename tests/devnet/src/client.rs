//! A minimal blocking HTTP/JSON-RPC client for tests: one connection per request.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting, writing or reading failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The server answered something that is not an HTTP/JSON-RPC reply.
    #[error("bad reply: {0}")]
    BadReply(String),
    /// The server answered an HTTP error without a JSON-RPC error (e.g. 401).
    #[error("HTTP {0}")]
    Http(u16),
    /// The node answered a JSON-RPC error.
    #[error("RPC error {code}: {message}")]
    Rpc {
        /// The JSON-RPC error code.
        code: i64,
        /// The message.
        message: String,
    },
}

/// An HTTP reply.
#[derive(Debug, Clone)]
pub struct HttpReply {
    /// The status code.
    pub status: u16,
    /// The (de-chunked) body.
    pub body: Vec<u8>,
}

impl HttpReply {
    /// The body parsed as JSON.
    pub fn json(&self) -> Result<Value, ClientError> {
        serde_json::from_slice(&self.body).map_err(|e| ClientError::BadReply(e.to_string()))
    }
}

/// Talks to a node's RPC/REST port.
#[derive(Debug, Clone)]
pub struct RpcClient {
    host: String,
    auth: Option<String>,
}

fn host_of(url: &str) -> String {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    rest.split('/').next().unwrap_or(rest).to_string()
}

impl RpcClient {
    /// A client with user/password credentials (or none, for REST).
    pub fn new(url: &str, credentials: Option<(&str, &str)>) -> RpcClient {
        let auth = credentials.map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        });
        RpcClient {
            host: host_of(url),
            auth,
        }
    }

    /// A client reading its credentials from a cookie file.
    pub fn with_cookie(url: &str, cookie: &Path) -> std::io::Result<RpcClient> {
        let text = std::fs::read_to_string(cookie)?;
        let (user, password) = text.trim().split_once(':').unwrap_or((text.trim(), ""));
        Ok(RpcClient::new(url, Some((user, password))))
    }

    fn request(&self, method: &str, path: &str, body: &[u8]) -> Result<HttpReply, ClientError> {
        let mut stream = TcpStream::connect(&self.host)?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.host,
            body.len()
        );
        if method == "POST" {
            head.push_str("Content-Type: application/json\r\n");
        }
        if let Some(auth) = &self.auth {
            head.push_str(&format!("Authorization: {auth}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        parse_reply(&raw)
    }

    /// POSTs a raw body to `/`.
    pub fn post(&self, body: &str) -> Result<HttpReply, ClientError> {
        self.request("POST", "/", body.as_bytes())
    }

    /// GETs a path such as `/rest/chaininfo.json`.
    pub fn get(&self, path: &str) -> Result<HttpReply, ClientError> {
        self.request("GET", path, &[])
    }

    /// Calls one method with positional parameters and returns its result.
    pub fn call(&self, method: &str, params: Value) -> Result<Value, ClientError> {
        let body = json!({"jsonrpc": "1.0", "id": 1, "method": method, "params": params});
        let reply = self.post(&body.to_string())?;
        if reply.status == 401 || (reply.body.is_empty() && reply.status != 200) {
            return Err(ClientError::Http(reply.status));
        }
        let v = reply.json()?;
        match v.get("error") {
            Some(e) if !e.is_null() => Err(ClientError::Rpc {
                code: e["code"].as_i64().unwrap_or(0),
                message: e["message"].as_str().unwrap_or_default().to_string(),
            }),
            _ => Ok(v.get("result").cloned().unwrap_or(Value::Null)),
        }
    }
}

fn parse_reply(raw: &[u8]) -> Result<HttpReply, ClientError> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| ClientError::BadReply("no header end".into()))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::BadReply(format!("no status in {head:?}")))?;
    let body = &raw[split + 4..];
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok(HttpReply { status, body })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, ClientError> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| ClientError::BadReply("bad chunk".into()))?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| ClientError::BadReply("bad chunk size".into()))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err(ClientError::BadReply("short chunk".into()));
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}
