//! Pinning a model (an operator control): resolve it (a variant is built if it must be),
//! write each file through the tiers into the pin store, and serve it from there; then keep
//! every pin at its model's newest revision.

use std::sync::Arc;
use std::time::Duration;

use modelcache_proto::Reference;

use crate::error::Result;
use crate::pins::{Pin, PinnedFile};
use crate::registry::Registry;

/// Pins `reference` at the revision the node serves now (a pin already at that revision
/// is kept as it is); the pin made.
pub async fn pin(registry: &Arc<Registry>, reference: &Reference) -> Result<Pin> {
    let rev = registry.resolve(reference).await?.revision;
    let pins = registry.pins();
    if let Some(pin) = pins.get(reference).filter(|p| p.revision == rev.id) {
        return Ok(pin);
    }
    pins.check_room(reference, rev.total_size)?;
    let staging = pins.staging()?;
    let mut files = Vec::with_capacity(rev.files.len());
    let mut staged = Vec::with_capacity(rev.files.len());
    for (i, record) in rev.files.iter().enumerate() {
        let path = staging.path().join(i.to_string());
        let sha256 = registry.reader().read_to_file(&rev, i, &path).await?;
        files.push(PinnedFile {
            path: record.origin.path.clone(),
            size: record.origin.size,
            etag: record.origin.etag.clone(),
            sha256,
        });
        staged.push(path);
    }
    let pin = Pin {
        name: rev.name.clone(),
        variant: rev.variant.clone(),
        revision: rev.id.clone(),
        bytes: rev.total_size,
        files,
    };
    if let Some(earlier) = pins.commit(pin.clone(), staged).await? {
        tracing::info!(
            reference = %pin.reference(), from = %earlier.revision, to = %pin.revision,
            "pin moved to the model's new revision"
        );
    }
    Ok(pin)
}

/// Every `every`, pins each pinned model again if the revision the node serves for it
/// changed (the origin's model was replaced); a failure is logged and tried again next
/// round, the earlier revision staying pinned meanwhile. Runs until the task is aborted
/// (an interrupted pin leaves files `Pins::open` removes).
pub async fn keep_current(registry: Arc<Registry>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        for pinned in registry.pins().list() {
            let Ok(reference) = Reference::new(&pinned.name, &pinned.variant) else {
                continue;
            };
            if let Err(e) = pin(&registry, &reference).await {
                tracing::warn!(
                    reference = %pinned.reference(), revision = %pinned.revision,
                    "could not bring a pin to the model's current revision: {e}"
                );
            }
        }
    }
}
