//! `can FROM TO`: would the mesh let a connection from a pod (or ServiceAccount) to a Service
//! through, and by which rule. It reads what the proxies enforce: the identities in the policies'
//! status, the server policy's inbound `allow` for the port the Service targets, and the client
//! policy's outbound `expect` when the client reaches the Service through a mapping. The patterns
//! are matched with the proxy's own matcher (rolemesh-profile's `PeerPattern`).

use anyhow::{Context as _, Result, bail};
use k8s_openapi::{
    api::core::v1::{Pod, Service},
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{Api, Client, ResourceExt, api::ListParams};
use rolemesh_crds::{MTLSPolicy, WorkloadStatus};
use rolemesh_profile::proxy_config::PeerPattern;
use serde::Serialize;

use crate::{NotFound, Output, print};

/// The arguments of `can` (its help is on `Command`).
#[derive(Debug, clap::Args)]
pub struct CanArgs {
    /// The client: `pod/NAME`, `sa/NAME` (a ServiceAccount) or a pod's NAME, in the namespace of -n.
    from: String,
    /// The Service: `NAME`, `NAME.NAMESPACE` or `svc/NAME[.NAMESPACE]`, with `:PORT` (number or
    /// name) when it has several ports.
    to: String,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
}

/// A workload's identity as the controller issued it.
#[derive(Serialize, Clone)]
#[serde(rename_all = "camelCase")]
struct Identity {
    namespace: String,
    service_account: String,
    policy: String,
    spiffe_id: String,
    role_arn: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    allowed: bool,
    client: Identity,
    service: String,
    port: i32,
    server: Option<Identity>,
    /// Why, rule by rule.
    reasons: Vec<String>,
}

pub async fn can(client: Client, args: CanArgs) -> Result<bool> {
    let namespace = client.default_namespace().to_string();
    let account = client_account(&client, &namespace, &args.from).await?;
    let from = identity_of(&client, &namespace, &account)
        .await?
        .ok_or_else(|| {
            NotFound(format!(
                "ServiceAccount {namespace}/{account} has no rolemesh identity: no MTLSPolicy covers it, or it holds no certificate (kubectl rolemesh status -n {namespace} says why)"
            ))
        })?;
    let (name, service_namespace, port) = parse_target(&args.to, &namespace)?;
    let services: Api<Service> = Api::namespaced(client.clone(), &service_namespace);
    let service = services
        .get_opt(&name)
        .await?
        .ok_or_else(|| NotFound(format!("Service {service_namespace}/{name} not found")))?;
    let spec = service.spec.clone().unwrap_or_default();
    let ports = spec.ports.clone().unwrap_or_default();
    let chosen = match &port {
        Some(wanted) => ports.iter().find(|p| {
            p.name.as_deref() == Some(wanted.as_str()) || p.port.to_string() == *wanted
        }),
        None if ports.len() == 1 => ports.first(),
        None => bail!(
            "Service {service_namespace}/{name} has {} ports: name one, e.g. {name}.{service_namespace}:{}",
            ports.len(),
            ports.first().map_or(0, |p| p.port)
        ),
    }
    .with_context(|| format!("Service {service_namespace}/{name} has no port {port:?}"))?
    .clone();
    let selector = spec.selector.unwrap_or_default();
    if selector.is_empty() {
        bail!(
            "Service {service_namespace}/{name} has no selector: rolemesh sees no pods behind it"
        );
    }
    let labels: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &service_namespace);
    let backends = pods
        .list(&ListParams::default().labels(&labels.join(",")))
        .await?
        .items;
    let backend = backends
        .first()
        .ok_or_else(|| NotFound(format!("Service {service_namespace}/{name} selects no pod")))?;
    let target = match chosen.target_port.clone() {
        None => chosen.port,
        Some(IntOrString::Int(port)) => port,
        Some(IntOrString::String(port_name)) => backend
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(port_name.as_str()))
            .map(|p| p.container_port)
            .with_context(|| {
                format!(
                    "no container of {} names port {port_name}",
                    backend.name_any()
                )
            })?,
    };
    let server_account = backend
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let server = identity_of(&client, &service_namespace, &server_account).await?;

    let mut reasons = Vec::new();
    let mut allowed = false;
    match &server {
        None => reasons.push(format!(
            "the Service's pods (ServiceAccount {service_namespace}/{server_account}) have no rolemesh identity: no policy terminates mTLS for them"
        )),
        Some(server) => {
            let server_policy = policy(&client, &service_namespace, &server.policy).await?;
            match server_policy.spec.inbound.iter().find(|m| i32::from(m.port) == target) {
                None => reasons.push(format!(
                    "port {} of the Service targets {target}, which no inbound mapping of MTLSPolicy {service_namespace}/{} listens on",
                    chosen.port, server.policy
                )),
                Some(mapping) => {
                    let role = from.role_arn.clone().unwrap_or_default();
                    let matched = mapping.allow.iter().enumerate().find(|(_, pattern)| {
                        PeerPattern::new(pattern).is_ok_and(|p| p.matches(&from.spiffe_id, &role))
                    });
                    match matched {
                        Some((index, pattern)) => {
                            allowed = true;
                            reasons.push(format!(
                                "allowed by MTLSPolicy {service_namespace}/{} inbound {} (port {target}) allow[{index}] {pattern:?}",
                                server.policy, mapping.name
                            ));
                        }
                        None => reasons.push(format!(
                            "refused: no allow pattern of MTLSPolicy {service_namespace}/{} inbound {} matches {} or {}",
                            server.policy,
                            mapping.name,
                            from.spiffe_id,
                            from.role_arn.as_deref().unwrap_or("(no role)")
                        )),
                    }
                }
            }
            // The client side: an outbound mapping to this Service must expect the server.
            let client_policy = policy(&client, &namespace, &from.policy).await?;
            let hosts = service_hosts(&name, &service_namespace);
            let mapping = client_policy.spec.outbound.iter().find(|m| {
                m.upstream.rsplit_once(':').is_some_and(|(host, port)| {
                    hosts.iter().any(|h| h == host) && port == chosen.port.to_string()
                })
            });
            match mapping {
                None => reasons.push(format!(
                    "MTLSPolicy {namespace}/{} has no outbound mapping to {name}.{service_namespace}:{}: the client's app must dial it over mTLS itself",
                    from.policy, chosen.port
                )),
                Some(mapping) => {
                    let role = server.role_arn.clone().unwrap_or_default();
                    let expected = mapping.expect.iter().enumerate().find(|(_, pattern)| {
                        PeerPattern::new(pattern)
                            .is_ok_and(|p| p.matches(&server.spiffe_id, &role))
                    });
                    match expected {
                        Some((index, pattern)) => reasons.push(format!(
                            "the client's outbound {} (127.0.0.1:{}) dials it and expect[{index}] {pattern:?} matches the server",
                            mapping.name, mapping.local_port
                        )),
                        None => {
                            allowed = false;
                            reasons.push(format!(
                                "refused by the client: no expect pattern of its outbound {} matches the server's {} or {}",
                                mapping.name,
                                server.spiffe_id,
                                server.role_arn.as_deref().unwrap_or("(no role)")
                            ));
                        }
                    }
                }
            }
        }
    }
    let answer = Answer {
        allowed,
        client: from,
        service: format!("{service_namespace}/{name}"),
        port: chosen.port,
        server,
        reasons,
    };
    match args.output {
        Output::Table => {
            println!(
                "{}: {} ({}) -> Service {}:{}",
                if answer.allowed { "yes" } else { "no" },
                answer.client.spiffe_id,
                answer.client.role_arn.as_deref().unwrap_or("no role"),
                answer.service,
                answer.port
            );
            for reason in &answer.reasons {
                println!("  {reason}");
            }
        }
        other => print(&answer, other)?,
    }
    Ok(answer.allowed)
}

