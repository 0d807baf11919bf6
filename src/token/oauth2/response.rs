//! Reading a token endpoint's answer, which is treated as hostile input.
//!
//! Nothing here panics on any input, reads more than [`MAX_BODY`], or copies a token, the
//! client secret, or JSON parser messages (which quote input) into an error.

use crate::{error::BoxError, study::contains_ignore_case, token::AccessToken};
use http::{
    HeaderMap, StatusCode,
    header::{CONTENT_TYPE, RETRY_AFTER},
};
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

/// How many characters of a `Content-Type` an error keeps.
const CONTENT_TYPE_CHARS: usize = 64;

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
    /// Content type and length of a success body that could not be used.
    content_type: Option<Box<str>>,
    length: Option<usize>,
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
                content_type: None,
                length: None,
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

    /// The OAuth `error_description`, cleaned and shortened; absent when it may echo the
    /// client secret (see [`excerpt`](Self::excerpt)).
    pub fn oauth_description(&self) -> Option<&str> {
        self.inner.oauth.as_ref()?.description.as_deref()
    }

    /// The OAuth `error_uri`.
    pub fn oauth_uri(&self) -> Option<&str> {
        self.inner.oauth.as_ref()?.uri.as_deref()
    }

    /// The start of an unexpected error response body, cleaned of control characters; absent
    /// when the body might hold a token or the secret in any form it was sent in (raw,
    /// form-urlencoded, percent-encoded, JSON-escaped, inside base64 Basic credentials) or 8
    /// characters of it in a row, names
    /// `client_secret`, or is a success (2xx) body: those are described by content type and
    /// length in the message instead.
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
            write!(f, " ({status}")?;
            if let Some(content_type) = &self.inner.content_type {
                write!(f, ", {content_type}")?;
            }
            if let Some(length) = self.inner.length {
                write!(f, ", {length} bytes")?;
            }
            f.write_str(")")?;
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
        if let Some(content_type) = &self.inner.content_type {
            debug.field("content_type", content_type);
        }
        if let Some(length) = &self.inner.length {
            debug.field("length", length);
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
    /// Lifetime of a token whose response has no `expires_in`, or one of 0 or less.
    pub(crate) default_lifetime: Duration,
    /// The forms of the client's credentials, kept out of anything an error repeats.
    pub(crate) echoes: &'a Echoes,
}

/// The forms in which a client's secret travels to the token endpoint, to recognise it when
/// the endpoint (or a gateway before it) echoes the request back.
///
/// The secret goes raw in nothing, but a server may decode what it got before echoing; it
/// goes form-urlencoded in a `client_secret_post` body (space as `+`, or `%20` after a
/// re-encoding), and base64-encoded in a `client_secret_basic` header, raw or form-encoded
/// first (RFC 6749 section 2.3.1). So the secret is looked for in the text as it stands, in
/// its readings (percent-decoded, JSON escapes undone), and in every run of base64 it holds,
/// decoded: a Basic header echoed whole or cut short.
pub(crate) struct Echoes {
    secret: Box<str>,
}

impl Echoes {
    pub(crate) fn new(secret: &str) -> Self {
        Self {
            secret: secret.into(),
        }
    }

    /// Whether `text` may hold the secret in a form it was sent in, or part of it, or names
    /// `client_secret` (an echo of the form, whatever the secret looks like in it).
    ///
    /// Besides `text` as it stands, its readings with JSON string escapes undone (`\/`,
    /// `\u002B`, as JSON encoders write them) and with percent escapes decoded once or twice
    /// (a server may re-encode what it got) are searched. Any [`PARTIAL_CHARS`] characters of
    /// the secret in a row count: servers cut long values short.
    pub(crate) fn in_text(&self, text: &str) -> bool {
        self.in_readings(text) || base64_runs_decoded(text).any(|run| self.in_readings(&run))
    }

    /// [`in_text`](Self::in_text) without the base64 runs: `text` as it stands and its
    /// readings with JSON and percent escapes undone.
    fn in_readings(&self, text: &str) -> bool {
        [text.to_owned(), json_unescaped(text)].iter().any(|base| {
            let once = percent_decoded(base, false);
            let twice = percent_decoded(&once, true);
            let views = [base, &once, &percent_decoded(base, true), &twice];
            views
                .iter()
                .any(|view| self.secret_in(view) || contains_ignore_case(view, "client_secret"))
        })
    }

    /// Whether `view` holds the secret, or any [`PARTIAL_CHARS`] characters of it in a row.
    fn secret_in(&self, view: &str) -> bool {
        let chars: Vec<usize> = self.secret.char_indices().map(|(i, _)| i).collect();
        if chars.len() <= PARTIAL_CHARS {
            return !self.secret.is_empty() && view.contains(&*self.secret);
        }
        (0..=chars.len() - PARTIAL_CHARS).any(|start| {
            let end = chars
                .get(start + PARTIAL_CHARS)
                .copied()
                .unwrap_or(self.secret.len());
            view.contains(&self.secret[chars[start]..end])
        })
    }
}

