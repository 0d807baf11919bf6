//! `redis-server` processes for the Redis tests: each test starts its own, on free ports, so
//! it can stop, pause or restart them: one server ([`RedisServer`]) or a Redis Cluster of
//! three masters ([`RedisCluster`], made with `redis-cli --cluster create`).

#![allow(dead_code, unreachable_pub)] // Each test binary uses a different part.

use blaze_auth::RedisSharedBuilder;
use redis::aio::ConnectionLike;
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    listener.local_addr().unwrap().port()
}

/// A free port whose cluster bus port (+10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55_000 && TcpListener::bind((Ipv4Addr::LOCALHOST, port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// What the tests need of a Redis, one server or a cluster.
pub trait Backend {
    /// Points `builder` at this Redis.
    fn configure<S>(&self, builder: RedisSharedBuilder<S>) -> RedisSharedBuilder<S>;

    /// Stops the server that holds `key` (on a cluster, the master of its slot).
    fn stop_owner_of(&mut self, key: &str);

    /// Starts the server [`stop_owner_of`](Self::stop_owner_of) stopped again, empty, on its
    /// port, and waits until it serves.
    fn restart_owner(&mut self);

    /// A fresh connection for the test's own commands.
    fn connection(&self) -> impl Future<Output = impl ConnectionLike + Send> + Send;

    fn query<T: redis::FromRedisValue + Send>(
        &self,
        cmd: redis::Cmd,
    ) -> impl Future<Output = T> + Send
    where
        Self: Sync,
    {
        async move {
            let mut con = self.connection().await;
            cmd.query_async(&mut con).await.unwrap()
        }
    }

    fn set(&self, key: &str, value: &str) -> impl Future<Output = ()> + Send
    where
        Self: Sync,
    {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value);
        self.query(cmd)
    }

    fn get(&self, key: &str) -> impl Future<Output = Option<String>> + Send
    where
        Self: Sync,
    {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        self.query(cmd)
    }

    fn del(&self, key: &str) -> impl Future<Output = ()> + Send
    where
        Self: Sync,
    {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(key);
        self.query(cmd)
    }

    fn pexpire(&self, key: &str, ms: u64) -> impl Future<Output = ()> + Send
    where
        Self: Sync,
    {
        let mut cmd = redis::cmd("PEXPIRE");
        cmd.arg(key).arg(ms);
        self.query(cmd)
    }

    fn pttl(&self, key: &str) -> impl Future<Output = i64> + Send
    where
        Self: Sync,
    {
        let mut cmd = redis::cmd("PTTL");
        cmd.arg(key);
        self.query(cmd)
    }
}

/// A `redis-server` on 127.0.0.1, without persistence, killed on drop.
pub struct RedisServer {
    pub port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(free_port, Vec::new())
    }

    /// A server on a port from `free_port` with more `args`. A free port may be taken
    /// (another test's server, a client's ephemeral port) before the server binds it: then
    /// the server exits, and another port is tried.
    pub fn start_with(free_port: fn() -> u16, args: Vec<String>) -> Self {
        let mut server = Self {
            port: 0,
            args,
            child: None,
        };
        for _ in 0..10 {
            server.port = free_port();
            match server.try_start() {
                Ok(()) => return server,
                Err(error) => eprintln!("{error}; trying another port"),
            }
        }
        panic!("redis-server could not start on any of 10 free ports");
    }

    /// Starts the server again (after [`stop`](Self::stop)), on its port, with its args.
    pub fn restart(&mut self) {
        self.try_start().unwrap_or_else(|error| panic!("{error}"));
    }

    fn try_start(&mut self) -> Result<(), String> {
        let port = self.port;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot start redis-server ({error}): these tests need a real Redis; \
                     install it (Debian: apt-get install redis-server) or run .ci/run"
                )
            });
        let pid = child.id();
        self.child = Some(child);
        for _ in 0..500 {
            // A server that exited could not have the port: another may answer there.
            if let Some(exited) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("redis-server on port {port} exited: {exited}"));
            }
            if self.process_id() == Some(pid) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stop();
        Err(format!(
            "redis-server on port {port} did not answer within 5 s"
        ))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The process id of the server answering on the port, if one does: ours, or another
    /// that took the port first.
    fn process_id(&self) -> Option<u32> {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        stream.write_all(b"INFO server\r\n").ok()?;
        let mut answer = Vec::new();
        let mut chunk = [0; 4096];
        loop {
            let read = stream.read(&mut chunk).ok().filter(|&n| n > 0)?;
            answer.extend_from_slice(&chunk[..read]);
            let text = String::from_utf8_lossy(&answer);
            if let Some(line) = text.split("\r\n").find(|l| l.starts_with("process_id:")) {
                if text.contains(&format!("{line}\r\n")) {
                    return line["process_id:".len()..].parse().ok();
                }
            }
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the server keeps its connections and answers nothing.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        let status = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(status.success());
    }

    /// `redis-cli -p PORT args...`'s output.
    fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli (Debian: apt-get install redis-tools)");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    pub async fn keys(&self) -> Vec<String> {
        let mut cmd = redis::cmd("KEYS");
        cmd.arg("*");
        self.query(cmd).await
    }
}

