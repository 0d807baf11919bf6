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
    NoHttpClient,
    InvalidKey,
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

    /// A token or token type holds bytes that cannot go into an `Authorization` header.
    pub fn is_invalid_token(&self) -> bool {
        self.kind == Kind::InvalidToken
    }

    /// A research study id is empty, has surrounding white space or a control character.
    pub fn is_invalid_study(&self) -> bool {
        self.kind == Kind::InvalidStudy
    }

    /// A header given to the layer has an invalid name or value, or is one the layer owns.
    pub fn is_invalid_header(&self) -> bool {
        self.kind == Kind::InvalidHeader
    }

    /// A URL is not an absolute `http` or `https` URL, or carries user info; or an origin
    /// given to the layer has no scheme or host.
    pub fn is_invalid_url(&self) -> bool {
        self.kind == Kind::InvalidUrl
    }

    /// A URL is plain `http` to a host that is not loopback, and plain `http` was not
    /// explicitly allowed.
    pub fn is_insecure_url(&self) -> bool {
        self.kind == Kind::InsecureUrl
    }

    /// TLS could not be set up (no usable root certificates, an invalid certificate given).
    pub fn is_tls(&self) -> bool {
        self.kind == Kind::Tls
    }

    /// No HTTP client was given for the token request, and the `rustls` feature that
    /// provides one is off.
    pub fn is_no_http_client(&self) -> bool {
        self.kind == Kind::NoHttpClient
    }

    /// An encryption key for tokens kept in Redis is not 32 bytes in standard base64.
    pub fn is_invalid_key(&self) -> bool {
        self.kind == Kind::InvalidKey
    }

    /// A form parameter given to [`ClientCredentialsBuilder::param`] is one the client sets
    /// itself (`grant_type`, `scope`, `client_id`, `client_secret`, in any case): RFC 6749
    /// forbids sending a parameter twice. The message names it and the method that sets it.
    ///
    #[cfg_attr(
        feature = "oauth2",
        doc = "[`ClientCredentialsBuilder::param`]: crate::token::oauth2::ClientCredentialsBuilder::param"
    )]
    #[cfg_attr(
        not(feature = "oauth2"),
        doc = "[`ClientCredentialsBuilder::param`]: crate#feature-flags"
    )]
    pub fn is_reserved_param(&self) -> bool {
        matches!(self.kind, Kind::ReservedParam { .. })
    }

    /// A required `BLAZE_*` environment variable is not set, or is not valid unicode; the
    /// message names it.
    pub fn is_env(&self) -> bool {
        matches!(self.kind, Kind::Env { .. })
    }
}

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
    fn display_is_short_and_lowercase() {
        let error = Error::inner("boom");
        assert_eq!(error.to_string(), "inner service failed");
        assert_eq!(error.source().unwrap().to_string(), "boom");
    }
}
