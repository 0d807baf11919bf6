//! Nothing the crate prints holds a secret: tracing output at TRACE level, errors and their
//! source chains, and `Debug` of every value involved, through a run with failures.
#![cfg(all(feature = "oauth2", feature = "rustls"))]

mod support;

use blaze_auth::{BlazeAuthLayer, ClientAuth, ClientCredentials};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};
use support::{json, serve, text, token_json};
use tower::{ServiceBuilder, ServiceExt};

const CLIENT_SECRET: &str = "cl1ent-s3cret-value";

/// Everything a test writes through `tracing`.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// Captures everything logged at TRACE level on this thread, until the guard drops.
    fn trace() -> (Self, tracing::subscriber::DefaultGuard) {
        let captured = Self::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish();
        (captured, tracing::subscriber::set_default(subscriber))
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut shown = format!("{error} {error:?}");
    let mut next = error.source();
    while let Some(error) = next {
        shown.push_str(&format!(" | {error} {error:?}"));
        next = error.source();
    }
    shown
}

#[tokio::test(flavor = "current_thread")]
async fn no_secret_in_logs_errors_or_debug() {
    let (captured, _guard) = Captured::trace();

    // The token endpoint echoes what it got, fails in every way that repeats input, then
    // issues tokens; the API rejects the first token once.
    let server = serve(|request, n| async move {
        if request.uri.path() == "/token" {
            let echoed = request.body_str().to_owned();
            return match n {
                1 => json(500, &format!("<html>you sent {echoed}</html>")),
                2 => json(
                    400,
                    &format!(r#"{{"error":"invalid_request","error_description":"{echoed}"}}"#),
                ),
                3 => json(
                    200,
                    &format!(r#"{{"access_token":"leaky-token-1\n","echo":"{echoed}"}}"#),
                ),
                _ => token_json(&format!("issued-token-{n}"), 3600),
            };
        }
        let auth = request.headers["authorization"]
            .to_str()
            .unwrap()
            .to_owned();
        if auth.ends_with("issued-token-4") {
            json(401, r#"{"resourceType":"OperationOutcome"}"#)
        } else {
            json(200, "{}")
        }
    })
    .await;

    let mut shown = String::new();
    for auth in [ClientAuth::Post, ClientAuth::Basic] {
        let source = ClientCredentials::builder(&server.url("/token"), "id", CLIENT_SECRET)
            .auth(auth)
            .max_attempts(1)
            .build()
            .unwrap();
        shown.push_str(&format!("{source:?}"));
        for _ in 0..3 {
            if let Err(error) = source.fetch_token().await {
                shown.push_str(&chain(&error));
            }
        }
    }

    let source = ClientCredentials::builder(&server.url("/token"), "id", CLIENT_SECRET)
        .backoff(Duration::from_millis(1), Duration::from_millis(2))
        .build()
        .unwrap();
    let layer = BlazeAuthLayer::builder(source)
        .study("FHIR-T")
        .build()
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let client = ServiceBuilder::new().layer(layer.clone()).service(client);
    for _ in 0..3 {
        let request = Request::get(server.url("/api/Patient"))
            .body(Full::default())
            .unwrap();
        match client.clone().oneshot(request).await {
            Ok(response) => assert_eq!(response.status(), StatusCode::OK),
            Err(error) => shown.push_str(&chain(&error)),
        }
    }
    shown.push_str(&format!("{layer:?} {client:?}"));

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("token fetch failed"),
        "tracing was captured: {logs}"
    );
    let everything = format!("{shown}\n{logs}");
    let base64_secret = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("id:{CLIENT_SECRET}"))
    };
    for secret in [
        CLIENT_SECRET,
        "cl1ent-s3cret",
        &base64_secret,
        "leaky-token",
        "issued-token",
    ] {
        assert!(
            !everything.contains(secret),
            "{secret} leaked:\n{everything}"
        );
    }
}

/// A secret as Azure AD issues them: every character that form-urlencoding, percent-encoding
/// and base64 treat differently.
const ODD_SECRET: &str = "Az~1+b/2=c 3.d_e-f";

/// Every form in which `ODD_SECRET` (with client id `my id`) travels or is echoed back.
fn odd_secret_forms() -> Vec<String> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
    let form = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let basic_raw = format!("my id:{ODD_SECRET}");
    let basic_form = format!("{}:{}", form("my id"), form(ODD_SECRET));
    vec![
        ODD_SECRET.to_owned(),
        form(ODD_SECRET),
        form(ODD_SECRET).replace('+', "%20"),
        STANDARD.encode(&basic_raw),
        STANDARD_NO_PAD.encode(&basic_raw),
        STANDARD.encode(&basic_form),
        STANDARD_NO_PAD.encode(&basic_form),
        "Az~1".to_owned(),
        "Az%7E1".to_owned(),
        "bare-token-in-text".to_owned(),
    ]
}

