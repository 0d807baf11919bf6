//! The Blaze stand-in over real sockets, with a plain hyper-util client.

#![cfg(feature = "testing")]

use blaze_auth::testing::{
    ApiFailure, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, DEMO_STUDY, StandIn, TokenFailure,
};
use bytes::Bytes;
use http::{
    HeaderMap, Method, Request, StatusCode, Uri,
    header::{ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE},
};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, Error as ClientError},
    rt::TokioExecutor,
};
use serde_json::Value;
use std::{collections::BTreeSet, io, time::Duration};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const FORM: &str = "application/x-www-form-urlencoded";
const FHIR_JSON: &str = "application/fhir+json";
const PLATELETS: &str = "http://loinc.org|777-3";
const NEUTROPHILS: &str = "http://loinc.org|751-8";

// ---- token endpoint ----

#[tokio::test]
async fn token_response_has_blazes_shape() {
    let stand_in = StandIn::start().await.unwrap();

    let answer = post_form(&stand_in, &demo_form()).await;

    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers[CONTENT_TYPE], "application/json");
    assert_eq!(answer.headers[CACHE_CONTROL], "no-store");
    assert!(
        answer
            .body
            .starts_with(b"{\"token_type\":\"Bearer\",\"access_token\":\""),
        "{:?}",
        answer.body
    );
    let json = answer.json();
    let fields: BTreeSet<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        BTreeSet::from([
            "access_token",
            "consented_on",
            "expires_in",
            "scope",
            "token_type"
        ])
    );
    assert_eq!(json["token_type"], "Bearer");
    assert_eq!(json["scope"], "full");
    assert_eq!(json["expires_in"], 3600);
    assert!(json["consented_on"].as_u64().unwrap() > 1_600_000_000);
    let token = json["access_token"].as_str().unwrap();
    assert_eq!(token.len(), 170);
    assert!(
        token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
        "{token}"
    );
    assert_eq!(stand_in.token_requests(), 1);
    assert_eq!(stand_in.tokens_issued(), 1);
}

#[tokio::test]
async fn every_token_is_new() {
    let stand_in = StandIn::start().await.unwrap();

    let first = fetch_token(&stand_in).await;
    let second = fetch_token(&stand_in).await;

    assert_ne!(first, second);
}

#[tokio::test]
async fn basic_authentication_with_form_encoded_credentials_is_accepted() {
    let (id, secret) = ("partner app", "s3:cr&t+%/é");
    let stand_in = StandIn::builder()
        .client(id, secret, &["12-345"])
        .start()
        .await
        .unwrap();

    let answer = post(
        &stand_in,
        "grant_type=client_credentials&scope=full",
        &[(AUTHORIZATION.as_str(), &basic(id, secret))],
    )
    .await;

    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let token = answer.json()["access_token"].as_str().unwrap().to_owned();
    let study = get(&stand_in, "Patient?researchstudy=12-345", Some(&token)).await;
    assert_eq!(study.status, StatusCode::OK);
}

