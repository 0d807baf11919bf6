//! [`BlazeMiddleware`]: the layer's work as a `reqwest_middleware::Middleware`.

use crate::{
    BlazeAuthLayer, Metrics,
    attempt::Authenticator,
    error::{BoxError, Error},
    rejection::Verdict,
    study::ResearchStudy,
    token::TokenSource,
};
use ::reqwest::{Request, Response, Url, header::AUTHORIZATION};
use http::{Extensions, HeaderValue, Uri};
use reqwest_middleware::{Middleware, Next};

/// Authenticates every request of a [`reqwest_middleware::ClientWithMiddleware`] for the
/// Blaze FHIR API, as [`BlazeAuthLayer`] does for a tower stack.
///
/// Each request in the layer's credential scope (by default Blaze's gateways and loopback;
/// the layer builder's `origin` names others) gets `Authorization` (the cached
/// token, marked sensitive), the `researchstudy` query parameter (a [`ResearchStudy`] in
/// reqwest-middleware's extensions, from `RequestBuilder::with_extension`, overrides the
/// layer's) and the
/// fixed headers such as `x-partnerid`. On a 401 that a new token may fix, the token is
/// dropped and, when the request can be cloned ([`Request::try_clone`]: any body but a
/// stream), sent once more with a new one; otherwise the 401 is returned as it came. The
/// storm guard, the cool-down after failed fetches and the refresh ahead of expiry are the
/// layer's.
///
/// Made from a layer (`BlazeMiddleware::from(&layer)`), it shares that layer's configuration and token cache: a program with a tower stack and a
/// reqwest-middleware stack built from one layer fetches one token for both.
///
/// Errors of its own (no token, a study conflict) are
/// [`reqwest_middleware::Error::Middleware`] wrapping a [`blaze_auth::Error`](crate::Error).
///
/// ```no_run
/// use blaze_auth::{BlazeAuthLayer, BlazeMiddleware, ClientCredentials};
///
/// # async fn run() -> Result<(), blaze_auth::BoxError> {
/// let source = ClientCredentials::blaze_staging("my-client-id", "my-client-secret").build()?;
/// let layer = BlazeAuthLayer::builder(source)
///     .study("FHIR-T")
///     .partner_id("partner-42")
///     .origin(blaze_auth::blaze::STAGING_URL)
///     .build()?;
/// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
///     .with(BlazeMiddleware::from(&layer))
///     .build();
/// let url = "https://apigateway.apps.stageapi.mskcc.org/msk-apim/external/v2/crit/blaze/api/Patient";
/// let response = client.get(url).send().await?;
/// println!("{}", response.status());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct BlazeMiddleware {
    auth: Authenticator,
}

impl BlazeMiddleware {
    /// A middleware that takes tokens from `source` and sends requests for research study
    /// `study`: the same as `BlazeMiddleware::from(BlazeAuthLayer::new(source, study))`. For
    /// the other settings (partner id, origins, ...), build a layer with
    /// [`BlazeAuthLayer::builder`] and convert it.
    ///
    /// # Panics
    ///
    /// If `study` is not a valid study id; see [`BlazeAuthLayer::new`].
    pub fn new(source: impl TokenSource + 'static, study: &str) -> Self {
        Self::from(BlazeAuthLayer::new(source, study))
    }

    /// What the token cache has done so far; see [`BlazeAuthLayer::metrics`].
    pub fn metrics(&self) -> Metrics {
        self.auth.metrics()
    }
}

impl<R> From<&BlazeAuthLayer<R>> for BlazeMiddleware {
    /// A middleware with `layer`'s configuration, sharing its token cache.
    fn from(layer: &BlazeAuthLayer<R>) -> Self {
        Self {
            auth: Authenticator::new(layer.config().clone()),
        }
    }
}

impl<R> From<BlazeAuthLayer<R>> for BlazeMiddleware {
    /// A middleware with `layer`'s configuration, sharing its token cache.
    fn from(layer: BlazeAuthLayer<R>) -> Self {
        Self::from(&layer)
    }
}

#[async_trait::async_trait]
impl Middleware for BlazeMiddleware {
    async fn handle(
        &self,
        mut request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let Ok(uri) = request.url().as_str().parse::<Uri>() else {
            return Err(failed(Error::invalid_uri(None)));
        };
        if !self.auth.authenticates(&uri).map_err(failed)? {
            return next.run(request, extensions).await;
        }
        prepare(&self.auth, &mut request, uri, extensions).map_err(failed)?;
        let copy = if self.auth.may_retry(request.method()) {
            request.try_clone()
        } else {
            None
        };
        let sent = authorize(&mut request, self.auth.token().await.map_err(failed)?);
        let response = next.clone().run(request, extensions).await?;
        let verdict = Verdict::of_head(response.status(), response.headers());
        let retry = self
            .auth
            .after_response(sent, verdict, copy.is_some())
            .await
            .map_err(failed)?;
        let (Some(token), Some(mut copy)) = (retry, copy) else {
            return Ok(response);
        };
        let sent = authorize(&mut copy, token);
        let response = next.run(copy, extensions).await?;
        let verdict = Verdict::of_head(response.status(), response.headers());
        self.auth.after_retry(sent, verdict);
        Ok(response)
    }
}

/// Adds the study and the fixed headers, as the layer does to an `http::Request`'s head.
fn prepare(
    auth: &Authenticator,
    request: &mut Request,
    uri: Uri,
    extensions: &Extensions,
) -> Result<(), Error> {
    let mut head = http::Request::new(());
    *head.uri_mut() = uri;
    *head.headers_mut() = std::mem::take(request.headers_mut());
    if let Some(study) = extensions.get::<ResearchStudy>() {
        head.extensions_mut().insert(study.clone());
    }
    let prepared = auth.prepare(&mut head);
    *request.headers_mut() = std::mem::take(head.headers_mut());
    prepared?;
    if *head.uri() != *request.url().as_str() {
        let url = Url::parse(&head.uri().to_string())
            .map_err(|error| Error::invalid_uri(Some(BoxError::from(error))))?;
        *request.url_mut() = url;
    }
    Ok(())
}

/// Puts the token into the request; returns which one it was.
fn authorize<S>(request: &mut Request, (token, sent): (HeaderValue, S)) -> S {
    // `insert`, not `append`: one `Authorization`, ours, whatever the request had.
    request.headers_mut().insert(AUTHORIZATION, token);
    sent
}

fn failed(error: Error) -> reqwest_middleware::Error {
    reqwest_middleware::Error::middleware(error)
}
