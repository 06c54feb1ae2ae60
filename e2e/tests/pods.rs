//! rolemesh as users run it: the chart's controller and webhook as pods on the node, and workload
//! pods with the proxy injected, talking mTLS through it by Service DNS name.
//!
//! One release for the whole file, installed with the command docs/development.md shows for the
//! local cluster and uninstalled at the end whatever happens, so other test files never meet its
//! controller. The phases that take parts of the release away (the leader pod, the webhook) run
//! while the rotation waits for kubelet, after the new certificates are written:
//! 1. injection: the injected pod starts, its proxy is Ready before the app starts, and the app
//!    reaches its upstream through the outbound mapping by Service DNS name;
//! 2. rotation: both workloads rotated with `kubectl rolemesh rotate` while a client pod sends
//!    requests continuously; kubelet brings the new Secret into the running server proxy, which
//!    serves the new serial to a TLS peer (openssl), and no request fails;
//! 3. leader handover: deleting the leader controller pod hands the Lease to the other replica,
//!    which goes on issuing;
//! 4. webhook down: with the webhook scaled to 0, pods that opt in are refused and kube-system
//!    pods are created as usual.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rolemesh_testkit::{
    ClusterEnv, TestNamespace, eventually, in_namespace, node_ready, repo_root,
};

const BUSYBOX: &str = "rolemesh.local/busybox:1.35.0";
const RELEASE_NAMESPACE: &str = "rolemesh";
const TRUST_DOMAIN: &str = "pods.rolemesh.test";
/// The server's inbound mapping (proxy) and its app's plain port.
const MTLS_PORT: u16 = 8443;
const APP_PORT: u16 = 8080;
/// The client's outbound listener.
const OUTBOUND_PORT: u16 = 9001;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_runs_as_pods_and_meshes_injected_pods() -> Result<()> {
    let env = node_ready().await?;
    install_release(&env).context("installing the chart as docs/development.md shows")?;
    let outcome = in_namespace("pods", |ns| async move {
        let mesh = Mesh::deploy(&ns).await.context("deploying the mesh")?;
        timed("injection", mesh.injection()).await?;
        // The rotation mostly waits for kubelet's pod sync; the phases that take parts of the
        // release away run meanwhile: the new certificates are already written by then, and
        // running pods need neither the controller nor the webhook.
        let meanwhile = async {
            timed("leader handover", mesh.leader_handover()).await?;
            timed("webhook down", mesh.webhook_down()).await
        };
        timed("rotation under load", mesh.rotation_under_load(meanwhile)).await
    })
    .await;
    let uninstall = uninstall_release(&env);
    outcome?;
    uninstall
}

