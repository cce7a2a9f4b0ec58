//! Router topology files: one data model for JSON, YAML and TOML, and its canonical bytes.
//!
//! A topology file is parsed ([`parse`]) into a [`Value`], whose canonical JSON
//! ([`canonical_json`]) is the same byte string whatever the source format or formatting, so
//! the same topology always has the same content ID. [`render`] writes a value back as a
//! human-friendly file in any format, and [`diff()`] lists the structural changes between two
//! versions. The rules are written for users in `docs/topology-canonical.md`.
//!
//! Sans-IO: callers hand in bytes and get values or bytes back. Parsing is bounded
//! ([`INPUT_BYTES_MAX`], [`DEPTH_MAX`]) and reports errors, with line and column where the
//! parser knows them, instead of panicking.

mod diff;
mod json;
mod toml;
mod value;
mod yaml;

use std::fmt;
use std::str::FromStr;

pub use self::diff::{Change, ChangeKind, diff};
pub use self::value::{Number, Value};

/// The largest topology file accepted by [`parse`], in bytes.
pub const INPUT_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// The deepest nesting of arrays and objects accepted by [`parse`] and [`render`]; a scalar
/// document has depth 0.
pub const DEPTH_MAX: u32 = 128;

/// A topology source format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Format {
    /// JSON (RFC 8259).
    Json,
    /// YAML 1.2, restricted to plain data (see `docs/topology-canonical.md`).
    Yaml,
    /// TOML 1.0 (and the 1.1 additions the `toml` crate accepts).
    Toml,
}

impl Format {
    /// The format's name as people write it in prose: `"JSON"`, `"YAML"`, `"TOML"`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "JSON",
            Format::Yaml => "YAML",
            Format::Toml => "TOML",
        }
    }

    /// The usual file extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Yaml => "yaml",
            Format::Toml => "toml",
        }
    }
}

/// Writes `json`, `yaml` or `toml`.
impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.extension())
    }
}

/// Accepts `json`, `yaml`, `yml` and `toml`, in any letter case.
impl FromStr for Format {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "json" => Ok(Format::Json),
            "yaml" | "yml" => Ok(Format::Yaml),
            "toml" => Ok(Format::Toml),
            _ => Err(Error::UnknownFormat { name: s.to_owned() }),
        }
    }
}

