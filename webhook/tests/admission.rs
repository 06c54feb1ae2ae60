//! The real API server calling the real webhook binary over TLS, registered the way the chart
//! registers it (by URL, since the local control plane has no kubelet to run it in a pod).

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    core::v1::{Namespace, Pod, Secret},
};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use rolemesh_controller::webhook_tls::{WebhookTlsConfig, reconcile_webhook_tls};
use rolemesh_crds::MTLSAuthority;
use rolemesh_testkit::{
    TestNamespace, cluster, eventually, free_port, in_namespace, install_crds, log_dir, temp_dir,
};
use serde_json::json;

struct Webhook {
    child: Child,
    admin_port: u16,
    log: std::path::PathBuf,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- webhook log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

fn start_webhook(
    ns: &TestNamespace,
    system_ns: &str,
    authority: &str,
    port: u16,
) -> Result<Webhook> {
    let admin_port = free_port();
    let log = log_dir()?.join(format!("webhook-{}.log", ns.name));
    let mut command = Command::new(env!("CARGO_BIN_EXE_rolemesh-webhook"));
    for (key, value) in ns.env.vars() {
        command.env(key, value);
    }
    let child = command
        .args(["--namespace", system_ns, "--authority", authority])
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin_port}"),
        ])
        .args(["--proxy-image", "ghcr.io/rolemesh/rolemesh-proxy:test"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting rolemesh-webhook")?;
    Ok(Webhook {
        child,
        admin_port,
        log,
    })
}

async fn ready(admin_port: u16) -> Result<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", admin_port)).await else {
        return Ok(false);
    };
    stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    stream.read_to_string(&mut out).await?;
    Ok(out.starts_with("HTTP/1.1 200"))
}

fn pod_manifest(name: &str, service_account: &str, inject: Option<&str>) -> String {
    let labels = match inject {
        Some(value) => format!("{{app: demo, rolemesh.dev/inject: \"{value}\"}}"),
        None => "{app: demo}".to_string(),
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {labels}}}\nspec:\n  serviceAccountName: {service_account}\n  containers:\n    - {{name: app, image: app:1}}\n"
    )
}

