//! FHIR search paging that cannot end short without saying so: `next` links are followed only
//! on the API's origin, every resource is handed on once, and the count of matches is checked
//! against the Bundle's `total`.

use super::BlazeClient;
use blaze_auth::BoxError;
use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::Value;
use std::{collections::HashSet, fmt};
use tower::ServiceExt;

/// The largest page read; a page of 1,000 Observations is about 1 MiB.
const MAX_PAGE_BYTES: usize = 64 * 1024 * 1024;

/// One page of a search, as [`search`] hands it on.
pub(crate) struct Page<'a> {
    /// Counting from 1.
    pub(crate) number: usize,
    /// The page's resources not handed on before, in order.
    pub(crate) resources: Vec<&'a Value>,
    /// Distinct matches so far, this page's included.
    pub(crate) matches: u64,
    /// The `total` the server stated last, if it did.
    pub(crate) total: Option<u64>,
}

/// What a complete search found.
#[derive(Debug, Default)]
pub(crate) struct Summary {
    pub(crate) pages: usize,
    /// Distinct resources that matched the search (includes not counted, as in `total`).
    pub(crate) matches: u64,
    /// The `total` the server stated last; `None` if it never did, and then the count was
    /// not checked.
    pub(crate) total: Option<u64>,
    /// `type/id` of each match met again on a later page, once per repeat.
    pub(crate) duplicates: Vec<String>,
}

/// How a search went wrong where a plain HTTP error would not say.
#[derive(Debug)]
pub(crate) enum SearchError {
    /// A `next` link to another origin than the API's; not followed.
    ForeignLink { link_origin: String },
    /// A `next` link that is not an absolute `http(s)` URL.
    BadLink,
    /// A `next` link to a page already fetched: the server pages in a circle.
    LinkLoop { page: usize },
    /// The search ended with another number of matches than the server's `total`.
    Incomplete {
        matches: u64,
        total: u64,
        first_total: u64,
    },
}

impl fmt::Display for SearchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ForeignLink { link_origin } => write!(
                f,
                "the server's next link points to another origin, {link_origin}: not followed, \
                 the search is incomplete"
            ),
            Self::BadLink => f.write_str("the server's next link is not an absolute http(s) URL"),
            Self::LinkLoop { page } => write!(
                f,
                "the next link of page {page} leads to a page already fetched: not followed"
            ),
            Self::Incomplete {
                matches,
                total,
                first_total,
            } => {
                write!(
                    f,
                    "incomplete: the search found {matches} distinct resources, the server \
                     stated a total of {total}"
                )?;
                if first_total != total {
                    write!(f, " (and {first_total} on the first page: data changed)")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for SearchError {}

/// Follows a search's `next` links from `first_page` to the end, handing each page to
/// `on_page`.
///
/// # Errors
///
/// An HTTP error status, a body that is not JSON, a `next` link off the API's origin (that
/// of `first_page`) or back to a page already fetched, or a count of distinct matches other
/// than the last `total` stated ([`SearchError`]); whatever `on_page` returns.
pub(crate) async fn search(
    client: &BlazeClient,
    first_page: &str,
    mut on_page: impl FnMut(&Page<'_>) -> Result<(), BoxError>,
) -> Result<Summary, BoxError> {
    let home = Origin::of(first_page).ok_or("the search URL is not an absolute http(s) URL")?;
    let mut summary = Summary::default();
    let mut first_total = None;
    let mut seen = HashSet::new();
    let mut fetched = HashSet::from([first_page.to_owned()]);
    let mut url = first_page.to_owned();
    loop {
        let bundle = get_json(client, &url).await?;
        summary.pages += 1;
        if let Some(total) = bundle["total"].as_u64() {
            first_total.get_or_insert(total);
            summary.total = Some(total);
        }
        let mut resources = Vec::new();
        for entry in bundle["entry"].as_array().into_iter().flatten() {
            let resource = &entry["resource"];
            // `total` counts matches; `_include`d resources come with mode "include".
            let is_match = entry["search"]["mode"]
                .as_str()
                .is_none_or(|m| m == "match");
            if let (Some(kind), Some(id)) =
                (resource["resourceType"].as_str(), resource["id"].as_str())
            {
                let key = format!("{kind}/{id}");
                if !seen.insert(key.clone()) {
                    if is_match {
                        summary.duplicates.push(key);
                    }
                    continue;
                }
            }
            summary.matches += u64::from(is_match);
            resources.push(resource);
        }
        on_page(&Page {
            number: summary.pages,
            resources,
            matches: summary.matches,
            total: summary.total,
        })?;

        let Some(next) = next_link(&bundle) else {
            break;
        };
        let origin = Origin::of(next).ok_or(SearchError::BadLink)?;
        if origin != home {
            return Err(SearchError::ForeignLink {
                link_origin: origin.to_string(),
            }
            .into());
        }
        if !fetched.insert(next.to_owned()) {
            return Err(SearchError::LinkLoop {
                page: summary.pages,
            }
            .into());
        }
        url = next.to_owned();
    }
    match (summary.total, first_total) {
        (Some(total), Some(first_total)) if total != summary.matches => {
            Err(SearchError::Incomplete {
                matches: summary.matches,
                total,
                first_total,
            }
            .into())
        }
        _ => Ok(summary),
    }
}

/// The URL of a Bundle's `next` link; `"url": null` or no such link is the last page.
fn next_link(bundle: &Value) -> Option<&str> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|link| link["relation"] == "next")?["url"]
        .as_str()
}

/// GETs `url` and returns its JSON; an error status becomes an error with the server's
/// diagnostics.
pub(crate) async fn get_json(client: &BlazeClient, url: &str) -> Result<Value, BoxError> {
    let request = Request::get(url)
        .header("accept", "application/fhir+json")
        .body(Full::<Bytes>::default())?;
    let response = client.clone().oneshot(request).await?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_PAGE_BYTES)
        .collect()
        .await?
        .to_bytes();
    if status != StatusCode::OK {
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        // The server's words, made one short line.
        let diagnostics: String = json["issue"][0]["diagnostics"]
            .as_str()
            .unwrap_or("no details")
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(200)
            .collect();
        let path = url
            .parse::<Uri>()
            .map(|uri| uri.path().to_owned())
            .unwrap_or_default();
        return Err(format!("{path}: {status}: {diagnostics}").into());
    }
    Ok(serde_json::from_slice(&body)?)
}

/// Scheme, host and port of a URL, the default port made explicit.
#[derive(PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    /// `None` unless `url` is an absolute `http` or `https` URL.
    fn of(url: &str) -> Option<Self> {
        let uri: Uri = url.parse().ok()?;
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        Some(Self {
            host: uri.host()?.to_ascii_lowercase(),
            port: uri.port_u16().unwrap_or(default_port),
            scheme,
        })
    }
}

impl fmt::Display for Origin {
    /// Without any user info the URL had.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}
