//! [`BlazeAuthLayer`] and its [`BlazeAuthLayerBuilder`].

use crate::{
    error::{BoxError, Error},
    metrics::Metrics,
    replay::CloneBody,
    service::BlazeAuth,
    study::ResearchStudy,
    token::{
        TokenSource,
        cache::{CacheConfig, TokenCache},
    },
};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Uri, header::AUTHORIZATION, request::Parts,
};
use std::{fmt, sync::Arc, time::Duration};
use tower::Layer;

// The defaults, stated in the docs of the builder methods that change them.
pub(crate) const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(60);
pub(crate) const DEFAULT_FETCH_COOLDOWN: Duration = Duration::from_secs(1);
pub(crate) const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(60);
pub(crate) const DEFAULT_STORM_WINDOW: Duration = Duration::from_secs(30);

/// A [`Layer`] that authenticates every request for the Blaze FHIR API.
///
/// It wraps a service in [`BlazeAuth`], which adds `Authorization: Bearer <token>`, the
/// `researchstudy` query parameter and any fixed headers to each request, and on a 401 fetches
/// a new token and sends the request once more. All services made from one layer, and all
/// their clones, share one token cache. See the [crate docs](crate) for examples.
#[derive(Clone, Debug)]
pub struct BlazeAuthLayer<R = CloneBody> {
    config: Arc<Config>,
    replay: R,
}

/// What a layer adds to requests, and the cache its tokens come from.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) cache: Arc<TokenCache>,
    /// The origins credentials go to; empty: every origin.
    origins: Vec<Origin>,
    study: Option<ResearchStudy>,
    headers: HeaderMap,
    idempotent_only: bool,
}

impl BlazeAuthLayer {
    /// A layer that takes tokens from `source` and sends requests for research study `study`.
    ///
    /// # Panics
    ///
    /// If `study` is not a valid study id (see [`ResearchStudy::new`]): it is configuration,
    /// so a mistake is caught at start-up. Use [`builder`](Self::builder) to get an error
    /// instead.
    pub fn new(source: impl TokenSource + 'static, study: &str) -> Self {
        match Self::builder(source).study(study).build() {
            Ok(layer) => layer,
            Err(error) => panic!("BlazeAuthLayer::new: {error}"),
        }
    }

    /// A [`BlazeAuthLayerBuilder`] for a layer that takes tokens from `source`.
    pub fn builder(source: impl TokenSource + 'static) -> BlazeAuthLayerBuilder {
        BlazeAuthLayerBuilder {
            source: Box::new(source),
            study: None,
            origins: Vec::new(),
            headers: HeaderMap::new(),
            error: None,
            cache: CacheConfig {
                refresh_margin: DEFAULT_REFRESH_MARGIN,
                refresh_jitter: Duration::ZERO,
                fetch_cooldown: DEFAULT_FETCH_COOLDOWN,
                fetch_timeout: DEFAULT_FETCH_TIMEOUT,
                storm_window: DEFAULT_STORM_WINDOW,
            },
            idempotent_only: false,
        }
    }
}

impl<R> BlazeAuthLayer<R> {
    /// What the token cache has done so far: fetches, failures, retries, storm-guard skips,
    /// and the current token's age and lifetime. Shared by every service made from this
    /// layer.
    pub fn metrics(&self) -> Metrics {
        self.config.cache.metrics()
    }

    /// Sets how request bodies are kept for the retry after a 401 (see [`crate::replay`]).
    /// Default: [`CloneBody`], which clones them. The one place to set it, for a layer made
    /// by [`new`](Self::new) or by a builder alike.
    pub fn replay<R2>(self, replay: R2) -> BlazeAuthLayer<R2> {
        BlazeAuthLayer {
            config: self.config,
            replay,
        }
    }
}

impl<S, R: Clone> Layer<S> for BlazeAuthLayer<R> {
    type Service = BlazeAuth<S, R>;

    fn layer(&self, inner: S) -> Self::Service {
        BlazeAuth::from_parts(inner, Arc::clone(&self.config), self.replay.clone())
    }
}

/// Scheme, host and port, the port made explicit.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: Box<str>,
    host: Box<str>,
    port: u16,
}

impl Origin {
    fn of(uri: &Uri) -> Option<Self> {
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let port = uri.port_u16().or(match scheme.as_str() {
            "https" => Some(443),
            "http" => Some(80),
            _ => None,
        })?;
        Some(Self {
            host: uri.host()?.to_ascii_lowercase().into(),
            scheme: scheme.into(),
            port,
        })
    }
}

