//! The portal's session: a cookie holding a session key (the same kind the
//! API's login gives: stored hashed, revocable, expiring after a time without
//! use), and the CSRF token every form that changes something must carry.
//!
//! The token is derived from the session key (a hash, so it reveals nothing
//! of it): a page from another site cannot read the cookie, so it cannot know
//! the token; and the cookie is SameSite=Strict, so such a page's form does not
//! even carry it.

use axum_extra::extract::cookie::{Cookie, SameSite};
use sha2::{Digest, Sha256};

/// The session cookie's name.
pub const COOKIE: &str = "octopus_session";

/// The form field (and header, for scripts) carrying the CSRF token.
pub const CSRF_FIELD: &str = "csrf";
pub const CSRF_HEADER: &str = "X-CSRF-Token";

/// The CSRF token of a session.
pub fn csrf_token(session_key: &str) -> String {
    let digest = Sha256::digest(format!("octopus portal csrf:{session_key}").as_bytes());
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// Compares a token given with the session's, in constant time.
pub fn csrf_ok(session_key: &str, given: &str) -> bool {
    let want = csrf_token(session_key);
    want.len() == given.len()
        && want
            .bytes()
            .zip(given.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The cookie that opens a session (`secure` when served over TLS).
pub fn open(session_key: String, secure: bool) -> Cookie<'static> {
    let mut c = Cookie::new(COOKIE, session_key);
    c.set_http_only(true);
    c.set_same_site(SameSite::Strict);
    c.set_secure(secure);
    c.set_path("/");
    c
}

/// The cookie that ends it.
pub fn close(secure: bool) -> Cookie<'static> {
    let mut c = open(String::new(), secure);
    c.make_removal();
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_belong_to_their_session() {
        let t = csrf_token("API-ABC");
        assert_eq!(t.len(), 32);
        assert!(csrf_ok("API-ABC", &t));
        assert!(!csrf_ok("API-ABD", &t));
        assert!(!csrf_ok("API-ABC", ""));
        assert!(!t.contains("ABC"));
        let c = open("API-ABC".into(), true).to_string();
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Secure"));
        assert!(!open("k".into(), false).to_string().contains("Secure"));
    }
}
