//! New mTLS handshakes per second with the server given 1, 2 and 4 CPUs (as many as the machine
//! has): a rolemesh server sidecar with that many runtime threads and stunnel4 (a thread per
//! connection) pinned with `taskset` to the same CPUs, against a load generator in its own
//! process pinned to the CPUs left over (or to all of them when the server has every CPU: then
//! the two share, and the printed CPU of each side says who was short). The generator's own CPU
//! is printed next to the server's so a run limited by the generator shows as one.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::Context;

use super::{Guard, cpu_ms, free_port, median, start_server_sidecar, start_stunnel_on, wait_port};

/// CPUs `first..first + count`, as `taskset -c` takes them.
#[derive(Clone, Debug)]
pub struct CpuSet {
    first: usize,
    count: usize,
}

impl CpuSet {
    pub fn count(&self) -> usize {
        self.count
    }

    fn list(&self) -> String {
        format!("{}-{}", self.first, self.first + self.count - 1)
    }
}

/// `program`, under `taskset -c` when pinned.
pub fn command_on(pinned: Option<&CpuSet>, program: &Path) -> Command {
    match pinned {
        Some(cpus) => {
            let mut command = Command::new("taskset");
            command.arg("-c").arg(cpus.list()).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// One server's figures at one CPU count (medians over rounds).
pub struct ServerFigures {
    pub handshakes_per_s: f64,
    /// CPUs the server process kept busy.
    pub server_cpus: f64,
    /// CPUs the load generator kept busy.
    pub load_cpus: f64,
}

pub struct CoresRow {
    pub cores: usize,
    /// Whether the generator had CPUs of its own (false: it shared the server's).
    pub load_apart: bool,
    pub rolemesh: ServerFigures,
    pub stunnel: ServerFigures,
    /// Median of the per-round ratios.
    pub ratio: f64,
}

/// Counts of CPUs the section measures: 1, 2 and 4, those the machine has.
pub fn core_counts(machine: usize) -> Vec<usize> {
    [1, 2, 4].into_iter().filter(|n| *n <= machine).collect()
}

async fn load(
    port: u16,
    dir: &Path,
    seconds: u64,
    pinned: &CpuSet,
    server_pid: u32,
) -> anyhow::Result<(f64, f64, f64)> {
    let server_before = cpu_ms(server_pid);
    let started = Instant::now();
    // 8 clients per generator thread keep every server thread busy without queueing so deep
    // that the figure measures the accept backlog.
    let threads = pinned.count();
    let output = command_on(Some(pinned), &std::env::current_exe()?)
        .args(["handshake-load", "--port", &port.to_string()])
        .arg("--dir")
        .arg(dir)
        .args(["--seconds", &seconds.to_string()])
        .args(["--concurrency", &(8 * threads).to_string()])
        .args(["--threads", &threads.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .context("running the handshake load generator")?;
    let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
    let server_ms = cpu_ms(server_pid) - server_before;
    anyhow::ensure!(
        output.status.success(),
        "the handshake load generator failed"
    );
    let text = String::from_utf8(output.stdout)?;
    let mut fields = text.split_whitespace().map(str::parse::<f64>);
    let (Some(Ok(rate)), Some(Ok(load_ms))) = (fields.next(), fields.next()) else {
        anyhow::bail!("the handshake load generator printed {text:?}");
    };
    Ok((rate, server_ms / wall_ms, load_ms / wall_ms))
}

pub async fn measure(
    proxy: &Path,
    stunnel: &Path,
    dir: &Path,
    echo_port: u16,
    stunnel_tls: &str,
    seconds: u64,
    rounds: usize,
) -> anyhow::Result<Vec<CoresRow>> {
    let machine = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rows = Vec::new();
    for cores in core_counts(machine) {
        let server_cpus = CpuSet {
            first: 0,
            count: cores,
        };
        let load_apart = cores < machine;
        let load_cpus = if load_apart {
            CpuSet {
                first: cores,
                count: machine - cores,
            }
        } else {
            CpuSet {
                first: 0,
                count: machine,
            }
        };
        let (port, admin, st_port) = (free_port()?, free_port()?, free_port()?);
        let server = start_server_sidecar(
            proxy,
            dir,
            &format!("server-{cores}-cores"),
            admin,
            serde_json::json!({"name": "echo", "port": port, "appPort": echo_port}),
            Some(&server_cpus),
        )?;
        let st_server: Guard = start_stunnel_on(
            stunnel,
            dir,
            &format!("stunnel-server-{cores}-cores"),
            &format!(
                "[srv]\naccept = 127.0.0.1:{st_port}\nconnect = 127.0.0.1:{echo_port}\nrequireCert = yes\n{stunnel_tls}"
            ),
            Some(&server_cpus),
        )?;
        wait_port(port).await?;
        wait_port(st_port).await?;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            // Alternate which server goes first, so neither always meets a warmer machine.
            let mut pair = [
                (port, server.0.id(), true),
                (st_port, st_server.0.id(), false),
            ];
            if round % 2 == 1 {
                pair.reverse();
            }
            for (target, pid, is_rolemesh) in pair {
                let figures = load(target, dir, seconds, &load_cpus, pid).await?;
                if is_rolemesh {
                    ours.push(figures);
                } else {
                    theirs.push(figures);
                }
            }
        }
        let figures = |runs: &[(f64, f64, f64)]| ServerFigures {
            handshakes_per_s: median(runs.iter().map(|r| r.0)),
            server_cpus: median(runs.iter().map(|r| r.1)),
            load_cpus: median(runs.iter().map(|r| r.2)),
        };
        rows.push(CoresRow {
            cores,
            load_apart,
            ratio: median(ours.iter().zip(&theirs).map(|(a, b)| a.0 / b.0)),
            rolemesh: figures(&ours),
            stunnel: figures(&theirs),
        });
    }
    Ok(rows)
}

pub fn print(rows: &[CoresRow], rounds: usize) {
    let machine = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!();
    println!(
        "new mTLS handshakes/s by server CPUs (taskset; rolemesh with as many runtime threads; medians of {rounds} rounds)"
    );
    println!(
        "{:<7} {:>10} {:>8} {:>8} {:>10} {:>8} {:>8} {:>7} {:>7} {:>7}",
        "cores",
        "rolemesh/s",
        "srv CPU",
        "load CPU",
        "stunnel/s",
        "srv CPU",
        "load CPU",
        "ratio",
        "target",
        "r/t"
    );
    for row in rows {
        println!(
            "{:<7} {:>10.0} {:>8.2} {:>8.2} {:>10.0} {:>8.2} {:>8.2} {:>7.2} {:>7} {:>7.2}{}",
            row.cores,
            row.rolemesh.handshakes_per_s,
            row.rolemesh.server_cpus,
            row.rolemesh.load_cpus,
            row.stunnel.handshakes_per_s,
            row.stunnel.server_cpus,
            row.stunnel.load_cpus,
            row.ratio,
            ">= 2",
            row.ratio / 2.0,
            if row.load_apart {
                ""
            } else {
                "  (load generator shares the server's CPUs)"
            }
        );
    }
    for cores in [1, 2, 4].into_iter().filter(|n| *n > machine) {
        println!("{cores:<7} not measured: this machine has {machine} CPUs");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_counts_are_those_the_machine_has() {
        assert_eq!(core_counts(1), vec![1]);
        assert_eq!(core_counts(2), vec![1, 2]);
        assert_eq!(core_counts(16), vec![1, 2, 4]);
    }

    #[test]
    fn cpu_sets_are_taskset_lists() {
        assert_eq!(CpuSet { first: 0, count: 1 }.list(), "0-0");
        assert_eq!(CpuSet { first: 2, count: 2 }.list(), "2-3");
    }
}
