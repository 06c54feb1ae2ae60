//! What /proc says about a process and the machine: memory and CPU time.

/// Resident set size of a process in KiB, from /proc; 0 once it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A KiB figure of /proc/PID/status (`VmRSS:`, `VmHWM:`, ...); 0 once the process is gone.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// File descriptors a process holds open; 0 once it is gone.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count())
        .unwrap_or(0)
}

/// The process of a pod's container running `binary`, found in the host's /proc (the node runs
/// on this host) by its cgroup, which names the pod (the cgroupfs driver `pod<uid>`, the systemd
/// driver `pod<uid with underscores>`) and its command's file name.
pub fn pod_process(uid: &str, binary: &str) -> Option<u32> {
    let names = [format!("pod{uid}"), format!("pod{}", uid.replace('-', "_"))];
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        if std::path::Path::new(&*String::from_utf8_lossy(argv0)).file_name()
            != Some(std::ffi::OsStr::new(binary))
        {
            continue;
        }
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if names.iter().any(|name| cgroup.contains(name.as_str())) {
            return Some(pid);
        }
    }
    None
}

/// /proc counts CPU time in USER_HZ ticks, 100 per second on x86-64 and arm64.
const MS_PER_TICK: f64 = 10.0;

/// CPU time a process has used so far (user + system, every thread including exited ones), in
/// milliseconds, from /proc; 0 once it is gone.
pub fn cpu_ms(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the command name, which is in parentheses and may contain spaces;
            // utime and stime are the 12th and 13th after it.
            let (_, rest) = stat.rsplit_once(')')?;
            let mut fields = rest.split_whitespace().skip(11);
            let utime: u64 = fields.next()?.parse().ok()?;
            let stime: u64 = fields.next()?.parse().ok()?;
            Some((utime + stime) as f64 * MS_PER_TICK)
        })
        .unwrap_or(0.0)
}

/// Busy and total CPU time of the whole machine so far, in USER_HZ ticks, from /proc/stat.
pub fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    let total: u64 = ticks.iter().sum();
    // idle and iowait are the fourth and fifth numbers.
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn rss_of_this_process_and_of_none() {
        let kib = rss_kib(std::process::id());
        assert!(kib > 100, "this test process uses {kib} KiB?");
        assert_eq!(rss_kib(u32::MAX), 0, "a process that does not exist");
    }

    #[test]
    fn cpu_ms_counts_the_cpu_this_process_burns() {
        let pid = std::process::id();
        let before = cpu_ms(pid);
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let burned = cpu_ms(pid) - before;
        // At least a few ticks of the spin, and no more than every CPU for the wall time it took
        // (other tests run in this process at the same time).
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let most = start.elapsed().as_secs_f64() * 1e3 * cpus + 30.0;
        assert!(burned >= 20.0, "counted only {burned} ms of a 300 ms spin");
        assert!(
            burned <= most,
            "counted {burned} ms, more than {most} ms possible"
        );
        assert_eq!(
            cpu_ms(u32::MAX),
            0.0,
            "a process that does not exist used no CPU"
        );
    }

    #[test]
    fn machine_ticks_grow_and_busy_is_part_of_total() {
        let (busy, total) = machine_ticks();
        assert!(busy <= total && total > 0);
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(50) {
            std::hint::black_box(0u64);
        }
        let (_, later) = machine_ticks();
        assert!(later >= total);
    }
}
