//! `bench-controller`: the controller part of `make bench`. Runs the release `rolemesh-controller`
//! binary against the local control plane and the local AWS endpoint and prints figures and
//! ratios next to their targets; it fails only when a scenario could not run, never because a
//! target was missed (the machine is shared and noisy, so figures are reported, not asserted).
//!
//! Scenarios, each in namespaces of its own that are deleted at the end:
//! - issue:  time for the idle controller to issue N ServiceAccounts (identityVerification none),
//!   as a ratio to a bare kube client creating N Secrets of the same size at the same concurrency.
//! - kms:    KMS Sign calls per issued certificate with the kms signer.
//! - sts:    issuance rate with STS verification of IRSA tokens (informational).
//! - memory: controller RSS with many covered ServiceAccounts, then again with many unrelated
//!   large Secrets in the watched namespace.
//! - scale:  50,000 ServiceAccounts across 500 policies in 50 namespaces, one controller watching
//!   every namespace: time to issue all, RSS, CPU of each side, and the API requests per issued
//!   certificate counted by the API server itself (`apiserver_request_total` on its /metrics).

use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Secret, ServiceAccount},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
    core::PartialObjectMeta,
    runtime::{WatchStreamExt, watcher},
};
use rolemesh_bench::stats::{cpu_ms, machine_ticks, median, rss_kib};
use rolemesh_crds::{MTLSAuthority, MTLSPolicy};
use rolemesh_testkit::{
    ClusterEnv, cluster, http_get, install_crds, metric_sum, repo_root, try_free_port as free_port,
    unique,
};
use serde_json::json;

const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=rolemesh";
const ROLE_ANNOTATION: &str = "eks.amazonaws.com/role-arn";

/// Benchmarks of the rolemesh controller on the local control plane (`make cluster`).
#[derive(Debug, Parser)]
#[command(name = "bench-controller")]
struct Args {
    /// The controller binary to run (build it with `cargo build --release -p rolemesh-controller`).
    #[arg(long, env = "ROLEMESH_BENCH_CONTROLLER")]
    controller: Option<PathBuf>,
    /// Scenarios to run, comma-separated: issue, kms, sts, memory, scale.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "issue,kms,sts,memory,scale"
    )]
    scenarios: Vec<String>,
    /// The controller's --issue-concurrency, and the bare client's requests in flight.
    #[arg(long, default_value_t = 16)]
    issue_concurrency: usize,
    /// ServiceAccounts issued per round of the issue scenario.
    #[arg(long, default_value_t = 1000)]
    issue_count: usize,
    /// Rounds of the issue scenario (controller and bare client alternate; medians reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// ServiceAccounts of the kms scenario.
    #[arg(long, default_value_t = 200)]
    kms_count: usize,
    /// ServiceAccounts (each with its own IAM role) of the sts scenario.
    #[arg(long, default_value_t = 100)]
    sts_count: usize,
    /// Covered ServiceAccounts of the memory scenario.
    #[arg(long, default_value_t = 10_000)]
    memory_count: usize,
    /// ServiceAccounts per MTLSPolicy in the memory scenario (a policy's status lists each one).
    #[arg(long, default_value_t = 1000)]
    memory_per_policy: usize,
    /// Unrelated Secrets added in the second memory run.
    #[arg(long, default_value_t = 10_000)]
    unrelated_count: usize,
    /// Bytes of data in each unrelated Secret.
    #[arg(long, default_value_t = 32 * 1024)]
    unrelated_bytes: usize,
    /// ServiceAccounts of the scale scenario.
    #[arg(long, default_value_t = 50_000)]
    scale_count: usize,
    /// MTLSPolicies of the scale scenario (each covers scale_count / scale_policies).
    #[arg(long, default_value_t = 500)]
    scale_policies: usize,
    /// Namespaces the scale scenario spreads its policies over.
    #[arg(long, default_value_t = 50)]
    scale_namespaces: usize,
    /// Requests in flight while creating the objects a scenario starts from.
    #[arg(long, default_value_t = 32)]
    setup_concurrency: usize,
    /// RSS samples per memory run (one a second; the median is reported).
    #[arg(long, default_value_t = 5)]
    rss_samples: usize,
}

