//! JSON for topologies: a strict RFC 8259 parser, the canonical writer and the pretty writer.
//!
//! The parser is written here rather than taken from `serde_json` because the data model needs
//! what `serde_json` hides: the position of a duplicate key, and whether a number was written as
//! an integer (an out-of-range integer must be refused, not rounded to a float). It recurses once
//! per nesting level and stops at [`DEPTH_MAX`]. Pure functions over strings.

use std::collections::BTreeMap;

use super::{DEPTH_MAX, Error, Format, Number, Value, position};

/// Parses a whole JSON document.
pub(crate) fn parse(text: &str) -> Result<Value, Error> {
    let mut parser = Parser { text, bytes: text.as_bytes(), pos: 0 };
    parser.skip_whitespace();
    if parser.pos == parser.bytes.len() {
        let (line, column) = position(text, parser.pos);
        return Err(Error::EmptyDocument { format: Format::Json, line, column });
    }
    let value = parser.value(0)?;
    parser.skip_whitespace();
    if parser.pos != parser.bytes.len() {
        return Err(parser.syntax("unexpected characters after the document", parser.pos));
    }
    Ok(value)
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn syntax(&self, message: &str, at: usize) -> Error {
        let (line, column) = position(self.text, at);
        Error::Syntax { format: Format::Json, message: message.to_owned(), line, column }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn expect_literal(&mut self, literal: &str, value: Value) -> Result<Value, Error> {
        if self.bytes[self.pos..].starts_with(literal.as_bytes()) {
            self.pos += literal.len();
            Ok(value)
        } else {
            Err(self.syntax("expected a value", self.pos))
        }
    }

    /// Parses one value starting at `self.pos`; `depth` counts the enclosing containers.
    fn value(&mut self, depth: u32) -> Result<Value, Error> {
        match self.peek() {
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => self.string().map(Value::String),
            Some(b't') => self.expect_literal("true", Value::Bool(true)),
            Some(b'f') => self.expect_literal("false", Value::Bool(false)),
            Some(b'n') => self.expect_literal("null", Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.syntax("expected a value", self.pos)),
            None => Err(self.syntax("unexpected end of input, expected a value", self.pos)),
        }
    }

    fn enter(&self, depth: u32) -> Result<(), Error> {
        if depth > DEPTH_MAX {
            let (line, column) = position(self.text, self.pos);
            return Err(Error::TooDeep { depth_max: DEPTH_MAX, line, column });
        }
        Ok(())
    }

    fn array(&mut self, depth: u32) -> Result<Value, Error> {
        self.enter(depth)?;
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            self.skip_whitespace();
            items.push(self.value(depth)?);
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.syntax("expected ',' or ']' in array", self.pos)),
            }
        }
    }

    fn object(&mut self, depth: u32) -> Result<Value, Error> {
        self.enter(depth)?;
        self.pos += 1;
        let mut map = BTreeMap::new();
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Object(map));
        }
        loop {
            self.skip_whitespace();
            let key_pos = self.pos;
            if self.peek() != Some(b'"') {
                return Err(self.syntax("expected a string key in object", self.pos));
            }
            let key = self.string()?;
            if map.contains_key(&key) {
                let (line, column) = position(self.text, key_pos);
                return Err(Error::DuplicateKey { key, line, column });
            }
            self.skip_whitespace();
            if self.peek() != Some(b':') {
                return Err(self.syntax("expected ':' after object key", self.pos));
            }
            self.pos += 1;
            self.skip_whitespace();
            let value = self.value(depth)?;
            map.insert(key, value);
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Object(map));
                }
                _ => return Err(self.syntax("expected ',' or '}' in object", self.pos)),
            }
        }
    }

    /// Parses a string literal starting at the opening quote.
    fn string(&mut self) -> Result<String, Error> {
        let start = self.pos;
        self.pos += 1;
        let mut out = String::new();
        loop {
            // Copy the run of ordinary characters in one go; the input is valid UTF-8 and the
            // run ends on an ASCII byte, so the slice is on character boundaries.
            let run_start = self.pos;
            while let Some(b) = self.peek() {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.pos += 1;
            }
            out.push_str(&self.text[run_start..self.pos]);
            match self.peek() {
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    let escape_pos = self.pos;
                    self.pos += 1;
                    let c = match self.peek() {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            self.pos += 1;
                            let c = self.unicode_escape(escape_pos)?;
                            out.push(c);
                            continue;
                        }
                        _ => return Err(self.syntax("invalid escape in string", escape_pos)),
                    };
                    self.pos += 1;
                    out.push(c);
                }
                Some(_) => {
                    return Err(
                        self.syntax("control character in string must be escaped", self.pos)
                    );
                }
                None => return Err(self.syntax("unterminated string", start)),
            }
        }
    }

    fn hex4(&mut self, escape_pos: usize) -> Result<u32, Error> {
        let digits = self
            .bytes
            .get(self.pos..self.pos + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .filter(|d| d.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| self.syntax("invalid \\u escape in string", escape_pos))?;
        let code = u32::from_str_radix(digits, 16)
            .map_err(|_| self.syntax("invalid \\u escape in string", escape_pos))?;
        self.pos += 4;
        Ok(code)
    }

    /// Decodes the four hex digits after `\u`, and a low surrogate escape if the first is a high
    /// surrogate; lone surrogates are errors since a Rust string cannot hold them.
    fn unicode_escape(&mut self, escape_pos: usize) -> Result<char, Error> {
        let first = self.hex4(escape_pos)?;
        let code = if (0xD800..0xDC00).contains(&first) {
            if !self.bytes[self.pos..].starts_with(b"\\u") {
                return Err(self.syntax("unpaired surrogate in \\u escape", escape_pos));
            }
            self.pos += 2;
            let second = self.hex4(escape_pos)?;
            if !(0xDC00..0xE000).contains(&second) {
                return Err(self.syntax("unpaired surrogate in \\u escape", escape_pos));
            }
            0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
        } else {
            first
        };
        char::from_u32(code)
            .ok_or_else(|| self.syntax("unpaired surrogate in \\u escape", escape_pos))
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<Value, Error> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        let int_start = self.pos;
        let int_digits = self.digits();
        if int_digits == 0 {
            return Err(self.syntax("invalid number", start));
        }
        if int_digits > 1 && self.bytes[int_start] == b'0' {
            return Err(self.syntax("invalid number: leading zero", start));
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            integer = false;
            if self.digits() == 0 {
                return Err(self.syntax("invalid number: expected digits after '.'", start));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            integer = false;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.syntax("invalid number: expected digits in exponent", start));
            }
        }
        let text = &self.text[start..self.pos];
        // The position is only for an error: computing it scans the text from its start,
        // and doing that for every number made parsing quadratic.
        if let Ok(n) = number_from_text(Format::Json, text, integer, 0, 0) {
            return Ok(Value::Number(n));
        }
        let (line, column) = position(self.text, start);
        number_from_text(Format::Json, text, integer, line, column).map(Value::Number)
    }
}

