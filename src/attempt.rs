//! A request's dealings with a layer, for clients that are not tower services
//! (reqwest-middleware's `Middleware`): "prepare this request head", "which token", "what
//! now that this response came". The tower future does the same across its states; this is
//! the async, one-call-at-a-time shape of it, over the same configuration and cache.

use crate::{
    error::Error,
    layer::Config,
    rejection::Verdict,
    token::cache::{Credential, Lookup, Sent},
};
use http::{HeaderValue, Method, Request, Uri};
use std::sync::Arc;

/// One layer's configuration and token cache, shared with the layer it came from.
#[derive(Clone, Debug)]
pub(crate) struct Authenticator {
    config: Arc<Config>,
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
    pub(crate) fn prepare(&self, head: &mut Request<()>) -> Result<(), Error> {
        self.config.prepare(head)
    }

    /// Whether a request with this method may be sent a second time.
    pub(crate) fn may_retry(&self, method: &Method) -> bool {
        self.config.may_retry(method)
    }

    /// The token for a request: the cached one, or the fetch's that replaces it.
    pub(crate) async fn token(&self) -> Result<(HeaderValue, Sent), Error> {
        resolve(self.config.cache.get()).await
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
        // Told even without a retry, so that the next request does not meet a refused token.
        match self.config.cache.after_response(sent, verdict) {
            Some(lookup) if can_retry => {
                let (token, sent) = resolve(lookup).await?;
                self.config.cache.count_retry();
                Ok(Some((token, sent.as_retry())))
            }
            _ => Ok(None),
        }
    }

    /// The response to the retry: the answer, whatever it says.
    pub(crate) fn after_retry(&self, sent: Sent, verdict: Verdict) {
        let _answer = self.config.cache.after_response(sent, verdict);
    }

    pub(crate) fn metrics(&self) -> crate::Metrics {
        self.config.cache.metrics()
    }
}

async fn resolve(lookup: Lookup) -> Result<(HeaderValue, Sent), Error> {
    let Credential { header, sent } = match lookup {
        Lookup::Ready(credential) => credential,
        Lookup::Wait(wait) => wait.await?,
        Lookup::Failed(error) => return Err(error),
    };
    Ok((header, sent))
}
