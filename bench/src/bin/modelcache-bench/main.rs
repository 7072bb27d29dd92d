//! `modelcache-bench`: modelcache side by side with the tools people would use instead,
//! on the same machine, the same data and in the same run; prints one table of ratios.
//!
//! References: nginx (sendfile) fetched with curl, a direct parallel ranged GET from the
//! same S3 server (object_store, 8 ranges of 8 MiB in flight), `s5cmd cp`, `aws s3 cp`,
//! and `sha256sum` after a plain download. The S3 server is the suite's in-process one (s3s
//! over s3s-fs storage, see `modelcache_testkit::s3`), seeded through the S3 API.
//! `scripts/bench` installs the references. `--only cold,warm,many,memory,variants` runs
//! some groups of scenarios; the cold group also prints where the CPU time went.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use modelcache_bench::measure::{self, Row, Table};
use modelcache_testkit::{S3Server, data};

mod cold;

const MIB: usize = 1024 * 1024;
/// T9 and T10 time each side this many times and keep its best.
const BEST_OF: usize = 3;

/// Groups of scenarios `--only` selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Group {
    /// C1–C4 (and T4): cold fetches on three origin profiles against s5cmd and the direct
    /// ranged GET, and the node's CPU per GiB.
    Cold,
    /// T1, T2, T3, T8: warm fetches against nginx and curl.
    Warm,
    /// T6: many agents at once.
    Many,
    /// T7: node and agent memory.
    Memory,
    /// T9, T10, V1, V2: quantizers and variants.
    Variants,
}

/// modelcache side by side with the tools people would use instead, on the same machine,
/// the same data and in the same run; prints one table of ratios. `scripts/bench` installs
/// the references first.
#[derive(clap::Parser, Debug)]
#[command(name = "modelcache-bench")]
struct Opts {
    /// Run some groups of scenarios (comma-separated); all when not given.
    #[arg(long, value_delimiter = ',')]
    only: Vec<Group>,
    /// Same as `--only variants`.
    #[arg(long, conflicts_with = "only")]
    variants_only: bool,
    /// Size of the single-file model, MiB.
    #[arg(long, default_value_t = 1024)]
    single_mib: usize,
    /// Size of the multi-file model, MiB.
    #[arg(long, default_value_t = 2048)]
    multi_mib: usize,
    /// Scratch directory.
    #[arg(long, default_value = "target/bench-work")]
    work: PathBuf,
    /// Where cache-node, cache-agent and modelcache-quantize are.
    #[arg(long, default_value = "target/release")]
    bin: PathBuf,
    /// Where s5cmd and aws are.
    #[arg(long, default_value = "target/bench-venv/bin")]
    venv_bin: PathBuf,
    /// More flags for the nodes of the cold rows (repeat it), e.g.
    /// `--node-arg=--origin-part-size=32MiB`.
    #[arg(long, allow_hyphen_values = true)]
    node_arg: Vec<String>,
    /// The memory tier of the nodes of the cold rows: smaller than the model, every chunk
    /// read evicts an older one, as on a busy node.
    #[arg(long, default_value = "2GiB")]
    cold_memory: String,
    /// Nodes and agents export their spans over OTLP to a receiver in this process (to
    /// measure what tracing costs: compare with a run without it).
    #[arg(long)]
    traced: bool,
    /// Nodes serve mutual TLS and agents call them with client certificates (to measure
    /// what TLS costs: compare with a run without it).
    #[arg(long)]
    tls: bool,
    /// The Python with onnxruntime.
    #[arg(long, default_value = "target/py-venv/bin/python")]
    python: PathBuf,
}

impl Opts {
    fn runs(&self, group: Group) -> bool {
        self.only.is_empty() || self.only.contains(&group)
    }
}

fn parse_opts() -> Result<Opts> {
    let mut opts = <Opts as clap::Parser>::parse();
    if opts.variants_only {
        opts.only = vec![Group::Variants];
    }
    for path in [
        &mut opts.work,
        &mut opts.bin,
        &mut opts.venv_bin,
        &mut opts.python,
    ] {
        *path = std::path::absolute(&*path)?;
    }
    Ok(opts)
}

