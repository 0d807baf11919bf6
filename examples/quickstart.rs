//! The quickstart: OAuth 2.0 client credentials, the layer and hyper-util's client, fetching
//! every page of two searches from Blaze.
//!
//! Without `BLAZE_*` variables it runs against the embedded stand-in, and revokes every token
//! half-way to show the 401 → refresh → retry path. With them (see `BlazeEnv`) it runs the
//! same searches against that server: how a partner checks their credentials on staging.
//!
//! `cargo run --example quickstart`

mod common;

use blaze_auth::BoxError;
use std::collections::HashSet;

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
    let blaze = common::connect().await?;
    match &blaze.stand_in {
        Some(_) => println!("Blaze stand-in at {}", blaze.api_url),
        None => println!("Blaze at {}", blaze.api_url),
    }

    let searches = [
        ("Patient", "Patient?_count=50"),
        (
            "Observation",
            "Observation?code=http://loinc.org|777-3,http://loinc.org|751-8&_count=100",
        ),
    ];
    for (name, query) in searches {
        let mut ids = HashSet::new();
        let mut duplicates = 0;
        let url = format!("{}/{query}", blaze.api_url);
        let mut page = 0;
        let pages = common::search(&blaze.client, &url, |bundle| {
            page += 1;
            for resource in common::resources(bundle) {
                let id = resource["id"].as_str().unwrap_or_default().to_owned();
                duplicates += usize::from(!ids.insert(id));
            }
            // Half-way through the first search, the stand-in revokes every token it issued.
            if let (Some(stand_in), "Patient", 3) = (&blaze.stand_in, name, page) {
                stand_in.revoke_all_tokens();
                println!("  (the server revokes every token after page 3)");
            }
            Ok(())
        })
        .await?;
        println!(
            "{name:<12} {:>4} resources in {pages:>2} pages, {duplicates} duplicates",
            ids.len()
        );
    }

    let metrics = blaze.layer.metrics();
    println!(
        "token fetches: {}, retries after 401: {}, failed fetches: {}",
        metrics.token_fetches, metrics.retries, metrics.fetch_failures
    );
    if let Some(stand_in) = &blaze.stand_in {
        println!(
            "stand-in saw: {} API requests, {} answered 401, {} token requests",
            stand_in.api_requests(),
            stand_in.unauthorized_served(),
            stand_in.token_requests()
        );
    }
    Ok(())
}
