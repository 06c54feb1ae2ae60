//! The proxy sizes its runtime from the CPU limit of the cgroup it really runs in: a cgroup made
//! for the test with a CPU quota, joined before the proxy starts, as kubelet's container is.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::json;

/// A child cgroup with a CPU quota, in whichever hierarchy this machine runs (v1's cpu controller
/// or the unified v2 tree); removed when dropped.
struct CpuLimitedCgroup {
    dir: PathBuf,
}

impl CpuLimitedCgroup {
    fn new(name: &str, quota_us: u64, period_us: u64) -> CpuLimitedCgroup {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let v1 = mountinfo.lines().find_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mut after = after.split(' ');
            let (fs_type, _, options) = (after.next()?, after.next()?, after.next()?);
            (fs_type == "cgroup" && options.split(',').any(|o| o == "cpu"))
                .then(|| PathBuf::from(before.split(' ').nth(4).unwrap()))
        });
        let dir = match &v1 {
            Some(mount) => mount.join(format!("{name}-{}", std::process::id())),
            None => PathBuf::from("/sys/fs/cgroup").join(format!("{name}-{}", std::process::id())),
        };
        std::fs::create_dir(&dir).unwrap_or_else(|error| {
            panic!(
                "cannot create the cgroup {} (the test runs as root on a machine with cgroups \
                 mounted): {error}",
                dir.display()
            )
        });
        if v1.is_some() {
            std::fs::write(dir.join("cpu.cfs_period_us"), period_us.to_string()).unwrap();
            std::fs::write(dir.join("cpu.cfs_quota_us"), quota_us.to_string()).unwrap();
        } else {
            std::fs::write(dir.join("cpu.max"), format!("{quota_us} {period_us}")).unwrap();
        }
        CpuLimitedCgroup { dir }
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for CpuLimitedCgroup {
    fn drop(&mut self) {
        // The proxies are gone by now (dropped first); a cgroup with no tasks can be removed.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn start(
    dir: &Path,
    env: &[(&str, &str)],
    cgroup: Option<&CpuLimitedCgroup>,
) -> (Proxy, MountedSecret) {
    let ca = Ca::new(TD);
    let identity = dir.join("identity");
    std::fs::create_dir_all(&identity).unwrap();
    let mounted = MountedSecret::new(&identity, &ca.leaf("payments", SERVER_ROLE), &ca.pem);
    let config = json!({
        "trustDomain": TD,
        "identityDir": identity,
        "trustBundle": identity.join("ca.crt"),
        "adminPort": free_port(),
        "adminAddress": "127.0.0.1",
        "inbound": [{"name": "tcp", "port": free_port(), "appPort": echo_app(), "allow": [CLIENT_ROLE]}],
    });
    let procs = cgroup.map(CpuLimitedCgroup::procs);
    (
        Proxy::start_with(dir, config, env, procs.as_deref()),
        mounted,
    )
}

/// Set explicitly: the suite may run with ROLEMESH_PROXY_CORES set for every other proxy.
const AUTO: &[(&str, &str)] = &[("ROLEMESH_PROXY_CORES", "auto")];

fn worker_threads(proxy: &Proxy) -> u64 {
    metric_sum(
        &proxy.metrics(),
        "rolemesh_proxy_runtime_worker_threads",
        "",
    )
}

/// The names of the process's threads.
fn thread_names(proxy: &Proxy) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{}/task", proxy.pid()))
        .unwrap()
        .map(|task| {
            let comm = std::fs::read_to_string(task.unwrap().path().join("comm")).unwrap();
            comm.trim().to_string()
        })
        .collect()
}

#[test]
fn the_runtime_takes_the_cpu_limit_of_its_cgroup_rounded_up() {
    let dir = temp_dir("cores-limited");
    let cgroup = CpuLimitedCgroup::new("rolemesh-cores", 150_000, 100_000);
    let (proxy, _mounted) = start(&dir, AUTO, Some(&cgroup));
    let members = std::fs::read_to_string(cgroup.procs()).unwrap();
    assert!(
        members.lines().any(|pid| pid == proxy.pid().to_string()),
        "the proxy runs in the test's cgroup: {members}"
    );
    assert_eq!(worker_threads(&proxy), 2, "{}", proxy.log_text());
    // tokio's workers (its blocking pool, when in use, names its threads the same way).
    let threads = thread_names(&proxy);
    assert!(
        threads
            .iter()
            .filter(|name| *name == "tokio-rt-worker")
            .count()
            >= 2,
        "two runtime threads run: {threads:?}"
    );
    // The admin port keeps a thread of its own beside a multi-threaded runtime (src/admin.rs).
    assert!(
        threads.iter().any(|name| name == "rolemesh-admin"),
        "{threads:?}"
    );
    let log = proxy.log_text();
    assert!(
        log.contains("runtime sized") && log.contains("1500m"),
        "the log says where the size came from: {log}"
    );
    drop(proxy);
}

#[test]
fn a_fixed_number_wins_over_the_limit_and_no_limit_is_one_thread() {
    let dir = temp_dir("cores-fixed");
    let cgroup = CpuLimitedCgroup::new("rolemesh-cores-fixed", 300_000, 100_000);
    let (fixed, _a) = start(
        &dir.join("fixed"),
        &[("ROLEMESH_PROXY_CORES", "1")],
        Some(&cgroup),
    );
    assert_eq!(worker_threads(&fixed), 1);
    drop(fixed);

    // This test process's own cgroup has no CPU limit.
    let (unlimited, _b) = start(&dir.join("unlimited"), AUTO, None);
    assert_eq!(worker_threads(&unlimited), 1, "{}", unlimited.log_text());
    assert!(unlimited.log_text().contains("no CPU limit"));
}

#[test]
fn a_bad_cores_value_stops_the_proxy_with_what_is_allowed() {
    let dir = temp_dir("cores-bad");
    std::fs::create_dir_all(&dir).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_rolemesh-proxy"))
        .env("ROLEMESH_PROXY_CORES", "half")
        .env("ROLEMESH_PROXY_CONFIG", "{}")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("half") && stderr.contains("\"auto\""),
        "{stderr}"
    );
}