/// The ServiceAccount of `pod/NAME`, `sa/NAME` or a pod NAME.
async fn client_account(client: &Client, namespace: &str, from: &str) -> Result<String> {
    if let Some(account) = from
        .strip_prefix("sa/")
        .or_else(|| from.strip_prefix("serviceaccount/"))
    {
        return Ok(account.to_string());
    }
    let name = from.strip_prefix("pod/").unwrap_or(from);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod = pods.get_opt(name).await?.ok_or_else(|| {
        NotFound(format!(
            "pod {namespace}/{name} not found (for a ServiceAccount write sa/NAME)"
        ))
    })?;
    Ok(pod
        .spec
        .and_then(|s| s.service_account_name)
        .unwrap_or_else(|| "default".into()))
}

/// `NAME[.NAMESPACE][:PORT]`, with an optional `svc/` or `service/` prefix.
fn parse_target(to: &str, default_namespace: &str) -> Result<(String, String, Option<String>)> {
    let to = to
        .strip_prefix("svc/")
        .or_else(|| to.strip_prefix("service/"))
        .unwrap_or(to);
    let (host, port) = match to.split_once(':') {
        Some((host, port)) => (host, Some(port.to_string())),
        None => (to, None),
    };
    let mut parts = host.split('.');
    let name = parts
        .next()
        .filter(|n| !n.is_empty())
        .context("name the Service")?;
    let namespace = parts.next().unwrap_or(default_namespace);
    Ok((name.to_string(), namespace.to_string(), port))
}

/// The names a client may dial the Service by.
fn service_hosts(name: &str, namespace: &str) -> Vec<String> {
    vec![
        name.to_string(),
        format!("{name}.{namespace}"),
        format!("{name}.{namespace}.svc"),
        format!("{name}.{namespace}.svc.cluster.local"),
    ]
}

async fn policy(client: &Client, namespace: &str, name: &str) -> Result<MTLSPolicy> {
    let api: Api<MTLSPolicy> = Api::namespaced(client.clone(), namespace);
    api.get(name)
        .await
        .with_context(|| format!("reading MTLSPolicy {namespace}/{name}"))
}

/// The identity the covering policy's status records for a ServiceAccount, if it holds a
/// certificate.
async fn identity_of(client: &Client, namespace: &str, account: &str) -> Result<Option<Identity>> {
    let api: Api<MTLSPolicy> = Api::namespaced(client.clone(), namespace);
    for policy in api.list(&ListParams::default()).await?.items {
        let found: Option<&WorkloadStatus> = policy
            .status
            .iter()
            .flat_map(|s| s.workloads.iter())
            .find(|w| w.service_account == account && w.serial.is_some());
        if let Some(workload) = found {
            return Ok(workload.spiffe_id.clone().map(|spiffe_id| Identity {
                namespace: namespace.to_string(),
                service_account: account.to_string(),
                policy: policy.name_any(),
                spiffe_id,
                role_arn: workload.role_arn.clone(),
            }));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_as_kubectl_users_write_them() {
        let parsed = |to| parse_target(to, "shop").expect("parses");
        assert_eq!(parsed("payments"), ("payments".into(), "shop".into(), None));
        assert_eq!(
            parsed("svc/payments.billing:8443"),
            ("payments".into(), "billing".into(), Some("8443".into()))
        );
        assert_eq!(
            parsed("payments.billing.svc.cluster.local:mtls"),
            ("payments".into(), "billing".into(), Some("mtls".into()))
        );
        assert!(parse_target(":8443", "shop").is_err());
    }
}
