//! The MTLSPolicy reconciler: for every ServiceAccount a policy covers, a verified identity and a
//! valid certificate Secret; the namespace's trust bundle; status by server-side apply.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use futures::{StreamExt, stream};
use k8s_openapi::{
    api::core::v1::{ConfigMap, Secret, ServiceAccount},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    core::SelectorExt,
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder},
        reflector::{ObjectRef, Store},
    },
};
use rolemesh_crds::{
    IdentityVerification, MTLSPolicy, MTLSPolicyStatus, RotationRecord, WorkloadStatus,
};
use rolemesh_profile::{CertificateProfile, SpiffeId, WorkloadIdentity, parse_duration};
use serde_json::json;
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::{
    ca::CaState,
    certificate::{
        MANAGED_BY_LABEL, MANAGED_BY_VALUE, Need, POLICY_LABEL, ROTATE_ANNOTATION,
        RotationRequests, SERVICE_ACCOUNT_LABEL, SecretContext, VERIFICATION_ANNOTATION, assess,
        existing_pems, issue_certificate, secret_name, workload_secret,
    },
    error::{Error, Result},
    identity::{claimed_role, verify_with_sts},
    metrics::Metrics,
};

pub const FIELD_MANAGER: &str = "rolemesh-controller";
/// Field manager of `status.lastRotation` alone. The main status write leaves that field out, so a
/// reconcile that started from a cached policy older than a rotation cannot erase the record.
const ROTATION_FIELD_MANAGER: &str = "rolemesh-controller-rotation";
pub const TRUST_BUNDLE_CONFIGMAP: &str = "rolemesh-trust-bundle";
pub const TRUST_BUNDLE_KEY: &str = "ca.crt";

/// Shared state of the reconcilers.
pub struct Context {
    pub client: Client,
    pub sts: aws_sdk_sts::Client,
    pub ca: ArcSwapOption<CaState>,
    /// Why there is no CA, when there is none.
    pub ca_error: Mutex<Option<(String, String)>>,
    pub secrets: Store<Secret>,
    pub service_accounts: Store<ServiceAccount>,
    pub policies: Store<MTLSPolicy>,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// How many certificates one reconcile issues at once.
    pub issue_concurrency: usize,
    /// Secrets written by this process that the watch may not have delivered yet, so that a
    /// reconcile racing the watch does not issue a second certificate for the same need.
    written: Mutex<HashMap<(String, String), (Secret, Instant)>>,
    /// The trust bundle last applied per namespace, to skip no-op writes.
    bundles: Mutex<HashMap<String, String>>,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        sts: aws_sdk_sts::Client,
        secrets: Store<Secret>,
        service_accounts: Store<ServiceAccount>,
        policies: Store<MTLSPolicy>,
        metrics: Metrics,
        recorder: Recorder,
        issue_concurrency: usize,
    ) -> Self {
        Self {
            client,
            sts,
            ca: ArcSwapOption::empty(),
            ca_error: Mutex::new(None),
            secrets,
            service_accounts,
            policies,
            metrics,
            recorder,
            issue_concurrency,
            written: Mutex::new(HashMap::new()),
            bundles: Mutex::new(HashMap::new()),
        }
    }

    fn effective_secret(&self, namespace: &str, name: &str) -> Option<Secret> {
        let cached = self
            .secrets
            .get(&ObjectRef::new(name).within(namespace))
            .map(|s| (*s).clone());
        let key = (namespace.to_string(), name.to_string());
        let mut written = self.written.lock().ok()?;
        let Some((ours, at)) = written.get(&key) else {
            return cached;
        };
        let version = |s: &Secret| {
            s.metadata
                .resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok())
        };
        match &cached {
            Some(seen) if version(seen) >= version(ours) => {
                written.remove(&key);
                cached
            }
            // The watch has not caught up with our write yet.
            _ if at.elapsed() < Duration::from_secs(30) => Some(ours.clone()),
            _ => {
                written.remove(&key);
                cached
            }
        }
    }

    fn remember_written(&self, secret: Secret) {
        if let (Some(ns), Some(name), Ok(mut written)) = (
            secret.metadata.namespace.clone(),
            secret.metadata.name.clone(),
            self.written.lock(),
        ) {
            // Entries are normally dropped when the watch catches up; this bounds the rest.
            if written.len() >= 1024 {
                written.retain(|_, (_, at)| at.elapsed() < Duration::from_secs(30));
            }
            written.insert((ns, name), (secret, Instant::now()));
        }
    }
}

