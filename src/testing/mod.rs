//! An embedded stand-in for Blaze, for tests and demos.
//!
//! [`StandIn`] is a real HTTP/1.1 server on `127.0.0.1`, on a port the system picks. It starts
//! in a few milliseconds inside the caller's Tokio runtime and stops when dropped. It serves
//! what a Blaze client meets:
//!
//! - the OAuth 2.0 token endpoint, [`StandIn::token_url`]: client credentials in the form body
//!   (`client_secret_post`, as Blaze wants) or in HTTP Basic (`client_secret_basic`), scope
//!   `full`, errors as RFC 6749 section 5.2 JSON;
//! - the FHIR API, [`StandIn::api_url`]: `Patient`, `Observation` and `Group` search and read,
//!   and `metadata`. Every request needs a valid bearer token, the `researchstudy` query
//!   parameter naming a study the token's client may see, and, when
//!   [required](StandInBuilder::require_partner_id), the `x-partnerid` header. Failures come
//!   as FHIR `OperationOutcome`s with Blaze's statuses: 401, 400, 403, 404.
//!
//! The data are synthetic and the same on every run: [`patients`](StandInBuilder::patients)
//! Patients `p-0001`, `p-0002`, ..., two Observations for each (LOINC `777-3` platelets and
//! `751-8` neutrophils), and one Group `g-0001` holding every Patient. Every study sees the
//! same data. Searches return `searchset` Bundles paged by `_count` and `page`, whose `link`s
//! are absolute and carry every search parameter, `researchstudy` included, as Blaze's do.
//!
//! Test controls make the server misbehave on purpose ([`StandIn::fail_token_requests`],
//! [`StandIn::fail_api_requests`], [`StandIn::set_random_unauthorized`]; at start,
//! [`StandInBuilder::fail_page`], [`StandInBuilder::misstate_total`],
//! [`StandInBuilder::foreign_next_link`]) or invalidate the tokens it issued ([`StandIn::revoke_all_tokens`], [`StandIn::expire_all_tokens`]); counters
//! tell what it saw. Token expiry is measured on Tokio's clock, so tests with paused time can
//! let tokens run out.
//!
//! # Example
//!
//! Fetching a token from the default client, with hyper-util's client:
//!
//! ```rust
//! use blaze_auth::testing::{DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, StandIn};
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use hyper_util::{client::legacy::Client, rt::TokioExecutor};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let stand_in = StandIn::start().await?;
//!
//! let form = format!(
//!     "grant_type=client_credentials&client_id={DEMO_CLIENT_ID}\
//!      &client_secret={DEMO_CLIENT_SECRET}&scope=full"
//! );
//! let request = http::Request::post(stand_in.token_url())
//!     .header("content-type", "application/x-www-form-urlencoded")
//!     .body(Full::new(Bytes::from(form)))?;
//! let client = Client::builder(TokioExecutor::new()).build_http();
//! let response = client.request(request).await?;
//!
//! assert_eq!(response.status(), 200);
//! let body = response.into_body().collect().await?.to_bytes();
//! let token: serde_json::Value = serde_json::from_slice(&body)?;
//! assert_eq!(token["token_type"], "Bearer");
//! assert_eq!(stand_in.tokens_issued(), 1);
//! # Ok(())
//! # }
//! ```
//!
//! Customised: a client of one's own, a partner id, short-lived tokens and a failing token
//! endpoint.
//!
//! ```rust
//! use blaze_auth::testing::{StandIn, TokenFailure};
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::{client::legacy::Client, rt::TokioExecutor};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let stand_in = StandIn::builder()
//!     .client("partner-app", "partner-secret", &["12-345"])
//!     .require_partner_id("partner-42")
//!     .token_lifetime(Duration::from_secs(300))
//!     .patients(10)
//!     .start()
//!     .await?;
//! stand_in.fail_token_requests(1, TokenFailure::Status(http::StatusCode::BAD_GATEWAY));
//!
//! let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let request = http::Request::post(stand_in.token_url())
//!     .header("content-type", "application/x-www-form-urlencoded")
//!     .body(Full::new(Bytes::from_static(b"grant_type=client_credentials")))?;
//! let response = client.request(request).await?;
//! assert_eq!(response.status(), 502);
//!
//! // No token: the API answers 401.
//! let uri = format!("{}/Patient?researchstudy=12-345", stand_in.api_url());
//! let response = client.request(http::Request::get(uri).body(Full::default())?).await?;
//! assert_eq!(response.status(), 401);
//! assert_eq!(stand_in.unauthorized_served(), 1);
//! # Ok(())
//! # }
//! ```

