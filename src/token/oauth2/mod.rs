//! [`ClientCredentials`]: tokens from an OAuth 2.0 token endpoint, by the client-credentials
//! grant (RFC 6749 section 4.4), as Blaze issues them.
//!
//! # Example
//!
//! ```no_run
//! use blaze_auth::{BlazeAuthLayer, ClientCredentials};
//!
//! # fn run() -> Result<(), blaze_auth::Error> {
//! // Blaze staging, the secret from wherever secrets live.
//! let source = ClientCredentials::blaze_staging("my-client-id", "my-client-secret").build()?;
//! let layer = BlazeAuthLayer::new(source, "FHIR-T");
//! # Ok(())
//! # }
//! ```
//!
//! Any other OAuth 2.0 server, with HTTP Basic client authentication and an extra parameter:
//!
//! ```
//! use blaze_auth::{ClientAuth, ClientCredentials};
//! use std::time::Duration;
//!
//! # fn run() -> Result<(), blaze_auth::Error> {
//! let source = ClientCredentials::builder("https://login.example.com/oauth/token", "id", "secret")
//!     .auth(ClientAuth::Basic)
//!     .scope("read")
//!     .param("audience", "https://api.example.com")
//!     .request_timeout(Duration::from_secs(5))
//!     .build()?;
//! # Ok(())
//! # }
//! # run().unwrap();
//! ```
//!
//! # Behaviour
//!
//! - Each fetch sends `grant_type=client_credentials`, the scope and any extra parameters as
//!   a form; the client id and secret go in the form ([`ClientAuth::Post`], what Blaze wants,
//!   the default) or in an HTTP Basic header ([`ClientAuth::Basic`]).
//! - Transient failures (timeouts, connection errors, 5xx, 429) are retried within the fetch
//!   with exponential backoff and jitter, honouring `Retry-After`; OAuth errors such as
//!   `invalid_client` are returned at once. See [`ClientCredentialsBuilder::max_attempts`].
//! - The response is read as hostile input: at most 64 KiB, every failure a [`TokenError`]
//!   that never repeats a token or the secret.
//! - Plain `http://` is refused unless the host is loopback or
//!   [`allow_http`](ClientCredentialsBuilder::allow_http) says otherwise.
//! - Each fetch is a `tracing` span (`blaze_auth::token_fetch`) with the endpoint (no query,
//!   no user info), attempts, statuses, durations and the token's lifetime; never a secret.

mod env;
#[cfg(feature = "rustls")]
mod https;
mod response;

#[cfg(feature = "rustls")]
pub use self::https::TlsRoots;
pub use self::{env::BlazeEnv, response::TokenError};

use self::response::{Echoes, MAX_BODY, ParseOptions};
use crate::{
    blaze,
    error::{BoxError, Error},
    token::{AccessToken, TokenFuture, TokenSource},
};
use base64::Engine as _;
use bytes::Bytes;
use http::{
    HeaderValue, Request, Response, Uri,
    header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, USER_AGENT},
};
use http_body::Body;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use std::{fmt, sync::Arc, time::Duration};
use tokio::time::Instant;
use tower::{Service, ServiceExt, util::BoxCloneSyncService};
use tracing::Instrument;

/// The HTTP client a [`ClientCredentials`] sends token requests with, type-erased: a fetch
/// happens once per token lifetime, so the box costs nothing that matters.
type HttpClient =
    BoxCloneSyncService<Request<Full<Bytes>>, Response<UnsyncBoxBody<Bytes, BoxError>>, BoxError>;

/// How the client authenticates to the token endpoint (RFC 6749 section 2.3.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form body ("client_secret_post"): what Blaze
    /// wants. The default.
    #[default]
    Post,
    /// An `Authorization: Basic` header ("client_secret_basic"): what most other servers
    /// want.
    Basic,
}

/// An OAuth 2.0 client secret.
///
/// `Debug` prints `[redacted]`; there is no `Display`. Cloning is cheap.
#[derive(Clone)]
pub struct ClientSecret(Arc<str>);

impl ClientSecret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<Arc<str>>) -> Self {
        Self(secret.into())
    }

    /// The secret itself. Whoever holds it can act as the client: never log it.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl From<&str> for ClientSecret {
    fn from(secret: &str) -> Self {
        Self::new(secret)
    }
}

impl From<String> for ClientSecret {
    fn from(secret: String) -> Self {
        Self::new(secret)
    }
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientSecret([redacted])")
    }
}

