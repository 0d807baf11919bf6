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
    /// A request counts once for each token it waits for: twice if it waited for its token
    /// and, after a 401, again for its retry's.
    pub token_waits: u64,
    /// Of those waits, the ones that failed with the last error because of their bound: it ran out
    /// while an attempt was under way, or the next attempt would start after it (they give
    /// up then, without waiting for the bound itself). A request that meets an error waiting
    /// will not fix fails at once and is not counted here.
    pub token_waits_given_up: u64,
    /// How long ago the cached token was fetched; `None` before the first token.
    pub token_age: Option<Duration>,
    /// How long the cached token was valid for when fetched; `None` before the first token
    /// or for a token without expiry.
    pub token_lifetime: Option<Duration>,
}

/// What the cache and `RedisShared` report through the [`metrics`](::metrics) facade (feature
/// `metrics`); without the feature every function here is empty. Names follow Prometheus
/// conventions (the README's "Metrics" lists them), so an exporter serves them as they are.
#[cfg_attr(not(feature = "metrics"), allow(dead_code, unused_variables))]
pub(crate) mod export {
    use std::time::Duration;
    use tokio::time::Instant;

    pub(crate) const TOKEN_FETCHES: &str = "blaze_auth_token_fetches_total";
    pub(crate) const TOKEN_FETCH_FAILURES: &str = "blaze_auth_token_fetch_failures_total";
    pub(crate) const RETRIES: &str = "blaze_auth_retries_total";
    pub(crate) const STORM_GUARD_SKIPS: &str = "blaze_auth_storm_guard_skips_total";
    pub(crate) const TOKEN_WAITS: &str = "blaze_auth_token_waits_total";
    pub(crate) const TOKEN_WAITS_GIVEN_UP: &str = "blaze_auth_token_waits_given_up_total";
    pub(crate) const REDIS_FALLBACKS: &str = "blaze_auth_redis_fallbacks_total";
    pub(crate) const TOKEN_FETCH_DURATION: &str = "blaze_auth_token_fetch_duration_seconds";
    pub(crate) const TOKEN_REMAINING: &str = "blaze_auth_token_remaining_lifetime_seconds";

    /// A token fetch started.
    pub(crate) fn fetch_started() {
        #[cfg(feature = "metrics")]
        {
            describe_once();
            ::metrics::counter!(TOKEN_FETCHES).increment(1);
        }
    }

    /// A token fetch ended after `took`: `Ok` with the new token's remaining lifetime
    /// (`None`: it never expires), or `Err`.
    pub(crate) fn fetch_ended(took: Duration, outcome: Result<Option<Duration>, ()>) {
        #[cfg(feature = "metrics")]
        {
            let label = if outcome.is_ok() {
                "success"
            } else {
                "failure"
            };
            ::metrics::histogram!(TOKEN_FETCH_DURATION, "outcome" => label)
                .record(took.as_secs_f64());
            match outcome {
                Ok(Some(lifetime)) => token_remaining(lifetime.as_secs()),
                Ok(None) => {}
                Err(()) => ::metrics::counter!(TOKEN_FETCH_FAILURES).increment(1),
            }
        }
    }

    /// A request is sent again after a 401.
    pub(crate) fn retry() {
        #[cfg(feature = "metrics")]
        ::metrics::counter!(RETRIES).increment(1);
    }

    /// The storm guard returned a 401 without a new token.
    pub(crate) fn storm_guard_skip() {
        #[cfg(feature = "metrics")]
        ::metrics::counter!(STORM_GUARD_SKIPS).increment(1);
    }

    /// A request that met a failed fetch waits for the next attempt.
    pub(crate) fn token_wait() {
        #[cfg(feature = "metrics")]
        ::metrics::counter!(TOKEN_WAITS).increment(1);
    }

    /// A waiting request reached its bound without a token.
    pub(crate) fn token_wait_given_up() {
        #[cfg(feature = "metrics")]
        ::metrics::counter!(TOKEN_WAITS_GIVEN_UP).increment(1);
    }