#[tokio::test(flavor = "current_thread")]
async fn no_form_of_an_odd_secret_in_any_echo() {
    use base64::Engine as _;
    let (captured, _guard) = Captured::trace();

    // A token endpoint that echoes the request every way servers and gateways do.
    let server = serve(|request, n| async move {
        let body = request.body_str().to_owned();
        let auth = request
            .headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        // What a server sees once it has decoded the form and the Basic credentials.
        let mut decoded: Vec<String> = request.form().into_iter().map(|(_, v)| v).collect();
        if let Some(basic) = auth.strip_prefix("Basic ") {
            let credentials = base64::engine::general_purpose::STANDARD
                .decode(basic)
                .unwrap();
            decoded.push(String::from_utf8(credentials).unwrap());
        }
        let decoded = decoded.join(" ");
        let described = |description: &str| {
            let description = serde_json::to_string(description).unwrap();
            format!(r#"{{"error":"invalid_client","error_description":{description}}}"#)
        };
        match (n - 1) % 6 {
            0 => text(
                500,
                "text/html",
                &format!("<html>you sent {body} {auth}</html>"),
            ),
            1 => json(400, &described(&format!("{body} {auth}"))),
            2 => json(401, &described(&format!("got {decoded}"))),
            3 => text(
                502,
                "text/plain",
                &format!("{} {auth}", body.replace('+', "%20")),
            ),
            4 => text(200, "text/plain", "bare-token-in-text"),
            _ => json(400, &described("client_secret is not valid")),
        }
    })
    .await;

    let mut shown = String::new();
    for auth in [ClientAuth::Post, ClientAuth::Basic] {
        let source = ClientCredentials::builder(&server.url("/token"), "my id", ODD_SECRET)
            .auth(auth)
            .max_attempts(1)
            .build()
            .unwrap();
        for _ in 0..6 {
            let error = source.fetch_token().await.unwrap_err();
            let parts = format!(
                "{:?} {:?} {:?}",
                error.oauth_error(),
                error.oauth_description(),
                error.excerpt()
            );
            shown.push_str(&chain(&error));
            shown.push_str(&parts);
        }
    }
    assert_eq!(server.requests().len(), 12);

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("WARN"), "{logs}");
    // The 2xx body is described, not repeated; harmless parts of errors still show.
    assert!(shown.contains("text/plain, 18 bytes"), "{shown}");
    assert!(shown.contains("invalid_client"), "{shown}");
    let everything = format!("{shown}\n{logs}");
    for form in odd_secret_forms() {
        assert!(!everything.contains(&form), "{form} leaked:\n{everything}");
    }
}

/// Collects every access token a token endpoint hands out, on the way to the client.
#[derive(Clone, Default)]
struct Issued(Arc<Mutex<Vec<String>>>);

impl Issued {
    fn client(
        self,
    ) -> impl tower::Service<
        Request<Full<Bytes>>,
        Response = http::Response<Full<Bytes>>,
        Error = blaze_auth::BoxError,
        Future = impl Send,
    > + Clone
    + Send
    + Sync
    + 'static {
        use http_body_util::BodyExt;
        let issued = self;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        tower::service_fn(move |request: Request<Full<Bytes>>| {
            let (client, issued) = (client.clone(), issued.clone());
            async move {
                let (parts, body) = client.request(request).await?.into_parts();
                let body = body.collect().await?.to_bytes();
                if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body) {
                    if let Some(token) = json["access_token"].as_str() {
                        issued.0.lock().unwrap().push(token.to_owned());
                    }
                }
                Ok::<_, blaze_auth::BoxError>(http::Response::from_parts(parts, Full::new(body)))
            }
        })
    }
}

#[tokio::test(flavor = "current_thread")]
async fn no_secret_in_anything_printed_during_a_run_with_faults() {
    use blaze_auth::testing::{ApiFailure, DEMO_CLIENT_SECRET, StandIn, TokenFailure};

    let (captured, _guard) = Captured::trace();

    let stand_in = StandIn::builder()
        .require_partner_id("partner-1")
        .token_lifetime(Duration::from_secs(2))
        .start()
        .await
        .unwrap();
    let issued = Issued::default();
    let env = stand_in.blaze_env();
    let builder = env
        .client_credentials()
        .http_client(issued.clone().client())
        .request_timeout(Duration::from_millis(200))
        .backoff(Duration::from_millis(1), Duration::from_millis(5));
    let mut shown = format!("{builder:?} {env:?} {stand_in:?}");
    let source = builder.build().unwrap();
    shown.push_str(&format!("{source:?}"));
    let layer_builder = env.layer(source).fetch_cooldown(Duration::ZERO);
    shown.push_str(&format!("{layer_builder:?}"));
    let layer = layer_builder.build().unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let client = tower::Layer::layer(&layer, client);

    let token_faults = [
        TokenFailure::Status(StatusCode::BAD_GATEWAY),
        TokenFailure::Garbage,
        TokenFailure::Oversize,
        TokenFailure::Reset,
        TokenFailure::Hang,
        TokenFailure::TooManyRequests {
            retry_after: Duration::from_secs(60),
        },
    ];
    let url = format!("{}/Patient?_count=20", stand_in.api_url());
    for (round, fault) in token_faults.iter().enumerate() {
        stand_in.fail_token_requests(3, fault.clone());
        stand_in.fail_api_requests(1, ApiFailure::Unauthorized);
        stand_in.fail_api_requests(1, ApiFailure::Reset);
        if round % 2 == 0 {
            stand_in.revoke_all_tokens();
        } else {
            stand_in.expire_all_tokens();
        }
        for _ in 0..6 {
            let request = Request::get(&url).body(Full::default()).unwrap();
            let future = tower::Service::call(&mut client.clone(), request);
            shown.push_str(&format!("{future:?}"));
            match future.await {
                Ok(response) => shown.push_str(&format!("{response:?}")),
                Err(error) => shown.push_str(&chain(&error)),
            }
        }
    }
    shown.push_str(&format!("{layer:?} {client:?} {:?}", layer.metrics()));

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let issued = issued.0.lock().unwrap().clone();
    assert!(issued.len() >= 3, "tokens were issued: {issued:?}");
    assert!(
        logs.contains("token fetch failed") && logs.contains("token cached"),
        "{logs}"
    );
    let everything = format!("{shown}\n{logs}");
    for secret in issued
        .iter()
        .map(String::as_str)
        .chain([DEMO_CLIENT_SECRET])
    {
        assert!(
            !everything.contains(secret),
            "a secret leaked:\n{everything}"
        );
    }
}
