//! The topology data model: [`Value`] and its canonical [`Number`].
//!
//! Every source format is parsed into these types, and every writer reads them. A [`Number`]
//! holds only the canonical representation of a numeric value (rule 3 of
//! `docs/topology-canonical.md`), so two numbers are equal exactly when their canonical text is
//! equal. Pure data: no IO.

use std::collections::BTreeMap;
use std::fmt;

/// A parsed topology document: the JSON data model with string-keyed, sorted objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// `null` (YAML `~`, `null` or an empty node); TOML has no null.
    Null,
    /// A boolean.
    Bool(bool),
    /// A finite number in canonical form.
    Number(Number),
    /// A UTF-8 string (also the form of TOML datetimes, in RFC 3339 text).
    String(String),
    /// An ordered sequence.
    Array(Vec<Value>),
    /// A map with unique string keys, ordered by their UTF-8 bytes.
    Object(BTreeMap<String, Value>),
}

impl Value {
    /// The name of this value's type, as used in error messages (`"null"`, `"object"`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }

    /// Nesting depth: 0 for a scalar, 1 for a container of scalars, and so on.
    pub fn depth(&self) -> u32 {
        match self {
            Value::Array(items) => 1 + items.iter().map(Value::depth).max().unwrap_or(0),
            Value::Object(map) => 1 + map.values().map(Value::depth).max().unwrap_or(0),
            _ => 0,
        }
    }
}

impl From<Number> for Value {
    fn from(number: Number) -> Self {
        Value::Number(number)
    }
}

impl From<bool> for Value {
    fn from(value: bool) -> Self {
        Value::Bool(value)
    }
}

impl From<&str> for Value {
    fn from(value: &str) -> Self {
        Value::String(value.to_owned())
    }
}

impl From<String> for Value {
    fn from(value: String) -> Self {
        Value::String(value)
    }
}

impl From<i64> for Value {
    fn from(value: i64) -> Self {
        Value::Number(Number::from(value))
    }
}

/// A finite number in canonical form.
///
/// Integral values that fit `i64` or `u64` are integers (so `1`, `1.0` and `1e0` are the same
/// number, and `-0.0` is `0`); every other value is an `f64` written in its shortest
/// round-tripping form. NaN and infinities cannot be represented.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Number(Repr);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Repr {
    /// Any integer in `i64` range.
    Int(i64),
    /// An integer above `i64::MAX`.
    UInt(u64),
    /// A finite float that is not an integer in `i64`/`u64` range.
    Float(f64),
}

// Floats in a `Number` are never NaN, so float equality is reflexive.
impl Eq for Number {}

/// 2^63 and 2^64 as exact `f64` values, the bounds of the integer forms.
const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;
const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;

impl Number {
    /// The canonical number for `value`, or `None` when it is NaN or infinite.
    pub fn from_f64(value: f64) -> Option<Number> {
        if !value.is_finite() {
            return None;
        }
        if value.fract() == 0.0 && (-TWO_POW_63..TWO_POW_64).contains(&value) {
            // The range check makes both casts exact; `-0.0 as i64` is 0.
            if value < TWO_POW_63 {
                return Some(Number(Repr::Int(value as i64)));
            }
            return Some(Number(Repr::UInt(value as u64)));
        }
        Some(Number(Repr::Float(value)))
    }

    /// The value as `i64`, if it is an integer in that range.
    pub fn as_i64(&self) -> Option<i64> {
        match self.0 {
            Repr::Int(v) => Some(v),
            _ => None,
        }
    }

    /// The value as `u64`, if it is a non-negative integer in that range.
    pub fn as_u64(&self) -> Option<u64> {
        match self.0 {
            Repr::Int(v) => u64::try_from(v).ok(),
            Repr::UInt(v) => Some(v),
            Repr::Float(_) => None,
        }
    }

    /// The value as `f64` (rounded for integers beyond 2^53).
    pub fn as_f64(&self) -> f64 {
        match self.0 {
            Repr::Int(v) => v as f64,
            Repr::UInt(v) => v as f64,
            Repr::Float(v) => v,
        }
    }

    /// Whether the canonical form is an integer.
    pub fn is_integer(&self) -> bool {
        !matches!(self.0, Repr::Float(_))
    }

