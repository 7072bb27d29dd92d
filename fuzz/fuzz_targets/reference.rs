//! Any text as a model reference and as file paths of a manifest: parsing returns a
//! reference or an error, never panics; a reference parsed prints as text that parses
//! back to the same reference; the path rules accept or refuse without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelcache_proto::Reference;
use modelcache_proto::reference::{check_file_path, check_file_paths};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(reference) = Reference::parse(&text) {
        let printed = reference.to_string();
        let again = Reference::parse(&printed).expect("a printed reference parses");
        assert_eq!(again, reference, "{printed:?}");
    }
    let _ = check_file_path(&text);
    let _ = check_file_paths(text.split('\n'));
});
