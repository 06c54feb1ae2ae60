//! Every write of the policy reconciler: workload Secrets, the trust bundle ConfigMap, Events and
//! the policy's status.

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::events::{Event, EventType},
};
use rolemesh_crds::{
    MTLSPolicy, MTLSPolicyStatus, RotationRecord,
    names::{
        MANAGED_BY_LABEL, MANAGED_BY_VALUE, TRUST_BUNDLE_CONFIGMAP, TRUST_BUNDLE_KEY,
        rules_field_manager,
    },
};
use serde_json::json;
use tracing::{info, warn};

use crate::{
    context::Context,
    error::{Error, Result},
};

pub const FIELD_MANAGER: &str = crate::CONTROLLER_NAME;
/// Field manager of `status.lastRotation` alone. The main status write leaves that field out, so a
/// reconcile that started from a cached policy older than a rotation cannot erase the record.
const ROTATION_FIELD_MANAGER: &str = "rolemesh-controller-rotation";

/// Writes a workload Secret. One that is not there yet is created: a create costs the API server
/// much less than a server-side apply, and first issuance is the bulk of all writes (a policy
/// covering many ServiceAccounts). One that exists (or turns out to) is server-side applied.
pub async fn write_secret(ctx: &Context, secret: &Secret, exists: bool) -> Result<Secret> {
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

/// Deletes a workload Secret rolemesh wrote; one it did not write is left alone.
pub async fn delete_workload_secret(
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
    ctx.forget_written(namespace, name);
}

/// An Event on the policy.
pub struct PolicyEvent<'a> {
    pub type_: EventType,
    pub reason: &'a str,
    pub action: &'a str,
    pub note: &'a str,
}

pub async fn publish(ctx: &Context, policy: &MTLSPolicy, event: PolicyEvent<'_>) {
    let event = Event {
        type_: event.type_,
        reason: event.reason.to_string(),
        note: Some(event.note.chars().take(1000).collect()),
        action: event.action.to_string(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &policy.object_ref(&())).await {
        warn!(%error, "failed to publish an event");
    }
}

pub async fn apply_trust_bundle(ctx: &Context, namespace: &str, bundle: &str) -> Result<()> {
    if ctx.bundle_applied(namespace, bundle) {
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
    ctx.remember_bundle(namespace, bundle);
    Ok(())
}

/// Writes one policy's peer rules as key `key` of the namespace's trust bundle ConfigMap, by
/// server-side apply as the policy's own field manager. It creates the ConfigMap if need be, and
/// runs before [`apply_trust_bundle`]: kubelet mounts nothing of the ConfigMap before `ca.crt` is
/// there, so a pod never starts its proxy with the bundle but without its rules.
pub async fn apply_peer_rules(
    ctx: &Context,
    namespace: &str,
    policy: &str,
    key: &str,
    rules: &str,
) -> Result<()> {
    if ctx.rules_applied(namespace, key, rules) {
        return Ok(());
    }
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let body = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": { "name": TRUST_BUNDLE_CONFIGMAP },
        "data": { key: rules },
    });
    api.patch(
        TRUST_BUNDLE_CONFIGMAP,
        &PatchParams::apply(&rules_field_manager(policy)).force(),
        &Patch::Apply(body),
    )
    .await
    .map_err(Error::kube(format!(
        "write the peer rules {key} into ConfigMap {namespace}/{TRUST_BUNDLE_CONFIGMAP}"
    )))?;
    ctx.remember_rules(namespace, key, rules);
    Ok(())
}

/// Writes the status unless it is what the policy already shows.
pub async fn apply_status(
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

pub async fn apply_last_rotation(
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
