//! A TCP proxy between a Redis client and a `redis-server` that holds back chosen commands on
//! their way to Redis, or the replies to chosen commands on their way back: a Redis that is
//! slow, but within the client's op timeout, at the steps a test names.
//!
//! It reads RESP2 (what redis-rs speaks unless told otherwise) and panics on anything else,
//! so that a frame it cannot delimit fails the test instead of being delayed wrongly.

#![allow(dead_code, unreachable_pub)] // Each test binary uses a different part.

use std::{
    collections::VecDeque,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::mpsc,
    task::JoinHandle,
    time::Instant,
};

/// What the proxy holds back, and for how long.
#[derive(Clone, Copy, Debug)]
pub struct Delays {
    /// Commands held back on their way to Redis, by name (`EVALSHA`). An `EVALSHA` right
    /// after a `SCRIPT LOAD` is not: it is redis-rs running the script again after Redis
    /// answered `NOSCRIPT`, and holding back both would double the delay of one call.
    pub requests: &'static [&'static str],
    /// Commands whose replies are held back on their way to the client.
    pub replies: &'static [&'static str],
    /// How long each is held back. Frames keep their order: one behind a held-back frame
    /// waits for it.
    pub by: Duration,
}

/// The proxy, listening on 127.0.0.1 until dropped.
pub struct SlowProxy {
    pub port: u16,
    accept: JoinHandle<()>,
}

impl SlowProxy {
    /// A proxy in front of the `redis-server` on `redis_port`.
    pub async fn start(redis_port: u16, delays: Delays) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accept = tokio::spawn(async move {
            loop {
                let (client, _) = listener.accept().await.unwrap();
                let server = TcpStream::connect((Ipv4Addr::LOCALHOST, redis_port))
                    .await
                    .unwrap();
                relay(client, server, delays);
            }
        });
        Self { port, accept }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Relays one connection, both ways, until either side closes it.
fn relay(client: TcpStream, server: TcpStream, delays: Delays) {
    client.set_nodelay(true).unwrap();
    server.set_nodelay(true).unwrap();
    let (from_client, to_client) = client.into_split();
    let (from_server, to_server) = server.into_split();
    // The names of the commands sent and not yet answered, oldest first: Redis answers in
    // order, so each reply is to the front one.
    let pending = Arc::new(Mutex::new(VecDeque::<String>::new()));
    let sent = Arc::clone(&pending);
    let mut after_script_load = false;
    forward(from_client, to_server, move |frame| {
        let name = command_name(frame);
        let retry = after_script_load && name == "EVALSHA";
        after_script_load = name == "SCRIPT";
        let held = delays.requests.contains(&name.as_str()) && !retry;
        sent.lock().unwrap().push_back(name);
        if held { delays.by } else { Duration::ZERO }
    });
    forward(from_server, to_client, move |_| {
        let name = pending
            .lock()
            .unwrap()
            .pop_front()
            .expect("a reply to no command");
        if delays.replies.contains(&name.as_str()) {
            delays.by
        } else {
            Duration::ZERO
        }
    });
}

/// Copies RESP frames from `from` to `to`, each `delay(frame)` after it arrived, in order.
fn forward(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut delay: impl FnMut(&[u8]) -> Duration + Send + 'static,
) {
    let (frames, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    tokio::spawn(async move {
        let mut buffer = Vec::new();
        let mut last = Instant::now();
        loop {
            while let Some(len) = frame_len(&buffer) {
                let frame: Vec<u8> = buffer.drain(..len).collect();
                last = last.max(Instant::now() + delay(&frame));
                if frames.send((last, frame)).is_err() {
                    return;
                }
            }
            let mut chunk = [0; 16 * 1024];
            match from.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
    });
    tokio::spawn(async move {
        while let Some((at, frame)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&frame).await.is_err() {
                return;
            }
        }
    });
}

/// The length of the RESP2 frame at the start of `buffer`, once all of it is there.
fn frame_len(buffer: &[u8]) -> Option<usize> {
    let line = buffer.windows(2).position(|pair| pair == b"\r\n")?;
    let after_line = line + 2;
    let number = || -> i64 {
        let text = std::str::from_utf8(&buffer[1..line]).unwrap();
        text.parse()
            .unwrap_or_else(|_| panic!("not RESP2: {text:?}"))
    };
    match buffer[0] {
        b'+' | b'-' | b':' => Some(after_line),
        b'$' => match usize::try_from(number()) {
            // A null bulk string: `$-1`.
            Err(_) => Some(after_line),
            Ok(len) => Some(after_line + len + 2).filter(|&end| end <= buffer.len()),
        },
        b'*' => {
            let mut end = after_line;
            // A null array, `*-1`, has no elements.
            for _ in 0..number().max(0) {
                end += frame_len(&buffer[end..])?;
            }
            Some(end)
        }
        other => panic!("not RESP2: a frame starting with {:?}", other as char),
    }
}

/// The name of the command in `frame`, an array of bulk strings: `*3\r\n$3\r\nSET\r\n...`.
fn command_name(frame: &[u8]) -> String {
    let name = frame
        .split(|&byte| byte == b'\n')
        .nth(2)
        .expect("a command");
    String::from_utf8_lossy(name.strip_suffix(b"\r").unwrap_or(name)).to_uppercase()
}
