//! Token sources and inner services for the unit tests.

use crate::{AccessToken, BoxError, TokenFuture, TokenSource};
use http::{Request, Response, StatusCode, header::AUTHORIZATION};
use std::{
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};
use tokio::sync::Semaphore;
use tower::{service_fn, util::BoxCloneSyncService};

/// Issues `token-1`, `token-2`, ... and counts its fetches.
#[derive(Clone)]
pub(crate) struct TestSource {
    state: Arc<SourceState>,
}

struct SourceState {
    fetches: AtomicUsize,
    lifetime: Option<Duration>,
    /// When set, every fetch waits for a permit.
    gate: Option<Semaphore>,
    failing: AtomicBool,
    rejected: Mutex<Vec<String>>,
}

impl TestSource {
    /// Tokens that never expire.
    pub(crate) fn new() -> Self {
        Self::build(None, false)
    }

    /// Tokens that expire `lifetime` after they are issued.
    pub(crate) fn expiring(lifetime: Duration) -> Self {
        Self::build(Some(lifetime), false)
    }

    /// Fetches wait until [`open`](Self::open) is called.
    pub(crate) fn gated() -> Self {
        Self::build(None, true)
    }

    fn build(lifetime: Option<Duration>, gated: bool) -> Self {
        Self {
            state: Arc::new(SourceState {
                fetches: AtomicUsize::new(0),
                lifetime,
                gate: gated.then(|| Semaphore::new(0)),
                failing: AtomicBool::new(false),
                rejected: Mutex::default(),
            }),
        }
    }

    /// Lets every waiting and future fetch through.
    pub(crate) fn open(&self) {
        let gate = self.state.gate.as_ref().expect("source is not gated");
        gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }

    pub(crate) fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    pub(crate) fn fetches(&self) -> usize {
        self.state.fetches.load(Ordering::SeqCst)
    }

    /// The secrets of the tokens fetches were told were rejected.
    pub(crate) fn rejected(&self) -> Vec<String> {
        self.state.rejected.lock().unwrap().clone()
    }
}

impl TokenSource for TestSource {
    fn fetch(&self, rejected: Option<&AccessToken>) -> TokenFuture {
        if let Some(rejected) = rejected {
            let secret = rejected.secret().to_owned();
            self.state.rejected.lock().unwrap().push(secret);
        }
        let state = Arc::clone(&self.state);
        TokenFuture::new(async move {
            if let Some(gate) = &state.gate {
                gate.acquire().await.expect("gate closed").forget();
            }
            let n = state.fetches.fetch_add(1, Ordering::SeqCst) + 1;
            if state.failing.load(Ordering::SeqCst) {
                return Err(BoxError::from(format!("fetch {n} failed")));
            }
            let token = AccessToken::bearer(&format!("token-{n}"))?;
            Ok(match state.lifetime {
                Some(lifetime) => token.with_expires_in(lifetime),
                None => token,
            })
        })
    }
}

/// An inner service that answers with `status(token)`, `token` being the secret the request
/// was sent with, and counts its calls.
/// An inner service for the tests, boxed so that tests can name its type.
pub(crate) type TestService<B> = BoxCloneSyncService<Request<B>, Response<String>, Infallible>;

pub(crate) fn inner<B, F>(status: F) -> (TestService<B>, Arc<AtomicUsize>)
where
    B: Send + 'static,
    F: Fn(&str) -> StatusCode + Clone + Send + Sync + 'static,
{
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let service = service_fn(move |request: Request<B>| {
        counter.fetch_add(1, Ordering::SeqCst);
        let token = sent_token(&request);
        let status = status(&token);
        async move {
            let mut response = Response::new(token);
            *response.status_mut() = status;
            Ok(response)
        }
    });
    (BoxCloneSyncService::new(service), calls)
}

/// The secret of the bearer token a request carries, or `""`.
pub(crate) fn sent_token<B>(request: &Request<B>) -> String {
    request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned()
}

/// 401 for `token-1`, 200 for any other token.
pub(crate) fn reject_first_token(token: &str) -> StatusCode {
    if token == "token-1" {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    }
}

/// A `GET /Patient` with an empty body.
pub(crate) fn get() -> Request<String> {
    Request::get("/Patient").body(String::new()).unwrap()
}
