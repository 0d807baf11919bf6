//! The FHIR API: checks in Blaze's order (token, partner id, research study, access), then
//! search, read and `metadata`.

use super::{
    API_PATH, ApiFailure, Shared,
    data::Resource,
    lock,
    server::{Reply, ResetConnection, json_response, response, with_retry_after},
    token::{Client, TokenCheck},
};
use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode,
    header::{AUTHORIZATION, WWW_AUTHENTICATE},
};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Serialize;
use std::sync::{Arc, atomic::Ordering};

const FHIR_JSON: &str = "application/fhir+json";

const STUDY_PARAM: &str = "researchstudy";
const PARTNER_ID: &str = "x-partnerid";

const DEFAULT_COUNT: usize = 50;
const MAX_COUNT: usize = 1000;

/// Serves one API request, or fails it as the test asked.
pub(super) fn handle(request: &Request<Incoming>, shared: &Shared) -> Reply {
    shared.counters.api_requests.fetch_add(1, Ordering::Relaxed);
    let reply = answer(request, shared);
    if reply
        .as_ref()
        .is_ok_and(|response| response.status() == StatusCode::UNAUTHORIZED)
    {
        shared
            .counters
            .unauthorized_served
            .fetch_add(1, Ordering::Relaxed);
    }
    reply
}

fn answer(request: &Request<Incoming>, shared: &Shared) -> Reply {
    let failure = shared.api_failures.next().or_else(|| {
        let page = search_page(request)?;
        shared.paging.page_failures.next(page)
    });
    if let Some(failure) = failure {
        return match failure {
            ApiFailure::Unauthorized => Ok(invalid_token("the access token was rejected")),
            ApiFailure::Status(status) => Ok(injected(status)),
            ApiFailure::Reset => Err(ResetConnection),
            ApiFailure::TooManyRequests { retry_after } => Ok(with_retry_after(
                injected(StatusCode::TOO_MANY_REQUESTS),
                retry_after,
            )),
        };
    }
    if lock(&shared.random_unauthorized).draw() {
        return Ok(invalid_token("the access token was rejected"));
    }
    Ok(serve(request, shared))
}

