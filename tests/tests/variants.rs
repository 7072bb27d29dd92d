//! Quantized variants end to end: test models built with onnx/safetensors/gguf, served
//! by a real S3 server, built by a node, fetched by the agent, and checked with the tools
//! users load them with (`tests/py/check.py`: onnx.checker, onnxruntime, the safetensors
//! and gguf readers, `gguf.quants`).

use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::Ordering;

use modelcache_proto::v1::{self, variant_state::State};
use modelcache_testkit::{
    S3Server, Sandbox, TestNode, node_config, read_dir_files, resnet, run_python, seed, sha256,
};
use serde_json::{Value, json};
use tonic::Code;

/// Builds the test models into `dir` and seeds every folder as a model.
async fn seed_models(s3: &S3Server, dir: &Path, kind: &str) -> Vec<String> {
    let (_, status) = run_python("models.py", &[dir.as_os_str(), OsStr::new(kind)]);
    assert!(status.success(), "models.py failed");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        seed(s3, &name, &read_dir_files(&entry.path())).await;
        names.push(name);
    }
    names.sort();
    names
}

/// Runs check.py over `cases`; returns each case's result by name.
fn check(cases: &[Value], scratch: &Path) -> Vec<Value> {
    let file = scratch.join(format!("cases-{}.json", cases.len()));
    std::fs::write(&file, serde_json::to_vec(cases).unwrap()).unwrap();
    let (stdout, _) = run_python("check.py", &[file.as_os_str()]);
    let results: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert_eq!(results.len(), cases.len(), "check.py printed {stdout}");
    results
}

fn format_of(model: &str) -> &'static str {
    if model.starts_with("onnx") || model == "resnet50" {
        "onnx"
    } else if model.starts_with("st-") {
        "safetensors"
    } else {
        "gguf"
    }
}

