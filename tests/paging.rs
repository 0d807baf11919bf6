//! The examples' search paging and retry policy (`examples/common/`), included here so that
//! what is tested is what `quickstart` and `export` run: a search that cannot end short
//! without saying so, and transient errors retried outside the layer.

#![cfg(feature = "testing")]

#[path = "../examples/common/mod.rs"]
mod common;
mod support;

use blaze_auth::{
    BlazeAuthLayer, BlazeEnv,
    testing::{ApiFailure, StandIn, StandInBuilder},
};
use bytes::Bytes;
use common::{BlazeClient, SearchError, Summary, TransientErrors};
use http::{Method, Request, Response, StatusCode, header::RETRY_AFTER};
use http_body_util::Full;
use std::{
    collections::HashMap,
    convert::Infallible,
    env::VarError,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt, retry::RetryLayer};

// ---- integrity ----

#[tokio::test]
async fn search_whose_pages_fall_short_of_the_total_is_an_error_that_says_so() {
    let blaze = Blaze::start(StandIn::builder().misstate_total(13)).await;
    let mut handed_on = 0;

    let error = common::search(&blaze.client, &blaze.url("Patient?_count=100"), |page| {
        handed_on += page.resources.len();
        Ok(())
    })
    .await
    .unwrap_err();

    assert_eq!(handed_on, 250, "every resource found is handed on first");
    assert!(
        matches!(
            error.downcast_ref(),
            Some(SearchError::Incomplete {
                matches: 250,
                total: 263,
                ..
            })
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("incomplete") && message.contains("250") && message.contains("263"),
        "{message}"
    );
}

#[tokio::test]
async fn search_with_more_resources_than_the_total_is_an_error_too() {
    let blaze = Blaze::start(StandIn::builder().misstate_total(-1)).await;

    let error = search_all(&blaze, "Patient?_count=100").await.unwrap_err();

    assert!(
        matches!(
            error.downcast_ref(),
            Some(SearchError::Incomplete {
                matches: 250,
                total: 249,
                ..
            })
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn progress_reports_matches_so_far_against_the_total() {
    let blaze = Blaze::start(StandIn::builder()).await;
    let mut progress = Vec::new();

    let summary = common::search(&blaze.client, &blaze.url("Patient?_count=100"), |page| {
        progress.push((page.number, page.matches, page.total));
        Ok(())
    })
    .await
    .unwrap();

    assert_eq!(
        progress,
        [
            (1, 100, Some(250)),
            (2, 200, Some(250)),
            (3, 250, Some(250))
        ]
    );
    assert_eq!((summary.pages, summary.matches), (3, 250));
    assert!(summary.duplicates.is_empty());
}

#[tokio::test]
async fn resource_met_again_on_a_later_page_is_reported_and_handed_on_once() {
    // Blaze pages by offset: a write between two pages shifts `p-b` onto page 2 as well.
    let (blaze, _server) = scripted(|url| match page_of(url) {
        1 => bundle(3, &["p-a", "p-b"], Some(&url.replace("page=1", "page=2"))),
        _ => bundle(3, &["p-b", "p-c"], None),
    })
    .await;
    let mut ids = Vec::new();

    let summary = common::search(&blaze.client, &blaze.url("Patient?page=1"), |page| {
        ids.extend(
            page.resources
                .iter()
                .map(|r| r["id"].as_str().unwrap().to_owned()),
        );
        Ok(())
    })
    .await
    .unwrap();

    assert_eq!(ids, ["p-a", "p-b", "p-c"]);
    assert_eq!(summary.duplicates, ["Patient/p-b"]);
    assert_eq!((summary.matches, summary.total), (3, Some(3)));
}

#[tokio::test]
async fn included_resources_are_handed_on_but_not_counted_against_the_total() {
    let (blaze, _server) = scripted(|_| {
        let mut bundle = bundle(1, &["p-a"], None);
        bundle["entry"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "resource": {"resourceType": "Organization", "id": "o-1"},
                "search": {"mode": "include"},
            }));
        bundle
    })
    .await;
    let mut handed_on = 0;

    let summary = common::search(&blaze.client, &blaze.url("Patient"), |page| {
        handed_on += page.resources.len();
        Ok(())
    })
    .await
    .unwrap();

    assert_eq!(handed_on, 2);
    assert_eq!((summary.matches, summary.total), (1, Some(1)));
}

#[tokio::test]
async fn search_without_a_total_is_not_checked() {
    let (blaze, _server) = scripted(|_| {
        let mut bundle = bundle(0, &["p-a"], None);
        bundle.as_object_mut().unwrap().remove("total");
        bundle
    })
    .await;

    let summary = search_all(&blaze, "Patient").await.unwrap();

    assert_eq!((summary.matches, summary.total), (1, None));
}

// ---- links stay home ----

#[tokio::test]
async fn next_link_to_another_origin_is_an_error_naming_it_and_is_not_followed() {
    let elsewhere = StandIn::start().await.unwrap();
    let blaze = Blaze::start(StandIn::builder().foreign_next_link(2, &elsewhere.base_url())).await;

    let error = search_all(&blaze, "Patient?_count=100").await.unwrap_err();

    match error.downcast_ref() {
        Some(SearchError::ForeignLink { link_origin }) => {
            assert_eq!(*link_origin, elsewhere.base_url());
        }
        _ => panic!("{error:?}"),
    }
    assert!(error.to_string().contains(&elsewhere.base_url()), "{error}");
    assert_eq!(elsewhere.api_requests(), 0);
    assert_eq!(blaze.stand_in().api_requests(), 2);
}

#[tokio::test]
async fn next_link_back_to_a_page_already_fetched_is_an_error() {
    let (blaze, server) = scripted(|url| bundle(9, &[], Some(url))).await;

    let error = search_all(&blaze, "Patient").await.unwrap_err();

    assert!(
        // Page 1 was asked for without the study, which the layer added: page 2 is the
        // first whose `next` names a URL already fetched.
        matches!(
            error.downcast_ref(),
            Some(SearchError::LinkLoop { page: 2 })
        ),
        "{error:?}"
    );
    assert_eq!(api_requests(&server), 2);
}

// ---- transient errors ----

#[tokio::test(start_paused = true)]
async fn a_503_then_200_on_page_3_completes_with_every_resource_once() {
    let blaze = Blaze::start(StandIn::builder().fail_page(
        3,
        1,
        ApiFailure::Status(StatusCode::SERVICE_UNAVAILABLE),
    ))
    .await;
    let mut ids = HashMap::new();

    let summary = common::search(&blaze.client, &blaze.url("Patient?_count=50"), |page| {
        for resource in &page.resources {
            *ids.entry(resource["id"].as_str().unwrap().to_owned())
                .or_insert(0) += 1;
        }
        Ok(())
    })
    .await
    .unwrap();

    assert_eq!((summary.pages, summary.matches), (5, 250));
    assert_eq!(ids.len(), 250);
    assert!(ids.values().all(|seen| *seen == 1));
    assert_eq!(blaze.stand_in().api_requests(), 6, "5 pages, page 3 twice");
}

#[tokio::test(start_paused = true)]
async fn a_429_with_retry_after_1_waits_that_long() {
    let blaze = Blaze::start(throttled_on_page_2(1)).await;
    let start = Instant::now();

    let summary = search_all(&blaze, "Patient?_count=100").await.unwrap();

    let waited = start.elapsed();
    assert_eq!(summary.matches, 250);
    assert_eq!(blaze.stand_in().api_requests(), 4, "3 pages, page 2 twice");
    // The paused clock moves only when every task waits on a timer: here, only the wait.
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_millis(1100),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn transient_errors_are_retried_a_bounded_number_of_times() {
    let blaze = Blaze::start(StandIn::builder().fail_page(
        2,
        100,
        ApiFailure::Status(StatusCode::BAD_GATEWAY),
    ))
    .await;

    let error = search_all(&blaze, "Patient?_count=100").await.unwrap_err();

    assert!(error.to_string().contains("502"), "{error}");
    assert_eq!(
        blaze.stand_in().api_requests(),
        1 + 5,
        "page 1, then 1 + 4 retries"
    );
}

#[tokio::test(start_paused = true)]
async fn without_retry_after_the_waits_double_from_half_a_second_half_of_each_random() {
    let blaze = Blaze::start(StandIn::builder().fail_page(
        2,
        100,
        ApiFailure::Status(StatusCode::SERVICE_UNAVAILABLE),
    ))
    .await;
    let start = Instant::now();

    search_all(&blaze, "Patient?_count=100").await.unwrap_err();

    // Waits of 0.5, 1, 2 and 4 s, each between half and all of it: 3.75 to 7.5 s in all.
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(3750) && waited < Duration::from_millis(7600),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_4xx_other_than_401_and_429_is_not_retried() {
    for status in [
        StatusCode::BAD_REQUEST,
        StatusCode::FORBIDDEN,
        StatusCode::NOT_FOUND,
    ] {
        let blaze =
            Blaze::start(StandIn::builder().fail_page(2, 1, ApiFailure::Status(status))).await;

        let error = search_all(&blaze, "Patient?_count=100").await.unwrap_err();

        assert!(error.to_string().contains(status.as_str()), "{error}");
        assert_eq!(blaze.stand_in().api_requests(), 2, "{status}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_beyond_the_limit_returns_the_429_at_once() {
    let blaze = Blaze::start(throttled_on_page_2(3600)).await;
    let start = Instant::now();

    let error = search_all(&blaze, "Patient?_count=100").await.unwrap_err();

    assert!(error.to_string().contains("429"), "{error}");
    assert_eq!(blaze.stand_in().api_requests(), 2);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_longer_than_the_token_lives_is_retried_with_a_fresh_token() {
    // Retry sits outside the layer, so the attempt after the wait goes through the layer
    // again and leaves with a token that is good then, not with the expired one the first
    // attempt carried: no 401, no retry of the layer's own.
    let blaze = Blaze::start(throttled_on_page_2(45).token_lifetime(Duration::from_secs(30))).await;

    let summary = search_all(&blaze, "Patient?_count=100").await.unwrap();

    assert_eq!(summary.matches, 250);
    assert_eq!(blaze.stand_in().tokens_issued(), 2);
    assert_eq!(blaze.stand_in().unauthorized_served(), 0);
    assert_eq!(blaze.layer.metrics().retries, 0);
}

#[tokio::test(start_paused = true)]
async fn only_gets_are_retried() {
    let calls = Arc::new(AtomicUsize::new(0));
    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(TransientErrors::default()))
        .service_fn({
            let calls = Arc::clone(&calls);
            move |_: Request<Full<Bytes>>| {
                calls.fetch_add(1, Ordering::Relaxed);
                async { Ok::<_, Infallible>(status(StatusCode::SERVICE_UNAVAILABLE, None)) }
            }
        });

    for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
        let request = Request::builder()
            .method(method)
            .body(Full::default())
            .unwrap();
        let response = service.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(calls.load(Ordering::Relaxed), 4);

    let response = service
        .oneshot(Request::get("/").body(Full::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls.load(Ordering::Relaxed), 4 + 5);
}

#[tokio::test(start_paused = true)]
async fn retry_after_as_an_http_date_is_waited_for() {
    let calls = Arc::new(AtomicUsize::new(0));
    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(TransientErrors::default()))
        .service_fn({
            let calls = Arc::clone(&calls);
            move |_: Request<Full<Bytes>>| {
                let first = calls.fetch_add(1, Ordering::Relaxed) == 0;
                // 4 s from now on the wall clock, cut to whole seconds as HTTP-dates are:
                // more than 3 s from when the policy reads it.
                let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(4));
                async move {
                    Ok::<_, Infallible>(match first {
                        true => status(StatusCode::TOO_MANY_REQUESTS, Some(&date)),
                        false => status(StatusCode::OK, None),
                    })
                }
            }
        });
    let start = Instant::now();

    let response = service
        .oneshot(Request::get("/").body(Full::default()).unwrap())
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::Relaxed), 2);
    let waited = start.elapsed();
    assert!(
        waited > Duration::from_secs(2) && waited <= Duration::from_secs(4),
        "{waited:?}"
    );
}

#[test]
fn retry_after_reads_seconds_and_http_dates() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let headers = |value: &str| {
        let mut headers = http::HeaderMap::new();
        headers.insert(RETRY_AFTER, value.parse().unwrap());
        headers
    };
    let seconds = Duration::from_secs;

    assert_eq!(common::retry_after(&headers("7"), now), Some(seconds(7)));
    assert_eq!(
        common::retry_after(&headers(" 0 "), now),
        Some(Duration::ZERO)
    );
    assert_eq!(
        common::retry_after(&headers(&httpdate::fmt_http_date(now + seconds(30))), now),
        Some(seconds(30))
    );
    assert_eq!(
        common::retry_after(&headers(&httpdate::fmt_http_date(now - seconds(30))), now),
        Some(Duration::ZERO)
    );
    assert_eq!(common::retry_after(&headers("-5"), now), None);
    assert_eq!(common::retry_after(&headers("soon"), now), None);
    assert_eq!(common::retry_after(&http::HeaderMap::new(), now), None);
}

// ---- helpers ----

/// The examples' stack against a Blaze stand-in or a scripted server.
struct Blaze {
    client: BlazeClient,
    layer: BlazeAuthLayer,
    env: BlazeEnv,
    /// `None` against a scripted server.
    stand_in: Option<StandIn>,
}

impl Blaze {
    /// The examples' stack against a stand-in started from `builder`, which
    /// `env_or_stand_in` starts as the examples do (no `BLAZE_*` variables in tests).
    async fn start(builder: StandInBuilder) -> Self {
        let (env, stand_in) = common::env_or_stand_in(builder).await.unwrap();
        assert!(stand_in.is_some(), "no BLAZE_* variables set in tests");
        Self::with_env(env, stand_in)
    }

    fn with_env(env: BlazeEnv, stand_in: Option<StandIn>) -> Self {
        let source = env.client_credentials().build().unwrap();
        let layer = env.layer(source).build().unwrap();
        Self {
            client: common::client(layer.clone()),
            layer,
            env,
            stand_in,
        }
    }

    fn stand_in(&self) -> &StandIn {
        self.stand_in.as_ref().unwrap()
    }

    fn url(&self, search: &str) -> String {
        format!("{}/{search}", self.env.api_url())
    }
}

async fn search_all(blaze: &Blaze, search: &str) -> Result<Summary, blaze_auth::BoxError> {
    common::search(&blaze.client, &blaze.url(search), |_| Ok(())).await
}

/// A stand-in that answers the first request for page 2 with a 429 and `Retry-After:
/// <seconds>`.
fn throttled_on_page_2(seconds: u64) -> StandInBuilder {
    StandIn::builder().fail_page(
        2,
        1,
        ApiFailure::TooManyRequests {
            retry_after: Duration::from_secs(seconds),
        },
    )
}

/// The examples' stack against a server that issues tokens and answers every API request
/// with `page(url)`, the URL as the client asked for it.
async fn scripted(
    page: impl Fn(&str) -> serde_json::Value + Clone + Send + Sync + 'static,
) -> (Blaze, support::Server) {
    let server = support::serve(move |request, _| {
        let page = page.clone();
        async move {
            if request.uri.path().ends_with("/token") {
                return support::token_json("scripted-token", 3600);
            }
            let url = format!(
                "http://{}{}",
                request.headers["host"].to_str().unwrap(),
                request.uri
            );
            support::json(200, &page(&url).to_string())
        }
    })
    .await;
    let base_url = server.url("");
    let env = BlazeEnv::from_lookup(|name| match name {
        "BLAZE_BASE_URL" => Ok(base_url.clone()),
        "BLAZE_CLIENT_ID" => Ok("client".to_owned()),
        "BLAZE_CLIENT_SECRET" => Ok("secret".to_owned()),
        "BLAZE_RESEARCH_STUDY" => Ok("FHIR-T".to_owned()),
        _ => Err(VarError::NotPresent),
    })
    .unwrap()
    .unwrap();
    (Blaze::with_env(env, None), server)
}

fn api_requests(server: &support::Server) -> usize {
    server
        .requests()
        .iter()
        .filter(|request| !request.uri.path().ends_with("/token"))
        .count()
}

/// A searchset Bundle of Patients `ids`, stating `total`, with a `next` link if given.
fn bundle(total: u64, ids: &[&str], next: Option<&str>) -> serde_json::Value {
    serde_json::json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": [{"relation": "next", "url": next}],
        "entry": ids.iter().map(|id| serde_json::json!({
            "resource": {"resourceType": "Patient", "id": id},
            "search": {"mode": "match"},
        })).collect::<Vec<_>>(),
    })
}

/// The `page` parameter of a URL; 1 when absent.
fn page_of(url: &str) -> usize {
    let query = url.split_once('?').map_or("", |(_, query)| query);
    form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "page")
        .map_or(1, |(_, page)| page.parse().unwrap())
}

fn status(status: StatusCode, retry_after: Option<&str>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::default());
    *response.status_mut() = status;
    if let Some(retry_after) = retry_after {
        response
            .headers_mut()
            .insert(RETRY_AFTER, retry_after.parse().unwrap());
    }
    response
}
