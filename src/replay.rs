//! How a request body is kept for the retry after a 401.
//!
//! To send a request a second time the layer needs a second body. [`CloneBody`], the default,
//! clones it: right for the bodies HTTP clients are mostly given (`Full<Bytes>`, `Empty`,
//! `String`, `Bytes`; cloning `Bytes` is a reference count). For a body that cannot be cloned
//! (hyper's `Incoming`, a streaming or tonic body) use [`NoReplay`]: such a request is sent
//! once, and a 401 goes back to the caller as it came.
//!
//! ```
//! use blaze_auth::{AccessToken, BlazeAuthLayer, NoReplay, StaticToken};
//!
//! let source = StaticToken::new(AccessToken::bearer("t")?);
//! // For a client whose request body is not `Clone`:
//! let layer = BlazeAuthLayer::new(source, "FHIR-T").replay(NoReplay);
//! # let _ = layer;
//! # Ok::<_, blaze_auth::Error>(())
//! ```

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

    /// Whether `copy`, made by [`replayable`](Replay::replayable), can still be sent when a
    /// 401 arrives; if not, the 401 goes to the caller. For a copy that may turn out
    /// incomplete, such as a buffer with a size cap. Default: `true`.
    fn can_replay(copy: &Self::Body) -> bool {
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
