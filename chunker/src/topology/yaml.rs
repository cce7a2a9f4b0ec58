//! YAML for topologies: a plain-data subset of YAML 1.2, parsed from `yaml-rust2` events, and
//! a block-style writer.
//!
//! The event parser is used instead of `yaml-rust2`'s loader because the loader silently
//! expands aliases, applies tags and keeps the last of two duplicate keys; events expose all of
//! those, with positions, so each can be refused. The value is built with an explicit stack
//! (bounded by [`DEPTH_MAX`]), so hostile nesting cannot overflow the call stack. Plain scalars
//! resolve by the YAML 1.2 core schema. Pure functions over strings.

use std::collections::BTreeMap;

use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::json::{number_from_text, write_string};
use super::{DEPTH_MAX, Error, Format, Number, Value, saturate};

/// The 1-based line and column of a `yaml-rust2` marker (whose column is 0-based).
fn position(mark: Marker) -> (u32, u32) {
    (saturate(mark.line()), saturate(mark.col()).saturating_add(1))
}

fn tag_text(tag: &Tag) -> String {
    format!("{}{}", tag.handle, tag.suffix)
}

/// A container under construction.
enum Frame {
    Sequence(Vec<Value>),
    /// A mapping, and the key whose value is being parsed (`None` when a key comes next).
    Mapping(BTreeMap<String, Value>, Option<String>),
}

