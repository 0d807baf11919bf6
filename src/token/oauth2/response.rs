//! Reading a token endpoint's answer, which is treated as hostile input.
//!
//! Nothing here panics on any input, reads more than [`MAX_BODY`], or copies a token, the
//! client secret, or JSON parser messages (which quote input) into an error.

use crate::{error::BoxError, token::AccessToken};
use http::{HeaderMap, StatusCode, header::RETRY_AFTER};
use serde::Deserialize;
use std::{
    fmt,
    time::{Duration, SystemTime},
};

/// The largest token response read. Blaze's is about 300 bytes; JWT access tokens run to a
/// few KiB.
pub(crate) const MAX_BODY: usize = 64 * 1024;

/// How many characters of an unexpected body an error shows.
const EXCERPT_CHARS: usize = 80;

/// How many characters of an OAuth `error_description` an error keeps.
const DESCRIPTION_CHARS: usize = 200;

/// Why [`ClientCredentials`](super::ClientCredentials) could not get a token.
///
/// The layer reports it as the [`source`](std::error::Error::source) of an
/// [`Error`](crate::Error) for which [`is_token`](crate::Error::is_token) is true:
///
/// ```
/// # fn inspect(error: &blaze_auth::Error) {
/// use blaze_auth::TokenError;
/// use std::error::Error as _;
///
/// if let Some(token_error) = error.source().and_then(|e| e.downcast_ref::<TokenError>()) {
///     if token_error.oauth_error() == Some("invalid_client") {
///         eprintln!("check BLAZE_CLIENT_ID and BLAZE_CLIENT_SECRET");
///     }
/// }
/// # }
/// ```
///
/// Messages hold the HTTP status, the OAuth error code and description, or a short excerpt
/// of an unexpected body, cleaned of control characters; never a token or the client secret.
pub struct TokenError {
    inner: Box<Inner>,
}

struct Inner {
    kind: Kind,
    status: Option<StatusCode>,
    oauth: Option<OAuthError>,
    excerpt: Option<Box<str>>,
    retry_after: Option<Duration>,
    source: Option<BoxError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    OAuth,
    Status,
    InvalidResponse(&'static str),
    BodyTooLarge,
    Timeout,
    Transport,
}

#[derive(Debug)]
struct OAuthError {
    code: Box<str>,
    description: Option<Box<str>>,
    uri: Option<Box<str>>,
}

impl TokenError {
    fn new(kind: Kind, status: Option<StatusCode>) -> Self {
        Self {
            inner: Box::new(Inner {
                kind,
                status,
                oauth: None,
                excerpt: None,
                retry_after: None,
                source: None,
            }),
        }
    }

    pub(crate) fn timeout() -> Self {
        Self::new(Kind::Timeout, None)
    }

    pub(crate) fn transport(source: BoxError) -> Self {
        let mut error = Self::new(Kind::Transport, None);
        error.inner.source = Some(source);
        error
    }

    pub(crate) fn body_too_large(status: StatusCode) -> Self {
        Self::new(Kind::BodyTooLarge, Some(status))
    }

    /// The server answered with an OAuth 2.0 error (RFC 6749 section 5.2).
    pub fn is_oauth(&self) -> bool {
        self.inner.kind == Kind::OAuth
    }

    /// The server answered with an error status and a body that is not an OAuth error, such
    /// as a gateway's HTML page.
    pub fn is_status(&self) -> bool {
        self.inner.kind == Kind::Status
    }

    /// The server answered with success, but not with a usable token: not JSON, no
    /// `access_token`, a token with bytes illegal in a header, an unsupported `token_type`,
    /// an invalid `expires_in`.
    pub fn is_invalid_response(&self) -> bool {
        matches!(self.inner.kind, Kind::InvalidResponse(_))
    }

    /// The response body was larger than the 64 KiB read from a token endpoint.
    pub fn is_body_too_large(&self) -> bool {
        self.inner.kind == Kind::BodyTooLarge
    }

