//! SPIFFE IDs of rolemesh workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`.
//!
//! A URI is first checked against the SPIFFE-ID specification (sections cited at each rule,
//! <https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md>), then against
//! rolemesh's own shape, so that an ID another SPIFFE implementation would refuse is refused here
//! for the same reason, and named.

use std::fmt;

use crate::ProfileError;

/// SPIFFE-ID §2.3: implementations must support IDs up to 2048 bytes and should not make longer
/// ones; nothing rolemesh issues comes near it, so anything longer is refused unread.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// SPIFFE-ID §2.3 (after RFC 3986's limit on a host).
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Kubernetes: a namespace is an RFC 1123 label.
const MAX_NAMESPACE_LEN: usize = 63;
/// Kubernetes: a ServiceAccount name is an RFC 1123 subdomain.
const MAX_SERVICE_ACCOUNT_LEN: usize = 253;

/// The SPIFFE ID of one workload identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, ProfileError> {
        let id = Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        };
        let fail = |reason| ProfileError::InvalidSpiffeId {
            id: id.to_string(),
            reason,
        };
        check_trust_domain(trust_domain).map_err(fail)?;
        if !is_dns_label(namespace, MAX_NAMESPACE_LEN) {
            return Err(fail(
                "the namespace must be a Kubernetes namespace name (lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters)",
            ));
        }
        if !is_dns_subdomain(service_account, MAX_SERVICE_ACCOUNT_LEN) {
            return Err(fail(
                "the ServiceAccount must be a Kubernetes object name (dot-separated lowercase labels of letters, digits and '-', at most 253 characters)",
            ));
        }
        Ok(id)
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>`: a valid SPIFFE ID (SPIFFE-ID §2) for a leaf
    /// (X509-SVID §3.1: a non-root path) whose path has rolemesh's shape.
    pub fn parse(uri: &str) -> Result<Self, ProfileError> {
        let fail = |reason| ProfileError::InvalidSpiffeId {
            id: uri.to_string(),
            reason,
        };
        let (trust_domain, path) = split_spiffe_id(uri).map_err(fail)?;
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            ["ns", namespace, "sa", service_account] => {
                Self::new(trust_domain, namespace, service_account)
            }
            _ => Err(fail(
                "not a rolemesh workload: the path must be /ns/<namespace>/sa/<serviceaccount>",
            )),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Splits a leaf's SPIFFE ID into trust domain and path (without its leading '/'), checking
/// every rule of the SPIFFE-ID specification and X509-SVID's rule for leaves. The reason names
/// the rule and its section.
pub fn split_spiffe_id(uri: &str) -> Result<(&str, &str), &'static str> {
    // SPIFFE-ID §2.3.
    if uri.len() > MAX_SPIFFE_ID_LEN {
        return Err("longer than 2048 bytes (SPIFFE-ID §2.3)");
    }
    // SPIFFE-ID §2 and X509-SVID §5.2: the scheme is `spiffe`. Matched case-sensitively, as
    // go-spiffe does: rolemesh never writes another spelling.
    let rest = uri
        .strip_prefix("spiffe://")
        .ok_or("the scheme must be spiffe:// (SPIFFE-ID §2, X509-SVID §5.2)")?;
    // SPIFFE-ID §2: no query or fragment component.
    if rest.contains(['?', '#']) {
        return Err("a SPIFFE ID has no query or fragment (SPIFFE-ID §2)");
    }
    let (trust_domain, path) = match rest.split_once('/') {
        Some((trust_domain, path)) => (trust_domain, Some(path)),
        None => (rest, None),
    };
    check_trust_domain(trust_domain)?;
    // X509-SVID §3.1 and §5.2: a leaf's SPIFFE ID has a non-root path.
    let path = match path {
        None | Some("") => {
            return Err("a workload's SPIFFE ID must have a path (X509-SVID §3.1, §5.2)");
        }
        Some(path) => path,
    };
    // SPIFFE-ID §2.2, rule by rule.
    if path.contains('%') {
        return Err("the path must not be percent-encoded (SPIFFE-ID §2.2)");
    }
    if path.ends_with('/') {
        return Err("the path must not end with '/' (SPIFFE-ID §2.2)");
    }
    for segment in path.split('/') {
        if segment.is_empty() {
            return Err("the path must not have empty segments (SPIFFE-ID §2.2)");
        }
        if segment == "." || segment == ".." {
            return Err("the path must not have '.' or '..' segments (SPIFFE-ID §2.2)");
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(
                "path segments may hold only letters, digits, '.', '-' and '_' (SPIFFE-ID §2.2)",
            );
        }
    }
    Ok((trust_domain, path))
}

/// SPIFFE-ID §2.1 (and §2.3 for the length). rolemesh's own trust domains, set in the
/// MTLSAuthority, are DNS-like; '_' is allowed as the specification allows it.
fn check_trust_domain(td: &str) -> Result<(), &'static str> {
    if td.is_empty() {
        return Err("the trust domain must not be empty (SPIFFE-ID §2.1)");
    }
    if td.contains('@') {
        return Err("the trust domain must have no userinfo ('@') (SPIFFE-ID §2.1)");
    }
    if td.contains(':') {
        return Err("the trust domain must have no port (':') (SPIFFE-ID §2.1)");
    }
    if td.contains('%') {
        return Err("the trust domain must not be percent-encoded (SPIFFE-ID §2.1)");
    }
    if td.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("the trust domain must be lowercase (SPIFFE-ID §2.1)");
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(
            "the trust domain may hold only lowercase letters, digits, '.', '-' and '_' (SPIFFE-ID §2.1)",
        );
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err("the trust domain is longer than 255 bytes (SPIFFE-ID §2.3)");
    }
    Ok(())
}

/// An RFC 1123 label as Kubernetes checks one: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`.
fn is_dns_label(s: &str, max: usize) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= max
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// An RFC 1123 subdomain as Kubernetes checks one: dot-separated labels.
fn is_dns_subdomain(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.split('.').all(|label| is_dns_label(label, 63))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let id = SpiffeId::new("rolemesh.local", "shop", "payments").unwrap();
        assert_eq!(
            id.to_string(),
            "spiffe://rolemesh.local/ns/shop/sa/payments"
        );
        assert_eq!(SpiffeId::parse(&id.to_string()).unwrap(), id);
        let dotted = SpiffeId::parse("spiffe://mesh_1.local/ns/shop/sa/pay.ments").unwrap();
        assert_eq!(dotted.trust_domain(), "mesh_1.local");
        assert_eq!(dotted.service_account(), "pay.ments");
    }

    #[test]
    fn rejects_other_shapes() {
        for bad in [
            "https://rolemesh.local/ns/a/sa/b",
            "spiffe://rolemesh.local/ns/a",
            "spiffe://rolemesh.local/ns/a/sa/b/extra",
            "spiffe://Rolemesh/ns/a/sa/b",
            "spiffe://td/ns/A/sa/b",
            "spiffe:///ns/a/sa/b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} accepted");
        }
    }

    /// One URI per rule of the SPIFFE-ID specification (and X509-SVID's rule for leaves), each
    /// breaking only that rule, refused with the reason that cites it.
    #[test]
    fn each_rule_of_the_specification_is_checked_and_cited() {
        let long_path = format!("spiffe://td/ns/a/sa/{}", "b".repeat(2048));
        let long_td = format!("spiffe://{}/ns/a/sa/b", "t".repeat(256));
        let cases: &[(&str, &str)] = &[
            (&long_path, "longer than 2048 bytes (SPIFFE-ID §2.3)"),
            ("SPIFFE://td/ns/a/sa/b", "scheme must be spiffe://"),
            ("spiffe:td/ns/a/sa/b", "scheme must be spiffe://"),
            ("spiffe://td/ns/a/sa/b?x=1", "no query or fragment"),
            ("spiffe://td/ns/a/sa/b#frag", "no query or fragment"),
            ("spiffe:///ns/a/sa/b", "must not be empty (SPIFFE-ID §2.1)"),
            ("spiffe://me@td/ns/a/sa/b", "no userinfo"),
            ("spiffe://td:8443/ns/a/sa/b", "no port"),
            (
                "spiffe://t%64/ns/a/sa/b",
                "trust domain must not be percent-encoded",
            ),
            (
                "spiffe://TD/ns/a/sa/b",
                "must be lowercase (SPIFFE-ID §2.1)",
            ),
            ("spiffe://t+d/ns/a/sa/b", "trust domain may hold only"),
            (&long_td, "longer than 255 bytes"),
            ("spiffe://td", "must have a path (X509-SVID §3.1, §5.2)"),
            ("spiffe://td/", "must have a path (X509-SVID §3.1, §5.2)"),
            (
                "spiffe://td/ns/a/sa/%62",
                "path must not be percent-encoded",
            ),
            ("spiffe://td/ns/a/sa/b/", "must not end with '/'"),
            ("spiffe://td/ns//sa/b", "empty segments"),
            ("spiffe://td/ns/../sa/b", "'.' or '..' segments"),
            ("spiffe://td/ns/./sa/b", "'.' or '..' segments"),
            ("spiffe://td/ns/a/sa/b~c", "path segments may hold only"),
        ];
        for (uri, reason) in cases {
            let error = SpiffeId::parse(uri).unwrap_err().to_string();
            assert!(error.contains(reason), "{uri}: {error}");
        }
    }

    #[test]
    fn kubernetes_names_are_checked_as_kubernetes_checks_them() {
        for (namespace, service_account) in [
            ("-a", "b"),
            ("a-", "b"),
            ("a.b", "c"),
            (&*"n".repeat(64), "b"),
            ("a", ".b"),
            ("a", "b..c"),
            ("a", "b_c"),
            ("a", "B"),
        ] {
            assert!(
                SpiffeId::new("td", namespace, service_account).is_err(),
                "{namespace}/{service_account} accepted"
            );
        }
        SpiffeId::new("td", "a-1", "b.c-2").unwrap();
    }
}
