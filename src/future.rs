//! The response future of [`BlazeAuth`](crate::BlazeAuth).

use crate::{
    error::{BoxError, Error},
    rejection::Verdict,
    token::cache::{Credential, Lookup, TokenCache, TokenWait},
};
use http::{
    Extensions, HeaderName, HeaderValue, Method, Request, Response, Uri, Version,
    header::AUTHORIZATION, request::Parts,
};
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
    state: State<S::Future, Oneshot<S, Request<B>>, Request<B>>,
    /// The service, while a call is still to be made: the first one after a token fetch,
    /// or the retry.
    inner: Option<S>,
    /// The copy to send after a 401.
    retry: Option<Retry<B>>,
    /// The cache the token came from, told when the server accepts or refuses it; `None` for
    /// a request the layer did not authenticate.
    cache: Option<Arc<TokenCache>>,
    /// Which token the request went out with.
    sent: Sent,
}

// The future is moved at least once per request, so its size is paid on every request: the
// states that only the rare paths reach (waiting for a token, the retry) box what they hold,
// which keeps the future the size of the inner service's future plus the retry copy.
#[pin_project(project = StateProj)]
enum State<F, R, Q> {
    /// Polls the token fetch the request waits for before its first call.
    FetchToken {
        wait: TokenWait,
        request: Option<Box<Q>>,
    },
    /// Polls the inner service's response to the first call.
    Call {
        #[pin]
        future: F,
    },
    /// Polls the token fetch after a 401, for the retry.
    Refresh { wait: TokenWait },
    /// Polls the retry: the inner service's readiness, then its response.
    Retry { future: Pin<Box<R>> },
    /// Holds an error found before any call was made.
    Failed { error: Option<Error> },
}

/// Which cached token a request went out with.
#[derive(Clone, Copy, Default)]
struct Sent {
    id: u64,
    /// Fetched after a 401 and not accepted by the server yet: the storm guard watches it.
    on_probation: bool,
}

