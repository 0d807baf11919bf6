//! `ClientCredentials` against a real HTTP server on 127.0.0.1.
#![cfg(all(feature = "oauth2", feature = "rustls"))]

mod support;

use blaze_auth::{
    AccessToken, BlazeAuthLayer, ClientAuth, ClientCredentials, TokenError, TokenSource,
};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use std::{
    collections::HashMap,
    convert::Infallible,
    error::Error as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};
use support::{Reply, json, serve, token_json};
use tower::{Layer, ServiceBuilder, ServiceExt};

const SECRET: &str = "s3cr3t&=+ value";

fn source(url: &str) -> blaze_auth::ClientCredentialsBuilder {
    ClientCredentials::builder(url, "partner-1", SECRET)
        .scope("full")
        .backoff(Duration::from_millis(1), Duration::from_millis(5))
}

async fn fetch(builder: blaze_auth::ClientCredentialsBuilder) -> Result<AccessToken, TokenError> {
    builder.build().unwrap().fetch_token().await
}

#[tokio::test]
async fn sends_the_exact_form_blaze_wants_and_reads_its_answer() {
    let server = serve(|_, _| async { token_json("abc.DEF_123-x", 3600) }).await;
    let token = fetch(source(
        &server.url("/msk-apim/external/msk-oidc/oauth2/token"),
    ))
    .await
    .unwrap();
    assert_eq!(token.secret(), "abc.DEF_123-x");
    assert_eq!(token.scope(), Some("full"));

    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.method, http::Method::POST);
    assert_eq!(
        request.uri.path(),
        "/msk-apim/external/msk-oidc/oauth2/token"
    );
    assert_eq!(
        request.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    assert_eq!(request.headers["accept"], "application/json");
    assert!(request.headers.get("authorization").is_none());
    assert_eq!(
        request.body_str(),
        "grant_type=client_credentials&client_id=partner-1&client_secret=s3cr3t%26%3D%2B+value&scope=full"
    );
}

#[tokio::test]
async fn basic_auth_puts_the_credentials_in_a_header_not_the_body() {
    let server = serve(|_, _| async { token_json("t", 60) }).await;
    let builder = source(&server.url("/token"))
        .auth(ClientAuth::Basic)
        .param("audience", "https://api.example.com");
    fetch(builder).await.unwrap();
    let request = &server.requests()[0];
    assert_eq!(
        request.form(),
        [
            ("grant_type".into(), "client_credentials".into()),
            ("scope".into(), "full".into()),
            ("audience".into(), "https://api.example.com".into())
        ]
    );
    let basic = request.headers["authorization"].to_str().unwrap();
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(basic.strip_prefix("Basic ").unwrap())
        .unwrap();
    assert_eq!(
        std::str::from_utf8(&decoded).unwrap(),
        "partner-1:s3cr3t%26%3D%2B+value"
    );
}

