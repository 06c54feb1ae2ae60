//! A client outside the mesh verifies a meshed server by its Service's DNS name (node test, chart
//! installed with helm as in `e2e/tests/pods.rs`, whose release it shares: the files run one
//! after another).
//!
//! 1. Service `payments` selects the pods of ServiceAccount `payments`: once a pod runs, the
//!    controller re-issues its certificate naming `payments`, `payments.<ns>`,
//!    `payments.<ns>.svc` and `payments.<ns>.svc.cluster.local`.
//! 2. From a pod the webhook does not inject (label `rolemesh.dev/inject: "false"`), Debian's curl
//!    verifies the proxy by `https://payments.<ns>.svc.cluster.local:8443` through CoreDNS and
//!    kube-proxy, with the trust bundle and a meshed client's certificate; without the client
//!    certificate the proxy refuses it, and a name the certificate does not carry fails
//!    verification.
//! 3. A second Service selecting the same pods is named too, without a pod restart, and curl
//!    verifies that name once kubelet has delivered the new certificate.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Secret;
use rolemesh_e2e::{install_release, leaf_of, meshed_service_accounts, uninstall_release};
use rolemesh_testkit::{TestNamespace, eventually, in_namespace, node_ready};

const BUSYBOX: &str = "rolemesh.local/busybox:1.35.0";
/// curl and OpenSSL from the host (dev/images/openssl.image).
const CURL: &str = "rolemesh.local/openssl:test";
const TRUST_DOMAIN: &str = "dns.rolemesh.test";
const MTLS_PORT: u16 = 8443;
const APP_PORT: u16 = 8080;
/// kubelet's Secret volume refresh: its pod sync (a minute, with jitter) plus its cache.
const KUBELET_PROPAGATION: Duration = Duration::from_secs(150);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_outside_the_mesh_verifies_the_proxy_by_service_name() -> Result<()> {
    let env = node_ready().await?;
    install_release(&env, TRUST_DOMAIN, &[])
        .context("installing the chart as docs/development.md shows")?;
    let outcome = in_namespace(
        "billing",
        |ns| async move { service_names_phase(&ns).await },
    )
    .await;
    let uninstall = uninstall_release(&env);
    outcome?;
    uninstall
}

/// The four names of Service `service` in `ns`.
fn forms(service: &str, ns: &str) -> Vec<String> {
    let mut names = vec![
        service.to_string(),
        format!("{service}.{ns}"),
        format!("{service}.{ns}.svc"),
        format!("{service}.{ns}.svc.cluster.local"),
    ];
    names.sort();
    names
}

struct Outsider<'a> {
    ns: &'a TestNamespace,
}

impl Outsider<'_> {
    /// Runs curl in the outsider pod; its exit code and what it printed (body or error).
    fn curl(&self, args: &[&str]) -> Result<(i32, String)> {
        let mut all = vec![
            "exec",
            "outsider",
            "-n",
            &self.ns.name,
            "--",
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            "/trust/ca.crt",
        ];
        all.extend_from_slice(args);
        let out = self.ns.env.run("kubectl", &all, None)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.code().unwrap_or(-1), text))
    }

    fn curl_meshed(&self, url: &str) -> Result<(i32, String)> {
        self.curl(&[
            "--cert",
            "/identity/tls.crt",
            "--key",
            "/identity/tls.key",
            url,
        ])
    }
}

async fn secret_names(ns: &TestNamespace, name: &str) -> Result<Option<Vec<String>>> {
    let Some(secret) = ns.api::<Secret>().get_opt(name).await? else {
        return Ok(None);
    };
    let mut names = leaf_of(&secret)?.dns_names;
    names.sort();
    Ok(Some(names))
}

