//! The research study a request is for, and how it goes into the request URI.

use crate::error::Error;
use http::{Uri, uri::PathAndQuery};
use std::{fmt, sync::Arc};

/// The query parameter that names the research study.
const PARAM: &str = "researchstudy";

/// An MSK research study (protocol) number, e.g. `FHIR-T`: Blaze grants data access per study.
///
/// The layer adds `researchstudy=<id>` to every request. A request whose query names a study
/// already keeps it if it is this one, and fails with [`Error::is_study_conflict`] if it is
/// another; the name counts in any letter case and after a `;` as well as an `&`, since some
/// gateways read names without case or split pairs on `;`. To send one request for another
/// study than the layer's, put a `ResearchStudy` in the request's extensions:
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

    /// Puts this study into `uri`'s query.
    ///
    /// The existing query is kept byte for byte and `researchstudy=<id>` appended. A URI that
    /// names this study already (a Blaze paging link does) is left as it is; one that
    /// names another study is an error. See [`named_in`](Self::named_in) for what counts.
    pub(crate) fn add_to(&self, uri: &mut Uri) -> Result<(), Error> {
        let query = uri.query();
        if let Some(query) = query {
            if self.named_in(query)? {
                return Ok(());
            }
        }
        let separator = match query {
            None => "?",
            Some(query) if !query.is_empty() && !query.ends_with('&') => "&",
            Some(_) => "",
        };
        let path_and_query = match uri.path_and_query() {
            Some(path_and_query) if path_and_query.path().starts_with('/') => {
                path_and_query.as_str()
            }
            // Authority form (CONNECT) or asterisk form (`OPTIONS *`).
            _ => return Err(Error::invalid_uri(None)),
        };
        let mut new = String::with_capacity(path_and_query.len() + 1 + self.inner.pair.len());
        new.push_str(path_and_query);
        new.push_str(separator);
        new.push_str(&self.inner.pair);
        let path_and_query =
            PathAndQuery::try_from(new).map_err(|error| Error::invalid_uri(Some(error.into())))?;
        let mut parts = std::mem::take(uri).into_parts();
        parts.path_and_query = Some(path_and_query);
        let rebuilt =
            Uri::from_parts(parts).map_err(|error| Error::invalid_uri(Some(error.into())))?;
        // What `take` left is `Uri::default()`, static bytes that need no drop: not dropping
        // it saves three calls through `Bytes`' vtable on every request (tests/memory.rs
        // would see a leak if it ever owned memory).
        std::mem::forget(std::mem::replace(uri, rebuilt));
        Ok(())
    }

    /// Whether `query` names this study already; an error if it names another.
    ///
    /// The name counts in any ASCII case (`ResearchStudy=`, as gateways that read names
    /// without case see it), percent-encoded or not, and `;` separates pairs as `&` does
    /// (as some gateways split them): a name that any of those readings sees is ours, so no
    /// server can see two studies. The value must be the study id exactly.
    fn named_in(&self, query: &str) -> Result<bool, Error> {
        // A name decodes to ours only if it is ours as it stands (in some case) or has a
        // percent escape (`+` decodes to a space). Most queries have neither, and cost one
        // quick scan; in the others, only such names, and their values, are decoded.
        if !may_name_study(query) {
            return Ok(false);
        }
        let mut present = false;
        for pair in query.as_bytes().split(|&b| b == b'&' || b == b';') {
            let (raw_name, raw_value) = match pair.iter().position(|&b| b == b'=') {
                Some(at) => (&pair[..at], &pair[at + 1..]),
                None => (pair, &[][..]),
            };
            let ours_as_it_stands = raw_name.eq_ignore_ascii_case(PARAM.as_bytes());
            if !ours_as_it_stands && !raw_name.contains(&b'%') {
                continue;
            }
            // Our name with a value that has nothing to decode (a paging link's): the value
            // is compared as it stands; the decoding below cost a paging link 1,149
            // instructions more (callgrind, the overhead bench's f).
            if ours_as_it_stands && !raw_value.iter().any(|&b| b == b'%' || b == b'+') {
                if raw_value != self.inner.id.as_bytes() {
                    return Err(Error::study_conflict());
                }
                present = true;
                continue;
            }
            for (name, value) in form_urlencoded::parse(pair) {
                if name.eq_ignore_ascii_case(PARAM) {
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

/// Whether `query` may name a study: it has a percent escape, or a pair (split at `&` and
/// `;`) whose name starts with [`PARAM`] in any ASCII case. Only such a name can be ours.
///
/// Every request pays for this scan, so it reads the query eight bytes at a time, goes
/// straight to the `%`, `&` and `;` a word holds, and compares our name only after a
/// separator whose next byte is an `r` or `R`.
fn may_name_study(query: &str) -> bool {
    let bytes = query.as_bytes();
    let param_at = |at: usize| {
        bytes.get(at).is_some_and(|&first| first | 0x20 == b'r')
            && bytes
                .get(at..at + PARAM.len())
                .is_some_and(|name| name.eq_ignore_ascii_case(PARAM.as_bytes()))
    };
    // The byte at `at`: a `%`, or a separator before our name.
    let closer = |at: usize| match bytes[at] {
        b'%' => true,
        b'&' | b';' => param_at(at + 1),
        _ => false,
    };
    if param_at(0) {
        return true;
    }
    const LOW_TWO_BITS: u64 = u64::from_le_bytes([0x03; 8]);
    let mut words = bytes.chunks_exact(8);
    let mut offset = 0;
    for part in &mut words {
        let word = u64::from_le_bytes(part.try_into().expect("chunks of eight"));
        // `%` (0x25) and `&` (0x26) in one test: with the two low bits set, both are 0x27, as
        // are `$` and `'`, which `closer` then rejects.
        let mut found = bytes_equal(word | LOW_TWO_BITS, b'\'') | bytes_equal(word, b';');
        while found != 0 {
            // The lowest flag is always a true match; a higher one may be a false alarm,
            // which `closer` rejects as it reads the byte.
            let at = offset + found.trailing_zeros() as usize / 8;
            if closer(at) {
                return true;
            }
            found &= found - 1;
        }
        offset += 8;
    }
    (offset..bytes.len()).any(closer)
}

/// The high bit of each of the eight bytes of `word` that is `byte` (the classic bit trick: a
/// byte of `word ^ byte`s is zero only where they are equal). Every equal byte is flagged; a
/// byte above a flagged one may be flagged too without being equal.
fn bytes_equal(word: u64, byte: u8) -> u64 {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);
    let x = word ^ (ONES * u64::from(byte));
    x.wrapping_sub(ONES) & !x & HIGHS
}

/// Whether `haystack` contains `needle` (ASCII) in any ASCII case.
#[cfg(feature = "oauth2")]
pub(crate) fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|window| window.eq_ignore_ascii_case(needle.as_bytes()))
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
        let mut uri: Uri = uri.parse().unwrap();
        ResearchStudy::new(study).unwrap().add_to(&mut uri)?;
        Ok(uri.to_string())
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
        // So do names in another case, and pairs after a `;`.
        for same in [
            "/Patient?ResearchStudy=FHIR-T",
            "/Patient?page=2;RESEARCHSTUDY=FHIR-T",
        ] {
            assert_eq!(add("FHIR-T", same).unwrap(), same);
        }
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
        // Gateways that read names without case, or split on `;`, would see two studies.
        for other in [
            "/Patient?ResearchStudy=OTHER",
            "/Patient?RESEARCHSTUDY=OTHER&page=2",
            "/Patient?page=2;researchstudy=OTHER",
            "/Patient?researchStudy=FHIR-T&researchstudy=OTHER",
        ] {
            assert!(
                add("FHIR-T", other).unwrap_err().is_study_conflict(),
                "{other}"
            );
        }
        // A parameter whose name merely contains ours is another parameter.
        assert_eq!(
            add("S", "/Patient?xresearchstudy=OTHER").unwrap(),
            "/Patient?xresearchstudy=OTHER&researchstudy=S"
        );
    }

    #[test]
    fn the_quick_scan_agrees_with_decoding_every_pair() {
        // `named_in` decodes only the pairs whose raw name may be ours, and of those only
        // the values with something to decode; decoding every pair must give the same answer.
        for (id, queries) in [("A B", DECODED), ("FHIR-T", AS_THEY_STAND)] {
            let study = ResearchStudy::new(id).unwrap();
            for query in queries {
                assert_eq!(
                    study.named_in(query).map_err(drop),
                    named_after_decoding_every_pair(id, query),
                    "{id:?} in {query:?}"
                );
            }
        }
    }

    /// Queries for the study "A B", which reads as such only decoded (`A+B`, `A%20B`).
    const DECODED: &[&str] = &[
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
        "ResearchStudy=OTHER",
        "RESEARCHSTUDY=A+B",
        "a=1;researchstudy=OTHER",
        "a=1;ReSearch%53tudy=A+B&b=2",
        "researchstudy=A+B;researchstudy=OTHER",
    ];

    /// Queries with study values that read as they stand, "FHIR-T" or another.
    const AS_THEY_STAND: &[&str] = &[
        "researchstudy=FHIR-T",
        "researchstudy=FHIR-T&_count=50&__page-id=AAAA",
        "ResearchStudy=FHIR-T",
        "researchstudy=FHIR-t",
        "researchstudy=FHIR-T=",
        "researchstudy=FHIR-TX",
        "researchstudy=FHIR",
        "researchstudy",
        "researchstudy=",
        "researchstudy=FHIR%2DT",
        "researchstudy=FHIR%2dT&a=1",
        "researchstudy=FHIR+T",
        "research%73tudy=FHIR-T",
        "RESEARCHSTUDY=OTHER;researchstudy=FHIR-T",
        "researchstudy=FHIR-T;researchstudy=FHIR-T",
        "a=researchstudy=FHIR-T&b=1",
    ];

    /// [`ResearchStudy::named_in`] the slow way: every pair decoded, split at `;` and `&`.
    fn named_after_decoding_every_pair(id: &str, query: &str) -> Result<bool, ()> {
        let mut present = false;
        let pairs = query
            .split(';')
            .flat_map(|part| form_urlencoded::parse(part.as_bytes()));
        for (name, value) in pairs {
            if name.to_ascii_lowercase() == PARAM {
                if value != id {
                    return Err(());
                }
                present = true;
            }
        }
        Ok(present)
    }

    #[test]
    fn uris_without_a_path_are_rejected() {
        assert!(add("S", "*").unwrap_err().is_invalid_uri());
        assert!(add("S", "blaze.example:443").unwrap_err().is_invalid_uri());
    }

    #[test]
    fn the_word_scan_finds_every_separator_and_escape() {
        for byte in 0..=255u8 {
            for at in 0..8 {
                let mut word = [b'x'; 8];
                word[at] = byte;
                let found = bytes_equal(u64::from_le_bytes(word), b'&');
                let expected = if byte == b'&' { 0x80 << (8 * at) } else { 0 };
                assert_eq!(found, expected, "{byte} at {at}");
                // With a `&` in every other place too, every one of them is flagged.
                let mut word = [b'&'; 8];
                word[at] = byte;
                let found = bytes_equal(u64::from_le_bytes(word), b'&');
                for other in (0..8).filter(|&other| other != at) {
                    assert_ne!(found & 0x80 << (8 * other), 0, "{byte} at {at}, {other}");
                }
            }
        }
        // Several separators in one word: the scan looks past those before other names.
        assert!(may_name_study("a&b;c&researchstudy=X"));
        assert!(may_name_study("&;&;&;&researchStudy=X"));
        assert!(!may_name_study("a&b;c&d&e;f&g;h&rr&RR&research"));
        // A separator in each position of a word, and in the tail after the last word.
        for len in 0..24 {
            let before = "a".repeat(len);
            assert!(
                may_name_study(&format!("{before}&ResearchStudy=X")),
                "{len}"
            );
            assert!(
                may_name_study(&format!("{before};researchstudy=X")),
                "{len}"
            );
            assert!(may_name_study(&format!("{before}%72")), "{len}");
            assert!(!may_name_study(&format!("{before}&researchstud")), "{len}");
            assert!(!may_name_study(&format!("{before}=researchstudy")), "{len}");
        }
        assert!(may_name_study("RESEARCHSTUDY=X&a=1"));
    }

    #[test]
    fn invalid_ids_are_rejected() {
        for id in ["", " S", "S\n", "S\tT", "\u{7f}"] {
            assert!(ResearchStudy::new(id).unwrap_err().is_config(), "{id:?}");
        }
        assert_eq!(ResearchStudy::new("FHIR T").unwrap().as_str(), "FHIR T");
    }
}
