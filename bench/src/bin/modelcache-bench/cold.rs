//! C1–C4 and T4: cold fetches on three origin profiles, each beside `s5cmd cp` and the
//! direct parallel ranged GET, and where the CPU of a cold fetch goes.

use std::time::Duration;

use anyhow::Result;
use modelcache_bench::measure::{self, Row, Table};
use modelcache_testkit::S3Server;

use crate::{Data, Opts};

/// How an origin behaves, set on the S3 server's tap for the cold rows.
struct Profile {
    id: &'static str,
    name: &'static str,
    /// Added before every request is answered (a gateway's cost per request).
    request_ms: u64,
    /// Added before each object GET's first byte.
    first_byte_ms: u64,
    /// Each GET's body at most this fast (0: as fast as loopback goes).
    bytes_per_sec: u64,
    /// Cold prefetch time / s5cmd's, at most.
    target: f64,
}

const PROFILES: [Profile; 3] = [
    Profile {
        id: "C1",
        name: "loopback",
        request_ms: 0,
        first_byte_ms: 0,
        bytes_per_sec: 0,
        target: 1.5,
    },
    Profile {
        id: "C2",
        name: "cloud-like (30 ms first byte, 100 MB/s per connection)",
        request_ms: 0,
        first_byte_ms: 30,
        bytes_per_sec: 100_000_000,
        target: 1.0,
    },
    Profile {
        id: "C3",
        name: "expensive requests (350 ms each)",
        request_ms: 350,
        first_byte_ms: 0,
        bytes_per_sec: 0,
        target: 1.0,
    },
];

impl Profile {
    fn apply(&self, s3: &S3Server) {
        use std::sync::atomic::Ordering::SeqCst;
        s3.tap.delay_all_ms.store(self.request_ms, SeqCst);
        s3.tap.get_delay_ms.store(self.first_byte_ms, SeqCst);
        s3.tap.bytes_per_sec.store(self.bytes_per_sec, SeqCst);
    }
}

/// Cold fetches on three origin profiles, each beside `s5cmd cp` and the direct parallel
/// ranged GET on the same profile; and where the CPU of a cold fetch goes.
pub(crate) async fn cold(opts: &Opts, s3: &S3Server, data: &Data, table: &mut Table) -> Result<()> {
    let gib = data.size as f64 / (1u64 << 30) as f64;
    for (n, profile) in PROFILES.iter().enumerate() {
        eprintln!("==> cold fetches, {}", profile.name);
        profile.apply(s3);
        let result = cold_on(opts, s3, data, n).await;
        PROFILES[0].apply(s3);
        let run = result?;
        let scenario = format!(
            "agent prefetch, cold node, {}, {}",
            data.single_label, profile.name
        );
        eprintln!(
            "    {:.2} s: node {:.2} CPU-s/GiB ({:.0} page faults/GiB), agent {:.2}, S3 \
             server {:.2}; s5cmd {:.2} s; direct ranged GET {:.2} s (client + S3 server \
             {:.2} CPU-s/GiB)",
            run.agent.as_secs_f64(),
            run.node_cpu.as_secs_f64() / gib,
            run.node_faults as f64 / gib,
            run.agent_cpu.as_secs_f64() / gib,
            run.server_cpu.as_secs_f64() / gib,
            run.s5cmd.as_secs_f64(),
            run.direct.as_secs_f64(),
            run.direct_cpu.as_secs_f64() / gib,
        );
        table.push(Row::time(
            profile.id,
            &scenario,
            run.agent,
            "s5cmd cp",
            run.s5cmd,
            profile.target,
        ));
        if n == 0 {
            table.push(Row::report(
                "C5",
                "node CPU per GiB after a cold fetch, in the background (SHA-256 of the \
                 file, chunks made sure to be on disk, manifest saved), loopback",
                run.background.as_secs_f64() / gib,
                "CPU-s/GiB",
            ));
            table.push(Row::ratio(
                "C4",
                &format!(
                    "node CPU-s per GiB, cold transfer path, loopback ({:.0}k page faults \
                     per GiB; agent {:.2}, direct client + S3 server {:.2})",
                    run.node_faults as f64 / gib / 1000.0,
                    run.agent_cpu.as_secs_f64() / gib,
                    run.direct_cpu.as_secs_f64() / gib
                ),
                run.node_cpu.as_secs_f64() / gib,
                "1 CPU-s per GiB",
                1.5,
                false,
            ));
        }
    }
    Ok(())
}

/// One profile's cold runs.
struct ColdRun {
    agent: Duration,
    node_cpu: Duration,
    /// The node's minor page faults in the same window.
    node_faults: u64,
    /// The node's CPU after the transfer ended (SHA-256, persist, save).
    background: Duration,
    agent_cpu: Duration,
    server_cpu: Duration,
    s5cmd: Duration,
    direct: Duration,
    direct_cpu: Duration,
}

async fn cold_on(opts: &Opts, s3: &S3Server, data: &Data, n: usize) -> Result<ColdRun> {
    // Cold: an empty node for every profile; the background SHA-256 and origin checks
    // are counted (they are part of what the node does for a cold fetch).
    let mut node = measure::NodeProcess::start_with(
        &opts.bin,
        s3,
        &opts.work.join(format!("node-cold-{n}")),
        &opts.cold_memory,
        &opts.node_arg,
    )?;
    // CPU time is read inside the timed closures, after the page cache was dropped (which
    // costs this process CPU time of its own).
    let me = std::process::id();
    let cpu = || measure::cpu_time(me).unwrap_or_default();
    let dir = opts.work.join(format!("agent-cold-{n}"));
    let faults_before = node.minor_faults()?;
    let (cpu_used, agent) = measure::timed(|| {
        let (node_before, (bench_before, children_before)) = (node.cpu_time()?, cpu());
        measure::agent_prefetch(&opts.bin, &node.url, &dir, "single")?;
        let (bench, children) = cpu();
        Ok([
            node.cpu_time()? - node_before,
            children - children_before,
            bench - bench_before,
        ])
    })?;
    let node_faults = node.minor_faults()? - faults_before;
    // What the node does after the transfer (the file's SHA-256, making sure every chunk
    // is on disk, saving the manifest): its CPU until it has been still for a second.
    let background = {
        let after = node.cpu_time()?;
        let mut last = after;
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let now = node.cpu_time()?;
            if now - last < Duration::from_millis(20) {
                break now - after;
            }
            last = now;
        }
    };
    node.stop()?;
    measure::check_sha(&dir.join("single/@original/model.bin"), &data.single_sha)?;
    measure::remove(&dir);
    let (direct_cpu, direct) = measure::timed_async(async {
        let before = cpu().0;
        measure::direct_ranged_get(
            s3,
            "single/model.bin",
            &opts.work.join("direct.bin"),
            data.size,
        )
        .await?;
        Ok(cpu().0 - before)
    })
    .await?;
    measure::remove(&opts.work.join("direct.bin"));
    let ((), s5cmd) = measure::timed(|| {
        measure::s5cmd_cp(
            &opts.venv_bin,
            s3,
            "single/model.bin",
            &opts.work.join("s5cmd.bin"),
        )
    })?;
    measure::remove(&opts.work.join("s5cmd.bin"));
    let [node_cpu, agent_cpu, server_cpu] = cpu_used;
    Ok(ColdRun {
        agent,
        node_cpu,
        node_faults,
        background,
        agent_cpu,
        server_cpu,
        s5cmd,
        direct,
        direct_cpu,
    })
}
