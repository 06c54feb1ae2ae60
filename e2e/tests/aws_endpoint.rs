//! The real AWS SDK clients work against the local AWS endpoint the way the controller uses them:
//! KMS signs with an ECC P-256 key (and the signature verifies), and STS answers
//! AssumeRoleWithWebIdentity for a token minted by the local control plane.

use anyhow::{Context, Result, ensure};
use aws_sdk_kms::{
    primitives::Blob,
    types::{KeySpec, KeyUsageType, MessageType, SigningAlgorithmSpec},
};
use rolemesh_testkit::{cluster, in_namespace};

#[tokio::test]
async fn kms_signs_with_p256_key_and_signature_verifies() -> Result<()> {
    let env = cluster().await?;
    let kms = aws_sdk_kms::Client::new(&env.aws_config().await);
    let key = kms
        .create_key()
        .key_spec(KeySpec::EccNistP256)
        .key_usage(KeyUsageType::SignVerify)
        .description("rolemesh test key")
        .send()
        .await
        .context("CreateKey")?;
    let key_id = key
        .key_metadata()
        .context("no key metadata")?
        .key_id()
        .to_string();

    let public = kms
        .get_public_key()
        .key_id(&key_id)
        .send()
        .await
        .context("GetPublicKey")?;
    let spki = public
        .public_key()
        .context("no public key")?
        .as_ref()
        .to_vec();
    let (_, parsed) = <x509_parser::x509::SubjectPublicKeyInfo as x509_parser::prelude::FromDer<
        _,
    >>::from_der(&spki)
    .map_err(|e| anyhow::anyhow!("KMS public key is not SPKI DER: {e}"))?;

    let message = b"to-be-signed certificate bytes".to_vec();
    let signed = kms
        .sign()
        .key_id(&key_id)
        .message(Blob::new(message.clone()))
        .message_type(MessageType::Raw)
        .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
        .send()
        .await
        .context("Sign")?;
    let signature = signed
        .signature()
        .context("no signature")?
        .as_ref()
        .to_vec();

    let verifier = aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        parsed.subject_public_key.data.as_ref(),
    );
    verifier
        .verify(&message, &signature)
        .map_err(|_| anyhow::anyhow!("KMS signature does not verify with the KMS public key"))?;
    ensure!(
        verifier.verify(b"other bytes", &signature).is_err(),
        "a signature must not verify for other data"
    );
    Ok(())
}

#[tokio::test]
async fn sts_assumes_role_with_service_account_token() -> Result<()> {
    in_namespace("sts", |ns| async move {
        let token = ns
            .service_account_token("workload", "sts.amazonaws.com")
            .await?;

        let role = format!("payments-{}", ns.name);
        let role_arn = ns.env.create_irsa_role(&role, &ns.name, "workload").await?;
        let stranger = format!("stranger-{}", ns.name);
        let stranger_arn = ns
            .env
            .create_irsa_role(&stranger, &ns.name, "someone-else")
            .await?;

        let sts = aws_sdk_sts::Client::new(&ns.env.aws_config().await);
        let assumed = sts
            .assume_role_with_web_identity()
            .role_arn(&role_arn)
            .role_session_name("rolemesh-test")
            .web_identity_token(&token)
            .send()
            .await
            .context("AssumeRoleWithWebIdentity")?;
        let user = assumed
            .assumed_role_user()
            .context("no assumed role user")?;
        ensure!(
            user.arn()
                .ends_with(&format!(":assumed-role/{role}/rolemesh-test")),
            "assumed-role ARN {} does not name the role",
            user.arn()
        );
        ensure!(
            assumed.credentials().is_some(),
            "STS returned no credentials"
        );

        // A role whose trust policy names another ServiceAccount refuses this one's token.
        let refused = sts
            .assume_role_with_web_identity()
            .role_arn(&stranger_arn)
            .role_session_name("rolemesh-test")
            .web_identity_token(&token)
            .send()
            .await;
        let error = refused
            .err()
            .context("STS accepted a token its trust policy does not admit")?;
        let code = error
            .as_service_error()
            .and_then(|e| e.meta().code())
            .unwrap_or_default();
        ensure!(
            code == "AccessDenied",
            "expected AccessDenied, got {error:?}"
        );
        Ok(())
    })
    .await
}
