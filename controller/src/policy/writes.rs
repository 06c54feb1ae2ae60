//! Every write of the policy reconciler: workload Secrets, the trust bundle ConfigMap, Events and
//! the policy's status.

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
    runtime::events::{Event, EventType},
};
use rolemesh_crds::{
    MTLSPolicy, MTLSPolicyStatus, RotationRecord,
    names::{
        MANAGED_BY_LABEL, MANAGED_BY_VALUE, TRUST_BUNDLE_CONFIGMAP, TRUST_BUNDLE_KEY,
        rules_field_manager,
    },
};
use std::time::Duration;

use futures::{StreamExt, stream};
use serde_json::json;
use tracing::{info, warn};

use crate::{
    certificate::deletable_by,
    context::{AppliedBundle, Context},
    error::{Error, Result},
};

pub const FIELD_MANAGER: &str = crate::CONTROLLER_NAME;
/// Field manager of `status.lastRotation` alone. The main status write leaves that field out, so a
/// reconcile that started from a cached policy older than a rotation cannot erase the record.
const ROTATION_FIELD_MANAGER: &str = "rolemesh-controller-rotation";

/// Writes a workload Secret. One that is not there yet (`existing` is `None`) is created: a
/// create costs the API server much less than a server-side apply, and first issuance is the bulk
/// of all writes (a policy covering many ServiceAccounts). A create that finds the name taken
/// fails: whoever took it meanwhile, the next reconcile looks at what is there before anything
/// is issued again. `existing`, which the caller found to be this policy's, is server-side
/// applied with its resourceVersion as a precondition, so a Secret replaced since it was looked
/// at is never overwritten.
pub async fn write_secret(
    ctx: &Context,
    secret: &Secret,
    existing: Option<&Secret>,
) -> Result<Secret> {
    let namespace = secret.metadata.namespace.clone().unwrap_or_default();
    let name = secret.metadata.name.clone().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(existing) = existing else {
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..Default::default()
        };
        let written = api
            .create(&params, secret)
            .await
            .map_err(Error::kube(format!("create Secret {namespace}/{name}")))?;
        ctx.remember_written(written.clone());
        return Ok(written);
    };
    let mut body =
        serde_json::to_value(secret).map_err(|e| Error::BuildCertificate(e.to_string()))?;
    body["apiVersion"] = json!("v1");
    body["kind"] = json!("Secret");
    if let Some(version) = &existing.metadata.resource_version {
        body["metadata"]["resourceVersion"] = json!(version);
    }
    // Forced: the fields are rolemesh's even where someone edited them (a repair takes them back).
    let written = match api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
    {
        Ok(written) => written,
        Err(error) => {
            // Our last write may be what `existing` was: the next look goes by the watch.
            ctx.forget_written(&namespace, &name);
            return Err(Error::kube(format!("write Secret {namespace}/{name}"))(
                error,
            ));
        }
    };
    ctx.remember_written(written.clone());
    Ok(written)
}

/// Reads a Secret from the API server, for a name the cache (which holds only Secrets with
/// rolemesh's label) does not show.
pub async fn read_secret(ctx: &Context, namespace: &str, name: &str) -> Result<Option<Secret>> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    api.get_opt(name)
        .await
        .map_err(Error::kube(format!("read Secret {namespace}/{name}")))
}

/// Deletes a workload Secret rolemesh wrote for the policy with uid `policy_uid`; any other is
/// left alone. The uid precondition keeps a Secret that replaced it meanwhile.
pub async fn delete_workload_secret(
    ctx: &Context,
    policy_uid: &str,
    namespace: &str,
    name: &str,
    existing: Option<&Secret>,
) {
    let Some(existing) = existing else { return };
    if !deletable_by(existing, policy_uid) {
        return;
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: existing.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(name, &params).await {
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

/// Writes `namespace`'s trust bundle ConfigMap unless this process already wrote this bundle
/// there.
pub async fn apply_trust_bundle(ctx: &Context, namespace: &str, bundle: &str) -> Result<()> {
    if ctx.bundle_applied(namespace, bundle) {
        return Ok(());
    }
    let resource_version = write_trust_bundle(ctx, namespace, bundle).await?;
    ctx.remember_bundle(
        namespace,
        AppliedBundle {
            bundle: bundle.to_string(),
            resource_version,
        },
    );
    Ok(())
}

/// Server-side applies the trust bundle ConfigMap, taking `ca.crt` back from whoever edited it;
/// returns the resourceVersion the apply left (unchanged when there was nothing to repair).
async fn write_trust_bundle(
    ctx: &Context,
    namespace: &str,
    bundle: &str,
) -> Result<Option<String>> {
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
    let written = api
        .patch(
            TRUST_BUNDLE_CONFIGMAP,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .map_err(Error::kube(format!(
            "write ConfigMap {namespace}/{TRUST_BUNDLE_CONFIGMAP}"
        )))?;
    Ok(written.metadata.resource_version)
}

/// How often every trust bundle ConfigMap this process wrote is applied again: the bound within
/// which an edit of one (a tenant adding a CA of their own to `ca.crt`, or deleting it) is undone.
/// The controller may not read or watch ConfigMaps (RBAC), so it cannot see an edit; a
/// server-side apply that changes nothing is no write to etcd, and costs one request per
/// namespace with a policy per interval.
pub const TRUST_BUNDLE_REPAIR: Duration = Duration::from_secs(60);
/// How many of those applies run at once.
const REPAIR_CONCURRENCY: usize = 4;

/// Applies the bundle in force to every namespace this process wrote one to; returns how many
/// had been changed by someone else and were restored.
pub async fn repair_trust_bundles(ctx: &Context) -> usize {
    let Some(ca) = ctx.ca.load_full() else {
        return 0;
    };
    let bundle = ca.bundle_pem.as_str();
    stream::iter(ctx.applied_bundles())
        .map(|(namespace, applied)| async move {
            match write_trust_bundle(ctx, &namespace, bundle).await {
                Ok(resource_version) => {
                    // Our own apply of the same bundle leaves the version as it was: a new one
                    // means someone else had written the ConfigMap.
                    let repaired = applied.bundle == bundle
                        && resource_version != applied.resource_version;
                    if repaired {
                        warn!(namespace = %namespace, configmap = TRUST_BUNDLE_CONFIGMAP, "restored a trust bundle ConfigMap that someone else had changed");
                    }
                    ctx.remember_bundle(
                        &namespace,
                        AppliedBundle {
                            bundle: bundle.to_string(),
                            resource_version,
                        },
                    );
                    repaired
                }
                Err(Error::Kube {
                    source: kube::Error::Api(status),
                    ..
                }) if status.code == 404 => {
                    // The namespace is gone.
                    ctx.forget_bundle(&namespace);
                    false
                }
                Err(error) => {
                    warn!(%error, namespace = %namespace, "failed to restore a trust bundle ConfigMap");
                    false
                }
            }
        })
        .buffer_unordered(REPAIR_CONCURRENCY)
        .filter(|repaired| std::future::ready(*repaired))
        .count()
        .await
}

/// Runs [`repair_trust_bundles`] every [`TRUST_BUNDLE_REPAIR`] for as long as the task lives.
pub async fn maintain_trust_bundles(ctx: std::sync::Arc<Context>) {
    let mut interval = tokio::time::interval(TRUST_BUNDLE_REPAIR);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let repaired = repair_trust_bundles(&ctx).await;
        if repaired > 0 {
            ctx.metrics.trust_bundles_repaired(repaired);
        }
    }
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
