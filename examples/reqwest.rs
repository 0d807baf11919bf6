//! With reqwest: the layer over a `reqwest::Client`, and `BlazeMiddleware` in a
//! reqwest-middleware stack made from the same layer, paging through a Patient search each.
//! The two stacks share one token cache: one token for both.
//!
//! Without `BLAZE_*` variables it runs against the embedded stand-in and revokes every token
//! after the second page, to show the 401 → refresh → retry path; with them, against that
//! server.
//!
//! `cargo run --example reqwest --features reqwest-middleware`

use blaze_auth::{BlazeEnv, BlazeMiddleware, BoxError, ReqwestService, testing::StandIn};
use bytes::Bytes;
use serde_json::Value;
use std::future::Future;
use tower::{Layer, ServiceExt};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // TLS for reqwest: rustls over ring, the crypto library the rest of blaze-auth uses
    // (reqwest's `rustls-no-provider` feature; its `rustls` feature would bring aws-lc-rs).
    let _ = rustls::crypto::ring::default_provider().install_default();

    let (env, stand_in) = match BlazeEnv::from_env()? {
        Some(env) => (env, None),
        None => {
            let stand_in = StandIn::start().await?;
            (stand_in.blaze_env(), Some(stand_in))
        }
    };
    let layer = env.layer(env.client_credentials().build()?).build()?;
    let first_page = format!("{}/Patient?_count=50", env.api_url());
    let revoke_after_page_2 = |page| {
        if let (Some(stand_in), 2) = (&stand_in, page) {
            stand_in.revoke_all_tokens();
            println!("(the server revokes every token after page 2)");
        }
    };

    // A tower stack: the layer wraps reqwest's client in one line.
    let client = layer.layer(ReqwestService::new(reqwest::Client::new()));
    let get = |url: String| {
        let client = client.clone();
        async move {
            let request = http::Request::get(url).body(Bytes::new())?;
            Ok(reqwest::Response::from(client.oneshot(request).await?))
        }
    };
    let (pages, patients) = page_through(&first_page, get, revoke_after_page_2).await?;
    println!("tower stack:              Patient: {patients} resources in {pages} pages");

    // A reqwest-middleware stack with the same configuration and token cache.
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(BlazeMiddleware::from(&layer))
        .build();
    let get = |url: String| {
        let request = client.get(url);
        async move { Ok(request.send().await?) }
    };
    let (pages, patients) = page_through(&first_page, get, |_| {}).await?;
    println!("reqwest-middleware stack: Patient: {patients} resources in {pages} pages");

    let metrics = layer.metrics();
    println!(
        "token fetches: {}, retries after 401: {}",
        metrics.token_fetches, metrics.retries
    );
    Ok(())
}

/// Follows a search's `next` links; returns the pages and resources seen.
async fn page_through<F, Fut>(
    first_page: &str,
    get: F,
    mut after_page: impl FnMut(usize),
) -> Result<(usize, usize), BoxError>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<reqwest::Response, BoxError>>,
{
    let mut url = Some(first_page.to_owned());
    let (mut pages, mut resources) = (0, 0);
    while let Some(current) = url {
        let response = get(current).await?.error_for_status()?;
        let bundle: Value = serde_json::from_str(&response.text().await?)?;
        pages += 1;
        resources += bundle["entry"].as_array().map_or(0, Vec::len);
        after_page(pages);
        url = bundle["link"].as_array().and_then(|links| {
            let next = links.iter().find(|link| link["relation"] == "next")?;
            next["url"].as_str().map(str::to_owned)
        });
    }
    Ok((pages, resources))
}
