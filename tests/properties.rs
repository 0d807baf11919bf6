//! Property tests: the request rewrite for any URI and study id, the token-response parser
//! for any bytes.
#![cfg(feature = "oauth2")]

use blaze_auth::{AccessToken, BlazeAuthLayer, ClientCredentials, StaticToken};
use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::Full;
use proptest::prelude::*;
use std::convert::Infallible;
use tower::{Layer, ServiceExt, service_fn};

/// Sends a GET for `uri` through the layer and returns the URI the inner service got.
fn rewrite(study: &str, uri: &str) -> Result<String, blaze_auth::Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let source = StaticToken::new(AccessToken::bearer("t").unwrap());
        let layer = BlazeAuthLayer::builder(source)
            .study(study)
            .origin("https://blaze.example")
            .build()
            .unwrap();
        let echo = service_fn(|request: Request<()>| async move {
            Ok::<_, Infallible>(Response::new(request.uri().to_string()))
        });
        let request = Request::get(uri).body(()).unwrap();
        Ok(layer.layer(echo).oneshot(request).await?.into_body())
    })
}

fn studies(query: &str) -> Vec<String> {
    form_urlencoded::parse(query.as_bytes())
        .filter(|(name, _)| name == "researchstudy")
        .map(|(_, value)| value.into_owned())
        .collect()
}

/// Study ids: printable, any script, no surrounding white space.
fn study_id() -> impl Strategy<Value = String> {
    "[^\\p{Cc}\\s][^\\p{Cc}]{0,20}[^\\p{Cc}\\s]|[^\\p{Cc}\\s]"
}

/// Query strings as FHIR searches have them: `|`, `,`, `:`, `/`, percent escapes, `+`.
fn query() -> impl Strategy<Value = String> {
    let name = "[a-z_][a-z_:.-]{0,10}".prop_filter("not ours", |n| n != "researchstudy");
    let value = "([A-Za-z0-9|,:/._~!$'()*+;@?-]|%[0-9A-F]{2}){0,24}";
    prop::collection::vec((name, value), 0..6).prop_map(|pairs| {
        pairs
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join("&")
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_query_is_kept_and_exactly_one_study_added(
        study in study_id(),
        path in "(/[A-Za-z0-9._~-]{1,12}){1,4}",
        query in query(),
    ) {
        let uri = if query.is_empty() { path.clone() } else { format!("{path}?{query}") };
        let sent = rewrite(&study, &uri).unwrap();
        let sent: Uri = sent.parse().unwrap();
        prop_assert_eq!(sent.path(), path.as_str());
        let sent_query = sent.query().unwrap();
        // Byte for byte what it was, then our parameter.
        let kept = sent_query.rsplit_once("researchstudy=").unwrap().0;
        let expected = if query.is_empty() { String::new() } else { format!("{query}&") };
        prop_assert_eq!(kept, expected.as_str());
        prop_assert_eq!(studies(sent_query), vec![study.clone()]);
        // Sending the result again (a paging link) changes nothing.
        prop_assert_eq!(rewrite(&study, &sent.to_string()).unwrap(), sent.to_string());
    }

    #[test]
    fn any_uri_is_rewritten_or_refused_never_a_panic(
        study in study_id(),
        uri in "(/|https://blaze\\.example/)[!-~]{0,60}",
    ) {
        let Ok(parsed) = uri.parse::<Uri>() else { return Ok(()) };
        match rewrite(&study, &uri) {
            Ok(sent) => {
                let sent: Uri = sent.parse().unwrap();
                let found = studies(sent.query().unwrap_or_default());
                prop_assert!(!found.is_empty() && found.iter().all(|s| *s == study));
            }
            Err(error) => prop_assert!(
                error.is_study_conflict() || error.is_invalid_uri(),
                "{:?} for {}", error, parsed
            ),
        }
    }

    #[test]
    fn the_token_parser_never_panics_on_any_bytes(
        status in 100u16..600,
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        fetch(status, Bytes::from(body));
    }

    #[test]
    fn the_token_parser_never_panics_on_json_of_any_shape(
        status in prop::sample::select(vec![200u16, 400, 401, 429, 500]),
        access_token in prop::option::of(json_value()),
        token_type in prop::option::of(json_value()),
        expires_in in prop::option::of(json_value()),
        error in prop::option::of(json_value()),
    ) {
        let mut object = serde_json::Map::new();
        for (key, value) in [("access_token", access_token), ("token_type", token_type), ("expires_in", expires_in), ("error", error)] {
            if let Some(value) = value {
                object.insert(key.to_owned(), value);
            }
        }
        fetch(status, Bytes::from(serde_json::Value::Object(object).to_string()));
    }
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map_or(serde_json::Value::Null, serde_json::Value::Number)),
        "\\PC{0,40}".prop_map(serde_json::Value::from),
        "[ -~]{0,10}".prop_map(|s| serde_json::json!([s])),
    ]
}

/// Runs one token fetch against a server that answers `status` and `body`.
fn fetch(status: u16, body: Bytes) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let client = service_fn(move |_: Request<Full<Bytes>>| {
            let mut response = Response::new(Full::new(body.clone()));
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            async move { Ok::<_, Infallible>(response) }
        });
        let source = ClientCredentials::builder("https://h/token", "id", "secret")
            .http_client(client)
            .max_attempts(1)
            .build()
            .unwrap();
        let _ = source.fetch_token().await;
    });
}
