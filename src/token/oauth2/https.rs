//! The built-in HTTPS client for token requests: hyper-util and rustls, no OpenSSL.

use super::{ClientCredentialsBuilder, HttpClient};
use crate::error::{BoxError, Error};
use http_body_util::BodyExt;
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rustls::{ClientConfig, RootCertStore, pki_types::CertificateDer};
use std::{sync::Arc, time::Duration};
use tower::{ServiceExt, util::BoxCloneSyncService};

/// Which root certificates the built-in client trusts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsRoots {
    /// The platform's trust store, so that a corporate CA installed there is trusted; the
    /// webpki roots when the platform has none (a bare container). The default.
    #[default]
    Platform,
    /// Mozilla's roots, compiled in (the `webpki-roots` crate): the same on every machine.
    Webpki,
    /// Only the certificates added with
    /// [`add_root_certificate`](ClientCredentialsBuilder::add_root_certificate).
    Added,
}

#[derive(Default)]
pub(super) struct TlsConfig {
    roots: TlsRoots,
    added: Vec<CertificateDer<'static>>,
}

impl ClientCredentialsBuilder {
    /// Sets which root certificates the built-in client trusts. Default:
    /// [`TlsRoots::Platform`].
    #[cfg_attr(docsrs, doc(cfg(feature = "rustls")))]
    pub fn tls_roots(mut self, roots: TlsRoots) -> Self {
        self.tls.roots = roots;
        self
    }

    /// Trusts `certificate` (DER) as a root, besides the [`TlsRoots`]: a private CA, or a
    /// test server's.
    #[cfg_attr(docsrs, doc(cfg(feature = "rustls")))]
    pub fn add_root_certificate(mut self, certificate: impl Into<Vec<u8>>) -> Self {
        self.tls
            .added
            .push(CertificateDer::from(certificate.into()));
        self
    }
}

/// The HTTPS (and, for what [`checked_url`](super::checked_url) lets through, HTTP) client.
pub(super) fn client(tls: &TlsConfig, connect_timeout: Duration) -> Result<HttpClient, Error> {
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(Error::tls)?
            .with_root_certificates(roots(tls)?)
            .with_no_client_auth();

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let client = Client::builder(TokioExecutor::new())
        .build(connector)
        .map_response(|response| response.map(|body| body.map_err(BoxError::from).boxed_unsync()))
        .map_err(BoxError::from);
    Ok(BoxCloneSyncService::new(client))
}

fn roots(tls: &TlsConfig) -> Result<RootCertStore, Error> {
    let webpki = || RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let mut roots = match tls.roots {
        TlsRoots::Platform => {
            let mut platform = RootCertStore::empty();
            let (added, _) =
                platform.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if added == 0 {
                tracing::warn!("no platform root certificates, using the webpki roots");
                webpki()
            } else {
                platform
            }
        }
        TlsRoots::Webpki => webpki(),
        TlsRoots::Added => RootCertStore::empty(),
    };
    for certificate in &tls.added {
        roots.add(certificate.clone()).map_err(Error::tls)?;
    }
    if roots.is_empty() {
        return Err(Error::tls("no root certificates to trust"));
    }
    Ok(roots)
}
