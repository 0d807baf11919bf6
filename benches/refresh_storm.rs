//! `refresh_storm`: N concurrent requests arrive when the cached token has expired, and the
//! token fetch takes 5 ms. They must share one fetch, and all be done soon after it.
//!
//! - `one_fetch`: the time of one fetch of the source alone, awaited directly (a 5 ms tokio
//!   sleep, which tokio's millisecond timer rounds up): the unit of the ratios;
//! - `storm/N`, N = 1, 100, 1,000 and 10,000: a fresh layer whose cached token has expired
//!   (the source's first token expires as it is issued), N tasks spawned, each with a request
//!   and a clone of the service, and parked until they are all there (none of that is timed).
//!   The clock runs from releasing them all at once until the last one has its response;
//! - `cached/N`: the same with a valid cached token, so no fetch: what the N requests cost
//!   the runtime and the layer with no storm at all;
//! - `bare/N`: the same N requests to the inner service alone: what they cost the runtime.
//!
//! Every storm asserts that its N requests caused exactly one fetch (`cached/N`: none): a
//! bench that fetched N times would measure the wrong thing, so it stops instead.
//!
//! Ratios in the README: `storm/N / one_fetch` (target: at most 1.5 at N = 10,000), and what
//! the expired token adds to the requests' own time, `(storm/N - cached/N) / one_fetch`.

mod support;

use blaze_auth::{AccessToken, BlazeAuthLayer, TokenSource, token_fn};
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion};
use http::{Request, Response};
use http_body_util::Full;
use std::{
    fmt,
    hint::black_box,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};
use support::{Ok200, STUDY, TOKEN, get};
use tokio::{
    runtime::Runtime,
    sync::{Notify, watch},
    time::Instant,
};
use tower::{Layer, Service, ServiceExt};

/// How long a token fetch takes.
const FETCH: Duration = Duration::from_millis(5);
const STORMS: [usize; 4] = [1, 100, 1_000, 10_000];

type Body = Full<Bytes>;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // `STORM_PROFILE=<N>`: one storm of N requests and nothing else, for a profiler.
    if let Ok(n) = std::env::var("STORM_PROFILE") {
        let n = n.parse().expect("STORM_PROFILE: a number of requests");
        println!("storm/{n}: {:?}", storm(&rt, n, Kind::Storm));
        return;
    }
    println!(
        "refresh_storm: {} worker threads; every storm asserts exactly 1 token fetch",
        rt.metrics().num_workers()
    );
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let mut group = criterion.benchmark_group("refresh_storm");
    group.bench_function("one_fetch", |b| {
        // Past the first fetch: every fetch takes `FETCH`.
        let source = source(Arc::new(AtomicUsize::new(1)), true);
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(source.fetch(None).await.expect("token"));
                }
                start.elapsed()
            })
        })
    });
    for n in STORMS {
        for kind in [Kind::Storm, Kind::Cached, Kind::Bare] {
            group.bench_with_input(BenchmarkId::new(kind.to_string(), n), &n, |b, &n| {
                b.iter_custom(|iters| (0..iters).map(|_| storm(&rt, n, kind)).sum())
            });
        }
    }
    group.finish();
    criterion.final_summary();
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// Through the layer, its cached token expired.
    Storm,
    /// Through the layer, its cached token valid.
    Cached,
    /// To the inner service alone.
    Bare,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Storm => "storm",
            Kind::Cached => "cached",
            Kind::Bare => "bare",
        })
    }
}

/// `n` requests of `kind`, on a fresh layer; the time from their release until all are
/// answered.
fn storm(rt: &Runtime, n: usize, kind: Kind) -> Duration {
    rt.block_on(async {
        if kind == Kind::Bare {
            return release(n, Ok200).await;
        }
        let fetches = Arc::new(AtomicUsize::new(0));
        let source = source(Arc::clone(&fetches), kind == Kind::Storm);
        let service = BlazeAuthLayer::new(source, STUDY).layer(Ok200);
        // The first fetch: the cache now holds a token, valid or (after its 10 ms)
        // expired. Not one expired on arrival: the cache holds such a token for the fetch
        // cool-down rather than fetch again at once.
        let first = service.clone().oneshot(get(Full::new(Bytes::new())));
        first.await.expect("200");
        tokio::time::sleep(Duration::from_millis(12)).await;
        let elapsed = release(n, service).await;
        let storm_fetches = fetches.load(Ordering::SeqCst) - 1;
        assert_eq!(
            storm_fetches,
            usize::from(kind == Kind::Storm),
            "{n} requests on an expired token must cause exactly one fetch, on a valid one none"
        );
        elapsed
    })
}

/// Spawns `n` tasks, each with a request and a clone of `service`, parks them, then releases
/// them all at once; the time from the release until the last one has its response.
async fn release<S>(n: usize, service: S) -> Duration
where
    S: Service<Request<Body>, Response = Response<()>> + Clone + Send + 'static,
    S::Error: fmt::Debug,
    S::Future: Send,
{
    let (release, released) = watch::channel(false);
    let parked = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let (all_parked, all_done) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    for _ in 0..n {
        let (service, request) = (service.clone(), get(Full::new(Bytes::new())));
        let mut released = released.clone();
        let (parked, all_parked) = (Arc::clone(&parked), Arc::clone(&all_parked));
        let (done, all_done) = (Arc::clone(&done), Arc::clone(&all_done));
        tokio::spawn(async move {
            if parked.fetch_add(1, Ordering::SeqCst) + 1 == n {
                all_parked.notify_one();
            }
            released.wait_for(|go| *go).await.expect("released");
            black_box(service.oneshot(request).await.expect("200"));
            // The last one tells the clock; nobody awaits each task.
            if done.fetch_add(1, Ordering::SeqCst) + 1 == n {
                all_done.notify_one();
            }
        });
    }
    all_parked.notified().await;
    let start = Instant::now();
    release.send(true).expect("tasks are waiting");
    all_done.notified().await;
    start.elapsed()
}

/// Counts its fetches. The first token comes at once, living 10 ms if `first_expired`; later
/// ones take [`FETCH`] to come. Tokens live an hour.
fn source(fetches: Arc<AtomicUsize>, first_expired: bool) -> impl TokenSource + 'static {
    token_fn(move |_| {
        let first = fetches.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            let token = AccessToken::bearer(TOKEN)?;
            if first && first_expired {
                return Ok::<_, blaze_auth::Error>(
                    token.with_expires_in(Duration::from_millis(10)),
                );
            }
            if !first {
                tokio::time::sleep(FETCH).await;
            }
            Ok(token.with_expires_in(Duration::from_secs(3600)))
        }
    })
}