impl Config {
    /// Whether requests to `uri` get credentials: relative URIs do (the inner service picks
    /// their origin, as a tonic channel does); absolute ones only to a configured origin.
    pub(crate) fn authenticates(&self, uri: &Uri) -> bool {
        if self.origins.is_empty() || uri.scheme().is_none() {
            return true;
        }
        Origin::of(uri).is_some_and(|origin| self.origins.contains(&origin))
    }

    /// Whether a request with this method may be sent a second time.
    pub(crate) fn may_retry(&self, method: &Method) -> bool {
        !self.idempotent_only || method.is_idempotent()
    }

    /// Adds the study and the fixed headers to a request head. The token comes later.
    pub(crate) fn prepare(&self, parts: &mut Parts) -> Result<(), Error> {
        let study = parts
            .extensions
            .get::<ResearchStudy>()
            .or(self.study.as_ref())
            .ok_or_else(Error::missing_study)?;
        parts.uri = study.add_to(std::mem::take(&mut parts.uri))?;
        for (name, value) in &self.headers {
            parts.headers.insert(name, value.clone());
        }
        Ok(())
    }
}

/// Configures a [`BlazeAuthLayer`]; made by [`BlazeAuthLayer::builder`].
///
/// Invalid values are reported by [`build`](BlazeAuthLayerBuilder::build), so a layer that
/// exists is one
/// that can authenticate every request.
///
/// ```
/// use blaze_auth::{AccessToken, BlazeAuthLayer, StaticToken};
/// use std::time::Duration;
///
/// let source = StaticToken::new(AccessToken::bearer("t")?);
/// let layer = BlazeAuthLayer::builder(source)
///     .study("FHIR-T")
///     .partner_id("partner-42")
///     .refresh_margin(Duration::from_secs(120))
///     .retry_idempotent_only(true)
///     .build()?;
/// # let _ = layer;
/// # Ok::<_, blaze_auth::Error>(())
/// ```
pub struct BlazeAuthLayerBuilder {
    source: Box<dyn TokenSource>,
    study: Option<Result<ResearchStudy, Error>>,
    origins: Vec<Origin>,
    headers: HeaderMap,
    error: Option<Error>,
    cache: CacheConfig,
    idempotent_only: bool,
}

impl BlazeAuthLayerBuilder {
    /// Sets the research study sent with every request that does not name its own through a
    /// [`ResearchStudy`] extension. Default: none, and such a request fails with
    /// [`Error::is_missing_study`].
    pub fn study(mut self, id: &str) -> Self {
        self.study = Some(ResearchStudy::new(id));
        self
    }

    /// Adds an origin (scheme, host and port of `url`; its path is ignored) that requests
    /// get credentials for. Default: none, and every request gets them.
    ///
    /// Once one is set, a request whose absolute URI has another origin passes through
    /// untouched: no token, no `researchstudy`, no fixed headers. That keeps credentials
    /// from following a redirect to another host (put this layer inside tower-http's
    /// `FollowRedirectLayer`, so that it sees every hop) and makes the layer safe on a client
    /// shared with other APIs. Requests with a relative URI (as a tonic channel sends them)
    /// are always authenticated: the inner service decides where they go.
    /// [`BlazeEnv::layer`](crate::BlazeEnv::layer) sets `BLAZE_BASE_URL`'s origin.
    pub fn origin(mut self, url: &str) -> Self {
        match url.parse::<Uri>().ok().as_ref().and_then(Origin::of) {
            Some(origin) => {
                self.origins.push(origin);
                self
            }
            None => self.fail(Error::invalid_url(None)),
        }
    }

    /// Sets Blaze v2's `x-partnerid` header, sent with every request. Default: not sent.
    pub fn partner_id(self, partner_id: &str) -> Self {
        self.header(HeaderName::from_static("x-partnerid"), partner_id)
    }

    /// Adds a header sent with every request, replacing one of the same name the request
    /// has. The value is marked [sensitive](HeaderValue::set_sensitive). Default: none.
    ///
    /// `Authorization` is the token's, and not accepted here.
    pub fn header<K, V>(mut self, name: K, value: V) -> Self
    where
        K: TryInto<HeaderName>,
        K::Error: Into<BoxError>,
        V: TryInto<HeaderValue>,
        V::Error: Into<BoxError>,
    {
        let header = name
            .try_into()
            .map_err(Into::into)
            .and_then(|name| Ok((name, value.try_into().map_err(Into::into)?)));
        match header {
            Ok((name, _)) if name == AUTHORIZATION => self.fail(Error::invalid_header(None)),
            Ok((name, mut value)) => {
                value.set_sensitive(true);
                self.headers.insert(name, value);
                self
            }
            Err(error) => self.fail(Error::invalid_header(Some(error))),
        }
    }

