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
//!    pods are created as usual;
//! 5. the app port closed: a pod outside the mesh reaches the server pod's proxy ports but not its
//!    app's plain port, the app's own HTTP readiness probe passes through the proxy's admin port,
//!    and the proxy's image cannot be swapped on the running pod;
//! 6. system trust kept: an injected app's own HTTPS call (OpenSSL) to a server on the node whose
//!    CA is in the app's system store succeeds; the same app annotated
//!    `rolemesh.dev/ssl-cert-file: "true"` trusts only rolemesh's bundle and fails;
//! 7. the admin port flooded: a pod outside the mesh opens 20,000 silent connections to the server
//!    pod's admin port, a thousand at a time, each held until the proxy closes it; the proxy's
//!    descriptors and memory stay bounded, kubelet's probes through that port keep passing and
//!    the client's requests (a new mTLS handshake each) keep succeeding;
//! 8. large ServiceAccounts elsewhere: 500 ServiceAccounts with 250 KiB annotations in an
//!    unrelated namespace leave the controller's and webhook's memory within a bound (they cache
//!    only what they read), and admission and issuance keep working;
//! 9. chart values: the release is installed with the chart's scheduling, metadata and logging
//!    values set to what no default is, and the running pods carry them; `kubectl rolemesh
//!    version` finds its controller and `kubectl rolemesh check` passes (and fails, naming the
//!    webhook, in phase 4);
//! 10. the plugin on the mesh: `identity` of an injected pod is the certificate its proxy mounts,
//!     and `can` answers, naming the rule, that the client may reach the server's Service and
//!     the server may not;
//! 11. metric names: what the controllers, the webhook and the server's proxy export, scraped
//!     from their pods, passes Prometheus's naming rules as `promtool check metrics` applies them.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rolemesh_e2e::{
    PROXY_ADMIN_PORT, RELEASE_NAMESPACE, inbound_policy, install_release, outbound_policy,
    service_for, uninstall_release,
};
use rolemesh_testkit::{ClusterEnv, TestNamespace, eventually, in_namespace, node_ready};

/// Chart values a production install sets, none of them a default (charts/rolemesh/values.yaml).
const CHART_VALUES: &[&str] = &[
    "priorityClassName=system-cluster-critical",
    "logLevel=info\\,kube_runtime=warn",
    "controller.podLabels.team=platform",
    "webhook.podAnnotations.example\\.com/owner=platform",
    "webhook.extraArgs={--max-connections=256}",
    "proxy.logLevel=info\\,h2=warn",
    "proxy.resources.requests.cpu=20m",
    // The proxy sizes its runtime from this (two threads, on a node with two CPUs or more).
    "proxy.resources.limits.cpu=1500m",
];

