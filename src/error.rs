//! The crate's error type.

use std::{error::Error as StdError, fmt, sync::Arc};

/// A type-erased error, as tower stacks pass them around.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// The error type of [`BlazeAuth`](crate::BlazeAuth) and of this crate's constructors.
///
/// The kind of failure is told by the `is_*` predicates; the cause, where there is one,
/// by [`source`](StdError::source). Neither `Display` nor `Debug` ever include a token,
/// a secret or a full URL.
pub struct Error {
    kind: Kind,
    source: Option<Source>,
}

// Some kinds are made only by feature-gated code; the predicates exist with every feature set.
#[cfg_attr(
    not(all(feature = "oauth2", feature = "rustls", feature = "redis")),
    allow(dead_code)
)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Inner,
    Token,
    StudyConflict,
    MissingStudy,
    InvalidUri,
    InvalidToken,
    InvalidStudy,
    InvalidHeader,
    InvalidUrl,
    InsecureUrl,
    Tls,
    // Made only with `oauth2` and without `rustls`.
    #[cfg_attr(feature = "rustls", allow(dead_code))]
    NoHttpClient,
    InvalidKey,
    LeaseTooShort,
    ReservedParam {
        name: &'static str,
        instead: &'static str,
    },
    Env {
        var: &'static str,
        missing: bool,
    },
}

/// A cause, owned by this error or shared with the other waiters of one token fetch.
enum Source {
    Owned(BoxError),
    Shared(Arc<dyn StdError + Send + Sync>),
}

impl Error {
    fn new(kind: Kind, source: Option<Source>) -> Self {
        Self { kind, source }
    }

    pub(crate) fn inner(source: impl Into<BoxError>) -> Self {
        Self::new(Kind::Inner, Some(Source::Owned(source.into())))
    }

    pub(crate) fn token(source: Arc<dyn StdError + Send + Sync>) -> Self {
        Self::new(Kind::Token, Some(Source::Shared(source)))
    }

    pub(crate) fn study_conflict() -> Self {
        Self::new(Kind::StudyConflict, None)
    }

    pub(crate) fn missing_study() -> Self {
        Self::new(Kind::MissingStudy, None)
    }

    pub(crate) fn invalid_uri(source: Option<BoxError>) -> Self {
        Self::new(Kind::InvalidUri, source.map(Source::Owned))
    }

    pub(crate) fn invalid_token() -> Self {
        Self::new(Kind::InvalidToken, None)
    }

    pub(crate) fn invalid_study() -> Self {
        Self::new(Kind::InvalidStudy, None)
    }

    pub(crate) fn invalid_header(source: Option<BoxError>) -> Self {
        Self::new(Kind::InvalidHeader, source.map(Source::Owned))
    }

    pub(crate) fn invalid_url(source: Option<BoxError>) -> Self {
        Self::new(Kind::InvalidUrl, source.map(Source::Owned))
    }

    pub(crate) fn insecure_url() -> Self {
        Self::new(Kind::InsecureUrl, None)
    }

    #[cfg(feature = "oauth2")]
    pub(crate) fn reserved_param(name: &'static str, instead: &'static str) -> Self {
        Self::new(Kind::ReservedParam { name, instead }, None)
    }

    #[cfg(feature = "redis")]
    pub(crate) fn invalid_key() -> Self {
        Self::new(Kind::InvalidKey, None)
    }

    #[cfg(feature = "redis")]
    pub(crate) fn lease_too_short() -> Self {
        Self::new(Kind::LeaseTooShort, None)
    }

    #[cfg(feature = "rustls")]
    pub(crate) fn tls(source: impl Into<BoxError>) -> Self {
        Self::new(Kind::Tls, Some(Source::Owned(source.into())))
    }

    #[cfg(all(feature = "oauth2", not(feature = "rustls")))]
    pub(crate) fn no_http_client() -> Self {
        Self::new(Kind::NoHttpClient, None)
    }

    #[cfg(feature = "oauth2")]
    pub(crate) fn env(var: &'static str, missing: bool) -> Self {
        Self::new(Kind::Env { var, missing }, None)
    }

