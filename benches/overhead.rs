//! `overhead`: what the layer costs one request, on one task, with the token cached.
//!
//! Five stacks around the same inner service, an immediately ready one that answers 200:
//!
//! - `a_bare`: the inner service alone;
//! - `b_tower_http_add_authorization`: tower-http's `AddAuthorization` with a fixed bearer
//!   token, the floor for "add a header";
//! - `c_hand_written`: the least our job needs, written here: insert a pre-built
//!   `Authorization` value and rebuild the URI with a pre-encoded `researchstudy` pair;
//! - `d_blaze_auth_clone_body`: [`BlazeAuth`] with a `Clone` body, so the request is copied
//!   for a retry after 401 (the default);
//! - `e_blaze_auth_no_replay`: [`BlazeAuth`] with a body that is not `Clone`, and `NoReplay`;
//! - `f_blaze_auth_study_in_uri`: `d` with a URI that names the study already, as Blaze's
//!   paging links do, which the layer leaves as it is: `d` without the URI rebuild.
//!
//! Each request is a FHIR search (`GET`, an absolute URI with a query, an `Accept` header, an
//! empty body), built before the clock starts, in chunks of [`CHUNK`]; the clock covers
//! `ready().await`, `call`, awaiting the response and dropping it.
//!
//! Ratios: criterion prints the mean time per request of each stack; the README divides
//! `d` and `e` by `c` (target: `d / c <= 1.3`), and `b` and `c` by `a`. The VM's speed drifts
//! between benches run one after the other by as much as those ratios, so after criterion
//! the bench also times all stacks in turn, 15 rounds of 200,000 requests each, and prints
//! the median of the rounds' ratios (`overhead/interleaved`): the figures the README reports.
//!
//! Before criterion runs, the heap allocations per request of every stack are counted by the
//! global allocator below (10,000 requests, outside any timing) and printed as
//! `allocations per request`.

mod support;

use blaze_auth::{BlazeAuth, BlazeAuthLayer, NoReplay};
use bytes::Bytes;
use criterion::{BenchmarkGroup, Criterion, measurement::WallTime};
use http::{
    HeaderValue, Request, Uri,
    header::{ACCEPT, AUTHORIZATION},
};
use http_body_util::Full;
use std::{
    alloc::{GlobalAlloc, Layout, System},
    fmt,
    hint::black_box,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    task::{Context, Poll},
    time::{Duration, Instant},
};
use support::{Ok200, STUDY, TOKEN, get, source, with_study};
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt};
use tower_http::auth::AddAuthorization;

/// A next-page link as Blaze sends it: the study is in it already.
const PAGING_LINK: &str = "https://apigateway.apps.stageapi.mskcc.org/msk-apim/external/v2/crit/blaze/api/Observation?researchstudy=FHIR-T&_count=50&__t=17&__page-id=AAAAAAAAAAA";
/// Requests built ahead of one timed stretch.
const CHUNK: u64 = 1024;
/// Requests whose allocations are counted.
const COUNTED: u64 = 10_000;

fn main() {
    let rt = runtime();
    let mut stacks = Stacks::new(&rt);
    if let Ok(stack) = std::env::var("OVERHEAD_PROFILE") {
        stacks.each(&mut Profile { rt: &rt, stack });
        return;
    }
    report_allocations(&rt, &mut stacks);
    let mut criterion = Criterion::default().configure_from_args();
    let mut group = criterion.benchmark_group("overhead");
    stacks.each(&mut Bench {
        rt: &rt,
        group: &mut group,
    });
    group.finish();
    criterion.final_summary();
    report_interleaved(&rt, &mut stacks);
}

/// The stacks other than the bare service, built once, their tokens fetched and cached.
struct Stacks {
    add_authorization: AddAuthorization<Ok200>,
    hand_written: HandWritten<Ok200>,
    clone_body: BlazeAuth<Ok200>,
    no_replay: BlazeAuth<Ok200, NoReplay>,
}

