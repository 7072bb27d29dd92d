//! Any bytes as the messages a node streams to an agent: length-prefixed `FetchResponse`s
//! (4 bytes little-endian, then the message). The agent assembles the manifest from its
//! parts and checks it (paths, sizes, digests, revision) before it writes anything; every
//! step returns an error for what it cannot trust, and never panics.
#![no_main]

use cache_agent::transfer::check_manifest;
use libfuzzer_sys::fuzz_target;
use modelcache_proto::Reference;
use modelcache_proto::parts::Assembly;
use modelcache_proto::v1::{FetchResponse, fetch_response::Item};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut assembly: Option<Assembly> = None;
    while let Some((len, tail)) = rest.split_first_chunk::<4>() {
        let len = (u32::from_le_bytes(*len) as usize).min(tail.len());
        let (message, tail) = tail.split_at(len);
        rest = tail;
        let Ok(response) = FetchResponse::decode(message) else {
            return;
        };
        match (response.item, assembly.as_mut()) {
            (Some(Item::Manifest(m)), None) => match Assembly::new(m) {
                Ok(a) => assembly = Some(a),
                Err(_) => return,
            },
            (Some(Item::ManifestPart(part)), Some(a)) => {
                if a.add(part.files).is_err() {
                    return;
                }
            }
            _ => return,
        }
    }
    let Some(assembly) = assembly.filter(Assembly::is_complete) else {
        return;
    };
    let manifest = assembly.into_manifest();
    let Ok(reference) = Reference::new(&manifest.name, &manifest.variant) else {
        return;
    };
    let _ = check_manifest(&reference, &manifest);
});
