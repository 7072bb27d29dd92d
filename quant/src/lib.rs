//! Quantized variants of model files, built from the original (SPEC §3).
//!
//! Each format has its own module: [`onnx`] (whole-file, through prost), [`safetensors`]
//! and [`gguf`] (streamed tensor by tensor). [`plan`] decides, for a model's file list and
//! a variant, which files are transformed and which are copied unchanged. Parsers treat
//! every input as hostile: lengths and offsets are checked against the file before
//! anything is allocated, and a bad file is an error naming the reason, never a panic.

/// The ONNX model format, generated from `proto/onnx/onnx.proto` (onnx 1.23).
#[allow(clippy::all, missing_docs)]
pub mod onnx_proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub mod gguf;
pub mod model;
pub mod num;
pub mod onnx;
pub mod onnx_ops;
pub mod safetensors;
pub mod sample;

use std::fmt;

pub use num::with_max_threads;

/// Version of the quantizers; recorded in every variant's provenance. Bumped whenever
/// the bytes a variant produces change.
pub const QUANTIZER_VERSION: &str = "modelcache-quant/1";

/// A quantized variant (`original` is not one: it is the bytes as stored).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Variant {
    Fp16,
    Bf16,
    Int8,
    Int4,
    Q8_0,
    Q4_0,
}

impl Variant {
    pub const ALL: [Variant; 6] = [
        Variant::Fp16,
        Variant::Bf16,
        Variant::Int8,
        Variant::Int4,
        Variant::Q8_0,
        Variant::Q4_0,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Fp16 => "fp16",
            Variant::Bf16 => "bf16",
            Variant::Int8 => "int8",
            Variant::Int4 => "int4",
            Variant::Q8_0 => "q8_0",
            Variant::Q4_0 => "q4_0",
        }
    }

    /// The variants a weight format can be turned into.
    pub fn applies_to(self, format: Format) -> bool {
        use Variant::*;
        match format {
            Format::Onnx => matches!(self, Fp16 | Int8 | Int4),
            Format::Safetensors => matches!(self, Fp16 | Bf16 | Int8),
            Format::Gguf => true,
        }
    }

    /// Parameters recorded in the provenance.
    pub fn parameters(self, format: Format) -> &'static str {
        use Variant::*;
        match (format, self) {
            (_, Fp16) => "float16 weights",
            (_, Bf16) => "bfloat16 weights",
            (Format::Onnx, Int8) => {
                "symmetric int8 [-127,127], per output channel, clipping search, weight-only"
            }
            (Format::Safetensors, Int8) => {
                "compressed-tensors naive-quantized, int8 symmetric, channel strategy"
            }
            (Format::Onnx, Int4) => {
                "opset 21 block-wise int4 [-8,7], block 32 along K, clipping search, MatMul"
            }
            (Format::Gguf, Int8 | Q8_0) => "ggml Q8_0",
            (Format::Gguf, Int4 | Q4_0) => "ggml Q4_0",
            _ => "",
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Weight file formats the quantizers understand, by file extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    Onnx,
    Safetensors,
    Gguf,
}

impl Format {
    pub fn of(path: &str) -> Option<Self> {
        let lower = path.to_ascii_lowercase();
        if lower.ends_with(".onnx") {
            Some(Format::Onnx)
        } else if lower.ends_with(".safetensors") {
            Some(Format::Safetensors)
        } else if lower.ends_with(".gguf") {
            Some(Format::Gguf)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Onnx => "ONNX",
            Format::Safetensors => "safetensors",
            Format::Gguf => "GGUF",
        }
    }
}

/// Where a variant file came from; written into the manifest and the file's own metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provenance {
    /// Lower-case hex SHA-256 of the source file.
    pub source_sha256: String,
    pub variant: Variant,
    pub format: Format,
}

impl Provenance {
    /// Key/value pairs under the `modelcache.` prefix, in a stable order.
    pub fn pairs(&self) -> Vec<(String, String)> {
        vec![
            (
                "modelcache.source_sha256".into(),
                self.source_sha256.clone(),
            ),
            ("modelcache.variant".into(), self.variant.to_string()),
            (
                "modelcache.quantizer_version".into(),
                QUANTIZER_VERSION.into(),
            ),
            (
                "modelcache.parameters".into(),
                self.variant.parameters(self.format).into(),
            ),
        ]
    }
}