async fn service_names_phase(ns: &TestNamespace) -> Result<()> {
    let env = &ns.env;
    let n = ns.name.as_str();
    let roles = meshed_service_accounts(ns, &["payments", "frontend"]).await?;
    let frontend_role = &roles[1];
    ns.apply_manifest(&format!(
        r#"
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata:
  name: payments
spec:
  serviceAccounts: {{names: [payments]}}
  inbound:
    - {{name: https, port: {MTLS_PORT}, appPort: {APP_PORT}, allow: ["{frontend_role}"]}}
---
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata:
  name: frontend
spec:
  serviceAccounts: {{names: [frontend]}}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: payments
spec:
  replicas: 1
  selector:
    matchLabels: {{app: payments}}
  template:
    metadata:
      labels: {{app: payments}}
    spec:
      serviceAccountName: payments
      terminationGracePeriodSeconds: 1
      containers:
        - name: app
          image: {BUSYBOX}
          command: [sh, -c, 'echo paid > /www/index.html && exec httpd -f -p {APP_PORT} -h /www']
          ports: [{{containerPort: {APP_PORT}}}]
          volumeMounts: [{{name: www, mountPath: /www}}]
      volumes: [{{name: www, emptyDir: {{}}}}]
---
apiVersion: v1
kind: Service
metadata:
  name: payments
spec:
  selector: {{app: payments}}
  ports: [{{name: https, port: {MTLS_PORT}, targetPort: {MTLS_PORT}}}]
"#
    ))?;
    env.kubectl(&[
        "rollout",
        "status",
        "deployment/payments",
        "-n",
        n,
        "--timeout=180s",
    ])?;
    let started = Instant::now();
    let want = forms("payments", n);
    eventually(
        "payments' certificate to name its Service",
        Duration::from_secs(60),
        || async {
            Ok(
                (secret_names(ns, "payments-rolemesh-tls").await?.as_ref() == Some(&want))
                    .then_some(()),
            )
        },
    )
    .await?;
    println!(
        "certificate re-issued with the Service's names {:.1}s after the rollout",
        started.elapsed().as_secs_f64()
    );
    eventually(
        "the frontend's certificate",
        Duration::from_secs(60),
        || async { Ok(secret_names(ns, "frontend-rolemesh-tls").await?.map(|_| ())) },
    )
    .await?;

    // Outside the mesh: no proxy, only the bundle and the frontend's certificate mounted.
    ns.apply_manifest(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: outsider
  labels: {{rolemesh.dev/inject: "false"}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: {CURL}
      command: [sleep, "3600"]
      volumeMounts:
        - {{name: trust, mountPath: /trust, readOnly: true}}
        - {{name: identity, mountPath: /identity, readOnly: true}}
  volumes:
    - {{name: trust, configMap: {{name: rolemesh-trust-bundle, items: [{{key: ca.crt, path: ca.crt}}]}}}}
    - {{name: identity, secret: {{secretName: frontend-rolemesh-tls}}}}
"#
    ))?;
    ns.wait_pod_ready("outsider", Duration::from_secs(120))
        .await?;
    let containers = env.kubectl(&[
        "get",
        "pod",
        "outsider",
        "-n",
        n,
        "-o",
        "jsonpath={.spec.containers[*].name}",
    ])?;
    ensure!(
        containers == "app",
        "the outsider is not injected: {containers}"
    );
    let outsider = Outsider { ns };
    let url = |host: &str| format!("https://{host}:{MTLS_PORT}/index.html");
    let fqdn = format!("payments.{n}.svc.cluster.local");

    // kubelet delivers the re-issued certificate to the running proxy within its sync period.
    let (code, body) = eventually(
        "curl to verify the proxy by its Service name",
        KUBELET_PROPAGATION,
        || async {
            let (code, body) = outsider.curl_meshed(&url(&fqdn))?;
            Ok((code == 0).then_some((code, body)))
        },
    )
    .await
    .with_context(|| format!("last try: {:?}", outsider.curl_meshed(&url(&fqdn))))?;
    ensure!(code == 0 && body.trim() == "paid", "{code}: {body}");
    println!(
        "curl verified {fqdn} after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let (code, body) = outsider.curl_meshed(&url(&format!("payments.{n}")))?;
    ensure!(code == 0, "the short form verifies too: {code}: {body}");

    // mTLS is still required.
    let (code, body) = outsider.curl(&[&url(&fqdn)])?;
    ensure!(
        code != 0 && !body.contains("paid"),
        "without a client certificate the proxy refuses: {code}: {body}"
    );
    // A name the certificate does not carry fails verification (curl: 60, peer certificate).
    let cluster_ip = env.kubectl(&[
        "get",
        "service",
        "payments",
        "-n",
        n,
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    let (code, body) = outsider.curl_meshed_resolved("ledger.example", &cluster_ip)?;
    ensure!(
        code == 60,
        "a name not in the certificate is refused by curl's hostname check: {code}: {body}"
    );

    // A new Service is named without a restart of the pod.
    let pod_before = env.kubectl(&[
        "get",
        "pods",
        "-n",
        n,
        "-l",
        "app=payments",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ])?;
    ns.apply_manifest(&format!(
        r#"
apiVersion: v1
kind: Service
metadata:
  name: checkout
spec:
  selector: {{app: payments}}
  ports: [{{name: https, port: {MTLS_PORT}, targetPort: {MTLS_PORT}}}]
"#
    ))?;
    let added = Instant::now();
    let mut want = forms("checkout", n);
    want.extend(forms("payments", n));
    want.sort();
    eventually(
        "the certificate to name the new Service",
        Duration::from_secs(60),
        || async {
            Ok(
                (secret_names(ns, "payments-rolemesh-tls").await?.as_ref() == Some(&want))
                    .then_some(()),
            )
        },
    )
    .await?;
    let reissued = added.elapsed();
    let checkout = format!("checkout.{n}.svc.cluster.local");
    eventually(
        "curl to verify the new name",
        KUBELET_PROPAGATION,
        || async { Ok((outsider.curl_meshed(&url(&checkout))?.0 == 0).then_some(())) },
    )
    .await?;
    println!(
        "a new Service: named in the certificate after {:.1}s, verified by curl after {:.1}s",
        reissued.as_secs_f64(),
        added.elapsed().as_secs_f64()
    );
    let pod_after = env.kubectl(&[
        "get",
        "pods",
        "-n",
        n,
        "-l",
        "app=payments",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ])?;
    ensure!(
        pod_before == pod_after,
        "no new pod: {pod_before} -> {pod_after}"
    );
    Ok(())
}

impl Outsider<'_> {
    /// curl with the meshed certificate to `host`, resolved to `ip` (no DNS involved).
    fn curl_meshed_resolved(&self, host: &str, ip: &str) -> Result<(i32, String)> {
        let resolve = format!("{host}:{MTLS_PORT}:{ip}");
        let url = format!("https://{host}:{MTLS_PORT}/index.html");
        self.curl(&[
            "--resolve",
            &resolve,
            "--cert",
            "/identity/tls.crt",
            "--key",
            "/identity/tls.key",
            &url,
        ])
    }
}
