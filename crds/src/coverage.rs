//! Which MTLSPolicy covers a ServiceAccount. The controller (whose identity it issues) and the
//! webhook (whose proxy configuration it injects) must agree, so both ask these two functions.
//!
//! When several policies select one ServiceAccount the oldest wins (creation timestamp, then
//! name): adding an overlapping policy never takes a running workload's identity away, and the
//! newer policy reports the overlap in its status instead.

use std::{borrow::Borrow, cmp::Ordering, collections::BTreeMap};

use kube::core::{Selector, SelectorExt};

use crate::MTLSPolicy;

impl MTLSPolicy {
    /// Whether this policy names or selects ServiceAccount `name` of `namespace`. `None` when the
    /// answer depends on the ServiceAccount's labels and `labels` is `None`, so that a caller
    /// without them at hand fetches them only when needed.
    pub fn selects(
        &self,
        namespace: &str,
        name: &str,
        labels: Option<&BTreeMap<String, String>>,
    ) -> Option<bool> {
        if self.metadata.namespace.as_deref() != Some(namespace) {
            return Some(false);
        }
        let selection = &self.spec.service_accounts;
        if selection.names.iter().any(|n| n == name) {
            return Some(true);
        }
        let Some(selector) = &selection.selector else {
            return Some(false);
        };
        let labels = labels?;
        // An invalid selector selects nothing (the API server's CRD validation keeps them valid).
        Some(Selector::try_from(selector.clone()).is_ok_and(|s| s.matches(labels)))
    }
}

/// The order in which policies claim a ServiceAccount: the older first, then by name.
pub fn coverage_order(a: &MTLSPolicy, b: &MTLSPolicy) -> Ordering {
    let created = |p: &MTLSPolicy| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
    created(a)
        .cmp(&created(b))
        .then_with(|| a.metadata.name.cmp(&b.metadata.name))
}

/// Of the policies that select one ServiceAccount, the one that covers it (see the module
/// comment); `None` when none selects it.
pub fn covering_policy<P: Borrow<MTLSPolicy>>(selecting: impl IntoIterator<Item = P>) -> Option<P> {
    selecting
        .into_iter()
        .min_by(|a, b| coverage_order(a.borrow(), b.borrow()))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
    use serde_json::json;

    use super::*;

    fn policy(
        name: &str,
        namespace: &str,
        created: Option<i64>,
        selection: serde_json::Value,
    ) -> MTLSPolicy {
        let mut policy: MTLSPolicy = serde_json::from_value(json!({
            "apiVersion": "rolemesh.dev/v1alpha1", "kind": "MTLSPolicy",
            "metadata": { "name": name, "namespace": namespace },
            "spec": { "serviceAccounts": selection },
        }))
        .expect("policy fixture");
        policy.metadata.creation_timestamp =
            created.map(|s| Time(Timestamp::from_second(s).expect("timestamp")));
        policy
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// (case, selection, ServiceAccount namespace, name, labels, expected)
    type SelectsRow<'a> = (
        &'a str,
        &'a serde_json::Value,
        &'a str,
        &'a str,
        Option<&'a BTreeMap<String, String>>,
        Option<bool>,
    );

    /// (case, candidates as (name, created), expected winner)
    type CoverRow<'a> = (&'a str, Vec<(&'a str, Option<i64>)>, Option<&'a str>);

    #[test]
    fn selects() {
        let by_name = json!({ "names": ["web"] });
        let by_label = json!({ "selector": { "matchLabels": { "tier": "front" } } });
        let by_expression = json!({ "selector": { "matchExpressions": [{ "key": "tier", "operator": "Exists" }] } });
        let invalid =
            json!({ "selector": { "matchExpressions": [{ "key": "tier", "operator": "Bogus" }] } });
        let front = labels(&[("tier", "front")]);
        let back = labels(&[("tier", "back")]);
        let none = BTreeMap::new();
        let rows: Vec<SelectsRow> = vec![
            ("listed name", &by_name, "shop", "web", None, Some(true)),
            ("unlisted name", &by_name, "shop", "db", None, Some(false)),
            (
                "listed name, other namespace",
                &by_name,
                "bank",
                "web",
                None,
                Some(false),
            ),
            (
                "selector without labels at hand",
                &by_label,
                "shop",
                "web",
                None,
                None,
            ),
            (
                "selector matches",
                &by_label,
                "shop",
                "web",
                Some(&front),
                Some(true),
            ),
            (
                "selector does not match",
                &by_label,
                "shop",
                "web",
                Some(&back),
                Some(false),
            ),
            (
                "selector, no labels",
                &by_label,
                "shop",
                "web",
                Some(&none),
                Some(false),
            ),
            (
                "expression matches",
                &by_expression,
                "shop",
                "web",
                Some(&back),
                Some(true),
            ),
            (
                "invalid selector selects nothing",
                &invalid,
                "shop",
                "web",
                Some(&front),
                Some(false),
            ),
            (
                "selector, other namespace",
                &by_label,
                "bank",
                "web",
                Some(&front),
                Some(false),
            ),
        ];
        for (case, selection, namespace, name, labels, expected) in rows {
            let policy = policy("p", "shop", Some(0), selection.clone());
            assert_eq!(policy.selects(namespace, name, labels), expected, "{case}");
        }
    }

    #[test]
    fn the_oldest_policy_covers_then_the_first_name() {
        let any = json!({ "names": ["web"] });
        let rows: Vec<CoverRow> = vec![
            ("none selects", vec![], None),
            ("only one", vec![("b", Some(10))], Some("b")),
            (
                "older wins",
                vec![("a", Some(20)), ("b", Some(10))],
                Some("b"),
            ),
            (
                "older wins in any order",
                vec![("b", Some(10)), ("a", Some(20))],
                Some("b"),
            ),
            (
                "same age: first name",
                vec![("b", Some(10)), ("a", Some(10))],
                Some("a"),
            ),
            (
                "three, one older",
                vec![("c", Some(30)), ("a", Some(30)), ("z", Some(5))],
                Some("z"),
            ),
        ];
        for (case, candidates, expected) in rows {
            let policies: Vec<MTLSPolicy> = candidates
                .iter()
                .map(|(name, created)| policy(name, "shop", *created, any.clone()))
                .collect();
            let winner = covering_policy(policies.iter());
            assert_eq!(
                winner.and_then(|p| p.metadata.name.as_deref()),
                expected,
                "{case}"
            );
            // The rule does not depend on who asks: the webhook holds Arcs, the controller refs.
            let shared: Vec<std::sync::Arc<MTLSPolicy>> =
                policies.iter().cloned().map(std::sync::Arc::new).collect();
            assert_eq!(
                covering_policy(shared.iter().cloned()).and_then(|p| p.metadata.name.clone()),
                expected.map(str::to_string),
                "{case} (shared)"
            );
        }
    }
}
