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

/// With the chart's proxy.logLevel (RUST_LOG beside the configuration) and proxy.resources, a
/// reinvocation recognises rolemesh's own proxy; a proxy whose log level is not the configured
/// one is still refused.
#[test]
fn already_injected_pod_with_a_log_level_is_unchanged() {
    let configured = InjectorConfig {
        log_level: Some("info,h2=warn".into()),
        ..config()
    };
    let original = pod(
        json!({ "serviceAccountName": "payments", "containers": [{ "name": "app", "image": "app:1" }] }),
    );
    let patch = injection_patch(&original, &policy(), "mesh.test", &configured).expect("injects");
    let mut doc = serde_json::to_value(&original).expect("encodes");
    json_patch::patch(&mut doc, &patch).expect("applies");
    let injected: Pod = serde_json::from_value(doc).expect("decodes");
    let again = injection_patch(&injected, &policy(), "mesh.test", &configured)
        .expect("a reinvocation accepts rolemesh's own proxy");
    assert!(again.0.is_empty(), "nothing to change: {again:?}");
    let error = injection_patch(&injected, &policy(), "mesh.test", &config())
        .expect_err("a proxy with another log level than the configured one is not rolemesh's");
    assert!(error.to_string().contains("rolemesh-proxy"), "{error}");
}

/// The proxy's runtime threads: the chart's proxy.cores for every pod, a pod's
/// rolemesh.dev/proxy-cores over it, both as ROLEMESH_PROXY_CORES beside the configuration; a
/// reinvocation keeps them; a value that is not a thread count is refused with what is allowed.
#[test]
fn proxy_cores_come_from_the_chart_and_the_pod_annotation() {
    let with_annotation = |value: &str| {
        let mut pod = pod(
            json!({ "serviceAccountName": "payments", "containers": [{ "name": "app", "image": "app:1" }] }),
        );
        pod.metadata.annotations =
            Some([("rolemesh.dev/proxy-cores".to_string(), value.to_string())].into());
        pod
    };
    let cores_env = |pod: &Pod, config: &InjectorConfig| -> Option<String> {
        let patch = injection_patch(pod, &policy(), "mesh.test", config).expect("injects");
        let injected = patched(pod, &patch);
        let again = injection_patch(&injected, &policy(), "mesh.test", config)
            .expect("a reinvocation accepts rolemesh's own proxy");
        assert!(again.0.is_empty(), "nothing to change: {again:?}");
        let proxy = injected
            .spec
            .and_then(|spec| spec.init_containers)
            .into_iter()
            .flatten()
            .find(|c| c.name == "rolemesh-proxy")
            .expect("the proxy is injected");
        proxy
            .env
            .into_iter()
            .flatten()
            .find(|e| e.name == "ROLEMESH_PROXY_CORES")
            .and_then(|e| e.value)
    };
    let plain = pod(
        json!({ "serviceAccountName": "payments", "containers": [{ "name": "app", "image": "app:1" }] }),
    );
    let chart_four = InjectorConfig {
        cores: Some("4".parse().expect("a thread count")),
        ..config()
    };
    assert_eq!(
        cores_env(&plain, &config()),
        None,
        "unset: the proxy's own default"
    );
    assert_eq!(cores_env(&plain, &chart_four).as_deref(), Some("4"));
    assert_eq!(
        cores_env(&with_annotation("2"), &config()).as_deref(),
        Some("2")
    );
    assert_eq!(
        cores_env(&with_annotation("auto"), &chart_four).as_deref(),
        Some("auto")
    );

    let error = injection_patch(&with_annotation("two"), &policy(), "mesh.test", &config())
        .expect_err("not a thread count");
    assert!(matches!(error, Error::BadAnnotation { .. }), "{error}");
    assert!(error.is_refusal());
    let message = error.to_string();
    assert!(
        message.contains("rolemesh.dev/proxy-cores")
            && message.contains("\"two\"")
            && message.contains("\"auto\""),
        "{message}"
    );
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
        message.contains("hostNetwork") && message.contains("rolemesh.dev/inject=disabled"),
        "{message}"
    );
}