fn main() -> Result<()> {
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

/// One line of the final table.
struct Row {
    metric: String,
    measured: String,
    target: String,
    ok: Option<bool>,
}

impl Row {
    fn new(metric: &str, measured: String, target: &str, ok: Option<bool>) -> Self {
        Self {
            metric: metric.into(),
            measured,
            target: target.into(),
            ok,
        }
    }
}

struct Bench {
    args: Args,
    env: ClusterEnv,
    client: Client,
    controller_bin: PathBuf,
    log_dir: PathBuf,
    namespaces: Vec<String>,
    authorities: Vec<String>,
    roles: Vec<String>,
    rows: Vec<Row>,
}

async fn run(args: Args) -> Result<()> {
    let env = cluster().await?;
    install_crds(&env).await?;
    let client = env.client().await?;
    let controller_bin = args
        .controller
        .clone()
        .unwrap_or_else(|| repo_root().join("target/release/rolemesh-controller"));
    if !controller_bin.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release -p rolemesh-controller`",
            controller_bin.display()
        );
    }
    let log_dir = repo_root().join("target/bench-logs");
    std::fs::create_dir_all(&log_dir)?;
    let mut bench = Bench {
        args,
        env,
        client,
        controller_bin,
        log_dir,
        namespaces: Vec::new(),
        authorities: Vec::new(),
        roles: Vec::new(),
        rows: Vec::new(),
    };
    println!(
        "controller {} | --issue-concurrency {} | {} cores | logs in {}",
        bench.controller_bin.display(),
        bench.args.issue_concurrency,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        bench.log_dir.display()
    );
    let started = Instant::now();
    let mut failed = Vec::new();
    for scenario in bench.args.scenarios.clone() {
        println!("\n== {scenario} ==");
        let scenario_started = Instant::now();
        let outcome = match scenario.as_str() {
            "issue" => bench.issue().await,
            "kms" => bench.kms().await,
            "sts" => bench.sts().await,
            "memory" => bench.memory().await,
            "scale" => bench.scale().await,
            other => Err(anyhow::anyhow!(
                "unknown scenario {other} (issue, kms, sts, memory, scale)"
            )),
        };
        bench.cleanup().await;
        match outcome {
            Ok(()) => println!(
                "({scenario} took {:.0} s)",
                scenario_started.elapsed().as_secs_f64()
            ),
            Err(error) => {
                println!("{scenario} could not run: {error:#}");
                bench.rows.push(Row::new(
                    &scenario,
                    "could not run".into(),
                    "-",
                    Some(false),
                ));
                failed.push(scenario);
            }
        }
    }
    println!(
        "\n== controller benchmark summary ({:.0} s) ==",
        started.elapsed().as_secs_f64()
    );
    print!("{}", table(&bench.rows));
    if !failed.is_empty() {
        bail!("scenarios that could not run: {}", failed.join(", "));
    }
    Ok(())
}

fn table(rows: &[Row]) -> String {
    let header = ["metric", "measured", "target", "ok?"];
    let cells: Vec<[String; 4]> = rows
        .iter()
        .map(|r| {
            [
                r.metric.clone(),
                r.measured.clone(),
                r.target.clone(),
                match r.ok {
                    Some(true) => "yes".into(),
                    Some(false) => "NO".into(),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, row: &[String; 4]| {
        let _ = writeln!(
            out,
            "{:<w0$} | {:>w1$} | {:<w2$} | {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    };
    line(&mut out, &header.map(String::from));
    let _ = writeln!(
        out,
        "{}-+-{}-+-{}-+-{}",
        "-".repeat(widths[0]),
        "-".repeat(widths[1]),
        "-".repeat(widths[2]),
        "-".repeat(widths[3])
    );
    for row in &cells {
        line(&mut out, row);
    }
    out
}

/// A running controller; killed when dropped.
struct ControllerProcess {
    child: Child,
    metrics_port: u16,
    log_path: PathBuf,
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ControllerProcess {
    async fn metrics(&self) -> Result<String> {
        http_get(self.metrics_port, "/metrics").await
    }

    /// The sum of every sample of metric `name` whose labels contain `labels` (e.g.
    /// `signer="kms"`; empty for all).
    async fn metric(&self, name: &str, labels: &str) -> Result<f64> {
        Ok(metric_sum(&self.metrics().await?, name, labels))
    }

    /// VmRSS from /proc, in MiB.
    fn rss_mib(&self) -> Result<f64> {
        match rss_kib(self.child.id()) {
            0 => bail!("no VmRSS in /proc/{}/status", self.child.id()),
            kib => Ok(kib as f64 / 1024.0),
        }
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                Some(format!(
                    "the controller exited ({status}); last log lines:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ))
            }
            _ => None,
        }
    }
}

/// A selector on the label `bench` (the ServiceAccounts of one policy).
fn policy_spec(group: &str) -> serde_json::Value {
    json!({ "serviceAccounts": { "selector": { "matchLabels": { "bench": group } } } })
}

impl Bench {
    async fn namespace(&mut self, prefix: &str) -> Result<String> {
        let name = unique(prefix);
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([(
                    "rolemesh.dev/test".to_string(),
                    prefix.to_string(),
                )])),
                ..Default::default()
            },
            ..Default::default()
        };
        api.create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        self.namespaces.push(name.clone());
        Ok(name)
    }

    async fn authority(&mut self, spec: serde_json::Value) -> Result<String> {
        let name = unique("bench");
        let api: Api<MTLSAuthority> = Api::all(self.client.clone());
        let authority: MTLSAuthority = serde_json::from_value(json!({
            "apiVersion": "rolemesh.dev/v1alpha1",
            "kind": "MTLSAuthority",
            "metadata": { "name": name, "labels": { "rolemesh.dev/test": "bench" } },
            "spec": spec,
        }))?;
        api.create(&PostParams::default(), &authority)
            .await
            .context("creating MTLSAuthority")?;
        self.authorities.push(name.clone());
        Ok(name)
    }

    fn local_authority(verification: &str) -> serde_json::Value {
        json!({
            "trustDomain": "bench.test",
            "signer": { "type": "local", "local": { "secretName": "rolemesh-ca-key" } },
            "identityVerification": verification,
        })
    }

    /// Creates `count` ServiceAccounts `sa-<i>` labelled `bench=<group(i)>`, with the IRSA
    /// annotation `role(i)`, `setup_concurrency` requests in flight.
    async fn service_accounts(
        &self,
        namespace: &str,
        count: usize,
        group: impl Fn(usize) -> String,
        role: impl Fn(usize) -> String,
    ) -> Result<Duration> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let started = Instant::now();
        stream::iter(0..count)
            .map(|i| {
                let api = api.clone();
                let sa = ServiceAccount {
                    metadata: ObjectMeta {
                        name: Some(format!("sa-{i}")),
                        labels: Some(BTreeMap::from([("bench".to_string(), group(i))])),
                        annotations: Some(BTreeMap::from([(ROLE_ANNOTATION.to_string(), role(i))])),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                async move { api.create(&PostParams::default(), &sa).await }
            })
            .buffer_unordered(self.args.setup_concurrency)
            .try_for_each(|_| futures::future::ready(Ok(())))
            .await
            .context("creating ServiceAccounts")?;
        Ok(started.elapsed())
    }

    async fn policy(&self, namespace: &str, name: &str, spec: serde_json::Value) -> Result<()> {
        let api: Api<MTLSPolicy> = Api::namespaced(self.client.clone(), namespace);
        let policy: MTLSPolicy = serde_json::from_value(json!({
            "apiVersion": "rolemesh.dev/v1alpha1", "kind": "MTLSPolicy",
            "metadata": { "name": name }, "spec": spec,
        }))?;
        api.create(&PostParams::default(), &policy)
            .await
            .with_context(|| format!("creating MTLSPolicy {namespace}/{name}"))?;
        Ok(())
    }

    fn start_controller(&self, namespace: &str, authority: &str) -> Result<ControllerProcess> {
        self.start_controller_watching(namespace, Some(namespace), authority)
    }

    /// A controller living in `namespace` that watches `watch`, or every namespace.
    fn start_controller_watching(
        &self,
        namespace: &str,
        watch: Option<&str>,
        authority: &str,
    ) -> Result<ControllerProcess> {
        let metrics_port = free_port()?;
        let log_path = self
            .log_dir
            .join(format!("controller-{namespace}-{}.log", unique("run")));
        let log = std::fs::File::create(&log_path)?;
        let mut command = Command::new(&self.controller_bin);
        for (key, value) in self.env.vars() {
            command.env(key, value);
        }
        command
            .env("POD_NAME", format!("bench-{namespace}"))
            // ROLEMESH_BENCH_LOG sets the controller's log filter (e.g. to trace a stall).
            .env(
                "RUST_LOG",
                std::env::var("ROLEMESH_BENCH_LOG").unwrap_or_else(|_| "info".into()),
            )
            .args(["--namespace", namespace])
            .args(
                watch
                    .map(|w| ["--watch-namespace", w])
                    .into_iter()
                    .flatten(),
            )
            .args(["--authority", authority])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args([
                "--issue-concurrency",
                &self.args.issue_concurrency.to_string(),
            ])
            .args(["--leader-election", "false"])
            // Nothing of the shared cluster's webhook is touched.
            .args(["--webhook-service=", "--webhook-configuration="])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", self.controller_bin.display()))?;
        Ok(ControllerProcess {
            child,
            metrics_port,
            log_path,
        })
    }

    /// Waits until the controller has established the CA of `authority` (its status says
    /// Ready) and its metrics answer: from then on it is idle until a policy appears.
    async fn wait_ca(&self, controller: &mut ControllerProcess, authority: &str) -> Result<()> {
        let api: Api<MTLSAuthority> = Api::all(self.client.clone());
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(exit) = controller.exited() {
                bail!(exit);
            }
            let ready = api
                .get_opt(authority)
                .await?
                .and_then(|a| a.status)
                .is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                });
            if ready && controller.metrics().await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "MTLSAuthority {authority} not Ready after 120 s; see {}",
                    controller.log_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the reconcile count has not moved for `quiet` and at least `min` ran; after
    /// `limit` it goes on with a note instead (the figures are still worth having).
    async fn wait_settled(
        &self,
        controller: &mut ControllerProcess,
        min: f64,
        quiet: Duration,
        limit: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + limit;
        let mut last = -1.0;
        let mut since = Instant::now();
        loop {
            if let Some(exit) = controller.exited() {
                bail!(exit);
            }
            let count = controller
                .metric("rolemesh_reconciles_total", "")
                .await
                .unwrap_or(-1.0);
            if count != last {
                last = count;
                since = Instant::now();
            } else if count >= min && since.elapsed() >= quiet {
                return Ok(());
            }
            if Instant::now() > deadline {
                println!(
                    "  note: {last} reconciles after {limit:?}, expected at least {min} and then quiet for {quiet:?}; going on"
                );
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Deletes what the scenarios made and waits until their namespaces are gone: the API server
    /// deleting tens of thousands of objects in the background would otherwise take the CPU from
    /// whatever `make bench` measures next.
    async fn cleanup(&mut self) {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let deleted: Vec<String> = self.namespaces.drain(..).collect();
        for name in &deleted {
            let _ = namespaces.delete(name, &DeleteParams::background()).await;
        }
        let authorities: Api<MTLSAuthority> = Api::all(self.client.clone());
        for name in self.authorities.drain(..) {
            let _ = authorities.delete(&name, &DeleteParams::default()).await;
        }
        if !self.roles.is_empty() {
            let iam = aws_sdk_iam::Client::new(&self.env.aws_config().await);
            for role in self.roles.drain(..) {
                let _ = iam.delete_role().role_name(role).send().await;
            }
        }
        let started = Instant::now();
        let limit = Duration::from_secs(900);
        loop {
            let mut left = 0;
            for name in &deleted {
                if !matches!(namespaces.get_opt(name).await, Ok(None)) {
                    left += 1;
                }
            }
            if left == 0 {
                break;
            }
            if started.elapsed() > limit {
                println!("note: {left} benchmark namespaces still being deleted after {limit:?}");
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if !deleted.is_empty() {
            println!(
                "deleted {} benchmark namespaces in {:.0} s",
                deleted.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }

    /// Watches the managed Secrets of `namespace` until `count` distinct ones have been seen;
    /// returns when that happened. Start it before the action it times.
    fn watch_secrets(
        &self,
        namespace: &str,
        count: usize,
        timeout: Duration,
    ) -> tokio::task::JoinHandle<Result<Instant>> {
        // Metadata only: the bench shares the CPU with the controller and should decode little.
        self.watch_managed_secrets(
            Api::namespaced(self.client.clone(), namespace),
            count,
            timeout,
        )
    }

    fn watch_managed_secrets(
        &self,
        api: Api<PartialObjectMeta<Secret>>,
        count: usize,
        timeout: Duration,
    ) -> tokio::task::JoinHandle<Result<Instant>> {
        tokio::spawn(async move {
            let mut seen: HashSet<(String, String)> = HashSet::new();
            let events =
                watcher(api, watcher::Config::default().labels(MANAGED_SELECTOR)).applied_objects();
            let wait = async {
                let mut events = std::pin::pin!(events);
                while let Some(secret) = events.try_next().await? {
                    seen.insert((secret.namespace().unwrap_or_default(), secret.name_any()));
                    if seen.len() >= count {
                        return Ok::<_, anyhow::Error>(Instant::now());
                    }
                }
                bail!("the watch of Secrets ended")
            };
            match tokio::time::timeout(timeout, wait).await {
                Ok(result) => result,
                Err(_) => bail!("only {} of {count} Secrets after {timeout:?}", seen.len()),
            }
        })
    }

    /// Starts a controller and waits until its CA is in force.
    async fn running_controller(
        &self,
        namespace: &str,
        authority: &str,
    ) -> Result<ControllerProcess> {
        let mut controller = self.start_controller(namespace, authority)?;
        self.wait_ca(&mut controller, authority).await?;
        Ok(controller)
    }

    /// Times the issuance of `count` certificates by one policy covering every ServiceAccount
    /// labelled for it.
    async fn time_one_policy(
        &self,
        controller: &mut ControllerProcess,
        namespace: &str,
        count: usize,
    ) -> Result<Duration> {
        self.time_issuance(
            controller,
            namespace,
            &[("bench".into(), policy_spec("yes"))],
            count,
            Duration::from_secs(600),
        )
        .await
    }

    /// Applies `policies` (name, spec) and times until `count` managed Secrets exist.
    async fn time_issuance(
        &self,
        controller: &mut ControllerProcess,
        namespace: &str,
        policies: &[(String, serde_json::Value)],
        count: usize,
        timeout: Duration,
    ) -> Result<Duration> {
        let watch = self.watch_secrets(namespace, count, timeout);
        // The watch's initial list is done before the clock starts; the namespace has no
        // managed Secrets yet, so nothing is missed either way.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        for (name, spec) in policies {
            self.policy(namespace, name, spec.clone()).await?;
        }
        let done = tokio::select! {
            done = watch => done??,
            exit = async {
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if let Some(exit) = controller.exited() {
                        break exit;
                    }
                }
            } => bail!(exit),
        };
        Ok(done - started)
    }

    /// (a) Issuance throughput against a bare client writing Secrets of the same size.
    async fn issue(&mut self) -> Result<()> {
        let n = self.args.issue_count;
        let concurrency = self.args.issue_concurrency;
        println!(
            "{n} ServiceAccounts per round, {} rounds, identityVerification none (STS verification: the sts scenario)",
            self.args.rounds
        );
        let mut controller_rates = Vec::new();
        let mut bare_rates = Vec::new();
        let mut template: Option<Secret> = None;
        for round in 0..self.args.rounds.max(1) {
            // Alternate which side runs first so that neither always meets a busier machine.
            let bare_first = round % 2 == 1 && template.is_some();
            if bare_first && let Some(t) = &template {
                bare_rates.push(self.bare_round(round, t, n, concurrency).await?);
            }
            let (rate, issued) = self.controller_round(round, n).await?;
            controller_rates.push(rate);
            let t = template.get_or_insert(issued);
            if !bare_first {
                let t = t.clone();
                bare_rates.push(self.bare_round(round, &t, n, concurrency).await?);
            }
        }
        let controller_rate = median(controller_rates.iter().copied());
        let bare_rate = median(bare_rates.iter().copied());
        let ratio = controller_rate / bare_rate;
        // Each round's pair ran back to back: their ratios show how far one run can move.
        let ratios: Vec<f64> = controller_rates
            .iter()
            .zip(&bare_rates)
            .map(|(c, b)| c / b)
            .collect();
        let (low, high) = ratios
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), r| (l.min(*r), h.max(*r)));
        let listed: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!("ratio per round: {}", listed.join(" "));
        let size = template.as_ref().map_or(0, secret_data_bytes);
        println!(
            "median: controller {controller_rate:.0} certificates/s, bare client {bare_rate:.0} Secrets/s ({size} B each): ratio {ratio:.2}"
        );
        self.rows.push(Row::new(
            &format!("issue {n} SAs: controller rate (median)"),
            format!(
                "{controller_rate:.0}/s ({:.1} s)",
                n as f64 / controller_rate
            ),
            "-",
            None,
        ));
        self.rows.push(Row::new(
            &format!("create {n} {size} B Secrets: bare client rate (median)"),
            format!("{bare_rate:.0}/s ({:.1} s)", n as f64 / bare_rate),
            "-",
            None,
        ));
        self.rows.push(Row::new(
            "issue rate / bare Secret rate (median; rounds' low-high)",
            format!("{ratio:.2} ({low:.2}-{high:.2})"),
            ">= 0.8",
            Some(low >= 0.8),
        ));
        Ok(())
    }

    /// One controller round: returns certificates per second and one issued Secret.
    async fn controller_round(&mut self, round: usize, n: usize) -> Result<(f64, Secret)> {
        let namespace = self.namespace("bench-issue").await?;
        self.service_accounts(
            &namespace,
            n,
            |_| "yes".into(),
            |i| format!("arn:aws:iam::123456789012:role/bench-{i}"),
        )
        .await?;
        let authority = self.authority(Self::local_authority("none")).await?;
        let mut controller = self.running_controller(&namespace, &authority).await?;
        // Idle: the CA is in force and the ServiceAccounts are cached, no policy exists yet.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cpu = CpuSample::take(Some(controller.child.id()));
        let elapsed = self.time_one_policy(&mut controller, &namespace, n).await?;
        let cpu_used = cpu.since(Some(controller.child.id()));
        let rate = n as f64 / elapsed.as_secs_f64();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let issued = controller
            .metric("rolemesh_certificates_issued_total", "")
            .await?;
        let rss = controller.rss_mib()?;
        drop(controller);
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &namespace);
        let secret = api.get("sa-0-rolemesh-tls").await?;
        println!(
            "round {round}: controller issued {n} in {:.2} s = {rate:.0}/s (issued_total {issued}, RSS {rss:.1} MiB, Secret data {} B)",
            elapsed.as_secs_f64(),
            secret_data_bytes(&secret)
        );
        println!("  {cpu_used}");
        if issued as usize != n {
            println!("  note: {issued} certificates issued for {n} ServiceAccounts");
        }
        Ok((rate, secret))
    }

    /// One bare-client round: a fresh client from the same kubeconfig creates `n` Secrets with
    /// `template`'s type and data, `concurrency` in flight. Returns Secrets per second.
    async fn bare_round(
        &mut self,
        round: usize,
        template: &Secret,
        n: usize,
        concurrency: usize,
    ) -> Result<f64> {
        let namespace = self.namespace("bench-bare").await?;
        let client = self.env.client().await?;
        let api: Api<Secret> = Api::namespaced(client, &namespace);
        let cpu = CpuSample::take(None);
        let started = Instant::now();
        stream::iter(0..n)
            .map(|i| {
                let api = api.clone();
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(format!("sa-{i}-rolemesh-tls")),
                        labels: template.metadata.labels.clone(),
                        ..Default::default()
                    },
                    type_: template.type_.clone(),
                    data: template.data.clone(),
                    ..Default::default()
                };
                async move { api.create(&PostParams::default(), &secret).await }
            })
            .buffer_unordered(concurrency)
            .try_for_each(|_| futures::future::ready(Ok(())))
            .await
            .context("creating Secrets with the bare client")?;
        let elapsed = started.elapsed();
        let cpu_used = cpu.since(None);
        let rate = n as f64 / elapsed.as_secs_f64();
        println!(
            "round {round}: bare client created {n} Secrets in {:.2} s = {rate:.0}/s ({concurrency} in flight)",
            elapsed.as_secs_f64()
        );
        println!("  {cpu_used}");
        Ok(rate)
    }

    /// (b) KMS Sign calls per issued certificate.
    async fn kms(&mut self) -> Result<()> {
        let n = self.args.kms_count;
        let (key_arn, key_id) = self
            .env
            .create_kms_key("rolemesh controller benchmark CA")
            .await?;
        let outcome = async {
            let namespace = self.namespace("bench-kms").await?;
            self.service_accounts(
                &namespace,
                n,
                |_| "yes".into(),
                |i| format!("arn:aws:iam::123456789012:role/bench-{i}"),
            )
            .await?;
            let authority = self
                .authority(json!({
                    "trustDomain": "bench.test",
                    "signer": { "type": "kms", "kms": { "keyId": key_arn, "region": "us-east-1" } },
                    "identityVerification": "none",
                }))
                .await?;
            let mut controller = self.running_controller(&namespace, &authority).await?;
            let before = controller
                .metric("rolemesh_signer_sign_calls_total", "signer=\"kms\"")
                .await?;
            let elapsed = self
                .time_one_policy(&mut controller, &namespace, n)
                .await?;
            self.wait_settled(
                &mut controller,
                1.0,
                Duration::from_secs(3),
                Duration::from_secs(60),
            )
                .await?;
            // One revocation: a CRL signed through KMS (one Sign) and the workload re-issued.
            let revoke_started = Instant::now();
            self.revoke_one(&namespace, &authority).await?;
            let revoked_in = revoke_started.elapsed();
            self.wait_settled(
                &mut controller,
                1.0,
                Duration::from_secs(3),
                Duration::from_secs(60),
            )
            .await?;
            let calls = controller
                .metric("rolemesh_signer_sign_calls_total", "signer=\"kms\"")
                .await?;
            let issued = controller
                .metric("rolemesh_certificates_issued_total", "")
                .await?;
            let errors = controller
                .metric("rolemesh_signer_sign_errors_total", "")
                .await?;
            // One Sign made the CA, one the CRL.
            let per_cert = (calls - 2.0) / issued;
            println!(
                "kms signer: {issued} certificates for {n} ServiceAccounts in {:.2} s ({:.0}/s), then one revoked and re-issued with its CRL in {:.2} s; Sign calls {calls} ({before} before the policy, for the CA; 1 for the CRL), errors {errors}: (calls - 2) / issued = {per_cert:.3}",
                elapsed.as_secs_f64(),
                n as f64 / elapsed.as_secs_f64(),
                revoked_in.as_secs_f64()
            );
            self.rows.push(Row::new(
                &format!("kms: issue {n} SAs rate"),
                format!("{:.0}/s", n as f64 / elapsed.as_secs_f64()),
                "-",
                None,
            ));
            self.rows.push(Row::new(
                "kms: (Sign calls - 1 CA - 1 CRL) / certificates",
                format!("{per_cert:.3} ({calls}-2)/{issued}"),
                "= 1.0",
                Some((per_cert - 1.0).abs() < 1e-9 && issued as usize == n + 1),
            ));
            Ok::<_, anyhow::Error>(())
        }
        .await;
        let kms = aws_sdk_kms::Client::new(&self.env.aws_config().await);
        let _ = kms
            .schedule_key_deletion()
            .key_id(key_id)
            .pending_window_in_days(7)
            .send()
            .await;
        outcome
    }

    /// Revokes the certificate of one workload of policy `bench` the way `kubectl rolemesh
    /// revoke` does (an annotation on the authority) and waits until the authority lists it and
    /// the workload holds a new one.
    async fn revoke_one(&self, namespace: &str, authority: &str) -> Result<()> {
        let policies: Api<MTLSPolicy> = Api::namespaced(self.client.clone(), namespace);
        let workload = policies
            .get("bench")
            .await?
            .status
            .and_then(|s| s.workloads.into_iter().find(|w| w.serial.is_some()))
            .context("a workload with a certificate")?;
        let serial = workload.serial.clone().unwrap_or_default();
        let not_after = workload
            .not_after
            .map(|t| t.0.to_string())
            .context("the workload's notAfter")?;
        let authorities: Api<MTLSAuthority> = Api::all(self.client.clone());
        authorities
            .patch(
                authority,
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": { "annotations": {
                    format!("{}{serial}", rolemesh_crds::names::REVOKE_ANNOTATION_PREFIX): not_after
                } } })),
            )
            .await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let listed = authorities
                .get(authority)
                .await?
                .status
                .is_some_and(|s| s.revoked.iter().any(|r| r.serial == serial));
            let replaced = policies
                .get("bench")
                .await?
                .status
                .and_then(|s| {
                    s.workloads
                        .into_iter()
                        .find(|w| w.service_account == workload.service_account)
                })
                .and_then(|w| w.serial)
                .is_some_and(|now| now != serial);
            if listed && replaced {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("certificate {serial} was not revoked and re-issued within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Issuance with STS verification of every IRSA token (informational: moto's STS).
    async fn sts(&mut self) -> Result<()> {
        let n = self.args.sts_count;
        if n == 0 {
            println!("skipped (--sts-count 0)");
            return Ok(());
        }
        let namespace = self.namespace("bench-sts").await?;
        let prefix = unique("bench");
        let created: Vec<Result<(String, String)>> = stream::iter(0..n)
            .map(|i| {
                let (env, namespace, name) =
                    (self.env.clone(), namespace.clone(), format!("{prefix}-{i}"));
                async move {
                    env.create_irsa_role(&name, &namespace, &format!("sa-{i}"))
                        .await
                        .map(|arn| (name, arn))
                }
            })
            .buffered(self.args.setup_concurrency)
            .collect()
            .await;
        let mut roles = Vec::with_capacity(n);
        for role in created {
            let (name, arn) = role?;
            self.roles.push(name);
            roles.push(arn);
        }
        self.service_accounts(&namespace, n, |_| "yes".into(), |i| roles[i].clone())
            .await?;
        let authority = self.authority(Self::local_authority("sts")).await?;
        let mut controller = self.running_controller(&namespace, &authority).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let elapsed = self.time_one_policy(&mut controller, &namespace, n).await?;
        let rate = n as f64 / elapsed.as_secs_f64();
        let failures = controller
            .metric("rolemesh_certificate_failures_total", "")
            .await?;
        println!(
            "sts verification: {n} ServiceAccounts (one IAM role each) issued in {:.2} s = {rate:.0}/s; failures {failures}",
            elapsed.as_secs_f64()
        );
        self.rows.push(Row::new(
            &format!("sts: issue {n} SAs with STS verification"),
            format!("{rate:.0}/s ({:.1} s)", elapsed.as_secs_f64()),
            "-",
            None,
        ));
        Ok(())
    }

    /// (c) Controller RSS with many covered ServiceAccounts, without and with unrelated Secrets.
    async fn memory(&mut self) -> Result<()> {
        let n = self.args.memory_count;
        let per_policy = self.args.memory_per_policy.max(1);
        let policies = n.div_ceil(per_policy);
        let namespace = self.namespace("bench-memory").await?;
        let took = self
            .service_accounts(
                &namespace,
                n,
                |i| format!("g{}", i / per_policy),
                |i| format!("arn:aws:iam::123456789012:role/bench-{i}"),
            )
            .await?;
        println!("created {n} ServiceAccounts in {:.1} s", took.as_secs_f64());
        let authority = self.authority(Self::local_authority("none")).await?;
        let mut controller = self.running_controller(&namespace, &authority).await?;
        let specs: Vec<(String, serde_json::Value)> = (0..policies)
            .map(|p| (format!("bench-{p}"), policy_spec(&format!("g{p}"))))
            .collect();
        let elapsed = self
            .time_issuance(
                &mut controller,
                &namespace,
                &specs,
                n,
                Duration::from_secs(900),
            )
            .await?;
        println!(
            "issued {n} certificates ({policies} policies of {per_policy}) in {:.1} s = {:.0}/s",
            elapsed.as_secs_f64(),
            n as f64 / elapsed.as_secs_f64()
        );
        self.wait_settled(
            &mut controller,
            policies as f64,
            Duration::from_secs(5),
            Duration::from_secs(120),
        )
        .await?;
        let after_issuing = self.sample_rss(&mut controller).await?;
        println!("RSS right after issuing (median): {after_issuing:.1} MiB");
        drop(controller);

        // Run 1: a fresh controller over the covered ServiceAccounts and their Secrets.
        let run1 = self.restarted_rss(&namespace, &authority, policies).await?;
        println!("run 1, {n} covered ServiceAccounts + Secrets, restarted: {run1:.1} MiB");

        let took = self.unrelated_secrets(&namespace).await?;
        println!(
            "created {} unrelated {} B Secrets in the watched namespace in {:.1} s",
            self.args.unrelated_count,
            self.args.unrelated_bytes,
            took.as_secs_f64()
        );
        let run2 = self.restarted_rss(&namespace, &authority, policies).await?;
        let added = run2 - run1;
        println!(
            "run 2, plus {} unrelated Secrets, restarted: {run2:.1} MiB (+{added:.1} MiB)",
            self.args.unrelated_count
        );
        let label = format!("{}k", n / 1000);
        self.rows.push(Row::new(
            &format!("memory: issue {label} SAs ({policies} policies)"),
            format!(
                "{:.0}/s ({:.1} s)",
                n as f64 / elapsed.as_secs_f64(),
                elapsed.as_secs_f64()
            ),
            "-",
            None,
        ));
        self.rows.push(Row::new(
            &format!("memory: RSS after issuing {label}"),
            format!("{after_issuing:.1} MiB"),
            "<= 150 MiB",
            Some(after_issuing <= 150.0),
        ));
        self.rows.push(Row::new(
            &format!("memory: RSS run 1, {label} SAs + Secrets"),
            format!("{run1:.1} MiB"),
            "<= 150 MB",
            Some(run1 * 1.048_576 <= 150.0),
        ));
        self.rows.push(Row::new(
            &format!(
                "memory: RSS run 2, + {}k unrelated {} KiB Secrets",
                self.args.unrelated_count / 1000,
                self.args.unrelated_bytes / 1024
            ),
            format!("{run2:.1} MiB"),
            "<= 150 MB",
            Some(run2 * 1.048_576 <= 150.0),
        ));
        self.rows.push(Row::new(
            "memory: added by unrelated Secrets (run 2 - run 1)",
            format!("{added:+.1} MiB"),
            "<= 10 MB",
            Some(added * 1.048_576 <= 10.0),
        ));
        Ok(())
    }

    /// (d) 50,000 ServiceAccounts across 500 policies in 50 namespaces, issued at once by one
    /// controller that watches every namespace.
    async fn scale(&mut self) -> Result<()> {
        let n = self.args.scale_count;
        let policies = self.args.scale_policies.max(1);
        let namespaces = self.args.scale_namespaces.clamp(1, policies);
        let per_policy = n.div_ceil(policies);
        let per_namespace = policies.div_ceil(namespaces);
        println!(
            "{n} ServiceAccounts, {policies} policies of {per_policy}, {namespaces} namespaces of {per_namespace} policies; one controller watching every namespace"
        );
        let home = self.namespace("bench-scale-home").await?;
        let mut names = Vec::with_capacity(namespaces);
        for _ in 0..namespaces {
            names.push(self.namespace("bench-scale").await?);
        }
        let started = Instant::now();
        // ServiceAccount i is in policy i / per_policy, which lives in namespace policy / per_namespace.
        let policy_of = |i: usize| i / per_policy;
        for (k, namespace) in names.iter().enumerate() {
            let first = k * per_namespace * per_policy;
            let last = ((k + 1) * per_namespace * per_policy).min(n);
            if first >= last {
                continue;
            }
            let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
            stream::iter(first..last)
                .map(|i| {
                    let api = api.clone();
                    let sa = ServiceAccount {
                        metadata: ObjectMeta {
                            name: Some(format!("sa-{i}")),
                            labels: Some(BTreeMap::from([(
                                "bench".to_string(),
                                format!("g{}", policy_of(i)),
                            )])),
                            annotations: Some(BTreeMap::from([(
                                ROLE_ANNOTATION.to_string(),
                                format!("arn:aws:iam::123456789012:role/bench-{i}"),
                            )])),
                            ..Default::default()
                        },
                        ..Default::default()
                    };
                    async move { api.create(&PostParams::default(), &sa).await }
                })
                .buffer_unordered(self.args.setup_concurrency)
                .try_for_each(|_| futures::future::ready(Ok(())))
                .await
                .context("creating ServiceAccounts")?;
        }
        println!(
            "created {n} ServiceAccounts in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let authority = self.authority(Self::local_authority("none")).await?;
        let mut controller = self.start_controller_watching(&home, None, &authority)?;
        self.wait_ca(&mut controller, &authority).await?;
        // Idle: the caches hold every ServiceAccount. The API server's other requests
        // (leases, its own controllers) are counted over a quiet window, to be printed beside.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let quiet = Duration::from_secs(10);
        let idle_before = api_requests(&self.client).await?;
        tokio::time::sleep(quiet).await;
        let before = api_requests(&self.client).await?;
        let background_rate = (total(&before) - total(&idle_before)) / quiet.as_secs_f64();

        let watch =
            self.watch_managed_secrets(Api::all(self.client.clone()), n, Duration::from_secs(1800));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cpu = CpuSample::take(Some(controller.child.id()));
        let clock = Instant::now();
        for p in 0..policies {
            let namespace = &names[p / per_namespace];
            self.policy(
                namespace,
                &format!("bench-{p}"),
                policy_spec(&format!("g{p}")),
            )
            .await?;
        }
        let applied = clock.elapsed();
        let done = tokio::select! {
            done = watch => done??,
            exit = async {
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if let Some(exit) = controller.exited() {
                        break exit;
                    }
                }
            } => bail!(exit),
        };
        let elapsed = done - clock;
        let cpu_used = cpu.since(Some(controller.child.id()));
        let after_issuing = controller.rss_mib()?;
        println!(
            "issued {n} certificates in {:.1} s = {:.0}/s (the {policies} policies were created in the first {:.1} s); RSS then {after_issuing:.1} MiB",
            elapsed.as_secs_f64(),
            n as f64 / elapsed.as_secs_f64(),
            applied.as_secs_f64()
        );
        println!(
            "  CPU over the issuance ({:.1} s of wall time): {cpu_used}",
            elapsed.as_secs_f64()
        );
        // Requests are counted until the controller has gone quiet: status writes and events
        // that follow the last Secret belong to the same issuance.
        self.wait_settled(
            &mut controller,
            policies as f64,
            Duration::from_secs(5),
            Duration::from_secs(300),
        )
        .await?;
        let settled = clock.elapsed();
        let after = api_requests(&self.client).await?;
        let rss = self.sample_rss(&mut controller).await?;
        let issued = controller
            .metric("rolemesh_certificates_issued_total", "")
            .await?;
        let reconciles = controller.metric("rolemesh_reconciles_total", "").await?;
        // The benchmark's own requests in that window: one create per policy, and the watch.
        // What the rest of the cluster did meanwhile stays in (so the figure is an upper bound);
        // the idle window before shows how much that is.
        let own = policies as f64 + 2.0;
        let delta = total(&after) - total(&before);
        let per_certificate = (delta - own) / issued.max(1.0);
        println!(
            "settled after {:.1} s: {issued} certificates, {reconciles} reconciles; RSS (median) {rss:.1} MiB",
            settled.as_secs_f64()
        );
        println!(
            "API requests in that window: {delta:.0}, of which the benchmark's own {own:.0}: {per_certificate:.2} per certificate (the cluster's other clients included; {background_rate:.1}/s in the idle window before: {})",
            top_kinds(&idle_before, &before, 4)
        );
        println!("  by verb and resource (largest first, background included):");
        for (kind, count) in by_kind(&before, &after).iter().take(12) {
            println!(
                "    {kind:<40} {count:>8.0} ({:.3} per certificate)",
                count / issued.max(1.0)
            );
        }
        drop(controller);

        let label = format!("{}k", n / 1000);
        let rate = n as f64 / elapsed.as_secs_f64();
        self.rows.push(Row::new(
            &format!("scale: issue {label} SAs, {policies} policies, {namespaces} namespaces"),
            format!("{:.1} s ({rate:.0}/s)", elapsed.as_secs_f64()),
            "<= 120 s",
            Some(elapsed <= Duration::from_secs(120)),
        ));
        self.rows.push(Row::new(
            &format!("scale: RSS after issuing {label} (right after / settled)"),
            format!("{after_issuing:.1} / {rss:.1} MiB"),
            "<= 300 MiB",
            Some(after_issuing.max(rss) <= 300.0),
        ));
        self.rows.push(Row::new(
            "scale: API requests per issued certificate",
            format!("{per_certificate:.2}"),
            "<= 3",
            Some(per_certificate <= 3.0),
        ));
        self.rows.push(Row::new(
            "scale: CPUs busy, controller / API server / etcd+",
            cpu_used.short(),
            "-",
            None,
        ));
        Ok(())
    }

    /// Starts a fresh controller, waits until it has reconciled every policy and gone quiet,
    /// and returns its median RSS.
    async fn restarted_rss(
        &self,
        namespace: &str,
        authority: &str,
        policies: usize,
    ) -> Result<f64> {
        let mut controller = self.running_controller(namespace, authority).await?;
        // Every policy should be reconciled after a start (each reconcile reads every cached
        // object); fewer reconciles than policies is reported, not waited for.
        self.wait_settled(
            &mut controller,
            1.0,
            Duration::from_secs(5),
            Duration::from_secs(60),
        )
        .await?;
        let reconciles = controller.metric("rolemesh_reconciles_total", "").await?;
        println!("  restarted controller: {reconciles} reconciles for {policies} policies");
        if reconciles < policies as f64 {
            println!(
                "  note: fewer reconciles than policies after a restart: some reconciles never finished (they wait for cache readiness)"
            );
        }
        let issued = controller
            .metric("rolemesh_certificates_issued_total", "")
            .await?;
        if issued > 0.0 {
            println!("  note: the restarted controller issued {issued} certificates");
        }
        self.sample_rss(&mut controller).await
    }

    async fn sample_rss(&self, controller: &mut ControllerProcess) -> Result<f64> {
        let mut samples = Vec::new();
        for _ in 0..self.args.rss_samples.max(1) {
            samples.push(controller.rss_mib()?);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let listed: Vec<String> = samples.iter().map(|s| format!("{s:.1}")).collect();
        println!("  RSS samples (MiB): {}", listed.join(" "));
        Ok(median(samples))
    }

    async fn unrelated_secrets(&self, namespace: &str) -> Result<Duration> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let payload: Vec<u8> = (0..self.args.unrelated_bytes)
            .map(|_| rand::random::<u8>())
            .collect();
        let started = Instant::now();
        stream::iter(0..self.args.unrelated_count)
            .map(|i| {
                let api = api.clone();
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(format!("unrelated-{i}")),
                        ..Default::default()
                    },
                    data: Some(BTreeMap::from([(
                        "blob".to_string(),
                        ByteString(payload.clone()),
                    )])),
                    ..Default::default()
                };
                async move { api.create(&PostParams::default(), &secret).await }
            })
            .buffer_unordered(self.args.setup_concurrency)
            .try_for_each(|_| futures::future::ready(Ok(())))
            .await
            .context("creating unrelated Secrets")?;
        Ok(started.elapsed())
    }
}

