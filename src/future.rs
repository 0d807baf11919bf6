//! The response future of [`BlazeAuth`](crate::BlazeAuth).

use crate::{
    error::{BoxError, Error},
    rejection::Verdict,
    token::cache::{Credential, Lookup, TokenCache, TokenWait},
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
#[pin_project]
pub struct ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    #[pin]
    state: State<S::Future, Oneshot<S, Request<B>>>,
    /// The service, while a call is still to be made: the first one after a token fetch,
    /// or the retry.
    inner: Option<S>,
    /// The request, while it waits for its first token.
    request: Option<Request<B>>,
    /// The copy to send after a 401.
    retry: Option<Retry<B>>,
    /// The cache the token came from, told when the server refuses it; `None` for a request
    /// the layer did not authenticate.
    cache: Option<Arc<TokenCache>>,
    /// Which cached token the request was sent with.
    sent_with: u64,
    /// Whether that token is on probation (fetched after a 401 and not accepted yet).
    on_probation: bool,
}

/// What a retry after a 401 needs.
pub(crate) struct Retry<B> {
    pub(crate) copy: Request<B>,
    /// Whether the copy can still be sent ([`Replay::can_replay`](crate::Replay::can_replay)).
    pub(crate) can_replay: fn(&B) -> bool,
}

#[pin_project(project = StateProj)]
enum State<F, R> {
    /// Polls the token fetch the request waits for before its first call.
    FetchToken { wait: TokenWait },
    /// Polls the inner service's response to the first call.
    Call {
        #[pin]
        future: F,
    },
    /// Polls the token fetch after a 401, for the retry.
    Refresh { wait: TokenWait },
    /// Polls the retry: the inner service's readiness, then its response.
    Retry {
        #[pin]
        future: R,
    },
    /// Holds an error found before any call was made.
    Failed { error: Option<Error> },
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    /// Sends `request` with the cached token, or waits for one first.
    pub(crate) fn new(
        mut inner: S,
        mut request: Request<B>,
        retry: Option<Retry<B>>,
        cache: &Arc<TokenCache>,
    ) -> Self {
        match cache.get() {
            Lookup::Ready(credential) => {
                let on_probation = credential.on_probation;
                let sent_with = authorize(&mut request, credential);
                let future = inner.call(request);
                Self {
                    state: State::Call { future },
                    inner: retry.is_some().then_some(inner),
                    request: None,
                    retry,
                    cache: Some(Arc::clone(cache)),
                    sent_with,
                    on_probation,
                }
            }
            Lookup::Wait(wait) => Self {
                state: State::FetchToken { wait },
                inner: Some(inner),
                request: Some(request),
                retry,
                cache: Some(Arc::clone(cache)),
                sent_with: 0,
                on_probation: false,
            },
            Lookup::Failed(error) => Self::failed(error),
        }
    }

    /// The inner service's response to a request the layer does not authenticate.
    pub(crate) fn untouched(future: S::Future) -> Self {
        Self {
            state: State::Call { future },
            inner: None,
            request: None,
            retry: None,
            cache: None,
            sent_with: 0,
            on_probation: false,
        }
    }

    pub(crate) fn failed(error: Error) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
            inner: None,
            request: None,
            retry: None,
            cache: None,
            sent_with: 0,
            on_probation: false,
        }
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<ResBody>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::FetchToken { wait } => {
                    let credential = ready!(Pin::new(wait).poll(cx))?;
                    let mut request = this.request.take().expect("polled after completion");
                    *this.on_probation = credential.on_probation;
                    *this.sent_with = authorize(&mut request, credential);
                    // Keep the service only if it may be needed for a retry.
                    let future = if this.retry.is_some() {
                        this.inner
                            .as_mut()
                            .expect("polled after completion")
                            .call(request)
                    } else {
                        this.inner
                            .take()
                            .expect("polled after completion")
                            .call(request)
                    };
                    this.state.set(State::Call { future });
                }
                StateProj::Call { future } => {
                    let response = ready!(future.poll(cx)).map_err(Error::inner)?;
                    if Verdict::of(&response) != Verdict::Refused {
                        if let (true, Some(cache)) = (*this.on_probation, this.cache.as_ref()) {
                            cache.accept(*this.sent_with);
                        }
                        // No retry: let the copy go now, not when the caller drops this
                        // future (a recorded body stops recording).
                        *this.retry = None;
                        return Poll::Ready(Ok(response));
                    }
                    let Some(cache) = this.cache.as_ref() else {
                        return Poll::Ready(Ok(response));
                    };
                    // Told even when there will be no retry, so that the next request does
                    // not meet the refused token too. `None` is the storm guard's no: a new
                    // token will not help, the 401 is the answer.
                    let Some(lookup) = cache.reject(*this.sent_with) else {
                        *this.retry = None;
                        return Poll::Ready(Ok(response));
                    };
                    // Without a copy that can still be sent, the 401 is the answer; the new
                    // token, if one is on its way, is for the requests that follow.
                    let replayable = this
                        .retry
                        .as_ref()
                        .is_some_and(|retry| (retry.can_replay)(retry.copy.body()));
                    if !replayable {
                        *this.retry = None;
                        return Poll::Ready(Ok(response));
                    }
                    match lookup {
                        Lookup::Ready(credential) => {
                            cache.count_retry();
                            *this.on_probation = credential.on_probation;
                            *this.sent_with = credential.id;
                            let future = retry(this.inner, this.retry, credential);
                            this.state.set(State::Retry { future });
                        }
                        Lookup::Wait(wait) => this.state.set(State::Refresh { wait }),
                        Lookup::Failed(error) => return Poll::Ready(Err(error)),
                    }
                }
                StateProj::Refresh { wait } => {
                    let credential = ready!(Pin::new(wait).poll(cx))?;
                    if let Some(cache) = this.cache.as_ref() {
                        cache.count_retry();
                    }
                    *this.on_probation = credential.on_probation;
                    *this.sent_with = credential.id;
                    let future = retry(this.inner, this.retry, credential);
                    this.state.set(State::Retry { future });
                }
                StateProj::Retry { future } => {
                    let response = ready!(future.poll(cx)).map_err(Error::inner)?;
                    if Verdict::of(&response) != Verdict::Refused {
                        if let (true, Some(cache)) = (*this.on_probation, this.cache.as_ref()) {
                            cache.accept(*this.sent_with);
                        }
                    }
                    return Poll::Ready(Ok(response));
                }
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(error.take().expect("polled after completion")));
                }
            }
        }
    }
}

/// Puts the token into the request; returns the id of the cached token it came from.
fn authorize<B>(request: &mut Request<B>, credential: Credential) -> u64 {
    // `insert`, not `append`: one `Authorization`, ours, whatever the request had.
    request
        .headers_mut()
        .insert(AUTHORIZATION, credential.header);
    credential.id
}

/// The retry: the copy, with the new token, to the service once it is ready again.
fn retry<S, B>(
    inner: &mut Option<S>,
    retry: &mut Option<Retry<B>>,
    credential: Credential,
) -> Oneshot<S, Request<B>>
where
    S: Service<Request<B>>,
{
    let Retry { mut copy, .. } = retry.take().expect("retry without a copy");
    authorize(&mut copy, credential);
    Oneshot::new(inner.take().expect("retry without a service"), copy)
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::FetchToken { .. } => "FetchToken",
            State::Call { .. } => "Call",
            State::Refresh { .. } => "Refresh",
            State::Retry { .. } => "Retry",
            State::Failed { .. } => "Failed",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("retry", &self.retry.is_some())
            .finish()
    }
}