mod data;
mod fhir;
mod server;
mod token;

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    hash::BuildHasher,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};
use tokio::net::TcpListener;

/// The client id of the client a stand-in knows unless told otherwise.
pub const DEMO_CLIENT_ID: &str = "demo-client";

/// The secret of [`DEMO_CLIENT_ID`].
pub const DEMO_CLIENT_SECRET: &str = "demo-secret";

/// The research study [`DEMO_CLIENT_ID`] may see.
pub const DEMO_STUDY: &str = "FHIR-T";

/// Path of the token endpoint, as at Blaze.
const TOKEN_PATH: &str = "/msk-apim/external/msk-oidc/oauth2/token";

/// Path of the FHIR API (v2), as at Blaze.
const API_PATH: &str = "/msk-apim/external/v2/crit/blaze/api";

/// Blaze's token lifetime.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

const DEFAULT_PATIENTS: usize = 250;

/// A running Blaze stand-in on `127.0.0.1`. See the [module docs](self).
///
/// Dropping it closes the port at once (a new connection is refused) and aborts every
/// connection it is serving, hanging ones included. It does not wait for them.
pub struct StandIn {
    addr: SocketAddr,
    shared: Arc<Shared>,
    // Never read: dropping it is what stops the server.
    _server: server::Server,
}

impl StandIn {
    /// A builder, to choose the clients, token lifetime, partner id and data size.
    pub fn builder() -> StandInBuilder {
        StandInBuilder::new()
    }