const BUSYBOX: &str = "rolemesh.local/busybox:1.35.0";
/// OpenSSL's client with Debian's trust store layout (dev/images/openssl.image).
const OPENSSL: &str = "rolemesh.local/openssl:test";
const TRUST_DOMAIN: &str = "pods.rolemesh.test";
/// The server's inbound mapping (proxy) and its app's plain port.
const MTLS_PORT: u16 = 8443;
const APP_PORT: u16 = 8080;
/// The client's outbound listener.
const OUTBOUND_PORT: u16 = 9001;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_runs_as_pods_and_meshes_injected_pods() -> Result<()> {
    let env = node_ready().await?;
    install_release(&env, TRUST_DOMAIN, CHART_VALUES)
        .context("installing the chart as docs/development.md shows")?;
    let outcome = in_namespace("pods", |ns| async move {
        let mesh = Mesh::deploy(&ns).await.context("deploying the mesh")?;
        timed("injection", mesh.injection()).await?;
        timed("chart values", mesh.chart_values()).await?;
        timed("plugin on the mesh", mesh.plugin_on_the_mesh()).await?;
        timed("metric names", mesh.metric_names()).await?;
        timed("app port closed", mesh.app_port_closed()).await?;
        timed("system trust kept", mesh.system_trust_kept()).await?;
        timed("admin port flooded", mesh.admin_flood()).await?;
        timed(
            "large ServiceAccounts elsewhere",
            mesh.large_service_accounts_elsewhere(),
        )
        .await?;
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

/// A server Deployment behind a Service and a client pod, both meshed, in one test namespace.
struct Mesh {
    ns: TestNamespace,
    /// A value only this run's server serves.
    token: String,
}

impl Mesh {
    async fn deploy(ns: &TestNamespace) -> Result<Self> {
        let env = &ns.env;
        let roles = rolemesh_e2e::meshed_service_accounts(ns, &["server", "client"]).await?;
        let (server_role, client_role) = (roles[0].clone(), roles[1].clone());
        let token = format!("{:016x}", rand::random::<u64>());
        let upstream = format!("server.{}.svc.cluster.local:{MTLS_PORT}", ns.name);
        ns.apply_manifest(&[
            inbound_policy("server", MTLS_PORT, APP_PORT, &client_role),
            outbound_policy("client", OUTBOUND_PORT, &upstream, &server_role),
            service_for("server", MTLS_PORT),
            format!(
                r#"
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
"#
            ),
        ]
        .join("---\n"))?;
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
        // Its certificate was re-issued once its pod ran, to name Service `server`: kubelet may
        // still be bringing that one in.
        let before = eventually(
            "the server proxy to serve the serial in the policy's status",
            Duration::from_secs(150),
            || async {
                let before = self.status_serial("server")?;
                let served = self.served_serial(&pod_ip)?;
                Ok((served == before).then_some(before))
            },
        )
        .await?;
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

    fn server_pod(&self) -> Result<(String, String)> {
        let ns = &self.ns.name;
        let name = self.kubectl(&[
            "get",
            "pods",
            "-n",
            ns,
            "-l",
            "app=server",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])?;
        let ip = self.kubectl(&[
            "get",
            "pod",
            &name,
            "-n",
            ns,
            "-o",
            "jsonpath={.status.podIP}",
        ])?;
        Ok((name, ip))
    }

    /// The values of [`CHART_VALUES`], on the running pods; a controller PodDisruptionBudget (two
    /// replicas); the plugin's `version` names the controller.
    /// The release's pods of one component (`controller`, `webhook`), as JSON.
    fn release_pods(&self, component: &str) -> Result<Vec<serde_json::Value>> {
        let json = self.kubectl(&[
            "get",
            "pods",
            "-n",
            RELEASE_NAMESPACE,
            "-l",
            &format!("app.kubernetes.io/component={component}"),
            "-o",
            "json",
        ])?;
        let list: serde_json::Value = serde_json::from_str(&json)?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }

    async fn chart_values(&self) -> Result<()> {
        for component in ["controller", "webhook"] {
            let items = self.release_pods(component)?;
            ensure!(!items.is_empty(), "no {component} pod");
            for pod in &items {
                let name = &pod["metadata"]["name"];
                ensure!(
                    pod["spec"]["priorityClassName"] == "system-cluster-critical"
                        && pod["spec"]["priority"].as_i64() == Some(2_000_000_000),
                    "{name}: priorityClassName from values: {}",
                    pod["spec"]
                );
                let env = &pod["spec"]["containers"][0]["env"];
                let rust_log = env
                    .as_array()
                    .and_then(|e| e.iter().find(|v| v["name"] == "RUST_LOG"))
                    .map(|v| v["value"].clone());
                ensure!(
                    rust_log == Some("info,kube_runtime=warn".into()),
                    "{name}: logLevel from values as RUST_LOG: {env}"
                );
                ensure!(
                    pod["status"]["phase"] == "Running",
                    "{name} is not running: {}",
                    pod["status"]
                );
            }
            match component {
                "controller" => ensure!(
                    items
                        .iter()
                        .all(|p| p["metadata"]["labels"]["team"] == "platform"),
                    "controller pods carry podLabels"
                ),
                _ => ensure!(
                    items.iter().all(|p| {
                        p["metadata"]["annotations"]["example.com/owner"] == "platform"
                            && p["spec"]["containers"][0]["args"]
                                == serde_json::json!(["--max-connections=256"])
                    }),
                    "webhook pods carry podAnnotations and extraArgs"
                ),
            }
        }
        // The injected proxy's resources and log level (a native sidecar: an init container).
        let (server, _) = self.server_pod()?;
        let pod: serde_json::Value = serde_json::from_str(&self.kubectl(&[
            "get",
            "pod",
            &server,
            "-n",
            &self.ns.name,
            "-o",
            "json",
        ])?)?;
        let proxy = pod["spec"]["initContainers"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "rolemesh-proxy"))
            .context("the server pod's rolemesh-proxy sidecar")?;
        let log_level = proxy["env"]
            .as_array()
            .and_then(|e| e.iter().find(|v| v["name"] == "RUST_LOG"))
            .map(|v| v["value"].clone());
        ensure!(
            proxy["resources"]["requests"]["cpu"] == "20m"
                && proxy["resources"]["limits"]["cpu"] == "1500m"
                && proxy["resources"]["limits"]["memory"] == "128Mi"
                && log_level == Some("info,h2=warn".into()),
            "the injected proxy carries proxy.resources and proxy.logLevel: {proxy}"
        );
        self.kubectl(&["get", "pdb", "-n", RELEASE_NAMESPACE, "rolemesh-controller"])
            .context("the controller's PodDisruptionBudget (two replicas)")?;
        // Every post-install check passes on this release.
        eventually(
            "kubectl rolemesh check passes",
            Duration::from_secs(60),
            || async {
                let (code, out, err) =
                    self.ns
                        .env
                        .kubectl_plugin(&["check", "-n", &self.ns.name, "-o", "json"])?;
                let checks: serde_json::Value =
                    serde_json::from_str(&out).with_context(|| format!("{out}{err}"))?;
                let all = checks.as_array().map_or(0, Vec::len);
                if code == 0 && all == 8 {
                    return Ok(Some(()));
                }
                println!("check: exit {code}: {out}");
                Ok(None)
            },
        )
        .await?;
        let (code, out, err) = self.ns.env.kubectl_plugin(&["version", "-o", "json"])?;
        let versions: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("{out}{err}"))?;
        ensure!(
            code == 0
                && versions["controllers"][0]["namespace"] == RELEASE_NAMESPACE
                && versions["controllers"][0]["version"] == env!("CARGO_PKG_VERSION"),
            "kubectl rolemesh version finds the release's controller: {out}{err}"
        );
        Ok(())
    }

    async fn plugin_on_the_mesh(&self) -> Result<()> {
        let env = &self.ns.env;
        let ns = self.ns.name.as_str();
        let (code, out, err) = env.kubectl_plugin(&["identity", "client", "-n", ns])?;
        let spiffe = format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/client");
        ensure!(
            code == 0
                && out.contains(&spiffe)
                && out.contains("client-rolemesh-tls (mounted by its proxy)")
                && out.contains("chain verifies"),
            "identity client: exit {code}\n{out}{err}"
        );
        let (code, out, err) =
            env.kubectl_plugin(&["identity", "client", "-n", ns, "-o", "json"])?;
        let parsed: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("{out}{err}"))?;
        ensure!(
            code == 0 && parsed["spiffeId"] == spiffe.as_str() && parsed["chainVerified"] == true,
            "identity -o json: {out}"
        );
        let (code, out, err) = env.kubectl_plugin(&[
            "can",
            "pod/client",
            &format!("svc/server.{ns}:{MTLS_PORT}"),
            "-n",
            ns,
        ])?;
        ensure!(
            code == 0
                && out.starts_with("yes:")
                && out.contains("allowed by MTLSPolicy")
                && out.contains("allow[0]")
                && out.contains(&format!("outbound server (127.0.0.1:{OUTBOUND_PORT})")),
            "can client -> server: exit {code}\n{out}{err}"
        );
        let (code, out, err) = env.kubectl_plugin(&["can", "sa/server", "server", "-n", ns])?;
        ensure!(
            code == 1 && out.starts_with("no:") && out.contains("refused: no allow pattern"),
            "can server -> server (not allowed): exit {code}\n{out}{err}"
        );
        Ok(())
    }

    /// Scrapes every controller and webhook pod of the release and the server's proxy, and runs
    /// the expositions through promlint (dev/tools/promlint: client_golang's promlint, which
    /// `promtool check metrics` runs, plus rolemesh's prefix and `_timestamp_seconds` rules).
    async fn metric_names(&self) -> Result<()> {
        let env = &self.ns.env;
        // Beside the cluster's files: the next `make cluster` takes away what a failed run left.
        let dir = env
            .kubeconfig()
            .with_file_name(format!("metrics-{}", self.ns.name));
        std::fs::create_dir_all(&dir)?;
        let mut scraped = Vec::new();
        for (component, port) in [("controller", 9090), ("webhook", 9443)] {
            for pod in self.release_pods(component)? {
                let name = pod["metadata"]["name"].as_str().context("pod name")?;
                let ip = pod["status"]["podIP"].as_str().context("pod IP")?;
                scraped.push((
                    name.to_string(),
                    rolemesh_e2e::pod_get(ip, port, "/metrics")?,
                ));
            }
        }
        let (server, ip) = self.server_pod()?;
        let proxy_metrics = rolemesh_e2e::admin_get(&ip, "/metrics")?;
        // kubelet's CFS quota for proxy.resources.limits.cpu=1500m, read by the proxy from the
        // cgroup containerd mounted into its container: rounded up, at most the node's CPUs.
        let node_cpus = std::thread::available_parallelism()?.get();
        let threads = rolemesh_testkit::metric_sum(
            &proxy_metrics,
            "rolemesh_proxy_runtime_worker_threads",
            "",
        );
        ensure!(
            threads == 2.min(node_cpus) as f64,
            "the server's proxy runs {threads} runtime threads under a 1500m CPU limit on a \
             {node_cpus}-CPU node, not {}",
            2.min(node_cpus)
        );
        scraped.push((server, proxy_metrics));
        ensure!(scraped.len() >= 3, "scraped only {scraped:?}");
        let mut args = Vec::new();
        for (pod, answer) in &scraped {
            let (head, body) = answer
                .split_once("\r\n\r\n")
                .with_context(|| format!("{pod}: no HTTP body in {answer:?}"))?;
            ensure!(
                head.starts_with("HTTP/1.1 200"),
                "{pod}: /metrics answered {head}"
            );
            let path = dir.join(format!("{pod}.prom"));
            std::fs::write(&path, body)?;
            args.push(format!("{pod}={}", path.display()));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let lint = env.run("promlint", &args, None)?;
        let report = String::from_utf8_lossy(&lint.stdout);
        std::fs::remove_dir_all(&dir)?;
        ensure!(
            lint.status.success(),
            "metric names break Prometheus's naming rules:\n{report}{}",
            String::from_utf8_lossy(&lint.stderr)
        );
        // The leader's exposition carries the scrape-time gauges too.
        ensure!(
            scraped
                .iter()
                .any(|(_, m)| m.contains("rolemesh_certificate_expiration_timestamp_seconds{")),
            "no controller exported its leader-only gauges"
        );
        println!("{report}");
        Ok(())
    }

    /// The server app binds 0.0.0.0:8080; only its proxy may reach it.
    async fn app_port_closed(&self) -> Result<()> {
        let ns = &self.ns.name;
        let (server, ip) = self.server_pod()?;
        let init = self.kubectl(&[
            "get",
            "pod",
            &server,
            "-n",
            ns,
            "-o",
            r#"jsonpath={range .spec.initContainers[*]}{.name}={.restartPolicy}{" "}{end}"#,
        ])?;
        ensure!(
            init.trim() == "rolemesh-init= rolemesh-proxy=Always",
            "the netfilter init container runs before the proxy: {init:?}"
        );
        // The Deployment rolled out, so kubelet found the app Ready: through the admin port, as
        // kubelet's own connection to 8080 is now refused.
        let probe = self.kubectl(&[
            "get",
            "pod",
            &server,
            "-n",
            ns,
            "-o",
            "jsonpath={.spec.containers[0].readinessProbe.httpGet.port} {.spec.containers[0].readinessProbe.httpGet.path} {.status.containerStatuses[0].ready}",
        ])?;
        ensure!(
            probe.trim() == "15021 /app-health/app/readiness true",
            "the app's readiness probe goes through the proxy and passes: {probe:?}"
        );
        let outsider = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "outsider", "namespace": ns, "labels": {"rolemesh.dev/inject": "disabled"}},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "app", "image": BUSYBOX, "command": ["sleep", "3600"]}],
            },
        })
        .to_string();
        self.ns
            .env
            .run("kubectl", &["create", "-f", "-"], Some(&outsider))?;
        self.ns
            .wait_pod_ready("outsider", Duration::from_secs(120))
            .await?;
        let from_outside = |url: String| {
            self.ns.env.run(
                "kubectl",
                // busybox's own `wget -T` crashes; its timeout applet bounds the attempt.
                &[
                    "exec", "outsider", "-n", ns, "--", "busybox", "timeout", "5", "wget", "-qO-",
                    &url,
                ],
                None,
            )
        };
        // The same pod IP answers on the proxy's admin port: the network path is there.
        let admin = from_outside(format!("http://{ip}:15021/ready"))?;
        ensure!(
            admin.status.success() && String::from_utf8_lossy(&admin.stdout).contains("ready"),
            "the outsider reaches the server pod's admin port: {}",
            String::from_utf8_lossy(&admin.stderr)
        );
        let plain = from_outside(format!("http://{ip}:{APP_PORT}/index.html"))?;
        let stdout = String::from_utf8_lossy(&plain.stdout);
        let stderr = String::from_utf8_lossy(&plain.stderr);
        ensure!(
            !plain.status.success() && !stdout.contains(&self.token),
            "a pod outside the mesh must not reach {ip}:{APP_PORT} in plain text; it got {stdout:?}"
        );
        ensure!(
            stderr.contains("refused") || stderr.contains("timed out"),
            "refused or timed out, not another failure: {stderr}"
        );
        println!("outsider -> {ip}:{APP_PORT}: {}", stderr.trim());
        // The mesh path still works: the client's requests through its proxy keep succeeding.
        let expected = format!("ok {}", self.token);
        let seen = self.client_log()?.len();
        eventually(
            "a request through the mesh after the outsider's attempt",
            Duration::from_secs(30),
            || async { Ok(self.client_log()?[seen..].contains(&expected).then_some(())) },
        )
        .await?;
        // Pods may change images after creation; the chart's admission policy keeps rolemesh's.
        let swap = self.ns.env.run(
            "kubectl",
            &[
                "set",
                "image",
                &format!("pod/{server}"),
                "-n",
                ns,
                &format!("rolemesh-proxy={BUSYBOX}"),
            ],
            None,
        )?;
        let refusal = String::from_utf8_lossy(&swap.stderr);
        ensure!(
            !swap.status.success() && refusal.contains("cannot change on a running pod"),
            "swapping the proxy image of a running pod is refused: {refusal}"
        );
        self.kubectl(&["delete", "pod", "outsider", "-n", ns, "--wait=false"])?;
        Ok(())
    }

    async fn admin_flood(&self) -> Result<()> {
        let ns = &self.ns.name;
        let (server, ip) = self.server_pod()?;
        let uid = self.kubectl(&[
            "get",
            "pod",
            &server,
            "-n",
            ns,
            "-o",
            "jsonpath={.metadata.uid}",
        ])?;
        let proxy = rolemesh_testkit::procfs::pod_process(uid.trim(), "rolemesh-proxy")
            .context("the server pod's proxy process")?;
        let flooder = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "flooder", "namespace": ns, "labels": {"rolemesh.dev/inject": "disabled"}},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "app", "image": BUSYBOX, "command": ["sleep", "3600"]}],
            },
        })
        .to_string();
        self.ns
            .env
            .run("kubectl", &["create", "-f", "-"], Some(&flooder))?;
        self.ns
            .wait_pod_ready("flooder", Duration::from_secs(120))
            .await?;
        let unhealthy_before = self.unhealthy_events(&server)?;
        let (baseline_kib, baseline_fds) = (
            rolemesh_testkit::procfs::rss_kib(proxy),
            rolemesh_testkit::procfs::open_fds(proxy),
        );
        let seen = self.client_log()?.len();
        // Every nc reads the same FIFO, which the shell keeps open and never writes: no nc sends
        // anything or half-closes, so each holds its connection until the proxy closes it
        // (evicted at the cap, or the 2 s request timeout). An nc that exits 0 connected and was
        // closed by the far side; each one appends a line, so the count is the flooder's own.
        let script = format!(
            "rm -f /tmp/hold /tmp/connected; mkfifo /tmp/hold; exec 3<>/tmp/hold; n=0; \
             while [ $n -lt {ADMIN_FLOOD} ]; do i=0; while [ $i -lt {ADMIN_FLOOD_BATCH} ]; do \
             {{ nc {ip} {PROXY_ADMIN_PORT} <&3 >/dev/null 2>&1 && echo >> /tmp/connected; }} & \
             i=$((i+1)); done; wait; n=$((n+{ADMIN_FLOOD_BATCH})); done; \
             echo \"opened $n connected $(wc -l < /tmp/connected)\""
        );
        let mut flood = std::process::Command::new(self.ns.env.tool("kubectl"));
        flood
            .args(["exec", "flooder", "-n", ns, "--", "sh", "-c", &script])
            .envs(self.ns.env.vars())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let started = Instant::now();
        let flood = flood.spawn().context("starting the flood")?;
        let (mut peak_kib, mut peak_fds, mut ready_samples) = (baseline_kib, baseline_fds, 0);
        let waited = tokio::task::spawn_blocking(move || flood.wait_with_output());
        tokio::pin!(waited);
        let output = loop {
            tokio::select! {
                output = &mut waited => break output??,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            ensure!(
                started.elapsed() < Duration::from_secs(300),
                "the flood did not end within 300 s"
            );
            peak_kib = peak_kib.max(rolemesh_testkit::procfs::rss_kib(proxy));
            peak_fds = peak_fds.max(rolemesh_testkit::procfs::open_fds(proxy));
            let ready = self.kubectl(&[
                "get",
                "pod",
                &server,
                "-n",
                ns,
                "-o",
                r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
            ])?;
            ensure!(
                ready.trim() == "True",
                "the server pod left Ready during the admin flood"
            );
            ready_samples += 1;
        };
        let flooded = started.elapsed();
        let stdout = String::from_utf8_lossy(&output.stdout);
        ensure!(
            output.status.success()
                && stdout.contains(&format!("opened {ADMIN_FLOOD} connected {ADMIN_FLOOD}")),
            "every one of the flood's {ADMIN_FLOOD} connections was accepted and then closed by \
             the proxy: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let metrics = rolemesh_e2e::admin_get(&ip, "/metrics")?;
        let closed = |reason: &str| {
            rolemesh_testkit::metric_sum(
                &metrics,
                "rolemesh_proxy_admin_connections_closed_total",
                &format!("reason=\"{reason}\""),
            )
        };
        let (evicted, timed_out, refused) = (
            closed("evicted"),
            closed("request_timeout"),
            closed("refused"),
        );
        let lines = self.client_log()?[seen..].to_vec();
        let failed: Vec<&String> = lines.iter().filter(|l| l.starts_with("fail")).collect();
        let succeeded = lines
            .iter()
            .filter(|l| **l == format!("ok {}", self.token))
            .count();
        let unhealthy = self.unhealthy_events(&server)?;
        println!(
            "admin flood of {ADMIN_FLOOD} connections in {:.1}s: proxy RSS {} -> peak {} KiB, \
             descriptors {baseline_fds} -> peak {peak_fds}; {evicted} evicted, {timed_out} timed \
             out, {refused} refused; {succeeded} mesh requests ok, {} failed; Ready in all {ready_samples} samples",
            flooded.as_secs_f64(),
            baseline_kib,
            peak_kib,
            failed.len()
        );
        // Each held flood connection ends by one of the limits; kubelet's probes only add to it.
        ensure!(
            evicted + timed_out + refused >= ADMIN_FLOOD as f64,
            "the proxy's limits closed fewer than the flood's {ADMIN_FLOOD} connections: \
             {evicted} evicted, {timed_out} timed out, {refused} refused"
        );
        ensure!(
            peak_fds < baseline_fds + 2 * 64,
            "the proxy held {peak_fds} descriptors (from {baseline_fds}): uncapped"
        );
        ensure!(
            peak_kib < baseline_kib + 8 * 1024,
            "the proxy's RSS grew from {baseline_kib} to {peak_kib} KiB"
        );
        ensure!(
            failed.is_empty() && succeeded >= 10,
            "mesh requests failed during the flood ({succeeded} succeeded): {failed:?}"
        );
        ensure!(
            unhealthy == unhealthy_before,
            "kubelet's probes of the server pod failed during the flood ({unhealthy_before} -> \
             {unhealthy} Unhealthy events)"
        );
        self.kubectl(&["delete", "pod", "flooder", "-n", ns, "--wait=false"])?;
        Ok(())
    }

    /// kubelet's failed probes of `pod` so far (Unhealthy events, counting repeats).
    fn unhealthy_events(&self, pod: &str) -> Result<u64> {
        let counts = self.kubectl(&[
            "get",
            "events",
            "-n",
            &self.ns.name,
            "--field-selector",
            &format!("involvedObject.name={pod},reason=Unhealthy"),
            "-o",
            "jsonpath={range .items[*]}{.count}{\" \"}{end}",
        ])?;
        Ok(counts
            .split_whitespace()
            .map(|c| c.parse::<u64>().unwrap_or(1))
            .sum())
    }

    async fn system_trust_kept(&self) -> Result<()> {
        let ns = &self.ns.name;
        let node_ip = node_ip(&self.ns.env)?;
        let server = SystemCaServer::start(&node_ip)?;
        self.ns.apply_manifest(&format!(
            r#"
apiVersion: v1
kind: ConfigMap
metadata:
  name: system-store
data:
  ca-certificates.crt: |
{ca}
"#,
            ca = indent(&server.ca_pem, 4)
        ))?;
        let caller = |name: &str, annotations: serde_json::Value| {
            serde_json::json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "annotations": annotations},
                "spec": {
                    "serviceAccountName": "client",
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "app",
                        "image": OPENSSL,
                        "command": ["sh", "-c", format!(
                            "if openssl s_client -connect {}:{} -verify_return_error -verify_ip {node_ip} -brief </dev/null; \
                             then echo 'https: verified'; else echo 'https: refused'; fi; echo \"SSL_CERT_FILE=$SSL_CERT_FILE\"; exec sleep 3600",
                            node_ip, server.port)],
                        // The image's system store, holding the CA of the server on the node.
                        "volumeMounts": [{"name": "store", "mountPath": "/etc/ssl/certs/ca-certificates.crt",
                                          "subPath": "ca-certificates.crt", "readOnly": true}],
                    }],
                    "volumes": [{"name": "store", "configMap": {"name": "system-store"}}],
                },
            })
            .to_string()
        };
        for (name, annotations) in [
            ("system-trust", serde_json::json!({})),
            (
                "bundle-trust",
                serde_json::json!({"rolemesh.dev/ssl-cert-file": "true"}),
            ),
        ] {
            let out = self.ns.env.run(
                "kubectl",
                &["create", "-f", "-"],
                Some(&caller(name, annotations)),
            )?;
            rolemesh_testkit::expect_success("kubectl", &["create", name], &out)?;
        }
        let verdict = |pod: &'static str| async move {
            eventually(
                &format!("{pod}'s HTTPS verdict"),
                Duration::from_secs(120),
                || async {
                    let log =
                        self.ns
                            .env
                            .run("kubectl", &["logs", pod, "-c", "app", "-n", ns], None)?;
                    let log = String::from_utf8_lossy(&log.stdout).to_string();
                    Ok(log.contains("SSL_CERT_FILE=").then_some(log))
                },
            )
            .await
        };
        let system = verdict("system-trust").await?;
        ensure!(
            system.contains("https: verified") && system.contains("SSL_CERT_FILE=\n"),
            "an injected app verifies a server under its system store, with no SSL_CERT_FILE set: {system}"
        );
        let bundle = verdict("bundle-trust").await?;
        ensure!(
            bundle.contains("https: refused")
                && bundle.contains("SSL_CERT_FILE=/var/run/rolemesh/trust/ca.crt"),
            "with the opt-in the app trusts only rolemesh's bundle (so the test can fail): {bundle}"
        );
        println!(
            "system trust: {}; with the opt-in: {}",
            system
                .lines()
                .find(|l| l.starts_with("https:"))
                .unwrap_or_default(),
            bundle
                .lines()
                .find(|l| l.starts_with("https:"))
                .unwrap_or_default()
        );
        self.kubectl(&[
            "delete",
            "pod",
            "system-trust",
            "bundle-trust",
            "-n",
            ns,
            "--wait=false",
        ])?;
        Ok(())
    }

    async fn large_service_accounts_elsewhere(&self) -> Result<()> {
        let before = rolemesh_memory()?;
        let elsewhere = rolemesh_testkit::unique("large-sas");
        let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> =
            kube::Api::all(self.ns.client.clone());
        namespaces
            .create(
                &Default::default(),
                &serde_json::from_value(serde_json::json!({"metadata": {"name": elsewhere}}))?,
            )
            .await?;
        let outcome = self.with_large_service_accounts(&elsewhere, &before).await;
        let _ = namespaces.delete(&elsewhere, &Default::default()).await;
        outcome
    }

    async fn with_large_service_accounts(
        &self,
        elsewhere: &str,
        before: &[(String, u64)],
    ) -> Result<()> {
        use futures::{StreamExt, TryStreamExt};
        let accounts: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
            kube::Api::namespaced(self.ns.client.clone(), elsewhere);
        let filler = "x".repeat(LARGE_ANNOTATION);
        let created = Instant::now();
        futures::stream::iter(0..LARGE_SERVICE_ACCOUNTS)
            .map(|i| {
                let accounts = accounts.clone();
                let sa = serde_json::json!({
                    "metadata": {
                        "name": format!("big-{i}"),
                        "annotations": {"example.com/notes": filler,
                                        "eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/big"},
                    },
                });
                async move {
                    accounts
                        .create(&Default::default(), &serde_json::from_value(sa)?)
                        .await?;
                    Ok::<_, anyhow::Error>(())
                }
            })
            .buffer_unordered(8)
            .try_collect::<Vec<_>>()
            .await?;
        println!(
            "{LARGE_SERVICE_ACCOUNTS} ServiceAccounts of {} KiB created in {:.1}s",
            LARGE_ANNOTATION / 1024,
            created.elapsed().as_secs_f64()
        );
        // Admission and issuance go on: a new covered ServiceAccount gets its certificate and an
        // opted-in pod is injected.
        let ns = &self.ns.name;
        let role = self
            .ns
            .env
            .create_irsa_role(&format!("{ns}-after-bloat"), ns, "after-bloat")
            .await?;
        self.ns.apply_manifest(&format!(
            r#"
apiVersion: v1
kind: ServiceAccount
metadata:
  name: after-bloat
  annotations: {{eks.amazonaws.com/role-arn: "{role}"}}
---
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata:
  name: after-bloat
spec:
  serviceAccounts: {{names: [after-bloat]}}
  outbound:
    - {{name: server, localPort: 9002, upstream: "server.{ns}.svc:{MTLS_PORT}", expect: ["spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/server"]}}
"#
        ))?;
        eventually(
            "the certificate of a ServiceAccount covered after the bloat",
            Duration::from_secs(90),
            || async {
                let out = self.ns.env.run(
                    "kubectl",
                    &[
                        "get",
                        "secret",
                        "after-bloat-rolemesh-tls",
                        "-n",
                        ns,
                        "-o",
                        "name",
                    ],
                    None,
                )?;
                Ok(out.status.success().then_some(()))
            },
        )
        .await?;
        let pod = sleeper("after-bloat", ns, "after-bloat");
        let out = self.ns.env.run(
            "kubectl",
            &["create", "--dry-run=server", "-o", "yaml", "-f", "-"],
            Some(&pod),
        )?;
        ensure!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("rolemesh-proxy"),
            "an opted-in pod is injected after the bloat: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let after = rolemesh_memory()?;
        println!("RSS MiB before: {before:?}; after: {after:?}");
        for (process, mib) in &after {
            let was = before
                .iter()
                .find(|(p, _)| p == process)
                .map_or(0, |(_, m)| *m);
            ensure!(
                *mib <= was + MEMORY_GROWTH_BOUND_MIB,
                "{process} grew from {was} to {mib} MiB with {} MiB of annotations elsewhere",
                LARGE_SERVICE_ACCOUNTS * LARGE_ANNOTATION / (1024 * 1024)
            );
        }
        ensure!(
            after.len() == 4,
            "two controller and two webhook processes: {after:?}"
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
        // `kubectl rolemesh check` says so, and what to do.
        let (code, out, err) = env.kubectl_plugin(&["check", "-n", &self.ns.name])?;
        let row = out
            .lines()
            .find(|l| l.contains("webhook reachable through the API server"))
            .unwrap_or_default();
        ensure!(
            code == 1 && row.starts_with("FAIL") && row.contains("failed calling webhook"),
            "check must fail on the webhook while it is down: exit {code}\n{out}{err}"
        );
        Ok(())
    }
}