#[tokio::main]
async fn main() -> Result<()> {
    let opts = parse_opts()?;
    let _ = std::fs::remove_dir_all(&opts.work);
    std::fs::create_dir_all(&opts.work)?;
    let mut table = Table::default();
    let spans = modelcache_testkit::otlp::Receiver::default();
    if opts.traced {
        measure::export_spans_to(spans.start().await);
    }
    if opts.tls {
        measure::use_tls(&opts.work.join("tls"))?;
    }

    eprintln!("==> S3 server (in-process s3s) and test data");
    let s3 = S3Server::start().await;
    let mut footer = String::from(
        "S3 server: s3s 0.14 with s3s-fs 0.14 storage, object bodies read in 1 MiB blocks \
         (in-process, loopback), seeded through the S3 API",
    );
    if [Group::Cold, Group::Warm, Group::Many, Group::Memory]
        .into_iter()
        .any(|g| opts.runs(g))
    {
        let data = Data::seed(&opts, &s3).await?;
        if opts.runs(Group::Cold) {
            cold::cold(&opts, &s3, &data, &mut table).await?;
        }
        if opts.runs(Group::Warm) {
            warm(&opts, &s3, &data, &mut table).await?;
        }
        if opts.runs(Group::Many) {
            many(&opts, &s3, &data, &mut table).await?;
        }
        if opts.runs(Group::Memory) {
            memory(&opts, &s3, &data, &mut table)?;
        }
        footer.push_str(&format!("; nginx {}", measure::nginx_version()));
    }
    if opts.runs(Group::Variants) {
        variants(&opts, &s3, &mut table).await?;
    }
    if opts.traced {
        footer.push_str(&format!(
            "; traced: nodes and agents exported {} spans over OTLP/gRPC",
            spans.spans().len()
        ));
    }
    println!("{}", table.render(&footer));
    Ok(())
}

/// The benchmark's models in the S3 server, and the single file behind nginx.
struct Data {
    /// Serves the single file for T1–T3 until the benchmark ends.
    _nginx: measure::Nginx,
    nginx_url: String,
    single_sha: String,
    size: u64,
    multi_size: u64,
    single_label: String,
    multi_label: String,
}

impl Data {
    async fn seed(opts: &Opts, s3: &S3Server) -> Result<Self> {
        let single = data(1, opts.single_mib * MIB);
        s3.put("single/model.bin", &single).await;
        if opts.runs(Group::Many) || opts.runs(Group::Memory) {
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
        }
        let www = opts.work.join("www");
        std::fs::create_dir_all(&www)?;
        std::fs::write(www.join("model.bin"), &single)?;
        let nginx = measure::Nginx::start(&opts.work.join("nginx"), &www)?;
        Ok(Self {
            nginx_url: format!("http://127.0.0.1:{}/model.bin", nginx.port),
            _nginx: nginx,
            single_sha: measure::sha256_hex(&single),
            size: (opts.single_mib * MIB) as u64,
            multi_size: (opts.multi_mib * MIB) as u64 + 12,
            single_label: format!("{} MiB single file", opts.single_mib),
            multi_label: format!("{} MiB in 5 files", opts.multi_mib),
        })
    }
}

/// T1, T2, T3 (warm node) and T8 (warm from the disk tier after a restart).
async fn warm(opts: &Opts, s3: &S3Server, data: &Data, table: &mut Table) -> Result<()> {
    eprintln!("==> warm fetches (T1, T2, T3)");
    let node = measure::NodeProcess::start(&opts.bin, s3, &opts.work.join("node-warm"), "2GiB")?;
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
    let curl_file = measure::timed(|| measure::curl(&data.nginx_url, &opts.work.join("curl.bin")))?;
    let curl_sha = measure::timed(|| {
        measure::curl(&data.nginx_url, &opts.work.join("curl-sha.bin"))?;
        measure::sha256sum(&opts.work.join("curl-sha.bin"))
    })?;
    let node_discard =
        measure::timed_async(measure::fetch_discard(&node.url, "single", false)).await?;
    let curl_null = measure::timed(|| measure::curl(&data.nginx_url, Path::new("/dev/null")))?;
    table.push(Row::throughput(
        "T1",
        &format!("node memory hit, client discards, {}", data.single_label),
        data.size,
        node_discard.1,
        "nginx → curl > /dev/null",
        curl_null.1,
        0.7,
    ));
    table.push(Row::time(
        "T2",
        &format!("agent prefetch, warm node, verified, {}", data.single_label),
        agent_warm.1,
        "curl from nginx to disk",
        curl_file.1,
        1.3,
    ));
    table.push(Row::time(
        "T3",
        &format!("agent prefetch, warm node, verified, {}", data.single_label),
        agent_warm.1,
        "curl + sha256sum",
        curl_sha.1,
        0.3,
    ));

    eprintln!("==> node restart: warm from the disk tier (T8)");
    let warm_rate = data.size as f64 / agent_warm.1.as_secs_f64();
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
    let disk_rate = data.size as f64 / agent_disk.1.as_secs_f64();
    table.push(Row::ratio(
        "T8",
        &format!(
            "warm fetch after node restart (disk tier), {}: throughput",
            data.single_label
        ),
        disk_rate / warm_rate,
        "memory-tier warm fetch",
        0.5,
        true,
    ));
    node.stop()?;
    for leftover in ["agent-warm", "agent-disk", "node-warm"] {
        measure::remove(&opts.work.join(leftover));
    }
    Ok(())
}

