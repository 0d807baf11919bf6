//! `end_to_end`: requests per second over real sockets, with and without the layer.
//!
//! A minimal hyper HTTP/1.1 server on 127.0.0.1 (it answers 200 with an empty body) runs on a
//! runtime of its own, with one worker thread; the client, hyper-util's pooled client with
//! `TCP_NODELAY`, runs on another, also with one worker. So the two share the machine's two
//! cores as two processes would.
//!
//! - `bare/C`: the client alone;
//! - `hand_written/C`: the client inside the overhead bench's hand-written minimum (a ready
//!   `Authorization` value inserted, the study appended to the query): the same bytes on the
//!   wire as the layer's, so the server's share of the difference from `bare` (the longer
//!   URI and the `Authorization` header it parses) shows apart from the layer's;
//! - `blaze_auth/C`: the client inside [`BlazeAuth`](blaze_auth::BlazeAuth), token cached,
//!   bodies cloned for a retry (the default).
//!
//! `C` is 1 or 32 connections: C tasks, each sending its share of the requests one after
//! another (hyper-util's pool opens one connection per task that has a request in flight).
//! One iteration is one request: criterion's time is wall time per request, its throughput
//! requests per second.
//!
//! Ratio in the README: throughput of `blaze_auth/C` over `bare/C` (target: at least 0.97),
//! and over `hand_written/C`. A 3 % difference is within what a busy VM drifts between two
//! criterion benches run one after the other, so after criterion the bench also runs the
//! three stacks in turn, round after round (20 rounds of 5,000 requests on 1 connection, 30
//! of 20,000 on 32; each round starts with another stack), and prints the median of the
//! rounds' ratios (`end_to_end/interleaved/C`): the figures the README reports.

mod support;

use blaze_auth::BlazeAuthLayer;
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use http::{HeaderValue, Request, Response, Uri, header::ACCEPT};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use std::{convert::Infallible, fmt, hint::black_box, time::Duration};
use support::{HandWritten, PATH, STUDY, source};
use tokio::{net::TcpListener, runtime::Runtime, time::Instant};
use tower::{Layer, Service, ServiceExt};

const CONNECTIONS: [u64; 2] = [1, 32];

type Body = Full<Bytes>;

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    end_to_end(&mut criterion);
    criterion.final_summary();
}