/// A [`TokenSource`] that gets tokens from an OAuth 2.0 token endpoint by the
/// client-credentials grant. See the [module docs](self).
///
/// Cloning is cheap; clones share the HTTP client.
#[derive(Clone)]
pub struct ClientCredentials {
    inner: Arc<Inner>,
}

struct Inner {
    client: HttpClient,
    token_url: Uri,
    /// `scheme://host:port/path` of the token URL, for logs and `Debug`.
    endpoint: Box<str>,
    client_id: Box<str>,
    secret: ClientSecret,
    /// The scope and extra parameters as given, for [`ClientCredentials::shared_key`].
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    scope: Option<Box<str>>,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    params: Vec<(Box<str>, Box<str>)>,
    /// The form for every token request, secret included when it goes in the body.
    form: Bytes,
    /// The `Authorization: Basic` header, when the client authenticates so.
    basic: Option<HeaderValue>,
    /// The forms of the secret that errors must not repeat.
    echoes: Echoes,
    default_lifetime: Duration,
    request_timeout: Duration,
    max_attempts: u32,
    backoff: (Duration, Duration),
}

impl ClientCredentials {
    /// A builder for a source that gets tokens from `token_url`.
    pub fn builder(
        token_url: &str,
        client_id: &str,
        client_secret: impl Into<ClientSecret>,
    ) -> ClientCredentialsBuilder {
        ClientCredentialsBuilder {
            token_url: token_url.into(),
            client_id: client_id.into(),
            secret: client_secret.into(),
            scope: None,
            auth: ClientAuth::Post,
            params: Vec::new(),
            allow_http: false,
            default_lifetime: DEFAULT_LIFETIME,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff: (DEFAULT_BACKOFF, DEFAULT_MAX_BACKOFF),
            client: None,
            #[cfg(feature = "rustls")]
            tls: https::TlsConfig::default(),
        }
    }

    /// A builder for Blaze at `base_url` (scheme, host and port): the token endpoint at
    /// [`blaze::TOKEN_PATH`], scope `full`.
    pub fn blaze(
        base_url: &str,
        client_id: &str,
        client_secret: impl Into<ClientSecret>,
    ) -> ClientCredentialsBuilder {
        let token_url = format!("{}{}", base_url.trim_end_matches('/'), blaze::TOKEN_PATH);
        Self::builder(&token_url, client_id, client_secret).scope(blaze::SCOPE)
    }

    /// A builder for Blaze staging ([`blaze::STAGING_URL`]).
    pub fn blaze_staging(
        client_id: &str,
        client_secret: impl Into<ClientSecret>,
    ) -> ClientCredentialsBuilder {
        Self::blaze(blaze::STAGING_URL, client_id, client_secret)
    }

    /// A builder for Blaze production ([`blaze::PRODUCTION_URL`]).
    pub fn blaze_production(
        client_id: &str,
        client_secret: impl Into<ClientSecret>,
    ) -> ClientCredentialsBuilder {
        Self::blaze(blaze::PRODUCTION_URL, client_id, client_secret)
    }

    /// Fetches a token now, with the retries and timeouts configured; the layer calls this
    /// through [`TokenSource::fetch`].
    pub async fn fetch_token(&self) -> Result<AccessToken, TokenError> {
        let span = tracing::debug_span!("blaze_auth::token_fetch", endpoint = %self.inner.endpoint);
        self.inner.fetch().instrument(span).await
    }

    /// The key under which [`RedisShared`](crate::RedisShared) shares this source's tokens
    /// among processes: the token URL, client id, scope and extra parameters, and a keyed
    /// hash of the secret (see [`SharedKey`](crate::SharedKey)), so that a process with a
    /// wrong or rotated secret fetches its own token instead of using its peers'.
    ///
    /// ```no_run
    /// use blaze_auth::{BlazeAuthLayer, ClientCredentials, RedisShared};
    ///
    /// # fn run() -> Result<(), blaze_auth::Error> {
    /// let source = ClientCredentials::blaze_staging("my-client-id", "my-client-secret").build()?;
    /// let key = source.shared_key();
    /// let shared = RedisShared::builder(source, key)
    ///     .redis_url("redis://redis.internal:6379/")
    ///     .build()?;
    /// let layer = BlazeAuthLayer::new(shared, "FHIR-T");
    /// # let _ = layer;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn shared_key(&self) -> crate::token::redis::SharedKey {
        let inner = &self.inner;
        let mut key =
            crate::token::redis::SharedKey::new(&inner.token_url.to_string(), &inner.client_id)
                .client_secret(inner.secret.secret());
        if let Some(scope) = &inner.scope {
            key = key.scope(scope);
        }
        for (name, value) in &inner.params {
            key = key.param(name, value);
        }
        key
    }
}

