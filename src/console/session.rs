//! Console sessions: a bounded in-memory map from a random cookie id to a role, a CSRF
//! token and an expiry; the cookie's attributes; the CSRF check of every form.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use actix_web::cookie::{time, Cookie, SameSite};
use actix_web::HttpRequest;
use rand::RngCore;

use crate::http::admin::Role;
use crate::verify::constant_time_eq;

/// The session cookie's name.
pub const COOKIE: &str = "console_session";
/// The sign-in form's CSRF cookie: the form carries the same random value (double submit),
/// so a sign-in POSTed from another site (login CSRF) is refused.
pub const SIGN_IN_COOKIE: &str = "console_sign_in";
/// How long a sign-in form stays usable.
pub const SIGN_IN_LIFETIME: Duration = Duration::from_secs(60 * 60);
/// How long a session lasts after sign-in.
pub const LIFETIME: Duration = Duration::from_secs(8 * 60 * 60);
/// Most sessions held at once; past it the one closest to expiry makes room.
pub const CAPACITY: usize = 1024;

/// A signed-in session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub role: Role,
    /// Every form carries it; any POST without it is refused.
    pub csrf: String,
    pub expires_at: Instant,
}

/// The sessions of every worker (held in `AppState`).
#[derive(Debug)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    capacity: usize,
    lifetime: Duration,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions::new(CAPACITY, LIFETIME)
    }
}

/// 32 random bytes as hex (the thread-local generator is a CSPRNG seeded by the OS).
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

impl Sessions {
    /// An empty map holding at most `capacity` sessions of `lifetime` each.
    pub fn new(capacity: usize, lifetime: Duration) -> Sessions {
        Sessions {
            map: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            lifetime,
        }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Session>> {
        // Nothing a panic could leave half-done: each operation is one map call.
        self.map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How long a session lasts.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Opens a session for `role`; returns its id (the cookie's value).
    pub fn open(&self, role: Role, now: Instant) -> (String, Session) {
        let id = random_token();
        let session = Session {
            role,
            csrf: random_token(),
            expires_at: now + self.lifetime,
        };
        let mut map = self.map();
        if map.len() >= self.capacity {
            map.retain(|_, s| s.expires_at > now);
        }
        if map.len() >= self.capacity {
            let closest = map
                .iter()
                .min_by_key(|(_, s)| s.expires_at)
                .map(|(id, _)| id.clone());
            if let Some(closest) = closest {
                map.remove(&closest);
            }
        }
        map.insert(id.clone(), session.clone());
        (id, session)
    }

    /// The live session of `id`, if any (an expired one is dropped).
    pub fn get(&self, id: &str, now: Instant) -> Option<Session> {
        let mut map = self.map();
        match map.get(id) {
            Some(session) if session.expires_at > now => Some(session.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    /// Ends the session of `id`.
    pub fn close(&self, id: &str) {
        self.map().remove(id);
    }

    /// Sessions held now (expired ones included until they are looked up or evicted).
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether the request came over TLS (directly, or as a proxy in front says): the cookie
/// is then `Secure`.
pub fn over_tls(request: &HttpRequest) -> bool {
    request.app_config().secure() || request.connection_info().scheme() == "https"
}

/// The session cookie for `id`: `HttpOnly`, `SameSite=Strict`, path `/console`, expiring
/// with the session, `Secure` over TLS.
pub fn cookie(id: &str, lifetime: Duration, secure: bool) -> Cookie<'static> {
    Cookie::build(COOKIE, id.to_string())
        .path("/console")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(secure)
        .max_age(time::Duration::seconds(
            i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX),
        ))
        .finish()
}

/// The sign-in form's CSRF cookie holding `value`: only sent back to the sign-in path,
/// `HttpOnly`, `SameSite=Strict`, an hour long, `Secure` over TLS.
pub fn sign_in_cookie(value: &str, secure: bool) -> Cookie<'static> {
    Cookie::build(SIGN_IN_COOKIE, value.to_string())
        .path("/console/sign-in")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(secure)
        .max_age(time::Duration::seconds(SIGN_IN_LIFETIME.as_secs() as i64))
        .finish()
}

/// Whether a sign-in form's token is the one in its cookie (in constant time).
pub fn sign_in_csrf_matches(cookie: Option<&str>, sent: Option<&str>) -> bool {
    match (cookie, sent) {
        (Some(cookie), Some(sent)) if !cookie.is_empty() => {
            constant_time_eq(cookie.as_bytes(), sent.as_bytes())
        }
        _ => false,
    }
}

/// A cookie that makes the browser forget the session.
pub fn removal_cookie(secure: bool) -> Cookie<'static> {
    let mut cookie = cookie("", Duration::ZERO, secure);
    cookie.make_removal();
    cookie
}

/// Whether a form's CSRF token is the session's (in constant time).
pub fn csrf_matches(session: &Session, sent: Option<&str>) -> bool {
    sent.is_some_and(|sent| constant_time_eq(session.csrf.as_bytes(), sent.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_the_map_stays_bounded() {
        let sessions = Sessions::new(2, Duration::from_secs(10));
        let start = Instant::now();
        let (first, _) = sessions.open(Role::Admin, start);
        let (second, _) = sessions.open(Role::Reports, start + Duration::from_secs(1));
        let (third, _) = sessions.open(Role::Admin, start + Duration::from_secs(2));
        assert_eq!(sessions.len(), 2);
        // The one closest to expiry made room.
        assert!(sessions.get(&first, start).is_none());
        assert_eq!(
            sessions.get(&second, start).map(|s| s.role),
            Some(Role::Reports)
        );
        assert!(sessions
            .get(&third, start + Duration::from_secs(12))
            .is_none());
        sessions.close(&second);
        assert!(sessions.is_empty());
    }

    #[test]
    fn ids_and_csrf_tokens_are_random_256_bit_hex() {
        let sessions = Sessions::default();
        let (a, session_a) = sessions.open(Role::Admin, Instant::now());
        let (b, session_b) = sessions.open(Role::Admin, Instant::now());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert_ne!(session_a.csrf, session_b.csrf);
        assert!(csrf_matches(&session_a, Some(&session_a.csrf)));
        assert!(!csrf_matches(&session_a, Some(&session_b.csrf)));
        assert!(!csrf_matches(&session_a, None));
        let token = random_token();
        assert!(sign_in_csrf_matches(Some(&token), Some(&token)));
        assert!(!sign_in_csrf_matches(Some(&token), Some(&random_token())));
        assert!(!sign_in_csrf_matches(None, Some(&token)));
        assert!(!sign_in_csrf_matches(Some(""), Some("")));
    }
}
