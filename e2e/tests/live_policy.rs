//! Policy edits reach running pods (node test, chart installed with helm as in
//! `e2e/tests/pods.rs`). Installs release `rolemesh` in namespace `rolemesh` like pods.rs, so the
//! two files must not run at the same time (cargo runs test files one after another).
//!
//! 1. A meshed client pod requests a meshed server through its outbound mapping, one new
//!    connection every 200 ms.
//! 2. Removing the client's role from the server policy's `allow`: the controller writes the
//!    rules key, kubelet delivers it into the running server pod, and from the moment its proxy
//!    reports the new generation the client's next new connection is refused within one second
//!    (checked with one-second slack for the log's whole-second clock). No pod restarts.
//! 3. Adding the role back admits the client again, the same way.
//! 4. Changing the server's inbound port: the running pod is listed as stale (`PortsChanged`) in
//!    the policy's status and by `kubectl rolemesh status`; once re-created, it is not.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use rolemesh_e2e::{admin_get, install_release, meshed_service_accounts, uninstall_release};
use rolemesh_testkit::{TestNamespace, eventually, in_namespace, node_ready};

const BUSYBOX: &str = "rolemesh.local/busybox:1.35.0";
const TRUST_DOMAIN: &str = "live.rolemesh.test";
const MTLS_PORT: u16 = 8443;
const APP_PORT: u16 = 8080;
const OUTBOUND_PORT: u16 = 9001;
/// kubelet's ConfigMap volume refresh: its pod sync (a minute, with jitter) plus its cache.
const KUBELET_PROPAGATION: Duration = Duration::from_secs(150);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_edits_reach_running_pods_and_port_changes_list_stale_pods() -> Result<()> {
    let env = node_ready().await?;
    install_release(&env, TRUST_DOMAIN, &[])
        .context("installing the chart as docs/development.md shows")?;
    let outcome = in_namespace("live", |ns| async move { live_policy_phase(&ns).await }).await;
    let uninstall = uninstall_release(&env);
    outcome?;
    uninstall
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// The server policy with `allow` and the inbound `port`.
fn server_policy(port: u16, allow: &str) -> String {
    format!(
        r#"
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata:
  name: server
spec:
  serviceAccounts: {{names: [server]}}
  inbound:
    - {{name: http, port: {port}, appPort: {APP_PORT}, allow: ["{allow}"]}}
"#
    )
}

fn proxy_generation(ip: &str) -> Result<i64> {
    let metrics = admin_get(ip, "/metrics")?;
    Ok(rolemesh_testkit::metric_sum(&metrics, "rolemesh_proxy_policy_generation", "") as i64)
}

struct Live<'a> {
    ns: &'a TestNamespace,
}

impl Live<'_> {
    fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.ns.env.kubectl(args)
    }

    fn jsonpath(&self, kind: &str, name: &str, path: &str) -> Result<String> {
        self.kubectl(&[
            "get",
            kind,
            name,
            "-n",
            &self.ns.name,
            "-o",
            &format!("jsonpath={path}"),
        ])
    }

    fn server_pod(&self) -> Result<(String, String)> {
        let name = self.kubectl(&[
            "get",
            "pods",
            "-n",
            &self.ns.name,
            "-l",
            "app=server",
            "--field-selector=status.phase=Running",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])?;
        let ip = self.jsonpath("pod", &name, "{.status.podIP}")?;
        Ok((name, ip))
    }

    /// The client's lines `ok <unix seconds>` / `fail <unix seconds>`.
    fn client_lines(&self) -> Result<Vec<(bool, u64)>> {
        Ok(self
            .kubectl(&["logs", "client", "-c", "app", "-n", &self.ns.name])?
            .lines()
            .filter_map(|l| {
                let (verdict, at) = l.split_once(' ')?;
                let at = at.split(' ').next()?.parse().ok()?;
                match verdict {
                    "ok" => Some((true, at)),
                    "fail" => Some((false, at)),
                    _ => None,
                }
            })
            .collect())
    }

    /// Applies the server policy, waits for its rules in the ConfigMap and then for the running
    /// server proxy to report that generation; checks the client's requests from one second
    /// after that (plus a second for the log's whole seconds) are all `admitted` or all refused.
    async fn edit_and_observe(&self, port: u16, allow: &str, admitted: bool) -> Result<()> {
        let (pod, ip) = self.server_pod()?;
        let restarts_before = self.jsonpath(
            "pod",
            &pod,
            "{.status.initContainerStatuses[0].restartCount}",
        )?;
        self.ns.apply_manifest(&server_policy(port, allow))?;
        let generation: i64 =
            eventually("the edit's generation", Duration::from_secs(10), || async {
                Ok(self
                    .jsonpath("mtlspolicy", "server", "{.metadata.generation}")?
                    .parse()
                    .ok())
            })
            .await?;
        let edited = Instant::now();
        let key = r"{.data.policy\.server\.json}";
        eventually(
            "the controller to write the new rules",
            Duration::from_secs(60),
            || async {
                let rules = self.jsonpath("configmap", "rolemesh-trust-bundle", key)?;
                Ok(rules
                    .contains(&format!("\"generation\":{generation}"))
                    .then_some(()))
            },
        )
        .await?;
        let written = edited.elapsed();
        eventually(
            "the running proxy to load the new rules",
            KUBELET_PROPAGATION,
            || async { Ok((proxy_generation(&ip)? == generation).then_some(())) },
        )
        .await?;
        let reloaded_at = now_unix();
        println!(
            "generation {generation}: rules written after {:.1}s, in force in the running proxy after {:.1}s",
            written.as_secs_f64(),
            edited.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(4)).await;
        let after: Vec<bool> = self
            .client_lines()?
            .into_iter()
            .filter(|(_, at)| *at >= reloaded_at + 2)
            .map(|(ok, _)| ok)
            .collect();
        ensure!(after.len() >= 5, "the client kept requesting: {after:?}");
        ensure!(
            after.iter().all(|ok| *ok == admitted),
            "from one second after the reload every new connection is {}: {after:?}",
            if admitted { "admitted" } else { "refused" }
        );
        let (same_pod, _) = self.server_pod()?;
        ensure!(
            same_pod == pod,
            "no new server pod: {pod} became {same_pod}"
        );
        let restarts = self.jsonpath(
            "pod",
            &pod,
            "{.status.initContainerStatuses[0].restartCount}",
        )?;
        ensure!(
            restarts == restarts_before,
            "the proxy did not restart: {restarts_before} -> {restarts}"
        );
        Ok(())
    }
}

