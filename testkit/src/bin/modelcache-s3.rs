//! `modelcache-s3`: the project's S3-compatible server and uploader, for the local cluster
//! on machines that cannot pull MinIO's images (`docker-compose.local.yml`).
//!
//!   modelcache-s3 serve [LISTEN] [ROOT]   serves ROOT's folders as buckets (default
//!                                         0.0.0.0:9000 and /data; bucket `models` made)
//!   modelcache-s3 upload ENDPOINT DIR     uploads every file under DIR into bucket
//!                                         `models`, keyed by its path under DIR
//!
//! MODELCACHE_S3_BYTES_PER_SEC caps each GET body's bytes per second (a slow origin, for
//! tests). Credentials: MINIO_ROOT_USER and MINIO_ROOT_PASSWORD (as MinIO reads them), else
//! AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use modelcache_testkit::s3::{BUCKET, REGION, S3Server};
use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStoreExt, WriteMultipart};

fn credentials() -> Result<(String, String), String> {
    let var = |a: &str, b: &str| {
        std::env::var(a)
            .or_else(|_| std::env::var(b))
            .map_err(|_| format!("set {a} (or {b})"))
    };
    Ok((
        var("MINIO_ROOT_USER", "AWS_ACCESS_KEY_ID")?,
        var("MINIO_ROOT_PASSWORD", "AWS_SECRET_ACCESS_KEY")?,
    ))
}

fn files_under(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            } else {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

async fn upload(endpoint: &str, dir: &Path) -> Result<(), String> {
    let (key, secret) = credentials()?;
    let store = AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_bucket_name(BUCKET)
        .with_access_key_id(key)
        .with_secret_access_key(secret)
        .with_region(REGION)
        .with_allow_http(true)
        .build()
        .map_err(|e| e.to_string())?;
    for file in files_under(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let key = file
            .strip_prefix(dir)
            .expect("under dir")
            .to_string_lossy()
            .into_owned();
        let data = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let path = object_store::path::Path::from(key.as_str());
        let upload = store
            .put_multipart(&path)
            .await
            .map_err(|e| e.to_string())?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, 8 << 20);
        writer.write(&data);
        writer.finish().await.map_err(|e| format!("{key}: {e}"))?;
        println!("uploaded {BUCKET}/{key} ({} bytes)", data.len());
    }
    Ok(())
}

async fn serve(listen: &str, root: &str) -> Result<(), String> {
    let (key, secret) = credentials()?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("{listen}: {e}"))?;
    let server = S3Server::serve(listener, PathBuf::from(root), (&key, &secret));
    if let Ok(rate) = std::env::var("MODELCACHE_S3_BYTES_PER_SEC") {
        let rate: u64 = rate
            .parse()
            .map_err(|e| format!("MODELCACHE_S3_BYTES_PER_SEC={rate:?}: {e}"))?;
        server
            .tap
            .bytes_per_sec
            .store(rate, std::sync::atomic::Ordering::SeqCst);
    }
    println!("modelcache-s3 serving {root} on {}", server.addr);
    server.run().await;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &'static str| args.get(i).map_or(default, String::as_str);
    let result = match arg(0, "") {
        "serve" => serve(arg(1, "0.0.0.0:9000"), arg(2, "/data")).await,
        "upload" if args.len() == 3 => upload(&args[1], Path::new(&args[2])).await,
        _ => Err("usage: modelcache-s3 serve [LISTEN] [ROOT] | upload ENDPOINT DIR".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("modelcache-s3: {e}");
            ExitCode::FAILURE
        }
    }
}