/// Whether `policy` names or selects `service_account`.
pub fn policy_selects(policy: &MTLSPolicy, service_account: &ServiceAccount) -> bool {
    if policy.namespace() != service_account.namespace() {
        return false;
    }
    let spec = &policy.spec.service_accounts;
    if spec.names.iter().any(|n| *n == service_account.name_any()) {
        return true;
    }
    match &spec.selector {
        Some(selector) => match kube::core::Selector::try_from(selector.clone()) {
            Ok(selector) => selector.matches(service_account.labels()),
            Err(_) => false,
        },
        None => false,
    }
}

/// Of all policies covering a ServiceAccount, the one that owns its identity: the oldest, then
/// by name. The others report the conflict instead of fighting over the Secret.
fn owning_policy<'a>(candidates: impl Iterator<Item = &'a MTLSPolicy>) -> Option<&'a MTLSPolicy> {
    candidates.min_by(|a, b| {
        a.metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0)
            .cmp(&b.metadata.creation_timestamp.as_ref().map(|t| t.0))
            .then_with(|| a.name_any().cmp(&b.name_any()))
    })
}

/// The policies to reconcile when a ServiceAccount changes.
pub fn policies_for_service_account(
    policies: &Store<MTLSPolicy>,
    service_account: &ServiceAccount,
) -> Vec<ObjectRef<MTLSPolicy>> {
    policies
        .state()
        .iter()
        .filter(|p| p.namespace() == service_account.namespace())
        // Names that are listed but the ServiceAccount no longer matches still need a reconcile
        // (its Secret must go), so every policy of the namespace that names or selected it runs.
        .filter(|p| {
            policy_selects(p, service_account) || p.spec.service_accounts.selector.is_some()
        })
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

fn profile_of(policy: &MTLSPolicy) -> Result<CertificateProfile> {
    let mut profile = CertificateProfile::default();
    if let Some(settings) = &policy.spec.certificate {
        if let Some(duration) = &settings.duration {
            profile.duration = parse_duration(duration)
                .map_err(|e| Error::InvalidPolicy(format!("certificate.duration: {e}")))?;
        }
        if let Some(before) = &settings.renew_before {
            let before = parse_duration(before)
                .map_err(|e| Error::InvalidPolicy(format!("certificate.renewBefore: {e}")))?;
            if before >= profile.duration {
                return Err(Error::InvalidPolicy(
                    "certificate.renewBefore must be shorter than certificate.duration".into(),
                ));
            }
            profile.renew_before = Some(before);
        }
    }
    Ok(profile)
}

fn to_time(t: OffsetDateTime) -> Time {
    Time(Timestamp::from_second(t.unix_timestamp()).unwrap_or(Timestamp::UNIX_EPOCH))
}

fn annotation(meta: &kube::api::ObjectMeta, key: &str) -> Option<String> {
    meta.annotations.as_ref().and_then(|a| a.get(key)).cloned()
}

/// What happened to one ServiceAccount in one reconcile.
struct Outcome {
    status: WorkloadStatus,
    renew_at: Option<OffsetDateTime>,
    issued: Option<&'static str>,
    /// A failure that clears by itself (signer or STS unreachable): retry soon.
    transient: bool,
}

fn refused(
    service_account: &str,
    reason: &str,
    message: String,
    role: Option<String>,
) -> WorkloadStatus {
    WorkloadStatus {
        service_account: service_account.to_string(),
        role_arn: role,
        verified: false,
        reason: reason.to_string(),
        message: Some(message),
        ..Default::default()
    }
}

/// Writes a workload Secret. One that is not there yet is created: a create costs the API server
/// much less than a server-side apply, and first issuance is the bulk of all writes (a policy
/// covering many ServiceAccounts). One that exists (or turns out to) is server-side applied.
async fn write_secret(ctx: &Context, secret: &Secret, exists: bool) -> Result<Secret> {
    let namespace = secret.metadata.namespace.clone().unwrap_or_default();
    let name = secret.metadata.name.clone().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    if !exists {
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..Default::default()
        };
        match api.create(&params, secret).await {
            Ok(written) => {
                ctx.remember_written(written.clone());
                return Ok(written);
            }
            // Created meanwhile by someone else (or our cache lags): apply over it.
            Err(kube::Error::Api(response)) if response.code == 409 => {}
            Err(error) => {
                return Err(Error::kube(format!("create Secret {namespace}/{name}"))(
                    error,
                ));
            }
        }
    }
    let mut body =
        serde_json::to_value(secret).map_err(|e| Error::BuildCertificate(e.to_string()))?;
    body["apiVersion"] = json!("v1");
    body["kind"] = json!("Secret");
    let written = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .map_err(Error::kube(format!("write Secret {namespace}/{name}")))?;
    ctx.remember_written(written.clone());
    Ok(written)
}

