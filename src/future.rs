//! The response future of [`BlazeAuth`](crate::BlazeAuth).

use crate::{
    error::{BoxError, Error},
    token::cache::{Credential, Lookup, TokenCache, TokenWait},
};
use http::{
    Extensions, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
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
    /// The copy to send after a 401, and the cache to get its new token from.
    retry: Option<(RequestCopy<B>, Arc<TokenCache>)>,
    /// Which cached token the request was sent with.
    sent_with: u64,
}

// The request waiting for its first token lives in `FetchToken`, not in a field of the
// future: the future is moved at least once per request, and this keeps it a request smaller.
#[pin_project(project = StateProj)]
enum State<F, R, Q> {
    /// Polls the token fetch the request waits for before its first call.
    FetchToken { wait: TokenWait, request: Option<Q> },
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
        copy: Option<RequestCopy<B>>,
        cache: &Arc<TokenCache>,
    ) -> Self {
        let retry = copy.map(|copy| (copy, Arc::clone(cache)));
        match cache.get() {
            Lookup::Ready(credential) => {
                let sent_with = authorize(&mut request, credential);
                let future = inner.call(request);
                Self {
                    state: State::Call { future },
                    inner: retry.is_some().then_some(inner),
                    retry,
                    sent_with,
                }
            }
            Lookup::Wait(wait) => Self {
                state: State::FetchToken {
                    wait,
                    request: Some(request),
                },
                inner: Some(inner),
                retry,
                sent_with: 0,
            },
            Lookup::Failed(error) => Self::failed(error),
        }
    }

    pub(crate) fn failed(error: Error) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
            inner: None,
            retry: None,
            sent_with: 0,
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
                    let mut request = request.take().expect("polled after completion");
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
                    if response.status() != StatusCode::UNAUTHORIZED {
                        return Poll::Ready(Ok(response));
                    }
                    // Without a copy there is nothing to retry: the 401 is the answer.
                    let Some((_, cache)) = this.retry.as_ref() else {
                        return Poll::Ready(Ok(response));
                    };
                    match cache.reject(*this.sent_with) {
                        Lookup::Ready(credential) => {
                            let future = retry(this.inner, this.retry, credential);
                            this.state.set(State::Retry { future });
                        }
                        Lookup::Wait(wait) => this.state.set(State::Refresh { wait }),
                        Lookup::Failed(error) => return Poll::Ready(Err(error)),
                    }
                }
                StateProj::Refresh { wait } => {
                    let credential = ready!(Pin::new(wait).poll(cx))?;
                    let future = retry(this.inner, this.retry, credential);
                    this.state.set(State::Retry { future });
                }
                StateProj::Retry { future } => return future.poll(cx).map_err(Error::inner),
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
    retry: &mut Option<(RequestCopy<B>, Arc<TokenCache>)>,
    credential: Credential,
) -> Oneshot<S, Request<B>>
where
    S: Service<Request<B>>,
{
    let (copy, _) = retry.take().expect("retry without a copy");
    let mut request = copy.into_request();
    authorize(&mut request, credential);
    Oneshot::new(inner.take().expect("retry without a service"), request)
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
