//! Support shared by rolemesh's tests and benchmarks, written once: ports, temporary
//! directories, certificate fixtures from the project's own issuance code, the built binaries,
//! and the local control plane (`make cluster`) with a namespace per test.
//!
//! Nothing here fakes Kubernetes or AWS: a test that needs the control plane and finds it missing
//! fails with a message saying how to start it, never skips.
//!
//! Fixtures panic (with `expect`) instead of returning errors where a test could not go on
//! without them; a panic fails the test that asked, with the reason.

pub mod cluster;
pub mod pki;
pub mod procfs;

use std::{
    collections::BTreeSet,
    future::Future,
    net::TcpListener,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};

pub use cluster::{
    ClusterEnv, NODE, TestNamespace, cluster, expect_success, in_namespace, install_crds,
    node_ready,
};

/// Root of the repository (the workspace).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// `prefix-` and eight random hex digits: a name no other test or run picks.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

/// A loopback port nothing listens on now and that this process has not handed out before.
/// The kernel may give a just-released port to the next bind, so two listeners set up by one
/// test (a proxy's mapping and its admin port, say) could otherwise get the same one.
pub fn try_free_port() -> std::io::Result<u16> {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut handed_out = HANDED_OUT
            .lock()
            .map_err(|_| std::io::Error::other("the list of handed-out ports is poisoned"))?;
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
}

/// [`try_free_port`] for tests, which cannot go on without a port.
pub fn free_port() -> u16 {
    try_free_port().expect("a free loopback port")
}

/// A new empty directory under the system temp dir, named after `tag`, this process and a
/// counter. Left in place afterwards: logs and files in it explain a failed test.
pub fn try_temp_dir(tag: &str) -> std::io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("rolemesh-{tag}-{}-{n}", std::process::id()));
    match std::fs::remove_dir_all(&dir) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// [`try_temp_dir`] for tests.
pub fn temp_dir(tag: &str) -> PathBuf {
    try_temp_dir(tag).expect("a temporary directory")
}

/// Where tests write the logs of the processes they start (`target/test-logs`).
pub fn log_dir() -> Result<PathBuf> {
    let dir = repo_root().join("target/test-logs");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// A workspace binary built next to the running test or benchmark (target/debug for `cargo
/// test`, target/release for a release build). Only the package that defines a binary gets
/// `CARGO_BIN_EXE_*`, so tests in other crates look here; `make test` builds every binary first.
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    // target/<profile>/deps/<test> for a test, target/<profile>/<bin> for a binary.
    let mut dir = exe.parent().context("the executable has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps/ has no parent")?;
    }
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is not built: run `cargo build --workspace --bins` first (`make test` does)",
            path.display()
        );
    }
    Ok(path)
}

/// Polls `check` every 200 ms until it returns `Ok(Some(_))` or `timeout` passes; the last error
/// explains a timeout.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::from("condition never held");
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(error) => last = format!("{error:#}"),
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `GET path` on 127.0.0.1:`port` over plain HTTP/1.1; the whole response, status line and
/// headers included (metrics and readiness endpoints of the processes tests start).
pub async fn http_get(port: u16, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

/// The sum of every sample of Prometheus metric `name` whose labels contain `labels` (e.g.
/// `signer="kms"`; empty for all), in the text exposition format.
pub fn metric_sum(exposition: &str, name: &str, labels: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter(|l| labels.is_empty() || l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        // Not `sum`: the sum of no f64 is -0.0, which prints as "-0".
        .fold(0.0, |total, value| total + value)
}

/// An AdmissionReview of a Pod CREATE in `namespace` with `spec`, as the API server sends one.
pub fn pod_review(namespace: &str, spec: serde_json::Value) -> Vec<u8> {
    serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "review-1",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "operation": "CREATE", "userInfo": { "username": "someone" }, "namespace": namespace,
            "object": { "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "p" }, "spec": spec },
        },
    })
    .to_string()
    .into_bytes()
}

/// A Pod review of about `size` bytes whose containers are all `{}`: tiny JSON that decodes into
/// a full `Container` struct each.
pub fn empty_containers_review(namespace: &str, size: usize) -> Vec<u8> {
    let head = String::from_utf8_lossy(&pod_review(
        namespace,
        serde_json::json!({ "containers": "HERE" }),
    ))
    .into_owned();
    let count = size.saturating_sub(head.len()) / 3;
    let containers = format!("[{}]", vec!["{}"; count].join(","));
    head.replace("\"HERE\"", &containers).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_never_hands_out_a_port_twice() {
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
    }

    #[test]
    fn temp_dirs_are_new_and_distinct() {
        let a = temp_dir("kit");
        let b = temp_dir("kit");
        assert_ne!(a, b);
        assert!(a.is_dir() && b.is_dir());
        assert_eq!(std::fs::read_dir(&a).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(a);
        let _ = std::fs::remove_dir_all(b);
    }

    #[test]
    fn metric_sum_matches_the_name_exactly_and_filters_labels() {
        let text = "# TYPE x counter\n\
                    rolemesh_x_total{signer=\"kms\"} 2\n\
                    rolemesh_x_total{signer=\"local\"} 3\n\
                    rolemesh_x_total_extra 100\n\
                    rolemesh_y 7\n";
        assert_eq!(metric_sum(text, "rolemesh_x_total", ""), 5.0);
        assert_eq!(metric_sum(text, "rolemesh_x_total", "signer=\"kms\""), 2.0);
        assert_eq!(metric_sum(text, "rolemesh_y", ""), 7.0);
        assert_eq!(metric_sum(text, "rolemesh_z", ""), 0.0);
    }

    #[tokio::test]
    async fn http_get_sends_the_path_and_returns_the_whole_response() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 1024];
            let n = stream.read(&mut request).await.unwrap();
            let request = String::from_utf8_lossy(&request[..n]).into_owned();
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .unwrap();
            request
        });
        let response = http_get(port, "/metrics").await.unwrap();
        assert!(
            server
                .await
                .unwrap()
                .starts_with("GET /metrics HTTP/1.1\r\n")
        );
        assert!(response.starts_with("HTTP/1.1 200 OK") && response.ends_with("\r\n\r\nok"));
    }

    #[test]
    fn binary_names_what_to_build_when_missing() {
        let error = binary("no-such-binary").unwrap_err().to_string();
        assert!(error.contains("cargo build --workspace --bins"), "{error}");
    }
}
