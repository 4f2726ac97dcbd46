//! Who may call (DESIGN.md §8): `[callers.NAME]`, `[auth]` and `[server.tls]` as written in the
//! file, checked into [`AuthConfig`] and [`TlsConfig`]. Tokens are kept only as SHA-256 hashes.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::{AppConfig, ConfigError};

/// The caller name anonymous calls are counted under (metrics, queue share).
pub const ANONYMOUS: &str = "anonymous";

/// The caller id of anonymous calls; configured callers follow from 1.
pub const ANONYMOUS_ID: usize = 0;

/// Which apps a caller may send as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppGrant {
    /// `apps = ["*"]`.
    All,
    /// Configured app names.
    Only(Vec<String>),
}

impl AppGrant {
    pub fn allows(&self, app: &str) -> bool {
        match self {
            AppGrant::All => true,
            AppGrant::Only(names) => names.iter().any(|n| n == app),
        }
    }
}

/// What a caller may submit: its rate and its share of the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallerLimits {
    /// Replies per second admitted (token bucket).
    pub rate: NonZeroU32,
    pub burst: NonZeroU32,
    /// Replies it may have queued at once.
    pub max_queued: usize,
    /// Bytes its queued replies may hold at once (content + per-job overhead).
    pub max_queued_bytes: usize,
}

/// One configured caller.
#[derive(Clone, PartialEq, Eq)]
pub struct CallerConfig {
    pub name: String,
    /// SHA-256 of its bearer token (the token itself is not kept).
    pub token_sha256: Option<[u8; 32]>,
    /// mTLS client certificate names (SAN URI or DNS) that identify it.
    pub tls_identities: Vec<String>,
    pub apps: AppGrant,
    pub limits: CallerLimits,
    /// May use the admin service (introspection).
    pub admin: bool,
    /// Owns the jobs its name's earlier credentials submitted (a planned rotation); else a
    /// credential rotated out takes its queued and stored work with it (`CALLER_REMOVED`).
    pub inherits_jobs: bool,
}

impl CallerConfig {
    /// The fingerprints of its credentials now (see [`credential_fingerprint`]).
    pub fn credentials(&self) -> Vec<Arc<str>> {
        self.token_sha256
            .iter()
            .map(|h| credential_fingerprint(b'T', h))
            .chain(
                self.tls_identities
                    .iter()
                    .map(|i| credential_fingerprint(b'M', i.as_bytes())),
            )
            .collect()
    }
}

/// The stable identity of one credential, stored with the work submitted with it: 16 hex
/// digits of SHA-256 over its kind (`T` token, `M` mTLS identity) and its value (the token's
/// SHA-256, or the certificate name). It names the credential without revealing the token.
pub fn credential_fingerprint(kind: u8, value: &[u8]) -> Arc<str> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"feishu-reply-gateway credential\0");
    ctx.update(&[kind]);
    ctx.update(value);
    let d = ctx.finish();
    d.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .into()
}

/// Which queued and stored work a caller still owns: work submitted with one of its
/// credentials now, or with any earlier credential of its name when it inherits. A caller
/// removed by a reload owns nothing (its work fails `CALLER_REMOVED`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    /// The caller's name.
    pub name: Arc<str>,
    /// Fingerprints of its credentials now; empty: removed (or anonymous).
    pub credentials: Vec<Arc<str>>,
    /// `inherits_jobs`.
    pub inherits: bool,
    /// Anonymous calls while they are allowed: their work has no credential to revoke.
    pub anyone: bool,
}

impl Ownership {
    /// Whether work submitted with `credential` (empty: stored before credentials were
    /// recorded, owned by the name) is still this caller's.
    pub fn holds(&self, credential: &str) -> bool {
        if self.anyone {
            return true;
        }
        !self.credentials.is_empty()
            && (credential.is_empty()
                || self.inherits
                || self.credentials.iter().any(|c| **c == *credential))
    }
}

impl std::fmt::Debug for CallerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerConfig")
            .field("name", &self.name)
            .field("token", &self.token_sha256.map(|_| "<sha256>"))
            .field("tls_identities", &self.tls_identities)
            .field("apps", &self.apps)
            .field("limits", &self.limits)
            .field("admin", &self.admin)
            .field("inherits_jobs", &self.inherits_jobs)
            .finish()
    }
}

/// Who may call, and the limits of anonymous callers (when they are allowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    pub callers: Vec<CallerConfig>,
    /// Calls without credentials are served (only when no caller is configured).
    pub allow_anonymous: bool,
    /// Limits of anonymous calls: the rate applies per peer address, the queue share to all
    /// anonymous calls together.
    pub anonymous: CallerLimits,
}

impl AuthConfig {
    /// Every caller's limits by caller id: anonymous (id [`ANONYMOUS_ID`]), then the
    /// configured callers in order. The one place that numbering is made (the authenticator
    /// and the scheduler share it). Anonymous comes first so that callers added by a reload
    /// (appended) leave every id in use where it was.
    pub fn limits_by_id(&self) -> Vec<CallerLimits> {
        [self.anonymous]
            .into_iter()
            .chain(self.callers.iter().map(|c| c.limits))
            .collect()
    }

