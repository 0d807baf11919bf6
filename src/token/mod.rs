//! Access tokens and where they come from.
//!
//! A [`TokenSource`] fetches an [`AccessToken`]; the layer caches it, shares one fetch among
//! all the requests that need a new token, refreshes it shortly before it expires and after a
//! 401. A source therefore only has to answer "give me a token", and never caches by itself.
//!
//! Built-in sources: [`StaticToken`] (a fixed token) and [`token_fn`] (an async closure).
//!
//! # Example
//!
//! ```
//! use blaze_auth::{AccessToken, token_fn};
//! use std::time::Duration;
//!
//! // A source that asks some other component for a token.
//! let source = token_fn(|rejected: Option<AccessToken>| async move {
//!     // `rejected` is the token the server just refused, if that is why we are asked.
//!     assert!(rejected.is_none());
//!     let token = AccessToken::bearer("fetched-elsewhere")?
//!         .with_expires_in(Duration::from_secs(3600));
//!     Ok::<_, blaze_auth::Error>(token)
//! });
//! # let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
//! # rt.block_on(async {
//! use blaze_auth::TokenSource;
//! let token = source.fetch(None).await.unwrap();
//! assert_eq!(token.token_type(), "Bearer");
//! assert_eq!(token.secret(), "fetched-elsewhere");
//! # });
//! ```

pub(crate) mod cache;
#[cfg(feature = "oauth2")]
#[cfg_attr(docsrs, doc(cfg(feature = "oauth2")))]
pub mod oauth2;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

use crate::error::{BoxError, Error};
use http::HeaderValue;
use std::{
    error::Error as StdError,
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};
use tokio::time::Instant;

/// An OAuth 2.0 access token: the secret, its type, when it expires and its scope.
///
/// Cloning is cheap (one reference count). The secret is kept inside a ready-made
/// `Authorization` header value marked [sensitive](HeaderValue::set_sensitive), so adding it
/// to a request copies nothing. `Debug` prints `[redacted]` in place of the secret; there is no
/// `Display`.
#[derive(Clone)]
pub struct AccessToken {
    inner: Arc<TokenInner>,
}

#[derive(Clone)]
struct TokenInner {
    /// `"<token type> <secret>"`.
    header: HeaderValue,
    /// Length of the token type in `header`.
    type_len: usize,
    expires_at: Option<Instant>,
    scope: Option<Box<str>>,
}

impl AccessToken {
    /// A token of type `Bearer`.
    ///
    /// # Errors
    ///
    /// If `secret` is empty or has a byte other than visible ASCII (RFC 6749 `VSCHAR` without
    /// the space), e.g. a CR or LF from a hostile server. The error does not echo the secret.
    pub fn bearer(secret: &str) -> Result<Self, Error> {
        Self::new("Bearer", secret)
    }

    /// A token of the given type, as a token response's `token_type` names it.
    ///
    /// `bearer` in any case is normalised to `Bearer`.
    ///
    /// # Errors
    ///
    /// If `token_type` is not an HTTP token (RFC 9110 `tchar`s), or `secret` is empty or has a
    /// byte other than visible ASCII.
    pub fn new(token_type: &str, secret: &str) -> Result<Self, Error> {
        let token_type = if token_type.eq_ignore_ascii_case("bearer") {
            "Bearer"
        } else {
            token_type
        };
        let type_ok = !token_type.is_empty() && token_type.bytes().all(is_tchar);
        let secret_ok = !secret.is_empty() && secret.bytes().all(|b| b.is_ascii_graphic());
        if !type_ok || !secret_ok {
            return Err(Error::invalid_token());
        }
        let mut value = String::with_capacity(token_type.len() + 1 + secret.len());
        value.push_str(token_type);
        value.push(' ');
        value.push_str(secret);
        let mut header = HeaderValue::try_from(value).map_err(|_| Error::invalid_token())?;
        header.set_sensitive(true);
        Ok(Self {
            inner: Arc::new(TokenInner {
                header,
                type_len: token_type.len(),
                expires_at: None,
                scope: None,
            }),
        })
    }

    /// Sets when the token expires, on tokio's clock. Without it, the token never expires.
    pub fn with_expires_at(mut self, deadline: Instant) -> Self {
        Arc::make_mut(&mut self.inner).expires_at = Some(deadline);
        self
    }

