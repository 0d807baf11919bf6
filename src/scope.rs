//! Where a layer's credentials may go: its credential scope.
//!
//! By default the scope is Blaze's two gateways ([`blaze::STAGING_URL`],
//! [`blaze::PRODUCTION_URL`]) and loopback hosts (`127.0.0.0/8`, `::1`, `localhost`, any port,
//! `http` or `https`). Naming an origin replaces that default; [`Scope::Any`] takes every
//! origin. Plain `http` to a host that is not loopback gets credentials only when allowed; no
//! scheme other than `http` and `https` ever gets them, whatever its host and port.

use crate::{blaze, error::Error};
use http::Uri;
use std::{fmt, net::IpAddr};

/// The hosts of Blaze's gateways, as their URLs name them: the default scope's `https` hosts.
const GATEWAY_HOSTS: [&str; 2] = [
    https_host(blaze::STAGING_URL),
    https_host(blaze::PRODUCTION_URL),
];

/// `url` without its `https://`, at compile time: the comparison on every request is then
/// with a constant.
const fn https_host(url: &'static str) -> &'static str {
    let Some((scheme, host)) = url.as_bytes().split_at_checked("https://".len()) else {
        panic!("a gateway URL is https://<host>");
    };
    assert!(
        matches!(scheme, b"https://"),
        "a gateway URL is https://<host>"
    );
    match std::str::from_utf8(host) {
        Ok(host) => host,
        Err(_) => panic!("a gateway URL is text"),
    }
}

/// The origins a layer authenticates requests to.
#[derive(Clone, Debug)]
pub(crate) enum Scope {
    /// Blaze's gateways and loopback hosts.
    Default,
    /// The origins the user named, and only those.
    Named(Vec<Origin>),
    /// Every origin: the user opted in; plain `http` to a host that is not loopback only
    /// with `allow_http`.
    Any { allow_http: bool },
}

/// What a request to some URI gets.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Credentials.
    Authenticate,
    /// Nothing: it goes on untouched.
    PassThrough,
}

impl Scope {
    /// Whether a request to `uri` gets credentials.
    ///
    /// A relative URI does (the inner service picks its origin, as a tonic channel does). An
    /// absolute one does if its origin is in the scope; plain `http` to a host that is not
    /// loopback, in an open scope without `allow_http`, is an error: sending it without the
    /// credentials the user asked for everywhere would be as wrong as sending them in clear.
    // Every request pays for this: the common case inline (`call` is big enough that the
    // compiler would not inline it by itself), the full check out of line.
    #[inline(always)]
    pub(crate) fn decide(&self, uri: &Uri) -> Result<Decision, Error> {
        if self.names_exactly(uri) {
            return Ok(Decision::Authenticate);
        }
        self.decide_in_full(uri)
    }

    /// [`decide`](Self::decide) for a URI that [`names_exactly`](Self::names_exactly) did not
    /// settle.
    #[inline(never)]
    fn decide_in_full(&self, uri: &Uri) -> Result<Decision, Error> {
        let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
            return Ok(Decision::Authenticate);
        };
        // Only `http` and `https` ever get credentials, whatever the host and port.
        let port = default_port(scheme).map(|default| uri.port_u16().unwrap_or(default));
        let inside = match (self, port) {
            (_, None) => false,
            (Scope::Default, Some(port)) => {
                // The gateways first: the common case in production, and cheaper.
                scheme.eq_ignore_ascii_case("https")
                    && port == 443
                    && GATEWAY_HOSTS
                        .iter()
                        .any(|gateway| gateway.eq_ignore_ascii_case(host))
                    || is_loopback(host)
            }
            (Scope::Named(origins), Some(port)) => {
                origins.iter().any(|o| o.matches(scheme, host, port))
            }
            (Scope::Any { allow_http }, Some(_)) => {
                let cleartext = scheme.eq_ignore_ascii_case("http") && !is_loopback(host);
                if cleartext && !*allow_http {
                    return Err(Error::insecure_url());
                }
                true
            }
        };
        if inside {
            Ok(Decision::Authenticate)
        } else {
            // The port is formatted in the event's fields, which only an enabled event
            // evaluates: with DEBUG off, a request passed through allocates nothing here.
            tracing::debug!(
                origin = %format_args!(
                    "{scheme}://{host}{}",
                    uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default()
                ),
                "request outside the credential scope: sent without credentials"
            );
            Ok(Decision::PassThrough)
        }
    }
}

