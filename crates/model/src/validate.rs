//! Shared validation rules: names, header names, IP addresses, regexes.
//!
//! Each spec type has a `validate(&self, path, &mut problems)` that pushes
//! every problem it finds, so an object reports all its errors at once.

use std::net::IpAddr;

use crate::problem::Problem;

/// Collected problems of one object.
pub(crate) type Problems = Vec<Problem>;

/// Object names: a DNS label, `^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`.
pub fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let ok_char = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(ok_char)
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

pub(crate) fn name_message(name: &str) -> String {
    format!(
        "invalid name {name:?}: must be 1 to 63 characters of lowercase letters, digits and '-', \
         starting and ending with a letter or digit"
    )
}

/// Checks a reference to another object by name.
pub(crate) fn check_name(path: &str, name: &str, problems: &mut Problems) {
    if !is_valid_name(name) {
        problems.push(Problem::new(path, name_message(name)));
    }
}

/// HTTP header names as Envoy and HTTP/2 want them: lowercase token characters.
pub(crate) fn is_lowercase_token(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
}

/// Header names that routes may match on: lowercase tokens, and the pseudo-headers
/// `:authority`, `:path` and `:scheme` (`:method` is matched with `methods`).
pub(crate) fn check_match_header_name(path: &str, name: &str, problems: &mut Problems) {
    match name {
        ":method" => problems.push(Problem::new(
            path,
            "\":method\" cannot be matched as a header; use match.methods",
        )),
        ":authority" | ":path" | ":scheme" => {}
        _ if name.starts_with(':') => problems.push(Problem::new(
            path,
            format!(
                "unknown pseudo-header {name:?}; only :authority, :path and :scheme can be matched"
            ),
        )),
        _ => check_header_name(path, name, problems),
    }
}

pub(crate) fn check_header_name(path: &str, name: &str, problems: &mut Problems) {
    if name.is_empty() {
        problems.push(Problem::new(path, "header name must not be empty"));
    } else if !is_lowercase_token(name) {
        problems.push(Problem::new(
            path,
            format!(
                "invalid header name {name:?}: use lowercase letters, digits and -_.!#$%&'*+^`|~"
            ),
        ));
    }
}

/// Header names a route may add or remove: never pseudo-headers or `host`.
pub(crate) fn check_mutable_header_name(path: &str, name: &str, problems: &mut Problems) {
    if name.starts_with(':') {
        problems.push(Problem::new(
            path,
            format!("pseudo-header {name:?} cannot be added or removed"),
        ));
    } else if name.eq_ignore_ascii_case("host") {
        problems.push(Problem::new(
            path,
            "header \"host\" cannot be added or removed",
        ));
    } else {
        check_header_name(path, name, problems);
    }
}

pub(crate) fn check_header_value(path: &str, value: &str, problems: &mut Problems) {
    if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        problems.push(Problem::new(
            path,
            "header value must not contain CR, LF or NUL",
        ));
    }
}

/// Compiles a regex with the `regex` crate (which, like RE2, Envoy's engine, rejects look-around
/// and backreferences), then checks that Envoy accepts it and reads it alike
/// ([`crate::regex`]).
pub(crate) fn check_regex(path: &str, regex: &str, problems: &mut Problems) {
    let max = crate::limits::MAX_REGEX_BYTES;
    if regex.len() > max {
        problems.push(Problem::new(
            path,
            format!(
                "the regex is {} bytes long; the limit is {max}",
                regex.len()
            ),
        ));
        return;
    }
    if let Err(e) = regex::RegexBuilder::new(regex).size_limit(1 << 20).build() {
        // The regex crate's errors span several lines; keep them on one.
        let detail = e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        problems.push(Problem::new(path, format!("invalid regex: {detail}")));
        return;
    }
    crate::regex::check_regex_for_envoy(path, regex, problems);
}

pub(crate) fn check_ip(path: &str, address: &str, problems: &mut Problems) {
    if address.parse::<IpAddr>().is_err() {
        problems.push(Problem::new(
            path,
            format!("{address:?} must be an IP address; DNS names are not supported yet"),
        ));
    }
}

/// Paths in routes, redirects and rewrites.
pub(crate) fn check_http_path(path: &str, value: &str, problems: &mut Problems) {
    if !value.starts_with('/') {
        problems.push(Problem::new(path, format!("{value:?} must start with '/'")));
    } else if value.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        problems.push(Problem::new(
            path,
            format!("{value:?} must not contain spaces or control characters"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        for ok in ["a", "web", "web-v1", "0", "a1-b2", &"a".repeat(63)] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Web",
            "a_b",
            "a.b",
            "a b",
            &"a".repeat(64),
            "é",
        ] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn header_names() {
        let mut p = vec![];
        check_match_header_name("h", "x-user", &mut p);
        check_match_header_name("h", ":authority", &mut p);
        assert!(p.is_empty());
        check_match_header_name("h", ":method", &mut p);
        check_match_header_name("h", "X-User", &mut p);
        check_match_header_name("h", ":foo", &mut p);
        check_mutable_header_name("h", "host", &mut p);
        check_mutable_header_name("h", ":path", &mut p);
        assert_eq!(p.len(), 5);
    }

    #[test]
    fn regexes_reject_look_around() {
        let mut p = vec![];
        check_regex("r", "^/api/(v1|v2)/.*$", &mut p);
        assert!(p.is_empty());
        check_regex("r", "(?=foo)", &mut p);
        check_regex("r", "(a)\\1", &mut p);
        assert_eq!(p.len(), 2);
        assert!(p[0].message.starts_with("invalid regex: "));
        assert!(!p[0].message.contains('\n'));
    }
}
