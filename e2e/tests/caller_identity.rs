//! The app learns who called (node test, chart installed with helm as in `e2e/tests/pods.rs`,
//! whose release it shares: the files run one after another).
//!
//! One meshed server pod has two inbound mappings, one per caller-identity mode, and a meshed
//! client reaches each through an outbound mapping:
//!
//! 1. `callerIdentity: http`: the app is busybox httpd with a CGI script that prints the request
//!    headers it received. They carry the client's SPIFFE ID and role ARN in
//!    `x-rolemesh-peer-spiffe-id` and `x-rolemesh-peer-role-arn`; the copy of the role header the
//!    client sent itself does not arrive.
//! 2. `callerIdentity: proxyProtocolV2`: the app is `dev/proxy-protocol-echo`, which parses the
//!    PROXY v2 header with the `ppp` crate and logs the TLVs; its log names the client's SPIFFE ID
//!    and role ARN, TLS 1.3 and a client certificate, and the bytes after the header are the
//!    client's.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rolemesh_e2e::{install_release, meshed_service_accounts, uninstall_release};
use rolemesh_testkit::{TestNamespace, eventually, in_namespace, node_ready};

const BUSYBOX: &str = "rolemesh.local/busybox:1.35.0";
/// dev/images/proxy-protocol-echo.image
const PP2_ECHO: &str = "rolemesh.local/proxy-protocol-echo:test";
const TRUST_DOMAIN: &str = "caller.rolemesh.test";
const HTTP_PORT: u16 = 8443;
const HTTP_APP_PORT: u16 = 8080;
const PP2_PORT: u16 = 8444;
const PP2_APP_PORT: u16 = 8081;
const HTTP_OUTBOUND: u16 = 9001;
const PP2_OUTBOUND: u16 = 9002;
const SPOOFED_ROLE: &str = "arn:aws:iam::999999999999:role/evil";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_learns_the_callers_identity_over_http_headers_and_proxy_protocol() -> Result<()> {
    let env = node_ready().await?;
    install_release(&env, TRUST_DOMAIN, &[])
        .context("installing the chart as docs/development.md shows")?;
    let outcome = in_namespace(
        "caller",
        |ns| async move { caller_identity_phase(&ns).await },
    )
    .await;
    let uninstall = uninstall_release(&env);
    outcome?;
    uninstall
}

