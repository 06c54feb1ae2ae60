//! `bench-injection`: what rolemesh's injection adds to a pod's start on the real node, as users
//! meet it (issue 20: pod create -> Running, injected vs not, target <= 10 ms p50 added).
//!
//! Installs the chart as docs/development.md shows, then in one namespace opted in to injection
//! (`rolemesh.dev/inject=enabled`) with one IRSA ServiceAccount covered by an MTLSPolicy with an
//! inbound mapping (so injected pods get both the `rolemesh-init` container and the proxy
//! sidecar), creates the same busybox `sleep` pod alternately injected and plain (the plain ones
//! carry `rolemesh.dev/inject: disabled`, so the API server does not call the webhook for them),
//! one pod at a time. Each pod is timed from just before its create call to the moment a watch
//! on the bench's pods, started before any create, sees `status.phase == Running` (and Ready=True,
//! a secondary figure); API timestamps have 1 s resolution and are not used. Each pod is deleted
//! (grace period 0) and gone before the next is created, so the node holds at most one bench pod.
//!
//! The release and the namespace are removed at the end whatever happens (the chart's controller
//! watches every namespace and would disturb the controller benchmark). Exits non-zero only when
//! the benchmark could not run, never because a target was missed.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use rolemesh_bench::stats::{median, percentile};
use rolemesh_e2e::{inbound_policy, install_release, meshed_service_accounts, uninstall_release};
use rolemesh_testkit::{ClusterEnv, TestNamespace, eventually, node_ready, repo_root, unique};
use serde_json::json;
use tokio::sync::mpsc;

/// Every object the bench creates carries this label (leftovers of an interrupted run are found
/// by it and deleted at the start).
const BENCH_LABEL: &str = "rolemesh.dev/bench";
const BENCH_VALUE: &str = "injection";
const TRUST_DOMAIN: &str = "bench.rolemesh.test";
const SERVICE_ACCOUNT: &str = "bench";
const MTLS_PORT: u16 = 8443;
const APP_PORT: u16 = 8080;
const PROXY: &str = "rolemesh-proxy";
const POD_TIMEOUT: Duration = Duration::from_secs(120);
const TARGET_ADDED_P50_MS: f64 = 10.0;

/// Pod create -> Running on the local node, with and without rolemesh's injection.
#[derive(Debug, Parser)]
#[command(name = "bench-injection")]
struct Args {
    /// Measured pods of each kind (injected and plain), created alternately, one at a time.
    #[arg(long, default_value_t = 100)]
    pods: usize,
    /// Pods of each kind created first and not counted.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Plain,
    Injected,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Plain => "plain",
            Kind::Injected => "injected",
        }
    }
}

/// What the watch reported, stamped when it arrived.
enum Seen {
    Pod(Instant, Box<Pod>),
    Gone(String),
    /// The watch (re)started: a deletion may have been missed.
    Restarted,
}

/// When the watch first saw each step of one pod's start, from just before its create call.
#[derive(Debug, Default, Clone)]
struct Sample {
    scheduled: Option<Duration>,
    proxy_running: Option<Duration>,
    initialized: Option<Duration>,
    running: Option<Duration>,
    ready: Option<Duration>,
}

type Step = fn(&Sample) -> Option<Duration>;

const STEPS: &[(&str, Step)] = &[
    ("scheduled (spec.nodeName set)", |s| s.scheduled),
    ("proxy sidecar running", |s| s.proxy_running),
    ("Initialized=True", |s| s.initialized),
    ("phase Running", |s| s.running),
    ("Ready=True", |s| s.ready),
];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.pods > 0, "--pods must be at least 1");
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let started = Instant::now();
    let env = node_ready().await?;
    let busybox = std::fs::read_to_string(repo_root().join("target/images/busybox.ref"))
        .context("target/images/busybox.ref (made by `make cluster`)")?
        .trim()
        .to_string();
    println!(
        "injection benchmark: {} pods of each kind after {} warm-up pods each, image {busybox}",
        args.pods, args.warmup
    );
    let client = env.client().await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    delete_leftovers(&env)?;

    let name = unique("bench-injection");
    let install_env = env.clone();
    let outcome = async {
        let installing = Instant::now();
        tokio::task::spawn_blocking(move || install_release(&install_env, TRUST_DOMAIN, &[]))
            .await?
            .context("installing the chart as docs/development.md shows")?;
        println!(
            "chart installed in {:.1} s",
            installing.elapsed().as_secs_f64()
        );
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.clone());
        ns.metadata.labels = Some(BTreeMap::from([(
            BENCH_LABEL.to_string(),
            BENCH_VALUE.to_string(),
        )]));
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        let ns = TestNamespace {
            name: name.clone(),
            client: client.clone(),
            env: env.clone(),
        };
        run(&ns, &args, &busybox).await
    };
    let outcome = tokio::select! {
        outcome = outcome => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    // Cleanup whatever happened: the namespace first (the controller still runs to let its
    // objects go), then the release.
    let cleanup = cleanup(&env, &name).await;
    println!(
        "(injection benchmark took {:.0} s)",
        started.elapsed().as_secs_f64()
    );
    match (outcome, cleanup) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(error), cleanup) => {
            if let Err(cleanup) = cleanup {
                eprintln!("cleanup failed too: {cleanup:#}");
            }
            Err(error.context("the injection benchmark could not run"))
        }
        (Ok(()), Err(cleanup)) => Err(cleanup.context("cleaning up after the injection benchmark")),
    }
}