/// The pod as the API server holds it after `patch`.
fn patched(pod: &Pod, patch: &json_patch::Patch) -> Pod {
    let mut doc = serde_json::to_value(pod).expect("pod encodes");
    json_patch::patch(&mut doc, patch).expect("the patch applies");
    serde_json::from_value(doc).expect("patched pod decodes")
}

fn injected_pod() -> Pod {
    let original = pod(
        json!({ "serviceAccountName": "payments", "containers": [{ "name": "app", "image": "app:1" }] }),
    );
    let patch = injection_patch(&original, &policy(), "mesh.test", &config()).expect("injects");
    patched(&original, &patch)
}

fn proxy_config_of(pod: &Pod) -> rolemesh_profile::proxy_config::ProxyConfig {
    let spec = pod.spec.as_ref().expect("spec");
    let proxy = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "rolemesh-proxy")
        .expect("proxy injected");
    let value = proxy.env.as_ref().expect("env")[0]
        .value
        .clone()
        .expect("config");
    rolemesh_profile::proxy_config::ProxyConfig::from_json(&value).expect("valid config")
}

#[test]
fn probes_on_app_ports_go_through_the_admin_port() {
    let with_probes = pod(json!({
        "serviceAccountName": "payments",
        "containers": [{
            "name": "app", "image": "app:1",
            "ports": [{ "name": "http", "containerPort": 8080 }, { "name": "metrics", "containerPort": 9090 }],
            "readinessProbe": { "httpGet": { "path": "/healthz", "port": 8080,
                                "httpHeaders": [{ "name": "X-Probe", "value": "1" }] },
                                "periodSeconds": 2, "timeoutSeconds": 3 },
            "livenessProbe": { "tcpSocket": { "port": "http" } },
            "startupProbe": { "httpGet": { "path": "/metrics", "port": "metrics" } },
        }],
    }));
    check("app_probes", &with_probes);

    let patch = injection_patch(&with_probes, &policy(), "mesh.test", &config()).expect("injects");
    let injected = patched(&with_probes, &patch);
    let spec = injected.spec.as_ref().expect("spec");
    let names: Vec<_> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        names,
        ["rolemesh-init", "rolemesh-proxy"],
        "the ports are closed before the proxy or the app runs"
    );
    let init = &spec.init_containers.as_ref().expect("init")[0];
    let rules = &init.command.as_ref().expect("command")[1];
    assert!(
        rules.contains("iifname != \"lo\" tcp dport { 8080 } reject with tcp reset"),
        "{rules}"
    );
    let app = &spec.containers[0];
    let readiness = app.readiness_probe.as_ref().expect("readiness");
    let get = readiness.http_get.as_ref().expect("httpGet");
    assert_eq!(get.path.as_deref(), Some("/app-health/app/readiness"));
    assert_eq!(
        get.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15021)
    );
    assert_eq!(readiness.period_seconds, Some(2), "timing is the app's own");
    let liveness = app.liveness_probe.as_ref().expect("liveness");
    assert!(liveness.tcp_socket.is_none() && liveness.http_get.is_some());
    let startup = app.startup_probe.as_ref().expect("startup");
    assert_eq!(
        startup.http_get.as_ref().and_then(|g| g.path.as_deref()),
        Some("/metrics"),
        "a probe on a port no mapping closes is left alone"
    );

    let config = proxy_config_of(&injected);
    let probes: Vec<_> = config
        .app_probes
        .iter()
        .map(|p| {
            (
                p.kind.as_str(),
                p.port,
                p.http.as_ref().map(|h| h.path.as_str()),
            )
        })
        .collect();
    assert_eq!(
        probes,
        [
            ("liveness", 8080, None),
            ("readiness", 8080, Some("/healthz"))
        ]
    );
    assert_eq!(config.app_probes[1].timeout_secs, 3);
    assert_eq!(
        config.app_probes[1].http.as_ref().expect("http").headers,
        [("X-Probe".to_string(), "1".to_string())]
    );
}

