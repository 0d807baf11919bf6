//! The response future of [`BlazeAuth`](crate::BlazeAuth).

use crate::{
    error::{BoxError, Error},
    layer::Config,
    rejection::Verdict,
    replay::RequestCopy,
    token::cache::{Credential, Lookup, Sent, TokenWait},
};
use http::{Request, Response, header::AUTHORIZATION};
use pin_project::pin_project;
use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};
use tower::{Service, util::Oneshot};

/// Response future of [`BlazeAuth`](crate::BlazeAuth).
///
/// [`BlazeAuth::call`](crate::BlazeAuth) makes the first call, or finds it must wait for a
/// token first; this future carries on from there: the response, and after a 401 the one
/// retry.
///
/// It holds the inner service, its future and the request body, and is `Send` when they all
/// are, `Sync` when they all are: so with hyper-util's legacy `Client` it is both, while over a
/// [`BoxCloneSyncService`](tower::util::BoxCloneSyncService), whose future is a
/// `dyn Future + Send`, it is `Send` only.
#[pin_project]
pub struct ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    #[pin]
    state: State<S, B>,
}

// The future is moved at least once per request, so its size is paid on every request: the
// states only the rare paths reach (waiting for a token, the retry) box what they hold.
#[pin_project(project = StateProj)]
pub(crate) enum State<S, B>
where
    S: Service<Request<B>>,
{
    /// Polls the inner service's response to a request the layer passes through untouched.
    PassThrough {
        #[pin]
        future: S::Future,
    },
    /// Polls the token fetch the request waits for, then sends it.
    FetchToken {
        wait: TokenWait,
        unsent: Option<Box<Unsent<S, B>>>,
    },
    /// Polls the inner service's response to the request sent with a token.
    Called {
        #[pin]
        future: S::Future,
        sent: Sent,
        config: Arc<Config>,
        /// What a retry after a 401 needs; `None` if there can be none.
        kept: Option<Kept<S, B>>,
    },
    /// Polls the token fetch after a 401, then sends the request again.
    Refresh {
        wait: TokenWait,
        unsent: Option<Box<Unsent<S, B>>>,
    },
    /// Polls the retry: the inner service's readiness, then its response.
    Retrying {
        future: Pin<Box<Oneshot<S, Request<B>>>>,
        sent: Sent,
        config: Arc<Config>,
    },
    /// Holds an error found before any call was made.
    Failed { error: Option<Error> },
}

/// A request waiting for its token, and what it is sent with.
pub(crate) struct Unsent<S, B> {
    pub(crate) inner: S,
    pub(crate) request: Request<B>,
    pub(crate) config: Arc<Config>,
    /// The copy for a retry; `None` if there can be none, or if this is the retry.
    pub(crate) copy: Option<RequestCopy<B>>,
}

/// What a request keeps for a retry after a 401: the service, and the request's copy.
pub(crate) struct Kept<S, B> {
    inner: S,
    copy: RequestCopy<B>,
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    /// The inner service's response to a request the layer does not authenticate.
    pub(crate) fn pass_through(future: S::Future) -> Self {
        Self::from(State::PassThrough { future })
    }

    /// The response to `future`, the call of `inner` with a request sent with the token
    /// `sent`, and a retry with `copy` after a 401.
    pub(crate) fn called(
        future: S::Future,
        sent: Sent,
        config: Arc<Config>,
        inner: S,
        copy: Option<RequestCopy<B>>,
    ) -> Self {
        Self::from(State::called(future, sent, config, inner, copy))
    }

    /// Waits for `wait`'s token, then sends `unsent`.
    pub(crate) fn fetch_token(wait: TokenWait, unsent: Unsent<S, B>) -> Self {
        let unsent = Some(Box::new(unsent));
        Self::from(State::FetchToken { wait, unsent })
    }

    pub(crate) fn failed(error: Error) -> Self {
        Self::from(State::Failed { error: Some(error) })
    }