const LARGE_SERVICE_ACCOUNTS: usize = 500;
const LARGE_ANNOTATION: usize = 250 * 1024;
/// What the controller and webhook may grow by while 122 MiB of ServiceAccount annotations exist
/// elsewhere: their caches keep only labels and the role annotation.
const MEMORY_GROWTH_BOUND_MIB: u64 = 24;

/// Resident memory (MiB) of the chart's controller and webhook processes, found in the host's
/// /proc (the node runs on this host), keyed by binary and pid.
fn rolemesh_memory() -> Result<Vec<(String, u64)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        let argv0 = String::from_utf8_lossy(argv0);
        // The images' path; the tests' own controllers run from target/.
        if argv0 == "/usr/local/bin/rolemesh-controller"
            || argv0 == "/usr/local/bin/rolemesh-webhook"
        {
            let kib = rolemesh_testkit::procfs::rss_kib(pid);
            found.push((format!("{argv0}[{pid}]"), kib / 1024));
        }
    }
    found.sort();
    Ok(found)
}

/// Connections the admin flood opens, and how many at a time.
const ADMIN_FLOOD: usize = 20_000;
const ADMIN_FLOOD_BATCH: usize = 1_000;

/// The node's IP, where pods reach the host (the local AWS endpoint listens there too).
fn node_ip(env: &ClusterEnv) -> Result<String> {
    let endpoint = env.aws_endpoint();
    let host = endpoint
        .trim_start_matches("http://")
        .rsplit_once(':')
        .map(|(host, _)| host.to_string())
        .with_context(|| format!("no host in {endpoint}"))?;
    Ok(host)
}

