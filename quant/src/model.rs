//! Building one variant of a whole model: the entry point the node and
//! `modelcache-quantize` share. [`plan`](crate::plan) decides what happens to each file;
//! weight files are transformed by their format's quantizer (ONNX whole in memory with its
//! external data, safetensors and GGUF streamed from a local copy), and the JSON files
//! that describe safetensors weights (`config.json`, shard indexes) are rewritten to match.
//!
//! Where the original's bytes come from is the caller's business ([`ModelSource`]): the
//! node reads them through its tiers, the tool from a folder. This module knows formats,
//! not storage.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::safetensors::Layout;
use crate::{Action, Format, Provenance, QuantError, Result, Variant, onnx};

/// The original model's files, as a build reads them. Paths are relative to the model's
/// folder, `/`-separated.
pub trait ModelSource: Sync {
    /// The whole of file `path`; an error if the model has no such file.
    fn read(&self, path: &str) -> Result<Bytes>;

    /// File `path` copied to the local file `to` (for the streamed formats); returns its
    /// SHA-256 (lower-case hex).
    fn copy_to(&self, path: &str, to: &Path) -> Result<String>;

    /// The SHA-256 of file `path`, whose bytes are `bytes`: known already, or computed.
    /// Called on a thread of its own while the weights are quantized.
    fn sha256(&self, path: &str, bytes: &Bytes) -> Result<String>;
}

/// How a build runs.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// Threads each tensor's quantization may use (0: every core).
    pub threads: usize,
    /// A folder for the build's temporary files (local copies and streamed outputs).
    pub scratch: PathBuf,
}

/// The bytes of one output file.
#[derive(Debug)]
pub enum OutputData {
    Memory(Bytes),
    /// A file in the build's scratch folder; the caller takes it over.
    File(PathBuf),
}

/// One file of the variant that differs from the original.
#[derive(Debug)]
pub struct OutputFile {
    /// Path inside the model.
    pub path: String,
    pub data: OutputData,
    /// The original file it was built from, and that file's SHA-256.
    pub source_path: String,
    pub source_sha256: String,
    pub format: Format,
}

/// A built variant: the files that differ from the original, and the original files it
/// leaves out (external data the transformed model no longer refers to). Every other file
/// of the original is part of the variant unchanged.
#[derive(Debug, Default)]
pub struct BuiltModel {
    pub files: Vec<OutputFile>,
    pub dropped: Vec<String>,
}

/// Why a build failed, and on which file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {error}")]
pub struct BuildError {
    pub path: String,
    #[source]
    pub error: QuantError,
}

/// Builds `variant` of the model whose files are `paths`, reading them through `source`.
pub fn build(
    paths: &[&str],
    variant: Variant,
    source: &dyn ModelSource,
    options: &BuildOptions,
) -> std::result::Result<BuiltModel, BuildError> {
    let actions = crate::plan(paths, variant).map_err(|error| BuildError {
        path: String::new(),
        error,
    })?;
    crate::with_max_threads(options.threads, || {
        let mut build = Build {
            variant,
            source,
            options,
            out: BuiltModel::default(),
            layouts: Vec::new(),
        };
        for (path, action) in paths.iter().zip(&actions) {
            let done = match action {
                Action::Transform(Format::Onnx) => build.onnx(path),
                Action::Transform(format) => build.streamed(path, *format),
                _ => Ok(()),
            };
            done.map_err(|error| BuildError {
                path: path.to_string(),
                error,
            })?;
        }
        // JSON files that describe the weights follow them.
        for (path, action) in paths.iter().zip(&actions) {
            if matches!(action, Action::Config | Action::ShardIndex) {
                build
                    .rewrite_json(path, action)
                    .map_err(|error| BuildError {
                        path: path.to_string(),
                        error,
                    })?;
            }
        }
        Ok(build.out)
    })
}

struct Build<'a> {
    variant: Variant,
    source: &'a dyn ModelSource,
    options: &'a BuildOptions,
    out: BuiltModel,
    /// Layouts of the safetensors files written, by path.
    layouts: Vec<(String, Layout)>,
}

