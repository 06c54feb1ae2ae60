//! The CA's signing key, behind one trait with two backends: AWS KMS (the key never leaves KMS)
//! and a local ECDSA P-256 key kept in a Secret (development and clusters without AWS).
//!
//! A little over 400 lines: the trait, both backends and the bridge through which rcgen signs
//! with either are kept in one file because each is read against the trait it implements.

use std::{collections::BTreeMap, fmt, sync::Arc, time::Instant};

use aws_sdk_kms::{
    error::{ProvideErrorMetadata, SdkError},
    primitives::Blob,
    types::{KeySpec, KeyUsageType, MessageType, SigningAlgorithmSpec},
};
use futures::future::BoxFuture;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData, SigningKey, SubjectPublicKeyInfo};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::{
    error::{Error, Result, SignFailure},
    metrics::Metrics,
};

/// Messages up to this size are sent to KMS whole (MessageType RAW); larger ones as their
/// SHA-256 digest, which is KMS's limit for RAW.
pub const KMS_RAW_LIMIT: usize = 4096;

/// Key of the PKCS#8 PEM private key in the local signer's Secret.
pub const LOCAL_KEY_FIELD: &str = rolemesh_crds::names::TLS_PRIVATE_KEY_KEY;

/// Most KMS Sign calls in flight at once from one controller.
pub const KMS_MAX_IN_FLIGHT: usize = 32;

/// A CA signing key. `sign` returns a DER ECDSA-Sig-Value over SHA-256 of `message`.
pub trait Signer: Send + Sync + 'static {
    /// "kms" or "local", for metrics.
    fn kind(&self) -> &'static str;
    /// A description for logs and status, never secret.
    fn describe(&self) -> String;
    /// The public key as DER SubjectPublicKeyInfo.
    fn public_key_spki(&self) -> &[u8];
    fn sign<'a>(&'a self, message: &'a [u8]) -> BoxFuture<'a, Result<Vec<u8>>>;
}

/// ECDSA P-256 key in a Kubernetes Secret.
pub struct LocalSigner {
    key: KeyPair,
    spki: Vec<u8>,
    location: String,
    metrics: Metrics,
}

impl fmt::Debug for LocalSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalSigner")
            .field("location", &self.location)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl LocalSigner {
    pub fn from_pem(pem: &str, location: String, metrics: Metrics) -> Result<Self> {
        let key = KeyPair::from_pem(pem).map_err(|e| Error::LocalKey {
            namespace: String::new(),
            name: location.clone(),
            message: e.to_string(),
        })?;
        if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(Error::LocalKey {
                namespace: String::new(),
                name: location,
                message: "the key is not ECDSA P-256".into(),
            });
        }
        let spki = key.subject_public_key_info();
        Ok(Self {
            key,
            spki,
            location,
            metrics,
        })
    }

    /// Loads the key from Secret `namespace/name`, creating the Secret with a new key if it does
    /// not exist. Two replicas racing to create it both end up with whichever was stored first.
    pub async fn load_or_create(
        client: &Client,
        namespace: &str,
        name: &str,
        metrics: Metrics,
    ) -> Result<Self> {
        let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let local_err = |message: String| Error::LocalKey {
            namespace: namespace.to_string(),
            name: name.to_string(),
            message,
        };
        let location = format!("local key in Secret {namespace}/{name}");
        for _ in 0..3 {
            if let Some(secret) = api
                .get_opt(name)
                .await
                .map_err(Error::kube(format!("read Secret {namespace}/{name}")))?
            {
                let pem = secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(LOCAL_KEY_FIELD))
                    .and_then(|b| String::from_utf8(b.0.clone()).ok())
                    .ok_or_else(|| local_err(format!("the Secret has no {LOCAL_KEY_FIELD} PEM")))?;
                return Self::from_pem(&pem, location, metrics)
                    .map_err(|e| local_err(e.to_string()));
            }
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
                .map_err(|e| local_err(e.to_string()))?;
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    namespace: Some(namespace.to_string()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/component".to_string(),
                        "ca-signing-key".to_string(),
                    )])),
                    ..Default::default()
                },
                type_: Some("Opaque".into()),
                data: Some(BTreeMap::from([(
                    LOCAL_KEY_FIELD.to_string(),
                    ByteString(key.serialize_pem().into_bytes()),
                )])),
                ..Default::default()
            };
            match api.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    info!(namespace, name, "created a new local CA signing key");
                    let spki = key.subject_public_key_info();
                    return Ok(Self {
                        key,
                        spki,
                        location,
                        metrics,
                    });
                }
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(e) => return Err(Error::kube(format!("create Secret {namespace}/{name}"))(e)),
            }
        }
        Err(local_err(
            "the Secret kept appearing and disappearing while reading it".into(),
        ))
    }
}

