//! Configuration: Istio `VirtualService`, `DestinationRule`, `ServiceEntry`,
//! `WorkloadEntry` and umbra's `ShadowAnalysis`, read verbatim from YAML and
//! validated into the typed [`model::Config`] the data plane runs on.
//!
//! Loading is two steps, as in linkerd's and sozu's config code: a faithful
//! serde model of the resources ([`istio`], parsed by [`document`] with
//! line and column for every value), then [`resolve`], which checks every
//! semantic rule and resolves destinations to endpoints. Both steps collect
//! every problem before failing; unknown fields are warnings, never silent.

pub mod document;
pub mod istio;
pub mod model;
pub mod resolve;
mod summary;
pub mod tls;

use std::path::{Path, PathBuf};

pub use model::{Config, Diagnostic};
pub use summary::summary;

/// Every error (and warning) found in a config that does not load.
#[derive(Debug, Default)]
pub struct LoadErrors {
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
    /// The files the config names beside itself (see `Config::files`), so
    /// that the one it waits for is watched.
    pub files: Vec<PathBuf>,
}

impl std::fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (index, error) in self.errors.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadErrors {}

/// Loads YAML files, or directories of `*.yaml`/`*.yml` (sorted by name).
pub fn load<P: AsRef<Path>>(paths: &[P]) -> Result<Config, LoadErrors> {
    let mut findings = document::Findings::default();
    let mut resources = Vec::new();
    for path in paths {
        for file in files(path.as_ref(), &mut findings) {
            let name = file.display().to_string();
            match std::fs::read(&file) {
                Ok(bytes) => match String::from_utf8(bytes) {
                    Ok(text) => {
                        resources.extend(document::parse_file(&name, &text, &mut findings));
                    }
                    Err(error) => findings.errors.push(not_utf8(&name, &error)),
                },
                Err(error) => findings.errors.push(Diagnostic {
                    file: name,
                    line: 1,
                    column: 1,
                    message: format!(
                        "cannot read the file: {error}. Check the path and permissions."
                    ),
                }),
            }
        }
    }
    finish(resources, findings)
}

/// Loads one file's text; `file_name` is only used in messages.
pub fn load_str(file_name: &str, text: &str) -> Result<Config, LoadErrors> {
    let mut findings = document::Findings::default();
    let resources = document::parse_file(file_name, text, &mut findings);
    finish(resources, findings)
}

fn finish(
    resources: Vec<document::Resource>,
    mut findings: document::Findings,
) -> Result<Config, LoadErrors> {
    let mut config = resolve::resolve(resources, &mut findings);
    // Report in file order, whatever order the checks ran in.
    let position = |d: &Diagnostic| (d.file.clone(), d.line, d.column);
    findings.errors.sort_by_key(position);
    findings.warnings.sort_by_key(position);
    findings.files.sort();
    findings.files.dedup();
    if findings.errors.is_empty() {
        config.warnings = findings.warnings;
        config.files = findings.files;
        Ok(config)
    } else {
        Err(LoadErrors {
            errors: findings.errors,
            warnings: findings.warnings,
            files: findings.files,
        })
    }
}

/// Kubernetes reads YAML as UTF-8, and so does umbra: any other encoding
/// (Latin-1, UTF-16) is refused at its first byte that is not UTF-8,
/// rather than loaded with that byte replaced (a name `caf\u{fffd}`).
fn not_utf8(file: &str, error: &std::string::FromUtf8Error) -> Diagnostic {
    let bytes = error.as_bytes();
    let valid = &bytes[..error.utf8_error().valid_up_to()];
    let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    // The column in characters, as the parser counts them.
    let column = String::from_utf8_lossy(&valid[line_start..])
        .chars()
        .count()
        + 1;
    let byte = bytes[valid.len()];
    Diagnostic {
        file: file.to_string(),
        line,
        column,
        message: format!(
            "the file is not UTF-8 (byte 0x{byte:02X} here is not valid UTF-8; Latin-1 or UTF-16 perhaps). Save it as UTF-8."
        ),
    }
}

fn files(path: &Path, findings: &mut document::Findings) -> Vec<PathBuf> {
    let missing = |message: String| Diagnostic {
        file: path.display().to_string(),
        line: 1,
        column: 1,
        message,
    };
    if path.is_dir() {
        match std::fs::read_dir(path) {
            Ok(entries) => {
                let mut files: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.is_file()
                            && matches!(
                                p.extension().and_then(|e| e.to_str()),
                                Some("yaml" | "yml")
                            )
                    })
                    .collect();
                files.sort();
                if files.is_empty() {
                    findings.warnings.push(missing(
                        "this directory has no *.yaml or *.yml files; files added to it later are loaded (it is watched). Check the path if that is not what you meant.".into(),
                    ));
                }
                files
            }
            Err(error) => {
                findings
                    .errors
                    .push(missing(format!("cannot read the directory: {error}")));
                Vec::new()
            }
        }
    } else if path.exists() {
        vec![path.to_path_buf()]
    } else {
        findings.errors.push(missing(
            "no such file or directory. Pass a YAML file or a directory of them.".into(),
        ));
        Vec::new()
    }
}
