//! How many runtime threads the proxy runs: the CPU its container is given.
//!
//! A sidecar that runs more threads than its CPU quota allows is throttled by the kernel and
//! answers slower than one that runs fewer; one that runs a single thread under a quota of four
//! leaves three cores idle while handshakes queue. So, unless the operator fixes the number, the
//! proxy reads its CPU limit from the cgroup it runs in (cgroup v2 `cpu.max`, v1
//! `cpu.cfs_quota_us` / `cpu.cfs_period_us`, the tightest along the path to the hierarchy's root),
//! rounds it up (a 1500m limit lets two threads share 1.5 cores) and caps it at the CPUs the process
//! may be scheduled on. Without a limit it runs one thread: a sidecar is not meant to take a node.

use std::{
    fmt, fs,
    num::NonZeroUsize,
    path::{Path, PathBuf},
};

pub use rolemesh_profile::proxy_config::{CORES_ENV, CoresSetting};

/// Where a thread count came from, for the log line at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoresSource {
    /// Set by the operator (`ROLEMESH_PROXY_CORES`, the chart's `proxy.cores` or the pod's
    /// `rolemesh.dev/proxy-cores` annotation).
    Fixed,
    /// The container's cgroup CPU quota, in millicores.
    CpuLimit { millicores: u64 },
    /// No CPU limit was found.
    NoCpuLimit,
}

