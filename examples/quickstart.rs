//! The quickstart: a client stack with `BlazeAuthLayer`, run against an in-process stand-in
//! for Blaze that revokes its tokens half-way, to show the 401 → refresh → retry path.
//!
//! `cargo run --example quickstart`

use blaze_auth::{AccessToken, BlazeAuthLayer, token_fn};
use http::{Request, Response, StatusCode, header::AUTHORIZATION};
use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};
use tower::{ServiceBuilder, ServiceExt};

#[tokio::main]
async fn main() -> Result<(), blaze_auth::BoxError> {
    // The token endpoint: issues token-1, token-2, ... valid for an hour.
    let issued = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&issued);
    let source = token_fn(move |_rejected| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            Ok::<_, blaze_auth::Error>(
                AccessToken::bearer(&format!("token-{n}"))?
                    .with_expires_in(Duration::from_secs(3600)),
            )
        }
    });

    // The FHIR API: accepts only the newest token, so revoking = issuing a new generation.
    let valid = Arc::new(AtomicUsize::new(1));
    let (api_valid, api_calls) = (Arc::clone(&valid), Arc::new(AtomicUsize::new(0)));
    let calls = Arc::clone(&api_calls);
    let api = tower::service_fn(move |request: Request<String>| {
        calls.fetch_add(1, Ordering::SeqCst);
        let expected = format!("Bearer token-{}", api_valid.load(Ordering::SeqCst));
        let authorized = request
            .headers()
            .get(AUTHORIZATION)
            .is_some_and(|v| v == &*expected);
        let mut response = Response::new(request.uri().to_string());
        if !authorized {
            *response.status_mut() = StatusCode::UNAUTHORIZED;
        }
        async move { Ok::<_, Infallible>(response) }
    });

    let client = ServiceBuilder::new()
        .layer(
            BlazeAuthLayer::builder(source)
                .study("FHIR-T")
                .partner_id("demo")
                .build()?,
        )
        .service(api);

    for page in 1..=4 {
        if page == 3 {
            println!("-- the server revokes every token --");
            valid.store(2, Ordering::SeqCst);
        }
        let uri = format!("/msk-apim/external/v2/crit/blaze/api/Patient?_count=50&page={page}");
        let response = client
            .clone()
            .oneshot(Request::get(uri).body(String::new())?)
            .await?;
        println!("{} {}", response.status(), response.body());
    }
    let calls = api_calls.load(Ordering::SeqCst);
    println!(
        "pages: 4, API calls: {calls}, retries after 401: {}, token fetches: {}",
        calls - 4,
        issued.load(Ordering::SeqCst)
    );
    Ok(())
}