#[tokio::test]
async fn wrong_basic_secret_is_invalid_client_with_a_basic_challenge() {
    let stand_in = StandIn::start().await.unwrap();

    let answer = post(
        &stand_in,
        "grant_type=client_credentials",
        &[(
            AUTHORIZATION.as_str(),
            &basic(DEMO_CLIENT_ID, "not-the-secret"),
        )],
    )
    .await;

    assert_oauth_error(&answer, StatusCode::UNAUTHORIZED, "invalid_client");
    assert!(
        answer.headers[WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .starts_with("Basic ")
    );
}

#[tokio::test]
async fn basic_and_body_secret_together_is_invalid_request() {
    let stand_in = StandIn::start().await.unwrap();

    let answer = post(
        &stand_in,
        &demo_form(),
        &[(
            AUTHORIZATION.as_str(),
            &basic(DEMO_CLIENT_ID, DEMO_CLIENT_SECRET),
        )],
    )
    .await;

    assert_oauth_error(&answer, StatusCode::BAD_REQUEST, "invalid_request");
}

#[tokio::test]
async fn wrong_secret_is_invalid_client_without_echoing_the_secret() {
    let stand_in = StandIn::start().await.unwrap();

    let answer = post_form(
        &stand_in,
        "grant_type=client_credentials&client_id=demo-client&client_secret=hunter2&scope=full",
    )
    .await;

    assert_oauth_error(&answer, StatusCode::UNAUTHORIZED, "invalid_client");
    assert!(!String::from_utf8_lossy(&answer.body).contains("hunter2"));
    assert_eq!(stand_in.tokens_issued(), 0);
}

#[tokio::test]
async fn unknown_client_is_invalid_client() {
    let stand_in = StandIn::start().await.unwrap();

    let answer = post_form(
        &stand_in,
        "grant_type=client_credentials&client_id=stranger&client_secret=demo-secret",
    )
    .await;

    assert_oauth_error(&answer, StatusCode::UNAUTHORIZED, "invalid_client");
}

#[tokio::test]
async fn missing_client_credentials_are_invalid_client() {
    let stand_in = StandIn::start().await.unwrap();

    for form in [
        "grant_type=client_credentials&scope=full",
        "grant_type=client_credentials&client_secret=demo-secret",
    ] {
        let answer = post_form(&stand_in, form).await;
        assert_oauth_error(&answer, StatusCode::UNAUTHORIZED, "invalid_client");
    }
}

#[tokio::test]
async fn client_of_the_builder_replaces_the_demo_client() {
    let stand_in = StandIn::builder()
        .client("app", "app-secret", &["S"])
        .start()
        .await
        .unwrap();

    let demo = post_form(&stand_in, &demo_form()).await;
    let app = post_form(
        &stand_in,
        "grant_type=client_credentials&client_id=app&client_secret=app-secret",
    )
    .await;

    assert_oauth_error(&demo, StatusCode::UNAUTHORIZED, "invalid_client");
    assert_eq!(app.status, StatusCode::OK);
}

#[tokio::test]
async fn other_grant_type_is_unsupported_grant_type() {
    let stand_in = StandIn::start().await.unwrap();

    let answer = post_form(
        &stand_in,
        "grant_type=password&client_id=demo-client&client_secret=demo-secret",
    )
    .await;

    assert_oauth_error(&answer, StatusCode::BAD_REQUEST, "unsupported_grant_type");
}

#[tokio::test]
async fn missing_grant_type_is_invalid_request() {
    let stand_in = StandIn::start().await.unwrap();

    let answer = post_form(&stand_in, "client_id=demo-client&client_secret=demo-secret").await;

    assert_oauth_error(&answer, StatusCode::BAD_REQUEST, "invalid_request");
}

#[tokio::test]
async fn repeated_parameter_is_invalid_request() {
    let stand_in = StandIn::start().await.unwrap();

    let answer = post_form(&stand_in, &format!("{}&scope=full", demo_form())).await;

    assert_oauth_error(&answer, StatusCode::BAD_REQUEST, "invalid_request");
}

#[tokio::test]
async fn scope_other_than_full_is_invalid_scope_and_none_means_full() {
    let stand_in = StandIn::start().await.unwrap();
    let without_scope =
        "grant_type=client_credentials&client_id=demo-client&client_secret=demo-secret";

    let other = post_form(&stand_in, &format!("{without_scope}&scope=openid")).await;
    let none = post_form(&stand_in, without_scope).await;

    assert_oauth_error(&other, StatusCode::BAD_REQUEST, "invalid_scope");
    assert_eq!(none.status, StatusCode::OK);
    assert_eq!(none.json()["scope"], "full");
}

#[tokio::test]
async fn token_endpoint_takes_only_a_posted_form() {
    let stand_in = StandIn::start().await.unwrap();

    let get = send(request(Method::GET, &stand_in.token_url(), "", &[]))
        .await
        .unwrap();
    let json = post(
        &stand_in,
        "{}",
        &[(CONTENT_TYPE.as_str(), "application/json")],
    )
    .await;

    assert_oauth_error(&get, StatusCode::METHOD_NOT_ALLOWED, "invalid_request");
    assert_eq!(get.headers[ALLOW], "POST");
    assert_oauth_error(&json, StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(stand_in.token_requests(), 2);
    assert_eq!(stand_in.tokens_issued(), 0);
}

// ---- API: checks ----

#[tokio::test]
async fn api_without_token_is_401_with_invalid_token_challenge() {
    let stand_in = StandIn::start().await.unwrap();

    let answer = get(&stand_in, "Patient?researchstudy=FHIR-T", None).await;

    assert_invalid_token(&answer);
    assert_eq!(stand_in.unauthorized_served(), 1);
}

#[tokio::test]
async fn unknown_token_is_401() {
    let stand_in = StandIn::start().await.unwrap();

    let answer = get(&stand_in, "Patient?researchstudy=FHIR-T", Some("made-up")).await;

    assert_invalid_token(&answer);
}

#[tokio::test]
async fn revoked_token_is_401_and_a_new_one_works() {
    let stand_in = StandIn::start().await.unwrap();
    let token = fetch_token(&stand_in).await;
    let before = get(&stand_in, "Patient?researchstudy=FHIR-T", Some(&token)).await;

    stand_in.revoke_all_tokens();

    let after = get(&stand_in, "Patient?researchstudy=FHIR-T", Some(&token)).await;
    let renewed = fetch_token(&stand_in).await;
    let again = get(&stand_in, "Patient?researchstudy=FHIR-T", Some(&renewed)).await;
    assert_eq!(before.status, StatusCode::OK);
    assert_invalid_token(&after);
    assert_eq!(again.status, StatusCode::OK);
}

#[tokio::test]
async fn expired_token_is_401_and_a_new_one_works() {
    let stand_in = StandIn::start().await.unwrap();
    let token = fetch_token(&stand_in).await;

    stand_in.expire_all_tokens();

    let after = get(&stand_in, "Patient?researchstudy=FHIR-T", Some(&token)).await;
    let renewed = fetch_token(&stand_in).await;
    let again = get(&stand_in, "Patient?researchstudy=FHIR-T", Some(&renewed)).await;
    assert_invalid_token(&after);
    assert!(
        after.json()["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("expired")
    );
    assert_eq!(again.status, StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn token_expires_after_its_lifetime_on_tokios_clock() {
    let stand_in = StandIn::builder()
        .token_lifetime(Duration::from_secs(60))
        .start()
        .await
        .unwrap();
    let answer = post_form(&stand_in, &demo_form()).await;
    assert_eq!(answer.json()["expires_in"], 60);
    let token = answer.json()["access_token"].as_str().unwrap().to_owned();
    let fresh = get(&stand_in, "metadata?researchstudy=FHIR-T", Some(&token)).await;

    tokio::time::advance(Duration::from_secs(60)).await;

    let stale = get(&stand_in, "metadata?researchstudy=FHIR-T", Some(&token)).await;
    assert_eq!(fresh.status, StatusCode::OK);
    assert_invalid_token(&stale);
}

#[tokio::test]
async fn missing_or_wrong_partner_id_is_401_without_invalid_token() {
    let stand_in = StandIn::builder()
        .require_partner_id("partner-42")
        .start()
        .await
        .unwrap();
    let token = fetch_token(&stand_in).await;
    let url = format!("{}/Patient?researchstudy=FHIR-T", stand_in.api_url());

    let missing = send(api_request(&url, Some(&token), &[])).await.unwrap();
    let wrong = send(api_request(
        &url,
        Some(&token),
        &[("x-partnerid", "partner-7")],
    ))
    .await
    .unwrap();
    let right = send(api_request(
        &url,
        Some(&token),
        &[("x-partnerid", "partner-42")],
    ))
    .await
    .unwrap();

    for answer in [&missing, &wrong] {
        assert_outcome(answer, StatusCode::UNAUTHORIZED, "login");
        assert!(!answer.headers.contains_key(WWW_AUTHENTICATE));
    }
    assert_eq!(right.status, StatusCode::OK);
    assert_eq!(stand_in.unauthorized_served(), 2);
}

#[tokio::test]
async fn missing_researchstudy_is_400() {
    let stand_in = StandIn::start().await.unwrap();
    let token = fetch_token(&stand_in).await;

    let missing = get(&stand_in, "Patient?_count=10", Some(&token)).await;
    let empty = get(&stand_in, "Patient?researchstudy=", Some(&token)).await;

    assert_outcome(&missing, StatusCode::BAD_REQUEST, "required");
    assert_outcome(&empty, StatusCode::BAD_REQUEST, "required");
}

#[tokio::test]
async fn researchstudy_given_twice_is_400() {
    let stand_in = StandIn::start().await.unwrap();
    let token = fetch_token(&stand_in).await;

    let answer = get(
        &stand_in,
        "Patient?researchstudy=FHIR-T&researchstudy=FHIR-T",
        Some(&token),
    )
    .await;

    assert_outcome(&answer, StatusCode::BAD_REQUEST, "invalid");
}

#[tokio::test]
async fn study_the_client_may_not_see_is_403() {
    let stand_in = StandIn::builder()
        .client("a", "a-secret", &["STUDY-A"])
        .client("b", "b-secret", &["STUDY-B"])
        .start()
        .await
        .unwrap();
    let answer = post_form(
        &stand_in,
        "grant_type=client_credentials&client_id=a&client_secret=a-secret",
    )
    .await;
    let token = answer.json()["access_token"].as_str().unwrap().to_owned();

    let own = get(&stand_in, "Patient?researchstudy=STUDY-A", Some(&token)).await;
    let other = get(&stand_in, "Patient?researchstudy=STUDY-B", Some(&token)).await;

    assert_eq!(own.status, StatusCode::OK);
    assert_outcome(&other, StatusCode::FORBIDDEN, "forbidden");
}

#[tokio::test]
async fn unknown_resource_type_or_id_is_404() {
    let stand_in = StandIn::start().await.unwrap();
    let token = fetch_token(&stand_in).await;

    let unknown_type = get(&stand_in, "Spaceship?researchstudy=FHIR-T", Some(&token)).await;
    let unknown_id = get(
        &stand_in,
        "Patient/p-9999?researchstudy=FHIR-T",
        Some(&token),
    )
    .await;

    assert_outcome(&unknown_type, StatusCode::NOT_FOUND, "not-found");
    assert_outcome(&unknown_id, StatusCode::NOT_FOUND, "not-found");
}

// ---- API: data ----

#[tokio::test]
async fn read_returns_the_resource() {
    let stand_in = StandIn::start().await.unwrap();
    let token = fetch_token(&stand_in).await;

    let patient = get(
        &stand_in,
        "Patient/p-0007?researchstudy=FHIR-T",
        Some(&token),
    )
    .await;
    let observation = get(
        &stand_in,
        "Observation/o-0014?researchstudy=FHIR-T",
        Some(&token),
    )
    .await;
    let group = get(&stand_in, "Group/g-0001?researchstudy=FHIR-T", Some(&token)).await;

    assert_eq!(patient.status, StatusCode::OK);
    assert_eq!(patient.headers[CONTENT_TYPE], FHIR_JSON);
    let patient = patient.json();
    assert_eq!(patient["resourceType"], "Patient");
    assert_eq!(patient["id"], "p-0007");
    assert!(patient["name"][0]["family"].is_string());
    assert!(["female", "male", "other"].contains(&patient["gender"].as_str().unwrap()));
    assert_eq!(patient["birthDate"].as_str().unwrap().len(), 10);
    let observation = observation.json();
    assert_eq!(observation["subject"]["reference"], "Patient/p-0007");
    assert_eq!(observation["code"]["coding"][0]["code"], "751-8");
    assert!(observation["valueQuantity"]["value"].is_number());
    assert!(observation["effectiveDateTime"].is_string());
    let group = group.json();
    assert_eq!(group["quantity"], 250);
    assert_eq!(group["member"].as_array().unwrap().len(), 250);
}

#[tokio::test]
async fn metadata_is_a_capability_statement() {
    let stand_in = StandIn::start().await.unwrap();
    let token = fetch_token(&stand_in).await;

    let answer = get(&stand_in, "metadata?researchstudy=FHIR-T", Some(&token)).await;

    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers[CONTENT_TYPE], FHIR_JSON);
    assert_eq!(answer.json()["resourceType"], "CapabilityStatement");
}

#[tokio::test]
async fn paging_with_count_37_visits_every_patient_once() {
    let stand_in = StandIn::start().await.unwrap();
    let token = fetch_token(&stand_in).await;
    let patient_url = format!("{}/Patient", stand_in.api_url());
    let mut next = Some(format!("{patient_url}?researchstudy=FHIR-T&_count=37"));
    let mut ids = Vec::new();
    let mut pages = 0;

    while let Some(url) = next {
        let answer = send(api_request(&url, Some(&token), &[])).await.unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        let bundle = answer.json();
        assert_eq!(bundle["resourceType"], "Bundle");
        assert_eq!(bundle["type"], "searchset");
        assert_eq!(bundle["total"], 250);
        assert_eq!(bundle["link"].as_array().unwrap().len(), 5);
        if pages == 0 {
            assert_eq!(link(&bundle, "previous"), None);
        }
        for entry in bundle["entry"].as_array().unwrap() {
            let id = entry["resource"]["id"].as_str().unwrap().to_owned();
            assert_eq!(entry["fullUrl"], format!("{patient_url}/{id}"));
            ids.push(id);
        }
        next = link(&bundle, "next");
        if let Some(next) = &next {
            assert!(next.starts_with(&format!("{patient_url}?")), "{next}");
            let params = query_params(next);
            assert_eq!(values(&params, "researchstudy"), [DEMO_STUDY], "{next}");
            assert_eq!(values(&params, "_count"), ["37"], "{next}");
            assert_eq!(values(&params, "page"), [(pages + 2).to_string()], "{next}");
        }
        pages += 1;
    }

    assert_eq!(pages, 7);
    let expected: Vec<String> = (1..=250).map(|n| format!("p-{n:04}")).collect();
    assert_eq!(ids, expected);
}

#[tokio::test]
async fn observation_code_filter_matches_exactly_and_round_trips_through_links() {
    let stand_in = StandIn::start().await.unwrap();
    let token = fetch_token(&stand_in).await;
    let encoded = |code: &str| form_urlencoded::byte_serialize(code.as_bytes()).collect::<String>();

    let platelets = get(
        &stand_in,
        &format!(
            "Observation?code={}&researchstudy=FHIR-T&_count=100",
            encoded(PLATELETS)
        ),
        Some(&token),
    )
    .await
    .json();
    let both = get(
        &stand_in,
        &format!(
            "Observation?code={}&researchstudy=FHIR-T",
            encoded(&format!("{PLATELETS},{NEUTROPHILS}"))
        ),
        Some(&token),
    )
    .await
    .json();
    // Unencoded, as BLAZE.md writes it: `|`, `:` and `/` are legal in a query.
    let raw = get(
        &stand_in,
        &format!("Observation?code={NEUTROPHILS}&researchstudy=FHIR-T"),
        Some(&token),
    )
    .await
    .json();
    let prefix_only = get(
        &stand_in,
        "Observation?code=http%3A%2F%2Floinc.org%7C777&researchstudy=FHIR-T",
        Some(&token),
    )
    .await
    .json();

    assert_eq!(platelets["total"], 250);
    for entry in platelets["entry"].as_array().unwrap() {
        assert_eq!(entry["resource"]["code"]["coding"][0]["code"], "777-3");
    }
    assert_eq!(both["total"], 500);
    assert_eq!(raw["total"], 250);
    assert_eq!(raw["entry"][0]["resource"]["id"], "o-0002");
    assert_eq!(prefix_only["total"], 0);
    let next = link(&platelets, "next").unwrap();
    let params = query_params(&next);
    assert_eq!(values(&params, "code"), [PLATELETS]);
    let page_2 = send(api_request(&next, Some(&token), &[]))
        .await
        .unwrap()
        .json();
    assert_eq!(page_2["total"], 250);
    assert_eq!(page_2["entry"][0]["resource"]["id"], "o-0201");
}

#[tokio::test]
async fn search_by_id_and_unknown_parameters_are_ignored() {
    let stand_in = StandIn::start().await.unwrap();
    let token = fetch_token(&stand_in).await;

    let answer = get(
        &stand_in,
        "Patient?_id=p-0002,p-0005&_format=json&flavour=mint&researchstudy=FHIR-T",
        Some(&token),
    )
    .await
    .json();

    let ids: Vec<&str> = answer["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["resource"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["p-0002", "p-0005"]);
    let self_link = link(&answer, "self").unwrap();
    let params = query_params(&self_link);
    assert_eq!(values(&params, "_format"), ["json"]);
    assert_eq!(values(&params, "flavour"), ["mint"]);
}

#[tokio::test]
async fn invalid_count_is_400_and_large_count_is_capped() {
    let stand_in = StandIn::start().await.unwrap();
    let token = fetch_token(&stand_in).await;

    let word = get(
        &stand_in,
        "Patient?researchstudy=FHIR-T&_count=ten",
        Some(&token),
    )
    .await;
    let zero = get(
        &stand_in,
        "Patient?researchstudy=FHIR-T&_count=0",
        Some(&token),
    )
    .await;
    let bad_page = get(
        &stand_in,
        "Patient?researchstudy=FHIR-T&page=0",
        Some(&token),
    )
    .await;
    let large = get(
        &stand_in,
        "Patient?researchstudy=FHIR-T&_count=5000",
        Some(&token),
    )
    .await
    .json();

    assert_outcome(&word, StatusCode::BAD_REQUEST, "invalid");
    assert_outcome(&zero, StatusCode::BAD_REQUEST, "invalid");
    assert_outcome(&bad_page, StatusCode::BAD_REQUEST, "invalid");
    let self_link = link(&large, "self").unwrap();
    assert_eq!(values(&query_params(&self_link), "_count"), ["1000"]);
    assert_eq!(large["entry"].as_array().unwrap().len(), 250);
}

#[tokio::test]
async fn page_beyond_the_end_is_empty() {
    let stand_in = StandIn::builder().patients(10).start().await.unwrap();
    let token = fetch_token(&stand_in).await;

    let answer = get(
        &stand_in,
        "Patient?researchstudy=FHIR-T&_count=4&page=9",
        Some(&token),
    )
    .await
    .json();

    assert_eq!(answer["total"], 10);
    assert_eq!(answer["entry"].as_array().unwrap().len(), 0);
    assert_eq!(link(&answer, "next"), None);
    let last = link(&answer, "last").unwrap();
    assert_eq!(values(&query_params(&last), "page"), ["3"]);
}

#[tokio::test]
async fn links_carry_the_required_partner_id() {
    let stand_in = StandIn::builder()
        .require_partner_id("partner-42")
        .patients(10)
        .start()
        .await
        .unwrap();
    let token = fetch_token(&stand_in).await;
    let url = format!(
        "{}/Patient?researchstudy=FHIR-T&_count=4",
        stand_in.api_url()
    );

    let answer = send(api_request(
        &url,
        Some(&token),
        &[("x-partnerid", "partner-42")],
    ))
    .await
    .unwrap()
    .json();

    let next = link(&answer, "next").unwrap();
    let params = query_params(&next);
    assert_eq!(values(&params, "x-partnerid"), ["partner-42"]);
    assert_eq!(values(&params, "researchstudy"), ["FHIR-T"]);
}

// ---- failure injection ----

#[tokio::test]
async fn token_failure_status_is_a_gateway_page_then_service_resumes() {
    let stand_in = StandIn::start().await.unwrap();
    stand_in.fail_token_requests(1, TokenFailure::Status(StatusCode::SERVICE_UNAVAILABLE));

    let failed = post_form(&stand_in, &demo_form()).await;
    let resumed = post_form(&stand_in, &demo_form()).await;

    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(failed.headers[CONTENT_TYPE], "text/html");
    assert!(String::from_utf8_lossy(&failed.body).contains("503 Service Unavailable"));
    assert_eq!(resumed.status, StatusCode::OK);
    assert_eq!(stand_in.token_requests(), 2);
    assert_eq!(stand_in.tokens_issued(), 1);
}

#[tokio::test]
async fn too_many_requests_carries_retry_after_in_whole_seconds() {
    let stand_in = StandIn::start().await.unwrap();
    let retry_after = Duration::from_millis(1500);
    stand_in.fail_token_requests(1, TokenFailure::TooManyRequests { retry_after });

    let answer = post_form(&stand_in, &demo_form()).await;

    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(answer.headers[RETRY_AFTER], "2");
}

#[tokio::test(start_paused = true)]
async fn slow_token_request_answers_correctly_after_the_delay() {
    let stand_in = StandIn::start().await.unwrap();
    stand_in.fail_token_requests(1, TokenFailure::Slow(Duration::from_secs(30)));

    let answer = post_form(&stand_in, &demo_form()).await;

    assert_eq!(answer.status, StatusCode::OK);
    let token = answer.json()["access_token"].as_str().unwrap().to_owned();
    let api = get(&stand_in, "metadata?researchstudy=FHIR-T", Some(&token)).await;
    assert_eq!(api.status, StatusCode::OK);
}

#[tokio::test]
async fn garbage_token_response_is_not_json() {
    let stand_in = StandIn::start().await.unwrap();
    stand_in.fail_token_requests(1, TokenFailure::Garbage);

    let answer = post_form(&stand_in, &demo_form()).await;

    assert_eq!(answer.status, StatusCode::OK);
    assert!(serde_json::from_slice::<Value>(&answer.body).is_err());
    assert_eq!(stand_in.tokens_issued(), 0);
}

#[tokio::test]
async fn oversize_token_response_is_several_mib_of_valid_json() {
    let stand_in = StandIn::start().await.unwrap();
    stand_in.fail_token_requests(1, TokenFailure::Oversize);

    let answer = post_form(&stand_in, &demo_form()).await;

    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer.body.len() > 4 * 1024 * 1024,
        "{} bytes",
        answer.body.len()
    );
    assert_eq!(answer.json()["token_type"], "Bearer");
}

#[tokio::test]
async fn hanging_token_request_times_out_and_drop_still_closes_the_port() {
    let stand_in = StandIn::start().await.unwrap();
    stand_in.fail_token_requests(1, TokenFailure::Hang);
    let addr = stand_in.addr();

    let answer = tokio::time::timeout(
        Duration::from_millis(500),
        send(form_request(&stand_in, &demo_form(), &[])),
    )
    .await;

    assert!(answer.is_err(), "the hanging request was answered");
    assert_eq!(stand_in.token_requests(), 1);
    drop(stand_in);
    assert_refused(TcpStream::connect(addr).await);
}

#[tokio::test]
async fn drop_closes_hanging_connections() {
    let stand_in = StandIn::start().await.unwrap();
    stand_in.fail_token_requests(1, TokenFailure::Hang);
    let mut stream = TcpStream::connect(stand_in.addr()).await.unwrap();
    let body = demo_form();
    let request = format!(
        "POST /msk-apim/external/msk-oidc/oauth2/token HTTP/1.1\r\nhost: {}\r\n\
         content-type: {FORM}\r\ncontent-length: {}\r\n\r\n{body}",
        stand_in.addr(),
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buffer = [0; 1024];
    let unanswered =
        tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buffer)).await;
    assert!(unanswered.is_err(), "the hanging request was answered");

    drop(stand_in);

    // Waits for the close itself; the timeout only keeps a failure from hanging the test.
    let closed = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buffer))
        .await
        .expect("the connection is closed after drop");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
}

#[tokio::test]
async fn reset_token_request_gets_no_response() {
    let stand_in = StandIn::start().await.unwrap();
    stand_in.fail_token_requests(1, TokenFailure::Reset);

    let reset = send(form_request(&stand_in, &demo_form(), &[])).await;
    let resumed = post_form(&stand_in, &demo_form()).await;

    assert!(reset.is_err(), "{:?}", reset.map(|answer| answer.status));
    assert_eq!(resumed.status, StatusCode::OK);
    assert_eq!(stand_in.token_requests(), 2);
    assert_eq!(stand_in.tokens_issued(), 1);
}

#[tokio::test]
async fn reset_is_a_tcp_reset() {
    let stand_in = StandIn::start().await.unwrap();
    stand_in.fail_api_requests(1, ApiFailure::Reset);
    let mut stream = TcpStream::connect(stand_in.addr()).await.unwrap();
    let request = format!(
        "GET /msk-apim/external/v2/crit/blaze/api/metadata HTTP/1.1\r\nhost: {}\r\n\r\n",
        stand_in.addr()
    );
    stream.write_all(request.as_bytes()).await.unwrap();

    let mut buffer = [0; 1024];
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buffer))
        .await
        .expect("the connection is reset");

    let error = read.expect_err("a reset, not an answer or a clean close");
    assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn api_failures_come_in_order_then_service_resumes() {
    let stand_in = StandIn::start().await.unwrap();
    let token = fetch_token(&stand_in).await;
    stand_in.fail_api_requests(2, ApiFailure::Unauthorized);
    stand_in.fail_api_requests(1, ApiFailure::Status(StatusCode::BAD_GATEWAY));
    stand_in.fail_api_requests(1, ApiFailure::Reset);
    let url = format!("{}/metadata?researchstudy=FHIR-T", stand_in.api_url());

    let first = send(api_request(&url, Some(&token), &[])).await.unwrap();
    let second = send(api_request(&url, Some(&token), &[])).await.unwrap();
    let third = send(api_request(&url, Some(&token), &[])).await.unwrap();
    let fourth = send(api_request(&url, Some(&token), &[])).await;
    let fifth = send(api_request(&url, Some(&token), &[])).await.unwrap();

    assert_invalid_token(&first);
    assert_invalid_token(&second);
    assert_outcome(&third, StatusCode::BAD_GATEWAY, "exception");
    assert!(fourth.is_err(), "{:?}", fourth.map(|answer| answer.status));
    assert_eq!(fifth.status, StatusCode::OK);
    assert_eq!(stand_in.api_requests(), 5);
    assert_eq!(stand_in.unauthorized_served(), 2);
}

