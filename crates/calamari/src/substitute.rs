//! Variable substitution in files: `#{Name}` becomes the variable's value in every file
//! matched by the glob patterns of `Octopus.Action.SubstituteInFiles.TargetFiles`.
//!
//! The convention: `#{Name}` is replaced by the value of `Name` (exact name first, then
//! ignoring ASCII case); `##{Name}` is an escape and becomes the literal `#{Name}`; a
//! `#{Name}` whose variable is not defined is left as it is and reported. A name is
//! whatever lies between the braces, without `{`, `}` or a line break. Values are
//! inserted as they are (not substituted again).
//!
//! What this module keeps true: a file is either left as it was or replaced whole by
//! its substituted text (written to a temporary file in the same folder, synced,
//! renamed over it, with the original's permission bits). Only regular files are
//! touched: symlinks are never followed, so substitution cannot write outside the
//! package. A file that is not UTF-8 fails the step (nothing of it is changed).

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use globset::{Glob, GlobBuilder, GlobMatcher};

use crate::console;
use crate::error::DeployError;
use crate::variables::Variables;

/// The result of substituting one text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Substituted {
    /// The new text.
    pub text: String,
    /// How many `#{Name}` were replaced by a value.
    pub replaced: usize,
    /// Names used but not defined, each once, in order of first use.
    pub unknown: Vec<String>,
}

/// Substitutes `#{Name}` in `text` (see the module docs).
pub fn substitute_text(text: &str, vars: &Variables) -> Substituted {
    let mut out = String::with_capacity(text.len());
    let mut replaced = 0;
    let mut unknown: Vec<String> = Vec::new();
    let mut rest = text;
    while let Some(pos) = rest.find("#{") {
        let escaped = rest[..pos].ends_with('#');
        let after = &rest[pos + 2..];
        let name_len = after
            .find(['}', '{', '\n', '\r'])
            .filter(|&i| after[i..].starts_with('}'));
        let Some(name_len) = name_len.filter(|&n| n > 0) else {
            // Not a reference: keep `#{` and go on after it.
            out.push_str(&rest[..pos + 2]);
            rest = after;
            continue;
        };
        let name = &after[..name_len];
        let token_end = pos + 2 + name_len + 1;
        if escaped {
            // `##{Name}`: drop one `#`, keep the reference literally.
            out.push_str(&rest[..pos - 1]);
            out.push_str(&rest[pos..token_end]);
        } else {
            out.push_str(&rest[..pos]);
            match vars.lookup(name) {
                Some(value) => {
                    out.push_str(value);
                    replaced += 1;
                }
                None => {
                    out.push_str(&rest[pos..token_end]);
                    if !unknown.iter().any(|u| u == name) {
                        unknown.push(name.to_owned());
                    }
                }
            }
        }
        rest = &rest[token_end..];
    }
    out.push_str(rest);
    Substituted {
        text: out,
        replaced,
        unknown,
    }
}