#[allow(clippy::too_many_arguments)]
async fn reconcile_service_account(
    ctx: &Context,
    ca: &CaState,
    policy: &MTLSPolicy,
    owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
    profile: &CertificateProfile,
    service_account: &ServiceAccount,
    now: OffsetDateTime,
) -> Outcome {
    let namespace = service_account.namespace().unwrap_or_default();
    let name = service_account.name_any();
    let secret_name = secret_name(&name);
    let existing = ctx.effective_secret(&namespace, &secret_name);
    let fail = |status: WorkloadStatus, transient: bool| Outcome {
        status,
        renew_at: None,
        issued: None,
        transient,
    };

    if let Some(secret) = &existing {
        let labels = secret.labels();
        if labels.get(POLICY_LABEL).map(String::as_str) != Some(policy.name_any().as_str()) {
            return fail(
                refused(
                    &name,
                    "SecretOwnedByAnotherPolicy",
                    format!(
                        "Secret {namespace}/{secret_name} belongs to MTLSPolicy {}; it is re-issued once that policy no longer covers {name}",
                        labels.get(POLICY_LABEL).cloned().unwrap_or_default()
                    ),
                    None,
                ),
                false,
            );
        }
    }

    let role = match claimed_role(service_account) {
        Ok(role) => role,
        Err(refusal) => {
            delete_workload_secret(ctx, &namespace, &secret_name, existing.as_ref()).await;
            ctx.metrics.certificate_failed(refusal.reason());
            return fail(
                refused(
                    &name,
                    refusal.reason(),
                    refusal.message(&namespace, &name, None),
                    None,
                ),
                false,
            );
        }
    };
    let identity = match SpiffeId::new(&ca.trust_domain, &namespace, &name)
        .and_then(|id| WorkloadIdentity::new(id, &role))
    {
        Ok(identity) => identity,
        Err(e) => {
            ctx.metrics.certificate_failed("InvalidIdentity");
            return fail(
                refused(&name, "InvalidIdentity", e.to_string(), Some(role)),
                false,
            );
        }
    };
    let rotation = RotationRequests {
        policy: annotation(&policy.metadata, ROTATE_ANNOTATION),
        service_account: annotation(&service_account.metadata, ROTATE_ANNOTATION),
    };
    let verification = match ca.verification {
        IdentityVerification::Sts => "sts",
        IdentityVerification::None => "none",
    };
    let context = SecretContext {
        namespace: &namespace,
        service_account: &name,
        policy_name: &policy.name_any(),
        owner: owner.clone(),
        rotation: &rotation,
        verification,
    };
    let ok_status = |info: &rolemesh_profile::CertificateInfo, verified_by: Option<String>| {
        let verified = verified_by.as_deref() == Some("sts");
        WorkloadStatus {
            service_account: name.clone(),
            role_arn: Some(role.clone()),
            spiffe_id: Some(identity.spiffe_id.to_string()),
            verified,
            reason: if verified { "Issued".into() } else { "IssuedUnverified".into() },
            message: (!verified).then(|| {
                "identity verification is off (MTLSAuthority identityVerification: none): the role annotation was not checked with STS".to_string()
            }),
            secret_name: Some(secret_name.clone()),
            serial: Some(info.serial_hex.clone()),
            not_before: Some(to_time(info.not_before)),
            not_after: Some(to_time(info.not_after)),
        }
    };
    let renew_at = |info: &rolemesh_profile::CertificateInfo| {
        Some(profile.renewal_time(info.not_before, info.not_after, &info.serial))
    };

    match assess(existing.as_ref(), ca, &identity, profile, &rotation, now) {
        Need::Nothing(info) => {
            let verified_by = existing
                .as_ref()
                .and_then(|s| annotation(&s.metadata, VERIFICATION_ANNOTATION));
            Outcome {
                status: ok_status(&info, verified_by),
                renew_at: renew_at(&info),
                issued: None,
                transient: false,
            }
        }
        Need::RefreshBundle(info) => {
            let verified_by = existing
                .as_ref()
                .and_then(|s| annotation(&s.metadata, VERIFICATION_ANNOTATION));
            let Some((chain, key)) = existing.as_ref().and_then(existing_pems) else {
                return fail(
                    refused(
                        &name,
                        "SecretUnreadable",
                        "the Secret lost its PEM fields".into(),
                        Some(role.clone()),
                    ),
                    true,
                );
            };
            let mut refreshed = workload_secret(&context, &chain, &key, &ca.bundle_pem);
            // Keep the recorded verification and rotation state: only ca.crt changes.
            refreshed.metadata.annotations = existing
                .as_ref()
                .and_then(|s| s.metadata.annotations.clone());
            if let Err(error) = write_secret(ctx, &refreshed, true).await {
                warn!(%error, namespace = %namespace, service_account = %name, "failed to refresh the trust bundle in a Secret");
                return fail(
                    refused(&name, error.reason(), error.to_string(), Some(role.clone())),
                    true,
                );
            }
            Outcome {
                status: ok_status(&info, verified_by),
                renew_at: renew_at(&info),
                issued: None,
                transient: false,
            }
        }
        Need::Issue(why, detail) => {
            if ca.verification == IdentityVerification::Sts
                && let Err(refusal) =
                    verify_with_sts(&ctx.client, &ctx.sts, &namespace, &name, &role).await
            {
                let message = refusal.message(&namespace, &name, Some(&role));
                warn!(namespace = %namespace, service_account = %name, reason = refusal.reason(), "identity not verified; no certificate issued");
                ctx.metrics.certificate_failed(refusal.reason());
                if !refusal.is_transient() {
                    // The old certificate claims a role the ServiceAccount can no longer prove.
                    delete_workload_secret(ctx, &namespace, &secret_name, existing.as_ref()).await;
                }
                publish(
                    ctx,
                    policy,
                    EventType::Warning,
                    refusal.reason(),
                    "VerifyIdentity",
                    &message,
                )
                .await;
                return fail(
                    refused(&name, refusal.reason(), message, Some(role.clone())),
                    refusal.is_transient(),
                );
            }
            let issued = match issue_certificate(ca, &identity, profile).await {
                Ok(issued) => issued,
                Err(error) => {
                    warn!(%error, namespace = %namespace, service_account = %name, "failed to issue a certificate");
                    ctx.metrics.certificate_failed(error.reason());
                    // Keep the previous status facts visible: the old Secret is untouched.
                    let mut status = refused(
                        &name,
                        error.reason(),
                        format!(
                            "{error}; the existing Secret (if any) is left as it is and issuance is retried"
                        ),
                        Some(role.clone()),
                    );
                    status.secret_name = existing.as_ref().map(|_| secret_name.clone());
                    return fail(status, true);
                }
            };
            let secret =
                workload_secret(&context, &issued.chain_pem, &issued.key_pem, &ca.bundle_pem);
            if let Err(error) = write_secret(ctx, &secret, existing.is_some()).await {
                warn!(%error, namespace = %namespace, service_account = %name, "failed to write the certificate Secret");
                ctx.metrics.certificate_failed(error.reason());
                return fail(
                    refused(&name, error.reason(), error.to_string(), Some(role.clone())),
                    true,
                );
            }
            info!(namespace = %namespace, service_account = %name, serial = %issued.serial_hex, reason = why, detail = %detail, "issued a certificate");
            ctx.metrics.certificate_issued(why);
            let info = rolemesh_profile::CertificateInfo {
                serial: hex::decode(&issued.serial_hex).unwrap_or_default(),
                serial_hex: issued.serial_hex.clone(),
                not_before: issued.not_before,
                not_after: issued.not_after,
                ..placeholder_info()
            };
            Outcome {
                status: ok_status(&info, Some(verification.to_string())),
                renew_at: renew_at(&info),
                issued: Some(why),
                transient: false,
            }
        }
    }
}

