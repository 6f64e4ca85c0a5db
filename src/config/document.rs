//! The YAML layer: splits files into documents, parses each into a spanned
//! node tree, reads the resource envelope (apiVersion, kind, metadata) and
//! deserializes specs into the `istio` model, turning every problem into a
//! positioned [`Diagnostic`]. Unknown fields become warnings here.

use std::collections::BTreeMap;

use marked_yaml::types::MarkedMappingNode;
use marked_yaml::{LoaderOptions, Marker, Node, Span};
use serde::de::DeserializeOwned;

use super::model::Diagnostic;

/// Errors and warnings collected across every file before failing.
#[derive(Debug, Default)]
pub struct Findings {
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
    /// Files the resources name beside themselves (TLS certificates, keys,
    /// revocation lists), readable or not: a reload watches them.
    pub files: Vec<std::path::PathBuf>,
}

impl Findings {
    /// Adds an error unless it is already there: a DestinationRule's
    /// settings are read again for every destination under it.
    pub fn error_once(&mut self, error: Diagnostic) {
        if !self.errors.contains(&error) {
            self.errors.push(error);
        }
    }

    /// As [`Findings::error_once`], for a warning.
    pub fn warn_once(&mut self, warning: Diagnostic) {
        if !self.warnings.contains(&warning) {
            self.warnings.push(warning);
        }
    }
}

/// Where a document sits in its file.
#[derive(Debug, Clone)]
pub struct Origin {
    pub file: String,
    /// Lines before the document's first line.
    pub line_offset: usize,
}

impl Origin {
    /// A diagnostic at a span inside this document.
    pub fn at(&self, span: &Span, message: impl Into<String>) -> Diagnostic {
        let (line, column) = span
            .start()
            .map_or((1, 1), |m: &Marker| (m.line(), m.column()));
        Diagnostic {
            file: self.file.clone(),
            line: line + self.line_offset,
            column,
            message: message.into(),
        }
    }
}

/// One parsed resource: its envelope and the spanned spec.
#[derive(Debug)]
pub struct Resource {
    pub origin: Origin,
    pub api_version: String,
    pub kind: String,
    pub kind_span: Span,
    pub name: String,
    pub name_span: Span,
    pub namespace: String,
    pub annotations: BTreeMap<String, (String, Span)>,
    pub spec: Node,
}

/// Splits at `---` lines, keeping each document's line offset.
fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 0;
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") || trimmed.starts_with("---\t") {
            docs.push((start, std::mem::take(&mut current)));
            start = index + 1;
            continue;
        }
        if trimmed == "..." {
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    docs.push((start, current));
    docs.retain(|(_, doc)| {
        doc.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    });
    docs
}

/// Parses one file's text into resources, recording every problem.
pub fn parse_file(file: &str, text: &str, findings: &mut Findings) -> Vec<Resource> {
    // A byte order mark, as Windows editors write one, is no content: YAML
    // allows it at the start of a stream.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut resources = Vec::new();
    for (line_offset, doc) in documents(text) {
        let origin = Origin {
            file: file.to_string(),
            line_offset,
        };
        resources.extend(parse_document(&origin, &doc, findings));
    }
    resources
}

