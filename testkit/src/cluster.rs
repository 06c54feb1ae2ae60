//! The local control plane (`make cluster`) and the local AWS endpoint, as tests use them: the
//! environment file, clients, the project's kubectl and helm, and a namespace per test. A test
//! that needs them and finds them missing fails with a message saying how to start them.

use std::{
    collections::BTreeMap,
    future::Future,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, ServiceAccount},
};
use kube::{
    Api, Client, Config,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use tokio::sync::OnceCell;

use crate::{binary, repo_root};

/// What `make cluster` wrote to `target/cluster/env`: KUBECONFIG, the AWS endpoint and the
/// directory of the project's kubectl and helm.
#[derive(Clone, Debug)]
pub struct ClusterEnv {
    vars: BTreeMap<String, String>,
}

impl ClusterEnv {
    /// Reads the environment file of the running local control plane, or fails saying how to
    /// start one. `ROLEMESH_CLUSTER_ENV` points at another file.
    pub fn load() -> Result<Self> {
        let path = std::env::var_os("ROLEMESH_CLUSTER_ENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target/cluster/env"));
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "the local control plane is not running ({} is missing): start it with \
                 `make cluster`, or run the whole suite with `make test`",
                path.display()
            )
        })?;
        let mut vars = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            let Some(rest) = line.strip_prefix("export ") else {
                continue;
            };
            if let Some((key, value)) = rest.split_once('=') {
                vars.insert(key.to_string(), value.trim_matches('\'').to_string());
            }
        }
        for required in ["KUBECONFIG", "AWS_ENDPOINT_URL", "ROLEMESH_TOOLS_BIN"] {
            if !vars.contains_key(required) {
                bail!(
                    "{} lacks {required}; restart with `make cluster`",
                    path.display()
                );
            }
        }
        Ok(Self { vars })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }

    pub fn kubeconfig(&self) -> PathBuf {
        PathBuf::from(&self.vars["KUBECONFIG"])
    }

    pub fn aws_endpoint(&self) -> &str {
        &self.vars["AWS_ENDPOINT_URL"]
    }

    pub fn tool(&self, name: &str) -> PathBuf {
        Path::new(&self.vars["ROLEMESH_TOOLS_BIN"]).join(name)
    }

    /// The chart's values for this cluster that `make cluster` writes (docs/development.md):
    /// rolemesh's images as built here and the local AWS endpoint for the controller.
    pub fn chart_values(&self) -> Result<PathBuf> {
        let path = self.kubeconfig().with_file_name("values.yaml");
        if !path.is_file() {
            bail!(
                "{} is missing: restart the cluster with `make cluster`",
                path.display()
            );
        }
        Ok(path)
    }

    /// Every variable, for passing to a child process.
    pub fn vars(&self) -> impl Iterator<Item = (&String, &String)> {
        self.vars.iter()
    }

    /// A kube client for the local control plane.
    pub async fn client(&self) -> Result<Client> {
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig())?;
        let config =
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    /// An AWS SDK config aimed at the local AWS endpoint with the dummy credentials.
    pub async fn aws_config(&self) -> aws_config::SdkConfig {
        let region = self.get("AWS_REGION").unwrap_or("us-east-1").to_string();
        let credentials = aws_sdk_kms::config::Credentials::new(
            self.get("AWS_ACCESS_KEY_ID").unwrap_or("testing"),
            self.get("AWS_SECRET_ACCESS_KEY").unwrap_or("testing"),
            None,
            None,
            "rolemesh-testkit",
        );
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region))
            .endpoint_url(self.aws_endpoint())
            .credentials_provider(credentials)
            .load()
            .await
    }

    /// Creates an IAM role (in the local AWS endpoint) whose trust policy admits web-identity
    /// tokens of exactly `namespace/service_account`, as an IRSA role on EKS does. Returns its ARN.
    pub async fn create_irsa_role(
        &self,
        role_name: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<String> {
        let iam = aws_sdk_iam::Client::new(&self.aws_config().await);
        let created = iam
            .create_role()
            .role_name(role_name)
            .assume_role_policy_document(irsa_trust(namespace, service_account))
            .send()
            .await
            .with_context(|| format!("creating IAM role {role_name}"))?;
        Ok(created
            .role()
            .map(|r| r.arn().to_string())
            .unwrap_or_default())
    }

    /// Replaces the trust policy of IAM role `role_name` with one that admits only
    /// `namespace/service_account`, as an administrator taking a role away from a workload does.
    pub async fn set_irsa_trust(
        &self,
        role_name: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<()> {
        let iam = aws_sdk_iam::Client::new(&self.aws_config().await);
        iam.update_assume_role_policy()
            .role_name(role_name)
            .policy_document(irsa_trust(namespace, service_account))
            .send()
            .await
            .with_context(|| format!("updating the trust policy of IAM role {role_name}"))?;
        Ok(())
    }

    /// Creates a P-256 signing key in the local KMS, as a KMS signer's CA key is; returns its ARN
    /// and key id.
    pub async fn create_kms_key(&self, description: &str) -> Result<(String, String)> {
        let kms = aws_sdk_kms::Client::new(&self.aws_config().await);
        let key = kms
            .create_key()
            .key_spec(aws_sdk_kms::types::KeySpec::EccNistP256)
            .key_usage(aws_sdk_kms::types::KeyUsageType::SignVerify)
            .description(description)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!(aws_sdk_kms::error::DisplayErrorContext(e).to_string()))
            .context("creating a KMS key")?;
        let meta = key.key_metadata().context("KMS returned no key")?;
        Ok((
            meta.arn().unwrap_or(meta.key_id()).to_string(),
            meta.key_id().to_string(),
        ))
    }

    /// Runs one of the project's tools (`kubectl`, `helm`) against the local control plane.
    pub fn run(&self, tool: &str, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        let mut command = Command::new(self.tool(tool));
        command.args(args);
        for (key, value) in self.vars() {
            command.env(key, value);
        }
        run_with_stdin(command, stdin).with_context(|| format!("running {tool} {args:?}"))
    }

    /// Runs kubectl and fails unless it succeeds; returns its stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let output = self.run("kubectl", args, None)?;
        expect_success("kubectl", args, &output)
    }

    /// `kubectl explain FIELD`, retried for a while: the API server publishes a new CRD's schema
    /// to OpenAPI some seconds after the CRD is Established.
    pub async fn explain(&self, field: &str) -> Result<String> {
        crate::eventually(
            &format!("kubectl explain {field}"),
            std::time::Duration::from_secs(60),
            || async { self.kubectl(&["explain", field]).map(Some) },
        )
        .await
    }

    /// `kubectl rolemesh ARGS`: the plugin as kubectl finds it on PATH (the workspace's built
    /// `kubectl-rolemesh`, see [`binary`]). Returns exit code, stdout and stderr.
    pub fn kubectl_plugin(&self, args: &[&str]) -> Result<(i32, String, String)> {
        let plugin = binary("kubectl-rolemesh")?;
        let plugin_dir = plugin.parent().context("the plugin's directory")?;
        let kubectl = self.tool("kubectl");
        let path = format!(
            "{}:{}:{}",
            kubectl.parent().context("tools dir")?.display(),
            plugin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut command = Command::new(&kubectl);
        for (key, value) in self.vars() {
            command.env(key, value);
        }
        let output = command
            .env("PATH", path)
            .arg("rolemesh")
            .args(args)
            .output()?;
        Ok((
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }

    /// `kubectl apply -f -` with the given manifest; returns the whole output so callers can
    /// check refusals.
    pub fn kubectl_apply(&self, namespace: &str, manifest: &str) -> Result<Output> {
        self.run(
            "kubectl",
            &["apply", "-n", namespace, "-f", "-"],
            Some(manifest),
        )
    }
}

fn run_with_stdin(mut command: Command, stdin: Option<&str>) -> std::io::Result<Output> {
    use std::io::Write;
    use std::process::Stdio;
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    command.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = command.spawn()?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())?;
    }
    child.wait_with_output()
}