fn serve(request: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let client = match authorize(request.headers(), shared) {
        Ok(client) => client,
        Err(diagnostics) => return invalid_token(diagnostics),
    };
    let partner_id_wrong = shared.partner_id.as_ref().is_some_and(|partner_id| {
        request.headers().get(PARTNER_ID).map(HeaderValue::as_bytes) != Some(partner_id.as_bytes())
    });
    if partner_id_wrong {
        // The token is fine, so no `invalid_token` challenge: a client must not take this
        // for a stale token.
        return outcome(
            StatusCode::UNAUTHORIZED,
            "login",
            "the x-partnerid header is missing or not recognised",
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return outcome(
            StatusCode::METHOD_NOT_ALLOWED,
            "not-supported",
            "the API is read-only",
        );
    }

    let params: Vec<(String, String)> =
        form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let mut studies = params
        .iter()
        .filter(|(name, _)| name == STUDY_PARAM)
        .map(|(_, value)| value.as_str());
    let study = match (studies.next(), studies.next()) {
        (None, _) | (Some(""), None) => {
            return outcome(
                StatusCode::BAD_REQUEST,
                "required",
                "the researchstudy query parameter is required",
            );
        }
        (Some(study), None) => study,
        // Catches a client that adds the study to a paging link that has it already.
        (Some(_), Some(_)) => {
            return outcome(
                StatusCode::BAD_REQUEST,
                "invalid",
                "the researchstudy query parameter is given more than once",
            );
        }
    };
    if !client.may_see(study) {
        return outcome(
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!("research study {study} is not open to this client"),
        );
    }

    let path = &request.uri().path()[API_PATH.len()..];
    let path = path.strip_prefix('/').unwrap_or(path);
    let dataset = &shared.dataset;
    match path.split_once('/') {
        None => match path {
            "metadata" => response(StatusCode::OK, FHIR_JSON, CAPABILITY_STATEMENT),
            "Patient" => search(&dataset.patients, &params, shared),
            "Observation" => search(&dataset.observations, &params, shared),
            "Group" => search(&dataset.groups, &params, shared),
            _ => unknown_type(),
        },
        Some((resource_type, id)) => match resource_type {
            "Patient" => read(&dataset.patients, id),
            "Observation" => read(&dataset.observations, id),
            "Group" => read(&dataset.groups, id),
            _ => unknown_type(),
        },
    }
}

/// The `page` a search request asks for (1 when absent), or `None` if the request is not a
/// search or its `page` is not a positive integer.
fn search_page(request: &Request<Incoming>) -> Option<usize> {
    let path = request.uri().path()[API_PATH.len()..].trim_start_matches('/');
    if path.is_empty() || path.contains('/') || path == "metadata" {
        return None;
    }
    let params: Vec<(String, String)> =
        form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    positive_param(&params, "page", 1)
}

/// The client of the request's bearer token, or why there is none.
fn authorize(headers: &HeaderMap, shared: &Shared) -> Result<Arc<Client>, &'static str> {
    let token = bearer_token(headers).ok_or("no bearer token")?;
    let check = lock(&shared.tokens).check(token);
    match check {
        TokenCheck::Valid(client) => Ok(client),
        TokenCheck::Expired => Err("the access token has expired"),
        TokenCheck::Unknown => Err("the access token is unknown or revoked"),
    }
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let (scheme, token) = headers.get(AUTHORIZATION)?.to_str().ok()?.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn read<R: Resource>(resources: &[R], id: &str) -> Response<Full<Bytes>> {
    match resources.iter().find(|resource| resource.id() == id) {
        Some(resource) => json_response(StatusCode::OK, FHIR_JSON, resource),
        None => outcome(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("no {} with this id", R::TYPE),
        ),
    }
}

/// A `searchset` Bundle of one page of the resources that match every parameter.
fn search<R: Resource>(
    resources: &[R],
    params: &[(String, String)],
    shared: &Shared,
) -> Response<Full<Bytes>> {
    let Some(count) = positive_param(params, "_count", DEFAULT_COUNT) else {
        return outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            "_count must be a positive integer",
        );
    };
    let count = count.min(MAX_COUNT);
    let Some(page) = positive_param(params, "page", 1) else {
        return outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            "page must be a positive integer",
        );
    };

    let found: Vec<&R> = resources
        .iter()
        .filter(|resource| {
            params
                .iter()
                .all(|(name, value)| resource.matches(name, value).unwrap_or(true))
        })
        .collect();
    let found_count = found.len();
    let last = found_count.div_ceil(count).max(1);

    let resource_url = format!("{}/{}", shared.api_url(), R::TYPE);
    let next_url = match &shared.paging.foreign_next {
        Some((foreign_page, origin)) if *foreign_page == page => {
            format!("{origin}{API_PATH}/{}", R::TYPE)
        }
        _ => resource_url.clone(),
    };
    // The links keep every parameter as the client sent it, in its order, and add the
    // partner id (when required), `_count` and `page`, as Blaze v2 does.
    let kept: Vec<&(String, String)> = params
        .iter()
        .filter(|(name, _)| {
            name != "_count"
                && name != "page"
                && !(shared.partner_id.is_some() && name == PARTNER_ID)
        })
        .collect();
    let page_url = |resource_url: &str, page: usize| {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (name, value) in &kept {
            query.append_pair(name, value);
        }
        if let Some(partner_id) = &shared.partner_id {
            query.append_pair(PARTNER_ID, partner_id);
        }
        query.append_pair("_count", &count.to_string());
        query.append_pair("page", &page.to_string());
        format!("{resource_url}?{}", query.finish())
    };
    let link = [
        Link::new("self", Some(page_url(&resource_url, page))),
        Link::new("first", Some(page_url(&resource_url, 1))),
        Link::new("last", Some(page_url(&resource_url, last))),
        Link::new(
            "previous",
            (page > 1).then(|| page_url(&resource_url, page - 1)),
        ),
        Link::new("next", (page < last).then(|| page_url(&next_url, page + 1))),
    ];
    let entry = found
        .into_iter()
        .skip((page - 1).saturating_mul(count))
        .take(count)
        .map(|resource| Entry {
            full_url: format!("{resource_url}/{}", resource.id()),
            resource,
            search: EntrySearch { mode: "match" },
        })
        .collect();
    let bundle = Bundle {
        resource_type: "Bundle",
        kind: "searchset",
        total: found_count.saturating_add_signed(shared.paging.total_delta),
        link,
        entry,
    };
    json_response(StatusCode::OK, FHIR_JSON, &bundle)
}