/// The resources of one document: itself, or the items of a `List`.
fn parse_document(origin: &Origin, text: &str, findings: &mut Findings) -> Vec<Resource> {
    if let Some((line, column)) = tab_indentation(text) {
        findings.errors.push(Diagnostic {
            file: origin.file.clone(),
            line: line + origin.line_offset,
            column,
            message: "a tab is used for indentation; YAML allows only spaces. Replace the tab with spaces.".into(),
        });
        return Vec::new();
    }
    let options = LoaderOptions::default()
        .error_on_duplicate_keys(true)
        .toplevel_mapping();
    let node = match marked_yaml::parse_yaml_with_options(0, text, options) {
        Ok(mut node) => {
            place_block_mappings_at_their_first_key(&mut node);
            node
        }
        Err(error) => {
            findings.errors.push(load_error(origin, text, error));
            return Vec::new();
        }
    };
    // `kubectl get virtualservices,destinationrules -o yaml` writes a
    // `List` (the API a `VirtualServiceList`) with the resources under
    // `items`: a whole mesh's config, as a user would save it.
    let top = node.as_mapping();
    let kind = top.and_then(|top| top.get_scalar("kind"));
    let items = top.and_then(|top| top.get_sequence("items"));
    if let (Some(kind), Some(items)) = (kind, items) {
        if kind.as_str().ends_with("List") {
            let items = items.iter().enumerate();
            let items = items.filter_map(|(index, item)| match item.as_mapping() {
                Some(_) => resource(origin, item, findings),
                None => {
                    findings.errors.push(origin.at(
                        item.span(),
                        format!("items[{index}] of this {} is not a resource. Write each item as a mapping with apiVersion, kind, metadata and spec.", kind.as_str()),
                    ));
                    None
                }
            });
            return items.collect();
        }
    }
    resource(origin, &node, findings).into_iter().collect()
}