    /// What each caller owns, by caller id (anonymous first, as [`AuthConfig::limits_by_id`]).
    pub fn ownership_by_id(&self) -> Vec<Ownership> {
        let anonymous = Ownership {
            name: ANONYMOUS.into(),
            credentials: Vec::new(),
            inherits: false,
            anyone: self.allow_anonymous,
        };
        [anonymous]
            .into_iter()
            .chain(self.callers.iter().map(|c| Ownership {
                name: c.name.as_str().into(),
                credentials: c.credentials(),
                inherits: c.inherits_jobs,
                anyone: false,
            }))
            .collect()
    }
}

/// `[server.tls]`: the gRPC port speaks TLS; with a client CA, client certificates signed by
/// it are verified (optional: token callers need none) and name callers by `tls_identities`.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("cert_pem", &format_args!("<{} bytes>", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .field("client_ca", &self.client_ca_pem.is_some())
            .finish()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCaller {
    token_env: Option<String>,
    token_sha256: Option<String>,
    #[serde(default)]
    tls_identities: Vec<String>,
    apps: Vec<String>,
    rate: Option<u32>,
    burst: Option<u32>,
    max_queued: Option<usize>,
    max_queued_bytes: Option<usize>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    inherits_jobs: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileAuth {
    allow_anonymous: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTls {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub client_ca_file: Option<PathBuf>,
}

/// The parts of the file and environment this module reads.
pub(super) struct AuthInput<'a> {
    pub callers: BTreeMap<String, FileCaller>,
    pub auth: FileAuth,
    /// `GATEWAY_ALLOW_ANONYMOUS` / `--allow-anonymous`.
    pub allow_anonymous_override: bool,
    pub tls: Option<FileTls>,
    pub apps: &'a [AppConfig],
    pub defaults: CallerLimits,
    pub anonymous: CallerLimits,
}

fn invalid(m: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(m.into())
}

/// SHA-256 of a bearer token, the form tokens are kept and compared in.
pub fn token_hash(token: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token);
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn read_pem(what: &str, path: &Path, marker: &[u8]) -> Result<Vec<u8>, ConfigError> {
    let pem = super::read_capped(path)
        .map_err(|e| invalid(format!("server.tls.{what} {}: {e}", path.display())))?;
    if !pem.windows(marker.len()).any(|w| w == marker) {
        return Err(invalid(format!(
            "server.tls.{what} {}: no PEM {} in it",
            path.display(),
            String::from_utf8_lossy(marker).trim_matches('-')
        )));
    }
    Ok(pem)
}

fn tls_config(tls: Option<FileTls>) -> Result<Option<TlsConfig>, ConfigError> {
    let Some(t) = tls else { return Ok(None) };
    let (cert, key) = match (t.cert_file, t.key_file) {
        (None, None) if t.client_ca_file.is_none() => return Ok(None),
        (Some(c), Some(k)) => (c, k),
        _ => {
            return Err(invalid(
                "server.tls needs both cert_file and key_file (GATEWAY_TLS_CERT, GATEWAY_TLS_KEY)",
            ));
        }
    };
    Ok(Some(TlsConfig {
        cert_pem: read_pem("cert_file", &cert, b"-----BEGIN CERTIFICATE-----")?,
        key_pem: read_pem("key_file", &key, b"PRIVATE KEY-----")?,
        client_ca_pem: t
            .client_ca_file
            .map(|p| read_pem("client_ca_file", &p, b"-----BEGIN CERTIFICATE-----"))
            .transpose()?,
    }))
}

/// Checks `[callers.*]`, `[auth]` and `[server.tls]` against the apps.
pub(super) fn build(input: AuthInput<'_>) -> Result<(AuthConfig, Option<TlsConfig>), ConfigError> {
    let tls = tls_config(input.tls)?;
    let mut callers = Vec::new();
    let mut tokens: HashMap<[u8; 32], String> = HashMap::new();
    let mut identities: HashMap<String, String> = HashMap::new();
    for (name, c) in input.callers {
        if name == ANONYMOUS {
            return Err(invalid(format!(
                "callers.{ANONYMOUS}: the name is reserved for unauthenticated calls"
            )));
        }
        let token_sha256 = match (c.token_env, c.token_sha256) {
            (Some(_), Some(_)) => {
                return Err(invalid(format!(
                    "callers.{name}: give at most one of token_env, token_sha256"
                )));
            }
            (Some(var), None) => {
                let token = std::env::var(&var).map_err(|_| {
                    invalid(format!(
                        "callers.{name}.token_env names {var}, which is not set"
                    ))
                })?;
                if token.trim().len() < 16 {
                    return Err(invalid(format!(
                        "callers.{name}: the token in {var} is shorter than 16 characters"
                    )));
                }
                Some(token_hash(token.trim().as_bytes()))
            }
            (None, Some(hex)) => Some(parse_hex32(&hex).ok_or_else(|| {
                invalid(format!(
                    "callers.{name}.token_sha256 must be 64 hex digits (sha256sum of the token)"
                ))
            })?),
            (None, None) => None,
        };
        if token_sha256.is_none() && c.tls_identities.is_empty() {
            return Err(invalid(format!(
                "callers.{name}: give token_env, token_sha256 or tls_identities"
            )));
        }
        if !c.tls_identities.is_empty() && tls.as_ref().is_none_or(|t| t.client_ca_pem.is_none()) {
            return Err(invalid(format!(
                "callers.{name}.tls_identities needs [server.tls] with client_ca_file (GATEWAY_TLS_CLIENT_CA)"
            )));
        }
        if let Some(h) = token_sha256
            && let Some(other) = tokens.insert(h, name.clone())
        {
            return Err(invalid(format!(
                "callers.{other} and callers.{name} have the same token"
            )));
        }
        for id in &c.tls_identities {
            if let Some(other) = identities.insert(id.clone(), name.clone()) {
                return Err(invalid(format!(
                    "callers.{other} and callers.{name} both claim the TLS identity {id:?}"
                )));
            }
        }
        let apps = if c.apps.iter().any(|a| a == "*") {
            AppGrant::All
        } else {
            if c.apps.is_empty() {
                return Err(invalid(format!(
                    "callers.{name}.apps is empty: name its apps, or [\"*\"] for all"
                )));
            }
            if let Some(a) = c
                .apps
                .iter()
                .find(|a| !input.apps.iter().any(|x| &x.name == *a))
            {
                return Err(invalid(format!(
                    "callers.{name}.apps: {a:?} is not one of [apps.*]"
                )));
            }
            AppGrant::Only(c.apps)
        };
        let d = input.defaults;
        let nz = |what: &str, v: Option<u32>, default: NonZeroU32| match v {
            None => Ok(default),
            Some(v) => NonZeroU32::new(v)
                .ok_or_else(|| invalid(format!("callers.{name}.{what} must be > 0"))),
        };
        let rate = nz("rate", c.rate, d.rate)?;
        // DESIGN §8: burst 2x the rate unless said otherwise.
        let default_burst = rate.saturating_mul(NonZeroU32::new(2).expect("2 > 0"));
        let limits = CallerLimits {
            rate,
            burst: nz("burst", c.burst, default_burst)?,
            max_queued: c.max_queued.unwrap_or(d.max_queued),
            max_queued_bytes: c.max_queued_bytes.unwrap_or(d.max_queued_bytes),
        };
        if limits.max_queued == 0 || limits.max_queued_bytes == 0 {
            return Err(invalid(format!(
                "callers.{name}: max_queued and max_queued_bytes must be > 0"
            )));
        }
        callers.push(CallerConfig {
            name,
            token_sha256,
            tls_identities: c.tls_identities,
            apps,
            limits,
            admin: c.admin,
            inherits_jobs: c.inherits_jobs,
        });
    }
    let allow_anonymous = input.auth.allow_anonymous || input.allow_anonymous_override;
    if allow_anonymous && !callers.is_empty() {
        return Err(invalid(
            "allow_anonymous (GATEWAY_ALLOW_ANONYMOUS) cannot be combined with [callers.*]: \
             when callers are configured every call must authenticate",
        ));
    }
    Ok((
        AuthConfig {
            callers,
            allow_anonymous,
            anonymous: input.anonymous,
        },
        tls,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_hashes_are_sha256() {
        // sha256("abc")
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(Some(token_hash(b"abc")), parse_hex32(want));
        assert_eq!(parse_hex32("xyz"), None);
        assert_eq!(parse_hex32(&"g".repeat(64)), None);
    }

    #[test]
    fn work_is_owned_by_the_credentials_it_was_submitted_with() {
        let token = credential_fingerprint(b'T', &token_hash(b"0123456789abcdef"));
        let cert = credential_fingerprint(b'M', b"spiffe://x");
        assert_eq!(token.len(), 16);
        assert_ne!(
            token,
            credential_fingerprint(b'T', &token_hash(b"0123456789abcdeg"))
        );
        assert_ne!(
            credential_fingerprint(b'T', b"spiffe://x"),
            credential_fingerprint(b'M', b"spiffe://x")
        );
        let mut o = Ownership {
            name: "x".into(),
            credentials: vec![token.clone()],
            inherits: false,
            anyone: false,
        };
        assert!(o.holds(&token) && o.holds(""));
        assert!(!o.holds(&cert), "another credential's work");
        o.inherits = true;
        assert!(o.holds(&cert), "a planned rotation inherits");
        o.credentials.clear();
        assert!(
            !o.holds(&token) && !o.holds(""),
            "a removed caller owns nothing"
        );
        o.anyone = true;
        assert!(o.holds(""));
    }
}
