//! Durations written as strings: "5s", "250ms", "1m30s".

use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A duration in config, written in humantime form ("5s", "250ms", "1m30s").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }

    pub const fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }

    pub fn get(self) -> std::time::Duration {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_zero() {
            return f.write_str("0s");
        }
        // humantime separates units with spaces; config is written without them.
        let text = humantime::format_duration(self.0)
            .to_string()
            .replace(' ', "");
        f.write_str(&text)
    }
}

impl std::str::FromStr for Duration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        if trimmed.is_empty() {
            return Err(
                "invalid duration \"\": expected a duration like \"5s\", \"250ms\" or \"1m30s\""
                    .into(),
            );
        }
        humantime::parse_duration(trimmed).map(Duration).map_err(|e| {
            format!("invalid duration {s:?}: {e} (expected a duration like \"5s\", \"250ms\" or \"1m30s\")")
        })
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Duration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string like \"5s\", \"250ms\" or \"1m30s\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!("5s".parse::<Duration>(), Ok(Duration::from_secs(5)));
        assert_eq!("250ms".parse::<Duration>(), Ok(Duration::from_millis(250)));
        assert_eq!("1m30s".parse::<Duration>(), Ok(Duration::from_secs(90)));
        assert_eq!("0s".parse::<Duration>(), Ok(Duration::from_secs(0)));
    }

    #[test]
    fn rejects_garbage_with_a_hint() {
        let err = "five seconds".parse::<Duration>().unwrap_err();
        assert!(err.contains("invalid duration \"five seconds\""), "{err}");
        assert!("".parse::<Duration>().is_err());
        assert!("5".parse::<Duration>().is_err());
    }

    #[test]
    fn displays_compactly_and_round_trips() {
        for text in ["5s", "250ms", "1m30s", "0s", "1h"] {
            let d: Duration = text.parse().unwrap();
            assert_eq!(d.to_string(), text);
        }
    }
}