#[test]
fn opting_out_leaves_ports_and_probes_alone() {
    let mut open = pod(json!({
        "serviceAccountName": "payments",
        "containers": [{ "name": "app", "image": "app:1",
                         "readinessProbe": { "httpGet": { "path": "/", "port": 8080 } } }],
    }));
    open.metadata.annotations = Some(
        [(
            "rolemesh.dev/protect-app-ports".to_string(),
            "false".to_string(),
        )]
        .into_iter()
        .collect(),
    );
    let patch = injection_patch(&open, &policy(), "mesh.test", &config()).expect("injects");
    let injected = patched(&open, &patch);
    let spec = injected.spec.as_ref().expect("spec");
    assert!(
        spec.init_containers
            .iter()
            .flatten()
            .all(|c| c.name != "rolemesh-init")
    );
    assert_eq!(
        spec.containers[0]
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .map(|g| g.port.clone()),
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8080))
    );
    assert!(proxy_config_of(&injected).app_probes.is_empty());
}

#[test]
fn probes_the_proxy_cannot_send_are_refused_with_the_way_out() {
    for probe in [
        json!({ "grpc": { "port": 8080 } }),
        json!({ "httpGet": { "port": 8080, "scheme": "HTTPS" } }),
    ] {
        let grpc = pod(json!({
            "serviceAccountName": "payments",
            "containers": [{ "name": "app", "image": "app:1", "livenessProbe": probe }],
        }));
        let error =
            injection_patch(&grpc, &policy(), "mesh.test", &config()).expect_err("must refuse");
        assert!(
            matches!(error, Error::ProbeNotRewritable { port: 8080, .. }),
            "{error}"
        );
        assert!(error.is_refusal());
        assert!(
            error
                .to_string()
                .contains("rolemesh.dev/protect-app-ports: \"false\""),
            "{error}"
        );
    }
}

