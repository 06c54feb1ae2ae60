//! Verifies a ServiceAccount's IRSA role the way AWS itself would: mint a token for the
//! ServiceAccount and ask STS to assume the annotated role with it.

use std::collections::BTreeSet;

use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::ServiceAccount,
};
use kube::{Api, Client, api::PostParams};
use rolemesh_profile::{ROLE_ARN_ANNOTATION, validate_role_arn};

use crate::status::Reason;

/// Audience IRSA tokens carry, and the one STS expects.
pub const STS_AUDIENCE: &str = "sts.amazonaws.com";
/// Lifetime of the verification token: the shortest the API server grants.
pub const TOKEN_SECONDS: i64 = 600;

/// Why a ServiceAccount gets no certificate. Each variant is a status reason a person can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    MissingRoleAnnotation,
    InvalidRoleArn(String),
    /// The role's account is not in the MTLSAuthority's `allowedAccounts`.
    AccountNotAllowed {
        account: String,
    },
    TokenRequestFailed(String),
    /// STS said no ([`StsErrorClass::Refused`]).
    StsRefused {
        code: String,
        message: String,
    },
    /// STS answered that it cannot decide now ([`StsErrorClass::Transient`]).
    StsUnavailable {
        code: String,
        message: String,
    },
    /// No answer from STS at all (network, timeout, a response that is not an STS error).
    StsUnreachable(String),
    RoleMismatch {
        assumed: String,
    },
    /// The MTLSAuthority blocks the ServiceAccount.
    Blocked,
}

impl Refusal {
    pub fn reason(&self) -> Reason {
        match self {
            Self::MissingRoleAnnotation => Reason::MissingRoleAnnotation,
            Self::InvalidRoleArn(_) => Reason::InvalidRoleArn,
            Self::AccountNotAllowed { .. } => Reason::AccountNotAllowed,
            Self::TokenRequestFailed(_) => Reason::TokenRequestFailed,
            Self::StsRefused { .. } => Reason::StsRefused,
            Self::StsUnavailable { .. } => Reason::StsUnavailable,
            Self::StsUnreachable(_) => Reason::StsUnreachable,
            Self::RoleMismatch { .. } => Reason::RoleMismatch,
            Self::Blocked => Reason::Blocked,
        }
    }

    /// Transient refusals are retried with backoff and never cost a workload the certificate it
    /// has; the others wait for the user to change something (which triggers a reconcile by
    /// itself) and take the Secret away.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::TokenRequestFailed(_) | Self::StsUnavailable { .. } | Self::StsUnreachable(_)
        )
    }

    pub fn message(&self, namespace: &str, service_account: &str, role: Option<&str>) -> String {
        let role = role.unwrap_or("");
        match self {
            Self::MissingRoleAnnotation => format!(
                "ServiceAccount {namespace}/{service_account} has no {ROLE_ARN_ANNOTATION} annotation; annotate it with the IAM role ARN of the workload"
            ),
            Self::InvalidRoleArn(detail) => format!(
                "the {ROLE_ARN_ANNOTATION} annotation of ServiceAccount {namespace}/{service_account} is not an IAM role ARN: {detail}"
            ),
            Self::AccountNotAllowed { account } => format!(
                "the role {role} of ServiceAccount {namespace}/{service_account} is in AWS account {account}, which the MTLSAuthority's spec.allowedAccounts does not list; annotate a role of an allowed account, or add {account} to allowedAccounts if that account is yours"
            ),
            Self::TokenRequestFailed(detail) => format!(
                "could not request a token for ServiceAccount {namespace}/{service_account} to verify its role: {detail}"
            ),
            Self::StsRefused { code, message } => format!(
                "STS refused AssumeRoleWithWebIdentity for {role} with a token of ServiceAccount {namespace}/{service_account} ({code}: {message}); make the role's trust policy trust system:serviceaccount:{namespace}:{service_account} with audience {STS_AUDIENCE}"
            ),
            Self::StsUnavailable { code, message } => format!(
                "STS could not verify {role} for ServiceAccount {namespace}/{service_account} now ({code}: {message}); the current certificate, if any, is kept and verification is retried with backoff"
            ),
            Self::StsUnreachable(detail) => format!(
                "could not reach STS to verify {role}: {detail}; the current certificate, if any, is kept and verification is retried with backoff"
            ),
            Self::Blocked => format!(
                "the MTLSAuthority's rolemesh.dev/blocked-service-accounts annotation blocks ServiceAccount {namespace}/{service_account} (kubectl rolemesh revoke --block); kubectl rolemesh unblock -n {namespace} --service-account {service_account} lifts it"
            ),
            Self::RoleMismatch { assumed } => format!(
                "STS assumed {assumed:?}, which is not a session of the annotated role {role} (same partition, account and role name); check the annotation for a typo"
            ),
        }
    }
}