async fn timed(phase: &str, work: impl Future<Output = Result<()>>) -> Result<()> {
    let started = Instant::now();
    work.await.with_context(|| format!("phase {phase}"))?;
    println!(
        "phase {phase}: passed in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn helm(env: &ClusterEnv, args: &[&str]) -> Result<String> {
    let output = env.run("helm", args, None)?;
    rolemesh_testkit::expect_success("helm", args, &output)
}

fn install_release(env: &ClusterEnv) -> Result<()> {
    // A release left by an interrupted run would refuse the install.
    let _ = env.run(
        "helm",
        &["uninstall", "rolemesh", "-n", RELEASE_NAMESPACE, "--wait"],
        None,
    );
    let chart = repo_root().join("charts/rolemesh");
    let values = env.chart_values()?;
    let trust_domain = format!("authority.trustDomain={TRUST_DOMAIN}");
    helm(
        env,
        &[
            "install",
            "rolemesh",
            chart.to_str().context("chart path")?,
            "--namespace",
            RELEASE_NAMESPACE,
            "--create-namespace",
            "-f",
            values.to_str().context("values path")?,
            "--set",
            "authority.create=true",
            "--set",
            &trust_domain,
            "--wait",
            "--timeout",
            "3m",
        ],
    )?;
    Ok(())
}

fn uninstall_release(env: &ClusterEnv) -> Result<()> {
    helm(
        env,
        &["uninstall", "rolemesh", "-n", RELEASE_NAMESPACE, "--wait"],
    )?;
    env.kubectl(&[
        "delete",
        "namespace",
        RELEASE_NAMESPACE,
        "--ignore-not-found",
        "--wait=true",
    ])?;
    Ok(())
}

/// A server Deployment behind a Service and a client pod, both meshed, in one test namespace.
struct Mesh {
    ns: TestNamespace,
    /// A value only this run's server serves.
    token: String,
}

impl Mesh {
    async fn deploy(ns: &TestNamespace) -> Result<Self> {
        let env = &ns.env;
        env.kubectl(&[
            "label",
            "namespace",
            &ns.name,
            "rolemesh.dev/inject=enabled",
        ])?;
        let server_role = env
            .create_irsa_role(&format!("{}-server", ns.name), &ns.name, "server")
            .await?;
        let client_role = env
            .create_irsa_role(&format!("{}-client", ns.name), &ns.name, "client")
            .await?;
        let token = format!("{:016x}", rand::random::<u64>());
        let upstream = format!("server.{}.svc.cluster.local:{MTLS_PORT}", ns.name);
        ns.apply_manifest(&format!(
                r#"
apiVersion: v1
kind: ServiceAccount
metadata:
  name: server
  annotations: {{eks.amazonaws.com/role-arn: "{server_role}"}}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: client
  annotations: {{eks.amazonaws.com/role-arn: "{client_role}"}}
---
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata:
  name: server
spec:
  serviceAccounts: {{names: [server]}}
  inbound:
    - {{name: http, port: {MTLS_PORT}, appPort: {APP_PORT}, allow: ["{client_role}"]}}
---
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata:
  name: client
spec:
  serviceAccounts: {{names: [client]}}
  outbound:
    - {{name: server, localPort: {OUTBOUND_PORT}, upstream: "{upstream}", expect: ["{server_role}"]}}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: server
spec:
  replicas: 1
  selector:
    matchLabels: {{app: server}}
  template:
    metadata:
      labels: {{app: server}}
    spec:
      serviceAccountName: server
      terminationGracePeriodSeconds: 1
      containers:
        - name: app
          image: {BUSYBOX}
          command: [sh, -c, 'echo "$TOKEN" > /www/index.html && exec httpd -f -p {APP_PORT} -h /www']
          env: [{{name: TOKEN, value: "{token}"}}]
          ports: [{{containerPort: {APP_PORT}}}]
          readinessProbe:
            httpGet: {{path: /index.html, port: {APP_PORT}}}
            periodSeconds: 1
          volumeMounts: [{{name: www, mountPath: /www}}]
      volumes: [{{name: www, emptyDir: {{}}}}]
---
apiVersion: v1
kind: Service
metadata:
  name: server
spec:
  selector: {{app: server}}
  ports: [{{name: mtls, port: {MTLS_PORT}, targetPort: {MTLS_PORT}}}]
"#
            ),
        )?;
        env.kubectl(&[
            "rollout",
            "status",
            "deployment/server",
            "-n",
            &ns.name,
            "--timeout=180s",
        ])?;
        // The client: first asks its own proxy whether it is ready (once: were the app started
        // before the proxy, this would fail), then requests the server through the outbound
        // listener every 100 ms, one connection each, printing one line per request.
        ns.apply_manifest(&format!(
                r#"
apiVersion: v1
kind: Pod
metadata:
  name: client
spec:
  serviceAccountName: client
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: {BUSYBOX}
      command:
        - sh
        - -c
        - |
          if wget -qO- http://127.0.0.1:15021/ready; then echo "proxy ready when the app started"; fi
          while true; do
            if out=$(wget -qO- http://127.0.0.1:{OUTBOUND_PORT}/index.html 2>&1); then echo "ok $out"; else echo "fail $(date +%s) $out"; fi
            sleep 0.1
          done
"#
            ),
        )?;
        ns.wait_pod_ready("client", Duration::from_secs(120))
            .await?;
        Ok(Self {
            ns: ns.clone(),
            token,
        })
    }

    fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.ns.env.kubectl(args)
    }

    fn client_log(&self) -> Result<Vec<String>> {
        Ok(self
            .kubectl(&["logs", "client", "-c", "app", "-n", &self.ns.name])?
            .lines()
            .map(String::from)
            .collect())
    }

    async fn injection(&self) -> Result<()> {
        let ns = &self.ns.name;
        let sidecars = self.kubectl(&[
            "get",
            "pod",
            "client",
            "-n",
            ns,
            "-o",
            r#"jsonpath={range .spec.initContainers[*]}{.name}={.restartPolicy}{" "}{end}"#,
        ])?;
        ensure!(
            sidecars.trim() == "rolemesh-proxy=Always",
            "the proxy is injected as a native sidecar: {sidecars:?}"
        );
        let log = self.client_log()?;
        ensure!(
            log.first().map(String::as_str) == Some("ready")
                && log.get(1).map(String::as_str) == Some("proxy ready when the app started"),
            "the app found its proxy Ready when it started; its log begins {:?}",
            log.iter().take(3).collect::<Vec<_>>()
        );
        let proxy_started = self.kubectl(&[
            "get",
            "pod",
            "client",
            "-n",
            ns,
            "-o",
            "jsonpath={.status.initContainerStatuses[0].state.running.startedAt}",
        ])?;
        let app_started = self.kubectl(&[
            "get",
            "pod",
            "client",
            "-n",
            ns,
            "-o",
            "jsonpath={.status.containerStatuses[0].state.running.startedAt}",
        ])?;
        ensure!(
            !proxy_started.is_empty() && proxy_started <= app_started,
            "the proxy started ({proxy_started}) before the app ({app_started})"
        );
        let expected = format!("ok {}", self.token);
        eventually(
            "the app's request through the outbound mapping",
            Duration::from_secs(60),
            || async { Ok(self.client_log()?.contains(&expected).then_some(())) },
        )
        .await?;
        Ok(())
    }

    /// The serial the server's proxy presents in a TLS handshake, as openssl sees it.
    fn served_serial(&self, pod_ip: &str) -> Result<String> {
        let handshake = std::process::Command::new("openssl")
            .args(["s_client", "-connect", &format!("{pod_ip}:{MTLS_PORT}")])
            .stdin(std::process::Stdio::null())
            .output()
            .context("running openssl s_client")?;
        let mut x509 = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-serial"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        {
            use std::io::Write;
            x509.stdin
                .take()
                .context("openssl's stdin")?
                .write_all(&handshake.stdout)?;
        }
        let out = x509.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let serial = text
            .trim()
            .strip_prefix("serial=")
            .with_context(|| format!("no certificate in the handshake: {text:?}"))?;
        Ok(normalize_serial(serial))
    }

    fn status_serial(&self, policy: &str) -> Result<String> {
        let serial = self.kubectl(&[
            "get",
            "mtlspolicy",
            policy,
            "-n",
            &self.ns.name,
            "-o",
            "jsonpath={.status.workloads[0].serial}",
        ])?;
        Ok(normalize_serial(&serial))
    }

    /// Rotates both workloads and, once the controller has issued, runs `meanwhile` while
    /// kubelet brings the new Secret into the running server proxy.
    async fn rotation_under_load(&self, meanwhile: impl Future<Output = Result<()>>) -> Result<()> {
        let ns = &self.ns.name;
        let server_pod = self.kubectl(&[
            "get",
            "pods",
            "-n",
            ns,
            "-l",
            "app=server",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])?;
        let pod_ip = self.kubectl(&[
            "get",
            "pod",
            &server_pod,
            "-n",
            ns,
            "-o",
            "jsonpath={.status.podIP}",
        ])?;
        let before = self.status_serial("server")?;
        let served = self.served_serial(&pod_ip)?;
        ensure!(
            served == before,
            "the server proxy serves the issued serial {before}, not {served}"
        );
        let log_start = self.client_log()?.len();
        let rotated = Instant::now();
        for policy in ["server", "client"] {
            let (code, out, err) = self.ns.env.kubectl_plugin(&["rotate", policy, "-n", ns])?;
            ensure!(code == 0, "kubectl rolemesh rotate {policy}: {out}{err}");
        }
        let after = eventually(
            "a new serial in the server policy's status",
            Duration::from_secs(60),
            || async {
                let serial = self.status_serial("server")?;
                Ok((serial != before).then_some(serial))
            },
        )
        .await?;
        let issued = rotated.elapsed();
        // kubelet refreshes the mounted Secret on its pod sync (a minute, with jitter).
        let served = async {
            eventually(
                "the running server proxy to serve the new serial",
                Duration::from_secs(180),
                || async {
                    let served = self.served_serial(&pod_ip)?;
                    if served != before && served != after {
                        bail!("the proxy serves {served}, neither {before} nor {after}");
                    }
                    Ok((served == after).then_some(()))
                },
            )
            .await?;
            Ok::<_, anyhow::Error>(rotated.elapsed())
        };
        let (served, meanwhile) = tokio::join!(served, meanwhile);
        meanwhile?;
        let reloaded = served?;
        // Requests keep going through the new certificates for a while.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let log = self.client_log()?;
        let during = &log[log_start.min(log.len())..];
        let ok = during
            .iter()
            .filter(|l| l.as_str() == format!("ok {}", self.token))
            .count();
        let failed: Vec<&String> = during.iter().filter(|l| !l.starts_with("ok ")).collect();
        println!(
            "rotation: issued after {:.1}s, served by the running proxy after {:.1}s; {} requests, {} failed",
            issued.as_secs_f64(),
            reloaded.as_secs_f64(),
            during.len(),
            failed.len()
        );
        ensure!(
            failed.is_empty(),
            "{} of {} requests failed during the rotation: {:?}",
            failed.len(),
            during.len(),
            failed.iter().take(5).collect::<Vec<_>>()
        );
        ensure!(
            ok >= 100,
            "the client kept sending through the rotation: only {ok} requests"
        );
        let restarts = self.kubectl(&[
            "get",
            "pods",
            "-n",
            ns,
            "-o",
            "jsonpath={range .items[*]}{.status.initContainerStatuses[0].restartCount}{.status.containerStatuses[0].restartCount}{end}",
        ])?;
        ensure!(
            restarts.chars().all(|c| c == '0'),
            "no container restarted for the rotation: {restarts:?}"
        );
        Ok(())
    }

    async fn leader_handover(&self) -> Result<()> {
        let env = &self.ns.env;
        let holder = || {
            env.kubectl(&[
                "get",
                "lease",
                "rolemesh-controller",
                "-n",
                RELEASE_NAMESPACE,
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ])
        };
        let leader = holder()?;
        ensure!(!leader.is_empty(), "a controller holds the Lease");
        let deleted = Instant::now();
        env.kubectl(&[
            "delete",
            "pod",
            &leader,
            "-n",
            RELEASE_NAMESPACE,
            "--wait=false",
        ])?;
        let successor = eventually(
            "another controller to take the Lease",
            Duration::from_secs(60),
            || async {
                let now = holder()?;
                Ok((!now.is_empty() && now != leader).then_some(now))
            },
        )
        .await?;
        println!(
            "leader {leader} deleted; {successor} took over after {:.1}s",
            deleted.elapsed().as_secs_f64()
        );
        // The new leader issues: a ServiceAccount and policy created after the handover.
        let ns = &self.ns;
        let role = env
            .create_irsa_role(&format!("{}-late", ns.name), &ns.name, "late")
            .await?;
        ns.apply_manifest(&format!(
            r#"
apiVersion: v1
kind: ServiceAccount
metadata:
  name: late
  annotations: {{eks.amazonaws.com/role-arn: "{role}"}}
---
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata:
  name: late
spec:
  serviceAccounts: {{names: [late]}}
  inbound:
    - {{name: http, port: {MTLS_PORT}, appPort: {APP_PORT}, allow: []}}
"#
        ))?;
        eventually(
            "a verified certificate for the late ServiceAccount",
            Duration::from_secs(60),
            || async {
                let verified = self.kubectl(&[
                    "get",
                    "mtlspolicy",
                    "late",
                    "-n",
                    &ns.name,
                    "-o",
                    "jsonpath={.status.workloads[0].verified}/{.status.workloads[0].secretName}",
                ])?;
                Ok((verified == "true/late-rolemesh-tls").then_some(()))
            },
        )
        .await?;
        self.kubectl(&["get", "secret", "late-rolemesh-tls", "-n", &ns.name])?;
        Ok(())
    }

    async fn webhook_down(&self) -> Result<()> {
        let env = &self.ns.env;
        let scale = |replicas: &str| {
            env.kubectl(&[
                "scale",
                "deployment/rolemesh-webhook",
                "-n",
                RELEASE_NAMESPACE,
                &format!("--replicas={replicas}"),
            ])
        };
        scale("0")?;
        let outcome = self.refused_while_down().await;
        scale("2")?;
        env.kubectl(&[
            "rollout",
            "status",
            "deployment/rolemesh-webhook",
            "-n",
            RELEASE_NAMESPACE,
            "--timeout=120s",
        ])?;
        outcome?;
        // Back up: opted-in pods are admitted (and injected) again.
        let pod = sleeper("after", &self.ns.name, "client");
        eventually(
            "admission once the webhook is back",
            Duration::from_secs(60),
            || async {
                let out = env.run(
                    "kubectl",
                    &["create", "--dry-run=server", "-o", "yaml", "-f", "-"],
                    Some(&pod),
                )?;
                Ok((out.status.success()
                    && String::from_utf8_lossy(&out.stdout).contains("rolemesh-proxy"))
                .then_some(()))
            },
        )
        .await?;
        Ok(())
    }

    async fn refused_while_down(&self) -> Result<()> {
        let env = &self.ns.env;
        eventually("no webhook pod left", Duration::from_secs(60), || async {
            let pods = env.kubectl(&[
                "get",
                "pods",
                "-n",
                RELEASE_NAMESPACE,
                "-l",
                "app.kubernetes.io/component=webhook",
                "-o",
                "name",
            ])?;
            Ok(pods.trim().is_empty().then_some(()))
        })
        .await?;
        let opted_in = sleeper("refused", &self.ns.name, "client");
        let out = env.run("kubectl", &["create", "-f", "-"], Some(&opted_in))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains("failed calling webhook"),
            "an opted-in pod is refused while the webhook is down (failurePolicy Fail): {stderr}"
        );
        let name = rolemesh_testkit::unique("rolemesh-webhook-down");
        let system = sleeper(&name, "kube-system", "default");
        let out = env.run("kubectl", &["create", "-f", "-"], Some(&system))?;
        ensure!(
            out.status.success(),
            "a kube-system pod is created while the webhook is down: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        env.kubectl(&["delete", "pod", &name, "-n", "kube-system", "--wait=false"])?;
        Ok(())
    }
}

/// A pod that sleeps, as JSON for `kubectl create -f -`.
fn sleeper(name: &str, namespace: &str, service_account: &str) -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "serviceAccountName": service_account,
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "app", "image": BUSYBOX, "command": ["sleep", "3600"]}],
        },
    })
    .to_string()
}

/// Serials compared as openssl prints them and as the status holds them: hex, no leading zeros.
fn normalize_serial(serial: &str) -> String {
    let hex: String = serial
        .trim()
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    hex.trim_start_matches('0').to_string()
}