    /// A timeout: the token fetch took longer than the layer's
    /// [`fetch_timeout`](crate::BlazeAuthLayerBuilder::fetch_timeout) ([`FetchError::TimedOut`]), or a
    /// cause of this error says it timed out (the token endpoint, with the `oauth2` feature:
    /// [`TokenError::is_timeout`]; the inner service: tower's `Elapsed`, an I/O error of kind
    /// `TimedOut`). Check [`is_token`](Self::is_token) or [`is_inner`](Self::is_inner) for
    /// which.
    ///
    #[cfg_attr(
        feature = "oauth2",
        doc = "[`TokenError::is_timeout`]: crate::TokenError::is_timeout"
    )]
    #[cfg_attr(
        not(feature = "oauth2"),
        doc = "[`TokenError::is_timeout`]: crate#feature-flags"
    )]
    pub fn is_timeout(&self) -> bool {
        let mut cause = self.source();
        while let Some(error) = cause {
            if is_timeout_cause(error) {
                return true;
            }
            cause = error.source();
        }
        false
    }

    /// The inner service failed; [`source`](StdError::source) is its error.
    pub fn is_inner(&self) -> bool {
        self.kind == Kind::Inner
    }

    /// No access token could be obtained; [`source`](StdError::source) is the
    /// [`TokenSource`](crate::TokenSource)'s error. The request was not sent.
    pub fn is_token(&self) -> bool {
        self.kind == Kind::Token
    }

    /// The request URI already carries a `researchstudy` parameter naming another study than
    /// the one this request is for. The request was not sent.
    pub fn is_study_conflict(&self) -> bool {
        self.kind == Kind::StudyConflict
    }

    /// Neither the request (URI or [`ResearchStudy`](crate::ResearchStudy) extension) nor the
    /// layer names a research study. The request was not sent.
    pub fn is_missing_study(&self) -> bool {
        self.kind == Kind::MissingStudy
    }

    /// The request URI cannot carry a query (authority or asterisk form). The request was not sent.
    pub fn is_invalid_uri(&self) -> bool {
        self.kind == Kind::InvalidUri
    }

    /// A value given to a constructor or builder is invalid, or needed and missing: a token
    /// or token type that cannot go into an `Authorization` header, a research study id, a
    /// header or an origin given to the layer, a URL (not absolute `http` or `https`, user
    /// info, plain `http` to a host that is not loopback), TLS that cannot be set up, no HTTP
    /// client for the token request with the `rustls` feature off, a Redis encryption key, a
    /// Redis lock lease not longer than three op timeouts, a form parameter that
    /// [`ClientCredentials`] sets itself, a `BLAZE_*` environment variable. The message says
    /// which, and names the variable or parameter, never the value.
    ///
    #[cfg_attr(
        feature = "oauth2",
        doc = "[`ClientCredentials`]: crate::ClientCredentials"
    )]
    #[cfg_attr(
        not(feature = "oauth2"),
        doc = "[`ClientCredentials`]: crate#feature-flags"
    )]
    pub fn is_config(&self) -> bool {
        matches!(
            self.kind,
            Kind::InvalidToken
                | Kind::InvalidStudy
                | Kind::InvalidHeader
                | Kind::InvalidUrl
                | Kind::InsecureUrl
                | Kind::Tls
                | Kind::NoHttpClient
                | Kind::InvalidKey
                | Kind::LeaseTooShort
                | Kind::ReservedParam { .. }
                | Kind::Env { .. }
        )
    }
}

/// Whether `error`, one cause of an [`Error`], says it timed out.
fn is_timeout_cause(error: &(dyn StdError + 'static)) -> bool {
    #[cfg(feature = "oauth2")]
    if let Some(error) = error.downcast_ref::<crate::TokenError>() {
        return error.is_timeout();
    }
    if let Some(error) = error.downcast_ref::<std::io::Error>() {
        return error.kind() == std::io::ErrorKind::TimedOut;
    }
    error.downcast_ref::<FetchError>() == Some(&FetchError::TimedOut)
        || error.is::<tower::timeout::error::Elapsed>()
}

/// Why a token fetch failed, where the [`TokenSource`](crate::TokenSource) gave no error of
/// its own: the [`source`](StdError::source) of an [`Error`] for which
/// [`is_token`](Error::is_token) holds. Every request waiting for the fetch gets it.
///
/// ```
/// use blaze_auth::{AccessToken, BlazeAuthLayer, FetchError, token_fn};
/// use http::{Request, Response};
/// use std::{error::Error as _, time::Duration};
/// use tower::{Layer, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), blaze_auth::BoxError> {
/// // A source that never answers.
/// let source = token_fn(|_| std::future::pending::<Result<AccessToken, blaze_auth::Error>>());
/// let layer = BlazeAuthLayer::builder(source)
///     .study("FHIR-T")
///     .fetch_timeout(Duration::from_secs(5))
///     .build()?;
/// let client = layer.layer(service_fn(|_: Request<String>| async {
///     Ok::<_, std::convert::Infallible>(Response::new(()))
/// }));
/// let error = client.oneshot(Request::new(String::new())).await.unwrap_err();
/// assert!(error.is_token() && error.is_timeout());
/// let cause = error.source().unwrap().downcast_ref::<FetchError>();
/// assert_eq!(cause, Some(&FetchError::TimedOut));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FetchError {
    /// The fetch took longer than the layer's
    /// [`fetch_timeout`](crate::BlazeAuthLayerBuilder::fetch_timeout).
    TimedOut,
    /// The token source panicked.
    Panicked,
    /// There was no Tokio runtime to run the fetch on: the layer was called outside one.
    NoRuntime,
    /// The fetch's task was cancelled before it finished: its runtime shut down.
    Cancelled,
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TimedOut => "token fetch timed out",
            Self::Panicked => "token source panicked",
            Self::NoRuntime => "no Tokio runtime to fetch the token on",
            Self::Cancelled => "token fetch was cancelled",
        })
    }
}

