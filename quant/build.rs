//! Compiles the ONNX model format (`proto/onnx/onnx.proto`, from the onnx 1.23 release,
//! Apache-2.0) with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["onnx/onnx.proto"], ["proto"])?;
    prost_build::Config::new()
        .bytes([".onnx.TensorProto.raw_data"])
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto/onnx/onnx.proto");
    Ok(())
}