/// The runs of base64 (standard or URL-safe) in `text`, decoded as far as they hold whole
/// groups of four, at each of the four alignments: a run may begin before the credentials do.
/// Runs shorter than 12 characters (9 bytes) are left out: they cannot hold [`PARTIAL_CHARS`]
/// characters of a secret after a client id.
fn base64_runs_decoded(text: &str) -> impl Iterator<Item = String> + '_ {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD_NO_PAD;
    text.split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '-' | '_')))
        .filter(|run| run.len() >= 12)
        .flat_map(|run| {
            // URL-safe to standard: the two alphabets differ in two characters.
            let run: String = run
                .chars()
                .map(|c| match c {
                    '-' => '+',
                    '_' => '/',
                    c => c,
                })
                .collect();
            (0..4).filter_map(move |skip| {
                let groups = &run[skip..skip + (run.len() - skip) / 4 * 4];
                let bytes = STANDARD_NO_PAD.decode(groups).ok()?;
                Some(String::from_utf8_lossy(&bytes).into_owned())
            })
        })
}

/// How many characters of the client secret in a row an echo must hold to count as one.
/// Fewer would see the secret in ordinary words; a random secret's 8 characters are not in
/// any text by chance.
const PARTIAL_CHARS: usize = 8;

/// `text` with JSON string escapes (`\"`, `\\`, `\/`, `\n` and the like, `\uXXXX` with
/// surrogate pairs) undone; anything else as it stands, a lone surrogate as U+FFFD.
fn json_unescaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let unit = |s: &str| {
            s.get(2..6)
                .and_then(|hex| u32::from_str_radix(hex, 16).ok())
        };
        let (decoded, used) = match rest.as_bytes().get(1) {
            Some(b'u') => match unit(rest) {
                Some(high @ 0xD800..=0xDBFF) => match rest.get(6..8).zip(unit(&rest[6..])) {
                    Some(("\\u", low @ 0xDC00..=0xDFFF)) => {
                        let code = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
                        (char::from_u32(code), 12)
                    }
                    _ => (Some(char::REPLACEMENT_CHARACTER), 6),
                },
                Some(code) => (
                    Some(char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER)),
                    6,
                ),
                None => (None, 1),
            },
            Some(b'n') => (Some('\n'), 2),
            Some(b't') => (Some('\t'), 2),
            Some(b'r') => (Some('\r'), 2),
            Some(b'b') => (Some('\u{8}'), 2),
            Some(b'f') => (Some('\u{c}'), 2),
            Some(&byte @ (b'"' | b'\\' | b'/')) => (Some(byte as char), 2),
            _ => (None, 1),
        };
        match decoded {
            Some(c) => out.push(c),
            None => out.push('\\'),
        }
        rest = &rest[used..];
    }
    out.push_str(rest);
    out
}

/// `text` with `%XX` escapes decoded (and `+` as a space, if `plus`), invalid UTF-8 replaced.
fn percent_decoded(text: &str, plus: bool) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    decoded.push((high * 16 + low) as u8);
                    i += 3;
                    continue;
                }
                _ => decoded.push(b'%'),
            },
            b'+' if plus => decoded.push(b' '),
            byte => decoded.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
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
        Ok(raw) if raw.error.is_some() => oauth_error(status, raw, options.echoes),
        Ok(raw) if status.is_success() => {
            return token(status, raw, options)
                .map_err(|error| error.with_shape(headers, body, options.echoes));
        }
        Err(error) if status.is_success() => {
            let reason = match error.classify() {
                serde_json::error::Category::Eof => "truncated JSON",
                serde_json::error::Category::Data => "unexpected JSON shape",
                _ => "not JSON",
            };
            // A success body is never excerpted: a misconfigured URL or a proxy may answer
            // with a bare token.
            invalid(status, reason).with_shape(headers, body, options.echoes)
        }
        _ => TokenError::new(Kind::Status, Some(status)).with_excerpt(body, options.echoes),
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
    // 0 or less says nothing usable about the lifetime: a token that expires as it arrives
    // would be fetched again for every request. Treat it as unknown.
    let lifetime = match raw.expires_in {
        None | Some(serde_json::Value::Null) => options.default_lifetime,
        Some(value) => match seconds(&value) {
            Some(lifetime) if lifetime.is_zero() => options.default_lifetime,
            Some(lifetime) => lifetime,
            None => return Err(invalid(status, "invalid expires_in")),
        },
    };
    let token = AccessToken::bearer(&secret)
        .map_err(|_| invalid(status, "access_token is not a valid header value"))?
        .with_expires_in(lifetime);
    Ok(match raw.scope {
        Some(scope) => token.with_scope(scope),
        None => token,
    })
}

