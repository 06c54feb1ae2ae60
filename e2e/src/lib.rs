//! Support for the integration tests against the local control plane (`make cluster`): the real
//! `rolemesh-controller` binary scoped to a test's namespace, the objects the tests write, and
//! checks on what the controller wrote. Generic test support lives in `rolemesh_testkit`.

use std::{
    collections::BTreeMap,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret, ServiceAccount},
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use rolemesh_crds::{MTLSAuthority, MTLSPolicy};
use rolemesh_profile::{CertificateInfo, inspect::certificates_from_pem, inspect_certificate};
pub use rolemesh_testkit::unique;
use rolemesh_testkit::{
    ClusterEnv, TestNamespace, binary, cluster, eventually, free_port, http_get, in_namespace,
    install_crds, log_dir, temp_dir,
};
use serde_json::json;

pub const WAIT: Duration = Duration::from_secs(60);

/// A controller process; killed when dropped.
pub struct ControllerProcess {
    pub child: Child,
    pub metrics_port: u16,
    pub log_path: std::path::PathBuf,
}

impl ControllerProcess {
    /// Starts the controller scoped to the test namespace, with its own authority and lease.
    pub fn start(
        ns: &TestNamespace,
        authority: &str,
        identity: &str,
        extra: &[&str],
    ) -> Result<Self> {
        Self::start_with_env(ns, authority, identity, extra, &[])
    }

    pub fn start_with_env(
        ns: &TestNamespace,
        authority: &str,
        identity: &str,
        extra: &[&str],
        vars: &[(&str, &str)],
    ) -> Result<Self> {
        let metrics_port = free_port();
        let log_path = log_dir()?.join(format!("controller-{}-{identity}.log", ns.name));
        let log = std::fs::File::create(&log_path)?;
        let mut command = Command::new(binary("rolemesh-controller")?);
        for (key, value) in ns.env.vars() {
            command.env(key, value);
        }
        command
            .env("POD_NAME", identity)
            .env("RUST_LOG", "info,rolemesh_controller=debug")
            .args([
                "--namespace",
                &ns.name,
                "--watch-namespace",
                &ns.name,
                "--authority",
                authority,
            ])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            // Tests run in parallel: none may touch a shared webhook configuration.
            .arg("--webhook-configuration=")
            .args(extra)
            .envs(vars.iter().copied())
            .stdout(Stdio::null())
            .stderr(log);
        let child = command.spawn().context("starting rolemesh-controller")?;
        Ok(Self {
            child,
            metrics_port,
            log_path,
        })
    }

    /// The Prometheus exposition of the running controller.
    pub async fn metrics(&self) -> Result<String> {
        http_get(self.metrics_port, "/metrics").await
    }

    /// The value of one sample (name with labels, as exposed), 0 when absent.
    pub async fn metric(&self, sample: &str) -> Result<f64> {
        let text = self.metrics().await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- controller log {} ---\n{}",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// Creates a cluster-scoped MTLSAuthority; returns its name. Delete it with `delete_authority`.
pub async fn create_authority(ns: &TestNamespace, spec: serde_json::Value) -> Result<String> {
    let name = unique("test");
    let api: Api<MTLSAuthority> = Api::all(ns.client.clone());
    let authority: MTLSAuthority = serde_json::from_value(json!({
        "apiVersion": "rolemesh.dev/v1alpha1",
        "kind": "MTLSAuthority",
        "metadata": { "name": name, "labels": { "rolemesh.dev/test-namespace": ns.name } },
        "spec": spec,
    }))?;
    api.create(&PostParams::default(), &authority)
        .await
        .context("creating MTLSAuthority")?;
    Ok(name)
}

pub async fn delete_authority(ns: &TestNamespace, name: &str) {
    let api: Api<MTLSAuthority> = Api::all(ns.client.clone());
    let _ = api.delete(name, &Default::default()).await;
}

/// The local control plane with rolemesh's CRDs installed.
pub async fn control_plane() -> Result<ClusterEnv> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let env = cluster().await?;
    install_crds(&env).await?;
    Ok(env)
}

/// Runs `test` in a new namespace (see `in_namespace`) with its own MTLSAuthority made from
/// `spec`; the test gets the namespace and the authority's name.
pub async fn in_namespace_with_authority<F, Fut>(
    prefix: &str,
    spec: serde_json::Value,
    test: F,
) -> Result<()>
where
    F: FnOnce(TestNamespace, String) -> Fut + Send + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    control_plane().await?;
    in_namespace(prefix, |ns| async move {
        let authority = create_authority(&ns, spec).await?;
        // The authority is cluster-scoped and outlives the namespace, so it is deleted here,
        // after a panic too.
        let outcome = tokio::spawn(test(ns.clone(), authority.clone())).await;
        delete_authority(&ns, &authority).await;
        match outcome {
            Ok(result) => result,
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Err(join) => Err(join.into()),
        }
    })
    .await
}

