//! Retrying transient API errors: tower's `Retry` with a policy for GETs, outside the layer.
//!
//! ```text
//! ServiceBuilder::new()
//!     .layer(RetryLayer::new(TransientErrors::default()))  // outside: 429, 502, 503, 504
//!     .layer(blaze_auth_layer)                              // inside: token, study, 401
//!     .service(http_client)
//! ```
//!
//! Why `Retry` goes outside `BlazeAuthLayer`, not inside:
//! - Each attempt passes through the layer again, so it carries the token that is good at
//!   that moment. A `Retry-After` can outlast a token (or its refresh margin); a retry inside
//!   the layer would resend the `Authorization` header the first attempt was given.
//! - Each attempt gets the layer's own 401 handling: refresh the token, send once more. That
//!   retry stays inside the layer, bounded to one, and this policy never sees a 401.
//! - The policy copies the request before the layer adds credentials, so no copy of a token
//!   waits in a retry queue, and the layer adds them afresh to each attempt.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header::RETRY_AFTER};
use http_body_util::Full;
use std::time::{Duration, SystemTime};
use tower::retry::Policy;

/// Retries a GET answered 429, 502, 503 or 504, a bounded number of times, waiting as long as
/// `Retry-After` asks or, without one, an exponential backoff with jitter. Other requests,
/// other statuses (a 4xx other than 429 is never fixed by asking again; 401 is the layer's)
/// and transport errors go back to the caller as they are.
#[derive(Clone, Debug)]
pub(crate) struct TransientErrors {
    /// Retries left for this request.
    retries_left: u32,
    /// The wait before the next retry when the server names none.
    backoff: Duration,
    /// The longest `Retry-After` honoured; a server asking for more gets its error returned.
    max_retry_after: Duration,
}

impl Default for TransientErrors {
    /// 4 retries, backoff from 0.5 s doubling to 4 s (at most 7.5 s in all), `Retry-After`
    /// up to 60 s.
    fn default() -> Self {
        Self {
            retries_left: 4,
            backoff: Duration::from_millis(500),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl<B, E> Policy<Request<Full<Bytes>>, Response<B>, E> for TransientErrors {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        request: &mut Request<Full<Bytes>>,
        result: &mut Result<Response<B>, E>,
    ) -> Option<Self::Future> {
        let response = result.as_ref().ok()?;
        if request.method() != Method::GET
            || !is_transient(response.status())
            || self.retries_left == 0
        {
            return None;
        }
        let wait = match retry_after(response.headers(), SystemTime::now()) {
            Some(asked) if asked > self.max_retry_after => return None,
            Some(asked) => asked,
            // Half fixed, half random: clients that failed together do not return together.
            None => self.backoff.mul_f64(0.5 + fastrand::f64() / 2.0),
        };
        self.retries_left -= 1;
        self.backoff *= 2;
        Some(tokio::time::sleep(wait))
    }

    fn clone_request(&mut self, request: &Request<Full<Bytes>>) -> Option<Request<Full<Bytes>>> {
        // Only a GET is safe to send twice; `Full<Bytes>` clones by reference count.
        (request.method() == Method::GET).then(|| request.clone())
    }
}

/// The statuses that say "try again later": throttling and a gateway's upstream trouble.
fn is_transient(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
    )
}

/// How long `Retry-After` asks to wait from `now`: delay-seconds or an HTTP-date (RFC 9110
/// section 10.2.3). A date in the past means no wait; anything else unreadable means none was
/// asked for.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    match value.parse::<u64>() {
        Ok(seconds) => Some(Duration::from_secs(seconds)),
        Err(_) => {
            let date = httpdate::parse_http_date(value).ok()?;
            Some(date.duration_since(now).unwrap_or_default())
        }
    }
}
