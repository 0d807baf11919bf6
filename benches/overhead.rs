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
//! The heap allocations per request of the same stacks are counted, and bounded, by
//! `tests/allocations.rs`, which `cargo test` runs; the stacks and requests live in
//! `support` for both.

mod support;

use blaze_auth::{BlazeAuth, BlazeAuthLayer, NoReplay};
use bytes::Bytes;
use criterion::{BenchmarkGroup, Criterion, measurement::WallTime};
use http::{Request, Uri};
use http_body_util::Full;
use std::{
    fmt,
    time::{Duration, Instant},
};
use support::{HandWritten, Ok200, STUDY, TOKEN, clone_body, send_all, source, streaming_body};
use tokio::runtime::Runtime;
use tower::{Layer, Service};
use tower_http::auth::AddAuthorization;

/// A next-page link as Blaze sends it: the study is in it already.
const PAGING_LINK: &str = "https://apigateway.apps.stageapi.mskcc.org/msk-apim/external/v2/crit/blaze/api/Observation?researchstudy=FHIR-T&_count=50&__t=17&__page-id=AAAAAAAAAAA";
/// Requests built ahead of one timed stretch.
const CHUNK: u64 = 1024;
/// Requests the profiler's run sends.
const COUNTED: u64 = 10_000;

fn main() {
    let rt = runtime();
    let mut stacks = Stacks::new(&rt);
    if let Ok(stack) = std::env::var("OVERHEAD_PROFILE") {
        stacks.each(&mut Profile { rt: &rt, stack });
        return;
    }
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

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio runtime")
}

/// A `GET` of a paging link, which names the study already.
fn paging_link() -> Request<Full<Bytes>> {
    let mut request = clone_body();
    *request.uri_mut() = Uri::from_static(PAGING_LINK);
    request
}
