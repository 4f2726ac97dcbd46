//! Who is calling (DESIGN.md §8): a configured caller proven by a bearer token or an mTLS
//! client certificate, or an anonymous call where anonymous calls are allowed on purpose.
//! Admission, queue shares and metrics key on the result, never on a value the caller chose.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use tonic::Request;
use tonic::transport::CertificateDer;

use crate::config::{
    ANONYMOUS, ANONYMOUS_ID, AppGrant, AuthConfig, CallerLimits, Ownership, credential_fingerprint,
    token_hash,
};

/// Index of a caller: the configured callers in order, then anonymous.
pub type CallerId = usize;

/// The metadata key of bearer tokens.
pub const AUTHORIZATION: &str = "authorization";

/// The name unauthenticated calls are counted under in metrics.
pub const UNAUTHENTICATED: &str = crate::metrics::UNAUTHENTICATED_CALLER;

/// Why a call was not authenticated. The messages never quote what the caller sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "no credentials: send metadata `authorization: Bearer <token>` or a client certificate"
    )]
    Missing,
    #[error("the authorization metadata is not `Bearer <token>`")]
    Malformed,
    #[error("the bearer token is not one of this gateway's callers")]
    UnknownToken,
    #[error("the client certificate names no caller of this gateway")]
    UnknownCertificate,
    #[error("the bearer token and the client certificate name different callers")]
    Conflict,
}

impl AuthError {
    /// `ErrorInfo.reason`.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "CREDENTIALS_MISSING",
            AuthError::Malformed | AuthError::UnknownToken | AuthError::UnknownCertificate => {
                "CREDENTIALS_INVALID"
            }
            AuthError::Conflict => "CREDENTIALS_CONFLICT",
        }
    }
}

/// An authenticated call.
#[derive(Debug, Clone)]
pub struct Caller {
    pub id: CallerId,
    /// The configured name, or `anonymous`.
    pub name: Arc<str>,
    pub anonymous: bool,
    /// Fingerprint of the credential it proved itself with (empty: anonymous): the work it
    /// submits is owned by it (`config::Ownership`).
    pub credential: Arc<str>,
}

/// Decides who a call is from. Built once from the configuration.
pub struct Authenticator {
    /// Caller and credential fingerprint by token hash, and by certificate name.
    by_token: HashMap<[u8; 32], (CallerId, Arc<str>)>,
    by_identity: HashMap<String, (CallerId, Arc<str>)>,
    /// What each caller owns, by id.
    owners: Vec<Ownership>,
    grants: Vec<AppGrant>,
    /// May use the admin service, by caller id.
    admins: Vec<bool>,
    limits: Vec<CallerLimits>,
    names: Vec<Arc<str>>,
    allow_anonymous: bool,
}

impl Authenticator {
    pub fn new(config: &AuthConfig) -> Self {
        let mut by_token = HashMap::new();
        let mut by_identity = HashMap::new();
        for (i, c) in config.callers.iter().enumerate() {
            let id = i + 1; // after anonymous (ANONYMOUS_ID)
            if let Some(h) = c.token_sha256 {
                by_token.insert(h, (id, credential_fingerprint(b'T', &h)));
            }
            for name in &c.tls_identities {
                let fp = credential_fingerprint(b'M', name.as_bytes());
                by_identity.insert(name.clone(), (id, fp));
            }
        }
        let names = [Arc::from(ANONYMOUS)]
            .into_iter()
            .chain(config.callers.iter().map(|c| Arc::from(c.name.as_str())))
            .collect();
        Self {
            by_token,
            by_identity,
            owners: config.ownership_by_id(),
            // Anonymous calls may use any app; `is_admin` decides theirs from allow_anonymous.
            grants: [AppGrant::All]
                .into_iter()
                .chain(config.callers.iter().map(|c| c.apps.clone()))
                .collect(),
            admins: [false]
                .into_iter()
                .chain(config.callers.iter().map(|c| c.admin))
                .collect(),
            limits: config.limits_by_id(),
            names,
            allow_anonymous: config.allow_anonymous,
        }
    }

    /// May `caller` use the admin service? Configured callers with `admin = true`, and
    /// anyone when anonymous calls are allowed (no credentials are checked at all then).
    pub fn is_admin(&self, caller: &Caller) -> bool {
        if caller.anonymous {
            return self.allow_anonymous;
        }
        self.admins.get(caller.id).copied().unwrap_or(false)
    }

    /// The caller named `name` (`anonymous` included): its id, limits, apps (None: any)
    /// and whether it is an admin.
    pub fn describe(&self, name: &str) -> Option<CallerView> {
        let id = self.names.iter().position(|n| **n == *name)?;
        let anonymous = id == ANONYMOUS_ID;
        Some(CallerView {
            id,
            limits: self.limits[id],
            apps: match self.grants.get(id) {
                Some(AppGrant::Only(names)) => Some(names.clone()),
                _ => None,
            },
            admin: if anonymous {
                self.allow_anonymous
            } else {
                self.admins[id]
            },
        })
    }

    /// What every caller owns, by id (anonymous first).
    pub fn owners(&self) -> &[Ownership] {
        &self.owners
    }

    /// Every caller's name by id (anonymous first), for metrics.
    pub fn names(&self) -> &[Arc<str>] {
        &self.names
    }

    /// Every caller's limits by id (anonymous first).
    pub fn limits(&self) -> &[CallerLimits] {
        &self.limits
    }

    fn anonymous(&self) -> Caller {
        Caller {
            id: ANONYMOUS_ID,
            name: self.names[ANONYMOUS_ID].clone(),
            anonymous: true,
            credential: "".into(),
        }
    }

