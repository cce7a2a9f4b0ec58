//! TOML for topologies: conversion from the `toml` crate's spanned document tree, and a
//! section-style writer.
//!
//! `toml::de::DeTable` is used rather than `toml::Table` because it keeps the span of every
//! value and the literal text of every number, so out-of-range integers and non-finite floats
//! are reported with a position. The `toml` parser itself rejects duplicate keys and table
//! redefinitions and bounds its own nesting; this module maps its byte spans to line and
//! column. Datetimes become RFC 3339 strings. Pure functions over strings.

use std::collections::BTreeMap;

use ::toml::Spanned;
use ::toml::de::{DeTable, DeValue};

use super::{DEPTH_MAX, Error, Format, Number, Value, pointer_push, position};

/// Parses a TOML document (always a table at the top level).
pub(crate) fn parse(text: &str) -> Result<Value, Error> {
    let table = DeTable::parse(text).map_err(|error| syntax(text, &error))?;
    convert_table(text, table.get_ref(), 1)
}

fn syntax(text: &str, error: &::toml::de::Error) -> Error {
    let start = error.span().map_or(0, |span| span.start);
    let (line, column) = position(text, start);
    let message = error.message().trim_end().to_owned();
    if message == "duplicate key" {
        let key = error
            .span()
            .and_then(|span| text.get(span))
            .map(|raw| raw.trim().trim_matches(['"', '\'']).to_owned())
            .unwrap_or_default();
        return Error::DuplicateKey { key, line, column };
    }
    Error::Syntax { format: Format::Toml, message, line, column }
}

fn convert_table(text: &str, table: &DeTable<'_>, depth: u32) -> Result<Value, Error> {
    let mut map = BTreeMap::new();
    for (key, value) in table.iter() {
        map.insert(key.get_ref().to_string(), convert(text, value, depth)?);
    }
    Ok(Value::Object(map))
}

fn convert(text: &str, value: &Spanned<DeValue<'_>>, depth: u32) -> Result<Value, Error> {
    // The position is only for an error: computing it scans the text from its start, and
    // doing that for every value made parsing quadratic.
    let at = || position(text, value.span().start);
    let literal = || text.get(value.span()).unwrap_or_default().trim().to_owned();
    Ok(match value.get_ref() {
        DeValue::String(s) => Value::String(s.to_string()),
        DeValue::Boolean(b) => Value::Bool(*b),
        DeValue::Datetime(datetime) => Value::String(datetime.to_string()),
        DeValue::Integer(integer) => {
            // TOML integers are signed 64-bit; larger literals are refused rather than widened.
            let number = i64::from_str_radix(integer.as_str(), integer.radix()).map_err(|_| {
                let (line, column) = at();
                Error::IntegerOutOfRange { text: literal(), line, column }
            })?;
            Value::Number(Number::from(number))
        }
        DeValue::Float(float) => {
            let parsed: f64 = float.as_str().parse().map_err(|_| {
                let (line, column) = at();
                Error::Syntax {
                    format: Format::Toml,
                    message: format!("invalid float {}", literal()),
                    line,
                    column,
                }
            })?;
            let number = Number::from_f64(parsed).ok_or_else(|| {
                let (line, column) = at();
                Error::NonFinite { text: literal(), line, column }
            })?;
            Value::Number(number)
        }
        DeValue::Array(items) => {
            check_depth(depth + 1, at)?;
            let items = items.iter().map(|item| convert(text, item, depth + 1));
            Value::Array(items.collect::<Result<_, _>>()?)
        }
        DeValue::Table(table) => {
            check_depth(depth + 1, at)?;
            convert_table(text, table, depth + 1)?
        }
    })
}

fn check_depth(depth: u32, at: impl Fn() -> (u32, u32)) -> Result<(), Error> {
    if depth > DEPTH_MAX {
        let (line, column) = at();
        return Err(Error::TooDeep { depth_max: DEPTH_MAX, line, column });
    }
    Ok(())
}