impl Scope {
    /// The common case, cheaply: whether `uri`'s authority is, in any case, exactly the host
    /// of a gateway or of a named origin, or that host with the origin's port, and its scheme
    /// the origin's. Then the request is in the scope, and `decide` need not take `host()`
    /// and `port_u16()`, which parse the authority once each. Anything else (user info, a
    /// loopback host, another port) is for the full check.
    #[inline(always)]
    fn names_exactly(&self, uri: &Uri) -> bool {
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return false;
        };
        let authority = authority.as_str();
        // `http`'s schemes come as written in lower case (`Uri` keeps `https` and `http` as
        // constants): a compare of the bytes first, then one in any case.
        let scheme_is =
            |expected: &str| scheme == expected || scheme.eq_ignore_ascii_case(expected);
        match self {
            Scope::Default => {
                scheme_is("https")
                    && GATEWAY_HOSTS
                        .iter()
                        // As written, the common case: a compare with a constant, inline.
                        .any(|gateway| {
                            authority == *gateway || authority_is(authority, gateway, 443, true)
                        })
            }
            Scope::Named(origins) => origins.iter().any(|origin| {
                scheme_is(&origin.scheme)
                    && authority_is(
                        authority,
                        &origin.host,
                        origin.port,
                        default_port(&origin.scheme) == Some(origin.port),
                    )
            }),
            Scope::Any { .. } => false,
        }
    }
}

/// Whether `authority` is `host` followed by nothing (if `port` is the scheme's default) or
/// by `:port`, in any ASCII case.
fn authority_is(authority: &str, host: &str, port: u16, default: bool) -> bool {
    // Exactly as written first: a `memcmp`, quicker than comparing byte by byte in any case.
    let Some(rest) = authority
        .get(..host.len())
        .filter(|start| *start == host || start.eq_ignore_ascii_case(host))
        .map(|_| &authority[host.len()..])
    else {
        return false;
    };
    match rest.strip_prefix(':') {
        Some(digits) => digits.parse() == Ok(port),
        None => rest.is_empty() && default,
    }
}

/// Scheme, host and port, the port made explicit; scheme and host in lower case.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    scheme: Box<str>,
    host: Box<str>,
    port: u16,
}

impl Origin {
    /// The origin of `url` (its path is ignored), checked for use as a credential scope.
    ///
    /// # Errors
    ///
    /// If `url` has no `http(s)` scheme or no host, or has user info
    /// ([`Error::is_config`]), or is plain
    /// `http` to a host that is not loopback and `allow_http` is false
    /// ([`Error::is_config`]).
    pub(crate) fn parse(url: &str, allow_http: bool) -> Result<Self, Error> {
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| Error::invalid_url(Some(e.into())))?;
        let scheme = uri.scheme_str().map(str::to_ascii_lowercase);
        let (Some(scheme), Some(host)) = (scheme, uri.host()) else {
            return Err(Error::invalid_url(None));
        };
        // User info names no origin, and is a secret of its own: refused, as the token
        // endpoint refuses it.
        let user_info = uri.authority().is_some_and(|a| a.as_str().contains('@'));
        let port = default_port(&scheme)
            .filter(|_| !user_info)
            .map(|default| uri.port_u16().unwrap_or(default))
            .ok_or_else(|| Error::invalid_url(None))?;
        if scheme == "http" && !allow_http && !is_loopback(host) {
            return Err(Error::insecure_url());
        }
        Ok(Self {
            host: host.to_ascii_lowercase().into(),
            scheme: scheme.into(),
            port,
        })
    }
}

impl Origin {
    fn matches(&self, scheme: &str, host: &str, port: u16) -> bool {
        port == self.port
            && scheme.eq_ignore_ascii_case(&self.scheme)
            && host.eq_ignore_ascii_case(&self.host)
    }
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    if scheme.eq_ignore_ascii_case("https") {
        Some(443)
    } else if scheme.eq_ignore_ascii_case("http") {
        Some(80)
    } else {
        None
    }
}

