//! SPIFFE IDs of rolemesh workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`.

use std::fmt;

use crate::ProfileError;

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
        if !valid_trust_domain(trust_domain) {
            return Err(fail(
                "trust domain must be lowercase letters, digits, '.', '-'",
            ));
        }
        if !valid_segment(namespace) || !valid_segment(service_account) {
            return Err(fail(
                "namespace and ServiceAccount must be Kubernetes names",
            ));
        }
        Ok(id)
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>`; any other path shape is not a rolemesh identity.
    pub fn parse(uri: &str) -> Result<Self, ProfileError> {
        let fail = |reason| ProfileError::InvalidSpiffeId {
            id: uri.to_string(),
            reason,
        };
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| fail("must start with spiffe://"))?;
        let (trust_domain, path) = rest.split_once('/').ok_or_else(|| fail("missing path"))?;
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            ["ns", namespace, "sa", service_account] => {
                Self::new(trust_domain, namespace, service_account)
            }
            _ => Err(fail("path must be /ns/<namespace>/sa/<serviceaccount>")),
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

fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
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
}
