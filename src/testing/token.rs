//! The OAuth 2.0 token endpoint (client credentials grant, RFC 6749 section 4.4) and the
//! tokens it issues.

use super::{
    Shared, SplitMix64, TokenFailure, lock,
    server::{Reply, ResetConnection, json_response, response, with_retry_after},
};
use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode,
    header::{ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, PRAGMA, WWW_AUTHENTICATE},
};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio::time::Instant;

/// The largest form body read; a client credentials request is a few hundred bytes.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// White space appended by [`TokenFailure::Oversize`].
const OVERSIZE_PADDING: usize = 8 * 1024 * 1024;

/// The only scope Blaze grants.
const SCOPE: &str = "full";

/// A client the token endpoint knows.
pub(super) struct Client {
    id: String,
    secret: String,
    studies: Vec<String>,
}

impl Client {
    pub(super) fn new(id: &str, secret: &str, studies: &[&str]) -> Self {
        Self {
            id: id.to_owned(),
            secret: secret.to_owned(),
            studies: studies.iter().map(|study| (*study).to_owned()).collect(),
        }
    }

    pub(super) fn id(&self) -> &str {
        &self.id
    }

    /// Whether the client's tokens may see `study`.
    pub(super) fn may_see(&self, study: &str) -> bool {
        self.studies.iter().any(|allowed| allowed == study)
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.id)
            .field("secret", &"[redacted]")
            .field("studies", &self.studies)
            .finish()
    }
}

/// Every token issued and not revoked, with its client and expiry.
pub(super) struct TokenStore {
    issued: HashMap<String, Issued>,
    rng: SplitMix64,
}

struct Issued {
    client: Arc<Client>,
    /// `None` for a lifetime beyond Tokio's clock.
    expires_at: Option<Instant>,
}

/// What the API learns about a bearer token.
pub(super) enum TokenCheck {
    Valid(Arc<Client>),
    Expired,
    /// Never issued, or revoked.
    Unknown,
}

impl TokenStore {
    pub(super) fn new(seed: u64) -> Self {
        Self {
            issued: HashMap::new(),
            rng: SplitMix64::new(seed),
        }
    }

    /// Issues a new token to `client`, valid for `lifetime` from now.
    fn issue(&mut self, client: Arc<Client>, lifetime: Duration) -> String {
        let token = self.new_token();
        let expires_at = Instant::now().checked_add(lifetime);
        self.issued
            .insert(token.clone(), Issued { client, expires_at });
        token
    }

    /// 170 characters in three base64url segments, shaped like the JWTs many gateways issue
    /// but opaque all the same.
    fn new_token(&mut self) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        const SEGMENTS: [usize; 3] = [36, 86, 46];
        let mut token = String::with_capacity(170);
        for (index, length) in SEGMENTS.into_iter().enumerate() {
            if index > 0 {
                token.push('.');
            }
            for _ in 0..length {
                // The top six bits: SplitMix64's best.
                token.push(char::from(ALPHABET[(self.rng.next_u64() >> 58) as usize]));
            }
        }
        token
    }

    pub(super) fn check(&self, token: &str) -> TokenCheck {
        match self.issued.get(token) {
            None => TokenCheck::Unknown,
            Some(issued) if issued.expires_at.is_some_and(|at| Instant::now() >= at) => {
                TokenCheck::Expired
            }
            Some(issued) => TokenCheck::Valid(Arc::clone(&issued.client)),
        }
    }

    pub(super) fn revoke_all(&mut self) {
        self.issued.clear();
    }

    pub(super) fn expire_all(&mut self) {
        let now = Instant::now();
        for issued in self.issued.values_mut() {
            issued.expires_at = Some(now);
        }
    }
}

