//! What the benches share: the request, the token, and the inner service.

// Each bench binary uses a part of this module.
#![allow(dead_code)]

use blaze_auth::{AccessToken, TokenSource, token_fn};
use http::{Request, Response, Uri, uri::PathAndQuery};
use std::{
    convert::Infallible,
    future::{Ready, ready},
    hint::black_box,
    task::{Context, Poll},
    time::Duration,
};

/// A FHIR search as a client sends it through the layer (path and query).
pub(crate) const PATH: &str = "/msk-apim/external/v2/crit/blaze/api/Observation?patient=123&code=http://loinc.org|718-7&_count=50";
/// [`PATH`] on Blaze's staging gateway, in the layer's default credential scope.
pub(crate) const URI: &str = "https://apigateway.apps.stageapi.mskcc.org/msk-apim/external/v2/crit/blaze/api/Observation?patient=123&code=http://loinc.org|718-7&_count=50";
pub(crate) const STUDY: &str = "FHIR-T";
/// `researchstudy=<STUDY>`, encoded: what the hand-written baselines append.
pub(crate) const STUDY_PAIR: &str = "researchstudy=FHIR-T";
pub(crate) const TOKEN: &str =
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJwYXJ0bmVyLTQyIiwic2NvcGUiOiJmdWxsIn0.c2lnbmF0dXJl";

/// A token as Blaze issues it: it lives an hour, so a cached request checks its expiry.
pub(crate) fn token() -> Result<AccessToken, blaze_auth::Error> {
    Ok(AccessToken::bearer(TOKEN)?.with_expires_in(Duration::from_secs(3600)))
}

/// A source that yields [`token`] at once.
pub(crate) fn source() -> impl TokenSource + 'static {
    token_fn(|_| async { token() })
}

/// A `GET` of [`URI`] with `body` and no headers. Building it allocates nothing.
pub(crate) fn get<B>(body: B) -> Request<B> {
    let mut request = Request::new(body);
    *request.uri_mut() = Uri::from_static(URI);
    request
}

/// `uri` with [`STUDY_PAIR`] appended to its query: the least the study parameter needs.
pub(crate) fn with_study(uri: Uri) -> Uri {
    let mut parts = uri.into_parts();
    let (path_and_query, separator) = match &parts.path_and_query {
        Some(pq) if pq.query().is_some_and(|q| !q.is_empty()) => (pq.as_str(), "&"),
        Some(pq) => (pq.path(), "?"),
        None => ("/", "?"),
    };
    let mut new = String::with_capacity(path_and_query.len() + 1 + STUDY_PAIR.len());
    new.push_str(path_and_query);
    new.push_str(separator);
    new.push_str(STUDY_PAIR);
    parts.path_and_query = Some(PathAndQuery::try_from(new).expect("valid path and query"));
    Uri::from_parts(parts).expect("valid URI")
}

/// The inner service: always ready, answers 200 at once.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ok200;

impl<B> tower::Service<Request<B>> for Ok200 {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = Ready<Result<Response<()>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The request is looked at, so none of the work on it can be optimised away.
        black_box(&request);
        ready(Ok(Response::new(())))
    }
}
