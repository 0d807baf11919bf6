//! `RedisShared` across real OS processes: this test binary runs itself again as child
//! processes (the ignored `child_process` test is their entry point), each with its own
//! runtime, layer, `ClientCredentials`, Redis connection and clock, against one stand-in (in
//! the parent, over loopback HTTP) and one `redis-server`.
//!
//! These tests need `redis-server` on the `PATH` (Debian: `apt-get install redis-server`);
//! without it they fail, they do not skip.
#![cfg(all(feature = "redis", feature = "testing", feature = "rustls"))]

#[path = "support/redis_server.rs"]
mod redis_server;

use blaze_auth::{
    BlazeAuthLayer, BoxError, ClientCredentials, RedisMetrics, RedisShared,
    testing::{DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, DEMO_STUDY, StandIn, TokenFailure},
};
use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use redis_server::{Backend, RedisServer};
use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, mpsc},
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio::{sync::Semaphore, task::JoinSet};
use tower::{Layer, ServiceExt, service_fn};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_processes_with_an_expired_shared_token_make_one_token_request() {
    let fleet = Fleet::start().await;
    // The shared token has expired: every process needs a new one at once.
    fleet.plant_expired_token().await;

    // The token endpoint takes half a second: the processes meet while it works.
    fleet
        .stand_in
        .fail_token_requests(1, TokenFailure::Slow(Duration::from_millis(500)));
    let mut children = fleet.spawn_started(8, Mode::Burst(1000));
    for child in &mut children {
        child.go();
    }
    let reports: Vec<_> = children.into_iter().map(Running::finish).collect();

    assert_eq!(
        fleet.stand_in.token_requests(),
        1,
        "one token request for 8 processes x 1,000 requests"
    );
    for report in &reports {
        assert_eq!((report.ok, report.failed), (1000, 0), "{report:?}");
        assert_eq!(report.metrics.fallbacks, 0, "{report:?}");
    }
    let sum = |f: fn(&RedisMetrics) -> u64| reports.iter().map(|r| f(&r.metrics)).sum::<u64>();
    assert_eq!(sum(|m| m.source_fetches), 1);
    assert_eq!(
        sum(|m| m.shared_hits),
        7,
        "the other seven read it from Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_holder_killed_mid_fetch_is_taken_over_and_every_request_ends() {
    let fleet = Fleet::start().await;
    fleet.plant_expired_token().await;

    // Process A takes the lock and sends its token request, which the endpoint never answers.
    fleet.stand_in.fail_token_requests(1, TokenFailure::Hang);
    let mut holder = fleet.spawn(Mode::Burst(1));
    holder.go();
    wait_until("A's token request", || fleet.stand_in.token_requests() == 1).await;
    // As the lock holder (not a fallback without Redis): its renewals keep the lock.
    assert!(
        fleet.redis.get(&fleet.lock_key()).await.is_some(),
        "A holds the lock"
    );
    assert!(fleet.redis.pttl(&fleet.lock_key()).await > 0);

    // Seven more processes find A's lock and wait for its token; then A dies (SIGKILL): no
    // release, no more renewals. They start together, so that none has waited long when A
    // dies, however slowly the seven start.
    let mut survivors = fleet.spawn_started(7, Mode::Burst(1000));
    for survivor in &mut survivors {
        survivor.go();
    }
    holder.child.kill().unwrap();
    holder.child.wait().unwrap();

    let reports: Vec<_> = survivors.into_iter().map(Running::finish).collect();
    for report in &reports {
        assert_eq!((report.ok, report.failed), (1000, 0), "{report:?}");
        // None waited past `follower_wait` (that would be a wait timeout and a fallback).
        let metrics = &report.metrics;
        assert_eq!(
            (metrics.wait_timeouts, metrics.fallbacks),
            (0, 0),
            "{report:?}"
        );
    }
    let takeovers: u64 = reports.iter().map(|r| r.metrics.source_fetches).sum();
    assert_eq!(
        takeovers, 1,
        "one survivor took the lock over after A's lease"
    );
    assert_eq!(fleet.stand_in.token_requests(), 2, "A's and the taker's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_costs_the_fleet_one_schedule_of_token_requests_not_one_per_process() {
    let fleet = Fleet::start().await;
    let outage = Duration::from_secs(10);
    fleet.stand_in.fail_token_requests(
        usize::MAX,
        TokenFailure::Status(StatusCode::SERVICE_UNAVAILABLE),
    );

    // Eight processes send a request every 20 ms; their layers ask for a token at each one
    // (no cool-down of their own), so only the shared cool-down keeps them off the endpoint.
    // They start together: the outage is timed from their first requests.
    let mut children = fleet.spawn_started(8, Mode::Steady);
    for child in &mut children {
        child.go();
    }
    tokio::time::sleep(outage).await;
    let during = fleet.stand_in.token_requests();
    fleet.stand_in.stop_failing_token_requests();

    // 1 s doubling: requests at 0, 1, 3 and 7 s, the next one at 15 s.
    let schedule = attempts_within(outage, FAILURE_COOLDOWN);
    assert_eq!(schedule, 4);
    assert!(
        (1..=schedule).contains(&during),
        "{during} token requests in the outage, for a schedule of {schedule}"
    );
    // The fleet's next attempt, when the cool-down running at the return ends, succeeds
    // for every process.
    for child in &children {
        child.wait_for("ok");
    }
    let after = fleet.stand_in.token_requests() - during;
    assert_eq!(after, 1, "one token request brings the whole fleet back");
    let reports: Vec<_> = children.into_iter().map(Running::finish).collect();
    for report in &reports {
        assert!(report.last_ok, "{report:?}");
        assert_eq!(report.metrics.fallbacks, 0, "{report:?}");
    }
    let cooldowns: u64 = reports.iter().map(|r| r.metrics.cooldowns).sum();
    assert!(cooldowns > 0);
}

/// The entry point of the child processes, not a test: the parent runs this binary again
/// with `--ignored --exact child_process` and the settings in `FLEET_*` variables. The child
/// prints `FLEET started` once its layer is built, waits for a line on its stdin, and
/// prints `FLEET report <json>` at the end.
#[test]
#[ignore = "the entry point of the child processes of the other tests in this file"]
fn child_process() {
    let Ok(mode) = std::env::var("FLEET_MODE") else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = runtime.block_on(child(&mode)).unwrap();
    println!("FLEET report {}", serde_json::to_string(&report).unwrap());
}

async fn child(mode: &str) -> Result<serde_json::Value, BoxError> {
    let var = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
    let millis = |name: &str| -> Result<Duration, BoxError> {
        Ok(Duration::from_millis(var(name)?.parse()?))
    };
    let source =
        ClientCredentials::blaze(&var("FLEET_STAND_IN")?, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET)
            .max_attempts(1)
            .build()?;
    let key = source.shared_key();
    let shared = RedisShared::builder(source, key)
        .redis_url(&var("FLEET_REDIS")?)
        .key_prefix(&var("FLEET_PREFIX")?)
        .lease(millis("FLEET_LEASE_MS")?)
        .follower_wait(millis("FLEET_FOLLOWER_WAIT_MS")?)
        .failure_cooldown(FAILURE_COOLDOWN)
        .poll_interval(Duration::from_millis(20))
        .op_timeout(Duration::from_millis(1500))
        .build()?;
    let layer = BlazeAuthLayer::builder(shared.clone())
        .study(DEMO_STUDY)
        .fetch_cooldown(Duration::ZERO)
        .build()?;
    // However many requests wait for the token at once, at most 16 connections: the parent
    // serves eight processes.
    let connections = Arc::new(Semaphore::new(16));
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let client = layer.layer(service_fn(move |request: http::Request<Full<Bytes>>| {
        let (connections, http) = (Arc::clone(&connections), http.clone());
        async move {
            let _permit = connections.acquire_owned().await?;
            Ok::<_, BoxError>(http.request(request).await?)
        }
    }));
    println!("FLEET started");
    // Then waits for the parent's go, so that the processes start together.
    tokio::task::spawn_blocking(|| std::io::stdin().lines().next()).await?;
    let patient = format!("{}/Patient/p-0001", var("FLEET_API")?);
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut last_ok = false;
    if mode == "steady" {
        // A request every 20 ms until the parent closes stdin.
        let stop = tokio::task::spawn_blocking(|| std::io::stdin().lines().count());
        while !stop.is_finished() {
            let request = http::Request::get(&patient).body(Full::default())?;
            let answer = client.clone().oneshot(request).await;
            last_ok = matches!(answer, Ok(response) if response.status().is_success());
            if !last_ok {
                failed += 1;
            } else if ok == 0 {
                ok += 1;
                println!("FLEET ok");
            } else {
                ok += 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    } else {
        let n: usize = mode.strip_prefix("burst:").ok_or("unknown mode")?.parse()?;
        let mut requests = JoinSet::new();
        for _ in 0..n {
            let request = http::Request::get(&patient).body(Full::default())?;
            requests.spawn(client.clone().oneshot(request));
        }
        while let Some(answer) = requests.join_next().await {
            match answer? {
                Ok(response) if response.status().is_success() => ok += 1,
                _ => failed += 1,
            }
        }
    }
    Ok(serde_json::json!({
        "ok": ok,
        "failed": failed,
        "last_ok": last_ok,
        "metrics": metrics_json(&shared.metrics()),
    }))
}

fn metrics_json(m: &RedisMetrics) -> serde_json::Value {
    serde_json::json!([
        m.shared_hits,
        m.source_fetches,
        m.waits,
        m.wait_timeouts,
        m.fallbacks,
        m.redis_errors,
        m.invalidations,
        m.cooldowns,
    ])
}

// Helpers.

/// What a child process does.
#[derive(Clone, Copy)]
enum Mode {
    /// Sends this many requests at once, then exits.
    Burst(usize),
    /// Sends a request every 20 ms until its stdin closes; prints `FLEET ok` at its first
    /// success.
    Steady,
}

/// The fleet's first cool-down after a failed token request.
const FAILURE_COOLDOWN: Duration = Duration::from_secs(1);

/// A stand-in and a `redis-server` for child processes to share.
struct Fleet {
    stand_in: StandIn,
    redis: RedisServer,
    prefix: String,
}

impl Fleet {
    async fn start() -> Self {
        Self {
            stand_in: StandIn::start().await.unwrap(),
            redis: RedisServer::start(),
            prefix: "fleet-test:".into(),
        }
    }

    /// The Redis key of the token the children share.
    fn token_key(&self) -> String {
        self.key("token")
    }

    /// The Redis key of the lock the children take to fetch the token.
    fn lock_key(&self) -> String {
        self.key("lock")
    }

    fn key(&self, name: &str) -> String {
        let source = ClientCredentials::blaze(
            &self.stand_in.base_url(),
            DEMO_CLIENT_ID,
            DEMO_CLIENT_SECRET,
        )
        .build()
        .unwrap();
        format!("{}{{{}}}:{name}", self.prefix, source.shared_key().digest())
    }

    /// Stores a shared token that expired a second ago.
    async fn plant_expired_token(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let json = serde_json::json!({
            "token_type": "Bearer",
            "access_token": "expired-token",
            "expires_at_ms": now - 1000,
            "stored_at_ms": now - 3_601_000,
        });
        let value = format!("{}:json:{json}", "0".repeat(32));
        self.redis.set(&self.token_key(), &value).await;
    }

    /// Spawns `n` children, all at once, and waits until each has built its layer.
    fn spawn_started(&self, n: usize, mode: Mode) -> Vec<Running> {
        let children: Vec<_> = (0..n).map(|_| self.spawn(mode)).collect();
        for child in &children {
            child.wait_for("started");
        }
        children
    }

    fn spawn(&self, mode: Mode) -> Running {
        let mode = match mode {
            Mode::Burst(n) => format!("burst:{n}"),
            Mode::Steady => "steady".into(),
        };
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "child_process", "--nocapture"])
            .args(["--test-threads", "1"])
            .env("FLEET_MODE", mode)
            .env("FLEET_STAND_IN", self.stand_in.base_url())
            .env("FLEET_API", self.stand_in.api_url())
            .env("FLEET_REDIS", self.redis.url())
            .env("FLEET_PREFIX", &self.prefix)
            // The op timeout (1.5 s) under a third of the lease, as `build` requires; the
            // wait above the lease, as `follower_wait` asks.
            .env("FLEET_LEASE_MS", "6000")
            .env("FLEET_FOLLOWER_WAIT_MS", "15000")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (lines, receiver) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // The harness's `test child_process ... ` may precede the first event.
                if let Some(at) = line.find("FLEET ") {
                    let _ = lines.send(line[at + "FLEET ".len()..].to_owned());
                }
            }
        });
        Running {
            stdin: child.stdin.take(),
            child,
            events: receiver,
        }
    }
}

