//! The layer over a `reqwest::Client` (`ReqwestService`), and `BlazeMiddleware` in a
//! reqwest-middleware stack, against the Blaze stand-in over loopback plain HTTP.
#![cfg(all(feature = "reqwest", feature = "testing", feature = "oauth2"))]

use blaze_auth::{
    BlazeAuth, BlazeAuthLayer, BufferBody, ClientCredentials, Metrics, NoReplay, ReqwestService,
    testing::{DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, DEMO_STUDY, StandIn},
};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::StreamBody;
use std::{error::Error as _, future::Future};
use tower::{Layer, ServiceExt};

const PARTNER_ID: &str = "partner-1";

async fn stand_in() -> StandIn {
    StandIn::builder()
        .require_partner_id(PARTNER_ID)
        .start()
        .await
        .unwrap()
}

fn layer(stand_in: &StandIn) -> BlazeAuthLayer {
    layer_with_secret(stand_in, DEMO_CLIENT_SECRET)
}

fn layer_with_secret(stand_in: &StandIn, secret: &str) -> BlazeAuthLayer {
    let source = ClientCredentials::blaze(&stand_in.base_url(), DEMO_CLIENT_ID, secret)
        .build()
        .unwrap();
    BlazeAuthLayer::builder(source)
        .study(DEMO_STUDY)
        .partner_id(PARTNER_ID)
        .origin(&stand_in.base_url())
        .build()
        .unwrap()
}

/// The layer over reqwest, in one line.
fn client<R: Clone>(layer: &BlazeAuthLayer<R>) -> BlazeAuth<ReqwestService, R> {
    layer.layer(ReqwestService::new(reqwest_client()))
}

