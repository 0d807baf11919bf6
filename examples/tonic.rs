//! A tonic client behind `BlazeAuthLayer`, against a local gRPC server that answers
//! UNAUTHENTICATED to the first token, as a gRPC service does once a token has expired.
//!
//! `cargo run --example tonic`
//!
//! gRPC says UNAUTHENTICATED in a trailers-only response (HTTP 200, `grpc-status: 16`), and
//! the layer takes it as a 401: it fetches a new token and sends the call again. For that it
//! needs the request body a second time, and tonic's cannot be cloned:
//!
//! - with `NoReplay`, the call is sent once and its UNAUTHENTICATED goes back to the caller;
//! - with `BufferBody`, as here, what is sent is recorded up to a cap (64 KiB by default) and
//!   replayed; a call whose body is bigger goes back with its UNAUTHENTICATED.

use blaze_auth::{AccessToken, BlazeAuthLayer, BoxError, BufferBody, ReplayBody, token_fn};
use bytes::{Buf, BufMut};
use http::uri::PathAndQuery;
use std::{
    convert::Infallible,
    sync::atomic::{AtomicUsize, Ordering},
};
use tonic::{
    Status,
    body::Body,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::{Channel, Server, server::TcpIncoming},
};
use tower::{ServiceBuilder, service_fn};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let server =
        Server::builder().serve_with_incoming(service_fn(serve), TcpIncoming::from(listener));
    tokio::spawn(server);

    static FETCHES: AtomicUsize = AtomicUsize::new(0);
    let source = token_fn(|_| async {
        let n = FETCHES.fetch_add(1, Ordering::SeqCst) + 1;
        AccessToken::bearer(&format!("token-{n}"))
    });
    let channel = Channel::from_shared(url)?.connect().await?;
    let client = ServiceBuilder::new()
        .layer(BlazeAuthLayer::new(source, "FHIR-T").replay(BufferBody::default()))
        // The layer hands on a `ReplayBody`; tonic's `Channel` takes its own body type.
        .map_request(|request: http::Request<ReplayBody<Body>>| request.map(Body::new))
        .service(channel);

    let mut client = tonic::client::Grpc::new(client);
    client.ready().await?;
    let path = PathAndQuery::from_static("/example.Echo/Echo");
    let request = tonic::Request::new("hello".to_owned());
    let reply = client.unary(request, path, Utf8).await?;
    println!(
        "{} (tokens fetched: {})",
        reply.into_inner(),
        FETCHES.load(Ordering::SeqCst)
    );
    Ok(())
}

/// The server: refuses `token-1`, echoes the message for any other token.
async fn serve(request: http::Request<Body>) -> Result<http::Response<Body>, Infallible> {
    let authorization = request.headers().get("authorization");
    if authorization.is_some_and(|value| value == "Bearer token-1") {
        println!("server: UNAUTHENTICATED, the token has expired");
        return Ok(Status::unauthenticated("token expired").into_http());
    }
    println!("server: call accepted");
    let echo = service_fn(|request: tonic::Request<String>| async move {
        let reply = format!("echo: {}", request.into_inner());
        Ok::<_, Status>(tonic::Response::new(reply))
    });
    Ok(tonic::server::Grpc::new(Utf8).unary(echo, request).await)
}

/// Messages as UTF-8 text: no protobuf code generation needed for the example.
#[derive(Clone, Copy)]
struct Utf8;

impl Codec for Utf8 {
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

impl Encoder for Utf8 {
    type Item = String;
    type Error = Status;

    fn encode(&mut self, item: String, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(item.as_bytes());
        Ok(())
    }
}

impl Decoder for Utf8 {
    type Item = String;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<String>, Status> {
        let text = String::from_utf8(src.copy_to_bytes(src.remaining()).into());
        text.map(Some)
            .map_err(|_| Status::invalid_argument("not UTF-8"))
    }
}