/// A child process and the events it printed.
struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    events: mpsc::Receiver<String>,
}

/// What a child printed at its end.
#[derive(Debug)]
struct Report {
    ok: u64,
    failed: u64,
    /// Whether the last request succeeded.
    last_ok: bool,
    metrics: RedisMetrics,
}

impl Running {
    /// Blocks until the child prints `event`; a minute at most, so that a broken child
    /// fails the test instead of hanging it.
    fn wait_for(&self, event: &str) -> String {
        loop {
            let line = self
                .events
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("no `{event}` from the child: {e}"));
            if line.starts_with(event) {
                return line;
            }
        }
    }

    /// Tells the child to start its requests.
    fn go(&mut self) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Closes the child's stdin (its signal to stop, where it waits for one) and returns its
    /// report.
    fn finish(mut self) -> Report {
        drop(self.stdin.take());
        let line = self.wait_for("report");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "child: {status}");
        let json: serde_json::Value = serde_json::from_str(&line["report ".len()..]).unwrap();
        let m: Vec<u64> = serde_json::from_value(json["metrics"].clone()).unwrap();
        let mut metrics = RedisMetrics::default();
        [
            metrics.shared_hits,
            metrics.source_fetches,
            metrics.waits,
            metrics.wait_timeouts,
            metrics.fallbacks,
            metrics.redis_errors,
            metrics.invalidations,
            metrics.cooldowns,
        ] = m.try_into().unwrap();
        Report {
            ok: json["ok"].as_u64().unwrap(),
            failed: json["failed"].as_u64().unwrap(),
            last_ok: json["last_ok"].as_bool().unwrap(),
            metrics,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How many token requests a cool-down of `first`, doubling, lets through in `outage`.
fn attempts_within(outage: Duration, first: Duration) -> u64 {
    let (mut at, mut attempts) = (Duration::ZERO, 0);
    while at < outage {
        attempts += 1;
        at += first * 2u32.pow(attempts as u32 - 1);
    }
    attempts
}

/// Polls `condition` every 10 ms, for 30 s at most.
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}
