//! What the webhook does to a pod, as a pure function from (pod, policy, configuration) to JSON
//! patch operations. Nothing here talks to the API server.
//!
//! The patch only ever adds what is missing, so applying it and computing it again yields no
//! operations: reinvocation (`reinvocationPolicy: IfNeeded`) is safe, and a container added by a
//! later webhook still gets the trust bundle on reinvocation. A pod that carries names rolemesh
//! reserves but not the `rolemesh.dev/injected` annotation is refused rather than clobbered.

use std::collections::BTreeMap;

use json_patch::{AddOperation, Patch, PatchOperation};
use jsonptr::PointerBuf;
use k8s_openapi::{
    api::core::v1::{
        Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, HTTPGetAction,
        KeyToPath, Pod, Probe, ResourceRequirements, SeccompProfile, SecretVolumeSource,
        SecurityContext, Volume, VolumeMount,
    },
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};
use rolemesh_crds::{
    MTLSPolicy,
    names::{
        INJECTED_ANNOTATION, PROXY_IMAGE_ANNOTATION, SSL_CERT_FILE_ANNOTATION,
        TRUST_BUNDLE_CONFIGMAP, TRUST_BUNDLE_KEY, workload_secret_name,
    },
};
use rolemesh_profile::proxy_config::{
    DEFAULT_ADMIN_PORT, DEFAULT_IDENTITY_DIR, DEFAULT_TRUST_DIR, InboundListener, Limits,
    OutboundListener, PeerPattern, ProxyConfig,
};
use serde_json::Value;

use crate::error::{Error, Result};

/// Name of the injected sidecar.
pub const PROXY_CONTAINER: &str = "rolemesh-proxy";
/// Volume holding the workload's certificate Secret (mounted into the proxy only).
pub const IDENTITY_VOLUME: &str = "rolemesh-identity";
/// Volume holding the trust bundle ConfigMap (mounted into every container).
pub const TRUST_VOLUME: &str = "rolemesh-trust";
/// Environment variable of every container with the trust bundle's path, for apps that verify
/// meshed peers themselves. The app's system trust stays as it is.
pub const TRUST_BUNDLE_ENV: &str = "ROLEMESH_TRUST_BUNDLE";
/// Environment variable pointing TLS libraries (OpenSSL, Go, rustls-native-certs) at a bundle; set
/// to the trust bundle only for pods annotated [`SSL_CERT_FILE_ANNOTATION`]`: "true"`.
pub const SSL_CERT_FILE_ENV: &str = "SSL_CERT_FILE";
/// Path the proxy answers its liveness probe on (admin port).
pub const PROXY_HEALTH_PATH: &str = "/live";
/// Path the proxy answers its startup and readiness probes on (admin port): ready once its
/// certificate and trust bundle are loaded.
pub const PROXY_READY_PATH: &str = "/ready";
/// User and group the proxy runs as (distroless `nonroot`).
pub const PROXY_UID: i64 = 65532;

/// Path of the trust bundle file in every container.
pub fn trust_bundle_path() -> String {
    format!("{DEFAULT_TRUST_DIR}/{TRUST_BUNDLE_KEY}")
}

/// How the proxy is injected: what the operator configures, the same for every pod.
#[derive(Clone, Debug, PartialEq)]
pub struct InjectorConfig {
    pub proxy_image: String,
    /// `Always`, `IfNotPresent` or `Never`; unset lets the API server default it.
    pub image_pull_policy: Option<String>,
    pub resources: ResourceRequirements,
    pub admin_port: u16,
    pub limits: Limits,
}

impl Default for InjectorConfig {
    fn default() -> Self {
        Self {
            proxy_image: "ghcr.io/rolemesh/rolemesh-proxy:latest".to_string(),
            image_pull_policy: Some("IfNotPresent".to_string()),
            resources: default_resources(),
            admin_port: DEFAULT_ADMIN_PORT,
            limits: Limits::default(),
        }
    }
}

/// Requests of 10m CPU / 32Mi and a 128Mi memory limit.
pub fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("10m".to_string())),
            ("memory".to_string(), Quantity("32Mi".to_string())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity("128Mi".to_string()),
        )])),
        ..ResourceRequirements::default()
    }
}

/// `<policy>@<generation>`, the value of [`INJECTED_ANNOTATION`].
pub fn injected_marker(policy: &MTLSPolicy) -> String {
    format!(
        "{}@{}",
        policy.metadata.name.as_deref().unwrap_or_default(),
        policy.metadata.generation.unwrap_or(0)
    )
}