/// Pods that arrive looking injected (annotations included) but carry their own content under a
/// reserved name: each must be refused, naming the name.
#[test]
fn a_pod_cannot_bring_its_own_proxy_identity_or_rules() {
    type Tamper = fn(&mut k8s_openapi::api::core::v1::PodSpec);
    let cases: [(&str, &str, Tamper); 9] = [
        (
            "another Secret behind the identity volume",
            "rolemesh-identity",
            |spec| {
                let volume = spec
                    .volumes
                    .as_mut()
                    .expect("volumes")
                    .iter_mut()
                    .find(|v| v.name == "rolemesh-identity")
                    .expect("identity volume");
                volume.secret.as_mut().expect("secret").secret_name =
                    Some("ledger-rolemesh-tls".into());
            },
        ),
        ("another proxy image", "rolemesh-proxy", |spec| {
            spec.init_containers.as_mut().expect("init")[1].image = Some("evil/proxy:1".into());
        }),
        (
            "a proxy reading rules of its own",
            "rolemesh-proxy",
            |spec| {
                let proxy = &mut spec.init_containers.as_mut().expect("init")[1];
                let env = &mut proxy.env.as_mut().expect("env")[0];
                let mut config: Value =
                    serde_json::from_str(env.value.as_deref().expect("value")).expect("json");
                config["rulesFile"] = json!("/var/run/rolemesh/trust/ca.crt");
                env.value = Some(config.to_string());
            },
        ),
        (
            "another policy's rules behind the rules volume",
            "rolemesh-rules",
            |spec| {
                let volume = spec
                    .volumes
                    .as_mut()
                    .expect("volumes")
                    .iter_mut()
                    .find(|v| v.name == "rolemesh-rules")
                    .expect("rules volume");
                volume.config_map.as_mut().expect("configMap").items =
                    Some(vec![k8s_openapi::api::core::v1::KeyToPath {
                        key: "policy.open-to-all.json".into(),
                        path: "rules.json".into(),
                        mode: None,
                    }]);
            },
        ),
        ("the rules mounted into the app", "rolemesh-rules", |spec| {
            spec.containers[0]
                .volume_mounts
                .get_or_insert_with(Vec::new)
                .push(k8s_openapi::api::core::v1::VolumeMount {
                    name: "rolemesh-rules".into(),
                    mount_path: "/rules".into(),
                    ..Default::default()
                });
        }),
        (
            "a proxy run with another command",
            "rolemesh-proxy",
            |spec| {
                spec.init_containers.as_mut().expect("init")[1].command =
                    Some(vec!["/bin/sh".into()]);
            },
        ),
        ("no netfilter rules", "rolemesh-init", |spec| {
            spec.init_containers.as_mut().expect("init")[0].command =
                Some(vec!["/usr/sbin/nft".into(), "list ruleset".into()]);
        }),
        (
            "the key mounted into the app",
            "rolemesh-identity",
            |spec| {
                spec.containers[0]
                    .volume_mounts
                    .get_or_insert_with(Vec::new)
                    .push(k8s_openapi::api::core::v1::VolumeMount {
                        name: "rolemesh-identity".into(),
                        mount_path: "/stolen".into(),
                        ..Default::default()
                    });
            },
        ),
        (
            "a proxy among the app containers",
            "rolemesh-proxy",
            |spec| {
                let proxy = spec.init_containers.as_mut().expect("init").remove(1);
                spec.containers.push(proxy);
            },
        ),
    ];
    for (what, name, tamper) in cases {
        let mut pod = injected_pod();
        tamper(pod.spec.as_mut().expect("spec"));
        let error = injection_patch(&pod, &policy(), "mesh.test", &config()).expect_err(what);
        assert!(
            matches!(error, Error::NameConflict { .. }),
            "{what}: {error}"
        );
        assert!(error.to_string().contains(name), "{what}: {error}");
    }
}

#[test]
fn a_pre_annotated_pod_gets_rolemesh_own_marker() {
    let mut forged = pod(
        json!({ "serviceAccountName": "payments", "containers": [{ "name": "app", "image": "app:1" }] }),
    );
    forged.metadata.annotations = Some(
        [
            ("rolemesh.dev/injected".to_string(), "other@1".to_string()),
            ("rolemesh.dev/proxy-image".to_string(), "evil:1".to_string()),
        ]
        .into_iter()
        .collect(),
    );
    let patch = injection_patch(&forged, &policy(), "mesh.test", &config()).expect("injects");
    let injected = patched(&forged, &patch);
    let annotations = injected.metadata.annotations.expect("annotations");
    assert_eq!(annotations["rolemesh.dev/injected"], "payments@3");
    assert_eq!(
        annotations["rolemesh.dev/proxy-image"],
        "ghcr.io/rolemesh/rolemesh-proxy:0.1.0"
    );
    assert!(
        injected
            .spec
            .expect("spec")
            .init_containers
            .expect("init")
            .iter()
            .any(|c| c.name == "rolemesh-proxy"),
        "the marker does not stop injection"
    );
}

