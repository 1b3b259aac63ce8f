//! `switchyard check`: the config and every file it names, all problems listed.

use std::path::Path;
use std::process::ExitCode;

use crate::config::{self, Config};

/// `switchyard check`: every problem as `FILE:line: message`, exit 1; or ok.
pub(super) fn check(path: &Path) -> ExitCode {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let mut problems = Vec::new();
    let store = crate::control_plane::store::FileStore::new(config.state.path.clone());
    if let Err(e) = crate::control_plane::store::StateStore::load(&store) {
        problems.push(e.to_string());
    }
    if config.proxy.tls_listen.is_some() {
        if let Err(errors) = crate::data_plane::tls::server_config(&config.proxy.tls) {
            for e in errors {
                problems.push(format!("{}:{}: {e}", path.display(), tls_line(&config, &e)));
            }
        }
    }
    if let Some(f) = &config.admin.token_file {
        if let Err(e) = crate::control_plane::admin::auth::Tokens::load(f) {
            problems.push(e);
        }
    }
    for svc in &config.services {
        if svc.upstream_insecure_skip_verify {
            eprintln!(
                "{}:{}: warning: service \"{}\": upstream_insecure_skip_verify = true: \
                 backend TLS certificates are NOT verified",
                path.display(),
                svc.line,
                svc.name
            );
        }
        if let Some(ca) = &svc.upstream_ca {
            if let Err(e) = crate::data_plane::tls::UpstreamTls::new(Some(ca), false) {
                problems.push(format!(
                    "{}:{}: service \"{}\": upstream_ca: {e}",
                    path.display(),
                    svc.line,
                    svc.name
                ));
            }
        }
    }
    if problems.is_empty() {
        println!(
            "{}: ok ({} services)",
            path.display(),
            config.services.len()
        );
        ExitCode::SUCCESS
    } else {
        for p in problems {
            eprintln!("{p}");
        }
        ExitCode::FAILURE
    }
}

/// The config line of the `[[proxy.tls]]` entry an error is about.
fn tls_line(config: &Config, error: &str) -> usize {
    config
        .proxy
        .tls
        .iter()
        .find(|t| {
            error.starts_with(&t.cert.display().to_string())
                || error.starts_with(&t.key.display().to_string())
        })
        .map_or(0, |t| t.line)
}
