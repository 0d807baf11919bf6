//! [`BufferBody`]: replays a body that cannot be cloned from a bounded record of what was
//! sent.

use super::Replay;
use crate::error::BoxError;
use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;
use std::{
    error::Error as StdError,
    fmt,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::{Context, Poll, Waker, ready},
};

/// The cap of [`BufferBody::default`]: 64 KiB.
const DEFAULT_REPLAY_CAP: usize = 64 * 1024;

/// Replays bodies that cannot be cloned (hyper's `Incoming`, tonic's request bodies) from a
/// record of what was sent, up to a cap. See the [module docs](crate::replay).
///
/// The first request streams its body to the inner service as it is read, and a copy of what
/// is read is kept, up to `cap` bytes of data and trailers (trailers counted by the lengths of
/// their names and values). When a 401 arrives, the retry sends the record, then whatever of
/// the body the first request had not read yet, then the trailers. So a 401 that arrives
/// before the whole body was sent is retried too: the retry takes the body over, and the
/// first request's body ends there with an error (its answer is in, nothing more is sent on
/// it).
///
/// A body longer than `cap` is not replayed: one whose size hint says so is not recorded at
/// all, one that turns out longer drops its record as it passes the cap. A 401 to such a
/// request goes back to the caller as it came. An empty body is replayed without recording.
///
/// The record is a copy, not a reference to the inner body's buffers (which may hold much
/// more memory alive than the bytes they hand out), so a request in flight holds at most
/// `cap` bytes for its retry, however its body is framed. The record is dropped as soon as
/// the retry can no longer happen.
#[derive(Clone, Copy, Debug)]
pub struct BufferBody {
    cap: usize,
}

impl BufferBody {
    /// Records up to `cap` bytes of each request body for the retry.
    pub const fn new(cap: usize) -> Self {
        Self { cap }
    }

    /// The most a record may hold.
    pub const fn cap(&self) -> usize {
        self.cap
    }
}

impl Default for BufferBody {
    /// Records up to 64 KiB.
    fn default() -> Self {
        Self::new(DEFAULT_REPLAY_CAP)
    }
}

impl<B> Replay<B> for BufferBody
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Body = ReplayBody<B>;

    fn once(&self, body: B) -> ReplayBody<B> {
        ReplayBody::new(Kind::Once { body })
    }

    fn replayable(&self, body: B) -> (ReplayBody<B>, Option<ReplayBody<B>>) {
        if body.is_end_stream() {
            return (self.once(body), Some(ReplayBody::new(Kind::Empty)));
        }
        let lower = body.size_hint().lower();
        if lower > u64::try_from(self.cap).unwrap_or(u64::MAX) {
            return (self.once(body), None);
        }
        let state = Arc::new(Mutex::new(State {
            body: Some(Box::pin(body)),
            // Room for the whole body when its length is known, in one allocation; but not
            // more than 64 KiB on a length the body only claims.
            data: BytesMut::with_capacity(
                usize::try_from(lower)
                    .unwrap_or(usize::MAX)
                    .min(DEFAULT_REPLAY_CAP),
            ),
            trailers: None,
            room: self.cap,
            replayable: true,
            claimed: false,
            cut_off: false,
            first_waker: None,
        }));
        let retry = ReplayBody::handle(Arc::clone(&state), Role::Retry);
        (ReplayBody::handle(state, Role::First), Some(retry))
    }

    /// Whether the record holds all that the first request read; if so, the retry takes
    /// the body over from here (see [`BufferBody`]).
    fn claim(copy: &ReplayBody<B>) -> bool {
        match &copy.kind {
            Kind::Empty => true,
            Kind::Once { .. } => false,
            Kind::Shared { handle } => handle.claim(),
        }
    }
}

/// The request body [`BufferBody`] gives the inner service: the caller's body as it is
/// read, or its replay.
///
/// Its data is [`Bytes`], and its error a [`BoxError`]: the caller's body's own error, or
/// this body's when it cannot go on (a replay whose record was dropped, or the first
/// request's body after the retry took it over). hyper and tonic take both as they are; for
/// tonic's `Channel`, wrap it with `tonic::body::Body::new`.
#[pin_project]
pub struct ReplayBody<B> {
    #[pin]
    kind: Kind<B>,
}

