//! The daemon's prefetch list: `--prefetch REF,…` and `--prefetch-file FILE` (one
//! reference per line, `#` starts a comment). Bad lines are reported with their line
//! numbers and skipped; the good ones are still fetched.

use std::path::Path;

use modelcache_proto::Reference;

/// A line of a prefetch file that is not a reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadLine {
    pub line: usize,
    pub text: String,
    pub reason: String,
}

impl std::fmt::Display for BadLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {:?}: {}", self.line, self.text, self.reason)
    }
}

/// The references of a prefetch file's text, in order and without repeats, and its bad
/// lines.
pub fn parse(text: &str) -> (Vec<Reference>, Vec<BadLine>) {
    let mut refs: Vec<Reference> = Vec::new();
    let mut bad = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        match Reference::parse(line) {
            Ok(r) if !refs.contains(&r) => refs.push(r),
            Ok(_) => {}
            Err(e) => bad.push(BadLine {
                line: i + 1,
                text: line.to_owned(),
                reason: e.to_string(),
            }),
        }
    }
    (refs, bad)
}

/// The whole list: `--prefetch` first, then the file's references; problems as
/// messages for the log (the file's bad lines, a file that cannot be read).
pub fn load(flag: &[String], file: Option<&Path>) -> (Vec<Reference>, Vec<String>) {
    let mut refs: Vec<Reference> = Vec::new();
    let mut problems = Vec::new();
    for text in flag.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        match Reference::parse(text) {
            Ok(r) if !refs.contains(&r) => refs.push(r),
            Ok(_) => {}
            Err(e) => problems.push(format!("--prefetch {text:?}: {e}")),
        }
    }
    if let Some(path) = file {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let (found, bad) = parse(&text);
                for r in found {
                    if !refs.contains(&r) {
                        refs.push(r);
                    }
                }
                problems.extend(bad.iter().map(|b| format!("{}: {b}", path.display())));
            }
            Err(e) => problems.push(format!("cannot read {}: {e}", path.display())),
        }
    }
    (refs, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_lines_survive_bad_ones_which_are_reported_by_number() {
        let text = "# models for the fleet\nresnet50:int8\n\n  bert:fp16  # the encoder\n\
                    bad name!\nresnet50:int8\nx:\n../up\n";
        let (refs, bad) = parse(text);
        let refs: Vec<String> = refs.iter().map(ToString::to_string).collect();
        assert_eq!(refs, ["resnet50:int8", "bert:fp16"]);
        let lines: Vec<usize> = bad.iter().map(|b| b.line).collect();
        assert_eq!(lines, [5, 7, 8]);
        assert!(bad[0].to_string().starts_with("line 5: \"bad name!\": "));
    }

    #[test]
    fn the_flag_comes_first_and_an_unreadable_file_is_a_problem_not_a_stop() {
        let (refs, problems) = load(
            &["a".into(), "b:int8".into(), "".into(), "no good".into()],
            Some(Path::new("/nonexistent/list")),
        );
        let refs: Vec<String> = refs.iter().map(ToString::to_string).collect();
        assert_eq!(refs, ["a:original", "b:int8"]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[1].contains("/nonexistent/list"));
    }
}