impl Build<'_> {
    fn provenance(&self, sha256: &str, format: Format) -> Provenance {
        Provenance {
            source_sha256: sha256.to_owned(),
            variant: self.variant,
            format,
        }
    }

    fn output(&mut self, path: String, data: OutputData, source: &str, sha: &str, format: Format) {
        self.out.files.push(OutputFile {
            path,
            data,
            source_path: source.to_owned(),
            source_sha256: sha.to_owned(),
            format,
        });
    }

    /// An ONNX model, transformed whole in memory with its external data files; the
    /// source's SHA-256 is found on a second thread while the weights are quantized.
    fn onnx(&mut self, path: &str) -> Result<()> {
        let bytes = self.source.read(path)?;
        let model = onnx::Model::decode(bytes.clone())?;
        let dir = folder(path);
        let mut external = HashMap::new();
        for location in model.external_locations() {
            let file = join(dir, &location);
            let data = self.source.read(&file).map_err(|e| match e {
                QuantError::NotFound(_) => QuantError::invalid(format!(
                    "its external data file {location} is not part of the model"
                )),
                other => other,
            })?;
            external.insert(location, data);
            self.out.dropped.push(file);
        }
        let variant = self.variant;
        let source = self.source;
        let (out, sha) = std::thread::scope(|scope| {
            let hashing = scope.spawn(|| source.sha256(path, &bytes));
            let mut sha = None;
            let out = model.transform_then(
                variant,
                &mut |loc| {
                    external.get(loc).cloned().ok_or_else(|| {
                        QuantError::invalid(format!("external data {loc} was not read"))
                    })
                },
                || {
                    let digest = hashing
                        .join()
                        .unwrap_or_else(|p| std::panic::resume_unwind(p));
                    let provenance = Provenance {
                        source_sha256: digest.as_deref().unwrap_or_default().to_owned(),
                        variant,
                        format: Format::Onnx,
                    };
                    sha = Some(digest);
                    provenance
                },
            );
            (out, sha)
        });
        let out = out?;
        let sha = sha.expect("the provenance is asked for before encoding")?;
        // External data the new model refers to replaces the original's file of that name.
        if let Some((location, data)) = out.external {
            let file = join(dir, &location);
            self.out.dropped.retain(|d| *d != file);
            self.output(
                file,
                OutputData::Memory(data.into()),
                path,
                &sha,
                Format::Onnx,
            );
        }
        self.output(
            path.to_owned(),
            OutputData::Memory(out.model.into()),
            path,
            &sha,
            Format::Onnx,
        );
        Ok(())
    }

    /// A safetensors or GGUF file, streamed tensor by tensor from a local copy.
    fn streamed(&mut self, path: &str, format: Format) -> Result<()> {
        let n = self.out.files.len();
        let input = self.options.scratch.join(format!("source-{n}"));
        let sha = self.source.copy_to(path, &input)?;
        let output = self.options.scratch.join(format!("output-{n}"));
        let provenance = self.provenance(&sha, format);
        let layout = crate::transform_file(&input, &output, format, self.variant, &provenance);
        let _ = std::fs::remove_file(&input);
        if let Some(layout) = layout? {
            self.layouts.push((path.to_owned(), layout));
        }
        self.output(
            path.to_owned(),
            OutputData::File(output),
            path,
            &sha,
            format,
        );
        Ok(())
    }

    /// `config.json` or a shard index of a safetensors model, rewritten to match the
    /// transformed weights.
    fn rewrite_json(&mut self, path: &str, action: &Action) -> Result<()> {
        let bytes = self.source.read(path)?;
        let sha = self.source.sha256(path, &bytes)?;
        let rewritten = if *action == Action::Config {
            let layouts: Vec<&Layout> = self.layouts.iter().map(|(_, l)| l).collect();
            crate::safetensors::rewrite_config(&bytes, &layouts)?
        } else {
            let dir = folder(path);
            let shards: Vec<(String, Layout)> = self
                .layouts
                .iter()
                .filter(|(p, _)| folder(p) == dir)
                .map(|(p, l)| (p.rsplit('/').next().unwrap_or(p).to_owned(), l.clone()))
                .collect();
            crate::safetensors::rewrite_index(&bytes, &shards)?
        };
        self.output(
            path.to_owned(),
            OutputData::Memory(rewritten.into()),
            path,
            &sha,
            Format::Safetensors,
        );
        Ok(())
    }
}

/// The folder of a path inside a model (`""` at the top).
fn folder(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// A model in a local folder, as the tool reads it.
pub struct FolderSource {
    dir: PathBuf,
}

impl FolderSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn file(&self, path: &str) -> Result<PathBuf> {
        modelcache_proto::check_file_path(path).map_err(|e| QuantError::invalid(e.to_string()))?;
        Ok(self.dir.join(path))
    }
}

