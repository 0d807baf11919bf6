//! `redis-server` processes for the Redis tests: each test starts its own on a free port, so
//! it can stop, pause or restart it.

#![allow(dead_code, unreachable_pub)] // Each test binary uses a different part.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::Duration,
};

pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    listener.local_addr().unwrap().port()
}

/// A `redis-server` on 127.0.0.1, without persistence, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot start redis-server ({error}): these tests need a real Redis; \
                     install it (Debian: apt-get install redis-server) or run .ci/run"
                )
            });
        let mut server = Self {
            port,
            child: Some(child),
        };
        for _ in 0..500 {
            // A server that exited could not have the port: another answers there.
            let exited = server.child.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none(),
                "redis-server on port {port} exited: {exited:?}"
            );
            if server.ping() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server on port {port} did not answer PING within 5 s");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut answer = [0; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut answer).is_ok()
            && &answer == b"+PONG\r\n"
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

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.url()).unwrap();
        client.get_multiplexed_async_connection().await.unwrap()
    }

    pub async fn set(&self, key: &str, value: &str) {
        let mut con = self.connection().await;
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async::<()>(&mut con)
            .await
            .unwrap();
    }

    pub async fn get(&self, key: &str) -> Option<String> {
        let mut con = self.connection().await;
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut con)
            .await
            .unwrap()
    }

    pub async fn del(&self, key: &str) {
        let mut con = self.connection().await;
        redis::cmd("DEL")
            .arg(key)
            .query_async::<()>(&mut con)
            .await
            .unwrap();
    }

    pub async fn pexpire(&self, key: &str, ms: u64) {
        let mut con = self.connection().await;
        redis::cmd("PEXPIRE")
            .arg(key)
            .arg(ms)
            .query_async::<()>(&mut con)
            .await
            .unwrap();
    }

    pub async fn pttl(&self, key: &str) -> i64 {
        let mut con = self.connection().await;
        redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut con)
            .await
            .unwrap()
    }

    pub async fn keys(&self) -> Vec<String> {
        let mut con = self.connection().await;
        redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut con)
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL ends a paused server too.
        self.stop();
    }
}
