//! Verifies a ServiceAccount's IRSA role the way AWS itself would: mint a token for the
//! ServiceAccount and ask STS to assume the annotated role with it.

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
    TokenRequestFailed(String),
    StsRefused { code: String, message: String },
    StsUnreachable(String),
    RoleMismatch { assumed: String },
}

impl Refusal {
    pub fn reason(&self) -> Reason {
        match self {
            Self::MissingRoleAnnotation => Reason::MissingRoleAnnotation,
            Self::InvalidRoleArn(_) => Reason::InvalidRoleArn,
            Self::TokenRequestFailed(_) => Reason::TokenRequestFailed,
            Self::StsRefused { .. } => Reason::StsRefused,
            Self::StsUnreachable(_) => Reason::StsUnreachable,
            Self::RoleMismatch { .. } => Reason::RoleMismatch,
        }
    }

    /// Transient refusals are retried soon; the others wait for the user to change something
    /// (which triggers a reconcile by itself).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::TokenRequestFailed(_) | Self::StsUnreachable(_))
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
            Self::TokenRequestFailed(detail) => format!(
                "could not request a token for ServiceAccount {namespace}/{service_account} to verify its role: {detail}"
            ),
            Self::StsRefused { code, message } => format!(
                "STS refused AssumeRoleWithWebIdentity for {role} with a token of ServiceAccount {namespace}/{service_account} ({code}: {message}); make the role's trust policy trust system:serviceaccount:{namespace}:{service_account} with audience {STS_AUDIENCE}"
            ),
            Self::StsUnreachable(detail) => {
                format!("could not reach STS to verify {role}: {detail}; will retry")
            }
            Self::RoleMismatch { assumed } => {
                format!("STS assumed {assumed}, which is not the annotated role {role}")
            }
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

/// Whether an assumed-role ARN (`arn:aws:sts::<acct>:assumed-role/<name>/<session>`) is a
/// session of the role `arn:aws:iam::<acct>:role/<path/><name>`.
pub fn assumed_role_matches(role_arn: &str, assumed_arn: &str) -> bool {
    let role = role_arn.split(':').collect::<Vec<_>>();
    let assumed = assumed_arn.split(':').collect::<Vec<_>>();
    let (Some(role_partition), Some(role_account), Some(role_resource)) =
        (role.get(1), role.get(4), role.get(5))
    else {
        return false;
    };
    let (Some(partition), Some(service), Some(account), Some(resource)) = (
        assumed.get(1),
        assumed.get(2),
        assumed.get(4),
        assumed.get(5),
    ) else {
        return false;
    };
    let Some(role_name) = role_resource
        .strip_prefix("role/")
        .and_then(|p| p.rsplit('/').next())
    else {
        return false;
    };
    let mut parts = resource.splitn(3, '/');
    let (Some("assumed-role"), Some(name)) = (parts.next(), parts.next()) else {
        return false;
    };
    partition == role_partition && *service == "sts" && account == role_account && name == role_name
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
    let result = sts
        .assume_role_with_web_identity()
        .role_arn(role_arn)
        .role_session_name(format!("rolemesh-verify-{}", &name[..name.len().min(40)]))
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
            let code = err.code().unwrap_or("Unknown").to_string();
            if service.raw().status().is_server_error() {
                return Err(Refusal::StsUnreachable(format!(
                    "{code}: {}",
                    err.message().unwrap_or("")
                )));
            }
            Err(Refusal::StsRefused {
                code,
                message: err.message().unwrap_or("no message").to_string(),
            })
        }
        Err(other) => Err(Refusal::StsUnreachable(
            aws_sdk_sts::error::DisplayErrorContext(other).to_string(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
