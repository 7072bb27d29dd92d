//! A real S3 server in the test process: `s3s-fs` over HTTP on `127.0.0.1:0`, behind a tap
//! that counts every request and byte it serves and can delay, cut, or refuse responses.
//!
//! s3s answers every request (signature checks, ranges, headers, ETags); the tap then sends
//! an object GET's bytes from the object's file in 1 MiB reads, where s3s-fs would read it
//! 4 KiB per blocking task — several CPU-seconds per GiB on the cores the clients being
//! measured share with it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectStoreExt, WriteMultipart};
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub const ACCESS_KEY: &str = "modelcache-test";
pub const SECRET_KEY: &str = "modelcache-test-secret";
pub const REGION: &str = "us-east-1";
pub const BUCKET: &str = "models";

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TapResponse = http::Response<http_body_util::combinators::BoxBody<Bytes, BoxError>>;

/// What the tap saw, and what it should do to the next responses.
#[derive(Default)]
pub struct Tap {
    /// Object GETs by key: the Range headers asked for (empty string = whole object).
    gets: Mutex<BTreeMap<String, Vec<String>>>,
    pub requests: AtomicU64,
    pub get_bytes: AtomicU64,
    /// Sleep this many milliseconds before answering each object GET.
    pub get_delay_ms: AtomicU64,
    /// Cut each object GET's body after this many bytes (0 = off).
    pub cut_after: AtomicU64,
    /// With `cut_after`: cut only this many more GETs (0 = every one).
    pub cut_times: AtomicU64,
    /// Send each object GET's body at most this many bytes per second (0 = no cap): the
    /// per-connection throughput of a remote object store.
    pub bytes_per_sec: AtomicU64,
    /// Flip one bit in the first bytes of the next this many object GET bodies (bytes
    /// damaged in transit, under an intact ETag).
    pub flip_next: AtomicU64,
    /// Answer everything with 503 (a failing origin).
    pub fail_all: AtomicBool,
    /// Sleep this many milliseconds before answering any request (a hung origin).
    pub delay_all_ms: AtomicU64,
}

impl Tap {
    pub fn gets(&self) -> BTreeMap<String, Vec<String>> {
        self.gets.lock().unwrap().clone()
    }

    pub fn get_count(&self) -> usize {
        self.gets.lock().unwrap().values().map(Vec::len).sum()
    }

    pub fn reset(&self) {
        self.gets.lock().unwrap().clear();
        self.requests.store(0, Ordering::SeqCst);
        self.get_bytes.store(0, Ordering::SeqCst);
    }
}

pub struct S3Server {
    pub addr: SocketAddr,
    pub tap: Arc<Tap>,
    tasks: JoinSet<()>,
    root: std::path::PathBuf,
    /// The temporary directory `root` is in, for a server started by a test.
    _temp: Option<tempfile::TempDir>,
}

impl S3Server {
    /// A server on `127.0.0.1:0` over a new temporary directory, with the test credentials.
    pub async fn start() -> Self {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut server = Self::serve(listener, root, (ACCESS_KEY, SECRET_KEY));
        server._temp = Some(temp);
        server
    }