/// Serves one request to the token endpoint, or fails it as the test asked.
pub(super) async fn handle(request: Request<Incoming>, shared: &Shared) -> Reply {
    shared
        .counters
        .token_requests
        .fetch_add(1, Ordering::Relaxed);
    let Some(failure) = shared.token_failures.next() else {
        return Ok(grant(request, shared).await);
    };
    match failure {
        TokenFailure::Status(status) => Ok(gateway_page(status)),
        TokenFailure::TooManyRequests { retry_after } => Ok(with_retry_after(
            response(
                StatusCode::TOO_MANY_REQUESTS,
                "text/plain",
                Bytes::from_static(b"Too Many Requests"),
            ),
            retry_after,
        )),
        TokenFailure::Slow(delay) => {
            tokio::time::sleep(delay).await;
            Ok(grant(request, shared).await)
        }
        TokenFailure::Garbage => Ok(response(
            StatusCode::OK,
            "application/json",
            Bytes::from_static(b"<html><body>Service temporarily unavailable</body></html>"),
        )),
        TokenFailure::Oversize => {
            let (parts, body) = grant(request, shared).await.into_parts();
            let Ok(collected) = body.collect().await;
            let mut body = Vec::from(collected.to_bytes());
            body.resize(body.len() + OVERSIZE_PADDING, b' ');
            Ok(Response::from_parts(parts, Full::new(body.into())))
        }
        TokenFailure::Hang => std::future::pending().await,
        TokenFailure::Reset => Err(ResetConnection),
    }
}

/// The token endpoint proper: a token response or an RFC 6749 error.
async fn grant(request: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    match try_grant(request, shared).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn try_grant(
    request: Request<Incoming>,
    shared: &Shared,
) -> Result<Response<Full<Bytes>>, OAuthError> {
    if request.method() != Method::POST {
        return Err(OAuthError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "the token endpoint takes POST",
        )
        .with_header(ALLOW, HeaderValue::from_static("POST")));
    }
    if !is_form(request.headers()) {
        return Err(OAuthError::invalid_request(
            "Content-Type must be application/x-www-form-urlencoded",
        ));
    }
    let basic = basic_credentials(request.headers())?;
    let body = Limited::new(request.into_body(), MAX_FORM_BYTES)
        .collect()
        .await
        .map_err(|_| OAuthError::invalid_request("the body is unreadable or too large"))?
        .to_bytes();
    let form = Form::parse(&body)?;
    let client = authenticate(shared, basic, &form)?;
    match form.grant_type.as_deref() {
        Some("client_credentials") => {}
        Some(_) => {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "only the client_credentials grant is supported",
            ));
        }
        None => return Err(OAuthError::invalid_request("grant_type is missing")),
    }
    // A missing scope gets the default (RFC 6749 section 3.3), which is the only one.
    if let Some(scope) = form.scope.as_deref() {
        if scope.is_empty() || scope.split(' ').any(|scope| scope != SCOPE) {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                "the only scope is full",
            ));
        }
    }

    let access_token = lock(&shared.tokens).issue(client, shared.token_lifetime);
    shared
        .counters
        .tokens_issued
        .fetch_add(1, Ordering::Relaxed);
    let consented_on = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let body = TokenResponse {
        token_type: "Bearer",
        access_token: &access_token,
        scope: SCOPE,
        expires_in: shared.token_lifetime.as_secs(),
        consented_on,
    };
    let mut response = json_response(StatusCode::OK, "application/json", &body);
    // RFC 6749 section 5.1: token responses must not be cached.
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// A successful token response, fields in Blaze's order.
#[derive(Serialize)]
struct TokenResponse<'a> {
    token_type: &'static str,
    access_token: &'a str,
    scope: &'static str,
    expires_in: u64,
    consented_on: u64,
}

/// The form parameters the endpoint reads; others are ignored (RFC 6749 section 3.2).
#[derive(Default)]
struct Form {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    scope: Option<String>,
}

impl Form {
    fn parse(body: &[u8]) -> Result<Self, OAuthError> {
        let mut form = Self::default();
        for (name, value) in form_urlencoded::parse(body) {
            let field = match &*name {
                "grant_type" => &mut form.grant_type,
                "client_id" => &mut form.client_id,
                "client_secret" => &mut form.client_secret,
                "scope" => &mut form.scope,
                _ => continue,
            };
            // RFC 6749 section 3.2: parameters must not be included more than once.
            if field.replace(value.into_owned()).is_some() {
                return Err(OAuthError::invalid_request("a parameter is repeated"));
            }
        }
        Ok(form)
    }
}

