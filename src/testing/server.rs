//! Accepting connections, serving them with hyper, routing requests, and shutting down.

use super::{API_PATH, Shared, TOKEN_PATH, fhir, lock, token};
use bytes::Bytes;
use http::{
    HeaderValue, Request, Response, StatusCode,
    header::{CONTENT_TYPE, RETRY_AFTER},
};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use std::{
    fmt,
    future::poll_fn,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    task::{JoinHandle, JoinSet},
};

/// What a handler gives back: a response, or [`ResetConnection`] to answer nothing at all.
pub(super) type Reply = Result<Response<Full<Bytes>>, ResetConnection>;

/// The running server. Dropping it closes the port and aborts every connection.
pub(super) struct Server {
    state: Arc<Mutex<ServerState>>,
    accept_task: JoinHandle<()>,
}

/// Shared by the accept task and [`Server`]'s `Drop`, which must close the listener itself:
/// an aborted task is only dropped when the runtime next gets to it, and until then the port
/// would still take connections.
struct ServerState {
    /// `None` once the server is shut down.
    listener: Option<TcpListener>,
    /// One task per connection.
    connections: JoinSet<()>,
}

impl Server {
    pub(super) fn spawn(listener: TcpListener, shared: Arc<Shared>) -> Self {
        let state = Arc::new(Mutex::new(ServerState {
            listener: Some(listener),
            connections: JoinSet::new(),
        }));
        let accept_task = tokio::spawn(accept_connections(Arc::clone(&state), shared));
        Self { state, accept_task }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        state.listener = None;
        state.connections.abort_all();
        drop(state);
        self.accept_task.abort();
    }
}

/// Accepts connections until the listener is gone, each served in a task of its own.
async fn accept_connections(state: Arc<Mutex<ServerState>>, shared: Arc<Shared>) {
    // The lock is taken inside `poll` and never held across an await.
    poll_fn(|cx| {
        let mut state = lock(&state);
        let ServerState {
            listener,
            connections,
        } = &mut *state;
        let Some(listener) = listener else {
            return Poll::Ready(());
        };
        // Finished connections leave their results behind until reaped.
        while connections.try_join_next().is_some() {}
        // An error is a connection that died in the backlog, or no file descriptors left:
        // neither stops the server. Yield either way, so that a lasting error cannot starve
        // the runtime.
        if let Ok((stream, _)) = ready!(listener.poll_accept(cx)) {
            connections.spawn(serve_connection(stream, Arc::clone(&shared)));
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let stream = ResettableStream {
        stream,
        reset: Arc::new(AtomicBool::new(false)),
    };
    let reset = Arc::clone(&stream.reset);
    let service = service_fn(move |request| {
        let shared = Arc::clone(&shared);
        let reset = Arc::clone(&reset);
        async move {
            let reply = route(request, &shared).await;
            if reply.is_err() {
                reset.store(true, Ordering::Relaxed);
            }
            reply
        }
    });
    // hyper drops the connection without a response when the service fails, which is how a
    // reset is asked for; any other error is a client that went away. Nothing to report.
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn route(request: Request<Incoming>, shared: &Shared) -> Reply {
    let path = request.uri().path();
    if path == TOKEN_PATH {
        token::handle(request, shared).await
    } else if path
        .strip_prefix(API_PATH)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    {
        fhir::handle(&request, shared)
    } else {
        Ok(response(
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found"),
        ))
    }
}

/// A response with a body and its content type.
pub(super) fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Adds `Retry-After: <seconds>` to `response`, `retry_after` rounded up to whole seconds.
pub(super) fn with_retry_after(
    mut response: Response<Full<Bytes>>,
    retry_after: Duration,
) -> Response<Full<Bytes>> {
    let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    response.headers_mut().insert(RETRY_AFTER, seconds.into());
    response
}

/// A response with `value` as its JSON body.
pub(super) fn json_response(
    status: StatusCode,
    content_type: &'static str,
    value: &impl serde::Serialize,
) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).expect("the stand-in's types serialize to JSON");
    response(status, content_type, body)
}

/// The error a handler returns to have the connection reset without a response.
#[derive(Debug)]
pub(super) struct ResetConnection;

impl fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection reset on purpose")
    }
}

impl std::error::Error for ResetConnection {}

/// A TCP stream that, once `reset` is set, is closed with a RST instead of a FIN.
struct ResettableStream {
    stream: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Drop for ResettableStream {
    fn drop(&mut self) {
        if self.reset.load(Ordering::Relaxed) {
            // A zero linger makes close send RST. Tokio deprecates `set_linger` because a
            // non-zero linger blocks the thread on close; a zero one does not, and
            // `set_zero_linger` needs a newer Tokio than this crate requires. If it fails the
            // connection closes with a FIN instead, which still answers nothing.
            #[allow(deprecated)]
            let _ = self.stream.set_linger(Some(Duration::ZERO));
        }
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
