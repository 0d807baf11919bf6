//! The quickstart: OAuth 2.0 client credentials, the layer and hyper-util's client, fetching
//! every page of two searches from Blaze.
//!
//! Without `BLAZE_*` variables it runs against the embedded stand-in, and revokes every token
//! half-way to show the 401 → refresh → retry path. With them (see `BlazeEnv`) it runs the
//! same searches against that server: how a partner checks their credentials on staging.
//!
//! `cargo run --example quickstart`

mod common;

use blaze_auth::{BlazeAuthLayer, BoxError, ClientCredentials, testing::StandIn};
use common::TransientErrors;
use tower::{ServiceBuilder, retry::RetryLayer};

#[tokio::main]
async fn main() {
    if let Err(error) = run().await {
        eprintln!("error: {error}");
        let mut source = error.source();
        while let Some(cause) = source {
            eprintln!("  caused by: {cause}");
            source = cause.source();
        }
        std::process::exit(1);
    }
}

async fn run() -> Result<(), BoxError> {
    // The settings: from the `BLAZE_*` variables, or those of a stand-in started here.
    let (env, stand_in) = common::env_or_stand_in(StandIn::builder()).await?;
    match &stand_in {
        Some(_) => println!("Blaze stand-in at {}", env.api_url()),
        None => println!("Blaze at {}", env.api_url()),
    }

    // 1. The token source: OAuth 2.0 client credentials, `client_secret_post` and scope
    //    `full` as Blaze wants them.
    let source: ClientCredentials = env.client_credentials().build()?;

    // 2. The layer: a cached token as `Authorization: Bearer`, `researchstudy=<study>` in
    //    every query, the partner id, credentials sent to Blaze's origin only, and one retry
    //    with a fresh token after a 401.
    let mut layer = BlazeAuthLayer::builder(source)
        .study(env.research_study())
        .origin(env.base_url());
    if let Some(partner_id) = env.partner_id() {
        layer = layer.partner_id(partner_id);
    }
    let layer = layer.build()?;

    // 3. The client: hyper-util's over rustls, under the layer, with tower's `Retry` on the
    //    outside for 429, 502, 503 and 504 (common/retry.rs says why outside).
    let client = ServiceBuilder::new()
        .layer(RetryLayer::new(TransientErrors::default()))
        .layer(layer.clone())
        .service(common::https_client());

    let searches = [
        ("Patient", "Patient?_count=50"),
        (
            "Observation",
            "Observation?code=http://loinc.org|777-3,http://loinc.org|751-8&_count=100",
        ),
    ];
    for (name, query) in searches {
        let url = format!("{}/{query}", env.api_url());
        // Every page in turn; the search fails if the pages do not add up to the `total`.
        let summary = common::search(&client, &url, |page| {
            // Half-way through the first search, the stand-in revokes every token it issued.
            if let (Some(stand_in), "Patient", 3) = (&stand_in, name, page.number) {
                stand_in.revoke_all_tokens();
                println!("  (the server revokes every token after page 3)");
            }
            Ok(())
        })
        .await?;
        println!(
            "{name:<12} {:>4} resources in {:>2} pages, {} duplicates",
            summary.matches,
            summary.pages,
            summary.duplicates.len()
        );
    }

    let metrics = layer.metrics();
    println!(
        "token fetches: {}, retries after 401: {}, failed fetches: {}",
        metrics.token_fetches, metrics.retries, metrics.fetch_failures
    );
    if let Some(stand_in) = &stand_in {
        println!(
            "stand-in saw: {} API requests, {} answered 401, {} token requests",
            stand_in.api_requests(),
            stand_in.unauthorized_served(),
            stand_in.token_requests()
        );
    }
    Ok(())
}
