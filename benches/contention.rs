//! `contention`: does the layer serialise concurrent requests? Throughput with 1, 2, 4 and 64
//! tasks on the multi-thread runtime (one worker per core), the token cached.
//!
//! Five stacks around an immediately ready inner service that answers 200:
//!
//! - `bare`: the inner service alone, the floor (the runtime's own cost per request);
//! - `add_authorization`: tower-http's `AddAuthorization`, one fixed header value shared by
//!   all requests: the floor for sharing one token across threads (each request takes and
//!   drops a reference to it, one counter for all);
//! - `blaze_auth`: [`BlazeAuth`](blaze_auth::BlazeAuth), defaults (bodies cloned for a retry);
//! - `blaze_auth_no_replay`: the same with `NoReplay`: no copy for a retry, the same job as
//!   `mutex_cache`;
//! - `mutex_cache`: what users write today, and the shape of Go's `ReuseTokenSource`: the
//!   token in an `Arc<tokio::sync::Mutex<Option<Token>>>`, locked by every request to check
//!   expiry (and to fetch under the lock when needed), and a boxed future, since an `async`
//!   block cannot be named. It adds the header and the study parameter; it does not retry.
//!
//! One iteration is one request: criterion's time is wall time per request over all tasks,
//! and its throughput is requests per second. Each task sends its share of the requests one
//! after another. With `W` workers (`W` = the number of cores, printed first), at most
//! `min(tasks, W)` requests run at once, so the core time per request is criterion's time
//! times `min(tasks, W)`: flat per-request cost means that this stays the same from 1 to 64
//! tasks, and anything the tasks serialise on shows up as a rise.
//!
//! Ratios in the README: throughput of `blaze_auth` over `mutex_cache` at each task count
//! (target at 64: at least 1), and core time per request at N tasks over that at 1 task.

mod support;

use blaze_auth::{AccessToken, BlazeAuthLayer, BoxError, NoReplay};
use bytes::Bytes;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput, measurement::WallTime};
use http::{HeaderValue, Request, header::AUTHORIZATION};
use http_body_util::Full;
use std::{
    fmt,
    future::Future,
    hint::black_box,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};
use support::{Ok200, STUDY, TOKEN, get, source, with_study};
use tokio::{runtime::Runtime, sync::Mutex, time::Instant};
use tower::{Layer, Service, ServiceExt};
use tower_http::auth::AddAuthorization;

const TASKS: [u64; 4] = [1, 2, 4, 64];

type Body = Full<Bytes>;

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    contention(&mut criterion);
    criterion.final_summary();
}

fn contention(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let workers = rt.metrics().num_workers();
    println!("contention: {workers} worker threads");

    let add_authorization = AddAuthorization::bearer(Ok200, TOKEN);
    let blaze_auth = BlazeAuthLayer::new(source(), STUDY).layer(Ok200);
    let no_replay = BlazeAuthLayer::new(source(), STUDY)
        .replay(NoReplay)
        .layer(Ok200);
    let mutex_cache = MutexCache::new(Ok200);
    // Fetch and cache the tokens before anything is measured.
    rt.block_on(send(blaze_auth.clone(), 1));
    rt.block_on(send(no_replay.clone(), 1));
    rt.block_on(send(mutex_cache.clone(), 1));

    let mut group = c.benchmark_group("contention");
    group.throughput(Throughput::Elements(1));
    for tasks in TASKS {
        bench(&mut group, &rt, "bare", &Ok200, tasks);
        bench(
            &mut group,
            &rt,
            "add_authorization",
            &add_authorization,
            tasks,
        );
        bench(&mut group, &rt, "blaze_auth", &blaze_auth, tasks);
        bench(&mut group, &rt, "blaze_auth_no_replay", &no_replay, tasks);
        bench(&mut group, &rt, "mutex_cache", &mutex_cache, tasks);
    }
    group.finish();
}

fn bench<S>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    name: &str,
    service: &S,
    tasks: u64,
) where
    S: Service<Request<Body>> + Clone + Send + 'static,
    S::Error: fmt::Debug,
    S::Future: Send,
    S::Response: Send,
{
    group.bench_with_input(BenchmarkId::new(name, tasks), &tasks, |b, &tasks| {
        b.iter_custom(|iters| run(rt, service, tasks, iters))
    });
}

/// Sends `iters` requests through clones of `service` from `tasks` tasks; the wall time.
fn run<S>(rt: &Runtime, service: &S, tasks: u64, iters: u64) -> Duration
where
    S: Service<Request<Body>> + Clone + Send + 'static,
    S::Error: fmt::Debug,
    S::Future: Send,
    S::Response: Send,
{
    rt.block_on(async {
        let start = Instant::now();
        let handles: Vec<_> = (0..tasks)
            .map(|task| {
                // The first `iters % tasks` tasks send one more.
                let n = iters / tasks + u64::from(task < iters % tasks);
                tokio::spawn(send(service.clone(), n))
            })
            .collect();
        for handle in handles {
            handle.await.expect("task");
        }
        start.elapsed()
    })
}

/// Sends `n` requests one after another.
async fn send<S>(mut service: S, n: u64)
where
    S: Service<Request<Body>>,
    S::Error: fmt::Debug,
{
    for _ in 0..n {
        let ready = service.ready().await.expect("ready");
        let response = ready
            .call(black_box(get(Full::new(Bytes::new()))))
            .await
            .expect("200");
        black_box(response);
    }
}

/// The hand-rolled baseline: a token cache behind `tokio::sync::Mutex<Option<Token>>`.
#[derive(Clone)]
struct MutexCache<S> {
    inner: S,
    token: Arc<Mutex<Option<CachedToken>>>,
}

struct CachedToken {
    header: HeaderValue,
    expires_at: Instant,
}

impl<S> MutexCache<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            token: Arc::new(Mutex::new(None)),
        }
    }
}

impl<S> Service<Request<Body>> for MutexCache<S>
where
    S: Service<Request<Body>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let not_ready_inner = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, not_ready_inner);
        let token = Arc::clone(&self.token);
        Box::pin(async move {
            let header = {
                let mut cached = token.lock().await;
                match &*cached {
                    Some(token) if Instant::now() < token.expires_at => token.header.clone(),
                    _ => {
                        // Fetched under the lock: one fetch, and every other request waits.
                        let token = support::token()?;
                        let header = header_value(&token);
                        *cached = Some(CachedToken {
                            header: header.clone(),
                            expires_at: token.expires_at().expect("tokens expire"),
                        });
                        header
                    }
                }
            };
            request.headers_mut().insert(AUTHORIZATION, header);
            let uri = std::mem::take(request.uri_mut());
            *request.uri_mut() = with_study(uri);
            inner.call(request).await.map_err(Into::into)
        })
    }
}

/// `Bearer <secret>`, marked sensitive, as a user would build it.
fn header_value(token: &AccessToken) -> HeaderValue {
    let mut value = HeaderValue::try_from(format!("{} {}", token.token_type(), token.secret()))
        .expect("valid header value");
    value.set_sensitive(true);
    value
}