/// The API server's own count of the requests it served, `apiserver_request_total` summed by
/// verb, resource and subresource, from its /metrics.
async fn api_requests(client: &Client) -> Result<BTreeMap<String, f64>> {
    let request = hyper::Request::get("/metrics")
        .body(Vec::new())
        .context("building the /metrics request")?;
    let text = client
        .request_text(request)
        .await
        .context("reading the API server's /metrics")?;
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|pair| pair.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let subresource = label("subresource");
        let key = if subresource.is_empty() {
            format!("{} {}", label("verb"), label("resource"))
        } else {
            format!("{} {}/{subresource}", label("verb"), label("resource"))
        };
        *counts.entry(key).or_insert(0.0) += value;
    }
    if counts.is_empty() {
        bail!("the API server's /metrics has no apiserver_request_total");
    }
    Ok(counts)
}

/// The request kinds that grew from `before` to `after`, largest first.
fn by_kind(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> Vec<(String, f64)> {
    let mut kinds: Vec<(String, f64)> = after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v >= 1.0)
        .collect();
    kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
    kinds
}

fn top_kinds(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, n: usize) -> String {
    let listed: Vec<String> = by_kind(before, after)
        .into_iter()
        .take(n)
        .map(|(kind, count)| format!("{kind} {count:.0}"))
        .collect();
    listed.join(", ")
}

