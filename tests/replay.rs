//! `BufferBody` over real sockets: a proxy on 127.0.0.1 forwards hyper's `Incoming` request
//! bodies through `BlazeAuth` to an upstream server that refuses the first token.

use blaze_auth::{AccessToken, BlazeAuthLayer, BufferBody, ReplayBody, token_fn};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header::AUTHORIZATION};
use http_body_util::{BodyExt, Full, channel::Channel};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};
use tokio::{net::TcpListener, sync::Notify};
use tower::{ServiceBuilder, ServiceExt};

#[tokio::test]
async fn a_proxied_streaming_body_reaches_the_upstream_whole_twice() {
    let upstream = Upstream::start(true).await;
    let proxy = proxy(upstream.addr, BufferBody::default()).await;
    let body = pattern(48 * 1024);
    let (mut tx, request_body) = Channel::<Bytes, Infallible>::new(1);
    let sending = {
        let body = body.clone();
        tokio::spawn(async move {
            for chunk in body.chunks(16 * 1024) {
                tx.send_data(Bytes::copy_from_slice(chunk)).await.unwrap();
            }
        })
    };
    let response = send(proxy.addr, request_body).await;
    sending.await.unwrap();
    assert_eq!(response, StatusCode::OK);
    assert_eq!(
        upstream.seen(),
        [seen("token-1", &body), seen("token-2", &body)]
    );
    assert_eq!(proxy.fetches.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_401_before_the_body_is_sent_is_retried_with_all_of_it() {
    // The upstream answers 401 without reading the body; the rest of the body is sent only
    // once the retry has reached the upstream.
    let upstream = Upstream::start(false).await;
    let proxy = proxy(upstream.addr, BufferBody::default()).await;
    let (mut tx, request_body) = Channel::<Bytes, Infallible>::new(1);
    let retried = Arc::clone(&upstream.retried);
    let sending = tokio::spawn(async move {
        tx.send_data(Bytes::from_static(b"first part, "))
            .await
            .unwrap();
        retried.notified().await;
        tx.send_data(Bytes::from_static(b"the rest")).await.unwrap();
    });
    let response = send(proxy.addr, request_body).await;
    sending.await.unwrap();
    assert_eq!(response, StatusCode::OK);
    assert_eq!(
        upstream.seen(),
        [
            seen("token-1", b""),
            seen("token-2", b"first part, the rest")
        ]
    );
}

#[tokio::test]
async fn over_the_cap_the_401_reaches_the_caller_after_one_call() {
    for streamed in [false, true] {
        let upstream = Upstream::start(true).await;
        let proxy = proxy(upstream.addr, BufferBody::new(1024)).await;
        let body = pattern(4 * 1024);
        let response = if streamed {
            // No length known up front: the record is dropped as it passes the cap.
            let (mut tx, request_body) = Channel::<Bytes, Infallible>::new(1);
            let chunks = body.clone();
            let sending = tokio::spawn(async move {
                for chunk in chunks.chunks(512) {
                    tx.send_data(Bytes::copy_from_slice(chunk)).await.unwrap();
                }
            });
            let response = send(proxy.addr, request_body).await;
            sending.await.unwrap();
            response
        } else {
            // A `content-length` over the cap: nothing is recorded.
            send(proxy.addr, Full::new(body.clone())).await
        };
        assert_eq!(response, StatusCode::UNAUTHORIZED, "streamed: {streamed}");
        assert_eq!(upstream.seen(), [seen("token-1", &body)]);
        // The refused token is dropped all the same: a fetch for the next request may have
        // started behind the 401, but no more than that one.
        assert!(proxy.fetches.load(Ordering::SeqCst) <= 2);
    }
}

/// The server behind the proxy: 401 to `token-1`, 200 to any other token.
struct Upstream {
    addr: SocketAddr,
    /// Each request's token and body (empty if it was not read).
    seen: Arc<Mutex<Vec<(String, Bytes)>>>,
    /// Notified when a request with another token than `token-1` arrives.
    retried: Arc<Notify>,
}

impl Upstream {
    /// `read_refused`: whether the body of a refused request is read before the 401.
    async fn start(read_refused: bool) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let retried = Arc::new(Notify::new());
        let (record, notify) = (Arc::clone(&seen), Arc::clone(&retried));
        let addr = serve(move |request: Request<Incoming>| {
            let (record, notify) = (Arc::clone(&record), Arc::clone(&notify));
            async move {
                let token = request.headers()[AUTHORIZATION].to_str().unwrap();
                let token = token.strip_prefix("Bearer ").unwrap().to_owned();
                let refused = token == "token-1";
                if !refused {
                    notify.notify_one();
                }
                let body = if refused && !read_refused {
                    Bytes::new()
                } else {
                    request.into_body().collect().await.unwrap().to_bytes()
                };
                record.lock().unwrap().push((token, body));
                let status = if refused {
                    StatusCode::UNAUTHORIZED
                } else {
                    StatusCode::OK
                };
                Response::builder()
                    .status(status)
                    .body(Full::default())
                    .unwrap()
            }
        })
        .await;
        Self {
            addr,
            seen,
            retried,
        }
    }

    fn seen(&self) -> Vec<(String, Bytes)> {
        self.seen.lock().unwrap().clone()
    }
}

struct Proxy {
    addr: SocketAddr,
    fetches: Arc<AtomicUsize>,
}

/// A proxy that sends what it receives to `upstream` through `BlazeAuth` with `replay`.
async fn proxy(upstream: SocketAddr, replay: BufferBody) -> Proxy {
    let fetches = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&fetches);
    let source = token_fn(move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move { AccessToken::bearer(&format!("token-{n}")) }
    });
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Incoming>>();
    let client = ServiceBuilder::new()
        .layer(BlazeAuthLayer::new(source, "FHIR-T").replay(replay))
        .service(client);
    let addr = serve(move |request: Request<Incoming>| {
        let client = client.clone();
        async move {
            let (mut parts, body) = request.into_parts();
            let path = parts.uri.path_and_query().unwrap();
            parts.uri = format!("http://{upstream}{path}").parse().unwrap();
            match client.oneshot(Request::from_parts(parts, body)).await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    let body = body.collect().await.unwrap().to_bytes();
                    Response::from_parts(parts, Full::new(body))
                }
                Err(error) => Response::builder()
                    .status(StatusCode::BAD_GATEWAY)
                    .body(Full::from(error.to_string()))
                    .unwrap(),
            }
        }
    })
    .await;
    Proxy { addr, fetches }
}

/// POSTs `body` to the proxy; returns the status of its answer.
async fn send<B>(proxy: SocketAddr, body: B) -> StatusCode
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let client = Client::builder(TokioExecutor::new()).build_http::<B>();
    let request = Request::post(format!("http://{proxy}/fhir/Bundle"))
        .body(body)
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(status != StatusCode::BAD_GATEWAY, "{body:?}");
    status
}

/// An HTTP/1 server on 127.0.0.1 answering every request with `handler`.
async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let response = handler(request);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn seen(token: &str, body: &[u8]) -> (String, Bytes) {
    (token.to_owned(), Bytes::copy_from_slice(body))
}

/// `len` bytes that differ from chunk to chunk.
fn pattern(len: usize) -> Bytes {
    (0..len).map(|i| (i % 251) as u8).collect()
}
