//! [`Metrics`]: what a layer's token cache has done, for dashboards and alerts.

use std::time::Duration;

/// Counters and gauges of one layer's token cache, from
/// [`BlazeAuthLayer::metrics`](crate::BlazeAuthLayer::metrics) or
/// [`BlazeAuth::metrics`](crate::BlazeAuth::metrics).
///
/// The counters only grow, from the layer's creation; export them as monotonic counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metrics {
    /// Token fetches started.
    pub token_fetches: u64,
    /// Token fetches that failed (after the source's own retries).
    pub fetch_failures: u64,
    /// Requests sent a second time after a 401.
    pub retries: u64,
    /// 401s returned without a new token by the storm guard: a token fetched after a 401 was
    /// refused too (see [`BlazeAuthLayerBuilder::storm_window`](crate::BlazeAuthLayerBuilder::storm_window)).
    pub refreshes_skipped: u64,
    /// Requests that met a failed token fetch (during its cool-down, or as its result) and
    /// waited for the next attempt instead of failing at once (see
    /// [`BlazeAuthLayerBuilder::max_token_wait`](crate::BlazeAuthLayerBuilder::max_token_wait)).
    pub token_waits: u64,
    /// Of those, requests that reached their bound without a token and failed with the last
    /// error.
    pub token_waits_given_up: u64,
    /// How long ago the cached token was fetched; `None` before the first token.
    pub token_age: Option<Duration>,
    /// How long the cached token was valid for when fetched; `None` before the first token
    /// or for a token without expiry.
    pub token_lifetime: Option<Duration>,
}
