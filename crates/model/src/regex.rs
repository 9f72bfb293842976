//! The regexes Envoy accepts and reads as written.
//!
//! Envoy compiles them with RE2, which it runs byte by byte (a non-ASCII character is its
//! separate UTF-8 bytes: `.` does not match `é`, `[é]` is a class of two bytes, `\xE9` is one
//! byte and `\x{100}` an error), refuses some of the syntax the `regex` crate accepts (`(?x)`, `\p{Letter}`, `[a--b]`,
//! `a**`, `\e`, a repetition over 1000) and reads other forms differently (`\<`, `[[a-z]&&b]`,
//! `a{1, 5}`). Each of these was checked on the pinned Envoy (docs/configuration.md, "Regexes").
//! It also refuses a regex whose RE2 program is over `re2.max_program_size.error_level`
//! instructions, which `vmeshctl bootstrap` sets to [`ENVOY_PROGRAM_SIZE_LIMIT`].
//!
//! So a regex must be ASCII (non-ASCII text is written as its bytes, `\xC3\xA9`), in the syntax both engines read alike, and small: its program size
//! is estimated from the syntax tree, from above (an upper bound of RE2's count on every pattern
//! measured), and must stay under [`MAX_PROGRAM_SIZE`], a tenth of what Envoy is told to allow.

use regex_syntax::ast::{
    self, AssertionKind, Ast, ClassSet, ClassSetItem, Flag, FlagsItemKind, GroupKind, LiteralKind,
    RepetitionKind, RepetitionRange,
};

use crate::problem::Problem;

/// The estimated RE2 program size a regex may have.
pub const MAX_PROGRAM_SIZE: u64 = 2_000;

/// What `vmeshctl bootstrap` sets `re2.max_program_size.error_level` to (Envoy's default is
/// 100, which `/[^/]{1,64}` already exceeds).
pub const ENVOY_PROGRAM_SIZE_LIMIT: u64 = 20_000;

/// RE2's limit on a counted repetition, and on the product of nested ones.
const MAX_REPEAT: u64 = 1_000;

/// Checks `regex` (already known to be within the length limit) for Envoy.
pub(crate) fn check_regex_for_envoy(path: &str, regex: &str, problems: &mut Vec<Problem>) {
    if let Some(c) = regex.chars().find(|c| !c.is_ascii()) {
        problems.push(Problem::new(
            path,
            format!(
                "{c:?} is not ASCII: Envoy matches regexes byte by byte, so it would not mean \
                 what it says; match non-ASCII text with prefix or exact, or write its UTF-8 \
                 bytes as \\xHH escapes (\\xC3\\xA9 for é)"
            ),
        ));
        return;
    }
    // The regex crate's own nesting limit: whatever it compiled, this reads too.
    let parsed = ast::parse::ParserBuilder::new()
        .nest_limit(250)
        .build()
        .parse(regex);
    let tree = match parsed {
        Ok(tree) => tree,
        Err(e) => {
            problems.push(Problem::new(path, format!("invalid regex: {}", e.kind())));
            return;
        }
    };
    let mut walk = Walk {
        text: regex,
        problem: None,
    };
    let size = walk.size(&tree, 1).saturating_add(5);
    if let Some(message) = walk.problem {
        problems.push(Problem::new(path, message));
    } else if size > MAX_PROGRAM_SIZE {
        problems.push(Problem::new(
            path,
            format!(
                "too complex for Envoy: about {size} RE2 instructions, over the limit of \
                 {MAX_PROGRAM_SIZE} (a counted repetition such as {{1,64}} copies what it \
                 repeats)"
            ),
        ));
    }
}

struct Walk<'a> {
    text: &'a str,
    /// The first construct Envoy would refuse or read differently.
    problem: Option<String>,
}

