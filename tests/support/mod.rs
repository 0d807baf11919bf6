//! A scripted HTTP server on 127.0.0.1 for the integration tests: it records every request
//! and answers each as the test's handler says.

#![allow(dead_code, unreachable_pub)] // Each test binary uses a different part.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
};
use tokio::{net::TcpListener, task::JoinSet};

/// A request as the server received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn body_str(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }

    pub fn form(&self) -> Vec<(String, String)> {
        form_urlencoded::parse(&self.body).into_owned().collect()
    }
}

/// What the server does with a request.
pub enum Reply {
    Respond(Response<Full<Bytes>>),
    /// Close the connection without answering.
    Reset,
}

pub fn json(status: u16, body: &str) -> Reply {
    text(status, "application/json", body)
}

pub fn text(status: u16, content_type: &str, body: &str) -> Reply {
    let mut response = Response::new(Full::from(body.to_owned()));
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    response
        .headers_mut()
        .insert("content-type", content_type.parse().unwrap());
    Reply::Respond(response)
}

pub fn token_json(token: &str, expires_in: u64) -> Reply {
    json(
        200,
        &format!(
            r#"{{"token_type":"Bearer","access_token":"{token}","scope":"full","expires_in":{expires_in},"consented_on":1656086348}}"#
        ),
    )
}

/// The running server; aborted on drop.
pub struct Server {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a server that answers every request with `handler(request, n)`, `n` counting
/// requests from 1.
pub async fn serve<F, Fut>(handler: F) -> Server
where
    F: Fn(Recorded, usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&requests);
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            let recorded = Arc::clone(&recorded);
            connections.spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let handler = handler.clone();
                    let recorded = Arc::clone(&recorded);
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map_err(std::io::Error::other)?
                            .to_bytes();
                        let request = Recorded {
                            method: parts.method,
                            uri: parts.uri,
                            headers: parts.headers,
                            body,
                        };
                        let n = {
                            let mut all = recorded.lock().unwrap();
                            all.push(request.clone());
                            all.len()
                        };
                        match handler(request, n).await {
                            Reply::Respond(response) => Ok(response),
                            Reply::Reset => Err(std::io::Error::other("reset")),
                        }
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Server {
        addr,
        requests,
        task,
    }
}
