//! A real tonic client and server on 127.0.0.1: the server answers `UNAUTHENTICATED` to the
//! first token, in a trailers-only response (HTTP 200, `grpc-status: 16`); the layer refreshes
//! the token and replays the request body through `BufferBody`.

use blaze_auth::{AccessToken, BlazeAuthLayer, BufferBody, NoReplay, ReplayBody, token_fn};
use bytes::{Buf, BufMut};
use http::uri::PathAndQuery;
use std::{
    convert::Infallible,
    future::{Ready, ready},
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};
use tonic::{
    Code, Status,
    body::Body,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    server::{NamedService, UnaryService},
    service::InterceptorLayer,
    transport::{Channel, Server, server::TcpIncoming},
};
use tower::{Service, ServiceBuilder};

const ECHO: &str = "/blaze.test.Echo/Echo";

#[tokio::test]
async fn unauthenticated_is_refreshed_and_the_call_replayed() {
    let server = EchoServer::start().await;
    let (source, fetches) = counting_source();
    let channel = server.channel().await;
    let client = ServiceBuilder::new()
        .layer(BlazeAuthLayer::new(source, "FHIR-T").replay(BufferBody::default()))
        // tonic's `Channel` takes its own body type.
        .map_request(|request: http::Request<ReplayBody<Body>>| request.map(Body::new))
        .service(channel);
    let mut client = tonic::client::Grpc::new(client);
    client.ready().await.unwrap();
    let response = client
        .unary(
            tonic::Request::new("hello".to_owned()),
            PathAndQuery::from_static(ECHO),
            Utf8Codec,
        )
        .await
        .unwrap();
    assert_eq!(response.into_inner(), "echo: hello");
    assert_eq!(server.tokens(), ["Bearer token-1", "Bearer token-2"]);
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
    // The study travels in the query, and tonic's router dispatches on the path alone.
    assert_eq!(
        *server.served.lock().unwrap(),
        [format!("{ECHO}?researchstudy=FHIR-T")]
    );
}

#[tokio::test]
async fn without_replay_unauthenticated_reaches_the_caller() {
    let server = EchoServer::start().await;
    let (source, fetches) = counting_source();
    let client = ServiceBuilder::new()
        .layer(BlazeAuthLayer::new(source, "FHIR-T").replay(NoReplay))
        .service(server.channel().await);
    let mut client = tonic::client::Grpc::new(client);
    client.ready().await.unwrap();
    let status = client
        .unary(
            tonic::Request::new("hello".to_owned()),
            PathAndQuery::from_static(ECHO),
            Utf8Codec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(server.tokens(), ["Bearer token-1"]);
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
}

/// Issues `token-1`, `token-2`, ... and counts its fetches.
fn counting_source() -> (impl blaze_auth::TokenSource + 'static, Arc<AtomicUsize>) {
    let fetches = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&fetches);
    let source = token_fn(move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move { AccessToken::bearer(&format!("token-{n}")) }
    });
    (source, fetches)
}

/// A gRPC server with one unary method that echoes a UTF-8 message, behind an interceptor
/// that refuses `token-1` as an expired token.
#[derive(Clone)]
struct EchoServer {
    addr: SocketAddr,
    /// The `authorization` of every call the interceptor saw.
    tokens: Arc<Mutex<Vec<String>>>,
    /// The path and query of every call the service answered.
    served: Arc<Mutex<Vec<String>>>,
}

impl EchoServer {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Self {
            addr: listener.local_addr().unwrap(),
            tokens: Arc::default(),
            served: Arc::default(),
        };
        let tokens = Arc::clone(&server.tokens);
        let check = move |request: tonic::Request<()>| {
            let token = request.metadata().get("authorization");
            let token = token.and_then(|token| token.to_str().ok()).unwrap_or("");
            tokens.lock().unwrap().push(token.to_owned());
            if token == "Bearer token-1" {
                return Err(Status::unauthenticated("token expired"));
            }
            Ok(request)
        };
        let router = Server::builder()
            .layer(InterceptorLayer::new(check))
            .add_service(server.clone());
        tokio::spawn(router.serve_with_incoming(TcpIncoming::from(listener)));
        server
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    fn tokens(&self) -> Vec<String> {
        self.tokens.lock().unwrap().clone()
    }
}

impl NamedService for EchoServer {
    const NAME: &'static str = "blaze.test.Echo";
}

/// What tonic-build would generate for the service: dispatch on the path, decode, answer.
impl Service<http::Request<Body>> for EchoServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != ECHO {
            return Box::pin(ready(Ok(Status::unimplemented("").into_http())));
        }
        let path = request.uri().path_and_query().map(ToString::to_string);
        self.served.lock().unwrap().extend(path);
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(Utf8Codec);
            Ok(grpc.unary(Echo, request).await)
        })
    }
}

struct Echo;

impl UnaryService<String> for Echo {
    type Response = String;
    type Future = Ready<Result<tonic::Response<String>, Status>>;

    fn call(&mut self, request: tonic::Request<String>) -> Self::Future {
        ready(Ok(tonic::Response::new(format!(
            "echo: {}",
            request.into_inner()
        ))))
    }
}

/// Messages as UTF-8 text, so that no protobuf code generation is needed.
#[derive(Clone, Copy, Debug, Default)]
struct Utf8Codec;

impl Codec for Utf8Codec {
    type Encode = String;
    type Decode = String;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self {
        *self
    }

    fn decoder(&mut self) -> Self {
        *self
    }
}

impl Encoder for Utf8Codec {
    type Item = String;
    type Error = Status;

    fn encode(&mut self, item: String, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(item.as_bytes());
        Ok(())
    }
}

impl Decoder for Utf8Codec {
    type Item = String;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<String>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        String::from_utf8(bytes.into())
            .map(Some)
            .map_err(|_| Status::invalid_argument("not UTF-8"))
    }
}