#[pin_project(project = KindProj)]
enum Kind<B> {
    /// A body sent only once, passed through.
    Once {
        #[pin]
        body: B,
    },
    /// The replay of an empty body.
    Empty,
    /// The first request's body or the retry's, sharing one record.
    Shared { handle: Handle<B> },
}

/// One of the two bodies of a recorded request.
struct Handle<B> {
    state: Arc<Mutex<State<B>>>,
    role: Role,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Streams the caller's body to the first request and records it.
    First,
    /// Replays the record, then streams the rest.
    Retry,
}

/// What the two bodies of a recorded request share.
struct State<B> {
    /// The caller's body, until it ends or fails. The first request reads it until the retry
    /// claims it, the retry from then on.
    body: Option<Pin<Box<B>>>,
    /// The data the first request read, until the retry takes it.
    data: BytesMut,
    /// The trailers the first request read, until the retry takes them.
    trailers: Option<HeaderMap>,
    /// How much more the record may take.
    room: usize,
    /// Whether the record holds all that was read and the retry can still use it: false
    /// once over the cap, after the body failed, or once the retry is gone.
    replayable: bool,
    /// Whether the retry has taken the body over.
    claimed: bool,
    /// Whether the first request's body was cut off when the retry took over, before it had
    /// read the whole body.
    cut_off: bool,
    /// The first request's task while it waits on the body, woken when the retry claims it.
    first_waker: Option<Waker>,
}

/// Why a [`ReplayBody`] cannot go on.
#[derive(Debug)]
enum ReplayError {
    /// The retry's record was dropped: over the cap, or the body failed.
    NotReplayable,
    /// The first request's body, after the retry took the rest over.
    TakenOver,
}

impl<B> ReplayBody<B> {
    fn new(kind: Kind<B>) -> Self {
        Self { kind }
    }

    fn handle(state: Arc<Mutex<State<B>>>, role: Role) -> Self {
        Self::new(Kind::Shared {
            handle: Handle { state, role },
        })
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Once { body } => {
                let frame = ready!(body.poll_frame(cx));
                Poll::Ready(frame.map(|frame| {
                    frame
                        .map(|frame| frame.map_data(into_bytes))
                        .map_err(Into::into)
                }))
            }
            KindProj::Empty => Poll::Ready(None),
            KindProj::Shared { handle } => handle.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Once { body } => body.is_end_stream(),
            Kind::Empty => true,
            Kind::Shared { handle } => handle.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Once { body } => body.size_hint(),
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Shared { handle } => handle.size_hint(),
        }
    }
}

impl<B> Handle<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    fn poll_frame(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.role == Role::Retry && !self.claim() {
            return Poll::Ready(Some(Err(ReplayError::NotReplayable.into())));
        }
        let mut state = self.lock();
        match self.role {
            Role::First => {
                if state.cut_off {
                    return Poll::Ready(Some(Err(ReplayError::TakenOver.into())));
                }
                let poll = state.poll_body(cx);
                match &poll {
                    Poll::Pending => state.park_first(cx.waker()),
                    Poll::Ready(Some(Ok(frame))) => state.record(frame),
                    Poll::Ready(Some(Err(_))) => state.give_up(),
                    Poll::Ready(None) => {}
                }
                poll
            }
            Role::Retry => {
                if !state.data.is_empty() {
                    let data = std::mem::take(&mut state.data).freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                if let Some(trailers) = state.trailers.take() {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                state.poll_body(cx)
            }
        }
    }
}

impl<B: Body> Handle<B> {
    fn is_end_stream(&self) -> bool {
        let state = self.lock();
        match self.role {
            Role::First => !state.cut_off && state.body_is_end_stream(),
            Role::Retry => {
                state.replayable
                    && state.data.is_empty()
                    && state.trailers.is_none()
                    && state.body_is_end_stream()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        let state = self.lock();
        match self.role {
            Role::First if state.cut_off => SizeHint::default(),
            Role::First => state.body_size_hint(),
            Role::Retry if !state.replayable => SizeHint::default(),
            Role::Retry => {
                let recorded = u64::try_from(state.data.len()).unwrap_or(u64::MAX);
                let rest = state.body_size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(recorded));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(recorded));
                }
                hint
            }
        }
    }
}

