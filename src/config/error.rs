//! What goes wrong reading the configuration, said without quoting it: the file's lines (and
//! serde's messages about their values) may hold secrets.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The parser's own error is not kept: it quotes the offending line, which may hold a
    /// secret. `message` has quoted fragments removed.
    #[error("config file {path}: line {line}, column {column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error(
        "no Feishu app configured: set FEISHU_APP_ID and FEISHU_APP_SECRET, or [apps.<name>] in \
         the config file; to try the gateway without Feishu, run `serve --embedded-fake` \
         (GATEWAY_EMBEDDED_FAKE=1): replies then go to an embedded fake, not to Feishu"
    )]
    NoApp,
    #[error(
        "Feishu apps are configured but no caller is: anyone reaching the gRPC port could post \
         as them. Configure [callers.<name>] (a bearer token or an mTLS identity, see README \
         \"Callers\"), or allow unauthenticated callers on purpose with [auth] allow_anonymous = \
         true (GATEWAY_ALLOW_ANONYMOUS=1)"
    )]
    NoCaller,
}

/// A TOML error that says where (line, column) and what, without quoting the file: the
/// offending line may hold a secret, and serde's type errors quote values.
pub(super) fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let at = e.span().map_or(0, |s| s.start).min(text.len());
    let before = &text.as_bytes()[..at];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = at
        - before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1)
        + 1;
    ConfigError::Parse {
        path: path.into(),
        line,
        column,
        message: redact_quoted(e.message()),
    }
}

/// `msg` with every `"…"`, `'…'` and `` `…` `` fragment replaced by `…`.
fn redact_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut open: Option<char> = None;
    for c in msg.chars() {
        match open {
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                open = None;
            }
            Some(_) => {}
            None if matches!(c, '"' | '\'' | '`') => {
                out.push(c);
                open = Some(c);
            }
            None => out.push(c),
        }
    }
    if open.is_some() {
        out.push('…');
    }
    out
}