impl Stacks {
    fn new(rt: &Runtime) -> Self {
        let mut stacks = Self {
            add_authorization: AddAuthorization::bearer(Ok200, TOKEN),
            hand_written: HandWritten::new(Ok200),
            clone_body: BlazeAuthLayer::new(source(), STUDY).layer(Ok200),
            no_replay: BlazeAuthLayer::new(source(), STUDY)
                .replay(NoReplay)
                .layer(Ok200),
        };
        rt.block_on(send_all(&mut stacks.clone_body, vec![clone_body()]));
        rt.block_on(send_all(&mut stacks.no_replay, vec![streaming_body()]));
        stacks
    }

    /// Hands each stack, with its name and its requests, to `visit`.
    fn each(&mut self, visit: &mut impl Visit) {
        visit.stack("a_bare", &mut Ok200, clone_body);
        visit.stack(
            "b_tower_http_add_authorization",
            &mut self.add_authorization,
            clone_body,
        );
        visit.stack("c_hand_written", &mut self.hand_written, clone_body);
        visit.stack("d_blaze_auth_clone_body", &mut self.clone_body, clone_body);
        visit.stack(
            "e_blaze_auth_no_replay",
            &mut self.no_replay,
            streaming_body,
        );
        visit.stack(
            "f_blaze_auth_study_in_uri",
            &mut self.clone_body,
            paging_link,
        );
    }
}

/// Something done with each stack.
trait Visit {
    fn stack<S, B>(&mut self, name: &str, service: &mut S, make: fn() -> Request<B>)
    where
        S: Service<Request<B>>,
        S::Error: fmt::Debug;
}

/// Times each stack with criterion.
struct Bench<'a, 'c> {
    rt: &'a Runtime,
    group: &'a mut BenchmarkGroup<'c, WallTime>,
}

impl Visit for Bench<'_, '_> {
    fn stack<S, B>(&mut self, name: &str, service: &mut S, make: fn() -> Request<B>)
    where
        S: Service<Request<B>>,
        S::Error: fmt::Debug,
    {
        let rt = self.rt;
        self.group.bench_function(name, |b| {
            b.iter_custom(|iters| time(rt, service, make, iters))
        });
    }
}

/// Counts each stack's heap allocations per request.
struct Allocations<'a> {
    rt: &'a Runtime,
    counts: Vec<(String, f64)>,
}

impl Visit for Allocations<'_> {
    fn stack<S, B>(&mut self, name: &str, service: &mut S, make: fn() -> Request<B>)
    where
        S: Service<Request<B>>,
        S::Error: fmt::Debug,
    {
        let requests: Vec<_> = (0..COUNTED).map(|_| make()).collect();
        let before = ALLOCATIONS.load(Ordering::SeqCst);
        COUNTING.store(true, Ordering::SeqCst);
        self.rt.block_on(send_all(service, requests));
        COUNTING.store(false, Ordering::SeqCst);
        let after = ALLOCATIONS.load(Ordering::SeqCst);
        // Lossless: a few tens of thousands at most.
        let count = (after - before) as f64 / COUNTED as f64;
        self.counts.push((name.to_owned(), count));
    }
}

/// Prints the heap allocations per request of each stack.
fn report_allocations(rt: &Runtime, stacks: &mut Stacks) {
    let mut allocations = Allocations {
        rt,
        counts: Vec::new(),
    };
    stacks.each(&mut allocations);
    println!("overhead: heap allocations per request ({COUNTED} requests each)");
    for (name, count) in &allocations.counts {
        println!("overhead/{name:<32} {count:>5.2} allocations per request");
    }
    // The layer may allocate only what the hand-written minimum does, plus the copy kept for
    // a retry: its list of headers (1) and a reference count for the rebuilt URI's bytes (1),
    // which the copy shares with the request. A new allocation fails here, in CI.
    let count = |name: &str| {
        let found = allocations.counts.iter().find(|(n, _)| n == name);
        found
            .map(|(_, count)| *count)
            .expect("every stack is counted")
    };
    let hand_written = count("c_hand_written");
    let clone_body = count("d_blaze_auth_clone_body");
    let no_replay = count("e_blaze_auth_no_replay");
    assert!(
        no_replay <= hand_written,
        "NoReplay allocates {no_replay} per request, the minimum {hand_written}"
    );
    assert!(
        clone_body <= hand_written + 2.0,
        "CloneBody allocates {clone_body} per request, the minimum {hand_written} + 2 for the copy"
    );
}

