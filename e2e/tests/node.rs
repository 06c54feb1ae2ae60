//! The local cluster's node runs pods as a cluster does: the scheduler places them, CoreDNS
//! resolves Service names, kube-proxy routes Service IPs, the apiserver reaches the kubelet for
//! `kubectl logs` and `kubectl exec`, and the kubelet brings a Secret's update into a running pod.

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use rolemesh_testkit::{NODE, TestNamespace, eventually, in_namespace, node_ready};

/// The test app image dev/images/busybox.image describes, imported into the node by `make cluster`.
const BUSYBOX: &str = "rolemesh.local/busybox:1.35.0";

fn random_token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A pod's phase, or None while it has none.
fn pod_phase(ns: &TestNamespace, pod: &str) -> Result<String> {
    ns.env.kubectl(&[
        "get",
        "pod",
        pod,
        "-n",
        &ns.name,
        "-o",
        "jsonpath={.status.phase}",
    ])
}

#[tokio::test]
async fn deployment_is_scheduled_and_reached_by_service_dns_name() -> Result<()> {
    node_ready().await?;
    in_namespace("node-service", |ns| async move {
        // The page carries a token only this run knows, so the client can only print it by
        // reaching this Deployment's pod.
        let token = random_token();
        ns.apply_manifest(&format!(
            r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 1
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      containers:
      - name: httpd
        image: {BUSYBOX}
        imagePullPolicy: IfNotPresent
        command: [sh, -c, 'echo "$TOKEN" > /www/index.html && exec httpd -f -p 8080 -h /www']
        env:
        - {{name: TOKEN, value: "{token}"}}
        ports:
        - containerPort: 8080
        readinessProbe:
          httpGet: {{path: /index.html, port: 8080}}
          periodSeconds: 1
        securityContext:
          readOnlyRootFilesystem: true
          allowPrivilegeEscalation: false
        volumeMounts:
        - {{name: www, mountPath: /www}}
      volumes:
      - name: www
        emptyDir: {{}}
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {{app: web}}
  ports:
  - {{port: 80, targetPort: 8080}}
"#
        ))?;
        ns.env.kubectl(&[
            "rollout",
            "status",
            "deployment/web",
            "-n",
            &ns.name,
            "--timeout=90s",
        ])?;
        // Nothing in the Deployment names a node: the scheduler bound the pod.
        let bound = ns.env.kubectl(&[
            "get",
            "pods",
            "-n",
            &ns.name,
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[*].spec.nodeName}",
        ])?;
        ensure!(bound == NODE, "web pod bound to {bound:?}, not {NODE}");
        let scheduled = ns.env.kubectl(&[
            "get",
            "events",
            "-n",
            &ns.name,
            "--field-selector",
            "reason=Scheduled",
            "-o",
            "jsonpath={.items[*].source.component}{.items[*].reportingComponent}",
        ])?;
        ensure!(
            scheduled.contains("default-scheduler"),
            "no Scheduled event from default-scheduler: {scheduled:?}"
        );

        let host = format!("web.{}.svc.cluster.local", ns.name);
        ns.apply_manifest(&format!(
            r#"
apiVersion: v1
kind: Pod
metadata:
  name: client
spec:
  restartPolicy: Never
  containers:
  - name: client
    image: {BUSYBOX}
    imagePullPolicy: IfNotPresent
    # kube-proxy programs a Service's new endpoint within a sync period of the pod turning Ready.
    # (No wget -T: busybox 1.35's static wget crashes with it.)
    command:
    - sh
    - -c
    - |
      nslookup {host} || exit 1
      for attempt in 1 2 3 4 5 6 7 8 9 10; do
        wget -qO- http://{host}/ && exit 0
        echo "attempt $attempt failed"; sleep 1
      done
      exit 1
"#
        ))?;
        let phase = eventually("client pod finished", Duration::from_secs(90), || async {
            let phase = pod_phase(&ns, "client")?;
            Ok(matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase))
        })
        .await?;
        let logs = ns.env.kubectl(&["logs", "client", "-n", &ns.name])?;
        ensure!(
            phase == "Succeeded",
            "client pod {phase}; its output:\n{logs}"
        );
        let service_ip = ns.env.kubectl(&[
            "get",
            "service",
            "web",
            "-n",
            &ns.name,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])?;
        ensure!(
            logs.contains(&format!("Address: {service_ip}")),
            "CoreDNS did not answer {host} with the Service IP {service_ip}:\n{logs}"
        );
        ensure!(
            logs.lines().any(|line| line.trim() == token),
            "the page fetched through the Service is not this run's:\n{logs}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn kubectl_logs_and_exec_reach_the_container() -> Result<()> {
    node_ready().await?;
    in_namespace("node-exec", |ns| async move {
        let token = random_token();
        ns.apply_manifest(&format!(
            r#"
apiVersion: v1
kind: Pod
metadata:
  name: app
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: {BUSYBOX}
    imagePullPolicy: IfNotPresent
    command: [sh, -c, 'echo "started $TOKEN"; exec sleep 3600']
    env:
    - {{name: TOKEN, value: "{token}"}}
"#
        ))?;
        ns.wait_pod_ready("app", Duration::from_secs(90)).await?;
        let logs = eventually("the container's log", Duration::from_secs(30), || async {
            let logs = ns.env.kubectl(&["logs", "app", "-n", &ns.name])?;
            Ok(logs.contains(&token).then_some(logs))
        })
        .await?;
        ensure!(
            logs.trim() == format!("started {token}"),
            "unexpected log: {logs:?}"
        );
        let exec = ns.env.kubectl(&[
            "exec",
            "app",
            "-n",
            &ns.name,
            "--",
            "sh",
            "-c",
            "echo \"$TOKEN\"; id -u",
        ])?;
        let lines: Vec<&str> = exec.lines().collect();
        // The image runs as nobody (dev/images/busybox.image).
        ensure!(
            lines == [token.as_str(), "65534"],
            "kubectl exec printed {exec:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn secret_update_reaches_a_running_pod() -> Result<()> {
    node_ready().await?;
    in_namespace("node-secret", |ns| async move {
        let (first, second) = (random_token(), random_token());
        let secret = |value: &str| {
            format!(
                r#"
apiVersion: v1
kind: Secret
metadata:
  name: material
stringData:
  value: "{value}"
"#
            )
        };
        ns.apply_manifest(&secret(&first))?;
        ns.apply_manifest(&format!(
            r#"
apiVersion: v1
kind: Pod
metadata:
  name: reader
spec:
  # sleep as PID 1 ignores SIGTERM; the namespace's deletion should not wait 30 s for it.
  terminationGracePeriodSeconds: 1
  containers:
  - name: reader
    image: {BUSYBOX}
    imagePullPolicy: IfNotPresent
    command: [sleep, "3600"]
    volumeMounts:
    - {{name: material, mountPath: /material, readOnly: true}}
  volumes:
  - name: material
    secret:
      secretName: material
"#
        ))?;
        ns.wait_pod_ready("reader", Duration::from_secs(90)).await?;
        let read = || {
            ns.env.kubectl(&[
                "exec",
                "reader",
                "-n",
                &ns.name,
                "--",
                "cat",
                "/material/value",
            ])
        };
        let mounted = read()?;
        ensure!(mounted == first, "mounted {mounted:?}, not {first:?}");

        ns.apply_manifest(&secret(&second))?;
        let updated = Instant::now();
        // kubelet refreshes a Secret volume on its pod sync (every minute, with jitter) after
        // its watch has seen the change.
        eventually(
            "the Secret's update in the pod",
            Duration::from_secs(180),
            || async {
                let value = read()?;
                if value != first && value != second {
                    bail!("the pod read {value:?}, neither the old nor the new value");
                }
                Ok((value == second).then_some(()))
            },
        )
        .await?;
        println!(
            "kubelet brought the Secret's update into the running pod in {:.1}s",
            updated.elapsed().as_secs_f64()
        );
        Ok(())
    })
    .await
}