/// A reqwest client with rustls over ring (the dev-dependency's `rustls-no-provider`), the
/// crypto library the rest of the crate uses.
fn reqwest_client() -> reqwest::Client {
    // Err if another test installed it first: the same provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// A body reqwest cannot clone: two chunks from a stream.
fn streaming_body() -> reqwest::Body {
    let chunks = ["{\"resourceType\":", "\"Patient\"}"]
        .map(|chunk| Ok::<_, std::io::Error>(Frame::data(Bytes::from(chunk))));
    reqwest::Body::wrap(StreamBody::new(futures_util::stream::iter(chunks)))
}

#[tokio::test]
async fn a_revoked_token_mid_run_costs_one_retry_and_one_new_token() {
    let stand_in = stand_in().await;
    let layer = layer(&stand_in);
    let client = client(&layer);
    let get = |url: String| {
        let request = Request::get(url).body(Bytes::new()).unwrap();
        let response = client.clone().oneshot(request);
        async { reqwest::Response::from(response.await.unwrap()) }
    };
    revocation_mid_run(&stand_in, get, || layer.metrics()).await;
}

#[tokio::test]
async fn a_streaming_body_is_not_retried_and_the_next_request_gets_a_new_token() {
    let stand_in = stand_in().await;
    let layer = layer(&stand_in).replay(NoReplay);
    let client = client(&layer);
    let send = |request: Request<reqwest::Body>| {
        let response = client.clone().oneshot(request);
        async { reqwest::Response::from(response.await.unwrap()) }
    };
    let get = |url: String| send(Request::get(url).body(reqwest::Body::from("")).unwrap());
    let post = |url: String| send(Request::post(url).body(streaming_body()).unwrap());
    streaming_body_after_revocation(&stand_in, get, post, || layer.metrics()).await;
}

#[tokio::test]
async fn a_streaming_body_is_replayed_with_buffer_body() {
    let stand_in = stand_in().await;
    let layer = layer(&stand_in).replay(BufferBody::default());
    let client = client(&layer);
    let url = format!("{}/Patient", stand_in.api_url());
    let get = Request::get(&url).body(reqwest::Body::from("")).unwrap();
    assert_eq!(
        client.clone().oneshot(get).await.unwrap().status(),
        StatusCode::OK
    );

    stand_in.revoke_all_tokens();
    let post = Request::post(&url).body(streaming_body()).unwrap();
    let response = client.oneshot(post).await.unwrap();
    // The retry got past the token check: the read-only stand-in refuses the method.
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(stand_in.unauthorized_served(), 1);
    assert_eq!(layer.metrics().retries, 1);
}

#[tokio::test]
async fn responses_convert_back_to_reqwest_with_their_url() {
    let stand_in = stand_in().await;
    let client = client(&layer(&stand_in));
    let url = format!("{}/metadata", stand_in.api_url());
    let request = Request::get(&url).body("").unwrap();
    let response = reqwest::Response::from(client.oneshot(request).await.unwrap());
    assert_eq!(
        response.url().as_str(),
        format!("{url}?researchstudy={DEMO_STUDY}")
    );
}

#[tokio::test]
async fn a_url_reqwest_refuses_is_a_typed_inner_error() {
    let stand_in = stand_in().await;
    let client = client(&layer(&stand_in));
    // reqwest needs an absolute URL.
    let request = Request::get("/Patient").body(Bytes::new()).unwrap();
    let error = client.oneshot(request).await.unwrap_err();
    assert!(error.is_inner(), "{error:?}");
    let reqwest_error = error
        .source()
        .and_then(|source| source.downcast_ref::<reqwest::Error>())
        .expect("the cause is a reqwest::Error");
    assert!(reqwest_error.is_builder());
}

#[tokio::test]
async fn a_failed_connection_is_a_typed_inner_error() {
    let stand_in = stand_in().await;
    let layer = layer(&stand_in);
    let client = client(&layer);
    // A port nobody listens on.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = unused.local_addr().unwrap().port();
    drop(unused);
    let request = Request::get(format!("http://127.0.0.1:{port}/Patient?identifier=MRN-1"))
        .body(Bytes::new())
        .unwrap();
    let error = client.oneshot(request).await.unwrap_err();
    let reqwest_error = error.source().unwrap().downcast_ref::<reqwest::Error>();
    assert!(
        reqwest_error.is_some_and(reqwest::Error::is_connect),
        "{error:?}"
    );
    // No URL in what a log line would print: a search's query can identify a patient.
    let mut printed = format!("{error} {error:?}");
    let mut source = error.source();
    while let Some(cause) = source {
        printed += &format!(" {cause} {cause:?}");
        source = cause.source();
    }
    assert!(!printed.contains("MRN-1"), "{printed}");
}

#[test]
fn the_service_and_its_future_are_send_sync_and_clone() {
    fn assert_send_sync_clone<T: Send + Sync + Clone>() {}
    fn assert_send<T: Send>() {}
    assert_send_sync_clone::<ReqwestService>();
    assert_send_sync_clone::<BlazeAuth<ReqwestService>>();
    assert_send::<blaze_auth::ReqwestFuture>();
    assert_send::<blaze_auth::future::ResponseFuture<ReqwestService, Bytes>>();
}

/// Six GETs of a page, every token revoked before the fourth: all answered, at the cost of one
/// 401, one retry and one new token.
async fn revocation_mid_run<G, Fut>(stand_in: &StandIn, get: G, metrics: impl Fn() -> Metrics)
where
    G: Fn(String) -> Fut,
    Fut: Future<Output = reqwest::Response>,
{
    let url = format!("{}/Patient?_count=10", stand_in.api_url());
    for round in 0..6 {
        if round == 3 {
            stand_in.revoke_all_tokens();
        }
        let response = get(url.clone()).await;
        assert_eq!(response.status(), StatusCode::OK, "round {round}");
        let bundle: serde_json::Value =
            serde_json::from_str(&response.text().await.unwrap()).unwrap();
        assert_eq!(bundle["entry"].as_array().unwrap().len(), 10);
    }
    assert_eq!(stand_in.unauthorized_served(), 1);
    assert_eq!(stand_in.tokens_issued(), 2);
    let metrics = metrics();
    assert_eq!((metrics.token_fetches, metrics.retries), (2, 1));
}

/// A GET, every token revoked, then a POST with a streaming body: its 401 comes back as it
/// came, nothing is sent again, and the next GET gets a new token.
async fn streaming_body_after_revocation<G, GetFut, P, PostFut>(
    stand_in: &StandIn,
    get: G,
    post_streaming: P,
    metrics: impl Fn() -> Metrics,
) where
    G: Fn(String) -> GetFut,
    GetFut: Future<Output = reqwest::Response>,
    P: Fn(String) -> PostFut,
    PostFut: Future<Output = reqwest::Response>,
{
    let url = format!("{}/Patient", stand_in.api_url());
    assert_eq!(get(url.clone()).await.status(), StatusCode::OK);

    stand_in.revoke_all_tokens();
    let response = post_streaming(url.clone()).await;
    assert_eq!(
        response.status(),
        StatusCode::UNAUTHORIZED,
        "returned as it came"
    );
    assert_eq!(stand_in.api_requests(), 2, "not sent again");
    assert_eq!(metrics().retries, 0);

    assert_eq!(get(url).await.status(), StatusCode::OK);
    assert_eq!(stand_in.tokens_issued(), 2, "the refused token was dropped");
}

/// The same, through reqwest-middleware.
#[cfg(feature = "reqwest-middleware")]
mod middleware {
    use super::*;
    use blaze_auth::{BlazeMiddleware, ResearchStudy};
    use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};

    fn client(middleware: BlazeMiddleware) -> ClientWithMiddleware {
        ClientBuilder::new(reqwest_client())
            .with(middleware)
            .build()
    }

    #[tokio::test]
    async fn a_revoked_token_mid_run_costs_one_retry_and_one_new_token() {
        let stand_in = stand_in().await;
        let middleware = BlazeMiddleware::from(layer(&stand_in));
        let client = client(middleware.clone());
        let get = |url: String| {
            let request = client.get(url);
            async { request.send().await.unwrap() }
        };
        revocation_mid_run(&stand_in, get, || middleware.metrics()).await;
    }

    #[tokio::test]
    async fn a_streaming_body_is_not_retried_and_the_next_request_gets_a_new_token() {
        let stand_in = stand_in().await;
        let middleware = BlazeMiddleware::from(layer(&stand_in));
        let client = client(middleware.clone());
        let get = |url: String| {
            let request = client.get(url);
            async { request.send().await.unwrap() }
        };
        let post = |url: String| {
            let request = client.post(url).body(streaming_body());
            async { request.send().await.unwrap() }
        };
        streaming_body_after_revocation(&stand_in, get, post, || middleware.metrics()).await;
    }

    #[tokio::test]
    async fn a_body_that_clones_is_sent_again_with_the_new_token() {
        let stand_in = stand_in().await;
        let client = client(BlazeMiddleware::from(layer(&stand_in)));
        let url = format!("{}/Patient", stand_in.api_url());
        assert_eq!(
            client.get(&url).send().await.unwrap().status(),
            StatusCode::OK
        );
        stand_in.revoke_all_tokens();
        let response = client.post(&url).body("{}").send().await.unwrap();
        // The retry got past the token check: the read-only stand-in refuses the method.
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(stand_in.unauthorized_served(), 1);
        assert_eq!(stand_in.api_requests(), 3);
    }

    #[tokio::test]
    async fn a_tower_stack_and_a_middleware_stack_from_one_layer_share_one_token() {
        let stand_in = stand_in().await;
        let layer = layer(&stand_in);
        let tower_client = layer.layer(ReqwestService::new(reqwest_client()));
        let middleware_client = client(BlazeMiddleware::from(&layer));
        let url = format!("{}/Patient?_count=1", stand_in.api_url());
        let tower_get = || {
            let request = http::Request::get(&url).body(Bytes::new()).unwrap();
            tower_client.clone().oneshot(request)
        };
        for _ in 0..3 {
            assert_eq!(tower_get().await.unwrap().status(), StatusCode::OK);
            let response = middleware_client.get(&url).send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
        }
        assert_eq!(stand_in.tokens_issued(), 1);

        // A revocation met by one stack is one refresh for both.
        stand_in.revoke_all_tokens();
        let response = middleware_client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(tower_get().await.unwrap().status(), StatusCode::OK);
        assert_eq!(stand_in.tokens_issued(), 2);
        assert_eq!(stand_in.unauthorized_served(), 1);
        assert_eq!(layer.metrics().token_fetches, 2);
    }

    #[tokio::test]
    async fn other_origins_get_no_credentials() {
        let stand_in = stand_in().await;
        let elsewhere = super::stand_in().await;
        let client = client(BlazeMiddleware::from(layer(&stand_in)));
        let url = format!("{}/Patient", elsewhere.api_url());
        let response = client.get(&url).send().await.unwrap();
        // No token: the other server says so, and nothing is retried or fetched.
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(elsewhere.api_requests(), 1);
        assert_eq!(stand_in.token_requests(), 0);
    }

    #[tokio::test]
    async fn a_research_study_extension_names_the_requests_study() {
        let stand_in = StandIn::builder()
            .require_partner_id(PARTNER_ID)
            .client(DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, &[DEMO_STUDY, "OTHER-1"])
            .start()
            .await
            .unwrap();
        let client = client(BlazeMiddleware::from(layer(&stand_in)));
        let url = format!("{}/metadata", stand_in.api_url());
        let response = client
            .get(&url)
            .with_extension(ResearchStudy::new("OTHER-1").unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.url().as_str(),
            format!("{url}?researchstudy=OTHER-1")
        );
    }

    #[tokio::test]
    async fn a_failed_token_fetch_is_a_typed_middleware_error() {
        let stand_in = stand_in().await;
        let client = client(BlazeMiddleware::from(layer_with_secret(&stand_in, "wrong")));
        let url = format!("{}/Patient", stand_in.api_url());
        let error = client.get(&url).send().await.unwrap_err();
        let reqwest_middleware::Error::Middleware(error) = error else {
            panic!("{error:?}");
        };
        let error = error.downcast_ref::<blaze_auth::Error>().unwrap();
        assert!(error.is_token(), "{error:?}");
        assert_eq!(
            stand_in.api_requests(),
            0,
            "fail closed: nothing sent without a token"
        );
    }

    #[tokio::test]
    async fn plain_http_in_an_open_scope_is_refused_before_anything_is_sent() {
        let source = blaze_auth::StaticToken::new(blaze_auth::AccessToken::bearer("t").unwrap());
        let layer = BlazeAuthLayer::builder(source)
            .study(DEMO_STUDY)
            .any_origin()
            .build()
            .unwrap();
        let client = client(BlazeMiddleware::from(&layer));
        // Never resolved: the middleware refuses before reqwest connects.
        let error = client
            .get("http://blaze.invalid/Patient")
            .send()
            .await
            .unwrap_err();
        let reqwest_middleware::Error::Middleware(error) = error else {
            panic!("{error:?}");
        };
        let error = error.downcast_ref::<blaze_auth::Error>().unwrap();
        assert!(error.is_config(), "{error:?}");
        assert_eq!(layer.metrics().token_fetches, 0);
    }

    #[test]
    fn the_middleware_is_send_sync_and_clone() {
        fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>() {}
        assert_send_sync_clone::<BlazeMiddleware>();
    }
}