impl TokenSource for ClientCredentials {
    fn fetch(&self, _rejected: Option<&AccessToken>) -> TokenFuture {
        let this = self.clone();
        TokenFuture::new(async move { this.fetch_token().await })
    }
}

impl fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("endpoint", &self.inner.endpoint)
            .field("client_id", &self.inner.client_id)
            .field("secret", &self.inner.secret)
            .field("basic", &self.inner.basic.is_some())
            .finish_non_exhaustive()
    }
}

impl Inner {
    async fn fetch(&self) -> Result<AccessToken, TokenError> {
        let mut attempt = 1;
        loop {
            let started = Instant::now();
            let result = tokio::time::timeout(self.request_timeout, self.attempt())
                .await
                .unwrap_or_else(|_| Err(TokenError::timeout()));
            let elapsed_ms = started.elapsed().as_millis() as u64;
            let error = match result {
                Ok(token) => {
                    let lifetime_s = token
                        .expires_at()
                        .map(|at| at.saturating_duration_since(Instant::now()).as_secs());
                    tracing::debug!(attempt, elapsed_ms, lifetime_s, "token fetched");
                    return Ok(token);
                }
                Err(error) => error,
            };
            let status = error.status().map(|s| s.as_u16());
            match self.retry_delay(&error, attempt) {
                Some(delay) => {
                    tracing::info!(attempt, elapsed_ms, status, %error, retry_in_ms = delay.as_millis() as u64, "token fetch failed, retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                None => {
                    tracing::warn!(attempt, elapsed_ms, status, %error, "token fetch failed");
                    return Err(error);
                }
            }
        }
    }

    /// How long to wait before the next attempt, or `None` if there is to be none.
    fn retry_delay(&self, error: &TokenError, attempt: u32) -> Option<Duration> {
        if !error.is_transient() || attempt >= self.max_attempts {
            return None;
        }
        let (first, max) = self.backoff;
        let exponential = crate::backoff::exponential(first, attempt, max);
        // "Equal jitter": half fixed, half random, so clients that failed together spread out.
        let half = exponential / 2;
        let jittered = half + half.mul_f64(fastrand::f64());
        match error.retry_after() {
            // The server asked for a longer pause than this fetch may take: give up, and let
            // the cache's cool-down space the next fetch.
            Some(asked) if asked > max => None,
            Some(asked) => Some(asked.max(jittered)),
            None => Some(jittered),
        }
    }

    async fn attempt(&self) -> Result<AccessToken, TokenError> {
        let mut request = Request::new(Full::new(self.form.clone()));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = self.token_url.clone();
        let headers = request.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        if let Some(basic) = &self.basic {
            headers.insert(AUTHORIZATION, basic.clone());
        }

        let response = self
            .client
            .clone()
            .oneshot(request)
            .await
            .map_err(TokenError::transport)?;
        let (parts, body) = response.into_parts();
        let declared = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|length| length > MAX_BODY as u64) {
            return Err(TokenError::body_too_large(parts.status));
        }
        let body = read_capped(body, parts.status).await?;
        let options = ParseOptions {
            default_lifetime: self.default_lifetime,
            echoes: &self.echoes,
        };
        response::parse(parts.status, &parts.headers, &body, &options)
    }
}

/// Reads a response body of at most [`MAX_BODY`] bytes.
async fn read_capped(
    mut body: UnsyncBoxBody<Bytes, BoxError>,
    status: http::StatusCode,
) -> Result<Vec<u8>, TokenError> {
    let mut read = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map_err(TokenError::transport)?.into_data() {
            if read.len() + data.len() > MAX_BODY {
                return Err(TokenError::body_too_large(status));
            }
            read.extend_from_slice(&data);
        }
    }
    Ok(read)
}

const USER_AGENT_VALUE: &str = concat!("blaze-auth/", env!("CARGO_PKG_VERSION"));

