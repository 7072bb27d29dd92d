//! Origin checks (SPEC §4): every file read from the origin is compared with the checksum
//! the origin publishes; bytes damaged between the origin and the node are dropped and
//! read again, never served as verified, and the agent publishes a file only after its
//! check.

use std::sync::atomic::Ordering;

use cache_agent::Progress;
use cache_node::checksum::ChecksumPolicy;
use futures::StreamExt;
use modelcache_proto::Reference;
use modelcache_proto::parts::CHECK_PROTOCOL;
use modelcache_proto::v1::file_check::Result as Found;
use modelcache_proto::v1::{FetchRequest, FileCheck, fetch_response};
use modelcache_testkit::*;
use object_store::aws::Checksum;
use tonic::Code;

const MIB: usize = 1024 * 1024;

/// What one `Fetch` of `reference` (protocol 3) brought: each file's bytes, the checks,
/// and the status that ended it.
struct Fetched {
    files: Vec<Vec<u8>>,
    checks: Vec<FileCheck>,
    status: Option<tonic::Status>,
}

async fn fetch(node: &TestNode, reference: &str) -> Fetched {
    let mut stream = node
        .client()
        .await
        .fetch(FetchRequest {
            reference: reference.into(),
            protocol: CHECK_PROTOCOL,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Fetched {
        files: Vec::new(),
        checks: Vec::new(),
        status: None,
    };
    while let Some(message) = stream.next().await {
        match message.map(|m| m.item) {
            Ok(Some(fetch_response::Item::Manifest(m))) => {
                assert!(m.origin_checks, "a protocol-3 client is told checks follow");
                out.files = vec![Vec::new(); m.file_count as usize];
            }
            Ok(Some(fetch_response::Item::Chunk(c))) => {
                let file = c.file_index as usize;
                assert!(
                    out.checks.iter().all(|k| k.file_index as usize != file),
                    "a chunk of file #{file} after its check"
                );
                out.files[file].extend_from_slice(&c.data);
            }
            Ok(Some(fetch_response::Item::FileCheck(k))) => out.checks.push(k),
            Ok(other) => panic!("unexpected message {other:?}"),
            Err(status) => out.status = Some(status),
        }
    }
    out
}

fn results(checks: &[FileCheck]) -> Vec<(u32, Found, String)> {
    checks
        .iter()
        .map(|k| (k.file_index, k.result(), k.algorithm.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_damaged_on_the_way_from_the_origin_are_dropped_read_again_and_never_verified() {
    let s3 = S3Server::start().await;
    // Uploaded with a CRC64NVME checksum, as current S3 clients do by default.
    let config = data(1, 1000);
    s3.put_with_checksum("m/config.json", &config, Checksum::CRC64NVME)
        .await;
    // A single-part upload without one: its ETag is the MD5 of its bytes.
    let weights = data(2, 5 * MIB + 17);
    s3.put("m/weights.bin", &weights).await;
    let cache = tempfile::tempdir().unwrap();
    let node = TestNode::start(node_config(&s3, cache.path())).await;

    // The first GET to be answered loses a bit on the way (which file's GET that is
    // depends on the order the node's reads arrive in).
    s3.tap.flip_next.store(1, Ordering::SeqCst);
    let damaged = fetch(&node, "m").await;
    let originals = [&config, &weights];
    let (paths, algorithms) = (["config.json", "weights.bin"], ["crc64nvme", "md5"]);
    let last = damaged.checks.last().expect("a check was sent");
    let bad = last.file_index as usize;
    assert_eq!(
        (last.result(), last.algorithm.as_str()),
        (Found::Mismatch, algorithms[bad])
    );
    assert!(
        damaged.checks[..damaged.checks.len() - 1]
            .iter()
            .all(|k| k.result() == Found::Verified),
        "{:?}",
        damaged.checks
    );
    assert_ne!(
        &damaged.files[bad], originals[bad],
        "the damage reached the client"
    );
    let status = damaged.status.expect("the stream ends with an error");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    for word in [paths[bad], algorithms[bad], "fetch again"] {
        assert!(status.message().contains(word), "{}", status.message());
    }

    // The damaged copy was dropped: the next fetch reads the file again and verifies both.
    node.idle().await;
    let good = fetch(&node, "m").await;
    assert!(good.status.is_none(), "{:?}", good.status);
    assert_eq!(good.files, vec![config.clone(), weights.clone()]);
    assert_eq!(
        results(&good.checks),
        vec![
            (0, Found::Verified, "crc64nvme".into()),
            (1, Found::Verified, "md5".into())
        ]
    );
    // One GET for the file each time: the damaged read and the one after it.
    assert_eq!(s3.tap.gets()[&format!("models/m/{}", paths[bad])].len(), 2);

    // Checks are saved with the manifest: a restarted node reports them without asking
    // the origin anything.
    node.idle().await;
    node.stop().await;
    s3.tap.reset();
    let node = TestNode::start(node_config(&s3, cache.path())).await;
    let again = fetch(&node, "m").await;
    assert!(again.status.is_none(), "{:?}", again.status);
    assert_eq!(results(&again.checks), results(&good.checks));
    assert_eq!(s3.tap.requests.load(Ordering::SeqCst), 0);
    node.stop().await;

    // The agent: the damaged file is not published; it is fetched again in the same run.
    let one = data(3, 5 * MIB + 3);
    s3.put("n/model.bin", &one).await;
    let cache = tempfile::tempdir().unwrap();
    let node = TestNode::start(node_config(&s3, cache.path())).await;
    s3.tap.flip_next.store(1, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let fetched = node
        .agent(dir.path())
        .prefetch(&Reference::parse("n").unwrap(), &Progress::hidden())
        .await
        .unwrap();
    assert_same_files(&fetched.path, &vec![("model.bin".into(), one.clone())]);
    // The file read, dropped after the mismatch, and read again: one GET each time.
    assert_eq!(s3.tap.gets()["models/n/model.bin"].len(), 2);
    assert_eq!(
        s3.tap.get_bytes.load(Ordering::SeqCst),
        2 * one.len() as u64
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_without_a_usable_checksum_say_why_they_are_unchecked() {
    let s3 = S3Server::start().await;
    s3.put_with_checksum("m/config.json", &data(1, 1000), Checksum::CRC64NVME)
        .await;
    s3.put("m/weights.bin", &data(2, MIB)).await;
    // Over 8 MiB: a multipart upload, whose ETag is not an MD5 of the bytes.
    s3.put("m/z-large.bin", &data(3, 9 * MIB)).await;

    let detail = |f: &Fetched, i: usize| f.checks[i].detail.clone();
    let cache = tempfile::tempdir().unwrap();
    let node = TestNode::start(node_config(&s3, cache.path())).await;
    let all = fetch(&node, "m").await;
    assert!(all.status.is_none(), "{:?}", all.status);
    assert_eq!(
        results(&all.checks),
        vec![
            (0, Found::Verified, "crc64nvme".into()),
            (1, Found::Verified, "md5".into()),
            (2, Found::Unchecked, String::new())
        ]
    );
    assert!(detail(&all, 2).contains("multipart"), "{}", detail(&all, 2));
    node.stop().await;

    // Without the MD5 pass only full-object checksums count.
    let cache = tempfile::tempdir().unwrap();
    let mut config = node_config(&s3, cache.path());
    config.origin_checksums = ChecksumPolicy::Checksums;
    let node = TestNode::start(config).await;
    let some = fetch(&node, "m").await;
    assert_eq!(some.checks[0].result(), Found::Verified);
    assert_eq!(some.checks[1].result(), Found::Unchecked);
    assert!(
        detail(&some, 1).contains("--origin-checksums checksums"),
        "{}",
        detail(&some, 1)
    );
    node.stop().await;

    // A local directory publishes no checksums.
    let origin = tempfile::tempdir().unwrap();
    std::fs::create_dir(origin.path().join("m")).unwrap();
    std::fs::write(origin.path().join("m/a.bin"), data(4, 100)).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let node = TestNode::start(local_config(origin.path(), cache.path())).await;
    let local = fetch(&node, "m").await;
    assert_eq!(
        results(&local.checks),
        vec![(0, Found::Unchecked, String::new())]
    );
    assert!(
        detail(&local, 0).contains("local-directory"),
        "{}",
        detail(&local, 0)
    );
    node.stop().await;
}
