//! `refresh_storm`: N concurrent requests arrive when the cached token has expired, and the
//! token fetch takes 5 ms. They must share one fetch, and all be done soon after it.
//!
//! - `one_fetch`: the time of one fetch of the source alone, awaited directly (a 5 ms tokio
//!   sleep, which tokio's millisecond timer rounds up): the unit of the ratios;
//! - `storm/N`, N = 1, 100, 1,000 and 10,000: a fresh layer whose cached token has expired
//!   (the source's first token expires as it is issued), N tasks spawned, each with a request
//!   and a clone of the service, and parked until they are all there (none of that is timed).
//!   The clock runs from releasing them all at once until the last response is in.
//!
//! Every storm asserts that its N requests caused exactly one fetch: a bench that fetched N
//! times would measure the wrong thing, so it stops instead.
//!
//! Ratio in the README: `storm/N / one_fetch` (target: at most 1.5 at N = 10,000).

mod support;

use blaze_auth::{AccessToken, BlazeAuth, BlazeAuthLayer, TokenSource, token_fn};
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion};
use http::{Request, Response};
use http_body_util::Full;
use std::{
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
use tower::{Layer, ServiceExt};

/// How long a token fetch takes.
const FETCH: Duration = Duration::from_millis(5);
const STORMS: [usize; 4] = [1, 100, 1_000, 10_000];

fn main() {
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    refresh_storm(&mut criterion);
    criterion.final_summary();
}

fn refresh_storm(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!(
        "refresh_storm: {} worker threads; every storm asserts exactly 1 token fetch",
        rt.metrics().num_workers()
    );

    let mut group = c.benchmark_group("refresh_storm");
    group.bench_function("one_fetch", |b| {
        let fetches = Arc::new(AtomicUsize::new(1));
        let source = source(Arc::clone(&fetches));
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
        group.bench_with_input(BenchmarkId::new("storm", n), &n, |b, &n| {
            b.iter_custom(|iters| (0..iters).map(|_| storm(&rt, n)).sum())
        });
    }
    group.finish();
}

/// One storm of `n` requests on a fresh layer whose token has expired; the time from their
/// release until all are answered.
fn storm(rt: &Runtime, n: usize) -> Duration {
    rt.block_on(async {
        let fetches = Arc::new(AtomicUsize::new(0));
        let service = BlazeAuthLayer::new(source(Arc::clone(&fetches)), STUDY).layer(Ok200);
        // The first token expires as it is issued: the cache now holds an expired token.
        service
            .clone()
            .oneshot(get(Full::new(Bytes::new())))
            .await
            .expect("200");
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "priming fetch");

        let (release, released) = watch::channel(false);
        let parked = Arc::new(AtomicUsize::new(0));
        let all_parked = Arc::new(Notify::new());
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let task = Task {
                    service: service.clone(),
                    request: get(Full::new(Bytes::new())),
                    released: released.clone(),
                };
                let (parked, all_parked) = (Arc::clone(&parked), Arc::clone(&all_parked));
                tokio::spawn(async move {
                    if parked.fetch_add(1, Ordering::SeqCst) + 1 == n {
                        all_parked.notify_one();
                    }
                    task.run().await
                })
            })
            .collect();
        all_parked.notified().await;

        let start = Instant::now();
        release.send(true).expect("tasks are waiting");
        for task in tasks {
            black_box(task.await.expect("task"));
        }
        let elapsed = start.elapsed();
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            2,
            "a storm of {n} requests must cause exactly one fetch"
        );
        elapsed
    })
}

/// One request of a storm, waiting to be released.
struct Task {
    service: BlazeAuth<Ok200>,
    request: Request<Full<Bytes>>,
    released: watch::Receiver<bool>,
}

impl Task {
    async fn run(mut self) -> Response<()> {
        self.released
            .wait_for(|released| *released)
            .await
            .expect("released");
        self.service.oneshot(self.request).await.expect("200")
    }
}

/// Counts its fetches. The first token has expired when it arrives; later ones take
/// [`FETCH`] to come and live an hour.
fn source(fetches: Arc<AtomicUsize>) -> impl TokenSource + 'static {
    token_fn(move |_| {
        let first = fetches.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            let token = AccessToken::bearer(TOKEN)?;
            if first {
                return Ok::<_, blaze_auth::Error>(token.with_expires_in(Duration::ZERO));
            }
            tokio::time::sleep(FETCH).await;
            Ok(token.with_expires_in(Duration::from_secs(3600)))
        }
    })
}