/// Turns a validated decimal literal into a [`Number`]: integers must fit `i64`/`u64`, floats
/// must be finite. Shared with the YAML resolver.
pub(crate) fn number_from_text(
    format: Format,
    text: &str,
    integer: bool,
    line: u32,
    column: u32,
) -> Result<Number, Error> {
    if integer {
        return Number::parse_integer(text, 10).ok_or_else(|| Error::IntegerOutOfRange {
            text: text.to_owned(),
            line,
            column,
        });
    }
    let value: f64 = text.parse().map_err(|_| Error::Syntax {
        format,
        message: format!("invalid number {text}"),
        line,
        column,
    })?;
    Number::from_f64(value).ok_or_else(|| Error::NonFinite { text: text.to_owned(), line, column })
}

/// Writes `s` as a JSON string with the minimal escapes of rule 4.
pub(crate) fn write_string(s: &str, out: &mut String) {
    write_quoted(s, out, |c| (c as u32) < 0x20, |c| format!("\\u{:04x}", c as u32));
}

/// Writes a double-quoted string with the escapes JSON and TOML share (`"`, `\\`, `\b`,
/// `\f`, `\n`, `\r`, `\t`); other characters `escape` selects are written by `hex`.
pub(crate) fn write_quoted(
    s: &str,
    out: &mut String,
    escape: impl Fn(char) -> bool,
    hex: impl Fn(char) -> String,
) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if escape(c) => out.push_str(&hex(c)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Writes the canonical JSON of `value` (no whitespace, sorted keys).
pub(crate) fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => n.write_canonical(out),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            // BTreeMap<String, _> iterates in `str` order, which is UTF-8 byte order.
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
    }
}

