//! A request outside the credential scope is named in a DEBUG event, by its origin only.
//!
//! Alone in its test binary: `tracing` keeps callsite interest and the max level process-wide,
//! and with another test of the layer running beside it on another thread (no subscriber
//! there), the captured event was missing now and then.

use blaze_auth::BlazeAuthLayer;
use http::{Request, Response};
use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
};
use tower::{ServiceExt, service_fn};

#[tokio::test(flavor = "current_thread")]
async fn a_request_outside_the_scope_is_named_in_a_debug_event() {
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let source = blaze_auth::StaticToken::new(blaze_auth::AccessToken::bearer("t").unwrap());
    let layer = BlazeAuthLayer::new(source, "FHIR-T");
    let echo = service_fn(|request: Request<String>| async move {
        Ok::<_, Infallible>(Response::new(request.headers().len()))
    });
    let client = tower::Layer::layer(&layer, echo);
    let request = Request::get("https://Other.example:8443/x?secret-query=1")
        .body(String::new())
        .unwrap();
    assert_eq!(client.oneshot(request).await.unwrap().into_body(), 0);

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("outside the credential scope")
            && logs.contains("https://Other.example:8443"),
        "{logs}"
    );
    assert!(!logs.contains("secret-query"), "the origin only: {logs}");
}