/// T6: 16 concurrent cold fetches of one model.
async fn many(opts: &Opts, s3: &S3Server, data: &Data, table: &mut Table) -> Result<()> {
    eprintln!("==> 16 concurrent cold fetches of one model (T6)");
    // 16 full copies would not fit this machine's disk next to everything else, so the 16
    // clients verify every chunk's BLAKE3 like the agent does and discard the bytes.
    let node = measure::NodeProcess::start(&opts.bin, s3, &opts.work.join("node-16"), "2GiB")?;
    s3.tap.reset();
    let clients = (0..16).map(|_| measure::fetch_discard(&node.url, "multi", true));
    for received in futures::future::join_all(clients).await {
        anyhow::ensure!(
            received? == data.multi_size,
            "a client got the wrong number of bytes"
        );
    }
    let origin_bytes = s3.tap.get_bytes.load(Ordering::SeqCst);
    table.push(Row::ratio(
        "T6",
        &format!(
            "16 concurrent cold fetches of one model ({}): origin bytes",
            data.multi_label
        ),
        origin_bytes as f64 / data.multi_size as f64,
        "model size",
        1.05,
        false,
    ));
    drop(node);
    measure::remove(&opts.work.join("node-16"));
    Ok(())
}

/// T7: peak RSS of node and agent.
fn memory(opts: &Opts, s3: &S3Server, data: &Data, table: &mut Table) -> Result<()> {
    eprintln!("==> memory (T7): 256 MiB memory tier, 2 GiB model cold then warm");
    let mut node =
        measure::NodeProcess::start(&opts.bin, s3, &opts.work.join("node-rss"), "256MiB")?;
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
        &format!(
            "node peak RSS, 256 MiB memory tier, {} cold + warm",
            data.multi_label
        ),
        node_peak,
        512 * MIB as u64,
    ));
    table.push(Row::memory(
        "T7b",
        &format!("agent peak RSS, {}", data.multi_label),
        agent_peak,
        100 * MIB as u64,
    ));
    Ok(())
}