impl<B> Handle<B> {
    fn lock(&self) -> MutexGuard<'_, State<B>> {
        // A panic while the lock was held came from the caller's body, mid-poll: the state
        // around it is whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// For the retry: takes the body over if the record holds all that was read.
    fn claim(&self) -> bool {
        if self.role != Role::Retry {
            return false;
        }
        let mut state = self.lock();
        if state.claimed {
            return true;
        }
        if !state.replayable {
            return false;
        }
        state.claimed = true;
        state.cut_off = state.body.is_some();
        let first = state.first_waker.take();
        drop(state);
        // Wake the first request's body, if it waits on the caller's, to end it.
        if let Some(first) = first {
            first.wake();
        }
        true
    }
}

impl<B> Drop for Handle<B> {
    fn drop(&mut self) {
        // Without a retry, nothing needs recording. A dropped first body leaves the caller's
        // body here for the retry.
        if self.role == Role::Retry {
            self.lock().give_up();
        }
    }
}

impl<B> State<B> {
    /// Records a frame the first request read, or gives up if it does not fit.
    fn record(&mut self, frame: &Frame<Bytes>) {
        if !self.replayable {
            return;
        }
        // Trailers end a body: anything after them could not be replayed in order.
        let recorded = match (frame.data_ref(), frame.trailers_ref()) {
            (Some(data), _) if self.trailers.is_none() && self.take_room(data.len()) => {
                self.data.extend_from_slice(data);
                true
            }
            (_, Some(trailers)) if self.trailers.is_none() => {
                let size = trailers
                    .iter()
                    .map(|(name, value)| name.as_str().len() + value.len())
                    .fold(0, usize::saturating_add);
                let fits = self.take_room(size);
                if fits {
                    self.trailers = Some(trailers.clone());
                }
                fits
            }
            _ => false,
        };
        if !recorded {
            self.give_up();
        }
    }

    fn take_room(&mut self, size: usize) -> bool {
        match self.room.checked_sub(size) {
            Some(room) => {
                self.room = room;
                true
            }
            None => false,
        }
    }

    /// Drops the record: there will be no replay.
    fn give_up(&mut self) {
        self.replayable = false;
        self.data = BytesMut::new();
        self.trailers = None;
    }

    fn park_first(&mut self, waker: &Waker) {
        match &mut self.first_waker {
            Some(parked) if parked.will_wake(waker) => {}
            slot => *slot = Some(waker.clone()),
        }
    }
}

impl<B> State<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    /// Polls the caller's body; drops it once it has ended or failed.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(None);
        };
        let last = match ready!(body.as_mut().poll_frame(cx)) {
            Some(Ok(frame)) => return Poll::Ready(Some(Ok(frame.map_data(into_bytes)))),
            Some(Err(error)) => Some(Err(error.into())),
            None => None,
        };
        self.body = None;
        Poll::Ready(last)
    }
}

impl<B: Body> State<B> {
    fn body_is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(|body| body.is_end_stream())
    }

    fn body_size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |body| body.size_hint())
    }
}

fn into_bytes<D: Buf>(mut data: D) -> Bytes {
    data.copy_to_bytes(data.remaining())
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let role = match &self.kind {
            Kind::Once { .. } => "once",
            Kind::Empty => "empty",
            Kind::Shared { handle } if handle.role == Role::First => "first",
            Kind::Shared { .. } => "retry",
        };
        f.debug_struct("ReplayBody")
            .field("body", &std::any::type_name::<B>())
            .field("role", &role)
            .finish()
    }
}

impl fmt::Display for ReplayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotReplayable => "request body cannot be replayed",
            Self::TakenOver => "request body taken over by the retry",
        })
    }
}

