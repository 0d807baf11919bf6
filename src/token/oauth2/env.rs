//! [`BlazeEnv`]: a Blaze client configured from `BLAZE_*` environment variables.

use super::{ClientCredentials, ClientCredentialsBuilder, ClientSecret};
use crate::{
    blaze, error::Error, layer::BlazeAuthLayerBuilder, scope::without_user_info, token::TokenSource,
};
use std::{env::VarError, fmt};

/// The settings of a Blaze client, as read from the environment by [`from_env`](Self::from_env).
///
/// | variable | meaning |
/// |---|---|
/// | `BLAZE_BASE_URL` | scheme, host and port of Blaze, e.g. `https://apigateway.apps.stageapi.mskcc.org` |
/// | `BLAZE_TOKEN_URL` | token endpoint; default: `BLAZE_BASE_URL` + [`blaze::TOKEN_PATH`] |
/// | `BLAZE_CLIENT_ID`, `BLAZE_CLIENT_SECRET` | the partner's credentials |
/// | `BLAZE_SCOPE` | default `full` |
/// | `BLAZE_RESEARCH_STUDY` | the study requests are for, e.g. `FHIR-T` |
/// | `BLAZE_PARTNER_ID` | Blaze v2's `x-partnerid`; optional |
///
/// ```no_run
/// use blaze_auth::BlazeEnv;
///
/// # fn run() -> Result<(), blaze_auth::Error> {
/// if let Some(env) = BlazeEnv::from_env()? {
///     let source = env.client_credentials().build()?;
///     let layer = env.layer(source).build()?;
///     println!("calling {}", env.api_url());
/// #   let _ = layer;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct BlazeEnv {
    base_url: String,
    token_url: String,
    client_id: String,
    client_secret: ClientSecret,
    scope: String,
    research_study: String,
    partner_id: Option<String>,
}

const REQUIRED: [&str; 4] = [
    "BLAZE_BASE_URL",
    "BLAZE_CLIENT_ID",
    "BLAZE_CLIENT_SECRET",
    "BLAZE_RESEARCH_STUDY",
];
const OPTIONAL: [&str; 3] = ["BLAZE_TOKEN_URL", "BLAZE_SCOPE", "BLAZE_PARTNER_ID"];

impl BlazeEnv {
    /// Reads the process environment.
    ///
    /// Returns `Ok(None)` when no `BLAZE_*` variable of the table above is set at all.
    ///
    /// # Errors
    ///
    /// When some are set but a required one is missing or empty, or one is not valid
    /// unicode: the error names that variable ([`Error::is_config`]).
    pub fn from_env() -> Result<Option<Self>, Error> {
        Self::from_lookup(std::env::var)
    }

    /// Reads the settings through `lookup`, which answers as [`std::env::var`] does.
    ///
    /// # Errors
    ///
    /// As [`from_env`](Self::from_env).
    pub fn from_lookup(
        lookup: impl Fn(&'static str) -> Result<String, VarError>,
    ) -> Result<Option<Self>, Error> {
        let get = |name: &'static str| match lookup(name) {
            Ok(value) if value.trim().is_empty() => Ok(None),
            Ok(value) => Ok(Some(value.trim().to_owned())),
            Err(VarError::NotPresent) => Ok(None),
            Err(VarError::NotUnicode(_)) => Err(Error::env(name, false)),
        };
        let mut any = false;
        for name in REQUIRED.iter().chain(&OPTIONAL) {
            any |= get(name)?.is_some();
        }
        if !any {
            return Ok(None);
        }
        let required = |name| get(name)?.ok_or_else(|| Error::env(name, true));
        let base_url = required("BLAZE_BASE_URL")?.trim_end_matches('/').to_owned();
        Ok(Some(Self {
            token_url: get("BLAZE_TOKEN_URL")?
                .unwrap_or_else(|| format!("{base_url}{}", blaze::TOKEN_PATH)),
            client_id: required("BLAZE_CLIENT_ID")?,
            client_secret: required("BLAZE_CLIENT_SECRET")?.into(),
            scope: get("BLAZE_SCOPE")?.unwrap_or_else(|| blaze::SCOPE.to_owned()),
            research_study: required("BLAZE_RESEARCH_STUDY")?,
            partner_id: get("BLAZE_PARTNER_ID")?,
            base_url,
        }))
    }

