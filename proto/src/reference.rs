//! Model references (`NAME[:VARIANT]`) and the rules for file paths inside a model.
//!
//! Both are checked before any I/O, on the node and on the agent alike: a reference or a
//! path that breaks a rule never reaches the origin, the cache or the local disk.

use std::fmt;

/// Longest accepted reference, in bytes.
pub const MAX_REFERENCE_LEN: usize = 256;

/// The variant served when a reference names none.
pub const ORIGINAL: &str = "original";

/// A parsed, validated `NAME[:VARIANT]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    name: String,
    variant: String,
}

/// Why a reference was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid model reference {reference:?}: {reason}")]
pub struct ReferenceError {
    pub reference: String,
    pub reason: String,
}

impl Reference {
    /// Parses `NAME[:VARIANT]`.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let fail = |reason: String| ReferenceError {
            reference: input.chars().take(80).collect(),
            reason,
        };
        if input.is_empty() {
            return Err(fail(
                "it is empty; expected NAME[:VARIANT], e.g. resnet50:int8".into(),
            ));
        }
        if input.len() > MAX_REFERENCE_LEN {
            return Err(fail(format!(
                "it is {} bytes long; the limit is {MAX_REFERENCE_LEN}",
                input.len()
            )));
        }
        let (name, variant) = match input.split_once(':') {
            Some((name, variant)) => (name, variant),
            None => (input, ORIGINAL),
        };
        check_name(name).map_err(fail)?;
        check_variant(variant).map_err(fail)?;
        // The limit holds for the reference as it is printed and sent on (`NAME:VARIANT`),
        // so that every reference accepted here is accepted again by the node.
        let printed = name.len() + 1 + variant.len();
        if printed > MAX_REFERENCE_LEN {
            return Err(fail(format!(
                "it is {printed} bytes long as {name:.20}…:{variant}; the limit is \
                 {MAX_REFERENCE_LEN}"
            )));
        }
        Ok(Self {
            name: name.to_owned(),
            variant: variant.to_owned(),
        })
    }

    /// Builds a reference from a name and a variant, validating both.
    pub fn new(name: &str, variant: &str) -> Result<Self, ReferenceError> {
        Self::parse(&format!("{name}:{variant}"))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn variant(&self) -> &str {
        &self.variant
    }

    pub fn is_original(&self) -> bool {
        self.variant == ORIGINAL
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.variant)
    }
}

impl std::str::FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the model name is empty".into());
    }
    if name.starts_with('/') {
        return Err("the model name is an absolute path; names are relative to the origin".into());
    }
    for segment in name.split('/') {
        if segment.is_empty() {
            return Err("the model name has an empty segment (`//` or a trailing `/`)".into());
        }
        if segment.starts_with('.') {
            return Err(format!("segment {segment:?} starts with `.`"));
        }
        if let Some(c) = segment.chars().find(|c| !is_name_char(*c)) {
            return Err(format!(
                "segment {segment:?} contains {c:?}; allowed are A-Z a-z 0-9 . _ -"
            ));
        }
    }
    Ok(())
}

fn check_variant(variant: &str) -> Result<(), String> {
    if variant.is_empty() {
        return Err("the variant after `:` is empty".into());
    }
    if let Some(c) = variant
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "variant {variant:?} contains {c:?}; allowed are A-Z a-z 0-9 _ -"
        ));
    }
    Ok(())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Why a file path inside a model was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unsafe file path {path:?} in the model: {reason}")]
pub struct PathError {
    pub path: String,
    pub reason: &'static str,
}