#[tokio::test]
async fn random_unauthorized_hits_a_share_of_requests_and_can_be_turned_off() {
    let stand_in = StandIn::start().await.unwrap();
    let token = fetch_token(&stand_in).await;
    let url = format!("{}/metadata?researchstudy=FHIR-T", stand_in.api_url());
    let statuses = |n| {
        let (url, token) = (url.clone(), token.clone());
        async move {
            let mut statuses = Vec::new();
            for _ in 0..n {
                let answer = send(api_request(&url, Some(&token), &[])).await.unwrap();
                statuses.push(answer.status);
            }
            statuses
        }
    };

    stand_in.set_random_unauthorized(300);
    let some = statuses(40).await;
    stand_in.set_random_unauthorized(300);
    let same = statuses(40).await;
    stand_in.set_random_unauthorized(0);
    let none = statuses(10).await;

    let unauthorized = some
        .iter()
        .filter(|status| **status == StatusCode::UNAUTHORIZED)
        .count();
    assert!((1..40).contains(&unauthorized), "{unauthorized} of 40");
    assert!(
        some.iter()
            .all(|status| [StatusCode::OK, StatusCode::UNAUTHORIZED].contains(status))
    );
    assert_eq!(some, same);
    assert!(none.iter().all(|status| *status == StatusCode::OK));
    assert_eq!(stand_in.unauthorized_served(), 2 * unauthorized as u64);
}