/// Pretty TOML: plain keys and values first, then one `[table]` section per non-empty table
/// and one `[[array]]` section per element of a non-empty array of tables; everything else
/// (empty tables, arrays that are not all tables) is written inline on one line.
pub(crate) fn render(value: &Value) -> Result<String, Error> {
    check_expressible(value, "")?;
    let Value::Object(map) = value else {
        return Err(unrepresentable(format!("a top-level {}", value.type_name()), ""));
    };
    let mut out = String::new();
    write_table(map, "", &mut out);
    if out.is_empty() {
        // An empty document is an empty table; keep the output a non-empty text file.
        out.push('\n');
    }
    Ok(out)
}

fn unrepresentable(what: String, path: &str) -> Error {
    Error::Unrepresentable { format: Format::Toml, what, path: path.to_owned() }
}

/// Finds the first value TOML cannot express, in document order.
fn check_expressible(value: &Value, path: &str) -> Result<(), Error> {
    match value {
        Value::Null => Err(unrepresentable("null".to_owned(), path)),
        Value::Number(n) if n.is_integer() && n.as_i64().is_none() && exact_f64(*n).is_none() => {
            Err(unrepresentable(format!("integer {n} (above i64::MAX)"), path))
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check_expressible(item, &format!("{path}/{i}"))?;
            }
            Ok(())
        }
        Value::Object(map) => {
            for (key, item) in map {
                check_expressible(item, &pointer_push(path, key))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// For an integer above `i64::MAX` that an `f64` holds exactly, that float. TOML integers stop
/// at `i64::MAX`, but such a value written as a TOML float reads back as the same [`Number`],
/// since integral floats in `u64` range are integers in the data model.
fn exact_f64(n: Number) -> Option<f64> {
    let value = n.as_u64()?;
    let float = n.as_f64();
    // 2^64 rounds down to u64::MAX when cast, so exclude it before comparing.
    (float < 18_446_744_073_709_551_616.0 && float as u64 == value).then_some(float)
}

/// A value written as a `[table]` section rather than inline.
fn is_section(value: &Value) -> bool {
    matches!(value, Value::Object(map) if !map.is_empty())
}

/// A value written as `[[array]]` sections rather than inline.
fn is_array_of_tables(value: &Value) -> bool {
    matches!(value, Value::Array(items)
        if !items.is_empty() && items.iter().all(|item| matches!(item, Value::Object(_))))
}

/// Writes the body of a table whose header (if any) is already written; `prefix` is the dotted
/// key path of the table, empty at the top level.
fn write_table(map: &BTreeMap<String, Value>, prefix: &str, out: &mut String) {
    for (key, item) in map {
        if !is_section(item) && !is_array_of_tables(item) {
            write_key(key, out);
            out.push_str(" = ");
            write_inline(item, out);
            out.push('\n');
        }
    }
    for (key, item) in map {
        let mut path = prefix.to_owned();
        if !path.is_empty() {
            path.push('.');
        }
        write_key(key, &mut path);
        if is_section(item)
            && let Value::Object(child) = item
        {
            section_break(out);
            out.push_str(&format!("[{path}]\n"));
            write_table(child, &path, out);
        } else if is_array_of_tables(item)
            && let Value::Array(items) = item
        {
            for element in items {
                if let Value::Object(child) = element {
                    section_break(out);
                    out.push_str(&format!("[[{path}]]\n"));
                    write_table(child, &path, out);
                }
            }
        }
    }
}

/// Separates a section header from what precedes it by one blank line.
fn section_break(out: &mut String) {
    if !out.is_empty() {
        out.push('\n');
    }
}

/// Writes a key bare when TOML allows it, else as a basic string.
fn write_key(key: &str, out: &mut String) {
    let bare =
        !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        out.push_str(key);
    } else {
        write_string(key, out);
    }
}

/// Writes a TOML basic string; control characters (and DEL) are escaped as TOML requires.
fn write_string(s: &str, out: &mut String) {
    super::json::write_quoted(
        s,
        out,
        |c| (c as u32) < 0x20 || c == '\u{7f}',
        |c| format!("\\u{:04X}", c as u32),
    );
}

/// Writes a value on one line. Callers have checked that it holds no null and no integer above
/// `i64::MAX` that is not exactly an `f64`.
fn write_inline(value: &Value, out: &mut String) {
    match value {
        // Unreachable after `check_expressible`; written as a string so output stays TOML.
        Value::Null => out.push_str("\"null\""),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), exact_f64(*n)) {
            (None, Some(float)) if n.is_integer() => {
                // Integers above i64::MAX are at least 2^63, so ryu writes them with an exponent.
                out.push_str(ryu::Buffer::new().format_finite(float));
            }
            // Canonical floats always contain `.` or `e`, so TOML reads them back as floats.
            _ => n.write_canonical(out),
        },
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_inline(item, out);
            }
            out.push(']');
        }
        Value::Object(map) if map.is_empty() => out.push_str("{}"),
        Value::Object(map) => {
            out.push_str("{ ");
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_key(key, out);
                out.push_str(" = ");
                write_inline(item, out);
            }
            out.push_str(" }");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::disallowed_methods, reason = "a test measuring that parsing is linear")]
    fn values_convert_in_linear_time() {
        // A megabyte of numbers on one line converts in well under a second; each value's
        // line and column used to be computed from the start of the text even when it
        // converted, which took about a minute. Errors still name the position.
        let text = format!("a = [{}]\n", crate::topology::numbers_line(200_000));
        let started = std::time::Instant::now();
        let value = parse(&text).unwrap();
        let took = started.elapsed();
        let Value::Object(map) = value else { panic!("a table") };
        assert!(matches!(&map["a"], Value::Array(items) if items.len() == 200_000));
        assert!(took.as_secs() < 5, "parsing took {took:?}");
        match parse("a = 1\nb = 99999999999999999999\n") {
            Err(Error::IntegerOutOfRange { line: 2, column: 5, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn datetimes_become_rfc3339_strings() {
        // Each TOML datetime kind becomes its RFC 3339 text, with `T` between date and time.
        let value = parse(
            "a = 1979-05-27 07:32:00Z\nb = 1979-05-27\nc = 07:32:00.5\nd = 1979-05-27T00:32:00-07:00\n",
        );
        let mut expected = BTreeMap::new();
        expected.insert("a".to_owned(), Value::from("1979-05-27T07:32:00Z"));
        expected.insert("b".to_owned(), Value::from("1979-05-27"));
        expected.insert("c".to_owned(), Value::from("07:32:00.5"));
        expected.insert("d".to_owned(), Value::from("1979-05-27T00:32:00-07:00"));
        assert_eq!(value, Ok(Value::Object(expected)));
    }

    #[test]
    fn integers_are_signed_64_bit() {
        // i64 extremes and radix forms parse; one past i64::MAX is out of range with a position.
        let value = parse("a = -9223372036854775808\nb = 0xff\nc = 1_000\n");
        let mut expected = BTreeMap::new();
        expected.insert("a".to_owned(), Value::from(i64::MIN));
        expected.insert("b".to_owned(), Value::from(255));
        expected.insert("c".to_owned(), Value::from(1000));
        assert_eq!(value, Ok(Value::Object(expected)));
        assert_eq!(
            parse("\n x = 9223372036854775808"),
            Err(Error::IntegerOutOfRange {
                text: "9223372036854775808".to_owned(),
                line: 2,
                column: 6
            })
        );
    }

    #[test]
    fn large_exact_integers_render_as_floats() {
        // 2^63 has no TOML integer form but is an exact f64, so it renders as a float that
        // reads back as the same number; u64::MAX is not exact and is refused with its path.
        let mut map = BTreeMap::new();
        map.insert("n".to_owned(), Value::Number(Number::from(1u64 << 63)));
        let value = Value::Object(map.clone());
        let text = render(&value);
        assert_eq!(text.as_deref(), Ok("n = 9.223372036854776e18\n"));
        assert_eq!(text.and_then(|t| parse(&t)), Ok(value));
        map.insert("n".to_owned(), Value::Number(Number::from(u64::MAX)));
        assert!(matches!(
            render(&Value::Object(map)),
            Err(Error::Unrepresentable { path, .. }) if path == "/n"
        ));
    }
}