fn registration(name: &str, namespace: &str, port: u16) -> serde_json::Value {
    let client_config = json!({ "url": format!("https://127.0.0.1:{port}/mutate-pod") });
    let rules = json!([{ "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"] }]);
    let common =
        |name: &str, namespace_selector: serde_json::Value, object_selector: serde_json::Value| {
            json!({
                "name": name, "clientConfig": client_config, "rules": rules,
                "failurePolicy": "Fail", "sideEffects": "None", "timeoutSeconds": 5,
                "reinvocationPolicy": "IfNeeded", "admissionReviewVersions": ["v1"],
                "namespaceSelector": namespace_selector, "objectSelector": object_selector,
            })
        };
    // Scoped to this test's namespace so parallel tests never meet this Fail-policy webhook.
    let only_here =
        json!({ "key": "kubernetes.io/metadata.name", "operator": "In", "values": [namespace] });
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": name },
        "webhooks": [
            common("pods.rolemesh.dev", json!({ "matchExpressions": [only_here] }),
                json!({ "matchExpressions": [{ "key": "rolemesh.dev/inject", "operator": "In", "values": ["enabled", "true"] }] })),
            common("namespaces.rolemesh.dev",
                json!({ "matchExpressions": [only_here, { "key": "rolemesh.dev/inject", "operator": "In", "values": ["enabled", "true"] }] }),
                json!({ "matchExpressions": [{ "key": "rolemesh.dev/inject", "operator": "NotIn", "values": ["enabled", "true", "disabled", "false"] }] })),
        ],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_calls_the_webhook_over_tls() -> Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let env = cluster().await?;
    install_crds(&env).await?;
    in_namespace("webhook", |ns| async move {
        let system_ns = format!("{}-sys", ns.name);
        let authority = format!("webhook-{}", &ns.name[ns.name.len() - 8..]);
        let configuration = format!("rolemesh-test-{}", ns.name);
        let namespaces: Api<Namespace> = Api::all(ns.client.clone());
        namespaces.create(&PostParams::default(), &serde_json::from_value(json!({ "metadata": { "name": system_ns } }))?).await?;
        let configurations: Api<MutatingWebhookConfiguration> = Api::all(ns.client.clone());
        let authorities: Api<MTLSAuthority> = Api::all(ns.client.clone());
        let result = async {
            authorities
                .create(&PostParams::default(), &serde_json::from_value(json!({
                    "apiVersion": "rolemesh.dev/v1alpha1", "kind": "MTLSAuthority",
                    "metadata": { "name": authority },
                    "spec": { "trustDomain": "mesh.test", "signer": { "type": "local", "local": { "secretName": "k" } } },
                }))?)
                .await?;
            let setup = format!(
                "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: web}}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: stranger}}\n---\napiVersion: rolemesh.dev/v1alpha1\nkind: MTLSPolicy\nmetadata: {{name: web}}\nspec:\n  serviceAccounts: {{names: [web]}}\n  inbound: [{{name: http, port: 8443, appPort: 8080, allow: ['arn:aws:iam::123456789012:role/*']}}]\n  outbound: [{{name: db, localPort: 9001, upstream: 'db.{}.svc:8443', expect: ['spiffe://mesh.test/ns/{}/sa/db']}}]\n",
                ns.name, ns.name
            );
            rolemesh_testkit::expect_success("kubectl", &["apply"], &ns.env.kubectl_apply(&ns.name, &setup)?)?;

            let port = free_port();
            configurations.create(&PostParams::default(), &serde_json::from_value(registration(&configuration, &ns.name, port))?).await?;
            // The serving certificate and caBundle, exactly as the controller maintains them.
            let mut tls_config = WebhookTlsConfig::for_service(&system_ns, "rolemesh-webhook");
            tls_config.webhook_configuration = Some(configuration.clone());
            tls_config.ip_addresses = vec!["127.0.0.1".parse()?];
            let first_tls = reconcile_webhook_tls(&ns.client, &tls_config).await?;
            let webhook = start_webhook(&ns, &system_ns, &authority, port)?;
            eventually("the webhook to be ready", Duration::from_secs(30), || async { Ok(ready(webhook.admin_port).await?.then_some(())) }).await?;

            // Bad input straight to the server, from curl: 413 for an oversized body, 400 for
            // malformed JSON or a review without a request, a denial naming the kind otherwise.
            let curl = |body: &[u8]| -> Result<(String, String)> {
                let dir = temp_dir("body");
                let path = dir.join("review.json");
                std::fs::write(&path, body)?;
                let out = Command::new("curl")
                    .args(["-sk", "-o", "-", "-w", "\n%{http_code}", "-H", "Content-Type: application/json", "--data-binary"])
                    .arg(format!("@{}", path.display()))
                    .arg(format!("https://127.0.0.1:{port}/mutate-pod"))
                    .output()?;
                let _ = std::fs::remove_dir_all(&dir);
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let (body, code) = text.rsplit_once('\n').context("curl output")?;
                Ok((code.to_string(), body.to_string()))
            };
            ensure!(curl(&vec![b' '; 4 * 1024 * 1024])?.0 == "413", "oversized body");
            let (code, body) = curl(b"{not json")?;
            ensure!(code == "400" && body.contains("not an AdmissionReview"), "{code} {body}");
            let (code, _) = curl(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#)?;
            ensure!(code == "400", "a review without request: {code}");
            let wrong_kind = json!({
                "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "request": {
                    "uid": "1", "kind": { "group": "apps", "version": "v1", "kind": "Deployment" },
                    "resource": { "group": "apps", "version": "v1", "resource": "deployments" },
                    "operation": "CREATE", "userInfo": {}, "namespace": ns.name, "object": { "metadata": { "name": "d" } },
                },
            });
            let (code, body) = curl(wrong_kind.to_string().as_bytes())?;
            ensure!(code == "200" && body.contains("\"allowed\":false") && body.contains("expected a Pod"), "{code} {body}");

            // A review crafted by anyone who reaches the endpoint, for a pod of the policy: the
            // answer (patch included) names no peer, upstream or pattern of the namespace.
            let crafted = json!({
                "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "request": {
                    "uid": "2", "kind": { "group": "", "version": "v1", "kind": "Pod" },
                    "resource": { "group": "", "version": "v1", "resource": "pods" },
                    "operation": "CREATE", "userInfo": {}, "namespace": ns.name,
                    "object": { "metadata": { "name": "crafted", "namespace": ns.name, "labels": { "rolemesh.dev/inject": "true" } },
                                "spec": { "serviceAccountName": "web", "containers": [{ "name": "app", "image": "app:1" }] } },
                },
            });
            let (code, body) = curl(crafted.to_string().as_bytes())?;
            let answer: serde_json::Value = serde_json::from_str(&body)?;
            ensure!(code == "200" && answer["response"]["allowed"] == json!(true), "{code} {body}");
            let patch = answer["response"]["patch"].as_str().context("a patch")?;
            let patch = String::from_utf8(base64::Engine::decode(&base64::engine::general_purpose::STANDARD, patch)?)?;
            for secret in ["arn:aws", "spiffe://", "\"allow\"", "\"expect\"", "\"upstream\"", ".svc:8443"] {
                ensure!(!body.contains(secret) && !patch.contains(secret), "{secret} in the answer: {patch}");
            }

            // An opted-in pod is stored with the sidecar, mounts and config.
            rolemesh_testkit::expect_success("kubectl", &["apply"], &ns.env.kubectl_apply(&ns.name, &pod_manifest("web-1", "web", Some("true")))?)?;
            let pods: Api<Pod> = ns.api();
            let stored = pods.get("web-1").await?;
            let spec = stored.spec.clone().context("pod spec")?;
            let proxy = spec.init_containers.clone().unwrap_or_default().into_iter().find(|c| c.name == "rolemesh-proxy").context("no proxy sidecar")?;
            ensure!(proxy.restart_policy.as_deref() == Some("Always"), "native sidecar");
            let security = proxy.security_context.clone().context("security context")?;
            ensure!(security.run_as_non_root == Some(true) && security.read_only_root_filesystem == Some(true) && security.allow_privilege_escalation == Some(false));
            ensure!(security.capabilities.and_then(|c| c.drop).is_some_and(|d| d.contains(&"ALL".to_string())));
            ensure!(proxy.readiness_probe.is_some() && proxy.startup_probe.is_some());
            let config_json = proxy.env.unwrap_or_default().into_iter().find(|e| e.name == "ROLEMESH_PROXY_CONFIG").and_then(|e| e.value).context("proxy config env")?;
            let config = rolemesh_profile::proxy_config::ProxyConfig::from_json(&config_json)?;
            ensure!(config.trust_domain == "mesh.test" && config.inbound[0].port == 8443 && config.inbound[0].app_port == 8080);
            ensure!(config.outbound[0].local_port == 9001);
            // The stored pod (what the webhook answered) names no peer, upstream or pattern: the
            // proxy reads those from the policy's key of the trust bundle, mounted into it alone.
            let stored_json = serde_json::to_string(&stored)?;
            for field in ["\"allow\"", "\"expect\"", "\"upstream\"", "arn:aws", "spiffe://"] {
                ensure!(!stored_json.contains(field), "{field} in the injected pod: {stored_json}");
            }
            ensure!(proxy.volume_mounts.clone().unwrap_or_default().iter().any(|m| m.name == "rolemesh-rules" && m.mount_path == "/var/run/rolemesh/rules"));
            let volumes = spec.volumes.clone().unwrap_or_default();
            ensure!(volumes.iter().any(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("web-rolemesh-tls")));
            ensure!(volumes.iter().any(|v| v.config_map.as_ref().map(|c| c.name.as_str()) == Some("rolemesh-trust-bundle")));
            let app = &spec.containers[0];
            ensure!(app.volume_mounts.clone().unwrap_or_default().iter().any(|m| m.mount_path == "/var/run/rolemesh/trust" && m.read_only == Some(true)));
            ensure!(!app.volume_mounts.clone().unwrap_or_default().iter().any(|m| m.name == "rolemesh-identity"), "the key is mounted into the proxy only");
            ensure!(!app.volume_mounts.clone().unwrap_or_default().iter().any(|m| m.name == "rolemesh-rules"), "the rules are mounted into the proxy only");
            let app_env = app.env.clone().unwrap_or_default();
            ensure!(app_env.iter().any(|e| e.name == "ROLEMESH_TRUST_BUNDLE" && e.value.as_deref() == Some("/var/run/rolemesh/trust/ca.crt")), "{app_env:?}");
            ensure!(!app_env.iter().any(|e| e.name == "SSL_CERT_FILE"), "the app's system trust is left alone: {app_env:?}");
            let annotations = stored.metadata.annotations.clone().unwrap_or_default();
            ensure!(annotations.get("rolemesh.dev/injected").is_some_and(|v| v.starts_with("web@")), "{annotations:?}");

            // Applying the same spec again changes nothing; re-creating it gives the same pod.
            let again = ns.env.kubectl_apply(&ns.name, &pod_manifest("web-1", "web", Some("true")))?;
            ensure!(again.status.success());
            ensure!(pods.get("web-1").await?.spec == Some(spec.clone()), "a second apply must not change the pod");
            pods.delete("web-1", &DeleteParams::default().grace_period(0)).await?;
            eventually("web-1 gone", Duration::from_secs(30), || async { Ok(pods.get_opt("web-1").await?.is_none().then_some(())) }).await?;
            rolemesh_testkit::expect_success("kubectl", &["apply"], &ns.env.kubectl_apply(&ns.name, &pod_manifest("web-1", "web", Some("true")))?)?;
            let recreated = pods.get("web-1").await?.spec.context("spec")?;
            // (The API server's own token volume has a random name; compare what rolemesh adds.)
            let ours = |s: &k8s_openapi::api::core::v1::PodSpec| {
                let volumes: Vec<_> = s.volumes.clone().unwrap_or_default().into_iter().filter(|v| v.name.starts_with("rolemesh-")).collect();
                let mounts: Vec<_> = s.containers[0].volume_mounts.clone().unwrap_or_default().into_iter().filter(|m| m.name.starts_with("rolemesh-")).collect();
                let init: Vec<_> = s.init_containers.clone().unwrap_or_default().into_iter().map(|mut c| {
                    c.volume_mounts = c.volume_mounts.map(|m| m.into_iter().filter(|m| !m.name.starts_with("kube-api-access")).collect());
                    c
                }).collect();
                (init, volumes, mounts, s.containers[0].env.clone())
            };
            ensure!(ours(&recreated) == ours(&spec), "same spec, same injection:\n{:?}\n{:?}", ours(&recreated), ours(&spec));

            // A pod that did not opt in is untouched.
            rolemesh_testkit::expect_success("kubectl", &["apply"], &ns.env.kubectl_apply(&ns.name, &pod_manifest("plain", "web", None))?)?;
            ensure!(pods.get("plain").await?.spec.and_then(|s| s.init_containers).is_none());

            // An opted-in pod whose ServiceAccount no policy covers is refused, saying what to do.
            let refused = ns.env.kubectl_apply(&ns.name, &pod_manifest("stray", "stranger", Some("true")))?;
            let stderr = String::from_utf8_lossy(&refused.stderr);
            ensure!(!refused.status.success() && stderr.contains("stranger") && stderr.contains("Create an MTLSPolicy"), "{stderr}");

            // Serving certificate rotation while pods are admitted: no failed admission.
            let secrets: Api<Secret> = Api::namespaced(ns.client.clone(), &system_ns);
            let admissions = {
                let env = ns.env.clone();
                let namespace = ns.name.clone();
                tokio::task::spawn_blocking(move || -> Result<usize> {
                    let mut admitted = 0;
                    for i in 0..15 {
                        let out = env.kubectl_apply(&namespace, &pod_manifest(&format!("rot-{i}"), "web", Some("true")))?;
                        if !out.status.success() {
                            bail!("admission {i} failed during rotation: {}", String::from_utf8_lossy(&out.stderr));
                        }
                        admitted += 1;
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Ok(admitted)
                })
            };
            tokio::time::sleep(Duration::from_millis(400)).await;
            secrets.delete("rolemesh-webhook-tls", &DeleteParams::default()).await?;
            let rotated = reconcile_webhook_tls(&ns.client, &tls_config).await?;
            ensure!(rotated.serial_hex != first_tls.serial_hex, "a new serving certificate");
            ensure!(admissions.await?? == 15);
            let rolled = eventually("the webhook to serve the new certificate", Duration::from_secs(10), || async {
                let log = std::fs::read_to_string(&webhook.log).unwrap_or_default();
                Ok(log.contains(&rotated.serial_hex).then_some(()))
            })
            .await;
            rolled?;

            // With the webhook down, opted-in pods are refused (failurePolicy Fail) while
            // kube-system pods, which the registration never selects, are still created.
            drop(webhook);
            let down = ns.env.kubectl_apply(&ns.name, &pod_manifest("while-down", "web", Some("true")))?;
            ensure!(!down.status.success(), "an opted-in pod must not be admitted unmutated");
            let system_pod = format!("rolemesh-test-{}", &ns.name[ns.name.len() - 8..]);
            let created = ns.env.kubectl_apply("kube-system", &pod_manifest(&system_pod, "default", Some("true")))?;
            let system_pods: Api<Pod> = Api::namespaced(ns.client.clone(), "kube-system");
            let system_spec = system_pods.get_opt(&system_pod).await?;
            let _ = system_pods.delete(&system_pod, &DeleteParams::default().grace_period(0)).await;
            ensure!(created.status.success(), "kube-system pods are created: {}", String::from_utf8_lossy(&created.stderr));
            ensure!(system_spec.and_then(|p| p.spec).and_then(|s| s.init_containers).is_none(), "and untouched");
            Ok(())
        }
        .await;
        let _ = configurations.delete(&configuration, &DeleteParams::default()).await;
        let _ = authorities.delete(&authority, &DeleteParams::default()).await;
        let _ = namespaces.delete(&system_ns, &DeleteParams::default()).await;
        result
    })
    .await
}
