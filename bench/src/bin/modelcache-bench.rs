//! `modelcache-bench`: modelcache side by side with the tools people would use instead,
//! on the same machine, the same data and in the same run; prints one table of ratios.
//!
//! References: nginx (sendfile) fetched with curl, a direct parallel ranged GET from the
//! same S3 server (object_store, 8 ranges of 8 MiB in flight), `s5cmd cp`, `aws s3 cp`,
//! and `sha256sum` after a plain download. The S3 server is the suite's in-process s3s-fs
//! server, seeded through the S3 API. `scripts/bench` installs the references.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use modelcache_bench::measure::{self, Row, Table};
use modelcache_tests::{S3Server, data};

const MIB: usize = 1024 * 1024;

struct Opts {
    work: PathBuf,
    bin: PathBuf,
    venv_bin: PathBuf,
    /// Size of the single-file model, MiB.
    single_mib: usize,
    /// Size of the multi-file model, MiB.
    multi_mib: usize,
}

fn parse_opts() -> Result<Opts> {
    let mut opts = Opts {
        work: PathBuf::from("target/bench-work"),
        bin: PathBuf::from("target/release"),
        venv_bin: PathBuf::from("target/bench-venv/bin"),
        single_mib: 1024,
        multi_mib: 2048,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().context("missing value");
        match arg.as_str() {
            "--work" => opts.work = value()?.into(),
            "--bin" => opts.bin = value()?.into(),
            "--venv-bin" => opts.venv_bin = value()?.into(),
            "--single-mib" => opts.single_mib = value()?.parse()?,
            "--multi-mib" => opts.multi_mib = value()?.parse()?,
            other => bail!("unknown argument {other}; see scripts/bench"),
        }
    }
    opts.work = std::path::absolute(&opts.work)?;
    opts.bin = std::path::absolute(&opts.bin)?;
    opts.venv_bin = std::path::absolute(&opts.venv_bin)?;
    Ok(opts)
}

