//! The CA's life on the real node, under continuous traffic between two meshed pods: a client
//! pod that opens a new mTLS connection (through its proxy's outbound mapping) every 100 ms, and
//! a long-lived connection that streams a line a second from the server for the whole test.
//!
//! 1. `kubectl rolemesh ca rotate --wait`, as docs/rotation.md shows it: no request fails, no
//!    proxy refuses a handshake, the stream never breaks; the command prints each stage's time.
//! 2. The automatic renewal of the self-signed CA (the chart's `authority.caDuration` is short):
//!    the same stages on their own, with the same outcome.
//! 3. `kubectl rolemesh revoke --service-account client`: the server's running proxy refuses the
//!    revoked certificate (a TLS peer on the node presents it with curl) within the bound
//!    docs/rotation.md states, and accepts the re-issued one;
//! 4. `kubectl rolemesh ca retire <active>`: when it returns no trust bundle in the cluster holds
//!    the retired CA, and requests between the re-issued workloads flow again within the bound
//!    docs/rotation.md states (kubelet's delivery of the new Secrets and bundles).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, api::ListParams};
use rolemesh_crds::{CaPhase, CaStatus, MTLSAuthority};
use rolemesh_e2e::{
    RELEASE_NAMESPACE, admin_get, field, inbound_policy, install_release, leaf_of, outbound_policy,
    service_for, trust_bundle, uninstall_release,
};
use rolemesh_profile::inspect::{certificates_from_pem, sha256_hex};
use rolemesh_testkit::{TestNamespace, eventually, in_namespace, metric_sum, node_ready};

const BUSYBOX: &str = "rolemesh.local/busybox:1.35.0";
const TRUST_DOMAIN: &str = "carotate.rolemesh.test";
const MTLS_PORT: u16 = 8443;
const APP_PORT: u16 = 8080;
const OUTBOUND_PORT: u16 = 9001;
/// The chart values this test sets, as a user would for a short-lived CA. The propagation wait
/// covers kubelet's default pod sync (1m, up to 1.5x with jitter) with a margin.
const CA_DURATION: &str = "10m";
const PROPAGATION: &str = "100s";
/// How long after `kubectl rolemesh revoke` the server's running proxy may still accept the
/// revoked certificate: kubelet's delivery of the bundle with the CRL (one pod sync, 90 s at most)
/// and the proxy's reload.
const AFTER_REVOKE: Duration = Duration::from_secs(150);
/// How long requests may fail after `ca retire` of the active CA: until kubelet has brought
/// the re-issued Secrets and the new bundles into both pods (one pod sync, 90 s at most).
const AFTER_RETIRE: Duration = Duration::from_secs(150);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_rotates_renews_and_retires_under_traffic() -> Result<()> {
    let env = node_ready().await?;
    let duration = format!("authority.caDuration={CA_DURATION}");
    let propagation = format!("authority.bundlePropagation={PROPAGATION}");
    install_release(&env, TRUST_DOMAIN, &[&duration, &propagation])
        .context("installing the chart with a short CA duration")?;
    let outcome = in_namespace("carot", |ns| async move {
        let mesh = Mesh::deploy(&ns).await.context("deploying the mesh")?;
        mesh.rotate().await.context("phase ca rotate --wait")?;
        mesh.renewal().await.context("phase automatic renewal")?;
        mesh.revoke().await.context("phase revoke")?;
        mesh.retire().await.context("phase ca retire")
    })
    .await;
    let uninstall = uninstall_release(&env);
    outcome?;
    uninstall
}

struct Mesh {
    ns: TestNamespace,
    token: String,
    /// The pod IPs of the server and the client, whose proxies' admin ports the host reaches.
    ips: Vec<String>,
    /// Handshake failures counted by both proxies when the traffic started.
    failures_at_start: f64,
}