    /// Parses an integer literal: an optional sign, then `digits` in `radix` (no prefix, no
    /// separators). `None` if the text is malformed or the value lies outside
    /// `i64::MIN..=u64::MAX`.
    pub(crate) fn parse_integer(text: &str, radix: u32) -> Option<Number> {
        let (negative, digits) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            _ => (false, text),
        };
        // `from_str_radix` accepts its own sign; a second one must not slip through.
        if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
            return None;
        }
        let magnitude = u64::from_str_radix(digits, radix).ok()?;
        if negative {
            let value = 0i128 - i128::from(magnitude);
            i64::try_from(value).ok().map(Number::from)
        } else {
            Some(Number::from(magnitude))
        }
    }

    /// Writes the canonical text (rule 3) to `out`.
    pub(crate) fn write_canonical(&self, out: &mut String) {
        match self.0 {
            Repr::Int(v) => out.push_str(&v.to_string()),
            Repr::UInt(v) => out.push_str(&v.to_string()),
            Repr::Float(v) => {
                let mut buffer = ryu::Buffer::new();
                let text = buffer.format_finite(v);
                // ryu already writes lowercase `e`, no `+`, and never a trailing `.0` for the
                // non-integral or out-of-range values kept as floats; normalise anyway so a
                // future formatting change cannot change the canonical bytes silently.
                let (mantissa, exponent) = match text.split_once(['e', 'E']) {
                    Some((m, e)) => (m, Some(e)),
                    None => (text, None),
                };
                let mantissa = mantissa.strip_suffix(".0").unwrap_or(mantissa);
                out.push_str(mantissa);
                if let Some(exponent) = exponent {
                    out.push('e');
                    out.push_str(exponent.strip_prefix('+').unwrap_or(exponent));
                }
            }
        }
    }
}

impl From<i64> for Number {
    fn from(value: i64) -> Self {
        Number(Repr::Int(value))
    }
}

impl From<u64> for Number {
    fn from(value: u64) -> Self {
        match i64::try_from(value) {
            Ok(v) => Number(Repr::Int(v)),
            Err(_) => Number(Repr::UInt(value)),
        }
    }
}

impl From<i32> for Number {
    fn from(value: i32) -> Self {
        Number::from(i64::from(value))
    }
}

impl From<u32> for Number {
    fn from(value: u32) -> Self {
        Number::from(i64::from(value))
    }
}

/// The canonical text, exactly as it appears in canonical JSON.
impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = String::new();
        self.write_canonical(&mut text);
        f.write_str(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(value: f64) -> String {
        Number::from_f64(value).map(|n| n.to_string()).unwrap_or_default()
    }

    #[test]
    fn integral_floats_become_integers() {
        // Integral f64 values inside i64/u64 range print as plain integers, -0.0 as 0.
        assert_eq!(canonical(1.0), "1");
        assert_eq!(canonical(1e3), "1000");
        assert_eq!(canonical(-5.0), "-5");
        assert_eq!(canonical(-0.0), "0");
        assert_eq!(canonical(-TWO_POW_63), "-9223372036854775808");
        assert_eq!(canonical(TWO_POW_63), "9223372036854775808");
        assert_eq!(Number::from_f64(1.0), Some(Number::from(1i64)));
        assert_eq!(Number::from_f64(TWO_POW_63), Some(Number::from(1u64 << 63)));
    }

    #[test]
    fn other_floats_use_shortest_exponent_form() {
        // Non-integral and out-of-range values use ryu's shortest form, normalised.
        assert_eq!(canonical(0.1), "0.1");
        assert_eq!(canonical(1.5e-7), "1.5e-7");
        assert_eq!(canonical(1e-7), "1e-7");
        assert_eq!(canonical(TWO_POW_64), "1.8446744073709552e19");
        assert_eq!(canonical(1e300), "1e300");
        assert_eq!(canonical(-123.456), "-123.456");
    }

    #[test]
    fn non_finite_values_are_unrepresentable() {
        // NaN and both infinities have no Number.
        assert_eq!(Number::from_f64(f64::NAN), None);
        assert_eq!(Number::from_f64(f64::INFINITY), None);
        assert_eq!(Number::from_f64(f64::NEG_INFINITY), None);
    }

    #[test]
    fn integer_literals_are_range_checked() {
        // Integer text parses within i64::MIN..=u64::MAX and is refused outside it.
        assert_eq!(Number::parse_integer("-9223372036854775808", 10), Some(Number::from(i64::MIN)));
        assert_eq!(Number::parse_integer("18446744073709551615", 10), Some(Number::from(u64::MAX)));
        assert_eq!(Number::parse_integer("18446744073709551616", 10), None);
        assert_eq!(Number::parse_integer("-9223372036854775809", 10), None);
        assert_eq!(Number::parse_integer("+ff", 16), Some(Number::from(255i64)));
        assert_eq!(Number::parse_integer("--1", 10), None);
        assert_eq!(Number::parse_integer("-", 10), None);
    }
}