/// T9, T10 and the quantizers' memory: the ResNet-50-shaped sample (fp32, opset 13).
async fn variants(opts: &Opts, s3: &S3Server, table: &mut Table) -> Result<()> {
    eprintln!("==> variants (T9, T10, quantizer memory)");
    let dir = opts.work.join("variants");
    std::fs::create_dir_all(&dir)?;
    let model = modelcache_bench::resnet::resnet50(50);
    let model_path = dir.join("resnet50.onnx");
    std::fs::write(&model_path, &model)?;
    s3.put("resnet50/model.onnx", &model).await;
    let model_size = model.len() as u64;

    // T9: the node's quantizer in-process (read, transform, write) against onnxruntime's
    // quantize_dynamic in-process, same file. The source's SHA-256 for the provenance is
    // not computed here: a node has it already, from hashing the original as it arrived
    // (SPEC §2), and passes it in. Both read the file from the page cache (it was just
    // written), and each takes its best of `BEST_OF`.
    let source_sha256 = measure::sha256_hex(&model);
    let quantize_once = || -> Result<Duration> {
        let start = std::time::Instant::now();
        let bytes = bytes::Bytes::from(std::fs::read(&model_path)?);
        let provenance = modelcache_quant::Provenance {
            source_sha256: source_sha256.clone(),
            variant: modelcache_quant::Variant::Int8,
            format: modelcache_quant::Format::Onnx,
        };
        let out = modelcache_quant::onnx::transform(
            bytes,
            modelcache_quant::Variant::Int8,
            &provenance,
            &mut |_| Err(modelcache_quant::QuantError::invalid("no external data")),
        )?;
        std::fs::write(dir.join("ours-int8.onnx"), out.model)?;
        Ok(start.elapsed())
    };
    let mut ours = Duration::MAX;
    for _ in 0..BEST_OF {
        ours = ours.min(quantize_once()?);
    }
    let ort = measure::ort_quantize_dynamic(
        &opts.python,
        &model_path,
        &dir.join("ort-int8.onnx"),
        BEST_OF,
    )?;
    table.push(Row::ratio(
        "T9",
        "ONNX int8 of the ResNet-50 sample (102 MB): speed",
        ort.as_secs_f64() / ours.as_secs_f64(),
        &format!(
            "onnxruntime quantize_dynamic(per_channel=True): {:.2} s vs ours {:.2} s",
            ort.as_secs_f64(),
            ours.as_secs_f64()
        ),
        20.0,
        true,
    ));

    // T9i: the same comparison in instructions (callgrind, one core), which do not swing
    // with the machine's load: ours inside `model::build` (read, decode, quantize, encode;
    // the source's SHA-256 runs on a thread of its own and is not counted), onnxruntime's
    // inside the `quantize_dynamic` call (load, quantize, save).
    let quantize = opts.bin.join("modelcache-quantize");
    let mut ours_cmd = std::process::Command::new(&quantize);
    ours_cmd
        .arg("int8")
        .arg(&model_path)
        .arg(dir.join("ours-int8-cg.onnx"));
    let ours_ir =
        measure::callgrind_instructions(&ours_cmd, Some("modelcache_quant::model::build"))?;
    let ort_ir = measure::ort_quantize_instructions(
        &opts.python,
        &model_path,
        &dir.join("ort-int8-cg.onnx"),
    )?;
    table.push(Row::ratio(
        "T9i",
        "ONNX int8 of the ResNet-50 sample: instructions (callgrind, one core)",
        ort_ir as f64 / ours_ir as f64,
        &format!(
            "onnxruntime quantize_dynamic: {:.0}M instructions vs ours {:.0}M",
            ort_ir as f64 / 1e6,
            ours_ir as f64 / 1e6
        ),
        20.0,
        true,
    ));

    // T10: cold prefetch of the int8 variant against a cold prefetch of the original, a
    // fresh node for each; the two alternate, and each keeps its best of `BEST_OF` (half a
    // second each, so one run is mostly noise on a shared machine).
    let mut cold = [Duration::MAX; 2];
    for run in 0..BEST_OF {
        for (i, reference) in ["resnet50", "resnet50:int8"].into_iter().enumerate() {
            let tag = format!("{}-{run}", reference.replace(':', "-"));
            let (node_dir, agent_dir) = (
                dir.join(format!("node-{tag}")),
                dir.join(format!("agent-{tag}")),
            );
            let mut node = measure::NodeProcess::start(&opts.bin, s3, &node_dir, "1GiB")?;
            measure::drop_page_cache();
            let (_, took) = measure::timed(|| {
                measure::agent_prefetch(&opts.bin, &node.url, &agent_dir, reference)
            })?;
            node.stop()?;
            // Each node reserved its tiers' space.
            std::fs::remove_dir_all(&node_dir)?;
            std::fs::remove_dir_all(&agent_dir)?;
            cold[i] = cold[i].min(took);
        }
    }
    table.push(Row::time(
        "T10",
        "agent prefetch resnet50:int8, cold node (fp32 in the origin)",
        cold[1],
        "cold prefetch of resnet50 (the original)",
        cold[0],
        1.5,
    ));

    // Quantizer memory, on modelcache-quantize (the node's transforms, streamed the same way).
    let out = dir.join("out.onnx");
    let onnx_peak = measure::run_peak_rss(
        &quantize,
        &["int8".as_ref(), model_path.as_os_str(), out.as_os_str()],
    )?;
    table.push(Row::memory(
        "V1",
        "quantizer peak RSS, ONNX int8 of the 102 MB sample (limit 2.5× the file)",
        onnx_peak,
        model_size * 5 / 2,
    ));
    // A 1 GiB safetensors file of 16 tensors of 64 MiB.
    let st = dir.join("big.safetensors");
    let tensor = 64 * MIB;
    {
        use std::io::Write;
        let mut header = String::from("{");
        for i in 0..16 {
            let (b, e) = (i * tensor, (i + 1) * tensor);
            if i > 0 {
                header.push(',');
            }
            header.push_str(&format!(
                r#""layers.{i}.mlp.weight":{{"dtype":"F32","shape":[4096,4096],"data_offsets":[{b},{e}]}}"#
            ));
        }
        header.push('}');
        let mut f = std::io::BufWriter::new(std::fs::File::create(&st)?);
        f.write_all(&(header.len() as u64).to_le_bytes())?;
        f.write_all(header.as_bytes())?;
        for i in 0..16u64 {
            let values: Vec<u8> = data(500 + i, tensor / 4)
                .iter()
                .flat_map(|&b| (f32::from(b) / 255.0 - 0.5).to_le_bytes())
                .collect();
            f.write_all(&values)?;
        }
        f.flush()?;
    }
    let out = dir.join("out.safetensors");
    let st_peak = measure::run_peak_rss(
        &quantize,
        &["int8".as_ref(), st.as_os_str(), out.as_os_str()],
    )?;
    table.push(Row::memory(
        "V2",
        "quantizer peak RSS, safetensors int8 of 1 GiB in 64 MiB tensors (limit 256 MiB + a tensor)",
        st_peak,
        (256 + 64) * MIB as u64,
    ));
    measure::remove(&dir);
    Ok(())
}
