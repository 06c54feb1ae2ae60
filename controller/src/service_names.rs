//! The DNS names a workload's certificate carries: those of the Services that select its pods, so
//! that a client outside the mesh can verify the proxy's server certificate by hostname.
//!
//! A Service selects a workload when its selector matches the labels of a running pod of that
//! ServiceAccount. The pods and Services come from caches trimmed to what this needs (labels,
//! ServiceAccount, selector), so they cost the controller little per object whatever their owners
//! write into them.

use std::{collections::BTreeSet, sync::Arc};

use k8s_openapi::api::core::v1::{Pod, PodSpec, Service, ServiceSpec};
use kube::ResourceExt;

/// Services named in one certificate at most. Anyone who may create Services in a namespace could
/// otherwise grow every certificate there without bound; past this the names of the Services
/// that sort first are kept, and the rest reported.
pub const MAX_SERVICES_PER_CERTIFICATE: usize = 32;

/// The Kubernetes cluster domain when none is configured.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// The DNS SANs of one workload's certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceNames {
    /// Sorted, each Service's four forms together.
    pub dns_names: Vec<String>,
    /// Services that select the workload but did not fit [`MAX_SERVICES_PER_CERTIFICATE`].
    pub left_out: Vec<String>,
}

/// Keeps of a pod what [`service_names`] reads: its labels, whether it is terminating, and its
/// ServiceAccount.
pub fn trim_pod(pod: &mut Pod) {
    pod.managed_fields_mut().clear();
    pod.metadata.annotations = None;
    pod.metadata.owner_references = None;
    pod.metadata.finalizers = None;
    pod.status = None;
    pod.spec = pod.spec.take().map(|spec| PodSpec {
        service_account_name: spec.service_account_name,
        ..PodSpec::default()
    });
}

/// What of a pod decides the Services that name its workload, hashed: a reconcile follows a
/// change of its labels, ServiceAccount or going away, not of its status.
pub fn selection_facts(pod: &Pod) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    pod.labels().hash(&mut hasher);
    pod_service_account(pod).hash(&mut hasher);
    pod.metadata.deletion_timestamp.is_some().hash(&mut hasher);
    Some(hasher.finish())
}

/// Keeps of a Service what [`service_names`] reads: its selector and type.
pub fn trim_service(service: &mut Service) {
    service.managed_fields_mut().clear();
    service.metadata.annotations = None;
    service.metadata.labels = None;
    service.metadata.owner_references = None;
    service.status = None;
    service.spec = service.spec.take().map(|spec| ServiceSpec {
        selector: spec.selector,
        type_: spec.type_,
        ..ServiceSpec::default()
    });
}

/// The ServiceAccount a pod runs as (Kubernetes defaults it to `default`).
fn pod_service_account(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default")
}