/// Finds the client the request authenticates as, by HTTP Basic or by the form.
fn authenticate(
    shared: &Shared,
    basic: Option<(String, String)>,
    form: &Form,
) -> Result<Arc<Client>, OAuthError> {
    let by_basic = basic.is_some();
    let (id, secret) = match (basic, &form.client_secret) {
        (Some(_), Some(_)) => {
            // RFC 6749 section 2.3: one authentication method per request.
            return Err(OAuthError::invalid_request(
                "the client authenticated by both Basic and client_secret",
            ));
        }
        (Some((id, secret)), None) => {
            if form
                .client_id
                .as_ref()
                .is_some_and(|form_id| *form_id != id)
            {
                return Err(OAuthError::invalid_request(
                    "client_id differs from the Basic credentials",
                ));
            }
            (id, secret)
        }
        (None, Some(secret)) => match &form.client_id {
            Some(id) => (id.clone(), secret.clone()),
            None => return Err(OAuthError::invalid_client("client_id is missing", false)),
        },
        (None, None) => {
            return Err(OAuthError::invalid_client(
                "no client authentication",
                false,
            ));
        }
    };
    shared
        .clients
        .get(&id)
        .filter(|client| client.secret == secret)
        .cloned()
        .ok_or_else(|| OAuthError::invalid_client("unknown client or wrong secret", by_basic))
}

/// The client id and secret from an `Authorization: Basic` header, if there is one.
fn basic_credentials(headers: &HeaderMap) -> Result<Option<(String, String)>, OAuthError> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Ok(None);
    };
    let encoded = value.to_str().ok().and_then(|value| {
        let (scheme, encoded) = value.split_once(' ')?;
        scheme.eq_ignore_ascii_case("basic").then_some(encoded)
    });
    let Some(encoded) = encoded else {
        return Err(OAuthError::invalid_client(
            "unsupported client authentication scheme",
            true,
        ));
    };
    // RFC 6749 section 2.3.1: id and secret are form-urlencoded before they are joined.
    let credentials = decode_base64(encoded.trim())
        .and_then(|decoded| String::from_utf8(decoded).ok())
        .and_then(|decoded| {
            let (id, secret) = decoded.split_once(':')?;
            Some((decode_form_component(id)?, decode_form_component(secret)?))
        });
    match credentials {
        Some(credentials) => Ok(Some(credentials)),
        None => Err(OAuthError::invalid_client(
            "malformed Basic credentials",
            true,
        )),
    }
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media_type| {
            media_type
                .trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

/// Standard base64 (RFC 4648 section 4), padding optional.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    // One character left over carries only six bits: no whole byte.
    if text.len() % 4 == 1 {
        return None;
    }
    let mut decoded = Vec::with_capacity(text.len() * 3 / 4);
    let mut buffer = 0u32;
    let mut bits = 0;
    for byte in text.bytes() {
        let value = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        buffer = (buffer << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            decoded.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    Some(decoded)
}

/// Undoes `application/x-www-form-urlencoded` on one value: `+` is a space, `%XX` a byte.
fn decode_form_component(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => decoded.push(b' '),
            b'%' => {
                let high = hex_digit(*bytes.get(index + 1)?)?;
                let low = hex_digit(*bytes.get(index + 2)?)?;
                decoded.push((high << 4) | low);
                index += 2;
            }
            byte => decoded.push(byte),
        }
        index += 1;
    }
    String::from_utf8(decoded).ok()
}

fn hex_digit(byte: u8) -> Option<u8> {
    char::from(byte).to_digit(16).map(|digit| digit as u8)
}

/// The page a gateway in front of the OAuth server answers with when it fails.
fn gateway_page(status: StatusCode) -> Response<Full<Bytes>> {
    let title = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    let page = format!(
        "<html><head><title>{title}</title></head><body><center><h1>{title}</h1></center>\
         <hr><center>gateway</center></body></html>"
    );
    response(status, "text/html", page)
}

