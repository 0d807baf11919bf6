//! With reqwest: the layer over a [`reqwest::Client`], and (feature `reqwest-middleware`)
//! `BlazeMiddleware`, the same work as a `reqwest_middleware::Middleware`.
//!
//! `reqwest::Client` is a `tower::Service<reqwest::Request>`; the layer speaks
//! `http::Request`. [`ReqwestService`] bridges the two, so the layer wraps a client in one
//! line:
//!
//! ```no_run
//! use blaze_auth::{BlazeAuthLayer, ClientCredentials, ReqwestService};
//! use tower::{Layer, ServiceExt};
//!
//! # async fn run() -> Result<(), blaze_auth::BoxError> {
//! let source = ClientCredentials::blaze_staging("my-client-id", "my-client-secret").build()?;
//! let layer = BlazeAuthLayer::builder(source)
//!     .study("FHIR-T")
//!     .partner_id("partner-42")
//!     .origin(blaze_auth::blaze::STAGING_URL)
//!     .build()?;
//! let client = layer.layer(ReqwestService::new(reqwest::Client::new()));
//!
//! let url = "https://apigateway.apps.stageapi.mskcc.org/msk-apim/external/v2/crit/blaze/api/Patient";
//! let request = http::Request::get(url).body(bytes::Bytes::new())?;
//! let response = client.oneshot(request).await?;
//! // Back to a `reqwest::Response`, URL included, for `text()`, `json()`, `error_for_status()`.
//! let response = reqwest::Response::from(response);
//! println!("{} {}", response.status(), response.text().await?);
//! # Ok(())
//! # }
//! ```
//!
//! # Request bodies and the retry after a 401
//!
//! [`ReqwestService`] takes any body reqwest takes (`B: Into<reqwest::Body>`). With the
//! default [`CloneBody`](crate::CloneBody), send a body that is `Clone`: `Bytes` (cloning is
//! a reference count), `String`, `Vec<u8>` or `&'static str`; the retry after a 401 sends a
//! clone. A streaming [`reqwest::Body`] is not `Clone`: give the layer
//! [`NoReplay`](crate::NoReplay) (the 401 goes back to the caller as it came, and the next
//! request gets a new token) or [`BufferBody`](crate::BufferBody) (the body is recorded up to
//! a cap and replayed; `ReplayBody<reqwest::Body>` converts into a `reqwest::Body`).
//!
//! # Errors
//!
//! The service's error is [`reqwest::Error`]: a request reqwest refuses (a URI that is not an
//! absolute URL: give the full URL, as reqwest wants) or a failed sending. It carries no URL
//! (reqwest's would print it, query and all, and a FHIR search's parameters can identify a
//! patient): log the URL yourself where that is allowed. Through the layer
//! it is a [`blaze_auth::Error`](crate::Error) for which
//! [`is_inner`](crate::Error::is_inner) holds, with the `reqwest::Error` as its
//! [`source`](std::error::Error::source):
//! `error.source().and_then(|e| e.downcast_ref::<reqwest::Error>())`.
//!
//! # TLS, timeouts, redirects
//!
//! This crate picks no TLS backend for reqwest: enable one in your own reqwest dependency
//! (`rustls`, `native-tls`, ...). Timeouts and the connection pool are the client's.
//! reqwest follows redirects inside the client, where the layer does not see them: reqwest
//! drops `Authorization` on a redirect to another host, but not other headers such as
//! `x-partnerid`. To keep every credential on the origins you named, build the client with
//! `.redirect(reqwest::redirect::Policy::none())`, or follow redirects outside the layer
//! with tower-http's `FollowRedirectLayer`.

#[cfg(feature = "reqwest-middleware")]
mod middleware;

#[cfg(feature = "reqwest-middleware")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest-middleware")))]
pub use self::middleware::BlazeMiddleware;

use crate::replay::ReplayBody;
use http::{Request, Response};
use pin_project::pin_project;
use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};
use tower::Service;

/// The future of a `reqwest::Client`'s `call`.
type Pending = <::reqwest::Client as Service<::reqwest::Request>>::Future;

/// A [`reqwest::Client`] as a `tower::Service<http::Request<B>>`, for [`BlazeAuthLayer`]
/// to wrap; see the [module docs](self).
///
/// Requests convert with reqwest's own `TryFrom` (method, URL, headers, version,
/// extensions); responses come back as `http::Response<reqwest::Body>` carrying their URL,
/// so `reqwest::Response::from(response)` is the response reqwest gave. Cloning is cheap:
/// clones share the client's connection pool.
///
/// [`BlazeAuthLayer`]: crate::BlazeAuthLayer
#[derive(Clone, Debug, Default)]
pub struct ReqwestService {
    client: ::reqwest::Client,
}

impl ReqwestService {
    /// Wraps `client`.
    pub fn new(client: ::reqwest::Client) -> Self {
        Self { client }
    }

    /// The wrapped client.
    pub fn get_ref(&self) -> &::reqwest::Client {
        &self.client
    }

    /// Consumes `self`, returning the wrapped client.
    pub fn into_inner(self) -> ::reqwest::Client {
        self.client
    }
}

impl From<::reqwest::Client> for ReqwestService {
    fn from(client: ::reqwest::Client) -> Self {
        Self::new(client)
    }
}

impl<B> Service<Request<B>> for ReqwestService
where
    B: Into<::reqwest::Body>,
{
    type Response = Response<::reqwest::Body>;
    type Error = ::reqwest::Error;
    type Future = ReqwestFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<::reqwest::Request>::poll_ready(&mut self.client, cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let state = match ::reqwest::Request::try_from(request) {
            Ok(request) => State::Sending {
                future: self.client.call(request),
            },
            Err(error) => State::Refused {
                error: Some(error.without_url()),
            },
        };
        ReqwestFuture { state }
    }
}

/// Response future of [`ReqwestService`].
#[pin_project]
pub struct ReqwestFuture {
    #[pin]
    state: State,
}

#[pin_project(project = StateProj)]
enum State {
    /// Polls reqwest's future.
    Sending {
        #[pin]
        future: Pending,
    },
    /// Holds the error of a request reqwest refused to build.
    Refused { error: Option<::reqwest::Error> },
}

impl Future for ReqwestFuture {
    type Output = Result<Response<::reqwest::Body>, ::reqwest::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Sending { future } => {
                let response = ready!(future.poll(cx)).map_err(::reqwest::Error::without_url)?;
                Poll::Ready(Ok(into_http(response)))
            }
            StateProj::Refused { error } => {
                Poll::Ready(Err(error.take().expect("polled after completion")))
            }
        }
    }
}

impl fmt::Debug for ReqwestFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Sending { .. } => "Sending",
            State::Refused { .. } => "Refused",
        };
        f.debug_struct("ReqwestFuture")
            .field("state", &state)
            .finish()
    }
}

/// reqwest's own conversion, keeping the URL that its conversion back reads.
fn into_http(response: ::reqwest::Response) -> Response<::reqwest::Body> {
    use ::reqwest::ResponseBuilderExt;
    let url = response.url().clone();
    let mut response = Response::from(response);
    if let Ok(carrier) = Response::builder().url(url).body(()) {
        response
            .extensions_mut()
            .extend(carrier.into_parts().0.extensions);
    }
    response
}

/// A body [`BufferBody`](crate::BufferBody) recorded, sent by reqwest.
impl<B> From<ReplayBody<B>> for ::reqwest::Body
where
    B: http_body::Body + Send + Sync + 'static,
    B::Error: Into<crate::BoxError>,
{
    fn from(body: ReplayBody<B>) -> Self {
        ::reqwest::Body::wrap(body)
    }
}