impl ModelSource for FolderSource {
    fn read(&self, path: &str) -> Result<Bytes> {
        let file = self.file(path)?;
        match std::fs::read(&file) {
            Ok(bytes) => Ok(Bytes::from(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(QuantError::NotFound(path.to_owned()))
            }
            Err(e) => Err(QuantError::io(format!("reading {}", file.display()), e)),
        }
    }

    fn copy_to(&self, path: &str, to: &Path) -> Result<String> {
        let file = self.file(path)?;
        match std::fs::copy(&file, to) {
            Ok(_) => sha256_file(to),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(QuantError::NotFound(path.to_owned()))
            }
            Err(e) => Err(QuantError::io(format!("copying {}", file.display()), e)),
        }
    }

    fn sha256(&self, _path: &str, bytes: &Bytes) -> Result<String> {
        use sha2::Digest;
        Ok(hex::encode(sha2::Sha256::digest(bytes)))
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let file = std::fs::File::open(path)
        .map_err(|e| QuantError::io(format!("reading {}", path.display()), e))?;
    std::io::copy(&mut std::io::BufReader::new(file), &mut hasher)
        .map_err(|e| QuantError::io(format!("reading {}", path.display()), e))?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    /// A safetensors file of one F32 `[rows, cols]` tensor named `layer.weight`.
    fn safetensors(rows: usize, cols: usize) -> Vec<u8> {
        let values: Vec<f32> = (0..rows * cols).map(|i| (i % 13) as f32 * 0.01).collect();
        let header = format!(
            r#"{{"layer.weight":{{"dtype":"F32","shape":[{rows},{cols}],"data_offsets":[0,{}]}}}}"#,
            values.len() * 4
        );
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend(header.as_bytes());
        file.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        file
    }

    /// Builds the model in `dir`, its scratch files in `dir/scratch`.
    fn build_in(dir: &Path, paths: &[&str], variant: Variant) -> Result<BuiltModel, BuildError> {
        let scratch = dir.join("scratch");
        std::fs::create_dir_all(&scratch).unwrap();
        let options = BuildOptions {
            threads: 1,
            scratch,
        };
        build(paths, variant, &FolderSource::new(dir), &options)
    }

    #[test]
    fn a_folder_model_builds_its_weights_and_rewrites_its_config() {
        let dir = tempfile::tempdir().unwrap();
        let weights = safetensors(64, 32);
        std::fs::write(dir.path().join("model.safetensors"), &weights).unwrap();
        std::fs::write(dir.path().join("config.json"), br#"{"model_type":"x"}"#).unwrap();
        std::fs::write(dir.path().join("README.md"), b"kept").unwrap();
        let paths = ["README.md", "config.json", "model.safetensors"];
        let built = build_in(dir.path(), &paths, Variant::Int8).unwrap();
        assert!(built.dropped.is_empty());
        let outputs: Vec<&str> = built.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(outputs, ["model.safetensors", "config.json"]);
        let weights_out = &built.files[0];
        assert_eq!(
            weights_out.source_sha256,
            hex::encode(sha2::Sha256::digest(&weights))
        );
        assert!(matches!(weights_out.data, OutputData::File(_)));
        let OutputData::Memory(config) = &built.files[1].data else {
            panic!("the config is rewritten in memory");
        };
        let config: serde_json::Value = serde_json::from_slice(config).unwrap();
        assert_eq!(config["model_type"], "x");
        assert!(config["quantization_config"].is_object(), "{config}");
    }

    #[test]
    fn failures_name_the_file_and_what_does_not_apply() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), b"not safetensors").unwrap();
        let err = build_in(dir.path(), &["model.safetensors"], Variant::Fp16).unwrap_err();
        assert_eq!(err.path, "model.safetensors");
        assert!(matches!(err.error, QuantError::Invalid(_)), "{err}");
        let err = build_in(dir.path(), &["model.safetensors"], Variant::Int4).unwrap_err();
        assert!(matches!(err.error, QuantError::NotApplicable(_)), "{err}");
        assert!(err.to_string().contains("fp16, bf16, int8"), "{err}");
        // A file the model does not have is named as such.
        let err = build_in(dir.path(), &["other.gguf"], Variant::Q8_0).unwrap_err();
        assert_eq!(err.path, "other.gguf");
        assert!(matches!(err.error, QuantError::NotFound(_)), "{err}");
    }

    /// Each variant's bytes of small fixed models, pinned together with the quantizer
    /// version: a variant's revision is derived from that version, so bytes that change
    /// without a bump would give one revision two contents (docs/variants.md).
    #[test]
    fn variant_bytes_are_pinned_to_the_quantizer_version() {
        const PINNED_FOR: &str = "modelcache-quant/1";
        let pinned: &[(&str, &str)] = &[
            (
                "model.safetensors:fp16:model.safetensors",
                "177ab76fdf0a6cc94397092ec10646578fcc2df96eb1b0730da49bec7c77e33c",
            ),
            (
                "model.safetensors:bf16:model.safetensors",
                "d7b3930738e86bac8b2d1b58a03f71e07994198a55e330f6b8f9fca7c30f3466",
            ),
            (
                "model.safetensors:int8:model.safetensors",
                "54a82227034023bda9f12da1d79281236b29a22d9f8725166a65cbae449d7945",
            ),
            (
                "model.gguf:fp16:model.gguf",
                "d0527a9bb094519d9456f61fbe8bf8f99d438bb6c5a7f5a097363722f1028b2b",
            ),
            (
                "model.gguf:bf16:model.gguf",
                "e68782b6ebd03063529c54bdb8ade0034a2ecfd2ff5b89d1a494d34421110b9b",
            ),
            (
                "model.gguf:int8:model.gguf",
                "316a8800b22f08a2523536fb75c76226c69f47f31658e4d463fef3afc95d1650",
            ),
            (
                "model.gguf:int4:model.gguf",
                "c8d5d1009c0171265bb181ced30c0239fd019050380108500459df5479811755",
            ),
            (
                "model.gguf:q8_0:model.gguf",
                "a8cd40381f966d3cc3fb6a66a76e2b42586854ec131fd83d0759115aeaeeb4a6",
            ),
            (
                "model.gguf:q4_0:model.gguf",
                "4982095f15f698d6c66b3fe17a0fafe758166f086201cfdaf1bc0948fc1b16ee",
            ),
            (
                "model.onnx:fp16:model.onnx",
                "90559f1b7282d033bdce5e7475a171308072a3f2a63d45f0434f03b8c0125031",
            ),
            (
                "model.onnx:int8:model.onnx",
                "6e08a5cf04d3a31422f4efb7ba95123eb3a3f094f48a94b6e58ed21607830428",
            ),
            (
                "model.onnx:int4:model.onnx",
                "4fdec4c04c1da3a6e11ac7c25a472591daba7418b1f2859e5bd05aaf2c6c7069",
            ),
        ];
        let gguf = crate::gguf::tests::sample(&[(
            "blk.0.ffn.weight",
            &[64, 32],
            (0..64 * 32)
                .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                .collect(),
        )]);
        let onnx = crate::onnx::tests::matmul_model(21, 64, 32);
        let models: [(&str, Vec<u8>, &[Variant]); 3] = [
            (
                "model.safetensors",
                safetensors(64, 32),
                &[Variant::Fp16, Variant::Bf16, Variant::Int8],
            ),
            ("model.gguf", gguf, &Variant::ALL),
            (
                "model.onnx",
                onnx.to_vec(),
                &[Variant::Fp16, Variant::Int8, Variant::Int4],
            ),
        ];
        let mut got = Vec::new();
        for (name, bytes, variants) in models {
            for &variant in variants {
                let dir = tempfile::tempdir().unwrap();
                std::fs::write(dir.path().join(name), &bytes).unwrap();
                let built = build_in(dir.path(), &[name], variant).unwrap();
                for file in built.files {
                    let data = match file.data {
                        OutputData::Memory(b) => b.to_vec(),
                        OutputData::File(p) => std::fs::read(p).unwrap(),
                    };
                    let digest = hex::encode(sha2::Sha256::digest(&data));
                    got.push((format!("{name}:{variant}:{}", file.path), digest));
                }
            }
        }
        let got: Vec<(&str, &str)> = got.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            crate::QUANTIZER_VERSION,
            PINNED_FOR,
            "QUANTIZER_VERSION changed: pin the digests below for it"
        );
        assert_eq!(
            got, pinned,
            "a variant's bytes changed while QUANTIZER_VERSION stayed {PINNED_FOR}: bump it \
             (quant/src/lib.rs) and pin the new digests here"
        );
    }
}