impl fmt::Display for CoresSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed => f.write_str("fixed by configuration"),
            Self::CpuLimit { millicores } => write!(f, "the container's CPU limit ({millicores}m)"),
            Self::NoCpuLimit => f.write_str("no CPU limit on the container"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuntimeSize {
    pub threads: NonZeroUsize,
    pub source: CoresSource,
}

/// The runtime size for `setting`, reading the cgroup and CPU affinity of this process under
/// `root` (`/` in production; a directory laid out like one in tests).
pub fn runtime_size(setting: CoresSetting, root: &Path) -> RuntimeSize {
    match setting {
        CoresSetting::Fixed(threads) => RuntimeSize {
            threads,
            source: CoresSource::Fixed,
        },
        CoresSetting::Auto => match cpu_quota(root) {
            Some(quota) => {
                let wanted = quota.quota_us.div_ceil(quota.period_us).max(1);
                let allowed = schedulable_cpus(root).unwrap_or(usize::MAX);
                let threads = usize::try_from(wanted).unwrap_or(usize::MAX).min(allowed);
                RuntimeSize {
                    threads: NonZeroUsize::new(threads).unwrap_or(NonZeroUsize::MIN),
                    source: CoresSource::CpuLimit {
                        millicores: quota.quota_us.saturating_mul(1000) / quota.period_us,
                    },
                }
            }
            None => RuntimeSize {
                threads: NonZeroUsize::MIN,
                source: CoresSource::NoCpuLimit,
            },
        },
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Quota {
    quota_us: u64,
    period_us: u64,
}

fn tightest(a: Option<Quota>, b: Option<Quota>) -> Option<Quota> {
    match (a, b) {
        // a/pa <= b/pb, compared exactly.
        (Some(a), Some(b)) => Some(
            if u128::from(a.quota_us) * u128::from(b.period_us)
                <= u128::from(b.quota_us) * u128::from(a.period_us)
            {
                a
            } else {
                b
            },
        ),
        (a, b) => a.or(b),
    }
}

/// The tightest CPU quota on this process's cgroup and its ancestors, in either hierarchy.
fn cpu_quota(root: &Path) -> Option<Quota> {
    let cgroups = fs::read_to_string(root.join("proc/self/cgroup")).ok()?;
    let mountinfo = fs::read_to_string(root.join("proc/self/mountinfo")).ok()?;
    let mounts: Vec<Mount> = mountinfo.lines().filter_map(Mount::parse).collect();
    let mut found = None;
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let quota = if id == "0" && controllers.is_empty() {
            mounts
                .iter()
                .filter(|mount| mount.fs_type == "cgroup2")
                .find_map(|mount| walk(root, mount, path, read_v2_quota))
        } else if controllers.split(',').any(|c| c == "cpu") {
            mounts
                .iter()
                .filter(|mount| {
                    mount.fs_type == "cgroup" && mount.super_options.split(',').any(|o| o == "cpu")
                })
                .find_map(|mount| walk(root, mount, path, read_v1_quota))
        } else {
            None
        };
        found = tightest(found, quota);
    }
    found
}

/// One line of `/proc/self/mountinfo`: what part of a file system (`root`) is mounted where.
struct Mount<'a> {
    root: &'a str,
    mount_point: &'a str,
    fs_type: &'a str,
    super_options: &'a str,
}

impl<'a> Mount<'a> {
    fn parse(line: &'a str) -> Option<Self> {
        // "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue":
        // optional fields end at "-"; then the type, the source and the super options.
        let (before, after) = line.split_once(" - ")?;
        let mut before = before.split(' ');
        let root = before.nth(3)?;
        let mount_point = before.next()?;
        let mut after = after.split(' ');
        let fs_type = after.next()?;
        let _source = after.next()?;
        let super_options = after.next().unwrap_or("");
        Some(Self {
            root,
            mount_point,
            fs_type,
            super_options,
        })
    }
}

/// Reads the quota of the cgroup at `path` and of every ancestor up to the mount, keeping the
/// tightest. A container that sees its own cgroup as the mount's root (cgroup namespaces, or v1
/// mounts of the container's directory) finds `path` relative to that root; when the path is not
/// under the mount at all, the mount point itself is the closest view of it there is.
fn walk(
    root: &Path,
    mount: &Mount<'_>,
    path: &str,
    read: fn(&Path) -> Option<Quota>,
) -> Option<Quota> {
    let mount_point = root.join(mount.mount_point.trim_start_matches('/'));
    let relative = if mount.root == "/" {
        Some(path)
    } else {
        path.strip_prefix(mount.root)
            .filter(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    let mut dir: PathBuf = match relative {
        Some(relative) => mount_point.join(relative.trim_start_matches('/')),
        None => mount_point.clone(),
    };
    if !dir.is_dir() {
        dir = mount_point.clone();
    }
    let mut found = None;
    loop {
        found = tightest(found, read(&dir));
        if dir == mount_point || !dir.pop() || !dir.starts_with(&mount_point) {
            return found;
        }
    }
}

/// cgroup v2: `cpu.max` is "<quota> <period>" or "max <period>".
fn read_v2_quota(dir: &Path) -> Option<Quota> {
    let text = fs::read_to_string(dir.join("cpu.max")).ok()?;
    let mut fields = text.split_whitespace();
    let quota = fields.next()?.parse::<u64>().ok()?;
    let period = fields
        .next()
        .map_or(Some(100_000), |p| p.parse::<u64>().ok())?;
    (quota > 0 && period > 0).then_some(Quota {
        quota_us: quota,
        period_us: period,
    })
}

/// cgroup v1: `cpu.cfs_quota_us` is -1 without a limit.
fn read_v1_quota(dir: &Path) -> Option<Quota> {
    let read = |name: &str| -> Option<i64> {
        fs::read_to_string(dir.join(name)).ok()?.trim().parse().ok()
    };
    let quota = u64::try_from(read("cpu.cfs_quota_us")?).ok()?;
    let period = u64::try_from(read("cpu.cfs_period_us")?).ok()?;
    (quota > 0 && period > 0).then_some(Quota {
        quota_us: quota,
        period_us: period,
    })
}

/// The CPUs this process may run on (`Cpus_allowed_list` in `/proc/self/status`, e.g. "0-3,8").
fn schedulable_cpus(root: &Path) -> Option<usize> {
    let status = fs::read_to_string(root.join("proc/self/status")).ok()?;
    let list = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))?
        .trim();
    let mut count = 0usize;
    for range in list.split(',').filter(|r| !r.is_empty()) {
        count += match range.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (first.parse::<usize>().ok()?, last.parse::<usize>().ok()?);
                last.checked_sub(first)? + 1
            }
            None => {
                range.parse::<usize>().ok()?;
                1
            }
        };
    }
    (count > 0).then_some(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory laid out like `/` for the files this module reads, removed when dropped.
    struct Fake(PathBuf);

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    impl Fake {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("rolemesh-cores-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(dir.join("proc/self")).unwrap();
            Self(dir)
        }
        fn root(&self) -> &Path {
            &self.0
        }
        fn write(&self, path: &str, text: &str) -> &Self {
            let path = self.root().join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
            self
        }
        fn cpus(&self, list: &str) -> &Self {
            self.write(
                "proc/self/status",
                &format!("Name:\tproxy\nCpus_allowed_list:\t{list}\n"),
            )
        }
    }

    const V1_HOST_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
";

    fn auto(fake: &Fake) -> RuntimeSize {
        runtime_size(CoresSetting::Auto, fake.root())
    }

    #[test]
    fn v1_quota_of_the_process_cgroup_rounds_up() {
        let fake = Fake::new("v1");
        fake.write("proc/self/mountinfo", V1_HOST_MOUNTS)
            .write(
                "proc/self/cgroup",
                "12:memory:/kubepods/pod1/c1\n4:cpu,cpuacct:/kubepods/pod1/c1\n0::/\n",
            )
            .write("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
            .write("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
            .write(
                "sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/c1/cpu.cfs_quota_us",
                "150000\n",
            )
            .write(
                "sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/c1/cpu.cfs_period_us",
                "100000\n",
            )
            .cpus("0-7");
        assert_eq!(
            auto(&fake),
            RuntimeSize {
                threads: NonZeroUsize::new(2).unwrap(),
                source: CoresSource::CpuLimit { millicores: 1500 }
            }
        );
    }

    #[test]
    fn a_tighter_ancestor_wins() {
        let fake = Fake::new("ancestor");
        fake.write("proc/self/mountinfo", V1_HOST_MOUNTS)
            .write("proc/self/cgroup", "4:cpu,cpuacct:/kubepods/pod1/c1\n")
            .write(
                "sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/cpu.cfs_quota_us",
                "100000\n",
            )
            .write(
                "sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/cpu.cfs_period_us",
                "100000\n",
            )
            .write(
                "sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/c1/cpu.cfs_quota_us",
                "400000\n",
            )
            .write(
                "sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/c1/cpu.cfs_period_us",
                "100000\n",
            )
            .cpus("0-7");
        assert_eq!(auto(&fake).threads.get(), 1);
        assert_eq!(
            auto(&fake).source,
            CoresSource::CpuLimit { millicores: 1000 }
        );
    }

    #[test]
    fn v1_container_view_of_its_own_cgroup_as_the_mount_root() {
        // containerd mounts the container's own cgroup directory: the mount's root is the
        // container's path, so the path in /proc/self/cgroup is the mount point itself.
        let fake = Fake::new("v1-container");
        fake.write(
            "proc/self/mountinfo",
            "700 690 0:29 /kubepods/pod1/c1 /sys/fs/cgroup/cpu,cpuacct ro,nosuid - cgroup cgroup rw,cpuacct,cpu\n",
        )
        .write("proc/self/cgroup", "4:cpu,cpuacct:/kubepods/pod1/c1\n")
        .write("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "400000\n")
        .write("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
        .cpus("0-1");
        // Four cores of quota, but only two CPUs to run on.
        assert_eq!(
            auto(&fake),
            RuntimeSize {
                threads: NonZeroUsize::new(2).unwrap(),
                source: CoresSource::CpuLimit { millicores: 4000 }
            }
        );
    }

    #[test]
    fn v2_cpu_max_under_a_cgroup_namespace() {
        let fake = Fake::new("v2");
        fake.write(
            "proc/self/mountinfo",
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate\n",
        )
        .write("proc/self/cgroup", "0::/\n")
        .write("sys/fs/cgroup/cpu.max", "250000 100000\n")
        .cpus("0-15");
        assert_eq!(
            auto(&fake),
            RuntimeSize {
                threads: NonZeroUsize::new(3).unwrap(),
                source: CoresSource::CpuLimit { millicores: 2500 }
            }
        );
    }

    #[test]
    fn v2_without_a_limit_runs_one_thread() {
        let fake = Fake::new("v2-max");
        fake.write(
            "proc/self/mountinfo",
            "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
        )
        .write(
            "proc/self/cgroup",
            "0::/kubepods.slice/pod1.slice/c1.scope\n",
        )
        .write("sys/fs/cgroup/cpu.max", "max 100000\n")
        .write(
            "sys/fs/cgroup/kubepods.slice/pod1.slice/c1.scope/cpu.max",
            "max 100000\n",
        )
        .cpus("0-15");
        assert_eq!(
            auto(&fake),
            RuntimeSize {
                threads: NonZeroUsize::MIN,
                source: CoresSource::NoCpuLimit
            }
        );
    }

    #[test]
    fn unreadable_cgroups_run_one_thread_and_fixed_is_kept() {
        let fake = Fake::new("none");
        assert_eq!(auto(&fake).threads, NonZeroUsize::MIN);
        let four = NonZeroUsize::new(4).unwrap();
        assert_eq!(
            runtime_size(CoresSetting::Fixed(four), fake.root()),
            RuntimeSize {
                threads: four,
                source: CoresSource::Fixed
            }
        );
    }

    #[test]
    fn cpu_lists_are_counted() {
        let fake = Fake::new("cpus");
        fake.cpus("0-3,8,10-11");
        assert_eq!(schedulable_cpus(fake.root()), Some(7));
        fake.cpus("garbage");
        assert_eq!(schedulable_cpus(fake.root()), None);
    }
}
