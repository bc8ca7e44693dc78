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
    /// Anyone but its owner may read it.
    #[error(transparent)]
    Exposed(#[from] SecretFileError),
}

/// A secret file that others than its owner can read.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// The file cannot be read.
    #[error("reading {what} {path}: {source}")]
    Read {
        /// What it holds (`token_file`, `rpc_password_file`...).
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Group or others may read it.
    #[error("{what} {path} is readable by group or others (mode {mode:o}): chmod 600 it")]
    Exposed {
        /// What it holds.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// Reads a file holding a secret (`what` names it in errors): refused when group or others
/// may read it, as ssh refuses a private key they may read. Surrounding whitespace is
/// trimmed.
pub fn read_secret_file(what: &'static str, path: &Path) -> Result<String, SecretFileError> {
    use std::os::unix::fs::PermissionsExt;
    let read = |source| SecretFileError::Read {
        what,
        path: path.to_owned(),
        source,
    };
    let mode = std::fs::metadata(path).map_err(read)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(SecretFileError::Exposed {
            what,
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    Ok(std::fs::read_to_string(path)
        .map_err(read)?
        .trim()
        .to_owned())
}

impl BearerToken {
    /// Reads the token from `path` (surrounding whitespace ignored; mode 600).
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let token = read_secret_file("token file", path).map_err(|e| match e {
            SecretFileError::Read { source, .. } => TokenError::Read {
                path: path.to_owned(),
                source,
            },
            exposed => TokenError::Exposed(exposed),
        })?;
        if token.len() < 16 {
            return Err(TokenError::TooShort(path.to_owned()));
        }
        Ok(Self::new(&token))
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
