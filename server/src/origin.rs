//! The origin: an S3-compatible bucket or a local directory, read through `object_store`.
//!
//! A model is a folder under the origin's prefix that directly holds at least one file;
//! every object below it belongs to the model. Reads are ranged GETs checked against the
//! ETag the model's revision was built from.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{BackoffConfig, GetOptions, GetRange, ObjectStore, RetryConfig};
use tracing::Instrument;

use crate::checksum;
use crate::error::{Error, Result, classify, error_chain};
use crate::origin_counters::{OriginCounters, OriginTotals};

/// Connection settings for an S3 origin beyond what `AWS_*` variables give.
#[derive(Clone, Debug, Default)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub region: Option<String>,
    pub allow_http: Option<bool>,
}

/// One object of a model, as listed by the origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginFile {
    /// Path relative to the model's folder.
    pub path: String,
    pub size: u64,
    pub etag: String,
}

pub struct Origin {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    /// How the origin is named in messages, e.g. `s3://models` or `/srv/models`.
    display: String,
    /// For a local-directory origin, its root with every symlink resolved: nothing outside
    /// it is ever listed or served.
    local_root: Option<std::path::PathBuf>,
    /// For an S3 origin: the store again, to sign the `HEAD` that asks for an object's
    /// checksums (object_store's own `head` does not return them), and the client that
    /// sends it.
    s3: Option<(Arc<AmazonS3>, reqwest::Client)>,
    counters: Arc<OriginCounters>,
}

/// Retries of one origin request: a few quick ones, so that a dead origin is reported
/// (or served around, stale-if-error) in about a second rather than minutes.
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 3,
        retry_timeout: Duration::from_secs(20),
    }
}

impl Origin {
    /// Opens `s3://BUCKET[/PREFIX]`, `file:///abs/path` or a plain directory path.
    pub fn open(spec: &str, s3: &S3Options) -> Result<Self> {
        if spec.starts_with("s3://") {
            Self::open_s3(spec, s3)
        } else {
            let path = spec.strip_prefix("file://").unwrap_or(spec);
            Self::open_local(std::path::Path::new(path))
        }
    }