/// Fails with the command's stderr unless it exited 0; returns stdout.
pub fn expect_success(tool: &str, args: &[&str], output: &Output) -> Result<String> {
    if !output.status.success() {
        bail!(
            "{tool} {args:?} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

static CLUSTER: OnceCell<ClusterEnv> = OnceCell::const_new();
static CRDS: OnceCell<()> = OnceCell::const_new();

/// The running local control plane; fails the test (never skips) when it is not there.
pub async fn cluster() -> Result<ClusterEnv> {
    CLUSTER
        .get_or_try_init(|| async {
            let env = ClusterEnv::load()?;
            let client = env.client().await?;
            client.apiserver_version().await.context(
                "the local control plane does not answer: restart it with `make cluster`",
            )?;
            Ok::<_, anyhow::Error>(env)
        })
        .await
        .cloned()
}

/// The node `make cluster` registers.
pub const NODE: &str = "rolemesh-node";

/// The running local cluster with its node Ready; fails (never skips) when either is missing.
pub async fn node_ready() -> Result<ClusterEnv> {
    let env = cluster().await?;
    let ready = env
        .kubectl(&[
            "get",
            "node",
            NODE,
            "-o",
            r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
        ])
        .context("the local cluster has no node: restart it with `make cluster`")?;
    if ready != "True" {
        bail!("node {NODE} is not Ready (Ready={ready:?})");
    }
    Ok(env)
}

/// Applies rolemesh's CRDs (generated YAML under deploy/) with the real kubectl and waits until
/// the API server serves them. Safe to call from every test.
pub async fn install_crds(env: &ClusterEnv) -> Result<()> {
    CRDS.get_or_try_init(|| async {
        let path = repo_root().join(rolemesh_crds::PLAIN_CRDS_PATH);
        let path = path.to_string_lossy().into_owned();
        env.kubectl(&["apply", "--server-side", "--force-conflicts", "-f", &path])?;
        env.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/mtlspolicies.rolemesh.dev",
            "crd/mtlsauthorities.rolemesh.dev",
        ])?;
        Ok::<_, anyhow::Error>(())
    })
    .await
    .copied()
}

/// A namespace that exists for one test.
#[derive(Clone)]
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
    pub env: ClusterEnv,
}

