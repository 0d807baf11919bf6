//! The built-in client speaks real TLS (rustls): against an HTTPS server on 127.0.0.1 with a
//! certificate from a test CA.
#![cfg(all(feature = "oauth2", feature = "rustls"))]

use blaze_auth::{ClientCredentials, token::oauth2::TlsRoots};
use http::{Request, Response};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

struct TlsServer {
    addr: SocketAddr,
    ca: CertificateDer<'static>,
    handshakes: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

/// An HTTPS token endpoint for `localhost`, its certificate signed by a fresh CA.
async fn tls_server() -> TlsServer {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone()], key)
    .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (handshakes_in, requests_in) = (Arc::clone(&handshakes), Arc::clone(&requests));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let (handshakes, requests) = (Arc::clone(&handshakes_in), Arc::clone(&requests_in));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                handshakes.fetch_add(1, Ordering::SeqCst);
                let service = service_fn(move |_: Request<Incoming>| {
                    requests.fetch_add(1, Ordering::SeqCst);
                    async {
                        let body = r#"{"token_type":"Bearer","access_token":"over-tls","expires_in":3600}"#;
                        Ok::<_, std::convert::Infallible>(Response::new(
                            Full::<bytes::Bytes>::from(body),
                        ))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    TlsServer {
        addr,
        ca: ca.der().clone(),
        handshakes,
        requests,
    }
}

#[tokio::test]
async fn fetches_over_https_trusting_an_added_root() {
    let server = tls_server().await;
    let url = format!("https://localhost:{}/token", server.addr.port());
    let source = ClientCredentials::builder(&url, "id", "secret")
        .tls_roots(TlsRoots::Added)
        .add_root_certificate(server.ca.to_vec())
        .build()
        .unwrap();
    let token = source.fetch_token().await.unwrap();
    assert_eq!(token.secret(), "over-tls");
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_untrusted_certificate_fails_without_sending_the_secret_or_retrying() {
    let server = tls_server().await;
    let url = format!("https://localhost:{}/token", server.addr.port());
    let source = ClientCredentials::builder(&url, "id", "secret")
        .tls_roots(TlsRoots::Webpki)
        .build()
        .unwrap();
    let error = source.fetch_token().await.unwrap_err();
    assert!(error.is_transport(), "{error:?}");
    assert!(
        !error.is_transient(),
        "a certificate error is not retried: {error:?}"
    );
    assert_eq!(server.handshakes.load(Ordering::SeqCst), 0);
    assert_eq!(server.requests.load(Ordering::SeqCst), 0);
}

#[test]
fn no_roots_at_all_is_a_build_error() {
    let error = ClientCredentials::builder("https://localhost/token", "id", "secret")
        .tls_roots(TlsRoots::Added)
        .build()
        .unwrap_err();
    assert!(error.is_config(), "{error:?}");
}