/// Whether `service` selects `pod`: a Service without a selector (its endpoints are managed by
/// hand) or of type ExternalName selects nothing.
fn selects(service: &Service, pod: &Pod) -> bool {
    let Some(spec) = &service.spec else {
        return false;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return false;
    }
    let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
        return false;
    };
    let labels = pod.labels();
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The names of the Services in `namespace` that select a running pod of `service_account`, in
/// the four forms a client resolves: `name`, `name.namespace`, `name.namespace.svc` and
/// `name.namespace.svc.<cluster_domain>`.
pub fn service_names<'a>(
    namespace: &str,
    service_account: &str,
    pods: impl IntoIterator<Item = &'a Arc<Pod>>,
    services: impl IntoIterator<Item = &'a Arc<Service>>,
    cluster_domain: &str,
) -> ServiceNames {
    let pods: Vec<&Arc<Pod>> = pods
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| pod_service_account(p) == service_account)
        .collect();
    let selecting: BTreeSet<String> = services
        .into_iter()
        .filter(|s| s.namespace().as_deref() == Some(namespace))
        .filter(|s| pods.iter().any(|p| selects(s, p)))
        .map(|s| s.name_any())
        .collect();
    let mut selecting = selecting.into_iter();
    let kept: Vec<String> = selecting
        .by_ref()
        .take(MAX_SERVICES_PER_CERTIFICATE)
        .collect();
    let mut dns_names: Vec<String> = kept
        .iter()
        .flat_map(|name| {
            [
                name.clone(),
                format!("{name}.{namespace}"),
                format!("{name}.{namespace}.svc"),
                format!("{name}.{namespace}.svc.{cluster_domain}"),
            ]
        })
        .collect();
    dns_names.sort();
    ServiceNames {
        dns_names,
        left_out: selecting.collect(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn pod(namespace: &str, name: &str, sa: Option<&str>, labels: &[(&str, &str)]) -> Arc<Pod> {
        let mut value = serde_json::json!({
            "metadata": {"name": name, "namespace": namespace, "labels": labels.iter().cloned().collect::<std::collections::BTreeMap<_, _>>()},
            "spec": {"containers": [{"name": "app", "image": "app"}]},
        });
        if let Some(sa) = sa {
            value["spec"]["serviceAccountName"] = sa.into();
        }
        Arc::new(serde_json::from_value(value).unwrap())
    }

    fn service(namespace: &str, name: &str, selector: Option<&[(&str, &str)]>) -> Arc<Service> {
        let mut value = serde_json::json!({
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"ports": [{"port": 443}]},
        });
        if let Some(selector) = selector {
            value["spec"]["selector"] = serde_json::to_value(
                selector
                    .iter()
                    .cloned()
                    .collect::<std::collections::BTreeMap<_, _>>(),
            )
            .unwrap();
        }
        Arc::new(serde_json::from_value(value).unwrap())
    }

    #[test]
    fn services_selecting_the_workloads_pods_give_their_four_forms() {
        let pods = [
            pod(
                "billing",
                "payments-1",
                Some("payments"),
                &[("app", "payments"), ("tier", "api")],
            ),
            pod("billing", "ledger-1", Some("ledger"), &[("app", "ledger")]),
        ];
        let services = [
            service("billing", "payments", Some(&[("app", "payments")])),
            service("billing", "api", Some(&[("tier", "api")])),
            service("billing", "ledger", Some(&[("app", "ledger")])),
            // A selector the pod matches only in part selects nothing.
            service(
                "billing",
                "partial",
                Some(&[("app", "payments"), ("tier", "web")]),
            ),
            // Without a selector, its endpoints are someone's hand-written choice.
            service("billing", "manual", None),
            // Same name and labels, other namespace.
            service("shop", "payments", Some(&[("app", "payments")])),
        ];
        let names = service_names("billing", "payments", &pods, &services, "cluster.local");
        assert_eq!(
            names.dns_names,
            [
                "api",
                "api.billing",
                "api.billing.svc",
                "api.billing.svc.cluster.local",
                "payments",
                "payments.billing",
                "payments.billing.svc",
                "payments.billing.svc.cluster.local",
            ]
        );
        assert!(names.left_out.is_empty());
        let ledger = service_names("billing", "ledger", &pods, &services, "corp.example");
        assert_eq!(ledger.dns_names[3], "ledger.billing.svc.corp.example");
    }

    #[test]
    fn no_running_pod_no_names() {
        let mut terminating =
            (*pod("billing", "p", Some("payments"), &[("app", "payments")])).clone();
        terminating.metadata.deletion_timestamp =
            Some(crate::status::to_time(time::OffsetDateTime::UNIX_EPOCH));
        let services = [service("billing", "payments", Some(&[("app", "payments")]))];
        let names = service_names(
            "billing",
            "payments",
            &[Arc::new(terminating)],
            &services,
            DEFAULT_CLUSTER_DOMAIN,
        );
        assert_eq!(names, ServiceNames::default());
        // A pod without serviceAccountName runs as `default`.
        let unnamed = [pod("billing", "p", None, &[("app", "payments")])];
        assert_eq!(
            service_names(
                "billing",
                "default",
                &unnamed,
                &services,
                DEFAULT_CLUSTER_DOMAIN
            )
            .dns_names
            .len(),
            4
        );
        assert!(
            service_names(
                "billing",
                "payments",
                &unnamed,
                &services,
                DEFAULT_CLUSTER_DOMAIN
            )
            .dns_names
            .is_empty()
        );
    }

    #[test]
    fn external_name_services_select_nothing() {
        let pods = [pod(
            "billing",
            "p",
            Some("payments"),
            &[("app", "payments")],
        )];
        let mut external = (*service("billing", "ext", Some(&[("app", "payments")]))).clone();
        external.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
        let names = service_names(
            "billing",
            "payments",
            &pods,
            &[Arc::new(external)],
            "cluster.local",
        );
        assert!(names.dns_names.is_empty());
    }

    #[test]
    fn the_names_of_a_certificate_are_bounded() {
        let pods = [pod(
            "billing",
            "p",
            Some("payments"),
            &[("app", "payments")],
        )];
        let services: Vec<Arc<Service>> = (0..MAX_SERVICES_PER_CERTIFICATE + 3)
            .map(|i| service("billing", &format!("s{i:03}"), Some(&[("app", "payments")])))
            .collect();
        let names = service_names("billing", "payments", &pods, &services, "cluster.local");
        assert_eq!(names.dns_names.len(), 4 * MAX_SERVICES_PER_CERTIFICATE);
        assert_eq!(names.left_out, ["s032", "s033", "s034"]);
    }

    #[test]
    fn trimmed_objects_keep_what_selection_reads() {
        let mut p = (*pod("billing", "p", Some("payments"), &[("app", "payments")])).clone();
        p.metadata.annotations = Some([("big".to_string(), "x".repeat(1000))].into());
        trim_pod(&mut p);
        assert!(p.metadata.annotations.is_none());
        assert!(p.spec.as_ref().unwrap().containers.is_empty());
        let mut s = (*service("billing", "payments", Some(&[("app", "payments")]))).clone();
        trim_service(&mut s);
        assert!(s.spec.as_ref().unwrap().ports.is_none());
        let services = [Arc::new(s)];
        assert_eq!(
            service_names(
                "billing",
                "payments",
                &[Arc::new(p)],
                &services,
                "cluster.local"
            )
            .dns_names
            .len(),
            4
        );
    }
}
