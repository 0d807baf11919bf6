//! Token: a fresh access token on stdout, for curl or a REST client.
//!
//! ```text
//! cargo run -q --example token              # the token alone
//! cargo run -q --example token -- --header  # the line `Authorization: Bearer <token>`
//! ```
//!
//! With `BLAZE_*` variables (see `BlazeEnv`) it asks that server's token endpoint; without
//! them, the embedded stand-in's (whose tokens die with it: a demo of the output only).
//! Stdout gets the one line and nothing else; errors go to stderr with a non-zero exit.
//!
//! ```text
//! curl -H "$(cargo run -q --example token -- --header)" -H "x-partnerid: $BLAZE_PARTNER_ID" \
//!   "$BLAZE_BASE_URL/msk-apim/external/v2/crit/blaze/api/Patient?_count=1&researchstudy=$BLAZE_RESEARCH_STUDY"
//! ```

use blaze_auth::{BlazeEnv, BoxError, TokenSource, testing::StandIn};

const USAGE: &str = "usage: token [--header]";

#[tokio::main]
async fn main() {
    match run().await {
        Ok(line) => println!("{line}"),
        Err(error) => {
            eprintln!("token: {error}");
            let mut source = error.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            std::process::exit(1);
        }
    }
}

async fn run() -> Result<String, BoxError> {
    let header = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--header") => true,
        Some(_) => return Err(USAGE.into()),
    };
    // Kept alive until the token is fetched.
    let mut _stand_in = None;
    let env = match BlazeEnv::from_env()? {
        Some(env) => env,
        None => _stand_in.insert(StandIn::start().await?).blaze_env(),
    };
    let token = env.client_credentials().build()?.fetch(None).await?;
    Ok(if header {
        format!("Authorization: {} {}", token.token_type(), token.secret())
    } else {
        token.secret().to_owned()
    })
}
