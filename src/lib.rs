//! Client-side authentication for Memorial Sloan Kettering's clinical-research FHIR API,
//! "Blaze", as a [`tower`] middleware.
//!
//! # Overview
//!
//! [`BlazeAuthLayer`] wraps any `tower::Service<http::Request<B>>`: a hyper-util client, a
//! tonic channel, an axum-side client. For every request it
//!
//! - adds `Authorization: Bearer <token>`, replacing any `Authorization` already there, with
//!   the header value marked sensitive;
//! - appends `researchstudy=<study>` to the query, leaving the rest of the URI byte for byte
//!   as it was; a URI that names the study already (Blaze's paging links do) is left alone,
//!   one that names another study is an error;
//! - adds the layer's fixed headers, such as Blaze v2's `x-partnerid`;
//! - on a 401, fetches a new token and sends the request once more.
//!
//! It does so only for requests in its *credential scope*: by default Blaze's two gateways
//! ([`blaze::STAGING_URL`], [`blaze::PRODUCTION_URL`]) and loopback hosts, or the origins
//! named with [`BlazeAuthLayerBuilder::origin`], or every origin after [`BlazeAuthLayerBuilder::any_origin`]. A request
//! to another origin passes through untouched, so a redirect to another host (with the layer
//! inside tower-http's `FollowRedirectLayer`) gets no credentials; plain `http` to a host that
//! is not loopback never gets a token without [`BlazeAuthLayerBuilder::allow_http`]. Relative URIs, as
//! tonic sends them, are always authenticated.
//!
//! Tokens come from a [`TokenSource`]. The layer caches them, refreshes them ahead of expiry,
//! and runs one fetch at a time however many requests need a token. Requests with a valid
//! cached token take no lock.
//!
//! # Example
//!
//! ```
//! use blaze_auth::{AccessToken, BlazeAuthLayer, StaticToken};
//! use http::{Request, Response, StatusCode, header::AUTHORIZATION};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let source = StaticToken::new(AccessToken::bearer("my-token")?);
//! let client = ServiceBuilder::new()
//!     .layer(BlazeAuthLayer::new(source, "FHIR-T"))
//!     // In real use: a hyper-util client. Here, a service that shows what it was sent.
//!     .service(service_fn(|request: Request<String>| async move {
//!         let seen = format!("{} {:?}", request.uri(), request.headers()[AUTHORIZATION]);
//!         Ok::<_, std::convert::Infallible>(Response::new(seen))
//!     }));
//!
//! let request = Request::get("/Patient?_count=10").body(String::new())?;
//! let response = client.oneshot(request).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//! assert_eq!(response.body(), "/Patient?_count=10&researchstudy=FHIR-T Sensitive");
//! # Ok(())
//! # }
//! ```
//!
//! With hyper-util's client (`hyper-util` with `client-legacy`, `http1` and `tokio`):
//!
//! ```no_run
//! use blaze_auth::{AccessToken, BlazeAuthLayer, StaticToken};
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::{client::legacy::Client, rt::TokioExecutor};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let source = StaticToken::new(AccessToken::bearer("my-token")?);
//! let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let client = ServiceBuilder::new()
//!     .layer(
//!         BlazeAuthLayer::builder(source)
//!             .study("FHIR-T")
//!             .partner_id("partner-42")
//!             // The default scope (Blaze's gateways and loopback) covers this URL; a
//!             // Blaze elsewhere is named with `.origin(..)`.
//!             .build()?,
//!     )
//!     .service(client);
//!
//! let request = http::Request::get("http://127.0.0.1:8080/msk-apim/external/v2/crit/blaze/api/Patient")
//!     .body(Full::default())?;
//! let response = client.oneshot(request).await?;
//! println!("{}", response.status());
//! # Ok(())
//! # }
//! ```
//!
//! # Retries and request bodies
//!
//! To send a request again after a 401 the layer keeps a copy of it. By default it clones the
//! body ([`CloneBody`]), so the body type must be `Clone`; for bodies that are not (hyper's
//! `Incoming`, tonic's), [`BufferBody`] records what is sent up to a cap and replays it, and
//! [`NoReplay`] sends each request once (see [`replay`]). A second 401 goes back to the caller as it came; no other
//! status is ever retried.
//!
//! # Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `oauth2` | yes | `ClientCredentials` (client-credentials grant), `BlazeEnv`, `TokenError` |
//! | `rustls` | yes | the built-in HTTPS client of `ClientCredentials` (hyper-util + rustls, no OpenSSL) |
//! | `testing` | no | `testing::StandIn`, an embedded Blaze stand-in for tests and demos |
//! | `redis` | no | `RedisShared`: one token for many processes, kept in Redis |
//! | `reqwest` | no | `ReqwestService`: the layer over a `reqwest::Client` (module `blaze_auth::reqwest`); picks no TLS backend |
//! | `reqwest-middleware` | no | `BlazeMiddleware`: a `reqwest_middleware::Middleware` sharing a layer's token cache |
//! | `metrics` | no | counters, a histogram and a gauge through the `metrics` facade, under Prometheus names |
//!
//! Without default features the crate is the layer, the cache and the [`TokenSource`] trait:
//! no HTTP client, no TLS, no JSON.
//!
//! # Minimum supported Rust version
//!
//! 1.85 (`rust-version` in Cargo.toml; edition 2024).
//!
//! # Runtime
//!
//! Token fetches run as Tokio tasks, so that no caller's cancellation stops a fetch others wait
//! for: the layer must be used inside a Tokio runtime. Expiry is measured on Tokio's clock, so
//! tests can pause and advance time.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]

#[cfg(feature = "reqwest-middleware")]
mod attempt;
mod backoff;
pub mod blaze;
mod error;
mod layer;
mod macros;
mod metrics;
mod rejection;
pub mod replay;
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub mod reqwest;
mod scope;
mod service;
mod study;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
pub mod token;

pub mod future;

#[cfg(test)]
mod test_helpers;

/// Compiles the README's examples as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub use crate::{
    error::{BoxError, Error, FetchError},
    layer::{BlazeAuthLayer, BlazeAuthLayerBuilder},
    metrics::Metrics,
    replay::{BufferBody, CloneBody, NoReplay, Replay, ReplayBody},
    service::BlazeAuth,
    study::ResearchStudy,
    token::{AccessToken, StaticToken, TokenFn, TokenFuture, TokenSource, token_fn},
};

#[cfg(feature = "oauth2")]
#[cfg_attr(docsrs, doc(cfg(feature = "oauth2")))]
pub use crate::token::oauth2::{
    BlazeEnv, ClientAuth, ClientCredentials, ClientCredentialsBuilder, ClientSecret, TokenError,
};

#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub use crate::metrics::describe_metrics;

#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub use crate::reqwest::{ReqwestFuture, ReqwestService};

#[cfg(feature = "reqwest-middleware")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest-middleware")))]
pub use crate::reqwest::BlazeMiddleware;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use crate::token::redis::{
    EncryptionKey, RedisMetrics, RedisShared, RedisSharedBuilder, SharedKey,
};