fn end_to_end(c: &mut Criterion) {
    let server_rt = runtime("server");
    let listener = server_rt
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind 127.0.0.1");
    let address = listener.local_addr().expect("local address");
    server_rt.spawn(serve(listener));

    let client_rt = runtime("client");
    let uri: Uri = format!("http://{address}{PATH}").parse().expect("URI");
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let bare = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build::<_, Body>(connector);
    // The server's origin named, as a deployment names its gateway's (or relies on the
    // default scope, Blaze's gateways): both are settled by the scope's exact-match fast path.
    // Loopback in the default scope would take the full check (about 1,100 instructions more
    // a request, callgrind), a convenience for the stand-in, not what production runs.
    let blaze_auth = BlazeAuthLayer::builder(source())
        .study(STUDY)
        .origin(&format!("http://{address}"))
        .build()
        .expect("layer")
        .layer(bare.clone());
    let hand_written = HandWritten::new(bare.clone());
    // Fetch and cache the token; check that the server answers.
    client_rt.block_on(send(blaze_auth.clone(), uri.clone(), 1));
    client_rt.block_on(send(bare.clone(), uri.clone(), 1));
    client_rt.block_on(send(hand_written.clone(), uri.clone(), 1));

    // `E2E_PROFILE=bare|hand_written|blaze_auth`: 10,000 requests on 32 connections through one stack and
    // nothing else; callgrind's totals of the two, subtracted, are the layer's instructions.
    if let Ok(stack) = std::env::var("E2E_PROFILE") {
        let elapsed = match stack.as_str() {
            "bare" => run(&client_rt, &bare, &uri, 32, 10_000),
            "hand_written" => run(&client_rt, &hand_written, &uri, 32, 10_000),
            "blaze_auth" => run(&client_rt, &blaze_auth, &uri, 32, 10_000),
            other => panic!("E2E_PROFILE: no stack {other:?}"),
        };
        println!("end_to_end/{stack}: 10,000 requests in {elapsed:?}");
        return;
    }

    let mut group = c.benchmark_group("end_to_end");
    group.throughput(Throughput::Elements(1));
    for connections in CONNECTIONS {
        group.bench_with_input(
            BenchmarkId::new("bare", connections),
            &connections,
            |b, &connections| {
                b.iter_custom(|iters| run(&client_rt, &bare, &uri, connections, iters))
            },
        );
        group.bench_with_input(
            BenchmarkId::new("hand_written", connections),
            &connections,
            |b, &connections| {
                b.iter_custom(|iters| run(&client_rt, &hand_written, &uri, connections, iters))
            },
        );
        group.bench_with_input(
            BenchmarkId::new("blaze_auth", connections),
            &connections,
            |b, &connections| {
                b.iter_custom(|iters| run(&client_rt, &blaze_auth, &uri, connections, iters))
            },
        );
    }
    group.finish();

    // Quick when criterion only tests that the bench runs (no `--bench`: `cargo test`).
    let measuring = std::env::args().any(|arg| arg == "--bench");
    for connections in CONNECTIONS {
        // Short rounds, many of them: the VM's speed changes within seconds. One connection
        // waits on the VM's wake-ups (about 140 us a request), 32 do not (about 11 us).
        let (rounds, requests) = match (measuring, connections) {
            (false, _) => (1, 100),
            (true, 1) => (20, 5_000),
            (true, _) => (30, 20_000),
        };
        // Each round's wall times of bare, hand-written and layered, in that order.
        let rounds: Vec<[f64; 3]> = (0..rounds)
            .map(|round| {
                let mut times = [0.0; 3];
                // Each round starts with another stack, so that none always follows another.
                for turn in 0..3 {
                    let stack = (round + turn) % 3;
                    let elapsed = match stack {
                        0 => run(&client_rt, &bare, &uri, connections, requests),
                        1 => run(&client_rt, &hand_written, &uri, connections, requests),
                        _ => run(&client_rt, &blaze_auth, &uri, connections, requests),
                    };
                    times[stack] = elapsed.as_secs_f64();
                }
                times
            })
            .collect();
        if !measuring {
            println!("end_to_end/interleaved/{connections}: one short round ran; no figures");
            continue;
        }
        let keeps = |of: usize, over: usize, what: &str| {
            // Requests per second of `of` over those of `over`: the inverse of the times.
            let mut ratios: Vec<f64> = rounds.iter().map(|t| t[over] / t[of]).collect();
            ratios.sort_by(f64::total_cmp);
            println!(
                "end_to_end/interleaved/{connections}: {what} {:.1} % (median of {} rounds of \
                 {requests} requests each, {:.1} to {:.1} %)",
                100.0 * ratios[ratios.len() / 2],
                ratios.len(),
                100.0 * ratios[0],
                100.0 * ratios[ratios.len() - 1],
            );
        };
        keeps(2, 0, "blaze_auth keeps of bare's requests/s");
        keeps(1, 0, "hand_written keeps of bare's requests/s");
        keeps(2, 1, "blaze_auth keeps of hand_written's requests/s");
    }
}

fn runtime(name: &str) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(format!("end-to-end-{name}"))
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The server: HTTP/1.1, answers every request 200 with an empty body.
async fn serve(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_: Request<Incoming>| async {
                Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Sends `iters` requests from `connections` tasks; the wall time.
fn run<S>(rt: &Runtime, client: &S, uri: &Uri, connections: u64, iters: u64) -> Duration
where
    S: Service<Request<Body>, Response = Response<Incoming>> + Clone + Send + 'static,
    S::Error: fmt::Debug,
    S::Future: Send,
{
    rt.block_on(async {
        let start = Instant::now();
        let handles: Vec<_> = (0..connections)
            .map(|task| {
                let n = iters / connections + u64::from(task < iters % connections);
                tokio::spawn(send(client.clone(), uri.clone(), n))
            })
            .collect();
        for handle in handles {
            handle.await.expect("task");
        }
        start.elapsed()
    })
}

/// Sends `n` requests one after another, reading each response to its end.
async fn send<S>(mut client: S, uri: Uri, n: u64)
where
    S: Service<Request<Body>, Response = Response<Incoming>>,
    S::Error: fmt::Debug,
{
    for _ in 0..n {
        let mut request = Request::new(Full::new(Bytes::new()));
        *request.uri_mut() = uri.clone();
        request
            .headers_mut()
            .insert(ACCEPT, HeaderValue::from_static("application/fhir+json"));
        let ready = client.ready().await.expect("ready");
        let response = ready.call(request).await.expect("response");
        assert!(response.status().is_success(), "{}", response.status());
        let body = response.into_body().collect().await.expect("body");
        black_box(body);
    }
}