    /// The token request, or its connection, took longer than its timeout.
    pub fn is_timeout(&self) -> bool {
        self.inner.kind == Kind::Timeout
    }

    /// The request failed below HTTP: connection refused or reset, TLS, DNS;
    /// [`source`](std::error::Error::source) says which.
    pub fn is_transport(&self) -> bool {
        self.inner.kind == Kind::Transport
    }

    /// Whether trying again may succeed: timeouts, transport failures (except TLS
    /// certificate errors), 5xx and 429. OAuth errors such as `invalid_client` are not.
    pub fn is_transient(&self) -> bool {
        match self.inner.kind {
            Kind::Timeout => true,
            Kind::Transport => !self.is_tls_failure(),
            Kind::OAuth | Kind::Status => self.inner.status.is_some_and(|status| {
                status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
            }),
            Kind::InvalidResponse(_) | Kind::BodyTooLarge => false,
        }
    }

    /// Whether waiting will not fix this: the endpoint refused the request (an OAuth error
    /// such as `invalid_client`, whatever its status but 5xx, 408 and 429; or another 4xx
    /// answer but 408 and 429) or its certificate (a TLS failure). A malformed or oversize
    /// answer is not: it may be a one-off.
    pub(crate) fn is_permanent(&self) -> bool {
        let status = self.inner.status;
        let busy = status.is_some_and(|status| {
            status.is_server_error()
                || status == StatusCode::REQUEST_TIMEOUT
                || status == StatusCode::TOO_MANY_REQUESTS
        });
        match self.inner.kind {
            Kind::OAuth => !busy,
            Kind::Status => !busy && status.is_some_and(|status| status.is_client_error()),
            Kind::Transport => self.is_tls_failure(),
            Kind::Timeout | Kind::InvalidResponse(_) | Kind::BodyTooLarge => false,
        }
    }

    /// The HTTP status of the response, if there was one.
    pub fn status(&self) -> Option<StatusCode> {
        self.inner.status
    }

    /// The OAuth `error` code, e.g. `invalid_client`.
    pub fn oauth_error(&self) -> Option<&str> {
        self.inner.oauth.as_ref().map(|oauth| &*oauth.code)
    }

    /// The OAuth `error_description`, cleaned and shortened.
    pub fn oauth_description(&self) -> Option<&str> {
        self.inner.oauth.as_ref()?.description.as_deref()
    }

    /// The OAuth `error_uri`.
    pub fn oauth_uri(&self) -> Option<&str> {
        self.inner.oauth.as_ref()?.uri.as_deref()
    }

    /// The start of an unexpected response body, cleaned of control characters; absent when
    /// the body might hold a token or the secret.
    pub fn excerpt(&self) -> Option<&str> {
        self.inner.excerpt.as_deref()
    }

    /// How long the server asked to wait (`Retry-After`) before trying again.
    pub fn retry_after(&self) -> Option<Duration> {
        self.inner.retry_after
    }