/// Why a variant could not be built.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// The file is not a valid file of its format.
    #[error("{0}")]
    Invalid(String),
    /// The variant does not apply to this file or model.
    #[error("{0}")]
    NotApplicable(String),
    /// The model has no file of this path.
    #[error("the model has no file {0}")]
    NotFound(String),
    /// Reading the original failed where the caller keeps it (its own error, boxed, so the
    /// caller can take it back).
    #[error("{0}")]
    Source(Box<dyn std::error::Error + Send + Sync>),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl QuantError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        QuantError::Invalid(msg.into())
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        QuantError::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = QuantError> = std::result::Result<T, E>;

/// Runs a streamed (safetensors or GGUF) transform from one file to another: one tensor in
/// memory at a time. Returns the safetensors layout (for the shard index and config).
pub fn transform_file(
    source: &std::path::Path,
    target: &std::path::Path,
    format: Format,
    variant: Variant,
    provenance: &Provenance,
) -> Result<Option<safetensors::Layout>> {
    use std::io::Write;
    let input = std::fs::File::open(source)
        .map_err(|e| QuantError::io(format!("opening {}", source.display()), e))?;
    let len = input
        .metadata()
        .map_err(|e| QuantError::io(format!("reading {}", source.display()), e))?
        .len();
    let input = std::io::BufReader::new(input);
    let mut output = std::io::BufWriter::new(
        std::fs::File::create(target)
            .map_err(|e| QuantError::io(format!("creating {}", target.display()), e))?,
    );
    let layout = match format {
        Format::Safetensors => Some(safetensors::transform(
            input,
            len,
            &mut output,
            variant,
            provenance,
        )?),
        Format::Gguf => {
            gguf::transform(input, len, &mut output, variant, provenance)?;
            None
        }
        Format::Onnx => {
            return Err(QuantError::invalid(
                "ONNX is transformed whole, in memory (onnx::transform)",
            ));
        }
    };
    output
        .flush()
        .map_err(|e| QuantError::io(format!("writing {}", target.display()), e))?;
    Ok(layout)
}

/// What happens to one file of a model in a variant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Copied unchanged.
    Copy,
    /// A weight file transformed by its format's quantizer.
    Transform(Format),
    /// `config.json` of a safetensors model: gains `quantization_config` (int8).
    Config,
    /// `*.safetensors.index.json` of a sharded checkpoint: rewritten to match the shards.
    ShardIndex,
}

/// Decides what happens to each file of a model (paths relative to the model folder) for
/// `variant`; an error when no file of the model can be transformed into it, listing the
/// variants that apply.
pub fn plan(paths: &[&str], variant: Variant) -> Result<Vec<Action>> {
    let formats: Vec<Format> = paths.iter().filter_map(|p| Format::of(p)).collect();
    if formats.is_empty() {
        return Err(QuantError::NotApplicable(format!(
            "variant {variant} needs a weight file (.onnx, .safetensors or .gguf) and the model has none"
        )));
    }
    if !formats.iter().any(|f| variant.applies_to(*f)) {
        let mut applicable: Vec<&str> = Variant::ALL
            .iter()
            .filter(|v| formats.iter().any(|f| v.applies_to(*f)))
            .map(|v| v.as_str())
            .collect();
        applicable.dedup();
        let mut names: Vec<&str> = formats.iter().map(|f| f.name()).collect();
        names.dedup();
        return Err(QuantError::NotApplicable(format!(
            "variant {variant} does not apply to {} weights; variants that do: {}",
            names.join("/"),
            applicable.join(", ")
        )));
    }
    let safetensors =
        formats.contains(&Format::Safetensors) && variant.applies_to(Format::Safetensors);
    Ok(paths
        .iter()
        .map(|p| match Format::of(p) {
            Some(f) if variant.applies_to(f) => Action::Transform(f),
            _ if safetensors && p.ends_with(".safetensors.index.json") => Action::ShardIndex,
            _ if safetensors && variant == Variant::Int8 && *p == "config.json" => Action::Config,
            _ => Action::Copy,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_name_the_variants_that_apply() {
        let err = plan(&["model.onnx"], Variant::Bf16)
            .unwrap_err()
            .to_string();
        assert!(err.contains("fp16, int8, int4"), "{err}");
        let err = plan(&["README.md"], Variant::Int8).unwrap_err().to_string();
        assert!(err.contains("has none"), "{err}");
        assert_eq!(
            plan(
                &[
                    "config.json",
                    "model.safetensors.index.json",
                    "model-00001-of-00002.safetensors",
                    "tokenizer.json"
                ],
                Variant::Int8
            )
            .unwrap(),
            vec![
                Action::Config,
                Action::ShardIndex,
                Action::Transform(Format::Safetensors),
                Action::Copy
            ]
        );
        assert_eq!(
            plan(&["config.json", "model.safetensors"], Variant::Fp16).unwrap(),
            vec![Action::Copy, Action::Transform(Format::Safetensors)]
        );
    }
}
