//! The research study a request is for, and how it goes into the request URI.

use crate::error::Error;
use http::{Uri, uri::PathAndQuery};
use std::{fmt, sync::Arc};

/// The query parameter that names the research study.
const PARAM: &str = "researchstudy";

/// An MSK research study (protocol) number, e.g. `FHIR-T`: Blaze grants data access per study.
///
/// The layer adds `researchstudy=<id>` to every request. To send one request for another study
/// than the layer's, put a `ResearchStudy` in the request's extensions:
///
/// ```
/// use blaze_auth::ResearchStudy;
///
/// let mut request = http::Request::get("/Patient").body(()).unwrap();
/// request.extensions_mut().insert(ResearchStudy::new("12-345")?);
/// # Ok::<_, blaze_auth::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ResearchStudy {
    inner: Arc<StudyInner>,
}

#[derive(PartialEq, Eq, Hash)]
struct StudyInner {
    id: Box<str>,
    /// `researchstudy=<id, form-urlencoded>`, ready to append.
    pair: Box<str>,
}

impl ResearchStudy {
    /// A study id.
    ///
    /// # Errors
    ///
    /// If `id` is empty, starts or ends with white space, or has a control character: all
    /// signs of a configuration mistake (a trailing newline from a file, say).
    pub fn new(id: &str) -> Result<Self, Error> {
        let valid = !id.is_empty() && id.trim() == id && !id.chars().any(char::is_control);
        if !valid {
            return Err(Error::invalid_study());
        }
        let pair = form_urlencoded::Serializer::new(String::new())
            .append_pair(PARAM, id)
            .finish();
        Ok(Self {
            inner: Arc::new(StudyInner {
                id: id.into(),
                pair: pair.into(),
            }),
        })
    }

    /// The study id, as given.
    pub fn as_str(&self) -> &str {
        &self.inner.id
    }

    /// Returns `uri` with this study in its query.
    ///
    /// The existing query is kept byte for byte and `researchstudy=<id>` appended. A URI that
    /// names this study already (a Blaze paging link does) is returned as it is; one that
    /// names another study is an error.
    pub(crate) fn add_to(&self, uri: Uri) -> Result<Uri, Error> {
        let query = uri.query();
        if let Some(query) = query {
            if self.named_in(query)? {
                return Ok(uri);
            }
        }
        let separator = match query {
            None => "?",
            Some(query) if !query.is_empty() && !query.ends_with('&') => "&",
            Some(_) => "",
        };
        let mut parts = uri.into_parts();
        let path_and_query = match (&parts.path_and_query, &parts.scheme) {
            (Some(path_and_query), _) if path_and_query.path().starts_with('/') => {
                path_and_query.as_str()
            }
            // `http://host` has no path in its parts; the request goes to `/`.
            (None, Some(_)) => "/",
            // Authority form (CONNECT) or asterisk form (`OPTIONS *`).
            _ => return Err(Error::invalid_uri(None)),
        };
        let mut new = String::with_capacity(path_and_query.len() + 1 + self.inner.pair.len());
        new.push_str(path_and_query);
        new.push_str(separator);
        new.push_str(&self.inner.pair);
        parts.path_and_query = Some(
            PathAndQuery::try_from(new).map_err(|error| Error::invalid_uri(Some(error.into())))?,
        );
        Uri::from_parts(parts).map_err(|error| Error::invalid_uri(Some(error.into())))
    }

    /// Whether `query` names this study already; an error if it names another.
    fn named_in(&self, query: &str) -> Result<bool, Error> {
        // A name decodes to ours only if it is ours as it stands or has a percent escape
        // (`+` decodes to a space). Most queries have neither, and cost two quick scans; in
        // the others, only such names, and their values, are decoded.
        if !query.contains('%') && !query.contains(PARAM) {
            return Ok(false);
        }
        let mut present = false;
        for pair in query.as_bytes().split(|&b| b == b'&') {
            let raw_name = pair.split(|&b| b == b'=').next().unwrap_or_default();
            if raw_name != PARAM.as_bytes() && !raw_name.contains(&b'%') {
                continue;
            }
            for (name, value) in form_urlencoded::parse(pair) {
                if name == PARAM {
                    if *value != *self.inner.id {
                        return Err(Error::study_conflict());
                    }
                    present = true;
                }
            }
        }
        Ok(present)
    }
}

impl fmt::Debug for ResearchStudy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ResearchStudy")
            .field(&self.as_str())
            .finish()
    }
}

