//! Export: every resource a search finds, one JSON object per line (NDJSON).
//!
//! ```text
//! cargo run --example export -- Patient [name=value ...] [--out FILE]
//! cargo run --example export -- Observation code=http://loinc.org|777-3 --out platelets.ndjson
//! ```
//!
//! Without `BLAZE_*` variables it runs against the embedded stand-in; with them, against that
//! server. Resources go to stdout (or `--out`), progress (`matched / total`) and errors to
//! stderr. The export fails (exits 1, and says why on stderr) rather than end short: on an
//! HTTP error that retries did not cure, on a `next` link to another origin, or when the
//! resources do not add up to the `total` the server stated. A resource met again on a later
//! page (Blaze pages by offset, so writes during the export shift pages) is written once and
//! reported.
//!
//! 429, 502, 503 and 504 are retried with backoff, honouring `Retry-After`, by tower's
//! `Retry` outside the layer: see `common/retry.rs`.
//!
//! `--stand-in-fault FAULT` makes the stand-in misbehave, to see the export cope (demo and
//! CI only; an error with `BLAZE_*` set):
//! - `wrong-total`: Bundles state 13 more resources than there are: the export fails;
//! - `foreign-link`: page 2's `next` link points to another origin: the export fails;
//! - `busy`: a 503 on page 2 and a 429 (`Retry-After: 1`) on page 3: the export completes.

mod common;

use blaze_auth::{
    BoxError,
    testing::{ApiFailure, StandIn, StandInBuilder},
};
use http::StatusCode;
use std::{
    io::{BufWriter, Write},
    time::Duration,
};

const USAGE: &str =
    "usage: export <ResourceType> [name=value ...] [--out FILE] [--stand-in-fault FAULT]";

#[tokio::main]
async fn main() {
    if let Err(error) = run().await {
        // A reader that stopped early (`| head`) is not a failure.
        let io_kind = match error.downcast_ref::<serde_json::Error>() {
            Some(json) => json.io_error_kind(),
            None => error.downcast_ref::<std::io::Error>().map(|e| e.kind()),
        };
        if io_kind == Some(std::io::ErrorKind::BrokenPipe) {
            return;
        }
        eprintln!("\nexport failed: {error}");
        let mut source = error.source();
        while let Some(cause) = source {
            eprintln!("  caused by: {cause}");
            source = cause.source();
        }
        std::process::exit(1);
    }
}

struct Args {
    resource: String,
    params: Vec<(String, String)>,
    out: Option<String>,
    stand_in_fault: Option<String>,
}

fn args() -> Result<Args, BoxError> {
    let mut args = std::env::args().skip(1);
    let mut resource = None;
    let mut params = Vec::new();
    let mut out = None;
    let mut stand_in_fault = None;
    while let Some(arg) = args.next() {
        if arg == "--out" {
            out = Some(args.next().ok_or(USAGE)?);
        } else if arg == "--stand-in-fault" {
            stand_in_fault = Some(args.next().ok_or(USAGE)?);
        } else if let Some((name, value)) = arg.split_once('=') {
            params.push((name.to_owned(), value.to_owned()));
        } else if resource.is_none() && arg.chars().all(|c| c.is_ascii_alphabetic()) {
            resource = Some(arg);
        } else {
            return Err(format!("unexpected argument {arg:?}\n{USAGE}").into());
        }
    }
    if !params.iter().any(|(name, _)| name == "_count") {
        params.push(("_count".to_owned(), "100".to_owned()));
    }
    Ok(Args {
        resource: resource.ok_or(USAGE)?,
        params,
        out,
        stand_in_fault,
    })
}

async fn run() -> Result<(), BoxError> {
    let args = args()?;
    let stand_in = faulty(StandIn::builder(), args.stand_in_fault.as_deref())?;
    let (env, stand_in) = common::env_or_stand_in(stand_in).await?;
    if args.stand_in_fault.is_some() && stand_in.is_none() {
        return Err("--stand-in-fault needs the stand-in: unset the BLAZE_* variables".into());
    }
    let source = env.client_credentials().build()?;
    let client = common::client(env.layer(source).build()?);

    let query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(&args.params)
        .finish();
    let url = format!("{}/{}?{query}", env.api_url(), args.resource);
    let mut out: Box<dyn Write> = match &args.out {
        Some(path) => Box::new(BufWriter::new(std::fs::File::create(path)?)),
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    let name = &args.resource;
    let searched = common::search(&client, &url, |page| {
        for resource in &page.resources {
            serde_json::to_writer(&mut out, resource)?;
            out.write_all(b"\n")?;
        }
        match page.total {
            Some(total) => eprint!("\r{name}: {} / {total}", page.matches),
            None => eprint!("\r{name}: {}", page.matches),
        }
        Ok(())
    })
    .await;
    // What was written stays written, complete or not.
    out.flush()?;
    let summary = searched?;

    if !summary.duplicates.is_empty() {
        let shown: Vec<&str> = summary
            .duplicates
            .iter()
            .take(5)
            .map(String::as_str)
            .collect();
        eprintln!(
            "\n{name}: {} resources came again on a later page, written once (data changed \
             during the export?): {}{}",
            summary.duplicates.len(),
            shown.join(", "),
            if summary.duplicates.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        );
    }
    match summary.total {
        Some(total) => eprintln!(
            "\r{name}: {} / {total} resources in {} pages, complete",
            summary.matches, summary.pages
        ),
        None => eprintln!(
            "\r{name}: {} resources in {} pages (the server stated no total: not checked)",
            summary.matches, summary.pages
        ),
    }
    Ok(())
}

/// `stand_in` with the fault `--stand-in-fault` names, if any.
fn faulty(stand_in: StandInBuilder, fault: Option<&str>) -> Result<StandInBuilder, BoxError> {
    Ok(match fault {
        None => stand_in,
        Some("wrong-total") => stand_in.misstate_total(13),
        Some("foreign-link") => stand_in.foreign_next_link(2, "http://127.0.0.1:9"),
        Some("busy") => stand_in
            .fail_page(2, 1, ApiFailure::Status(StatusCode::SERVICE_UNAVAILABLE))
            .fail_page(
                3,
                1,
                ApiFailure::TooManyRequests {
                    retry_after: Duration::from_secs(1),
                },
            ),
        Some(other) => {
            return Err(format!(
                "unknown --stand-in-fault {other:?}: wrong-total, foreign-link or busy"
            )
            .into());
        }
    })
}