pub fn local_authority_spec(trust_domain: &str, verification: &str) -> serde_json::Value {
    json!({
        "trustDomain": trust_domain,
        "signer": { "type": "local", "local": { "secretName": "rolemesh-ca-key" } },
        "identityVerification": verification,
    })
}

pub async fn apply_service_account(
    ns: &TestNamespace,
    name: &str,
    role: Option<&str>,
) -> Result<()> {
    let annotations = match role {
        Some(role) => json!({ "eks.amazonaws.com/role-arn": role }),
        None => json!({}),
    };
    let body = json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": { "name": name, "annotations": annotations },
    });
    ns.apply::<ServiceAccount>(name, body).await?;
    Ok(())
}

/// The start of every meshed-pod test: opts `ns` into injection and gives each of
/// `service_accounts` its own IAM role (`<ns>-<sa>` in the local AWS endpoint, trusting that
/// ServiceAccount) as its IRSA annotation. Returns the role ARNs in the same order.
pub async fn meshed_service_accounts(
    ns: &TestNamespace,
    service_accounts: &[&str],
) -> Result<Vec<String>> {
    ns.env.kubectl(&[
        "label",
        "namespace",
        &ns.name,
        "rolemesh.dev/inject=enabled",
    ])?;
    let mut roles = Vec::with_capacity(service_accounts.len());
    for sa in service_accounts {
        let role = ns
            .env
            .create_irsa_role(&format!("{}-{sa}", ns.name), &ns.name, sa)
            .await?;
        apply_service_account(ns, sa, Some(&role)).await?;
        roles.push(role);
    }
    Ok(roles)
}

pub async fn apply_policy(ns: &TestNamespace, name: &str, spec: serde_json::Value) -> Result<()> {
    let body = json!({
        "apiVersion": "rolemesh.dev/v1alpha1", "kind": "MTLSPolicy",
        "metadata": { "name": name }, "spec": spec,
    });
    ns.apply::<MTLSPolicy>(name, body).await?;
    Ok(())
}

pub async fn annotate<K>(api: &Api<K>, name: &str, key: &str, value: &str) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = json!({ "metadata": { "annotations": { key: value } } });
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    Ok(())
}

pub fn field(secret: &Secret, key: &str) -> String {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b: &ByteString| String::from_utf8_lossy(&b.0).into_owned())
        .unwrap_or_default()
}

/// The leaf certificate of a Secret, parsed.
pub fn leaf_of(secret: &Secret) -> Result<CertificateInfo> {
    let chain = certificates_from_pem(&field(secret, "tls.crt"))?;
    let leaf = chain.first().context("tls.crt holds no certificate")?;
    Ok(inspect_certificate(leaf)?)
}

/// Waits until Secret `name` holds a certificate whose serial differs from `not_serial`.
pub async fn wait_for_secret(
    ns: &TestNamespace,
    name: &str,
    not_serial: Option<&str>,
) -> Result<(Secret, CertificateInfo)> {
    let api: Api<Secret> = ns.api();
    eventually(
        &format!("Secret {name} with a new certificate"),
        WAIT,
        || async {
            let Some(secret) = api.get_opt(name).await? else {
                return Ok(None);
            };
            let info = leaf_of(&secret)?;
            if Some(info.serial_hex.as_str()) == not_serial {
                return Ok(None);
            }
            Ok(Some((secret, info)))
        },
    )
    .await
}

pub async fn trust_bundle(ns: &TestNamespace) -> Result<String> {
    let api: Api<ConfigMap> = ns.api();
    eventually("the trust bundle ConfigMap", WAIT, || async {
        Ok(api
            .get_opt("rolemesh-trust-bundle")
            .await?
            .and_then(|cm| cm.data)
            .and_then(|d| d.get("ca.crt").cloned()))
    })
    .await
}

