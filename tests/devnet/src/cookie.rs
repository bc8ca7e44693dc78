//! Core's `.cookie` file: `__cookie__:<64 hex>`, fresh at every start.

use std::fs;
use std::path::Path;

use bitcoin::hex::DisplayHex;
use rand::RngCore;

use crate::error::{io_err, Result};

/// The user name Core writes into cookie files.
pub(crate) const COOKIE_USER: &str = "__cookie__";

/// Writes a cookie with a fresh random secret and returns the password.
pub(crate) fn write_cookie(path: &Path) -> Result<String> {
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    let password = secret.to_lower_hex_string();
    // Write then rename, so a client never reads a half-written cookie.
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, format!("{COOKIE_USER}:{password}")).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(password)
}
