//! The README's own stack, inside tower-http's `FollowRedirectLayer` as `examples/tower_http.rs`
//! recommends: credentials reach Blaze's gateway and nothing a redirect points elsewhere.
#![cfg(feature = "oauth2")]

use blaze_auth::{BlazeAuthLayer, ClientCredentials};
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header::LOCATION};
use http_body_util::Full;
use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
};
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_http::follow_redirect::FollowRedirectLayer;

const API: &str = "https://apigateway.apps.stageapi.mskcc.org/msk-apim/external/v2/crit/blaze/api";

/// One request as "the network" saw it.
#[derive(Debug)]
struct Hop {
    uri: String,
    headers: HeaderMap,
}

impl Hop {
    fn has_credentials(&self) -> [bool; 3] {
        [
            self.headers.contains_key("authorization"),
            self.headers.contains_key("x-partnerid"),
            self.uri.contains("researchstudy"),
        ]
    }
}

#[tokio::test]
async fn a_cross_origin_redirect_gets_no_credentials_from_the_readme_stack() {
    // The token endpoint, answered in process.
    let token_endpoint = service_fn(|_: Request<Full<Bytes>>| async {
        let token = r#"{"token_type":"Bearer","access_token":"t0k3n","expires_in":3600}"#;
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
            token.as_bytes(),
        ))))
    });
    // The FHIR API: the gateway redirects Patient to another host, Observation to itself.
    let hops = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&hops);
    let network = service_fn(move |request: Request<String>| {
        record.lock().unwrap().push(Hop {
            uri: request.uri().to_string(),
            headers: request.headers().clone(),
        });
        let location = match request.uri().path() {
            path if path.ends_with("/Patient") => Some("https://evil.example/collect?x=1"),
            path if path.ends_with("/Observation") => Some(
                "https://apigateway.apps.stageapi.mskcc.org/msk-apim/external/v2/crit/blaze/api/Observation2",
            ),
            _ => None,
        };
        async move {
            let mut response = Response::new(String::new());
            if let Some(location) = location {
                *response.status_mut() = StatusCode::FOUND;
                response
                    .headers_mut()
                    .insert(LOCATION, location.parse().unwrap());
            }
            Ok::<_, Infallible>(response)
        }
    });

    // As in the README, but for the token endpoint's client.
    let source = ClientCredentials::blaze_staging("my-client-id", "my-client-secret")
        .http_client(token_endpoint)
        .build()
        .unwrap();
    let layer = BlazeAuthLayer::builder(source)
        .study("FHIR-T")
        .partner_id("partner-42")
        .build()
        .unwrap();
    let client = ServiceBuilder::new()
        .layer(FollowRedirectLayer::new())
        .layer(layer)
        .service(network);

    for resource in ["Patient", "Observation"] {
        let request = Request::get(format!("{API}/{resource}?_count=50"))
            .body(String::new())
            .unwrap();
        let response = client.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{resource}");
    }

    let hops = hops.lock().unwrap();
    let uris: Vec<&str> = hops.iter().map(|hop| hop.uri.as_str()).collect();
    assert_eq!(
        uris,
        [
            format!("{API}/Patient?_count=50&researchstudy=FHIR-T").as_str(),
            "https://evil.example/collect?x=1",
            format!("{API}/Observation?_count=50&researchstudy=FHIR-T").as_str(),
            format!("{API}/Observation2?researchstudy=FHIR-T").as_str(),
        ]
    );
    // The redirect target elsewhere gets nothing; every hop to the gateway gets all three.
    assert_eq!(hops[1].has_credentials(), [false; 3], "{:?}", hops[1]);
    for hop in [&hops[0], &hops[2], &hops[3]] {
        assert_eq!(hop.has_credentials(), [true; 3], "{hop:?}");
        assert_eq!(hop.headers["authorization"], "Bearer t0k3n");
    }
}
