//! Durations as users write them in YAML: `90s`, `15m`, `1h30m`.
//!
//! The grammar is the `h`/`m`/`s` subset of Go's `time.ParseDuration`, which is what the
//! apiserver's CEL `duration()` accepts, so bounds can be checked at admission
//! (`duration(self) >= duration('15m')`) and the operator parses exactly the same text.

use std::{borrow::Cow, fmt, str::FromStr};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Pattern of a [`Duration`] in the schema.
pub const DURATION_PATTERN: &str = r"^([0-9]{1,5}h)?([0-9]{1,5}m)?([0-9]{1,5}s)?$";

/// A non-empty duration written as hours, minutes and seconds (`1h30m`, `900s`).
/// Serializes back to the text it was parsed from, so that an object read and written
/// again does not change.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Duration {
    text: String,
    value: std::time::Duration,
}

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {why} (expected e.g. \"15m\", \"1h30m\" or \"900s\")")]
pub struct ParseDurationError {
    input: String,
    why: &'static str,
}

impl Duration {
    /// The duration as a standard library value.
    pub fn as_std(&self) -> std::time::Duration {
        self.value
    }

    /// Whole seconds.
    pub fn as_secs(&self) -> u64 {
        self.value.as_secs()
    }

    /// The text as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// A duration of whole seconds, written in its shortest `h`/`m`/`s` form.
    pub fn from_secs(secs: u64) -> Self {
        let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
        let mut text = String::new();
        for (n, unit) in [(h, 'h'), (m, 'm'), (s, 's')] {
            if n > 0 {
                text.push_str(&format!("{n}{unit}"));
            }
        }
        if text.is_empty() {
            text.push_str("0s");
        }
        Self { text, value: std::time::Duration::from_secs(secs) }
    }
}

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |why| ParseDurationError { input: input.chars().take(64).collect(), why };
        if input.is_empty() {
            return Err(err("empty"));
        }
        let mut secs: u64 = 0;
        let mut digits = String::new();
        // Units must appear in the order h, m, s, each at most once.
        let mut last_rank = 0;
        for ch in input.chars() {
            if ch.is_ascii_digit() {
                if digits.len() == 5 {
                    return Err(err("more than 5 digits in one component"));
                }
                digits.push(ch);
                continue;
            }
            let (rank, factor) = match ch {
                'h' => (1, 3600),
                'm' => (2, 60),
                's' => (3, 1),
                _ => return Err(err("only the units h, m and s are allowed")),
            };
            if digits.is_empty() {
                return Err(err("a unit without a number"));
            }
            if rank <= last_rank {
                return Err(err("units must appear once each, in the order h, m, s"));
            }
            last_rank = rank;
            let n: u64 = digits.parse().map_err(|_| err("not a number"))?;
            secs += n * factor;
            digits.clear();
        }
        if !digits.is_empty() {
            return Err(err("a number without a unit"));
        }
        Ok(Self { text: input.to_owned(), value: std::time::Duration::from_secs(secs) })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "minLength": 2,
            "maxLength": 20,
            "pattern": DURATION_PATTERN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_go_subset() {
        for (text, secs) in [("15m", 900), ("1h30m", 5400), ("12h", 43200), ("90s", 90), ("1h0m5s", 3605)] {
            let d: Duration = text.parse().unwrap();
            assert_eq!(d.as_secs(), secs, "{text}");
            assert_eq!(d.to_string(), text, "keeps the text as written");
        }
    }

    #[test]
    fn refuses_everything_else_with_a_reason() {
        for text in ["", "15", "m", "1.5h", "10ms", "1m1h", "1h1h", "-5m", "123456s", "1d", " 5m"] {
            let err = text.parse::<Duration>().unwrap_err().to_string();
            assert!(err.contains("invalid duration"), "{text}: {err}");
        }
    }

    #[test]
    fn from_secs_is_shortest_form() {
        assert_eq!(Duration::from_secs(3600).as_str(), "1h");
        assert_eq!(Duration::from_secs(3661).as_str(), "1h1m1s");
        assert_eq!(Duration::from_secs(0).as_str(), "0s");
    }

    #[test]
    fn json_round_trip_keeps_text() {
        let d: Duration = serde_json::from_str("\"1h30m\"").unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"1h30m\"");
        assert!(serde_json::from_str::<Duration>("\"soon\"").is_err());
    }
}