impl Signer for LocalSigner {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn describe(&self) -> String {
        self.location.clone()
    }

    fn public_key_spki(&self) -> &[u8] {
        &self.spki
    }

    fn sign<'a>(&'a self, message: &'a [u8]) -> BoxFuture<'a, Result<Vec<u8>>> {
        Box::pin(async move {
            let started = Instant::now();
            let result = SigningKey::sign(&self.key, message).map_err(|e| Error::Sign {
                signer: self.describe(),
                failure: SignFailure::Other,
                message: e.to_string(),
            });
            self.metrics.sign_call(
                "local",
                started.elapsed().as_secs_f64(),
                result.as_ref().err().map(|_| "other"),
            );
            result
        })
    }
}

/// An ECC_NIST_P256 SIGN_VERIFY key in AWS KMS.
pub struct KmsSigner {
    client: aws_sdk_kms::Client,
    key_id: String,
    /// Bounds Sign calls in flight across all policies, so a burst of issuance stays under the
    /// account's KMS request quota instead of turning into throttling errors.
    in_flight: tokio::sync::Semaphore,
    spki: Vec<u8>,
    metrics: Metrics,
}

impl fmt::Debug for KmsSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmsSigner")
            .field("key_id", &self.key_id)
            .finish()
    }
}

/// Classifies an SDK error by what an operator would do about it.
pub fn classify<E: ProvideErrorMetadata>(error: &SdkError<E>) -> SignFailure {
    match error {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => SignFailure::Network,
        SdkError::ResponseError(_) => SignFailure::Unavailable,
        SdkError::ServiceError(service) => match service.err().code() {
            Some("ThrottlingException" | "LimitExceededException" | "RequestLimitExceeded") => {
                SignFailure::Throttled
            }
            Some(
                "AccessDeniedException"
                | "UnrecognizedClientException"
                | "InvalidSignatureException",
            ) => SignFailure::Denied,
            Some(
                "DisabledException"
                | "KMSInvalidStateException"
                | "NotFoundException"
                | "KeyUnavailableException",
            ) => SignFailure::KeyDisabled,
            Some("KMSInternalException" | "DependencyTimeoutException" | "ServiceUnavailable") => {
                SignFailure::Unavailable
            }
            _ if service.raw().status().is_server_error() => SignFailure::Unavailable,
            _ => SignFailure::Other,
        },
        _ => SignFailure::Other,
    }
}

fn sdk_message<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
    error: &SdkError<E>,
) -> String {
    match error {
        SdkError::ServiceError(service) => format!(
            "{}: {}",
            service.err().code().unwrap_or("error"),
            service.err().message().unwrap_or("no message")
        ),
        other => aws_sdk_kms::error::DisplayErrorContext(other).to_string(),
    }
}

impl KmsSigner {
    /// Reads the key's public half (once) and checks that it can sign as a P-256 CA key.
    pub async fn connect(
        client: aws_sdk_kms::Client,
        key_id: &str,
        metrics: Metrics,
    ) -> Result<Self> {
        let output = client
            .get_public_key()
            .key_id(key_id)
            .send()
            .await
            .map_err(|e| {
                let failure = classify(&e);
                Error::SignerPublicKey {
                    signer: format!("KMS key {key_id}"),
                    message: format!("{} ({})", failure.as_str(), sdk_message(&e)),
                }
            })?;
        // Some KMS implementations (moto) fill only the deprecated CustomerMasterKeySpec.
        #[allow(deprecated)]
        let legacy_spec = output
            .customer_master_key_spec()
            .map(|s| KeySpec::from(s.as_str()));
        let spec = output.key_spec().cloned().or(legacy_spec);
        if spec != Some(KeySpec::EccNistP256)
            || output.key_usage() != Some(&KeyUsageType::SignVerify)
        {
            return Err(Error::UnsuitableKmsKey {
                key_id: key_id.to_string(),
                found: format!(
                    "{} {}",
                    spec.as_ref().map(|s| s.as_str()).unwrap_or("unknown spec"),
                    output
                        .key_usage()
                        .map(|s| s.as_str())
                        .unwrap_or("unknown usage")
                ),
            });
        }
        let spki = output
            .public_key()
            .map(|b| b.as_ref().to_vec())
            .ok_or_else(|| Error::SignerPublicKey {
                signer: format!("KMS key {key_id}"),
                message: "GetPublicKey returned no key".into(),
            })?;
        Ok(Self {
            client,
            key_id: key_id.to_string(),
            in_flight: tokio::sync::Semaphore::new(KMS_MAX_IN_FLIGHT),
            spki,
            metrics,
        })
    }
}