    /// Whether work that caller `name` submitted with `credential` is `caller`'s: the same
    /// name, and a credential it still owns (its own now, or any when it inherits jobs).
    pub fn owns(&self, caller: &Caller, name: &str, credential: &str) -> bool {
        *caller.name == *name
            && self
                .owners
                .get(caller.id)
                .is_some_and(|o| o.holds(credential))
    }

    /// Who sent `req`: its bearer token and/or its verified client certificate.
    pub fn authenticate<T>(&self, req: &Request<T>) -> Result<Caller, AuthError> {
        if self.allow_anonymous {
            return Ok(self.anonymous());
        }
        let by_token = match req.metadata().get(AUTHORIZATION) {
            None => None,
            Some(v) => Some(self.token_caller(v.as_bytes())?),
        };
        let by_cert = match req.peer_certs() {
            Some(certs) if !certs.is_empty() => Some(self.cert_caller(&certs[0])),
            _ => None,
        };
        // Both naming one caller: the token is the credential its work is owned by.
        let (id, credential) = match (by_token, by_cert) {
            (None, None) => return Err(AuthError::Missing),
            (Some(t), None | Some(None)) => t,
            (None, Some(c)) => c.ok_or(AuthError::UnknownCertificate)?,
            (Some(t), Some(Some(c))) if t.0 == c.0 => t,
            (Some(_), Some(Some(_))) => return Err(AuthError::Conflict),
        };
        Ok(Caller {
            id,
            name: self.names[id].clone(),
            anonymous: false,
            credential,
        })
    }

    fn token_caller(&self, header: &[u8]) -> Result<(CallerId, Arc<str>), AuthError> {
        let token = match header.iter().position(|&b| b == b' ') {
            Some(i) if header[..i].eq_ignore_ascii_case(b"bearer") => header[i + 1..].trim_ascii(),
            _ => return Err(AuthError::Malformed),
        };
        if token.is_empty() {
            return Err(AuthError::Malformed);
        }
        // Looked up by hash: the lookup's timing says nothing about the token's bytes.
        self.by_token
            .get(&token_hash(token))
            .cloned()
            .ok_or(AuthError::UnknownToken)
    }

    /// The caller a verified client certificate names (SAN URI or DNS), if any.
    fn cert_caller(&self, cert: &CertificateDer<'_>) -> Option<(CallerId, Arc<str>)> {
        let cert = webpki::EndEntityCert::try_from(cert).ok()?;
        cert.valid_uri_names()
            .chain(cert.valid_dns_names())
            .find_map(|n| self.by_identity.get(n).cloned())
    }

    /// Whether `caller` may send as `app`.
    pub fn allows(&self, caller: &Caller, app: &str) -> bool {
        caller.anonymous || self.grants.get(caller.id).is_some_and(|g| g.allows(app))
    }
}

/// A configured caller as [`Authenticator::describe`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerView {
    /// Its id (the scheduler's `JobSpec::caller`).
    pub id: CallerId,
    pub limits: CallerLimits,
    /// The apps it may use; None: any.
    pub apps: Option<Vec<String>>,
    pub admin: bool,
}

/// Admission rate limits: one bucket per configured caller, one per peer address for
/// anonymous calls (so memory grows with addresses, not with what callers write).
pub struct Admission {
    callers: Vec<Arc<governor::DefaultDirectRateLimiter>>,
    /// The limits each bucket was made with (by caller id).
    limits: Vec<CallerLimits>,
    anonymous: Arc<governor::DefaultKeyedRateLimiter<IpAddr>>,
}

fn bucket(l: &CallerLimits) -> governor::Quota {
    governor::Quota::per_second(l.rate).allow_burst(l.burst)
}

impl Admission {
    pub fn new(limits: &[CallerLimits]) -> Self {
        Self {
            // By caller id; the anonymous entry is never used (anonymous calls are limited per
            // peer address below).
            callers: limits
                .iter()
                .map(|l| Arc::new(governor::RateLimiter::direct(bucket(l))))
                .collect(),
            limits: limits.to_vec(),
            anonymous: Arc::new(governor::RateLimiter::keyed(bucket(&limits[ANONYMOUS_ID]))),
        }
    }

    /// The buckets for `limits` after a live reload: a caller whose limits stay keeps its
    /// bucket (a reload is no way around a rate limit); changed and new ones start full.
    pub fn next(&self, limits: &[CallerLimits]) -> Self {
        let keep = |id: usize| self.limits.get(id) == Some(&limits[id]);
        Self {
            callers: (0..limits.len())
                .map(|id| match keep(id) {
                    true => self.callers[id].clone(),
                    false => Arc::new(governor::RateLimiter::direct(bucket(&limits[id]))),
                })
                .collect(),
            limits: limits.to_vec(),
            anonymous: match keep(ANONYMOUS_ID) {
                true => self.anonymous.clone(),
                false => Arc::new(governor::RateLimiter::keyed(bucket(&limits[ANONYMOUS_ID]))),
            },
        }
    }

    /// Takes one call from `caller`'s bucket; `Err(wait)` when it is empty.
    pub fn check(&self, caller: &Caller, peer: IpAddr) -> Result<(), std::time::Duration> {
        use governor::clock::{Clock, DefaultClock};
        let r = match self.callers.get(caller.id) {
            Some(l) if !caller.anonymous => l.check(),
            _ => self.anonymous.check_key(&peer),
        };
        r.map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Forgets anonymous buckets that went quiet (bounded memory).
    pub fn forget_idle(&self) {
        self.anonymous.retain_recent();
        self.anonymous.shrink_to_fit();
    }
}