/// `openssl verify -CAfile <bundle> -untrusted <rest of chain> -purpose <purpose> <leaf>`.
pub fn openssl_verify(secret: &Secret, bundle: &str, purpose: &str) -> Result<()> {
    openssl_verify_with(secret, bundle, purpose, &[])
}

/// [`openssl_verify`] that also checks the leaf against the CRL of its issuer in the bundle
/// (`-crl_check -CRLfile <bundle>`).
pub fn openssl_verify_crl(secret: &Secret, bundle: &str, purpose: &str) -> Result<()> {
    openssl_verify_with(
        secret,
        bundle,
        purpose,
        &["-crl_check", "-CRLfile", "bundle.pem"],
    )
}

fn openssl_verify_with(secret: &Secret, bundle: &str, purpose: &str, extra: &[&str]) -> Result<()> {
    let dir = temp_dir("verify");
    let chain = certificates_from_pem(&field(secret, "tls.crt"))?;
    let pem = |der: &[u8]| {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap_or(""))
            .collect();
        format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            lines.join("\n")
        )
    };
    std::fs::write(dir.join("leaf.pem"), pem(&chain[0]))?;
    let untrusted: String = chain[1..].iter().map(|d| pem(d)).collect();
    std::fs::write(
        dir.join("untrusted.pem"),
        if untrusted.is_empty() {
            pem(&chain[0])
        } else {
            untrusted
        },
    )?;
    std::fs::write(dir.join("bundle.pem"), bundle)?;
    let output = Command::new("openssl")
        .current_dir(&dir)
        .args([
            "verify",
            "-CAfile",
            "bundle.pem",
            "-untrusted",
            "untrusted.pem",
            "-purpose",
            purpose,
        ])
        .args(extra)
        .arg("leaf.pem")
        .output()
        .context("running openssl verify")?;
    let _ = std::fs::remove_dir_all(&dir);
    if !output.status.success() {
        bail!(
            "openssl verify -purpose {purpose} refused the certificate: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

pub async fn policy_status(
    ns: &TestNamespace,
    name: &str,
) -> Result<rolemesh_crds::MTLSPolicyStatus> {
    let api: Api<MTLSPolicy> = ns.api();
    Ok(api.get(name).await?.status.unwrap_or_default())
}

/// Waits until the policy's status entry for `service_account` satisfies `check`.
pub async fn wait_for_workload(
    ns: &TestNamespace,
    policy: &str,
    service_account: &str,
    check: impl Fn(&rolemesh_crds::WorkloadStatus) -> bool,
) -> Result<rolemesh_crds::WorkloadStatus> {
    eventually(
        &format!("status of {service_account} in MTLSPolicy {policy}"),
        WAIT,
        || async {
            let status = policy_status(ns, policy).await?;
            let entry = status
                .workloads
                .into_iter()
                .find(|w| w.service_account == service_account);
            match entry {
                Some(w) if check(&w) => Ok(Some(w)),
                Some(w) => bail!("last seen: {w:?}"),
                None => Ok(None),
            }
        },
    )
    .await
}

/// YAML of an MTLSPolicy for ServiceAccount `name` with one inbound mapping: mTLS on `port` to
/// the app's plain `app_port`, admitting the role `allow`.
pub fn inbound_policy(name: &str, port: u16, app_port: u16, allow: &str) -> String {
    format!(
        r#"apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata:
  name: {name}
spec:
  serviceAccounts: {{names: [{name}]}}
  inbound:
    - {{name: http, port: {port}, appPort: {app_port}, allow: ["{allow}"]}}
"#
    )
}

/// YAML of an MTLSPolicy for ServiceAccount `name` with one outbound mapping `server`: plain on
/// 127.0.0.1:`local_port`, mTLS to `upstream`, whose role must be `expect`.
pub fn outbound_policy(name: &str, local_port: u16, upstream: &str, expect: &str) -> String {
    format!(
        r#"apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata:
  name: {name}
spec:
  serviceAccounts: {{names: [{name}]}}
  outbound:
    - {{name: server, localPort: {local_port}, upstream: "{upstream}", expect: ["{expect}"]}}
"#
    )
}

/// YAML of Service `name` selecting pods labelled `app: name`, on `port`.
pub fn service_for(name: &str, port: u16) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  selector: {{app: {name}}}
  ports: [{{name: mtls, port: {port}, targetPort: {port}}}]
"#
    )
}

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// How a throttled AWS service answers, as its SDK client parses it.
#[derive(Clone, Copy, Debug)]
pub enum Throttled {
    /// KMS (JSON protocol): `ThrottlingException`.
    Kms,
    /// STS (query protocol, XML): `Throttling`, with HTTP 400 like a refusal.
    Sts,
}