fn indent(text: &str, spaces: usize) -> String {
    let pad = " ".repeat(spaces);
    text.lines()
        .map(|line| format!("{pad}{line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `openssl s_server` on the node with a certificate for its IP from a CA made here, standing in
/// for any HTTPS service an app calls (an AWS API, say) under a CA of the app's system store.
struct SystemCaServer {
    ca_pem: String,
    port: u16,
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl SystemCaServer {
    fn start(ip: &str) -> Result<Self> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "system store test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![rcgen::SanType::IpAddress(ip.parse()?)];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "https on the node");
        let cert = params.signed_by(&key, &issuer)?;
        let dir = std::env::temp_dir().join(rolemesh_testkit::unique("system-ca"));
        std::fs::create_dir_all(&dir)?;
        let cert_path = dir.join("server.pem");
        let key_path = dir.join("server.key");
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        let port = {
            let probe = std::net::TcpListener::bind((ip, 0))?;
            probe.local_addr()?.port()
        };
        let child = std::process::Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(format!("{ip}:{port}"))
            .arg("-cert")
            .arg(&cert_path)
            .arg("-key")
            .arg(&key_path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting openssl s_server")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((ip, port)).is_err() {
            ensure!(
                Instant::now() < deadline,
                "openssl s_server did not listen on {ip}:{port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            ca_pem: ca.pem(),
            port,
            child,
            dir,
        })
    }
}

impl Drop for SystemCaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
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
