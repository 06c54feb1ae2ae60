//! What the webhook does to a pod, as a pure function from (pod, policy, configuration) to JSON
//! patch operations. Nothing here talks to the API server.
//!
//! The patch only ever adds what is missing, so applying it and computing it again yields no
//! operations: reinvocation (`reinvocationPolicy: IfNeeded`) is safe, and a container added by a
//! later webhook still gets the trust bundle on reinvocation. A pod that carries a name rolemesh
//! reserves is admitted only when what it holds under that name is exactly what rolemesh injects
//! (the reinvocation case): annotations prove nothing, since the pod's author writes them.
//!
//! Pods with inbound mappings also get an init container that closes the mappings' app ports to
//! everything but the pod's own loopback (nftables, in the proxy image), and kubelet probes aimed
//! at those ports are rewritten to the proxy's admin port, which runs them against 127.0.0.1.

use std::collections::{BTreeMap, BTreeSet};

use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation};
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
        INJECTED_ANNOTATION, PROTECT_APP_PORTS_ANNOTATION, PROXY_CORES_ANNOTATION,
        PROXY_IMAGE_ANNOTATION, PROXY_PORTS_ANNOTATION, SSL_CERT_FILE_ANNOTATION,
        TRUST_BUNDLE_CONFIGMAP, TRUST_BUNDLE_KEY, policy_rules_key, workload_secret_name,
    },
};
use rolemesh_profile::proxy_config::{
    AppHttpProbe, AppProbe, CONFIG_ENV, CORES_ENV, CoresSetting, DEFAULT_ADMIN_PORT,
    DEFAULT_IDENTITY_DIR, DEFAULT_RULES_DIR, DEFAULT_TRUST_DIR, InboundListener, Limits,
    OutboundListener, ProxyConfig, RULES_FILE,
};
use serde_json::Value;

use crate::error::{Error, Result};

/// Name of the injected sidecar.
pub const PROXY_CONTAINER: &str = "rolemesh-proxy";
/// Name of the init container that closes the app ports (runs `nft` from the proxy image).
pub const NETFILTER_CONTAINER: &str = "rolemesh-init";
/// The directory of rolemesh's mounts in the proxy (identity and trust).
const ROLEMESH_DIR: &str = "/var/run/rolemesh";
/// nftables' command-line tool in the proxy image.
pub const NFT_PATH: &str = "/usr/sbin/nft";
/// Volume holding the workload's certificate Secret (mounted into the proxy only).
pub const IDENTITY_VOLUME: &str = "rolemesh-identity";
/// Volume holding the trust bundle ConfigMap (mounted into every container).
pub const TRUST_VOLUME: &str = "rolemesh-trust";
/// Volume holding the policy's peer rules, one key of the trust bundle ConfigMap (mounted into the
/// proxy only, so apps see no more of the ConfigMap than `ca.crt`).
pub const RULES_VOLUME: &str = "rolemesh-rules";
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
    /// The proxy's `RUST_LOG`; unset leaves the proxy's default (`info`).
    pub log_level: Option<String>,
    /// The proxy's runtime threads (chart `proxy.cores`); unset leaves the proxy's default, `auto`.
    pub cores: Option<CoresSetting>,
    pub admin_port: u16,
    pub limits: Limits,
}

