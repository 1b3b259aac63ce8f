//! `switchyard check`: the config and every file it names, all problems listed.

use std::path::Path;
use std::process::ExitCode;

use crate::config;

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
    if let Err(e) = store.load() {
        problems.push(e.to_string());
    }
    // The same loader as start and reload: certificates, token file, CAs.
    if let Err(errors) = crate::control_plane::files::LoadedFiles::load(&config, path) {
        problems.extend(errors.iter().map(ToString::to_string));
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
