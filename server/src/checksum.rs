//! Checksums an origin publishes for its objects, and computing them over bytes read.
//!
//! S3 publishes full-object checksums (`x-amz-checksum-sha256`, `-crc64nvme`, `-crc32c`,
//! `-crc32`) on a `HEAD` with `x-amz-checksum-mode: ENABLED`, for objects uploaded with
//! one (every upload since AWS made CRC64NVME the default). The ETag of a single-part
//! upload without SSE-KMS or SSE-C is the hex MD5 of the bytes; a multipart ETag
//! (`…-N`) and a composite checksum (`…-N`) describe the parts, not the bytes, and are not
//! used. The cheapest published checksum wins: the CRCs run at memory speed, SHA-256 and
//! MD5 cost about 1.5 CPU-seconds per GiB without SHA extensions.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::Digest;

/// How an origin's checksum is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    Crc64Nvme,
    Crc32c,
    Crc32,
    Sha256,
    /// The ETag of a single-part upload.
    Md5,
}

impl Algorithm {
    /// The name used in `FileCheck.algorithm` and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Crc64Nvme => "crc64nvme",
            Self::Crc32c => "crc32c",
            Self::Crc32 => "crc32",
            Self::Sha256 => "sha256",
            Self::Md5 => "md5",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            Self::Crc64Nvme,
            Self::Crc32c,
            Self::Crc32,
            Self::Sha256,
            Self::Md5,
        ]
        .into_iter()
        .find(|a| a.name() == name)
    }
}

/// A checksum the origin publishes for one object, as it writes it (base64 for the
/// `x-amz-checksum-*` headers, lower-case hex for an MD5 ETag).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    pub algorithm: Algorithm,
    pub value: String,
}

/// Whether single-part MD5 ETags are used (`--origin-checksums`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ChecksumPolicy {
    /// S3's full-object checksums and the MD5 ETag of single-part uploads.
    All,
    /// S3's full-object checksums only (no MD5 pass, which costs ~1.5 CPU-s per GiB).
    Checksums,
    /// No check.
    Off,
}

/// A `HEAD` of `location`, signed by `store`, asking for the object's checksums
/// (`x-amz-checksum-mode: ENABLED`, a header S3 requires to be signed).
pub async fn head(
    store: &object_store::aws::AmazonS3,
    http: &reqwest::Client,
    location: &object_store::path::Path,
) -> Result<reqwest::Response, Box<dyn std::error::Error + Send + Sync>> {
    use object_store::signer::{SignedUrlOptions, Signer};
    let name = http::HeaderName::from_static("x-amz-checksum-mode");
    let value = http::HeaderValue::from_static("ENABLED");
    let options = SignedUrlOptions::new().with_signed_header(name.clone(), value.clone());
    let expires = std::time::Duration::from_secs(600);
    let url = store
        .signed_url_opts(http::Method::HEAD, location, expires, &options)
        .await?;
    Ok(http.head(url).header(name, value).send().await?)
}

/// The checksum to compare with, from a `HEAD` answered with checksum mode enabled:
/// the cheapest full-object checksum, else (when `md5` is allowed) the ETag if it is the
/// MD5 of a single-part upload. `None` when the origin publishes nothing usable.
pub fn from_headers(headers: &http::HeaderMap, md5: bool) -> Option<Published> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let composite = header("x-amz-checksum-type").is_some_and(|t| t == "COMPOSITE");
    let full_object = [
        ("x-amz-checksum-crc64nvme", Algorithm::Crc64Nvme),
        ("x-amz-checksum-crc32c", Algorithm::Crc32c),
        ("x-amz-checksum-crc32", Algorithm::Crc32),
        ("x-amz-checksum-sha256", Algorithm::Sha256),
    ]
    .into_iter()
    .filter(|_| !composite)
    .find_map(|(name, algorithm)| {
        let value = header(name)?;
        // A composite checksum of a multipart upload ends with `-PARTS`.
        (!value.contains('-') && BASE64.decode(value).is_ok()).then(|| Published {
            algorithm,
            value: value.to_owned(),
        })
    });
    if full_object.is_some() || !md5 {
        return full_object;
    }
    // SSE-KMS and SSE-C objects have ETags that are not the MD5 of their bytes.
    let encrypted = header("x-amz-server-side-encryption")
        .is_some_and(|s| s.starts_with("aws:kms"))
        || header("x-amz-server-side-encryption-customer-algorithm").is_some();
    let etag = header("etag")?.trim_start_matches("W/").trim_matches('"');
    (!encrypted && is_md5(etag)).then(|| Published {
        algorithm: Algorithm::Md5,
        value: etag.to_ascii_lowercase(),
    })
}