impl Default for InjectorConfig {
    fn default() -> Self {
        Self {
            proxy_image: "ghcr.io/rolemesh/rolemesh-proxy:latest".to_string(),
            image_pull_policy: Some("IfNotPresent".to_string()),
            resources: default_resources(),
            log_level: None,
            cores: None,
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

/// The proxy's start configuration derived from the policy: one inbound listener per inbound
/// mapping, one outbound listener per outbound mapping, and no peer rules (the proxy reads those
/// from the file the controller keeps current, [`RULES_VOLUME`]). The rules are still validated,
/// so a policy the proxy would refuse is refused at admission instead of leaving the pod unready.
pub fn proxy_config(
    policy: &MTLSPolicy,
    trust_domain: &str,
    config: &InjectorConfig,
    app_probes: Vec<AppProbe>,
) -> Result<ProxyConfig> {
    let invalid = |reason: String| Error::InvalidPolicy {
        policy: policy.metadata.name.clone().unwrap_or_default(),
        reason,
    };
    rules_key(policy)?;
    policy.peer_rules().map_err(|e| invalid(e.to_string()))?;
    let inbound = policy
        .spec
        .inbound
        .iter()
        .map(|m| InboundListener {
            name: m.name.clone(),
            port: m.port,
            app_port: m.app_port,
            caller_identity: m.caller_identity,
        })
        .collect();
    let outbound = policy
        .spec
        .outbound
        .iter()
        .map(|m| OutboundListener {
            name: m.name.clone(),
            local_port: m.local_port,
        })
        .collect();
    let proxy = ProxyConfig {
        trust_domain: trust_domain.to_string(),
        identity_dir: DEFAULT_IDENTITY_DIR.into(),
        trust_bundle: trust_bundle_path().into(),
        rules_file: format!("{DEFAULT_RULES_DIR}/{RULES_FILE}").into(),
        admin_port: config.admin_port,
        admin_address: "0.0.0.0".to_string(),
        inbound,
        outbound,
        limits: config.limits.clone(),
        app_probes,
    };
    proxy.validate().map_err(|e| invalid(e.to_string()))?;
    Ok(proxy)
}

/// The key of the policy's peer rules in the trust bundle ConfigMap.
fn rules_key(policy: &MTLSPolicy) -> Result<String> {
    let name = policy.metadata.name.clone().unwrap_or_default();
    policy_rules_key(&name).ok_or_else(|| Error::InvalidPolicy {
        reason: format!(
            "its name is longer than {} characters, too long for the key of its peer rules in ConfigMap {TRUST_BUNDLE_CONFIGMAP}; rename the policy",
            rolemesh_profile::proxy_config::MAX_RULES_POLICY_NAME
        ),
        policy: name,
    })
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
    let volumes = spec.volumes.as_deref().unwrap_or_default();
    let init_containers = spec.init_containers.as_deref().unwrap_or_default();
    let containers = spec.containers.as_slice();
    let service_account = spec.service_account_name.as_deref().unwrap_or("default");
    let protect_app_ports = annotations
        .and_then(|a| a.get(PROTECT_APP_PORTS_ANNOTATION))
        .map(String::as_str)
        != Some("false");
    let app_ports: BTreeSet<u16> = if protect_app_ports {
        policy.spec.inbound.iter().map(|m| m.app_port).collect()
    } else {
        BTreeSet::new()
    };

    let pod_config;
    let config = match pod_cores(annotations)? {
        Some(cores) if config.cores != Some(cores) => {
            pod_config = InjectorConfig {
                cores: Some(cores),
                ..config.clone()
            };
            &pod_config
        }
        _ => config,
    };

    check_reserved_names(
        pod,
        policy,
        trust_domain,
        config,
        service_account,
        &app_ports,
    )?;

    let mut ops = Vec::new();

    // Volumes.
    let mut new_volumes = Vec::new();
    if !volumes.iter().any(|v| v.name == IDENTITY_VOLUME) {
        new_volumes.push(identity_volume(service_account));
    }
    if !volumes.iter().any(|v| v.name == TRUST_VOLUME) {
        new_volumes.push(trust_volume());
    }
    if !volumes.iter().any(|v| v.name == RULES_VOLUME) {
        new_volumes.push(rules_volume(policy)?);
    }
    append_all(
        &mut ops,
        &["spec", "volumes"],
        spec.volumes.is_some(),
        new_volumes,
    )?;

    // The trust bundle and its path into every existing container (and SSL_CERT_FILE where the pod
    // asks for it), and their probes on app ports through the admin port. Indexes refer to the pod
    // as received; rolemesh's init containers are inserted at the front only afterwards.
    let set_ssl_cert_file = annotations
        .and_then(|a| a.get(SSL_CERT_FILE_ANNOTATION))
        .map(String::as_str)
        == Some("true");
    let mut app_probes = Vec::new();
    for (field, list) in [
        ("initContainers", init_containers),
        ("containers", containers),
    ] {
        for (index, container) in list.iter().enumerate() {
            if container.name == PROXY_CONTAINER || container.name == NETFILTER_CONTAINER {
                continue;
            }
            trust_ops(&mut ops, field, index, container, set_ssl_cert_file)?;
            probe_ops(
                &mut ops,
                field,
                index,
                container,
                &app_ports,
                config.admin_port,
                &mut app_probes,
            )?;
        }
    }

    // The sidecar first among the init containers, so that later init containers can use it,
    // and the netfilter rules before it, so no container runs before the app ports are closed.
    let has = |name: &str| init_containers.iter().any(|c| c.name == name);
    let mut front = Vec::new();
    if !app_ports.is_empty() && !has(NETFILTER_CONTAINER) {
        front.push(serde_json::to_value(netfilter_container(
            &app_ports, config,
        ))?);
    }
    if !has(PROXY_CONTAINER) {
        front.push(serde_json::to_value(proxy_container(
            policy,
            trust_domain,
            config,
            app_probes,
        )?)?);
    }
    if spec.init_containers.is_some() {
        for container in front.into_iter().rev() {
            ops.push(add(&["spec", "initContainers", "0"], container));
        }
    } else if !front.is_empty() {
        ops.push(add(&["spec", "initContainers"], Value::Array(front)));
    }

    // The record of what was injected, from which policy generation: always rolemesh's own
    // values, whatever the pod arrived with.
    let marks = [
        (INJECTED_ANNOTATION, injected_marker(policy)),
        (PROXY_IMAGE_ANNOTATION, config.proxy_image.clone()),
        (PROXY_PORTS_ANNOTATION, policy.start_ports()),
    ];
    match annotations {
        Some(existing) => {
            for (key, value) in marks {
                match existing.get(key) {
                    Some(current) if *current == value => {}
                    Some(_) => ops.push(replace(
                        &["metadata", "annotations", key],
                        Value::String(value),
                    )),
                    None => ops.push(add(&["metadata", "annotations", key], Value::String(value))),
                }
            }
        }
        None => {
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

fn replace(path: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Replace(ReplaceOperation {
        path: PointerBuf::from_tokens(path.iter().copied()),
        value,
    })
}

/// Refuses a pod that defines one of rolemesh's reserved names with anything but what rolemesh
/// itself injects there. Reinvocation shows the webhook its own earlier patch, so identical
/// content is admitted; anything else (another Secret behind the identity volume, another proxy
/// image or configuration, another netfilter command, the identity mounted into an app) would let
/// the pod's author borrow an identity or turn the mesh off while looking injected.
fn check_reserved_names(
    pod: &Pod,
    policy: &MTLSPolicy,
    trust_domain: &str,
    config: &InjectorConfig,
    service_account: &str,
    app_ports: &BTreeSet<u16>,
) -> Result<()> {
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(());
    };
    let conflict = |kind: &'static str, name: &str, why: &str| Error::NameConflict {
        kind,
        name: name.to_string(),
        why: why.to_string(),
    };
    for volume in spec.volumes.as_deref().unwrap_or_default() {
        if volume.name == IDENTITY_VOLUME && *volume != identity_volume(service_account) {
            return Err(conflict(
                "volume",
                &volume.name,
                "not the Secret of the pod's own ServiceAccount",
            ));
        }
        if volume.name == TRUST_VOLUME && *volume != trust_volume() {
            return Err(conflict(
                "volume",
                &volume.name,
                "not rolemesh's trust bundle ConfigMap",
            ));
        }
        // Rules of the pod's author's choosing would decide whom the proxy admits.
        if volume.name == RULES_VOLUME && *volume != rules_volume(policy)? {
            return Err(conflict(
                "volume",
                &volume.name,
                "not the peer rules of the policy covering the pod",
            ));
        }
    }
    for container in &spec.containers {
        if container.name == PROXY_CONTAINER || container.name == NETFILTER_CONTAINER {
            return Err(conflict(
                "container",
                &container.name,
                "rolemesh runs it among the init containers",
            ));
        }
    }
    for container in spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
    {
        for (volume, why) in [
            (IDENTITY_VOLUME, "only the proxy holds the key"),
            (RULES_VOLUME, "only the proxy reads the peer rules"),
        ] {
            let mounts = container
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == volume);
            if mounts && container.name != PROXY_CONTAINER {
                return Err(conflict(
                    "volume",
                    volume,
                    &format!("mounted into container {:?}; {why}", container.name),
                ));
            }
        }
    }
    for container in spec.init_containers.iter().flatten() {
        if container.name == PROXY_CONTAINER {
            let expected = proxy_container(policy, trust_domain, config, Vec::new())?;
            if let Some(why) = proxy_differs(container, &expected) {
                return Err(conflict("container", &container.name, &why));
            }
        }
        if container.name == NETFILTER_CONTAINER {
            let expected = netfilter_container(app_ports, config);
            if container.image != expected.image
                || container.command != expected.command
                || container.args.is_some()
                || container.security_context != expected.security_context
            {
                return Err(conflict(
                    "container",
                    &container.name,
                    "not rolemesh's netfilter rules for this pod's app ports",
                ));
            }
        }
    }
    Ok(())
}

/// What makes `found` another proxy than `expected` (rolemesh's for this pod), if anything. The
/// fields compared are those that decide what runs and with which identity and rules; the API
/// server's defaults (pull policy, termination message path) may differ. The rewritten app probes
/// in the configuration are the pod's own and only ever reach its own app ports, so they may.
fn proxy_differs(found: &Container, expected: &Container) -> Option<String> {
    if found.image != expected.image {
        return Some(format!(
            "image {:?}, not {:?}",
            found.image.as_deref().unwrap_or_default(),
            expected.image.as_deref().unwrap_or_default()
        ));
    }
    if found.command.is_some() || found.args.is_some() || found.env_from.is_some() {
        return Some("its own command, args or envFrom".to_string());
    }
    if found.restart_policy != expected.restart_policy
        || found.security_context != expected.security_context
    {
        return Some("another restart policy or security context".to_string());
    }
    // Only the mounts of rolemesh's volumes and of anything under its directory: the API server's
    // ServiceAccount admission adds the token mount to every container, the proxy included, before
    // a reinvocation shows the pod again.
    let mounts = |c: &Container| {
        c.volume_mounts
            .iter()
            .flatten()
            .filter(|m| {
                m.name == IDENTITY_VOLUME
                    || m.name == TRUST_VOLUME
                    || m.mount_path.starts_with(ROLEMESH_DIR)
            })
            .map(|m| {
                (
                    m.name.clone(),
                    m.mount_path.clone(),
                    m.read_only,
                    m.sub_path.clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    if mounts(found) != mounts(expected) {
        return Some("other volume mounts under /var/run/rolemesh".to_string());
    }
    // Every variable but the configuration must be what rolemesh sets (RUST_LOG when a log level
    // is configured), nothing more: a forged proxy could otherwise add its own.
    let other_env = |c: &Container| -> Vec<EnvVar> {
        c.env
            .iter()
            .flatten()
            .filter(|v| v.name != CONFIG_ENV)
            .cloned()
            .collect()
    };
    if other_env(found) != other_env(expected) {
        return Some("other environment variables".to_string());
    }
    let config_of = |c: &Container| -> Option<ProxyConfig> {
        let env = c.env.as_deref()?;
        let mut configs = env.iter().filter(|v| v.name == CONFIG_ENV);
        let (Some(var), None) = (configs.next(), configs.next()) else {
            return None;
        };
        if var.value_from.is_some() {
            return None;
        }
        let mut config = ProxyConfig::from_json(var.value.as_deref()?).ok()?;
        config.app_probes.clear();
        Some(config)
    };
    match (config_of(found), config_of(expected)) {
        (Some(found), Some(expected)) if found == expected => None,
        _ => Some("a configuration other than the policy's".to_string()),
    }
}

/// The nft command that rejects TCP to the app ports arriving on any interface but loopback: the
/// proxy reaches the app on 127.0.0.1, every other pod only through the proxy's mTLS port. One
/// `inet` table covers IPv4 and IPv6; `add` + `flush` keeps a re-run idempotent.
pub fn app_port_rules(app_ports: &BTreeSet<u16>) -> String {
    let ports = app_ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "add table inet rolemesh; flush table inet rolemesh; \
         add chain inet rolemesh inbound {{ type filter hook input priority filter; policy accept; }}; \
         add rule inet rolemesh inbound iifname != \"lo\" tcp dport {{ {ports} }} reject with tcp reset"
    )
}

/// The init container that installs [`app_port_rules`] in the pod's network namespace. It needs
/// root with `NET_ADMIN` (in the pod's namespace only) for the moment it runs, as Istio's and
/// Linkerd's init containers do; nothing else of the pod runs with it.
pub fn netfilter_container(app_ports: &BTreeSet<u16>, config: &InjectorConfig) -> Container {
    Container {
        name: NETFILTER_CONTAINER.to_string(),
        image: Some(config.proxy_image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        command: Some(vec![NFT_PATH.to_string(), app_port_rules(app_ports)]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("10m".to_string())),
                ("memory".to_string(), Quantity("16Mi".to_string())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity("64Mi".to_string()),
            )])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(false),
            run_as_user: Some(0),
            run_as_group: Some(0),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_string()]),
                add: Some(vec!["NET_ADMIN".to_string()]),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_string(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

/// Rewrites the container's probes that check an app port (closed to kubelet by the netfilter
/// rules) to `httpGet` on the admin port, and records the original check for the proxy.
fn probe_ops(
    ops: &mut Vec<PatchOperation>,
    field: &str,
    index: usize,
    container: &Container,
    app_ports: &BTreeSet<u16>,
    admin_port: u16,
    app_probes: &mut Vec<AppProbe>,
) -> Result<()> {
    if app_ports.is_empty() {
        return Ok(());
    }
    let port_of = |port: &IntOrString| -> Option<u16> {
        match port {
            IntOrString::Int(n) => u16::try_from(*n).ok(),
            IntOrString::String(name) => container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok()),
        }
    };
    let index = index.to_string();
    for (kind, json_field, probe) in [
        ("liveness", "livenessProbe", &container.liveness_probe),
        ("readiness", "readinessProbe", &container.readiness_probe),
        ("startup", "startupProbe", &container.startup_probe),
    ] {
        let Some(probe) = probe else { continue };
        let refuse = |port: u16, what: &'static str| Error::ProbeNotRewritable {
            container: container.name.clone(),
            kind,
            port,
            probe: what,
        };
        // A probe with its own host checks another address, not this pod's closed port.
        let check = if let Some(http) = &probe.http_get {
            match port_of(&http.port) {
                Some(port) if app_ports.contains(&port) && http.host.is_none() => {
                    if http.scheme.as_deref().is_some_and(|s| s != "HTTP") {
                        return Err(refuse(port, "HTTPS"));
                    }
                    Some((
                        port,
                        Some(AppHttpProbe {
                            path: http.path.clone().unwrap_or_else(|| "/".to_string()),
                            headers: http
                                .http_headers
                                .iter()
                                .flatten()
                                .map(|h| (h.name.clone(), h.value.clone()))
                                .collect(),
                        }),
                    ))
                }
                _ => None,
            }
        } else if let Some(tcp) = &probe.tcp_socket {
            match port_of(&tcp.port) {
                Some(port) if app_ports.contains(&port) && tcp.host.is_none() => Some((port, None)),
                _ => None,
            }
        } else if let Some(grpc) = &probe.grpc {
            match u16::try_from(grpc.port) {
                Ok(port) if app_ports.contains(&port) => return Err(refuse(port, "gRPC")),
                _ => None,
            }
        } else {
            None
        };
        let Some((port, http)) = check else { continue };
        let app_probe = AppProbe {
            container: container.name.clone(),
            kind: kind.to_string(),
            port,
            http,
            timeout_secs: probe
                .timeout_seconds
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or(1),
        };
        let rewritten = Probe {
            http_get: Some(HTTPGetAction {
                path: Some(app_probe.admin_path()),
                port: IntOrString::Int(i32::from(admin_port)),
                scheme: Some("HTTP".to_string()),
                ..HTTPGetAction::default()
            }),
            tcp_socket: None,
            grpc: None,
            ..probe.clone()
        };
        ops.push(replace(
            &["spec", field, &index, json_field],
            serde_json::to_value(rewritten)?,
        ));
        app_probes.push(app_probe);
    }
    Ok(())
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

/// The policy's rules key of the trust bundle ConfigMap as the file [`RULES_FILE`]. Optional, so
/// that a pod created before the controller first wrote the rules still starts: its proxy admits
/// no one and stays unready until kubelet delivers the file.
fn rules_volume(policy: &MTLSPolicy) -> Result<Volume> {
    Ok(Volume {
        name: RULES_VOLUME.to_string(),
        config_map: Some(ConfigMapVolumeSource {
            name: TRUST_BUNDLE_CONFIGMAP.to_string(),
            items: Some(vec![KeyToPath {
                key: rules_key(policy)?,
                path: RULES_FILE.to_string(),
                mode: None,
            }]),
            default_mode: Some(0o444),
            optional: Some(true),
        }),
        ..Volume::default()
    })
}

fn trust_mount() -> VolumeMount {
    VolumeMount {
        name: TRUST_VOLUME.to_string(),
        mount_path: DEFAULT_TRUST_DIR.to_string(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

/// The pod's own choice of proxy threads, [`PROXY_CORES_ANNOTATION`].
fn pod_cores(annotations: Option<&BTreeMap<String, String>>) -> Result<Option<CoresSetting>> {
    let Some(value) = annotations.and_then(|a| a.get(PROXY_CORES_ANNOTATION)) else {
        return Ok(None);
    };
    value
        .parse::<CoresSetting>()
        .map(Some)
        .map_err(|why| Error::BadAnnotation {
            annotation: PROXY_CORES_ANNOTATION,
            value: value.clone(),
            why,
        })
}

/// The proxy sidecar: a restartable init container, hardened, probed on its admin port.
pub fn proxy_container(
    policy: &MTLSPolicy,
    trust_domain: &str,
    config: &InjectorConfig,
    app_probes: Vec<AppProbe>,
) -> Result<Container> {
    let proxy = proxy_config(policy, trust_domain, config, app_probes)?;
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
        env: Some(
            std::iter::once(EnvVar {
                name: CONFIG_ENV.to_string(),
                value: Some(proxy.to_json()),
                value_from: None,
            })
            .chain(config.log_level.iter().map(|level| EnvVar {
                name: "RUST_LOG".to_string(),
                value: Some(level.clone()),
                value_from: None,
            }))
            .chain(config.cores.iter().map(|cores| EnvVar {
                name: CORES_ENV.to_string(),
                value: Some(cores.to_string()),
                value_from: None,
            }))
            .collect(),
        ),
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
            VolumeMount {
                name: RULES_VOLUME.to_string(),
                mount_path: DEFAULT_RULES_DIR.to_string(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    })
}