    fn from(state: State<S, B>) -> Self {
        Self { state }
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<ResBody>, Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            let next = match state.as_mut().project() {
                StateProj::PassThrough { future } => return future.poll(cx).map_err(Error::inner),
                StateProj::FetchToken { wait, unsent } => {
                    let credential = ready!(Pin::new(wait).poll(cx))?;
                    unsent
                        .take()
                        .expect("polled after completion")
                        .send(credential)
                }
                StateProj::Called {
                    future,
                    sent,
                    config,
                    kept,
                } => {
                    let response = ready!(future.poll(cx)).map_err(Error::inner)?;
                    let retry = config
                        .cache
                        .after_response(*sent, Verdict::of(&response))
                        .and_then(|lookup| kept.take()?.retry(lookup, config));
                    match retry {
                        Some(retry) => retry,
                        None => {
                            // The copy goes now, not when the caller drops this future (a
                            // recorded body stops recording); dropped in place, not moved.
                            *kept = None;
                            return Poll::Ready(Ok(response));
                        }
                    }
                }
                StateProj::Refresh { wait, unsent } => {
                    let credential = ready!(Pin::new(wait).poll(cx))?;
                    let unsent = unsent.take().expect("polled after completion");
                    unsent.send_again(credential)
                }
                StateProj::Retrying {
                    future,
                    sent,
                    config,
                } => {
                    let response = ready!(future.as_mut().poll(cx)).map_err(Error::inner)?;
                    // Only heard: the retry's answer goes to the caller, whatever it is.
                    config.cache.after_response(*sent, Verdict::of(&response));
                    return Poll::Ready(Ok(response));
                }
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(error.take().expect("polled after completion")));
                }
            };
            state.set(next);
        }
    }
}

impl<S, B> State<S, B>
where
    S: Service<Request<B>>,
{
    /// The state of a request sent with the token `sent`: `future` is `inner`'s call, and
    /// `copy`, if any, is kept with `inner` for a retry after a 401.
    #[inline]
    fn called(
        future: S::Future,
        sent: Sent,
        config: Arc<Config>,
        inner: S,
        copy: Option<RequestCopy<B>>,
    ) -> Self {
        let kept = copy.map(|copy| Kept { inner, copy });
        State::Called {
            future,
            sent,
            config,
            kept,
        }
    }
}

impl<S, B> Unsent<S, B>
where
    S: Service<Request<B>>,
{
    /// Sends the request, which is ready to go but for the token, to the service that was
    /// polled ready for it.
    fn send(self, credential: Credential) -> State<S, B> {
        let Self {
            mut inner,
            mut request,
            config,
            copy,
        } = self;
        let sent = authorize(&mut request, credential);
        let future = inner.call(request);
        State::called(future, sent, config, inner, copy)
    }

    /// Sends the request again, to the service once it is ready.
    fn send_again(self, credential: Credential) -> State<S, B> {
        let Self {
            inner,
            mut request,
            config,
            ..
        } = self;
        config.cache.count_retry();
        let sent = authorize(&mut request, credential).as_retry();
        let future = Box::pin(Oneshot::new(inner, request));
        State::Retrying {
            future,
            sent,
            config,
        }
    }
}

impl<S, B> Kept<S, B>
where
    S: Service<Request<B>>,
{
    /// The retry after a 401, with a token from `lookup`; `None` if the copy cannot be sent,
    /// and the 401 is the answer.
    fn retry(self, lookup: Lookup, config: &Arc<Config>) -> Option<State<S, B>> {
        let mut request = self.copy.claim()?;
        // The copy is of the request as the caller sent it: through the layer once more.
        if let Err(error) = config.prepare(&mut request) {
            return Some(State::Failed { error: Some(error) });
        }
        let unsent = Unsent {
            inner: self.inner,
            request,
            config: Arc::clone(config),
            copy: None,
        };
        Some(match lookup {
            Lookup::Ready(credential) => unsent.send_again(credential),
            Lookup::Wait(wait) => State::Refresh {
                wait,
                unsent: Some(Box::new(unsent)),
            },
            Lookup::Failed(error) => State::Failed { error: Some(error) },
        })
    }
}

/// Puts the token into the request; returns which token it was.
pub(crate) fn authorize<B>(request: &mut Request<B>, credential: Credential) -> Sent {
    // `insert`, not `append`: one `Authorization`, ours, whatever the request had.
    request
        .headers_mut()
        .insert(AUTHORIZATION, credential.header);
    credential.sent
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::PassThrough { .. } => "PassThrough",
            State::FetchToken { .. } => "FetchToken",
            State::Called { .. } => "Called",
            State::Refresh { .. } => "Refresh",
            State::Retrying { .. } => "Retrying",
            State::Failed { .. } => "Failed",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