    /// Starts a stand-in with the defaults: the client [`DEMO_CLIENT_ID`] /
    /// [`DEMO_CLIENT_SECRET`] who may see [`DEMO_STUDY`], tokens that live an hour, no partner
    /// id required, 250 Patients.
    ///
    /// # Errors
    ///
    /// If no port on `127.0.0.1` can be bound.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime with I/O and time enabled.
    pub async fn start() -> std::io::Result<Self> {
        Self::builder().start().await
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`, without a trailing slash.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// The FHIR API's base URL, without a trailing slash: [`base_url`](Self::base_url) followed
    /// by `/msk-apim/external/v2/crit/blaze/api`.
    pub fn api_url(&self) -> String {
        self.shared.api_url()
    }

    /// The token endpoint's URL: [`base_url`](Self::base_url) followed by
    /// `/msk-apim/external/msk-oidc/oauth2/token`.
    pub fn token_url(&self) -> String {
        format!("{}{TOKEN_PATH}", self.shared.base_url)
    }

    /// The settings a partner's client would read from `BLAZE_*` variables, for this
    /// stand-in: its base URL, the demo client ([`DEMO_CLIENT_ID`], [`DEMO_CLIENT_SECRET`]),
    /// [`DEMO_STUDY`], and the partner id if one is [required](StandInBuilder::require_partner_id).
    /// Code written against [`BlazeEnv`](crate::BlazeEnv) runs against the stand-in unchanged.
    #[cfg(feature = "oauth2")]
    #[cfg_attr(docsrs, doc(cfg(feature = "oauth2")))]
    pub fn blaze_env(&self) -> crate::BlazeEnv {
        crate::BlazeEnv::new(
            self.base_url(),
            DEMO_CLIENT_ID,
            DEMO_CLIENT_SECRET,
            DEMO_STUDY,
            self.shared.partner_id.as_deref(),
        )
    }

    /// Forgets every token issued so far: the API answers 401 to each. Tokens issued later
    /// are good.
    pub fn revoke_all_tokens(&self) {
        lock(&self.shared.tokens).revoke_all();
    }

    /// Makes every token issued so far expired: the API answers 401 to each. Tokens issued
    /// later are good.
    pub fn expire_all_tokens(&self) {
        lock(&self.shared.tokens).expire_all();
    }

    /// Makes the next `n` requests to the token endpoint fail as `failure` says. Failures
    /// queue up behind those still pending from earlier calls.
    pub fn fail_token_requests(&self, n: usize, failure: TokenFailure) {
        self.shared.token_failures.push(n, failure);
    }

    /// Drops the token-request failures still queued: the token endpoint answers as usual
    /// again. With [`fail_token_requests`](Self::fail_token_requests)`(usize::MAX, ..)`, an
    /// outage that lasts until the test ends it.
    pub fn stop_failing_token_requests(&self) {
        self.shared.token_failures.clear();
    }

    /// Makes the next `n` requests to the API fail as `failure` says, before any check.
    /// Failures queue up behind those still pending from earlier calls.
    pub fn fail_api_requests(&self, n: usize, failure: ApiFailure) {
        self.shared.api_failures.push(n, failure);
    }

    /// Answers about `per_mille` in a thousand API requests 401, as if their token had been
    /// revoked, whatever the request; 0 turns this off, 1000 or more answers every request so.
    ///
    /// Which requests are hit is decided by a pseudo-random generator that restarts from
    /// the same seed on every call, so one sequence of requests meets the same 401s on every
    /// run. Requests failed by [`fail_api_requests`](Self::fail_api_requests) do not draw.
    pub fn set_random_unauthorized(&self, per_mille: u32) {
        *lock(&self.shared.random_unauthorized) = RandomUnauthorized::new(per_mille);
    }

    /// Requests to the token endpoint so far, failed and malformed ones included.
    pub fn token_requests(&self) -> u64 {
        self.shared.counters.token_requests.load(Ordering::Relaxed)
    }

    /// Tokens issued so far.
    pub fn tokens_issued(&self) -> u64 {
        self.shared.counters.tokens_issued.load(Ordering::Relaxed)
    }

    /// Requests to the FHIR API so far, failed ones included.
    pub fn api_requests(&self) -> u64 {
        self.shared.counters.api_requests.load(Ordering::Relaxed)
    }

    /// 401 responses the FHIR API has given so far, for whatever reason.
    pub fn unauthorized_served(&self) -> u64 {
        self.shared
            .counters
            .unauthorized_served
            .load(Ordering::Relaxed)
    }
}

impl fmt::Debug for StandIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StandIn")
            .field("addr", &self.addr)
            .field("token_requests", &self.token_requests())
            .field("tokens_issued", &self.tokens_issued())
            .field("api_requests", &self.api_requests())
            .field("unauthorized_served", &self.unauthorized_served())
            .finish_non_exhaustive()
    }
}

/// Configures and starts a [`StandIn`].
pub struct StandInBuilder {
    clients: Vec<token::Client>,
    /// Whether `clients` still holds only the default client.
    default_clients: bool,
    token_lifetime: Duration,
    partner_id: Option<String>,
    patients: usize,
    paging: Paging,
}

impl StandInBuilder {
    fn new() -> Self {
        Self {
            clients: vec![token::Client::new(
                DEMO_CLIENT_ID,
                DEMO_CLIENT_SECRET,
                &[DEMO_STUDY],
            )],
            default_clients: true,
            token_lifetime: DEFAULT_TOKEN_LIFETIME,
            partner_id: None,
            patients: DEFAULT_PATIENTS,
            paging: Paging::default(),
        }
    }

    /// Adds a client the token endpoint knows, and the research studies its tokens may see.
    ///
    /// The first call replaces the default client ([`DEMO_CLIENT_ID`]); call it once per
    /// client. A later client with the same id replaces an earlier one.
    pub fn client(mut self, id: &str, secret: &str, studies: &[&str]) -> Self {
        if self.default_clients {
            self.clients.clear();
            self.default_clients = false;
        }
        self.clients.push(token::Client::new(id, secret, studies));
        self
    }

    /// How long issued tokens stay valid, on Tokio's clock. The token response's
    /// `expires_in` is this in whole seconds, rounded down. Default: 3600 seconds, as at
    /// Blaze.
    pub fn token_lifetime(mut self, lifetime: Duration) -> Self {
        self.token_lifetime = lifetime;
        self
    }

    /// Requires the header `x-partnerid: <partner_id>` on every API request; a request
    /// without it, or with another value, gets a 401. Paging links then carry
    /// `x-partnerid=<partner_id>`, as Blaze v2's do. Default: not required.
    pub fn require_partner_id(mut self, partner_id: &str) -> Self {
        self.partner_id = Some(partner_id.to_owned());
        self
    }

    /// How many Patients there are; each has two Observations. Default: 250.
    pub fn patients(mut self, n: usize) -> Self {
        self.patients = n;
        self
    }

    /// Makes the first `times` requests for page `page` of any search (the `page` parameter,
    /// 1 when absent) fail as `failure` says, before any check, as a gateway in front of
    /// Blaze might: for example a 503 on page 3, then a good page 3 when the client asks
    /// again. Each call adds a failure; failures for one page are served in the order they
    /// were added. Default: none.
    pub fn fail_page(self, page: usize, times: usize, failure: ApiFailure) -> Self {
        self.paging.page_failures.push(page, times, failure);
        self
    }

    /// Makes every search Bundle state a `total` that is `delta` off the number of resources
    /// the search finds (never below zero), as a server whose paging loses resources would
    /// appear to a client that counts. Default: 0, the true total.
    pub fn misstate_total(mut self, delta: isize) -> Self {
        self.paging.total_delta = delta;
        self
    }

    /// Makes the `next` link of page `page` of every search point to `origin` (scheme, host
    /// and, if any, port, e.g. `http://127.0.0.1:8080`) instead of the stand-in, path and
    /// query unchanged: a link a client must not follow with its credentials. Blaze never
    /// does this. Default: every link points to the stand-in.
    pub fn foreign_next_link(mut self, page: usize, origin: &str) -> Self {
        self.paging.foreign_next = Some((page, origin.trim_end_matches('/').to_owned()));
        self
    }

    /// Binds a port on `127.0.0.1` and starts serving.
    ///
    /// # Errors
    ///
    /// If no port on `127.0.0.1` can be bound.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime with I/O and time enabled.
    pub async fn start(self) -> std::io::Result<StandIn> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let clients = self
            .clients
            .into_iter()
            .map(|client| (client.id().to_owned(), Arc::new(client)))
            .collect();
        // Seeded per server and per process, so that no two stand-ins issue the same tokens.
        let token_seed = std::collections::hash_map::RandomState::new().hash_one(addr);
        let shared = Arc::new(Shared {
            base_url: format!("http://{addr}"),
            clients,
            token_lifetime: self.token_lifetime,
            partner_id: self.partner_id,
            dataset: data::Dataset::generate(self.patients),
            paging: self.paging,
            tokens: Mutex::new(token::TokenStore::new(token_seed)),
            token_failures: FailureQueue::new(),
            api_failures: FailureQueue::new(),
            random_unauthorized: Mutex::new(RandomUnauthorized::new(0)),
            counters: Counters::default(),
        });
        let server = server::Server::spawn(listener, Arc::clone(&shared));
        Ok(StandIn {
            addr,
            shared,
            _server: server,
        })
    }
}