#[tokio::test]
async fn page_failures_hit_that_page_of_searches_only_then_it_is_served() {
    let stand_in = StandIn::builder()
        .fail_page(3, 1, ApiFailure::Status(StatusCode::SERVICE_UNAVAILABLE))
        .fail_page(
            3,
            1,
            ApiFailure::TooManyRequests {
                retry_after: Duration::from_millis(1500),
            },
        )
        .fail_page(1, 1, ApiFailure::Unauthorized)
        .start()
        .await
        .unwrap();
    let token = fetch_token(&stand_in).await;
    let search = |page: &str| format!("Patient?researchstudy=FHIR-T&_count=50{page}");

    // Neither a read, metadata, nor another page meets a page-3 failure.
    let read = get(
        &stand_in,
        "Patient/p-0003?researchstudy=FHIR-T",
        Some(&token),
    )
    .await;
    let metadata = get(&stand_in, "metadata?researchstudy=FHIR-T", Some(&token)).await;
    let second = get(&stand_in, &search("&page=2"), Some(&token)).await;
    // A search without `page` asks for page 1.
    let first = get(&stand_in, &search(""), Some(&token)).await;
    let first_again = get(&stand_in, &search(""), Some(&token)).await;
    let third = get(&stand_in, &search("&page=3"), Some(&token)).await;
    let third_again = get(&stand_in, &search("&page=3"), Some(&token)).await;
    let third_at_last = get(&stand_in, &search("&page=3"), Some(&token)).await;

    for answer in [&read, &metadata, &second, &first_again, &third_at_last] {
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    }
    assert_invalid_token(&first);
    assert_outcome(&third, StatusCode::SERVICE_UNAVAILABLE, "exception");
    assert_outcome(&third_again, StatusCode::TOO_MANY_REQUESTS, "throttled");
    assert_eq!(third_again.headers[RETRY_AFTER], "2");
    assert_eq!(third_at_last.json()["entry"][0]["resource"]["id"], "p-0101");
    assert_eq!(stand_in.api_requests(), 8);
}