/// Errors from parsing and rendering topology documents.
///
/// Positions are 1-based; columns count Unicode scalar values, not bytes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A format name that is not `json`, `yaml`/`yml` or `toml`.
    #[error("unknown topology format {name:?} (expected json, yaml or toml)")]
    UnknownFormat {
        /// The name given.
        name: String,
    },
    /// The input is larger than [`INPUT_BYTES_MAX`].
    #[error("topology file is {bytes} bytes, more than the limit of {bytes_max}")]
    TooLarge {
        /// The input's size.
        bytes: u64,
        /// The limit.
        bytes_max: u64,
    },
    /// The input is not valid UTF-8.
    #[error(
        "input is not UTF-8: invalid byte at line {line}, column {column} (byte offset {offset})"
    )]
    NotUtf8 {
        /// Line of the first invalid byte.
        line: u32,
        /// Column of the first invalid byte.
        column: u32,
        /// Byte offset of the first invalid byte.
        offset: u64,
    },
    /// The input is not well-formed in its format.
    #[error("{} syntax error: {message} at line {line}, column {column}", format.name())]
    Syntax {
        /// The format being parsed.
        format: Format,
        /// What the parser found wrong.
        message: String,
        /// Line of the error.
        line: u32,
        /// Column of the error.
        column: u32,
    },
    /// The document holds no value (an empty JSON or YAML file).
    #[error("{} document is empty (line {line}, column {column})", format.name())]
    EmptyDocument {
        /// The format being parsed.
        format: Format,
        /// Where the missing value was expected.
        line: u32,
        /// Where the missing value was expected.
        column: u32,
    },
    /// An object defines the same key twice; the position is the second occurrence.
    #[error("duplicate key {key:?} at line {line}, column {column}")]
    DuplicateKey {
        /// The repeated key.
        key: String,
        /// Line of the second occurrence.
        line: u32,
        /// Column of the second occurrence.
        column: u32,
    },
    /// A YAML anchor (`&a`) or alias (`*a`).
    #[error("YAML anchors and aliases are not allowed (line {line}, column {column})")]
    YamlAnchor {
        /// Line of the anchored node or alias.
        line: u32,
        /// Column of the anchored node or alias.
        column: u32,
    },
    /// A YAML tag (`!!str`, `!foo`).
    #[error("YAML tags are not allowed: {tag} (line {line}, column {column})")]
    YamlTag {
        /// The tag as resolved by the parser.
        tag: String,
        /// Line of the tagged node.
        line: u32,
        /// Column of the tagged node.
        column: u32,
    },
    /// A YAML stream with more than one document.
    #[error(
        "YAML input must hold exactly one document; another starts at line {line}, column {column}"
    )]
    YamlMultipleDocuments {
        /// Line where the second document starts.
        line: u32,
        /// Column where the second document starts.
        column: u32,
    },
    /// A YAML mapping key that is not a string: a sequence or mapping, or a null.
    #[error("YAML mapping keys must be strings, found {found} (line {line}, column {column})")]
    YamlKey {
        /// What was found instead.
        found: String,
        /// Line of the key.
        line: u32,
        /// Column of the key.
        column: u32,
    },
    /// NaN, an infinity, or a float literal too large for `f64`.
    #[error(
        "number {text} is not allowed: NaN and infinite values have no canonical form (line {line}, column {column})"
    )]
    NonFinite {
        /// The literal as written.
        text: String,
        /// Line of the literal.
        line: u32,
        /// Column of the literal.
        column: u32,
    },
    /// An integer literal outside `i64::MIN..=u64::MAX` (`i64` for TOML).
    #[error("integer {text} is out of range (line {line}, column {column})")]
    IntegerOutOfRange {
        /// The literal as written.
        text: String,
        /// Line of the literal.
        line: u32,
        /// Column of the literal.
        column: u32,
    },
    /// Arrays and objects nested deeper than [`DEPTH_MAX`] while parsing.
    #[error("nesting deeper than {depth_max} levels at line {line}, column {column}")]
    TooDeep {
        /// The limit.
        depth_max: u32,
        /// Where the limit was crossed.
        line: u32,
        /// Where the limit was crossed.
        column: u32,
    },
    /// A value that the target format of [`render`] cannot express, at a JSON-pointer path.
    #[error("{} cannot express {what} at {}", format.name(), shown_path(path))]
    Unrepresentable {
        /// The target format.
        format: Format,
        /// What cannot be expressed.
        what: String,
        /// JSON pointer of the value (`""` is the whole document).
        path: String,
    },
}

fn shown_path(path: &str) -> &str {
    if path.is_empty() { "/ (the top level)" } else { path }
}

/// Guesses the format of a topology file.
///
/// The extension of `file_name` decides first (`.json`, `.yaml`, `.yml`, `.toml`, any letter
/// case). Otherwise the content is sniffed: JSON if it starts with `{` or `[` (after
/// whitespace) and parses as JSON; else TOML if it parses as TOML (a TOML file may start with a
/// `[table]` header); else JSON if it starts with `{` or `[`, so that the caller sees JSON's
/// error; else YAML if it parses as a YAML mapping or sequence. `None` when nothing fits.
pub fn detect(file_name: Option<&str>, bytes: &[u8]) -> Option<Format> {
    if let Some(name) = file_name {
        let name = name.to_ascii_lowercase();
        if let Some((_, extension)) = name.rsplit_once('.')
            && let Ok(format) = extension.parse::<Format>()
        {
            return Some(format);
        }
    }
    let text = std::str::from_utf8(bytes).ok()?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let json_like = text.trim_start().starts_with(['{', '[']);
    if json_like && json::parse(text).is_ok() {
        return Some(Format::Json);
    }
    if !text.trim().is_empty() && toml::parse(text).is_ok() {
        return Some(Format::Toml);
    }
    if json_like {
        return Some(Format::Json);
    }
    match yaml::parse(text) {
        Ok(Value::Array(_) | Value::Object(_)) => Some(Format::Yaml),
        _ => None,
    }
}