    /// `RedisShared` fetched from its source by itself because Redis failed.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn redis_fallback() {
        #[cfg(feature = "metrics")]
        ::metrics::counter!(REDIS_FALLBACKS).increment(1);
    }

    /// A request is sent, at `now`, with a token that expires at `expires_at`. The gauge is
    /// set when the whole seconds left change, as this thread last saw them: a request pays
    /// a thread-local read, not a registry lookup, and threads do not contend for a shared
    /// counter. Until the seconds can have changed, a request compares two instants and
    /// computes no duration (a subtraction of instants costs more than the rest of the
    /// check); without the feature it computes nothing.
    #[inline]
    pub(crate) fn token_used(expires_at: Instant, now: Instant) {
        #[cfg(feature = "metrics")]
        {
            let unchanged = SECONDS_CHANGE
                .get()
                .is_some_and(|(expiry, change)| expiry == expires_at && now < change);
            if unchanged {
                return;
            }
            let seconds = (expires_at - now).as_secs();
            if LAST_REMAINING.get() != seconds {
                token_remaining(seconds);
            }
            // The whole seconds left stay `seconds` until `now` reaches this instant.
            let change = expires_at.checked_sub(Duration::from_secs(seconds));
            SECONDS_CHANGE.set(change.map(|change| (expires_at, change)));
        }
    }

    #[cfg(feature = "metrics")]
    thread_local! {
        /// The whole seconds this thread last set the gauge to.
        static LAST_REMAINING: std::cell::Cell<u64> = const { std::cell::Cell::new(u64::MAX) };
        /// The expiry of the token this thread last saw a request use, and the instant until
        /// which the whole seconds left of it are those the gauge was last checked against.
        static SECONDS_CHANGE: std::cell::Cell<Option<(Instant, Instant)>> =
            const { std::cell::Cell::new(None) };
    }

    #[cfg(feature = "metrics")]
    fn token_remaining(seconds: u64) {
        LAST_REMAINING.set(seconds);
        ::metrics::gauge!(TOKEN_REMAINING).set(seconds as f64);
    }

    /// Describes the metrics to the installed recorder, once.
    #[cfg(feature = "metrics")]
    fn describe_once() {
        static DESCRIBED: std::sync::Once = std::sync::Once::new();
        DESCRIBED.call_once(crate::describe_metrics);
    }
}