#[tokio::test]
async fn misstated_total_is_off_by_the_delta_and_the_pages_are_unchanged() {
    let over = StandIn::builder().misstate_total(13).start().await.unwrap();
    let under = StandIn::builder()
        .misstate_total(-1000)
        .start()
        .await
        .unwrap();

    let over = get(
        &over,
        "Patient?researchstudy=FHIR-T&_count=100",
        Some(&fetch_token(&over).await),
    )
    .await;
    let under = get(
        &under,
        "Patient?researchstudy=FHIR-T&_count=100",
        Some(&fetch_token(&under).await),
    )
    .await;

    assert_eq!(over.json()["total"], 263);
    assert_eq!(under.json()["total"], 0, "never below zero");
    for answer in [&over, &under] {
        assert_eq!(answer.json()["entry"].as_array().unwrap().len(), 100);
        assert!(link(&answer.json(), "next").unwrap().contains("page=2"));
    }
}

#[tokio::test]
async fn foreign_next_link_points_elsewhere_on_its_page_only() {
    let stand_in = StandIn::builder()
        .foreign_next_link(2, "http://elsewhere.example:8080/")
        .start()
        .await
        .unwrap();
    let token = fetch_token(&stand_in).await;
    let page = |n: usize| format!("Patient?researchstudy=FHIR-T&_count=100&page={n}");

    let first = get(&stand_in, &page(1), Some(&token)).await.json();
    let second = get(&stand_in, &page(2), Some(&token)).await.json();

    let foreign = link(&second, "next").unwrap();
    let home = link(&first, "next").unwrap();
    assert!(home.starts_with(&stand_in.api_url()), "{home}");
    assert_eq!(
        foreign,
        link(&second, "last")
            .unwrap()
            .replace(&stand_in.base_url(), "http://elsewhere.example:8080")
    );
    for relation in ["self", "first", "last", "previous"] {
        let url = link(&second, relation).unwrap();
        assert!(url.starts_with(&stand_in.base_url()), "{relation}: {url}");
    }
}

