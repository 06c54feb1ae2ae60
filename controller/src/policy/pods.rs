//! Which pods run which generation of a policy, and which of them need a restart: the peer rules
//! reach running proxies live, the mappings and ports only when a pod is created. Read from the
//! annotations the webhook writes on every pod it injects, by a metadata-only LIST of the
//! namespace's pods (no pod cache, no pod specs).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{ListParams, PartialObjectMeta},
};
use rolemesh_crds::{
    GenerationPods, MTLSPolicy, PodsStatus, StalePod,
    names::{INJECTED_ANNOTATION, PROXY_PORTS_ANNOTATION},
};

use crate::{
    context::Context,
    error::{Error, Result},
};

/// Stale pods listed in the status; the count covers them all.
pub const MAX_STALE_LISTED: usize = 100;
/// Pods per page of the LIST.
const PAGE: u32 = 500;

/// The pods of `namespace`, metadata only.
pub async fn list_pods(ctx: &Context, namespace: &str) -> Result<Vec<PartialObjectMeta<Pod>>> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let mut pods = Vec::new();
    let mut params = ListParams::default().limit(PAGE);
    loop {
        let page = api
            .list_metadata(&params)
            .await
            .map_err(Error::kube(format!("list the pods of {namespace}")))?;
        pods.extend(page.items);
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Ok(pods),
        }
    }
}

/// The pods injected from `policy` among `pods`, by generation, and the stale ones.
pub fn pods_status(policy: &MTLSPolicy, pods: &[PartialObjectMeta<Pod>]) -> PodsStatus {
    let name = policy.metadata.name.as_deref().unwrap_or_default();
    let current = policy.start_ports();
    let mut generations = BTreeMap::<i64, i32>::new();
    let mut stale = Vec::new();
    for pod in pods {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let annotations = pod.metadata.annotations.as_ref();
        let Some((injected_from, generation)) = annotations
            .and_then(|a| a.get(INJECTED_ANNOTATION))
            .and_then(|marker| marker.rsplit_once('@'))
        else {
            continue;
        };
        if injected_from != name {
            continue;
        }
        let generation = generation.parse::<i64>().unwrap_or(0);
        *generations.entry(generation).or_default() += 1;
        let reason = match annotations.and_then(|a| a.get(PROXY_PORTS_ANNOTATION)) {
            None => "InjectedBeforeLiveRules",
            Some(ports) if *ports != current => "PortsChanged",
            Some(_) => continue,
        };
        stale.push(StalePod {
            name: pod.metadata.name.clone().unwrap_or_default(),
            generation,
            reason: reason.to_string(),
        });
    }
    stale.sort_by(|a, b| a.name.cmp(&b.name));
    let stale_count = i32::try_from(stale.len()).unwrap_or(i32::MAX);
    stale.truncate(MAX_STALE_LISTED);
    // The newest generations when a policy has had more than the schema allows.
    let generations: Vec<GenerationPods> = generations
        .into_iter()
        .rev()
        .take(64)
        .map(|(generation, pods)| GenerationPods { generation, pods })
        .collect();
    PodsStatus {
        generations,
        stale_count,
        stale,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(inbound_port: u16) -> MTLSPolicy {
        serde_json::from_value(json!({
            "apiVersion": "rolemesh.dev/v1alpha1", "kind": "MTLSPolicy",
            "metadata": { "name": "web", "namespace": "shop", "generation": 4 },
            "spec": {
                "serviceAccounts": { "names": ["web"] },
                "inbound": [{ "name": "http", "port": inbound_port, "appPort": 8080, "allow": [] }],
            },
        }))
        .expect("policy fixture")
    }

    fn pod(name: &str, annotations: &[(&str, &str)]) -> PartialObjectMeta<Pod> {
        let mut pod = PartialObjectMeta::<Pod>::default();
        pod.metadata.name = Some(name.into());
        pod.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        pod
    }

    #[test]
    fn pods_whose_ports_changed_are_stale_and_rule_edits_are_not() {
        let old_ports = policy(8443).start_ports();
        let edited = policy(9443);
        let new_ports = edited.start_ports();
        let pods = [
            // Injected at generation 3 with the ports generation 4 still has: only its rules
            // changed, which reach it live.
            pod(
                "a-current",
                &[
                    (INJECTED_ANNOTATION, "web@3"),
                    (PROXY_PORTS_ANNOTATION, &new_ports),
                ],
            ),
            pod(
                "b-moved",
                &[
                    (INJECTED_ANNOTATION, "web@2"),
                    (PROXY_PORTS_ANNOTATION, &old_ports),
                ],
            ),
            pod("c-before", &[(INJECTED_ANNOTATION, "web@1")]),
            pod(
                "d-other-policy",
                &[
                    (INJECTED_ANNOTATION, "api@2"),
                    (PROXY_PORTS_ANNOTATION, &old_ports),
                ],
            ),
            pod("e-plain", &[]),
            pod(
                "f-new",
                &[
                    (INJECTED_ANNOTATION, "web@4"),
                    (PROXY_PORTS_ANNOTATION, &new_ports),
                ],
            ),
        ];
        let status = pods_status(&edited, &pods);
        assert_eq!(status.stale_count, 2);
        let stale: Vec<_> = status
            .stale
            .iter()
            .map(|p| (p.name.as_str(), p.generation, p.reason.as_str()))
            .collect();
        assert_eq!(
            stale,
            [
                ("b-moved", 2, "PortsChanged"),
                ("c-before", 1, "InjectedBeforeLiveRules")
            ]
        );
        let generations: Vec<_> = status
            .generations
            .iter()
            .map(|g| (g.generation, g.pods))
            .collect();
        assert_eq!(generations, [(4, 1), (3, 1), (2, 1), (1, 1)]);
    }

    #[test]
    fn the_stale_list_is_capped_but_counted() {
        let edited = policy(9443);
        let pods: Vec<_> = (0..250)
            .map(|i| {
                pod(
                    &format!("p-{i:03}"),
                    &[
                        (INJECTED_ANNOTATION, "web@1"),
                        (PROXY_PORTS_ANNOTATION, "in http 1>2"),
                    ],
                )
            })
            .collect();
        let status = pods_status(&edited, &pods);
        assert_eq!(status.stale_count, 250);
        assert_eq!(status.stale.len(), MAX_STALE_LISTED);
        assert_eq!(status.stale[0].name, "p-000");
    }
}