    /// Sets the token to expire `lifetime` from now, on tokio's clock (so paused test time
    /// applies). A lifetime too large for the clock means the token never expires.
    pub fn with_expires_in(self, lifetime: Duration) -> Self {
        match Instant::now().checked_add(lifetime) {
            Some(deadline) => self.with_expires_at(deadline),
            None => self,
        }
    }

    /// Sets the scope the token was granted for.
    pub fn with_scope(mut self, scope: impl Into<Box<str>>) -> Self {
        Arc::make_mut(&mut self.inner).scope = Some(scope.into());
        self
    }

    /// The token type, e.g. `Bearer`.
    pub fn token_type(&self) -> &str {
        &self.header_str()[..self.inner.type_len]
    }

    /// The secret itself. Whoever holds it can act as the client: never log it.
    pub fn secret(&self) -> &str {
        &self.header_str()[self.inner.type_len + 1..]
    }

    /// When the token expires, if the source said.
    pub fn expires_at(&self) -> Option<Instant> {
        self.inner.expires_at
    }

    /// The scope the token was granted for, if the source said.
    pub fn scope(&self) -> Option<&str> {
        self.inner.scope.as_deref()
    }

    /// Whether `a` and `b` are clones of one token: a pointer comparison.
    #[cfg(test)]
    pub(crate) fn ptr_eq(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.inner, &b.inner)
    }

    /// The `Authorization` header value, marked sensitive.
    pub(crate) fn header(&self) -> &HeaderValue {
        &self.inner.header
    }

    fn header_str(&self) -> &str {
        // Built from a `str` of visible ASCII in `new`, so it is always valid UTF-8.
        std::str::from_utf8(self.inner.header.as_bytes()).unwrap_or_default()
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("token_type", &self.token_type())
            .field("secret", &"[redacted]")
            .field("expires_at", &self.inner.expires_at)
            .field("scope", &self.inner.scope)
            .finish()
    }
}

/// RFC 9110 `tchar`: the bytes an auth scheme name may have.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The future a [`TokenSource`] returns: boxed, `Send` and `'static`.
///
/// A fetch happens once per token lifetime, in a task of its own so that no caller's
/// cancellation stops it; the box costs nothing next to the network round trip, and keeps
/// [`TokenSource`] object safe. Requests with a cached token never touch it.
pub struct TokenFuture {
    inner: Pin<Box<dyn Future<Output = Result<AccessToken, BoxError>> + Send>>,
}

impl TokenFuture {
    /// Wraps a future that resolves to a token.
    pub fn new<F, E>(future: F) -> Self
    where
        F: Future<Output = Result<AccessToken, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        Self {
            inner: Box::pin(async move { future.await.map_err(Into::into) }),
        }
    }

    /// A future that is immediately ready with `result`.
    pub fn ready(result: Result<AccessToken, BoxError>) -> Self {
        Self::new(std::future::ready(result))
    }
}

impl Future for TokenFuture {
    type Output = Result<AccessToken, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for TokenFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenFuture").finish_non_exhaustive()
    }
}

/// Wraps a [`TokenSource`]'s error to say that waiting will not fix it: the layer then fails
/// requests at once with it, rather than letting them wait for the next fetch attempt (see
/// [`BlazeAuthLayerBuilder::max_token_wait`](crate::BlazeAuthLayerBuilder::max_token_wait)).
///
/// It is transparent: `Display` and [`source`](StdError::source) are the wrapped error's.
/// Fetches are still tried again after each cool-down, so the source recovers by itself
/// once the cause is fixed.
///
/// ```
/// use blaze_auth::{AccessToken, BoxError, PermanentError, token_fn};
///
/// let source = token_fn(|_rejected: Option<AccessToken>| async move {
///     let configured: Option<&str> = None; // a credential the deployment forgot
///     let Some(secret) = configured else {
///         return Err(BoxError::from(PermanentError::new("no credential configured")));
///     };
///     Ok(AccessToken::bearer(secret)?)
/// });
/// # let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// # rt.block_on(async {
/// use blaze_auth::TokenSource;
/// let error = source.fetch(None).await.unwrap_err();
/// assert!(error.is::<PermanentError>());
/// assert_eq!(error.to_string(), "no credential configured");
/// # });
/// ```
#[derive(Debug)]
pub struct PermanentError(BoxError);