impl StdError for ReplayError {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        BlazeAuthLayer,
        test_helpers::{TestSource, sent_token},
    };
    use http::{HeaderValue, Request, Response, StatusCode};
    use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::UnsyncBoxBody};
    use std::{
        convert::Infallible,
        io,
        sync::atomic::{AtomicUsize, Ordering},
    };
    use tokio::sync::mpsc;
    use tokio_test::{assert_pending, assert_ready};
    use tower::{Service, ServiceExt, service_fn};

    #[tokio::test]
    async fn a_multi_frame_body_with_trailers_is_replayed_whole() {
        let body = frames([data("ab"), data("cd"), data("ef"), trailers()]);
        let (first, copy) = BufferBody::default().replayable(body);
        let copy = copy.unwrap();
        let sent = first.collect().await.unwrap();
        assert_eq!(sent.trailers(), Some(&trailer_map()));
        assert_eq!(sent.to_bytes(), "abcdef");

        assert!(claim(&copy));
        assert_eq!(copy.size_hint().exact(), Some(6));
        let replayed = copy.collect().await.unwrap();
        assert_eq!(replayed.trailers(), Some(&trailer_map()));
        assert_eq!(replayed.to_bytes(), "abcdef");
    }

    #[tokio::test]
    async fn a_401_before_the_body_is_sent_hands_the_rest_to_the_retry() {
        let (tx, body) = channel(SizeHint::with_exact(6));
        let (mut first, copy) = BufferBody::default().replayable(body);
        let mut copy = copy.unwrap();
        tx.send(data("ab")).unwrap();
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");

        // The first request waits for more of the caller's body when its 401 arrives.
        let mut waiting = tokio_test::task::spawn(first.frame());
        assert_pending!(waiting.poll());
        assert!(claim(&copy));
        assert!(waiting.is_woken(), "the first body is woken to end");
        let error = assert_ready!(waiting.poll()).unwrap().unwrap_err();
        assert_eq!(error.to_string(), "request body taken over by the retry");
        drop(waiting);
        assert!(!first.is_end_stream());

        assert_eq!(copy.size_hint().exact(), Some(6), "2 recorded, 4 to come");
        let frame = copy.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        tx.send(data("cd")).unwrap();
        tx.send(data("ef")).unwrap();
        tx.send(trailers()).unwrap();
        drop(tx);
        let rest = copy.collect().await.unwrap();
        assert_eq!(rest.trailers(), Some(&trailer_map()));
        assert_eq!(rest.to_bytes(), "cdef");
        assert!(first.frame().await.unwrap().is_err(), "still taken over");
    }

    #[tokio::test]
    async fn a_dropped_first_body_leaves_the_rest_to_the_retry() {
        let (tx, body) = channel(SizeHint::default());
        let (mut first, copy) = BufferBody::default().replayable(body);
        tx.send(data("ab")).unwrap();
        first.frame().await.unwrap().unwrap();
        drop(first);
        let copy = copy.unwrap();
        assert!(claim(&copy));
        tx.send(data("cd")).unwrap();
        drop(tx);
        assert_eq!(copy.collect().await.unwrap().to_bytes(), "abcd");
    }

    #[tokio::test]
    async fn over_the_cap_the_copy_cannot_be_replayed() {
        let (first, copy) = BufferBody::new(4).replayable(frames([data("abc"), data("de")]));
        let mut copy = copy.unwrap();
        assert_eq!(first.collect().await.unwrap().to_bytes(), "abcde");
        assert!(!claim(&copy));
        assert!(!copy.is_end_stream());
        assert_eq!(copy.size_hint().exact(), None);
        let error = copy.frame().await.unwrap().unwrap_err();
        assert_eq!(error.to_string(), "request body cannot be replayed");

        // A body that says it is longer is not recorded at all; one of the cap's length is.
        let (first, copy) = BufferBody::new(4).replayable(full("abcde"));
        assert!(copy.is_none());
        assert_eq!(first.collect().await.unwrap().to_bytes(), "abcde");
        let (first, copy) = BufferBody::new(4).replayable(full("abcd"));
        first.collect().await.unwrap();
        let copy = copy.unwrap();
        assert!(claim(&copy));
        assert_eq!(copy.collect().await.unwrap().to_bytes(), "abcd");

        // Trailers count too: "x-checksum" and "1" are 11 bytes.
        let (first, copy) = BufferBody::new(12).replayable(frames([data("ab"), trailers()]));
        first.collect().await.unwrap();
        assert!(!claim(&copy.unwrap()));
    }

    #[tokio::test]
    async fn size_hints_and_end_of_stream_are_right_for_both_bodies() {
        let (mut first, copy) = BufferBody::default().replayable(full("hello"));
        let copy = copy.unwrap();
        for body in [&first, &copy] {
            assert_eq!(body.size_hint().exact(), Some(5));
            assert!(!body.is_end_stream());
        }
        first.frame().await.unwrap().unwrap();
        assert!(first.is_end_stream());
        assert_eq!(first.size_hint().exact(), Some(0));
        assert_eq!(copy.size_hint().exact(), Some(5));
        assert!(!copy.is_end_stream());

        // Unknown length: the copy's is known once the body has ended.
        let (tx, body) = channel(SizeHint::default());
        let (mut first, copy) = BufferBody::default().replayable(body);
        let mut copy = copy.unwrap();
        tx.send(data("ab")).unwrap();
        first.frame().await.unwrap().unwrap();
        let hint = copy.size_hint();
        assert_eq!((hint.lower(), hint.upper()), (2, None));
        drop(tx);
        assert!(first.frame().await.is_none());
        assert!(first.is_end_stream());
        assert_eq!(copy.size_hint().exact(), Some(2));
        assert!(claim(&copy));
        copy.frame().await.unwrap().unwrap();
        assert!(copy.is_end_stream());
        assert_eq!(copy.size_hint().exact(), Some(0));
        assert!(copy.frame().await.is_none());

        // An empty body: nothing to record, and its copy is empty too.
        let (first, copy) = BufferBody::default().replayable(Empty::<Bytes>::new());
        let mut copy = copy.unwrap();
        assert!(first.is_end_stream() && copy.is_end_stream());
        assert_eq!(copy.size_hint().exact(), Some(0));
        assert!(claim(&copy));
        assert!(copy.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_body_error_passes_through_and_ends_the_replay() {
        let failing = || frames([data("ab"), Err(io::Error::other("boom"))]);
        let (mut first, copy) = BufferBody::default().replayable(failing());
        assert_eq!(
            first.frame().await.unwrap().unwrap().into_data().unwrap(),
            "ab"
        );
        let error = first.frame().await.unwrap().unwrap_err();
        assert_eq!(error.downcast::<io::Error>().unwrap().to_string(), "boom");
        assert!(first.frame().await.is_none());
        assert!(!claim(&copy.unwrap()));

        let mut once = BufferBody::default().once(failing());
        once.frame().await.unwrap().unwrap();
        let error = once.frame().await.unwrap().unwrap_err();
        assert!(error.is::<io::Error>());
    }

    #[tokio::test]
    async fn a_dropped_copy_stops_the_recording() {
        let (first, copy) = BufferBody::new(4).replayable(frames([data("ab"), data("cd")]));
        drop(copy);
        let Kind::Shared { handle } = &first.kind else {
            panic!("not recorded");
        };
        let state = Arc::clone(&handle.state);
        assert_eq!(first.collect().await.unwrap().to_bytes(), "abcd");
        let state = state.lock().unwrap();
        assert!(state.data.is_empty() && !state.replayable);
    }

    #[tokio::test]
    async fn frames_after_the_trailers_are_not_replayed() {
        let (first, copy) = BufferBody::default().replayable(frames([trailers(), data("ab")]));
        let _ = first.collect().await;
        assert!(!claim(&copy.unwrap()));
    }

    #[tokio::test]
    async fn the_layer_replays_a_streaming_body_and_returns_the_401_over_the_cap() {
        for (cap, status, calls) in [(4, StatusCode::OK, 2), (3, StatusCode::UNAUTHORIZED, 1)] {
            let source = TestSource::new();
            let seen = Arc::new(AtomicUsize::new(0));
            let counter = Arc::clone(&seen);
            let service = service_fn(move |request: Request<ReplayBody<Streaming>>| {
                counter.fetch_add(1, Ordering::SeqCst);
                async move {
                    let token = sent_token(&request);
                    let body = request.into_body().collect().await?.to_bytes();
                    assert_eq!(body, "abcd");
                    let mut response = Response::new(());
                    if token == "token-1" {
                        *response.status_mut() = StatusCode::UNAUTHORIZED;
                    }
                    Ok::<_, BoxError>(response)
                }
            });
            let layer = BlazeAuthLayer::new(source.clone(), "S").replay(BufferBody::new(cap));
            let request = Request::post("/Patient")
                .body(frames([data("ab"), data("cd")]))
                .unwrap();
            let response = tower::Layer::layer(&layer, service)
                .oneshot(request)
                .await
                .unwrap();
            assert_eq!(response.status(), status, "cap {cap}");
            assert_eq!(seen.load(Ordering::SeqCst), calls, "cap {cap}");
            assert_eq!(source.fetches(), calls);
        }
    }

    #[tokio::test]
    async fn the_record_is_dropped_as_soon_as_the_answer_is_not_a_401() {
        // The inner service answers at once and keeps reading the body afterwards.
        let (bodies_tx, mut bodies) = mpsc::unbounded_channel();
        let service = service_fn(move |request: Request<ReplayBody<ChannelBody>>| {
            bodies_tx.send(request.into_body()).unwrap();
            async { Ok::<_, Infallible>(Response::new(())) }
        });
        let layer = BlazeAuthLayer::new(TestSource::new(), "S").replay(BufferBody::default());
        let (tx, body) = channel(SizeHint::default());
        let request = Request::post("/Patient").body(body).unwrap();
        let mut client = tower::Layer::layer(&layer, service);
        let future = client.ready().await.unwrap().call(request);
        let mut call = tokio_test::task::spawn(future);
        // Polled, not awaited: the caller still holds the finished future.
        let response = loop {
            if let Poll::Ready(response) = call.poll() {
                break response.unwrap();
            }
            tokio::task::yield_now().await;
        };
        assert_eq!(response.status(), StatusCode::OK);

        let mut first = bodies.recv().await.unwrap();
        tx.send(data("ab")).unwrap();
        first.frame().await.unwrap().unwrap();
        let Kind::Shared { handle } = &first.kind else {
            panic!("not recorded");
        };
        let state = handle.lock();
        assert!(!state.replayable && state.data.is_empty(), "nothing kept");
        drop(state);
        drop(call);
    }

    #[test]
    fn replay_bodies_are_send_and_sync_as_their_bodies_are() {
        fn assert_send<T: Send>() {}
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ReplayBody<Full<Bytes>>>();
        assert_send_sync::<ReplayBody<hyper::body::Incoming>>();
        // tonic's body is `Send` only.
        assert_send::<ReplayBody<UnsyncBoxBody<Bytes, BoxError>>>();
    }

    #[test]
    fn debug_names_the_role() {
        let (first, copy) = BufferBody::default().replayable(full("x"));
        let debug = format!("{first:?} {:?}", copy.unwrap());
        assert!(
            debug.contains("\"first\"") && debug.contains("\"retry\""),
            "{debug}"
        );
    }

    type Streaming = StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Chunk>>>;
    type Chunk = Result<Frame<Bytes>, io::Error>;

    /// A body that cannot be cloned, made of `chunks`.
    fn frames<const N: usize>(chunks: [Chunk; N]) -> Streaming {
        StreamBody::new(futures_util::stream::iter(Vec::from(chunks)))
    }

    fn data(chunk: &'static str) -> Chunk {
        Ok(Frame::data(Bytes::from_static(chunk.as_bytes())))
    }

    fn trailers() -> Chunk {
        Ok(Frame::trailers(trailer_map()))
    }

    fn trailer_map() -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert("x-checksum", HeaderValue::from_static("1"));
        map
    }

    fn claim<B>(copy: &ReplayBody<B>) -> bool
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        <BufferBody as Replay<B>>::claim(copy)
    }

    /// A body whose frames the test sends as it goes.
    struct ChannelBody {
        frames: mpsc::UnboundedReceiver<Chunk>,
        hint: SizeHint,
    }

    fn channel(hint: SizeHint) -> (mpsc::UnboundedSender<Chunk>, ChannelBody) {
        let (tx, frames) = mpsc::unbounded_channel();
        (tx, ChannelBody { frames, hint })
    }

    impl Body for ChannelBody {
        type Data = Bytes;
        type Error = io::Error;

        fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Chunk>> {
            let frame = ready!(self.frames.poll_recv(cx));
            if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
                let read = data.map_or(0, |data| data.len() as u64);
                let lower = self.hint.lower().saturating_sub(read);
                let upper = self.hint.upper().map(|upper| upper.saturating_sub(read));
                self.hint = SizeHint::new();
                self.hint.set_lower(lower);
                if let Some(upper) = upper {
                    self.hint.set_upper(upper);
                }
            }
            Poll::Ready(frame)
        }

        fn size_hint(&self) -> SizeHint {
            self.hint
        }
    }

    fn full(body: &'static str) -> Full<Bytes> {
        Full::new(Bytes::from_static(body.as_bytes()))
    }
}