    fn is_tls_failure(&self) -> bool {
        let mut next = self
            .inner
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static));
        while let Some(error) = next {
            let inner = error
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .map(|e| e as &(dyn std::error::Error + 'static));
            #[cfg(feature = "rustls")]
            if error.is::<rustls::Error>() || inner.is_some_and(|e| e.is::<rustls::Error>()) {
                return true;
            }
            next = inner.or_else(|| error.source());
        }
        false
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.inner.kind {
            Kind::OAuth => f.write_str("token endpoint refused the request")?,
            Kind::Status => f.write_str("token endpoint failed")?,
            Kind::InvalidResponse(reason) => write!(f, "invalid token response: {reason}")?,
            Kind::BodyTooLarge => write!(f, "token response larger than {MAX_BODY} bytes")?,
            Kind::Timeout => return f.write_str("token request timed out"),
            Kind::Transport => return f.write_str("token request failed"),
        }
        if let Some(status) = self.inner.status {
            write!(f, " ({status})")?;
        }
        if let Some(oauth) = &self.inner.oauth {
            write!(f, ": {}", oauth.code)?;
            if let Some(description) = &oauth.description {
                write!(f, ": {description}")?;
            }
        }
        if let Some(excerpt) = &self.inner.excerpt {
            write!(f, ": {excerpt:?}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("TokenError");
        debug
            .field("kind", &self.inner.kind)
            .field("status", &self.inner.status);
        if let Some(oauth) = &self.inner.oauth {
            debug.field("oauth", oauth);
        }
        if let Some(excerpt) = &self.inner.excerpt {
            debug.field("excerpt", excerpt);
        }
        if let Some(retry_after) = &self.inner.retry_after {
            debug.field("retry_after", retry_after);
        }
        if let Some(source) = &self.inner.source {
            debug.field("source", source);
        }
        debug.finish()
    }
}

impl std::error::Error for TokenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner.source.as_deref().map(|e| e as _)
    }
}

/// A token response, as RFC 6749 sections 5.1 and 5.2 shape it. Every field is optional
/// here so that a missing one gets a precise error instead of serde's (which quotes input).
#[derive(Deserialize)]
struct RawResponse {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
    scope: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
    error_uri: Option<String>,
}

impl fmt::Debug for RawResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawResponse")
            .field(
                "access_token",
                &self.access_token.as_ref().map(|_| "[redacted]"),
            )
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

/// What the parser needs to know besides the response.
pub(crate) struct ParseOptions<'a> {
    /// Lifetime of a token whose response has no `expires_in`.
    pub(crate) default_lifetime: Duration,
    /// Scrubbed from anything an error repeats, should a server echo it.
    pub(crate) secret: &'a str,
}

/// Turns a token endpoint's response into a token, or into the error it means.
pub(crate) fn parse(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    options: &ParseOptions<'_>,
) -> Result<AccessToken, TokenError> {
    let parsed = serde_json::from_slice::<RawResponse>(body);
    let error = match parsed {
        Ok(raw) if raw.error.is_some() => oauth_error(status, raw, options.secret),
        Ok(raw) if status.is_success() => return token(status, raw, options),
        Err(error) if status.is_success() => {
            let reason = match error.classify() {
                serde_json::error::Category::Eof => "truncated JSON",
                serde_json::error::Category::Data => "unexpected JSON shape",
                _ => "not JSON",
            };
            invalid(status, reason).with_excerpt(body, options.secret)
        }
        _ => TokenError::new(Kind::Status, Some(status)).with_excerpt(body, options.secret),
    };
    Err(error.with_retry_after(headers))
}

fn token(
    status: StatusCode,
    raw: RawResponse,
    options: &ParseOptions<'_>,
) -> Result<AccessToken, TokenError> {
    let secret = raw
        .access_token
        .ok_or_else(|| invalid(status, "no access_token"))?;
    // RFC 6749 requires `token_type`; a server that leaves it out means Bearer.
    let token_type = raw.token_type.as_deref().unwrap_or("Bearer");
    if !token_type.eq_ignore_ascii_case("bearer") {
        return Err(invalid(status, "token_type is not Bearer"));
    }
    let lifetime = match raw.expires_in {
        None | Some(serde_json::Value::Null) => options.default_lifetime,
        Some(value) => seconds(&value).ok_or_else(|| invalid(status, "invalid expires_in"))?,
    };
    let token = AccessToken::bearer(&secret)
        .map_err(|_| invalid(status, "access_token is not a valid header value"))?
        .with_expires_in(lifetime);
    Ok(match raw.scope {
        Some(scope) => token.with_scope(scope),
        None => token,
    })
}