    /// Sets how long before a token expires it is refreshed.
    ///
    /// From then on, the first request starts a fetch in the background, and requests keep
    /// using the cached token until the new one arrives or the old one expires. The margin
    /// is capped at half the token's lifetime, so short-lived tokens are not refreshed on
    /// every request. Zero means no refresh before expiry.
    ///
    /// Default: 60 s. Blaze tokens live an hour, so this costs
    /// under 2 % more token fetches, and leaves a slow token endpoint (with its retries) a
    /// minute to answer before any request has to wait.
    pub fn refresh_margin(mut self, margin: Duration) -> Self {
        self.cache.refresh_margin = margin;
        self
    }

    /// Sets how long after a failed token fetch the next one may start.
    ///
    /// Until then, requests that have no valid token fail at once with the last fetch's
    /// error, so an outage of the token endpoint is not made worse by every request
    /// hammering it; a token that is still valid stays in use meanwhile. The cool-down
    /// doubles with each failure in a row, up to 30 s (or this value, if longer), and
    /// resets with the next token.
    ///
    /// Default: 1 s.
    pub fn fetch_cooldown(mut self, cooldown: Duration) -> Self {
        self.cache.fetch_cooldown = cooldown;
        self
    }

    /// Adds a random extra margin, between zero and `jitter`, to each token's refresh time,
    /// so that many clients that got their tokens together do not all refresh together.
    /// The margin with its jitter stays capped at half the token's lifetime. Default: zero.
    pub fn refresh_jitter(mut self, jitter: Duration) -> Self {
        self.cache.refresh_jitter = jitter;
        self
    }

    /// Sets the longest one token fetch may take, whatever the source does; a fetch that
    /// takes longer fails every request waiting for it. The limit belongs to the fetch, not
    /// to a caller: a request that gives up neither shortens nor cancels it.
    ///
    /// Default: 60 s: [`ClientCredentials`](crate::ClientCredentials)
    /// with its defaults gives up within about 31 s by itself.
    pub fn fetch_timeout(mut self, timeout: Duration) -> Self {
        self.cache.fetch_timeout = timeout;
        self
    }

    /// Sets the storm guard's window.
    ///
    /// The first 401 on a token makes the layer fetch a new one and retry. If a token fetched
    /// that way is refused too within this window, before the server accepted it for any
    /// request, a new token is evidently not what the server wants (Blaze answers 401 to a wrong `x-partnerid` as well): until the window
    /// ends, 401s on that token go to their callers without another fetch, so a
    /// misconfiguration cannot make every request hit the token endpoint. Zero turns the
    /// guard off.
    ///
    /// Default: 30 s.
    pub fn storm_window(mut self, window: Duration) -> Self {
        self.cache.storm_window = window;
        self
    }

    /// Sets whether only requests with an idempotent method (GET, HEAD, PUT, DELETE,
    /// OPTIONS, TRACE) are retried after a 401. Default: `false`, every method is: Blaze has
    /// not acted on a request it answered 401.
    pub fn retry_idempotent_only(mut self, idempotent_only: bool) -> Self {
        self.idempotent_only = idempotent_only;
        self
    }

    /// Builds the layer.
    ///
    /// # Errors
    ///
    /// An invalid value given ([`Error::is_config`]): a header or an origin (the first of
    /// those), or else the study id.
    pub fn build(self) -> Result<BlazeAuthLayer, Error> {
        if let Some(error) = self.error {
            return Err(error);
        }
        let study = self.study.transpose()?;
        let config = Config {
            cache: Arc::new(TokenCache::new(self.source, self.cache)),
            origins: self.origins,
            study,
            headers: self.headers,
            idempotent_only: self.idempotent_only,
        };
        Ok(BlazeAuthLayer {
            config: Arc::new(config),
            replay: CloneBody,
        })
    }

    fn fail(mut self, error: Error) -> Self {
        self.error.get_or_insert(error);
        self
    }
}

