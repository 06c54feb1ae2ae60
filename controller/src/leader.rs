//! Leader election on a coordination.k8s.io Lease, so that two replicas never both issue.
//! A replica that cannot renew within the lease duration stops: it must not keep writing
//! after another may have taken over.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tracing::{info, warn};

use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    pub renew_every: Duration,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// Tries once to take or renew the lease; true when this replica holds it afterwards.
pub async fn try_acquire(api: &Api<Lease>, config: &LeaseConfig) -> Result<bool> {
    let existing = api
        .get_opt(&config.name)
        .await
        .map_err(Error::kube(format!(
            "read Lease {}/{}",
            config.namespace, config.name
        )))?;
    let duration_seconds = i32::try_from(config.duration.as_secs()).unwrap_or(15);
    let Some(mut lease) = existing else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(duration_seconds),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(Error::kube(format!(
                "create Lease {}/{}",
                config.namespace, config.name
            ))(e)),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let mine = holder == config.identity;
    let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(renewed), Some(seconds)) => renewed
            .0
            .checked_add(SignedDuration::from_secs(i64::from(seconds)))
            .map_or(true, |end| end < Timestamp::now()),
        _ => true,
    };
    if !(mine || holder.is_empty() || expired) {
        return Ok(false);
    }
    let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
    lease.spec = Some(LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(duration_seconds),
        acquire_time: if mine { spec.acquire_time } else { Some(now()) },
        renew_time: Some(now()),
        lease_transitions: Some(transitions),
        ..Default::default()
    });
    // The resourceVersion in `lease` makes this a compare-and-swap: a competing writer gets 409.
    match api
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(Error::kube(format!(
            "update Lease {}/{}",
            config.namespace, config.name
        ))(e)),
    }
}

/// Waits until this replica holds the lease.
pub async fn acquire(client: &Client, config: &LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
    let mut waiting_logged = false;
    loop {
        match try_acquire(&api, config).await {
            Ok(true) => {
                info!(lease = %config.name, identity = %config.identity, "acquired the leader lease");
                return;
            }
            Ok(false) if !waiting_logged => {
                info!(lease = %config.name, "another replica leads; waiting");
                waiting_logged = true;
            }
            Ok(false) => {}
            Err(error) => warn!(%error, "leader election failed; retrying"),
        }
        tokio::time::sleep(config.renew_every).await;
    }
}

/// Renews the lease until it is lost; returns why.
pub async fn hold(client: &Client, config: &LeaseConfig) -> Error {
    let api: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
    let mut last_renewal = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(config.renew_every).await;
        match try_acquire(&api, config).await {
            Ok(true) => last_renewal = tokio::time::Instant::now(),
            Ok(false) => {
                return Error::LostLease {
                    lease: config.name.clone(),
                    message: "another replica holds it".into(),
                };
            }
            Err(error) => {
                warn!(%error, "failed to renew the leader lease");
                // Stop before the lease can expire in others' eyes.
                if last_renewal.elapsed() + config.renew_every >= config.duration {
                    return Error::LostLease {
                        lease: config.name.clone(),
                        message: error.to_string(),
                    };
                }
            }
        }
    }
}

/// Gives the lease up on shutdown so that another replica takes over at once.
pub async fn release(client: &Client, config: &LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
    if let Ok(Some(mut lease)) = api.get_opt(&config.name).await
        && lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(config.identity.as_str())
    {
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.renew_time = None;
        }
        let _ = api
            .replace(&config.name, &PostParams::default(), &lease)
            .await;
    }
}