/// What a retry after a 401 needs.
pub(crate) struct Retry<B> {
    pub(crate) copy: RequestCopy<B>,
    /// Whether the copy can still be sent ([`Replay::can_replay`](crate::Replay::can_replay)).
    pub(crate) can_replay: fn(&B) -> bool,
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
        let (state, inner, sent) = match cache.get() {
            Lookup::Ready(credential) => {
                let sent = authorize(&mut request, credential);
                let future = inner.call(request);
                // Keep the service only if it may be needed for a retry.
                (
                    State::Call { future },
                    retry.is_some().then_some(inner),
                    sent,
                )
            }
            Lookup::Wait(wait) => {
                let request = Some(Box::new(request));
                (
                    State::FetchToken { wait, request },
                    Some(inner),
                    Sent::default(),
                )
            }
            Lookup::Failed(error) => return Self::failed(error),
        };
        Self {
            state,
            inner,
            retry,
            cache: Some(Arc::clone(cache)),
            sent,
        }
    }

    /// The inner service's response to a request the layer does not authenticate.
    pub(crate) fn untouched(future: S::Future) -> Self {
        Self::with_state(State::Call { future })
    }

    pub(crate) fn failed(error: Error) -> Self {
        Self::with_state(State::Failed { error: Some(error) })
    }

    fn with_state(state: State<S::Future, Oneshot<S, Request<B>>, Request<B>>) -> Self {
        Self {
            state,
            inner: None,
            retry: None,
            cache: None,
            sent: Sent::default(),
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
                StateProj::FetchToken { wait, request } => {
                    let credential = ready!(Pin::new(wait).poll(cx))?;
                    let mut request = *request.take().expect("polled after completion");
                    *this.sent = authorize(&mut request, credential);
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
                    let Some(cache) = this.cache.as_ref() else {
                        return Poll::Ready(Ok(response));
                    };
                    if Verdict::of(&response) != Verdict::Refused {
                        accepted(cache, *this.sent);
                        // No retry: let the copy go now, not when the caller drops this
                        // future (a recorded body stops recording).
                        *this.retry = None;
                        return Poll::Ready(Ok(response));
                    }
                    // Told even when there will be no retry, so that the next request does
                    // not meet the refused token too. `None` is the storm guard's no: a new
                    // token will not help.
                    let lookup = cache.reject(this.sent.id);
                    // Without a copy that can still be sent, the 401 is the answer; the new
                    // token, if one is on its way, is for the requests that follow.
                    let replayable = this
                        .retry
                        .as_ref()
                        .is_some_and(|retry| (retry.can_replay)(retry.copy.body()));
                    match lookup {
                        Some(Lookup::Ready(credential)) if replayable => {
                            let future =
                                retry(this.inner, this.retry, this.sent, cache, credential);
                            this.state.set(State::Retry { future });
                        }
                        Some(Lookup::Wait(wait)) if replayable => {
                            this.state.set(State::Refresh { wait })
                        }
                        Some(Lookup::Failed(error)) if replayable => {
                            return Poll::Ready(Err(error));
                        }
                        _ => {
                            *this.retry = None;
                            return Poll::Ready(Ok(response));
                        }
                    }
                }
                StateProj::Refresh { wait } => {
                    let credential = ready!(Pin::new(wait).poll(cx))?;
                    let cache = this.cache.as_ref().expect("a refresh has a cache");
                    let future = retry(this.inner, this.retry, this.sent, cache, credential);
                    this.state.set(State::Retry { future });
                }
                StateProj::Retry { future } => {
                    let response = ready!(future.as_mut().poll(cx)).map_err(Error::inner)?;
                    if let Some(cache) = this.cache.as_ref() {
                        if Verdict::of(&response) != Verdict::Refused {
                            accepted(cache, *this.sent);
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

/// Puts the token into the request; returns which token it was.
fn authorize<B>(request: &mut Request<B>, credential: Credential) -> Sent {
    // `insert`, not `append`: one `Authorization`, ours, whatever the request had.
    request
        .headers_mut()
        .insert(AUTHORIZATION, credential.header);
    Sent {
        id: credential.id,
        on_probation: credential.on_probation,
    }
}

/// The server accepted the token `sent` carried: a token on probation is off it.
fn accepted(cache: &TokenCache, sent: Sent) {
    if sent.on_probation {
        cache.accept(sent.id);
    }
}

/// The retry: the copy, with the new token, to the service once it is ready again.
fn retry<S, B>(
    inner: &mut Option<S>,
    retry: &mut Option<Retry<B>>,
    sent: &mut Sent,
    cache: &TokenCache,
    credential: Credential,
) -> Pin<Box<Oneshot<S, Request<B>>>>
where
    S: Service<Request<B>>,
{
    cache.count_retry();
    let mut request = retry
        .take()
        .expect("retry without a copy")
        .copy
        .into_request();
    *sent = authorize(&mut request, credential);
    Box::pin(Oneshot::new(
        inner.take().expect("retry without a service"),
        request,
    ))
}

/// A request kept for the retry after a 401: its head as it is sent, less the token, and a
/// body for a second sending.
///
/// Every request that may be retried pays for this copy, and most are never retried. So the
/// headers are kept as a list, one allocation (none for a request without headers), and put
/// back into a header map only for a retry: cloning the `HeaderMap` would cost two, its
/// entries and its hash index.
pub(crate) struct RequestCopy<B> {
    method: Method,
    uri: Uri,
    version: Version,
    headers: Vec<(HeaderName, HeaderValue)>,
    extensions: Extensions,
    body: B,
}

impl<B> RequestCopy<B> {
    pub(crate) fn new(parts: &Parts, body: B) -> Self {
        let mut headers = Vec::with_capacity(parts.headers.len());
        headers.extend(
            parts
                .headers
                .iter()
                .map(|(name, value)| (name.clone(), value.clone())),
        );
        Self {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers,
            extensions: parts.extensions.clone(),
            body,
        }
    }

    fn body(&self) -> &B {
        &self.body
    }

    fn into_request(self) -> Request<B> {
        let mut request = Request::new(self.body);
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.version_mut() = self.version;
        *request.extensions_mut() = self.extensions;
        let headers = request.headers_mut();
        headers.reserve(self.headers.len());
        // In the order `iter` gave them: each name's values in their order, so `append`
        // rebuilds the same map.
        for (name, value) in self.headers {
            headers.append(name, value);
        }
        request
    }
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