fn total(counts: &BTreeMap<String, f64>) -> f64 {
    counts.values().sum()
}

/// CPU time of the controller, the local control plane and the local AWS endpoint, to say which
/// side limits a run. `make cluster`'s control plane is one `localkube up` process (etcd runs in
/// it) with the API server, controller-manager and scheduler as its children.
struct CpuSample {
    at: Instant,
    controller: f64,
    api_server: Vec<(u32, f64)>,
    etcd_and_rest: Vec<(u32, f64)>,
    aws: Vec<(u32, f64)>,
    machine: (u64, u64),
}

fn cluster_pid(file: &str) -> Option<u32> {
    std::fs::read_to_string(repo_root().join("target/cluster").join(file))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
}

/// The children of `parent` with their first argument (localkube's subcommand).
fn children(parent: u32) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (_, rest) = stat.rsplit_once(')')?;
            let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent).then_some(())?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let first = cmdline
                .split(|b| *b == 0)
                .nth(1)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .unwrap_or_default();
            Some((pid, first))
        })
        .collect()
}

impl CpuSample {
    /// `controller`: the pid of the controller process, when one runs.
    fn take(controller: Option<u32>) -> Self {
        let with_cpu = |pids: Vec<u32>| pids.into_iter().map(|p| (p, cpu_ms(p))).collect();
        let (mut api_server, mut etcd_and_rest) = (Vec::new(), Vec::new());
        if let Some(up) = cluster_pid("localkube.pid") {
            etcd_and_rest.push(up);
            for (pid, role) in children(up) {
                if role == "apiserver" {
                    api_server.push(pid);
                } else {
                    etcd_and_rest.push(pid);
                }
            }
        }
        Self {
            at: Instant::now(),
            controller: controller.map_or(0.0, cpu_ms),
            api_server: with_cpu(api_server),
            etcd_and_rest: with_cpu(etcd_and_rest),
            aws: with_cpu(cluster_pid("moto.pid").into_iter().collect()),
            machine: machine_ticks(),
        }
    }