/// One resource, a document's top-level mapping or an item of a `List`.
fn resource(origin: &Origin, node: &Node, findings: &mut Findings) -> Option<Resource> {
    let top = node.as_mapping()?;
    let api_version = scalar(top, "apiVersion");
    let kind_node = top.get_scalar("kind");
    let Some(kind_node) = kind_node else {
        findings.errors.push(origin.at(
            node.span(),
            "this document has no `kind`. Add `kind:` (VirtualService, DestinationRule, ServiceEntry, WorkloadEntry or ShadowAnalysis).",
        ));
        return None;
    };
    let kind = kind_node.as_str().to_string();
    let metadata = top.get_mapping("metadata");
    let name_node = metadata.and_then(|m| m.get_scalar("name"));
    let name = name_node
        .map(|n| n.as_str().to_string())
        .unwrap_or_default();
    let name_span = name_node.map_or_else(|| *kind_node.span(), |n| *n.span());
    let namespace = metadata
        .and_then(|m| m.get_scalar("namespace"))
        .map(|n| n.as_str().to_string())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into());
    let annotations = metadata
        .and_then(|m| m.get_mapping("annotations"))
        .map(|a| {
            a.iter()
                .filter_map(|(key, value)| {
                    let value = value.as_scalar()?;
                    Some((
                        key.as_str().to_string(),
                        (value.as_str().to_string(), *value.span()),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let spec = top.get_node("spec").cloned();
    let resource = Resource {
        origin: origin.clone(),
        api_version,
        kind,
        kind_span: *kind_node.span(),
        name,
        name_span,
        namespace,
        annotations,
        spec: spec.unwrap_or_else(|| Node::from(MarkedMappingNode::new_empty(*node.span()))),
    };
    if !KINDS.contains(&resource.kind.as_str()) {
        // A misspelt kind would drop the resource with only a notice, and
        // the config would load without it.
        if let Some(kind) = near_miss(&resource.kind, KINDS) {
            findings.errors.push(origin.at(
                &resource.kind_span,
                format!(
                    "kind `{}` is not one umbra reads; did you mean `{kind}`? Fix the spelling.",
                    resource.kind
                ),
            ));
            return None;
        }
        findings.warnings.push(origin.at(
            &resource.kind_span,
            format!(
                "skipping {} \"{}\": umbra reads VirtualService, DestinationRule, ServiceEntry, WorkloadEntry and ShadowAnalysis",
                resource.kind, resource.name
            ),
        ));
        return None;
    }
    let mut ok = true;
    // Keys a mis-indented spec leaves at the top level.
    for (key, _) in top.iter() {
        if !ENVELOPE.contains(&key.as_str()) {
            ok = false;
            findings.errors.push(origin.at(
                key.span(),
                format!(
                    "`{}` is at the top level of this {}, but it belongs under `spec:`. Indent it (and its siblings) by two spaces under `spec:`.",
                    key.as_str(),
                    resource.kind
                ),
            ));
        }
    }
    if name_node.is_none_or(|n| n.as_str().is_empty()) {
        ok = false;
        findings.errors.push(origin.at(
            &resource.kind_span,
            format!(
                "this {} has no `metadata.name`. Add `metadata: {{name: ...}}`.",
                resource.kind
            ),
        ));
    }
    let spec_is_mapping = top
        .get_node("spec")
        .is_some_and(|s| s.as_mapping().is_some());
    if ok && !spec_is_mapping {
        ok = false;
        let span = top
            .get_node("spec")
            .map_or(resource.kind_span, |s| *s.span());
        findings.errors.push(origin.at(
            &span,
            format!(
                "{} \"{}\" has no `spec` mapping. Add `spec:` with its fields indented under it.",
                resource.kind, resource.name
            ),
        ));
    }
    ok.then_some(resource)
}

/// The parser marks a block mapping where it met the first `:`, past the
/// first key (`retries:` above `  perTryTimeout: 2s` starts at that
/// line's colon); a message about the mapping belongs at its first key.
fn place_block_mappings_at_their_first_key(node: &mut Node) {
    match node {
        Node::Mapping(map) => {
            let first = map
                .iter()
                .next()
                .and_then(|(key, _)| key.span().start().copied());
            if let (Some(first), Some(start)) = (first, map.span().start()) {
                if (first.line(), first.column()) < (start.line(), start.column()) {
                    map.span_mut().set_start(Some(first));
                }
            }
            for (_, value) in map.iter_mut() {
                place_block_mappings_at_their_first_key(value);
            }
        }
        Node::Sequence(items) => {
            for item in items.iter_mut() {
                place_block_mappings_at_their_first_key(item);
            }
        }
        Node::Scalar(_) => {}
    }
}

const KINDS: [&str; 5] = [
    "VirtualService",
    "DestinationRule",
    "ServiceEntry",
    "WorkloadEntry",
    "ShadowAnalysis",
];

const ENVELOPE: [&str; 5] = ["apiVersion", "kind", "metadata", "spec", "status"];

fn scalar(map: &MarkedMappingNode, key: &str) -> String {
    map.get_scalar(key)
        .map(|s| s.as_str().to_string())
        .unwrap_or_default()
}

/// The first line indented with a tab, as (line, column), 1-based.
fn tab_indentation(text: &str) -> Option<(usize, usize)> {
    text.lines().enumerate().find_map(|(index, line)| {
        let indent: String = line
            .chars()
            .take_while(|c| *c == ' ' || *c == '\t')
            .collect();
        indent
            .find('\t')
            .filter(|_| !line.trim().is_empty())
            .map(|col| (index + 1, col + 1))
    })
}

/// Where the flow collection (`[`, `{`) or quoted string still open at
/// `stop` began, if on an earlier line, as 0-based (line, column, opener).
/// The parser reports an unclosed one where it gives up, often lines
/// later; this finds where the fix goes. A rough scan, not a YAML parser:
/// it gives up (`None`) on a block scalar or a mismatched closer.
fn unclosed_before(text: &str, stop: (usize, usize)) -> Option<(usize, usize, char)> {
    let mut open: Vec<(usize, usize, char)> = Vec::new();
    for (row, line) in text.lines().enumerate().take(stop.0 + 1) {
        // Whether a value may begin here: a quote or a block-context
        // bracket only opens something there.
        let mut at_start = true;
        let mut escaped = false;
        // A `#` after a space (or at the line's start) begins a comment.
        let mut prev = ' ';
        let mut chars = line.chars().enumerate().peekable();
        while let Some((col, c)) = chars.next() {
            let before = std::mem::replace(&mut prev, c);
            if (row, col) >= stop {
                break;
            }
            let next = chars.peek().map(|&(_, n)| n);
            match open.last().map(|o| o.2) {
                Some('"') => {
                    if c == '"' && !escaped {
                        open.pop();
                    }
                    escaped = c == '\\' && !escaped;
                    continue;
                }
                Some('\'') => {
                    if c == '\'' {
                        if next == Some('\'') {
                            chars.next(); // `''` is a quote inside the string.
                        } else {
                            open.pop();
                        }
                    }
                    continue;
                }
                _ => {}
            }
            let in_flow = !open.is_empty();
            let then_space = next.is_none_or(|n| n == ' ');
            match c {
                ' ' => continue,
                '#' if before == ' ' => break,
                '"' | '\'' if at_start => open.push((row, col, c)),
                '[' | '{' if at_start || in_flow => open.push((row, col, c)),
                ']' | '}' if in_flow => {
                    let opener = if c == ']' { '[' } else { '{' };
                    if open.pop().map(|o| o.2) != Some(opener) {
                        return None;
                    }
                }
                '|' | '>' if at_start && !in_flow => return None,
                _ => {}
            }
            at_start = match c {
                '[' | '{' | ',' => in_flow || at_start,
                ':' | '-' | '?' => then_space,
                _ => false,
            };
        }
    }
    open.pop().filter(|&(row, _, _)| row < stop.0)
}

fn load_error(origin: &Origin, text: &str, error: marked_yaml::LoadError) -> Diagnostic {
    use marked_yaml::LoadError as E;
    let (marker, message) = match &error {
        E::ScanError(marker, scan) => {
            let stop = (
                marker.line().saturating_sub(1),
                marker.column().saturating_sub(1),
            );
            // A quoted string still open at the end: the parser places
            // that at its opening quote, with words about the stream.
            let quote = (text.lines().nth(stop.0))
                .and_then(|line| line.chars().nth(stop.1))
                .filter(|c| matches!(c, '"' | '\''));
            if let (Some(quote), true) = (quote, scan.info().contains("end of stream")) {
                return origin.at(
                    &Span::new_start(*marker),
                    format!("invalid YAML: the string this quote opens is never closed. Close it with `{quote}`."),
                );
            }
            if let Some((line, column, opener)) = unclosed_before(text, stop) {
                let (what, close) = match opener {
                    '[' => ("this `[` is", ']'),
                    '{' => ("this `{` is", '}'),
                    _ => ("the string this quote opens is", opener),
                };
                return Diagnostic {
                    file: origin.file.clone(),
                    line: line + 1 + origin.line_offset,
                    column: column + 1,
                    message: format!(
                        "invalid YAML: {what} never closed (the parser gave up at line {}, column {}: {}). Close it with `{close}`.",
                        marker.line() + origin.line_offset,
                        marker.column(),
                        scan.info()
                    ),
                };
            }
            (
                Some(*marker),
                format!(
                    "invalid YAML: {}. Check the indentation and quoting around here.",
                    scan.info()
                ),
            )
        }
        E::DuplicateKey(inner) => (
            inner.key.span().start().copied(),
            format!(
                "duplicate key `{}` (first defined on line {}). Remove one of them.",
                inner.key.as_str(),
                inner
                    .prev_key
                    .span()
                    .start()
                    .map_or(0, |m| m.line() + origin.line_offset)
            ),
        ),
        E::TopLevelMustBeMapping(marker) => (
            Some(*marker),
            "a Kubernetes resource must be a mapping (apiVersion, kind, metadata, spec).".into(),
        ),
        E::UnexpectedAnchor(marker) => (
            Some(*marker),
            "YAML anchors and aliases are not supported. Write the value out in full.".into(),
        ),
        E::UnexpectedTag(marker) => (
            Some(*marker),
            "explicit YAML tags (`!!str` and the like) are not supported. Remove the tag.".into(),
        ),
        E::MappingKeyMustBeScalar(marker) => {
            (Some(*marker), "mapping keys must be plain strings.".into())
        }
        other => (None, format!("invalid YAML: {other}")),
    };
    let span = marker.map_or_else(Span::new_blank, Span::new_start);
    origin.at(&span, message)
}

/// Deserializes a spec into `T`. Type errors become errors at their
/// position; fields `T` does not know become "not supported" warnings.
pub fn spec<T: DeserializeOwned + serde::Serialize>(
    resource: &Resource,
    findings: &mut Findings,
) -> Option<T> {
    let origin = &resource.origin;
    let value = match marked_yaml::from_node::<T>(&resource.spec) {
        Ok(value) => value,
        Err(error) => {
            // serde reads a struct from a list by position, so a list
            // where a mapping of fields belongs fails at a field of its
            // first item, or for its length: say what it is.
            let listed = listed_fields(&resource.spec, error.path().unwrap_or(""), &error);
            let inner = listed.as_deref().unwrap_or(error.path().unwrap_or(""));
            // marked_yaml walks the path to place an error it has no span
            // for, but stops at the first `Spanned` value on the way (a
            // route, a destination), so that the error is placed at the
            // route's start: walk it again to the value itself.
            let (node, _) = walk(&resource.spec, inner);
            let span = match &*error {
                marked_yaml::spanned_serde::Error::Other(..) => *node.span(),
                _ if listed.is_some() => *node.span(),
                _ => error
                    .start_mark()
                    .map_or_else(|| *node.span(), Span::new_start),
            };
            let path = match inner {
                "" => "spec".to_string(),
                inner => format!("spec.{inner}"),
            };
            let message = match listed {
                Some(_) => {
                    let key = last_key(&path);
                    format!("{path}: expected a mapping of fields, found a list. Write `{key}` as one mapping: drop the `- ` before its fields (or the `[...]` around them).")
                }
                None => type_error_message(&path, node, &error),
            };
            findings.errors.push(origin.at(&span, message));
            return None;
        }
    };
    // Whatever the model did not read is not in its serialized form: diff
    // the YAML keys against it, so this check can never drift from `T`.
    // (No field of the model skips serializing, so an absent one is there
    // as `null`, and a misspelling of it is still caught.)
    if let Ok(known) = serde_json::to_value(&value) {
        let mut unknown = Vec::new();
        unknown_fields(&resource.spec, &known, &mut Vec::new(), &mut unknown);
        for Unknown {
            segments,
            span,
            near,
        } in unknown
        {
            // A near miss of a field umbra reads is most likely a typo,
            // but may be an Istio field umbra does not know: a warning
            // either way (never fatal, as STYLE.md has it), naming the
            // field it may have meant.
            let message = match near {
                Some(field) => format!(
                    "{} is not a field umbra knows and is ignored; did you mean `{field}`? Fix the spelling.",
                    render(&segments)
                ),
                None => format!(
                    "{} is not supported by umbra yet and is ignored{}",
                    render(&segments),
                    hint(&segments)
                ),
            };
            findings.warnings.push(origin.at(&span, message));
        }
    }
    Some(value)
}

/// A YAML key the model does not read.
struct Unknown {
    /// Its path under `spec`, one segment per key or `[index]`.
    segments: Vec<String>,
    span: Span,
    /// The field at that level it is a near miss of, if any.
    near: Option<String>,
}

/// The candidate `word` is most likely a misspelling of: equal but for
/// case, or within one edit for words of up to four letters (`tcp` is
/// Istio's, not a typo of `http`) and two for longer ones.
pub(super) fn near_miss<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let word = word.to_lowercase();
    let allowed = if word.chars().count() <= 4 { 1 } else { 2 };
    candidates
        .into_iter()
        .map(|candidate| (edit_distance(&word, &candidate.to_lowercase()), candidate))
        .filter(|(distance, _)| *distance <= allowed)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Edits (insert, delete, substitute, or swap two neighbours) that turn
/// `a` into `b`: Levenshtein's distance, with a swap counting as one as
/// typing makes it (`hsot` for `host`).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // rows[i][j]: the distance between a[..i] and b[..j].
    let mut rows = vec![vec![0; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let substitute = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + substitute);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}

fn type_error_message(path: &str, node: &Node, error: &marked_yaml::FromNodeError) -> String {
    use marked_yaml::spanned_serde::Error as E;
    use std::num::IntErrorKind;
    let text = node.as_scalar().map(|s| s.as_str());
    let negative = text.is_some_and(|t| t.starts_with('-') && t[1..].parse::<u64>().is_ok());
    let detail = match &**error {
        // A whole number out of the field's range is not of the wrong type.
        E::IntegerParseFailure(parse, _) => match parse.kind() {
            IntErrorKind::PosOverflow => {
                return format!(
                    "{path}: the number is too large for this field. Use a smaller one."
                )
            }
            IntErrorKind::NegOverflow => {
                return format!("{path}: the number is too small for this field. Use a larger one.")
            }
            _ if negative => {
                return format!("{path}: this field cannot be negative. Use 0 or more.")
            }
            _ => "expected a whole number".to_string(),
        },
        E::FloatParseFailure(..) => "expected a number".to_string(),
        E::NotBoolean(..) => "expected true or false".to_string(),
        E::Other(message, _) => match shape_mismatch(path, message, text) {
            Some(sentence) => return sentence,
            None => message.clone(),
        },
        other => other.to_string(),
    };
    format!("{path}: {detail}. Fix the value's type.")
}

/// The key a path ends in: `set` of `spec.http[0].headers.request.set`,
/// `match` of `spec.http[1].match`.
fn last_key(path: &str) -> &str {
    let key = path.rsplit('.').next().unwrap_or(path);
    key.split('[').next().unwrap_or(key)
}

/// The path of a field that takes a mapping of fields (a struct) but was
/// written as a list, if that is what the type error at `path` is.
fn listed_fields(spec: &Node, path: &str, error: &marked_yaml::FromNodeError) -> Option<String> {
    use marked_yaml::spanned_serde::Error as E;
    let field = match &**error {
        // Fewer items than the struct has fields.
        E::Other(message, _)
            if message.starts_with("invalid length ") && message.contains("expected struct ") =>
        {
            match path.strip_suffix(".?") {
                // The value of a map entry whose key the path does not
                // name (`headers.?`): the first entry that is a list.
                Some(map) => {
                    let (node, rest) = walk(spec, map);
                    let entries = node.as_mapping().filter(|_| rest.is_empty())?;
                    let (key, _) = entries
                        .iter()
                        .find(|(_, value)| value.as_sequence().is_some())?;
                    format!("{map}.{}", key.as_str())
                }
                None => path.to_string(),
            }
        }
        // Its first item did not fit the struct's first field.
        _ => {
            let field = path.strip_suffix("[0]")?;
            let (before, key) = field.rsplit_once('.').unwrap_or(("", field));
            let before = before.rsplit('.').next().unwrap_or(before);
            let takes_fields = match key {
                // A struct under a route or a destination, a map in a match.
                "headers" => before.starts_with("http[") || before.starts_with("route["),
                // Under `connectionPool`; the routes of a VirtualService are a list.
                "http" => before == "connectionPool",
                _ => STRUCT_FIELDS.contains(&key),
            };
            if !takes_fields {
                return None;
            }
            field.to_string()
        }
    };
    let (node, rest) = walk(spec, &field);
    (rest.is_empty() && node.as_sequence().is_some()).then_some(field)
}

/// Fields of the model that are a struct wherever they appear.
const STRUCT_FIELDS: [&str; 22] = [
    "retries",
    "mirror",
    "mirrorPercentage",
    "rewrite",
    "destination",
    "port",
    "percentage",
    "trafficPolicy",
    "connectionPool",
    "tcp",
    "loadBalancer",
    "outlierDetection",
    "tls",
    "workloadSelector",
    "targetRef",
    "baseline",
    "thresholds",
    "capture",
    "ignore",
    "uri",
    "request",
    "response",
];

/// A mapping, a list or a single value where another of the three
/// belongs, as a sentence with its fix; serde's own words name Rust types
/// (`expected struct Percent`) and call every scalar a string.
fn shape_mismatch(path: &str, message: &str, text: Option<&str>) -> Option<String> {
    let (found, expected) = message
        .strip_prefix("invalid type: ")?
        .split_once(", expected ")?;
    let key = last_key(path);
    let found = if found == "map" {
        "a mapping".to_string()
    } else if found == "sequence" {
        "a list".to_string()
    } else {
        format!("`{}`", text?)
    };
    let value = text.unwrap_or("...");
    let (wanted, fix) = if let Some(name) = expected.strip_prefix("struct ") {
        let fix = match (text, name) {
            (Some(_), "Percent") => format!("Write `{key}: {{value: {value}}}`."),
            (Some(_), "Destination") => format!("Write `{key}: {{host: {value}}}`."),
            (Some(_), "StringMatch") => {
                format!("Write `{key}: {{exact: {value}}}` (or `prefix`, or `regex`).")
            }
            (Some(_), "HttpRetry") => format!("Write `{key}: {{attempts: {value}}}`."),
            (Some(_), _) => format!("Write the fields of `{key}` indented under it."),
            (None, _) => format!("Write `{key}` as one mapping: drop the `- ` before its fields (or the `[...]` around them)."),
        };
        ("a mapping of fields", fix)
    } else if expected == "a map" {
        let fix = match text {
            Some(_) => format!("Write `{key}` as `name: value` lines indented under it."),
            None => format!("Write `{key}` as `name: value` lines, without `- ` (or `[...]`)."),
        };
        ("a mapping", fix)
    } else if expected == "a sequence" {
        let fix = match text {
            Some(_) => format!("Write it as a list: `{key}: [{value}]`."),
            None => "Write it as a list: put `- ` before its first field (or wrap it in `[...]`)."
                .into(),
        };
        ("a list", fix)
    } else if text.is_none() {
        (
            "a single value",
            format!("Give `{key}` one value, not {found}."),
        )
    } else {
        return None;
    };
    Some(format!("{path}: expected {wanted}, found {found}. {fix}"))
}

/// The node at `path` under `node` (as `walk` reads it), if the path is
/// in the tree.
pub(super) fn node_at<'a>(node: &'a Node, path: &str) -> Option<&'a Node> {
    match walk(node, path) {
        (node, "") => Some(node),
        _ => None,
    }
}

/// The node `path` leads to under `node` (`path` as serde_path_to_error
/// renders it: `http[2].mirrorPercentage`, a key with dots in it as it
/// is), or the last one it reaches before it leaves the tree, with what
/// is left of the path.
fn walk<'a, 'p>(node: &'a Node, path: &'p str) -> (&'a Node, &'p str) {
    let mut node = node;
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('[') {
            let Some((index, after)) = after.split_once(']') else {
                break;
            };
            let item = index
                .parse::<usize>()
                .ok()
                .and_then(|i| node.as_sequence()?.get(i));
            let Some(item) = item else { break };
            node = item;
            rest = after.strip_prefix('.').unwrap_or(after);
            continue;
        }
        let Some(map) = node.as_mapping() else { break };
        // The longest key the path goes on from: `app.kubernetes.io/name`
        // is one label key, not three.
        let next = map
            .iter()
            .filter(|(key, _)| {
                let key = key.as_str();
                rest.strip_prefix(key)
                    .is_some_and(|after| after.is_empty() || after.starts_with(['.', '[']))
            })
            .max_by_key(|(key, _)| key.as_str().len());
        let Some((key, value)) = next else { break };
        node = value;
        let after = &rest[key.as_str().len()..];
        rest = after.strip_prefix('.').unwrap_or(after);
    }
    (node, rest)
}

/// Keys present in the YAML but absent from the model's serialized form.
fn unknown_fields(
    node: &Node,
    known: &serde_json::Value,
    path: &mut Vec<String>,
    out: &mut Vec<Unknown>,
) {
    match (node, known) {
        (Node::Mapping(map), serde_json::Value::Object(fields)) => {
            for (key, child) in map.iter() {
                let name = key.as_str();
                path.push(name.to_string());
                match fields.get(name) {
                    Some(value) => unknown_fields(child, value, path, out),
                    None => out.push(Unknown {
                        segments: path.clone(),
                        span: *key.span(),
                        near: near_miss(name, fields.keys().map(String::as_str))
                            .map(str::to_string),
                    }),
                }
                path.pop();
            }
        }
        (Node::Sequence(items), serde_json::Value::Array(values)) => {
            for (index, (child, value)) in items.iter().zip(values).enumerate() {
                path.push(format!("[{index}]"));
                unknown_fields(child, value, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

/// What umbra does instead of an unsupported field, where it does something.
fn hint(segments: &[String]) -> &'static str {
    let parent = segments.len().checked_sub(2).map(|i| segments[i].as_str());
    match (parent, segments.last().map(String::as_str)) {
        (Some("outlierDetection"), Some("interval" | "minHealthPercent")) => {
            "; an ejected endpoint comes back once its ejection time is up, \
             and none is let back early for the destination's health"
        }
        // Still in Istio's documentation (the circuit-breaking task), but
        // deprecated, and Istio's proxies no longer read it either.
        (Some("outlierDetection"), Some("consecutiveErrors")) => {
            "; it is deprecated and Istio ignores it too, leaving the \
             default of 5 consecutive 5xx: set `consecutiveGatewayErrors` \
             (502, 503, 504 and failures to connect, what it counted) or \
             `consecutive5xxErrors`"
        }
        _ => "",
    }
}

fn render(segments: &[String]) -> String {
    let mut text = String::from("spec");
    for segment in segments {
        if !segment.starts_with('[') {
            text.push('.');
        }
        text.push_str(segment);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_keep_line_offsets() {
        let docs = documents("a: 1\n---\n# only a comment\n---\nb: 2\n");
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].0, 0);
        assert_eq!(docs[1].0, 4);
        assert_eq!(docs[1].1, "b: 2\n");
    }

    #[test]
    fn edit_distance_counts_insertions_deletions_substitutions_and_swaps() {
        assert_eq!(edit_distance("destination", "destination"), 0);
        assert_eq!(edit_distance("destinaton", "destination"), 1);
        assert_eq!(edit_distance("destinationn", "destination"), 1);
        assert_eq!(edit_distance("destinatiom", "destination"), 1);
        assert_eq!(edit_distance("hsot", "host"), 1);
        assert_eq!(edit_distance("tcp", "http"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn near_misses_ignore_case_and_allow_fewer_edits_in_short_words() {
        let fields = ["destination", "weight", "headers", "http", "host"];
        assert_eq!(near_miss("Destination", fields), Some("destination"));
        assert_eq!(near_miss("destnaton", fields), Some("destination"));
        assert_eq!(near_miss("hots", fields), Some("host"));
        // Istio's `tcp` and `tls` are fields umbra does not implement.
        assert_eq!(near_miss("tcp", fields), None);
        assert_eq!(near_miss("tls", fields), None);
        assert_eq!(near_miss("fault", fields), None);
    }

    #[test]
    fn an_unclosed_opener_is_found_where_it_began() {
        let text = "spec:\n  hosts: [r\n  http:\n  - a\n";
        assert_eq!(unclosed_before(text, (3, 2)), Some((1, 9, '[')));
        let text = "a: {b: 'it''s [x', c: \"q\\\"[\"\nd: 1\n";
        assert_eq!(unclosed_before(text, (1, 1)), Some((0, 3, '{')));
        let text = "a: \"open\nb: 1\n";
        assert_eq!(unclosed_before(text, (1, 1)), Some((0, 3, '"')));
        // Brackets inside plain scalars, comments and closed flows are not
        // openers; nor is one on the line the parser stopped at.
        let text = "regex: ^/a[0-9]+$ # [\nb: [1, {c: d}]\nc: [\n";
        assert_eq!(unclosed_before(text, (2, 5)), None);
        assert_eq!(unclosed_before("a: |\n  [\nb: 1\n", (2, 0)), None);
    }

    #[test]
    fn tabs_are_found() {
        assert_eq!(tab_indentation("a:\n\tb: 1\n"), Some((2, 1)));
        assert_eq!(tab_indentation("a: 'x\ty'\n"), None);
    }
}