/// `expires_in` as a number of seconds, or a string holding one (some servers send that);
/// 0 or less is zero.
fn seconds(value: &serde_json::Value) -> Option<Duration> {
    let number = match value {
        serde_json::Value::Number(number) => number.as_f64()?,
        serde_json::Value::String(text) => text.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    number
        .is_finite()
        .then(|| Duration::from_secs_f64(number.clamp(0.0, 1e12)))
}

fn oauth_error(status: StatusCode, raw: RawResponse, echoes: &Echoes) -> TokenError {
    // A field that may echo the secret is left out whole: a redacted rest could still hold
    // it in a form not recognised.
    let clean = |text: String, max| {
        Some(clean(&text, max)).filter(|t| !t.is_empty() && !echoes.in_text(&text))
    };
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
    fn with_excerpt(mut self, body: &[u8], echoes: &Echoes) -> Self {
        let start = String::from_utf8_lossy(&body[..body.len().min(4 * EXCERPT_CHARS)]);
        let risky =
            contains_ignore_case(&start, "token") || echoes.in_text(&String::from_utf8_lossy(body));
        if !risky {
            let excerpt = clean(&start, EXCERPT_CHARS);
            self.inner.excerpt = Some(excerpt).filter(|e| !e.is_empty());
        }
        self
    }

    /// Adds the content type and length of a body that is not excerpted.
    fn with_shape(mut self, headers: &HeaderMap, body: &[u8], echoes: &Echoes) -> Self {
        self.inner.content_type = headers
            .get(CONTENT_TYPE)
            .map(|value| String::from_utf8_lossy(value.as_bytes()))
            .filter(|value| !echoes.in_text(value))
            .map(|value| clean(&value, CONTENT_TYPE_CHARS))
            .filter(|value| !value.is_empty());
        self.inner.length = Some(body.len());
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
/// characters.
fn clean(text: &str, max: usize) -> Box<str> {
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
        static ECHOES: std::sync::LazyLock<Echoes> =
            std::sync::LazyLock::new(|| Echoes::new(SECRET));
        ParseOptions {
            default_lifetime: Duration::from_secs(3600),
            echoes: &ECHOES,
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

    #[tokio::test(start_paused = true)]
    async fn expires_in_of_zero_or_less_means_the_default_lifetime() {
        let now = tokio::time::Instant::now();
        for expires_in in ["0", "-5", "0.0", "\"0\"", "\"-1\"", "-1e300"] {
            let token = parse_ok(&format!(
                r#"{{"access_token":"t","expires_in":{expires_in}}}"#
            ));
            assert_eq!(
                token.expires_at(),
                Some(now + Duration::from_secs(3600)),
                "{expires_in}"
            );
        }
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

    /// A secret as Azure AD issues them, with every character that encodes differently.
    const ODD_SECRET: &str = "Ab~c+d/e=f g.h_i-9";

    /// Every form in which `ODD_SECRET` travels, or a server re-encodes it.
    fn odd_secret_forms() -> Vec<String> {
        use base64::Engine as _;
        use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE};
        let form = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let basic_raw = format!("my id:{ODD_SECRET}");
        let basic_form = format!("{}:{}", form("my id"), form(ODD_SECRET));
        vec![
            ODD_SECRET.to_owned(),
            form(ODD_SECRET),                        // Ab%7Ec%2Bd%2Fe%3Df+g.h_i-9
            form(ODD_SECRET).replace('+', "%20"),    // re-encoded, space as %20
            "Ab%7ec%2bd%2fe%3df+g.h_i-9".to_owned(), // lower-case escapes
            "Ab~c%2Bd%2Fe%3Df%20g.h_i-9".to_owned(), // encodeURIComponent
            STANDARD.encode(&basic_raw),
            STANDARD.encode(&basic_form),
            STANDARD_NO_PAD.encode(&basic_form),
            URL_SAFE.encode(&basic_raw),
            STANDARD.encode(&basic_raw)[..24].to_owned(), // a Basic header cut short
            URL_SAFE.encode(&basic_form)[..28].to_owned(),
            format!("x{}", &STANDARD.encode(&basic_raw)[..26]), // glued to what went before
            ODD_SECRET.replace('/', "\\/"),                     // JSON-escaped
            ODD_SECRET.replace('+', "\\u002B"), // System.Text.Json's default escaping
            ODD_SECRET.replace('~', "\\u007e").replace(' ', "\\u0020"), // any \uXXXX
            form(ODD_SECRET).replace('%', "%25"), // form-encoded twice
        ]
    }

    fn parse_with(status: u16, content_type: &str, body: &str) -> TokenError {
        let echoes = Echoes::new(ODD_SECRET);
        let options = ParseOptions {
            default_lifetime: Duration::from_secs(3600),
            echoes: &echoes,
        };
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, content_type.parse().unwrap());
        let status = StatusCode::from_u16(status).unwrap();
        parse(status, &headers, body.as_bytes(), &options).unwrap_err()
    }

    fn shown(error: &TokenError) -> String {
        format!(
            "{error} {error:?} {:?} {:?}",
            error.oauth_description(),
            error.excerpt()
        )
    }

    #[test]
    fn no_form_of_the_secret_is_ever_repeated() {
        for form in odd_secret_forms() {
            let cases = [
                (
                    400,
                    "application/json",
                    format!(r#"{{"error":"invalid_client","error_description":"got {form}"}}"#),
                ),
                (
                    401,
                    "application/json",
                    format!(r#"{{"error":"invalid_client","echo":"{form}"}}"#),
                ),
                (500, "text/html", format!("<p>request was: {form}</p>")),
                (502, "text/plain", format!("Authorization: Basic {form}")),
                (400, "application/json", format!(r#"{{"error":"{form}"}}"#)),
            ];
            for (status, content_type, body) in cases {
                let error = parse_with(status, content_type, &body);
                let shown = shown(&error);
                for piece in [form.as_str(), "Ab~c", "e=f g"] {
                    assert!(!shown.contains(piece), "{piece} of {form} in {shown}");
                }
            }
        }
        // The OAuth code stays; only the field that echoed is left out.
        let error = parse_with(
            400,
            "application/json",
            r#"{"error":"invalid_client","error_description":"secret Ab%7Ec%2Bd%2Fe%3Df+g.h_i-9 is wrong"}"#,
        );
        assert_eq!(error.oauth_error(), Some("invalid_client"));
        assert_eq!(error.oauth_description(), None);
    }

    #[test]
    fn json_escapes_are_undone_without_panicking_on_broken_ones() {
        for (escaped, plain) in [
            (r#"a\u002Bb\u002bc\/d\\e\"f\ng"#, "a+b+c/d\\e\"f\ng"),
            (r"\uD83D\uDE00 \u00e9", "\u{1F600} \u{e9}"),
            (r"\uD800x \uDC00", "\u{FFFD}x \u{FFFD}"),
            (r"\ \u \u12 \u12é4 \q \", r"\ \u \u12 \u12é4 \q \"),
            ("é\\u00E9", "éé"),
        ] {
            assert_eq!(json_unescaped(escaped), plain, "{escaped}");
        }
    }

    #[test]
    fn part_of_the_secret_is_not_repeated() {
        // Servers cut long values short, from either end.
        for part in ["Ab~c+d/e=f", "e=f g.h_i-9", "c%2Bd%2Fe%3Df+g", "d\\/e=f g."] {
            let error = parse_with(500, "text/html", &format!("<p>secret {part}...</p>"));
            assert_eq!(error.excerpt(), None, "{part}");
        }
        // Short runs of its characters are not the secret.
        let error = parse_with(500, "text/plain", "Ab g.h");
        assert_eq!(error.excerpt(), Some("Ab g.h"));
    }

    #[test]
    fn a_body_that_names_client_secret_is_not_repeated() {
        let error = parse_with(400, "text/plain", "missing parameter: CLIENT_SECRET=");
        assert_eq!(error.excerpt(), None);
        let error = parse_with(
            400,
            "application/json",
            r#"{"error":"invalid_request","error_description":"client_secret=xyz"}"#,
        );
        assert_eq!(error.oauth_description(), None);
        // A harmless body still is.
        let error = parse_with(502, "text/plain", "upstream unavailable");
        assert_eq!(error.excerpt(), Some("upstream unavailable"));
    }

    #[test]
    fn a_success_body_is_described_never_repeated() {
        // A bare token, as a misconfigured URL or a proxy may send it.
        let error = parse_with(
            200,
            "text/plain; charset=utf-8",
            "eyJhbGciOiJSUzI1NiJ9.bare",
        );
        assert!(error.is_invalid_response());
        assert_eq!(error.excerpt(), None);
        assert_eq!(
            error.to_string(),
            "invalid token response: not JSON (200 OK, text/plain; charset=utf-8, 25 bytes)"
        );
        assert!(!format!("{error:?}").contains("bare"));
        let error = parse_with(200, "application/json", r#"{"token":"eyJ.bare"}"#);
        assert!(!shown(&error).contains("bare"), "{}", shown(&error));
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