/// The patterns in a `TargetFiles` value: separated by newlines or `;`, trimmed, empty
/// ones dropped, a leading `./` removed.
pub fn target_patterns(value: &str) -> Vec<String> {
    value
        .split(['\n', ';'])
        .map(str::trim)
        .map(|p| p.strip_prefix("./").unwrap_or(p))
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Substitutes variables in the files under `root` matched by `patterns` (relative to
/// `root`, `/`-separated; `*` stays within a folder, `**` crosses folders). Prints one
/// line per file changed, a warning per pattern that matched nothing and per file with
/// unknown names. Answers the files matched, relative to `root`.
pub fn substitute_in_files(
    root: &Path,
    patterns: &[String],
    vars: &Variables,
) -> Result<Vec<PathBuf>, DeployError> {
    let matchers = patterns
        .iter()
        .map(|p| compile(p).map(|m| (p.as_str(), m)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut files = Vec::new();
    walk(root, Path::new(""), &mut files)?;
    files.sort();
    let mut matched = BTreeSet::new();
    for (pattern, matcher) in &matchers {
        let mut any = false;
        for rel in &files {
            if matcher.is_match(rel) {
                any = true;
                matched.insert(rel.clone());
            }
        }
        if !any {
            console::warn(&format!(
                "substitution pattern {pattern:?} matched no file in {}",
                root.display()
            ));
        }
    }
    for rel in &matched {
        substitute_file(root, rel, vars)?;
    }
    Ok(matched.into_iter().collect())
}

fn compile(pattern: &str) -> Result<GlobMatcher, DeployError> {
    let glob: Glob = GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| {
            DeployError::other(format!(
                "the substitution pattern {pattern:?} is not a valid glob: {e}\nfix Octopus.Action.SubstituteInFiles.TargetFiles (patterns are relative to the package folder, one per line or separated by `;`)"
            ))
        })?;
    Ok(glob.compile_matcher())
}

/// Collects the regular files under `root/rel`, relative to `root`, without following
/// symlinks.
fn walk(root: &Path, rel: &Path, files: &mut Vec<PathBuf>) -> Result<(), DeployError> {
    let dir = root.join(rel);
    let entries =
        fs::read_dir(&dir).map_err(|e| DeployError::io("listing the folder", &dir, &e))?;
    for entry in entries {
        let entry = entry.map_err(|e| DeployError::io("listing the folder", &dir, &e))?;
        let kind = entry
            .file_type()
            .map_err(|e| DeployError::io("inspecting", &entry.path(), &e))?;
        let child = rel.join(entry.file_name());
        if kind.is_dir() {
            walk(root, &child, files)?;
        } else if kind.is_file() {
            files.push(child);
        }
    }
    Ok(())
}

fn substitute_file(root: &Path, rel: &Path, vars: &Variables) -> Result<(), DeployError> {
    let path = root.join(rel);
    let bytes = fs::read(&path).map_err(|e| DeployError::io("reading", &path, &e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        DeployError::other(format!(
            "cannot substitute variables in {}: it is not UTF-8 text (invalid byte at offset {})\nconvert the file to UTF-8, or leave it out of Octopus.Action.SubstituteInFiles.TargetFiles",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })?;
    let result = substitute_text(&text, vars);
    if !result.unknown.is_empty() {
        let names: Vec<String> = result.unknown.iter().map(|n| format!("#{{{n}}}")).collect();
        console::warn(&format!(
            "{}: {} not defined, left as is",
            rel.display(),
            names.join(", ")
        ));
    }
    if result.text == text {
        console::info(&format!("No variables substituted in {}", rel.display()));
        return Ok(());
    }
    write_atomic(&path, result.text.as_bytes())?;
    console::info(&format!(
        "Substituted {} variable reference{} in {}",
        result.replaced,
        if result.replaced == 1 { "" } else { "s" },
        rel.display()
    ));
    Ok(())
}

/// Replaces `path` by `content`: a temporary file beside it, the original's permissions,
/// synced, renamed over it.
fn write_atomic(path: &Path, content: &[u8]) -> Result<(), DeployError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let perms = fs::metadata(path)
        .map_err(|e| DeployError::io("inspecting", path, &e))?
        .permissions();
    let mut tmp = tempfile::Builder::new()
        .prefix(".calamari-subst-")
        .tempfile_in(dir)
        .map_err(|e| DeployError::io("creating a temporary file in", dir, &e))?;
    tmp.write_all(content)
        .and_then(|()| tmp.as_file().set_permissions(perms))
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| DeployError::io("writing", tmp.path(), &e))?;
    tmp.persist(path)
        .map_err(|e| DeployError::io("replacing", path, &e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Variables {
        let mut v = Variables::new();
        v.set("Name", "World");
        v.set("Octopus.Environment.Name", "Production");
        v.set("Empty", "");
        v
    }

    #[test]
    fn replaces_escapes_and_reports_unknown() {
        let r = substitute_text(
            "Hello #{Name} in #{Octopus.Environment.Name}; ##{Name} #{Missing} #{Missing} #{name}",
            &vars(),
        );
        assert_eq!(
            r.text,
            "Hello World in Production; #{Name} #{Missing} #{Missing} World"
        );
        assert_eq!(r.replaced, 3);
        assert_eq!(r.unknown, vec!["Missing".to_owned()]);
    }

    #[test]
    fn leaves_non_references_alone() {
        for text in [
            "",
            "no refs",
            "#{",
            "#{}",
            "#{unterminated",
            "#{a\nb}",
            "{Name}",
            "# {Name}",
            "#{{Name}}x",
        ] {
            let r = substitute_text(text, &Variables::new());
            assert_eq!(r.text, text, "{text:?}");
        }
        assert_eq!(substitute_text("#{{Name}", &vars()).text, "#{{Name}");
        assert_eq!(substitute_text("###{Name}", &vars()).text, "##{Name}");
        assert_eq!(substitute_text("#{Empty}!", &vars()).text, "!");
        assert_eq!(substitute_text("ü#{Name}ü", &vars()).text, "üWorldü");
    }

    #[test]
    fn splits_patterns() {
        assert_eq!(
            target_patterns("a.conf\n ./b/*.json ;; **/*.xml\r\n"),
            vec!["a.conf", "b/*.json", "**/*.xml"]
        );
    }
}