// The defaults, stated in the docs of the builder methods that change them.
/// Lifetime of a token whose response has no `expires_in`: Blaze's.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_ATTEMPTS: u32 = 3;
const DEFAULT_BACKOFF: Duration = Duration::from_millis(250);
const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(4);

/// Configures a [`ClientCredentials`]; made by [`ClientCredentials::builder`] and the Blaze
/// presets.
pub struct ClientCredentialsBuilder {
    token_url: String,
    client_id: String,
    secret: ClientSecret,
    scope: Option<String>,
    auth: ClientAuth,
    params: Vec<(String, String)>,
    allow_http: bool,
    default_lifetime: Duration,
    connect_timeout: Duration,
    request_timeout: Duration,
    max_attempts: u32,
    backoff: (Duration, Duration),
    client: Option<HttpClient>,
    #[cfg(feature = "rustls")]
    tls: https::TlsConfig,
}

impl ClientCredentialsBuilder {
    /// Sets the scope requested. Default: none for [`ClientCredentials::builder`], `full`
    /// for the Blaze presets.
    pub fn scope(mut self, scope: &str) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// Sets how the client authenticates. Default: [`ClientAuth::Post`].
    pub fn auth(mut self, auth: ClientAuth) -> Self {
        self.auth = auth;
        self
    }

    /// Adds a form parameter to every token request, e.g. `audience`. Default: none.
    ///
    /// The parameters the client sets itself are refused by [`build`](Self::build)
    /// ([`Error::is_config`]), in any case, rather than sent twice (RFC 6749 section
    /// 3.1 forbids it) or silently replaced: `grant_type` (always `client_credentials`),
    /// `scope` (use [`scope`](Self::scope)), `client_id` and `client_secret` (given to the
    /// constructor; [`auth`](Self::auth) says where they go).
    pub fn param(mut self, name: &str, value: &str) -> Self {
        self.params.push((name.into(), value.into()));
        self
    }

    /// Allows a plain `http://` token URL to a host that is not loopback. The client secret
    /// then crosses the network in clear text. Default: `false`; loopback hosts
    /// (`127.0.0.0/8`, `::1`, `localhost`) are always allowed.
    pub fn allow_http(mut self, allow: bool) -> Self {
        self.allow_http = allow;
        self
    }

    /// Sets the lifetime of a token whose response has no `expires_in`, or one of 0 or less
    /// (which says nothing usable: taken at its word, such a token would be fetched again
    /// for every request). Default: one hour, as Blaze's tokens live.
    pub fn default_lifetime(mut self, lifetime: Duration) -> Self {
        self.default_lifetime = lifetime;
        self
    }

