//! A request's dealings with a layer, for clients that are not tower services
//! (reqwest-middleware's `Middleware`): "prepare this request head", "which token", "what
//! now that this response came". The tower future does the same across its states; this is
//! the async, one-call-at-a-time shape of it, over the same configuration and cache.

use crate::{
    error::Error,
    layer::Config,
    rejection::Verdict,
    token::cache::{Credential, Lookup},
};
use http::{HeaderValue, Method, Uri, request::Parts};
use std::sync::Arc;

/// One layer's configuration and token cache, shared with the layer it came from.
#[derive(Clone, Debug)]
pub(crate) struct Authenticator {
    config: Arc<Config>,
}

/// Which token a request went out with.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sent {
    id: u64,
    on_probation: bool,
}

impl Authenticator {
    pub(crate) fn new(config: Arc<Config>) -> Self {
        Self { config }
    }

    /// Whether requests to `uri` get credentials (the layer's credential scope); an error for
    /// plain `http` the scope does not allow.
    pub(crate) fn authenticates(&self, uri: &Uri) -> Result<bool, Error> {
        self.config.authenticates(uri)
    }

    /// Adds the study and the fixed headers to a request head; the token comes later.
    pub(crate) fn prepare(&self, head: &mut Parts) -> Result<(), Error> {
        self.config.prepare(head)
    }

    /// Whether a request with this method may be sent a second time.
    pub(crate) fn retries(&self, method: &Method) -> bool {
        self.config.retries(method)
    }

    /// The token for a request: the cached one, or the fetch's that replaces it.
    pub(crate) async fn token(&self) -> Result<(HeaderValue, Sent), Error> {
        let credential = match self.config.cache.get() {
            Lookup::Ready(credential) => credential,
            Lookup::Wait(wait) => wait.await?,
            Lookup::Failed(error) => return Err(error),
        };
        Ok(split(credential))
    }

    /// What follows the response to a request sent with `sent`: `Some(token)` to send the
    /// copy again with, when the token was refused, a new one may help and `can_retry`;
    /// `None` when the response is the answer.
    pub(crate) async fn after_response(
        &self,
        sent: Sent,
        verdict: Verdict,
        can_retry: bool,
    ) -> Result<Option<(HeaderValue, Sent)>, Error> {
        let cache = &self.config.cache;
        if verdict != Verdict::Refused {
            self.accepted(sent);
            return Ok(None);
        }
        // Told even without a retry, so that the next request does not meet the refused
        // token; `None` is the storm guard's no.
        let credential = match cache.reject(sent.id) {
            Some(Lookup::Ready(credential)) if can_retry => credential,
            Some(Lookup::Wait(wait)) if can_retry => wait.await?,
            Some(Lookup::Failed(error)) if can_retry => return Err(error),
            _ => return Ok(None),
        };
        cache.count_retry();
        Ok(Some(split(credential)))
    }

    /// The response to the retry: the answer, whatever it says.
    pub(crate) fn after_retry(&self, sent: Sent, verdict: Verdict) {
        if verdict != Verdict::Refused {
            self.accepted(sent);
        }
    }

    pub(crate) fn metrics(&self) -> crate::Metrics {
        self.config.cache.metrics()
    }

    fn accepted(&self, sent: Sent) {
        if sent.on_probation {
            self.config.cache.accept(sent.id);
        }
    }
}

fn split(credential: Credential) -> (HeaderValue, Sent) {
    let sent = Sent {
        id: credential.id,
        on_probation: credential.on_probation,
    };
    (credential.header, sent)
}
