//! Bearer-token checking for the gRPC API, as one interceptor rather than code in every
//! handler. The token comes from a file named in the config, never from the command line.

use std::path::Path;

use bitcoin::hashes::{sha256, Hash};
use tonic::{Request, Status};

/// The token every call must present, kept only as its hash.
#[derive(Clone)]
pub struct BearerToken {
    digest: sha256::Hash,
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// A token file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file cannot be read.
    #[error("reading token file {path} (it must hold a random token of at least 16 characters, mode 600)")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no token, or one too short to resist guessing.
    #[error("token file {0} must hold a token of at least 16 characters")]
    TooShort(std::path::PathBuf),
}

impl BearerToken {
    /// Reads the token from `path` (surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.to_owned(),
            source,
        })?;
        let token = text.trim();
        if token.len() < 16 {
            return Err(TokenError::TooShort(path.to_owned()));
        }
        Ok(Self::new(token))
    }

    /// A token given directly (tests, embedding).
    pub fn new(token: &str) -> Self {
        BearerToken {
            digest: sha256::Hash::hash(token.as_bytes()),
        }
    }

    /// Lets a request through if it carries `authorization: Bearer <token>`. Hashes are
    /// compared, so the time taken says nothing about how much of a guess was right.
    pub fn check<T>(&self, req: Request<T>) -> Result<Request<T>, Status> {
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("missing `authorization: Bearer <token>` metadata")
            })?;
        if sha256::Hash::hash(given.as_bytes()) != self.digest {
            return Err(Status::unauthenticated("invalid token"));
        }
        Ok(req)
    }
}