fn placeholder_info() -> rolemesh_profile::CertificateInfo {
    rolemesh_profile::CertificateInfo {
        uri_sans: vec![],
        dns_names: vec![],
        role_arn: None,
        role_extension_malformed: false,
        serial: vec![],
        serial_hex: String::new(),
        not_before: OffsetDateTime::UNIX_EPOCH,
        not_after: OffsetDateTime::UNIX_EPOCH,
        is_ca: false,
        eku_server_auth: false,
        eku_client_auth: false,
        key_usage_digital_signature: false,
        key_usage_critical: false,
        public_key_der: vec![],
        subject: String::new(),
        issuer: String::new(),
    }
}

async fn delete_workload_secret(
    ctx: &Context,
    namespace: &str,
    name: &str,
    existing: Option<&Secret>,
) {
    let Some(existing) = existing else { return };
    if existing.labels().get(MANAGED_BY_LABEL).map(String::as_str) != Some(MANAGED_BY_VALUE) {
        return;
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => info!(
            namespace,
            secret = name,
            "deleted a certificate Secret that no longer has a verified identity"
        ),
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(error) => {
            warn!(%error, namespace, secret = name, "failed to delete a certificate Secret")
        }
    }
    if let Ok(mut written) = ctx.written.lock() {
        written.remove(&(namespace.to_string(), name.to_string()));
    }
}

