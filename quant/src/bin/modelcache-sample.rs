//! `modelcache-sample resnet50 DIR` writes `DIR/resnet50/model.onnx` (and `config.json`)
//! unless it is already there with the expected bytes.

use std::path::PathBuf;
use std::process::ExitCode;

fn run() -> Result<PathBuf, String> {
    let mut args = std::env::args().skip(1);
    let (Some(kind), Some(dir)) = (args.next(), args.next()) else {
        return Err("usage: modelcache-sample resnet50 DIR".into());
    };
    if kind != "resnet50" {
        return Err(format!("unknown sample {kind:?}; known: resnet50"));
    }
    let model_dir = PathBuf::from(dir).join("resnet50");
    let io = |e: std::io::Error| format!("{}: {e}", model_dir.display());
    std::fs::create_dir_all(&model_dir).map_err(io)?;
    let path = model_dir.join("model.onnx");
    let bytes = modelcache_quant::sample::resnet50(50);
    if std::fs::read(&path).ok().as_deref() != Some(bytes.as_slice()) {
        std::fs::write(&path, &bytes).map_err(io)?;
    }
    std::fs::write(
        model_dir.join("config.json"),
        "{\"architecture\": \"resnet50\", \"input\": [1, 3, 224, 224], \"classes\": 1000}\n",
    )
    .map_err(io)?;
    Ok(model_dir)
}

fn main() -> ExitCode {
    match run() {
        Ok(dir) => {
            println!("{}", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("modelcache-sample: {e}");
            ExitCode::FAILURE
        }
    }
}
