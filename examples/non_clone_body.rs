//! A client whose request body is not `Clone`, as with tonic or a proxied hyper `Incoming`:
//! what the layer does when such a request meets a 401.
//!
//! `cargo run --example non_clone_body`
//!
//! With `NoReplay` the layer cannot send the request again: the 401 goes back to the caller as
//! it came. The refused token is dropped all the same and a new one fetched, so the next
//! request succeeds: a caller that retries by itself (as gRPC clients often do) recovers.

use blaze_auth::{
    BlazeAuthLayer, BoxError, ClientCredentials, NoReplay,
    testing::{DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, DEMO_STUDY, StandIn},
};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::Frame;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::{ServiceBuilder, ServiceExt};

type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A streaming body: sent once, never cloned.
fn streaming() -> Body {
    let frames = futures_util::stream::iter([Ok::<_, BoxError>(Frame::data(Bytes::new()))]);
    StreamBody::new(frames).boxed_unsync()
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let stand_in = StandIn::start().await?;
    let source = ClientCredentials::blaze(&stand_in.base_url(), DEMO_CLIENT_ID, DEMO_CLIENT_SECRET)
        .build()?;
    let layer = BlazeAuthLayer::builder(source)
        .study(DEMO_STUDY)
        .build()?
        .replay(NoReplay);
    let client = ServiceBuilder::new()
        .layer(layer.clone())
        .service(Client::builder(TokioExecutor::new()).build_http::<Body>());
    let patient = format!("{}/Patient/p-0001", stand_in.api_url());

    let response = client
        .clone()
        .oneshot(Request::get(&patient).body(streaming())?)
        .await?;
    println!("first request:             {}", response.status());

    stand_in.revoke_all_tokens();
    let response = client
        .clone()
        .oneshot(Request::get(&patient).body(streaming())?)
        .await?;
    println!(
        "after revocation:          {} (returned as it came: no copy to resend)",
        response.status()
    );
    let response = client
        .clone()
        .oneshot(Request::get(&patient).body(streaming())?)
        .await?;
    println!(
        "the next request:          {} (with a new token)",
        response.status()
    );
    println!(
        "token fetches:             {}",
        layer.metrics().token_fetches
    );
    Ok(())
}
