//! The one definition of a rolemesh workload identity, shared by the controller (which issues
//! certificates), the webhook (which configures the proxy), the proxy (which checks peers) and
//! the CLI (which inspects Secrets):
//!
//! - [`SpiffeId`], the workload's name: `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`;
//! - [`ROLE_ARN_OID`]: the private certificate extension carrying the IAM role ARN;
//! - [`profile`]: the X.509 profile of workload and CA certificates;
//! - [`inspect`]: reading an issued certificate back (parsing by x509-parser, never by hand);
//! - [`verify`]: the one chain check (rustls-webpki, with the trust bundle's CRLs);
//! - [`proxy_config`]: the proxy's configuration file, written by the webhook, read by the proxy.

pub mod inspect;
#[cfg(feature = "logging")]
pub mod logging;
pub mod profile;
pub mod proxy_config;
pub mod spiffe;
pub mod verify;

pub use inspect::{CertificateInfo, SvidRule, inspect_certificate};
pub use profile::{
    CertificateProfile, IssuedCertificate, MAX_DURATION, MIN_DURATION, WorkloadIdentity,
};
pub use spiffe::SpiffeId;
pub use verify::{ChainError, TrustStore, Usage, self_signed_by, verify_chain, verify_chain_der};

/// OID of the non-critical extension that carries the workload's IAM role ARN as a DER
/// UTF8String. docs/security-model.md documents it. The enterprise number is not yet registered
/// with IANA for rolemesh: registering one (and keeping this value accepted during a migration)
/// is a release blocker for 1.0.
pub const ROLE_ARN_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 59621, 1, 1];

/// The same OID in dotted form, as x509-parser and openssl print it.
pub const ROLE_ARN_OID_DOTTED: &str = "1.3.6.1.4.1.59621.1.1";

/// The IRSA annotation on a ServiceAccount that names its IAM role.
pub const ROLE_ARN_ANNOTATION: &str = "eks.amazonaws.com/role-arn";

/// Everything that can go wrong building or reading the identity profile.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("invalid SPIFFE ID {id:?}: {reason}")]
    InvalidSpiffeId { id: String, reason: &'static str },
    #[error("invalid IAM role ARN {arn:?}: expected arn:aws:iam::<12-digit account>:role/<name>")]
    InvalidRoleArn { arn: String },
    #[error("failed to build certificate: {0}")]
    BuildCertificate(#[from] rcgen::Error),
    #[error("failed to parse certificate: {0}")]
    ParseCertificate(String),
    #[error("failed to parse trust bundle: {0}")]
    ParseTrustBundle(String),
    #[error("certificate does not follow the rolemesh profile: {0}")]
    NotInProfile(String),
    #[error("certificate is not an X509-SVID leaf: {rule}: {detail}")]
    NotAnSvid {
        rule: inspect::SvidRule,
        detail: String,
    },
    #[error("invalid duration {value:?}: {reason}")]
    InvalidDuration { value: String, reason: String },
    #[error("invalid proxy configuration: {0}")]
    InvalidProxyConfig(String),
}

/// Checks that `arn` is an IAM role ARN (any partition, optional path).
pub fn validate_role_arn(arn: &str) -> Result<(), ProfileError> {
    let invalid = || ProfileError::InvalidRoleArn {
        arn: arn.to_string(),
    };
    let rest = arn.strip_prefix("arn:").ok_or_else(invalid)?;
    let mut parts = rest.splitn(5, ':');
    let partition = parts.next().ok_or_else(invalid)?;
    let service = parts.next().ok_or_else(invalid)?;
    let region = parts.next().ok_or_else(invalid)?;
    let account = parts.next().ok_or_else(invalid)?;
    let resource = parts.next().ok_or_else(invalid)?;
    let partition_ok = matches!(
        partition,
        "aws" | "aws-cn" | "aws-us-gov" | "aws-iso" | "aws-iso-b"
    );
    let account_ok = account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit());
    let name = resource.strip_prefix("role/").ok_or_else(invalid)?;
    let name_ok = !name.is_empty()
        && name.len() <= 512
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_/-".contains(&b));
    if partition_ok && service == "iam" && region.is_empty() && account_ok && name_ok {
        Ok(())
    } else {
        Err(invalid())
    }
}

/// Parses a Go-style duration (`24h`, `90m`, `1h30m`, `45s`) as the CRD schema admits it.
pub fn parse_duration(value: &str) -> Result<std::time::Duration, ProfileError> {
    let err = |reason: &str| ProfileError::InvalidDuration {
        value: value.to_string(),
        reason: reason.to_string(),
    };
    if value.is_empty() {
        return Err(err("empty"));
    }
    let mut total = 0f64;
    let mut rest = value;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| err("missing unit (use h, m, s, ms, us or ns)"))?;
        if number_len == 0 {
            return Err(err("expected a number"));
        }
        let number: f64 = rest[..number_len].parse().map_err(|_| err("bad number"))?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(err("unknown unit (use h, m, s, ms, us or ns)")),
        };
        total += number * seconds;
        rest = &rest[unit_len..];
    }
    // from_secs_f64 panics on what does not fit; a duration that long is an input error.
    std::time::Duration::try_from_secs_f64(total).map_err(|_| err("too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_arns() {
        for ok in [
            "arn:aws:iam::111122223333:role/frontend",
            "arn:aws:iam::111122223333:role/path/to/svc-role_1",
            "arn:aws-cn:iam::111122223333:role/x",
        ] {
            validate_role_arn(ok).unwrap();
        }
        for bad in [
            "",
            "arn:aws:iam::1111:role/x",
            "arn:aws:iam::111122223333:user/bob",
            "arn:aws:s3:::bucket",
            "arn:aws:iam:us-east-1:111122223333:role/x",
            "arn:aws:iam::111122223333:role/",
            "arn:aws:iam::111122223333:role/has space",
        ] {
            assert!(validate_role_arn(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h").unwrap().as_secs(), 86400);
        assert_eq!(parse_duration("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("1.5h").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("250ms").unwrap().as_millis(), 250);
        for bad in ["", "24", "h", "1d", "one day", "5m3"] {
            assert!(parse_duration(bad).is_err(), "{bad} accepted");
        }
        // Too long for a Duration: an error that says so, not a panic.
        let huge = format!("{}h", "9".repeat(400));
        let error = parse_duration(&huge).unwrap_err().to_string();
        assert!(error.contains("too long"), "{error}");
    }
}