// ---- counters and lifecycle ----

#[tokio::test]
async fn counters_count_what_the_server_saw() {
    let stand_in = StandIn::start().await.unwrap();

    let token = fetch_token(&stand_in).await;
    post_form(&stand_in, "grant_type=client_credentials").await;
    get(&stand_in, "Patient?researchstudy=FHIR-T", Some(&token)).await;
    get(&stand_in, "Patient?researchstudy=FHIR-T", None).await;
    get(&stand_in, "Patient", Some(&token)).await;
    send(request(
        Method::GET,
        &format!("{}/elsewhere", stand_in.base_url()),
        "",
        &[],
    ))
    .await
    .unwrap();

    assert_eq!(stand_in.token_requests(), 2);
    assert_eq!(stand_in.tokens_issued(), 1);
    assert_eq!(stand_in.api_requests(), 3);
    assert_eq!(stand_in.unauthorized_served(), 1);
}

#[tokio::test]
async fn urls_name_the_blaze_paths_on_loopback() {
    let stand_in = StandIn::start().await.unwrap();
    let base = format!("http://127.0.0.1:{}", stand_in.addr().port());

    assert!(stand_in.addr().ip().is_loopback());
    assert_eq!(stand_in.base_url(), base);
    assert_eq!(
        stand_in.api_url(),
        format!("{base}/msk-apim/external/v2/crit/blaze/api")
    );
    assert_eq!(
        stand_in.token_url(),
        format!("{base}/msk-apim/external/msk-oidc/oauth2/token")
    );
}