async fn publish(
    ctx: &Context,
    policy: &MTLSPolicy,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note.chars().take(1000).collect()),
        action: action.to_string(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &policy.object_ref(&())).await {
        warn!(%error, "failed to publish an event");
    }
}

async fn apply_trust_bundle(ctx: &Context, namespace: &str, bundle: &str) -> Result<()> {
    if ctx
        .bundles
        .lock()
        .ok()
        .and_then(|b| b.get(namespace).cloned())
        .as_deref()
        == Some(bundle)
    {
        return Ok(());
    }
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let body = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": TRUST_BUNDLE_CONFIGMAP,
            "labels": { MANAGED_BY_LABEL: MANAGED_BY_VALUE },
        },
        "data": { TRUST_BUNDLE_KEY: bundle },
    });
    api.patch(
        TRUST_BUNDLE_CONFIGMAP,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .map_err(Error::kube(format!(
        "write ConfigMap {namespace}/{TRUST_BUNDLE_CONFIGMAP}"
    )))?;
    if let Ok(mut bundles) = ctx.bundles.lock() {
        bundles.insert(namespace.to_string(), bundle.to_string());
    }
    Ok(())
}

/// Conditions keep their lastTransitionTime while their status does not change.
pub fn set_condition(existing: &[Condition], mut wanted: Condition) -> Condition {
    if let Some(old) = existing.iter().find(|c| c.type_ == wanted.type_)
        && old.status == wanted.status
    {
        wanted.last_transition_time = old.last_transition_time.clone();
    }
    wanted
}

