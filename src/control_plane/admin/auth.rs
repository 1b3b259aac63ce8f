//! Admin API tokens (SPEC §4): one per line in `token_file`, `NAME:SECRET`
//! or a bare `SECRET` (named `admin`). Blank lines and `#` comments are
//! skipped. Secrets are compared in constant time.

use std::path::Path;

use crate::config::FileError;
use crate::data_plane::routing::constant_time_eq;

/// The accepted tokens; empty means the API is open (no `token_file`).
#[derive(Debug, Default)]
pub(crate) struct Tokens {
    entries: Vec<(String, Vec<u8>)>,
    required: bool,
}

impl Tokens {
    /// No token file: every caller is allowed.
    pub(crate) fn none() -> Tokens {
        Tokens::default()
    }

    /// Reads a token file; the error names the file and line.
    pub(crate) fn load(path: &Path) -> Result<Tokens, FileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| FileError::new(path, 0, format!("cannot read token file: {e}")))?;
        Tokens::parse(&text).map_err(|(line, msg)| FileError::new(path, line, msg))
    }

    /// Parses token file text.
    pub(crate) fn parse(text: &str) -> Result<Tokens, (usize, String)> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, secret) = match line.split_once(':') {
                Some((n, s)) => (n.trim(), s.trim()),
                None => ("admin", line),
            };
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
            {
                return Err((i + 1, format!("invalid token name `{name}`")));
            }
            if secret.len() < 8 {
                return Err((
                    i + 1,
                    format!("token `{name}`: secret shorter than 8 characters"),
                ));
            }
            entries.push((name.to_string(), secret.as_bytes().to_vec()));
        }
        if entries.is_empty() {
            return Err((1, "no token in file".into()));
        }
        Ok(Tokens {
            entries,
            required: true,
        })
    }

    /// Is a token required?
    pub(crate) fn required(&self) -> bool {
        self.required
    }

    /// The name of the token in `Authorization: Bearer TOKEN`, if valid.
    /// The scheme is matched in any case (RFC 9110 §11.1: `bearer`,
    /// `BEARER`), followed by one or more spaces. Every entry is compared,
    /// so timing does not tell which matched.
    pub(crate) fn check(&self, authorization: Option<&[u8]>) -> Option<&str> {
        let value = authorization?.trim_ascii_start();
        let (scheme, rest) = value.split_at_checked(b"Bearer".len())?;
        if !scheme.eq_ignore_ascii_case(b"Bearer") || !rest.starts_with(b" ") {
            return None;
        }
        let given = rest.trim_ascii();
        let mut found = None;
        for (name, secret) in &self.entries {
            if constant_time_eq(given, secret) && found.is_none() {
                found = Some(name.as_str());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_check() {
        let t = Tokens::parse("# pipelines\nci:abcdefgh12\n\nsecret-for-admin\n").expect("parse");
        assert_eq!(t.check(Some(b"Bearer abcdefgh12")), Some("ci"));
        assert_eq!(t.check(Some(b"Bearer secret-for-admin")), Some("admin"));
        assert_eq!(t.check(Some(b"Bearer nope")), None);
        assert_eq!(t.check(Some(b"abcdefgh12")), None);
        // The scheme is case-insensitive (RFC 9110 §11.1), the secret is not.
        assert_eq!(t.check(Some(b"bearer abcdefgh12")), Some("ci"));
        assert_eq!(t.check(Some(b"BEARER abcdefgh12")), Some("ci"));
        assert_eq!(t.check(Some(b"bEaReR  abcdefgh12")), Some("ci"));
        assert_eq!(t.check(Some(b"Bearer ABCDEFGH12")), None);
        assert_eq!(t.check(Some(b"Bearerabcdefgh12")), None);
        assert_eq!(t.check(Some(b"Basic abcdefgh12")), None);
        assert_eq!(t.check(Some(b"Bear")), None);
        assert_eq!(t.check(None), None);
        assert!(Tokens::parse("a:short").is_err());
        assert!(Tokens::parse("\n# only comments\n").is_err());
    }
}
