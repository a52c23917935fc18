//! Who is calling: API keys (stored as SHA-256 only), passwords (argon2id), and
//! the middleware that turns the `X-Octopus-ApiKey` header into a [`Caller`].

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use octo_api_types::API_KEY_HEADER;
use octo_store::{now_ms, ApiKey, Store, User};
use sha2::{Digest, Sha256};

use crate::api::ApiError;
use crate::state::AppState;

/// SHA-256 (lower-case hex) of an API key: what the store keeps.
pub fn hash_api_key(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new API key: "API-" and 32 random upper-case letters and digits.
pub fn new_api_key() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    let body: String = (0..32)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("API-{body}")
}

/// Makes a new API key for a user and stores its hash; returns the key (to show
/// once) and what the store keeps.
pub async fn issue_api_key(
    store: &dyn Store,
    user_id: i64,
    purpose: &str,
) -> octo_store::Result<(String, ApiKey)> {
    let key = new_api_key();
    let stored = store
        .create_api_key(user_id, purpose, &hash_api_key(&key), &key[..8])
        .await?;
    Ok((key, stored))
}

/// Hashes a password with argon2id (PHC string, salted).
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&bytes).map_err(|e| anyhow::anyhow!("making a salt: {e}"))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))
}

/// Whether `password` matches the PHC string `phc`.
pub fn verify_password(password: &str, phc: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(phc)
        .map(|h| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// The caller, once authenticated.
#[derive(Debug, Clone)]
pub struct Caller(pub User);

/// Authenticates every request it wraps: 401 without a valid key.
pub(crate) async fn authenticate(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let unauthorized = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("authentication required: send a valid API key in the {API_KEY_HEADER} header"),
        )
        .into_response()
    };
    let Some(key) = req
        .headers()
        .get(API_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
    else {
        return unauthorized();
    };
    match state
        .store
        .authenticate_api_key(&hash_api_key(key.trim()), now_ms())
        .await
    {
        Ok(Some((_, user))) => {
            req.extensions_mut().insert(Caller(user));
            next.run(req).await
        }
        Ok(None) => unauthorized(),
        Err(e) => ApiError::from(e).into_response(),
    }
}
