//! Builds one variant of one weight file the way a cache node does, without a node:
//! `modelcache-quantize VARIANT INPUT OUTPUT`. It calls the node's entry point
//! (`modelcache_quant::model::build`) with INPUT's folder as the model (ONNX external data
//! is read from there) and INPUT as its one weight file; OUTPUT is the transformed file,
//! and an external data file, if any, is written beside it. For checking a quantizer by
//! hand and for the benchmark; nodes build variants themselves.

use std::path::Path;
use std::process::ExitCode;

use modelcache_quant::model::{self, BuildOptions, FolderSource, OutputData};
use modelcache_quant::{QuantError, Variant};

fn run(variant: &str, input: &Path, output: &Path) -> Result<String, String> {
    let variant = Variant::parse(variant).ok_or_else(|| format!("unknown variant {variant:?}"))?;
    let dir = input.parent().unwrap_or(Path::new("."));
    let name = input
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| "INPUT names no file".to_owned())?;
    let scratch = tempfile::tempdir_in(output.parent().unwrap_or(Path::new(".")))
        .map_err(|e| format!("creating a scratch folder: {e}"))?;
    let options = BuildOptions {
        threads: 0,
        scratch: scratch.path().to_owned(),
    };
    let built = model::build(&[name], variant, &FolderSource::new(dir), &options)
        .map_err(|e| e.to_string())?;
    let out_dir = output.parent().unwrap_or(Path::new("."));
    let mut written = Vec::new();
    for file in built.files {
        let target = if file.path == name {
            output.to_owned()
        } else {
            out_dir.join(&file.path)
        };
        let result = match file.data {
            OutputData::Memory(bytes) => std::fs::write(&target, bytes),
            OutputData::File(path) => {
                std::fs::rename(&path, &target).or_else(|_| std::fs::copy(&path, &target).map(drop))
            }
        };
        result
            .map_err(|e| QuantError::io(format!("writing {}", target.display()), e).to_string())?;
        written.push(target.display().to_string());
    }
    Ok(format!("{variant}: wrote {}", written.join(", ")))
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
