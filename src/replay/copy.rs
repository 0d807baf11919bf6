//! [`RequestCopy`]: a request kept for the retry after a 401.

use http::{Extensions, HeaderName, HeaderValue, Method, Request, Uri, Version};

/// A request as the caller sent it, kept for the retry after a 401: its head and a body for a
/// second sending, made by a [`Replay`](super::Replay).
///
/// Every request that may be retried pays for this copy, and most are never retried. So the
/// copy is of the caller's head, before the layer adds the study and its headers (the URI is
/// then the caller's, whose bytes a clone shares; the rebuilt one's would need a new reference
/// count), and the headers are kept as a list, one allocation (none for a request without
/// headers), put back into a header map only for a retry: cloning the `HeaderMap` would cost
/// two, its entries and its hash index.
pub(crate) struct RequestCopy<B> {
    method: Method,
    uri: Uri,
    version: Version,
    headers: Vec<(HeaderName, HeaderValue)>,
    extensions: Extensions,
    body: B,
    /// [`Replay::claim`](super::Replay::claim) of the replay that made `body`.
    claim: fn(&B) -> bool,
}

impl<B> RequestCopy<B> {
    /// A copy of `request`'s head, with `body`.
    // Inline, so that the copy is built where the response future keeps it, not built and
    // then moved there (the compiler did not inline it into `call` by itself).
    #[inline(always)]
    pub(crate) fn new<X>(request: &Request<X>, body: B, claim: fn(&B) -> bool) -> Self {
        let mut headers = Vec::with_capacity(request.headers().len());
        // Pushes into the room reserved: measured cheaper than `extend` with a mapped
        // iterator (44 instructions per request with one header, callgrind).
        for (name, value) in request.headers() {
            headers.push((name.clone(), value.clone()));
        }
        Self {
            method: request.method().clone(),
            uri: request.uri().clone(),
            version: request.version(),
            headers,
            extensions: request.extensions().clone(),
            body,
            claim,
        }
    }

    /// Claims the body for the retry ([`Replay::claim`](super::Replay::claim)) and gives back
    /// the request, or `None` if the body cannot be sent again.
    pub(crate) fn claim(self) -> Option<Request<B>> {
        if !(self.claim)(&self.body) {
            return None;
        }
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
        Some(request)
    }
}