/// Parses a topology file in `format` into a [`Value`].
///
/// A leading UTF-8 byte order mark is ignored.
///
/// # Errors
///
/// [`Error::TooLarge`] and [`Error::NotUtf8`] for unusable input; otherwise the syntax or
/// data-model error of the format (duplicate keys, YAML anchors, aliases, tags and extra
/// documents, non-finite numbers, out-of-range integers, nesting deeper than [`DEPTH_MAX`]),
/// with line and column.
pub fn parse(bytes: &[u8], format: Format) -> Result<Value, Error> {
    let bytes_len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if bytes_len > INPUT_BYTES_MAX {
        return Err(Error::TooLarge { bytes: bytes_len, bytes_max: INPUT_BYTES_MAX });
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(error) => {
            let offset = error.valid_up_to();
            // The prefix up to `valid_up_to` is valid UTF-8 by definition.
            let valid = std::str::from_utf8(&bytes[..offset]).unwrap_or_default();
            let (line, column) = position(valid, offset);
            return Err(Error::NotUtf8 {
                line,
                column,
                offset: u64::try_from(offset).unwrap_or(u64::MAX),
            });
        }
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    match format {
        Format::Json => json::parse(text),
        Format::Yaml => yaml::parse(text),
        Format::Toml => toml::parse(text),
    }
}

/// The canonical bytes of `value`: JSON without whitespace, object keys sorted by UTF-8 bytes,
/// numbers in canonical form and strings minimally escaped.
///
/// Values produced by [`parse`] are at most [`DEPTH_MAX`] deep; the writer recurses once per
/// level, so callers building values by hand should keep to the same bound.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    let mut out = String::new();
    json::write_canonical(value, &mut out);
    out.into_bytes()
}

/// The root CID of the topology object whose canonical bytes are `canonical`, cut with
/// `config`: the same root the store gives those bytes (`mycel add`), computed without storing
/// anything, so a replica handed the bytes can check the root a proposal names.
///
/// # Errors
/// [`crate::ConfigError`] when `config` is not a valid chunker identity (it may come from a
/// peer).
pub fn object_root(
    canonical: &[u8],
    config: &crate::Config,
) -> Result<crate::Cid, crate::ConfigError> {
    use crate::manifest::{Kind, NodeEntry, Root, TreeBuilder};
    config.validate()?;
    let cutter = crate::cdc::Cutter::new(config);
    let mut tree = TreeBuilder::new(config, true);
    let mut at = 0;
    for len in cutter.lengths(canonical) {
        let chunk = &canonical[at..at + len];
        at += len;
        tree.push(NodeEntry::Chunk { len: len as u64, cid: crate::Cid::raw(chunk) });
        // Index nodes are only needed for their CIDs, which the builder already linked.
        tree.take_blocks();
    }
    let (tree_root, len) = tree.finish();
    Ok(Root { kind: Kind::Topology, config: *config, len, tree: tree_root }.encode().cid)
}

/// Writes `value` as an indented, human-friendly file in `format`, ending with a newline.
///
/// The output always parses back (with [`parse`] in the same format) to a value equal to
/// `value`, so it has the same canonical bytes; comments and the original layout are not kept.
///
/// # Errors
///
/// [`Error::Unrepresentable`], naming the JSON-pointer path, when the format cannot express a
/// value: TOML has no null, no integers above `i64::MAX` (except those an `f64` holds exactly,
/// written as floats), and its top level must be a table.
/// Values nested deeper than [`DEPTH_MAX`] are refused in every format (path `""`).
pub fn render(value: &Value, format: Format) -> Result<Vec<u8>, Error> {
    if value.depth() > DEPTH_MAX {
        return Err(Error::Unrepresentable {
            format,
            what: format!("nesting deeper than {DEPTH_MAX} levels"),
            path: String::new(),
        });
    }
    let text = match format {
        Format::Json => json::render(value),
        Format::Yaml => yaml::render(value),
        Format::Toml => toml::render(value)?,
    };
    Ok(text.into_bytes())
}

/// `n` copies of `12345`, comma-separated, on one line (the parsers' linear-time tests).
#[cfg(test)]
pub(crate) fn numbers_line(n: usize) -> String {
    vec!["12345"; n].join(",")
}

/// The 1-based line and column (in Unicode scalar values) of `byte_offset` in `text`.
///
/// Offsets past the end or inside a character are clamped to the previous boundary.
pub(crate) fn position(text: &str, byte_offset: usize) -> (u32, u32) {
    let mut offset = byte_offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (saturate(line), saturate(column))
}