    fn open_s3(spec: &str, s3: &S3Options) -> Result<Self> {
        let url = url::Url::parse(spec)
            .map_err(|e| Error::Config(format!("origin {spec:?} is not a valid URL: {e}")))?;
        let bucket = url
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| Error::Config(format!("origin {spec:?} names no bucket")))?;
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(retry_config());
        if let Some(endpoint) = &s3.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(key) = &s3.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &s3.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        if let Some(region) = &s3.region {
            builder = builder.with_region(region);
        }
        if let Some(allow) = s3.allow_http {
            builder = builder.with_allow_http(allow);
        }
        let store = Arc::new(
            builder
                .build()
                .map_err(|e| Error::Config(format!("origin {spec}: {e}")))?,
        );
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::Config(format!("origin {spec}: an HTTP client: {e}")))?;
        let prefix = Path::from(url.path().trim_matches('/'));
        let mut origin = Self::new(store.clone(), prefix, spec.trim_end_matches('/'));
        origin.s3 = Some((store, http));
        Ok(origin)
    }

    fn open_local(dir: &std::path::Path) -> Result<Self> {
        let dir = std::path::absolute(dir)
            .map_err(|e| Error::io(format!("origin {}", dir.display()), e))?;
        if !dir.is_dir() {
            return Err(Error::Config(format!(
                "origin directory {} does not exist",
                dir.display()
            )));
        }
        let store = LocalFileSystem::new_with_prefix(&dir)
            .map_err(|e| Error::Config(format!("origin {}: {e}", dir.display())))?;
        let root = std::fs::canonicalize(&dir)
            .map_err(|e| Error::io(format!("origin {}", dir.display()), e))?;
        let mut origin = Self::new(Arc::new(store), Path::default(), &dir.display().to_string());
        origin.local_root = Some(root);
        Ok(origin)
    }

    /// Wraps any `ObjectStore` (tests use this to count or break requests).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: Path, display: &str) -> Self {
        Self {
            store,
            prefix,
            display: display.to_owned(),
            local_root: None,
            s3: None,
            counters: Arc::default(),
        }
    }

    /// Whether this is a local-directory origin.
    pub fn is_local(&self) -> bool {
        self.local_root.is_some()
    }

    pub fn display(&self) -> &str {
        &self.display
    }

    /// Requests sent to the origin, object bytes read and failures.
    pub fn totals(&self) -> OriginTotals {
        self.counters.totals()
    }

    /// Whether the origin answered any request since the node started.
    pub fn ever_answered(&self) -> bool {
        self.counters.ever_answered()
    }

    /// One listing of the origin's top folder, to learn whether it answers.
    pub async fn probe(&self) -> Result<()> {
        self.counters.request();
        let asked = std::time::Instant::now();
        let at = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let listed = self.store.list_with_delimiter(at).await;
        listed.map_err(|e| self.counters.failed(classify(&self.display, "*", e)))?;
        self.counters.answered(asked.elapsed());
        Ok(())
    }

    fn model_prefix(&self, name: &str) -> Path {
        name.split('/')
            .fold(self.prefix.clone(), |path, segment| path.join(segment))
    }

    /// Lists the files of model `name`. A folder with no file of its own is not a model.
    pub async fn list_model(&self, name: &str) -> Result<Vec<OriginFile>> {
        let prefix = self.model_prefix(name);
        self.check_local_root(name)?;
        self.counters.request();
        let asked = std::time::Instant::now();
        let objects: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| self.counters.failed(classify(&self.display, name, e)))?;
        self.counters.answered(asked.elapsed());
        let mut files = Vec::with_capacity(objects.len());
        for meta in objects {
            let Some(rel) = meta.location.prefix_match(&prefix) else {
                continue;
            };
            let path = self.names(rel).join("/");
            if path.is_empty() || !self.inside_root(&meta.location) {
                continue;
            }
            let etag = self.local_version(
                &meta.location,
                version_tag(meta.e_tag.as_deref(), meta.last_modified),
            );
            files.push(OriginFile {
                path,
                size: meta.size,
                etag,
            });
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        if files.iter().any(|f| !f.path.contains('/')) {
            return Ok(files);
        }
        let inside: BTreeSet<String> = files
            .iter()
            .filter_map(|f| {
                f.path
                    .rsplit_once('/')
                    .map(|(dir, _)| format!("{name}/{dir}"))
            })
            .collect();
        let hint = if inside.is_empty() {
            "; `cache-agent models` lists the models it holds".to_owned()
        } else {
            let list: Vec<_> = inside.into_iter().take(20).collect();
            format!(
                "; {name:?} is a folder holding the models: {}",
                list.join(", ")
            )
        };
        Err(Error::ModelNotFound {
            name: name.to_owned(),
            origin: self.display.clone(),
            hint,
        })
    }

    /// Names of every model in the origin (folders that directly hold a file).
    pub async fn list_models(&self) -> Result<Vec<String>> {
        self.check_local_root("*")?;
        self.counters.request();
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let objects: Vec<_> = match self.store.list(prefix).try_collect().await {
            Ok(objects) => objects,
            // One unusable key ends a listing; list folder by folder to leave out only the
            // folder that holds it.
            Err(object_store::Error::InvalidPath { source }) => {
                tracing::warn!(origin = %self.display, "the origin holds an unusable key ({source}); listing folder by folder");
                self.list_by_folder().await?
            }
            Err(e) => return Err(self.counters.failed(classify(&self.display, "*", e))),
        };
        let mut folders = BTreeSet::new();
        for meta in objects {
            let Some(rel) = meta.location.prefix_match(&self.prefix) else {
                continue;
            };
            if !self.inside_root(&meta.location) {
                continue;
            }
            let parts = self.names(rel);
            if parts.len() >= 2 {
                let name = parts[..parts.len() - 1].join("/");
                if modelcache_proto::Reference::parse(&name).is_ok() {
                    folders.insert(name);
                }
            }
        }
        // A folder inside a model (`org/minilm/1_Pooling`) is part of that model.
        let mut models: Vec<String> = Vec::new();
        for folder in folders {
            let inside_model = models.iter().any(|m| {
                folder
                    .strip_prefix(m.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
            });
            if !inside_model {
                models.push(folder);
            }
        }
        Ok(models)
    }

    /// Every object under the prefix, folder by folder; a folder whose listing fails on an
    /// unusable key is left out with a warning naming it, the rest are listed.
    async fn list_by_folder(&self) -> Result<Vec<object_store::ObjectMeta>> {
        let mut objects = Vec::new();
        let mut folders = vec![self.prefix.clone()];
        while let Some(folder) = folders.pop() {
            self.counters.request();
            let at = (!folder.as_ref().is_empty()).then_some(&folder);
            match self.store.list_with_delimiter(at).await {
                Ok(listed) => {
                    objects.extend(listed.objects);
                    folders.extend(listed.common_prefixes);
                }
                Err(object_store::Error::InvalidPath { source }) => {
                    tracing::warn!(
                        origin = %self.display, folder = %folder,
                        "leaving out a folder that holds an unusable key: {source}"
                    );
                }
                Err(e) => return Err(self.counters.failed(classify(&self.display, "*", e))),
            }
        }
        Ok(objects)
    }

    /// Reads `range` of one file, checking that the bytes come from the listed ETag and
    /// that the origin sent all of them.
    pub async fn read_range(
        &self,
        name: &str,
        file: &OriginFile,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes> {
        let span = crate::spans::origin_get(name, &file.path, &range);
        let read = self
            .read_range_body(name, file, range)
            .instrument(span.clone())
            .await;
        crate::spans::record_ok(&span, "bytes", &read, Bytes::len);
        read
    }

    async fn read_range_body(
        &self,
        name: &str,
        file: &OriginFile,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes> {
        let (location, base, body) = self.open_range(name, file, range.clone()).await?;
        let bytes = body
            .try_fold(bytes::BytesMut::new(), |mut all, piece| async move {
                all.extend_from_slice(&piece);
                Ok(all)
            })
            .await?
            .freeze();
        // A local file rewritten while it was read: its change time moved on.
        let after = self.local_version(&location, base);
        if after != file.etag {
            return Err(self.changed(name, file, after));
        }
        self.count_bytes(bytes.len() as u64);
        if bytes.len() as u64 != range.end - range.start {
            return Err(self.counters.failed(Error::OriginTruncated {
                origin: self.display.clone(),
                name: name.to_owned(),
                path: file.path.clone(),
                start: range.start,
                end: range.end,
                got: bytes.len() as u64,
            }));
        }
        Ok(bytes)
    }

    /// Opens `range` of one file: its bytes as they arrive, once the response showed that
    /// they come from the listed version. The caller counts what it reads
    /// (`count_bytes`) and checks that all of it came.
    pub async fn read_stream(
        &self,
        name: &str,
        file: &OriginFile,
        range: std::ops::Range<u64>,
    ) -> Result<futures::stream::BoxStream<'static, Result<Bytes>>> {
        Ok(self.open_range(name, file, range).await?.2)
    }

    /// How long the origin has recently taken to start answering a request.
    pub fn request_latency(&self) -> Duration {
        self.counters.latency()
    }

    /// Bytes read from the origin, for its counters.
    pub fn count_bytes(&self, n: u64) {
        self.counters.read(n);
    }

    /// A ranged GET, its version checked: the object's path, the version tag it answered
    /// with (before a local origin's change time), and its body.
    async fn open_range(
        &self,
        name: &str,
        file: &OriginFile,
        range: std::ops::Range<u64>,
    ) -> Result<(
        Path,
        String,
        futures::stream::BoxStream<'static, Result<Bytes>>,
    )> {
        let location = self.location(name, &file.path)?;
        let options = GetOptions {
            range: Some(GetRange::Bounded(range.clone())),
            ..Default::default()
        };
        // Once the model is listed, a failing ranged read is a transfer cut short (a dropped
        // connection, a reset), not an unreachable origin; a refused signature stays denied.
        let read_error = {
            let (origin, name, path) = (self.display.clone(), name.to_owned(), file.path.clone());
            let counters = self.counters.clone();
            move |e: object_store::Error| match counters.failed(e) {
                object_store::Error::NotFound { .. } => Error::OriginFileGone {
                    origin: origin.clone(),
                    name: name.clone(),
                    path: path.clone(),
                },
                other => match classify(&origin, &name, other) {
                    denied @ Error::OriginDenied { .. } => denied,
                    failed => Error::OriginReadFailed {
                        origin: origin.clone(),
                        name: name.clone(),
                        path: path.clone(),
                        start: range.start,
                        end: range.end,
                        detail: match failed {
                            Error::OriginUnavailable { detail, .. }
                            | Error::Origin { detail, .. } => detail,
                            other => other.to_string(),
                        },
                    },
                },
            }
        };
        self.counters.request();
        let asked = std::time::Instant::now();
        let result = self
            .store
            .get_opts(&location, options)
            .await
            .map_err(read_error.clone())?;
        self.counters.answered(asked.elapsed());
        // Compare like with like: a revision built from modification times (listings
        // without ETags) is checked against the response's modification time.
        let base = if file.etag.starts_with(MODIFIED_TAG) {
            version_tag(None, result.meta.last_modified)
        } else {
            version_tag(result.meta.e_tag.as_deref(), result.meta.last_modified)
        };
        let found = self.local_version(&location, base.clone());
        if found != file.etag {
            return Err(self.changed(name, file, found));
        }
        let body = result.into_stream().map_err(read_error).boxed();
        Ok((location, base, body))
    }

    fn changed(&self, name: &str, file: &OriginFile, found: String) -> Error {
        Error::OriginChanged {
            origin: self.display.clone(),
            name: name.to_owned(),
            path: file.path.clone(),
            expected: file.etag.clone(),
            found,
        }
    }

    /// The checksum the origin publishes for `file` (see `checksum`): `None` when it
    /// publishes none this node can use (a local directory, a multipart upload without a
    /// full-object checksum, an encrypted object, MD5 ETags not wanted). One `HEAD` with
    /// checksum mode enabled, checked against the version the revision was listed with.
    pub async fn published_checksum(
        &self,
        name: &str,
        file: &OriginFile,
        md5: bool,
    ) -> Result<Option<checksum::Published>> {
        let Some((store, http)) = &self.s3 else {
            return Ok(None);
        };
        let location = self.location(name, &file.path)?;
        let failed = |detail: String| Error::OriginReadFailed {
            origin: self.display.clone(),
            name: name.to_owned(),
            path: file.path.clone(),
            start: 0,
            end: file.size,
            detail: format!("asking for its checksum: {detail}"),
        };
        self.counters.request();
        let response = checksum::head(store, http, &location)
            .await
            .map_err(|e| self.counters.failed(failed(error_chain(&*e))))?;
        if !response.status().is_success() {
            self.counters.failed(());
        }
        match response.status().as_u16() {
            404 => {
                return Err(Error::OriginFileGone {
                    origin: self.display.clone(),
                    name: name.to_owned(),
                    path: file.path.clone(),
                });
            }
            403 => {
                return Err(Error::OriginDenied {
                    origin: self.display.clone(),
                    detail: format!("HEAD of {name}/{} was refused (403)", file.path),
                });
            }
            status if !(200..300).contains(&status) => {
                return Err(failed(format!("the origin answered {status}")));
            }
            _ => {}
        }
        let headers = response.headers();
        let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
        let found = if file.etag.starts_with(MODIFIED_TAG) {
            let modified = header("last-modified")
                .and_then(|d| chrono::DateTime::parse_from_rfc2822(d).ok())
                .map(|d| d.with_timezone(&chrono::Utc))
                .unwrap_or_default();
            version_tag(None, modified)
        } else {
            header("etag").unwrap_or_default().to_owned()
        };
        if found != file.etag {
            return Err(Error::OriginChanged {
                origin: self.display.clone(),
                name: name.to_owned(),
                path: file.path.clone(),
                expected: file.etag.clone(),
                found,
            });
        }
        Ok(checksum::from_headers(headers, md5))
    }

    /// The names of an object path's segments as a model's files are called: as the
    /// store lists them (S3 keys and local file names alike, `#`, `%`, `ü` included).
    fn names<'a>(
        &self,
        parts: impl Iterator<Item = object_store::path::PathPart<'a>>,
    ) -> Vec<String> {
        parts.map(|p| p.as_ref().to_owned()).collect()
    }

    /// Where file `path` of model `name` is read from: the path the listing gave, parsed
    /// as it is. (Joining its segments would percent-encode them a second time and ask for
    /// another object: `a#b` became `a%23b`.)
    fn location(&self, name: &str, path: &str) -> Result<Path> {
        let prefix = self.prefix.as_ref();
        let key = if prefix.is_empty() {
            format!("{name}/{path}")
        } else {
            format!("{prefix}/{name}/{path}")
        };
        Path::parse(&key).map_err(|e| Error::Origin {
            origin: self.display.clone(),
            detail: format!("{name}/{path} is not a usable object key: {e}"),
        })
    }

    /// A local origin whose root is gone (unmounted, renamed, removed) is an outage, not
    /// the deletion of every model: the node keeps serving what it has, stale.
    fn check_local_root(&self, name: &str) -> Result<()> {
        match &self.local_root {
            Some(root) if !root.is_dir() => Err(Error::OriginUnavailable {
                origin: self.display.clone(),
                name: name.to_owned(),
                detail: format!(
                    "the origin directory {} is gone (unmounted, renamed or removed)",
                    root.display()
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Where an object of a local origin is on disk (`None` for other origins).
    fn local_path(&self, location: &Path) -> Option<std::path::PathBuf> {
        let root = self.local_root.as_ref()?;
        Some(
            self.names(location.parts())
                .iter()
                .fold(root.clone(), |p, s| p.join(s)),
        )
    }

    /// The version of an object: `tag` from the store, and for a local origin also the
    /// file's change time. object_store versions a local file by inode, modification time
    /// and size, all of which a rewrite in place can keep (the modification time can be set
    /// back); the change time moves on with every write and cannot be set.
    fn local_version(&self, location: &Path, tag: String) -> String {
        use std::os::unix::fs::MetadataExt;
        let Some(path) = self.local_path(location) else {
            return tag;
        };
        match std::fs::metadata(&path) {
            Ok(meta) => format!("{tag}-c{:x}.{:x}", meta.ctime(), meta.ctime_nsec()),
            Err(_) => tag,
        }
    }

    /// Whether an object of a local origin lies inside its root once every symlink is
    /// resolved. A link that leaves the root (or leads nowhere) is skipped with a warning
    /// naming it: a local origin never serves a file outside its directory.
    fn inside_root(&self, location: &Path) -> bool {
        let (Some(root), Some(path)) = (&self.local_root, self.local_path(location)) else {
            return true;
        };
        match std::fs::canonicalize(&path) {
            Ok(real) if real.starts_with(root) => true,
            Ok(real) => {
                tracing::warn!(
                    origin = %self.display, path = %path.display(), target = %real.display(),
                    "skipping a symlink that leaves the origin directory"
                );
                false
            }
            Err(e) => {
                tracing::warn!(
                    origin = %self.display, path = %path.display(),
                    "skipping a file that cannot be resolved: {e}"
                );
                false
            }
        }
    }
}

/// Marks a version tag made from the modification time, for stores whose listings carry
/// no ETag (some S3-compatible servers); seconds, since HTTP dates have no finer unit.
const MODIFIED_TAG: &str = "modified:";

/// The object's ETag, or its modification time where the store gives no ETag.
fn version_tag(etag: Option<&str>, modified: chrono::DateTime<chrono::Utc>) -> String {
    match etag {
        Some(e) if !e.is_empty() => e.to_owned(),
        _ => format!("{MODIFIED_TAG}{}", modified.timestamp()),
    }
}