impl fmt::Debug for StandInBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StandInBuilder")
            .field("clients", &self.clients)
            .field("token_lifetime", &self.token_lifetime)
            .field("partner_id", &self.partner_id)
            .field("patients", &self.patients)
            .field("paging", &self.paging)
            .finish()
    }
}

/// How the token endpoint fails, for [`StandIn::fail_token_requests`].
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenFailure {
    /// Answers this status with a small HTML page, as a gateway in front of the OAuth server
    /// does (e.g. 502 or 503).
    Status(http::StatusCode),
    /// Answers 429 with a `Retry-After` header of this many seconds, rounded up.
    TooManyRequests {
        /// How long the client is told to wait.
        retry_after: Duration,
    },
    /// Waits this long on Tokio's clock, then answers as usual.
    Slow(Duration),
    /// Answers 200 with `Content-Type: application/json` and a body that is not JSON.
    Garbage,
    /// Answers as usual, but with the JSON followed by 8 MiB of white space: still valid
    /// JSON, so only a limit on the body size rejects it.
    Oversize,
    /// Takes the request and never answers. Dropping the [`StandIn`] closes the connection.
    Hang,
    /// Takes the request and resets the TCP connection (RST) without answering.
    Reset,
}

/// How the FHIR API fails, for [`StandIn::fail_api_requests`].
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiFailure {
    /// Answers 401 with `WWW-Authenticate: Bearer error="invalid_token"`, as for a revoked
    /// token.
    Unauthorized,
    /// Answers this status with an `OperationOutcome` and no `WWW-Authenticate` header, even
    /// for a 401.
    Status(http::StatusCode),
    /// Takes the request and resets the TCP connection (RST) without answering.
    Reset,
    /// Answers 429 with an `OperationOutcome` and a `Retry-After` header of this many
    /// seconds, rounded up.
    TooManyRequests {
        /// How long the client is told to wait.
        retry_after: Duration,
    },
}

