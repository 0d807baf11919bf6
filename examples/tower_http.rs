//! A production-shaped client stack: tower-http's tracing, timeout and redirects around the
//! Blaze layer, over hyper-util's client, against the embedded stand-in.
//!
//! `cargo run --example tower_http`
//!
//! The order, outermost first, and why:
//!
//! 1. `TraceLayer`: one span per call as the caller sees it, retries and redirects included.
//! 2. `TimeoutLayer`: bounds everything below: waiting for a token, the 401 retry, each
//!    redirect hop. A timeout inside the auth layer would bound each attempt instead, and a
//!    caller could wait for two of them.
//! 3. `FollowRedirectLayer`: above the auth layer, so that every hop passes through it again
//!    and the auth layer decides, per hop, whether that origin gets credentials (only the
//!    configured Blaze origin does: see `BlazeAuthLayerBuilder::origin`).
//! 4. `BlazeAuthLayer`: token, `researchstudy`, `x-partnerid`, retry once on 401.
//! 5. `map_response`: boxes the body, which `TimeoutLayer`'s synthetic response needs
//!    (`Default`); hyper's `Incoming` has no default.

use blaze_auth::{
    BlazeAuthLayer, BoxError, ClientCredentials,
    testing::{DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, DEMO_STUDY, StandIn},
};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use std::time::Duration;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::{follow_redirect::FollowRedirectLayer, timeout::TimeoutLayer, trace::TraceLayer};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter("info,blaze_auth=debug,tower_http=debug")
        .init();

    let stand_in = StandIn::start().await?;
    let source = ClientCredentials::blaze(&stand_in.base_url(), DEMO_CLIENT_ID, DEMO_CLIENT_SECRET)
        .build()?;
    let auth = BlazeAuthLayer::builder(source)
        .study(DEMO_STUDY)
        .origin(&stand_in.base_url())
        .build()?;

    let client = ServiceBuilder::new()
        .layer(TraceLayer::new_for_http())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            Duration::from_secs(30),
        ))
        .layer(FollowRedirectLayer::new())
        .layer(auth)
        .map_response(|response: Response<hyper::body::Incoming>| {
            response.map(|body| body.map_err(BoxError::from).boxed_unsync())
        })
        .service(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());

    let request =
        Request::get(format!("{}/Patient/p-0001", stand_in.api_url())).body(Full::default())?;
    let response = client.oneshot(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    let patient: serde_json::Value = serde_json::from_slice(&body)?;
    println!(
        "{status}: Patient {} born {}",
        patient["id"], patient["birthDate"]
    );
    Ok(())
}