/// The role a ServiceAccount claims, read from its annotation.
pub fn claimed_role(service_account: &ServiceAccount) -> Result<String, Refusal> {
    let arn = service_account
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ROLE_ARN_ANNOTATION))
        .map(|s| s.trim().to_string())
        .ok_or(Refusal::MissingRoleAnnotation)?;
    validate_role_arn(&arn).map_err(|e| Refusal::InvalidRoleArn(e.to_string()))?;
    Ok(arn)
}

/// The AWS account of a role ARN that [`claimed_role`] accepted.
pub fn role_account(role_arn: &str) -> &str {
    role_arn.split(':').nth(4).unwrap_or_default()
}

/// Refuses a role whose account the MTLSAuthority does not allow. `None` (no `allowedAccounts`)
/// allows every account, as before the field existed; the authority's status warns about it.
pub fn check_account(role_arn: &str, allowed: Option<&BTreeSet<String>>) -> Result<(), Refusal> {
    let account = role_account(role_arn);
    match allowed {
        Some(allowed) if !allowed.contains(account) => Err(Refusal::AccountNotAllowed {
            account: account.to_string(),
        }),
        _ => Ok(()),
    }
}

/// What an STS error answer means for the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StsErrorClass {
    /// STS decided that this ServiceAccount may not have this role (or that the request can
    /// never succeed): the certificate goes.
    Refused,
    /// STS could not decide now: the certificate stays, verification is retried with backoff.
    Transient,
}

/// Every error code AssumeRoleWithWebIdentity is known to answer, and what it means. From the
/// STS API reference (the operation's errors, then the errors common to all actions), plus the
/// throttling codes the AWS SDKs retry. The SDK has already retried the transient ones a few
/// times when we see them. A code not listed is classed by its HTTP status ([`classify_sts_error`]).
pub const STS_ERROR_CODES: &[(&str, StsErrorClass)] = {
    use StsErrorClass::{Refused, Transient};
    &[
        // The operation's own errors.
        // We mint the token seconds before the call, so "expired" is clock skew or a slow
        // path, not a verdict on the role; the retry mints a fresh token.
        ("ExpiredToken", Transient),
        ("ExpiredTokenException", Transient),
        // STS could not reach the OIDC issuer (the cluster's discovery document and keys).
        ("IDPCommunicationError", Transient),
        // The identity provider, the token or its claims are not accepted: trust is not there
        // (wrong audience, issuer not registered in the account, OIDC provider deleted).
        ("IDPRejectedClaim", Refused),
        ("InvalidIdentityToken", Refused),
        // rolemesh sends no session policy, so these cannot clear by retrying; fail closed.
        ("MalformedPolicyDocument", Refused),
        ("PackedPolicyTooLarge", Refused),
        // An administrator disabled STS in the region for the account.
        ("RegionDisabledException", Refused),
        // Errors common to all actions.
        // The role's trust policy does not trust this ServiceAccount: the canonical refusal.
        ("AccessDenied", Refused),
        ("AccessDeniedException", Refused),
        ("NotAuthorized", Refused),
        ("OptInRequired", Refused),
        ("InvalidAction", Refused),
        ("InvalidParameterCombination", Refused),
        ("InvalidParameterValue", Refused),
        ("InvalidQueryParameter", Refused),
        ("MissingAction", Refused),
        ("MissingParameter", Refused),
        ("MalformedQueryString", Refused),
        ("ValidationError", Refused),
        ("InternalFailure", Transient),
        ("InternalError", Transient),
        ("ServiceUnavailable", Transient),
        ("ServiceUnavailableException", Transient),
        ("RequestTimeout", Transient),
        ("RequestTimeoutException", Transient),
        // Throttling, in every spelling STS and the SDKs use. STS answers these with HTTP 400,
        // which is why the HTTP status alone cannot tell them from a refusal.
        ("Throttling", Transient),
        ("ThrottlingException", Transient),
        ("ThrottledException", Transient),
        ("RequestThrottled", Transient),
        ("RequestThrottledException", Transient),
        ("TooManyRequestsException", Transient),
        ("RequestLimitExceeded", Transient),
        ("LimitExceededException", Transient),
    ]
};

