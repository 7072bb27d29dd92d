//! Any request body as the hand-framed `Fetch` request a node decodes: one gRPC frame,
//! a protobuf `FetchRequest`, its reference. An error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelcache_proto::Reference;
use modelcache_proto::v1::FetchRequest;
use modelcache_proto::wire::request_message;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = request_message(data) else {
        return;
    };
    if let Ok(request) = FetchRequest::decode(message) {
        let _ = Reference::parse(&request.reference);
    }
});
