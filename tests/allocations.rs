//! Heap allocations per request, counted by a global allocator of this test binary's own: the
//! layer allocates no more than the least its job needs, written by hand, plus the copy a
//! retry after a 401 needs.
//!
//! The stacks and requests are those of `benches/overhead.rs` (shared through
//! `benches/support`), which times them; here only the allocations are counted, a property
//! of the code, not of the machine.

#[path = "../benches/support/mod.rs"]
mod support;

use blaze_auth::{BlazeAuthLayer, NoReplay};
use http::Request;
use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    fmt,
};
use support::{HandWritten, Ok200, STUDY, clone_body, send_all, source, streaming_body};
use tower::{Layer, Service};

/// Requests counted per stack.
const REQUESTS: u64 = 1_000;

#[test]
fn the_layer_allocates_no_more_than_the_hand_written_minimum_and_its_copy() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut hand_written = HandWritten::new(Ok200);
    let mut clone_body_layer = BlazeAuthLayer::new(source(), STUDY).layer(Ok200);
    let mut no_replay = BlazeAuthLayer::new(source(), STUDY)
        .replay(NoReplay)
        .layer(Ok200);
    // The first request of each fetches the token; the rest find it cached.
    rt.block_on(send_all(&mut clone_body_layer, vec![clone_body()]));
    rt.block_on(send_all(&mut no_replay, vec![streaming_body()]));

    let hand_written = per_request(&rt, &mut hand_written, clone_body);
    let clone_body = per_request(&rt, &mut clone_body_layer, clone_body);
    let no_replay = per_request(&rt, &mut no_replay, streaming_body);
    println!(
        "allocations per request: hand-written {hand_written}, CloneBody {clone_body}, NoReplay {no_replay}"
    );
    assert!(hand_written > 0.0, "the counter counts");
    assert!(
        no_replay <= hand_written,
        "NoReplay allocates {no_replay} per request, the minimum {hand_written}"
    );
    // The copy kept for a retry: its list of headers, one allocation.
    assert!(
        clone_body <= hand_written + 1.0,
        "CloneBody allocates {clone_body} per request, the minimum {hand_written} + 1 for the copy"
    );
}

/// The heap allocations per request of `REQUESTS` requests from `make` through `service`.
fn per_request<S, B>(rt: &tokio::runtime::Runtime, service: &mut S, make: fn() -> Request<B>) -> f64
where
    S: Service<Request<B>>,
    S::Error: fmt::Debug,
{
    let requests: Vec<_> = (0..REQUESTS).map(|_| make()).collect();
    COUNTING.with(|counting| counting.set(true));
    rt.block_on(send_all(service, requests));
    COUNTING.with(|counting| counting.set(false));
    let count = ALLOCATIONS.with(|allocations| allocations.replace(0));
    // Lossless: a few thousand at most.
    count as f64 / REQUESTS as f64
}

/// Counts the heap allocations (`alloc`, `alloc_zeroed` and `realloc` calls) this thread
/// makes while [`COUNTING`]: nothing another thread does is counted.
struct CountingAllocator;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

impl CountingAllocator {
    fn count(&self) {
        // `try_with`: a thread being torn down has no locals left, and is not counted.
        let _ = COUNTING.try_with(|counting| {
            if counting.get() {
                let _ = ALLOCATIONS.try_with(|allocations| allocations.set(allocations.get() + 1));
            }
        });
    }
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds `GlobalAlloc`'s
// contract; the counter does not touch the memory, and its thread locals, const-initialised
// `Cell`s, never allocate.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.count();
        // SAFETY: the caller's guarantees for `layout` hold for `System` too.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.count();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`, through this allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.count();
        // SAFETY: as for `dealloc`, and the caller's guarantees for `new_size` hold.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