impl Mesh {
    async fn deploy(ns: &TestNamespace) -> Result<Self> {
        let roles = rolemesh_e2e::meshed_service_accounts(ns, &["server", "client"]).await?;
        let (server_role, client_role) = (roles[0].clone(), roles[1].clone());
        let token = format!("{:016x}", rand::random::<u64>());
        let upstream = format!("server.{}.svc.cluster.local:{MTLS_PORT}", ns.name);
        // The server's app: busybox httpd with the token at /index.html and a CGI script that
        // writes a numbered line every second for an hour (the long-lived connection).
        ns.apply_manifest(&[
            inbound_policy("server", MTLS_PORT, APP_PORT, &client_role),
            outbound_policy("client", OUTBOUND_PORT, &upstream, &server_role),
            service_for("server", MTLS_PORT),
            format!(
                r#"
apiVersion: v1
kind: Pod
metadata:
  name: server
  labels: {{app: server}}
spec:
  serviceAccountName: server
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: {BUSYBOX}
      command:
        - sh
        - -c
        - |
          mkdir -p /www/cgi-bin
          echo "$TOKEN" > /www/index.html
          printf '#!/bin/sh\necho "Content-Type: text/plain"\necho\ni=0\nwhile [ $i -lt 3600 ]; do echo "tick $i"; i=$((i+1)); sleep 1; done\n' > /www/cgi-bin/stream
          chmod 755 /www/cgi-bin/stream
          exec httpd -f -p {APP_PORT} -h /www
      env: [{{name: TOKEN, value: "{token}"}}]
      readinessProbe:
        httpGet: {{path: /index.html, port: {APP_PORT}}}
        periodSeconds: 1
      volumeMounts: [{{name: www, mountPath: /www}}]
  volumes: [{{name: www, emptyDir: {{}}}}]
"#
            ),
        ]
        .join("---\n"))?;
        ns.wait_pod_ready("server", Duration::from_secs(180))
            .await?;
        // The client: a new connection every 100 ms (one line per request), and the stream.
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
          while true; do
            if out=$(busybox timeout 10 wget -qO- http://127.0.0.1:{OUTBOUND_PORT}/index.html 2>&1); then echo "ok $out"; else echo "fail $(date +%s) $out"; fi
            sleep 0.1
          done
    - name: stream
      image: {BUSYBOX}
      command:
        - sh
        - -c
        - |
          until wget -qO- http://127.0.0.1:{OUTBOUND_PORT}/index.html >/dev/null 2>&1; do sleep 1; done
          wget -qO- http://127.0.0.1:{OUTBOUND_PORT}/cgi-bin/stream
          echo "stream ended: $?"
          sleep 3600
"#
        ))?;
        ns.wait_pod_ready("client", Duration::from_secs(120))
            .await?;
        let ip = |pod: &str| {
            ns.env.kubectl(&[
                "get",
                "pod",
                pod,
                "-n",
                &ns.name,
                "-o",
                "jsonpath={.status.podIP}",
            ])
        };
        let ips = vec![ip("server")?, ip("client")?];
        let mut mesh = Self {
            ns: ns.clone(),
            token,
            ips,
            failures_at_start: 0.0,
        };
        eventually(
            "the first requests and stream lines",
            Duration::from_secs(60),
            || async { Ok((mesh.ok_requests()? > 0 && mesh.stream_lines()? > 2).then_some(())) },
        )
        .await?;
        mesh.failures_at_start = mesh.handshake_failures()?;
        Ok(mesh)
    }

    fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.ns.env.kubectl(args)
    }

    fn log(&self, container: &str) -> Result<Vec<String>> {
        Ok(self
            .kubectl(&["logs", "client", "-c", container, "-n", &self.ns.name])?
            .lines()
            .map(String::from)
            .collect())
    }

    fn ok_requests(&self) -> Result<usize> {
        let ok = format!("ok {}", self.token);
        Ok(self.log("app")?.iter().filter(|l| **l == ok).count())
    }

    fn failed_requests(&self) -> Result<Vec<String>> {
        Ok(self
            .log("app")?
            .into_iter()
            .filter(|l| !l.starts_with("ok "))
            .collect())
    }

    /// The stream's lines so far; fails when the stream ended or skipped a line.
    fn stream_lines(&self) -> Result<usize> {
        let lines = self.log("stream")?;
        if let Some(end) = lines.iter().find(|l| l.starts_with("stream ended")) {
            bail!(
                "the long-lived connection broke: {end} after {} lines",
                lines.len()
            );
        }
        for (index, line) in lines.iter().enumerate() {
            ensure!(
                *line == format!("tick {index}"),
                "stream line {index} is {line:?}"
            );
        }
        Ok(lines.len())
    }

    /// Handshakes both proxies refused, from their own metrics.
    fn handshake_failures(&self) -> Result<f64> {
        let mut total = 0.0;
        for ip in &self.ips {
            let metrics = admin_get(ip, "/metrics")?;
            total += metric_sum(&metrics, "rolemesh_proxy_handshake_failures_total", "");
        }
        Ok(total)
    }

    async fn cas(&self) -> Result<Vec<CaStatus>> {
        let api: Api<MTLSAuthority> = Api::all(self.ns.client.clone());
        Ok(api
            .get("default")
            .await?
            .status
            .map(|s| s.cas)
            .unwrap_or_default())
    }

    async fn active(&self) -> Result<String> {
        self.cas()
            .await?
            .into_iter()
            .find(|ca| ca.phase == CaPhase::Active)
            .map(|ca| ca.fingerprint)
            .context("no Active CA")
    }

    /// Namespaces whose trust bundle ConfigMap holds the CA.
    async fn bundles_holding(&self, fingerprint: &str) -> Result<Vec<String>> {
        let api: Api<ConfigMap> = Api::all(self.ns.client.clone());
        let list = api
            .list(&ListParams::default().fields("metadata.name=rolemesh-trust-bundle"))
            .await?;
        Ok(list
            .items
            .into_iter()
            .filter(|cm| {
                cm.data
                    .as_ref()
                    .and_then(|d| d.get("ca.crt"))
                    .and_then(|pem| certificates_from_pem(pem).ok())
                    .is_some_and(|ders| ders.iter().any(|der| sha256_hex(der) == fingerprint))
            })
            .filter_map(|cm| cm.metadata.namespace)
            .collect())
    }

    /// Nothing failed since the traffic started: no request, no handshake, no stream line.
    fn nothing_failed(&self, phase: &str) -> Result<()> {
        let failed = self.failed_requests()?;
        let refused = self.handshake_failures()? - self.failures_at_start;
        let lines = self.stream_lines()?;
        println!(
            "{phase}: {} requests ok, {} failed; {refused} handshakes refused; stream {lines} lines unbroken",
            self.ok_requests()?,
            failed.len()
        );
        ensure!(
            failed.is_empty(),
            "{phase}: failed requests {:?}",
            &failed[..failed.len().min(10)]
        );
        ensure!(
            refused == 0.0,
            "{phase}: the proxies refused {refused} handshakes"
        );
        Ok(())
    }

    async fn rotate(&self) -> Result<()> {
        let before = self.active().await?;
        let env = self.ns.env.clone();
        let started = Instant::now();
        let (code, out, err) = tokio::task::spawn_blocking(move || {
            env.kubectl_plugin(&["ca", "rotate", "--wait", "--timeout", "15m"])
        })
        .await??;
        println!(
            "kubectl rolemesh ca rotate --wait ({:.1} s):\n{out}",
            started.elapsed().as_secs_f64()
        );
        ensure!(code == 0, "ca rotate --wait failed: {out}{err}");
        let after = self.active().await?;
        ensure!(after != before, "a new CA is active");
        ensure!(
            self.bundles_holding(&before).await?.is_empty(),
            "the old CA left every bundle"
        );
        self.nothing_failed("ca rotate --wait")
    }

    /// Waits for the automatic renewal of the CA the rotation made, printing each stage.
    async fn renewal(&self) -> Result<()> {
        let before = self.active().await?;
        let started = Instant::now();
        let mut stage = Instant::now();
        let mut seen: Vec<(String, CaPhase)> = Vec::new();
        let deadline = Duration::from_secs(15 * 60);
        loop {
            let cas = self.cas().await?;
            let now: Vec<(String, CaPhase)> = cas
                .iter()
                .map(|ca| (ca.fingerprint.clone(), ca.phase))
                .collect();
            for entry in &now {
                if !seen.contains(entry) {
                    println!(
                        "renewal: {:>7.1} s  CA {} {}",
                        stage.elapsed().as_secs_f64(),
                        &entry.0[..16],
                        entry.1.as_str()
                    );
                    stage = Instant::now();
                }
            }
            seen = now;
            let renewed = cas.len() == 1 && cas[0].fingerprint != before;
            if renewed && self.bundles_holding(&before).await?.is_empty() {
                println!(
                    "renewal: in all {:.1} s after the rotation",
                    started.elapsed().as_secs_f64()
                );
                break;
            }
            if started.elapsed() > deadline {
                bail!("the CA was not renewed on its own within {deadline:?}: {cas:?}");
            }
            // Traffic is checked while it waits, so a failure is seen when it happens.
            self.nothing_failed_quietly()?;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        self.nothing_failed("automatic renewal")
    }

    fn nothing_failed_quietly(&self) -> Result<()> {
        let failed = self.failed_requests()?;
        ensure!(
            failed.is_empty(),
            "failed requests {:?}",
            &failed[..failed.len().min(10)]
        );
        self.stream_lines().map(|_| ())
    }

    /// `curl` on the node as the client, with the certificate and key of `secret`, through the
    /// server pod's inbound mapping; whether it got the app's page.
    fn curl_as(&self, secret: &Secret, bundle: &str) -> Result<(bool, String)> {
        let dir = std::env::temp_dir().join(format!("rolemesh-revoke-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir)?;
        for (file, key) in [("tls.crt", "tls.crt"), ("tls.key", "tls.key")] {
            std::fs::write(dir.join(file), field(secret, key))?;
        }
        std::fs::write(dir.join("bundle.pem"), bundle)?;
        let host = format!("server.{}.svc.cluster.local", self.ns.name);
        let output = std::process::Command::new("curl")
            .current_dir(&dir)
            .args([
                "-sS",
                "--max-time",
                "5",
                "--cert",
                "tls.crt",
                "--key",
                "tls.key",
                "--cacert",
                "bundle.pem",
                "--resolve",
            ])
            .arg(format!("{host}:{MTLS_PORT}:{}", self.ips[0]))
            .arg(format!("https://{host}:{MTLS_PORT}/index.html"))
            .output()?;
        let _ = std::fs::remove_dir_all(&dir);
        let body = String::from_utf8_lossy(&output.stdout).trim().to_string();
        Ok((
            output.status.success() && body == self.token,
            format!("{body}{}", String::from_utf8_lossy(&output.stderr)),
        ))
    }

    async fn revoke(&self) -> Result<()> {
        let secrets: Api<Secret> = self.ns.api();
        let revoked = secrets.get("client-rolemesh-tls").await?;
        let serial = leaf_of(&revoked)?.serial_hex;
        // The renewal before re-issued both workloads: kubelet may still be bringing the server
        // its new certificate.
        let bundle = trust_bundle(&self.ns).await?;
        eventually(
            "the client's certificate accepted before the revocation",
            AFTER_REVOKE,
            || async { Ok(self.curl_as(&revoked, &bundle)?.0.then_some(())) },
        )
        .await?;
        let started = Instant::now();
        let (code, out, err) = self.ns.env.kubectl_plugin(&[
            "revoke",
            "-n",
            &self.ns.name,
            "--service-account",
            "client",
        ])?;
        ensure!(code == 0, "revoke: {out}{err}");
        let refused_after = eventually(
            "the server's proxy refusing the revoked certificate",
            AFTER_REVOKE,
            || async {
                let (accepted, _) = self.curl_as(&revoked, &bundle)?;
                Ok((!accepted).then(|| started.elapsed()))
            },
        )
        .await?;
        let (renewed, info) =
            rolemesh_e2e::wait_for_secret(&self.ns, "client-rolemesh-tls", Some(&serial)).await?;
        let bundle = trust_bundle(&self.ns).await?;
        ensure!(bundle.contains("X509 CRL"), "the bundle holds the CRL");
        let (accepted, out) = self.curl_as(&renewed, &bundle)?;
        ensure!(
            accepted,
            "the re-issued certificate {} is accepted: {out}",
            info.serial_hex
        );
        println!(
            "revoke: certificate {serial} refused by the server's running proxy {:.1} s after kubectl rolemesh revoke (bound {} s); the re-issued {} accepted",
            refused_after.as_secs_f64(),
            AFTER_REVOKE.as_secs(),
            info.serial_hex
        );
        Ok(())
    }

    async fn retire(&self) -> Result<()> {
        let active = self.active().await?;
        let failed_before = self.failed_requests()?.len();
        let env = self.ns.env.clone();
        let target = active.clone();
        let started = Instant::now();
        let (code, out, err) = tokio::task::spawn_blocking(move || {
            env.kubectl_plugin(&["ca", "retire", &target, "--wait", "--timeout", "5m"])
        })
        .await??;
        let returned = started.elapsed();
        println!(
            "kubectl rolemesh ca retire --wait ({:.1} s):\n{out}",
            returned.as_secs_f64()
        );
        ensure!(code == 0, "ca retire failed: {out}{err}");
        let holding = self.bundles_holding(&active).await?;
        ensure!(
            holding.is_empty(),
            "bundles still holding the retired CA: {holding:?}"
        );
        ensure!(
            !self.cas().await?.iter().any(|ca| ca.fingerprint == active),
            "the retired CA left the authority's status"
        );
        ensure!(
            self.kubectl(&[
                "get",
                "configmap",
                "rolemesh-ca",
                "-n",
                RELEASE_NAMESPACE,
                "-o",
                "jsonpath={.data}"
            ])
            .map(|data| !data.contains(&active))
            .unwrap_or(true)
        );
        // Requests flow again once kubelet has brought both pods their new material: a run of
        // 20 good requests in a row after the command returned.
        let ok = format!("ok {}", self.token);
        let marker = self.log("app")?.len();
        let flowing = eventually(
            "requests flowing after the retirement",
            AFTER_RETIRE,
            || async {
                let lines = self.log("app")?;
                let recent = &lines[marker.min(lines.len())..];
                let streak = recent.iter().rev().take_while(|l| **l == ok).count();
                Ok((streak >= 20).then_some(()))
            },
        )
        .await;
        let failed = self.failed_requests()?.len() - failed_before;
        println!(
            "ca retire: returned after {:.1} s; requests flowing {:.1} s after it returned; {failed} requests failed meanwhile",
            returned.as_secs_f64(),
            (started.elapsed() - returned).as_secs_f64()
        );
        flowing
    }
}