/// `expires_in` as a number of seconds, or a string holding one (some servers send that).
fn seconds(value: &serde_json::Value) -> Option<Duration> {
    let number = match value {
        serde_json::Value::Number(number) => number.as_f64()?,
        serde_json::Value::String(text) => text.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (number.is_finite() && number >= 0.0).then(|| Duration::from_secs_f64(number.min(1e12)))
}

fn oauth_error(status: StatusCode, raw: RawResponse, secret: &str) -> TokenError {
    let clean = |text: String, max| Some(clean(&text, max, secret)).filter(|t| !t.is_empty());
    let code = raw.error.and_then(|code| clean(code, 64));
    let mut error = TokenError::new(Kind::OAuth, Some(status));
    error.inner.oauth = Some(OAuthError {
        code: code.unwrap_or_else(|| "unknown".into()),
        description: raw
            .error_description
            .and_then(|d| clean(d, DESCRIPTION_CHARS)),
        uri: raw.error_uri.and_then(|uri| clean(uri, DESCRIPTION_CHARS)),
    });
    error
}

fn invalid(status: StatusCode, reason: &'static str) -> TokenError {
    TokenError::new(Kind::InvalidResponse(reason), Some(status))
}

impl TokenError {
    /// Adds the start of `body`, unless it might hold a token or the secret.
    fn with_excerpt(mut self, body: &[u8], secret: &str) -> Self {
        let start = String::from_utf8_lossy(&body[..body.len().min(4 * EXCERPT_CHARS)]);
        let risky = start.to_ascii_lowercase().contains("token")
            || (!secret.is_empty() && String::from_utf8_lossy(body).contains(secret));
        if !risky {
            let excerpt = clean(&start, EXCERPT_CHARS, secret);
            self.inner.excerpt = Some(excerpt).filter(|e| !e.is_empty());
        }
        self
    }

    fn with_retry_after(mut self, headers: &HeaderMap) -> Self {
        self.inner.retry_after = headers
            .get(RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| match value.trim().parse::<u64>() {
                Ok(seconds) => Some(Duration::from_secs(seconds)),
                Err(_) => httpdate::parse_http_date(value)
                    .ok()?
                    .duration_since(SystemTime::now())
                    .ok(),
            });
        self
    }
}

/// `text` with runs of white space and control characters made one space, cut to `max`
/// characters, and any occurrence of the secret replaced.
fn clean(text: &str, max: usize, secret: &str) -> Box<str> {
    let mut cleaned = String::with_capacity(text.len().min(max * 4));
    for word in text.split(|c: char| c.is_whitespace() || c.is_control()) {
        if word.is_empty() {
            continue;
        }
        if !cleaned.is_empty() {
            cleaned.push(' ');
        }
        cleaned.push_str(word);
        if cleaned.len() > max * 4 {
            break;
        }
    }
    if !secret.is_empty() && cleaned.contains(secret) {
        cleaned = cleaned.replace(secret, "[redacted]");
    }
    match cleaned.char_indices().nth(max) {
        Some((end, _)) => format!("{}...", &cleaned[..end]).into(),
        None => cleaned.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "client-s3cret";

    fn options() -> ParseOptions<'static> {
        ParseOptions {
            default_lifetime: Duration::from_secs(3600),
            secret: SECRET,
        }
    }

    fn parse_ok(body: &str) -> AccessToken {
        parse(
            StatusCode::OK,
            &HeaderMap::new(),
            body.as_bytes(),
            &options(),
        )
        .unwrap()
    }

    fn parse_err(status: u16, body: &[u8]) -> TokenError {
        let status = StatusCode::from_u16(status).unwrap();
        parse(status, &HeaderMap::new(), body, &options()).unwrap_err()
    }

    #[tokio::test(start_paused = true)]
    async fn blaze_response_is_parsed() {
        let now = tokio::time::Instant::now();
        let token = parse_ok(
            r#"{"token_type":"Bearer","access_token":"abc.DEF-123","scope":"full","expires_in":3600,"consented_on":1656086348}"#,
        );
        assert_eq!(token.secret(), "abc.DEF-123");
        assert_eq!(token.token_type(), "Bearer");
        assert_eq!(token.scope(), Some("full"));
        assert_eq!(token.expires_at(), Some(now + Duration::from_secs(3600)));
    }

    #[tokio::test(start_paused = true)]
    async fn lenient_where_servers_differ() {
        let now = tokio::time::Instant::now();
        let token = parse_ok(r#"{"token_type":"bearer","access_token":"t","expires_in":"120"}"#);
        assert_eq!(token.expires_at(), Some(now + Duration::from_secs(120)));
        let token = parse_ok(r#"{"access_token":"t","expires_in":59.5,"unknown":{"x":[1]}}"#);
        assert_eq!(
            token.expires_at(),
            Some(now + Duration::from_millis(59_500))
        );
        let token = parse_ok(r#"{"token_type":"BEARER","access_token":"t","expires_in":null}"#);
        assert_eq!(
            token.expires_at(),
            Some(now + Duration::from_secs(3600)),
            "default lifetime"
        );
    }

    #[test]
    fn unusable_success_responses_are_invalid() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "truncated JSON"),
            (b"{\"access_token\":\"abc", "truncated JSON"),
            (b"<html><body>Bad gateway</body></html>", "not JSON"),
            (b"[1,2]", "unexpected JSON shape"),
            (b"{\"token_type\":\"Bearer\"}", "no access_token"),
            (
                b"{\"access_token\":\"a\\r\\nSet-Cookie: x\"}",
                "access_token is not a valid header value",
            ),
            (
                b"{\"access_token\":\"\"}",
                "access_token is not a valid header value",
            ),
            (
                b"{\"access_token\":\"t\",\"token_type\":\"mac\"}",
                "token_type is not Bearer",
            ),
            (
                b"{\"access_token\":\"t\",\"expires_in\":-5}",
                "invalid expires_in",
            ),
            (
                b"{\"access_token\":\"t\",\"expires_in\":\"soon\"}",
                "invalid expires_in",
            ),
            (b"{\"access_token\":42}", "unexpected JSON shape"),
        ];
        for (body, reason) in cases {
            let error = parse_err(200, body);
            assert!(error.is_invalid_response(), "{error:?}");
            assert!(error.to_string().contains(reason), "{error} for {body:?}");
            assert!(!error.is_transient());
        }
    }

    #[test]
    fn oauth_errors_carry_code_description_and_status() {
        let error = parse_err(
            401,
            br#"{"error":"invalid_client","error_description":"Client authentication failed","error_uri":"https://x/e"}"#,
        );
        assert!(error.is_oauth() && !error.is_transient());
        assert_eq!(error.status(), Some(StatusCode::UNAUTHORIZED));
        assert_eq!(error.oauth_error(), Some("invalid_client"));
        assert_eq!(
            error.oauth_description(),
            Some("Client authentication failed")
        );
        assert_eq!(error.oauth_uri(), Some("https://x/e"));
        assert_eq!(
            error.to_string(),
            "token endpoint refused the request (401 Unauthorized): invalid_client: Client authentication failed"
        );
        // Some servers say 200 and put the error in the body.
        assert_eq!(
            parse_err(200, br#"{"error":"invalid_scope"}"#).oauth_error(),
            Some("invalid_scope")
        );
    }

    #[test]
    fn only_refusals_are_permanent() {
        let permanent = [
            parse_err(401, br#"{"error":"invalid_client"}"#),
            parse_err(400, br#"{"error":"invalid_scope"}"#),
            parse_err(200, br#"{"error":"unauthorized_client"}"#),
            parse_err(403, b"<html>Forbidden</html>"),
            parse_err(404, b"<html>Not found</html>"),
        ];
        for error in &permanent {
            assert!(error.is_permanent(), "{error:?}");
        }
        let passing = [
            parse_err(503, br#"{"error":"temporarily_unavailable"}"#),
            parse_err(502, b"<html>Bad gateway</html>"),
            parse_err(429, b"slow down"),
            parse_err(408, b"<html>Request timeout</html>"),
            parse_err(200, b"<html>not json</html>"),
            TokenError::body_too_large(StatusCode::OK),
            TokenError::timeout(),
            TokenError::transport("connection reset".into()),
        ];
        for error in &passing {
            assert!(!error.is_permanent(), "{error:?}");
        }
    }

    #[test]
    fn gateway_pages_give_status_and_a_clean_excerpt() {
        let page =
            b"<html>\r\n<head><title>502 Bad Gateway</title></head>\n\t<body>nginx</body></html>";
        let error = parse_err(502, page);
        assert!(error.is_status() && error.is_transient());
        assert_eq!(
            error.excerpt(),
            Some("<html> <head><title>502 Bad Gateway</title></head> <body>nginx</body></html>")
        );
        let long = "x".repeat(10_000);
        let excerpt = parse_err(503, long.as_bytes())
            .excerpt()
            .unwrap()
            .to_owned();
        assert_eq!(excerpt.len(), EXCERPT_CHARS + 3);
        assert_eq!(parse_err(500, b"").excerpt(), None);
        assert_eq!(
            parse_err(500, &[0xff, 0xfe, b'a']).excerpt(),
            Some("\u{fffd}\u{fffd}a")
        );
    }

    #[test]
    fn nothing_that_may_hold_a_token_or_the_secret_is_repeated() {
        let leaks: &[(u16, &[u8])] = &[
            (200, b"{\"access_token\":\"tok-123\",\"expires_in\":\"x\"}"),
            (200, b"{\"access_token\":\"tok-123\nX\"}"),
            (200, b"access_token=tok-123&token_type=bearer"),
            (500, b"echo: client_secret=client-s3cret"),
            (
                400,
                br#"{"error":"invalid_client","error_description":"bad secret client-s3cret"}"#,
            ),
            (400, br#"{"error":"client-s3cret"}"#),
        ];
        for (status, body) in leaks {
            let error = parse_err(*status, body);
            let shown = format!("{error} {error:?}");
            assert!(
                !shown.contains("tok-123") && !shown.contains(SECRET),
                "{shown}"
            );
        }
    }

    #[test]
    fn control_characters_never_reach_a_message() {
        let error = parse_err(
            400,
            b"{\"error\":\"invalid_request\",\"error_description\":\"a\\u001b[31mred\\r\\nInjected: yes\"}",
        );
        let shown = error.to_string();
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert_eq!(error.oauth_description(), Some("a [31mred Injected: yes"));
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_a_date() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "7".parse().unwrap());
        let error = parse(StatusCode::TOO_MANY_REQUESTS, &headers, b"", &options()).unwrap_err();
        assert!(error.is_transient());
        assert_eq!(error.retry_after(), Some(Duration::from_secs(7)));
        let later = SystemTime::now() + Duration::from_secs(120);
        headers.insert(RETRY_AFTER, httpdate::fmt_http_date(later).parse().unwrap());
        let error = parse(StatusCode::SERVICE_UNAVAILABLE, &headers, b"", &options()).unwrap_err();
        let wait = error.retry_after().unwrap();
        assert!(
            wait > Duration::from_secs(100) && wait <= Duration::from_secs(120),
            "{wait:?}"
        );
        headers.insert(RETRY_AFTER, "soon".parse().unwrap());
        let error = parse(StatusCode::SERVICE_UNAVAILABLE, &headers, b"", &options()).unwrap_err();
        assert_eq!(error.retry_after(), None);
    }

    #[test]
    fn deeply_nested_json_is_an_error_not_a_stack_overflow() {
        let body = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse_err(200, body.as_bytes()).is_invalid_response());
    }
}
