//! Builds one variant of one weight file, the way a cache node does, without a node:
//! `modelcache-quantize VARIANT INPUT OUTPUT`. For checking a quantizer by hand and for
//! the benchmark; nodes build variants themselves.

use std::path::Path;
use std::process::ExitCode;

use bytes::Bytes;
use modelcache_quant::{Format, Provenance, QuantError, Variant, onnx};
use sha2::Digest;

fn run(variant: &str, input: &Path, output: &Path) -> Result<String, QuantError> {
    let variant = Variant::parse(variant)
        .ok_or_else(|| QuantError::invalid(format!("unknown variant {variant:?}")))?;
    let name = input.to_string_lossy();
    let format = Format::of(&name)
        .ok_or_else(|| QuantError::invalid(format!("{name}: not .onnx, .safetensors or .gguf")))?;
    let open =
        || std::fs::File::open(input).map_err(|e| QuantError::io(format!("reading {name}"), e));
    // The source's SHA-256, streamed (the provenance names it).
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut std::io::BufReader::new(open()?), &mut hasher)
        .map_err(|e| QuantError::io(format!("reading {name}"), e))?;
    let provenance = Provenance {
        source_sha256: hex::encode(hasher.finalize()),
        variant,
        format,
    };
    match format {
        Format::Onnx => {
            let bytes =
                std::fs::read(input).map_err(|e| QuantError::io(format!("reading {name}"), e))?;
            let dir = input.parent().unwrap_or(Path::new("."));
            let out = onnx::transform(Bytes::from(bytes), variant, &provenance, &mut |loc| {
                std::fs::read(dir.join(loc))
                    .map(Bytes::from)
                    .map_err(|e| QuantError::io(format!("reading {loc}"), e))
            })?;
            std::fs::write(output, &out.model)
                .map_err(|e| QuantError::io(format!("writing {}", output.display()), e))?;
            if let Some((loc, data)) = out.external {
                let path = output.parent().unwrap_or(Path::new(".")).join(loc);
                std::fs::write(&path, data)
                    .map_err(|e| QuantError::io(format!("writing {}", path.display()), e))?;
            }
            Ok(format!(
                "{} weights rewritten, opset {}",
                out.transformed, out.opset
            ))
        }
        Format::Safetensors | Format::Gguf => {
            let layout =
                modelcache_quant::transform_file(input, output, format, variant, &provenance)?;
            Ok(match layout {
                Some(layout) => format!("{} tensors written", layout.tensors.len()),
                None => "written".to_owned(),
            })
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, variant, input, output] = args.as_slice() else {
        eprintln!("usage: modelcache-quantize VARIANT INPUT OUTPUT");
        return ExitCode::from(2);
    };
    match run(variant, Path::new(input), Path::new(output)) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("modelcache-quantize: {input}: {e}");
            ExitCode::FAILURE
        }
    }
}