/// A mismatch, for people: which checksum, what the origin says, what the bytes gave.
pub fn mismatch(algorithm: &str, expected: &str, found: &str) -> String {
    format!("{algorithm} checksum (the origin says {expected}, the bytes give {found})")
}

fn is_md5(etag: &str) -> bool {
    etag.len() == 32 && etag.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A running checksum of one algorithm.
pub enum Hasher {
    Crc(crc_fast::Digest),
    Sha256(sha2::Sha256),
    Md5(md5::Md5),
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Self {
        use crc_fast::CrcAlgorithm;
        match algorithm {
            Algorithm::Crc64Nvme => Self::Crc(crc_fast::Digest::new(CrcAlgorithm::Crc64Nvme)),
            Algorithm::Crc32c => Self::Crc(crc_fast::Digest::new(CrcAlgorithm::Crc32Iscsi)),
            Algorithm::Crc32 => Self::Crc(crc_fast::Digest::new(CrcAlgorithm::Crc32IsoHdlc)),
            Algorithm::Sha256 => Self::Sha256(sha2::Sha256::new()),
            Algorithm::Md5 => Self::Md5(md5::Md5::default()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Self::Crc(d) => d.update(data),
            Self::Sha256(h) => h.update(data),
            Self::Md5(h) => md5::Digest::update(h, data),
        }
    }

    /// The checksum in the origin's notation for `algorithm`.
    pub fn finish(self, algorithm: Algorithm) -> String {
        match (self, algorithm) {
            (Self::Crc(d), Algorithm::Crc64Nvme) => BASE64.encode(d.finalize().to_be_bytes()),
            (Self::Crc(d), _) => BASE64.encode((d.finalize() as u32).to_be_bytes()),
            (Self::Sha256(h), _) => BASE64.encode(h.finalize()),
            (Self::Md5(h), _) => hex::encode(md5::Digest::finalize(h)),
        }
    }
}

/// The hex form of a base64 checksum, for people comparing it with other tools (the
/// SHA-256 one is what `sha256sum` prints).
pub fn readable(published: &Published) -> String {
    match published.algorithm {
        Algorithm::Md5 => published.value.clone(),
        _ => BASE64
            .decode(&published.value)
            .map(hex::encode)
            .unwrap_or_else(|_| published.value.clone()),
    }
}

/// What comparing a file with its origin's checksum found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OriginCheck {
    /// The bytes match the origin's checksum of this algorithm.
    Verified { algorithm: Algorithm },
    /// Nothing to compare with, and why.
    Unchecked { reason: String },
    /// The bytes read differ from what the origin says it holds.
    Mismatch {
        algorithm: Algorithm,
        expected: String,
        found: String,
    },
}

impl OriginCheck {
    /// How a settled check is saved with its manifest (`None` for a mismatch, which is
    /// never saved: the record is discarded).
    pub fn saved(&self) -> Option<String> {
        match self {
            Self::Verified { algorithm } => Some(format!("verified:{}", algorithm.name())),
            Self::Unchecked { reason } => Some(format!("unchecked:{reason}")),
            Self::Mismatch { .. } => None,
        }
    }

    pub fn from_saved(saved: &str) -> Option<Self> {
        match saved.split_once(':')? {
            ("verified", name) => Some(Self::Verified {
                algorithm: Algorithm::from_name(name)?,
            }),
            ("unchecked", reason) => Some(Self::Unchecked {
                reason: reason.to_owned(),
            }),
            _ => None,
        }
    }
}

/// A check's outcome: `Err` for a check that could not be made this time (the origin did
/// not answer), which is tried again later.
pub type CheckOutcome = std::result::Result<OriginCheck, String>;

type Running = futures::future::Shared<futures::future::BoxFuture<'static, CheckOutcome>>;

/// One file's origin check: settled, being computed, or not started. Every party that
/// needs it awaits one computation, which runs as a task of its own: a party that stops
/// polling (a stalled client's stream) holds up nobody else.
#[derive(Default)]
pub struct CheckCell(std::sync::Mutex<CheckSlot>);

#[derive(Default)]
enum CheckSlot {
    #[default]
    NotStarted,
    Running(Running),
    Settled(OriginCheck),
}

impl Clone for CheckCell {
    /// A copy holds the settled result only; a computation in progress stays with this one.
    fn clone(&self) -> Self {
        let copy = Self::default();
        if let Some(check) = self.settled() {
            copy.settle(check);
        }
        copy
    }
}

impl CheckCell {
    pub fn settled(&self) -> Option<OriginCheck> {
        match &*self.slot() {
            CheckSlot::Settled(check) => Some(check.clone()),
            _ => None,
        }
    }

    pub fn settle(&self, check: OriginCheck) {
        *self.slot() = CheckSlot::Settled(check);
    }

    /// Starts the computation with `start` unless one runs or the check is settled; the
    /// computation is a task of its own, so it goes on whoever awaits it.
    pub fn begin(&self, start: impl FnOnce() -> futures::future::BoxFuture<'static, CheckOutcome>) {
        self.running_or(start);
    }

    /// The check, settled or awaited; `start` begins the computation when none runs.
    pub async fn get_or_start(
        &self,
        start: impl FnOnce() -> futures::future::BoxFuture<'static, CheckOutcome>,
    ) -> CheckOutcome {
        let Some(running) = self.running_or(start) else {
            return Ok(self.settled().expect("a check that runs not is settled"));
        };
        let outcome = running.await;
        let mut slot = self.slot();
        if matches!(&*slot, CheckSlot::Running(_)) {
            *slot = match &outcome {
                Ok(check) => CheckSlot::Settled(check.clone()),
                Err(_) => CheckSlot::NotStarted,
            };
        }
        outcome
    }

    /// The computation running (started with `start` if none was), or `None` when the
    /// check is settled.
    fn running_or(
        &self,
        start: impl FnOnce() -> futures::future::BoxFuture<'static, CheckOutcome>,
    ) -> Option<Running> {
        use futures::FutureExt;
        let mut slot = self.slot();
        match &*slot {
            CheckSlot::Settled(_) => None,
            CheckSlot::Running(running) => Some(running.clone()),
            CheckSlot::NotStarted => {
                let running = start().shared();
                *slot = CheckSlot::Running(running.clone());
                Some(running)
            }
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, CheckSlot> {
        self.0.lock().expect("check lock poisoned")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum(algorithm: Algorithm, data: &[u8]) -> String {
        let mut h = Hasher::new(algorithm);
        h.update(&data[..3]);
        h.update(&data[3..]);
        h.finish(algorithm)
    }

    #[test]
    fn checksums_match_the_published_test_vectors() {
        let data = b"123456789";
        // The CRC catalogue's check values, as S3 writes them (big-endian, base64).
        assert_eq!(
            checksum(Algorithm::Crc32c, data),
            BASE64.encode(0xe306_9283u32.to_be_bytes())
        );
        assert_eq!(
            checksum(Algorithm::Crc32, data),
            BASE64.encode(0xcbf4_3926u32.to_be_bytes())
        );
        assert_eq!(
            checksum(Algorithm::Crc64Nvme, data),
            BASE64.encode(0xae8b_1486_0a79_9888u64.to_be_bytes())
        );
        assert_eq!(
            checksum(Algorithm::Md5, data),
            "25f9e794323b453885f5181f1b624d0b"
        );
        assert_eq!(
            readable(&Published {
                algorithm: Algorithm::Sha256,
                value: checksum(Algorithm::Sha256, data)
            }),
            "15e2b0d3c33891ebb0f1ef609ec419420c20e320ce94c65fbc8c3312448eb225"
        );
    }

    #[test]
    fn the_cheapest_full_object_checksum_wins_and_md5_only_from_plain_single_part_etags() {
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut h = http::HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, v.parse().unwrap());
            }
            h
        };
        let md5 = "\"25f9e794323b453885f5181f1b624d0b\"";
        let sha = "FeKw08M4keuw8e9gnsQZQgwg4yDOlMZfvIwzEkSOsiU=";
        let crc = "rosUhgp5mIg=";
        let both = headers(&[
            ("etag", md5),
            ("x-amz-checksum-sha256", sha),
            ("x-amz-checksum-crc64nvme", crc),
        ]);
        assert_eq!(
            from_headers(&both, true).map(|p| p.algorithm),
            Some(Algorithm::Crc64Nvme)
        );
        let plain = headers(&[("etag", md5)]);
        assert_eq!(
            from_headers(&plain, true),
            Some(Published {
                algorithm: Algorithm::Md5,
                value: "25f9e794323b453885f5181f1b624d0b".into()
            })
        );
        assert_eq!(from_headers(&plain, false), None);
        let multipart = headers(&[("etag", "\"25f9e794323b453885f5181f1b624d0b-3\"")]);
        assert_eq!(from_headers(&multipart, true), None);
        let kms = headers(&[("etag", md5), ("x-amz-server-side-encryption", "aws:kms")]);
        assert_eq!(from_headers(&kms, true), None);
        let composite = headers(&[
            ("etag", "\"abc-2\""),
            ("x-amz-checksum-crc32c", "yZRlqg==-2"),
        ]);
        assert_eq!(from_headers(&composite, true), None);
        let typed = headers(&[
            ("x-amz-checksum-crc32c", "yZRlqg=="),
            ("x-amz-checksum-type", "COMPOSITE"),
        ]);
        assert_eq!(from_headers(&typed, true), None);
    }
}