/// Checks one file path from a manifest: relative, `/`-separated, no `.`/`..`/empty
/// segments, no NUL or other control characters, no backslashes.
pub fn check_file_path(path: &str) -> Result<(), PathError> {
    let fail = |reason| PathError {
        path: path.chars().take(200).collect(),
        reason,
    };
    if path.is_empty() {
        return Err(fail("it is empty"));
    }
    if path.len() > 4096 {
        return Err(fail("it is longer than 4096 bytes"));
    }
    if path.starts_with('/') {
        return Err(fail("it is absolute"));
    }
    if path.chars().any(|c| c.is_control()) {
        return Err(fail("it contains a control character"));
    }
    if path.contains('\\') {
        return Err(fail("it contains a backslash"));
    }
    for segment in path.split('/') {
        match segment {
            "" => return Err(fail("it has an empty segment")),
            "." | ".." => return Err(fail("it has a `.` or `..` segment")),
            s if s.len() > MAX_NAME_BYTES => {
                return Err(fail(
                    "a name in it is longer than 255 bytes, more than filesystems hold",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Longest file or folder name a receiver can create (`NAME_MAX` on Linux and most
/// filesystems).
const MAX_NAME_BYTES: usize = 255;

/// Checks every path of a model's file list, and that no file stands where another
/// file's folder is (`x` beside `x/y`) and no path repeats.
pub fn check_file_paths<'a>(paths: impl IntoIterator<Item = &'a str>) -> Result<(), PathError> {
    let mut sorted: Vec<&str> = Vec::new();
    for path in paths {
        check_file_path(path)?;
        sorted.push(path);
    }
    sorted.sort_unstable();
    let files: std::collections::HashSet<&str> = sorted.iter().copied().collect();
    if files.len() != sorted.len() {
        let dup = sorted.windows(2).find(|w| w[0] == w[1]).map(|w| w[0]);
        return Err(PathError {
            path: dup.unwrap_or_default().to_owned(),
            reason: "it appears twice",
        });
    }
    for path in &sorted {
        let mut end = 0;
        while let Some(pos) = path[end..].find('/') {
            let folder = &path[..end + pos];
            if files.contains(folder) {
                return Err(PathError {
                    path: folder.to_owned(),
                    reason: "it is a file, but another file lies below it as if it were a folder",
                });
            }
            end += pos + 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_accepted_reference_prints_as_one_that_parses() {
        // Found by the `reference` fuzz target: a 256-byte name alone parsed, but its
        // printed form (`NAME:original`, which agents send) was over the limit.
        let long = format!("oi/{}", "_".repeat(253));
        let err = Reference::parse(&long).unwrap_err();
        assert!(err.reason.contains("as oi/_"), "{err}");
        let fits = format!(
            "m/{}",
            "_".repeat(MAX_REFERENCE_LEN - 2 - 1 - ORIGINAL.len())
        );
        let reference = Reference::parse(&fits).unwrap();
        assert_eq!(Reference::parse(&reference.to_string()).unwrap(), reference);
    }

    #[test]
    fn parses_name_and_variant() {
        let r = Reference::parse("org/minilm:int8").unwrap();
        assert_eq!((r.name(), r.variant()), ("org/minilm", "int8"));
        let r = Reference::parse("resnet50").unwrap();
        assert_eq!((r.name(), r.variant()), ("resnet50", "original"));
        assert_eq!(r.to_string(), "resnet50:original");
    }

    #[test]
    fn rejects_malformed_references() {
        let long = "a".repeat(300);
        for bad in [
            "", "../x", "/abs", "a//b", "a/", ".hidden", "a/../b", "a:", "a:b:c", "a b", "a\0b",
            "a\nb", &long, "x:../y", "é",
        ] {
            let err = Reference::parse(bad).expect_err(bad);
            assert!(err.to_string().contains("invalid model reference"), "{err}");
        }
    }

    #[test]
    fn rejects_hostile_paths() {
        for bad in [
            "../x", "/etc/x", "a//b", "a/./b", "a\0b", "", "a\\b", "x/..",
        ] {
            assert!(check_file_path(bad).is_err(), "{bad:?}");
        }
        assert!(check_file_path("1_Pooling/config.json").is_ok());
        let err = check_file_paths(["x", "x/y"]).unwrap_err();
        assert_eq!(err.path, "x");
        assert!(check_file_paths(["a/x", "a/y", "b"]).is_ok());
        assert!(check_file_paths(["a", "a"]).is_err());
        assert!(check_file_paths(["x.bin", "x/y"]).is_ok());
        // A name no filesystem holds is refused, naming the file; 255 bytes is fine.
        let long = format!("dir/{}.bin", "é".repeat(200));
        let err = check_file_path(&long).unwrap_err();
        assert!(err.to_string().contains("longer than 255 bytes"), "{err}");
        assert!(err.to_string().contains("dir/éé"), "{err}");
        assert!(check_file_path(&"n".repeat(255)).is_ok());
    }
}
