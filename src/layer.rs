//! [`BlazeAuthLayer`] and its [`BlazeAuthLayerBuilder`].

use crate::{
    error::{BoxError, Error},
    metrics::Metrics,
    replay::CloneBody,
    scope::{Decision, Origin, Scope, without_user_info},
    service::BlazeAuth,
    study::ResearchStudy,
    token::{
        TokenSource,
        cache::{CacheConfig, TokenCache},
    },
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, header::AUTHORIZATION};
use std::{fmt, sync::Arc, time::Duration};
use tower::Layer;

// The defaults, stated in the docs of the builder methods that change them.
pub(crate) const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(60);
pub(crate) const DEFAULT_FETCH_COOLDOWN: Duration = Duration::from_secs(1);
pub(crate) const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(60);
pub(crate) const DEFAULT_STORM_WINDOW: Duration = Duration::from_secs(30);

/// How long a request waits through a failing token endpoint when nothing is set: see
/// [`BlazeAuthLayerBuilder::max_token_wait`].
pub(crate) const DEFAULT_MAX_TOKEN_WAIT: Duration = Duration::from_secs(5);

/// A [`Layer`] that authenticates every request for the Blaze FHIR API.
///
/// It wraps a service in [`BlazeAuth`], which adds `Authorization: Bearer <token>`, the
/// `researchstudy` query parameter and any fixed headers to each request, and on a 401 fetches
/// a new token and sends the request once more (if no new token can be had, the request ends
/// in that token error, [`Error::is_token`](crate::Error::is_token), rather than the 401).
/// All services made from one layer, and all
/// their clones, share one token cache. Only requests in its credential scope get any of
/// that: by default Blaze's gateways and loopback hosts (see [`BlazeAuthLayerBuilder::origin`]). See the
/// [crate docs](crate) for examples.
#[derive(Clone, Debug)]
pub struct BlazeAuthLayer<R = CloneBody> {
    config: Arc<Config>,
    replay: R,
}

/// What a layer adds to requests, and the cache its tokens come from.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) cache: Arc<TokenCache>,
    /// The origins credentials go to.
    scope: Scope,
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
            any_origin: false,
            allow_http: false,
            headers: HeaderMap::new(),
            error: None,
            cache: CacheConfig {
                refresh_margin: DEFAULT_REFRESH_MARGIN,
                refresh_jitter: Duration::ZERO,
                fetch_cooldown: DEFAULT_FETCH_COOLDOWN,
                fetch_timeout: DEFAULT_FETCH_TIMEOUT,
                storm_window: DEFAULT_STORM_WINDOW,
                max_token_wait: DEFAULT_MAX_TOKEN_WAIT,
            },
            idempotent_only: false,
        }
    }
}

impl<R> BlazeAuthLayer<R> {
    /// The configuration and cache every service made from this layer shares.
    #[cfg_attr(not(feature = "reqwest-middleware"), allow(dead_code))]
    pub(crate) fn config(&self) -> &Arc<Config> {
        &self.config
    }

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

impl Config {
    /// Whether requests to `uri` get credentials: relative URIs do (the inner service picks
    /// their origin, as a tonic channel does); absolute ones if their origin is in the
    /// layer's scope. An error for plain `http` to a host that is not loopback in an open
    /// scope, unless allowed.
    #[inline(always)]
    pub(crate) fn authenticates(&self, uri: &Uri) -> Result<bool, Error> {
        let decision = self.scope.decide(uri)?;
        Ok(decision == Decision::Authenticate)
    }

    /// Whether a request with this method may be sent a second time.
    pub(crate) fn may_retry(&self, method: &Method) -> bool {
        !self.idempotent_only || method.is_idempotent()
    }

