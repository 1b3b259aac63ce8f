//! The files a config names besides itself (the `[[proxy.tls]]`
//! certificates and keys, the admin token file, the services' upstream CA
//! bundles), loaded one way for `switchyard check`, start and reload, with
//! every problem as a [`FileError`].

use std::path::Path;
use std::sync::Arc;

use crate::config::{Config, FileError};
use crate::control_plane::admin::auth::Tokens;
use crate::data_plane::tls::UpstreamTls;

/// Every file of a config, loaded and checked.
pub(crate) struct LoadedFiles {
    /// The TLS listener's settings (`None` without `proxy.tls_listen`).
    pub(crate) server_tls: Option<Arc<rustls::ServerConfig>>,
    /// Admin API tokens (none required without `admin.token_file`).
    pub(crate) tokens: Tokens,
}

impl LoadedFiles {
    /// Loads every file `config` (read from `config_path`) names; all
    /// problems are reported, not only the first. CA bundles are read to
    /// check them; the control plane reads them again when it builds the
    /// routing table.
    pub(crate) fn load(config: &Config, config_path: &Path) -> Result<LoadedFiles, Vec<FileError>> {
        let mut errors = Vec::new();
        let server_tls = match config.proxy.tls_listen {
            Some(_) => match crate::data_plane::tls::server_config(&config.proxy.tls) {
                Ok(c) => Some(c),
                Err(problems) => {
                    errors.extend(
                        problems
                            .into_iter()
                            .map(|(line, msg)| FileError::new(config_path, line, msg)),
                    );
                    None
                }
            },
            None => None,
        };
        let tokens = match &config.admin.token_file {
            Some(f) => Tokens::load(f).unwrap_or_else(|e| {
                errors.push(e);
                Tokens::none()
            }),
            None => Tokens::none(),
        };
        for svc in &config.services {
            if let Some(ca) = &svc.upstream_ca {
                if let Err(e) = UpstreamTls::new(Some(ca), false) {
                    errors.push(upstream_ca_error(config_path, svc, &e));
                }
            }
        }
        if errors.is_empty() {
            Ok(LoadedFiles { server_tls, tokens })
        } else {
            Err(errors)
        }
    }
}

/// A service's `upstream_ca` that cannot be used, at the service's line.
pub(crate) fn upstream_ca_error(
    config_path: &Path,
    svc: &crate::config::ServiceConfig,
    e: &str,
) -> FileError {
    FileError::new(
        config_path,
        svc.line,
        format!("service \"{}\": upstream_ca: {e}", svc.name),
    )
}