/// Parses a YAML stream that must hold exactly one document.
pub(crate) fn parse(text: &str) -> Result<Value, Error> {
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<Value> = None;
    let mut documents = 0u32;
    loop {
        let (event, mark) = parser.next_token().map_err(|error| {
            let (line, column) = position(*error.marker());
            Error::Syntax { format: Format::Yaml, message: error.info().to_owned(), line, column }
        })?;
        let (line, column) = position(mark);
        match event {
            Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
            Event::StreamEnd => break,
            Event::DocumentStart => {
                documents += 1;
                if documents > 1 {
                    return Err(Error::YamlMultipleDocuments { line, column });
                }
            }
            Event::Alias(_) => return Err(Error::YamlAnchor { line, column }),
            Event::Scalar(text, style, anchor, tag) => {
                check_node(anchor, tag.as_ref(), line, column)?;
                if let Some(Frame::Mapping(map, key @ None)) = stack.last_mut() {
                    let new_key = scalar_key(text, style, line, column)?;
                    if map.contains_key(&new_key) {
                        return Err(Error::DuplicateKey { key: new_key, line, column });
                    }
                    *key = Some(new_key);
                    continue;
                }
                if stack.is_empty() && style == TScalarStyle::Plain && text.is_empty() {
                    return Err(Error::EmptyDocument { format: Format::Yaml, line, column });
                }
                let value = if style == TScalarStyle::Plain {
                    resolve_plain(&text, line, column)?
                } else {
                    Value::String(text)
                };
                complete(&mut stack, &mut root, value, line, column)?;
            }
            Event::SequenceStart(anchor, ref tag) | Event::MappingStart(anchor, ref tag) => {
                check_node(anchor, tag.as_ref(), line, column)?;
                let is_sequence = matches!(event, Event::SequenceStart(..));
                if let Some(Frame::Mapping(_, None)) = stack.last() {
                    let found = if is_sequence { "a sequence" } else { "a mapping" };
                    return Err(Error::YamlKey { found: found.to_owned(), line, column });
                }
                if saturate(stack.len()) >= DEPTH_MAX {
                    return Err(Error::TooDeep { depth_max: DEPTH_MAX, line, column });
                }
                stack.push(if is_sequence {
                    Frame::Sequence(Vec::new())
                } else {
                    Frame::Mapping(BTreeMap::new(), None)
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let value = match stack.pop() {
                    Some(Frame::Sequence(items)) => Value::Array(items),
                    Some(Frame::Mapping(map, None)) => Value::Object(map),
                    // The parser pairs starts and ends and gives every key a value; report
                    // rather than panic should it ever not.
                    _ => return Err(unbalanced(line, column)),
                };
                complete(&mut stack, &mut root, value, line, column)?;
            }
        }
    }
    match root {
        Some(value) if stack.is_empty() => Ok(value),
        Some(_) => Err(unbalanced(saturate(text.lines().count()), 1)),
        None => {
            let (line, column) = super::position(text, text.len());
            Err(Error::EmptyDocument { format: Format::Yaml, line, column })
        }
    }
}

fn unbalanced(line: u32, column: u32) -> Error {
    Error::Syntax {
        format: Format::Yaml,
        message: "unbalanced collection events".to_owned(),
        line,
        column,
    }
}

fn check_node(anchor: usize, tag: Option<&Tag>, line: u32, column: u32) -> Result<(), Error> {
    if anchor != 0 {
        return Err(Error::YamlAnchor { line, column });
    }
    if let Some(tag) = tag {
        return Err(Error::YamlTag { tag: tag_text(tag), line, column });
    }
    Ok(())
}

/// Attaches a finished value to its parent, or makes it the document.
fn complete(
    stack: &mut [Frame],
    root: &mut Option<Value>,
    value: Value,
    line: u32,
    column: u32,
) -> Result<(), Error> {
    match stack.last_mut() {
        None if root.is_none() => *root = Some(value),
        None => return Err(unbalanced(line, column)),
        Some(Frame::Sequence(items)) => items.push(value),
        Some(Frame::Mapping(map, key)) => match key.take() {
            Some(key) => {
                map.insert(key, value);
            }
            None => return Err(unbalanced(line, column)),
        },
    }
    Ok(())
}

/// A mapping key: quoted keys are their text; plain keys are their text too (so `1` and `true`
/// are the strings "1" and "true"), except that a key resolving to null is refused.
fn scalar_key(text: String, style: TScalarStyle, line: u32, column: u32) -> Result<String, Error> {
    if style == TScalarStyle::Plain && is_null(&text) {
        let found =
            if text.is_empty() { "an empty key".to_owned() } else { format!("null ({text})") };
        return Err(Error::YamlKey { found, line, column });
    }
    Ok(text)
}

fn is_null(text: &str) -> bool {
    matches!(text, "" | "~" | "null" | "Null" | "NULL")
}

/// Resolves a plain scalar by the YAML 1.2 core schema.
pub(crate) fn resolve_plain(text: &str, line: u32, column: u32) -> Result<Value, Error> {
    if is_null(text) {
        return Ok(Value::Null);
    }
    match text {
        "true" | "True" | "TRUE" => return Ok(Value::Bool(true)),
        "false" | "False" | "FALSE" => return Ok(Value::Bool(false)),
        _ => {}
    }
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    let non_finite =
        matches!(unsigned, ".inf" | ".Inf" | ".INF") || matches!(text, ".nan" | ".NaN" | ".NAN");
    if non_finite {
        return Err(Error::NonFinite { text: text.to_owned(), line, column });
    }
    let out_of_range = || Error::IntegerOutOfRange { text: text.to_owned(), line, column };
    for (prefix, radix) in [("0x", 16), ("0o", 8)] {
        if let Some(digits) = text.strip_prefix(prefix)
            && !digits.is_empty()
            && digits.chars().all(|c| c.is_digit(radix))
        {
            return Number::parse_integer(digits, radix)
                .map(Value::Number)
                .ok_or_else(out_of_range);
        }
    }
    if !unsigned.is_empty() && unsigned.bytes().all(|b| b.is_ascii_digit()) {
        return Number::parse_integer(text, 10).map(Value::Number).ok_or_else(out_of_range);
    }
    if let Some(normalised) = core_float(text) {
        return number_from_text(Format::Yaml, &normalised, false, line, column).map(Value::Number);
    }
    Ok(Value::String(text.to_owned()))
}

/// Matches the core schema float pattern
/// `[-+]? ( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?` and returns the literal
/// rewritten in a form Rust's `f64` parser accepts (`1.` and `.5` become `1.0` and `0.5`).
fn core_float(text: &str) -> Option<String> {
    let (sign, rest) = match text.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", text.strip_prefix('+').unwrap_or(text)),
    };
    let (mantissa, exponent) = match rest.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (rest, None),
    };
    let (int_part, frac_part) = match mantissa.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (mantissa, None),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int_part) || !frac_part.is_none_or(all_digits) {
        return None;
    }
    let frac = frac_part.unwrap_or("");
    if int_part.is_empty() && frac.is_empty() {
        return None;
    }
    let mut out = format!(
        "{sign}{}.{}",
        if int_part.is_empty() { "0" } else { int_part },
        if frac.is_empty() { "0" } else { frac }
    );
    if let Some(exponent) = exponent {
        let digits = exponent.strip_prefix(['-', '+']).unwrap_or(exponent);
        if digits.is_empty() || !all_digits(digits) {
            return None;
        }
        out.push('e');
        out.push_str(exponent);
    }
    Some(out)
}

/// Block-style YAML: two-space indentation, strings plain where that is unambiguous and
/// double-quoted otherwise, empty containers as `[]` and `{}`.
pub(crate) fn render(value: &Value) -> String {
    let mut out = String::new();
    if is_block(value) {
        write_block(value, 0, &mut out);
    } else {
        write_scalar(value, &mut out);
        out.push('\n');
    }
    out
}

fn is_block(value: &Value) -> bool {
    match value {
        Value::Array(items) => !items.is_empty(),
        Value::Object(map) => !map.is_empty(),
        _ => false,
    }
}