/// Namespaces of an interrupted earlier run.
fn delete_leftovers(env: &ClusterEnv) -> Result<()> {
    env.kubectl(&[
        "delete",
        "namespace",
        "-l",
        &format!("{BENCH_LABEL}={BENCH_VALUE}"),
        "--ignore-not-found",
        "--wait=true",
        "--timeout=180s",
    ])?;
    Ok(())
}

async fn cleanup(env: &ClusterEnv, namespace: &str) -> Result<()> {
    let deleted = env.kubectl(&[
        "delete",
        "namespace",
        namespace,
        "--ignore-not-found",
        "--wait=true",
        "--timeout=180s",
    ]);
    let env = env.clone();
    let uninstalled = tokio::task::spawn_blocking(move || {
        // Nothing to uninstall when the install itself failed before creating the release.
        let listed = env.run("helm", &["status", "rolemesh", "-n", "rolemesh"], None)?;
        if !listed.status.success() {
            return Ok(());
        }
        uninstall_release(&env)
    })
    .await?;
    deleted.context("deleting the bench namespace")?;
    uninstalled.context("uninstalling the release")?;
    println!("cleaned up: namespace {namespace} deleted, release rolemesh uninstalled");
    Ok(())
}

async fn run(ns: &TestNamespace, args: &Args, busybox: &str) -> Result<()> {
    let roles = meshed_service_accounts(ns, &[SERVICE_ACCOUNT]).await?;
    ns.apply_manifest(&inbound_policy(
        SERVICE_ACCOUNT,
        MTLS_PORT,
        APP_PORT,
        &roles[0],
    ))?;
    rolemesh_e2e::wait_for_secret(ns, &format!("{SERVICE_ACCOUNT}-rolemesh-tls"), None).await?;
    rolemesh_e2e::trust_bundle(ns).await?;
    let pods: Api<Pod> = ns.api();

    // The webhook answers from its caches: wait until it knows the policy (a dry run is sent to
    // it like a create, and changes nothing).
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let injected = eventually(
        "the webhook injecting a dry-run pod",
        Duration::from_secs(60),
        || async {
            let pod = pod_body("dry-run", Kind::Injected, busybox)?;
            match pods.create(&dry_run, &pod).await {
                Ok(pod) if has_proxy(&pod) => Ok(Some(pod)),
                Ok(_) => bail!("the dry-run pod was admitted without the proxy"),
                Err(error) => Err(error.into()),
            }
        },
    )
    .await?;
    println!("injected pods run: {}", containers_of(&injected));

    let (tx, mut rx) = mpsc::unbounded_channel();
    let watch_api = pods.clone();
    let watch = tokio::spawn(async move {
        let config = watcher::Config::default().labels(&format!("{BENCH_LABEL}={BENCH_VALUE}"));
        let mut stream = watcher(watch_api, config).default_backoff().boxed();
        while let Some(event) = stream.next().await {
            let now = Instant::now();
            let seen = match event {
                Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                    Seen::Pod(now, Box::new(pod))
                }
                Ok(watcher::Event::Delete(pod)) => {
                    Seen::Gone(pod.metadata.name.unwrap_or_default())
                }
                Ok(watcher::Event::Init) => Seen::Restarted,
                Ok(watcher::Event::InitDone) | Err(_) => continue,
            };
            if tx.send(seen).is_err() {
                break;
            }
        }
    });
    let outcome = measure(&pods, &mut rx, args, busybox).await;
    watch.abort();
    let samples = outcome?;
    report(&samples, args);
    Ok(())
}

