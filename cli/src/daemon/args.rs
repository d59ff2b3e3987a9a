//! Typed access to a request's arguments, with errors that name the argument.

use serde_json::{Map, Value};

use crate::control::{CommandError, ErrorClass};

/// The `arguments` object of one request.
#[derive(Debug)]
pub struct Arguments<'a> {
    command: &'a str,
    map: &'a Map<String, Value>,
}

fn invalid(desc: String) -> CommandError {
    CommandError::new(ErrorClass::InvalidParameter, desc)
}

impl<'a> Arguments<'a> {
    /// Wrap the arguments of `command`, refusing members not in `known` (a typo such as
    /// `"incrmental"` must not silently turn an incremental backup into a full one).
    pub fn new(
        command: &'a str,
        map: &'a Map<String, Value>,
        known: &[&str],
    ) -> Result<Self, CommandError> {
        if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(invalid(format!(
                "{command}: unknown argument {unknown:?}; it takes {}",
                if known.is_empty() {
                    "no arguments".to_string()
                } else {
                    known.join(", ")
                }
            )));
        }
        Ok(Arguments { command, map })
    }

    /// The raw value of `key`, if present and not null.
    pub fn opt_value(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// A required string.
    pub fn string(&self, key: &str) -> Result<String, CommandError> {
        self.opt_string(key)?
            .ok_or_else(|| invalid(format!("{}: argument {key:?} is required", self.command)))
    }

    /// An optional string.
    pub fn opt_string(&self, key: &str) -> Result<Option<String>, CommandError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(invalid(format!(
                "{}: argument {key:?} must be a string, not {other}",
                self.command
            ))),
        }
    }

    /// An optional unsigned integer.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>, CommandError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => value.as_u64().map(Some).ok_or_else(|| {
                invalid(format!(
                    "{}: argument {key:?} must be a non-negative integer, not {value}",
                    self.command
                ))
            }),
        }
    }

    /// An optional boolean (false when absent).
    pub fn flag(&self, key: &str) -> Result<bool, CommandError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(invalid(format!(
                "{}: argument {key:?} must be true or false, not {other}",
                self.command
            ))),
        }
    }

    /// An optional list of strings (empty when absent).
    pub fn strings(&self, key: &str) -> Result<Vec<String>, CommandError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(invalid(format!(
                        "{}: argument {key:?} must be a list of strings; {other} is not one",
                        self.command
                    ))),
                })
                .collect(),
            Some(other) => Err(invalid(format!(
                "{}: argument {key:?} must be a list of strings, not {other}",
                self.command
            ))),
        }
    }
}

/// Check a user-chosen name (volume, checkpoint, export): it ends up in file names, NBD
/// export names and URIs, so it is kept to a portable alphabet.
pub fn check_name(what: &str, name: &str) -> Result<(), CommandError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "invalid {what} name {name:?}: use 1-128 characters from A-Z a-z 0-9 - _ . \
             (not starting with . or -)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => unreachable!(),
        }
    }

    #[test]
    fn unknown_arguments_are_refused_by_name() {
        let m = map(json!({"incrmental": "c1"}));
        let err = Arguments::new("backup-begin", &m, &["incremental"]).unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidParameter);
        assert!(err.desc.contains("incrmental"));
    }

    #[test]
    fn typed_getters_check_types() {
        let m = map(json!({"s": "x", "n": 5, "b": true, "l": ["a"], "bad": -1, "badl": [1]}));
        let a = Arguments::new("c", &m, &["s", "n", "b", "l", "bad", "badl"]).unwrap();
        assert_eq!(a.string("s").unwrap(), "x");
        assert!(a.string("n").is_err());
        assert!(a.string("missing").is_err());
        assert_eq!(a.opt_u64("n").unwrap(), Some(5));
        assert!(a.opt_u64("bad").is_err());
        assert!(a.flag("b").unwrap());
        assert!(!a.flag("absent").unwrap());
        assert_eq!(a.strings("l").unwrap(), vec!["a".to_string()]);
        assert!(a.strings("badl").is_err());
    }

    #[test]
    fn names_are_portable() {
        for good in ["vm1", "db_data", "a.b-c", "X"] {
            assert!(check_name("volume", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a/b",
            "a b",
            "a@b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(check_name("volume", bad).is_err(), "{bad}");
        }
    }
}
