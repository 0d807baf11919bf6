//! Export: every resource a search finds, one JSON object per line (NDJSON).
//!
//! ```text
//! cargo run --example export -- Patient [name=value ...] [--out FILE]
//! cargo run --example export -- Observation code=http://loinc.org|777-3 --out platelets.ndjson
//! ```
//!
//! Without `BLAZE_*` variables it runs against the embedded stand-in; with them, against that
//! server. Resources go to stdout (or `--out`), progress and errors to stderr; a failure exits
//! non-zero.

mod common;

use blaze_auth::BoxError;
use std::io::{BufWriter, Write};

const USAGE: &str = "usage: export <ResourceType> [name=value ...] [--out FILE]";

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
}

fn args() -> Result<Args, BoxError> {
    let mut args = std::env::args().skip(1);
    let mut resource = None;
    let mut params = Vec::new();
    let mut out = None;
    while let Some(arg) = args.next() {
        if arg == "--out" {
            out = Some(args.next().ok_or(USAGE)?);
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
    })
}

async fn run() -> Result<(), BoxError> {
    let args = args()?;
    let blaze = common::connect().await?;
    let query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(&args.params)
        .finish();
    let url = format!("{}/{}?{query}", blaze.api_url, args.resource);

    let mut out: Box<dyn Write> = match &args.out {
        Some(path) => Box::new(BufWriter::new(std::fs::File::create(path)?)),
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    let mut written = 0;
    let pages = common::search(&blaze.client, &url, |bundle| {
        for resource in common::resources(bundle) {
            serde_json::to_writer(&mut out, resource)?;
            out.write_all(b"\n")?;
            written += 1;
        }
        eprint!("\r{}: {written} resources", args.resource);
        Ok(())
    })
    .await?;
    out.flush()?;
    eprintln!("\r{}: {written} resources in {pages} pages", args.resource);
    Ok(())
}
