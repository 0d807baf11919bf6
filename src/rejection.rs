//! Does a response say the token was refused, and can a new token help?

use http::{HeaderMap, HeaderName, Response, StatusCode, header::WWW_AUTHENTICATE};

/// What a response says about the token it answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Not a rejection of the token: the response goes to the caller.
    Accepted,
    /// The token was refused in a way a new one may fix: refresh and retry.
    Refused,
    /// Refused for a reason a new token cannot fix (`insufficient_scope`, a malformed
    /// request): the response goes to the caller as it is.
    Unfixable,
}

/// The gRPC status UNAUTHENTICATED.
const GRPC_UNAUTHENTICATED: &[u8] = b"16";

/// Parsed once: a lookup by `&str` parses and validates the name on every response.
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

impl Verdict {
    // Every response pays for these two: inline, they cost a status compare (and, for a
    // 200, the `grpc-status` lookup); a 401's challenge is read out of line.
    #[inline(always)]
    pub(crate) fn of<B>(response: &Response<B>) -> Self {
        Self::of_head(response.status(), response.headers())
    }

    /// The verdict of a response's status and headers: for clients whose response type is
    /// not `http::Response` (reqwest's).
    #[inline(always)]
    pub(crate) fn of_head(status: StatusCode, headers: &HeaderMap) -> Self {
        match status {
            StatusCode::UNAUTHORIZED => bearer_verdict(headers),
            // gRPC answers an expired token with 200 and `grpc-status: 16` in a trailers-only
            // response, whose trailers arrive as headers.
            StatusCode::OK
                if headers
                    .get(GRPC_STATUS)
                    .is_some_and(|status| status.as_bytes() == GRPC_UNAUTHENTICATED) =>
            {
                Self::Refused
            }
            _ => Self::Accepted,
        }
    }
}

/// RFC 6750 section 3: a Bearer challenge without `error`, or with `invalid_token`, asks for
/// a new token; any other error code (`insufficient_scope`, `invalid_request`) does not. A 401
/// without a Bearer challenge (Blaze's gateway sends none) is taken as a refused token.
fn bearer_verdict(headers: &HeaderMap) -> Verdict {
    for challenge in headers.get_all(WWW_AUTHENTICATE) {
        let Ok(challenge) = challenge.to_str() else {
            continue;
        };
        if let Some(error) = bearer_error(challenge) {
            return if error.eq_ignore_ascii_case("invalid_token") {
                Verdict::Refused
            } else {
                Verdict::Unfixable
            };
        }
    }
    Verdict::Refused
}

/// The `error` parameter of the Bearer challenge in `header`, if it has one.
fn bearer_error(header: &str) -> Option<&str> {
    // A header may hold several challenges: `Basic realm="x", Bearer error="invalid_token"`.
    // Find the Bearer one, then its `error` parameter before the next scheme.
    let lower = header.to_ascii_lowercase();
    let start = lower
        .match_indices("bearer")
        .map(|(at, _)| at)
        .find(|&at| at == 0 || matches!(lower.as_bytes()[at - 1], b' ' | b','))?;
    let mut rest = &header[start + "bearer".len()..];
    while let Some(at) = rest.to_ascii_lowercase().find("error") {
        let before = rest[..at].trim_end();
        let after = rest[at + "error".len()..].trim_start();
        let is_param = before.is_empty() || before.ends_with(',');
        if let (true, Some(value)) = (is_param, after.strip_prefix('=')) {
            let value = value.trim_start();
            return Some(match value.strip_prefix('"') {
                Some(quoted) => quoted.split('"').next().unwrap_or_default(),
                None => value
                    .split(|c: char| c == ',' || c.is_whitespace())
                    .next()
                    .unwrap_or_default(),
            });
        }
        rest = &rest[at + "error".len()..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(status: u16, headers: &[(&str, &str)]) -> Verdict {
        let mut response = Response::builder().status(status);
        for (name, value) in headers {
            response = response.header(*name, *value);
        }
        Verdict::of(&response.body(()).unwrap())
    }

    #[test]
    fn a_401_is_refused_unless_the_challenge_says_a_token_cannot_help() {
        assert_eq!(verdict(401, &[]), Verdict::Refused);
        assert_eq!(
            verdict(401, &[("www-authenticate", "Bearer")]),
            Verdict::Refused
        );
        assert_eq!(
            verdict(
                401,
                &[(
                    "www-authenticate",
                    r#"Bearer realm="blaze", error="invalid_token", error_description="expired""#
                )]
            ),
            Verdict::Refused
        );
        assert_eq!(
            verdict(
                401,
                &[(
                    "www-authenticate",
                    r#"Bearer error="insufficient_scope", scope="full""#
                )]
            ),
            Verdict::Unfixable
        );
        assert_eq!(
            verdict(401, &[("www-authenticate", "bearer error=invalid_request")]),
            Verdict::Unfixable
        );
    }

    #[test]
    fn the_bearer_challenge_is_found_among_others() {
        let headers = [
            ("www-authenticate", r#"Basic realm="error=invalid_token""#),
            (
                "www-authenticate",
                r#"Newauth realm="x", Bearer error="insufficient_scope""#,
            ),
        ];
        assert_eq!(verdict(401, &headers), Verdict::Unfixable);
        // `error` inside another parameter's value, or a parameter merely ending in "error".
        assert_eq!(
            verdict(
                401,
                &[(
                    "www-authenticate",
                    r#"Bearer realm="error", xerror="insufficient_scope""#
                )]
            ),
            Verdict::Refused
        );
        assert_eq!(
            verdict(401, &[("www-authenticate", "Basic realm=\"x\"")]),
            Verdict::Refused
        );
    }

    #[test]
    fn grpc_unauthenticated_in_a_trailers_only_response_is_refused() {
        assert_eq!(verdict(200, &[("grpc-status", "16")]), Verdict::Refused);
        assert_eq!(verdict(200, &[("grpc-status", "0")]), Verdict::Accepted);
        assert_eq!(verdict(200, &[("grpc-status", "7")]), Verdict::Accepted);
        assert_eq!(verdict(200, &[]), Verdict::Accepted);
    }

    #[test]
    fn other_statuses_are_accepted() {
        for status in [200, 204, 400, 403, 404, 500] {
            assert_eq!(verdict(status, &[]), Verdict::Accepted, "{status}");
        }
    }

    #[test]
    fn garbage_headers_never_panic() {
        for header in [
            "",
            "Bearer",
            "Bearer error",
            "Bearer error=",
            "Bearer error=\"",
            "bearer,error=\"x",
            "ébearer error=x",
        ] {
            let _ = bearer_error(header);
        }
        assert_eq!(
            bearer_error("Bearer error=\"unterminated"),
            Some("unterminated")
        );
    }
}