impl Walk<'_> {
    fn refuse(&mut self, span: &ast::Span, why: &str) {
        if self.problem.is_none() {
            let at = &self.text[span.start.offset..span.end.offset];
            self.problem = Some(format!("{at:?}: {why}"));
        }
    }

    /// An upper bound of the RE2 instructions of `tree`; `repeat` is the product of the
    /// counted repetitions around it.
    fn size(&mut self, tree: &Ast, repeat: u64) -> u64 {
        match tree {
            Ast::Empty(_) => 0,
            Ast::Flags(set) => {
                self.flags(&set.flags);
                0
            }
            Ast::Literal(literal) => {
                self.literal(literal);
                1
            }
            Ast::Dot(_) => 3,
            Ast::Assertion(a) => {
                match a.kind {
                    AssertionKind::StartLine
                    | AssertionKind::EndLine
                    | AssertionKind::StartText
                    | AssertionKind::EndText
                    | AssertionKind::WordBoundary
                    | AssertionKind::NotWordBoundary => {}
                    _ => self.refuse(
                        &a.span,
                        "Envoy reads this as literal text; use \\b for a word boundary",
                    ),
                }
                1
            }
            Ast::ClassUnicode(c) => {
                self.refuse(
                    &c.span,
                    "Unicode classes match single bytes in Envoy; use ASCII classes",
                );
                0
            }
            Ast::ClassPerl(_) => 8,
            Ast::ClassBracketed(c) => 2 + self.class_set(&c.kind),
            Ast::Repetition(r) => {
                if matches!(*r.ast, Ast::Repetition(_)) {
                    self.refuse(
                        &r.span,
                        "Envoy refuses a repetition of a repetition; put the inner one in a \
                         group",
                    );
                }
                let op_text = &self.text[r.op.span.start.offset..r.op.span.end.offset];
                if op_text.contains(char::is_whitespace) {
                    self.refuse(
                        &r.op.span,
                        "Envoy reads a repetition with spaces in it as literal text; write {1,5}",
                    );
                }
                let count = match &r.op.kind {
                    RepetitionKind::Range(RepetitionRange::Exactly(n))
                    | RepetitionKind::Range(RepetitionRange::AtLeast(n))
                    | RepetitionKind::Range(RepetitionRange::Bounded(_, n)) => u64::from(*n),
                    _ => 1,
                };
                let repeat = repeat.saturating_mul(count.max(1));
                if count > MAX_REPEAT || repeat > MAX_REPEAT {
                    self.refuse(
                        &r.op.span,
                        "Envoy allows counted repetitions (nested ones multiplied) up to 1000",
                    );
                }
                let c = self.size(&r.ast, repeat);
                match &r.op.kind {
                    RepetitionKind::ZeroOrOne
                    | RepetitionKind::ZeroOrMore
                    | RepetitionKind::OneOrMore => c + 1,
                    RepetitionKind::Range(RepetitionRange::Exactly(n)) => {
                        c.saturating_mul(u64::from(*n))
                    }
                    RepetitionKind::Range(RepetitionRange::AtLeast(n)) => {
                        c.saturating_mul(u64::from(*n)).saturating_add(c + 1)
                    }
                    RepetitionKind::Range(RepetitionRange::Bounded(n, m)) => c
                        .saturating_mul(u64::from(*n))
                        .saturating_add((c + 1).saturating_mul(u64::from(m.saturating_sub(*n)))),
                }
            }
            Ast::Group(g) => {
                let extra = match &g.kind {
                    GroupKind::NonCapturing(flags) => {
                        self.flags(flags);
                        0
                    }
                    GroupKind::CaptureName { name, .. }
                        if !name
                            .name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
                    {
                        self.refuse(
                            &name.span,
                            "Envoy allows only letters, digits and '_' in a group name",
                        );
                        2
                    }
                    GroupKind::CaptureIndex(_) | GroupKind::CaptureName { .. } => 2,
                };
                self.size(&g.ast, repeat).saturating_add(extra)
            }
            Ast::Alternation(a) => a
                .asts
                .iter()
                .map(|t| self.size(t, repeat))
                .fold(a.asts.len() as u64 - 1, u64::saturating_add),
            Ast::Concat(c) => c
                .asts
                .iter()
                .map(|t| self.size(t, repeat))
                .fold(0, u64::saturating_add),
        }
    }

    fn flags(&mut self, flags: &ast::Flags) {
        for item in &flags.items {
            match item.kind {
                FlagsItemKind::Negation
                | FlagsItemKind::Flag(
                    Flag::CaseInsensitive
                    | Flag::MultiLine
                    | Flag::DotMatchesNewLine
                    | Flag::SwapGreed,
                ) => {}
                _ => self.refuse(&item.span, "Envoy knows only the flags i, m, s and U"),
            }
        }
    }

    fn literal(&mut self, literal: &ast::Literal) {
        match literal.kind {
            LiteralKind::Verbatim
            | LiteralKind::Meta
            | LiteralKind::Superfluous
            | LiteralKind::HexFixed(ast::HexLiteralKind::X)
            | LiteralKind::HexBrace(ast::HexLiteralKind::X) => {
                if u32::from(literal.c) > 0xFF {
                    self.refuse(
                        &literal.span,
                        "Envoy's \\x escapes are single bytes, up to \\xFF",
                    );
                }
            }
            LiteralKind::Special(
                ast::SpecialLiteralKind::Bell
                | ast::SpecialLiteralKind::FormFeed
                | ast::SpecialLiteralKind::Tab
                | ast::SpecialLiteralKind::LineFeed
                | ast::SpecialLiteralKind::CarriageReturn
                | ast::SpecialLiteralKind::VerticalTab,
            ) => {}
            _ => self.refuse(
                &literal.span,
                "Envoy does not know this escape; use \\xHH with two hex digits",
            ),
        }
    }

    /// An upper bound of a bracketed class's instructions.
    fn class_set(&mut self, set: &ClassSet) -> u64 {
        match set {
            ClassSet::BinaryOp(op) => {
                self.refuse(
                    &op.span,
                    "Envoy does not know class set operations (&&, --, ~~)",
                );
                0
            }
            ClassSet::Item(item) => self.class_item(item),
        }
    }

    fn class_item(&mut self, item: &ClassSetItem) -> u64 {
        match item {
            ClassSetItem::Empty(_) => 0,
            ClassSetItem::Literal(l) => {
                self.literal(l);
                2
            }
            ClassSetItem::Range(r) => {
                self.literal(&r.start);
                self.literal(&r.end);
                2
            }
            ClassSetItem::Ascii(_) | ClassSetItem::Perl(_) => 8,
            ClassSetItem::Unicode(c) => {
                self.refuse(
                    &c.span,
                    "Unicode classes match single bytes in Envoy; use ASCII classes",
                );
                0
            }
            ClassSetItem::Bracketed(b) => {
                self.refuse(
                    &b.span,
                    "Envoy reads a class inside a class differently; list its members instead",
                );
                0
            }
            ClassSetItem::Union(u) => u
                .items
                .iter()
                .map(|i| self.class_item(i))
                .fold(0, u64::saturating_add),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(regex: &str) -> Option<String> {
        let mut p = Vec::new();
        check_regex_for_envoy("r", regex, &mut p);
        p.into_iter().next().map(|p| p.message)
    }

    /// Program sizes Envoy 1.40 reported (`re2.max_program_size.error_level: 1` makes it say
    /// each one): the estimate is never below them.
    #[test]
    fn the_estimate_is_above_what_envoy_measured() {
        let measured = [
            ("a", 5),
            ("abc", 7),
            ("^/api/v[0-9]+/.*$", 9),
            ("/[^/]{1,64}", 196),
            ("/[^/]+", 8),
            (".{10}", 24),
            ("a{1,3}", 9),
            ("(a|bc|def)", 12),
            ("^(acme|globex)$", 14),
            ("\\w+", 8),
            ("[[:^alpha:]]", 7),
            ("a{1000}", 1004),
            ("a{2,1000}", 2002),
            ("(a|b|c){1,300}", 1203),
            ("((a{1,10}){1,10}){1,10}", 2223),
            ("(a{1,10}){1,100}", 2203),
            ("(a*){1000}", 3004),
            (".{1,1000}", 3003),
            ("(?:a{10}){10}", 104),
        ];
        for (regex, envoy) in measured {
            let tree = ast::parse::Parser::new().parse(regex).unwrap();
            let mut walk = Walk {
                text: regex,
                problem: None,
            };
            let estimate = walk.size(&tree, 1) + 5;
            assert!(estimate >= envoy, "{regex}: {estimate} < Envoy's {envoy}");
            assert!(
                estimate <= envoy * 3,
                "{regex}: {estimate} is far above {envoy}"
            );
        }
    }

    #[test]
    fn what_envoy_accepts_and_reads_alike_passes() {
        for ok in [
            "^/api/v[0-9]+/.*$",
            "/[^/]{1,64}",
            "(?i)shop|store",
            "(?P<version>v[0-9]+)",
            "(?<version>v[0-9]+)",
            "[[:alpha:]_-]+",
            "\\d+\\.\\d+",
            "\\x41\\x{7F}\\t",
            "/caf\\xC3\\xA9/[\\x80-\\xFF]+",
            "\\/\\-\\%",
            "(?s:.)*",
            "a*?",
            "(a{1,10}){1,10}",
        ] {
            assert_eq!(problem(ok), None, "{ok}");
        }
    }

    #[test]
    fn what_envoy_refuses_or_reads_otherwise_is_refused_with_the_part_at_fault() {
        for (regex, expect) in [
            ("/café", "'é' is not ASCII"),
            (
                "\\x{100}",
                "\"\\\\x{100}\": Envoy's \\x escapes are single bytes",
            ),
            ("\\pL+", "\"\\\\pL\": Unicode classes"),
            ("[\\p{Greek}a]", "Unicode classes"),
            ("(?x)a b", "\"x\": Envoy knows only the flags i, m, s and U"),
            ("(?-u:a)", "flags i, m, s and U"),
            ("[a-z--aeiou]", "class set operations"),
            ("[[a-z]b]", "a class inside a class"),
            ("a**", "a repetition of a repetition"),
            ("a{2}{3}", "a repetition of a repetition"),
            ("a{1001}", "up to 1000"),
            ("(a{1,10}){1,101}", "up to 1000"),
            ("(a{2}){501}", "up to 1000"),
            ("\\<word", "literal text"),
            ("a{1, 5}", "spaces in it"),
            ("a{ 3 }", "spaces in it"),
            ("(?P<a.b>x)", "only letters, digits and '_' in a group name"),
            ("(?<v[1]>x)", "group name"),
            ("\\b{start}x", "literal text"),
            ("\\u0041", "does not know this escape"),
            (
                ".{1,1000}",
                "too complex for Envoy: about 4004 RE2 instructions",
            ),
        ] {
            let found = problem(regex).unwrap_or_else(|| panic!("{regex} passed"));
            assert!(found.contains(expect), "{regex}: {found}");
        }
    }
}