/// The first value of parameter `name` as a positive integer, `default` if it is absent, or
/// `None` if it is not a positive integer.
fn positive_param(params: &[(String, String)], name: &str, default: usize) -> Option<usize> {
    match params.iter().find(|(param, _)| param == name) {
        None => Some(default),
        Some((_, value)) => value.parse().ok().filter(|n| *n > 0),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Bundle<'a, R> {
    resource_type: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    total: usize,
    link: [Link; 5],
    entry: Vec<Entry<'a, R>>,
}

/// A paging link; a missing `previous` or `next` has `"url": null`, as at Blaze.
#[derive(Serialize)]
struct Link {
    relation: &'static str,
    url: Option<String>,
}

impl Link {
    fn new(relation: &'static str, url: Option<String>) -> Self {
        Self { relation, url }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Entry<'a, R> {
    full_url: String,
    resource: &'a R,
    search: EntrySearch,
}

#[derive(Serialize)]
struct EntrySearch {
    mode: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OperationOutcome<'a> {
    resource_type: &'static str,
    issue: [Issue<'a>; 1],
}

#[derive(Serialize)]
struct Issue<'a> {
    severity: &'static str,
    code: &'static str,
    diagnostics: &'a str,
}

/// The response to a failure injected with `status`.
fn injected(status: StatusCode) -> Response<Full<Bytes>> {
    outcome(
        status,
        issue_code(status),
        "failure injected by the stand-in",
    )
}

/// An error response: `status` with an `OperationOutcome` of one issue.
fn outcome(status: StatusCode, code: &'static str, diagnostics: &str) -> Response<Full<Bytes>> {
    let body = OperationOutcome {
        resource_type: "OperationOutcome",
        issue: [Issue {
            severity: "error",
            code,
            diagnostics,
        }],
    };
    json_response(status, FHIR_JSON, &body)
}

/// A 401 for a missing or bad token, with the RFC 6750 challenge that says so.
fn invalid_token(diagnostics: &str) -> Response<Full<Bytes>> {
    let mut response = outcome(StatusCode::UNAUTHORIZED, "login", diagnostics);
    response.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"invalid_token\""),
    );
    response
}

fn unknown_type() -> Response<Full<Bytes>> {
    outcome(StatusCode::NOT_FOUND, "not-found", "unknown resource type")
}

/// The FHIR issue type for an injected status.
fn issue_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "invalid",
        StatusCode::UNAUTHORIZED => "login",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not-found",
        StatusCode::TOO_MANY_REQUESTS => "throttled",
        _ => "exception",
    }
}

/// What `metadata` answers: the interactions and search parameters the stand-in supports.
const CAPABILITY_STATEMENT: &str = r#"{"resourceType":"CapabilityStatement","status":"active","date":"2024-01-01","kind":"instance","software":{"name":"blaze-auth stand-in"},"fhirVersion":"4.0.1","format":["application/fhir+json"],"rest":[{"mode":"server","resource":[{"type":"Patient","interaction":[{"code":"read"},{"code":"search-type"}],"searchParam":[{"name":"_id","type":"token"}]},{"type":"Observation","interaction":[{"code":"read"},{"code":"search-type"}],"searchParam":[{"name":"_id","type":"token"},{"name":"code","type":"token"}]},{"type":"Group","interaction":[{"code":"read"},{"code":"search-type"}],"searchParam":[{"name":"_id","type":"token"}]}]}]}"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_token_takes_any_case_of_the_scheme_and_nothing_else() {
        let headers = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(AUTHORIZATION, HeaderValue::from_static(value));
            headers
        };
        assert_eq!(bearer_token(&headers("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&headers("bearer  abc")), Some("abc"));
        assert_eq!(bearer_token(&headers("Basic abc")), None);
        assert_eq!(bearer_token(&headers("Bearer ")), None);
        assert_eq!(bearer_token(&headers("Bearer")), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[test]
    fn positive_param_takes_the_first_value_or_the_default() {
        let params = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect()
        };
        assert_eq!(positive_param(&params(&[]), "page", 1), Some(1));
        assert_eq!(
            positive_param(&params(&[("page", "3"), ("page", "x")]), "page", 1),
            Some(3)
        );
        assert_eq!(positive_param(&params(&[("page", "0")]), "page", 1), None);
        assert_eq!(positive_param(&params(&[("page", "-2")]), "page", 1), None);
    }
}
