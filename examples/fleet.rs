//! A fleet of processes against one token endpoint, with and without `RedisShared`: prints
//! the token fetches per minute of each run.
//!
//! The fleet is made of real OS processes: this example runs itself again once per process
//! (`fleet --process ...`), and each child has its own runtime, layer (its own in-memory
//! token cache), `ClientCredentials` and, in the second run, its own `RedisShared` with its
//! own Redis connection. They all talk to the embedded Blaze stand-in, which runs in the
//! parent and whose tokens live a few seconds so that the runs are short. Redis is
//! `REDIS_URL` if set, else a `redis-server` started on a free port (and stopped at the end).
//!
//! `cargo run --example fleet --features redis -- [PROCESSES] [SECONDS]` (default 8, 10)

use blaze_auth::{
    BlazeAuth, BlazeAuthLayer, BoxError, ClientCredentials, RedisShared, TokenSource,
    testing::{DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, DEMO_STUDY, StandIn},
};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use std::{
    io::Read,
    net::{Ipv4Addr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::Duration,
};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

/// How long the stand-in's tokens live: the layer refreshes them at half that.
const TOKEN_LIFETIME: Duration = Duration::from_secs(4);

#[tokio::main]
async fn main() {
    if let Err(error) = run().await {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let first = args.next();
    if first.as_deref() == Some("--process") {
        return process_main(args).await;
    }
    let processes: usize = first.map_or(Ok(8), |n| n.parse())?;
    let seconds: u64 = args.next().map_or(Ok(10), |n| n.parse())?;
    let run_for = Duration::from_secs(seconds);

    let (redis_url, _server) = match std::env::var("REDIS_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let server = RedisServer::start()?;
            (server.url(), Some(server))
        }
    };
    let stand_in = StandIn::builder()
        .token_lifetime(TOKEN_LIFETIME)
        .start()
        .await?;
    println!(
        "{processes} processes, {seconds} s per run, tokens live {} s",
        TOKEN_LIFETIME.as_secs()
    );

    let mut per_minute = Vec::new();
    for shared in [false, true] {
        let before = stand_in.tokens_issued();
        // If a spawn or a process fails, the guards kill and reap every process started.
        let mut fleet = Vec::new();
        for _ in 0..processes {
            let redis = if shared {
                // A fresh key space per run of the example.
                let prefix = format!("blaze-auth-fleet-{}:", std::process::id());
                vec![redis_url.clone(), prefix]
            } else {
                Vec::new()
            };
            let child = ChildGuard::spawn(
                Command::new(std::env::current_exe()?)
                    .arg("--process")
                    .arg(stand_in.base_url())
                    .arg(stand_in.api_url())
                    .arg(seconds.to_string())
                    .args(redis)
                    .stdout(Stdio::piped()),
            )?;
            fleet.push(child);
        }
        // The children run while the stand-in serves them from this runtime.
        let requests = tokio::task::spawn_blocking(move || {
            let mut requests = 0;
            for mut child in fleet {
                requests += child.output()?.trim().parse::<u64>()?;
            }
            Ok::<_, BoxError>(requests)
        })
        .await??;
        let fetches = stand_in.tokens_issued() - before;
        let rate = fetches as f64 * 60.0 / run_for.as_secs_f64();
        per_minute.push(rate);
        println!(
            "{:<17} {requests:>6} requests, {fetches:>4} token fetches = {rate:>6.0} per minute",
            if shared {
                "with RedisShared:"
            } else {
                "without:"
            },
        );
    }
    println!(
        "the shared cache fetched {:.1}x fewer tokens",
        per_minute[0] / per_minute[1].max(f64::MIN_POSITIVE)
    );
    Ok(())
}

/// One process of the fleet: `--process STAND_IN_URL API_URL SECONDS [REDIS_URL KEY_PREFIX]`;
/// prints how many requests it made.
async fn process_main(mut args: impl Iterator<Item = String>) -> Result<(), BoxError> {
    let stand_in = args.next().ok_or("no stand-in URL")?;
    let api_url = args.next().ok_or("no API URL")?;
    let seconds: u64 = args.next().ok_or("no duration")?.parse()?;
    let source = ClientCredentials::blaze(&stand_in, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET).build()?;
    let client = match (args.next(), args.next()) {
        (Some(redis_url), Some(prefix)) => {
            let key = source.shared_key();
            let shared = RedisShared::builder(source, key)
                .redis_url(&redis_url)
                .key_prefix(&prefix)
                .build()?;
            process(shared)
        }
        _ => process(source),
    };
    let done = requests(client, api_url, Duration::from_secs(seconds)).await?;
    println!("{done}");
    Ok(())
}

type Process = BlazeAuth<Client<HttpConnector, Full<Bytes>>>;

/// One process: a layer of its own over hyper-util's client.
fn process(source: impl TokenSource + 'static) -> Process {
    let layer = BlazeAuthLayer::new(source, DEMO_STUDY);
    layer.layer(Client::builder(TokioExecutor::new()).build_http())
}

/// Reads a Patient every 20 ms until `run_for` is over; returns how many.
async fn requests(client: Process, api_url: String, run_for: Duration) -> Result<u64, BoxError> {
    let end = Instant::now() + run_for;
    let mut done = 0;
    while Instant::now() < end {
        let request =
            http::Request::get(format!("{api_url}/Patient/p-0001")).body(Full::default())?;
        let response = client.clone().oneshot(request).await?;
        if !response.status().is_success() {
            return Err(format!("the stand-in answered {}", response.status()).into());
        }
        done += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(done)
}

/// A child process, killed and waited for when dropped: none outlives the parent, whatever
/// error ends its run.
struct ChildGuard(Child);

impl ChildGuard {
    fn spawn(command: &mut Command) -> std::io::Result<Self> {
        command.spawn().map(Self)
    }

    /// Waits for the process to exit; returns what it printed, or an error if it failed.
    fn output(&mut self) -> Result<String, BoxError> {
        let mut stdout = String::new();
        if let Some(mut pipe) = self.0.stdout.take() {
            pipe.read_to_string(&mut stdout)?;
        }
        let status = self.0.wait()?;
        if !status.success() {
            return Err(format!("a process failed: {status}").into());
        }
        Ok(stdout)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Both are no-ops for a process already waited for.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `redis-server` on a free port of 127.0.0.1, without persistence, stopped on drop.
struct RedisServer {
    port: u16,
    _process: ChildGuard,
}

impl RedisServer {
    fn start() -> Result<Self, BoxError> {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let _process = ChildGuard::spawn(
            Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null()),
        )
        .map_err(|e| format!("cannot start redis-server ({e}): install it or set REDIS_URL"))?;
        let server = Self { port, _process };
        for _ in 0..500 {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err("redis-server did not start".into())
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}