/// The API server's ServiceAccount admission adds its token mount to every container, rolemesh's
/// included, before reinvoking the webhook: the pod is still rolemesh's injection.
#[test]
fn reinvocation_after_serviceaccount_admission_is_a_no_op() {
    let mut pod = injected_pod();
    let spec = pod.spec.as_mut().expect("spec");
    for container in spec
        .init_containers
        .iter_mut()
        .flatten()
        .chain(spec.containers.iter_mut())
    {
        container.volume_mounts.get_or_insert_with(Vec::new).push(
            k8s_openapi::api::core::v1::VolumeMount {
                name: "kube-api-access-x1".into(),
                mount_path: "/var/run/secrets/kubernetes.io/serviceaccount".into(),
                read_only: Some(true),
                ..Default::default()
            },
        );
    }
    let again = injection_patch(&pod, &policy(), "mesh.test", &config()).expect("reinvocation");
    assert!(again.0.is_empty(), "{again:?}");

    // A mount of something else under rolemesh's directory is not.
    pod.spec
        .as_mut()
        .expect("spec")
        .init_containers
        .as_mut()
        .expect("init")[1]
        .volume_mounts
        .as_mut()
        .expect("mounts")
        .push(k8s_openapi::api::core::v1::VolumeMount {
            name: "other".into(),
            mount_path: "/var/run/rolemesh/identity/tls.crt".into(),
            sub_path: Some("tls.crt".into()),
            ..Default::default()
        });
    let error = injection_patch(&pod, &policy(), "mesh.test", &config()).expect_err("refused");
    assert!(error.to_string().contains("rolemesh-proxy"), "{error}");
}

/// Whoever sends the webhook a review (the endpoint is reachable from every pod) gets back the
/// patch: it must hold the policy's mapping names and ports only, never whom the namespace admits,
/// dials or expects. Those reach the proxy through the rules file the controller writes.
#[test]
fn the_answer_names_no_peer_upstream_or_pattern_of_the_policy() {
    let patch = injection_patch(&injected_pod_input(), &policy(), "mesh.test", &config())
        .expect("injection succeeds");
    let answer = serde_json::to_string(&patch).expect("patch encodes");
    let spec = &policy().spec;
    let secrets = spec
        .inbound
        .iter()
        .flat_map(|m| m.allow.iter())
        .chain(spec.outbound.iter().flat_map(|m| m.expect.iter()))
        .chain(spec.outbound.iter().map(|m| &m.upstream));
    for secret in secrets {
        assert!(!answer.contains(secret.as_str()), "{secret} in {answer}");
    }
    for field in [
        "\"allow\"",
        "\"expect\"",
        "\"upstream\"",
        "arn:aws",
        "spiffe://",
    ] {
        assert!(!answer.contains(field), "{field} in {answer}");
    }
    // The rules arrive instead as the policy's key of the trust bundle ConfigMap, in the proxy only.
    assert!(answer.contains("policy.payments.json"), "{answer}");
}

fn injected_pod_input() -> Pod {
    pod(
        json!({ "serviceAccountName": "payments", "containers": [{ "name": "app", "image": "app:1" }] }),
    )
}

/// An inbound mapping's callerIdentity reaches the proxy's configuration, and the pod's record of
/// its start configuration, so that the controller sees a pod injected with another one as stale.
#[test]
fn caller_identity_reaches_the_proxy_and_the_start_record() {
    let mut policy = policy();
    policy.spec.inbound[0].caller_identity = rolemesh_crds::CallerIdentity::Http;
    let pod = pod(json!({ "containers": [{ "name": "app", "image": "app:1" }] }));
    let patch = injection_patch(&pod, &policy, "mesh.test", &config()).expect("injection succeeds");
    let text = serde_json::to_string(&patch).expect("patch encodes");
    assert!(
        text.contains(r#"\"appPort\":8080,\"callerIdentity\":\"http\""#),
        "{text}"
    );
    assert!(
        text.contains("in http 8443>8080 http, out ledger 9001"),
        "{text}"
    );
    // l4, the default, is written nowhere: pods injected before the field existed stay current.
    let plain = injection_patch(&pod, &self::policy(), "mesh.test", &config()).expect("injection");
    let plain = serde_json::to_string(&plain).expect("patch encodes");
    assert!(!plain.contains("callerIdentity"), "{plain}");
    assert!(
        plain.contains("in http 8443>8080, out ledger 9001"),
        "{plain}"
    );
}
