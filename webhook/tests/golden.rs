//! The injection patch, compared with reviewed golden files. `UPDATE_GOLDEN=1 cargo test -p
//! rolemesh-webhook --test golden` rewrites them; review the diff before committing.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;
use rolemesh_crds::MTLSPolicy;
use rolemesh_webhook::{
    Error,
    inject::{InjectorConfig, injection_patch},
};
use serde_json::{Value, json};

fn policy() -> MTLSPolicy {
    serde_json::from_value(json!({
        "apiVersion": "rolemesh.dev/v1alpha1", "kind": "MTLSPolicy",
        "metadata": { "name": "payments", "namespace": "billing", "generation": 3 },
        "spec": {
            "serviceAccounts": { "names": ["payments"] },
            "inbound": [{ "name": "http", "port": 8443, "appPort": 8080,
                          "allow": ["arn:aws:iam::123456789012:role/frontend", "spiffe://mesh.test/ns/shop/*"] }],
            "outbound": [{ "name": "ledger", "localPort": 9001, "upstream": "ledger.billing.svc:8443",
                           "expect": ["arn:aws:iam::123456789012:role/ledger"] }],
        },
    }))
    .expect("policy fixture")
}

fn config() -> InjectorConfig {
    InjectorConfig {
        proxy_image: "ghcr.io/rolemesh/rolemesh-proxy:0.1.0".into(),
        ..InjectorConfig::default()
    }
}

fn pod(spec: Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "payments-0", "namespace": "billing", "labels": { "rolemesh.dev/inject": "true" } },
        "spec": spec,
    }))
    .expect("pod fixture")
}

fn check(name: &str, pod: &Pod) {
    let patch =
        injection_patch(pod, &policy(), "mesh.test", &config()).expect("injection succeeds");
    let actual = serde_json::to_string_pretty(&patch).expect("patch encodes") + "\n";
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.json"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &actual).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} is missing; run with UPDATE_GOLDEN=1", path.display()));
    assert_eq!(
        actual,
        expected,
        "patch for {name} differs from {}",
        path.display()
    );
    // Applying the patch and injecting again adds nothing (reinvocation safety).
    let mut doc = serde_json::to_value(pod).expect("pod encodes");
    json_patch::patch(&mut doc, &patch).expect("the patch applies");
    let injected: Pod = serde_json::from_value(doc).expect("patched pod decodes");
    let again = injection_patch(&injected, &policy(), "mesh.test", &config())
        .expect("re-injection succeeds");
    assert!(
        again.0.is_empty(),
        "re-injecting {name} must be a no-op, got {again:?}"
    );
}

#[test]
fn new_pod() {
    check(
        "new_pod",
        &pod(
            json!({ "serviceAccountName": "payments", "containers": [{ "name": "app", "image": "app:1" }] }),
        ),
    );
}

#[test]
fn pod_with_existing_volumes_and_env() {
    check(
        "existing_volumes_env",
        &pod(json!({
            "serviceAccountName": "payments",
            "volumes": [{ "name": "data", "emptyDir": {} }],
            "containers": [{
                "name": "app", "image": "app:1",
                "env": [{ "name": "SSL_CERT_FILE", "value": "/etc/app/ca.pem" }, { "name": "MODE", "value": "prod" }],
                "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
            }],
        })),
    );
}

#[test]
fn ssl_cert_file_only_when_the_pod_asks() {
    let mut asks = pod(json!({
        "serviceAccountName": "payments",
        "containers": [
            { "name": "app", "image": "app:1" },
            { "name": "own", "image": "own:1", "env": [{ "name": "SSL_CERT_FILE", "value": "/etc/own.pem" }] },
        ],
    }));
    asks.metadata.annotations = Some(
        [("rolemesh.dev/ssl-cert-file".to_string(), "true".to_string())]
            .into_iter()
            .collect(),
    );
    check("ssl_cert_file_opt_in", &asks);
}

#[test]
fn multiple_containers() {
    check(
        "multiple_containers",
        &pod(json!({
            "serviceAccountName": "payments",
            "containers": [{ "name": "app", "image": "app:1" }, { "name": "metrics", "image": "exporter:2" }],
        })),
    );
}

#[test]
fn init_containers_present() {
    check(
        "init_containers",
        &pod(json!({
            "serviceAccountName": "payments",
            "initContainers": [{ "name": "migrate", "image": "migrate:1" }],
            "containers": [{ "name": "app", "image": "app:1" }],
        })),
    );
}

#[test]
fn already_injected_pod_is_unchanged() {
    let original = pod(
        json!({ "serviceAccountName": "payments", "containers": [{ "name": "app", "image": "app:1" }] }),
    );
    let patch = injection_patch(&original, &policy(), "mesh.test", &config()).expect("injects");
    let mut doc = serde_json::to_value(&original).expect("encodes");
    json_patch::patch(&mut doc, &patch).expect("applies");
    let injected: Pod = serde_json::from_value(doc).expect("decodes");
    check("already_injected", &injected);
}

#[test]
fn reserved_names_are_refused_not_clobbered() {
    let clash = pod(json!({
        "serviceAccountName": "payments",
        "volumes": [{ "name": "rolemesh-identity", "emptyDir": {} }],
        "containers": [{ "name": "app", "image": "app:1" }],
    }));
    let error =
        injection_patch(&clash, &policy(), "mesh.test", &config()).expect_err("must refuse");
    assert!(matches!(error, Error::NameConflict { .. }), "{error}");
    assert!(error.to_string().contains("rolemesh-identity"), "{error}");
}

#[test]
fn host_network_pods_are_refused_with_the_way_out() {
    let host = pod(json!({
        "serviceAccountName": "payments",
        "hostNetwork": true,
        "containers": [{ "name": "app", "image": "app:1" }],
    }));
    let error = injection_patch(&host, &policy(), "mesh.test", &config()).expect_err("must refuse");
    assert!(matches!(error, Error::HostNetwork), "{error}");
    assert!(
        error.is_refusal(),
        "a verdict about the pod, not a webhook failure"
    );
    let message = error.to_string();
    assert!(
        message.contains("hostNetwork") && message.contains("rolemesh.dev/inject=\"false\""),
        "{message}"
    );
}