/// Converts a count to `u32`, saturating; positions beyond 4 billion are not meaningful.
pub(crate) fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Appends `key` to a JSON pointer, escaping `~` as `~0` and `/` as `~1` (RFC 6901).
pub(crate) fn pointer_push(path: &str, key: &str) -> String {
    let mut out = String::with_capacity(path.len() + key.len() + 1);
    out.push_str(path);
    out.push('/');
    for c in key.chars() {
        match c {
            '~' => out.push_str("~0"),
            '/' => out.push_str("~1"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use proptest::test_runner::{RngAlgorithm, TestRng, TestRunner};

    use super::*;

    const LAB_JSON: &str = r#"{
  "name": "lab-1",
  "version": 2,
  "nodes": [
    {"id": "r1", "asn": 65001, "mtu": 1500, "loopback": "10.0.0.1/32", "weight": 0.5, "enabled": true},
    {"id": "r2", "asn": 65002, "mtu": 9000, "loopback": "10.0.0.2/32", "weight": 1.25, "enabled": false}
  ],
  "links": [
    {"a": "r1", "b": "r2", "bandwidth": 1000, "latency_ms": 1.5, "tags": ["core", "10G"]}
  ],
  "meta": {"owner": "netops", "notes": "caf\u00e9 \"lab\"\n"}
}
"#;

    const LAB_YAML: &str = r#"# The same lab, in YAML, keys reordered and numbers spelled differently.
version: 2.0
name: lab-1
meta:
  notes: "café \"lab\"\n"
  owner: netops   # the team that owns it
nodes:
  - id: r1
    enabled: true
    weight: 0.5
    asn: 65001
    loopback: 10.0.0.1/32
    mtu: 1.5e3
  - {id: r2, asn: 0xFDEA, mtu: 9000, loopback: "10.0.0.2/32", weight: 125e-2, enabled: false}
links:
  - a: r1
    b: r2
    bandwidth: 1e3
    latency_ms: 1.50
    tags: [core, 10G]
"#;

    const LAB_TOML: &str = r#"# The same lab, in TOML.
name = "lab-1"
version = 2

[meta]
owner = "netops"
notes = "café \"lab\"\n"

[[nodes]]
id = "r1"
asn = 65_001
mtu = 1500.0
loopback = "10.0.0.1/32"
weight = 5e-1
enabled = true

[[nodes]]
id = "r2"
asn = 0xFDEA
mtu = 9e3
loopback = "10.0.0.2/32"
weight = 1.25
enabled = false

[[links]]
a = "r1"
b = "r2"
bandwidth = 1000
latency_ms = 1.5
tags = ["core", "10G"]
"#;

    const LAB_CANONICAL: &str = concat!(
        r#"{"links":[{"a":"r1","b":"r2","bandwidth":1000,"latency_ms":1.5,"tags":["core","10G"]}],"#,
        r#""meta":{"notes":"café \"lab\"\n","owner":"netops"},"name":"lab-1","#,
        r#""nodes":[{"asn":65001,"enabled":true,"id":"r1","loopback":"10.0.0.1/32","mtu":1500,"weight":0.5},"#,
        r#"{"asn":65002,"enabled":false,"id":"r2","loopback":"10.0.0.2/32","mtu":9000,"weight":1.25}],"#,
        r#""version":2}"#
    );

    fn canonical(text: &str, format: Format) -> Result<String, Error> {
        let value = parse(text.as_bytes(), format)?;
        Ok(String::from_utf8_lossy(&canonical_json(&value)).into_owned())
    }

    /// A deterministic proptest runner, so failures reproduce without a persistence file.
    fn runner(cases: u32) -> TestRunner {
        let config =
            ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() };
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &[0x5e; 32]))
    }

    #[test]
    fn lab_topology_is_identical_in_all_formats() {
        // The lab written as JSON, as YAML and as TOML has one canonical byte string.
        assert_eq!(canonical(LAB_JSON, Format::Json).as_deref(), Ok(LAB_CANONICAL));
        assert_eq!(canonical(LAB_YAML, Format::Yaml).as_deref(), Ok(LAB_CANONICAL));
        assert_eq!(canonical(LAB_TOML, Format::Toml).as_deref(), Ok(LAB_CANONICAL));
    }

    #[test]
    fn golden_canonical_bytes() {
        // Pins key order (UTF-8 bytes), number forms and escaping of a small document.
        let source = r#" { "é": 1, "z": "\u0001\t/\u00ff", "a": [0.1, -0.0, 1E3, 1e21, 123456789012345678901234567890.0, -1.5e-7],
            "Z": null, "t": [true, false, {}, []] } "#;
        let expected = r#"{"Z":null,"a":[0.1,0,1000,1e21,1.2345678901234568e29,-1.5e-7],"t":[true,false,{},[]],"z":"\u0001\t/ÿ","é":1}"#;
        assert_eq!(canonical(source, Format::Json).as_deref(), Ok(expected));
    }

    #[test]
    fn duplicate_keys_are_rejected_in_every_format() {
        // The second occurrence of a key is reported with its line and column.
        let json = "{\n  \"name\": \"x\",\n  \"mtu\": 1,\n  \"mtu\": 2\n}";
        let error = parse(json.as_bytes(), Format::Json).err();
        assert_eq!(
            error.as_ref().map(ToString::to_string).as_deref(),
            Some(r#"duplicate key "mtu" at line 4, column 3"#)
        );
        let yaml = "a: 1\nb:\n  mtu: 1\n  mtu: 2\n";
        let dup = |line, column| Err(Error::DuplicateKey { key: "mtu".to_owned(), line, column });
        assert_eq!(parse(yaml.as_bytes(), Format::Yaml), dup(4, 3));
        let yaml_flow = "b: {mtu: 1, \"mtu\": 2}\n";
        assert_eq!(parse(yaml_flow.as_bytes(), Format::Yaml), dup(1, 13));
        let toml = "[n]\nmtu = 1\n mtu = 2\n";
        assert_eq!(parse(toml.as_bytes(), Format::Toml), dup(3, 2));
        let toml_table = "[n]\nmtu = 1\n[n]\n";
        assert!(matches!(
            parse(toml_table.as_bytes(), Format::Toml),
            Err(Error::DuplicateKey { line: 3, .. })
        ));
    }

    #[test]
    fn yaml_anchors_aliases_tags_and_documents_are_rejected() {
        // Only plain data is accepted: each YAML feature beyond it is an error with a position.
        let yaml = |text: &str| parse(text.as_bytes(), Format::Yaml);
        assert_eq!(yaml("a: 1\nb: &x 2\n"), Err(Error::YamlAnchor { line: 2, column: 7 }));
        assert_eq!(yaml("a: &x [1]\nb: *x\n"), Err(Error::YamlAnchor { line: 1, column: 7 }));
        assert!(matches!(yaml("a: 1\nb: *x\n"), Err(Error::Syntax { line: 2, .. })));
        assert_eq!(
            yaml("a: !!str 1\n"),
            Err(Error::YamlTag { tag: "tag:yaml.org,2002:str".to_owned(), line: 1, column: 10 })
        );
        assert!(matches!(yaml("a: !foo\n  b: 1\n"), Err(Error::YamlTag { .. })));
        assert_eq!(
            yaml("a: 1\n---\nb: 2\n"),
            Err(Error::YamlMultipleDocuments { line: 2, column: 1 })
        );
        assert_eq!(
            yaml("--- 1\n...\n--- 2\n"),
            Err(Error::YamlMultipleDocuments { line: 3, column: 1 })
        );
        for empty in ["", "# nothing\n", "---\n", "--- # still nothing\n...\n"] {
            assert!(matches!(yaml(empty), Err(Error::EmptyDocument { .. })), "{empty:?}");
        }
        // A document that is explicitly null is not empty.
        assert_eq!(yaml("~\n"), Ok(Value::Null));
        assert_eq!(yaml("---\n\"\"\n"), Ok(Value::from("")));
    }

    #[test]
    fn syntax_errors_carry_positions() {
        // Each format's syntax error names the line (and column) where parsing stopped.
        let json = parse(b"{\n  \"a\": [1, 2,]\n}", Format::Json);
        assert!(
            matches!(json, Err(Error::Syntax { format: Format::Json, line: 2, column: 14, .. })),
            "{json:?}"
        );
        let yaml = parse(b"a: [1, 2\nb: 3\n", Format::Yaml);
        assert!(
            matches!(yaml, Err(Error::Syntax { format: Format::Yaml, line: 2, .. })),
            "{yaml:?}"
        );
        let toml = parse(b"a = 1\nb = \n", Format::Toml);
        assert!(
            matches!(toml, Err(Error::Syntax { format: Format::Toml, line: 2, .. })),
            "{toml:?}"
        );
        assert!(matches!(parse(b"  ", Format::Json), Err(Error::EmptyDocument { .. })));
    }

    #[test]
    fn non_finite_numbers_are_rejected() {
        // NaN and infinities, spelled or overflowing, have no canonical form.
        for (text, format) in [
            ("a: .nan", Format::Yaml),
            ("a: -.inf", Format::Yaml),
            ("a: 1e400", Format::Yaml),
            ("a = nan", Format::Toml),
            ("a = -inf", Format::Toml),
            ("a = 1e400", Format::Toml),
            ("[1e400]", Format::Json),
        ] {
            let result = parse(text.as_bytes(), format);
            assert!(matches!(result, Err(Error::NonFinite { line: 1, .. })), "{text}: {result:?}");
        }
    }

    #[test]
    fn huge_integers_are_rejected_not_rounded() {
        // Integer literals beyond u64/i64 are errors; the same magnitude as a float is data.
        for (text, format) in [
            ("[18446744073709551616]", Format::Json),
            ("[-9223372036854775809]", Format::Json),
            ("a: 18446744073709551616", Format::Yaml),
            ("a: 0x10000000000000000", Format::Yaml),
            ("a = 9223372036854775808", Format::Toml),
        ] {
            let result = parse(text.as_bytes(), format);
            assert!(
                matches!(result, Err(Error::IntegerOutOfRange { line: 1, .. })),
                "{text}: {result:?}"
            );
        }
        assert_eq!(
            canonical("[18446744073709551615, 18446744073709551616.0]", Format::Json).as_deref(),
            Ok("[18446744073709551615,1.8446744073709552e19]")
        );
    }

    #[test]
    fn deep_nesting_is_rejected_without_overflow() {
        // DEPTH_MAX levels parse; one more, or a hostile million, is an error, not a crash.
        let depth = usize::try_from(DEPTH_MAX).unwrap_or(128);
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        for format in [Format::Json, Format::Yaml] {
            assert!(parse(nested(depth).as_bytes(), format).is_ok(), "{format}");
            let result = parse(nested(depth + 1).as_bytes(), format);
            assert!(matches!(result, Err(Error::TooDeep { line: 1, .. })), "{format}: {result:?}");
            assert!(parse("[".repeat(1_000_000).as_bytes(), format).is_err(), "{format}");
        }
        let block: String = (0..200).map(|i| format!("{}- \n", "  ".repeat(i))).collect();
        assert!(matches!(parse(block.as_bytes(), Format::Yaml), Err(Error::TooDeep { .. })));
        let toml = format!("a = {}", "[".repeat(1_000_000));
        assert!(parse(toml.as_bytes(), Format::Toml).is_err());
        let toml = format!("a = {}", "{b = ".repeat(100_000));
        assert!(parse(toml.as_bytes(), Format::Toml).is_err());
    }

    #[test]
    fn non_utf8_is_rejected() {
        // Invalid UTF-8 is reported with the position of the first bad byte, in every format.
        for format in [Format::Json, Format::Yaml, Format::Toml] {
            assert_eq!(
                parse(b"{\"a\":\n \"\xff\"}", format),
                Err(Error::NotUtf8 { line: 2, column: 3, offset: 8 })
            );
        }
        // A byte order mark is not part of the document.
        assert_eq!(parse(b"\xef\xbb\xbf[1]", Format::Json), parse(b"[1]", Format::Json));
    }

    #[test]
    fn format_names_and_detection() {
        // Formats parse from and print as their names; detection prefers the extension.
        assert_eq!("YML".parse::<Format>(), Ok(Format::Yaml));
        assert_eq!(Format::Toml.to_string(), "toml");
        assert!(matches!("xml".parse::<Format>(), Err(Error::UnknownFormat { .. })));
        assert_eq!(detect(Some("lab/topo.Yml"), b"{}"), Some(Format::Yaml));
        assert_eq!(detect(Some("topo.json"), b""), Some(Format::Json));
        assert_eq!(detect(None, LAB_JSON.as_bytes()), Some(Format::Json));
        assert_eq!(detect(Some("topology"), LAB_YAML.as_bytes()), Some(Format::Yaml));
        assert_eq!(detect(None, LAB_TOML.as_bytes()), Some(Format::Toml));
        assert_eq!(detect(None, b"[nodes]\nid = 1\n"), Some(Format::Toml));
        assert_eq!(detect(None, b"{\"a\": }"), Some(Format::Json));
        assert_eq!(detect(None, b"just words"), None);
        assert_eq!(detect(None, b"\xff"), None);
    }

    #[test]
    fn render_toml_names_unrepresentable_paths() {
        // TOML output refuses null, integers above i64::MAX and non-table documents, by path.
        let value = parse(br#"{"nodes": [{"asn": 1}, {"asn": 2}, {"asn": null}], "a/b": {"c": 18446744073709551615}}"#, Format::Json);
        let value = value.unwrap_or(Value::Null);
        let error = render(&value, Format::Toml).err().map(|e| e.to_string());
        assert_eq!(
            error.as_deref(),
            Some("TOML cannot express integer 18446744073709551615 (above i64::MAX) at /a~1b/c")
        );
        let mut nodes_only = value.clone();
        if let Value::Object(map) = &mut nodes_only {
            map.remove("a/b");
        }
        let error = render(&nodes_only, Format::Toml).err().map(|e| e.to_string());
        assert_eq!(error.as_deref(), Some("TOML cannot express null at /nodes/2/asn"));
        assert!(matches!(
            render(&Value::Array(Vec::new()), Format::Toml),
            Err(Error::Unrepresentable { format: Format::Toml, path, .. }) if path.is_empty()
        ));
    }

    #[test]
    fn rendered_lab_is_readable_and_round_trips() {
        // The lab renders in each format to text that parses back to the same value.
        let value = parse(LAB_JSON.as_bytes(), Format::Json).unwrap_or(Value::Null);
        for format in [Format::Json, Format::Yaml, Format::Toml] {
            let bytes = render(&value, format).unwrap_or_default();
            assert_eq!(
                parse(&bytes, format).as_ref(),
                Ok(&value),
                "{format}:\n{}",
                String::from_utf8_lossy(&bytes)
            );
        }
        let yaml =
            String::from_utf8(render(&value, Format::Yaml).unwrap_or_default()).unwrap_or_default();
        assert!(yaml.contains("nodes:\n  - asn: 65001\n    enabled: true\n"), "{yaml}");
        assert!(yaml.contains("    tags:\n      - core\n      - \"10G\"\n"), "{yaml}");
    }

    fn key_strategy() -> impl Strategy<Value = String> {
        prop_oneof![any::<String>(), "[a-z0-9_./~ -]{0,8}", Just(String::new())]
    }

    fn string_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[a-zA-Z0-9_./:#&*!|>'\"{}\\[\\], ~-]{0,12}",
            prop::sample::select(vec![
                "true", "No", "null", "~", "1", "0x1F", "1e3", ".inf", "- a", "", " x ", "a\nb"
            ])
            .prop_map(str::to_owned),
        ]
    }

    fn number_strategy(toml_safe: bool) -> BoxedStrategy<Number> {
        let float = any::<f64>().prop_filter_map("finite", Number::from_f64);
        let int = any::<i64>().prop_map(Number::from);
        if toml_safe {
            prop_oneof![int, float].boxed()
        } else {
            prop_oneof![int, float, any::<u64>().prop_map(Number::from)].boxed()
        }
    }

    /// Arbitrary values; `toml_safe` leaves out null and the `u64` integers generated directly
    /// (floats may still give integers above `i64::MAX` that TOML writes as exact floats).
    fn value_strategy(toml_safe: bool) -> impl Strategy<Value = Value> {
        let scalar = prop_oneof![
            any::<bool>().prop_map(Value::Bool),
            number_strategy(toml_safe).prop_map(Value::Number),
            string_strategy().prop_map(Value::String),
        ];
        let leaf =
            if toml_safe { scalar.boxed() } else { prop_oneof![Just(Value::Null), scalar].boxed() };
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(key_strategy(), inner, 0..6).prop_map(Value::Object),
            ]
        })
    }

    /// The value at a JSON pointer.
    fn at<'a>(value: &'a Value, pointer: &str) -> Option<&'a Value> {
        let mut current = value;
        for token in pointer.split('/').skip(1) {
            let token = token.replace("~1", "/").replace("~0", "~");
            current = match current {
                Value::Array(items) => items.get(token.parse::<usize>().ok()?)?,
                Value::Object(map) => map.get(&token)?,
                _ => return None,
            };
        }
        Some(current)
    }

    #[test]
    fn render_parse_round_trip_json_yaml() {
        // Property: any value renders as JSON and YAML text that parses back equal.
        let result = runner(512).run(&value_strategy(false), |value| {
            for format in [Format::Json, Format::Yaml] {
                let bytes =
                    render(&value, format).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let back = parse(&bytes, format);
                prop_assert_eq!(
                    back.as_ref(),
                    Ok(&value),
                    "{}:\n{}",
                    format,
                    String::from_utf8_lossy(&bytes)
                );
            }
            Ok(())
        });
        assert_eq!(result.map_err(|e| e.to_string()), Ok(()));
    }

    #[test]
    fn render_parse_round_trip_toml() {
        // Property: any table without null or u64-only integers round-trips through TOML.
        let strategy = prop::collection::btree_map(key_strategy(), value_strategy(true), 0..6)
            .prop_map(Value::Object);
        let result = runner(512).run(&strategy, |value| {
            let bytes =
                render(&value, Format::Toml).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let back = parse(&bytes, Format::Toml);
            prop_assert_eq!(back.as_ref(), Ok(&value), "\n{}", String::from_utf8_lossy(&bytes));
            Ok(())
        });
        assert_eq!(result.map_err(|e| e.to_string()), Ok(()));
    }

    #[test]
    fn render_toml_errors_point_at_the_culprit() {
        // Property: when TOML rendering fails, its path leads to a null, a too-large integer
        // or a non-table top level; when it succeeds, the output round-trips.
        let result = runner(512).run(&value_strategy(false), |value| {
            match render(&value, Format::Toml) {
                Ok(bytes) => prop_assert_eq!(parse(&bytes, Format::Toml), Ok(value.clone())),
                Err(Error::Unrepresentable { format: Format::Toml, path, .. }) => {
                    let culprit = at(&value, &path);
                    let fits = match culprit {
                        Some(top) if path.is_empty() => !matches!(top, Value::Object(_)),
                        Some(Value::Null) => true,
                        Some(Value::Number(n)) => n.as_u64().is_some_and(|v| v > i64::MAX as u64),
                        _ => false,
                    };
                    prop_assert!(fits, "path {:?} of {:?}", path, value);
                }
                Err(other) => prop_assert!(false, "unexpected error {}", other),
            }
            Ok(())
        });
        assert_eq!(result.map_err(|e| e.to_string()), Ok(()));
    }

    #[test]
    fn canonical_json_is_a_fixed_point() {
        // Property: canonical bytes parse back to the same value and re-canonicalise unchanged.
        let result = runner(512).run(&value_strategy(false), |value| {
            let bytes = canonical_json(&value);
            let back = parse(&bytes, Format::Json);
            prop_assert_eq!(back.as_ref(), Ok(&value));
            prop_assert_eq!(back.map(|v| canonical_json(&v)), Ok(bytes));
            Ok(())
        });
        assert_eq!(result.map_err(|e| e.to_string()), Ok(()));
    }

    #[test]
    fn arbitrary_input_never_panics() {
        // Property: random bytes and syntax-heavy text give a value or an error in every format.
        let noise = prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            "[\\[\\]{}:,\"'&*!#|>?%@`~=. \\n\\t\\\\a-z0-9-]{0,128}".prop_map(String::into_bytes),
        ];
        let result = runner(2048).run(&noise, |bytes| {
            for format in [Format::Json, Format::Yaml, Format::Toml] {
                let _ = parse(&bytes, format);
            }
            let _ = detect(None, &bytes);
            Ok(())
        });
        assert_eq!(result.map_err(|e| e.to_string()), Ok(()));
    }

    #[test]
    fn object_keys_sort_by_utf8_bytes() {
        // Keys order by UTF-8 bytes: uppercase before lowercase, ASCII before non-ASCII.
        let mut map = BTreeMap::new();
        for key in ["é", "b", "B", "a", "\u{10000}", "\u{ffff}"] {
            map.insert(key.to_owned(), Value::Null);
        }
        let bytes = canonical_json(&Value::Object(map));
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            "{\"B\":null,\"a\":null,\"b\":null,\"é\":null,\"\u{ffff}\":null,\"\u{10000}\":null}"
        );
    }

    #[test]
    fn object_root_matches_a_tree_built_by_hand() {
        // The root of small canonical bytes is a topology root over the one raw chunk; larger
        // bytes cut with a small identity give a different, index-node tree, equal to one
        // built entry by entry; an invalid identity is an error rather than a panic.
        use crate::cdc::Cutter;
        use crate::manifest::{Kind, NodeEntry, Root, TreeBuilder};
        use crate::{Cid, Config};
        let config = Config::default();
        let small = b"{\"a\":1}";
        let expected =
            Root { kind: Kind::Topology, config, len: 7, tree: Some(Cid::raw(small)) }.encode().cid;
        assert_eq!(object_root(small, &config).unwrap(), expected);
        let tiny = Config {
            chunk_bytes_min: 256,
            chunk_bytes_avg: 1024,
            chunk_bytes_max: 4096,
            fanout_bits: 1,
            ..Config::default()
        };
        let big: Vec<u8> =
            (0..200_000u32).flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()).collect();
        let mut tree = TreeBuilder::new(&tiny, true);
        let mut at = 0;
        for len in Cutter::new(&tiny).lengths(&big) {
            tree.push(NodeEntry::Chunk { len: len as u64, cid: Cid::raw(&big[at..at + len]) });
            at += len;
        }
        let (t, len) = tree.finish();
        assert!(t.is_some_and(|c| c.codec() == crate::Codec::DagCbor), "an index node");
        let by_hand = Root { kind: Kind::Topology, config: tiny, len, tree: t }.encode().cid;
        assert_eq!(object_root(&big, &tiny).unwrap(), by_hand);
        assert_ne!(object_root(&big, &config).unwrap(), by_hand, "the identity matters");
        let bad = Config { fanout_bits: 0, ..Config::default() };
        assert!(object_root(small, &bad).is_err());
    }
}