async fn measure(
    pods: &Api<Pod>,
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    args: &Args,
    busybox: &str,
) -> Result<BTreeMap<&'static str, Vec<Sample>>> {
    // The watch's first listing (there are no bench pods yet) before the first create.
    let first = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .context("the watch did not start")?;
    ensure!(
        matches!(first, Some(Seen::Restarted)),
        "the watch did not start"
    );
    let mut samples: BTreeMap<&'static str, Vec<Sample>> = BTreeMap::new();
    let total = args.warmup + args.pods;
    for round in 0..total {
        // Alternate which kind goes first, so neither always follows the other's deletion.
        let order = if round % 2 == 0 {
            [Kind::Plain, Kind::Injected]
        } else {
            [Kind::Injected, Kind::Plain]
        };
        for kind in order {
            let name = format!("{}-{round}", kind.name());
            let sample = one_pod(pods, rx, &name, kind, busybox)
                .await
                .with_context(|| format!("pod {name}"))?;
            if round >= args.warmup {
                samples.entry(kind.name()).or_default().push(sample);
            }
        }
        let done = round + 1;
        if done % 10 == 0 || done == total {
            println!("  {done}/{total} rounds");
        }
    }
    Ok(samples)
}

async fn one_pod(
    pods: &Api<Pod>,
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    name: &str,
    kind: Kind,
    busybox: &str,
) -> Result<Sample> {
    let body = pod_body(name, kind, busybox)?;
    let t0 = Instant::now();
    let created = pods.create(&PostParams::default(), &body).await?;
    ensure!(
        has_proxy(&created) == (kind == Kind::Injected),
        "the {} pod was admitted {} the proxy: {}",
        kind.name(),
        if kind == Kind::Injected {
            "without"
        } else {
            "with"
        },
        containers_of(&created)
    );
    let mut sample = Sample::default();
    let deadline = t0 + POD_TIMEOUT;
    while sample.running.is_none() || sample.ready.is_none() {
        let seen = tokio::time::timeout_at(deadline.into(), rx.recv())
            .await
            .with_context(|| {
                format!("not Running and Ready after {POD_TIMEOUT:?} (seen: {sample:?})")
            })?
            .context("the watch ended")?;
        let Seen::Pod(at, pod) = seen else { continue };
        if pod.metadata.name.as_deref() != Some(name) {
            continue;
        }
        let since = at.duration_since(t0);
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let condition = |kind: &str| {
            status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == kind && c.status == "True"))
        };
        let first = |slot: &mut Option<Duration>, now: bool| {
            if now && slot.is_none() {
                *slot = Some(since);
            }
        };
        first(
            &mut sample.scheduled,
            spec.is_some_and(|s| s.node_name.is_some()),
        );
        first(
            &mut sample.proxy_running,
            status
                .and_then(|s| s.init_container_statuses.as_ref())
                .is_some_and(|c| {
                    c.iter().any(|c| {
                        c.name == PROXY && c.state.as_ref().is_some_and(|s| s.running.is_some())
                    })
                }),
        );
        first(&mut sample.initialized, condition("Initialized"));
        first(
            &mut sample.running,
            status.and_then(|s| s.phase.as_deref()) == Some("Running"),
        );
        first(&mut sample.ready, condition("Ready"));
    }
    pods.delete(
        name,
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await?;
    wait_gone(pods, rx, name).await?;
    Ok(sample)
}

/// Waits until the watch reports pod `name` deleted (or, should the watch have restarted and
/// missed it, until a GET no longer finds it).
async fn wait_gone(
    pods: &Api<Pod>,
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    name: &str,
) -> Result<()> {
    let deadline = Instant::now() + POD_TIMEOUT;
    loop {
        ensure!(
            Instant::now() < deadline,
            "still there {POD_TIMEOUT:?} after its deletion"
        );
        match tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
            Ok(Some(Seen::Gone(gone))) if gone == name => return Ok(()),
            Ok(Some(_)) => continue,
            Ok(None) => bail!("the watch ended"),
            Err(_) => {
                if pods.get_opt(name).await?.is_none() {
                    return Ok(());
                }
            }
        }
    }
}

fn pod_body(name: &str, kind: Kind, image: &str) -> Result<Pod> {
    let inject = match kind {
        Kind::Plain => "disabled",
        Kind::Injected => "enabled",
    };
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {
                BENCH_LABEL: BENCH_VALUE,
                "rolemesh.dev/inject": inject,
                "bench.rolemesh.dev/kind": kind.name(),
            },
        },
        "spec": {
            "serviceAccountName": SERVICE_ACCOUNT,
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "app",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["sleep", "3600"],
            }],
        },
    }))?)
}

fn has_proxy(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.name == PROXY))
}