impl Throttled {
    fn response(self) -> String {
        let (content_type, extra, body) = match self {
            Self::Kms => (
                "application/x-amz-json-1.1",
                "x-amzn-ErrorType: ThrottlingException\r\n",
                r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#,
            ),
            Self::Sts => (
                "text/xml",
                "",
                "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error><RequestId>rolemesh-e2e</RequestId></ErrorResponse>",
            ),
        };
        format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: {content_type}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }
}

/// A TCP forwarder in front of the local AWS endpoint that can be switched to answer every
/// request as a throttled service does, as an outage of that service looks to the SDK.
pub struct FaultyEndpoint {
    pub url: String,
    throttling: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultyEndpoint {
    pub async fn start(upstream: &str, fault: Throttled) -> Result<Self> {
        use std::sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        };
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let throttling = Arc::new(AtomicBool::new(false));
        let flag = throttling.clone();
        let response = Arc::new(fault.response());
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let flag = flag.clone();
                let response = response.clone();
                tokio::spawn(async move {
                    if flag.load(Ordering::SeqCst) {
                        let mut buf = vec![0u8; 65536];
                        let _ =
                            tokio::time::timeout(Duration::from_millis(200), client.read(&mut buf))
                                .await;
                        let _ = client.write_all(response.as_bytes()).await;
                        let _ = client.shutdown().await;
                        return;
                    }
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Ok(Self {
            url,
            throttling,
            task,
        })
    }

    pub fn set_throttling(&self, on: bool) {
        self.throttling
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for FaultyEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The namespace the tests that run the chart as pods install it into, as docs/development.md shows.
pub const RELEASE_NAMESPACE: &str = "rolemesh";

fn helm(env: &ClusterEnv, args: &[&str]) -> Result<String> {
    let output = env.run("helm", args, None)?;
    rolemesh_testkit::expect_success("helm", args, &output)
}

/// Installs the chart as release `rolemesh` with the command docs/development.md shows for the
/// local cluster (its values file, `authority.create=true`), the trust domain given, and `extra`
/// `--set` values; waits for its pods. One such release runs at a time: the test files that use it
/// are separate binaries, which `cargo test` runs one after another.
pub fn install_release(env: &ClusterEnv, trust_domain: &str, extra: &[&str]) -> Result<()> {
    // A release left by an interrupted run would refuse the install.
    let _ = env.run(
        "helm",
        &["uninstall", "rolemesh", "-n", RELEASE_NAMESPACE, "--wait"],
        None,
    );
    // A namespace being deleted refuses new content until it is gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while env
        .run(
            "kubectl",
            &[
                "get",
                "namespace",
                RELEASE_NAMESPACE,
                "-o",
                "jsonpath={.status.phase}",
            ],
            None,
        )?
        .stdout
        .starts_with(b"Terminating")
    {
        if std::time::Instant::now() > deadline {
            bail!("namespace {RELEASE_NAMESPACE} is still terminating");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let chart = rolemesh_testkit::repo_root().join("charts/rolemesh");
    let values = env.chart_values()?;
    let trust_domain = format!("authority.trustDomain={trust_domain}");
    let mut args = vec![
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
    ];
    for value in extra {
        args.extend(["--set", value]);
    }
    args.extend(["--wait", "--timeout", "3m"]);
    helm(env, &args)?;
    Ok(())
}

/// Uninstalls the release and deletes its namespace, waiting for both.
pub fn uninstall_release(env: &ClusterEnv) -> Result<()> {
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

/// The injected proxy's admin port (probes, `/ready`, `/metrics`).
pub const PROXY_ADMIN_PORT: u16 = 15021;

/// GET `path` on the admin port of the pod at `ip`, from the node (pod IPs are routed on the
/// host); the whole answer, status line included.
pub fn admin_get(ip: &str, path: &str) -> Result<String> {
    pod_get(ip, PROXY_ADMIN_PORT, path)
}

/// GET `path` over plain HTTP on `port` of the pod at `ip`, from the node; the whole answer,
/// status line included.
pub fn pod_get(ip: &str, port: u16, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect((ip, port))
        .with_context(|| format!("connecting to {ip}:{port}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}
