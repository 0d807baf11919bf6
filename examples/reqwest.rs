//! With reqwest: the layer over a `reqwest::Client`, paging through a Patient search.
//!
//! Without `BLAZE_*` variables it runs against the embedded stand-in and revokes every token
//! after the second page, to show the 401 → refresh → retry path; with them, against that
//! server.
//!
//! `cargo run --example reqwest --features reqwest`

use blaze_auth::{BlazeEnv, BoxError, ReqwestService, testing::StandIn};
use bytes::Bytes;
use serde_json::Value;
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
    // The one line: the layer wraps reqwest's client.
    let client = layer.layer(ReqwestService::new(reqwest::Client::new()));

    let mut url = Some(format!("{}/Patient?_count=50", env.api_url()));
    let (mut pages, mut patients) = (0, 0);
    while let Some(current) = url {
        let request = http::Request::get(current).body(Bytes::new())?;
        let response = reqwest::Response::from(client.clone().oneshot(request).await?);
        let bundle: Value = serde_json::from_str(&response.error_for_status()?.text().await?)?;
        pages += 1;
        patients += bundle["entry"].as_array().map_or(0, Vec::len);
        if let (Some(stand_in), 2) = (&stand_in, pages) {
            stand_in.revoke_all_tokens();
            println!("(the server revokes every token after page 2)");
        }
        url = bundle["link"].as_array().and_then(|links| {
            let next = links.iter().find(|link| link["relation"] == "next")?;
            next["url"].as_str().map(str::to_owned)
        });
    }
    println!("Patient: {patients} resources in {pages} pages");
    let metrics = layer.metrics();
    println!(
        "token fetches: {}, retries after 401: {}",
        metrics.token_fetches, metrics.retries
    );
    Ok(())
}