#[tokio::main]
async fn main() -> Result<()> {
    let opts = parse_opts()?;
    let _ = std::fs::remove_dir_all(&opts.work);
    std::fs::create_dir_all(&opts.work)?;
    let mut table = Table::default();

    eprintln!("==> S3 server (in-process s3s-fs) and test data");
    let s3 = S3Server::start().await;
    let single = data(1, opts.single_mib * MIB);
    s3.put("single/model.bin", &single).await;
    let parts = 4;
    let part_len = opts.multi_mib * MIB / parts;
    for i in 0..parts {
        s3.put(
            &format!("multi/part-{i}.bin"),
            &data(100 + i as u64, part_len),
        )
        .await;
    }
    s3.put("multi/config.json", b"{\"parts\": 4}").await;
    let www = opts.work.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("model.bin"), &single)?;
    let single_sha = measure::sha256_hex(&single);
    drop(single);

    let nginx = measure::Nginx::start(&opts.work.join("nginx"), &www)?;
    let nginx_url = format!("http://127.0.0.1:{}/model.bin", nginx.port);
    let size = (opts.single_mib * MIB) as u64;
    let multi_size = (opts.multi_mib * MIB) as u64 + 12;
    let single_label = format!("{} MiB single file", opts.single_mib);
    let multi_label = format!("{} MiB in 5 files", opts.multi_mib);

    // Cold: the node is empty for every modelcache run.
    eprintln!("==> cold fetches (T4, T5)");
    let mut node =
        measure::NodeProcess::start(&opts.bin, &s3, &opts.work.join("node-cold-1"), "2GiB")?;
    let agent_cold = measure::timed(|| {
        measure::agent_prefetch(
            &opts.bin,
            &node.url,
            &opts.work.join("agent-cold"),
            "single",
        )
    })?;
    node.stop()?;
    let direct = measure::timed_async(measure::direct_ranged_get(
        &s3,
        "single/model.bin",
        &opts.work.join("direct.bin"),
        size,
    ))
    .await?;
    let s5cmd = measure::timed(|| {
        measure::s5cmd_cp(
            &opts.venv_bin,
            &s3,
            "single/model.bin",
            &opts.work.join("s5cmd.bin"),
        )
    })?;
    let awscli = measure::timed(|| {
        measure::aws_cp(
            &opts.venv_bin,
            &s3,
            "single/model.bin",
            &opts.work.join("aws.bin"),
        )
    })?;
    table.push(Row::time(
        "T4",
        &format!("agent prefetch, cold node, {single_label}"),
        agent_cold.1,
        "direct parallel ranged GET",
        direct.1,
        1.25,
    ));
    table.push(Row::time(
        "T5a",
        &format!("agent prefetch, cold node, {single_label}"),
        agent_cold.1,
        "s5cmd cp",
        s5cmd.1,
        1.0,
    ));
    table.push(Row::time(
        "T5b",
        &format!("agent prefetch, cold node, {single_label}"),
        agent_cold.1,
        "aws s3 cp",
        awscli.1,
        0.5,
    ));
    measure::check_sha(
        &opts.work.join("agent-cold/single/@original/model.bin"),
        &single_sha,
    )?;

    eprintln!("==> warm fetches (T1, T2, T3)");
    let node = measure::NodeProcess::start(&opts.bin, &s3, &opts.work.join("node-warm"), "2GiB")?;
    measure::agent_prefetch(
        &opts.bin,
        &node.url,
        &opts.work.join("agent-prime"),
        "single",
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let agent_warm = measure::timed(|| {
        measure::agent_prefetch(
            &opts.bin,
            &node.url,
            &opts.work.join("agent-warm"),
            "single",
        )
    })?;
    let curl_file = measure::timed(|| measure::curl(&nginx_url, &opts.work.join("curl.bin")))?;
    let curl_sha = measure::timed(|| {
        measure::curl(&nginx_url, &opts.work.join("curl-sha.bin"))?;
        measure::sha256sum(&opts.work.join("curl-sha.bin"))
    })?;
    let node_discard =
        measure::timed_async(measure::fetch_discard(&node.url, "single", false)).await?;
    let curl_null = measure::timed(|| measure::curl(&nginx_url, Path::new("/dev/null")))?;
    table.push(Row::throughput(
        "T1",
        &format!("node memory hit, client discards, {single_label}"),
        size,
        node_discard.1,
        "nginx → curl > /dev/null",
        curl_null.1,
        0.7,
    ));
    table.push(Row::time(
        "T2",
        &format!("agent prefetch, warm node, verified, {single_label}"),
        agent_warm.1,
        "curl from nginx to disk",
        curl_file.1,
        1.3,
    ));
    table.push(Row::time(
        "T3",
        &format!("agent prefetch, warm node, verified, {single_label}"),
        agent_warm.1,
        "curl + sha256sum",
        curl_sha.1,
        0.3,
    ));

    eprintln!("==> node restart: warm from the disk tier (T8)");
    let warm_rate = size as f64 / agent_warm.1.as_secs_f64();
    let mut node = node;
    node.restart()?;
    measure::drop_page_cache();
    let agent_disk = measure::timed(|| {
        measure::agent_prefetch(
            &opts.bin,
            &node.url,
            &opts.work.join("agent-disk"),
            "single",
        )
    })?;
    let disk_rate = size as f64 / agent_disk.1.as_secs_f64();
    table.push(Row::ratio(
        "T8",
        &format!("warm fetch after node restart (disk tier), {single_label}: throughput"),
        disk_rate / warm_rate,
        "memory-tier warm fetch",
        0.5,
        true,
    ));
    node.stop()?;
    for leftover in ["agent-warm", "agent-disk", "node-warm"] {
        measure::remove(&opts.work.join(leftover));
    }

    eprintln!("==> 16 concurrent cold fetches of one model (T6)");
    // 16 full copies would not fit this machine's disk next to everything else, so the 16
    // clients verify every chunk's BLAKE3 like the agent does and discard the bytes.
    let node = measure::NodeProcess::start(&opts.bin, &s3, &opts.work.join("node-16"), "2GiB")?;
    s3.tap.reset();
    let clients = (0..16).map(|_| measure::fetch_discard(&node.url, "multi", true));
    for received in futures::future::join_all(clients).await {
        anyhow::ensure!(
            received? == multi_size,
            "a client got the wrong number of bytes"
        );
    }
    let origin_bytes = s3.tap.get_bytes.load(Ordering::SeqCst);
    table.push(Row::ratio(
        "T6",
        &format!("16 concurrent cold fetches of one model ({multi_label}): origin bytes"),
        origin_bytes as f64 / multi_size as f64,
        "model size",
        1.05,
        false,
    ));
    drop(node);
    measure::remove(&opts.work.join("node-16"));

    eprintln!("==> memory (T7): 256 MiB memory tier, 2 GiB model cold then warm");
    let mut node =
        measure::NodeProcess::start(&opts.bin, &s3, &opts.work.join("node-rss"), "256MiB")?;
    let mut agent_peak = 0;
    for run in ["cold", "warm"] {
        let peak = measure::agent_prefetch_peak_rss(
            &opts.bin,
            &node.url,
            &opts.work.join(format!("agent-rss-{run}")),
            "multi",
        )?;
        agent_peak = agent_peak.max(peak);
        let _ = std::fs::remove_dir_all(opts.work.join(format!("agent-rss-{run}")));
    }
    let node_peak = node.peak_rss()?;
    node.stop()?;
    table.push(Row::memory(
        "T7a",
        &format!("node peak RSS, 256 MiB memory tier, {multi_label} cold + warm"),
        node_peak,
        512 * MIB as u64,
    ));
    table.push(Row::memory(
        "T7b",
        &format!("agent peak RSS, {multi_label}"),
        agent_peak,
        100 * MIB as u64,
    ));

    drop(nginx);
    println!(
        "{}",
        table.render(&format!(
            "S3 server: s3s-fs {} (in-process, loopback), seeded through the S3 API; nginx {}",
            "0.14",
            measure::nginx_version()
        ))
    );
    Ok(())
}