impl Backend for RedisServer {
    fn configure<S>(&self, builder: RedisSharedBuilder<S>) -> RedisSharedBuilder<S> {
        builder.redis_url(&self.url())
    }

    fn stop_owner_of(&mut self, _: &str) {
        self.stop();
    }

    fn restart_owner(&mut self) {
        self.restart();
    }

    async fn connection(&self) -> impl ConnectionLike + Send {
        let client = redis::Client::open(self.url()).unwrap();
        client.get_multiplexed_async_connection().await.unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL ends a paused server too.
        self.stop();
    }
}

/// A Redis Cluster of three masters (no replicas) on 127.0.0.1, its files in a temporary
/// directory; killed and removed on drop.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    dir: PathBuf,
    /// The node [`Backend::stop_owner_of`] stopped.
    stopped: Option<usize>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "blaze-auth-cluster-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let nodes: Vec<RedisServer> = (0..3)
            .map(|node| {
                let args = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &format!("nodes-{node}.conf"),
                    "--cluster-node-timeout",
                    "1000",
                    "--dir",
                    dir.to_str().unwrap(),
                ];
                RedisServer::start_with(
                    free_cluster_port,
                    args.iter().map(|a| (*a).to_owned()).collect(),
                )
            })
            .collect();
        let ports: Vec<u16> = nodes.iter().map(|node| node.port).collect();
        let cluster = Self {
            nodes,
            dir,
            stopped: None,
        };
        let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli (Debian: apt-get install redis-tools)");
        assert!(status.success(), "redis-cli --cluster create: {status}");
        cluster.wait_until_ok();
        cluster
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Blocks until every running node says `cluster_state:ok` (10 s at most).
    pub fn wait_until_ok(&self) {
        for _ in 0..1000 {
            let ok = self
                .nodes
                .iter()
                .filter(|node| node.child.is_some())
                .all(|node| node.cli(&["cluster", "info"]).contains("cluster_state:ok"));
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the cluster did not reach cluster_state:ok");
    }

    /// The index of the master that holds `key`'s slot: the one that does not redirect.
    pub fn owner_of(&self, key: &str) -> usize {
        self.nodes
            .iter()
            .position(|node| !node.cli(&["get", key]).contains("MOVED"))
            .unwrap()
    }
}

impl Backend for RedisCluster {
    fn configure<S>(&self, builder: RedisSharedBuilder<S>) -> RedisSharedBuilder<S> {
        let urls = self.urls();
        let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
        builder.cluster_urls(&urls)
    }

    fn stop_owner_of(&mut self, key: &str) {
        let owner = self.owner_of(key);
        self.nodes[owner].stop();
        self.stopped = Some(owner);
    }

    fn restart_owner(&mut self) {
        // Its nodes.conf brings it back as the master of its slots.
        let stopped = self.stopped.take().expect("a stopped node");
        self.nodes[stopped].restart();
        self.wait_until_ok();
    }

    async fn connection(&self) -> impl ConnectionLike + Send {
        let client = redis::cluster::ClusterClient::new(self.urls()).unwrap();
        client.get_async_connection().await.unwrap()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