    /// Sets the timeout for opening a connection (TCP and TLS) of the built-in client.
    /// Default: 5 s. A client given to
    /// [`http_client`](Self::http_client) keeps its own.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the timeout of one token request, connection and body included. Default: 10 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets how many requests one fetch may make, the first included. Default: 3.
    ///
    /// Between attempts it waits 250 ms, then 500 ms, doubling up to 4 s, each with
    /// jitter (half fixed, half random), or as long as `Retry-After` asks if that is longer;
    /// a `Retry-After` beyond 4 s ends the fetch, and the layer's cool-down then lasts as
    /// long as it asks, up to 5 minutes (see
    /// [`fetch_cooldown`](crate::BlazeAuthLayerBuilder::fetch_cooldown)). With the defaults
    /// a fetch takes at most about 31 s, inside the layer's 60 s refresh margin.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Sets the first and the longest wait between attempts. Default: 250 ms and 4 s.
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.backoff = (first, max.max(first));
        self
    }

    /// Sends token requests through `client` instead of the built-in HTTPS client: to share
    /// a connection pool, go through a proxy, use custom TLS, or test.
    ///
    /// The timeouts, retries and response checks still apply; the connect timeout is the
    /// client's own.
    pub fn http_client<S, B>(mut self, client: S) -> Self
    where
        S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let client = client
            .map_response(|response: Response<B>| {
                response.map(|body| body.map_err(Into::into).boxed_unsync())
            })
            .map_err(Into::into);
        self.client = Some(BoxCloneSyncService::new(client));
        self
    }

    /// Checks the settings and builds the source.
    ///
    /// # Errors
    ///
    /// [`Error::is_config`]: if the token URL is not an absolute `http(s)` URL or carries user
    /// info, is plain `http` to a host that is not loopback, if a [`param`](Self::param) is one
    /// the client sets itself, if TLS cannot be set up, or if no HTTP client was given and the
    /// `rustls` feature is off.
    pub fn build(self) -> Result<ClientCredentials, Error> {
        let token_url = checked_url(&self.token_url, self.allow_http)?;
        for (name, _) in &self.params {
            check_param(name)?;
        }
        let endpoint = format!(
            "{}://{}{}",
            token_url.scheme_str().unwrap_or_default(),
            token_url
                .authority()
                .map(|a| a.as_str())
                .unwrap_or_default(),
            token_url.path()
        );
        let client = match self.client {
            Some(client) => client,
            #[cfg(feature = "rustls")]
            None => https::client(&self.tls, self.connect_timeout)?,
            #[cfg(not(feature = "rustls"))]
            None => return Err(Error::no_http_client()),
        };

        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials");
        let basic = match self.auth {
            ClientAuth::Post => {
                form.append_pair("client_id", &self.client_id);
                // A public client has no secret, and sends none (RFC 6749 section 2.3.1).
                if !self.secret.secret().is_empty() {
                    form.append_pair("client_secret", self.secret.secret());
                }
                None
            }
            ClientAuth::Basic => Some(basic_header(&self.client_id, &self.secret)?),
        };
        if let Some(scope) = &self.scope {
            form.append_pair("scope", scope);
        }
        for (name, value) in &self.params {
            form.append_pair(name, value);
        }

        let echoes = Echoes::new(self.secret.secret());
        Ok(ClientCredentials {
            inner: Arc::new(Inner {
                client,
                token_url,
                endpoint: endpoint.into(),
                client_id: self.client_id.into(),
                secret: self.secret,
                scope: self.scope.map(Into::into),
                params: self
                    .params
                    .into_iter()
                    .map(|(name, value)| (name.into(), value.into()))
                    .collect(),
                form: Bytes::from(form.finish()),
                basic,
                echoes,
                default_lifetime: self.default_lifetime,
                request_timeout: self.request_timeout,
                max_attempts: self.max_attempts,
                backoff: self.backoff,
            }),
        })
    }
}

impl fmt::Debug for ClientCredentialsBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentialsBuilder")
            .field("client_id", &self.client_id)
            .field("secret", &self.secret)
            .field("scope", &self.scope)
            .field("auth", &self.auth)
            .field("allow_http", &self.allow_http)
            .finish_non_exhaustive()
    }
}

/// Parses a URL the crate will send credentials to: absolute `http(s)`, no user info, and
/// plain `http` only to loopback hosts unless `allow_http`.
pub(crate) fn checked_url(url: &str, allow_http: bool) -> Result<Uri, Error> {
    let uri: Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| Error::invalid_url(Some(e.into())))?;
    let authority = uri.authority().ok_or_else(|| Error::invalid_url(None))?;
    if authority.as_str().contains('@') {
        return Err(Error::invalid_url(None));
    }
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if allow_http || crate::scope::is_loopback(authority.host()) => Ok(uri),
        Some("http") => Err(Error::insecure_url()),
        _ => Err(Error::invalid_url(None)),
    }
}