/// The scenario, on a namespace of a cluster where the chart is installed.
pub async fn live_policy_phase(ns: &TestNamespace) -> Result<()> {
    let env = &ns.env;
    let roles = meshed_service_accounts(ns, &["server", "client"]).await?;
    let (server_role, client_role) = (roles[0].clone(), roles[1].clone());
    let account = client_role
        .split(':')
        .nth(4)
        .context("the role ARN's account")?
        .to_string();
    let nobody = format!("arn:aws:iam::{account}:role/nobody");
    let upstream = format!("server.{}.svc.cluster.local:{MTLS_PORT}", ns.name);
    ns.apply_manifest(&format!(
        r#"
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
          command: [sh, -c, 'echo live > /www/index.html && exec httpd -f -p {APP_PORT} -h /www']
          ports: [{{containerPort: {APP_PORT}}}]
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
    ))?;
    ns.apply_manifest(&server_policy(MTLS_PORT, &client_role))?;
    env.kubectl(&[
        "rollout",
        "status",
        "deployment/server",
        "-n",
        &ns.name,
        "--timeout=180s",
    ])?;
    // A new connection through the outbound mapping every 200 ms, one line each.
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
            if busybox timeout 2 wget -qO- http://127.0.0.1:{OUTBOUND_PORT}/index.html >/dev/null 2>&1; then echo "ok $(date +%s)"; else echo "fail $(date +%s)"; fi
            sleep 0.2
          done
"#
    ))?;
    ns.wait_pod_ready("client", Duration::from_secs(120))
        .await?;
    let live = Live { ns };
    eventually(
        "the client's first request",
        Duration::from_secs(60),
        || async { Ok(live.client_lines()?.iter().any(|(ok, _)| *ok).then_some(())) },
    )
    .await?;
    let (_, ip) = live.server_pod()?;
    let ready = admin_get(&ip, "/ready")?;
    ensure!(
        ready
            .to_ascii_lowercase()
            .contains("x-rolemesh-policy-generation: 1"),
        "the server proxy runs generation 1: {ready}"
    );

    // The client's role removed, then added back: no restart either way.
    live.edit_and_observe(MTLS_PORT, &nobody, false)
        .await
        .context("removing the client's role")?;
    live.edit_and_observe(MTLS_PORT, &client_role, true)
        .await
        .context("adding it back")?;

    // A new port needs a restart: the running pod is listed as stale until it is re-created.
    let (pod, _) = live.server_pod()?;
    live.ns
        .apply_manifest(&server_policy(MTLS_PORT + 1, &client_role))?;
    eventually(
        "the running server pod listed as stale",
        Duration::from_secs(60),
        || async {
            let stale = live.jsonpath(
                "mtlspolicy",
                "server",
                "{.status.pods.stale[*].name}={.status.pods.stale[*].reason}",
            )?;
            Ok((stale == format!("{pod}=PortsChanged")).then_some(()))
        },
    )
    .await?;
    let (code, table, err) = env.kubectl_plugin(&["status", "-n", &ns.name])?;
    ensure!(code == 0, "kubectl rolemesh status: {err}");
    let row = table
        .lines()
        .find(|l| l.contains(&pod))
        .context(table.clone())?;
    ensure!(
        table.contains("STALE POD") && row.contains("PortsChanged"),
        "{table}"
    );
    env.kubectl(&["rollout", "restart", "deployment/server", "-n", &ns.name])?;
    env.kubectl(&[
        "rollout",
        "status",
        "deployment/server",
        "-n",
        &ns.name,
        "--timeout=180s",
    ])?;
    // The controller looks at pods again every minute while some are stale.
    eventually(
        "no stale pod after the rollout",
        Duration::from_secs(150),
        || async {
            let count = live.jsonpath("mtlspolicy", "server", "{.status.pods.staleCount}")?;
            Ok((count == "0").then_some(()))
        },
    )
    .await?;
    Ok(())
}
