//! The orchestrator's link to the indexer: a channel to its gRPC endpoint (TLS when the
//! URL is https, trusting the given CA) and, when the indexer protects its reads, the
//! bearer token on every call.

use std::path::Path;
use std::time::Duration;

use proto::indexer::v1::indexer_client::IndexerClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// An indexer client that presents the token, if any, on every call.
pub type Indexer = IndexerClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer <token>` to each call (nothing without a token).
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token itself is never shown.
        write!(
            f,
            "Bearer({})",
            if self.0.is_some() { "set" } else { "none" }
        )
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

/// Why the indexer link cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The endpoint is not a URL tonic can use.
    #[error(
        "indexer {url:?} is not a URL ({detail}): give it as http://HOST:PORT or https://HOST:PORT"
    )]
    Url {
        /// As given.
        url: String,
        /// Why.
        detail: String,
    },
    /// A file could not be read.
    #[error("reading {what} {path}: {source}")]
    Read {
        /// Which setting.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The token cannot travel in a header.
    #[error("indexer_token_file {0}: the token must be printable ASCII")]
    BadToken(std::path::PathBuf),
    /// The token file cannot be read, or others than its owner can.
    #[error(transparent)]
    Secret(#[from] service::auth::SecretFileError),
}

/// A lazily connecting channel to `url`; with `ca_file`, TLS trusting that CA (PEM).
pub fn channel(url: &str, ca_file: Option<&Path>) -> Result<Channel, LinkError> {
    let bad = |e: &dyn std::fmt::Display| LinkError::Url {
        url: url.to_owned(),
        detail: e.to_string(),
    };
    // Keepalives: the event stream is quiet between blocks, and a peer that vanished
    // without a reset (a crashed host, a firewall's idle timeout) must end it as an error
    // instead of leaving the monitor waiting for good.
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| bad(&e))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if url.starts_with("https://") && ca_file.is_none() {
        // This build carries no system trust roots.
        return Err(LinkError::Url {
            url: url.to_owned(),
            detail: "https needs indexer_ca_file, the CA that signed the indexer's certificate"
                .into(),
        });
    }
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|source| LinkError::Read {
            what: "indexer_ca_file",
            path: path.to_owned(),
            source,
        })?;
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            .map_err(|e| bad(&e))?;
    }
    Ok(endpoint.connect_lazy())
}

/// A client over `channel` presenting the token in `token_file`, if one is given.
pub fn client(channel: Channel, token_file: Option<&Path>) -> Result<Indexer, LinkError> {
    let token = match token_file {
        None => None,
        Some(path) => {
            let text = service::auth::read_secret_file("indexer_token_file", path)?;
            let mut value: MetadataValue<Ascii> = format!("Bearer {text}")
                .parse()
                .map_err(|_| LinkError::BadToken(path.to_owned()))?;
            // Kept out of HTTP/2 header compression tables and debug output.
            value.set_sensitive(true);
            Some(value)
        }
    };
    Ok(IndexerClient::with_interceptor(channel, Bearer(token)))
}

/// A client over `channel` without a token (an indexer whose reads are open).
pub fn open_client(channel: Channel) -> Indexer {
    IndexerClient::with_interceptor(channel, Bearer(None))
}

/// The height of the block confirming `txid` on the indexer's chain, if one does: the
/// one reading of GetTransfer that the monitor and the executor must agree on.
pub async fn confirmed_height(
    indexer: &mut Indexer,
    txid: &bitcoin::Txid,
) -> Result<Option<u32>, tonic::Status> {
    let found = indexer
        .get_transfer(proto::indexer::v1::GetTransferRequest {
            txid: txid.to_string(),
        })
        .await;
    let transfers = match found {
        Ok(t) => t.into_inner().transfers,
        Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
        Err(s) => return Err(s),
    };
    // (Several only for a BIP30 duplicate txid: the latest counts.)
    Ok(transfers
        .into_iter()
        .filter(|t| t.status == proto::indexer::v1::TransferStatus::Confirmed as i32)
        .map(|t| t.height)
        .max())
}