/// Classes an STS error answer: by its code from [`STS_ERROR_CODES`]; an unknown code by its
/// HTTP status (5xx and 429 transient, anything else refused, as before codes were read).
pub fn classify_sts_error(code: Option<&str>, http_status: u16) -> StsErrorClass {
    let known = code.and_then(|code| {
        STS_ERROR_CODES
            .iter()
            .find(|(known, _)| *known == code)
            .map(|(_, class)| *class)
    });
    match known {
        Some(class) => class,
        None if http_status >= 500 || http_status == 429 => StsErrorClass::Transient,
        None => StsErrorClass::Refused,
    }
}

/// The refusal for an STS error answer.
pub fn sts_error_refusal(code: Option<&str>, message: Option<&str>, http_status: u16) -> Refusal {
    let (code_text, message) = (
        code.unwrap_or("Unknown").to_string(),
        message.unwrap_or("no message").to_string(),
    );
    match classify_sts_error(code, http_status) {
        StsErrorClass::Refused => Refusal::StsRefused {
            code: code_text,
            message,
        },
        StsErrorClass::Transient => Refusal::StsUnavailable {
            code: code_text,
            message,
        },
    }
}

/// Whether an assumed-role ARN (`arn:aws:sts::<acct>:assumed-role/<name>/<session>`) is a
/// session of the role `arn:aws:iam::<acct>:role/<path/><name>`: same partition, same account,
/// same role. STS names the role without its path; IAM role names are unique within an account
/// whatever their path, so the name is enough. Should an STS (or a stand-in for it) give the
/// path too (`assumed-role/<path/><name>/<session>`), the path must be the annotated one.
/// Anything else, including an ARN of another shape, is a mismatch.
pub fn assumed_role_matches(role_arn: &str, assumed_arn: &str) -> bool {
    let role: Vec<&str> = role_arn.split(':').collect();
    let assumed: Vec<&str> = assumed_arn.split(':').collect();
    let [
        "arn",
        role_partition,
        "iam",
        "",
        role_account,
        role_resource,
    ] = role.as_slice()
    else {
        return false;
    };
    let ["arn", partition, "sts", "", account, resource] = assumed.as_slice() else {
        return false;
    };
    let Some(path_and_name) = role_resource.strip_prefix("role/") else {
        return false;
    };
    let name = path_and_name.rsplit('/').next().unwrap_or_default();
    // The session name STS echoes cannot hold '/', so it is the last segment.
    let Some((who, session)) = resource
        .strip_prefix("assumed-role/")
        .and_then(|r| r.rsplit_once('/'))
    else {
        return false;
    };
    partition == role_partition
        && account == role_account
        && !name.is_empty()
        && !session.is_empty()
        && (who == name || who == path_and_name)
}