/// Pretty JSON: two-space indentation, one member per line, a final newline.
pub(crate) fn render(value: &Value) -> String {
    let mut out = String::new();
    write_pretty(value, 0, &mut out);
    out.push('\n');
    out
}

fn indent(level: usize, out: &mut String) {
    for _ in 0..level {
        out.push_str("  ");
    }
}

fn write_pretty(value: &Value, level: usize, out: &mut String) {
    match value {
        Value::Array(items) if !items.is_empty() => {
            out.push_str("[\n");
            for (i, item) in items.iter().enumerate() {
                indent(level + 1, out);
                write_pretty(item, level + 1, out);
                out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
            }
            indent(level, out);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            out.push_str("{\n");
            for (i, (key, item)) in map.iter().enumerate() {
                indent(level + 1, out);
                write_string(key, out);
                out.push_str(": ");
                write_pretty(item, level + 1, out);
                out.push_str(if i + 1 < map.len() { ",\n" } else { "\n" });
            }
            indent(level, out);
            out.push('}');
        }
        scalar => write_canonical(scalar, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::disallowed_methods, reason = "a test measuring that parsing is linear")]
    fn numbers_parse_in_linear_time() {
        // A megabyte of numbers on one line (a document a topology proposal may carry, which
        // every manager parses) parses in well under a second. Each number's line and column
        // used to be computed from the start of the text even when it parsed, which took
        // minutes; errors still name the position.
        let text = format!("[{}]", crate::topology::numbers_line(200_000));
        let started = std::time::Instant::now();
        let Ok(Value::Array(items)) = parse(&text) else { panic!("an array") };
        assert_eq!(items.len(), 200_000);
        let took = started.elapsed();
        assert!(took.as_secs() < 5, "parsing took {took:?}");
        let bad = format!("{}, 1e999]", &text[..text.len() - 1]);
        match parse(&bad) {
            Err(Error::NonFinite { line: 1, column, .. }) => {
                assert_eq!(column as usize, text.len() + 2)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn strict_grammar() {
        // RFC 8259 corner cases that lenient parsers accept are refused here.
        for bad in
            ["[1,]", "{\"a\":1,}", "01", "1.", ".5", "+1", "[1 2]", "'a'", "nul", "\"\t\"", "[1]x"]
        {
            assert!(matches!(parse(bad), Err(Error::Syntax { .. })), "{bad}");
        }
    }

    #[test]
    fn escapes_and_surrogates() {
        // Escapes decode, surrogate pairs combine, lone surrogates are refused.
        assert_eq!(
            parse(r#""a\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00""#),
            Ok(Value::String("a\"\\/\u{8}\u{c}\n\r\té😀".to_owned()))
        );
        assert!(matches!(parse(r#""\ud83d""#), Err(Error::Syntax { .. })));
        assert!(matches!(parse(r#""\ude00x""#), Err(Error::Syntax { .. })));
        assert!(matches!(parse(r#""\u12""#), Err(Error::Syntax { .. })));
    }

    #[test]
    fn canonical_string_escaping_is_minimal() {
        // Only quote, backslash and C0 controls are escaped; other characters pass through.
        let mut out = String::new();
        write_string("\"\\\u{1}\u{1f}\n\u{7f}é/", &mut out);
        assert_eq!(out, "\"\\\"\\\\\\u0001\\u001f\\n\u{7f}é/\"");
    }

    #[test]
    fn syntax_error_positions() {
        // Errors point at the offending character, 1-based, counting characters not bytes.
        assert_eq!(
            parse("{\n  \"é\": [1,\n  ]\n}"),
            Err(Error::Syntax {
                format: Format::Json,
                message: "expected a value".to_owned(),
                line: 3,
                column: 3
            })
        );
    }
}