/// Times every stack in turn, round after round, and prints the median of each round's
/// ratios: the VM's speed drifts between criterion's benches, one stack after the other, by
/// as much as the ratios sought; in alternation all stacks see the same drift.
fn report_interleaved(rt: &Runtime, stacks: &mut Stacks) {
    // Quick when criterion only tests that the bench runs (no `--bench`: `cargo test`).
    let measuring = std::env::args().any(|arg| arg == "--bench");
    let (rounds, requests) = if measuring { (15, 200_000) } else { (1, 100) };
    let rounds: Vec<Round<'_>> = (0..rounds)
        .map(|_| {
            let mut round = Round {
                rt,
                requests,
                times: Vec::new(),
            };
            stacks.each(&mut round);
            round
        })
        .collect();
    if !measuring {
        println!("overhead/interleaved: one short round ran; figures only under cargo bench");
        return;
    }
    let ratio = |over: &str, under: &str| {
        let mut ratios: Vec<f64> = rounds
            .iter()
            .map(|r| r.time(over) / r.time(under))
            .collect();
        ratios.sort_by(f64::total_cmp);
        let (low, median, high) = (
            ratios[0],
            ratios[ratios.len() / 2],
            ratios[ratios.len() - 1],
        );
        println!(
            "overhead/interleaved: {over} / {under} = {median:.2} (median of {} rounds of \
             {requests} requests each, {low:.2} to {high:.2})",
            ratios.len()
        );
    };
    ratio("b_tower_http_add_authorization", "a_bare");
    ratio("c_hand_written", "a_bare");
    ratio("d_blaze_auth_clone_body", "c_hand_written");
    ratio("e_blaze_auth_no_replay", "c_hand_written");
    ratio("f_blaze_auth_study_in_uri", "c_hand_written");
}

/// One round of [`report_interleaved`]: each stack's time for `requests` requests.
struct Round<'a> {
    rt: &'a Runtime,
    requests: u64,
    times: Vec<(String, Duration)>,
}

impl Round<'_> {
    fn time(&self, name: &str) -> f64 {
        let found = self.times.iter().find(|(n, _)| n == name);
        found.expect("every stack is timed").1.as_secs_f64()
    }
}

impl Visit for Round<'_> {
    fn stack<S, B>(&mut self, name: &str, service: &mut S, make: fn() -> Request<B>)
    where
        S: Service<Request<B>>,
        S::Error: fmt::Debug,
    {
        let elapsed = time(self.rt, service, make, self.requests);
        self.times.push((name.to_owned(), elapsed));
    }
}

/// With `OVERHEAD_PROFILE=<stack>`, sends [`COUNTED`] requests through that stack and does
/// nothing else, for a profiler:
///
/// ```sh
/// OVERHEAD_PROFILE=d_blaze_auth_clone_body valgrind --tool=callgrind \
///     --toggle-collect='overhead::run_all*' target/release/deps/overhead-<hash>
/// ```
///
/// counts the instructions of exactly those requests (divide by 10,000).
struct Profile<'a> {
    rt: &'a Runtime,
    stack: String,
}

impl Visit for Profile<'_> {
    fn stack<S, B>(&mut self, name: &str, service: &mut S, make: fn() -> Request<B>)
    where
        S: Service<Request<B>>,
        S::Error: fmt::Debug,
    {
        if name == self.stack {
            let requests: Vec<_> = (0..COUNTED).map(|_| make()).collect();
            run_all(self.rt, service, requests);
        }
    }
}