fn ready_condition(
    existing: &[Condition],
    generation: Option<i64>,
    ready: bool,
    reason: &str,
    message: String,
) -> Condition {
    set_condition(
        existing,
        Condition {
            type_: "Ready".into(),
            status: if ready { "True" } else { "False" }.into(),
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time: to_time(OffsetDateTime::now_utc()),
        },
    )
}

async fn apply_status(
    ctx: &Context,
    policy: &MTLSPolicy,
    mut status: MTLSPolicyStatus,
) -> Result<()> {
    // lastRotation has its own field manager (apply_last_rotation), so it takes no part in the
    // comparison; borrowing the current one avoids cloning a status of thousands of workloads.
    let unchanged = policy.status.as_ref().is_some_and(|current| {
        status.last_rotation.clone_from(&current.last_rotation);
        *current == status
    });
    if unchanged {
        return Ok(());
    }
    status.last_rotation = None;
    apply_status_fields(
        ctx,
        policy,
        FIELD_MANAGER,
        json!(status),
        "write the status",
    )
    .await
}

async fn apply_last_rotation(
    ctx: &Context,
    policy: &MTLSPolicy,
    record: RotationRecord,
) -> Result<()> {
    apply_status_fields(
        ctx,
        policy,
        ROTATION_FIELD_MANAGER,
        json!({ "lastRotation": record }),
        "record the rotation in the status",
    )
    .await
}

