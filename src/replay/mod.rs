//! How a request body is kept for the retry after a 401.
//!
//! To send a request a second time the layer needs a second body. [`CloneBody`], the default,
//! clones it: right for the bodies HTTP clients are mostly given (`Full<Bytes>`, `Empty`,
//! `String`, `Bytes`; cloning `Bytes` is a reference count). For a body that cannot be cloned
//! (hyper's `Incoming`, a streaming or tonic body) there are two choices:
//!
//! - [`BufferBody`] records what is sent, up to a cap (64 KiB by default), and replays it
//!   after a 401, then sends whatever of the body had not been sent yet. A request whose
//!   body is longer than the cap is not retried: its 401 goes back to the caller.
//! - [`NoReplay`] sends every request once; a 401 goes back to the caller as it came.
//!
//! Both work with any `http_body::Body`; [`BufferBody`] hands the inner service a
//! [`ReplayBody`].
//!
//! ```
//! use blaze_auth::{AccessToken, BlazeAuthLayer, NoReplay, StaticToken};
//!
//! let source = StaticToken::new(AccessToken::bearer("t")?);
//! // For a client whose request body is not `Clone`, without retries:
//! let layer = BlazeAuthLayer::new(source, "FHIR-T").replay(NoReplay);
//! # let _ = layer;
//! # Ok::<_, blaze_auth::Error>(())
//! ```
//!
//! A streaming body replayed after a 401, the inner service standing in for a server that
//! refuses the first token:
//!
//! ```
//! use blaze_auth::{AccessToken, BlazeAuthLayer, BufferBody, ReplayBody, token_fn};
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode, header::AUTHORIZATION};
//! use http_body::Frame;
//! use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
//! use std::sync::{Arc, Mutex, atomic::{AtomicUsize, Ordering}};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), blaze_auth::BoxError> {
//! // A body that cannot be cloned: a stream of chunks.
//! type Streaming = BoxBody<Bytes, std::io::Error>;
//! // Tokens token-1, token-2, ...
//! let fetches = Arc::new(AtomicUsize::new(0));
//! let source = token_fn(move |_| {
//!     let n = fetches.fetch_add(1, Ordering::SeqCst) + 1;
//!     async move { AccessToken::bearer(&format!("token-{n}")) }
//! });
//! let received = Arc::new(Mutex::new(Vec::new()));
//! let log = Arc::clone(&received);
//! let client = ServiceBuilder::new()
//!     .layer(BlazeAuthLayer::new(source, "FHIR-T").replay(BufferBody::default()))
//!     .service(service_fn(move |request: Request<ReplayBody<Streaming>>| {
//!         let log = Arc::clone(&log);
//!         async move {
//!             let refused = request.headers()[AUTHORIZATION] == "Bearer token-1";
//!             let body = request.into_body().collect().await?.to_bytes();
//!             log.lock().unwrap().push(body);
//!             let status = if refused { StatusCode::UNAUTHORIZED } else { StatusCode::OK };
//!             Ok::<_, blaze_auth::BoxError>(Response::builder().status(status).body(())?)
//!         }
//!     }));
//!
//! let chunks = ["{\"resourceType\":", "\"Patient\"}"]
//!     .map(|chunk| Ok(Frame::data(Bytes::from(chunk))));
//! let body: Streaming = StreamBody::new(futures_util::stream::iter(chunks)).boxed();
//! let request = Request::post("/Patient").body(body)?;
//! let response = client.oneshot(request).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//! assert_eq!(*received.lock().unwrap(), [r#"{"resourceType":"Patient"}"#; 2]);
//! # Ok(())
//! # }
//! ```

mod buffer;
mod copy;

pub use self::buffer::{BufferBody, ReplayBody};
pub(crate) use self::copy::RequestCopy;

/// Decides whether, and how, a request body can be sent a second time.
///
/// `B` is the body the caller sends; [`Body`](Replay::Body) is what the inner service
/// receives.
pub trait Replay<B> {
    /// The body type the inner service receives.
    type Body;

    /// Converts a body that will be sent only once.
    fn once(&self, body: B) -> Self::Body;

    /// Converts a body that may be sent again: returns the body to send now, and the body for
    /// the retry if there can be one.
    fn replayable(&self, body: B) -> (Self::Body, Option<Self::Body>);

    /// Claims `copy`, made by [`replayable`](Replay::replayable), for the retry once a 401
    /// has arrived; returns whether it can be sent. If not, the 401 goes to the caller. For a
    /// copy that may turn out incomplete, such as a buffer with a size cap. Default: `true`.
    ///
    /// The layer calls it at most once, when the 401 arrives and the cache has a new token
    /// (or a fetch of one) for the retry; the first request's answer is in by then. A `true`
    /// commits the copy to the retry: [`BufferBody`] takes the rest of the caller's body over
    /// there, and the first request's body, if it was still being sent, ends with an error.
    fn claim(copy: &Self::Body) -> bool {
        let _ = copy;
        true
    }
}

/// Replays a request by cloning its body. The default.
#[derive(Clone, Copy, Debug, Default)]
pub struct CloneBody;

impl<B: Clone> Replay<B> for CloneBody {
    type Body = B;

    fn once(&self, body: B) -> B {
        body
    }

    fn replayable(&self, body: B) -> (B, Option<B>) {
        (body.clone(), Some(body))
    }
}

/// Never replays: any body works, and a 401 is returned to the caller unchanged.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoReplay;

impl<B> Replay<B> for NoReplay {
    type Body = B;

    fn once(&self, body: B) -> B {
        body
    }

    fn replayable(&self, body: B) -> (B, Option<B>) {
        (body, None)
    }
}