impl PermanentError {
    /// Marks `error` as one that waiting will not fix.
    pub fn new(error: impl Into<BoxError>) -> Self {
        Self(error.into())
    }

    /// The wrapped error, to downcast to the source's own type. (The wrapper is transparent:
    /// its `Display` and `source` are the wrapped error's, so a walk down the `source` chain
    /// meets the wrapper in the wrapped error's place.)
    ///
    /// ```
    /// use blaze_auth::PermanentError;
    ///
    /// let error = PermanentError::new(std::io::Error::other("no credential configured"));
    /// assert!(error.get_ref().is::<std::io::Error>());
    /// ```
    pub fn get_ref(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.0
    }

    /// The wrapped error.
    pub fn into_inner(self) -> BoxError {
        self.0
    }
}

impl fmt::Display for PermanentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl StdError for PermanentError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.0.source()
    }
}

/// Where access tokens come from.
///
/// The layer calls [`fetch`](TokenSource::fetch) when it has no valid token: at the first
/// request, shortly before the cached token expires, and after the server rejected a token
/// with 401. It runs one fetch at a time, however many requests wait, so a source needs no
/// caching or locking of its own.
///
/// The trait is object safe: `Arc<dyn TokenSource>` is a `TokenSource`.
pub trait TokenSource: Send + Sync {
    /// Fetches a new token.
    ///
    /// `rejected` is the token the server just answered 401 to, when that is why a new one is
    /// needed: a source that caches tokens elsewhere (another service, a shared store) must
    /// not hand it out again.
    fn fetch(&self, rejected: Option<&AccessToken>) -> TokenFuture;
}

impl<T: TokenSource + ?Sized> TokenSource for Arc<T> {
    fn fetch(&self, rejected: Option<&AccessToken>) -> TokenFuture {
        (**self).fetch(rejected)
    }
}

impl<T: TokenSource + ?Sized> TokenSource for Box<T> {
    fn fetch(&self, rejected: Option<&AccessToken>) -> TokenFuture {
        (**self).fetch(rejected)
    }
}

impl<T: TokenSource + ?Sized> TokenSource for &T {
    fn fetch(&self, rejected: Option<&AccessToken>) -> TokenFuture {
        (**self).fetch(rejected)
    }
}

/// A source that always yields the same token: for tests, and for tokens managed elsewhere.
///
/// After a 401 the layer asks again and gets the same token; the retry is then answered 401
/// too, and that response goes to the caller.
#[derive(Clone, Debug)]
pub struct StaticToken {
    token: AccessToken,
}

impl StaticToken {
    /// A source that always yields `token`.
    pub fn new(token: AccessToken) -> Self {
        Self { token }
    }
}

impl From<AccessToken> for StaticToken {
    fn from(token: AccessToken) -> Self {
        Self::new(token)
    }
}

impl TokenSource for StaticToken {
    fn fetch(&self, _rejected: Option<&AccessToken>) -> TokenFuture {
        TokenFuture::ready(Ok(self.token.clone()))
    }
}

/// Builds a [`TokenSource`] from an async closure.
///
/// The closure gets the rejected token, if a 401 is why a token is needed (see
/// [`TokenSource::fetch`]), and returns a future of `Result<AccessToken, E>`. See the
/// [module docs](crate::token) for an example.
pub fn token_fn<F, Fut, E>(f: F) -> TokenFn<F>
where
    F: Fn(Option<AccessToken>) -> Fut + Send + Sync,
    Fut: Future<Output = Result<AccessToken, E>> + Send + 'static,
    E: Into<BoxError>,
{
    TokenFn { f }
}

/// A [`TokenSource`] made from an async closure by [`token_fn`].
#[derive(Clone, Copy)]
pub struct TokenFn<F> {
    f: F,
}

impl<F, Fut, E> TokenSource for TokenFn<F>
where
    F: Fn(Option<AccessToken>) -> Fut + Send + Sync,
    Fut: Future<Output = Result<AccessToken, E>> + Send + 'static,
    E: Into<BoxError>,
{
    fn fetch(&self, rejected: Option<&AccessToken>) -> TokenFuture {
        TokenFuture::new((self.f)(rejected.cloned()))
    }
}

