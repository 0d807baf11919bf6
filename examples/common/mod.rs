//! What the examples share: the settings from `BLAZE_*` variables or, without them, an
//! embedded stand-in; the client stack; FHIR search paging (`paging.rs`) and the retry policy
//! for transient errors (`retry.rs`). The tests include this module too, so what they test is
//! what the examples run.

#![allow(dead_code, unreachable_pub, unused_imports)] // Each example and test uses its part.

mod paging;
mod retry;

pub(crate) use paging::{Page, SearchError, Summary, get_json, search};
pub(crate) use retry::{TransientErrors, retry_after};

use blaze_auth::{
    BlazeAuth, BlazeAuthLayer, BlazeEnv, BoxError,
    testing::{StandIn, StandInBuilder},
};
use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tower::{ServiceBuilder, retry::Retry, retry::RetryLayer};

/// hyper-util's client over rustls.
pub(crate) type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The examples' stack: transient errors retried outside the layer, the layer, the client.
pub(crate) type BlazeClient = Retry<TransientErrors, BlazeAuth<HttpsClient>>;

/// The partner id the stand-in demands, as Blaze v2 does.
const DEMO_PARTNER_ID: &str = "demo-partner";

/// The settings the `BLAZE_*` variables give or, when none is set, those of a stand-in
/// started from `stand_in` (which then demands a partner id, as Blaze v2 does). The stand-in
/// serves as long as it is kept.
pub(crate) async fn env_or_stand_in(
    stand_in: StandInBuilder,
) -> Result<(BlazeEnv, Option<StandIn>), BoxError> {
    if let Some(env) = BlazeEnv::from_env()? {
        return Ok((env, None));
    }
    let stand_in = stand_in.require_partner_id(DEMO_PARTNER_ID).start().await?;
    Ok((stand_in.blaze_env(), Some(stand_in)))
}

/// hyper-util's client over rustls with the webpki roots; plain HTTP too, which the layer
/// allows for loopback (the stand-in) only.
pub(crate) fn https_client() -> HttpsClient {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(https)
}

/// The stack the quickstart builds step by step: `Retry` outside the layer (see `retry.rs`
/// for why), the layer, the client.
pub(crate) fn client(layer: BlazeAuthLayer) -> BlazeClient {
    ServiceBuilder::new()
        .layer(RetryLayer::new(TransientErrors::default()))
        .layer(layer)
        .service(https_client())
}