/// Whether `host` (as a URI has it: IPv6 in brackets) is a loopback host: `127.0.0.0/8`,
/// `::1` or `localhost`.
pub(crate) fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `url` with the user info of its authority, if any, replaced by `[redacted]`.
pub(crate) fn without_user_info(url: &str) -> std::borrow::Cow<'_, str> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.into();
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://[redacted]@{host}{tail}").into(),
        None => url.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(scope: &Scope, uri: &str) -> Result<Decision, Error> {
        let uri = uri.parse().unwrap_or_else(|e| panic!("{uri}: {e}"));
        scope.decide(&uri)
    }

    #[test]
    fn the_default_scope_is_blazes_gateways_and_loopback() {
        for inside in [
            "https://apigateway.apps.stageapi.mskcc.org/msk-apim/external/v2/crit/blaze/api/Patient",
            "https://APIGATEWAY.apps.prodapi.mskcc.org:443/x",
            "http://127.0.0.1:8080/Patient",
            "https://127.8.9.10/Patient",
            "http://[::1]:9000/Patient",
            "http://LocalHost/Patient",
            "HTTPS://evil.example@APIGATEWAY.apps.prodapi.mskcc.org/x",
            "/Patient",
        ] {
            assert_eq!(
                decide(&Scope::Default, inside).unwrap(),
                Decision::Authenticate,
                "{inside}"
            );
        }
        for outside in [
            "https://evil.example/collect",
            "http://apigateway.apps.stageapi.mskcc.org/x",
            "https://apigateway.apps.stageapi.mskcc.org:8443/x",
            "https://apigateway.apps.stageapi.mskcc.org.evil.example/x",
            "https://localhost.evil.example/x",
            "http://10.0.0.1/x",
            "ftp://127.0.0.1/x",
            // The host is what follows the user info.
            "https://apigateway.apps.stageapi.mskcc.org@evil.example/x",
            // Names that resolve to loopback elsewhere, or might, are not loopback here.
            "https://127.0.0.1.nip.io/x",
            "http://localhost./x",
            "https://apigateway.apps.stageapi.mskcc.org./x",
            "http://[::ffff:127.0.0.1]/x",
            "http://2130706433/x",
        ] {
            assert_eq!(
                decide(&Scope::Default, outside).unwrap(),
                Decision::PassThrough,
                "{outside}"
            );
        }
    }

    #[test]
    fn the_quick_check_takes_only_what_the_full_check_would() {
        let named = Scope::Named(vec![
            Origin::parse("https://blaze.example", false).unwrap(),
            Origin::parse("http://blaze.internal:8080", true).unwrap(),
        ]);
        let uris = [
            "https://apigateway.apps.stageapi.mskcc.org/x",
            "https://APIGATEWAY.apps.prodapi.mskcc.org:443/x",
            "https://apigateway.apps.stageapi.mskcc.org:0443/x",
            "https://apigateway.apps.stageapi.mskcc.org:8443/x",
            "https://apigateway.apps.stageapi.mskcc.org.:443/x",
            "https://apigateway.apps.stageapi.mskcc.org.evil.example/x",
            "https://user@apigateway.apps.stageapi.mskcc.org/x",
            "http://apigateway.apps.stageapi.mskcc.org/x",
            "https://apigateway.apps.stageapi.mskcc.or/x",
            "https://blaze.example/x",
            "https://Blaze.Example:443/x",
            "https://blaze.example:80/x",
            "http://blaze.example/x",
            "http://blaze.internal:8080/x",
            "http://blaze.internal/x",
            "https://blaze.internal:8080/x",
            "http://127.0.0.1:8080/x",
            "/x",
        ];
        let mut quick = 0;
        for scope in [&Scope::Default, &named, &Scope::Any { allow_http: false }] {
            for uri in uris {
                let parsed: Uri = uri.parse().unwrap();
                if scope.names_exactly(&parsed) {
                    quick += 1;
                    // The full check, without the quick one, says the same.
                    let host = parsed.host().unwrap();
                    let port = parsed
                        .port_u16()
                        .or_else(|| default_port(parsed.scheme_str().unwrap()));
                    let full = match scope {
                        Scope::Default => {
                            port == Some(443)
                                && parsed.scheme_str() == Some("https")
                                && !host.contains('@')
                                && (host.eq_ignore_ascii_case("apigateway.apps.stageapi.mskcc.org")
                                    || host
                                        .eq_ignore_ascii_case("apigateway.apps.prodapi.mskcc.org"))
                        }
                        Scope::Named(origins) => origins.iter().any(|o| {
                            port.is_some_and(|port| {
                                o.matches(parsed.scheme_str().unwrap(), host, port)
                            })
                        }),
                        Scope::Any { .. } => false,
                    };
                    assert!(full, "{scope:?} {uri}");
                }
            }
        }
        // The gateways and named origins as clients write them take the quick way.
        assert_eq!(quick, 6);
    }

    #[test]
    fn any_origin_refuses_cleartext_to_other_hosts_unless_allowed() {
        assert_eq!(
            decide(
                &Scope::Any { allow_http: false },
                "https://anywhere.example/x"
            )
            .unwrap(),
            Decision::Authenticate
        );
        assert_eq!(
            decide(&Scope::Any { allow_http: false }, "http://127.0.0.1/x").unwrap(),
            Decision::Authenticate
        );
        let error = decide(
            &Scope::Any { allow_http: false },
            "http://anywhere.example/x",
        )
        .unwrap_err();
        assert!(error.is_config(), "{error:?}");
        assert_eq!(
            error.to_string(),
            "plain http is allowed for loopback hosts only"
        );
        assert_eq!(
            decide(
                &Scope::Any { allow_http: true },
                "http://anywhere.example/x"
            )
            .unwrap(),
            Decision::Authenticate
        );
    }

    #[test]
    fn origins_are_checked_when_named() {
        let origin = Origin::parse("HTTPS://Blaze.Example/api/", false).unwrap();
        assert_eq!(format!("{origin:?}"), "https://blaze.example:443");
        let error = Origin::parse("http://blaze.example", false).unwrap_err();
        assert!(error.is_config());
        assert_eq!(
            error.to_string(),
            "plain http is allowed for loopback hosts only"
        );
        assert!(Origin::parse("http://blaze.example", true).is_ok());
        assert!(Origin::parse("http://localhost:3000", false).is_ok());
        for bad in ["blaze.example", "/path", "not a url", "ftp://h/x"] {
            let error = Origin::parse(bad, true).unwrap_err();
            assert!(error.is_config(), "{bad}");
            assert_eq!(error.to_string(), "invalid URL", "{bad}");
        }
    }

    #[test]
    fn only_http_and_https_ever_get_credentials() {
        // An explicit port gave other schemes a way in: the loopback default and an open scope
        // checked the host and the port, never the scheme.
        let named = Scope::Named(vec![Origin::parse("https://blaze.example", false).unwrap()]);
        for (scope, uri) in [
            (&Scope::Default, "ftp://127.0.0.1:21/x"),
            (&Scope::Default, "ws://localhost:8080/x"),
            (
                &Scope::Any { allow_http: false },
                "ws://anywhere.example:80/x",
            ),
            (
                &Scope::Any { allow_http: false },
                "foo://anywhere.example:443/x",
            ),
            (&named, "wss://blaze.example:443/x"),
        ] {
            assert_eq!(decide(scope, uri).unwrap(), Decision::PassThrough, "{uri}");
        }
    }

    #[test]
    fn a_named_origin_is_http_or_https_without_user_info() {
        for bad in [
            "ftp://blaze.example:21",
            "ws://blaze.example:80",
            "https://user:pw@blaze.example",
            "https://blaze.example@evil.example",
        ] {
            assert!(Origin::parse(bad, true).unwrap_err().is_config(), "{bad}");
        }
    }

    #[test]
    fn loopback_hosts() {
        for host in [
            "127.0.0.1",
            "127.255.0.9",
            "[::1]",
            "localhost",
            "LOCALHOST",
        ] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["10.0.0.1", "localhost.evil.example", "[::2]", "0.0.0.0"] {
            assert!(!is_loopback(host), "{host}");
        }
    }
}
