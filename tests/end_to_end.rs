//! The whole stack over real sockets: `ClientCredentials`, `BlazeAuthLayer` and hyper-util's
//! client against the embedded Blaze stand-in.
#![cfg(all(feature = "testing", feature = "oauth2", feature = "rustls"))]

use blaze_auth::{
    BlazeAuth, BlazeAuthLayer, BlazeAuthLayerBuilder, ClientCredentials, TokenError,
    testing::{DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, DEMO_STUDY, StandIn, TokenFailure},
};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::Value;
use std::{collections::HashSet, error::Error as _, time::Duration};
use tower::{Layer, ServiceExt};

type Blaze = BlazeAuth<Client<HttpConnector, Full<Bytes>>>;

fn layer(stand_in: &StandIn) -> BlazeAuthLayerBuilder {
    let source = ClientCredentials::blaze(&stand_in.base_url(), DEMO_CLIENT_ID, DEMO_CLIENT_SECRET)
        .build()
        .unwrap();
    BlazeAuthLayer::builder(source)
        .study(DEMO_STUDY)
        .partner_id("partner-1")
        .origin(&stand_in.base_url())
}

fn client(layer: &BlazeAuthLayer) -> Blaze {
    layer.layer(Client::builder(TokioExecutor::new()).build_http())
}