impl StdError for FetchError {}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let message = match self.kind {
            Kind::Inner => "inner service failed",
            Kind::Token => "failed to obtain an access token",
            Kind::StudyConflict => "request URI names a different research study",
            Kind::MissingStudy => "no research study for this request",
            Kind::InvalidUri => "request URI cannot carry a query",
            Kind::InvalidToken => "access token is not a valid header value",
            Kind::InvalidStudy => "invalid research study id",
            Kind::InvalidHeader => "invalid header for the layer",
            Kind::InvalidUrl => "invalid URL",
            Kind::InsecureUrl => "plain http is allowed for loopback hosts only",
            Kind::Tls => "could not set up TLS",
            Kind::NoHttpClient => "no HTTP client for the token request",
            Kind::InvalidKey => "encryption key is not 32 bytes in base64",
            Kind::LeaseTooShort => "lease of the Redis lock is not longer than three op timeouts",
            Kind::ReservedParam { name, instead } => {
                return write!(f, "form parameter {name} is set by the client: {instead}");
            }
            Kind::Env { var, missing } => {
                let problem = if missing {
                    "is not set"
                } else {
                    "is not valid unicode"
                };
                return write!(f, "environment variable {var} {problem}");
            }
        };
        f.write_str(message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("blaze_auth::Error");
        debug.field("kind", &self.kind);
        if let Some(source) = self.source() {
            debug.field("source", &source);
        }
        debug.finish()
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self.source.as_ref()? {
            Source::Owned(source) => Some(&**source),
            Source::Shared(source) => Some(&**source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_is_send_sync_and_boxes() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Error>();
        let boxed: BoxError = Error::study_conflict().into();
        assert!(boxed.downcast_ref::<Error>().unwrap().is_study_conflict());
    }

    #[test]
    fn token_error_exposes_the_source_itself_for_downcasting() {
        let cause: Arc<dyn StdError + Send + Sync> = Arc::new(std::fmt::Error);
        let error = Error::token(cause);
        assert!(error.is_token());
        assert!(error.source().unwrap().is::<std::fmt::Error>());
    }

    #[test]
    fn is_timeout_finds_a_timeout_among_the_causes() {
        let elapsed = Error::inner(tower::timeout::error::Elapsed::new());
        assert!(elapsed.is_inner() && elapsed.is_timeout());
        let io = std::io::Error::new(std::io::ErrorKind::TimedOut, "slow");
        assert!(Error::inner(io).is_timeout());
        // Deeper in the chain: a cause whose own source timed out.
        let wrapped = std::io::Error::other(Error::token(Arc::new(FetchError::TimedOut)));
        assert!(Error::inner(wrapped).is_timeout());
        assert!(Error::token(Arc::new(FetchError::TimedOut)).is_timeout());
        #[cfg(feature = "oauth2")]
        assert!(Error::token(Arc::new(crate::TokenError::timeout())).is_timeout());

        assert!(!Error::token(Arc::new(FetchError::Panicked)).is_timeout());
        assert!(!Error::inner(std::io::Error::other("reset")).is_timeout());
        assert!(!Error::missing_study().is_timeout());
    }

    #[test]
    fn display_is_short_and_lowercase() {
        let error = Error::inner("boom");
        assert_eq!(error.to_string(), "inner service failed");
        assert_eq!(error.source().unwrap().to_string(), "boom");
    }
}