    /// Adds the study and the fixed headers to a request. The token comes later.
    ///
    /// It takes the whole request, not its head: taking a request apart and putting it
    /// together again moves the head twice (a `memcpy` of some 200 bytes each time).
    // Inline: a frame of its own around `add_to`'s call cost more than its own work.
    #[inline]
    pub(crate) fn prepare<B>(&self, request: &mut Request<B>) -> Result<(), Error> {
        // A study of the request's own is cloned (a reference count, and rare), so that the
        // URI can be changed in place while the study is in hand.
        let own = request.extensions().get::<ResearchStudy>().cloned();
        let study = own
            .as_ref()
            .or(self.study.as_ref())
            .ok_or_else(Error::missing_study)?;
        study.add_to(request.uri_mut())?;
        for (name, value) in &self.headers {
            request.headers_mut().insert(name, value.clone());
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
    origins: Vec<String>,
    any_origin: bool,
    allow_http: bool,
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
    /// get credentials for.
    ///
    /// Default: Blaze's gateways ([`blaze::STAGING_URL`](crate::blaze::STAGING_URL) and
    /// [`blaze::PRODUCTION_URL`](crate::blaze::PRODUCTION_URL)) and loopback hosts
    /// (`127.0.0.0/8`, `::1`, `localhost`; any port, `http` or `https`), so that a local
    /// stand-in works unconfigured. Naming an origin *replaces* that default: once one is
    /// named, only the named origins get credentials (say `.origin(STAGING_URL)` too if
    /// you still want it). [`any_origin`](Self::any_origin) opens the scope instead.
    ///
    /// A request whose absolute URI has an origin outside the scope passes through untouched:
    /// no token, no `researchstudy`, no fixed headers, and a `tracing` DEBUG event naming the
    /// origin. It is not an error, so that the layer is safe on a client shared with other
    /// APIs and inside tower-http's `FollowRedirectLayer` (which is where it belongs: it then
    /// sees every hop, and a redirect to another host gets nothing), as tower-http's
    /// `FilterCredentials` does on redirects. Requests with a relative URI (as a tonic
    /// channel sends them) are always authenticated: the inner service decides where they
    /// go. [`BlazeEnv::layer`] names `BLAZE_BASE_URL`'s origin.
    ///
    /// A plain `http` origin on a host that is not loopback needs
    /// [`allow_http`](Self::allow_http); [`build`](Self::build) fails without it.
    ///
    /// ```
    /// use blaze_auth::{AccessToken, BlazeAuthLayer, StaticToken};
    /// use http::{Request, Response};
    /// use tower::{Layer, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), blaze_auth::BoxError> {
    /// let layer = BlazeAuthLayer::builder(StaticToken::new(AccessToken::bearer("t")?))
    ///     .study("FHIR-T")
    ///     .origin("https://blaze.example")
    ///     .build()?;
    /// // Answers whether the request it got carries a token.
    /// let client = layer.layer(service_fn(|request: Request<()>| async move {
    ///     let authorized = request.headers().contains_key("authorization");
    ///     Ok::<_, std::convert::Infallible>(Response::new(authorized))
    /// }));
    /// let sent = |uri| client.clone().oneshot(Request::get(uri).body(()).unwrap());
    /// assert!(*sent("https://blaze.example/Patient").await?.body());
    /// assert!(!*sent("https://elsewhere.example/Patient").await?.body());
    /// # Ok(())
    /// # }
    /// ```
    ///
    #[cfg_attr(
        feature = "oauth2",
        doc = "[`BlazeEnv::layer`]: crate::BlazeEnv::layer"
    )]
    #[cfg_attr(
        not(feature = "oauth2"),
        doc = "[`BlazeEnv::layer`]: crate#feature-flags"
    )]
    pub fn origin(mut self, url: &str) -> Self {
        self.origins.push(url.to_owned());
        self
    }

    /// Sends credentials to every origin: an explicit opt-in, for a client that talks to
    /// Blaze alone through an address this layer cannot know (a proxy, a tunnel). Named
    /// [`origin`](Self::origin)s then add nothing. Default: off; see `origin` for the scope.
    ///
    /// A request to plain `http` on a host that is not loopback then fails with
    /// [`Error::is_config`] (it is neither sent with the token nor silently sent
    /// without it) unless [`allow_http`](Self::allow_http) is set.
    pub fn any_origin(mut self) -> Self {
        self.any_origin = true;
        self
    }

    /// Allows credentials over plain `http` to hosts that are not loopback: the token then
    /// crosses the network in clear text. Default: `false`; loopback hosts are always
    /// allowed. It widens no scope: an `http` origin must still be named, or
    /// [`any_origin`](Self::any_origin) set.
    pub fn allow_http(mut self, allow: bool) -> Self {
        self.allow_http = allow;
        self
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
    /// Until then no fetch starts, so an outage of the token endpoint is not made worse by
    /// every request hammering it; a token that is still valid stays in use meanwhile, and
    /// requests without one wait for the attempt at the end of the cool-down or fail at once
    /// (see [`max_token_wait`](Self::max_token_wait)). The cool-down doubles with each
    /// failure in a row, up to 30 s (or this value, if longer), and resets with the next
    /// token. When the token endpoint answered with `Retry-After` (a [`TokenError`] with
    /// a `retry_after`), the cool-down lasts at least that long, up to 5 minutes. Zero: no
    /// cool-down (the endpoint's `Retry-After` included), and no request waits for a failing
    /// endpoint either.
    ///
    /// Default: 1 s.
    ///
    #[cfg_attr(feature = "oauth2", doc = "[`TokenError`]: crate::TokenError")]
    #[cfg_attr(not(feature = "oauth2"), doc = "[`TokenError`]: crate#feature-flags")]
    pub fn fetch_cooldown(mut self, cooldown: Duration) -> Self {
        self.cache.fetch_cooldown = cooldown;
        self
    }

    /// Sets how long a request without a valid token may wait through a failing token
    /// endpoint for the next fetch attempt, instead of failing at once.
    ///
    /// A request that meets a failed fetch (it arrives during the cool-down after one, or the
    /// fetch it waited for fails) waits for the attempt the cool-down allows at its end,
    /// joining it with every other waiting request: the token endpoint sees no more requests
    /// than without waiting. If that attempt fails too, it waits for the next, and so on, up
    /// to this long after it met the first failure; then it fails with the last error
    /// ([`Error::is_token`]), as it does at once if the next attempt would start after its
    /// bound. A fetch under way is bounded by [`fetch_timeout`](Self::fetch_timeout), and
    /// the caller's own cancellation (dropping the future, a timeout layer outside) ends the
    /// wait at once. The retry after a 401 needs a token too, and may wait as long again.
    /// [`Metrics::token_waits`] and [`Metrics::token_waits_given_up`] count the waits and
    /// those that gave up because of the bound.
    ///
    /// Requests still fail at once with the error when waiting will not fix it:
    /// - [`ClientCredentials`] was refused by the token endpoint:
    ///   an OAuth error such as `invalid_client`, `invalid_scope` or `unauthorized_client`,
    ///   or a 4xx status other than 408 and 429;
    /// - a TLS failure, such as a certificate that is not trusted, as `rustls` reports it
    ///   (the built-in client's, with the `rustls` feature; an HTTP client of your own that
    ///   uses another TLS stack fails transiently, and its requests wait);
    /// - any error a source marks with [`PermanentError`](crate::PermanentError);
    /// - no Tokio runtime to fetch on.
    ///
    /// (The storm guard's verdict is not an error: the 401 goes back at once, see
    /// [`storm_window`](Self::storm_window).) A malformed or oversize answer, a 5xx, a 429,
    /// a timeout or a failed connection are waited through: the next attempt may well
    /// succeed. A permanent error is still fetched again after each cool-down, so the layer
    /// recovers by itself once it is fixed.
    ///
    /// Zero: requests without a valid token fail at once with the last fetch's error until
    /// the cool-down ends. They do so too with a [`fetch_cooldown`](Self::fetch_cooldown) of
    /// zero, which leaves no attempt at the end of a cool-down to wait for: a waiting request
    /// would start a fetch after every failure, as fast as the endpoint fails.
    ///
    /// Default: 5 s. A bad answer of the token endpoint then costs the requests of one
    /// cool-down (1 s by default) a short wait, not an error. A request that meets a failure
    /// rides out the attempts 1 and 3 s later; in a longer outage only the requests that
    /// arrive in the last 5 s of a cool-down wait for the attempt at its end, and the rest
    /// fail fast instead of being held.
    ///
    #[cfg_attr(
        feature = "oauth2",
        doc = "[`ClientCredentials`]: crate::ClientCredentials"
    )]
    #[cfg_attr(
        not(feature = "oauth2"),
        doc = "[`ClientCredentials`]: crate#feature-flags"
    )]
    pub fn max_token_wait(mut self, wait: Duration) -> Self {
        self.cache.max_token_wait = wait;
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
    /// takes longer fails, and the requests waiting for it ride the failure through as
    /// any other, up to [`max_token_wait`](Self::max_token_wait) (or get the error at once,
    /// with a bound of zero). The limit belongs to the fetch, not to a caller: a request
    /// that gives up neither shortens nor cancels it.
    ///
    /// Default: 60 s: [`ClientCredentials`] with its defaults gives up within about 31 s by
    /// itself.
    ///
    #[cfg_attr(
        feature = "oauth2",
        doc = "[`ClientCredentials`]: crate::ClientCredentials"
    )]
    #[cfg_attr(
        not(feature = "oauth2"),
        doc = "[`ClientCredentials`]: crate#feature-flags"
    )]
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
    /// An invalid value given ([`Error::is_config`]): a header, or else an origin (also plain
    /// `http` to a host that is not loopback without [`allow_http`](Self::allow_http)), or
    /// else the study id.
    pub fn build(self) -> Result<BlazeAuthLayer, Error> {
        if let Some(error) = self.error {
            return Err(error);
        }
        let origins = self
            .origins
            .iter()
            .map(|url| Origin::parse(url, self.allow_http))
            .collect::<Result<Vec<_>, _>>()?;
        let scope = match origins.is_empty() {
            _ if self.any_origin => Scope::Any {
                allow_http: self.allow_http,
            },
            true => Scope::Default,
            false => Scope::Named(origins),
        };
        let study = self.study.transpose()?;
        let config = Config {
            cache: Arc::new(TokenCache::new(self.source, self.cache)),
            scope,
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
            // As given, less any password in user info, which `build` refuses.
            .field(
                "origins",
                &self
                    .origins
                    .iter()
                    .map(|url| without_user_info(url))
                    .collect::<Vec<_>>(),
            )
            .field("any_origin", &self.any_origin)
            .field("allow_http", &self.allow_http)
            .field("headers", &self.headers)
            .field("cache", &self.cache)
            .field("idempotent_only", &self.idempotent_only)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_helpers::{TestSource, inner, sent_token};
    use http::{Request, Response, StatusCode};
    use std::convert::Infallible;
    use std::sync::atomic::Ordering;
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
    fn a_builders_debug_shows_no_password_from_an_origin() {
        let builder = BlazeAuthLayer::builder(TestSource::new())
            .origin("https://user:hunter2@blaze.example")
            .partner_id("partner-42");
        let debug = format!("{builder:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(!debug.contains("partner-42"), "{debug}");
        assert!(debug.contains("blaze.example"), "{debug}");
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

    /// What `client` sent for a request to `uri`: the request itself, or the error.
    async fn sent_for(layer: &BlazeAuthLayer, uri: &str) -> Result<Request<String>, crate::Error> {
        let echo = service_fn(|request: Request<String>| async move {
            Ok::<_, Infallible>(Response::new(request))
        });
        let request = Request::get(uri).body(String::new()).unwrap();
        let response = layer.layer(echo).oneshot(request).await?;
        Ok(response.into_body())
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

    #[tokio::test]
    async fn by_default_only_blazes_gateways_and_loopback_get_credentials() {
        let layer = BlazeAuthLayer::builder(TestSource::new())
            .study("S")
            .partner_id("p")
            .header("x-extra", "e")
            .build()
            .unwrap();
        for ours in [
            "https://apigateway.apps.stageapi.mskcc.org/api/Patient",
            "https://apigateway.apps.prodapi.mskcc.org/api/Patient",
            "http://127.0.0.1:8080/api/Patient",
            "http://localhost:3000/api/Patient",
            "http://[::1]/api/Patient",
            "/api/Patient",
        ] {
            let request = sent_for(&layer, ours).await.unwrap();
            assert_eq!(sent_token(&request), "token-1", "{ours}");
            assert_eq!(request.headers()["x-partnerid"], "p");
            assert!(request.uri().query().unwrap().contains("researchstudy=S"));
        }
        for foreign in [
            "https://evil.example/collect",
            "http://evil.example/collect",
            "http://apigateway.apps.stageapi.mskcc.org/api/Patient",
            "https://apigateway.apps.stageapi.mskcc.org:8443/api/Patient",
            "https://10.0.0.1/api/Patient",
        ] {
            let request = sent_for(&layer, foreign).await.unwrap();
            assert_eq!(request.uri(), foreign, "untouched");
            assert!(request.headers().is_empty(), "{foreign}");
        }
    }

    #[tokio::test]
    async fn any_origin_opens_the_scope_but_never_to_cleartext() {
        let open = |allow_http| {
            BlazeAuthLayer::builder(TestSource::new())
                .study("S")
                .any_origin()
                .allow_http(allow_http)
                .build()
                .unwrap()
        };
        let layer = open(false);
        let request = sent_for(&layer, "https://anywhere.example/x")
            .await
            .unwrap();
        assert_eq!(sent_token(&request), "token-1");
        let request = sent_for(&layer, "http://127.0.0.1:1/x").await.unwrap();
        assert_eq!(sent_token(&request), "token-1");
        // Neither sent with the token nor silently without it.
        let (service, calls) = inner::<String, _>(|_| StatusCode::OK);
        let request = Request::get("http://anywhere.example/x")
            .body(String::new())
            .unwrap();
        let error = layer.layer(service).oneshot(request).await.unwrap_err();
        assert!(error.is_config(), "{error:?}");
        assert_eq!(
            error.to_string(),
            "plain http is allowed for loopback hosts only"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0);

        let request = sent_for(&open(true), "http://anywhere.example/x")
            .await
            .unwrap();
        assert_eq!(sent_token(&request), "token-1");
    }

    #[tokio::test]
    async fn a_cleartext_origin_needs_allow_http() {
        let named = |allow_http| {
            BlazeAuthLayer::builder(TestSource::new())
                .study("S")
                .origin("http://blaze.internal:8080")
                .allow_http(allow_http)
                .build()
        };
        let error = named(false).unwrap_err();
        assert!(error.is_config());
        assert_eq!(
            error.to_string(),
            "plain http is allowed for loopback hosts only"
        );
        let layer = named(true).unwrap();
        let request = sent_for(&layer, "http://blaze.internal:8080/x")
            .await
            .unwrap();
        assert_eq!(sent_token(&request), "token-1");
        // Naming an origin replaces the default scope: loopback is no longer in it.
        let request = sent_for(&layer, "http://127.0.0.1:8080/x").await.unwrap();
        assert!(request.headers().is_empty());
    }
}