async fn get(client: &Blaze, url: &str) -> (StatusCode, Value) {
    let request = Request::get(url).body(Full::default()).unwrap();
    let response = client.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

fn next_link(bundle: &Value) -> Option<String> {
    let links = bundle["link"].as_array()?;
    let next = links.iter().find(|link| link["relation"] == "next")?;
    next["url"].as_str().map(str::to_owned)
}

fn ids(bundle: &Value) -> Vec<String> {
    let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
    let id = |entry: &Value| entry["resource"]["id"].as_str().unwrap().to_owned();
    entries.iter().map(id).collect()
}

/// Follows `next` links from `first`, calling `each_page` after every page.
async fn all_pages(client: &Blaze, first: String, mut each_page: impl FnMut(usize)) -> Vec<String> {
    let mut url = Some(first);
    let mut seen = Vec::new();
    let mut page = 0;
    while let Some(current) = url {
        assert!(current.matches("researchstudy=").count() <= 1, "{current}");
        let (status, bundle) = get(client, &current).await;
        assert_eq!(status, StatusCode::OK, "{current}: {bundle}");
        seen.extend(ids(&bundle));
        page += 1;
        each_page(page);
        url = next_link(&bundle);
    }
    seen
}

#[tokio::test]
async fn every_resource_arrives_exactly_once_across_pages() {
    let stand_in = StandIn::builder()
        .require_partner_id("partner-1")
        .start()
        .await
        .unwrap();
    let client = client(&layer(&stand_in).build().unwrap());
    for (resource, total) in [("Patient", 250), ("Observation", 500)] {
        let first = format!("{}/{resource}?_count=37", stand_in.api_url());
        let seen = all_pages(&client, first, |_| {}).await;
        let distinct: HashSet<_> = seen.iter().collect();
        assert_eq!(seen.len(), total, "{resource}");
        assert_eq!(distinct.len(), total, "{resource}: no duplicates");
    }
    // The stand-in answers 400 to a doubled `researchstudy`: none was sent.
    assert_eq!(stand_in.unauthorized_served(), 0);
    assert_eq!(stand_in.tokens_issued(), 1);
}

#[tokio::test]
async fn revoking_tokens_mid_run_costs_one_refresh_per_revocation() {
    let stand_in = StandIn::builder()
        .require_partner_id("partner-1")
        .start()
        .await
        .unwrap();
    let layer = layer(&stand_in).build().unwrap();
    let client = client(&layer);
    let first = format!("{}/Patient?_count=10", stand_in.api_url());
    let seen = all_pages(&client, first, |page| {
        if page % 5 == 0 {
            stand_in.revoke_all_tokens();
        }
    })
    .await;
    assert_eq!(seen.len(), 250);
    let revocations = 25 / 5 - 1; // after pages 5, 10, 15, 20; the one after 25 meets no request
    assert_eq!(stand_in.unauthorized_served(), revocations);
    assert_eq!(stand_in.tokens_issued(), 1 + revocations);
    assert_eq!(layer.metrics().retries, revocations);
}

#[tokio::test]
async fn short_lived_tokens_are_refreshed_before_they_expire() {
    // Tokens of 2 s under a 5 s workload: the refresh margin (capped at half the lifetime)
    // replaces each after about a second, so no request meets an expired token. Real
    // sockets need real time: paused time would fire the request timeouts while the
    // runtime waits on the sockets.
    let stand_in = StandIn::builder()
        .require_partner_id("partner-1")
        .token_lifetime(Duration::from_secs(2))
        .start()
        .await
        .unwrap();
    let client = client(&layer(&stand_in).build().unwrap());
    let url = format!("{}/Patient/p-0001", stand_in.api_url());
    let started = std::time::Instant::now();
    let mut requests = 0;
    while started.elapsed() < Duration::from_secs(5) {
        assert_eq!(get(&client, &url).await.0, StatusCode::OK);
        requests += 1;
    }
    assert_eq!(
        stand_in.unauthorized_served(),
        0,
        "after {requests} requests"
    );
    assert!(
        stand_in.tokens_issued() >= 4,
        "{}",
        stand_in.tokens_issued()
    );
}

#[tokio::test]
async fn no_request_is_lost_while_the_token_endpoint_is_down() {
    let stand_in = StandIn::builder()
        .require_partner_id("partner-1")
        .start()
        .await
        .unwrap();
    // Three failures: all three attempts of the first fetch.
    stand_in.fail_token_requests(3, TokenFailure::Status(StatusCode::SERVICE_UNAVAILABLE));
    let layer = layer(&stand_in)
        .fetch_cooldown(Duration::ZERO)
        .build()
        .unwrap();
    let client = client(&layer);
    let url = format!("{}/Patient/p-0001", stand_in.api_url());
    let requests = (0..200).map(|_| {
        let client = client.clone();
        let request = Request::get(&url).body(Full::default()).unwrap();
        tokio::spawn(async move { client.oneshot(request).await })
    });
    let (mut ok, mut token_errors) = (0, 0);
    for request in requests.collect::<Vec<_>>() {
        match request.await.unwrap() {
            Ok(response) => {
                assert_eq!(response.status(), StatusCode::OK);
                ok += 1;
            }
            Err(error) => {
                assert!(error.is_token(), "{error:?}");
                let cause = error
                    .source()
                    .unwrap()
                    .downcast_ref::<TokenError>()
                    .unwrap();
                assert_eq!(cause.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
                token_errors += 1;
            }
        }
    }
    assert_eq!(
        ok + token_errors,
        200,
        "every request ends in a response or a typed error"
    );
    assert_eq!(
        stand_in.api_requests(),
        ok,
        "nothing was sent without a token"
    );
    // The endpoint is back: the run recovers.
    assert_eq!(get(&client, &url).await.0, StatusCode::OK);
    assert_eq!(stand_in.token_requests(), 4);
}

#[tokio::test]
async fn a_401_a_new_token_cannot_fix_reaches_the_caller_intact() {
    // The stand-in wants an x-partnerid this layer does not send.
    let stand_in = StandIn::builder()
        .require_partner_id("partner-1")
        .start()
        .await
        .unwrap();
    let source = ClientCredentials::blaze(&stand_in.base_url(), DEMO_CLIENT_ID, DEMO_CLIENT_SECRET)
        .build()
        .unwrap();
    let layer = BlazeAuthLayer::new(source, DEMO_STUDY);
    let client = client(&layer);
    let url = format!("{}/Patient?_count=5", stand_in.api_url());
    let (status, outcome) = get(&client, &url).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("x-partnerid"),
        "{outcome}"
    );
    assert_eq!(stand_in.tokens_issued(), 2, "one refresh");
    assert_eq!(stand_in.api_requests(), 2, "one retry");

    // And it stays that way: more requests, no more token fetches.
    for _ in 0..20 {
        assert_eq!(get(&client, &url).await.0, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(stand_in.tokens_issued(), 2);
    assert_eq!(layer.metrics().refreshes_skipped, 20);
}