// By hand: the token source need not be `Debug`.
impl fmt::Debug for BlazeAuthLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlazeAuthLayerBuilder")
            .field("study", &self.study)
            .field("headers", &self.headers)
            .field("cache", &self.cache)
            .field("idempotent_only", &self.idempotent_only)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_helpers::{TestSource, sent_token};
    use http::{Request, Response, StatusCode};
    use std::convert::Infallible;
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    #[test]
    fn invalid_configuration_is_rejected_when_the_layer_is_built() {
        let build = |study: &str, name: &str, value: &str| {
            BlazeAuthLayer::builder(TestSource::new())
                .study(study)
                .header(name, value)
                .build()
                .map(drop)
        };
        // Each a configuration error, and the message says which value is wrong.
        let error = |study, name, value| {
            let error = build(study, name, value).unwrap_err();
            assert!(error.is_config(), "{error:?}");
            error.to_string()
        };
        assert_eq!(error("", "x-partnerid", "p"), "invalid research study id");
        assert_eq!(error("S", "bad name", "p"), "invalid header for the layer");
        assert_eq!(
            error("S", "x-partnerid", "a\nb"),
            "invalid header for the layer"
        );
        assert_eq!(
            error("S", "authorization", "x"),
            "invalid header for the layer"
        );
        assert!(build("S", "x-partnerid", "p").is_ok());
    }

    #[test]
    #[should_panic(expected = "invalid research study id")]
    fn new_panics_on_an_invalid_study() {
        BlazeAuthLayer::new(TestSource::new(), "FHIR-T\n");
    }

    #[tokio::test]
    async fn credentials_go_only_to_the_configured_origin() {
        let layer = BlazeAuthLayer::builder(TestSource::new())
            .study("S")
            .partner_id("p")
            .origin("https://blaze.example")
            .build()
            .unwrap();
        let client = layer.layer(service_fn(|request: Request<String>| async move {
            Ok::<_, Infallible>(Response::new(request))
        }));
        let seen = |uri: &'static str| {
            let client = client.clone();
            async move {
                let request = Request::get(uri).body(String::new()).unwrap();
                client.oneshot(request).await.unwrap().into_body()
            }
        };
        for ours in [
            "https://blaze.example/api/Patient",
            "https://BLAZE.example:443/api/Patient",
            "/api/Patient",
        ] {
            let request = seen(ours).await;
            assert_eq!(sent_token(&request), "token-1", "{ours}");
            assert!(request.uri().query().unwrap().contains("researchstudy=S"));
        }
        for foreign in [
            "https://evil.example/api/Patient",
            "http://blaze.example/api/Patient",
            "https://blaze.example:8443/api/Patient",
            "https://blaze.example.evil.example/api/Patient",
        ] {
            let request = seen(foreign).await;
            assert_eq!(request.uri(), foreign, "untouched");
            assert!(
                request.headers().is_empty(),
                "{foreign}: {:?}",
                request.headers()
            );
        }
    }

    #[tokio::test]
    async fn a_redirect_to_another_origin_carries_no_credentials() {
        use tower_http::follow_redirect::FollowRedirectLayer;
        let hops = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = Arc::clone(&hops);
        let servers = service_fn(move |request: Request<String>| {
            let auth = request.headers().get(AUTHORIZATION).cloned();
            let partner = request.headers().get("x-partnerid").cloned();
            record
                .lock()
                .unwrap()
                .push((request.uri().to_string(), auth, partner));
            let redirect = request.uri().host() == Some("blaze.example");
            async move {
                let mut response = Response::new(String::new());
                if redirect {
                    *response.status_mut() = StatusCode::FOUND;
                    response.headers_mut().insert(
                        "location",
                        HeaderValue::from_static("https://elsewhere.example/x?y=1"),
                    );
                }
                Ok::<_, Infallible>(response)
            }
        });
        let layer = BlazeAuthLayer::builder(TestSource::new())
            .study("S")
            .partner_id("p")
            .origin("https://blaze.example")
            .build()
            .unwrap();
        let client = ServiceBuilder::new()
            .layer(FollowRedirectLayer::new())
            .layer(layer)
            .service(servers);
        let request = Request::get("https://blaze.example/api/Patient")
            .body(String::new())
            .unwrap();
        assert_eq!(
            client.oneshot(request).await.unwrap().status(),
            StatusCode::OK
        );
        let hops = hops.lock().unwrap();
        assert_eq!(hops.len(), 2);
        assert_eq!(
            hops[0].0,
            "https://blaze.example/api/Patient?researchstudy=S"
        );
        assert!(hops[0].1.is_some() && hops[0].2.is_some());
        assert_eq!(
            hops[1],
            ("https://elsewhere.example/x?y=1".to_owned(), None, None)
        );
    }

    #[test]
    fn an_origin_without_scheme_or_host_is_rejected() {
        for bad in ["blaze.example", "/path", "not a url", "ftp:/x"] {
            let error = BlazeAuthLayer::builder(TestSource::new())
                .origin(bad)
                .build()
                .unwrap_err();
            assert!(error.is_config(), "{bad}");
        }
    }
}
