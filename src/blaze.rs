//! Where Blaze is: hosts and paths of MSK's clinical-research FHIR API.

/// MSK's staging API gateway.
pub const STAGING_URL: &str = "https://apigateway.apps.stageapi.mskcc.org";

/// MSK's production API gateway.
pub const PRODUCTION_URL: &str = "https://apigateway.apps.prodapi.mskcc.org";

/// Path of the OAuth 2.0 token endpoint, on the same origin as the API.
pub const TOKEN_PATH: &str = "/msk-apim/external/msk-oidc/oauth2/token";

/// Base path of the FHIR API (v2); resources follow it: `{API_PATH}/Patient`.
pub const API_PATH: &str = "/msk-apim/external/v2/crit/blaze/api";

/// The scope Blaze grants to partners.
pub const SCOPE: &str = "full";