    /// CPUs kept busy by each side since this sample.
    fn since(&self, controller: Option<u32>) -> CpuUse {
        let seconds = self.at.elapsed().as_secs_f64().max(1e-3);
        let used = |before: f64, now: f64| (now - before) / 1000.0 / seconds;
        let group = |pids: &[(u32, f64)]| {
            (!pids.is_empty()).then(|| pids.iter().map(|(p, c)| used(*c, cpu_ms(*p))).sum())
        };
        let (busy, all) = machine_ticks();
        let machine = (busy - self.machine.0) as f64 / ((all - self.machine.1).max(1)) as f64
            * std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
        CpuUse {
            controller: controller.map(|pid| used(self.controller, cpu_ms(pid))),
            api_server: group(&self.api_server),
            etcd_and_rest: group(&self.etcd_and_rest),
            aws: group(&self.aws),
            machine,
        }
    }
}

struct CpuUse {
    controller: Option<f64>,
    api_server: Option<f64>,
    etcd_and_rest: Option<f64>,
    aws: Option<f64>,
    machine: f64,
}

impl CpuUse {
    /// Controller / API server / etcd and the rest, for a table cell.
    fn short(&self) -> String {
        let or_unknown = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
        format!(
            "{} / {} / {}",
            or_unknown(self.controller),
            or_unknown(self.api_server),
            or_unknown(self.etcd_and_rest)
        )
    }
}

impl std::fmt::Display for CpuUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let or_unknown = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
        write!(
            f,
            "CPUs busy: controller {}, API server {}, etcd + kube controllers {}, AWS endpoint {}; machine {:.2} of {}",
            or_unknown(self.controller),
            or_unknown(self.api_server),
            or_unknown(self.etcd_and_rest),
            or_unknown(self.aws),
            self.machine,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        )
    }
}

fn secret_data_bytes(secret: &Secret) -> usize {
    secret
        .data
        .as_ref()
        .map_or(0, |d| d.iter().map(|(k, v)| k.len() + v.0.len()).sum())
}