impl<F> fmt::Debug for TokenFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenFn")
            .field("f", &std::any::type_name::<F>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn _obj_safe(_: Arc<dyn TokenSource>) {}

    #[test]
    fn debug_redacts_the_secret() {
        let token = AccessToken::bearer("s3cr3t-t0ken")
            .unwrap()
            .with_scope("full");
        let debug = format!("{token:?} {:?}", StaticToken::new(token.clone()));
        assert!(!debug.contains("s3cr3t"), "{debug}");
        assert!(
            debug.contains("[redacted]") && debug.contains("full"),
            "{debug}"
        );
    }

    #[test]
    fn header_is_sensitive_and_carries_type_and_secret() {
        let token = AccessToken::new("bearer", "abc.def-_~+/=").unwrap();
        assert!(token.header().is_sensitive());
        assert_eq!(token.header(), "Bearer abc.def-_~+/=");
        assert_eq!(token.token_type(), "Bearer");
        assert_eq!(token.secret(), "abc.def-_~+/=");
        let dpop = AccessToken::new("DPoP", "xyz").unwrap();
        assert_eq!(dpop.header(), "DPoP xyz");
    }

    #[test]
    fn bytes_illegal_in_a_header_are_rejected() {
        for secret in ["", "a\r\nb", "a b", "a\0", "tok\u{e9}n", "a\x7f"] {
            assert!(
                AccessToken::bearer(secret).unwrap_err().is_config(),
                "{secret:?}"
            );
        }
        for token_type in ["", "Bea rer", "Bearer\n", "B\u{e9}arer"] {
            let error = AccessToken::new(token_type, "abc").unwrap_err();
            assert!(error.is_config(), "{token_type:?}");
        }
    }

    #[test]
    fn error_does_not_echo_the_secret() {
        let error = AccessToken::bearer("leak\nme").unwrap_err();
        assert!(!format!("{error} {error:?}").contains("leak"));
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_is_a_deadline_on_tokio_clock() {
        let start = Instant::now();
        let token = AccessToken::bearer("t")
            .unwrap()
            .with_expires_in(Duration::from_secs(3600));
        assert_eq!(token.expires_at(), Some(start + Duration::from_secs(3600)));
        let forever = AccessToken::bearer("t")
            .unwrap()
            .with_expires_in(Duration::MAX);
        assert_eq!(forever.expires_at(), None);
    }

    #[test]
    fn clones_are_the_same_token_and_builders_do_not_alias() {
        let a = AccessToken::bearer("t").unwrap();
        let b = a.clone();
        assert!(AccessToken::ptr_eq(&a, &b));
        let c = b.with_scope("other");
        assert!(!AccessToken::ptr_eq(&a, &c));
        assert_eq!(a.scope(), None);
        assert!(!AccessToken::ptr_eq(&a, &AccessToken::bearer("t").unwrap()));
    }

    #[tokio::test]
    async fn token_fn_passes_the_rejected_token() {
        let source = token_fn(|rejected: Option<AccessToken>| async move {
            let next = match rejected {
                Some(old) => format!("{}-next", old.secret()),
                None => "first".to_owned(),
            };
            AccessToken::bearer(&next)
        });
        let first = source.fetch(None).await.unwrap();
        assert_eq!(first.secret(), "first");
        let second = source.fetch(Some(&first)).await.unwrap();
        assert_eq!(second.secret(), "first-next");
    }

    #[tokio::test]
    async fn forwarding_impls_reach_the_source() {
        let token = AccessToken::bearer("t").unwrap();
        let source: Arc<dyn TokenSource> = Arc::new(StaticToken::new(token.clone()));
        let by_ref = &source;
        let boxed: Box<dyn TokenSource> = Box::new(source.clone());
        for fetched in [
            source.fetch(None).await.unwrap(),
            by_ref.fetch(None).await.unwrap(),
            boxed.fetch(None).await.unwrap(),
        ] {
            assert!(AccessToken::ptr_eq(&fetched, &token));
        }
    }
}