/// Server-side applies `fields` of the policy's status as `manager`.
async fn apply_status_fields(
    ctx: &Context,
    policy: &MTLSPolicy,
    manager: &str,
    fields: serde_json::Value,
    action: &str,
) -> Result<()> {
    let namespace = policy.namespace().unwrap_or_default();
    let name = policy.name_any();
    let api: Api<MTLSPolicy> = Api::namespaced(ctx.client.clone(), &namespace);
    let body = json!({
        "apiVersion": MTLSPolicy::api_version(&()),
        "kind": MTLSPolicy::kind(&()),
        "status": fields,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(body),
    )
    .await
    .map_err(Error::kube(format!(
        "{action} of MTLSPolicy {namespace}/{name}"
    )))?;
    Ok(())
}

/// Reconciles one MTLSPolicy. Idempotent: a second run with nothing changed writes nothing.
pub async fn reconcile(policy: Arc<MTLSPolicy>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_policy(&policy, &ctx).await;
    ctx.metrics.reconciled(
        if result.is_ok() { "ok" } else { "error" },
        started.elapsed().as_secs_f64(),
    );
    result
}

async fn reconcile_policy(policy: &MTLSPolicy, ctx: &Context) -> Result<Action> {
    let namespace = policy.namespace().unwrap_or_default();
    let name = policy.name_any();
    if policy.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let existing_status = policy.status.clone().unwrap_or_default();
    let generation = policy.metadata.generation;

    let Some(ca) = ctx.ca.load_full() else {
        let (reason, message) = ctx
            .ca_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .unwrap_or_else(|| ("CaNotReady".into(), "the CA is not established yet".into()));
        let status = MTLSPolicyStatus {
            observed_generation: generation,
            conditions: vec![ready_condition(
                &existing_status.conditions,
                generation,
                false,
                &reason,
                message,
            )],
            ..existing_status.clone()
        };
        apply_status(ctx, policy, status).await?;
        return Ok(Action::requeue(Duration::from_secs(10)));
    };

    let profile = match profile_of(policy) {
        Ok(profile) => profile,
        Err(error) => {
            let status = MTLSPolicyStatus {
                observed_generation: generation,
                conditions: vec![ready_condition(
                    &existing_status.conditions,
                    generation,
                    false,
                    error.reason(),
                    error.to_string(),
                )],
                ..existing_status.clone()
            };
            apply_status(ctx, policy, status).await?;
            return Ok(Action::await_change());
        }
    };

    let owner = policy
        .controller_owner_ref(&())
        .ok_or_else(|| Error::InvalidPolicy("the policy has no uid yet".into()))?;
    let all_policies = ctx.policies.state();
    let service_accounts: Vec<Arc<ServiceAccount>> = ctx
        .service_accounts
        .state()
        .into_iter()
        .filter(|sa| sa.namespace().as_deref() == Some(namespace.as_str()))
        .collect();

    let mut statuses: BTreeMap<String, WorkloadStatus> = BTreeMap::new();
    let mut covered: Vec<Arc<ServiceAccount>> = Vec::new();
    for sa in service_accounts
        .iter()
        .filter(|sa| policy_selects(policy, sa))
    {
        let claimants = all_policies
            .iter()
            .map(|p| p.as_ref())
            .filter(|p| policy_selects(p, sa));
        match owning_policy(claimants) {
            Some(owner_policy) if owner_policy.name_any() != name => {
                statuses.insert(sa.name_any(), refused(&sa.name_any(), "CoveredByAnotherPolicy", format!(
                    "ServiceAccount {namespace}/{} is also covered by the older MTLSPolicy {}, which owns its identity; remove it from one of the two",
                    sa.name_any(), owner_policy.name_any()
                ), None));
            }
            _ => covered.push(sa.clone()),
        }
    }
    for listed in &policy.spec.service_accounts.names {
        if !service_accounts.iter().any(|sa| sa.name_any() == *listed) {
            statuses.insert(listed.clone(), refused(listed, "ServiceAccountNotFound", format!(
                "ServiceAccount {namespace}/{listed} does not exist; create it with the {} annotation",
                rolemesh_profile::ROLE_ARN_ANNOTATION
            ), None));
        }
    }

    let now = OffsetDateTime::now_utc();
    let (ca_ref, owner_ref, profile_ref) = (ca.as_ref(), &owner, &profile);
    let outcomes: Vec<Outcome> = stream::iter(covered.iter().cloned())
        .map(|sa| async move {
            reconcile_service_account(ctx, ca_ref, policy, owner_ref, profile_ref, &sa, now).await
        })
        .buffer_unordered(ctx.issue_concurrency.max(1))
        .collect()
        .await;

    // Secrets of ServiceAccounts this policy no longer covers go.
    let covered_names: BTreeSet<String> = covered.iter().map(|sa| sa.name_any()).collect();
    for secret in ctx.secrets.state() {
        let labels = secret.labels();
        if secret.namespace().as_deref() == Some(namespace.as_str())
            && labels.get(POLICY_LABEL) == Some(&name)
            && labels
                .get(SERVICE_ACCOUNT_LABEL)
                .is_some_and(|sa| !covered_names.contains(sa))
        {
            delete_workload_secret(ctx, &namespace, &secret.name_any(), Some(&secret)).await;
        }
    }

    if !covered.is_empty() {
        apply_trust_bundle(ctx, &namespace, &ca.bundle_pem).await?;
    }

    let mut renew_at: Option<OffsetDateTime> = None;
    let mut transient = false;
    let mut issued_count = 0usize;
    let mut rotated: Vec<String> = Vec::new();
    let mut first_failure: Option<WorkloadStatus> = None;
    for outcome in outcomes {
        transient |= outcome.transient;
        if outcome.transient && first_failure.is_none() {
            first_failure = Some(outcome.status.clone());
        }
        if let Some(at) = outcome.renew_at {
            renew_at = Some(renew_at.map_or(at, |r| r.min(at)));
        }
        if let Some(why) = outcome.issued {
            issued_count += 1;
            if why == "rotation" {
                rotated.push(outcome.status.service_account.clone());
            }
        }
        statuses.insert(outcome.status.service_account.clone(), outcome.status);
    }
    if let Some(failure) = &first_failure {
        // One event per reconcile, not per ServiceAccount: an outage must not flood the API.
        publish(
            ctx,
            policy,
            EventType::Warning,
            &failure.reason,
            "IssueCertificates",
            failure.message.as_deref().unwrap_or_default(),
        )
        .await;
    }
    if issued_count > 0 {
        publish(
            ctx,
            policy,
            EventType::Normal,
            "Issued",
            "IssueCertificates",
            &format!("issued {issued_count} certificate(s)"),
        )
        .await;
    }
    let mut last_rotation = None;
    if !rotated.is_empty() {
        rotated.sort();
        let request = annotation(&policy.metadata, ROTATE_ANNOTATION)
            .unwrap_or_else(|| "serviceaccount".into());
        publish(
            ctx,
            policy,
            EventType::Normal,
            "Rotated",
            "RotateCertificates",
            &format!(
                "re-issued with new keys on request {request}: {}",
                rotated.join(", ")
            ),
        )
        .await;
        last_rotation = Some(RotationRecord {
            time: to_time(now),
            request,
            service_accounts: rotated,
        });
    }

    let workloads: Vec<WorkloadStatus> = statuses.into_values().collect();
    let failing: Vec<&WorkloadStatus> = workloads
        .iter()
        .filter(|w| w.serial.is_none() || w.reason != "Issued" && w.reason != "IssuedUnverified")
        .collect();
    let soonest = workloads
        .iter()
        .filter_map(|w| w.not_after.clone())
        .min_by_key(|t| t.0);
    if let Some(soonest) = &soonest {
        ctx.metrics.set_soonest_expiry(soonest.0.as_second());
    }
    let (ready, reason, message) = if covered.is_empty() && failing.is_empty() {
        (
            false,
            "NoServiceAccounts".to_string(),
            "the policy covers no ServiceAccount".to_string(),
        )
    } else if failing.is_empty() {
        (
            true,
            "CertificatesIssued".to_string(),
            format!(
                "{} ServiceAccount(s) have valid certificates",
                workloads.len()
            ),
        )
    } else {
        let first = failing[0];
        (
            false,
            first.reason.clone(),
            format!(
                "{} of {} ServiceAccount(s) have no valid certificate; {}: {}",
                failing.len(),
                workloads.len(),
                first.service_account,
                first.message.clone().unwrap_or_default()
            ),
        )
    };
    let status = MTLSPolicyStatus {
        observed_generation: generation,
        conditions: vec![ready_condition(
            &existing_status.conditions,
            generation,
            ready,
            &reason,
            message,
        )],
        covered_service_accounts: i32::try_from(covered.len()).unwrap_or(i32::MAX),
        soonest_not_after: soonest,
        workloads,
        last_rotation: None,
    };
    apply_status(ctx, policy, status).await?;
    if let Some(record) = last_rotation {
        apply_last_rotation(ctx, policy, record).await?;
    }

    if transient {
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    Ok(match renew_at {
        Some(at) => {
            let wait = (at - OffsetDateTime::now_utc()).max(time::Duration::seconds(1));
            Action::requeue(
                Duration::try_from(wait)
                    .unwrap_or(Duration::from_secs(1))
                    .min(Duration::from_secs(3600)),
            )
        }
        None => Action::requeue(Duration::from_secs(3600)),
    })
}

/// Logs, counts and backs off.
pub fn error_policy(policy: Arc<MTLSPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(%error, namespace = %policy.namespace().unwrap_or_default(), policy = %policy.name_any(), reason = error.reason(), "reconcile failed");
    ctx.metrics.certificate_failed(error.reason());
    Action::requeue(error.backoff())
}
