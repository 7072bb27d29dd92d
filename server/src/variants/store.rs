//! A built file cut into chunks in the variant tier, with every digest and its SHA-256
//! recorded as it is cut, and written through to the tier's disk in batches.

use std::io::{BufReader, Read};

use bytes::Bytes;
use modelcache_proto::CHUNK_SIZE;
use modelcache_quant::Variant;
use sha2::Digest;

use modelcache_quant::model::OutputData as Data;

use super::VariantBuilder;
use super::build::Output;
use crate::cache::ChunkValue;
use crate::error::{Error, Result};
use crate::manifest::FileRecord;
use crate::origin::OriginFile;

impl VariantBuilder {
    /// Stores `output` of `variant` (revision `id`) of model `name`; the record has every
    /// digest.
    pub(super) async fn store(
        &self,
        name: &str,
        variant: Variant,
        id: &str,
        output: Output,
    ) -> Result<FileRecord> {
        let read_error = |p: &std::path::Path, e| Error::io(format!("reading {}", p.display()), e);
        let (size, mut file) = match &output.data {
            Data::Memory(b) => (b.len() as u64, None),
            Data::File(p) => {
                let f = std::fs::File::open(p).map_err(|e| read_error(p, e))?;
                let size = f.metadata().map_err(|e| read_error(p, e))?.len();
                (size, Some(BufReader::new(f)))
            }
        };
        let origin = OriginFile {
            path: output.path.clone(),
            size,
            etag: format!("{variant}:{id}"),
        };
        let mut record = FileRecord::new(name, variant.as_str(), origin);
        record.built = true;
        record.provenance = Some(output.provenance);
        let tier = self.reader.built();
        let mut hasher = sha2::Sha256::new();
        let mut batch = Vec::with_capacity(self.store_batch);
        for (index, key) in record.keys.iter().enumerate() {
            let range = record.chunk_range(index as u64);
            let data = match (&output.data, file.as_mut()) {
                (Data::Memory(b), _) => b.slice(range.start as usize..range.end as usize),
                (Data::File(p), Some(f)) => {
                    let mut buf = vec![0; (range.end - range.start) as usize];
                    f.read_exact(&mut buf).map_err(|e| read_error(p, e))?;
                    Bytes::from(buf)
                }
                (Data::File(_), None) => unreachable!("a file output is opened above"),
            };
            hasher.update(&data);
            let value = ChunkValue::new(data);
            let _ = record.digests[index].set(value.digest);
            tier.insert(*key, value);
            batch.push(*key);
            if batch.len() == self.store_batch {
                tier.persist(&batch).await;
                batch.clear();
            }
        }
        let missing = tier.persist(&batch).await;
        if missing > 0 {
            tracing::warn!(model = name, %variant, missing, "variant chunks did not reach the disk tier");
        }
        let _ = record.sha256.set(hex::encode(hasher.finalize()));
        if let Data::File(p) = &output.data {
            let _ = std::fs::remove_file(p);
        }
        debug_assert_eq!(record.keys.len() as u64, size.div_ceil(CHUNK_SIZE));
        Ok(record)
    }
}