/// `init: a, b (sidecar); containers: c` as the pod's spec lists them.
fn containers_of(pod: &Pod) -> String {
    let Some(spec) = pod.spec.as_ref() else {
        return "no spec".into();
    };
    let init: Vec<String> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| match c.restart_policy.as_deref() {
            Some("Always") => format!("{} (sidecar, {})", c.name, image_of(c)),
            _ => format!("{} ({})", c.name, image_of(c)),
        })
        .collect();
    let main: Vec<String> = spec
        .containers
        .iter()
        .map(|c| format!("{} ({})", c.name, image_of(c)))
        .collect();
    format!(
        "init containers: [{}]; containers: [{}]",
        init.join(", "),
        main.join(", ")
    )
}

fn image_of(container: &k8s_openapi::api::core::v1::Container) -> &str {
    container.image.as_deref().unwrap_or("?")
}

fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// p50 and p99 in ms of one step over the samples that saw it, and how many did.
fn quantiles(samples: &[Sample], step: Step) -> (f64, f64, usize) {
    let mut micros: Vec<u64> = samples.iter().filter_map(step).map(micros).collect();
    micros.sort_unstable();
    let p50 = median(micros.iter().map(|&us| us as f64)) / 1000.0;
    let p99 = percentile(&micros, 0.99) / 1000.0;
    (p50, p99, micros.len())
}

fn report(samples: &BTreeMap<&'static str, Vec<Sample>>, args: &Args) {
    let empty = Vec::new();
    let plain = samples.get(Kind::Plain.name()).unwrap_or(&empty);
    let injected = samples.get(Kind::Injected.name()).unwrap_or(&empty);
    println!(
        "\nwhen the watch first saw each step, from just before the create call \
         (p50 / p99 ms, pods that showed it):"
    );
    for (step, get) in STEPS {
        let mut line = format!("  {step:<30}");
        for (kind, samples) in [("plain", plain), ("injected", injected)] {
            let (p50, p99, n) = quantiles(samples, *get);
            if n == 0 {
                let _ = write!(line, "  {kind}: not seen");
            } else {
                let _ = write!(line, "  {kind}: {p50:7.1} / {p99:7.1} (n={n})");
            }
        }
        println!("{line}");
    }
    println!(
        "  (kubelet coalesces status updates, so a step that passes quickly may never be seen)"
    );

    let running = |s: &Sample| s.running;
    let ready = |s: &Sample| s.ready;
    let (plain_p50, plain_p99, plain_n) = quantiles(plain, running);
    let (inj_p50, inj_p99, inj_n) = quantiles(injected, running);
    let (plain_ready_p50, plain_ready_p99, _) = quantiles(plain, ready);
    let (inj_ready_p50, inj_ready_p99, _) = quantiles(injected, ready);
    let added_p50 = inj_p50 - plain_p50;
    let added_p99 = inj_p99 - plain_p99;
    let rows = vec![
        Row {
            metric: format!("pod create -> Running, plain (p50 / p99, n={plain_n})"),
            measured: format!("{plain_p50:.1} / {plain_p99:.1} ms"),
            target: "-".into(),
            ok: None,
        },
        Row {
            metric: format!("pod create -> Running, injected (p50 / p99, n={inj_n})"),
            measured: format!("{inj_p50:.1} / {inj_p99:.1} ms"),
            target: "-".into(),
            ok: None,
        },
        Row {
            metric: "added by injection p50".into(),
            measured: format!(
                "{added_p50:.1} ms ({:.2}x target)",
                added_p50 / TARGET_ADDED_P50_MS
            ),
            target: format!("<= {TARGET_ADDED_P50_MS:.0} ms"),
            ok: Some(added_p50 <= TARGET_ADDED_P50_MS),
        },
        Row {
            metric: "added by injection p99".into(),
            measured: format!("{added_p99:.1} ms"),
            target: "-".into(),
            ok: None,
        },
        Row {
            metric: "pod create -> Ready, plain / injected (p50)".into(),
            measured: format!("{plain_ready_p50:.1} / {inj_ready_p50:.1} ms"),
            target: "-".into(),
            ok: None,
        },
        Row {
            metric: "pod create -> Ready, plain / injected (p99)".into(),
            measured: format!("{plain_ready_p99:.1} / {inj_ready_p99:.1} ms"),
            target: "-".into(),
            ok: None,
        },
        Row {
            metric: "added by injection to Ready, p50 / p99".into(),
            measured: format!(
                "{:.1} / {:.1} ms",
                inj_ready_p50 - plain_ready_p50,
                inj_ready_p99 - plain_ready_p99
            ),
            target: "-".into(),
            ok: None,
        },
    ];
    println!(
        "\n== injection benchmark summary ({} pods of each kind, one at a time) ==",
        args.pods
    );
    print!("{}", table(&rows));
}

struct Row {
    metric: String,
    measured: String,
    target: String,
    ok: Option<bool>,
}

/// The summary table, in the style of the controller benchmark's.
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