impl TestNamespace {
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Server-side applies `body` (a whole object as JSON) as object `name` of the namespace,
    /// taking every field over, as `kubectl apply --server-side --force-conflicts` does.
    pub async fn apply<K>(&self, name: &str, body: serde_json::Value) -> Result<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        <K as kube::Resource>::DynamicType: Default,
    {
        self.api::<K>()
            .patch(
                name,
                &PatchParams::apply("rolemesh-testkit").force(),
                &Patch::Apply(body),
            )
            .await
            .with_context(|| format!("applying {name}"))
    }

    /// `kubectl apply -f -` of `manifest` (YAML, any number of objects) in this namespace;
    /// fails with kubectl's message unless it succeeds.
    pub fn apply_manifest(&self, manifest: &str) -> Result<()> {
        let output = self.env.kubectl_apply(&self.name, manifest)?;
        expect_success("kubectl", &["apply"], &output)?;
        Ok(())
    }

    /// Waits until pod `pod` of this namespace is Ready.
    pub async fn wait_pod_ready(&self, pod: &str, timeout: std::time::Duration) -> Result<()> {
        crate::eventually(&format!("pod {pod} Ready"), timeout, || async {
            let ready = self.env.kubectl(&[
                "get",
                "pod",
                pod,
                "-n",
                &self.name,
                "-o",
                r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
            ])?;
            Ok((ready == "True").then_some(()))
        })
        .await
    }

    /// Creates ServiceAccount `name` and mints it a 10-minute token for `audience`, as kubelet
    /// projects one into an IRSA pod; returns the token (a JWT).
    pub async fn service_account_token(&self, name: &str, audience: &str) -> Result<String> {
        let accounts = self.api::<ServiceAccount>();
        let mut sa = ServiceAccount::default();
        sa.metadata.name = Some(name.into());
        accounts
            .create(&PostParams::default(), &sa)
            .await
            .with_context(|| format!("creating ServiceAccount {name}"))?;
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![audience.into()],
                expiration_seconds: Some(600),
                ..Default::default()
            },
            ..Default::default()
        };
        Ok(accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await?
            .status
            .context("TokenRequest returned no status")?
            .token)
    }

    /// Prints what the namespace holds, for a failed test's output.
    fn dump(&self) {
        let kinds = "all,serviceaccounts,secrets,configmaps,mtlspolicies,events";
        match self.env.run(
            "kubectl",
            &["get", kinds, "-n", &self.name, "-o", "wide"],
            None,
        ) {
            Ok(out) => eprintln!(
                "--- namespace {} at failure ---\n{}{}",
                self.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(error) => eprintln!("could not list namespace {}: {error:#}", self.name),
        }
    }
}

/// Runs `test` in a new namespace named after `prefix`, then deletes the namespace. When the
/// test fails or panics, it first prints what it found in the namespace.
pub async fn in_namespace<F, Fut>(prefix: &str, test: F) -> Result<()>
where
    F: FnOnce(TestNamespace) -> Fut,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let env = cluster().await?;
    let client = env.client().await?;
    let name = crate::unique(prefix);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some(name.clone());
    ns.metadata.labels = Some(BTreeMap::from([(
        "rolemesh.dev/test".to_string(),
        prefix.to_string(),
    )]));
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating test namespace {name}"))?;
    let handle = TestNamespace {
        name: name.clone(),
        client,
        env,
    };
    // The test runs as its own task so that a panic is caught and the namespace still cleaned.
    let outcome = tokio::spawn(test(handle.clone())).await;
    let failed = !matches!(outcome, Ok(Ok(())));
    if failed {
        handle.dump();
    }
    let _ = namespaces.delete(&name, &DeleteParams::background()).await;
    match outcome {
        Ok(result) => result,
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Err(join) => Err(join.into()),
    }
}

/// An IRSA trust policy admitting web-identity tokens of exactly `namespace/service_account`.
fn irsa_trust(namespace: &str, service_account: &str) -> String {
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": {"Federated": "arn:aws:iam::123456789012:oidc-provider/localkube"},
            "Action": "sts:AssumeRoleWithWebIdentity",
            "Condition": {"StringEquals": {
                "localkube:sub": format!("system:serviceaccount:{namespace}:{service_account}"),
                "localkube:aud": "sts.amazonaws.com",
            }},
        }],
    })
    .to_string()
}