    /// Settings with the default token URL and scope.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub(crate) fn new(
        base_url: String,
        client_id: &str,
        client_secret: &str,
        research_study: &str,
        partner_id: Option<&str>,
    ) -> Self {
        Self {
            token_url: format!("{base_url}{}", blaze::TOKEN_PATH),
            client_id: client_id.to_owned(),
            client_secret: client_secret.into(),
            scope: blaze::SCOPE.to_owned(),
            research_study: research_study.to_owned(),
            partner_id: partner_id.map(str::to_owned),
            base_url,
        }
    }

    /// A [`ClientCredentials`] builder for these settings.
    pub fn client_credentials(&self) -> ClientCredentialsBuilder {
        ClientCredentials::builder(&self.token_url, &self.client_id, self.client_secret.clone())
            .scope(&self.scope)
    }

    /// A layer builder with the study, credentials for `BLAZE_BASE_URL`'s origin only, and
    /// the partner id if set. A plain `http` `BLAZE_BASE_URL` on a host that is not loopback
    /// makes its [`build`](BlazeAuthLayerBuilder::build) fail unless
    /// [`allow_http`](BlazeAuthLayerBuilder::allow_http) is set on it.
    pub fn layer(&self, source: impl TokenSource + 'static) -> BlazeAuthLayerBuilder {
        let builder = crate::BlazeAuthLayer::builder(source)
            .study(&self.research_study)
            .origin(&self.base_url);
        match &self.partner_id {
            Some(partner_id) => builder.partner_id(partner_id),
            None => builder,
        }
    }

    /// `BLAZE_BASE_URL`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The FHIR API's base URL: `BLAZE_BASE_URL` + [`blaze::API_PATH`].
    pub fn api_url(&self) -> String {
        format!("{}{}", self.base_url, blaze::API_PATH)
    }

    /// The token endpoint.
    pub fn token_url(&self) -> &str {
        &self.token_url
    }

    /// `BLAZE_RESEARCH_STUDY`.
    pub fn research_study(&self) -> &str {
        &self.research_study
    }

    /// `BLAZE_PARTNER_ID`.
    pub fn partner_id(&self) -> Option<&str> {
        self.partner_id.as_deref()
    }
}

impl fmt::Debug for BlazeEnv {
    /// The URLs without any user info (a password, which the token source and the layer
    /// refuse, but a misconfigured variable may hold) and the partner id redacted, as the
    /// layer marks its header sensitive.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlazeEnv")
            .field("base_url", &without_user_info(&self.base_url))
            .field("token_url", &without_user_info(&self.token_url))
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .field("scope", &self.scope)
            .field("research_study", &self.research_study)
            .field(
                "partner_id",
                &self.partner_id.as_ref().map(|_| "[redacted]"),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(vars: &[(&str, &str)]) -> Result<Option<BlazeEnv>, Error> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        BlazeEnv::from_lookup(|name| vars.get(name).cloned().ok_or(VarError::NotPresent))
    }

    const FULL: [(&str, &str); 5] = [
        ("BLAZE_BASE_URL", "https://blaze.example/"),
        ("BLAZE_CLIENT_ID", "id"),
        ("BLAZE_CLIENT_SECRET", "env-secret"),
        ("BLAZE_RESEARCH_STUDY", "FHIR-T"),
        ("BLAZE_PARTNER_ID", "p-1"),
    ];

    #[test]
    fn debug_shows_no_password_in_a_url_nor_the_partner_id() {
        let mut vars = FULL;
        vars[0] = ("BLAZE_BASE_URL", "https://user:pa55word@blaze.example/");
        let env = read(&vars).unwrap().unwrap();
        let shown = format!("{env:?}");
        for secret in ["pa55word", "env-secret", "p-1"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(
            shown.contains("https://[redacted]@blaze.example/msk-apim"),
            "{shown}"
        );
        assert_eq!(
            without_user_info("https://blaze.example/a@b?c=@"),
            "https://blaze.example/a@b?c=@"
        );
    }

    #[test]
    fn nothing_set_is_none() {
        assert!(read(&[]).unwrap().is_none());
        assert!(read(&[("OTHER", "x")]).unwrap().is_none());
    }

    #[test]
    fn defaults_derive_from_the_base_url() {
        let env = read(&FULL).unwrap().unwrap();
        assert_eq!(
            env.token_url(),
            "https://blaze.example/msk-apim/external/msk-oidc/oauth2/token"
        );
        assert_eq!(
            env.api_url(),
            "https://blaze.example/msk-apim/external/v2/crit/blaze/api"
        );
        assert_eq!(env.scope, "full");
        assert_eq!(env.partner_id(), Some("p-1"));
        assert!(!format!("{env:?}").contains("env-secret"));
    }

    #[test]
    fn a_missing_variable_is_named() {
        for missing in REQUIRED {
            let vars: Vec<_> = FULL
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let error = read(&vars).unwrap_err();
            assert!(error.is_config());
            assert_eq!(
                error.to_string(),
                format!("environment variable {missing} is not set")
            );
        }
        let error = read(&[("BLAZE_CLIENT_ID", "id"), ("BLAZE_CLIENT_SECRET", "  ")]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "environment variable BLAZE_BASE_URL is not set"
        );
    }

    #[test]
    fn non_unicode_is_an_error_naming_the_variable() {
        let error = BlazeEnv::from_lookup(|name| {
            if name == "BLAZE_CLIENT_ID" {
                Err(VarError::NotUnicode(std::ffi::OsString::from("x")))
            } else {
                Err(VarError::NotPresent)
            }
        })
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "environment variable BLAZE_CLIENT_ID is not valid unicode"
        );
    }
}