/// Writes a non-empty container as lines that each start with `indent` spaces.
fn write_block(value: &Value, indent: usize, out: &mut String) {
    match value {
        Value::Object(map) => {
            for (key, item) in map {
                push_spaces(indent, out);
                write_str(key, out);
                out.push(':');
                if is_block(item) {
                    out.push('\n');
                    write_block(item, indent + 2, out);
                } else {
                    out.push(' ');
                    write_scalar(item, out);
                    out.push('\n');
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                push_spaces(indent, out);
                out.push_str("- ");
                if is_block(item) {
                    // Write the child block one level deeper and put its first line right after
                    // the dash ("- a: 1" / "- - x"), which is where that indentation already is.
                    let mut child = String::new();
                    write_block(item, indent + 2, &mut child);
                    out.push_str(&child[indent + 2..]);
                } else {
                    write_scalar(item, out);
                    out.push('\n');
                }
            }
        }
        scalar => {
            push_spaces(indent, out);
            write_scalar(scalar, out);
            out.push('\n');
        }
    }
}

fn push_spaces(n: usize, out: &mut String) {
    out.extend(std::iter::repeat_n(' ', n));
}

fn write_scalar(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => n.write_canonical(out),
        Value::String(s) => write_str(s, out),
        Value::Array(_) => out.push_str("[]"),
        Value::Object(_) => out.push_str("{}"),
    }
}

/// Whether `s` can be written as a plain scalar that every YAML reader takes as this string:
/// identifier-like text that the core schema, and YAML 1.1 readers, do not resolve to anything
/// else.
fn is_plain_safe(s: &str) -> bool {
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    if !(first.is_ascii_alphabetic() || first == '_') {
        return false;
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')) {
        return false;
    }
    let yaml_1_1_word = matches!(
        s.to_ascii_lowercase().as_str(),
        "y" | "n" | "yes" | "no" | "on" | "off" | "true" | "false" | "null"
    );
    !yaml_1_1_word && matches!(resolve_plain(s, 1, 1), Ok(Value::String(_)))
}

/// Writes a string plain if that is safe, else double-quoted with escapes for everything YAML
/// does not allow raw or that some reader could fold (line separators, BOM).
fn write_str(s: &str, out: &mut String) {
    if is_plain_safe(s) {
        out.push_str(s);
        return;
    }
    let mut json = String::new();
    write_string(s, &mut json);
    for c in json.chars() {
        match c {
            '\u{7f}'..='\u{9f}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{feff}'
            | '\u{fffe}'
            | '\u{ffff}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(n: i64) -> Value {
        Value::Number(Number::from(n))
    }

    #[test]
    fn core_schema_resolution() {
        // Plain scalars resolve by the YAML 1.2 core schema; anything else stays a string.
        let cases = [
            ("~", Value::Null),
            ("Null", Value::Null),
            ("TRUE", Value::Bool(true)),
            ("False", Value::Bool(false)),
            ("yes", Value::from("yes")),
            ("0x1F", num(31)),
            ("0o17", num(15)),
            ("+12", num(12)),
            ("-0", num(0)),
            ("007", num(7)),
            ("1e3", num(1000)),
            ("1.", num(1)),
            ("-.5", Value::Number(Number::from_f64(-0.5).unwrap_or(Number::from(0i64)))),
            ("10.0.0.1/24", Value::from("10.0.0.1/24")),
            ("0x", Value::from("0x")),
            ("1_000", Value::from("1_000")),
            ("e5", Value::from("e5")),
        ];
        for (text, expected) in cases {
            assert_eq!(resolve_plain(text, 1, 1), Ok(expected), "{text}");
        }
        for text in [".inf", "-.Inf", ".NaN"] {
            assert!(matches!(resolve_plain(text, 1, 1), Err(Error::NonFinite { .. })), "{text}");
        }
        assert!(matches!(
            resolve_plain("0x10000000000000000", 1, 1),
            Err(Error::IntegerOutOfRange { .. })
        ));
    }

    #[test]
    fn plain_output_only_when_unambiguous() {
        // Strings that could read as another type or another string are quoted.
        for s in ["eth0", "core-1", "lab/r1", "_x"] {
            assert!(is_plain_safe(s), "{s}");
        }
        for s in ["", "1", "true", "No", "null", "1e3", ".inf", "a b", "a:b", "-x", "é"] {
            assert!(!is_plain_safe(s), "{s}");
        }
    }

    #[test]
    fn keys_are_never_resolved() {
        // Plain keys keep their text; null keys and collection keys are refused.
        let value = parse("1: a\ntrue: b\n1.0: c\n").ok();
        let keys: Vec<String> = match value {
            Some(Value::Object(map)) => map.into_keys().collect(),
            _ => Vec::new(),
        };
        assert_eq!(keys, ["1", "1.0", "true"]);
        assert!(matches!(parse("~: a\n"), Err(Error::YamlKey { .. })));
        assert!(matches!(parse("? [a]\n: b\n"), Err(Error::YamlKey { line: 1, column: 3, .. })));
    }
}