/// How searches page, as [`StandInBuilder`] set it up.
#[derive(Debug, Default)]
struct Paging {
    page_failures: PageFailures,
    /// Added to the true `total` of every search Bundle.
    total_delta: isize,
    /// The page whose `next` link points to another origin, and that origin.
    foreign_next: Option<(usize, String)>,
}

/// Failures for given search pages, each for a number of requests.
#[derive(Debug, Default)]
struct PageFailures {
    /// Page, how many more requests for it fail, and how; the count is never zero.
    pending: Mutex<Vec<(usize, usize, ApiFailure)>>,
}

impl PageFailures {
    fn push(&self, page: usize, times: usize, failure: ApiFailure) {
        if times > 0 {
            lock(&self.pending).push((page, times, failure));
        }
    }

    /// The failure for a request for `page`, if any.
    fn next(&self, page: usize) -> Option<ApiFailure> {
        let mut pending = lock(&self.pending);
        let index = pending.iter().position(|(p, _, _)| *p == page)?;
        let (_, remaining, failure) = &mut pending[index];
        *remaining -= 1;
        let failure = failure.clone();
        if *remaining == 0 {
            pending.remove(index);
        }
        Some(failure)
    }
}

/// What the server's tasks share with the [`StandIn`].
struct Shared {
    /// `http://127.0.0.1:<port>`.
    base_url: String,
    clients: HashMap<String, Arc<token::Client>>,
    token_lifetime: Duration,
    partner_id: Option<String>,
    dataset: data::Dataset,
    paging: Paging,
    tokens: Mutex<token::TokenStore>,
    token_failures: FailureQueue<TokenFailure>,
    api_failures: FailureQueue<ApiFailure>,
    random_unauthorized: Mutex<RandomUnauthorized>,
    counters: Counters,
}

impl Shared {
    fn api_url(&self) -> String {
        format!("{}{API_PATH}", self.base_url)
    }
}

#[derive(Default)]
struct Counters {
    token_requests: AtomicU64,
    tokens_issued: AtomicU64,
    api_requests: AtomicU64,
    unauthorized_served: AtomicU64,
}

/// Failures to inject into the next requests, in order.
struct FailureQueue<F> {
    /// Each failure with how many more requests it is for; never zero.
    pending: Mutex<VecDeque<(usize, F)>>,
}

impl<F: Clone> FailureQueue<F> {
    fn new() -> Self {
        Self {
            pending: Mutex::new(VecDeque::new()),
        }
    }

    fn push(&self, n: usize, failure: F) {
        if n > 0 {
            lock(&self.pending).push_back((n, failure));
        }
    }

    fn clear(&self) {
        lock(&self.pending).clear();
    }