#[tokio::test]
async fn drop_closes_the_port() {
    let stand_in = StandIn::start().await.unwrap();
    let addr = stand_in.addr();
    TcpStream::connect(addr).await.unwrap();

    drop(stand_in);

    assert_refused(TcpStream::connect(addr).await);
}

#[test]
fn base64_helper_matches_rfc_4648_vectors() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
}

// ---- helpers ----

/// What came back: status, headers and the whole body.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// Sends `request` on a connection of its own.
async fn send(request: Request<Full<Bytes>>) -> Result<Answer, ClientError> {
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = client.request(request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("a whole body").to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

fn request(
    method: Method,
    url: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

/// A form POST to the token endpoint; `headers` may replace the content type.
fn form_request(stand_in: &StandIn, form: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut all = vec![(CONTENT_TYPE.as_str(), FORM)];
    all.retain(|(name, _)| {
        !headers
            .iter()
            .any(|(given, _)| given.eq_ignore_ascii_case(name))
    });
    all.extend_from_slice(headers);
    request(Method::POST, &stand_in.token_url(), form, &all)
}

async fn post(stand_in: &StandIn, form: &str, headers: &[(&str, &str)]) -> Answer {
    send(form_request(stand_in, form, headers)).await.unwrap()
}

async fn post_form(stand_in: &StandIn, form: &str) -> Answer {
    post(stand_in, form, &[]).await
}

fn demo_form() -> String {
    format!(
        "grant_type=client_credentials&client_id={DEMO_CLIENT_ID}\
         &client_secret={DEMO_CLIENT_SECRET}&scope=full"
    )
}

async fn fetch_token(stand_in: &StandIn) -> String {
    let answer = post_form(stand_in, &demo_form()).await;
    assert_eq!(answer.status, StatusCode::OK);
    answer.json()["access_token"].as_str().unwrap().to_owned()
}

fn api_request(url: &str, token: Option<&str>, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let authorization = token.map(|token| format!("Bearer {token}"));
    let mut all: Vec<(&str, &str)> = headers.to_vec();
    if let Some(authorization) = &authorization {
        all.push((AUTHORIZATION.as_str(), authorization));
    }
    request(Method::GET, url, "", &all)
}

/// GETs `path_and_query` under the API's base URL.
async fn get(stand_in: &StandIn, path_and_query: &str, token: Option<&str>) -> Answer {
    let url = format!("{}/{path_and_query}", stand_in.api_url());
    send(api_request(&url, token, &[])).await.unwrap()
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))`, RFC 6749 section 2.3.1.
fn basic(id: &str, secret: &str) -> String {
    let encode = |text: &str| form_urlencoded::byte_serialize(text.as_bytes()).collect::<String>();
    format!(
        "Basic {}",
        base64(format!("{}:{}", encode(id), encode(secret)).as_bytes())
    )
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut encoded = String::new();
    for chunk in bytes.chunks(3) {
        let group = chunk.iter().enumerate().fold(0u32, |group, (index, byte)| {
            group | u32::from(*byte) << (16 - 8 * index)
        });
        for index in 0..4 {
            if index <= chunk.len() {
                encoded.push(char::from(
                    ALPHABET[(group >> (18 - 6 * index) & 63) as usize],
                ));
            } else {
                encoded.push('=');
            }
        }
    }
    encoded
}

/// The URL of the Bundle's link `relation`; `None` when it is `"url": null`.
fn link(bundle: &Value, relation: &str) -> Option<String> {
    let link = bundle["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|link| link["relation"] == relation)
        .unwrap_or_else(|| panic!("no {relation} link"));
    assert!(link.get("url").is_some(), "{link}");
    link["url"].as_str().map(str::to_owned)
}

fn query_params(url: &str) -> Vec<(String, String)> {
    let uri: Uri = url.parse().unwrap();
    form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

fn values<'a>(params: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    params
        .iter()
        .filter(|(param, _)| param == name)
        .map(|(_, value)| value.as_str())
        .collect()
}

fn assert_oauth_error(answer: &Answer, status: StatusCode, error: &str) {
    assert_eq!(answer.status, status, "{:?}", answer.body);
    assert_eq!(answer.headers[CONTENT_TYPE], "application/json");
    let json = answer.json();
    assert_eq!(json["error"], error, "{json}");
    assert!(json["error_description"].is_string(), "{json}");
}

fn assert_outcome(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(answer.status, status, "{:?}", answer.body);
    assert_eq!(answer.headers[CONTENT_TYPE], FHIR_JSON);
    let json = answer.json();
    assert_eq!(json["resourceType"], "OperationOutcome", "{json}");
    assert_eq!(json["issue"][0]["severity"], "error", "{json}");
    assert_eq!(json["issue"][0]["code"], code, "{json}");
    assert!(json["issue"][0]["diagnostics"].is_string(), "{json}");
}

fn assert_invalid_token(answer: &Answer) {
    assert_outcome(answer, StatusCode::UNAUTHORIZED, "login");
    assert_eq!(
        answer.headers[WWW_AUTHENTICATE],
        "Bearer error=\"invalid_token\""
    );
}

fn assert_refused(connect: io::Result<TcpStream>) {
    let error = connect.expect_err("the port still takes connections");
    assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
}