/// The proxy's configuration derived from the policy: one inbound listener per inbound mapping,
/// one outbound listener per outbound mapping. Validated, so a policy the proxy would refuse is
/// refused at admission instead of crash-looping the pod.
pub fn proxy_config(
    policy: &MTLSPolicy,
    trust_domain: &str,
    config: &InjectorConfig,
) -> Result<ProxyConfig> {
    let invalid = |reason: String| Error::InvalidPolicy {
        policy: policy.metadata.name.clone().unwrap_or_default(),
        reason,
    };
    let patterns = |list: &[String]| {
        list.iter()
            .map(|p| PeerPattern::new(p).map_err(|e| invalid(e.to_string())))
            .collect::<Result<Vec<_>>>()
    };
    let inbound = policy
        .spec
        .inbound
        .iter()
        .map(|m| {
            Ok(InboundListener {
                name: m.name.clone(),
                port: m.port,
                app_port: m.app_port,
                allow: patterns(&m.allow)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let outbound = policy
        .spec
        .outbound
        .iter()
        .map(|m| {
            Ok(OutboundListener {
                name: m.name.clone(),
                local_port: m.local_port,
                upstream: m.upstream.clone(),
                expect: patterns(&m.expect)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let proxy = ProxyConfig {
        trust_domain: trust_domain.to_string(),
        identity_dir: DEFAULT_IDENTITY_DIR.into(),
        trust_bundle: trust_bundle_path().into(),
        admin_port: config.admin_port,
        admin_address: "0.0.0.0".to_string(),
        inbound,
        outbound,
        limits: config.limits.clone(),
    };
    proxy.validate().map_err(|e| invalid(e.to_string()))?;
    Ok(proxy)
}

/// The JSON patch that makes `pod` a member of the mesh under `policy`; empty when the pod
/// already has everything (reinvocation, or a re-created injected pod).
pub fn injection_patch(
    pod: &Pod,
    policy: &MTLSPolicy,
    trust_domain: &str,
    config: &InjectorConfig,
) -> Result<Patch> {
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| Error::BadRequest("the pod has no spec".to_string()))?;
    if spec.host_network == Some(true) {
        return Err(Error::HostNetwork);
    }
    let annotations = pod.metadata.annotations.as_ref();
    let already_injected = annotations.is_some_and(|a| a.contains_key(INJECTED_ANNOTATION));
    let volumes = spec.volumes.as_deref().unwrap_or_default();
    let init_containers = spec.init_containers.as_deref().unwrap_or_default();
    let containers = spec.containers.as_slice();

    if !already_injected {
        for volume in volumes {
            if volume.name == IDENTITY_VOLUME || volume.name == TRUST_VOLUME {
                return Err(Error::NameConflict {
                    kind: "volume",
                    name: volume.name.clone(),
                });
            }
        }
        for container in init_containers.iter().chain(containers) {
            if container.name == PROXY_CONTAINER {
                return Err(Error::NameConflict {
                    kind: "container",
                    name: container.name.clone(),
                });
            }
        }
    }

    let mut ops = Vec::new();

    // Volumes.
    let service_account = spec.service_account_name.as_deref().unwrap_or("default");
    let mut new_volumes = Vec::new();
    if !volumes.iter().any(|v| v.name == IDENTITY_VOLUME) {
        new_volumes.push(identity_volume(service_account));
    }
    if !volumes.iter().any(|v| v.name == TRUST_VOLUME) {
        new_volumes.push(trust_volume());
    }
    append_all(
        &mut ops,
        &["spec", "volumes"],
        spec.volumes.is_some(),
        new_volumes,
    )?;

    // The trust bundle and its path into every existing container (and SSL_CERT_FILE where the pod
    // asks for it). Indexes refer to the pod as received; the sidecar is inserted at the front of
    // initContainers only afterwards.
    let set_ssl_cert_file = annotations
        .and_then(|a| a.get(SSL_CERT_FILE_ANNOTATION))
        .map(String::as_str)
        == Some("true");
    for (field, list) in [
        ("initContainers", init_containers),
        ("containers", containers),
    ] {
        for (index, container) in list.iter().enumerate() {
            if container.name == PROXY_CONTAINER {
                continue;
            }
            trust_ops(&mut ops, field, index, container, set_ssl_cert_file)?;
        }
    }

    // The sidecar, first among the init containers so that later init containers can use it.
    let has_proxy = init_containers
        .iter()
        .chain(containers)
        .any(|c| c.name == PROXY_CONTAINER);
    if !has_proxy {
        let proxy = serde_json::to_value(proxy_container(policy, trust_domain, config)?)?;
        if spec.init_containers.is_some() {
            ops.push(add(&["spec", "initContainers", "0"], proxy));
        } else {
            ops.push(add(&["spec", "initContainers"], Value::Array(vec![proxy])));
        }
    }

    // The record of what was injected, from which policy generation.
    if !already_injected {
        let marks = [
            (INJECTED_ANNOTATION, injected_marker(policy)),
            (PROXY_IMAGE_ANNOTATION, config.proxy_image.clone()),
        ];
        if annotations.is_some() {
            for (key, value) in marks {
                ops.push(add(&["metadata", "annotations", key], Value::String(value)));
            }
        } else {
            let map = marks
                .into_iter()
                .map(|(k, v)| (k.to_string(), Value::String(v)))
                .collect();
            ops.push(add(&["metadata", "annotations"], Value::Object(map)));
        }
    }

    Ok(Patch(ops))
}

fn trust_ops(
    ops: &mut Vec<PatchOperation>,
    field: &str,
    index: usize,
    container: &Container,
    set_ssl_cert_file: bool,
) -> Result<()> {
    let index = index.to_string();
    let mounts = container.volume_mounts.as_deref().unwrap_or_default();
    if !mounts.iter().any(|m| m.name == TRUST_VOLUME) {
        if mounts
            .iter()
            .any(|m| m.mount_path.trim_end_matches('/') == DEFAULT_TRUST_DIR)
        {
            return Err(Error::MountConflict {
                container: container.name.clone(),
                path: DEFAULT_TRUST_DIR.to_string(),
            });
        }
        append_all(
            ops,
            &["spec", field, &index, "volumeMounts"],
            container.volume_mounts.is_some(),
            vec![trust_mount()],
        )?;
    }
    let env = container.env.as_deref().unwrap_or_default();
    let mut wanted = vec![TRUST_BUNDLE_ENV];
    if set_ssl_cert_file {
        wanted.push(SSL_CERT_FILE_ENV);
    }
    // A variable the container sets itself is its own: never overwritten.
    let vars: Vec<EnvVar> = wanted
        .into_iter()
        .filter(|name| !env.iter().any(|e| e.name == *name))
        .map(|name| EnvVar {
            name: name.to_string(),
            value: Some(trust_bundle_path()),
            value_from: None,
        })
        .collect();
    append_all(
        ops,
        &["spec", field, &index, "env"],
        container.env.is_some(),
        vars,
    )?;
    Ok(())
}

/// Appends `items` to the array at `path`, creating the array when the pod has none.
fn append_all<T: serde::Serialize>(
    ops: &mut Vec<PatchOperation>,
    path: &[&str],
    exists: bool,
    items: Vec<T>,
) -> Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    let values = items
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()?;
    if exists {
        let mut end = path.to_vec();
        end.push("-");
        for value in values {
            ops.push(add(&end, value));
        }
    } else {
        ops.push(add(path, Value::Array(values)));
    }
    Ok(())
}

fn add(path: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(path.iter().copied()),
        value,
    })
}

fn identity_volume(service_account: &str) -> Volume {
    Volume {
        name: IDENTITY_VOLUME.to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(workload_secret_name(service_account)),
            // World-readable inside the proxy's own mount: the proxy runs as a non-root user
            // without an fsGroup, and no other container mounts this volume.
            default_mode: Some(0o444),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn trust_volume() -> Volume {
    Volume {
        name: TRUST_VOLUME.to_string(),
        config_map: Some(ConfigMapVolumeSource {
            name: TRUST_BUNDLE_CONFIGMAP.to_string(),
            items: Some(vec![KeyToPath {
                key: TRUST_BUNDLE_KEY.to_string(),
                path: TRUST_BUNDLE_KEY.to_string(),
                mode: None,
            }]),
            default_mode: Some(0o444),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn trust_mount() -> VolumeMount {
    VolumeMount {
        name: TRUST_VOLUME.to_string(),
        mount_path: DEFAULT_TRUST_DIR.to_string(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

/// The proxy sidecar: a restartable init container, hardened, probed on its admin port.
pub fn proxy_container(
    policy: &MTLSPolicy,
    trust_domain: &str,
    config: &InjectorConfig,
) -> Result<Container> {
    let proxy = proxy_config(policy, trust_domain, config)?;
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::Int(i32::from(config.admin_port)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    };
    let mut ports = vec![ContainerPort {
        name: Some("rm-admin".to_string()),
        container_port: i32::from(config.admin_port),
        protocol: Some("TCP".to_string()),
        ..ContainerPort::default()
    }];
    ports.extend(proxy.inbound.iter().map(|listener| ContainerPort {
        container_port: i32::from(listener.port),
        protocol: Some("TCP".to_string()),
        ..ContainerPort::default()
    }));
    Ok(Container {
        name: PROXY_CONTAINER.to_string(),
        image: Some(config.proxy_image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        restart_policy: Some("Always".to_string()),
        env: Some(vec![EnvVar {
            name: rolemesh_profile::proxy_config::CONFIG_ENV.to_string(),
            value: Some(proxy.to_json()),
            value_from: None,
        }]),
        ports: Some(ports),
        resources: Some(config.resources.clone()),
        // kubelet starts the app containers only once a native sidecar's startup probe passes:
        // probing readiness there means the app never runs before the proxy can serve mTLS.
        startup_probe: Some(probe(PROXY_READY_PATH, 1, 120)),
        readiness_probe: Some(probe(PROXY_READY_PATH, 5, 3)),
        liveness_probe: Some(probe(PROXY_HEALTH_PATH, 10, 3)),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_string()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_string(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: IDENTITY_VOLUME.to_string(),
                mount_path: DEFAULT_IDENTITY_DIR.to_string(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            trust_mount(),
        ]),
        ..Container::default()
    })
}