    /// A server on `listener` keeping buckets as folders of `root` (the `models` bucket
    /// created), accepting the one key pair `credentials`.
    pub fn serve(
        listener: TcpListener,
        root: std::path::PathBuf,
        credentials: (&str, &str),
    ) -> Self {
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let fs = s3s_fs::FileSystem::new(&root).unwrap();
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(credentials.0, credentials.1));
        let service = builder.build();
        let addr = listener.local_addr().unwrap();
        let tap = Arc::new(Tap::default());
        let mut tasks = JoinSet::new();
        let accept_tap = tap.clone();
        let objects = Arc::new(root.clone());
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    break;
                };
                let service = service.clone();
                let tap = accept_tap.clone();
                let objects = objects.clone();
                connections.spawn(async move {
                    let svc = service_fn(move |req| {
                        handle(service.clone(), tap.clone(), objects.clone(), req)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(socket), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            tap,
            tasks,
            root,
            _temp: None,
        }
    }

    /// Waits until the server stops (never, unless its listener fails).
    pub async fn run(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }

    /// The file that holds an object's bytes.
    pub fn object_path(&self, key: &str) -> std::path::PathBuf {
        self.root.join(BUCKET).join(key)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops listening and drops every open connection.
    pub fn stop(&mut self) {
        self.tasks.abort_all();
    }

    /// An S3 client of the bucket, for seeding through the S3 API.
    pub fn client(&self) -> AmazonS3 {
        self.client_builder().build().unwrap()
    }

    fn client_builder(&self) -> AmazonS3Builder {
        AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_bucket_name(BUCKET)
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .with_region(REGION)
            .with_allow_http(true)
    }

    /// Uploads `data` (small) under exactly `key`, whatever characters it holds
    /// (`put` names objects the way `object_store` encodes paths).
    pub async fn put_key(&self, key: &str, data: &[u8]) {
        let path = Path::parse(key).unwrap_or_else(|e| panic!("{key:?}: {e}"));
        self.client()
            .put(&path, Bytes::copy_from_slice(data).into())
            .await
            .unwrap();
        self.tap.reset();
    }

    /// Uploads `data` (small) as `key` with a full-object checksum of `algorithm`, as
    /// current S3 clients do by default.
    pub async fn put_with_checksum(
        &self,
        key: &str,
        data: &[u8],
        algorithm: object_store::aws::Checksum,
    ) {
        let client = self
            .client_builder()
            .with_checksum_algorithm(algorithm)
            .build()
            .unwrap();
        client
            .put(&Path::from(key), Bytes::copy_from_slice(data).into())
            .await
            .unwrap();
        self.tap.reset();
    }

    /// Uploads `data` as `key` (multipart above 8 MiB, like the common clients).
    pub async fn put(&self, key: &str, data: &[u8]) {
        let client = self.client();
        let path = Path::from(key);
        if data.len() <= 8 * 1024 * 1024 {
            client
                .put(&path, Bytes::copy_from_slice(data).into())
                .await
                .unwrap();
        } else {
            let upload = client.put_multipart(&path).await.unwrap();
            let mut writer = WriteMultipart::new_with_chunk_size(upload, 5 * 1024 * 1024);
            writer.write(data);
            writer.finish().await.unwrap();
        }
        self.tap.reset();
    }

    pub async fn delete(&self, key: &str) {
        self.client().delete(&Path::from(key)).await.unwrap();
        self.tap.reset();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

async fn handle(
    service: s3s::service::S3Service,
    tap: Arc<Tap>,
    objects: Arc<std::path::PathBuf>,
    req: http::Request<hyper::body::Incoming>,
) -> Result<TapResponse, Infallible> {
    tap.requests.fetch_add(1, Ordering::SeqCst);
    let hang = tap.delay_all_ms.load(Ordering::SeqCst);
    if hang > 0 {
        tokio::time::sleep(Duration::from_millis(hang)).await;
    }
    if tap.fail_all.load(Ordering::SeqCst) {
        let body = http_body_util::Full::new(Bytes::from_static(
            b"<Error><Code>ServiceUnavailable</Code></Error>",
        ))
        .map_err(|e| -> BoxError { match e {} })
        .boxed();
        return Ok(http::Response::builder().status(503).body(body).unwrap());
    }
    // An object GET is a GET with a key (path has a segment after the bucket) and no query.
    let is_object_get = req.method() == http::Method::GET
        && req
            .uri()
            .query()
            .is_none_or(|q| q.is_empty() || q.starts_with("x-id=GetObject"))
        && req.uri().path().trim_start_matches('/').contains('/');
    let object_file = is_object_get
        .then(|| percent_decode(req.uri().path().trim_start_matches('/')))
        .flatten()
        .filter(|key| !key.split('/').any(|part| part == ".." || part == "."))
        .map(|key| objects.join(key));
    if is_object_get {
        let key = req.uri().path().trim_start_matches('/').to_owned();
        let range = req
            .headers()
            .get(http::header::RANGE)
            .map(|v| v.to_str().unwrap_or_default().to_owned())
            .unwrap_or_default();
        tap.gets.lock().unwrap().entry(key).or_default().push(range);
        let delay = tap.get_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
    }
    let response = match hyper::service::Service::call(&service, req).await {
        Ok(r) => r,
        Err(e) => {
            let body = http_body_util::Full::new(Bytes::from(format!("{e:?}")))
                .map_err(|e| -> BoxError { match e {} })
                .boxed();
            return Ok(http::Response::builder().status(500).body(body).unwrap());
        }
    };
    let mut cut = tap.cut_after.load(Ordering::SeqCst);
    if cut > 0 && is_object_get && tap.cut_times.load(Ordering::SeqCst) > 0 {
        let counted = tap
            .cut_times
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        match counted {
            // The last one to cut: later GETs go through whole.
            Ok(1) => tap.cut_after.store(0, Ordering::SeqCst),
            Ok(_) => {}
            Err(_) => cut = 0,
        }
    }
    let range = object_file
        .filter(|_| response.status().is_success())
        .and_then(|file| Some((file, body_range(response.headers())?)));
    Ok(response.map(|body| {
        let inner = match range {
            Some((file, range)) => file_body(file, range),
            None => body.map_err(BoxError::from).boxed(),
        };
        TapBody {
            inner,
            tap: tap.clone(),
            counted: is_object_get,
            remaining: (is_object_get && cut > 0).then_some(cut),
            pace: match tap.bytes_per_sec.load(Ordering::SeqCst) {
                0 => None,
                rate if is_object_get => Some(Pace {
                    rate,
                    start: tokio::time::Instant::now(),
                    sent: 0,
                    wait: None,
                }),
                _ => None,
            },
            flip: is_object_get
                && tap
                    .flip_next
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok(),
        }
        .boxed()
    }))
}

/// Counts object bytes and cuts bodies short when asked.
struct TapBody {
    inner: http_body_util::combinators::BoxBody<Bytes, BoxError>,
    tap: Arc<Tap>,
    counted: bool,
    remaining: Option<u64>,
    /// Flip a bit of the next data frame's first byte.
    flip: bool,
    pace: Option<Pace>,
}

/// A body's throughput cap: the next frame waits until the bytes sent fit the rate.
struct Pace {
    rate: u64,
    start: tokio::time::Instant,
    sent: u64,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for TapBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == Some(0) {
            return Poll::Ready(Some(Err("connection cut by the test".into())));
        }
        if let Some(wait) = self.pace.as_mut().and_then(|p| p.wait.as_mut()) {
            std::task::ready!(wait.as_mut().poll(cx));
            self.pace.as_mut().expect("pacing").wait = None;
        }
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        let Ok(mut data) = frame.into_data() else {
            return Poll::Ready(None);
        };
        if let Some(remaining) = self.remaining {
            let keep = remaining.min(data.len() as u64);
            data.truncate(keep as usize);
            self.remaining = Some(remaining - keep);
        }
        if self.flip && !data.is_empty() {
            self.flip = false;
            let mut damaged = data.to_vec();
            damaged[0] ^= 0x10;
            data = Bytes::from(damaged);
        }
        if let Some(pace) = self.pace.as_mut() {
            pace.sent += data.len() as u64;
            let due = pace.start + Duration::from_secs_f64(pace.sent as f64 / pace.rate as f64);
            if due > tokio::time::Instant::now() {
                pace.wait = Some(Box::pin(tokio::time::sleep_until(due)));
            }
        }
        if self.counted {
            self.tap
                .get_bytes
                .fetch_add(data.len() as u64, Ordering::SeqCst);
        }
        Poll::Ready(Some(Ok(Frame::data(data))))
    }
}

/// Bytes of the file the response's headers describe: `Content-Range` of a 206, else all
/// `Content-Length` bytes from the start.
fn body_range(headers: &http::HeaderMap) -> Option<std::ops::Range<u64>> {
    let header = |name| headers.get(name)?.to_str().ok();
    let len: u64 = header(http::header::CONTENT_LENGTH)?.parse().ok()?;
    let start = match header(http::header::CONTENT_RANGE) {
        Some(range) => range
            .strip_prefix("bytes ")?
            .split_once('-')?
            .0
            .parse()
            .ok()?,
        None => 0,
    };
    Some(start..start + len)
}

/// Reads `range` of `file` in 1 MiB blocks on the blocking pool.
fn file_body(
    path: std::path::PathBuf,
    range: std::ops::Range<u64>,
) -> http_body_util::combinators::BoxBody<Bytes, BoxError> {
    use std::os::unix::fs::FileExt;
    const BLOCK: u64 = 1024 * 1024;
    let file = match std::fs::File::open(&path) {
        Ok(file) => Arc::new(file),
        Err(e) => {
            let err: BoxError = format!("{}: {e}", path.display()).into();
            let failed = futures::stream::once(std::future::ready(Err(err)));
            return http_body_util::StreamBody::new(failed).boxed();
        }
    };
    let blocks = futures::stream::unfold(range.start, move |at| {
        let file = file.clone();
        let end = range.end;
        async move {
            if at >= end {
                return None;
            }
            let len = (end - at).min(BLOCK) as usize;
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0; len];
                file.read_exact_at(&mut buf, at).map(|()| Bytes::from(buf))
            })
            .await
            .map_err(BoxError::from)
            .and_then(|r| r.map_err(BoxError::from));
            Some((read.map(Frame::data), at + len as u64))
        }
    });
    http_body_util::StreamBody::new(blocks).boxed()
}

/// Decodes a percent-encoded URI path; `None` when it is malformed or not UTF-8.
fn percent_decode(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_paths_are_percent_decoded() {
        assert_eq!(
            percent_decode("models/a%20b/c%3Ad.bin").as_deref(),
            Some("models/a b/c:d.bin")
        );
        assert_eq!(percent_decode("models/x%2").as_deref(), None);
        assert_eq!(percent_decode("models/%zz").as_deref(), None);
        assert_eq!(percent_decode("models/%FF").as_deref(), None);
    }

    #[test]
    fn body_range_follows_the_response_headers() {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::CONTENT_LENGTH, "7".parse().unwrap());
        assert_eq!(body_range(&headers), Some(0..7));
        headers.insert(http::header::CONTENT_LENGTH, "5".parse().unwrap());
        headers.insert(
            http::header::CONTENT_RANGE,
            "bytes 5-9/100".parse().unwrap(),
        );
        assert_eq!(body_range(&headers), Some(5..10));
        headers.insert(
            http::header::CONTENT_RANGE,
            "items 5-9/100".parse().unwrap(),
        );
        assert_eq!(body_range(&headers), None);
    }
}