/// Refuses a form parameter the client sets itself, naming what sets it instead.
fn check_param(name: &str) -> Result<(), Error> {
    const RESERVED: [(&str, &str); 4] = [
        ("grant_type", "always client_credentials"),
        ("scope", "use ClientCredentialsBuilder::scope"),
        ("client_id", "given to the constructor"),
        ("client_secret", "given to the constructor"),
    ];
    match RESERVED
        .iter()
        .find(|(reserved, _)| reserved.eq_ignore_ascii_case(name))
    {
        Some(&(reserved, instead)) => Err(Error::reserved_param(reserved, instead)),
        None => Ok(()),
    }
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))`, as RFC 6749 section 2.3.1 says.
fn basic_header(client_id: &str, secret: &ClientSecret) -> Result<HeaderValue, Error> {
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let credentials = format!("{}:{}", encode(client_id), encode(secret.secret()));
    let value = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    );
    let mut header = HeaderValue::try_from(value).map_err(|_| Error::invalid_token())?;
    header.set_sensitive(true);
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_https_unless_loopback_or_allowed() {
        for ok in [
            "https://apigateway.apps.stageapi.mskcc.org/msk-apim/external/msk-oidc/oauth2/token",
            "http://127.0.0.1:8080/token",
            "http://127.8.9.10/token",
            "http://[::1]:9000/token",
            "http://localhost/token",
        ] {
            assert!(checked_url(ok, false).is_ok(), "{ok}");
        }
        for insecure in [
            "http://blaze.example/token",
            "http://10.0.0.1/token",
            "http://localhost.evil.com/t",
        ] {
            let error = checked_url(insecure, false).unwrap_err();
            assert!(error.is_config(), "{insecure}");
            assert_eq!(
                error.to_string(),
                "plain http is allowed for loopback hosts only"
            );
            assert!(checked_url(insecure, true).is_ok());
        }
        for invalid in [
            "/token",
            "ftp://h/token",
            "not a url",
            "https://user:pass@h/token",
            "",
        ] {
            let error = checked_url(invalid, true).unwrap_err();
            assert!(error.is_config(), "{invalid}");
            assert_eq!(error.to_string(), "invalid URL", "{invalid}");
        }
    }

    #[tokio::test]
    async fn a_public_client_sends_no_client_secret() {
        let forms = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = Arc::clone(&forms);
        let client = tower::service_fn(move |request: Request<Full<Bytes>>| {
            let record = Arc::clone(&record);
            async move {
                let body = request.into_body().collect().await?.to_bytes();
                record
                    .lock()
                    .unwrap()
                    .push(String::from_utf8(body.to_vec())?);
                let token = Bytes::from_static(br#"{"access_token":"t","token_type":"Bearer"}"#);
                Ok::<_, BoxError>(Response::new(Full::new(token)))
            }
        });
        let source = ClientCredentials::builder("https://h/token", "id", "")
            .scope("s")
            .param("audience", "a")
            .http_client(client)
            .build()
            .unwrap();
        source.fetch_token().await.unwrap();
        assert_eq!(
            *forms.lock().unwrap(),
            ["grant_type=client_credentials&client_id=id&scope=s&audience=a"]
        );
    }

    #[test]
    fn parameters_the_client_sets_itself_are_refused() {
        for name in ["grant_type", "scope", "client_id", "client_secret", "Scope"] {
            let error = ClientCredentials::builder("https://h/token", "id", "secret")
                .param(name, "x")
                .build()
                .unwrap_err();
            assert!(error.is_config(), "{name}: {error:?}");
            assert!(
                error.to_string().contains(&name.to_ascii_lowercase()),
                "{error}"
            );
        }
        assert!(
            ClientCredentials::builder("https://h/token", "id", "secret")
                .param("audience", "x")
                .build()
                .is_ok()
        );
    }

    #[test]
    fn basic_header_encodes_as_rfc_6749_says() {
        let header = basic_header("id:1", &ClientSecret::from("s&cr t")).unwrap();
        assert!(header.is_sensitive());
        // base64("id%3A1:s%26cr+t")
        assert_eq!(header, "Basic aWQlM0ExOnMlMjZjcit0");
    }

    #[cfg(feature = "redis")]
    #[test]
    fn shared_key_follows_every_input_and_the_secret_as_a_keyed_hash() {
        let key = |url: &str, id: &str, secret: &str, scope: &str, audience: &str| {
            ClientCredentials::builder(url, id, secret)
                .scope(scope)
                .param("audience", audience)
                .build()
                .unwrap()
                .shared_key()
        };
        let base = key("https://h/token", "id", "secret", "full", "a");
        assert_eq!(base, key("https://h/token", "id", "secret", "full", "a"));
        for other in [
            key("https://h/token", "id", "other-secret", "full", "a"),
            key("https://h/token2", "id", "secret", "full", "a"),
            key("https://h/token", "id2", "secret", "full", "a"),
            key("https://h/token", "id", "secret", "read", "a"),
            key("https://h/token", "id", "secret", "full", "b"),
        ] {
            assert_ne!(base.digest(), other.digest());
        }
        assert!(!format!("{base:?}").contains("secret"));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let builder = ClientCredentials::builder("https://h/token", "id", "the-secret")
            .auth(ClientAuth::Basic);
        let shown = format!("{builder:?}");
        let source = builder.build().unwrap();
        let shown = format!("{shown} {source:?} {:?}", ClientSecret::from("the-secret"));
        assert!(!shown.contains("the-secret"), "{shown}");
        assert!(
            !shown.contains("dGhlLXNlY3JldA"),
            "no base64 of it either: {shown}"
        );
    }
}
