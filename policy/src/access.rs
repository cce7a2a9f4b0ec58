//! Access control: namespaces and grants.
//!
//! Every pin and topology name belongs to one namespace. A grant gives a subject a
//! permission on a namespace; subjects are `member:PEER` (the base58 PeerId), `role:R`,
//! `zone:Z`, `tag:T`, or `*` (every member). Permissions nest: `admin` includes `publish`,
//! which includes `read`.
//!
//! Two rules hold without grants, so a new cluster works before anyone writes one:
//! managers hold `admin` on every namespace, and every member may `read` the namespace
//! [`DEFAULT_NAMESPACE`]. Any other namespace is closed until granted.

/// The namespace of content nobody placed elsewhere; every member may read it.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Longest namespace name.
pub const NAMESPACE_BYTES_MAX: usize = 64;

/// A permission on a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    /// Fetch the namespace's content.
    Read,
    /// Pin content or propose topology versions in it.
    Publish,
    /// Grant and revoke; everything else.
    Admin,
}

impl Permission {
    /// The name used in grants and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Publish => "publish",
            Permission::Admin => "admin",
        }
    }

    /// Parses [`Permission::as_str`].
    pub fn parse(s: &str) -> Option<Permission> {
        Some(match s {
            "read" => Permission::Read,
            "publish" => Permission::Publish,
            "admin" => Permission::Admin,
            _ => return None,
        })
    }
}

/// Checks a grant's subject and namespace; the message says what is wrong.
///
/// # Errors
/// A message naming the accepted forms.
pub fn validate_grant(subject: &str, permission: &str, namespace: &str) -> Result<(), String> {
    Permission::parse(permission)
        .ok_or_else(|| format!("unknown permission {permission:?}: use read, publish or admin"))?;
    validate_namespace(namespace)?;
    let ok = subject == "*"
        || ["member:", "role:", "zone:", "tag:"]
            .iter()
            .any(|p| subject.strip_prefix(p).is_some_and(|rest| !rest.is_empty()));
    if !ok || subject.len() > 128 {
        return Err(format!(
            "bad subject {subject:?}: use member:PEER, role:ROLE, zone:ZONE, tag:TAG or *"
        ));
    }
    Ok(())
}

/// Checks a namespace name: 1 to 64 bytes of `[a-z0-9._-]`.
///
/// # Errors
/// A message saying what is allowed.
pub fn validate_namespace(ns: &str) -> Result<(), String> {
    if ns.is_empty()
        || ns.len() > NAMESPACE_BYTES_MAX
        || !ns.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err(format!(
            "bad namespace {ns:?}: 1 to {NAMESPACE_BYTES_MAX} characters of a-z 0-9 . _ -"
        ));
    }
    Ok(())
}

/// Who a member is, for matching grant subjects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    /// Base58 PeerId.
    pub peer: String,
    /// Role name (`manager`, `edge`, `router`).
    pub role: String,
    /// Zone.
    pub zone: String,
    /// Tags.
    pub tags: Vec<String>,
}

impl Subject {
    /// A subject from PeerId bytes.
    pub fn new(peer_bytes: &[u8], role: &str, zone: &str, tags: &[String]) -> Subject {
        Subject {
            peer: bs58::encode(peer_bytes).into_string(),
            role: role.to_owned(),
            zone: zone.to_owned(),
            tags: tags.to_vec(),
        }
    }

    fn matches(&self, subject: &str) -> bool {
        if subject == "*" {
            return true;
        }
        match subject.split_once(':') {
            Some(("member", p)) => p == self.peer,
            Some(("role", r)) => r == self.role,
            Some(("zone", z)) => z == self.zone,
            Some(("tag", t)) => self.tags.iter().any(|x| x == t),
            _ => false,
        }
    }
}

/// Whether every member has `needed` in `namespace` whatever the grants: reading the
/// default namespace.
pub fn open_to_members(namespace: &str, needed: Permission) -> bool {
    namespace == DEFAULT_NAMESPACE && needed == Permission::Read
}

/// Whether `who` holds `needed` on `namespace` under `grants`, given as
/// `(subject, permission, namespace)`.
pub fn allowed<'a>(
    grants: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
    who: &Subject,
    namespace: &str,
    needed: Permission,
) -> bool {
    if who.role == "manager" || open_to_members(namespace, needed) {
        return true;
    }
    grants.into_iter().any(|(subject, permission, ns)| {
        ns == namespace
            && Permission::parse(permission).is_some_and(|p| p >= needed)
            && who.matches(subject)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(peer: &str, zone: &str, tags: &[&str]) -> Subject {
        Subject {
            peer: peer.into(),
            role: "edge".into(),
            zone: zone.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn grants_match_subjects_and_permissions_nest() {
        let grants = [
            ("zone:eu", "read", "maps"),
            ("tag:ops", "admin", "maps"),
            ("member:Qa", "publish", "fw"),
            ("*", "read", "public"),
        ];
        let g = || grants.iter().map(|(a, b, c)| (*a, *b, *c));
        let eu = edge("Qb", "eu", &[]);
        let us = edge("Qc", "us", &[]);
        let ops = edge("Qd", "us", &["ops"]);
        let pub_ = edge("Qa", "us", &[]);
        assert!(allowed(g(), &eu, "maps", Permission::Read));
        assert!(!allowed(g(), &eu, "maps", Permission::Publish));
        assert!(!allowed(g(), &us, "maps", Permission::Read));
        assert!(allowed(g(), &ops, "maps", Permission::Read), "admin includes read");
        assert!(allowed(g(), &pub_, "fw", Permission::Read), "publish includes read");
        assert!(!allowed(g(), &pub_, "fw", Permission::Admin));
        assert!(allowed(g(), &us, "public", Permission::Read));
        assert!(allowed(g(), &us, DEFAULT_NAMESPACE, Permission::Read));
        assert!(!allowed(g(), &us, DEFAULT_NAMESPACE, Permission::Publish));
        let manager = Subject { role: "manager".into(), ..us.clone() };
        assert!(allowed(g(), &manager, "fw", Permission::Admin));
    }

    #[test]
    fn grant_forms_are_checked() {
        assert!(validate_grant("zone:eu", "read", "maps").is_ok());
        assert!(validate_grant("*", "admin", "a.b-c_d").is_ok());
        assert!(validate_grant("zone:", "read", "maps").is_err());
        assert!(validate_grant("host:x", "read", "maps").is_err());
        assert!(validate_grant("zone:eu", "write", "maps").is_err());
        assert!(validate_grant("zone:eu", "read", "Maps").is_err());
        assert!(validate_grant("zone:eu", "read", "").is_err());
    }
}
