//! `modelcache-sample resnet50 DIR` writes `DIR/resnet50/model.onnx` (and `config.json`)
//! unless it is already there with the expected bytes.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(kind), Some(dir)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: modelcache-sample resnet50 DIR");
    };
    anyhow::ensure!(
        kind == "resnet50",
        "unknown sample {kind:?}; known: resnet50"
    );
    let model_dir = PathBuf::from(dir).join("resnet50");
    std::fs::create_dir_all(&model_dir)?;
    let path = model_dir.join("model.onnx");
    let bytes = modelcache_bench::resnet::resnet50(50);
    if std::fs::read(&path).ok().as_deref() != Some(bytes.as_slice()) {
        std::fs::write(&path, &bytes)?;
    }
    std::fs::write(
        model_dir.join("config.json"),
        "{\"architecture\": \"resnet50\", \"input\": [1, 3, 224, 224], \"classes\": 1000}\n",
    )?;
    println!("{}", model_dir.display());
    Ok(())
}