/// An RFC 6749 section 5.2 error response. Descriptions are fixed texts, so they can never
/// echo a secret.
struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: &'static str,
    header: Option<(HeaderName, HeaderValue)>,
}

#[derive(Serialize)]
struct OAuthErrorBody {
    error: &'static str,
    error_description: &'static str,
}

impl OAuthError {
    fn new(status: StatusCode, error: &'static str, description: &'static str) -> Self {
        Self {
            status,
            error,
            description,
            header: None,
        }
    }

    fn invalid_request(description: &'static str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    /// `by_basic`: the client tried the `Authorization` header, so the answer must carry a
    /// challenge for it (RFC 6749 section 5.2).
    fn invalid_client(description: &'static str, by_basic: bool) -> Self {
        let error = Self::new(StatusCode::UNAUTHORIZED, "invalid_client", description);
        if by_basic {
            error.with_header(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"blaze\""),
            )
        } else {
            error
        }
    }

    fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.header = Some((name, value));
        self
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let body = OAuthErrorBody {
            error: self.error,
            error_description: self.description,
        };
        let mut response = json_response(self.status, "application/json", &body);
        if let Some((name, value)) = self.header {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_with_and_without_padding() {
        assert_eq!(
            decode_base64("ZGVtby1jbGllbnQ6ZGVtby1zZWNyZXQ=").as_deref(),
            Some(&b"demo-client:demo-secret"[..])
        );
        assert_eq!(decode_base64("YQ==").as_deref(), Some(&b"a"[..]));
        assert_eq!(decode_base64("YWI").as_deref(), Some(&b"ab"[..]));
        assert_eq!(
            decode_base64("+//+").as_deref(),
            Some(&[0xfb, 0xff, 0xfe][..])
        );
        assert_eq!(decode_base64("").as_deref(), Some(&[][..]));
    }

    #[test]
    fn base64_rejects_foreign_characters_and_lone_sextets() {
        assert_eq!(decode_base64("YW*="), None);
        assert_eq!(decode_base64("YWJjZ"), None);
        assert_eq!(decode_base64("YW-_"), None);
    }

    #[test]
    fn form_components_decode_plus_and_percent_escapes() {
        assert_eq!(
            decode_form_component("a+b%3Ac%25%2B").as_deref(),
            Some("a b:c%+")
        );
        assert_eq!(decode_form_component("caf%C3%A9").as_deref(), Some("café"));
        assert_eq!(decode_form_component("bad%2"), None);
        assert_eq!(decode_form_component("bad%+1x"), None);
        assert_eq!(decode_form_component("%FF"), None);
    }

    #[test]
    fn tokens_are_170_url_safe_characters_and_differ() {
        let mut store = TokenStore::new(7);
        let first = store.new_token();
        let second = store.new_token();
        assert_eq!(first.len(), 170);
        assert_eq!(first.matches('.').count(), 2);
        assert!(
            first
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "{first}"
        );
        assert_ne!(first, second);
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_expire_on_tokios_clock() {
        let mut store = TokenStore::new(7);
        let client = Arc::new(Client::new("app", "secret", &["S"]));
        let token = store.issue(client, Duration::from_secs(60));
        assert!(matches!(store.check(&token), TokenCheck::Valid(_)));

        tokio::time::advance(Duration::from_secs(60)).await;

        assert!(matches!(store.check(&token), TokenCheck::Expired));
    }

    #[test]
    fn revoked_and_expired_tokens_are_refused() {
        let mut store = TokenStore::new(7);
        let client = Arc::new(Client::new("app", "secret", &["S"]));
        let expired = store.issue(Arc::clone(&client), Duration::from_secs(60));
        store.expire_all();
        let fresh = store.issue(Arc::clone(&client), Duration::from_secs(60));
        assert!(matches!(store.check(&expired), TokenCheck::Expired));
        assert!(matches!(store.check(&fresh), TokenCheck::Valid(_)));

        store.revoke_all();

        assert!(matches!(store.check(&fresh), TokenCheck::Unknown));
        assert!(matches!(store.check("never-issued"), TokenCheck::Unknown));
    }
}