async fn resolve(node: &TestNode, reference: &str) -> Result<v1::Manifest, tonic::Status> {
    node.client()
        .await
        .resolve(v1::ResolveRequest {
            reference: reference.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().manifest.unwrap())
}

fn config_without_precompute(s3: &S3Server, cache: &Path) -> cache_node::Config {
    let mut config = node_config(s3, cache);
    config.precompute = Default::default();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_variant_loads_and_matches_in_the_real_tools() {
    let s3 = S3Server::start().await;
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    seed_models(&s3, &models, "good").await;
    // The ResNet-50-shaped sample (opset 13, 53 Conv + Gemm, ~100 MB).
    let resnet_dir = models.join("resnet50");
    std::fs::create_dir_all(&resnet_dir).unwrap();
    std::fs::write(resnet_dir.join("model.onnx"), resnet::resnet50(50)).unwrap();
    seed(&s3, "resnet50", &read_dir_files(&resnet_dir)).await;

    let cache = tempfile::tempdir().unwrap();
    let node = TestNode::start(config_without_precompute(&s3, cache.path())).await;
    let wanted: &[(&str, &[&str])] = &[
        ("onnx-opset7", &["int8", "fp16"]),
        ("onnx-opset11", &["int8", "fp16"]),
        ("onnx-opset17", &["int8", "fp16", "int4"]),
        ("onnx-opset21", &["int8", "fp16", "int4"]),
        ("resnet50", &["int8", "fp16"]),
        ("st-single", &["int8", "fp16", "bf16"]),
        ("st-sharded", &["int8", "fp16", "bf16"]),
        (
            "gguf-small",
            &["q8_0", "q4_0", "fp16", "bf16", "int8", "int4"],
        ),
    ];
    let fetched = work.path().join("agent");
    let agent = node.agent(&fetched);
    let mut cases = Vec::new();
    for (model, variants) in wanted {
        for variant in *variants {
            let reference = modelcache_proto::Reference::new(model, variant).unwrap();
            let got = agent
                .prefetch(&reference, &cache_agent::Progress::hidden())
                .await
                .unwrap_or_else(|e| panic!("prefetch {reference}: {e}"));
            cases.push(json!({
                "name": reference.to_string(),
                "format": format_of(model),
                "variant": variant,
                "original": models.join(model),
                "output": got.path,
            }));
        }
    }
    let results = check(&cases, work.path());
    let mut failures = Vec::new();
    for r in &results {
        println!("{r}");
        if r["ok"] != json!(true) {
            failures.push(r.to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "variants failed their checks:\n{}",
        failures.join("\n")
    );
    // Weight-dominated models shrink as promised.
    for r in &results {
        let ratio = r["figures"]["size_ratio"].as_f64().unwrap();
        let name = r["name"].as_str().unwrap();
        if name.starts_with("resnet50:int8") {
            assert!(ratio <= 0.3, "{name}: {ratio}");
        }
        if name.starts_with("resnet50:fp16") {
            assert!(ratio <= 0.55, "{name}: {ratio}");
        }
    }
    // GGUF Q8_0 is bit for bit what gguf.quants.quantize writes.
    let q8 = results
        .iter()
        .find(|r| r["name"] == "gguf-small:q8_0")
        .unwrap();
    assert_eq!(q8["figures"]["bit_exact"], q8["figures"]["converted"]);

    // The manifest says where transformed files came from; other files are the original's.
    let manifest = resolve(&node, "st-sharded:int8").await.unwrap();
    let original = resolve(&node, "st-sharded").await.unwrap();
    for file in &manifest.files {
        let source = std::fs::read(models.join("st-sharded").join(&file.path)).unwrap();
        match file.path.as_str() {
            "tokenizer.json" => {
                assert!(file.provenance.is_none());
                assert_eq!(file.sha256, sha256(&source));
            }
            _ => {
                let p = file.provenance.as_ref().expect("provenance");
                assert_eq!(p.source_sha256, sha256(&source), "{}", file.path);
                assert_eq!(
                    (p.source_path.as_str(), p.variant.as_str()),
                    (file.path.as_str(), "int8")
                );
                assert!(p.quantizer_version.starts_with("modelcache-quant/"));
                assert_ne!(file.sha256, sha256(&source));
            }
        }
    }
    let states = original.variants;
    let int8 = states.iter().find(|s| s.variant == "int8").unwrap();
    assert_eq!(int8.state(), State::Ready);
    assert_eq!(int8.revision, manifest.revision);
    // int4 does not apply to safetensors, so it is not listed.
    assert!(!states.iter().any(|s| s.variant == "int4"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_checks_catch_deliberately_wrong_variants() {
    let s3 = S3Server::start().await;
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    seed_models(&s3, &models, "good").await;
    let cache = tempfile::tempdir().unwrap();
    let node = TestNode::start(config_without_precompute(&s3, cache.path())).await;
    let (gguf_dir, gguf) = node.prefetch_fresh("gguf-small:q8_0").await;
    let (st_dir, st) = node.prefetch_fresh("st-single:int8").await;
    let wrong = work.path().join("wrong");
    let (_, status) = run_python(
        "corrupt.py",
        &[
            models.as_os_str(),
            wrong.as_os_str(),
            gguf.path.as_os_str(),
            st.path.as_os_str(),
        ],
    );
    assert!(status.success());
    let case = |name: &str, format: &str, variant: &str, model: &str| {
        json!({"name": name, "format": format, "variant": variant,
               "original": models.join(model), "output": wrong.join(name)})
    };
    let results = check(
        &[
            case("wrong-axis", "onnx", "int8", "onnx-opset11"),
            case("per-tensor", "onnx", "int8", "onnx-opset11"),
            case("gguf-bad-q8_0", "gguf", "q8_0", "gguf-small"),
            case("st-bad-scale", "safetensors", "int8", "st-single"),
        ],
        work.path(),
    );
    let expect = [
        ("wrong-axis", "axis 1 but its output channels are on axis 0"),
        ("per-tensor", "scale shape [] is not per-channel"),
        ("gguf-bad-q8_0", "bytes differ from gguf.quants.quantize"),
        ("st-bad-scale", "want float32 (128, 1)"),
    ];
    for (r, (name, problem)) in results.iter().zip(expect) {
        println!("{r}");
        assert_eq!(r["name"], name);
        assert_eq!(r["ok"], json!(false), "{name} passed its checks");
        let problems = r["problems"].to_string();
        assert!(problems.contains(problem), "{name}: {problems}");
    }
    drop((gguf_dir, st_dir));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_weight_files_fail_clearly_and_the_original_is_still_served() {
    let s3 = S3Server::start().await;
    let work = tempfile::tempdir().unwrap();
    let names = seed_models(&s3, work.path(), "bad").await;
    let cache = tempfile::tempdir().unwrap();
    // Precompute on: builds of broken files fail in the background too, and are reported.
    let node = TestNode::start(node_config(&s3, cache.path())).await;
    let expected = [
        (
            "bad-gguf-type",
            "q8_0",
            "model.gguf",
            "unknown tensor type 77",
        ),
        (
            "bad-lying-safetensors",
            "int8",
            "model.safetensors",
            "outside",
        ),
        ("bad-not-onnx", "int8", "model.onnx", "not an ONNX model"),
        (
            "bad-truncated-onnx",
            "fp16",
            "model.onnx",
            "not an ONNX model",
        ),
        (
            "bad-truncated-safetensors",
            "fp16",
            "model.safetensors",
            "outside",
        ),
    ];
    assert_eq!(names, expected.map(|e| e.0));
    for (model, variant, file, reason) in expected {
        let err = resolve(&node, &format!("{model}:{variant}"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{model}: {err:?}");
        let msg = err.message();
        assert!(
            msg.contains(file) && msg.contains(reason) && msg.contains("original is still served"),
            "{model}: {msg}"
        );
        // The agent reports it in one line and writes nothing.
        let dir = tempfile::tempdir().unwrap();
        let reference = modelcache_proto::Reference::new(model, variant).unwrap();
        let err = node
            .agent(dir.path())
            .prefetch(&reference, &cache_agent::Progress::hidden())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(reason), "{err}");
        // The original is served, byte for byte, and says the variant failed.
        let (_dir, got) = node.prefetch_fresh(model).await;
        let original = std::fs::read(work.path().join(model).join(file)).unwrap();
        assert_eq!(
            sha256(&std::fs::read(got.path.join(file)).unwrap()),
            sha256(&original)
        );
        let manifest = resolve(&node, model).await.unwrap();
        let state = manifest
            .variants
            .iter()
            .find(|s| s.variant == variant)
            .unwrap();
        assert_eq!(state.state(), State::Failed, "{model}");
        assert!(state.reason.contains(reason), "{}", state.reason);
    }
    node.idle().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn variants_that_do_not_apply_are_refused_before_any_io() {
    let s3 = S3Server::start().await;
    let work = tempfile::tempdir().unwrap();
    seed_models(&s3, work.path(), "good").await;
    seed(
        &s3,
        "plain",
        &vec![("README.md".into(), b"no weights".to_vec())],
    )
    .await;
    let cache = tempfile::tempdir().unwrap();
    let node = TestNode::start(config_without_precompute(&s3, cache.path())).await;
    s3.tap.reset();
    let err = resolve(&node, "st-single:int3").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("known variants"),
        "{}",
        err.message()
    );
    assert_eq!(
        s3.tap.requests.load(Ordering::SeqCst),
        0,
        "an unknown variant touched the origin"
    );
    let err = resolve(&node, "st-single:int4").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("fp16, bf16, int8"),
        "{}",
        err.message()
    );
    let err = resolve(&node, "onnx-opset11:bf16").await.unwrap_err();
    assert!(
        err.message().contains("fp16, int8, int4"),
        "{}",
        err.message()
    );
    let err = resolve(&node, "plain:int8").await.unwrap_err();
    assert!(err.message().contains("has none"), "{}", err.message());
    // int4 needs opset 21; this Conv model cannot be raised without changing its ops.
    let err = resolve(&node, "onnx-opset7:int4").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("opset 7"), "{}", err.message());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn precompute_builds_in_the_background_once_and_serves_from_the_variant_tier() {
    let sandbox = Sandbox::start().await;
    let s3 = &sandbox.s3;
    let work = tempfile::tempdir().unwrap();
    seed_models(s3, work.path(), "good").await;
    let node = sandbox.node().await;
    let before = resolve(&node, "onnx-opset11").await.unwrap();
    let states: Vec<(String, State)> = before
        .variants
        .iter()
        .map(|s| (s.variant.clone(), s.state()))
        .collect();
    assert_eq!(
        states,
        [
            ("fp16", State::Absent),
            ("int8", State::Absent),
            ("int4", State::Absent)
        ]
        .map(|(v, s)| (v.to_owned(), s))
    );
    node.prefetch_fresh("onnx-opset11").await;
    node.idle().await;
    let after = resolve(&node, "onnx-opset11").await.unwrap();
    for s in &after.variants {
        let want = if s.variant == "int4" {
            State::Absent
        } else {
            State::Ready
        };
        assert_eq!(s.state(), want, "{}", s.variant);
    }
    assert_eq!(node.stats().variant_builds, 2);
    // Fetching a precomputed variant reads nothing from the origin, and many concurrent
    // requests for one that is not built yet share one build.
    s3.tap.reset();
    let fetches = (0..6).map(|_| node.prefetch_fresh("onnx-opset11:int8"));
    let got = futures::future::join_all(fetches).await;
    assert_eq!(s3.tap.get_count(), 0);
    let first = std::fs::read(got[0].1.path.join("model.onnx")).unwrap();
    for (_, f) in &got {
        assert_eq!(std::fs::read(f.path.join("model.onnx")).unwrap(), first);
    }
    let int4 = (0..6).map(|_| resolve(&node, "onnx-opset17:int4"));
    let revisions: Vec<String> = futures::future::join_all(int4)
        .await
        .into_iter()
        .map(|m| m.unwrap().revision)
        .collect();
    assert!(revisions.iter().all(|r| *r == revisions[0]));
    // One int4 build; reading opset17's original in full for it also started that model's
    // precomputed int8 and fp16 (in the background: wait for them).
    node.idle().await;
    assert_eq!(node.stats().variant_builds, 5);
    // A variant asked for cold, before its original was ever read: the build reads the
    // original in full, which precomputes fp16; nothing is built twice, and the variant's
    // manifest has every digest and SHA-256 from the start.
    node.prefetch_fresh("st-sharded:int8").await;
    node.idle().await;
    node.prefetch_fresh("st-sharded:int8").await;
    node.idle().await;
    assert_eq!(node.stats().variant_builds, 7);
    let int8 = resolve(&node, "st-sharded:int8").await.unwrap();
    assert!(
        int8.files
            .iter()
            .all(|f| !f.sha256.is_empty() && !f.chunk_blake3.is_empty())
    );
    let original = resolve(&node, "st-sharded").await.unwrap();
    assert!(
        original
            .variants
            .iter()
            .all(|v| v.variant == "bf16" || v.state() == State::Ready)
    );
    // List shows ready variants next to the original.
    let list = node
        .client()
        .await
        .list(v1::ListRequest {})
        .await
        .unwrap()
        .into_inner();
    let model = list
        .models
        .iter()
        .find(|m| m.name == "onnx-opset11")
        .unwrap();
    let cached: Vec<&str> = model.cached.iter().map(|c| c.variant.as_str()).collect();
    assert!(cached.contains(&"original") && cached.contains(&"int8") && cached.contains(&"fp16"));
    node.stop().await;
}

/// A safetensors model of one 3072×4096 float32 tensor (48 MiB; 12 chunks in fp16).
fn big_safetensors(seed: u64) -> modelcache_testkit::ModelFiles {
    modelcache_testkit::safetensors_f32(seed, 3 * 1024, 4096)
}

/// Reads a `Fetch` stream after its manifest to the end: the bytes of its one file, each
/// chunk checked against its BLAKE3, or the status that ended it.
async fn rest_of_stream(
    mut stream: tonic::Streaming<v1::FetchResponse>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut bytes = Vec::new();
    while let Some(message) = stream.message().await? {
        let Some(v1::fetch_response::Item::Chunk(chunk)) = message.item else {
            panic!("a message other than a chunk after the manifest");
        };
        assert_eq!(
            blake3::hash(&chunk.data).as_bytes(),
            chunk.blake3.as_slice()
        );
        assert_eq!((chunk.file_index, chunk.offset), (0, bytes.len() as u64));
        bytes.extend_from_slice(&chunk.data);
    }
    Ok(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_variant_evicted_during_a_transfer_is_built_again_and_the_transfer_goes_on() {
    let s3 = S3Server::start().await;
    seed(&s3, "big", &big_safetensors(7)).await;
    let cache = tempfile::tempdir().unwrap();
    let mut config = config_without_precompute(&s3, cache.path());
    // One chunk read ahead, so that most of the variant is still to be sent when its
    // chunks leave the tier; and every resolve asks the origin, so a change shows at once.
    config.origin_parallelism = 1;
    config.revalidate_after = std::time::Duration::ZERO;
    let node = TestNode::start(config).await;
    let (_d, first) = node.prefetch_fresh("big:fp16").await;
    let expected = sha256(&std::fs::read(first.path.join("model.safetensors")).unwrap());
    let reference = modelcache_proto::Reference::parse("big:fp16").unwrap();
    let evict_all = || async {
        let rev = node.registry.resolve(&reference).await.unwrap().revision;
        for key in rev.chunk_keys() {
            node.registry.tier_caches().1.remove(&key);
        }
    };
    let fetch = || async {
        let mut stream = node.fetch_stream("big:fp16").await;
        let manifest = stream.message().await.unwrap().unwrap();
        assert!(matches!(
            manifest.item,
            Some(v1::fetch_response::Item::Manifest(_))
        ));
        stream
    };

    // Every chunk leaves the variant tier once the transfer has begun: the node builds the
    // variant again and the stream goes on, byte for byte the same.
    let stream = fetch().await;
    evict_all().await;
    let bytes = rest_of_stream(stream).await.expect("the transfer goes on");
    assert_eq!(sha256(&bytes), expected);
    assert_eq!(node.stats().variant_builds, 2);

    // If the original changed meanwhile, the old variant cannot be rebuilt: the stream ends
    // with ABORTED, and the agent's next fetch gets the new revision's variant.
    let stream = fetch().await;
    evict_all().await;
    seed(&s3, "big", &big_safetensors(8)).await;
    let status = rest_of_stream(stream)
        .await
        .expect_err("the original changed");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    let (_d, changed) = node.prefetch_fresh("big:fp16").await;
    assert_ne!(changed.revision, first.revision);
    let bytes = std::fs::read(changed.path.join("model.safetensors")).unwrap();
    assert_ne!(sha256(&bytes), expected);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn evicted_variants_are_rebuilt_and_never_evict_originals() {
    let s3 = S3Server::start().await;
    // Three models of 48 MiB of float32 weights each: 24 MiB in fp16, so the three do not
    // fit a 64 MiB variant tier together.
    for i in 0..3u64 {
        seed(&s3, &format!("big{i}"), &big_safetensors(100 + i)).await;
    }
    let cache = tempfile::tempdir().unwrap();
    let mut config = config_without_precompute(&s3, cache.path());
    config.memory_capacity = bytesize::ByteSize::mib(32);
    config.variant_capacity = bytesize::ByteSize::mib(64);
    let node = TestNode::start(config).await;
    let mut first = None;
    for i in 0..3 {
        let (_d, got) = node.prefetch_fresh(&format!("big{i}:fp16")).await;
        let bytes = std::fs::read(got.path.join("model.safetensors")).unwrap();
        if i == 0 {
            first = Some(sha256(&bytes));
        }
    }
    assert_eq!(node.stats().variant_builds, 3);
    // The first variant no longer fits; asking again rebuilds it, to the same bytes.
    let (_d, again) = node.prefetch_fresh("big0:fp16").await;
    let bytes = std::fs::read(again.path.join("model.safetensors")).unwrap();
    assert_eq!(Some(sha256(&bytes)), first);
    // Rebuilt once: a build waits until every chunk it stored is on disk, so it is not
    // evicted again before the transfer, however busy the disk.
    assert_eq!(node.stats().variant_builds, 4);
    // The originals all stayed on disk.
    for i in 0..3 {
        let m = resolve(&node, &format!("big{i}")).await.unwrap();
        let tiers = m.tiers.unwrap();
        assert_eq!(tiers.disk_chunks, tiers.total_chunks, "big{i}");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_node_serves_its_built_variants_without_rebuilding() {
    let s3 = S3Server::start().await;
    let work = tempfile::tempdir().unwrap();
    seed_models(&s3, work.path(), "good").await;
    let cache = tempfile::tempdir().unwrap();
    let config = config_without_precompute(&s3, cache.path());
    let node = TestNode::start(config.clone()).await;
    let (_d, before) = node.prefetch_fresh("st-sharded:int8").await;
    let manifest = resolve(&node, "st-sharded:int8").await.unwrap();
    node.idle().await;
    node.stop().await;

    let node = TestNode::start(config).await;
    s3.tap.reset();
    let (_d, after) = node.prefetch_fresh("st-sharded:int8").await;
    assert_eq!(node.stats().variant_builds, 0);
    assert_eq!(s3.tap.get_count(), 0, "the origin was read");
    assert_eq!(after.revision, before.revision);
    let again = resolve(&node, "st-sharded:int8").await.unwrap();
    for (a, b) in manifest.files.iter().zip(&again.files) {
        assert_eq!(
            (&a.path, &a.sha256, &a.provenance),
            (&b.path, &b.sha256, &b.provenance)
        );
        let bytes = std::fs::read(after.path.join(&a.path)).unwrap();
        assert_eq!(sha256(&bytes), a.sha256, "{}", a.path);
    }
    let tiers = again.tiers.unwrap();
    assert_eq!(tiers.disk_chunks, tiers.total_chunks);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_build_cut_short_by_shutdown_is_unavailable_not_internal() {
    let sandbox = Sandbox::start().await;
    sandbox.seed("big", &big_safetensors(11)).await;
    let mut config = sandbox.node_config();
    config.precompute = Default::default();
    config.origin_parallelism = 1;
    let node = TestNode::start(config).await;
    // Each ranged GET takes 200 ms: the build reads for seconds, so shutdown finds it running.
    sandbox.s3.tap.get_delay_ms.store(200, Ordering::SeqCst);
    let registry = node.registry.clone();
    let waiting = tokio::spawn(async move {
        let reference = modelcache_proto::Reference::parse("big:fp16").unwrap();
        registry.resolve(&reference).await.map(|_| ())
    });
    let started = modelcache_testkit::wait_for(std::time::Duration::from_secs(30), || {
        node.stats().variant_builds == 1
    })
    .await;
    assert!(started, "the build did not start");
    node.registry.shutdown().await.unwrap();
    let err = waiting.await.unwrap().expect_err("the build was cut short");
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gguf_int8_and_q8_0_are_one_build_served_under_both_names() {
    let sandbox = Sandbox::start().await;
    let work = sandbox.dir();
    seed_models(&sandbox.s3, &work, "good").await;
    let node = TestNode::start(config_without_precompute(&sandbox.s3, &sandbox.dir())).await;
    let (_a, q8) = node.prefetch_fresh("gguf-small:q8_0").await;
    let (_b, int8) = node.prefetch_fresh("gguf-small:int8").await;
    let (_c, q4) = node.prefetch_fresh("gguf-small:q4_0").await;
    let (_d, int4) = node.prefetch_fresh("gguf-small:int4").await;
    assert_eq!(node.stats().variant_builds, 2);
    for (alias, built) in [(&int8, &q8), (&int4, &q4)] {
        let file = |f: &cache_agent::Fetched| {
            let gguf = read_dir_files(&f.path)
                .into_iter()
                .find(|(p, _)| p.ends_with(".gguf"))
                .unwrap();
            sha256(&gguf.1)
        };
        assert_eq!(file(alias), file(built));
        assert_ne!(alias.revision, built.revision);
    }
    // Each name has a manifest of its own, and the original lists both as ready.
    let manifest = resolve(&node, "gguf-small:int8").await.unwrap();
    assert_eq!(manifest.variant, "int8");
    assert_eq!(manifest.revision, int8.revision);
    let original = resolve(&node, "gguf-small").await.unwrap();
    for name in ["int8", "q8_0", "int4", "q4_0"] {
        let state = original
            .variants
            .iter()
            .find(|s| s.variant == name)
            .unwrap();
        assert_eq!(state.state(), State::Ready, "{name}");
    }
}
