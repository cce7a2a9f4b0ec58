//! Structural differences between two topology values, addressed by JSON pointers.
//!
//! Objects are compared key by key and arrays position by position (an insertion in the middle
//! of an array shows as changes to the following positions and an addition at the end, which
//! keeps the output predictable and cheap). Pure functions over values.

use std::collections::BTreeSet;

use super::{DEPTH_MAX, Value, pointer_push};

/// What happened at a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChangeKind {
    /// The path exists only in the new value.
    Added,
    /// The path exists only in the old value.
    Removed,
    /// The path exists in both, with different values that are not both objects or both arrays.
    Changed,
}

/// One difference between two values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// JSON pointer (RFC 6901) of the differing value, e.g. `/links/3/bandwidth`; `""` is the
    /// whole document. `~` and `/` in keys are written `~0` and `~1`.
    pub path: String,
    /// Whether the value was added, removed or changed.
    pub kind: ChangeKind,
    /// The old value (`None` for [`ChangeKind::Added`]).
    pub old: Option<Value>,
    /// The new value (`None` for [`ChangeKind::Removed`]).
    pub new: Option<Value>,
}

/// Lists the differences from `a` (old) to `b` (new), in document order (object keys sorted,
/// array positions ascending). Empty when the values are equal.
///
/// Below [`DEPTH_MAX`] levels the two subtrees are compared whole and reported as one change.
pub fn diff(a: &Value, b: &Value) -> Vec<Change> {
    let mut changes = Vec::new();
    walk(a, b, String::new(), 0, &mut changes);
    changes
}

fn walk(a: &Value, b: &Value, path: String, depth: u32, changes: &mut Vec<Change>) {
    match (a, b) {
        (Value::Object(old), Value::Object(new)) if depth < DEPTH_MAX => {
            let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
            for key in keys {
                let child = pointer_push(&path, key);
                match (old.get(key), new.get(key)) {
                    (Some(x), Some(y)) => walk(x, y, child, depth + 1, changes),
                    (Some(x), None) => changes.push(removed(child, x)),
                    (None, Some(y)) => changes.push(added(child, y)),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(old), Value::Array(new)) if depth < DEPTH_MAX => {
            for i in 0..old.len().max(new.len()) {
                let child = format!("{path}/{i}");
                match (old.get(i), new.get(i)) {
                    (Some(x), Some(y)) => walk(x, y, child, depth + 1, changes),
                    (Some(x), None) => changes.push(removed(child, x)),
                    (None, Some(y)) => changes.push(added(child, y)),
                    (None, None) => {}
                }
            }
        }
        _ if a != b => changes.push(Change {
            path,
            kind: ChangeKind::Changed,
            old: Some(a.clone()),
            new: Some(b.clone()),
        }),
        _ => {}
    }
}

fn added(path: String, value: &Value) -> Change {
    Change { path, kind: ChangeKind::Added, old: None, new: Some(value.clone()) }
}

fn removed(path: String, value: &Value) -> Change {
    Change { path, kind: ChangeKind::Removed, old: Some(value.clone()), new: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Format, parse};

    fn json(text: &str) -> Value {
        parse(text.as_bytes(), Format::Json).unwrap_or(Value::Null)
    }

    fn change(path: &str, kind: ChangeKind, old: Option<&str>, new: Option<&str>) -> Change {
        Change { path: path.to_owned(), kind, old: old.map(json), new: new.map(json) }
    }

    #[test]
    fn equal_values_have_no_changes() {
        // A value compared with itself, and with a reordered copy, yields nothing.
        let a = json(r#"{"a":[1,{"b":2}],"c":null}"#);
        let b = json(r#"{"c":null,"a":[1.0,{"b":2e0}]}"#);
        assert_eq!(diff(&a, &a), []);
        assert_eq!(diff(&a, &b), []);
    }

    #[test]
    fn added_removed_changed_with_nested_arrays() {
        // Object keys and array positions are walked; leaves and type changes are Changed.
        let a = json(r#"{"links":[{"bw":10},{"bw":20},[1,2]],"mtu":1500,"old":true,"t":[1]}"#);
        let b = json(
            r#"{"links":[{"bw":10},{"bw":40,"up":true},[1,3,4]],"mtu":9000,"new":"x","t":{"0":1}}"#,
        );
        assert_eq!(
            diff(&a, &b),
            [
                change("/links/1/bw", ChangeKind::Changed, Some("20"), Some("40")),
                change("/links/1/up", ChangeKind::Added, None, Some("true")),
                change("/links/2/1", ChangeKind::Changed, Some("2"), Some("3")),
                change("/links/2/2", ChangeKind::Added, None, Some("4")),
                change("/mtu", ChangeKind::Changed, Some("1500"), Some("9000")),
                change("/new", ChangeKind::Added, None, Some("\"x\"")),
                change("/old", ChangeKind::Removed, Some("true"), None),
                change("/t", ChangeKind::Changed, Some("[1]"), Some(r#"{"0":1}"#)),
            ]
        );
        // Shortening an array removes its tail positions, in ascending order.
        assert_eq!(
            diff(&json("[[1,2,3]]"), &json("[[1]]")),
            [
                change("/0/1", ChangeKind::Removed, Some("2"), None),
                change("/0/2", ChangeKind::Removed, Some("3"), None),
            ]
        );
        // A changed top-level scalar is reported at the empty pointer.
        assert_eq!(
            diff(&json("1"), &json("2")),
            [change("", ChangeKind::Changed, Some("1"), Some("2"))]
        );
    }

    #[test]
    fn pointer_escapes_tilde_and_slash() {
        // Keys containing `/` and `~` are escaped as `~1` and `~0` (RFC 6901).
        let a = json(r#"{"10.0.0.0/8":{"a~b":1}}"#);
        let b = json(r#"{"10.0.0.0/8":{"a~b":2}}"#);
        assert_eq!(
            diff(&a, &b),
            [change("/10.0.0.0~18/a~0b", ChangeKind::Changed, Some("1"), Some("2"))]
        );
    }
}