#[tokio::test]
async fn transient_failures_are_retried_with_backoff() {
    let server = serve(|_, n| async move {
        match n {
            1 => json(503, "<html>unavailable</html>"),
            2 => Reply::Reset,
            _ => token_json("third-time", 60),
        }
    })
    .await;
    let token = fetch(source(&server.url("/token"))).await.unwrap();
    assert_eq!(token.secret(), "third-time");
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn oauth_errors_are_not_retried() {
    let server = serve(|_, _| async {
        json(
            401,
            r#"{"error":"invalid_client","error_description":"Client authentication failed"}"#,
        )
    })
    .await;
    let error = fetch(source(&server.url("/token"))).await.unwrap_err();
    assert_eq!(error.oauth_error(), Some("invalid_client"));
    assert_eq!(error.status(), Some(StatusCode::UNAUTHORIZED));
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn attempts_are_bounded() {
    let server = serve(|_, _| async { json(502, "bad gateway") }).await;
    let error = fetch(source(&server.url("/token")).max_attempts(4))
        .await
        .unwrap_err();
    assert!(error.is_status());
    assert_eq!(error.excerpt(), Some("bad gateway"));
    assert_eq!(server.requests().len(), 4);
}

#[tokio::test]
async fn hostile_answers_become_typed_errors() {
    type Check = fn(&TokenError) -> bool;
    let cases: Vec<(Reply, Check)> = vec![
        (json(200, ""), TokenError::is_invalid_response),
        (
            json(200, "{\"access_token\":\"trunc"),
            TokenError::is_invalid_response,
        ),
        (
            json(200, "<html>Gateway</html>"),
            TokenError::is_invalid_response,
        ),
        (
            json(200, "{\"access_token\":\"a\\r\\nb\"}"),
            TokenError::is_invalid_response,
        ),
        (
            json(200, &"x".repeat(4 << 20)),
            TokenError::is_body_too_large,
        ),
        (json(404, "<html>Not Found</html>"), TokenError::is_status),
    ];
    for (reply, check) in cases {
        let reply = Arc::new(Mutex::new(Some(reply)));
        let server = serve(move |_, _| {
            let reply = reply.lock().unwrap().take();
            async move { reply.unwrap_or_else(|| json(500, "second request")) }
        })
        .await;
        let error = fetch(source(&server.url("/token"))).await.unwrap_err();
        assert!(check(&error), "{error:?}");
        assert_eq!(server.requests().len(), 1, "not retried: {error:?}");
    }
}

#[tokio::test]
async fn an_unbounded_chunked_body_is_cut_off() {
    // No Content-Length: the cap applies while reading.
    let server = serve(|_, _| async {
        let mut response = Response::new(Full::from(vec![b'x'; 1 << 20]));
        response
            .headers_mut()
            .insert("transfer-encoding", "chunked".parse().unwrap());
        Reply::Respond(response)
    })
    .await;
    let error = fetch(source(&server.url("/token"))).await.unwrap_err();
    assert!(error.is_body_too_large(), "{error:?}");
}

#[tokio::test]
async fn a_hanging_server_times_out() {
    let server = serve(|_, _| std::future::pending::<Reply>()).await;
    let builder = source(&server.url("/token"))
        .request_timeout(Duration::from_millis(50))
        .max_attempts(2);
    let error = fetch(builder).await.unwrap_err();
    assert!(error.is_timeout() && error.is_transient(), "{error:?}");
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn connection_refused_is_a_transport_error() {
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let error = fetch(source(&format!("http://{addr}/token")).max_attempts(2))
        .await
        .unwrap_err();
    assert!(error.is_transport() && error.is_transient(), "{error:?}");
    assert!(error.source().is_some());
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured() {
    // A test double instead of a socket, so that paused time measures the wait exactly.
    let (builder, calls) = busy_endpoint("3");
    let builder = builder.backoff(Duration::from_millis(10), Duration::from_secs(5));
    fetch(builder).await.unwrap();
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), 2);
    assert!(calls[1] - calls[0] >= Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_beyond_the_backoff_limit_ends_the_fetch() {
    let client = tower::service_fn(|_: Request<Full<Bytes>>| async {
        let response = Response::builder().status(429).header("retry-after", "600");
        Ok::<_, Infallible>(response.body(Full::default()).unwrap())
    });
    let builder = ClientCredentials::builder("https://h/token", "id", "s").http_client(client);
    let error = fetch(builder).await.unwrap_err();
    assert_eq!(error.status(), Some(StatusCode::TOO_MANY_REQUESTS));
    assert_eq!(error.retry_after(), Some(Duration::from_secs(600)));
}

/// `ClientCredentials` over a token endpoint that answers 429 with `Retry-After:
/// <retry_after>` to its first request and a token after; the instants it was asked at.
fn busy_endpoint(
    retry_after: &'static str,
) -> (
    blaze_auth::ClientCredentialsBuilder,
    Arc<Mutex<Vec<tokio::time::Instant>>>,
) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&calls);
    let client = tower::service_fn(move |_: Request<Full<Bytes>>| {
        let seen = Arc::clone(&seen);
        async move {
            let mut calls = seen.lock().unwrap();
            calls.push(tokio::time::Instant::now());
            let response = if calls.len() == 1 {
                Response::builder()
                    .status(429)
                    .header("retry-after", retry_after)
                    .body(Full::default())
            } else {
                Response::builder().body(Full::from(r#"{"access_token":"t","expires_in":3600}"#))
            };
            Ok::<_, Infallible>(response.unwrap())
        }
    });
    let builder = ClientCredentials::builder("https://h/token", "id", "s").http_client(client);
    (builder, calls)
}

/// A layer over `ClientCredentials` with a [`busy_endpoint`]; the instants it was asked at.
fn layer_over_a_busy_endpoint(
    retry_after: &'static str,
) -> (BlazeAuthLayer, Arc<Mutex<Vec<tokio::time::Instant>>>) {
    let (builder, calls) = busy_endpoint(retry_after);
    let source = builder.build().unwrap();
    // No waiting for a token: each request meets the cool-down as it stands, fails at once
    // during it, and the one after it fetches. (With a bound, a request less than the bound
    // before its end would wait for that fetch.)
    let layer = BlazeAuthLayer::builder(source)
        .study("S")
        .max_token_wait(Duration::ZERO)
        .build()
        .unwrap();
    (layer, calls)
}

/// Sends a request through `layer` every second for `seconds` seconds; how many succeeded.
async fn request_every_second(layer: &BlazeAuthLayer, seconds: u64) -> u64 {
    let mut succeeded = 0;
    for _ in 0..seconds {
        let service = layer.layer(tower::service_fn(|_: Request<String>| async {
            Ok::<_, Infallible>(Response::new(()))
        }));
        let request = Request::get("/Patient").body(String::new()).unwrap();
        match service.oneshot(request).await {
            Ok(_) => succeeded += 1,
            Err(error) => assert!(error.is_token(), "{error:?}"),
        }
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    succeeded
}

#[tokio::test(start_paused = true)]
async fn the_layer_fetches_again_no_sooner_than_the_endpoint_asked() {
    // 60 s is beyond what one fetch waits between its attempts (4 s): the fetch ends with the
    // 429, and the layer's cool-down, 1 s by default, must last the 60 s instead.
    let (layer, calls) = layer_over_a_busy_endpoint("60");
    assert_eq!(request_every_second(&layer, 60).await, 0);
    assert_eq!(
        calls.lock().unwrap().len(),
        1,
        "asked again within the 60 s"
    );
    assert_eq!(request_every_second(&layer, 1).await, 1);
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), 2);
    assert!(calls[1] - calls[0] >= Duration::from_secs(60));
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_beyond_five_minutes_holds_the_fetches_back_five_minutes() {
    // A value from the network: an hour, or a date years ahead, is not obeyed in full.
    let (layer, calls) = layer_over_a_busy_endpoint("3600");
    assert_eq!(request_every_second(&layer, 300).await, 0);
    assert_eq!(calls.lock().unwrap().len(), 1);
    assert_eq!(request_every_second(&layer, 1).await, 1);
    assert_eq!(calls.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn tokens_are_refreshed_before_they_expire() {
    // Tokens live 2 s and the server refuses them after that; the margin is capped at half
    // the lifetime, so each token is replaced after 1 s and no request ever meets a 401.
    const LIFETIME: Duration = Duration::from_secs(2);
    let issued = Arc::new(Mutex::new(HashMap::new()));
    let unauthorized = Arc::new(AtomicUsize::new(0));
    let server = serve({
        let (issued, unauthorized) = (Arc::clone(&issued), Arc::clone(&unauthorized));
        move |request, n| {
            let (issued, unauthorized) = (Arc::clone(&issued), Arc::clone(&unauthorized));
            async move {
                if request.uri.path() == "/token" {
                    let token = format!("token-{n}");
                    issued
                        .lock()
                        .unwrap()
                        .insert(format!("Bearer {token}"), Instant::now());
                    return token_json(&token, LIFETIME.as_secs());
                }
                let auth = request.headers["authorization"].to_str().unwrap();
                let fresh = issued
                    .lock()
                    .unwrap()
                    .get(auth)
                    .is_some_and(|at| at.elapsed() < LIFETIME);
                if fresh {
                    json(200, "{}")
                } else {
                    unauthorized.fetch_add(1, Ordering::SeqCst);
                    json(401, "{}")
                }
            }
        }
    })
    .await;
    let source = source(&server.url("/token")).build().unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let client = ServiceBuilder::new()
        .layer(BlazeAuthLayer::new(source, "FHIR-T"))
        .service(client);
    // A workload of 5 s: real sockets need real time (paused time would fire the request
    // timeouts while the runtime waits on the sockets).
    let started = Instant::now();
    let mut requests = 0;
    while started.elapsed() < Duration::from_secs(5) {
        let request = Request::get(server.url("/api/Patient"))
            .body(Full::default())
            .unwrap();
        let response = client.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        requests += 1;
    }
    let token_fetches = server
        .requests()
        .iter()
        .filter(|r| r.uri.path() == "/token")
        .count();
    assert_eq!(unauthorized.load(Ordering::SeqCst), 0);
    assert!(
        (4..=7).contains(&token_fetches),
        "about one a second: {token_fetches}"
    );
    assert!(requests > 100, "{requests}");
}

#[test]
fn the_source_is_object_safe_and_shareable() {
    fn assert_source<T: TokenSource + Clone + Send + Sync + 'static>() {}
    assert_source::<ClientCredentials>();
}