/// [`send_all`] on `rt`; a function of its own for the profiler to find.
#[inline(never)]
fn run_all<S, B>(rt: &Runtime, service: &mut S, requests: Vec<Request<B>>)
where
    S: Service<Request<B>>,
    S::Error: fmt::Debug,
{
    rt.block_on(send_all(service, requests));
}

/// Sends `iters` requests from `make` through `service`, timing only the sending.
fn time<S, B>(rt: &Runtime, service: &mut S, make: fn() -> Request<B>, iters: u64) -> Duration
where
    S: Service<Request<B>>,
    S::Error: fmt::Debug,
{
    let mut elapsed = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(CHUNK);
        let requests: Vec<_> = (0..n).map(|_| make()).collect();
        let start = Instant::now();
        rt.block_on(send_all(service, requests));
        elapsed += start.elapsed();
        left -= n;
    }
    elapsed
}

async fn send_all<S, B>(service: &mut S, requests: Vec<Request<B>>)
where
    S: Service<Request<B>>,
    S::Error: fmt::Debug,
{
    for request in requests {
        let ready = service
            .ready()
            .await
            .expect("inner service is always ready");
        let response = ready.call(black_box(request)).await.expect("200");
        black_box(response);
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio runtime")
}

/// A `GET` with an empty, cloneable body.
fn clone_body() -> Request<Full<Bytes>> {
    with_accept(get(Full::new(Bytes::new())))
}

/// A `GET` of a paging link, which names the study already.
fn paging_link() -> Request<Full<Bytes>> {
    let mut request = clone_body();
    *request.uri_mut() = Uri::from_static(PAGING_LINK);
    request
}

/// A `GET` with an empty body that cannot be cloned, like hyper's `Incoming`.
fn streaming_body() -> Request<Streaming> {
    with_accept(get(Streaming(Full::new(Bytes::new()))))
}

/// FHIR clients send `Accept`: the request has a header map of its own before the layer's.
fn with_accept<B>(mut request: Request<B>) -> Request<B> {
    request
        .headers_mut()
        .insert(ACCEPT, HeaderValue::from_static("application/fhir+json"));
    request
}

/// A body type without `Clone`.
struct Streaming(#[allow(dead_code)] Full<Bytes>);

/// (c): the least the job needs. A pre-built `Authorization` value (shared bytes, like the
/// cached token's, so one reference count per request) and the study pair appended to the
/// query in a new `PathAndQuery`. No study check, no fixed headers, no copy for a retry.
#[derive(Clone)]
struct HandWritten<S> {
    inner: S,
    authorization: HeaderValue,
}

impl<S> HandWritten<S> {
    fn new(inner: S) -> Self {
        let mut authorization =
            HeaderValue::try_from(format!("Bearer {TOKEN}")).expect("valid header value");
        authorization.set_sensitive(true);
        Self {
            inner,
            authorization,
        }
    }
}

impl<S, B> Service<Request<B>> for HandWritten<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> S::Future {
        request
            .headers_mut()
            .insert(AUTHORIZATION, self.authorization.clone());
        let uri = std::mem::take(request.uri_mut());
        *request.uri_mut() = with_study(uri);
        self.inner.call(request)
    }
}

/// Counts heap allocations (`alloc`, `alloc_zeroed` and `realloc` calls) while [`COUNTING`].
struct CountingAllocator;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

impl CountingAllocator {
    fn count(&self) {
        // Off, a relaxed load: the timed runs pay next to nothing for the counter.
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds `GlobalAlloc`'s
// contract; the counter does not touch the memory.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.count();
        // SAFETY: the caller's guarantees for `layout` hold for `System` too.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.count();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.count();
        // SAFETY: `ptr` was allocated by `System` through this allocator, with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` through this allocator, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}