impl fmt::Display for ResearchStudy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(study: &str, uri: &str) -> Result<String, Error> {
        let uri: Uri = uri.parse().unwrap();
        ResearchStudy::new(study)
            .unwrap()
            .add_to(uri)
            .map(|uri| uri.to_string())
    }

    #[test]
    fn existing_query_is_preserved_byte_for_byte() {
        let query = "code=http://loinc.org|777-3,http://loinc.org|751-8&date=ge2020-01-01&_count=50&_format=json&x=%2F%7C+y";
        let uri = format!("/msk-apim/external/v2/crit/blaze/api/Observation?{query}");
        assert_eq!(
            add("FHIR-T", &uri).unwrap(),
            format!("{uri}&researchstudy=FHIR-T")
        );
    }

    #[test]
    fn absolute_uris_keep_scheme_authority_and_path() {
        assert_eq!(
            add("FHIR-T", "https://blaze.example:8443/api/Patient?_count=2").unwrap(),
            "https://blaze.example:8443/api/Patient?_count=2&researchstudy=FHIR-T"
        );
        assert_eq!(
            add("FHIR-T", "https://blaze.example").unwrap(),
            "https://blaze.example/?researchstudy=FHIR-T"
        );
    }

    #[test]
    fn empty_query_and_trailing_ampersand_get_no_extra_separator() {
        assert_eq!(add("S", "/Patient").unwrap(), "/Patient?researchstudy=S");
        assert_eq!(add("S", "/Patient?").unwrap(), "/Patient?researchstudy=S");
        assert_eq!(
            add("S", "/Patient?a=1&").unwrap(),
            "/Patient?a=1&researchstudy=S"
        );
    }

    #[test]
    fn odd_study_ids_are_percent_encoded() {
        assert_eq!(
            add("A&B=C/D+E é#?", "/Patient").unwrap(),
            "/Patient?researchstudy=A%26B%3DC%2FD%2BE+%C3%A9%23%3F"
        );
        let encoded = add("A&B=C/D+E é#?", "/Patient").unwrap();
        let query = encoded.split_once('?').unwrap().1;
        let decoded: Vec<_> = form_urlencoded::parse(query.as_bytes()).collect();
        assert_eq!(decoded, [("researchstudy".into(), "A&B=C/D+E é#?".into())]);
    }

    #[test]
    fn same_study_in_the_uri_is_not_added_twice() {
        let next = "https://h/api/Patient?researchstudy=FHIR-T&page=2&_count=50";
        assert_eq!(add("FHIR-T", next).unwrap(), next);
        // Encoded forms of the same id count as the same study.
        let encoded = "/Patient?research%73tudy=A%20B&researchstudy=A+B";
        assert_eq!(add("A B", encoded).unwrap(), encoded);
    }

    #[test]
    fn different_study_in_the_uri_is_a_conflict() {
        let error = add("FHIR-T", "/Patient?page=2&researchstudy=OTHER").unwrap_err();
        assert!(error.is_study_conflict());
        let mixed = add(
            "FHIR-T",
            "/Patient?researchstudy=FHIR-T&researchstudy=OTHER",
        );
        assert!(mixed.unwrap_err().is_study_conflict());
        // A parameter whose name merely contains ours is another parameter.
        assert_eq!(
            add("S", "/Patient?xresearchstudy=OTHER").unwrap(),
            "/Patient?xresearchstudy=OTHER&researchstudy=S"
        );
    }

    #[test]
    fn the_quick_scan_agrees_with_decoding_every_pair() {
        // `named_in` decodes only the pairs whose raw name may be ours; decoding them all
        // must give the same answer.
        let study = ResearchStudy::new("A B").unwrap();
        let full = |query: &str| -> Result<bool, ()> {
            let mut present = false;
            for (name, value) in form_urlencoded::parse(query.as_bytes()) {
                if name == PARAM {
                    if value != "A B" {
                        return Err(());
                    }
                    present = true;
                }
            }
            Ok(present)
        };
        for query in [
            "",
            "&",
            "a=1&b=2",
            "researchstudy",
            "researchstudy=",
            "researchstudy=A+B",
            "researchstudy=A%20B&x=%41",
            "x=researchstudy&y=researchstudy%3DOTHER",
            "research%73tudy=A+B",
            "research%73tudy=OTHER&a=1",
            "%72esearchstudy",
            "researchstudy+=A+B",
            "research+study=A+B",
            "a=1&&researchstudy=A+B&",
            "researchstudy=A+B=C",
            "=researchstudy&researchstudy%=A+B",
            "x%=1&researchstudy%3D=A+B",
        ] {
            assert_eq!(
                study.named_in(query).map_err(drop),
                full(query),
                "{query:?}"
            );
        }
    }

    #[test]
    fn uris_without_a_path_are_rejected() {
        assert!(add("S", "*").unwrap_err().is_invalid_uri());
        assert!(add("S", "blaze.example:443").unwrap_err().is_invalid_uri());
    }

    #[test]
    fn invalid_ids_are_rejected() {
        for id in ["", " S", "S\n", "S\tT", "\u{7f}"] {
            assert!(ResearchStudy::new(id).unwrap_err().is_config(), "{id:?}");
        }
        assert_eq!(ResearchStudy::new("FHIR T").unwrap().as_str(), "FHIR T");
    }
}