    /// The failure for the request at hand, if any.
    fn next(&self) -> Option<F> {
        let mut pending = lock(&self.pending);
        let (remaining, failure) = pending.front_mut()?;
        *remaining -= 1;
        let failure = failure.clone();
        if *remaining == 0 {
            pending.pop_front();
        }
        Some(failure)
    }
}

/// Chooses the API requests [`StandIn::set_random_unauthorized`] answers 401.
struct RandomUnauthorized {
    per_mille: u32,
    rng: SplitMix64,
}

impl RandomUnauthorized {
    const SEED: u64 = 0x5eed_b1a2e;

    fn new(per_mille: u32) -> Self {
        Self {
            per_mille,
            rng: SplitMix64::new(Self::SEED),
        }
    }

    /// Whether to answer this request 401.
    fn draw(&mut self) -> bool {
        self.per_mille > 0 && self.rng.next_u64() % 1000 < u64::from(self.per_mille)
    }
}

/// Sebastiano Vigna's SplitMix64: small, fast and good enough for tokens that need only look
/// random and for test data. Not for secrets that must resist guessing.
struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.state)
    }
}

/// SplitMix64's output function: a 64-bit hash in which every input bit moves every output
/// bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Locks `mutex`, ignoring poison: a panic elsewhere (a failed assertion in a test thread)
/// leaves the server's state consistent, since no update spans a panic point.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_queue_serves_nothing_once_cleared() {
        let queue = FailureQueue::new();
        queue.push(usize::MAX, 'a');
        assert_eq!(queue.next(), Some('a'));
        queue.clear();
        assert_eq!(queue.next(), None);
    }

    #[test]
    fn failure_queue_serves_each_failure_its_count_in_order() {
        let queue = FailureQueue::new();
        queue.push(2, ApiFailure::Unauthorized);
        queue.push(0, ApiFailure::Reset);
        queue.push(1, ApiFailure::Status(http::StatusCode::BAD_GATEWAY));

        assert_eq!(queue.next(), Some(ApiFailure::Unauthorized));
        assert_eq!(queue.next(), Some(ApiFailure::Unauthorized));
        assert_eq!(
            queue.next(),
            Some(ApiFailure::Status(http::StatusCode::BAD_GATEWAY))
        );
        assert_eq!(queue.next(), None);
    }

    #[test]
    fn page_failures_serve_each_page_its_own_in_order() {
        let failures = PageFailures::default();
        failures.push(
            3,
            2,
            ApiFailure::Status(http::StatusCode::SERVICE_UNAVAILABLE),
        );
        failures.push(2, 0, ApiFailure::Reset);
        failures.push(3, 1, ApiFailure::Unauthorized);

        assert_eq!(failures.next(2), None);
        assert_eq!(failures.next(1), None);
        for _ in 0..2 {
            assert_eq!(
                failures.next(3),
                Some(ApiFailure::Status(http::StatusCode::SERVICE_UNAVAILABLE))
            );
        }
        assert_eq!(failures.next(3), Some(ApiFailure::Unauthorized));
        assert_eq!(failures.next(3), None);
    }

    #[test]
    fn random_unauthorized_repeats_after_reset_and_respects_the_bounds() {
        let draws = |per_mille| {
            let mut random = RandomUnauthorized::new(per_mille);
            (0..1000).map(|_| random.draw()).collect::<Vec<_>>()
        };
        let half = draws(500);
        assert_eq!(half, draws(500));
        let hits = half.iter().filter(|hit| **hit).count();
        assert!((400..600).contains(&hits), "{hits} hits");
        assert!(draws(0).iter().all(|hit| !hit));
        assert!(draws(1000).iter().all(|hit| *hit));
    }

    #[test]
    fn builder_debug_hides_secrets() {
        let builder = StandIn::builder().client("app", "hunter2", &["12-345"]);
        let debug = format!("{builder:?}");
        assert!(debug.contains("app") && debug.contains("12-345"), "{debug}");
        assert!(!debug.contains("hunter2"), "{debug}");
    }
}