/// Describes blaze-auth's metrics (help text and unit) to the installed `metrics` recorder.
///
/// The first token fetch does it by itself; call this after installing a recorder that came
/// later, or to have the descriptions before the first fetch.
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub fn describe_metrics() {
    use self::export::*;
    use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(TOKEN_FETCHES, Unit::Count, "Token fetches started");
    describe_counter!(
        TOKEN_FETCH_FAILURES,
        Unit::Count,
        "Token fetches that failed, after the source's own retries"
    );
    describe_counter!(RETRIES, Unit::Count, "Requests sent again after a 401");
    describe_counter!(
        STORM_GUARD_SKIPS,
        Unit::Count,
        "401s returned without a new token by the storm guard"
    );
    describe_counter!(
        TOKEN_WAITS,
        Unit::Count,
        "Requests that met a failed token fetch and waited for the next attempt, once per token waited for"
    );
    describe_counter!(
        TOKEN_WAITS_GIVEN_UP,
        Unit::Count,
        "Waiting requests that failed because max_token_wait came before a token"
    );
    describe_counter!(
        REDIS_FALLBACKS,
        Unit::Count,
        "Token fetches RedisShared made by itself because Redis failed"
    );
    describe_histogram!(
        TOKEN_FETCH_DURATION,
        Unit::Seconds,
        "Duration of token fetches, by outcome"
    );
    describe_gauge!(
        TOKEN_REMAINING,
        Unit::Seconds,
        "Remaining lifetime of the token requests are sent with"
    );
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use super::export::*;
    use crate::{
        AccessToken, BlazeAuthLayer, BoxError,
        test_helpers::{TestSource, inner},
        token_fn,
    };
    use http::{Request, StatusCode};
    use metrics_util::{
        CompositeKey, MetricKind,
        debugging::{DebugValue, DebuggingRecorder},
    };
    use std::{future::Future, time::Duration};
    use tower::{Layer, ServiceExt};

    #[test]
    fn fetches_failures_and_their_durations_are_recorded() {
        let seen = record(async {
            // 250 ms per fetch, on the paused clock; the second fetch fails.
            let source = token_fn(|rejected: Option<AccessToken>| async move {
                tokio::time::sleep(Duration::from_millis(250)).await;
                match rejected {
                    None => AccessToken::bearer("t").map_err(BoxError::from),
                    Some(_) => Err("token endpoint down".into()),
                }
            });
            // Without waiting for the next attempt, the failed fetch is the request's answer.
            let layer = BlazeAuthLayer::builder(source)
                .study("S")
                .max_token_wait(Duration::ZERO)
                .build()
                .unwrap();
            let (service, _) = inner::<String, _>(|_| StatusCode::UNAUTHORIZED);
            let response = layer.layer(service).oneshot(get()).await;
            assert!(response.unwrap_err().is_token());
        });
        assert_eq!(seen.counter(TOKEN_FETCHES), 2);
        assert_eq!(seen.counter(TOKEN_FETCH_FAILURES), 1);
        let duration = |outcome| seen.histogram(TOKEN_FETCH_DURATION, ("outcome", outcome));
        assert_eq!(duration("success"), [0.25]);
        assert_eq!(duration("failure"), [0.25]);
    }

    #[test]
    fn retries_and_storm_guard_skips_are_counted() {
        let seen = record(async {
            // Every token refused: one refresh and retry, then the storm guard's skips.
            let (service, _) = inner::<String, _>(|_| StatusCode::UNAUTHORIZED);
            let client = BlazeAuthLayer::new(TestSource::new(), "S").layer(service);
            for _ in 0..3 {
                let response = client.clone().oneshot(get()).await.unwrap();
                assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
            }
        });
        assert_eq!(seen.counter(TOKEN_FETCHES), 2);
        assert_eq!(seen.counter(RETRIES), 1);
        assert_eq!(seen.counter(STORM_GUARD_SKIPS), 2);
    }

    #[test]
    fn waits_and_the_waits_given_up_are_counted() {
        let seen = record(async {
            // Every fetch fails: the request waits through the attempts 1 and 3 s after
            // the first, and gives up when the next would come after its 5 s bound.
            let source = token_fn(|_: Option<AccessToken>| async { Err::<AccessToken, _>("down") });
            let (service, _) = inner::<String, _>(|_| StatusCode::OK);
            let client = BlazeAuthLayer::new(source, "S").layer(service);
            assert!(client.oneshot(get()).await.unwrap_err().is_token());
        });
        assert_eq!(seen.counter(TOKEN_FETCHES), 3);
        assert_eq!(seen.counter(TOKEN_WAITS), 1);
        assert_eq!(seen.counter(TOKEN_WAITS_GIVEN_UP), 1);
    }

    #[test]
    fn the_gauge_follows_the_current_tokens_remaining_lifetime() {
        let seen = record(async {
            let source = TestSource::expiring(Duration::from_secs(3600));
            let (service, _) = inner::<String, _>(|_| StatusCode::OK);
            let client = BlazeAuthLayer::new(source, "S").layer(service);
            client.clone().oneshot(get()).await.unwrap();
            tokio::time::advance(Duration::from_secs(600)).await;
            client.oneshot(get()).await.unwrap();
        });
        assert_eq!(seen.gauge(TOKEN_REMAINING), 3000.0);
    }

    #[test]
    fn the_gauge_changes_when_the_whole_seconds_left_do_and_not_before() {
        // Requests at 0.4 s, 0.9 s (the same whole second left: the quick check) and, in the
        // second run, 1.1 s: each run's gauge is the whole seconds left at its last request.
        let at = |steps: &'static [u64]| {
            record(async move {
                let source = TestSource::expiring(Duration::from_secs(3600));
                let (service, _) = inner::<String, _>(|_| StatusCode::OK);
                let client = BlazeAuthLayer::new(source, "S").layer(service);
                client.clone().oneshot(get()).await.unwrap();
                for &millis in steps {
                    tokio::time::advance(Duration::from_millis(millis)).await;
                    client.clone().oneshot(get()).await.unwrap();
                }
            })
            .gauge(TOKEN_REMAINING)
        };
        assert_eq!(at(&[400, 500]), 3599.0);
        assert_eq!(at(&[400, 500, 200]), 3598.0);
    }

    #[cfg(feature = "redis")]
    #[test]
    fn redis_fallbacks_are_counted() {
        use crate::{RedisShared, SharedKey, StaticToken, TokenSource};
        let seen = record(async {
            let source = StaticToken::new(AccessToken::bearer("t").unwrap());
            // Nothing listens on port 1: Redis is down, the source is asked directly.
            let shared = RedisShared::builder(source, SharedKey::new("https://t.example", "c"))
                .redis_url("redis://127.0.0.1:1/")
                .build()
                .unwrap();
            assert_eq!(shared.fetch(None).await.unwrap().secret(), "t");
        });
        assert_eq!(seen.counter(REDIS_FALLBACKS), 1);
    }

    #[test]
    fn every_metric_is_described_with_its_unit() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        ::metrics::with_local_recorder(&recorder, || {
            crate::describe_metrics();
            fetch_started();
            fetch_ended(Duration::ZERO, Ok(Some(Duration::from_secs(1))));
            fetch_ended(Duration::ZERO, Err(()));
            retry();
            storm_guard_skip();
            token_wait();
            token_wait_given_up();
            redis_fallback();
        });
        let names: Vec<_> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, unit, description, _)| {
                let name = key.key().name().to_owned();
                let expected = if name.ends_with("_seconds") {
                    ::metrics::Unit::Seconds
                } else {
                    assert!(name.ends_with("_total"), "{name}");
                    ::metrics::Unit::Count
                };
                assert_eq!(unit, Some(expected), "{name}");
                assert!(description.is_some(), "{name}");
                name
            })
            .collect();
        for name in [
            TOKEN_FETCHES,
            TOKEN_FETCH_FAILURES,
            RETRIES,
            STORM_GUARD_SKIPS,
            TOKEN_WAITS,
            TOKEN_WAITS_GIVEN_UP,
            REDIS_FALLBACKS,
            TOKEN_FETCH_DURATION,
            TOKEN_REMAINING,
        ] {
            assert!(names.iter().any(|seen| seen == name), "{name}");
        }
    }

    /// What a scenario recorded, run on a paused current-thread runtime whose every task
    /// (the cache's fetches included) reports to a recorder of its own.
    fn record(scenario: impl Future<Output = ()>) -> Recorded {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        ::metrics::with_local_recorder(&recorder, || runtime.block_on(scenario));
        Recorded(snapshotter.snapshot().into_vec())
    }

    struct Recorded(
        Vec<(
            CompositeKey,
            Option<::metrics::Unit>,
            Option<::metrics::SharedString>,
            DebugValue,
        )>,
    );

    impl Recorded {
        fn find(&self, kind: MetricKind, name: &str, label: Option<(&str, &str)>) -> &DebugValue {
            let found = self.0.iter().find(|(key, ..)| {
                let labels: Vec<_> = key.key().labels().map(|l| (l.key(), l.value())).collect();
                key.kind() == kind
                    && key.key().name() == name
                    && labels == label.into_iter().collect::<Vec<_>>()
            });
            &found.unwrap_or_else(|| panic!("no {name} {label:?}")).3
        }

        fn counter(&self, name: &str) -> u64 {
            match self.find(MetricKind::Counter, name, None) {
                DebugValue::Counter(value) => *value,
                other => panic!("{name}: {other:?}"),
            }
        }

        fn gauge(&self, name: &str) -> f64 {
            match self.find(MetricKind::Gauge, name, None) {
                DebugValue::Gauge(value) => value.into_inner(),
                other => panic!("{name}: {other:?}"),
            }
        }

        fn histogram(&self, name: &str, label: (&str, &str)) -> Vec<f64> {
            match self.find(MetricKind::Histogram, name, Some(label)) {
                DebugValue::Histogram(values) => values.iter().map(|v| v.into_inner()).collect(),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    fn get() -> Request<String> {
        Request::get("/Patient").body(String::new()).unwrap()
    }
}
