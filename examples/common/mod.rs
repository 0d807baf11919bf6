//! What the examples share: a Blaze client from `BLAZE_*` variables or, without them, against
//! the embedded stand-in; and FHIR search paging.

use blaze_auth::{
    BlazeAuth, BlazeAuthLayer, BlazeEnv, BoxError, ClientCredentials, testing::StandIn,
};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::Value;
use tower::ServiceExt;

/// hyper-util's client over rustls, with the layer on top.
pub(crate) type BlazeClient = BlazeAuth<Client<HttpsConnector<HttpConnector>, Full<Bytes>>>;

/// The partner id the stand-in demands, as Blaze v2 does.
const DEMO_PARTNER_ID: &str = "demo-partner";

#[allow(dead_code)] // Each example uses its part.
pub(crate) struct Blaze {
    pub(crate) client: BlazeClient,
    pub(crate) api_url: String,
    pub(crate) layer: BlazeAuthLayer,
    /// The embedded server, when no `BLAZE_*` variables were set.
    pub(crate) stand_in: Option<StandIn>,
}

/// Connects to the server the `BLAZE_*` variables name, or starts the stand-in.
pub(crate) async fn connect() -> Result<Blaze, BoxError> {
    let (env, stand_in) = match BlazeEnv::from_env()? {
        Some(env) => (env, None),
        None => {
            let stand_in = StandIn::builder()
                .require_partner_id(DEMO_PARTNER_ID)
                .start()
                .await?;
            (stand_in.blaze_env(), Some(stand_in))
        }
    };
    let source: ClientCredentials = env.client_credentials().build()?;
    let layer = env.layer(source).build()?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    let client = Client::builder(TokioExecutor::new()).build(https);
    Ok(Blaze {
        client: tower::Layer::layer(&layer, client),
        api_url: env.api_url(),
        layer,
        stand_in,
    })
}

/// GETs `url` and returns its JSON; an error status becomes an error with the server's
/// diagnostics.
pub(crate) async fn get_json(client: &BlazeClient, url: &str) -> Result<Value, BoxError> {
    let request = Request::get(url)
        .header("accept", "application/fhir+json")
        .body(Full::default())?;
    let response = client.clone().oneshot(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if status != StatusCode::OK {
        let diagnostics = json["issue"][0]["diagnostics"]
            .as_str()
            .unwrap_or("no details");
        let path = url
            .parse::<http::Uri>()
            .map(|uri| uri.path().to_owned())
            .unwrap_or_default();
        return Err(format!("{path}: {status}: {diagnostics}").into());
    }
    Ok(json)
}

/// Follows a search's `next` links to the end, calling `on_page` with each Bundle.
pub(crate) async fn search(
    client: &BlazeClient,
    first_page: &str,
    mut on_page: impl FnMut(&Value) -> Result<(), BoxError>,
) -> Result<usize, BoxError> {
    let mut url = first_page.to_owned();
    let mut pages = 0;
    loop {
        let bundle = get_json(client, &url).await?;
        pages += 1;
        on_page(&bundle)?;
        let next = bundle["link"].as_array().and_then(|links| {
            links
                .iter()
                .find(|link| link["relation"] == "next")
                .and_then(|link| link["url"].as_str())
        });
        match next {
            Some(next) => url = next.to_owned(),
            None => return Ok(pages),
        }
    }
}

/// The resources of a Bundle's entries.
pub(crate) fn resources(bundle: &Value) -> impl Iterator<Item = &Value> {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|entry| &entry["resource"])
}