fn exec(ns: &TestNamespace, pod: &str, script: &str) -> Result<(bool, String)> {
    let out = ns.env.run(
        "kubectl",
        &[
            "exec", pod, "-c", "app", "-n", &ns.name, "--", "sh", "-c", script,
        ],
        None,
    )?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

async fn caller_identity_phase(ns: &TestNamespace) -> Result<()> {
    let env = &ns.env;
    let n = ns.name.as_str();
    let roles = meshed_service_accounts(ns, &["server", "client"]).await?;
    let (server_role, client_role) = (&roles[0], &roles[1]);
    let client_id = format!("spiffe://{TRUST_DOMAIN}/ns/{n}/sa/client");
    let upstream = |port: u16| format!("server.{n}.svc.cluster.local:{port}");
    ns.apply_manifest(&format!(
        r#"
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata:
  name: server
spec:
  serviceAccounts: {{names: [server]}}
  inbound:
    - {{name: http, port: {HTTP_PORT}, appPort: {HTTP_APP_PORT}, callerIdentity: http, allow: ["{client_role}"]}}
    - {{name: pp2, port: {PP2_PORT}, appPort: {PP2_APP_PORT}, callerIdentity: proxyProtocolV2, allow: ["{client_role}"]}}
---
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata:
  name: client
spec:
  serviceAccounts: {{names: [client]}}
  outbound:
    - {{name: http, localPort: {HTTP_OUTBOUND}, upstream: "{http_upstream}", expect: ["{server_role}"]}}
    - {{name: pp2, localPort: {PP2_OUTBOUND}, upstream: "{pp2_upstream}", expect: ["{server_role}"]}}
---
apiVersion: v1
kind: Service
metadata:
  name: server
spec:
  selector: {{app: server}}
  ports:
    - {{name: http, port: {HTTP_PORT}, targetPort: {HTTP_PORT}}}
    - {{name: pp2, port: {PP2_PORT}, targetPort: {PP2_PORT}}}
---
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
          printf '#!/bin/sh\necho "Content-Type: text/plain"\necho\nenv | grep "^HTTP_" | sort\n' > /www/cgi-bin/headers
          chmod 755 /www/cgi-bin/headers
          exec httpd -f -p {HTTP_APP_PORT} -h /www
      volumeMounts: [{{name: www, mountPath: /www}}]
    - name: pp2
      image: {PP2_ECHO}
      args: ["0.0.0.0:{PP2_APP_PORT}"]
  volumes: [{{name: www, emptyDir: {{}}}}]
---
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
      command: [sleep, "3600"]
"#,
        http_upstream = upstream(HTTP_PORT),
        pp2_upstream = upstream(PP2_PORT),
    ))?;
    ns.wait_pod_ready("server", Duration::from_secs(180))
        .await?;
    ns.wait_pod_ready("client", Duration::from_secs(180))
        .await?;

    // 1. HTTP headers, with a spoofed copy sent by the client.
    let request = format!(
        "busybox timeout 5 wget -qO- --header 'x-rolemesh-peer-role-arn: {SPOOFED_ROLE}' --header 'X-Rolemesh-Peer-Spiffe-Id: spiffe://evil/ns/x/sa/y' http://127.0.0.1:{HTTP_OUTBOUND}/cgi-bin/headers"
    );
    let headers = eventually(
        "the http mapping's app to answer",
        Duration::from_secs(60),
        || async {
            let (ok, out) = exec(ns, "client", &request)?;
            Ok(ok.then_some(out))
        },
    )
    .await?;
    println!("headers the app received:\n{headers}");
    let values = |name: &str| -> Vec<&str> {
        headers
            .lines()
            .filter_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .collect()
    };
    ensure!(
        values("HTTP_X_ROLEMESH_PEER_SPIFFE_ID") == [client_id.as_str()],
        "one x-rolemesh-peer-spiffe-id, the client's {client_id}:\n{headers}"
    );
    ensure!(
        values("HTTP_X_ROLEMESH_PEER_ROLE_ARN") == [client_role.as_str()],
        "one x-rolemesh-peer-role-arn, the client's {client_role}:\n{headers}"
    );
    ensure!(
        !headers.contains(SPOOFED_ROLE) && !headers.contains("spiffe://evil"),
        "the spoofed headers did not arrive:\n{headers}"
    );

    // 2. PROXY protocol v2.
    let (ok, echoed) = exec(
        ns,
        "client",
        &format!("echo hello-pp2 | busybox timeout 5 nc 127.0.0.1 {PP2_OUTBOUND}"),
    )?;
    ensure!(
        ok && echoed.trim() == "hello-pp2",
        "the app echoes the client's bytes after the header: {echoed}"
    );
    let line = eventually(
        "the PROXY protocol app to log the caller",
        Duration::from_secs(30),
        || async {
            let log = env.kubectl(&["logs", "server", "-c", "pp2", "-n", n])?;
            Ok(log
                .lines()
                .find(|l| l.starts_with("caller "))
                .map(str::to_string))
        },
    )
    .await?;
    println!("the PROXY protocol app logged: {line}");
    let client_ip = env.kubectl(&[
        "get",
        "pod",
        "client",
        "-n",
        n,
        "-o",
        "jsonpath={.status.podIP}",
    ])?;
    ensure!(
        line.split(' ')
            .any(|field| field.starts_with(&format!("source={client_ip}:"))),
        "the header's source is the client pod {client_ip}, not the proxy's loopback: {line}"
    );
    for expected in [
        format!("spiffe_id={client_id}"),
        format!("role_arn={client_role}"),
        "tls_version=TLSv1.3".to_string(),
        "client_cert=yes".to_string(),
    ] {
        ensure!(
            line.split(' ').any(|field| field == expected),
            "{expected} in the app's log line: {line}"
        );
    }
    Ok(())
}