impl Signer for KmsSigner {
    fn kind(&self) -> &'static str {
        "kms"
    }

    fn describe(&self) -> String {
        format!("KMS key {}", self.key_id)
    }

    fn public_key_spki(&self) -> &[u8] {
        &self.spki
    }

    fn sign<'a>(&'a self, message: &'a [u8]) -> BoxFuture<'a, Result<Vec<u8>>> {
        Box::pin(async move {
            // moto's DIGEST mode hashes again, and real KMS accepts RAW up to 4 KiB, which covers
            // every certificate the profile produces; DIGEST is only the fallback for larger ones.
            let (message_type, payload) = if message.len() <= KMS_RAW_LIMIT {
                (MessageType::Raw, message.to_vec())
            } else {
                (MessageType::Digest, Sha256::digest(message).to_vec())
            };
            // The permit is only refused once the semaphore is closed, which never happens.
            let _permit = self.in_flight.acquire().await.ok();
            let started = Instant::now();
            let result = self
                .client
                .sign()
                .key_id(&self.key_id)
                .message(Blob::new(payload))
                .message_type(message_type)
                .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
                .send()
                .await;
            let elapsed = started.elapsed().as_secs_f64();
            match result {
                Ok(output) => {
                    self.metrics.sign_call("kms", elapsed, None);
                    output
                        .signature()
                        .map(|s| s.as_ref().to_vec())
                        .ok_or_else(|| Error::Sign {
                            signer: self.describe(),
                            failure: SignFailure::Other,
                            message: "KMS returned no signature".into(),
                        })
                }
                Err(e) => {
                    let failure = classify(&e);
                    self.metrics
                        .sign_call("kms", elapsed, Some(failure.as_str()));
                    let message = sdk_message(&e);
                    warn!(key_id = %self.key_id, class = failure.as_str(), %message, "KMS Sign failed");
                    Err(Error::Sign {
                        signer: self.describe(),
                        failure,
                        message,
                    })
                }
            }
        })
    }
}

/// Adapts a [`Signer`] to rcgen's synchronous [`SigningKey`]. rcgen calls `sign` from inside
/// certificate serialization, so this must run on a blocking thread (`spawn_blocking`), where it
/// waits for the async signer on the runtime's handle.
pub struct RcgenKey {
    signer: Arc<dyn Signer>,
    public: SubjectPublicKeyInfo,
    handle: tokio::runtime::Handle,
    last_error: std::sync::Mutex<Option<Error>>,
}

impl RcgenKey {
    pub fn new(signer: Arc<dyn Signer>, handle: tokio::runtime::Handle) -> Result<Self> {
        let public = SubjectPublicKeyInfo::from_der(signer.public_key_spki()).map_err(|e| {
            Error::SignerPublicKey {
                signer: signer.describe(),
                message: e.to_string(),
            }
        })?;
        Ok(Self {
            signer,
            public,
            handle,
            last_error: std::sync::Mutex::new(None),
        })
    }

    /// The signer's error behind an rcgen `RemoteKeyError`, if that is what failed.
    pub fn take_error(&self) -> Option<Error> {
        self.last_error.lock().ok().and_then(|mut e| e.take())
    }
}

impl PublicKeyData for RcgenKey {
    fn der_bytes(&self) -> &[u8] {
        self.public.der_bytes()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

impl SigningKey for RcgenKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self.handle.block_on(self.signer.sign(msg)) {
            Ok(signature) => Ok(signature),
            Err(error) => {
                if let Ok(mut slot) = self.last_error.lock() {
                    *slot = Some(error);
                }
                Err(rcgen::Error::RemoteKeyError)
            }
        }
    }
}
