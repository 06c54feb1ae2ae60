//! Who is injected: pods labelled `rolemesh.dev/inject: enabled`, or in a namespace labelled so,
//! unless the pod says `disabled` (`true` and `false` are read the same, on pods and namespaces); never pods in kube-system or in
//! rolemesh's own namespace, never mirror (static) pods. The registration expresses the same rules
//! with selectors so the API server does not call for other pods; the webhook checks again.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

use rolemesh_crds::names::{INJECT_DISABLED, INJECT_ENABLED, INJECT_LABEL};

/// Annotation the kubelet puts on mirror pods of static pods.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
/// Namespaces never injected, whatever their labels.
pub const SYSTEM_NAMESPACES: &[&str] = &["kube-system", "kube-public", "kube-node-lease"];

/// What the pod alone says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodSelection {
    /// Inject.
    Inject,
    /// Leave the pod alone, for this reason (logged and counted).
    Skip(&'static str),
    /// The pod does not say; its namespace's labels decide.
    AskNamespace,
}

/// Decides from the pod and its namespace name alone.
pub fn select_pod(pod: &Pod, namespace: &str, own_namespace: &str) -> PodSelection {
    if SYSTEM_NAMESPACES.contains(&namespace) {
        return PodSelection::Skip("system namespace");
    }
    if namespace == own_namespace {
        return PodSelection::Skip("rolemesh's own namespace");
    }
    let annotations = pod.metadata.annotations.as_ref();
    if annotations.is_some_and(|a| a.contains_key(MIRROR_ANNOTATION)) {
        return PodSelection::Skip("mirror pod");
    }
    let label = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(INJECT_LABEL));
    match label.map(String::as_str) {
        Some(value) if INJECT_ENABLED.contains(&value) => PodSelection::Inject,
        Some(value) if INJECT_DISABLED.contains(&value) => PodSelection::Skip("pod opted out"),
        _ => PodSelection::AskNamespace,
    }
}

/// Whether a namespace with these labels opts its pods in.
pub fn namespace_opted_in(labels: Option<&BTreeMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get(INJECT_LABEL))
        .is_some_and(|v| INJECT_ENABLED.contains(&v.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Pod {
        let map = |pairs: &[(&str, &str)]| {
            Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            )
        };
        let mut pod = Pod::default();
        pod.metadata.labels = map(labels);
        pod.metadata.annotations = map(annotations);
        pod
    }

    #[test]
    fn the_pod_label_decides_first() {
        // One vocabulary with namespaces (enabled/disabled), and the values pods took before.
        for value in ["enabled", "true"] {
            let opted_in = pod(&[(INJECT_LABEL, value)], &[]);
            assert_eq!(
                select_pod(&opted_in, "shop", "rolemesh"),
                PodSelection::Inject,
                "{value}"
            );
        }
        for value in ["disabled", "false"] {
            let opted_out = pod(&[(INJECT_LABEL, value)], &[]);
            assert!(matches!(
                select_pod(&opted_out, "shop", "rolemesh"),
                PodSelection::Skip(_)
            ));
        }
        let unknown = pod(&[(INJECT_LABEL, "yes")], &[]);
        assert_eq!(
            select_pod(&unknown, "shop", "rolemesh"),
            PodSelection::AskNamespace
        );
        let silent = pod(&[("app", "web")], &[]);
        assert_eq!(
            select_pod(&silent, "shop", "rolemesh"),
            PodSelection::AskNamespace
        );
    }

    #[test]
    fn system_own_namespace_and_mirror_pods_are_never_injected() {
        let opted_in = pod(&[(INJECT_LABEL, "true")], &[]);
        for namespace in ["kube-system", "rolemesh"] {
            assert!(matches!(
                select_pod(&opted_in, namespace, "rolemesh"),
                PodSelection::Skip(_)
            ));
        }
        let mirror = pod(&[(INJECT_LABEL, "true")], &[(MIRROR_ANNOTATION, "x")]);
        assert!(matches!(
            select_pod(&mirror, "shop", "rolemesh"),
            PodSelection::Skip(_)
        ));
    }

    #[test]
    fn only_enabled_namespaces_opt_in() {
        let labels = |v: &str| BTreeMap::from([(INJECT_LABEL.to_string(), v.to_string())]);
        assert!(namespace_opted_in(Some(&labels("enabled"))));
        assert!(namespace_opted_in(Some(&labels("true"))));
        assert!(!namespace_opted_in(Some(&labels("disabled"))));
        assert!(!namespace_opted_in(Some(&labels("yes"))));
        assert!(!namespace_opted_in(Some(&BTreeMap::new())));
        assert!(!namespace_opted_in(None));
    }
}