/// Verifies that ServiceAccount `namespace/name` may assume `role_arn`.
pub async fn verify_with_sts(
    client: &Client,
    sts: &aws_sdk_sts::Client,
    namespace: &str,
    name: &str,
    role_arn: &str,
) -> Result<(), Refusal> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![STS_AUDIENCE.to_string()],
            expiration_seconds: Some(TOKEN_SECONDS),
            bound_object_ref: None,
        },
        ..Default::default()
    };
    let token = api
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .map_err(|e| Refusal::TokenRequestFailed(e.to_string()))?
        .status
        .map(|s| s.token)
        .ok_or_else(|| Refusal::TokenRequestFailed("the API server returned no token".into()))?;
    let session = format!("rolemesh-verify-{}", &name[..name.len().min(40)]);
    assume_role_with_token(sts, role_arn, &session, token).await
}

/// Asks STS to assume `role_arn` with the ServiceAccount's `token` and checks the session it
/// returns is of that role; an error answer is classed by [`sts_error_refusal`].
pub async fn assume_role_with_token(
    sts: &aws_sdk_sts::Client,
    role_arn: &str,
    session: &str,
    token: String,
) -> Result<(), Refusal> {
    let result = sts
        .assume_role_with_web_identity()
        .role_arn(role_arn)
        .role_session_name(session)
        .web_identity_token(token)
        .duration_seconds(900)
        .send()
        .await;
    // The token and any credentials go out of scope here; neither is logged or kept.
    match result {
        Ok(output) => {
            let assumed = output
                .assumed_role_user()
                .map(|u| u.arn().to_string())
                .unwrap_or_default();
            drop(output);
            if assumed_role_matches(role_arn, &assumed) {
                Ok(())
            } else {
                Err(Refusal::RoleMismatch { assumed })
            }
        }
        Err(aws_sdk_sts::error::SdkError::ServiceError(service)) => {
            use aws_sdk_sts::error::ProvideErrorMetadata;
            let err = service.err();
            Err(sts_error_refusal(
                err.code(),
                err.message(),
                service.raw().status().as_u16(),
            ))
        }
        Err(other) => Err(Refusal::StsUnreachable(
            aws_sdk_sts::error::DisplayErrorContext(other).to_string(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chart's admission policy admits exactly the token this module requests: were they to
    /// differ, every verification would fail with TokenRequestFailed.
    #[test]
    fn the_chart_admits_the_token_request_verification_makes() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../charts/rolemesh/templates/controller-admissionpolicy.yaml"
        );
        let policy =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        assert!(policy.contains(&format!("object.spec.audiences == ['{STS_AUDIENCE}']")));
        assert!(policy.contains(&format!("object.spec.expirationSeconds <= {TOKEN_SECONDS}")));
    }

    #[test]
    fn assumed_role_must_name_the_same_role_in_the_same_account() {
        let role = "arn:aws:iam::111122223333:role/team/payments";
        assert!(assumed_role_matches(
            role,
            "arn:aws:sts::111122223333:assumed-role/payments/rolemesh-verify-x"
        ));
        assert!(!assumed_role_matches(
            role,
            "arn:aws:sts::999922223333:assumed-role/payments/s"
        ));
        assert!(!assumed_role_matches(
            role,
            "arn:aws:sts::111122223333:assumed-role/payment/s"
        ));
        assert!(!assumed_role_matches(
            role,
            "arn:aws-cn:sts::111122223333:assumed-role/payments/s"
        ));
        assert!(!assumed_role_matches(
            role,
            "arn:aws:iam::111122223333:role/payments"
        ));
        assert!(!assumed_role_matches(role, ""));
    }

    /// A role with a path. STS names the role without it; where an STS
    /// gives the path, it must be the annotated one; any other shape is a RoleMismatch.
    #[test]
    fn assumed_role_of_a_role_with_a_path() {
        let prod_app = "arn:aws:iam::111122223333:role/prod/app";
        let deep_app = "arn:aws:iam::111122223333:role/prod/eu/app";
        let plain_app = "arn:aws:iam::111122223333:role/app";
        // (annotated role, assumed-role ARN STS returned, a session of that role)
        let rows = [
            // What STS returns: the name without the path.
            (
                prod_app,
                "arn:aws:sts::111122223333:assumed-role/app/rolemesh-verify-web",
                true,
            ),
            (
                deep_app,
                "arn:aws:sts::111122223333:assumed-role/app/s",
                true,
            ),
            (
                plain_app,
                "arn:aws:sts::111122223333:assumed-role/app/s",
                true,
            ),
            // A path given must be the annotated path, whole.
            (
                prod_app,
                "arn:aws:sts::111122223333:assumed-role/prod/app/s",
                true,
            ),
            (
                deep_app,
                "arn:aws:sts::111122223333:assumed-role/prod/eu/app/s",
                true,
            ),
            (
                prod_app,
                "arn:aws:sts::111122223333:assumed-role/dev/app/s",
                false,
            ),
            (
                deep_app,
                "arn:aws:sts::111122223333:assumed-role/eu/app/s",
                false,
            ),
            (
                plain_app,
                "arn:aws:sts::111122223333:assumed-role/prod/app/s",
                false,
            ),
            // The role name is the last path segment, compared whole.
            (
                prod_app,
                "arn:aws:sts::111122223333:assumed-role/prod/s",
                false,
            ),
            (
                prod_app,
                "arn:aws:sts::111122223333:assumed-role/ap/s",
                false,
            ),
            // Same partition, same account.
            (
                prod_app,
                "arn:aws:sts::999999999999:assumed-role/app/s",
                false,
            ),
            (
                prod_app,
                "arn:aws-us-gov:sts::111122223333:assumed-role/app/s",
                false,
            ),
            // Other shapes.
            (
                prod_app,
                "arn:aws:sts::111122223333:assumed-role/app",
                false,
            ),
            (
                prod_app,
                "arn:aws:sts::111122223333:assumed-role/app/",
                false,
            ),
            (
                prod_app,
                "arn:aws:sts:us-east-1:111122223333:assumed-role/app/s",
                false,
            ),
            (
                prod_app,
                "arn:aws:sts::111122223333:federated-user/app",
                false,
            ),
            (
                prod_app,
                "arn:aws:sts::111122223333:assumed-role/app/s:x",
                false,
            ),
            (
                prod_app,
                "xarn:aws:sts::111122223333:assumed-role/app/s",
                false,
            ),
            (prod_app, "arn:aws:iam::111122223333:role/prod/app", false),
        ];
        for (role, assumed, expected) in rows {
            assert_eq!(
                assumed_role_matches(role, assumed),
                expected,
                "{role} assumed as {assumed}"
            );
        }
    }

    /// Every code of the table, and codes it does not know, by class.
    #[test]
    fn sts_error_codes_are_classified_by_code_not_http_status() {
        use StsErrorClass::{Refused, Transient};
        // (code, HTTP status STS answers it with, class)
        let rows = [
            ("ExpiredTokenException", 400, Transient),
            ("ExpiredToken", 400, Transient),
            ("IDPCommunicationError", 400, Transient),
            ("IDPRejectedClaim", 403, Refused),
            ("InvalidIdentityToken", 400, Refused),
            ("MalformedPolicyDocument", 400, Refused),
            ("PackedPolicyTooLarge", 400, Refused),
            ("RegionDisabledException", 403, Refused),
            ("AccessDenied", 403, Refused),
            ("AccessDeniedException", 400, Refused),
            ("NotAuthorized", 400, Refused),
            ("OptInRequired", 403, Refused),
            ("InvalidAction", 400, Refused),
            ("InvalidParameterCombination", 400, Refused),
            ("InvalidParameterValue", 400, Refused),
            ("InvalidQueryParameter", 400, Refused),
            ("MissingAction", 400, Refused),
            ("MissingParameter", 400, Refused),
            ("MalformedQueryString", 404, Refused),
            ("ValidationError", 400, Refused),
            ("InternalFailure", 500, Transient),
            ("InternalError", 500, Transient),
            ("ServiceUnavailable", 503, Transient),
            ("ServiceUnavailableException", 503, Transient),
            ("RequestTimeout", 408, Transient),
            ("RequestTimeoutException", 408, Transient),
            ("Throttling", 400, Transient),
            ("ThrottlingException", 400, Transient),
            ("ThrottledException", 400, Transient),
            ("RequestThrottled", 400, Transient),
            ("RequestThrottledException", 400, Transient),
            ("TooManyRequestsException", 400, Transient),
            ("RequestLimitExceeded", 400, Transient),
            ("LimitExceededException", 400, Transient),
        ];
        for (code, status, class) in rows {
            assert_eq!(classify_sts_error(Some(code), status), class, "{code}");
            // The code decides, whatever the status.
            assert_eq!(classify_sts_error(Some(code), 500), class, "{code} as 500");
            assert_eq!(classify_sts_error(Some(code), 400), class, "{code} as 400");
        }
        // Every code of the table is in the rows above, so none is left untested.
        for (code, _) in STS_ERROR_CODES {
            assert!(rows.iter().any(|(c, _, _)| c == code), "{code} untested");
        }
        // Codes not in the table: by status, 5xx and 429 transient, else refused.
        assert_eq!(classify_sts_error(Some("SomethingNew"), 503), Transient);
        assert_eq!(classify_sts_error(Some("SomethingNew"), 429), Transient);
        assert_eq!(classify_sts_error(Some("SomethingNew"), 400), Refused);
        assert_eq!(classify_sts_error(None, 502), Transient);
        assert_eq!(classify_sts_error(None, 403), Refused);
        // What each class becomes.
        let throttled = sts_error_refusal(Some("Throttling"), Some("Rate exceeded"), 400);
        assert_eq!(throttled.reason(), Reason::StsUnavailable);
        assert!(throttled.is_transient());
        let denied = sts_error_refusal(Some("AccessDenied"), None, 403);
        assert_eq!(denied.reason(), Reason::StsRefused);
        assert!(!denied.is_transient());
    }

    /// A role outside `allowedAccounts` is refused before anything else.
    #[test]
    fn roles_outside_the_allowed_accounts_are_refused() {
        let ours = "arn:aws:iam::111122223333:role/frontend";
        let stranger = "arn:aws:iam::999988887777:role/frontend";
        let allowed: BTreeSet<String> = ["111122223333".to_string(), "444455556666".to_string()]
            .into_iter()
            .collect();
        assert_eq!(check_account(ours, Some(&allowed)), Ok(()));
        let refusal = check_account(stranger, Some(&allowed)).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::AccountNotAllowed {
                account: "999988887777".into()
            }
        );
        assert_eq!(refusal.reason(), Reason::AccountNotAllowed);
        assert!(!refusal.is_transient());
        let message = refusal.message("shop", "web", Some(stranger));
        for words in ["999988887777", "allowedAccounts", "shop/web"] {
            assert!(message.contains(words), "{message}");
        }
        // No allowedAccounts: every account, as before the field.
        assert_eq!(check_account(stranger, None), Ok(()));
    }

    /// An STS stand-in on 127.0.0.1 that answers every request with `status` and `body`.
    async fn fake_sts(status: &'static str, body: String) -> (aws_sdk_sts::Client, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    // The request fits one read; it is not looked at.
                    let mut request = vec![0u8; 65536];
                    let _ = stream.read(&mut request).await;
                    let response = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        let config = aws_sdk_sts::Config::builder()
            .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
            .region(aws_sdk_sts::config::Region::new("us-east-1"))
            .endpoint_url(&url)
            .retry_config(aws_sdk_sts::config::retry::RetryConfig::disabled())
            .build();
        (aws_sdk_sts::Client::from_conf(config), url)
    }

    fn sts_error(code: &str, message: &str) -> String {
        format!(
            "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>r</RequestId></ErrorResponse>"
        )
    }

    /// Through the real SDK: what STS answers becomes the refusal
    /// (or not) that decides whether a certificate is kept.
    #[tokio::test]
    async fn sts_answers_become_refusals_by_their_code() {
        let role = "arn:aws:iam::111122223333:role/prod/app";
        let assumed = |arn: &str| {
            format!(
                "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleWithWebIdentityResult><AssumedRoleUser><Arn>{arn}</Arn><AssumedRoleId>AROAEXAMPLE:rolemesh-verify-app</AssumedRoleId></AssumedRoleUser><Credentials><AccessKeyId>ASIAEXAMPLE</AccessKeyId><SecretAccessKey>secret</SecretAccessKey><SessionToken>token</SessionToken><Expiration>2030-01-01T00:00:00Z</Expiration></Credentials><SubjectFromWebIdentityToken>system:serviceaccount:shop:app</SubjectFromWebIdentityToken></AssumeRoleWithWebIdentityResult><ResponseMetadata><RequestId>r</RequestId></ResponseMetadata></AssumeRoleWithWebIdentityResponse>"
            )
        };
        // (case, HTTP status line, body, expected reason or None for verified)
        let rows = [
            (
                "throttled, as STS answers it: 400",
                "400 Bad Request",
                sts_error("Throttling", "Rate exceeded"),
                Some(Reason::StsUnavailable),
            ),
            (
                "identity provider unreachable: 400",
                "400 Bad Request",
                sts_error("IDPCommunicationError", "Couldn't connect"),
                Some(Reason::StsUnavailable),
            ),
            (
                "internal failure: 500",
                "500 Internal Server Error",
                sts_error("InternalFailure", "oops"),
                Some(Reason::StsUnavailable),
            ),
            (
                "trust policy does not trust the ServiceAccount",
                "403 Forbidden",
                sts_error(
                    "AccessDenied",
                    "Not authorized to perform sts:AssumeRoleWithWebIdentity",
                ),
                Some(Reason::StsRefused),
            ),
            (
                "token not accepted",
                "400 Bad Request",
                sts_error("InvalidIdentityToken", "No OpenIDConnect provider found"),
                Some(Reason::StsRefused),
            ),
            (
                "the role, named without its path",
                "200 OK",
                assumed("arn:aws:sts::111122223333:assumed-role/app/rolemesh-verify-app"),
                None,
            ),
            (
                "another role of the same name elsewhere",
                "200 OK",
                assumed("arn:aws:sts::999988887777:assumed-role/app/rolemesh-verify-app"),
                Some(Reason::RoleMismatch),
            ),
        ];
        for (case, status, body, expected) in rows {
            let (sts, _url) = fake_sts(status, body).await;
            let result =
                assume_role_with_token(&sts, role, "rolemesh-verify-app", "jwt".into()).await;
            assert_eq!(
                result.as_ref().err().map(Refusal::reason),
                expected,
                "{case}: {result:?}"
            );
        }
        // Nothing listening: unreachable, transient.
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("address")
        };
        let config = aws_sdk_sts::Config::builder()
            .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
            .region(aws_sdk_sts::config::Region::new("us-east-1"))
            .endpoint_url(format!("http://{closed}"))
            .retry_config(aws_sdk_sts::config::retry::RetryConfig::disabled())
            .build();
        let refusal = assume_role_with_token(
            &aws_sdk_sts::Client::from_conf(config),
            role,
            "s",
            "jwt".into(),
        )
        .await
        .expect_err("nothing listens");
        assert_eq!(refusal.reason(), Reason::StsUnreachable);
        assert!(refusal.is_transient());
    }

    #[test]
    fn refusal_messages_say_what_to_do() {
        let message = Refusal::StsRefused {
            code: "AccessDenied".into(),
            message: "Not authorized".into(),
        }
        .message(
            "shop",
            "payments",
            Some("arn:aws:iam::111122223333:role/payments"),
        );
        assert!(
            message.contains("system:serviceaccount:shop:payments"),
            "{message}"
        );
        assert!(
            Refusal::MissingRoleAnnotation
                .message("shop", "payments", None)
                .contains(ROLE_ARN_ANNOTATION)
        );
    }
}
